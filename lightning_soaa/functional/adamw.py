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
    counts: list[float] | None = None,
) -> None:
    """One AdamW step in place on every tensor of the lists (any shapes, including 1-D slices).

    ``steps`` are per-tensor float32 scalars incremented here (torch's convention, so that DeepSpeed
    ZeRO-3, which calls ``step()`` once per sub-group, keeps one counter per tensor), unless the caller
    advanced them already and passes their new values as ``counts`` (ASGO advances the counters of all
    its blocks, AdamW's and its own, in one call).
    """
    if not params:
        return
    counts = increment_counts_(steps) if counts is None else counts
    low = [i for i, p in enumerate(params) if p.dtype == torch.float16]
    if not low:
        _update_(params, grads, exp_avgs, exp_avg_sqs, steps, counts, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                 weight_decay=weight_decay)
        return
    # float16 in float32, as the fused kernel computes it: in float16 eps = 1e-8 is 0 and v underflows, so
    # the update m / (sqrt(v) + eps) is inf or NaN (written into the parameters). θ and g are widened per
    # step; the moments are float32 already where the optimizers keep them (float16 ones are widened too)
    lists = (params, grads, exp_avgs, exp_avg_sqs)
    wide = tuple(list(x) for x in lists)
    for x in wide:
        for i in low:
            x[i] = x[i].float()
    _update_(wide[0], wide[1], wide[2], wide[3], steps, counts, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
             weight_decay=weight_decay)
    for k in (0, 2, 3):  # θ and the moments back where they were copies; the gradient was only read
        back = [i for i in low if wide[k][i] is not lists[k][i]]
        if back:
            torch._foreach_copy_([lists[k][i] for i in back], [wide[k][i] for i in back])


def _update_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
             steps: list[Tensor], counts: list[float], **hp: float) -> None:
    """:func:`adamw_update_` of tensors whose moments are in their parameter's dtype, the counters
    already advanced to ``counts``: torch's fused CPU kernel where it takes a tensor, else the foreach ops."""
    # Per tensor, not per call: which path a block takes (and so its rounding) must not depend on the
    # other blocks it shares a call with (they differ between world sizes and shardings).
    rest = _fused_cpu_(params, grads, exp_avgs, exp_avg_sqs, steps, **hp)
    if not rest:
        return
    if len(rest) < len(params):
        params, grads, exp_avgs, exp_avg_sqs = ([x[i] for i in rest] for x in (params, grads, exp_avgs, exp_avg_sqs))
        counts = [counts[i] for i in rest]
    _foreach_update_((params, grads, exp_avgs, exp_avg_sqs), counts, **hp)


def _foreach_update_(lists: tuple[list[Tensor], ...], counts: list[float], *, lr: float, beta1: float,
                     beta2: float, eps: float, weight_decay: float) -> None:
    """torch's foreach AdamW update of (θ, g, m, v) in place, the step counters already advanced to
    ``counts``."""
    params, grads, exp_avgs, exp_avg_sqs = lists
    # bfloat16/float16 θ with decay: decayed in place, then updated, it was rounded twice a step (2-3x the error
    # of one rounding, torch's foreach AdamW's too); its decay joins the update instead (the fused kernels' way)
    joined = ({i for i, p in enumerate(params) if p.dtype in (torch.bfloat16, torch.float16)}
              if weight_decay != 0.0 else set())
    if weight_decay != 0.0 and len(joined) < len(params):
        torch._foreach_mul_([p for i, p in enumerate(params) if i not in joined], 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    for t, idx in _by_count(counts).items():
        bc1 = 1.0 - beta1**t
        bc2_sqrt = math.sqrt(1.0 - beta2**t)
        denom = torch._foreach_sqrt([exp_avg_sqs[i] for i in idx])
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        plain = [i for i in idx if i not in joined]
        if plain:
            torch._foreach_addcdiv_([params[i] for i in plain], [exp_avgs[i] for i in plain],
                                    [denom[k] for k, i in enumerate(idx) if i not in joined], value=-lr / bc1)
        if len(plain) < len(idx):
            _joined_decay_update_([(params[i], exp_avgs[i], denom[k]) for k, i in enumerate(idx) if i in joined],
                                  -lr / bc1, -lr * weight_decay)


def _joined_decay_update_(blocks: list[tuple[Tensor, Tensor, Tensor]], alr: float, decay: float) -> None:
    """θ += alr·m/denom + decay·θ for each ``(θ, m, denom)``, θ rounded once. The scalars go through mul:
    add's alpha (and addcdiv's value) is rounded to a bfloat16 tensor's dtype (1 - 1e-3 becomes 1)."""
    params = [b[0] for b in blocks]
    upd = torch._foreach_div([b[1] for b in blocks], [b[2] for b in blocks])
    torch._foreach_mul_(upd, alr)
    torch._foreach_add_(upd, torch._foreach_mul(params, decay))
    torch._foreach_add_(params, upd)


def _by_count(counts: list[float]) -> dict[float, list[int]]:
    """Tensor indices by step count: tensors of one call usually share one, so the bias-correction
    scalars stay Python floats, computed once per group."""
    out: dict[float, list[int]] = {}
    for i, t in enumerate(counts):
        out.setdefault(t, []).append(i)
    return out


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


def _fused_cpu_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                steps: list[Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float) -> list[int]:
    """The update of every tensor that torch's fused CPU AdamW kernel can take (one sweep each, as
    ``AdamW(fused=True)``; 4.7x the foreach ops' speed on 1e7 fp32 parameters here), one kernel call per
    dtype; returns the indices of the others. The kernel reads the (already incremented) step counters
    and does not change them. Where this torch has no CPU kernel the dispatcher refuses before any tensor
    is touched, and every index is returned."""
    fused = getattr(torch, "_fused_adamw_", None)
    by_dtype: dict[torch.dtype, list[int]] = {}
    rest: list[int] = []
    strided_all: set[int] = set()
    for i, ts in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        takes = _fused_takes(ts) if fused is not None else 0
        (by_dtype.setdefault(ts[0].dtype, []) if takes else rest).append(i)
        if takes == 2:
            strided_all.add(i)
    for n, (_, idx) in enumerate(by_dtype.items()):
        assert fused is not None  # by_dtype is empty otherwise
        # all tensors in one call (the usual case): the lists as given, not rebuilt
        lists = (params, grads, exp_avgs, exp_avg_sqs, steps) if len(idx) == len(params) else tuple(
            [x[i] for i in idx] for x in (params, grads, exp_avgs, exp_avg_sqs, steps))
        # The kernel walks each tensor's storage as if it were contiguous (a column slice W[:, :5] was
        # updated wrongly, 4e-2 off after three steps, without an error): other layouts (channels_last, a
        # transposed or sliced parameter, a gradient set by hand) run on contiguous copies, written back
        # after, so a tensor's result does not depend on its layout
        strided = [j for j, i in enumerate(idx) if i in strided_all] if strided_all else []
        p, g, m, v, s = lists if not strided else _dense_copies(lists, strided)
        try:
            fused(p, g, m, v, [], s, amsgrad=False, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                  eps=eps, maximize=False)
        except NotImplementedError:
            if n:  # cannot happen (the same kernel ran for the first dtype); never leave a half step
                raise
            return list(range(len(params)))
        # The kernel writes θ without moving its version counter (torch 2.13; AdamW(fused=True) alike): a graph
        # that saved θ in a forward before this step then backpropagated silently at the stepped θ, where the
        # foreach ops make autograd refuse. Moved here as an in-place op would (one C call for the dtype)
        _increment_version(lists[0])
        for j in strided:
            for orig, dense in ((lists[0], p), (lists[2], m), (lists[3], v)):
                orig[j].copy_(dense[j])
    return rest


_increment_version = torch._C._increment_version  # (torch.autograd.graph.increment_version, no Python frame)


def _dense_copies(lists: tuple[list[Tensor], ...], strided: list[int]) -> tuple[list[Tensor], ...]:
    """The lists with the tensors of the ``strided`` entries replaced by contiguous copies."""
    out = tuple(list(x) for x in lists)
    for x in out[:4]:
        for j in strided:
            x[j] = x[j].contiguous()
    return out


def _fused_takes(ts: tuple[Tensor, ...]) -> int:
    """Whether the fused CPU kernel can take one tensor's (θ, g, m, v): 0 no; 1 yes (on the CPU, one
    floating dtype, each contiguous); 2 yes, on contiguous copies (another layout, see :func:`_fused_cpu_`)."""
    dtype = ts[0].dtype
    if dtype not in _FUSED_DTYPES:
        return 0
    takes = 1
    for t in ts:  # a loop of attribute reads (no generator): it runs for every tensor at every step
        if not (t.is_cpu and t.dtype == dtype):
            return 0
        if not t.is_contiguous():
            takes = 2
    return takes


_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
