"""FSDP2 with plain (non-DTensor) parameters and ``grad_reduction="mean"``: a plain parameter without a
gradient on every rank is not stepped, as in one process; one without a gradient on some ranks counts
their share as zeros (:meth:`~lightning_soaa.distributed.dtensor.DTensorLayout.mean_plain_grads`, the
FSDP2 twin of the owners' reduce-scatter whose guarantee is in tests/conformance/test_ranks.py).
With the default ``"none"`` FSDP2 leaves the plain parameters' gradients as each rank computed them:
gradients that differ raise on every rank (the replicas once drifted apart silently), and gradients the
user averaged train as one process.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from tests.fsdp2 import _workers as W
from tests.harness.distributed import run_distributed

UNUSED_AT = 2  # from this step on the last Linear (plain tensors) has no gradient
#: asgo_wide is left out: under FSDP2 its row-sharded matrices take the other side than one process
#: (tests/fsdp2 compares it with a patched reference); the optimizer cases cover ASGO
NAMES = [c[0] for c in W.OPTIMIZER_CASES]


def _run(name: str, rank: int, world: int, mesh: Any, how: str) -> list[torch.Tensor]:
    _, cls, kw, sizes = W.CASE[name]
    model = W.sharded_model(sizes, mesh, plain_last=True)
    opt = cls(model.named_parameters(), **kw, grad_reduction="mean")
    last = [m for m in model if isinstance(m, nn.Linear)][-1]
    for t in range(W.STEPS):
        x, y = W.local_batch(t, sizes, rank, world)
        opt.zero_grad()
        loss = W.loss_fn(model, x, y)
        loss.backward()
        if t >= UNUSED_AT and (how == "all" or rank == 0):
            for p in last.parameters():
                p.grad = torch.zeros_like(p) if how == "rank0_zeros" else None
        if isinstance(opt, W.SOAA):
            opt.set_loss(loss)
        opt.step()
    return W.full_params(model) + [torch.tensor(float(last.weight.grad is None))]


def _none_run(name: str, rank: int, world: int, mesh: Any, average: bool) -> dict[str, Any]:
    """grad_reduction="none"; ``average``: the user all-reduces the plain gradients (as replicate() or a
    hand-written hook would), else they stay as each rank's batch made them."""
    import torch.distributed as dist

    _, cls, kw, sizes = W.CASE[name]
    model = W.sharded_model(sizes, mesh, plain_last=True)
    opt = cls(model.named_parameters(), **kw)
    last = [m for m in model if isinstance(m, nn.Linear)][-1]
    before = W.full_params(model)
    try:
        for t in range(W.STEPS):
            x, y = W.local_batch(t, sizes, rank, world)
            opt.zero_grad()
            loss = W.loss_fn(model, x, y)
            loss.backward()
            if average:
                for p in last.parameters():
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)
            if isinstance(opt, W.SOAA):
                opt.set_loss(loss)
            opt.step()
    except Exception as e:  # noqa: BLE001 - compared below
        after = W.full_params(model)
        return {"error": str(e), "unchanged": all(torch.equal(a, b) for a, b in zip(before, after))}
    return {"error": None, "params": W.full_params(model)}


def _worker(rank: int, world: int) -> dict[str, Any]:
    mesh = W.make_mesh(world, hsdp=False)
    out: dict[str, Any] = {name: {how: _run(name, rank, world, mesh, how) for how in ("all", "rank0", "rank0_zeros")}
                           for name in NAMES}
    for name in NAMES:
        out[name]["none"] = {avg: _none_run(name, rank, world, mesh, avg) for avg in (False, True)}
    return out


def _reference(name: str) -> list[torch.Tensor]:
    """One process; the last Linear has no gradient from UNUSED_AT on."""
    _, cls, kw, sizes = W.CASE[name]
    model = W.tiny_mlp(sizes=sizes)
    opt = cls(model.named_parameters(), **kw)
    last = [m for m in model if isinstance(m, nn.Linear)][-1]
    for t in range(W.STEPS):
        opt.zero_grad()
        loss = W.loss_fn(model, *W.global_batch(t, sizes))
        loss.backward()
        if t >= UNUSED_AT:
            for p in last.parameters():
                p.grad = None
        if isinstance(opt, W.SOAA):
            opt.set_loss(loss)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_distributed(_worker, 2, tmp_path_factory.mktemp("fsdp2_unused"), timeout=300)


@pytest.mark.parametrize("name", NAMES)
def test_plain_parameter_without_gradient_on_every_rank_is_not_stepped(results: list[dict[str, Any]],
                                                                        name: str) -> None:
    ref = _reference(name)
    for r, res in enumerate(results):
        *got, none = res[name]["all"]
        assert bool(none), f"rank {r}: the gradient was made up"
        for i, (a, b) in enumerate(zip(got, ref)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"rank {r} param {i}: {m}")
        for a, b in zip(res[name]["rank0"][:-1], res[name]["rank0_zeros"][:-1]):  # None counts as zeros
            assert torch.equal(a, b), f"rank {r}"


@pytest.mark.parametrize("name", NAMES)
def test_plain_gradients_that_differ_under_none_raise_on_every_rank(results: list[dict[str, Any]],
                                                                    name: str) -> None:
    ref = _full_reference(name)
    for r, res in enumerate(results):
        differ, averaged = res[name]["none"][False], res[name]["none"][True]
        assert differ["error"] is not None and "differ from rank 0's" in differ["error"], (r, differ["error"])
        assert differ["unchanged"], f"rank {r}: a refused step changed the parameters"
        assert averaged["error"] is None, (r, averaged["error"])
        for i, (a, b) in enumerate(zip(averaged["params"], ref)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"rank {r} param {i}: {m}")


def _full_reference(name: str) -> list[torch.Tensor]:
    """One process on the global batch, every step with every gradient."""
    _, cls, kw, sizes = W.CASE[name]
    model = W.tiny_mlp(sizes=sizes)
    opt = cls(model.named_parameters(), **kw)
    for t in range(W.STEPS):
        opt.zero_grad()
        loss = W.loss_fn(model, *W.global_batch(t, sizes))
        loss.backward()
        if isinstance(opt, W.SOAA):
            opt.set_loss(loss)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]
