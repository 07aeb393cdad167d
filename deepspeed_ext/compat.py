"""Small DeepSpeed-version workarounds, each explained."""

from __future__ import annotations

import importlib
import logging

__all__ = ["skip_shm_comm_op", "maybe_skip_shm_comm_op", "shm_op_wanted", "SKIP_SHM_ENV"]

#: deepspeed_ext (initialize, the Lightning strategy) skips DeepSpeed's CPU shm op unless this is 0
SKIP_SHM_ENV = "DEEPSPEED_EXT_SKIP_SHM_OP"

log = logging.getLogger(__name__)


def skip_shm_comm_op() -> bool:
    """Keep DeepSpeed from JIT-compiling its ``deepspeed_shm_comm`` op on the CPU accelerator (~30 s, once
    per new process). The op only serves *inference* all-reduce; training collectives go through
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


def shm_op_wanted(env: dict[str, str] | None = None) -> bool:
    """Whether to let DeepSpeed build its CPU shm op: only when ``DEEPSPEED_EXT_SKIP_SHM_OP`` is set to
    ``0``/``false``/``no``. Unset (the default) or ``1`` skips it: the op serves inference all-reduce only,
    and compiling it costs 28-77 s in every new process on a CPU machine."""
    import os

    value = (os.environ if env is None else env).get(SKIP_SHM_ENV, "").strip().lower()
    if value not in ("", "1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"Invalid {SKIP_SHM_ENV}={value!r}. Must be 1/true/yes (skip the op, the default) "
                         "or 0/false/no (build it).")
    return value in ("0", "false", "no")


def maybe_skip_shm_comm_op() -> bool:
    """:func:`skip_shm_comm_op` unless ``DEEPSPEED_EXT_SKIP_SHM_OP=0`` asks for the op
    (:func:`shm_op_wanted`); called by :func:`deepspeed_ext.initialize` and the Lightning strategy before
    DeepSpeed's backend starts. DeepSpeed builds the op on its CPU accelerator only, so skipping changes
    nothing on GPUs. Returns True when the patch was applied."""
    if shm_op_wanted():
        return False
    return skip_shm_comm_op()
