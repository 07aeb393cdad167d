"""The stock ``LightningCLI --optimizer lightning_soaa.SOAA`` under ``ddp`` on 2 processes.

The stock CLI builds the optimizer before Lightning starts ``torch.distributed``. The optimizer then
joins the process group at its first step (issue 11, item 1) and the run must equal the same run through
``SOAALightningCLI`` (which builds the optimizer inside ``configure_optimizers``), parameter for parameter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(400)]

REPO = Path(__file__).resolve().parents[2]

SCRIPT = '''
import os, sys
import torch
from lightning.pytorch.cli import LightningCLI
from lightning_soaa.lightning.cli import SOAALightningCLI
from tests.lightning.helpers import PlainRegressor

kind = os.environ["STOCK_CLI_KIND"]
cls = LightningCLI if kind == "stock" else SOAALightningCLI
cli = cls(PlainRegressor)
opt = cli.trainer.optimizers[0]
rank = cli.trainer.global_rank
torch.save({"params": [p.detach().clone() for p in cli.model.parameters()],
            "world": opt.comm.world_size, "steps": opt.num_steps, "pending": opt.join_pending},
           os.path.join(os.environ["STOCK_CLI_OUT"], f"{kind}_rank{rank}.pt"))
# Lightning leaves the gloo group alive; a rank can then abort in interpreter teardown after the fit
# ("terminate called without an active exception"): every rank saves, meets, and leaves without it.
import torch.distributed as dist
from lightning_soaa.distributed.launch import exit_without_teardown
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
exit_without_teardown(0)
'''

ARGS = ["fit", "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.max_steps", "4", "--trainer.precision", "64-true", "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--optimizer", "lightning_soaa.SOAA",
        "--optimizer.lr", "0.02",
        # set explicitly: SOAALightningCLI fills total_steps from the trainer, the stock CLI cannot
        "--optimizer.total_steps", "4"]


def _run(kind: str, tmp_path: Path) -> list[dict]:
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK")}
    env.update(STOCK_CLI_KIND=kind, STOCK_CLI_OUT=str(tmp_path), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    extra = ["--trainer.callbacks", "lightning_soaa.lightning.LossToOptimizer"] if kind == "stock" else []
    # strategy="ddp" re-launches the command for rank 1: fine in a subprocess, never inside pytest itself.
    proc = subprocess.run([sys.executable, str(script), *ARGS, *extra], cwd=tmp_path, env=env, check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp_path / f"{kind}_rank{r}.pt") for r in range(2)]


def test_stock_lightning_cli_under_ddp_equals_ours(tmp_path: Path) -> None:
    stock = _run("stock", tmp_path)
    ours = _run("ours", tmp_path)
    for r in range(2):
        assert stock[r]["world"] == 2 and not stock[r]["pending"], "the stock CLI's optimizer did not shard"
        assert stock[r]["steps"] == ours[r]["steps"] == 4
        for a, b in zip(stock[r]["params"], ours[r]["params"]):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    for a, b in zip(stock[0]["params"], stock[1]["params"]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
