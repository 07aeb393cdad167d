"""The sharded core across real gloo ranks: W-rank runs equal the single-process run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lightning_soaa.distributed.agreement import STEP_ROW
from lightning_soaa.optim.adamw import ShardedAdamW
from tests.harness.distributed import run_distributed
from tests.harness.models import batch, global_batch, loss_fn, tiny_mlp

KW = dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
SIZES = (6, 8, 5, 3)
TINY = (6, 3)  # two parameters: with W = 4 two ranks own nothing


def _single(steps: int, world_size: int, sizes=SIZES, start_state=None, start_params=None, first=0):
    model = tiny_mlp(sizes=sizes)
    if start_params is not None:
        with torch.no_grad():
            for p, q in zip(model.parameters(), start_params):
                p.copy_(q)
    opt = ShardedAdamW(model.parameters(), **KW)
    if start_state is not None:
        opt.load_state_dict(start_state)
    for t in range(first, first + steps):
        opt.zero_grad()
        loss_fn(model, *global_batch(t, world_size, d_out=sizes[-1])).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


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
        "padded": {str(dt): opt._padded_len(pr) for dt, pr in opt._flat_layouts.items()},
    }


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_w_ranks_equal_single_process(tmp_path: Path, world_size: int):
    sizes = TINY if world_size == 4 else SIZES
    mode = "mean" if world_size % 2 else "none"  # both gradient paths are exercised
    results = run_distributed(_w_train, world_size, tmp_path, 6, sizes, mode)
    expected, _ = _single(6, world_size, sizes=sizes)
    for r, res in enumerate(results):
        for a, b in zip(res["params"], expected):
            torch.testing.assert_close(a, b, atol=1e-13, rtol=0, msg=f"rank {r}")
    owned = [res["owned"] for res in results]
    assert sum(owned) == len(expected)
    if world_size == 4:
        assert owned.count(0) == 2  # idle ranks joined every collective and did not hang


def test_communication_per_step_matches_design(tmp_path: Path):
    """grad_reduction='mean', one dtype: 1 reduce-scatter + 1 scalar all-reduce + 1 all-gather per step."""
    results = run_distributed(_w_train, 2, tmp_path, 3, SIZES, "mean")
    for res in results:
        last = res["last"]
        (padded,) = res["padded"].values()
        assert last.calls == {"reduce_scatter": 1, "all_reduce": 1, "all_gather": 1}
        assert last.bytes["reduce_scatter"] == 2 * padded * 8  # W * padded fp64 elements sent
        assert last.bytes["all_gather"] == padded * 8
        # the non-finite flag (AdamW has no partials) and each rank's agreement row
        assert last.bytes["all_reduce"] == 8 * (1 + STEP_ROW * 2)
        n = sum(p.numel() for p in tiny_mlp(sizes=SIZES).parameters())
        assert n / 2 <= padded < n  # sharded: each rank sends about half the model
        assert res["stats"]["comm_calls"] == 3.0


def _w_nan(rank, world_size, steps, bad_step):
    model = tiny_mlp()
    opt = ShardedAdamW(model.parameters(), **KW)
    for t in range(steps):
        opt.zero_grad()
        loss_fn(model, *batch(t, rank)).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad.div_(world_size)
        if t == bad_step and rank == 1:  # only rank 1 sees it, in a block it may not own
            list(model.parameters())[-1].grad[0] = float("nan")
        opt.step()
    return {"params": [p.detach().clone() for p in model.parameters()], "skipped": opt.skipped_steps,
            "steps": opt.num_steps}


def test_nan_on_one_rank_skips_everywhere(tmp_path: Path):
    results = run_distributed(_w_nan, 2, tmp_path, 5, 2)
    # Reference: the same run without step 2.
    model = tiny_mlp()
    opt = ShardedAdamW(model.parameters(), **KW)
    for t in [0, 1, 3, 4]:
        opt.zero_grad()
        loss_fn(model, *global_batch(t, 2)).backward()
        opt.step()
    for res in results:
        assert res["skipped"] == 1 and res["steps"] == 4
        for a, b in zip(res["params"], model.parameters()):
            torch.testing.assert_close(a, b, atol=1e-13, rtol=0)


def _w_save(rank, world_size, steps, path):
    model = tiny_mlp()
    opt = ShardedAdamW(model.parameters(), grad_reduction="mean", **KW)
    for t in range(steps):
        opt.zero_grad()
        loss_fn(model, *batch(t, rank)).backward()
        opt.step()
    try:
        opt.state_dict()
        raised = False
    except RuntimeError:
        raised = True
    opt.consolidate_state_dict()
    if rank == 0:
        torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in model.parameters()]}, path)
    return raised


def _restore(path):
    """Model and sharded optimizer of this rank, restored from a checkpoint saved by ``_w_save``."""
    ckpt = torch.load(path, weights_only=False)
    model = tiny_mlp()
    with torch.no_grad():
        for p, q in zip(model.parameters(), ckpt["params"]):
            p.copy_(q)
    opt = ShardedAdamW(model.parameters(), grad_reduction="mean", **KW)
    opt.load_state_dict(ckpt["opt"])
    return model, opt


def _w_resume(rank, world_size, path, first, steps):
    model, opt = _restore(path)
    for t in range(first, first + steps):
        opt.zero_grad()
        # the global batch of step t, split over the *new* world size, so the math matches the reference
        x, y = global_batch(t, 2)
        n = x.shape[0] // world_size
        assert n * world_size == x.shape[0]
        loss_fn(model, x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("resume_world", [1, 4])
def test_save_at_two_resume_elsewhere_equals_uninterrupted(tmp_path: Path, resume_world: int):
    path = str(tmp_path / "ckpt.pt")
    raised = run_distributed(_w_save, 2, tmp_path, 4, path)
    assert raised == [True, True]  # state_dict() before consolidation is a clear error, not a partial state
    results = run_distributed(_w_resume, resume_world, tmp_path, path, 4, 4)
    expected, _ = _single(8, 2)
    for res in results:
        for a, b in zip(res, expected):
            torch.testing.assert_close(a, b, atol=1e-13, rtol=0)


def test_save_at_two_resume_at_three(tmp_path: Path):
    """W=3 needs a batch divisible by 3: save at W=2 with 6-sample batches, resume at W=3 with 4-sample ones."""
    path = str(tmp_path / "ckpt.pt")
    run_distributed(_w_save, 2, tmp_path, 4, path)
    ckpt = torch.load(path, weights_only=False)
    # Uninterrupted reference and resumed W=3 run over 12-sample global batches for steps 4..7.
    results = run_distributed(_w_resume3, 3, tmp_path, path)
    model = tiny_mlp()
    with torch.no_grad():
        for p, q in zip(model.parameters(), ckpt["params"]):
            p.copy_(q)
    opt = ShardedAdamW(model.parameters(), **KW)
    opt.load_state_dict(copy.deepcopy(ckpt["opt"]))
    for t in range(4, 8):
        opt.zero_grad()
        loss_fn(model, *global_batch(t, 3, n=4)).backward()
        opt.step()
    for res in results:
        for a, b in zip(res, model.parameters()):
            torch.testing.assert_close(a, b, atol=1e-13, rtol=0)


def _w_resume3(rank, world_size, path):
    model, opt = _restore(path)
    assert len(opt.state) == len(opt.block_table.owned())  # only the owned blocks were kept
    for t in range(4, 8):
        opt.zero_grad()
        loss_fn(model, *batch(t, rank, n=4)).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


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
