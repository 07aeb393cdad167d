"""Every registered optimizer's ``step`` and ``zero_grad`` do what torch's ``Optimizer`` wrapper does, without its
profiler label's cost where no profiler records (lightning_soaa/optim/step_hooks.py).

torch wraps every optimizer class's ``step`` in ``record_function`` and its ``zero_grad`` loop in another: two
dispatched profiler ops each, at every call, whether or not a profiler records (~100-135 us of a small model's
training step on a slow 2-core host). Here, for each optimizer: the hooks run once, in torch's order, with
torch's error for a bad pre-hook return; the labels are in a profiler's trace; no profiler op runs outside one;
a subclass's ``super().step()`` and a class step re-wrapped with ``functools.wraps`` run the hooks once.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_soaa.registry import FirstArg, OptimizerSpec, StepNeeds
from tests.conformance._battery import data, each_optimizer, make, step


class _Ops(TorchDispatchMode):
    """The names of the dispatched ops run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _with_grads(opt: Any) -> None:
    """Gradients on every parameter (an optimizer that takes the batch leaves them None)."""
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)


def _hooked(opt: Any, calls: list[str]) -> None:
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))


def _build(cls: Any, spec: OptimizerSpec, model: torch.nn.Module) -> Any:
    """``spec.build`` with another class (a subclass of the spec's)."""
    kwargs = dict(spec.test_kwargs)
    if spec.first_arg is FirstArg.MODULE:
        kwargs.setdefault("loss", "mse")
    return cls(spec.first_argument(model), **kwargs)


@each_optimizer
def test_hooks_run_once_in_torchs_order(spec: OptimizerSpec) -> None:
    model, opt = make(spec)
    calls: list[str] = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post"))]
    try:
        _hooked(opt, calls)
        step(spec, model, opt, 0)
        step(spec, model, opt, 1)
    finally:
        for h in handles:
            h.remove()
    assert calls == ["global pre", "pre", "post", "global post"] * 2 and opt.num_steps == 2


@each_optimizer
def test_a_pre_hook_returning_something_else_is_refused_as_torch_refuses_it(spec: OptimizerSpec) -> None:
    model, opt = make(spec)
    opt.register_step_pre_hook(lambda o, a, k: "nonsense")
    with pytest.raises(RuntimeError, match="must return None or a tuple of \\(new_args, new_kwargs\\), but got"):
        step(spec, model, opt, 0)
    assert opt.num_steps == 0


@each_optimizer
def test_outside_a_profiler_step_and_zero_grad_make_no_profiler_op(spec: OptimizerSpec) -> None:
    model, opt = make(spec)
    step(spec, model, opt, 0)
    _with_grads(opt)
    with _Ops() as ops:
        opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert not [n for n in ops.names if n.startswith("profiler.")], ops.names
    x_step = _Ops()
    with x_step:
        step(spec, model, opt, 1)
    assert not [n for n in x_step.names if n.startswith("profiler.")], x_step.names
    _with_grads(opt)
    opt.zero_grad(set_to_none=False)  # torch's own: the gradients kept, zeroed
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@each_optimizer
def test_inside_a_profiler_step_and_zero_grad_carry_torchs_labels(spec: OptimizerSpec) -> None:
    model, opt = make(spec)
    step(spec, model, opt, 0)
    name = type(opt).__name__
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(spec, model, opt, 1)
        _with_grads(opt)
        opt.zero_grad()
    labels = [e.name for e in prof.events() if e.name.startswith("Optimizer.")]
    assert labels.count(f"Optimizer.step#{name}.step") == 1, labels
    assert f"Optimizer.zero_grad#{name}.zero_grad" in labels, labels
    assert all(p.grad is None for p in model.parameters())


@each_optimizer
def test_a_subclass_step_calling_super_runs_the_hooks_once(spec: OptimizerSpec) -> None:
    """torch wraps a subclass's own ``step``; the optimizer's, reached through ``super()``, does not run the
    hooks again (torch's ran them twice once a plain instance had been built)."""
    base = spec.load()

    class Logged(base):  # type: ignore[valid-type,misc]
        def step(self, *args: Any, **kwargs: Any) -> Any:
            return super().step(*args, **kwargs)

    make(spec)  # (a plain one built first: torch's wrapper then wrapped the base's step too)
    model, _ = make(spec)
    opt = _build(Logged, spec, model)
    calls: list[str] = []
    _hooked(opt, calls)
    step(spec, model, opt, 0)
    step(spec, model, opt, 1)
    assert calls == ["pre", "post"] * 2 and opt.num_steps == 2


@each_optimizer
def test_a_step_re_wrapped_on_the_class_still_runs_the_hooks(spec: OptimizerSpec,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A decorator put on the class's ``step`` with ``functools.wraps`` copies its ``hooked`` flag, so torch does
    not wrap it again; the hooks must still run (LossToOptimizer's post hook among them), once."""
    cls = spec.load()

    def logged(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(cls, "step", logged(cls.step))
    model, opt = make(spec)
    calls: list[str] = []
    _hooked(opt, calls)
    step(spec, model, opt, 0)
    assert calls == ["pre", "post"] and opt.num_steps == 1


@each_optimizer
def test_under_fullgraph_compile_step_and_zero_grad_fail_as_torchs_do(spec: OptimizerSpec) -> None:
    """Both run eagerly under torch.compile (skipped functions), so ``fullgraph=True`` refuses them, with dynamo's
    "marked as skipped" as under torch's wrapper; the wrapper's profiler test, traced, broke the graph first with
    "torch.* op returned non-Tensor", pointing at lightning_soaa's internals."""
    import torch._dynamo

    model, opt = make(spec)
    step(spec, model, opt, 0)  # (its gradients stay for the step below)
    x, y = data(1)
    kwargs = {StepNeeds.BATCH: {"inputs": x, "targets": y}, StepNeeds.LOSS: {"loss": torch.tensor(1.0)},
              StepNeeds.NOTHING: {}}[spec.needs]
    for call in (lambda: opt.step(**kwargs), opt.zero_grad):
        torch._dynamo.reset()
        with pytest.raises(torch._dynamo.exc.Unsupported, match="marked as skipped"):
            torch.compile(call, fullgraph=True, backend="eager")()
