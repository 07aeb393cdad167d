"""torch.amp.GradScaler in plain training loops, for every registered optimizer that steps from gradients.

* A step the scaler skips (an inf or NaN in the gradients: it does not call ``step()``, one process or DDP)
  leaves nothing behind: an optimizer that takes the loss (``StepNeeds.LOSS``) and was handed it with
  ``set_loss`` drops it when the loop zeroes those gradients, wherever the loop hands it over and zeroes
  (before or after the backward, after ``unscale_``): no accumulation warning at the next hand-over, and the
  run equals the run that never had the bad batch, parameters and state bit for bit; a step handed no loss
  of its own after it is refused (it was judged by the skipped batch's loss). At W = 2 under DDP (an inf in
  one rank's batch, which DDP's average carries to every rank) every optimizer's run equals the run without
  that batch on every rank, with no rank warning.
* Under the scaler's contract (``_step_supports_amp_scaling``: ``grad_reduction="mean"`` at W > 1) the step
  unscales the gradients itself; float16 gradients, which torch.amp.GradScaler refuses to unscale (the same
  model raised at W = 1), are refused on every rank, naming the parameter, before anything is written.
* An optimizer that steps from the batch (``StepNeeds.BATCH``) at W = 2 without DDP, each rank's own scaled
  backward: an overflow on one rank skips the step on every rank (the run equals the one without that batch; also
  for an optimizer built before the process group, at the step that joins it), and ``scaler.step`` with no
  backward before it, on every rank or on one, is refused on every rank before the step.

Skipped steps under the contract, an overflow on one rank and the unscaled-equals-scaled runs are in
:mod:`tests.conformance.test_ranks` and :mod:`tests.conformance.test_contract`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_soaa.registry import OptimizerSpec, StepNeeds, get, half_mse
from tests.conformance._battery import SIZES, SPECS, assert_identical, data, make, params, takes_kwarg, without_skips
from tests.harness.distributed import run_distributed
from tests.harness.models import tiny_mlp

LOSS_SPECS = [s for s in SPECS if s.needs is StepNeeds.LOSS]
GRAD_SPECS = [s for s in SPECS if s.needs is not StepNeeds.BATCH]
STEPS, BAD = 5, 2
REPEATED = "called again before step()"
#: where the loop zeroes the gradients and hands the loss over, relative to its backward
ORDERS = ("zero_first", "zero_last", "zero_between", "after_unscale")


def _iteration(opt: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor, order: str,
               scaler: torch.amp.GradScaler | None, poison: bool = False, hand: bool = True) -> None:
    """One iteration of a plain loop in ``order``; ``poison`` puts an inf into a gradient (the scaler skips)."""
    if order == "zero_first":
        opt.zero_grad()
    loss = half_mse(model(x), y)
    if hand and order in ("zero_first", "zero_last", "zero_between"):
        opt.set_loss(loss.detach())
    if order == "zero_between":  # loss = f(x); opt.set_loss(loss); opt.zero_grad(); loss.backward()
        opt.zero_grad()
    (loss if scaler is None else scaler.scale(loss)).backward()
    if poison:
        next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
    if scaler is not None and order == "after_unscale":
        scaler.unscale_(opt)
    if hand and order == "after_unscale":
        opt.set_loss(loss.detach())
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    if order in ("zero_last", "after_unscale"):
        opt.zero_grad()


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("spec", LOSS_SPECS, ids=[s.name for s in LOSS_SPECS])
def test_a_loss_handed_over_for_a_skipped_step_is_dropped(spec: OptimizerSpec, order: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """SOAA's set_loss in a GradScaler loop whose step ``BAD`` overflows: the skipped step's loss stayed pending,
    and the next set_loss logged that the step uses the last value only (the gradient accumulation warning).
    Now: no warning, and the run equals the one without the bad batch (a power-of-two scale is exact)."""
    ref_model, ref = make(spec)
    for t in range(STEPS):
        if t != BAD:
            _iteration(ref, ref_model, *data(t), order, None)
    model, opt = make(spec)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with caplog.at_level(logging.WARNING):
        for t in range(STEPS):
            before = (params(model), opt.state_dict()) if t == BAD else None
            _iteration(opt, model, *data(t), order, scaler, poison=t == BAD)
            if before is not None:
                assert_identical(params(model), before[0], "params after the skipped step")
                assert_identical(opt.state_dict(), before[1], "state after the skipped step")
    assert REPEATED not in caplog.text, caplog.text
    assert scaler.get_scale() == 2.0**9 and opt.num_steps == ref.num_steps == STEPS - 1
    assert_identical(params(model), params(ref_model), "params")
    assert_identical(without_skips(opt.state_dict()), without_skips(ref.state_dict()))


class _UnusedFirst(nn.Module):
    """The battery's model behind a first parameter no loss reaches (a head of another task)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(2, 2, dtype=torch.float64)
        self.net = tiny_mlp(0, torch.float64, sizes=SIZES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("first", ["used", "unused"])
@pytest.mark.parametrize("spec", LOSS_SPECS, ids=[s.name for s in LOSS_SPECS])
def test_a_step_handed_no_loss_after_a_skipped_step_is_refused(spec: OptimizerSpec, first: str) -> None:
    """The step after a skipped one, with no loss handed over for it: it was judged by the skipped batch's loss,
    silently. It needs its own, as every step does: refused, nothing changed. ``unused``: the first parameter
    has no gradient; zero_grad watched its gradient alone, kept the skipped batch's loss, and the step was
    judged by it."""
    if first == "used":
        model, opt = make(spec)
    else:
        model = _UnusedFirst()
        opt = spec.build(model, **spec.test_kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for t in range(BAD + 1):
        _iteration(opt, model, *data(t), "zero_first", scaler, poison=t == BAD)
    before = (params(model), opt.state_dict())
    with pytest.raises(ValueError, match="loss"):  # (SOAA: "needs the mini-batch loss of every step")
        _iteration(opt, model, *data(BAD + 1), "zero_first", scaler, hand=False)
    assert_identical(params(model), before[0], "params")
    assert_identical(opt.state_dict(), before[1])


class _TwoTasks(nn.Module):
    """Two of the battery's models, one per task; each batch's loss reaches one of them only (``task``)."""

    def __init__(self) -> None:
        super().__init__()
        self.nets = nn.ModuleList(tiny_mlp(s, torch.float64, sizes=SIZES) for s in range(2))
        self.task = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nets[self.task](x)


@pytest.mark.parametrize("case", ["first_batch", "watched_unreached"])
@pytest.mark.parametrize("spec", LOSS_SPECS, ids=[s.name for s in LOSS_SPECS])
def test_a_skipped_step_whose_loss_misses_the_watched_parameter_drops_its_loss(spec: OptimizerSpec,
                                                                               case: str) -> None:
    """The skipped batch's loss reached no gradient zero_grad watched: ``first_batch``, the scaler skips the very
    first batch (a float16 run's first scale overflows) of a model whose first parameter no loss reaches;
    ``watched_unreached``, the step before trained through the first parameter (task 0) and the skipped batch
    (task 1) reached only parameters after it. Its loss stayed pending through zero_grad and the next step, handed
    none, was judged by it: refused instead, nothing changed."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    if case == "first_batch":
        model: nn.Module = _UnusedFirst()
        opt = spec.build(model, **spec.test_kwargs)
    else:
        model = _TwoTasks()
        opt = spec.build(model, **spec.test_kwargs)
        _iteration(opt, model, *data(0), "zero_first", scaler)
        model.task = 1
    _iteration(opt, model, *data(1), "zero_first", scaler, poison=True)
    before = (params(model), opt.state_dict())
    with pytest.raises(ValueError, match="loss"):
        _iteration(opt, model, *data(2), "zero_first", scaler, hand=False)
    assert_identical(params(model), before[0], "params")
    assert_identical(opt.state_dict(), before[1])


# ---------------------------------------------------------------------------------------- W = 2
def _w_ddp_skip(rank: int, world: int, names: list[str], bad: bool) -> dict[str, Any]:
    """DDP over two ranks, GradScaler, each optimizer in turn (set_loss for those that take the loss); at step
    ``BAD`` rank 1's input holds an inf (an overflowing forward on one rank's data): DDP's average carries it to
    every rank, and every rank's scaler skips. Without ``bad`` that batch is left out."""
    logger = logging.getLogger("lightning_soaa")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    out: dict[str, Any] = {}
    for name in names:
        model, opt = make(get(name))
        ddp = nn.parallel.DistributedDataParallel(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for t in range(STEPS):
            if t == BAD and not bad:
                continue
            x, y = data(t, rank=rank, world=world)
            if t == BAD and rank == 1:
                x = x.clone()
                x[0, 0] = float("inf")
            _iteration(opt, ddp, x, y, "zero_first", scaler, hand=get(name).needs is StepNeeds.LOSS)
        opt.consolidate_state_dict()
        out[name] = {"params": params(model), "state": without_skips(opt.state_dict()) if rank == 0 else None,
                     "steps": opt.num_steps}
    logger.removeHandler(handler)
    return {"runs": out, "logs": records}


def test_a_skipped_ddp_step_changes_nothing_and_drops_the_loss_on_every_rank(tmp_path: Path) -> None:
    """W = 2 under DDP: the run with the skipped step equals the run without the bad batch on every rank, bit for
    bit, and no rank logs the accumulation warning (SOAA's skipped loss stayed pending on every rank)."""
    names = [s.name for s in GRAD_SPECS]
    runs = [run_distributed(_w_ddp_skip, 2, tmp_path, names, bad) for bad in (True, False)]
    for r, out in enumerate(runs[0]):
        assert not any(REPEATED in m for m in out["logs"]), f"rank {r}: {out['logs']}"
        for name in names:
            got, ref = out["runs"][name], runs[1][0]["runs"][name]
            assert got["steps"] == STEPS - 1, f"rank {r} {name}: {got['steps']} steps"
            assert_identical(got["params"], ref["params"], f"rank {r} {name} params")
    for name in names:
        assert_identical(runs[0][0]["runs"][name]["state"], runs[1][0]["runs"][name]["state"], f"{name} state")


def _state(opt: Any) -> dict[str, Any]:
    opt.consolidate_state_dict(to=None)  # a collective: every rank calls it at the same point
    return opt.state_dict()


def _w_float16_contract(rank: int, world: int, names: list[str]) -> dict[str, Any]:
    """float16 parameters, grad_reduction="mean", GradScaler: what each optimizer's step raised, and whether the
    parameters, their (scaled) gradients and the state stayed as they were."""
    out: dict[str, Any] = {}
    for name in names:
        spec = get(name)
        model, opt = make(spec, grad_reduction="mean")
        model.half()
        opt = spec.build(model, **spec.test_kwargs, grad_reduction="mean")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        x, y = (u.half() for u in data(0, rank=rank, world=world))
        loss = half_mse(model(x), y)
        scaler.scale(loss).backward()
        before = (params(model), [p.grad.clone() for p in model.parameters()], _state(opt))
        try:
            scaler.step(opt, **({"loss": loss.detach()} if spec.needs is StepNeeds.LOSS else {}))
            out[name] = {"error": "no error"}
        except ValueError as e:
            out[name] = {"error": str(e)}
        assert_identical(params(model), before[0], f"{name} params")
        assert_identical([p.grad for p in model.parameters()], before[1], f"{name} gradients")
        assert_identical(_state(opt), before[2], f"{name} state")
        assert opt.num_steps == 0
    return out


def test_float16_gradients_under_the_scalers_contract_are_refused_on_every_rank(tmp_path: Path) -> None:
    """torch.amp.GradScaler refuses to unscale float16 gradients ('Attempting to unscale FP16 gradients.'): at
    W = 1 and under DDP the same model raised, while grad_reduction="mean" at W = 2, where the step unscales
    them itself, divided them in float16 (small values flushed to 0) and trained on."""
    names = [s.name for s in GRAD_SPECS if takes_kwarg(s, "grad_reduction")]
    res = run_distributed(_w_float16_contract, 2, tmp_path, names)
    for r, out in enumerate(res):
        for name in names:
            msg = out[name]["error"]
            assert "torch.amp.GradScaler with float16 gradients" in msg and "parameter '0.weight'" in msg \
                and "dtype=torch.float16" in msg and "float32 parameters under torch.autocast" in msg, \
                f"rank {r} {name}: {msg}"


# ------------------------------------------------------------------ W = 2, optimizers that step from the batch
BATCH_SPECS = [s for s in SPECS if s.needs is StepNeeds.BATCH]


def _w_batch_skip(rank: int, world: int, names: list[str], bad: bool, early_store: str | None = None
                  ) -> dict[str, Any]:
    """Each rank's own scaled backward (no DDP: the optimizer differentiates the bare module itself) and
    ``scaler.step(opt, inputs=x, targets=y)``; at step ``BAD`` rank 1's gradient alone holds an inf. Without
    ``bad`` that batch is left out. ``early_store``: the optimizers are built before the process group (made
    again on that store), which they join at their first step, and the inf comes at that step."""
    out: dict[str, Any] = {}
    at = 0 if early_store else BAD
    if early_store:
        dist.barrier()  # no rank tears the harness's group down while a peer is still connecting to it
        dist.destroy_process_group()
    built = {name: make(get(name)) for name in names}
    if early_store:
        dist.init_process_group("gloo", store=dist.FileStore(early_store, world), rank=rank, world_size=world)
    for name in names:
        model, opt = built[name]
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for t in range(STEPS):
            if t == at and not bad:
                continue
            x, y = data(t, rank=rank, world=world)
            opt.zero_grad()
            scaler.scale(half_mse(model(x), y)).backward()
            if t == at and rank == 1:
                next(model.parameters()).grad.view(-1)[0] = float("inf")
            scaler.step(opt, inputs=x, targets=y)
            scaler.update()
        out[name] = {"params": params(model), "state": without_skips(_state(opt)),
                     "steps": (opt.num_steps, opt.skipped_steps)}
    return out


@pytest.mark.skipif(not BATCH_SPECS, reason="no registered optimizer steps from the batch")
@pytest.mark.parametrize("early", [False, True], ids=["built_after_the_group", "built_before_the_group"])
def test_an_overflow_on_one_rank_skips_a_batch_optimizers_step_on_every_rank(tmp_path: Path, early: bool) -> None:
    """W = 2 without DDP: each rank's scaler decided from its own gradients whether to call step(), so rank 0
    stepped on batch ``BAD`` while rank 1 skipped it, and rank 0's step paired with rank 1's next one (the
    batches of two iterations solved as one; the last step found no peer). Under the scaler's contract every
    rank calls step() and the overflow skips it on every rank: the run equals the one without that batch. Built
    before the group, the optimizer is single-process until its first step joins it: the scaler reads the flag
    before that step, which must count the group it will join (read as one process, rank 1 skipped alone)."""
    names = [s.name for s in BATCH_SPECS]
    runs = [run_distributed(_w_batch_skip, 2, tmp_path, names, bad,
                            str(tmp_path / f"store-{bad}") if early else None, timeout=90.0) for bad in (True, False)]
    for r, out in enumerate(runs[0]):
        for name in names:
            got, ref = out[name], runs[1][r][name]
            assert got["steps"] == (STEPS - 1, 1), f"rank {r} {name}: (steps, skipped) = {got['steps']}"
            assert_identical(got["params"], ref["params"], f"rank {r} {name} params")
            assert_identical(got["state"], ref["state"], f"rank {r} {name} state")


def _w_batch_no_backward(rank: int, world: int, names: list[str], backward_on: tuple[int, ...] = ()
                         ) -> dict[str, Any]:
    """``scaler.step(opt, inputs=x, targets=y)`` with no backward before it (the optimizer needs none) on the ranks
    not in ``backward_on``: what it raised, and whether anything changed."""
    out: dict[str, Any] = {}
    for name in names:
        model, opt = make(get(name))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        x, y = data(0, rank=rank, world=world)
        loss = scaler.scale(half_mse(model(x), y))
        if rank in backward_on:
            loss.backward()
        before = params(model)
        try:
            scaler.step(opt, inputs=x, targets=y)
            scaler.update()
            out[name] = {"error": "no error"}
        except Exception as e:  # noqa: BLE001 - reported to the parent
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        assert_identical(params(model), before, f"{name} params")
        assert opt.num_steps == 0, f"{name}: {opt.num_steps} steps"
    return out


@pytest.mark.skipif(not BATCH_SPECS, reason="no registered optimizer steps from the batch")
def test_a_scaler_step_without_a_backward_is_refused_before_the_step(tmp_path: Path) -> None:
    """W = 2: the step was taken, and torch's scaler then raised 'No inf checks were recorded prior to update' at
    scaler.update() (in one process torch raises in scaler.step, before it). Refused on every rank before the
    step now, saying what to do."""
    names = [s.name for s in BATCH_SPECS]
    for r, out in enumerate(run_distributed(_w_batch_no_backward, 2, tmp_path, names, timeout=90.0)):
        for name in names:
            msg = out[name]["error"]
            assert msg.startswith("ValueError") and "hold no gradient" in msg and "without the scaler" in msg, \
                f"rank {r} {name}: {msg}"


@pytest.mark.skipif(not BATCH_SPECS, reason="no registered optimizer steps from the batch")
def test_a_scaler_step_without_a_backward_on_one_rank_is_refused_on_every_rank(tmp_path: Path) -> None:
    """W = 2, rank 0 ran the scaled backward and rank 1 did not: rank 1 alone has nothing for the scaler to check
    (before the contract its scaler raised alone while rank 0 entered the step's collectives; without the refusal
    rank 1's ``scaler.update()`` raised alone, after a step taken on both). Refused on both ranks, before the step:
    rank 1 says why, rank 0 names rank 1."""
    names = [s.name for s in BATCH_SPECS]
    for r, out in enumerate(run_distributed(_w_batch_no_backward, 2, tmp_path, names, (0,), timeout=90.0)):
        for name in names:
            msg = out[name]["error"]
            want = "hold no gradient" if r == 1 else "rank(s) [1] raised"
            assert msg.startswith("ValueError") and want in msg, f"rank {r} {name}: {msg}"
