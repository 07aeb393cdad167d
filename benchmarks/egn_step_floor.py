"""Where a W = 1 EGN step on the digits time-to-target workload goes, and the floor its arithmetic sets (issue 14).

The workload: ``egn_time_to_target``'s digits MLP 64-32-32-10 (tanh, float32), cross-entropy, batch 32, EGN at its
best digits setting there (lr 1.5, λ 0.5, line search; the step plan of one process, float64 solve: bc' = 288),
against torch's fused AdamW (lr 2e-2) training step on the same batches.

``phases``: every step's time split by thread-CPU-time timers wrapped around the functions that make each phase
(not cProfile, which inflates the many small calls); the phases do not nest, ``rest`` is the step less their sum
(the plan's own code: copies into the solve's buffers, the losses, finiteness, momentum, Python). EGN and AdamW
steps alternate in the same rounds (the machine is shared).

``floor``: the arithmetic that a float64 EGN step cannot avoid at this size, timed alone on buffers of the step's
shapes: the lower triangle of SᵀKS (its GEMMs and element-wise products, ``ChainSystem.gram_lower``), its
Cholesky factorization and the two triangular solves; the same in float32, and one float64 refinement sweep's
operator product (``ChainOperator``), which a float32 factorization needs ~2 times to reach float64 accuracy
(``functional/egn._converged``; 3 before it).
From these and the steps EGN takes against AdamW (``--steps-ratio``: the median of the JSON's digits runs), the
lowest time-to-target ratio a step of that arithmetic alone could give.

``routes`` (``--routes``): the float64 direct solve against the mixed-precision route that issue 14 proposes
for this size (the Gram and its Cholesky in float32, refined to float64 accuracy with the exact float64
operator, ``EGN._solve_system``'s route 2, taken here by lowering ``MIXED_MIN_SIZE`` for one of two optimizers
on identical copies of the model), alternated step by step on the same batches: each route's step time, its
refinement sweeps, the parameters' difference at the end, and the condition number of the systems (bλ-damped,
so at most 1 + ‖SᵀKS‖/(bλ): it sets how fast the refinement converges). ``--model report`` takes the
report's digits MLP 64-128-128-10 (``report_runs``, EGN-m's setting) as an ``nn.Sequential`` (the step plan)
and adds the report's own ``DigitsMLP`` (a LightningModule wrapping its layers: the step plan, ``egn_wrapped``)
twice: through the plan and through the general path (the plan turned off, as it stepped before).

    python benchmarks/egn_step_floor.py [--steps 60] [--steps-ratio 0.62]
    python benchmarks/egn_step_floor.py --routes [--model t2t|report] [--steps 60]

(the package imported is the installed one: put a checkout first with PYTHONPATH=. to measure it)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import egn_time_to_target as t2t
from _timing import median_cpu_s

#: (label, module path, owner attribute or "", function name): the step's phases, none inside another
PHASES: tuple[tuple[str, str, str, str], ...] = (
    ("plan's checks", "lightning_soaa.optim.egn_plan", "StepPlan", "usable"),
    ("forward (inputs kept)", "lightning_soaa.optim.egn_plan", "StepPlan", "outputs"),
    ("back-signals (chain rule)", "lightning_soaa.optim.egn_plan", "", "back_signals"),
    ("residual r, CE factor S", "lightning_soaa.functional.egn", "", "residual_and_factor"),
    ("K·r (factor mat-vec)", "lightning_soaa.functional.chain_gram", "ChainSystem", "gram_matvec"),
    ("SᵀΔ", "lightning_soaa.functional.chain_gram", "ChainSystem", "transform"),
    ("Gram: lower SᵀKS", "lightning_soaa.functional.chain_gram", "ChainSystem", "gram_lower"),
    ("Cholesky", "torch.linalg", "", "cholesky_ex"),
    ("triangular solves", "lightning_soaa.functional.egn", "", "_cholesky_refined"),
    ("d = Jᵀv", "lightning_soaa.functional.chain_gram", "ChainWork", "vjp_into"),
    ("w0 copy", "lightning_soaa.optim.egn_plan", "StepPlan", "_copy_of_params"),
    ("line search (trials)", "lightning_soaa.optim.egn", "EGN", "_step_size"),
    ("commit (state, statistics)", "lightning_soaa.optim.egn", "EGN", "_commit"),
)


@contextlib.contextmanager
def phase_timers(acc: dict[str, float]) -> Iterator[None]:
    """:data:`PHASES` timed into ``acc`` (thread CPU seconds per label) while in the context; put back after."""
    import importlib

    undo = []
    for label, module, owner, name in PHASES:
        target: Any = importlib.import_module(module)
        if owner:
            target = getattr(target, owner)
        fn = getattr(target, name)

        def timed(*args: Any, _fn: Callable[..., Any] = fn, _label: str = label, **kwargs: Any) -> Any:
            c0 = time.thread_time()
            try:
                return _fn(*args, **kwargs)
            finally:
                acc[_label] = acc.get(_label, 0.0) + time.thread_time() - c0

        setattr(target, name, functools.wraps(fn)(timed))
        undo.append((target, name, fn))
    try:
        yield
    finally:
        for target, name, fn in reversed(undo):
            setattr(target, name, fn)


def phases(steps: int) -> dict[str, float]:
    """ms per step of each phase, the EGN step and fused AdamW's training step (alternated, real digits batches)."""
    from lightning_soaa import EGN

    torch.set_num_threads(1)
    xtr, ytr, _, _ = t2t.load("digits")
    egn = EGN(t2t._mlp(64, 10, 0), loss="cross_entropy", lr=1.5, damping=0.5, line_search=True)
    model = t2t._mlp(64, 10, 0)
    adamw = torch.optim.AdamW(model.parameters(), lr=2e-2, fused=True)

    def adamw_step(x: torch.Tensor, y: torch.Tensor) -> None:
        adamw.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        adamw.step()

    g = torch.Generator().manual_seed(1000)
    perm = torch.randperm(len(ytr), generator=g)
    batches = [(xtr[perm[i:i + 32]], ytr[perm[i:i + 32]]) for i in range(0, len(ytr) - 31, 32)]
    for x, y in batches[:5]:  # warm-up: the plan, its buffers, AdamW's state
        egn.step(inputs=x, targets=y)
        adamw_step(x, y)
    acc: dict[str, float] = {}
    egn_t, adamw_t = [], []
    with phase_timers(acc):
        for k in range(steps):
            x, y = batches[(5 + k) % len(batches)]
            c0 = time.thread_time()
            egn.step(inputs=x, targets=y)
            c1 = time.thread_time()
            adamw_step(x, y)
            egn_t.append(c1 - c0)
            adamw_t.append(time.thread_time() - c1)
    out = {label: 1e3 * acc.get(label, 0.0) / steps for label, *_ in PHASES}
    out["rest (plan's own code, Python)"] = 1e3 * sum(egn_t) / steps - sum(out.values())
    out["EGN step (mean)"] = 1e3 * sum(egn_t) / steps
    out["EGN step (median)"] = 1e3 * statistics.median(egn_t)
    out["fused AdamW training step (median)"] = 1e3 * statistics.median(adamw_t)
    return out


def _median_ms(fn: Callable[[], Any], reps: int = 200) -> float:
    """Median CPU milliseconds of ``fn()`` after one untimed call (one thread: the process's CPU time is its)."""
    return 1e3 * median_cpu_s(fn, reps)


def _system(dtype: torch.dtype) -> Any:
    """A ChainSystem of the digits step's shapes (b = 32, c = 10, c' = 9; sites 64→32, 32→32, 32→10, the last the
    identity) on random factors, its row blocks the Cholesky's staircase."""
    from lightning_soaa.functional.chain_gram import ChainSystem, ChainWork
    from lightning_soaa.functional.gram import LinearFactorShape, _row_blocks

    b, c, cp = 32, 10, 9
    sites = [LinearFactorShape(1, 64, 32), LinearFactorShape(1, 32, 32), LinearFactorShape(1, 32, 10)]
    g = torch.Generator().manual_seed(0)
    work = ChainWork(sites, b, c, dtype, torch.device("cpu"), identity=2, dense=False)
    for a in work.inputs:
        a.copy_(torch.randn(a.shape, generator=g))
    for d in work.signals[:2]:
        d.copy_(torch.randn(d.shape, generator=g))
    system = ChainSystem(work, cp, _row_blocks(b, cp, lower_only=True))
    system.transform(torch.randn(b, cp, c, generator=g, dtype=dtype))
    return system


def floor(adamw_ms: float, steps_ratio: float) -> dict[str, float]:
    """ms of the arithmetic a float64 step cannot avoid (and its float32 counterparts), and the bound it sets."""
    torch.set_num_threads(1)
    out: dict[str, float] = {}
    for dtype, tag in ((torch.float64, "float64"), (torch.float32, "float32")):
        system = _system(dtype)
        out[f"Gram (lower SᵀKS), {tag}"] = _median_ms(system.gram_lower)
        k = system.gram_lower().clone()
        n = k.shape[0]
        k.diagonal().add_(32 * 0.5 + float(k.diagonal().max()))  # + bλ (and SPD whatever the random factors)
        out[f"Cholesky {n}, {tag}"] = _median_ms(lambda k=k: torch.linalg.cholesky_ex(k))
        chol = torch.linalg.cholesky_ex(k)[0]
        rhs = torch.randn(n, 1, dtype=dtype)

        def solves(chol: torch.Tensor = chol, rhs: torch.Tensor = rhs) -> None:
            y = torch.linalg.solve_triangular(chol, rhs, upper=False)
            torch.linalg.solve_triangular(chol.mH, y, upper=True)

        out[f"two triangular solves, {tag}"] = _median_ms(solves)
        if dtype == torch.float64:
            op = system.apply()
            u = torch.randn(n, dtype=dtype)
            out["refinement sweep's float64 operator product"] = _median_ms(lambda op=op, u=u: op(u))
    arith = sum(v for k, v in out.items() if k.endswith("float64") and not k.startswith("refinement"))
    out["float64 arithmetic floor (Gram + Cholesky + solves)"] = arith
    out["fused AdamW training step"] = adamw_ms
    out["floor / AdamW step"] = arith / adamw_ms
    out["steps ratio (EGN / AdamW)"] = steps_ratio
    out["time-to-target ratio of the floor alone"] = steps_ratio * arith / adamw_ms
    return out


#: the arm of --model report that steps through the general path (the step plan turned off: how the report's
#: DigitsMLP stepped before the plan took wrappers, egn_wrapped)
GENERAL = "report's DigitsMLP (general path)"


def _route_models(model: str) -> tuple[list[tuple[str, nn.Module]], dict[str, Any], Any]:
    """The arms of :func:`routes` (label, model: identical initial functions), EGN's settings, a batch drawer."""
    if model == "t2t":
        xtr, ytr, _, _ = t2t.load("digits")
        arms = [(label, t2t._mlp(64, 10, 0)) for label in ("float64 direct", "mixed (float32 + refinement)")]
        perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(1000))
        batches = [(xtr[perm[i:i + 32]], ytr[perm[i:i + 32]]) for i in range(0, len(ytr) - 31, 32)]
        drawn = iter(batches * 1000)  # (phases' batches, in turn)
        return arms, {"loss": "cross_entropy", "lr": 1.5, "damping": 0.5, "line_search": True}, drawn.__next__
    import copy

    import report_runs as rr

    w = rr.WORKLOADS["digits"]
    xtr, ytr, _, _ = rr.data("digits", False)
    own = rr.model_for("digits", 0)  # the report's DigitsMLP (64-128-128-10)
    seq = nn.Sequential(*copy.deepcopy(list(own.body)), copy.deepcopy(own.head))  # the same layers and values
    arms = [("float64 direct", seq), ("mixed (float32 + refinement)", copy.deepcopy(seq)),
            ("report's DigitsMLP (step plan)", own), (GENERAL, copy.deepcopy(own))]
    settings = {"loss": "cross_entropy", "lr": 1.0, **rr.EGN_SETTINGS["EGN-m"]}
    return arms, settings, rr.batches(w, xtr, ytr, 0)


def _conditioning(settings: dict[str, Any], module: nn.Module, draw: Any, steps: int) -> list[float]:
    """κ(SᵀKS + bλI) of the systems the float64 direct solve factors over ``steps`` steps (a fresh run)."""
    from lightning_soaa import EGN
    from lightning_soaa.optim import egn as egn_module

    kappas: list[float] = []
    direct = egn_module.EGN._direct_solve

    def recorded(self: Any, base: torch.Tensor, r: torch.Tensor, st_kr: torch.Tensor, s: Any, b: int) -> Any:
        low = base.tril()  # (the assembly fills the lower triangle and the diagonal blocks)
        ev = torch.linalg.eigvalsh(low + low.tril(-1).T)
        lam_b = b * self.damping
        kappas.append(float((ev[-1] + lam_b) / (ev[0] + lam_b)))
        return direct(self, base, r, st_kr, s, b)

    opt = EGN(module, **settings)
    egn_module.EGN._direct_solve = recorded  # type: ignore[method-assign]
    try:
        for _ in range(steps):
            x, y = draw()
            opt.step(inputs=x, targets=y)
    finally:
        egn_module.EGN._direct_solve = direct  # type: ignore[method-assign]
    return kappas


def routes(steps: int, model: str) -> dict[str, Any]:
    """ms per step of each arm of :func:`_route_models` alternated in one process (the order rotated each
    round), the mixed route's sweeps, the parameters' largest relative difference from the float64 arm."""
    import copy

    from lightning_soaa import EGN
    from lightning_soaa.optim import egn as egn_module

    torch.set_num_threads(1)
    arms, settings, draw = _route_models(model)
    fresh = copy.deepcopy(arms[0][1])
    opts = [EGN(m, **settings) for _, m in arms]
    for (label, _), opt in zip(arms, opts):
        if label == GENERAL:
            opt._planned_step = lambda: False  # type: ignore[method-assign]
    size = {label: egn_module.MIXED_MIN_SIZE for label, _ in arms}
    size["mixed (float32 + refinement)"] = 1  # route 2 at every size (bc' = 288 here)
    times: dict[str, list[float]] = {label: [] for label, _ in arms}
    sweeps: list[float] = []
    kept = egn_module.MIXED_MIN_SIZE
    try:
        for k in range(steps + 5):
            x, y = draw()
            order = list(zip(arms, opts))
            order = order[k % len(order):] + order[:k % len(order)]
            for (label, _), opt in order:
                egn_module.MIXED_MIN_SIZE = size[label]
                c0 = time.thread_time()
                opt.step(inputs=x, targets=y)
                if k >= 5:  # (5 untimed: the plans, their buffers)
                    times[label].append(time.thread_time() - c0)
            sweeps.append(opts[1]._last.get("solve_refinements", float("nan")))
    finally:
        egn_module.MIXED_MIN_SIZE = kept
    ref = [p.detach() for p in arms[0][1].parameters()]
    out: dict[str, Any] = {f"{label} step (median ms)": 1e3 * statistics.median(t) for label, t in times.items()}
    for label, m in arms[1:]:
        out[f"{label} / float64 direct (median of per-round ratios)"] = statistics.median(
            a / b for a, b in zip(times[label], times["float64 direct"]))
        out[f"{label}: parameters' largest relative difference from float64 direct"] = max(
            float((p.detach() - q).norm() / q.norm()) for p, q in zip(m.parameters(), ref))
    if GENERAL in times:
        out["report's DigitsMLP: step plan / general path (median of per-round ratios)"] = statistics.median(
            a / b for a, b in zip(times["report's DigitsMLP (step plan)"], times[GENERAL]))
    out["mixed route's refinement sweeps (min, max)"] = [min(sweeps), max(sweeps)]
    kappas = _conditioning(settings, fresh, _route_models(model)[2], min(steps, 30))
    out["κ(SᵀKS + bλI) (min, median, max)"] = [min(kappas), statistics.median(kappas), max(kappas)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="alternated EGN / AdamW steps timed")
    ap.add_argument("--steps-ratio", type=float, default=0.62,
                    help="EGN's steps to the digits target over AdamW's (bench_egn.json's median: 0.62)")
    ap.add_argument("--routes", action="store_true", help="time the float64 direct solve against the mixed route")
    ap.add_argument("--model", choices=("t2t", "report"), default="t2t",
                    help="--routes' model: egn_time_to_target's digits MLP or the report's (64-128-128-10)")
    args = ap.parse_args()
    if args.routes:
        tables = {"routes (thread CPU ms per step, alternated)": routes(args.steps, args.model)}
    else:
        per = phases(args.steps)
        low = floor(per["fused AdamW training step (median)"], args.steps_ratio)
        tables = {"phase (thread CPU ms per step)": per, "floor (thread CPU ms)": low}
    for title, table in tables.items():
        print(f"| {title} | value |\n|---|---|")
        for k, v in table.items():
            print(f"| {k} | {v if isinstance(v, list) else f'{v:.3f}'} |")
    print(json.dumps(tables))


if __name__ == "__main__":
    main()
