"""``consolidate_state_dict(to=r)`` gathers the state onto rank ``r`` only, and the consolidated copy is not
kept past the next step.

Before: every rank received and unpickled every rank's state (``all_gather_object``) and dropped it, a
peak of +5.5x its own share on each rank at W = 2 (+7.5x at W = 4) at every checkpoint save Lightning
makes; and the saving rank kept the full copy alive for the rest of training (until a load). The state
dict itself is unchanged: the one every rank gathers with ``to=None``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from torch.distributed import distributed_c10d

from lightning_soaa import registry
from lightning_soaa.registry import StepNeeds
from tests.conformance._battery import SPECS, assert_identical, make, state_dict_raises, step, takes_kwarg
from tests.harness.distributed import run_distributed


def _count_unpickled() -> list[int]:
    """Count the objects torch.distributed unpickles in this process (what a rank receives by an object
    collective: all_gather_object and gather_object both go through ``_tensor_to_object``)."""
    count = [0]
    real = distributed_c10d._tensor_to_object

    def counting(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return real(*args, **kwargs)

    distributed_c10d._tensor_to_object = counting
    return count


def _w_consolidate(rank: int, world: int, name: str, to: int) -> dict[str, Any]:
    spec = registry.get(name)
    extra = {"grad_reduction": "none"} if takes_kwarg(spec, "grad_reduction") else {}
    model, opt = make(spec, **extra)
    average = spec.needs is not StepNeeds.BATCH
    for t in range(2):
        step(spec, model, opt, t, rank=rank, world=world, average=average)
    opt.consolidate_state_dict(to=None)  # the reference: every rank gathers every rank's state
    everyone = copy.deepcopy(opt.state_dict())
    unpickled = _count_unpickled()
    opt.consolidate_state_dict(to=to)
    out: dict[str, Any] = {"everyone": everyone, "unpickled": unpickled[0],
                           "holds": opt.__dict__.get("_consolidated") is not None}
    out["saved"] = opt.state_dict() if rank == to else None
    out["saved_again"] = copy.deepcopy(opt.state_dict()) if rank == to else None  # until the next step
    out["raises_elsewhere"] = rank == to or state_dict_raises(opt)
    step(spec, model, opt, 2, rank=rank, world=world, average=average)
    out["holds_after_step"] = opt.__dict__.get("_consolidated") is not None
    out["raises_after_step"] = state_dict_raises(opt)
    return out


@pytest.mark.parametrize("name", [s.name for s in SPECS])
@pytest.mark.parametrize("to", [0, 1])
def test_consolidate_to_one_rank_gathers_there_only(tmp_path: Path, name: str, to: int) -> None:
    """W = 2: the rank that is not ``to`` receives nothing (unpickles no object) and holds no consolidated
    state; the state dict on ``to`` is the one every rank gathers, bit for bit (also when state_dict() is
    called twice); the copy is dropped at the next step (state_dict() refuses then, as before), and the
    dict it returned is unchanged by the step."""
    results = run_distributed(_w_consolidate, 2, tmp_path, name, to)
    for rank, r in enumerate(results):
        assert r["raises_elsewhere"], rank
        assert not r["holds_after_step"], f"rank {rank} kept the consolidated state past the next step"
        assert r["raises_after_step"], rank
        if rank == to:
            assert r["holds"]
            assert_identical(r["saved"], r["everyone"])
            assert_identical(r["saved_again"], r["everyone"])
        else:
            assert not r["holds"] and r["unpickled"] == 0, (rank, r["unpickled"])
    assert_identical(results[0]["everyone"], results[1]["everyone"])


def _w_subgroup(rank: int, world: int) -> dict[str, Any] | None:
    group = dist.new_group([1, 2])  # every rank makes the group; ranks 1 and 2 train over it
    if rank == 0:
        return None
    spec = registry.get("AdamW")
    model, opt = make(spec, process_group=group, grad_reduction="mean")  # averaged over the group
    for t in range(2):
        step(spec, model, opt, t, rank=rank - 1, world=2)
    opt.consolidate_state_dict(to=None)
    everyone = copy.deepcopy(opt.state_dict())
    opt.consolidate_state_dict(to=1)  # the group's rank 1: global rank 2
    return {"everyone": everyone, "saved": opt.state_dict() if rank == 2 else None,
            "raises": rank == 2 or state_dict_raises(opt)}


def test_consolidate_to_a_rank_of_a_subgroup(tmp_path: Path) -> None:
    """``to`` is a rank of the optimizer's process group (torch's gather_object takes a global rank)."""
    results = run_distributed(_w_subgroup, 3, tmp_path)
    assert results[0] is None and results[1]["raises"] and results[2]["saved"] is not None
    assert_identical(results[2]["saved"], results[2]["everyone"])
    assert_identical(results[1]["everyone"], results[2]["everyone"])
