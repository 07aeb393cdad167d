"""Calibrate ASGO's balancing cost model (``lightning_soaa.optim.asgo``) against measured CPU time.

ASGO gives blocks to ranks by an estimated per-step cost (:func:`lightning_soaa.optim.asgo.asgo_block_cost`
and ``ADAM_COST_PER_ELEMENT``). This script measures, on a CPU with one thread (CPU time, median of a
few repetitions), what each part of one step really costs:

* the inverse root of a ``k x k`` Gram, for each method as :func:`resolve_root_method` resolves it:
  ``polar_express`` (the matmul iteration; float32 Gram, and float64 Gram, which ``"auto"`` sends to it),
  ``polar_express_eigh`` (what ``"auto"`` runs for a float32 Gram on a CPU), ``newton_schulz`` and ``eigh``;
  reported in picoseconds per ``k^3`` (per iteration and ``k^3`` for the iterative methods);
* the rest of an ASGO step on one ``k x other`` block (momentum, Gram update, ``P M``, normalisation,
  weight decay; the real optimizer, root reused with ``root_every`` large), in ps per ``k^2 * other``;
* an AdamW-fallback element (the real optimizer on a 1-D parameter), in ps per element;
* a check: a mixed float32 model (matrices of k = 128/256, a large embedding, vectors; the one of
  tests/unit/test_asgo_optim.py), each parameter's real step timed alone (root every step), and the
  heaviest rank's measured load / mean when owners come from the new model vs the previous one
  (``4 * 10 * k^3 + 4 * k^2 * other`` per matrix whatever the root, 100 per AdamW element).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/calibrate_asgo_cost.py   # ~1-3 minutes; --balance-only: the check again

Writes ``benchmarks/results/calibrate_asgo_cost.json``. The constants in ``lightning_soaa/optim/asgo.py``
(``ROOT_COST``, ``GRAM_APPLY_COST``, ``ADAM_COST_PER_ELEMENT``) come from its ``summary``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
from pathlib import Path
from typing import Any

import torch
from _timing import median_cpu_s  # a sibling module: run this file as benchmarks/calibrate_asgo_cost.py

from lightning_soaa import ASGO
from lightning_soaa.distributed.assignment import assign_owners, rank_loads
from lightning_soaa.functional.linalg import inverse_sqrt

log = logging.getLogger("calibrate_asgo_cost")

ROOTS = (  # (label, method, Gram dtype, iterations or None for a non-iterative method)
    ("polar_express_fp32", "polar_express", torch.float32, 10),
    ("polar_express_fp64", "polar_express", torch.float64, 10),
    ("newton_schulz_fp32", "newton_schulz", torch.float32, 18),
    ("polar_express_eigh_fp32", "polar_express_eigh", torch.float32, None),
    ("eigh_fp32", "eigh", torch.float32, None),
)


cpu_seconds = median_cpu_s  # one warm-up call, then the median of reps


def gram(k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    g = torch.randn(k, 2 * k, generator=gen, dtype=torch.float64)
    return (g @ g.T / (2 * k)).to(dtype)


def measure_roots(ks: list[int], reps: int, gen: torch.Generator) -> list[dict[str, Any]]:
    rows = []
    for k in ks:
        for label, method, dtype, iters in ROOTS:
            v = gram(k, dtype, gen)
            sec = cpu_seconds(lambda v=v, method=method: inverse_sqrt(v, method),
                              reps if k <= 512 else max(1, reps // 2))
            per = sec * 1e12 / (k**3 * (iters or 1))
            rows.append({"label": label, "method": method, "dtype": str(dtype), "k": k, "iters": iters,
                         "ms": sec * 1e3, "ps_per_k3_iter" if iters else "ps_per_k3": per})
            log.info("root %-24s k=%5d %9.2f ms  %.2f ps/k^3%s", label, k, sec * 1e3, per,
                     "/iter" if iters else "")
    return rows


def _time_steps(opt: torch.optim.Optimizer, params: list[torch.Tensor], reps: int) -> float:
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # first step: state and the first root
    return cpu_seconds(opt.step, reps)


def measure_gram_apply(ks: list[int], others: list[int], reps: int) -> list[dict[str, Any]]:
    rows = []
    for k in ks:
        for other in others:
            if other <= k:  # the preconditioned side is the smaller one
                continue
            p = torch.nn.Parameter(torch.randn(k, other))
            opt = ASGO([p], root_every=10**9)  # the root is computed once, on the first step only
            sec = _time_steps(opt, [p], reps)
            per = sec * 1e12 / (k * k * other)
            rows.append({"k": k, "other": other, "ms": sec * 1e3, "ps_per_k2_other": per})
            log.info("gram+apply k=%5d other=%5d %8.2f ms  %.2f ps/(k^2 other)", k, other, sec * 1e3, per)
    return rows


def measure_adam(sizes: list[int], reps: int) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        p = torch.nn.Parameter(torch.randn(n))
        opt = ASGO([p])  # a 1-D parameter goes to the AdamW fallback
        sec = _time_steps(opt, [p], reps)
        rows.append({"numel": n, "ms": sec * 1e3, "ps_per_element": sec * 1e12 / n})
        log.info("adamw numel=%8d %8.2f ms  %.0f ps/element", n, sec * 1e3, sec * 1e12 / n)
    return rows


def mixed_model() -> list[tuple[str, tuple[int, ...]]]:
    shapes: list[tuple[str, tuple[int, ...]]] = [("tok_emb.weight", (16384, 256)), ("pos_emb.weight", (1024, 256))]
    for i in range(6):
        shapes += [(f"h{i}.attn.weight", (256, 256)), (f"h{i}.fc.weight", (1024, 256)),
                   (f"h{i}.proj.weight", (256, 1024)), (f"h{i}.gate.weight", (128, 512)),
                   (f"h{i}.ln.weight", (256,)), (f"h{i}.fc.bias", (1024,))]
    return shapes


def previous_costs(opt: ASGO) -> list[float]:
    """Each of ``opt``'s blocks priced by the model before the measured constants (commit 74200d3^, default
    ``root_iters``/``root_every``): ``4 * 10 * k^3 + 4 * k^2 * other`` per matrix block whatever the root,
    100 per AdamW element. Blocks are routed by ``opt`` itself (the routing rule has not changed), so an
    embedding counts as AdamW as it did then; tests/unit/test_asgo_optim.py compares against this too."""
    params = opt._all_params()
    out = []
    for blk in opt.block_table.blocks:
        p, gi, name = params[blk.param_index]
        if not opt.is_matrix_param(p, opt.param_groups[gi], name):
            out.append(100.0 * max(blk.numel, 1))
            continue
        m, n = blk.shape[0], math.prod(blk.shape[1:])
        k, other = min(m, n), max(m, n)
        out.append(4.0 * 10 * k**3 + 4.0 * k * k * other)
    return out


def check_balance(reps: int, worlds: list[int]) -> dict[str, Any]:
    """Each parameter's measured step (its own optimizer: one block) and the balance of both models."""
    shapes = mixed_model()
    named = [(n, torch.nn.Parameter(torch.randn(s))) for n, s in shapes]
    opt = ASGO(named)  # the model's costs, as the optimizer computes them
    new = [b.cost for b in opt.block_table.blocks]
    old = previous_costs(opt)
    measured = []
    for n, p in named:
        measured.append(_time_steps(ASGO([(n, p)]), [p], reps) * 1e12)
    out: dict[str, Any] = {"measured_ps": measured, "new_model": new, "old_model": old}
    for w in worlds:
        ratio = {}
        for label, costs in (("new", new), ("old", old)):
            loads = rank_loads(measured, assign_owners(costs, w), w)
            ratio[label] = max(loads) / (sum(loads) / w)
        out[f"max_over_mean_W{w}"] = ratio
        log.info("mixed model W=%d: measured max/mean load %.3f (new owners) vs %.3f (old owners)",
                 w, ratio["new"], ratio["old"])
    return out


def fit(rows: list[dict[str, Any]], big: Any, small: Any) -> tuple[float, float]:
    """Least-squares ``(a, b)`` with ``ms ~ a * big(row) + b * small(row)``, in relative error (every size
    counts alike), rates in ps; a negative rate is set to 0 and the other refitted alone."""
    t = torch.tensor([r["ms"] * 1e9 for r in rows], dtype=torch.float64)
    x = torch.tensor([[float(big(r)), float(small(r))] for r in rows], dtype=torch.float64) / t[:, None]
    a, b = torch.linalg.lstsq(x, torch.ones_like(t)[:, None]).solution.flatten().tolist()
    if b < 0:
        a, b = float((x[:, 0].sum() / x[:, 0].square().sum()).item()), 0.0
    elif a < 0:
        a, b = 0.0, float((x[:, 1].sum() / x[:, 1].square().sum()).item())
    return a, b


def summarize(roots: list[dict[str, Any]], gram_rows: list[dict[str, Any]],
              adam: list[dict[str, Any]], min_k: int) -> dict[str, Any]:
    """The model's rates: per root label ``ms ~ a * iters * k^3 + b * k^2`` (``iters`` = 1 for the
    eigendecompositions), the rest of a step ``ms ~ a * k^2 * other + b * k * other``, AdamW ``a * numel``;
    fitted over ``k >= min_k`` (below, a root is dominated by per-call overhead the model leaves out)."""
    out: dict[str, Any] = {}
    for label, _, _, _ in ROOTS:
        rows = [r for r in roots if r["label"] == label and r["k"] >= min_k]
        a, b = fit(rows, lambda r: (r["iters"] or 1) * r["k"] ** 3, lambda r: r["k"] ** 2)
        out[f"root_{label}"] = {"ps_per_k3" + ("_iter" if rows[0]["iters"] else ""): a, "ps_per_k2": b}
    a, b = fit(gram_rows, lambda r: r["k"] ** 2 * r["other"], lambda r: r["k"] * r["other"])
    out["gram_apply"] = {"ps_per_k2_other": a, "ps_per_k_other": b}
    out["adam_ps_per_element"] = statistics.median(r["ps_per_element"] for r in adam)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    ap.add_argument("--others", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--adam-sizes", type=int, nargs="+", default=[2**18, 2**20, 2**22])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--summary-min-k", type=int, default=128)
    ap.add_argument("--balance-only", action="store_true",
                    help="only the mixed-model balance check, appended to mixed_model_balance_reruns "
                         "of the measurements in --out (timings on a loaded machine vary run to run)")
    ap.add_argument("--resummarize", action="store_true",
                    help="refit the summary of the measurements already in --out (no timing)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "calibrate_asgo_cost.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.balance_only:
        torch.set_num_threads(1)
        result = json.loads(Path(args.out).read_text())
        result.setdefault("mixed_model_balance_reruns", []).append(check_balance(args.reps, [2, 3, 4, 6]))
        Path(args.out).write_text(json.dumps(result, indent=1))
        return
    if args.resummarize:
        result = json.loads(Path(args.out).read_text())
        result["summary"] = summarize(result["roots"], result["gram_apply"], result["adamw"],
                                      args.summary_min_k)
        Path(args.out).write_text(json.dumps(result, indent=1))
        log.info("summary: %s", json.dumps(result["summary"], indent=1))
        return
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    load_before = os.getloadavg()
    roots = measure_roots(args.ks, args.reps, gen)
    gram_rows = measure_gram_apply(args.ks, args.others, args.reps)
    adam = measure_adam(args.adam_sizes, args.reps)
    balance = check_balance(args.reps, [2, 3, 4, 6])
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},  # no path of this machine
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "summary": summarize(roots, gram_rows, adam, args.summary_min_k),
        "roots": roots, "gram_apply": gram_rows, "adamw": adam, "mixed_model_balance": balance,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    log.info("summary: %s", json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
