"""Autouse fixtures: clean distributed env, seeded RNGs, no leftover process group. Under pytest-xdist, the
longest test files start first."""

from __future__ import annotations

import random
from pathlib import Path

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


#: The longest test files (real launchers, a SLURM cluster, fresh interpreters), longest first. Under pytest-xdist
#: (`bash dev.sh test`: --dist loadfile --no-loadscope-reorder) each file runs whole on one worker, in the order
#: collected here; a long file handed out last would keep one worker busy after the others ran out of work.
#: Only the order in which files start changes, never the order of a file's own tests. A file missing here
#: merely starts in its usual place; a one-process run keeps pytest's order.
LONG_FILES = (
    "multinode/test_launchers.py", "test_report.py", "multinode/test_elastic.py", "deepspeed/test_checkpoint.py",
    "unit/test_soaa_triton.py", "test_readme.py", "lightning/test_mpi_guard.py",
    "fsdp2/test_lightning_model_parallel.py", "conformance/test_misuse.py", "lightning/test_main_job.py",
    "lightning/test_cli.py", "lightning/test_stock_cli.py", "conformance/test_local_failures.py",
    "lightning/test_fabric_ddp.py", "deepspeed/test_launcher.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # not an xdist worker
        return
    tests_dir = Path(__file__).parent
    first = {tests_dir / name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: first.get(item.path, len(first)))  # stable: each file's own order kept
