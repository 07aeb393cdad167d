"""A factored Linear's (or Embedding's) parameters may reach the outputs only through that layer's own call.

EGN builds each factored ``nn.Linear``'s part of the Jacobian from what the layer's call saw: its input A
and the back-signal of its output. A forward that also uses the layer's weight or bias another way, e.g.
``F.linear(x, self.fc.weight)``, ``h @ self.fc.weight.T``, or a penalty on the weight added to the
outputs, contributes Jacobian terms no hook sees: the Gauss-Newton step would be silently wrong. This
mode watches the capture's forward and records the first torch function that takes such a parameter
outside its layer's call and returns a tensor (reading metadata such as ``weight.shape`` is fine). The
capture then reports an error, on every rank together. The other way round, a call of the layer with
another tensor in place of its trained weight or bias (``torch.func.functional_call`` on the layer inside the
forward, as hypernetworks do) makes an output that does not depend on the parameter at all: the Gram factors
would give it Jacobian rows it does not have, so that call is reported too. So is a forward that differentiates
a graph holding a factored parameter with ``create_graph=True`` (``-torch.autograd.grad(E, x,
create_graph=True)``): its outputs depend on the parameter through the backward's ops as well.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["OwnUseGuard"]


def _tensors(args: Sequence[Any], kwargs: dict[str, Any]) -> Iterator[Any]:
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


class OwnUseGuard(TorchFunctionMode):
    """Active around a forward; :meth:`enter` / :meth:`leave` bracket each factored Linear's own call
    (its hooks), and ``misuse`` names the first parameter used outside it (None: none was)."""

    def __init__(self, layers: Sequence[tuple[str, tuple[Tensor | None, ...]]],
                 kinds: Sequence[str] | None = None) -> None:
        """``layers``: per factored layer its path and its (weight, bias), None where not trained; ``kinds``:
        their class names for the messages (default: all ``Linear``)."""
        super().__init__()
        self._kinds = list(kinds) if kinds is not None else ["Linear"] * len(layers)
        self._owner: dict[int, tuple[int, str]] = {}
        for i, (path, params) in enumerate(layers):
            for name, p in zip(("weight", "bias"), params):
                if p is not None:
                    self._owner[id(p)] = (i, f"{path}.{name}" if path else name)
        self._layers = list(layers)
        self._inside: list[int] = []
        self.misuse: str | None = None
        self._graph = True  # whether the watched forward builds a graph (the chain's trace runs without one)

    def __enter__(self) -> OwnUseGuard:
        self._graph = torch.is_grad_enabled()
        return super().__enter__()  # type: ignore[no-any-return, no-untyped-call]

    def enter(self, i: int, module: Any) -> None:
        """Layer ``i``'s call begins (its forward pre-hook, given the module): it must hold its trained
        parameters themselves (two dict look-ups per call)."""
        self._inside.append(i)
        if self.misuse is not None:
            return
        path, params = self._layers[i]
        for name, p in zip(("weight", "bias"), params):
            if p is not None and module._parameters.get(name) is not p:
                where = f"{path}.{name}" if path else name
                self.misuse = (f"EGN: the nn.{self._kinds[i]} {path!r} was called with another tensor in place of its "
                               f"trained parameter {where!r} (torch.func.functional_call or a swap of "
                               "module._parameters inside the forward), so that parameter does not reach the "
                               "outputs through this call and its Gram factors would be wrong. Build EGN with "
                               "jacobian='explicit', or leave the parameter out of the optimizer.")
                return

    def leave(self, i: int) -> None:
        if self._inside and self._inside[-1] == i:
            self._inside.pop()

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        # (create_graph first: only torch's differentiating functions take it, and no other func is hashed)
        if kwargs.get("create_graph") and self.misuse is None and func in _DIFFERENTIATE:
            self._differentiated(func, args, kwargs)
        out = func(*args, **kwargs)
        if self.misuse is None and (isinstance(out, Tensor) or
                                    (isinstance(out, (tuple, list)) and any(isinstance(o, Tensor) for o in out))):
            here = self._inside[-1] if self._inside else -1
            for a in _tensors(args, kwargs):
                owner = self._owner.get(id(a))
                if owner is None and isinstance(a, Tensor) and a._base is not None:
                    # a view made before the forward (weight.t() kept from __init__) reads the parameter
                    owner = self._owner.get(id(a._base))
                if owner is not None and owner[0] != here:
                    if self._graph and not _differentiable(out):
                        break  # a read under no_grad, of .detach(), an argmax: no Jacobian term
                    # (a forward run without a graph cannot tell: the trace falls back to the capture)
                    name = getattr(func, "__name__", str(func))
                    self.misuse = (f"EGN: the parameter {owner[1]!r} is used outside its nn.{self._kinds[owner[0]]}'s "
                                   "own call "
                                   f"(by {name}), so its Gram factors would miss part of the Jacobian. Call the "
                                   "layer as a module, or build EGN with jacobian='explicit'" + (
                                       " or, for an nn.Embedding's table (a head tied by F.linear(h, "
                                       "emb.weight)), with factor_embeddings=False."
                                       if self._kinds[owner[0]] == "Embedding" else "."))
                    break
        return out

    def _differentiated(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        """A ``torch.autograd.grad`` / ``backward`` with ``create_graph=True`` inside the forward (a force
        -dE/dx, an input-gradient output, an inner gradient step): its result depends on the parameters of
        the differentiated graph through the backward's own ops (grad_input = grad_output @ W), which no
        layer call records, so a factored parameter there would get Gram factors that miss that part of its
        Jacobian (the step was 0.98 off the exact one, cosine 0.21). Found by walking the graph of the
        differentiated tensors to the factored parameters' leaves; a graph without them (a frozen energy
        model) is fine: its double backward is part of the graph the back-signals are read through. With
        explicit ``inputs`` (``autograd.grad(E, z)``, ``backward(inputs=...)``) only the graph between the
        outputs and those inputs is differentiated: what lies behind them (z = tanh(enc(x)) with ``enc``
        trained) reaches the outputs through z's value, which the Gram factors see, and is not walked."""
        outputs = args[0] if args else kwargs.get("outputs", kwargs.get("tensors"))
        owner = _reached(outputs, self._owner, _inputs_of(func, args, kwargs))
        if owner is None:
            return
        name = _DIFFERENTIATE[func]
        self.misuse = (
            f"EGN: the model's forward differentiates itself: it calls {name}(..., create_graph=True) on a graph "
            f"that holds the trained parameter {owner[1]!r} (e.g. a force -dE/dx, an input-gradient output, a "
            "gradient step inside the forward). The outputs then depend on that parameter through the backward's "
            f"own ops too, which EGN's Gram factors of the nn.{self._kinds[owner[0]]} do not see, and "
            "jacobian='explicit' cannot help: torch.func cannot run torch.autograd.grad inside the forward. EGN "
            "does not support forwards that differentiate their trained parameters' graph; train this model with "
            "a first-order optimizer (e.g. ShardedAdamW, SOAA), or freeze the parameters of the differentiated "
            "part.")


#: torch's entry points that differentiate (each dispatches to an active torch function mode; the helpers of
#: torch.autograd.functional call torch.autograd.grad), and their names for the message
_DIFFERENTIATE = {torch.autograd.grad: "torch.autograd.grad", torch.autograd.backward: "torch.autograd.backward",
                  Tensor.backward: "Tensor.backward"}


def _inputs_of(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The ``inputs`` a differentiating call names (None: every leaf, as ``backward()`` without them).
    Positional only for ``torch.autograd.grad(outputs, inputs, ...)``; ``backward`` takes them by keyword."""
    if func is torch.autograd.grad:
        return args[1] if len(args) > 1 else kwargs.get("inputs")
    return kwargs.get("inputs")


def _stops(inputs: Any) -> set[Any]:
    """The graph nodes of ``inputs`` (tensors or ``GradientEdge``s): the walk does not go past them. A leaf
    has none (its AccumulateGrad node has nothing behind it, and a trained parameter there is still found)."""
    items = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    nodes: set[Any] = set()
    for t in items:
        node = t.grad_fn if isinstance(t, Tensor) else getattr(t, "node", None)
        if node is not None:
            nodes.add(node)
    return nodes


def _reached(outputs: Any, owner: dict[int, tuple[int, str]], inputs: Any = None) -> tuple[int, str] | None:
    """The first of ``owner``'s parameters (by id) that the autograd graph of ``outputs`` (a tensor or a
    sequence of them) reaches, else None: one walk over the graph, made only when a forward differentiates.
    With ``inputs``, the walk stops at their nodes: a parameter reached only through them lies behind
    the differentiated part (a parameter whose op lies between the outputs and an input is reached
    before that input's node)."""
    stops = _stops(inputs) if inputs is not None else set()
    tensors = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    todo: list[Any] = []
    for t in tensors:
        if isinstance(t, Tensor):
            if id(t) in owner:  # a parameter differentiated itself
                return owner[id(t)]
            todo.append(t.grad_fn)
    seen: set[Any] = set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        hit = owner.get(id(getattr(fn, "variable", None)))  # an AccumulateGrad node: its leaf
        if hit is not None:
            return hit
        if fn not in stops:
            todo.extend(f for f, _ in fn.next_functions)
    return None


def _differentiable(out: Any) -> bool:
    """Whether a function's result carries the parameter into the graph (a read for logging under
    torch.no_grad or of ``weight.detach()`` does not: the guard refused such forwards)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return any(isinstance(o, Tensor) and o.requires_grad for o in outs)
