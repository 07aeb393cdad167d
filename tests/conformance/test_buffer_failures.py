"""A rank that cannot make a collective's own buffer raises on every rank, together.

A collective's buffers (what the step's communicator or exchange packs into and receives in, and the float64
vector of an all-reduce of scalars) made between the agreement before it (the step record's all-reduce,
whose error flag every rank reads) and the collective itself: a rank out of memory there raised alone while
the others waited in the collective (gloo: an abort or a timeout, NCCL: a hang). The parameter gather after
the update was one (its packed send buffer and its output), and the scalar all-reduce's copy of its values. So
was a failure of the gradient exchange's work after its collective (``grad_reduction="mean"``: writing the
averages into ``p.grad``), raised while the others went on to the step's all-reduce.

Each allocation of such a buffer in a step (found by a counting run: an ATen call whose new tensor a ``c10d``
op then reads or writes), and the first and last calls of the exchange's work after its collective, is made to
raise an out of memory on rank 1, one at a time, on real gloo ranks (W = 2 and 3): every rank raises a
``torch.OutOfMemoryError`` naming rank 1, the parameters and the optimizer state are bit for bit as before the
step, and the step taken again (a new backward) continues exactly as the run that never failed.

The buffers of the first collective of a step under ``grad_reduction="mean"`` (the gradients' reduce-scatter)
are made before the order check where it runs (the first step, or more than one optimizer built over the group,
as here: every rank builds several) and ride its error flag. Without it (one optimizer, after its first step)
no agreement of the step comes before them: left (``OwnerExchange.reduce_scatter_grads``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_soaa.distributed import comm, exchange
from lightning_soaa.registry import get
from tests.conformance._battery import SPECS, takes_kwarg
from tests.conformance.test_local_failures import AT, _Calls, _fresh, _snapshot, _steps, _under, _verdict
from tests.harness.distributed import run_distributed

#: (optimizer, variant): the template's own parameter gather and record (EGN gathers its direction itself:
#: tests/distributed/test_egn_local_failures.py)
VARIANTS = [pytest.param(s.name, v, id=f"{s.name}-{v}") for s in SPECS if s.name != "EGN"
            for v in ("none", "mean") if v != "mean" or takes_kwarg(s, "grad_reduction")]
FAILING = 1


def _targets(opt: Any, take: Any) -> dict[int, str]:
    """The ATen calls of ``take()`` (one step; 1 = the first) to fail: those that made a collective's buffer
    (with that op), and the first and last two of the gradient exchange's work after its collective."""
    counting = _Calls()
    spans: dict[str, list[tuple[int, int]]] = {"grads": [], "collective": []}
    methods = {"grads": (exchange.OwnerExchange, "reduce_scatter_grads"),
               "collective": (comm.TorchComm, "reduce_scatter_flat")}

    def spanned(key: str, method: Any) -> Any:
        def run(this: Any, *args: Any, **kwargs: Any) -> Any:
            start = len(counting.calls)
            try:
                return method(this, *args, **kwargs)
            finally:
                spans[key].append((start, len(counting.calls)))
        return run
    saved = {key: vars(cls)[name] for key, (cls, name) in methods.items()}
    for key, (cls, name) in methods.items():
        setattr(cls, name, spanned(key, saved[key]))
    _under(opt, counting)
    try:
        take()
    finally:
        del opt.step
        for key, (cls, name) in methods.items():
            setattr(cls, name, saved[key])
    out = {i + 1: op for i, op in sorted(counting.uses.items())}
    for a, b in spans["grads"]:
        ends = [e for s, e in spans["collective"] if a <= s < b]
        work = list(range(ends[-1], b)) if ends else []
        out.update({i + 1: "the averages' writing" for i in work[:2] + work[-2:]})
    return out


def _w_buffers(rank: int, world: int, name: str, variant: str, store: str) -> list[dict[str, Any]]:
    spec = get(name)
    model, opt = _fresh(spec, variant, rank, world, f"{store}.0")
    _steps(spec, model, opt, range(AT + 2), rank, world, variant)
    reference = _snapshot(model, opt)
    model, opt = _fresh(spec, variant, rank, world, f"{store}.1")
    _steps(spec, model, opt, range(AT), rank, world, variant)
    calls = sorted(_targets(opt, lambda: _steps(spec, model, opt, range(AT, AT + 1), rank, world, variant)).items())
    failing: list[Any] = [None] * world
    dist.all_gather_object(failing, calls)  # every rank steps as often as the failing rank has targets
    rows = []
    for k in range(len(failing[FAILING])):
        at, op = failing[FAILING][k]
        model, opt = _fresh(spec, variant, rank, world, f"{store}.{k + 2}")
        _steps(spec, model, opt, range(AT), rank, world, variant)
        before = _snapshot(model, opt)
        mode = _Calls(at, torch.OutOfMemoryError) if rank == FAILING else _Calls()
        _under(opt, mode)
        row: dict[str, Any] = {"raised": None, "message": "no error"}
        try:
            _steps(spec, model, opt, range(AT, AT + 1), rank, world, variant)
        except Exception as e:  # noqa: BLE001 - the parent checks what each rank raised
            row["raised"], row["message"] = type(e), f"{type(e).__name__}: {e}"
        del opt.step
        row["call"] = f"{mode.calls[at - 1] if at <= len(mode.calls) else '?'} for {op}"
        row["unchanged"] = _verdict(model, opt, before, "after the failed step")
        _steps(spec, model, opt, range(AT, AT + 2), rank, world, variant)  # the retry: a new backward
        row["exact"] = _verdict(model, opt, reference, "the retried run")
        rows.append(row)
    return rows


@pytest.mark.parametrize(("name", "variant"), VARIANTS)
@pytest.mark.parametrize("world", [2, 3])
def test_a_rank_that_cannot_make_a_collective_buffer_raises_on_every_rank(tmp_path: Path, name: str, variant: str,
                                                                          world: int) -> None:
    """Every allocation of a collective's buffer in a step, one at a time, on rank 1 (module docstring)."""
    results = run_distributed(_w_buffers, world, tmp_path, name, variant, str(tmp_path / "store"), timeout=120)
    assert results[FAILING], "the counting run found no collective buffer of the step"
    for i, row in enumerate(results[FAILING]):
        got = [res[i] for res in results]
        said = {r: g["message"] for r, g in enumerate(got)}
        where = row["call"]
        assert got[FAILING]["message"].startswith("OutOfMemoryError: injected"), (where, said)
        for r, g in enumerate(got):
            assert g["raised"] is not None and issubclass(g["raised"], torch.OutOfMemoryError), (where, r, said)
            if r != FAILING:
                assert f"rank(s) [{FAILING}]" in g["message"], (where, r, said)
            assert g["unchanged"] == "yes", (where, r, g["unchanged"])
            assert g["exact"] == "yes", (where, r, g["exact"])


def _w_no_exchange(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 cannot make the gradient exchange's buffers (``grad_reduction="mean"``, the order check meets: two
    optimizers over the group): no rank exchanges, every rank raises; what each rank's note says of ``p.grad``."""
    from lightning_soaa import ShardedAdamW

    def run(fail: bool) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(6, 4, generator=g)) for _ in range(3)]
        opt = ShardedAdamW(params, lr=0.1, grad_reduction="mean")
        ShardedAdamW([torch.nn.Parameter(torch.zeros(2))], grad_reduction="mean")  # (so that the check meets)
        for t in range(3):
            for p in params:
                p.grad = torch.full_like(p, float(rank + t + 1))
            if t == 2 and fail and rank == FAILING:
                def failing() -> Any:
                    raise torch.OutOfMemoryError("injected in grad_buffers")
                opt.exchange.grad_buffers = failing  # type: ignore[method-assign]
            if t == 2 and fail:
                before = [p.grad.clone() for p in params]  # type: ignore[union-attr]
                try:
                    opt.step()
                    return {"raised": None}
                except torch.OutOfMemoryError as e:
                    out = {"raised": type(e), "notes": getattr(e, "__notes__", []),
                           "kept": all(torch.equal(p.grad, b) for p, b in zip(params, before))}
                vars(opt.exchange).pop("grad_buffers", None)
            opt.step()  # (the failed step again, as its note says: no new backward)
        return {**(out if fail else {}), "params": [p.detach().clone() for p in params]}
    return {"failed": run(True), "reference": run(False)}


@pytest.mark.parametrize("world", [2, 3])
def test_a_step_in_which_no_rank_exchanged_says_the_gradients_are_kept(tmp_path: Path, world: int) -> None:
    """Where no rank exchanged its gradients (a rank could not make the exchange's buffers), every rank's
    ``p.grad`` is as backward left it, and its note says so (it said they held the ranks' average, asking for a
    new backward): the step taken again as it is continues as the run that never failed."""
    results = run_distributed(_w_no_exchange, world, tmp_path, timeout=120)
    for r, res in enumerate(results):
        got = res["failed"]
        assert got["raised"] is torch.OutOfMemoryError, (r, got)
        assert got["kept"], (r, "p.grad changed by a step in which no rank exchanged")
        assert not any("already holds the ranks' average" in n for n in got["notes"]), (r, got["notes"])
        assert any("as backward() left it" in n for n in got["notes"]), (r, got["notes"])
        for a, b in zip(got["params"], res["reference"]["params"]):
            assert torch.equal(a, b), (r, "the step taken again differs from the run that never failed")


#: the optimizers that average the gradients themselves (``grad_reduction="mean"``)
MEAN = [pytest.param(s.name, id=s.name) for s in SPECS if s.name != "EGN" and takes_kwarg(s, "grad_reduction")]


def _kept_grads(opt: Any, params: list[torch.Tensor], before: list[Any]) -> None:
    """Make ``opt.step`` copy every ``p.grad`` into ``before`` first (what backward left)."""
    inner = opt.step

    def run(*args: Any, **kwargs: Any) -> Any:
        before[:] = [None if p.grad is None else p.grad.clone() for p in params]
        return inner(*args, **kwargs)
    opt.step = run


def _w_interrupted_buffers(rank: int, world: int, name: str, store: str, where: str) -> dict[str, Any]:
    """Rank 1 is interrupted (Ctrl+C) while it makes the gradient exchange's buffers (the order check meets: every
    rank builds several optimizers), or (``where="writing"``) as it writes the averages into its ``p.grad``; the
    step taken again after a new backward, as the run that never failed."""
    spec = get(name)
    model, opt = _fresh(spec, "mean", rank, world, f"{store}.0")
    _steps(spec, model, opt, range(AT + 2), rank, world, "mean")
    reference = _snapshot(model, opt)
    model, opt = _fresh(spec, "mean", rank, world, f"{store}.1")
    _steps(spec, model, opt, range(AT), rank, world, "mean")
    before = _snapshot(model, opt)
    params = list(model.parameters())
    grads: list[Any] = []
    _kept_grads(opt, params, grads)
    hook = "grad_buffers" if where == "buffers" else "_write_averages"
    if rank == FAILING:
        def interrupted(*args: Any) -> Any:
            raise KeyboardInterrupt
        setattr(opt.exchange, hook, interrupted)
    row: dict[str, Any] = {"raised": None, "message": "no error", "notes": []}
    try:
        _steps(spec, model, opt, range(AT, AT + 1), rank, world, "mean")
    except BaseException as e:  # noqa: BLE001 - the parent checks what each rank raised (a KeyboardInterrupt too)
        row.update(raised=type(e), message=f"{type(e).__name__}: {e}", notes=getattr(e, "__notes__", []))
    vars(opt.exchange).pop(hook, None)
    del opt.step
    row["kept"] = all(g is None if p.grad is None else torch.equal(p.grad, g) for p, g in zip(params, grads))
    row["unchanged"] = _verdict(model, opt, before, "after the interrupted step")
    _steps(spec, model, opt, range(AT, AT + 2), rank, world, "mean")  # the retry: a new backward
    row["exact"] = _verdict(model, opt, reference, "the retried run")
    return row


@pytest.mark.parametrize("where", ["buffers", "writing"])
@pytest.mark.parametrize("name", MEAN)
@pytest.mark.parametrize("world", [2, 3])
def test_a_ctrl_c_in_the_gradient_exchange_raises_on_every_rank(tmp_path: Path, name: str, world: int,
                                                                where: str) -> None:
    """A KeyboardInterrupt on rank 1 while it made the gradient exchange's buffers (``grad_reduction="mean"``) was
    not caught (an Exception was): that rank left the step alone while the others waited in the order check's
    all-reduce (a hang until the process group's timeout, or its next step met theirs). It is held like a failure
    to make them: rank 1 raises its KeyboardInterrupt, the others an error naming it, in the same step; nothing
    changed on any rank (no rank exchanged: p.grad as backward left it, and every note says so), and the step taken
    again continues as the run that never failed. The same for a Ctrl+C as rank 1 writes the averages into its
    ``p.grad`` (it left the others waiting in the step's all-reduce): there the others' p.grad hold averages, and
    their notes say so."""
    got = run_distributed(_w_interrupted_buffers, world, tmp_path, name, str(tmp_path / "store"), where, timeout=90)
    said = {r: g["message"] for r, g in enumerate(got)}
    assert got[FAILING]["raised"] is KeyboardInterrupt, said
    for r, g in enumerate(got):
        if r != FAILING:
            assert g["raised"] is RuntimeError and f"rank(s) [{FAILING}]" in g["message"], (r, said)
            assert "KeyboardInterrupt" in g["message"], (r, said)
        if where == "buffers" or r == FAILING:
            assert g["kept"], (r, "p.grad changed by a step in which no rank exchanged (or that rank wrote none)")
            assert any("as backward() left it" in n for n in g["notes"]), (r, g["notes"])
        else:
            assert any("already holds the ranks' average" in n for n in g["notes"]), (r, g["notes"])
        assert g["unchanged"] == "yes", (r, g["unchanged"])
        assert g["exact"] == "yes", (r, g["exact"])


class _FailAtCopy(TorchDispatchMode):
    """Raise a RuntimeError at the ``at``-th ``aten.copy_`` made under it (1 = the first)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.copies = at, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if str(func).startswith("aten.copy_"):
            self.copies += 1
            if self.copies == self.at:
                raise RuntimeError(f"injected at the averages' write {self.at}")
        return func(*args, **(kwargs or {}))


def _w_partial_write(rank: int, world: int, name: str, store: str) -> dict[str, Any]:
    """Writing the averages into ``p.grad`` raises on rank 1 at its second block (its first written); what each
    rank's ``p.grad`` holds after the step, and what its note says of it."""
    spec = get(name)
    model, opt = _fresh(spec, "mean", rank, world, f"{store}.0")
    _steps(spec, model, opt, range(AT), rank, world, "mean")
    params = list(model.parameters())
    grads: list[Any] = []
    _kept_grads(opt, params, grads)
    if rank == FAILING:
        inner = opt.exchange._write_averages

        def failing(*args: Any) -> Any:
            with _FailAtCopy(2):
                return inner(*args)
        opt.exchange._write_averages = failing  # type: ignore[method-assign]
    row: dict[str, Any] = {"raised": None, "message": "no error", "notes": []}
    try:
        _steps(spec, model, opt, range(AT, AT + 1), rank, world, "mean")
    except Exception as e:  # noqa: BLE001 - the parent checks what each rank raised
        row.update(raised=type(e), message=f"{type(e).__name__}: {e}", notes=getattr(e, "__notes__", []))
    vars(opt.exchange).pop("_write_averages", None)
    labels = [repr(n) if n else f"#{i}" for i, n in enumerate(opt._names)]
    row["changed"] = [labels[i] for i, (p, g) in enumerate(zip(params, grads))
                      if not (g is None if p.grad is None else torch.equal(p.grad, g))]
    row["owned"] = sorted({labels[b.param_index] for b in opt.block_table.owned() if grads[b.param_index] is not None})
    row["labels"] = labels
    return row


@pytest.mark.parametrize("name", MEAN)
def test_the_note_says_which_gradients_hold_averages_after_a_write_that_failed_part_way(tmp_path: Path,
                                                                                       name: str) -> None:
    """Writing the ranks' averages into rank 1's ``p.grad`` raised after its first block: its note said "p.grad of
    the blocks it owns already holds the ranks' average" (the others held backward's gradients). Every rank's note
    is true of its own ``p.grad``: the failing rank's names exactly the parameters whose p.grad was written."""
    got = run_distributed(_w_partial_write, 2, tmp_path, name, str(tmp_path / "store"), timeout=90)
    said = {r: g["message"] for r, g in enumerate(got)}
    assert got[FAILING]["message"].startswith("RuntimeError: injected at the averages' write"), said
    assert len(got[FAILING]["owned"]) >= 2 and got[FAILING]["changed"], got[FAILING]  # (the case's premise)
    for r, g in enumerate(got):
        assert g["raised"] is RuntimeError and (r == FAILING or f"rank(s) [{FAILING}]" in g["message"]), (r, said)
        notes = [n for n in g["notes"] if "grad_reduction='mean'" in n]
        assert len(notes) == 1, (r, g["notes"])
        note = notes[0]
        if "failed part way" in note:
            named = [lab for lab in g["labels"] if lab in note]
            assert named == g["changed"], (r, note, g["changed"])
        elif "already holds the ranks' average" in note:
            assert sorted(g["changed"]) == g["owned"], (r, note, "these p.grad are as backward left them", g["changed"])
        else:
            assert "as backward() left it" in note and not g["changed"], (r, note, g["changed"])


def _w_refused_with_no_buffers(rank: int, world: int, name: str, store: str) -> dict[str, Any]:
    """Two optimizers, each over its own model (``grad_reduction="mean"``): a step each, then rank 1 steps the
    second while the others step the first, and rank 1 is interrupted (Ctrl+C) while it makes the second's exchange
    buffers; then a step of each in order, twice (new backwards). What each step raised, and the models after."""
    spec = get(name)
    (model_a, opt_a), (model_b, opt_b) = (_fresh(spec, "mean", rank, world, f"{store}.{k}") for k in range(2))

    def both(t: int) -> None:
        _steps(spec, model_a, opt_a, range(t, t + 1), rank, world, "mean")
        _steps(spec, model_b, opt_b, range(t, t + 1), rank, world, "mean")
    both(0)
    if rank == FAILING:
        def interrupted() -> Any:
            raise KeyboardInterrupt
        opt_b.exchange.grad_buffers = interrupted  # type: ignore[method-assign]
    crossed: dict[str, Any] = {"raised": None, "message": "no error"}
    try:
        if rank == FAILING:
            _steps(spec, model_b, opt_b, range(1, 2), rank, world, "mean")
        else:
            _steps(spec, model_a, opt_a, range(1, 2), rank, world, "mean")
    except BaseException as e:  # noqa: BLE001 - the parent checks what each rank raised (a KeyboardInterrupt too)
        crossed = {"raised": type(e), "message": f"{type(e).__name__}: {e}", "cause": repr(e.__cause__)}
    vars(opt_b.exchange).pop("grad_buffers", None)
    after = []
    for t in (1, 2):
        try:
            both(t)
            after.append("no error")
        except Exception as e:  # noqa: BLE001 - as above
            after.append(f"{type(e).__name__}: {e}")
    return {"crossed": crossed, "after": after, "params": [p.detach().clone() for m in (model_a, model_b)
                                                           for p in m.parameters()]}


def _w_in_order(rank: int, world: int, name: str, store: str) -> list[Any]:
    spec = get(name)
    (model_a, opt_a), (model_b, opt_b) = (_fresh(spec, "mean", rank, world, f"{store}.{k}") for k in range(2))
    for t in range(3):
        _steps(spec, model_a, opt_a, range(t, t + 1), rank, world, "mean")
        _steps(spec, model_b, opt_b, range(t, t + 1), rank, world, "mean")
    return [p.detach().clone() for m in (model_a, model_b) for p in m.parameters()]


@pytest.mark.parametrize("name", MEAN)
def test_a_ctrl_c_in_a_step_the_order_check_refuses_stays_a_ctrl_c(tmp_path: Path, name: str) -> None:
    """A Ctrl+C on rank 1 while it made the exchange's buffers in a step the order check then refused (the ranks
    were in different optimizers' steps): held for the record (which a refused step never reaches), it was lost
    there, and rank 1 raised the refusal as a RuntimeError (a loop catching errors went on after a Ctrl+C). Rank 1
    raises its KeyboardInterrupt (the refusal its cause), the others the refusal; nothing is left held, and the
    steps in order go on as a run that never crossed."""
    got = run_distributed(_w_refused_with_no_buffers, 2, tmp_path, name, str(tmp_path / "store"), timeout=90)
    reference = run_distributed(_w_in_order, 2, tmp_path, name, str(tmp_path / "ref"), timeout=90)
    assert got[FAILING]["crossed"]["raised"] is KeyboardInterrupt, got[FAILING]["crossed"]
    assert "order" in got[FAILING]["crossed"]["cause"], got[FAILING]["crossed"]
    for r, g in enumerate(got):
        if r != FAILING:
            assert g["crossed"]["raised"] is RuntimeError and "order" in g["crossed"]["message"], (r, g["crossed"])
        assert g["after"] == ["no error", "no error"], (r, g["after"])
        for a, b in zip(g["params"], reference[r]):
            assert torch.equal(a, b), (r, "the steps in order differ from the run that never crossed")
