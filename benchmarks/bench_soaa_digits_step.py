"""Where a W = 1 SOAA training step on the report's ``digits`` workload spends time beyond torch's fused AdamW.

What is measured: the report's own ``digits`` run (``report_runs``: its model, batches and training step, i.e.
``zero_grad``, forward, backward, ``step``), torch's ``AdamW(fused=True)`` and SOAA (the registry's, as
``report_runs.build`` makes them), each on its own seed-0 model and batches, steps interleaved in one process
with a rotating order, one thread, CPU time of the process (``time.process_time_ns``): per round the median
training step and the median ``step()`` call, then the median over rounds and the ratios to fused AdamW.

``--breakdown`` also times, in place and inclusive (a wrapper of ~1 us around each, so the parts are a little
high), the parts of SOAA's planned step: the hand-over of the loss, the template's checks, the plan's check,
the two C calls (the raw ctypes calls apart from the Python around them), the trust region and the update.

Usage::

    python benchmarks/bench_soaa_digits_step.py                      # ~1 minute
    python benchmarks/bench_soaa_digits_step.py --rounds 7 --steps 400 --breakdown
"""

from __future__ import annotations

import argparse
import collections
import functools
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import report_runs as rr  # a sibling module: run this file as benchmarks/bench_soaa_digits_step.py
import torch

from lightning_soaa.kernels import soaa_native
from lightning_soaa.optim import base, soaa, soaa_plan

log = logging.getLogger("bench_soaa_digits_step")

#: (class, method) of the planned step's parts that --breakdown times
PARTS = [(soaa.SOAA, n) for n in ("_set_step_loss", "_planned_step", "_planned_groups", "_moment_sums", "_decision",
                                  "_update")]
PARTS += [(base.ShardedOptimizer, n) for n in ("_join_before_step", "_check_before_exchange",
                                               "_hyperparameter_error", "_local_nonfinite")]
PARTS += [(soaa_plan.NativePlan, n) for n in ("matches", "moments_partials", "step_partials_")]
PARTS += [(soaa_native.NativeSOAA, n) for n in ("sums_at", "step_at")]


def _timed(fn: Callable[..., Any], sink: list[int]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        c0 = time.process_time_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            sink.append(time.process_time_ns() - c0)

    return wrapper


def _instrument(acc: dict[str, list[int]], opt: Any) -> None:
    """Wrap the planned step's parts (class-wide) and the C kernels of ``opt``'s plan (the raw ctypes calls)."""
    for cls, name in PARTS:
        setattr(cls, name, _timed(cls.__dict__[name], acc[f"{cls.__name__}.{name}"]))
    native = next(iter(opt._plans().values())).native
    for (pass_, dtype), fn in list(native._fns.items()):
        native._fns[(pass_, dtype)] = _timed(fn, acc[f"C {pass_} pass (ctypes call)"])


def _runs(lr: float) -> dict[str, tuple[Any, Callable[..., None]]]:
    w = rr.WORKLOADS["digits"]
    out = {}
    for name in ("AdamW", "SOAA"):  # report_runs' AdamW is torch's AdamW(fused=True)
        opts, step = rr.build(name, rr.model_for("digits", 0), lr, w)
        out[name] = (opts[0], step)
    return out


def measure(rounds: int, steps: int, lr: float, breakdown: bool) -> dict[str, Any]:
    torch.set_num_threads(1)
    w = rr.WORKLOADS["digits"]
    xtr, ytr, _, _ = rr.data("digits", False)
    runs = _runs(lr)
    calls: dict[str, list[int]] = {n: [] for n in runs}
    feeds = {}
    for name, (opt, step) in runs.items():
        opt.step = _timed(opt.step, calls[name])  # this instance's step() calls (the instance attribute wins)
        feeds[name] = rr.batches(w, xtr, ytr, 0)
        for _ in range(5):  # untimed: lazy state, the C kernels' build, the step plan
            step(*feeds[name]())
    acc: dict[str, list[int]] = collections.defaultdict(list)
    if breakdown:
        _instrument(acc, runs["SOAA"][0])
    names = list(runs)
    per_round: dict[str, dict[str, list[float]]] = {n: {"train_us": [], "step_us": []} for n in names}
    for _ in range(rounds):
        train: dict[str, list[int]] = {n: [] for n in names}
        for n in names:
            calls[n].clear()
        for i in range(steps):
            for n in names[i % 2:] + names[:i % 2]:
                x, y = feeds[n]()
                c0 = time.process_time_ns()
                runs[n][1](x, y)
                train[n].append(time.process_time_ns() - c0)
        for n in names:
            per_round[n]["train_us"].append(statistics.median(train[n]) / 1e3)
            per_round[n]["step_us"].append(statistics.median(calls[n]) / 1e3)
    parts = {k: statistics.median(v) / 1e3 for k, v in acc.items() if v}  # (a part never called: left out)
    return {"rounds": per_round, "parts_us": parts}


def report(res: dict[str, Any]) -> None:
    med = statistics.median
    r = res["rounds"]
    for n, vals in r.items():
        log.info("%-6s step() %7.1f us (rounds %.1f-%.1f), training step %7.1f us (rounds %.1f-%.1f)", n,
                 med(vals["step_us"]), min(vals["step_us"]), max(vals["step_us"]), med(vals["train_us"]),
                 min(vals["train_us"]), max(vals["train_us"]))
    for key in ("step_us", "train_us"):
        ratios = [s / a for s, a in zip(r["SOAA"][key], r["AdamW"][key])]
        log.info("SOAA / fused AdamW, %s: %.3f (rounds %.3f-%.3f)", key, med(ratios), min(ratios), max(ratios))
    for k, v in res["parts_us"].items():
        log.info("  %-40s %7.1f us", k, v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--breakdown", action="store_true", help="also time the parts of SOAA's planned step")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report(measure(args.rounds, args.steps, args.lr, args.breakdown))


if __name__ == "__main__":
    main()
