"""AdamW on lists of tensors (decoupled weight decay), matching ``torch.optim.AdamW``. See
:class:`lightning_soaa.optim.adamw.ShardedAdamW`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["adamw_update_", "increment_counts_"]


def adamw_update_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step in place on every tensor of the lists (any shapes, including 1-D slices).

    ``steps`` are per-tensor float32 scalars incremented here (torch's convention, so that DeepSpeed
    ZeRO-3, which calls ``step()`` once per sub-group, keeps one counter per tensor).
    """
    if not params:
        return
    counts = increment_counts_(steps)
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    # Tensors of one call usually share a step count; group them so the scalars stay Python floats.
    by_step: dict[float, list[int]] = {}
    for i, t in enumerate(counts):
        by_step.setdefault(t, []).append(i)
    for t, idx in by_step.items():
        bc1 = 1.0 - beta1**t
        bc2_sqrt = math.sqrt(1.0 - beta2**t)
        denom = torch._foreach_sqrt([exp_avg_sqs[i] for i in idx])
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_([params[i] for i in idx], [exp_avgs[i] for i in idx], denom, value=-lr / bc1)


def increment_counts_(steps: list[Tensor]) -> list[float]:
    """Add 1 to every per-tensor step counter in place; return the new counts as floats.

    Counters on the CPU (where the optimizers create them) are read and refilled one by one: for 0-d CPU
    tensors ``_foreach_add_`` runs one full kernel per tensor and costs several times more. The value
    is the one ``add_(1.0)`` writes: ``count + 1`` of a float32 count is exact in float64, so rounding
    it once to float32 is the float32 addition (a float64 count: the float64 one). Counters elsewhere:
    one ``_foreach_add_``.
    """
    if all(s.device.type == "cpu" for s in steps):
        out = []
        for s in steps:
            s.fill_(s.item() + 1.0)
            out.append(float(s.item()))
        return out
    torch._foreach_add_(steps, 1.0)
    if all(s.device == steps[0].device for s in steps):
        return [float(x) for x in torch.stack(steps).tolist()]  # one copy to the host, not one each
    return [float(s.item()) for s in steps]
