"""Gradients a ``grad_reduction="mean"`` step averaged are not averaged again: trained exactly, or refused.

With ``"mean"`` each optimizer averages ``p.grad`` itself and writes the average into the blocks its rank
owns, leaving each rank's own gradient elsewhere. Stepped again on those gradients, without a new backward,
that mix was averaged again, and the ranks trained alike on a wrong gradient, silently:

* a parameter in two optimizers of ours (torch allows it) stepped on one backward (two ShardedAdamW at
  W = 2: 6.7e-2 off one process after 5 steps);
* one optimizer stepped twice on one backward (ShardedAdamW: 8.2e-2 after 3 iterations; one process
  applies the same gradient twice).

Both are refused now, on every rank, naming the parameter, with nothing changed. Each optimizer stepped
after a backward of its own, and both under DDP with ``"none"`` (the route the refusal names), train as one
process. Every gradient optimizer of the registry, on real gloo ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lightning_soaa.registry import REGISTRY, StepNeeds, get, half_mse
from tests.conformance._battery import data, takes_kwarg
from tests.harness.distributed import run_distributed
from tests.harness.models import tiny_mlp

GRAD_MEAN_SPECS = [pytest.param(s.name, id=s.name) for s in REGISTRY
                   if s.needs is not StepNeeds.BATCH and takes_kwarg(s, "grad_reduction")]
STEPS = 3


def _pair(name: str, model: nn.Module, reduction: str) -> tuple[Any, Any]:
    """One optimizer over every parameter and one over the last layer's (both of class ``name``)."""
    spec = get(name)
    kw = {**spec.test_kwargs, "grad_reduction": reduction}
    last = [(f"head.{n}", p) for n, p in list(model.children())[-1].named_parameters()]
    return spec.build(model, **kw), spec.load()(last, **kw)


def _backward(model: nn.Module, t: int, rank: int, world: int) -> torch.Tensor:
    x, y = data(t, rank=rank, world=world)
    loss = half_mse(model(x), y)
    loss.backward()
    return loss.detach()


def _step(name: str, opt: Any, loss: torch.Tensor) -> None:
    if get(name).needs is StepNeeds.LOSS:
        opt.step(loss=loss)
    else:
        opt.step()


def _train(name: str, rank: int, world: int, *, reduction: str, ddp: bool, own_backward: bool) -> list[torch.Tensor]:
    """STEPS iterations: both optimizers step on one backward, or (``own_backward``) each on its own."""
    model = tiny_mlp()
    fwd = DDP(model) if ddp else model
    opts = _pair(name, model, reduction)
    for t in range(STEPS):
        for opt in opts:
            if own_backward or opt is opts[0]:
                model.zero_grad(set_to_none=True)
                loss = _backward(fwd, t, rank, world)
            _step(name, opt, loss)
    return [p.detach().clone() for p in model.parameters()]


def _w_shared(rank: int, world: int, name: str) -> dict[str, Any]:
    model = tiny_mlp()
    whole, head = _pair(name, model, "mean")
    loss = _backward(model, 0, rank, world)
    _step(name, whole, loss)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        _step(name, head, loss)
        msg = "no error"
    except Exception as e:  # noqa: BLE001 - its class and text are what is checked
        msg = f"{type(e).__name__}: {e}"
    unchanged = all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    dist.barrier()
    return {"msg": msg, "unchanged": unchanged, "head_steps": head.num_steps,
            "own": _train(name, rank, world, reduction="mean", ddp=False, own_backward=True),
            "ddp": _train(name, rank, world, reduction="none", ddp=True, own_backward=False)}


@pytest.mark.parametrize("name", GRAD_MEAN_SPECS)
def test_a_parameter_in_two_optimizers_under_mean_is_refused_or_trains_as_one_process(tmp_path: Path,
                                                                                      name: str) -> None:
    res = run_distributed(_w_shared, 2, tmp_path, name, timeout=180)
    for out in res:  # every rank (a rank that owns no block of the head in the first one: naming the others)
        assert out["msg"].startswith("RuntimeError"), out["msg"]
        assert out["unchanged"] and out["head_steps"] == 0, out
    named = [out["msg"] for out in res if "another optimizer" in out["msg"]]
    assert named, [out["msg"] for out in res]
    assert all("'head." in m and "grad_reduction='none'" in m and "Nothing changed" in m for m in named), named
    for key, own in (("own", True), ("ddp", False)):
        ref = _train(name, 0, 1, reduction="mean", ddp=False, own_backward=own)
        for out in res:
            for a, b in zip(out[key], ref):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def _w_stepped_twice(rank: int, world: int, name: str) -> dict[str, Any]:
    spec = get(name)
    model = tiny_mlp()
    opt = spec.build(model, **{**spec.test_kwargs, "grad_reduction": "mean"})
    loss = _backward(model, 0, rank, world)
    _step(name, opt, loss)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        _step(name, opt, loss)  # no backward since the first
        msg = "no error"
    except Exception as e:  # noqa: BLE001 - its class and text are what is checked
        msg = f"{type(e).__name__}: {e}"
    unchanged = all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    model.zero_grad(set_to_none=False)  # a new backward into the same tensors clears the mark
    _step(name, opt, _backward(model, 1, rank, world))
    return {"msg": msg, "unchanged": unchanged, "steps": opt.num_steps}


@pytest.mark.parametrize("name", GRAD_MEAN_SPECS)
def test_a_second_step_on_one_backward_under_mean_is_refused_on_every_rank(tmp_path: Path, name: str) -> None:
    res = run_distributed(_w_stepped_twice, 2, tmp_path, name)
    for out in res:
        assert out["msg"].startswith("RuntimeError"), out["msg"]
        assert out["unchanged"] and out["steps"] == 2, out
    named = [out["msg"] for out in res if "this optimizer's last step" in out["msg"]]
    assert named and all("Run backward() before each step()" in m and "Nothing changed" in m for m in named), \
        [out["msg"] for out in res]


def _w_grads_saved(rank: int, world: int, name: str, path: str) -> dict[str, Any]:
    spec = get(name)
    model = tiny_mlp()
    opt = spec.build(model, **{**spec.test_kwargs, "grad_reduction": "mean"})
    _step(name, opt, _backward(model, 0, rank, world))
    grads = [p.grad for p in model.parameters()]
    torch.save(grads, f"{path}.{rank}")  # (a gradient dump for a look; the mark made it unpicklable)
    loaded = torch.load(f"{path}.{rank}", weights_only=True)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, grads[0])  # (comparing the ranks' gradients: pickled too)
    return {"same": all(torch.equal(a, b) for a, b in zip(grads, loaded)),
            "gathered": all(isinstance(g, torch.Tensor) for g in gathered)}


@pytest.mark.parametrize("name", GRAD_MEAN_SPECS)
def test_gradients_a_mean_step_marked_can_be_saved_and_gathered(tmp_path: Path, name: str) -> None:
    """The mark on a gradient a ``"mean"`` step averaged into held a weak reference to the optimizer: torch.save
    of that gradient (and all_gather_object, any pickle) raised "cannot pickle 'weakref.ReferenceType' object"."""
    for out in run_distributed(_w_grads_saved, 2, tmp_path, name, str(tmp_path / "grads")):
        assert out == {"same": True, "gathered": True}, out
