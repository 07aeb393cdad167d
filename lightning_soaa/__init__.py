"""lightning-soaa: curvature-aware optimizers (SOAA, EGN, ASGO) with ZeRO-style sharded state.

Importing this package needs torch only; Lightning pieces live in :mod:`lightning_soaa.lightning` and
DeepSpeed pieces in the top-level :mod:`deepspeed_ext`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module; resolved lazily so that `import lightning_soaa` stays cheap.
_EXPORTS = {
    "ShardedOptimizer": "lightning_soaa.optim.base",
    "ShardedAdamW": "lightning_soaa.optim.adamw",
    "SOAA": "lightning_soaa.optim.soaa",
    "EGN": "lightning_soaa.optim.egn",
    "ASGO": "lightning_soaa.optim.asgo",
    "DASGO": "lightning_soaa.optim.asgo",
    "AdamWConfig": "lightning_soaa.config",
    "SOAAConfig": "lightning_soaa.config",
    "EGNConfig": "lightning_soaa.config",
    "ASGOConfig": "lightning_soaa.config",
    "DASGOConfig": "lightning_soaa.config",
    "ShardingConfig": "lightning_soaa.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_soaa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
