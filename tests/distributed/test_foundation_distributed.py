"""The sharded core across real gloo ranks: the communication of one step, ranks that disagree.

W-rank runs equal to one process, non-finite gradients on one rank, and checkpoints across world sizes
are checked for every optimizer (AdamW included) in tests/conformance/test_ranks.py.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from lightning_soaa.distributed.agreement import RECORD_SLOTS, STEP_ROW
from lightning_soaa.optim.adamw import ShardedAdamW
from tests.harness.distributed import run_distributed
from tests.harness.models import batch, loss_fn, tiny_mlp

KW = dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
SIZES = (6, 8, 5, 3)


def _w_train(rank, world_size, steps, sizes, grad_reduction):
    model = tiny_mlp(sizes=sizes)
    opt = ShardedAdamW(model.parameters(), grad_reduction=grad_reduction, **KW)
    for t in range(steps):
        opt.zero_grad()
        loss_fn(model, *batch(t, rank, d_out=sizes[-1])).backward()
        if grad_reduction == "none":  # what DDP would have done
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(world_size)
        opt.step()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "owned": len(opt.block_table.owned()),
        "stats": opt.statistics(),
        "last": opt.comm.step_stats.copy(),
        "padded": {str(dt): opt.exchange.padded_len(dt) for dt in opt.exchange.layouts},
        # the gradients' presence flags after each rank's blocks (one per block of the busiest rank)
        "flags": {str(dt): max(map(len, per_rank)) for dt, per_rank in opt.exchange.layouts.items()},
    }


def test_communication_per_step_matches_design(tmp_path: Path):
    """grad_reduction='mean', one dtype: 1 reduce-scatter + 1 scalar all-reduce + 1 all-gather per step."""
    results = run_distributed(_w_train, 2, tmp_path, 3, SIZES, "mean")
    for res in results:
        last = res["last"]
        (padded,), (flags,) = res["padded"].values(), res["flags"].values()
        assert last.calls == {"reduce_scatter": 1, "all_reduce": 1, "all_gather": 1}
        assert last.bytes["reduce_scatter"] == 2 * (padded + flags) * 8  # W * (padded + flags) fp64 sent
        assert last.bytes["all_gather"] == padded * 8
        # the non-finite flag (AdamW has no partials) padded to RECORD_SLOTS, each rank's agreement row and
        # the stop vote
        assert last.bytes["all_reduce"] == 8 * (RECORD_SLOTS + STEP_ROW * 2 + 1)
        n = sum(p.numel() for p in tiny_mlp(sizes=SIZES).parameters())
        assert n / 2 <= padded < n  # sharded: each rank sends about half the model
        assert res["stats"]["comm_calls"] == 3.0


def _w_mismatch(rank, world_size):
    sizes = SIZES if rank == 0 else (6, 9, 5, 3)
    try:
        ShardedAdamW(tiny_mlp(sizes=sizes).parameters())
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_ranks_disagreeing_on_parameters_fail_fast(tmp_path: Path):
    msgs = run_distributed(_w_mismatch, 2, tmp_path, timeout=60)
    for m in msgs:
        assert "ranks disagree on the parameter list" in m
        assert "rank 0: 6 params" in m and "rank 1: 6 params" in m
