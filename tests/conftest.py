"""Autouse fixtures: clean distributed env, seeded RNGs, no leftover process group."""

from __future__ import annotations

import random

import pytest
import torch

_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
             "GROUP_RANK", "NODE_RANK")


@pytest.fixture(autouse=True)
def _clean_env_and_seed(monkeypatch: pytest.MonkeyPatch):
    for k in _DIST_ENV:
        monkeypatch.delenv(k, raising=False)
    random.seed(0)
    torch.manual_seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:
        pass
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    torch.use_deterministic_algorithms(False)
