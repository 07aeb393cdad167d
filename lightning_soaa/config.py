"""Typed, frozen hyperparameter sets, validated on construction.

Every optimizer builds its config from its keyword arguments (and again for each param group, so that
per-group overrides are checked too). Error messages name the field, the value and what is allowed:
``Invalid beta2=1.5. Must be in [0.0, 1.0).``
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = [
    "check_range",
    "check_choice",
    "check_int",
    "AdamWConfig",
    "ShardingConfig",
    "config_from_group",
]


def check_range(
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_inclusive: bool = True,
    hi_inclusive: bool = True,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a real number in the given interval."""
    lb = "[" if lo_inclusive else "("
    rb = "]" if hi_inclusive else ")"
    lo_s = "-inf" if lo is None else repr(float(lo))
    hi_s = "inf" if hi is None else repr(float(hi))
    allowed = f"Must be in {lb}{lo_s}, {hi_s}{rb}."
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}={value!r}. {allowed}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"Invalid {name}={value!r}. {allowed}")
    if lo is not None and (v < lo or (v == lo and not lo_inclusive)):
        raise ValueError(f"Invalid {name}={value!r}. {allowed}")
    if hi is not None and (v > hi or (v == hi and not hi_inclusive)):
        raise ValueError(f"Invalid {name}={value!r}. {allowed}")


def check_int(name: str, value: Any, lo: int | None = None, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= lo (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo):
        extra = " or None" if allow_none else ""
        bound = f" >= {lo}" if lo is not None else ""
        raise ValueError(f"Invalid {name}={value!r}. Must be an integer{bound}{extra}.")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}={value!r}. Must be one of {', '.join(repr(c) for c in choices)}.")


def check_betas(name: str, betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid {name}={betas!r}. Must be a pair (beta1, beta2).")
    check_range(f"{name}[0]", betas[0], 0.0, 1.0, hi_inclusive=False)
    check_range(f"{name}[1]", betas[1], 0.0, 1.0, hi_inclusive=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardingConfig:
    """How an optimizer spreads its state over ranks.

    Attributes:
        shard: keep state only for owned blocks and all-gather parameters after the update. ``False``
            means the caller already partitioned the parameters (DeepSpeed ZeRO): every local block is
            owned, nothing is gathered, and only the global scalars are all-reduced.
        grad_reduction: ``"none"`` when gradients arrive already averaged (DDP, Lightning, DeepSpeed);
            ``"mean"`` to have the optimizer reduce-scatter and average them itself (plain torchrun
            without DDP), so each rank only receives the gradients of the blocks it owns.
    """

    shard: bool = True
    grad_reduction: str = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.shard, bool):
            raise ValueError(f"Invalid shard={self.shard!r}. Must be True or False.")
        check_choice("grad_reduction", self.grad_reduction, ("none", "mean"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamWConfig:
    """AdamW (decoupled weight decay), the fallback for non-matrix parameters in ASGO."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    def __post_init__(self) -> None:
        check_range("lr", self.lr, 0.0)
        check_betas("betas", self.betas)
        check_range("eps", self.eps, 0.0)
        check_range("weight_decay", self.weight_decay, 0.0)


def config_from_group(cls: type, group: dict[str, Any]) -> Any:
    """Build (and so validate) ``cls`` from the matching keys of a param group."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: group[k] for k in names if k in group}
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    return cls(**kwargs)
