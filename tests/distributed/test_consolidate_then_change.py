"""A consolidation is the state of the moment it ran: a state changed after it and before the next step must not
be saved from the consolidated copy.

At W = 2, ``consolidate_state_dict()``, then ``opt.state.clear()`` (a reset), then ``state_dict()`` returned the
moments from before the reset (every block non-zero, where one process returns the cleared state: none), so a
checkpoint taken after a reset resumed from the state the run had dropped, silently. ``state_dict()`` now refuses a
copy whose rank's state changed since (cleared, an entry deleted or replaced, also that of a parameter the rank
holds no block of, a tensor written in place), naming the remedy; consolidating again gives the changed state.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_soaa.registry import REGISTRY, StepNeeds
from tests.conformance._battery import make, step
from tests.harness.distributed import run_distributed

pytestmark = pytest.mark.timeout(240)


def _error(fn: Any) -> str:
    try:
        fn()
    except RuntimeError as e:
        return str(e)
    return "no error"


def _nonzero_blocks(sd: dict[str, Any]) -> int:
    return sum(any(bool((v != 0).any()) for v in blk.values() if isinstance(v, torch.Tensor))
               for per in sd["state"].values() for blk in per.values())


def _trained(spec: Any, rank: int, world: int) -> Any:
    """The battery's optimizer for ``spec`` after two steps at ``world`` ranks (its state non-zero)."""
    model, opt = make(spec)
    for t in range(2):
        step(spec, model, opt, t, rank=rank, world=world, average=spec.needs is not StepNeeds.BATCH)
    return opt


def _changes(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in REGISTRY:
        opt = _trained(spec, rank, world)
        opt.consolidate_state_dict(to=None)
        twice = [_nonzero_blocks(copy.deepcopy(opt.state_dict())) for _ in range(2)]  # unchanged: both current
        owned = opt.block_state(next(iter(opt.block_table.owned())))  # every rank owns blocks of this model
        tensor = next(v for v in owned.values() if isinstance(v, torch.Tensor))
        tensor.mul_(0.5)  # in place: the copy is stale
        in_place = _error(opt.state_dict)
        opt.consolidate_state_dict(to=None)
        opt.state.clear()
        cleared = _error(opt.state_dict)
        opt.consolidate_state_dict(to=None)  # again: the state as it is now
        out[spec.name] = {"twice": twice, "in_place": in_place, "cleared": cleared,
                          "after": _nonzero_blocks(opt.state_dict())}
    return out


def test_a_state_changed_after_consolidation_is_not_saved_from_the_stale_copy(tmp_path: Path) -> None:
    results = run_distributed(_changes, 2, tmp_path, timeout=200)
    for r, res in enumerate(results):
        for spec in REGISTRY:
            got = res[spec.name]
            assert got["twice"][0] == got["twice"][1] > 0, (r, spec.name, got)
            for case in ("in_place", "cleared"):
                assert "the state changed after consolidate_state_dict()" in got[case], (r, spec.name, case, got)
                assert "Call consolidate_state_dict() again on every rank" in got[case], (r, spec.name, case, got)
            assert got["after"] == 0, (r, spec.name, got)  # the cleared state, as one process saves it


def _reset_elsewhere(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in REGISTRY:
        opt = _trained(spec, rank, world)
        # a parameter none of whose blocks rank 0 holds (every rank computes the same one)
        pi = next(i for i in range(len(opt._params))
                  if all(b.owner != 0 for b in opt.block_table.blocks if b.param_index == i))
        opt.consolidate_state_dict(to=0)
        before = _of_param(opt.state_dict(), pi) if rank == 0 else None
        del opt.state[opt._params[pi]]  # every rank resets that parameter's state (a re-initialised layer)
        got = _error(opt.state_dict) if rank == 0 else None
        opt.consolidate_state_dict(to=0)  # again: the state as it is now
        after = _of_param(opt.state_dict(), pi) if rank == 0 else None
        out[spec.name] = {"before": before, "got": got, "after": after}
    return out


def _of_param(sd: dict[str, Any], pi: int) -> int:
    """The non-zero blocks of parameter ``pi`` in ``sd``."""
    return _nonzero_blocks({"state": {k: v for k, v in sd["state"].items() if k == pi}})


def test_a_reset_of_state_the_saving_rank_does_not_hold_is_not_saved_from_the_stale_copy(tmp_path: Path) -> None:
    # every rank deletes the state of a parameter rank 0 holds no block of: rank 0's own blocks are unchanged, and
    # its state_dict() saved that parameter's moments from before the reset, where one process saves none
    res = run_distributed(_reset_elsewhere, 2, tmp_path, timeout=200)[0]
    for spec in REGISTRY:
        got = res[spec.name]
        assert got["before"] > 0 and got["after"] == 0, (spec.name, got)
        assert "the state changed after consolidate_state_dict()" in got["got"], (spec.name, got)
