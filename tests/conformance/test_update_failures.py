"""A rank whose update raises (out of memory in ``_apply``) raises on every rank, together.

After the step's all-reduce every rank writes its update (``_apply``) and then gathers the others' blocks. A
rank whose ``_apply`` raised (an update kernel out of memory) left the step alone while the others waited in the
gather: gloo aborted or timed out, NCCL hung, and its next collective (a retried step's) crossed theirs. Nothing
can be put back without a copy of the state, so the guarantee is the interrupted update's: every rank raises in
the same step (the failing rank its own error, the others an ``OutOfMemoryError`` naming it), every rank holds
the same parameters afterwards, and every rank refuses the next step together (until ``load_state_dict``).

Rank 1's ``_apply`` is made to raise before it starts, after it wrote everything, and at its first, middle and
last ATen call (found by a counting run; none for SOAA's C loops), one at a time, on
real gloo ranks (W = 2 and 3), for the optimizers whose parameters the template gathers (EGN gathers its
direction itself).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_soaa.registry import get
from tests.conformance._battery import make
from tests.conformance.test_buffer_failures import FAILING, VARIANTS
from tests.conformance.test_local_failures import AT, _Calls, _fresh, _steps
from tests.harness.distributed import run_distributed


def _apply_calls(opt: Any, take: Any) -> list[int]:
    """The first, middle and last ATen call of ``_apply`` in ``take()`` (one step; 1 = its first), none where it
    makes none (SOAA's C loops on the CPU)."""
    counting = _Calls()
    inner = opt._apply

    def counted(*args: Any, **kwargs: Any) -> Any:
        with counting:
            return inner(*args, **kwargs)
    opt._apply = counted
    try:
        take()
    finally:
        del opt._apply
    n = len(counting.calls)
    return sorted({1, (n + 1) // 2, n}) if n else []


def _failing_apply(opt: Any, where: str | int) -> None:
    """Make this rank's ``_apply`` raise an out of memory: ``"before"`` it starts, ``"after"`` it wrote
    everything, or at its ``where``-th ATen call."""
    inner = opt._apply

    def failing(*args: Any, **kwargs: Any) -> Any:
        if isinstance(where, int):
            with _Calls(where, torch.OutOfMemoryError):
                return inner(*args, **kwargs)
        if where == "after":
            inner(*args, **kwargs)
        raise torch.OutOfMemoryError(f"injected {where} _apply")
    opt._apply = failing


#: DASGO with its matrices cut into column blocks over the ranks: its update's all-reduce of their norms
SPLIT = {"max_block_numel": 24}


def _outcome(run: Any) -> dict[str, Any]:
    try:
        run()
    except Exception as e:  # noqa: BLE001 - the parent checks what each rank raised
        return {"raised": type(e), "message": f"{type(e).__name__}: {e}", "notes": getattr(e, "__notes__", [])}
    return {"raised": None, "message": "no error", "notes": []}


def _w_update(rank: int, world: int, name: str, variant: str, store: str) -> list[dict[str, Any]]:
    spec = get(name)
    fresh = (lambda k: make(spec, **SPLIT)) if variant == "split" else (
        lambda k: _fresh(spec, variant, rank, world, f"{store}.{k}"))
    model, opt = fresh(0)
    _steps(spec, model, opt, range(AT + 1), rank, world, variant)  # (its process-wide caches made: ASGO's masks)
    model, opt = fresh(1)
    _steps(spec, model, opt, range(AT), rank, world, variant)
    calls = _apply_calls(opt, lambda: _steps(spec, model, opt, range(AT, AT + 1), rank, world, variant))
    failing: list[Any] = [None] * world
    dist.all_gather_object(failing, calls)  # every rank steps as often as the failing rank has targets
    rows = []
    for k, at in enumerate(["before", "after", *failing[FAILING]]):
        model, opt = fresh(k + 2)
        _steps(spec, model, opt, range(AT), rank, world, variant)
        if rank == FAILING:
            _failing_apply(opt, at)
        row = _outcome(lambda: _steps(spec, model, opt, range(AT, AT + 1), rank, world, variant))
        vars(opt).pop("_apply", None)
        row["at"] = at
        row["params"] = [p.detach().clone() for p in model.parameters()]
        row["next"] = _outcome(lambda: _steps(spec, model, opt, range(AT, AT + 1), rank, world, variant))
        rows.append(row)
    return rows


@pytest.mark.parametrize(("name", "variant"), [*VARIANTS, pytest.param("DASGO", "split", id="DASGO-split")])
@pytest.mark.parametrize("world", [2, 3])
def test_a_rank_whose_update_raises_raises_on_every_rank(tmp_path: Path, name: str, variant: str, world: int) -> None:
    """Rank 1's ``_apply`` out of memory before it, after it, and at its first, middle and last ATen call, one at
    a time (module docstring)."""
    results = run_distributed(_w_update, world, tmp_path, name, variant, str(tmp_path / "store"), timeout=90)
    for k, row in enumerate(results[FAILING]):
        got = [res[k] for res in results]
        said = {r: g["message"] for r, g in enumerate(got)}
        i = row["at"]  # (where rank 1 failed)
        assert got[FAILING]["message"].startswith("OutOfMemoryError: injected"), (i, said)
        for r, g in enumerate(got):
            assert g["raised"] is not None and issubclass(g["raised"], torch.OutOfMemoryError), (i, r, said)
            if r != FAILING:
                assert f"rank(s) [{FAILING}]" in g["message"], (i, r, said)
            # every rank's note names the rank whose update was interrupted (a peer's own update went through)
            assert any(f"interrupted on rank(s) [{FAILING}]" in n for n in g["notes"]), (i, r, g["notes"])
            for a, b in zip(g["params"], got[0]["params"]):
                assert torch.equal(a, b), (i, r, "the ranks' parameters differ after the failed step")
            assert g["next"]["raised"] is RuntimeError and "interrupted" in g["next"]["message"], (i, r, g["next"])
            # every rank refused the next step before the exchange (joined with zeros): no average was written
            assert not any("already holds the ranks' average" in n for n in g["next"]["notes"]), (i, r, g["next"])



class _NoLocalWork(_Calls):
    """Raise an out of memory at any ATen call that is not a collective (``c10d``): a rank whose allocator is
    exhausted (its ``_apply`` ran out of memory) can still take part in a collective on buffers made before."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not str(func).startswith(("c10d.", "profiler.")):
            raise torch.OutOfMemoryError(f"injected at {func} after the update ran out of memory")
        return func(*args, **(kwargs or {}))


def _w_join_fails(rank: int, world: int) -> dict[str, Any]:
    """DASGO with column-split matrices: rank 1's ``_apply`` runs out of memory before its split-norm all-reduce,
    and so does every allocation after it while it joins the step's remaining collectives."""
    spec = get("DASGO")
    model, opt = make(spec, **SPLIT)
    _steps(spec, model, opt, range(AT), rank, world, "none")
    if rank == FAILING:
        _failing_apply(opt, "before")
        join = opt._join_update_collectives

        def exhausted() -> None:
            with _NoLocalWork():
                join()
        opt._join_update_collectives = exhausted
    row = _outcome(lambda: _steps(spec, model, opt, range(AT, AT + 1), rank, world, "none"))
    for name in ("_apply", "_join_update_collectives"):
        vars(opt).pop(name, None)
    row["params"] = [p.detach().clone() for p in model.parameters()]
    row["next"] = _outcome(lambda: _steps(spec, model, opt, range(AT, AT + 1), rank, world, "none"))
    return row


@pytest.mark.parametrize("world", [2, 3])
def test_a_rank_out_of_memory_joins_the_split_norms_without_allocating(tmp_path: Path, world: int) -> None:
    """The failing rank's join of DASGO's split-norm all-reduce made its zeros after the out of memory: failing
    there it skipped the parameter gather, and the others waited in the all-reduce. Its buffer is made before the
    step's all-reduce now: every rank raises together, as in the other cases."""
    got = run_distributed(_w_join_fails, world, tmp_path, timeout=90)
    said = {r: g["message"] for r, g in enumerate(got)}
    assert got[FAILING]["message"].startswith("OutOfMemoryError: injected before _apply"), said
    for r, g in enumerate(got):
        assert g["raised"] is not None and issubclass(g["raised"], torch.OutOfMemoryError), (r, said)
        if r != FAILING:
            assert f"rank(s) [{FAILING}]" in g["message"], (r, said)
        for a, b in zip(g["params"], got[0]["params"]):
            assert torch.equal(a, b), (r, "the ranks' parameters differ after the failed step")
        assert g["next"]["raised"] is RuntimeError and "interrupted" in g["next"]["message"], (r, g["next"])


def _w_join_after_load(rank: int, world: int) -> dict[str, Any]:
    """DASGO with column-split matrices: a step whose update failed after the split-norm all-reduce (every rank
    interrupted, the step not counted), the checkpoint taken before it loaded, and the step again, whose ``_apply``
    on rank 1 raises before it starts."""
    spec = get("DASGO")
    model, opt = make(spec, **SPLIT)
    _steps(spec, model, opt, range(AT), rank, world, "none")
    opt.consolidate_state_dict(to=None)  # (every rank keeps the whole state)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    for at in ("after", "before"):
        if rank == FAILING:
            _failing_apply(opt, at)
        row = _outcome(lambda: _steps(spec, model, opt, range(AT, AT + 1), rank, world, "none"))
        vars(opt).pop("_apply", None)
        model.load_state_dict(saved[0])
        opt.load_state_dict(saved[1])
    row["params"] = [p.detach().clone() for p in model.parameters()]
    return row


def test_a_rank_failing_before_its_update_joins_the_split_norms_after_a_load(tmp_path: Path) -> None:
    """The join's marker of the split-norm all-reduce (the step count it was made at) outlived a failed step:
    after ``load_state_dict`` the count was that step's again, and a rank failing before its ``_apply`` reached
    the all-reduce took it for made and skipped it (gloo: an abort). The marker is reset before every step."""
    got = run_distributed(_w_join_after_load, 2, tmp_path, timeout=90)
    said = {r: g["message"] for r, g in enumerate(got)}
    assert got[FAILING]["message"].startswith("OutOfMemoryError: injected before _apply"), said
    for r, g in enumerate(got):
        assert g["raised"] is not None and issubclass(g["raised"], torch.OutOfMemoryError), (r, said)
        for a, b in zip(g["params"], got[0]["params"]):
            assert torch.equal(a, b), (r, "the ranks' parameters differ after the failed step")


def _w_join_after_rebuild(rank: int, world: int) -> dict[str, Any]:
    """DASGO over a 4 x 12 matrix cut into column blocks: a first step refused on every rank after its split-norm
    zeros were made (the ranks' learning rates differ), the matrix then flattened (``p.data = ...``: the table is
    rebuilt before any step, and no parameter is split any more), and a step whose ``_apply`` raises on rank 1."""
    from lightning_soaa.optim.asgo import DASGO

    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 12, dtype=torch.float64, generator=gen))
    b = torch.nn.Parameter(torch.randn(4, dtype=torch.float64, generator=gen))
    opt = DASGO([w, b], lr=1e-2, **SPLIT)
    opt.param_groups[0]["lr"] = 1e-2 * (1 + rank)
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    first = _outcome(opt.step)
    made = "_join_zeros" in vars(opt)
    opt.param_groups[0]["lr"] = 1e-2
    w.data = w.data.reshape(-1)  # (a 1-D parameter: AdamW; nothing split)
    w.grad = torch.ones_like(w)
    if rank == FAILING:
        _failing_apply(opt, "before")
    row = _outcome(opt.step)
    row.update(first=first, made=made, params=[w.detach().clone(), b.detach().clone()])
    return row


def test_a_rank_failing_after_the_table_lost_its_split_matrices_joins_nothing(tmp_path: Path) -> None:
    """The split-norm join's zeros, made at a step that was refused, outlived a table rebuilt without split
    matrices: a rank whose ``_apply`` raised then joined an all-reduce no other rank makes, while the others
    waited in the parameter gather (measured: a hang, W = 2). Every rank raises together, with the same parameters."""
    got = run_distributed(_w_join_after_rebuild, 2, tmp_path, timeout=90)
    said = {r: (g["first"]["message"], g["message"]) for r, g in enumerate(got)}
    assert all(g["made"] and g["first"]["raised"] is not None for g in got), said  # (the case's premise)
    assert got[FAILING]["message"].startswith("OutOfMemoryError: injected before _apply"), said
    for r, g in enumerate(got):
        assert g["raised"] is not None and issubclass(g["raised"], torch.OutOfMemoryError), (r, said)
        for x, y in zip(g["params"], got[0]["params"]):
            assert torch.equal(x, y), (r, "the ranks' parameters differ after the failed step")


#: rank 1's failures in its own work around the parameter gather (a hooked function's error, not an allocation's):
#: "join": its ``_apply`` out of memory, then its join of the step's collectives raises once they are made; "packing
#: after a failed update": its ``_apply`` out of memory, then packing its blocks for the gather raises; "packing":
#: its update goes through, packing its blocks raises
LATE = ("join", "packing after a failed update", "packing")


def _failing_late(opt: Any, case: str) -> None:
    if case != "packing":
        _failing_apply(opt, "before")
    if case == "join":
        join = opt._join_update_collectives

        def joined_then_raises() -> None:
            join()
            raise RuntimeError("injected after the join's collectives")
        opt._join_update_collectives = joined_then_raises
        return
    gathered = opt._gathered_flags

    def failing_pack(*args: Any) -> None:
        raise RuntimeError("injected in the gather's packing")

    def gather(flag: float) -> Any:  # (the packing fails in the gather only: the gradient exchange packs too)
        opt.exchange._pack = failing_pack
        try:
            return gathered(flag)
        finally:
            vars(opt.exchange).pop("_pack", None)
    opt._gathered_flags = gather


def _w_late(rank: int, world: int, name: str, variant: str, store: str,
            cases: tuple[str, ...] = LATE) -> list[dict[str, Any]]:
    spec = get(name)
    fresh = (lambda k: make(spec, **SPLIT)) if variant == "split" else (
        lambda k: _fresh(spec, variant, rank, world, f"{store}.{k}"))
    rows = []
    for k, case in enumerate(cases):
        model, opt = fresh(k)
        _steps(spec, model, opt, range(AT), rank, world, variant)
        before = [p.detach().clone() for p in model.parameters()]
        if rank == FAILING:
            _failing_late(opt, case)
        row = _outcome(lambda: _steps(spec, model, opt, range(AT, AT + 1), rank, world, variant))
        for hook in ("_apply", "_join_update_collectives", "_gathered_flags"):
            vars(opt).pop(hook, None)
        row["case"] = case
        row["params"] = [p.detach().clone() for p in model.parameters()]
        row["changed"] = any(not torch.equal(a, b) for a, b in zip(row["params"], before))
        row["next"] = _outcome(lambda: _steps(spec, model, opt, range(AT, AT + 1), rank, world, variant))
        rows.append(row)
    return rows


@pytest.mark.parametrize(("name", "variant"), [*VARIANTS, pytest.param("DASGO", "split", id="DASGO-split")])
@pytest.mark.parametrize("world", [2, 3])
def test_a_rank_whose_own_work_around_the_gather_raises_raises_with_every_rank(tmp_path: Path, name: str,
                                                                              variant: str, world: int) -> None:
    """A non-allocation error in rank 1's own work in the gather or in its join of the step's collectives (``LATE``):
    raised from there, that rank lost its own error (its update's) and left the others waiting in the gather (gloo:
    an abort or a timeout; NCCL: a hang). Now it joins every collective of the step and raises its own error (its
    update's, the late one noted on it), the others an error naming it, in the same step; the next step is refused
    on every rank. Where rank 1 could not pack its blocks the others keep their own copies of them (the same on
    every one of them) and say so."""
    results = run_distributed(_w_late, world, tmp_path, name, variant, str(tmp_path / "store"), timeout=90)
    for k, row in enumerate(results[FAILING]):
        got = [res[k] for res in results]
        case = row["case"]
        said = {r: g["message"] for r, g in enumerate(got)}
        own = "RuntimeError: injected in the gather's packing" if case == "packing" else "OutOfMemoryError: injected"
        assert got[FAILING]["message"].startswith(own), (case, said)
        if case != "packing":  # the late error rides on the update's own
            assert any("also raised RuntimeError: injected" in n for n in got[FAILING]["notes"]), (case, got[FAILING])
        peers = [r for r in range(world) if r != FAILING]
        for r in peers:
            assert got[r]["raised"] is not None and f"rank(s) [{FAILING}]" in got[r]["message"], (case, r, said)
            if case != "join":
                assert f"rank(s) [{FAILING}] could not send their blocks" in got[r]["message"], (case, r, said)
            for a, b in zip(got[r]["params"], got[peers[0]]["params"]):
                assert torch.equal(a, b), (case, r, "the peers' parameters differ after the failed step")
        if case != "packing":  # (nothing written by rank 1: every rank holds the same parameters)
            for a, b in zip(got[FAILING]["params"], got[peers[0]]["params"]):
                assert torch.equal(a, b), (case, "rank 1's parameters differ from its peers'")
        for r, g in enumerate(got):
            assert g["next"]["raised"] is RuntimeError and "interrupted" in g["next"]["message"], (case, r, g["next"])
