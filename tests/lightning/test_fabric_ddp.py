"""Lightning Fabric DDP at W = 2 against one process, every optimizer (README "Lightning Fabric"): gradient
accumulation by ``no_backward_sync``, ``clip_gradients``, and a ``save``/``load`` resume, float64. A helper
measured these once (to ~1e-16); this keeps them. Fabric's launcher starts the second rank by running the
script again, so the worker runs as a script in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_soaa import registry

pytestmark = pytest.mark.lightning
pytest.importorskip("lightning.fabric")

WORKER = Path(__file__).with_name("_fabric_ddp_worker.py")


def test_fabric_ddp_accumulation_clipping_and_resume_equal_one_process(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parents[2]), os.environ.get("PYTHONPATH", "")])}
    env.pop("MASTER_PORT", None)  # Fabric picks a free one
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert sorted(result) == sorted(registry.names())
    for name, diffs in result.items():
        assert diffs["run"] < 1e-12 and diffs["resumed"] < 1e-12, (name, diffs)
