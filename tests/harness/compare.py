"""Comparing parameter lists in tests."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def max_abs_diff(a: Iterable[torch.Tensor], b: Iterable[torch.Tensor]) -> float:
    """The largest ``|a - b|`` over every pair of tensors, NaN if any difference is NaN (Python's ``max``
    over floats drops a NaN that is not first: a NaN written into one parameter would pass a tolerance)."""
    diffs = [(x.detach() - y.detach()).abs().max().double().cpu() for x, y in zip(a, b)]
    return float(torch.stack(diffs).max()) if diffs else 0.0
