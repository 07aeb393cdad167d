"""SOAA vs AdamW on a small character-level language model: final validation loss, and steps and CPU
time to AdamW's final validation loss, over one lr grid and several seeds (issue 14, "SOAA: at least as
good as AdamW to target").

Workload: the demo ``CharTransformer`` (d_model 64, 4 heads, 2 layers, context 64) on the standard
library's ``pydoc_data.topics`` text (first 90% train, random windows; validation: 128 fixed windows of
the last 10%), batch 32, ``--steps`` steps (default 600), linear warm-up over the first 10% then cosine
to 0, betas (0.9, 0.95), no weight decay, float32, one thread (``torch.set_num_threads(1)``). Plain torch
loop, no Lightning. The training steps are timed in CPU time of this process (``time.process_time``: the
machine is shared); validation (every ``--eval-every`` steps) is not timed.

Optimizers (same lr grid for all): ``adamw`` = ``torch.optim.AdamW(fused=True)``; ``soaa_paper`` =
SOAA with the old defaults (the spec's band, ``band_schedule="paper"``, γ = 0.1); ``soaa`` = SOAA with
this package's defaults (``band_schedule="final"``, γ = 0.05); more variants in ``VARIANTS``
(``--opts``), among them issue 14's attempts to make the trust region informative: ``rho_smoothing``
(ρ as a ratio of discounted sums of actual and predicted reductions over ~50 steps) with a wider band
(γ = 0.25) and/or ``trust_warmup`` (d = 1 through the lr warm-up). SOAA always gets ``total_steps``.
Results: ``benchmarks/results/soaa_lm_issue14_*`` and the README's SOAA paragraph.

Target: the mean over seeds of AdamW's final validation loss at its best lr (best = lowest mean final
loss). For each optimizer at its own best lr: per seed, the first evaluated step whose validation loss
is <= the target, and the training CPU time up to it ("not reached" counts as missing); ratios are
against AdamW's own steps/time to the same target.

``--diag`` logs, for SOAA runs, d, ρ, p (predicted reduction), c (Fisher scale), the band and the
fraction of coordinates on the Fisher branch of the cap (``d c v̂ > sqrt(v̂)``) every 10 steps (these
runs are slower; their time is not comparable).

Usage::

    PYTHONPATH=. python benchmarks/soaa_lm_study.py --out /tmp/soaa_lm       # writes JSON and PNG
    PYTHONPATH=. python benchmarks/soaa_lm_study.py --opts soaa_paper --lrs 2e-3 --seeds 0 --diag

Writes ``<out>.json`` (every run: config, eval curve, CPU times, diagnostics) and ``<out>.png``
(validation loss vs step and vs CPU time at each optimizer's best lr; final loss vs lr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from lightning_soaa import SOAA
from lightning_soaa.lightning.demo.data import topics_text, topics_vocab
from lightning_soaa.lightning.demo.models import CharTransformer

CONTEXT, BATCH, D_MODEL, N_LAYERS, N_HEADS = 64, 32, 64, 2, 4
BETAS = (0.9, 0.95)
N_VAL = 128

# name -> extra SOAA keyword arguments (on top of lr, betas, total_steps, compile=False)
VARIANTS: dict[str, dict[str, Any]] = {
    "soaa": {},  # this package's defaults: band_schedule="final", gamma=0.05
    "soaa_paper": {"gamma": 0.1, "band_schedule": "paper"},  # the defaults before: the spec's band
    "soaa_final_g01": {"gamma": 0.1, "band_schedule": "final"},
    "soaa_final_g025": {"gamma": 0.25, "band_schedule": "final"},
    # issue 14: a denoised ρ (ratio of discounted sums over ~50 steps) and a trust-region warm-up
    "soaa_rs98": {"rho_smoothing": 0.98},
    "soaa_rs98_g025": {"rho_smoothing": 0.98, "gamma": 0.25},
    "soaa_rs98_g025_w60": {"rho_smoothing": 0.98, "gamma": 0.25, "trust_warmup": 60},
    "soaa_w60": {"trust_warmup": 60},
}

def data() -> tuple[torch.Tensor, torch.Tensor]:
    text, vocab = topics_text(), topics_vocab()
    table = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([table[c] for c in text], dtype=torch.long)
    split = int(len(ids) * 0.9)
    val = ids[split:]
    stride = (len(val) - CONTEXT - 1) // N_VAL
    vwin = torch.stack([val[i * stride:i * stride + CONTEXT + 1] for i in range(N_VAL)])
    return ids[:split], vwin


def schedule(step: int, steps: int) -> float:
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def make_opt(kind: str, model: torch.nn.Module, lr: float, steps: int) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, weight_decay=0.0, fused=True)
    return SOAA(model.parameters(), lr=lr, betas=BETAS, total_steps=steps, compile=False, **VARIANTS[kind])


def _capped_fraction(opt: SOAA, d_prev: float) -> float:
    """Share of coordinates whose last update took the Fisher branch: d c v̂ > sqrt(v̂)."""
    c = opt.statistics()["fisher_scale"]
    n = capped = 0
    beta2 = opt.param_groups[0]["betas"][1]
    for st in opt.state.values():
        if "exp_avg_sq" not in st:
            continue
        vh = st["exp_avg_sq"] / (1.0 - beta2 ** float(st["step"]))
        capped += int((d_prev * c * vh > vh.sqrt()).sum())
        n += vh.numel()
    return capped / max(n, 1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, vwin: torch.Tensor) -> float:
    model.eval()
    logits = model(vwin[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), vwin[:, 1:].reshape(-1))
    model.train()
    return float(loss)


def run(kind: str, lr: float, seed: int, steps: int, eval_every: int, diag: bool) -> dict[str, Any]:
    train, vwin = data()
    torch.manual_seed(seed)
    model = CharTransformer(vocab_size=len(topics_vocab()), context=CONTEXT, d_model=D_MODEL,
                            n_heads=N_HEADS, n_layers=N_LAYERS)
    opt = make_opt(kind, model, lr, steps)
    gen = torch.Generator().manual_seed(1000 + seed)
    curve: list[tuple[int, float, float]] = [(0, 0.0, evaluate(model, vwin))]
    trace: list[dict[str, float]] = []
    cpu = 0.0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * schedule(step, steps)
        starts = torch.randint(0, len(train) - CONTEXT - 1, (BATCH,), generator=gen)
        xy = torch.stack([train[s:s + CONTEXT + 1] for s in starts.tolist()])
        t0 = time.process_time()
        logits = model(xy[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xy[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        d_prev = opt.statistics()["d"] if isinstance(opt, SOAA) else 1.0
        if isinstance(opt, SOAA):
            opt.step(loss=loss)
        else:
            opt.step()
        cpu += time.process_time() - t0
        if diag and isinstance(opt, SOAA):
            st = opt.statistics()
            row = {k: st[k] for k in ("d", "rho", "predicted_reduction", "actual_reduction", "fisher_scale",
                                      "band_lo", "band_hi", "loss")}
            row["step"] = step + 1
            if step % 10 == 0:
                row["capped"] = _capped_fraction(opt, d_prev)
            trace.append(row)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append((step + 1, cpu, evaluate(model, vwin)))
    return {"kind": kind, "lr": lr, "seed": seed, "curve": curve, "final": curve[-1][2], "cpu": cpu,
            "trace": trace, "diag": diag_summary(trace, steps) if trace else None}


def _to_target(curve: list[list[float]], target: float) -> tuple[int | None, float | None]:
    for step, cpu, loss in curve:
        if loss <= target:
            return int(step), float(cpu)
    return None, None


def _table(by: dict[str, dict[float, list[dict[str, Any]]]], best: dict[str, float],
           target: float) -> dict[str, Any]:
    table = {}
    for k, lr in best.items():
        rs = by[k][lr]
        finals = [r["final"] for r in rs]
        hits = [_to_target(r["curve"], target) for r in rs]
        steps = [h[0] for h in hits if h[0] is not None]
        cpus = [h[1] for h in hits if h[1] is not None]
        table[k] = {"best_lr": lr, "final_mean": statistics.mean(finals), "final_min": min(finals),
                    "final_max": max(finals), "cpu_per_run": statistics.mean(r["cpu"] for r in rs),
                    "reached": f"{len(steps)}/{len(rs)}",
                    "steps_to_target": statistics.mean(steps) if steps else None,
                    "cpu_to_target": statistics.mean(cpus) if cpus else None}
    ref = table["adamw"]
    for row in table.values():
        for key in ("steps_to_target", "cpu_to_target"):
            a, b = row[key], ref[key]
            row[key + "_ratio"] = a / b if a is not None and b else None
    return table


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Best lr per optimizer (lowest mean final loss); the table at two targets: ``target`` = the mean
    of AdamW's final losses at its best lr (its own seeds reach it about half of the time), and
    ``target_all`` = the worst of them (every AdamW seed reaches it)."""
    by: dict[str, dict[float, list[dict[str, Any]]]] = {}
    for r in runs:
        by.setdefault(r["kind"], {}).setdefault(r["lr"], []).append(r)
    best = {k: min(v, key=lambda lr: statistics.mean(r["final"] for r in v[lr])) for k, v in by.items()}
    out: dict[str, Any] = {"grid": {k: {str(lr): [r["final"] for r in rs] for lr, rs in v.items()}
                                    for k, v in by.items()}}
    if "adamw" not in by:
        return out
    adamw_finals = [r["final"] for r in by["adamw"][best["adamw"]]]
    out["target"], out["target_all"] = statistics.mean(adamw_finals), max(adamw_finals)
    out["table"] = _table(by, best, out["target"])
    out["table_all"] = _table(by, best, out["target_all"])
    return out


def diag_summary(trace: list[dict[str, float]], steps: int) -> list[dict[str, Any]]:
    """Per phase (warm-up, then thirds of the rest): d (mean, share of steps at a band edge), ρ, p, the
    actual reduction (median and sd), c and the share of capped coordinates."""
    warm = max(1, steps // 10)
    cuts = [0, warm] + [warm + (steps - warm) * k // 3 for k in (1, 2, 3)]
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        seg = trace[a:b]
        if not seg:
            continue
        act = [x["actual_reduction"] for x in seg]
        cap = [x["capped"] for x in seg if "capped" in x]
        out.append({
            "steps": f"{a + 1}-{b}", "band_end": [seg[-1]["band_lo"], seg[-1]["band_hi"]],
            "d_mean": statistics.mean(x["d"] for x in seg),
            "at_lo": sum(abs(x["d"] - x["band_lo"]) < 1e-12 for x in seg) / len(seg),
            "at_hi": sum(abs(x["d"] - x["band_hi"]) < 1e-12 for x in seg) / len(seg),
            "rho_median": statistics.median(x["rho"] for x in seg),
            "rho_negative": sum(x["rho"] < 0 for x in seg) / len(seg),
            "p_median": statistics.median(x["predicted_reduction"] for x in seg),
            "actual_median": statistics.median(act), "actual_sd": statistics.pstdev(act),
            "c_mean": statistics.mean(x["fisher_scale"] for x in seg),
            "capped_mean": statistics.mean(cap) if cap else None,
        })
    return out


def plot(runs: list[dict[str, Any]], summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    table = summary.get("table", {})
    for i, (kind, row) in enumerate(table.items()):
        color = f"C{i}"
        for r in runs:
            if r["kind"] == kind and r["lr"] == row["best_lr"]:
                steps, cpus, losses = zip(*r["curve"][1:])
                lab = f"{kind} lr={row['best_lr']:g}" if r["seed"] == min(
                    x["seed"] for x in runs if x["kind"] == kind) else None
                axes[0].plot(steps, losses, color=color, alpha=0.7, label=lab)
                axes[1].plot(cpus, losses, color=color, alpha=0.7, label=lab)
    for i, (kind, grid) in enumerate(summary["grid"].items()):
        lrs = sorted(grid, key=float)
        axes[2].errorbar([float(x) for x in lrs], [statistics.mean(grid[x]) for x in lrs],
                         yerr=[statistics.pstdev(grid[x]) for x in lrs], marker="o", label=kind, color=f"C{i}")
    if "target" in summary:
        for ax in axes[:2]:
            ax.axhline(summary["target"], color="k", ls=":", lw=1, label="AdamW target")
    axes[0].set(xlabel="step", ylabel="validation loss", title="best lr, all seeds")
    axes[1].set(xlabel="training CPU time [s] (2-core shared CPU, 1 thread)", ylabel="validation loss")
    axes[2].set(xscale="log", xlabel="peak lr", ylabel="final validation loss", title="lr grid (mean ± sd)")
    for ax in axes[:2]:
        lo = summary.get("target", 2.0)
        ax.set_ylim(lo - 0.3, lo + 1.0)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--opts", default="adamw,soaa,soaa_paper")
    ap.add_argument("--lrs", default="2e-3,4e-3,8e-3")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--diag", action="store_true")
    ap.add_argument("--out", default="soaa_lm_study")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs already in <out>.json (same --steps) and only do the missing ones")
    args = ap.parse_args()
    torch.set_num_threads(1)
    meta = {"steps": args.steps, "batch": BATCH, "context": CONTEXT, "d_model": D_MODEL, "layers": N_LAYERS,
            "betas": BETAS, "variants": VARIANTS, "threads": 1, "torch": torch.__version__}
    runs: list[dict[str, Any]] = []
    if args.resume and os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            old = json.load(f)
        if old["meta"]["steps"] != args.steps:
            raise SystemExit(f"--resume: {args.out}.json has steps={old['meta']['steps']}, not {args.steps}")
        runs = old["runs"]
    done = {(r["kind"], r["lr"], r["seed"]) for r in runs}
    for kind in args.opts.split(","):
        for lr in (float(x) for x in args.lrs.split(",")):
            for seed in (int(x) for x in args.seeds.split(",")):
                if (kind, lr, seed) in done:
                    continue
                r = run(kind, lr, seed, args.steps, args.eval_every, args.diag)
                runs.append(r)
                print(f"{kind:12s} lr={lr:<7g} seed={seed} final={r['final']:.4f} cpu={r['cpu']:.1f}s",
                      flush=True)
                for row in r["diag"] or []:
                    print("   ", json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
                with open(args.out + ".json.tmp", "w") as f:  # after every run: a long study can be resumed
                    json.dump({"meta": meta, "summary": summarize(runs), "runs": runs}, f, indent=1)
                os.replace(args.out + ".json.tmp", args.out + ".json")
    summary = summarize(runs)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=1)
    plot(runs, summary, args.out + ".png")
    for name in ("table", "table_all"):
        print(name, summary.get(name.replace("table", "target")))
        for k, row in summary.get(name, {}).items():
            print(" ", k, json.dumps(row))


if __name__ == "__main__":
    main()
