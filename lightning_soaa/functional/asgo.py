"""ASGO and DASGO kernels on one matrix block. See :class:`lightning_soaa.optim.asgo.ASGO`.

Pure math: imports torch only. A block is a 2-D ``m x n`` matrix (a weight, a convolution kernel
reshaped to ``out x (in*kh*kw)``, or a slice of one along the preconditioned side). Nothing here is
global: ASGO needs no cross-rank scalar, so an owner rank computes a block's update alone.

Shapes: ``g``, ``m`` (momentum) and the update ``u`` are ``m x n``; the ASGO statistic ``V`` and the
preconditioner ``P`` are ``k x k`` with ``k = m`` on the left side (``m < n``) and ``k = n`` on the right
side (``m >= n``, so square matrices go right, as in the official code); the DASGO statistic is an
``n``-vector.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

try:  # optional (torch does not require it): precondition_checked's comparison on the host
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None  # type: ignore[assignment]

__all__ = [
    "LEFT",
    "RIGHT",
    "matrix_view",
    "preconditioned_side",
    "update_momentum_",
    "update_gram_",
    "gram_wide",
    "nesterov_direction",
    "precondition",
    "precondition_checked",
    "rms_numerator",
    "rms_factor",
    "rms_factors_host",
    "apply_scaled_updates_",
    "ema_",
]

LEFT = "left"
RIGHT = "right"


def matrix_view(t: Tensor) -> Tensor:
    """``t`` as ``shape[0] x prod(shape[1:])`` (a view when possible, else a copy). Explicit sizes, not
    ``-1``: an empty FSDP2 shard (0 rows) keeps its column count."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def preconditioned_side(m: int, n: int) -> str:
    """``"left"`` (precondition the ``m`` rows, V is m x m) when ``m < n``, else ``"right"`` (V is n x n)."""
    return LEFT if m < n else RIGHT


def update_momentum_(mom: Tensor, g: Tensor, beta1: float) -> None:
    """``M <- beta1 M + (1 - beta1) G`` in place (EMA, no bias correction; Nesterov: :func:`nesterov_direction`)."""
    mom.lerp_(g, 1.0 - beta1)


def update_gram_(v: Tensor, g: Tensor, beta2: float, side: str) -> None:
    """``V <- beta2 V + (1 - beta2) G G^T`` (left) or ``... G^T G`` (right), in place, from the raw ``G``."""
    if side == LEFT:
        v.addmm_(g, g.transpose(0, 1), beta=beta2, alpha=1.0 - beta2)
    else:
        v.addmm_(g.transpose(0, 1), g, beta=beta2, alpha=1.0 - beta2)


def gram_wide(v: Tensor, g: Tensor, beta2: float, side: str) -> Tensor:
    """:func:`update_gram_`'s ``V_t`` computed in float64 from ``v`` and ``g`` (each widened exactly), as a new
    float64 tensor; ``v`` is not written (the caller stores ``V_t`` rounded once, all blocks in one copy).

    Why: in ``v``'s own (narrower) dtype the product's rounding and the sum's fill the null space of a
    rank-deficient ``G G^T`` (a batch smaller than ``k``) with noise of ~1e-8 of its largest eigenvalue, and
    move its smallest real ones (measured ~1e-6 of the largest) by as much, where the root's map is steep: the
    root of a float32 ASGO's first step was 67% off its float64 value. From the float64 sum only the stored
    ``V_{t-1}``'s rounding remains (the products of two float32 numbers are exact in float64)."""
    wide = v.to(torch.float64)
    g64 = g.to(torch.float64)
    if wide.shape[-1] >= GRAM_STRIPS_MIN_K:
        return _lower_strips_gram_(wide, g64 if side == LEFT else g64.transpose(0, 1), beta2)
    if side == LEFT:
        return wide.addmm_(g64, g64.transpose(0, 1), beta=beta2, alpha=1.0 - beta2)
    return wide.addmm_(g64.transpose(0, 1), g64, beta=beta2, alpha=1.0 - beta2)


#: The smallest ``k`` whose float64 Gram :func:`gram_wide` forms by its lower triangle's row strips
#: (:func:`_lower_strips_gram_`). By ``k`` alone, as the float32 product's threshold: a Gram's rounding does not
#: depend on which blocks share its step. Below it the few extra operator calls cost about what they save.
GRAM_STRIPS_MIN_K = 192

#: Rows per strip of :func:`_lower_strips_gram_` (at most :data:`_GRAM_MAX_STRIPS` strips).
_GRAM_STRIP_ROWS = 32
_GRAM_MAX_STRIPS = 8


def _lower_strips_gram_(wide: Tensor, rows: Tensor, beta2: float) -> Tensor:
    """``beta2 W + (1 - beta2) R R^T`` of a symmetric float64 ``W`` (written) and ``R`` (``k x n``), computed on
    the lower triangle's row strips (strip ``i``: its rows times the columns up to its last; ``(S + 1) / 2S`` of
    the product's work for ``S`` strips) and mirrored, as a new symmetric tensor.

    Why: the float64 product is the largest cost of a step after the eigendecomposition (k = 256, n = 1024:
    9 ms of a 280 ms step, one thread), and half of it computes the upper triangle again (torch has no SYRK).
    Each entry is the same float64 dot product of two rows, in whatever order the GEMM kernel sums them
    (the products of float32 numbers are exact in float64; only the sum's last bits can differ from one
    GEMM call over the whole matrix). The mirror makes the result exactly symmetric (the eigendecomposition
    reads its lower triangle; the stored float32 Gram and the scale read all of it)."""
    k = rows.shape[0]
    strips = max(1, min(_GRAM_MAX_STRIPS, k // _GRAM_STRIP_ROWS))
    step = -(-k // strips)
    for lo in range(0, k, step):
        hi = min(k, lo + step)
        wide[lo:hi, :hi].addmm_(rows[lo:hi], rows[:hi].transpose(0, 1), beta=beta2, alpha=1.0 - beta2)
    # the mask is kept for plain tensors only: one made while tracing with fake tensors is not handed to real ones
    mask = _lower_mask(k, wide.device) if type(wide) is Tensor else _make_lower_mask(k, wide.device)
    return torch.where(mask, wide, wide.transpose(0, 1))


def _make_lower_mask(k: int, device: torch.device) -> Tensor:
    """``k x k`` bool, True on and below the diagonal; a plain tensor even when first made under
    ``torch.inference_mode`` (kept, an inference tensor made every later Gram of its size that autograd records
    raise: ``torch.where`` saves its mask for the backward)."""
    with torch.inference_mode(False):
        return torch.ones(k, k, dtype=torch.bool, device=device).tril_()


#: :func:`_make_lower_mask` kept per size and device (two operator calls saved a Gram); a few sizes at a time
#: (``k^2`` bytes each: one kept per size of every model a process ever stepped was memory never given back)
_lower_mask = functools.lru_cache(maxsize=16)(_make_lower_mask)


def nesterov_direction(mom: Tensor, g: Tensor, beta1: float) -> Tensor:
    """Muon's Nesterov direction ``D = beta1 M_t + (1 - beta1) G_t`` as a new tensor, from the momentum ``M_t``
    already updated with this step's ``G_t`` (:func:`update_momentum_`): ASGO with ``nesterov=True``
    preconditions ``D`` instead of ``M_t``; the statistic still sees ``G_t`` alone. One lerp from ``G``
    towards ``M`` (no temporary besides the result)."""
    return torch.lerp(g, mom, beta1)


def precondition(p: Tensor, mom: Tensor, side: str) -> Tensor:
    """``U = P M`` (left) or ``U = M P`` (right), in the dtype of ``mom``."""
    if p.dtype != mom.dtype:  # a no-op ``to`` still costs its argument parsing, at every step and block
        p = p.to(mom.dtype)
    return p @ mom if side == LEFT else mom @ p


#: The smallest ``k`` whose float32 ``P M`` on a CPU :func:`precondition_checked` checks for cancellation (rank-1
#: gradients: ASGO 9.2x a perfect float32 run's error at k = 96, 10.4x at 128, 14.9x at 256; smaller Grams keep
#: their step's operator count).
CHECKED_PRODUCT_MIN_K = 96

#: :func:`precondition_checked` recomputes ``P M`` in float64 when ``||P M||_F`` is below this fraction of
#: ``max_i P_ii ||M||_F``. Measured ``max z ||M|| / ||P M||``: 1.7e3-4.5e3 on rank-1, rank-k/4, batch-below-k,
#: sparse-row and mean-free Grams (k = 128..384), 1.4 on a full-rank one, 144-603 on the d=256 benchmark
#: transformer's 12 Grams (none recomputed after its first step).
CANCELLATION_RATIO = 1e-3


def precondition_checked(p: Tensor, mom: Tensor, side: str) -> Tensor:
    """:func:`precondition`, and for a float32 ``P M`` on a CPU with ``k >=`` :data:`CHECKED_PRODUCT_MIN_K` the
    vectors of it that show cancellation (:data:`CANCELLATION_RATIO`) again in float64, rounded once: each row
    ``m_i P`` (right side) or column ``P m_j`` (left side) whose norm is below the ratio of ``max_i P_ii`` times
    its own ``m``'s.

    Why: a Gram with a large null space (rank-1 gradients, a batch below ``k``) gives ``P`` its null value
    (~1e3x its values on the kept directions) on most directions, and ``M`` lies in the kept ones: ``P M`` is a
    sum of terms ~1e3x its result, and the float32 GEMM's accumulation leaves ~1e3 eps of them in it. ASGO ran
    9.2-17x a perfect float32 run's error there (k = 96..384; rank-k/4 11.6-12.3x at k = 384, 512); 2.9-6.5x with
    this check (rank 1 and a batch below k at k = 128, 256: 3.3-3.4x with every ``P M`` in float64, 2.5x with
    ``P`` not rounded to float32 too, 1.4-1.7x with the Nesterov direction in float64 as well). Every ``P M`` in
    float64 cost 1.12x the d=256 benchmark's ``root_every=1`` step and 1.52x at ``root_every=10`` (CPU time, one
    thread, paired steps); the check (``P`` is positive semi-definite, so its largest entry is on its diagonal;
    one host read, which waits for nothing on a CPU) ~1.0x. Why per vector, not one norm of the block: each
    vector of ``P M`` is its own ``m``'s product, and an FSDP2 rank holds a row shard of ``M`` (right side):
    a decision from the shard's norms took a different precision on each rank (rows recomputed at W = 2 that
    one process kept), where each row's own decision is the same at every world size. float64 and
    narrower-than-float32 updates and accelerators (where a host read waits for the device) are unchanged."""
    u = precondition(p, mom, side)
    if u.dtype != torch.float32 or u.device.type != "cpu" or p.shape[-1] < CHECKED_PRODUCT_MIN_K:
        return u
    dim, along = (-2, -1) if side == RIGHT else (-1, -2)  # the vectors (rows of M P, columns of P M) along dim
    m_norms, u_norms = _vector_norms(mom, along), _vector_norms(u, along)
    # (NaN compares False: kept, NaN either way; an inf norm of M recomputes its vector, in range in float64)
    host = _np is not None and type(p) is Tensor and not p.requires_grad
    bad: Any  # the host's index array, or a tensor of them
    if host:
        # P's largest diagonal entry and the comparison on the host: three operator calls (the arrays' detach),
        # five with the entry read as a tensor (diagonal, amax, item); the same float (a maximum is exact, and a
        # NaN propagates in both)
        limit = CANCELLATION_RATIO * float(_np.diagonal(p.numpy()).max())
        bad = _np.flatnonzero(u_norms.numpy() < limit * m_norms.numpy())
        count = int(bad.size)
    else:
        limit = CANCELLATION_RATIO * torch.diagonal(p).amax().item()  # the one host read
        bad = (u_norms < limit * m_norms).nonzero().squeeze(1)
        count = bad.numel()
    if count == 0:
        return u
    p64 = p.to(torch.float64)
    if count == u.shape[dim]:
        return precondition(p64, mom.to(torch.float64), side).to(torch.float32)
    idx = bad if isinstance(bad, Tensor) else torch.from_numpy(bad)
    part = precondition(p64, mom.index_select(dim, idx).to(torch.float64), side).to(torch.float32)
    return u.index_copy_(dim, idx, part)


#: The fewest columns of a matrix whose column norms :func:`_vector_norms` takes from a transposed copy.
STRIDED_NORMS_MIN_VECTORS = 512


def _vector_norms(x: Tensor, along: int) -> Tensor:
    """The 2-norms of ``x``'s vectors along dim ``along`` (-1: rows, -2: columns). Columns of a matrix with
    :data:`STRIDED_NORMS_MIN_VECTORS` or more of them from a row-major copy of ``x^T``: torch's norm along
    the strided dim is ~50x slower than along the contiguous one (CPU, one thread: 2.5 ms against 0.05 ms at
    256 x 1024, 0.5 ms with the copy; 0.16 ms at 256 x 256, where the copy saves nothing). Each vector's norm
    still depends on that vector alone, so each one's decision is the same at every world size."""
    if along == -2 and x.dim() == 2 and x.shape[-1] >= STRIDED_NORMS_MIN_VECTORS:
        x, along = x.transpose(0, 1).contiguous(), -1
    norms: Tensor = torch.linalg.vector_norm(x, dim=along)
    return norms


def rms_numerator(rms_scale: float, numel: int) -> float:
    """``rms_scale * sqrt(numel)``: the Frobenius norm of an update of ``numel`` entries with entry-RMS
    ``rms_scale`` (``numel`` of the whole update when a block is one piece of it)."""
    return rms_scale * math.sqrt(numel)


def rms_factor(norm: Tensor, numerator: Tensor | float, out_dtype: torch.dtype | None = None) -> Tensor:
    """``numerator / ||U||_F``: ``U * rms_factor(||U||_F, rms_numerator(rms_scale, U.numel()))`` has
    entry-RMS ``rms_scale``. ``norm`` may hold one norm per block (then ``numerator`` a like tensor or one
    float), so the step computes every block's factor at once.

    Computed as ``reciprocal(norm) * numerator``, which is how torch divides a float by a tensor, so a
    float and a tensor numerator round alike. A zero norm (a zero update, e.g. zero gradients so far) is
    clamped to the smallest normal number, and the factor to the largest finite one: ``1 / tiny`` times a
    numerator above ~4 overflows to inf, and ``0 * inf`` would make the zero update NaN. With no host
    sync; a finite factor is unchanged, a NaN norm stays NaN.

    ``out_dtype``: the dtype of the update the factor multiplies, when narrower than ``norm``'s (DASGO's
    float64 norm of a parameter cut into blocks, scaling a float32 or bf16 block): the clamp is then that
    dtype's largest finite number, since the multiplication rounds the factor to it and float64's
    largest would round to inf (and ``0 * inf`` is NaN).
    """
    finfo = torch.finfo(norm.dtype)
    cap = finfo.max if out_dtype is None else min(finfo.max, torch.finfo(out_dtype).max)
    return (norm.clamp_min(finfo.tiny).reciprocal() * numerator).clamp_max(cap)


def rms_factors_host(norms: Sequence[float], numerators: Sequence[float], out_dtype: torch.dtype) -> list[float]:
    """:func:`rms_factor` of float64 norms read to the host, as floats, bit for bit: the same IEEE double
    operations (``max`` with the smallest normal number, ``1 / x``, the product, ``min`` with the cap; Python's
    ``max(nan, x)`` and ``min(nan, x)`` keep the NaN as the clamps do). Why: on a CPU a host read waits for
    nothing, and the five operator calls of the tensor form cost more than it (a float32 or float64 update is
    scaled alike by a 0-d float64 tensor and by its float)."""
    tiny = torch.finfo(torch.float64).tiny
    cap = min(torch.finfo(torch.float64).max, torch.finfo(out_dtype).max)
    return [min((1.0 / max(n, tiny)) * numer, cap) for n, numer in zip(norms, numerators)]


def apply_scaled_updates_(params: list[Tensor], updates: list[Tensor], factors: list[Tensor] | list[float], lr: float,
                          weight_decay: float) -> None:
    """``W <- W (1 - lr wd) - lr (f U)`` for each block, as multi-tensor ops. ``updates`` (each the matrix
    form of its parameter's shape, or that shape) are scaled in place: they are the step's own fresh
    tensors, so no second copy of every update is made. float16/bfloat16 parameters are stepped on float32
    copies and rounded once. Parameters made under ``torch.inference_mode()`` (the optimizer's step runs with
    it off) are written inside it, the only place torch lets them change in place; the same operations."""
    if any(p.is_inference() for p in params):
        with torch.inference_mode():
            _apply_scaled_updates_(params, updates, factors, lr, weight_decay)
    else:  # (inference_mode(False) would turn grad mode back on: the step's no_grad must hold)
        _apply_scaled_updates_(params, updates, factors, lr, weight_decay)


def _apply_scaled_updates_(params: list[Tensor], updates: list[Tensor], factors: list[Tensor] | list[float],
                           lr: float, weight_decay: float) -> None:
    torch._foreach_mul_(updates, factors)
    low = [p for p in params if p.dtype in _ROUND_ONCE]
    # float16/bf16 parameters: decay and update on float32 copies, rounded once (in their own dtype the
    # decayed weight, the cast update and their sum were each rounded: 2-7x the error of one rounding)
    work = [p.float() if p.dtype in _ROUND_ONCE else p for p in params] if low else params
    if weight_decay != 0.0:
        torch._foreach_mul_(work, 1.0 - lr * weight_decay)
    torch._foreach_add_(work, [_like(u, w) for u, w in zip(updates, work)], alpha=-lr)
    if low:
        torch._foreach_copy_(low, [w for p, w in zip(params, work) if p.dtype in _ROUND_ONCE])


#: parameter dtypes whose step is computed in float32 and rounded once
_ROUND_ONCE = (torch.float16, torch.bfloat16)


def _like(u: Tensor, p: Tensor) -> Tensor:
    """``u`` in ``p``'s shape and dtype; ``u`` itself when it has them (a reshape to the same shape still
    costs an ATen call)."""
    if u.shape != p.shape:
        u = u.reshape(p.shape)
    return u if u.dtype == p.dtype else u.to(p.dtype)


def ema_(stats: list[Tensor], values: list[Tensor], beta: float) -> None:
    """``S <- beta S + (1 - beta) X`` in place for every pair: DASGO's column statistic (``X`` = the column
    sums of ``G^2``, local or summed over a mesh) and a row-sharded block's Gram (``X`` = the mesh sum of
    ``G_r^T G_r``). Multi-tensor ops: a fixed number of kernels for any number of blocks."""
    torch._foreach_mul_(stats, beta)
    torch._foreach_add_(stats, values, alpha=1.0 - beta)
