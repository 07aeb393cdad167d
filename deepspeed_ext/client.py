"""The client optimizer DeepSpeed steps: one of our optimizers, translated to ZeRO's view of the model.

DeepSpeed does three things to a client optimizer that a plain ``torch.optim.Optimizer`` never sees
(spec/frameworks.md):

* **ZeRO-1/2/3 swap the parameters.** ``param_groups[i]["params"]`` becomes this rank's flat 1-D fp32
  partition of group ``i``; its edges cut through parameters. Stage 0 with bf16 swaps in fp32 master
  copies (real shapes).
* **One training step may be several** ``step()`` **calls.** ZeRO-1/2 call ``step()`` once per param
  group (with ``param_groups`` temporarily narrowed to that group); ZeRO-3 once per sub-group (with
  ``params`` set to that sub-group's flat tensor). An optimizer with global scalars (SOAA's Fisher scale,
  trust region and loss) must see all of them at once and update its trust region once per training step.
* **No closure, and a step at init.** The engine passes no closure; at stage 0 + bf16 DeepSpeed calls
  ``step()`` once during ``initialize`` with zero gradients to create state.

:class:`DeepSpeedClientOptimizer` therefore wraps the real optimizer (the *inner* one) instead of being
it::

    DeepSpeed ZeRO wrapper ──step()──▶ DeepSpeedClientOptimizer ──once per training step──▶ inner
      (param_groups it mutates)          collects the calls of one           (SOAA/ASGO/AdamW over
                                         training step, then steps once      "virtual" parameters)

* The inner optimizer is built lazily (at the first real step or checkpoint call) over *virtual
  parameters* (:mod:`deepspeed_ext.structure`): the flat partitions themselves for elementwise
  optimizers, or per-parameter views rebuilt from DeepSpeed's fragment maps for ASGO.
* Stage 0: the inner optimizer shards its own state over the data-parallel group (``shard=True``).
  Stages 1-3: ``shard=False`` -- DeepSpeed already partitioned, so every local block is owned, nothing is
  gathered, and only the global scalars are all-reduced over the data-parallel group.
* Multi-call steps: the calls are collected (gradients kept by reference) until every flat partition of
  the step has been seen; then the inner optimizer steps once over all of them and the partitions that
  DeepSpeed already copied to its low-precision buffers are written back (through :meth:`bind`).
* Hyperparameters live in this wrapper's ``param_groups`` (DeepSpeed's LR schedulers change them) and are
  copied to the inner groups before every inner step.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from deepspeed_ext.added_group import refuse_added_group
from deepspeed_ext.ds_config import ELASTIC_MESSAGE
from deepspeed_ext.structure import VirtualParams, build_virtual_params
from lightning_soaa.distributed.checkpoint import with_absent
from lightning_soaa.optim.sd_hooks import hooked_load, hooked_state_dict
from lightning_soaa.optim.soaa import MISSING_LOSS_MESSAGE

__all__ = ["DeepSpeedClientOptimizer", "OptimizerSwitchError", "StateLayoutError"]

log = logging.getLogger(__name__)

STATE_KEY = "lightning_soaa_deepspeed"
EGN_STATE_KEY = "lightning_soaa_deepspeed_egn"  # DeepSpeedEGNOptimizer's

# SOAA's own advice names the routes of plain torch, Lightning and Fabric; under DeepSpeed the loss arrives only
# through engine.backward(loss), and DeepSpeed 0.19's torch-style backward (loss.backward() at ZeRO 1-3, which
# it runs) bypasses that, so its users met an error that named none of what works here
DEEPSPEED_LOSS_ADVICE = (
    "Under DeepSpeed: call engine.backward(loss) on the engine deepspeed_ext.initialize returned (it hands the "
    "loss over; under Lightning's deepspeed_ext.DeepSpeedStrategy add the LossToOptimizer callback); a direct "
    "loss.backward() or engine.scale(loss).backward() hands over none: then hand the training step's loss (the "
    "mean over its micro-batches), once, to deepspeed_ext.find_client_optimizer(engine).set_loss(loss) before "
    "the engine.step() that steps."
)

NOT_CONSOLIDATED = (
    "{cls}.state_dict() at ZeRO stage 0 on several ranks: the optimizer state is sharded over the ranks "
    "(lightning_soaa's own sharding). Save with engine.save_checkpoint(...) on every rank, or call "
    "consolidate_state_dict() on every rank first (a collective; "
    "deepspeed_ext.find_client_optimizer(engine).consolidate_state_dict()), then state_dict() on the rank "
    "that saves.")


def group_size(group: Any) -> int:
    """Ranks in ``group`` (1 without a process group), read without building the inner optimizer (whose
    construction is a collective)."""
    import torch.distributed as dist

    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
_NON_HYPER = ("params", "param_names")


def _parts_refused(what: str, zero_stage: int) -> ValueError:
    """The refusal of ASGO's row_parts / fused at a ZeRO stage whose partitions cut matrices at any row."""
    return ValueError(f"{what} is not supported at ZeRO stage {zero_stage}, whose flat partitions cut a parameter "
                      "at any row; use ZeRO stage 0, or split the fused projections into separate Linear layers.")


def _follow_filtered_positions(group: dict[str, Any], built: list[Tensor] | None) -> None:
    """ASGO's positional group keys (``fused_parts``, ``adamw_indices``) moved to the group's parameters as
    DeepSpeed left them: it drops frozen parameters from the groups in place (bf16 at stage 0), after which
    a position named another parameter (a fused matrix's parts cut the next matrix: silently wrong).
    Entries of a dropped parameter are dropped (DeepSpeed never steps it)."""
    now = group["params"]
    if built is None and (group.get("fused_parts") or group.get("adamw_indices")):
        raise RuntimeError("DeepSpeed replaced a param group that holds ASGO's fused_parts / adamw_indices "
                           "(positions in the group as built), which cannot be followed; put those parameters in "
                           "groups of their own (row_parts, use_asgo=False) instead.")
    if built is None or [id(p) for p in now] == [id(p) for p in built]:
        return
    pos = {id(p): j for j, p in enumerate(now)}
    if group.get("fused_parts"):
        group["fused_parts"] = tuple((pos[id(built[j])], k) for j, k in group["fused_parts"] if id(built[j]) in pos)
    if group.get("adamw_indices"):
        group["adamw_indices"] = [pos[id(built[j])] for j in group["adamw_indices"] if id(built[j]) in pos]


class StateLayoutError(ValueError):
    """A checkpoint's optimizer state was written for another ZeRO partitioning (world size or stage)."""


class OptimizerSwitchError(ValueError):
    """A checkpoint's optimizer state was written by another optimizer than the one loading it."""


#: The key of the last param group of every state our DeepSpeed clients save: a group without parameters naming
#: the optimizer that wrote the state. Why: a foreign optimizer (torch's or DeepSpeed's own AdamW) handed that
#: state by an engine without our checks ran torch's ``load_state_dict``, which compares only the group count and
#: sizes: it loaded no state (ours is under our own key) and took our hyperparameters, silently. One group more
#: than the model's makes it refuse. Our loads drop the group (states saved before it have none).
SAVED_BY_KEY = "lightning_soaa_saved_by"


def marker_group(name: str) -> dict[str, Any]:
    """The parameterless param group appended to a saved state (see :data:`SAVED_BY_KEY`)."""
    return {"params": [], SAVED_BY_KEY: qualified(name)}


def real_groups(groups: Any) -> Any:
    """A saved state's param groups without the marker group."""
    if isinstance(groups, list) and groups and isinstance(groups[-1], dict) and SAVED_BY_KEY in groups[-1]:
        return groups[:-1]
    return groups


def qualified(name: str) -> str:
    """``lightning_soaa.<registry name>`` for one of our optimizers' class names (ShardedAdamW -> AdamW)."""
    from lightning_soaa.registry import lookup

    if not name:
        return "a lightning_soaa optimizer"
    spec = lookup(name)
    return spec.qualified_name if spec is not None else f"lightning_soaa.{name}"


def writer_of(state: Any, depth: int = 0) -> str | None:
    """The class name of our optimizer that wrote ``state``: one of our clients' state dicts, or a DeepSpeed
    wrapper's around it (fp16/bf16 wrappers, ZeRO-1/2/3 files); "" for ours without a readable name (damaged);
    None for any other optimizer's state."""
    from lightning_soaa.distributed.checkpoint import FORMAT_KEY

    if not isinstance(state, dict) or depth > 3:
        return None
    for key in (STATE_KEY, EGN_STATE_KEY):
        ours = state.get(key)
        if isinstance(ours, dict):
            meta = ours.get("inner", {}).get(FORMAT_KEY) if isinstance(ours.get("inner"), dict) else None
            name = meta.get("optimizer") if isinstance(meta, dict) else None
            return str(name) if name else ("EGN" if key == EGN_STATE_KEY else "")  # "": ours, name unreadable
    for key in ("optimizer_state_dict", "base_optimizer_state", "optimizer"):
        found = writer_of(state.get(key), depth + 1)
        if found is not None:
            return found
    return None


def check_writer(state_dict: Any, key: str, mine: str, what: str) -> None:
    """Refuse, before any other check, a state that our optimizer ``mine`` (class name) did not write, naming
    both: a switch changes the partition shapes as well (ASGO's views vs SOAA's flats), which the layout check
    named as a change of world size or ZeRO config. ``key``: where the client ``what`` keeps its state."""
    saved = writer_of(state_dict)
    if saved and saved != mine:  # unnamed (a damaged state of ours): the inner load names what is wrong
        raise OptimizerSwitchError(switch_message(saved, mine))
    if isinstance(state_dict, dict) and key in state_dict:
        return
    msg = f"{what}.load_state_dict: not a lightning_soaa DeepSpeed optimizer state (missing '{key}')."
    if isinstance(state_dict, dict) and "param_groups" in state_dict:  # another optimizer's state
        raise OptimizerSwitchError(f"{msg} {switch_message(None, mine)}")
    raise ValueError(msg)


def switch_message(saved: str | None, loading: str, *, where: str = "this checkpoint", ours: bool = True,
                   foreign: str | None = None) -> str:
    """Why a state written by ``saved`` (one of ours, by class name; None: another optimizer, ``foreign`` its
    ``optimizer.type`` in the checkpoint's DeepSpeed config when known) cannot be loaded by ``loading`` (one of ours
    by class name when ``ours``, else a class path), and what works instead."""
    if saved is not None:
        wrote = qualified(saved)
    elif foreign is not None:
        wrote = (f"an optimizer that is not lightning_soaa's: DeepSpeed's {foreign!r} (optimizer.type in the "
                 "checkpoint's DeepSpeed config)")
    else:
        wrote = "an optimizer that is not lightning_soaa's (torch's or DeepSpeed's)"
    mine = qualified(loading) if ours else loading
    why = (f"{wrote} keeps its state per block under its own key, so {mine} would start from zero moments while "
           f"taking {wrote}'s lr, betas and weight decay" if saved is not None and not ours
           else "each optimizer continues only its own state")
    resume = f"{qualified(saved)} (optimizer.type in a DeepSpeed config, --optimizer under lightning-soaa fit; " \
        "its options may change)" if saved is not None else \
        (f"optimizer.type {foreign!r}, the optimizer that wrote it" if foreign else "the optimizer that wrote it")
    return (f"The optimizer state in {where} was written by {wrote}; this engine's optimizer is {mine}, which cannot "
            f"continue it ({why}). Resume with {resume}, or load the module only to start {mine} afresh from the "
            "checkpoint's weights: engine.load_checkpoint(..., load_optimizer_states=False, "
            "load_lr_scheduler_states=False) or load_module_only=True; under Lightning, load the weights into the "
            "module and fit without ckpt_path.")


def _refuse_module_optimizer(optimizer_cls: type) -> None:
    """EGN takes the module, not param groups: this client would build it over the groups and EGN's own
    refusal ("needs the nn.Module itself, not its parameters") would blame a user who built it right."""
    from lightning_soaa.registry import DeepSpeedLayout, spec_of

    spec = spec_of(optimizer_cls)
    if spec is not None and spec.ds_layout is DeepSpeedLayout.MODEL:
        name = optimizer_cls.__name__
        raise ValueError(
            f"Invalid DeepSpeedClientOptimizer(optimizer_cls={name}): {name} differentiates the module itself and "
            f"steps from the batch, so it is not a client over parameters. Pass "
            f"optimizer=deepspeed_ext.DeepSpeedEGNOptimizer(model, {name}, {{...its options}}) with a config "
            f"without an optimizer block at ZeRO stage 0, or name it in the config: \"optimizer\": "
            f"{{\"type\": \"{spec.qualified_name}\", \"params\": {{...}}}} (stage 0).")


class DeepSpeedClientOptimizer(torch.optim.Optimizer):
    """Our optimizer as a DeepSpeed client optimizer (see the module docstring for the why).

    Args:
        params: the model's trainable parameters (tensors, ``named_parameters()`` pairs or groups).
        optimizer_cls: a :class:`~lightning_soaa.optim.base.ShardedOptimizer` subclass.
        hyperparams: its keyword arguments (validated by building a probe instance right here).
        zero_stage: the ZeRO stage of the engine this optimizer is handed to (0-3).
        layout: ``"elementwise"`` or ``"structured"`` (see :mod:`deepspeed_ext.registry`).
        process_group: the data-parallel group (``None``: the default group).
        param_names: optional ``{id(param): name}`` for structure-aware optimizers (ASGO routes by name).
    """

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_cls: type,
        hyperparams: dict[str, Any] | None = None,
        *,
        zero_stage: int,
        layout: str = "elementwise",
        process_group: Any = None,
        param_names: dict[int, str] | None = None,
    ) -> None:
        from lightning_soaa.distributed.comm import LocalComm

        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"Invalid zero_stage={zero_stage!r}. Must be one of 0, 1, 2, 3.")
        if layout not in ("elementwise", "structured"):
            raise ValueError(f"Invalid layout={layout!r}. Must be one of 'elementwise', 'structured'.")
        _refuse_module_optimizer(optimizer_cls)
        self.optimizer_cls = optimizer_cls
        self.hyperparams = dict(hyperparams or {})
        self.zero_stage = zero_stage
        self.layout = layout
        self.process_group = process_group
        params = self._split_fused(params, zero_stage, param_names)
        # Validate the hyperparameters now, before DeepSpeed or training starts: a probe instance on one
        # dummy parameter raises the optimizer's own ValueError (field, value, allowed range).
        # named: ASGO warns about unnamed matrices, which this one is not the user's
        # ASGO cuts every matrix's rows into row_parts parts: parts of one row are left-side blocks of k = 1,
        # which fit any max_block_size
        parts = self.hyperparams.get("row_parts", 1)
        rows = parts if isinstance(parts, int) and not isinstance(parts, bool) and parts >= 1 else 2
        probe = optimizer_cls([("probe", torch.zeros(rows, 2, requires_grad=True))], comm=LocalComm(), shard=False,
                              **self.hyperparams)
        self._group_keys = tuple(k for k in probe.defaults if k not in _NON_HYPER)
        super().__init__(params, dict(probe.defaults))
        self._built = True  # add_param_group from here on is refused (refuse_added_group)
        self._validate_groups(probe, zero_stage)
        names = dict(param_names or {})
        for group in self.param_groups:  # named_parameters() input: torch keeps the names per group
            for p, n in zip(group["params"], group.get("param_names", ())):
                names.setdefault(id(p), n)
        self._param_names = names
        # each group's parameter names as built (ZeRO-1/2/3 put flat partitions in the groups): a checkpoint
        # saved with other groups is refused naming them (engine.check_checkpoint_groups)
        self._group_names = [[names.get(id(p), f"#{j}") for j, p in enumerate(g["params"])] for g in self.param_groups]
        # DeepSpeed filters empty groups in place and ZeRO-1/2 narrow `self.param_groups` to one group
        # during step() and restore this very list afterwards, so this reference stays the truth.
        self._canonical_groups = self.param_groups
        self._model_params = [p for g in self.param_groups for p in g["params"]]
        # each group's parameters as built, by the group's dict: ASGO's fused_parts and adamw_indices are
        # positions in them, which DeepSpeed's in-place filter of frozen parameters (bf16 at stage 0) shifts
        self._built_members = [(g, list(g["params"])) for g in self.param_groups]
        self._inner: Any = None
        self._inner_src: list[int] = []
        self._vparams: VirtualParams | None = None
        self._pending: dict[int, tuple[Tensor, Tensor | None]] = {}  # id(flat) -> (flat, grad)
        self._zero_opt: Any = None  # the DeepSpeed ZeRO wrapper, after bind()
        self._engine: Callable[[], Any] | None = None  # a weak reference to the engine, after bind(engine)
        self._loss_at: int | None = None  # the engine's global_steps when set_loss last handed a loss over
        self.suspended = False  # True while deepspeed.initialize runs (ignores its init-time step)
        self._consolidated_at: int | None = None  # training_steps when consolidate_state_dict kept a state here
        self.training_steps = 0  # inner steps taken (one per training step)
        # the engine's global step while engine.save_checkpoint runs (None otherwise): written beside
        # training_steps so that a load can tell optimizer files from the model-states file of another save
        self.saving_at_global_step: int | None = None
        self.ignored_steps = 0  # step() calls during deepspeed.initialize
        self.step_calls = 0  # step() calls DeepSpeed made (several per training step at ZeRO-1/2/3)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self.__dict__.get("_built"):  # torch's constructor adding the groups given
            return super().add_param_group(param_group)
        refuse_added_group(self, self._inner)

    def _validate_groups(self, probe: Any, zero_stage: int) -> None:
        """Each group's own options, validated by the probe before an engine exists; the options ZeRO-1/2/3's
        flat partitions cannot carry (positions and row parts of a group's parameters) refused there."""
        optimizer_cls = self.optimizer_cls
        for i, group in enumerate(self.param_groups):
            try:
                probe._validate_group(group)
            except ValueError as e:
                raise ValueError(f"{optimizer_cls.__name__}: param_groups[{i}]: {e}") from None
            if zero_stage > 0 and group.get("adamw_indices"):
                # positions in a group whose ZeRO partitions are pieces of it, different on every rank
                raise ValueError(f"{optimizer_cls.__name__}: param_groups[{i}]: adamw_indices is not supported at ZeRO "
                                 f"stage {zero_stage}, whose flat partitions are not the group's parameters; put those "
                                 "parameters in a group of their own with use_asgo=False.")
            if zero_stage > 0 and group.get("row_parts", 1) != 1:
                # a partition's rows of a fused matrix are not whole parts: row_parts would cut them wrongly
                raise _parts_refused(f"{optimizer_cls.__name__}: param_groups[{i}]: row_parts={group['row_parts']!r} "
                                     "(a fused matrix stepped as its parts)", zero_stage)
            if zero_stage > 0 and group.get("fused_parts"):  # (positions of parameters, as adamw_indices)
                raise _parts_refused(f"{optimizer_cls.__name__}: param_groups[{i}]: fused_parts="
                                     f"{group['fused_parts']!r} (fused matrices stepped as their parts)", zero_stage)

    def _split_fused(self, params: Iterable[Any], zero_stage: int, param_names: dict[int, str] | None) -> Any:
        """ASGO's ``fused`` (a DeepSpeed config's or the caller's) applied to the canonical groups here, not
        by the inner optimizer: the inner groups are mapped to these by index (``_inner_src``), so they
        must already be the regrouped ones; the probe and the inner optimizer never see the option."""
        if "fused" not in self.hyperparams or "fused" not in inspect.signature(self.optimizer_cls).parameters:
            return params  # an optimizer without the option: its probe names the unknown keyword
        fused = self.hyperparams.pop("fused")
        if fused is None:
            return params
        if zero_stage > 0:  # a partition's rows of a fused matrix are not whole parts (as row_parts below)
            raise _parts_refused(f"{self.optimizer_cls.__name__}: fused={fused!r} (fused matrices stepped as "
                                 "their parts)", zero_stage)
        from lightning_soaa.optim.asgo_groups import split_fused

        return split_fused(params, fused, names=param_names)

    @classmethod
    def from_optimizer(cls, optimizer: Any, *, zero_stage: int, layout: str, process_group: Any = None,
                       param_names: dict[int, str] | None = None) -> DeepSpeedClientOptimizer:
        """A client optimizer equivalent to an already constructed (and not yet stepped) optimizer,
        e.g. the one ``LightningModule.configure_optimizers`` returned: same class, same param groups
        (with their per-group hyperparameters), same constructor arguments."""
        from deepspeed_ext.registry import RESERVED_PARAMS

        if any(len(st) for st in optimizer.state.values()):
            raise ValueError(
                f"{type(optimizer).__name__} has already taken steps; hand DeepSpeed a fresh optimizer "
                "(its state cannot be re-partitioned into ZeRO's flat partitions)."
            )
        config = getattr(optimizer, "config", None)
        kwargs: dict[str, Any] = {}
        for name, prm in inspect.signature(type(optimizer).__init__).parameters.items():
            if name == "self" or name in RESERVED_PARAMS or prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD):
                continue
            if config is not None and hasattr(config, name):
                kwargs[name] = getattr(config, name)
            elif name in optimizer.defaults:
                kwargs[name] = optimizer.defaults[name]
            elif hasattr(optimizer, name):
                kwargs[name] = getattr(optimizer, name)
            elif hasattr(getattr(optimizer, "sharding", None), name):  # replica_check_every: kept in its sharding
                kwargs[name] = getattr(optimizer.sharding, name)
        names = dict(param_names or {})
        for g in optimizer.param_groups:
            for p, n in zip(g["params"], g.get("param_names", ())):
                names.setdefault(id(p), n)
        # The very group dicts, not copies: an LR scheduler (or user code) bound to `optimizer` writes its
        # lr into them, and the client reads its hyperparameters from them before every inner step. With
        # copies a LambdaLR kept its first lr for good (2e-2 off torch's AdamW after 5 steps).
        return cls(optimizer.param_groups, type(optimizer), kwargs, zero_stage=zero_stage, layout=layout,
                   process_group=process_group, param_names=names)

    # ------------------------------------------------------------------ binding to the engine
    def bind(self, engine_or_zero_optimizer: Any) -> None:
        """Remember DeepSpeed's optimizer wrapper (needed to write back multi-call steps at ZeRO-1/2/3).

        :func:`deepspeed_ext.initialize` and :class:`deepspeed_ext.strategy.DeepSpeedStrategy` call it.
        """
        zo = engine_or_zero_optimizer
        if hasattr(zo, "save_checkpoint") and hasattr(zo, "optimizer"):  # the engine itself
            self._engine = weakref.ref(zo)
            zo = zo.optimizer
        if zo is self:
            zo = None  # stage 0, fp32: DeepSpeed steps us directly
        self._zero_opt = zo
        if zo is not None and getattr(zo, "elastic_checkpoint", False):  # a config parse_config did not see
            raise ValueError(ELASTIC_MESSAGE.format(name=self.optimizer_cls.__name__))
        if zo is not None and getattr(zo, "swap_optimizer", False):
            raise ValueError(
                "zero_optimization.offload_optimizer.device='nvme' swaps optimizer state out between "
                "sub-group steps, which lightning_soaa optimizers do not support; use device 'cpu' or 'none'."
            )

    @property
    def inner(self) -> Any:
        """The wrapped optimizer (``None`` until the first step or checkpoint call builds it)."""
        return self._inner

    # ------------------------------------------------------------------ flats DeepSpeed hands us
    def _all_flats(self) -> list[tuple[int, Tensor]]:
        """(group index, tensor) for every tensor the inner optimizer must cover, in DeepSpeed's order."""
        zo = self._zero_opt
        if self.zero_stage == 3:
            if zo is None or not hasattr(zo, "fp32_partitioned_groups_flat"):
                raise RuntimeError(
                    "DeepSpeedClientOptimizer at ZeRO-3 must be bound to the engine: call "
                    "deepspeed_ext.bind(engine) after deepspeed.initialize, or build the engine with "
                    "deepspeed_ext.initialize(...) (or the Lightning strategy "
                    "deepspeed_ext.DeepSpeedStrategy)."
                )
            return [(zo.sub_group_to_group_id[k], t) for k, t in enumerate(zo.fp32_partitioned_groups_flat)]
        return [(gi, p) for gi, g in enumerate(self._canonical_groups) for p in g["params"]]

    def _writeback(self, flats_done: list[Tensor]) -> None:
        """Copy updated fp32 partitions into DeepSpeed's low-precision buffers for flats whose step()
        call already returned (DeepSpeed copied them before we updated them)."""
        if not flats_done:
            return
        zo = self._zero_opt
        if zo is None:
            raise RuntimeError(
                "DeepSpeed called step() several times in one training step (several param groups or "
                "ZeRO-3 sub-groups) but the optimizer is not bound to the engine; call "
                "deepspeed_ext.bind(engine) after deepspeed.initialize or use deepspeed_ext.initialize."
            )
        ids = {id(t) for t in flats_done}
        if hasattr(zo, "fp32_partitioned_groups_flat"):  # ZeRO-3
            for k, flat in enumerate(zo.fp32_partitioned_groups_flat):
                if id(flat) in ids and zo.fp16_partitioned_groups_flat[k] is not None:
                    zo.fp16_partitioned_groups_flat[k].data.copy_(flat.data)
        elif hasattr(zo, "single_partition_of_fp32_groups"):  # ZeRO-1/2
            import torch.distributed as dist

            for i, flat in enumerate(zo.single_partition_of_fp32_groups):
                if id(flat) in ids:
                    pid = dist.get_rank(group=zo.real_dp_process_group[i])
                    zo.parallel_partitioned_bit16_groups[i][pid].data.copy_(flat.data)
        else:
            raise RuntimeError(f"cannot write back a multi-call step through {type(zo).__name__}")

    # ------------------------------------------------------------------ the inner optimizer
    def _ensure_inner(self) -> Any:
        if self._inner is not None:
            return self._inner
        from lightning_soaa.distributed.comm import default_communicator

        flats = self._all_flats()
        self._vparams = build_virtual_params(
            flats, layout=self.layout if self.zero_stage > 0 else "native", zero_stage=self.zero_stage,
            zero_optimizer=self._zero_opt, model_params=self._model_params, param_names=self._param_names,
        )
        groups = []
        self._inner_src: list[int] = []  # inner group -> canonical group it takes hyperparameters from
        for cg in self._canonical_groups:
            _follow_filtered_positions(cg, next((m for g, m in self._built_members if g is cg), None))
        for gi, cg in enumerate(self._canonical_groups):
            hyper = {k: v for k, v in cg.items() if k not in _NON_HYPER}
            forced = cg.get("use_asgo") is True
            for tensors, names, override in self._vparams.split_group(gi, forced_matrix=forced):
                g = dict(hyper, **override)
                g["params"] = tensors
                if names is not None:
                    g["param_names"] = names
                groups.append(g)
                self._inner_src.append(gi)
        comm = default_communicator(self.process_group)
        self._inner = self.optimizer_cls(groups, comm=comm, shard=self.zero_stage == 0, **self.hyperparams)
        if self.zero_stage > 0:  # DeepSpeed's partitions: not replicas, whatever their values
            self._inner.partitioned_by_caller = True
        if self.layout == "elementwise" or self.zero_stage == 0:
            # Share the state dict so that DeepSpeed's fragment links (safe_get_*_optimizer_state) see it.
            self.state = self._inner.state
        log.info("%s: built %s over %d virtual parameters (ZeRO-%d, %s)", type(self).__name__,
                 self.optimizer_cls.__name__, len(self._vparams.tensors), self.zero_stage, self.layout)
        return self._inner

    def _sync_hyperparams(self) -> None:
        for src, ig in zip(self._inner_src, self._inner.param_groups):
            for k, v in self._canonical_groups[src].items():
                if k not in _NON_HYPER and not (k == "use_asgo" and ig.get(k) is False):
                    ig[k] = v

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Collect one DeepSpeed step() call; step the inner optimizer once all calls of the training
        step have arrived (at once when there is only one)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.suspended:
            # stage 0 + bf16: FP16_UnfusedOptimizer steps once inside deepspeed.initialize with zero
            # gradients to create state; that step must not advance our counters or decay weights.
            self.ignored_steps += 1
            return loss
        self.step_calls += 1
        current = [p for g in self.param_groups for p in g["params"]]
        if self.zero_stage == 0:
            if self._inner is None:
                self._ensure_inner()
            self._run_inner()
            return loss
        for p in current:
            if id(p) in self._pending:
                raise RuntimeError(
                    "DeepSpeed stepped the same partition twice before the training step was complete; "
                    "this layout of step() calls is not supported."
                )
            self._pending[id(p)] = (p, p.grad)
        expected = self._all_flats()
        if not all(id(t) in self._pending for _, t in expected):
            return loss  # more calls of this training step are coming
        done_before = [t for _, t in expected if all(t is not c for c in current)]
        if done_before and self._zero_opt is None:
            self._pending.clear()
            raise RuntimeError(
                "DeepSpeed called step() several times in one training step (several param groups or "
                "ZeRO-3 sub-groups) but the optimizer is not bound to the engine, so the partitions of the "
                "earlier calls could not be written back; call deepspeed_ext.bind(engine) after "
                "deepspeed.initialize, or use deepspeed_ext.initialize. Nothing was updated."
            )
        self._ensure_inner()
        saved = [(t, t.grad) for _, t in expected]
        try:
            for _, t in expected:
                t.grad = self._pending[id(t)][1]
            self._run_inner()
        finally:
            for t, g in saved:
                t.grad = g
            self._pending.clear()
        self._writeback(done_before)
        return loss

    def _run_inner(self) -> None:
        assert self._vparams is not None
        discard = getattr(self._inner, "discard_loss", None)
        if discard is not None and self._loss_handed_before_now():
            # handed over for a training step DeepSpeed skipped (fp16 overflow): not this step's loss
            discard()
        self._loss_at = None
        self._sync_hyperparams()
        self._vparams.attach_grads()
        try:
            self._inner.step()
        except ValueError as e:
            if str(e).startswith(MISSING_LOSS_MESSAGE):  # raised on every rank (SOAA's reduced count)
                raise ValueError(f"{e} {DEEPSPEED_LOSS_ADVICE}") from None
            raise
        finally:
            self._vparams.detach_grads()
        self.training_steps += 1

    # ------------------------------------------------------------------ the loss (SOAA)
    def set_loss(self, loss: Any, *, replace: bool = False) -> None:
        """Hand this training step's (rank-local, mean) loss to the inner optimizer, e.g. SOAA.

        The inner optimizer all-reduces it with its other global scalars, so every rank sees the
        data-parallel mean. Builds the inner optimizer on first use. ``replace``: as SOAA's (a value
        that replaces an earlier one of the same step on purpose).
        """
        inner = self._inner if self._inner is not None else self._ensure_inner()
        if not hasattr(inner, "set_loss"):
            raise TypeError(f"{type(inner).__name__} does not use the loss (no set_loss method)")
        # DeepSpeed skips an fp16 overflow step without stepping us or zeroing the inner optimizer's gradients
        # (its wrappers zero their own), so a loss handed over for it stayed pending: the next set_loss logged
        # the accumulation warning. One handed over before the engine's step counter moved on is replaced.
        inner.set_loss(loss, replace=replace or self._loss_handed_before_now())
        self._loss_at = self._engine_steps()

    def _engine_steps(self) -> int | None:
        """The bound engine's ``global_steps`` (it counts every training step, those DeepSpeed skips too)."""
        engine = self._engine() if self._engine is not None else None
        steps = getattr(engine, "global_steps", None)
        return steps if isinstance(steps, int) else None

    def _loss_handed_before_now(self) -> bool:
        """Whether the loss last handed over belongs to an earlier training step than the engine's current one
        (that step was skipped: a step taken clears ``_loss_at``)."""
        now = self._engine_steps()
        return self._loss_at is not None and now is not None and self._loss_at != now

    def statistics(self) -> dict[str, float]:
        stats = {} if self._inner is None else dict(self._inner.statistics())
        stats["deepspeed_training_steps"] = float(self.training_steps)
        return stats

    # ------------------------------------------------------------------ checkpoints
    def _layout_signature(self) -> dict[str, Any]:
        assert self._vparams is not None
        return {"zero_stage": self.zero_stage, "shapes": [list(t.shape) for t in self._vparams.tensors],
                "world_size": self._inner.comm.world_size}

    def state_dict(self) -> dict[str, Any]:
        return hooked_state_dict(self, self._own_state_dict)  # torch's state-dict hooks, as torch runs them

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        hooked_load(self, state_dict, self._load_own_state_dict)

    def consolidate_state_dict(self, to: int | None = 0) -> None:
        """Collective at ZeRO stage 0 with several ranks (our sharding): gather the inner optimizer's state
        so that :meth:`state_dict` returns it on rank ``to`` (``None``: on every rank). Every rank must
        call it; ``engine.save_checkpoint`` does (see :func:`deepspeed_ext.engine.bind`). A no-op at
        ZeRO-1/2/3, whose state is this rank's partition."""
        if self.zero_stage != 0 or group_size(self.process_group) == 1:
            return
        inner = self._ensure_inner()
        inner.consolidate_state_dict(to=to)
        self._consolidated_at = self.training_steps if to is None or to == inner.comm.rank else None

    def _own_state_dict(self) -> dict[str, Any]:
        """torch-shaped state: hyperparameters per group plus the inner optimizer's state.

        Stage 0 (our sharding): the inner state consolidated by :meth:`consolidate_state_dict` since the
        last step, world-size independent (``engine.save_checkpoint`` consolidates on every rank first).
        Without it this raises: consolidating here would be a collective that a rank-0-only call (``if rank
        == 0: torch.save(opt.state_dict())``) enters alone and hangs in. Stages 1-3: this rank's partition.
        """
        if self.zero_stage == 0 and group_size(self.process_group) > 1 and \
                self._consolidated_at != self.training_steps:
            raise RuntimeError(NOT_CONSOLIDATED.format(cls=type(self).__name__))
        inner = self._ensure_inner()
        groups = []
        index = 0
        for cg in self._canonical_groups:
            g = {k: v for k, v in cg.items() if k not in _NON_HYPER}
            n = len(cg["params"])
            g["params"] = list(range(index, index + n))
            index += n
            groups.append(g)
        ours = {"inner": inner.state_dict(), "layout": self._layout_signature(), "training_steps": self.training_steps}
        if self.saving_at_global_step is not None:
            ours["global_steps"] = self.saving_at_global_step
        groups.append(marker_group(self.optimizer_cls.__name__))  # a foreign optimizer's load refuses the state
        return {"state": {}, "param_groups": groups, STATE_KEY: ours}

    def _load_own_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_writer(state_dict, STATE_KEY, self.optimizer_cls.__name__, type(self).__name__)
        inner = self._ensure_inner()
        ours = state_dict[STATE_KEY]
        saved_groups = real_groups(state_dict["param_groups"])
        saved, mine = ours["layout"], self._layout_signature()
        if self.zero_stage > 0 and saved != mine:
            raise StateLayoutError(
                f"The optimizer state in this checkpoint was written by ZeRO-{saved['zero_stage']} on "
                f"{saved['world_size']} data-parallel ranks (partition shapes {saved['shapes']}); "
                f"this run is "
                f"ZeRO-{mine['zero_stage']} on {mine['world_size']} ranks (shapes {mine['shapes']}). "
                "ZeRO-1/2/3 optimizer state is per-partition: resume with the same world size and ZeRO "
                "config, or load the module only (engine.load_checkpoint(..., load_optimizer_states=False, "
                "load_lr_scheduler_states=False)) to restart the optimizer. ZeRO stage 0 (our own sharding) "
                "checkpoints resume at any world size."
            )
        if self.zero_stage == 0 and saved["zero_stage"] != 0:
            raise StateLayoutError(
                f"The optimizer state was written under ZeRO-{saved['zero_stage']} (per-partition); "
                "it cannot "
                "be loaded at ZeRO stage 0. Resume with the original ZeRO config and world size."
            )
        self._check_saved_block_options(inner, saved_groups)
        inner.load_state_dict(ours["inner"])
        self.training_steps = int(ours.get("training_steps", 0))
        # an option an earlier version did not save takes the value that version used (ASGO's nesterov: False),
        # as the inner load did: these groups are copied into the inner ones at every step (_sync_hyperparams)
        absent = getattr(inner, "absent_key_values", {})
        for cg, sg in zip(self._canonical_groups, with_absent(saved_groups, absent)):
            for k, v in sg.items():
                if k not in _NON_HYPER:
                    cg[k] = tuple(v) if k == "betas" else v
        self._pending.clear()
        self._consolidated_at = None  # the inner optimizer dropped its consolidated state

    def _check_saved_block_options(self, inner: Any, saved_groups: Any) -> None:
        """Refuse, on every rank, a checkpoint saved with another ASGO ``batch_dims`` for a group holding a
        parameter of three or more dimensions. The inner load refuses it too, but under ZeRO-1/2/3 only on
        the ranks whose partition holds a whole expert of such a stack, while the others would load and
        go on to the next collective. The canonical groups (the model's parameters, their real shapes) and
        the saved ones are the same on every rank. Other block options are left to the inner load, which
        re-cuts what it can (``max_block_size`` 1024 -> 2048 loads)."""
        if "batch_dims" not in getattr(inner, "layout_keys", ()) or not isinstance(saved_groups, list):
            return
        for gi, (cg, sg) in enumerate(zip(self._canonical_groups, saved_groups)):
            if not any(p.dim() >= 3 for p in cg["params"]):
                continue
            saved, mine = (sg.get("batch_dims", 0) if isinstance(sg, dict) else 0), cg.get("batch_dims", 0)
            if saved != mine:
                raise StateLayoutError(
                    f"{self.optimizer_cls.__name__}: param_groups[{gi}] of this checkpoint was saved with "
                    f"batch_dims={saved!r} and this run has batch_dims={mine!r}; the blocks (and their state) "
                    f"depend on it. Resume with batch_dims={saved!r}, or load the module only "
                    "(engine.load_checkpoint(..., load_optimizer_states=False)) to restart the optimizer. "
                    "Nothing was loaded.")

    def __repr__(self) -> str:
        return (f"DeepSpeedClientOptimizer({self.optimizer_cls.__name__}, zero_stage={self.zero_stage}, "
                f"layout={self.layout!r})")
