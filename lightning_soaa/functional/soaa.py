"""SOAA kernels on lists of tensors: moments, trust-region scalars, the capped update. See
:class:`lightning_soaa.optim.soaa.SOAA` for the update rule and ``spec/algorithms.md`` §1 (variant A).

Every tensor kernel is elementwise, so a tensor may be a whole parameter, a slice of one, or a 1-D slice
of a DeepSpeed flat partition; anything global (sums over *all* parameters) is **returned** as small
float64 partial sums which the caller adds across blocks and ranks. Nothing here communicates.

One step, with the optimizer's single all-reduce between the two tensor kernels::

    m_t, v_t, [Σm̂², Σ(v̂+ε)]   = soaa_moments(g, m, v, t, out=)    # into other buffers: m, v untouched
    (all-reduce the partials, the loss and the lagged partials of the previous update)
    c_t, ρ_t, d_t, L_t, ...      = trust_region_scalars(...)          # pure Python float64
    [Σm̂·u, Σv̂·u²]              = soaa_update_(θ, m_t, v_t, t, d_{t-1}, c_t)   # θ in place

``t`` is the per-tensor step count *of this update* (1 on the first step): the caller keeps one counter
per tensor (torch's convention, and what DeepSpeed ZeRO-3 needs, since it calls ``step()`` once per
sub-group), so tensors that joined later are bias-corrected like Adam does.

Two execution paths with the same arithmetic: ``foreach`` (torch ``_foreach_*`` ops; default on CUDA)
and a loop (default on CPU) that writes into caller-owned buffers and runs the whole chain of ops tile
by tile, because on CPU the foreach ops are a per-tensor loop anyway and their out-of-place forms
allocate a parameter-sized tensor per op. Global sums are accumulated per row of 4096 elements in the
tensor's dtype and added in float64.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = [
    "SOAAScalars",
    "band",
    "soaa_moments",
    "soaa_update_",
    "trust_region_scalars",
    "predicted_reduction",
    "use_foreach",
]


def _by_step(ts: list[int]) -> dict[int, list[int]]:
    """Indices grouped by step count: tensors of one group share the bias-correction scalars."""
    out: dict[int, list[int]] = {}
    for i, t in enumerate(ts):
        out.setdefault(int(t), []).append(i)
    return out


# Global sums are taken in chunks of this many elements: each chunk is reduced in the tensor's dtype
# (fast, and exact enough at this length), the chunk results are added in float64. A plain fp32 sum of
# 1e7 elements is off by ~1e-3 relative here; chunking brings it to ~1e-8 without an fp64 copy.
_CHUNK = 4096


def _rows(x: Tensor) -> tuple[Tensor, Tensor]:
    flat = x.reshape(-1)
    k = flat.numel() // _CHUNK
    return flat[: k * _CHUNK].view(k, _CHUNK), flat[k * _CHUNK:]


def _sum64(x: Tensor) -> Tensor:
    rows, tail = _rows(x)
    return rows.sum(1, dtype=x.dtype).double().sum() + tail.double().sum()


def _sum_sq64(x: Tensor) -> Tensor:
    rows, tail = _rows(x)
    return torch.linalg.vector_norm(rows, dim=1).double().square().sum() + tail.double().square().sum()


def _dot64(a: Tensor, b: Tensor) -> Tensor:
    ra, ta = _rows(a)
    rb, tb = _rows(b)
    return torch.bmm(ra.unsqueeze(1), rb.unsqueeze(2)).double().sum() + (ta.double() * tb.double()).sum()


# The loop path runs the whole chain of elementwise ops on one tile before moving to the next, so the
# tile's operands stay in cache: the chain costs about one trip to memory instead of one per op.
_TILE = 1 << 20


def _tiles(*ts: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """Aligned pieces of equal-shape tensors (whole tensors when small or not contiguous)."""
    if ts[0].numel() <= _TILE or not all(t.is_contiguous() for t in ts):
        yield ts
        return
    flats = [t.view(-1) for t in ts]
    for i in range(0, flats[0].numel(), _TILE):
        yield tuple(f[i:i + _TILE] for f in flats)


class _Acc:
    """A float64 sum over many tiles: per-row results (``_CHUNK`` elements, tensor dtype) are kept and
    added in float64 once at the end, so a tile costs one reduction call."""

    def __init__(self, square: bool = False) -> None:
        self.square = square
        self.rows: list[Tensor] = []
        self.extra: list[Tensor] = []

    def sum(self, x: Tensor) -> None:
        rows, tail = _rows(x)
        if rows.numel():
            self.rows.append(rows.sum(1))
        if tail.numel():
            self.extra.append(tail.double().sum())

    def sum_sq(self, x: Tensor) -> None:  # needs square=True
        rows, tail = _rows(x)
        if rows.numel():
            self.rows.append(torch.linalg.vector_norm(rows, dim=1))
        if tail.numel():
            self.extra.append(tail.double().square().sum())

    def total(self, device: torch.device) -> Tensor:
        out = torch.zeros((), dtype=torch.float64, device=device)
        if self.rows:
            r = torch.cat(self.rows).double()
            out = out + (r.square() if self.square else r).sum()
        if self.extra:
            out = out + torch.stack(self.extra).sum()
        return out


# ---------------------------------------------------------------- compiled update (CPU, float32)
# On CPU the eager update is ~10 elementwise ops per tile, each a dispatch and a trip through the cache.
# torch.compile (inductor, C++) fuses the chain into two loops: θ and q in one, the row sums in the
# other (measured: the update ~1.2-1.9x faster, the step ~1.25x, on a 10M-parameter model). Used for
# float32 CPU tensors only, on whole pieces of exactly ``_CTILE`` elements, so each kernel compiles
# once per process (fixed shape, ``dynamic=False``, scalars as 0-dim tensors); the rest of a tensor
# and every smaller tensor run the eager ops. Same formula, same order; the C++ compiler may contract a
# multiply-add differently from ATen, so θ can differ from the eager path by one rounding (as the
# foreach path's fused add does). Row sums keep the ``_CHUNK`` layout. LIGHTNING_SOAA_COMPILE=0 turns it
# off; a failure to compile turns it off with one warning and the update runs eager.
_CTILE = 1 << 19
_compiled: dict[str, Callable[..., Any] | None] = {}


def _q_kernel(p: Tensor, m: Tensor, v: Tensor, q_out: Tensor, decay: Tensor, alr: Tensor, k1: Tensor,
              knee: Tensor, eps: Tensor) -> None:
    """The elementwise chain of :func:`soaa_update_`: q = m / (k1 s max(s, knee) + ε) into ``q_out``,
    θ ← θ·decay + alr·q in place."""
    s = torch.sqrt(v)
    q = m / (eps + k1 * torch.clamp_min(s, knee) * s)
    q_out.copy_(q)
    p.copy_(p * decay + alr * q)


def _sums_kernel(m: Tensor, v: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of ``(rows, _CHUNK)`` pieces: Σ m q and Σ (s q)²."""
    sq = torch.sqrt(v) * q
    return (m * q).sum(1), (sq * sq).sum(1)


# Two graphs, not one: in one graph inductor allocates a tile-sized temporary for q on every call,
# which with glibc's default heuristics can come back as fresh pages (page faults) every step.
def _compiled_kernels() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    if "update" not in _compiled:
        fns = None
        if os.environ.get("LIGHTNING_SOAA_COMPILE", "1") != "0" and hasattr(torch, "compile"):
            try:
                fns = (torch.compile(_q_kernel, fullgraph=True, dynamic=False),
                       torch.compile(_sums_kernel, fullgraph=True, dynamic=False))
            except Exception as e:  # noqa: BLE001 - any compiler problem means: run eager
                log.warning("SOAA: torch.compile unavailable (%s); using the eager CPU update", e)
        _compiled["update"] = fns
    return _compiled["update"]


def _use_compiled(p: Tensor, m: Tensor, v: Tensor, count_limited: bool) -> bool:
    return (
        not count_limited
        and v.numel() >= _CTILE
        and v.device.type == "cpu"
        and p.dtype == m.dtype == v.dtype == torch.float32
        and p.is_contiguous() and m.is_contiguous() and v.is_contiguous()
        and not torch.compiler.is_compiling()
        and _compiled_kernels() is not None
    )


def _compile_failed(e: Exception) -> None:
    log.warning("SOAA: the compiled CPU update failed (%s: %s); using the eager update", type(e).__name__, e)
    _compiled["update"] = None


def _run_compiled(p: Tensor, m: Tensor, v: Tensor, q_buf: Tensor,
                  scal: tuple[Tensor, ...]) -> tuple[Tensor, Tensor] | None:
    """One ``_CTILE`` piece through the compiled kernels: the row sums, or None (θ untouched, the
    kernels off) when the first kernel cannot run."""
    kernels = _compiled_kernels()
    if kernels is None:
        return None
    shape = (_CTILE // _CHUNK, _CHUNK)
    p2, m2, v2, q2 = (t.detach().view(shape) for t in (p, m, v, q_buf))
    with torch.no_grad():  # the same global state on every call: no recompilation
        try:
            kernels[0](p2, m2, v2, q2, *scal)
        except Exception as e:  # noqa: BLE001 - compile errors surface at the first call, before any write
            _compile_failed(e)
            return None
        try:
            return kernels[1](m2, v2, q2)
        except Exception as e:  # noqa: BLE001 - θ is already updated: take the sums eagerly
            _compile_failed(e)
            sq = torch.sqrt(v2).mul_(q2)
            return (m2 * q2).sum(1), sq.mul_(sq).sum(1)


def use_foreach(tensors: list[Tensor], foreach: bool | None) -> bool:
    # On CPU the foreach ops are a per-tensor loop anyway, and their out-of-place forms allocate: a
    # fresh 40 MB tensor costs more than the arithmetic (page faults). The loop path writes into
    # caller-owned buffers instead. On CUDA the caching allocator makes foreach the faster choice.
    if foreach is not None:
        return foreach
    return bool(tensors) and tensors[0].device.type != "cpu"


def soaa_moments(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    ts: list[int],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    out: tuple[list[Tensor], list[Tensor]] | None = None,
    foreach: bool | None = None,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    r"""New moments :math:`m_t, v_t` and the partials; the inputs are not modified.

    Args:
        grads, exp_avgs, exp_avg_sqs: equal-shape tensors per block (any shape, any floating dtype).
        ts: the step count of this update per tensor (``t >= 1``), used for the bias correction.
        beta1, beta2, eps: as in :class:`~lightning_soaa.optim.soaa.SOAA`.
        out: buffers (shaped like the moments, not aliasing them) that receive :math:`m_t, v_t` on the
            loop path; ``None`` allocates. The foreach path always allocates.
        foreach: ``None`` picks foreach on CUDA and the loop on CPU (same arithmetic, bit-identical).

    Returns:
        ``(m_t, v_t, partials)`` with ``partials = [Σ m̂², Σ (v̂ + ε)]`` (float64, shape ``[2]``). A
        non-finite gradient makes ``Σ m̂²`` non-finite, so the caller can use the partials as its
        overflow check.
    """
    if not grads:
        return [], [], torch.zeros(2, dtype=torch.float64)
    if use_foreach(grads, foreach):
        m_new = list(torch._foreach_lerp(exp_avgs, grads, 1.0 - beta1))
        v_new = list(torch._foreach_mul(exp_avg_sqs, beta2))
        torch._foreach_addcmul_(v_new, grads, grads, value=1.0 - beta2)
        s_m2 = torch.zeros((), dtype=torch.float64, device=grads[0].device)
        s_v = torch.zeros((), dtype=torch.float64, device=grads[0].device)
        n_eps = 0.0
        for t, m, v in zip(ts, m_new, v_new):
            s_m2 = s_m2 + _sum_sq64(m) / (1.0 - beta1**t) ** 2
            s_v = s_v + _sum64(v) / (1.0 - beta2**t)
            n_eps += v.numel() * eps
        return m_new, v_new, torch.stack([s_m2, s_v + n_eps])
    else:
        m_new = out[0] if out is not None else [torch.empty_like(m) for m in exp_avgs]
        v_new = out[1] if out is not None else [torch.empty_like(v) for v in exp_avg_sqs]
        dev = grads[0].device
        s_m2 = torch.zeros((), dtype=torch.float64, device=dev)
        s_v = torch.zeros((), dtype=torch.float64, device=dev)
        n_eps = 0.0
        for t, idx in _by_step(ts).items():
            acc_m, acc_v = _Acc(square=True), _Acc()
            for i in idx:
                for g, m, v, mo, vo in _tiles(grads[i], exp_avgs[i], exp_avg_sqs[i], m_new[i], v_new[i]):
                    torch.lerp(m, g, 1.0 - beta1, out=mo)
                    torch.mul(v, beta2, out=vo)
                    vo.addcmul_(g, g, value=1.0 - beta2)
                    acc_m.sum_sq(mo)
                    acc_v.sum(vo)
                n_eps += grads[i].numel() * eps
            s_m2 = s_m2 + acc_m.total(dev) / (1.0 - beta1**t) ** 2
            s_v = s_v + acc_v.total(dev) / (1.0 - beta2**t)
        return m_new, v_new, torch.stack([s_m2, s_v + n_eps])


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
    foreach: bool | None = None,
) -> Tensor:
    r"""Apply :math:`\theta \leftarrow \theta(1-\eta\lambda) - \eta u` in place and return the partials.

    :math:`u = d\,\hat m / (\max(d\,c\,\hat v, \sqrt{\hat v}) + \epsilon)`, with ``exp_avgs`` and
    ``exp_avg_sqs`` the moments *of this step* (from :func:`soaa_moments`), ``d`` the multiplier set at
    the end of the previous step and ``c`` the global Fisher scale :math:`c_t`.

    Args:
        foreach: as in :func:`soaa_moments`. The loop path needs only two tile-sized scratch buffers.

    Returns:
        float64 ``[Σ m̂·u, Σ v̂·u²]`` (plus, with ``count_limited``, the number of coordinates on the
        ``d``-branch of the cap, i.e. where a larger ``d`` gives a larger step). The predicted reduction
        is :math:`\eta(\Sigma\hat m u - \tfrac12 \Sigma \hat v u^2)`; see :func:`predicted_reduction`.
    """
    n_out = 3 if count_limited else 2
    if not params:
        return torch.zeros(n_out, dtype=torch.float64)
    fe = use_foreach(params, foreach)
    dev = params[0].device
    s_mu = torch.zeros((), dtype=torch.float64, device=dev)
    s_vu = torch.zeros((), dtype=torch.float64, device=dev)
    limited = torch.zeros((), dtype=torch.float64, device=dev)
    decay = 1.0 - lr * weight_decay
    for t, idx in _by_step(ts).items():
        bc1 = 1.0 - beta1**t
        bc2 = 1.0 - beta2**t
        # With s = sqrt(v): d c v̂ = k1 s² and sqrt(v̂) = k2 s (k1 = d c / bc2, k2 = 1 / sqrt(bc2)), so
        # r + ε = max(k1 s², k2 s) + ε = k1 · s · max(s, k2 / k1) + ε: a sqrt, a clamp and one addcmul,
        # with no v̂ copy. (k1 > 0 since d >= lo_t > 0 and c >= 1.)
        k1 = d * c / bc2
        knee = (1.0 / math.sqrt(bc2)) / k1  # s below the knee: the d-branch (Adam-like) of the cap
        step = d / bc1  # u = step · q with q = m / (r + ε)
        ps = [params[i] for i in idx]
        ms = [exp_avgs[i] for i in idx]
        vs = [exp_avg_sqs[i] for i in idx]
        if fe:
            if weight_decay != 0.0:
                torch._foreach_mul_(ps, decay)
            s = torch._foreach_sqrt(vs)
            if count_limited:
                for si in s:
                    limited = limited + (si < knee).sum()
            q = list(torch._foreach_clamp_min(s, knee))
            torch._foreach_mul_(q, k1)
            torch._foreach_mul_(q, s)
            torch._foreach_add_(q, eps)
            q = list(torch._foreach_div(ms, q))
            torch._foreach_add_(ps, q, alpha=-lr * step)
            for m, si, qi in zip(ms, s, q):
                # Σ m̂·u = (d / bc1²) Σ m q ;  Σ v̂·u² = (d / bc1)² / bc2 · Σ (s q)²
                s_mu = s_mu + _dot64(m, qi) * (step / bc1)
                si.mul_(qi)
                s_vu = s_vu + _sum_sq64(si) * (step * step / bc2)
            continue
        eps_t = torch.full((), eps, dtype=vs[0].dtype, device=dev)
        acc_mu, acc_vu, acc_vu2 = _Acc(), _Acc(square=True), _Acc()
        pieces: list[tuple[Tensor, Tensor, Tensor]] = []
        scal: tuple[Tensor, ...] = ()
        q_buf: Tensor | None = None  # q of one compiled piece, later the eager pieces' q buffer
        for p, m, v in zip(ps, ms, vs):
            n_fast = 0
            if _use_compiled(p, m, v, count_limited):
                if q_buf is None:
                    scal = tuple(torch.tensor(x, dtype=torch.float32)
                                 for x in (decay, -lr * step, k1, knee, eps))
                    q_buf = torch.empty(_CTILE, dtype=torch.float32)
                pf, mf, vf = p.view(-1), m.view(-1), v.view(-1)
                n_fast = vf.numel() // _CTILE * _CTILE
                for i in range(0, n_fast, _CTILE):
                    res = _run_compiled(pf[i:i + _CTILE], mf[i:i + _CTILE], vf[i:i + _CTILE], q_buf, scal)
                    if res is None:  # failed before writing: this and the rest of the tensor run eager
                        n_fast = i
                        break
                    acc_mu.rows.append(res[0])
                    acc_vu2.rows.append(res[1])
                if n_fast:
                    pieces.extend(_tiles(pf[n_fast:], mf[n_fast:], vf[n_fast:]))
                    continue
            pieces.extend(_tiles(p, m, v))
        if pieces:
            n_buf = min(_TILE, max(t[2].numel() for t in pieces))
            buf_s = torch.empty(n_buf, dtype=vs[0].dtype, device=dev)
            if q_buf is not None and n_buf <= q_buf.numel() and buf_s.dtype == q_buf.dtype:
                buf_q = q_buf  # the compiled kernels are done with it
            else:
                buf_q = torch.empty_like(buf_s)
        for pt, mt, vt in pieces:
            n = vt.numel()
            si = buf_s[:n].view(vt.shape) if n <= buf_s.numel() else torch.empty_like(vt)
            qi = buf_q[:n].view(vt.shape) if n <= buf_q.numel() else torch.empty_like(vt)
            torch.sqrt(vt, out=si)
            if count_limited:
                limited = limited + (si < knee).sum()
            torch.clamp_min(si, knee, out=qi)
            torch.addcmul(eps_t, qi, si, value=k1, out=qi)
            torch.div(mt, qi, out=qi)
            if weight_decay != 0.0:
                pt.mul_(decay)
            pt.add_(qi, alpha=-lr * step)
            si.mul_(qi)  # s q
            acc_vu.sum_sq(si)
            torch.mul(mt, qi, out=si)  # m q = m² / (r + ε) >= 0 (cheaper than a batched dot here)
            acc_mu.sum(si)
        s_mu = s_mu + acc_mu.total(dev) * (step / bc1)
        s_vu = s_vu + (acc_vu.total(dev) + acc_vu2.total(dev)) * (step * step / bc2)
    parts = [s_mu, s_vu, limited] if count_limited else [s_mu, s_vu]
    return torch.stack(parts)


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
