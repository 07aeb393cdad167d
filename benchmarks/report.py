"""The optimizer report: validation loss against CPU time and steps, time-to-target ratios, step cost
against the machine's bandwidth bound, and optimizer state per rank against the world size.

One command::

    python benchmarks/report.py                   # ~15-25 minutes on an idle 2-core CPU (2 jobs)
    python benchmarks/report.py --quick           # smoke run, < 1 minute, into runs/report_quick
    python benchmarks/report.py --readme README.md  # also rewrites the README's headline section

Writes ``report.md``, ``report.json`` and ``report_*.png`` to ``--out`` (default ``benchmarks/results``).

Method (the report repeats it): the workloads and optimizers of :mod:`report_runs`; every optimizer
runs its lr grid with seed 0; AdamW's best lr is the one with the lowest final validation loss of that
seed, every other optimizer's the one whose seed-0 run reaches the target in the fewest steps (what the
table scores; ties and runs that never reach it by the final loss), and seeds 1..S-1 run at it; curves
are averaged over the seeds. The target of a
workload is torch ``AdamW(fused=True)``'s mean final validation loss at its best lr; steps and CPU time
to the target are read off the seed-mean curve (validation every ``eval_every`` steps, so a crossing is
known to that resolution). HeavyBall's optimizers run when ``heavyball`` imports
(``pip install --no-deps heavyball opt-einsum``); otherwise the report says so and skips them.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import logging
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, imported as modules

import report_runs as R  # noqa: E402
from _timing import median_cpu_s  # noqa: E402

log = logging.getLogger("report")
RESULTS = Path(__file__).resolve().parent / "results"
#: where a --quick smoke run writes unless given --out: not over the committed report (runs/ is git-ignored)
QUICK_OUT = Path(__file__).resolve().parent.parent / "runs" / "report_quick"
QUICK_OPTIMIZERS = ("AdamW", "SOAA", "EGN")
COLORS = {"AdamW": "tab:blue", "SOAA": "tab:orange", "ASGO": "tab:red", "ASGO-parts": "tab:pink",
          "ASGO-r4": "darkred", "EGN": "tab:green",
          "EGN-m": "tab:olive", "Muon": "tab:purple", "Muon-split": "tab:cyan", "SOAP": "tab:brown", "PSGD": "tab:gray"}
#: bytes read and written per parameter by one fp32 step at best (see bench_soaa_step's docstring:
#: fused AdamW reads θ, g, m, v and writes θ, m, v; SOAA's C loops on CPU: the sums pass reads g, m
#: (8 B), the step reads θ, g, m, v and writes θ, m, v (28 B); see lightning_soaa/kernels/soaa_cpu.c)
BYTES_PER_PARAM = {"adamw_fused": 28, "soaa": 36}
README_BEGIN, README_END = "<!-- report:begin -->", "<!-- report:end -->"
#: the invocation of a run record written before records named theirs
UNRECORDED = "unrecorded"


# -------------------------------------------------------------------------------------------- tuning
def _key(task: tuple[str, str, float, int], quick: bool) -> str:
    return json.dumps([*task, quick])


def _pool_map(tasks: list[tuple[str, str, float, int]], quick: bool, jobs: int) -> Iterator[dict[str, Any]]:
    """Yields the runs as they finish; ``jobs`` single-thread processes in parallel."""
    if jobs <= 1:
        yield from (R.run_one(*t, quick) for t in tasks)
        return
    order = sorted(tasks, key=lambda t: t[0] != "chars")  # the long runs first
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from (f.result() for f in cf.as_completed([pool.submit(R.run_one, *t, quick) for t in order]))


def _run_all(tasks: list[tuple[str, str, float, int]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (workload, optimizer, lr, seed), each appended to ``report_runs.jsonl`` as it finishes; with
    ``--resume`` the runs already in that file are not run again."""
    cache_file = args.out / "report_runs.jsonl"
    done: dict[str, dict[str, Any]] = {}
    if args.resume and cache_file.exists():
        for line in cache_file.read_text().splitlines():
            r = json.loads(line)
            done[_key((r["workload"], r["optimizer"], r["lr"], r["seed"]), r["quick"])] = r
    todo = [t for t in tasks if _key(t, args.quick) not in done]
    with cache_file.open("a") as f:
        for n, r in enumerate(_pool_map(todo, args.quick, args.jobs), 1):
            r["quick"] = args.quick
            r["measured"] = _now()
            r["invocation"] = args.invocation
            done[_key((r["workload"], r["optimizer"], r["lr"], r["seed"]), args.quick)] = r
            f.write(json.dumps(r) + "\n")
            f.flush()
            log.info("[%d/%d] %s %s lr=%g seed=%d: final val %.4f%s", n, len(todo), r["workload"], r["optimizer"],
                     r["lr"], r["seed"], r["final"], f" ERROR {r['error']}" if "error" in r else "")
    return [done[_key(t, args.quick)] for t in tasks]


def _grid(opt: str, quick: bool) -> tuple[float, ...]:
    return R.LR_GRID[opt][1:3] if quick else R.LR_GRID[opt]


def tune(workloads: list[str], optimizers: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Seed 0 over each lr grid, then seeds 1..S-1 at each optimizer's best lr (:func:`best_lr`: AdamW's
    first, since its seeds set the target the others' lrs are picked by); returns every run."""
    grids = {o: _grid(o, args.quick) for o in optimizers}
    first = [(w, o, lr, 0) for w in workloads for o in optimizers if R.applies(o, w) for lr in grids[o]]
    runs = _run_all(first, args)
    runs += _run_all([t for w in workloads for t in _more_seed_tasks(runs, w, ["AdamW"], None, args.seeds)], args)
    others = [o for o in optimizers if o != "AdamW"]
    return runs + _run_all([t for w in workloads
                            for t in _more_seed_tasks(runs, w, others, _target(runs, w), args.seeds)], args)


def _more_seed_tasks(runs: list[dict[str, Any]], w: str, optimizers: list[str], target: float | None,
                     seeds: int) -> list[tuple[str, str, float, int]]:
    tasks = []
    for o in optimizers:
        seed0 = [r for r in runs if r["workload"] == w and r["optimizer"] == o and r["seed"] == 0]
        if seed0:
            tasks += [(w, o, best_lr(seed0, None if o == "AdamW" else target), s) for s in range(1, seeds)]
    return tasks


def _target(runs: list[dict[str, Any]], w: str) -> float | None:
    """AdamW's mean final validation loss at its best lr on ``w`` (None without AdamW's runs)."""
    mine = [r for r in runs if r["workload"] == w and r["optimizer"] == "AdamW"]
    seed0 = [r for r in mine if r["seed"] == 0]
    if not seed0:
        return None
    best = best_lr(seed0, None)
    return statistics.fmean(r["final"] for r in mine if r["lr"] == best)


def best_lr(seed0: list[dict[str, Any]], target: float | None) -> float:
    """The lr of the seed-0 runs ``seed0`` that reaches ``target`` in the fewest steps (what the table
    scores; a tie, or no run reaching it, goes to the lowest final validation loss). ``target=None``
    (AdamW, whose own runs set the target): the lowest final validation loss.

    Why steps and not the final loss alone: an lr whose run ends a little lower can reach the target
    much later (turn 29: ASGO-parts at 0.01 ended 1.759 against 1.773 at 0.03, which got there in 225
    steps instead of ~250), and the table then scored the slower one. Steps, not CPU time: at one lr
    grid a step costs the same, and steps carry no timing noise."""
    def key(r: dict[str, Any]) -> tuple[bool, float, float]:
        hit = _first_reach(r, target) if target is not None and math.isfinite(target) else None
        # a run that got there and then diverged (final inf) is not a candidate ahead of one that finished
        return (not math.isfinite(r["final"]), hit[0] if hit else math.inf, r["final"])

    return float(min(seed0, key=key)["lr"])


# ------------------------------------------------------------------------------------------ analysis
def _mean_curve(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Seed-mean validation loss and CPU time at each validation step (a diverged seed counts as inf)."""
    n = max(len(r["step"]) for r in runs)
    longest = max(runs, key=lambda r: len(r["step"]))
    val, cpu = [], []
    for i in range(n):
        val.append(statistics.fmean(r["val"][i] if i < len(r["val"]) else math.inf for r in runs))
        cpu.append(statistics.fmean(r["cpu_s"][i] for r in runs if i < len(r["cpu_s"])))
    return {"step": longest["step"], "cpu_s": cpu, "val": val}


def _first_reach(curve: dict[str, list[float]], target: float) -> tuple[int, float] | None:
    for s, c, v in zip(curve["step"], curve["cpu_s"], curve["val"]):
        if v <= target * (1 + 1e-12):
            return s, c
    return None


def summarise(runs: list[dict[str, Any]], w: str, optimizers: list[str]) -> dict[str, Any]:
    """Per optimizer of workload ``w``: best lr, seed runs, mean curve, final loss, time to target."""
    rows: dict[str, Any] = {}
    target = _target(runs, w) if "AdamW" in optimizers else None
    for o in optimizers:
        mine = [r for r in runs if r["workload"] == w and r["optimizer"] == o]
        if not mine:
            continue
        seed0 = [r for r in mine if r["seed"] == 0]
        best = best_lr(seed0, None if o == "AdamW" else target)
        at_best = [r for r in mine if r["lr"] == best]
        finals = [r["final"] for r in at_best]
        lrs = sorted(r["lr"] for r in seed0)
        rows[o] = {"best_lr": best, "lr_at_edge": len(lrs) > 2 and best in (lrs[0], lrs[-1]),
                   "grid": {r["lr"]: r["final"] for r in seed0}, "seeds": len(at_best),
                   "final_mean": statistics.fmean(finals),
                   "final_sd": statistics.stdev(finals) if len(finals) > 1 and math.isfinite(sum(finals)) else 0.0,
                   "ms_per_step": statistics.fmean(r.get("ms_per_step", math.nan) for r in at_best),
                   "errors": sorted({r["error"] for r in mine if "error" in r}),
                   "curve": _mean_curve(at_best), "finals": finals}
    for o, row in rows.items():
        hit = _first_reach(row["curve"], target) if target is not None and math.isfinite(target) else None
        row["to_target"] = {"steps": hit[0], "cpu_s": hit[1]} if hit else None
        row["seeds_reaching"] = sum(_first_reach(r, target) is not None for r in runs if target is not None
                                    and r["workload"] == w and r["optimizer"] == o and r["lr"] == row["best_lr"])
    base = rows.get("AdamW", {}).get("to_target")
    for row in rows.values():
        t = row["to_target"]
        row["ratio_steps"] = t["steps"] / base["steps"] if t and base else None
        row["ratio_cpu"] = t["cpu_s"] / base["cpu_s"] if t and base and base["cpu_s"] > 0 else None
    return {"target": target, "rows": rows}


# ------------------------------------------------------------------------------- step cost, state
def stream_bandwidth(numel: int = 16 * 2**20, reps: int = 10) -> dict[str, float]:
    """GB/s of two streaming kernels over fp32 buffers of ``numel`` elements (64 MiB by default), 1
    thread, median CPU time (as the step times): ``dst.copy_(src)`` counted as 8 B/element (its
    destination is also read for write-allocate, so this under-reports), and the in-place ``a.add_(b)``,
    12 B/element, the access pattern of an optimizer step (every line written was read first): the bound."""
    a, b = torch.randn(numel), torch.randn(numel)
    out = {"buffer_mib": 4 * numel / 2**20}
    for name, fn, nbytes in (("copy_gb_s", lambda: a.copy_(b), 8), ("inplace_add_gb_s", lambda: a.add_(b), 12)):
        out[name] = nbytes * numel / median_cpu_s(fn, reps) / 1e9
    return out


def step_cost(quick: bool) -> dict[str, Any]:
    """SOAA's and fused AdamW's step on 10 x 1000x1000 fp32 (CPU time, interleaved rounds, through
    bench_soaa_step's functions) against params x bytes/param / copy bandwidth."""
    import bench_soaa_step as B

    count, shape = (4, (256, 256)) if quick else (10, (1000, 1000))
    args = argparse.Namespace(with_sharded_adamw=False, warmup=3, rounds=1 if quick else 5,
                              steps=3 if quick else 20)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(shape, generator=g) * 1e-3 for _ in range(count)]
    opts = B._optimizers(args, lambda: B._params(shape, count, torch.float32, torch.device("cpu"), grads))
    opts = {k: opts[k] for k in BYTES_PER_PARAM}
    _, cpu = B._timed_rounds(opts, args, lambda: None)
    summary = B._summary(cpu)
    bw = stream_bandwidth(2**20 if quick else 16 * 2**20)
    params = count * shape[0] * shape[1]
    rows = {}
    for k, s in summary.items():
        bound_ms = 1e3 * params * BYTES_PER_PARAM[k] / (bw["inplace_add_gb_s"] * 1e9)
        rows[k] = {"median_ms": s["median_ms"], "ratio_to_adamw_fused": s["ratio_to_adamw_fused"],
                   "round_ratio_range": [s["ratio_round_min"], s["ratio_round_max"]],
                   "bytes_per_param": BYTES_PER_PARAM[k], "bound_ms": bound_ms,
                   "over_bound": s["median_ms"] / bound_ms}
    return {"params": params, "shape": list(shape), "count": count, **bw, "rounds": args.rounds,
            "steps_per_round": args.steps, "rows": rows}


def train_step_costs(summaries: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Per workload: every optimizer's training step at its best lr, timed in interleaved rounds in this
    process (:func:`report_runs.interleaved_step_ms`), as a ratio to AdamW's step in the same round, and
    the time to target at that cost (its steps to target x its median ms per step, over AdamW's)."""
    rounds = 2 if quick else 7
    out: dict[str, Any] = {}
    for w, s in summaries.items():
        best = {o: row["best_lr"] for o, row in s["rows"].items() if not row["errors"]}
        if "AdamW" not in best:
            continue
        # ~0.1-0.3 s a round per optimizer: the long steps of the language model get fewer of them
        steps = 3 if quick else (8 if w == "chars" else 20)
        per_round = R.interleaved_step_ms(w, best, quick, rounds, steps)
        base = per_round["AdamW"]
        t_base = s["rows"]["AdamW"]["to_target"]
        rows = {}
        for o, ms in per_round.items():
            ratios = [x / b for x, b in zip(ms, base)]
            t = s["rows"][o]["to_target"]
            med = statistics.median(ms)
            rows[o] = {"ms_per_step": med, "round_ms": ms, "ratio": statistics.median(ratios),
                       "ratio_range": [min(ratios), max(ratios)],
                       "time_to_target_ratio": (t["steps"] * med) / (t_base["steps"] * statistics.median(base))
                       if t and t_base else None}
        out[w] = {"rounds": rounds, "steps_per_round": steps, "rows": rows}
    return out


def state_per_rank(quick: bool) -> dict[str, Any]:
    """Largest rank's optimizer state at W over W = 1 (bench_state_per_rank's measurement, gloo)."""
    import bench_state_per_rank as S

    args = argparse.Namespace(n=10, rows=64 if quick else 1000, cols=64 if quick else 1000,
                              # the optimizers' own (automatic) block size; the quick run's small matrices
                              # would stay whole under its 2**18 floor
                              max_block_numel=1024 if quick else None,
                              optimizers=list(S.OPTIMIZERS))
    worlds = (1, 2) if quick else (1, 2, 4)
    per_world = {w: S.run_world(w, args) for w in worlds}
    base = per_world[1][0]
    return {"matrices": f"{args.n} x {args.rows}x{args.cols} fp32", "max_block_numel": args.max_block_numel,
            "worlds": list(worlds),
            "bytes_w1": base,
            "max_rank_over_w1": {o: {w: max(r[o] for r in ranks) / base[o] for w, ranks in per_world.items()}
                                 for o in args.optimizers if base[o]}}


# ------------------------------------------------------------------------------------------- plots
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw(ax: Any, summary: dict[str, Any], x: str, title: str) -> None:
    for o, row in summary["rows"].items():
        c = row["curve"]
        pts = [(a, v) for a, v in zip(c[x], c["val"]) if math.isfinite(v)]
        if pts:
            ax.plot(*zip(*pts), label=f"{o} (lr {row['best_lr']:g})", color=COLORS.get(o))
    if summary["target"] is not None and math.isfinite(summary["target"]):
        ax.axhline(summary["target"], color="k", ls=":", lw=0.8, label="target (AdamW final)")
    ax.set_yscale("log")
    ax.set_xlabel("CPU seconds (training only)" if x == "cpu_s" else "step")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def plot_workload(summary: dict[str, Any], w: str, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    _draw(ax[0], summary, "step", f"{w}: validation loss vs step")
    _draw(ax[1], summary, "cpu_s", f"{w}: validation loss vs CPU time (1 thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_headline(summaries: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(1, len(summaries), figsize=(5.5 * len(summaries), 4.2), squeeze=False)
    for a, (w, s) in zip(ax[0], summaries.items()):
        _draw(a, s, "cpu_s", f"{w}: validation loss vs CPU time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- markdown
def _f(x: Any, spec: str = ".3g") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _ratio(r: float | None) -> str:
    return f" ({r:.2f}x)" if r is not None else ""


def headline_table(summaries: dict[str, Any], train_step: dict[str, Any] | None = None) -> list[str]:
    train_step = train_step or {}
    out = ["| workload | optimizer | best lr | final val loss (mean ± sd) | seeds reaching target | "
           "steps to target (x AdamW) | CPU s to target (x AdamW) | ms / step | time to target at the "
           "interleaved step cost (x AdamW) ‡ |",
           "|---|---|---|---|---|---|---|---|---|"]
    for w, s in summaries.items():
        for o, row in s["rows"].items():
            t = row["to_target"]
            steps = f"{t['steps']}{_ratio(row['ratio_steps'])}" if t else "not reached"
            cpu = f"{t['cpu_s']:.3g}{_ratio(row['ratio_cpu'])}" if t else "not reached"
            edge = " †" if row["lr_at_edge"] else ""
            inter = train_step.get(w, {}).get("rows", {}).get(o, {}).get("time_to_target_ratio")
            out.append(f"| {w} | {o} | {row['best_lr']:g}{edge} | {_f(row['final_mean'], '.4f')} ± "
                       f"{_f(row['final_sd'], '.4f')} | {row['seeds_reaching']}/{row['seeds']} | {steps} | {cpu} "
                       f"| {_f(row['ms_per_step'], '.2f')} | {'' if inter is None else f'{inter:.2f}x'} |")
    return out + ["", "† the best lr is at an end of the optimizer's lr grid: it may do better outside it.",
                  "‡ steps to target x the optimizer's training step (batch, forward, backward, `step()`) timed "
                  "in interleaved rounds in one process, over AdamW's: the tuning runs' own CPU times move "
                  "with the machine's load from run to run (see 'Training-step cost, interleaved' in the report). "
                  "On the small workloads (a training step of 0.3-1 ms) where the models and optimizers sit in "
                  "memory still moves a step by up to ~20%: read ratios within 0.8-1.2 there as ties."]


def _train_step_md(ts: dict[str, Any]) -> list[str]:
    out = ["Every optimizer's training step (batch, forward, backward, `step()`) at its best lr, timed in "
           "one process in interleaved rounds (each round times every optimizer's steps in turn), CPU time, "
           "1 thread; ratios to AdamW's step in the same round (median and range over the rounds). On the "
           "small workloads read ratios within 0.8-1.2 as ties: one run on `lstsq` (turn 13) measured SOAA's "
           "training step at 0.94-1.02x or 1.18-1.31x AdamW's depending on which model and optimizer were "
           "built first; the same comparison later (turn 14, 4 runs per order, gc on or frozen) gave 0.98-1.00x "
           "in both orders, and two full reports of the same code put SOAA's digits ratio at 0.92x and 1.06x.",
           "",
           "| workload | optimizer | rounds x steps | ms / step (median) | x AdamW (round range) | "
           "time to target at this cost (x AdamW) |", "|---|---|---|---|---|---|"]
    for w, t in ts.items():
        for o, r in t["rows"].items():
            lo, hi = r["ratio_range"]
            ttt = r["time_to_target_ratio"]
            out.append(f"| {w} | {o} | {t['rounds']} x {t['steps_per_round']} | {r['ms_per_step']:.2f} | "
                       f"{r['ratio']:.2f} ({lo:.2f}-{hi:.2f}) | {'not reached' if ttt is None else f'{ttt:.2f}x'} |")
    return out


def _grid_table(s: dict[str, Any]) -> list[str]:
    out = ["| optimizer | final val loss of seed 0 at each lr of its grid | errors |", "|---|---|---|"]
    for o, row in s["rows"].items():
        grid = ", ".join(f"{lr:g}: {_f(v, '.4f')}" for lr, v in sorted(row["grid"].items()))
        out.append(f"| {o} | {grid} | {'; '.join(row['errors']) or ''} |")
    return out


def _step_cost_md(sc: dict[str, Any]) -> list[str]:
    out = [f"{sc['count']} x {sc['shape'][0]}x{sc['shape'][1]} fp32 parameters with fixed gradients "
           f"({sc['params'] / 1e6:.1f}M), `step()` alone, CPU time, {sc['rounds']} interleaved rounds x "
           f"{sc['steps_per_round']} steps, medians (`bench_soaa_step.py`'s functions). Bandwidth of this "
           f"machine, fp32, 1 thread, {sc['buffer_mib']:.0f} MiB buffers: in-place `a.add_(b)` "
           f"**{sc['inplace_add_gb_s']:.1f} GB/s** "
           f"(12 B/element: the in-place pattern of an optimizer step), `dst.copy_(src)` "
           f"{sc['copy_gb_s']:.1f} GB/s (8 B/element counted; write-allocate makes it slower). The bound is "
           "params x bytes/param / the in-place bandwidth.", "",
           "| step | median ms | x fused AdamW (round range) | bytes / param | bound ms | x bound |",
           "|---|---|---|---|---|---|"]
    for k, r in sc["rows"].items():
        lo, hi = r["round_ratio_range"]
        out.append(f"| {k} | {r['median_ms']:.2f} | {r['ratio_to_adamw_fused']:.2f} ({lo:.2f}-{hi:.2f}) | "
                   f"{r['bytes_per_param']} | {r['bound_ms']:.2f} | {r['over_bound']:.2f} |")
    traffic = BYTES_PER_PARAM["soaa"] / BYTES_PER_PARAM["adamw_fused"]
    return out + ["", "A step below 1.00x the bound streams faster than the in-place `add_` (more streams in flight "
                  "per thread): one thread's streaming bandwidth is a reference here, not a hard limit. The "
                  f"traffic-bound ratio of SOAA to fused AdamW is {BYTES_PER_PARAM['soaa']}/"
                  f"{BYTES_PER_PARAM['adamw_fused']} B = {traffic:.2f}x."]


def _state_md(st: dict[str, Any]) -> list[str]:
    ws = st["worlds"]
    out = [f"Largest rank's optimizer state at W / at W = 1, {st['matrices']} (`bench_state_per_rank.py`, "
           f"gloo processes, `max_block_numel` = {st['max_block_numel'] or 'automatic'}); ideal 1/W.", "",
           "| optimizer | state at W = 1 (MiB) | " + " | ".join(f"W = {w}" for w in ws) + " |",
           "|---|---|" + "---|" * len(ws)]
    for o, by_w in st["max_rank_over_w1"].items():
        cells = " | ".join(f"{by_w[w]:.2f}" for w in ws)
        label = "ShardedAdamW" if o == "AdamW" else o  # bench_state_per_rank's "AdamW" is the package's
        out.append(f"| {label} | {st['bytes_w1'][o] / 2**20:.1f} | {cells} |")
    return out


def _cpu() -> str:
    """The CPU's model and whether it multiplies bf16 in hardware (AMX, AVX512-BF16): torch Muon's
    Newton-Schulz runs in bf16, so its time moves with that more than any other optimizer's (on a CPU
    without it Muon's digits step measured ~10x slower in this report: 31.9 against 3.3 ms)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.machine())
    flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return f"{model}; bf16 matmuls in hardware: {', '.join(bf16) or 'no'}"


def _provenance(meta: dict[str, Any]) -> str:
    return (f"Measured {meta['date']} on a {meta['cpu_count']}-core CPU ({meta.get('cpu', 'model not recorded')}) "
            "shared with other jobs "
            f"(load average {meta['load_start'][0]:.1f} at the start, {meta['load_end'][0]:.1f} at the end): "
            f"**CPU time of the process (`time.process_time`), 1 torch thread per run**, {meta['jobs']} run(s) "
            f"in parallel ({meta['training_runs']} training runs, {meta['training_cpu_s'] / 60:.1f} CPU minutes of "
            f"training steps in all); torch {meta['torch']}, {meta['heavyball']}. Absolute times on other machines "
            "will differ; " + _same_run(meta))


def _same_run(meta: dict[str, Any]) -> str:
    """Whether the ratios compare runs of one invocation (one machine load). Decided by the invocation
    ids the runs record, not by their finish times: those have minute resolution, so two invocations can
    share a span, and one invocation's optimizers finish at different minutes. A run without an id
    (written before ids were recorded) cannot be shown to belong to this invocation."""
    ids = meta.get("invocations", [UNRECORDED])
    if not meta["resumed"] or (len(ids) == 1 and ids[0] != UNRECORDED):
        return "the ratios are taken within this one run."
    when = "; ".join(f"{o}: {t}" for o, t in meta["measured"].items())
    which = "different" if UNRECORDED not in ids else "different or unrecorded"
    return (f"the runs were trained in {which} invocations (`--resume`: {when}), so ratios between "
            "optimizers of different invocations also carry the change in the machine's load.")


def _more_seeds(seeds: int) -> str:
    if seeds == 1:
        return "no other seed is run (1 seed)"
    return f"seeds 1..{seeds - 1} then run at it, and the curves are averaged over the {seeds} seeds"


def _method(args: argparse.Namespace, optimizers: list[str]) -> list[str]:
    grids = "; ".join(f"{o} {', '.join(f'{lr:g}' for lr in _grid(o, args.quick))}"
                      for o in optimizers)
    ws = [R.quick(R.WORKLOADS[w]) if args.quick else R.WORKLOADS[w] for w in args.workloads]
    return [
        "Workloads (plain torch loops, no Lightning): " + "; ".join(
            f"`{w.name}` {w.steps} steps, batch {w.batch}, validation every {w.eval_every}"
            + (", 10% warm-up + cosine to 0.1x" if w.warmup_cosine else ", constant lr") for w in ws)
        + ". `digits`: the demo tanh MLP 64-128-128-10 (cross-entropy); `lstsq`: linear least squares, "
        "32 -> 4, input condition number 100; `chars`: the demo character transformer (d_model 64, 2 layers, "
        "context 64) on `pydoc_data.topics`. EGN runs on `digits` and `lstsq` only (per-sample Jacobians): as "
        "`EGN` with the README's settings (initial damping λ₀ = 1, line search) and as `EGN-m` with λ₀ = 0.3 "
        "and momentum 0.8 (line search), picked from a 12-point grid of (lr, λ₀, momentum) on these two "
        "workloads, 3 seeds (`report_runs.EGN_SETTINGS`): tuned on what it is scored on, as every lr grid is.",
        "",
        f"Tuning: lr grids — {grids}. AdamW's best lr is the one with the lowest final validation loss **of "
        "seed 0** (its seeds then set the target); every other optimizer's is the one whose **seed-0** run "
        "reaches the target in the fewest steps, the quantity the table scores (ties, and grids where no "
        f"run reaches it, by the lowest final loss); {_more_seeds(args.seeds)}. "
        "Weight decay 0 for every optimizer, other hyperparameters at "
        "each optimizer's defaults "
        "(SOAA gets `total_steps` = the run's length; ASGO's default `nesterov=True` preconditions Muon's "
        "Nesterov direction, `nesterov=False` is the paper's rule). Muon: `torch.optim.Muon` on the matrices (its "
        "Newton-Schulz in bf16: fast on a CPU with bf16 matrix units such as Intel AMX, emulated and slow "
        "without them) with AdamW for "
        "embeddings, norms and biases, as in `bench_asgo.py`. HeavyBall runs eager (`compile_mode=None`). "
        "Three more rows on `chars` only: `ASGO-parts`, ASGO with each fused QKV projection stepped as its three "
        "matrices (`asgo_param_groups(model, fused={\"qkv.weight\": 3})`, ASGO's `row_parts`: the official "
        "ASGO model has separate Q, K and V projections); `ASGO-r4`, ASGO-parts with its roots every "
        "4 steps, `root_every=4` (`report_runs.ASGO_R4`, picked by a study on this workload: "
        "tuned on what it is scored on, as EGN-m is); and `Muon-split`, the same Muon on the model with "
        "each fused `qkv` Linear(d, 3d) split into three Linear(d, d) (`report_runs.SplitLinear`: the same "
        "function at initialisation), so that Muon too orthogonalises Q, K and V apart and the comparison "
        "with ASGO-parts is fair.",
        "",
        "Target: fused AdamW's mean final validation loss at its best lr. Steps and CPU time to the target "
        "are read off the seed-mean curve (to the resolution of the validation cadence); 'seeds reaching' "
        "counts the single seeds whose own curve gets there. The time axis counts training steps only "
        "(batch, forward, backward, `step()`), after an untimed 3-step warm-up of each optimizer per process.",
    ]


def write_markdown(rep: dict[str, Any], args: argparse.Namespace, out: Path) -> None:
    summaries, meta = rep["summaries"], rep["meta"]
    md = ["# Optimizer report" + (" (--quick: a smoke run, not a measurement)" if args.quick else ""), "",
          _provenance(meta), "", f"Command: `{meta['command']}` ({meta['wall_s'] / 60:.1f} min wall).", "",
          "## Method", "", *_method(args, rep["optimizers"]), ""]
    if meta["resumed"]:
        md[6:6] = ["The training runs were read back from an earlier invocation's `report_runs.jsonl` "
                   "(`--resume`); the wall time above is this invocation's.", ""]
    if meta["heavyball_missing"]:
        md += [f"**HeavyBall is not installed** ({meta['heavyball_missing']}): the SOAP and PSGD rows are "
               "skipped. `pip install --no-deps heavyball opt-einsum` adds them.", ""]
    md += ["## Time to AdamW's validation loss", "", "![validation loss vs CPU time](report_headline.png)", "",
           *headline_table(summaries, rep.get("train_step")), ""]
    if rep.get("train_step"):
        md += ["## Training-step cost, interleaved", "", *_train_step_md(rep["train_step"]), ""]
    for w, s in summaries.items():
        md += [f"## {w}", "", f"Target (AdamW's mean final validation loss): {_f(s['target'], '.4f')}.", "",
               f"![{w}](report_{w}.png)", "", *_grid_table(s), ""]
    if rep.get("step_cost"):
        md += ["## Step cost against the bandwidth bound", "", *_step_cost_md(rep["step_cost"]), ""]
    if rep.get("state_per_rank"):
        md += ["## Optimizer state per rank vs W", "", *_state_md(rep["state_per_rank"]), ""]
    (out / "report.md").write_text("\n".join(md))


def update_readme(readme: Path, rep: dict[str, Any], out: Path) -> None:
    """Replaces the README's text between the report markers with the headline plot and table."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"Invalid --readme={str(readme)!r}: it has no {README_BEGIN} ... {README_END} section.")
    rel = Path(os.path.relpath(out, readme.resolve().parent)).as_posix()
    block = [README_BEGIN, "", _provenance(rep["meta"]), "",
             f"![validation loss vs CPU time]({rel}/report_headline.png)", "",
             *headline_table(rep["summaries"], rep.get("train_step")),
             "", f"The whole report, with the method, lr grids, step cost and state per rank: [{rel}/report.md]"
             f"({rel}/report.md).", "", README_END]
    head, _, rest = text.partition(README_BEGIN)
    readme.write_text(head + "\n".join(block) + rest.partition(README_END)[2])


def _invocation_id() -> str:
    """Names this invocation in every run it trains (start time to the second and a random suffix, so
    two invocations started in the same second still differ)."""
    start = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{start}-{uuid.uuid4().hex[:8]}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _measured(runs: list[dict[str, Any]]) -> dict[str, str]:
    """When each optimizer's runs were trained (``--resume`` mixes invocations): first-last time."""
    by_opt: dict[str, list[str]] = {}
    for r in runs:
        by_opt.setdefault(r["optimizer"], []).append(r.get("measured", "an earlier invocation (time not recorded)"))
    return {o: (min(ts) if min(ts) == max(ts) else f"{min(ts)} to {max(ts)}") for o, ts in by_opt.items()}


def _meta(args: argparse.Namespace, t0: float, load0: tuple[float, ...], runs: list[dict[str, Any]]
          ) -> dict[str, Any]:
    missing = R.heavyball_status()
    hb = "HeavyBall not installed" if missing else "HeavyBall " + _version("heavyball")
    return {"date": _now(), "measured": _measured(runs),
            "invocations": sorted({r.get("invocation", UNRECORDED) for r in runs}),
            "cpu_count": os.cpu_count(), "cpu": _cpu(), "platform": platform.platform(), "torch": torch.__version__,
            "heavyball": hb, "heavyball_missing": missing, "jobs": args.jobs, "seeds": args.seeds,
            "quick": args.quick, "load_start": list(load0), "load_end": list(os.getloadavg()),
            "wall_s": time.perf_counter() - t0, "resumed": args.resume, "training_runs": len(runs),
            "training_cpu_s": sum(r["cpu_s"][-1] for r in runs),
            "command": "python benchmarks/report.py " + " ".join(map(_portable, sys.argv[1:]))}


def _portable(arg: str) -> str:
    """A command-line argument as the report may print it: an absolute path (a path of this machine)
    relative to the repository when it is inside it, else only its last component."""
    if not os.path.isabs(arg):
        return arg
    root = Path(__file__).resolve().parent.parent
    path = Path(arg).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else f"<...>/{path.name}"


def _version(pkg: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "(version unknown)"


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: few steps, 1 seed, 2 lrs, 3 optimizers")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default benchmarks/results; --quick: runs/report_quick)")
    p.add_argument("--seeds", type=int, default=None, help="seeds at the best lr (default 3; --quick 1)")
    p.add_argument("--jobs", type=int, default=None, help="runs in parallel (default 2; --quick 1)")
    p.add_argument("--workloads", nargs="+", default=list(R.WORKLOADS), choices=list(R.WORKLOADS))
    p.add_argument("--optimizers", nargs="+", default=None, choices=list(R.OPTIMIZERS))
    p.add_argument("--skip-step-cost", action="store_true")
    p.add_argument("--skip-state", action="store_true")
    p.add_argument("--resume", action="store_true", help="reuse the runs in --out's report_runs.jsonl")
    p.add_argument("--readme", type=Path, default=None, help="rewrite this README's report section")
    args = p.parse_args(argv)
    if args.quick and args.readme and args.out is None:
        p.error("--quick --readme would point the README at runs/report_quick (not committed): give --out")
    args.out = args.out or (QUICK_OUT if args.quick else RESULTS)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.jobs = args.jobs or (1 if args.quick else 2)
    args.invocation = _invocation_id()
    if args.optimizers is None:
        args.optimizers = list(QUICK_OPTIMIZERS if args.quick else R.OPTIMIZERS)
    return args


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    t0, load0 = time.perf_counter(), os.getloadavg()
    optimizers = [o for o in args.optimizers if o not in R.HEAVYBALL or not R.heavyball_status()]
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        (args.out / "report_runs.jsonl").write_text("")
    runs = tune(args.workloads, optimizers, args)
    rep: dict[str, Any] = {"optimizers": optimizers,
                           "summaries": {w: summarise(runs, w, optimizers) for w in args.workloads}}
    if not args.skip_step_cost:
        log.info("training steps, interleaved")
        rep["train_step"] = train_step_costs(rep["summaries"], args.quick)
        log.info("step cost against the bandwidth bound")
        rep["step_cost"] = step_cost(args.quick)
    if not args.skip_state:
        log.info("state per rank")
        rep["state_per_rank"] = state_per_rank(args.quick)
    rep["meta"] = _meta(args, t0, load0, runs)
    for w, s in rep["summaries"].items():
        plot_workload(s, w, args.out / f"report_{w}.png")
    plot_headline(rep["summaries"], args.out / "report_headline.png")
    write_markdown(rep, args, args.out)
    (args.out / "report.json").write_text(json.dumps({**rep, "runs": runs}, indent=1, default=str))
    if args.readme:
        update_readme(args.readme, rep, args.out)
    log.info("wrote %s (%.1f min)", args.out / "report.md", rep["meta"]["wall_s"] / 60)


if __name__ == "__main__":
    main()
