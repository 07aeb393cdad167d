"""``max_grad_norm``: clipping the gradient an optimizer's update reads by its global norm.

The norm is over every parameter of the optimizer (all param groups), as torch's
``clip_grad_norm_(model.parameters(), max_norm)`` takes it, and of the gradient the update uses: under
``grad_reduction="mean"`` the ranks' average (which no user code before ``step()`` can see: a
``clip_grad_norm_`` there clips each rank's own gradient by its own norm), under ``"none"`` the gradient the
caller left (DDP's average). The factor is torch's, ``min(1, max_norm / (‖g‖ + 1e-6))``, applied to every
gradient alike. A non-finite norm scales nothing: the step's non-finite check then skips it on every rank (as
for any non-finite gradient), instead of torch's ``error_if_nonfinite=False``, which writes NaN into the
gradients. No distributed code here: the step (:meth:`ShardedOptimizer._clip_grads`) sums the partials.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_soaa.distributed import agreement

__all__ = ["CLIP_EPS", "ClipMark", "clip_factor", "clip_value", "grad_sq", "scale_grads_"]

#: torch's ``clip_grad_norm_`` adds this to the norm before dividing (so a norm of 0 scales by a finite value)
CLIP_EPS = 1e-6


def clip_value(groups: Sequence[dict[str, Any]]) -> float | None:
    """The ``max_grad_norm`` of ``groups`` (None: no clipping). One global norm has one bound: groups that
    set different values are refused (``ValueError`` naming both), instead of silently using one of them."""
    first = groups[0].get("max_grad_norm") if groups else None
    for i, group in enumerate(groups):
        value = group.get("max_grad_norm")
        if value != first:
            raise ValueError(
                f"Invalid max_grad_norm={value!r} in param group {i} (param group 0 has {first!r}). The norm "
                "max_grad_norm bounds is one global norm over all of the optimizer's parameters (as torch's "
                "clip_grad_norm_(model.parameters(), ...)), so every param group must have the same value "
                "(or None in every group).")
    return None if first is None else float(first)


def grad_sq(grads: Sequence[Tensor]) -> float:
    """Σ‖g‖² over ``grads`` in float64 on the host (0.0 for none); where a norm in the gradients' own dtype
    overflows (finite float32 gradients above ~1e19) it is taken again accumulated in float64; non-finite
    iff a gradient is."""
    if not grads:
        return 0.0
    real = [torch.view_as_real(g) if g.is_complex() else g for g in grads]
    total = float(agreement.grad_sq_tensor(real).cpu())
    return total if math.isfinite(total) else agreement.grad_sq_exact(real)


def clip_factor(max_norm: float, total_sq: float) -> float | None:
    """torch's clip coefficient ``max_norm / (‖g‖ + 1e-6)`` for a gradient of squared norm ``total_sq``, or
    None where it does not bind (≥ 1: torch multiplies by 1.0, which changes no value) or where the norm is
    not finite (nothing is scaled; the step skips for the non-finite gradient)."""
    if not math.isfinite(total_sq):
        return None
    coef = max_norm / (math.sqrt(total_sq) + CLIP_EPS)
    return coef if coef < 1.0 else None


def scale_grads_(grads: Sequence[Tensor], factor: float) -> None:
    """Multiply ``grads`` in place by ``factor`` (one foreach call per dtype and device)."""
    if grads:
        torch._foreach_mul_(list(grads), factor)


def _version(g: Tensor) -> int:
    return -1 if g.is_inference() else g._version  # (an inference-mode tensor has no version counter)


@dataclasses.dataclass(frozen=True)
class ClipMark:
    """The gradients a step clipped in place before it raised (an error raised on every rank after the clip, e.g.
    SOAA without its loss), their Σ‖g‖² before the clip (``partial``, this rank's share) and the factor applied.
    Its retry on the same gradients takes the norm from ``partial``: the norm of the clipped gradients scaled
    them again (by 1 - 1e-6 / max_grad_norm), silently. Weak references: a caller who frees the gradients frees
    them."""

    grads: tuple[tuple[weakref.ref[Tensor], int], ...]
    partial: float
    factor: float

    @classmethod
    def of(cls, grads: Sequence[Tensor], partial: float, factor: float) -> ClipMark:
        return cls(tuple((weakref.ref(g), _version(g)) for g in grads), partial, factor)

    def holds(self, grads: Sequence[Tensor]) -> bool:
        """Whether ``grads`` are the marked gradients, not written since (no backward, no exchange)."""
        return len(grads) == len(self.grads) and all(
            ref() is g and version == _version(g) for (ref, version), g in zip(self.grads, grads))
