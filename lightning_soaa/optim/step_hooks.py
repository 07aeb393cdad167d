"""torch's ``Optimizer.step`` wrapper (step hooks, the profiler's label) without its cost where no profiler records.

torch wraps every optimizer class's ``step`` at construction (``Optimizer.profile_hook_step``): the global and the
optimizer's own pre hooks (which may replace the arguments), the step, ``_optimizer_step_code`` (the profiler's
Python tracer hooks into it), the post hooks, all inside ``record_function("Optimizer.step#<class>.step")``. That
``record_function`` makes two dispatched profiler ops per call whether or not a profiler records: ~50 us of a
~270 us W = 1 SOAA step on the report's digits MLP (a slow 2-core host; ``bench_soaa_digits_step.py``), a fifth
of the step. :func:`hooked_step` is the same wrapper, the label made only where a profiler records (torch's own
test for its low-overhead labels, plus the C++ profiler state), so a profiler's trace reads as under torch's.
Every registered optimizer's step has it (``ShardedOptimizer.step``, ``SOAA.step``, ``EGN.step``).
One observer sees a difference: torch's ``ExecutionTraceObserver`` run on its own, without a profiler (it sets
no state Python can read), records no ``Optimizer.step#<class>.step`` or ``zero_grad`` node. Making the labels
there as plain C ``RecordFunction`` s cost ~45 us of the digits training step's ~100 us saving: not made.
``Optimizer.zero_grad`` makes the same label around its loop: :func:`grads_to_none` is its ``set_to_none=True``
loop without it (~80 us against ~15 us there, more than the loop itself), ``ShardedOptimizer.zero_grad``'s.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from itertools import chain
from typing import Any, TypeVar, cast

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

__all__ = ["TORCH_ZERO_GRAD", "grads_to_none", "hooked_step", "torch_zero_grad_next"]

F = TypeVar("F", bound=Callable[..., Any])

_profiler_enabled: Callable[[], bool] = torch._C._autograd._profiler_enabled

#: the code of torch's own step wrapper (``Optimizer.profile_hook_step``): a class step made of it ran the hooks
_TORCH_WRAPPER_CODE = torch.optim.Optimizer.profile_hook_step(lambda *args, **kwargs: None).__code__

#: torch's ``Optimizer.zero_grad``, whose ``set_to_none=True`` loop :func:`grads_to_none` is
TORCH_ZERO_GRAD: Callable[..., None] = torch.optim.Optimizer.zero_grad


def _profiling() -> bool:
    """Whether a profiler records in this thread: torch's Python flag (``torch.profiler.profile``,
    ``torch.autograd.profiler.profile``), else the C++ state (a profiler enabled without the Python class)."""
    return torch.autograd.profiler._is_profiler_enabled or _profiler_enabled()


def hooked_step(step: F) -> F:
    """Decorate an optimizer class's ``step`` with what torch's ``profile_hook_step`` does (its ``hooked`` flag set,
    so torch does not wrap it again): hooks run and the label is made where torch's wrapper makes them.

    A subclass that overrides ``step`` is wrapped by torch itself; its ``super().step()`` then calls this one
    directly, without running the hooks a second time. Only torch's wrapper counts as having run them: a class
    step re-wrapped by anything else (a decorator that copies ``hooked`` with ``functools.wraps``) still runs
    them here, as torch's wrapper inside it did."""

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        self = args[0]
        outer = type(self).step  # a subclass's step wrapped by torch, or by this (EGN's over the base's): hooks ran
        if outer is not wrapper and getattr(outer, "__code__", None) in _STEP_WRAPPER_CODES:
            return step(*args, **kwargs)
        if not torch.compiler.is_compiling() and _profiling():  # (traced: no label, as dynamo drops torch's)
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                return _run_hooked(step, self, args, kwargs)
        return _run_hooked(step, self, args, kwargs)

    wrapper.hooked = True  # type: ignore[attr-defined]  # (read by torch's Optimizer._patch_step_function)
    return wrapper  # type: ignore[return-value]


#: torch's wrapper's code and this module's: a class step made of either ran the hooks
_STEP_WRAPPER_CODES = (_TORCH_WRAPPER_CODE, cast(Any, hooked_step(lambda *args, **kwargs: None)).__code__)


def _run_hooked(step: Callable[..., Any], self: Any, args: Any, kwargs: Any) -> Any:
    """torch's body of the wrapper: pre hooks (a returned ``(args, kwargs)`` replaces them), the step, the
    profiler's tracing point, post hooks, in torch's order and with its error."""
    for pre_hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
        result = pre_hook(self, args, kwargs)
        if result is not None:
            if isinstance(result, tuple) and len(result) == 2:
                args, kwargs = result
            else:
                raise RuntimeError(f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
    out = step(*args, **kwargs)
    self._optimizer_step_code()
    for post_hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
        post_hook(self, args, kwargs)
    return out


def torch_zero_grad_next(bound_super_zero_grad: Any) -> bool:
    """Whether ``super().zero_grad`` is torch's own (no mixin's in between), whose loop :func:`grads_to_none` is."""
    return getattr(bound_super_zero_grad, "__func__", None) is TORCH_ZERO_GRAD


def grads_to_none(optimizer: Any) -> bool:
    """What torch's ``Optimizer.zero_grad(set_to_none=True)`` does where no profiler records and no graph is being
    traced (every gradient of the groups' parameters set to None), and True; else nothing, and False: the caller
    calls torch's own (its label in the profile, or dynamo's view of it as torch's, which it does not trace)."""
    if _profiling() or torch.compiler.is_compiling():
        return False
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad = None
    return True
