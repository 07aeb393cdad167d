"""DeepSpeed adapter for lightning_soaa: our optimizers under the DeepSpeed engine, launcher and ZeRO 0-3.

Quick start (a normal DeepSpeed JSON naming our optimizer)::

    import deepspeed_ext
    engine, optimizer, _, _ = deepspeed_ext.initialize(
        model=model, config="configs/deepspeed/soaa_zero2.json")
    for x, y in loader:
        loss = loss_fn(engine(x), y)
        engine.backward(loss)   # also hands the loss to SOAA
        engine.step()

Pieces: :mod:`~deepspeed_ext.registry` (names, stages), :mod:`~deepspeed_ext.ds_config` (JSON),
:mod:`~deepspeed_ext.client` (the client optimizer DeepSpeed steps), :mod:`~deepspeed_ext.structure`
(flat partitions -> virtual parameters), :mod:`~deepspeed_ext.engine` (``initialize``),
:mod:`~deepspeed_ext.strategy` (Lightning, CPU and GPU). Importing this package does not import
deepspeed or lightning; they load when used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "initialize": "deepspeed_ext.engine",
    "bind": "deepspeed_ext.engine",
    "build_client_optimizer": "deepspeed_ext.engine",
    "find_client_optimizer": "deepspeed_ext.engine",
    "init_distributed": "deepspeed_ext.engine",
    "DeepSpeedClientOptimizer": "deepspeed_ext.client",
    "StateLayoutError": "deepspeed_ext.client",
    "DeepSpeedEGNOptimizer": "deepspeed_ext.egn_client",
    "parse_config": "deepspeed_ext.ds_config",
    "load_config": "deepspeed_ext.ds_config",
    "valid_names": "deepspeed_ext.registry",
    "REGISTRY": "deepspeed_ext.registry",
    "skip_shm_comm_op": "deepspeed_ext.compat",
    "DeepSpeedStrategy": "deepspeed_ext.strategy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'deepspeed_ext' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
