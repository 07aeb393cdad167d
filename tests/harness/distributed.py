"""Spawn N gloo CPU ranks from pytest and collect their results.

Workers are module-level functions ``fn(rank, world_size, *args) -> picklable``. Each rank joins a
gloo process group initialised from a FileStore under ``tmp_path``, runs ``fn``, and writes its result
with ``torch.save``; the parent joins with a hard timeout, so a hang or a crash becomes a test failure
with the rank's traceback, never a stuck CI run.
"""

from __future__ import annotations

import os
import pickle
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_distributed"]

_ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
             "GROUP_RANK", "NODE_RANK")


def _worker(rank: int, world_size: int, store_path: str, out_dir: str, fn: Callable[..., Any],
            args: tuple[Any, ...], backend: str = "gloo") -> None:
    for k in _ENV_KEYS:
        os.environ.pop(k, None)
    torch.set_num_threads(1)  # W ranks share 2 cores; oversubscription makes gloo tests crawl
    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        store = dist.FileStore(store_path, world_size)
        if backend == "nccl":  # one GPU per rank, as every NCCL launcher arranges
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        torch.manual_seed(1234)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, out)
    except BaseException:  # noqa: BLE001 - report everything to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


#: Imported once by the forkserver, so that every rank starts with them: torch._dynamo is imported by the
#: first optimizer a process builds (torch.optim's step wrappers; SOAA's torch.compile also loads the repro
#: module), 2-3 s per rank otherwise, i.e. most of a multi-process test's time.
_PRELOAD = ("torch", "torch.distributed", "torch._dynamo", "torch._dynamo.repro.after_dynamo", "lightning_soaa",
            "lightning_soaa.optim.soaa", "lightning_soaa.optim.asgo", "lightning_soaa.optim.egn",
            "lightning_soaa.optim.adamw", "tests.harness.distributed")


def _context():
    """A forkserver that has imported torch once: children start in ~0.1 s instead of ~2 s for spawn,
    and fork from a clean server process (no OpenMP threads of the pytest process)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(_PRELOAD))
    return ctx


def run_distributed(fn: Callable[..., Any], world_size: int, tmp_path: Path, *args: Any,
                    timeout: float = 120.0, backend: str = "gloo") -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks of ``backend`` (gloo on the CPU, or
    NCCL with rank r on GPU r); return the per-rank results."""
    pickle.dumps(fn)  # fail fast (in the parent) when fn is not a module-level function
    run_dir = Path(tmp_path) / f"dist_{fn.__name__}_{world_size}_{time.monotonic_ns()}"
    run_dir.mkdir(parents=True)
    store_path = str(run_dir / "store")
    ctx = _context()
    procs = [ctx.Process(target=_worker, args=(r, world_size, store_path, str(run_dir), fn, args, backend),
                         daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    results: list[Any] = []
    errors: list[str] = []
    for r in range(world_size):
        path = run_dir / f"rank{r}.pt"
        if not path.exists():
            errors.append(f"rank {r}: no result (exit code {procs[r].exitcode})")
            continue
        rec = torch.load(path, weights_only=False)
        if rec["ok"]:
            results.append(rec["result"])
        else:
            errors.append(f"rank {r} raised:\n{rec['error']}")
    if hung:
        pytest.fail(f"{fn.__name__} on {world_size} ranks: ranks {hung} still running after {timeout}s "
                    f"(hang?)\n" + "\n".join(errors), pytrace=False)
    if errors:
        pytest.fail(f"{fn.__name__} on {world_size} ranks failed:\n" + "\n".join(errors), pytrace=False)
    return results
