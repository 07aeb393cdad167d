"""EGN's capture for plain MLPs: an ``nn.Sequential`` of ``nn.Linear`` layers and element-wise activations
(or a bare ``nn.Linear``: linear and logistic regression, the chain of one layer).

The general capture (:class:`lightning_soaa.optim.egn_capture.LinearCapture`) records the forward with hooks
and autograd and reads the back-signals δ = ∂z/∂y of every Linear output with one batched backward (a
vmap over the backward graph): ~100 ATen ops and ~0.3-0.4 ms per step on a 3-layer MLP at b = 32, most
of it the vmap machinery. For a chain of known modules the same δ follow from the chain rule directly,
with the very ATen kernels autograd's backward calls (``tanh_backward``, ``sigmoid_backward``,
``threshold_backward``; an ``mm`` with the weight): per sample and output column k,

    δ_L = e_k (the last Linear's output is z),  δ_ℓ = act'(δ_{ℓ+1} W_{ℓ+1}) at the activation's output,

for all c columns at once, [b, c, d]. The forward runs without autograd (nothing is differentiated) and
without hooks or copies (no module of the chain works in place). The chain is planned once, at
construction; a step uses it only while nothing could make the forward differ from the plan (a single
2-D input, no hooks on the chain's modules or global ones); otherwise the general capture runs (other
models whose forward is such a chain are checked at each step: :mod:`lightning_soaa.optim.egn_trace`). For a
bare Linear the general capture's batched backward only recovers the identity: the benchmark report's
least-squares model (32 -> 4, b = 64) steps in 1.65 instead of 2.05 ms through the chain, same bits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from lightning_soaa.optim.egn_capture import LinearSite

__all__ = ["Chain", "ChainCapture", "back_signals", "backward_hooks_in", "chain_of", "plan_chain"]


def _relu_backward(grad: Tensor, out: Tensor) -> Tensor:
    # autograd's formula for relu: threshold_backward(grad, result, 0)
    out_grad: Tensor = torch.ops.aten.threshold_backward(grad, out, 0)
    return out_grad


#: activation -> its backward from (incoming gradient, the activation's output), as autograd computes it
_ACTIVATIONS: dict[type[nn.Module], Callable[[Tensor, Tensor], Tensor]] = {
    nn.Tanh: torch.ops.aten.tanh_backward,
    nn.Sigmoid: torch.ops.aten.sigmoid_backward,
    nn.ReLU: _relu_backward,
}
#: modules that are the identity in eval mode (EGN's step runs the model in eval mode)
_PASS_THROUGH: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout)


def grad_off() -> contextlib.AbstractContextManager[Any]:
    """``torch.no_grad()``, or nothing where grad mode is off already (EGN runs a chain's passes under
    ``torch.inference_mode``): entering and leaving the grad mode costs a few µs, as much as a small op."""
    return torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()


def backward_hooks_in(modules: Iterable[nn.Module]) -> bool:
    """Whether a backward hook may change a back-signal: torch's global ones or a module's own (full or
    pre). The chain rule of a chain capture runs without autograd, so no hook would run; the general capture
    backpropagates through autograd, which runs them (a gradient-scaling or -reversing hook then changes the
    Jacobian EGN sees, as it changes the gradient). Models with such hooks take the general capture so that
    every path gives the same step."""
    if _module._global_backward_hooks or _module._global_backward_pre_hooks:
        return True
    return any(m._backward_hooks or m._backward_pre_hooks for m in modules)


@dataclasses.dataclass(frozen=True)
class Chain:
    """The planned chain: its modules in order, and per module the index of its factored site (Linear
    layers that are sites), else -1."""

    modules: tuple[nn.Module, ...]
    site_of: tuple[int, ...]
    num_sites: int
    #: the planned ``nn.Sequential`` (None for a traced chain, verified at every step instead)
    root: nn.Module | None = None

    def usable(self, xs: tuple[Tensor, ...]) -> bool:
        """Whether this step's forward is the planned one: one 2-D input, the Sequential still holds the
        planned modules (``model[1] = ...`` after EGN was built changes the function), and no hooks that
        could change an input or output, the Sequential's own included (ours are not installed on this
        path)."""
        if len(xs) != 1 or xs[0].dim() != 2:
            return False
        if _module._global_forward_hooks or _module._global_forward_pre_hooks:
            return False
        root = self.root
        if root is not None and backward_hooks_in((root, *self.modules)):
            return False
        if root is not None and root is not self.modules[0]:  # (an nn.Linear is its own one-module chain)
            if root._forward_hooks or root._forward_pre_hooks or "forward" in root.__dict__:
                return False
            held = tuple(cast(nn.Sequential, root))
            if len(held) != len(self.modules) or any(a is not b for a, b in zip(held, self.modules)):
                return False
        return not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in self.modules)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(z, saved): the model's forward, each module's own ``forward`` (what ``model(x)`` runs when no
        hooks are installed), without autograd; ``saved[j]`` is the input of module j."""
        saved = []
        h = x
        with grad_off():
            for m in self.modules:
                saved.append(h)
                h = m.forward(h)
        return h, saved

    @functools.cached_property
    def first_site(self) -> int:
        """Index of the first module that is a factored Linear (the back-signals stop there)."""
        return min((j for j, i in enumerate(self.site_of) if i >= 0), default=len(self.modules))


def plan_chain(model: nn.Module, sites: list[LinearSite], explicit: list[str]) -> Chain | None:
    """The chain of ``model`` when it is exactly an ``nn.Sequential`` (no subclass, no instance
    ``forward``) of ``nn.Linear`` layers and known, non-in-place activations, that ends in a Linear
    and whose trainable parameters are all factored, or exactly an ``nn.Linear`` (linear or logistic
    regression: the chain of one layer); else None (the general capture is used)."""
    if type(model) not in (nn.Sequential, nn.Linear) or "forward" in model.__dict__ or explicit:
        return None
    # (iterating the Sequential, not children(): a module listed twice must stay twice, and be refused)
    mods: tuple[nn.Module, ...] = (model,) if isinstance(model, nn.Linear) else tuple(cast(nn.Sequential, model))
    return chain_of(mods, sites, model)


def chain_of(mods: tuple[nn.Module, ...], sites: list[LinearSite], root: nn.Module | None) -> Chain | None:
    """The :class:`Chain` of ``mods`` run one after the other (:func:`plan_chain`'s terms: known modules of the
    exact types, none in place or listed twice, the last a Linear, every site among them); else None."""
    if not mods or type(mods[-1]) is not nn.Linear or len({id(m) for m in mods}) != len(mods):
        return None
    index = {id(s.module): i for i, s in enumerate(sites)}
    for m in mods:
        if "forward" in m.__dict__ or getattr(m, "inplace", False):
            return None
        if type(m) is not nn.Linear and type(m) not in _ACTIVATIONS and type(m) not in _PASS_THROUGH:
            return None
    site_of = tuple(index.get(id(m), -1) for m in mods)
    if sorted(i for i in site_of if i >= 0) != list(range(len(sites))):
        return None
    return Chain(mods, site_of, len(sites), root=root)


class ChainCapture:
    """One step's forward through a :class:`Chain`: the outputs z and each factored Linear's input;
    the same interface as :class:`LinearCapture` where EGN reads it (``inputs``, ``error``,
    :meth:`local_factors`)."""

    def __init__(self, chain: Chain, x: Tensor | None, traced: tuple[Tensor, list[Tensor]] | None = None) -> None:
        """Runs the chain's forward on ``x``, or takes ``traced`` = (z, each module's input) from a
        forward already run and verified to be this chain (:mod:`lightning_soaa.optim.egn_trace`)."""
        self.chain = chain
        self.error: str | None = None
        #: the site whose back-signal is the identity (the last module, a Linear, outputs z), or -1
        self.identity_site = chain.site_of[-1]
        if traced is not None:
            self.z, self.saved = traced
        else:
            assert x is not None
            self.z, self.saved = chain.forward(x)
        self.inputs: list[list[Tensor]] = [[] for _ in range(chain.num_sites)]
        for j, i in enumerate(chain.site_of):
            if i >= 0:
                self.inputs[i].append(self.saved[j].unsqueeze(1))  # A [b, T=1, d_in]

    def local_factors(self, z: Tensor, num_outputs: int) -> list[tuple[Tensor, Tensor]]:
        """Per site (A [b, 1, d_in], Δ [b, c, 1, d_out]): the back-signals by the chain rule
        (:func:`back_signals`), the identity site's Δ = I_c expanded over the samples."""
        b, c = z.shape
        with grad_off():
            deltas = back_signals(self.chain, z, self.saved)
        eye = None
        factors: list[tuple[Tensor, Tensor]] = []
        for a, d in zip(self.inputs, deltas):
            if d is None:  # δ of z itself
                eye = torch.eye(c, dtype=z.dtype, device=z.device).expand(b, c, c) if eye is None else eye
                d = eye
            factors.append((a[0], d.unsqueeze(2)))
        return factors


def back_signals(chain: Chain, z: Tensor, saved: list[Tensor]) -> list[Tensor | None]:
    """Per site Δ [b, c, d_out] by the chain rule, from the last module back to the first factored Linear, with
    autograd's own kernels (``mm`` with the weight, the activations' backward); None for the site whose Δ is the
    identity (the last Linear: its output is z). ``saved[j]``: the input of module j (:meth:`Chain.forward`).
    Used by the chain capture and by the step plan of one process (``egn_plan``), so both take the same bits."""
    b, c = z.shape
    mods, site_of = chain.modules, chain.site_of
    first = chain.first_site
    deltas: list[Tensor | None] = [None] * chain.num_sites
    g: Tensor | None = None  # δ at the current module's output, [b, c, d]; None: the identity (z itself)
    for j in range(len(mods) - 1, first - 1, -1):
        m = mods[j]
        if type(m) is nn.Linear:  # (plan_chain admits no subclass)
            if site_of[j] >= 0:
                deltas[site_of[j]] = g
            if j == first:
                break
            # δ·W, the input gradient autograd forms (one product over the b·c rows; b may be 0 on a rank with an
            # empty batch); for the identity it is W's rows themselves
            w = m.weight
            g = w.expand(b, c, w.shape[1]) if g is None else torch.matmul(g, w)
        elif type(m) in _ACTIVATIONS:
            if g is None:  # an activation after the last Linear (a traced chain): δ of z is the identity
                g = torch.eye(c, dtype=z.dtype, device=z.device).expand(b, c, c)
            g = _ACTIVATIONS[type(m)](g, (saved[j + 1] if j + 1 < len(mods) else z).unsqueeze(1))
    return deltas
