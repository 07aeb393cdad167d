"""Virtual parameters: what the inner optimizer steps over, built from what DeepSpeed hands us.

Three layouts:

* ``native`` (ZeRO stage 0): the tensors in the param groups, with their real shapes (the model's
  parameters, or DeepSpeed's fp32 master copies under bf16). Our own sharding applies.
* ``elementwise`` (SOAA, AdamW at ZeRO-1/2/3): the flat 1-D partitions themselves. The math is valid on
  any 1-D slice, so nothing else is needed.
* ``structured`` (ASGO at ZeRO-1/2/3): views into the flat partition rebuilt from DeepSpeed's
  per-parameter fragment maps -- never from ``p.shape`` of the flat tensor. A parameter's fragment on
  this rank is a contiguous range ``[a, b)`` of its row-major flattening. For a parameter with ``ndim >=
  2`` (rows along dim 0, ``c = numel / rows`` entries per row)::

        parameter (rows x c), flattened:   |....[a.....|=====|=====|=====|..b]....|
                                                  head  full rows r0..r1   tail
        head [a, r0*c) and tail [r1*c, b)  -> 1-D views (named "<name>[cut]"; ASGO sends 1-D to Adam)
        full rows r0..r1                   -> one (r1-r0, *shape[1:]) view named "<name>"

  A 1-D (or 0-D) parameter's fragment is one 1-D view. Fragments come, at ZeRO-1/2, from the flat
  buffer's own layout (``round_robin_bit16_groups`` at ``round_robin_bit16_offsets``, rank ``r`` holding
  ``[r*P, r*P+P)``; see :func:`_flat_order_segments`), for the BF16 optimizer from ``lp._hp_mapping``
  (``lp_fragment_address`` inside the parameter, ``hp_fragment_address`` inside the flat partition) or, at
  ZeRO-3, from the sub-group's parameter list: the flat partition is
  the concatenation of each parameter's ``ds_tensor`` (``partition_numel()`` entries, the last rank
  padded), and rank ``r`` holds ``[r*P, r*P+P) ∩ [0, ds_numel)`` of the parameter.

Gradients: views into ``flat.grad`` attached right before the inner step and dropped after it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = ["Segment", "VirtualParams", "build_virtual_params", "split_segment", "segments_for_flat"]


@dataclasses.dataclass(frozen=True)
class Segment:
    """One parameter's fragment inside a flat partition."""

    name: str | None
    shape: tuple[int, ...]  # the parameter's full shape
    lp_start: int  # first element of the fragment in the parameter's row-major flattening
    hp_start: int  # where it starts inside the flat partition
    numel: int


@dataclasses.dataclass(frozen=True)
class Piece:
    """A view to build: ``flat[hp_start : hp_start + numel].view(shape)``."""

    name: str | None
    hp_start: int
    numel: int
    shape: tuple[int, ...]
    kind: str  # "rows" (full rows of a matrix), "cut" (rows cut by a partition edge), "vector"
    lp_start: int = 0  # where the piece starts in its parameter's row-major flattening
    param_name: str | None = None


def split_segment(seg: Segment) -> list[Piece]:
    """Split one fragment into a full-row block and the cut head/tail (see the module docstring)."""
    cut = None if seg.name is None else f"{seg.name}[cut]"
    a, b = seg.lp_start, seg.lp_start + seg.numel
    nm = seg.name
    if len(seg.shape) < 2 or seg.numel == 0:
        return [Piece(nm, seg.hp_start, seg.numel, (seg.numel,), "vector", a, nm)] if seg.numel else []
    c = math.prod(seg.shape[1:])
    r0, r1 = -(-a // c), b // c
    if r1 <= r0:
        return [Piece(cut, seg.hp_start, seg.numel, (seg.numel,), "cut", a, nm)]
    pieces = []
    if r0 * c > a:
        pieces.append(Piece(cut, seg.hp_start, r0 * c - a, (r0 * c - a,), "cut", a, nm))
    body_start = seg.hp_start + (r0 * c - a)
    pieces.append(Piece(nm, body_start, (r1 - r0) * c, (r1 - r0, *seg.shape[1:]), "rows", r0 * c, nm))
    if b > r1 * c:
        pieces.append(Piece(cut, body_start + (r1 - r0) * c, b - r1 * c, (b - r1 * c,), "cut", r1 * c, nm))
    return pieces


@dataclasses.dataclass
class VirtualParams:
    tensors: list[Tensor]
    groups: list[int]
    names: list[str | None]
    # per tensor: None (the tensor is what DeepSpeed hands us) or (flat, start, numel, shape) of a view
    sources: list[tuple[Tensor, int, int, tuple[int, ...]] | None]
    pieces: list[Piece | None] = dataclasses.field(default_factory=list)

    def split_group(self, gi: int, *, forced_matrix: bool) -> list[tuple[list[Tensor], list[str] | None,
                                                                          dict[str, Any]]]:
        """The inner param groups for canonical group ``gi``: ``(tensors, names, hyperparameter
        overrides)``. Pieces cut by a partition edge always take the AdamW fallback: when the group
        forces the matrix method (``use_asgo=True``) they move to a sibling group with ``use_asgo=False``.
        """
        idx = [i for i, g in enumerate(self.groups) if g == gi]
        cut = [i for i in idx if getattr(self.pieces[i], "kind", None) == "cut"]
        main = [i for i in idx if i not in cut] if forced_matrix else idx
        parts = [(main, {})]
        if forced_matrix and cut:
            parts.append((cut, {"use_asgo": False}))
        out = []
        for sel, override in parts:
            names = [self.names[i] for i in sel]
            out.append(([self.tensors[i] for i in sel], None if any(n is None for n in names) else names,
                        override))
        return out  # type: ignore[return-value]

    def attach_grads(self) -> None:
        for t, src in zip(self.tensors, self.sources):
            if src is not None:
                flat, start, n, shape = src
                t.grad = None if flat.grad is None else flat.grad.narrow(0, start, n).view(shape)

    def detach_grads(self) -> None:
        for t, src in zip(self.tensors, self.sources):
            if src is not None:
                t.grad = None


def _zero3_segments(zo: Any, flat: Tensor) -> list[Segment]:
    import torch.distributed as dist

    k = next(i for i, f in enumerate(zo.fp32_partitioned_groups_flat) if f is flat)
    get_rank = getattr(zo, "_get_sub_group_partition_rank", None)
    rank = get_rank(k) if get_rank is not None else dist.get_rank(group=zo.dp_process_group)
    segs, off = [], 0
    for p in zo.fp16_groups[k]:
        part = p.partition_numel()
        start = rank * part
        n = max(0, min(part, p.ds_numel - start))
        name = getattr(p, "_lightning_soaa_name", None)
        if n:
            segs.append(Segment(name, tuple(p.ds_shape), start, off, n))
        off += part
    return segs


def _hp_mapping_segments(lp_params: Sequence[Tensor]) -> list[Segment]:
    segs = []
    for lp in lp_params:
        m = getattr(lp, "_hp_mapping", None)
        if m is None:
            continue
        segs.append(Segment(getattr(lp, "_lightning_soaa_name", None), tuple(lp.shape),
                            m.lp_fragment_address.start, m.hp_fragment_address.start,
                            m.lp_fragment_address.numel))
    return segs


def _flat_order_segments(zo: Any, group_index: int, flat: Tensor) -> list[Segment]:
    """ZeRO-1/2: the fragments from the layout of the flat buffer itself. DeepSpeed flattens a group's
    parameters in ``round_robin_bit16_groups`` order at ``round_robin_bit16_offsets`` (the original order
    unless ``round_robin_gradients``) and rank ``r`` holds ``[r*P, r*P + P)`` of it. Its per-parameter maps
    (``lp._hp_mapping``) are linked in the original order where no parameter is padded (DeepSpeed 0.19.8,
    stage_1_and_2.py ``_link_all_hp_params``), so under round-robin ordering they address other parameters'
    entries: read from them, ASGO's matrices mixed parameters, silently (3.4e-2 off in 4 steps)."""
    import torch.distributed as dist

    group = zo.real_dp_process_group[group_index]
    world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
    size = zo.bit16_groups_flat[group_index].numel() // world
    if size != flat.numel():
        raise RuntimeError(f"DeepSpeed's flat partition of param group {group_index} holds {flat.numel()} entries; "
                           f"its flat buffer gives {size} per rank: the layout is not the one this version reads")
    start, stop = rank * size, (rank + 1) * size
    params = zo.round_robin_bit16_groups[group_index]
    # shapes from DeepSpeed's meta copies where it keeps them: an offload may empty a parameter's storage
    metas = getattr(zo, "round_robin_bit16_meta", None)
    shapes = [tuple(m.shape) for m in (params if metas is None else metas[group_index])]
    segs = []
    for p, shape, offset in zip(params, shapes, zo.round_robin_bit16_offsets[group_index]):
        first, last = max(offset, start), min(offset + math.prod(shape), stop)
        if first < last:
            segs.append(Segment(getattr(p, "_lightning_soaa_name", None), shape, first - offset, first - start,
                                last - first))
    return segs


def segments_for_flat(zo: Any, group_index: int, flat: Tensor) -> list[Segment]:
    """The fragments inside one flat partition, read from DeepSpeed's own layout."""
    if hasattr(zo, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return _zero3_segments(zo, flat)
    if hasattr(zo, "round_robin_bit16_groups"):  # ZeRO-1/2
        return _flat_order_segments(zo, group_index, flat)
    if hasattr(zo, "bf16_groups"):  # BF16_Optimizer (no reordering)
        return _hp_mapping_segments(zo.bf16_groups[group_index])
    raise RuntimeError(f"cannot read parameter fragment maps from {type(zo).__name__}")


def build_virtual_params(
    flats: list[tuple[int, Tensor]],
    *,
    layout: str,
    zero_stage: int,
    zero_optimizer: Any,
    model_params: list[Tensor],
    param_names: dict[int, str],
) -> VirtualParams:
    if layout in ("native", "elementwise"):
        names: list[str | None] = []
        for pos, (_, t) in enumerate(flats):
            name = param_names.get(id(t))
            if name is None and layout == "native" and pos < len(model_params) \
                    and model_params[pos].shape == t.shape:
                name = param_names.get(id(model_params[pos]))  # fp32 master copy of that parameter
            names.append(name)
        return VirtualParams([t for _, t in flats], [g for g, _ in flats], names, [None] * len(flats),
                             [None] * len(flats))
    if layout != "structured":
        raise ValueError(f"Invalid layout={layout!r}. Must be one of 'native', 'elementwise', 'structured'.")
    if zero_optimizer is None:
        raise RuntimeError(
            "a structured optimizer at ZeRO-1/2/3 needs the engine: call deepspeed_ext.bind(engine)")
    # Tag DeepSpeed's low-precision parameters with their module names (fragment maps hang off them).
    for p in model_params:
        if id(p) in param_names:
            p._lightning_soaa_name = param_names[id(p)]  # type: ignore[attr-defined]
    vp = VirtualParams([], [], [], [], [])
    for gi, flat in flats:
        base = flat.detach()
        for seg in segments_for_flat(zero_optimizer, gi, flat):
            for piece in split_segment(seg):
                vp.tensors.append(base.narrow(0, piece.hp_start, piece.numel).view(piece.shape))
                vp.groups.append(gi)
                vp.names.append(piece.name)
                vp.sources.append((flat, piece.hp_start, piece.numel, piece.shape))
                vp.pieces.append(piece)
    return vp
