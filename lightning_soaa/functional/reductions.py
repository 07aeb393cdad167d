"""Norms and dot products accumulated in float64 without a float64 copy of a large tensor.

Why float64: the squares of a float32 update whose entries are ~1e-28 underflow to 0, and a sum of many
float32 squares loses digits. Why not simply ``vector_norm(t, dtype=torch.float64)``: on the CPU that
converts the whole tensor to a float64 copy first (a 1024 x 16384 float32 block: a 128 MiB temporary, twice
the block), and ``(a.double() * b.double()).sum()`` makes three. Here a tensor of more than :data:`CHUNK`
elements is reduced in chunks (each an 8 MiB float64 temporary at most), the chunks' results summed in
float64. Tensors of up to :data:`CHUNK` elements are reduced exactly as before (one call), so small models'
results are unchanged bit for bit; a large tensor's result differs from the one-call value by rounding only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["CHUNK", "norms_f64", "sq_norm_f64", "dot_f64"]

#: elements per chunk: 2^20 (an 8 MiB float64 temporary)
CHUNK = 1 << 20


def _pieces(t: Tensor) -> list[Tensor]:
    """Views of ``t`` of at most about :data:`CHUNK` elements that together hold each element once, cut by
    its shape alone (so two tensors of one shape are cut alike, whatever their strides): blocks of rows
    along dim 0, a row wider than a chunk cut in turn."""
    if t.numel() <= CHUNK or t.dim() == 0:
        return [t]
    if t.dim() > 1 and t[0].numel() > CHUNK:
        return [piece for row in t for piece in _pieces(row)]
    rows = max(1, CHUNK // max(1, t[0].numel()))
    return [t[i:i + rows] for i in range(0, t.shape[0], rows)]


def _reduced_whole(t: Tensor) -> bool:
    """Whether a norm of ``t`` is one call: small, or not on the CPU (the float64 copy of a norm was measured
    on the CPU; on an accelerator chunks would cost a launch each, unmeasured here)."""
    return t.numel() <= CHUNK or t.device.type != "cpu"


def sq_norm_f64(t: Tensor) -> Tensor:
    """``‖t‖²`` accumulated in float64, a 0-d float64 tensor on ``t``'s device."""
    if _reduced_whole(t):
        out: Tensor = torch.linalg.vector_norm(t, dtype=torch.float64).square()
        return out
    return torch.stack([torch.linalg.vector_norm(p, dtype=torch.float64).square() for p in _pieces(t)]).sum()


def norms_f64(ts: Sequence[Tensor]) -> Tensor:
    """The 2-norms of ``ts`` accumulated in float64, one float64 tensor of ``len(ts)`` (one multi-tensor
    call for the tensors reduced whole, the order of ``ts`` kept)."""
    small = [i for i, t in enumerate(ts) if _reduced_whole(t)]
    if len(small) == len(ts):
        return torch.stack(torch._foreach_norm(list(ts), dtype=torch.float64))
    out: list[Tensor | None] = [None] * len(ts)
    if small:
        for i, n in zip(small, torch._foreach_norm([ts[i] for i in small], dtype=torch.float64)):
            out[i] = n
    for i, t in enumerate(ts):
        if out[i] is None:
            out[i] = sq_norm_f64(t).sqrt()
    return torch.stack(out)  # type: ignore[arg-type]


def dot_f64(a: Tensor, b: Tensor) -> Tensor:
    """``Σ a·b`` over all elements of two tensors of one shape, accumulated in float64 (0-d float64)."""
    pa, pb = _pieces(a), _pieces(b)
    if len(pa) == 1:
        return (a.to(torch.float64) * b.to(torch.float64)).sum()
    return torch.stack([(x.to(torch.float64) * y.to(torch.float64)).sum() for x, y in zip(pa, pb)]).sum()
