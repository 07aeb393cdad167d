"""Gathering the ranks' block states (checkpoint consolidation) as flat byte buffers.

Pickling every state tensor through an object collective cost 1.1-1.8 s at W = 2 for 3,000 parameter
tensors (30 MiB of state per rank): each tensor went through ``torch.save``'s pickler on the sender
(twice: once more to count its bytes) and ``torch.load`` on the receiver, at every checkpoint Lightning
saves. Here the tensors travel as one byte stream per rank, in bounded windows, through tensor
collectives; only the small rest (block keys, state names, dtypes, shapes, non-tensor values) is pickled.

Collectives, the same on every rank in the same order (a rank that owns nothing, or has no state yet,
sends zero bytes but takes part in every call)::

    all_reduce_scalars   [bytes of rank 0, ..., bytes of rank W-1]      every rank knows every length
    (all_)gather_object  the skeletons (tensors replaced by _Flat)       on ``to`` (every rank: to=None)
    (all_)gather_flat    window 0 of every rank's bytes, padded equal    ceil(max bytes / window) calls
    ...

The receiver allocates each tensor once, at its final size, and copies each window into it: the peak
above the result is one receive buffer (W x the window, at most :data:`RECV_BYTES` unless one rank's
window is :data:`MIN_WINDOW_BYTES`) and one send window, where the pickled path held the pickled bytes of
every rank, then their unpickled copies.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch
from torch import Tensor

from lightning_soaa.distributed.comm import gather_flat, gather_object

__all__ = ["RECV_BYTES", "MIN_WINDOW_BYTES", "gather_block_states"]

#: the largest receive buffer of one window (all ranks' pieces), bytes: 256 MiB measured a peak of +641 MiB
#: on the receiver at W = 2 for 128 MiB of state per rank (the 256 MiB result, a 256 MiB receive buffer and
#: a 128 MiB send window), as much as the pickled path; 64 MiB windows cost no more time at 30 MiB per rank
RECV_BYTES = 64 * 2**20
#: the smallest piece of one rank in a window, bytes (at a large W the receive buffer is W times this)
MIN_WINDOW_BYTES = 2**20
#: where every buffer and received tensor is made, whatever ``torch.set_default_device`` says: under a CUDA
#: default the senders' windows were made on the GPU and packing the CPU state into them raised, while the
#: receiver (which does not pack) went on into the gather alone; and the state dict's tensors landed on the GPU
_CPU = torch.device("cpu")


class _Flat:
    """The value in a skeleton where a tensor travels in the byte stream (the class itself: pickled as a
    name, once). Its dtype and shape are the next entry of the skeleton's spec list (plain tuples: 4,500
    small dataclass objects took 90 ms to unpickle)."""


_DTYPE_NAMES: dict[torch.dtype, str | None] = {}


def _dtype_name(dtype: torch.dtype) -> str | None:
    """``dtype``'s attribute name in ``torch`` (how the receiver finds it again); None where there is none."""
    if dtype not in _DTYPE_NAMES:
        name = str(dtype).removeprefix("torch.")
        _DTYPE_NAMES[dtype] = name if getattr(torch, name, None) is dtype else None
    return _DTYPE_NAMES[dtype]


def _as_bytes(v: Any) -> Tensor | None:
    """``v``'s bytes as a flat uint8 view, for a plain dense contiguous CPU tensor; None for anything else
    (a tensor subclass, a non-contiguous or conjugated tensor...), which is pickled as before."""
    if (type(v) is not Tensor or not v.is_cpu or v.layout != torch.strided or v.is_quantized
            or not v.is_contiguous() or v.is_conj() or v.is_neg() or v.requires_grad
            or _dtype_name(v.dtype) is None):
        return None
    try:
        return v.reshape(-1).view(torch.uint8)
    except RuntimeError:
        return None


_Skeleton = tuple[dict[Any, dict[str, Any]], list[tuple[str, tuple[int, ...]]]]


def _split(blocks: dict[Any, dict[str, Any]]) -> tuple[_Skeleton, list[int], list[Tensor]]:
    """The skeleton of ``blocks`` (each flat-sendable tensor replaced by :class:`_Flat`, its dtype's name and
    shape listed in stream order), and the byte offsets and byte views of those tensors."""
    skeleton: dict[Any, dict[str, Any]] = {}
    specs: list[tuple[str, tuple[int, ...]]] = []
    offsets: list[int] = []
    views: list[Tensor] = []
    at = 0
    for key, st in blocks.items():
        skeleton[key] = {}
        for k, v in st.items():
            raw = _as_bytes(v)
            if raw is None:
                skeleton[key][k] = v
                continue
            skeleton[key][k] = _Flat
            specs.append((_DTYPE_NAMES[v.dtype] or "", tuple(v.shape)))
            offsets.append(at)
            views.append(raw)
            at += raw.numel()
    return (skeleton, specs), offsets, views


def _materialize(skeleton: _Skeleton) -> tuple[dict[Any, dict[str, Any]], list[int], list[Tensor]]:
    """The blocks of ``skeleton``, each :class:`_Flat` replaced by an empty tensor of its dtype and shape;
    their byte offsets and byte views in stream order (what the windows are copied into)."""
    blocks, specs = skeleton
    offsets: list[int] = []
    views: list[Tensor] = []
    at, i = 0, 0
    for st in blocks.values():
        for k, v in st.items():
            if v is _Flat:
                dtype, shape = specs[i]
                i += 1
                st[k] = torch.empty(shape, dtype=getattr(torch, dtype), device=_CPU)
                offsets.append(at)
                views.append(st[k].reshape(-1).view(torch.uint8))
                at += views[-1].numel()
    return blocks, offsets, views


def _window_pieces(offsets: list[int], views: list[Tensor], start: int, stop: int) -> list[Tensor]:
    """The parts of ``views`` inside bytes ``[start, stop)`` of the stream, in order: consecutive from
    ``start`` (the stream has no gaps), the first and the last cut where they cross the window's ends."""
    i0, i1 = max(bisect.bisect_right(offsets, start) - 1, 0), bisect.bisect_left(offsets, stop)
    pieces = views[i0:i1]  # whole tensors but for the two ends: no Python per tensor
    if pieces:
        if start > offsets[i0]:
            pieces[0] = pieces[0][start - offsets[i0]:]
        over = offsets[i1 - 1] + views[i1 - 1].numel() - stop
        if over > 0:
            pieces[-1] = pieces[-1][:pieces[-1].numel() - over]
    return pieces


def _pack(offsets: list[int], views: list[Tensor], start: int, length: int, fill: bool = True) -> Tensor:
    """This rank's bytes ``[start, start + length)``, zero-padded past its end (not filled where ``fill`` is
    False: the receiver of a gather, which drops its own piece)."""
    buf = torch.empty(length, dtype=torch.uint8, device=_CPU)
    if not fill:
        return buf
    pieces = _window_pieces(offsets, views, start, start + length)
    used = sum(p.numel() for p in pieces)
    if pieces:
        torch.cat(pieces, out=buf[:used])
    buf[used:].zero_()
    return buf


def _window(sizes: list[int], start: int) -> int:
    """The bytes of the window at ``start``: the same on every rank (computed from every rank's size)."""
    world = len(sizes)
    piece = max(MIN_WINDOW_BYTES, RECV_BYTES // world)
    return min(piece, max(max(sizes) - start, 0))


def _gather_skeletons(comm: Any, skeleton: _Skeleton, to: int | None) -> list[Any] | None:
    """Every rank's skeleton on ``to`` (every rank: None); the receiver's own is not sent (None there)."""
    if to is None:
        out: list[Any] = comm.all_gather_object(skeleton)
        return out
    return gather_object(comm, None if comm.rank == to else skeleton, to)


def gather_block_states(comm: Any, blocks: dict[Any, dict[str, Any]], to: int | None) -> list[Any] | None:
    """Collective: every rank's ``blocks`` (``{block key: {state name: value}}``, CPU), in rank order, on rank
    ``to`` (None on the others), or on every rank (``to=None``). A rank's own entry is ``blocks`` itself (not
    copied); the others' tensors are new tensors, bit for bit the sender's (dtype, shape, bytes)."""
    skeleton, offsets, views = _split(blocks)
    world, me = comm.world_size, comm.rank
    row = torch.zeros(world, dtype=torch.float64, device=_CPU)
    row[me] = float(offsets[-1] + views[-1].numel()) if views else 0.0
    sizes = [int(x) for x in comm.all_reduce_scalars(row).tolist()]  # exact: float64 holds 2**53 bytes
    parts = _gather_skeletons(comm, skeleton, to)
    del skeleton
    receiving = to is None or me == to
    streams: dict[int, tuple[list[int], list[Tensor]]] = {}
    if receiving:
        assert parts is not None
        for r in range(world):
            if r != me:
                parts[r], offs, outs = _materialize(parts[r])
                streams[r] = (offs, outs)
        parts[me] = blocks
    start = 0
    while (length := _window(sizes, start)) > 0:
        buf = _pack(offsets, views, start, length, fill=to is None or me != to)
        got = comm.all_gather_flat(buf) if to is None else gather_flat(comm, buf, to)
        del buf
        if receiving:
            assert got is not None
            dst, src = [], []
            for r, (offs, outs) in streams.items():
                pieces = _window_pieces(offs, outs, start, start + length)
                sizes_r = [p.numel() for p in pieces]
                dst += pieces
                src += got[r * length:r * length + sum(sizes_r)].split(sizes_r)
            if dst:
                torch._foreach_copy_(dst, src)
        start += length
    return parts if receiving else None
