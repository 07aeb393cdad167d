"""torch's state-dict API (``torch.distributed.checkpoint.state_dict``) over plain parameters at W = 2.

``set_optimizer_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)`` hands the checkpoint to
rank 0 and broadcasts into the other ranks' own entries: where a rank's optimizer holds fewer state entries
than the checkpoint (a parameter that got no gradient before), that rank receives fewer blocks. Before the
block counts it loaded them silently (ranks then held different states); now it refuses, while rank 0 loads.
Loads over plain parameters decide on each rank (a load on some ranks only must not wait in a collective the
others skip), so the next step's agreement refuses on every rank: no rank trains on, none hangs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightning_soaa import registry
from lightning_soaa.registry import StepNeeds
from tests.conformance._battery import SPECS, make, step
from tests.harness.distributed import run_distributed


def _w_broadcast_load(rank: int, world: int, name: str) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    spec = registry.get(name)
    model, opt = make(spec, grad_reduction="none")
    for t in range(2):
        step(spec, model, opt, t, rank=rank, world=world, average=True)
    opt.consolidate_state_dict(to=None)
    saved = get_optimizer_state_dict(model, opt)
    model2, opt2 = make(spec, grad_reduction="none")
    last = list(model2.parameters())[-1]
    last.requires_grad_(False)  # its blocks get no state at this step
    step(spec, model2, opt2, 0, rank=rank, world=world, average=True)
    last.requires_grad_(True)
    opt2.consolidate_state_dict(to=None)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    error = None
    try:
        set_optimizer_state_dict(model2, opt2, saved if rank == 0 else {}, options=options)
    except ValueError as e:
        error = str(e)
    steps = opt2.num_steps
    try:
        step(spec, model2, opt2, 2, rank=rank, world=world, average=True)
        step_error = None
    except (ValueError, RuntimeError) as e:
        step_error = str(e)
    return {"error": error, "steps": steps, "step_error": step_error}


# EGN: its batch-driven step has no gradient to freeze, and no per-block state under the battery's settings
@pytest.mark.parametrize("name", [s.name for s in SPECS if s.needs is not StepNeeds.BATCH])
def test_a_broadcast_load_reaching_ranks_unequally_stops_every_rank_at_the_next_step(name: str, tmp_path: Path) -> None:
    out = run_distributed(_w_broadcast_load, 2, tmp_path, name, timeout=120)
    assert out[0]["error"] is None and out[1]["error"] is not None and "did not arrive" in out[1]["error"], out
    assert out[1]["steps"] == 1  # the refusing rank changed nothing
    # the ranks now disagree: the next step refuses on every rank, none steps on
    assert all(o["step_error"] is not None for o in out), out
