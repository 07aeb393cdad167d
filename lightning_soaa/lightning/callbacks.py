"""Lightning callbacks that connect a standard LightningModule to SOAA, EGN and every sharded optimizer.

* :class:`LossToOptimizer` hands the training loss to optimizers that use it (SOAA's trust region).
  It listens on ``on_before_backward``, which fires under every precision plugin and under DeepSpeed,
  where no closure reaches ``optimizer.step``.
* :class:`BatchToOptimizer` hands the current batch (and the module) to optimizers that differentiate the
  model themselves (EGN), so ``training_step`` stays unchanged.
* :class:`OptimizerDiagnostics` logs ``optimizer.statistics()`` through ``pl_module.log_dict``, so the
  numbers land in whatever logger the trainer has (CSV, TensorBoard, ...), under the optimizer's
  registry name whatever the strategy.

All three are plain picklable objects (``ddp_spawn`` pickles callbacks to the worker processes).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_soaa.distributed.dtensor import is_dtensor
from lightning_soaa.lightning.factory import (
    check_sharding_matches_world,
    iter_wrapped,
    optimizer_needing,
    unwrap_optimizer,
)
from lightning_soaa.lightning.stepping import optimizer_steps_in_epochs
from lightning_soaa.optim.egn_batches import concat_batches
from lightning_soaa.registry import StepNeeds, spec_of

__all__ = ["LossToOptimizer", "BatchToOptimizer", "OptimizerDiagnostics", "STATIC_STATISTICS", "default_split_batch",
           "optimizer_name"]

log = logging.getLogger(__name__)


def _all_optimizers(trainer: pl.Trainer) -> list[Any]:
    return list(trainer.optimizers)


def _targets(trainer: pl.Trainer, needs: StepNeeds) -> list[Any]:
    """The trainer's optimizers (or the ones they wrap) whose step needs ``needs`` (the loss, the batch)."""
    found = (optimizer_needing(o, needs) for o in _all_optimizers(trainer))
    return [t for t in found if t is not None]


SAME_BATCH_ACCUMULATION_MESSAGE = (
    "SOAA(acceptance='same_batch') with accumulate_grad_batches={k}: the trust region judges each trial step "
    "by re-running Lightning's closure, which re-evaluates only the step's last micro-batch (its loss divided "
    "by {k}), not the mean loss over the {k} micro-batches the step was built from, so steps would be accepted "
    "or rejected on the wrong number. Use SOAA's default acceptance='lagged' (it needs no re-evaluation), or "
    "accumulate_grad_batches=1 with a larger batch."
)

SKIPPED_BATCH_MESSAGE = (
    "training_step returned None (Lightning's way to skip a batch) at epoch {epoch}, batch_idx {batch_idx}, "
    "but {optimizer} cannot skip it: {why} A plain loop would not step on that batch. Leave such batches "
    "out of the data (a sampler or collate_fn), or return a loss."
)


MANUAL_HANDOVERS_MESSAGE = (
    "BatchToOptimizer under manual optimization: {optimizer}.step() without inputs would step on the batch "
    "BatchToOptimizer handed it last (epoch {epoch}, batch_idx {batch_idx}) alone, but it was also handed the "
    "batches of batch_idx {dropped} since its last step and never stepped on them (a step every {n} "
    "training batches: accumulated, or skipped?). It steps on one batch, not on gradients, so it cannot tell. "
    "Pass the step's batch: opt.step(inputs=x, targets=y), the micro-batches concatenated "
    "(lightning_soaa.optim.egn_batches.concat_batches) to accumulate them, or the last batch alone; or step "
    "it at every training batch."
)


DATALOADER_ITER_MESSAGE = (
    "BatchToOptimizer with {optimizer}: {module}.training_step takes a dataloader_iter, so Lightning hands the "
    "callbacks not the step's batch (None at the first, then the batch the previous training_step fetched) and "
    "{optimizer}, which steps on the batch, would step on the wrong one or none. Use manual "
    "optimization (self.automatic_optimization = False) and pass the batch, opt.step(inputs=x, targets=y), or a "
    "training_step(batch, batch_idx)."
)


def _takes_dataloader_iter(pl_module: pl.LightningModule) -> bool:
    """Whether ``training_step`` takes Lightning's ``dataloader_iter`` (Lightning's own test, the same fetcher): the
    callbacks then get ``batch=None`` at the first batch and the batch the previous ``training_step`` fetched after."""
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

    return is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True)


def _batch_list(batches: list[tuple[int, int]], epoch: int, total: int, most: int = 6) -> str:
    """``(epoch, batch_idx)`` pairs as ``[i, j of epoch e, ...]`` for an error message (the epoch named where it is
    not ``epoch``), at most ``most`` of them named: an optimizer left alone for a whole phase of training was
    handed thousands of batches, and the message listed every one. ``total``: how many there were (``batches``
    keeps the first and the last few of them, :data:`_HANDED_KEPT`)."""
    names = [str(i) if e == epoch else f"{i} of epoch {e}" for e, i in batches]
    if total > most:
        names = names[:most // 2] + [f"... ({total} batches)"] + names[-(most - most // 2):]
    return "[" + ", ".join(names) + "]"


#: the hand-overs since a step kept per optimizer for the refusal's message: the first 3 and the last ones (an
#: optimizer never stepped under manual optimization was handed every batch of the fit: a list that only grew)
_HANDED_KEPT = 16


@dataclasses.dataclass
class _Handovers:
    """The training batches handed to one optimizer since its last step, as ``(epoch, batch_idx)``: the first 3
    and the last ones, :data:`_HANDED_KEPT` in all (``kept``), and how many there were (``total``)."""

    kept: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    total: int = 0

    def add(self, at: tuple[int, int]) -> None:
        self.kept.append(at)
        if len(self.kept) > _HANDED_KEPT:
            del self.kept[3]  # (the message names the first 3 and the last 3)
        self.total += 1

    def forget(self, at: tuple[int, int] | None) -> None:
        """Take back the last hand-over where it is ``at``."""
        if self.kept and self.kept[-1] == at:
            self.kept.pop()
            self.total -= 1


def _strategy_accumulates(trainer: pl.Trainer) -> bool:
    """True when the strategy accumulates gradients itself (DeepSpeed): Lightning then calls the optimizer
    step hooks after every micro-batch and the engine decides which of them really step."""
    return bool(getattr(trainer.strategy, "handles_gradient_accumulation", False))


def _engine_boundary(trainer: pl.Trainer) -> Callable[[], bool] | None:
    boundary = getattr(trainer.model, "is_gradient_accumulation_boundary", None)
    return boundary if callable(boundary) else None


def _optimizer_steps_now(trainer: pl.Trainer) -> bool:
    """Whether the optimizer step Lightning is making (``on_before_optimizer_step``) really steps.

    Under DeepSpeed Lightning calls ``engine.step()`` after every micro-batch; only the one at the engine's
    gradient-accumulation boundary steps the optimizer (asked before ``engine.step`` counts the micro-step).
    """
    if not _strategy_accumulates(trainer):
        return True
    boundary = _engine_boundary(trainer)
    return True if boundary is None else bool(boundary())


def _lightning_steps_skipped_batches(trainer: pl.Trainer) -> bool:
    """Whether Lightning still calls ``optimizer.step`` when ``training_step`` returned None.

    It does under every precision plugin except 16-bit AMP with a GradScaler, which skips the step itself
    (``MixedPrecision.optimizer_step``); a torch optimizer then finds no gradients and does nothing, an
    optimizer that steps from the loss or the batch would not."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = trainer.precision_plugin
    return not (isinstance(plugin, MixedPrecision) and plugin.scaler is not None)


def _would_step(trainer: pl.Trainer, target: Any) -> bool:
    """Whether a loss-needing optimizer ``target`` would step without a loss: not where none of its parameters
    holds a gradient (the skipped batch set them to None), which it takes as a step that changes nothing, as
    torch's optimizers do. DeepSpeed's engine keeps the gradients in its own partitions: refused there."""
    if target is None:
        return False
    groups = getattr(target, "param_groups", None)
    if _strategy_accumulates(trainer) or not isinstance(groups, list):
        return True
    return any(getattr(p, "grad", None) is not None for g in groups for p in g.get("params", ()))


def _acceptance(target: Any) -> Any:
    """SOAA's acceptance rule, on SOAA itself or on a DeepSpeed client that will build it."""
    acceptance = getattr(getattr(target, "config", None), "acceptance", None)
    if acceptance is None:
        acceptance = (getattr(target, "hyperparams", None) or {}).get("acceptance")
    return acceptance


def _hand_over(method: Callable[..., None], *values: Any) -> None:
    """Call ``set_loss``/``set_batch`` with ``replace=True`` where it takes it (ours; the DeepSpeed client):
    the callbacks hand over a running value after every micro-batch, each replacing the last on purpose. A
    foreign optimizer declaring ``step_needs`` may have a plain ``set_loss(loss)``."""
    try:
        takes = "replace" in inspect.signature(method).parameters
    except (TypeError, ValueError):  # a builtin or a C method without a signature
        takes = False
    if takes:
        method(*values, replace=True)
    else:
        method(*values)


def _check_flag(name: str, value: Any) -> None:
    # a YAML/CLI "false" is a non-empty string, i.e. true: the opposite of what was asked
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}={value!r}. Must be True or False.")


class _WatchesSteps(Callback):
    """A callback that registers hooks on the optimizers (``_step_hooks``) and removes them when the fit ends:
    the optimizers may outlive the fit (one kept and returned again by the module)."""

    def __init__(self) -> None:
        self._step_hooks: list[Any] = []  # the handles of the hooks it registered on the targets

    def _unwatch_steps(self) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = []

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwatch_steps()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._unwatch_steps()  # Lightning skips teardown after an exception


class _GivesBackSWAScaler(Callback):
    """The ends where a callback that sets the GradScaler aside in SWA's BatchNorm epoch
    (:func:`drop_gradients_in_swa_batch_norm_epoch`) gives it back besides its batch end: the epoch's end (a
    batch the module's ``on_train_batch_start`` ended with -1 has no batch end) and an exception."""

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restore_scaler(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        restore_scaler(trainer)
        super().on_exception(trainer, pl_module, exception)


class LossToOptimizer(_GivesBackSWAScaler, _WatchesSteps):
    """Hand the training loss to every optimizer whose step needs it (``StepNeeds.LOSS`` in the registry: SOAA).

    The loss handed over is the loss of the whole optimizer step: the mean of the losses of the
    micro-batches that went into it. Under automatic optimization Lightning backpropagates ``loss_i / k``
    for each micro-batch (``k = accumulate_grad_batches``, also on an epoch's last, shorter window); this
    callback sums those and multiplies by ``k / n`` for the ``n`` micro-batches actually in the window.
    Under DeepSpeed, which accumulates itself, the window is the engine's (it restarts where the engine
    steps the optimizer). Under manual optimization the sum of the step's ``manual_backward`` losses is
    handed over (the user scales those). Under 16-bit AMP the hook receives the scaled loss; it is
    unscaled here. The value is handed over after every backward (so it is in place however the optimizer
    is stepped) and the running sum restarts once the optimizer step begins.

    Under default precision Lightning's closure also reaches ``optimizer.step(closure)``; without gradient
    accumulation the closure's loss and the handed-over loss are the same number, so nothing is counted
    twice (SOAA keeps one value per step). With ``accumulate_grad_batches=k > 1`` Lightning's closure
    returns ``loss_k / k``; ``SOAA.step(closure)`` then keeps the mean handed over during the closure
    call, which takes precedence over the closure's return value.

    Refused with a ``ValueError``: ``SOAA(acceptance="same_batch")`` under gradient accumulation (its
    re-evaluation through Lightning's closure sees only the last micro-batch; at the start of fit, on every
    rank: the settings are the same everywhere), and an optimizer step none of whose micro-batches had a
    loss (``training_step`` returned None, which Lightning allows only in a single process) where Lightning
    would still step the optimizer.

    Args:
        check_sharding: raise if one of our optimizers was handed a single-process communicator
            (``comm=LocalComm()``) while ``torch.distributed`` runs W > 1 ranks (one built before the process
            group existed joins it at its first step; see
            :func:`~lightning_soaa.lightning.factory.check_sharding_matches_world`).
    """

    def __init__(self, check_sharding: bool = True) -> None:
        super().__init__()  # _step_hooks: the targets' step post-hooks and gradient hooks (see _watch_steps)
        _check_flag("check_sharding", check_sharding)
        self.check_sharding = check_sharding
        self._sum: torch.Tensor | None = None
        self._count = 0  # backward calls summed into _sum (micro-batches, under automatic optimization)
        self._restart = True
        self._checked_k: int | None = None  # accumulate_grad_batches the same_batch check last saw
        self._grads: dict[int, _GradRecord] = {}  # per target, what its gradients hold (see _attributed)
        self._targets_of: dict[int, list[int]] = {}  # parameter id -> the targets holding it (_watch_grads)
        self._touched: set[int] = set()  # the targets the backward under way reached
        self._value: torch.Tensor | None = None  # the loss of the backward under way

    def _check_accumulation(self, trainer: pl.Trainer) -> None:
        """Refuse what the step loss cannot be right for under ``accumulate_grad_batches=k`` (k may change
        per epoch through ``GradientAccumulationScheduler``, so this runs again when it does)."""
        k = int(trainer.accumulate_grad_batches)
        if k == self._checked_k:
            return
        targets = _targets(trainer, StepNeeds.LOSS)
        if k > 1 and any(_acceptance(t) == "same_batch" for t in targets):
            raise ValueError(SAME_BATCH_ACCUMULATION_MESSAGE.format(k=k))
        if k > 1 and targets and _strategy_accumulates(trainer) and _engine_boundary(trainer) is None:
            raise ValueError(
                f"LossToOptimizer: {type(trainer.strategy).__name__} accumulates gradients itself but its model "
                "has no is_gradient_accumulation_boundary(), so the callback cannot tell which micro-batches "
                f"make one optimizer step; use accumulate_grad_batches=1 (it is {k})."
            )
        self._checked_k = k

    def _watch_steps(self, targets: list[Any]) -> None:
        """Restart the running sum after every step of a target, also one Lightning does not see: under
        manual optimization ``self.optimizers(use_pl_optimizer=False).step()`` never reaches
        ``on_before_optimizer_step``, and the sum ran on over the whole fit (step t was judged by the sum of
        the losses of steps 1..t: 4.8e-3 off the plain loop after 12 steps). A post-hook, not a pre-hook:
        Lightning's closure runs the step's last backward inside ``step()``."""
        self._unwatch_steps()
        for target in targets:
            register = getattr(target, "register_step_post_hook", None)
            if register is not None:
                self._step_hooks.append(register(self._after_step))

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._restart = True
        rec = self._grads.get(id(optimizer))
        if rec is not None:  # what it stepped on stays in its gradients until they are zeroed
            rec.state = _grad_state(optimizer)

    def _watch_grads(self, targets: list[Any]) -> None:
        """Under manual optimization with several optimizers: which targets each backward reaches, from
        the parameters' post-accumulate-grad hooks (a DTensor's, whose gradient FSDP2 writes without
        autograd's accumulation, from its record instead). Versions alone are not enough: DDP's bucket
        views share one version counter, so a backward into one optimizer's gradients changed another's."""
        self._targets_of = {}
        for target in targets:
            for group in target.param_groups:
                for p in group["params"]:
                    if not p.requires_grad or is_dtensor(p):
                        continue
                    if id(p) not in self._targets_of:
                        self._targets_of[id(p)] = []
                        self._step_hooks.append(p.register_post_accumulate_grad_hook(self._reached))
                    self._targets_of[id(p)].append(id(target))

    def _reached(self, param: torch.Tensor) -> None:
        self._touched.update(self._targets_of.get(id(param), ()))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sum, self._count, self._restart, self._checked_k = None, 0, True, None
        self._grads = {}
        self._watch_steps(_targets(trainer, StepNeeds.LOSS))
        if not _attributed(trainer, pl_module):
            self._watch_grads(_targets(trainer, StepNeeds.LOSS))
        if self.check_sharding:
            for opt in _all_optimizers(trainer):
                check_sharding_matches_world(opt)
        if not _targets(trainer, StepNeeds.LOSS):
            log.info("LossToOptimizer: no optimizer with set_loss(); the callback does nothing.")
        self._check_accumulation(trainer)
        refuse_swa_batch_norm_epoch(trainer, pl_module, StepNeeds.LOSS)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._check_accumulation(trainer)
        drop_gradients_in_swa_batch_norm_epoch(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        restore_scaler(trainer)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        value = loss.detach()
        if value.dtype in (torch.float16, torch.bfloat16):  # sum micro-batch losses in float32 at least
            value = value.float()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and hasattr(scaler, "get_scale"):
            value = value / scaler.get_scale()
        if self._restart or self._sum is None:
            self._sum, self._count, self._restart = value, 1, False
        else:
            self._sum, self._count = self._sum + value, self._count + 1
        step_loss = self._sum
        if pl_module.automatic_optimization:
            # Lightning divided each micro-batch's loss by k, also in a window of n < k micro-batches (an
            # epoch's last): the mean over the window is the sum times k / n.
            k = int(trainer.accumulate_grad_batches)
            if k != self._count:
                step_loss = self._sum * (k / self._count)
        if _attributed(trainer, pl_module):
            for target in _targets(trainer, StepNeeds.LOSS):
                _hand_over(target.set_loss, step_loss)
            return
        self._value = value
        self._touched = set()
        for target in _targets(trainer, StepNeeds.LOSS):
            rec = self._grads.setdefault(id(target), _GradRecord())
            now = _grad_state(target)
            # changed since we last looked: zeroed (set to None, or zero_grad(set_to_none=False)), or changed
            # in place by something else (clip_grad_norm_, nan_to_num_), which keeps what they hold
            if now != rec.state and _zeroed(target):
                rec.contributions = 0
            rec.state = now

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _attributed(trainer, pl_module):
            return
        for target in _targets(trainer, StepNeeds.LOSS):
            rec = self._grads.setdefault(id(target), _GradRecord())
            now = _grad_state(target)
            if id(target) in self._touched or _unhooked_changed(target, self._targets_of, now, rec.state):
                rec.contributions += 1
                rec.loss, rec.handed = self._value, False
            rec.state = now

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        if not _optimizer_steps_now(trainer):
            return  # DeepSpeed: this micro-batch only accumulates; the window goes on
        if (self._restart and pl_module.automatic_optimization and _lightning_steps_skipped_batches(trainer)
                and _would_step(trainer, optimizer_needing(optimizer, StepNeeds.LOSS))):
            # Raised inside optimizer.step's closure: SOAA raises it before changing anything. (Lightning
            # itself refuses a None from training_step when W > 1, so this is a single process.)
            raise ValueError(SKIPPED_BATCH_MESSAGE.format(
                epoch=trainer.current_epoch, batch_idx=_batch_idx(trainer), optimizer=optimizer_name(optimizer),
                why="its step needs the step's loss (the trust region), no micro-batch of this step handed "
                    "one over, and Lightning still calls optimizer.step(closure) under this precision."))
        target = optimizer_needing(optimizer, StepNeeds.LOSS)
        rec = None if target is None else self._grads.get(id(target))
        if target is not None and rec is not None and rec.contributions == 1 and not rec.handed \
                and not _attributed(trainer, pl_module):
            # its gradients hold one manual_backward since they were last zeroed: that loss is its step's
            # (once: a second step without a new backward has no loss of its own)
            _hand_over(target.set_loss, rec.loss)
            rec.handed = True
        # The next backward belongs to the next optimizer step (or to a re-evaluation of this batch,
        # whose loss then replaces, not adds to, the one handed over).
        self._restart = True


@dataclasses.dataclass
class _GradRecord:
    """What one optimizer's gradients hold, under manual optimization with several optimizers: how many
    backwards reached them since they were last zeroed, the loss of the last, and their state then."""

    state: tuple[Any, ...] | None = None
    contributions: int = 0
    loss: torch.Tensor | None = None
    handed: bool = False


def _grad_state(optimizer: Any) -> tuple[Any, ...]:
    """Each parameter's gradient by identity and version: a backward that reaches it, an in-place change
    and setting it to None change this; nothing else of ours does. Under FSDP2 a backward adds into a
    DTensor gradient's local shard in place, which the DTensor's own version does not show."""
    out: list[Any] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is None:
                out.append(None)
                continue
            local = getattr(g, "_local_tensor", None)
            out.append((id(g), g._version) if local is None else (id(g), g._version, id(local), local._version))
    return tuple(out)


def _unhooked_changed(optimizer: Any, hooked: dict[int, list[int]], now: tuple[Any, ...],
                      before: tuple[Any, ...] | None) -> bool:
    """Whether the record of a parameter without a post-accumulate-grad hook changed: a DTensor (FSDP2
    writes its gradient itself: no hook fires for it), or one frozen when the fit began and unfrozen since."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if before is None or len(before) != len(now):
        return any(id(p) not in hooked and p.grad is not None for p in params)
    return any(id(p) not in hooked and a != b for p, a, b in zip(params, now, before))


def _zeroed(optimizer: Any) -> bool:
    """Whether every gradient of ``optimizer`` is None or zero (one host read where some are tensors)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return True
    local = [getattr(g, "_local_tensor", g).detach() for g in grads]  # a DTensor's shard: no collective
    peaks = torch._foreach_norm(local, float("inf"))
    dev = peaks[0].device
    return not bool(torch.stack([(x != 0).to(dev) for x in peaks]).any())  # NaN != 0: not zeroed


def _attributed(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether every loss handed over belongs to every optimizer that needs one: under automatic
    optimization (one optimizer), and under manual optimization with one optimizer in all. With several
    (a GAN's two SOAA, or a SOAA beside a gradient-only optimizer) a loss goes only to an optimizer whose
    gradients hold exactly one backward since they were last zeroed, and it is that backward's loss
    (``zero_grad`` or ``toggle_optimizer`` before each optimizer's own backward, then its step; or one loss,
    then both steps); otherwise the optimizer needs ``step(loss=...)`` and raises saying so. A count of the
    backwards since any optimizer's step judged a SOAA on losses its gradients did not come from (both
    backwards first; a SOAA stepped every k batches; a second backward into gradients not zeroed): see
    tests/lightning/test_callbacks.py."""
    return pl_module.automatic_optimization or len(_all_optimizers(trainer)) < 2


def refuse_swa_batch_norm_epoch(trainer: pl.Trainer, pl_module: pl.LightningModule, needs: StepNeeds) -> None:
    """Refuse Lightning's ``StochasticWeightAveraging`` on a model with BatchNorm for an optimizer that
    steps from the loss or the batch. SWA then adds an epoch after the last that recomputes the BatchNorm
    statistics with forwards only (``fit_loop._skip_backward``) and Lightning still calls
    ``optimizer.step()`` in it: SOAA/EGN refused that step as a skipped batch, after the whole run, with
    the BatchNorm layers left in SWA's reset state and the fit's result lost. Refused at the start of fit
    instead (the same settings on every rank), where the run reaches that epoch (SWA adds it only with
    ``max_epochs`` set; ``max_steps`` may end the run first)."""
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    swa = [c for c in trainer.callbacks if isinstance(c, StochasticWeightAveraging)]  # type: ignore[attr-defined]
    targets = _targets(trainer, needs)
    if swa and targets and StochasticWeightAveraging.pl_module_contains_batch_norm(pl_module) \
            and _reaches_last_epoch(trainer):
        raise ValueError(
            f"StochasticWeightAveraging on a model with BatchNorm layers and {optimizer_name(targets[0])}: after "
            "the last epoch Lightning runs one more epoch that recomputes the BatchNorm statistics with forward "
            f"passes only and still calls optimizer.step() in it; {optimizer_name(targets[0])} steps from the "
            f"step's {'loss' if needs is StepNeeds.LOSS else 'batch'}, not from gradients, and cannot take those "
            "steps. Average the weights with Lightning's EMAWeightAveraging/WeightAveraging callback, or with "
            "torch.optim.swa_utils (AveragedModel, then update_bn) after fit.")


def drop_gradients_in_swa_batch_norm_epoch(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """In the epoch Lightning's ``StochasticWeightAveraging`` adds after the last on a model with BatchNorm (it
    copies the averaged weights into the model and recomputes the statistics with forwards only:
    ``fit_loop._skip_backward``, no ``zero_grad`` and no backward), drop the optimizers' gradients before each
    batch. Lightning still steps the optimizer at that epoch's end, on the gradients the fit's last step left:
    that step moved the averaged weights away from the statistics just computed for them (measured: up to 8.7e-3
    on a tiny MLP under SWALR's lr 1e-3, for torch's SGD and AdamW alike, our ASGO, DASGO and AdamW). Without
    gradients it changes nothing, for every optimizer, as ``torch.optim.swa_utils.update_bn`` steps nothing.
    (SOAA and EGN, which step from the loss or the batch, are refused before such a fit.) Every rank runs
    that epoch: the optimizers' steps without any gradient agree on it. Under a GradScaler ("16-mixed") the
    precision plugin's scaler is set aside for the batch (:func:`_set_scaler_aside`). Under automatic optimization
    only, the one ``_skip_backward`` acts on: under manual optimization that epoch runs the user's own backwards
    and steps, and gradients dropped there were ones the user's loop had accumulated over earlier batches (a
    diagnostics callback changed the weights by 2.9e-2 with SGD stepping every 2 batches)."""
    if not getattr(trainer.fit_loop, "_skip_backward", False) or not pl_module.automatic_optimization:
        return
    for opt in _all_optimizers(trainer):
        opt.zero_grad(set_to_none=True)
    _set_scaler_aside(trainer)


#: where the precision plugin's GradScaler waits while a batch of SWA's BatchNorm epoch runs without it
_SCALER_ASIDE = "_lightning_soaa_swa_scaler"


def _set_scaler_aside(trainer: pl.Trainer) -> None:
    """Take the precision plugin's GradScaler off it until the batch ends (:func:`restore_scaler`). Its
    ``step`` asserts that an optimizer it steps had gradients ("No inf checks were recorded for this
    optimizer.", torch's optimizers and ours alike; ours under its contract at ``update()``): with the
    gradients dropped, the fit failed at that epoch's end, after the whole run. Without the scaler Lightning
    steps the optimizer as under bf16 (nothing to unscale, no backward in that epoch), and the scaler's scale
    stays as the fit's last step left it."""
    plugin = getattr(trainer, "precision_plugin", None)
    scaler = getattr(plugin, "scaler", None)
    if scaler is not None and _SCALER_ASIDE not in plugin.__dict__:
        plugin.__dict__[_SCALER_ASIDE] = scaler
        plugin.scaler = None  # type: ignore[union-attr]


def restore_scaler(trainer: pl.Trainer) -> None:
    """Give the precision plugin back the GradScaler :func:`_set_scaler_aside` took (at each batch's and epoch's
    end, before a ModelCheckpoint, which Lightning runs last, saves the scaler's state; and after an exception)."""
    plugin = getattr(trainer, "precision_plugin", None)
    scaler = None if plugin is None else plugin.__dict__.pop(_SCALER_ASIDE, None)
    if scaler is not None:
        plugin.scaler = scaler  # type: ignore[union-attr]


def refuse_pruning_during_fit(trainer: pl.Trainer) -> None:
    """Refuse Lightning's ``ModelPruning`` with an optimizer that steps from the batch (EGN). Its pruning,
    at an epoch's end, re-registers each pruned weight as ``weight_orig`` and computes ``weight`` from it;
    EGN's capture plan is made for the Parameters it was built with and refused the first step after it
    (after a whole epoch). Refused at the start of fit instead (the same callbacks on every rank)."""
    from lightning.pytorch.callbacks import ModelPruning

    targets = _targets(trainer, StepNeeds.BATCH)
    if targets and any(isinstance(c, ModelPruning) for c in trainer.callbacks):  # type: ignore[attr-defined]
        raise ValueError(
            f"ModelPruning with {optimizer_name(targets[0])}: the callback prunes during fit (at an epoch's end), "
            "re-registering each pruned weight as 'weight_orig' with a mask, and "
            f"{optimizer_name(targets[0])} plans its Jacobians for the Parameters it was built with, so it "
            "would refuse its first step after the pruning. Prune the model with torch.nn.utils.prune before "
            "configure_optimizers builds the optimizer (the pruned layers' Jacobians are then taken "
            "explicitly), or train with another optimizer.")


def _reaches_last_epoch(trainer: pl.Trainer) -> bool:
    """Whether the fit runs into its last epoch (the one SWA added for BatchNorm), judged from its limits:
    ``max_epochs`` set, and ``max_steps`` unset or beyond the optimizer steps of the epochs before (counted with
    the accumulation schedule's ``k`` of each epoch:
    :func:`~lightning_soaa.lightning.stepping.optimizer_steps_in_epochs`)."""
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs == -1:
        return False
    if trainer.max_steps == -1:
        return True
    # the steps of the epochs before it, with the k a GradientAccumulationScheduler sets in each (it is 1 here,
    # before the first epoch: a fit accumulating 4 from epoch 0 reached the last epoch unrefused)
    before = optimizer_steps_in_epochs(trainer, max_epochs - 1, trainer.num_training_batches)
    return math.isfinite(before) and trainer.max_steps > before  # an epoch without end never reaches it


def _batch_idx(trainer: pl.Trainer) -> int:
    return int(trainer.fit_loop.epoch_loop.batch_idx)


#: why a batch with more than inputs and targets is refused rather than split by position or key
_EXTRAS = ("EGN calls the module as model(inputs) and minimises its own loss of (outputs, targets), so the rest "
           "(a mask or second input the forward takes, per-sample weights) would be dropped silently")


def default_split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` from an ``(x, y)`` tuple/list or a dict of exactly ``inputs``/``targets`` (or
    ``x``/``y``, ``input``/``target``) keys. A batch holding more is refused: which of its other elements the
    user's ``training_step`` feeds the forward or the loss cannot be told from the batch (an ``(x, y, mask)``
    batch trained the unmasked model, silently)."""
    fix = ("pass split_batch=<picklable function batch -> (inputs, targets)>; inputs may be a tuple of the "
           "forward's arguments")
    if isinstance(batch, dict):
        for ki, kt in (("inputs", "targets"), ("x", "y"), ("input", "target")):
            if ki in batch and kt in batch:
                if len(batch) > 2:
                    raise ValueError(
                        f"BatchToOptimizer: the batch dict has keys {sorted(batch)}; the default split takes "
                        f"{ki!r}/{kt!r} only from a dict of those two keys: {_EXTRAS}. {fix[0].upper()}{fix[1:]}."
                    )
                return batch[ki], batch[kt]
        raise ValueError(
            f"BatchToOptimizer: cannot find inputs/targets in a batch dict with keys {sorted(batch)}; {fix}."
        )
    if isinstance(batch, (tuple, list)) and len(batch) > 2:
        raise ValueError(
            f"BatchToOptimizer: the batch is a {type(batch).__name__} of {len(batch)} elements; the default split "
            f"takes (inputs, targets) only from one of 2: {_EXTRAS}. {fix[0].upper()}{fix[1:]} (a function "
            "returning (batch[0], batch[1]) where the rest is an index EGN may ignore)."
        )
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        f"BatchToOptimizer: cannot split a batch of type {type(batch).__name__} into (inputs, targets); pass "
        "split_batch=<picklable function batch -> (inputs, targets)>."
    )


def check_trainer_supports_batch_optimizer(trainer: pl.Trainer) -> None:
    """Refuse Trainer settings that an optimizer stepping from the batch (EGN) would silently ignore.

    EGN builds its step from the model and the batch handed over by :class:`BatchToOptimizer`, never
    from ``p.grad`` and outside the Trainer's autocast: gradient clipping (``gradient_clip_val``, or the
    module's own ``configure_gradient_clipping``) and mixed precision would not act on its step.
    (Gradient accumulation is honoured: the callback hands over all micro-batches of the step.) The
    settings and the module's class are the same on every rank, so every rank raises together, before
    the first step.
    """
    problems = []
    clip = getattr(trainer, "gradient_clip_val", None)
    if clip:
        problems.append(f"gradient_clip_val={clip} (EGN never reads the gradients; bound its step with lr, "
                        "damping or line_search=True)")
    module = getattr(trainer, "lightning_module", None)
    # Lightning calls this hook at every automatic step whatever gradient_clip_val says
    if module is not None and module.automatic_optimization and is_overridden(
            "configure_gradient_clipping", module, pl.LightningModule):
        problems.append(f"{type(module).__name__}.configure_gradient_clipping (EGN never reads the gradients it "
                        "would clip; bound its step with lr, damping or line_search=True, and remove the override)")
    precision = str(getattr(trainer, "precision", ""))
    if precision.endswith("-mixed"):
        problems.append(f"precision={precision!r} (EGN's own forwards do not run under the Trainer's "
                        "autocast; use '32-true', '64-true' or 'bf16-true')")
    if problems:
        raise ValueError("EGN (via BatchToOptimizer) does not support these Trainer settings: "
                         + "; ".join(problems) + ".")


class BatchToOptimizer(_WatchesSteps):
    """Hand the current batch to every optimizer whose step needs it (``StepNeeds.BATCH``: EGN).

    EGN forms per-sample Jacobians of the model outputs itself, so it needs the inputs and targets of
    the mini-batch, not only the gradient. With this callback a user switches ``configure_optimizers``
    to ``EGN(self, loss=...)`` and keeps ``training_step`` unchanged: before each batch the callback
    calls ``optimizer.set_batch(inputs, targets)`` and EGN's ``step(closure)`` then works from it.

    Under ``accumulate_grad_batches=k`` the batch handed over is the concatenation of the step's
    micro-batches so far, so the step sees all k of them: the exact Gauss-Newton step of the
    accumulated batch (its Gram matrix is k² times larger). Gradient clipping and mixed precision,
    which EGN would ignore, are refused (:func:`check_trainer_supports_batch_optimizer`). So is a batch
    whose ``training_step`` returned None (Lightning's "skip this batch"): EGN already holds it and would
    step on it (a ``ValueError`` before that step, or before a later step the micro-batch would go into).
    Under manual optimization each training batch is handed over alone, replacing the last; a ``step()``
    without inputs after several training batches without a step is refused (``ValueError``, before the
    step): it would step on the last of them alone. Pass ``step(inputs=..., targets=...)`` there. A
    ``training_step(dataloader_iter)`` gives the callbacks not its batch: nothing is handed over (manual optimization
    passes the batch to ``step``), and under automatic optimization the fit is refused at its start.

    Args:
        split_batch: ``batch -> (inputs, targets)``; must be picklable (a module-level function) for
            ``ddp_spawn``. Default: :func:`default_split_batch`.
    """

    def __init__(self, split_batch: Callable[[Any], tuple[Any, Any]] | None = None) -> None:
        super().__init__()  # _step_hooks: the targets' step hooks (manual optimization, see _watch_steps)
        self.split_batch = split_batch or default_split_batch
        self._window: list[tuple[Any, Any]] = []  # the micro-batches of the current accumulation window
        self._backward_seen = False  # the current micro-batch's training_step returned a loss
        self._manual = False  # the fit runs under manual optimization
        self._handed: dict[int, _Handovers] = {}  # per target: the batches handed over since its step
        self._last_inputs: dict[int, Any] = {}  # per target: the inputs it was handed last
        self._no_batch = False  # training_step takes a dataloader_iter: the hooks get None or the previous batch
        self._unrun: tuple[int, int] | None = None  # (epoch, batch_idx) handed over, its training_step not run yet

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fit resumed inside an accumulation window (batch_idx % k != 0) starts no window of its own: one kept
        # from an earlier fit of this instance (stopped inside a window) went into its first step.
        self._window = []
        for opt in _all_optimizers(trainer):
            check_sharding_matches_world(opt)
            if unwrap_optimizer(opt, "set_batch") is not None:
                check_trainer_supports_batch_optimizer(trainer)
        refuse_swa_batch_norm_epoch(trainer, pl_module, StepNeeds.BATCH)
        refuse_pruning_during_fit(trainer)
        targets = _targets(trainer, StepNeeds.BATCH)
        self._no_batch = _takes_dataloader_iter(pl_module)
        if targets and self._no_batch and pl_module.automatic_optimization:
            raise ValueError(DATALOADER_ITER_MESSAGE.format(optimizer=optimizer_name(targets[0]),
                                                            module=type(pl_module).__name__))
        self._manual, self._handed, self._last_inputs = not pl_module.automatic_optimization, {}, {}
        self._unrun = None
        self._unwatch_steps()
        if self._manual and not _strategy_accumulates(trainer):
            self._watch_steps(targets)

    def _watch_steps(self, targets: list[Any]) -> None:
        """Under manual optimization the user decides when the optimizer steps, and a hand-over replaces the
        last: stepped every k training batches it stepped on the k-th batch alone (the others dropped
        silently: 0.16 off the step on all of them after 6 steps). Its steps are watched to refuse that."""
        for target in targets:
            pre = getattr(target, "register_step_pre_hook", None)
            post = getattr(target, "register_step_post_hook", None)
            if pre is not None and post is not None and hasattr(target, "_pending_batch"):  # EGN's own
                self._handed[id(target)] = _Handovers()
                self._step_hooks += [pre(self._before_step), post(self._after_step)]

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        handed = self._handed.get(id(optimizer), _Handovers())
        pending = getattr(optimizer, "_pending_batch", None)
        ours = pending is not None and pending[0] is self._last_inputs.get(id(optimizer))  # not the user's set_batch
        if kwargs.get("inputs") is not None or kwargs.get("targets") is not None or not ours or len(handed.kept) < 2:
            return  # the user's own batch, or the one training batch handed over since the last step
        (epoch, batch_idx), before = handed.kept[-1], handed.kept[:-1]
        raise ValueError(MANUAL_HANDOVERS_MESSAGE.format(
            optimizer=optimizer_name(optimizer), epoch=epoch, batch_idx=batch_idx,
            dropped=_batch_list(before, epoch=epoch, total=handed.total - 1), n=handed.total))

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if id(optimizer) in self._handed:
            self._handed[id(optimizer)], self._last_inputs[id(optimizer)] = _Handovers(), None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._backward_seen = False
        self._forget_unrun_batch()
        targets_opts = _targets(trainer, StepNeeds.BATCH)
        if not targets_opts or self._no_batch:
            return  # (a training_step of manual optimization that takes a dataloader_iter hands over its batches)
        inputs, targets = self.split_batch(batch)
        k = int(trainer.accumulate_grad_batches)
        if k > 1:
            # Lightning steps after micro-batches with (batch_idx + 1) % k == 0 and after an epoch's last
            # batch, and batch_idx restarts every epoch: a window starts where batch_idx % k == 0.
            if batch_idx % k == 0:
                self._window = []
            self._window.append((inputs, targets))
            inputs, targets = concat_batches(self._window)
        for opt in targets_opts:
            _hand_over(opt.set_batch, inputs, targets)
            if id(opt) in self._handed:
                self._handed[id(opt)].add((trainer.current_epoch, batch_idx))
                self._last_inputs[id(opt)] = inputs
                self._unrun = (trainer.current_epoch, batch_idx)

    def _forget_unrun_batch(self) -> None:
        """Drop the last hand-over from the batches counted since a step when that batch's training never ran:
        a module's ``on_train_batch_start`` returning -1 (skip the rest of the epoch) runs after this callback's
        hook, and the next epoch's first step (on its own batch, stepping every batch) was refused for it."""
        for handed in self._handed.values():
            handed.forget(self._unrun)
        self._unrun = None

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: torch.Tensor) -> None:
        self._backward_seen = True

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        # Inside optimizer.step's closure, after training_step: EGN already holds this batch and would step
        # on it. Raised here (a single process: Lightning refuses None when W > 1), EGN raises it before
        # changing anything.
        self._refuse_skipped_batch(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._unrun = None  # its training_step ran (the batch counts, see _forget_unrun_batch)
        # A skipped micro-batch inside an accumulation window (no step yet) would go into the next step's
        # concatenated batch.
        self._refuse_skipped_batch(trainer, pl_module)

    def _refuse_skipped_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._backward_seen or not pl_module.automatic_optimization:
            return  # manual optimization hands EGN its batch in training_step, with no backward at all
        targets_opts = _targets(trainer, StepNeeds.BATCH)
        if targets_opts and _lightning_steps_skipped_batches(trainer):
            raise ValueError(SKIPPED_BATCH_MESSAGE.format(
                epoch=trainer.current_epoch, batch_idx=_batch_idx(trainer),
                optimizer=optimizer_name(targets_opts[0]),
                why="it steps on the batch BatchToOptimizer handed it before training_step ran (with the "
                    "other micro-batches of the step under gradient accumulation), not on the gradients."))


#: statistics that are fixed for a fit (the sharding layout): logged once per fit, not in every row
STATIC_STATISTICS = frozenset({"world_size", "owned_blocks", "ownership_balance"})


def optimizer_name(optimizer: Any) -> str:
    """The name of the optimizer behind the wrappers: the registry name for ours (``SOAA``, ``AdamW``,
    the same under DDP and DeepSpeed, where the engine holds a client that wraps it), else the class
    name of the innermost optimizer with ``statistics()``, else of ``optimizer`` itself."""
    for obj in iter_wrapped(optimizer):
        inner = getattr(obj, "optimizer_cls", None)  # a DeepSpeed client stands for the class it wraps
        spec = spec_of(inner if isinstance(inner, type) else type(obj))
        if spec is not None:
            return spec.name
    return type(unwrap_optimizer(optimizer, "statistics") or optimizer).__name__



def _prefixes(optimizers: list[Any]) -> list[str]:
    """Log-key prefix per optimizer (:func:`optimizer_name`, numbered when two share one)."""
    names = [optimizer_name(opt) for opt in optimizers]
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


class OptimizerDiagnostics(_GivesBackSWAScaler):
    """Log each optimizer's ``statistics()`` (and learning rates) through ``pl_module.log_dict``.

    Keys are ``"<optimizer>/<statistic>"`` with the optimizer's registry name (:func:`optimizer_name`),
    e.g. ``SOAA/d``, ``EGN/damping``, ``AdamW/comm_bytes`` (bytes this rank sent into collectives during
    the last step): the same keys under DDP, DeepSpeed and a single process, so a dashboard survives a
    change of strategy. Values are rank 0's view (every rank takes the same global decisions;
    communication counts are per rank). Collected and logged at the trainer's logging steps (every
    ``log_every_n_steps`` optimizer steps: the only ones whose values reach a logger), except
    :data:`STATIC_STATISTICS` (``world_size``, ``owned_blocks``, ...), which are fixed for a fit and go
    to the trainer's loggers once, at the first logging step.

    Args:
        include_lr: also log ``<name>/lr`` (group 0) and ``<name>/lr_<i>`` for further groups.
        every_n_steps: compute the statistics only every n optimizer steps.
    """

    def __init__(self, include_lr: bool = True, every_n_steps: int = 1) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"Invalid every_n_steps={every_n_steps!r}. Must be an integer >= 1.")
        _check_flag("include_lr", include_lr)
        self.include_lr = include_lr
        self.every_n_steps = every_n_steps
        self._static_logged = False

    def collect(self, trainer: pl.Trainer) -> dict[str, float]:
        """The flat ``{key: float}`` dict of everything the optimizers report now (static keys included)."""
        optimizers = _all_optimizers(trainer)
        out: dict[str, float] = {}
        for prefix, opt in zip(_prefixes(optimizers), optimizers):
            src = unwrap_optimizer(opt, "statistics")
            if src is not None:
                for k, v in src.statistics().items():
                    if isinstance(v, bool):
                        v = float(v)
                    if isinstance(v, (int, float)) and math.isfinite(float(v)):
                        out[f"{prefix}/{k}"] = float(v)
            if self.include_lr:
                base = unwrap_optimizer(opt, "param_groups") or opt
                for gi, group in enumerate(getattr(base, "param_groups", [])):
                    if "lr" in group:
                        out[f"{prefix}/lr" if gi == 0 else f"{prefix}/lr_{gi}"] = float(group["lr"])
        return out

    @staticmethod
    def is_static(key: str) -> bool:
        return key.rpartition("/")[2] in STATIC_STATISTICS

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._static_logged = False  # once per fit (a resumed fit may have another world size)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        drop_gradients_in_swa_batch_norm_epoch(trainer, pl_module)  # (also here: ASGO/AdamW need no LossToOptimizer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        restore_scaler(trainer)
        if trainer.global_step == 0 or trainer.global_step % self.every_n_steps:
            return
        # Lightning writes logged values to the loggers only at its logging steps (log_every_n_steps);
        # logging at the others costs as much (~0.3 ms a value: its log() moves every value's state) for
        # nothing a logger sees: for SOAA's ~20 values ~6 ms a step, 20x its optimizer step on a small
        # model. (The same check as Lightning's LearningRateMonitor.)
        if not trainer._logger_connector.should_update_logs:
            return
        stats = self.collect(trainer)
        static = {k: v for k, v in stats.items() if self.is_static(k)}
        if static and not self._static_logged:
            self._static_logged = True
            if trainer.is_global_zero:  # straight to the loggers: Lightning's log_dict would drop a
                for logger in trainer.loggers:  # value logged at a step that is not a logging step
                    logger.log_metrics(static, step=trainer.global_step)
        per_step = {k: v for k, v in stats.items() if not self.is_static(k)}
        if per_step:
            # on_step only: these are per-step quantities; averaging them over an epoch would mislead.
            pl_module.log_dict(per_step, on_step=True, on_epoch=False, sync_dist=False, rank_zero_only=True,
                               batch_size=1)
