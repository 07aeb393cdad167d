"""Tensor parallelism (``parallelize_module``) on a 1-D mesh of gloo ranks: gradients whose placements differ
from their parameters'.

torchtitan's plan puts ``SequenceParallel`` on the norms: their weights are ``Replicate`` but their gradients
come back ``Partial(sum)`` (each rank's sum over its own sequence chunk); a layer dimension smaller than the
mesh gives a ``Replicate`` gradient for a ``Shard`` parameter with an empty piece. Each rank stepped its local
piece of such a gradient as the parameter's: SOAA 0.13 off the one-process run and the replicated norms
drifted apart between ranks; ShardedAdamW 0.24 off on the empty-piece layer, SOAA's native kernel read past
its state's buffers (a segfault). Every optimizer that takes DTensor parameters now refuses such a gradient
on every rank with nothing changed, naming the redistribution that makes it right; with that one line the
run equals the one-process run (float64).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_soaa.registry import REGISTRY, StepNeeds
from tests.harness.distributed import run_distributed

pytestmark = pytest.mark.timeout(240)

STEPS = 3
#: optimizers that take DTensor parameters; the Rowwise weight (Shard(1)) goes to the AdamW part of
#: ASGO/DASGO (their matrix method refuses a Shard(1) matrix at construction)
NAMES = [s.name for s in REGISTRY if s.supports_dtensor]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.up = nn.Linear(8, 12)
        self.down = nn.Linear(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(self.norm(x))))


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = _Block().double()
    with torch.no_grad():
        m.norm.weight.add_(0.3 * torch.randn(8, dtype=torch.float64))
    return m


def _optimizer(name: str, model: nn.Module) -> Any:
    spec = next(s for s in REGISTRY if s.name == name)
    named = list(model.named_parameters())
    if name in ("ASGO", "DASGO"):
        groups = [{"params": [q for q in named if q[0] != "down.weight"]},
                  {"params": [q for q in named if q[0] == "down.weight"], "use_asgo": False}]
        return spec.load()(groups, lr=2e-2)
    return spec.load()(named, lr=2e-2)


def _data(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(t)
    return torch.randn(2, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 8, 8, generator=g,
                                                                             dtype=torch.float64)


def _train(name: str, model: nn.Module, opt: Any, chunk: tuple[int, int] | None, redistribute: bool) -> None:
    """STEPS steps on the mean over the whole sequence; ``chunk = (rank, world)``: this rank's sequence chunk."""
    loss_needed = next(s for s in REGISTRY if s.name == name).needs is StepNeeds.LOSS
    for t in range(STEPS):
        x, y = _data(t)
        if chunk is not None:
            x, y = x.chunk(chunk[1], 1)[chunk[0]], y.chunk(chunk[1], 1)[chunk[0]]
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        # the ranks' gradients are summed across the mesh (TP's collectives, the Partial's sum): each rank's
        # share of the global mean is its chunk's mean / world
        (loss / chunk[1] if chunk is not None else loss).backward()
        whole = loss.detach().clone()
        if chunk is not None:  # equal chunks: the mean of the ranks' means is the global mean
            torch.distributed.all_reduce(whole)
            whole /= chunk[1]
        if redistribute:  # the line the refusal names
            for p in model.parameters():
                if p.grad is not None and p.grad.placements != p.placements:
                    p.grad = p.grad.redistribute(p.device_mesh, p.placements)
        opt.step(loss=whole) if loss_needed else opt.step()


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def _worker(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, Any] = {}
    for name in NAMES:
        for redistribute in (False, True):
            model = _model()
            parallelize_module(model, mesh, {"norm": SequenceParallel(), "up": ColwiseParallel(input_layouts=Shard(1)),
                                             "down": RowwiseParallel(output_layouts=Shard(1))})
            opt = _optimizer(name, model)
            before = _full(model)
            try:
                _train(name, model, opt, (rank, world), redistribute)
                out[f"{name}/{redistribute}"] = _full(model)
            except ValueError as exc:
                out[f"{name}/{redistribute}"] = (str(exc), all(torch.equal(a, before[n])
                                                               for n, a in _full(model).items()))
    return out


def test_gradients_laid_out_otherwise_than_their_parameters_are_refused_or_redistributed(tmp_path) -> None:
    res = run_distributed(_worker, 2, tmp_path, timeout=200)
    for name in NAMES:
        ref_model = _model()
        opt = _optimizer(name, ref_model)
        _train(name, ref_model, opt, None, False)
        ref = _full(ref_model)
        for rank, got in enumerate(res):
            msg, unchanged = got[f"{name}/False"]
            assert "parameter 'norm.weight' is a DTensor with placements (Replicate(),), its gradient has " \
                   "placements (Partial(sum),)" in msg and "p.grad.redistribute(" in msg, (name, rank, msg)
            assert unchanged, (name, rank)
            for n, a in got[f"{name}/True"].items():
                torch.testing.assert_close(a, ref[n], rtol=1e-9, atol=1e-11, msg=f"{name} rank {rank} {n}")
