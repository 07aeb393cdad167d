"""EGN: a rank whose local work fails after the step's exchanges began makes every rank raise together.

Between EGN's first all-reduce and the end of its step, each rank does local work between collectives:
packing its Gram factors (before the all-gather), the bc×bc solve and Jᵀv (before the reduce-scatter), the
copy of the parameters, J·d for adaptive damping and the line-search trial forwards (before their scalar
all-reduces). A rank raising
there alone (out of memory; a model raising on its own samples) used to leave the others waiting in the
next collective. Each site is made to fail on the last rank only (the failure injected into that
rank's optimizer, as an out-of-memory error would arise): every rank must raise in the same step, the
parameters and the optimizer's state must be as before it, and the run must then go on equal to one
process that never saw the failure.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

import lightning_soaa.distributed.comm as comm_module
import lightning_soaa.distributed.exchange as exchange_module
import lightning_soaa.optim.egn as egn_module
from lightning_soaa.optim.egn import EGN
from tests.harness.distributed import run_distributed
from tests.harness.models import tiny_mlp

DT = torch.float64
KW: dict[str, Any] = {"loss": "mse", "lr": 0.8, "momentum": 0.5, "adaptive_damping": True, "line_search": True}
SITES = ("pack", "solve", "vjp", "w0", "jvp", "trial")


def _batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    sizes = [3 + r for r in range(world)]  # uneven: the packed tables are padded
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(sum(sizes), 6, generator=g, dtype=DT)
    return x, torch.randn(sum(sizes), 3, generator=g, dtype=DT), sizes


def _snapshot(model: torch.nn.Module, opt: EGN) -> dict[str, Any]:
    state = {k: v.clone() for p in model.parameters() for k, v in opt.state.get(p, {}).items()
             if isinstance(v, torch.Tensor)}
    return {"params": [p.detach().clone() for p in model.parameters()], "state": state,
            "damping": opt.damping, "alpha": opt.alpha, "steps": (opt.num_steps, opt.skipped_steps)}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (all(torch.equal(x, y) for x, y in zip(a["params"], b["params"], strict=True))
            and a["state"].keys() == b["state"].keys() and all(torch.equal(a["state"][k], b["state"][k])
                                                               for k in a["state"])
            and (a["damping"], a["alpha"], a["steps"]) == (b["damping"], b["alpha"], b["steps"]))


class _Injected(RuntimeError):
    pass


def _inject(opt: EGN, site: str) -> Any:
    """Make ``site`` raise on this rank; returns the undo."""
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise _Injected(f"injected failure at {site}")

    if site == "pack":
        saved = egn_module.pack_factor_table
        egn_module.pack_factor_table = boom  # type: ignore[assignment]
        return lambda: setattr(egn_module, "pack_factor_table", saved)
    if site == "w0":  # the copy of the parameters before the trials (EGN's only _foreach_mul)
        saved_mul = torch._foreach_mul
        torch._foreach_mul = boom  # type: ignore[assignment]
        return lambda: setattr(torch, "_foreach_mul", saved_mul)
    name = {"solve": "_solve", "vjp": "_vjp", "jvp": "_jvp", "trial": "_outputs"}[site]
    setattr(opt, name, boom)
    plan = opt._step_plan()  # one process training a plain MLP: its trials' forwards are the step plan's
    if site == "trial" and plan is not None:
        plan.trial_outputs = boom  # type: ignore[method-assign]

        def undo_both() -> None:
            delattr(opt, name)
            del plan.trial_outputs
        return undo_both
    return lambda: delattr(opt, name)


def _step(opt: EGN, t: int, rank: int, world: int) -> None:
    x, y, sizes = _batch(t, world)
    lo = sum(sizes[:rank])
    opt.step(inputs=x[lo:lo + sizes[rank]], targets=y[lo:lo + sizes[rank]])


def _worker(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for site in SITES:
        model = tiny_mlp(0, DT)
        opt = EGN(model, **KW)
        _step(opt, 0, rank, world)
        before = _snapshot(model, opt)
        undo = _inject(opt, site) if rank == world - 1 else (lambda: None)
        try:
            _step(opt, 1, rank, world)
            message = None
        except RuntimeError as exc:
            message = f"{type(exc).__name__}: {exc}"
        finally:
            undo()
        unchanged = _same(before, _snapshot(model, opt))
        for t in (1, 2):
            _step(opt, t, rank, world)
        out[site] = {"message": message, "unchanged": unchanged,
                     "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()])}
    return out


def _reference(world: int) -> torch.Tensor:
    model = tiny_mlp(0, DT)
    opt = EGN(model, **KW)
    for t in range(3):
        x, y, _ = _batch(t, world)
        opt.step(inputs=x, targets=y)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("world", [2, 3])
def test_a_local_failure_between_collectives_raises_on_every_rank(world: int, tmp_path) -> None:
    results = run_distributed(_worker, world, tmp_path, timeout=150)
    ref = _reference(world)
    for site in SITES:
        for rank, res in enumerate(results):
            got = res[site]
            assert got["message"] is not None, (site, rank)
            if rank == world - 1:
                assert got["message"] == f"_Injected: injected failure at {site}", got["message"]
            else:
                assert f"rank(s) [{world - 1}] raised an error" in got["message"], (site, got["message"])
                assert "nothing changed" in got["message"], got["message"]
            assert got["unchanged"], (site, rank)
            torch.testing.assert_close(got["params"], ref, rtol=1e-12, atol=1e-14,
                                       msg=lambda m, s=site, r=rank: f"{s}, rank {r}: {m}")


def test_a_failed_trial_restores_the_parameters_in_one_process() -> None:
    """One process: a line-search trial that raises used to leave w + αd in the parameters."""
    model = tiny_mlp(0, DT)
    opt = EGN(model, **KW)
    x, y, _ = _batch(0, 1)
    opt.step(inputs=x, targets=y)
    before = _snapshot(model, opt)
    undo = _inject(opt, "trial")
    with pytest.raises(_Injected):
        opt.step(inputs=x, targets=y)
    undo()
    assert _same(before, _snapshot(model, opt))


def _worker_unreported(rank: int, world: int, site: str) -> dict[str, Any]:
    model = tiny_mlp(0, DT)
    opt = EGN(model, **KW)
    _step(opt, 0, rank, world)
    if rank == 0:  # raised out of the exchange before that rank joins the collective (its buffers are made before
        # the agreement that precedes it: test_a_rank_that_cannot_allocate_an_exchange_buffer_raises_on_every_rank)
        def boom(*args: Any, **kwargs: Any) -> Any:
            raise torch.OutOfMemoryError(f"injected at {site}")

        setattr(opt.exchange, site, boom)
    try:
        _step(opt, 1, rank, world)
        step = "no error"
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        step = type(exc).__name__
    saved = "no error"
    if rank == 0:  # a save on the way out (OnExceptionCheckpoint): its consolidation met the peer's exchange
        try:
            opt.consolidate_state_dict()
        except RuntimeError as exc:
            saved = str(exc)
    return {"step": step, "saved": saved}


@pytest.mark.parametrize("site", ["gather_from_owners", "sum_to_owners"])
def test_a_failure_of_one_rank_outside_the_agreed_work_refuses_its_save(site: str, tmp_path) -> None:
    """A rank that raises alone between the step's collectives where no agreement reports it (the exchanges'
    own buffers) leaves the others waiting in that collective: it is a Ctrl+C of one rank, not a failure of
    every rank, and its save must be refused before any collective (it was taken, and its consolidation met
    the peer's exchange). The peer raises once that rank is gone."""
    out = run_distributed(_worker_unreported, 2, tmp_path, site, timeout=90)
    assert out[0]["step"] == "OutOfMemoryError", out[0]
    assert "interrupted inside its update" in out[0]["saved"], out[0]
    assert out[1]["step"] != "no error", out[1]


def _batch_norm_model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 3)).to(DT)
    model.register_buffer("scale", torch.ones(3, dtype=DT))  # a floating buffer the forward does not read
    return model


def _worker_buffers(rank: int, world: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = _batch_norm_model()
    opt = EGN(model, **KW)
    for t in range(3):
        _step(opt, t, rank, world)
    reference = _snapshot(model, opt)
    torch.manual_seed(0)
    model = _batch_norm_model()
    opt = EGN(model, **KW)
    _step(opt, 0, rank, world)
    before = _snapshot(model, opt)
    model.scale = torch.ones(1, dtype=DT).expand(3)  # one memory location for every entry: no copy_ into it
    try:
        _step(opt, 1, rank, world)
        message = None
    except RuntimeError as exc:
        message = f"{type(exc).__name__}: {exc}"
    unchanged = _same(before, _snapshot(model, opt))
    model.scale = torch.ones(3, dtype=DT)
    for t in (1, 2):
        _step(opt, t, rank, world)
    return {"message": message, "unchanged": unchanged, "exact": _same(reference, _snapshot(model, opt))}


def test_a_rank_that_cannot_take_rank_0s_buffers_raises_on_every_rank(tmp_path) -> None:
    """Every rank but 0 copies rank 0's floating buffers in after their all-reduce; a copy that raised there (a
    buffer that cannot be written in place: an expanded one) left that rank out of the step while rank 0 waited
    in the batch agreement (gloo: an abort, NCCL: a hang). It is held for that agreement: every rank raises,
    nothing changed, and the run goes on as the run without it."""
    results = run_distributed(_worker_buffers, 2, tmp_path, timeout=90)
    assert results[1]["message"] is not None and "single memory location" in results[1]["message"], results[1]
    assert results[0]["message"] is not None and "rank(s) [1] raised an error" in results[0]["message"], results[0]
    assert all(r["unchanged"] and r["exact"] for r in results), results


def _fail_in_buffer_transfer(name: str) -> Any:
    """Make ``torch.<name>`` raise an out of memory where EGN's own code calls it inside the buffer transfer
    (``_take_rank0_buffers``: the transfer's buffer, rank 0's concatenation or the others' zeros), as a full
    device would; every other call passes through. Returns the undo."""
    saved = getattr(torch, name)

    def failing(*args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1)
        if caller.f_code.co_filename == egn_module.__file__:
            frame: Any = caller
            while frame is not None and frame.f_code.co_filename == egn_module.__file__:
                if frame.f_code.co_name == "_take_rank0_buffers":
                    raise torch.OutOfMemoryError(f"injected: torch.{name} of the buffer transfer")
                frame = frame.f_back
        return saved(*args, **kwargs)

    setattr(torch, name, failing)
    return lambda: setattr(torch, name, saved)


def _uneven_buffers(model: torch.nn.Module, rank: int) -> None:
    """Buffers that differ by rank (each rank's own running statistics): the transfer gives every rank rank 0's."""
    with torch.no_grad():
        model[1].running_mean.fill_(0.1 * (rank + 1))
        model[1].running_var.fill_(1.0 + rank)
        model.scale.mul_(2.0 + rank)


def _with_buffers(model: torch.nn.Module, opt: EGN) -> dict[str, Any]:
    return {**_snapshot(model, opt), "buffers": [b.clone() for b in model.buffers()]}


def _same_with_buffers(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return _same(a, b) and all(torch.equal(x, y) for x, y in zip(a["buffers"], b["buffers"], strict=True))


def _worker_transfer(rank: int, world: int, name: str, failing: int) -> dict[str, Any]:
    runs = []
    for fail in (False, True):
        torch.manual_seed(0)
        model = _batch_norm_model()
        opt = EGN(model, **KW)
        _step(opt, 0, rank, world)
        _uneven_buffers(model, rank)
        before = _with_buffers(model, opt)
        message = unchanged = None
        if fail:
            undo = _fail_in_buffer_transfer(name) if rank == failing else (lambda: None)
            try:
                _step(opt, 1, rank, world)
            except RuntimeError as exc:  # torch.OutOfMemoryError is one
                message = f"{type(exc).__name__}: {exc}"
            finally:
                undo()
            unchanged = _same_with_buffers(before, _with_buffers(model, opt))
        for t in (1, 2):
            _step(opt, t, rank, world)
        runs.append({"message": message, "unchanged": unchanged, "after": _with_buffers(model, opt)})
    return {"message": runs[1]["message"], "unchanged": runs[1]["unchanged"],
            "exact": _same_with_buffers(runs[0]["after"], runs[1]["after"])}


@pytest.mark.parametrize(("name", "failing"), [("cat", 0), ("zeros", 1)])
def test_a_rank_that_cannot_allocate_the_buffer_transfer_raises_on_every_rank(name: str, failing: int,
                                                                              tmp_path) -> None:
    """The buffer transfer's float64 buffer (rank 0's concatenated buffers, the others' zeros) was made after the
    layout agreement: a rank out of memory there raised alone while the others waited in the transfer's
    all-reduce (gloo: an abort once it exited, NCCL: a hang). It is made before, and its failure rides that
    agreement's error flag: every rank raises an out of memory in the same step, nothing changed (buffers
    included), and the retried step equals the run that never failed."""
    results = run_distributed(_worker_transfer, 2, tmp_path, name, failing, timeout=90)
    own = results[failing]["message"]
    assert own == f"OutOfMemoryError: injected: torch.{name} of the buffer transfer", results[failing]
    peer = results[1 - failing]["message"]
    assert peer is not None and peer.startswith("OutOfMemoryError") and f"rank(s) [{failing}]" in peer, peer
    assert all(r["unchanged"] and r["exact"] for r in results), results


#: the allocations of each exchange's own buffers, by the functions of EGN, the communicator or the exchange that
#: make them (before or after the fix): the factors' all-gather (its send buffer and output, reserved before the
#: batch agreement; "all_gather_padded": made after it, where a rank's reservation is short), the reduce-scatter of
#: Jᵀv to the owners (sharded; an all-reduce unsharded) and the gather of the direction from the owners
_EXCHANGE_BUFFERS = {"all_gather": ("_gather_factors", "_reserve_gather"),
                     "all_gather_padded": ("_gather_factors", "_gather_buffers"),
                     "reduce_scatter": ("sum_to_owners", "sum_buffers"),
                     "gather": ("gather_from_owners", "gather_buffers")}


def _fail_exchange_buffers(site: str) -> Any:
    """Make ``torch.zeros``, ``torch.empty`` and ``torch.zeros_like`` raise an out of memory where EGN, the
    communicator or the exchange call them for ``site``'s buffers (:data:`_EXCHANGE_BUFFERS`), as a full device
    would; every other call passes through. Returns the undo."""
    files = {egn_module.__file__, comm_module.__file__, exchange_module.__file__}
    names = ("zeros", "empty", "zeros_like")
    saved = {name: getattr(torch, name) for name in names}

    def make(name: str) -> Any:
        def failing(*args: Any, **kwargs: Any) -> Any:
            frame: Any = sys._getframe(1)
            if frame.f_code.co_filename in files:
                while frame is not None:
                    if frame.f_code.co_name in _EXCHANGE_BUFFERS[site]:
                        raise torch.OutOfMemoryError(f"injected: torch.{name} of the {site} buffers")
                    frame = frame.f_back
            return saved[name](*args, **kwargs)
        return failing

    for name in names:
        setattr(torch, name, make(name))
    return lambda: [setattr(torch, name, fn) for name, fn in saved.items()]


def _worker_exchange(rank: int, world: int, site: str, failing: int, at: int, shard: bool) -> dict[str, Any]:
    runs = []
    for fail in (False, True):
        model = tiny_mlp(0, DT)
        opt = EGN(model, shard=shard, **KW)
        for t in range(at):
            _step(opt, t, rank, world)
        before = _snapshot(model, opt)
        message = unchanged = None
        if fail:
            undo = _fail_exchange_buffers(site) if rank == failing else (lambda: None)
            try:
                _step(opt, at, rank, world)
            except RuntimeError as exc:  # torch.OutOfMemoryError is one
                message = f"{type(exc).__name__}: {exc}"
            finally:
                undo()
            unchanged = _same(before, _snapshot(model, opt))
        for t in range(at, 3):
            _step(opt, t, rank, world)
        runs.append({"message": message, "unchanged": unchanged, "after": _snapshot(model, opt)})
    return {"message": runs[1]["message"], "unchanged": runs[1]["unchanged"],
            "exact": _same(runs[0]["after"], runs[1]["after"])}


@pytest.mark.parametrize(("site", "failing", "at", "shard"), [
    ("all_gather", 1, 1, True), ("all_gather_padded", 0, 0, True), ("reduce_scatter", 1, 1, True),
    ("reduce_scatter", 1, 1, False), ("gather", 1, 1, True)])
def test_a_rank_that_cannot_allocate_an_exchange_buffer_raises_on_every_rank(site: str, failing: int, at: int,
                                                                             shard: bool, tmp_path) -> None:
    """The exchanges' own buffers (the factors' all-gather: its send buffer and output; Jᵀv's reduce-scatter, or
    all-reduce unsharded; the direction's gather from its owners) were made inside the move, after the agreement
    that precedes it: a rank out of memory there raised alone while the others waited in the collective (gloo: an
    abort once it exited, NCCL: a hang). They are made before that agreement, whose error flag carries the failure
    (the all-gather's, padded to the largest batch: where a rank's is short, at the first step of uneven batches,
    by one all-reduce of flags): every rank raises an out of memory in the same step, nothing changed, and the
    retried step equals the run that never failed."""
    results = run_distributed(_worker_exchange, 2, tmp_path, site, failing, at, shard, timeout=90)
    own = results[failing]["message"]
    assert own is not None and own.startswith("OutOfMemoryError: injected: ") and site in own, results[failing]
    peer = results[1 - failing]["message"]
    assert peer is not None and peer.startswith("OutOfMemoryError") and f"rank(s) [{failing}]" in peer, peer
    assert all(r["unchanged"] and r["exact"] for r in results), results
