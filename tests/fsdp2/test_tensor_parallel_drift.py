"""Tensor-parallel ``Replicate`` weights whose copies drift by ulps across the mesh.

Each rank computes a ``Replicate`` weight's gradient itself; a non-deterministic CUDA kernel (atomics in a
backward) gives each rank other last bits, so honest copies drift apart by ulps. The replica checks compared them
bit for bit: the periodic check (``replica_check_every``) refused the run at its step N (here 2) and at every retry,
"written around version counters", and an EMA swap on one rank was refused too. Where the bits differ they are now
compared to a tolerance (``replica_drift.DRIFT_RTOL`` of the weight's largest magnitude): the drift trains on, a
real write on one rank is still refused at the periodic check, and the run goes on once the copies are equal. The
drift is made here (gloo, CPU kernels are deterministic) by moving one element of rank 1's copy by one ulp.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tests.fsdp2 import _workers as W
from tests.harness.distributed import run_distributed

EVERY = 2


def _replicated(sizes: tuple[int, ...], mesh: Any) -> nn.Module:
    """The battery's MLP with every weight a ``Replicate`` DTensor over the mesh (the same batch on every rank)."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(a, b, dtype=torch.float64) for a, b in zip(sizes[:-1], sizes[1:])))
    return distribute_module(
        model, mesh, input_fn=lambda m, i, d: tuple(DTensor.from_local(x, d, [Replicate()]) for x in i),
        output_fn=lambda m, o, d: o.to_local())


def _local(p: Any) -> torch.Tensor:
    return p.to_local().data  # (written around the version counter, as a kernel's own last bits are)


def _drifting(rank: int, world_size: int) -> dict[str, Any]:
    """Per optimizer: one ulp of drift on rank 1 before step 1; the periodic check at step 2; an EMA swap on rank 0
    alone; a real write on rank 1 before the next periodic check; a broadcast; one more step."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    out: dict[str, Any] = {}
    for name, cls, kw, sizes in W.OPTIMIZER_CASES:
        model = _replicated(sizes, mesh)
        opt = cls(model.named_parameters(), **kw, replica_check_every=EVERY)
        weight = model[0].weight

        def step(t: int) -> str:
            return W.expect_error(lambda: W.train_step(model, opt, *W.global_batch(t, sizes)))

        got = [step(0)]
        if rank == 1:
            w = _local(weight).view(-1)
            w[0] = torch.nextafter(w[0], torch.tensor(float("inf"), dtype=w.dtype))
        got += [step(1), step(2)]
        if rank == 0:
            with torch.no_grad():
                saved = weight.detach().clone()
                weight.copy_(torch.zeros_like(weight))
                weight.copy_(saved)
        got.append(step(3))
        if rank == 1:
            _local(weight).mul_(1.5)
        got.append(step(4))
        for p in model.parameters():
            dist.broadcast(_local(p), src=0)
        got.append(step(4))
        out[name] = {"got": got, "steps": opt.num_steps}
    return out


def test_replicate_weights_that_drift_by_ulps_train_on_and_a_real_write_is_refused(tmp_path: Path) -> None:
    results = run_distributed(_drifting, 2, tmp_path, timeout=300)
    drifted = {(name, r): res[name]["got"][:4] for name, *_ in W.OPTIMIZER_CASES for r, res in enumerate(results)}
    assert all(got == ["no error"] * 4 for got in drifted.values()), drifted
    for name, *_ in W.OPTIMIZER_CASES:
        for r, res in enumerate(results):
            written, then = res[name]["got"][4:]
            assert ("parameter(s) '0.weight' on ranks that hold the same shard differ (rank 1 from rank 0) at step 4 "
                    "(the replica check made every replica_check_every=2 steps), by more than 1e-05 of their largest "
                    "magnitude") in written, (name, r, written)
            assert then == "no error" and res[name]["steps"] == 5, (name, r, res[name])
