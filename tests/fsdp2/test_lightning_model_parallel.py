"""Lightning 2.6's ModelParallelStrategy (FSDP2) runs on CPU: our optimizers under it equal the plain
single-process run, and its checkpoints (``ModelCheckpoint``/``trainer.save_checkpoint``: the
distributed DCP folder and the full single file) resume to the same parameters, at 2 ranks and at 1.
(FSDPStrategy, FSDP1, refuses CPU: "requires a GPU accelerator".)

Every registered optimizer that takes DTensor parameters (``OptimizerSpec.supports_dtensor``), with the
battery's ``test_kwargs``. Two launches: the script at 2 devices (fit with checkpoints, then resumes) and at
1 device (resumes of the 2-rank checkpoints).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import lightning_soaa.functional.asgo as asgo_functional
from lightning_soaa import registry

pytest.importorskip("lightning", reason="the [lightning] extra is not installed")

from tests.fsdp2 import _lightning_model_parallel as script

pytestmark = [pytest.mark.lightning]


def _reference(name: str) -> list[torch.Tensor]:
    net = script.make_net()
    opt = script.optimizer(name, net.named_parameters())
    x, y = script.data().tensors  # one batch per epoch: every step sees all rows
    for _ in range(script.STEPS):
        opt.zero_grad()
        loss = 0.5 * (net(x) - y).pow(2).sum(dim=1).mean()
        loss.backward()
        if registry.get(name).needs is registry.StepNeeds.LOSS:
            opt.set_loss(loss)
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def _launch(out: Path, devices: int, root: Path, cwd: Path) -> dict[Any, Any]:
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, script.__file__, str(out), str(devices), str(root)], check=False,
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out)


def _check(saved: dict[Any, Any], expected_keys: set[Any], what: str) -> None:
    assert set(saved) == expected_keys
    for (name, fmt, run), res in saved.items():
        assert res["steps"] == script.STEPS and res["opt_steps"] == script.STEPS, (what, name, fmt, run, res)
        for i, (a, b) in enumerate(zip(res["params"], _reference(name), strict=True)):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0,
                                       msg=lambda m: f"{what} {name} {fmt} {run} param {i}: {m}")


def test_model_parallel_strategy_fit_checkpoint_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ckpt"
    two = _launch(tmp_path / "w2.pt", 2, root, tmp_path)
    assert (root / "SOAA" / "dist" / "step=2.ckpt").is_dir()  # DCP folder: each rank wrote its shards
    assert (root / "SOAA" / "full" / "step=2.ckpt").is_file()  # assembled on rank 0
    one = _launch(tmp_path / "w1.pt", 1, root, tmp_path)
    # FSDP2 preconditions every row-sharded matrix on the right; the 2x6 head is wide (plain ASGO: left)
    monkeypatch.setattr(asgo_functional, "preconditioned_side", lambda m, n: asgo_functional.RIGHT)
    runs = {(n, f, r) for n in script.KWARGS for f in script.FORMATS for r in ("straight", "resumed")}
    _check(two, runs, "2 ranks")
    _check(one, {k for k in runs if k[2] == "resumed"}, "resumed on 1 rank")
