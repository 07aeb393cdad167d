"""``optimizer.state.clear()`` for every registered optimizer: the per-parameter state starts again.

As for torch's optimizers, clearing the state resets the moments and their step counts: the steps after it
equal those of a fresh optimizer built with the same hyperparameters on the same parameters, given the
optimizer-wide values a loop sets by hand (``_global_hyperparameters``: EGN's λ and line-search α). EGN's
momentum is one vector over all parameters with one bias-correction count; its count was kept after a clear,
and its first step after it was 0.52x a fresh EGN's (β = 0.5, 4 steps before). SOAA keeps its trust region (d
and the loss statistics, optimizer-wide, documented in the README): it steps as a fresh SOAA that loaded the
cleared one's ``state_dict()``. At W = 2 a cleared run equals the cleared one-process run (EGN decides the
restart from the step's all-reduce).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_soaa.registry import OptimizerSpec, StepNeeds
from tests.conformance._battery import SPECS, assert_close, each_optimizer, make, params, step
from tests.harness.distributed import run_distributed

BEFORE, AFTER = 4, 3  # steps before the clear, and after it


def _keeps_trust_region(opt: Any) -> bool:
    """SOAA's trust region is optimizer-wide state that a clear keeps (README)."""
    return callable(getattr(opt, "trust_state", None))


def _cleared_run(spec: OptimizerSpec, rank: int = 0, world: int = 1) -> tuple[nn.Module, Any]:
    model, opt = make(spec)
    average = world > 1 and spec.needs is not StepNeeds.BATCH
    for t in range(BEFORE):
        step(spec, model, opt, t, rank=rank, world=world, average=average)
    opt.state.clear()
    return model, opt


@each_optimizer
def test_after_state_clear_it_steps_as_a_fresh_optimizer(spec: OptimizerSpec) -> None:
    model, opt = _cleared_run(spec)
    twin = copy.deepcopy(model)
    fresh = spec.build(twin, **spec.test_kwargs)
    if _keeps_trust_region(opt):
        fresh.load_state_dict(opt.state_dict())
    for name, value in opt._global_hyperparameters().items():
        setattr(fresh, name, value)
    for t in range(BEFORE, BEFORE + AFTER):
        step(spec, model, opt, t)
        step(spec, twin, fresh, t)
        assert_close(params(model), params(twin), f"params after step {t}")


def _worker(rank: int, world: int) -> dict[str, list[torch.Tensor]]:
    torch.set_num_threads(1)
    out = {}
    for spec in SPECS:
        model, opt = _cleared_run(spec, rank, world)
        average = world > 1 and spec.needs is not StepNeeds.BATCH
        for t in range(BEFORE, BEFORE + AFTER):
            step(spec, model, opt, t, rank=rank, world=world, average=average)
        out[spec.name] = params(model)
    return out


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, list[torch.Tensor]]]:
    return run_distributed(_worker, 2, Path(tmp_path_factory.mktemp("state_clear")), timeout=240)


@pytest.fixture(scope="module")
def one_process() -> dict[str, list[torch.Tensor]]:
    return _worker(0, 1)


@each_optimizer
def test_a_clear_on_every_rank_equals_one_process(spec: OptimizerSpec, launch: list[Any],
                                                  one_process: dict[str, list[torch.Tensor]]) -> None:
    ref = one_process[spec.name]
    for rank, got in enumerate(launch):
        assert_close(got[spec.name], ref, f"rank {rank} params")
