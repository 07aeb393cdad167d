"""Where an EGN step's time goes: cProfile of W=1 steps on the bench_egn MLP, per phase.

Each phase is the cumulative CPU time (cProfile with process_time) of the function that implements it
(functions are nested,
so ``other`` is the step's total minus the named phases, which do not overlap). Single thread. The last
rows: the ATen operator calls of a step (mean of 5 steps, counted with a ``TorchDispatchMode`` as in
bench_step_overhead.py: deterministic and load-independent) and the CPU time of a step without the profiler
(median of 20).

    python benchmarks/profile_egn.py [--batches 16 64 256] [--steps 5] [--solve-dtype float64]
    python benchmarks/profile_egn.py --digits   # the report's digits workload with EGN-m's settings
    python benchmarks/profile_egn.py --ab [--batches 16 32 64 256] [--rounds 60]
    python benchmarks/profile_egn.py --tabular digits --batches 16 32 64   # --ab's MLP, profiled

``--ab``: the step plan of one process (``optim/egn_plan.py``) against the general path (the template) in one
process, alternated step by step on two copies of the same model and batches (the time-to-target MLPs
20-32-32-2 and 64-32-32-10, cross-entropy, lr 1, λ 0.5, line search): median CPU ms of each, the median of the
per-round ratios (adjacent steps share the machine's load), ATen calls and host reads per step of each.

``--digits``: the benchmark report's digits configuration instead of the bench MLP (report_runs: the MLP
64-128-128-10 on a batch of 32 digits, cross-entropy, ``EGN_SETTINGS["EGN-m"]`` at its lr 1).

(the package imported is the installed one: put a checkout first with PYTHONPATH=. to profile it)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import CountOps, CountReads
from bench_egn import SIZES, _mlp

# (label, file suffix, function name[, only the time under this caller]); none of these calls another
# in the list (gram_matvec also runs inside solve_damped's refinement: that part counts as the solve)
PHASES: tuple[tuple[str, ...], ...] = (
    ("capture forward + loss", "optim/egn.py", "_forward_capture"),
    ("back signals", "optim/egn_capture.py", "checked_back_signals"),
    ("back signals", "optim/egn_chain.py", "local_factors"),  # a plain MLP's chain rule (egn_chain)
    ("factor packing", "optim/egn_capture.py", "factors"),
    ("factor packing", "functional/gram.py", "pack_factor_table"),
    ("Gram assembly", "functional/gram.py", "assemble_gram"),
    ("residual, Q factors", "functional/egn.py", "residual_and_factor"),
    ("solve", "functional/egn.py", "solve_coefficients"),
    ("solve", "functional/egn.py", "solve_damped"),
    ("solve", "functional/egn.py", "solve_damped_cg"),
    ("solve", "functional/gram.py", "__init__", "_solve_system"),  # GramOperator set-up
    ("K mat-vecs, S^T J factors", "functional/gram.py", "gram_matvec", "_solve"),
    ("K mat-vecs, S^T J factors", "functional/gram.py", "transform_factors"),
    ("VJPs d = J^T v", "optim/egn.py", "_vjps"),
    ("trial losses (line search)", "optim/egn.py", "_trial_loss"),
    # the step plan of one process training a plain MLP (optim/egn_plan.py), where it applies
    ("plan's checks", "optim/egn_plan.py", "usable"),
    ("capture forward + loss", "optim/egn_plan.py", "outputs"),
    ("back signals", "optim/egn_chain.py", "back_signals", "_curvature"),  # (the chain capture's: local_factors)
    ("Gram assembly", "functional/chain_gram.py", "gram"),
    ("Gram assembly", "functional/chain_gram.py", "gram_lower"),  # the plan's kept SᵀKS of a larger system
    ("K mat-vecs, S^T J factors", "functional/chain_gram.py", "gram_matvec"),
    ("K mat-vecs, S^T J factors", "functional/chain_gram.py", "transform"),
    ("VJPs d = J^T v", "functional/chain_gram.py", "vjp_into"),
    ("trial losses (line search)", "optim/egn_plan.py", "_trial"),
)


def _ops_per_step(opt: Any, x: torch.Tensor, y: torch.Tensor, steps: int = 5) -> float:
    with CountOps() as mode:
        for _ in range(steps):
            opt.step(inputs=x, targets=y)
    return mode.n / steps


def _digits() -> tuple[Any, torch.Tensor, torch.Tensor]:
    """EGN-m on the report's digits MLP and its first training batch (report_runs' own builders)."""
    import report_runs as rr

    w = rr.WORKLOADS["digits"]
    xtr, ytr, _, _ = rr.data(w.name, False)
    opts, _ = rr.build("EGN-m", rr.model_for(w.name, 0), 1.0, w)
    x, y = rr.batches(w, xtr, ytr, 0)()
    return opts[0], x, y


def profile(b: int, steps: int, solve_dtype: str, line_search: bool, digits: bool = False,
            tabular: str = "") -> dict[str, float]:
    from lightning_soaa import EGN

    torch.set_num_threads(1)
    if digits:
        opt, x, y = _digits()
    elif tabular:  # --ab's model and settings (the time-to-target MLP), one batch
        opt = _ab_egn(AB_MODELS[tabular])
        g = torch.Generator().manual_seed(1)
        x = torch.randn(b, AB_MODELS[tabular][0], generator=g)
        y = torch.randint(0, AB_MODELS[tabular][-1], (b,), generator=g)
    else:
        model = _mlp()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(b, SIZES[0], generator=g)
        y = torch.randint(0, SIZES[-1], (b,), generator=g)
        opt = EGN(model, loss="cross_entropy", lr=0.5, damping=1.0, max_gram_size=1 << 14,
                  solve_dtype=solve_dtype, line_search=line_search)
    opt.step(inputs=x, targets=y)  # warm-up
    prof = cProfile.Profile(time.process_time)  # CPU time: the machine is shared
    prof.enable()
    for _ in range(steps):
        opt.step(inputs=x, targets=y)
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    out: dict[str, float] = {}
    total = 0.0
    for (file, _line, func), (_cc, _nc, _tt, ct, callers) in stats.items():
        if func == "step" and file.endswith("optim/egn.py"):
            total += ct
        for label, suffix, name, *caller in PHASES:
            if func == name and file.endswith(suffix):
                if caller:  # only the calls made directly by that caller
                    ct = sum(v[3] for k, v in callers.items() if k[2] == caller[0])
                out[label] = out.get(label, 0.0) + ct
    per = {k: 1e3 * v / steps for k, v in out.items()}
    per["other (template, exchanges, checks)"] = 1e3 * total / steps - sum(per.values())
    per["step total"] = 1e3 * total / steps
    per["ATen ops per step"] = _ops_per_step(opt, x, y)
    cpu = []
    for _ in range(20):
        c0 = time.process_time()
        opt.step(inputs=x, targets=y)
        cpu.append(time.process_time() - c0)
    per["step CPU ms, no profiler (median)"] = 1e3 * sorted(cpu)[len(cpu) // 2]
    st = opt.statistics()
    per["CG mat-vecs (last step)"] = float(st.get("solve_cg_iterations", 0.0))
    per["refinement sweeps (last step)"] = float(st.get("solve_refinements", 0.0))
    return per


#: --ab's workloads: the time-to-target MLPs (benchmarks/egn_time_to_target.py), d_in-32-32-c
AB_MODELS = {"synthetic": (20, 32, 32, 2), "digits": (64, 32, 32, 10)}


def _ab_egn(widths: tuple[int, ...]) -> Any:
    """EGN on a d_in-h-h-c tanh MLP (seed 0) with --ab's settings: cross-entropy, lr 1, λ 0.5, line search."""
    from torch import nn

    from lightning_soaa import EGN

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.Tanh()]
    return EGN(nn.Sequential(*layers[:-1]), loss="cross_entropy", lr=1.0, damping=0.5, line_search=True,
               max_gram_size=1 << 14)


def _reads_and_ops(opt: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(ATen calls, host reads) of one step."""
    with CountReads() as count:
        opt.step(inputs=x, targets=y)
    return count.n, count.reads


def ab(widths: tuple[int, ...], b: int, rounds: int) -> dict[str, float]:
    """The step plan vs the general path, alternated in this process (see the module docstring)."""
    torch.set_num_threads(1)
    opts = []
    for planned in (True, False):
        opt = _ab_egn(widths)
        if not planned:
            opt._planned_step = lambda: False  # every step through the template
        opts.append(opt)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(b, widths[0], generator=g), torch.randint(0, widths[-1], (b,), generator=g))
            for _ in range(4)]
    for opt in opts:
        for x, y in data:
            opt.step(inputs=x, targets=y)
    times: list[list[float]] = [[], []]
    for r in range(rounds):
        x, y = data[r % len(data)]
        for i in (0, 1) if r % 2 else (1, 0):
            c0 = time.process_time()
            opts[i].step(inputs=x, targets=y)
            times[i].append(time.process_time() - c0)
    same = all(torch.equal(p, q) for p, q in zip(opts[0].model.parameters(), opts[1].model.parameters()))
    (ops_p, reads_p), (ops_g, reads_g) = (_reads_and_ops(o, *data[0]) for o in opts)
    return {"plan_ms": 1e3 * statistics.median(times[0]), "general_ms": 1e3 * statistics.median(times[1]),
            "ratio": statistics.median(a / b for a, b in zip(*times)), "identical": float(same),
            "plan_aten": ops_p, "general_aten": ops_g, "plan_reads": reads_p, "general_reads": reads_g}


def main_ab(batches: list[int], rounds: int) -> None:
    rows = {f"{name} b={b}": ab(widths, b, rounds if b < 256 else max(rounds // 4, 10))
            for name, widths in AB_MODELS.items() for b in batches}
    print("| model, batch | plan ms | general ms | plan/general | ATen calls | host reads | same bits |")
    print("|---|---|---|---|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v['plan_ms']:.2f} | {v['general_ms']:.2f} | {v['ratio']:.2f} | {v['plan_aten']} / "
              f"{v['general_aten']} | {v['plan_reads']} / {v['general_reads']} | {bool(v['identical'])} |")
    print(json.dumps(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--solve-dtype", default="float64")
    ap.add_argument("--line-search", action="store_true")
    ap.add_argument("--digits", action="store_true", help="the report's digits workload, EGN-m (b = 32)")
    ap.add_argument("--tabular", choices=sorted(AB_MODELS), default="",
                    help="profile --ab's time-to-target MLP (lr 1, λ 0.5, line search) instead of the bench MLP")
    ap.add_argument("--ab", action="store_true", help="the step plan vs the general path, alternated")
    ap.add_argument("--rounds", type=int, default=60, help="--ab: alternated steps of each")
    args = ap.parse_args()
    if args.ab:
        main_ab(args.batches, args.rounds)
        return
    if args.digits:
        args.batches = [32]
    table = {b: profile(b, args.steps, args.solve_dtype, args.line_search, args.digits, args.tabular)
             for b in args.batches}
    labels = list(dict.fromkeys(k for per in table.values() for k in per))
    print("| phase (ms/step, cProfile) | " + " | ".join(f"b={b}" for b in args.batches) + " |")
    print("|---|" + "---|" * len(args.batches))
    for k in labels:
        print(f"| {k} | " + " | ".join(f"{table[b].get(k, 0.0):.2f}" for b in args.batches) + " |")
    print(json.dumps({str(b): v for b, v in table.items()}))


if __name__ == "__main__":
    main()
