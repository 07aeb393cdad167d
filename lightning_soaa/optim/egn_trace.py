"""EGN's chain capture for models that are not an ``nn.Sequential`` but whose forward is one: a module
(a ``LightningModule``, say) whose ``forward`` runs its Linear layers and element-wise activations one
after the other, e.g. ``self.head(self.body(x))``.

Such a model's forward cannot be read from its structure (``forward`` is arbitrary Python), so it is
checked at every step instead: the model's own forward runs, without autograd, under one global forward
hook that records the calls of the known modules (``nn.Linear``, the activations and pass-through modules
of :mod:`lightning_soaa.optim.egn_chain`). The step takes the chain rule's back-signals
(:class:`~lightning_soaa.optim.egn_chain.ChainCapture`) only if the recorded calls are a chain:

* each known module ran at most once (a Linear called twice would be two positions of one site), on one
  positional tensor;
* each recorded module's input is the very tensor the previous one returned (so nothing was computed
  between them: a residual, a scaling or a reshape makes a new tensor), and the model returned the last
  one's output (a Linear's, or an activation's after it: the chain rule starts there either way);
* no recorded tensor changed in place after it was recorded (its version counter: an in-place activation,
  an in-place op between modules or a hook that edits an output);
* every trained Linear (each factored site) is in the chain, and its parameters are used by nothing but
  its own call (:class:`~lightning_soaa.optim.egn_guard.OwnUseGuard`; the general capture then reports it).

What runs before the first recorded module does not matter: no trained parameter is there (every trained
parameter is a site's, and every site is in the chain). Where the check fails, the step re-runs the
forward under the general capture (hooks and autograd) and the model is never traced again: a forward
that is not a chain once is taken not to be one. Both captures give the same factors bit for bit, so
ranks that decide differently still agree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from lightning_soaa.optim.egn_capture import LinearSite, site_params
from lightning_soaa.optim.egn_chain import _ACTIVATIONS, _PASS_THROUGH, Chain, ChainCapture, backward_hooks_in
from lightning_soaa.optim.egn_guard import OwnUseGuard

__all__ = ["TracePlan", "plan_trace"]


def _known(m: nn.Module) -> bool:
    """A module the chain rule knows (its exact type, its class's ``forward``)."""
    if "forward" in m.__dict__:
        return False
    return type(m) is nn.Linear or type(m) in _ACTIVATIONS or type(m) in _PASS_THROUGH


def _version(t: Tensor) -> int:
    """The tensor's version counter; -1 for an inference tensor (it has none, and cannot be changed in
    place outside inference mode, where this forward runs)."""
    return -1 if t.is_inference() else t._version


@dataclasses.dataclass
class _Call:
    module: nn.Module
    arg: Tensor
    out: Tensor
    arg_version: int
    out_version: int


class TracePlan:
    """The known modules of a model to watch, and its factored sites; :meth:`capture` runs one step's
    forward and returns a :class:`ChainCapture` or why the forward was not a chain."""

    def __init__(self, model: nn.Module, sites: list[LinearSite]) -> None:
        self.model = model
        self.watched = {id(m) for m in model.modules() if m is not model and _known(m)}
        self.site_index = {id(s.module): i for i, s in enumerate(sites)}
        self.layers = [(s.path, site_params(s)) for s in sites]

    def capture(self, xs: tuple[Tensor, ...]) -> tuple[ChainCapture | None, Any, str | None]:
        """(the capture or None, the model's output (None if the forward did not run), the reason it is
        not a chain or None)."""
        if _module._global_forward_hooks or _module._global_forward_pre_hooks:
            # the user's run before ours and may change what ours record (an output a Linear never made)
            return None, None, "global forward hooks are installed"
        if backward_hooks_in(self.model.modules()):
            return None, None, "backward hooks are installed"
        calls: list[_Call] = []
        odd: list[str] = []
        guard = OwnUseGuard(self.layers)

        def enter(m: nn.Module, args: tuple[Any, ...]) -> None:
            i = self.site_index.get(id(m))
            if i is not None:
                guard.enter(i, m)

        def record(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            if id(m) not in self.watched:
                return
            i = self.site_index.get(id(m))
            if i is not None:
                guard.leave(i)
            if len(args) != 1 or kwargs or not isinstance(args[0], Tensor) or not isinstance(out, Tensor):
                odd.append(f"a {type(m).__name__} was called other than on one positional tensor")
                return
            # our own reads of the version counters, not the model's: past the guard (each Tensor method
            # called under its mode is a Python call of its handler, 4 per module)
            with torch._C.DisableTorchFunction():
                calls.append(_Call(m, args[0], out, _version(args[0]), _version(out)))

        handles = [register_module_forward_pre_hook(enter), register_module_forward_hook(record, with_kwargs=True)]
        try:
            # not inference mode: its tensors have no version counters
            with torch.no_grad(), guard:
                z = self.model(*xs)
        finally:
            for h in handles:
                h.remove()
        why = guard.misuse or (odd[0] if odd else self._why_not(calls, z))
        if why is not None:
            return None, z, why
        site_of = tuple(self.site_index.get(id(c.module), -1) for c in calls)
        chain = Chain(tuple(c.module for c in calls), site_of, len(self.site_index))
        return ChainCapture(chain, None, traced=(z, [c.arg for c in calls])), z, None

    def _why_not(self, calls: list[_Call], z: Any) -> str | None:
        """None when ``calls`` are a chain that ends in ``z`` (see the module docstring), else why not."""
        if not calls or not isinstance(z, Tensor) or calls[-1].out is not z:
            return "the model's output is not the output of a module of the chain"
        ids = {id(c.module) for c in calls}
        if len(ids) != len(calls):
            return "a module ran twice"
        for prev, c in zip(calls, calls[1:]):
            if c.arg is not prev.out:
                return (f"the input of a {type(c.module).__name__} is not the output of the "
                        f"{type(prev.module).__name__} before it")
        for c in calls:
            # in eval mode a Dropout (like an Identity) returns its input tensor itself; a new one means a
            # Dropout left in training mode (a model whose train() does not reach it): not the identity
            if type(c.module) in _PASS_THROUGH and c.out is not c.arg:
                return f"a {type(c.module).__name__} did not return its input (in training mode?)"
        for c in calls:  # (an in-place activation changes the previous module's recorded output)
            if _version(c.arg) != c.arg_version or _version(c.out) != c.out_version:
                return "a tensor of the forward changed in place after a module returned it"
        if not set(self.site_index) <= ids:
            return "a trained Linear is not in the chain"
        return None


def plan_trace(model: nn.Module, sites: list[LinearSite], explicit: list[str]) -> TracePlan | None:
    """A :class:`TracePlan` for a model whose trained parameters are all factored Linear layers of the
    exact type, with at least one such layer, that is not itself an ``nn.Sequential`` or ``nn.Linear``
    (those are planned once, :func:`~lightning_soaa.optim.egn_chain.plan_chain`); else None."""
    if explicit or not sites or type(model) in (nn.Sequential, nn.Linear):
        return None
    if any(type(s.module) is not nn.Linear or "forward" in s.module.__dict__ for s in sites):
        return None
    return TracePlan(model, sites)
