"""SOAA kernels on lists of tensors: moments, trust-region scalars, the capped update. See
:class:`lightning_soaa.optim.soaa.SOAA` for the update rule and ``spec/algorithms.md`` §1 (variant A).

Every tensor kernel is elementwise, so a tensor may be a whole parameter, a slice of one, or a 1-D slice
of a DeepSpeed flat partition; anything global (sums over *all* parameters) is **returned** as small
float64 partial sums which the caller adds across blocks and ranks. Nothing here communicates.

One step, with the optimizer's single all-reduce between the two tensor kernels::

    [Σm̂², Σ(v̂+ε)]   = soaa_moments(g, m, v, t)     # reads only: the would-be m_t, v_t are not stored
    (all-reduce the partials, the loss and the lagged partials of the previous update)
    c_t, ρ_t, d_t, L_t, ...      = trust_region_scalars(...)          # pure Python float64
    [Σm̂·u, Σv̂·u²]   = soaa_step_(θ, g, m, v, t, d_{t-1}, c_t)   # m, v, θ in place, one sweep

Nothing is written before the all-reduce, so a step every rank skips (a non-finite value anywhere)
leaves moments and parameters bit-identical without a copy; the moments are computed twice (cheap
arithmetic) instead of stored twice (memory traffic and 2x the moments' memory).

``t`` is the per-tensor step count *of this update* (1 on the first step): the caller keeps one counter
per tensor (torch's convention, and what DeepSpeed ZeRO-3 needs, since it calls ``step()`` once per
sub-group), so tensors that joined later are bias-corrected like Adam does.

Kernels, torch-style, behind the two dispatchers :func:`soaa_moments` and :func:`soaa_step_` (same
arithmetic, per block):

* fused (``_native_*``): each pass is one hand-written kernel over all blocks of a dtype in one call: a C
  loop on CPU (built at first use by :mod:`~lightning_soaa.kernels.soaa_native`), Triton on CUDA
  (:mod:`~lightning_soaa.kernels.soaa_triton`), handed in by the optimizer as a :class:`FusedPasses`, when
  the caller passes a :class:`SOAAKernels` (the optimizer owns it: ``SOAA(compile=...)``; only the
  ``torch.compile`` wrappers are kept per process). The step returns the new moments' Σm², Σv too, which
  the kernels object remembers, so the next sums pass reads only g and m (8 B/param instead of 12) for
  moments nobody touched since;
* compiled (``_compiled_*``): each pass is one ``torch.compile``'d sweep over a whole tensor (Triton on
  CUDA; C++/OpenMP on CPU where no C compiler is found) that also accumulates the sums, for blocks of at
  least ``SOAAKernels.min_numel`` elements;
* multi-tensor (``_multi_tensor_*``): torch ``_foreach_*`` ops, a fixed number of calls for any number of
  tensors; on CUDA where the Triton kernels are off or refuse a block, and on CPU for tensors under
  2**16 elements, where an op's dispatch costs more than its arithmetic;
* single-tensor (``_single_tensor_*``): on CPU, the whole chain of ops tile by tile (a tile stays
  in cache), because there the foreach ops are a per-tensor loop anyway and their out-of-place forms
  allocate a parameter-sized tensor per op. Global sums are accumulated per row of 4096 elements in the
  tensor's dtype and added in float64; the sums pass writes the would-be moments of a tile into two
  tile-sized scratch buffers, the step pass updates the tile's moments in place and then its θ.

``foreach=True/False`` forces one eager kernel for every block that does not take the compiled one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = [
    "BlockSplit",
    "SOAAKernels",
    "SOAAScalars",
    "BAND_SCHEDULES",
    "band",
    "predicted_reduction",
    "smoothed_ratio",
    "soaa_moments",
    "soaa_step_",
    "split_blocks",
    "trust_region_scalars",
    "use_foreach",
]


def _by_step(ts: list[int]) -> dict[int, list[int]]:
    """Indices grouped by step count: tensors of one group share the bias-correction scalars."""
    out: dict[int, list[int]] = {}
    for i, t in enumerate(ts):
        out.setdefault(int(t), []).append(i)
    return out


# Global sums are taken in chunks of this many elements: each chunk is reduced in the tensor's dtype
# (fast, and exact enough at this length), the chunk results are added in float64. A plain fp32 sum of
# 1e7 elements is off by ~1e-3 relative here; chunking brings it to ~1e-8 without an fp64 copy.
_CHUNK = 4096


def _rows(x: Tensor) -> tuple[Tensor, Tensor]:
    flat = x.reshape(-1)
    k = flat.numel() // _CHUNK
    return flat[: k * _CHUNK].view(k, _CHUNK), flat[k * _CHUNK:]


def _sum64(x: Tensor) -> Tensor:
    rows, tail = _rows(x)
    return rows.sum(1, dtype=x.dtype).double().sum() + tail.double().sum()


def _sum_sq64(x: Tensor) -> Tensor:
    rows, tail = _rows(x)
    total: Tensor = torch.linalg.vector_norm(rows, dim=1).double().square().sum() + tail.double().square().sum()
    return total


def _total64(xs: list[Tensor]) -> Tensor:
    """Σ over all elements of many tensors (x >= 0 only), float64: one multi-tensor L1 norm (a fixed
    number of ATen calls for any number of tensors; this path takes small tensors, where a call costs
    more than the arithmetic). Each tensor's sum is accumulated in its dtype (fp32: ~1e-7 relative)."""
    return torch.stack(torch._foreach_norm(xs, 1)).double().sum()


def _total_sq64(xs: list[Tensor]) -> Tensor:
    """Σ x² over all elements of many tensors, float64 (see :func:`_total64`)."""
    return torch.stack(torch._foreach_norm(xs)).double().square().sum()


# The loop path runs the whole chain of elementwise ops on one tile before moving to the next, so the
# tile's operands stay in cache: the chain costs about one trip to memory instead of one per op.
_TILE = 1 << 20


def _tiles(*ts: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """Aligned pieces of equal-shape tensors (whole tensors when small or not contiguous)."""
    if ts[0].numel() <= _TILE or not all(t.is_contiguous() for t in ts):
        yield ts
        return
    flats = [t.view(-1) for t in ts]
    for i in range(0, flats[0].numel(), _TILE):
        yield tuple(f[i:i + _TILE] for f in flats)


class _Acc:
    """A float64 sum over many tiles: per-row results (``_CHUNK`` elements, tensor dtype) are kept and
    added in float64 once at the end, so a tile costs one reduction call."""

    def __init__(self, square: bool = False) -> None:
        self.square = square
        self.rows: list[Tensor] = []
        self.extra: list[Tensor] = []

    def sum(self, x: Tensor) -> None:
        rows, tail = _rows(x)
        if rows.numel():
            self.rows.append(rows.sum(1))
        if tail.numel():
            self.extra.append(tail.double().sum())

    def sum_sq(self, x: Tensor) -> None:  # needs square=True
        rows, tail = _rows(x)
        if rows.numel():
            self.rows.append(torch.linalg.vector_norm(rows, dim=1))
        if tail.numel():
            self.extra.append(tail.double().square().sum())

    def total(self, device: torch.device) -> Tensor:
        out = torch.zeros((), dtype=torch.float64, device=device)
        if self.rows:
            r = torch.cat(self.rows).double()
            out = out + (r.square() if self.square else r).sum()
        if self.extra:
            out = out + torch.stack(self.extra).sum()
        return out


# ---------------------------------------------------------------- compiled kernels (one sweep per pass)
# Eager, each pass is a chain of ~6-10 elementwise ops, i.e. as many trips through memory (or, tiled,
# through the cache) plus a dispatch per op. torch.compile (inductor: C++/OpenMP on CPU, Triton on
# CUDA) turns each pass into ONE loop over the whole tensor that loads every operand once, stores the
# outputs and accumulates the global sums on the way.
#
# Traffic (fp32, bytes per parameter): the sums pass only READS g, m, v (12 B) and stores nothing; the
# step kernel reads θ, g, m, v and writes θ, m, v in place (28 B, one loop; every store goes to a line
# the loop has just read, so no read-for-ownership of a cold buffer); the update sums read the new m, v
# (8 B): 48 B against fused AdamW's 28 B for its whole step, a bound of 1.71x. (The earlier layout
# stored the new moments into spare buffers: 20 B + 8 B of write-allocate, then 16 B for the update,
# 44 B, and 2x the moments' memory. Folding the update sums into the step kernel makes inductor store
# m_t, v_t into temporaries and copy them in two more loops: measured 38.8 ms against 25.0 ms for
# 10 x 1e6 fp32, 1 thread.) What remains: the update sums are lagged (needed at the next step), so the
# next sums pass, which reads m, v anyway, could compute them: 40 B, 1.43x.
#
# Compiled with dynamic shapes, so one compilation serves every tensor length (per dtype and device);
# the scalars travel as one small tensor, so new step counts or learning rates never recompile. The
# compiled callables are made once per process, at their first use (_CompiledOnce), and shared by every
# SOAAKernels: torch keeps each torch.compile wrapper in torch._dynamo.eval_frame.cached_backends for the
# life of the process, so four per optimizer leaked in sweeps that build many (400 wrappers per 100 trials,
# also where only the C loops ran). Sharing changes no result: dynamo caches the compiled code per code
# object, guarded on dtype, device and rank, whichever wrapper calls it (a second optimizer's equal
# wrapper already reused it). Sums are accumulated in float64 inside the loop (no chunking needed).


def _sums_kernel(g: Tensor, m: Tensor, v: Tensor, scal: Tensor) -> Tensor:
    """float64 [Σ m_t², Σ v_t] of the would-be moments m_t = lerp(m, g, 1-β1), v_t = β2 v + (1-β2) g²;
    reads only. ``scal = [1-β1, β2, 1-β2]``. A float16 g beside float32 moments is read in float32."""
    g = g.to(m.dtype)
    m_t = m + (g - m) * scal[0]
    v_t = v * scal[1] + g * g * scal[2]
    return torch.stack([torch.sum(m_t * m_t, dtype=torch.float64), torch.sum(v_t, dtype=torch.float64)])


def _step_kernel(p: Tensor, g: Tensor, m: Tensor, v: Tensor, scal: Tensor) -> None:
    """Moments in place, then θ ← θ·decay + alr·q with q = m_t / (k1 s max(s, knee) + ε), s = √v_t.
    ``scal = [1-β1, β2, 1-β2, decay, alr, k1, knee, ε]``. No reductions here: with one, inductor stores
    m_t, v_t into temporaries and copies them into m, v in two more loops (60 B/param instead of 28). A
    float16 θ, g beside float32 moments are computed in float32 (θ rounded once, when stored)."""
    g = g.to(m.dtype)
    m_t = m + (g - m) * scal[0]
    v_t = v * scal[1] + g * g * scal[2]
    s = torch.sqrt(v_t)
    q = m_t / (scal[7] + scal[5] * torch.clamp_min(s, scal[6]) * s)
    m.copy_(m_t)
    v.copy_(v_t)
    p.copy_(p.to(m.dtype) * scal[3] + scal[4] * q)


def _update_sums_kernel(m: Tensor, v: Tensor, scal: Tensor) -> Tensor:
    """float64 [Σ m q, Σ (s q)²] of the new moments (reads only; ``scal`` as in :func:`_step_kernel`)."""
    s = torch.sqrt(v)
    q = m / (scal[7] + scal[5] * torch.clamp_min(s, scal[6]) * s)
    sq = s * q
    return torch.stack([torch.sum(m * q, dtype=torch.float64), torch.sum(sq * sq, dtype=torch.float64)])


def _update_count_kernel(m: Tensor, v: Tensor, scal: Tensor) -> Tensor:
    """:func:`_update_sums_kernel` plus #(s < knee) (the coordinates on the d-branch), for ``same_batch``."""
    s = torch.sqrt(v)
    q = m / (scal[7] + scal[5] * torch.clamp_min(s, scal[6]) * s)
    sq = s * q
    return torch.stack([torch.sum(m * q, dtype=torch.float64), torch.sum(sq * sq, dtype=torch.float64),
                        torch.sum(s < scal[6], dtype=torch.float64)])


def _eager_update_sums(m: Tensor, v: Tensor, scal: Tensor, count: bool) -> Tensor:
    """:func:`_update_sums_kernel` / :func:`_update_count_kernel` eagerly (after a compiler failure
    between the two kernels of one tensor, whose θ and moments are already updated)."""
    m64, s = m.double(), v.double().sqrt()
    k1, knee, eps = scal[5].double(), scal[6].double(), scal[7].double()
    q = m64 / (eps + k1 * torch.clamp_min(s, knee) * s)
    out = [(m64 * q).sum(), (s * q).square().sum()]
    return torch.stack(out + [(s < knee).sum().double()] if count else out)


# ---------------------------------------------------------------- the C step's remembered sums
# What SOAA's C step knows about the moments it just wrote: their (Σ m², Σ v) per block, recognised later
# only if the very same tensors are unchanged (same objects, storage and version counters).
#
# A record is one kernel call (a param group's blocks of one dtype). The store keeps, for each block, only
# its newest record, and a record only while it is some block's newest: when the set of blocks with a
# gradient changes from step to step (a mixture of experts' idle experts, LayerDrop), each step's calls
# have new block sets, and records kept until their moments died grew without bound (+62 MiB and +20 ms
# per step after 1000 steps of a small MoE). Bounded this way the store holds at most one record per live
# block, and the block -> record index is kept up to date instead of being rebuilt on use.

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
        # one object per key: a key equal to a stored one is that one, so the per-block test below is by
        # identity (comparing two equal tuples of 2n ids per block was quadratic: 3000 blocks, 0.2 s)
        same = self._stored.get(key)
        if same is not None:
            key = same.ids
        dropped: dict[int, list[Any]] = {}  # id(older key) -> [that key, blocks it stops being newest of]
        for j, b in enumerate(key[:len(sums)]):
            old = self._newest.get(b)
            if old is not None and old[0] is not key:
                seen = dropped.get(id(old[0]))
                if seen is None:
                    dropped[id(old[0])] = [old[0], 1]
                else:
                    seen[1] += 1
            self._newest[b] = (key, j)
        for old_key, count in dropped.values():  # each key hashed once, not once per block it leaves
            self._release(old_key, count)
        self._stored.pop(key, None)  # re-inserted as the newest
        # a positional constructor: dataclasses.replace costs ~4 µs, a visible part of a small model's step
        self._stored[key] = Stored(key, record.refs, record.versions, record.ptrs, sums)
        self._holds[key] = len(sums)

    def _release(self, key: tuple[int, ...], count: int = 1) -> None:
        """``key`` is no longer the newest record of ``count`` of its blocks."""
        left = self._holds[key] - count
        if left > 0:
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


_numel = Tensor.numel

_COMPILABLE = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class FusedPasses(Protocol):
    """The one-call-per-pass kernels (implemented by :class:`lightning_soaa.kernels.soaa_native.NativeSOAA`
    for CPU and :class:`lightning_soaa.kernels.soaa_triton.TritonSOAA` for CUDA; this module only calls
    them). ``sums`` modes: ``SUMS_MOMENTS`` -> ``[Σ m², Σ v]``,
    ``SUMS_GM`` -> ``[Σ m g, Σ g²]``; ``step`` updates θ, m, v in place (and marks them modified for
    autograd) and returns ``[Σ m q, Σ (s q)², #(s < knee), Σ m², Σ v]`` per block."""

    SUMS_MOMENTS: int
    SUMS_GM: int

    def accepts(self, *ts: Tensor) -> bool: ...

    def accepts_all(self, *lists: list[Tensor]) -> bool: ...

    def sums(self, g: list[Tensor], m: list[Tensor], v: list[Tensor], modes: list[int]) -> list[list[float]]: ...

    def step(self, p: list[Tensor], g: list[Tensor], m: list[Tensor], v: list[Tensor],
             scal: Sequence[Sequence[float]]) -> list[list[float]]: ...


_COMPILE_LOCK = threading.Lock()


class _CompiledOnce:
    """A class attribute of :class:`SOAAKernels`: ``fn`` ``torch.compile``'d at the first read on any instance
    (the C / Triton paths never read it, so never compile) and shared by all instances. A non-data
    descriptor: an instance attribute of the same name (a test's stand-in kernel) takes precedence."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn
        self._compiled: Callable[..., Any] | None = None

    def __get__(self, obj: object, owner: type | None = None) -> Callable[..., Any]:
        if self._compiled is None:
            with _COMPILE_LOCK:  # two threads' first steps: still one wrapper
                if self._compiled is None:
                    self._compiled = torch.compile(self._fn, dynamic=True, fullgraph=True)
        return self._compiled


class SOAAKernels:
    """The one-sweep passes (sums; moments and θ in place), for one owner (e.g. an optimizer instance)
    to keep and pass in: on CPU the C loops that ``cpu_loader`` returns (the optimizer passes
    :meth:`lightning_soaa.kernels.soaa_native.NativeSOAA.load`; called at the first CPU block), on an
    accelerator the passes ``accel_loader`` returns (the optimizer passes the Triton kernels of
    :mod:`lightning_soaa.kernels.soaa_triton` for CUDA), elsewhere, or where a loader raises (no C compiler,
    no Triton), the ``torch.compile``'d kernels.

    ``min_numel``: smaller tensors take the eager path (a compiled call costs tens of microseconds of
    guards and launch; below this size the eager ops are as fast). ``cpu_loader=None`` / ``accel_loader=None``:
    no such kernels. After a failure the object turns that backend off (``failure`` / ``native_failure`` /
    ``accel_failure`` say why) and every later call takes the next one; the failing call itself never
    leaves a tensor half-updated (errors surface before the first kernel writes).
    """

    def __init__(self, min_numel: int = 1 << 16, cpu_loader: Callable[[], FusedPasses] | None = None,
                 accel_loader: Callable[[], FusedPasses] | None = None, compile_accelerators: bool = True) -> None:
        self.min_numel = int(min_numel)
        self.compile_accelerators = compile_accelerators
        self.failure: str | None = None
        self.native_failure: str | None = None if cpu_loader is not None else "off (no CPU kernel loader)"
        self.accel_failure: str | None = None if accel_loader is not None else "off (no accelerator kernel loader)"
        self._loader = cpu_loader
        self._accel_loader = accel_loader
        self._native: FusedPasses | None = None
        self._accel: FusedPasses | None = None
        self._records = MomentRecords()  # the sums the C step knows of the moments it wrote

    # the torch.compile'd passes, one set per process (see _CompiledOnce and the note above _sums_kernel)
    sums = _CompiledOnce(_sums_kernel)
    step = _CompiledOnce(_step_kernel)
    update_sums = _CompiledOnce(_update_sums_kernel)
    update_count = _CompiledOnce(_update_count_kernel)

    def _big(self, ts: tuple[Tensor, ...]) -> bool:
        return ts[0].numel() >= self.min_numel and not torch.compiler.is_compiling()

    def _load_native(self) -> FusedPasses | None:
        if self.native_failure is not None or torch.compiler.is_compiling():
            return None
        if self._native is None:
            assert self._loader is not None
            try:
                self._native = self._loader()
            except RuntimeError as e:  # the loader's "cannot build or load here"
                self.native_failure = str(e)
                log.warning("SOAA: no C kernels here (%s); using torch.compile or eager", e)
                return None
        return self._native

    def _load_accel(self) -> FusedPasses | None:
        if self.accel_failure is not None or torch.compiler.is_compiling():
            return None
        if self._accel is None:
            assert self._accel_loader is not None
            try:
                self._accel = self._accel_loader()
            except RuntimeError as e:  # the loader's "cannot run here" (no Triton, no CUDA)
                self.accel_failure = str(e)
                if self.compile_accelerators:  # asked for (compile=True): say so loudly
                    log.warning("SOAA: no fused accelerator kernels here (%s); using torch.compile or eager", e)
                else:  # the default on an accelerator without them (MPS, no Triton): foreach, as before
                    log.info("SOAA: no fused accelerator kernels here (%s); using torch's foreach ops", e)
                return None
        return self._accel

    def fused_loaded(self, cpu: bool) -> FusedPasses | None:
        """The one-call-per-pass kernels for CPU (``cpu``) or accelerator tensors, loaded on first use;
        None where there are none."""
        return self._load_native() if cpu else self._load_accel()

    def native_for(self, *ts: Tensor) -> FusedPasses | None:
        """The one-call-per-pass kernels of the block's device (C on CPU, Triton on CUDA) if they take this
        block (loaded at the first block that could use them). They take blocks of any size: one call
        runs all blocks of a dtype, so a small block costs no dispatch of its own."""
        if (fused := self.fused_loaded(ts[0].is_cpu)) is None:
            return None
        return fused if fused.accepts(*ts) else None

    def native_for_all(self, *lists: list[Tensor]) -> FusedPasses | None:
        """:meth:`native_for` if the kernels take every block (``lists[k][i]``: block i's k-th tensor),
        checked for all blocks at once; None sends the caller to :meth:`native_for` block by block."""
        if not lists[0] or (fused := self.fused_loaded(lists[0][0].is_cpu)) is None:
            return None
        return fused if fused.accepts_all(*lists) else None

    def remember(self, m: Tensor, v: Tensor, sum_m2: float, sum_v: float) -> None:
        """Σ m², Σ v of moments the C step just wrote (after their version counters were bumped)."""
        self.remember_all([m], [v], [(sum_m2, sum_v)])

    def remember_all(self, ms: list[Tensor], vs: list[Tensor], sums: list[tuple[float, float]]) -> None:
        """:meth:`remember` for the blocks of one call: one record, kept with weak references (it never
        keeps a moment alive) and checked against the tensors, their versions and addresses on use."""
        self.keep(self.snapshot(ms, vs), sums)

    snapshot = staticmethod(MomentRecords.snapshot)

    def keep(self, record: Stored, sums: list[tuple[float, float]]) -> None:
        """Remember ``record`` (from :meth:`snapshot`) with the blocks' (Σ m², Σ v)."""
        self._records.keep(record, sums)

    def stored_sums(self, m: Tensor, v: Tensor) -> tuple[float, float] | None:
        """``(Σ m², Σ v)`` if m and v are exactly as the last C step left them (MomentRecords.lookup)."""
        return self._records.lookup(m, v)

    def stored_sums_all(self, ms: list[Tensor], vs: list[Tensor]) -> list[tuple[float, float] | None]:
        """:meth:`stored_sums` of every block, in one check when they are one remembered call's blocks."""
        return self._records.lookup_all(ms, vs)

    def forget(self) -> None:
        """Drop the remembered sums (the owner calls this when it replaces or reloads its state)."""
        self._records.forget()

    def accepts(self, *ts: Tensor) -> bool:
        """Whether these equal-shape tensors (one block) can go through the compiled kernels."""
        t0 = ts[0]
        return (
            self.failure is None
            and (t0.is_cpu or self.compile_accelerators)
            and self._big(ts)
            and t0.dtype in _COMPILABLE
            and _kernel_dtypes(ts)
            and all(t.device == t0.device and t.is_contiguous() for t in ts)
        )

    def fail(self, e: Exception) -> None:
        self.failure = f"{type(e).__name__}: {e}"
        log.warning("SOAA: the compiled kernels failed (%s); using the eager path from now on", self.failure)

    def scalars(self, values: list[float], like: Tensor) -> Tensor:
        dt = torch.float64 if like.dtype == torch.float64 else torch.float32
        return torch.tensor(values, dtype=dt).to(like.device, non_blocking=True)


def _kernel_dtypes(ts: tuple[Tensor, ...]) -> bool:
    """Whether a block's tensors (θ, g, m, v or g, m, v: the moments last) have dtypes the compiled kernels
    take: one dtype, or a float16 θ and g with float32 moments (the state SOAA keeps for them)."""
    low = ts[-1].dtype
    return ts[-2].dtype == low and all(
        t.dtype == low or (t.dtype == torch.float16 and low == torch.float32) for t in ts[:-2])


def _flat(x: Tensor) -> Tensor:
    return x.detach().view(-1)


def _compiled_soaa_sums(
    kernels: SOAAKernels, grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    ts: list[int], *, beta1: float, beta2: float, eps: float,
) -> Tensor | None:
    """The partials of every tensor through the compiled kernel (reads only); ``None`` when it cannot
    run."""
    scal = kernels.scalars([1.0 - beta1, beta2, 1.0 - beta2], grads[0])
    sums = []
    with torch.no_grad():
        try:
            for g, m, v in zip(grads, exp_avgs, exp_avg_sqs):
                sums.append(kernels.sums(_flat(g), _flat(m), _flat(v), scal))
        except Exception as e:  # noqa: BLE001 - any compiler problem means: run eager
            kernels.fail(e)
            return None
    weights = torch.tensor([[(1.0 - beta1**t) ** -2, 1.0 / (1.0 - beta2**t)] for t in ts],
                           dtype=torch.float64)
    total = (torch.stack(sums) * weights.to(sums[0].device)).sum(0)
    return total + torch.tensor([0.0, eps * sum(g.numel() for g in grads)], dtype=torch.float64,
                                device=total.device)


def _compiled_soaa_step_(
    kernels: SOAAKernels, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], ts: list[int], *, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, d: float, c: float, count_limited: bool,
) -> tuple[Tensor, int]:
    """Moments and θ of the tensors through the compiled kernel, in order. Returns float64
    ``[Σ m̂·u, Σ v̂·u²]`` (plus ``n_limited`` with ``count_limited``) and how many tensors were done
    (fewer than all after a compiler failure; the rest are untouched)."""
    rows, weights = [], []
    sums = kernels.update_count if count_limited else kernels.update_sums
    with torch.no_grad():
        for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, ts):
            k1, knee, step, bc1, bc2 = _cap_scalars(t, beta1, beta2, d, c)
            scal = kernels.scalars([1.0 - beta1, beta2, 1.0 - beta2, 1.0 - lr * weight_decay, -lr * step,
                                    k1, knee, eps], p)
            try:
                kernels.step(_flat(p), _flat(g), _flat(m), _flat(v), scal)
            except Exception as e:  # noqa: BLE001 - fails before writing any tensor of this block
                kernels.fail(e)
                break
            weights.append([step / bc1, step * step / bc2, 1.0][:3 if count_limited else 2])
            try:  # a second read of the new m, v (8 B/param fp32): see _step_kernel
                rows.append(sums(_flat(m), _flat(v), scal))
            except Exception as e:  # noqa: BLE001 - this tensor is updated: its sums eagerly, then stop
                kernels.fail(e)
                rows.append(_eager_update_sums(m, v, scal, count_limited))
                break
    if not rows:
        return torch.zeros(3 if count_limited else 2, dtype=torch.float64), 0
    w = torch.tensor(weights, dtype=torch.float64).to(rows[0].device)
    total = (torch.stack(rows) * w).sum(0)
    return total, len(rows)


# ---------------------------------------------------------------- C kernels (CPU; soaa_native.py)
def _kinds(xs: list[Tensor], uniform: bool) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    """Indices by (dtype, device): one fused call takes blocks of one dtype on one device (a CUDA kernel
    reads its pointer table on one GPU; a model split over GPUs has blocks on several). ``uniform``: the
    caller knows they are all of one kind (the usual case, without a look at every block)."""
    if uniform:
        return {(xs[0].dtype, xs[0].device): list(range(len(xs)))}
    out: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, x in enumerate(xs):
        out.setdefault((x.dtype, x.device), []).append(i)
    return out


def _fused_for(kernels: SOAAKernels, device: torch.device) -> FusedPasses:
    """The fused passes of this device's kind (C on CPU, Triton on CUDA): a group may hold blocks of both,
    and each kind's kernels take only their own tensors."""
    native = kernels.fused_loaded(device.type == "cpu")
    assert native is not None, "a block went to fused kernels that are not loaded"
    return native


def _fused_step(kernels: SOAAKernels, native: FusedPasses, device: torch.device,
                blocks: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]],
                scal: list[tuple[float, ...]]) -> list[list[float]]:
    """``native.step`` (which also bumps the autograd versions). The C loops fail only before writing
    (their one allocation); an accelerator's step can fail after its kernel ran (a device fault, a launch
    of the reduction): that is raised as such, and the accelerator kernels are not used again."""
    try:
        p, g, m, v = blocks
        return native.step(p, g, m, v, scal)
    except Exception as e:
        if device.type == "cpu":
            raise
        kernels.accel_failure = f"{type(e).__name__}: {e}"
        raise RuntimeError(f"SOAA: the fused step on {device} failed ({kernels.accel_failure}) after it may have "
                           "written θ, m and v: this optimizer's state is no longer consistent; resume from a "
                           "checkpoint (the fused accelerator kernels are now off)") from e


def _native_soaa_sums(
    kernels: SOAAKernels, grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], ts: list[int], *, beta1: float, beta2: float, eps: float, uniform: bool = False,
) -> list[float]:
    """The partials of every block through the fused sums pass (reads only; one call per dtype and
    device): Σ m_t²
    and Σ v_t follow from Σ m², Σ v of the stored moments (remembered from the last C step, see
    :meth:`SOAAKernels.stored_sums`, else read once from m and v) and this pass's Σ m g, Σ g², which
    reads only g and m. Always by this formula, so a resumed run takes the same bits as an
    uninterrupted one (the once-read sums equal the step's)."""
    s_m2 = s_v = 0.0
    n_eps = eps * sum(map(_numel, grads))  # read before the loops' sweep evicts the tensors from cache
    for (_, device), idx in _kinds(grads, uniform).items():
        native = _fused_for(kernels, device)
        whole = len(idx) == len(grads)
        gs, ms, vs = (grads, exp_avgs, exp_avg_sqs) if whole else (
            _pick(grads, idx), _pick(exp_avgs, idx), _pick(exp_avg_sqs, idx))
        stored = kernels.stored_sums_all(ms, vs)
        unknown = [j for j, st in enumerate(stored) if st is None]
        if unknown:  # after a load, at the first step, or after the moments were changed from outside
            um, uv = _pick(ms, unknown), _pick(vs, unknown)
            rows = native.sums(um, um, uv, [native.SUMS_MOMENTS] * len(unknown))
            kernels.remember_all(um, uv, [(sm2, sv) for sm2, sv in rows])
            for j, (sm2, sv) in zip(unknown, rows):
                stored[j] = (sm2, sv)
        rows = native.sums(gs, ms, vs, [native.SUMS_GM] * len(idx))
        known: list[tuple[float, float]] = stored  # type: ignore[assignment]  # (every None filled above)
        s_m2, s_v = add_moment_sums(s_m2, s_v, known, rows, ts if whole else _pick(ts, idx), beta1=beta1, beta2=beta2)
    return [s_m2, s_v + n_eps]


def add_moment_sums(s_m2: float, s_v: float, stored: Sequence[tuple[float, float]], rows: Sequence[Sequence[float]],
                    ts: Sequence[int], *, beta1: float, beta2: float) -> tuple[float, float]:
    """``s_m2 + Σ m̂_t²`` and ``s_v + Σ v̂_t`` (no ε) of the would-be moments of blocks whose stored moments
    have ``stored[i] = (Σ m², Σ v)`` and whose sums pass gave ``rows[i] = (Σ m g, Σ g²)``: the arithmetic
    of the fused sums pass, added block by block in order (every caller, so the same bits)."""
    a = 1.0 - beta1
    c1, c2, c3, b2c = beta1 * beta1, 2.0 * beta1 * a, a * a, 1.0 - beta2
    bias = {t: ((1.0 - beta1**t) ** 2, 1.0 - beta2**t) for t in set(ts)}
    for (bc1, bc2), (sm2, sv), (mg, g2) in zip(map(bias.__getitem__, ts), stored, rows):
        x = c1 * sm2 + c2 * mg + c3 * g2
        # a rounding below 0 only where m_t ≈ 0 everywhere: max(x, 0.0) without its call (x unless 0 > x, so
        # a NaN and -0.0 stay as they were)
        s_m2 += (0.0 if x < 0.0 else x) / bc1
        s_v += (beta2 * sv + b2c * g2) / bc2
    return s_m2, s_v


def _native_soaa_step_(
    kernels: SOAAKernels, params: list[Tensor], grads: list[Tensor],
    exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], ts: list[int], *, lr: float, beta1: float,
    beta2: float, eps: float, weight_decay: float, d: float, c: float, count_limited: bool, uniform: bool = False,
) -> list[float]:
    """Moments and θ of every block through the fused step pass (one call per dtype and device), which
    also returns the update sums and the new moments' Σ m², Σ v (remembered for the next sums pass)."""
    out = [0.0, 0.0, 0.0]
    rows_of, weights = native_step_scalars(ts, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                                           d=d, c=c)
    for (_, device), idx in _kinds(params, uniform).items():
        native = _fused_for(kernels, device)
        sub = (params, grads, exp_avgs, exp_avg_sqs)
        ps, gs, ms, vs = sub if len(idx) == len(params) else _sub(sub, idx)
        # the record of the moments as the step leaves them (its one version bump included), taken while
        # they are in cache: after the loop's sweep every tensor touched costs a trip to memory
        record = kernels.snapshot(ms, vs, versions_ahead=1)
        rows = _fused_step(kernels, native, device, (ps, gs, ms, vs), [rows_of[ts[i]] for i in idx])
        add_step_sums(out, rows, _pick(ts, idx), weights)
        kernels.keep(record, [(r[3], r[4]) for r in rows])
    return out if count_limited else out[:2]


def native_step_scalars(ts: Sequence[int], *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                        d: float, c: float) -> tuple[dict[int, tuple[float, ...]], dict[int, tuple[float, float]]]:
    """Per step count of ``ts``: the fused step's scalar row ``(1-β1, β2, 1-β2, decay, alr, k1, knee, ε)``
    and the weights of its update sums (:func:`add_step_sums`)."""
    caps = {t: _cap_scalars(t, beta1, beta2, d, c) for t in set(ts)}
    rows_of: dict[int, tuple[float, ...]] = {
        t: (1.0 - beta1, beta2, 1.0 - beta2, 1.0 - lr * weight_decay, -lr * k[2], k[0], k[1], eps)
        for t, k in caps.items()}
    weights = {t: (k[2] / k[3], k[2] * k[2] / k[4]) for t, k in caps.items()}
    return rows_of, weights


def add_step_sums(out: list[float], rows: Sequence[Sequence[float]], ts: Sequence[int],
                  weights: dict[int, tuple[float, float]]) -> None:
    """Add the fused step's per-block ``[Σ m q, Σ (s q)², #limited, ...]`` into ``out = [Σ m̂·u, Σ v̂·u²,
    n_limited]``, weighted per step count, block by block in order (every caller, so the same bits)."""
    mu, vu2, limited = out  # (in locals: each sum still added block by block, in order)
    for (w0, w1), r in zip(map(weights.__getitem__, ts), rows):
        mu += r[0] * w0
        vu2 += r[1] * w1
        limited += r[2]
    out[:] = mu, vu2, limited


# ---------------------------------------------------------------- eager kernels
def use_foreach(tensors: list[Tensor], foreach: bool | None) -> bool:
    # On CPU the foreach ops are a per-tensor loop anyway, and their out-of-place forms allocate: a
    # fresh 40 MB tensor costs more than the arithmetic (page faults). The loop path writes into
    # caller-owned buffers instead. On CUDA the caching allocator makes foreach the faster choice.
    if foreach is not None:
        return foreach
    return bool(tensors) and tensors[0].device.type != "cpu"


def _cap_scalars(t: int, beta1: float, beta2: float, d: float, c: float
                 ) -> tuple[float, float, float, float, float]:
    """``(k1, knee, step, bc1, bc2)`` of the capped update at step count ``t``.

    With s = sqrt(v): d c v̂ = k1 s² and sqrt(v̂) = k2 s (k1 = d c / bc2, k2 = 1 / sqrt(bc2)), so
    r + ε = max(k1 s², k2 s) + ε = k1 · s · max(s, k2 / k1) + ε: a sqrt, a clamp and one addcmul, with
    no v̂ copy (k1 > 0 since d >= lo_t > 0 and c >= 1). s below the knee is the d-branch (Adam-like) of
    the cap. u = step · q with q = m / (r + ε).
    """
    bc1 = 1.0 - beta1**t
    bc2 = 1.0 - beta2**t
    k1 = d * c / bc2
    knee = (1.0 / math.sqrt(bc2)) / k1
    return k1, knee, d / bc1, bc1, bc2


def _multi_tensor_soaa_sums(
    grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], ts: list[int],
    *, beta1: float, beta2: float, eps: float,
) -> Tensor:
    """torch ``_foreach_*`` ops, a fixed number of calls whatever the number of tensors: the would-be
    moments into temporaries (small tensors: an allocation is cheaper than a copy), their global sums
    per step group, scaled by its bias correction, in float64."""
    m_new = list(torch._foreach_lerp(exp_avgs, grads, 1.0 - beta1))
    v_new = list(torch._foreach_mul(exp_avg_sqs, beta2))
    torch._foreach_addcmul_(v_new, grads, grads, value=1.0 - beta2)
    s_m2: list[Tensor] = []
    s_v: list[Tensor] = []
    for t, idx in _by_step(ts).items():
        s_m2.append(_total_sq64(_pick(m_new, idx)) / (1.0 - beta1**t) ** 2)
        s_v.append(_total64(_pick(v_new, idx)) / (1.0 - beta2**t))
    n_eps = eps * sum(g.numel() for g in grads)
    return torch.stack([sum(s_m2[1:], s_m2[0]), sum(s_v[1:], s_v[0]) + n_eps])


def _scratch(pieces: list[tuple[Tensor, ...]], k: int) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """``k`` tile-sized scratch buffers for the loop path; ``get(like)`` returns views shaped like
    ``like`` (or fresh tensors for a non-contiguous piece longer than a tile)."""
    like0 = pieces[0][0]
    n_buf = min(_TILE, max(tile[0].numel() for tile in pieces))
    bufs = [torch.empty(n_buf, dtype=like0.dtype, device=like0.device) for _ in range(k)]

    def get(like: Tensor) -> tuple[Tensor, ...]:
        n = like.numel()
        if n <= n_buf:
            return tuple(b[:n].view(like.shape) for b in bufs)
        return tuple(torch.empty_like(like) for _ in bufs)
    return get


def _single_tensor_soaa_sums(
    grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], ts: list[int],
    *, beta1: float, beta2: float, eps: float,
) -> Tensor:
    """Tile by tile: the would-be moments of a tile into two tile-sized scratch buffers, then summed."""
    dev = grads[0].device
    s_m2 = torch.zeros((), dtype=torch.float64, device=dev)
    s_v = torch.zeros((), dtype=torch.float64, device=dev)
    n_eps = 0.0
    for t, idx in _by_step(ts).items():
        acc_m, acc_v = _Acc(square=True), _Acc()
        pieces = [tile for i in idx for tile in _tiles(exp_avgs[i], grads[i], exp_avg_sqs[i])]
        scratch = _scratch(pieces, 2)
        for m, g, v in pieces:
            mo, vo = scratch(m)
            torch.lerp(m, g, 1.0 - beta1, out=mo)
            torch.mul(v, beta2, out=vo)
            vo.addcmul_(g, g, value=1.0 - beta2)
            acc_m.sum_sq(mo)
            acc_v.sum(vo)
        n_eps += sum(grads[i].numel() for i in idx) * eps
        s_m2 = s_m2 + acc_m.total(dev) / (1.0 - beta1**t) ** 2
        s_v = s_v + acc_v.total(dev) / (1.0 - beta2**t)
    return torch.stack([s_m2, s_v + n_eps])


def _rounds_coarsely(params: list[Tensor]) -> bool:
    """Whether any of ``params`` is stored coarser than float32 (bfloat16, float16), where each extra in-place
    write of θ in a step costs a visible rounding (the joined update is right for any dtype, one list more)."""
    return any(p.dtype in (torch.bfloat16, torch.float16) for p in params)


def _multi_tensor_soaa_step_(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], t: int,
    *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, d: float, c: float,
    count_limited: bool,
) -> Tensor:
    """Tensors of one step count ``t`` through ``_foreach_*`` ops (a fixed number of calls): the moments
    in place (the same ops as :func:`_multi_tensor_soaa_sums`, so the same values), then θ; float64
    ``[Σm̂u, Σv̂u², n_limited]``."""
    k1, knee, step, bc1, bc2 = _cap_scalars(t, beta1, beta2, d, c)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    s = list(torch._foreach_sqrt(exp_avg_sqs))
    sums = []
    if count_limited:  # same_batch only
        sums.append(torch.stack([(si < knee).sum() for si in s]).sum().double())
    q = list(torch._foreach_clamp_min(s, knee))
    torch._foreach_mul_(q, k1)
    torch._foreach_mul_(q, s)
    torch._foreach_add_(q, eps)
    q = list(torch._foreach_div(exp_avgs, q))
    if weight_decay != 0.0 and _rounds_coarsely(params):
        # θ + (alr·q - lr·λ·θ) in one rounding of θ, as the fused kernels do: decaying a bfloat16/float16 θ
        # in place first rounds it twice a step, and lr·λ·θ is below half its ulp (the decay is lost). The
        # scalars go through mul: add's alpha is rounded to the tensor's dtype (bfloat16: 1 - 1e-3 is 1)
        upd = torch._foreach_mul(q, -lr * step)
        torch._foreach_add_(upd, torch._foreach_mul(params, -lr * weight_decay))
        torch._foreach_add_(params, upd)
    else:
        if weight_decay != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        torch._foreach_add_(params, q, alpha=-lr * step)
    # Σ m̂·u = (d / bc1²) Σ m q ;  Σ v̂·u² = (d / bc1)² / bc2 · Σ (s q)²
    torch._foreach_mul_(s, q)
    torch._foreach_mul_(q, exp_avgs)  # m q = m² / (r + ε) >= 0
    return torch.stack([_total64(q) * (step / bc1), _total_sq64(s) * (step * step / bc2)] + sums)


def _single_tensor_soaa_step_(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], t: int,
    *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, d: float, c: float,
    count_limited: bool,
) -> Tensor:
    """Tensors of one step count ``t``, tile by tile: the tile's moments in place, then its θ, through
    two tile-sized scratch buffers."""
    k1, knee, step, bc1, bc2 = _cap_scalars(t, beta1, beta2, d, c)
    dev = params[0].device
    limited = torch.zeros((), dtype=torch.float64, device=dev)
    eps_t = torch.full((), eps, dtype=exp_avg_sqs[0].dtype, device=dev)
    acc_mu, acc_vu = _Acc(), _Acc(square=True)
    pieces = [tile for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs) for tile in _tiles(v, m, g, p)]
    scratch = _scratch(pieces, 2)
    for vt, mt, gt, pt in pieces:
        mt.lerp_(gt, 1.0 - beta1)
        vt.mul_(beta2).addcmul_(gt, gt, value=1.0 - beta2)
        si, qi = scratch(vt)
        torch.sqrt(vt, out=si)
        if count_limited:
            limited = limited + (si < knee).sum()
        torch.clamp_min(si, knee, out=qi)
        torch.addcmul(eps_t, qi, si, value=k1, out=qi)
        torch.div(mt, qi, out=qi)
        if weight_decay != 0.0 and _rounds_coarsely([pt]):
            # θ rounded once a step, as in the multi-tensor step (qi is read again below)
            pt.add_(qi.mul(-lr * step).add_(pt.mul(-lr * weight_decay)))
        else:
            if weight_decay != 0.0:
                pt.mul_(1.0 - lr * weight_decay)
            pt.add_(qi, alpha=-lr * step)
        si.mul_(qi)  # s q
        acc_vu.sum_sq(si)
        torch.mul(mt, qi, out=si)  # m q = m² / (r + ε) >= 0 (cheaper than a batched dot here)
        acc_mu.sum(si)
    sums = [acc_mu.total(dev) * (step / bc1), acc_vu.total(dev) * (step * step / bc2)]
    return torch.stack(sums + [limited] if count_limited else sums)


# ---------------------------------------------------------------- dispatchers
class BlockSplit(NamedTuple):
    """Which kernels take which blocks (indices into the block lists): ``fused`` (C on CPU, Triton on CUDA),
    ``compiled`` (``torch.compile``), ``eager``; ``uniform``: the fused ones are all of one dtype and device."""

    fused: list[int]
    compiled: list[int]
    eager: list[int]
    uniform: bool


def split_blocks(kernels: SOAAKernels | None, *lists: list[Tensor]) -> BlockSplit:
    """The indices of the blocks (``lists[k][i]``: block i's k-th tensor) for the fused kernels (C on CPU,
    Triton on CUDA; :meth:`SOAAKernels.native_for`), for the ``torch.compile``'d kernels and for the eager
    ones; and whether the fused ones are all of one dtype and device (checked at once by
    ``native_for_all``). Depends on the tensors' dtype, device, layout and size only: an optimizer decides
    it once per step from ``(params, grads, exp_avgs, exp_avg_sqs)`` and passes it to both
    :func:`moments_partials` and :func:`step_partials_` (checking twice is a visible cost of a small
    model's step)."""
    n = len(lists[0])
    if kernels is None:
        return BlockSplit([], [], list(range(n)), False)
    if kernels.native_for_all(*lists) is not None:  # the usual case: one check for all
        return BlockSplit(list(range(n)), [], [], True)
    c_idx, fast, rest = [], [], []
    for i in range(n):
        block = tuple(x[i] for x in lists)
        if kernels.native_for(*block) is not None:
            c_idx.append(i)
        elif kernels.accepts(*block):
            fast.append(i)
        else:
            rest.append(i)
    return BlockSplit(c_idx, fast, rest, False)


# Below this many elements a tensor's eager ops cost their dispatch, not their arithmetic: such tensors
# go through the foreach kernels (a fixed number of calls for all of them) also on CPU, where the
# allocations are small heap blocks, not fresh pages.
_SMALL = 1 << 16


def _eager_split(tensors: list[Tensor], idx: list[int], foreach: bool | None) -> tuple[list[int], list[int]]:
    """``idx`` split into the blocks for the foreach kernels and for the tiled loop."""
    if foreach is not None or not tensors or tensors[0].device.type != "cpu":
        return (idx, []) if use_foreach(tensors, foreach) else ([], idx)
    return [i for i in idx if tensors[i].numel() < _SMALL], [i for i in idx if tensors[i].numel() >= _SMALL]


Partials = Tensor | list[float]  # a kernel's partial sums: the fused passes give host floats, the others tensors


def add_partials(parts: list[Partials]) -> Partials:
    """The sum of partial-sum vectors (usually there is one), added left to right: host floats while
    every part is one (no tensor is made, a visible cost of a small model's step), else a float64
    tensor on the first tensor part's device."""
    total = parts[0]
    for part in parts[1:]:
        if isinstance(total, list) and isinstance(part, list):
            total = [a + b for a, b in zip(total, part)]
        elif isinstance(total, list):
            assert isinstance(part, Tensor)
            total = torch.tensor(total, dtype=torch.float64, device=part.device) + part
        else:
            total = total + (part.to(total.device) if isinstance(part, Tensor) else
                             torch.tensor(part, dtype=torch.float64, device=total.device))
    return total


def as_tensor(part: Partials) -> Tensor:
    return part if isinstance(part, Tensor) else torch.tensor(part, dtype=torch.float64)


def _pick(xs: list[Any], idx: list[int]) -> list[Any]:
    return [xs[i] for i in idx]


def _sub(lists: tuple[list[Tensor], ...], idx: list[int]) -> tuple[list[Tensor], ...]:
    return tuple(_pick(x, idx) for x in lists)


def soaa_moments(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    ts: list[int],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    foreach: bool | None = None,
    kernels: SOAAKernels | None = None,
) -> Tensor:
    r"""The partials of the would-be moments :math:`m_t, v_t`; **reads only** (nothing is modified and
    the moments are not stored: :func:`soaa_step_` recomputes them in place once the step is known to
    run).

    Args:
        grads, exp_avgs, exp_avg_sqs: equal-shape tensors per block (any shape, any floating dtype).
        ts: the step count of this update per tensor (``t >= 1``), used for the bias correction.
        beta1, beta2, eps: as in :class:`~lightning_soaa.optim.soaa.SOAA`.
        foreach: ``None`` picks foreach on CUDA and the loop on CPU (the same arithmetic up to rounding).
        kernels: compiled kernels (:class:`SOAAKernels`) for the blocks they accept; the other blocks,
            and all blocks when ``None``, take the eager path chosen by ``foreach``.

    Returns:
        ``partials = [Σ m̂², Σ (v̂ + ε)]`` (float64, shape ``[2]``, on the tensors' device). A
        non-finite gradient makes ``Σ m̂²`` non-finite, so the caller can use the partials as its
        overflow check.
    """
    return as_tensor(moments_partials(grads, exp_avgs, exp_avg_sqs, ts, beta1=beta1, beta2=beta2, eps=eps,
                                      foreach=foreach, kernels=kernels))


def moments_partials(
    grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], ts: list[int],
    *, foreach: bool | None = None, kernels: SOAAKernels | None = None, split: BlockSplit | None = None, **kw: Any,
) -> Partials:
    """:func:`soaa_moments` (``kw``: its ``beta1``, ``beta2``, ``eps``) with the fused kernels' partials
    as host floats (a list; no tensor is made, a visible cost of a small model's step): what the
    optimizer calls. ``split``: the step's :func:`split_blocks` (else decided here from these tensors)."""
    if not grads:
        return torch.zeros(2, dtype=torch.float64)
    lists = (grads, exp_avgs, exp_avg_sqs)
    c_idx, fast, rest, uniform = split if split is not None else split_blocks(kernels, *lists)
    parts: list[Partials] = []
    if c_idx:
        assert kernels is not None
        cg, cm, cv = lists if len(c_idx) == len(grads) else _sub(lists, c_idx)
        parts.append(_native_soaa_sums(kernels, cg, cm, cv, _pick(ts, c_idx), uniform=uniform, **kw))
    if fast:
        assert kernels is not None
        g_, m_, v_ = _sub(lists, fast)
        part = _compiled_soaa_sums(kernels, g_, m_, v_, _pick(ts, fast), **kw)
        if part is None:  # compiler failure: these blocks take the eager path too
            rest = sorted(rest + fast)
        else:
            parts.append(part)
    if not rest:  # the usual case on CPU: the C loops took every block
        return add_partials(parts)
    multi, single = _eager_split(grads, rest, foreach)
    eager: tuple[tuple[Callable[..., Tensor], list[int]], ...] = (
        (_multi_tensor_soaa_sums, multi), (_single_tensor_soaa_sums, single))
    for kernel, blocks in eager:
        if blocks:
            parts.extend(_eager_call(kernel, lists, blocks, False, ts=ts, **kw))
    return add_partials(parts)


def soaa_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    ts: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    d: float,
    c: float,
    count_limited: bool = False,
    foreach: bool | None = None,
    kernels: SOAAKernels | None = None,
) -> Tensor:
    r"""Update the moments and :math:`	heta \leftarrow 	heta(1-\eta\lambda) - \eta u` in place, in one
    sweep per tensor, and return the partials.

    The moments become :math:`m_t, v_t` (the values :func:`soaa_moments` summed, by the same arithmetic
    on the same path); :math:`u = d\,\hat m_t / (\max(d\,c\,\hat v_t, \sqrt{\hat v_t}) + \epsilon)`
    with ``d`` the multiplier set at the end of the previous step and ``c`` the global Fisher scale
    :math:`c_t`.

    Args:
        foreach, kernels: as in :func:`soaa_moments`. The loop path needs only two tile-sized scratch
            buffers; the compiled path none.

    Returns:
        float64 ``[Σ m̂·u, Σ v̂·u²]`` (plus, with ``count_limited``, the number of coordinates on the
        ``d``-branch of the cap, i.e. where a larger ``d`` gives a larger step). The predicted reduction
        is :math:`\eta(\Sigma\hat m u - \tfrac12 \Sigma \hat v u^2)`; see :func:`predicted_reduction`.
    """
    return as_tensor(step_partials_(
        params, grads, exp_avgs, exp_avg_sqs, ts, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, d=d, c=c, count_limited=count_limited, foreach=foreach, kernels=kernels))


def step_partials_(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], ts: list[int],
    *, foreach: bool | None = None, kernels: SOAAKernels | None = None, split: BlockSplit | None = None, **kw: Any,
) -> Partials:
    """:func:`soaa_step_` (``kw``: its scalars, ``lr`` to ``count_limited``) with the fused kernels'
    partials as host floats (a list; no tensor is made, a visible cost of a small model's step): what
    the optimizer calls. ``split``: as in :func:`moments_partials`."""
    if not params:
        return torch.zeros(3 if kw.get("count_limited") else 2, dtype=torch.float64)
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    c_idx, fast, rest, uniform = split if split is not None else split_blocks(kernels, *lists)
    if fast and kernels is not None and kernels.failure is not None:  # the sums pass's compiler failed
        fast, rest = [], sorted(rest + fast)
    parts: list[Partials] = []
    if c_idx:
        assert kernels is not None
        cp, cg, cm, cv = lists if len(c_idx) == len(params) else _sub(lists, c_idx)
        parts.append(_native_soaa_step_(kernels, cp, cg, cm, cv, _pick(ts, c_idx), uniform=uniform, **kw))
    if fast:
        assert kernels is not None
        p_, g_, m_, v_ = _sub(lists, fast)
        done, n_done = _compiled_soaa_step_(kernels, p_, g_, m_, v_, _pick(ts, fast), **kw)
        parts.append(done)
        rest = sorted(rest + fast[n_done:])
    if not rest:
        return add_partials(parts)
    multi, single = _eager_split(params, rest, foreach)
    eager: tuple[tuple[Callable[..., Tensor], list[int]], ...] = (
        (_multi_tensor_soaa_step_, multi), (_single_tensor_soaa_step_, single))
    for kernel, blocks in eager:
        for t, idx in _by_step(_pick(ts, blocks)).items():
            parts.extend(_eager_call(kernel, lists, [blocks[i] for i in idx], True, t, **kw))
    return add_partials(parts)


# float16 blocks are computed in float32 and θ stored back: in float16 the default eps (1e-8) rounds to 0,
# and so does v = (1 - β2) g² for |g| below ~8e-3, so m / (√v + eps) was m / 0 = inf, written into the
# parameters. The optimizer keeps such a block's moments in float32 (a float16 v also lost every |g| below
# ~5e-3 and overflowed above ~8e3); float16 moments given here are widened and stored back. bfloat16 has
# float32's exponent range; it stays as it is.
_UPCAST = (torch.float16,)


def _eager_call(kernel: Callable[..., Tensor], lists: tuple[list[Tensor], ...], blocks: list[int], step: bool,
                *args: Any, ts: list[Any] | None = None, **kw: Any) -> list[Tensor]:
    """``kernel`` over ``blocks`` of ``lists``, the float16 blocks on float32 copies; for the ``step``
    (lists θ, g, m, v) θ and the moments are copied back, the sums pass (g, m, v) only reads. ``ts``:
    per-block step counts (indexed like ``lists``), passed first, picked for each of the two calls."""

    def call(idx: list[int], xs: tuple[list[Tensor], ...]) -> Tensor:
        return kernel(*xs, *(() if ts is None else (_pick(ts, idx),)), *args, **kw)

    low = [i for i in blocks if lists[0][i].dtype in _UPCAST]
    if not low:
        return [call(blocks, _sub(lists, blocks))]
    rest = [i for i in blocks if lists[0][i].dtype not in _UPCAST]
    out = [call(rest, _sub(lists, rest))] if rest else []
    orig = _sub(lists, low)
    wide = tuple([x.float() for x in xs] for xs in orig)  # the float32 moments SOAA keeps are not copied
    out.append(call(low, wide))
    written = (0, 2, 3) if step else ()
    for k in written:
        back = [j for j, (o, w) in enumerate(zip(orig[k], wide[k])) if o is not w]
        if back:
            torch._foreach_copy_([orig[k][j] for j in back], [wide[k][j] for j in back])
    return out


def predicted_reduction(lr_m_u: float, lr_v_u2: float) -> float:
    r""":math:`p = \eta(\Sigma\hat m u - \tfrac12\Sigma\hat v u^2)` from the lr-weighted sums."""
    return lr_m_u - 0.5 * lr_v_u2


BAND_SCHEDULES = ("final", "paper")


def band(t: int, gamma: float, total_steps: int | None, schedule: str = "paper") -> tuple[float, float]:
    r"""The band :math:`[lo_t, hi_t]` that clips the trust multiplier :math:`d_t`.

    ``schedule="paper"`` (spec §1.3 step 10): :math:`[(1-\gamma)^{(t-1)/T},\ 1 + \gamma^{(t-1)/T}]`,
    from [1, 2] at t = 1 to the final band [1-γ, 1+γ], which the formula reaches at t = T + 1 and which
    is kept after (the exponent is clamped to 1; the spec's "ends at [1-γ, 1+γ] at t = T" is the formula's
    limit for large T, and a clamp at t = T would leave T = 1 at [1, 2] forever), and ``total_steps=None``
    means the final band at every step (INFERRED; see :class:`~lightning_soaa.optim.soaa.SOAA`).
    ``schedule="final"``: :math:`[1-\gamma, 1+\gamma]` at every step (``total_steps`` is not used).
    """
    if schedule not in BAND_SCHEDULES:
        raise ValueError(f"Invalid band_schedule={schedule!r}. Must be one of 'final', 'paper'.")
    if total_steps is None or schedule == "final":
        return 1.0 - gamma, 1.0 + gamma
    frac = min(t - 1, total_steps) / total_steps
    # 0.0 ** 0.0 == 1.0 in Python, which gives hi_1 = 2 for gamma = 0, as the formula says.
    return (1.0 - gamma) ** frac, 1.0 + gamma**frac


class SOAAScalars(NamedTuple):
    """The optimizer-wide scalars of one step, identical on every rank (a tuple: made at every step, and a
    frozen dataclass's init costs a setattr per field)."""

    c: float  # Fisher scale c_t = 1 + Σm̂² / Σ(v̂+ε)
    loss_ema: float  # L_t (not bias-corrected)
    loss_hat: float  # L_t / (1 - β1^t)
    actual: float  # ℓ̂_t - ℓ_t
    rho: float  # actual / max(p_{t-1}, ε), or the smoothed ratio A_t / max(P_t, ε)
    lo: float
    hi: float
    d: float  # d_t, used by the NEXT update
    actual_sum: float = 0.0  # A_t (rho_smoothing > 0; 0 otherwise)
    pred_sum: float = 0.0  # P_t


def smoothed_ratio(actual: float, pred_prev: float, actual_sum: float, pred_sum: float, beta: float,
                   eps: float) -> tuple[float, float, float]:
    r"""The denoised trust ratio :math:`(\rho_t, A_t, P_t)`, a ratio of discounted sums:

    .. math::
        A_t = \beta_\rho A_{t-1} + (\hat\ell_t - \ell_t),\qquad
        P_t = \beta_\rho P_{t-1} + p_{t-1},\qquad
        \rho_t = \frac{A_t}{\max(P_t, \epsilon)}

    (:math:`A_0 = P_0 = 0`). Why: on a mini-batch loss the per-step :math:`\hat\ell_t - \ell_t` has a
    noise sd (≈ 0.07 on the character LM of ``benchmarks/soaa_lm_study.py``) far above the one-step
    prediction :math:`p_{t-1}` (0.002-0.02), so the spec's per-step ratio is mostly noise; summing both over
    a window of about :math:`1/(1-\beta_\rho)` steps first (a ratio of sums, not a mean of ratios, so
    one small :math:`p` cannot blow it up) averages the noise out. The common factor
    :math:`1-\beta_\rho` and any bias correction cancel in the ratio. ``beta = 0`` gives the spec's
    :math:`\rho_t` exactly.
    """
    a = beta * actual_sum + actual
    p = beta * pred_sum + pred_prev
    return a / max(p, eps), a, p


def trust_region_scalars(
    *,
    sum_mhat_sq: float,
    sum_vhat_eps: float,
    loss: float,
    loss_ema: float,
    pred_prev: float,
    d_prev: float,
    t: int,
    beta1: float,
    eps: float,
    gamma: float,
    total_steps: int | None,
    band_schedule: str = "paper",
    rho_smoothing: float = 0.0,
    actual_sum: float = 0.0,
    pred_sum: float = 0.0,
    trust_warmup: int = 0,
) -> SOAAScalars:
    r"""Steps 3 and 8-10 of §1.3 (the lagged rule), in Python float64.

    With ``rho_smoothing`` :math:`=\beta_\rho > 0` the ratio is the ratio of discounted sums of
    :func:`smoothed_ratio` instead of the per-step :math:`(\hat\ell_t - \ell_t)/\max(p_{t-1}, \epsilon)`.
    With ``trust_warmup`` :math:`=K > 0`, :math:`d_t = 1` for :math:`t \le K` (the sums still accumulate):

    .. math::
        d_t = \begin{cases} 1 & t \le K \\
          \operatorname{clip}(\rho_t d_{t-1}, lo_t, hi_t) & t > K \end{cases}

    Args:
        sum_mhat_sq, sum_vhat_eps: the global :math:`\Sigma\hat m^2` and :math:`\Sigma(\hat v+\epsilon)`.
        loss: the mini-batch loss :math:`\ell_t` (averaged over ranks).
        loss_ema: :math:`L_{t-1}`; pred_prev: :math:`p_{t-1}`; d_prev: :math:`d_{t-1}`.
        t: the optimizer-wide step number (1 on the first step).
        gamma, total_steps, band_schedule: the band, see :func:`band`.
        rho_smoothing: :math:`\beta_\rho \in [0, 1)`; 0 (default) is the spec's per-step ρ.
        actual_sum, pred_sum: :math:`A_{t-1}`, :math:`P_{t-1}` (used only when ``rho_smoothing > 0``).
        trust_warmup: :math:`K \ge 0` steps with :math:`d = 1` (default 0: none).
    """
    c = 1.0 + sum_mhat_sq / sum_vhat_eps if sum_vhat_eps > 0.0 else 1.0
    loss_ema = beta1 * loss_ema + (1.0 - beta1) * loss
    loss_hat = loss_ema / (1.0 - beta1**t)
    actual = loss_hat - loss
    if rho_smoothing > 0.0:
        rho, actual_sum, pred_sum = smoothed_ratio(actual, pred_prev, actual_sum, pred_sum, rho_smoothing, eps)
    else:  # the spec's rule, computed exactly as before the option existed
        rho, actual_sum, pred_sum = actual / max(pred_prev, eps), 0.0, 0.0
    lo, hi = band(t, gamma, total_steps, band_schedule)
    d = 1.0 if t <= trust_warmup else min(max(rho * d_prev, lo), hi)
    return SOAAScalars(c, loss_ema, loss_hat, actual, rho, lo, hi, d, actual_sum, pred_sum)  # (positional: per step)
