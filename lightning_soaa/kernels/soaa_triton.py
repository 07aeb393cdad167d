"""SOAA's two elementwise passes as hand-written Triton kernels: one launch per pass for every block of
a dtype, whatever the number of blocks (the GPU counterpart of :mod:`lightning_soaa.kernels.soaa_native`,
with the same interface, :class:`lightning_soaa.functional.soaa.FusedPasses`).

Why hand-written: the ``torch.compile``'d passes took one compiled call per tensor and pass (~0.1 ms of
dynamo guards each) and reduced each tensor as one program; the foreach path makes ~15 passes over
memory and 5 temporaries a step. Here a step is two sweeps (8 + 28 B/param in fp32, as on CPU) and four
launches (two passes, each followed by its per-block reduction), for all blocks at once.

How one launch covers many blocks: a table of the blocks' data pointers (int64; copied to the device
again only when a pointer changed, e.g. gradients reallocated by ``zero_grad(set_to_none=True)``) and,
cached per list of block sizes, the block and first element of every program (``ITERS`` chunks of
``BLOCK`` elements each). Every program keeps its float64 summands per lane over its chunks and writes
their sums into its own slot; a second kernel adds the slots of each block in a fixed order, so the results
do not depend on scheduling (no atomics), and a resumed run takes the same bits as an uninterrupted one.

Arithmetic per element, as the C kernels: compute in float32 (float64 for float64 tensors), moments
``m_t = m + (g - m)(1-β1)``, ``v_t = β2 v + (1-β2) g²``, ``s = sqrt(v_t)`` (IEEE-rounded),
``q = m_t / (ε + k1 s max(s, knee))`` (IEEE division), ``θ ← θ·decay + alr·q``; each element's summands are
formed in the compute type and accumulated in float64. The stored (rounded) moments are what is summed
for ``Σ m², Σ v``, by one shared function in both passes.

``TRITON_INTERPRET=1`` runs these kernels on CPU tensors (numpy), which is how they are tested on machines
without a GPU (:class:`TritonSOAA` with ``device_type="cpu"``).

On an H200 (torch 2.11, Triton 3.6) the two passes take 1.34x torch's fused AdamW step in fp32 and 1.71x in
bf16 on 10 x 4096x4096 (``benchmarks/tune_soaa_triton.py``); they are SOAA's default on CUDA.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from lightning_soaa.kernels.raw import own_storage

__all__ = ["TritonSOAA", "TritonUnavailable", "self_check"]

log = logging.getLogger(__name__)

#: elements per chunk, warps per program and chunks per program, timed on an H200 (torch 2.11, Triton 3.6;
#: benchmarks/tune_soaa_triton.py, the two passes alone on 10 x 4096x4096): 1024 elements over 4 warps (8 per
#: thread) 1.34x fused AdamW's step in fp32, 1.71x in bf16; over 8 warps 1.53x / 1.98x; 2048 or 4096
#: elements, or 4-16 chunks per program, 1.38-2.1x. Registers (ptxas for sm_90, fp32 step): 108 at 8 per
#: thread, no spills.
BLOCK = 1024
NUM_WARPS = 4
#: chunks of BLOCK elements per program (each program reduces its float64 sums across threads once)
ITERS = 1
#: block-size lists whose program tables are kept (a step makes one call per pass, dtype and device)
_MAX_LAYOUTS = 64
#: program slots a reduction program adds per iteration
REDUCE_BLOCK = 1024

SUMS_OUT = 2
STEP_OUT = 5
STEP_IN = 8
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_dtype_of = operator.attrgetter("dtype")
_is_contiguous = operator.methodcaller("is_contiguous")
_data_ptr = operator.methodcaller("data_ptr")
_numel = operator.methodcaller("numel")


class TritonUnavailable(RuntimeError):
    """Triton cannot run here (not installed, or no device it supports)."""


try:  # optional: only GPU users need it, and it is heavy to import
    import triton  # type: ignore[import-not-found, import-untyped, unused-ignore]
    import triton.language as tl  # type: ignore[import-not-found, import-untyped, unused-ignore]
except ImportError:  # pragma: no cover - depends on the machine
    triton = tl = None

if triton is not None:
    # Triton resolves the names a kernel calls among its module's globals: the kernels live at module level.
    # No type annotations other than tl.constexpr: compiled (not interpreted) kernels may not read globals
    # such as typing.Any.
    @triton.jit
    def moment_terms(m, v):
        # the float64 summands of Σ m², Σ v of the stored moments, shared by both passes (each adds them in
        # the same order over the same program layout): the same bits for the same moments
        return (m * m).to(tl.float64), v.to(tl.float64)

    @triton.jit
    def sqrt_div(vt, mt, eps, k1, knee, COMPUTE: tl.constexpr):
        # s = sqrt(v_t), q = m_t / (ε + k1 s max(s, knee)), both IEEE-rounded (as torch's CUDA ops): the
        # *_rn forms for float32; float64's sqrt and division are IEEE-rounded already
        if COMPUTE == tl.float64:
            s = tl.sqrt(vt)
            q = mt / (eps + k1 * tl.maximum(s, knee) * s)
        else:
            s = tl.sqrt_rn(vt)
            q = tl.div_rn(mt, eps + k1 * tl.maximum(s, knee) * s)
        return s, q

    @triton.jit
    def to_storage(x, DTYPE: tl.constexpr):
        # float32 -> bfloat16 rounded to nearest even in integer arithmetic (a NaN stays a quiet NaN), the
        # same bits as torch and the C kernels on every backend (Triton's interpreter truncates)
        if DTYPE == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            nan = (u & 0x7FFFFFFF) > 0x7F800000
            bits = tl.where(nan, (u >> 16) | 0x40, rounded)
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(DTYPE)

    @triton.jit
    def block_ptr(tab, blk, col: tl.constexpr, cols: tl.constexpr, DTYPE: tl.constexpr):
        return tl.load(tab + blk * cols + col).to(tl.pointer_type(DTYPE))

    @triton.jit
    def program_span(tab, prog_blk, prog_lo, cols: tl.constexpr):
        # this program's block, its first element and the block's length (the table's last column)
        pid = tl.program_id(0)
        blk = tl.load(prog_blk + pid)
        return pid, blk, tl.load(prog_lo + pid), tl.load(tab + blk * cols + cols - 1)

    @triton.jit
    def chunk(lo, n, i, BLOCK: tl.constexpr):
        # the elements of iteration i of a program that starts at lo, and their mask
        offs = lo + i * BLOCK + tl.arange(0, BLOCK)
        return offs, offs < n

    @triton.jit
    def load_col(tab, blk, col: tl.constexpr, cols: tl.constexpr, offs, mask, DTYPE: tl.constexpr,
                 COMPUTE: tl.constexpr):
        return tl.load(block_ptr(tab, blk, col, cols, DTYPE) + offs, mask=mask, other=0.0).to(COMPUTE)

    # A program covers ITERS chunks of BLOCK elements of one block and keeps its float64 summands in
    # per-lane accumulators, reduced across its threads once at the end (a cross-warp float64 reduction per
    # chunk, five of them in the step, is what a program of one chunk pays per BLOCK elements).
    # nprog is never specialised (Triton compiles a variant for a value of 1 and for multiples of 16):
    # one binary per dtype, which the check before first use compiles, so no compiler runs mid-step; the
    # storage dtype is a constexpr rather than a typed pointer argument for the same reason (alignment)

    @triton.jit(do_not_specialize=["nprog"])
    def sums_kernel(tab, modes, prog_blk, prog_lo, part, nprog, DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
                    BLOCK: tl.constexpr, ITERS: tl.constexpr) -> None:
        pid, blk, lo, n = program_span(tab, prog_blk, prog_lo, 4)
        acc0 = tl.zeros([BLOCK], dtype=tl.float64)
        acc1 = tl.zeros([BLOCK], dtype=tl.float64)
        if tl.load(modes + blk) == 0:
            for i in range(ITERS):
                offs, mask = chunk(lo, n, i, BLOCK)
                m = load_col(tab, blk, 1, 4, offs, mask, DTYPE, COMPUTE)
                t0, t1 = moment_terms(m, load_col(tab, blk, 2, 4, offs, mask, DTYPE, COMPUTE))
                acc0 += t0
                acc1 += t1
        else:
            for i in range(ITERS):
                offs, mask = chunk(lo, n, i, BLOCK)
                m = load_col(tab, blk, 1, 4, offs, mask, DTYPE, COMPUTE)
                g = load_col(tab, blk, 0, 4, offs, mask, DTYPE, COMPUTE)
                acc0 += (m * g).to(tl.float64)
                acc1 += (g * g).to(tl.float64)
        tl.store(part + pid, tl.sum(acc0, axis=0))
        tl.store(part + nprog + pid, tl.sum(acc1, axis=0))

    @triton.jit
    def step_chunk(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, a, b2, b2c, decay, alr, k1, knee, eps,
                   DTYPE: tl.constexpr, COMPUTE: tl.constexpr):
        # one chunk's update in place; its float64 summands [m q, (s q)², s < knee, m², v]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        mt = m + (g - m) * a
        vt = v * b2 + g * g * b2c
        s, q = sqrt_div(vt, mt, eps, k1, knee, COMPUTE)
        q = tl.where(mask, q, 0.0)  # padding lanes: 0/ε, or 0/0 with ε = 0
        ms, vs = to_storage(mt, DTYPE), to_storage(vt, DTYPE)
        tl.store(m_ptr + offs, ms, mask=mask)
        tl.store(v_ptr + offs, vs, mask=mask)
        tl.store(p_ptr + offs, to_storage(p * decay + alr * q, DTYPE), mask=mask)
        sq = s * q
        t3, t4 = moment_terms(ms.to(COMPUTE), vs.to(COMPUTE))
        below = tl.where(mask & (s < knee), 1.0, 0.0).to(tl.float64)
        return (mt * q).to(tl.float64), (sq * sq).to(tl.float64), below, t3, t4

    @triton.jit(do_not_specialize=["nprog"])
    def step_kernel(tab, scal, prog_blk, prog_lo, part, nprog, DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
                    BLOCK: tl.constexpr, ITERS: tl.constexpr) -> None:
        pid, blk, lo, n = program_span(tab, prog_blk, prog_lo, 5)
        sc = scal + blk * 8
        a, b2, b2c = tl.load(sc).to(COMPUTE), tl.load(sc + 1).to(COMPUTE), tl.load(sc + 2).to(COMPUTE)
        decay, alr = tl.load(sc + 3).to(COMPUTE), tl.load(sc + 4).to(COMPUTE)
        k1, knee, eps = tl.load(sc + 5).to(COMPUTE), tl.load(sc + 6).to(COMPUTE), tl.load(sc + 7).to(COMPUTE)
        p_ptr, g_ptr = block_ptr(tab, blk, 0, 5, DTYPE), block_ptr(tab, blk, 1, 5, DTYPE)
        m_ptr, v_ptr = block_ptr(tab, blk, 2, 5, DTYPE), block_ptr(tab, blk, 3, 5, DTYPE)
        acc0 = tl.zeros([BLOCK], dtype=tl.float64)
        acc1 = tl.zeros([BLOCK], dtype=tl.float64)
        acc2 = tl.zeros([BLOCK], dtype=tl.float64)
        acc3 = tl.zeros([BLOCK], dtype=tl.float64)
        acc4 = tl.zeros([BLOCK], dtype=tl.float64)
        for i in range(ITERS):
            offs, mask = chunk(lo, n, i, BLOCK)
            t0, t1, t2, t3, t4 = step_chunk(p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, a, b2, b2c, decay, alr,
                                            k1, knee, eps, DTYPE, COMPUTE)
            acc0 += t0
            acc1 += t1
            acc2 += t2
            acc3 += t3
            acc4 += t4
        tl.store(part + pid, tl.sum(acc0, axis=0))
        tl.store(part + nprog + pid, tl.sum(acc1, axis=0))
        tl.store(part + 2 * nprog + pid, tl.sum(acc2, axis=0))
        tl.store(part + 3 * nprog + pid, tl.sum(acc3, axis=0))
        tl.store(part + 4 * nprog + pid, tl.sum(acc4, axis=0))

    @triton.jit(do_not_specialize=["nprog"])
    def reduce_kernel(part, first, out, nprog, K: tl.constexpr,
                      BLOCK: tl.constexpr) -> None:
        # the slots of block b, output k, added in one fixed order (no atomics): deterministic
        b = tl.program_id(0)
        k = tl.program_id(1)
        lo = tl.load(first + b)
        hi = tl.load(first + b + 1)
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(part + k * nprog + offs, mask=offs < hi, other=0.0)
        tl.store(out + b * K + k, tl.sum(acc, axis=0))


#: torch dtype -> the Triton element type the kernels load and store
_TL_DTYPES: dict[torch.dtype, Any] = (
    {} if tl is None else
    {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float64: tl.float64})


class _Layout:
    """Per list of block sizes, on one device: every program's block and first element (``span``
    elements each), and each block's first program (``first[b]..first[b+1]``)."""

    def __init__(self, sizes: tuple[int, ...], device: torch.device, span: int) -> None:
        counts = [max(1, -(-n // span)) for n in sizes]  # an empty block still gets one (masked) program
        self.nprog = sum(counts)
        blk = list(itertools.chain.from_iterable(itertools.repeat(b, c) for b, c in enumerate(counts)))
        lo = list(itertools.chain.from_iterable(range(0, c * span, span) for c in counts))
        first = [0, *itertools.accumulate(counts)]
        self.prog_blk = torch.tensor(blk, dtype=torch.int32).to(device)
        self.prog_lo = torch.tensor(lo, dtype=torch.int64).to(device)
        self.first = torch.tensor(first, dtype=torch.int64).to(device)


class TritonSOAA:
    """The two passes on one kind of device (``"cuda"``; ``"cpu"`` only under ``TRITON_INTERPRET=1``,
    for tests). Same interface as :class:`lightning_soaa.kernels.soaa_native.NativeSOAA`."""

    SUMS_MOMENTS = 0
    SUMS_GM = 1

    def __init__(self, device_type: str = "cuda", block: int = BLOCK, iters: int = ITERS,
                 num_warps: int = NUM_WARPS) -> None:
        self.device_type = device_type
        # a program's shape: its chunk (a power of two), chunks per program, warps; every pass and the
        # check before first use run with the same shape (both passes' Σ m², Σ v must agree to the bit)
        self.block, self.iters, self.num_warps = block, iters, num_warps
        if triton is None:
            raise ImportError("No module named 'triton'")
        self._kernels = {"sums": sums_kernel, "step": step_kernel}
        self._layouts: dict[tuple[torch.device, tuple[int, ...]], _Layout] = {}
        self._checked: dict[tuple[torch.device, torch.dtype], bool] = {}
        self._tables: dict[tuple[Any, ...], tuple[tuple[int, ...], Tensor]] = {}

    @classmethod
    def load(cls) -> TritonSOAA:
        """The kernels for CUDA tensors; :class:`TritonUnavailable` when Triton or CUDA is missing."""
        if not torch.cuda.is_available():
            raise TritonUnavailable("no CUDA device")
        try:
            return cls("cuda")
        except ImportError as e:
            raise TritonUnavailable(f"Triton is not installed ({e})") from e

    def accepts(self, *ts: Tensor) -> bool:
        dtype = ts[0].dtype
        if dtype not in _DTYPES:
            return False
        dev = ts[0].device
        for t in ts:
            if not (t.device == dev and t.device.type == self.device_type and t.dtype == dtype
                    and t.is_contiguous()):
                return False
        return own_storage(ts) and self._verified(dev, dtype)

    def accepts_all(self, *lists: list[Tensor]) -> bool:
        """:meth:`accepts` for every block at once (one dtype and one device for all)."""
        if not lists[0] or lists[0][0].dtype not in _DTYPES:
            return False
        every = list(itertools.chain.from_iterable(lists))
        dev = lists[0][0].device
        return (dev.type == self.device_type and {t.device for t in every} == {dev}
                and set(map(_dtype_of, every)) == {lists[0][0].dtype} and all(map(_is_contiguous, every))
                and own_storage(every) and self._verified(dev, lists[0][0].dtype))

    def _verified(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether the kernels, compiled for this device and dtype, agree with eager torch arithmetic
        (checked once each, before any training tensor goes through them: a compiler or driver that
        builds them wrongly, or not at all, sends SOAA to the eager path instead of training on wrong
        values)."""
        key = (device, dtype)
        if key not in self._checked:
            why = self_check(self, device, dtype)
            if why is not None:
                log.warning("SOAA: the Triton kernels failed their check on %s %s (%s); those blocks take the "
                            "eager (foreach) path, or the torch.compile'd one under compile=True", device, dtype,
                            why)
            self._checked[key] = why is None
        return self._checked[key]

    def _layout(self, sizes: tuple[int, ...], device: torch.device) -> _Layout:
        key = (device, sizes)
        hit = self._layouts.get(key)
        if hit is None:
            if len(self._layouts) >= _MAX_LAYOUTS:  # a step makes the same few calls: only a new model gets here
                self._layouts.clear()
            hit = self._layouts[key] = _Layout(sizes, device, self.block * self.iters)
        return hit

    def _table(self, kind: str, cols: list[list[Tensor]], sizes: tuple[int, ...], device: torch.device) -> Tensor:
        """The blocks' data pointers and sizes on the device: copied again only when one of them changed
        (``zero_grad(set_to_none=True)`` reallocates gradients, mostly at the same addresses)."""
        rows = [list(map(_data_ptr, c)) for c in cols]
        flat = tuple(itertools.chain.from_iterable(zip(*rows, sizes)))
        key = (kind, device, cols[0][0].dtype, sizes)  # a step makes one call per pass and dtype
        hit = self._tables.get(key)
        if hit is not None and hit[0] == flat:
            return hit[1]
        if len(self._tables) >= _MAX_LAYOUTS:
            self._tables.clear()
        table = torch.tensor(flat, dtype=torch.int64).to(device, non_blocking=True)
        self._tables[key] = (flat, table)
        return table

    def _run(self, kernel: str, k: int, args: tuple[Any, ...], like: Tensor, lay: _Layout) -> list[list[float]]:
        """One pass (``args`` before the partials) and its per-block reduction; ``k`` outputs per block."""
        part = torch.empty(k * lay.nprog, dtype=torch.float64, device=like.device)
        nb = lay.first.numel() - 1
        out = torch.empty(nb * k, dtype=torch.float64, device=like.device)
        compute = tl.float64 if like.dtype == torch.float64 else tl.float32
        # no fused multiply-adds: the same bits as eager torch and the C kernels (Triton fuses by default)
        fusion = {"enable_fp_fusion": False}
        # Triton launches on the current device: make it the tensors' (a model split over GPUs)
        with torch.cuda.device(like.device) if like.is_cuda else contextlib.nullcontext():
            self._kernels[kernel][(lay.nprog,)](*args, lay.prog_blk, lay.prog_lo, part, lay.nprog,
                                                DTYPE=_TL_DTYPES[like.dtype], COMPUTE=compute,
                                                BLOCK=self.block, ITERS=self.iters, num_warps=self.num_warps,
                                                **fusion)
            reduce_kernel[(nb, k)](part, lay.first, out, lay.nprog, K=k, BLOCK=REDUCE_BLOCK, **fusion)
        values = out.tolist()  # the pass's one wait for the device
        return [values[i:i + k] for i in range(0, len(values), k)]

    def sums(self, g: list[Tensor], m: list[Tensor], v: list[Tensor], modes: list[int],
             scal: Sequence[float] | None = None) -> list[list[float]]:
        """Per block (reads only): mode ``SUMS_MOMENTS`` ``[Σ m², Σ v]`` of the stored moments (the same
        arithmetic as :meth:`step` returns for them), mode ``SUMS_GM`` ``[Σ m g, Σ g²]``. ``scal`` is
        not needed (the interface's). The caller has checked the blocks with :meth:`accepts`."""
        del scal
        return self.run_sums(g, m, v, modes)

    def step(self, p: list[Tensor], g: list[Tensor], m: list[Tensor], v: list[Tensor],
             scal: Sequence[Sequence[float]]) -> list[list[float]]:
        """m, v, θ in place (their autograd versions bumped once); per block ``[Σ m q, Σ (s q)²,
        #(s < knee), Σ m², Σ v]`` of the new moments. ``scal[b] = (1-β1, β2, 1-β2, decay, alr, k1, knee,
        ε)``. The caller has checked the blocks with :meth:`accepts`."""
        # the kernel writes through raw pointers: tell autograd, as an in-place op would
        increment_version([*p, *m, *v])
        return self.run_step(p, g, m, v, scal)

    def run_sums(self, g: list[Tensor], m: list[Tensor], v: list[Tensor], modes: list[int]) -> list[list[float]]:
        """The sums pass without the checks of :meth:`accepts`."""
        sizes = tuple(map(_numel, g))
        dev = g[0].device
        lay = self._layout(sizes, dev)
        tab = self._table("sums", [g, m, v], sizes, dev)
        modes_t = torch.tensor(modes, dtype=torch.int32).to(dev, non_blocking=True)
        return self._run("sums", SUMS_OUT, (tab, modes_t), g[0], lay)

    def run_step(self, p: list[Tensor], g: list[Tensor], m: list[Tensor], v: list[Tensor],
                 scal: Sequence[Sequence[float]]) -> list[list[float]]:
        """The step pass without the checks of :meth:`accepts` and without the version bump."""
        sizes = tuple(map(_numel, p))
        dev = p[0].device
        lay = self._layout(sizes, dev)
        tab = self._table("step", [p, g, m, v], sizes, dev)
        sc = torch.tensor(list(itertools.chain.from_iterable(scal)), dtype=torch.float64).to(dev, non_blocking=True)
        return self._run("step", STEP_OUT, (tab, sc), p[0], lay)


# ---------------------------------------------------------------- the check before first use
_CHECK_SCAL = (0.1, 0.95, 0.05, 0.999, -1e-2, 2.0, 0.3, 1e-8)  # (1-β1, β2, 1-β2, decay, alr, k1, knee, ε)
#: relative tolerance of the check's sums: the summands are the same numbers (no fused multiply-add, IEEE
#: sqrt and division), only their float64 addition order differs
_CHECK_SUMS_RTOL = 1e-9


def _sqrt_rn(x: Tensor) -> Tensor:
    """The IEEE-rounded float64 square root. torch's float64 ``sqrt`` on CPU is not always correctly
    rounded (5 of 2051 random values off by one ulp, torch 2.13), CUDA's is; the CPU is only the
    interpreter's tests, on a few thousand values: Python's ``math.sqrt`` (IEEE) per element."""
    if not x.is_cpu:
        return x.sqrt()
    return torch.tensor([math.sqrt(e) if e >= 0 else math.nan for e in x.tolist()], dtype=x.dtype).view_as(x)


def _reference_step(p: Tensor, g: Tensor, m: Tensor, v: Tensor, scal: Sequence[float] = _CHECK_SCAL
                    ) -> tuple[list[Tensor], list[float]]:
    """The step's arithmetic as the kernels define it, in eager torch: every operation rounded to the compute
    type (float32, or float64 for float64 tensors), with nothing fused; new θ, m, v and the five sums.

    Evaluated in float64 and rounded after each operation: for float32 operands that is exactly the IEEE
    float32 result (double rounding is innocuous for +, -, *, / and sqrt at these precisions), which torch's
    own float32 CPU ``sqrt`` is not (it differs in the last place for ~1 in 5 values)."""
    ct = torch.float64 if p.dtype == torch.float64 else torch.float32

    def r(x: Tensor) -> Tensor:
        return x.to(ct).to(torch.float64)

    a, b2, b2c, decay, alr, k1, knee, eps = (r(torch.tensor(x, dtype=torch.float64, device=p.device)) for x in scal)
    g_, m_, v_, p_ = (r(x) for x in (g, m, v, p))
    mt = r(m_ + r(r(g_ - m_) * a))
    vt = r(r(v_ * b2) + r(r(g_ * g_) * b2c))
    s = r(_sqrt_rn(vt))
    q = r(mt / r(eps + r(r(k1 * torch.maximum(s, knee)) * s)))
    ms, vs = mt.to(p.dtype), vt.to(p.dtype)  # mt, vt hold compute-type values: one rounding, as the kernels'
    sq = r(s * q)
    msc = r(ms)
    sums = [r(mt * q).sum(), r(sq * sq).sum(), (s < knee).double().sum(), r(msc * msc).sum(), r(vs).sum()]
    return [r(r(p_ * decay) + r(alr * q)).to(p.dtype), ms, vs], [float(x) for x in sums]


def self_check(kernels: TritonSOAA, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when both passes agree with :func:`_reference_step` on this device and dtype (two blocks,
    one over several programs and ending inside a program's second chunk, one smaller than a chunk): θ, m,
    v to the bit, the sums to rounding of their addition, the sums pass's Σ m², Σ v of the moments the step
    stored equal to the step's; else what went wrong. Compiles the kernels this device and dtype will run
    (no other variant exists)."""
    gen = torch.Generator().manual_seed(0)
    sizes = (2 * kernels.block * kernels.iters + kernels.block + 3, 5)

    def draw() -> list[Tensor]:
        return [torch.randn(n, generator=gen, dtype=torch.float64).to(device, dtype) for n in sizes]

    p, g, m = draw(), draw(), draw()
    v = [x.abs() for x in draw()]
    try:
        gm = kernels.run_sums(g, m, v, [TritonSOAA.SUMS_GM] * len(sizes))
        new = [[x.clone() for x in xs] for xs in (p, g, m, v)]
        rows = kernels.run_step(new[0], new[1], new[2], new[3], [_CHECK_SCAL] * len(sizes))
        moments = kernels.run_sums(new[1], new[2], new[3], [TritonSOAA.SUMS_MOMENTS] * len(sizes))
    except Exception as e:  # noqa: BLE001 - any build or launch failure means: do not use them
        return f"{type(e).__name__}: {e}"
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    for i in range(len(sizes)):
        want, sums = _reference_step(p[i], g[i], m[i], v[i])
        for name, got, ref in zip(("theta", "m", "v"), (new[0][i], new[2][i], new[3][i]), want):
            if not torch.equal(got, ref):
                return f"{name} of block {i} differs from eager torch"
        # the products rounded to the compute type, as the kernel forms them, then summed in float64
        mg = float((m[i].to(ct) * g[i].to(ct)).double().sum())
        g2 = float((g[i].to(ct) * g[i].to(ct)).double().sum())
        for got_s, ref_s in [*zip(rows[i], sums), (gm[i][0], mg), (gm[i][1], g2)]:
            if not math.isclose(got_s, ref_s, rel_tol=_CHECK_SUMS_RTOL, abs_tol=1e-12):
                return f"the sums of block {i} differ from eager torch ({got_s} vs {ref_s})"
        # a resumed run reads Σ m², Σ v by the sums pass: the step's own values to the bit, or it diverges
        if moments[i] != rows[i][3:]:
            return f"the sums pass's Σ m², Σ v of block {i} differ from the step's ({moments[i]} vs {rows[i][3:]})"
    return None
