"""The ``deepspeed`` launcher runs the example on CPU: two processes, our optimizer from the JSON."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.deepspeed, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_launcher_runs_the_example(tmp_path):
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    if launcher is None:
        pytest.skip("the deepspeed launcher script is not installed")
    env = dict(os.environ)
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    # the launcher re-execs `python` from PATH for each rank: make it this interpreter, with this checkout
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    out = tmp_path / "run"
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(_free_port()),
           str(REPO / "multinode_examples" / "deepspeed_train.py"),
           "--deepspeed_config", str(REPO / "configs" / "deepspeed" / "asgo_zero2.json"),
           "--steps", "8", "--out-dir", str(out), "--skip-shm-op"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = [json.loads((out / f"result_rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world_size"] == 2 and res["zero_stage"] == 2
        assert res["optimizer"] == "ASGO" and res["deepspeed_optimizer"] == "DeepSpeedZeroOptimizer"
        assert res["statistics"]["deepspeed_training_steps"] == 8
        assert res["statistics"]["asgo_blocks_owned"] >= 1  # full-row matrix blocks on each rank
    assert results[0]["losses"][-1] < results[0]["losses"][0]
