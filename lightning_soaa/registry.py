"""The one list of lightning-soaa's optimizers.

Everything that needs to know which optimizers exist reads this module: the package exports
(``lightning_soaa.SOAA``), the Lightning factory and CLI, the callbacks (which optimizer needs the loss or
the batch), the DeepSpeed adapter (layout, ZeRO stages), the examples, and the test battery (one driver per
optimizer takes a step). Adding an optimizer means: its config in :mod:`lightning_soaa.config`, its math in
:mod:`lightning_soaa.functional`, its class in :mod:`lightning_soaa.optim`, and one :class:`OptimizerSpec`
below.

The public name of every optimizer is ``lightning_soaa.<name>``; the same spelling is what a DeepSpeed JSON
writes in ``"optimizer": {"type": "lightning_soaa.<name>"}`` and what ``--optimizer`` takes on the CLI.
Nothing here imports the optimizer modules until a class is asked for, so ``import lightning_soaa`` stays
cheap.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "PREFIX",
    "REGISTRY",
    "DeepSpeedLayout",
    "FirstArg",
    "OptimizerSpec",
    "StepNeeds",
    "dtensor_class_names",
    "get",
    "lookup",
    "names",
    "qualified_names",
    "spec_of",
]

#: the package prefix of every public optimizer name
PREFIX = "lightning_soaa."


class StepNeeds(enum.Enum):
    """What ``step()`` needs besides the gradients (how a training loop must call it)."""

    #: gradients only: ``loss.backward(); opt.step()``
    NOTHING = "nothing"
    #: the mini-batch loss: ``opt.step(loss=loss)``, ``opt.set_loss(loss)`` or a closure
    LOSS = "loss"
    #: the mini-batch itself (no gradients): ``opt.step(inputs=x, targets=y)`` or ``opt.set_batch(x, y)``
    BATCH = "batch"


class FirstArg(enum.Enum):
    """What the constructor's first argument is."""

    #: ``model.parameters()`` or ``model.named_parameters()`` (names route ASGO's parameters)
    NAMED_PARAMETERS = "named_parameters"
    #: the ``nn.Module`` itself (EGN differentiates the model)
    MODULE = "module"


class DeepSpeedLayout(enum.Enum):
    """How the optimizer sees a ZeRO-1/2/3 partition (see :mod:`deepspeed_ext.structure`)."""

    #: the math is valid on any 1-D slice: runs on the flat partitions directly
    ELEMENTWISE = "elementwise"
    #: needs matrices: rebuilt from DeepSpeed's per-parameter fragment maps
    STRUCTURED = "structured"
    #: needs the module itself (runs at stage 0 only)
    MODEL = "model"


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerSpec:
    """Everything the rest of the project needs to know about one optimizer.

    Attributes:
        name: the public name; the class is ``lightning_soaa.<name>``.
        class_path: where the class is defined, ``module:attr``.
        config_path: its frozen hyperparameter config, ``module:attr``.
        needs: what a step needs besides gradients.
        first_arg: what the constructor takes first.
        module_groups: ``module:function`` turning a module into the param groups a route that builds the
            optimizer from the module alone hands the constructor (:meth:`first_argument`): an optimizer
            that must see the module to group its parameters (ASGO sends embedding tables to its AdamW
            part, and only the module tells a table named ``wte`` from a weight matrix). None: the trainable
            ``named_parameters()``.
        aliases: other names that resolve to this optimizer (kept for old configs and code).
        ds_layout: how it runs on DeepSpeed's ZeRO partitions.
        ds_stages: the ZeRO stages that work.
        ds_unsupported_reason: the message for any other stage, naming what to use instead.
        ds_fp32_only: refuse bf16/fp16 under DeepSpeed.
        ds_constraints: keyword arguments whose values DeepSpeed constrains: (name, allowed values, why).
        horizon_kwarg: the constructor keyword that takes the run's length in optimizer steps, when the
            optimizer schedules something over it (SOAA's trust band); the CLI and the examples fill it.
        test_kwargs: small hyperparameters for the conformance battery (a step on a tiny float64 model
            must move the parameters visibly and stay finite). Choose them so that every piece of state
            the optimizer has is exercised (momentum, damping, split blocks, stored roots...): the battery
            checks each guarantee with these, so a path they leave off is checked nowhere generic.
        supports_complex: complex parameters are stepped correctly (as ``torch.view_as_real``, the way
            ``torch.optim.AdamW`` does); otherwise the constructor refuses them, naming the parameter.
        supports_zero_size: parameters without elements (shape ``(0, 5)``) are accepted and left as
            they are; otherwise the constructor refuses them, naming the parameter.
        state_key_options: the group options whose value decides which state keys a block keeps, each with
            a value whose blocks keep more keys and one whose blocks keep fewer (ASGO's ``root_every="auto"``
            keeps the Gram at the last root). torch's DCP recipe fills only the keys a fresh optimizer
            shows, so a resume that changes one is refused naming it (optim/dcp_state.py); the conformance
            battery checks that refusal for each, and that no other constructor option changes the keys.
        loss_unit_kwargs: the constructor options measured in the loss's own units, which a run on the loss
            times ``c`` must take times ``c`` to be the same algorithm (EGN's λ, added to K = JJᵀ, and its
            clip): the conformance battery's tiny-loss case scales them. Not an optimizer's ``eps`` or
            damping that regularises a scale-free step: the tiny-loss case is there to hold those to it.
    """

    name: str
    class_path: str
    config_path: str
    needs: StepNeeds
    first_arg: FirstArg = FirstArg.NAMED_PARAMETERS
    module_groups: str | None = None
    aliases: tuple[str, ...] = ()
    ds_layout: DeepSpeedLayout
    ds_stages: tuple[int, ...]
    ds_unsupported_reason: str = ""
    ds_fp32_only: bool = False
    ds_constraints: tuple[tuple[str, tuple[Any, ...], str], ...] = ()
    horizon_kwarg: str | None = None
    test_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    supports_complex: bool = False
    supports_zero_size: bool = True
    state_key_options: tuple[tuple[str, Any, Any], ...] = ()
    loss_unit_kwargs: tuple[str, ...] = ()

    @property
    def qualified_name(self) -> str:
        """``lightning_soaa.<name>``: the spelling used in Python, DeepSpeed JSON and the CLI."""
        return PREFIX + self.name

    @property
    def module(self) -> str:
        return self.class_path.partition(":")[0]

    @property
    def attr(self) -> str:
        return self.class_path.partition(":")[2]

    def load(self) -> type[torch.optim.Optimizer]:
        """The optimizer class (imports its module on first use)."""
        return _load(self.class_path)

    @property
    def supports_dtensor(self) -> bool:
        """Whether the optimizer takes DTensor (FSDP2 ``fully_shard``) parameters: its class's own
        ``supports_dtensor`` (imports the class); one that does not refuses them at construction."""
        return bool(getattr(self.load(), "supports_dtensor", False))

    @property
    def unsharded_replicas(self) -> bool:
        """Whether ``shard=False`` means replicated state (every rank steps every parameter of its own copy: EGN)
        rather than the caller's partitions (DeepSpeed ZeRO): its class's own ``unsharded_replicas``."""
        return bool(getattr(self.load(), "unsharded_replicas", False))

    def load_config(self) -> type:
        """The optimizer's frozen hyperparameter config class."""
        return _load(self.config_path)

    # ------------------------------------------------------------------ drivers (tests, examples)
    def build(self, model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
        """Construct the optimizer for ``model`` with the right first argument (:meth:`first_argument`). The
        tests pass ``**spec.test_kwargs``; an optimizer that takes the module is given ``loss="mse"`` unless
        told otherwise, matching :meth:`take_step`'s loss."""
        cls: Callable[..., torch.optim.Optimizer] = self.load()  # the first argument varies by FirstArg
        if self.first_arg is FirstArg.MODULE:
            kwargs.setdefault("loss", "mse")
        return cls(self.first_argument(model), **kwargs)

    def first_argument(self, module: nn.Module) -> Any:
        """The constructor's first argument where only the module is at hand (the user gave no parameters
        or groups): the OptimizerFactory (so ``configure_optimizers`` helpers and the lightning-soaa CLI),
        a DeepSpeed config naming this optimizer, :meth:`build`. The module itself (``FirstArg.MODULE``),
        the groups ``module_groups`` makes of it, or its trainable ``named_parameters()``."""
        if self.first_arg is FirstArg.MODULE:
            return module
        if self.module_groups is not None:
            return _load(self.module_groups)(module)
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def take_step(self, opt: Any, model: nn.Module, inputs: Tensor, targets: Tensor,
                  loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, *,
                  on_gradients: Callable[[], None] | None = None) -> Tensor:
        """One training step the way a user's loop takes it; returns the (detached) loss before the step.

        ``model`` is what the forward pass runs through (a DDP wrapper is fine, except for optimizers
        that take the batch: they differentiate the bare module themselves). ``loss_fn(outputs,
        targets)`` defaults to :func:`half_mse`, the loss EGN's ``"mse"`` minimises, so every optimizer
        trains on the same objective. ``on_gradients()`` runs between ``backward()`` and ``step()`` (to
        average gradients as DDP would, or to inject a fault); optimizers that take the batch read no
        gradients and never call it.
        """
        fn = loss_fn or half_mse
        if self.needs is StepNeeds.BATCH:
            with torch.no_grad():
                loss = fn(model(inputs), targets)
            opt.step(inputs=inputs, targets=targets)
            return loss.detach()
        opt.zero_grad(set_to_none=True)
        loss = fn(model(inputs), targets)
        loss.backward()
        if on_gradients is not None:
            on_gradients()
        if self.needs is StepNeeds.LOSS:
            opt.step(loss=loss.detach())
        else:
            opt.step()
        return loss.detach()


def half_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """``mean_i ½‖z_i − y_i‖²``: EGN's ``"mse"`` loss, also the drivers' default objective."""
    return 0.5 * (outputs - targets).pow(2).sum(dim=-1).mean()


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


_EGN_STAGES_REASON = (
    "EGN differentiates the whole model itself (per-sample Jacobians), but ZeRO-1/2/3 hand the "
    "optimizer flat partitions of master copies instead of the model's parameters. Use "
    "zero_optimization.stage 0 (EGN then shards its own state over the data-parallel group), "
    "or train EGN without DeepSpeed (Lightning strategy='ddp', torchrun, mpirun)."
)

#: every optimizer, in the order they are listed to users
REGISTRY: tuple[OptimizerSpec, ...] = (
    OptimizerSpec(
        name="SOAA", class_path="lightning_soaa.optim.soaa:SOAA", config_path="lightning_soaa.config:SOAAConfig",
        needs=StepNeeds.LOSS, ds_layout=DeepSpeedLayout.ELEMENTWISE, ds_stages=(0, 1, 2, 3),
        horizon_kwarg="total_steps",
        ds_constraints=(("acceptance", ("lagged",),
                         "the DeepSpeed engine calls step() without a closure, and acceptance='same_batch' "
                         "re-evaluates the loss through one"),),
        test_kwargs={"lr": 5e-2, "gamma": 0.3, "total_steps": 10, "weight_decay": 0.01},
    ),
    OptimizerSpec(
        name="EGN", class_path="lightning_soaa.optim.egn:EGN", config_path="lightning_soaa.config:EGNConfig",
        needs=StepNeeds.BATCH, first_arg=FirstArg.MODULE, ds_layout=DeepSpeedLayout.MODEL, ds_stages=(0,),
        ds_fp32_only=True, ds_unsupported_reason=_EGN_STAGES_REASON,
        test_kwargs={"lr": 0.5, "damping": 0.5, "momentum": 0.5, "line_search": True,
                     "adaptive_damping": True},
        # its Linear capture forms per-sample Jacobians; an empty weight (Linear(0, n)) has none to form
        supports_zero_size=False,
        state_key_options=(("momentum", 0.5, 0.0),),  # the momentum buffer exists only with momentum > 0
        loss_unit_kwargs=("damping", "damping_min", "damping_max"),  # the system is K + bλI
    ),
    OptimizerSpec(
        name="ASGO", class_path="lightning_soaa.optim.asgo:ASGO", config_path="lightning_soaa.config:ASGOConfig",
        module_groups="lightning_soaa.optim.asgo_groups:route_param_groups",
        needs=StepNeeds.NOTHING, ds_layout=DeepSpeedLayout.STRUCTURED, ds_stages=(0, 1, 2, 3),
        # the adaptive schedule, tuned so that on the battery's model some blocks take a new root (by the
        # Gram's change or by age) and others reuse the stored one at most steps: its state (the Gram at
        # the last root, that step) and the stored roots are both exercised
        test_kwargs={"lr": 2e-2, "max_block_size": 4, "root_every": "auto", "root_tol": 1.0, "root_max_every": 2,
                     "damping": 1e-6},
        state_key_options=(("root_every", "auto", 1),),  # "auto" keeps gram_at_root and root_step
    ),
    OptimizerSpec(
        name="DASGO", class_path="lightning_soaa.optim.asgo:DASGO",
        module_groups="lightning_soaa.optim.asgo_groups:route_param_groups",
        config_path="lightning_soaa.config:DASGOConfig",
        needs=StepNeeds.NOTHING, ds_layout=DeepSpeedLayout.STRUCTURED, ds_stages=(0, 1, 2, 3),
        test_kwargs={"lr": 2e-2},
    ),
    OptimizerSpec(
        name="AdamW", class_path="lightning_soaa.optim.adamw:ShardedAdamW",
        config_path="lightning_soaa.config:AdamWConfig", aliases=("ShardedAdamW",),
        needs=StepNeeds.NOTHING, ds_layout=DeepSpeedLayout.ELEMENTWISE, ds_stages=(0, 1, 2, 3),
        test_kwargs={"lr": 2e-2, "betas": (0.9, 0.99), "weight_decay": 0.05, "max_block_numel": 24},
        supports_complex=True,
    ),
)

_BY_NAME: dict[str, OptimizerSpec] = {}
for _spec in REGISTRY:
    for _n in (_spec.name, *_spec.aliases):
        _BY_NAME[_n.lower()] = _spec
        _BY_NAME[(PREFIX + _n).lower()] = _spec


def names() -> list[str]:
    """The public short names, in registry order: ``["SOAA", "EGN", "ASGO", "DASGO", "AdamW"]``."""
    return [s.name for s in REGISTRY]


def qualified_names() -> list[str]:
    """``["lightning_soaa.SOAA", ...]``: the spelling for DeepSpeed JSON and the CLI."""
    return [s.qualified_name for s in REGISTRY]


def lookup(name: str) -> OptimizerSpec | None:
    """The spec for a short, qualified or alias name (case-insensitive), or None."""
    if not isinstance(name, str):
        return None
    return _BY_NAME.get(name.lower())


def get(name: str) -> OptimizerSpec:
    """Like :func:`lookup`, but raises ``ValueError`` listing the valid names."""
    spec = lookup(name)
    if spec is None:
        raise ValueError(f"Invalid optimizer={name!r}. Must be one of {', '.join(qualified_names())}.")
    return spec


def dtensor_class_names() -> list[str]:
    """The class names of the optimizers that take DTensor parameters, in registry order: what a refusal of
    DTensor parameters offers instead (imports every optimizer class)."""
    return [s.attr for s in REGISTRY if s.supports_dtensor]


def spec_of(optimizer: Any) -> OptimizerSpec | None:
    """The spec of an optimizer instance or class (subclasses included), or None for foreign ones."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    for spec in REGISTRY:
        module = importlib.import_module(spec.module)  # already imported when an instance exists
        if issubclass(cls, getattr(module, spec.attr)):
            return spec
    return None
