"""torch's state-dict API (``torch.distributed.checkpoint.state_dict``) over plain parameters at W = 2.

``set_optimizer_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)`` hands the checkpoint to
rank 0 and broadcasts into the other ranks' own entries: where a rank's optimizer holds fewer state entries
than the checkpoint (a parameter that got no gradient before), that rank received fewer blocks, refused
the load alone, and rank 0 loaded and went on into its next collective (a hang). Every rank now reaches
one verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightning_soaa import registry
from tests.conformance._battery import make, step
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
    try:
        set_optimizer_state_dict(model2, opt2, saved if rank == 0 else {}, options=options)
    except ValueError as e:
        return {"error": str(e), "steps": opt2.num_steps}
    return {"error": None, "steps": opt2.num_steps}


@pytest.mark.parametrize("name", ["AdamW", "ASGO"])
def test_a_broadcast_load_over_plain_parameters_reaches_one_verdict(name: str, tmp_path: Path) -> None:
    out = run_distributed(_w_broadcast_load, 2, tmp_path, name, timeout=120)
    verdicts = {o["error"] is None for o in out}
    assert len(verdicts) == 1, out  # every rank loads, or every rank refuses (no rank left waiting)
    if out[0]["error"] is not None:
        assert all("reached the ranks unequally" in o["error"] or "did not arrive" in o["error"] for o in out), out
        assert all(o["steps"] == 1 for o in out)  # nothing changed
