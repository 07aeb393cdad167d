"""A step taken between a forward and its backward is refused by autograd, as with torch's foreach AdamW.

``loss = model(x); opt.step(); loss.backward()`` (a misplaced step, or a second optimizer's step inside a
closure) must not give gradients at the stepped weights silently: the step writes the parameters in place,
and autograd refuses a graph whose saved tensors were modified in place ("modified by an inplace operation")
when their version counters moved. torch's fused CPU AdamW kernel, which ShardedAdamW's step and ASGO/DASGO's
AdamW part run, wrote the parameters without moving them (torch's own ``AdamW(fused=True)`` too): the backward
then ran silently at the new weights. For every optimizer in :data:`lightning_soaa.registry.REGISTRY`, every
parameter the step writes is checked, each through a graph that saved it alone (a Linear's backward saves its
weight, not its bias).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lightning_soaa import registry
from lightning_soaa.registry import OptimizerSpec, StepNeeds
from tests.conformance._battery import data, each_optimizer, make, step, takes_kwarg
from tests.harness.distributed import run_distributed

INPLACE = "modified by an inplace operation"


def _graphs(model: torch.nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    """The model's loss, then one scalar per parameter whose graph saved that parameter (and nothing else)."""
    return [registry.half_mse(model(x), y), *((p * p).sum() for p in model.parameters())]


def _step_between(spec: OptimizerSpec, model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[Tensor]:
    """Gradients of step 1's batch, then the graphs of step 2's forward, then the optimizer's step: the
    graphs, whose backward comes after the step."""
    x, y = data(1)
    if spec.needs is StepNeeds.BATCH:
        graphs = _graphs(model, x, y)
        opt.step(inputs=x, targets=y)  # type: ignore[call-arg]
        return graphs
    opt.zero_grad(set_to_none=True)
    loss = registry.half_mse(model(x), y)
    loss.backward()
    graphs = _graphs(model, *data(2))
    if spec.needs is StepNeeds.LOSS:
        opt.step(loss=loss.detach())  # type: ignore[call-arg]
    else:
        opt.step()
    return graphs


def _refusals(graphs: list[Tensor]) -> list[bool]:
    """Whether each graph's backward was refused for an in-place change (other errors propagate)."""
    out = []
    for g in graphs:
        try:
            g.backward()
            out.append(False)
        except RuntimeError as e:
            if INPLACE not in str(e):
                raise
            out.append(True)
    return out


def _assert_each_refused(graphs: list[Tensor], names: list[str]) -> None:
    silent = [n for n, refused in zip(["loss", *names], _refusals(graphs), strict=True) if not refused]
    assert not silent, f"backward after the step ran at the stepped weights, silently: {silent}"


def test_torch_foreach_adamw_refuses_the_backward() -> None:
    """The behaviour the optimizers match: torch's foreach AdamW, driven as ShardedAdamW is."""
    spec = registry.get("AdamW")
    model, _ = make(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    step(spec, model, opt, 0)
    _assert_each_refused(_step_between(spec, model, opt), [n for n, _ in model.named_parameters()])


@each_optimizer
def test_a_backward_after_the_step_is_refused(spec: OptimizerSpec) -> None:
    model, opt = make(spec)
    step(spec, model, opt, 0)  # the state exists: the step below takes the path of every later step
    _assert_each_refused(_step_between(spec, model, opt), [n for n, _ in model.named_parameters()])


def _ranks_refusals(rank: int, world: int, name: str) -> list[bool]:
    spec = registry.get(name)
    model, opt = make(spec, **({"grad_reduction": "mean"} if takes_kwarg(spec, "grad_reduction") else {}))
    step(spec, model, opt, 0, rank=rank, world=world)
    return _refusals(_step_between(spec, model, opt))


@each_optimizer
def test_a_backward_after_the_step_is_refused_on_every_rank(spec: OptimizerSpec, tmp_path: Path) -> None:
    """W = 2, sharded: the owner of a block writes it with the update, the other rank by the exchange. Before,
    the owner's backward of a parameter updated by the fused kernel ran silently while the other rank's raised."""
    model, _ = make(spec)
    for rank, refused in enumerate(run_distributed(_ranks_refusals, 2, tmp_path, spec.name)):
        silent = [n for n, r in zip(["loss", *(n for n, _ in model.named_parameters())], refused, strict=True) if not r]
        assert not silent, f"rank {rank}: backward after the step ran at the stepped weights, silently: {silent}"
