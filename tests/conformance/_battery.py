"""Shared pieces of the conformance battery: the model, the data, one step, fault injection, comparisons.

Everything runs in float64 on the tiny MLP of :mod:`tests.harness.models`, with the registry's drivers
(:meth:`OptimizerSpec.build` / :meth:`OptimizerSpec.take_step`) and each spec's ``test_kwargs``, so the
battery knows nothing about any one optimizer.

Data: one *global* batch of ``GLOBAL_BATCH`` samples per step (divisible by every world size tested);
rank ``r`` of ``W`` takes rows ``[r·n/W, (r+1)·n/W)``. The single-process reference therefore uses the
same data for every ``W``, and a run resumed at another world size continues on the same data.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import typing
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_soaa import registry
from lightning_soaa.config import ShardingConfig
from lightning_soaa.registry import OptimizerSpec, StepNeeds
from tests.harness.models import batch, tiny_mlp

SPECS: tuple[OptimizerSpec, ...] = registry.REGISTRY
SIZES = (6, 8, 5, 3)
TINY = (6, 3)  # one Linear: two blocks, so at W >= 3 some ranks own nothing
GLOBAL_BATCH = 12


#: every registered optimizer, then the ``shard=False`` variant (named ``<name>-unsharded``) of each one that reads
#: it as replicated state (``OptimizerSpec.unsharded_replicas``: EGN): the replicas the replica checks compare
REPLICA_SPECS: tuple[OptimizerSpec, ...] = SPECS + tuple(
    dataclasses.replace(s, name=f"{s.name}-unsharded", test_kwargs={**s.test_kwargs, "shard": False})
    for s in SPECS if s.unsharded_replicas)


def each_optimizer(fn: Callable[..., Any]) -> Any:
    """``@each_optimizer``: parametrize a test over every registered optimizer (argument ``spec``)."""
    return pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])(fn)


def each_replica_variant(fn: Callable[..., Any]) -> Any:
    """``@each_replica_variant``: parametrize a test over :data:`REPLICA_SPECS` (argument ``spec``)."""
    return pytest.mark.parametrize("spec", REPLICA_SPECS, ids=[s.name for s in REPLICA_SPECS])(fn)


def takes_kwarg(spec: OptimizerSpec, name: str) -> bool:
    return name in inspect.signature(spec.load()).parameters


def make(spec: OptimizerSpec, sizes: tuple[int, ...] = SIZES, seed: int = 0, device: str | torch.device = "cpu",
         **overrides: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh float64 model on ``device`` and the optimizer over it, with the spec's test hyperparameters."""
    model = tiny_mlp(seed, torch.float64, sizes=sizes).to(device)
    return model, spec.build(model, **{**spec.test_kwargs, **overrides})


def data(t: int, sizes: tuple[int, ...] = SIZES, rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor]:
    """This rank's share of the global batch of step ``t``."""
    x, y = batch(t, 0, n=GLOBAL_BATCH, d_in=sizes[0], d_out=sizes[-1])
    n = GLOBAL_BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def poison_hook(model: nn.Module, opt: Any) -> Callable[[], None]:
    """Put a NaN into the gradient of a parameter this rank owns no block of (the hard case: only its
    owner reads it in the update), or of the last parameter when the rank owns them all."""
    plist = list(model.parameters())
    owned = {b.param_index for b in opt.block_table.owned()}
    target = next((p for i, p in enumerate(plist) if i not in owned), plist[-1])

    def hook() -> None:
        assert target.grad is not None
        target.grad.view(-1)[0] = float("nan")

    return hook


def step(spec: OptimizerSpec, model: nn.Module, opt: Any, t: int, *, sizes: tuple[int, ...] = SIZES,
         rank: int = 0, world: int = 1, average: bool = False, poison: bool = False) -> None:
    """Step ``t`` through the registry's driver. ``average``: all-reduce the gradients first (what DDP does
    before ``step()``). ``poison``: a non-finite value on this rank (a NaN gradient, or for optimizers
    that take the batch a NaN target)."""
    device = next(model.parameters()).device  # the accelerator tests run the same steps on a GPU
    x, y = (u.to(device) for u in data(t, sizes, rank, world))
    hooks: list[Callable[[], None]] = []
    if average:
        import torch.distributed as dist

        def avg() -> None:
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)

        hooks.append(avg)
    if poison:
        if spec.needs is StepNeeds.BATCH:
            y = y.clone()
            y[0, 0] = float("nan")
        else:
            hooks.append(poison_hook(model, opt))

    def on_gradients() -> None:
        for h in hooks:
            h()

    spec.take_step(opt, model, x, y, on_gradients=on_gradients)


def frozen_steps(spec: OptimizerSpec, model: nn.Module, opt: Any, k: int, rank: int = 0, world: int = 1,
                 loss_value: float | None = None) -> None:
    """``k`` steps in which no parameter has a gradient on any rank: a phase where the optimizer's
    parameters are frozen while the loop still calls ``step()`` (with the loss, for optimizers that take
    it; ``loss_value``: that loss instead of the model's, e.g. NaN). Not for optimizers that take the
    batch: they read no gradients."""
    for t in range(k):
        x, y = data(100 + t, rank=rank, world=world)
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            loss = registry.half_mse(model(x), y)
        if loss_value is not None:
            loss = torch.full_like(loss, loss_value)
        if spec.needs is StepNeeds.LOSS:
            opt.step(loss=loss)
        else:
            opt.step()


def params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------------------------------- comparisons
def _walk(a: Any, b: Any, path: str, leaf: Callable[[Any, Any, str], None]) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: dict vs {type(b).__name__}"
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            _walk(a[k], b[k], f"{path}.{k}", leaf)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _walk(x, y, f"{path}[{i}]", leaf)
    else:
        leaf(a, b, path)


def assert_identical(a: Any, b: Any, path: str = "state") -> None:
    """Nested dicts/lists of tensors and scalars, bit for bit (NaN equals NaN)."""

    def leaf(x: Any, y: Any, p: str) -> None:
        if isinstance(x, Tensor):
            assert isinstance(y, Tensor), f"{p}: tensor vs {type(y).__name__}"
            assert x.dtype == y.dtype and x.shape == y.shape, (
                f"{p}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
            assert torch.equal(x, y) or bool(((x == y) | (x.isnan() & y.isnan())).all()), f"{p}: {x} vs {y}"
        elif isinstance(x, float) and isinstance(y, float) and math.isnan(x):
            assert math.isnan(y), f"{p}: nan vs {y}"
        else:
            assert type(x) is type(y) and x == y, f"{p}: {x!r} vs {y!r}"

    _walk(a, b, path, leaf)


def assert_close(a: Any, b: Any, path: str = "state", rtol: float = 1e-10, atol: float = 1e-12) -> None:
    """Like :func:`assert_identical`, but floating values agree to ``rtol``/``atol`` (float64 runs)."""

    def leaf(x: Any, y: Any, p: str) -> None:
        if isinstance(x, Tensor) and x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{p}: {m}")
        elif isinstance(x, float) and not isinstance(y, bool) and isinstance(y, (int, float)):
            assert (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=rtol, abs_tol=atol), \
                f"{p}: {x!r} vs {y!r}"
        elif isinstance(x, str) and isinstance(y, str) and p.endswith(".lightning_soaa"):
            assert_close(json.loads(x), json.loads(y), p, rtol, atol)  # the metadata's JSON copy in a group
        else:
            assert_identical(x, y, p)

    _walk(a, b, path, leaf)


def without_skips(sd: dict[str, Any]) -> dict[str, Any]:
    """A state dict minus its ``skipped_steps`` counter (compared separately) and the JSON copy of its
    metadata in ``param_groups[0]`` (which holds the counter too; the metadata is compared at the top)."""
    out = copy.deepcopy(sd)
    out["lightning_soaa"]["global"].pop("skipped_steps", None)
    out["param_groups"][0].pop("lightning_soaa", None)
    return out


# ---------------------------------------------------------------------------------------- bad kwargs
def bad_values(spec: OptimizerSpec) -> Iterator[tuple[str, Any]]:
    """Invalid values for every field of the spec's config dataclass, derived from the field's type.

    Every float hyperparameter of every optimizer is a non-negative quantity (rates, decays, epsilons,
    thresholds), so -1.0, NaN and a string are invalid for all; ints are counts (>= 0 or >= 1) and must
    be ints; strings are choices; pairs are betas in [0, 1).
    """
    config = spec.load_config()
    fields = [(f, typing.get_type_hints(config)[f.name]) for f in dataclasses.fields(config)]
    # and the sharding options the constructor takes (ShardingConfig validates them)
    fields += [(f, typing.get_type_hints(ShardingConfig)[f.name]) for f in dataclasses.fields(ShardingConfig)
               if takes_kwarg(spec, f.name)]
    for f, kind in fields:
        if kind is bool or kind == (bool | None):
            yield f.name, "yes"
        elif kind is float or kind == (float | None):  # None: "the default for the dtype" (ASGO's root_floor)
            yield from ((f.name, v) for v in (-1.0, float("nan"), "0.1"))
        elif kind is int or kind == (int | None):
            yield from ((f.name, v) for v in (-1, 2.5))
        elif kind is str:
            yield f.name, "no-such-choice"
        elif kind == (int | str):  # a count or a named mode (ASGO's root_every="auto")
            yield from ((f.name, v) for v in (-1, 2.5, "no-such-choice"))
        elif typing.get_origin(kind) is tuple:
            yield from ((f.name, v) for v in ((0.5,), (0.5, 1.5), 0.9))
        else:  # a new field type: teach the battery about it
            raise AssertionError(f"{spec.name}: {f.name}: no bad values known for type {kind}")


def edge_values(spec: OptimizerSpec) -> Iterator[tuple[str, Any]]:
    """The lower edge of every float field of the spec's config (0.0; a pair: (0.0, 0.0)): each is either
    refused by the constructor or must give steps that run (an edge the constructor accepts once
    crashed the first step: SOAA's eps = 0 in the trust ratio's floor)."""
    config = spec.load_config()
    for f in dataclasses.fields(config):
        kind = typing.get_type_hints(config)[f.name]
        if kind is float or kind == (float | None):
            yield f.name, 0.0
        elif typing.get_origin(kind) is tuple:
            yield f.name, (0.0, 0.0)


def state_dict_raises(opt: Any) -> bool:
    """Whether ``opt.state_dict()`` refuses for want of a current ``consolidate_state_dict()`` (W > 1)."""
    try:
        opt.state_dict()
    except RuntimeError as exc:
        return "consolidate_state_dict" in str(exc)
    return False
