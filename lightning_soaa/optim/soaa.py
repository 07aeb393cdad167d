"""SOAA: Adam with a diagonal-Fisher cap and an adaptive trust-region multiplier, ZeRO-sharded.

Collectives per step (every rank, same order): with ``acceptance="lagged"`` exactly **one**
``all_reduce_scalars`` of 9 float64 values (plus the base's agreement rows, and its parameter all-gather
when sharded)::

    [nonfinite flag, ranks with a gradient, Σm̂², Σ(v̂+ε), lagged η·Σm̂u, lagged η·Σv̂u², loss·w, w,
     missing-loss count]

A step in which no rank has a gradient (a frozen phase that still calls ``step(loss=...)``) leaves the
trust region as it is (step number, d, loss EMA, lagged sums, band schedule), as torch leaves everything.

The two "lagged" sums belong to the *previous* update: its predicted reduction p_{t-1} is first needed
at step t (spec §1.6), so it rides in this step's reduction instead of costing a second one. Until then
those sums are rank-local (``_lag``); checkpoints store their global value (see ``_global_state``).

``acceptance="same_batch"`` adds one closure evaluation and one more 7-value ``all_reduce_scalars``
(and, after a rejection, one parameter all-gather to restore θ).

For the DeepSpeed adapter: ``shard=False`` makes every local tensor (e.g. a ZeRO flat fp32 partition)
an owned block; the partials and the loss are still all-reduced over the communicator's group, so the
trust region stays global. ``step()`` is ONE call per training step: DeepSpeed's several calls per
training step (one per param group at ZeRO-1/2, one per sub-group at ZeRO-3) are collected by
:class:`deepspeed_ext.client.DeepSpeedClientOptimizer`, which steps this optimizer once over all of them.

Memory: m and v (2x the owned parameters, as Adam). ``_prepare`` only reads (it sums the would-be
moments), ``_apply`` writes the moments and θ in place, so a step skipped for a non-finite value leaves
everything bit-identical without a copy. ``acceptance="same_batch"`` adds a copy of the owned
parameters per step (to restore θ after a rejection). Host synchronisation: one per step (the packed
vector of the all-reduce; the loss rides in it as a tensor), plus the closure's loss under ``same_batch``.

Host work: on the CPU the blocks of a param group that all went through the C loops are kept with what
the step left behind (:mod:`lightning_soaa.optim.soaa_plan`) and, at the next step, checked instead of
rebuilt; anything that changed sends that step through the general path, with the same bits. A single
process whose groups all hold their plans (whole parameters, lagged acceptance) steps from the plans
alone (:meth:`SOAA._planned_step`: no block views, no step record), again with the same bits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
import weakref
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor

from lightning_soaa.config import REPLICA_CHECK_EVERY, SOAAConfig, config_from_group
from lightning_soaa.distributed.blocks import BlockInfo
from lightning_soaa.distributed.checkpoint import StateField, check_finite_number
from lightning_soaa.distributed.comm import LocalComm
from lightning_soaa.functional.soaa import (
    BlockSplit,
    FusedPasses,
    Partials,
    SOAAKernels,
    add_partials,
    band,
    moments_partials,
    predicted_reduction,
    split_blocks,
    step_partials_,
    trust_region_scalars,
)
from lightning_soaa.kernels.soaa_native import NativeSOAA
from lightning_soaa.optim.adamw import adam_state_schema, init_adam_state
from lightning_soaa.optim.base import TEMPLATE_HOOKS, BlockView, ShardedOptimizer, StepRecord, overrides_any, summed
from lightning_soaa.optim.closure_source import accumulation_steps
from lightning_soaa.optim.soaa_plan import NativePlan
from lightning_soaa.optim.step_context import autocast_casts, full_precision_no_grad
from lightning_soaa.optim.step_hooks import hooked_step

__all__ = ["SOAA"]

log = logging.getLogger(__name__)

#: the gradients when a loss was handed over: the index of the first trainable parameter with one, its gradient
#: (weakly) and that gradient's version; None: there was none
_GradMark = tuple[int, "weakref.ref[Tensor]", int] | None


@dataclasses.dataclass
class _SOAAStep(StepRecord):
    """The step's all-reduced vector (after the base's two values, in this order) and the step counts.

    The sums and the loss stay 0-d tensors on their device until the base packs the vector: one
    device-to-host copy per step (no ``.item()`` per value)."""

    sum_mhat_sq: Any = summed()  # Σm̂²
    sum_vhat_eps: Any = summed()  # Σ(v̂+ε)
    lag_mu: Any = summed()  # lagged η·Σm̂u (the previous update's, rank-local until reduced here)
    lag_vu2: Any = summed()  # lagged η·Σv̂u²
    loss_sum: Any = summed()  # loss·w
    loss_weight: float = summed()  # w
    missing_loss: float = summed()  # ranks without a loss
    #: per (param group, counted): the views with a gradient and their tensors, for _apply
    groups: dict[tuple[int, bool], _Group] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(slots=True)  # not frozen: made at every step, and a frozen init costs a setattr per field
class _Group:
    """The blocks of one (param group, counted) pair with a gradient this step, as the kernels take them
    (built once in ``_prepare``, after the lazy state init, and handed to ``_apply``)."""

    views: list[BlockView]
    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    counters: list[Tensor]
    ts: list[int]  # the step count of this update of each block
    kernels: SOAAKernels | None  # _kernels_for(views), chosen once per step for both passes
    split: BlockSplit | None  # which of them takes each block, decided once per step for both passes
    plan: NativePlan | None = None  # the group's step plan when it still holds (then no kernels, no split)


@dataclasses.dataclass(slots=True)  # made at every step
class _SOAADecision:
    """What every rank decided from the reduced vector."""

    t: int
    scalars: Any  # trust_region_scalars(...)
    pred_prev: float
    loss: float
    groups: dict[tuple[int, bool], _Group]


#: hyperparameters of the global trust region: one value for the whole model, never per group.
_GLOBAL_KEYS = ("gamma", "band_schedule", "total_steps", "acceptance", "rho_smoothing", "trust_warmup",
                "eta1", "eta2", "shrink", "expand", "d_min", "compile")

ACCUMULATION_MESSAGE = (
    "SOAA under Lightning with accumulate_grad_batches={k}: the closure returns only the last micro-batch's "
    "loss divided by {k}, not the loss of the optimizer step, and the trust region would run on it. Add "
    "lightning_soaa.lightning.LossToOptimizer() to the Trainer's callbacks (it hands over the mean over the "
    "{k} micro-batches; the lightning-soaa CLI adds it), or call opt.step(loss=...) in manual optimization. "
    "(Lightning's learning-rate and batch-size finders, Tuner.lr_find / Tuner.scale_batch_size or the "
    "LearningRateFinder / BatchSizeFinder callbacks, run their search with the Trainer's callbacks replaced "
    "by their own: run them with accumulate_grad_batches=1.)"
)

SAME_BATCH_NONE_MESSAGE = (
    "SOAA(acceptance='same_batch'): the closure returned None while parameters have gradients. The trust "
    "region compares the closure's loss before and after the trial step, so the closure must return the "
    "loss: under Lightning's manual optimization, def closure(): loss = self.compute_loss(batch); "
    "self.manual_backward(loss); return loss, then opt.step(closure=closure). Without such a closure use "
    "acceptance='lagged' with opt.step(loss=...) or set_loss."
)

MISSING_LOSS_MESSAGE = (
    "SOAA needs the mini-batch loss of every step (its trust region compares actual and predicted "
    "loss reduction). Give it one of: opt.step(closure), opt.step(loss=loss), or opt.set_loss(loss) "
    "before step() (through a wrapper whose step() takes no keywords, e.g. Lightning Fabric's or "
    "accelerate's optimizer: set_loss); under Lightning add the lightning_soaa.lightning LossToOptimizer "
    "callback. (Under manual optimization with several optimizers, LossToOptimizer hands it over only "
    "where it can tell whose it is: a step through Lightning's wrapper (self.optimizers()) whose gradients "
    "hold exactly one manual_backward since its gradients were last zeroed (zero_grad() before each "
    "optimizer's backward, or toggle_optimizer); otherwise pass it: opt.step(loss=...).)"
)


def _floats(part: Partials) -> list[float]:
    """A partials vector (host floats, or a float64 tensor on any device) as Python floats."""
    return list(part) if isinstance(part, list) else part.tolist()


def _group_scalars(group: dict[str, Any]) -> tuple[float, float, float, float]:
    """``(beta1, beta2, eps, weight_decay)`` of a group as Python floats: a NumPy float32 written there
    (accepted by the config, as by torch) made the step's scalar arithmetic float32 (6e-8 off in 6 steps)."""
    beta1, beta2 = group["betas"]
    return float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"])


def _check_loss(loss: Any) -> Tensor | float:
    """A scalar tensor (kept detached, so handing it over does not sync a GPU) or a float (also for a CPU
    tensor: nothing to wait for, and the float64 of its value is what the step reads)."""
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"SOAA: the loss must be a scalar, got a tensor of shape {tuple(loss.shape)}.")
        if loss.is_complex():
            raise ValueError(f"SOAA: the loss must be real, got a tensor of dtype {loss.dtype}.")
        if loss.is_cpu:
            return float(loss.item())
        out: Tensor = loss.detach()
        return out if out.dim() == 0 else out.reshape(())
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):  # numbers.Real: numpy's floats too
        return float(loss)
    raise ValueError(f"SOAA: the loss must be a real scalar tensor or number, got {type(loss).__name__}.")


def _compile_default() -> bool:
    """``compile=None``: on unless the environment says ``LIGHTNING_SOAA_COMPILE=0``."""
    return os.environ.get("LIGHTNING_SOAA_COMPILE", "1") != "0" and hasattr(torch, "compile")


def _loss_eps(loss: Any) -> float:
    """The relative rounding of a loss handed back as a floating tensor (0 for a Python number)."""
    return torch.finfo(loss.dtype).eps if isinstance(loss, Tensor) and loss.is_floating_point() else 0.0


def _resolution(loss_eps: float, model_eps: float, reference: float, eps: float) -> float:
    """The smallest loss change ``same_batch`` acceptance can judge: ``eps``, or four roundings of the loss
    at its magnitude (a float32 loss of 1e4 rounds by ~1e-3) in the coarser of its dtype and the model's:
    a loss handed back as a Python float (``loss.item()``) was computed in the model's dtype, and judged
    at float64's rounding it stalled training (d fell to d_min). The same on every rank: ``loss_eps`` is
    summed over the ranks, the value the all-reduced mean loss."""
    return max(eps, 4.0 * max(loss_eps, model_eps) * abs(reference))


def _loss_value(loss: Any) -> float:
    value = _check_loss(loss)
    return float(value.item()) if isinstance(value, Tensor) else value


def _triton_passes() -> FusedPasses:
    """The hand-written Triton passes for CUDA tensors (imported on first use: Triton is optional);
    ``RuntimeError`` (:class:`~lightning_soaa.kernels.soaa_triton.TritonUnavailable`) where they cannot run."""
    try:
        from lightning_soaa.kernels.soaa_triton import TritonSOAA

        return TritonSOAA.load()
    except RuntimeError:  # TritonUnavailable: no Triton, no CUDA
        raise
    except Exception as e:  # noqa: BLE001 - a broken Triton install: the next path, not a failed step
        raise RuntimeError(f"Triton failed to load: {type(e).__name__}: {e}") from e


class SOAA(ShardedOptimizer):
    r"""SecondOrderAdaptiveAdam (variant A, global form): Adam whose step is capped per coordinate by a
    diagonal-Fisher Newton step and scaled by a trust multiplier :math:`d` driven by the ratio of actual
    to predicted loss reduction.

    .. math::
        \begin{aligned}
        &\textbf{input: } \eta, \beta_1, \beta_2, \epsilon, \lambda, \gamma, T;\quad
          \textbf{init: } m_0 = v_0 = 0,\ L_0 = 0,\ d_0 = 1,\ p_0 = 0 \\
        &\textbf{for } t = 1, 2, \dots:\quad g_t = \nabla\ell_t(\theta_{t-1}) \\
        &\quad m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
          \hat m_t = \tfrac{m_t}{1-\beta_1^t},\ \hat v_t = \tfrac{v_t}{1-\beta_2^t} \\
        &\quad c_t = 1 + \frac{\sum_i \hat m_{t,i}^2}{\sum_i (\hat v_{t,i} + \epsilon)},\qquad
          F_t = c_t \hat v_t \qquad \text{(sums over all parameters of all ranks)} \\
        &\quad u_t = \frac{d_{t-1}\,\hat m_t}{\max(d_{t-1} F_t, \sqrt{\hat v_t}) + \epsilon},\qquad
          \theta_t = \theta_{t-1} - \eta\lambda\theta_{t-1} - \eta u_t \\
        &\quad L_t = \beta_1 L_{t-1} + (1-\beta_1)\ell_t,\quad \hat\ell_t = \tfrac{L_t}{1-\beta_1^t},\quad
          \rho_t = \frac{\hat\ell_t - \ell_t}{\max(p_{t-1}, \epsilon)} \\
        &\quad [lo_t, hi_t] = \begin{cases} [1-\gamma,\ 1+\gamma] & \text{band\_schedule = "final" (default)} \\
          [(1-\gamma)^{\min(t-1,T)/T},\ 1 + \gamma^{\min(t-1,T)/T}] & \text{band\_schedule = "paper"}
          \end{cases},\quad d_t = \operatorname{clip}(\rho_t d_{t-1}, lo_t, hi_t) \\
        &\quad p_t = \eta\Big(\sum_i \hat m_{t,i} u_{t,i} - \tfrac12 \sum_i \hat v_{t,i} u_{t,i}^2\Big)
        \end{aligned}

    Per coordinate (:math:`\epsilon = 0`): :math:`|u| = \min(|\hat m|/F, d|\hat m|/\sqrt{\hat v})`, so for
    small gradients SOAA is AdamW with learning rate :math:`\eta d_t`; with :math:`\gamma = 0`,
    :math:`d \equiv 1`.

    ``acceptance="same_batch"`` (INFERRED extension, a true trust region): after the trial step the
    closure is evaluated again on the same batch, :math:`\rho = (\ell_t - \ell(\theta_t)) / \max(p_t,
    \epsilon)` with :math:`p_t` the trial step's predicted reduction; :math:`\rho < \eta_1` rejects the
    step (θ restored; the moments and step counters keep the gradient that was observed at the unchanged
    θ, so the state stays consistent) and sets :math:`d \leftarrow \max(\text{shrink}\cdot d, d_{min})`;
    :math:`\rho > \eta_2` with at least one coordinate on the :math:`d`-branch of the cap ("the step was
    limited by d") sets :math:`d \leftarrow \text{expand}\cdot d`; :math:`d` is kept
    :math:`\le hi_t`. A trial whose predicted and observed reductions are both at most the loss's
    resolution (:math:`\max(\epsilon, 4\,\epsilon_{dtype} |\ell_t|)`, or :math:`p_t = 0`) cannot be
    judged: it stands and :math:`d` is left alone. **Cost:** one extra closure evaluation per step (a
    forward, plus a backward if the closure calls it), a copy of the owned parameters, and a second
    scalar all-reduce.

    Args:
        params: tensors, ``named_parameters()`` or param groups (groups may set lr, betas, eps,
            weight_decay; the trust-region hyperparameters are global).
        lr: :math:`\eta` (default 1e-3).
        betas: :math:`(\beta_1, \beta_2)` (default (0.9, 0.999)); the loss EMA uses the default β1.
        eps: :math:`\epsilon` (default 1e-8; > 0: it is also the floor of the trust ratio's denominator).
        weight_decay: decoupled :math:`\lambda`, scaled by lr (default 0).
        gamma: band factor :math:`\gamma \in [0, 1)` (default 0.05; nadir's SOAA uses 0.1, Tadam 0.25).
        band_schedule: ``"final"`` (default) or ``"paper"`` (spec §1.3 step 10: the band narrows from
            [1, 2] at t = 1 to [1-γ, 1+γ] at t = T).
            Why these defaults (``benchmarks/soaa_lm_study.py``: a character transformer, warm-up +
            cosine, betas (0.9, 0.95), lr grid 2e-3..1.6e-2, 3 seeds): the lagged ρ compares the loss
            EMA's lag (≈ β1/(1-β1) steps of decrease) plus mini-batch noise (sd ≈ 0.07) with a one-step
            prediction (p ≈ 0.002-0.02), so ρ's sign is nearly a coin flip and d sits at a band edge on
            ~95% of the steps: the band acts as a random lr multiplier. "paper" makes d >= 1 for most of
            the run and d = hi ≈ 1.9 through a warm-up (the loss falls steadily, ρ ≈ 3.5-5): final
            validation loss 1.75 at its best lr vs AdamW's 1.57. "final" keeps E[d] ≈ 1: with γ = 0.1
            1.66 (one of three seeds diverged at AdamW's best lr), with γ = 0.05 1.564 ± 0.012, equal to
            AdamW (1.567 ± 0.013). The Fisher cap bound no coordinate there (the knee 1/(d c) is far
            above √v̂ of this network's gradients). "final" is also what ``total_steps=None`` always gave.
        total_steps: :math:`T` (default None), used by ``band_schedule="paper"`` only. The band reaches
            :math:`[1-\gamma, 1+\gamma]` at ``t = T + 1`` and keeps it. ``None`` (INFERRED):
            the final band :math:`[1-\gamma, 1+\gamma]` at every step. Of the two readings of "unknown
            T" this one keeps the trust region able to shrink (a band [1, 2] forever would only allow
            d >= 1, i.e. never take a step smaller than Adam's, and up to 2x larger ones with no end);
            it also keeps :math:`\gamma = 0` free of the trust multiplier (:math:`d \equiv 1`): AdamW wherever
            the Fisher cap does not bind. Note d after step 1 is then 1-γ, not 1.
        acceptance: ``"lagged"`` (default; the paper's rule, no extra forward, works without a closure)
            or ``"same_batch"`` (needs ``step(closure)``).
        rho_smoothing: :math:`\beta_\rho \in [0, 1)` (default 0: the spec's per-step ρ above). > 0
            (INFERRED extension, lagged only): :math:`\rho_t = A_t / \max(P_t, \epsilon)` with discounted
            sums :math:`A_t = \beta_\rho A_{t-1} + (\hat\ell_t - \ell_t)`,
            :math:`P_t = \beta_\rho P_{t-1} + p_{t-1}` (:func:`~lightning_soaa.functional.soaa.smoothed_ratio`):
            a ratio of sums over ~:math:`1/(1-\beta_\rho)` steps, so mini-batch noise averages out
            before the ratio is taken. :math:`A, P` are built from the all-reduced loss and sums (the same
            on every rank, no extra collective) and are checkpointed.
        trust_warmup: :math:`K \ge 0` (default 0; lagged only): :math:`d_t = 1` for :math:`t \le K` (the
            loss EMA and the sums still run), the rule above from :math:`t = K + 1`.
        eta1, eta2, shrink, expand, d_min: the same_batch rule (defaults 0.25, 0.75, 0.5, 2.0, 1e-3).
        foreach: the eager path: ``None`` (default) uses torch's ``_foreach`` ops on CUDA and a
            per-tensor loop, tile by tile through two tile-sized scratch buffers, on CPU (the same
            arithmetic up to rounding: a fused addcmul, the order of the sums); ``True``/``False`` force one.
        compile: ``True`` runs each of the step's two elementwise passes (the read-only sums before the
            all-reduce; the in-place update of m, v, θ with its sums after it) as one sweep: on CPU
            through C loops built at the first step with the system C compiler (about a second, once,
            cached in ``~/.cache/lightning_soaa``; one call per pass for all blocks;
            ``LIGHTNING_SOAA_NATIVE=0`` turns them off), elsewhere, or without a C compiler, through
            ``torch.compile``'d kernels for tensors of at least 2**16 elements (a few seconds at the first
            step). On CUDA, with Triton installed, through hand-written Triton kernels
            (:mod:`lightning_soaa.kernels.soaa_triton`: four launches a step for all blocks, each dtype
            checked once on the device against an IEEE reference before use). ``None`` (default): the
            same, unless the environment variable ``LIGHTNING_SOAA_COMPILE=0``, except that accelerator
            blocks the Triton kernels do not take go the eager foreach path, not ``torch.compile`` (its
            passes measured 5-10x slower than foreach on an H200). ``False``: eager everywhere. A
            compiler failure falls back to the next path with one warning.
        max_grad_norm: clip the gradient the update reads (after ``grad_reduction="mean"`` averages it) by its
            global norm over all parameters, as torch's ``clip_grad_norm_`` (default None: no clipping); see
            :mod:`lightning_soaa.optim.grad_clip`.
        process_group, comm, shard, grad_reduction, replica_check_every: see :class:`ShardedOptimizer`.

    The loss: ``step(closure)`` (evaluated under ``enable_grad``), ``step(loss=...)`` (tensor or
    float), or :meth:`set_loss` before ``step()`` (what the Lightning ``LossToOptimizer`` callback
    calls). It is averaged over ranks (weighted by ``weight``) inside the step's single all-reduce. No
    loss raises ``ValueError`` on every rank; SOAA never silently runs as Adam.

    References:
        Vo & Vo, *SecondOrderAdaptiveAdam (SOAA)*, arXiv:2410.02293, 2024 [P: abstract only].
        Update rule, bias correction, c_t over all parameters, lr-scaled decoupled weight decay,
        p = η(Σm̂u − ½Σv̂u²): slrodini/nadir@4cbb441 src/soaa.cc [C] and the summary [S]. Predecessor
        Tadam (Yang, Cho, Lee, Neural Networks 2023) [C dddong2/Tadam@74eb9b2]. γ = 0.1 in [C nadir];
        the paper's default is unknown. INFERRED: the one-reduction lagged layout, ``total_steps=None``,
        ``band_schedule="final"`` and γ = 0.05 (our defaults, chosen by measurement),
        the whole ``same_batch`` mode, per-tensor step counters for the bias correction.
    """

    step_record = _SOAAStep
    partials_cover_grads = True  # a non-finite gradient makes Σm̂² non-finite
    elementwise = True  # large parameters are cut into row blocks (ShardedOptimizer._block_specs)
    batch_statistic = "the trust region's loss"
    sums_parts_over_ranks = True  # the trust region's sums (ShardedOptimizer._checks_partitions)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        gamma: float = 0.05,
        band_schedule: str = "final",
        total_steps: int | None = None,
        acceptance: str = "lagged",
        *,
        rho_smoothing: float = 0.0,
        trust_warmup: int = 0,
        eta1: float = 0.25,
        eta2: float = 0.75,
        shrink: float = 0.5,
        expand: float = 2.0,
        d_min: float = 1e-3,
        foreach: bool | None = None,
        compile: bool | None = None,
        max_grad_norm: float | None = None,
        process_group: Any = None,
        comm: Any = None,
        shard: bool = True,
        grad_reduction: str = "none",
        replica_check_every: int = REPLICA_CHECK_EVERY,
    ) -> None:
        self.config = SOAAConfig(
            # SOAAConfig checks that it is a pair (a list from a YAML file becomes a tuple here).
            lr=lr, betas=cast("tuple[float, float]", tuple(betas)) if isinstance(betas, (list, tuple)) else betas,
            eps=eps,
            weight_decay=weight_decay, gamma=gamma, band_schedule=band_schedule, total_steps=total_steps,
            acceptance=acceptance, rho_smoothing=rho_smoothing, trust_warmup=trust_warmup,
            eta1=eta1, eta2=eta2, shrink=shrink, expand=expand, d_min=d_min,
            compile=compile, max_grad_norm=max_grad_norm,
        )
        if self.config.band_schedule == "paper" and self.config.total_steps is None:
            # the paper's band narrows over T steps; without T it is the final band from step 1, which
            # is band_schedule="final": say so rather than run another schedule than the one asked for
            log.warning("SOAA: band_schedule='paper' narrows the band over total_steps, which is None: the "
                        "band is [1-gamma, 1+gamma] at every step, as band_schedule='final'. Pass "
                        "total_steps (the number of optimizer steps; Lightning: "
                        "trainer.estimated_stepping_batches, or under a GradientAccumulationScheduler "
                        "lightning_soaa.lightning.stepping.estimated_optimizer_steps(trainer)) for the paper's "
                        "schedule.")
        defaults = dict(lr=self.config.lr, betas=tuple(self.config.betas), eps=self.config.eps,
                        weight_decay=self.config.weight_decay, max_grad_norm=self.config.max_grad_norm)
        self._reset_trust_state()
        # the trust region's β1 (its loss EMA) and ε: the constructor's, or on a resume the checkpoint's, as
        # the per-group betas and eps are (a resume with other constructor betas stepped 3e-3 off the
        # uninterrupted run: moments by the checkpoint's β, the trust region by the constructor's)
        self._trust_beta1, self._trust_eps = float(self.config.betas[0]), float(self.config.eps)
        self._pending_loss: tuple[Tensor | float, float] | None = None
        self._pending_plain = False  # the pending loss came from a set_loss without replace=True
        self._pending_mark: _GradMark = None  # what the gradients held when the pending loss was handed over
        self._set_loss_calls = 0  # lets step(closure) see whether the closure handed a loss over itself
        self._loss_weight = 1.0
        self._trial: Partials | None = None
        self._snapshot: list[tuple[Tensor, Tensor]] = []
        if foreach is not None and not isinstance(foreach, bool):
            raise ValueError(f"Invalid foreach={foreach!r}. Must be True, False or None.")
        self.foreach = foreach
        self._soaa_kernels: SOAAKernels | None
        self._kernels()  # resolves compile=None from the environment now
        super().__init__(params, defaults, process_group=process_group, comm=comm, shard=shard,
                         grad_reduction=grad_reduction, replica_check_every=replica_check_every)

    # compiled per process, rebuilt by _kernels() after a copy or pickle
    # (and this rank's loss before a same_batch trial, read by its verdict: belongs to one step)
    _transient = ("_soaa_kernels", "_warned_compiled_accelerator", "_step_plans", "_planned", "_local_loss",
                  "_pending_mark")

    def _kernels(self) -> SOAAKernels | None:
        """This optimizer's compiled kernels, or None (eager). Rebuilt from the config after unpickling
        (compiled callables do not pickle); compiling itself waits for the first call."""
        if "_soaa_kernels" not in self.__dict__:
            use = self.config.compile if self.config.compile is not None else _compile_default()
            native = os.environ.get("LIGHTNING_SOAA_NATIVE", "1") != "0"  # "0": torch.compile on CPU too
            # the Triton passes on CUDA by default (timed on an H200: faster than foreach at every size, see
            # _kernels_for); the torch.compile'd passes for accelerator blocks only when asked for
            triton = _triton_passes
            self._soaa_kernels = SOAAKernels(cpu_loader=NativeSOAA.load if native else None,
                                             accel_loader=triton,
                                             compile_accelerators=self.config.compile is True) if use else None
        return self._soaa_kernels

    def _kernels_for(self, views: list[BlockView]) -> SOAAKernels | None:
        """The kernels for these blocks. The one-call-per-pass kernels (C on CPU; Triton on CUDA) take blocks
        of any size; otherwise None when no block is large enough for the ``torch.compile``'d kernels
        (``SOAAKernels.min_numel``): such blocks always take the eager path, and without kernels the
        functional layer does not ask ``accepts`` per tensor at every step (same results). Decided from
        every block's device: a group may hold CPU and accelerator blocks."""
        kernels = self._kernels()
        if kernels is None or not views:
            return kernels
        on_cpu = [v.param.is_cpu for v in views]
        if any(on_cpu) and kernels.native_failure is None:
            # the C loops for the CPU blocks; accelerator blocks of the group take Triton where it loads,
            # else the eager path (SOAAKernels(compile_accelerators=False) never compiles for them)
            return kernels
        if not all(on_cpu):
            if kernels.fused_loaded(cpu=False) is not None:
                return kernels
            if self.config.compile is None:
                # without Triton, accelerators take the foreach path by default: measured on an H200 (torch
                # 2.11, Triton 3.6) the torch.compile'd passes took 13-25 ms a step for 10 x 1e6 fp32
                # against 2.2-2.6 ms eager (the Triton passes: 1.4 ms)
                return None
        if all(v.param.numel() < kernels.min_numel for v in views):
            return None
        if not all(on_cpu) and not self.__dict__.get("_warned_compiled_accelerator"):
            self._warned_compiled_accelerator = True
            device = next(v.param.device.type for v in views if not v.param.is_cpu)
            log.warning("SOAA(compile=True) on %s without the Triton kernels (%s): the torch.compile'd passes "
                        "measured 5-10x slower than the default foreach path on an H200 (torch 2.11); leave "
                        "compile unset there.", device, kernels.accel_failure)
        return kernels

    def _reset_trust_state(self) -> None:
        self._t = 0  # optimizer-wide step number (steps that ran, accepted or rejected)
        self._d = 1.0
        self._loss_ema = 0.0
        self._pred = 0.0  # the predicted reduction used by the last ρ (lagged) or of the last trial
        self._lag: Partials = [0.0, 0.0]  # rank-local η·Σm̂u, η·Σv̂u² not yet reduced (floats or a tensor)
        self._c = 1.0
        self._rho = 0.0
        self._actual = 0.0
        self._actual_sum = 0.0  # A_t, P_t of rho_smoothing (0 when it is off)
        self._pred_sum = 0.0
        self._loss = 0.0
        self._lo, self._hi = band(1, self.config.gamma, self.config.total_steps, self.config.band_schedule)
        self._accepted = 0
        self._rejected = 0

    # ------------------------------------------------------------------ validation
    def _validate_group(self, group: dict[str, Any]) -> None:
        for k in _GLOBAL_KEYS:
            if k in group and group[k] != getattr(self.config, k):
                raise ValueError(
                    f"Invalid {k}={group[k]!r} in a param group. SOAA's trust region is global: pass "
                    f"{k} to the SOAA constructor (it is {getattr(self.config, k)!r})."
                )
        config_from_group(SOAAConfig, group)

    # ------------------------------------------------------------------ the loss
    def set_loss(self, loss: Tensor | float, weight: float = 1.0, *, replace: bool = False) -> None:
        """Store the mini-batch loss for the next :meth:`step` (e.g. from ``on_before_backward``).

        The last call before a step wins: under manual gradient accumulation hand over the step's mean
        loss once (``set_loss(mean)`` or ``step(loss=mean)``), not each micro-batch's (the trust region then
        judged the step by the last micro-batch alone: 0.13 off after 40 steps of 4 micro-batches). A
        second call before a step logs that warning once per optimizer; ``replace=True`` says the call
        replaces the earlier value on purpose (a running mean: ``LossToOptimizer`` hands one over after
        every micro-batch).
        ``weight`` (e.g. the local batch size) weights this rank's loss in the cross-rank average; the
        default 1 averages ranks equally (equal per-rank batches, spec §1.6). The loss SOAA judges its
        steps by is that average, so each rank's loss must be its share of the global objective *as a
        mean*: where gradients are summed over ranks instead of averaged (FSDP2's
        ``set_gradient_divide_factor(1.0)`` with each rank's loss divided by the global token count, as
        torchtitan does), the objective is the sum of the ranks' losses; pass ``loss * world_size`` then
        (else ρ is off by that factor: 5.2e-4 off the one-process run after 8 steps at W = 2).
        """
        receiver = self._receiver()
        if receiver is not self and isinstance(receiver, SOAA):  # called through Lightning's LightningOptimizer
            receiver.set_loss(loss, weight, replace=replace)
            return
        # a number or a 0-d tensor (a token count); "2" or True went through float() unnoticed
        number = isinstance(weight, numbers.Real) and not isinstance(weight, bool)
        tensor = isinstance(weight, Tensor) and weight.numel() == 1 and not weight.dtype.is_complex \
            and weight.dtype != torch.bool
        w = float(weight) if number or tensor else math.nan
        if not math.isfinite(w) or w <= 0.0:
            raise ValueError(f"Invalid weight={weight!r}. Must be a finite number > 0 (or a one-element tensor).")
        checked = _check_loss(loss)
        if self._pending_plain and not replace:  # two calls of the user's own (a callback's running value replaces)
            self._warn_repeated_handover("set_loss", "hand over the step's mean loss once (set_loss(mean) or "
                                         "step(loss=mean))")
        self._pending_loss, self._pending_plain = (checked, w), not replace
        self._pending_mark = self._grad_mark()
        self._set_loss_calls += 1

    def _set_step_loss(self, loss: Tensor | float) -> None:
        """``set_loss(loss, replace=True)`` for ``step(loss=)``, without the gradients' mark (~3 us on a small
        model's step): the step drops its loss when it ends, and the mark is read only for a loss still pending
        at ``zero_grad``. Through :meth:`set_loss` where that is not SOAA's own (a subclass's or an instance's
        override: ``step(loss=)`` went through it before, a shortcut skipped it without a word) or where Lightning's
        LightningOptimizer wraps the optimizer (the one behind it holds the loss)."""
        if getattr(self.set_loss, "__func__", None) is not SOAA.set_loss or self._receiver() is not self:
            self.set_loss(loss, replace=True)
            return
        self._pending_loss, self._pending_plain, self._pending_mark = (_check_loss(loss), 1.0), False, None
        self._set_loss_calls += 1

    def discard_loss(self) -> None:
        """Forget a loss handed over with :meth:`set_loss` for a step that will not be taken.

        For loss scalers that skip a step without calling ``step()`` or this optimizer's :meth:`zero_grad`
        (DeepSpeed's fp16 wrappers and its ZeRO-0 GradScaler zero the gradients themselves): the next
        ``set_loss`` then logs no accumulation warning, and a step handed no loss of its own is refused
        instead of judged by the skipped batch's loss. Call it on every rank alike (a skip is collective)."""
        receiver = self._receiver()
        if receiver is not self and isinstance(receiver, SOAA):  # Lightning's LightningOptimizer: the one behind
            receiver.discard_loss()
            return
        self._pending_loss, self._pending_plain, self._pending_mark = None, False, None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; it also ends a handed-over loss whose gradients are being discarded unstepped.

        torch.amp.GradScaler does not call ``step()`` when it finds an inf or NaN in the gradients (one process,
        or gradients DDP averaged), so a loss handed over with :meth:`set_loss` for that step stayed pending:
        the next step's ``set_loss`` logged the accumulation warning, and a step handed no loss of its own was
        judged by the skipped batch's. A loss is dropped here when a backward (or the scaler's unscaling) wrote
        the gradients after it was handed over: those gradients go unstepped, and so does their loss. A loss
        handed over before this call with no backward since (``loss = f(x); opt.set_loss(loss);
        opt.zero_grad(); loss.backward(); opt.step()``) is kept for the backward to come; either way a later
        ``set_loss`` replaces it without the warning (the gradients it would have accumulated with are gone).
        Each rank decides from its own gradients, which a skipped step left alike where the scaler skipped on
        every rank: a rank that kept a loss the others dropped has it replaced by the next hand-over, and a
        step none was handed for is refused on every rank together."""
        receiver = self._receiver()
        if receiver is not self:  # Lightning's LightningOptimizer: the optimizer behind it holds the loss
            receiver.zero_grad(set_to_none)
            return
        if self._pending_loss is not None and self._grad_mark_moved():
            self._pending_loss = None
        self._pending_plain, self._pending_mark = False, None
        super().zero_grad(set_to_none)

    def _grad_mark(self) -> _GradMark:
        """What the first trainable parameter with a gradient holds: its index, the gradient (weakly) and its
        version. Not a fixed parameter: one no loss reaches (another task's head, or the head of the task the step
        before trained) has no gradient to watch, and a skipped batch's loss stayed pending through zero_grad (a
        next step handed none was judged by it). O(1) where the first parameter has a gradient; where none has
        (a loss handed before its backward) one pass, ~0.2 µs a parameter, a fifth of the zero_grad before it."""
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is not None and p.requires_grad:
                    return i, weakref.ref(g), -1 if g.is_inference() else g._version
                i += 1
        return None

    def _grad_mark_moved(self) -> bool:
        """Whether a gradient was written since the pending loss was handed over: that gradient is there and
        is another tensor, or the same one written in place (a backward, the scaler's unscaling). Not where it
        is gone (another ``zero_grad`` came first) or the mark is unknown (not kept through a pickle)."""
        if "_pending_mark" not in self.__dict__:
            return False
        mark, now = self._pending_mark, self._grad_mark()
        if now is None:
            return False
        # another parameter is the first with a gradient: a backward reached one before it, or its own was dropped
        return mark is None or mark[0] != now[0] or mark[1]() is not now[1]() or mark[2] != now[2]

    # ------------------------------------------------------------------ the step
    @hooked_step  # torch's step hooks and profiler label, without the label's cost where no profiler records
    @torch._disable_dynamo  # eager under torch.compile (see ShardedOptimizer.step)
    @full_precision_no_grad  # inside an autocast region too, without grad (optim/step_context.py)
    def step(
        self, closure: Callable[[], Any] | None = None, *, loss: Tensor | float | None = None
    ) -> Any:
        """One SOAA step (collective when W > 1: every rank must call it).

        Args:
            closure: re-evaluates the model and returns the loss (required for ``same_batch``).
            loss: the mini-batch loss when there is no closure (overrides a :meth:`set_loss` value).
        """
        if self.config.acceptance == "same_batch" and closure is None:
            raise ValueError(
                "SOAA(acceptance='same_batch') re-evaluates the loss after the trial step and needs "
                "step(closure); use acceptance='lagged' when no closure is available (DeepSpeed, AMP)."
            )
        calls_before = self._set_loss_calls
        ret, error = None, None
        try:  # an error here (a bad loss on one rank) is raised on every rank after the all-reduce
            ret = self._run_step_closure(closure)
            if ret is None and self.config.acceptance == "same_batch" and self._has_gradients():
                # its re-evaluation would return None too: every trial rejected, nothing trained, silently
                raise ValueError(SAME_BATCH_NONE_MESSAGE)
            if loss is not None:
                self._set_step_loss(loss)  # step(loss=) overrides a set_loss value
            elif closure is not None and ret is not None and self._set_loss_calls == calls_before:
                # A loss handed over *during* the closure (Lightning's LossToOptimizer fires inside it)
                # wins over the closure's return value: under gradient accumulation Lightning's closure
                # returns the last micro-batch's loss divided by k, the callback the mean over the step.
                # Without the callback that value is wrong: refuse rather than run the trust region on it.
                k = accumulation_steps(closure)
                if k > 1:
                    raise ValueError(ACCUMULATION_MESSAGE.format(k=k))
                self.set_loss(ret, replace=True)
        except Exception as e:
            error = e
        try:
            ran = self._sharded_step(local_error=error)
        finally:
            # a loss belongs to one step, whatever happened; so does its gradients' mark, a weak reference that
            # made torch.utils.swap_tensors refuse the gradient (model.to() under FSDP2 or the swap flag)
            self._pending_loss, self._pending_plain, self._pending_mark = None, False, None
        if ran and self.config.acceptance == "same_batch":
            try:
                self._same_batch_check(closure)  # type: ignore[arg-type]
            finally:  # its re-evaluation may hand a loss over too: it belongs to no later step
                self._pending_loss, self._pending_plain, self._pending_mark = None, False, None
        return ret

    def _has_gradients(self) -> bool:
        return any(p.grad is not None for group in self.param_groups for p in group["params"])

    def _groups_of(self, views: list[BlockView]) -> dict[tuple[int, bool], list[BlockView]]:
        """Views with a gradient by (param group, counted): only counted pieces enter the global sums
        (under FSDP2 a replica's piece is not counted; see lightning_soaa.distributed.dtensor)."""
        by_group: dict[tuple[int, bool], list[BlockView]] = {}
        for v in views:
            if v.grad is not None:
                by_group.setdefault((v.block.group_index, v.counted), []).append(v)
        return by_group

    def _plans(self) -> dict[tuple[int, bool], NativePlan]:
        """The step plans by (param group, counted) (:mod:`lightning_soaa.optim.soaa_plan`; per process)."""
        plans: dict[tuple[int, bool], NativePlan] | None = self.__dict__.get("_step_plans")
        if plans is None:
            plans = {}
            self._step_plans = plans
        return plans

    def _group_of(self, key: tuple[int, bool], vs: list[BlockView]) -> _Group:
        """The blocks of one (param group, counted) pair with a gradient, as the kernels take them: from the
        group's step plan when it still holds, else built (the state made on first use)."""
        params, states = [v.param for v in vs], [v.state for v in vs]
        grads: list[Tensor] = [v.grad for v in vs]  # type: ignore[misc]  # (views with a gradient)
        plan = self._plans().pop(key, None)  # put back by _apply once the step ran
        if plan is not None and plan.matches(params, states, grads):
            return _Group(vs, params, grads, plan.exp_avgs, plan.exp_avg_sqs, plan.counters, plan.ts, None, None,
                          plan)
        for v, st in zip(vs, states):
            if "step" not in st:  # zero state == no state, so lazy init is not a mutation
                init_adam_state(st, v.param)  # float32 moments for a float16 parameter
        counters = [st["step"] for st in states]
        ts = self._counts().read(key, counters)
        lists = (params, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states])
        kernels = self._kernels_for(vs)
        return _Group(vs, *lists, counters, ts, kernels, split_blocks(kernels, *lists))

    def _plan_after(self, key: tuple[int, bool], grp: _Group) -> None:
        """Keep (or make) the group's step plan after its step: only for blocks that all went through the
        C loops on the CPU, in one dtype, without DTensors."""
        if grp.plan is not None:
            self._plans()[key] = grp.plan
            return
        split, kernels = grp.split, grp.kernels
        if (kernels is None or split is None or self._dtensor is not None or not split.uniform
                or len(split.fused) != len(grp.params) or not grp.params[0].is_cpu):
            return
        native = kernels.fused_loaded(cpu=True)
        sums = kernels.stored_sums_all(grp.exp_avgs, grp.exp_avg_sqs)  # what the step just wrote
        # the plan keeps the C loops' argument arrays: only for them (not for other CPU passes, e.g. the
        # Triton kernels' interpreter in tests)
        if not isinstance(native, NativeSOAA) or any(x is None for x in sums):
            return
        plan = NativePlan.build(native, grp.params, grp.exp_avgs, grp.exp_avg_sqs, grp.counters,
                                sums)  # type: ignore[arg-type]
        if plan is not None:
            self._plans()[key] = plan

    def _prepare(self, views: list[BlockView]) -> _SOAAStep:
        """Reads only: the partials of the would-be moments (written by ``_apply`` once the step runs)."""
        groups = {key: self._group_of(key, vs) for key, vs in self._groups_of(views).items()}
        total = self._moment_sums(groups)
        # one call for both values; on the CPU (nothing to wait for) as floats, elsewhere as 0-d views that
        # the base copies to the host with the other values (indexing costs one call per value)
        s_m2, s_veps = (total if isinstance(total, list) else total.tolist() if total.device.type == "cpu"
                        else total.unbind(0))
        lag = self._lag
        lag_mu, lag_vu2 = ((lag if isinstance(lag, list) else lag.tolist() if lag.device.type == "cpu"
                            else lag.unbind(0)) if self.config.acceptance == "lagged" else (0.0, 0.0))
        loss_sum, weight, missing = self._loss_partials()
        return _SOAAStep(sum_mhat_sq=s_m2, sum_vhat_eps=s_veps, lag_mu=lag_mu, lag_vu2=lag_vu2,
                         loss_sum=loss_sum, loss_weight=weight, missing_loss=missing, groups=groups)

    def _moment_sums(self, groups: dict[tuple[int, bool], _Group]) -> Partials:
        """``[Σ m̂², Σ (v̂ + ε)]`` of the would-be moments of every group's blocks (reads only)."""
        parts: list[Partials] = []
        for (gi, counted), grp in groups.items():
            group = self.param_groups[gi]
            beta1, beta2, eps = _group_scalars(group)[:3]
            if grp.plan is not None:
                part: Partials = grp.plan.moments_partials(grp.grads, grp.ts, beta1=beta1, beta2=beta2, eps=eps)
            else:
                part = moments_partials(
                    grp.grads, grp.exp_avgs, grp.exp_avg_sqs,
                    grp.ts, beta1=beta1, beta2=beta2, eps=eps, foreach=self.foreach, kernels=grp.kernels,
                    split=grp.split,
                )
            # An uncounted piece adds 0, or NaN when it is non-finite: the step is then skipped everywhere.
            if not counted:
                part = [x * 0.0 for x in part] if isinstance(part, list) else part * 0.0
            parts.append(part)
        return add_partials(parts) if parts else [0.0, 0.0]

    def _loss_partials(self) -> tuple[Tensor | float, float, float]:
        """(loss·w, w, missing) of this rank; a tensor loss stays on its device (no sync here)."""
        if self._pending_loss is None:
            return 0.0, 0.0, 1.0
        raw, w = self._pending_loss
        self._loss_weight = w  # same_batch weighs the re-evaluated loss like the step's loss
        if self.config.acceptance == "same_batch":
            self._local_loss = raw  # and compares it with this rank's own (_trial_seen)
        if isinstance(raw, Tensor):  # (an accelerator's: set_loss made a CPU loss a float) x * 1.0 == x
            return (raw.double() if w == 1.0 else raw.double() * w), w, 0.0
        return raw * w, w, 0.0

    def _decide(self, reduced: StepRecord) -> _SOAADecision:
        assert isinstance(reduced, _SOAAStep)
        if reduced.missing_loss > 0:
            raise ValueError(
                f"{MISSING_LOSS_MESSAGE} (missing on {int(reduced.missing_loss)} of {self.comm.world_size} rank(s))"
            )
        return self._decision(reduced.sum_mhat_sq, reduced.sum_vhat_eps, reduced.lag_mu, reduced.lag_vu2,
                              reduced.loss_sum, reduced.loss_weight, reduced.groups)

    def _decision(self, s_m2: float, s_veps: float, lag_mu: float, lag_vu2: float, lw: float, w: float,
                  groups: dict[tuple[int, bool], _Group]) -> _SOAADecision:
        """The trust region's scalars of step t from the reduced sums and loss (every rank the same)."""
        cfg = self.config
        t = self._t + 1
        pred_prev = predicted_reduction(lag_mu, lag_vu2)
        scal = trust_region_scalars(
            sum_mhat_sq=s_m2, sum_vhat_eps=s_veps, loss=lw / w, loss_ema=self._loss_ema,
            pred_prev=pred_prev, d_prev=self._d, t=t, beta1=self._trust_beta1, eps=self._trust_eps,
            gamma=cfg.gamma, total_steps=cfg.total_steps, band_schedule=cfg.band_schedule,
            rho_smoothing=cfg.rho_smoothing, actual_sum=self._actual_sum, pred_sum=self._pred_sum,
            trust_warmup=cfg.trust_warmup,
        )
        return _SOAADecision(t=t, scalars=scal, pred_prev=pred_prev, loss=lw / w, groups=groups)

    def _apply(self, views: list[BlockView], decision: _SOAADecision) -> None:
        self._update(views, decision)
        self._arm_planned(decision.groups)

    def _update(self, views: list[BlockView], decision: _SOAADecision) -> None:
        """Moments, θ and the step counters of every group, then the trust region's state."""
        self._update_clean_on_raise = True  # until the first write below (the lazy state was made in _prepare)
        scal = decision.scalars
        d_prev = self._d  # the update of step t uses d_{t-1}
        same_batch = self.config.acceptance == "same_batch"
        if same_batch:  # the only copy SOAA keeps: θ, to restore it when the trial step is rejected
            self._snapshot = [(v.param, v.param.detach().clone()) for v in views if v.grad is not None]
        self._update_clean_on_raise = False  # the counters, moments and θ are written from here
        parts: list[Partials] = []
        for (gi, counted), grp in decision.groups.items():  # _prepare's groups (the same views)
            group = self.param_groups[gi]
            if grp.plan is None:  # (a plan advances its counters itself)
                self._counts().increment((gi, counted), grp.counters)
            beta1, beta2, eps, weight_decay = _group_scalars(group)
            lr = float(group["lr"])
            kw = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                      d=d_prev, c=scal.c, count_limited=same_batch)
            if grp.plan is not None:
                part: Partials = grp.plan.step_partials_(grp.grads, grp.ts, **kw)
            else:
                part = step_partials_(grp.params, grp.grads, grp.exp_avgs, grp.exp_avg_sqs, grp.ts,
                                      foreach=self.foreach, kernels=grp.kernels, split=grp.split, **kw)
            self._plan_after((gi, counted), grp)
            if not counted:
                continue
            if isinstance(part, list):  # η·Σm̂u, η·Σv̂u² (and the count, not scaled)
                parts.append([part[0] * lr, part[1] * lr, *part[2:]])
            else:
                parts.append(torch.cat([part[:2] * lr, part[2:]]) if same_batch else part * lr)
        # host floats when the kernels gave floats (the C loops): no tensor is made (a visible cost of a small
        # model's step); a tensor (on the blocks' device, not read here) from the other paths
        lag = add_partials(parts) if parts else [0.0] * (3 if same_batch else 2)
        self._t = decision.t
        self._loss_ema = scal.loss_ema
        self._loss = decision.loss
        self._c = scal.c
        self._lo, self._hi = scal.lo, scal.hi
        if same_batch:
            self._trial = lag  # reduced in _same_batch_check
        else:
            self._lag = lag
            self._pred = decision.pred_prev
            self._rho, self._actual, self._d = scal.rho, scal.actual, scal.d
            self._actual_sum, self._pred_sum = scal.actual_sum, scal.pred_sum
            self._accepted += 1

    # ------------------------------------------------------------------ the planned step (W = 1)
    def _arm_planned(self, groups: dict[tuple[int, bool], _Group]) -> None:
        """After a step: whether the next may take :meth:`_planned_step`. Only a single process (no
        collective to make, nothing to agree on) whose blocks are whole parameters, each with a gradient in
        a group with a step plan or without one (frozen or unused: the planned step checks that they still
        have none), lagged acceptance, no DTensors, no gradient averaging."""
        plans = self._plans()
        keys = tuple(groups)
        ok = (bool(keys) and isinstance(self.comm, LocalComm) and self._dtensor is None
              and self.config.acceptance == "lagged" and self.sharding.grad_reduction == "none"
              and all(k in plans for k in keys) and all(b.dim is None for b in self._owned)
              and not overrides_any(self, SOAA, TEMPLATE_HOOKS))
        if not ok:
            self._planned = None
            return
        covered = {id(p) for k in keys for p in plans[k].params}
        # the blocks without a gradient this step: the groups hold every block that had one
        idle = [p for p in (self._params[b.param_index] for b in self._owned) if id(p) not in covered]
        self._planned = (self._owned, keys, idle)

    def _planned_groups(self) -> dict[tuple[int, bool], _Group] | None:
        """Every group from its step plan, read from the parameters directly (no block views), or None
        where anything differs from what the last step left (a plan's own checks, a missing gradient, a
        rebuilt block table, a communicator that joined a process group)."""
        armed = self.__dict__.get("_planned")
        if armed is None or armed[0] is not self._owned or not isinstance(self.comm, LocalComm):
            return None
        # the parameters without a gradient at the last step still have none (and, as check_step asks of
        # every parameter, data: not meta)
        if not all(p.grad is None and not p.is_meta for p in armed[2]):
            return None
        plans, state = self._plans(), self.state
        groups: dict[tuple[int, bool], _Group] = {}
        for key in armed[1]:
            plan = plans.get(key)
            if plan is None:
                return None
            params = plan.params  # whole parameters (armed only so): the block views are the parameters
            grads = [g for p in params if (g := p.grad) is not None]
            if len(grads) != len(params) or not plan.matches(params, [state[p] for p in params], grads):
                return None
            groups[key] = _Group([], params, grads, plan.exp_avgs, plan.exp_avg_sqs, plan.counters, plan.ts,
                                 None, None, plan)
        return groups

    def _planned_step(self) -> bool:
        """The template's step without its block views and record, for a single process whose groups all
        hold their step plans: the same sums, decision and update (the same functions, so the same bits).
        Anything out of the ordinary (no loss, a non-finite value, a plan that no longer holds) returns
        False before anything changed, and the template runs the step (and raises or skips it)."""
        groups = self._planned_groups()
        if groups is None or not isinstance(self._lag, list):
            return False
        s_m2, s_veps = self._moment_sums(groups)  # (floats: the plans' C loops)
        loss_sum, w, missing = self._loss_partials()
        lag_mu, lag_vu2 = self._lag
        if missing > 0 or not isinstance(loss_sum, float) or self._local_nonfinite(
                [s_m2, s_veps, lag_mu, lag_vu2, loss_sum, w, missing]):
            return False
        self.comm.begin_step()
        decision = self._decision(s_m2, s_veps, lag_mu, lag_vu2, loss_sum, w, groups)
        self._update_clean_on_raise = False  # (as the template's: set by _update)
        try:
            self._update([], decision)
        except BaseException as e:  # as the template's _apply (KeyboardInterrupt too): refused until load_state_dict
            if not self._update_clean_on_raise:  # (a single process: nothing to agree on)
                self._update_interrupted(e)
            raise
        self._count_step()
        return True

    def _on_skip(self) -> None:
        self._snapshot = []
        self.__dict__.pop("_local_loss", None)

    def _state_nonfinite(self) -> bool:
        # The update reads d, the loss EMA and the lagged sums: a NaN there (a corrupted checkpoint, a
        # hand-edited state) must skip the step rather than reach the parameters. The lagged sums ride
        # in the record's summed fields (lag_mu, lag_vu2), which the base checks with the partials; with
        # same_batch they are not read. So no tensor (and no host sync) is read here.
        scalars = (self._d, self._loss_ema, self._pred, self._actual_sum, self._pred_sum)
        return not all(map(math.isfinite, scalars))

    # ------------------------------------------------------------------ same_batch acceptance
    def _model_eps(self) -> float:
        """The relative rounding of the coarsest floating dtype this rank's model computes its loss in: its
        parameters', the autocast region the step was called in (on the parameters' device types), FSDP2's
        ``MixedPrecisionPolicy`` ``param_dtype``. A float32 model run in bf16 was judged at float32's
        rounding: trials whose change was below bf16's rounding of the loss were rejected, d sank to d_min
        (lr 1e-4: d 0.005 after 12 steps, W = 2). The ranks' values are averaged in the verdict's all-reduce
        (the verdict is theirs)."""
        eps = [torch.finfo(p.dtype).eps for p in self._params if p.is_floating_point()]
        regions = self.__dict__.get("_caller_autocast") or []
        if regions:  # (a float64 model computes in float64 in a bf16 region: judged at bf16's rounding, a
            # trial raising its loss by 1% stood unjudged, the step no longer that outside the region)
            eps += [torch.finfo(dt).eps for dev, dt in regions
                    if any(p.device.type == dev and autocast_casts(p, dt) for p in self._params)]
        fsdp = self._fsdp()
        return max(eps + [fsdp.compute_eps() if fsdp is not None else 0.0])

    def _compute_dtype(self, p: Tensor, fsdp_dtype: torch.dtype | None) -> torch.dtype:
        """The coarsest dtype a forward computes with ``p`` in: its own, the autocast region the step was called
        in on its device type (not for float64, which autocast never casts), FSDP2's ``MixedPrecisionPolicy``
        ``param_dtype`` (``fsdp_dtype``; as :meth:`_model_eps`)."""
        dtypes = [p.dtype, fsdp_dtype]
        dtypes += [dt for dev, dt in self.__dict__.get("_caller_autocast") or []
                   if dev == p.device.type and autocast_casts(p, dt)]
        floating = [dt for dt in dtypes if isinstance(dt, torch.dtype) and dt.is_floating_point]
        return max(floating, key=lambda dt: torch.finfo(dt).eps, default=p.dtype)

    def _moved_at_compute_dtype(self) -> bool:
        """Whether the trial changed a copy of this rank's parameters the forward computes with: a float32
        parameter run in bf16 (autocast, FSDP2's MixedPrecisionPolicy) whose update is below half a bf16
        rounding leaves the forward's input unchanged. Local (the snapshot's pieces are plain tensors, also
        under FSDP2); one parameter's two casts at a time."""
        fsdp = self._fsdp()
        fsdp_dtype = fsdp.compute_dtype() if fsdp is not None else None
        for p, saved in self._snapshot:
            dt = self._compute_dtype(p, fsdp_dtype)
            if dt == p.dtype or not p.is_floating_point():
                if not torch.equal(p, saved):
                    return True
            elif not torch.equal(p.to(dt), saved.to(dt)):
                return True
        return False

    def _trial_seen(self, val: float) -> float:
        """1.0 where this rank's closure could tell the trial from the step before it: its loss changed, or (a
        loss equal to the bit, else no parameter is read) the trial changed what its forward computes with;
        0.0 for a trial invisible at the compute precision. Summed in the verdict's all-reduce."""
        before = self.__dict__.pop("_local_loss", None)
        if before is None or not math.isfinite(val) or _loss_value(before) != val:
            return 1.0
        return 1.0 if self._moved_at_compute_dtype() else 0.0

    def _warn_stale_closure(self, pred: float) -> None:
        """A judged trial whose loss equals the loss before it to the bit although it moved this rank's
        parameters: most likely the closure did not evaluate them. Logged once (by each rank whose owned
        parameters moved: at W > 1 a rank whose blocks a trial left unchanged stays silent)."""
        if self.__dict__.get("_stale_warned"):
            return
        self._stale_warned = True
        log.warning(
            "SOAA(acceptance='same_batch'): step %d: the closure's loss after the trial step equals the loss "
            "before it to the bit although the trial moved the parameters (predicted reduction %.3g), so the "
            "step was rejected. Most likely the closure does not see the trial parameters: it returns a loss "
            "computed before the step, or it evaluates a copy of the model (under FSDP2: the unsharded parameters "
            "an earlier forward left, the root's or with reshard_after_forward=False every unit's, where SOAA "
            "could not reshard them; see the warning about the FSDP2 units). Logged once.", self._t, pred)

    def _same_batch_check(self, closure: Callable[[], Any]) -> None:
        """Re-evaluate the loss at the trial θ and accept or reject the step (every rank alike).

        A closure that raises on any rank is held, counted in the same all-reduce, and the step is then
        rejected as for a non-finite loss (θ restored on every rank, d shrunk; the moments and step
        counters keep their advance, as after any rejection) before every rank raises: the ranks stay in
        step and no rank is left waiting in the all-reduce. That holds where the closure's forward makes
        no collective of its own: under FSDP2 (whose forward all-gathers) a closure that raises on one rank
        leaves the others in the forward's all-gather, as with torch's optimizers."""
        try:
            error, failed = self._judge_trial(closure)
        except BaseException as e:
            # Ctrl+C in the re-evaluation's forward (most of such a step), a peer lost in the all-reduce: θ holds
            # the unjudged trial and d its old value, a state no run reaches; saved, it resumed silently
            self._update_interrupted(e)
            raise
        if failed > 0:  # after the rejection (bad > 0 too): raised on every rank, θ restored
            if error is not None:
                raise error
            raise RuntimeError(
                f"SOAA.step: the closure raised on {int(failed)} other rank(s) when re-evaluating the loss "
                "after the trial step (acceptance='same_batch'; see that rank's traceback). The step was "
                "rejected on every rank: the parameters are back to their values before the step.")

    def _judge_trial(self, closure: Callable[[], Any]) -> tuple[Exception | None, float]:
        """:meth:`_same_batch_check`'s verdict, applied: (this rank's closure error, the ranks that raised)."""
        cfg = self.config
        error: Exception | None = None
        try:  # (FSDP2: the step resharded before the update, so the closure's forward all-gathers the trial)
            new_loss = self._run_closure(closure)
            val = _loss_value(new_loss) if new_loss is not None else float("nan")
        except Exception as e:
            error, val = e, float("nan")
        ok = math.isfinite(val)
        trial = _floats(self._trial) if self._trial is not None else [0.0, 0.0, 0.0]
        w = self._loss_weight
        vec = torch.tensor([trial[0], trial[1], val * w if ok else 0.0, w, 0.0 if ok else 1.0, trial[2],
                            0.0 if error is None else 1.0, _loss_eps(new_loss) if error is None else 0.0,
                            self._model_eps(), self._trial_seen(val)], dtype=torch.float64)
        mu, vu2, loss_sum, count, bad, limited, failed, loss_eps, model_eps, seen = \
            self.comm.all_reduce_scalars(vec).tolist()
        model_eps /= self.comm.world_size  # (exact: a power of two times W, over W) the same on every rank
        pred = predicted_reduction(mu, vu2)
        actual = self._loss - loss_sum / count if bad == 0 else -math.inf
        rho = actual / max(pred, self._trust_eps) if bad == 0 else -math.inf
        self._pred, self._actual, self._rho = pred, actual, rho
        d = self._d
        res = _resolution(loss_eps, model_eps, self._loss, self._trust_eps) if bad == 0 else 0.0
        if bad == 0 and (pred == 0.0 or seen == 0 or (pred <= res and abs(actual) <= res)):
            # a trial too small to judge (lr = 0 in a warm-up; a predicted and an observed change below
            # eps or the loss's own rounding, e.g. a float32 loss of 1e4): it stands and d is left alone.
            # Judged, rho = noise / eps rejected it, halved d, shrank the next trial: d sank to d_min
            # for good (a loss scaled by 1e-9 never trained; one offset by 1e4 in float32 stalled).
            # So does a trial no rank's forward can see (seen == 0: every loss equal to the bit and no copy
            # the forward computes with changed, e.g. float32 weights of 6 moved by 5e-3 under bf16, whose
            # rounding there is 0.03): the float32 weights keep it until the sum shows in bf16. Judged, it
            # was rejected with the stale-closure warning whatever the predicted reduction, and d sank
            self._accepted += 1
        elif rho < cfg.eta1:
            log.debug("SOAA same_batch: step %d rejected (rho=%.3g, predicted=%.3g, actual=%.3g)",
                      self._t, rho, pred, actual)
            if actual == 0.0 and self._moved_at_compute_dtype():
                self._warn_stale_closure(pred)  # the trial moved this rank's parameters, the loss did not
            for p, saved in self._snapshot:  # reject: θ back to θ_{t-1} on every rank
                p.copy_(saved)
            if self._sharded_multi_rank():
                # Its buffers (n + W·n elements per dtype) are made here, after the verdict's all-reduce: a rank out
                # of memory here raises alone (interrupted, _same_batch_check) while the others wait in the gather.
                # Left so: they are the sizes of the step's own gather buffers, freed when the step returned, and
                # the closure's forward has returned its memory since (made before the closure, they would live
                # through its forward; made before the verdict, a rank without them could not join the gather)
                self.exchange.gather_params()
            # this optimizer's own writes, after the step marked the versions: on each rank the blocks it owns, and
            # through the gather the others' (a parameter with no gradient only where it is not owned); left
            # unmarked, the next step took them for an in-place change made on some ranks only and refused
            self._note_versions()
            fsdp = self._fsdp()
            if fsdp is not None:  # the closure's forward left FSDP2's root (or every unit) unsharded at the trial:
                fsdp.reshard()  # read, the next step ran at the rejected weights (0.075 off in 4 steps)
            d = max(cfg.shrink * d, cfg.d_min)
            self._rejected += 1
        else:
            if rho > cfg.eta2 and limited > 0:
                d = cfg.expand * d
            self._accepted += 1
        self._d = max(min(d, self._hi), cfg.d_min)
        self._snapshot = []
        self._trial = None
        return error, failed

    # ------------------------------------------------------------------ checkpoints and statistics
    def trust_state(self) -> dict[str, Any]:
        """The optimizer-wide scalars (identical on every rank, except the rank-local ``lag``)."""
        return {
            "t": self._t, "d": self._d, "loss_ema": self._loss_ema, "pred": self._pred,
            "lag": _floats(self._lag), "c": self._c, "rho": self._rho, "actual": self._actual,
            "actual_sum": self._actual_sum, "pred_sum": self._pred_sum,
            "loss": self._loss, "lo": self._lo, "hi": self._hi, "accepted": self._accepted,
            "rejected": self._rejected,
        }

    def _global_state(self) -> dict[str, Any]:
        st = self.trust_state()
        st["beta1"], st["eps"] = self._trust_beta1, self._trust_eps
        if self._consolidating():
            # Collective (we are inside consolidate_state_dict on every rank): the pending lagged sums
            # become their global value, so the checkpoint does not depend on the world size.
            st["lag"] = self.comm.all_reduce_scalars(torch.tensor(_floats(self._lag), dtype=torch.float64)).tolist()
            st["lag_scope"] = "global"
        else:
            # W = 1 is global; shard=False with W > 1 (DeepSpeed) saves one state per rank.
            st["lag_scope"] = "global" if self.comm.world_size == 1 else "rank"
        return {"soaa": st}

    def _state_schema(self, block: BlockInfo, param: Tensor, group: dict[str, Any]) -> dict[str, StateField]:
        return adam_state_schema(block, param)  # Adam's moments and per-tensor step counter

    def _validate_global_state(self, state: dict[str, Any]) -> None:
        where = "SOAA.load_state_dict: lightning_soaa.global.soaa"
        st = state.get("soaa")
        if not isinstance(st, dict):
            raise ValueError(f"{where} (the trust-region state: t, d, loss_ema, pred, lag, ...) is missing; "
                             "loading without it would silently restart the trust region.")
        for key in ("t", "accepted", "rejected"):
            if key not in st:
                raise ValueError(f"{where}.{key} is missing.")
            check_finite_number(f"{where}.{key}", st[key], integer=True, nonnegative=True)
        for key in ("d", "c", "hi"):
            if key not in st:
                raise ValueError(f"{where}.{key} is missing.")
            check_finite_number(f"{where}.{key}", st[key], positive=True)
        for key in ("actual_sum", "pred_sum"):  # rho_smoothing's sums; absent in checkpoints from before it
            if key in st:
                check_finite_number(f"{where}.{key}", st[key])
            elif self.config.rho_smoothing > 0.0:
                raise ValueError(f"{where}.{key} is missing: this checkpoint was saved without rho_smoothing, "
                                 f"and SOAA(rho_smoothing={self.config.rho_smoothing!r}) needs its sums.")
        for key in ("loss_ema", "pred", "loss", "lo"):
            if key not in st:
                raise ValueError(f"{where}.{key} is missing.")
            check_finite_number(f"{where}.{key}", st[key])
        for key in ("rho", "actual"):  # diagnostics: -inf after a rejected same_batch trial is valid
            if key not in st or isinstance(st[key], bool) or not isinstance(st[key], (int, float)) \
                    or math.isnan(st[key]):
                raise ValueError(f"{where}.{key}={st.get(key)!r} is missing or not a number.")
        if "beta1" in st:  # absent in checkpoints from before it was saved: the constructor's then
            check_finite_number(f"{where}.beta1", st["beta1"], nonnegative=True)
            if not st["beta1"] < 1.0:
                raise ValueError(f"{where}.beta1={st['beta1']!r} is invalid. Must be in [0, 1).")
        if "eps" in st:
            check_finite_number(f"{where}.eps", st["eps"], nonnegative=True)
        lag = st.get("lag")
        if not isinstance(lag, (list, tuple)) or len(lag) != 2:
            raise ValueError(f"{where}.lag={lag!r} is invalid. Must be a list of 2 finite numbers.")
        for i, x in enumerate(lag):
            check_finite_number(f"{where}.lag[{i}]", x)
        if st.get("lag_scope", "global") not in ("global", "rank"):
            raise ValueError(f"{where}.lag_scope={st.get('lag_scope')!r} is invalid. Must be 'global' or 'rank'.")

    def _load_global_state(self, state: dict[str, Any]) -> None:
        self._reset_trust_state()
        if (kernels := self._kernels()) is not None:
            kernels.forget()  # the C kernels' remembered Σm², Σv describe the moments before the load
        self._plans().clear()  # so do the step plans'
        st = state["soaa"]  # presence checked by _validate_global_state before anything changed
        self._t = int(st["t"])
        self._d = float(st["d"])
        self._loss_ema = float(st["loss_ema"])
        self._pred = float(st["pred"])
        self._c, self._rho, self._actual = float(st["c"]), float(st["rho"]), float(st["actual"])
        self._actual_sum, self._pred_sum = float(st.get("actual_sum", 0.0)), float(st.get("pred_sum", 0.0))
        self._loss, self._lo, self._hi = float(st["loss"]), float(st["lo"]), float(st["hi"])
        self._accepted, self._rejected = int(st["accepted"]), int(st["rejected"])
        self._trust_beta1 = float(st.get("beta1", self.config.betas[0]))
        self._trust_eps = float(st.get("eps", self.config.eps))
        # the global sum lives on rank 0 only; the next all-reduce restores it exactly
        zero = st.get("lag_scope") == "global" and self.comm.rank != 0
        self._lag = [0.0, 0.0] if zero else [float(x) for x in st["lag"]]

    def _extra_statistics(self) -> dict[str, float]:
        return {
            "d": self._d,
            "rho": self._rho,
            "predicted_reduction": self._pred,
            "actual_reduction": self._actual,
            "actual_reduction_sum": self._actual_sum,
            "predicted_reduction_sum": self._pred_sum,
            "fisher_scale": self._c,
            "accepted": float(self._accepted),
            "rejected": float(self._rejected),
            "loss": self._loss,
            "loss_ema": self._loss_ema,
            "band_lo": self._lo,
            "band_hi": self._hi,
            "t": float(self._t),
        }
