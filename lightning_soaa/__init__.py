"""lightning-soaa: curvature-aware optimizers (SOAA, EGN, ASGO) with ZeRO-style sharded state.

Importing this package needs torch only; Lightning pieces live in :mod:`lightning_soaa.lightning` and
DeepSpeed pieces in the top-level :mod:`deepspeed_ext`.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_soaa import registry as _registry
from lightning_soaa.kernels import forks as _forks  # noqa: F401  (its fork hook, before any fork)

__version__ = "0.1.0"

# name -> "module:attr"; resolved lazily so that `import lightning_soaa` stays cheap. The optimizers and
# their configs come from the registry (the one list of optimizers); `AdamW` and its alias `ShardedAdamW`
# are the same class, so `lightning_soaa.AdamW` in a DeepSpeed JSON or on the CLI names a Python object.
_EXPORTS: dict[str, str] = {
    "ShardedOptimizer": "lightning_soaa.optim.base:ShardedOptimizer",
    "ShardingConfig": "lightning_soaa.config:ShardingConfig",
}
for _spec in _registry.REGISTRY:
    for _name in (_spec.name, *_spec.aliases):
        _EXPORTS[_name] = _spec.class_path
    _EXPORTS[_spec.config_path.partition(":")[2]] = _spec.config_path

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, _, attr = _EXPORTS[name].partition(":")
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'lightning_soaa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
