"""A model converted or loaded by swapping its parameters' contents, after the optimizer was built.

``torch.__future__.set_swap_module_params_on_conversion(True)`` makes ``model.to(...)`` and
``model.load_state_dict(...)`` keep every Parameter object and swap in new contents (``torch.utils.swap_tensors``);
torch does so for tensor-subclass parameters (FSDP2's DTensors) whatever the flag (not run here). ``swap_tensors``
refuses a tensor that has a weak reference or another holder of its C++ tensor. ASGO and DASGO kept a weak
reference to every parameter of a module they walked (the routing of a later ``add_param_group``), and
ShardedAdamW's cached block views held the parameter itself after its first step: a fine-tuning load
(``model.load_state_dict(pretrained)``) or a no-op ``model.to("cpu")`` then failed with torch's "_apply(): Couldn't
swap Linear.weight", where ``torch.optim.AdamW`` trains on. For every optimizer in
:data:`lightning_soaa.registry.REGISTRY`, before the first step and after two, on one process and on two gloo ranks
under ``grad_reduction="mean"``: the swap succeeds and training goes on exactly as a fresh optimizer loaded with
the same state over the loaded values.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from lightning_soaa import registry
from lightning_soaa.registry import OptimizerSpec, StepNeeds, half_mse
from tests.conformance._battery import assert_close, data, each_optimizer, make, params, step
from tests.harness.distributed import run_distributed
from tests.harness.models import tiny_mlp

BEFORE, AFTER = 2, 2  # steps before the swap (when not 0) and after it


@contextmanager
def _swapping() -> Iterator[None]:
    was = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(was)


def _kwargs(spec: OptimizerSpec, world: int) -> dict[str, Any]:
    mean = world > 1 and "grad_reduction" in inspect.signature(spec.load()).parameters
    return {"grad_reduction": "mean"} if mean else {}


def _run(spec: OptimizerSpec, rank: int, world: int, before: int) -> dict[str, Any]:
    """``before`` steps, then a swapping ``load_state_dict`` of other weights and a swapping no-op ``to``, then
    ``AFTER`` steps: the parameters, and on one process the state and values at the swap (the fresh reference)."""
    model, opt = make(spec, **_kwargs(spec, world))
    for t in range(before):
        step(spec, model, opt, t, rank=rank, world=world)
    with _swapping():
        model.load_state_dict(tiny_mlp(3, torch.float64).state_dict())
        model.to("cpu")
    at_swap = {} if world > 1 else {  # (one process: the reference starts from these)
        "model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()) if before else None}
    for t in range(before, before + AFTER):
        step(spec, model, opt, t, rank=rank, world=world)
    return {"params": params(model), **at_swap}


def _fresh(spec: OptimizerSpec, got: dict[str, Any], before: int) -> list[torch.Tensor]:
    """One process from the values and state at the swap, with a fresh model and optimizer (no swap)."""
    model, opt = make(spec)
    model.load_state_dict(got["model"])
    if got["opt"] is not None:
        opt.load_state_dict(got["opt"])
    for t in range(before, before + AFTER):
        step(spec, model, opt, t)
    return params(model)


@pytest.mark.parametrize("before", [0, BEFORE], ids=["before_the_first_step", "after_steps"])
@each_optimizer
def test_swapped_parameters_train_on_as_a_fresh_optimizer(spec: OptimizerSpec, before: int) -> None:
    got = _run(spec, 0, 1, before)
    assert_close(got["params"], _fresh(spec, got, before), "params")


def _worker(rank: int, world: int, before: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in registry.REGISTRY:
        try:
            out[spec.name] = _run(spec, rank, world, before)
        except RuntimeError as e:
            out[spec.name] = {"error": str(e)}
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_distributed(_worker, 2, tmp_path_factory.mktemp("swap"), BEFORE)


@each_optimizer
def test_swapped_parameters_on_two_ranks_train_on_as_one_process(spec: OptimizerSpec,
                                                                  two_ranks: list[dict[str, Any]]) -> None:
    model, opt = make(spec)
    for t in range(BEFORE):
        step(spec, model, opt, t)
    model.load_state_dict(tiny_mlp(3, torch.float64).state_dict())
    for t in range(BEFORE, BEFORE + AFTER):
        step(spec, model, opt, t)
    for rank, res in enumerate(two_ranks):
        got = res[spec.name]
        assert "error" not in got, f"rank {rank}: {got.get('error')}"
        assert_close(got["params"], params(model), f"rank {rank} params")
    assert spec.needs is StepNeeds.BATCH or all(  # the ranks hold one replica
        torch.equal(a, b) for a, b in zip(two_ranks[0][spec.name]["params"], two_ranks[1][spec.name]["params"]))


def _handed_over_steps(spec: OptimizerSpec, swap_between: bool) -> list[torch.Tensor]:
    """Two steps with the loss handed over by ``set_loss`` where the optimizer takes one (the Lightning callbacks'
    route), ``model.to("cpu")`` swapping between them while the first step's gradients are still there."""
    model, opt = make(spec)
    for t in range(2):
        if t == 1 and swap_between:
            with _swapping():
                model.to("cpu")  # (swaps each gradient too)
        x, y = data(t)
        if spec.needs is StepNeeds.BATCH:
            opt.step(inputs=x, targets=y)
            continue
        opt.zero_grad()
        loss = half_mse(model(x), y)
        loss.backward()
        if spec.needs is StepNeeds.LOSS:
            opt.set_loss(loss.detach())
        opt.step()
    return params(model)


@each_optimizer
def test_a_swap_after_a_step_with_its_gradients_still_there(spec: OptimizerSpec) -> None:
    """SOAA kept a weak reference to the first gradient of a loss handed over by ``set_loss`` past the step (the
    mark telling a later ``zero_grad`` whether that loss's gradients moved), so ``model.to(...)`` between the
    step and the next ``zero_grad`` failed on the gradient's swap: "Couldn't swap Linear.weight.grad"."""
    assert_close(_handed_over_steps(spec, True), _handed_over_steps(spec, False), "params")
