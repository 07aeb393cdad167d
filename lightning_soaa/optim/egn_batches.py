"""The batch EGN steps on when a training step is made of several micro-batches.

EGN differentiates the model on the step's whole batch, so gradient accumulation (Lightning's
``accumulate_grad_batches``, DeepSpeed's ``gradient_accumulation_steps``) hands it every micro-batch of
the step, joined along the samples; one place, so that every integration joins them alike.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["concat_batches"]


def concat_batches(batches: list[tuple[Any, Any]]) -> tuple[Any, Any]:
    """Concatenate (inputs, targets) pairs along the samples; inputs may be tuples of tensors. One pair is
    returned as it is."""
    if len(batches) == 1:
        return batches[0]
    xs = [x for x, _ in batches]
    if isinstance(xs[0], (tuple, list)):
        inputs: Any = tuple(torch.cat(parts, dim=0) for parts in zip(*xs))
    else:
        inputs = torch.cat(xs, dim=0)
    return inputs, torch.cat([y for _, y in batches], dim=0)
