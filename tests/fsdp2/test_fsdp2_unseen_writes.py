"""An FSDP2 model's plain (not ``fully_shard``ed) parameters written on some ranks only around autograd.

``p.data.mul_(...)`` moves no version counter, so the per-step in-place check (test_fsdp2_plain_replicas.py) does
not see it: rank 0's plain copy stayed apart from the others at every step after, silently. The periodic replica
check (``replica_check_every``) compares the plain parameters' digest at its steps and refuses on every rank,
naming the parameter and the rank, nothing changed; once every rank holds the same values again the run goes on.
A DTensor's shard written the same way on one rank is that rank's own, not a replica: not compared.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tests.fsdp2 import _workers as W
from tests.harness.distributed import run_distributed

OPTIMIZERS = W.OPTIMIZER_CASES
EVERY = 2


def _step(model: Any, opt: Any, t: int, sizes: Any, rank: int, world_size: int) -> str:
    return W.expect_error(lambda: W.train_step(model, opt, *W.local_batch(t, sizes, rank, world_size)))


def _built(world_size: int, grad_reduction: str) -> Iterator[tuple[str, Any, Any, Any]]:
    """Per optimizer: (name, an FSDP2 model whose last Linear stays plain, the optimizer over it, sizes)."""
    mesh = W.make_mesh(world_size, False)
    for name, cls, kw, sizes in OPTIMIZERS:
        model = W.sharded_model(sizes, mesh, plain_last=True)
        opt = cls(model.named_parameters(), **kw, grad_reduction=grad_reduction, replica_check_every=EVERY)
        yield name, model, opt, sizes


def _unseen_writes(rank: int, world_size: int) -> dict[str, Any]:
    """Per optimizer: two steps, rank 1's plain weight written through p.data, the checking step, a broadcast, the
    checking step again, then rank 1's shard of a DTensor written through p.data and two more steps."""
    out: dict[str, Any] = {}
    for name, model, opt, sizes in _built(world_size, "mean"):
        plain = model[-1].weight
        res: dict[str, Any] = {"first": [_step(model, opt, t, sizes, rank, world_size) for t in range(EVERY)]}
        if rank == 1:
            plain.data.mul_(1.5)
        before = plain.detach().clone()
        res["written"] = _step(model, opt, EVERY, sizes, rank, world_size)
        res["unchanged"] = torch.equal(plain.detach(), before) and opt.num_steps == EVERY
        with torch.no_grad():
            dist.broadcast(plain.data, src=0)
        res["then"] = _step(model, opt, EVERY, sizes, rank, world_size)
        if rank == 1:
            model[0].weight.data.mul_(0.5)  # (this rank's shard of a DTensor)
        res["shard"] = [_step(model, opt, t, sizes, rank, world_size) for t in (EVERY + 1, EVERY + 2)]
        res["plain"], res["steps"] = plain.detach().clone(), opt.num_steps
        out[name] = res
    return out


def _assert_refused_then_trained(got: dict[str, Any], plain_on_rank0: torch.Tensor) -> None:
    assert got["first"] == ["no error"] * EVERY, got["first"]
    assert "parameter(s) '4.weight' on rank(s) [1] differ from rank 0's" in got["written"], got["written"]
    assert "p.data" in got["written"] and got["unchanged"], got["written"]
    assert [got["then"], *got["shard"]] == ["no error"] * 3 and got["steps"] == EVERY + 3, got
    assert torch.equal(got["plain"], plain_on_rank0)


def test_plain_parameters_written_through_p_data_on_some_ranks_are_refused(tmp_path: Path) -> None:
    results = run_distributed(_unseen_writes, 2, tmp_path, timeout=300)
    for name, *_ in OPTIMIZERS:
        for res in results:
            _assert_refused_then_trained(res[name], results[0][name]["plain"])


def _drifting_step(model: Any, opt: Any, t: int, sizes: Any, rank: int, world_size: int) -> str:
    """One step under "none" whose plain gradients the caller averages, with one element one ulp larger on rank 1
    (another device's reduction kernel)."""
    plain = model[-1].weight
    opt.zero_grad()
    loss = W.loss_fn(model, *W.local_batch(t, sizes, rank, world_size))
    loss.backward()
    for p in model[-1].parameters():
        dist.all_reduce(p.grad)
        p.grad.div_(world_size)
    if rank == 1:
        g = plain.grad.view(-1)
        g[0] = torch.nextafter(g[0], torch.tensor(float("inf"), dtype=g.dtype))
    W.hand_loss(opt, loss)
    return W.expect_error(opt.step)


def _ulp_apart(rank: int, world_size: int) -> dict[str, Any]:
    """grad_reduction="none" with the plain weight's gradient one ulp apart on rank 1: the gradient comparison
    allows that by design (``agreement.GRAD_RTOL``), so the plain copies drift by ulps, and the periodic check must
    not refuse them."""
    out: dict[str, Any] = {}
    for name, model, opt, sizes in _built(world_size, "none"):
        errors = [_drifting_step(model, opt, t, sizes, rank, world_size) for t in range(2 * EVERY + 1)]
        out[name] = {"errors": errors, "steps": opt.num_steps}
    return out


def test_plain_copies_ulps_apart_under_none_are_not_refused(tmp_path: Path) -> None:
    results = run_distributed(_ulp_apart, 2, tmp_path, timeout=300)
    for name, *_ in OPTIMIZERS:
        for res in results:
            assert res[name]["errors"] == ["no error"] * (2 * EVERY + 1), (name, res[name]["errors"])
            assert res[name]["steps"] == 2 * EVERY + 1


def _swapped_on_one_rank(rank: int, world_size: int) -> dict[str, Any]:
    """Drifting copies as in :func:`_ulp_apart`, then rank 0 alone swaps its plain weight out and back (an EMA swap
    for an evaluation: moves its version counter, puts back the same bits), steps; then scales it alone, steps (a
    real write), broadcasts rank 0's, steps."""
    out: dict[str, Any] = {}
    for name, model, opt, sizes in _built(world_size, "none"):
        plain = model[-1].weight
        got = [_drifting_step(model, opt, t, sizes, rank, world_size) for t in range(3)]
        if rank == 0:
            with torch.no_grad():
                saved = plain.detach().clone()
                plain.copy_(torch.zeros_like(plain))
                plain.copy_(saved)
        got.append(_drifting_step(model, opt, 3, sizes, rank, world_size))
        if rank == 0:
            with torch.no_grad():
                plain.mul_(1.5)
        got.append(_drifting_step(model, opt, 4, sizes, rank, world_size))
        with torch.no_grad():
            dist.broadcast(plain.data, src=0)
        got.append(_drifting_step(model, opt, 4, sizes, rank, world_size))
        out[name] = {"got": got, "steps": opt.num_steps}
    return out


def test_an_ema_swap_on_one_rank_of_drifting_plain_copies_is_not_refused(tmp_path: Path) -> None:
    """The in-place check compared the plain copies bit for bit after rank 0's swap: refused ("now differ"), and the
    retry too ("still differ"), although every rank held its honest copy. They are compared to a tolerance
    (replica_drift.py) now; a real write on one rank is still refused, and the run goes on after a broadcast."""
    results = run_distributed(_swapped_on_one_rank, 2, tmp_path, timeout=300)
    swapped = {(name, r): res[name]["got"][:4] for name, *_ in OPTIMIZERS for r, res in enumerate(results)}
    assert all(got == ["no error"] * 4 for got in swapped.values()), swapped
    for name, *_ in OPTIMIZERS:
        for r, res in enumerate(results):
            got = res[name]["got"]
            assert "changed in place" in got[4] and "by more than 1e-05" in got[4], (name, r, got[4])
            assert got[5] == "no error" and res[name]["steps"] == 5, (name, r, got)
