"""Per-step cost of the cross-rank agreement checks on the 10M-parameter SOAA benchmark model.

What runs: 2 gloo ranks on the CPU, each with an MLP of 9 hidden layers of width 1024 and 1000 outputs
(~10.5M float32 parameters, the SOAA step benchmark's size) and the same fixed gradients (as DDP would
leave them), SOAA with the default ``grad_reduction="none"``. Per step, interleaved:

* ``step``: the wall time of ``opt.step(loss=...)`` (checks included);
* ``checks``: the wall time of the local work the checks add: ``_grad_scan`` (one ``_foreach_norm``
  over every local gradient) and ``_agreement_rows`` (the hyperparameter digest, the row);
* ``allreduce_small`` / ``allreduce_big``: one fp64 all-reduce of the step's size without (9 values)
  and with the agreement rows (9 + 4 W values), to show what riding in the existing call costs.

Usage::

    python benchmarks/bench_agreement_cost.py [--steps 30] [--threads 1]

Prints one JSON line with the medians (ms) and the checks' share of a step.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_soaa import SOAA
from lightning_soaa.optim.base import host_floats

log = logging.getLogger("bench_agreement_cost")


def build_model(width: int, layers: int, out: int) -> nn.Module:
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.GELU()]
    mods.append(nn.Linear(width, out))
    return nn.Sequential(*mods)


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _worker(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    torch.manual_seed(0)
    model = build_model(1024, 9, 1000)
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():  # identical on both ranks, as after DDP's averaging
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt = SOAA(model.parameters(), lr=1e-3)
    small = torch.zeros(9, dtype=torch.float64)
    big = torch.zeros(9 + 4 * world, dtype=torch.float64)
    rec: dict[str, list[float]] = {"step": [], "checks": [], "allreduce_small": [], "allreduce_big": []}
    for i in range(args.warmup + args.steps):
        vals = {
            "step": _timed(lambda: opt.step(loss=1.0)),
            "checks": _timed(lambda: opt._agreement_rows(None, host_floats([opt._grad_scan([])])[0])),
            "allreduce_small": _timed(lambda: dist.all_reduce(small)),
            "allreduce_big": _timed(lambda: dist.all_reduce(big)),
        }
        if i >= args.warmup:
            for k, v in vals.items():
                rec[k].append(v)
    n = sum(p.numel() for p in model.parameters())
    med = {k: statistics.median(v) for k, v in rec.items()}
    cost = med["checks"] + max(0.0, med["allreduce_big"] - med["allreduce_small"])
    result = {"rank": rank, "params": n, "threads": args.threads, "steps": args.steps,
              **{f"{k}_ms": round(v, 3) for k, v in med.items()},
              "check_cost_ms": round(cost, 3), "check_share_of_step": round(cost / med["step"], 4)}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(2, os.path.join(tmp, "store"), args, tmp), nprocs=2,
                           start_method="spawn")
        for r in range(2):
            log.info(json.dumps(torch.load(os.path.join(tmp, f"rank{r}.pt"))))


if __name__ == "__main__":
    main()
