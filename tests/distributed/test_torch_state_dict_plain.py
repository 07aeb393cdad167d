"""torch's state-dict API (``torch.distributed.checkpoint.state_dict``) over plain parameters at W = 2.

``set_optimizer_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)`` hands the checkpoint to
rank 0 and broadcasts into the other ranks' own entries: where a rank's optimizer held fewer state entries
than the checkpoint (a parameter that got no gradient before), that rank received fewer blocks. Before the
block counts it loaded them silently (ranks then held different states); turn 36 refused it on that rank
(and the next step's agreement on every rank). Every trainable block now shows its keys
(``optim/dcp_plain.py``), so every rank receives the whole state and continues as the optimizer that saved.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

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
    model2.load_state_dict(model.state_dict())
    steps = opt2.num_steps
    step(spec, model, opt, 2, rank=rank, world=world, average=True)
    try:
        step(spec, model2, opt2, 2, rank=rank, world=world, average=True)
        step_error = None
    except (ValueError, RuntimeError) as e:
        step_error = str(e)
    same = all(bool(torch.equal(a, b)) for a, b in zip(model.parameters(), model2.parameters()))
    return {"error": error, "steps": steps, "step_error": step_error, "same": same}


# EGN: its batch-driven step has no gradient to freeze, and no per-block state under the battery's settings
@pytest.mark.parametrize("name", [s.name for s in SPECS if s.needs is not StepNeeds.BATCH])
def test_a_broadcast_load_reaches_every_rank_and_continues_as_saved(name: str, tmp_path: Path) -> None:
    """Rank 1's optimizer held no state for the last parameter; its state dict now shows that parameter's
    keys (zeros, optim/dcp_plain.py), so the broadcast fills them as on rank 0 (before: rank 1 received
    fewer blocks, and refused). Both ranks continue bit for bit as the optimizer that saved."""
    out = run_distributed(_w_broadcast_load, 2, tmp_path, name, timeout=120)
    assert all(o["error"] is None and o["steps"] == 2 and o["step_error"] is None and o["same"] for o in out), out


def _w_state_dict_after_torch(rank: int, world: int, name: str) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    spec = registry.get(name)
    model, opt = make(spec, grad_reduction="none")
    for t in range(2):
        step(spec, model, opt, t, rank=rank, world=world, average=True)
    opt.consolidate_state_dict(to=None)
    first = opt.state_dict()
    get_optimizer_state_dict(model, opt)  # torch re-keys the state dict it gets (names for indices), in place
    second = opt.state_dict()
    model2, opt2 = make(spec, grad_reduction="none")
    opt2.load_state_dict(second)
    return {"first": sorted(map(str, first["state"])), "second": sorted(map(str, second["state"])),
            "loaded": opt2.num_steps}


@pytest.mark.parametrize("name", [s.name for s in SPECS if s.needs is not StepNeeds.BATCH])
def test_a_consolidated_state_dict_is_not_rekeyed_by_torchs_get_optimizer_state_dict(name: str, tmp_path: Path) -> None:
    """Every state_dict() after consolidate_state_dict() hands out its own ``state`` mapping: torch's
    ``get_optimizer_state_dict`` re-keys the one it gets in place, which re-keyed the kept consolidation (a
    Lightning checkpoint saved after a DCP save of the same step then failed to load)."""
    for r in run_distributed(_w_state_dict_after_torch, 2, tmp_path, name, timeout=120):
        assert r["first"] == r["second"] == [str(i) for i in range(6)], r
        assert r["loaded"] == 2
