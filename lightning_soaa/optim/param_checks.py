"""Parameters an optimizer cannot step correctly are refused with a message naming them.

torch only warns about a parameter listed twice in a group (it is then stepped twice), runs complex
parameters through real-valued formulas, and fails deep inside a kernel on sparse gradients or ``meta``
tensors. These checks turn each case into a ``ValueError`` (at construction or ``add_param_group``) or a
``RuntimeError`` (at the step: ``meta`` tensors, sparse gradients), before any state or parameter changes and before any
collective, so that every rank in the same situation raises at the same point.

What each optimizer supports is declared once, in :mod:`lightning_soaa.registry`
(``OptimizerSpec.supports_complex`` / ``supports_zero_size``); an optimizer class that is not in the
registry (a user's own :class:`~lightning_soaa.optim.base.ShardedOptimizer` subclass) gets the strict
defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = ["capabilities", "check_param_group", "check_step"]


def capabilities(optimizer_cls: type) -> tuple[bool, bool]:
    """``(supports_complex, supports_zero_size)`` of an optimizer class, from its registry entry (its own
    class or the nearest registered base class); ``(False, True)`` when it has none."""
    from lightning_soaa import registry  # the registry imports nothing from here; keep import time low

    by_path = {spec.class_path: spec for spec in registry.REGISTRY}
    for cls in optimizer_cls.__mro__:
        spec = by_path.get(f"{cls.__module__}:{cls.__qualname__}")
        if spec is not None:
            return spec.supports_complex, spec.supports_zero_size
    return False, True


def _label(names: Sequence[str] | None, j: int) -> str:
    return repr(names[j]) if names else f"#{j} of the group"


def check_param_group(optimizer: Any, group: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first parameter of ``group`` the optimizer cannot step.

    Refused: a tensor listed twice (it would be stepped twice); complex or zero-size tensors where the
    optimizer's registry entry does not support them. ``meta`` tensors are accepted here, so that the
    sharding of a large model can be planned without memory (``opt.block_table``); :func:`check_step`
    refuses to step them.
    """
    cls = type(optimizer)
    what = cls.__name__
    supports_complex, supports_zero_size = capabilities(cls)
    names = group.get("param_names")
    seen: dict[int, int] = {}
    for j, p in enumerate(group["params"]):
        if not isinstance(p, Tensor):
            continue  # torch's own add_param_group has already rejected non-tensors
        if getattr(p, "_fsdp_flattened", False):  # the marker FSDP1 puts on its flat and original params
            raise ValueError(
                f"{what}: parameter {_label(names, j)} belongs to an FSDP1 module (FullyShardedDataParallel, "
                "Lightning's FSDPStrategy), which is not supported: each rank holds flat 1-D shards of "
                "the parameters, not the matrices this optimizer steps. Use FSDP2 (torch's fully_shard, "
                "Lightning's ModelParallelStrategy), DDP, or deepspeed_ext's DeepSpeed ZeRO."
            )
        first = seen.setdefault(id(p), j)
        if first != j:
            raise ValueError(
                f"{what}: parameter {_label(names, j)} is the same tensor as parameter {_label(names, first)}; "
                "a parameter listed twice would be updated twice per step. List each parameter once "
                "(model.parameters() already removes tied duplicates)."
            )
        if p.is_complex() and not supports_complex:
            raise ValueError(
                f"{what}: parameter {_label(names, j)} has complex dtype {p.dtype}, which {what} does not "
                "support. Use lightning_soaa.AdamW (complex as torch.view_as_real, like torch.optim.AdamW) "
                "or keep real and imaginary parts as separate real parameters."
            )
        if p.numel() == 0 and not supports_zero_size:
            raise ValueError(
                f"{what}: parameter {_label(names, j)} has shape {tuple(p.shape)} (no elements), which "
                f"{what} does not support. Leave it out of the optimizer (it has nothing to update)."
            )


def check_step(optimizer: Any, params: Sequence[Tensor], names: Sequence[str | None], *,
               gradients: bool = True) -> None:
    """Raise ``RuntimeError`` naming the first parameter the step cannot update, before any state,
    parameter or collective: a ``meta`` parameter (no data; also what an optimizer built before
    ``model.to_empty()`` still holds), or, with ``gradients``, a sparse (non-strided) gradient, which the
    dense kernels would otherwise reject mid-step."""
    for i, p in enumerate(params):  # runs every step: only attribute reads unless something is wrong
        g = p.grad if gradients else None
        if p.is_meta or (g is not None and g.layout != p.layout):
            _refuse_step(optimizer, p, repr(names[i]) if names[i] else f"#{i}")


def _refuse_step(optimizer: Any, p: Tensor, label: str) -> None:
    what = type(optimizer).__name__
    if p.is_meta:
        raise RuntimeError(
            f"{what}: parameter {label} of shape {tuple(p.shape)} is on the meta device (no data) and "
            "cannot be stepped. Materialise the model (e.g. model.to_empty(device=...) and initialise "
            "its weights), then construct the optimizer over the materialised parameters."
        )
    layout = None if p.grad is None else p.grad.layout
    raise RuntimeError(
        f"{what}: parameter {label} has a {layout} gradient; only dense (torch.strided) gradients are "
        "supported. Use nn.Embedding(sparse=False) / nn.EmbeddingBag(sparse=False), or torch.optim.SparseAdam "
        "for those parameters."
    )
