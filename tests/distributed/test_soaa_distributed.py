"""SOAA on W gloo ranks equals one process on the global batch (§4 SOAA 5), checkpoints across W."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_soaa import SOAA
from tests.harness.distributed import run_distributed
from tests.harness.models import batch, global_batch, loss_fn, tiny_mlp

KW = dict(lr=0.05, gamma=0.3, total_steps=10, weight_decay=0.01)
STEPS, SAVE_AT = 12, 6
TOL = dict(rtol=1e-10, atol=1e-12)


def _stats(opt: SOAA) -> dict[str, float]:
    st = opt.statistics()
    return {k: st[k] for k in ("d", "rho", "predicted_reduction", "loss_ema", "fisher_scale")}


def _reference(world_size: int) -> dict[str, Any]:
    """One process on the concatenated batch of all ranks."""
    model = tiny_mlp(0)
    opt = SOAA(model.named_parameters(), **KW)
    out: dict[str, Any] = {"stats": []}
    for s in range(STEPS):
        if s == SAVE_AT:
            out["ckpt"] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        x, y = global_batch(s, world_size)
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step(loss=loss)
        out["stats"].append(_stats(opt))
    out["params"] = [p.detach().clone() for p in model.parameters()]
    return out


SB_KW = dict(lr=0.3, gamma=0.3, total_steps=10, acceptance="same_batch")  # lr large enough to reject


def _same_batch_run(world_size: int, rank: int | None) -> dict[str, Any]:
    """acceptance="same_batch" with a closure; rank None: one process on the global batch."""
    model = tiny_mlp(1)
    opt = SOAA(model.parameters(), **SB_KW)
    stats = []
    for s in range(8):
        x, y = global_batch(s, world_size) if rank is None else batch(s, rank)

        def closure():
            opt.zero_grad()
            loss = loss_fn(model, x, y)
            loss.backward()
            if rank is not None:
                for p in model.parameters():
                    dist.all_reduce(p.grad)
                    p.grad.div_(world_size)
            return loss

        opt.step(closure)
        st = opt.statistics()
        stats.append({k: st[k] for k in ("d", "rho", "predicted_reduction", "accepted", "rejected")})
    return {"stats": stats, "params": [p.detach().clone() for p in model.parameters()]}


def _local_step(model, opt, s, rank, world_size, average: bool) -> None:
    x, y = batch(s, rank)
    opt.zero_grad()
    loss = loss_fn(model, x, y)
    loss.backward()
    if average:  # what DDP does; with grad_reduction="mean" the optimizer does it itself
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad.div_(world_size)
    opt.step(loss=loss)  # the rank-local loss: SOAA averages it inside its one all-reduce


def _flat_slices_run(rank: int, world_size: int) -> dict[str, Any]:
    """DeepSpeed-like: shard=False, each rank owns one 1-D slice of the flattened parameters."""
    model = tiny_mlp(0)
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    n = flat.numel()
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    mine = torch.nn.Parameter(flat[lo:hi].clone())
    opt = SOAA([mine], shard=False, **KW)
    stats = []
    for s in range(STEPS):
        x, y = batch(s, rank)
        model.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(g)
        mine.grad = g[lo:hi] / world_size
        opt.step(loss=loss)
        stats.append(_stats(opt))
        full = torch.zeros(n, dtype=flat.dtype)
        full[lo:hi] = mine.detach()
        dist.all_reduce(full)  # every element comes from exactly one rank
        off = 0
        with torch.no_grad():
            for p in params:
                p.copy_(full[off:off + p.numel()].view_as(p))
                off += p.numel()
    return {"stats": stats, "params": [p.detach().clone() for p in params]}


def _worker(rank: int, world_size: int, grad_reduction: str, resume: Any,
            flat_slices: bool) -> dict[str, Any]:
    torch.manual_seed(rank)  # nothing may depend on it
    model = tiny_mlp(0)
    opt = SOAA(model.named_parameters(), grad_reduction=grad_reduction, **KW)
    out: dict[str, Any] = {"stats": []}
    for s in range(STEPS):
        if s == SAVE_AT:
            opt.consolidate_state_dict(to=0)  # collective
            if rank == 0:
                out["ckpt"] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        _local_step(model, opt, s, rank, world_size, average=grad_reduction == "none")
        out["stats"].append(_stats(opt))
        if s == 1:
            out["calls"] = dict(opt.comm.step_stats.calls)
    out["params"] = [p.detach().clone() for p in model.parameters()]
    if resume is not None:  # a checkpoint written by ONE process, continued on W ranks
        model_sd, opt_sd = resume
        model2 = tiny_mlp(5)
        model2.load_state_dict(model_sd)
        opt2 = SOAA(model2.named_parameters(), grad_reduction=grad_reduction, **KW)
        opt2.load_state_dict(opt_sd)
        out["resumed_stats"] = []
        for s in range(SAVE_AT, STEPS):
            _local_step(model2, opt2, s, rank, world_size, average=grad_reduction == "none")
            out["resumed_stats"].append(_stats(opt2))
        out["resumed_params"] = [p.detach().clone() for p in model2.parameters()]
    if flat_slices:
        out["flat"] = _flat_slices_run(rank, world_size)
        out["same_batch"] = _same_batch_run(world_size, rank)
    return out


def _assert_stats(got: list[dict[str, float]], want: list[dict[str, float]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-9, abs=1e-12), k


def _assert_params(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize(
    "world_size,grad_reduction,resume,flat_slices",
    [(1, "none", False, False), (2, "none", True, True), (3, "mean", False, False), (4, "none", True, False)],
)
def test_soaa_ranks_equal_single_process(tmp_path, world_size, grad_reduction, resume, flat_slices) -> None:
    ref = _reference(world_size)
    ds = [st["d"] for st in ref["stats"]]
    assert len(set(ds)) > 3  # the trajectory of d is not trivial, so comparing it means something
    results = run_distributed(_worker, world_size, tmp_path, grad_reduction, ref["ckpt"] if resume else None,
                              flat_slices, timeout=240)
    for r, res in enumerate(results):
        _assert_stats(res["stats"], ref["stats"])
        _assert_params(res["params"], ref["params"])
        if world_size > 1:  # lagged acceptance: exactly one scalar all-reduce per step
            assert res["calls"]["all_reduce"] == 1, res["calls"]
            assert res["calls"]["all_gather"] == 1
        if resume:  # 1 -> W ranks
            _assert_stats(res["resumed_stats"], ref["stats"][SAVE_AT:])
            _assert_params(res["resumed_params"], ref["params"])
        if flat_slices:
            _assert_stats(res["flat"]["stats"], ref["stats"])
            _assert_params(res["flat"]["params"], ref["params"])
            sb = _same_batch_run(world_size, None)
            assert 0 < sb["stats"][-1]["rejected"] < 8  # both outcomes happen, so both paths are compared
            _assert_stats(res["same_batch"]["stats"], sb["stats"])
            _assert_params(res["same_batch"]["params"], sb["params"])
    # W -> 1: the checkpoint consolidated on W ranks continues in one process
    model_sd, opt_sd = results[0]["ckpt"]
    assert opt_sd["lightning_soaa"]["global"]["soaa"]["lag_scope"] == "global"
    model = tiny_mlp(9)
    model.load_state_dict(model_sd)
    opt = SOAA(model.named_parameters(), **KW)
    opt.load_state_dict(opt_sd)
    stats = []
    for s in range(SAVE_AT, STEPS):
        x, y = global_batch(s, world_size)
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step(loss=loss)
        stats.append(_stats(opt))
    _assert_stats(stats, ref["stats"][SAVE_AT:])
    _assert_params(list(model.parameters()), ref["params"])
