"""Small DeepSpeed-version workarounds, each explained."""

from __future__ import annotations

import importlib
import logging

__all__ = ["skip_shm_comm_op", "maybe_skip_shm_comm_op", "SKIP_SHM_ENV"]

#: set to 1 to have deepspeed_ext (initialize, the Lightning strategy) call :func:`skip_shm_comm_op`
SKIP_SHM_ENV = "DEEPSPEED_EXT_SKIP_SHM_OP"

log = logging.getLogger(__name__)


def skip_shm_comm_op() -> bool:
    """Keep DeepSpeed from JIT-compiling its ``deepspeed_shm_comm`` op on the CPU accelerator (~30 s, once
    per machine). The op only serves *inference* all-reduce; training collectives go through
    torch.distributed either way. Call before ``deepspeed.init_distributed`` / ``initialize``.

    The module must be fetched with ``importlib.import_module("deepspeed.comm.torch")``: a plain
    ``import deepspeed.comm.torch as m`` binds the real ``torch`` package (name shadowing in
    ``deepspeed.comm``), and patching that does nothing. Returns True when the patch was applied.
    """
    try:
        mod = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return False
    if not hasattr(mod, "build_shm_op"):
        log.warning("deepspeed.comm.torch has no build_shm_op; DeepSpeed layout changed, nothing patched")
        return False
    mod.build_shm_op = lambda: None
    return True


def maybe_skip_shm_comm_op() -> bool:
    """:func:`skip_shm_comm_op` when the environment variable ``DEEPSPEED_EXT_SKIP_SHM_OP=1`` is set
    (the test suite sets it; child processes inherit it)."""
    import os

    if os.environ.get(SKIP_SHM_ENV, "") in ("1", "true", "True", "yes"):
        return skip_shm_comm_op()
    return False
