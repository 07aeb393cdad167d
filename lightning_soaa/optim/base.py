"""``ShardedOptimizer``: ZeRO-style sharded state under a plain ``torch.optim.Optimizer`` interface.

A subclass supplies the math in three hooks; the base owns blocks, collectives and checkpoints:

* ``_prepare(views) -> StepRecord | None``: read owned blocks, return this rank's record: its
  :func:`summed` fields are the fp64 partial sums (e.g. SOAA's Σm̂², Σ(v̂+ε), the loss), its other
  fields hand tensors over to ``_apply``. **Must not modify state or parameters** — the step may still
  be skipped.
* ``_decide(reduced) -> decision``: turn the all-reduced record into a (typed) decision. Runs on every
  rank with bit-identical inputs, so every rank takes the same decision.
* ``_apply(views, decision)``: update state and owned parameters.

One step (see :mod:`lightning_soaa.distributed.comm` for the picture)::

    [join the default group if it appeared after construction]   # once; see _ensure_joined
    _exchange_in()        # default, grad_reduction="mean" at W > 1: an order check the record's size (see
                          #   _meet_in_order), then reduce_scatter grads to owners
    record  = _prepare(owned views)                       # local, no communication; errors are held
    reduced = all_reduce_scalars([record.vector(), agreement rows, stop vote])   # ONE fp64 call, every rank
    any rank's held error, other hyperparameters -> raise on every rank; nothing changed
    gradients that differ across ranks (grad_reduction="none") -> raise on every rank
    if reduced.gradient_ranks == 0: return on every rank; nothing changes, nothing is counted
    if reduced.nonfinite > 0: skip on every rank; nothing advances
    _apply(owned views, _decide(reduced))
    _exchange_out(decision)  # default: all_gather_flat(owned parameters), one call per dtype; the first carries
                             #   each rank's word on its _apply (see _update_and_gather): every rank raises together

The vector's layout is the step record's class (:class:`StepRecord`): the non-finite flag and the count
of ranks with a gradient, then the subclass's summed fields in declaration order, written once. Flat-buffer
moves between ranks and owners live in :class:`~lightning_soaa.distributed.exchange.OwnerExchange`
(``self.exchange``).

**Extension points** for optimizers whose step needs collectives the template does not have (EGN: a
validation all-reduce, the Gram-factor all-gather, a reduce-scatter of its direction; after the
decision, a gather of the direction and line-search all-reduces): override :meth:`_exchange_in`
(before ``_prepare``; it may return a reason to skip, which every rank must derive identically; its
first collective must have :func:`~lightning_soaa.distributed.agreement.record_size` values and the
instance id at ``agreement.INSTANCE_SLOT`` of each rank's row, so that a rank in another optimizer's step
meets it in a call of equal size and both raise :meth:`_out_of_order`),
run them in ``_decide`` (which may return :class:`SkipStep`), and override :meth:`_exchange_out`
(after ``_apply``, replacing the parameter gather). The skip path (counter, log, ``_on_skip``) and
``num_steps`` stay in the base.

Step hooks (torch's ``register_step_pre_hook``/``register_step_post_hook``) wrap every ``step()`` call,
as in torch, so they also fire for a step the optimizer skips for a non-finite value (``skipped_steps``
tells the two apart); a ``step()`` that raises fires no post hook.

Copies and pickles (``copy.deepcopy(opt)``, ``pickle.dumps(opt)``, ``torch.save(opt)``) keep everything
the optimizer needs to continue identically: configs, block table, optimizer-wide scalars, state.
torch's own ``Optimizer.__getstate__`` keeps only ``defaults``/``state``/``param_groups``, so the base
overrides it. As in torch, step and state-dict hooks are not copied. The communicator: a deepcopy shares
the process group (fresh counters); a pickle made at W > 1 re-attaches to the default process group at
its first collective and checks that the world size and rank are the ones it was built for (see
:class:`~lightning_soaa.distributed.comm.DeferredComm`); at W = 1 it stays a ``LocalComm``.

The agreement rows (W > 1; :mod:`lightning_soaa.distributed.agreement`) are ``STEP_ROW`` values per rank
(error flag, hyperparameters, gradients, step counter, replica check, the optimizer's instance id), each
rank filling only its own row, so the sum hands every rank every rank's values exactly. The record's
values are padded to ``RECORD_SLOTS``, so the call has one size for every optimizer class: two optimizers
stepped in different orders on two ranks meet in it and raise (instance ids) instead of crossing their
blocks silently. At construction every rank of a W > 1 group
all-gathers a fixed-size digest of the class, parameters, names, hyperparameters and sharding options.

State for a whole-parameter block lives in ``self.state[p]`` as in torch (``state[p]["exp_avg"]``);
a parameter split into several blocks keeps ``self.state[p][sub_index] = {...}`` for the blocks this
rank owns. Checkpoints are keyed by ``(param_index, sub_index)`` and are independent of world size.

**Configs** (one convention for every optimizer): ``self.config`` is the frozen config built from the
constructor's arguments (``SOAAConfig``, ``EGNConfig``, ...). Optimizer-wide options, which no param
group may override (SOAA's ``acceptance``, EGN's ``loss`` and line search), are read from it.
Per-group hyperparameters (``lr``, ``betas``, ``eps``, ``weight_decay``, ``momentum``, ASGO's options)
are always read from ``self.param_groups`` at step time, so that LR schedulers and ``load_state_dict``
reach them; the one documented exception is a constructor value in an optimizer-wide role (SOAA's trust
region uses the constructor's β1 and eps). ``_validate_group`` checks a group by building the config
class from it (:func:`~lightning_soaa.config.config_from_group`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import operator
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple, NoReturn, overload

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from lightning_soaa.config import REPLICA_CHECK_EVERY, ShardingConfig
from lightning_soaa.distributed import agreement, reduce_order
from lightning_soaa.distributed.blocks import (
    BlockInfo,
    BlockSpec,
    BlockTable,
    row_block_specs,
    signature_fingerprint,
)
from lightning_soaa.distributed.checkpoint import (
    FORMAT_KEY,
    CheckpointView,
    StateField,
    build_state_dict,
    commit_groups,
    group_record,
    loaded_groups,
    saved_groups,
    select_owned_state,
    steps_ahead,
    validate_state_dict,
    with_group_meta,
    with_saved_groups,
)
from lightning_soaa.distributed.comm import (
    Communicator,
    DeferredComm,
    LocalComm,
    TorchComm,
    default_communicator,
    default_group_ready,
    dist_world,
    distributed_running,
    group_key,
)
from lightning_soaa.distributed.dtensor import (
    DTensorLayout,
    FSDPGroups,
    fsdp_groups_on_meshes,
    has_dtensor,
    local,
    replicas_may_drift,
)
from lightning_soaa.distributed.exchange import UNSENT, OwnerExchange
from lightning_soaa.distributed.hyper_digest import HyperparameterDigest
from lightning_soaa.distributed.reblock import fit_layout
from lightning_soaa.distributed.replica_drift import DRIFT_RTOL, beyond_drift, pieces_beyond_drift
from lightning_soaa.distributed.shard_replicas import ShardReplicas, shard_replicas
from lightning_soaa.distributed.state_gather import gather_block_states
from lightning_soaa.distributed.stop_vote import StopVote, in_handler_checkpoint_signal
from lightning_soaa.functional.adamw import increment_counts_
from lightning_soaa.kernels.raw import cell_values, value_cells
from lightning_soaa.optim import dcp_flat, dcp_order, grad_clip, grad_marks, saving_rank
from lightning_soaa.optim import dcp_state as dcp
from lightning_soaa.optim.construction import collective_construction, failed_row
from lightning_soaa.optim.dcp_plain import handed_out, without_placeholders
from lightning_soaa.optim.lightning_clip import (
    clip_difference,
    drop_kept_clips,
    keep_clips,
    lightning_wrapping,
    routed_clip,
    running_trainer,
)
from lightning_soaa.optim.param_checks import (
    DisjointStorage,
    Signature,
    StorageMemo,
    check_disjoint_storage,
    check_param_group,
    check_step,
    check_torch_options,
    gradient_mismatch,
    param_signatures,
    storage_prints,
    warn_misspelt_keys,
)
from lightning_soaa.optim.sd_hooks import hooked_load, hooked_state_dict, keep_run_state
from lightning_soaa.optim.step_context import (
    amp_after_raise,
    amp_unscale_,
    caller_autocast,
    full_precision_no_grad,
    outside_inference_mode,
)
from lightning_soaa.optim.step_hooks import grads_to_none, hooked_step, torch_zero_grad_next

__all__ = ["ShardedOptimizer", "BlockView", "SkipStep", "StepCounts", "StepRecord", "host_floats", "summed"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)  # built for every owned block at every step: slots make that cheaper
class BlockView:
    """An owned block as the math sees it: views into the parameter and gradient, and its state."""

    block: BlockInfo
    param: Tensor  # view into the parameter
    grad: Tensor | None  # view into the gradient (None: no gradient this step)
    state: dict[str, Any]
    group: dict[str, Any]
    name: str | None = None
    #: whether this rank's piece enters global sums (False for a replica of an HSDP shard or of a plain
    #: tensor under FSDP2; see lightning_soaa.distributed.dtensor). Always True without DTensors.
    counted: bool = True


def summed(default: float = 0.0) -> Any:
    """Declare a :class:`StepRecord` field that the step's one all-reduce sums over ranks."""
    return dataclasses.field(default=default, metadata={"summed": True})


@dataclasses.dataclass
class StepRecord:
    """What ``_prepare`` hands to the step: the rank-local fp64 sums and, in plain fields, tensors for
    ``_apply``.

    The all-reduced vector is the :func:`summed` fields in declaration order (this class's flag first,
    then a subclass's fields), so its layout is written once, here and in the subclass. Every rank uses
    the same class, so every rank passes the same shape. Summed fields may hold floats or 0-d tensors.
    """

    #: ranks that saw a non-finite value (the base sets this rank's 0/1; > 0 after the reduction: skip)
    nonfinite: float = summed()
    #: ranks owning a block with a gradient (the base sets this rank's 0/1; 0 after the reduction: no
    #: parameter has a gradient on any rank, and the step changes nothing: ``_step_without_gradients``)
    gradient_ranks: float = summed()

    @classmethod
    def summed_fields(cls) -> tuple[str, ...]:
        # Read at every step: computed once per class (a subclass gets its own entry, not its base's).
        names: tuple[str, ...] | None = cls.__dict__.get("_summed_names")
        if names is None:
            names = tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("summed"))
            cls._summed_names = names  # type: ignore[attr-defined]
        return names

    def values(self) -> list[float]:
        """The summed fields as Python floats (the order of :meth:`summed_fields`). Tensor fields (0-d,
        on any device) are stacked and copied to the host at once: one synchronisation per step, not one
        per value."""
        return host_floats([getattr(self, n) for n in self.summed_fields()])

    def vector(self) -> Tensor:
        """:meth:`values` as one fp64 CPU vector."""
        return torch.tensor(self.values(), dtype=torch.float64)

    def with_sums(self, values: Sequence[float] | Tensor) -> StepRecord:
        """A copy whose summed fields are ``values`` (the all-reduced values); other fields are kept."""
        vals = values.tolist() if isinstance(values, Tensor) else values
        fields = dict(zip(self.summed_fields(), vals))
        if not hasattr(self, "__dict__"):  # a record with slots
            return dataclasses.replace(self, **fields)
        # a shallow copy of the instance dict, not dataclasses.replace (which re-runs __init__ with every
        # field: ~7 us a step, a visible cost of a small model's step); the same fields and values
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__.update(fields)
        return new


def host_floats(values: Sequence[Any]) -> list[float]:
    """``values`` (floats, ints, 0-d tensors on any device) as Python floats, the tensors converted to
    float64 and copied to the host together (one stack and one copy for all of them)."""
    out: list[float] = []
    pos: list[int] = []
    ts: list[Tensor] = []
    for i, x in enumerate(values):
        if isinstance(x, Tensor):
            pos.append(i)
            ts.append(x)
            out.append(0.0)
        else:
            out.append(float(x))
    if not ts:
        return out
    dev = ts[0].device
    if dev.type == "cpu" and all(x.device.type == "cpu" for x in ts):
        # No device to synchronise with: .item() each is cheaper than a stack (the same floats).
        for i, x in zip(pos, ts):
            out[i] = float(x.item())
        return out
    ts = [x if x.dtype == torch.float64 and x.device == dev and x.dim() == 0
          else x.to(dev, torch.float64).reshape(()) for x in ts]  # a no-op costs an ATen call
    for i, v in zip(pos, torch.stack(ts).tolist()):
        out[i] = v
    return out


_version_of = operator.attrgetter("_version")


def _differences(by_rank: Sequence[Sequence[int] | None], ranks: Sequence[int], ref: Sequence[int],
                 index: Sequence[int]) -> list[int]:
    """``index`` of every parameter, in order, whose sums (one list per rank) one of ``ranks`` holds otherwise
    than its reference rank ``ref[r]``; empty where none could tell (a rank that sent None)."""
    pairs = [(by_rank[r], by_rank[ref[r]]) for r in ranks]
    told = [(mine, theirs) for mine, theirs in pairs if mine is not None and theirs is not None]
    width = len(told[0][0]) if told else 0
    return [index[j] for j in range(width) if any(mine[j] != theirs[j] for mine, theirs in told)]


def _param_versions(params: list[Tensor]) -> list[int]:
    """Each parameter's version counter; -1 for an inference tensor (a model built under
    ``torch.inference_mode()``), which has none: torch's bare "Inference tensors do not track version counter"
    was raised at W > 1 after the step had updated every parameter. (The one C-level pass first.)"""
    try:
        return list(map(_version_of, params))
    except RuntimeError:
        return [-1 if p.is_inference() else p._version for p in params]


_dtype_of = operator.attrgetter("dtype")
_is_cpu = operator.attrgetter("is_cpu")
# Counts below these are exact in their dtype, so writing count + 1 is what add_(1) writes.
_EXACT_COUNT = {torch.float32: float(1 << 24), torch.float64: float(1 << 53)}


#: The step template's hooks (:meth:`ShardedOptimizer._template_step`) that a planned step stands in for
TEMPLATE_HOOKS = ("_exchange_in", "_reduce_record", "_prepare", "_decide", "_apply", "_exchange_out")


def overrides_any(obj: Any, owner: type, names: Sequence[str]) -> bool:
    """Whether ``obj``'s class replaces any of ``owner``'s methods ``names``. A planned step (SOAA's, ASGO's)
    stands in for the template's hooks it names: a subclass that overrides one of them takes the template,
    where its override runs (else the plan would skip it without a word on every planned step)."""
    cls = type(obj)
    return any(getattr(cls, n) is not getattr(owner, n) for n in names)


#: the order check's error flag of a rank that could not make the gradient exchange's buffers (any value but 0 and
#: 1: the flag of a rank that joins the exchange with zeros); only that check reads it
_NO_BUFFERS = 3.0


def _update_failure_code(error: BaseException) -> float:
    """The gather's flag of a rank whose ``_apply`` raised ``error`` (:meth:`ShardedOptimizer._update_and_gather`):
    1 for an out of memory, 2 for anything else (exact in every floating dtype)."""
    return 1.0 if isinstance(error, torch.OutOfMemoryError) else 2.0


def _stamp(ts: list[Tensor]) -> tuple[int, ...]:
    """The autograd versions and the addresses of ``ts``: equal while nothing wrote to them."""
    return (*map(_version_of, ts), *map(Tensor.data_ptr, ts))


class StepCounts:
    """The per-block step counters (0-d CPU float32 tensors, torch's convention; one per block, 40 for
    10M parameters) read and advanced without one ``.item()`` per counter and step: the values written
    at the last increment are remembered with the counters' autograd versions (every write to a counter,
    ``fill_``, ``add_``, ``copy_`` by a state-dict load, bumps its version; a loaded state brings new
    tensors) and addresses (``counter.data = ...`` gives new storage without a version bump), and used
    while the counters are the same tensors at the same versions and addresses, holding those values
    (read at their addresses: a write through ``.data`` or a numpy view bumps no version). Counters all at one
    count, 0-d on the CPU, are advanced by writing count + 1 at those addresses, their versions bumped once as
    a copy bumps them: no ATen call (two per advance before, 8% of a small model's ASGO step)."""

    def __init__(self) -> None:
        # per key, from the last write: the counters, their stamp, their values, the dtype one
        # _foreach_copy_ can advance them all in (or None; see _one_dtype) and the step counts read() returns
        # and the counters' values as ctypes numbers at their addresses (or None; see kernels.raw.value_cells)
        self._known: dict[Any, tuple[list[Tensor], tuple[int, ...], list[float], torch.dtype | None, list[int],
                                     list[Any] | None]] = {}
        # per key, from read(): the counters, their values and that dtype
        self._read: dict[Any, tuple[list[Tensor], list[float], torch.dtype | None]] = {}
        # the 0-d value increment() copies, per dtype; the counters' usual dtypes made here, not at a step's
        # first write: an update that raised there (out of memory) had allocated after its first write only
        self._sources: dict[torch.dtype, Tensor] = {dt: torch.zeros((), dtype=dt) for dt in (torch.float32,
                                                                                              torch.float64)}

    def _lookup(self, key: Any, counters: list[Tensor]) -> tuple[list[float], torch.dtype | None, list[int]]:
        """(values, the one dtype or None, step counts) of ``counters``: remembered while they are the
        counters written last under ``key`` at the same versions and addresses, else read."""
        k = self._known.get(key)
        if (k is not None and len(k[0]) == len(counters) and all(map(operator.is_, k[0], counters))
                and k[1] == _stamp(counters) and (k[5] is None or cell_values(k[5]) == k[2])):
            return k[2], k[3], k[4]
        if all(c.device.type == "cpu" for c in counters):  # as created: no device sync, .item() is cheapest
            values = [float(c.item()) for c in counters]
        else:
            values = [float(x) for x in torch.stack(counters).tolist()]
        return values, self._one_dtype(values, counters), [int(x) + 1 for x in values]

    def read(self, key: Any, counters: list[Tensor]) -> list[int]:
        """The step count of this update of each counter's block (its value + 1, as an int; the list is
        shared with later calls: not to be modified)."""
        values, dtype, counts = self._lookup(key, counters)
        self._read[key] = (counters, values, dtype)
        return counts

    @staticmethod
    def _one_dtype(values: list[float], counters: list[Tensor]) -> torch.dtype | None:
        """The counters' dtype when one ``_foreach_copy_`` can advance them all, else None: every block
        at one count (the usual case), exact in the counters' one dtype (writing count + 1 is then what
        ``add_`` writes), on the CPU."""
        first = values[0] if values else -1.0
        dtypes = set(map(_dtype_of, counters))
        if len(dtypes) != 1:
            return None
        dtype = dtypes.pop()
        fast = (first.is_integer() and 0.0 <= first < _EXACT_COUNT.get(dtype, 0.0)
                and values.count(first) == len(values) and all(map(_is_cpu, counters)))
        return dtype if fast else None

    def increment(self, key: Any, counters: list[Tensor]) -> list[float]:
        """Add 1 to every counter in place (the bits ``add_(1.0)`` writes), after :meth:`read` of the
        same counters in this step; returns the new values (not to be modified: they are remembered)."""
        r = self._read.pop(key, None)
        same = r is not None and len(r[0]) == len(counters) and all(map(operator.is_, r[0], counters))
        return self._write(key, counters, r[1] if same else [], r[2] if same else None)  # type: ignore[index]

    def advance(self, key: Any, counters: list[Tensor]) -> list[float]:
        """:meth:`read` and :meth:`increment` together, for a step that advances its counters before it
        reads them: the new values, those of :func:`increment_counts_`."""
        values, dtype, _ = self._lookup(key, counters)
        return self._write(key, counters, values, dtype)

    def _write(self, key: Any, counters: list[Tensor], values: list[float], dtype: torch.dtype | None) -> list[float]:
        """Advance ``counters`` (at ``values``; all at one count in ``dtype`` unless that is None)."""
        prev = self._known.get(key)
        n = len(counters)
        # the cells stay valid while the counters are the same tensors at the same addresses (the stamp's
        # second half); made anew only then (~1 us per counter)
        cells = (prev[5] if prev is not None and len(prev[0]) == n and all(map(operator.is_, prev[0], counters))
                 and prev[1][n:] == tuple(map(Tensor.data_ptr, counters)) else value_cells(counters))
        if dtype is not None:
            x = values[0] + 1.0
            if cells is not None:
                # the bits and the version bump of the copy below, without its two ATen calls (~25% of a
                # small model's ASGO step besides its arithmetic): x is exact in the counters' dtype
                for cell in cells:
                    cell.value = x
                increment_version(counters)
            else:
                src = self._sources.get(dtype)
                if src is None:
                    src = self._sources[dtype] = torch.zeros((), dtype=dtype)
                # one call for all; fill_ of a kept 0-d tensor costs a third of making one
                torch._foreach_copy_(counters, [src.fill_(x)] * len(counters))
            new = [x] * len(counters)
            # all at one integer count x in one dtype on the CPU: _one_dtype(new, counters) in one comparison
            after = dtype if x < _EXACT_COUNT[dtype] else None
        else:
            new = increment_counts_(counters)
            after = self._one_dtype(new, counters)
        self._known[key] = (list(counters), _stamp(counters), new, after, [int(x) + 1 for x in new], cells)
        return new


class _ViewCache:
    """The owned blocks' views into the parameters, kept between steps, and their gradients' views.

    A parameter's views are rebuilt when its storage, dtype, shape or strides change (``p.data = ...``;
    the cached views keep the old storage alive, so an equal address means the same memory); they are
    never kept across a copy or pickle of the optimizer. Gradient views are made at every step: keeping
    them would keep a gradient the user dropped (``zero_grad(set_to_none=True)``) alive through the next
    backward. A parameter whose blocks tile it along one dim gets them from one ``split_with_sizes``
    call (a view each, as ``narrow`` makes, at a fraction of the cost of one call per block)."""

    def __init__(self, table: BlockTable, owned: Sequence[BlockInfo]) -> None:
        self.owned = list(owned)
        self._by_param = table.by_param
        # per parameter with owned row/column blocks: (dim, sizes of all its blocks) when they tile it
        # along dim in order, else None (one narrow per block)
        self.splits: dict[int, tuple[int, list[int]] | None] = {}
        for b in self.owned:
            if b.dim is None or b.param_index in self.splits:
                continue
            blocks = table.by_param[b.param_index]
            dims = {x.dim for x in blocks}
            tiles = all(x.start == y.stop for y, x in zip(blocks, blocks[1:])) and blocks[0].start == 0
            self.splits[b.param_index] = (b.dim, [x.stop - x.start for x in blocks]) if (
                len(dims) == 1 and tiles) else None
        self.keys: dict[int, tuple[Any, ...]] = {}
        self.pviews: list[Tensor | None] = [None] * len(self.owned)

    def _cut(self, pi: int, t: Tensor, blocks: Sequence[BlockInfo]) -> list[Tensor]:
        """The views of ``blocks`` (all of parameter ``pi``, owned or not, in order) into ``t``."""
        split = self.splits.get(pi)
        if split is not None and t.dim() > split[0] and t.shape[split[0]] == sum(split[1]):
            return list(t.split_with_sizes(split[1], split[0]))
        return [b.view(t) for b in blocks]

    def views(self, params: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor | None]]:
        """(parameter view, gradient view or None) of every owned block, in ``owned`` order."""
        grads: dict[int, list[Tensor] | None] = {}
        pviews, gviews = self.pviews, []
        for i, b in enumerate(self.owned):
            pi = b.param_index
            p = params[pi]
            if b.dim is None:
                pviews[i] = p
                gviews.append(p.grad)
                continue
            if pi not in grads:
                key = (p.data_ptr(), p.device, p.dtype, p.shape, p.stride())
                if self.keys.get(pi) != key:
                    # cut from a detached alias: a view of p itself holds p's tensor, and torch.utils.swap_tensors
                    # (model.to / load_state_dict under torch.__future__.set_swap_module_params_on_conversion)
                    # then refused every parameter the optimizer had stepped
                    cut = self._cut(pi, p.detach(), self._by_param[pi])
                    for j, x in enumerate(self.owned):
                        if x.param_index == pi:
                            pviews[j] = cut[x.sub_index]
                    self.keys[pi] = key
                g = p.grad
                grads[pi] = None if g is None else self._cut(pi, g, self._by_param[pi])
            gs = grads[pi]
            gviews.append(None if gs is None else gs[b.sub_index])
        return pviews, gviews  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class SkipStep:
    """``_decide``'s answer when every rank decided, from the same reduced values, to skip this step
    (e.g. EGN's trial loss is non-finite). Nothing may have changed; the base's skip path runs."""

    reason: str


# A wrapper that swaps the groups' tensors for its own (DeepSpeed's ZeRO optimizer does, given the
# optimizer object: Lightning's own DeepSpeedStrategy, deepspeed.initialize(optimizer=...)) leaves this
# optimizer stepping tensors no one reads, and the model never changed, silently (0.29 off in 6 steps).
REPLACED_PARAMS_MESSAGE = (
    "{name}.step: param_groups[{i}]['params'] is no longer the list of tensors the optimizer was built "
    "over: something replaced the groups' tensors (DeepSpeed's ZeRO optimizer does when it is handed the "
    "optimizer object, e.g. Lightning's own DeepSpeedStrategy or deepspeed.initialize(optimizer=...)), and "
    "the step would update tensors nothing reads. Use deepspeed_ext.DeepSpeedStrategy or "
    "deepspeed_ext.initialize with the optimizer in the config's \"optimizer\" section; add parameters with "
    "add_param_group. Nothing changed."
)


# consolidate_state_dict(to=r) under DTensor, then state_dict() on a rank other than r before the next step
CONSOLIDATED_ELSEWHERE = (
    "{name}.state_dict() on rank {rank}: consolidate_state_dict() ran since the last step and kept the full "
    "state on another rank, where state_dict() now returns it; the sharded form torch.distributed.checkpoint "
    "saves must come from every rank alike. Save with torch.distributed.checkpoint before "
    "consolidate_state_dict() or after the next step."
)

# A list edited in place keeps its identity, so the check above cannot see it: an appended parameter was
# never stepped, a removed one still was (2.6e-2 off torch's optimizer), silently.
GROUP_COUNT_MESSAGE = (
    "{name}.step: param_groups holds {now} group(s) and the optimizer was built with {built}: a group was "
    "deleted, merged or appended by hand, and the blocks are cut per group at construction. Add parameters "
    "with add_param_group; to drop some, build a new optimizer. Nothing changed."
)

EDITED_PARAMS_MESSAGE = (
    "{name}.step: param_groups[{i}]['params'] was edited in place (a parameter appended, removed or "
    "replaced) after the optimizer was built over it; its blocks are cut at construction, so the change "
    "would not be stepped as written. Add parameters with add_param_group (remove them by building a new "
    "optimizer). Nothing changed."
)


def _same_members(params: list[Tensor], built: tuple[Tensor, ...]) -> bool:
    """``params`` holds exactly the tensors ``built`` held, in order (identity, one pass)."""
    return len(params) == len(built) and all(map(operator.is_, params, built))


def _list_values(group: dict[str, Any]) -> tuple[tuple[Any, tuple[Any, ...]], ...]:
    """Copies of a group's list values other than ``params`` and ``param_names`` (``betas=[0.9, 0.95]`` from a
    YAML file): a list edited in place (``group["betas"][1] = 1.5``) is the same object, so only its contents
    show the change (an unchecked 1.5 wrote NaN into the parameters). Compared by :func:`_same_list_values`."""
    lists = list(map(type, group.values())).count(list)  # (one C-level pass)
    if lists == (type(group.get("params")) is list) + (type(group.get("param_names")) is list):
        return ()  # the usual case: no list but the parameters and torch's names of them
    return tuple((k, tuple(v)) for k, v in group.items() if k not in _NOT_HYPERPARAMETERS and type(v) is list)


#: a group's list values that hold no hyperparameter: its tensors, and torch's names of them (labels only)
_NOT_HYPERPARAMETERS = frozenset({"params", "param_names"})


def _same_list_values(a: tuple[tuple[Any, tuple[Any, ...]], ...], b: tuple[tuple[Any, tuple[Any, ...]], ...]) -> bool:
    """The same keys holding the same element objects: identity, not ``==`` (a list of tensors has no
    truth value; an element written anew, ``betas[1] = 1.5``, is a new object anyway)."""
    return len(a) == len(b) and all(ka == kb and len(va) == len(vb) and all(map(operator.is_, va, vb))
                                    for (ka, va), (kb, vb) in zip(a, b))


# How many optimizers this process has seen built over each process group (keyed by comm.group_key: the
# default group's key whether it was passed as None or as dist.group.WORLD, which run the same collectives:
# two keys gave twins over it one ordinal, so equal ids). Every construction over a group is a collective of
# that group, where the ranks agree on the largest count: the optimizer's ordinal, part of its instance id
# (agreement.instance_id).
_BUILT_OVER: dict[int, int] = {}


def _built_over(comm: Communicator) -> int:
    return _BUILT_OVER.get(group_key(comm), 0)


# How many optimizers this process built before torch.distributed was initialized (each joins the default
# group at its first step or consolidation). Their construction made no collective, so nothing agreed on an
# order: the join compares each rank's count at construction (see _meet_before_join).
_BUILT_UNJOINED = [0]

#: what a failed row says its rank was doing in a construction check after construction
_REBUILDING = "rebuilding the block table (add_param_group, or joining the process group)"

#: the instance id a joining optimizer shows in its meeting before the join (:meth:`_meet_before_join`):
#: outside the 48-bit ids, so a rank in another optimizer's step record sees another optimizer
_JOINING_ID = float(1 << 48)

#: the instance id of add_param_group's meeting (:meth:`ShardedOptimizer._agree_on_added_group`): a rank that
#: called it where its peers stepped meets their step's first all-reduce, and every rank raises
_ADDING_ID = float((1 << 48) + 1)

#: where a row of add_param_group's meeting holds the optimizer's own instance id (every such meeting shows
#: :data:`_ADDING_ID` in the instance slot): :meth:`ShardedOptimizer._check_same_optimizer_added_to`
_WHICH_SLOT = 2


class _OwnedState(NamedTuple):
    """A restore's state made (:meth:`ShardedOptimizer._owned_state`), not yet the optimizer's."""

    states: dict[Tensor, dict[Any, Any]]  #: per parameter, its state (its blocks' entries where it is cut)
    num_steps: int
    skipped_steps: int
    global_state: dict[str, Any]  #: for :meth:`ShardedOptimizer._load_global_state`


def _next_unjoined() -> int:
    _BUILT_UNJOINED[0] += 1
    return _BUILT_UNJOINED[0] - 1


def listed_params(param_group: Any) -> Any:
    """``param_group`` with its ``params`` as a list where they came as a one-shot iterator
    (``module.parameters()``, which torch accepts): the checks and the naming below read them more than
    once. Sets and the rest are left to torch's own checks and messages."""
    if not isinstance(param_group, dict):
        return param_group
    params = param_group.get("params")
    if isinstance(params, Iterator):
        return {**param_group, "params": list(params)}
    return param_group


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
        replica_check_every: see :class:`~lightning_soaa.config.ShardingConfig` (:meth:`_periodic_check_due`).

    Parameters that are DTensors (FSDP2 ``fully_shard``) switch the optimizer to their mesh: local shards
    are owned, nothing is gathered, global sums count each piece once (:mod:`lightning_soaa.distributed.dtensor`).
    """

    #: the record ``_prepare`` returns (its summed fields are the all-reduced vector); fixed per optimizer
    #: so that all ranks agree on shapes.
    step_record: type[StepRecord] = StepRecord
    #: True when ``_prepare``'s partials are non-finite whenever an owned gradient is (e.g. SOAA's Σm̂²),
    #: or when the optimizer reads no gradients (EGN): the base then skips its own scan of the owned
    #: gradients. Blocks a rank does not own are covered separately: with ``grad_reduction="none"`` on
    #: W > 1 sharded ranks every local gradient is read once per step anyway (:meth:`_agreement_rows`),
    #: which also flags a NaN this rank alone sees in a block another rank owns; with ``"mean"`` the
    #: owner's averaged gradient carries any rank's NaN.
    partials_cover_grads: bool = False
    #: True where ``shard=False`` means replicated state, not the caller's partitions: every rank holds and
    #: steps every parameter of one replicated model (EGN, whose ZeRO stage is 0 only). The replica checks
    #: (first step, in-place, periodic: :meth:`_checks_moved`) then cover it as they cover sharded replicas.
    unsharded_replicas: bool = False
    #: ``(rank, world_size)`` that saved the ``shard=False`` state loaded since the last step, where it says so
    #: (:mod:`~lightning_soaa.optim.saving_rank`); the step's verdict on it sets it back to None on every rank
    _loaded_origin: tuple[int, int] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # an error raised on some ranks only reaches every rank (construction.py); our classes only (a user's
        # subclass may run collectives of its own before super().__init__, which an announcement would meet)
        if "__init__" in cls.__dict__ and cls.__module__.startswith("lightning_soaa."):
            cls.__init__ = collective_construction(cls.__dict__["__init__"])  # type: ignore[method-assign]
        wrapped = lightning_wrapping(cls)  # Lightning wrapping one of ours: it keeps its clips from now on
        if isinstance(wrapped, ShardedOptimizer):
            wrapped._keep_lightning_clips()

    def construction_width(self) -> int:
        """Columns of a rank's row in the construction check (:meth:`_check_same_params_on_all_ranks`)."""
        return agreement.CONSTRUCTION_WIDTH

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        process_group: Any = None,
        comm: Communicator | None = None,
        shard: bool = True,
        grad_reduction: str = "none",
        replica_check_every: int = REPLICA_CHECK_EVERY,
    ) -> None:
        self.sharding = ShardingConfig(shard=shard, grad_reduction=grad_reduction,
                                       replica_check_every=replica_check_every)
        if comm is not None and not isinstance(comm, Communicator):
            raise ValueError(f"Invalid comm={comm!r}. Must be a lightning_soaa.distributed.comm.Communicator "
                             "(or None: the default process group, or process_group=).")
        self.comm: Communicator = comm if comm is not None else default_communicator(process_group)
        if process_group is not None and comm is None:
            self._warn_partial_group()
        self._dtensor: DTensorLayout | None = None
        # Built before the default process group exists (stock LightningCLI --optimizer, user code that
        # builds the optimizer first): join that group before the first collective (see _ensure_joined).
        self._join_pending = comm is None and process_group is None and not distributed_running()
        # built as one process under a 1-rank default group: a later group of more ranks is refused (_ensure_joined)
        self._world_at_build = dist_world() if isinstance(self.comm, LocalComm) and comm is None else None
        self._unjoined_steps = 0  # steps taken as a single process while a join was pending
        self._unjoined_ordinal = _next_unjoined() if self._join_pending else -1
        self._table: BlockTable | None = None
        self._consolidated: dict[str, Any] | None = None
        self._consolidated_at: int = -1
        self.num_steps = 0  # optimizer steps taken (not counting skipped ones)
        self.skipped_steps = 0
        # the parameters are compared across ranks at the next W > 1 step (see _checks_replicas): the
        # weights are often initialised or loaded after the optimizer is built, so not here
        self._replicas_unchecked = True
        super().__init__(params, defaults)
        # the groups given to the constructor: those past it came by add_param_group (see _added_group_of)
        self._groups_at_construction = len(self.param_groups)
        index = self.__dict__.pop("_storage_index", None)  # the constructor's storage check is done (_check_storage)
        self._setup_dtensor(comm, process_group)
        self._construction_comm = self.comm  # the group the construction check gathers over (construction.py)
        # after the construction check (a collective of every rank): a rank whose sharding options
        # differ must not raise alone before it (the other ranks would wait in it)
        self._build_table()
        self._fsdp()  # (FSDP2's units: their gradient reductions are noted from here, see reduce_order.watch)
        prints = None if index is None else storage_prints(self._params)
        if prints is not None and len(prints) == len(index.params):  # the memo of the next add_param_group
            self._storage_memo = StorageMemo(index, prints, self._table)
        self._check_unsharded_mean()
        self._keep_lightning_clips()  # built in configure_optimizers: before a manual training_step's first clip
        # an (empty) entry per parameter: torch.distributed.checkpoint's get/set_optimizer_state_dict
        # otherwise takes a zero-gradient lr=0 step() of a fresh optimizer (and of an idle rank's, whose
        # state is empty: a collective the other ranks never join); see optim/dcp_state.py
        dcp.hold_state_entries(self)

    #: what the step averages over the process group besides gradients, i.e. what depends on each rank's
    #: batch (SOAA: the trust region's loss); None when the step reads nothing but the gradients
    batch_statistic: str | None = None

    def _warn_partial_group(self) -> None:
        """Warn when ``process_group`` spans fewer ranks than the world and the step averages a batch
        statistic over it: with the model replicated across groups (DDP over every rank, the optimizer
        sharded inside each group) each group's step saw its own ranks' batches alone and the replicas
        drifted apart silently (SOAA 4e-2, EGN 0.4 between ranks after 6 steps). Not an error: ranks
        outside the group may train other parameters (a pipeline stage)."""
        world = torch.distributed.get_world_size() if distributed_running() else 1
        if self.batch_statistic is not None and self.comm.world_size < world:
            log.warning(
                "%s: process_group spans %d of the %d ranks, and %s is averaged over these ranks only. The ranks "
                "outside it must train other parameters (a pipeline stage), not replicas of this model: with the "
                "model replicated across groups (DDP over every rank, HSDP-style), each group would step on its "
                "own ranks' batches and the replicas would drift apart. For a replicated model leave "
                "process_group=None: the state is then sharded over every rank.", type(self).__name__,
                self.comm.world_size, world, self.batch_statistic)

    # ------------------------------------------------------------------ copy and pickle
    #: attributes a copy or pickle leaves out because the subclass rebuilds them on first use (e.g.
    #: compiled kernels, which cannot be pickled and belong to one process)
    _transient: tuple[str, ...] = ()

    #: a preemption vote every W > 1 step carries in its all-reduce (set by
    #: :class:`lightning_soaa.lightning.PreemptionCheckpoint`; see :mod:`lightning_soaa.distributed.stop_vote`)
    stop_vote: StopVote | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the hooks (torch's rule). Subclass attributes, the block table and the configs
        are kept; the communicator pickles itself (see the module docstring). Left out too: methods
        patched onto this instance (an LR scheduler's wrapper of ``step``, which calls the *original*
        optimizer's step: a copy would step the original) and the scheduler's ``_opt_called`` flag, which
        torch's own ``__getstate__`` (defaults, state, param_groups) never copies either."""
        cls = type(self)
        # also left out, rebuilt on first use: views into this process's parameters (HSDP's replicas too), the
        # counters' cache, the groups validated last, the identities of the state dicts (_check_state_layout); and
        # the gradients a step that raised left unscaled (weak references to this process's tensors: no pickle,
        # and a copy's gradients are other tensors)
        return {k: v for k, v in self.__dict__.items()
                if not (k.startswith("_optimizer_") and k.endswith("_hooks")) and k not in self._transient
                and not (callable(v) and callable(getattr(cls, k, None))) and k != "_opt_called"
                and k not in ("_view_cache", "_step_counts", "_valid_groups", "_state_ids", "_state_ids_now",
                              "_hyper_digests", "stop_vote", "_world_at_build", "_storage_memo",
                              "_step_addresses", "_fsdp_groups", "_amp_kept", "_clip_mark", "_kept_clips", "_clip_hook",
                              "_consolidated_mark", "_shard_replicas_memo")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        had_differentiable = "differentiable" in state["defaults"]
        super().__setstate__(state)  # empty hook dicts, step wrapped for hooks
        if not had_differentiable:  # torch adds it; a copy must not differ from its original
            self.defaults.pop("differentiable", None)

    def _counts(self) -> StepCounts:
        """The step counters' cache of this process (:class:`StepCounts`), made on first use."""
        counts = self.__dict__.get("_step_counts")
        if counts is None:
            counts = self._step_counts = StepCounts()
        return counts

    # ------------------------------------------------------------------ hooks for subclasses
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for invalid hyperparameters in ``group`` (defaults already filled in)."""

    #: True when the optimizer's state and update are elementwise (a block's math never looks outside the
    #: block), so a parameter may be cut into row ranges without changing the result: the default
    #: :meth:`_block_specs` then cuts parameters larger than ``max_block_numel`` (a param-group option;
    #: unset or None: :meth:`_auto_block_numel`) and each rank keeps about 1/W of the state.
    elementwise: bool = False
    #: param-group options the block table is built from (at construction and ``add_param_group``), besides
    #: an elementwise optimizer's ``max_block_numel``: a value written into a group afterwards would be
    #: accepted and silently not used, so it is refused (:meth:`_check_layout`)
    layout_keys: tuple[str, ...] = ()
    #: whether the step reads ``p.grad`` (EGN makes its own from the batch): each gradient is then checked
    #: against its parameter at every step (:func:`param_checks.gradient_mismatch`)
    _steps_gradients: bool = True
    #: what "the hyperparameters" compared across ranks at every step are (the refusal names them)
    _hyper_what: str = "param_groups, e.g. lr"
    #: the smallest automatic block, in elements (2^18 = 1 MiB of fp32 per state tensor)
    default_max_block_numel: int = 1 << 18
    #: blocks per rank the automatic block size aims at: a state balanced within about 1/8 of a rank's
    #: share, while each block's fixed cost per step (host work, ~15-30 us on a CPU, the same for a block
    #: of any size) stays a small part of the step
    auto_blocks_per_rank: int = 8

    def _auto_block_numel(self, params: Sequence[Tensor], world_size: int) -> int:
        """``max_block_numel`` when a group leaves it unset: about :attr:`auto_blocks_per_rank` blocks per
        rank over all parameters, and never below :attr:`default_max_block_numel`. At W = 1 that cuts
        only parameters larger than 1/8 of the model, whose cost it barely changes; at W = 4 ten equal
        matrices become 40 blocks, 10 per rank. Checkpoints load across block sizes (re-cut on load)."""
        total = sum(p.numel() for p in params)
        return max(self.default_max_block_numel, -(-total // (self.auto_blocks_per_rank * max(world_size, 1))))

    def _block_numel(self, group: dict[str, Any]) -> int:
        limit = group.get("max_block_numel")
        return self._auto_limit if limit is None else limit

    def _block_specs(self, param: Tensor, group: dict[str, Any], name: str | None) -> list[BlockSpec]:
        """How to cut ``param`` into blocks; default: the whole parameter (cost = numel), or for an
        :attr:`elementwise` optimizer row ranges of at most ``max_block_numel`` elements (see
        :func:`~lightning_soaa.distributed.blocks.row_block_specs`)."""
        if not self.elementwise or has_dtensor([param]):  # an FSDP2 shard is already this rank's piece
            return [BlockSpec(None, 0, 0, float(max(param.numel(), 1)))]
        return row_block_specs(tuple(param.shape), self._block_numel(group))

    def _exchange_in(self, error: BaseException | None = None) -> str | None:
        """Collectives before ``_prepare`` (default: average the gradients into their owners when
        ``grad_reduction="mean"``). An override may run more collectives (the same on every rank) and
        return a reason to skip the step; the skip itself makes no collective, so every rank must derive
        that reason identically (e.g. from reduced values), and an override that may skip must raise
        ``error`` on every rank first (a skip would drop it). ``error``: this rank already raised (held for
        the step's all-reduce): its gradients may not fit the exchange (a parameter resized since), so it
        joins the exchange with zeros, and the all-reduce after raises on every rank. A failure of this rank's
        own work after the exchange's first collective is put in ``self._held_error`` (not raised: the others
        go on to the step's all-reduce), which the template holds like ``error``."""
        failed = error is not None
        held: list[Any] | None = None
        if self.sharding.grad_reduction == "mean" and self.comm.world_size > 1:
            self._check_unsharded_mean()  # (again: the world size may have been unknown at construction)
            held = self._meet_with_buffers(failed)
            if held is None:  # a rank could not make its exchange buffers: no rank exchanges; the record raises
                self._grads_kept = True  # (p.grad as backward left it: the template's note says so)
                return None
        if self.sharding.grad_reduction == "mean" and self._dtensor is not None:
            self._dtensor.mean_plain_grads(read=not failed)  # FSDP2 averages the DTensor gradients; plain: here
        elif self.sharding.grad_reduction == "mean":
            # before the exchange writes averages: a rank with no gradient at all is told apart (the step's
            # agreement rows carry the count; see _counts_grads)
            self._grads_held = sum(p.grad is not None for p in self._params)
            # a failure of this rank's work after the exchange's first collective: held for the step's all-reduce
            self._held_error = self.exchange.reduce_scatter_grads(read=not failed, held=held)
            # no average was written (every rank failed before it: all joined with zeros), or only some where writing
            # them failed part way: the record's note says which p.grad hold one
            written: list[int] | None = getattr(self.exchange, "averaged", None)  # (None: an exchange of no shards)
            self._grads_kept = written is not None and not written
            self._averaged_into = written  # marked when the step ends (grad_marks.py)
            if written and self.__dict__.get("_held_error") is not None:
                self._grads_partly = [repr(self._names[i]) if self._names[i] else f"#{i}" for i in sorted(set(written))]
        return None

    def _clips_replicas(self) -> bool:
        """Whether every rank holds the whole gradient the update reads (one process, or ``"none"`` over replicas:
        DDP's average): the clip's norm is then this rank's own, with no collective."""
        return self.comm.world_size == 1 or (self.sharding.grad_reduction == "none" and self.sharding.shard
                                             and self._dtensor is None)

    def _clip_grads(self, views: list[BlockView], error: BaseException | None) -> BaseException | None:
        """``max_grad_norm`` (:mod:`~lightning_soaa.optim.grad_clip`): scale the gradient the update reads by
        torch's clip factor of its global norm, after the ``"mean"`` exchange wrote the averages and before
        ``_prepare`` reads them (where every rank holds the whole gradient, before the step's exchange and a
        planned step). Where the ranks hold parts of the gradient their Σ‖g‖² are summed in one more all-reduce
        (:meth:`_clip_meeting`), made where any group sets the option. A step that raised after its clip leaves
        its :class:`~lightning_soaa.optim.grad_clip.ClipMark` (:meth:`_sharded_step`): its retry on the same
        gradients takes the norm they had and scales nothing twice. Returns the error held for the step's record
        (this rank's, or one raised here)."""
        routed = self.__dict__.get("_routed_clip")  # Lightning's clip (lightning_clip.py)
        mark = self.__dict__.pop("_clip_mark", None)
        if not self._steps_gradients or (routed is None
                                         and all(g.get("max_grad_norm") is None for g in self.param_groups)):
            return error
        grads, scaled, counted = self._clip_parts(views)
        bound, partial, applied = None, 0.0, 1.0
        if error is None:
            try:
                bound = grad_clip.clip_value(self.param_groups) if routed is None else routed
                if mark is not None and mark.holds(grads):  # its retry: these gradients hold its clip already
                    partial, applied = mark.partial, mark.factor
                else:
                    partial = grad_clip.grad_sq(counted)
            except Exception as e:  # held: every rank raises it together at the record
                error = e
        total = partial if self._clips_replicas() else self._clip_meeting(partial, error)
        if error is None and total is not None and bound is not None:
            factor = grad_clip.clip_factor(bound, total) or 1.0
            if factor != applied:  # (a retry under the same bound scales nothing: the step it would have been)
                grad_clip.scale_grads_(scaled, factor / applied)
            self._clip_mark = grad_clip.ClipMark.of(grads, partial, factor)
        return error

    def _clip_parts(self, views: list[BlockView]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The clip's gradients: every local one (what a retry's mark compares), those it scales (what the update
        reads: under ``"mean"`` at W > 1 the owned blocks' averages; elsewhere every local gradient, so that the
        ranks' compared gradients stay equal) and those whose Σ‖g‖² this rank adds to the norm (all of them where
        each rank holds the whole gradient, else the owned blocks that rank counts)."""
        grads = [g for g in (local(p.grad) for p in self._params) if g is not None]
        if self._clips_replicas():
            return grads, grads, grads
        owned = [(g, v.counted) for v in views if (g := v.grad) is not None]
        scaled = grads if self.sharding.grad_reduction == "none" else [g for g, _ in owned]
        return grads, scaled, [g for g, counted in owned if counted]

    def _clip_meeting(self, partial: float, error: BaseException | None) -> float | None:
        """The clip's all-reduce: Σ‖g‖² over ranks (None where a rank failed: the record raises on every rank).
        It has the record's size and this rank's step row (error, hyperparameters, steps, instance id), so a rank
        whose groups leave the option unset, in the record's all-reduce, reads the same table: both take one
        verdict and raise together (the hyperparameters differ), as do ranks stepping optimizers out of order."""
        try:  # (with the DTensor gradients' presence, as the record's: refused here, before any gradient is scaled)
            hyper = self._step_digest()
        except Exception:  # noqa: BLE001 - this rank's error flag is set; the record raises it on every rank
            hyper = 0
        row = agreement.step_row_values(self.comm.rank, self.comm.world_size, error=agreement.error_flag(error),
                                        hyper=hyper, grad_sq=0.0, grad_count=0,
                                        steps=self.num_steps + self.skipped_steps,
                                        instance=self.__dict__.get("_instance_id", 0))
        head = [partial] + [0.0] * (agreement.RECORD_SLOTS - 1)
        got = self.comm.all_reduce_scalars(torch.tensor(head + row + [0.0], dtype=torch.float64)).tolist()
        verdict = agreement.read_step_rows(got[agreement.RECORD_SLOTS:-1], self.comm.world_size,
                                           compare_grads=False)
        if verdict.instance_ranks or verdict.step_counts or verdict.check_ranks or verdict.hyper_ranks:
            self._raise_disagreement(verdict, error)
        return None if verdict.error_ranks else got[0]

    def _counts_grads(self) -> bool:
        """Whether the step's agreement rows carry each rank's number of parameters with a gradient
        (``grad_reduction="mean"`` over the owner exchange, W > 1): a rank without any, where others have
        some, adds zeros to every average; every rank then says so once (:meth:`_warn_gradless_ranks`)."""
        return (self.sharding.grad_reduction == "mean" and self._dtensor is None and self.comm.world_size > 1
                and self.exchange.sharded)

    def _meet_with_buffers(self, failed: bool) -> list[Any] | None:
        """:meth:`_meet_in_order`, with the gradient exchange's buffers made before it where it meets (FSDP2: the
        exchange makes its own), whose error flag then carries a failure to make them (out of memory): made after
        it, a rank failing there raised alone while the others waited in the reduce-scatter (gloo: an abort or a
        timeout, NCCL: a hang). The buffers (``[]``: the exchange makes them), or None where a rank could not make
        them (that rank's error is in ``self._held_error``): then no rank exchanges, and the record raises on every
        rank. A KeyboardInterrupt there is held the same way (over an error held before: the caller's Ctrl+C is
        what this rank raises): raised at once, it left the others waiting in this check's all-reduce. Where the
        check does not meet (one optimizer over the group, after its first step) nothing comes before the
        exchange's buffers: see :meth:`OwnerExchange.reduce_scatter_grads`."""
        held: list[Any] = []
        flag = 1.0 if failed else 0.0
        if self._meets_in_order() and self._dtensor is None:
            try:
                held = self.exchange.grad_buffers()
            except BaseException as e:  # noqa: BLE001 - held for the step's all-reduce, raised there on every rank
                if not failed or not isinstance(e, Exception):
                    self._held_error = e
                flag = _NO_BUFFERS
        try:
            met = self._meet_in_order(flag)
        except BaseException as refused:  # refused on every rank (out of order, another layout): no record reads
            held_error = self.__dict__.pop("_held_error", None)  # the held error (left, the next step raised it)
            if held_error is not None and not isinstance(held_error, Exception):
                raise held_error from refused  # (a Ctrl+C stays one)
            raise
        return None if met and self._dtensor is None else held

    def _meets_in_order(self) -> bool:
        """Whether :meth:`_meet_in_order` makes its all-reduce this step (the same on every rank)."""
        return self._confirms_layout() or _built_over(self.comm) >= 2

    def _confirms_layout(self) -> bool:
        return not self.__dict__.get("_layout_confirmed") and self._dtensor is None and self.exchange.sharded

    def _meet_in_order(self, failed: float) -> bool:
        """With ``grad_reduction="mean"`` (W > 1) and more than one optimizer built over the process
        group, before the gradient exchange: one all-reduce of the step record's size
        (:func:`~lightning_soaa.distributed.agreement.record_size`) carrying this rank's error flag and
        instance id where the record's rows hold them, so that ranks that step two optimizers in different
        orders meet here (or in the other optimizer's record or EGN's agreement, of the same size) and
        every rank raises :meth:`_out_of_order`, before any gradient moved. The exchange's sizes depend on
        the optimizer: a crossing there aborted gloo's process ("Received data size doesn't match"), and
        NCCL would hang or mix the buffers.

        Until the first step is counted it also compares the ranks' table digests (the same call, slot 1):
        all ranks' parameters must have the same shapes and dtypes. A rank that converted or resized its
        model alone after construction rebuilt its table before the first step
        (:meth:`_rebuild_unstepped`), so its exchange buffers no longer matched the others'.

        ``failed``: this rank's error flag (0: none; 1: an error held; :data:`_NO_BUFFERS`: it could not make the
        exchange's buffers, :meth:`_meet_with_buffers`). Returns whether it met and a rank has no buffers (every
        rank alike)."""
        world = self.comm.world_size
        confirm = self._confirms_layout()
        # One optimizer of ours over the group has nothing to cross (then only the first step pays for the
        # layout check). The count is equal on every rank: each construction over the group is a
        # collective where the ranks agree on it (see _BUILT_OVER), so every rank makes this call or none.
        if not self._meets_in_order():
            return False
        # the signatures the table (and so the exchange buffers) was built for, not the parameters now: a
        # rank that could not rebuild holds the old table for converted parameters
        rows = self._meet(float(self.__dict__.get("_instance_id", 0)), float(self._table_digest()) if confirm
                          else 0.0, failed)
        differ = [r for r in range(world) if rows[r][1] != rows[0][1]] if confirm else []
        if differ:
            raise RuntimeError(
                f"{type(self).__name__}.step: the parameters of rank(s) {differ} differ from rank 0's in shape or "
                "dtype at the first step: a model converted (model.float(), .to(dtype)) or resized on some ranks "
                "only after the optimizer was built. Convert every rank's model the same way (or before "
                "building the optimizer). Nothing changed.")
        return any(row[agreement.ERROR_SLOT] == _NO_BUFFERS for row in rows)

    def _check_unsharded_mean(self) -> None:
        """Refuse ``shard=False`` with ``grad_reduction="mean"`` on W > 1 ranks (outside FSDP2), on every
        rank (the same arguments everywhere) before any collective of the step.

        ``shard=False`` declares that the caller partitioned the parameters (DeepSpeed ZeRO): each rank's
        tensors are its own, with no counterpart on another rank to average with, and the partials are
        summed over ranks as parts of one model. A replicated model passed this way stepped each replica
        on its own local gradient with "mean" (the replicas drifted apart by ~lr a step) and counted the
        trust region's sums W times."""
        if (self.sharding.grad_reduction == "mean" and not self.sharding.shard and self._dtensor is None
                and self.comm.world_size > 1):
            raise ValueError(
                f"{type(self).__name__}: shard=False with grad_reduction='mean' is not supported on "
                f"{self.comm.world_size} ranks: shard=False means every rank's parameters are its own "
                "partition of the model (DeepSpeed ZeRO), with nothing on other ranks to average with. For a "
                "model replicated on every rank use shard=True (the default) with grad_reduction='mean', or "
                "average the gradients before step() (DDP) with grad_reduction='none'.")

    def _prepare(self, views: list[BlockView]) -> StepRecord | None:
        return None

    def _decide(self, reduced: StepRecord) -> Any:
        """The decision for ``_apply``, or :class:`SkipStep`. May run collectives only when every rank
        makes the same ones (EGN's line search)."""
        return None

    def _apply(self, views: list[BlockView], decision: Any) -> None:
        raise NotImplementedError

    def _exchange_out(self, decision: Any) -> None:
        """Collectives after ``_apply`` (default: every rank receives the updated parameters from their
        owners, into the buffers :meth:`_reserve_exchange_out` made). An override replaces the parameter gather
        and must leave every rank's parameters equal."""
        # (this rank's update went through: its flag 0; the ranks' flags read by _update_and_gather)
        self._peer_flags = self._gathered_flags(0.0)

    def _reserve_exchange_out(self) -> None:
        """The default :meth:`_exchange_out`'s buffers (the parameter gather's send buffer and output, per
        dtype), made before the step's all-reduce, whose error flag carries a failure to make them (out of
        memory): made in the gather, after that agreement, a rank failing there raised alone while the others
        waited in the all-gather (gloo: an abort, NCCL: a hang). Held until the step ends (the buffers live
        through the update: n + W·n elements per dtype, n the largest rank's share). An override of
        :meth:`_exchange_out` makes its own (EGN: its direction's gather)."""
        if type(self)._exchange_out is ShardedOptimizer._exchange_out:
            self._held_out = self.exchange.gather_buffers(full=False, flag=True)

    def _gathered_flags(self, flag: float) -> list[float]:
        """The default parameter gather into the held buffers (:meth:`_reserve_exchange_out`), carrying this
        rank's word on its update (``flag``: 0 done, else :func:`_update_failure_code`); every rank's, by rank
        (``[]`` where no buffers were held: one process, unsharded)."""
        return self.exchange.gather_params(self.__dict__.pop("_held_out", None), flag)

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

    # ------------------------------------------------------------------ DTensor (FSDP2) parameters
    #: False where the optimizer cannot run over DTensor parameters (raises at construction).
    supports_dtensor: bool = True

    def _setup_dtensor(self, comm: Communicator | None, process_group: Any) -> None:
        """FSDP2: parameters already sharded -> every local shard is owned, sums run over their mesh."""
        plist = self._all_params()
        if not has_dtensor([p for p, _, _ in plist]):
            return
        if not self.supports_dtensor:
            raise self._dtensor_refusal()
        labels = [repr(n) if n else f"#{i}" for i, (_, _, n) in enumerate(plist)]
        self._dtensor = DTensorLayout([p for p, _, _ in plist], labels, comm=comm,
                                      process_group=process_group, optimizer=type(self).__name__)
        self.comm = self._dtensor.comm
        self.sharding = dataclasses.replace(self.sharding, shard=False)
        plain = [lab for lab, pl in zip(labels, self._dtensor.placements) if not pl.is_dtensor]
        if plain and self.sharding.grad_reduction == "none" and self.comm.world_size > 1:
            log.warning("%s: parameters %s are not DTensors, so FSDP2 does not average their gradients; "
                        "with grad_reduction='none' they must already be identical on every rank (the step "
                        "compares them and raises if not). Pass grad_reduction='mean' to average them.",
                        type(self).__name__, ", ".join(plain[:5]) + (" ..." if len(plain) > 5 else ""))

    def _dtensor_refusal(self) -> Exception:
        from lightning_soaa import registry  # (here: the registry loads the optimizer classes, this one's too)

        return ValueError(f"{type(self).__name__} does not support DTensor (FSDP2) parameters: train it on a model "
                          f"that is not fully_shard'ed, or under FSDP2 use one of "
                          f"{', '.join(registry.dtensor_class_names())}.")

    def _consolidating(self) -> bool:
        """Whether checkpoints need a collective (state spread over ranks: ZeRO blocks or DTensor shards)."""
        return self._sharded_multi_rank() or (self._dtensor is not None and self.comm.world_size > 1)

    # ------------------------------------------------------------------ parameter groups and blocks
    def _add_group_locally(self, param_group: dict[str, Any],
                           memo: StorageMemo | None) -> tuple[Exception | None, Any]:
        """torch's add_param_group and every check that needs no other rank: ``(None, the storage check to
        finish)`` with the group appended, or ``(the error, None)`` with the optimizer unchanged. ``memo``:
        the storage check of the parameters as built, still current (:meth:`_as_built_memo`)."""
        before = len(self.param_groups)
        try:
            super().add_param_group(self._named_like_the_others(listed_params(param_group)))
            check_param_group(self, self.param_groups[-1])  # duplicates, complex, zero-size
            check_torch_options(self, self.param_groups[-1])
            checked = self._check_storage(memo)
            self._validate_group(self.param_groups[-1])
            if self._table is not None and (self._dtensor is not None or has_dtensor(param_group["params"])):
                raise ValueError(f"{type(self).__name__}: add_param_group is not supported with DTensor "
                                 "(FSDP2) parameters; pass every param group to the constructor.")
            if self._table is not None and not self._layouts_as_built():  # a block option written into an existing
                # group would be taken as built
                for i, g in enumerate(self.param_groups[:-1]):
                    try:
                        self._check_layout(i, g)
                    except ValueError as e:
                        raise ValueError(f"{type(self).__name__}.add_param_group: param_groups[{i}]: {e} Nothing "
                                         "changed.") from None
        except BaseException as e:  # noqa: BLE001 - any refusal: agreed on below, then raised as it was
            del self.param_groups[before:]  # a rejected group must leave the optimizer unchanged (Ctrl+C too)
            if not isinstance(e, Exception):
                raise
            return e, None
        return None, checked

    def _agree_on_added_group(self, error: Exception | None, extend: bool) -> bool:
        """Collective (every rank's add_param_group, after the local checks and before its collectives): a
        group refused on some ranks only (its options differ, e.g. an lr one rank computed otherwise) is
        dropped on every rank, which raise together. The refusing rank raised alone before, while the others
        went on into the state gather and the cross-rank check: a hang. Returns whether every rank may extend
        its table (``extend``: its :meth:`_as_built_memo` is current): the memo is per rank (a parameter moved
        on one rank), and an extended table keeps the existing blocks' costs where a full build recomputes
        them (ASGO's ``root_every`` changed since), so ranks on different paths could assign other owners."""
        # first an all-reduce of the step record's size with its own instance id: called on some ranks only (a
        # callback's add_param_group run where one rank's condition held), it met the others' next step, whose
        # first all-reduce then passed against the all-gather's and whose exchange waited for ever (a hang). Now
        # both see another instance id in that all-reduce and raise (_out_of_order), nothing changed.
        rows = self._meet(_ADDING_ID, float(extend), agreement.error_flag(error),
                          which=float(self.__dict__.get("_instance_id", 0)))
        self._check_same_optimizer_added_to(rows)
        if not any(row[agreement.ERROR_SLOT] for row in rows):
            return all(row[1] for row in rows)
        texts = self.comm.all_gather_object((None if error is None else f"{type(error).__name__}: {error}", extend))
        bad = [r for r, (t, _) in enumerate(texts) if t is not None]
        if error is not None:
            return False  # this rank raises its own error
        # (the caller drops the group)
        raise RuntimeError(f"{type(self).__name__}.add_param_group: the group was refused on rank(s) {bad} "
                           f"(rank {bad[0]}: {texts[bad[0]][0]}); it is dropped on every rank. Add the same group "
                           "on every rank. Nothing changed.")

    def _check_same_optimizer_added_to(self, rows: list[list[float]]) -> None:
        """Raise on every rank where add_param_group's meeting (``rows``) joined calls on different optimizers
        (rank 0 adding to one, rank 1 to another: a loop over a dict of optimizers, a callback per model).
        Every meeting carries the same :data:`_ADDING_ID`, so those calls agreed, went on into each other's
        cross-rank check (which compares shapes, not which optimizer: two models of one architecture passed)
        and state gather, and each optimizer silently took the other's blocks and a group on some ranks only."""
        others = [r for r, row in enumerate(rows) if row[_WHICH_SLOT] != rows[0][_WHICH_SLOT]]
        if others:
            raise RuntimeError(
                f"{type(self).__name__}.add_param_group: rank(s) {others} called it on another optimizer than "
                "rank 0 at the same point (optimizers extended in a different order on some ranks). "
                "add_param_group is collective: call it on every rank, on the same optimizer, in the same order. "
                "The group was dropped on every rank; nothing changed.")

    def _fsdp(self) -> FSDPGroups | None:
        """FSDP2's groups holding this optimizer's DTensor parameters (:class:`FSDPGroups`), found on first use
        and again when the parameters changed (``add_param_group``); None without DTensor parameters."""
        if self._dtensor is None:
            return None
        key = (id(self._dtensor), len(self._params))
        cached = self.__dict__.get("_fsdp_groups")
        if cached is None or cached[0] != key:
            found = FSDPGroups(self._params)
            if found.unreadable is not None:
                log.warning("%s: cannot find the FSDP2 units holding the parameters on torch %s (%s). A forward "
                            "without backward between backward() and step() (or a closure that only returns the "
                            "loss) leaves the root's unsharded parameters, and with reshard_after_forward=False "
                            "every unit's, which the next forward then reads instead of the stepped ones: call "
                            "reshard() on the fully_shard modules after such a forward.", type(self).__name__,
                            torch.__version__, found.unreadable)
            cached = self._fsdp_groups = (key, found)
            if self.comm.world_size > 1:  # the order of their gradient reductions is compared at the step
                # (with the other units on their meshes: another optimizer's pair up with these as well)
                reduce_order.watch(fsdp_groups_on_meshes(found.groups))
        return cached[1]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._receiver() is not self:  # through Lightning's LightningOptimizer: the table was the wrapper's
            return self._receiver().add_param_group(param_group)
        # the existing groups and parameters as the table was built for them: only the new group's blocks are
        # cut and its parameters checked (one group per layer re-cut and re-checked every parameter: quadratic)
        memo = self._as_built_memo()
        error, checked = self._add_group_locally(param_group, memo)
        extend = memo is not None
        try:
            if self._table is not None and self.comm.world_size > 1:  # the ranks' collectives follow: agree first
                extend = self._agree_on_added_group(error, extend)
        except BaseException:  # refused on another rank, or a collective failed (an unpickled optimizer before
            # init_process_group, a peer gone): the group stayed appended
            if error is None:
                self.param_groups.pop()
            raise
        if error is not None:
            raise error
        assert checked is not None
        checked()
        warn_misspelt_keys(self, self.param_groups[-1], len(self.param_groups) - 1)
        if self._table is not None:  # added after construction: re-shard, keeping existing state
            self._reshard_for_added_group(extend)

    def _reshard_for_added_group(self, extend: bool) -> None:
        """The table over every group once the newest is added (``extend``: its blocks appended to the current
        table, :meth:`_build_table`), made and checked across ranks before anything changes; then adopted,
        the existing state kept. Collectives, the same on every rank in the same order: the cross-rank check
        of the new table, then, only where an existing block's owner changes under it (decided from the
        checked table, so alike on every rank), the gather of the full state it is re-sharded from. Gathered
        at every call, the whole state crossed the ranks once per added group: N groups added one at a time
        (Lightning's BaseFinetuning, layer by layer) cost O(N^2). An extended table whose owners are unmoved
        leaves each rank's state where it is; the new group's blocks take fresh state at their first step.
        Any refusal (the new group's blocks, ranks that disagree, a collective that failed, Ctrl+C) drops the
        group on every rank it reaches, with the optimizer as it was (its table was never replaced)."""
        assert self._table is not None
        old, limit = self._table, self.__dict__.get("_auto_limit")
        try:
            # the automatic block size grows with the model: recomputing it re-cut existing parameters
            # while their state kept the old blocks (the kernels then overran it: NaN, heap corruption)
            made = self._make_table(keep_limit=True, extend=extend)
            # (checked equal on every rank: every rank raises alike)
            if not extend and made[0].layout()[:len(old.by_param)] != old.layout():
                raise RuntimeError(f"{type(self).__name__}.add_param_group re-cut existing blocks (internal)")
            full = None
            if self._sharded_multi_rank() and not (extend and made[0].same_owners(old)):
                full = self._gather_full_state()
        except BaseException:  # the new group's blocks (ASGO's row_parts of a matrix they do not divide), ranks
            # that disagree on the group (the cross-rank check raises on every rank together), a failed gather
            self._drop_added_group(limit)
            raise
        self._adopt_table(*made, check_ranks=True)
        if full is not None:
            self._restore_owned_state(full)
        else:  # each rank's state stays as it is; a consolidation before the add lacks the new group
            self._consolidated, self._consolidated_at = None, -1
        dcp.hold_state_entries(self)
        done = self.__dict__.get("_storage_memo")
        if done is not None:  # the storage check of every parameter of this table (completed by checked())
            done.table = self._table

    def _drop_added_group(self, limit: int | None) -> None:
        """Remove the newest group, accepted by the storage check but not by the block table (never replaced),
        and restore the automatic block size it was cut with (``limit``). The storage memo is dropped: checked()
        added the group's parameters to it (holding them alive, a refused backbone's included, until the next
        add)."""
        self.param_groups.pop()
        self.__dict__.pop("_storage_memo", None)
        if limit is None:
            self.__dict__.pop("_auto_limit", None)
        else:
            self._auto_limit = limit

    def _named_like_the_others(self, param_group: dict[str, Any]) -> dict[str, Any]:
        """A group of bare tensors added after construction to an optimizer built from named parameters
        (the factory and ``lightning-soaa fit`` pass ``named_parameters()``; ASGO's routing reads names),
        as Lightning's BaseFinetuning.unfreeze_and_add_param_group adds one: torch refuses groups with and
        without names side by side ('cannot add param group without names'), one epoch into the fit. Its
        parameters get ``None`` names, which every part of the optimizer reads as unnamed (ASGO names and
        routes them from its record of the model first, where it has one, else by shape, and says so)."""
        if (self._table is None or not isinstance(param_group, dict) or "param_names" in param_group
                or not self.param_groups or "param_names" not in self.param_groups[0]):
            return param_group
        params = param_group.get("params")
        params = [params] if isinstance(params, Tensor) else params
        if not isinstance(params, (list, tuple)) or any(isinstance(x, tuple) for x in params):
            return param_group  # torch's own checks and messages (a set, named pairs)
        return {**param_group, "params": list(params), "param_names": [None] * len(params)}

    def _adopt_assigned_groups(self) -> None:
        """Lightning's BaseFinetuning, resuming a fit, assigns ``optimizer.param_groups = [...]``: the groups
        the run had when it saved (new dicts over the same parameters, the unfrozen ones appended as whole
        groups), before it loads the optimizer's state. The blocks were cut for the built groups only, so the
        load refused the state as 'a different model'. Where the first groups hold exactly the built
        groups' parameters, in order, they take the built lists back and each group beyond is added
        through :meth:`add_param_group`; anything else is left to the step's refusal. Done before the
        state is validated: a state then refused leaves the groups taken over, a consistent optimizer (the
        groups as assigned could not have stepped)."""
        lists, members = self.__dict__.get("_group_lists"), self.__dict__.get("_group_members")
        groups = self.param_groups
        if lists is None or members is None or len(groups) < len(lists):
            return
        if len(groups) == len(lists) and all(g.get("params") is x for g, x in zip(groups, lists)):
            return  # as built (the common case)
        if not all(isinstance(g, dict) and isinstance(g.get("params"), list) and _same_members(g["params"], m)
                   for g, m in zip(groups, members)):
            return
        extra = groups[len(lists):]
        for g, built in zip(groups, lists):
            g["params"] = built
        del groups[len(lists):]
        for g in extra:
            self.add_param_group(g)

    def _check_storage(self, memo: StorageMemo | None = None) -> Callable[[], None]:
        """No two parameters over the same memory (see :func:`check_disjoint_storage`), once the newest
        group is added; returns what records that group as checked (called once the group is accepted).

        While the constructor adds its groups (no block table yet) only the newest group's parameters are
        checked, against the earlier groups' (:class:`DisjointStorage`, dropped when the constructor's loop
        ends): re-checking every group at each add made one group per parameter quadratic (2000 groups:
        8.7 s). The refusals are the same. A group added after construction is checked against the spans
        of ``memo`` when it is current (no parameter moved since it was made, :meth:`_as_built_memo`), else
        with every parameter afresh: their memory may have moved since (``model.half()``); that check is
        kept as the memo of the next add."""
        index = self.__dict__.get("_storage_index")
        if self._table is None and (index is not None or len(self.param_groups) == 1):
            index = index if index is not None else DisjointStorage()
            gi, first = len(self.param_groups) - 1, len(index.params)
            entries = self._group_params(gi, self.param_groups[gi])
            commit = index.check(self, [p for p, _ in entries],
                                 [repr(n) if n else f"#{first + j}" for j, (_, n) in enumerate(entries)])

            def checked() -> None:
                commit()
                self._storage_index = index
            return checked
        if memo is not None:
            gi, first = len(self.param_groups) - 1, len(memo.prints)
            entries = self._group_params(gi, self.param_groups[gi])
            return memo.check(self, [p for p, _ in entries],
                              [repr(n) if n else f"#{first + j}" for j, (_, n) in enumerate(entries)])
        self.__dict__.pop("_storage_memo", None)
        plist = self._all_params()
        params = [p for p, _, _ in plist]
        index = DisjointStorage()  # check_disjoint_storage, its index kept
        commit = index.check(self, params, [repr(n) if n else f"#{i}" for i, (_, _, n) in enumerate(plist)])

        def checked_all() -> None:
            commit()
            prints = storage_prints(params)
            if prints is not None and self._table is not None:
                self._storage_memo = StorageMemo(index, prints)
        return checked_all

    def _as_built_memo(self) -> StorageMemo | None:
        """The storage memo (:class:`StorageMemo`) when the groups hold the parameters, in order and with the
        names, that the block table was built for, and none of them moved: a new group's blocks then append to
        the table, and its parameters are checked against the memo's spans. None: check and build afresh."""
        memo: StorageMemo | None = self.__dict__.get("_storage_memo")
        lists, members = self.__dict__.get("_group_lists"), self.__dict__.get("_group_members")
        groups = self.param_groups
        if (memo is None or self._table is None or self._dtensor is not None or lists is None or members is None
                or len(groups) != len(lists) or self.__dict__.get("_auto_limit") is None):
            return None
        # each group's list the one built, holding what it held: then its members, in order, are self._params
        if not all(map(operator.is_, [g["params"] for g in groups], lists)) or list(map(len, lists)) != list(
                map(len, members)) or not _same_members([p for x in lists for p in x], tuple(self._params)):
            return None
        names = [n for g in groups for n in (g.get("param_names") or [None] * len(g["params"]))]
        if names != self._names or not memo.current(self._params, self._table):
            return None
        return memo

    def _all_params(self) -> list[tuple[Tensor, int, str | None]]:
        return [(p, gi, name) for gi, group in enumerate(self.param_groups)
                for p, name in self._group_params(gi, group)]

    def _group_params(self, gi: int, group: dict[str, Any]) -> list[tuple[Tensor, str | None]]:
        """The parameters of ``param_groups[gi]`` with their names (None where the group has none)."""
        names = group.get("param_names")
        out = []
        for j, p in enumerate(group["params"]):
            name = names[j] if names else None
            if name is not None and not isinstance(name, str):  # routing reads names (ASGO's "emb")
                raise ValueError(f"{type(self).__name__}: param_groups[{gi}] names parameter {j} {name!r} "
                                 f"({type(name).__name__}); names must be strings, as "
                                 "model.named_parameters() gives them.")
            out.append((p, name))
        return out

    def _sharded_multi_rank(self) -> bool:
        return self.sharding.shard and self.comm.world_size > 1

    def _build_table(self, keep_limit: bool = False, check_ranks: bool = True, extend: bool = False) -> None:
        """The block table over every param group, made (:meth:`_make_table`) and adopted."""
        self._adopt_table(*self._make_table(keep_limit, check_ranks, extend), check_ranks=check_ranks)

    def _make_table(self, keep_limit: bool = False, check_ranks: bool = True, extend: bool = False
                    ) -> tuple[BlockTable, list[Tensor], list[str | None], int]:
        """The block table over every param group, checked across ranks, not yet the optimizer's: ``(table,
        its parameters, their names, the first group it was not built from before)`` for :meth:`_adopt_table`.
        ``keep_limit``: keep the automatic block size (a group added after construction must not re-cut the
        blocks whose state exists); ``check_ranks=False``: no cross-rank check (a collective), for a rebuild
        that not every rank may make (_rebuild_unstepped); ``extend`` (with ``keep_limit``): the groups but
        the newest are those the current table was built for, parameters unmoved (:meth:`_as_built_memo`), so
        their blocks are kept and the newest group's appended: the table a full build makes, at the cost of
        the new group (and, at W > 1, of the owners and the cross-rank check, which cover every block)."""
        first = len(self._group_lists) if extend else 0
        plist = [(p, gi, name) for gi in range(first, len(self.param_groups))
                 for p, name in self._group_params(gi, self.param_groups[gi])]
        new = [p for p, _, _ in plist]
        params = self._params + new if extend else new
        names = self._names + [name for _, _, name in plist] if extend else [name for _, _, name in plist]
        world = self.comm.world_size if self.sharding.shard else 1
        limit = self.__dict__.get("_auto_limit")
        if not keep_limit or limit is None:
            assert not extend, "extend keeps the block size"
            self._auto_limit = self._auto_block_numel(params, world)  # the same on every rank of this W
        check = self.comm.world_size > 1 and check_ranks  # every rank, whatever its shard value: see the method
        try:
            # built before the cross-rank check, which compares it: ranks that cut or assign the blocks by
            # different code (another version, a patched cost) then fail together there, not in a later
            # collective of another size
            try:
                specs = [self._block_specs(p, self.param_groups[gi], name) for p, gi, name in plist]
                gis = [gi for _, gi, _ in plist]
                table = self._table.extended(new, gis, specs) if extend and self._table is not None else BlockTable(
                    params, gis, specs, world_size=world, rank=self.comm.rank if self.sharding.shard else 0,
                    shard=self.sharding.shard)
            except Exception as e:
                if check:  # specs refused on some ranks only (their parameters or group differ): see the method
                    self._join_check_failed(e)
                raise
            if check:
                self._check_same_params_on_all_ranks(params, names, table)
        except BaseException:  # nothing changed: the block size the current table was cut with
            if limit is None:
                self.__dict__.pop("_auto_limit", None)
            else:
                self._auto_limit = limit
            raise
        return table, params, names, first

    def _adopt_table(self, table: BlockTable, params: list[Tensor], names: list[str | None], first: int, *,
                     check_ranks: bool) -> None:
        """Make ``table`` (over ``params``) the optimizer's; ``first``: the groups before it are as the
        current table was built for (their records are kept)."""
        added = params[len(self._params):] if first else params
        kept: list[Signature] = self._built if first else []
        self._table = table
        self._params: list[Tensor] = params
        self._built: list[Signature] = kept + param_signatures(added)
        if check_ranks:  # what every rank built together (a rebuild back to it digests as no rebuild)
            self._agreed_built = self._built
        self._names: list[str | None] = names
        groups = self.param_groups[first:]
        # copies: a list value (ASGO's adamw_indices, a pair of its fused_parts) edited in place must differ from
        # the one built (the kept groups' values are those built: _check_layout refused any other)
        keys = self._block_option_keys()
        layout: list[dict[str, Any]] = self._layout[:first] if first else []
        lists: list[list[Tensor]] = self._group_lists[:first] if first else []
        members: list[tuple[Tensor, ...]] = self._group_members[:first] if first else []
        self._layout: list[dict[str, Any]] = layout + [{k: copy.deepcopy(g.get(k)) for k in keys} for g in groups]
        # see _hyperparameter_error: each group's list and its members (a list edited in place keeps its id)
        self._group_lists: list[list[Tensor]] = lists + [g["params"] for g in groups]
        self._group_members: list[tuple[Tensor, ...]] = members + [tuple(g["params"]) for g in groups]
        self._owned = self._owned_of(table)
        self._view_cache = _ViewCache(self._table, self._owned)
        self.exchange = OwnerExchange(self._table, params, self.comm, sharded=self.sharding.shard)

    def _owned_of(self, table: BlockTable) -> list[BlockInfo]:
        """The blocks of ``table`` this rank keeps state for."""
        owned = table.owned()
        if self._dtensor is not None:  # a block cut across FSDP2's shards is its holder's alone
            owned = [b for b in owned if self._dtensor.holds(b)]
        return owned

    def _check_same_params_on_all_ranks(self, params: list[Tensor], names: list[str | None],
                                        table: BlockTable | None = None) -> None:
        """Fail fast, on every rank together, when ranks disagree on the lightning_soaa code they run, the
        optimizer class, the parameters (names, shapes, dtypes, order), the hyperparameters, the sharding
        options or the block ``table`` built for them (blocks and owners). The collective is an all-gather
        of a fixed-size vector, so it matches in size even between different classes.

        Every rank of a W > 1 group joins it, whatever its ``shard`` value: a rank that skipped it because
        of its own options would leave the others waiting. Without consolidation (``shard=False``, no
        DTensors: DeepSpeed's per-rank partitions, whose shapes differ by rank) only the package's identity
        and the sharding options are compared."""
        try:
            full = self._consolidating()
            mine = agreement.construction_digests(self, params, names, self._unjoined_steps, full=full,
                                                  table=table, groups_digest=self._groups_digest())
            # the last column: this rank's count of optimizers built over the group (not compared; see below)
            counted = torch.cat([mine, torch.tensor([_built_over(self.comm)], dtype=mine.dtype)])
        except Exception as e:  # (the source digest reads files: an OSError on one node)
            self._join_check_failed(e)
            raise
        # from here on an error is no longer announced (construction.py): this rank is in the check itself
        self._construction_gathered = True
        # read on the host in one copy: a tensor op failing on one rank alone after the all-gather would leave
        # the others in their next collective
        flat: list[int] = self.comm.all_gather_flat(counted).tolist()
        width = len(flat) // self.comm.world_size
        everyone = [flat[r * width:(r + 1) * width] for r in range(self.comm.world_size)]
        agreement.check_construction(self, [row[:-1] for row in everyone], full=full,
                                     stage=None if self._table is None else _REBUILDING,
                                     agreed=self.__dict__.get("_joining"))
        if "_instance_id" not in self.__dict__:  # once: a rebuild (add_param_group) is the same optimizer
            # the ranks' counts differ where some processes saw earlier groups (a group destroyed and made
            # again with a new process): the largest is every rank's ordinal
            ordinal = max(row[-1] for row in everyone)
            _BUILT_OVER[group_key(self.comm)] = ordinal + 1
            # per-rank partitions (not full) compare the sharding options only: the id is built from those
            basis = mine if full else mine[agreement.CONSTRUCTION_FIELDS.index("sharding options")]
            self._instance_id = agreement.instance_id(basis, ordinal)

    def _join_check_failed(self, error: Exception) -> None:
        """This rank raised ``error`` before the construction check's all-gather (its block specs, its row): join
        it with a failed row, so that every rank makes that one all-gather and raises now, together. Outside the
        constructor nothing else announces it (construction.py): the other ranks waited in the all-gather
        (a hang), or, in add_param_group, met this rank's rebuild of the old table and made one all-gather
        more than it. Never raises (the caller re-raises its own error), but in a step that joins the process
        group, whose callers branch on the class: there every rank raises one (:meth:`_raise_agreed`)."""
        self._construction_gathered = True  # the constructor's wrapper must not announce it a second time
        try:
            row = failed_row(self.construction_width(), agreement.error_flag(error))
            flat: list[int] = self.comm.all_gather_flat(row).tolist()
        except Exception:  # noqa: BLE001 - the caller's error is the one to raise
            return
        joining = self.__dict__.get("_joining")
        if joining is not None:
            width = len(flat) // self.comm.world_size
            flags = agreement.failed_flags([flat[r * width:(r + 1) * width] for r in range(self.comm.world_size)])
            self._raise_agreed(flags, error, f"while {_REBUILDING}", what=joining)

    def _meet(self, instance: float, value: float, failed: float = 0.0, which: float = 0.0) -> list[list[float]]:
        """Collective: a first all-reduce of the step record's size (:func:`agreement.meeting_table`; slot 1
        of this rank's row holds ``value``, :data:`_WHICH_SLOT` ``which``, its error slot ``failed``:
        :func:`agreement.error_flag`); every
        rank's row. Raises :meth:`_out_of_order` on every rank where the ranks are in different optimizers'
        steps (rank 0's row is the reference, as in the record's verdict, so a rank in the record decides
        alike); in add_param_group's meeting (``instance`` :data:`_ADDING_ID`) an error naming the ranks that
        called it."""
        table, row = agreement.meeting_table(self.comm.rank, self.comm.world_size, instance, failed)
        table[row + 1] = value
        table[row + _WHICH_SLOT] = which
        got = self.comm.all_reduce_scalars(torch.tensor(table, dtype=torch.float64)).tolist()
        rows = agreement.meeting_rows(got, self.comm.world_size)
        others = agreement.other_instances(rows)
        if others and instance == _ADDING_ID:
            adding = [r for r, x in enumerate(rows) if x[agreement.INSTANCE_SLOT] == _ADDING_ID]
            raise RuntimeError(
                f"{type(self).__name__}.add_param_group was called on rank(s) {adding} only; the other ranks went "
                "on to a step (or another optimizer's collective). add_param_group is collective: call it on every "
                "rank with the same group at the same point of training. The group was dropped; nothing changed.")
        if others:
            raise self._out_of_order(others)
        return rows

    def _meet_before_join(self, error: Exception | None = None) -> None:
        """Collective over the default group (``self.comm``), before the join's construction check: one
        all-reduce of the step record's size, each rank's row holding :data:`_JOINING_ID` where the record
        holds the instance id and, in slot 1, this optimizer's place among those this process built before
        torch.distributed was initialized. Joins come at the first step (or consolidation), so optimizers
        stepped in different orders met here: two joining ones in different places (twins passed the
        construction check and trained crossed replicas silently), or one joining while another rank was
        in a joined optimizer's step (a hang: the construction all-gather met a step's all-reduce). Every
        rank raises; nothing changed. ``error``: this rank failed to prepare its join (held: it rides this
        all-reduce, and every rank raises it together)."""
        world = self.comm.world_size
        rows = self._meet(_JOINING_ID, float(self.__dict__.get("_unjoined_ordinal", -1)), agreement.error_flag(error))
        flags = [rows[r][agreement.ERROR_SLOT] for r in range(world)]
        if any(flags):
            self._raise_agreed(flags, error, "as it joined the process group", what=self._joining)
        ordinals = [int(rows[r][1]) for r in range(world)]
        odd = [r for r in range(world) if ordinals[r] != ordinals[0]]
        if odd:
            raise RuntimeError(
                f"{type(self).__name__}: rank(s) {odd} are joining the process group with another optimizer than "
                f"rank 0 (the optimizers built before torch.distributed was initialized, numbered by each process "
                f"in construction order: {ordinals} by rank; they join at their first step or consolidation). "
                "The optimizers were stepped in a different order on some ranks, or the processes built different "
                "optimizers before init_process_group. Step them in the same order on every rank (or build them "
                "after init_process_group). Nothing changed.")

    def _ensure_joined(self) -> None:
        """Join the default process group if it appeared after construction (collective then).

        Called where every rank makes a collective anyway (the step, :meth:`consolidate_state_dict`).
        The local (unsharded) state, e.g. loaded from a checkpoint before the first step, is kept for the
        blocks this rank owns after sharding. Ranks that already stepped alone raise, on every rank.

        A rank's own work (the table at the group's size, its state re-cut and copied into the blocks it will
        own) is done before the join's first collective, whose error flag carries its failure: one rank that
        failed there (an out of memory, a state that cannot be placed) raised alone, joined halfway, while
        its peers went on into the step's collectives (a hang). After the meeting only the construction check
        (a collective of its own: every rank raises together) may fail. Every failure leaves the optimizer as
        it was, waiting to join, so that a step taken again joins as the first try would have.
        """
        self._check_same_world()
        if not self._join_pending or not default_group_ready():
            return
        local_comm, group_comm = self.comm, default_communicator(None)
        limit = self.__dict__.get("_auto_limit")
        error: Exception | None = None
        made: tuple[tuple[BlockTable, list[Tensor], list[str | None], int], _OwnedState] | None = None
        try:  # this rank's own work: held for the join's first all-reduce (a hang else)
            full = self._gather_full_state()  # local: the LocalComm owns every block
            self.comm = group_comm
            made = self._prepare_join(full)
        except Exception as e:
            error = e
        except BaseException:  # (Ctrl+C, likeliest in the copies of a large loaded state) the comm was switched
            self._undo_join(local_comm, limit)
            raise
        self.comm = group_comm
        self._join_pending = False
        self._joining = type(self).__name__  # (inside a step: one class of error on every rank, _join_check_failed)
        try:
            if self.comm.world_size > 1:
                self._meet_before_join(error)
            elif error is not None:
                raise error
            assert made is not None
            (table, params, names, _), _ = made
            if self.comm.world_size > 1:
                self._check_same_params_on_all_ranks(params, names, table)
            self._commit_join(made, local_comm, limit)  # (inside: a Ctrl+C just before it is undone here too)
        except BaseException:  # (Ctrl+C too) nothing changed: still the local table, comm and block size
            self._undo_join(local_comm, limit)
            raise
        finally:
            del self._joining
        log.info("%s: joined the %d-rank default process group at its first collective (it was built "
                 "before torch.distributed was initialized)", type(self).__name__, self.comm.world_size)

    def _commit_join(self, made: tuple[tuple[BlockTable, list[Tensor], list[str | None], int], _OwnedState],
                     local_comm: Communicator, limit: int | None) -> None:
        """The checked join made the optimizer's (:meth:`_ensure_joined`): its table adopted, the state it placed
        installed. Nothing here fails on one rank alone (no allocation, no check), but a Ctrl+C may land between
        the two or inside either: the optimizer then had the group's table with its one-process state, or a state
        cleared and partly installed (a step taken again ran on that, not on the loaded state). On any
        BaseException the attributes and the state are put back as they were and the join is pending again."""
        (table, params, names, first), owned = made
        saved = dict(self.__dict__)
        states = list(self.state.items())  # (the install clears the state dict in place)
        try:
            self._adopt_table(table, params, names, first, check_ranks=True)
            self._install_owned_state(owned)  # assignments only: nothing may fail on one rank after the check
        except BaseException:
            for key in [k for k in self.__dict__ if k not in saved]:
                del self.__dict__[key]
            self.__dict__.update(saved)
            self.state.clear()
            self.state.update(states)
            self._undo_join(local_comm, limit)
            raise

    def _undo_join(self, local_comm: Communicator, limit: int | None) -> None:
        """Put back what a join that failed or was interrupted changed: the one-process communicator
        (``local_comm``), the pending join and the automatic block size the local table was cut with."""
        self.comm, self._join_pending = local_comm, True
        if limit is None:
            self.__dict__.pop("_auto_limit", None)
        else:
            self._auto_limit = limit

    def _prepare_join(self, full: dict[str, Any]
                      ) -> tuple[tuple[BlockTable, list[Tensor], list[str | None], int], _OwnedState]:
        """A join's own work on this rank, over the group's communicator (``self.comm``), changing nothing but
        the block size (:meth:`_ensure_joined` puts it back on failure): the block table at the group's size,
        not yet checked across the ranks, and the local state ``full`` in the blocks this rank will own (re-cut
        where the blocks depend on W, copied)."""
        made = self._make_table(check_ranks=False)
        table, params, names, _ = made
        view = dataclasses.replace(self._checkpoint_view(), param_groups=list(self.param_groups), block_table=table,
                                   shapes=tuple(tuple(p.shape) for p in params),
                                   devices=tuple(p.device for p in params), names=tuple(names))
        return made, self._owned_state(view, self._owned_of(table), params, fit_layout(view, full))

    def _check_same_world(self) -> None:
        """The default process group was destroyed and initialized again since this optimizer was built (a
        notebook, a second fit in one process). Over it: re-attach, checking on every rank that each kept its
        rank and the world size (:meth:`TorchComm.stale`). Built as one process under a 1-rank group and
        now under a group of more ranks: refused (each rank would go on training alone: 0.12 apart)."""
        old = self.comm
        real = old.__dict__.get("_real") if isinstance(old, DeferredComm) else old  # (unpickled: its attached one)
        if isinstance(real, TorchComm) and real.stale():
            new = DeferredComm(real.rank, real.world_size, True,
                               "built over the default process group before it was initialized again,").attach()
            # every holder of the old communicator: the step's exchange ran on the destroyed group object
            self.comm = new
            exchange = self.__dict__.get("exchange")
            if exchange is not None and exchange.comm is old:
                exchange.comm = new
            if self.__dict__.get("_construction_comm") is old:
                self._construction_comm = new
            if self._dtensor is not None and self._dtensor.comm is old:
                self._dtensor.comm = new
            return
        built = self.__dict__.get("_world_at_build")
        if built is not None and isinstance(self.comm, LocalComm) and dist_world() is not built \
                and default_group_ready():
            raise RuntimeError(
                f"{type(self).__name__}: built as one process under a 1-rank default process group, which was "
                "replaced by one of several ranks since; it would go on training alone on each rank. Build the "
                "optimizer after the new init_process_group (load this one's state_dict() into it). Nothing "
                "changed.")

    def _join_before_step(self) -> None:
        """At the start of every step (also in subclasses that drive their own step, e.g. EGN): join the
        default group if it has appeared (idempotent: EGN's step and the template both call it)."""
        self._ensure_joined()

    def _count_step(self, skipped: bool = False) -> None:
        """Count a step taken (or skipped on every rank), and, while a join is pending, one taken as a
        single process. Counted here, not on entry: a step refused before it changed anything (SOAA
        without a loss, EGN without a batch) made a later join refuse "already stepped" falsely."""
        if skipped:
            self.skipped_steps += 1
        else:
            self.num_steps += 1
        self._consolidated = None  # stale now (state_dict() refuses it): a full copy of the state, freed
        self._layout_confirmed = True  # every rank counts this step: _meet_in_order's layout check is done
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
        st: dict[Any, Any] = self.state[self._params[block.param_index]]
        if block.dim is None:
            return st
        sub: dict[str, Any] = st.setdefault(block.sub_index, {})
        return sub

    def _owned_views(self) -> list[BlockView]:
        if self._dtensor is not None:
            return self._owned_dtensor_views()
        # Runs every step: the parameters' block views are reused while the parameters keep their storage
        # (_ViewCache); gradient views are cut afresh (one split per parameter) and the state dicts read
        # afresh, since both may be replaced between steps.
        cache = self.__dict__.get("_view_cache")
        if cache is None:  # after a copy or unpickling
            cache = self._view_cache = _ViewCache(self.block_table, self._owned)
        params, groups, names, state = self._params, self.param_groups, self._names, self.state
        pviews, gviews = cache.views(params)
        views = []
        pstate: dict[int, dict[Any, Any]] = {}  # one state lookup per parameter (hashing a tensor costs)
        for b, pv, gv in zip(self._owned, pviews, gviews):
            pi = b.param_index
            st = pstate.get(pi)
            if st is None:
                st = pstate[pi] = state[params[pi]]
            if b.dim is not None:  # as block_state(b)
                st = st.setdefault(b.sub_index, {})
            views.append(BlockView(b, pv, gv, st, groups[b.group_index], names[pi]))
        return views

    def _owned_dtensor_views(self) -> list[BlockView]:
        assert self._dtensor is not None
        views = []
        for b in self._owned:
            p = self._params[b.param_index]
            views.append(
                BlockView(
                    block=b,
                    param=self._dtensor.local_block(b, local(p)),  # type: ignore[arg-type]
                    grad=None if p.grad is None else self._dtensor.local_block(b, local(p.grad)),  # type: ignore[arg-type]
                    state=self.block_state(b),
                    group=self.param_groups[b.group_index],
                    name=self._names[b.param_index],
                    counted=self._dtensor.counted(b.param_index),
                )
            )
        return views

    # ------------------------------------------------------------------ the step
    def _run_closure(self, closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        if not callable(closure):  # opt.step(loss): torch's "'Tensor' object is not callable" said nothing
            raise TypeError(f"{type(self).__name__}.step: its argument is a closure (a callable that returns the "
                            f"loss), got {type(closure).__name__}. A loss is passed by keyword where the "
                            "optimizer takes one: step(loss=loss).")
        with torch.enable_grad(), caller_autocast(self):
            return closure()

    # torch.compile of a step or of a training function that calls it: the step runs eagerly (a graph
    # break), as torch's own optimizers do outside their compiled paths. Traced, its host reads and
    # in-place kernels on the state broke inductor (an internal assert), after the counters had moved,
    # and SOAA's Python-float scalars were baked into graphs recompiled at every step.
    @hooked_step  # torch's step hooks and profiler label, without the label's cost where no profiler records
    @torch._disable_dynamo
    @full_precision_no_grad  # inside an autocast region too, without grad (optim/step_context.py)
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimizer step (collective when W > 1: every rank must call it)."""
        loss, error = None, None
        try:
            loss = self._run_step_closure(closure)
        except Exception as e:
            error = e
        self._sharded_step(local_error=error)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``. Its ``set_to_none=True`` loop runs here without the profiler label torch makes
        around it whether or not a profiler records (~65 us of a small model's training step; step_hooks.py);
        under a profiler, for ``set_to_none=False`` and behind a mixin's, torch's runs, and while dynamo traces
        (tested first: torch's, which dynamo skips, is what torch.compile meets, as for torch's optimizers)."""
        if not torch.compiler.is_compiling():  # (a clip kept for the next step clipped the gradient zeroed now)
            receiver = self._receiver()
            drop_kept_clips(receiver)
            # (under a Trainer, before a manual training_step's clip: also one Lightning never built nor wrapped)
            receiver._keep_lightning_clips()
        if not (set_to_none and not torch.compiler.is_compiling() and torch_zero_grad_next(super().zero_grad)
                and grads_to_none(self)):
            super().zero_grad(set_to_none)

    def _run_step_closure(self, closure: Callable[[], Any] | None) -> Any:
        """:meth:`_run_closure` for the step, with Lightning's clip taken over where it would clip each rank's own
        gradient (:mod:`~lightning_soaa.optim.lightning_clip`); the step then applies it."""
        trainer = running_trainer() if self._routes_lightning_clip() else None
        if trainer is None:  # (no Lightning Trainer runs this step; a few us where Lightning is imported)
            return self._run_closure(closure)
        with routed_clip(self, trainer) as routed:
            loss = self._run_closure(closure)
        if routed:
            self._routed_clip = routed[0]  # (read by this step's _clip_grads; dropped when the step ends)
        return loss

    def _takes_lightning_clips(self) -> bool:
        """Whether Lightning's clips of this optimizer are kept for its step (:mod:`lightning_clip`): applied to the
        averaged gradient (:meth:`_routes_lightning_clip`), or refused by one that never reads ``p.grad`` (EGN, at
        any W)."""
        return self._routes_lightning_clip() or not self._steps_gradients

    def _keep_lightning_clips(self) -> None:
        """Under a Lightning Trainer (built in ``configure_optimizers``, or wrapped by Lightning when the Trainer sets
        up), its precision plugin keeps this optimizer's clips from now on: before a manual ``training_step``'s
        first clip."""
        trainer = running_trainer() if self._takes_lightning_clips() else None
        if trainer is not None:
            keep_clips(self, trainer)

    def _routes_lightning_clip(self) -> bool:
        """Whether Lightning's ``gradient_clip_val`` is applied by this step (:mod:`lightning_clip`): where the
        step averages the ranks' gradients (``"mean"`` at W > 1, as :attr:`_step_supports_amp_scaling` reads it)."""
        return self._steps_gradients and self._step_supports_amp_scaling

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """torch.amp.GradScaler's flag: when True the scaler calls ``step()`` at every iteration and hands
        over ``grad_scale``/``found_inf`` (:func:`~lightning_soaa.optim.step_context.amp_unscale_`). Only
        where the ranks' gradients differ at the step (``grad_reduction="mean"``, W > 1): the scaler's
        own skip, decided from one rank's gradients, would skip the step on that rank alone. Elsewhere
        (DDP averaged the gradients, or one process) its usual flow is exact, and Lightning allows
        gradient clipping under a GradScaler only for optimizers without the flag. An optimizer built before
        the process group joins it at its first step, after the scaler read this: the group it will join
        counts (read as one process, the scaler skipped a first-step overflow on that rank alone while the
        others entered the step's collectives: gloo aborted, NCCL would hang)."""
        if self.sharding.grad_reduction != "mean":  # (read at every step: the world only where it can matter)
            return False
        return self._world_at_step() > 1

    def _world_at_step(self) -> int:
        """The world size the next step runs at: the process group's where an optimizer built before it joins it
        at that step."""
        world = self.comm.world_size
        if self.__dict__.get("_join_pending") and default_group_ready():
            world = torch.distributed.get_world_size()
        return world

    def _local_nonfinite(self, partials: Sequence[float]) -> bool:
        """True when a summed value this rank computed or an optimizer-wide scalar is non-finite (its
        gradients are checked by :meth:`_grad_scan`)."""
        return (not all(map(math.isfinite, partials)) or self._state_nonfinite()
                or self.__dict__.get("_amp_found_inf", False))

    def _state_nonfinite(self) -> bool:
        """True when an optimizer-wide scalar the next update reads is non-finite (e.g. SOAA's trust
        multiplier); the step is then skipped on every rank instead of writing NaN to the parameters."""
        return False

    def _statistic_overflows(self, views: list[BlockView], grad_sq: float) -> bool:
        """True when finite gradients would drive a statistic this rank's update keeps past its dtype's
        range (ASGO's Gram); the step is then skipped on every rank like a non-finite one. ``grad_sq``:
        Σ‖g‖² of :meth:`_scanned_grads` (at least the owned gradients unless the partials cover them),
        finite, on the host."""
        return False

    def _compares_grads(self) -> bool:
        """Gradients must be equal on every rank when each block is updated with its owner's gradient
        (``grad_reduction="none"``, sharded, W > 1): DDP (or the user) must have averaged them. Under
        FSDP2 the same holds for the plain (non-DTensor) parameters, which every rank updates as a
        replica from its own gradient: FSDP2 does not average those. Never for an optimizer that does not
        step from ``p.grad`` (EGN: a gradient left there by another optimizer's backward is not its input)."""
        if not self._steps_gradients or self.sharding.grad_reduction != "none" or self.comm.world_size == 1:
            return False
        if self._dtensor is not None:
            return bool(self._dtensor.plain)
        return self.sharding.shard

    def _compared_grads(self) -> list[Tensor]:
        """The local gradients compared across ranks (:meth:`_compares_grads`): every one, or under FSDP2
        the plain parameters' (a DTensor's local shard differs from rank to rank by design)."""
        if self._dtensor is None:
            return [p.grad for p in self._params if p.grad is not None]
        return [g for g in (self._params[i].grad for i in self._dtensor.plain) if g is not None]

    def _prepare_locally(self, views: list[BlockView], local_error: BaseException | None
                         ) -> tuple[StepRecord, BaseException | None]:
        """The local half of a step (no communication). An exception is returned, not raised, so that
        this rank still joins the step's all-reduce (with a neutral record) and every rank raises
        together."""
        if local_error is not None:
            return self.step_record(), local_error
        try:
            record = self._prepare(views)
            if record is None:
                record = self.step_record()
            if type(record) is not self.step_record:
                raise RuntimeError(
                    f"_prepare returned a {type(record).__name__}, expected {self.step_record.__name__}")
        except Exception as e:
            return self.step_record(), e
        return record, None

    def _agreement_rows(self, error: BaseException | None, grad: tuple[float, float] = (0.0, 0.0)) -> list[float]:
        """This rank's row of the step's agreement block (W > 1; empty at W = 1). ``grad``: this rank's
        Σ‖g‖² and Σ log2 ‖g_i‖² when the gradients are compared (:meth:`_local_values`, copied to the host
        with the record's values)."""
        if self.comm.world_size == 1:
            return []
        held = self.__dict__.pop("_grads_held", 0)
        count = (len(self._compared_grads()) if self._compares_grads() else held if self._counts_grads() else 0)
        # the replica check: due once after construction or load_state_dict (one read of the parameters), at
        # the step after a refused in-place change, and every replica_check_every steps (W > 1 replicas with either
        # grad_reduction); after an error nothing is read (the parameters may be unreadable, meta), and every rank
        # raises anyway
        whole = ((self.__dict__.get("_replicas_unchecked", False) and self._checks_replicas())
                 or (self.__dict__.get("_moved_recheck", False) and self._checks_moved())
                 or self._partitions_due() or self._origin_due())
        check = whole or self._periodic_check_due()
        # (a periodic check under FSDP2 "none" compares HSDP's shards only: the plain replicas' digest stays 0)
        plain = check and error is None and (whole or not self._plain_drifts())
        digest = agreement.param_digest(self._replica_params()[1]) if plain else 0
        hyper = self._step_digest() if error is None else 0
        moved = self._moved_in_place() if error is None else (0, 0)
        # HSDP's replicated shards: their whole digest at a replica check, else that of their in-place changes
        pieces = self._shard_pieces()[1] if check and error is None else []
        shards = agreement.param_digest(pieces) if pieces else 0 if check else moved[1]
        return agreement.step_row_values(self.comm.rank, self.comm.world_size, error=agreement.error_flag(error),
                                         hyper=hyper, grad_sq=grad[0], grad_count=count,
                                         steps=self.num_steps + self.skipped_steps, replica_check=check,
                                         shards_only=check and not whole and self._plain_drifts(),
                                         params_digest=digest, instance=self.__dict__.get("_instance_id", 0),
                                         grad_logs=grad[1], moved=moved[0], shards=shards,
                                         loaded=saving_rank.loaded_slot(self.__dict__.get("_loaded_origin"),
                                                                        self.comm.rank, self.comm.world_size))

    def _checks_moved(self) -> bool:
        """Whether the step compares the parameters changed in place since the last step across ranks
        (:data:`agreement.MOVED_SLOT`): W > 1 replicas whose blocks are each updated from their owner's copy
        (or, :attr:`unsharded_replicas`, stepped alike on every rank), an FSDP2 model's plain parameters, and
        HSDP's replicated shards (each compared with its replica's, :data:`agreement.SHARD_SLOT`).
        ``shard=False`` partitions and a 1-D mesh's shards are not replicas."""
        replicas = self.sharding.shard or self.unsharded_replicas
        return ((replicas and self.comm.world_size > 1 and self._dtensor is None) or self._has_fsdp2_replicas()
                or self._shard_replicas() is not None)

    def _periodic_check_due(self) -> bool:
        """Whether this step is one of the periodic replica checks (every ``replica_check_every`` steps, counted
        with the skipped ones; the first step's is the one after construction). The same on every rank: the
        step counts are compared in the same row, so every rank made a digest, or every rank raises. It catches
        writes on some ranks only that bypass the version counters the in-place check reads (``p.data.mul_``,
        ``p.data = t``, a NumPy view; under HSDP ``p.to_local()`` too): sharded ranks then trained on a mix of each
        owner's blocks (0.095 off one process), EGN's, FSDP2's plain and HSDP's replicas stayed apart for good."""
        every = self.sharding.replica_check_every
        steps = self.num_steps + self.skipped_steps
        if every <= 0 or steps <= 0 or steps % every:  # (every step asks: the count first, the layout only when due)
            return False
        # HSDP's replicated shards with either grad_reduction: FSDP2 averages their gradients, bit-equal replicas
        return (not self._plain_drifts() and self._checks_moved()) or self._shard_replicas() is not None

    def _plain_drifts(self) -> bool:
        """Whether the periodic check leaves the replicas (:meth:`_replica_params`) out: FSDP2's plain replicas
        under ``"none"``, whose gradients are compared to a tolerance (GRAD_RTOL: other devices' reduction
        kernels), so honest copies may drift in their last bits, which a bitwise check would refuse at step N of a
        run accepted until then (ASGO at W = 2, one ulp of one gradient element)."""
        return self._dtensor is not None and self.sharding.grad_reduction == "none"

    def _replicas_why(self, shards: bool = False) -> str:
        """Why replicas that differ are refused (a refusal's sentence); ``shards``: HSDP's replicated shards."""
        if shards:
            return ("under HSDP the ranks that hold the same shard (one in each replicate group) update it with the "
                    "same averaged gradient, so copies that differ would stay apart at every step, silently")
        if self._dtensor is not None:
            return ("the parameters that are not DTensors (left out of fully_shard) are one copy per rank, which "
                    "every rank updates with the same averaged gradient, so copies that differ would stay apart "
                    "at every step, silently")
        return ("each block is updated from its owner's copy and sent to every rank, so different replicas "
                "would silently become a mix of each owner's blocks (changes made on other ranks are dropped)")

    def _has_fsdp2_replicas(self) -> bool:
        """Whether W > 1 FSDP2 ranks hold plain (not DTensor) parameters: one copy per rank, which every rank
        updates with its own (averaged or compared) gradient, so copies that differ stay apart at every step."""
        return self._dtensor is not None and self.comm.world_size > 1 and bool(self._replica_params()[0])

    def _replica_params(self) -> tuple[Sequence[int], list[Tensor]]:
        """(indices, parameters) of the replicas the replica and in-place checks compare: every parameter, or
        under FSDP2 the plain ones (each rank's DTensor shard is its own). Asked twice a step (the in-place
        check and the versions it leaves): without FSDP2 a range, no list of indices built per step."""
        if self._dtensor is None:
            return range(len(self._params)), self._params
        index = self._dtensor.plain  # (made once: add_param_group is refused under FSDP2)
        if len(self._dtensor.placements) != len(self._params):
            index = [i for i in range(len(self._params)) if not self._dtensor.is_dtensor(i)]
        return index, [self._params[i] for i in index]

    def _shard_replicas(self) -> ShardReplicas | None:
        """HSDP: the DTensor parameters that have replicas and each rank's replica
        (:mod:`~lightning_soaa.distributed.shard_replicas`), read from the mesh once per communicator; None where
        none has (no DTensor, a 1-D mesh, W = 1)."""
        if self._dtensor is None:
            return None
        return self._shard_memo()[0]

    def _shard_memo(self) -> tuple[ShardReplicas | None, list[Tensor]]:
        """(:meth:`_shard_replicas`, those DTensor parameters themselves), made once per communicator."""
        if self._dtensor is None:  # (no DTensor, no shard replicas: asked every step, so without the memo's key)
            return None, []
        memo = self.__dict__.get("_shard_replicas_memo")
        key = (id(self.comm), len(self._params))
        if memo is None or memo[0] != key:
            found = shard_replicas(self._params, self.comm)
            memo = self._shard_replicas_memo = (key, found, [] if found is None else
                                                [self._params[i] for i in found.indices])
        return memo[1], memo[2]

    def _replica_of(self) -> tuple[int, ...] | None:
        """Per rank, the rank whose replicated DTensor pieces it must hold too (None: none compared)."""
        shards = self._shard_replicas()
        return None if shards is None else shards.replica_of

    def _shard_pieces(self) -> tuple[Sequence[int], list[Tensor]]:
        """(indices, this rank's local pieces) of HSDP's replicated DTensor parameters (empty without)."""
        shards = self._shard_replicas()
        if shards is None:
            return (), []
        return shards.indices, [local(self._params[i]) for i in shards.indices]  # type: ignore[misc]

    def _note_versions(self) -> None:
        """Remember each parameter's version counter as this step leaves it (after its own writes), so the
        next step sees what else changed a parameter in place (:meth:`_moved_in_place`)."""
        self._param_versions = (_param_versions(self._versioned(self._replica_params()[1])) if self._checks_moved()
                                else None)

    def _versioned(self, params: list[Tensor]) -> list[Tensor]:
        """The tensors whose version counters the in-place check reads: the replicas, then HSDP's replicated
        DTensor parameters. A write through the DTensor (``p.mul_``, ``p.copy_``, ``load_state_dict``) moves its
        counter; the optimizer's own writes go to the local piece and move none of these (measured, torch 2.13)."""
        if self._dtensor is None:
            return params  # (without FSDP2: the list itself, no copy per step)
        shards = self._shard_memo()[1]
        return params + shards if shards else params

    def _moved_in_place(self) -> tuple[int, int]:
        """(:func:`agreement.moved_digest` of the replicas, that of HSDP's replicated shards) changed in place since
        the last step by something other than this optimizer (a forward that renormalises its own weights:
        nn.Embedding(max_norm=...)); 0 where none was. One read of a version counter per parameter; the values
        are read only of those that changed."""
        seen = self.__dict__.get("_param_versions")
        index, params = self._replica_params()
        if seen is None or not self._checks_moved():
            return 0, 0
        versioned = self._versioned(params)
        if len(seen) != len(versioned):
            return 0, 0
        now = _param_versions(versioned)  # (one C-level pass and list compare: ~0.1 µs a parameter)
        if now == seen:
            return 0, 0
        changed = [i for i, (a, b) in enumerate(zip(now, seen, strict=True)) if a != b]
        moved = [index[i] for i in changed if i < len(params)]
        plain = agreement.moved_digest(moved, [self._params[i] for i in moved]) if moved else 0
        sidx, pieces = self._shard_pieces()  # (only where HSDP's replicated parameters are versioned)
        hsdp = [i - len(params) for i in changed if i >= len(params)]
        shard = agreement.moved_digest([sidx[j] for j in hsdp], [pieces[j] for j in hsdp]) if hsdp else 0
        return plain, shard

    def _checks_replicas(self) -> bool:
        """Whether the parameters must be compared across ranks at the first step after construction or
        ``load_state_dict``: sharded W > 1 ranks update each block from its owner's copy and hand it to every
        rank, so replicas that started different (another seed per rank and no broadcast) end equal but as a
        mix of each owner's blocks, silently (EGN, whose ranks apply one step each to their own copy, keeps
        them apart); an FSDP2 model's plain parameters would stay apart. With either ``grad_reduction``: under
        ``"none"`` the gradient comparison does not see replicas whose gradients were averaged (DDP broadcasts
        rank 0's weights when it wraps the model only, so weights loaded on rank 0 alone after the wrap trained
        as such a mix, 0.09-0.11 off one process in 4 steps). One read of the parameters per construction or
        load. FSDP2 shards and ``shard=False`` partitions are not replicas."""
        return self._checks_moved() or self._checks_partitions()

    #: True where the step's global sums add up parts of one model (SOAA's trust region): with
    #: ``shard=False`` each rank's parameters must be its own partition, and a model replicated on every
    #: rank (DDP) would be counted W times, silently (SOAA's ρ off by W: 5e-3 after 8 steps at W = 2)
    sums_parts_over_ranks: bool = False

    def _checks_partitions(self) -> bool:
        """Whether the first step after construction or ``load_state_dict`` refuses ``shard=False`` ranks
        whose parameters are all equal (replicas, not partitions; the same digest as
        :meth:`_checks_replicas`). ``partitioned_by_caller``: set by a caller that partitioned the
        parameters itself (deepspeed_ext, ZeRO 1-3), where equal partitions would be a coincidence."""
        return self._own_partitions() and self._global_sums() is not None

    def _own_partitions(self) -> bool:
        """``shard=False`` at W > 1 over parameters of the caller's own: not DTensor shards, not partitions a
        caller made and checks itself (``partitioned_by_caller``: deepspeed_ext, ZeRO 1-3). Asked first: the
        default (sharded) optimizer answers at its first test, before :meth:`_global_sums` reads the groups."""
        return (not self.sharding.shard and self.comm.world_size > 1 and self._dtensor is None
                and not self.__dict__.get("partitioned_by_caller", False))

    def _records_saving_rank(self) -> bool:
        """Whether this optimizer's state dicts record the rank that saved them
        (:mod:`~lightning_soaa.optim.saving_rank`): ``shard=False`` at W > 1 over parameters of the caller's own,
        where each rank's ``state_dict()`` is its own state. Not DeepSpeed's partitions (``partitioned_by_caller``:
        DeepSpeed saves one file per rank and checks its layout), DTensor shards, or EGN's replicas
        (:attr:`unsharded_replicas`: compared anyway)."""
        return not self.unsharded_replicas and self._own_partitions()

    def _with_saving_rank(self, full: dict[str, Any]) -> dict[str, Any]:
        """``full`` with the rank that saved it recorded, where :meth:`_records_saving_rank` and a step was taken
        (a state without one has no moments to put on the wrong rank). Not before: a fresh optimizer's state dict
        is the destination of torch's ``dcp.load``, which refuses a checkpoint that lacks any of its keys, as every
        one saved before this key was. A state loaded and not yet judged by a step keeps the rank that saved it."""
        if not self._records_saving_rank() or self.num_steps + self.skipped_steps == 0:
            return full
        rank, world = self.__dict__.get("_loaded_origin") or (self.comm.rank, self.comm.world_size)
        return saving_rank.with_saving_rank(full, FORMAT_KEY, rank, world)

    def _origin_due(self) -> bool:
        """Whether this step compares the parameters across ranks because a state dict that records its saving
        rank was loaded since the last step (on every rank that loaded one: a load on every rank is the rule)."""
        return self.__dict__.get("_loaded_origin") is not None and self._records_saving_rank()

    def _partitions_due(self) -> bool:
        """Whether this step must tell partitions from replicas although construction or ``load_state_dict`` is
        behind it: ``max_grad_norm`` written into the groups since (by hand, a schedule) starts a global sum."""
        return self._checks_partitions() and not self.__dict__.get("_partitions_seen", False)

    def _global_sums(self) -> str | None:
        """What of the step sums parts of one model over the ranks (named for the refusal), or None: SOAA's trust
        region, and ``max_grad_norm``'s norm of every optimizer that clips (on replicas it counted the model W
        times, so it clipped harder than one process: AdamW 1.2e-6, DASGO 3.6e-5 off it after 4 steps at W = 2)."""
        if self.sums_parts_over_ranks:
            return "the trust region's sums"
        if any(g.get("max_grad_norm") is not None for g in self.param_groups):
            return "max_grad_norm's gradient norm"
        return None

    def _scanned_grads(self, views: list[BlockView]) -> list[Tensor]:
        """The gradients this step must read: every local gradient when they are compared across ranks
        (it covers the owned ones too), else the owned gradients unless the record's partials already
        cover them (:attr:`partials_cover_grads`)."""
        if self._compares_grads() and self._dtensor is None:
            return self._compared_grads()
        if self.partials_cover_grads:
            return []
        return [v.grad for v in views if v.grad is not None]

    def _grad_scan(self, views: list[BlockView]) -> Tensor | float:
        """Σ‖g‖² (a 0-d float64 tensor: no host sync here) over :meth:`_scanned_grads`, finite iff they
        all are, unless a norm overflowed its dtype (see :meth:`_reduce_record`); when compared across
        ranks it is also this rank's digest for the agreement row."""
        grads = self._scanned_grads(views)
        return agreement.grad_sq_tensor(grads) if grads else 0.0

    def _step_digest(self) -> int:
        """The digest the step's meetings compare (the record's and ``max_grad_norm``'s, whichever comes first):
        the hyperparameters', and under FSDP2 which DTensor parameters have a gradient (a rank without one skips
        that shard, and ASGO/DASGO's mesh sums over the blocks with a gradient had other sizes on other ranks), and
        the bound of the Lightning clip the step took over (a ``configure_gradient_clipping`` may clip on some ranks
        only: those met in the clip's all-reduce, the others in the record's, and read each other's table)."""
        routed = self.__dict__.get("_routed_clip")
        clip = 0 if routed is None else agreement.hyperparameter_digest([{"gradient_clip_val": routed}])
        order = reduce_order.digest() if self._compares_reduce_order() else 0
        return self._hyper_digest() ^ clip ^ agreement.presence_digest(self._dtensor_grad_presence()) ^ order

    def _compares_reduce_order(self) -> bool:
        """Whether the step compares the order of FSDP2's gradient reductions across ranks (W > 1 over DTensor
        parameters, stepping gradients): see :mod:`~lightning_soaa.distributed.reduce_order`."""
        return self._dtensor is not None and self.comm.world_size > 1 and self._steps_gradients

    def _reduce_order_error(self, name: str) -> RuntimeError | None:
        """The refusal of FSDP2 units reduced in another order on some ranks (a collective: every rank calls it
        on the refusal's path), or None where every rank's order is the same."""
        return reduce_order.order_error(name, self._gather_detail(reduce_order.noted))

    def _hyper_digest(self) -> int:
        """The hyperparameter digest of this step (distributed/hyper_digest.py: the groups' texts are
        reused while their values are the same objects; a scheduler's new lr re-reads lr alone)."""
        rebuilt = int(self.__dict__.get("_rebuilt_digest", 0))  # parameters converted before the first step
        return self._groups_digest() ^ rebuilt

    def _global_hyperparameters(self) -> dict[str, float]:
        """Optimizer-wide values a loop sets by hand between steps (``opt.<name>``, not in a param group) that
        every rank must set alike (EGN's ``damping`` and ``alpha``): a subclass digests them with the groups
        (:meth:`_hyper_digest`), and a refusal names the one that differs (:meth:`_hyper_error`). None here."""
        return {}

    def _groups_digest(self) -> int:
        """:func:`agreement.hyperparameter_digest` of the param groups, each group's text kept while its values
        are the same objects (:class:`HyperparameterDigest`): the step's and each add_param_group's cross-rank
        check then read only what changed (a scheduler's lr, an added group), not every group at each call."""
        digest = self.__dict__.get("_hyper_digests")
        if digest is None:
            digest = self._hyper_digests = HyperparameterDigest()
        return digest(self.param_groups)

    def _out_of_order(self, ranks: list[int]) -> RuntimeError:
        """The error of ranks found in another optimizer's step than rank 0 (the instance ids of a step's
        first all-reduce differ), the same text whichever optimizer's collective the ranks met in."""
        return RuntimeError(
            f"{type(self).__name__}.step: rank(s) {ranks} are in the step of another optimizer than rank 0: "
            "the optimizers were stepped in a different order on some ranks (e.g. iterating a set of "
            "optimizers, whose order differs between processes), or add_param_group was called on some ranks only "
            "(its agreement met a step). Every rank must call step() on its optimizers in the same order, and "
            "add_param_group with the same group at the same point of training. Nothing changed."
        )

    def _dtensor_grad_presence(self) -> list[bool]:
        """Under FSDP2 (W > 1), whether each DTensor parameter has a gradient on this rank, in parameter order
        (empty otherwise). A pattern that differs across ranks comes from a module whose forward ran on some ranks
        only (a data-dependent branch: FSDP2 then pairs its reduce-scatter with another module's on the other
        ranks, mixing their gradients) or from ``p.grad = None`` set on some ranks."""
        if self._dtensor is None or self.comm.world_size == 1 or not self._steps_gradients:
            return []
        # (each step: a DTensor's .grad read past its __torch_function__ costs a third as much)
        with torch._C.DisableTorchFunctionSubclass():
            return [self._params[i].grad is not None for i in self._dtensor.sharded]

    def _presence_error(self, name: str, by_rank: list[Any]) -> RuntimeError | None:
        """The refusal of DTensor gradients present on some ranks only (``by_rank``: every rank's
        :meth:`_dtensor_grad_presence`), or None where every rank's is the same."""
        labels = [self._moved_label(i) for i in (self._dtensor.sharded if self._dtensor is not None else [])]
        detail = agreement.first_presence_difference(by_rank, labels)
        if not detail:
            return None
        return RuntimeError(
            f"{name}.step: {detail}. Each rank holds a shard of it: a step would update some shards and not "
            "others, and ASGO/DASGO's sums over the mesh would not match. Where a fully_shard module's forward ran "
            "on some ranks only (a data-dependent branch), FSDP2 paired its gradient reduce-scatter with another "
            "module's on the other ranks and mixed their gradients: run every such module on every rank (add 0 * "
            "an unused branch's output to the loss). A .grad set to None by hand: on every rank or on none. "
            "Nothing changed."
        )

    def _hyper_error(self, name: str, ranks: list[int]) -> RuntimeError:
        """The error for hyperparameters that differ across ranks (every rank calls it: a collective)."""
        presence = self._gather_detail(self._dtensor_grad_presence)  # (in the same digest: _step_digest)
        differs = self._presence_error(name, presence)
        if differs is None and self._compares_reduce_order():
            differs = self._reduce_order_error(name)
        if differs is not None:
            return differs
        # before the first step a conversion rebuilt on some ranks only joins this digest (the step
        # counts agree, so every rank adds the same hint)
        converted = ("; or, before the first step, the model was converted or moved (model.double(), "
                     ".half(), .to(...)) after the optimizer was built on some ranks and not on others (on "
                     "those ranks or on rank 0): convert every rank's model the same way"
                     if not (self.num_steps or self.skipped_steps) else "")
        # every rank is here (the verdict comes from the all-reduced table): one more collective, on
        # this path only, names the value that differs
        # (an optimizer-wide value set by hand, EGN's opt.damping, is named too: it was "differ" and no more)
        by_rank = self._gather_detail(lambda: (agreement.group_values(self.param_groups),
                                               self._global_hyperparameters(), self.__dict__.get("_routed_clip")))
        # (a rank that could not make its values sent None: the others' are named)
        sent = [r for r in ranks if by_rank[r] is not None] if by_rank[0] is not None else []
        values = [([], {}, None) if v is None else v for v in by_rank]
        groups, wide, clips = [g for g, _, _ in values], [o for _, o, _ in values], [c for _, _, c in values]
        detail = (clip_difference(clips, sent) or agreement.first_group_difference(groups, sent)
                  or agreement.first_global_difference(wide, sent))
        return RuntimeError(
            f"{name}.step: the hyperparameters ({self._hyper_what}) on rank(s) {ranks} "
            f"differ from rank 0's{detail}; every rank must set the same values (same scheduler on every rank; a "
            "ReduceLROnPlateau must see the same metric on every rank: under Lightning log it with "
            "sync_dist=True)"
            f"{converted}. Nothing changed."
        )

    def _raise_agreed(self, flags: Sequence[float], error: BaseException | None,
                      where: str = "before the step's all-reduce", what: str | None = None) -> NoReturn:
        """Raise on every rank when ranks failed (``flags``: every rank's error flag from a reduced table;
        ``error``: this rank's): an exception of one class on every rank (:func:`agreement.agreed_error`), this
        rank's own where it is of that class, else with it as the cause; a KeyboardInterrupt (any BaseException
        that is no Exception) of this rank is raised as itself."""
        raised = agreement.agreed_error(what or f"{type(self).__name__}.step", flags, error, where)
        if raised is error or (error is not None and not isinstance(error, Exception)):
            raise error  # (a Ctrl+C stays one on its rank: the others raise an error naming that rank)
        raise raised from error

    def _replicas_due(self) -> bool:
        """Whether this step's replica check is the one due after construction or ``load_state_dict`` (not
        only the one a refused in-place change forced): the same on every rank (the check flags are compared)."""
        return bool(self.__dict__.get("_replicas_unchecked", False)) and self._checks_replicas()

    def _moved_label(self, i: int) -> str:
        return (repr(self._names[i]) if self._names[i] else f"#{i}") if 0 <= i < len(self._names) else "?"

    #: how HSDP's replicated shards are made equal again (a refusal's cure)
    _HSDP_BROADCAST = ("torch.distributed.broadcast(p.to_local(), group=mesh.get_group(0), group_src=0) for every "
                       "DTensor parameter p, over the replicate dim of fully_shard's (replicate, shard) mesh")

    def _shard_pairs(self, ranks: Sequence[int]) -> str:
        """``rank 2 from rank 0, ...``: each rank whose HSDP shard differs and the replica it was compared with."""
        shards = self._shard_replicas()
        of = shards.replica_of if shards is not None else [0] * self.comm.world_size
        return ", ".join(f"rank {r} from rank {of[r]}" for r in ranks)

    def _moved_error(self, verdict: agreement.StepVerdict, differ: tuple[list[int], list[int], bool]) -> RuntimeError:
        """The error of a step whose parameters were changed in place differently across ranks. The next step
        compares the whole parameters across ranks (the replica check): a retry after the ranks were made equal
        again (a broadcast of ``p.data`` moves no version counter) is judged by their values. Raised on every
        rank from the same verdict, so the next step's check is due on every rank (:meth:`_raise_disagreement`)."""
        ranks, which_differ, hsdp = differ  # (:meth:`_replicas_differ`: the whole parameters compared, names them)
        first = which_differ[0] if which_differ else -1
        drift = f" by more than {DRIFT_RTOL:g} of their largest magnitude (the drift of last bits allowed)"
        if hsdp:
            which = ("parameters were changed in place since the last step, outside the optimizer, on some HSDP "
                     "replicas only, and ranks that hold the same shard now differ "
                     f"({self._shard_pairs(ranks)}; first: parameter {self._moved_label(first)})"
                     f"{drift * self._drift_allowed(True)}")
        else:
            drift = drift * self._drift_allowed(False)
            which = (f"parameters were changed in place since the last step, outside the optimizer, otherwise on "
                     f"rank(s) {verdict.moved_ranks} than on rank 0, and the parameters on rank(s) {ranks} now "
                     f"differ from rank 0's{drift} (first: parameter {self._moved_label(first)})")
        why = self._replicas_why(hsdp)
        cure = self._HSDP_BROADCAST if hsdp else "torch.distributed.broadcast(p.data, src=0) for every parameter"
        return RuntimeError(
            f"{type(self).__name__}.step: {which}. {why[0].upper()}{why[1:]}. "
            "Typical cause: nn.Embedding / nn.EmbeddingBag built with max_norm, whose forward "
            "renormalises the rows of this rank's own batch in place: build it without max_norm (renormalise the "
            "whole table after step(), the same way on every rank) or freeze it. Allowed: in-place changes of "
            "parameters between steps that are the same on every rank. Nothing changed; the next step compares "
            "the whole parameters across ranks, so it trains on once every rank holds the same values again "
            f"(e.g. {cure})."
        )

    def _resync_error(self, verdict: agreement.StepVerdict) -> RuntimeError:
        """The error of the step after an in-place-change refusal whose whole parameters still differ."""
        return RuntimeError(
            f"{type(self).__name__}.step: the parameters on rank(s) {verdict.param_ranks} still differ from rank "
            "0's (an HSDP shard: from the rank that holds the same shard) after a step refused for a parameter "
            "changed in place on some ranks only. Make them equal on every rank again "
            "(torch.distributed.broadcast(p.data, src=0) for every parameter"
            + ("; under HSDP " + self._HSDP_BROADCAST if self._shard_replicas() is not None else "")
            + ", or load the same weights on every rank) before stepping. Nothing changed."
        )

    def _raise_disagreement(self, verdict: agreement.StepVerdict, error: BaseException | None) -> None:
        """Raise on every rank (the same decision everywhere: the verdict is bit-identical)."""
        name = type(self).__name__
        # the crossing first, as EGN's agreement reads it: ranks in two optimizers' steps raise one error
        # (this rank's own, if any, is its cause)
        if verdict.instance_ranks:
            raise self._out_of_order(verdict.instance_ranks) from error
        if verdict.error_ranks:
            self._raise_agreed(verdict.error_flags, error)
        if verdict.step_counts or verdict.check_ranks:
            what = (f"are at different steps (steps taken, by rank: {verdict.step_counts})" if verdict.step_counts
                    else f"are at different steps: rank(s) {verdict.check_ranks} differ from rank 0 in whether "
                    "the optimizer was constructed or loaded since the last step")
            raise RuntimeError(
                f"{name}.step: the ranks' optimizers {what}. Typical causes: load_state_dict on some ranks "
                "only (every rank must load the checkpoint), or a rank that skipped step(). Nothing changed."
            )
        if verdict.hyper_ranks:
            raise self._hyper_error(name, verdict.hyper_ranks)
        if verdict.foreign_loads and verdict.param_ranks and self._records_saving_rank():  # (the verdict: every rank)
            raise RuntimeError(saving_rank.foreign_load_error(name, verdict.foreign_loads, self.comm.world_size,
                                                              verdict.param_ranks))
        if verdict.replicated and self._checks_partitions():
            raise RuntimeError(
                f"{name}.step: shard=False on {self.comm.world_size} ranks whose parameters are all equal (a "
                "model replicated on every rank, e.g. under DDP): shard=False declares that every rank's "
                "parameters are its own partition (DeepSpeed ZeRO), and the optimizer's global sums "
                f"({self._global_sums()}) would count the replicated model {self.comm.world_size} times. Use "
                "shard=True (the default). Where these are partitions of one model that hold equal values (every "
                "rank built its part from one seed: identical pipeline stages, a manual tensor-parallel layer's "
                "shards), set opt.partitioned_by_caller = True on every rank. "
                "Nothing changed."
            )
        # (a check made due by a load alone compares partitions: they differ by design)
        if verdict.param_ranks and not self._checks_partitions() and not self._origin_due():
            self._raise_replicas_differ(verdict)
        # after the replica check, which names the cure of a whole differing replica; the verdict is the same on
        # every rank, so every rank joins _replicas_differ's collective
        differ = self._replicas_differ() if verdict.moved_ranks else None
        if differ is not None:
            self._moved_recheck = True  # the next step compares the whole parameters (on every rank)
            raise self._moved_error(verdict, differ)
        if verdict.grad_ranks:
            raise self._grad_error(verdict.grad_ranks)

    def _grad_error(self, ranks: list[int]) -> RuntimeError:
        """The refusal of gradients that differ across ranks under ``grad_reduction="none"`` (``ranks``: those
        differing from rank 0), naming the first parameter that differs. Collective: every rank calls it."""
        name = type(self).__name__
        # a step fused into the backward (a post-accumulate-grad hook) runs before DDP's all-reduce
        fused = (" This step runs inside a backward pass (fused into it by a gradient hook): there it "
                 "comes before DDP averages the gradients, so use grad_reduction='mean' without DDP."
                 if torch._C._current_graph_task_id() != -1 else "")
        detail, first = self._grad_difference(ranks)
        added = None if fused else self._added_group_of(first)
        if added is not None:
            return RuntimeError(self._unreduced_added_group(name, ranks, detail, added))
        return RuntimeError(
            f"{name}.step: the gradients on rank(s) {ranks} differ from rank 0's{detail}, but with "
            "grad_reduction='none' every block is updated with its owner's gradient, so the ranks would "
            "train on different data without averaging it. Wrap the model in DistributedDataParallel "
            "(Lightning strategy='ddp' does), or construct the optimizer with grad_reduction='mean' to "
            "have it average the gradients itself. Already under DDP: a parameter the forward did not use, or "
            "one frozen (requires_grad_(False)) since DDP wrapped the model, keeps DDP from reducing its bucket "
            "and the other parameters in it; pass find_unused_parameters=True (Lightning: "
            "strategy='ddp_find_unused_parameters_true') or leave that parameter out; a parameter that was "
            "frozen (requires_grad=False) when DDP was built and unfrozen later is never reduced by it: "
            "build the DDP wrapper again after unfreezing; and the last backward before step() must run "
            "outside ddp_model.no_sync() (under gradient accumulation only the earlier micro-batches go "
            "inside it); a communication hook (ddp_model.register_comm_hook) must leave every rank the "
            "same gradient: one that skips the all-reduce or reduces over a subgroup only (local SGD: "
            "post_localSGD_hook past start_localSGD_iter with a subgroup smaller than the group) does "
            "not, and a sharded optimizer cannot step replicas apart: use DDP's default reduction or a "
            "hook that all-reduces over the whole group (fp16_compress_hook and powerSGD_hook do). "
            "Nothing changed."
            + fused
        )

    def _added_group_of(self, index: int | None) -> int | None:
        """The param group of parameter ``index`` when ``add_param_group`` added it after construction (Lightning's
        BaseFinetuning unfreezing a backbone, or its replay of that group on a resume), else None."""
        built = self.__dict__.get("_groups_at_construction")
        if index is None or built is None:
            return None
        ends = itertools.accumulate(len(m) for m in self._group_members)
        gi = next((g for g, end in enumerate(ends) if index < end), None)
        return gi if gi is not None and gi >= built else None

    @staticmethod
    def _unreduced_added_group(name: str, ranks: list[int], detail: str, group: int) -> str:
        """The refusal where the first gradient that differs is in a group added after construction while the
        groups built with the optimizer agree: DDP reduces those, so it was built with this one frozen. Lightning's
        BaseFinetuning/BackboneFinetuning under strategy='ddp' does exactly that; the list of every cause
        (:meth:`_grad_error`) left its users to find theirs among six."""
        return (
            f"{name}.step: the gradients on rank(s) {ranks} differ from rank 0's{detail}, a parameter of "
            f"param_groups[{group}], which add_param_group added after the optimizer was built, while those of "
            "the groups it was built with agree. A parameter frozen (requires_grad=False) when "
            "DistributedDataParallel wrapped the model and unfrozen later, or made after the wrap (an adapter "
            "added since), is never averaged by DDP: Lightning's "
            "BaseFinetuning/BackboneFinetuning under strategy='ddp' freeze the backbone in freeze_before_training, "
            "before the wrap, and unfreeze_and_add_param_group adds it after. With grad_reduction='none' every block "
            "is updated with its owner's gradient, so the ranks would train on different data. Construct the "
            "optimizer with grad_reduction='mean' (it then averages every gradient itself: equal to one process), "
            "or freeze nothing before the wrap (build the optimizer over every parameter and freeze / "
            "make_trainable the backbone from finetune_function, with strategy='ddp_find_unused_parameters_true'); "
            "in a loop of your own, wrap the model in DDP again after unfreezing or adding. Nothing changed."
        )

    def _raise_replicas_differ(self, verdict: agreement.StepVerdict) -> None:
        """Raise (every rank, from the same verdict) for whole replicas that differ, by the check that found them:
        the first step's, the one after an in-place refusal, or the periodic one. A periodic check that meets
        version counters moved otherwise across ranks returns: the in-place refusal names those. So does a check
        whose replicas that may drift (FSDP2's plain ones under ``"none"``, ``Replicate`` DTensor pieces) differ by
        drift only (:meth:`_replicas_differ`; their bits did)."""
        if (self._plain_drifts() or self._shard_replicas() is not None) and self._replicas_differ() is None:
            return
        if self._replicas_due():
            raise self._replica_error(verdict.param_ranks)
        if self.__dict__.get("_moved_recheck", False) or not self._periodic_check_due():
            self._moved_recheck = True  # (already: the check a refused in-place change forced, see _moved_error)
            raise self._resync_error(verdict)
        if not verdict.moved_ranks:
            raise self._unseen_write_error()

    def _unseen_write_error(self) -> RuntimeError:
        """The periodic replica check's refusal (:meth:`_periodic_check_due`): the replicas differ and no version
        counter says why. Names every parameter that differs (up to 8) and the ranks (one more collective, on
        this error path only); under HSDP, where the replicated shards differ, each rank with the replica it was
        compared with."""
        ranks, differ, hsdp = self._replicas_differ(replicas=not self._plain_drifts()) or ([], [], False)
        names = ", ".join(self._moved_label(i) for i in differ[:8]) + (", ..." if len(differ) > 8 else "")
        what = f"parameter(s) {names}" if names else "the parameters"
        where = (f"on ranks that hold the same shard differ ({self._shard_pairs(ranks)})" if hsdp else
                 f"on rank(s) {ranks} differ from rank 0's")
        how = ("p.to_local() or p.data (p.to_local().mul_(...), p.data.mul_(...), p.data = t)" if hsdp else
               "p.data (p.data.mul_(...), p.data = t, p.data.copy_(...))")
        cure = self._HSDP_BROADCAST if hsdp else "torch.distributed.broadcast(p.data, src=0) for every parameter"
        why = self._replicas_why(hsdp)
        drift = (f", by more than {DRIFT_RTOL:g} of their largest magnitude (a drift of last bits passes)"
                 * (hsdp and self._drift_allowed(True)))
        return RuntimeError(
            f"{type(self).__name__}.step: {what} {where} at step {self.num_steps + self.skipped_steps} (the replica "
            f"check made every replica_check_every={self.sharding.replica_check_every} steps){drift}, and no in-place "
            "change since the last step says why: they were written on some ranks only around autograd's version "
            f"counters, e.g. through {how} or a NumPy view of a parameter, or loaded or broadcast on some "
            f"ranks only. {why[0].upper()}{why[1:]}. Make every rank hold the same values again ({cure}) and make "
            "such writes on every rank alike. Nothing changed; the step trains on once the replicas are "
            "equal."
        )

    def _replica_error(self, ranks: list[int]) -> RuntimeError:
        """The error of the replica check due at the first step after construction or ``load_state_dict``
        (:meth:`_checks_replicas`), naming the first parameter that differs (:meth:`_param_difference`). One more
        collective, on this error path only (every rank raises it, from the same verdict)."""
        differ = self._replicas_differ()
        if differ is not None and differ[2]:
            return self._shard_replica_error(differ)
        ddp = ("load the same checkpoint on every rank" if self._dtensor is not None else
               "wrap the model in DistributedDataParallel (it broadcasts at wrap) with grad_reduction='none'"
               if self.sharding.grad_reduction == "mean" else "under DistributedDataParallel, which broadcasts "
               "rank 0's weights only when it wraps the model, load or change weights after the wrap on every "
               "rank, not on rank 0 only")
        return RuntimeError(
            f"{type(self).__name__}.step: the parameters on rank(s) {ranks} differ from rank 0's"
            f"{self._param_difference(differ)} at the first step after construction or load_state_dict. Every "
            f"rank must start from the same weights ({self._replicas_why()}). Broadcast the initial weights "
            "(seed identically on every rank before building the model, or torch.distributed.broadcast(p.data, "
            f"src=0) for every parameter) or {ddp}. A forward that changes its own weights in place on each "
            "rank's batch makes them differ too: nn.Embedding / nn.EmbeddingBag built with max_norm (build it "
            "without max_norm and renormalise the whole table after step(), the same way on every rank, or "
            "freeze it). Nothing changed."
        )

    def _replicas_differ(self, replicas: bool = True) -> tuple[list[int], list[int], bool] | None:
        """``(the ranks whose replicas (:meth:`_replica_params`) differ from rank 0's bits, the indices of the
        parameters that differ on any of them, in order, empty where no rank could tell, False)``; where those are
        equal, the same of HSDP's replicated shards, each rank's compared with its replica's
        (:meth:`_shard_pieces`), with True; or None where every rank holds the same. Asked where the ranks changed
        parameters in place differently since the last step (a rank that swapped EMA weights in for an evaluation
        and its own back, alone, moved version counters there only although nothing differs) and to name a
        differing replica. One collective (each rank's :func:`agreement.param_sums`), on those paths only; every
        rank asks, from the same verdict. ``replicas=False``: HSDP's shards only (:meth:`_plain_drifts`). FSDP2's
        plain replicas under ``"none"`` (:meth:`_plain_beyond_drift`) and the ``Replicate`` DTensor pieces whose bits
        differ are compared to a tolerance (:mod:`~lightning_soaa.distributed.replica_drift`): honest copies drift
        by ulps there."""
        index, params = self._replica_params() if replicas else ((), [])
        sidx, pieces = self._shard_pieces()
        if params and self._plain_drifts():
            drifted = self._plain_beyond_drift(index, params)
            if drifted is not None:
                return drifted
            params = []  # (compared: within drift)
        by_rank = self._gather_detail(lambda: (agreement.param_sums(params), agreement.param_sums(pieces)))
        plain = [None if v is None else v[0] for v in by_rank]
        ranks = [r for r in range(1, len(plain)) if plain[0] is None or plain[r] != plain[0]]
        if ranks:
            return ranks, _differences(plain, ranks, [0] * len(plain), index), False
        shards = self._shard_replicas()
        if shards is None:
            return None
        piece = [None if v is None else v[1] for v in by_rank]
        if not shards.odd_ranks(piece):
            return None
        # (bits apart: compared to a tolerance, since Replicate copies drift by ulps under non-deterministic kernels)
        found = pieces_beyond_drift(pieces, self.comm.rank, shards.replica_of, self._gather_detail,
                                    self._pieces_drift())
        by_rank = self._gather_detail(lambda: found)
        odd = [r for r, v in enumerate(by_rank) if v is None or v]
        return (odd, sorted({sidx[j] for r in odd for j in by_rank[r] or ()}), True) if odd else None

    def _pieces_drift(self) -> list[bool]:
        """Per replicated DTensor parameter (:meth:`_shard_pieces`): whether its copies may drift by ulps (a
        tensor-parallel ``Replicate`` weight), not equal in every bit by construction (HSDP's replicas).
        Read on the paths that compare the pieces' values only."""
        return replicas_may_drift(self._shard_memo()[1])

    def _drift_allowed(self, hsdp: bool) -> bool:
        """Whether a refusal of differing replicas compared them to a tolerance (a refusal's sentence)."""
        return any(self._pieces_drift()) if hsdp else self._plain_drifts()

    def _plain_beyond_drift(self, index: Sequence[int],
                            params: list[Tensor]) -> tuple[list[int], list[int], bool] | None:
        """:meth:`_replicas_differ` of FSDP2's plain replicas under ``"none"`` (:meth:`_plain_drifts`): each rank's
        copy compared with rank 0's to :func:`~lightning_soaa.distributed.replica_drift.drift_tolerance`, since honest
        copies drift by ulps there and a bitwise comparison refused an EMA swap made on one rank. Collective (one sum
        per parameter, then one gather), on the paths :meth:`_replicas_differ` is asked on only."""
        found = beyond_drift(params, self.comm.rank, self.comm.all_reduce_)
        by_rank = self._gather_detail(lambda: found)
        ranks = [r for r in range(1, len(by_rank)) if by_rank[r] is None or by_rank[r]]
        if not ranks:
            return None
        return ranks, sorted({index[j] for r in ranks for j in by_rank[r] or ()}), False

    def _shard_replica_error(self, differ: tuple[list[int], list[int], bool]) -> RuntimeError:
        """:meth:`_replica_error` where HSDP's replicated shards differ (another seed per replicate group, weights
        loaded on one replica after ``fully_shard``)."""
        ranks, which_differ, _ = differ
        first = which_differ[0] if which_differ else -1
        return RuntimeError(
            f"{type(self).__name__}.step: ranks that hold the same shard of a DTensor parameter differ "
            f"({self._shard_pairs(ranks)}; first: parameter {self._moved_label(first)}) at the first step after "
            f"construction or load_state_dict. Every rank must start from the same weights "
            f"({self._replicas_why(True)}). Seed identically on every rank (every replicate group alike) before "
            "building the model, or load the same weights on every rank after fully_shard (torch.distributed."
            "checkpoint, or set_model_state_dict with full_state_dict=True and broadcast_from_rank0=True), or "
            f"make the replicas equal: {self._HSDP_BROADCAST}. Nothing changed."
        )

    def _param_difference(self, differ: tuple[list[int], list[int], bool] | None) -> str:
        """`` (first: parameter 'w' on rank r)``: the first parameter whose bits a rank holds otherwise than rank 0
        (``differ``: :meth:`_replicas_differ`'s), or '' where no rank could tell."""
        if differ is None or not differ[1]:
            return ""
        return f" (first: parameter {self._moved_label(differ[1][0])} on rank {differ[0][0]})"

    def _grad_difference(self, ranks: list[int]) -> tuple[str, int | None]:
        """`` (first: parameter 'w', ‖g‖² A on rank 0, B on rank r)``: the first compared gradient in which one of
        ``ranks`` differs from rank 0 (absent: "none"), or '' if none does by its norm alone (then it differs in
        its values only); and that parameter's index (None with ''). Every rank calls it (the verdict comes
        from the all-reduced table): one more collective, on this error path only, as :meth:`_hyper_error`'s."""
        idx = range(len(self._params)) if self._dtensor is None else self._dtensor.plain
        grads = [self._params[i].grad for i in idx]
        by_rank = self._gather_detail(lambda: [None if g is None else agreement.grad_sq_exact([g]) for g in grads])
        if by_rank[0] is None:  # (rank 0 could not take its norms: nothing to compare with)
            return "", None
        for r in (r for r in ranks if by_rank[r] is not None):
            for j, (a, b) in enumerate(zip(by_rank[0], by_rank[r])):
                if a != b and (a is None or b is None or abs(a - b) > agreement.GRAD_RTOL * max(abs(a), abs(b))):
                    i = list(idx)[j]
                    label = repr(self._names[i]) if self._names[i] else f"#{i}"
                    show = ["none" if v is None else f"{v:.6g}" for v in (a, b)]
                    return f" (first: parameter {label}, ‖g‖² {show[0]} on rank 0, {show[1]} on rank {r})", i
        return "", None

    def _gather_detail(self, make: Callable[[], Any]) -> list[Any]:
        """Every rank's ``make()`` (a refusal's detail: one all_gather_object, on an error path every rank takes),
        None from a rank that could not make it or pickle it: raised before the exchange (out of memory in the
        float64 norms, a value that cannot be pickled), that rank left the others waiting in it (gloo: an abort,
        NCCL: a hang) and its error replaced the refusal. A Ctrl+C there is raised after the exchange."""
        mine: Any = None
        interrupted: BaseException | None = None
        try:
            value = make()
            pickle.dumps(value)  # (all_gather_object pickles before its collective: a failure there left the others)
            mine = value
        except Exception as e:  # noqa: BLE001 - no detail from this rank; every rank raises the refusal all the same
            log.debug("%s.step: the refusal's detail could not be made on this rank: %r", type(self).__name__, e)
        except BaseException as e:  # noqa: BLE001 - raised below, once this rank joined the exchange
            interrupted = e
        by_rank: list[Any] = self.comm.all_gather_object(mine)
        if interrupted is not None:
            raise interrupted
        return by_rank

    def _reduce_record(self, views: list[BlockView], local_error: BaseException | None) -> StepRecord:
        """``_prepare``, this rank's non-finite flag and agreement row, and the step's ONE fp64 all-reduce;
        raises on every rank together when any rank raised or the ranks disagree.

        One host copy for the record's tensor values and the gradient scan together; a single process
        (``LocalComm``: the all-reduce is the identity) reads the reduced values from it directly."""
        record, error = self._prepare_locally(views, local_error)
        compare = self._compares_grads()
        try:
            vals, compared = self._local_values(views, record, error, compare)
            if isinstance(self.comm, LocalComm):  # one process: nothing to agree on, nothing to reduce
                if error is not None:
                    raise error
                return record.with_sums(vals)
            if error is None:
                self._reserve_exchange_out()
            rows = self._agreement_rows(error, compared)
        except Exception as e:
            if isinstance(self.comm, LocalComm):
                raise
            # this rank's own work failed (out of memory in the scan, a gradient or a group value it cannot
            # read): held like _prepare's error, so that every rank raises together (nothing reads the sums)
            record, error = self.step_record(), error or e
            vals = [0.0] * len(record.summed_fields())
            rows = self._agreement_rows(error)
        n = len(vals)
        # Every rank joins this call, including ranks that own no block, so shapes always match; the last
        # value is the stop vote's (distributed/stop_vote.py), present whether or not a vote is attached
        vote = self.stop_vote
        if n > agreement.RECORD_SLOTS:
            raise RuntimeError(f"{type(self).__name__}: {n} summed values, more than agreement.RECORD_SLOTS")
        pad = [0.0] * (agreement.RECORD_SLOTS - n)  # the same size for every class (see RECORD_SLOTS)
        reduced = self.comm.all_reduce_scalars(torch.tensor(
            vals + pad + rows + [vote.value() if vote is not None else 0.0], dtype=torch.float64)).tolist()
        stop_total = reduced.pop()
        if vote is not None:
            vote.record(stop_total)
        if self.comm.world_size == 1:
            if error is not None:
                raise error
        else:
            if not self.__dict__.get("_signals_checked", False):
                self._signals_checked = True
                self._warn_in_handler_checkpoint()
            verdict = agreement.read_step_rows(reduced[agreement.RECORD_SLOTS:], self.comm.world_size,
                                               compare_grads=compare and reduced[0] == 0,
                                               count_grads=self._counts_grads(), replica_of=self._replica_of())
            self._raise_disagreement(verdict, error)
            self._replicas_unchecked = self._moved_recheck = False  # compared (or not due): every rank alike
            self._partitions_seen = self._checks_partitions()
            self._loaded_origin = None  # judged: the next load records its own
            self._moved_judged = True  # the in-place changes passed (read by _sharded_step's _note_versions)
            if verdict.gradless_ranks:
                self._warn_gradless_ranks(verdict.gradless_ranks)
        return record.with_sums(reduced[:n])

    def _local_values(self, views: list[BlockView], record: StepRecord, error: BaseException | None,
                      compare: bool) -> tuple[list[float], tuple[float, float]]:
        """The record's summed values on the host, with this rank's non-finite flag and gradient flag in its
        first two slots, and the Σ‖g‖² and Σ log2 ‖g_i‖² compared across ranks (0 unless ``compare``): the
        gradient scan, copied to the host with the record's values (one host copy). After an ``error`` nothing
        is read (every rank raises, and a gradient may be unreadable: meta)."""
        scan: Tensor | float = 0.0
        logs: Tensor | float = 0.0
        plain: Tensor | float = 0.0
        if error is not None:
            pass
        elif compare and self._dtensor is None:  # the scan reads the compared gradients: their logs from its norms
            grads = self._scanned_grads(views)
            scan, logs = agreement.grad_scan_tensors(grads) if grads else (0.0, 0.0)
        else:
            scan = self._grad_scan(views)
            if compare:  # FSDP2: the plain parameters' gradients are compared apart from the owned shards' scan
                grads = self._compared_grads()
                plain, logs = agreement.grad_scan_tensors(grads) if grads else (0.0, 0.0)
        vals = host_floats([getattr(record, n) for n in record.summed_fields()] + [scan, plain, logs])
        grad_logs = vals.pop()
        plain_sq = vals.pop()
        grad_sq = vals.pop()
        if error is None and not math.isfinite(grad_sq):
            # finite gradients whose float32 norm overflows (|g| > 3.4e38, e.g. ten entries of 1e19) are
            # not skipped: only then are the norms taken again, accumulated in float64 (10x slower)
            grad_sq = agreement.grad_sq_exact(self._scanned_grads(views))
        bad = error is None and (vals[0] > 0 or not math.isfinite(grad_sq) or self._local_nonfinite(vals[1:])
                                 or self._statistic_overflows(views, grad_sq))
        # a step skipped for a non-finite value compares no gradient (on no rank: its flag is summed), so its logs
        # are not taken again (a second float64 pass over every gradient at each overflow of an fp16 run)
        if compare and error is None and not bad and not math.isfinite(grad_logs):
            grad_logs = agreement.grad_log_exact(self._scanned_grads(views) if self._dtensor is None
                                                 else self._compared_grads())
        vals[0] = 1.0 if bad else 0.0
        vals[1] = 1.0 if error is None and any(v.grad is not None for v in views) else 0.0
        return vals, ((grad_sq if self._dtensor is None else plain_sq), grad_logs) if compare else (0.0, 0.0)

    def _warn_in_handler_checkpoint(self) -> None:
        """Once, at the first W > 1 step: Lightning's SLURM auto-requeue checkpoints inside its signal
        handler, where this optimizer's consolidation meets the other ranks' step collectives (measured: both
        ranks aborted, no checkpoint; see :mod:`lightning_soaa.lightning.preemption`)."""
        signum = in_handler_checkpoint_signal()
        if signum is not None and self._sharded_multi_rank():
            log.warning("%s: Lightning's SLURM auto-requeue is set to checkpoint inside its handler of signal %d, "
                        "at whatever point each rank is; with this sharded optimizer the checkpoint's "
                        "collectives meet the step's and the run ends without a checkpoint. Add "
                        "lightning_soaa.lightning.PreemptionCheckpoint() to the Trainer's callbacks: every "
                        "rank then saves together at the next step.", type(self).__name__, signum)

    def _sharded_step(self, local_error: BaseException | None = None) -> bool:
        """The template step. Returns False when the step was skipped on every rank, or changed nothing
        because no parameter has a gradient on any rank.

        ``local_error``: an exception this rank raised before the step (e.g. an invalid loss); it is
        reported through the all-reduce and raised on every rank, so the ranks stay in step. A step that
        raises hands torch.amp.GradScaler's attributes back and remembers the gradients it unscaled
        (:func:`~lightning_soaa.optim.step_context.amp_after_raise`): a retry is then the step it would have been.
        """
        unscaled: list[Tensor] = []  # the gradients this step holds unscaled (the scaler's contract)
        raised = True
        try:
            stepped = self._template_step(local_error, unscaled)
            raised = False
        except BaseException:
            amp_after_raise(self, unscaled)
            # the traceback holds this frame (and _template_step's) until the caller's except block ends: emptied,
            # the list no longer keeps the gradients alive there (a caller freeing them to retry on a smaller batch)
            unscaled.clear()
            raise
        finally:
            self.__dict__.pop("_held_out", None)  # (a skipped or failed step: its gather's buffers go)
            self._mark_averaged_grads()
            self.__dict__.pop("_routed_clip", None)  # (Lightning's clip value belongs to this step alone)
            if self._compares_reduce_order():  # (kept where it raised: a retry on these gradients compares it again)
                reduce_order.clear_after_step(raised)
            # only a step whose verdict passed (or the first) moves the mark: a refused step changed nothing, and
            # marked, its retry saw no change and silently kept the owners' copies of what the ranks changed apart
            if self.__dict__.pop("_moved_judged", False) or self.__dict__.get("_param_versions") is None:
                self._note_versions()
        self.__dict__.pop("_clip_mark", None)  # (kept where the step raised: its retry clips these gradients once)
        return stepped

    def _template_step(self, local_error: BaseException | None, unscaled: list[Tensor]) -> bool:
        """:meth:`_sharded_step`'s work; ``unscaled`` receives the gradients it unscales (or finds unscaled)."""
        self._join_before_step()
        # Until the step's first collective (the exchange, or the record's all-reduce) an error of this rank's
        # own work is held, not raised: this rank still joins, and every rank raises together (a hang else)
        try:
            self._check_before_exchange(unscaled)
        except Exception as e:
            local_error = local_error or e
        if self._clips_replicas():  # the whole gradient is here: clipped before a subclass's planned step reads it
            local_error = self._clip_grads([], local_error)
        if local_error is None and self._planned_step():
            return True
        try:  # meta tensors, sparse gradients, changed parameters: held like any other local error
            self._check_step(warn=local_error is None)  # a step that already failed proves nothing
        except Exception as e:
            local_error = local_error or e
        self.comm.begin_step()
        why = self._exchange_in(local_error)
        # popped (and let go) whether or not an error is already held: left on the optimizer or in this frame, its
        # traceback kept the exchange's buffers alive after the step raised (per dtype about the gradients' size)
        held = self.__dict__.pop("_held_error", None)
        # (a Ctrl+C held by the exchange comes first: it is what this rank raises, the others an error naming it)
        local_error = held if held is not None and not isinstance(held, Exception) else local_error or held
        del held
        grads_kept = self.__dict__.pop("_grads_kept", False)  # (no average written into p.grad: _exchange_in)
        grads_partly = self.__dict__.pop("_grads_partly", None)  # (averages written into some p.grad only)
        if why is not None:
            return self._skip_step(why)
        # after a local error nothing is stepped, and the blocks may no longer match the groups (one deleted)
        views: list[BlockView] = []
        try:
            views = self._owned_views() if local_error is None else []
        except Exception as e:
            local_error = e
        if not self._clips_replicas():  # the ranks hold parts of it: summed over ranks, after the exchange
            local_error = self._clip_grads(views, local_error)
        try:
            reduced = self._reduce_record(views, local_error)
        except BaseException as e:  # (each rank raises its own class where all failed alike: any class; Ctrl+C)
            self._note_grads_after_record(e, grads_kept, grads_partly)
            raise
        # before the non-finite verdict: without a gradient nothing could change, so a non-finite loss or
        # trust-region scalar of such a step is no reason to count a skip (it is read at the next real step)
        if reduced.gradient_ranks == 0 and self._steps_gradients:
            return self._step_without_gradients()
        if reduced.nonfinite > 0:
            return self._skip_step(f"non-finite gradient or statistic on {int(reduced.nonfinite)} rank(s)")
        decision = self._decide(reduced)
        if isinstance(decision, SkipStep):
            return self._skip_step(decision.reason)
        # an _apply that says nothing (see _update_clean_on_raise) is taken to have written when it raises
        self._update_clean_on_raise = False
        try:
            self._update_and_gather(views, decision)
        except BaseException as e:  # KeyboardInterrupt too (a notebook's Ctrl+C): it left groups half-updated
            # W > 1: the peers went on (into the exchange, or stepped): this rank is out of step, written or not
            if not self._update_clean_on_raise or self.comm.world_size > 1:
                self._update_interrupted(e)
            raise
        self._count_step()
        return True

    def _note_grads_after_record(self, error: BaseException, kept: bool, partly: list[str] | None = None) -> None:
        """With ``grad_reduction="mean"`` at W > 1, say on ``error`` (the step record's, raised on every rank) what
        this rank's ``p.grad`` holds: the ranks' average in the blocks it owns once the exchange wrote it, or
        (``kept``) the gradients as backward left them: no rank exchanged (a rank could not make the exchange's
        buffers: the step may be taken again as it is), or every rank had failed before it (joined with zeros);
        ``partly``: writing the averages failed part way on this rank, after those of these parameters."""
        add_note = getattr(error, "add_note", None)  # Python >= 3.11
        if add_note is None or self.sharding.grad_reduction != "mean" or self.comm.world_size == 1:
            return
        if partly:
            add_note(f"{type(self).__name__}: with grad_reduction='mean' writing the ranks' averages into this "
                     f"rank's p.grad failed part way: the p.grad of {', '.join(partly)} hold the average in some or "
                     "all of the blocks this rank owns, every other p.grad is as backward() left it. Run backward() "
                     "again before another step().")
        elif kept:
            add_note(f"{type(self).__name__}: with grad_reduction='mean' this rank's p.grad is as backward() left "
                     "it: no average was written into it in this step (no new backward() is needed).")
        else:
            add_note(f"{type(self).__name__}: with grad_reduction='mean' this rank's p.grad of the blocks it owns "
                     "already holds the ranks' average: run backward() again before another step().")

    def _update_and_gather(self, views: list[BlockView], decision: Any) -> None:
        """``_apply``, then ``_exchange_out``. With the default gather's buffers held (W > 1, sharded) a rank
        whose ``_apply`` raised (out of memory in an update kernel) still joins the collectives left in the step
        (:meth:`_join_update_collectives`, then the gather) and says so in the gather's flag, so that every rank
        raises together (:meth:`_peers_update_error`). Raised alone, it left the others waiting in the gather
        (gloo: an abort; NCCL: a hang until the timeout), and its next collective (a retried step's) crossed
        theirs. Nothing can be put back without a copy of the state: the parameters of every rank hold the
        blocks as the ranks left them (the failing rank's maybe partly updated), the same on every rank, and
        every rank refuses to go on until ``load_state_dict`` (the template's :meth:`_update_interrupted`)."""
        if self.__dict__.get("_held_out") is None:  # one process, unsharded, an _exchange_out of its own
            self._apply(views, decision)
            self._exchange_out(decision)  # a rank stopped here holds its peers' blocks as they were
            self.__dict__.pop("_peer_flags", None)  # (the default's [] where it gathered without flags)
            return
        failed: BaseException | None = None
        try:
            self._apply(views, decision)
        except BaseException as e:  # KeyboardInterrupt too: the peers wait in the gather all the same
            failed = e
        if failed is not None:
            self._join_after_failed_update(failed)
        # through _exchange_out itself (not the gather directly), so that whatever stands in for it is called
        self._exchange_out(decision)
        flags = self.__dict__.pop("_peer_flags", [])
        if any(flags):
            raise self._peers_update_error(flags)

    def _join_after_failed_update(self, failed: BaseException) -> NoReturn:
        """A rank whose ``_apply`` raised ``failed`` joins the step's remaining collectives, then raises ``failed``.
        An error of that join's own work (a hook's, not a collective's) is noted on ``failed`` and the rest of the
        join made all the same: raised from the join, this rank left the others waiting in the gather, and lost its
        own error. A KeyboardInterrupt there is raised (after the gather), ``failed`` as its context."""
        late: BaseException | None = None
        try:
            self._join_update_collectives()
        except BaseException as e:  # noqa: BLE001 - raised below, once this rank joined the gather
            late = e
        try:  # the default _exchange_out's gather, its flag set
            self._gathered_flags(_update_failure_code(failed))
        except BaseException as e:  # noqa: BLE001 - as above
            late = late or e
        if late is not None and not isinstance(late, Exception):
            raise late from failed
        if late is not None and hasattr(failed, "add_note"):
            failed.add_note(f"{type(self).__name__}.step: joining the step's collectives after it also raised "
                            f"{type(late).__name__}: {late}")
        raise failed

    def _join_update_collectives(self) -> None:
        """The collectives an ``_apply`` makes at W > 1 that it did not reach, joined after it raised (with
        values that are never read: the step raises on every rank). Default: none (DASGO: its split norms'
        all-reduce)."""

    def _peers_update_error(self, flags: list[float]) -> Exception:
        """The error a rank whose update went through raises when another rank's update raised (``flags``: the
        gather's, by rank): an out of memory where every failing rank's was one (a caller may free memory; its
        retry is refused until ``load_state_dict`` all the same), else a RuntimeError."""
        ranks = [r for r, f in enumerate(flags) if f]
        oom = all(flags[r] == _update_failure_code(torch.OutOfMemoryError()) for r in ranks)
        cls: type[Exception] = torch.OutOfMemoryError if oom else RuntimeError
        what = "out of memory" if oom else "raised"
        unsent = [r for r in ranks if flags[r] == UNSENT]
        held = ("every rank's parameters hold the blocks as their owners left them (theirs maybe partly updated), "
                "the same on every rank" if not unsent else f"rank(s) {unsent} could not send their blocks: this "
                "rank holds those as they were before the step, the others' as their owners left them")
        error = cls(f"{type(self).__name__}.step: the update of rank(s) {ranks} {what} inside _apply or its gather "
                    f"(see that rank's traceback) after this rank's update was written. The step is not undone: "
                    f"{held}. Restore the model and the optimizer from a checkpoint; the next step() raises until "
                    "load_state_dict.")
        error.interrupted_ranks = ranks  # type: ignore[attr-defined]  # read by _update_interrupted's note
        return error

    def _check_before_exchange(self, unscaled: list[Tensor]) -> None:
        """The template's local work before its checks: FSDP2's reshard, the checks that say what is wrong with
        this step (raised), and torch.amp.GradScaler's unscaling (``unscaled``: see :meth:`_sharded_step`)."""
        fsdp = self._fsdp()
        if fsdp is not None:  # before anything is written: unsharded copies an earlier forward left are stale after
            fsdp.reshard()  # the update, and the next forward read them (0.13 off in 4 steps; local, no collective)
        error = (self._hyperparameter_error() or self._interrupted_update_error() or self._averaged_already_error()
                 or (gradient_mismatch(self, self._params, self._names) if self._steps_gradients else None))
        if self._step_supports_amp_scaling:
            self._amp_found_inf = amp_unscale_(self, unscaled)  # under torch.amp.GradScaler (step_context.py)
        if error is not None:
            raise error

    def _mark_averaged_grads(self) -> None:
        """After a step (taken, skipped or raised) whose ``"mean"`` exchange wrote averages into ``p.grad``: mark
        them as they are now, after the step's own writes to them (a clip), for :meth:`_averaged_already_error`."""
        written: list[int] | None = self.__dict__.pop("_averaged_into", None)
        if written:
            grad_marks.note_averaged(self, (self._params[i].grad for i in set(written)))

    def _averaged_already_error(self) -> RuntimeError | None:
        """The error for a gradient a ``"mean"`` step already wrote its average into, unchanged since
        (:mod:`~lightning_soaa.optim.grad_marks`): another optimizer's (a parameter in two optimizers of ours), or
        this one's (step() called again, or taken again after it raised, without a new backward), or None. Only
        the ranks that own its blocks in that step see it: held like any local error, every rank raises."""
        if self.sharding.grad_reduction != "mean" or self.comm.world_size == 1 or self._dtensor is not None:
            return None
        found = grad_marks.averaged_already(self._params)
        if found is None:
            return None
        i, writer = found
        head = (f"{type(self).__name__}.step: the gradient of parameter "
                f"{repr(self._names[i]) if self._names[i] else f'#{i}'} already holds the ranks' average, written ")
        mix = ("with grad_reduction='mean' a step writes the average into the blocks its rank owns and leaves each "
               "rank's own gradient elsewhere, so averaging that mix again would train on a wrong gradient")
        if writer is self:
            return RuntimeError(
                f"{head}by this optimizer's last step (or one that raised after its gradient exchange), and no "
                f"backward() ran since: {mix} (one process would apply the same gradient again). Run backward() "
                "before each step(). Nothing changed.")
        return RuntimeError(
            f"{head}by the step of another optimizer ({type(writer).__name__}) over the same parameter since "
            f"backward(): {mix}. Give each parameter to one optimizer only, or wrap the model in "
            "DistributedDataParallel and use grad_reduction='none' (DDP averages the gradients once, before both "
            "steps). Nothing changed.")

    def _step_without_gradients(self) -> bool:
        """No rank owns a block with a gradient (every rank reads it from the step's all-reduce, so every
        rank returns here, and no later collective of the step is made): nothing is updated and nothing is
        counted, as in torch, whose optimizers leave a parameter without a gradient and its state (its step
        count too) alone. The optimizer-wide state stays as it is as well: SOAA's trust region advanced its
        step number, shrank d and took the loss into its EMA at such a step (a frozen phase that still calls
        ``step(loss=...)``), and every later step was scaled differently (3.9e-2 off the run without it after
        four steps). Returns False: no update was made (SOAA's ``same_batch`` judges no trial)."""
        log.debug("%s.step: no parameter has a gradient on any rank; nothing changed", type(self).__name__)
        return False

    #: True while an exception leaves this rank's parameters and optimizer state as they were before the
    #: step: ``_apply`` sets it at its start while it has only allocated (lazy state of zeros counts as no
    #: state) and clears it just before its first write (or keeps it where it puts back what it wrote, EGN).
    #: The template sets it False before ``_apply``: an ``_apply`` that says nothing is taken to have written.
    #: A single process then raises without :meth:`_update_interrupted`: a caller that catches an out of
    #: memory at the update's first allocation and steps again with a smaller batch is not refused for it.
    _update_clean_on_raise = False

    def _update_interrupted(self, error: BaseException) -> None:
        """The update raised (out of memory in an update kernel in ``_apply``; the exchange after it; SOAA's
        ``same_batch`` verdict): some owned blocks may hold their new values and state, others the old ones,
        and nothing can put them back without a copy of them all. Every later step, and a save of it
        (:meth:`_refuse_interrupted_save`), is refused until :meth:`load_state_dict`. At W > 1 with the template's
        parameter gather the ranks raised together (:meth:`_update_and_gather`) and every rank is marked; else
        the other ranks are left in this step's collectives (an ``_exchange_out`` of its own, SOAA's ``same_batch``
        verdict), as after any rank's crash: the launcher ends the job."""
        self._interrupted = f"{type(error).__name__}: {error}"
        add_note = getattr(error, "add_note", None)  # Python >= 3.11
        # a peer's error (_peers_update_error): this rank's update went through, the named ranks' did not
        where = getattr(error, "interrupted_ranks", None) or [self.comm.rank]
        if add_note is not None:
            add_note(f"{type(self).__name__}.step: the update was interrupted on rank(s) {where}: the parameters "
                     "and the optimizer state they own may be partly updated. Restore the model and the optimizer "
                     "from a checkpoint; the next step() raises until load_state_dict.")

    def _refuse_interrupted_save(self, method: str) -> None:
        """Refuse a checkpoint of an update that was interrupted on this rank (:meth:`_update_interrupted`).
        Saved, its partly updated state resumed on a fresh process without an error (EGN: 0.18 off the
        uninterrupted run a step later), or was refused only at that load, blamed on a state dict that changed
        after it was taken (the others' step counts); the model saved beside it is half-stepped too.

        Raised before any collective, on this rank alone: its peers may still be inside the interrupted step's
        collectives (one rank out of memory in its update, the others in the exchange), and a consolidation's
        all-reduce joined from here met their gather: every rank hung until the process group's timeout. A peer
        in a save's collective instead raises once this rank's process ends (as after a crash of it)."""
        why = self.__dict__.get("_interrupted")
        # a load under way (torch's param_names recipe starts from state_dict()) replaces the state
        if why is None or self.__dict__.get("_loading_state"):
            return
        raise RuntimeError(
            f"{type(self).__name__}.{method}: an earlier step was interrupted inside its update ({why}) on rank "
            f"{self.comm.rank}: the parameters and the optimizer state are partly updated there, and a checkpoint "
            "of them would resume from that state. Keep the last checkpoint saved before the interruption and "
            "resume from it: load_state_dict, with the model's state of that checkpoint, clears this (torch's DCP "
            "recipe, which starts from state_dict(), needs the optimizer built anew). Raised on this rank alone, "
            "before the save's collectives: at W > 1 let the process end (the launcher then ends the job).")

    def _interrupted_update_error(self) -> RuntimeError | None:
        why = self.__dict__.get("_interrupted")
        if why is None:
            return None
        return RuntimeError(
            f"{type(self).__name__}.step: an earlier step was interrupted inside its update ({why}) on this rank "
            "and left the parameters and the optimizer state it owns partly updated; training on would build on "
            "them. Restore the model and the optimizer from a checkpoint (load_state_dict clears this).")

    def _check_step(self, warn: bool) -> None:
        """:func:`check_step` with the signatures the table was built for; warns (once) when no parameter
        has a gradient. An optimizer that has not stepped yet takes parameters converted or moved since
        construction (Lightning Fabric's ``setup(model, optimizer)`` converts the module after the
        optimizer is built, as torch's optimizers allow): the table is rebuilt for them
        (:meth:`_rebuild_unstepped`)."""
        try:
            seen = check_step(self, self._params, self._names, built=self.__dict__.get("_built"))
        except RuntimeError:
            if not self._rebuild_unstepped():
                raise
            seen = check_step(self, self._params, self._names, built=self._built)
        if not seen and warn:
            self._warn_no_gradients()
        self._check_ties()
        self._check_state_layout()

    def _check_ties(self) -> None:
        """A tie that came after construction is refused at the next step as construction refuses it, at
        every W: at W > 1 one owner's all-gather overwrote the other's update; on one process ShardedAdamW
        (float64 too: its fused path writes back dense copies of a transposed view) and bf16 ASGO/DASGO kept
        only the last parameter's update where torch applies both, and EGN's Gauss-Newton system takes the
        two as independent coordinates."""
        self._check_storage_unmoved()

    def _check_storage_unmoved(self) -> None:
        """No two parameters over one memory, also where that came after construction, which checked it
        (``dec.weight.data = enc.weight.data.t()``, a tie or an initial copy written as an assignment). At
        W > 1 each is stepped by its own owner and the all-gather writes both: the replicas drifted apart
        silently (DDP or ``grad_reduction="mean"``: 2e-2 between the ranks in 4 steps), or raised that the
        ranks' gradients differ; on one process an update was lost or (EGN) the Gauss-Newton system was wrong.
        The full check runs only when a parameter's address changed since the last step that passed it
        (one ``data_ptr()`` per parameter a step, where :meth:`_check_ties` calls it)."""
        addresses = [p.data_ptr() for p in self._params]
        last = self.__dict__.get("_step_addresses")
        memo: StorageMemo | None = self.__dict__.get("_storage_memo")
        if addresses == last or (last is None and memo is not None and memo.current(self._params, self._table)):
            self._step_addresses = addresses  # unmoved since the last step, or since construction checked them
            return
        try:
            check_disjoint_storage(self, self._params, [repr(n) if n else f"#{i}" for i, n in enumerate(self._names)])
        except ValueError as e:
            raise ValueError(f"{e} (Found at the step: a parameter's memory changed after the optimizer was "
                             "built, e.g. p.data = other.data; to copy values use p.data.copy_(other).) Nothing "
                             "changed.") from None
        self._step_addresses = addresses

    def _check_state_layout(self) -> None:
        """Raise for per-parameter state written into ``optimizer.state`` from outside, not loaded through
        :meth:`load_state_dict`, that cannot be this optimizer's: a whole-parameter block holding the
        checkpoint's nesting (``{0: {...}}``), or a state dict replaced since the last step whose step
        count exceeds the optimizer's steps. torch's ZeroRedundancyOptimizer writes its checkpoint's
        entries so on its load: the step started fresh moments next to the ignored entry, or (parameters
        cut into row blocks, whose nesting is the checkpoint's) continued their moments with the step
        counts and SOAA's trust region of a fresh optimizer (6e-2 to 1.8e-1, 4.8e-4 off the uninterrupted
        run). Also a value written at the top level of a parameter cut into blocks, whose state is one entry
        per block (``state[p][i]``): ``state[p]["exp_avg"] = zeros`` (a reset, as for torch's AdamW) was
        ignored there, silently (2.9e-2 off torch's AdamW honouring it). Per step: one identity and length
        compare per parameter; the entries are read only for a replaced or resized dict."""
        state, params = self.state, self._params
        now = [(id(st), len(st)) if (st := state.get(params[b.param_index])) is not None else None
               for b in self._owned]
        if now == self.__dict__.get("_state_ids_now"):
            return  # the same dicts of the same sizes as at the last check (the usual step)
        seen = self.__dict__.get("_state_ids") or {}
        ids: dict[int, int] = {}
        for b in self._owned:
            st = state.get(params[b.param_index])
            if not st:
                continue
            ids[b.param_index] = id(st)
            if b.dim is None and 0 in st:  # a whole parameter is the checkpoint's block 0
                self._refuse_foreign_state(b, f"holds the checkpoint's per-block entries (keys {sorted(map(str, st))})")
            if b.dim is not None and (stray := sorted(str(k) for k in st if not isinstance(k, int))):
                self._refuse_top_level_entries(b, stray)
            if seen.get(b.param_index) == id(st):
                continue
            step = steps_ahead(st if b.dim is None else st.get(b.sub_index), self.num_steps + self.skipped_steps)
            if step is not None:
                self._refuse_foreign_state(b, f"has taken {step:g} steps, this optimizer {self.num_steps}")
        self._state_ids, self._state_ids_now = ids, now

    def _refuse_top_level_entries(self, b: BlockInfo, keys: list[str]) -> None:
        label = self._names[b.param_index] or f"#{b.param_index}"
        raise ValueError(
            f"{type(self).__name__}: optimizer.state of parameter {label!r} holds {keys} at its top level, but the "
            "parameter is cut into blocks (max_block_numel / max_block_size) whose state is one entry per block, "
            "state[p][i]: a value written there would be ignored. To reset its state, del optimizer.state[p] (or "
            "optimizer.state.clear()); to edit it, write into each block's entry state[p][i]. Nothing changed.")

    def _own_state_dicts(self) -> None:
        """Record the per-parameter state dicts as this optimizer's own (after a load wrote them), so that
        :meth:`_check_state_layout` does not take them for dicts written from outside."""
        self._state_ids = {b.param_index: id(st) for b in self._owned
                           if (st := self.state.get(self._params[b.param_index]))}

    def _refuse_foreign_state(self, b: BlockInfo, what: str) -> None:
        label = self._names[b.param_index] or f"#{b.param_index}"
        raise ValueError(
            f"{type(self).__name__}: the state of parameter {label!r} {what}: it was written into optimizer.state "
            "directly, not loaded with load_state_dict(), and the optimizer-wide state (step counts, SOAA's trust "
            "region) is missing. torch's ZeroRedundancyOptimizer.load_state_dict does this: load the checkpoint "
            "with this optimizer's own load_state_dict() (it shards its state ZeRO-style itself, shard=True, and "
            "needs no ZeroRedundancyOptimizer).")

    def _rebuild_unstepped(self) -> bool:
        """Rebuild the table for the parameters as they are now, where no state can be lost: no step taken
        or loaded, no state, no DTensor. Returns whether it did. Without a collective (a rank whose
        parameters did not change makes none): the new parameters' fingerprint joins the hyperparameter
        digest of the step's agreement row, so ranks that converted differently raise together there."""
        if (self.num_steps or self.skipped_steps or self._holds_block_state() or self._dtensor is not None
                or self.__dict__.get("_layout_confirmed")  # a load back to step 0 after steps: not re-confirmed
                or any(p.is_meta for p in self._params)
                or param_signatures(self._params) == self.__dict__.get("_built")):
            return False
        log.info("%s: the parameters were converted or moved after construction (before any step); the "
                 "block table is rebuilt for them", type(self).__name__)
        self._build_table(check_ranks=False)
        # converted back to what every rank built (a fix after a refused step): the same digest as a rank
        # that never converted, which otherwise read as "hyperparameters differ"
        back = self._built == self.__dict__.get("_agreed_built")
        self._rebuilt_digest = 0 if back else self._table_digest()
        return True

    def _table_digest(self) -> int:
        """48 bits (exact in float64) of the shapes and dtypes the block table was built for."""
        return signature_fingerprint(self._built) & ((1 << 48) - 1)

    def _holds_block_state(self) -> bool:
        """Whether any block of this rank holds state: the empty per-block entries that reading a cut
        parameter's state leaves (``{sub: {}}``, on its owners only) do not count."""
        for st in self.state.values():
            for key, value in st.items():
                if not isinstance(key, int) or value:  # a whole parameter's key, or a per-block entry with state
                    return True
        return False

    def _warn_gradless_ranks(self, ranks: list[int]) -> None:
        """Once per optimizer, on every rank (the verdict is the same everywhere): under
        ``grad_reduction="mean"`` some ranks had no gradient for any of this optimizer's parameters while
        others had. Their zeros are averaged in, as DDP with ``find_unused_parameters=True`` does: right
        for an optimizer of a part some ranks did not use this step (a task head, an expert without
        tokens), wrong where a rank's model replaced the optimizer's Parameters (that rank stops training
        and halves the others' gradients). Counts cannot tell the two apart, so this is said, not raised."""
        if not self.__dict__.get("_warned_gradless"):
            self._warned_gradless = True
            log.warning(
                "%s.step: rank(s) %s had no gradient for any of this optimizer's parameters while other ranks "
                "had; under grad_reduction='mean' their zeros are averaged in (as DDP's find_unused_parameters "
                "does). Right if those ranks did not use these parameters this step (a task head, an expert "
                "without tokens); wrong if their model no longer holds the optimizer's Parameters (replaced "
                "after it was built: load_state_dict(..., assign=True), to_empty(), a wrapper): that rank would "
                "stop training. Logged once.", type(self).__name__, ranks)

    def _warn_no_gradients(self) -> None:
        """Once per optimizer: a step found no gradient on any of this rank's parameters, so it updates
        nothing (as torch's optimizers do, silently): the model would never move while steps are counted."""
        if self._params and not self.__dict__.get("_warned_no_gradients"):
            self._warned_no_gradients = True
            log.warning(
                "%s.step: none of the %d parameters has a gradient (every .grad is None), so the step changes "
                "nothing. Typical causes: the optimizer was built before a wrapper replaced the parameters "
                "(build it after fully_shard / model.to_empty / load_state_dict(assign=True)), gradient "
                "synchronisation left off (FSDP2 set_requires_gradient_sync(False)), backward() not called, "
                "or every parameter frozen. Logged once.", type(self).__name__, len(self._params))

    def _hyperparameter_error(self) -> ValueError | None:
        """The error for the first param group holding a value the constructor refuses, or None.

        Why at every step: a value written into ``param_groups`` after construction (by hand, by a
        scheduler, ``lr=nan`` or ``betas=(1.0, ...)``) would otherwise write NaN into every parameter.
        Returned, not raised: the step holds it like any local error, so every rank raises together and
        nothing changes. Cheap when nothing changed: a group is validated again (its config rebuilt,
        6-24 us) only when one of its values is no longer the object validated last, except a new
        ``lr`` alone (a scheduler's every step), checked here by the rule every optimizer's config gives
        it (a finite ``float`` >= 0)."""
        groups = self.param_groups
        seen: list[Any] = self.__dict__.setdefault("_valid_groups", [])
        if len(seen) != len(groups):
            seen[:] = [None] * len(groups)
        lists = self.__dict__.get("_group_lists")
        members = self.__dict__.get("_group_members")
        if lists is not None and len(lists) != len(groups):  # before the loop: also when no group is left
            # DeepSpeed's ZeRO 1/2 steps each group alone, as a list of one group of its own tensors: its message
            foreign = next((i for i, g in enumerate(groups) if not any(g.get("params") is x for x in lists)), None)
            if foreign is not None and len(groups) < len(lists):
                return ValueError(REPLACED_PARAMS_MESSAGE.format(name=type(self).__name__, i=foreign))
            return ValueError(GROUP_COUNT_MESSAGE.format(name=type(self).__name__, now=len(groups), built=len(lists)))
        for i, group in enumerate(groups):
            if lists is not None and group.get("params") is not lists[i]:
                return ValueError(REPLACED_PARAMS_MESSAGE.format(name=type(self).__name__, i=i))
            if members is not None and not _same_members(group["params"], members[i]):
                return ValueError(EDITED_PARAMS_MESSAGE.format(name=type(self).__name__, i=i))
            keys, vals, lists_now = tuple(group), tuple(group.values()), _list_values(group)
            last = seen[i]
            if last is not None and last[0] is group and last[1] == keys and _same_list_values(lists_now, last[3]):
                if all(map(operator.is_, vals, last[2])):
                    continue
                changed = [k for k, a, b in zip(keys, vals, last[2]) if a is not b]
                if self._scheduled_values_valid(group, changed):
                    seen[i] = (group, keys, vals, lists_now)
                    continue
            # read deep in the step: a KeyError on one rank, or after part of a step (an option whose
            # default is None reads as None when absent)
            required = [k for k, v in self.defaults.items() if v is not None]
            missing = [k for k in required if k not in group]
            if missing:
                return ValueError(
                    f"{type(self).__name__}.step: param_groups[{i}] has no {', '.join(map(repr, missing))} (removed "
                    f"after construction); every group carries {sorted(required)}. Nothing changed.")
            try:
                check_torch_options(self, group)
                self._validate_group(group)
                self._check_layout(i, group)
            except (ValueError, TypeError, KeyError) as e:
                return ValueError(
                    f"{type(self).__name__}.step: param_groups[{i}]: {e} Hyperparameters set after "
                    "construction (by hand or by a scheduler) are checked at every step; nothing changed.")
            seen[i] = (group, keys, vals, lists_now)
        return None

    #: param-group keys whose one rule is a pair of floats in [0, 1) (config.check_betas, no other field
    #: involved): a new value (OneCycleLR cycles ``betas`` at every step) is checked alone
    pair_rule_keys: frozenset[str] = frozenset({"betas"})

    def _scheduled_values_valid(self, group: dict[str, Any], changed: list[str]) -> bool:
        """Whether the values a scheduler writes at every step (``lr``, and ``betas`` under OneCycleLR)
        are the only ones changed and pass their own rules, checked here without rebuilding the group's
        config (40 us a group: 0.8 ms a step for 20 groups under OneCycleLR); anything else, or a value
        these rules refuse, goes through the group's full validation and its message."""
        for k in changed:
            v = group[k]
            if k == "lr":
                ok = type(v) is float and 0.0 <= v < math.inf
            elif k in self.pair_rule_keys:
                ok = (type(v) is tuple and len(v) == 2 and type(v[0]) is float and type(v[1]) is float
                      and 0.0 <= v[0] < 1.0 and 0.0 <= v[1] < 1.0)
            else:
                return False
            if not ok:
                return False
        return True

    def _layouts_as_built(self) -> bool:
        """Whether every group but the newest has the block options it was built with (one pass; :meth:`_check_layout`
        names what differs)."""
        built = self.__dict__.get("_layout")
        groups = self.param_groups[:-1]
        return built is not None and len(built) >= len(groups) and all(
            not g.get(k) != was for g, b in zip(groups, built) for k, was in b.items())

    def _check_layout(self, i: int, group: dict[str, Any]) -> None:
        """Raise when a :attr:`layout_keys` option of group ``i`` differs from the one its blocks were
        built with."""
        built = self.__dict__.get("_layout")
        if built is None or i >= len(built):
            return
        for k, was in built[i].items():
            if group.get(k) != was:
                raise ValueError(
                    f"{k}={group.get(k)!r} was written into the group after construction (it was {was!r}); "
                    "the blocks are cut when the optimizer is built, so it would not be used. Pass it to the "
                    "constructor (or to add_param_group) instead.")

    def _planned_step(self) -> bool:
        """A subclass's shortcut for a step whose inputs are all as its last step left them (SOAA's step
        plan at W = 1): it either runs the whole step, with the bits and the effects the template gives,
        or changes nothing and returns False (then the template runs). Default: never."""
        return False

    def _skip_step(self, why: str) -> bool:
        """The one skip path (every rank calls it for the same step): count, log, ``_on_skip``."""
        self._count_step(skipped=True)
        log.warning("%s: %s; step skipped on every rank (skipped so far: %d)",
                    type(self).__name__, why, self.skipped_steps)
        self._on_skip()
        return False

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
    def _checkpoint_view(self) -> CheckpointView:
        """What :mod:`lightning_soaa.distributed.checkpoint` needs from this optimizer."""
        return CheckpointView(name=type(self).__name__, param_groups=self._groups_as_built(),
                              block_table=self.block_table,
                              shapes=tuple(tuple(p.shape) for p in self._params),
                              devices=tuple(p.device for p in self._params), names=tuple(self._names),
                              elementwise=self.elementwise, block_schema=self._block_schema,
                              validate_global=self._validate_global_state, layout_hint=self._layout_hint,
                              layout_keys=self._block_option_keys(), absent_key_notes=self._absent_key_notes,
                              meta_options=self._meta_options)

    def _block_option_keys(self) -> tuple[str, ...]:
        """The group options the blocks are built from: :attr:`layout_keys`, and an elementwise
        optimizer's ``max_block_numel``."""
        return self.layout_keys + (("max_block_numel",) if self.elementwise else ())

    def _groups_as_built(self) -> list[dict[str, Any]]:
        """The groups with their :attr:`layout_keys` options as the blocks were built (copies where they
        differ): a value written into a group later is refused at the next step, and a state dict saved
        in between used to carry it, which no optimizer could then load (the built one refused the value,
        one built with it the layout)."""
        return [self._group_as_built(i) for i in range(len(self.param_groups))]

    def _group_as_built(self, i: int) -> dict[str, Any]:
        """Group ``i`` with its :attr:`layout_keys` options as the blocks were built (itself when equal)."""
        g = self.param_groups[i]
        built = self.__dict__.get("_layout") or []
        if i >= len(built) or all(g.get(k) == v for k, v in built[i].items()):
            return g
        return {**g, **built[i]}

    #: see :attr:`~lightning_soaa.distributed.checkpoint.CheckpointView.layout_hint`
    _layout_hint: str = ""
    #: see :attr:`~lightning_soaa.distributed.checkpoint.CheckpointView.absent_key_notes`
    _absent_key_notes: Mapping[str, str] = MappingProxyType({})
    #: see :attr:`~lightning_soaa.distributed.checkpoint.CheckpointView.meta_options`
    _meta_options: tuple[str, ...] = ()
    #: ``option -> value`` a loaded param group without the option gets (every load path: ours, torch's
    #: DCP form, DeepSpeed's client): the value the versions that did not save it used, where the current
    #: default differs (:func:`~lightning_soaa.distributed.checkpoint.loaded_groups`)
    absent_key_values: Mapping[str, Any] = MappingProxyType({})

    def _block_schema(self, block: BlockInfo) -> dict[str, StateField] | None:
        # the options the blocks were built with (one written into a group since is refused at the next step)
        return self._state_schema(block, self._params[block.param_index], self._group_as_built(block.group_index))

    def _local_block_states(self, shared: list[Tensor] | None = None) -> dict[tuple[int, int], dict[str, Any]]:
        """This rank's block states on the CPU, copies. ``shared``: where given, a tensor already on the CPU
        (and not a view into a larger storage) is not copied but handed out as itself (detached: the live
        state's storage) and listed in ``shared``; the caller copies what it keeps of them
        (:meth:`_own_copies`) after a join (which copies them anyway) or a send (which copies them into
        its byte windows), not before: a copy first held the state once more (W = 1: +577 MiB at a 381 MiB
        state, now +387)."""
        out: dict[tuple[int, int], dict[str, Any]] = {}
        for b in self._owned:
            st = self.block_state(b)
            blk = {k: v for k, v in st.items() if not isinstance(k, int)}
            if not blk:
                continue
            out[b.key] = {}
            for k, v in blk.items():
                if not isinstance(v, Tensor):
                    out[b.key][k] = copy.deepcopy(v)
                elif v.device.type != "cpu":
                    out[b.key][k] = v.detach().cpu()  # a copy already (a clone after it: the block twice)
                elif shared is not None and v.untyped_storage().nbytes() == v.numel() * v.element_size():
                    # (only a tensor that is its whole storage: pickling a view sends all of its storage)
                    out[b.key][k] = v.detach()
                    shared.append(out[b.key][k])
                else:
                    out[b.key][k] = v.detach().clone()
        return out

    @staticmethod
    def _own_copies(blocks: dict[Any, dict[str, Any]], shared: list[Tensor]) -> None:
        """Replace, in ``blocks``' dicts, each of the ``shared`` tensors (the live state's) by a copy: what
        a state dict holds must not change with the optimizer's next step."""
        ids = {id(t) for t in shared}  # (``shared`` keeps them alive: the ids cannot be reused meanwhile)
        for blk in blocks.values():
            for k, v in blk.items():
                if isinstance(v, Tensor) and id(v) in ids:
                    blk[k] = v.clone()

    @overload
    def _gather_full_state(self, to: None = None, placeholders: bool = False) -> dict[str, Any]: ...

    @overload
    def _gather_full_state(self, to: int, placeholders: bool = False) -> dict[str, Any] | None: ...

    def _gather_full_state(self, to: int | None = None, placeholders: bool = False) -> dict[str, Any] | None:
        """Collective: every rank's owned block states, merged, plus the global state. ``to``: on that rank
        only (the others send theirs and return None); None: on every rank. ``placeholders``: for a state
        dict handed out (zeros for DCP over plain parameters, :mod:`~lightning_soaa.optim.dcp_plain`), not
        for the optimizer's own re-sharding, which restores what it gathers as state.

        Gathered to ``to`` alone, not to every rank and dropped by the others: each rank unpickled every
        rank's state, a peak of about W + 3 times its own share on every rank (+5.5x at W = 2, +7.5x at
        W = 4, at each of Lightning's checkpoint saves). The tensors travel as byte windows, not pickled
        (:func:`~lightning_soaa.distributed.state_gather.gather_block_states`): at W = 2 the receiver's peak
        is the result plus a 64 MiB window, a sender's its own window."""
        # the live CPU tensors, copied only by what needs them: the join, the send, _own_copies at the end
        # (under DTensor a gathered block may be the local tensor or a view of it: copied first, as before)
        shared: list[Tensor] | None = [] if self._dtensor is None else None
        mine = self._local_block_states(shared)
        merged: dict[tuple[int, int], dict[str, Any]] = {}
        if self._dtensor is not None and self.comm.world_size > 1:  # local shards -> full tensors
            by_key = {b.key: b for b in self._owned}
            mine = {key: self._dtensor.gather_state(by_key[key], st) for key, st in mine.items()}
            if any(self._dtensor.cut_across(b) for b in self.block_table.blocks):  # the same on every rank
                # blocks cut across the shards (ASGO's experts) are whole on their holders: from every rank
                whole = {key: st for key, st in mine.items() if self._dtensor.cut_across(by_key[key])}
                for part in self._gather_blocks(whole, to) or ():
                    merged.update(part)
        parts = self._gather_blocks(mine, to) if self._sharded_multi_rank() else [mine]
        del mine  # this rank's copy: on a rank other than ``to`` it has been sent
        for part in parts or ():
            merged.update(part)
        part = parts = None  # (the loop's name held the last part's blocks: handed_out lets them go as it joins)
        # on every rank: the global state may be a collective (SOAA's lag is summed over the ranks)
        global_state = {**self._global_state(), "num_steps": self.num_steps, "skipped_steps": self.skipped_steps}
        if to is not None and to != self.comm.rank:
            return None
        layout = None
        if placeholders and self._dtensor is None:  # torch's DCP recipe loads into what a fresh optimizer shows
            merged, layout = handed_out(self, merged)
        if shared and placeholders:  # handed out; a re-sharding restores (copies) what it gathered at once
            self._own_copies(merged, shared)
        return build_state_dict(self._checkpoint_view(), merged, global_state, layout=layout)

    def _gather_blocks(self, blocks: dict[tuple[int, int], dict[str, Any]], to: int | None) -> list[Any] | None:
        """Collective: every rank's ``blocks`` on rank ``to`` (None on the others), or on every rank
        (``to=None``); a receiving rank's own entry is ``blocks`` itself (not sent to itself: 3 more copies).
        The tensors travel as flat byte buffers (:mod:`~lightning_soaa.distributed.state_gather`): pickled
        one by one, 3,000 parameters' state took 1.1 s at W = 2 at every checkpoint save."""
        return gather_block_states(self.comm, blocks, to)

    def consolidate_state_dict(self, to: int | None = 0) -> None:
        """Collective: gather the sharded state so that :meth:`state_dict` returns the full state.

        Every rank must call it (Lightning does before saving). ``to`` keeps the result on that rank only;
        ``None`` keeps it on every rank (needed when each rank later calls ``state_dict()``).
        """
        if self._receiver() is not self:
            return self._receiver().consolidate_state_dict(to)
        self._ensure_joined()
        world = self.comm.world_size
        if to is not None and (isinstance(to, bool) or not isinstance(to, int) or not 0 <= to < world):
            # before the collective (every rank passes the same argument): a rank no process has kept
            # nothing, and state_dict() then asked for the call just made
            raise ValueError(f"{type(self).__name__}.consolidate_state_dict: invalid to={to!r}. Must be None "
                             f"(every rank keeps the state) or an integer rank in [0, {world}).")
        self._check_same_instance()
        # the previous consolidation's copy: not held while gathering the new one
        self._consolidated, self._consolidated_at = None, -1
        # every rank records the step, those without the result too: under DTensor state_dict() must then
        # take the same branch on every rank (see _full_state_dict). The copy is held until the next step
        # (dropped in _count_step: it is stale from then on, and state_dict() refuses it) or the next
        # consolidation or load, so state_dict() may be called several times in between; torch's
        # ZeroRedundancyOptimizer keeps its copy until the next consolidation, a whole checkpoint interval.
        self._consolidated = self._gather_full_state(to, placeholders=True)
        self._consolidated_at = self.num_steps + self.skipped_steps
        self._consolidated_to = to
        self._consolidated_mark = self._state_mark()

    def _state_mark(self) -> tuple[Any, ...]:
        """This rank's state as it is now: the state mapping's identity and each of its entries' (every parameter's,
        those of blocks other ranks own too: a reset of such a parameter on every rank deletes or replaces its
        entry here), and for the owned blocks each tensor's identity and in-place version and the other values.
        Read only (no entry is created)."""
        out: list[Any] = []
        for b in self._owned:
            st = self.state.get(self._params[b.param_index])
            if st is not None and b.dim is not None:
                st = st.get(b.sub_index)
            if not st:
                out.append((b.key, None))
                continue
            out.append((b.key, id(st), tuple(
                (k, id(v), getattr(v, "_local_tensor", v)._version) if isinstance(v, Tensor) else (k, repr(v))
                for k, v in st.items() if not isinstance(k, int))))
        return id(self.state), {id(p): id(v) for p, v in self.state.items()}, tuple(out)

    def _state_changed(self, mark: tuple[Any, ...]) -> bool:
        """Whether this rank's state changed since ``mark`` (:meth:`_state_mark`). An entry created since is no
        change (reading ``opt.state[p]`` creates an empty one); one deleted or replaced is. A change made on
        another rank only is not seen here (no collective: the other ranks may not call state_dict())."""
        state_id, entries, owned = self._state_mark()
        return (state_id != mark[0] or owned != mark[2]
                or any(entries.get(key) != entry for key, entry in mark[1].items()))

    def _check_same_instance(self) -> None:
        """Collective (W > 1, where the consolidation gathers): every rank consolidates this optimizer. A rank
        holding an interrupted update refuses before it (:meth:`_refuse_interrupted_save`).
        Two optimizers consolidated in different orders on two ranks exchanged each other's blocks (a
        checkpoint holding another optimizer's state, silently; equal shapes) or hung."""
        self._refuse_interrupted_save("consolidate_state_dict()")
        world = self.comm.world_size
        if world == 1 or not (self._sharded_multi_rank() or self._dtensor is not None):
            return
        row = [0.0] * world
        row[self.comm.rank] = float(self.__dict__.get("_instance_id", 0))
        ids = self.comm.all_reduce_scalars(torch.tensor(row, dtype=torch.float64)).tolist()
        odd = [r for r in range(world) if ids[r] != ids[0]]
        if odd:
            raise RuntimeError(
                f"{type(self).__name__}.consolidate_state_dict: rank(s) {odd} are consolidating another optimizer "
                "than rank 0: every rank must call consolidate_state_dict() on its optimizers in the same "
                "order. Nothing was gathered.")

    def _receiver(self) -> ShardedOptimizer:
        """The optimizer a call reaches: ``self``, or the optimizer behind Lightning's ``LightningOptimizer``
        (what ``self.optimizers()`` returns), which subclasses our class on the fly with its own ``__dict__``:
        reads reach the optimizer, but what a method wrote stayed on the wrapper (``set_batch``/``set_loss``
        there never reached the step: silently, where a callback had handed a value over too)."""
        inner = self.__dict__.get("_optimizer")
        return inner if isinstance(inner, ShardedOptimizer) else self

    def _warn_repeated_handover(self, method: str, advice: str) -> None:
        """Warn, once per optimizer, that ``method`` (``set_loss``/``set_batch``) was called again before a
        step: the last value wins. Calling it once per micro-batch of a manual accumulation loop (as
        DeepSpeed's client takes ``set_batch``) stepped silently on the last micro-batch alone."""
        if self.__dict__.get("_warned_handover"):
            return
        self._warned_handover = True
        log.warning("%s.%s was called again before step(): the step uses the last value only (it replaces "
                    "the earlier one). Under gradient accumulation %s; pass replace=True where replacing is "
                    "meant. (Logged once.)", type(self).__name__, method, advice)

    def join_hook(self, **kwargs: Any) -> Any:
        """Refuse torch's ``Join`` (uneven inputs), which calls this when it is constructed, on every rank,
        before any collective. A rank that has run out of data would have to shadow every collective of
        the step (the sharded update, the global statistics) with zeros, which a step judged by its loss or
        batch cannot do; without this method ``Join([model, opt])`` raised a bare AttributeError."""
        raise ValueError(
            f"{type(self).__name__} does not support torch.distributed.algorithms.join.Join (uneven inputs "
            "across ranks): a rank that ran out of data cannot take part in the optimizer's step. Give every "
            "rank the same number of batches (DistributedSampler(..., drop_last=True), or cut every rank's "
            "loader to the shortest), or wrap the model alone: Join([ddp_model], "
            "throw_on_early_termination=True) stops every rank together when one runs out (without it, the "
            "other ranks' step collectives meet the joined rank's DDP shadow all-reduces: a gloo abort or an "
            "NCCL hang).")

    def state_dict(self) -> dict[str, Any]:
        """:meth:`_full_state_dict` between torch's state-dict hooks (:mod:`~lightning_soaa.optim.sd_hooks`)."""
        if self._receiver() is not self:  # through Lightning's LightningOptimizer: it saved its class name
            return self._receiver().state_dict()
        # where torch's getter calls: the saved order recorded (dcp_order.py); where torch flattens it
        # (dcp_flat.py), every option a key of its own, as the live groups hold them
        names, flat = dcp_flat.saving_names(self)
        sd = hooked_state_dict(self, lambda: self._full_state_dict(keep_options=flat))
        sd = dcp_order.with_saved_order(sd, names, FORMAT_KEY) if names else sd
        return dcp_flat.for_flattening(sd, names) if flat else sd

    def _full_state_dict(self, keep_options: bool = False) -> dict[str, Any]:
        """The full, world-size independent state.

        Without sharding (or with one rank) this is local. With W > 1 sharded ranks call
        :meth:`consolidate_state_dict` on every rank first. With DTensor (FSDP2) parameters it is torch's
        shape for ``torch.distributed.checkpoint`` (:mod:`lightning_soaa.optim.dcp_state`; call it on every
        rank), unless :meth:`consolidate_state_dict` ran since the last step (then the consolidated state).
        """
        self._refuse_interrupted_save("state_dict()")
        fresh = self._consolidated_at == self.num_steps + self.skipped_steps
        if self._dtensor is not None and not fresh:
            return dcp.dcp_state_dict(self, keep_options=keep_options)
        if self._dtensor is None and not self._consolidating():
            return self._with_saving_rank(self._gather_full_state(placeholders=True))
        if fresh and self._consolidated is None and self._dtensor is None:
            raise RuntimeError(
                f"{type(self).__name__}.state_dict() on rank {self.comm.rank} of {self.comm.world_size}: the state "
                f"was consolidated onto rank {self.__dict__.get('_consolidated_to')} only. Where every rank calls "
                "state_dict() (e.g. accelerate's save_state), consolidate with consolidate_state_dict(to=None).")
        if self._consolidated is None or not fresh:
            # Under DTensor a rank without the consolidated state must not build the sharded form either:
            # for SOAA that is a collective the rank holding the full state would never join (a hang), and
            # a checkpoint mixing both forms cannot be loaded
            raise RuntimeError(CONSOLIDATED_ELSEWHERE.format(name=type(self).__name__, rank=self.comm.rank)
                               if self._dtensor is not None else
                               f"{type(self).__name__}.state_dict() on rank {self.comm.rank} of "
                               f"{self.comm.world_size}: the state is sharded; call consolidate_state_dict() "
                               "on every rank first (a collective), then state_dict() on the rank that saves "
                               "(consolidate_state_dict(to=None) where every rank calls state_dict(), e.g. "
                               "accelerate's prepare() and save_state()).")
        mark = self.__dict__.get("_consolidated_mark")  # (absent in a copy: its tensors are other objects)
        if mark is not None and self._state_changed(mark):
            # no collective here: only this rank holds the copy, and the others may not call state_dict()
            raise RuntimeError(
                f"{type(self).__name__}.state_dict() on rank {self.comm.rank} of {self.comm.world_size}: the state "
                "changed after consolidate_state_dict() (opt.state cleared or replaced, an entry deleted or replaced, "
                "or a state tensor written in place), and the consolidated copy holds the state from before that "
                "change. Call consolidate_state_dict() again on every rank, then state_dict().")
        # the groups as they are now: an lr set after consolidate_state_dict() is the one to save. Its own
        # ``state`` mappings (the tensors are shared): torch's get_optimizer_state_dict re-keys the dict it is
        # handed in place (parameter names for indices), which re-keyed the kept consolidation and so every
        # later state_dict() until the next step (a torch.save of it then failed to load: 'names no parameter')
        state = {pi: dict(v) if isinstance(v, dict) else v for pi, v in self._consolidated["state"].items()}
        groups = self._groups_as_built()
        return with_group_meta({**self._consolidated, "state": state,
                                "param_groups": saved_groups(groups, self._meta_options)},
                               group_record(groups, self._meta_options))

    @outside_inference_mode  # state loaded inside it could never be stepped (optim/step_context.py)
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """:meth:`_load_full_state_dict` between torch's load hooks (:mod:`~lightning_soaa.optim.sd_hooks`;
        a pre hook may return a replacement, e.g. a state remapped by ``param_names``)."""
        if self._receiver() is not self:  # through Lightning's LightningOptimizer: loaded into the wrapper
            return self._receiver().load_state_dict(state_dict)
        flat = dcp_flat.flat_source(self)
        if flat is not None:  # torch's rebuild of a flattened state dict lost our metadata: rebuilt from it
            state_dict = dcp_flat.unflattened(self, *flat)
        self._adopt_assigned_groups()
        # the optimizer-wide state stays the checkpoint's when a hook rebuilt the rest (keep_run_state)
        self._loading_state = True
        try:
            hooked_load(self, state_dict, lambda final: self._load_full_state_dict(keep_run_state(state_dict, final)))
        finally:  # (popped: a load hook's nested load_state_dict pops it first)
            self.__dict__.pop("_loading_state", None)
        self.__dict__.pop("_interrupted", None)  # a consistent state again (_update_interrupted)

    def _load_full_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved at any world size; keep only the blocks this rank owns.

        The input is validated completely before anything changes, so a bad state dict leaves the
        optimizer untouched.
        """
        # torch's rebuild of groups built in another order than saved: our metadata put into their order
        state_dict = dcp_order.in_live_order(type(self).__name__, state_dict, FORMAT_KEY)
        dcp.refuse_reordered_groups(type(self).__name__, state_dict)  # (the order not recorded: refused)
        if not (isinstance(state_dict, dict) and FORMAT_KEY in state_dict) and dcp.is_dcp_state_dict(state_dict):
            # torch's shape (our metadata in param_groups[0]): saved under FSDP2, or any of our checkpoints
            # after torch rebuilt it (FSDP.rekey_optim_state_dict, set_optimizer_state_dict(full_state_dict=True))
            return dcp.load_torch_form(self, state_dict, self._prepare_consolidated_load)
        self._prepare_consolidated_load(state_dict)()

    def _prepare_consolidated_load(self, state_dict: dict[str, Any]) -> Callable[[], None]:
        """Validate our consolidated format against this optimizer (raises, changing nothing); returns
        the load itself."""
        view = self._checkpoint_view()
        origin = saving_rank.saved_origin(type(self).__name__, state_dict.get(FORMAT_KEY)
                                          if isinstance(state_dict, dict) else None)
        # the groups as saved: the options kept in the metadata back in, a partial dcp.load's fills out
        state_dict = with_saved_groups(type(self).__name__, state_dict)
        state_dict = without_placeholders(self, state_dict)  # zeros shown for DCP are no state (dcp_plain.py)
        state_dict = fit_layout(view, state_dict)  # saved with other row blocks: re-cut (a new dict)
        validate_state_dict(view, state_dict)
        new_groups = loaded_groups(self.param_groups, state_dict["param_groups"], self._validate_group,
                                   keep=self.layout_keys, absent=self.absent_key_values)

        def load() -> None:
            self._restore_owned_state(state_dict)
            commit_groups(self.param_groups, new_groups)
            self._replicas_unchecked = True  # the model is often loaded with it: compare at the next step
            # another rank's shard=False state is right on replicas only: the next step tells (saving_rank.py)
            self._loaded_origin = origin if self._records_saving_rank() else None
        return load

    def _restore_owned_state(self, state_dict: dict[str, Any]) -> None:
        self._install_owned_state(self._owned_state(self._checkpoint_view(), self._owned, self._params, state_dict))

    def _owned_state(self, view: CheckpointView, owned: list[BlockInfo], params: list[Tensor],
                     state_dict: dict[str, Any]) -> _OwnedState:
        """The state of ``state_dict`` (in ``view``'s layout) for the ``owned`` blocks of ``params``, copied
        where it is kept, and its counters: the fallible part of a restore, which changes nothing."""
        owned_states = select_owned_state(view, state_dict)
        if self._dtensor is not None:  # full tensors -> this rank's shards (of the blocks it holds)
            by_key = {b.key: b for b in owned}
            owned_states = {key: self._dtensor.shard_state(by_key[key], st) for key, st in owned_states.items()
                            if key in by_key}
        new_state: dict[Tensor, dict[Any, Any]] = {}
        for b in owned:
            blk = owned_states.get(b.key)
            if blk is None:
                continue
            p = params[b.param_index]
            st = new_state.setdefault(p, {})
            if b.dim is None:
                st.update(blk)
            else:
                st[b.sub_index] = blk
        glob = dict(state_dict[FORMAT_KEY]["global"])
        counts = int(glob.pop("num_steps", 0)), int(glob.pop("skipped_steps", 0))
        return _OwnedState(new_state, *counts, glob)

    def _install_owned_state(self, owned: _OwnedState) -> None:
        """Make ``owned`` (:meth:`_owned_state`, for the current table) the optimizer's state."""
        self.state.clear()
        for p, st in owned.states.items():
            self.state[p] = st
        self._own_state_dicts()
        self.num_steps, self.skipped_steps = owned.num_steps, owned.skipped_steps
        self._load_global_state(owned.global_state)
        self._consolidated, self._consolidated_at = None, -1  # a consolidation before the load is void
        dcp.hold_state_entries(self)
