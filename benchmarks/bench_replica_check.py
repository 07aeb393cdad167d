"""Cost of the periodic replica check (``replica_check_every``): the checking step against an ordinary one.

What runs: 2 gloo ranks on the CPU, one torch thread each, the same batch on both ranks (so the gradients are
equal, as DDP leaves them) and ``grad_reduction="none"``. Models: the report's three small workloads
(benchmarks/report_runs.py: ``digits``, ``lstsq``, ``chars``) and ``big``, 10 x ``Linear(1000, 1000)`` float32
(10M parameters). Per optimizer the same instance alternates, step by step on both ranks alike, between
``replica_check_every=1`` (this step checks) and ``0`` (it does not): an interleaved A/B in one process, so the
machine's load hits both sides alike. Timed per training iteration (forward, backward, ``step()``) and per
``step()`` alone, in CPU time of the process (``time.process_time``) and wall time.

Reported (medians, ms): ``iter_off``/``iter_check``, ``step_off``/``step_check``, the checking step's extra cost
``check_ms`` (``step_check - step_off``) and its share amortised over ``N`` steps at the default ``N``:
``check_ms / N / iter_off`` (and ``/ step_off``, the stricter ratio).

Writes ``benchmarks/results/bench_replica_check.json`` and ``.png`` (``--label``: a suffix of both names).
``--digest-chunk``: the CPU digest's chunk (``agreement._DIGEST_CHUNK``; 16777216 was the chunk before turn 54's
review), for an A/B of the digest alone.

Usage::

    python benchmarks/bench_replica_check.py [--pairs 40] [--big-pairs 6] [--models digits,lstsq,chars,big]
        [--label before --digest-chunk 16777216]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import report_runs as rr  # a sibling module: run this file as benchmarks/bench_replica_check.py
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from lightning_soaa import registry
from lightning_soaa.config import REPLICA_CHECK_EVERY
from lightning_soaa.distributed import agreement

log = logging.getLogger("bench_replica_check")

OPTIMIZERS = ("AdamW", "SOAA")


def _model(name: str) -> tuple[nn.Module, Tensor, Tensor]:
    """The model and one fixed batch (its inputs, its regression targets)."""
    torch.manual_seed(0)
    if name == "big":
        model: nn.Module = nn.Sequential(*[nn.Linear(1000, 1000) for _ in range(10)])
        return model, torch.randn(32, 1000), torch.randn(32, 1000)
    model = rr.model_for(name, 0)
    # the report's batches: 32 digits, 64 least-squares rows, 32 character windows of 64
    x = {"digits": lambda: torch.randn(32, 64), "lstsq": lambda: torch.randn(64, 32),
         "chars": lambda: torch.randint(0, 64, (32, 64))}[name]()
    return model, x, torch.randn_like(model(x).detach())


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    c, w = time.process_time(), time.perf_counter()
    fn()
    return (time.process_time() - c) * 1e3, (time.perf_counter() - w) * 1e3


def _measure(spec: registry.OptimizerSpec, name: str, pairs: int) -> dict[str, Any]:
    model, x, y = _model(name)
    opt: Any = spec.build(model, **({"total_steps": 10_000} if spec.name == "SOAA" else {}))

    def fwd_bwd() -> Callable[[], Any]:
        """The forward and backward; returns the step (with the loss, for an optimizer that takes it)."""
        opt.zero_grad(set_to_none=True)
        loss = registry.half_mse(model(x), y)
        loss.backward()
        return (lambda: opt.step(loss=loss.detach())) if spec.needs is registry.StepNeeds.LOSS else opt.step

    rec: dict[str, list[float]] = {k: [] for k in ("iter_off", "iter_check", "step_off", "step_check",
                                                   "wstep_off", "wstep_check")}
    for i in range(2 * pairs + 4):
        check = i % 2 == 1
        opt.sharding = dataclasses.replace(opt.sharding, replica_check_every=1 if check else 0)
        dist.barrier()
        c = time.process_time()
        step_cpu, step_wall = _timed(fwd_bwd())
        iter_cpu = (time.process_time() - c) * 1e3
        if i >= 4:  # (the first steps: the construction's replica check, warm-up)
            side = "check" if check else "off"
            rec[f"iter_{side}"].append(iter_cpu)
            rec[f"step_{side}"].append(step_cpu)
            rec[f"wstep_{side}"].append(step_wall)
    med = {k: statistics.median(v) for k, v in rec.items()}
    check_ms = med["step_check"] - med["step_off"]
    n = REPLICA_CHECK_EVERY
    return {"model": name, "optimizer": spec.name, "params": sum(p.numel() for p in model.parameters()),
            "pairs": pairs, **{f"{k}_ms": round(v, 3) for k, v in med.items()}, "check_ms": round(check_ms, 3),
            "check_wall_ms": round(med["wstep_check"] - med["wstep_off"], 3), "every": n,
            "amortised_of_iter": round(check_ms / n / med["iter_off"], 6),
            "amortised_of_step": round(check_ms / n / med["step_off"], 6)}


def _worker(rank: int, world: int, store: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    if args.digest_chunk:
        agreement._DIGEST_CHUNK = args.digest_chunk
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    results = []
    for name in args.models.split(","):
        for opt_name in OPTIMIZERS:
            pairs = args.big_pairs if name == "big" else args.pairs
            results.append(_measure(registry.get(opt_name), name, pairs))
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _plot(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['optimizer']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.6))
    ax[0].bar([x - 0.2 for x in xs], [r["step_off_ms"] for r in rows], width=0.4, label="ordinary step()")
    ax[0].bar([x + 0.2 for x in xs], [r["check_ms"] for r in rows], width=0.4, label="checking step's extra")
    ax[0].set_yscale("log")
    ax[0].set_ylabel("CPU time [ms], median")
    ax[0].set_title(title, fontsize=9)
    ax[1].bar(list(xs), [100 * r["amortised_of_step"] for r in rows])
    ax[1].set_ylabel(f"check amortised over N = {REPLICA_CHECK_EVERY} steps [% of step()]")
    for a in ax:
        a.set_xticks(list(xs), labels, fontsize=7)
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--big-pairs", type=int, default=6)
    ap.add_argument("--models", default="digits,lstsq,chars,big")
    ap.add_argument("--digest-chunk", type=int, default=0, help="the CPU digest's chunk (0: the package's)")
    ap.add_argument("--label", default="", help="suffix of the result files (e.g. before)")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(2, os.path.join(tmp, "store"), args, tmp), nprocs=2, start_method="spawn")
        rows = torch.load(os.path.join(tmp, "rank0.pt"))
    for row in rows:
        log.info(json.dumps(row))
    chunk = args.digest_chunk or agreement._DIGEST_CHUNK
    result = {
        "benchmark": "bench_replica_check", "label": args.label, "world": 2, "threads": 1, "digest_chunk": chunk,
        "every": REPLICA_CHECK_EVERY, "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "wall_s": time.perf_counter() - t0, "rows": rows,
        "what": "rank 0's CPU time per step(): replica_check_every=1 (checking) and 0 alternately, 2 gloo ranks, "
                "the same batch on both ranks, grad_reduction='none'",
    }
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_replica_check" + (f"_{args.label}" if args.label else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    title = f"replica check, W = 2 (gloo), 1 thread, digest chunk {chunk}, CPU time"
    _plot(rows, title + (f" ({args.label})" if args.label else ""), out_dir / f"{stem}.png")
    log.info("wrote %s; load average %s -> %s", out_dir / f"{stem}.json", load_before, result["load_average_after"])


if __name__ == "__main__":
    main()
