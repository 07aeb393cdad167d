"""The main job: SOAA, EGN, ASGO and AdamW on real (offline) data, 2 CPU processes, Lightning DDP.

Run::

    bash dev.sh main                         # the comparison (a few minutes on 2 cores)
    python examples/main_job.py --quick      # CI smoke run (well under 2 minutes)

Two tasks, each trained by every optimizer with the same seed, model initialisation, data order and
number of optimizer steps:

* ``digits``: a tanh MLP (64-128-128-10) on scikit-learn's ``load_digits`` (EGN applies: a small
  classifier whose bc x bc Gram matrix is cheap);
* ``chars``: a 2-layer character-level transformer on the standard library's ``pydoc_data.topics`` text
  (EGN is not run here: b * context * vocab outputs make its Gram system far too large).

Every run uses ``Trainer(accelerator="cpu", devices=2, strategy="ddp")``: Lightning re-launches this
script for rank 1, both processes run the same sequence of fits, and the sharded optimizers split their
state across the two ranks. Rank 0 prints a table (final train/val loss and accuracy, wall time, steps,
the best validation loss and the time each optimizer took to reach AdamW's final validation loss) and
writes ``results.csv`` (one row per validation point: step 0, then ten more), ``summary.csv`` and
``val_loss.png`` (validation loss, log scale, against step and against training time; one colour per
optimizer) to ``--out``.

Timing: every (task, optimizer) pair first runs a few untimed steps (:data:`WARMUP_STEPS`), so imports,
lazy initialisation and compiled kernels are not charged to whichever run comes first. Times are then
measured on rank 0 from ``on_train_start`` to ``on_train_end`` (process launch and setup excluded);
"train s" and the time axis of the curves also exclude validation passes.

This script is an example, not part of the installed package: ``bash dev.sh main`` runs it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_soaa.lightning.callbacks import BatchToOptimizer, LossToOptimizer, OptimizerDiagnostics
from lightning_soaa.lightning.demo import CharTransformer, DigitsDataModule, DigitsMLP, TopicsDataModule
from lightning_soaa.lightning.factory import OptimizerFactory, attach_optimizer

__all__ = ["main", "TASKS", "Budget"]

log = logging.getLogger(__name__)
# The job's report (headers, the results table) goes to stdout through this logger; main() attaches
# the handler, so importing the module configures nothing.
report = logging.getLogger(__name__ + ".report")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
    """Steps and validation cadence of one task (identical for every optimizer)."""

    max_steps: int
    val_every: int


# Per task: optimizer name -> (class path, init args). Learning rates are each method's usual choice
# for a model of this size (AdamW 3e-3/1e-3, ASGO's 1e-2 peak, SOAA = AdamW's lr, EGN's damped GN step).
TASKS: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "digits": {
        "AdamW": ("lightning_soaa.AdamW", {"lr": 3e-3, "weight_decay": 0.0}),
        "SOAA": ("lightning_soaa.SOAA", {"lr": 3e-3}),
        "ASGO": ("lightning_soaa.ASGO", {"lr": 1e-2, "weight_decay": 0.0}),
        "EGN": ("lightning_soaa.EGN", {"loss": "cross_entropy", "lr": 1.0, "damping": 1.0,
                                       "line_search": True}),
    },
    "chars": {
        "AdamW": ("lightning_soaa.AdamW", {"lr": 3e-3, "weight_decay": 0.0}),
        "SOAA": ("lightning_soaa.SOAA", {"lr": 3e-3}),
        "ASGO": ("lightning_soaa.ASGO", {"lr": 1e-2, "weight_decay": 0.0}),
    },
}

# Ten validation points per run, plus step 0 (the untrained model, from Lightning's sanity check).
BUDGETS = {
    "full": {"digits": Budget(max_steps=300, val_every=30), "chars": Budget(max_steps=300, val_every=30)},
    "quick": {"digits": Budget(max_steps=40, val_every=4), "chars": Budget(max_steps=30, val_every=3)},
}

#: untimed steps per (task, optimizer) before the timed runs: imports, lazy initialisation, compiled
#: kernels and allocator growth are paid here, so the time axis does not depend on run order
WARMUP_STEPS = 5

#: one colour per optimizer, the same in every panel
COLORS = {"AdamW": "tab:blue", "SOAA": "tab:orange", "EGN": "tab:green", "ASGO": "tab:red"}


# Warnings that say nothing about this job (environment hints, third-party deprecations, worker counts).
_NOISE = (".*srun.*", ".*treespec.*", ".*does not have many workers.*", ".*LeafSpec.*", ".*litlogger.*")


def _build(task: str, quick: bool) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    if task == "digits":
        return DigitsMLP(hidden=(128, 128)), DigitsDataModule(batch_size=32 if quick else 64)
    if quick:
        return (CharTransformer(context=32, d_model=32, n_heads=2, n_layers=1),
                TopicsDataModule(context=32, batch_size=16, max_val_windows=64))
    return (CharTransformer(context=64, d_model=64, n_heads=4, n_layers=2),
            TopicsDataModule(context=64, batch_size=32))


class CurveRecorder(pl.Callback):
    """Validation curve against step and training time (validation excluded), plus exact train loss and
    accuracy over each validation interval, summed across ranks (every rank runs the same collectives)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._t0 = 0.0
        self._val_time = 0.0
        self._val_start = 0.0
        self._sums = torch.zeros(3, dtype=torch.float64)  # loss * count, correct, count

        self.fit_s = float("nan")  # on_train_start -> on_train_end: excludes process launch and setup
        self.train_s = float("nan")  # the same without validation passes

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0, self._val_time = time.perf_counter(), 0.0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_s = time.perf_counter() - self._t0
        self.train_s = self.fit_s - self._val_time

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        n = float(outputs["count"])
        self._sums += torch.tensor([float(outputs["loss"]) * n, float(outputs["correct"]), n],
                                   dtype=torch.float64)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:  # the whole validation set before any step: the step-0 point
            m = trainer.callback_metrics
            self.rows.append({"step": 0.0, "train_time_s": 0.0, "val_loss": float(m["val_loss"]),
                              "val_acc": float(m["val_acc"]), "train_loss": math.nan, "train_acc": math.nan})
            return
        now = time.perf_counter()
        self._val_time += now - self._val_start
        sums = trainer.strategy.reduce(self._sums.clone(), reduce_op="sum")
        self._sums.zero_()
        m = trainer.callback_metrics
        count = max(float(sums[2]), 1.0)
        self.rows.append({
            "step": float(trainer.global_step),
            "train_time_s": self._val_start - self._t0 - (self._val_time - (now - self._val_start)),
            "val_loss": float(m["val_loss"]),
            "val_acc": float(m["val_acc"]),
            "train_loss": float(sums[0]) / count,
            "train_acc": float(sums[1]) / count,
        })


def _trainer(task: str, opt_name: str, steps: int, val_every: int, out: Path | None, devices: int,
             strategy: str, progress: bool, callbacks: list[pl.Callback], timed: bool = True) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=None if timed else 0,
        num_sanity_val_steps=-1 if timed else 0,  # the whole validation set: the step-0 point
        logger=pl.loggers.CSVLogger(str(out / "logs"), name=f"{task}-{opt_name}") if timed else False,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress and timed,
        callbacks=[LossToOptimizer(), BatchToOptimizer(), OptimizerDiagnostics(), *callbacks],
    )


def _fit(task: str, opt_name: str, quick: bool, seed: int, trainer: pl.Trainer) -> None:
    class_path, init_args = TASKS[task][opt_name]
    pl.seed_everything(seed, workers=True, verbose=False)
    model, data = _build(task, quick)
    attach_optimizer(model, OptimizerFactory(class_path, init_args))
    trainer.fit(model, datamodule=data)


def _warm_up(task: str, opt_name: str, quick: bool, seed: int, devices: int, strategy: str) -> None:
    """A few untimed steps of the same run, so that the timed one starts warm."""
    trainer = _trainer(task, opt_name, WARMUP_STEPS, WARMUP_STEPS, None, devices, strategy, False, [],
                       timed=False)
    _fit(task, opt_name, quick, seed, trainer)


def _run_one(task: str, opt_name: str, quick: bool, out: Path, seed: int, devices: int, strategy: str,
             progress: bool) -> dict[str, Any]:
    budget = BUDGETS["quick" if quick else "full"][task]
    recorder = CurveRecorder()
    trainer = _trainer(task, opt_name, budget.max_steps, budget.val_every, out, devices, strategy, progress,
                       [recorder])
    if trainer.is_global_zero:
        report.info("=== %s / %s: %d steps on %d CPU processes (%s)", task, opt_name, budget.max_steps,
                    devices, strategy)
    _fit(task, opt_name, quick, seed, trainer)
    last = recorder.rows[-1] if recorder.rows else {}
    return {"task": task, "optimizer": opt_name, "steps": trainer.global_step, "wall_s": recorder.fit_s,
            "train_s": recorder.train_s,
            "is_global_zero": trainer.is_global_zero, "curve": recorder.rows, **{k: last.get(k, float("nan"))
            for k in ("train_loss", "train_acc", "val_loss", "val_acc")}}


def add_comparisons(results: list[dict[str, Any]]) -> None:
    """Per run: ``best_val_loss`` (lowest point of its curve) and ``s_to_adamw_final``, the training time
    (validation excluded) of its first validation point at or below AdamW's final validation loss on the
    same task (NaN when it never got there, or when AdamW did not run)."""
    target = {r["task"]: r["val_loss"] for r in results if r["optimizer"] == "AdamW"}
    for r in results:
        r["best_val_loss"] = min((row["val_loss"] for row in r["curve"]), default=math.nan)
        goal = target.get(r["task"], math.nan)
        hit = [row["train_time_s"] for row in r["curve"] if row["step"] > 0 and row["val_loss"] <= goal]
        r["s_to_adamw_final"] = hit[0] if hit else math.nan


def _write_outputs(results: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "optimizer", "step", "train_time_s", "val_loss", "val_acc", "train_loss",
                    "train_acc"])
        for r in results:
            for row in r["curve"]:
                w.writerow([r["task"], r["optimizer"], int(row["step"]), f"{row['train_time_s']:.4f}",
                            f"{row['val_loss']:.6f}", f"{row['val_acc']:.6f}", f"{row['train_loss']:.6f}",
                            f"{row['train_acc']:.6f}"])
    cols = ["task", "optimizer", "steps", "wall_s", "train_s", "train_loss", "train_acc", "val_loss",
            "val_acc", "best_val_loss", "s_to_adamw_final"]
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in results:
            w.writerow([r[c] if isinstance(r[c], str) else (f"{r[c]:.6g}") for c in cols])
    _plot(results, out / "val_loss.png")


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in results}, key=list(TASKS).index)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        for r in (r for r in results if r["task"] == task):
            steps = [row["step"] for row in r["curve"]]
            times = [row["train_time_s"] for row in r["curve"]]
            losses = [row["val_loss"] for row in r["curve"]]
            style = {"marker": "o", "ms": 3, "label": r["optimizer"], "color": COLORS.get(r["optimizer"])}
            axes[i][0].plot(steps, losses, **style)
            axes[i][1].plot(times, losses, **style)
        adamw = next((r for r in results if r["task"] == task and r["optimizer"] == "AdamW"), None)
        axes[i][0].set(title=f"{task}: validation loss vs step", xlabel="optimizer step", ylabel="val loss")
        # symlog time: linear near 0 (the step-0 point), logarithmic beyond, so a run 30x slower than the
        # others (EGN) does not squash them into the first pixels; a linear axis when every run is under the
        # threshold (--quick), where symlog's ticks read as exponents and the axis went below 0
        longest = max((row["train_time_s"] for r in results if r["task"] == task for row in r["curve"]), default=0.0)
        symlog = longest > 1.0
        axes[i][1].set(title=f"{task}: validation loss vs training time (after warm-up)",
                       xlabel=f"training seconds, rank 0 ({'symlog axis; ' if symlog else ''}validation excluded)",
                       ylabel="val loss")
        if symlog:
            axes[i][1].set_xscale("symlog", linthresh=1.0)
        axes[i][1].set_xlim(left=0.0)
        for ax in axes[i]:
            ax.set_yscale("log")
            if adamw is not None:
                ax.axhline(adamw["val_loss"], color=COLORS["AdamW"], lw=0.8, ls=":")
            ax.grid(alpha=0.3, which="both")
            ax.legend()
    fig.suptitle("lightning-soaa main job: 2 CPU processes, Lightning DDP, same seed, data order and steps\n"
                 "(dotted: AdamW's final validation loss)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_s(x: float) -> str:
    return "never" if math.isnan(x) else f"{x:.1f}"


def format_table(results: list[dict[str, Any]]) -> str:
    head = f"{'task':<7} {'optimizer':<9} {'steps':>5} {'wall s':>7} {'train s':>7} {'train loss':>10} " \
           f"{'train acc':>9} {'val loss':>9} {'val acc':>8} {'best val':>9} {'s to AdamW':>10}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['task']:<7} {r['optimizer']:<9} {r['steps']:>5d} {r['wall_s']:>7.1f} "
                     f"{r['train_s']:>7.1f} {r['train_loss']:>10.4f} {r['train_acc']:>9.3f} "
                     f"{r['val_loss']:>9.4f} {r['val_acc']:>8.3f} {r['best_val_loss']:>9.4f} "
                     f"{_fmt_s(r['s_to_adamw_final']):>10}")
    for task in dict.fromkeys(r["task"] for r in results):
        runs = [r for r in results if r["task"] == task]
        best = min(runs, key=lambda r: r["best_val_loss"])
        lines.append(f"{task}: best validation loss {best['best_val_loss']:.4f} by {best['optimizer']}")
    lines.append("wall s: the training loop incl. validation, after an untimed warm-up (process launch and "
                 "setup excluded); train s: without validation. Train loss/acc: mean over the last validation "
                 "interval, all ranks' samples. s to AdamW: training seconds until the validation loss first "
                 "reached AdamW's final one on the task (at the validation points).")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small models and budgets, for CI")
    p.add_argument("--out", type=Path, default=Path("runs/main_job"), help="output directory")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {list(TASKS)}")
    p.add_argument("--optimizers", default="AdamW,SOAA,EGN,ASGO", help="comma-separated subset")
    p.add_argument("--devices", type=int, default=2, help="CPU processes (default 2)")
    p.add_argument("--strategy", default="ddp", help="Lightning strategy (default ddp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress-bar", action="store_true")
    args = p.parse_args(argv)
    for t in args.tasks.split(","):
        if t not in TASKS:
            p.error(f"unknown task {t!r}; valid: {', '.join(TASKS)}")
    valid = sorted({o for opts in TASKS.values() for o in opts})
    for o in args.optimizers.split(","):
        if o not in valid:
            p.error(f"unknown optimizer {o!r}; valid: {', '.join(valid)}")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if not report.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        report.addHandler(handler)
        report.setLevel(logging.INFO)
        report.propagate = False
    # Quiet, identical runs: one thread per process (2 processes on 2 cores), no tips.
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    runs = [(task, o) for task in args.tasks.split(",") for o in args.optimizers.split(",") if o in TASKS[task]]
    for task, opt_name in runs:
        _warm_up(task, opt_name, args.quick, args.seed, args.devices, args.strategy)
    results = [_run_one(task, opt_name, args.quick, args.out, args.seed, args.devices, args.strategy,
                        progress=not args.no_progress_bar) for task, opt_name in runs]
    add_comparisons(results)
    if results and results[0]["is_global_zero"]:
        _write_outputs(results, args.out)
        report.info("\n%s", format_table(results))
        report.info("\nwrote %s, %s, %s", args.out / "results.csv", args.out / "summary.csv",
                    args.out / "val_loss.png")
    return results


if __name__ == "__main__":
    main()
