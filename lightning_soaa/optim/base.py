"""``ShardedOptimizer``: ZeRO-style sharded state under a plain ``torch.optim.Optimizer`` interface.

A subclass supplies the math in three hooks; the base owns blocks, collectives and checkpoints:

* ``_prepare(views) -> Tensor | None``: read owned blocks, return this rank's fp64 partial sums
  (e.g. SOAA's Σm̂², Σ(v̂+ε)). **Must not modify state or parameters** — the step may still be skipped.
* ``_decide(reduced) -> dict``: turn the all-reduced partials into scalars. Runs on every rank with
  bit-identical inputs, so every rank takes the same decision.
* ``_apply(views, scalars)``: update state and owned parameters.

One step (see :mod:`lightning_soaa.distributed.comm` for the picture)::

    [join the default group if it appeared after construction]   # once; see _ensure_joined
    [grad_reduction="mean": reduce_scatter grads to owners]
    partials = _prepare(owned views)                      # local, no communication; errors are held
    reduced  = all_reduce_scalars([nonfinite, partials, extra, agreement rows])  # ONE fp64 call
    any rank's held error, other hyperparameters -> raise on every rank; nothing changed
    if reduced[0] > 0: skip on every rank; nothing advances
    gradients that differ across ranks (grad_reduction="none") -> raise on every rank
    _apply(owned views, _decide(reduced))
    all_gather_flat(owned parameters)                      # one call per dtype

The agreement rows (W > 1; :mod:`lightning_soaa.distributed.agreement`) are 4 values per rank, each rank
filling only its own row, so the sum hands every rank every rank's values exactly. At construction the
ranks all-gather a fixed-size digest of the class, parameters, names and hyperparameters.

State for a whole-parameter block lives in ``self.state[p]`` as in torch (``state[p]["exp_avg"]``);
a parameter split into several blocks keeps ``self.state[p][sub_index] = {...}`` for the blocks this
rank owns. Checkpoints are keyed by ``(param_index, sub_index)`` and are independent of world size.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_soaa.config import ShardingConfig
from lightning_soaa.distributed import agreement
from lightning_soaa.distributed.blocks import BlockInfo, BlockSpec, BlockTable
from lightning_soaa.distributed.checkpoint import (
    FORMAT_KEY,
    StateField,
    build_state_dict,
    select_owned_state,
    validate_state_dict,
)
from lightning_soaa.distributed.comm import (
    Communicator,
    default_communicator,
    default_group_ready,
    distributed_running,
)

__all__ = ["ShardedOptimizer", "BlockView"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BlockView:
    """An owned block as the math sees it: views into the parameter and gradient, and its state."""

    block: BlockInfo
    param: Tensor  # view into the parameter
    grad: Tensor | None  # view into the gradient (None: no gradient this step)
    state: dict[str, Any]
    group: dict[str, Any]
    name: str | None = None
    scratch: dict[str, Any] = dataclasses.field(default_factory=dict)  # _prepare -> _apply hand-over


class ShardedOptimizer(torch.optim.Optimizer):
    """Base class: owned blocks, an injected :class:`Communicator`, world-size independent checkpoints.

    Args:
        params: tensors, ``(name, tensor)`` pairs (``named_parameters()``) or param-group dicts.
        defaults: hyperparameter defaults (torch convention).
        process_group: ``None`` uses the default group when torch.distributed is initialized with
            world size > 1, otherwise runs as a single process.
        comm: inject a communicator directly (tests, DeepSpeed adapter); overrides ``process_group``.
        shard: see :class:`~lightning_soaa.config.ShardingConfig`.
        grad_reduction: see :class:`~lightning_soaa.config.ShardingConfig`.
    """

    #: number of fp64 partials ``_prepare`` returns; fixed per optimizer so all ranks agree on shapes.
    num_partials: int = 0
    #: number of values ``_extra_partials`` returns; fixed per optimizer (a rank whose preparation raised
    #: still sends this many zeros, so the step's all-reduce keeps its size on every rank).
    num_extras: int = 0
    #: True when ``_prepare``'s partials are non-finite whenever an owned gradient is (e.g. SOAA's Σm̂²):
    #: the base then skips its own scan of the owned gradients. Blocks a rank does not own are covered
    #: separately: with ``grad_reduction="none"`` on W > 1 sharded ranks every local gradient is read
    #: once per step anyway (:meth:`_agreement_rows`), which also flags a NaN this rank alone sees in a
    #: block another rank owns; with ``"mean"`` the owner's averaged gradient carries any rank's NaN.
    partials_cover_grads: bool = False

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        process_group: Any = None,
        comm: Communicator | None = None,
        shard: bool = True,
        grad_reduction: str = "none",
    ) -> None:
        self.sharding = ShardingConfig(shard=shard, grad_reduction=grad_reduction)
        self.comm: Communicator = comm if comm is not None else default_communicator(process_group)
        # Built before the default process group exists (stock LightningCLI --optimizer, user code that
        # builds the optimizer first): join that group before the first collective (see _ensure_joined).
        self._join_pending = comm is None and process_group is None and not distributed_running()
        self._unjoined_steps = 0  # steps taken as a single process while a join was pending
        self._table: BlockTable | None = None
        self._consolidated: dict[str, Any] | None = None
        self._consolidated_at: int = -1
        self.num_steps = 0  # optimizer steps taken (not counting skipped ones)
        self.skipped_steps = 0
        super().__init__(params, defaults)
        self._build_table()

    # ------------------------------------------------------------------ hooks for subclasses
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for invalid hyperparameters in ``group`` (defaults already filled in)."""

    def _block_specs(self, param: Tensor, group: dict[str, Any], name: str | None) -> list[BlockSpec]:
        """How to cut ``param`` into blocks; default: the whole parameter, cost = numel."""
        return [BlockSpec(None, 0, 0, float(max(param.numel(), 1)))]

    def _prepare(self, views: list[BlockView]) -> Tensor | None:
        return None

    def _extra_partials(self) -> list[float]:
        """Rank-local scalars to sum with the partials (e.g. the loss); length fixed per optimizer."""
        return []

    def _decide(self, reduced: Tensor) -> dict[str, Any]:
        return {}

    def _apply(self, views: list[BlockView], scalars: dict[str, Any]) -> None:
        raise NotImplementedError

    def _on_skip(self) -> None:
        """Called on every rank when a step is skipped for a non-finite value."""

    def _global_state(self) -> dict[str, Any]:
        """Optimizer-wide state (identical on all ranks) for checkpoints. May run collectives: it is
        called from :meth:`consolidate_state_dict` on every rank."""
        return {}

    def _load_global_state(self, state: dict[str, Any]) -> None:
        pass

    def _state_schema(self, block: BlockInfo, param: Tensor, group: dict[str, Any]) -> dict[str, StateField] | None:
        """The tensors this optimizer keeps for ``block`` (key -> shape, dtype, sign), checked by
        :meth:`load_state_dict` before anything changes. None: not declared (nothing is checked)."""
        return None

    def _validate_global_state(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the field when the saved optimizer-wide state is invalid; runs
        before anything changes. ``state`` is what :meth:`_global_state` saved (plus step counters)."""

    def _extra_statistics(self) -> dict[str, float]:
        return {}

    # ------------------------------------------------------------------ parameter groups and blocks
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()  # a rejected group must leave the optimizer unchanged
            raise
        if self._table is not None:  # added after construction: re-shard, keeping existing state
            full = self._gather_full_state() if self._sharded_multi_rank() else None
            self._build_table()
            if full is not None:
                self._restore_owned_state(full)

    def _all_params(self) -> list[tuple[Tensor, int, str | None]]:
        out = []
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for j, p in enumerate(group["params"]):
                out.append((p, gi, names[j] if names else None))
        return out

    def _sharded_multi_rank(self) -> bool:
        return self.sharding.shard and self.comm.world_size > 1

    def _build_table(self) -> None:
        plist = self._all_params()
        params = [p for p, _, _ in plist]
        if self._sharded_multi_rank():
            self._check_same_params_on_all_ranks(params, [name for _, _, name in plist])
        specs = [self._block_specs(p, self.param_groups[gi], name) for p, gi, name in plist]
        self._table = BlockTable(
            params,
            [gi for _, gi, _ in plist],
            specs,
            world_size=self.comm.world_size if self.sharding.shard else 1,
            rank=self.comm.rank if self.sharding.shard else 0,
            shard=self.sharding.shard,
        )
        self._params = params
        self._names = [name for _, _, name in plist]
        self._owned = self._table.owned()
        self._flat_layouts = self._make_flat_layouts()

    def _check_same_params_on_all_ranks(self, params: list[Tensor], names: list[str | None]) -> None:
        """Fail fast, on every rank together, when ranks disagree on the optimizer class, the parameters
        (names, shapes, dtypes, order), the hyperparameters or the sharding options. The collective is an
        all-gather of a fixed-size vector, so it matches in size even between different classes."""
        mine = agreement.construction_digests(self, params, names, self._unjoined_steps)
        everyone = self.comm.all_gather_flat(mine).view(self.comm.world_size, -1)
        agreement.check_construction(self, everyone)

    def _ensure_joined(self) -> None:
        """Join the default process group if it appeared after construction (collective then).

        Called where every rank makes a collective anyway (the step, :meth:`consolidate_state_dict`).
        The local (unsharded) state, e.g. loaded from a checkpoint before the first step, is kept for the
        blocks this rank owns after sharding. Ranks that already stepped alone raise, on every rank.
        """
        if not self._join_pending or not default_group_ready():
            return
        full = self._gather_full_state()  # local: the LocalComm owns every block
        local_comm = self.comm
        self.comm = default_communicator(None)
        self._join_pending = False
        try:
            self._build_table()
        except Exception:
            self.comm, self._join_pending = local_comm, True  # nothing changed: still the local table
            raise
        log.info("%s: joined the %d-rank default process group at its first collective (it was built "
                 "before torch.distributed was initialized)", type(self).__name__, self.comm.world_size)
        self._restore_owned_state(full)

    def _join_before_step(self) -> None:
        """At the start of every step (also in subclasses that drive their own step, e.g. EGN): join the
        default group if it has appeared, or count a step taken as a single process."""
        self._ensure_joined()
        if self._join_pending:
            self._unjoined_steps += 1

    @property
    def join_pending(self) -> bool:
        """True while the optimizer waits to join a default process group that did not exist when it
        was built; it joins at its next step once the group exists."""
        return self._join_pending

    @property
    def block_table(self) -> BlockTable:
        assert self._table is not None
        return self._table

    def block_state(self, block: BlockInfo) -> dict[str, Any]:
        """The state dict of one owned block (created empty on first use)."""
        st = self.state[self._params[block.param_index]]
        if block.dim is None:
            return st
        return st.setdefault(block.sub_index, {})

    def _owned_views(self) -> list[BlockView]:
        views = []
        for b in self._owned:
            p = self._params[b.param_index]
            views.append(
                BlockView(
                    block=b,
                    param=b.view(p),
                    grad=None if p.grad is None else b.view(p.grad),
                    state=self.block_state(b),
                    group=self.param_groups[b.group_index],
                    name=self._names[b.param_index],
                )
            )
        return views

    # ------------------------------------------------------------------ flat buffers per dtype
    def _make_flat_layouts(self) -> dict[torch.dtype, list[list[BlockInfo]]]:
        """Per dtype: the blocks of each rank, in block order (the packing order of flat buffers)."""
        layouts: dict[torch.dtype, list[list[BlockInfo]]] = {}
        if not self._sharded_multi_rank():
            return layouts
        for b in self.block_table.blocks:
            dt = self._params[b.param_index].dtype
            per_rank = layouts.setdefault(dt, [[] for _ in range(self.comm.world_size)])
            per_rank[b.owner].append(b)
        return layouts

    @staticmethod
    def _padded_len(per_rank: list[list[BlockInfo]]) -> int:
        return max(sum(b.numel for b in blist) for blist in per_rank)

    def _layout_device(self, per_rank: list[list[BlockInfo]]) -> torch.device:
        """Where the parameters of one flat layout live (any block will do: a layout has one dtype and,
        in every supported setup, one device). A rank that owns nothing still builds its buffer there."""
        first = next(b for blist in per_rank for b in blist)
        return self._params[first.param_index].device

    def _gather_params(self) -> None:
        """All-gather updated parameters from their owners: one collective per dtype."""
        rank, world = self.comm.rank, self.comm.world_size
        for dt, per_rank in self._flat_layouts.items():
            n = self._padded_len(per_rank)
            if n == 0:
                continue
            buf = torch.zeros(n, dtype=dt, device=self._layout_device(per_rank))
            off = 0
            for b in per_rank[rank]:
                buf[off:off + b.numel].view(b.shape).copy_(b.view(self._params[b.param_index]))
                off += b.numel
            out = self.comm.all_gather_flat(buf)
            for r in range(world):
                if r == rank:
                    continue
                off = r * n
                for b in per_rank[r]:
                    b.view(self._params[b.param_index]).copy_(out[off:off + b.numel].view(b.shape))
                    off += b.numel

    def _reduce_scatter_grads(self) -> None:
        """Average gradients across ranks, delivering to each rank only the blocks it owns."""
        rank, world = self.comm.rank, self.comm.world_size
        for dt, per_rank in self._flat_layouts.items():
            n = self._padded_len(per_rank)
            if n == 0:
                continue
            buf = torch.zeros(world * n, dtype=dt, device=self._layout_device(per_rank))
            for r in range(world):
                off = r * n
                for b in per_rank[r]:
                    p = self._params[b.param_index]
                    if p.grad is not None:
                        buf[off:off + b.numel].view(b.shape).copy_(b.view(p.grad))
                    off += b.numel
            mine = self.comm.reduce_scatter_flat(buf).div_(world)
            off = 0
            for b in per_rank[rank]:
                p = self._params[b.param_index]
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                b.view(p.grad).copy_(mine[off:off + b.numel].view(b.shape))
                off += b.numel

    # ------------------------------------------------------------------ the step
    def _run_closure(self, closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimizer step (collective when W > 1: every rank must call it)."""
        loss, error = None, None
        try:
            loss = self._run_closure(closure)
        except Exception as e:
            error = e
        self._sharded_step(local_error=error)
        return loss

    def _local_nonfinite(self, views: list[BlockView], partials: Tensor | None, extra: list[float],
                         grads_checked: bool = False) -> bool:
        """True when this rank sees a non-finite gradient, partial, extra or optimizer-wide scalar.

        ``grads_checked``: every local gradient was already read by the cross-rank gradient check (its
        digest is non-finite iff a gradient is), so the owned ones need no second scan.
        """
        grads = [v.grad for v in views if v.grad is not None]
        bad = False
        if grads and not grads_checked and not (self.partials_cover_grads and partials is not None):
            norms = torch._foreach_norm(grads)
            bad = not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())
        if partials is not None and not bool(torch.isfinite(partials).all()):
            bad = True
        if any(not math.isfinite(x) for x in extra):
            bad = True
        return bad or self._state_nonfinite()

    def _state_nonfinite(self) -> bool:
        """True when an optimizer-wide scalar the next update reads is non-finite (e.g. SOAA's trust
        multiplier); the step is then skipped on every rank instead of writing NaN to the parameters."""
        return False

    def _compares_grads(self) -> bool:
        """Gradients must be equal on every rank when each block is updated with its owner's gradient
        (``grad_reduction="none"``, sharded, W > 1): DDP (or the user) must have averaged them."""
        return self.sharding.grad_reduction == "none" and self._sharded_multi_rank()

    def _prepare_locally(self, local_error: BaseException | None
                         ) -> tuple[list[BlockView], Tensor, list[float], BaseException | None]:
        """The local half of a step (no communication). An exception is returned, not raised, so that
        this rank still joins the step's all-reduce and every rank raises together."""
        views = self._owned_views()
        partials = torch.zeros(self.num_partials, dtype=torch.float64)
        extra = [0.0] * self.num_extras
        if local_error is not None:
            return views, partials, extra, local_error
        try:
            prepared = self._prepare(views)
            if prepared is not None:
                partials = prepared.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
            if partials.numel() != self.num_partials:
                raise RuntimeError(f"_prepare returned {partials.numel()} partials, expected {self.num_partials}")
            extra = [float(x) for x in self._extra_partials()]
            if len(extra) != self.num_extras:
                raise RuntimeError(f"_extra_partials returned {len(extra)} values, expected {self.num_extras}")
        except Exception as e:
            return views, torch.zeros(self.num_partials, dtype=torch.float64), [0.0] * self.num_extras, e
        return views, partials, extra, None

    def _agreement_rows(self, error: BaseException | None) -> tuple[Tensor, bool]:
        """This rank's row of the step's agreement block (W > 1) and whether its gradients are finite."""
        if self.comm.world_size == 1:
            return torch.zeros(0, dtype=torch.float64), True
        grad_sq, finite, count = 0.0, True, 0
        if self._compares_grads():
            grads = [p.grad for p in self._params if p.grad is not None]
            grad_sq, finite = agreement.grad_digest(grads)
            count = len(grads)
        rows = agreement.step_rows(self.comm.rank, self.comm.world_size, error=error is not None,
                                   hyper=agreement.hyperparameter_digest(self.param_groups),
                                   grad_sq=grad_sq, grad_count=count)
        return rows, finite

    def _raise_disagreement(self, verdict: agreement.StepVerdict, error: BaseException | None) -> None:
        """Raise on every rank (the same decision everywhere: the verdict is bit-identical)."""
        name = type(self).__name__
        if verdict.error_ranks:
            if error is not None:
                raise error
            raise RuntimeError(
                f"{name}.step: rank(s) {verdict.error_ranks} raised an error before the step's all-reduce "
                f"(see that rank's traceback); the step was abandoned on every rank and nothing changed."
            )
        if verdict.hyper_ranks:
            raise RuntimeError(
                f"{name}.step: the hyperparameters (param_groups, e.g. lr) on rank(s) {verdict.hyper_ranks} "
                "differ from rank 0's; every rank must set the same values (same scheduler on every rank). "
                "Nothing changed."
            )
        if verdict.grad_ranks:
            raise RuntimeError(
                f"{name}.step: the gradients on rank(s) {verdict.grad_ranks} differ from rank 0's, but with "
                "grad_reduction='none' every block is updated with its owner's gradient, so the ranks would "
                "train on different data without averaging it. Wrap the model in DistributedDataParallel "
                "(Lightning strategy='ddp' does), or construct the optimizer with grad_reduction='mean' to "
                "have it average the gradients itself. Nothing changed."
            )

    def _sharded_step(self, local_error: BaseException | None = None) -> bool:
        """The template step. Returns False when the step was skipped on every rank.

        ``local_error``: an exception this rank raised before the step (e.g. an invalid loss); it is
        reported through the all-reduce and raised on every rank, so the ranks stay in step.
        """
        self._join_before_step()
        self.comm.begin_step()
        if self.sharding.grad_reduction == "mean" and self._sharded_multi_rank():
            self._reduce_scatter_grads()
        views, partials, extra, error = self._prepare_locally(local_error)
        rows, grads_finite = self._agreement_rows(error)
        bad = error is None and (not grads_finite or self._local_nonfinite(
            views, partials, extra, grads_checked=self._compares_grads()))
        head = torch.tensor([1.0 if bad else 0.0], dtype=torch.float64)
        # Every rank joins this call, including ranks that own no block, so shapes always match.
        reduced = self.comm.all_reduce_scalars(torch.cat([head, partials,
                                                          torch.tensor(extra, dtype=torch.float64), rows]))
        if self.comm.world_size == 1:
            if error is not None:
                raise error
        else:
            ntail = rows.numel()
            verdict = agreement.read_step_rows(reduced[reduced.numel() - ntail:], self.comm.world_size,
                                               compare_grads=self._compares_grads() and reduced[0].item() == 0)
            self._raise_disagreement(verdict, error)
        if reduced[0].item() > 0:
            self.skipped_steps += 1
            log.warning(
                "%s: non-finite gradient or statistic on %d rank(s); step skipped on every rank "
                "(skipped so far: %d)", type(self).__name__, int(reduced[0].item()), self.skipped_steps,
            )
            self._on_skip()
            return False
        scalars = self._decide(reduced[1:1 + self.num_partials + self.num_extras])
        self._apply(views, scalars)
        if self._sharded_multi_rank():
            self._gather_params()
        self.num_steps += 1
        return True

    # ------------------------------------------------------------------ statistics
    def statistics(self) -> dict[str, float]:
        """Scalars for loggers: steps, skipped steps, ownership balance, communication of the last step."""
        stats: dict[str, float] = {
            "steps": float(self.num_steps),
            "skipped_steps": float(self.skipped_steps),
            "world_size": float(self.comm.world_size),
            "owned_blocks": float(len(self._owned)),
            "ownership_balance": float(self.block_table.balance()),
        }
        last = getattr(self.comm, "last_step_stats", None)
        current = self.comm.step_stats
        # The step that just finished is in step_stats until the next begin_step().
        src = current if current.total_calls else last
        if src is not None:
            stats.update(src.as_dict())
        stats.update(self._extra_statistics())
        return stats

    # ------------------------------------------------------------------ checkpoints
    def _local_block_states(self) -> dict[tuple[int, int], dict[str, Any]]:
        out: dict[tuple[int, int], dict[str, Any]] = {}
        for b in self._owned:
            st = self.block_state(b)
            blk = {k: v for k, v in st.items() if not isinstance(k, int)}
            if blk:
                out[b.key] = {k: (v.detach().cpu().clone() if isinstance(v, Tensor) else copy.deepcopy(v))
                              for k, v in blk.items()}
        return out

    def _gather_full_state(self) -> dict[str, Any]:
        """Collective: every rank's owned block states, merged, plus the global state."""
        local = self._local_block_states()
        merged: dict[tuple[int, int], dict[str, Any]] = {}
        for part in self.comm.all_gather_object(local) if self._sharded_multi_rank() else [local]:
            merged.update(part)
        return build_state_dict(
            optimizer=self,
            block_states=merged,
            global_state={**self._global_state(), "num_steps": self.num_steps,
                          "skipped_steps": self.skipped_steps},
        )

    def consolidate_state_dict(self, to: int | None = 0) -> None:
        """Collective: gather the sharded state so that :meth:`state_dict` returns the full state.

        Every rank must call it (Lightning does before saving). ``to`` keeps the result on that rank only;
        ``None`` keeps it on every rank (needed when each rank later calls ``state_dict()``).
        """
        self._ensure_joined()
        full = self._gather_full_state()
        if to is None or to == self.comm.rank:
            self._consolidated = full
            self._consolidated_at = self.num_steps + self.skipped_steps
        else:
            self._consolidated = None

    def state_dict(self) -> dict[str, Any]:
        """The full, world-size independent state.

        Without sharding (or with one rank) this is local. With W > 1 sharded ranks call
        :meth:`consolidate_state_dict` on every rank first.
        """
        if not self._sharded_multi_rank():
            return self._gather_full_state()
        if self._consolidated is None or self._consolidated_at != self.num_steps + self.skipped_steps:
            raise RuntimeError(
                f"{type(self).__name__}.state_dict() on rank {self.comm.rank} of {self.comm.world_size}: the "
                "state is sharded; call consolidate_state_dict() on every rank first (a collective), then "
                "state_dict() on the rank that saves."
            )
        return self._consolidated

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved at any world size; keep only the blocks this rank owns.

        The input is validated completely before anything changes, so a bad state dict leaves the
        optimizer untouched.
        """
        validate_state_dict(self, state_dict)
        new_groups = []
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            g = dict(group)
            for k, v in saved.items():
                if k not in ("params", "param_names"):
                    g[k] = tuple(v) if k == "betas" else v
            self._validate_group(g)
            new_groups.append(g)
        self._restore_owned_state(state_dict)
        for group, g in zip(self.param_groups, new_groups):
            group.update({k: v for k, v in g.items() if k not in ("params", "param_names")})

    def _restore_owned_state(self, state_dict: dict[str, Any]) -> None:
        owned_states = select_owned_state(self, state_dict)
        new_state: dict[Tensor, dict[Any, Any]] = {}
        for b in self._owned:
            blk = owned_states.get(b.key)
            if blk is None:
                continue
            p = self._params[b.param_index]
            st = new_state.setdefault(p, {})
            if b.dim is None:
                st.update(blk)
            else:
                st[b.sub_index] = blk
        self.state.clear()
        for p, st in new_state.items():
            self.state[p] = st
        glob = dict(state_dict[FORMAT_KEY]["global"])
        self.num_steps = int(glob.pop("num_steps", 0))
        self.skipped_steps = int(glob.pop("skipped_steps", 0))
        self._load_global_state(glob)
        self._consolidated = None
