"""ASGO's planned step: one process steps without the sharded template's machinery, with the same bits.

Why: on a small model an ASGO step is its fixed costs, not its arithmetic. On the 20-64-48-10 MLP of
benchmarks/bench_step_overhead.py a step without a root made 29 ATen calls and ~600 Python calls; a third of its
CPU time was the template around the update (the step record and its host copy, the agreement rows, the
exchanges, the decision), which decides nothing on one process: no rank to agree with, no gradient to
average, no parameter to gather.

What the planned step does is the template's W = 1 path with those no-ops left out, calling the general path's
own functions for everything that reads or writes a tensor, in the same order:

* :meth:`~lightning_soaa.optim.base.ShardedOptimizer._check_step` (meta parameters, sparse gradients, a
  parameter changed since construction, ties, state written from outside) and the block views
  (:meth:`~lightning_soaa.optim.base.ShardedOptimizer._owned_views`), read afresh at every step: a state dict, a
  gradient or ``p.data`` replaced since the last step is seen as the general path sees it;
* the gradient scan (:func:`~lightning_soaa.distributed.agreement.grad_sq_tensor`, the template's Σ‖g‖²) and
  the verdicts the template draws from it: a non-finite value, an optimizer-wide flag
  (``_local_nonfinite``: torch.amp's ``found_inf``), the statistic guard
  (:meth:`~lightning_soaa.optim.asgo._OneSided._statistic_overflows`, which also readies the guard's bound for
  the step);
* the update itself (``_apply``, the same one the template calls) and the step's count.

So nothing is kept from step to step that a later step trusts: the plan keeps only the verdict that this
optimizer's template step is the W = 1 one (:func:`plannable`), and that is read again at every step from the
objects it depends on (the communicator, the exchange, the options). The bits are the general path's by
construction, not by a second implementation of the arithmetic.

Anything out of the ordinary returns False before anything changed, and the template then takes the whole step,
with its messages, skips and errors: a check that raises, a step without any gradient, a non-finite Σ‖g‖² (the
template then takes the exact float64 norms), a stop vote attached. Only a statistic overflow is skipped here,
as the template skips it (the guard's exact check logs which blocks, once; ``_sharded_step`` then returns True
where the template returned False, which no caller of ASGO's step reads). An error of the checks, the views or
the scan is raised as the template raises it at W = 1 (after beginning the step's communication record).

Where no root is due (``root_every`` a number, every block with its root, the root options those it was made
with), the matrices take :func:`_matrix_step_without_roots`: ``ASGO._matrix_step``'s calls without its roots'
bookkeeping. Otherwise (a root step, ``root_every="auto"``) :func:`_matrix_step_with_roots`: the same statistics
(the float64 ``V_t`` where ``ASGO._wide_gram`` asks for it), then the general path's own ``_roots_due`` and
``_roots_and_updates`` (the roots' batches, checks and bookkeeping, ``P M``, the update). W > 1, DTensors, experts
and the rest take the template unchanged.

Where the time of a root step goes (the benchmark's 20-64-48-10 MLP, ``root_every=1``, one thread, CPU time,
~3.0 ms a step on a loaded 2-core host): the roots ~1.3 ms (the float64 ``eigh`` of one padded [3, 48, 48] batch
~0.75 ms, the scales, the map and ``Q diag(z) Q^T``), the float64 Grams ~0.35 ms, ``P M`` and the update ~0.35 ms,
the template, checks, scan, counters and AdamW fallback ~0.7 ms; the roots' Python bookkeeping (which are due,
their batches, sizes, routes, acceptance) ~0.15 ms. So a root every step stays ~4x foreach AdamW's step: most of it
is the root's arithmetic, which this plan does not touch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch

from lightning_soaa.distributed import agreement
from lightning_soaa.distributed.comm import LocalComm
from lightning_soaa.functional import asgo as asgo_math
from lightning_soaa.optim.base import TEMPLATE_HOOKS, overrides_any

if TYPE_CHECKING:  # (asgo imports this module)
    from lightning_soaa.distributed.blocks import BlockInfo
    from lightning_soaa.optim.asgo import ASGO
    from lightning_soaa.optim.base import BlockView

__all__ = ["StepPlan", "plannable", "planned_step"]


#: The template's and ASGO's hooks the planned step stands in for (it calls the others, so their overrides run)
PLANNED_HOOKS = (*TEMPLATE_HOOKS, "_matrix_step", "_update_statistics", "_roots_due", "_wide_gram")


def plannable(opt: ASGO) -> bool:
    """Whether ``opt``'s template step is the single-process one whose collectives, exchanges and decision are
    no-ops: a :class:`LocalComm` (no process group, not one of size 1: its all-reduce is a collective), no DTensor
    parameters, no gradient averaging, an unsharded exchange (``_exchange_out`` gathers nothing), no stop vote
    (its value rides the template's all-reduce), gradients not compared across ranks, the base's ``_decide``
    and ``_prepare`` (no record to reduce). Read at every step: each is an attribute read."""
    from lightning_soaa.optim.asgo import ASGO
    from lightning_soaa.optim.base import ShardedOptimizer

    cls = type(opt)
    return (type(opt.comm) is LocalComm and opt._dtensor is None and opt.sharding.grad_reduction == "none"
            and not opt.exchange.sharded and opt.stop_vote is None and not opt.partials_cover_grads
            and cls._decide is ShardedOptimizer._decide and cls._prepare is ShardedOptimizer._prepare
            and cls._exchange_out is ShardedOptimizer._exchange_out and not opt._compares_grads()
            and not overrides_any(opt, ASGO, PLANNED_HOOKS))


@dataclasses.dataclass(frozen=True, slots=True)
class StepPlan:
    """What the owned blocks are, fixed by the block table: each one's route (``None``: the AdamW fallback,
    else the side of its statistic), none of them an expert of a ``batch_dims=1`` stack (whose all-zero
    gradients the general path does not step; a parameter cut into row blocks is fine: ASGO's blocks are
    separate problems). Kept while the optimizer's owned blocks and block table are the same objects (a table
    rebuilt or a group added makes new ones)."""

    owned: list[BlockInfo]
    table: Any
    sides: list[str | None]  # per owned block, in order

    @classmethod
    def of(cls, opt: ASGO) -> StepPlan | None:
        """The plan of ``opt``'s blocks (kept on it), or None where a block is not such a block."""
        kept: StepPlan | None = opt.__dict__.get("_step_plan")
        if kept is not None and kept.owned is opt._owned and kept.table is opt.block_table:
            return kept
        routes = opt._routes()
        if any(routes[b.block_id] is not None and opt._batched(b) for b in opt._owned):
            return None
        plan = cls(opt._owned, opt.block_table, [routes[b.block_id] for b in opt._owned])
        opt.__dict__["_step_plan"] = plan  # (left out of copies and pickles: _OneSided._transient)
        return plan


def planned_step(opt: ASGO) -> bool:
    """The template's W = 1 step (see the module docstring), or False with nothing changed."""
    if not plannable(opt):
        return False
    plan = StepPlan.of(opt)
    if plan is None:
        return False
    try:  # the template's checks, views and scan
        opt._check_step(warn=False)
        views = opt._owned_views()
        stepped = [(v, side) for v, side in zip(views, plan.sides) if v.grad is not None]
        # no gradient at all: the template's step without gradients (and its warning); a block's first step:
        # its state is made by the general path
        if not stepped or not all("step" in v.state for v, _ in stepped):
            return False
        grad_sq = float(agreement.grad_sq_tensor([v.grad for v, _ in stepped]).item())  # type: ignore[misc]
    except Exception:
        # the template holds such an error until its record's reduction and raises it there, the step begun (at
        # W = 1 nothing else happens in between); a KeyboardInterrupt it raises at once, as here
        opt.comm.begin_step()
        raise
    # (the template's order: a non-finite Σ‖g‖² is taken again in float64 there, which may make it finite)
    if not math.isfinite(grad_sq) or opt._local_nonfinite([0.0]):
        return False
    opt.comm.begin_step()
    if opt._statistic_overflows(views, grad_sq):
        opt._skip_step("non-finite gradient or statistic on 1 rank(s)")
        return True
    opt._update_clean_on_raise = False  # (as the template's)
    try:
        _apply(opt, [v for v, side in stepped if side is None], [(v, side) for v, side in stepped if side is not None])
    except BaseException as e:  # as the template's (KeyboardInterrupt too): refused until load_state_dict
        if not opt._update_clean_on_raise:
            opt._update_interrupted(e)
        raise
    opt._count_step()
    return True


def _apply(opt: ASGO, adam: list[BlockView], matrix: list[tuple[BlockView, str]]) -> None:
    """:meth:`~lightning_soaa.optim.asgo._OneSided._apply` of blocks that all have their state and a gradient
    (no expert: none is idle), in its order: the counters, the guard's bound, the AdamW fallback, the
    matrices (:func:`_matrix_step_without_roots` where no root can be due, else :func:`_matrix_step_with_roots`)."""
    opt._update_clean_on_raise = True  # (as the general path's: nothing is written before the counters)
    counts = opt._counts()
    opt._update_clean_on_raise = False
    opt._statistic_guard().commit()
    opt._adam_step(adam, counts.advance("step", [v.state["step"] for v in adam]))
    views = [v for v, _ in matrix]
    mcounts = counts.advance(("step", "matrix"), [v.state["step"] for v in views])
    if _roots_due(opt, views, mcounts):
        _matrix_step_with_roots(opt, matrix, mcounts)
    else:
        _matrix_step_without_roots(opt, matrix)


def _roots_due(opt: ASGO, views: list[BlockView], counts: list[float]) -> bool:
    """Whether :meth:`~lightning_soaa.optim.asgo.ASGO._roots_due` may find a root due: a block without a root, a
    ``root_every="auto"`` group (decided from its statistic), root options changed since its root, or the
    fixed schedule. Its one side effect is made alike (the options of a block without a record are recorded
    as its root's), so that the general path, where a root is due, decides as it would have."""
    from lightning_soaa.optim.asgo import INV_ROOT, _root_options

    made: dict[int, tuple[Any, ...]] = opt.__dict__.setdefault("_root_options_of", {})
    for v, t in zip(views, counts):
        every = v.group["root_every"]
        if INV_ROOT not in v.state or every == "auto":
            return True
        opts = _root_options(v.group)
        if made.setdefault(v.block.block_id, opts) != opts or (int(t) - 1) % int(every) == 0:
            return True
    return False


def _statistics(opt: ASGO, matrix: list[tuple[BlockView, str]], counts: list[float] | None
                ) -> tuple[list[tuple[BlockView, str, torch.Tensor | None]], dict[int, torch.Tensor]]:
    """:meth:`~lightning_soaa.optim.asgo.ASGO._update_statistics` on one process: the momenta by one multi-tensor
    lerp per ``beta1``, dtype and device, each Gram by its ``addmm_`` in its own dtype, or in float64 where
    :meth:`~lightning_soaa.optim.asgo.ASGO._wide_gram` says so (``counts``: the advanced step counters; None: a
    step that takes no root, where it says no to every block), stored rounded by one multi-tensor copy; without
    the routes' look-up (the plan's sides) and the row-sharded statistics (none on one process)."""
    from lightning_soaa.optim.asgo import EXP_AVG, GRAM, _matrix_grad

    views = [v for v, _ in matrix]
    # the statistics' dtype as the general path asks it (a subclass's _state_dtype: its state's dtype)
    grads = [_matrix_grad(v.grad, opt._state_dtype(v.param), False) for v in views]  # type: ignore[arg-type]
    by: dict[tuple[Any, ...], list[int]] = {}  # (as _update_statistics: groups in first-seen order)
    for i, (v, g) in enumerate(zip(views, grads)):
        by.setdefault((float(v.group["betas"][0]), g.dtype, g.device), []).append(i)
    for (beta1, _, _), idx in by.items():
        torch._foreach_lerp_([views[i].state[EXP_AVG] for i in idx], [grads[i] for i in idx], 1.0 - beta1)
    prepared: list[tuple[BlockView, str, torch.Tensor | None]] = []
    wide: dict[int, torch.Tensor] = {}
    for i, ((v, side), g) in enumerate(zip(matrix, grads)):
        beta2 = float(v.group["betas"][1])
        if counts is not None and opt._wide_gram(v, counts[i]):
            wide[v.block.block_id] = asgo_math.gram_wide(v.state[GRAM], g, beta2, side)
        else:
            asgo_math.update_gram_(v.state[GRAM], g, beta2, side)
        prepared.append((v, side, g if v.group["nesterov"] else None))
    if wide:  # (as _update_statistics: stored rounded once, in one multi-tensor copy)
        torch._foreach_copy_([v.state[GRAM] for v in views if v.block.block_id in wide], list(wide.values()))
    return prepared, wide


def _matrix_step_with_roots(opt: ASGO, matrix: list[tuple[BlockView, str]], counts: list[float]) -> None:
    """:meth:`~lightning_soaa.optim.asgo.ASGO._matrix_step` on one process, where a root may be due (a fixed
    schedule's root step, a ``root_every="auto"`` step, a block without a root, root options edited): the
    statistics by :func:`_statistics`, then the general path's own functions, the roots due
    (:meth:`~lightning_soaa.optim.asgo.ASGO._roots_due`), their batches and everything after them
    (:meth:`~lightning_soaa.optim.asgo.ASGO._roots_and_updates`)."""
    prepared, wide = _statistics(opt, matrix, counts)
    opt._roots_and_updates(prepared, wide, opt._roots_due([v for v, _ in matrix], counts))


def _matrix_step_without_roots(opt: ASGO, matrix: list[tuple[BlockView, str]]) -> None:
    """:meth:`~lightning_soaa.optim.asgo.ASGO._matrix_step` of a step that takes no root, on one process: the
    same calls on the same tensors in the same order (:func:`_statistics`, every Gram in its own dtype; then
    :meth:`~lightning_soaa.optim.asgo.ASGO._roots_and_updates` with no root due: the Nesterov directions, ``P M``,
    the RMS normalisation and the update), without deciding which roots are due (none can be)."""
    prepared, _ = _statistics(opt, matrix, None)
    opt._roots_and_updates(prepared, {}, [])
