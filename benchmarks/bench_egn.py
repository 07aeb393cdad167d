"""EGN vs AdamW: per-step time and peak memory on an MLP, and Gram-factor vs explicit-Jacobian memory.

Every (optimizer, batch size, Jacobian path) runs in a fresh subprocess so that its peak resident set
size is its own: memory is the growth of ``ru_maxrss`` (resource.getrusage, KiB on Linux) from just
before the first step to the end of the run — a high-water-mark delta of the whole process, which
includes the allocator's slack. Times are the median CPU time (``time.process_time``; the machine is
shared, so wall time is reported too) of ``--steps`` steps after one warm-up step, single thread, with
the min-max spread; the load average is recorded before and after.

The same run measures time to a validation-loss target on small tabular MLPs (batch 32), EGN vs torch
AdamW over ``--seeds`` seeds (``benchmarks/egn_time_to_target.py``). The bytes of the per-step EGN exchange buffer (what
``all_gather_flat`` would move across ranks) are computed exactly from the shapes as well.

    python benchmarks/bench_egn.py            # writes benchmarks/results/bench_egn.{json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SIZES = (32, 64, 64, 10)  # MLP widths: d_in, hidden, hidden, classes


def _mlp(seed: int = 0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers = []
    for i in range(len(SIZES) - 1):
        layers.append(nn.Linear(SIZES[i], SIZES[i + 1]))
        if i < len(SIZES) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def _exchange_bytes(b: int, jacobian: str) -> int:
    """float64 numbers per step in EGN's gathered buffer: z, y, and factors or Jacobian rows."""
    c = SIZES[-1]
    per_sample = c + 1
    n = 0
    for d_in, d_out in zip(SIZES[:-1], SIZES[1:]):
        n += d_in * d_out + d_out
        per_sample += d_in + c * d_out if jacobian == "auto" else 0
    if jacobian == "explicit":
        per_sample += c * n
    return 8 * b * per_sample


def worker(kind: str, b: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from lightning_soaa import EGN

    model = _mlp()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, SIZES[0], generator=g)
    y = torch.randint(0, SIZES[-1], (b,), generator=g)
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

        def one() -> float:
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return float(loss)
    else:
        jac = "auto" if kind == "egn_gram" else "explicit"
        opt = EGN(model, loss="cross_entropy", lr=0.5, damping=1.0, jacobian=jac, max_gram_size=1 << 14)

        def one() -> float:
            return float(opt.step(inputs=x, targets=y))

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    losses = [one()]  # warm-up
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(one())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": kind, "b": b, "step_s_median": statistics.median(cpu), "step_s_range": [min(cpu), max(cpu)],
            "step_cpu_s_all": cpu, "step_wall_s_median": statistics.median(times), "step_wall_s_all": times,
            "peak_rss_delta_mib": (rss1 - rss0) / 1024.0, "loss_first": losses[0], "loss_last": losses[-1]}


def ttt_worker(name: str, seeds: int) -> dict:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from egn_time_to_target import compare

    return compare(name, seeds)


def _plot_ttt(ax: Any, ttt: list[dict]) -> None:  # ax: a matplotlib Axes
    """CPU seconds to the validation target per dataset: median bar, min-max whiskers over seeds."""
    for j, t in enumerate(ttt):
        best = [r for r in t["runs_adamw"] if r["lr"] == t["adamw_best_lr"]]
        for off, runs, label, color in ((-0.2, best, "AdamW (best lr)", "C0"), (0.2, t["runs_egn"], "EGN", "C1")):
            vals = [r["cpu_s"] for r in runs if r["reached"]]
            if not vals:
                continue
            med = statistics.median(vals)
            ax.bar(j + off, med, width=0.4, color=color, label=label if j == 0 else None,
                   yerr=[[med - min(vals)], [max(vals) - med]], capsize=4)
    ax.set_xticks(range(len(ttt)), [f"{t['dataset']}\n(val {t['target_val_loss']})" for t in ttt])
    ax.set_title("CPU s to validation target (b=32)")
    if ttt:
        ax.legend()


def _step_rows(args: argparse.Namespace, env: dict[str, str]) -> list[dict[str, Any]]:
    """One worker process per (batch, kind): its step times, peak memory and (EGN) exchange bytes."""
    rows = []
    for b in args.batches:
        for kind in ("adamw", "egn_gram", "egn_explicit"):
            cmd = [sys.executable, __file__, "--worker", kind, str(b), "--steps", str(args.steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            if kind != "adamw":
                row["exchange_bytes"] = _exchange_bytes(b, "auto" if kind == "egn_gram" else "explicit")
            rows.append(row)
            print(f"b={b:4d} {kind:13s} step {row['step_s_median'] * 1e3:9.2f} ms CPU "
                  f"({row['step_s_range'][0] * 1e3:.2f}-{row['step_s_range'][1] * 1e3:.2f})  "
                  f"peak RSS +{row['peak_rss_delta_mib']:8.1f} MiB  loss {row['loss_first']:.3f} -> "
                  f"{row['loss_last']:.3f}", flush=True)
    return rows


def _ratios(by: dict[tuple[str, int], dict[str, Any]], batches: list[int]) -> dict[str, dict[str, float]]:
    def ratio(key: str, num: str, den: str, b: int) -> float:
        return by[(num, b)][key] / by[(den, b)][key]

    t, m = "step_s_median", "peak_rss_delta_mib"
    return {str(b): {"egn_gram_over_adamw_time": ratio(t, "egn_gram", "adamw", b),
                     "egn_explicit_over_gram_time": ratio(t, "egn_explicit", "egn_gram", b),
                     "egn_gram_over_adamw_rss": ratio(m, "egn_gram", "adamw", b),
                     "egn_explicit_over_gram_rss": ratio(m, "egn_explicit", "egn_gram", b),
                     "explicit_over_gram_exchange_bytes": ratio("exchange_bytes", "egn_explicit", "egn_gram", b)}
            for b in batches}


def _time_to_target(args: argparse.Namespace, env: dict[str, str]) -> list[dict[str, Any]]:
    ttt = []
    for name in (("digits", "synthetic2") if args.seeds > 0 else ()):
        cmd = [sys.executable, __file__, "--worker", "ttt", name, "--seeds", str(args.seeds)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        ttt.append(json.loads(out.stdout.strip().splitlines()[-1]))
        t = ttt[-1]
        print(f"time to val loss {t['target_val_loss']} on {name}: EGN {t['egn_steps_median']} steps, "
              f"{t['egn_cpu_s_median']:.2f} s CPU; AdamW (lr {t['adamw_best_lr']}) {t['adamw_steps_median']} steps, "
              f"{t['adamw_cpu_s_median']:.2f} s CPU; EGN/AdamW CPU time "
              f"{t.get('egn_over_adamw_cpu_median', float('nan')):.2f}x", flush=True)
    return ttt


def _plot(by: dict[tuple[str, int], dict[str, Any]], batches: list[int], ttt: list[dict[str, Any]],
          path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    labels = (("adamw", "AdamW", "C0"), ("egn_gram", "EGN (Gram factors)", "C1"),
              ("egn_explicit", "EGN (explicit J)", "C2"))
    bs = list(batches)
    for kind, label, color in labels:
        style = dict(marker="o", label=label, color=color)
        axes[0].plot(bs, [by[(kind, b)]["step_s_median"] * 1e3 for b in bs], **style)
        axes[1].plot(bs, [max(by[(kind, b)]["peak_rss_delta_mib"], 1e-2) for b in bs], **style)
        if kind != "adamw":
            axes[2].plot(bs, [by[(kind, b)]["exchange_bytes"] / 2**20 for b in bs], **style)
    titles = ("median CPU time per step (ms)", "peak RSS growth (MiB)", "EGN exchange buffer (MiB)")
    _plot_ttt(axes[3], ttt)
    for ax, title in zip(axes[:3], titles):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size b")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"EGN vs AdamW, MLP {SIZES}, cross-entropy, CPU 1 thread")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--seeds", type=int, default=3, help="time-to-target seeds (0: skip)")
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "B"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.worker[0] == "ttt":
            print(json.dumps(ttt_worker(args.worker[1], args.seeds)))
        else:
            print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.steps)))
        return
    load_before = os.getloadavg()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rows = _step_rows(args, env)
    by = {(r["kind"], r["b"]): r for r in rows}
    ratios = _ratios(by, args.batches)
    ttt = _time_to_target(args, env)
    import torch

    result = {"benchmark": "bench_egn", "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "time_to_target": ttt,
              "step_time_metric": "CPU time per step (process_time), median of --steps",
              "mlp_sizes": SIZES, "loss": "cross_entropy", "dtype": "float32",
              "threads": 1, "steps_timed": args.steps, "memory_metric": "ru_maxrss growth over the run (MiB)",
              "torch": torch.__version__, "machine": platform.platform(), "processor": platform.processor(),
              "rows": rows, "ratios": ratios}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_egn.json").write_text(json.dumps(result, indent=2))
    _plot(by, args.batches, ttt, args.out / "bench_egn.png")
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
