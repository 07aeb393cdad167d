"""Dense linear algebra for the curvature optimizers: matrix inverse square roots (ASGO).

Pure math: imports torch (and numpy where installed, for host-side arithmetic of the eigendecomposition route
that gives the tensor operations' bits). Every function takes one symmetric positive semi-definite ``k x k``
matrix and returns a new tensor; nothing is modified in place.

Inverse square roots (used by :class:`lightning_soaa.optim.asgo.ASGO`):

* ``"polar_express"``: coupled polynomial iteration with the Polar Express coefficients
  (Amsel et al., 2025), 10 iterations. Matmuls only, so it runs well on accelerators.
* ``"polar_express_eigh"``: the same matrix function (the iteration's eigenvalue map applied to the
  eigenvalues of one float64 eigendecomposition): equal in exact arithmetic, more accurate, and cheaper
  on a CPU at every size (about 2x at k = 256). A float32 root of k >= 192 is then formed mostly in float32 on
  a CPU (:func:`_compose_float32`: 0.6-0.9x the float64 product's time, within 1.3x its error).
* ``"auto"`` (ASGO's default): ``"polar_express_eigh"`` for float32 (or narrower) statistics on a CPU,
  ``"polar_express"`` otherwise, so every device and dtype computes the same function (see
  :func:`resolve_root_method`).
* ``"newton_schulz"``: the same coupled iteration with the constant Newton-Schulz polynomial
  ``(a, b, c) = (2, -1.5, 0.5)``; converges more slowly from small eigenvalues (18 iterations default).
* ``"eigh"``: ``float64`` eigendecomposition, the reference. Eigenvalues below ``rcond * max`` are
  treated as zero (pseudo-inverse root), so a rank-deficient statistic gives the exact polar factor;
  ``rcond`` is 1e-12 for a float64 statistic and 4 eps of a narrower one's dtype (:func:`eigh_rcond`: below
  that its eigenvalues are rounding noise).

The iterations run in ``float32`` or wider (never in bf16/fp16: the statistic is rank-deficient early
in training and the small eigenvalues would be lost). For a ``float32`` statistic the map has a floor
(:func:`root_floor`): the iteration runs on ``V/s + delta I`` and three Newton-Schulz steps on ``V/s``
then restore the eigenvalues above the floor, so a Gram with a null space (whose float32 eigenvalues
there are rounding noise, some negative) keeps a bounded root on every device; a matrix whose ``||V||`` is at most
1/128 of ``s`` (``eps`` makes the rest) takes the bare map, the float64 one (:data:`BARE_MAP_RATIO`).
A non-finite result is returned
as is: the
caller decides what to do with it (ASGO keeps its previous preconditioner and counts the event).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

try:  # optional (torch does not require it): the eigendecomposition route's scalar map on the host, vectorised
    import numpy as _np
except ImportError:  # pragma: no cover - then Python floats or tensor operations, the same bits
    _np = None  # type: ignore[assignment]

__all__ = [
    "ROOT_METHODS",
    "ROOT_CHOICES",
    "resolve_root_method",
    "DEFAULT_ROOT_ITERS",
    "POLAR_EXPRESS_COEFFS",
    "NEWTON_SCHULZ_COEFFS",
    "root_compute_dtype",
    "root_floor",
    "default_root_iters",
    "FLOOR_POLISH_STEPS",
    "FLOOR_MIN_ITERS",
    "F32_PRODUCT_MIN_K",
    "floor_min_iters",
    "damp",
    "inv_sqrt_coupled",
    "inv_sqrt_polar_express",
    "inv_sqrt_newton_schulz",
    "inv_sqrt_eigh",
    "eigh_rcond",
    "EIGH_NOISE_ULPS",
    "coupled_scalar_map",
    "inv_sqrt_spectral",
    "inverse_sqrt",
    "PendingRoots",
    "HostMap",
    "pending_inverse_sqrt",
    "pad_batch",
]

ROOT_METHODS: tuple[str, ...] = ("polar_express", "newton_schulz", "eigh", "polar_express_eigh")

# Degree-5 Polar Express polynomials p(x) = a x + b x^3 + c x^5 (Amsel, Persson, Musco, Gower 2025,
# arXiv 2505.16932, designed for singular values in [1e-3, 1]). All but the last are divided by the
# paper's safety factors (1.01, 1.01^3, 1.01^5); the last triple repeats after the eighth iteration.
_PE_RAW: tuple[tuple[float, float, float], ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = tuple(
    (a / 1.01, b / 1.01**3, c / 1.01**5) for (a, b, c) in _PE_RAW[:-1]
) + (_PE_RAW[-1],)

#: Constant coupled Newton-Schulz polynomial for V^{-1/2} ("Algorithm 3" of the ASGO code).
NEWTON_SCHULZ_COEFFS: tuple[float, float, float] = (2.0, -1.5, 0.5)

#: Iterations used when the caller passes ``num_iters=None``. A scalar check of the recursion: after
#: the Frobenius scaling, eigenvalues >= 1e-7 of the scaled matrix converge to machine precision with
#: these counts (Polar Express 10, Newton-Schulz 18).
DEFAULT_ROOT_ITERS: dict[str, int] = {"polar_express": 10, "newton_schulz": 18, "eigh": 0, "polar_express_eigh": 10,
                                      "auto": 10}

#: What ``inverse_root`` accepts: a method, or ``"auto"`` (see :func:`resolve_root_method`).
ROOT_CHOICES: tuple[str, ...] = (*ROOT_METHODS, "auto")


def resolve_root_method(method: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """``"auto"``: ``"polar_express_eigh"`` for a float32 (or narrower) statistic on the CPU, else
    ``"polar_express"``; any other method as given.

    Both compute the same matrix function (the Polar Express map of the statistic's dtype, with its floor
    for float32: :func:`root_floor`), so the choice changes
    rounding only. Why the eigendecomposition on a CPU: one float64 eigendecomposition of a k x k Gram
    costs about 18 float32 matmuls of its size, the iteration 37 (k = 256, one thread;
    benchmarks/eval_asgo_roots.py). Why only below float64: LAPACK's eigendecomposition has a backward
    error of ~k * 1e-16 ``||V||`` that is not a smooth function of ``V`` (its pivoting/deflation decisions
    can flip), far below a float32 statistic's own rounding (6e-8) but 100x above a float64 one's; the
    map's slope at small eigenvalues then turns it into a 6e-8 relative difference between 2 ranks and
    one process (measured, tests/multinode), where the iteration's straight-line matmuls stay within
    1e-9. On accelerators eigendecompositions are slow and synchronising, and the iteration is fast.

    At every size ``k``: the route's fixed cost is ~25 operator calls (:func:`inv_sqrt_spectral`), less than
    the iteration's ~65 even where the LAPACK call is smallest. CPU time of one root, one thread, this route /
    the float64 iteration (which "auto" ran below k = 48 before; the float32 one is 1-8% off on Grams with a
    null space, its rounding between kept and null directions times the map's null value twice): 0.71x at
    k = 4, 0.77x at 10, 0.76x at 20, 0.78x at 32, 0.84x at 48 (medians of 300 interleaved calls).
    """
    if method != "auto":
        return method
    cpu_narrow = device.type == "cpu" and root_compute_dtype(dtype) == torch.float32
    return "polar_express_eigh" if cpu_narrow else "polar_express"


@functools.cache  # called a dozen times a step; torch.promote_types is an operator call each time
def root_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 or wider: half precisions are promoted, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


#: The floor of the scaled spectrum for each compute dtype (absent: no floor). Why float32 has one: its
#: Grams with a null space (LayerNorm's mean direction in the next projection's Gram; 60-70% of a
#: transformer's attention-output Gram below 1e-7 s) carry eigenvalues of rounding noise down to about
#: -2e-8 s, and the bare iteration's map grows without bound below 0 (z(-1e-8) = 8.7 z(0), z(-1e-7) ~ 1e21):
#: on a GPU 39-57 of a 12-layer GPT's 72 float32 roots left their bound every step and went to the float64
#: eigendecomposition (most of a 400 ms step). From V/s + 2e-7 I every eigenvalue the iteration sees is
#: positive. A float64 statistic's noise (~1e-16 s) is below the map's own resolution (~2e-9 s): no floor.
_ROOT_FLOORS: dict[torch.dtype, float] = {torch.float32: 2e-7}

#: Newton-Schulz steps ``z <- z (1.5 - 0.5 z^2 x)`` (coupled, :func:`_polish`) towards the unfloored
#: ``Y = V/s`` after a floored iteration. Scalar check (``x`` = an eigenvalue of Y): from
#: ``z = (x + 2e-7)^{-1/2}`` three steps bring every ``x >= 1e-6`` to ``x^{-1/2}`` within 5e-8 relative (two:
#: 1.8e-4; the spec's oracle asks 1e-3 of ``ZVZ - I`` there, and float32 rounding adds its own), ``x = 1e-7``
#: within 0.8%; ``x = 0`` maps to 7.5e3 (the bare map's z(0) is 2.2e4), and noise down to ``x = -2.5e-8`` to
#: at most 1.25e4 (1.66 z(0); -5e-8: 2.75e4).
FLOOR_POLISH_STEPS = 3

#: Polar Express iterations of a floored map when the caller gives none: the floor bounds the spectrum
#: below at 2e-7, where 8 iterations converge as far as 10 (the scalar map agrees to 5e-8 for x >= 1e-6), so
#: 8 iterations and the 3 polishing steps (30 + 8 matmuls) cost about what 10 bare iterations did (37).
_FLOORED_ROOT_ITERS: dict[str, int] = {"polar_express": 8}

#: The fewest iterations after which a floored map may be polished. A Newton-Schulz step ``z (1.5 - 0.5 u)``,
#: ``u = z^2 x``, turns the sign of ``z`` where ``u > 3``, and the first Polar Express iterations overshoot:
#: the largest ``u`` over ``x`` in [0, 1] before the polish is 3.97 / 3.87 / 3.48 after 1 / 2 / 3 iterations,
#: 2.43 after 4, 1.26 after 5 (the same for any floor up to 1e-3). So 1-3 floored iterations gave a root
#: with negative eigenvalues (down to -25 / sqrt(s) on a spectrum in [1e-3, 1]): an indefinite
#: preconditioner, steps uphill along those directions. Newton-Schulz never overshoots (``u <= 1``).
FLOOR_MIN_ITERS: dict[str, int] = {"polar_express": 4}


def root_floor(dtype: torch.dtype) -> float:
    """The floor ``delta`` of the scaled spectrum for a statistic of ``dtype`` (0.0: no floor); see
    :data:`_ROOT_FLOORS`."""
    return _ROOT_FLOORS.get(root_compute_dtype(dtype), 0.0)


def default_root_iters(method: str, dtype: torch.dtype, floor: float | None = None) -> int:
    """Iterations of ``method`` (a method of :data:`ROOT_CHOICES`) for a statistic of ``dtype`` when the
    caller gives none: :data:`DEFAULT_ROOT_ITERS`, fewer for Polar Express where the map has a floor
    (``floor``; None: :func:`root_floor` of ``dtype``)."""
    key = "polar_express" if method in ("auto", "polar_express_eigh") else method
    floor = root_floor(dtype) if floor is None else floor
    if floor > 0.0 and key in _FLOORED_ROOT_ITERS:
        return _FLOORED_ROOT_ITERS[key]
    return DEFAULT_ROOT_ITERS[method]


def floor_min_iters(method: str) -> int:
    """The fewest iterations of ``method`` (a method of :data:`ROOT_CHOICES`) whose map may have a floor; see
    :data:`FLOOR_MIN_ITERS`."""
    key = "polar_express" if method in ("auto", "polar_express_eigh") else method
    return FLOOR_MIN_ITERS.get(key, 1)


def _bare_iters(method: str, dtype: torch.dtype, num_iters: int | None, floor: float | None) -> int | None:
    """The iterations of the bare map that a matrix of a floored map takes where its floor is not needed
    (:data:`BARE_MAP_RATIO`): the caller's, else the bare map's default (a float64 statistic's); None where the
    caller chose the floor (an explicit floor is kept as given)."""
    if floor is not None:
        return None
    return default_root_iters(method, dtype, 0.0) if num_iters is None else num_iters


def _map_of(method: str, dtype: torch.dtype, num_iters: int | None, floor: float | None) -> tuple[int, float]:
    """``(iterations, floor)`` of the map a call computes, the caller's choices filled in for ``dtype``.

    Fewer iterations than :func:`floor_min_iters` keep the bare map where the floor is the dtype's default
    (``floor=None``) and are refused with an explicit one: their polished map is not positive."""
    given = floor
    floor = root_floor(dtype) if floor is None else float(floor)
    n = default_root_iters(method, dtype, floor) if num_iters is None else num_iters
    coeffs = (NEWTON_SCHULZ_COEFFS,) if method == "newton_schulz" else POLAR_EXPRESS_COEFFS
    if floor > 0.0 and not _polish_keeps_sign(tuple(coeffs), n, floor):  # the rule _floor_of applies too
        if given is not None:
            raise ValueError(f"Invalid floor={given!r} with num_iters={n} for method={method!r}: a floored map "
                             f"needs at least {floor_min_iters(method)} iterations (fewer give roots with negative "
                             "eigenvalues); pass floor=None or 0.0, or more iterations.")
        floor = 0.0
    return n, floor


def damp(v: Tensor, damping: float, sizes: Sequence[int] | None = None) -> Tensor:
    """``V + damping * tr(V)/k * I``: a damping relative to the mean eigenvalue (a new tensor).

    Unlike the ``eps`` inside the scaling norm of the iterations, this really changes the matrix, so
    eigenvalues of the result are at least ``damping * mean eigenvalue``. ``sizes``: a zero-padded batch
    (:func:`pad_batch`): each matrix's own ``k``, and its padding stays zero.
    """
    if damping == 0.0:
        return v.clone()
    out = v.clone()
    if sizes is not None:
        mask = _real_diagonal(sizes, v.shape[-1], v.dtype, v.device)
        shift = damping * torch.diagonal(v, dim1=-2, dim2=-1).sum(-1) / mask.sum(-1)
        torch.diagonal(out, dim1=-2, dim2=-1).add_(shift.unsqueeze(-1) * mask)
        return out
    k = v.shape[-1]
    shift = damping * torch.diagonal(v, dim1=-2, dim2=-1).sum(-1) / k
    torch.diagonal(out, dim1=-2, dim2=-1).add_(shift.unsqueeze(-1) if out.dim() > 2 else shift)
    return out


def pad_batch(mats: Sequence[Tensor], size: int) -> Tensor:
    """``[n, size, size]``: each ``k x k`` matrix (``k <= size``) in the top-left corner of zeros.

    Why: the roots of a small MLP's Grams (k = 10, 20, 48) cost ~80 small ops each, nearly all of it
    per-op overhead; one batch padded to the largest costs the ops of one. Every function of this module
    that takes ``sizes`` maps a block-diagonal ``diag(V, 0)`` to ``diag(f(V), f(0) I)``, and a matmul of
    block-diagonal matrices keeps the zero blocks exactly zero, so the corner is ``V``'s own result (only
    the rounding may differ from an unpadded call; callers pad to a size that does not depend on which
    matrices share the batch, so it is the same at every world size).
    """
    ref = mats[0]
    out = torch.zeros(len(mats), size, size, dtype=ref.dtype, device=ref.device)
    for i, m in enumerate(mats):
        out[i, : m.shape[-1], : m.shape[-1]] = m
    return out


def _real_diagonal(sizes: Sequence[int], size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[n, size]``: 1 on the diagonal entries of each padded matrix's own ``k x k`` corner, else 0."""
    ks = _host_values(sizes, torch.int64, device).unsqueeze(-1)
    return (torch.arange(size, device=device) < ks).to(dtype)


def _host_values(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host numbers as a tensor on ``device``, copied without waiting: ``torch.tensor(..., device=cuda)``
    copies from pageable memory synchronously, i.e. waits for the stream (a host sync per padded batch);
    a non-blocking copy from pageable memory is staged at once and does not wait. On a CPU: no copy."""
    return torch.tensor(list(values), dtype=dtype).to(device, non_blocking=True)


def inv_sqrt_coupled(
    v: Tensor, coeffs: Sequence[tuple[float, float, float]], num_iters: int, eps: float = 1e-10,
    floor: float | None = None,
) -> Tensor:
    """V^{-1/2} of a symmetric PSD ``k x k`` matrix (or a ``b x k x k`` batch) by a coupled iteration;
    see :func:`_coupled`. ``floor=None``: :func:`root_floor` of ``v``'s dtype (none for iterations too few
    to polish, :data:`FLOOR_MIN_ITERS`)."""
    return _coupled(v, coeffs, num_iters, eps, floor=_floor_of(v, floor, coeffs, num_iters))[0]


def _floor_of(v: Tensor, floor: float | None, coeffs: Sequence[tuple[float, float, float]] | None = None,
              num_iters: int = 0) -> float:
    """``floor``, or (None) :func:`root_floor` of ``v``'s dtype where the polished map of ``coeffs`` and
    ``num_iters`` stays positive (:func:`_polish_keeps_sign`), else 0.0."""
    if floor is not None:
        return float(floor)
    default = root_floor(v.dtype)
    if default > 0.0 and coeffs is not None and not _polish_keeps_sign(tuple(coeffs), num_iters, default):
        return 0.0
    return default


@functools.cache
def _polish_keeps_sign(coeffs: tuple[tuple[float, float, float], ...], num_iters: int, floor: float) -> bool:
    """Whether the floored iteration leaves ``u = z^2 x`` below 3 for every ``x`` in [0, 1], so that the
    polishing steps ``z (1.5 - 0.5 u)`` keep ``z`` positive (:data:`FLOOR_MIN_ITERS`; 2.75: a margin for
    rounding). On a dense grid (the map is a smooth function of ``x``; cached)."""
    x = torch.cat([torch.linspace(0.0, 1.0, 4097, dtype=torch.float64),
                   torch.logspace(-12.0, 0.0, 4097, dtype=torch.float64)])
    y, z = x + floor, torch.ones_like(x)
    for i in range(num_iters):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        q = a + (z * y) * (b + c * (z * y))
        y, z = y * q, z * q
    return bool((z * z * x).max() <= 2.75)


def _coupled(
    v: Tensor, coeffs: Sequence[tuple[float, float, float]], num_iters: int, eps: float = 1e-10,
    sizes: Sequence[int] | None = None, floor: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """V^{-1/2} of a symmetric PSD ``k x k`` matrix (or a ``b x k x k`` batch) by a coupled iteration.

    Scale ``s = 1.01 * ||V + eps I||_F`` so that the spectrum of ``Y = V/s`` lies in [0, 1); start from
    ``Z = I`` and repeat, with the triple ``(a, b, c)`` of iteration ``i`` (the last triple repeats)::

        T = Z Y;  B = b T + c T^2;  Y <- a Y + Y B;  Z <- a Z + B Z

    Eigenvalue-wise this is ``x <- x p(x)^2`` with ``p(x) = a + b x + c x^2``, which drives every
    eigenvalue of ``Z Y`` to 1, so ``Y -> (V/s)^{1/2}`` and ``Z -> (V/s)^{-1/2}``. Returns ``Z / sqrt(s)``.
    ``eps`` enters only the scaling norm; a zero eigenvalue gives a large finite value (about
    ``2.2e4/sqrt(s)`` for 10 Polar Express iterations), i.e. an implicit damping, never infinity.

    ``floor > 0`` (:func:`root_floor`): the iteration starts from ``Y = V/s + floor I`` instead, and
    :data:`FLOOR_POLISH_STEPS` Newton-Schulz steps towards ``Y0^{-1/2}``, ``Y0 = V/s``, follow (:func:`_polish`).

    Cost: ``4 * num_iters - 3`` matmuls (the first iteration has ``Z = I``, the last needs no ``Y``); with
    a floor one more (the last ``Y``) and ``3 * steps - 1`` for the polishing steps (38 for 8 + 3).
    Runs in :func:`root_compute_dtype` of ``v``; the result has that dtype and ``v``'s shape. Also returns
    the float64 scales ``s`` (one per matrix), for :func:`checked_coupled`. ``sizes``: a zero-padded
    batch (:func:`pad_batch`); ``eps`` then enters each matrix's own corner only, so ``s`` is its own.
    """
    dt = root_compute_dtype(v.dtype)
    squeeze = v.dim() == 2
    v3 = v.to(dt).reshape(-1, v.shape[-2], v.shape[-1])
    k = v3.shape[-1]
    eye, shift = _constants(k, dt, v.device, eps, None if sizes is None else tuple(int(n) for n in sizes),
                            plain=type(v) is Tensor)
    # the norm accumulated in float64: a float32 Gram with entries ~1e20 (gradients ~1e10) is finite but
    # its float32 norm is not, and Y = V / inf = 0 made the root exactly 0, a finite "success"
    s64 = 1.01 * torch.linalg.matrix_norm(v3 + shift, dtype=torch.float64).reshape(-1, 1, 1)
    s = s64.to(dt)  # inf where the scale itself is beyond the dtype: the result is then NaN (below)
    y0 = v3 / s
    # the floor on the whole diagonal, a padded batch's padding too: diag(V, 0) still maps to diag(f(V), f(0) I)
    # y0 + floor I as one add (floor * 1 and floor * 0 are exact, so the sum rounds as y0 + floor * eye)
    z, y = _iterate(torch.add(y0, eye, alpha=floor) if floor > 0.0 else y0, eye, coeffs, num_iters,
                    last_y=floor > 0.0)
    if floor > 0.0:
        # the iteration keeps Y = (Y0 + floor I) Z, so Y0 Z = Y - floor Z without a product of large factors
        z = _polish(z, y - floor * z, FLOOR_POLISH_STEPS)
    # a non-finite scale gives an all-NaN root (callers check): s - s is +0 for a finite s (>= 0, so s + 0 is
    # s, bit for bit) and NaN for inf or NaN; four small ops instead of a where over the whole batch
    out = z / torch.sqrt(s + (s - s))
    return out[0] if squeeze else out.reshape(v.shape), s64.reshape(-1)


#: the most elements one kept ``(I, eps I)`` pair may hold: k = 256 unpadded, or a padded batch as large (its
#: shift is ``[n, k, k]``, growing with ``n``): 16 pairs of at most 1 MiB (float64), 16 MiB in all
_CONSTANTS_MAX_NUMEL = 2 * 256 * 256


def _constants(k: int, dtype: torch.dtype, device: torch.device, eps: float,
               sizes: tuple[int, ...] | None, plain: bool = True) -> tuple[Tensor, Tensor]:
    """``(I, eps I)`` of :func:`_coupled` (``eps`` on each padded matrix's own diagonal for ``sizes``), kept
    between calls when small (:data:`_CONSTANTS_MAX_NUMEL`): making them was three operator calls per batch
    at every step, as costly as a small batch's matmuls. Never written to (callers only read them).

    ``plain``: the statistic is a plain tensor. A FakeTensor (FakeTensorMode, torch.export), a DTensor or
    another subclass gets tensors made for the call: a fake identity kept would be handed to later real
    calls (and a real one to fake calls), which then raise at every step."""
    numel = k * k * (2 if sizes is None else 1 + len(sizes))
    if not plain or numel > _CONSTANTS_MAX_NUMEL:
        return _make_constants(k, dtype, device, eps, sizes)
    eye, shift = _cached_constants(k, dtype, device, eps, sizes)
    if type(eye) is not Tensor:  # made under a tensor mode that takes plain inputs (a fake one): not kept
        _cached_constants.cache_clear()
        return _make_constants(k, dtype, device, eps, sizes)
    return eye, shift


def _make_constants(k: int, dtype: torch.dtype, device: torch.device, eps: float,
                    sizes: tuple[int, ...] | None) -> tuple[Tensor, Tensor]:
    # plain tensors even when first made under torch.inference_mode (an inference tensor cannot be
    # saved for a backward pass through the iteration)
    with torch.inference_mode(False), torch.no_grad():
        eye = torch.eye(k, dtype=dtype, device=device)
        shift = eps * (eye if sizes is None else torch.diag_embed(_real_diagonal(sizes, k, dtype, device)))
    return eye, shift


_cached_constants = functools.lru_cache(maxsize=16)(_make_constants)


def _iterate(y: Tensor, eye: Tensor, coeffs: Sequence[tuple[float, float, float]], num_iters: int,
             last_y: bool = False) -> tuple[Tensor, Tensor]:
    """``(Z, Y)`` of the coupled iteration from ``Y`` (a batch) and ``Z = I``; see :func:`_coupled`. The
    last iteration updates ``Y`` only if ``last_y`` (one more matmul); otherwise the ``Y`` returned is
    one iteration behind."""
    z = eye.expand_as(y)
    for i in range(num_iters):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        t = y if i == 0 else torch.bmm(z, y)
        bmat = torch.baddbmm(t, t, t, beta=b, alpha=c)  # b T + c T^2
        if last_y or i < num_iters - 1:
            y = torch.baddbmm(y, y, bmat, beta=a)  # a Y + Y B
        # a Z + B Z; at i = 0 Z = I, and B + a I is one add (a * 1 and a * 0 are exact)
        z = torch.add(bmat, eye, alpha=a) if i == 0 else torch.baddbmm(z, bmat, z, beta=a)
    return z, y


def _polish(z: Tensor, w: Tensor, steps: int) -> Tensor:
    """``steps`` coupled Newton-Schulz steps from ``Z`` towards ``Y^{-1/2}`` (a batch), given ``W = Y Z``.

    Eigenvalue-wise ``z <- z (1.5 - 0.5 z^2 y)``: quadratic convergence where ``z^2 y`` is near 1, and a
    factor of at most ~1.5 a step where ``y`` is ~0, so a floored root's null directions stay bounded.
    Coupled (``T = Z W``; ``W <- W (1.5 I - 0.5 T)``, ``Z <- (1.5 I - 0.5 T) Z``) because the plain form
    ``Z <- 1.5 Z - 0.5 Z (Z Y Z)`` is unstable: in float32 at condition 1e6 it diverged in the third step
    (relative error 12). ``W`` must not be formed as the product ``Y Z`` either: its small components
    (``sqrt(x)``) would come out of a cancellation of ``Y``'s entries times ``Z``'s (up to ~2e3), 12% off
    at ``x = 5e-7`` in float32; the caller forms it from the floored iteration's own ``Y`` (see
    :func:`_coupled`)."""
    for i in range(steps):
        t = torch.bmm(z, w)
        if i < steps - 1:
            w = torch.baddbmm(w, w, t, beta=1.5, alpha=-0.5)
        z = torch.baddbmm(z, t, z, beta=1.5, alpha=-0.5)
    return z


def coupled_scalar_map(
    x: Tensor, coeffs: Sequence[tuple[float, float, float]], num_iters: int, floor: float = 0.0
) -> Tensor:
    """The eigenvalue map of :func:`inv_sqrt_coupled`: ``z`` with ``Z = z(Y)`` for a scaled eigenvalue ``x``.

    Runs the coupled recursion on scalars (``y <- y q``, ``z <- z q`` with ``q = a + b t + c t^2``,
    ``t = z y``), elementwise, in float64, from ``x + floor``, then (``floor > 0``) the polishing steps
    ``z <- z (1.5 - 0.5 z^2 x)``. Negative ``x`` (rounding noise of a PSD matrix) count as 0, so every
    eigenvalue gets the bounded value ``z(0)`` at most: the implicit damping of the iteration.
    """
    return _scalar_map(x.to(torch.float64).clamp_min(0.0), coeffs, num_iters, floor)


def _scalar_map(x: Tensor, coeffs: Sequence[tuple[float, float, float]], num_iters: int, floor: float) -> Tensor:
    """:func:`coupled_scalar_map` without the clamp: what the iteration does to a negative eigenvalue too
    (only where the polishing steps see it: the floored iteration itself sees ``x + floor``)."""
    out: Tensor = _recursion(torch, x, coeffs, num_iters, floor)
    return out


def _recursion(xp: Any, x: Any, coeffs: Sequence[tuple[float, float, float]], num_iters: int, floor: float) -> Any:
    """The recursion as :func:`coupled_scalar_map` states it, with the same roundings in the same order, in fewer
    operator calls (each costs microseconds on a few hundred values; ~60 of them were most of the
    eigendecomposition route's cost besides LAPACK): the first iteration's ``z = 1`` is not multiplied, ``y`` and
    ``z`` are one array scaled by ``q`` together, and temporaries are updated in place. ``xp``: ``torch`` for a
    float64 tensor, numpy for a float64 array (:func:`_numpy_scalar_map`): written once with the operators both
    share, so the two evaluations cannot drift apart."""
    y = x + floor
    if num_iters == 0:
        z = xp.ones_like(y)
    else:
        a, b, c = coeffs[0]
        q = y * c  # t = z y = y
        q += b  # q = a + t (b + c t)
        q *= y
        q += a
        yz = xp.stack((y * q, q))  # y q and z q = q
        y, z = yz  # views (one unbind for a tensor): yz *= q updates both
        for i in range(1, num_iters):
            a, b, c = coeffs[min(i, len(coeffs) - 1)]
            t = z * y
            q = t * c
            q += b
            q *= t
            q += a
            yz *= q
    if floor > 0.0:
        for _ in range(FLOOR_POLISH_STEPS):
            u = z * 0.5  # z (1.5 - 0.5 z^2 x), left to right
            u *= z
            u *= x
            z = z * (1.5 - u)
    return z


def _host_scalar_map(xs: list[float], coeffs: Sequence[tuple[float, float, float]], num_iters: int,
                     floor: float) -> list[float]:
    """:func:`_scalar_map` of host floats (already clamped), in Python floats: the same IEEE double operations in
    the same order (``q = ((t c + b) t) + a`` and ``z (1.5 - ((z 0.5) z) x)``; CPython rounds each operation and
    never fuses two), so bit for bit the tensor evaluation, NaN and inf included (tests/unit/test_asgo_step_cost.py).
    Why: ~1 us an eigenvalue, against ~90 us of operator calls for the tensor evaluation whatever its length;
    :func:`inv_sqrt_spectral` takes it up to :data:`_HOST_MAP_MAX` values."""
    steps = [coeffs[min(i, len(coeffs) - 1)] for i in range(num_iters)]
    polish = FLOOR_POLISH_STEPS if floor > 0.0 else 0
    out = []
    for x in xs:
        y = x + floor
        z = 1.0
        if steps:
            a, b, c = steps[0]
            z = (y * c + b) * y + a  # t = z y = y
            y = y * z
        for a, b, c in steps[1:]:
            t = z * y
            q = (t * c + b) * t + a
            y, z = y * q, z * q
        for _ in range(polish):
            z = z * (1.5 - z * 0.5 * z * x)
        out.append(z)
    return out


def _numpy_scalar_map(x: Any, coeffs: Sequence[tuple[float, float, float]], num_iters: int, floor: float) -> Any:
    """:func:`_scalar_map` of a float64 numpy array (already clamped): the same operations in the same order, each
    an IEEE double operation of numpy's (correctly rounded, never fused), so bit for bit the tensor evaluation
    (tests/unit/test_asgo_step_cost.py). Why: a numpy call costs ~1-2 us where a CPU tensor operation costs ~5-7
    (one thread), and this map is ~60 of them whatever the count of eigenvalues."""
    with _np.errstate(all="ignore"):  # inf and NaN propagate as in torch, without numpy's warnings
        return _recursion(_np, x, coeffs, num_iters, floor)


#: The most eigenvalues (all matrices of a call together) whose map :func:`inv_sqrt_spectral` evaluates on the
#: host in Python floats (:func:`_host_scalar_map`, ~1 us each) where numpy is not installed; above it the tensor
#: evaluation (~65 operator calls, ~90 us on a CPU, one thread, for any count up to a few hundred) is cheaper.
#: All give the same bits.
_HOST_MAP_MAX = 64

#: With numpy, the fewest eigenvalues whose map is evaluated by it on a CPU (:func:`_numpy_scalar_map`, ~60 numpy
#: calls, 160-240 us for 10-400 values on a loaded CPU, against 360-440 us for the tensor evaluation and ~4 us a
#: value for Python floats, in a step (cold caches)); fewer take Python floats.
_NUMPY_MAP_MIN = 40


def _spectral_scales(v3: Tensor, eps: float, sizes: Sequence[int] | None = None,
                     host_map: HostMap | None = None) -> tuple[list[float], list[float], list[float]]:
    """``1.01 ||V + eps I||_F`` of each float64 matrix of ``[n, k, k]`` as host floats, its largest entry's
    magnitude (0 for a zero matrix, NaN for one with a NaN) and ``||V||_F`` (:func:`_row_maps`), from
    ``||V||_F^2 + 2 eps tr(V) + k eps^2`` (without forming ``V + eps I``), computed on ``V / 2^e`` with ``2^e`` near
    its largest entry.

    Why the power of two: the squares of a float64 Gram with entries above ~1e154 (gradients ~1e77) are
    inf, and below ~1e-162 with ``eps = 0`` they are 0, where the norm itself is finite and nonzero; the
    root then came out NaN and the block fell back to its previous preconditioner. Dividing by a power of
    two is exact, so within range the result is the plain formula's, bit for bit. (The iteration keeps the
    plain norm: a root that it makes non-finite fails its bound check and is recomputed here.)

    The reductions are tensor operations; the scalar tail (and the exponent) in Python floats, the same IEEE
    operations in the same order as the tensor formula did (``eps / 2^e`` as ``(1 / 2^e) eps``, as a tensor's
    ``__rtruediv__`` computes it; the square root correctly rounded, :func:`_host_sqrt`): ~8 operator calls and two
    host reads instead of ~21 calls. On a CPU with numpy the largest entries and the division by powers of two
    (both exact, so the same bits) are numpy's: three operator calls and a host read fewer. Where ``host_map`` (the
    compiled map the optimizer hands in) can, both are its one C call (``scaled_down``), the same bits: ~5% of a
    small model's root step (the report's digits MLP, paired steps) against numpy's ~10 calls."""
    n, k = v3.shape[0], v3.shape[-1]
    if k == 0 or n == 0:  # no entry to scale by (and the norm of nothing is 0)
        return [0.0] * n, [0.0] * n, [0.0] * n
    scaled_down = getattr(host_map, "scaled_down", None)
    if scaled_down is not None and v3.is_contiguous() and _host_readable(v3):
        u, tops, scales = scaled_down(v3)
        return _scales_tail(u, tops, scales, eps, [k] * n if sizes is None else sizes)
    host = _host_array(v3)
    # the largest magnitude and the division by a power of two are exact: numpy's give torch's bits. The
    # magnitude as max(max, -min) (a NaN propagates through both; + 0.0 makes a zero matrix's -0.0 a 0.0): no |V|
    # temporary, ~20-40 us less a batch of a small model's step
    tops = ((_np.maximum(host.max(axis=(1, 2)), -host.min(axis=(1, 2))) + 0.0).tolist() if host is not None
            else torch.linalg.vector_norm(v3, float("inf"), dim=(-2, -1)).tolist())
    # frexp: 0 and non-finite give exponent 0 (scale 1); 2^1024 is beyond float64 (inf, as torch.ldexp gives)
    scales = [math.ldexp(1.0, e) if e <= 1023 else math.inf for e in (math.frexp(t)[1] for t in tops)]
    u = (torch.from_numpy(_scaled_down(host, scales)) if host is not None
         else v3 / torch.tensor([[[t]] for t in scales], dtype=v3.dtype, device=v3.device))
    return _scales_tail(u, tops, scales, eps, [k] * n if sizes is None else sizes)


def _scales_tail(u: Tensor, tops: list[float], scales: list[float], eps: float,
                 sizes: Sequence[int]) -> tuple[list[float], list[float], list[float]]:
    """:func:`_spectral_scales` from the scaled matrices ``u`` (``V / 2^e``), their largest magnitudes and their
    powers of two: the norms and traces of ``u`` (torch's reductions), the rest on the host."""
    sums = torch.stack((torch.linalg.matrix_norm(u), torch.diagonal(u, dim1=-2, dim2=-1).sum(-1)), dim=1).tolist()
    totals = []
    for scale, (norm, trace), n_i in zip(scales, sums, sizes):
        e = (1.0 / scale) * eps  # a padded matrix's eps is on its own diagonal: its own size
        totals.append(norm * norm + 2.0 * e * trace + n_i * e * e)
    norms = [scale * norm for scale, (norm, _) in zip(scales, sums)]
    return [1.01 * (scale * root) for scale, root in zip(scales, _host_sqrt(totals))], tops, norms


#: The smallest positive normal float64 (``2^-1022``)
_MIN_NORMAL = 2.0**-1022


def _scaled_down(host: Any, scales: list[float]) -> Any:
    """``host / scales`` per matrix (numpy ``[n, k, k]``; powers of two, or inf), as a product with each scale's
    inverse where every inverse is a finite power of two: the same bits (both are ``x 2^-e`` correctly rounded; x
    inf's inverse 0 gives the quotient's signed zero, and NaN where it is NaN) at a third of a division's cost. A
    scale below ``2^-1022`` (a matrix of subnormal entries only) has no finite inverse: the division there."""
    if min(scales) < _MIN_NORMAL:
        return host / _np.array(scales)[:, None, None]
    return host * _np.array([1.0 / s for s in scales])[:, None, None]


def _host_sqrt(values: list[float]) -> list[float]:
    """Correctly rounded square roots of host floats (``math.sqrt``; NaN below 0 and for NaN, as the tensor
    operation gives). Not torch's float64 sqrt on a CPU (MKL's vector sqrt): 1 ulp off the correctly rounded
    root for ~1.5% of values (CUDA's is correctly rounded), and a tensor operation, a copy to the host and back
    per use (six operator calls and two host reads per root batch, ~15% of a small model's root step)."""
    return [math.sqrt(x) if x >= 0.0 else math.nan for x in values]


def _host_readable(t: Tensor) -> bool:
    """Whether :func:`_host_array` gives ``t`` as a numpy array: numpy installed, a plain CPU tensor without a
    graph. Asked without making the array, which is an operator call (``detach``) in a step."""
    return _np is not None and t.device.type == "cpu" and not t.requires_grad and type(t) is Tensor


def _host_array(t: Tensor) -> Any:
    """``t`` as a numpy array sharing its memory where numpy can take it (:func:`_host_readable`), else None."""
    return t.numpy() if _host_readable(t) else None


#: A compiled evaluation of the spectral map (:mod:`lightning_soaa.kernels.asgo_native`, which the optimizer
#: hands in: compilers stay out of this module): ``(eigenvalues [n, k] float64 on the CPU, contiguous; scales;
#: their square roots; the (a, b, c) of each iteration, flat; iterations; floor; polishing steps) -> (z [n, 1, k],
#: each row's largest magnitude)``, the bits of :func:`_mapped_spectrum`'s other evaluations.
HostMap = Callable[[Tensor, Sequence[float], Sequence[float], tuple[float, ...], int, float, int],
                   tuple[Tensor, list[float]]]


def _mapped_spectrum(evals: Tensor, scales: list[float], coeffs: Sequence[tuple[float, float, float]],
                     num_iters: int, floor: float, limit: float = math.inf,
                     host_map: HostMap | None = None) -> tuple[Tensor, list[bool] | None]:
    """``z(lam / s) / sqrt(s)`` of each matrix's eigenvalues ``[n, k]`` (:func:`coupled_scalar_map`), as
    ``[n, 1, k]``; a row whose scale is not finite is NaN. By ``host_map`` where given (CPU), else numpy (from
    :data:`_NUMPY_MAP_MIN` values), else in Python floats up to :data:`_HOST_MAP_MAX` values, else as tensors: the
    same bits (the tensor formula's ``lam / s``, clamp, map and ``/ sqrt(s)``, each one correctly rounded
    operation).

    Also, per row, whether it is finite and at most ``limit`` (then a root ``Q diag(z) Q^T`` of orthonormal ``Q``
    is finite, its entries at most ``max z``), where the host evaluation knows it for every row with a finite
    scale; None otherwise (the tensor evaluation, or a row beyond ``limit``: the caller reads the roots)."""
    finite = [s - s == 0.0 for s in scales]
    host = all(s != 0.0 for s in scales)  # else 0 / 0 (V = 0, eps = 0) as torch does it
    if host and host_map is not None and evals.is_contiguous() and _host_readable(evals):
        # a non-finite scale's row: lam / NaN is NaN, as the tensor formula's where() makes it
        safe = [sc if ok else math.nan for sc, ok in zip(scales, finite)]
        flat = _flat_coeffs(tuple(coeffs), num_iters)
        z, tops = host_map(evals, safe, _host_sqrt(safe), flat, num_iters, floor,
                           FLOOR_POLISH_STEPS if floor > 0.0 else 0)
        return z, finite if all(t <= limit for t, ok in zip(tops, finite) if ok) else None
    if host and evals.numel() >= _NUMPY_MAP_MIN and _host_readable(evals):
        return _numpy_mapped_spectrum(evals, scales, finite, coeffs, num_iters, floor, limit)
    if evals.numel() > _HOST_MAP_MAX or not host:
        st = _host_values(scales, torch.float64, evals.device).unsqueeze(-1)
        z = coupled_scalar_map(evals / st, coeffs, num_iters, floor) / _host_values(
            _host_sqrt(scales), torch.float64, evals.device).unsqueeze(-1)
        if not all(finite):
            z = torch.where(torch.tensor(finite, device=z.device).unsqueeze(-1), z, math.nan)
        return z.unsqueeze(-2), None
    rows = []
    known = True
    for lam, s, ok, root in zip(evals.tolist(), scales, finite, _host_sqrt(scales)):
        if not ok:
            rows.append([[math.nan] * len(lam)])
            continue
        # max(x, 0.0) is clamp_min's value for every x (NaN stays NaN; -0.0 gives the same map as 0.0)
        row = [z / root for z in _host_scalar_map([max(x / s, 0.0) for x in lam], coeffs, num_iters, floor)]
        known = known and max(map(abs, row), default=0.0) <= limit and not any(map(math.isnan, row))
        rows.append([row])
    z = torch.tensor(rows, dtype=torch.float64, device=evals.device) if rows else evals.unsqueeze(-2)
    return z, finite if known else None


#: A floored map's matrix (:func:`root_floor`) whose ``||V||_F`` is at most ``1 / BARE_MAP_RATIO`` of its scale ``s``
#: takes the bare map instead (:func:`_row_maps`). Why: the floor covers the float32 rounding noise of ``V``'s
#: null space (and of the iteration on ``V / s``), ~2e-8 of ``||V||``, not of ``s``; where ``eps``
#: makes most of ``s`` (gradients ~1e-6 and below at ``eps`` 1e-10) that noise is below 2e-8 / 128 s, under the
#: bare map's own resolution (~2e-9 s), while the floor at 2e-7 s flattened every real eigenvalue: the float32
#: run was 1e2-2e5 times the error of a float32-rounded float64 run, 1.0-2.5x with the bare map
#: (tests/conformance/test_low_precision_accuracy.py, case ``tiny``). Why 128: the noise is then at most ~2e-10 s,
#: a tenth of that resolution (near ``||V|| ~ s`` it reaches -2e-8 s, where the bare map is ~9 z(0)); a jump of
#: the map at the switch moves only eigenvalues below ~1e-6 s, where the two maps differ anyway.
BARE_MAP_RATIO = 128.0


@functools.lru_cache(maxsize=16)
def _flat_coeffs(coeffs: tuple[tuple[float, float, float], ...], num_iters: int) -> tuple[float, ...]:
    """The ``(a, b, c)`` of each of ``num_iters`` iterations, flat (the last triple repeated), as a :data:`HostMap`
    takes them: a constant of the coefficients, made once (a 30-value generator was ~10-15 us of each root batch)."""
    return tuple(c for i in range(num_iters) for c in coeffs[min(i, len(coeffs) - 1)])


def _row_maps(num_iters: int, floor: float, bare_iters: int | None, scales: Sequence[float],
              norms: Sequence[float]) -> list[tuple[int, float]]:
    """``(iterations, floor)`` of each matrix's map: the bare map of ``bare_iters`` iterations where
    ``0 < `` :data:`BARE_MAP_RATIO` ``* ||V||_F <= s`` (finite ``s``) and ``bare_iters`` is given, else the call's."""
    if bare_iters is None or floor == 0.0:
        return [(num_iters, floor)] * len(scales)
    # V = 0 (no gradient yet) keeps the floored map: its root is a multiple of I either way, and the iterations
    # (which leave it so, :func:`_bounded_coupled`) then need no eigendecomposition for it
    return [(bare_iters, 0.0) if 0.0 < s < math.inf and 0.0 < BARE_MAP_RATIO * n <= s else (num_iters, floor)
            for s, n in zip(scales, norms)]


def _mapped_by_map(evals: Tensor, scales: list[float], coeffs: Sequence[tuple[float, float, float]],
                   maps: list[tuple[int, float]], limit: float,
                   host_map: HostMap | None) -> tuple[Tensor, list[bool] | None]:
    """:func:`_mapped_spectrum` with a map per row (:func:`_row_maps`): one call where all are the same (the usual
    case), else one per distinct map, on its rows."""
    distinct = sorted(set(maps))
    if len(distinct) <= 1:
        n, f = distinct[0] if distinct else (0, 0.0)
        return _mapped_spectrum(evals, scales, coeffs, n, f, limit, host_map)
    z = evals.new_empty(evals.shape[0], 1, evals.shape[1])
    known: list[bool] | None = [False] * len(maps)
    for m in distinct:
        rows = [i for i, g in enumerate(maps) if g == m]
        part, flags = _mapped_spectrum(evals[rows].contiguous(), [scales[i] for i in rows], coeffs, m[0], m[1],
                                       limit, host_map)
        z[rows] = part
        if known is not None and flags is not None:
            for i, ok in zip(rows, flags):
                known[i] = ok
        else:
            known = None
    return z, known


def _numpy_mapped_spectrum(evals: Tensor, scales: list[float], finite: list[bool],
                           coeffs: Sequence[tuple[float, float, float]], num_iters: int, floor: float,
                           limit: float) -> tuple[Tensor, list[bool] | None]:
    """:func:`_mapped_spectrum` of CPU eigenvalues by numpy (:func:`_numpy_scalar_map`), every scale nonzero: the
    tensor formula's bits (``lam / s`` and ``max(x, 0)`` are exact or correctly rounded in both; ``sqrt(s)`` the
    same host floats, :func:`_host_sqrt`)."""
    roots = _np.array(_host_sqrt(scales), dtype=_np.float64)[:, None]
    with _np.errstate(all="ignore"):  # inf and NaN propagate as in torch, without numpy's warnings
        x = evals.numpy() / _np.array(scales, dtype=_np.float64)[:, None]
        _np.maximum(x, 0.0, out=x)  # (NaN stays NaN; -0.0 or 0.0 give the same map)
        z = _recursion(_np, x, coeffs, num_iters, floor)
        z /= roots
    bad = [i for i, ok in enumerate(finite) if not ok]
    if bad:
        z[bad] = _np.nan
    tops = _np.abs(z).max(axis=1, initial=0.0).tolist()  # NaN where the row has one
    known = all(t <= limit for t, ok in zip(tops, finite) if ok)
    return torch.from_numpy(z[:, None, :]), finite if known else None


def inv_sqrt_spectral(
    v: Tensor, coeffs: Sequence[tuple[float, float, float]], num_iters: int, eps: float = 1e-10,
    floor: float | None = None, sizes: Sequence[int] | None = None, bare_iters: int | None = None,
) -> Tensor:
    """The matrix function of :func:`inv_sqrt_coupled`, evaluated by one float64 eigendecomposition.

    ``V = Q diag(lam) Q^T`` (``torch.linalg.eigh`` in float64), then ``Q diag(z(lam / s) / sqrt(s)) Q^T``
    with the same scale ``s = 1.01 ||V + eps I||_F`` and the scalar map ``z`` of
    :func:`coupled_scalar_map`. In exact arithmetic this is exactly what the coupled iteration returns
    (its iterates are polynomials in ``V``), so the algorithm, including its implicit damping of small
    eigenvalues, is unchanged; only the rounding differs, and it is smaller. The result has
    :func:`root_compute_dtype` of ``v``; the product ``Q diag(.) Q^T`` is float64, or mostly float32 for a
    float32 root of k >= :data:`F32_PRODUCT_MIN_K` on a CPU (:func:`_compose`).

    Why float64: the map resolves eigenvalues down to ~2e-9 ``s``, and a float32 eigendecomposition
    (backward error ~k * 6e-8 ``||V||``) does not: at k = 48 and condition 1e6 it is 5e-2 off where the
    float32 iteration is 1.9e-3 and this evaluation 8.6e-4 off (the rounding of V itself). Why an
    eigendecomposition at all: on a CPU the float64 one costs about as much as 18 float32 k x k matmuls,
    the iteration 37 (k = 256, one thread). The map is smooth and
    bounded (``z(0) / sqrt(s)`` at most), so a perturbation of ``V`` moves the result about as little as
    it moves the iteration's, unlike a pseudo-inverse, whose cut-off jumps (benchmarks/eval_asgo_roots.py);
    but LAPACK's own rounding is not a smooth function of ``V``, which matters for float64 statistics
    (see :func:`resolve_root_method`). Its fixed cost is ~20 operator calls besides LAPACK (the scale and the
    map on the host: :func:`_spectral_scales`, :func:`_mapped_spectrum`; the map one call where the caller hands
    in a compiled ``host_map``), so it is cheap at any ``k``.

    A matrix that is non-finite, or whose eigendecomposition fails, comes back NaN (callers check);
    its batch-mates get the results they get alone. ``floor=None``: :func:`root_floor` of ``v``'s dtype
    (pass the float32 floor explicitly to evaluate a float32 statistic's map on a float64 copy).

    ``sizes``: a zero-padded batch (:func:`pad_batch`; the scale's ``eps`` on each matrix's own corner). Why it
    holds: Householder tridiagonalisation of ``diag(V, 0)`` keeps the zero blocks exactly zero (a reflector
    built from a column's zeros is the identity), so the tridiagonal matrix has an exact zero off the diagonal
    where the blocks meet, at which LAPACK's eigensolver splits it: every eigenvector lies in one block (0
    mixed of 300 random rank-deficient Grams padded to 48, MKL), and the corner is ``V``'s root, in other
    rounding. Were a LAPACK to mix them, it could only mix eigenvalues within its rounding of 0, where the map
    is flat (it varies on the scale of the floor, 2e-7 ``s``, or 2e-9 ``s`` bare): an error of that ratio at
    most. Why pad: one call for a small model's Grams instead of one per size (~100-200 us each in a step).
    """
    return _spectral_root(v, coeffs, num_iters, eps, floor, sizes, bare_iters=bare_iters)[0]


def _spectral_root(
    v: Tensor, coeffs: Sequence[tuple[float, float, float]], num_iters: int, eps: float = 1e-10,
    floor: float | None = None, sizes: Sequence[int] | None = None, host_map: HostMap | None = None,
    dtype: torch.dtype | None = None, bare_iters: int | None = None,
) -> tuple[Tensor, tuple[list[bool], list[bool]] | None]:
    """:func:`inv_sqrt_spectral`, and per matrix whether its root is finite and whether it has a nonzero entry,
    where the host knows both without reading the roots (the scales' reductions and a map evaluated on the host:
    :func:`_mapped_spectrum`), else None. Why: a caller that checks its roots read them at every step (a
    float64 sum, ``any`` and a host read of the flags, ~10 operator calls a batch on a small model's step).
    ``dtype``: the statistic's own when ``v`` is a float64 copy of a narrower one (None: ``v``'s): the roots are
    returned in its :func:`root_compute_dtype`, and their finiteness judged there. ``bare_iters``: the iterations of
    the bare map a floored map's matrix takes where its floor is not needed (:data:`BARE_MAP_RATIO`); None: none.
    """
    floor = _floor_of(v, floor, coeffs, num_iters)
    out_dt = root_compute_dtype(v.dtype if dtype is None else dtype)
    squeeze = v.dim() == 2
    k = v.shape[-1]
    v3 = v if v.dtype == torch.float64 else v.to(torch.float64)  # (a no-op to() is still an operator call)
    if v3.dim() != 3:
        v3 = v3.reshape(math.prod(v.shape[:-2]), k, k)  # explicit sizes: k = 0 is allowed
    scales, tops, norms = _spectral_scales(v3, eps, sizes, host_map)
    # A non-finite block (its norm is non-finite) must come back non-finite, the caller's contract,
    # not raise inside LAPACK or poison its batch: eigh sees the identity there, the result is NaN.
    finite = [s - s == 0.0 for s in scales]  # s >= 0 or NaN: s - s is 0, or NaN for inf and NaN
    safe = v3
    if not all(finite):
        safe = torch.where(torch.tensor(finite, device=v3.device).reshape(-1, 1, 1), v3,
                           torch.eye(k, dtype=v3.dtype, device=v3.device))
    try:
        evals, evecs = torch.linalg.eigh(safe)  # reads the lower triangle (V is symmetric up to rounding)
    except RuntimeError:  # torch.linalg.LinAlgError (no convergence): report it as non-finite, like NaN
        if v3.shape[0] == 1:
            return torch.full(v.shape, float("nan"), dtype=out_dt, device=v.device), None
        # eigh raises for the whole batch when one matrix fails. Which matrices share a batch depends on
        # rank ownership, so retry one at a time: each result then depends on its own matrix only (the
        # failing one is NaN, as alone), at every world size.
        each = [inv_sqrt_spectral(v3[i : i + 1], coeffs, num_iters, eps, floor,
                                  None if sizes is None else sizes[i : i + 1], bare_iters) for i in range(v3.shape[0])]
        return torch.cat(each).to(out_dt).reshape(v.shape), None
    # rows below half the largest number of out_dt: the root's entries (at most max z, and rounding) are finite
    z, bounded = _mapped_by_map(evals, scales, coeffs, _row_maps(num_iters, floor, bare_iters, scales, norms),
                                torch.finfo(out_dt).max / 2, host_map)
    out = _compose(evecs, z, out_dt)  # NaN rows: NaN blocks
    flags = None if bounded is None else (bounded, [t != 0.0 for t in tops])  # (a NaN entry: nonzero, as any())
    return (out[0] if squeeze else out if out.shape == v.shape else out.reshape(v.shape)), flags


#: The smallest ``k`` whose float32 root :func:`_compose` forms in float32 on a CPU. Below it the product's
#: ~20 extra small operator calls cost about what its cheaper matmul saves (CPU time, one thread, a loaded
#: 2-core host, against the float64 product: one Gram of k = 160 1.3x, 4 of k = 192 0.88x, 12 of k = 256 0.70x,
#: 2 of k = 512 0.58x), and small Grams keep their bits and their step's operator count. By ``k`` alone (never
#: by how many Grams share a batch, which depends on the world size), so each Gram's rounding is the same at
#: every world size.
F32_PRODUCT_MIN_K = 192

#: How many eigenpairs :func:`_compose_float32` keeps in float64: those of the largest mass ``w_l |z_l - c|``.
_F32_PRODUCT_HEAVY = 8


def _compose(evecs: Tensor, z: Tensor, out_dt: torch.dtype) -> Tensor:
    """``Q diag(z) Q^T`` of float64 eigenvectors ``Q`` (``[n, k, k]``) and values ``z`` (``[n, 1, k]``), as
    ``out_dt``: by :func:`_compose_float32` for a float32 root of ``k >=`` :data:`F32_PRODUCT_MIN_K` on a CPU,
    else in float64 (a float64 root's bits, and roots on accelerators, where the product is not the cost, are
    unchanged). Either way the entries are at most ``max z`` (up to rounding), as :func:`_mapped_spectrum`'s
    finiteness flags assume: with the shift ``c`` = max z the diagonal is ``c`` minus at most ``c``."""
    if out_dt == torch.float32 and evecs.device.type == "cpu" and evecs.shape[-1] >= F32_PRODUCT_MIN_K:
        return _compose_float32(evecs, z)
    return torch.bmm(evecs * z, evecs.transpose(-1, -2)).to(out_dt)  # (what @ calls)


def _compose_float32(evecs: Tensor, z: Tensor, shift: Tensor | None = None) -> Tensor:
    """``c I + Q diag(z - c) Q^T`` with the product over all but :data:`_F32_PRODUCT_HEAVY` eigenpairs in float32
    (``Q`` and ``z - c`` rounded to it), those few and the sum in float64, rounded once; per matrix ``c`` = 0 or
    the largest ``z``. 0.70x the CPU time of the float64 product at k = 256 (12 Grams, one thread; 23 against
    33 ms), 0.91-0.98x the benchmark transformer's ASGO step (paired steps in one process, median 0.97x).

    Why the shift: the float32 product's rounding is ~eps ``|Q| |diag(z - c)| |Q|^T``, entry by entry, and a
    Gram with a null space has many large ``z`` (its null value) on eigenvectors spread over every coordinate;
    with ``c`` = the null value those terms vanish, but where the small ``z`` sit on few coordinates (sparse
    rows, graded row scales) ``c`` then cancels there (50-1600x off). So ``c`` is the one of the two with the
    smaller mass ``sum_l w_l |z_l - c|``, ``w_l = (sum_i |Q_il|)^2`` (the sum of that bound over the entries).
    Why the float64 pairs: one large ``|z_l - c|`` on a spread eigenvector (a mean-free Gram's, a LayerNorm's
    input, has ``c`` = 0 and one null direction) put its rounding into ``P M``, ``M`` orthogonal to it: ASGO
    runs 11-18x a perfect float32 run's error (k = 160..512) where the float64 product gives 4.9-7.9x; its pairs
    of largest mass in float64 and one rounding of the sum: the float64 product's error to 3 digits there.

    ASGO runs against a perfect float32 run (tests/unit/test_asgo_float32_accuracy.py, the conformance
    battery's metric, k = 96..512): 1.0-1.31x the float64 product's error on full-rank, mean-free, sparse,
    graded, rank-1, rank-k/4 Grams and a batch below ``k``. The eigendecomposition stays float64: a float32 one
    (twice as fast again) was 8-27x the perfect run's error on rank-deficient and ill-conditioned Grams and
    2e3-3e5x on graded or sparse-row ones (against a perfect run that rounds the Gram before its root): its
    backward error is normwise, ~eps ``||V||``, where the float32 Gram's own rounding is entrywise. A NaN row
    of ``z`` gives a NaN matrix, as the float64 product.
    ``shift``: ``c`` given (``[n, 1, 1]``), not chosen (for tests)."""
    q = evecs.to(torch.float32)
    w = q.abs().sum(-2, keepdim=True)  # [n, 1, k] (in float32: only the choice of c depends on them)
    w = w * w
    top = z.amax(-1, keepdim=True)
    plain = (w * z).sum(-1, keepdim=True)  # the mass with c = 0
    shifted = top * w.sum(-1, keepdim=True) - plain  # with c = top (NaN compares False: c = 0)
    c = torch.where(shifted < plain, top, 0.0) if shift is None else shift
    d = z - c
    r = min(_F32_PRODUCT_HEAVY, d.shape[-1])
    heavy = (w * d.abs()).topk(r, dim=-1).indices  # [n, 1, r]; a NaN row is NaN either way
    qh = evecs.gather(-1, heavy.expand(-1, evecs.shape[-2], -1))  # [n, k, r], float64
    light = torch.bmm(q * d.scatter(-1, heavy, 0.0).to(torch.float32), q.transpose(-1, -2))
    out = torch.baddbmm(light.to(torch.float64), qh * d.gather(-1, heavy), qh.transpose(-1, -2))
    out.diagonal(dim1=-2, dim2=-1).add_(c.reshape(-1, 1))
    return out.to(torch.float32)


def inv_sqrt_polar_express(v: Tensor, num_iters: int | None = None, eps: float = 1e-10) -> Tensor:
    """V^{-1/2} by coupled Polar Express iterations (default 10; 8 and the floor's polishing steps for a
    float32 statistic); see :func:`inv_sqrt_coupled`."""
    n = default_root_iters("polar_express", v.dtype) if num_iters is None else num_iters
    return inv_sqrt_coupled(v, POLAR_EXPRESS_COEFFS, n, eps)


def inv_sqrt_newton_schulz(v: Tensor, num_iters: int | None = None, eps: float = 1e-10) -> Tensor:
    """V^{-1/2} by coupled Newton-Schulz iterations (default 18); see :func:`inv_sqrt_coupled`."""
    n = default_root_iters("newton_schulz", v.dtype) if num_iters is None else num_iters
    return inv_sqrt_coupled(v, (NEWTON_SCHULZ_COEFFS,), n, eps)


#: The cut-off of :func:`inv_sqrt_eigh` for a statistic narrower than float64, in units of ``eps`` of its dtype
#: (relative to the largest eigenvalue). Why: the null space of a float32 ``G G^T`` holds rounding noise, some
#: of it positive, up to ~0.5 eps of the largest eigenvalue (measured: k = 8..256, rank k/4..0.9k, n = k..16k
#: columns; it does not grow with k), whose inverse roots are arbitrary; a cut-off of 1e-12 inverted them: the
#: polar factor of a rank-k/4 float32 G was 3e-4 to 1.1e-3 off (float64 oracle), 1e-7 with this cut. Why 4:
#: ASGO (eigh, root_every=1, 10 steps, k = 8..256) against its float64 run was the same for every value from
#: 1 to 8 (rank-deficient median 7e-6 to 1.7e-4, from 4.5e-4 to 2.7e-3 at 0); 16 started to cut real
#: eigenvalues (k = 256: 1.9e-2), 0.5 let noise through (k = 8: 5.9e-5). ``k * eps`` would cut them at k >= 32.
EIGH_NOISE_ULPS = 4.0


def eigh_rcond(dtype: torch.dtype, rcond: float = 1e-12) -> float:
    """The cut-off of :func:`inv_sqrt_eigh` for a statistic of ``dtype``: ``rcond`` for float64 (the reference
    is unchanged), else at least :data:`EIGH_NOISE_ULPS` ``* eps`` of ``dtype``."""
    if dtype == torch.float64:
        return rcond
    return max(rcond, EIGH_NOISE_ULPS * torch.finfo(dtype).eps)


def inv_sqrt_eigh(v: Tensor, rcond: float = 1e-12, dtype: torch.dtype | None = None) -> Tensor:
    """Reference V^{-1/2} in float64 by eigendecomposition (pseudo-inverse root); batches allowed.

    Eigenvalues ``<= eigh_rcond(dtype, rcond) * max eigenvalue`` (and negative rounding noise) count as
    zero and map to zero, so for ``V = G G^T`` the product ``V^{-1/2} G`` is the polar factor of ``G`` even
    when ``G`` is rank deficient. ``dtype``: the statistic's own (None: ``v``'s), which bounds what its
    eigenvalues resolve (:func:`eigh_rcond`): ``rcond`` itself for float64. Returns
    :func:`root_compute_dtype` of ``v``.
    """
    out_dt = root_compute_dtype(v.dtype)
    cut = eigh_rcond(v.dtype if dtype is None else dtype, rcond)
    v64 = v.to(torch.float64)
    v64 = 0.5 * (v64 + v64.transpose(-1, -2))  # exact symmetry for eigh
    try:
        evals, evecs = torch.linalg.eigh(v64)
    except RuntimeError:  # LinAlgError (an overflowed or NaN Gram): non-finite, as the module promises
        return torch.full(v.shape, float("nan"), dtype=out_dt, device=v.device)
    top = evals.amax(dim=-1, keepdim=True).clamp_min(0.0)
    keep = evals > cut * top
    inv_root = torch.where(keep, evals.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(),
                           torch.zeros_like(evals))
    root: Tensor = (evecs * inv_root.unsqueeze(-2)) @ evecs.transpose(-1, -2)
    return root.to(out_dt)


@functools.cache
def _map_bound(coeffs: tuple[tuple[float, float, float], ...], num_iters: int, floor: float) -> float:
    """The largest value a root's eigenvalue may take (cached: a few dozen scalar ops): ``z(0)`` of the bare
    map, its largest value; with a floor, the map's value at ``x = -floor / 8``, so that rounding noise
    down to -2.5e-8 s (measured down to -1.7e-8 s in float32 transformer Grams) passes: the polishing
    steps raise a negative eigenvalue's value a little above ``z(0)`` (1.66x there), boundedly."""
    x = torch.tensor([-floor / 8.0], dtype=torch.float64)
    return float(_scalar_map(x, coeffs, num_iters, floor))


def _bounded_coupled(v: Tensor, coeffs: Sequence[tuple[float, float, float]], num_iters: int,
                     eps: float, sizes: Sequence[int] | None = None, floor: float = 0.0,
                     bare: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`inv_sqrt_coupled` and, per matrix, whether its root kept within the map's bound (a bool
    tensor; no host read). See :func:`checked_coupled`. ``sizes``: a zero-padded batch. ``bare``: a floored
    map's matrix whose floor is not needed (:data:`BARE_MAP_RATIO`) is flagged too, for the bare map."""
    z, s = _coupled(v, coeffs, num_iters, eps, sizes, floor)
    k = v.shape[-1]
    z0 = _map_bound(tuple(coeffs), num_iters, floor)
    # ||Z||_F^2 s <= k z(0)^2 (5% margin), false for NaN too; a non-finite scale is recomputed as NaN
    ok = torch.linalg.vector_norm(z.reshape(-1, k, k), dim=(1, 2), dtype=torch.float64).square_().mul_(s)
    if sizes is None:
        ok = ok <= 1.05 * k * z0 * z0
    else:
        # a padded matrix's zero corner holds the map's value at 0 (at most the bound): (k_pad - k) z0^2 of the sum
        ok = ok <= _host_values([(1.05 * n + (k - n)) * z0 * z0 for n in sizes], torch.float64, ok.device)
    if bare and floor > 0.0:
        # V = 0 (no gradient yet) keeps its floored root, a multiple of I: its momentum is 0 too
        norm = torch.linalg.matrix_norm(v.reshape(-1, k, k), dtype=torch.float64)
        ok = ok & ((norm == 0.0) | (BARE_MAP_RATIO * norm > s))
    return z, ok


def _recompute_unbounded(v: Tensor, z: Tensor, bounded: Sequence[bool], coeffs: Sequence[tuple[float, float, float]],
                         num_iters: int, eps: float, sizes: Sequence[int] | None = None, floor: float = 0.0,
                         bare_iters: int | None = None) -> Tensor:
    """``z`` with the roots whose flag is False recomputed by :func:`inv_sqrt_spectral` (a new tensor);
    a padded matrix's (``sizes``) from its own corner, alone. ``bare_iters``: as :func:`_spectral_root`'s."""
    if all(bounded):
        return z
    k = v.shape[-1]
    bad = [i for i, ok in enumerate(bounded) if not ok]
    out = z.reshape(-1, k, k).clone()
    if sizes is not None:
        for i in bad:
            n = sizes[i]
            out[i] = 0.0  # outside the corner (unused) too: the iteration's may be NaN, and callers read it
            out[i, :n, :n] = inv_sqrt_spectral(v.reshape(-1, k, k)[i, :n, :n], coeffs, num_iters, eps,
                                               floor, bare_iters=bare_iters).to(out.dtype)
        return out.reshape(z.shape)
    idx = torch.tensor(bad, device=z.device)
    out[idx] = inv_sqrt_spectral(v.reshape(-1, k, k)[idx], coeffs, num_iters, eps, floor,
                                 bare_iters=bare_iters).to(out.dtype)
    return out.reshape(z.shape)


def checked_coupled(
    v: Tensor, coeffs: Sequence[tuple[float, float, float]], num_iters: int, eps: float = 1e-10,
    floor: float | None = None, bare_iters: int | None = None,
) -> Tensor:
    """:func:`inv_sqrt_coupled`, with every matrix whose result left the map's bound recomputed by
    :func:`inv_sqrt_spectral` (the same function, by an eigendecomposition).

    The map is largest at 0: no eigenvalue of the exact result exceeds ``z(0) / sqrt(s)``, so
    ``||Z||_F^2 <= k z(0)^2 / s``. A Gram with a null space (a softmax head's: its gradient's columns
    sum to 0; any Gram of rank below k, e.g. in the first steps) has eigenvalues at the rounding level,
    some negative, and for x < 0 the iteration's ``x p(x)^2`` grows without bound instead of settling
    at ``z(0)``: in float32 such a root came out 1e1-1e5 times the exact one (the update then pointed
    along the null space, 40-140% off on 3 of 8 draws of a 4-class head), and it cannot be seen from
    the finite values alone. One host read per call; the recomputation only for the matrices that
    failed (5% margin for the iteration's own rounding). A float32 statistic's map has a floor
    (:func:`root_floor`), which keeps such roots bounded in the first place; the check stays for what
    the floor does not cover (noise below -2.5e-8 s, overflow). ``bare_iters``: a floored map's matrix whose
    floor is not needed (:data:`BARE_MAP_RATIO`) is recomputed with the bare map of that many iterations.
    """
    floor = _floor_of(v, floor, coeffs, num_iters)
    z, ok = _bounded_coupled(v, coeffs, num_iters, eps, floor=floor, bare=bare_iters is not None)
    if bool(ok.all()):
        return z
    return _recompute_unbounded(v, z, ok.tolist(), coeffs, num_iters, eps, floor=floor, bare_iters=bare_iters)


@dataclasses.dataclass(frozen=True)
class PendingRoots:
    """Inverse roots computed without a host read (:func:`pending_inverse_sqrt`), so that a caller with
    several batches reads every batch's flags in one sync. ``bounded``: per matrix, whether an iterative
    root kept within the map's bound (a bool tensor on the roots' device; None where nothing needs
    checking: the eigendecompositions). :meth:`resolve` takes those flags as the host read them."""

    roots: Tensor
    bounded: Tensor | None
    recompute: Callable[[Sequence[bool]], Tensor] | None = None
    #: per matrix, whether its root is finite and whether its (undamped) statistic has a nonzero entry, where the
    #: route knew both on the host without reading the roots (the eigendecomposition route, most calls on a CPU:
    #: :func:`_spectral_root`); None: the caller reads them from the roots and the statistic
    host_flags: tuple[Sequence[bool], Sequence[bool]] | None = None

    def resolve(self, bounded: Sequence[bool]) -> Tensor:
        """The roots, those flagged False recomputed by the eigendecomposition of the same function."""
        return self.roots if self.recompute is None or all(bounded) else self.recompute(bounded)


#: The methods that evaluate the root by a float64 eigendecomposition (:func:`pending_inverse_sqrt`'s ``dtype``)
_EIGH_METHODS = ("polar_express_eigh", "eigh")


def _check_sizes(sizes: Sequence[int], v: Tensor) -> None:
    """``sizes`` of a padded batch ``v``: one per matrix, each from 1 to the padded size."""
    n, size = (v.shape[0] if v.dim() == 3 else -1), v.shape[-1]
    if v.dim() != 3 or len(sizes) != n or any(not 1 <= int(k) <= size for k in sizes):
        raise ValueError(f"Invalid sizes={tuple(sizes)!r} for a padded batch of shape {tuple(v.shape)}: one size per "
                         f"matrix of an [n, k, k] batch, each from 1 to k (here n = {n}, k = {size}).")


def _damped(v: Tensor, damping: float, sizes: Sequence[int] | None = None) -> Tensor:
    """:func:`damp` of ``v`` in :func:`root_compute_dtype`; without damping ``v`` itself (or its promoted copy),
    not a clone: every route only reads it (a copy of each Gram at every step, for nothing)."""
    wide = root_compute_dtype(v.dtype)
    v = v if v.dtype == wide else v.to(wide)  # (a no-op to() is still an operator call, at every root batch)
    return v if damping == 0.0 else damp(v, damping, sizes)


def _version_of(t: Tensor) -> int:
    """``t``'s version counter (bumped by every in-place write); -1 for an inference tensor, which has none."""
    return -1 if t.is_inference() else t._version


def _recompute_unchanged(v: Tensor, version: int, z: Tensor, bounded: Sequence[bool], **kw: Any) -> Tensor:
    """:func:`_recompute_unbounded` of a :class:`PendingRoots`, which reads ``v`` again: without damping or a
    dtype promotion that is the caller's own tensor (not copied, for speed), so a write to it between the
    call and ``resolve`` would silently give the roots of another matrix; refused instead."""
    if not all(bounded) and _version_of(v) != version:
        raise RuntimeError("pending_inverse_sqrt: its input v was modified in place before resolve(); resolve "
                           "the roots first, or pass a copy of v.")
    return _recompute_unbounded(v, z, bounded, **kw)


def pending_inverse_sqrt(
    v: Tensor, method: str = "polar_express", *, num_iters: int | None = None, eps: float = 1e-10,
    damping: float = 0.0, sizes: Sequence[int] | None = None, floor: float | None = None,
    host_map: HostMap | None = None, dtype: torch.dtype | None = None,
) -> PendingRoots:
    """:func:`inverse_sqrt` of a batch ``[n, k, k]`` without its host read: ``resolve(bounded.tolist())``
    gives exactly :func:`inverse_sqrt`'s result. ``v`` must not be modified in place until then (the roots
    flagged False are recomputed from it; a write in between is refused there).

    ``sizes``: ``v`` is a zero-padded batch (:func:`pad_batch`) whose matrix ``i`` is its ``sizes[i] x
    sizes[i]`` corner; the corner of each result is that matrix's root. For the iterations and
    ``"polar_express_eigh"`` (:func:`inv_sqrt_spectral`), not for ``"eigh"`` (its cut-off is relative to the
    largest eigenvalue, and a pseudo-inverse jumps where the padding's zeros would mix with a null space's).

    ``host_map``: a compiled evaluation of the eigendecomposition route's scalar map (:data:`HostMap`), the same
    bits in one call. The result's ``host_flags`` say, where the route knew them on the host, which roots are
    finite and which statistics nonzero.

    ``dtype``: the statistic's own dtype when ``v`` is a float64 copy of a narrower one, computed before it was
    rounded to that dtype (None: ``v``'s). For the eigendecomposition methods only (they evaluate in float64
    anyway): ``"auto"``, the map (floor and iterations), the ``"eigh"`` cut-off and the roots' dtype are the
    narrow statistic's; only its rounding is gone (see ASGO's ``_update_statistics``).
    """
    if sizes is not None:
        _check_sizes(sizes, v)
    dtype = v.dtype if dtype is None else dtype
    vd = _damped(v, damping, sizes)
    method = resolve_root_method(method, v.device, dtype)
    if dtype != v.dtype and method not in _EIGH_METHODS:
        raise ValueError(f"Invalid dtype={dtype!r} for a {v.dtype} v with method={method!r}: a wider copy of the "
                         f"statistic is for the eigendecomposition methods ({', '.join(map(repr, _EIGH_METHODS))}) "
                         "only; pass the statistic itself.")
    if method in ("polar_express", "newton_schulz"):
        coeffs = POLAR_EXPRESS_COEFFS if method == "polar_express" else (NEWTON_SCHULZ_COEFFS,)
        bare = _bare_iters(method, v.dtype, num_iters, floor)
        n, floor = _map_of(method, v.dtype, num_iters, floor)
        z, ok = _bounded_coupled(vd, coeffs, n, eps, sizes, floor, bare is not None)
        return PendingRoots(z, ok, functools.partial(_recompute_unchanged, vd, _version_of(vd), z, coeffs=coeffs,
                                                     num_iters=n, eps=eps, sizes=sizes, floor=floor, bare_iters=bare))
    if sizes is not None and method != "polar_express_eigh":
        raise ValueError(f"Invalid sizes={tuple(sizes)!r} for method={method!r}: padded batches are for the "
                         "iterations ('polar_express', 'newton_schulz') and 'polar_express_eigh' only; pass "
                         "sizes=None.")
    roots, flags = _direct_root(vd, dtype, method, num_iters, eps, floor, sizes, host_map)
    out_dt = root_compute_dtype(dtype)
    # the flags are vd's: its zero entries are v's without damping (promoting the dtype keeps zeros zero)
    return PendingRoots(roots if roots.dtype == out_dt else roots.to(out_dt), None,
                        host_flags=flags if damping == 0.0 else None)


def inverse_sqrt(
    v: Tensor, method: str = "polar_express", *, num_iters: int | None = None, eps: float = 1e-10,
    damping: float = 0.0, floor: float | None = None,
) -> Tensor:
    """(V + damping * tr(V)/k * I)^{-1/2} by ``method`` (one of :data:`ROOT_CHOICES`).

    ``num_iters=None`` uses :func:`default_root_iters`; ``eps`` is the scaling-norm epsilon of the
    iterations (ignored by ``"eigh"``). ``floor``: the floor of the map of the iterations and of their
    eigendecomposition evaluation (None: :func:`root_floor` of ``v``'s dtype; 0.0: the bare map). The
    result has :func:`root_compute_dtype` of ``v`` and may be non-finite if ``v`` is; callers check.
    """
    vd = _damped(v, damping)
    method = resolve_root_method(method, v.device, v.dtype)
    if method in ("polar_express", "newton_schulz"):
        coeffs = POLAR_EXPRESS_COEFFS if method == "polar_express" else (NEWTON_SCHULZ_COEFFS,)
        bare = _bare_iters(method, v.dtype, num_iters, floor)
        n, floor = _map_of(method, v.dtype, num_iters, floor)
        return checked_coupled(vd, coeffs, n, eps, floor, bare)
    return _direct_root(vd, v.dtype, method, num_iters, eps, floor)[0]


def _direct_root(vd: Tensor, dtype: torch.dtype, method: str, num_iters: int | None, eps: float,
                 floor: float | None, sizes: Sequence[int] | None = None, host_map: HostMap | None = None,
                 ) -> tuple[Tensor, tuple[Sequence[bool], Sequence[bool]] | None]:
    """The root of the damped ``vd`` by an eigendecomposition method (``dtype``: the statistic's own, which
    chooses the map's iterations and floor), and :attr:`PendingRoots.host_flags` of ``vd`` where known."""
    if method == "eigh":
        return inv_sqrt_eigh(vd, dtype=dtype), None
    if method == "polar_express_eigh":
        bare = _bare_iters(method, dtype, num_iters, floor)
        n, floor = _map_of(method, dtype, num_iters, floor)
        return _spectral_root(vd, POLAR_EXPRESS_COEFFS, n, eps, floor, sizes, host_map, dtype, bare)
    raise ValueError(f"Invalid inverse_root={method!r}. Must be one of {', '.join(map(repr, ROOT_CHOICES))}.")
