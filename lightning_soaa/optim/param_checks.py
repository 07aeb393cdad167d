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

import dataclasses
import difflib
import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn.parameter import UninitializedParameter

from lightning_soaa.distributed.dtensor import fsdp2_unsharded_params, is_dtensor

__all__ = ["capabilities", "check_initialized", "check_param_group", "check_disjoint_storage", "check_step",
           "DisjointStorage", "StorageMemo",
           "param_signatures", "warn_misspelt_keys"]

log = logging.getLogger(__name__)


def capabilities(optimizer_cls: type) -> tuple[bool, bool]:
    """``(supports_complex, supports_zero_size)`` of an optimizer class, from its registry entry (its own
    class or the nearest registered base class); ``(False, True)`` when it has none."""
    spec = _registered_spec(optimizer_cls)
    return (False, True) if spec is None else (spec.supports_complex, spec.supports_zero_size)


@functools.lru_cache(maxsize=64)
def _registered_spec(optimizer_cls: type) -> Any:
    """The registry entry of ``optimizer_cls`` or of its nearest registered base class, or None (remembered
    per class)."""
    from lightning_soaa import registry  # the registry imports nothing from here; keep import time low

    by_path = {spec.class_path: spec for spec in registry.REGISTRY}
    for cls in optimizer_cls.__mro__:
        spec = by_path.get(f"{cls.__module__}:{cls.__qualname__}")
        if spec is not None:
            return spec
    return None


def _label(names: Sequence[str] | None, j: int) -> str:
    return repr(names[j]) if names else f"#{j} of the group"


def check_initialized(what: str, p: Any, label: str) -> None:
    """Raise ``ValueError`` naming ``p`` when it is an uninitialized parameter of a lazy module
    (``nn.LazyLinear``): its shape is unknown until the module's first forward, and every read of it (its
    shape, its element count) raised torch's message, which named no parameter, or, where the shape was read
    first (ASGO's module routes), one that blamed ``load_state_dict``. torch's own optimizers may be built on
    it; these plan their blocks from the shapes when they are built."""
    if isinstance(p, UninitializedParameter):
        raise ValueError(
            f"{what}: parameter {label} is an uninitialized parameter of a lazy module (nn.LazyLinear, "
            "nn.LazyConv2d, ...): its shape is not known until the module's first forward, and the optimizer "
            "plans its blocks from the parameters' shapes when it is built. Run a forward pass with a dummy "
            "batch (model(example_input)) before building the optimizer, as torch's documentation of lazy "
            "modules recommends (Lightning: in the LightningModule's __init__ or setup()).")


def replaced_by_fully_shard(p: Tensor) -> bool:
    """Whether ``p`` is a parameter that FSDP2's ``fully_shard`` replaced in its module by a new sharded
    DTensor Parameter: torch marks the original with ``_fsdp_orig_uid`` (2.13 does; a torch without the mark:
    nothing is detected and a step finding no gradient only warns). Such a tensor never gets a gradient
    again and is not what the model computes with: an optimizer holding it trains nothing."""
    return getattr(p, "_fsdp_orig_uid", None) is not None


def fully_shard_replaced_message(what: str, label: str) -> str:
    return (f"{what}: parameter {label} was given to FSDP2's fully_shard, which replaced it in its module with a "
            "sharded DTensor Parameter; the optimizer holds the original, which no longer gets gradients nor "
            "is what the model computes with, so it would train nothing. Build the optimizer after fully_shard, "
            "from model.parameters() or model.named_parameters() taken then.")


def fsdp2_unsharded_message(what: str, label: str, fqn: str) -> str:
    """Why a parameter that is FSDP2's unsharded copy (:func:`fsdp2_unsharded_params`) is refused."""
    of = f" (of its parameter {fqn!r})" if fqn else ""
    return (f"{what}: parameter {label} is FSDP2's unsharded copy{of}, not the sharded DTensor parameter that "
            "trains: fully_shard puts such copies into a module for its forward and backward, and a module that "
            "is not resharded keeps them there (the root module after a forward, e.g. an evaluation under "
            "torch.no_grad(); any module after set_reshard_after_backward(False), reshard_after_forward=False or "
            "model.unshard()), so model.parameters() taken then gives them. FSDP2 reduces the gradients into the "
            "sharded parameters and overwrites the copy at each all-gather: the optimizer would train nothing. "
            "Build the optimizer from model.parameters() while the model is resharded: before its first forward, "
            "or after model.reshard().")


def storage_freed(p: Tensor) -> bool:
    """Whether ``p`` has elements but no memory: its storage was resized to 0 bytes. FSDP2 frees so the unsharded
    parameters it puts in its modules for a forward and backward (its root module keeps them there after a
    forward, e.g. an evaluation under ``torch.no_grad()``, until the next backward reshards); an optimizer built
    then holds them, not the sharded DTensor parameters, and they get no gradient again. Nothing can step such
    a tensor. Meta tensors and tensor subclasses (DTensor) are not judged here. (Construction refuses those copies
    first, :func:`fsdp2_unsharded_params`; this is what remains where torch's FSDP2 states read otherwise.)"""
    if p.is_meta or type(p) not in (torch.Tensor, torch.nn.Parameter) or p.numel() == 0:
        return False
    return p.untyped_storage().nbytes() == 0


def freed_storage_message(what: str, label: str, p: Tensor) -> str:
    return (f"{what}: parameter {label} (shape {tuple(p.shape)}) has no memory: its storage was freed (0 bytes "
            f"for {p.numel()} elements). FSDP2 frees so the unsharded parameters it puts in its modules for a "
            "forward and backward; an optimizer built after a forward (fully_shard's root module keeps its "
            "parameters unsharded after one, e.g. an evaluation under torch.no_grad(), until the next backward) "
            "holds those instead of the sharded DTensor parameters, which are what trains. Build the optimizer "
            "from model.parameters() while the model is resharded: before its first forward, or after "
            "model.reshard(). Nothing changed.")


def check_param_group(optimizer: Any, group: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first parameter of ``group`` the optimizer cannot step.

    Refused: an uninitialized parameter of a lazy module (:func:`check_initialized`), a tensor listed twice
    (it would be stepped twice), FSDP2's unsharded copy of a parameter (:func:`fsdp2_unsharded_params`), an
    original ``fully_shard`` replaced; complex or zero-size tensors where the
    optimizer's registry entry does not support them. ``meta`` tensors are accepted here, so that the
    sharding of a large model can be planned without memory (``opt.block_table``); :func:`check_step`
    refuses to step them.
    """
    cls = type(optimizer)
    what = cls.__name__
    supports_complex, supports_zero_size = capabilities(cls)
    names = group.get("param_names")
    seen: dict[int, int] = {}
    copies = fsdp2_unsharded_params()  # (one walk of the FSDP2 modules per group; empty without any)
    for j, p in enumerate(group["params"]):
        if not isinstance(p, Tensor):
            continue  # torch's own add_param_group has already rejected non-tensors
        check_initialized(what, p, _label(names, j))
        if getattr(p, "_fsdp_flattened", False):  # the marker FSDP1 puts on its flat and original params
            raise ValueError(
                f"{what}: parameter {_label(names, j)} belongs to an FSDP1 module (FullyShardedDataParallel, "
                "Lightning's FSDPStrategy), which is not supported: each rank holds flat 1-D shards of "
                "the parameters, not the matrices this optimizer steps. Use FSDP2 (torch's fully_shard, "
                "Lightning's ModelParallelStrategy), DDP, or deepspeed_ext's DeepSpeed ZeRO."
            )
        if replaced_by_fully_shard(p):
            raise ValueError(fully_shard_replaced_message(what, _label(names, j)))
        if id(p) in copies:
            raise ValueError(fsdp2_unsharded_message(what, _label(names, j), copies[id(p)]))
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


#: options of torch's optimizers that change what a step computes, none of which these optimizers have:
#: accepted in a param-group dict (torch passes unknown group keys through), they were silently not used
#: (``maximize=True`` went downhill; 9e-2 off torch's AdamW after 5 steps). Not ``capturable``: it changes
#: no result (only whether a step may be captured in a CUDA graph, which these steps, synced with the host,
#: never are), and dynamo writes ``capturable=True`` into the groups of every optimizer a compiled function
#: touches (torch._dynamo's OptimizerVariable), so refusing it refused every compiled step that sets the lr.
#: An optimizer that implements one declares it among its own hyperparameters (its ``defaults``, validated by
#: its config): ASGO's ``nesterov``.
UNSUPPORTED_TORCH_OPTIONS: tuple[str, ...] = ("maximize", "amsgrad", "nesterov", "differentiable")


def check_torch_options(optimizer: Any, group: dict[str, Any]) -> None:
    """Raise ``ValueError`` for a truthy :data:`UNSUPPORTED_TORCH_OPTIONS` entry of ``group`` (False and
    None, which torch's own defaults write, pass) that is not one of the optimizer's own ``defaults``."""
    if group.get("decoupled_weight_decay") is False and group.get("weight_decay"):
        # what torch.optim.Adam's groups carry: its weight_decay is an L2 term added to the gradient
        raise ValueError(
            f"decoupled_weight_decay=False with weight_decay={group['weight_decay']!r} asks for torch Adam's L2 "
            f"penalty; {type(optimizer).__name__} decays the weights decoupled (AdamW's rule) and would silently "
            "do that instead. Leave decoupled_weight_decay out (or True), or put the L2 term into the loss.")
    own = getattr(optimizer, "defaults", {})
    for key in UNSUPPORTED_TORCH_OPTIONS:
        if group.get(key) and key not in own:
            raise ValueError(
                f"{key}={group[key]!r} is a torch optimizer option that {type(optimizer).__name__} does not "
                f"implement; it would be silently ignored. Leave it out (or set it to False)"
                + (": to maximize, step on the negated objective." if key == "maximize" else "."))


def check_disjoint_storage(optimizer: Any, params: Sequence[Tensor], labels: Sequence[str]) -> None:
    """Raise ``ValueError`` naming two parameters that are distinct tensors over the same memory
    (``nn.Parameter(enc.weight.t())``: a transposed "tie"). Each is stepped with its own gradient and
    state, and at W > 1 by its own owner, whose all-gather then overwrites the other's update (the ranks
    drifted apart, 3e-2 to 9e-2 in 4 steps). Tie weights by sharing one Parameter object instead."""
    DisjointStorage().check(optimizer, params, labels)


#: a storage: its device and address
_Storage = tuple[str, int]


class DisjointStorage:
    """:func:`check_disjoint_storage` over parameters that arrive in batches (one per param group while an
    optimizer is constructed): each :meth:`check` compares the new parameters with each other and with
    those added before, and raises what :func:`check_disjoint_storage` over all of them would (the same
    parameter or pair, the same message), given that the earlier ones passed. Its cost is that of the new
    parameters and of the storages they share with earlier ones, so one param group per parameter
    (layer-wise lr decay) is linear in the parameters, not quadratic (2000 groups: ShardedAdamW built in
    8.7 s, now 0.6 s).

    The spans are those the parameters had when they were added: valid while nothing can move them (the
    constructor's loop over its groups). Once the optimizer is built a parameter's memory may change
    (``model.half()``, ``p.data = ...``: a freed address may be reused by a new parameter), so a later
    ``add_param_group`` checks every parameter afresh (:func:`check_disjoint_storage`)."""

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self._labels: list[str] = []
        self._spans: dict[_Storage, list[tuple[int, int, int]]] = {}  # (start, stop, index), sorted
        self._order: dict[_Storage, int] = {}  # where the full check first meets each storage

    def check(self, optimizer: Any, params: Sequence[Tensor], labels: Sequence[str]) -> Callable[[], None]:
        """Raise ``ValueError`` as :func:`check_disjoint_storage` would over the parameters added so far and
        ``params`` (named by ``labels`` in the message). Changes nothing; returns the commit that adds them."""
        first = len(self.params)

        def label(i: int) -> str:
            return self._labels[i] if i < first else labels[i - first]
        new: dict[_Storage, list[tuple[int, int, int]]] = {}
        for k, p in enumerate(params):
            span = _checked_span(optimizer, p, first + k, label)
            if span is not None:
                new.setdefault(span[0], []).append((span[1], span[2], first + k))
        # the storages in the order the full check meets them (by their first parameter); stable for new ones
        order = sorted(new, key=lambda key: self._order.get(key, len(self._order)))
        lookup = _Numbered(self.params, params)
        merged: dict[_Storage, list[tuple[int, int, int]]] = {}
        for key in order:
            merged[key] = sorted(self._spans.get(key, []) + new[key])
            _sweep(optimizer, merged[key], lookup, label)

        def commit() -> None:
            self.params.extend(params)
            self._labels.extend(labels)
            for key in order:
                self._order.setdefault(key, len(self._order))
                self._spans[key] = merged[key]
        return commit


#: what a parameter's memory span, self-overlap and signature are read from (see :class:`StorageMemo`)
_Print = tuple[int, int, torch.Size, tuple[int, ...], torch.dtype, torch.device]


def storage_prints(params: Sequence[Tensor]) -> list[_Print] | None:
    """Each parameter's first element's address, its storage's address, shape, strides, dtype and device (None
    where a tensor has no plain storage to read)."""
    try:
        return [(p.data_ptr(), p.untyped_storage().data_ptr(), p.shape, p.stride(), p.dtype, p.device)
                for p in params]
    except (RuntimeError, NotImplementedError, TypeError):  # a tensor subclass without a storage
        return None


@dataclasses.dataclass
class StorageMemo:
    """The storage check of an optimizer's parameters (:class:`DisjointStorage` over them, in order) kept
    for its next ``add_param_group``, with what each one's span was read from (:func:`storage_prints`).
    While every parameter reads the same (none moved: ``model.half()``, ``p.data = ...``, ``to_empty``
    change an address, a dtype or a layout) the spans are those of the index, so a group added is checked
    against them alone, not every parameter afresh (one group per layer was quadratic: 1000 groups, 5 s of
    storage checks). ``table``: the block table it was completed for; any other table (a rebuild, a
    group refused after the check) makes it stale."""

    index: DisjointStorage
    prints: list[_Print]
    table: Any = None

    def current(self, params: Sequence[Tensor], table: Any) -> bool:
        """Whether the memo still holds for ``params`` (the parameters ``table`` was built over)."""
        return (table is not None and self.table is table and len(params) == len(self.prints)
                and storage_prints(params) == self.prints)

    def check(self, optimizer: Any, params: Sequence[Tensor], labels: Sequence[str]) -> Callable[[], None]:
        """:meth:`DisjointStorage.check` of the parameters of an added group; the commit adds them here too and
        leaves the memo stale until the new table is set (``table``)."""
        commit = self.index.check(optimizer, params, labels)

        def extend() -> None:
            prints = storage_prints(params)
            commit()
            self.table = None
            if prints is None:  # nothing to compare the next time: a full check then
                self.prints = []
                self.index = DisjointStorage()
            else:
                self.prints.extend(prints)
        return extend


class _Numbered:
    """The parameters ``before`` and then ``new``, by number (without copying ``before``)."""

    def __init__(self, before: Sequence[Tensor], new: Sequence[Tensor]) -> None:
        self.before, self.new = before, new

    def __getitem__(self, i: int) -> Tensor:
        return self.before[i] if i < len(self.before) else self.new[i - len(self.before)]


def _checked_span(optimizer: Any, p: Tensor, i: int, label: Callable[[int], str]) -> tuple[_Storage, int, int] | None:
    """Parameter ``i``'s storage and byte span ``[start, stop)`` (None: nothing to compare), after refusing
    a parameter whose elements overlap each other."""
    if p.is_meta or p.numel() == 0 or is_dtensor(p):
        return None
    shape, stride = tuple(p.shape), tuple(p.stride())
    if _overlaps_itself(shape, stride):
        # an update written to one element lands on all of them, and torch's in-place ops refuse it
        # in the middle of a step (after other parameters were updated; at W > 1 on the owner only)
        raise ValueError(
            f"{type(optimizer).__name__}: parameter {label(i)} (shape {shape}, stride "
            f"{stride}) has elements that share memory, e.g. nn.Parameter(t.expand(...)); no "
            "optimizer can step its elements apart. Give it its own memory: nn.Parameter(t.expand(...)"
            ".clone()).")
    size = p.element_size()
    start = int(p.storage_offset()) * size
    stop = start + (1 + sum((int(n) - 1) * st for n, st in zip(shape, stride))) * size
    return (str(p.device), p.untyped_storage().data_ptr()), start, stop


def _sweep(optimizer: Any, items: list[tuple[int, int, int]], params: Any, label: Callable[[int], str]) -> None:
    """Raise for the first two parameters over one storage (``items``: their sorted ``(start, stop, index)``)
    that share an element."""
    active: list[tuple[int, int]] = []  # (end, index) of the earlier spans still open at this start
    for s1, e1, j in items:
        active = [(e0, i) for e0, i in active if e0 > s1]  # disjoint views (DeepSpeed's) keep it short
        for _, i in active:
            if not _share_elements(params[i], params[j]):
                continue
            raise ValueError(
                f"{type(optimizer).__name__}: parameters {label(i)} and {label(j)} share memory (one is a "
                "view of the other, e.g. nn.Parameter(other.weight.t())); each would be stepped with its "
                "own gradient and state, and at W > 1 one owner's update overwrites the other's. Tie "
                "weights by using one Parameter object in both places (then it is listed once)."
            )
        active.append((e1, j))


@functools.lru_cache(maxsize=1024)
def _overlaps_itself(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether two elements of a tensor of this layout are one memory location (a stride-0 dimension, or
    strides that make rows interleave onto each other). Exact; the element walk runs only for a non-dense
    layout. Remembered per layout (a model has few), as the check runs over every parameter at each
    ``add_param_group`` after construction."""
    dims = sorted((st, n) for n, st in zip(shape, stride) if n > 1)
    if any(st == 0 for st, _ in dims):
        return True
    reach = 1  # each stride past the extent of the smaller ones: no two elements meet (any permutation)
    for st, n in dims:
        if st < reach:  # interleaved strides: count the distinct elements
            return len(_element_offsets(shape, stride)) < math.prod(shape)
        reach = st * n
    return False


def _share_elements(a: Tensor, b: Tensor) -> bool:
    """Whether two views of one storage share an element, given that their spans overlap (exact for
    strided views, e.g. two column slices of one matrix interleave without sharing)."""
    if a.is_contiguous() and b.is_contiguous():
        return True  # overlapping contiguous spans share elements
    starts = [{(int(t.storage_offset()) + i) * t.element_size() for i in _element_offsets(tuple(t.shape), t.stride())}
              for t in (a, b)]
    return not starts[0].isdisjoint(starts[1])


def _element_offsets(shape: Sequence[int], stride: Sequence[int]) -> set[int]:
    """The storage offsets of a tensor's elements from its first one (the walk allocates the span only)."""
    span = 1 + sum((int(n) - 1) * st for n, st in zip(shape, stride))
    pos = torch.as_strided(torch.arange(span, dtype=torch.int64), tuple(shape), tuple(stride), 0)
    return set(pos.reshape(-1).tolist())


Signature = tuple[torch.Size, torch.dtype, torch.device]


def param_signatures(params: Sequence[Tensor]) -> list[Signature]:
    """What the block table and the state are made for: each parameter's shape, dtype and device."""
    return [(p.shape, p.dtype, p.device) for p in params]


def check_step(optimizer: Any, params: Sequence[Tensor], names: Sequence[str | None], *,
               gradients: bool = True, built: Sequence[Signature] | None = None) -> int:
    """Raise ``RuntimeError`` naming the first parameter the step cannot update, before any state,
    parameter or collective: a ``meta`` parameter (no data; also what an optimizer built before
    ``model.to_empty()`` still holds), with ``gradients`` a sparse (non-strided) gradient, which the
    dense kernels would otherwise reject mid-step, and with ``built`` (:func:`param_signatures` at
    construction) a parameter whose shape, dtype or device changed since (``p.data = ...``,
    ``model.to(torch.float64)``): the blocks, the state and the exchange buffers were made for the old one,
    and the kernels read them by element count (a larger tensor overran them). Where no gradient came: a
    parameter ``fully_shard`` replaced, and with ``gradients`` a trainable one whose memory was freed (FSDP2's
    unsharded copy, :func:`storage_freed`). Returns how many of the parameters have a gradient (0 without
    ``gradients``)."""
    seen = 0
    for i, p in enumerate(params):  # runs every step: only attribute reads unless something is wrong
        g = p.grad if gradients else None
        if g is None:  # (only where no gradient came: no cost on a training step)
            if replaced_by_fully_shard(p):
                raise RuntimeError(fully_shard_replaced_message(type(optimizer).__name__, repr(names[i]) if names[i]
                                                                else f"#{i}") + " Nothing changed.")
            if gradients and p.requires_grad and storage_freed(p):  # (frozen: never trained, not read)
                raise RuntimeError(freed_storage_message(type(optimizer).__name__, repr(names[i]) if names[i]
                                                         else f"#{i}", p))
        if (p.is_meta or (g is not None and g.layout != p.layout)
                or (built is not None and (p.shape, p.dtype, p.device) != built[i])):
            _refuse_step(optimizer, p, repr(names[i]) if names[i] else f"#{i}", None if built is None else built[i])
        seen += g is not None
    return seen


def _refuse_step(optimizer: Any, p: Tensor, label: str, built: Signature | None) -> None:
    what = type(optimizer).__name__
    if built is not None and not p.is_meta and (p.shape, p.dtype, p.device) != built:
        raise RuntimeError(
            f"{what}: parameter {label} is now {_describe((p.shape, p.dtype, p.device))}, but the optimizer "
            f"was built for {_describe(built)}; its blocks and state are made for that ("
            + ("a change before the first step is taken over, except from the meta device and for FSDP2's "
               "DTensor parameters; after a step or a loaded state it is not" if getattr(
                   optimizer, "rebuilds_before_first_step", True) else f"{what} does not take such a change over")
            + "). Change the "
            "parameters (model.to(dtype or device), p.data = ...) before constructing the optimizer, as "
            "torch's documentation asks (Lightning Fabric: fabric.setup_module(model), then build the "
            "optimizer, then fabric.setup_optimizers(opt)), or build a new one. Nothing changed."
        )
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


def gradient_mismatch(optimizer: Any, params: Sequence[Tensor], names: Sequence[str | None]) -> ValueError | None:
    """The error for the first parameter whose gradient has another shape, dtype or device than the
    parameter, or None. Such a gradient is set by hand (``p.grad = g``, ``p.grad.data = g``; autograd
    makes none): torch's optimizers raise on it, and ours stepped one of the same number of elements
    (a transposed matrix's) silently, or failed inside the update after other blocks had moved. Returned,
    not raised: the step holds it, so every rank raises together and nothing changes. Every step, before
    any other work: attribute reads only."""
    dtensors = getattr(optimizer, "_dtensor", None) is not None
    for i, p in enumerate(params):
        g = p.grad
        if g is None:
            continue
        # (dtypes are singletons: ``is`` is their equality, without the comparison's call; two CPU tensors share
        # their device without making device objects: a third of a small model's check)
        if g.shape != p.shape or g.dtype is not p.dtype or not (g.is_cpu and p.is_cpu or g.device == p.device):
            label = repr(names[i]) if names[i] else f"#{i}"
            have, want = _describe((g.shape, g.dtype, g.device)), _describe((p.shape, p.dtype, p.device))
            return ValueError(
                f"{type(optimizer).__name__}.step: the gradient of parameter {label} has {have} and the parameter "
                f"{want}; a gradient must match its parameter (as torch's optimizers require). Set p.grad to a "
                "tensor of the parameter's shape, dtype and device. Nothing changed.")
        if dtensors and is_dtensor(p) and getattr(g, "placements", None) != p.placements:  # type: ignore[attr-defined]
            return _placement_mismatch(optimizer, repr(names[i]) if names[i] else f"#{i}", p, g)
    return None


def _placement_mismatch(optimizer: Any, label: str, p: Any, g: Any) -> ValueError:
    """A DTensor parameter whose gradient is laid out otherwise: each rank steps its local piece of the
    gradient as the parameter's. Tensor parallelism makes such gradients: SequenceParallel leaves a replicated
    norm's gradient Partial (each rank's sum over its own sequence chunk: SOAA 0.13 off, the replicas drifted
    apart), and a dimension smaller than the mesh gives a Replicate gradient for a Shard parameter with an
    empty piece (stepped silently 0.24 off, or read past the state's buffers)."""
    have = tuple(g.placements) if is_dtensor(g) else "none (a plain tensor)"
    return ValueError(
        f"{type(optimizer).__name__}.step: parameter {label} is a DTensor with placements {tuple(p.placements)}, "
        f"its gradient has placements {have}: each rank would step its local piece of the gradient as the "
        "parameter's. (Tensor parallelism's SequenceParallel leaves a replicated norm's gradient Partial; a "
        "layer dimension smaller than the mesh gives a Replicate gradient.) Redistribute such gradients to "
        "their parameters' placements on every rank before step(): p.grad = p.grad.redistribute(p.device_mesh, "
        "p.placements) (a sum over the mesh for Partial; Lightning: in on_before_optimizer_step). Nothing changed.")


def _describe(sig: Signature) -> str:
    shape, dtype, device = sig
    return f"shape {tuple(shape)}, {dtype} on {device}"


#: keys torch, its schedulers and Lightning write into param groups, and tags other libraries put there
#: (timm's layer decay: lr_scale): never a misspelt hyperparameter
FOREIGN_GROUP_KEYS = frozenset({"params", "param_names", "initial_lr", "max_lr", "min_lr", "base_momentum",
                                "max_momentum", "name", "foreach", "fused", "capturable", "decoupled_weight_decay",
                                "lr_scale", "lr_mult", "weight_decay_mult", "decay_mult", "layer_id", "group_name",
                                *UNSUPPORTED_TORCH_OPTIONS})

#: other frameworks' names (Keras, Optax, Hugging Face) of the hyperparameters torch calls lr, betas, eps
#: and weight_decay
ALIASES = {"learning_rate": "lr", "beta1": "betas", "beta2": "betas", "beta_1": "betas", "beta_2": "betas",
           "epsilon": "eps", "wd": "weight_decay"}


def _group_keys(optimizer: Any) -> set[str]:
    """The keys a param group of this optimizer is read for: its defaults and its block options."""
    elementwise = ("max_block_numel",) if getattr(optimizer, "elementwise", False) else ()
    return {*optimizer.defaults, *getattr(optimizer, "layout_keys", ()), *elementwise}


def _owner_of(key: str, optimizer: Any) -> str | None:
    """Another registered optimizer whose hyperparameter ``key`` is (ASGO's max_block_size in a DASGO
    group), else None."""
    from lightning_soaa import registry  # the registry imports nothing from here

    for spec in registry.REGISTRY:
        if not isinstance(optimizer, spec.load()) and key in {f.name for f in dataclasses.fields(spec.load_config())}:
            return spec.name
    return None


def warn_misspelt_keys(optimizer: Any, group: dict[str, Any], index: int) -> None:
    """Log a warning for a key of param group ``index`` that the optimizer does not read but that looks
    meant for it: one letter or so from a key it reads (``weight_decy``, ``LR``), another framework's name
    for one (``learning_rate``, ``beta1``), or another optimizer's hyperparameter (ASGO's
    ``max_block_size`` in a DASGO group). torch, and we, ignore unknown keys (a group may carry the user's
    own tags), so the group would silently train with the default value."""
    name = type(optimizer).__name__
    known = _group_keys(optimizer)
    by_lower = {k.lower(): k for k in known}
    for key in group:
        if not isinstance(key, str) or key in known or key in FOREIGN_GROUP_KEYS:
            continue
        meant = ALIASES.get(key.lower())
        if meant not in known:
            close = difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.85)
            meant = by_lower[close[0]] if close else None
        if meant is not None:
            now = f"{meant}={group[meant]!r}" if meant in group else f"no {meant!r}"
            log.warning("%s: param group %d has the key %r, which %s does not read: it is ignored and the group "
                        "has %s. Did you mean %r?", name, index, key, name, now, meant)
        elif (owner := _owner_of(key, optimizer)) is not None:
            log.warning("%s: param group %d has the key %r, an option of %s that %s does not have: it is ignored.",
                        name, index, key, owner, name)
