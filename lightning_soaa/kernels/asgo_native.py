"""ASGO's spectral map on the CPU as one C loop (``asgo_map.c``), handed to
:func:`lightning_soaa.functional.linalg.pending_inverse_sqrt` as its ``host_map``.

Why: the eigendecomposition route maps every eigenvalue through the Polar Express recursion (8 iterations and 3
polishing steps: ~60 elementwise operations). As numpy or tensor operations that is ~60 calls whatever the count
of eigenvalues, 10-15% of a small model's step (each call costs microseconds on a CPU); as one C call a few
microseconds. The loop makes the same IEEE double operations in the same order (``-ffp-contract=off``, no
``-ffast-math``), so it gives those evaluations' bits (tests/unit/test_asgo_step_cost.py). The exact half of the
map's scale (each Gram's largest magnitude and its copy divided by that magnitude's power of two,
``NativeSpectralMap.scaled_down``) is one call too: numpy's ~10 calls were ~5% of the report's digits MLP's step.

Built at first use with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``, as the SOAA kernels) into
their cache directory (``$LIGHTNING_SOAA_CACHE``, else ``~/.cache/lightning_soaa``), keyed by the source, the
flags, the compiler and the machine (no ``-march=native``: the loop is too small to gain from it). Without a
compiler, or when the build fails, :func:`spectral_map` returns None and the caller keeps the numpy or tensor
evaluation.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lightning_soaa.kernels.soaa_native import NativeUnavailable, build_library

log = logging.getLogger(__name__)

__all__ = ["NativeSpectralMap", "spectral_map"]

_SOURCE = Path(__file__).with_name("asgo_map.c")
_ABI = 2
_FLAGS = ("-O2", "-ffp-contract=off", "-std=gnu11", "-shared", "-fPIC")

_double_p = ctypes.POINTER(ctypes.c_double)


def _build() -> Path:
    return build_library("asgo_map", _SOURCE.read_bytes(), _FLAGS, "ASGO's spectral map")


class NativeSpectralMap:
    """The loaded loop, called as :data:`lightning_soaa.functional.linalg.HostMap`."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        if lib.asgo_map_abi() != _ABI:
            raise NativeUnavailable(f"stale ASGO map library (ABI {lib.asgo_map_abi()}, expected {_ABI})")
        self._fn = lib.asgo_spectral_map
        self._fn.restype = None
        self._scale_fn = lib.asgo_scaled_down
        self._scale_fn.restype = None
        self._coeffs: tuple[tuple[float, ...], ctypes.Array[ctypes.c_double]] | None = None

    def __call__(self, evals: Tensor, scales: Sequence[float], roots: Sequence[float], coeffs: tuple[float, ...],
                 num_iters: int, floor: float, polish: int) -> tuple[Tensor, list[float]]:
        """``z(max(lam / s, 0)) / root`` of each row of a contiguous float64 CPU ``[n, k]`` (``coeffs``: one
        ``(a, b, c)`` per iteration, flat), as ``[n, 1, k]``, and each row's largest magnitude (NaN with a
        NaN)."""
        rows, k = evals.shape
        out = torch.empty((rows, 1, k), dtype=torch.float64)
        if self._coeffs is None or self._coeffs[0] != coeffs:  # the same at every call of a run
            self._coeffs = (coeffs, (ctypes.c_double * max(len(coeffs), 1))(*coeffs))
        tops = (ctypes.c_double * rows)()
        self._fn(ctypes.c_void_p(evals.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(rows),
                 ctypes.c_int64(k), (ctypes.c_double * rows)(*scales), (ctypes.c_double * rows)(*roots),
                 self._coeffs[1], ctypes.c_int64(num_iters), ctypes.c_double(floor), ctypes.c_int64(polish), tops)
        return out, tops[:]


    def scaled_down(self, v: Tensor) -> tuple[Tensor, list[float], list[float]]:
        """Of a contiguous float64 CPU ``[n, k, k]``: each matrix divided by the power of two of its largest
        magnitude's exponent (a new tensor), those magnitudes and those powers (``asgo_scaled_down``: the bits of
        :func:`lightning_soaa.functional.linalg._spectral_scales`' numpy evaluation in one call instead of ~10)."""
        n, k = v.shape[0], v.shape[-1]
        out = torch.empty_like(v)
        tops, scales = (ctypes.c_double * n)(), (ctypes.c_double * n)()
        self._scale_fn(ctypes.c_void_p(v.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(n),
                       ctypes.c_int64(k), tops, scales)
        return out, tops[:], scales[:]


@functools.cache
def spectral_map() -> NativeSpectralMap | None:
    """The loop, built (or found built) and loaded once per process; None where this machine cannot build it
    (said once, at debug level: the numpy or tensor evaluation gives the same bits)."""
    try:
        return NativeSpectralMap(ctypes.CDLL(str(_build())))
    except (OSError, NativeUnavailable, subprocess.SubprocessError, AttributeError) as e:
        log.debug("ASGO: C spectral map unavailable (%s); using numpy or tensor operations", e)
        return None
