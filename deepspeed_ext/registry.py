"""Which of our optimizers DeepSpeed configs may name, and at which ZeRO stages each one works.

A DeepSpeed JSON cannot name a third-party optimizer (its ``optimizer.type`` accepts only DeepSpeed's
built-ins and ``torch.optim`` class names), so :mod:`deepspeed_ext` reads ``"type": "lightning_soaa.X"``
itself, builds the optimizer and hands it to ``deepspeed.initialize`` as a client optimizer. This module
is the table behind that: names, import paths, how each optimizer sees a ZeRO partition, and the stages
it supports. Nothing here imports deepspeed.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

__all__ = ["OptimizerEntry", "REGISTRY", "PREFIX", "lookup", "valid_names", "constructor_params"]

PREFIX = "lightning_soaa."

#: keyword arguments the adapter sets itself; a JSON must not set them.
RESERVED_PARAMS = ("params", "process_group", "comm", "shard", "grad_reduction", "model")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerEntry:
    """One optimizer a DeepSpeed config can name.

    Attributes:
        name: the ``optimizer.type`` users write, e.g. ``"lightning_soaa.SOAA"``.
        module, attr: where the class lives (imported lazily, so unlanded optimizers only fail when used).
        layout: ``"elementwise"`` (the math is valid on any 1-D slice: it runs on ZeRO's flat partitions
            directly), ``"structured"`` (needs matrices: the adapter rebuilds them from DeepSpeed's
            per-parameter fragment maps, see :mod:`deepspeed_ext.structure`) or ``"model"`` (needs the
            module itself: EGN, see :mod:`deepspeed_ext.egn_client`).
        stages: ZeRO stages that work.
        unsupported_reason: what to say for any other stage, naming the stage to use.
    """

    name: str
    module: str
    attr: str
    layout: str
    stages: tuple[int, ...]
    unsupported_reason: str = ""
    #: refuse bf16/fp16 (their fp32 master copies would overwrite the optimizer's update of the module)
    fp32_only: bool = False
    #: keyword arguments whose values DeepSpeed constrains: name -> (allowed values, why)
    constraints: tuple[tuple[str, tuple[Any, ...], str], ...] = ()

    def load(self) -> type:
        try:
            mod = importlib.import_module(self.module)
        except ImportError as exc:  # an optimizer that is not installed/landed
            raise ImportError(f"{self.name}: cannot import {self.module} ({exc})") from exc
        return getattr(mod, self.attr)


REGISTRY: dict[str, OptimizerEntry] = {
    e.name.lower(): e
    for e in (
        OptimizerEntry(name="lightning_soaa.AdamW", module="lightning_soaa.optim.adamw", attr="ShardedAdamW",
                       layout="elementwise", stages=(0, 1, 2, 3)),
        OptimizerEntry(
            name="lightning_soaa.SOAA", module="lightning_soaa.optim.soaa", attr="SOAA",
            layout="elementwise", stages=(0, 1, 2, 3),
            constraints=(("acceptance", ("lagged",),
                          "the DeepSpeed engine calls step() without a closure, and acceptance='same_batch' "
                          "re-evaluates the loss through one"),),
        ),
        OptimizerEntry(name="lightning_soaa.ASGO", module="lightning_soaa.optim.asgo", attr="ASGO",
                       layout="structured", stages=(0, 1, 2, 3)),
        OptimizerEntry(name="lightning_soaa.DASGO", module="lightning_soaa.optim.asgo", attr="DASGO",
                       layout="structured", stages=(0, 1, 2, 3)),
        OptimizerEntry(
            name="lightning_soaa.EGN", module="lightning_soaa.optim.egn", attr="EGN", layout="model",
            stages=(0,), fp32_only=True,
            unsupported_reason=(
                "EGN differentiates the whole model itself (per-sample Jacobians), but ZeRO-1/2/3 hand the "
                "optimizer flat partitions of master copies instead of the model's parameters. Use "
                "zero_optimization.stage 0 (EGN then shards its own state over the data-parallel group), "
                "or train EGN without DeepSpeed (Lightning strategy='ddp', torchrun, mpirun)."
            ),
        ),
    )
}


def valid_names() -> list[str]:
    return sorted(e.name for e in REGISTRY.values())


def lookup(type_name: Any) -> OptimizerEntry:
    """The entry for ``type_name`` (case-insensitive); ``ValueError`` listing the valid names otherwise."""
    if not isinstance(type_name, str) or type_name.lower() not in REGISTRY:
        raise ValueError(
            f"Invalid optimizer.type={type_name!r}. Must be one of {', '.join(valid_names())} "
            "(or a DeepSpeed built-in optimizer name, which deepspeed_ext passes through unchanged)."
        )
    return REGISTRY[type_name.lower()]


def constructor_params(cls: type) -> dict[str, inspect.Parameter]:
    """The hyperparameters a JSON may set: the constructor's keywords minus the reserved ones."""
    sig = inspect.signature(cls.__init__)
    return {
        n: p for n, p in sig.parameters.items()
        if n != "self" and n not in RESERVED_PARAMS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
