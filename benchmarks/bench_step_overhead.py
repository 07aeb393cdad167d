"""Fixed cost of one optimizer step on a small model: ours (W = 1) against torch's AdamW.

What is measured: ``optimizer.step()`` alone on a ~5k-parameter MLP (20-64-48-10 with biases: 4,954
parameters), fixed gradients (no forward/backward), so the step's arithmetic is negligible and what is
timed is the machinery around it (block views, the scalar record, dispatch, host syncs). Optimizers:
``adamw_foreach`` (the baseline of the ratios), ``adamw_default`` (``torch.optim.AdamW()``: the per-tensor
loop on CPU) and ``adamw_fused`` (torch), ``soaa`` (default ``compile`` setting; every tensor here is
below the compiled kernels' size threshold, so it runs the eager foreach kernels), ``sharded_adamw`` and
``asgo`` (this package, single process). Steps are interleaved with a rotating order; per round the
median CPU time of the process (``time.process_time``: far less sensitive than wall time to the other
jobs on a shared machine) and the ratio to ``adamw_foreach``; the report gives the median over rounds
and the min-max of the round medians. The number of ATen operator calls of one step is counted with a
``TorchDispatchMode`` (deterministic, load-independent).

Usage::

    python benchmarks/bench_step_overhead.py               # ~1 minute
    python benchmarks/bench_step_overhead.py --rounds 9 --steps 400

Writes ``benchmarks/results/bench_step_overhead.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
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
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_soaa import ASGO, SOAA, ShardedAdamW

log = logging.getLogger("bench_step_overhead")

BASE = "adamw_foreach"


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 48),
                               torch.nn.Tanh(), torch.nn.Linear(48, 10))


def _optimizers() -> dict[str, tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]]:
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) * 1e-2 for p in _mlp().parameters()]
    makers: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
        "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "adamw_default": lambda ps: torch.optim.AdamW(ps, lr=1e-3),  # on CPU: the per-tensor loop
        "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "soaa": lambda ps: SOAA(ps, lr=1e-3, total_steps=10_000),
        "sharded_adamw": lambda ps: ShardedAdamW(ps, lr=1e-3),
        "asgo": lambda ps: ASGO(ps, lr=1e-3),
    }
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


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.n += 1
        return func(*args, **(kwargs or {}))


def _aten_calls(step: Callable[[], Any]) -> int:
    with _CountOps() as counter:
        step()
    return counter.n


def _plot(cpu: dict[str, list[list[float]]], summary: dict[str, Any], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(cpu)
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    ax[0].boxplot([[t * 1e6 for r in cpu[k] for t in r] for k in names], showfliers=False)
    ax[0].set_xticks(range(1, len(names) + 1), names, rotation=15)
    ax[0].set_ylabel("CPU time per step() [µs]")
    ax[0].set_title(title, fontsize=9)
    ratios = [summary[k]["ratio"] for k in names]
    ax[1].bar(names, ratios)
    ax[1].errorbar(names, ratios, yerr=[[r - summary[k]["ratio_round_min"] for k, r in zip(names, ratios)],
                                        [summary[k]["ratio_round_max"] - r for k, r in zip(names, ratios)]],
                   fmt="none", color="k", capsize=3)
    ax[1].axhline(1.5, color="r", ls="--", lw=0.8, label="goal 1.5x")
    ax[1].set_ylabel(f"CPU time / {BASE} (median of rounds)")
    ax[1].tick_params(axis="x", rotation=15)
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="timed steps per optimizer and round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    opts = _optimizers()
    steps = {k: _stepper(o) for k, (o, _) in opts.items()}
    names = list(steps)
    for _ in range(args.warmup):
        for k in names:
            steps[k]()
    aten = {k: _aten_calls(steps[k]) for k in names}
    cpu: dict[str, list[list[float]]] = {k: [] for k in names}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        for k in names:
            cpu[k].append([])
        for i in range(args.steps):
            j = i % len(names)
            for k in names[j:] + names[:j]:
                c0 = time.process_time()
                steps[k]()
                cpu[k][r].append(time.process_time() - c0)
    summary: dict[str, Any] = {}
    for k in names:
        med = [statistics.median(x) * 1e6 for x in cpu[k]]
        ratio = [statistics.median(x) / statistics.median(b) for x, b in zip(cpu[k], cpu[BASE])]
        summary[k] = {"median_us": statistics.median(med), "round_medians_us": med,
                      "ratio": statistics.median(ratio), "ratio_round_min": min(ratio),
                      "ratio_round_max": max(ratio), "aten_calls_per_step": aten[k]}
        log.info("%-14s CPU %7.1f µs (rounds %.1f-%.1f)  / %s %.2fx (rounds %.2f-%.2f)  ATen calls %d", k,
                 summary[k]["median_us"], min(med), max(med), BASE, summary[k]["ratio"], min(ratio),
                 max(ratio), aten[k])
    n_params = sum(p.numel() for p in opts[BASE][1])
    result = {
        "benchmark": "bench_step_overhead", "params": n_params, "model": "MLP 20-64-48-10 (tanh)",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "steps_per_round": args.steps, "rounds": args.rounds, "wall_s": time.perf_counter() - t0,
        "baseline": BASE, "summary_cpu_time": summary,
        "goal": "SOAA W=1 step <= 1.5x torch AdamW on a small MLP",
    }
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_step_overhead.json").write_text(json.dumps(result, indent=2))
    title = f"{n_params} params, 1 thread, {args.rounds} rounds x {args.steps} steps, CPU time"
    _plot(cpu, summary, title, out_dir / "bench_step_overhead.png")
    log.info("wrote %s", out_dir / "bench_step_overhead.json")


if __name__ == "__main__":
    main()
