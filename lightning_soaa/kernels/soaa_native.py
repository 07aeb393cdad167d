"""SOAA's two elementwise passes on CPU as hand-written C loops (``soaa_cpu.c``), one sweep each.

Why not only ``torch.compile``: inductor's CPU code for the step, once the kernel also reduces, stores
the new moments into temporaries and copies them back in two more loops, so the update sums cost a
second read of m and v (48 B/param in fp32 against fused AdamW's 28 B). The C step updates θ, m, v in
place and accumulates the update sums in the same loop: 8 B (sums, reads only) + 28 B (step) = 36 B.

The library is compiled at first use with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``;
``-O3 -march=native -ffp-contract=off -pthread``, and ``-fopenmp`` or ``-fopenmp-simd``, below; no fused
multiply-adds, so that the two loops that sum the stored moments take the same bits) into a cache
directory (``$LIGHTNING_SOAA_CACHE``, else ``~/.cache/lightning_soaa``), keyed by the source, the flags,
the compiler, the CPU and the OpenMP runtime linked, so a shared home directory on a cluster of
different CPUs never loads a build for another CPU. Compiling takes about a second; a second
process finds the build. Without a compiler, :meth:`NativeSOAA.load` raises :class:`NativeUnavailable`
and the caller uses its other kernels.

Threads: each call uses up to ``torch.get_num_threads()`` threads (one per 2**18 elements at most).
Where torch runs on GNU OpenMP (its Linux builds), the library is compiled with ``-fopenmp`` and linked
against the very ``libgomp`` file torch loaded, so calls run on torch's own pool: that pool's workers
spin-wait after torch's ops on the cores threads of our own would need (measured on 2 cores, 10 x 1M
fp32, steps alternating with fused AdamW's: SOAA's step 2.2-2.7x fused AdamW's on its own pthreads,
1.5x on the pool). If that build fails or cannot load, and in a forked child (where the parent's pool
would hang), calls start and join pthreads of their own. Sums are deterministic for any thread count
(fixed chunks added in order by one thread; see the C source).

Nothing here is global: :meth:`NativeSOAA.load` returns an object the caller keeps (the optimizer's
:class:`~lightning_soaa.functional.soaa.SOAAKernels`, which only sees its ``FusedPasses`` protocol:
compilers, caches and ctypes stay out of ``functional/``).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import functools
import hashlib
import itertools
import logging
import operator
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_soaa.kernels import forks
from lightning_soaa.kernels.raw import own_storage

log = logging.getLogger(__name__)

__all__ = ["NativeSOAA", "NativeUnavailable", "build_library", "int_array", "out_array", "pointers"]

_SOURCE = Path(__file__).with_name("soaa_cpu.c")
_ABI = 7
_BASE_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-std=gnu11", "-shared", "-fPIC",
               "-pthread")
# Without torch's OpenMP runtime to link (see _compile): -fopenmp-simd, the `omp simd` lane loops
# vectorise with no runtime (threads are pthreads started per call); a compiler without it builds plain loops.
_TRIES = (("-fopenmp-simd",), ())
_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}


class NativeUnavailable(RuntimeError):
    """The C kernels cannot be built or loaded here (the message says why)."""


class _NoCompiler(NativeUnavailable):
    """No C compiler: neither build can be made (said once, by the caller that falls back to eager)."""


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    raise _NoCompiler("no C compiler found (set CC, or install cc/gcc/clang)")


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("flags", "model name", "Features"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _cache_dir() -> Path:
    root = os.environ.get("LIGHTNING_SOAA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lightning_soaa")
    return Path(root)


def _mapped_file(address: int | None) -> Path | None:
    """The file mapped at ``address`` in this process (``/proc/self/maps``), or None."""
    if not address:
        return None
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for ln in lines:
        fields = ln.split(maxsplit=5)
        lo, _, hi = fields[0].partition("-")
        if len(fields) == 6 and int(lo, 16) <= address < int(hi, 16):
            return Path(fields[5])
    return None


def _runtime_of(lib: ctypes.CDLL) -> Path | None:
    """The file that provides ``omp_get_thread_num`` to ``lib`` (dlsym on a library handle searches
    the library, then what it was linked against, as its own calls are bound)."""
    try:
        return _mapped_file(ctypes.cast(lib.omp_get_thread_num, ctypes.c_void_p).value)
    except AttributeError:
        return None


def _openmp_runtime() -> Path | None:
    """The GNU OpenMP runtime (``libgomp``) that torch's own parallel ops run on in this process, or None
    (torch built with another runtime or none, not Linux)."""
    torch_cpu = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        lib = ctypes.CDLL(str(torch_cpu), mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_LOCAL)
    except OSError:
        return None
    runtime = _runtime_of(lib)
    return runtime if runtime is not None and runtime.name.startswith("libgomp") else None


class _NotWritable(OSError):
    """The cache directory cannot take a build."""


def _run(cmd: list[str], source: bytes | None = None) -> str | None:
    """None when the command succeeded, else the tail of its error output (never empty)."""
    proc = subprocess.run(cmd, input=source, capture_output=True, timeout=120, check=False)
    if proc.returncode == 0:
        return None
    return proc.stderr.decode(errors="replace").strip()[-400:] or f"exit status {proc.returncode}"


class _LinkRefused(NativeUnavailable):
    """The pool build compiled but cannot link against the runtime: undefined OpenMP symbols (GNU ld's
    "undefined reference", lld's "undefined symbol"; e.g. clang's -fopenmp calls __kmpc_*). A property of
    this compiler and runtime, not of the moment: remembered, unlike a killed compiler or a full disk."""


def _compile(cc: str, source: bytes, out: Path, runtime: Path | None, flags: Sequence[str] = _BASE_FLAGS,
             tries: Sequence[tuple[str, ...]] = _TRIES, what: str = "the SOAA CPU kernels") -> None:
    """Build into ``out`` atomically (a concurrent process sees either no file or a whole one).

    With ``runtime``: compiled with ``-fopenmp`` and linked against that file only (not the compiler's
    own ``-lgomp``), so the loader binds it to the runtime already in the process, torch's pool. Without it,
    ``flags`` plus each of ``tries`` in turn until one builds (``what``: the library, for the error)."""
    errors = []
    for extra in (("-fopenmp",),) if runtime is not None else tries:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
        except OSError as e:
            raise _NotWritable(str(e)) from e
        obj = tmp + ".o"
        try:
            if runtime is None:
                error = _run([cc, *flags, *extra, "-x", "c", "-", "-o", tmp, "-lm"], source)
            else:
                error = _run([cc, *flags, *extra, "-c", "-x", "c", "-", "-o", obj], source)
                if error is None:
                    error = _run([cc, "-shared", "-fPIC", "-pthread", "-Wl,-z,defs", obj, str(runtime), "-o", tmp,
                                  "-lm"])
                    if error is not None and ("undefined reference" in error or "undefined symbol" in error):
                        raise _LinkRefused(f"{cc} cannot link the SOAA CPU kernels against {runtime}: {error}")
            if error is None:
                os.replace(tmp, out)
                return
            errors.append(error)
        finally:  # a failed link may already have removed tmp; an interrupted build leaves nothing
            for leftover in (tmp, obj):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
    raise NativeUnavailable(f"{cc} could not build {what}: {errors[-1]}")


def build_library(stem: str, source: bytes, flags: Sequence[str], what: str) -> Path:
    """A plain C library (no OpenMP runtime) built once into the kernel cache, keyed by the source, the flags,
    the compiler and the machine, as ``<stem>-<key>.so``; into a directory of this process only when the cache
    cannot take it. For other kernels than SOAA's (ASGO's spectral map: kernels/asgo_native.py)."""
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, timeout=30, check=False).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), cc.encode(), version,
                                     platform.machine().encode()])).hexdigest()[:20]
    lib = _cache_dir() / f"{stem}-{key}.so"
    if lib.exists():
        return lib
    try:
        _compile(cc, source, lib, None, flags, ((),), what)
    except _NotWritable:  # read-only or missing home: build for this process only
        lib = Path(tempfile.mkdtemp(prefix="lightning_soaa-")) / lib.name
        _compile(cc, source, lib, None, flags, ((),), what)
    return lib


def _build(runtime: Path | None) -> Path:
    cc = _compiler()
    source = _SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, timeout=30, check=False).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(_BASE_FLAGS).encode(), cc.encode(), version,
                                     _cpu_id().encode(), str(runtime or "").encode()])).hexdigest()[:20]
    lib = _cache_dir() / f"soaa_cpu-{key}.so"
    if lib.exists():
        return lib
    refused = lib.with_suffix(".failed")  # the linker's refusal, not tried again (see _LinkRefused)
    try:
        why = refused.read_text()
    except (OSError, UnicodeDecodeError):  # none (the usual case) or unreadable: try to build
        why = None
    if why is not None:
        raise NativeUnavailable(f"an earlier build was refused ({refused}): {why}")
    try:
        try:
            _compile(cc, source, lib, runtime)
        except _NotWritable as e:  # read-only or missing home: build for this process only
            lib = Path(tempfile.mkdtemp(prefix="lightning_soaa-")) / lib.name
            log.info("SOAA: cache directory not writable (%s); building in %s", e, lib.parent)
            _compile(cc, source, lib, runtime)
    except _LinkRefused as e:
        with contextlib.suppress(OSError):
            refused.write_text(str(e))
        raise
    return lib


def _load_pool_build() -> ctypes.CDLL | None:
    """The build on torch's OpenMP pool, or None (no such runtime here, or it does not build or load)."""
    runtime = _openmp_runtime()
    if runtime is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(runtime)))
    except (OSError, NativeUnavailable, subprocess.SubprocessError) as e:
        # without a compiler the other build fails too, and the fallback to the eager path says so once
        (log.debug if isinstance(e, _NoCompiler) else log.warning)(
            "SOAA: C kernels on torch's OpenMP pool unavailable (%s); using threads of their own", e)
        return None
    if _runtime_of(lib) != runtime:  # bound to another runtime than torch's: keep off its pool
        lib.soaa_cpu_forked()
    return lib


def _bind(lib: ctypes.CDLL) -> None:
    """Check the library. Arguments are passed without ctypes ``argtypes`` (each conversion check costs
    more than a small model's whole kernel): every call site below builds exactly the C types of
    ``soaa_cpu.c`` (int; arrays of void*, int64, int, double)."""
    if lib.soaa_cpu_abi() != _ABI:
        raise NativeUnavailable(f"stale SOAA kernel library (ABI {lib.soaa_cpu_abi()}, expected {_ABI})")
    for suffix in _SUFFIX.values():
        for name in ("sums", "step"):
            getattr(lib, f"soaa_{name}_{suffix}").restype = ctypes.c_int


_data_ptr = Tensor.data_ptr
_numel = Tensor.numel
_is_contiguous = Tensor.is_contiguous
_dtype_of = operator.attrgetter("dtype")
_is_cpu = operator.attrgetter("is_cpu")


def _rows(flat: ctypes.Array[ctypes.c_double], k: int) -> list[list[float]]:
    values = flat[:]  # one C-level copy into a list (iterating a ctypes array is ~20x slower)
    return [values[i:i + k] for i in range(0, len(values), k)]


class NativeSOAA:
    """The loaded C kernels. :meth:`accepts` says which blocks they take (CPU, contiguous, one of
    float32/float64/bfloat16, same dtype); each pass is one call for a list of blocks of one dtype and
    returns plain Python floats per block."""

    SUMS_MOMENTS, SUMS_GM = 0, 1  # the sums modes (see soaa_cpu.c)

    def __init__(self, lib: ctypes.CDLL) -> None:
        _bind(lib)
        self._lib = lib
        self._fns = {(name, dt): getattr(lib, f"soaa_{name}_{sfx}") for dt, sfx in _SUFFIX.items()
                     for name in ("sums", "step")}
        # The argument arrays of the last call per (pass, role), reused while their values are equal: a
        # training loop calls with the same blocks at every step. Keyed by the values themselves (the
        # addresses and sizes read at this call), so a tensor that moved or changed size gets a new array.
        self._arrays: dict[tuple[str, str], tuple[tuple[Any, ...], ctypes.Array[Any]]] = {}

    def _array(self, slot: tuple[str, str], ctype: Any, values: tuple[Any, ...]) -> ctypes.Array[Any]:
        hit = self._arrays.get(slot)
        if hit is not None and hit[0] == values:
            return hit[1]
        arr = (ctype * len(values))(*values)
        self._arrays[slot] = (values, arr)
        return arr

    def _pointers(self, slot: tuple[str, str], ts: list[Tensor]) -> ctypes.Array[ctypes.c_void_p]:
        return self._array(slot, ctypes.c_void_p, tuple(map(_data_ptr, ts)))

    @property
    def on_pool(self) -> bool:
        """Whether calls run on torch's OpenMP pool (else on threads of their own; always after a fork)."""
        return bool(self._lib.soaa_cpu_pool())

    @classmethod
    def load(cls) -> NativeSOAA:
        """Build (or find the cached build of) the kernels and load them; :class:`NativeUnavailable`
        when this machine cannot."""
        try:
            lib = _load_pool_build() or ctypes.CDLL(str(_build(None)))
            # a library loaded before a fork learns of it from its own pthread_atfork handler; one loaded
            # in a fork now (see lightning_soaa.kernels.forks)
            if forks.forked():
                lib.soaa_cpu_forked()
            return cls(lib)
        except (OSError, subprocess.SubprocessError, AttributeError) as e:
            raise NativeUnavailable(f"{type(e).__name__}: {e}") from e

    @staticmethod
    def accepts(*ts: Tensor) -> bool:
        dtype = ts[0].dtype
        if dtype not in _SUFFIX:
            return False
        for t in ts:  # a plain loop: this runs per block and pass, on small models a visible cost
            if not (t.is_cpu and t.dtype == dtype and t.is_contiguous()):
                return False
        return own_storage(ts)

    @staticmethod
    def accepts_all(*lists: list[Tensor]) -> bool:
        """:meth:`accepts` for every block at once (``lists[k][i]`` is block i's k-th tensor): the checks
        run as C-level maps over each list, a few microseconds for a hundred blocks."""
        if not lists[0] or lists[0][0].dtype not in _SUFFIX:
            return False
        every = list(itertools.chain.from_iterable(lists))
        return (set(map(_dtype_of, every)) == {lists[0][0].dtype} and all(map(_is_cpu, every))
                and all(map(_is_contiguous, every)) and own_storage(every))

    def sums(self, g: list[Tensor], m: list[Tensor], v: list[Tensor], modes: list[int]) -> list[list[float]]:
        """Per block (reads only): mode ``SUMS_MOMENTS`` ``[Σ m², Σ v]`` of the stored moments (the same
        bits as :meth:`step` returns for them), mode ``SUMS_GM`` ``[Σ m g, Σ g²]``. One dtype for all
        blocks. No β: the caller weighs the raw sums itself."""
        return self.sums_at(g[0].dtype, self._pointers(("sums", "g"), g), self._pointers(("sums", "m"), m),
                            self._pointers(("sums", "v"), v),
                            self._array(("sums", "n"), ctypes.c_int64, tuple(map(_numel, g))),
                            self._array(("sums", "mode"), ctypes.c_int, tuple(modes)))

    def sums_at(self, dtype: torch.dtype, g: PointerArray, m: PointerArray, v: PointerArray, n: Any,
                modes: Any, out: Any = None) -> list[list[float]]:
        """:meth:`sums` with the blocks given as C arrays (:func:`pointers`; ``n`` int64 sizes, ``modes``
        ints): for a caller that keeps them between steps (SOAA's step plan), which may pass ``out`` too
        (:func:`out_array` of ``2 * len(n)``, overwritten: the results are copied out of it)."""
        nb = len(n)
        if out is None:
            out = out_array(2 * nb)
        if self._fns[("sums", dtype)](nb, g, m, v, n, modes, out, torch.get_num_threads()):
            raise MemoryError("SOAA CPU kernel: out of memory for its per-chunk sums")
        return _rows(out, 2)

    def step(self, p: list[Tensor], g: list[Tensor], m: list[Tensor], v: list[Tensor],
             scal: Sequence[Sequence[float]]) -> list[list[float]]:
        """m, v, θ in place (their autograd versions bumped once, before the loop runs); per block
        ``[Σ m q, Σ (s q)², #(s < knee), Σ m², Σ v]`` of the new moments, from the same sweep.
        ``scal[b] = (1-β1, β2, 1-β2, decay, alr, k1, knee, ε)``."""
        return self.step_at(p[0].dtype, [*p, *m, *v], self._pointers(("step", "p"), p),
                            self._pointers(("step", "g"), g), self._pointers(("step", "m"), m),
                            self._pointers(("step", "v"), v),
                            self._array(("step", "n"), ctypes.c_int64, tuple(map(_numel, p))), scal)

    def step_at(self, dtype: torch.dtype, written: list[Tensor], p: PointerArray, g: PointerArray,
                m: PointerArray, v: PointerArray, n: Any, scal: Sequence[Sequence[float]],
                out: Any = None) -> list[list[float]]:
        """:meth:`step` with the blocks given as C arrays (``written``: the tensors behind ``p``, ``m`` and
        ``v``, whose versions the call bumps; ``out``: as :meth:`sums_at`'s, of ``5 * len(n)``)."""
        nb = len(n)
        if out is None:
            out = out_array(5 * nb)
        rows = _scalar_rows(scal)  # (passed by its address: no ctypes array made; alive until the call returns)
        if len(rows) != 8 * nb:  # the loop reads 8 per block: a short buffer would be read past its end
            raise ValueError(f"SOAA CPU kernel: {len(rows)} step scalars for {nb} blocks; expected 8 per block.")
        sc = ctypes.c_void_p(rows.buffer_info()[0])
        # The loop writes through raw pointers: tell autograd these tensors change, as an in-place torch
        # op would (a graph that saved θ then refuses to backward instead of using the new θ). Done
        # before the loop, while the tensors are in cache (the loop's sweep evicts them); a call that
        # fails (before any write) leaves them bumped, which only makes autograd stricter. (torch's
        # increment_version without its Python frame: a list is what it passes on)
        _increment_version(written)
        if self._fns[("step", dtype)](nb, p, g, m, v, n, sc, out, torch.get_num_threads()):
            raise MemoryError("SOAA CPU kernel: out of memory for its per-chunk sums")
        return _rows(out, 5)


def _scalar_rows(scal: Sequence[Sequence[float]]) -> array.array[float]:
    """The step's scalar rows as one float64 buffer. Through array.array: a ctypes array built from 8 * nb
    arguments costs ~10 us for 6 blocks; where every block has the same row (one step count, the usual case)
    that row repeated, ~1 us against ~9 us for the chained copy on a slow 2-core host."""
    # (native_step_scalars' rows: one tuple per step count; identity, not equality: -0.0 == 0.0; a C-level map)
    if scal and all(map(operator.is_, scal, itertools.repeat(scal[0]))):
        return array.array("d", scal[0]) * len(scal)
    return array.array("d", itertools.chain.from_iterable(scal))


PointerArray = Any  # a ctypes array of void* (from pointers())

_increment_version = torch._C._increment_version


@functools.lru_cache(maxsize=64)
def _double_array(k: int) -> Any:
    """The ctypes type of an array of ``k`` doubles (made once per size)."""
    return ctypes.c_double * k


def out_array(k: int) -> Any:
    """A C array of ``k`` doubles for the passes' results (``out`` of :meth:`NativeSOAA.sums_at` and
    :meth:`NativeSOAA.step_at`)."""
    return _double_array(k)()


def pointers(ts: Sequence[Tensor]) -> PointerArray:
    """The tensors' data addresses as a C array of ``void*`` (for :meth:`NativeSOAA.sums_at` and
    :meth:`NativeSOAA.step_at`; the caller keeps the tensors alive and checked)."""
    return (ctypes.c_void_p * len(ts))(*map(_data_ptr, ts))


def int_array(values: Sequence[int], ctype: Any = ctypes.c_int64) -> Any:
    """``values`` as a C array of ``ctype`` (the sizes, int64, or the sums modes, ``ctypes.c_int``)."""
    return (ctype * len(values))(*values)
