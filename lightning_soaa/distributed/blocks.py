"""The block table: which parameter (or slice of one) each block is, what it costs, who owns it.

A block is a contiguous range ``[start, stop)`` of one parameter along one dimension (``dim``), or the
whole parameter (``dim is None``). The table depends on the parameters and on the optimizer's blocking
rule; state is keyed by ``(param_index, block_index_within_param)`` and saved with the layout, so a
checkpoint loads at any world size: each rank picks the blocks it owns, and an elementwise optimizer's
state saved with other row blocks (another ``max_block_numel``, or another W when the block size is
automatic, see ``ShardedOptimizer._auto_block_numel``) is re-cut first
(:mod:`lightning_soaa.distributed.reblock`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_soaa.distributed.assignment import assign_owners

__all__ = ["BlockSpec", "BlockInfo", "BlockTable", "param_fingerprint", "row_block_specs", "writable_grad"]


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """What an optimizer asks for: a slice of one parameter and its cost."""

    dim: int | None
    start: int
    stop: int
    cost: float


def row_block_specs(shape: tuple[int, ...], max_block_numel: int) -> list[BlockSpec]:
    """Blocks of an elementwise optimizer: the whole parameter when it has at most ``max_block_numel``
    elements, else the fewest nearly equal ranges of dim 0 (whole rows) of at most that many elements
    (a single row may exceed it: rows are not cut). Cost = numel, the bytes an elementwise step moves.

    Depends only on the shape and the option (whose automatic value depends on the model and W).
    """
    if isinstance(max_block_numel, bool) or not isinstance(max_block_numel, int) or max_block_numel < 1:
        raise ValueError(f"Invalid max_block_numel={max_block_numel!r}. Must be an integer >= 1.")
    numel = 1
    for s in shape:
        numel *= s
    if numel <= max_block_numel or len(shape) == 0 or shape[0] <= 1:
        return [BlockSpec(None, 0, 0, float(max(numel, 1)))]
    row = numel // shape[0]
    rows_per_block = max(1, max_block_numel // max(row, 1))
    n = -(-shape[0] // rows_per_block)
    base, extra = divmod(shape[0], n)
    out, start = [], 0
    for i in range(n):
        stop = start + base + (1 if i < extra else 0)
        out.append(BlockSpec(0, start, stop, float((stop - start) * row)))
        start = stop
    return out


@dataclasses.dataclass(frozen=True)
class BlockInfo:
    """One row of the block table."""

    block_id: int  # position in the table
    param_index: int  # position of the parameter across all param groups, in order
    group_index: int
    sub_index: int  # index of the block within its parameter
    dim: int | None
    start: int
    stop: int
    shape: tuple[int, ...]
    cost: float
    owner: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """This block's view into ``tensor`` (a parameter, its gradient, or a like-shaped buffer)."""
        if self.dim is None:
            return tensor
        return tensor.narrow(self.dim, self.start, self.stop - self.start)

    @property
    def key(self) -> tuple[int, int]:
        return (self.param_index, self.sub_index)


class BlockTable:
    """All blocks of an optimizer, their owners, and per-rank views for packing flat buffers."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        group_of_param: Sequence[int],
        specs: Sequence[Sequence[BlockSpec]],
        world_size: int,
        rank: int,
        shard: bool = True,
    ) -> None:
        rows = _rows(params, group_of_param, specs, first=0)
        self.world_size = world_size
        self.rank = rank
        self.shard = shard
        costs = [r[3].cost for r in rows]
        # Without sharding (W = 1, or DeepSpeed already partitioned the parameters) every block is ours.
        owners = assign_owners(costs, world_size) if shard else [rank] * len(rows)
        self.blocks: list[BlockInfo] = [
            BlockInfo(bid, pi, gi, si, s.dim, s.start, s.stop, shape, s.cost, owners[bid])
            for bid, (pi, gi, si, s, shape) in enumerate(rows)
        ]
        self.by_param: list[list[BlockInfo]] = [[] for _ in params]
        for b in self.blocks:
            self.by_param[b.param_index].append(b)

    def extended(self, params: Sequence[torch.Tensor], group_of_param: Sequence[int],
                 specs: Sequence[Sequence[BlockSpec]]) -> BlockTable:
        """A new table: the one :class:`BlockTable` would build over this table's parameters followed by
        ``params`` (their groups, their specs), made without re-reading the existing blocks. An
        ``add_param_group`` per layer (Lightning's BaseFinetuning) rebuilt every block at each call:
        quadratic (1000 groups: 11 s). The owners are assigned afresh over all costs (greedy, so a new
        block may move an existing one at W > 1); at W = 1 or without sharding nothing existing changes.
        This table is left as it is."""
        rows = _rows(params, group_of_param, specs, first=len(self.by_param))
        old, costs = self.blocks, [r[3].cost for r in rows]
        if self.shard and self.world_size > 1:
            owners = assign_owners([b.cost for b in old] + costs, self.world_size)
        else:  # one owner (the costs validated as the full build does; the existing ones were)
            owners = [b.owner for b in old] + (assign_owners(costs, 1) if self.shard else [self.rank] * len(costs))
        out = BlockTable.__new__(BlockTable)
        out.world_size, out.rank, out.shard = self.world_size, self.rank, self.shard
        moved = self.shard and self.world_size > 1 and any(b.owner != o for b, o in zip(old, owners))
        kept = [dataclasses.replace(b, owner=o) for b, o in zip(old, owners)] if moved else list(old)
        n = len(old)
        out.blocks = kept + [BlockInfo(n + k, pi, gi, si, s.dim, s.start, s.stop, shape, s.cost, owners[n + k])
                             for k, (pi, gi, si, s, shape) in enumerate(rows)]
        # the existing per-parameter lists are shared with this table when no owner moved (never edited)
        out.by_param = ([[] for _ in self.by_param] if moved else list(self.by_param)) + [[] for _ in params]
        for b in out.blocks if moved else out.blocks[n:]:
            out.by_param[b.param_index].append(b)
        return out

    def same_owners(self, before: BlockTable) -> bool:
        """Whether every block of ``before`` has its owner there in this table too, block for block (this
        table :meth:`extended` from it: then each rank's state of those blocks may stay where it is)."""
        return len(self.blocks) >= len(before.blocks) and all(
            a.key == b.key and a.owner == b.owner for a, b in zip(before.blocks, self.blocks))

    def owned(self) -> list[BlockInfo]:
        return [b for b in self.blocks if b.owner == self.rank]

    def loads(self) -> list[float]:
        loads = [0.0] * self.world_size
        for b in self.blocks:
            loads[b.owner] += b.cost
        return loads

    def balance(self) -> float:
        """max load / mean load (1.0 is perfect)."""
        loads = self.loads()
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean > 0 else 1.0

    def layout(self) -> list[list[tuple[int | None, int, int]]]:
        """World-size independent description of the blocking, stored in checkpoints."""
        return [[(b.dim, b.start, b.stop) for b in blist] for blist in self.by_param]


def _rows(params: Sequence[torch.Tensor], group_of_param: Sequence[int], specs: Sequence[Sequence[BlockSpec]],
          first: int) -> list[tuple[int, int, int, BlockSpec, tuple[int, ...]]]:
    """``(param_index, group, sub_index, spec, shape)`` of each block, parameters numbered from ``first``."""
    rows: list[tuple[int, int, int, BlockSpec, tuple[int, ...]]] = []
    for k, (p, gi, plist) in enumerate(zip(params, group_of_param, specs)):
        pi = first + k
        if not plist:
            raise ValueError(f"parameter {pi} produced no blocks")
        for si, s in enumerate(plist):
            if s.dim is None:
                shape = tuple(p.shape)
            else:
                if not (0 <= s.start < s.stop <= p.shape[s.dim]):
                    raise ValueError(f"block {si} of parameter {pi} has an invalid range {s}")
                shape = tuple(p.shape[:s.dim]) + (s.stop - s.start,) + tuple(p.shape[s.dim + 1:])
            rows.append((pi, gi, si, s, shape))
    return rows


def param_fingerprint(params: Sequence[torch.Tensor]) -> int:
    """A cheap 63-bit hash of the parameter list's shapes and dtypes, compared across ranks."""
    return signature_fingerprint([(p.shape, p.dtype) for p in params])


def signature_fingerprint(signatures: Sequence[tuple[Any, ...]]) -> int:
    """:func:`param_fingerprint` of ``(shape, dtype, ...)`` signatures (the device, if given, is left out:
    it differs across ranks)."""
    h = hashlib.sha256()
    for sig in signatures:
        h.update(repr((tuple(sig[0]), str(sig[1]))).encode())
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 62) - 1)


def writable_grad(p: Tensor) -> Tensor:
    """``p.grad``, first replaced by a dense copy when its elements share memory (a gradient set by hand
    as ``g.expand(...)``, which torch's optimizers accept): the average of the ranks' gradients written
    into it raised torch's "more than one element of the written-to tensor refers to a single memory
    location" on the rank that owns the block alone, while the others waited in the next collective."""
    g = p.grad
    assert g is not None
    if torch._debug_has_internal_overlap(g) != 0:  # 1: overlaps, 2: too complex to tell (copy anyway)
        p.grad = g = g.clone(memory_format=torch.contiguous_format)
    return g
