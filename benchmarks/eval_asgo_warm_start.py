"""Can ASGO's inverse root be warm-started from the previous step's root? (An evaluation, not a feature.)

The idea: the Gram ``V_t`` is an EMA, so the previous root ``X = V_{t-1}^{-1/2}`` might be close to
``V_t^{-1/2}``, and a few Newton steps ``R = I - X V X;  X <- X + (X R + R X)/4`` (3 matmuls each,
quadratic convergence while ``||R||_2 < 1``) could replace the 10 cold Polar Express iterations
(37 matmuls). This script trains ASGO on real text and measures, on the Grams it produces:

* ``||I - X_{t-1} V_t X_{t-1}||_2`` per block: the warm start's distance, which must be < 1;
* the residual after 1..4 symmetrised Newton steps, with damping 0, 1e-3 and 1e-1 (``linalg.damp``);
* how far the default fp32 Polar Express root is from the float64 ``eigh`` reference, measured on the
  quantity that matters, the normalised update direction ``P M / ||P M||`` (relative error);
* the same error for fewer or more Polar Express iterations (``--pe-iters``);
* the CPU time of the batched roots of one step: Polar Express (fp32, 10 iterations) vs float64 eigh.

Workload: the TinyGPT of ``bench_asgo.py`` (d=256, 2 layers: 12 matrices with k=256) on the pydoc topic
texts of the standard library (characters, nothing downloaded), ASGO defaults (betas (0.9, 0.8)).

Usage::

    python benchmarks/eval_asgo_warm_start.py            # ~2-4 minutes on a 2-core CPU (1 thread)

Writes ``benchmarks/results/eval_asgo_warm_start.json`` and ``eval_asgo_warm_start.png``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
from pathlib import Path
from typing import Any

import torch
from _timing import median_cpu_s

# a sibling script: run this file as benchmarks/eval_asgo_warm_start.py
from bench_asgo import TinyGPT, add_model_args, add_output_args, start, write_json
from torch.nn import functional as F

from lightning_soaa import ASGO
from lightning_soaa.functional.linalg import damp, inv_sqrt_eigh, inverse_sqrt
from lightning_soaa.lightning.demo.data import topics_text, topics_vocab
from lightning_soaa.optim.asgo import EXP_AVG, GRAM, asgo_param_groups

log = logging.getLogger("eval_asgo_warm_start")


def collect(args: argparse.Namespace) -> dict[int, tuple[torch.Tensor, list[torch.Tensor]]]:
    """Train ASGO; return ``{t: (stacked Grams, momenta)}`` after step t for t and t - 1 of each eval step."""
    torch.manual_seed(args.seed)
    vocab = topics_vocab()
    ids = torch.tensor([vocab.index(c) for c in topics_text()])
    model = TinyGPT(len(vocab), args.d_model, args.layers, args.heads, args.seq)
    opt = ASGO(asgo_param_groups(model), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    keep = {s for t in args.eval_steps for s in (t - 1, t)}
    out: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    for t in range(1, max(args.eval_steps) + 1):
        starts = torch.randint(0, len(ids) - args.seq - 1, (args.batch,), generator=gen).tolist()
        idx = torch.stack([ids[s:s + args.seq + 1] for s in starts])
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(idx[:, :-1]).reshape(-1, len(vocab)), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        if t in keep:
            states = [opt.block_state(b) for b in opt._owned]
            states = [s for s in states if GRAM in s]
            out[t] = (torch.stack([s[GRAM].clone() for s in states]), [s[EXP_AVG].clone() for s in states])
        if t % 10 == 0:
            log.info("step %d: loss %.3f", t, float(loss))
    return out


def warm_newton_residuals(x: torch.Tensor, v: torch.Tensor, iters: int) -> list[list[float]]:
    """``||I - X V X||_2`` per block before each of ``iters`` symmetrised Newton steps and after the last
    (float64; a non-finite residual is reported as inf)."""
    eye = torch.eye(v.shape[-1], dtype=v.dtype)
    out = []
    for i in range(iters + 1):
        r = eye - x @ v @ x
        r = 0.5 * (r + r.mT)
        finite = torch.isfinite(r).all(dim=(-2, -1))
        norms = torch.linalg.matrix_norm(torch.where(finite[:, None, None], r, torch.zeros_like(r)), ord=2)
        out.append(torch.where(finite, norms, torch.full_like(norms, float("inf"))).tolist())
        if i < iters:
            xr = x @ r
            x = x + 0.25 * (xr + xr.mT)
    return out


def _cond(v: torch.Tensor) -> list[float]:
    """Condition number per block, capped at 1e16 (a numerically singular Gram: rank deficient)."""
    e = torch.linalg.eigvalsh(v)
    return (e[:, -1] / e[:, 0].clamp_min(1e-16 * e[:, -1])).tolist()


def direction_error(p: torch.Tensor, p_ref: torch.Tensor, moms: list[torch.Tensor]) -> list[float]:
    """``|| U/||U|| - U_ref/||U_ref|| ||_F`` per block for ``U = P M`` (left side) or ``M P`` (right)."""
    errs = []
    for i, m in enumerate(moms):
        m = m.double()
        u, u_ref = (p[i].double() @ m, p_ref[i] @ m) if m.shape[0] < m.shape[1] else (m @ p[i].double(), m @ p_ref[i])
        errs.append(float((u / u.norm() - u_ref / u_ref.norm()).norm()))
    return errs


def cpu_ms(fn: Any, reps: int) -> float:
    return 1e3 * median_cpu_s(fn, reps, warmup=False)


def summary(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    data = collect(args)
    steps: dict[str, Any] = {}
    for t in args.eval_steps:
        v_prev, v = data[t - 1][0].double(), data[t][0].double()
        row: dict[str, Any] = {
            "rel_change_frobenius": summary((torch.linalg.matrix_norm(v - v_prev)
                                             / torch.linalg.matrix_norm(v_prev)).tolist()),
            "cond_capped_1e16": summary(_cond(v)),
        }
        for d in args.dampings:
            res = warm_newton_residuals(inv_sqrt_eigh(damp(v_prev, d)), damp(v, d), args.newton_iters)
            row[f"damping_{d:g}"] = {"residual_per_iteration": [summary(r) for r in res],
                                     "blocks_in_newton_basin": sum(x < 1.0 for x in res[0])}
        p_ref = inv_sqrt_eigh(v)
        grams, moms = data[t]
        row["polar_express_fp32_direction_error"] = summary(direction_error(inverse_sqrt(grams), p_ref, moms))
        row["polar_express_fp32_direction_error_by_iters"] = {
            str(n): summary(direction_error(inverse_sqrt(grams, num_iters=n), p_ref, moms))
            for n in args.pe_iters}
        steps[str(t)] = row
        log.info("step %d: ||I - X V X||_2 of the warm start (damping 0) %s", t,
                 row["damping_0"]["residual_per_iteration"][0])
    grams = data[max(args.eval_steps)][0]
    timing = {"blocks": grams.shape[0], "k": grams.shape[-1],
              "polar_express_fp32_10_iters_ms": cpu_ms(lambda: inverse_sqrt(grams), args.reps),
              "eigh_float64_ms": cpu_ms(lambda: inverse_sqrt(grams, "eigh"), args.reps),
              "one_batched_matmul_ms": cpu_ms(lambda: torch.bmm(grams, grams), args.reps)}
    return {"benchmark": "eval_asgo_warm_start", "config": {k: v for k, v in vars(args).items() if k != "out"},
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_before_after": [list(load_before), list(os.getloadavg())],
            "steps": steps, "root_cpu_time": timing}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for t, row in report["steps"].items():
        for d in report["config"]["dampings"]:
            med = [r["median"] for r in row[f"damping_{d:g}"]["residual_per_iteration"]]
            ax1.plot(range(len(med)), med, marker="o", label=f"step {t}, damping {d:g}")
    ax1.axhline(1.0, color="k", ls="--", lw=0.8)
    ax1.set_yscale("log")
    ax1.set_xlabel("warm Newton iterations from the previous root")
    ax1.set_ylabel("median over blocks of ||I - X V X||_2")
    ax1.legend(fontsize=7)
    ts = list(report["steps"])
    for key in ("median", "max"):
        ax2.plot([int(t) for t in ts], [report["steps"][t]["polar_express_fp32_direction_error"][key] for t in ts],
                 marker="o", label=key)
    ax2.set_xlabel("step")
    ax2.set_ylabel("Polar Express fp32 vs float64 eigh: error of P M / ||P M||")
    ax2.set_yscale("log")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The ASGO run whose Grams are evaluated (shared with ``eval_asgo_roots.py``)."""
    add_model_args(p, d_model=256, layers=2, vocab=None)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-steps", type=int, nargs="+", default=[2, 10, 30, 60])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p)
    p.add_argument("--dampings", type=float, nargs="+", default=[0.0, 1e-3, 1e-1])
    p.add_argument("--newton-iters", type=int, default=4)
    p.add_argument("--pe-iters", type=int, nargs="+", default=[6, 8, 10, 12],
                   help="Polar Express iteration counts whose direction error is reported")
    p.add_argument("--reps", type=int, default=5)
    add_output_args(p)
    args = p.parse_args()
    if min(args.eval_steps) < 2:
        p.error(f"Invalid --eval-steps={args.eval_steps}. Every step must be >= 2 (the warm start is step t - 1).")
    start(args)
    report = evaluate(args)
    path = write_json(args, "eval_asgo_warm_start", report)
    plot(report, path.with_suffix(".png"))
    log.info("root CPU time: %s", report["root_cpu_time"])
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
