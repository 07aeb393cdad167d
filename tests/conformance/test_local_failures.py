"""A failure in one rank's own work before the step's all-reduce raises on every rank, together.

Between the start of ``step()`` and the step record's all-reduce each rank also works alone: the checks, the
gradient scaler's unscaling, the update's would-be moments, the block views, the gradient scan and its host
copy, the non-finite and overflow checks, the agreement row (hyperparameter and parameter digests); EGN's
forward capture, its batch agreement's values and its solve; an optimizer built before the process group
prepares its join and checks the group's construction digests. An exception there (an out of memory, a
model or a value that raises on one rank's data) must ride the next collective, so that every rank raises in
the same step instead of the others waiting in it (a hang under NCCL; gloo aborts or times out).

Each ATen call of that own work (found by a counting run; collectives and their own buffers excluded: a
communicator's or the exchange's methods, and the ``torch.tensor`` of a collective's host values) is made to
raise on the failing ranks, one call at a time, on real gloo ranks:

* W = 2, an out of memory on rank 1: every rank raises a ``torch.OutOfMemoryError`` (a caller retrying on
  it must retry on every rank);
* W = 2, a ValueError on rank 1: every rank raises a ValueError, the others' naming rank 1;
* W = 3, an out of memory on rank 1 and a ValueError on rank 2 in the same step: every rank raises a
  ``RuntimeError`` naming both ranks and both errors (no rank an out of memory, which a caller would retry
  alone).

In every case the parameters and the optimizer state are bit for bit as before the step on every rank, and
the step taken again (a new backward) continues exactly as the run that never failed. An injected error
that the step handles itself (a fallback) must leave every rank stepping as that run does.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_soaa.distributed import comm, exchange
from lightning_soaa.registry import OptimizerSpec, StepNeeds, get
from tests.conformance._battery import SPECS, assert_identical, data, make, step, takes_kwarg
from tests.harness.distributed import run_distributed

#: (optimizer, variant) pairs: "none" (the loop averages the gradients, as DDP does), "mean" (the optimizer
#: averages them into their owners) and "join" (built before the process group: the failing step joins it)
VARIANTS = [pytest.param(s.name, v, id=f"{s.name}-{v}") for s in SPECS
            for v in ("none", "mean", "join") if v != "mean" or takes_kwarg(s, "grad_reduction")]
#: the failures by world size: rank -> the exception class it raises at the injected call
CASES: dict[int, dict[str, dict[int, type[Exception]]]] = {
    2: {"oom": {1: torch.OutOfMemoryError}, "value": {1: ValueError}},
    3: {"mixed": {1: torch.OutOfMemoryError, 2: ValueError}},
}
#: what every rank must raise in each case
EXPECTED = {"oom": torch.OutOfMemoryError, "value": ValueError, "mixed": RuntimeError}
AT = 1  # the step that fails (after one taken), except under "join": the first, which joins the group


class _Calls(TorchDispatchMode):
    """Record the ATen calls made under it (torch's profiler markers left out) and raise ``kind`` at the
    ``at``-th (1 = the first; 0: never). Counting (``at`` = 0), it also records the calls that allocated a
    collective's own buffer (a tensor whose memory a ``c10d`` op then reads or writes)."""

    def __init__(self, at: int = 0, kind: type[Exception] = RuntimeError) -> None:
        super().__init__()
        self.at, self.kind, self.calls = at, kind, []
        self.made: dict[int, int] = {}  # a new tensor's memory address -> the call that made it
        self.buffers: set[int] = set()
        self.uses: dict[int, str] = {}  # a call in buffers -> the first c10d op that read or wrote its tensor

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        if not name.startswith("profiler."):
            self.calls.append(name)
            if len(self.calls) == self.at:
                raise self.kind(f"injected at {name} (call {self.at} of the step)")
        out = func(*args, **(kwargs or {}))
        if not self.at and not name.startswith("profiler."):
            tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if name.startswith("c10d."):
                made = {self.made[a] for t in tensors if (a := t.untyped_storage().data_ptr()) in self.made}
                self.buffers |= made
                for i in made:
                    self.uses.setdefault(i, name)
            elif isinstance(out, torch.Tensor) and not any(t.untyped_storage().data_ptr() ==
                                                           out.untyped_storage().data_ptr() for t in tensors):
                self.made[out.untyped_storage().data_ptr()] = len(self.calls) - 1
        return out


def _under(opt: Any, mode: _Calls) -> None:
    inner = opt.step

    def run(*args: Any, **kwargs: Any) -> Any:
        with mode:
            return inner(*args, **kwargs)
    opt.step = run


#: the calls of ``torch.tensor(host values)``
_MAKING_A_TENSOR = ("aten.lift_fresh.default", "aten.detach_.default", "aten.detach.default",
                    "aten.resolve_conj.default", "aten.resolve_neg.default")
#: the calls that read a collective's result on the host (no allocation: they cannot run out of memory)
_READING_A_RESULT = ("aten.view.default", "aten.select.int", "aten.resolve_conj.default", "aten.resolve_neg.default")
#: the methods of the communicators and the exchange that run a collective (their names begin so)
_COLLECTIVES = ("all_", "reduce_", "gather_", "sum_to_", "broadcast")


def _own_calls(opt: Any, take: Callable[[], None]) -> list[int]:
    """The ATen calls of ``take()`` (one step of ``opt``; 1 = the first) that are this rank's own work before
    the step record's all-reduce: not a collective (a ``c10d`` op) nor part of one: what a communicator's or
    the exchange's method makes (packing the gradients), the allocation of a buffer a ``c10d`` op reads or
    writes, the ``torch.tensor`` of its host values made just before it and the host copy of its result. A
    rank that cannot make those cannot join the collective at all (an out of memory there is a rank lost, as
    in the collective itself)."""
    counting = _Calls()
    spans: list[tuple[int, int]] = []  # each collective method's calls, [start, end)
    record: list[int] = []  # where the step record's all-reduce starts
    inside = [False]
    patched = []
    for cls in (comm.LocalComm, comm.TorchComm, comm.DeferredComm, exchange.OwnerExchange):
        for name, method in list(vars(cls).items()):
            if name.startswith(_COLLECTIVES) and callable(method):
                def run(this: Any, *args: Any, _method: Any = method, **kwargs: Any) -> Any:
                    start = len(counting.calls)
                    if inside[0] and not record:
                        record.append(start)
                    try:
                        return _method(this, *args, **kwargs)
                    finally:
                        spans.append((start, len(counting.calls)))
                setattr(cls, name, run)
                patched.append((cls, name, method))
    reduce_record = opt._reduce_record

    def in_record(*args: Any, **kwargs: Any) -> Any:
        inside[0] = True
        try:
            return reduce_record(*args, **kwargs)
        finally:
            inside[0] = False
    opt._reduce_record = in_record
    _under(opt, counting)
    try:
        take()
    finally:
        del opt.step, opt._reduce_record
        for cls, name, method in patched:
            setattr(cls, name, method)
    calls = counting.calls
    own = [not c.startswith("c10d.") and i not in counting.buffers for i, c in enumerate(calls)]
    for a, b in spans:
        own[a:b] = [False] * (b - a)
    collectives = [i for i, c in enumerate(calls) if c.startswith("c10d.")]
    for start in {a for a, _ in spans} | set(collectives):
        i = start - 1  # the torch.tensor of the collective's host values, made just before it
        while i >= 0 and calls[i] in _MAKING_A_TENSOR:
            own[i], i = False, i - 1
    for end in {b for _, b in spans} | {c + 1 for c in collectives}:
        i = end  # the host copy of its result (views of it, and tolist's)
        while i < len(calls) and calls[i] in _READING_A_RESULT:
            own[i], i = False, i + 1
    return [i + 1 for i in range(record[0] if record else len(calls)) if own[i]]


def _sampled(calls: list[int]) -> list[int]:
    """``calls`` (increasing), in runs of consecutive calls (a window between collectives): each run's first
    and last three and every sixth between them (EGN's solve makes a hundred; the test stays within its
    time)."""
    runs: list[list[int]] = []
    for c in calls:
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return [c for run in runs for i, c in enumerate(run) if i < 3 or i >= len(run) - 3 or i % 6 == 0]


def _fresh(spec: OptimizerSpec, variant: str, rank: int, world: int, store: str) -> tuple[Any, Any]:
    kw = {"grad_reduction": "mean"} if variant == "mean" else {}
    if variant != "join":
        return make(spec, **kw)
    dist.barrier()  # built as one process, then the group appears: the first step joins it
    dist.destroy_process_group()
    model, opt = make(spec, **kw)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    return model, opt


def _no_state(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_no_state(v) for v in value.values())
    if isinstance(value, torch.Tensor):
        return not bool(value.count_nonzero())
    return isinstance(value, (int, float)) and value == 0


def _filled(state: Any) -> Any:
    """A state dict without its entries that hold no state: the per-block dicts a step's views make and the
    state of zeros made lazily before a first step's update (zero state is no state: torch's
    ``optimizer.state`` is a defaultdict, and its optimizers make their state the same way)."""
    if not isinstance(state, dict) or _no_state(state):
        return {} if isinstance(state, dict) else state
    return {k: _filled(v) for k, v in state.items() if not (isinstance(v, dict) and _no_state(v))}


def _snapshot(model: Any, opt: Any) -> dict[str, Any]:
    state = [_filled(copy.deepcopy(dict(opt.state.get(p, {})))) for p in model.parameters()]
    return {"params": [p.detach().clone() for p in model.parameters()], "state": state,
            "global": copy.deepcopy(opt._global_state()), "steps": [opt.num_steps, opt.skipped_steps]}


def _steps(spec: OptimizerSpec, model: Any, opt: Any, ts: range, rank: int, world: int, variant: str) -> None:
    average = spec.needs is not StepNeeds.BATCH and variant != "mean"
    for t in ts:
        step(spec, model, opt, t, rank=rank, world=world, average=average)


def _w_fail(rank: int, world: int, name: str, variant: str, store: str) -> dict[str, list[dict[str, Any]]]:
    spec = get(name)
    n = 0  # one store per process group the "join" variant makes
    at = 0 if variant == "join" else AT
    model, opt = _fresh(spec, variant, rank, world, f"{store}.{n}")
    _steps(spec, model, opt, range(at + 2), rank, world, variant)
    reference = _snapshot(model, opt)
    model, opt = _fresh(spec, variant, rank, world, f"{store}.{n + 1}")
    n += 2
    _steps(spec, model, opt, range(at), rank, world, variant)
    mine = _sampled(_own_calls(opt, lambda: _steps(spec, model, opt, range(at, at + 1), rank, world, variant)))
    own: list[list[int]] = [[] for _ in range(world)]
    dist.all_gather_object(own, mine)
    out: dict[str, list[dict[str, Any]]] = {}
    for case, failing in CASES[world].items():
        rows = out[case] = []
        for k in range(max(len(own[r]) for r in failing)):  # each failing rank's k-th own call (or its last)
            model, opt = _fresh(spec, variant, rank, world, f"{store}.{n}")
            n += 1
            _steps(spec, model, opt, range(at), rank, world, variant)
            before = _snapshot(model, opt)
            mode = _Calls(mine[min(k, len(mine) - 1)], failing[rank]) if rank in failing and mine else _Calls()
            _under(opt, mode)
            raised, message = None, "no error"
            try:
                _steps(spec, model, opt, range(at, at + 1), rank, world, variant)
            except Exception as e:  # noqa: BLE001 - the parent checks what each rank raised
                raised, message = type(e), f"{type(e).__name__}: {e}"
            del opt.step
            row = {"k": k, "call": mode.calls[mode.at - 1] if 0 < mode.at <= len(mode.calls) else "",
                   "raised": raised, "message": message}
            if raised is not None:
                row["unchanged"] = _verdict(model, opt, before, "after the failed step")
                _steps(spec, model, opt, range(at, at + 1), rank, world, variant)  # the retry: a new backward
            _steps(spec, model, opt, range(at + 1, at + 2), rank, world, variant)
            row["exact"] = _verdict(model, opt, reference, "the retried run")
            rows.append(row)
    return out


def _verdict(model: Any, opt: Any, expected: Any, what: str) -> str:
    """"yes" where the model and optimizer are bit for bit ``expected`` (a :func:`_snapshot`), else how not."""
    try:
        assert_identical(_snapshot(model, opt), expected, what)
    except AssertionError as e:
        return str(e)
    return "yes"


def _check(results: list[dict[str, list[dict[str, Any]]]], world: int) -> None:
    for case, failing in CASES[world].items():
        expected = EXPECTED[case]
        assert results[0][case], f"{case}: the sweep found no call of the failing ranks' own work to fail"
        for i, row in enumerate(results[0][case]):
            got = [res[case][i] for res in results]
            where = f"{case}, call {row['k']} ({[g['call'] for g in got if g['call']]})"
            said = {r: g["message"] for r, g in enumerate(got)}
            if all(g["raised"] is None for g in got):  # handled by the step itself: it went on as the run
                assert all(g["exact"] == "yes" for g in got), (where, [g["exact"] for g in got])
                continue
            assert all(g["raised"] is not None for g in got), f"{where}: raised on some ranks only: {said}"
            for r, g in enumerate(got):
                raised = g["raised"]
                if expected is RuntimeError:  # exactly: no rank's may be an out of memory (caught alone)
                    assert raised is RuntimeError, (where, r, said)
                else:
                    assert issubclass(raised, expected), (where, r, said)
                if r not in failing:
                    assert f"rank(s) {sorted(failing)}" in g["message"], (where, r, said)
                if expected is RuntimeError:
                    assert all(c.__name__ in g["message"] for c in failing.values()), (where, r, said)
                assert g["unchanged"] == "yes", (where, r, g["unchanged"])
                assert g["exact"] == "yes", (where, r, g["exact"])


@pytest.mark.parametrize(("name", "variant"), VARIANTS)
@pytest.mark.parametrize("world", sorted(CASES))
def test_a_failure_of_one_ranks_own_work_raises_on_every_rank(tmp_path: Path, name: str, variant: str,
                                                                    world: int) -> None:
    """Every ATen call of the failing ranks' own work before the step's all-reduce, one at a time (see the
    module's docstring)."""
    if world == 3 and variant == "join":
        pytest.skip("the join's path is covered at W = 2")
    results = run_distributed(_w_fail, world, tmp_path, name, variant, str(tmp_path / "store"), timeout=90)
    _check(results, world)


# ---------------------------------------------------------------- EGN: a late failure in a step that skips
#: EGN's local work after its factor all-gather, made to raise on the failing ranks: the global factor
#: table's stacking (the rank then has no system to solve) and the solve itself
_LATE_WORK = ("stacking", "solve")
#: the failing ranks by world size (rank -> its exception) and what every rank must raise
_DOUBLE = {2: ({1: torch.OutOfMemoryError}, torch.OutOfMemoryError),
           3: ({1: torch.OutOfMemoryError, 2: ValueError}, RuntimeError)}


def _egn_steps(model: Any, opt: Any, ts: range, rank: int, world: int, unsolvable: int) -> None:
    """The battery's steps of EGN; at step ``unsolvable`` rank 0 holds an infinite input (its tanh outputs
    stay finite, the Gram matrix K does not): the system cannot be solved on any rank, a counted skip."""
    spec = get("EGN")
    for t in ts:
        x, y = data(t, rank=rank, world=world)
        if t == unsolvable and rank == 0:
            x = x.clone()
            x[0, 0] = float("inf")
        spec.take_step(opt, model, x, y)


def _late_failure(opt: Any, where: str, kind: type[Exception]) -> Callable[[], None]:
    """Make ``where`` raise ``kind`` on this rank (once); returns what undoes it."""
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise kind(f"injected in EGN's {where}")
    if where == "solve":
        opt._solve = fail
        return lambda: vars(opt).pop("_solve")
    import lightning_soaa.optim.egn as egn_module
    split = egn_module.split_factor_table
    egn_module.split_factor_table = fail  # type: ignore[assignment]
    return lambda: setattr(egn_module, "split_factor_table", split)


@contextlib.contextmanager
def _warnings(logger: str) -> Iterator[list[str]]:
    """The messages ``logger`` warns with inside."""
    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger(logger)
    log.addHandler(handler)
    try:
        yield said
    finally:
        log.removeHandler(handler)


def _w_late_failure_and_skip(rank: int, world: int, store: str) -> list[dict[str, Any]]:
    failing, _ = _DOUBLE[world]
    out = []
    for where, momentum in ((w, m) for w in _LATE_WORK for m in (0.0, 0.5)):
        kw = {"momentum": momentum}
        model, opt = make(get("EGN"), **kw)
        _egn_steps(model, opt, range(3), rank, world, unsolvable=1)  # step 1 skipped
        reference = _snapshot(model, opt)
        model, opt = make(get("EGN"), **kw)
        _egn_steps(model, opt, range(1), rank, world, unsolvable=1)
        before = _snapshot(model, opt)
        undo = _late_failure(opt, where, failing[rank]) if rank in failing else (lambda: None)
        row: dict[str, Any] = {"case": f"{where}, momentum={momentum}", "raised": None, "message": "no error"}
        try:
            _egn_steps(model, opt, range(1, 2), rank, world, unsolvable=1)
        except Exception as e:  # noqa: BLE001 - the parent checks what each rank raised
            row["raised"], row["message"] = type(e), f"{type(e).__name__}: {e}"
        finally:
            undo()
        row["unchanged"] = _verdict(model, opt, before, "after the failed step")
        with _warnings("lightning_soaa.optim.base") as said:
            _egn_steps(model, opt, range(1, 2), rank, world, unsolvable=1)  # the retry: skipped, for its reason
        row["skip"] = said
        _egn_steps(model, opt, range(2, 3), rank, world, unsolvable=1)
        row["exact"] = _verdict(model, opt, reference, "the retried run")
        out.append(row)
        dist.barrier()
    return out


@pytest.mark.parametrize("world", sorted(_DOUBLE))
def test_egn_late_failure_in_a_step_that_cannot_be_solved_raises_on_every_rank(tmp_path: Path, world: int) -> None:
    """A double fault (found by a reviewer): the failing ranks' work after the factor all-gather raises (their
    stacking of the global table, or their solve) while the others find the system unsolvable (a skip). The
    skipping ranks left the step while the failing ones waited in the Jᵀv reduce-scatter (gloo: a timeout, NCCL:
    a hang). The error must win on every rank: one class everywhere, nothing changed, and the retry (a skip,
    then a step) the run without the failure, bit for bit."""
    failing, expected = _DOUBLE[world]
    results = run_distributed(_w_late_failure_and_skip, world, tmp_path, str(tmp_path / "store"), timeout=90)
    for i, row in enumerate(results[0]):
        got = [res[i] for res in results]
        said = {r: g["message"] for r, g in enumerate(got)}
        for r, g in enumerate(got):
            assert g["raised"] is not None, (row["case"], r, said)
            if expected is RuntimeError:  # exactly: no rank's may be an out of memory (caught alone)
                assert g["raised"] is RuntimeError, (row["case"], r, said)
                assert all(c.__name__ in g["message"] for c in failing.values()), (row["case"], r, said)
            else:
                assert issubclass(g["raised"], expected), (row["case"], r, said)
            if r not in failing:
                assert f"rank(s) {sorted(failing)}" in g["message"], (row["case"], r, said)
            assert g["unchanged"] == "yes", (row["case"], r, g["unchanged"])
            assert g["exact"] == "yes", (row["case"], r, g["exact"])
            assert any("could not be solved" in m for m in g["skip"]), (row["case"], r, g["skip"])
