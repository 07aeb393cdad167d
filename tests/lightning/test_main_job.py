"""The main job's quick mode, end to end: 2 CPU processes with Lightning DDP, run as a subprocess
(``strategy="ddp"`` re-launches the command line, which must not be pytest's).

It runs where no MPI library can be loaded (``MPI4PY_LIBMPI`` points nowhere), as on a fresh machine
with the ``[mpi]`` extra's mpi4py but no MPI: the first thing a new user runs must not need MPI."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lightning.test_mpi_guard import broken_mpi_env

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(420)]

MAIN_JOB = Path(__file__).resolve().parents[2] / "examples" / "main_job.py"
REQUIRED = ("sklearn", "matplotlib")  # optional extras the main job plots and scores with


def test_main_job_quick(tmp_path: Path) -> None:
    for mod in REQUIRED:
        pytest.importorskip(mod)
    env = broken_mpi_env()
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK"):
        env.pop(k, None)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(MAIN_JOB), "--quick", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # the table, once (rank 0 only), with every (task, optimizer) pair
    assert proc.stdout.count("train loss") == 1, proc.stdout[-3000:]
    with open(out / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    pairs = {(r["task"], r["optimizer"]) for r in summary}
    assert pairs == {("digits", o) for o in ("AdamW", "SOAA", "EGN", "ASGO")} | \
        {("chars", o) for o in ("AdamW", "SOAA", "ASGO")}
    uniform = {"digits": math.log(10), "chars": math.log(103)}
    for r in summary:
        assert int(r["steps"]) == (40 if r["task"] == "digits" else 30)
        for k in ("wall_s", "train_s", "train_loss", "val_loss", "val_acc", "train_acc"):
            assert math.isfinite(float(r[k])), (r, k)
        # every optimizer learned something: better than the uniform guess
        assert float(r["val_loss"]) < 0.9 * uniform[r["task"]], r
    for r in summary:  # AdamW reaches its own final loss; the best loss is never above the final one
        assert float(r["best_val_loss"]) <= float(r["val_loss"]), r
        if r["optimizer"] == "AdamW":
            assert math.isfinite(float(r["s_to_adamw_final"])), r
    assert proc.stdout.count("best validation loss") == 2, proc.stdout[-3000:]
    with open(out / "results.csv", newline="") as f:
        curve = list(csv.DictReader(f))
    assert len(curve) == 11 * 7  # step 0 plus ten validation points per run in quick mode
    for task in ("digits", "chars"):
        start = {r["optimizer"]: r for r in curve if r["task"] == task and int(r["step"]) == 0}
        assert len(start) == (4 if task == "digits" else 3)
        # same seed, same initialisation: every optimizer starts from the same validation loss, at time 0
        assert len({r["val_loss"] for r in start.values()}) == 1, start
        assert all(float(r["train_time_s"]) == 0.0 for r in start.values())
        for opt in start:
            times = [float(r["train_time_s"]) for r in curve if r["task"] == task and r["optimizer"] == opt]
            assert times == sorted(times) and times[-1] > 0, (task, opt, times)
    png = out / "val_loss.png"
    assert png.exists() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
