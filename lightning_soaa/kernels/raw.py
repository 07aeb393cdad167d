"""Which tensors a kernel may reach through their raw data pointer (shared by the C and Triton kernels)."""

from __future__ import annotations

import functools
from collections.abc import Iterable

from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass_type

__all__ = ["own_storage"]


@functools.lru_cache(maxsize=64)
def _type_owns_storage(cls: type) -> bool:
    # A wrapper subclass (DTensor, a functional or fake tensor...) has no storage of its own: its
    # data_ptr() is 0, and a kernel writing there faults or corrupts memory
    return not is_traceable_wrapper_subclass_type(cls)


def own_storage(tensors: Iterable[Tensor]) -> bool:
    """Whether every tensor holds its data itself (plain tensors, parameters and their plain subclasses),
    so that ``data_ptr()`` addresses it. One check per distinct type, not per tensor."""
    return all(map(_type_owns_storage, set(map(type, tensors))))

