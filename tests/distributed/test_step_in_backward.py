"""A step fused into the backward (one optimizer per parameter, stepped from
``register_post_accumulate_grad_hook``, torch's tutorial pattern) under DDP runs before DDP averages the
gradients: refused on every rank like any unaveraged gradient, with the message saying why here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_soaa import ShardedAdamW
from tests.harness.distributed import run_distributed


def _worker(rank: int, world_size: int) -> str:
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Linear(4, 3))
    opts: dict[Any, ShardedAdamW] = {p: ShardedAdamW([p], lr=1e-2) for p in model.parameters()}
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda q: opts[q].step())
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(rank))  # each rank its own data
    try:
        model(x).square().sum().backward()
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_a_step_fused_into_backward_under_ddp_says_it_runs_before_the_average(tmp_path: Path) -> None:
    for msg in run_distributed(_worker, 2, tmp_path, timeout=120.0):
        assert "differ from rank 0's" in msg and "inside a backward pass" in msg, msg
