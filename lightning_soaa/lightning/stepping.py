"""How many optimizer steps a Lightning fit makes, with the accumulation a ``GradientAccumulationScheduler`` sets.

``trainer.estimated_stepping_batches`` divides every epoch's batches by ``trainer.accumulate_grad_batches``,
which is the value in force when it is asked: before the fit's first epoch that is 1 whatever the callback's
schedule (the callback sets it at each epoch's start, and Lightning refuses the Trainer argument beside it).
With ``GradientAccumulationScheduler({1: 3})`` over 3 epochs of 8 batches it says 24 where the fit makes
8 + 3 + 3 = 14 steps, so SOAA's ``band_schedule="paper"`` (``total_steps`` filled from it) stopped at
13/24 of its narrowing. The count here follows the schedule epoch by epoch, as the fit loop does: a step
every ``k`` batches and one after an epoch's last, shorter window.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["accumulation_scheduler", "estimated_optimizer_steps", "optimizer_steps_in_epochs"]


def accumulation_scheduler(trainer: Any) -> Any:
    """The trainer's ``GradientAccumulationScheduler`` callback, or None."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    found = [c for c in getattr(trainer, "callbacks", None) or () if isinstance(c, GradientAccumulationScheduler)]
    return found[0] if found else None


def optimizer_steps_in_epochs(trainer: Any, epochs: int, batches: float) -> float:
    """The optimizer steps of the first ``epochs`` epochs of ``batches`` batches each (not capped by
    ``max_steps``): ``ceil(batches / k)`` per epoch, ``k`` from the accumulation schedule where the trainer has
    one, else the trainer's ``accumulate_grad_batches``. Infinite for an epoch without end."""
    if epochs <= 0:
        return 0
    if not math.isfinite(batches):
        return math.inf
    scheduler = accumulation_scheduler(trainer)
    if scheduler is None:
        return epochs * math.ceil(batches / max(1, int(trainer.accumulate_grad_batches)))
    # the schedule is constant between its keys (epoch -> k from that epoch on; k = 1 before the first)
    edges = sorted(e for e in scheduler.scheduling if e < epochs)
    starts, ks = [0, *edges], [1, *(int(scheduler.scheduling[e]) for e in edges)]
    total = 0
    for i, (start, k) in enumerate(zip(starts, ks)):
        end = starts[i + 1] if i + 1 < len(starts) else epochs
        total += (end - start) * math.ceil(batches / max(1, k))
    return total


def estimated_optimizer_steps(trainer: Any) -> float:
    """``trainer.estimated_stepping_batches``, counted with the accumulation schedule's ``k`` of each epoch
    where the trainer has a ``GradientAccumulationScheduler`` (Lightning's counts every epoch with the ``k``
    in force when it is asked)."""
    steps = float(trainer.estimated_stepping_batches)  # also sets up the training data where it must
    max_epochs = trainer.max_epochs
    if accumulation_scheduler(trainer) is None or max_epochs is None or max_epochs == -1:
        return steps
    total = optimizer_steps_in_epochs(trainer, max(int(max_epochs), 1), trainer.num_training_batches)
    if not math.isfinite(total):
        return steps  # an iterable dataset: Lightning's answer (max_steps)
    return float(min(total, trainer.max_steps) if trainer.max_steps != -1 else total)
