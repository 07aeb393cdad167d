"""SOAA optimizer-step time vs ``torch.optim.AdamW(foreach=True)`` on a ~10M-parameter model, in one run.

What is measured: the wall time of ``optimizer.step()`` alone. Every optimizer gets its own copy of the
same model with the same fixed gradients (no forward/backward, so only the optimizer is timed); steps
are interleaved and the order rotates every step, so machine noise and cache effects hit every
optimizer alike. The reported number is the ratio of medians over the timed steps.

Optimizers: ``torch.optim.AdamW(foreach=True)`` (the baseline), ``SOAA`` (default path: on CPU a
tiled per-tensor loop into preallocated buffers, on CUDA foreach), ``ShardedAdamW`` (the package's own
AdamW, for reference) and, with ``--with-foreach``, ``SOAA(foreach=True)``. SOAA gets a loss every step
through ``step(loss=...)``; its trust-region statistics, one scalar all-reduce (a no-op here, W = 1)
and the lagged predicted-reduction sums are all part of the timed step.

Usage::

    python benchmarks/bench_soaa_step.py                      # ~1-3 minutes on a 2-core CPU, 1 thread
    python benchmarks/bench_soaa_step.py --threads 0          # torch's default thread count
    python benchmarks/bench_soaa_step.py --steps 200 --device cuda

Writes ``benchmarks/results/bench_soaa_step.json`` and ``bench_soaa_step.png`` (``*_warm.*`` with
``--warm-allocator``). The allocator matters on CPU: AdamW allocates a parameter-sized temporary every
step, which with glibc's defaults is a fresh mmap (page faults) each time; in a training process the
heap is usually warm. Report both.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_soaa import SOAA, ShardedAdamW

log = logging.getLogger("bench_soaa_step")


def build_model(width: int, layers: int, out: int) -> nn.Module:
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.GELU()]
    mods.append(nn.Linear(width, out))
    return nn.Sequential(*mods)


def _warm_allocator() -> bool:
    """Ask glibc never to return freed memory to the OS (no mmap for big blocks, no trimming)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 2**30) == 1 and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.warning("--warm-allocator: mallopt is not available here; running with the default allocator")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--out", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=60, help="timed steps per optimizer")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default). Default 1: on a shared, oversubscribed CPU "
                         "every multi-threaded op waits for a descheduled OpenMP thread (~8 ms per op "
                         "measured here), which then measures the scheduler, not the optimizer")
    ap.add_argument("--warm-allocator", action="store_true",
                    help="glibc only: keep freed memory in the heap (mallopt), as in a training process "
                         "whose forward/backward keep the heap warm; then AdamW's per-step temporary "
                         "costs no page faults")
    ap.add_argument("--with-foreach", action="store_true",
                    help="also time SOAA(foreach=True) (on CPU it allocates per step; meant for CUDA)")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    warm = _warm_allocator() if args.warm_allocator else False
    torch.manual_seed(0)
    device = torch.device(args.device)

    base = build_model(args.width, args.layers, args.out).to(device)
    n_params = sum(p.numel() for p in base.parameters())
    grads = [torch.randn_like(p) * 1e-3 for p in base.parameters()]

    def fresh() -> list[nn.Parameter]:
        ps = [p for p in copy.deepcopy(base).parameters()]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        return ps

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    adamw = torch.optim.AdamW(fresh(), lr=1e-3, weight_decay=0.01, foreach=True)
    soaa = SOAA(fresh(), lr=1e-3, weight_decay=0.01, total_steps=1000)
    soaa_fe = (SOAA(fresh(), lr=1e-3, weight_decay=0.01, total_steps=1000, foreach=True)
               if args.with_foreach else None)
    sadamw = ShardedAdamW(fresh(), lr=1e-3, weight_decay=0.01)
    step_no = [0]

    def soaa_step(opt: SOAA) -> Callable[[], None]:
        return lambda: opt.step(loss=1.0 / (1.0 + 0.01 * step_no[0]))

    runs: dict[str, Callable[[], Any]] = {
        "adamw_foreach": adamw.step,
        "soaa": soaa_step(soaa),
        "sharded_adamw": sadamw.step,
    }
    if soaa_fe is not None:
        runs["soaa_foreach"] = soaa_step(soaa_fe)
    names = list(runs)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(args.warmup + args.steps):
        step_no[0] = i
        order = names[i % len(names):] + names[:i % len(names)]  # rotate: no optimizer always goes first
        for k in order:
            sync()
            t0 = time.perf_counter()
            runs[k]()
            sync()
            if i >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratio = {k: med[k] / med["adamw_foreach"] for k in names}
    result = {
        "benchmark": "bench_soaa_step",
        "model": {"width": args.width, "layers": args.layers, "out": args.out, "params": n_params},
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "warm_allocator": warm,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "steps": args.steps,
        "warmup": args.warmup,
        "median_step_ms": med,
        "p10_step_ms": {k: sorted(v)[len(v) // 10] * 1e3 for k, v in times.items()},
        "p90_step_ms": {k: sorted(v)[(9 * len(v)) // 10] * 1e3 for k, v in times.items()},
        "ratio_to_adamw_foreach": ratio,
        "goal": "soaa / adamw_foreach <= 1.2",
        "goal_met": ratio["soaa"] <= 1.2,
        "soaa_stats": soaa.statistics(),
    }
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_soaa_step_warm" if warm else "bench_soaa_step"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    for k in names:
        log.info("%-14s median %8.2f ms   ratio to AdamW(foreach) %.3f", k, med[k], ratio[k])
    log.info("params: %d; goal SOAA <= 1.2x AdamW(foreach): %s", n_params,
             "met" if result["goal_met"] else "NOT met")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].boxplot([[t * 1e3 for t in times[k]] for k in names], showfliers=False)
    ax[0].set_xticks(range(1, len(names) + 1), names, rotation=15)
    ax[0].set_ylabel("optimizer.step() [ms]")
    ax[0].set_title(f"{n_params / 1e6:.1f}M params, {device}, {torch.get_num_threads()} threads")
    for k in names:
        ax[1].plot([t * 1e3 for t in times[k]], label=k, lw=0.8)
    ax[1].set_xlabel("timed step (interleaved)")
    ax[1].set_ylabel("ms")
    ax[1].legend()
    ax[1].set_title(f"median SOAA / AdamW(foreach) = {ratio['soaa']:.2f}"
                    + (" (warm alloc.)" if warm else ""))
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}.png", dpi=120)
    log.info("wrote %s and %s", out_dir / f"{stem}.json", out_dir / f"{stem}.png")


if __name__ == "__main__":
    main()
