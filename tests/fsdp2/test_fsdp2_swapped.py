"""``model.to(...)`` on an FSDP2 model after the optimizer exists.

torch swaps a DTensor parameter's contents in ``model.to(...)`` (``torch.utils.swap_tensors``) whatever
``torch.__future__.set_swap_module_params_on_conversion`` says, and swap_tensors refuses a tensor that has a weak
reference. ASGO and DASGO built from the module (the registry's route: OptimizerFactory, the CLI, a DeepSpeed
config) kept one to every parameter of the module they walked, so even a no-op ``model.to("cpu")`` raised torch's
"_apply(): Couldn't swap FSDPLinear.weight" (W = 2, gloo). For every optimizer that takes DTensors, before the
first step and after two: the call succeeds and the run equals the same run without it, on every rank.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_soaa import registry
from lightning_soaa.registry import OptimizerSpec
from tests.fsdp2 import _workers as W
from tests.harness.distributed import run_distributed

TAKING = [s for s in registry.REGISTRY if s.supports_dtensor]


def _run(rank: int, world_size: int, moved_at: int | None) -> dict[str, Any]:
    """Per optimizer: the full parameters after W.STEPS steps, with ``model.to("cpu")`` before step ``moved_at``
    (None: never), or the error."""
    mesh = W.make_mesh(world_size, False)
    out: dict[str, Any] = {}
    for spec in TAKING:
        model = W.sharded_model(W.TALL, mesh)
        opt = spec.build(model, **spec.test_kwargs)
        try:
            for t in range(W.STEPS):
                if t == moved_at:
                    model.to("cpu")
                W.train_step(model, opt, *W.local_batch(t, W.TALL, rank, world_size))
        except RuntimeError as e:  # (raised alike on every rank: the call is local)
            out[spec.name] = str(e)
            continue
        out[spec.name] = W.full_params(model)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int | None, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("fsdp2_to")
    return {at: run_distributed(_run, 2, tmp, at) for at in (None, 0, 2)}


@pytest.mark.parametrize("moved_at", [0, 2], ids=["before_the_first_step", "after_steps"])
@pytest.mark.parametrize("spec", TAKING, ids=[s.name for s in TAKING])
def test_model_to_after_construction_trains_on_as_without_it(spec: OptimizerSpec, moved_at: int,
                                                              runs: dict[int | None, list[dict[str, Any]]]) -> None:
    for rank in range(2):
        got, ref = runs[moved_at][rank][spec.name], runs[None][rank][spec.name]
        assert not isinstance(got, str), f"rank {rank}: {got}"
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True)), f"rank {rank}"
