"""Build an optimizer for a LightningModule *inside* ``configure_optimizers``.

Why a factory: a sharded optimizer picks its communicator when it is constructed. Lightning initializes
``torch.distributed`` in ``Trainer.fit`` (strategy setup) and calls ``configure_optimizers`` after that,
so an optimizer built there is sharded across the DDP ranks automatically. Stock ``LightningCLI`` builds
``--optimizer`` *before* the trainer exists; such an optimizer sees no process group and would run
unsharded on every rank (and SOAA's trust-region decisions would no longer be shared). The
:class:`OptimizerFactory` defers construction to ``configure_optimizers``; :mod:`lightning_soaa.lightning.cli`
uses it for ``--optimizer``.

The factory also decides what the optimizer's first argument is, as the registry says
(:meth:`~lightning_soaa.registry.OptimizerSpec.first_argument`): EGN differentiates the model itself, so it
receives the LightningModule; ASGO and DASGO receive param groups made from the module (embedding tables in
a ``use_asgo=False`` group whatever their names); our other optimizers receive ``named_parameters()``; any
other ``torch.optim`` class receives the trainable parameters.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_soaa import registry as optimizer_registry
from lightning_soaa.lightning.stepping import accumulation_scheduler, estimated_optimizer_steps
from lightning_soaa.registry import StepNeeds

__all__ = [
    "KNOWN_OPTIMIZERS",
    "step_needs",
    "optimizer_needing",
    "OptimizerFactory",
    "attach_optimizer",
    "check_sharding_matches_world",
    "iter_wrapped",
    "resolve_optimizer_class",
    "unwrap_optimizer",
    "valid_optimizer_names",
    "with_horizon",
]

log = logging.getLogger(__name__)

#: Our optimizers by short name (aliases included) -> public class path, read from the registry.
KNOWN_OPTIMIZERS: dict[str, str] = {
    n: spec.qualified_name for spec in optimizer_registry.REGISTRY for n in (spec.name, *spec.aliases)
}

# torch.optim classes listed in the "unknown optimizer" message (any torch.optim.Optimizer works).
_TORCH_EXAMPLES = ("torch.optim.AdamW", "torch.optim.Adam", "torch.optim.SGD")


def valid_optimizer_names() -> str:
    """Human-readable list of accepted optimizer names, for error messages."""
    ours = ", ".join(optimizer_registry.qualified_names())
    return (f"{ours}; or the class path of any torch.optim.Optimizer subclass, e.g. "
            f"{', '.join(_TORCH_EXAMPLES)}")


def resolve_optimizer_class(name: str | type) -> type[torch.optim.Optimizer]:
    """Turn ``"SOAA"``, ``"lightning_soaa.SOAA"`` or ``"torch.optim.AdamW"`` into the class.

    Raises:
        ValueError: the name does not resolve to a ``torch.optim.Optimizer`` subclass; the message lists
            the valid names.
    """
    if isinstance(name, type):
        cls: Any = name
    elif not isinstance(name, str):  # None, a number: the name lookup below would fail on .rpartition
        raise ValueError(f"Invalid optimizer {name!r}: expected a name or an optimizer class. Valid optimizers: "
                         f"{valid_optimizer_names()}.")
    else:
        spec = optimizer_registry.lookup(name)
        if spec is not None:
            return spec.load()
        module_name, _, attr = name.rpartition(".")
        cls = None
        if module_name:
            try:
                cls = getattr(importlib.import_module(module_name), attr, None)
            except ImportError:
                cls = None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"Unknown optimizer {name!r}. Valid optimizers: {valid_optimizer_names()}.")
    return cls


def _first_argument(cls: type, module: nn.Module) -> Any:
    """Ours: what the registry says (the module, module-aware groups, or ``named_parameters()``); any other
    optimizer: the trainable parameters."""
    spec = optimizer_registry.spec_of(cls)
    if spec is not None:
        return spec.first_argument(module)
    return [p for p in module.parameters() if p.requires_grad]


def _check_init_args(cls: type, init_args: dict[str, Any]) -> None:
    """Keyword names the optimizer does not take, refused when the factory is made (a typo such as
    ``lrr`` surfaced as a TypeError inside ``fit``)."""
    try:
        sig = inspect.signature(cls)  # the constructor's, without self
    except (TypeError, ValueError):  # a builtin without a signature: left to the call
        return
    params = list(sig.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    takes = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                   inspect.Parameter.KEYWORD_ONLY)}
    first = params[0].name if params else None  # the parameters / module: the factory passes it
    unknown = sorted(k for k in init_args if k not in takes or k == first)
    if unknown:
        allowed = ", ".join(sorted(takes - {first}))
        raise ValueError(f"Invalid init_args for {cls.__name__}: {', '.join(map(repr, unknown))}. "
                         f"Must be among: {allowed}.")


def _check_scheduler_spec(spec: Any) -> None:
    """LightningCLI's ``{"class_path": ..., "init_args": {...}}``, resolved now (a missing or misspelt class
    surfaced as a KeyError or AttributeError when the optimizer was built)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise ValueError(f"Invalid lr_scheduler={spec!r}. Must be a dict with a 'class_path' string (e.g. "
                         "'torch.optim.lr_scheduler.CosineAnnealingLR') and optional 'init_args'.")
    if not isinstance(spec.get("init_args") or {}, dict):
        raise ValueError(f"Invalid lr_scheduler init_args={spec['init_args']!r}. Must be a dict.")
    try:
        resolve_class_path(spec["class_path"])
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"Invalid lr_scheduler class_path={spec['class_path']!r}: {e}. Must be an importable "
                         "class path, e.g. 'torch.optim.lr_scheduler.CosineAnnealingLR'.") from None


class OptimizerFactory:
    """A picklable recipe ``(class, init_args[, lr scheduler])`` turned into an optimizer on demand.

    Args:
        optimizer: a class, a short name from :data:`KNOWN_OPTIMIZERS`, or a class path.
        init_args: keyword arguments for the optimizer (e.g. ``{"lr": 1e-3}``).
        lr_scheduler: optional ``{"class_path": ..., "init_args": {...}}`` for a scheduler built on the
            optimizer (LightningCLI's format).

    Calling the factory with a module returns what ``configure_optimizers`` should return. An optimizer
    whose registry entry has a ``horizon_kwarg`` (SOAA's ``total_steps``) gets it from the trainer's
    ``estimated_stepping_batches`` unless ``init_args`` sets it (:func:`with_horizon`).
    """

    def __init__(self, optimizer: str | type, init_args: dict[str, Any] | None = None,
                 lr_scheduler: dict[str, Any] | None = None) -> None:
        cls = resolve_optimizer_class(optimizer)  # fail at definition time, not inside fit()
        self.class_path = f"{cls.__module__}.{cls.__qualname__}"
        self.init_args = dict(init_args or {})
        _check_init_args(cls, self.init_args)
        if lr_scheduler is not None:
            _check_scheduler_spec(lr_scheduler)
        self.lr_scheduler = lr_scheduler

    @property
    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        return resolve_optimizer_class(self.class_path)

    def build(self, module: nn.Module) -> torch.optim.Optimizer:
        cls = self.optimizer_class
        return cls(_first_argument(cls, module), **with_horizon(cls, self.init_args, module))

    def __call__(self, module: nn.Module) -> Any:
        opt = self.build(module)
        if not self.lr_scheduler:
            return opt
        sched_cls: Any = resolve_class_path(self.lr_scheduler["class_path"])
        sched = sched_cls(opt, **dict(self.lr_scheduler.get("init_args") or {}))
        monitor = getattr(sched, "monitor", None)
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": monitor}}
        return [opt], [sched]

    def __repr__(self) -> str:
        return f"OptimizerFactory({self.class_path}, {self.init_args})"


def with_horizon(cls: type, init_args: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """``init_args`` with the optimizer's ``horizon_kwarg`` (SOAA's ``total_steps``, see the registry)
    set to the trainer's ``estimated_stepping_batches`` when the user left it out or None, counted with the
    ``k`` a ``GradientAccumulationScheduler`` sets in each epoch (Lightning's counts every epoch with the
    ``k`` of the moment, 1 before the first epoch: 24 steps where the fit made 14, and the "paper" band
    stopped narrowing at 13/24; :mod:`lightning_soaa.lightning.stepping`).

    Without it SOAA's trust band would sit at its final width from step 1. A value the user gave is kept;
    so is None when the trainer is unbounded (no ``max_steps``/``max_epochs``) or absent.
    """
    spec = optimizer_registry.spec_of(cls)
    key = spec.horizon_kwarg if spec is not None else None
    if spec is None or key is None or init_args.get(key) is not None:
        return dict(init_args)
    trainer = getattr(module, "_trainer", None)  # LightningModule.trainer raises when not attached
    steps = estimated_optimizer_steps(trainer) if trainer is not None else math.inf
    if not math.isfinite(steps) or steps < 1:
        return dict(init_args)
    log.info("%s: %s=%d from trainer.estimated_stepping_batches%s", spec.qualified_name, key, int(steps),
             " and the GradientAccumulationScheduler's schedule" if accumulation_scheduler(trainer) else "")
    return {**init_args, key: int(steps)}


def resolve_class_path(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def _configure_optimizers(module: nn.Module, factory: OptimizerFactory) -> Any:
    return factory(module)


def attach_optimizer(module: nn.Module, factory: OptimizerFactory) -> nn.Module:
    """Make ``module.configure_optimizers()`` return ``factory(module)``; returns ``module``.

    A ``functools.partial`` (not a bound method) so that the module stays picklable for ``ddp_spawn``
    and Lightning's ``is_overridden`` still recognises the override.
    """
    bound = functools.partial(_configure_optimizers, module, factory)
    # nn.Module.__setattr__'s stub admits only Tensor | Module values; any attribute is allowed.
    module.configure_optimizers = bound  # type: ignore[assignment]
    return module


def iter_wrapped(optimizer: Any, max_depth: int = 6) -> Iterator[Any]:
    """The optimizer and what it wraps: LightningOptimizer -> DeepSpeed wrapper -> our optimizer."""
    seen: set[int] = set()
    obj = optimizer
    for _ in range(max_depth):
        if obj is None or id(obj) in seen:
            return
        seen.add(id(obj))
        yield obj
        obj = getattr(obj, "_optimizer", None) or getattr(obj, "optimizer", None)


def unwrap_optimizer(optimizer: Any, attribute: str) -> Any | None:
    """The first object in the wrapper chain that has ``attribute`` (e.g. ``"set_loss"``), else None."""
    for obj in iter_wrapped(optimizer):
        if hasattr(obj, attribute):
            return obj
    return None


def step_needs(optimizer: Any) -> tuple[Any, StepNeeds] | None:
    """What the optimizer behind ``optimizer`` needs at each step, and the object to hand it to.

    Looks through the wrapper chain (LightningOptimizer -> DeepSpeed client -> ours). A DeepSpeed client
    stands for the class it wraps (``optimizer_cls``) and forwards ``set_loss``/``set_batch``. The answer
    is the registry's :class:`~lightning_soaa.registry.StepNeeds`; a class may declare its own with a
    ``step_needs`` class attribute (a subclass of ours, or a foreign optimizer that wants the loss).
    None for optimizers that declare nothing.
    """
    for obj in iter_wrapped(optimizer):
        inner = getattr(obj, "optimizer_cls", None)
        cls = inner if isinstance(inner, type) else type(obj)
        declared = getattr(cls, "step_needs", None)
        if isinstance(declared, StepNeeds):
            return obj, declared
        spec = optimizer_registry.spec_of(cls)
        if spec is not None:
            return obj, spec.needs
    return None


def optimizer_needing(optimizer: Any, needs: StepNeeds) -> Any | None:
    """The object to hand the loss (``StepNeeds.LOSS``) or the batch (``StepNeeds.BATCH``) to when the
    optimizer behind ``optimizer`` needs it; otherwise None."""
    found = step_needs(optimizer)
    if found is None or found[1] is not needs:
        return None
    return found[0]


def check_sharding_matches_world(optimizer: Any) -> None:
    """Raise if an optimizer of ours runs as a single process while torch.distributed runs W > 1 ranks
    (it would silently run as W independent unsharded copies).

    An optimizer built before the process group existed (stock ``LightningCLI --optimizer``, user code
    that builds it first) is fine: it joins the default group at its first step (``join_pending``). Only
    one that was handed a single-process communicator explicitly (``comm=LocalComm()``) is refused.
    """
    opt = unwrap_optimizer(optimizer, "comm")
    if opt is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    from lightning_soaa.distributed.comm import LocalComm

    world = torch.distributed.get_world_size()
    if getattr(opt, "join_pending", False):
        return  # joins the default group (shards, checks that ranks agree) at its first step
    # A TorchComm over a 1-rank group is a deliberate choice; a LocalComm under W > 1 is not.
    if world > 1 and isinstance(opt.comm, LocalComm):
        raise RuntimeError(
            f"{type(opt).__name__} runs on a single-process communicator (comm=LocalComm()) on each of the "
            f"{world} ranks, so its state is not sharded and its global decisions are not shared. Build it "
            "without comm= (it then uses, or joins at its first step, the default process group), or pass "
            "the process group to use."
        )
