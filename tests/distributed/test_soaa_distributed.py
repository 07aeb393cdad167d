"""SOAA on W gloo ranks equals one process on the global batch (§4 SOAA 5): what is specific to SOAA.

W ∈ {1, 2, 3, 4}, both gradient paths, checkpoints across world sizes (1 → 2, 2 → 3, 3 → 1, 2 → 4) and
non-finite gradients are checked for every optimizer in tests/conformance/test_ranks.py. Here, at W = 2:
the per-step trust-region trajectory (d, ρ, predicted reduction, loss EMA, Fisher scale), exactly one
scalar all-reduce per lagged step, DeepSpeed-like flat slices (``shard=False``), ``same_batch``, and the
denoised ρ with a trust warm-up (``rho_smoothing``, ``trust_warmup``: their sums are built from the
all-reduced scalars only, so every rank keeps the same ones).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_soaa import SOAA
from tests.harness.distributed import run_distributed
from tests.harness.models import batch, global_batch, loss_fn, tiny_mlp

KW = dict(lr=0.05, gamma=0.3, total_steps=10, weight_decay=0.01)
SMOOTH_KW = dict(KW, rho_smoothing=0.8, trust_warmup=2)
STEPS = 12
TOL = dict(rtol=1e-10, atol=1e-12)


def _stats(opt: SOAA) -> dict[str, float]:
    st = opt.statistics()
    return {k: st[k] for k in ("d", "rho", "predicted_reduction", "loss_ema", "fisher_scale",
                               "actual_reduction_sum", "predicted_reduction_sum")}


def _reference(world_size: int, kw: dict[str, Any] = KW) -> dict[str, Any]:
    """One process on the concatenated batch of all ranks."""
    model = tiny_mlp(0)
    opt = SOAA(model.named_parameters(), **kw)
    out: dict[str, Any] = {"stats": []}
    for s in range(STEPS):
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


def _lagged_run(rank: int, world_size: int, kw: dict[str, Any]) -> dict[str, Any]:
    model = tiny_mlp(0)
    opt = SOAA(model.named_parameters(), **kw)
    out: dict[str, Any] = {"stats": []}
    for s in range(STEPS):
        _local_step(model, opt, s, rank, world_size, average=True)
        out["stats"].append(_stats(opt))
        if s == 1:
            out["calls"] = dict(opt.comm.step_stats.calls)
    out["params"] = [p.detach().clone() for p in model.parameters()]
    return out


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    torch.manual_seed(rank)  # nothing may depend on it
    out = _lagged_run(rank, world_size, KW)
    out["smoothed"] = _lagged_run(rank, world_size, SMOOTH_KW)
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


def test_soaa_ranks_equal_single_process(tmp_path) -> None:
    world_size = 2
    ref = _reference(world_size)
    ds = [st["d"] for st in ref["stats"]]
    # the trajectory of d is not trivial (both band edges and a value inside), so comparing it means something
    assert len(set(ds)) >= 3 and any(1 - KW["gamma"] < d < 1 + KW["gamma"] for d in ds)
    results = run_distributed(_worker, world_size, tmp_path, timeout=240)
    smooth = _reference(world_size, SMOOTH_KW)
    sd = [st["d"] for st in smooth["stats"]]
    assert sd[:2] == [1.0, 1.0] and len(set(sd[2:])) >= 2 and sd != ds  # the options change the trajectory
    sb = _same_batch_run(world_size, None)
    assert 0 < sb["stats"][-1]["rejected"] < 8  # both outcomes happen, so both paths are compared
    for res in results:
        _assert_stats(res["stats"], ref["stats"])
        _assert_params(res["params"], ref["params"])
        assert res["calls"]["all_reduce"] == 1, res["calls"]  # lagged: exactly one scalar all-reduce
        assert res["calls"]["all_gather"] == 1
        _assert_stats(res["smoothed"]["stats"], smooth["stats"])
        _assert_params(res["smoothed"]["params"], smooth["params"])
        assert res["smoothed"]["calls"]["all_reduce"] == 1, res["smoothed"]["calls"]  # no extra collective
        _assert_stats(res["flat"]["stats"], ref["stats"])
        _assert_params(res["flat"]["params"], ref["params"])
        _assert_stats(res["same_batch"]["stats"], sb["stats"])
        _assert_params(res["same_batch"]["params"], sb["params"])


def _same_batch_closure_fails_run(rank: int, world_size: int) -> dict[str, Any]:
    model = tiny_mlp(1)
    opt = SOAA(model.parameters(), **SB_KW, grad_reduction="mean")
    calls = [0]

    def closure(s: int, fail: bool = False):
        calls[0] += 1
        if fail and rank == 1 and calls[0] % 2 == 0:  # the re-evaluation after the trial step, rank 1 only
            raise ValueError("rank 1's closure failed on the re-evaluation")
        x, y = batch(s, rank)
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    opt.step(lambda: closure(0))
    before = [p.detach().clone() for p in model.parameters()]
    rejected = opt.statistics()["rejected"]
    try:
        opt.step(lambda: closure(1, fail=True))
        msg = "no error"
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
    restored = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    out = {"msg": msg, "restored": restored, "rejected": opt.statistics()["rejected"] - rejected}
    opt.step(lambda: closure(2))  # still in step: the next collective pairs up
    out["params"] = [p.detach().clone() for p in model.parameters()]
    return out


def test_same_batch_closure_failing_on_one_rank_raises_on_every_rank(tmp_path) -> None:
    """acceptance="same_batch": a closure that raises on one rank at the re-evaluation (after the trial
    step) left the other rank waiting in the acceptance all-reduce. The error is held and counted in that
    all-reduce; every rank rejects the step (θ restored, as for a non-finite loss) and raises."""
    res = run_distributed(_same_batch_closure_fails_run, 2, tmp_path, timeout=60)
    assert res[1]["msg"].startswith("ValueError: rank 1's closure failed"), res[1]["msg"]
    assert "closure raised on 1 other rank(s)" in res[0]["msg"], res[0]["msg"]
    for out in res:
        assert out["restored"] and out["rejected"] == 1, out
    _assert_params(res[0]["params"], res[1]["params"])
