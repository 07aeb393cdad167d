"""Misuse that real users run into: every optimizer either trains correctly or raises on EVERY rank.

Parametrized over :data:`lightning_soaa.registry.REGISTRY`, so a new optimizer is covered by adding its
spec. Two-rank cases run as real gloo ranks (tests/harness). Each worker returns what it saw (errors
as text, parameters) and the parent asserts; a rank that hangs or crashes fails the harness.

Issue 11, items 1-5: an optimizer built before the process group exists joins it at its first step;
gradients that differ across ranks without DDP raise with the fix; ranks that disagree on the class,
the parameter names/order or the hyperparameters raise together at construction; an error one rank
raises alone is raised on every rank and the ranks stay in step; non-finite values never reach the
parameters (a NaN a rank sees in a block it does not own, a NaN trust scalar, ``lr=inf``). Ranks
built with different ``shard=``/``grad_reduction=`` raise together at construction (they hung); ranks
out of step (``load_state_dict`` on one rank) and, under ``grad_reduction="mean"``, replicas with
different weights raise together at the step (they trained on silently).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import math
import pickle
import sys
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_soaa.optim.base import ShardedOptimizer
from lightning_soaa.registry import REGISTRY, FirstArg, OptimizerSpec, StepNeeds, get, half_mse
from tests.conformance._battery import assert_identical, each_replica_variant, takes_kwarg
from tests.harness.distributed import run_distributed
from tests.harness.models import batch, tiny_mlp

SPECS = [pytest.param(s.name, id=s.name) for s in REGISTRY]
MEAN_SPECS = [pytest.param(s.name, id=s.name) for s in REGISTRY if takes_kwarg(s, "grad_reduction")]
GRAD_SPECS = [pytest.param(s.name, id=s.name) for s in REGISTRY if s.needs is not StepNeeds.BATCH]
SIZES = (4, 4, 4, 4)  # equal-shaped layers: reordering them keeps the shape list identical


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _step(name: str, opt: Any, model: nn.Module, t: int, rank: int, *, average: bool = True,
          mutate: Any = None) -> None:
    """One step on this rank's batch; ``average`` does what DDP would (mean of the gradients)."""
    loss = _backward(name, opt, model, t, rank, average=average)
    if mutate is not None:
        mutate(model)
    _step_only(name, opt, model, t, rank, loss)


def _backward(name: str, opt: Any, model: nn.Module, t: int, rank: int, *, average: bool = True) -> Any:
    """The gradients of this rank's batch (averaged over the ranks as DDP does when ``average``) and the
    loss; nothing for an optimizer that differentiates the model itself."""
    if get(name).needs is StepNeeds.BATCH:
        return None
    x, y = batch(t, rank, n=4, d_in=SIZES[0], d_out=SIZES[-1])
    opt.zero_grad(set_to_none=True)
    loss = half_mse(model(x), y)
    loss.backward()
    if average and dist.is_initialized():
        world = dist.get_world_size()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad.div_(world)
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        loss /= world
    return loss


def _step_only(name: str, opt: Any, model: nn.Module, t: int, rank: int, loss: Any) -> None:
    """The optimizer's step after :func:`_backward` (an EGN-like optimizer takes the batch)."""
    spec = get(name)
    if spec.needs is StepNeeds.BATCH:  # the optimizer differentiates the model on the global batch
        x, y = batch(t, rank, n=4, d_in=SIZES[0], d_out=SIZES[-1])
        spec.take_step(opt, model, x, y)
    elif spec.needs is StepNeeds.LOSS:
        opt.step(loss=loss.detach())
    else:
        opt.step()


def _build(name: str, model: nn.Module, **kw: Any) -> Any:
    spec = get(name)
    return spec.build(model, **{**spec.test_kwargs, **kw})


def _error(fn: Any) -> str:
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


# ---------------------------------------------------------------------- 1. built before the group
def _w_built_early(rank: int, world: int, name: str, store2: str) -> dict[str, Any]:
    dist.barrier()  # no rank tears the harness's group down while a peer is still connecting to it
    dist.destroy_process_group()  # as under stock LightningCLI: the optimizer exists first
    early_model = tiny_mlp(sizes=SIZES)
    early = _build(name, early_model)
    pending = bool(getattr(early, "join_pending", False))
    dist.init_process_group("gloo", store=dist.FileStore(store2, world), rank=rank, world_size=world)
    ref_model = tiny_mlp(sizes=SIZES)
    ref = _build(name, ref_model)  # built the usual way, after the group exists
    for t in range(3):
        _step(name, early, early_model, t, rank)
        _step(name, ref, ref_model, t, rank)
    return {"pending_before": pending, "world": early.comm.world_size, "owned": len(early.block_table.owned()),
            "blocks": len(early.block_table.blocks), "early": _params(early_model), "ref": _params(ref_model)}


@pytest.mark.parametrize("name", SPECS)
def test_built_before_process_group_joins_at_first_step(tmp_path: Path, name: str) -> None:
    res = run_distributed(_w_built_early, 2, tmp_path, name, str(tmp_path / "store2"))
    for r, out in enumerate(res):
        assert out["pending_before"], f"rank {r}: no join was pending"
        assert out["world"] == 2, f"rank {r}: still single-process after the first step"
        for a, b in zip(out["early"], out["ref"]):  # exactly the run of an optimizer built after the group
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert sum(out["owned"] for out in res) == res[0]["blocks"]  # sharded: every block owned once
    for a, b in zip(res[0]["early"], res[1]["early"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def _w_built_early_scaler(rank: int, world: int, name: str, store2: str) -> dict[str, Any]:
    """Built before the group, grad_reduction="mean", torch.amp.GradScaler: an overflow on rank 1 alone at
    the first step (GradScaler's first iterations often overflow), where the optimizer joins the group."""
    dist.barrier()  # see _w_built_early
    dist.destroy_process_group()
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model, grad_reduction="mean")
    dist.init_process_group("gloo", store=dist.FileStore(store2, world), rank=rank, world_size=world)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for t in range(3):
        x, y = batch(t, rank, n=4, d_in=SIZES[0], d_out=SIZES[-1])
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if t == 0 and rank == 1:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        scaler.step(opt, **({"loss": loss.detach()} if get(name).needs is StepNeeds.LOSS else {}))
        scaler.update()
    return {"skipped": opt.skipped_steps, "steps": opt.num_steps, "params": _params(model)}


@pytest.mark.parametrize("name", [s.name for s in REGISTRY if s.needs is not StepNeeds.BATCH
                                  and takes_kwarg(s, "grad_reduction")])
def test_built_before_process_group_under_a_grad_scaler_skips_an_overflow_on_every_rank(tmp_path: Path,
                                                                                       name: str) -> None:
    """The scaler reads the optimizer's _step_supports_amp_scaling before the step that joins the group: read
    as one process, it skipped a first-step overflow on rank 1 alone while rank 0 entered the step's
    collectives (gloo: 'Received data size doesn't match expected size', an abort). Both ranks skip it."""
    res = run_distributed(_w_built_early_scaler, 2, tmp_path, name, str(tmp_path / "store2"), timeout=90)
    assert all(r["skipped"] == 1 and r["steps"] == 2 for r in res), [(r["skipped"], r["steps"]) for r in res]
    for a, b in zip(res[0]["params"], res[1]["params"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def _w_built_early_swapped(rank: int, world: int, name: str, store2: str) -> dict[str, Any]:
    """Two optimizers of one class over equal-shaped models, both built before the group; the last rank
    steps them in the other order at their first step (which is where they join)."""
    dist.barrier()  # see _w_built_early
    dist.destroy_process_group()
    torch.manual_seed(rank)  # replicas not yet equal: a crossed pair would not show through the weights
    models = [tiny_mlp(sizes=SIZES), tiny_mlp(sizes=SIZES)]
    opts = [_build(name, m) for m in models]
    dist.init_process_group("gloo", store=dist.FileStore(store2, world), rank=rank, world_size=world)
    for m in models:  # the same weights on every rank, as DDP's wrap would make them
        for p in m.parameters():
            dist.broadcast(p.data, 0)
    before = [_params(m) for m in models]
    order = (1, 0) if rank == world - 1 else (0, 1)
    msgs = [_error(lambda i=i: _step(name, opts[i], models[i], 0, rank)) for i in order]
    return {"msgs": msgs, "unchanged": all(torch.equal(a, b) for i in (0, 1)
                                           for a, b in zip(before[i], _params(models[i])))}


@pytest.mark.parametrize("name", SPECS)
def test_optimizers_built_before_the_group_and_stepped_swapped_raise_at_the_join(tmp_path: Path, name: str) -> None:
    """Built before the group, each optimizer joins at its first step; the ranks' joins paired one rank's
    first optimizer with another's second: twins passed the join's comparison and EGN's replicas trained
    crossed (0.89 apart after 3 steps, no error), others raised about gradients or a class that did not
    differ. The join now compares each process's construction order: every rank raises, nothing changed."""
    for r, out in enumerate(run_distributed(_w_built_early_swapped, 2, tmp_path, name, str(tmp_path / "store2"))):
        assert all("joining the process group with another optimizer than rank 0" in m and "[1]" in m
                   for m in out["msgs"]), f"rank {r}: {out['msgs']}"
        assert out["unchanged"], f"rank {r}: parameters changed"


def _swap_steps(names: list[str], opts: list[Any], models: list[nn.Module], t: int, rank: int, world: int,
                average: tuple[bool, bool] = (True, True)) -> dict[str, Any]:
    """Step ``t`` of two optimizers: both backward passes in the same order on every rank (DDP's averaging
    where ``average``), then the steps, the last rank the other way round. The errors each step raised,
    and whether every parameter is as before."""
    before = [_params(m) for m in models]
    losses = [_backward(names[i], opts[i], models[i], t, rank, average=average[i]) for i in (0, 1)]
    order = (1, 0) if rank == world - 1 else (0, 1)
    msgs = [_error(lambda i=i: _step_only(names[i], opts[i], models[i], t, rank, losses[i])) for i in order]
    return {"msgs": msgs, "unchanged": all(torch.equal(a, b) for i in (0, 1)
                                           for a, b in zip(before[i], _params(models[i])))}


def _w_joining_meets_a_step(rank: int, world: int, name: str, store2: str) -> dict[str, Any]:
    """One optimizer built before the group (it joins at its first step), one after; the last rank steps
    the joined one first while rank 0 steps the joining one first."""
    dist.barrier()  # see _w_built_early
    dist.destroy_process_group()
    models = [tiny_mlp(sizes=SIZES), tiny_mlp(sizes=(4, 7, 4))]
    opts = [_build(name, models[0])]
    dist.init_process_group("gloo", store=dist.FileStore(store2, world), rank=rank, world_size=world)
    opts.append(_build(name, models[1]))
    return _swap_steps([name, name], opts, models, 0, rank, world)


@pytest.mark.parametrize("name", SPECS)
def test_a_joining_optimizer_crossed_with_a_joined_ones_step_raises(tmp_path: Path, name: str) -> None:
    """The join's construction all-gather met the other optimizer's step all-reduce: both ranks waited
    (a hang, before this turn too). The join now begins with a meeting of the step record's size, where
    a joining optimizer shows no instance id of a built one: every rank raises, nothing changed."""
    for r, out in enumerate(run_distributed(_w_joining_meets_a_step, 2, tmp_path, name, str(tmp_path / "store2"),
                                            timeout=120)):
        assert all("another optimizer than rank 0" in m for m in out["msgs"]), f"rank {r}: {out['msgs']}"
        assert out["unchanged"], f"rank {r}: parameters changed"


def _w_stepped_then_joined(rank: int, world: int, name: str, store2: str) -> str:
    dist.barrier()  # see _w_built_early
    dist.destroy_process_group()
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model)
    _step(name, opt, model, 0, rank)  # a single-process step before the group exists
    dist.init_process_group("gloo", store=dist.FileStore(store2, world), rank=rank, world_size=world)
    return _error(lambda: _step(name, opt, model, 1, rank))


@pytest.mark.parametrize("name", SPECS)
def test_stepped_alone_before_the_group_refuses_to_join(tmp_path: Path, name: str) -> None:
    for msg in run_distributed(_w_stepped_then_joined, 2, tmp_path, name, str(tmp_path / "store2")):
        # one step, counted once (EGN's step and the template both pass the join point)
        assert "RuntimeError" in msg and "cannot join" in msg and "stepped 1 time(s)" in msg, msg


def _w_refused_then_joined(rank: int, world: int, name: str, store2: str) -> dict[str, Any]:
    dist.barrier()  # see _w_built_early
    dist.destroy_process_group()
    early_model = tiny_mlp(sizes=SIZES)
    early = _build(name, early_model)
    early.param_groups[0]["lr"] = -1.0
    refused = _error(lambda: _step(name, early, early_model, 0, rank))  # refused: nothing was stepped
    early.param_groups[0]["lr"] = _build(name, tiny_mlp(sizes=SIZES)).param_groups[0]["lr"]
    dist.init_process_group("gloo", store=dist.FileStore(store2, world), rank=rank, world_size=world)
    ref_model = tiny_mlp(sizes=SIZES)
    ref = _build(name, ref_model)
    for t in range(2):
        _step(name, early, early_model, t, rank)
        _step(name, ref, ref_model, t, rank)
    return {"refused": refused, "early": _params(early_model), "ref": _params(ref_model)}


@pytest.mark.parametrize("name", SPECS)
def test_a_refused_step_before_the_group_still_joins(tmp_path: Path, name: str) -> None:
    # a step refused before it changed anything was counted as taken alone, and the join then refused
    # ("already stepped 1 time(s)") a run that had never stepped
    for out in run_distributed(_w_refused_then_joined, 2, tmp_path, name, str(tmp_path / "store2")):
        assert "lr=-1.0" in out["refused"], out["refused"]
        for a, b in zip(out["early"], out["ref"]):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def _single_process_state(name: str) -> dict[str, Any]:
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model)
    for t in range(2):
        _step(name, opt, model, t, 0)
    return copy.deepcopy(opt.state_dict())


def _w_loaded_before_joining(rank: int, world: int, store2: str, floor: int | None) -> dict[str, Any]:
    """Every optimizer: built and loaded (e.g. a resumed checkpoint) before the group exists, then
    trained; equal to one built and loaded after the group exists. One spawn for the whole registry.
    ``floor``: the automatic block size's floor of this process (1: the row-blocked optimizers' blocks
    of this model change when they join, and the loaded state is re-cut)."""
    dist.barrier()  # see _w_built_early
    dist.destroy_process_group()
    if floor is not None:
        for spec in REGISTRY:
            cls = spec.load()
            if issubclass(cls, ShardedOptimizer) and cls._block_specs is ShardedOptimizer._block_specs:
                cls.default_max_block_numel = floor
    early: dict[str, tuple[Any, nn.Module]] = {}
    saved = {spec.name: _single_process_state(spec.name) for spec in REGISTRY}  # a one-process run
    for spec in REGISTRY:
        model = tiny_mlp(sizes=SIZES)
        opt = _build(spec.name, model)
        opt.load_state_dict(copy.deepcopy(saved[spec.name]))
        early[spec.name] = (opt, model)
    dist.init_process_group("gloo", store=dist.FileStore(store2, world), rank=rank, world_size=world)
    out: dict[str, Any] = {}
    for spec in REGISTRY:
        opt, model = early[spec.name]
        ref_model = tiny_mlp(sizes=SIZES)
        ref = _build(spec.name, ref_model)
        ref.load_state_dict(copy.deepcopy(saved[spec.name]))
        for t in (2, 3):
            _step(spec.name, opt, model, t, rank)
            _step(spec.name, ref, ref_model, t, rank)
        out[spec.name] = {"world": opt.comm.world_size, "early": _params(model), "ref": _params(ref_model),
                          "steps": (opt.num_steps, ref.num_steps), "blocks": len(opt.block_table.blocks),
                          "saved_blocks": sum(map(len, saved[spec.name]["lightning_soaa"]["layout"]))}
    return out


@pytest.mark.parametrize("floor", [None, 1], ids=["same-blocks", "blocks-change-at-join"])
def test_state_loaded_before_joining_is_kept(tmp_path: Path, floor: int | None) -> None:
    for r, res in enumerate(run_distributed(_w_loaded_before_joining, 2, tmp_path, str(tmp_path / "store2"),
                                            floor, timeout=300)):
        if floor is not None:  # the case is exercised: SOAA's blocks at W = 2 are not those saved at W = 1
            assert res["SOAA"]["blocks"] > res["SOAA"]["saved_blocks"], res["SOAA"]
        for name, out in res.items():
            assert out["world"] == 2, f"rank {r}, {name}: not sharded"
            assert out["steps"][0] == out["steps"][1], f"rank {r}, {name}: {out['steps']}"
            for a, b in zip(out["early"], out["ref"]):
                torch.testing.assert_close(a, b, atol=0, rtol=0, msg=f"rank {r}, {name}")


def _join_snapshot(model: nn.Module, opt: Any) -> dict[str, Any]:
    """Everything a failed join must leave as it was: the parameters, the local state, the counters and the
    optimizer still waiting to join (its one-process table). The optimizer-wide state is read only where the
    optimizer is still one process (over the group it may be a collective, which a lone rank would wait in)."""
    local = opt.comm.world_size == 1
    return {"params": _params(model), "state": [copy.deepcopy(dict(opt.state.get(p, {}))) for p in model.parameters()],
            "global": copy.deepcopy(opt._global_state()) if local else "joined", "pending": opt.join_pending,
            "world": opt.comm.world_size, "owned": [b.key for b in opt.block_table.owned()],
            "steps": [opt.num_steps, opt.skipped_steps]}


@contextlib.contextmanager
def _failing_state_copies(kind: type[Exception] | None) -> Any:
    """Every copy of a saved state tensor into the optimizer's state raises ``kind`` (None: no fault): a load
    that runs out of memory, or a state that cannot be placed, on this rank alone."""
    if kind is None:
        yield
        return
    from lightning_soaa.distributed import checkpoint

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise kind("injected: the saved state cannot be placed on this rank")

    kept = checkpoint._owned_value
    checkpoint._owned_value = fail  # type: ignore[assignment]
    try:
        yield
    finally:
        checkpoint._owned_value = kept  # type: ignore[assignment]


#: the faults of the join's restore, in turn (rank 1 only): where the optimizer joins, what rank 1 raises
_JOIN_FAULTS = (("step", torch.OutOfMemoryError), ("step", ValueError), ("consolidate_state_dict", ValueError))


def _loaded_before_the_group(rank: int, world: int, name: str, store2: str) -> tuple[Any, Any, Any, Any]:
    """``(model, opt, ref_model, ref)``: an optimizer built and loaded (a one-process state) before the group
    exists, so that its first step or consolidation joins it, and the reference built and loaded after the group,
    stepped twice (steps 2 and 3: the run the first one should make)."""
    dist.barrier()  # see _w_built_early
    dist.destroy_process_group()
    saved = _single_process_state(name)
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model)
    opt.load_state_dict(copy.deepcopy(saved))
    dist.init_process_group("gloo", store=dist.FileStore(store2, world), rank=rank, world_size=world)
    ref_model = tiny_mlp(sizes=SIZES)
    ref = _build(name, ref_model)
    ref.load_state_dict(copy.deepcopy(saved))
    for t in (2, 3):
        _step(name, ref, ref_model, t, rank)
    return model, opt, ref_model, ref


def _w_join_restore_fails(rank: int, world: int, name: str, store2: str) -> dict[str, Any]:
    """Built and loaded before the group exists; the first step joins the group, and rank 1 alone fails to
    place the loaded state in the blocks it owns at W = 2 (an out of memory, then a ValueError; then in a
    consolidation, the other place a join is made). Then the step is taken again without the fault, and once
    more; the reference is built and loaded after the group."""
    model, opt, ref_model, ref = _loaded_before_the_group(rank, world, name, store2)
    before = _join_snapshot(model, opt)
    out: dict[str, Any] = {}
    for how, kind in _JOIN_FAULTS:
        raised, message = None, "no error"
        with _failing_state_copies(kind if rank == 1 else None):
            try:
                _step(name, opt, model, 2, rank) if how == "step" else opt.consolidate_state_dict()
            except Exception as e:  # noqa: BLE001 - the parent checks what each rank raised
                raised, message = type(e), f"{type(e).__name__}: {e}"
        try:
            assert_identical(_join_snapshot(model, opt), before, "after the failed join")
            unchanged = "yes"
        except AssertionError as e:
            unchanged = str(e)
        out[f"{how}: {kind.__name__}"] = {"raised": raised, "message": message, "unchanged": unchanged}
        if unchanged != "yes":  # a rank left joined alone: a retry would meet its peer's other collectives
            return out
    for t in (2, 3):  # the retry, then one more step: the run that never failed
        _step(name, opt, model, t, rank)
    out["early"], out["ref"] = _params(model), _params(ref_model)
    out["states"] = [[copy.deepcopy(dict(o.state.get(p, {}))) for p in m.parameters()]
                     for o, m in ((opt, model), (ref, ref_model))]
    out["steps"] = [(o.num_steps, o.skipped_steps) for o in (opt, ref)]
    return out


@pytest.mark.parametrize("name", SPECS)
def test_a_join_whose_restore_fails_on_one_rank_raises_on_every_rank(tmp_path: Path, name: str) -> None:
    """The join's restore of the state loaded before the group (the blocks this rank owns at W = 2) failed on
    one rank (at a step or a consolidation): it raised alone, half-joined, while its peer went on into the
    collectives that follow (a hang). Now every rank raises the same class (its peer's naming rank 1), nothing
    changed (still waiting to join, its state as loaded), and the step taken again trains exactly as an
    optimizer built and loaded after the group."""
    results = run_distributed(_w_join_restore_fails, 2, tmp_path, name, str(tmp_path / "store2"), timeout=120)
    for how, kind in _JOIN_FAULTS:
        case = f"{how}: {kind.__name__}"
        said = {r: res[case]["message"] for r, res in enumerate(results)}
        for r, res in enumerate(results):
            got = res[case]
            assert got["raised"] is not None and issubclass(got["raised"], kind), (case, r, said)
            assert ("injected" if r == 1 else "rank(s) [1]") in got["message"], (case, r, said)
            assert got["unchanged"] == "yes", (case, r, got["unchanged"])
    for r, res in enumerate(results):
        assert res["steps"][0] == res["steps"][1], (r, res["steps"])
        for a, b in zip(res["early"], res["ref"]):
            torch.testing.assert_close(a, b, atol=0, rtol=0, msg=f"rank {r}")
        assert_identical(res["states"][0], res["states"][1], f"rank {r}: state")


def _unchanged_then_retried(name: str, rank: int, built: tuple[Any, Any, Any, Any], before: Any, limit: Any,
                            interrupted: bool) -> dict[str, Any]:
    """After an interrupted join: whether the optimizer is as ``before`` it (snapshot, automatic block size
    ``limit``); if so the step is taken again, and once more, and the parameters and counters returned beside
    those of the reference (``built``: model, optimizer, reference model, reference optimizer)."""
    model, opt, ref_model, ref = built
    try:
        assert_identical(_join_snapshot(model, opt), before, "after the interrupted join")
        assert opt.__dict__.get("_auto_limit") == limit, ("block size", opt.__dict__.get("_auto_limit"), limit)
        unchanged = "yes"
    except AssertionError as e:
        unchanged = str(e)
    out: dict[str, Any] = {"interrupted": interrupted, "unchanged": unchanged}
    if unchanged != "yes":  # half-joined: a retry would not be the first try's join
        return out
    for t in (2, 3):  # the retry, then one more step: the run that was never interrupted
        _step(name, opt, model, t, rank)
    out["early"], out["ref"] = _params(model), _params(ref_model)
    out["steps"] = [(o.num_steps, o.skipped_steps) for o in (opt, ref)]
    return out


def _w_join_interrupted(rank: int, world: int, name: str, store2: str) -> dict[str, Any]:
    """Built and loaded before the group exists; the first step's join is interrupted (Ctrl+C: a
    KeyboardInterrupt on every rank) while it places the loaded state in the blocks each rank will own, the
    join's longest local work. Then the step is taken again, and once more; the reference is built and
    loaded after the group."""
    model, opt, ref_model, ref = _loaded_before_the_group(rank, world, name, store2)
    before = _join_snapshot(model, opt)
    limit = opt.__dict__.get("_auto_limit")
    interrupted = False
    with _failing_state_copies(KeyboardInterrupt):
        try:
            _step(name, opt, model, 2, rank)
        except KeyboardInterrupt:
            interrupted = True
    return _unchanged_then_retried(name, rank, (model, opt, ref_model, ref), before, limit, interrupted)


@pytest.mark.parametrize("name", SPECS)
def test_a_join_interrupted_while_it_places_the_state_changes_nothing(tmp_path: Path, name: str) -> None:
    """A Ctrl+C (on every rank) while the join placed the loaded state in the blocks each rank will own left
    the optimizer half-joined: still waiting to join, its one-process table and state, but its communicator
    already the group's (and its automatic block size the group's), so that the step taken again 'joined'
    from there. Now nothing changed, and the step taken again trains exactly as an optimizer built and loaded
    after the group."""
    results = run_distributed(_w_join_interrupted, 2, tmp_path, name, str(tmp_path / "store2"), timeout=120)
    for r, res in enumerate(results):
        assert res["interrupted"], r
        assert res["unchanged"] == "yes", (r, res["unchanged"])
        assert res["steps"][0] == res["steps"][1], (r, res["steps"])
        for a, b in zip(res["early"], res["ref"]):
            torch.testing.assert_close(a, b, atol=0, rtol=0, msg=f"rank {r}")


def _w_join_interrupted_installing(rank: int, world: int, name: str, store2: str, where: str) -> dict[str, Any]:
    """Built and loaded before the group exists; the first step's join is interrupted (Ctrl+C on every rank)
    after the construction check, while it makes the checked join the optimizer's: as the state install begins
    (the table adopted) or inside it (the state dict cleared and refilled, the counters not yet). Then the step
    is taken again, and once more; the reference is built and loaded after the group."""
    model, opt, ref_model, ref = _loaded_before_the_group(rank, world, name, store2)
    before = _join_snapshot(model, opt)
    limit = opt.__dict__.get("_auto_limit")

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    setattr(opt, where, interrupted)
    interrupted_ = False
    try:
        _step(name, opt, model, 2, rank)
    except KeyboardInterrupt:
        interrupted_ = True
    finally:
        delattr(opt, where)
    out = _unchanged_then_retried(name, rank, (model, opt, ref_model, ref), before, limit, interrupted_)
    if "steps" in out:
        out["states"] = [[copy.deepcopy(dict(o.state.get(p, {}))) for p in m.parameters()]
                         for o, m in ((opt, model), (ref, ref_model))]
    return out


@pytest.mark.parametrize("where", ["_install_owned_state", "_own_state_dicts"])
@pytest.mark.parametrize("name", SPECS)
def test_a_join_interrupted_while_it_installs_the_state_changes_nothing(tmp_path: Path, name: str,
                                                                        where: str) -> None:
    """A Ctrl+C (on every rank) after the join's check, between adopting the group's table and installing the
    state it placed (or inside that install, the state dict cleared and refilled), left the optimizer with the
    group's table over its one-process state or a half-installed one, no longer waiting to join: the step taken
    again ran from there. Now nothing changed (still waiting to join, the state as loaded), and the step taken
    again trains exactly as an optimizer built and loaded after the group."""
    results = run_distributed(_w_join_interrupted_installing, 2, tmp_path, name, str(tmp_path / "store2"), where,
                              timeout=120)
    for r, res in enumerate(results):
        assert res["interrupted"], r
        assert res["unchanged"] == "yes", (r, res["unchanged"])
        assert res["steps"][0] == res["steps"][1], (r, res["steps"])
        for a, b in zip(res["early"], res["ref"]):
            torch.testing.assert_close(a, b, atol=0, rtol=0, msg=f"rank {r}")
        assert_identical(res["states"][0], res["states"][1], f"rank {r}: state")


# ---------------------------------------------------------------------- 2. gradients differ across ranks
def _w_unaveraged(rank: int, world: int, name: str) -> dict[str, Any]:
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model)
    _step(name, opt, model, 0, rank)  # averaged (as DDP would): fine
    before = _params(model)
    msg = _error(lambda: _step(name, opt, model, 1, rank, average=False))  # no DDP: local gradients
    after = _params(model)
    mean_model = tiny_mlp(sizes=SIZES)
    fixed = _build(name, mean_model, grad_reduction="mean")  # the fix the message names
    _step(name, fixed, mean_model, 0, rank, average=False)
    return {"msg": msg, "unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
            "steps": opt.num_steps, "mean_params": _params(mean_model)}


@pytest.mark.parametrize("name", GRAD_SPECS)
def test_gradients_that_differ_across_ranks_raise_on_every_rank(tmp_path: Path, name: str) -> None:
    res = run_distributed(_w_unaveraged, 2, tmp_path, name)
    for out in res:
        assert "differ from rank 0's" in out["msg"], out["msg"]
        assert "DistributedDataParallel" in out["msg"] and "grad_reduction='mean'" in out["msg"]
        assert out["unchanged"] and out["steps"] == 1  # the second step changed nothing
    for a, b in zip(res[0]["mean_params"], res[1]["mean_params"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


class _Tempered(nn.Module):
    """The battery's MLP with a learned output scale whose gradient is ~1e-9 of Σ‖g‖² (a temperature)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = tiny_mlp(sizes=SIZES)
        self.temp = nn.Parameter(torch.ones(1, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * (1 + 1e-4 * self.temp)


def _w_one_small_gradient_unaveraged(rank: int, world: int, name: str) -> dict[str, Any]:
    model = _Tempered()
    opt = _build(name, model)
    _step(name, opt, model, 0, rank)  # every gradient averaged: fine
    before = _params(model)
    loss = _backward(name, opt, model, 1, rank, average=False)
    share = float(model.temp.grad.square().sum()) / sum(float(p.grad.square().sum()) for p in model.parameters())
    for p in model.body.parameters():  # DDP reduces every bucket but the scale's (unfrozen after DDP was built)
        dist.all_reduce(p.grad)
        p.grad.div_(world)
    msg = _error(lambda: _step_only(name, opt, model, 1, rank, loss))
    return {"msg": msg, "share": share, "unchanged": all(torch.equal(a, b) for a, b in zip(before, _params(model)))}


@pytest.mark.parametrize("name", GRAD_SPECS)
def test_one_small_gradient_that_differs_across_ranks_raises_on_every_rank(tmp_path: Path, name: str) -> None:
    """One parameter's gradient left unaveraged (its DDP bucket never reduced) while the rest are averaged: its
    share of Σ‖g‖² was below the comparison's tolerance (1e-6 of the sum), so it passed and its owner stepped it
    from its own gradient (4% of its movement off the one-process run in 4 steps, silently). Each gradient now
    weighs alike in the comparison: every rank raises naming it, nothing changed."""
    for out in run_distributed(_w_one_small_gradient_unaveraged, 2, tmp_path, name):
        assert out["share"] < 1e-6, out["share"]  # what the sum alone cannot see
        assert "the gradients on rank(s) [1] differ from rank 0's (first: parameter 'temp', ‖g‖² " in out["msg"], \
            out["msg"]  # named, with both ranks' values
        assert out["unchanged"], out


def _w_refusal_detail_fails_on_one_rank(rank: int, world: int, name: str, what: str) -> dict[str, Any]:
    from lightning_soaa.distributed import agreement

    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model)
    _step(name, opt, model, 0, rank)  # averaged: fine
    before = _params(model)
    attr = "grad_sq_exact" if what == "gradients" else "group_values"
    kept = getattr(agreement, attr)

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("injected in the refusal's detail")

    if rank == 1:  # what this rank sends in the refusal's exchange cannot be made here (out of memory)
        setattr(agreement, attr, out_of_memory)
        if what == "hyperparameters":
            for g in opt.param_groups:
                g["lr"] = g["lr"] * 0.5
    try:
        msg = _error(lambda: _step(name, opt, model, 1, rank, average=what == "hyperparameters"))
    finally:
        setattr(agreement, attr, kept)
    return {"msg": msg, "unchanged": all(torch.equal(a, b) for a, b in zip(before, _params(model)))}


@pytest.mark.parametrize("what", ["gradients", "hyperparameters"])
def test_a_refusal_whose_detail_one_rank_cannot_make_raises_on_every_rank(tmp_path: Path, what: str) -> None:
    """The refusal of gradients or hyperparameters that differ across ranks names the first value that differs
    from one more exchange on its error path (all_gather_object). A rank that could not make what it sends there
    (out of memory in the float64 norms, a value it cannot read) raised that error alone, before the exchange,
    while the others waited in it (gloo: an abort or the harness's timeout; NCCL: a hang). Now it sends no detail
    and every rank raises the refusal together, nothing changed."""
    for out in run_distributed(_w_refusal_detail_fails_on_one_rank, 2, tmp_path, "AdamW", what, timeout=60):
        assert f"the {what} " in out["msg"] and "rank(s) [1]" in out["msg"], out["msg"]
        assert out["unchanged"], out


class _Float64Norms(TorchDispatchMode):
    """Counts the gradients whose norms are taken accumulated in float64 (the scan's exact pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        dtype = kwargs.get("dtype", args[2] if len(args) > 2 else None)
        if func.overloadpacket is torch.ops.aten._foreach_norm and dtype is torch.float64:
            self.tensors += len(args[0])
        return func(*args, **kwargs)


def _w_overflow_reads_once(rank: int, world: int, name: str) -> dict[str, Any]:
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model)
    _step(name, opt, model, 0, rank)
    loss = _backward(name, opt, model, 1, rank)  # averaged (as DDP would), then an overflow on every rank alike
    grads = [p.grad for p in model.parameters()]
    grads[0].view(-1)[0] = math.inf
    with _Float64Norms() as counted:
        _step_only(name, opt, model, 1, rank, loss)
    return {"read": counted.tensors, "grads": len(grads), "skipped": opt.skipped_steps}


def test_a_step_skipped_for_an_overflow_reads_the_gradients_once_in_float64(tmp_path: Path) -> None:
    """grad_reduction='none' at W > 1: a step whose gradients hold an inf (an fp16 run's overflow, every rank
    alike) is skipped on every rank and compares no gradient, yet took the Σ log2 ‖g_i‖² of the comparison again
    in float64 after Σ‖g‖²'s exact pass: two float64 passes over every gradient (each several times the scan's
    cost) at every overflow. Now one."""
    for out in run_distributed(_w_overflow_reads_once, 2, tmp_path, "AdamW", timeout=60):
        assert out["skipped"] == 1, out
        assert out["read"] <= out["grads"], out  # Σ‖g‖²'s exact pass at most


def _w_stepped_in_backward(rank: int, world: int, name: str) -> str:
    """One optimizer per parameter, each stepped from its parameter's post-accumulate-grad hook (torch's
    pattern for fusing the step into the backward), under DDP: the hooks run before DDP's all-reduce."""
    spec = get(name)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(tiny_mlp(sizes=SIZES))
    x, y = batch(0, rank, n=4, d_in=SIZES[0], d_out=SIZES[-1])  # each rank its own data
    loss = half_mse(model(x), y)
    opts = {p: spec.load()([(n, p)], **spec.test_kwargs) for n, p in model.module.named_parameters()}

    def step(p: torch.Tensor) -> None:
        if spec.needs is StepNeeds.LOSS:
            opts[p].step(loss=loss.detach())
        else:
            opts[p].step()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(step)
    return _error(loss.backward)


@pytest.mark.parametrize("name", SPECS)
def test_a_step_fused_into_backward_under_ddp_says_it_runs_before_the_average(tmp_path: Path, name: str) -> None:
    """A step fused into the backward (one optimizer per parameter, stepped from
    ``register_post_accumulate_grad_hook``) under DDP runs before DDP averages the gradients: refused on every
    rank like any unaveraged gradient, the message saying why here."""
    if get(name).needs is StepNeeds.BATCH:
        pytest.skip(f"{name} takes the batch and differentiates the model itself: it reads no gradients, so "
                    "there is no backward to fuse its step into")
    for msg in run_distributed(_w_stepped_in_backward, 2, tmp_path, name, timeout=120):
        assert "differ from rank 0's" in msg and "inside a backward pass" in msg, msg


def _w_unfrozen_after_ddp(rank: int, world: int, name: str) -> dict[str, Any]:
    """Progressive unfreezing under DDP: the first layer is frozen when DDP is built (DDP leaves it out of
    its buckets), then unfrozen; its gradients are never averaged. A hunt found the error's list of causes
    silent on this one."""
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model)  # over every parameter
    model[0].requires_grad_(False)
    ddp = nn.parallel.DistributedDataParallel(model)
    model[0].requires_grad_(True)
    return _one_ddp_step(rank, name, model, opt, ddp)


def _one_ddp_step(rank: int, name: str, model: nn.Module, opt: torch.optim.Optimizer,
                  ddp: nn.parallel.DistributedDataParallel) -> dict[str, Any]:
    """One training step through ``ddp``: the step's error message and whether the parameters stayed."""
    before = _params(model)
    x, y = batch(0, rank, n=4, d_in=SIZES[0], d_out=SIZES[-1])
    opt.zero_grad(set_to_none=True)
    loss = half_mse(ddp(x), y)
    loss.backward()
    kw = {"loss": loss.detach()} if get(name).needs is StepNeeds.LOSS else {}
    msg = _error(lambda: opt.step(**kw))
    return {"msg": msg, "unchanged": all(torch.equal(a, b) for a, b in zip(before, _params(model)))}


@pytest.mark.parametrize("name", GRAD_SPECS)
def test_a_layer_unfrozen_after_ddp_was_built_is_named(tmp_path: Path, name: str) -> None:
    for out in run_distributed(_w_unfrozen_after_ddp, 2, tmp_path, name):
        assert "differ from rank 0's" in out["msg"] and "unfrozen later" in out["msg"], out["msg"]
        assert out["unchanged"]


def _w_frozen_after_ddp(rank: int, world: int, name: str, find_unused: bool) -> dict[str, Any]:
    """``model[0].requires_grad_(False)`` after DDP wrapped the model (a backbone frozen by hand between steps):
    without find_unused_parameters DDP never reduces the bucket holding it, nor the other parameters in that
    bucket. The error named a parameter the user never touched and only 'a parameter the forward did not
    use'. With find_unused_parameters=True the loop trains (its final parameters returned)."""
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model)  # over every parameter
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
    _step(name, opt, ddp, 0, rank, average=False)
    model[0].requires_grad_(False)
    if not find_unused:
        return _one_ddp_step(rank, name, model, opt, ddp)
    for t in range(1, 3):
        _step(name, opt, ddp, t, rank, average=False)
    return {"params": _params(model)}


@pytest.mark.parametrize("name", GRAD_SPECS)
def test_a_layer_frozen_after_ddp_was_built_is_named(tmp_path: Path, name: str) -> None:
    for out in run_distributed(_w_frozen_after_ddp, 2, tmp_path, name, False):
        assert "one frozen (requires_grad_(False)) since DDP wrapped the model" in out["msg"], out["msg"]
        assert "find_unused_parameters=True" in out["msg"] and out["unchanged"], out
    trained = [out["params"] for out in run_distributed(_w_frozen_after_ddp, 2, tmp_path, name, True)]
    assert all(torch.equal(a, b) for a, b in zip(trained[0], trained[1]))


def _local_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP refuses annotations other than its own
    """A DDP communication hook that leaves each rank its own gradient (local SGD without a subgroup)."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _w_local_hook(rank: int, world: int, name: str) -> dict[str, Any]:
    """Under DDP with a communication hook that does not all-reduce. A hunt found the error's list of
    causes silent on hooks: it only told a user already under DDP to wrap the model in DDP."""
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model)
    ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    ddp.register_comm_hook(None, _local_hook)
    return _one_ddp_step(rank, name, model, opt, ddp)


@pytest.mark.parametrize("name", GRAD_SPECS)
def test_a_ddp_comm_hook_that_does_not_all_reduce_is_named(tmp_path: Path, name: str) -> None:
    for out in run_distributed(_w_local_hook, 2, tmp_path, name):
        assert "differ from rank 0's" in out["msg"] and "communication hook" in out["msg"], out["msg"]
        assert out["unchanged"]


# ---------------------------------------------------------------------- 3. ranks that disagree
def _next_name(name: str) -> str:
    names = [s.name for s in REGISTRY]
    return names[(names.index(name) + 1) % len(names)]


def _w_disagree(rank: int, world: int, name: str) -> dict[str, str]:
    spec = get(name)
    out: dict[str, str] = {}
    model = tiny_mlp(sizes=SIZES)
    # a different optimizer class on rank 1 (aborted inside gloo before): a matching-size collective
    out["class"] = _error(lambda: _build(name if rank == 0 else _next_name(name), model))
    # other parameter names (the model wrapped once more on rank 1)
    out["names"] = _error(lambda: _build(name, model if rank == 0 else nn.Sequential(model)))
    # another parameter dtype on rank 1 (same names and shapes)
    other = torch.float32 if next(model.parameters()).dtype == torch.float64 else torch.float64
    out["dtypes"] = _error(lambda: _build(name, model if rank == 0 else copy.deepcopy(model).to(other)))
    # another learning rate on rank 1
    lr = spec.test_kwargs.get("lr", 1e-3)
    out["lr"] = _error(lambda: _build(name, model, lr=lr if rank == 0 else lr * 2))
    # ... as a NumPy float32 (not a float subclass: its type name alone was compared, 0.1 off either run)
    out["lr_np"] = _error(lambda: _build(name, model, lr=np.float32(lr if rank == 0 else lr * 2)))
    if spec.first_arg is FirstArg.NAMED_PARAMETERS:  # same shapes, another order: layers swapped
        named = list(model.named_parameters())
        if rank == 1:
            named = named[2:4] + named[0:2] + named[4:]
        out["order"] = _error(lambda: spec.load()(named, **spec.test_kwargs))
    # another shard= on rank 1 (rank 1 skipped the construction check and rank 0 waited in it); with
    # grad_reduction="mean" a shard=False rank raised its own refusal alone before the check
    if takes_kwarg(spec, "shard"):
        out["shard"] = _error(lambda: _build(name, model, shard=rank == 0))
        if takes_kwarg(spec, "grad_reduction"):
            out["shard_mean"] = _error(lambda: _build(name, model, shard=rank == 0, grad_reduction="mean"))
    # the ranks are still in step: a correct optimizer trains after all that
    ok = _build(name, model)
    _step(name, ok, model, 0, rank)
    out["after"] = _error(lambda: _step(name, ok, model, 1, rank))
    return out


@pytest.mark.parametrize("name", SPECS)
def test_ranks_that_disagree_raise_together_at_construction(tmp_path: Path, name: str) -> None:
    res = run_distributed(_w_disagree, 2, tmp_path, name, timeout=60)
    field = {"class": "optimizer class", "names": "parameter names", "lr": "hyperparameters",
             "lr_np": "hyperparameters",
             "dtypes": "parameter shapes, dtypes and device types",
             "order": "parameter names", "shard": "sharding options", "shard_mean": "sharding options"}
    for r, out in enumerate(res):
        for case, text in field.items():
            if case in out:
                assert "RuntimeError" in out[case] and text in out[case], f"rank {r}, {case}: {out[case]}"
        assert out["after"] == "no error", out["after"]


def _w_lr_changed_on_one_rank(rank: int, world: int, name: str) -> dict[str, Any]:
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model)
    _step(name, opt, model, 0, rank)
    if rank == 1:
        for g in opt.param_groups:
            g["lr"] = g["lr"] * 0.5  # e.g. a scheduler stepped on one rank only
    before = _params(model)
    msg = _error(lambda: _step(name, opt, model, 1, rank))
    lr = get(name).test_kwargs["lr"]  # the value rank 0 still has
    invalid = {}  # a value the constructor refuses, on rank 1 alone, then on both ranks
    for who in ("rank 1", "both"):
        for g in opt.param_groups:
            g["lr"] = math.nan if who == "both" or rank == 1 else lr
        invalid[who] = _error(lambda: _step(name, opt, model, 1, rank))
    for g in opt.param_groups:
        g["lr"] = lr
    unchanged = all(torch.equal(a, b) for a, b in zip(before, _params(model)))
    return {"msg": msg, "invalid": invalid, "unchanged": unchanged,
            "after": _error(lambda: _step(name, opt, model, 1, rank))}


@pytest.mark.parametrize("name", SPECS)
def test_hyperparameters_changed_on_one_rank_raise_at_the_step(tmp_path: Path, name: str) -> None:
    """Values that differ across ranks, and values the constructor refuses (on one rank or on all),
    raise on every rank together with nothing changed; the ranks then step on in step."""
    for r, out in enumerate(run_distributed(_w_lr_changed_on_one_rank, 2, tmp_path, name)):
        assert "hyperparameters" in out["msg"] and "rank(s) [1]" in out["msg"], out["msg"]
        # the value that differs, named with both ranks' values (an exchange on the error path only)
        lr = get(name).test_kwargs["lr"]
        assert f"param_groups[0]['lr'] is {lr!r} on rank 0, {lr * 0.5!r} on rank 1" in out["msg"], out["msg"]
        assert "Invalid lr=nan" in out["invalid"]["both"], out["invalid"]
        assert ("Invalid lr=nan" if r == 1 else "rank(s) [1]") in out["invalid"]["rank 1"], out["invalid"]
        assert out["unchanged"] and out["after"] == "no error", out


def _settable(name: str) -> list[str]:
    """The optimizer-wide values a loop may set by hand between steps, outside the param groups: the class's
    settable properties (EGN's ``opt.damping`` and ``opt.alpha``)."""
    cls = get(name).load()
    return sorted(n for n in dir(cls) if isinstance(getattr(cls, n, None), property) and getattr(cls, n).fset)


GLOBAL_VALUES = [pytest.param(s.name, n, id=f"{s.name}-{n}") for s in REGISTRY for n in _settable(s.name)]


def _w_global_changed_on_one_rank(rank: int, world: int, name: str, attr: str) -> dict[str, Any]:
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model)
    _step(name, opt, model, 0, rank)
    was = getattr(opt, attr)
    new = was * 0.5 or 0.25
    if rank == 1:
        setattr(opt, attr, new)  # e.g. a callback annealing EGN's λ on one rank only
    before = _params(model)
    msg = _error(lambda: _step(name, opt, model, 1, rank))
    unchanged = all(torch.equal(a, b) for a, b in zip(before, _params(model)))
    setattr(opt, attr, was)
    return {"msg": msg, "was": was, "new": new, "unchanged": unchanged,
            "after": _error(lambda: _step(name, opt, model, 1, rank))}


@pytest.mark.parametrize(("name", "attr"), GLOBAL_VALUES)
def test_an_optimizer_wide_value_set_on_one_rank_is_named_on_every_rank(tmp_path: Path, name: str, attr: str) -> None:
    """An optimizer-wide value set by hand on one rank only (EGN's ``opt.damping``, ``opt.alpha``) raises on
    every rank naming it with both ranks' values, as a param group's value does (the message said only that
    "the hyperparameters" differ: no field, no value); nothing changed, and the ranks then step on."""
    for out in run_distributed(_w_global_changed_on_one_rank, 2, tmp_path, name, attr):
        assert "hyperparameters" in out["msg"] and "rank(s) [1]" in out["msg"], out["msg"]
        assert f"opt.{attr} is {out['was']!r} on rank 0, {out['new']!r} on rank 1" in out["msg"], out["msg"]
        assert out["unchanged"] and out["after"] == "no error", out


# ---------------------------------------------------------------------- 4. an error on one rank only
def _w_one_rank_raises(rank: int, world: int, name: str) -> dict[str, Any]:
    spec = get(name)
    model = tiny_mlp(sizes=SIZES)
    twin = copy.deepcopy(model)
    opt, twin_opt = _build(name, model), _build(name, twin)
    _step(name, opt, model, 0, rank)
    _step(name, twin_opt, twin, 0, rank)
    before = _params(model)

    def boom() -> Any:  # a closure that fails on rank 1 only, and is correct on rank 0
        if rank == 1:
            raise ValueError("the closure failed on rank 1 only")
        x, y = batch(1, rank, n=4, d_in=SIZES[0], d_out=SIZES[-1])
        if spec.needs is StepNeeds.BATCH:
            return x, y
        with torch.enable_grad():
            opt.zero_grad()
            loss = half_mse(model(x), y)
            loss.backward()
        return loss.detach()

    msgs = {"closure": _error(lambda: opt.step(boom))}
    if spec.needs is StepNeeds.LOSS:  # an invalid loss (wrong shape) on one rank
        def bad_loss() -> None:
            x, y = batch(1, rank, n=4, d_in=SIZES[0], d_out=SIZES[-1])
            opt.zero_grad()
            half_mse(model(x), y).backward()
            opt.step(loss=torch.ones(2) if rank == 1 else torch.tensor(1.0))
        msgs["loss"] = _error(bad_loss)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, _params(model)))
    for t in (1, 2):  # the ranks are still paired step for step: equal to a run without the errors
        _step(name, opt, model, t, rank)
        _step(name, twin_opt, twin, t, rank)
    return {"msgs": msgs, "unchanged": unchanged, "params": _params(model), "twin": _params(twin)}


@pytest.mark.parametrize("name", SPECS)
def test_an_error_on_one_rank_is_raised_on_every_rank(tmp_path: Path, name: str) -> None:
    res = run_distributed(_w_one_rank_raises, 2, tmp_path, name)
    for r, out in enumerate(res):
        for case, msg in out["msgs"].items():
            assert msg != "no error", f"rank {r}, {case}: no error"
            if r == 1:  # the rank that failed raises its own error
                assert "ValueError" in msg, msg
            else:
                assert "rank(s) [1]" in msg, msg
        assert out["unchanged"], f"rank {r}: parameters changed by a failed step"
        for a, b in zip(out["params"], out["twin"]):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    for a, b in zip(res[0]["params"], res[1]["params"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ---------------------------------------------------------------------- two optimizers in different orders
def _w_swapped_order(rank: int, world: int, name: str, other: str | None, mean: bool) -> dict[str, Any]:
    """Two optimizers over two models (``other``: the second one's class over a wider model, else the same;
    ``mean``: each that can averages the gradients itself, ``grad_reduction="mean"``): step 0 in the same
    order on every rank; at step 1 every rank runs both backward passes in the same order and the last
    rank steps the optimizers the other way round; then every rank consolidates them, the last rank again
    the other way round."""
    # another class over a wider model: its exchanges differ in size from the first optimizer's
    models = [tiny_mlp(sizes=SIZES), tiny_mlp(sizes=SIZES if other is None else (4, 7, 4))]
    names = [name, other or name]
    averaged = [mean and takes_kwarg(get(n), "grad_reduction") for n in names]
    opts = [_build(n, m, **({"grad_reduction": "mean"} if a else {})) for n, m, a in zip(names, models, averaged)]
    for i in (0, 1):
        _step(names[i], opts[i], models[i], 0, rank, average=not averaged[i])
    before = [_params(m) for m in models]
    # DDP's gradient averaging runs in backward, in the same order on every rank; then the steps swap
    losses = [_backward(names[i], opts[i], models[i], 1, rank, average=not averaged[i]) for i in (0, 1)]
    order = (1, 0) if rank == world - 1 else (0, 1)
    msgs = [_error(lambda i=i: _step_only(names[i], opts[i], models[i], 1, rank, losses[i])) for i in order]
    consolidated = [_error(lambda i=i: opts[i].consolidate_state_dict()) for i in order]
    return {"msgs": msgs, "consolidated": consolidated, "before": before, "after": [_params(m) for m in models]}


def _other_class(name: str) -> str:
    return "SOAA" if name == "AdamW" else "AdamW"


@pytest.mark.parametrize("mean", [False, True], ids=["ddp", "mean"])
@pytest.mark.parametrize("mixed", [False, True], ids=["twins", "another-class"])
@pytest.mark.parametrize("name", SPECS)
def test_optimizers_stepped_in_different_orders_raise_on_every_rank(tmp_path: Path, name: str, mixed: bool,
                                                                    mean: bool) -> None:
    """Ranks that step (or consolidate) two optimizers in different orders pair one optimizer's collectives
    with the other's: with equal shapes and hyperparameters the ranks drifted apart silently (0.6 in 6 steps)
    and a consolidation wrote one optimizer's blocks into the other's checkpoint; with another class the
    step's all-reduce differed in size (a gloo abort), and EGN's step, which begins with its own batch
    agreement, and a step with grad_reduction="mean", which begins with the gradient exchange (sizes of the
    optimizer's own), met the other optimizer's first collective in a call of another size (gloo aborted
    the process; NCCL hangs). Every rank now raises, naming it; nothing changed (W = 2, W = 3 for one
    case: the last rank is the odd one)."""
    if mean and not (takes_kwarg(get(name), "grad_reduction") or mixed):
        pytest.skip(f"{name} has no grad_reduction option (the 'another-class' case pairs it with one that has)")
    world = 3 if (mixed and mean and name == "AdamW") else 2
    res = run_distributed(_w_swapped_order, world, tmp_path, name, _other_class(name) if mixed else None, mean)
    for r, out in enumerate(res):
        for msg in out["msgs"] + out["consolidated"]:
            assert "another optimizer than rank 0" in msg and f"[{world - 1}]" in msg, f"rank {r}: {msg}"
        for a, b in zip(out["before"], out["after"]):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, atol=0, rtol=0)


def _w_world_and_default(rank: int, world: int, name: str) -> dict[str, Any]:
    """Twins over equal-shaped models without names, grad_reduction="mean": one over the default group
    (process_group=None), one over dist.group.WORLD (the same group); swapped on the last rank at step 1."""
    models = [tiny_mlp(sizes=SIZES), tiny_mlp(sizes=SIZES)]
    spec = get(name)
    opts = [spec.load()(list(m.parameters()), **{**spec.test_kwargs, "grad_reduction": "mean", "process_group": g})
            for m, g in zip(models, (None, dist.group.WORLD))]
    for i in (0, 1):
        _step(name, opts[i], models[i], 0, rank, average=False)
    return _swap_steps([name, name], opts, models, 1, rank, world, average=(False, False))


@pytest.mark.parametrize("name", MEAN_SPECS)
def test_twins_over_the_default_group_and_group_world_are_told_apart(tmp_path: Path, name: str) -> None:
    """process_group=None and dist.group.WORLD are one group, counted under two keys: twins got one ordinal,
    so equal instance ids, and no order check before the exchange; swapped, they trained crossed replicas
    silently (0.94 apart). One key now: every rank raises, nothing changed."""
    for r, out in enumerate(run_distributed(_w_world_and_default, 2, tmp_path, name)):
        assert all("another optimizer than rank 0" in m for m in out["msgs"]), f"rank {r}: {out['msgs']}"
        assert out["unchanged"], f"rank {r}: parameters changed"


def _w_counts_differ(rank: int, world: int, name: str) -> dict[str, Any]:
    """Processes that saw different numbers of optimizers over the default group (a group destroyed and
    made again with a new process: the survivors counted the old group's); then twins stepped swapped."""
    from lightning_soaa.optim import base

    base._BUILT_OVER[id(None)] = base._BUILT_OVER.get(id(None), 0) + (3 if rank == 0 else 0)
    models = [tiny_mlp(sizes=SIZES), tiny_mlp(sizes=SIZES)]
    opts = [_build(name, m) for m in models]
    steps = [_error(lambda i=i: _step(name, opts[i], models[i], 0, rank)) for i in (0, 1)]
    order = (1, 0) if rank == 1 else (0, 1)
    swapped = [_error(lambda i=i: _step(name, opts[i], models[i], 1, rank)) for i in order]
    return {"steps": steps, "swapped": swapped}


@pytest.mark.parametrize("name", SPECS)
def test_optimizer_counts_that_differ_across_processes_are_agreed(tmp_path: Path, name: str) -> None:
    """The ordinal in an optimizer's id is agreed at construction (the ranks' largest count): a group made
    again with a new process was refused at every step (found by a reviewer); the swap is still caught."""
    for r, out in enumerate(run_distributed(_w_counts_differ, 2, tmp_path, name)):
        assert out["steps"] == ["no error", "no error"], f"rank {r}: {out['steps']}"
        assert all("another optimizer than rank 0" in m for m in out["swapped"]), f"rank {r}: {out['swapped']}"


class _Interrupted(RuntimeError):
    pass


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("kind", [_Interrupted, KeyboardInterrupt])
def test_an_interrupted_update_is_refused_until_a_checkpoint_is_loaded(name: str, kind: type[BaseException]) -> None:
    """An exception inside the update (out of memory in a kernel) can leave some blocks stepped and others
    not: a caller that catches it and steps on trained from that state. The error says so, every later
    step raises until load_state_dict, and a checkpoint load trains on exactly as a run without the
    failure. (At W > 1 the other ranks stay in that step's collectives, as after a crash: not tested.)
    Ctrl+C in a notebook too (KeyboardInterrupt is no Exception: the next steps ran on, 1e-3 to 4e-2 off
    both the uninterrupted run and the one that skipped that step; lifecycle hunter)."""
    model = tiny_mlp(sizes=SIZES)
    twin = copy.deepcopy(model)
    opt, twin_opt = _build(name, model), _build(name, twin)
    _step(name, opt, model, 0, 0)
    saved = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())

    def interrupted(*args: Any) -> None:
        raise kind("injected: out of memory in the update")

    opt._apply = interrupted
    opt._planned_step = lambda: False  # the template's path (SOAA's step plan: tests/unit/test_soaa_plan.py)
    with pytest.raises(kind) as info:
        _step(name, opt, model, 1, 0)
    del opt._apply, opt._planned_step
    if sys.version_info >= (3, 11):  # the explanation rides as an exception note
        assert "partly updated" in " ".join(getattr(info.value, "__notes__", [])), info.value
    assert "interrupted inside its update" in _error(lambda: _step(name, opt, model, 1, 0))
    opt.load_state_dict(saved[0])  # the way back: a checkpoint
    model.load_state_dict(saved[1])
    for t in (0, 1, 2):
        if t:
            _step(name, opt, model, t, 0)
        _step(name, twin_opt, twin, t, 0)
    for a, b in zip(_params(model), _params(twin), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def _interrupt(opt: Any, where: str = "_apply") -> None:
    """Make the next step raise KeyboardInterrupt (Ctrl+C) as its update begins (``_apply``) or as the ranks
    begin to exchange the updated blocks (``_exchange_out``: this rank's own blocks stepped)."""
    def interrupted(*args: Any) -> None:
        raise KeyboardInterrupt

    setattr(opt, where, interrupted)
    opt._planned_step = lambda: False  # the template's path (SOAA's step plan: tests/unit/test_soaa_plan.py)


@pytest.mark.parametrize("name", SPECS)
def test_the_state_of_an_interrupted_update_is_not_saved(name: str) -> None:
    """A script that saves on its way out of a Ctrl+C (``except KeyboardInterrupt: torch.save(...)``,
    Lightning's OnExceptionCheckpoint) checkpointed a partly updated state: EGN's resumed on a fresh process
    without an error (0.18 off the uninterrupted run a step later), the others' were refused only at that
    load, blamed on a state dict that changed after it was taken. state_dict() and consolidate_state_dict()
    refuse it, saying why; a load (also torch's param_names recipe, whose pre hook starts from state_dict())
    restores the optimizer, which then saves again."""
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model)
    _step(name, opt, model, 0, 0)
    saved = copy.deepcopy(opt.state_dict())
    _interrupt(opt)
    with pytest.raises(KeyboardInterrupt):
        _step(name, opt, model, 1, 0)
    del opt._apply, opt._planned_step
    for call in (opt.state_dict, opt.consolidate_state_dict):
        said = _error(call)
        assert "interrupted inside its update" in said and "on rank 0" in said, said
        assert "Keep the last checkpoint saved before the interruption" in said, said
    opt.register_load_state_dict_pre_hook(lambda o, loaded: o.state_dict() and None)
    opt.load_state_dict(saved)
    assert _error(opt.state_dict) == "no error"


def _w_interrupted_consolidation(rank: int, world: int, name: str, where: str) -> dict[str, Any]:
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model)
    _step(name, opt, model, 0, rank)
    if rank == 0:  # this rank alone (out of memory in its update): the other steps on into the exchange
        _interrupt(opt, where)
    return _step_then_save(name, opt, model, 1, rank)  # rank 1's exchange fails once rank 0 has gone


def _step_then_save(name: str, opt: Any, model: nn.Module, t: int, rank: int) -> dict[str, Any]:
    """Step ``t`` (its error's type, or "no error") and what a save then says on this rank."""
    try:
        _step(name, opt, model, t, rank)
        step = "no error"
    except (KeyboardInterrupt, RuntimeError) as e:
        step = type(e).__name__
    return {"step": step, "consolidate": _error(opt.consolidate_state_dict), "state_dict": _error(opt.state_dict)}


@pytest.mark.parametrize("where", ["_apply", "_exchange_out"])
@pytest.mark.parametrize("name", SPECS)
def test_a_consolidation_after_an_interrupted_update_is_refused_without_a_hang(tmp_path: Path, name: str,
                                                                               where: str) -> None:
    """One rank interrupted inside its update (or as the ranks exchange the updated blocks: its own stepped,
    the step not counted) while the other went on into the step's exchange: the interrupted rank's
    consolidation (Lightning's OnExceptionCheckpoint) joined an all-reduce that met the peer's gather, and
    both ranks hung until the process group's timeout. It refuses before any collective, naming itself, and
    the peer raises once that rank's process has ended (as after its crash), never saving."""
    out = run_distributed(_w_interrupted_consolidation, 2, tmp_path, name, where, timeout=120)
    said = out[0]["consolidate"]
    assert "interrupted inside its update" in said and "on rank 0" in said, out[0]
    assert out[0]["state_dict"].startswith("RuntimeError") and "on rank 0" in out[0]["state_dict"], out[0]
    assert out[1]["consolidate"] != "no error", out[1]


class _FailAt(TorchDispatchMode):
    """Raise ``kind`` at the ``at``-th ATen call made under it (1 = the first; 0: never), and record every
    call: whether it writes one of its arguments, whether it makes a tensor (an allocation)."""

    def __init__(self, at: int = 0, kind: type[BaseException] = torch.OutOfMemoryError) -> None:
        super().__init__()
        self.at, self.kind, self.calls = at, kind, []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        schema = func._schema
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
        makes = not writes and any(str(r.type).startswith("Tensor") and r.alias_info is None for r in schema.returns)
        self.calls.append((str(func), writes, makes))
        if len(self.calls) == self.at:
            raise self.kind(f"injected at {func} (call {self.at} of the update)")
        return func(*args, **(kwargs or {}))


def _inject(opt: Any, mode: _FailAt) -> None:
    """Run the update's hooks (``_decide``: EGN's line search moves the parameters there; ``_apply``) under
    ``mode``; the template's path (not SOAA's step plan)."""
    def under(inner: Any) -> Any:
        def run(*args: Any) -> Any:
            with mode:
                return inner(*args)
        return run

    for hook in ("_decide", "_apply"):
        setattr(opt, hook, under(getattr(opt, hook)))
    opt._planned_step = lambda: False


def _uninject(opt: Any) -> None:
    del opt._decide, opt._apply, opt._planned_step


def _update_calls(name: str, t: int) -> list[tuple[str, bool, bool]]:
    """The ATen calls of step ``t``'s update (after steps 0..t-1) of an uninterrupted run."""
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model)
    for k in range(t):
        _step(name, opt, model, k, 0)
    mode = _FailAt()
    _inject(opt, mode)
    _step(name, opt, model, t, 0)
    return mode.calls


def _injection_points(n: int) -> list[int]:
    """The first 8 calls, then 8 spread over the rest (a root iteration makes hundreds)."""
    rest = range(9, n + 1)
    return sorted({*range(1, min(n, 8) + 1), *rest[::max(1, len(rest) // 8)], n} - {0})


@pytest.mark.parametrize("name", SPECS)
def test_an_update_that_raises_is_refused_or_steps_again_exactly(name: str) -> None:
    """An exception at any ATen call of the update (out of memory, Ctrl+C), the first step's (lazy state)
    and a later one's, EGN's line search included (its trials move every parameter long before _apply:
    those windows were not covered, nor its RNG, momentum, damping and counters): either the optimizer
    refuses to step and to save until a load (it wrote), or it left nothing changed, so a caller that
    catches it and steps again trains bit for bit as the uninterrupted run. And an out of memory at an
    allocation before anything was written is not refused (the step after it was refused for nothing:
    a caller who lowers the batch and retries could not)."""
    reference = tiny_mlp(sizes=SIZES)
    ref_opt = _build(name, reference)
    after = []
    for t in range(4):
        _step(name, ref_opt, reference, t, 0)
        after.append(_params(reference))
    for t in (0, 1):
        calls = _update_calls(name, t)
        first_write = next((i for i, c in enumerate(calls, 1) if c[1]), len(calls) + 1)
        for j, at in enumerate(_injection_points(len(calls))):
            kind = torch.OutOfMemoryError if j % 2 == 0 else KeyboardInterrupt
            model = tiny_mlp(sizes=SIZES)
            opt = _build(name, model)
            for k in range(t):
                _step(name, opt, model, k, 0)
            _inject(opt, _FailAt(at, kind))
            with pytest.raises(kind):
                _step(name, opt, model, t, 0)
            _uninject(opt)
            where = f"step {t}, call {at} ({calls[at - 1][0]}), {kind.__name__}"
            refused = "interrupted inside its update" in _error(opt.state_dict)
            if at < first_write and calls[at - 1][2]:
                assert not refused, f"{where}: refused though nothing was written"
            if refused:
                assert "interrupted inside its update" in _error(lambda: _step(name, opt, model, t, 0)), where
                continue
            for k in (t, t + 1, t + 2):  # stepped again: exactly the uninterrupted run
                _step(name, opt, model, k, 0)
                for a, b in zip(_params(model), after[k], strict=True):
                    assert torch.equal(a, b), f"{where}: step {k} differs from the uninterrupted run"


#: how the step that raised is taken again: "none": no GradScaler (the optimizer's own step); "scaler": through
#: torch.amp.GradScaler, which unscales the gradients in place before step() (one process); "contract": the
#: scaler's contract with the optimizer (``_step_supports_amp_scaling``, what grad_reduction="mean" at W > 1
#: uses), which hands ``grad_scale``/``found_inf`` to the step, which unscales the gradients itself
_SCALER_MODES = ("none", "scaler", "contract")


@contextlib.contextmanager
def _scaler_contract(opt: Any, on: bool) -> Any:
    """``_step_supports_amp_scaling`` forced True on ``opt``'s class while inside (``on``)."""
    if on:
        type(opt)._step_supports_amp_scaling = property(lambda self: True)
    try:
        yield
    finally:
        if on:
            del type(opt)._step_supports_amp_scaling


def _scaled_backward(name: str, opt: Any, model: nn.Module, t: int, scaler: Any, rank: int = 0) -> Any:
    """:func:`_backward` with the loss scaled by ``scaler`` (when there is one; not averaged over the ranks)."""
    if scaler is None or get(name).needs is StepNeeds.BATCH:
        return _backward(name, opt, model, t, rank)
    x, y = batch(t, rank, n=4, d_in=SIZES[0], d_out=SIZES[-1])
    opt.zero_grad(set_to_none=True)
    loss = half_mse(model(x), y)
    scaler.scale(loss).backward()
    return loss


def _scaled_step_only(name: str, opt: Any, model: nn.Module, t: int, scaler: Any, loss: Any, rank: int = 0) -> None:
    """:func:`_step_only` through ``scaler.step`` and ``scaler.update`` (when there is a scaler)."""
    if scaler is None or get(name).needs is StepNeeds.BATCH:
        return _step_only(name, opt, model, t, rank, loss)
    scaler.step(opt, **({"loss": loss.detach()} if get(name).needs is StepNeeds.LOSS else {}))
    scaler.update()


def _scaled_run(name: str, mode: str) -> tuple[nn.Module, Any, Any]:
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model)
    return model, opt, (None if mode == "none" else torch.amp.GradScaler("cpu", init_scale=2.0**10))


def _snapshot(model: nn.Module, opt: Any, scaler: Any) -> dict[str, Any]:
    return {"params": _params(model), "state": copy.deepcopy(opt.state_dict()),
            "scaler": scaler.state_dict() if scaler is not None else {}}


def _inject_step(opt: Any, mode: _FailAt) -> None:
    """Run the whole of ``opt.step`` (however called: by the scaler too) under ``mode``: the unscaling, the
    gradient scans, EGN's capture forward and line search, the update."""
    inner = opt.step

    def run(*args: Any, **kwargs: Any) -> Any:
        with mode:
            return inner(*args, **kwargs)
    opt.step = run


def _step_calls(name: str, mode: str, t: int) -> list[tuple[str, bool, bool]]:
    """The ATen calls of ``opt.step`` at step ``t`` (after steps 0..t-1) of an uninterrupted run."""
    model, opt, scaler = _scaled_run(name, mode)
    for k in range(t):
        _scaled_step_only(name, opt, model, k, scaler, _scaled_backward(name, opt, model, k, scaler))
    counting = _FailAt()
    loss = _scaled_backward(name, opt, model, t, scaler)
    _inject_step(opt, counting)
    _scaled_step_only(name, opt, model, t, scaler, loss)
    return counting.calls


@pytest.mark.parametrize("mode", _SCALER_MODES)
@pytest.mark.parametrize("name", SPECS)
def test_a_step_that_raises_is_refused_or_retried_exactly_with_and_without_a_grad_scaler(name: str,
                                                                                          mode: str) -> None:
    """An out of memory or a Ctrl+C at any early ATen call of ``step()`` (its first calls and some spread over the
    rest: the scaler's unscaling, the gradient scans, EGN's capture forward, the update), with and without a
    torch.amp.GradScaler, is either refused (the update wrote) or leaves everything as before the step: a caller
    that catches it and calls ``scaler.step`` again on the same gradients ("again"), or runs the backward anew
    ("anew", the usual retry after an out of memory), trains bit for bit as the uninterrupted run, the scaler's
    scale included. Under the scaler's contract the step unscaled the gradients in place, then raised: the retry
    divided them by the scale again, and by the scale squared (the scaler multiplies a ``grad_scale`` the raise
    left on the optimizer): silently wrong. EGN's capture forward wrapped an out of memory in a ValueError, which
    a caller's ``except torch.OutOfMemoryError`` missed. (EGN takes no gradients: no GradScaler.)"""
    if mode != "none" and get(name).needs is StepNeeds.BATCH:
        pytest.skip("EGN differentiates the model itself: no gradients for a GradScaler")
    with _scaler_contract(_build(name, tiny_mlp(sizes=SIZES)), mode == "contract"):
        model, opt, scaler = _scaled_run(name, mode)
        after = []
        for t in range(4):
            _scaled_step_only(name, opt, model, t, scaler, _scaled_backward(name, opt, model, t, scaler))
            after.append(_snapshot(model, opt, scaler))
        retried = 0
        for t in (0, 1):
            calls = _step_calls(name, mode, t)
            # the step's own calls: not the profiler's record_function that torch's Optimizer wraps it in
            own = [i for i, c in enumerate(calls, 1) if not c[0].startswith("profiler.")]
            for j, at in enumerate(own[i - 1] for i in _injection_points(len(own))):
                kind = torch.OutOfMemoryError if j % 2 == 0 else KeyboardInterrupt
                # torch's own scaler, having unscaled in place, does not unscale a new backward's gradients
                how = "anew" if j % 4 >= 2 and mode != "scaler" else "again"
                where = f"step {t}, call {at} ({calls[at - 1][0]}), {kind.__name__}, retried {how}"
                model, opt, scaler = _scaled_run(name, mode)
                for k in range(t):
                    _scaled_step_only(name, opt, model, k, scaler, _scaled_backward(name, opt, model, k, scaler))
                loss = _scaled_backward(name, opt, model, t, scaler)
                _inject_step(opt, _FailAt(at, kind))
                with pytest.raises(kind):
                    _scaled_step_only(name, opt, model, t, scaler, loss)
                del opt.step
                if opt.num_steps + opt.skipped_steps > t:  # raised once the step was counted: it is taken
                    assert_identical(_snapshot(model, opt, None), {**after[t], "scaler": {}}, f"{where}: taken")
                    continue
                if "interrupted inside its update" in _error(opt.state_dict):
                    assert "interrupted inside its update" in _error(lambda: _step(name, opt, model, t, 0)), where
                    continue
                retried += 1
                if how == "anew":
                    loss = _scaled_backward(name, opt, model, t, scaler)
                _scaled_step_only(name, opt, model, t, scaler, loss)
                for k in (t, t + 1, t + 2):  # stepped again: exactly the uninterrupted run
                    if k > t:
                        _scaled_step_only(name, opt, model, k, scaler, _scaled_backward(name, opt, model, k, scaler))
                    got = _snapshot(model, opt, scaler)
                    for key in ("params", "state", "scaler"):
                        assert_identical(got[key], after[k][key], f"{where}: step {k}'s {key}")
        assert retried > 0  # the raises at the first calls (allocations, reads) are retried, not refused


def _w_out_of_memory_on_one_rank(rank: int, world: int, name: str) -> dict[str, Any]:
    """Step 1 runs out of memory on rank 0 alone, in agreed work (EGN: its capture forward; the others: a local
    error before the step's all-reduce), then every rank that caught an out of memory steps again on a new
    backward; under torch.amp.GradScaler with grad_reduction="mean" (its contract: the step unscales)."""
    mean = takes_kwarg(get(name), "grad_reduction")
    kw = {"grad_reduction": "mean"} if mean else {}
    runs: dict[str, Any] = {}
    for run in ("reference", "interrupted"):
        model = tiny_mlp(sizes=SIZES)
        opt = _build(name, model, **kw)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if mean else None
        caught = "no error"
        for t in range(3):
            if run == "interrupted" and t == 1 and rank == 0:
                _out_of_memory_once(name, opt)
            try:
                _scaled_step_only(name, opt, model, t, scaler, _scaled_backward(name, opt, model, t, scaler, rank),
                                  rank)
            except torch.OutOfMemoryError as e:
                caught = str(e)
                _scaled_step_only(name, opt, model, t, scaler, _scaled_backward(name, opt, model, t, scaler, rank),
                                  rank)
        runs[run] = {"params": _params(model), "caught": caught, "steps": opt.num_steps,
                     "scale": scaler.get_scale() if scaler is not None else 0.0}
    return runs


def _out_of_memory_once(name: str, opt: Any) -> None:
    """The next step runs out of memory on this rank, once (see :func:`_w_out_of_memory_on_one_rank`)."""
    if get(name).needs is StepNeeds.BATCH:  # at the first ATen call of the capture forward
        capture = opt._forward_capture

        def once(*args: Any) -> Any:
            del opt._forward_capture
            with _FailAt(1):
                return capture(*args)
        opt._forward_capture = once
        return

    def hyper() -> Any:
        del opt._hyperparameter_error
        return torch.OutOfMemoryError("injected: out of memory before the step's all-reduce")
    opt._hyperparameter_error = hyper


@pytest.mark.parametrize("name", SPECS)
def test_an_out_of_memory_on_one_rank_is_one_on_every_rank_and_steps_again_exactly(tmp_path: Path,
                                                                                   name: str) -> None:
    """An out of memory on one rank in work the ranks agree on is raised on every rank as a
    torch.OutOfMemoryError (the peers' says which rank ran out): a loop that catches it on every rank, frees
    memory or shrinks the batch and steps again keeps the ranks in step, and trains as the uninterrupted run.
    EGN wrapped its capture forward's in a ValueError on that rank, and every optimizer's peers raised a
    RuntimeError or ValueError: the rank that caught it stepped on alone into the next step's collectives."""
    out = run_distributed(_w_out_of_memory_on_one_rank, 2, tmp_path, name, timeout=120)
    for rank, res in enumerate(out):
        ref, run = res["reference"], res["interrupted"]
        assert "injected" in run["caught"] if rank == 0 else "rank(s) [0] ran out of memory" in run["caught"], run
        assert run["steps"] == ref["steps"] == 3 and run["scale"] == ref["scale"], (run, ref)
        for a, b in zip(run["params"], ref["params"], strict=True):
            assert torch.equal(a, b), f"rank {rank}: the retried run differs from the uninterrupted one"


@pytest.mark.parametrize("name", GRAD_SPECS)
def test_a_step_that_raised_under_the_scaler_frees_the_gradients_and_pickles(name: str) -> None:
    """After a step that unscaled the gradients under torch.amp.GradScaler's contract and then raised (an out of
    memory, raised on every rank), a caller that frees the gradients in its except block (to retry on a smaller
    batch) frees them, and the optimizer still pickles (``torch.save(opt)``: an emergency save on the error). The
    step's list of the gradients it unscaled, held by the traceback's frames, kept every gradient alive inside the
    except block, and the weak references remembered for the retry made ``pickle.dumps(opt)`` a TypeError."""
    with _scaler_contract(_build(name, tiny_mlp(sizes=SIZES)), True):
        model, opt, scaler = _scaled_run(name, "contract")
        loss = _scaled_backward(name, opt, model, 0, scaler)
        _out_of_memory_once(name, opt)
        alive = -1
        try:
            _scaled_step_only(name, opt, model, 0, scaler, loss)
        except torch.OutOfMemoryError:
            grads = [weakref.ref(p.grad) for p in model.parameters() if p.grad is not None]
            opt.zero_grad(set_to_none=True)
            gc.collect()
            alive = sum(g() is not None for g in grads)
        assert alive == 0, f"{alive} gradient(s) kept alive by the step that raised"
        twin = pickle.loads(pickle.dumps(opt))
        assert twin.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
        # the retry on a new backward (the gradients were freed) trains as a run without the error
        _scaled_step_only(name, opt, model, 0, scaler, _scaled_backward(name, opt, model, 0, scaler))
        ref_model, ref_opt, ref_scaler = _scaled_run(name, "contract")
        _scaled_step_only(name, ref_opt, ref_model, 0, ref_scaler, _scaled_backward(name, ref_opt, ref_model, 0,
                                                                                     ref_scaler))
        for a, b in zip(_params(model), _params(ref_model), strict=True):
            assert torch.equal(a, b), "the retried step differs from the uninterrupted one"


def _w_interrupted_at_a_call(rank: int, world: int, name: str) -> dict[str, Any]:
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model)
    _step(name, opt, model, 0, rank)
    counting = _FailAt()
    _inject(opt, counting)
    _step(name, opt, model, 1, rank)
    _uninject(opt)
    if rank == 0 and counting.calls:  # Ctrl+C on this rank alone, half way (EGN: in its line search's trials)
        _inject(opt, _FailAt(max(1, len(counting.calls) // 2), KeyboardInterrupt))
    elif rank == 0:  # an update of no ATen call (SOAA's C loops)
        _interrupt(opt)
    return _step_then_save(name, opt, model, 2, rank)  # rank 1's collectives fail once rank 0 has gone


@pytest.mark.parametrize("name", SPECS)
def test_a_rank_interrupted_inside_the_step_refuses_to_save_without_a_hang(tmp_path: Path, name: str) -> None:
    """One rank's Ctrl+C inside the update or, for EGN, its line search (a trial forward: its parameters were
    put back, but its peers wait in the trial's all-reduce): the step is not one the ranks share, and a save
    from the interrupted rank (OnExceptionCheckpoint) joined a consolidation that met the peers' collective
    (hung until the group's timeout). It refuses before any collective; the peer raises once that rank is gone."""
    out = run_distributed(_w_interrupted_at_a_call, 2, tmp_path, name, timeout=120)
    assert out[0]["step"] == "KeyboardInterrupt", out[0]
    for call in ("consolidate", "state_dict"):
        assert "interrupted inside its update" in out[0][call] and "on rank 0" in out[0][call], out[0]
    assert out[1]["consolidate"] != "no error", out[1]


# ---------------------------------------------------------------------- 5. non-finite values
def _w_nan_in_unowned_block(rank: int, world: int, name: str) -> dict[str, Any]:
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model)
    _step(name, opt, model, 0, rank)
    params = list(model.parameters())
    owners = {b.param_index: b.owner for b in opt.block_table.blocks}
    victim = next(i for i in range(len(params)) if owners[i] != 0)  # a block rank 0 does not own

    def poison(m: nn.Module) -> None:
        if rank == 0:  # only rank 0 sees it (after averaging), and it does not own that block
            list(m.parameters())[victim].grad.view(-1)[0] = float("nan")

    before = _params(model)
    _step(name, opt, model, 1, rank, mutate=poison)
    after = _params(model)
    return {"skipped": opt.skipped_steps, "unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
            "finite": all(bool(torch.isfinite(p).all()) for p in after)}


@pytest.mark.parametrize("name", GRAD_SPECS)
def test_nan_in_a_block_this_rank_does_not_own_skips_on_every_rank(tmp_path: Path, name: str) -> None:
    for r, out in enumerate(run_distributed(_w_nan_in_unowned_block, 2, tmp_path, name)):
        assert out["skipped"] == 1 and out["unchanged"] and out["finite"], f"rank {r}: {out}"


@pytest.mark.parametrize("name", SPECS)
def test_infinite_lr_is_rejected_and_zero_lr_accepted(name: str) -> None:
    with pytest.raises(ValueError, match=r"Invalid lr=inf\. Must be in \[0\.0, inf\)"):
        _build(name, tiny_mlp(sizes=SIZES), lr=math.inf)
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model, lr=0.0)  # torch accepts lr=0: a frozen run
    before = _params(model)
    for t in range(2):
        _step(name, opt, model, t, 0)
    for a, b in zip(before, _params(model)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("name", SPECS)
def test_a_comm_that_is_not_a_communicator_is_refused(name: str) -> None:
    """``comm="abc"`` (a CLI once offered the option) failed at the first use of it with "'str' object has
    no attribute 'world_size'"."""
    with pytest.raises(ValueError, match=r"Invalid comm='abc'\. Must be a lightning_soaa\.distributed\.comm\.Comm"):
        _build(name, tiny_mlp(sizes=SIZES), comm="abc")


def test_soaa_nan_trust_scalar_at_step_time_skips() -> None:
    model = tiny_mlp(sizes=SIZES)
    opt = _build("SOAA", model)
    _step("SOAA", opt, model, 0, 0)
    opt._d = float("nan")  # e.g. a hand-edited state; loading one is rejected (test_checkpoint_validation)
    before = _params(model)
    _step("SOAA", opt, model, 1, 0)
    assert opt.skipped_steps == 1
    for a, b in zip(before, _params(model)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------- 6. ranks out of step
def _unchanged(before: list[torch.Tensor], model: nn.Module) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, _params(model)))


def _w_loaded_on_one_rank(rank: int, world: int, name: str, form: str) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model)
    for t in range(2):
        _step(name, opt, model, t, rank)
    opt.consolidate_state_dict(to=None)
    # torch's form (get_optimizer_state_dict: our metadata as JSON in the first group) takes another load path
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt) if form == "torch" else opt.state_dict())
    _step(name, opt, model, 2, rank)
    if rank == 0:  # e.g. a resume coded under `if rank == 0:`: rank 0 goes back one step, rank 1 does not
        opt.load_state_dict(saved)
    before = _params(model)
    msg = _error(lambda: _step(name, opt, model, 3, rank))
    unchanged = _unchanged(before, model)
    opt.load_state_dict(saved)  # loaded on every rank: in step again
    return {"msg": msg, "unchanged": unchanged, "after": _error(lambda: _step(name, opt, model, 3, rank))}


@pytest.mark.parametrize("form", ["ours", "torch"])
@pytest.mark.parametrize("name", SPECS)
def test_a_checkpoint_loaded_on_one_rank_raises_on_every_rank(tmp_path: Path, name: str, form: str) -> None:
    """The ranks' step counters ride in the step's agreement rows: optimizers at different steps (a
    load_state_dict on some ranks only) raise on every rank with nothing changed, instead of training
    on with different moments and bias corrections. In torch's form too: a load there that waited for the
    other ranks in a collective (reached one verdict) hung here (reviewer)."""
    for r, out in enumerate(run_distributed(_w_loaded_on_one_rank, 2, tmp_path, name, form, timeout=60)):
        assert "different steps" in out["msg"] and "[2, 3]" in out["msg"], f"rank {r}: {out['msg']}"
        assert out["unchanged"] and out["after"] == "no error", f"rank {r}: {out}"




def _broadcast(model: nn.Module) -> None:
    for p in model.parameters():
        dist.broadcast(p.data, src=0)


def _w_replicas_differ(rank: int, world: int, name: str) -> dict[str, Any]:
    model = tiny_mlp(sizes=SIZES, seed=rank)  # another seed per rank and no broadcast (no DDP)
    opt = _build(name, model, grad_reduction="mean")
    before = _params(model)
    out: dict[str, Any] = {"init": _error(lambda: _step(name, opt, model, 0, rank, average=False))}
    out["unchanged"] = _unchanged(before, model)
    _broadcast(model)  # what the message asks for
    out["broadcast"] = _error(lambda: _step(name, opt, model, 0, rank, average=False))
    opt.consolidate_state_dict(to=None)
    saved = copy.deepcopy(opt.state_dict())
    if rank == 1:  # the weights loaded with the optimizer differ on one rank
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)
    opt.load_state_dict(saved)
    out["loaded"] = _error(lambda: _step(name, opt, model, 1, rank, average=False))
    _broadcast(model)
    out["after"] = _error(lambda: _step(name, opt, model, 1, rank, average=False))
    opt.consolidate_state_dict(to=None)
    saved = copy.deepcopy(opt.state_dict())
    if rank == 0:  # at the same step count: only the check that is due on rank 0 alone tells
        opt.load_state_dict(saved)
    out["same_step"] = _error(lambda: _step(name, opt, model, 2, rank, average=False))
    return out


@pytest.mark.parametrize("name", MEAN_SPECS)
def test_replicas_that_differ_under_mean_raise_on_every_rank(tmp_path: Path, name: str) -> None:
    """grad_reduction="mean" without DDP: nothing broadcasts the initial weights, and replicas that
    differ would end bit-equal as a mix of each owner's blocks. The parameters are compared at the first
    step after construction and after load_state_dict; a difference raises on every rank, unchanged."""
    for r, out in enumerate(run_distributed(_w_replicas_differ, 2, tmp_path, name, timeout=60)):
        for case in ("init", "loaded"):
            assert "parameters on rank(s) [1] differ" in out[case] and "broadcast" in out[case], (r, out)
        assert out["unchanged"], f"rank {r}: parameters changed by a refused step"
        assert out["broadcast"] == "no error" and out["after"] == "no error", (r, out)
        assert "different steps" in out["same_step"] and "rank(s) [1]" in out["same_step"], (r, out)


def _w_replicas_differ_under_ddp(rank: int, world: int, spec: OptimizerSpec) -> dict[str, Any]:
    """grad_reduction="none": DDP broadcasts rank 0's weights when it wraps the model only, and rank 0 alone
    then loads other weights (a resume on rank 0 only) before the first step; EGN (no DDP: it differentiates
    the module) is built from another seed on each rank. The first step, the step again after a broadcast,
    and one more."""
    own = spec.needs is StepNeeds.BATCH
    model = tiny_mlp(sizes=SIZES, seed=rank if own else 0)
    opt = spec.build(model, **spec.test_kwargs)
    net = model if own else nn.parallel.DistributedDataParallel(model)
    if rank == 0 and not own:
        model.load_state_dict(tiny_mlp(sizes=SIZES, seed=5).state_dict())
    before = _params(model)
    out: dict[str, Any] = {"first": _error(lambda: spec.take_step(opt, net, *_replica_batch(0, rank)))}
    out["unchanged"] = _unchanged(before, model)
    _broadcast(model)  # what the message asks for
    for t in range(2):
        spec.take_step(opt, net, *_replica_batch(t, rank))
    out["params"] = _params(model)
    return out


def _replica_batch(t: int, rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch of step ``t``; ``None``: both ranks' together (the one-process reference's)."""
    parts = [batch(t, r, n=4, d_in=SIZES[0], d_out=SIZES[-1]) for r in ((0, 1) if rank is None else (rank,))]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


@each_replica_variant
def test_replicas_that_differ_under_none_raise_on_every_rank(tmp_path: Path, spec: OptimizerSpec) -> None:
    """With grad_reduction="none" the parameters were not compared at the first step, since the gradient
    comparison was taken to catch replicas that differ. It does not where the gradients were averaged: DDP
    averages gradients taken at different weights alike on every rank. A rank-0-only load after the wrap
    became a mix of each owner's blocks (0.09-0.11 off the one-process run in 4 steps, ranks bit-equal), and
    EGN's replicas, built from another seed per rank, stayed apart for good (1.36 after 3 steps), silently
    (with ``shard=False`` too: ``EGN-unsharded``). Now every rank raises at that step, nothing changed; after a
    broadcast they train as one process."""
    model = tiny_mlp(sizes=SIZES, seed=0 if spec.needs is StepNeeds.BATCH else 5)
    opt = spec.build(model, **spec.test_kwargs)
    for t in range(2):
        spec.take_step(opt, model, *_replica_batch(t, None))
    for r, out in enumerate(run_distributed(_w_replicas_differ_under_ddp, 2, tmp_path, spec, timeout=60)):
        assert "parameters on rank(s) [1] differ from rank 0's (first: parameter '0.weight' on rank 1)" in out[
            "first"] and "rank 0 only" in out["first"], (r, out)
        assert out["unchanged"], f"rank {r}: parameters changed by a refused step"
        for a, b in zip(out["params"], model.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)


def _w_changed_on_one_rank(rank: int, world: int, name: str) -> dict[str, Any]:
    model = tiny_mlp(sizes=SIZES)
    spec = get(name)
    # row blocks (elementwise optimizers): reading their state leaves empty entries on their owners only
    rows = {"max_block_numel": 8} if takes_kwarg(spec, "max_block_numel") else {}
    opt = _build(name, model, grad_reduction="mean", **rows)
    lr = opt.param_groups[0]["lr"]
    opt.param_groups[0]["lr"] = float("nan")  # a step refused on every rank: the first step is still to come
    out: dict[str, Any] = {"refused": _error(lambda: _step(name, opt, model, 0, rank, average=False))}
    opt.param_groups[0]["lr"] = lr
    dtype = next(model.parameters()).dtype
    other = torch.float32 if dtype == torch.float64 else torch.float64
    if rank == 0:  # converted alone after construction, before the first step: its table was rebuilt
        model.to(other)
    x, y = batch(0, rank, n=4, d_in=SIZES[0], d_out=SIZES[-1])
    now = next(model.parameters()).dtype
    out["converted"] = _error(lambda: spec.take_step(opt, model, x.to(now), y.to(now)))
    model.to(other)  # every rank converted (as Fabric's setup does): every rank rebuilds, and trains
    out["fixed"] = _error(lambda: spec.take_step(opt, model, x.to(other), y.to(other)))
    dtype = other
    first = next(model.parameters())

    def resize() -> None:  # alone after steps, between backward and step: its gradient no longer fits
        if rank == 0:
            first.data = torch.zeros(first.shape[0] + 1, *first.shape[1:], dtype=dtype)
            first.grad = torch.ones_like(first.data)

    x, y = batch(1, rank, n=4, d_in=SIZES[0], d_out=SIZES[-1])
    out["resized"] = _error(lambda: spec.take_step(opt, model, x.to(dtype), y.to(dtype), on_gradients=resize))
    # after a step, one rank's model makes new Parameters (load_state_dict(assign=True)): the optimizer's
    # get no gradient there, and that rank's zeros are averaged into every block (the others' gradients
    # halved, that rank's model never moving). Counts cannot tell it from a part some rank did not use this
    # step (a task head), which DDP's find_unused_parameters averages the same way: said on every rank, once
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model, grad_reduction="mean", **rows)
    _step(name, opt, model, 0, rank, average=False)
    if rank == 1:
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("lightning_soaa").addHandler(handler)
    try:
        for t in (1, 2):
            _step(name, opt, model, t, rank, average=False)
    finally:
        logging.getLogger("lightning_soaa").removeHandler(handler)
    out["gradless"] = [m for m in said if "had no gradient for any of this optimizer's parameters" in m]
    out["steps"] = opt.num_steps
    return out


@pytest.mark.parametrize("name", MEAN_SPECS)
def test_a_model_changed_on_one_rank_under_mean_raises_on_every_rank(tmp_path: Path, name: str) -> None:
    """grad_reduction="mean" exchanges the gradients before the step's all-reduce: a rank that converted its
    model alone before the first step (its table rebuilt) made exchange buffers of another size (gloo
    aborted the process: "Received data size doesn't match"), and one that resized a parameter alone after
    steps raised torch's size error alone, leaving the others in the exchange. Both raise on every rank.
    After a step refused on every rank, a conversion on every rank rebuilds on every rank (the empty state
    entries a refused step leaves on row blocks' owners kept them from rebuilding: a gloo abort). A rank
    whose model replaced its Parameters after a step (no gradient for any of the optimizer's, its zeros
    averaged in) is named on every rank, once (only that rank said anything before)."""
    res = run_distributed(_w_changed_on_one_rank, 2, tmp_path, name, timeout=120)
    for r, out in enumerate(res):
        assert "Invalid lr=nan" in out["refused"], (r, out)
        assert "parameters of rank(s) [1] differ from rank 0's in shape or dtype" in out["converted"], (r, out)
        assert out["fixed"] == "no error", (r, out)
    assert "is now" in res[0]["resized"] or "changed" in res[0]["resized"], res[0]
    assert "rank(s) [0]" in res[1]["resized"] and "raised" in res[1]["resized"], res[1]
    for r, out in enumerate(res):
        assert out["steps"] == 3 and len(out["gradless"]) == 1 and "rank(s) [1] had" in out["gradless"][0], (r, out)


def _w_round_trip_before_training(rank: int, world: int, name: str) -> dict[str, Any]:
    model = tiny_mlp(sizes=SIZES)
    opt = _build(name, model)
    ref_model = tiny_mlp(sizes=SIZES)
    ref = _build(name, ref_model)
    opt.consolidate_state_dict(to=None)  # the README's recipe before accelerate's prepare(), which
    opt.load_state_dict(opt.state_dict())  # round-trips state_dict() on every rank
    for t in range(2):
        _step(name, opt, model, t, rank)
        _step(name, ref, ref_model, t, rank)
    out: dict[str, Any] = {"equal": all(torch.equal(a, b) for a, b in zip(_params(model), _params(ref_model)))}
    opt.consolidate_state_dict()  # to=0: rank 1 keeps nothing
    out["elsewhere"] = _error(opt.state_dict)
    return out


@pytest.mark.parametrize("name", SPECS)
def test_a_state_round_trip_before_training_and_a_state_consolidated_elsewhere(tmp_path: Path, name: str) -> None:
    """accelerate's prepare() round-trips state_dict() on every rank before training (device placement):
    after consolidate_state_dict(to=None) on every rank, training is bit-equal to no round trip. A state
    consolidated onto another rank says so (the message told a user who had consolidated to do it again)."""
    for r, out in enumerate(run_distributed(_w_round_trip_before_training, 2, tmp_path, name, timeout=120)):
        assert out["equal"], (r, out)
        if r == 1:
            assert "consolidated onto rank 0 only" in out["elsewhere"] and "to=None" in out["elsewhere"], out
        else:
            assert out["elsewhere"] == "no error", out


# ---------------------------------------------------------------------- torch's ZeroRedundancyOptimizer
def _w_zero_resume(rank: int, world: int, name: str, blocked: bool) -> dict[str, Any]:
    """Ours inside torch's ZeroRedundancyOptimizer (shard=False: each rank's optimizer over ZeRO's
    partition), checkpointed through ZeRO: its load writes the saved entries into our state directly.
    ``blocked``: every parameter cut into row blocks (whose nesting is the checkpoint's)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    spec = get(name)
    def make() -> tuple[nn.Module, Any]:
        model = tiny_mlp(sizes=SIZES)
        group = {"params": list(model.parameters()), **({"max_block_numel": 2} if blocked else {})}
        return model, ZeroRedundancyOptimizer([group], optimizer_class=spec.load(),
                                              **{**spec.test_kwargs, "shard": False})

    model, zero = make()
    for t in range(2):
        _step(name, zero, model, t, rank)
    zero.consolidate_state_dict(to=0)
    saved = [zero.state_dict() if rank == 0 else None]
    dist.broadcast_object_list(saved, src=0)
    model2, zero2 = make()
    model2.load_state_dict(model.state_dict())
    zero2.load_state_dict(saved[0])
    before = _params(model2)
    err = _error(lambda: _step(name, zero2, model2, 2, rank))
    return {"error": err, "unchanged": all(torch.equal(a, b) for a, b in zip(_params(model2), before))}


@pytest.mark.parametrize("blocked", [False, True], ids=["", "row-blocks"])
@pytest.mark.parametrize("name", [pytest.param(s.name, id=s.name) for s in REGISTRY
                                  if s.needs is not StepNeeds.BATCH and takes_kwarg(s, "shard")])
def test_state_written_by_zero_redundancy_optimizer_is_refused_on_every_rank(tmp_path: Path, name: str,
                                                                             blocked: bool) -> None:
    """torch's ZeroRedundancyOptimizer keeps only 'state' and 'param_groups' of ours and its load writes
    the saved per-block entries into optimizer.state directly: the step started fresh moments beside them
    with the optimizer-wide state lost (6e-2 to 1.8e-1 off the uninterrupted run; parameters cut into row
    blocks continued their moments with a fresh optimizer's step counts, 4.8e-4 off). Refused at the next
    step on every rank, nothing changed, naming ZeroRedundancyOptimizer and the way that works."""
    spec = get(name)
    if blocked and not (issubclass(spec.load(), ShardedOptimizer) and spec.load().elementwise):
        pytest.skip(f"{name} does not cut parameters into row blocks")
    for r, res in enumerate(run_distributed(_w_zero_resume, 2, tmp_path, name, blocked, timeout=300)):
        assert "ZeroRedundancyOptimizer" in res["error"] and "written into optimizer.state directly" in res["error"], \
            (r, res["error"])
        assert res["unchanged"], r


# ---------------------------------------------------------------------- a process group of some ranks
def _w_partial_group(rank: int, world: int, name: str) -> list[str]:
    """Each rank in its own group (every rank creates every group, as torch requires)."""
    import logging

    groups = [dist.new_group([r]) for r in range(world)]
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logging.getLogger("lightning_soaa.optim.base").addHandler(handler)
    try:
        _build(name, tiny_mlp(sizes=SIZES), process_group=groups[rank])
    finally:
        logging.getLogger("lightning_soaa.optim.base").removeHandler(handler)
    return [m for m in seen if "process_group spans" in m]


@pytest.mark.parametrize("name", SPECS)
def test_a_process_group_of_some_ranks_warns_where_the_step_averages_the_batch(tmp_path: Path, name: str) -> None:
    """process_group= a group of some ranks, the model replicated across groups (DDP over every rank):
    SOAA's loss and EGN's Gram matrix were averaged inside each group only, and the replicas drifted apart
    without a word (SOAA 4e-2, EGN 0.4 between ranks after 6 steps). They warn, saying what is averaged;
    the optimizers that read only the (DDP-averaged) gradients stay exact and quiet."""
    spec = get(name)
    for r, said in enumerate(run_distributed(_w_partial_group, 2, tmp_path, name, timeout=300)):
        if spec.load().batch_statistic is None:
            assert said == [], (r, said)
        else:
            assert len(said) == 1 and "spans 1 of the 2 ranks" in said[0] and "drift apart" in said[0], (r, said)


# ------------------------------------------------- gradients and groups edited by hand (state-edit hunter)
def _mismatched_grad(model: nn.Module, how: str) -> None:
    """The last square-free weight's gradient replaced by hand, as user code can (autograd makes none)."""
    w = [p for p in model.parameters() if p.dim() == 2][-1]
    g = w.grad
    w.grad.data = g.t().contiguous() if how == "transposed" else g.float()  # same numel / another dtype


def _w_mismatched_grad(rank: int, world: int, name: str, how: str) -> dict[str, Any]:
    model = tiny_mlp(sizes=(4, 6, 4))  # a 4 x 6 weight: its transpose has the same number of elements
    opt = _build(name, model)
    _step(name, opt, model, 0, rank)
    before = _params(model)
    msg = _error(lambda: _step(name, opt, model, 1, rank, mutate=lambda m: _mismatched_grad(m, how)))
    unchanged = all(torch.equal(a, b) for a, b in zip(before, _params(model)))
    _step(name, opt, model, 2, rank)  # the optimizer goes on: nothing was half-changed
    return {"msg": msg, "unchanged": unchanged, "steps": opt.num_steps}


@pytest.mark.parametrize("how", ["transposed", "float32"])
@pytest.mark.parametrize("name", GRAD_SPECS)
def test_a_gradient_that_does_not_match_its_parameter_is_refused_on_every_rank(tmp_path: Path, name: str,
                                                                                how: str) -> None:
    """A transposed gradient (the same number of elements) was stepped silently by SOAA and AdamW; a
    float32 one on a float64 parameter failed inside the update after other blocks had moved, on its owner
    only (the peer then waited in the exchange). torch's optimizers raise on both."""
    for out in run_distributed(_w_mismatched_grad, 2, tmp_path, name, how):
        assert "the gradient of parameter '2.weight' has" in out["msg"] and "Nothing changed" in out["msg"], out
        assert out["unchanged"] and out["steps"] == 2, out


def _w_group_count(rank: int, world: int, name: str, edit: str) -> dict[str, Any]:
    model = tiny_mlp(sizes=SIZES)
    spec = get(name)
    named = list(model.named_parameters())
    groups = [{"params": named[:2]}, {"params": named[2:]}]
    opt = spec.load()(groups, **spec.test_kwargs) if spec.first_arg is not FirstArg.MODULE else _build(name, model)
    _step(name, opt, model, 0, rank)
    extra = {"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))]}
    if edit == "replaced":  # DeepSpeed's ZeRO 1/2: one group of its own tensors per call, the others gone
        opt.param_groups = [{**opt.param_groups[-1], **extra}]
    elif edit == "appended" or len(opt.param_groups) == 1:
        opt.param_groups.append(extra)
    else:
        opt.param_groups.pop()
    before = _params(model)
    msg = _error(lambda: _step(name, opt, model, 1, rank))
    return {"msg": msg, "unchanged": all(torch.equal(a, b) for a, b in zip(before, _params(model)))}


@pytest.mark.parametrize("edit", ["deleted", "appended", "replaced"])
@pytest.mark.parametrize("name", SPECS)
def test_a_param_group_deleted_or_appended_by_hand_is_refused_on_every_rank(tmp_path: Path, name: str,
                                                                              edit: str) -> None:
    """``del opt.param_groups[1]`` ended in an IndexError on the ranks that own a block of it while the
    others waited in the step's all-reduce (gloo's timeout; a hang under NCCL); an appended group dict
    was refused as DeepSpeed's replacement of group 0's tensors. DeepSpeed's replacement of several groups
    by one of its own keeps its message (found by a reviewer)."""
    for out in run_distributed(_w_group_count, 2, tmp_path, name, edit):
        said = "no longer the list of tensors" if edit == "replaced" else "param_groups holds"
        assert said in out["msg"] and "add_param_group" in out["msg"], out
        assert out["unchanged"], out


# ---------------------------------------------------------------------- a held error and a skipped step
@pytest.mark.parametrize("name", SPECS)
def test_an_error_held_by_the_step_is_raised_when_the_step_would_also_skip(name: str) -> None:
    """The template holds an error of this rank's own checks until its first collective (so that every rank
    raises together); a step that also has a reason to skip (a non-finite batch: every gradient, or EGN's
    outputs, NaN) must still raise it, with nothing changed, not drop it and count a skip."""
    spec = get(name)
    model = tiny_mlp()
    opt = _build(name, model)
    x, y = batch(0, 0)
    spec.take_step(opt, model, x, y)  # the state exists: a later skip or write would show
    opt._planned_step = lambda: False  # type: ignore[method-assign]  # the template (a plan checks on change only)

    def failing_check(*args: Any, **kwargs: Any) -> None:
        raise TypeError("an injected failure of the step's checks")

    opt._check_step = failing_check  # type: ignore[method-assign]
    before = (copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()], opt.skipped_steps)
    with pytest.raises(TypeError, match="injected failure"):
        spec.take_step(opt, model, torch.full_like(x, math.nan), y)
    assert opt.skipped_steps == before[2], "a skipped step was counted instead of raising"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before[1]))
    assert_identical(opt.state_dict(), before[0])
