"""EGN on models with trained ``nn.Embedding`` tables: Gram factors vs explicit Jacobian rows, and AdamW.

Two models EGN's users train: a tabular one (three categorical columns, each a 1000 x 16 table, with four
numeric features into an MLP 52-64-64-10) and a token one (T = 8 tokens of a 5000 x 32 table, mean-pooled into
32-64-10), cross-entropy over 10 classes, float32 models, EGN's default float64 solve. Per model and path
(``jacobian="auto"`` with ``factor_embeddings=True``: an embedding is a factored site; ``"explicit"``: the b·c
dense rows of V·d columns, what every trained table takes by default) a fresh subprocess takes ``--steps``
steps after one warm-up step; time is the median CPU time (``time.process_time``, one thread), memory the
growth of ``ru_maxrss`` from just before the first step (a high-water-mark delta of the whole process).
torch's ``AdamW(fused=True)`` whole training step (forward, backward, step) on the same batches is the
yardstick.

    python benchmarks/bench_egn_embedding.py    # writes benchmarks/results/bench_egn_embedding.{json,png}
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

MODELS = {"tabular": 256, "tokens": 64}  # model -> batch size


def _model(kind: str) -> Any:
    import torch
    from torch import nn

    class Tabular(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tables = nn.ModuleList([nn.Embedding(1000, 16) for _ in range(3)])
            self.mlp = nn.Sequential(nn.Linear(52, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, cat: Any, num: Any) -> Any:
            return self.mlp(torch.cat([t(cat[:, j]) for j, t in enumerate(self.tables)] + [num], dim=1))

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(5000, 32)
            self.head = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, tok: Any) -> Any:
            return self.head(self.table(tok).mean(dim=1))

    torch.manual_seed(0)
    return Tabular() if kind == "tabular" else Tokens()


def _batches(kind: str, b: int, n: int) -> list[tuple[tuple[Any, ...], Any]]:
    import torch

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        if kind == "tabular":
            xs: tuple[Any, ...] = (torch.randint(0, 1000, (b, 3), generator=g), torch.randn(b, 4, generator=g))
        else:
            xs = (torch.randint(0, 5000, (b, 8), generator=g),)
        out.append((xs, torch.randint(0, 10, (b,), generator=g)))
    return out


def worker(kind: str, path: str, steps: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    model = _model(kind)
    data = _batches(kind, MODELS[kind], steps + 1)
    if path == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

        def one(xs: tuple[Any, ...], y: Any) -> None:
            opt.zero_grad()
            F.cross_entropy(model(*xs), y).backward()
            opt.step()
    else:
        from lightning_soaa.optim.egn import EGN

        egn = EGN(model, loss="cross_entropy", lr=1.0, damping=1.0, jacobian=path, factor_embeddings=True)

        def one(xs: tuple[Any, ...], y: Any) -> None:
            egn.step(inputs=xs, targets=y)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for xs, y in data:
        t0 = time.process_time()
        one(xs, y)
        times.append(time.process_time() - t0)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    rest = times[1:]
    return {"model": kind, "path": path, "batch": MODELS[kind], "step_ms": 1e3 * statistics.median(rest),
            "min_ms": 1e3 * min(rest), "max_ms": 1e3 * max(rest), "peak_growth_mib": grown}


def _plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    paths = ["auto", "explicit", "adamw"]
    for ax, key, label in ((axes[0], "step_ms", "CPU ms per step (log)"),
                           (axes[1], "peak_growth_mib", "peak RSS growth, MiB (log)")):
        for i, kind in enumerate(MODELS):
            vals = [next(r[key] for r in rows if r["model"] == kind and r["path"] == p) for p in paths]
            ax.bar([i * 4 + j for j in range(3)], [max(v, 1e-3) for v in vals], color=["C0", "C3", "C7"])
        ax.set_xticks([i * 4 + j for i in range(len(MODELS)) for j in range(3)])
        ax.set_xticklabels([f"{k}\n{p}" for k in MODELS for p in ("EGN factored", "EGN explicit", "AdamW")],
                           fontsize=6)
        ax.set_yscale("log")
        ax.set_title(label)
    fig.suptitle("EGN with trained nn.Embedding tables (2-core CPU, 1 thread)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.steps)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    load = [os.getloadavg()[0]]
    rows = []
    for kind in MODELS:
        for path in ("auto", "explicit", "adamw"):
            proc = subprocess.run([sys.executable, __file__, "--worker", kind, path, "--steps", str(args.steps)],
                                  capture_output=True, text=True, env=env, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    load.append(os.getloadavg()[0])
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": platform.processor() or platform.machine(), "load_average": load, "rows": rows}
    (args.out / "bench_egn_embedding.json").write_text(json.dumps(result, indent=2))
    _plot(rows, args.out / "bench_egn_embedding.png")
    for r in rows:
        print(f"{r['model']:8s} {r['path']:8s} b={r['batch']}: {r['step_ms']:8.1f} ms "
              f"({r['min_ms']:.1f}-{r['max_ms']:.1f}), peak +{r['peak_growth_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
