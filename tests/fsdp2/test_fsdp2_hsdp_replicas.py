"""HSDP's replicas of a DTensor shard are compared across the replicate dim: refused where they differ.

Under HSDP (a 2 x 2 replicate x shard mesh) ranks 0 and 2 hold the same shard of every parameter, as do ranks 1
and 3, and FSDP2 averages their gradients. A shard written in place on one replica only (rank 0 scaled its
shard of ``0.weight`` after step 1), or replicas that started different (a replicate group built from other
weights, or weights loaded on one replica after ``fully_shard``), stayed different at every step after, for
every optimizer, with no message: the step compared the parameters with rank 0's, and shards differ across the
shard dim by design, so DTensor shards were not compared at all. Now each rank's shard is compared with the
lowest rank holding the same one, in the step's existing all-reduce: refused on every rank, naming the
parameter and the ranks, nothing changed (the retry too), and once the replicas are equal again (a broadcast
over the replicate dim) the run goes on. A write around the DTensor's version counter (``p.to_local()``,
``p.data``) on one replica is caught by the periodic replica check (``replica_check_every``), which compares the
whole shards with their replicas'. Allowed, and not refused: the same write on every replica, and a write to one
rank's shard on a 1-D mesh (one model whose shards differ by design).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.fsdp2 import _workers as W
from tests.harness.distributed import run_distributed

pytestmark = pytest.mark.timeout(600)

OPTIMIZERS = W.OPTIMIZER_CASES  # every registered optimizer that takes DTensors
WORLD = 4
#: the rank that holds the same shard as each rank on the 2 x 2 mesh (dim 0: replicate, dim 1: shard)
REPLICA = {0: 2, 1: 3, 2: 0, 3: 1}
EVERY = 2  # replica_check_every of the unseen-write case


def _step(model: Any, opt: Any, t: int, sizes: Any, rank: int, world_size: int) -> str:
    return W.expect_error(lambda: W.train_step(model, opt, *W.local_batch(t, sizes, rank, world_size)))


def _pieces(model: Any) -> list[torch.Tensor]:
    return [p.to_local().detach().clone() for p in model.parameters()]


def _broadcast_shards(model: Any, mesh: Any) -> None:
    """The cure the refusal names: every DTensor's shard from replicate group 0, over the replicate dim."""
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p.to_local(), group=mesh.get_group(0), group_src=0)


def _moved(rank: int, world_size: int, mesh: Any, name: str, cls: Any, kw: Any, sizes: Any) -> dict[str, Any]:
    """Rank 0's shard of ``0.weight`` scaled after step 1: step 2 refused, its retry refused, after a broadcast
    over the replicate dim step 2 runs; then every rank scales its shard alike: step 3 runs."""
    model = W.sharded_model(sizes, mesh)
    opt = cls(model.named_parameters(), **kw)
    res: dict[str, Any] = {"first": _step(model, opt, 0, sizes, rank, world_size)}
    if rank == 0:
        with torch.no_grad():
            model[0].weight.mul_(1.5)  # (this rank's shard of a DTensor: rank 2 holds the same one)
    before = _pieces(model)
    res["moved"] = _step(model, opt, 1, sizes, rank, world_size)
    res["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, _pieces(model)))
    res["retry"] = _step(model, opt, 1, sizes, rank, world_size)
    res["retry_unchanged"] = all(torch.equal(a, b) for a, b in zip(before, _pieces(model)))
    _broadcast_shards(model, mesh)
    res["then"] = _step(model, opt, 1, sizes, rank, world_size)
    with torch.no_grad():
        model[0].weight.mul_(0.9)  # every replica alike: allowed
    res["alike"] = _step(model, opt, 2, sizes, rank, world_size)
    res["steps"] = opt.num_steps
    res["pieces"] = _pieces(model)
    return res


def _start(rank: int, world_size: int, mesh: Any, name: str, cls: Any, kw: Any, sizes: Any) -> dict[str, Any]:
    """Replicate group 1 (ranks 2, 3) built from other weights (another seed), and then, with equal replicas,
    rank 2's shard overwritten after fully_shard (weights loaded on one replica): each first step refused."""
    seeded = W.tiny_mlp(seed=1 if rank >= 2 else 0, sizes=sizes).state_dict()
    model = W.sharded_model(sizes, mesh, state=seeded)
    opt = cls(model.named_parameters(), **kw)
    before = _pieces(model)
    res: dict[str, Any] = {"seed": _step(model, opt, 0, sizes, rank, world_size)}
    res["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, _pieces(model)))
    _broadcast_shards(model, mesh)
    res["seed_then"] = _step(model, opt, 0, sizes, rank, world_size)
    model = W.sharded_model(sizes, mesh)
    if rank == 2:
        with torch.no_grad():
            model[2].bias.copy_(torch.full_like(model[2].bias, 0.5))  # (rank 2's shard of '2.bias')
    opt = cls(model.named_parameters(), **kw)
    res["loaded"] = _step(model, opt, 0, sizes, rank, world_size)
    _broadcast_shards(model, mesh)
    res["loaded_then"] = _step(model, opt, 0, sizes, rank, world_size)
    return res


def _unseen(rank: int, world_size: int, mesh: Any, name: str, cls: Any, kw: Any, sizes: Any) -> dict[str, Any]:
    """Rank 2's shard of ``0.weight`` written through ``p.to_local()`` and rank 3's through ``p.data`` after step
    2, which move no version counter the per-step check reads: the checking step 3 (replica_check_every=2)
    refused, its retry too, nothing changed; after a broadcast over the replicate dim it runs."""
    model = W.sharded_model(sizes, mesh)
    opt = cls(model.named_parameters(), **kw, replica_check_every=EVERY)
    res: dict[str, Any] = {"first": [_step(model, opt, t, sizes, rank, world_size) for t in range(EVERY)]}
    with torch.no_grad():
        if rank == 2:
            model[0].weight.to_local().mul_(1.5)
        if rank == 3:
            model[0].weight.data.mul_(1.5)
    before = _pieces(model)
    res["written"] = _step(model, opt, EVERY, sizes, rank, world_size)
    res["retry"] = _step(model, opt, EVERY, sizes, rank, world_size)
    res["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, _pieces(model))) and opt.num_steps == EVERY
    _broadcast_shards(model, mesh)
    res["then"] = _step(model, opt, EVERY, sizes, rank, world_size)
    res["pieces"] = _pieces(model)
    return res


def _one_mesh(rank: int, world_size: int, mesh: Any, name: str, cls: Any, kw: Any, sizes: Any) -> dict[str, Any]:
    """A 1-D mesh of every rank: rank 0's shard written after step 1 is one model's piece, not refused."""
    model = W.sharded_model(sizes, mesh)
    opt = cls(model.named_parameters(), **kw)
    res = {"first": _step(model, opt, 0, sizes, rank, world_size)}
    if rank == 0:
        with torch.no_grad():
            model[0].weight.mul_(1.5)
    res["written"] = _step(model, opt, 1, sizes, rank, world_size)
    return res


def _close(rank: int, world_size: int, mesh: Any, name: str, cls: Any, kw: Any, sizes: Any) -> dict[str, Any]:
    """Rank 2's shard of ``0.weight`` loaded after ``fully_shard`` from weights 5e-6 of its largest magnitude off
    rank 0's (another checkpoint a step or so apart): within the tolerance of a tensor-parallel weight's drift, but
    HSDP's replicas are equal in every bit by construction, so it is a real difference: refused at the first step."""
    model = W.sharded_model(sizes, mesh)
    opt = cls(model.named_parameters(), **kw)
    if rank == 2:
        with torch.no_grad():
            piece = model[0].weight.to_local()
            piece.add_(5e-6 * float(piece.abs().max()))
    return {"first": _step(model, opt, 0, sizes, rank, world_size), "steps": opt.num_steps}


def _hsdp(rank: int, world_size: int) -> dict[str, Any]:
    hsdp, flat = W.make_mesh(world_size, True), W.make_mesh(world_size, False)
    out: dict[str, Any] = {}
    for name, cls, kw, sizes in OPTIMIZERS:
        out[name] = {"moved": _moved(rank, world_size, hsdp, name, cls, kw, sizes),
                     "start": _start(rank, world_size, hsdp, name, cls, kw, sizes),
                     "unseen": _unseen(rank, world_size, hsdp, name, cls, kw, sizes),
                     "flat": _one_mesh(rank, world_size, flat, name, cls, kw, sizes),
                     "close": _close(rank, world_size, hsdp, name, cls, kw, sizes)}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_distributed(_hsdp, WORLD, Path(tmp_path_factory.mktemp("hsdp")), timeout=540)


def test_a_shard_written_on_one_hsdp_replica_is_refused_on_every_rank(results: list[dict[str, Any]]) -> None:
    for name, *_ in OPTIMIZERS:
        for r, out in enumerate(results):
            got = out[name]["moved"]
            assert got["first"] == "no error", (name, r, got["first"])
            assert ("changed in place since the last step, outside the optimizer, on some HSDP replicas only, and "
                    "ranks that hold the same shard now differ (rank 2 from rank 0; first: parameter '0.weight')"
                    ) in got["moved"], (name, r, got["moved"])
            assert "group=mesh.get_group(0), group_src=0" in got["moved"], (name, r, got["moved"])
            assert "still differ" in got["retry"] and "the same shard" in got["retry"], (name, r, got["retry"])
            assert got["unchanged"] and got["retry_unchanged"], (name, r)
            for after in ("then", "alike"):
                assert got[after] == "no error", (name, r, after, got[after])
            assert got["steps"] == 3, (name, r, got["steps"])
            replica = results[REPLICA[r]][name]["moved"]["pieces"]
            assert all(torch.equal(a, b) for a, b in zip(got["pieces"], replica)), (name, r)


def test_hsdp_replicas_that_start_different_are_refused_at_the_first_step(results: list[dict[str, Any]]) -> None:
    for name, *_ in OPTIMIZERS:
        for r, out in enumerate(results):
            got = out[name]["start"]
            assert ("ranks that hold the same shard of a DTensor parameter differ (rank 2 from rank 0, rank 3 from "
                    "rank 1; first: parameter '0.weight') at the first step") in got["seed"], (name, r, got["seed"])
            assert got["unchanged"], (name, r)
            assert ("differ (rank 2 from rank 0; first: parameter '2.bias') at the first step"
                    in got["loaded"]), (name, r, got["loaded"])
            for after in ("seed_then", "loaded_then"):
                assert got[after] == "no error", (name, r, after, got[after])


def test_a_shard_written_around_its_counter_on_one_replica_is_refused_at_the_periodic_check(
        results: list[dict[str, Any]]) -> None:
    for name, *_ in OPTIMIZERS:
        for r, out in enumerate(results):
            got = out[name]["unseen"]
            assert got["first"] == ["no error"] * EVERY, (name, r, got["first"])
            for attempt in ("written", "retry"):
                assert ("parameter(s) '0.weight' on ranks that hold the same shard differ (rank 2 from rank 0, rank 3 "
                        f"from rank 1) at step {EVERY} (the replica check made every replica_check_every={EVERY} "
                        "steps)") in got[attempt], (name, r, attempt, got[attempt])
                assert "group=mesh.get_group(0), group_src=0" in got[attempt], (name, r, got[attempt])
            assert got["unchanged"] and got["then"] == "no error", (name, r, got["then"])
            replica = results[REPLICA[r]][name]["unseen"]["pieces"]
            assert all(torch.equal(a, b) for a, b in zip(got["pieces"], replica)), (name, r)


def test_a_shard_written_on_one_rank_of_a_one_dim_mesh_is_not_refused(results: list[dict[str, Any]]) -> None:
    for name, *_ in OPTIMIZERS:
        for r, out in enumerate(results):
            assert out[name]["flat"] == {"first": "no error", "written": "no error"}, (name, r, out[name]["flat"])


def test_hsdp_replicas_a_few_ulps_apart_are_refused_bit_for_bit(results: list[dict[str, Any]]) -> None:
    """The tolerance for tensor-parallel ``Replicate`` weights' drift let them through: the replicas then stayed
    6e-6 apart at every step (bfloat16 weights: 1e-2, within 4 of its ulps of the largest magnitude), silently."""
    for name, *_ in OPTIMIZERS:
        for r, out in enumerate(results):
            got = out[name]["close"]
            assert ("ranks that hold the same shard of a DTensor parameter differ (rank 2 from rank 0; first: "
                    "parameter '0.weight') at the first step") in got["first"], (name, r, got["first"])
            assert got["steps"] == 0, (name, r)
