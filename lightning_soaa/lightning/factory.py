"""Build an optimizer for a LightningModule *inside* ``configure_optimizers``.

Why a factory: a sharded optimizer picks its communicator when it is constructed. Lightning initializes
``torch.distributed`` in ``Trainer.fit`` (strategy setup) and calls ``configure_optimizers`` after that,
so an optimizer built there is sharded across the DDP ranks automatically. Stock ``LightningCLI`` builds
``--optimizer`` *before* the trainer exists; such an optimizer sees no process group and would run
unsharded on every rank (and SOAA's trust-region decisions would no longer be shared). The
:class:`OptimizerFactory` defers construction to ``configure_optimizers``; :mod:`lightning_soaa.lightning.cli`
uses it for ``--optimizer``.

The factory also decides what the optimizer's first argument is: EGN differentiates the model itself, so
it receives the LightningModule; our sharded optimizers receive ``named_parameters()`` (ASGO routes
parameters by name); any other ``torch.optim`` class receives the trainable parameters.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "KNOWN_OPTIMIZERS",
    "OptimizerFactory",
    "attach_optimizer",
    "check_sharding_matches_world",
    "iter_wrapped",
    "resolve_optimizer_class",
    "unwrap_optimizer",
    "valid_optimizer_names",
]

#: Our optimizers by short name -> class path (the import paths are part of the public API).
KNOWN_OPTIMIZERS: dict[str, str] = {
    "SOAA": "lightning_soaa.SOAA",
    "EGN": "lightning_soaa.EGN",
    "ASGO": "lightning_soaa.ASGO",
    "DASGO": "lightning_soaa.DASGO",
    "ShardedAdamW": "lightning_soaa.ShardedAdamW",
}

# torch.optim classes listed in the "unknown optimizer" message (any torch.optim.Optimizer works).
_TORCH_EXAMPLES = ("torch.optim.AdamW", "torch.optim.Adam", "torch.optim.SGD")


def valid_optimizer_names() -> str:
    """Human-readable list of accepted optimizer names, for error messages."""
    ours = ", ".join(KNOWN_OPTIMIZERS.values())
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
    else:
        path = KNOWN_OPTIMIZERS.get(name, name)
        module_name, _, attr = path.rpartition(".")
        cls = None
        if module_name:
            try:
                cls = getattr(importlib.import_module(module_name), attr, None)
            except ImportError:
                cls = None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"Unknown optimizer {name!r}. Valid optimizers: {valid_optimizer_names()}.")
    return cls


def _wants_module(cls: type) -> bool:
    """True for optimizers that take the model itself (EGN), not its parameters."""
    if getattr(cls, "takes_module", False):
        return True
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:2]
    except (ValueError, TypeError):
        return False
    if not params:
        return False
    first = params[0]
    return first.name in ("model", "module")


def _first_argument(cls: type, module: nn.Module) -> Any:
    if _wants_module(cls):
        return module
    from lightning_soaa.optim.base import ShardedOptimizer

    if issubclass(cls, ShardedOptimizer):
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return [p for p in module.parameters() if p.requires_grad]


class OptimizerFactory:
    """A picklable recipe ``(class, init_args[, lr scheduler])`` turned into an optimizer on demand.

    Args:
        optimizer: a class, a short name from :data:`KNOWN_OPTIMIZERS`, or a class path.
        init_args: keyword arguments for the optimizer (e.g. ``{"lr": 1e-3}``).
        lr_scheduler: optional ``{"class_path": ..., "init_args": {...}}`` for a scheduler built on the
            optimizer (LightningCLI's format).

    Calling the factory with a module returns what ``configure_optimizers`` should return.
    """

    def __init__(self, optimizer: str | type, init_args: dict[str, Any] | None = None,
                 lr_scheduler: dict[str, Any] | None = None) -> None:
        cls = resolve_optimizer_class(optimizer)  # fail at definition time, not inside fit()
        self.class_path = f"{cls.__module__}.{cls.__qualname__}"
        self.init_args = dict(init_args or {})
        self.lr_scheduler = lr_scheduler

    @property
    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        return resolve_optimizer_class(self.class_path)

    def build(self, module: nn.Module) -> torch.optim.Optimizer:
        cls = self.optimizer_class
        return cls(_first_argument(cls, module), **self.init_args)

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
    module.configure_optimizers = bound  # type: ignore[method-assign]
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


def check_sharding_matches_world(optimizer: Any) -> None:
    """Raise if a sharded optimizer was built before torch.distributed started (e.g. by stock
    ``LightningCLI``): it would silently run as W independent unsharded copies."""
    opt = unwrap_optimizer(optimizer, "comm")
    if opt is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    from lightning_soaa.distributed.comm import LocalComm

    world = torch.distributed.get_world_size()
    # A TorchComm over a 1-rank group is a deliberate choice; a LocalComm under W > 1 is not.
    if world > 1 and isinstance(opt.comm, LocalComm):
        raise RuntimeError(
            f"{type(opt).__name__} was constructed before torch.distributed was initialized, so it runs "
            f"unsharded on each of the {world} ranks and its global decisions are not shared. Construct it "
            "inside LightningModule.configure_optimizers (Lightning calls it after the process group "
            "exists), or use the `lightning-soaa` CLI (lightning_soaa.lightning.cli.SOAALightningCLI), which "
            "defers --optimizer to configure_optimizers."
        )
