"""Whether replicas that may drift by ulps differ by more than that: each copy compared with its reference's to a
tolerance, where a bitwise comparison refused legitimate runs.

Two kinds of replica drift honestly. FSDP2's plain (not ``fully_shard``ed) parameters under ``grad_reduction="none"``:
their gradients are compared across ranks to a tolerance (``agreement.GRAD_RTOL``: another device's reduction
kernel differs in its last bits). DTensor ``Replicate`` weights (tensor parallelism, HSDP's replicate dim): each
rank computes their gradient itself, and a non-deterministic CUDA kernel (atomics in a backward, e.g. an
embedding's) gives each rank other last bits. Their copies then drift by ulps, and a bitwise comparison refused the
run at the periodic replica check (``replica_check_every``), at an EMA swap made on one rank, and at every retry.

The bitwise digest stays the check's first test (it costs nothing more: it travels in the step's all-reduce). Only
where it says the copies differ are their values exchanged and compared element by element, within
:data:`DRIFT_RTOL` of the parameter's (the piece's) largest magnitude: a write on some ranks only (``p.mul_(1.5)``,
a row renormalised by ``nn.Embedding(max_norm=...)``, weights loaded on one rank) moves elements by far more than
that; a write smaller than the tolerance is one the drift already makes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["DRIFT_RTOL", "beyond_drift", "drift_tolerance", "pieces_beyond_drift"]

#: the largest difference between two ranks' copies that counts as drift, relative to the parameter's largest
#: magnitude (a float32 copy: ~80 ulps at that magnitude); raised to 4 ulps of a coarser dtype
DRIFT_RTOL = 1e-5


def drift_tolerance(dtype: torch.dtype) -> float:
    """:data:`DRIFT_RTOL`, or 4 ulps (relative) of ``dtype`` where that is larger (bfloat16, float16)."""
    real = torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype
    return max(DRIFT_RTOL, 4 * torch.finfo(real).eps)


def _as_real64(p: Tensor) -> Tensor:
    x = p.detach()
    if x.is_complex():
        x = torch.view_as_real(x.resolve_conj())
    return x.reshape(-1).to(torch.float64)


def _host_copy(p: Tensor) -> Tensor:
    return _as_real64(p).cpu()


def _apart(mine: Tensor, ref: Tensor, rtol: float) -> bool:
    """Whether ``mine`` differs from ``ref`` by more than ``rtol`` of ``ref``'s largest finite magnitude in some
    element (equal non-finite values, NaNs included, are equal: the bitwise comparison held them so)."""
    if mine.shape != ref.shape:
        return True
    finite = ref.isfinite()
    scale = float(ref[finite].abs().max()) if bool(finite.any()) else 0.0
    close = (mine == ref) | ((mine - ref).abs() <= rtol * scale) | (mine.isnan() & ref.isnan())
    return not bool(close.all())


def beyond_drift(params: Sequence[Tensor], rank: int, all_reduce_: Callable[[Tensor], Tensor]) -> list[int]:
    """The positions in ``params`` (FSDP2's plain replicas) whose copy on this rank differs from rank 0's by more
    than drift (:func:`drift_tolerance`). Collective: every rank calls it with the same parameter shapes; rank 0's
    copy reaches the others through one sum per parameter to which the other ranks add zeros (exact in float64)."""
    out = []
    for j, p in enumerate(params):
        mine = _as_real64(p)
        ref = all_reduce_(mine.clone() if rank == 0 else torch.zeros_like(mine))
        if _apart(mine, ref.to(mine.device), drift_tolerance(p.dtype)):
            out.append(j)
    return out


def pieces_beyond_drift(pieces: Sequence[Tensor], rank: int, replica_of: Sequence[int],
                        gather: Callable[[Callable[[], Any]], list[Any]], drifts: Sequence[bool]) -> list[int]:
    """The positions in ``pieces`` (this rank's local pieces of the ``Replicate`` DTensor parameters) whose copy
    differs from its replica's (rank ``replica_of[rank]``) by more than drift, where ``drifts`` says it may drift
    (a tensor-parallel ``Replicate`` weight); else in any bit (HSDP's replicas, whose gradient FSDP2 averages:
    equal bits by construction, so a tolerance would only let a real write pass). Collective: ``gather(make)`` is
    every rank's ``make()`` (None from a rank that could not make it), one piece at a time (host memory: every
    rank's copy of one piece)."""
    out = []
    for j, p in enumerate(pieces):
        copies = gather(functools.partial(_host_copy, p))  # (made inside: a rank that cannot still joins, with None)
        mine, ref = copies[rank], copies[replica_of[rank]]
        if mine is None or ref is None or _apart(mine, ref, drift_tolerance(p.dtype) if drifts[j] else 0.0):
            out.append(j)
    return out
