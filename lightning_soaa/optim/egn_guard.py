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
would give it Jacobian rows it does not have, so that call is reported too.
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


def _differentiable(out: Any) -> bool:
    """Whether a function's result carries the parameter into the graph (a read for logging under
    torch.no_grad or of ``weight.detach()`` does not: the guard refused such forwards)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return any(isinstance(o, Tensor) and o.requires_grad for o in outs)
