"""EGN's parameters must still be the tensors its module holds.

EGN keeps the Parameter objects it was built with: its blocks and state, the capture plan (each factored
Linear's weight and bias), the explicit Jacobians' slots and the use guard are keyed to them. Its step
runs the module itself, though, and the module's forward uses whatever tensors the module holds at the
time. When they were replaced by other tensor objects after EGN was built (``model.load_state_dict(sd,
assign=True)``, ``fully_shard(model)`` (FSDP2 puts DTensor Parameters in their places), a submodule
assigned anew, ``model.to(...)`` under ``torch.__future__.set_overwrite_module_params_on_conversion(True)``,
a parametrization registered), EGN would step tensors the model no longer uses: the model never moved,
steps were counted and losses returned (silently). A submodule that holds parameters, replaced by another
one (even one holding the same Parameters), leaves EGN's capture plan, chain and guard on the old module.

:class:`ParamPlaces` records, at construction, each place of the module tree that holds a parameter
(trained or frozen; a tied parameter in each of its places) and the submodules on the way from the root.
:meth:`ParamPlaces.first_replaced` looks, by identity, that each is still there: one dict look-up per place
and per submodule on the way (the 3-layer test MLP: ~1 µs a step); on a mismatch it names the first place
that changed.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from lightning_soaa.distributed.dtensor import is_dtensor

__all__ = ["ParamPlaces", "replaced_message"]


class ParamPlaces:
    """Where each of the module's parameters sits, checked by identity at every step."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # every place, tied parameters in each of theirs (an untied copy would otherwise go unseen), with
        # the submodules on its way from the root
        self._places: list[tuple[str, list[tuple[str, nn.Module]], Tensor]] = []
        edges: dict[tuple[int, str], tuple[nn.Module, str, nn.Module]] = {}
        slots: list[tuple[nn.Module, str, Tensor]] = []
        for name, p in model.named_parameters(remove_duplicate=False):
            *path, attr = name.split(".")
            m, way = model, []
            for key in path:
                child = m._modules[key]
                assert child is not None  # named_parameters went through it
                edges.setdefault((id(m), key), (m, key, child))
                way.append((key, child))
                m = child
            slots.append((m, attr, p))
            self._places.append((name, way, p))
        self._edges = list(edges.values())
        self._slots = slots

    def first_replaced(self) -> tuple[str, object, str | None] | None:
        """None while every place holds its parameter, through the same submodules; else the first place
        (in ``named_parameters`` order) that does not: (its name, what it holds now (another tensor, a
        DTensor, or None), the path of the first submodule on its way that was replaced, or None)."""
        # hot path: only dict look-ups and identity tests (no generator, no named_parameters walk)
        for m, key, child in self._edges:
            if m._modules.get(key) is not child:
                break
        else:
            for m, attr, p in self._slots:
                if m._parameters.get(attr) is not p:
                    break
            else:
                return None
        for name, way, p in self._places:
            here: nn.Module = self.model
            for j, (key, child) in enumerate(way):
                now = here._modules.get(key)
                if now is not child:
                    held = None if now is None else _get(now, name.split(".")[j + 1:])
                    return name, held, ".".join(k for k, _ in way[:j + 1])
                here = child
            held = here._parameters.get(name.rsplit(".", 1)[-1])
            if held is not p:
                moved = next((k for k, q in here._parameters.items() if q is p), None)
                return name, (held if held is not None or moved is None else Renamed(moved)), None
        raise AssertionError("EGN: a parameter place changed but none was found; please report this.")


class Renamed(NamedTuple):
    """The parameter is still in its module, under another name (``weight_orig``: torch.nn.utils.prune, or
    the old-style torch.nn.utils.spectral_norm)."""

    attr: str


def _get(m: nn.Module, path: list[str]) -> object:
    """What ``m`` holds at the parameter place ``path`` (relative to it), or None."""
    for key in path[:-1]:
        child = m._modules.get(key)
        if child is None:
            return None
        m = child
    return m._parameters.get(path[-1])


def replaced_message(name: str, held: object, submodule: str | None, *, dtensor_refusal: str) -> str:
    """The message of EGN's refusal for the place ``name`` (:meth:`ParamPlaces.first_replaced`)."""
    if isinstance(held, Tensor) and is_dtensor(held):
        return (f"EGN: the model's parameter {name!r} is now a DTensor, not the tensor this EGN was built with: "
                "fully_shard (FSDP2) was applied after EGN was built, and EGN would step tensors the model no "
                f"longer uses. {dtensor_refusal} Nothing changed.")
    if submodule is not None:
        what = (f"EGN: the submodule {submodule!r}, which held the model's parameter {name!r}, was replaced after "
                "this EGN was built (e.g. model.layer = ...); EGN's capture plan is made for the modules and "
                "Parameters it was built with.")
    elif isinstance(held, Renamed):
        what = (f"EGN: the model's parameter {name!r} is now registered as {held.attr!r} in its module: "
                "torch.nn.utils.prune (or Lightning's ModelPruning callback) or torch.nn.utils.spectral_norm "
                "reparametrized the layer after this EGN was built, and the layer now computes with a copy made "
                "from it (masked, or divided by its spectral norm). Prune or apply spectral_norm before building "
                "EGN (EGN then takes those layers' Jacobians explicitly); ModelPruning prunes during fit, after "
                "configure_optimizers, so it cannot be used with EGN.")
    else:
        now = "nothing (the place is gone)" if held is None else f"another {type(held).__name__}"
        what = (f"EGN: the model's parameter {name!r} is no longer the tensor this EGN was built with (the model "
                f"now holds {now} there): its parameters were replaced after EGN was built, e.g. by "
                "model.load_state_dict(..., assign=True), fully_shard or another wrapper, or a parametrization. "
                "EGN keeps the Parameters it was built with, so it would step tensors the model no longer uses.")
    return (f"{what} Build the EGN after changing the model (load_state_dict without assign=True copies into "
            "the existing Parameters). Nothing changed.")
