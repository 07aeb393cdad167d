"""DeepSpeed tests need deepspeed; skip the folder cleanly without it."""

from __future__ import annotations

import pytest

pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install lightning-soaa[deepspeed])")


@pytest.fixture(autouse=True)
def _no_shm_op_jit(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed would JIT-compile its CPU shm op (inference only, 28-77 s) in every new process; the
    adapter skips it by default. The tests run with that default (the variable unset, also in spawned
    ranks and launcher children), whatever the calling shell has."""
    monkeypatch.delenv("DEEPSPEED_EXT_SKIP_SHM_OP", raising=False)
