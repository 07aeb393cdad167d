"""``OwnerExchange``: the one place that moves per-parameter tensors between every rank and block owners.

Every sharded optimizer needs the same three moves, built from the block table and a communicator:

* :meth:`OwnerExchange.reduce_scatter_grads`: average ``p.grad`` over ranks, each rank keeping only the
  blocks it owns (``grad_reduction="mean"``).
* :meth:`OwnerExchange.sum_to_owners`: the same move for any per-parameter tensors ("channels"), e.g.
  EGN's rank-local VJPs Jᵀv; several channels share one collective per dtype.
* :meth:`OwnerExchange.gather_params` / :meth:`OwnerExchange.gather_from_owners`: every rank receives
  every block from its owner, written into the parameters themselves or into fresh full-size tensors.

Flat buffers are packed per dtype, rank-major, each rank's blocks in block order, padded to the largest
per-rank size so that every rank passes equal shapes (the picture is in
:mod:`lightning_soaa.distributed.comm`). One collective per dtype and move; a rank that owns nothing
still joins every call. A layout's buffer lives on the device of its parameters (any block of the
layout will do: a layout has one dtype and, in every supported setup, one device), also on a rank that
owns none of them.

Without sharding (``shard=False`` with W > 1: every rank owns every block, e.g. under DeepSpeed)
:meth:`sum_to_owners` is an all-reduce per channel and the gathers are local copies; with one rank
every move is local.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_soaa.distributed.blocks import BlockInfo, BlockTable, writable_grad
from lightning_soaa.distributed.comm import Communicator, flat_buffers

__all__ = ["HeldBuffers", "OwnerExchange"]

#: per dtype: the blocks of each rank, in block order (the packing order of the flat buffers)
Layouts = dict[torch.dtype, list[list[BlockInfo]]]


@dataclasses.dataclass
class HeldBuffers:
    """The buffers of one move, made ahead of it (:meth:`OwnerExchange.sum_buffers`,
    :meth:`OwnerExchange.gather_buffers`) before an agreement whose error flag carries a failure to make them (out
    of memory): made inside the move, between that agreement and its collective, a rank failing there raised alone
    while the others waited in the collective (gloo: an abort, NCCL: a hang). ``flats``: per dtype (sharded) or
    per channel (unsharded), the collective's (send, out), on the communicator's device; ``full``: the full-size
    results of a gather; ``error``: this rank's failure in a move made with them, after it joined every collective
    of the move (:meth:`OwnerExchange.sum_to_owners` records it here instead of raising it)."""

    flats: dict[Any, tuple[Tensor, Tensor]]
    full: list[Tensor] = dataclasses.field(default_factory=list)
    error: Exception | None = None
    flagged: bool = False  # (a parameter gather's, whose first dtype's parts carry each rank's flag)


class OwnerExchange:
    """Flat-buffer moves between "every rank holds each parameter" and "owners hold their blocks".

    Args:
        table: the block table (owners per block).
        params: the parameters, indexed like ``BlockInfo.param_index``.
        comm: the communicator; every method is a collective when W > 1.
        sharded: False when every rank owns every block (no flat buffers are built then).
    """

    def __init__(self, table: BlockTable, params: Sequence[Tensor], comm: Communicator, *, sharded: bool) -> None:
        self.table = table
        self.params = list(params)
        self.comm = comm
        self.sharded = sharded and comm.world_size > 1
        self.owned = table.owned()
        self._all_flags: dict[torch.dtype, Tensor] = {}  # per dtype: see _flag_index
        self.layouts: Layouts = {}
        if self.sharded:
            for b in table.blocks:
                per_rank = self.layouts.setdefault(self.params[b.param_index].dtype,
                                                   [[] for _ in range(comm.world_size)])
                per_rank[b.owner].append(b)

    # ------------------------------------------------------------------ layout helpers
    def padded_len(self, dtype: torch.dtype) -> int:
        """Elements each rank contributes to the flat buffer of ``dtype`` (the largest rank's share)."""
        return max(sum(b.numel for b in blist) for blist in self.layouts[dtype])

    def _device(self, per_rank: list[list[BlockInfo]]) -> torch.device:
        first = next(b for blist in per_rank for b in blist)
        return self.params[first.param_index].device

    def _nonempty(self) -> list[tuple[torch.dtype, list[list[BlockInfo]], int]]:
        out = []
        for dt, per_rank in self.layouts.items():
            n = self.padded_len(dt)
            if n:
                out.append((dt, per_rank, n))
        return out

    @staticmethod
    def _pack(buf: Tensor, blocks: list[BlockInfo], tensors: list[Tensor | None]) -> None:
        off = 0
        for b, t in zip(blocks, tensors):
            if t is not None:  # None leaves the (zero) padding: e.g. a parameter without a gradient
                buf[off:off + b.numel].view(b.shape).copy_(t)
            off += b.numel

    @staticmethod
    def _unpack(buf: Tensor, blocks: list[BlockInfo]) -> list[Tensor]:
        out, off = [], 0
        for b in blocks:
            out.append(buf[off:off + b.numel].view(b.shape))
            off += b.numel
        return out

    # ------------------------------------------------------------------ to the owners
    def sum_to_owners(self, channels: list[list[Tensor | None]], sum_dtype: torch.dtype | None = None,
                      held: HeldBuffers | None = None) -> list[list[Tensor]]:
        """Sum per-parameter tensors over ranks; per channel, the owned blocks' sums (``table.owned()``
        order), in the parameters' dtypes. ``None`` entries count as zeros. One ``reduce_scatter_flat`` per
        dtype (sharded) or one ``all_reduce_`` per channel (unsharded, W > 1). ``sum_dtype`` (every rank the
        same): the sum is taken in it, then rounded once, for partial sums that cancel across ranks (EGN's
        Jᵀv with a small damping: rounding each rank's part first lost what the cancellation leaves). ``held``: its
        buffers, made before (:meth:`sum_buffers`; :meth:`_sum_held`)."""
        if self.comm.world_size == 1:
            return [[_block_or_zeros(b, ch[b.param_index], self.params) for b in self.owned] for ch in channels]
        if held is not None and (self.sharded or sum_dtype is not None or all(
                functools.reduce(torch.promote_types, [p.dtype if t is None else t.dtype for p, t in
                                                       zip(self.params, ch)]) == held.flats[ci][0].dtype
                for ci, ch in enumerate(channels))):
            return self._sum_held(channels, sum_dtype, held)
        if not self.sharded:
            return [self._all_reduce_channel(ch, sum_dtype) for ch in channels]
        world, rank, nch = self.comm.world_size, self.comm.rank, len(channels)
        mine: dict[int, list[Tensor]] = {}
        for dt, per_rank, n in self._nonempty():
            buf = torch.zeros(world * nch * n, dtype=sum_dtype or dt, device=self._device(per_rank))
            self._pack_channels(buf, per_rank, channels, n)
            self._take_sums(mine, self.comm.reduce_scatter_flat(buf), dt, per_rank[rank], n, nch)
        return [[mine[b.block_id][ci] for b in self.owned] for ci in range(nch)]

    def _pack_channels(self, buf: Tensor, per_rank: list[list[BlockInfo]], channels: list[list[Tensor | None]],
                       n: int) -> None:
        """The reduce-scatter's buffer: rank-major, each rank's part its blocks of every channel in turn."""
        nch = len(channels)
        for r in range(len(per_rank)):
            for ci, ch in enumerate(channels):
                o = (r * nch + ci) * n
                self._pack(buf[o:o + n], per_rank[r], [_block_of(b, ch[b.param_index]) for b in per_rank[r]])

    def _take_sums(self, mine: dict[int, list[Tensor]], got: Tensor, dt: torch.dtype, blocks: list[BlockInfo],
                   n: int, nch: int) -> None:
        """This rank's sums of one dtype's reduce-scatter (``got``) as its blocks, in ``dt`` on their device."""
        got = _in(got, dt)
        if blocks:
            got = got.to(self.params[blocks[0].param_index].device)  # (held buffers: the collective's device)
        for ci in range(nch):
            for b, t in zip(blocks, self._unpack(got[ci * n:(ci + 1) * n], blocks)):
                mine.setdefault(b.block_id, [t] * nch)[ci] = t

    def sum_buffers(self, channels: int, sum_dtype: torch.dtype | None) -> HeldBuffers | None:
        """The buffers of :meth:`sum_to_owners` of ``channels`` channels summed in ``sum_dtype``, made now (None
        for one process: it moves nothing). Unsharded, without ``sum_dtype``, the sum is in the parameters'
        promoted dtype (:meth:`_sum_held` takes the unheld path where the handed tensors promote to another)."""
        if self.comm.world_size == 1:
            return None
        flats: dict[Any, tuple[Tensor, Tensor]] = {}
        if not self.sharded:
            total = sum(p.numel() for p in self.params)
            dt = sum_dtype or functools.reduce(torch.promote_types, [p.dtype for p in self.params])
            for ci in range(channels):  # (all_reduce_ sums in place: no out)
                flats[ci] = flat_buffers(self.comm, total, 0, dt, self.params[0].device)
            return HeldBuffers(flats)
        world = self.comm.world_size
        for dt, per_rank, n in self._nonempty():
            flats[dt] = flat_buffers(self.comm, world * channels * n, channels * n, sum_dtype or dt,
                                     self._device(per_rank))
        return HeldBuffers(flats)

    def _sum_held(self, channels: list[list[Tensor | None]], sum_dtype: torch.dtype | None,
                  held: HeldBuffers) -> list[list[Tensor]]:
        """:meth:`sum_to_owners` into ``held`` (:meth:`sum_buffers`): nothing is allocated before a collective, and
        a failure of this rank's packing (or of the local work after a collective) joins every collective of the
        move first and is then recorded in ``held.error`` (empty sums returned), not raised: the caller holds it
        for the agreement that follows, where every rank raises."""
        rank, nch = self.comm.rank, len(channels)
        error: Exception | None = None
        mine: dict[int, list[Tensor]] = {}
        parts: list[list[Tensor]] = []
        if not self.sharded:
            for ci, ch in enumerate(channels):
                flat = held.flats[ci][0]
                try:
                    if error is None:
                        self._pack_whole(flat, ch)
                except Exception as e:
                    error = e
                self.comm.all_reduce_(flat)
                if error is None:
                    try:
                        parts.append(self._whole_parts(flat))
                    except Exception as e:
                        error = e
        for dt, per_rank, n in self._nonempty() if self.sharded else []:
            buf, out = held.flats[dt]
            try:
                if error is None:
                    self._pack_channels(buf, per_rank, channels, n)
            except Exception as e:
                error = e
            got = self.comm.reduce_scatter_flat(buf, out)
            try:
                if error is None:
                    self._take_sums(mine, got, dt, per_rank[rank], n, nch)
            except Exception as e:
                error = e
        if error is not None:
            held.error = error
            return [[] for _ in channels]
        if not self.sharded:
            return parts
        return [[mine[b.block_id][ci] for b in self.owned] for ci in range(nch)]

    def _pack_whole(self, flat: Tensor, ch: list[Tensor | None]) -> None:
        """Every parameter's tensor of channel ``ch`` into ``flat`` (zeros: None), cast to its dtype."""
        off = 0
        for p, t in zip(self.params, ch):
            if t is not None:
                flat[off:off + p.numel()].copy_(t.reshape(-1))
            off += p.numel()

    def _whole_parts(self, flat: Tensor) -> list[Tensor]:
        """An unsharded channel's sums (``flat``) as the owned blocks, each parameter's in its dtype and device."""
        parts = [_in(x.view(p.shape), p.dtype).to(p.device)
                 for x, p in zip(torch.split(flat, [p.numel() for p in self.params]), self.params)]
        return [b.view(parts[b.param_index]) for b in self.owned]

    def _all_reduce_channel(self, ch: list[Tensor | None], sum_dtype: torch.dtype | None) -> list[Tensor]:
        full = [torch.zeros_like(p, dtype=sum_dtype) if t is None else t for p, t in zip(self.params, ch)]
        # the dtype every rank sums in: sum_dtype, else the handed tensors' promoted dtype (the parameters')
        flat = _in(torch.cat([t.reshape(-1) for t in full]), sum_dtype)
        self.comm.all_reduce_(flat)
        # handed back in each parameter's own dtype (mixed dtypes are summed in their promoted one)
        parts = [_in(x.view_as(t), p.dtype) for x, t, p in zip(torch.split(flat, [t.numel() for t in full]), full,
                                                                 self.params)]
        return [b.view(parts[b.param_index]) for b in self.owned]

    def grad_buffers(self) -> list[Any]:
        """:meth:`reduce_scatter_grads`'s buffers, per dtype (its ``held``), made now: where an agreement comes
        before the exchange (the order check), before it, whose error flag then carries a failure to make them."""
        if not self.sharded:
            return []
        world = self.comm.world_size
        moves = []
        for dt, per_rank, n in self._nonempty():
            width = n + max(len(blocks) for blocks in per_rank)  # each rank's part: blocks, then flags
            # float16/bfloat16 gradients summed in float32, their mean rounded once: summed in their dtype, each
            # partial sum rounded again (W = 3: ASGO's float16 run on rank-deficient gradients 1.40x the error of
            # a perfect float16 run of three ranks, 1.00x summed in float32; twice the bytes of those gradients)
            wide = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
            send, out = flat_buffers(self.comm, world * width, width, wide, self._device(per_rank))
            moves.append((dt, per_rank, n, width, send, out))
        return moves

    def reduce_scatter_grads(self, read: bool = True, held: list[Any] | None = None) -> BaseException | None:
        """Average gradients over ranks into each owner's ``p.grad`` blocks (one collective per dtype).
        Blocks this rank does not own keep their local gradient; they are never read.

        A parameter has a gradient iff some rank has one, as one process running the global batch would
        see it: a rank whose batch did not reach a layer adds zeros, and a parameter no rank has a
        gradient for keeps ``p.grad = None`` on its owner, so it is not stepped (torch's rule: no weight
        decay, no moment decay, no counter advance). The owner learns that from the same collective:
        after its blocks, each rank's part of the buffer holds one presence flag per block (1 where the
        sending rank has a gradient), summed like the gradients. The flags are read (a host copy) only
        by an owner without a local gradient.

        ``read=False``: the step already failed on this rank (it raises on every rank after the step's
        all-reduce); join the collective with zeros and write nothing (a resized gradient would not fit).

        Every dtype's buffers are made before the first collective, on the communicator's device (no copy
        inside the collective's call); a failure of this rank's work after a collective (packing the next
        dtype, writing the averages: a ``p.grad`` of zeros) joins the remaining collectives with zeros and is
        returned, not raised, for the caller to hold for the step's all-reduce (raised, this rank left while the
        others waited in the next collective). A KeyboardInterrupt there too: this rank joins the remaining
        collectives (bounded: the others wait in them) and it is returned like any error, for the step's all-reduce
        to raise it on this rank and an error on the others. ``held``: the buffers, made before (:meth:`grad_buffers`).
        :attr:`averaged`: the parameters (indices) into whose ``p.grad`` this rank wrote an average, in order.

        Where no agreement of the step comes before the exchange (one optimizer over the group, after its first
        step: the order check does not run) a rank that cannot make the buffers raises alone, and the others wait
        in the reduce-scatter until that rank's retried step joins it (the step then goes on alike) or the process
        group's timeout. Left so: made before the previous step's agreement they would hold (W + 1)/W gradients'
        worth through the forward and backward, and an agreement before them is one more all-reduce a step."""
        if not self.sharded:
            return None
        grads = [p.grad if read else None for p in self.params]
        moves = held or self.grad_buffers()  # (none held: made here)
        # the parameters into whose p.grad this rank wrote an average (the step's notes read it: a write that failed
        # part way leaves some of them averaged, the others as backward left them)
        self.averaged: list[int] = []
        error: BaseException | None = None
        for dt, per_rank, n, width, send, out in moves:
            try:
                if error is None:
                    self._pack_grads(send, dt, per_rank, n, width, grads)
            except BaseException as e:  # (Ctrl+C too: the others wait in this collective all the same)
                error, grads = e, [None] * len(grads)
                send.zero_()  # (in place: the zeros a failed rank joins with)
            got = self.comm.reduce_scatter_flat(send, out)
            try:
                if error is None and read:
                    self._write_averages(got, per_rank[self.comm.rank], n, grads, self.averaged)
            except BaseException as e:
                error, grads = e, [None] * len(grads)
        return error

    def _pack_grads(self, buf: Tensor, dt: torch.dtype, per_rank: list[list[BlockInfo]], n: int, width: int,
                    grads: list[Tensor | None]) -> None:
        """The gradients' reduce-scatter buffer of ``dt`` (zeros): rank-major, each rank's blocks then its
        presence flags."""
        for r in range(len(per_rank)):
            self._pack(buf[r * width:r * width + n], per_rank[r],
                       [_block_of(b, grads[b.param_index]) for b in per_rank[r]])
        buf.index_fill_(0, self._flag_index(dt, per_rank, n, width, grads, buf.device), 1)

    def _write_averages(self, got: Tensor, mine: list[BlockInfo], n: int, grads: list[Tensor | None],
                        written: list[int]) -> None:
        """This rank's summed blocks (``got``) as averages into its ``p.grad`` blocks (see
        :meth:`reduce_scatter_grads`); ``written`` receives the index of each parameter whose ``p.grad`` it changed
        (a block written, or made)."""
        world = self.comm.world_size
        flags: list[float] | None = None
        for j, (b, s) in enumerate(zip(mine, self._unpack(got, mine))):
            p = self.params[b.param_index]
            if grads[b.param_index] is None:
                flags = got[n:n + len(mine)].tolist() if flags is None else flags
                if flags[j] == 0.0:  # no rank has a gradient for it
                    continue
                if p.grad is None:  # another block of p may have made it already
                    written.append(b.param_index)  # (no longer None, as backward left it)
                    p.grad = torch.zeros_like(p)
            b.view(writable_grad(p)).copy_(s.div_(world))
            written.append(b.param_index)

    def _flag_index(self, dt: torch.dtype, per_rank: list[list[BlockInfo]], n: int, width: int,
                    grads: list[Tensor | None], device: torch.device) -> Tensor:
        """The buffer positions of the presence flags of this rank's gradients (on the buffer's ``device``);
        the index for "every parameter has one" (the usual step) is made once."""
        present = [g is not None for g in grads]
        cache: dict[torch.dtype, Tensor] = self.__dict__.setdefault("_all_flags", {})  # a pickle may predate it
        cached = cache.get(dt)
        if all(present) and cached is not None and cached.device == device:
            return cached
        index = torch.tensor([r * width + n + j for r, blocks in enumerate(per_rank)
                              for j, b in enumerate(blocks) if present[b.param_index]], dtype=torch.long)
        index = index.to(device, non_blocking=True)  # non_blocking: a plain copy would wait for the queue
        if all(present):
            cache[dt] = index
        return index

    # ------------------------------------------------------------------ from the owners
    def gather_params(self, held: HeldBuffers | None = None, flag: float = 0.0) -> list[float]:
        """All-gather updated parameter blocks from their owners into every rank's parameters. ``held``: its
        buffers, made before (:meth:`gather_buffers` with ``full=False``): nothing allocated before its
        collective. Held buffers made with ``flag=True`` carry ``flag`` (this rank's word on its update: 0 for
        done) in one more element of the first dtype's part; returned: every rank's, by rank (else ``[]``), and
        :data:`UNSENT` for a rank that could not pack its blocks (:meth:`_gather_flagged`)."""
        if not self.sharded:
            return []
        if held is not None and held.flagged:
            return self._gather_flagged(held, flag)
        self._gather(lambda b: b.view(self.params[b.param_index]), self.params, skip_own=True, held=held)
        return []

    def gather_buffers(self, full: bool = True, flag: bool = False) -> HeldBuffers | None:
        """The buffers of a sharded :meth:`gather_from_owners` (``full``: the full-size results too) or
        :meth:`gather_params` (``full=False``), made now; None where it makes no collective (one process,
        unsharded). Their send buffers' padding is never written: they may serve more than one gather.
        ``flag``: the first dtype's parts have one more element, the sender's flag (:meth:`gather_params`):
        W elements more in the gather, read on the host after it (a sync under NCCL)."""
        if not self.sharded:
            return None
        world = self.comm.world_size
        flats = {dt: flat_buffers(self.comm, n + extra, world * (n + extra), dt, self._device(per_rank))
                 for i, (dt, per_rank, n) in enumerate(self._nonempty()) for extra in [int(flag and i == 0)]}
        return HeldBuffers(flats, [torch.zeros_like(p) for p in self.params] if full else [], flagged=flag)

    def gather_from_owners(self, owned: list[Tensor], held: HeldBuffers | None = None) -> list[Tensor]:
        """Every rank gets a full-size tensor per parameter, each block from its owner; ``owned`` holds
        this rank's blocks in ``table.owned()`` order (one ``all_gather_flat`` per dtype when sharded).
        Read-only: unsharded, a block that is a whole parameter is handed back itself (not a copy; a small
        model's step pays per op). ``held``: its buffers, made before (:meth:`gather_buffers`): nothing allocated
        before its collective."""
        if not self.sharded and all(b.dim is None for b in self.owned) and len(self.owned) == len(self.params):
            whole: list[Tensor | None] = [None] * len(self.params)
            for b, t in zip(self.owned, owned):
                whole[b.param_index] = t
            if all(t is not None for t in whole):
                return [t for t in whole if t is not None]
        full = held.full if held is not None else [torch.zeros_like(p) for p in self.params]
        if not self.sharded:
            for b, t in zip(self.owned, owned):
                b.view(full[b.param_index]).copy_(t)
            return full
        mine = {b.block_id: t for b, t in zip(self.owned, owned)}
        self._gather(lambda b: mine[b.block_id], full, skip_own=False, held=held)
        return full

    def _gather(self, source: Callable[[BlockInfo], Tensor], dest: list[Tensor], *, skip_own: bool,
                held: HeldBuffers | None = None) -> None:
        """One all-gather per dtype (buffers without a flag: :meth:`_gather_flagged` gathers those)."""
        rank, world = self.comm.rank, self.comm.world_size
        for dt, per_rank, n in self._nonempty():
            buf, made = held.flats[dt] if held is not None else (
                torch.zeros(n, dtype=dt, device=self._device(per_rank)), None)
            width = buf.numel()
            self._pack(buf, per_rank[rank], [source(b) for b in per_rank[rank]])
            out = self.comm.all_gather_flat(buf, made)
            for r in range(world):
                if skip_own and r == rank:
                    continue
                for b, t in zip(per_rank[r], self._unpack(out[r * width:r * width + n], per_rank[r])):
                    _copy_into(b.view(dest[b.param_index]), t)

    def _gather_flagged(self, held: HeldBuffers, flag: float) -> list[float]:
        """:meth:`gather_params` into buffers that carry each rank's flag (:meth:`gather_buffers`, ``flag=True``).
        Every dtype's blocks are packed before the first collective, then the flag, sent as ``flag + 1``: a rank
        whose packing raised (a hook's error, Ctrl+C) leaves it 0 (the buffer's zeros), which the others read as
        :data:`UNSENT` and keep their own copies of its blocks. Such a rank, and one whose work after a collective
        raised, still joins every collective of the gather (raised alone, it left the others waiting in it), then
        raises its error. Same packing and collectives as :meth:`_gather`."""
        rank, world = self.comm.rank, self.comm.world_size
        moves = [(per_rank, n, *held.flats[dt]) for dt, per_rank, n in self._nonempty()]
        if not moves:  # (nothing to gather: no flag either)
            return []
        error: BaseException | None = None
        try:
            for per_rank, _n, buf, _ in moves:
                self._pack(buf, per_rank[rank], [b.view(self.params[b.param_index]) for b in per_rank[rank]])
            per_rank, n, buf, _ = moves[0]
            buf[n:].fill_(flag + 1.0)  # (after every block: 0, the zeros, says this rank sent none)
        except BaseException as e:  # noqa: BLE001 - raised below, after this rank joined every collective
            error = e
        flags: list[float] = []
        unsent: set[int] = set(range(world))  # (until the flags are read)
        for i, (per_rank, n, buf, made) in enumerate(moves):
            out = self.comm.all_gather_flat(buf, made)
            width = buf.numel()
            try:
                if i == 0:
                    flags = [f - 1.0 if f else UNSENT for f in out[n::width].tolist()]
                    unsent = {r for r, f in enumerate(flags) if f == UNSENT}
                for r in range(world):
                    if r != rank and r not in unsent:
                        for b, t in zip(per_rank[r], self._unpack(out[r * width:r * width + n], per_rank[r])):
                            _copy_into(b.view(self.params[b.param_index]), t)
            except BaseException as e:  # noqa: BLE001 - as above
                error = error or e
        if error is not None:
            raise error
        return flags


#: the flag :meth:`OwnerExchange.gather_params` returns for a rank that could not pack its blocks (they were not
#: sent: every other rank keeps its own copy of them); any value but a rank's word on its update (0, 1, 2)
UNSENT = 3.0


def _copy_into(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)``; inside ``torch.inference_mode()`` where ``dst`` is an inference tensor (a parameter of a
    model built there), the only place torch lets one change in place: the step runs with it off."""
    if dst.is_inference():
        with torch.inference_mode():
            dst.copy_(src)
    else:
        dst.copy_(src)


def _block_of(b: BlockInfo, t: Tensor | None) -> Tensor | None:
    return None if t is None else b.view(t)


def _in(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``t`` in ``dtype`` (None: as it is), without an ATen call where it already is."""
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


def _block_or_zeros(b: BlockInfo, t: Tensor | None, params: list[Tensor]) -> Tensor:
    p = params[b.param_index]
    return b.view(torch.zeros_like(p) if t is None else _in(t, p.dtype))
