"""Fixed cost of one optimizer step on a small model: ours against torch's AdamW, at W = 1 and W = 2.

What is measured: ``optimizer.step()`` alone on a ~5k-parameter MLP (20-64-48-10 with biases: 4,954
parameters), fixed gradients (no forward/backward), so the step's arithmetic is negligible and what is
timed is the machinery around it (block views, the scalar record, dispatch, host syncs). Optimizers:
``adamw_foreach`` (the baseline of the ratios), ``adamw_default`` (``torch.optim.AdamW()``: the per-tensor
loop on CPU) and ``adamw_fused`` (torch), ``soaa`` (default ``compile`` setting: on CPU its two C
loops, one call per pass for all tensors whatever their size), ``sharded_adamw`` and
``asgo`` (this package, single process), ``asgo_root_every_10`` (ASGO reusing its inverse roots for 10
steps: the median step has no root, so it shows ASGO's machinery without the root's arithmetic) and
``soaa_kernels_only`` (a reference, not an optimizer: SOAA's two functional kernels, ``soaa_moments`` and
``soaa_step_``, called directly on the same tensors with the optimizer's kernels (on CPU the C loops,
which take tensors of any size), the public functional API: the floor under SOAA's step that the
optimizer's machinery cannot go below, save the tensors the public functions return). Steps are interleaved with
a rotating order; per round the median CPU time of the process (``time.process_time``: far less
sensitive than wall time to the other jobs on a shared machine) and the ratio to ``adamw_foreach``; the
report gives the median over rounds and the min-max of the round medians. The number of ATen operator
calls of a step (the median of 10 steps) is counted with a ``TorchDispatchMode`` (deterministic,
load-independent; ``.item()`` of a CPU scalar counts as one).

``--world 2`` also runs the ranks' side of a W = 2 step: two gloo CPU processes, each timing the same
interleaved steps (every collective matches across ranks), with ``torch.distributed.optim.
ZeroRedundancyOptimizer`` over foreach AdamW (torch's sharded AdamW) as the W = 2 reference; CPU time of
each rank's process, reported for rank 0 (rank 1 in the JSON). ``--profile`` prints a cProfile of 300
steps of each of our optimizers (W = 1), sorted by cumulative time.

Usage::

    python benchmarks/bench_step_overhead.py               # ~1 minute
    python benchmarks/bench_step_overhead.py --rounds 9 --steps 400 --world 2 --profile

Writes ``benchmarks/results/bench_step_overhead.json`` and ``.png``.
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
from _timing import CountOps, log_profile  # a sibling module: run this file as benchmarks/bench_step_overhead.py

from lightning_soaa import ASGO, SOAA, ShardedAdamW
from lightning_soaa.functional.soaa import soaa_moments, soaa_step_

log = logging.getLogger("bench_step_overhead")

BASE = "adamw_foreach"


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 48),
                               torch.nn.Tanh(), torch.nn.Linear(48, 10))


def _optimizers(world: int = 1) -> dict[str, tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]]:
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) * 1e-2 for p in _mlp().parameters()]
    makers: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
        "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "adamw_default": lambda ps: torch.optim.AdamW(ps, lr=1e-3),  # on CPU: the per-tensor loop
        "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "soaa": lambda ps: SOAA(ps, lr=1e-3, total_steps=10_000),
        "sharded_adamw": lambda ps: ShardedAdamW(ps, lr=1e-3),
        "asgo": lambda ps: ASGO(ps, lr=1e-3),
        "asgo_root_every_10": lambda ps: ASGO(ps, lr=1e-3, root_every=10),
        "asgo_root_auto": lambda ps: ASGO(ps, lr=1e-3, root_every="auto"),
    }
    if world > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        makers["zero_adamw_foreach"] = lambda ps: ZeroRedundancyOptimizer(
            ps, optimizer_class=torch.optim.AdamW, lr=1e-3, foreach=True)
    out = {}
    for name, make in makers.items():
        ps = list(_mlp().parameters())
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        out[name] = (make(ps), ps)
    return out


def _stepper(opt: torch.optim.Optimizer) -> Callable[[], Any]:
    if isinstance(opt, SOAA):
        # A tensor loss, as in training, made before the clock starts (a training step has it already).
        losses = [torch.tensor(0.999**i) for i in range(20_000)]
        pos = [0]

        def step() -> Any:
            pos[0] = (pos[0] + 1) % len(losses)
            return opt.step(loss=losses[pos[0]])
        return step
    return opt.step


def _soaa_kernels(opt: SOAA, params: list[torch.nn.Parameter]) -> Callable[[], Any]:
    """SOAA's two functional kernels alone on ``opt``'s tensors (after its first step made the state)."""
    st = [opt.state[p] for p in params]
    lists = ([p.grad for p in params], [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st])
    kernels = opt._kernels()  # on CPU the C loops, which take blocks of any size: the optimizer's path

    @torch.no_grad()
    def step() -> Any:
        ts = [int(s["step"].item()) + 1 for s in st]
        soaa_moments(*lists, ts, beta1=0.9, beta2=0.999, eps=1e-8, kernels=kernels)
        return soaa_step_(params, *lists, ts, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                          d=1.0, c=1.0, kernels=kernels)
    return step


def _steppers(world: int = 1) -> tuple[dict[str, Callable[[], Any]], int]:
    opts = _optimizers(world)
    steps = {k: _stepper(o) for k, (o, _) in opts.items()}
    if world == 1:  # (sharded at W > 1: a rank holds part of the state; the W = 1 figure is the one)
        # The reference runs on an optimizer of its own: writing the timed SOAA's moments from outside would
        # make every one of its steps take the general path (its step plan checks the moments' versions).
        ref = _optimizers(world)["soaa"]
        _stepper(ref[0])()  # creates the state the kernel reference reads
        steps["soaa_kernels_only"] = _soaa_kernels(ref[0], ref[1])  # type: ignore[arg-type]
    return steps, sum(p.numel() for p in opts[BASE][1])


def _aten_calls(step: Callable[[], Any], n: int = 10) -> int:
    """The median count over ``n`` steps (``asgo_root_every_10``: a step without a root)."""
    counts = []
    for _ in range(n):
        with CountOps() as counter:
            step()
        counts.append(counter.n)
    return int(statistics.median(counts))


def _plot(cpu: dict[str, list[list[float]]], summary: dict[str, Any], w2: dict[str, Any] | None, title: str,
          path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(cpu)
    fig, ax = plt.subplots(1, 3 if w2 else 2, figsize=(18 if w2 else 13, 4.6))
    ax[0].boxplot([[t * 1e6 for r in cpu[k] for t in r] for k in names], showfliers=False)
    ax[0].set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
    ax[0].set_ylabel("CPU time per step() [µs]")
    ax[0].set_title(title, fontsize=9)
    ratios = [summary[k]["ratio"] for k in names]
    ax[1].bar(names, ratios)
    ax[1].errorbar(names, ratios, yerr=[[r - summary[k]["ratio_round_min"] for k, r in zip(names, ratios)],
                                        [summary[k]["ratio_round_max"] - r for k, r in zip(names, ratios)]],
                   fmt="none", color="k", capsize=3)
    ax[1].axhline(1.5, color="r", ls="--", lw=0.8, label="goal 1.5x")
    ax[1].set_ylabel(f"CPU time / {BASE} (median of rounds), W = 1")
    ax[1].tick_params(axis="x", rotation=30)
    ax[1].legend(fontsize=8)
    if w2:
        k2 = list(w2)
        ax[2].bar(k2, [w2[k]["median_us"] for k in k2])
        ax[2].set_ylabel("CPU time per step() [µs], W = 2 (gloo), rank 0")
        ax[2].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _time(steps: dict[str, Callable[[], Any]], rounds: int, n: int, warmup: int) -> dict[str, list[list[float]]]:
    """Per optimizer and round, the CPU time of each of ``n`` interleaved steps (rotating order)."""
    names = list(steps)
    for _ in range(warmup):
        for k in names:
            steps[k]()
    cpu: dict[str, list[list[float]]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names:
            cpu[k].append([])
        for i in range(n):
            j = i % len(names)
            for k in names[j:] + names[:j]:
                c0 = time.process_time()
                steps[k]()
                cpu[k][r].append(time.process_time() - c0)
    return cpu


def _summary(cpu: dict[str, list[list[float]]], aten: dict[str, int] | None) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for k in cpu:
        med = [statistics.median(x) * 1e6 for x in cpu[k]]
        ratio = [statistics.median(x) / statistics.median(b) for x, b in zip(cpu[k], cpu[BASE])]
        summary[k] = {"median_us": statistics.median(med), "round_medians_us": med,
                      "ratio": statistics.median(ratio), "ratio_round_min": min(ratio),
                      "ratio_round_max": max(ratio)}
        if aten is not None:
            summary[k]["aten_calls_per_step"] = aten[k]
        log.info("%-20s CPU %7.1f µs (rounds %.1f-%.1f)  / %s %.2fx (rounds %.2f-%.2f)%s", k,
                 summary[k]["median_us"], min(med), max(med), BASE, summary[k]["ratio"], min(ratio),
                 max(ratio), f"  ATen calls {aten[k]}" if aten is not None else "")
    return summary


def _rank(rank: int, world: int, store: str, out: str, rounds: int, n: int, warmup: int) -> None:
    """One rank of the W = 2 run (a module-level function, so torch.multiprocessing can start it)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    logging.getLogger().setLevel(logging.INFO if rank == 0 else logging.WARNING)  # rank 0 reports
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        steps, _ = _steppers(world)
        for k in ("adamw_default", "adamw_fused"):
            steps.pop(k)
        if rank == 0:
            log.info("W = %d, rank 0:", world)
        summary = _summary(_time(steps, rounds, n, warmup), None)
        Path(out, f"rank{rank}.json").write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()


def _run_world(world: int, rounds: int, n: int, warmup: int) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_rank, args=(world, os.path.join(d, "store"), d, rounds, n, warmup), nprocs=world,
                           start_method="fork")
        return [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(world)]


def _profile(steps: dict[str, Callable[[], Any]], n: int = 300) -> None:
    for k in ("soaa", "sharded_adamw", "asgo", "asgo_root_every_10", "asgo_root_auto"):
        def run(step: Callable[[], Any] = steps[k]) -> None:
            for _ in range(n):
                step()
        log_profile(log, run, f"{n} steps of {k} (W = 1)", lines=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="timed steps per optimizer and round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--world", type=int, default=1, help="2: also time a W = 2 step on two gloo ranks")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of each of our steps")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    steps, n_params = _steppers()
    for _ in range(args.warmup):
        for k in steps:
            steps[k]()
    aten = {k: _aten_calls(steps[k]) for k in steps}
    t0 = time.perf_counter()
    cpu = _time(steps, args.rounds, args.steps, 0)
    summary = _summary(cpu, aten)
    wall = time.perf_counter() - t0
    ranks = _run_world(args.world, args.rounds, args.steps, args.warmup) if args.world > 1 else None
    if args.profile:
        _profile(steps)
    result = {
        "benchmark": "bench_step_overhead", "params": n_params, "model": "MLP 20-64-48-10 (tanh)",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "steps_per_round": args.steps, "rounds": args.rounds, "wall_s": wall,
        "baseline": BASE, "summary_cpu_time": summary,
        "world": args.world, "summary_cpu_time_per_rank": ranks,
        "goal": "W=1 step of SOAA, ASGO, ShardedAdamW <= 1.5x torch AdamW on a small MLP",
    }
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_step_overhead.json").write_text(json.dumps(result, indent=2))
    title = f"{n_params} params, 1 thread, {args.rounds} rounds x {args.steps} steps, CPU time"
    _plot(cpu, summary, ranks[0] if ranks else None, title, out_dir / "bench_step_overhead.png")
    log.info("wrote %s", out_dir / "bench_step_overhead.json")


if __name__ == "__main__":
    main()
