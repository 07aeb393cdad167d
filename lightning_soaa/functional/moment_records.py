"""What SOAA's C step knows about the moments it just wrote: their (Σ m², Σ v) per block, recognised later
only if the very same tensors are unchanged (same objects, storage and version counters).

A record is one kernel call (a param group's blocks of one dtype). The store keeps, for each block, only
its newest record, and a record only while it is some block's newest: when the set of blocks with a
gradient changes from step to step (a mixture of experts' idle experts, LayerDrop), each step's calls
have new block sets, and records kept until their moments died grew without bound (+62 MiB and +20 ms
per step after 1000 steps of a small MoE). Bounded this way the store holds at most one record per live
block, and the block -> record index is kept up to date instead of being rebuilt on use.
"""

from __future__ import annotations

import dataclasses
import operator
import weakref

from torch import Tensor

_version_of = operator.attrgetter("_version")
_data_ptr = Tensor.data_ptr


@dataclasses.dataclass(frozen=True)
class Stored:
    """What one C step call knows about the moments it wrote (nb blocks: m of every block, then v of
    every block): enough to recognise them unchanged, all at once or block by block."""

    ids: tuple[int, ...]
    refs: tuple[weakref.ref[Tensor], ...]
    versions: tuple[int, ...]
    ptrs: tuple[int, ...]
    sums: list[tuple[float, float]]  # per block (Σ m², Σ v)

    def block(self, j: int, m: Tensor, v: Tensor) -> tuple[float, float] | None:
        k = j + len(self.sums)
        if (self.refs[j]() is not m or self.refs[k]() is not v or m._version != self.versions[j]
                or v._version != self.versions[k] or m.data_ptr() != self.ptrs[j] or v.data_ptr() != self.ptrs[k]):
            return None
        return self.sums[j]

    def alive(self) -> bool:
        return all(r() is not None for r in self.refs)


class MomentRecords:
    """The records of the C step's calls, at most one per block (its newest)."""

    def __init__(self) -> None:
        self._stored: dict[tuple[int, ...], Stored] = {}  # by the ids of (m..., v...)
        self._newest: dict[int, tuple[tuple[int, ...], int]] = {}  # id(m) -> (its newest record, block)
        self._holds: dict[tuple[int, ...], int] = {}  # record -> how many blocks it is the newest of
        self._prune_at = 64  # records kept before those of dead moments are dropped

    def __len__(self) -> int:
        return len(self._stored)

    @staticmethod
    def snapshot(ms: list[Tensor], vs: list[Tensor], versions_ahead: int = 0) -> Stored:
        """The record of these moments as they are now, their versions taken ``versions_ahead`` higher
        (the C step takes the record before its loop, while the tensors are in cache, with the one bump
        it makes: a version that ends up anything else, e.g. moments sharing a version counter, only
        fails the check later). Its sums come with :meth:`keep`."""
        both = [*ms, *vs]
        versions = tuple(map(_version_of, both))
        if versions_ahead:
            versions = tuple(x + versions_ahead for x in versions)
        return Stored(tuple(map(id, both)), tuple(map(weakref.ref, both)), versions, tuple(map(_data_ptr, both)), [])

    def keep(self, record: Stored, sums: list[tuple[float, float]]) -> None:
        """Remember ``record`` (from :meth:`snapshot`) with the blocks' (Σ m², Σ v), as their newest."""
        self._insert(record, sums)
        if len(self._stored) > self._prune_at:  # moments that went away (a new model, a reload)
            alive = [e for e in self._stored.values() if e.alive()]
            self.forget()
            for e in alive:  # oldest first: a later record takes the blocks it shares
                self._insert(e, e.sums)
            self._prune_at = 2 * len(self._stored) + 64

    def _insert(self, record: Stored, sums: list[tuple[float, float]]) -> None:
        key = record.ids
        for j, b in enumerate(key[:len(sums)]):
            old = self._newest.get(b)
            if old is not None and old[0] != key:
                self._release(old[0])
            self._newest[b] = (key, j)
        self._stored.pop(key, None)  # re-inserted as the newest
        # a positional constructor: dataclasses.replace costs ~4 µs, a visible part of a small model's step
        self._stored[key] = Stored(key, record.refs, record.versions, record.ptrs, sums)
        self._holds[key] = len(sums)

    def _release(self, key: tuple[int, ...]) -> None:
        left = self._holds[key] - 1
        if left:
            self._holds[key] = left
        else:  # no block reads this record any more
            del self._holds[key], self._stored[key]

    def lookup(self, m: Tensor, v: Tensor) -> tuple[float, float] | None:
        """``(Σ m², Σ v)`` if m and v are exactly as the last C step left them: the same tensors and
        storage, not modified since (every in-place torch op bumps a tensor's version; loading a
        state dict replaces or copies into the moments, and :meth:`forget` drops everything)."""
        hit = self._newest.get(id(m))
        return None if hit is None else self._stored[hit[0]].block(hit[1], m, v)

    def lookup_all(self, ms: list[Tensor], vs: list[Tensor]) -> list[tuple[float, float] | None]:
        """:meth:`lookup` of every block; when they are exactly the blocks of one remembered call,
        unchanged, the check runs as a few C-level maps instead of one Python call per block."""
        both = [*ms, *vs]
        e = self._stored.get(tuple(map(id, both)))
        # equal ids of live referents: the same objects (two live objects never share an id)
        if (e is not None and e.alive() and e.versions == tuple(map(_version_of, both))
                and e.ptrs == tuple(map(_data_ptr, both))):
            return list(e.sums)
        return [self.lookup(m, v) for m, v in zip(ms, vs)]

    def forget(self) -> None:
        """Drop every record (the owner calls this when it replaces or reloads its state)."""
        self._stored.clear()
        self._newest.clear()
        self._holds.clear()
