"""Under HSDP with ``grad_reduction="none"``, a plain parameter changed in place on one rank only is refused at
every step, the periodic replica check's included.

The periodic check (``replica_check_every``) compares HSDP's shards whole but, under ``"none"``, leaves the plain
(not ``fully_shard``ed) parameters' digest out (their gradients are compared to a tolerance). Its verdict still
counted them as compared and equal, so the in-place changes made since the last step went unjudged at that step,
and the next step's version counters took them as the optimizer's: rank 0's plain weight, scaled alone right
before a checking step, trained on apart from the other ranks' copies, silently. Every other step refuses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lightning_soaa.optim.adamw import ShardedAdamW
from tests.fsdp2 import _workers as W
from tests.harness.distributed import run_distributed

SIZES = (4, 8, 3)


def _step(model: Any, opt: Any, t: int, rank: int, world_size: int) -> str:
    def go() -> None:
        opt.zero_grad()
        loss = W.loss_fn(model, *W.local_batch(t, SIZES, rank, world_size))
        loss.backward()
        plain = model[-1].weight  # (the caller's own average under "none": FSDP2 leaves plain gradients alone)
        for p in (plain, model[-1].bias):
            dist.all_reduce(p.grad)
            p.grad.div_(world_size)
        opt.step()
    return W.expect_error(go)


def _plain_written_before_step(rank: int, world_size: int, every: int) -> list[str]:
    mesh = W.make_mesh(world_size, True)
    torch.manual_seed(0)
    model = W.sharded_model(SIZES, mesh, plain_last=True)
    opt = ShardedAdamW(model.named_parameters(), lr=1e-2, grad_reduction="none", replica_check_every=every)
    got = [_step(model, opt, t, rank, world_size) for t in range(2)]
    if rank == 0:
        with torch.no_grad():
            model[-1].weight.mul_(1.5)  # (moves its version counter: the per-step in-place check sees it)
    got.append(_step(model, opt, 2, rank, world_size))
    return got


def test_a_plain_parameter_written_on_one_rank_is_refused_at_the_periodic_check_step(tmp_path: Path) -> None:
    for every in (1000, 2):  # (2: the third step is a periodic check; 1000: none is)
        results = run_distributed(_plain_written_before_step, 4, tmp_path, every, timeout=240)
        for r, got in enumerate(results):
            assert got[:2] == ["no error", "no error"], (every, r, got)
            assert "changed in place" in got[2], (every, r, got[2])
