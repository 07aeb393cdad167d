"""The order in which FSDP2 reduced its units' gradients on this rank, for the step to compare across ranks.

FSDP2 reduce-scatters (HSDP: and all-reduces) a ``fully_shard`` unit's gradient when that unit's backward ends,
and the ranks' collectives pair up by their order alone. A forward that runs the units in another order on some
ranks (two branches built in a data-dependent order; the micro-batches of a gradient accumulation taking the
branches in another order per rank) leaves every unit with a gradient on every rank, each one a mixture of
another unit's: nothing in the gradients shows it (torch's own optimizers step on them). So each watched unit
notes, as it starts a reduction, its name into a per-process digest; the step compares that digest across ranks
with its hyperparameters (no collective of its own) and clears it.

One digest per process, not per optimizer: one optimizer per model part then compares every part's reductions
at the first step, and the others find it empty; the units an optimizer watches are every unit on its units'
meshes, so a part stepped by another optimizer (torch's) is compared too. A step that raised keeps it (a retry
on the same gradients is refused again); the next reduction into gradients that were zeroed starts a new one.

This reads FSDP2's internal parameter groups (``post_backward``, ``reduce_grads``, ``fsdp_params``): where they
read otherwise (another torch) a unit counts as reducing whenever its backward ends, and where a group cannot
be wrapped nothing is noted (the ranks then agree on an empty digest).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = ["clear_after_step", "digest", "first_order_difference", "noted", "order_error", "watch"]

_MASK48 = (1 << 48) - 1  # (exact in the step's float64 all-reduce, as agreement's digests)
_SHOWN = 12  # names a refusal shows per rank, from just before the first difference
_KEPT = 4096  # names kept for that (a deep model's accumulated step: a difference lies past the first dozen)
_MARK = "_lightning_soaa_reduce_order"

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Log:
    digest: int = 0
    count: int = 0
    names: list[str] = dataclasses.field(default_factory=list)
    #: a step raised on it: the next reduction into zeroed gradients starts a new log
    stale: bool = False

    def note(self, name: str) -> None:
        self.count += 1
        text = f"{self.digest}:{name}".encode()
        self.digest = int.from_bytes(hashlib.blake2b(text, digest_size=6).digest(), "big") & _MASK48
        if len(self.names) < _KEPT:
            self.names.append(name)


_LOG = _Log()


def watch(groups: Iterable[Any]) -> None:
    """Wrap each FSDP2 parameter group's ``post_backward`` (once per group) to note its reductions."""
    for group in groups:
        if getattr(group, _MARK, False):
            continue
        try:
            group.post_backward = _noting(group, group.post_backward)
            setattr(group, _MARK, True)
        except (AttributeError, TypeError) as e:  # (another torch: this group goes unwatched on every rank alike)
            _unwatched(group, e)


def _unwatched(group: Any, error: BaseException) -> None:
    """Say once per group that its reductions go uncompared (the check is off there, not the training)."""
    try:
        setattr(group, _MARK, True)  # (once: the next optimizer over it does not say it again)
    except (AttributeError, TypeError):
        pass
    log.warning("the order of FSDP2's gradient reductions is not compared for %s on torch %s (%s: %s): a "
                "forward that runs fully_shard units in another order on some ranks trains on mixed gradients "
                "there, silently; run the same units in the same order on every rank.", type(group).__name__,
                torch.__version__, type(error).__name__, error)


def _noting(group: Any, original: Any) -> Any:
    def post_backward(*args: Any) -> Any:
        if _reduces(group):
            if _LOG.stale and _grads_zeroed(group):
                _LOG.__init__()  # type: ignore[misc]
            # (read here: FSDP2 names its units at the root's first forward, after the optimizer was built)
            _LOG.note(str(getattr(group, "_module_fqn", "") or "<root>"))
        return original(*args)

    return post_backward


def _reduces(group: Any) -> bool:
    """Whether this ``post_backward`` reduces a gradient (FSDP2's own test, read before it runs)."""
    try:
        if not group.reduce_grads:
            return False
        unused = bool(getattr(group, "reduce_scatter_unused_params", False))
        for fp in group.fsdp_params:
            if not hasattr(fp, "_unsharded_param"):
                continue
            if fp.unsharded_accumulated_grad is not None or fp.unsharded_param.grad is not None:
                return True
            if unused and fp.unsharded_param.requires_grad:
                return True
        return False
    except AttributeError:
        return True


def _grads_zeroed(group: Any) -> bool:
    """Whether every sharded gradient of the group is None or zero (``zero_grad`` since the step that raised)."""
    try:
        with torch.no_grad():
            grads = [fp.sharded_param.grad for fp in group.fsdp_params]
            return all(g is None or not bool(g.to_local().any()) for g in grads)
    except AttributeError:
        return True


def digest() -> int:
    """This process's digest of the reductions since the last step (0: none)."""
    return _LOG.digest if _LOG.count else 0


def noted() -> tuple[int, int, list[str]]:
    """(how many reductions were noted, their digest, the first :data:`_KEPT` names): a refusal's detail."""
    return _LOG.count, digest(), list(_LOG.names)


def clear_after_step(raised: bool) -> None:
    """A step ended: cleared, or (it raised) kept until gradients are zeroed and reduced again."""
    if raised:
        _LOG.stale = True
    else:
        _LOG.__init__()  # type: ignore[misc]


def first_order_difference(by_rank: Sequence[tuple[int, int, list[str]] | None]) -> str:
    """The ranks whose reductions differ from the first sending rank's, with each one's order from just before
    the first difference (empty where none differs)."""
    sent = [(r, v) for r, v in enumerate(by_rank) if v is not None]
    if not sent:
        return ""
    first = sent[0][1]
    differ = [r for r, v in sent if v[:2] != first[:2]]
    if not differ:
        return ""
    at = min(_first_difference(first[2], v[2]) for r, v in sent if r in differ)
    start = max(0, at - 2)  # (two alike before it: where in the model the orders part)

    def order(v: tuple[int, int, list[str]]) -> str:
        if not v[0]:
            return "none"
        shown = v[2][start:start + _SHOWN]
        more = v[0] > start + len(shown)
        return ("..., " if start else "") + ", ".join(repr(n) for n in shown) + (
            f", ... ({v[0]} in all)" if more else "")

    where, since = (f" at reduction {at + 1}", f"from reduction {start + 1} on: ") if start else ("", "")
    listed = "; ".join(f"rank {r}: {order(v)}" for r, v in sent if r == sent[0][0] or r in differ)
    return f"rank(s) {differ} differ from rank {sent[0][0]}{where} ({since}{listed})"


def _first_difference(a: list[str], b: list[str]) -> int:
    """The index of the first name that differs (the shorter list's length where one starts the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def order_error(name: str, by_rank: Sequence[tuple[int, int, list[str]] | None]) -> RuntimeError | None:
    """The refusal of ``name``'s step where the ranks' reductions (every rank's :func:`noted`) differ, else None."""
    detail = first_order_difference(by_rank)
    if not detail:
        return None
    return RuntimeError(
        f"{name}.step: FSDP2 reduced the gradients of its fully_shard units in another order on some ranks: "
        f"{detail}. Its reduce-scatters pair up by order alone, so each met another unit's and the gradients "
        "are mixtures of different units' (every parameter has one: nothing else shows it). The forward ran "
        "the units in another order on those ranks: a data-dependent branch or order, within one forward or "
        "across the micro-batches of a gradient accumulation. Run the same fully_shard units in the same order "
        "on every rank in every micro-batch (compute each branch on every rank, adding 0 * an unused output "
        "to the loss), or put the branching modules in one fully_shard unit with "
        "set_reduce_scatter_unused_params(True). Nothing changed; zero the gradients and run the backward again."
    )
