"""Which tensors a kernel may reach through their raw data pointer (shared by the C and Triton kernels), and
the values of 0-d counters read at their addresses."""

from __future__ import annotations

import ctypes
import functools
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass_type

__all__ = ["cell_values", "own_storage", "value_cells"]


@functools.lru_cache(maxsize=64)
def _type_owns_storage(cls: type) -> bool:
    # A wrapper subclass (DTensor, a functional or fake tensor...) has no storage of its own: its
    # data_ptr() is 0, and a kernel writing there faults or corrupts memory
    return not is_traceable_wrapper_subclass_type(cls)


def own_storage(tensors: Iterable[Tensor]) -> bool:
    """Whether every tensor holds its data itself (plain tensors, parameters and their plain subclasses),
    so that ``data_ptr()`` addresses it. One check per distinct type, not per tensor."""
    return all(map(_type_owns_storage, set(map(type, tensors))))



_CELL_TYPES = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}
_cell_value = operator.attrgetter("value")


def value_cells(counters: Sequence[Tensor]) -> list[Any] | None:
    """Each counter's value as a ctypes number at its address, or None unless all are 0-d CPU float32 /
    float64 tensors with storage of their own. A write through ``.data`` or a numpy view bumps no autograd
    version: caches that remember counters' values check them here. Read a cell only while its counter is
    the same tensor at the same address (the caller holds the tensor, so the memory is the counter's)."""
    if not own_storage(counters):
        return None
    cells = []
    for c in counters:
        cell = _CELL_TYPES.get(c.dtype)
        if cell is None or not c.is_cpu or c.dim() != 0:
            return None
        cells.append(cell.from_address(c.data_ptr()))
    return cells


def cell_values(cells: Sequence[Any]) -> list[float]:
    """The values at the cells of :func:`value_cells` (one C-level map)."""
    return list(map(_cell_value, cells))
