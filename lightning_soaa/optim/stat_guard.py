"""Guard of ASGO's and DASGO's running statistics against overflow from finite gradients.

ASGO's Gram ``V <- beta2 V + (1 - beta2) G G^T`` and DASGO's column statistic grow with the squared row
(or column) norms of the gradient. Finite float32 gradients above ~1e19 take them past the dtype's range:
an inf Gram has a non-finite root at every later step (ASGO kept its pre-spike root for good and warned at
every step), and DASGO's columns with an inf statistic got zero updates, silently. A step whose update
would overflow a statistic is therefore skipped on every rank, like a non-finite gradient (the caller feeds
:meth:`StatisticGuard.overflows` into the step's non-finite flag), and nothing changes.

Cheap on the common path: every entry of a statistic is at most its largest diagonal entry (``V`` is
positive semi-definite; DASGO's is a vector of diagonal entries), and a diagonal entry after the update
is a convex combination of its old value and the squared norm of one gradient row, at most
``W * sum ||g||^2`` (``W``: the mesh size when a block's statistic is a sum over FSDP2 row shards, else 1).
A host-side bound ``B`` of the largest diagonal entry, carried from step to step, decides most steps with
one multiply-add; only a bound (or ``W * sum ||g||^2`` itself: the update sums the squares before scaling
them by ``1 - beta2``) within a factor 2 of the dtype's largest number costs the exact check (per block,
in float64, one host read), which also resets ``B`` to the exact value.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["GuardedBlock", "MomentBlock", "StatisticGuard", "moments_overflow"]

log = logging.getLogger(__name__)

#: the fast check passes while the bound stays below this fraction of the dtype's largest number: room
#: for the float32 rounding of the sums the bound is compared with (relative ~1e-4 at most)
FAST_MARGIN = 0.5
#: the exact check's margin: its float64 values are exact, the update's float32 sums round
EXACT_MARGIN = 0.99


@dataclasses.dataclass(frozen=True)
class GuardedBlock:
    """One owned block's part of the exact check: its gradient in matrix form (the statistic's dtype; None
    when it has none this step: its statistic stays), the dimension summed to form its squared norms, the
    current diagonal of its statistic (None before its first step), ``beta2``, the mesh factor, a label
    for the log, and the largest finite number of its statistic's dtype (a float64 statistic beside
    float32 ones holds what theirs cannot)."""

    grad: Tensor | None
    dim: int
    diagonal: Tensor | None
    beta2: float
    mesh: int
    label: str
    limit: float


class StatisticGuard:
    """The host bound ``B`` and the exact check. ``B is None`` means unknown (construction, a loaded or
    copied state): the next step runs the exact check."""

    def __init__(self) -> None:
        self.bound: float | None = None
        self._pending: float | None = None

    def reset(self) -> None:
        """The statistics were replaced (``load_state_dict``): the bound is unknown."""
        self.bound = self._pending = None

    def commit(self) -> None:
        """The step was applied: the bound computed for it holds now (a skipped step changes nothing)."""
        self.bound, self._pending = self._pending, None

    def overflows(self, grad_sq: float, betas2: Sequence[float], mesh: int, limit: float, all_stepped: bool,
                  blocks: Callable[[], list[GuardedBlock]]) -> bool:
        """Whether this step's update would take a statistic past its dtype's range (``limit``: the smallest
        largest-finite number of the statistics' dtypes, for the fast check; the exact one takes each
        block's own). ``grad_sq``: ``sum ||g||^2`` over (at least) the owned
        gradients; ``betas2``: every group's ``beta2``; ``all_stepped``: every owned matrix block has a
        gradient this step (else the blocks without one keep their entries, and the bound cannot decay);
        ``blocks``: built only for the exact check."""
        if not betas2:
            self._pending = self.bound
            return False
        rise = (1.0 - min(betas2)) * mesh * grad_sq
        # the update's float32 sums are unscaled (see _exact), so the squared norms must fit too
        if self.bound is not None and mesh * grad_sq <= FAST_MARGIN * limit:
            kept = max(betas2) * self.bound if all_stepped else self.bound
            new = kept + rise
            if new <= FAST_MARGIN * limit:
                self._pending = new
                return False
        return self._exact(blocks())

    def _exact(self, blocks: list[GuardedBlock]) -> bool:
        """Each block against its own statistic's range (the fast path's ``limit`` is the narrowest)."""
        if not blocks:
            self._pending = self.bound
            return False
        rows: list[Tensor] = []
        for b in blocks:
            old = None if b.diagonal is None else b.diagonal.to(torch.float64)
            if b.grad is None:  # no update: the statistic stays as it is
                rows.append(torch.zeros(2, dtype=torch.float64) if old is None or not old.numel()
                            else torch.stack([old.new_zeros(()), old.max()]))
                continue
            # the update's own float32 sums are unscaled (GEMM accumulates G G^T, then multiplies by
            # 1 - beta2), so the squared norms themselves must fit as well as the new diagonal
            sq = b.grad.to(torch.float64).square().sum(b.dim) * b.mesh
            new = sq * (1.0 - b.beta2) if old is None else sq * (1.0 - b.beta2) + b.beta2 * old
            rows.append(torch.stack([sq.max(), new.max()]) if sq.numel() else torch.zeros(2, dtype=torch.float64))
        values = torch.stack([r.cpu() for r in rows]).tolist()  # the rare path: a read per device is fine
        over = [f"{b.label} ({b.limit:.3g})" for b, (sq_max, new_max) in zip(blocks, values)
                if not sq_max <= EXACT_MARGIN * b.limit or not new_max <= EXACT_MARGIN * b.limit]
        if over:
            log.warning("the squared gradient norms of %s exceed the statistic's range (its dtype's largest "
                        "number, in parentheses): finite gradients too large for it (clip them, or keep the "
                        "state in float64)", ", ".join(over))
            return True
        top = max(new_max for _, new_max in values)
        self._pending = max(top, 0.0)
        return False



#: the largest finite number of the narrowest elementwise-moment dtype an optimizer keeps (bfloat16's, just
#: below float32's; float16 parameters keep float32 moments): the fast check of :func:`moments_overflow`
_NARROWEST_MOMENT_MAX = float(torch.finfo(torch.bfloat16).max)


@dataclasses.dataclass(frozen=True)
class MomentBlock:
    """One owned block's part of :func:`moments_overflow`'s exact check: its gradient, its second moment
    (None before its first step), ``beta2`` and a label for the log."""

    grad: Tensor
    exp_avg_sq: Tensor | None
    beta2: float
    label: str
    #: the dtype of the second moment it will be created in (its limit before the first step)
    moment_dtype: torch.dtype = torch.float32


def moments_overflow(grad_sq: float, blocks: Callable[[], list[MomentBlock]]) -> bool:
    """Whether a finite gradient would take an elementwise second moment ``v <- beta2 v + (1 - beta2) g²``
    (ShardedAdamW's, ASGO's AdamW fallback's) past its dtype's range: an inf ``v`` froze its coordinate for
    good (``m / inf = 0``) and made the optimizer's own ``state_dict`` one it refuses to load. The step is
    then skipped, like an overflow of ASGO's statistics.

    Every applied step keeps ``v <= EXACT_MARGIN * L`` (``L``: the moment dtype's largest number), and
    ``g²`` of every entry is at most ``grad_sq`` (``sum ||g||²`` of the step's scan, on the host already):
    while ``grad_sq <= FAST_MARGIN * L`` the new ``v`` stays below ``EXACT_MARGIN * L``, decided by one
    comparison that reads no tensor. Only a larger ``grad_sq`` (float32: |g| ~ 1e19) costs the exact
    check, the new ``v`` of each block in float64 (torch's kernels form ``(1 - beta2) g g`` from the left,
    so ``g²`` itself may exceed ``L``, as in ``torch.optim.AdamW``). ``blocks``: the owned blocks with a
    gradient, built only then."""
    if grad_sq <= FAST_MARGIN * _NARROWEST_MOMENT_MAX:
        return False
    over = []
    for b in blocks():
        limit = float(torch.finfo(b.exp_avg_sq.dtype if b.exp_avg_sq is not None else b.moment_dtype).max)
        g = b.grad if not b.grad.is_complex() else torch.view_as_real(b.grad)
        new = g.to(torch.float64).square().mul_(1.0 - b.beta2)
        if b.exp_avg_sq is not None:
            v = b.exp_avg_sq if not b.exp_avg_sq.is_complex() else torch.view_as_real(b.exp_avg_sq)
            new.add_(v.to(torch.float64), alpha=b.beta2)
        top = float(new.max()) if new.numel() else 0.0
        if not top <= EXACT_MARGIN * limit:
            over.append(f"{b.label} ({limit:.3g})")
    if over:
        log.warning("the second moments of %s would exceed their dtype's range (its largest number, in "
                    "parentheses): finite gradients too large for it (clip them); the step is skipped",
                    ", ".join(over))
        return True
    return False
