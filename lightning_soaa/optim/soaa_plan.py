"""SOAA's step plan: the blocks of one param group that all went through the C loops at the last step,
kept with what that step left behind, so the next step checks them instead of rebuilding them.

Why: on a small model the step's host work, not its arithmetic, is the cost (a 26k-parameter MLP: ~30 us
in the C loops of a ~220 us step). Most of that work rebuilds the same things at every step: the block
lists, which kernels take which block (a dtype, device, layout and ownership check of every tensor), the
record of the moments' sums that lets the sums pass read only g and m. A plan keeps them and, at the
next step, checks in a few C-level maps that nothing they depend on changed:

* the same blocks (the same parameter views, in order), each with a gradient;
* the same state: the same moment and counter tensors in the blocks' state dicts;
* the moments and step counters exactly as the last step left them: the same autograd versions (every
  in-place torch op, ``copy_`` of a state-dict load included, bumps a tensor's version), the same
  addresses and sizes of the parameters, moments and counters (``p.data = ...`` changes the address
  without a version bump), the parameters contiguous (``p.data = p.data.t()`` keeps address and size), the
  counters' values (a write through ``.data`` or a numpy view bumps no version; the moments' are not
  read, so an edit of the moments must be a torch op on the state tensors themselves);
* gradients the C loops take: the plan's dtype, on the CPU, contiguous, with storage of their own;
* no graph being traced by dynamo (the general path then takes no C loops either).

Anything else (a first step, a missing gradient, a load, a moment changed from outside, a second dtype)
takes the general path, which builds a new plan at its end. The plan keeps the C calls' argument arrays
(the blocks' addresses and sizes) and the step counters' values: it writes count + 1 into each counter
itself (0-d float32/float64 CPU tensors at counts exact in their dtype; otherwise no plan is made).
The arithmetic is the general path's
(:func:`~lightning_soaa.functional.soaa.add_moment_sums`, :func:`~lightning_soaa.functional.soaa.
native_step_scalars`, :func:`~lightning_soaa.functional.soaa.add_step_sums` and the same C calls), so a
step takes the same bits on either path. The plan's sums are its own: after a planned step the general
path finds the kernels' remembered record out of date and reads the sums once from the moments (mode 0
of the sums pass: the same bits as the step returned).
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_soaa.functional.soaa import add_moment_sums, add_step_sums, native_step_scalars
from lightning_soaa.kernels.raw import cell_values, own_storage, value_cells
from lightning_soaa.kernels.soaa_native import NativeSOAA, int_array, out_array, pointers

__all__ = ["NativePlan"]

_version_of = operator.attrgetter("_version")
_ONES = itertools.repeat(1)
_dtype_of = operator.attrgetter("dtype")
_is_cpu = operator.attrgetter("is_cpu")
_data_ptr = Tensor.data_ptr
_numel = Tensor.numel
_is_contiguous = Tensor.is_contiguous


def _same(xs: Sequence[Any], ys: Sequence[Any]) -> bool:
    return len(xs) == len(ys) and all(map(operator.is_, xs, ys))


#: counts below this are exact in float32 and float64: writing count + 1 is what add_(1.0) writes
_EXACT_COUNT = float(1 << 24)


@dataclasses.dataclass(slots=True)
class NativePlan:
    """One group's blocks for the C loops (see the module docstring). The C arrays of the blocks'
    addresses and sizes are built once: ``matches`` checks, at every step, that they still hold. The
    step counters are the plan's too: their values are kept (``counts``) and advanced by a write of
    count + 1 into each (the bits ``add_(1.0)`` writes), so a step reads no counter."""

    native: NativeSOAA
    dtype: torch.dtype
    params: list[Tensor]  # the blocks' parameter views, in order
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    counters: list[Tensor]
    numel: int  # elements of all blocks
    layout: tuple[int, ...]  # addresses, then sizes, of the watched tensors
    versions: tuple[int, ...]  # versions of the moments and counters as the last step left them
    sums: list[tuple[float, float]]  # (Σ m², Σ v) of each block's moments as the last step left them
    watched: list[Tensor]  # the parameters, the moments and the counters (layout's order)
    versioned: list[Tensor]  # the moments and the counters (versions' order)
    arrays: tuple[Any, ...]  # C arrays: addresses of θ, m, v; sizes; the sums pass's modes (Σ m g, Σ g²)
    counts: list[float]  # the counters' values
    ts: list[int]  # the step count of the next update of each block (counts + 1)
    cells: list[Any]  # each counter's value as a ctypes number at its address
    outs: tuple[Any, Any, Any]  # the passes' result arrays, the gradients' addresses (overwritten at each step)
    grad_array: tuple[list[Tensor], Any] | None = None  # this step's gradients and their C array

    @classmethod
    def build(cls, native: NativeSOAA, params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
              counters: list[Tensor], sums: list[tuple[float, float]]) -> NativePlan | None:
        """The plan of blocks a C step has just updated (``sums``: what it returned for their moments), or
        None when the counters are not all 0-d CPU float32/float64 tensors of their own at exact counts."""
        cells = value_cells(counters)
        if cells is None or any(c.dtype != counters[0].dtype for c in counters):
            return None
        counts = [float(c.item()) for c in counters]
        if not all(x.is_integer() and 0.0 <= x < _EXACT_COUNT - 1.0 for x in counts):
            return None
        watched = [*params, *exp_avgs, *exp_avg_sqs, *counters]
        versioned = [*exp_avgs, *exp_avg_sqs, *counters]
        arrays = (pointers(params), pointers(exp_avgs), pointers(exp_avg_sqs), int_array(list(map(_numel, params))),
                  int_array([native.SUMS_GM] * len(params), ctypes.c_int))
        return cls(native, params[0].dtype, list(params), list(exp_avgs), list(exp_avg_sqs), list(counters),
                   sum(map(_numel, params)), cls._layout(watched), tuple(map(_version_of, versioned)), list(sums),
                   watched, versioned, arrays, counts, [int(x) + 1 for x in counts],
                   cells, (out_array(2 * len(params)), out_array(5 * len(params)), pointers(params)))

    @staticmethod
    def _layout(watched: list[Tensor]) -> tuple[int, ...]:
        return (*map(_data_ptr, watched), *map(_numel, watched))

    def matches(self, params: list[Tensor], states: list[dict[str, Any]], grads: list[Tensor]) -> bool:
        """Whether these blocks, states and gradients are the plan's, unchanged (see the module docstring)."""
        if torch.compiler.is_compiling():  # as SOAAKernels: no C loops inside a graph dynamo traces
            return False
        if params is not self.params and not _same(params, self.params):  # (SOAA's planned step: its own list)
            return False
        if len(states) != len(self.params):
            return False
        for st, m, v, c in zip(states, self.exp_avgs, self.exp_avg_sqs, self.counters):
            if st.get("exp_avg") is not m or st.get("exp_avg_sq") is not v or st.get("step") is not c:
                return False
        # (params, m, v and the counters are the plan's own tensors: checked above)
        if (tuple(map(_version_of, self.versioned)) != self.versions or self._layout(self.watched) != self.layout
                or max(self.ts) >= _EXACT_COUNT):
            return False
        # a write through .data or a numpy view bumps no version: the counters' values are read at their
        # addresses (same addresses: checked above); and the C loops index θ as contiguous, which
        # ``p.data = p.data.t()`` (same address and size) is not (m and v are made contiguous by the step)
        if cell_values(self.cells) != self.counts or not all(map(_is_contiguous, self.params)):
            return False
        return (set(map(_dtype_of, grads)) == {self.dtype} and all(map(_is_cpu, grads))
                and all(map(_is_contiguous, grads)) and own_storage(grads))

    def _grads(self, grads: list[Tensor]) -> Any:
        """The C array of the gradients' addresses, written once for both passes of a step (into the plan's
        own array: one array for every step, its values replaced)."""
        kept = self.grad_array
        if kept is not None and kept[0] is grads:
            return kept[1]
        arr = self.outs[2]
        arr[:] = list(map(_data_ptr, grads))  # (one per block: matches checked; another length raises)
        self.grad_array = (grads, arr)
        return arr

    def moments_partials(self, grads: list[Tensor], ts: list[int], *, beta1: float, beta2: float,
                         eps: float) -> list[float]:
        """``[Σ m̂², Σ (v̂ + ε)]`` of the would-be moments: the general path's fused sums pass."""
        _, m, v, n, modes = self.arrays
        rows = self.native.sums_at(self.dtype, self._grads(grads), m, v, n, modes, self.outs[0])
        s_m2, s_v = add_moment_sums(0.0, 0.0, self.sums, rows, ts, beta1=beta1, beta2=beta2)
        return [s_m2, s_v + eps * self.numel]

    def step_partials_(self, grads: list[Tensor], ts: list[int], *, lr: float, beta1: float, beta2: float,
                       eps: float, weight_decay: float, d: float, c: float, count_limited: bool) -> list[float]:
        """Moments, θ and the step counters in place, ``[Σ m̂·u, Σ v̂·u²]`` (and the count with
        ``count_limited``): the general path's fused step; the plan then holds what it left behind."""
        rows_of, weights = native_step_scalars(ts, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                               weight_decay=weight_decay, d=d, c=c)
        p, m, v, n, _ = self.arrays
        # (the versions of θ, m, v and the counters bumped once, as the counters' own write would)
        rows = self.native.step_at(self.dtype, self.watched, p, self._grads(grads), m, v, n,
                                   list(map(rows_of.__getitem__, ts)), self.outs[1])
        self.grad_array = None  # the gradients are the caller's: not kept past the step
        self.counts = [x + 1.0 for x in self.counts]
        for cell, x in zip(self.cells, self.counts):
            cell.value = x
        self.ts = [t + 1 for t in ts]
        out = [0.0, 0.0, 0.0]
        add_step_sums(out, rows, ts, weights)
        self.sums = [(r[3], r[4]) for r in rows]
        # the versions matches() found, each bumped once by step_at (not read again: 18 attribute calls). Were two
        # of them one counter (views of one buffer), or were one not bumped, the next matches() finds them
        # unequal and the general path runs: a wrong guess costs a rebuilt plan, never a stale one
        self.versions = tuple(map(operator.add, self.versions, _ONES))
        return out if count_limited else out[:2]
