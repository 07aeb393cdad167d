"""The FSDP2 suite's optimizers come from the registry (tests/fsdp2/_workers.py): every registered optimizer that
takes DTensor parameters (its class's ``supports_dtensor``) is a case, with the registry's test hyperparameters,
and every one that does not is checked to refuse them, naming what to use instead. The suite named its four
optimizers by hand, with hyperparameters of its own: a fifth would have been registered without a single FSDP2
check. Shown here with throwaway optimizers registered for the test (in-process, no ranks: milliseconds)."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest

from lightning_soaa import EGN, ShardedAdamW, registry
from lightning_soaa.registry import DeepSpeedLayout, OptimizerSpec, StepNeeds
from tests.fsdp2 import _workers as W


class Takes(ShardedAdamW):
    """A throwaway optimizer that takes DTensor parameters (the base's default)."""


class Refuses(ShardedAdamW):
    """A throwaway optimizer that refuses them."""

    supports_dtensor = False


def _spec(cls: type) -> OptimizerSpec:
    return OptimizerSpec(name=cls.__name__, class_path=f"{__name__}:{cls.__name__}",
                         config_path="lightning_soaa.config:AdamWConfig", needs=StepNeeds.NOTHING,
                         ds_layout=DeepSpeedLayout.ELEMENTWISE, ds_stages=(0,), test_kwargs={"lr": 0.125})


def _workers_with_extra(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A fresh copy of tests/fsdp2/_workers.py, imported while the throwaway optimizers are registered too (the
    suite's own copy, which the other tests hold, is left as it is)."""
    monkeypatch.setattr(registry, "REGISTRY", (*registry.REGISTRY, _spec(Takes), _spec(Refuses)))
    found = importlib.util.spec_from_file_location("_fsdp2_workers_with_extra", W.__file__)
    assert found is not None and found.loader is not None
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    return module


def test_a_newly_registered_optimizer_gets_the_fsdp2_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = _workers_with_extra(monkeypatch)
    assert "takes" in fresh.CASE, sorted(fresh.CASE)
    assert fresh.CASE["takes"] == ("takes", Takes, {"lr": 0.125}, W.TALL)
    assert [c[0] for c in fresh.OPTIMIZER_CASES] == [*(c[0] for c in W.OPTIMIZER_CASES), "takes"]
    assert "takes" in fresh.SWITCH_CASES  # (the plain <-> FSDP2 checkpoint switch too)
    assert "refuses" not in fresh.CASE and [s.name for s in fresh.REFUSING] == [
        *(s.name for s in W.REFUSING), "Refuses"]
    # and a refusal of DTensor parameters offers it (bare instances: the refusal reads no state)
    for cls in (EGN, Refuses):
        said = str(cls.__new__(cls)._dtensor_refusal())
        assert f"{cls.__name__} does not support DTensor" in said and "Takes" in said, said


def test_the_cases_are_the_registry_optimizers_with_its_test_hyperparameters() -> None:
    takes = [s for s in registry.REGISTRY if s.supports_dtensor]
    assert W.OPTIMIZER_CASES == [(s.name.lower(), s.load(), s.test_kwargs, W.TALL) for s in takes]
    assert [s.name for s in W.REFUSING] == ["EGN"]
    assert W.CASES[:len(takes)] == W.OPTIMIZER_CASES and W.CASE["asgo_wide"][2] == registry.get("ASGO").test_kwargs
