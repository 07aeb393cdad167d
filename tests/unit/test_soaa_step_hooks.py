"""SOAA's ``step`` wrapper (optim/step_hooks.py) does what torch's ``Optimizer.profile_hook_step`` does: step hooks
(global and the optimizer's, arguments replaced by a pre hook, torch's error for a bad return), the profiler's
``Optimizer.step#SOAA.step`` label where a profiler records; and no profiler op where none records. Its
``zero_grad`` likewise (torch's ``set_to_none=True`` loop, torch's own label under a profiler)."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_soaa import SOAA
from tests.harness.models import batch, loss_fn, tiny_mlp


def _loss(opt: SOAA, model: torch.nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step, 0)
    opt.zero_grad()
    loss = loss_fn(model, x, y)
    loss.backward()
    return loss.detach()


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_outside_a_profiler_the_step_makes_no_profiler_op() -> None:
    """torch's wrapper entered ``record_function`` (two dispatched profiler ops, ~50 us of a small model's step)
    at every step, whether or not a profiler recorded."""
    model = tiny_mlp(0)
    opt = SOAA(model.parameters(), lr=1e-2)
    for s in range(3):
        loss = _loss(opt, model, s)
        with _Ops() as ops:
            opt.step(loss=loss)
        assert not [n for n in ops.names if n.startswith("profiler.")], ops.names


def test_inside_a_profiler_the_step_carries_torchs_label() -> None:
    model = tiny_mlp(0)
    opt = SOAA(model.parameters(), lr=1e-2)
    opt.step(loss=_loss(opt, model, 0))
    loss = _loss(opt, model, 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step(loss=loss)
    assert [e.key for e in prof.key_averages() if e.key == "Optimizer.step#SOAA.step"]


def test_hooks_run_in_torchs_order_and_a_pre_hook_replaces_the_arguments() -> None:
    models = [tiny_mlp(0), tiny_mlp(0)]
    opts = [SOAA(m.parameters(), lr=1e-2) for m in models]
    calls: list[str] = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post"))]
    try:
        opts[0].register_step_pre_hook(lambda o, a, k: calls.append("pre"))
        opts[0].register_step_post_hook(lambda o, a, k: calls.append(f"post {sorted(k)}"))
        # a pre hook's (args, kwargs) replace the step's: here the loss it is handed
        opts[0].register_step_pre_hook(lambda o, a, k: (a, {"loss": k["loss"] * 2.0}))
        for s in range(3):
            loss = _loss(opts[0], models[0], s)
            opts[0].step(loss=loss)
            _loss(opts[1], models[1], s)
            opts[1].step(loss=loss * 2.0)
    finally:
        for h in handles:
            h.remove()
    assert calls[:4] == ["global pre", "pre", "post ['loss']", "global post"]
    assert calls.count("pre") == 3 and calls.count("global pre") == 6  # (the second optimizer's too)
    assert opts[0].trust_state() == opts[1].trust_state()
    assert all(torch.equal(a, b) for a, b in zip(*(m.parameters() for m in models)))


def test_a_pre_hook_returning_something_else_is_refused_as_torch_refuses_it() -> None:
    model = tiny_mlp(0)
    opt = SOAA(model.parameters(), lr=1e-2)
    opt.register_step_pre_hook(lambda o, a, k: "nonsense")
    with pytest.raises(RuntimeError, match="must return None or a tuple of \\(new_args, new_kwargs\\), but got"):
        opt.step(loss=_loss(opt, model, 0))
    assert opt.num_steps == 0


def test_a_subclass_step_calling_super_runs_the_hooks_once() -> None:
    """torch wraps a subclass's own ``step``; SOAA's, called through ``super()``, does not run its hooks again."""

    class Logged(SOAA):
        def step(self, closure: Any = None, *, loss: Any = None) -> Any:  # type: ignore[override]
            return super().step(closure, loss=loss)

    model = tiny_mlp(0)
    SOAA(tiny_mlp(1).parameters(), lr=1e-2)  # (a plain SOAA built first: torch then wrapped SOAA.step too)
    opt = Logged(model.parameters(), lr=1e-2)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    for s in range(2):
        opt.step(loss=_loss(opt, model, s))
    assert calls == ["pre", "post"] * 2 and opt.num_steps == 2


def test_a_step_re_wrapped_on_the_class_still_runs_the_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decorator put on ``SOAA.step`` with ``functools.wraps`` copies its ``hooked`` flag, so torch does not wrap
    it again: torch's wrapper inside it ran the hooks, and so must SOAA's (LossToOptimizer's post hook among
    them). Taking every class step but SOAA's own for torch's wrapper ran none, silently."""

    def logged(step: Any) -> Any:
        @functools.wraps(step)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return step(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(SOAA, "step", logged(SOAA.step))
    model = tiny_mlp(0)
    opt = SOAA(model.parameters(), lr=1e-2)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.step(loss=_loss(opt, model, 0))
    assert calls == ["pre", "post"] and opt.num_steps == 1


def test_zero_grad_sets_the_gradients_to_none_without_a_profiler_op_outside_a_profiler() -> None:
    """torch's ``zero_grad`` entered ``record_function`` around its loop at every call (~80 us against ~15 us for
    the loop on a small model); ``set_to_none=False`` is still torch's (zeroed gradients, kept)."""
    model = tiny_mlp(0)
    opt = SOAA(model.parameters(), lr=1e-2)
    opt.step(loss=_loss(opt, model, 0))
    _loss(opt, model, 1)
    with _Ops() as ops:
        opt.zero_grad()
    assert not [n for n in ops.names if n.startswith("profiler.")], ops.names
    assert all(p.grad is None for p in model.parameters())
    _loss(opt, model, 2)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_inside_a_profiler_zero_grad_carries_torchs_label() -> None:
    model = tiny_mlp(0)
    opt = SOAA(model.parameters(), lr=1e-2)
    _loss(opt, model, 0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.zero_grad()
    assert [e.key for e in prof.key_averages() if e.key == "Optimizer.zero_grad#SOAA.zero_grad"]
    assert all(p.grad is None for p in model.parameters())
