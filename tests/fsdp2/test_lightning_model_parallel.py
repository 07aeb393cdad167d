"""Lightning 2.6's ModelParallelStrategy (FSDP2) runs on CPU: our optimizers under it equal the plain
single-process run. (FSDPStrategy, FSDP1, refuses CPU: "requires a GPU accelerator".)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_soaa.functional.asgo as asgo_functional

pytest.importorskip("lightning", reason="the [lightning] extra is not installed")

from tests.fsdp2 import _lightning_model_parallel as script

pytestmark = [pytest.mark.lightning]


def _reference(name: str) -> list[torch.Tensor]:
    net = script.make_net()
    opt = script.optimizer(name, net.named_parameters())
    ds = script.data()
    for i in range(script.STEPS):
        x, y = ds.tensors[0][16 * i:16 * (i + 1)], ds.tensors[1][16 * i:16 * (i + 1)]
        opt.zero_grad()
        loss = 0.5 * (net(x) - y).pow(2).sum(dim=1).mean()
        loss.backward()
        if name == "SOAA":
            opt.set_loss(loss)
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def test_model_parallel_strategy_equals_single_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "params.pt"
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, script.__file__, str(out)], check=False, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    saved = torch.load(out)
    # FSDP2 preconditions every row-sharded matrix on the right; the 2x6 head is wide (plain ASGO: left)
    monkeypatch.setattr(asgo_functional, "preconditioned_side", lambda m, n: asgo_functional.RIGHT)
    assert sorted(saved) == sorted(script.KWARGS)
    for name, res in saved.items():
        assert res["steps"] == script.STEPS
        for i, (a, b) in enumerate(zip(res["params"], _reference(name), strict=True)):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=lambda m: f"{name} param {i}: {m}")
