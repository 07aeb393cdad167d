"""SOAA kernels on lists of tensors: moments, trust-region scalars, the capped update. See
:class:`lightning_soaa.optim.soaa.SOAA` for the update rule and ``spec/algorithms.md`` §1 (variant A).

Every tensor kernel is elementwise, so a tensor may be a whole parameter, a slice of one, or a 1-D slice
of a DeepSpeed flat partition; anything global (sums over *all* parameters) is **returned** as small
float64 partial sums which the caller adds across blocks and ranks. Nothing here communicates.

One step, with the optimizer's single all-reduce between the two tensor kernels::

    m_t, v_t, [Σm̂², Σ(v̂+ε)]   = soaa_moments(g, m, v, t)          # new tensors, state untouched
    (all-reduce the partials, the loss and the lagged partials of the previous update)
    c_t, ρ_t, d_t, L_t, ...      = trust_region_scalars(...)          # pure Python float64
    [Σm̂·u, Σv̂·u²]              = soaa_update_(θ, m_t, v_t, t, d_{t-1}, c_t)   # θ in place

``t`` is the per-tensor step count *of this update* (1 on the first step): the caller keeps one counter
per tensor (torch's convention, and what DeepSpeed ZeRO-3 needs, since it calls ``step()`` once per
sub-group), so tensors that joined later are bias-corrected like Adam does.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

__all__ = [
    "SOAAScalars",
    "band",
    "soaa_moments",
    "soaa_update_",
    "trust_region_scalars",
    "predicted_reduction",
]


def _by_step(ts: list[int]) -> dict[int, list[int]]:
    """Indices grouped by step count: tensors of one group share the bias-correction scalars."""
    out: dict[int, list[int]] = {}
    for i, t in enumerate(ts):
        out.setdefault(int(t), []).append(i)
    return out


def soaa_moments(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    ts: list[int],
    *,
    beta1: float,
    beta2: float,
    eps: float,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    r"""New moments :math:`m_t, v_t` (fresh tensors; the inputs are not modified) and the partials.

    Args:
        grads, exp_avgs, exp_avg_sqs: equal-shape tensors per block (any shape, any floating dtype).
        ts: the step count of this update per tensor (``t >= 1``), used for the bias correction.
        beta1, beta2, eps: as in :class:`~lightning_soaa.optim.soaa.SOAA`.

    Returns:
        ``(m_t, v_t, partials)`` with ``partials = [Σ m̂², Σ (v̂ + ε)]`` (float64, shape ``[2]``, on the
        device of the tensors). A non-finite gradient makes ``Σ m̂²`` non-finite, so the caller can use
        the partials as its overflow check.
    """
    if not grads:
        return [], [], torch.zeros(2, dtype=torch.float64)
    m_new = torch._foreach_lerp(exp_avgs, grads, 1.0 - beta1)
    v_new = torch._foreach_mul(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(v_new, grads, grads, value=1.0 - beta2)
    # Per-tensor sums, then scaled and added in float64 (the sums run over every parameter, §1.8).
    sq_m = torch.stack(torch._foreach_norm(m_new, 2, dtype=torch.float64)).square()
    sum_v = torch.stack(torch._foreach_norm(v_new, 1, dtype=torch.float64))  # v >= 0: |v|_1 = Σ v
    inv_bc1_sq = []
    inv_bc2 = []
    n_eps = 0.0
    for t, v in zip(ts, v_new):
        inv_bc1_sq.append(1.0 / (1.0 - beta1**t) ** 2)
        inv_bc2.append(1.0 / (1.0 - beta2**t))
        n_eps += v.numel() * eps
    dev = sq_m.device
    partials = torch.stack([
        (sq_m * torch.tensor(inv_bc1_sq, dtype=torch.float64, device=dev)).sum(),
        (sum_v * torch.tensor(inv_bc2, dtype=torch.float64, device=dev)).sum() + n_eps,
    ])
    return m_new, v_new, partials


def soaa_update_(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    ts: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    d: float,
    c: float,
    count_limited: bool = False,
) -> Tensor:
    r"""Apply :math:`\theta \leftarrow \theta(1-\eta\lambda) - \eta u` in place and return the partials.

    :math:`u = d\,\hat m / (\max(d\,c\,\hat v, \sqrt{\hat v}) + \epsilon)`, with ``exp_avgs`` and
    ``exp_avg_sqs`` the moments *of this step* (from :func:`soaa_moments`), ``d`` the multiplier set at
    the end of the previous step and ``c`` the global Fisher scale :math:`c_t`.

    Returns:
        float64 ``[Σ m̂·u, Σ v̂·u²]`` (plus, with ``count_limited``, the number of coordinates on the
        ``d``-branch of the cap, i.e. where a larger ``d`` gives a larger step). The predicted reduction
        is :math:`\eta(\Sigma\hat m u - \tfrac12 \Sigma \hat v u^2)`; see :func:`predicted_reduction`.
    """
    n_out = 3 if count_limited else 2
    if not params:
        return torch.zeros(n_out, dtype=torch.float64)
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    sums: list[Tensor] = []
    limited = 0.0
    for t, idx in _by_step(ts).items():
        bc1 = 1.0 - beta1**t
        bc2 = 1.0 - beta2**t
        ps = [params[i] for i in idx]
        ms = [exp_avgs[i] for i in idx]
        vs = [exp_avg_sqs[i] for i in idx]
        # With s = sqrt(v): d c v̂ = (d c / bc2) s², sqrt(v̂) = s / sqrt(bc2), so
        # r = max(d c v̂, sqrt(v̂)) = s · max(k1 s, k2).  Written this way it costs one sqrt, no v̂ copy.
        k1 = d * c / bc2
        k2 = 1.0 / math.sqrt(bc2)
        s = torch._foreach_sqrt(vs)
        den = torch._foreach_mul(s, k1)
        if count_limited:
            # d-branch: d c v̂ < sqrt(v̂) (strict; where v = 0 the step is 0 on either branch)
            limited += sum(float((x < k2).sum()) for x in den)
        torch._foreach_clamp_min_(den, k2)
        torch._foreach_mul_(den, s)
        torch._foreach_add_(den, eps)
        q = torch._foreach_div(ms, den)  # u = (d / bc1) q
        step = d / bc1
        torch._foreach_add_(ps, q, alpha=-lr * step)
        # Σ m̂·u = (d / bc1²) Σ m q.  m q = m² / den >= 0, so the 1-norm of m q is the plain sum.
        mq = torch._foreach_mul(ms, q)
        s_mu = torch.stack(torch._foreach_norm(mq, 1, dtype=torch.float64)).sum() * (step / bc1)
        # Σ v̂·u² = (d / bc1)² Σ (sqrt(v̂) q)² = (d / bc1)² / bc2 · ||s q||².
        torch._foreach_mul_(s, q)
        s_vu = torch.stack(torch._foreach_norm(s, 2, dtype=torch.float64)).square().sum() * (step * step / bc2)
        sums.append(torch.stack([s_mu, s_vu]))
    out = torch.stack(sums).sum(0)
    if count_limited:
        out = torch.cat([out, torch.tensor([limited], dtype=torch.float64,
                                           device=out.device)])
    return out


def predicted_reduction(lr_m_u: float, lr_v_u2: float) -> float:
    r""":math:`p = \eta(\Sigma\hat m u - \tfrac12\Sigma\hat v u^2)` from the lr-weighted sums."""
    return lr_m_u - 0.5 * lr_v_u2


def band(t: int, gamma: float, total_steps: int | None) -> tuple[float, float]:
    r"""The band :math:`[lo_t, hi_t] = [(1-\gamma)^{(t-1)/T},\ 1 + \gamma^{(t-1)/T}]`.

    ``t`` is clamped to ``T``. ``total_steps=None`` means the final band :math:`[1-\gamma, 1+\gamma]` at
    every step (INFERRED; see :class:`~lightning_soaa.optim.soaa.SOAA`).
    """
    if total_steps is None:
        return 1.0 - gamma, 1.0 + gamma
    frac = (min(t, total_steps) - 1) / total_steps
    # 0.0 ** 0.0 == 1.0 in Python, which gives hi_1 = 2 for gamma = 0, as the formula says.
    return (1.0 - gamma) ** frac, 1.0 + gamma**frac


@dataclasses.dataclass(frozen=True)
class SOAAScalars:
    """The optimizer-wide scalars of one step, identical on every rank."""

    c: float  # Fisher scale c_t = 1 + Σm̂² / Σ(v̂+ε)
    loss_ema: float  # L_t (not bias-corrected)
    loss_hat: float  # L_t / (1 - β1^t)
    actual: float  # ℓ̂_t - ℓ_t
    rho: float  # actual / max(p_{t-1}, ε)
    lo: float
    hi: float
    d: float  # d_t, used by the NEXT update


def trust_region_scalars(
    *,
    sum_mhat_sq: float,
    sum_vhat_eps: float,
    loss: float,
    loss_ema: float,
    pred_prev: float,
    d_prev: float,
    t: int,
    beta1: float,
    eps: float,
    gamma: float,
    total_steps: int | None,
) -> SOAAScalars:
    r"""Steps 3 and 8-10 of §1.3 (the lagged rule), in Python float64.

    Args:
        sum_mhat_sq, sum_vhat_eps: the global :math:`\Sigma\hat m^2` and :math:`\Sigma(\hat v+\epsilon)`.
        loss: the mini-batch loss :math:`\ell_t` (averaged over ranks).
        loss_ema: :math:`L_{t-1}`; pred_prev: :math:`p_{t-1}`; d_prev: :math:`d_{t-1}`.
        t: the optimizer-wide step number (1 on the first step).
    """
    c = 1.0 + sum_mhat_sq / sum_vhat_eps if sum_vhat_eps > 0.0 else 1.0
    loss_ema = beta1 * loss_ema + (1.0 - beta1) * loss
    loss_hat = loss_ema / (1.0 - beta1**t)
    actual = loss_hat - loss
    rho = actual / max(pred_prev, eps)
    lo, hi = band(t, gamma, total_steps)
    d = min(max(rho * d_prev, lo), hi)
    return SOAAScalars(c=c, loss_ema=loss_ema, loss_hat=loss_hat, actual=actual, rho=rho, lo=lo, hi=hi, d=d)
