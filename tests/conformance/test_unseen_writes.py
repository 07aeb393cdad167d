"""Writes on some ranks only that move no version counter, caught by the periodic replica check (W = 2 and 3).

``p.data.mul_(...)``, ``p.data = t`` and a write through a NumPy view of a parameter change its values without
moving the version counter the per-step in-place check reads (tests/conformance/test_inplace_changes.py). Made on
some ranks only, they went unnoticed: the sharded optimizers then trained on a mix of each owner's blocks (0.095
off one process), EGN's replicas stayed apart for good. Every ``replica_check_every`` steps the step now compares
a digest of the replicated parameters across ranks, in its existing all-reduce. For every optimizer in
:data:`lightning_soaa.registry.REGISTRY`, under real DDP (``grad_reduction="none"``) and with
``grad_reduction="mean"``:

* such a write on the last rank only, before a checking step, is refused on every rank, naming the parameter and
  the rank, with the parameters and the step count unchanged; the same step again is refused again;
* after a broadcast of rank 0's ``p.data`` the run trains on, equal to one process;
* a rank that swaps other weights in through ``p.data`` and its own back (an EMA evaluation) trains on.

EGN with ``shard=False`` (``EGN-unsharded``: replicated state, every rank steps every block of its own copy) too:
neither this check nor the first step's covered it, and its copies written apart stayed apart.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_soaa.registry import OptimizerSpec, StepNeeds
from tests.conformance._battery import (
    REPLICA_SPECS,
    SPECS,
    assert_close,
    each_replica_variant,
    make,
    params,
    step,
    takes_kwarg,
)
from tests.harness.distributed import run_distributed

EVERY, STEPS = 2, 4  # the check runs at the steps taken 2 (and 4): the writes come just before the first

#: a write that moves no version counter, on one parameter (by its index)
WRITES: dict[str, tuple[int, Callable[[nn.Parameter], None]]] = {
    "data_mul": (-1, lambda p: p.data.mul_(1.01)),
    "data_assign": (0, lambda p: setattr(p, "data", p.data * 1.01)),
    "numpy_view": (1, lambda p: p.detach().numpy().__iadd__(1e-3)),
}
CASES = (*WRITES, "put_back", "two_written")


def _modes(spec: OptimizerSpec) -> list[str]:
    """``"ddp"``: real DDP with ``grad_reduction="none"`` (EGN, which differentiates the module itself: its own
    batch agreement, no DDP); ``"mean"``: the optimizer averages the gradients, no DDP."""
    return ["ddp", "mean"] if takes_kwarg(spec, "grad_reduction") else ["ddp"]


def _build(spec: OptimizerSpec, mode: str, world: int, every: int) -> tuple[nn.Module, Any, nn.Module]:
    """(the module, the optimizer, what the forward runs through)."""
    extra = {"grad_reduction": "mean"} if mode == "mean" else {}
    model, opt = make(spec, replica_check_every=every, **extra)
    wrapped = (nn.parallel.DistributedDataParallel(model)
               if mode == "ddp" and world > 1 and spec.needs is not StepNeeds.BATCH else model)
    return model, opt, wrapped


def _put_back(model: nn.Module) -> None:
    """Other weights swapped in through ``p.data`` and this rank's own put back (no version counter moves)."""
    for p in model.parameters():
        kept = p.data
        p.data = torch.zeros_like(kept)
        p.data = kept


def _run(spec: OptimizerSpec, mode: str, case: str, rank: int, world: int, every: int = EVERY) -> dict[str, Any]:
    model, opt, wrapped = _build(spec, mode, world, every)
    writer = world - 1
    out: dict[str, Any] = {"error": None}
    for t in range(STEPS):
        if t == EVERY and rank == writer:
            if case == "put_back":
                _put_back(model)
            elif case == "two_written":  # the first and the last parameter: both named
                for index in (0, -1):
                    list(model.parameters())[index].data.mul_(1.01)
            else:
                index, write = WRITES[case]
                write(list(model.parameters())[index])
        if t == EVERY:
            out["before"], out["steps_before"] = params(model), opt.num_steps + opt.skipped_steps
        try:
            step(spec, wrapped, opt, t, rank=rank, world=world)
        except RuntimeError as e:
            out["error"] = str(e)
            break
    out["params"], out["steps"] = params(model), opt.num_steps + opt.skipped_steps
    if out["error"] is not None:
        try:  # the same step again, nothing undone: refused again
            step(spec, wrapped, opt, EVERY, rank=rank, world=world)
            out["retry_error"] = None
        except RuntimeError as e:
            out["retry_error"] = str(e)
        out["resynced"] = _resync_and_train(spec, model, wrapped, opt, rank, world)
    return out


def _resync_and_train(spec: OptimizerSpec, model: nn.Module, wrapped: nn.Module, opt: Any, rank: int,
                      world: int) -> dict[str, Any]:
    import torch.distributed as dist

    for p in model.parameters():
        dist.broadcast(p.data, src=0)
    try:
        for t in range(EVERY, STEPS):
            step(spec, wrapped, opt, t, rank=rank, world=world)
    except RuntimeError as e:
        return {"error": str(e)}
    return {"error": None, "params": params(model)}


def _worker(rank: int, world: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    return {(spec.name, mode, case): _run(spec, mode, case, rank, world)
            for spec in REPLICA_SPECS for mode in _modes(spec) for case in CASES}


@pytest.fixture(scope="module", params=[2, 3], ids=["W2", "W3"])
def launch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_distributed(_worker, request.param, Path(tmp_path_factory.mktemp("unseen_writes")), timeout=400)


def _reference(spec: OptimizerSpec) -> list[torch.Tensor]:
    model, opt = make(spec)
    for t in range(STEPS):
        step(spec, model, opt, t)
    return params(model)


@each_replica_variant
@pytest.mark.parametrize("case", list(WRITES))
def test_a_write_around_autograd_on_some_ranks_is_refused_on_every_rank(spec: OptimizerSpec, case: str,
                                                                        launch: list[Any]) -> None:
    world = len(launch)
    names = [n for n, _ in make(spec)[0].named_parameters()]
    written = repr(names[WRITES[case][0]])
    for mode in _modes(spec):
        for rank, res in enumerate(launch):
            got = res[(spec.name, mode, case)]
            where = f"{mode}, rank {rank}"
            assert got["error"] is not None, f"{where}: a {case} write on rank {world - 1} only was stepped"
            assert f"parameter(s) {written} on rank(s) [{world - 1}] differ" in got["error"], (where, got["error"])
            assert "p.data" in got["error"] and "replica_check_every=2" in got["error"], got["error"]
            assert got["steps"] == got["steps_before"], where  # nothing counted
            for a, b in zip(got["params"], got["before"], strict=True):
                assert torch.equal(a, b), where  # nothing written
            assert got["retry_error"] is not None and written in got["retry_error"], (where, got["retry_error"])


@each_replica_variant
def test_every_parameter_that_differs_is_named(spec: OptimizerSpec, launch: list[Any]) -> None:
    names = [repr(n) for n, _ in make(spec)[0].named_parameters()]
    for mode in _modes(spec):
        for rank, res in enumerate(launch):
            error = res[(spec.name, mode, "two_written")]["error"]
            named = f"parameter(s) {names[0]}, {names[-1]} on rank(s) [{len(launch) - 1}]"
            assert error is not None and named in error, (mode, rank, error)


@each_replica_variant
def test_ranks_made_equal_again_after_the_refusal_train_as_one_process(spec: OptimizerSpec,
                                                                       launch: list[Any]) -> None:
    ref = _reference(spec)
    for mode in _modes(spec):
        for case in WRITES:
            for rank, res in enumerate(launch):
                got = res[(spec.name, mode, case)]["resynced"]
                assert got["error"] is None, f"{mode}, {case}, rank {rank}: {got['error']}"
                assert_close(got["params"], ref, f"{mode}, {case}, rank {rank} params")


@each_replica_variant
def test_weights_swapped_in_through_p_data_and_put_back_on_one_rank_train_as_one_process(
        spec: OptimizerSpec, launch: list[Any]) -> None:
    """No false refusal: the checking step meets replicas that are bit-equal again."""
    ref = _reference(spec)
    for mode in _modes(spec):
        for rank, res in enumerate(launch):
            got = res[(spec.name, mode, "put_back")]
            assert got["error"] is None, f"{mode}, rank {rank}: {got['error']}"
            assert_close(got["params"], ref, f"{mode}, rank {rank} params")


def test_replica_check_every_is_validated() -> None:
    spec = SPECS[0]
    for bad in (-1, 2.5, True, "10"):
        with pytest.raises(ValueError, match=r"Invalid replica_check_every=.*Must be an integer >= 0"):
            make(spec, replica_check_every=bad)
    assert all(takes_kwarg(s, "replica_check_every") for s in SPECS)
    assert make(spec)[1].sharding.replica_check_every == 1000  # type: ignore[attr-defined]
