"""Dense linear algebra for the curvature optimizers: matrix inverse square roots (ASGO).

Pure math: imports torch only. Every function takes one symmetric positive semi-definite ``k x k``
matrix and returns a new tensor; nothing is modified in place.

Inverse square roots (used by :class:`lightning_soaa.optim.asgo.ASGO`):

* ``"polar_express"`` (default): coupled polynomial iteration with the Polar Express coefficients
  (Amsel et al., 2025), 10 iterations. Matmuls only, so it runs well on accelerators.
* ``"newton_schulz"``: the same coupled iteration with the constant Newton-Schulz polynomial
  ``(a, b, c) = (2, -1.5, 0.5)``; converges more slowly from small eigenvalues (18 iterations default).
* ``"eigh"``: ``float64`` eigendecomposition, the reference. Eigenvalues below ``rcond * max`` are
  treated as zero (pseudo-inverse root), so a rank-deficient statistic gives the exact polar factor.

The iterations run in ``float32`` or wider (never in bf16/fp16: the statistic is rank-deficient early
in training and the small eigenvalues would be lost). A non-finite result is returned as is: the
caller decides what to do with it (ASGO keeps its previous preconditioner and counts the event).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "ROOT_METHODS",
    "ROOT_CHOICES",
    "resolve_root_method",
    "DEFAULT_ROOT_ITERS",
    "POLAR_EXPRESS_COEFFS",
    "NEWTON_SCHULZ_COEFFS",
    "root_compute_dtype",
    "damp",
    "inv_sqrt_coupled",
    "inv_sqrt_polar_express",
    "inv_sqrt_newton_schulz",
    "inv_sqrt_eigh",
    "inverse_sqrt",
]

ROOT_METHODS: tuple[str, ...] = ("polar_express", "newton_schulz", "eigh")

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
DEFAULT_ROOT_ITERS: dict[str, int] = {"polar_express": 10, "newton_schulz": 18, "eigh": 0, "auto": 10}

#: What ``inverse_root`` accepts: a method, or ``"auto"`` (see :func:`resolve_root_method`).
ROOT_CHOICES: tuple[str, ...] = (*ROOT_METHODS, "auto")


def resolve_root_method(method: str, device: torch.device) -> str:
    """``"auto"``: ``"eigh"`` on CPU, ``"polar_express"`` elsewhere; any other method as given.

    Why: on a CPU, LAPACK's float64 eigendecomposition of a k x k Gram costs about as much as 10 of
    its matmuls, while Polar Express needs ~37 (measured at k = 256, 1 thread: 100 ms against 198 ms
    for 12 Grams; benchmarks/bench_asgo.py), and eigh is exact. On accelerators eigendecompositions
    are slow and synchronising, and the matmul iteration is the fast one.
    """
    if method != "auto":
        return method
    return "eigh" if device.type == "cpu" else "polar_express"


def root_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 or wider: half precisions are promoted, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def damp(v: Tensor, damping: float) -> Tensor:
    """``V + damping * tr(V)/k * I``: a damping relative to the mean eigenvalue (a new tensor).

    Unlike the ``eps`` inside the scaling norm of the iterations, this really changes the matrix, so
    eigenvalues of the result are at least ``damping * mean eigenvalue``.
    """
    if damping == 0.0:
        return v.clone()
    k = v.shape[-1]
    shift = damping * torch.diagonal(v, dim1=-2, dim2=-1).sum(-1) / k
    out = v.clone()
    torch.diagonal(out, dim1=-2, dim2=-1).add_(shift.unsqueeze(-1) if out.dim() > 2 else shift)
    return out


def inv_sqrt_coupled(
    v: Tensor, coeffs: Sequence[tuple[float, float, float]], num_iters: int, eps: float = 1e-10
) -> Tensor:
    """V^{-1/2} of a symmetric PSD ``k x k`` matrix (or a ``b x k x k`` batch) by a coupled iteration.

    Scale ``s = 1.01 * ||V + eps I||_F`` so that the spectrum of ``Y = V/s`` lies in [0, 1); start from
    ``Z = I`` and repeat, with the triple ``(a, b, c)`` of iteration ``i`` (the last triple repeats)::

        T = Z Y;  B = b T + c T^2;  Y <- a Y + Y B;  Z <- a Z + B Z

    Eigenvalue-wise this is ``x <- x p(x)^2`` with ``p(x) = a + b x + c x^2``, which drives every
    eigenvalue of ``Z Y`` to 1, so ``Y -> (V/s)^{1/2}`` and ``Z -> (V/s)^{-1/2}``. Returns ``Z / sqrt(s)``.
    ``eps`` enters only the scaling norm; a zero eigenvalue gives a large finite value (about
    ``2.2e4/sqrt(s)`` for 10 Polar Express iterations), i.e. an implicit damping, never infinity.

    Cost: ``4 * num_iters - 3`` matmuls (the first iteration has ``Z = I``, the last needs no ``Y``).
    Runs in :func:`root_compute_dtype` of ``v``; the result has that dtype and ``v``'s shape.
    """
    dt = root_compute_dtype(v.dtype)
    squeeze = v.dim() == 2
    v3 = v.to(dt).reshape(-1, v.shape[-2], v.shape[-1])
    k = v3.shape[-1]
    eye = torch.eye(k, dtype=dt, device=v.device)
    s = 1.01 * torch.linalg.matrix_norm(v3 + eps * eye).reshape(-1, 1, 1)
    y = v3 / s
    z = eye.expand_as(y)
    for i in range(num_iters):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        t = y if i == 0 else torch.bmm(z, y)
        bmat = torch.baddbmm(t, t, t, beta=b, alpha=c)  # b T + c T^2
        if i < num_iters - 1:
            y = torch.baddbmm(y, y, bmat, beta=a)  # a Y + Y B
        z = bmat + a * eye if i == 0 else torch.baddbmm(z, bmat, z, beta=a)  # a Z + B Z
    out = z / torch.sqrt(s)
    return out[0] if squeeze else out.reshape(v.shape)


def inv_sqrt_polar_express(v: Tensor, num_iters: int | None = None, eps: float = 1e-10) -> Tensor:
    """V^{-1/2} by coupled Polar Express iterations (default 10); see :func:`inv_sqrt_coupled`."""
    n = DEFAULT_ROOT_ITERS["polar_express"] if num_iters is None else num_iters
    return inv_sqrt_coupled(v, POLAR_EXPRESS_COEFFS, n, eps)


def inv_sqrt_newton_schulz(v: Tensor, num_iters: int | None = None, eps: float = 1e-10) -> Tensor:
    """V^{-1/2} by coupled Newton-Schulz iterations (default 18); see :func:`inv_sqrt_coupled`."""
    n = DEFAULT_ROOT_ITERS["newton_schulz"] if num_iters is None else num_iters
    return inv_sqrt_coupled(v, (NEWTON_SCHULZ_COEFFS,), n, eps)


def inv_sqrt_eigh(v: Tensor, rcond: float = 1e-12) -> Tensor:
    """Reference V^{-1/2} in float64 by eigendecomposition (pseudo-inverse root); batches allowed.

    Eigenvalues ``<= rcond * max eigenvalue`` (and negative rounding noise) count as zero and map to
    zero, so for ``V = G G^T`` the product ``V^{-1/2} G`` is the polar factor of ``G`` even when ``G``
    is rank deficient. Returns :func:`root_compute_dtype` of ``v``.
    """
    out_dt = root_compute_dtype(v.dtype)
    v64 = v.to(torch.float64)
    v64 = 0.5 * (v64 + v64.transpose(-1, -2))  # exact symmetry for eigh
    evals, evecs = torch.linalg.eigh(v64)
    top = evals.amax(dim=-1, keepdim=True).clamp_min(0.0)
    keep = evals > rcond * top
    inv_root = torch.where(keep, evals.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(),
                           torch.zeros_like(evals))
    root: Tensor = (evecs * inv_root.unsqueeze(-2)) @ evecs.transpose(-1, -2)
    return root.to(out_dt)


def inverse_sqrt(
    v: Tensor, method: str = "polar_express", *, num_iters: int | None = None, eps: float = 1e-10,
    damping: float = 0.0,
) -> Tensor:
    """(V + damping * tr(V)/k * I)^{-1/2} by ``method`` (one of :data:`ROOT_CHOICES`).

    ``num_iters=None`` uses :data:`DEFAULT_ROOT_ITERS`; ``eps`` is the scaling-norm epsilon of the
    iterations (ignored by ``"eigh"``). The result has :func:`root_compute_dtype` of ``v`` and may be
    non-finite if ``v`` is; callers check.
    """
    vd = damp(v.to(root_compute_dtype(v.dtype)), damping)
    method = resolve_root_method(method, v.device)
    if method == "polar_express":
        return inv_sqrt_polar_express(vd, num_iters, eps)
    if method == "newton_schulz":
        return inv_sqrt_newton_schulz(vd, num_iters, eps)
    if method == "eigh":
        return inv_sqrt_eigh(vd)
    raise ValueError(f"Invalid inverse_root={method!r}. Must be one of {', '.join(map(repr, ROOT_CHOICES))}.")
