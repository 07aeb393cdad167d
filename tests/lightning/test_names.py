"""One name per optimizer: the registry's ``lightning_soaa.<Name>`` is what Python exports, what the CLI and
the DeepSpeed JSON configs take, and the prefix of the logged diagnostics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lightning_soaa
from lightning_soaa import registry
from lightning_soaa.lightning.callbacks import optimizer_name
from lightning_soaa.lightning.factory import resolve_optimizer_class

pytestmark = pytest.mark.lightning

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("spec", registry.REGISTRY, ids=lambda s: s.name)
def test_python_cli_and_diagnostics_agree(spec: registry.OptimizerSpec) -> None:
    cls = spec.load()
    assert getattr(lightning_soaa, spec.name) is cls
    assert resolve_optimizer_class(spec.qualified_name) is cls
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    assert optimizer_name(spec.build(model, **spec.test_kwargs)) == spec.name


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_configs_spell_the_registry_name(path: Path) -> None:
    block = json.loads(path.read_text()).get("optimizer")
    if block is None or not str(block.get("type", "")).startswith(registry.PREFIX):
        pytest.skip(f"{path.name} names no lightning_soaa optimizer")
    spec = registry.lookup(block["type"])
    assert spec is not None and spec.qualified_name == block["type"], block["type"]


def test_the_factory_refuses_unknown_arguments_when_made() -> None:
    """A misspelt init_args key or scheduler class surfaced inside fit() (TypeError, KeyError or
    AttributeError); the factory is made before the trainer starts, so it says so there."""
    from lightning_soaa.lightning.factory import OptimizerFactory

    with pytest.raises(ValueError, match=r"Invalid init_args for SOAA: 'lrr'\. Must be among: .*\blr\b"):
        OptimizerFactory("SOAA", {"lrr": 1e-3})
    with pytest.raises(ValueError, match=r"Invalid init_args for EGN: 'model'"):  # the factory passes it
        OptimizerFactory("EGN", {"model": None})
    for bad, text in (({"init_args": {}}, "Must be a dict with a 'class_path'"),
                      ({"class_path": "StepLR"}, "class_path='StepLR'"),
                      ({"class_path": "torch.optim.lr_scheduler.StepLRR"}, "has no attribute 'StepLRR'")):
        with pytest.raises(ValueError, match=text):
            OptimizerFactory("SOAA", {"lr": 1e-3}, lr_scheduler=bad)
    ok = OptimizerFactory("SOAA", {"lr": 1e-3, "total_steps": 5},
                          lr_scheduler={"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 2}})
    assert ok.init_args["total_steps"] == 5


@pytest.mark.parametrize("bad", [None, 3])
def test_resolving_something_that_is_not_a_name_lists_the_valid_names(bad: object) -> None:
    with pytest.raises(ValueError, match=rf"Invalid optimizer {bad!r}: expected a name or an optimizer class\. "
                                         r"Valid optimizers: lightning_soaa\.SOAA"):
        resolve_optimizer_class(bad)  # type: ignore[arg-type]  # the point of the test
