"""Which of our optimizers DeepSpeed configs may name, and at which ZeRO stages each one works.

A DeepSpeed JSON cannot name a third-party optimizer (its ``optimizer.type`` accepts only DeepSpeed's
built-ins and ``torch.optim`` class names), so :mod:`deepspeed_ext` reads ``"type": "lightning_soaa.X"``
itself, builds the optimizer and hands it to ``deepspeed.initialize`` as a client optimizer. This module
reads the table behind that -- names, how each optimizer sees a ZeRO partition, the stages it supports --
from :mod:`lightning_soaa.registry`, the one list of optimizers. Nothing here imports deepspeed.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from lightning_soaa import registry as optimizer_registry
from lightning_soaa.registry import PREFIX, OptimizerSpec

__all__ = ["OptimizerEntry", "REGISTRY", "PREFIX", "lookup", "valid_names", "constructor_params"]

#: keyword arguments the adapter sets itself; a JSON must not set them.
RESERVED_PARAMS = ("params", "process_group", "comm", "shard", "grad_reduction", "model")


@dataclasses.dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer a DeepSpeed config can name: the DeepSpeed view of a
    :class:`lightning_soaa.registry.OptimizerSpec` (which holds every field; nothing is spelled here).

    ``layout`` is ``"elementwise"`` (the math is valid on any 1-D slice: it runs on ZeRO's flat partitions
    directly), ``"structured"`` (needs matrices: rebuilt from DeepSpeed's per-parameter fragment maps, see
    :mod:`deepspeed_ext.structure`) or ``"model"`` (needs the module itself: EGN, see
    :mod:`deepspeed_ext.egn_client`).
    """

    spec: OptimizerSpec

    @property
    def name(self) -> str:
        return self.spec.qualified_name

    @property
    def layout(self) -> str:
        return self.spec.ds_layout.value

    @property
    def stages(self) -> tuple[int, ...]:
        return self.spec.ds_stages

    @property
    def unsupported_reason(self) -> str:
        return self.spec.ds_unsupported_reason

    @property
    def fp32_only(self) -> bool:
        return self.spec.ds_fp32_only

    @property
    def constraints(self) -> tuple[tuple[str, tuple[Any, ...], str], ...]:
        return self.spec.ds_constraints

    def load(self) -> type:
        return self.spec.load()


#: qualified names and aliases (lower case) -> entry, e.g. "lightning_soaa.adamw" and "lightning_soaa.shardedadamw"
REGISTRY: dict[str, OptimizerEntry] = {
    (PREFIX + n).lower(): OptimizerEntry(spec)
    for spec in optimizer_registry.REGISTRY for n in (spec.name, *spec.aliases)
}


def valid_names() -> list[str]:
    return optimizer_registry.qualified_names()


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
