"""Lightning's gradient clipping with every registered optimizer: ``Trainer(gradient_clip_val=...)``,
``self.clip_gradients`` in the module's ``configure_gradient_clipping``, and ``self.clip_gradients(opt, ...)`` in
a manual-optimization ``training_step`` (Lightning's recipe) or in the closure it hands ``opt.step(closure)``, each
by norm and by value, equal to one process clipping the full batch's gradient with torch (``clip_grad_norm_`` /
``clip_grad_value_``, then ``step()``; float64, rtol 1e-10), or refused on every rank.

- W = 1: Lightning clips the gradient the step reads; the optimizer takes nothing over.
- W = 2, ``grad_reduction="mean"`` (DDP's averaging switched off by a communication hook that leaves each rank its
  own gradient): the step averages the gradients, after Lightning would have clipped each rank's own (AdamW 0.10
  off the one-process run in 4 steps, silently). A clip by norm is taken over and applied to the averaged gradient;
  a clip by value has no such equivalent and is refused, naming ``'norm'``, on every rank.
- W = 2, ``grad_reduction="none"``: DDP averaged the gradients; Lightning's own clip is exact, by norm and value.
- ``gradient_clip_val`` beside the optimizer's own ``max_grad_norm``: both clips, one after the other (W = 1,
  ``"none"``); refused under ``"mean"``, where both would bound the averaged gradient's norm.

- By norm, also: ``gradient_clip_val`` with a ``configure_gradient_clipping`` that clips on some steps only (one process
  clips those; it was refused under "mean"), a manual clip whose gradient ``opt.zero_grad(set_to_none=False)`` or the
  module's own ``zero_grad(set_to_none=False)`` zeroed before a new backward (one process steps unclipped; both were
  refused under "mean"), and the manual recipe with an optimizer built before the Trainer (its first clip was each
  rank's own under "mean", silently).

An optimizer that never reads ``p.grad`` (EGN, ``StepNeeds.BATCH``) is refused on every rank, before any step (built
before the Trainer too: it trained with the clip ignored, silently); a clip zeroed since is no clip there either.
The W = 2 fits run inside one pair of processes (the process group exists, Lightning's ``"ddp"`` joins it), every
reduction, optimizer and case in turn: Lightning's own launcher forks two processes for each fit.
"""

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_soaa.registry import OptimizerSpec, StepNeeds, half_mse
from tests.conformance._battery import SIZES, SPECS, assert_close, data, params, takes_kwarg
from tests.harness.distributed import run_distributed
from tests.harness.models import tiny_mlp

pl = pytest.importorskip("lightning.pytorch", reason="the [lightning] extra is not installed")

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(900)]  # (the fixture's fits: about a minute at a load of 10)

STEPS = 4
BOUND = {"norm": 0.5, "value": 0.05}  # both bind from the first step on (checked against the unclipped run)
CLIPPED = [s for s in SPECS if s.needs is not StepNeeds.BATCH]
REFUSING = [s for s in SPECS if s.needs is StepNeeds.BATCH]
MAX_GRAD_NORM = 0.3  # the optimizer's own bound beside gradient_clip_val (case "both")
#: where the clip is asked for: the Trainer's gradient_clip_val, the module's configure_gradient_clipping, a manual
#: training_step before opt.step() ("manual") or in the closure it hands opt.step ("closure", which the step runs);
#: "both": gradient_clip_val and the optimizer's max_grad_norm (not for EGN, which has none)
WHERE = ("trainer", "hook", "manual", "closure")
#: by norm only (what each is about holds alike for both algorithms): "some": gradient_clip_val with a
#: configure_gradient_clipping that clips through self.clip_gradients on even steps only (one process clips those);
#: "rezeroed": a manual clip, then opt.zero_grad(set_to_none=False) and a new backward before opt.step() (one process
#: steps on the new gradient, unclipped); "early": the manual recipe with an optimizer built before the Trainer runs
#: (in the module's __init__; configure_optimizers returns it): its first step is clipped like the others;
#: "netzeroed": as "rezeroed", but the module's own zero_grad(set_to_none=False) zeroes (the optimizer never sees it)
LATER = ("some", "rezeroed", "netzeroed", "early")
MANUAL = ("manual", "closure", "rezeroed", "netzeroed", "early")
CASES = [(where, algorithm) for where in WHERE for algorithm in BOUND]
ALL_CASES = [*CASES, ("both", "norm"), *((where, "norm") for where in LATER)]
#: what an optimizer that never reads the gradient refuses (it has no max_grad_norm; "rezeroed" trains, below)
REFUSED_CASES = [*CASES, ("some", "norm"), ("early", "norm")]
BATCH_CASES = [*REFUSED_CASES, ("rezeroed", "norm"), ("netzeroed", "norm")]
LAUNCHES = ("mean", "none")


def _local_gradients(state: object, bucket: torch.distributed.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP communication hook that leaves each rank its own gradient (no averaging). (Annotations are
    evaluated here: DDP checks that ``bucket``'s is ``GradBucket``.)"""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


class _NoAveraging(pl.Callback):
    """Each rank keeps its own gradient (what the optimizer's ``grad_reduction="mean"`` is for)."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        trainer.strategy.model.register_comm_hook(None, _local_gradients)


class _Module(pl.LightningModule):
    """The battery's model and data (rank ``r`` of ``W`` takes its rows of each global batch), ``half_mse``."""

    def __init__(self, spec: OptimizerSpec, where: str, algorithm: str, reduction: str | None) -> None:
        super().__init__()
        self.net = tiny_mlp(0, torch.float64, sizes=SIZES)
        self.spec, self.where, self.algorithm, self.reduction = spec, where, algorithm, reduction
        self.automatic_optimization = where not in MANUAL
        self.early = self._build() if where == "early" else None

    def _build(self) -> Any:
        extra: dict[str, Any] = {"max_grad_norm": MAX_GRAD_NORM} if self.where == "both" else {}
        if self.reduction is not None and takes_kwarg(self.spec, "grad_reduction"):
            extra["grad_reduction"] = self.reduction
        return self.spec.build(self.net, **{**self.spec.test_kwargs, **extra})

    def configure_optimizers(self) -> Any:
        return self.early if self.early is not None else self._build()

    def train_dataloader(self) -> Any:
        steps = [data(t, rank=self.trainer.global_rank, world=self.trainer.world_size) for t in range(STEPS)]
        return torch.utils.data.DataLoader(steps, batch_size=None)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = half_mse(self.net(x), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        batch_kw = {"inputs": x, "targets": y} if self.spec.needs is StepNeeds.BATCH else {}

        def backward_and_clip() -> torch.Tensor:
            opt.zero_grad()
            self.manual_backward(loss)
            self.clip_gradients(opt, gradient_clip_val=BOUND[self.algorithm], gradient_clip_algorithm=self.algorithm)
            return loss.detach()

        if self.where == "closure":  # (the closure runs inside the step: its clip too)
            opt.step(backward_and_clip, **batch_kw)
            return None
        backward_and_clip()
        if self.where in ("rezeroed", "netzeroed"):  # (the clipped gradient is zeroed, the same tensors take a new one)
            (opt if self.where == "rezeroed" else self.net).zero_grad(set_to_none=False)
            self.manual_backward(half_mse(self.net(x), y))
        opt.step(**batch_kw)
        return None


class _ClipsInItsHook(_Module):
    """Clips through ``self.clip_gradients`` in its own ``configure_gradient_clipping`` (no ``gradient_clip_val``):
    Lightning's documented way to choose the clip."""

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        if self.where != "some" or self.trainer.global_step % 2 == 0:
            self.clip_gradients(optimizer, gradient_clip_val=BOUND[self.algorithm],
                                gradient_clip_algorithm=self.algorithm)


def _fit(spec: OptimizerSpec, where: str, algorithm: str, out: Path, world: int = 1,
         reduction: str | None = None) -> list[torch.Tensor] | str:
    """The parameters after ``STEPS`` steps of one fit, or the message of the error it raised."""
    from lightning_soaa.lightning import BatchToOptimizer, LossToOptimizer

    module = (_ClipsInItsHook if where in ("hook", "some") else _Module)(spec, where, algorithm, reduction)
    clip = ({"gradient_clip_val": BOUND[algorithm], "gradient_clip_algorithm": algorithm}
            if where in ("trainer", "both", "some") else {})
    # (under manual optimization the step is handed its batch: EGN's one-process step plan takes it there)
    callbacks = [LossToOptimizer(), *([BatchToOptimizer()] if where not in MANUAL else []),
                 *([_NoAveraging()] if reduction == "mean" else [])]
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
                         max_steps=STEPS, precision="64-true", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         use_distributed_sampler=False, callbacks=callbacks, default_root_dir=str(out), **clip)
    before = params(module.net)
    try:
        trainer.fit(module)
    except Exception as e:  # (a refusal: every rank must raise it, having changed nothing)
        changed = any(not torch.equal(a, b) for a, b in zip(before, params(module.net)))
        return f"{type(e).__name__}: {e}" + (" [and the parameters changed]" if changed else "")
    return params(module.net)


def _reference(spec: OptimizerSpec, algorithm: str | None, also: float | None = None,
               every: int = 1) -> list[torch.Tensor]:
    """One process, the spec's own driver, torch's clip of the full batch's gradient (None: no clip) at every
    ``every``-th step from the first; ``also``: then by that norm too."""
    model = tiny_mlp(0, torch.float64, sizes=SIZES)
    opt = spec.build(model, **spec.test_kwargs)
    steps = iter(range(STEPS))

    def clip() -> None:
        if next(steps) % every:
            return
        if algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(model.parameters(), BOUND["norm"])
        elif algorithm == "value":
            torch.nn.utils.clip_grad_value_(model.parameters(), BOUND["value"])
        if also is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), also)

    for t in range(STEPS):
        spec.take_step(opt, model, *data(t), on_gradients=clip)
    return params(model)


def _launch(rank: int, world: int, out: Path) -> dict[str, dict[tuple[str, str, str], Any]]:
    """Every reduction, optimizer and case in turn, in this pair of processes (Lightning's ``"ddp"`` joins the
    group)."""
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))
    return {f"W2-{reduction}": {(s.name, w, a): _fit(s, w, a, out / f"{reduction}-{s.name}-{w}-{a}", world, reduction)
                                for s in SPECS for w, a in (ALL_CASES if s in CLIPPED else BATCH_CASES)}
            for reduction in LAUNCHES}


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[tuple[str, str, str], Any]]]:
    """Per launch (W = 1 in this process, W = 2 under each reduction), each rank's results."""
    tmp = tmp_path_factory.mktemp("lightning_clip")
    out: dict[str, list[dict[tuple[str, str, str], Any]]] = {
        "W1": [{(s.name, w, a): _fit(s, w, a, tmp / f"{s.name}-{w}-{a}") for s in SPECS
                for w, a in (ALL_CASES if s in CLIPPED else BATCH_CASES)}]}
    ranks = run_distributed(_launch, 2, tmp, tmp / "W2", timeout=300.0)
    return {**out, **{launch: [r[launch] for r in ranks] for launch in ranks[0]}}


@pytest.mark.parametrize("launch", ["W1", *(f"W2-{r}" for r in LAUNCHES)])
@pytest.mark.parametrize("where,algorithm", ALL_CASES, ids=[f"{w}-{a}" for w, a in ALL_CASES])
@pytest.mark.parametrize("spec", CLIPPED, ids=[s.name for s in CLIPPED])
def test_lightning_clip_equals_one_process_clip(spec: OptimizerSpec, where: str, algorithm: str, launch: str,
                                                fits: dict[str, list[dict[tuple[str, str, str], Any]]]) -> None:
    unclipped = _reference(spec, None)
    # the clip binds (a step that clips differs from one that does not)
    assert max(float((a - b).abs().max()) for a, b in zip(_reference(spec, algorithm), unclipped)) > 1e-3
    ref = (unclipped if where in ("rezeroed", "netzeroed") else
           _reference(spec, algorithm, MAX_GRAD_NORM if where == "both" else None, 2 if where == "some" else 1))
    needles = _refusal(where, algorithm, launch)
    for rank, res in enumerate(r[(spec.name, where, algorithm)] for r in fits[launch]):
        if needles:
            assert isinstance(res, str) and all(n in res for n in needles) and not res.endswith("changed]"), (rank, res)
        else:
            assert not isinstance(res, str), f"rank {rank} raised {res}"
            assert_close(res, ref, f"{spec.name} {where} {algorithm} {launch} rank {rank} params")


def _refusal(where: str, algorithm: str, launch: str) -> tuple[str, ...]:
    """What every rank's error says where the case is refused; () where it trains. Under "mean" at W > 1 the clip
    is taken over to the averaged gradient, which has no equivalent of a clip by value, and one bound."""
    if launch != "W2-mean":
        return ()
    if algorithm == "value":
        return "gradient_clip_algorithm='value'", "Must be 'norm'"
    return ("gradient_clip_val=0.5 and", "max_grad_norm are both set") if where == "both" else ()


@pytest.mark.parametrize("launch", ["W1", *(f"W2-{r}" for r in LAUNCHES)])
@pytest.mark.parametrize("where,algorithm", REFUSED_CASES, ids=[f"{w}-{a}" for w, a in REFUSED_CASES])
@pytest.mark.parametrize("spec", REFUSING, ids=[s.name for s in REFUSING])
def test_lightning_clip_is_refused_by_an_optimizer_that_never_reads_the_gradient(
        spec: OptimizerSpec, where: str, algorithm: str, launch: str,
        fits: dict[str, list[dict[tuple[str, str, str], Any]]]) -> None:
    for rank, res in enumerate(fits[launch]):
        message = res[(spec.name, where, algorithm)]
        assert isinstance(message, str) and message.startswith("ValueError: "), (rank, message)
        assert "never" in message and "the gradients" in message and "bound" in message, (rank, message)
        assert not message.endswith("changed]"), (rank, message)


@pytest.mark.parametrize("launch", ["W1", *(f"W2-{r}" for r in LAUNCHES)])
@pytest.mark.parametrize("where", ["rezeroed", "netzeroed"])
@pytest.mark.parametrize("spec", REFUSING, ids=[s.name for s in REFUSING])
def test_a_clip_whose_gradient_was_zeroed_is_no_clip_for_an_optimizer_that_never_reads_it(
        spec: OptimizerSpec, where: str, launch: str, fits: dict[str, list[dict[tuple[str, str, str], Any]]]) -> None:
    """A clip followed by ``zero_grad(set_to_none=False)`` (the optimizer's or the module's) clipped a gradient no
    step takes, in one process too: nothing to refuse."""
    ref = _reference(spec, None)
    for rank, res in enumerate(r[(spec.name, where, "norm")] for r in fits[launch]):
        assert not isinstance(res, str), f"rank {rank} raised {res}"
        assert_close(res, ref, f"{spec.name} {where} {launch} rank {rank} params")
