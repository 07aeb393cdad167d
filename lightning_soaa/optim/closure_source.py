"""What a ``step(closure)`` call can tell about the training loop that made the closure.

SOAA takes the loss of the *whole* optimizer step from the closure's return value. Under Lightning's
automatic optimization with ``accumulate_grad_batches=k > 1`` that value is the last micro-batch's loss
divided by k, so taking it would silently run the trust region on the wrong loss. Lightning hands the
optimizer ``functools.partial(Precision._wrap_closure, module, optimizer, closure)``; the module carries
its trainer. This reads that without importing Lightning (``optim/`` must not depend on it).
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["accumulation_steps"]


def accumulation_steps(closure: Any) -> int:
    """The number of micro-batches per optimizer step of the Lightning trainer behind ``closure`` (1 when
    the closure comes from anywhere else, or the trainer does not accumulate)."""
    if not isinstance(closure, functools.partial):
        return 1
    for arg in (*closure.args, *closure.keywords.values()):
        trainer = getattr(arg, "_trainer", None)  # a LightningModule; .trainer raises when detached
        k = getattr(trainer, "accumulate_grad_batches", 1)
        if isinstance(k, int) and k > 1:
            return k
    return 1
