"""Where the report's ASGO-parts training step on ``chars`` goes, and the floor its arithmetic sets (issue 14).

The workload: ``report_runs``' ``chars`` (the demo's character transformer, d_model 64, 2 layers, batch 32, the
warm-up + cosine lr schedule), ASGO-parts at its best lr (0.03; ``asgo_param_groups(model, fused={"qkv.weight":
3})``, its defaults: ``root_every=1``, Nesterov, float64 eigendecomposition roots), against the project's
``ShardedAdamW`` (the registry's ``AdamW``, which the report's ``AdamW`` row took until 2026-12-06) and
torch's ``AdamW(fused=True)`` (the report's ``AdamW`` row since) at lr 0.01, each on its own seed-0 model and
batches, the three stepped in turn in the same process (the machine is shared: only ratios within one run
compare).

``phases``: every step's time split by thread-CPU-time timers wrapped around the functions that make each phase
(counted only inside ASGO's ``step()``; none inside another), ``rest`` is the step less their sum (the step's
Python, torch's ``Optimizer.step`` wrapper, the root batch's stacking, the counters); and the training step
(batch, forward, backward, ``step()``) of each optimizer, medians.

``floor``: the arithmetic an ASGO step of this model cannot avoid, timed alone on tensors of the step's shapes
(the live optimizer's Grams and gradients): the 13 float64 Grams (``gram_wide``: conversion and GEMM), the float64
eigendecomposition of their batch, ``Q diag(z) Q^T`` and ``P M``; with the AdamW fallback's share it gives the
lowest training-step ratio, and with ``--steps-ratio`` (ASGO-parts' steps to the target over AdamW's) the lowest
time-to-target ratio, that a step of this arithmetic alone could reach.

    python benchmarks/asgo_step_floor.py [--steps 100] [--steps-ratio 0.40]

(the package imported is the installed one: put a checkout first with PYTHONPATH=. to measure it)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import inspect
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report_runs as rr

#: (label, module path, owner attribute or "", function name): the step's phases, none inside another
PHASES: tuple[tuple[str, str, str, str], ...] = (
    ("checks before the exchange", "lightning_soaa.optim.asgo", "ASGO", "_check_before_exchange"),
    ("step checks (_check_step)", "lightning_soaa.optim.asgo", "ASGO", "_check_step"),
    ("block views", "lightning_soaa.optim.asgo", "ASGO", "_owned_views"),
    ("gradient scan (sum of squared norms)", "lightning_soaa.distributed.agreement", "", "grad_sq_tensor"),
    ("statistic guard", "lightning_soaa.optim.asgo", "ASGO", "_statistic_overflows"),
    ("AdamW fallback", "lightning_soaa.optim.asgo", "ASGO", "_adam_step"),
    ("momentum (multi-tensor lerp)", "torch", "", "_foreach_lerp_"),
    ("Gram: float64 V_t (to + addmm)", "lightning_soaa.functional.asgo", "", "gram_wide"),
    ("Gram: float64 V_t (to + addmm)", "lightning_soaa.functional.asgo", "", "grams_wide"),
    ("Gram: stored rounded (copy)", "torch", "", "_foreach_copy_"),
    ("roots: float64 eigh", "torch.linalg", "", "eigh"),
    ("roots: scales", "lightning_soaa.functional.linalg", "", "_spectral_scales"),
    ("roots: scalar map", "lightning_soaa.functional.linalg", "", "_mapped_by_map"),
    ("roots: Q diag(z) Q^T", "lightning_soaa.functional.linalg", "", "_compose"),
    ("roots: flags, acceptance", "lightning_soaa.optim.asgo", "ASGO", "_checked_roots"),
    ("roots: flags, acceptance", "lightning_soaa.optim.asgo", "ASGO", "_accept_roots"),
    ("Nesterov directions", "lightning_soaa.optim.asgo", "", "_small_directions"),
    ("P M", "lightning_soaa.functional.asgo", "", "precondition_checked"),
    ("RMS norms and factors", "lightning_soaa.optim.asgo", "ASGO", "_own_factors"),
    ("update W -= lr f U", "lightning_soaa.optim.asgo", "ASGO", "_apply_scaled_"),
)


@contextlib.contextmanager
def phase_timers(acc: dict[str, float], active: list[bool]) -> Iterator[None]:
    """:data:`PHASES` timed into ``acc`` (thread CPU seconds per label, only while ``active[0]``); put back
    after. A function this checkout does not have is left out (an older one: ``grams_wide``); a phase called
    inside another is counted as the outer one's."""
    undo = []
    depth = [0]
    for label, module, owner, name in PHASES:
        target: Any = importlib.import_module(module)
        if owner:
            target = getattr(target, owner)
        if not hasattr(target, name):
            continue
        raw = inspect.getattr_static(target, name)
        fn = raw.__func__ if isinstance(raw, staticmethod) else getattr(target, name)

        def timed(*args: Any, _fn: Callable[..., Any] = fn, _label: str = label, **kwargs: Any) -> Any:
            if not active[0] or depth[0]:  # (a phase inside another, grams_wide's copies: the outer one's)
                return _fn(*args, **kwargs)
            depth[0] += 1
            c0 = time.thread_time()
            try:
                return _fn(*args, **kwargs)
            finally:
                acc[_label] = acc.get(_label, 0.0) + time.thread_time() - c0
                depth[0] -= 1

        wrapped: Any = functools.wraps(fn)(timed)
        setattr(target, name, staticmethod(wrapped) if isinstance(raw, staticmethod) else wrapped)
        undo.append((target, name, raw))
    try:
        yield
    finally:
        for target, name, raw in reversed(undo):
            setattr(target, name, raw)


def _runs() -> dict[str, dict[str, Any]]:
    """The three optimizers on their own seed-0 models and batches, 5 untimed steps each."""
    w = rr.WORKLOADS["chars"]
    xtr, ytr, _, _ = rr.data("chars", False)
    runs: dict[str, dict[str, Any]] = {}
    for name, lr in (("ShardedAdamW", 0.01), ("torch AdamW(fused=True)", 0.01), ("ASGO-parts", 0.03)):
        model = rr.model_for("chars", 0)
        if name.startswith("torch"):
            opt: Any = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
        elif name == "ShardedAdamW":
            opt = rr._ours("AdamW", model, lr, w)[0]
        else:
            opt = rr.build(name, model, lr, w)[0][0]
        runs[name] = {"model": model, "opt": opt, "base": [g["lr"] for g in opt.param_groups], "t": 0,
                      "next": rr.batches(w, xtr, ytr, 0), "step": [], "train": []}
    return runs


def _train_step(run: dict[str, Any], active: list[bool], on: bool) -> None:
    """One training step (the report's: batch, lr, forward, backward, ``step()``), its times appended."""
    w, fn = rr.WORKLOADS["chars"], rr.loss_fn("chars")
    opt, model = run["opt"], run["model"]
    c0 = time.thread_time()
    x, y = run["next"]()
    f = rr.lr_factor(w, run["t"] % w.steps)
    run["t"] += 1
    for g, b in zip(opt.param_groups, run["base"]):
        g["lr"] = b * f
    opt.zero_grad(set_to_none=True)
    fn(model(x), y).backward()
    c1 = time.thread_time()
    active[0] = on
    opt.step()
    active[0] = False
    c2 = time.thread_time()
    run["step"].append(c2 - c1)
    run["train"].append(c2 - c0)


def phases(steps: int) -> tuple[dict[str, float], Any]:
    """ms per step of each phase of ASGO's step, and each optimizer's step and training step (medians); and the
    ASGO optimizer (for :func:`floor`)."""
    torch.set_num_threads(1)
    runs = _runs()
    active = [False]
    for _ in range(5):
        for run in runs.values():
            _train_step(run, active, False)
    for run in runs.values():
        run["step"].clear()
        run["train"].clear()
    acc: dict[str, float] = {}
    with phase_timers(acc, active):
        for _ in range(steps):
            for name, run in runs.items():
                _train_step(run, active, name == "ASGO-parts")
    asgo = runs["ASGO-parts"]
    out = {label: 1e3 * acc.get(label, 0.0) / steps for label in dict.fromkeys(p[0] for p in PHASES)}
    out["rest (Python, wrappers, counters, stacking)"] = 1e3 * sum(asgo["step"]) / steps - sum(out.values())
    out["ASGO step (mean)"] = 1e3 * sum(asgo["step"]) / steps
    for name, run in runs.items():
        out[f"{name}: step (median)"] = 1e3 * statistics.median(run["step"])
        out[f"{name}: training step (median)"] = 1e3 * statistics.median(run["train"])
    return out, asgo["opt"]


def _median_ms(fn: Callable[[], Any], reps: int = 100) -> float:
    fn()
    ts = []
    for _ in range(reps):
        c0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - c0)
    return 1e3 * statistics.median(ts)


def floor(opt: Any) -> dict[str, float]:
    """The step's unavoidable arithmetic alone (thread CPU ms, medians), on ``opt``'s live Grams, gradients and
    roots: the float64 Grams as ``gram_wide`` forms them, the batched float64 ``eigh``, ``Q diag(z) Q^T`` in
    float64 and the float32 ``P M`` of every matrix block."""
    from lightning_soaa.functional import asgo as asgo_math
    from lightning_soaa.optim.asgo import EXP_AVG, GRAM, INV_ROOT

    routes = opt._routes()
    blocks = [(v, routes[v.block.block_id]) for v in opt._owned_views() if routes[v.block.block_id] is not None]
    grams = [v.state[GRAM].clone() for v, _ in blocks]
    grads = [asgo_math.matrix_view(v.grad if v.grad is not None else v.state[EXP_AVG]) for v, _ in blocks]
    beta2 = [float(v.group["betas"][1]) for v, _ in blocks]
    wide = torch.stack([asgo_math.gram_wide(g, m, b, side) for g, m, b, (_, side) in zip(grams, grads, beta2, blocks)])
    evecs = torch.linalg.eigh(wide).eigenvectors
    z = torch.rand(wide.shape[0], 1, wide.shape[-1], dtype=torch.float64)
    roots = [v.state[INV_ROOT] for v, _ in blocks]
    moms = [v.state[EXP_AVG] for v, _ in blocks]
    sides = [side for _, side in blocks]
    if hasattr(asgo_math, "grams_wide"):  # into float64 tensors made once, as the step keeps them
        wides, g64s = [torch.empty_like(g, dtype=torch.float64) for g in grams], [
            torch.empty_like(m, dtype=torch.float64) for m in grads]
        gram_ms = _median_ms(lambda: asgo_math.grams_wide(grams, grads, beta2, sides, wides, g64s))
    else:
        gram_ms = _median_ms(lambda: [asgo_math.gram_wide(g, m, b, side) for g, m, b, side in
                                      zip(grams, grads, beta2, sides)])
    out = {
        "Grams (float64, to + addmm)": gram_ms,
        "eigh (float64 batch)": _median_ms(lambda: torch.linalg.eigh(wide)),
        "Q diag(z) Q^T (float64 bmm)": _median_ms(lambda: torch.bmm(evecs * z, evecs.transpose(-1, -2))),
        "P M (float32)": _median_ms(lambda: [asgo_math.precondition(p, m, side) for p, m, (_, side)
                                             in zip(roots, moms, blocks)]),
    }
    out["sum"] = sum(out.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="steps of each optimizer, in turn")
    ap.add_argument("--steps-ratio", type=float, default=0.40,
                    help="ASGO-parts' steps to the chars target over AdamW's (results/report.md: 200 / 500)")
    args = ap.parse_args()
    per, opt = phases(args.steps)
    low = floor(opt)
    for base in ("ShardedAdamW", "torch AdamW(fused=True)"):
        train, step = per[f"{base}: training step (median)"], per[f"{base}: step (median)"]
        fallback = per["AdamW fallback"]
        ratio = (train - step + fallback + low["sum"]) / train
        low[f"floor step ratio vs {base}"] = ratio
        low[f"floor time to target vs {base}"] = ratio * args.steps_ratio
        low[f"measured step ratio vs {base}"] = per["ASGO-parts: training step (median)"] / train
    for title, table in (("phase (thread CPU ms per step)", per), ("floor (thread CPU ms; ratios)", low)):
        print(f"| {title} | value |\n|---|---|")
        for k, v in table.items():
            print(f"| {k} | {v:.3f} |")
    print(json.dumps({"phases": per, "floor": low}))


if __name__ == "__main__":
    main()
