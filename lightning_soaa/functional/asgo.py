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

import math

import torch
from torch import Tensor

__all__ = [
    "LEFT",
    "RIGHT",
    "matrix_view",
    "preconditioned_side",
    "update_momentum_",
    "update_gram_",
    "precondition",
    "rms_normalize",
    "scale_to_rms",
    "apply_update_",
    "asgo_direction",
    "update_column_stat_",
    "dasgo_direction",
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
    """``M <- beta1 M + (1 - beta1) G`` in place (EMA, no bias correction, no Nesterov)."""
    mom.lerp_(g, 1.0 - beta1)


def update_gram_(v: Tensor, g: Tensor, beta2: float, side: str) -> None:
    """``V <- beta2 V + (1 - beta2) G G^T`` (left) or ``... G^T G`` (right), in place, from the raw ``G``."""
    if side == LEFT:
        v.addmm_(g, g.transpose(0, 1), beta=beta2, alpha=1.0 - beta2)
    else:
        v.addmm_(g.transpose(0, 1), g, beta=beta2, alpha=1.0 - beta2)


def precondition(p: Tensor, mom: Tensor, side: str) -> Tensor:
    """``U = P M`` (left) or ``U = M P`` (right), in the dtype of ``mom``."""
    p = p.to(mom.dtype)
    return p @ mom if side == LEFT else mom @ p


def rms_normalize(u: Tensor, rms_scale: float) -> Tensor:
    """``U * rms_scale * sqrt(mn) / ||U||_F``: every update has entry-RMS ``rms_scale``.

    A zero ``U`` stays zero (no division by zero, no host sync): a norm of zero means every entry is
    zero, so any finite factor gives the same result.
    """
    norm = torch.linalg.vector_norm(u)
    factor = (rms_scale * math.sqrt(u.numel())) / norm.clamp_min(torch.finfo(norm.dtype).tiny)
    out: Tensor = u * factor
    return out


def scale_to_rms(u: Tensor, rms_scale: float, sq_norm: Tensor, numel: int) -> Tensor:
    """``u * rms_scale * sqrt(numel) / sqrt(sq_norm)``: :func:`rms_normalize` for a piece ``u`` of a
    larger update whose squared Frobenius norm ``sq_norm`` and size ``numel`` were summed elsewhere (e.g.
    over the row shards of an FSDP2 parameter). A zero norm leaves the (then zero) update zero."""
    norm = sq_norm.sqrt()
    return u * ((rms_scale * math.sqrt(numel)) / norm.clamp_min(torch.finfo(norm.dtype).tiny))


def apply_update_(param: Tensor, u: Tensor, lr: float, weight_decay: float) -> None:
    """``W <- W (1 - lr wd) - lr U`` in place; ``u`` may be the matrix form of ``param``'s shape."""
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)
    param.add_(u.reshape(param.shape).to(param.dtype), alpha=-lr)


def asgo_direction(p: Tensor, mom: Tensor, side: str, rms_scale: float) -> Tensor:
    """The normalised ASGO update ``rms_normalize(P M or M P)``."""
    return rms_normalize(precondition(p, mom, side), rms_scale)


def update_column_stat_(v: Tensor, g: Tensor, beta2: float) -> None:
    """DASGO: ``v <- beta2 v + (1 - beta2) sum_rows G^2`` in place (``v`` has ``n`` entries)."""
    v.mul_(beta2).add_(g.square().sum(dim=0), alpha=1.0 - beta2)


def dasgo_direction(mom: Tensor, v: Tensor, eps: float, rms_scale: float) -> Tensor:
    """DASGO: ``rms_normalize(M * (v + eps)^{-1/2})`` with ``v`` broadcast over the rows."""
    return rms_normalize(mom * (v + eps).rsqrt().unsqueeze(0), rms_scale)
