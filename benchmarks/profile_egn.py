"""Where an EGN step's time goes: cProfile of W=1 steps on the bench_egn MLP, per phase.

Each phase is the cumulative CPU time (cProfile with process_time) of the function that implements it
(functions are nested,
so ``other`` is the step's total minus the named phases, which do not overlap). Single thread. The last
rows: the ATen operator calls of a step (mean of 5 steps, counted with a ``TorchDispatchMode`` as in
bench_step_overhead.py: deterministic and load-independent) and the CPU time of a step without the profiler
(median of 20).

    python benchmarks/profile_egn.py [--batches 16 64 256] [--steps 5] [--solve-dtype float64]
    python benchmarks/profile_egn.py --digits   # the report's digits workload with EGN-m's settings

``--digits``: the benchmark report's digits configuration instead of the bench MLP (report_runs: the MLP
64-128-128-10 on a batch of 32 digits, cross-entropy, ``EGN_SETTINGS["EGN-m"]`` at its lr 1).

(the package imported is the installed one: put a checkout first with PYTHONPATH=. to profile it)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import CountOps
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


def profile(b: int, steps: int, solve_dtype: str, line_search: bool, digits: bool = False) -> dict[str, float]:
    from lightning_soaa import EGN

    torch.set_num_threads(1)
    if digits:
        opt, x, y = _digits()
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--solve-dtype", default="float64")
    ap.add_argument("--line-search", action="store_true")
    ap.add_argument("--digits", action="store_true", help="the report's digits workload, EGN-m (b = 32)")
    args = ap.parse_args()
    if args.digits:
        args.batches = [32]
    table = {b: profile(b, args.steps, args.solve_dtype, args.line_search, args.digits) for b in args.batches}
    labels = list(dict.fromkeys(k for per in table.values() for k in per))
    print("| phase (ms/step, cProfile) | " + " | ".join(f"b={b}" for b in args.batches) + " |")
    print("|---|" + "---|" * len(args.batches))
    for k in labels:
        print(f"| {k} | " + " | ".join(f"{table[b].get(k, 0.0):.2f}" for b in args.batches) + " |")
    print(json.dumps({str(b): v for b, v in table.items()}))


if __name__ == "__main__":
    main()
