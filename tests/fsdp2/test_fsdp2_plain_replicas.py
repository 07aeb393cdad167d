"""The plain (not ``fully_shard``ed) parameters of an FSDP2 model are replicas: compared across ranks.

A model whose last layer is left out of ``fully_shard`` keeps ordinary tensors there, one copy per rank, which
``grad_reduction="mean"`` averages the gradients of. Copies that started different (another seed per rank, a
checkpoint loaded on rank 0 only) or were changed in place on some ranks only stayed different at every step
after, silently, for every optimizer: the checks that refuse such replicas without FSDP2 were left off wherever
the parameters held a DTensor. Now the first step (after construction or load) compares these parameters and
every step compares those changed in place, refused on every rank, nothing changed; once every rank holds the
same values again (a broadcast) the run goes on. The sharded DTensor parameters are not replicas: an in-place
change of one rank's shard is not compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tests.fsdp2 import _workers as W
from tests.harness.distributed import run_distributed

OPTIMIZERS = W.OPTIMIZER_CASES


def _step(model: Any, opt: Any, t: int, sizes: Any, rank: int, world_size: int) -> str:
    return W.expect_error(lambda: W.train_step(model, opt, *W.local_batch(t, sizes, rank, world_size)))


def _broadcast_plain(model: Any) -> None:
    with torch.no_grad():
        for p in model[-1].parameters():
            dist.broadcast(p.data, src=0)


def _replicas(rank: int, world_size: int) -> dict[str, Any]:
    """Per optimizer: rank 0's plain weight made different before construction, stepped, broadcast, stepped;
    then rank 0's plain weight changed in place between steps, stepped, broadcast, stepped; then one rank's
    shard of a DTensor weight changed in place, stepped."""
    mesh = W.make_mesh(world_size, False)
    out: dict[str, Any] = {}
    for name, cls, kw, sizes in OPTIMIZERS:
        model = W.sharded_model(sizes, mesh, plain_last=True)
        plain = model[-1].weight
        if rank == 0:
            with torch.no_grad():
                plain.add_(0.01)
        opt = cls(model.named_parameters(), **kw, grad_reduction="mean")
        res: dict[str, Any] = {"start": _step(model, opt, 0, sizes, rank, world_size)}
        _broadcast_plain(model)
        res["start_then"] = _step(model, opt, 0, sizes, rank, world_size)
        if rank == 0:
            with torch.no_grad():
                plain.mul_(1.5)
        res["moved"] = _step(model, opt, 1, sizes, rank, world_size)
        _broadcast_plain(model)
        res["moved_then"] = _step(model, opt, 1, sizes, rank, world_size)
        if rank == 0:
            with torch.no_grad():
                model[0].weight.mul_(0.5)  # (this rank's shard of a DTensor)
        res["shard"] = _step(model, opt, 2, sizes, rank, world_size)
        res["plain"] = plain.detach().clone()
        res["steps"] = opt.num_steps
        out[name] = res
    return out


def test_plain_parameters_of_an_fsdp2_model_that_differ_across_ranks_are_refused(tmp_path: Path) -> None:
    results = run_distributed(_replicas, 2, tmp_path, timeout=300)
    for name, *_ in OPTIMIZERS:
        for r, res in enumerate(results):
            got = res[name]
            assert ("the parameters on rank(s) [1] differ from rank 0's (first: parameter '4.weight' on rank 1) at "
                    "the first step") in got["start"], (
                name, r, got["start"])
            assert ("changed in place since the last step" in got["moved"]
                    and "(first: parameter '4.weight')" in got["moved"]), (
                name, r, got["moved"])
            for after in ("start_then", "moved_then", "shard"):
                assert got[after] == "no error", (name, r, after, got[after])
            assert got["steps"] == 3, (name, r, got["steps"])
            assert torch.equal(got["plain"], results[0][name]["plain"]), (name, r)
