"""Lightning's ``Trainer(gradient_clip_val=...)`` routed into ``max_grad_norm`` where it would clip the wrong gradient.

Under ``grad_reduction="mean"`` at W > 1 the optimizer averages the ranks' gradients inside ``step()``.
Lightning clips inside the closure it hands to ``step()`` (``Precision._wrap_closure``: backward, then
``on_before_optimizer_step``, then ``configure_gradient_clipping``), so it clipped each rank's own gradient by
its own norm, before the average, silently (the runs left the one-process run by 5e-2 to 1.3e-1 in 4 steps at
W = 2). Here the step recognises that closure (no Lightning import: the closure's shape and the trainer's
attributes), runs it with the trainer's ``gradient_clip_val`` set aside (Lightning then clips nothing), and
returns the value, which the step applies as ``max_grad_norm`` to the averaged gradient on every rank alike.
``gradient_clip_algorithm="value"``, a module that overrides ``configure_gradient_clipping`` (what it clips
is its own) and a value set both in the Trainer and in the optimizer's groups are refused (``ValueError``, held
by the step and raised on every rank together: the Trainer is configured alike on every rank).
Elsewhere (DDP's averaged gradients under ``"none"``, one process) Lightning's own clip is exact and is left.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["routed_clip"]


def _lightning_closure(closure: Callable[[], Any] | None) -> tuple[Any, Any] | None:
    """``(module, trainer)`` where ``closure`` is Lightning's ``partial(precision._wrap_closure, module,
    optimizer, closure)`` under automatic optimization, else None."""
    if not isinstance(closure, functools.partial) or len(closure.args) != 3:
        return None
    func = closure.func
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", "") != "_wrap_closure" or owner is None:
        return None
    # a precision plugin of Lightning's or a subclass of one (a user's own plugin, defined outside Lightning,
    # still hands Lightning's closure over: missed, Lightning clipped each rank's own gradient, silently)
    if not any(cls.__module__.startswith(("lightning.pytorch.", "pytorch_lightning.")) for cls in type(owner).__mro__):
        return None
    module = closure.args[0]
    trainer = getattr(module, "_trainer", None)
    if trainer is None or not getattr(module, "automatic_optimization", False):
        return None
    return module, trainer


def _overrides_clipping(module: Any) -> bool:
    for cls in type(module).__mro__:
        if "configure_gradient_clipping" in vars(cls):
            return cls.__name__ != "LightningModule"
    return False


@contextlib.contextmanager
def routed_clip(optimizer: Any, closure: Callable[[], Any] | None) -> Iterator[list[float]]:
    """Around the closure's run: yields a list that holds the Trainer's ``gradient_clip_val`` when it is
    taken over (the trainer's value is set aside meanwhile and restored after), else stays empty."""
    taken: list[float] = []
    found = _lightning_closure(closure) if optimizer._routes_lightning_clip() else None
    value = getattr(found[1], "gradient_clip_val", None) if found is not None else None
    if found is None or not value:
        yield taken
        return
    module, trainer = found
    name = type(optimizer).__name__
    chosen = getattr(trainer, "gradient_clip_algorithm", None)  # (None: Lightning's default, "norm")
    algorithm = "norm" if chosen is None else str(getattr(chosen, "value", chosen))
    where = (f"{name} with grad_reduction='mean' averages the ranks' gradients inside step(), after Lightning "
             "clips them (each rank's own)")
    if algorithm != "norm":
        raise ValueError(f"Invalid gradient_clip_algorithm={algorithm!r} with gradient_clip_val={value!r}: {where}. "
                         "Must be 'norm' (the optimizer then clips the averaged gradient by its norm), or average "
                         "the gradients before step() (DDP, with grad_reduction='none').")
    if _overrides_clipping(module):
        raise ValueError(f"{type(module).__name__}.configure_gradient_clipping with gradient_clip_val={value!r}: "
                         f"{where}, so the override would clip each rank's own gradient. Remove the override "
                         "(Trainer(gradient_clip_val=...) is then applied to the averaged gradient), or pass "
                         f"max_grad_norm to {name}.")
    if any(g.get("max_grad_norm") is not None for g in optimizer.param_groups):
        raise ValueError(f"gradient_clip_val={value!r} and {name}'s max_grad_norm are both set: set one of them "
                         f"(with grad_reduction='mean' both clip the averaged gradient).")
    trainer.gradient_clip_val = None  # (Lightning's default hook then reads 0.0: nothing clipped per rank)
    try:
        taken.append(float(value))
        yield taken
    finally:
        trainer.gradient_clip_val = value
