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
