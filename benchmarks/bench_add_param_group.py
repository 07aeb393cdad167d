"""Cost of many ``add_param_group`` calls after construction: ours against torch's AdamW, W = 1 (or W > 1).

What is measured: an optimizer built over one parameter, then ``N`` calls of ``add_param_group``, each adding
one group of one new ``16 x 8`` parameter with its own lr (what Lightning's ``BaseFinetuning`` does layer by
layer, and a per-layer lr schedule built group by group), for ``N`` in {100, 300, 1000}. Parameters are passed
as ``(name, tensor)`` pairs (ASGO's routing reads names; torch takes them too). Timed: the CPU time of the
process (``time.process_time``) over the ``N`` calls, the median of ``--rounds`` fresh runs, per optimizer
``torch_adamw`` (``torch.optim.AdamW``, the baseline of the ratios), ``sharded_adamw``, ``soaa`` and ``asgo``.
A call that costs the same whatever the number of groups before it gives a time linear in ``N``; a call that
revisits every earlier parameter gives ``N^2 / 2`` visits. ``--profile`` prints a cProfile of the largest
``N`` for each of our optimizers, sorted by cumulative time.

``--world W`` (W > 1): the same runs on W gloo ranks of one machine (each rank makes every call, as every
rank of a job must; the optimizers are sharded over the W ranks, torch's AdamW is not distributed); the times
reported are rank 0's. What a call costs there besides W = 1's: the cross-rank agreement on the group, the
cross-rank check of the table and, where an existing block's owner moves, the gather of the full state.

Usage::

    python benchmarks/bench_add_param_group.py               # ~1 minute
    python benchmarks/bench_add_param_group.py --sizes 100 300 1000 3000 --rounds 5 --profile
    python benchmarks/bench_add_param_group.py --world 2 --sizes 100 300 --label w2

Writes ``benchmarks/results/bench_add_param_group.json`` and ``.png`` (``--label``: a suffix of both names,
e.g. ``before`` for a run of an older checkout).
"""

from __future__ import annotations

import argparse
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

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _timing import log_profile  # a sibling module: run this file as benchmarks/bench_add_param_group.py

from lightning_soaa import ASGO, SOAA, ShardedAdamW

log = logging.getLogger("bench_add_param_group")

BASE = "torch_adamw"
SHAPE = (16, 8)

MAKERS: dict[str, Callable[[list[Any]], torch.optim.Optimizer]] = {
    "torch_adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "sharded_adamw": lambda ps: ShardedAdamW(ps, lr=1e-3),
    "soaa": lambda ps: SOAA(ps, lr=1e-3, total_steps=10_000),
    "asgo": lambda ps: ASGO(ps, lr=1e-3),
}


def _named(n: int) -> list[tuple[str, torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(0)
    return [(f"layers.{i}.weight", torch.nn.Parameter(torch.randn(SHAPE, generator=g))) for i in range(n)]


def _run(name: str, n: int) -> float:
    """CPU seconds of ``n`` calls of add_param_group on a fresh optimizer (one group of one parameter each)."""
    named = _named(n + 1)
    opt = MAKERS[name](named[:1])
    c0 = time.process_time()
    for i, pair in enumerate(named[1:]):
        opt.add_param_group({"params": [pair], "lr": 1e-3 * 0.99 ** i})
    return time.process_time() - c0


def _time(sizes: list[int], rounds: int) -> dict[str, dict[int, list[float]]]:
    """Per optimizer and ``N``, the CPU seconds of each round (optimizers interleaved within a round)."""
    times: dict[str, dict[int, list[float]]] = {k: {n: [] for n in sizes} for k in MAKERS}
    for _ in range(rounds):
        for n in sizes:
            for k in MAKERS:
                times[k][n].append(_run(k, n))
    return times


def _rank_worker(rank: int, world: int, store: str, sizes: list[int], rounds: int, q: Any) -> None:
    """One rank of ``--world``: every round's times of every optimizer (the same calls on every rank)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        q.put((rank, _time(sizes, rounds)))
    finally:
        dist.destroy_process_group()


def _time_world(sizes: list[int], rounds: int, world: int, timeout: float) -> dict[str, dict[int, list[float]]]:
    """:func:`_time` on ``world`` gloo ranks; rank 0's times."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_rank_worker, args=(r, world, os.path.join(d, "store"), sizes, rounds, q))
                 for r in range(world)]
        for p in procs:
            p.start()
        try:
            got = dict(q.get(timeout=timeout) for _ in procs)
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    return got[0]


def _summary(times: dict[str, dict[int, list[float]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for k, per in times.items():
        summary[k] = {}
        for n, ts in per.items():
            med = statistics.median(ts)
            base = statistics.median(times[BASE][n])
            summary[k][str(n)] = {"median_s": med, "rounds_s": ts, "us_per_call": med / n * 1e6,
                                  "ratio": med / base if base > 0 else None}
            log.info("%-14s N=%5d  CPU %8.3f s  (%7.1f µs per call, rounds %.3f-%.3f)  / %s %.1fx", k, n, med,
                     med / n * 1e6, min(ts), max(ts), BASE, med / base if base > 0 else float("nan"))
    return summary


def _plot(summary: dict[str, Any], sizes: list[int], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.6))
    for k in summary:
        ax[0].plot(sizes, [summary[k][str(n)]["median_s"] for n in sizes], marker="o", label=k)
        ax[1].plot(sizes, [summary[k][str(n)]["us_per_call"] for n in sizes], marker="o", label=k)
    ax[0].set_xscale("log")
    ax[0].set_yscale("log")
    ax[0].set_xlabel("N add_param_group calls (one 16x8 parameter each)")
    ax[0].set_ylabel("CPU time of the N calls [s]")
    ax[0].set_title(title, fontsize=9)
    ax[1].set_xscale("log")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("N")
    ax[1].set_ylabel("CPU time per call [µs] (flat: linear in N)")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _profile(n: int) -> None:
    for k in ("sharded_adamw", "soaa", "asgo"):
        def run(k: str = k) -> None:
            _run(k, n)
        log_profile(log, run, f"{n} add_param_group calls of {k} (W = 1)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000], help="numbers of calls N")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the largest N of each of ours")
    ap.add_argument("--label", default="", help="suffix of the result files (e.g. before)")
    ap.add_argument("--world", type=int, default=1, help="ranks (gloo, this machine); > 1: rank 0's times")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the ranks (--world > 1)")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    sizes = sorted(args.sizes)
    t0 = time.perf_counter()
    if args.world > 1:
        summary = _summary(_time_world(sizes, args.rounds, args.world, args.timeout))
    else:
        summary = _summary(_time(sizes, args.rounds))
    wall = time.perf_counter() - t0
    if args.profile and args.world == 1:
        _profile(sizes[-1])
    result = {
        "benchmark": "bench_add_param_group", "label": args.label, "shape": list(SHAPE), "sizes": sizes,
        "rounds": args.rounds, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None, "wall_s": wall,
        "baseline": BASE, "summary_cpu_time": summary, "world": args.world,
        "what": "CPU time of N add_param_group calls after construction, one group of one parameter each, "
                f"W = {args.world}" + (" (gloo, rank 0's times)" if args.world > 1 else ""),
    }
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_add_param_group" + (f"_{args.label}" if args.label else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    title = f"add_param_group x N, W = {args.world}, 1 thread, median of {args.rounds} rounds, CPU time"
    _plot(summary, sizes, title + (f" ({args.label})" if args.label else ""), out_dir / f"{stem}.png")
    log.info("wrote %s", out_dir / f"{stem}.json")


if __name__ == "__main__":
    main()
