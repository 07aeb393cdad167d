"""Whether FSDP2's plain replicas under ``grad_reduction="none"`` differ by more than honest drift.

Under FSDP2 with ``"none"`` the plain (not ``fully_shard``ed) parameters' gradients are compared across ranks to a
tolerance (``agreement.GRAD_RTOL``: another device's reduction kernel differs in its last bits), so every rank's
honest copy may drift from the others by ulps. A bitwise comparison then refused legitimate code: a rank that
swapped EMA weights in for an evaluation and its own back, alone, moved version counters there only, and the copies,
compared bit for bit, "differed". Here each copy is compared with rank 0's element by element, to a tolerance
relative to the parameter's largest magnitude: a write on some ranks only (``p.mul_(1.5)``, a row renormalised by
``nn.Embedding(max_norm=...)``) moves elements by far more than that; a write smaller than the tolerance is one the
drift already allowed makes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["PLAIN_DRIFT_RTOL", "beyond_drift", "drift_tolerance"]

#: the largest difference between two ranks' copies of a plain parameter under FSDP2 "none", relative to its largest
#: magnitude, that counts as drift (a float32 copy: ~80 ulps at that magnitude); raised to 4 ulps of a coarser dtype
PLAIN_DRIFT_RTOL = 1e-5


def drift_tolerance(dtype: torch.dtype) -> float:
    """:data:`PLAIN_DRIFT_RTOL`, or 4 ulps (relative) of ``dtype`` where that is larger (bfloat16, float16)."""
    real = torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype
    return max(PLAIN_DRIFT_RTOL, 4 * torch.finfo(real).eps)


def _as_real64(p: Tensor) -> Tensor:
    x = p.detach()
    if x.is_complex():
        x = torch.view_as_real(x.resolve_conj())
    return x.reshape(-1).to(torch.float64)


def _apart(mine: Tensor, ref: Tensor, rtol: float) -> bool:
    """Whether ``mine`` differs from ``ref`` by more than ``rtol`` of ``ref``'s largest magnitude in some element
    (equal non-finite values, NaNs included, are equal: a bitwise comparison held them so)."""
    finite = ref.isfinite()
    scale = float(ref[finite].abs().max()) if bool(finite.any()) else 0.0
    close = (mine == ref) | ((mine - ref).abs() <= rtol * scale) | (mine.isnan() & ref.isnan())
    return not bool(close.all())


def beyond_drift(params: Sequence[Tensor], rank: int, all_reduce_: Callable[[Tensor], Tensor]) -> list[int]:
    """The positions in ``params`` whose copy on this rank differs from rank 0's by more than drift
    (:func:`drift_tolerance`). Collective: every rank calls it with the same parameter shapes; rank 0's copy
    reaches the others through one sum per parameter to which the other ranks add zeros (exact in float64)."""
    out = []
    for j, p in enumerate(params):
        mine = _as_real64(p)
        ref = all_reduce_(mine.clone() if rank == 0 else torch.zeros_like(mine))
        if _apart(mine, ref.to(mine.device), drift_tolerance(p.dtype)):
            out.append(j)
    return out
