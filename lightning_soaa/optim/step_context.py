"""The numerical context of an optimizer step: full precision, whatever autocast region it is called in,
and outside ``torch.inference_mode``.

A step called inside ``torch.autocast`` (Lightning's ``precision="bf16-mixed"`` runs ``training_step``, and so
a manual-optimization ``opt.step()``, under it; plain loops often put the whole iteration there) ran ASGO's
Grams, roots and preconditioning and EGN's Jacobians and solve in bf16/fp16: updates 1e-3 to 8e-2 off the
same step outside, silently. The step's arithmetic is the optimizer's own business: it runs with autocast
off, and a closure it calls runs under the caller's autocast again (its forward is the user's).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["amp_unscale_", "amp_after_raise", "full_precision", "full_precision_no_grad", "caller_autocast",
           "outside_inference_mode", "autocast_casts"]

#: the device types whose autocast state a step reads (torch.is_autocast_enabled accepts each, present or not)
AUTOCAST_DEVICES: tuple[str, ...] = ("cpu", "cuda", "xpu", "mps")

F = TypeVar("F", bound=Callable[..., Any])

#: whether autocast is enabled for a device type torch's one call covers, in that call (a torch without it: always
#: asked per device type). Not every one of AUTOCAST_DEVICES: torch 2.13's leaves MPS out, and an MPS region then
#: reached the step (its matmuls in the region's dtype; same_batch judged the trial at the parameters' rounding)
_any_autocast: Callable[[], bool] = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
#: the device types of AUTOCAST_DEVICES that torch's one call does not cover: asked on their own
_NOT_IN_ANY: tuple[str, ...] = ("mps",)


def _in_autocast_region() -> bool:
    """Whether this thread is inside a ``torch.autocast`` region, enabled or not (0.2 us): autocast keeps its
    casts of the weights until the outermost one ends, also across an ``enabled=False`` region inside it."""
    depth = torch.autocast_increment_nesting()
    torch.autocast_decrement_nesting()  # (the Python region's exit clears the cache at 0; this never does)
    return depth > 1


def _drop_stale_casts() -> None:
    """Drop autocast's casts of the weights where a region is open (its next forward casts them afresh);
    nothing outside one (the cache may hold another thread's casts: left alone)."""
    if _in_autocast_region():
        torch.clear_autocast_cache()


def autocast_casts(p: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether autocast to ``dtype`` casts ``p``'s dtype: every floating dtype but float64 (torch never casts
    doubles: a float64 model computes in float64 inside a bf16 region)."""
    return p.is_floating_point() and p.dtype != torch.float64 and dtype.is_floating_point


def outside_inference_mode(fn: F) -> F:
    """Decorate a method that makes or writes optimizer state (``step``, ``load_state_dict``): run it with
    ``torch.inference_mode`` off. State made inside inference mode is made of inference tensors, which no
    later step outside it may update (and the step's version stamps cannot read them): torch's optimizers
    step and load there, and a load inside it left ours unable to step for good."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def full_precision(step: F) -> F:
    """Decorate an optimizer's ``step``: run it outside inference mode (:func:`outside_inference_mode`) and
    with autocast disabled on every device type where it is enabled, remembering the caller's regions for
    :func:`caller_autocast`. Two attribute reads per device type when no region is active (the usual case)."""
    return _full_precision(step, no_grad=False)


def full_precision_no_grad(step: F) -> F:
    """:func:`full_precision` of a step that runs under ``torch.no_grad()`` (the template's step and SOAA's):
    the same contexts in one wrapper. Stacked as three decorators (``outside_inference_mode``, the autocast
    wrapper, ``torch.no_grad()``) they took ~31 us of a ~640 us W = 1 SOAA step on the report's digits MLP (a
    slow 2-core host), one wrapper ~17 us (benchmarks/HISTORY.md, ``bench_soaa_digits_step.py``)."""
    return _full_precision(step, no_grad=True)


def _full_precision(step: F, *, no_grad: bool) -> F:
    @functools.wraps(step)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.is_inference_mode_enabled():  # as outside_inference_mode, then the same wrapper without it
            with torch.inference_mode(False):
                return wrapper(self, *args, **kwargs)
        grad = torch.is_grad_enabled()
        if no_grad:  # what torch.no_grad() does on entry and exit (torch.set_grad_enabled without its object)
            torch._C._set_grad_enabled(False)
        try:
            # (one call says none is enabled, the usual case: asked per device type, each parses its name)
            active = ([d for d in AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]
                      if _any_autocast() or any(map(torch.is_autocast_enabled, _NOT_IN_ANY)) else [])
            if not active:
                try:  # (inside a region's enabled=False part too: the region's casts outlive it)
                    return step(self, *args, **kwargs)
                finally:
                    _drop_stale_casts()
            return _outside_autocast(step, self, active, args, kwargs)
        finally:
            if no_grad:
                torch._C._set_grad_enabled(grad)

    return wrapper  # type: ignore[return-value]


def _outside_autocast(step: Callable[..., Any], self: Any, active: list[str], args: Any, kwargs: Any) -> Any:
    """``step`` with autocast disabled on the ``active`` device types, the caller's regions remembered."""
    regions = [(d, torch.get_autocast_dtype(d)) for d in active]
    outer = self.__dict__.get("_caller_autocast")
    self._caller_autocast = regions
    try:
        with contextlib.ExitStack() as stack:
            for d in active:
                stack.enter_context(torch.autocast(d, enabled=False))
            return step(self, *args, **kwargs)
    finally:
        self._caller_autocast = outer
        # the region's casts of the parameters are those of before the step: the caller's next forward in
        # it read them, not what the step wrote (autocast drops them only when its outermost region ends)
        _drop_stale_casts()


class _NoMHAFastPath(TorchFunctionMode):
    """Active in one thread for an EGN step: torch's MultiheadAttention and TransformerEncoder(Layer) take
    their fast path only where no tensor argument ``has_torch_function``, which holds for every tensor while a
    torch-function mode is active in the calling thread (the mode stack is thread-local). Every other call
    passes through unchanged (bit-identical). The process-wide switch ``torch.backends.mha`` stays as the
    user set it: turning it off for the step (counted under a lock between EGN steps) also turned it off
    under another thread's eval forwards, whose TransformerEncoder then built nested tensors with the switch
    on and ran its layers with it off (torch's AssertionError, 2 in 6,236 forwards beside EGN steps)."""

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        return func(*args, **(kwargs or {}))


def one_model_function(step: F) -> F:
    """Decorate a step that evaluates the model with and without a graph (EGN: its capture with one, the
    line search's and ρ's trial losses under no_grad): torch's MultiheadAttention fast path, taken only
    without a graph, computes another function for a TransformerEncoder with a padding mask (nested
    tensors: zeros at padded positions; the two evaluations differed by 0.41 and EGN backtracked a step
    that lowered the true loss, 0.35 off after 5 steps), and it fails under vmap (the explicit rows). Off
    for the step in the calling thread only (:class:`_NoMHAFastPath`): other threads' forwards and
    torch's process-wide switch are untouched (EGN also turns its TransformerEncoders' nested tensors off:
    ``egn._no_nested_tensors``). Only where the optimizer's ``model`` holds a
    MultiheadAttention (the one module, alone or in a TransformerEncoder(Layer), with a fast path): the
    mode's pass-through costs each torch call of the step a Python call (+0.5 ms, 1.4 -> 1.9 ms, for EGN on
    a 3-layer MLP; +25% on a 2-layer d=8 TransformerEncoder against the switch turned off)."""

    @functools.wraps(step)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        model = getattr(self, "model", None)
        if not isinstance(model, torch.nn.Module):
            return step(self, *args, **kwargs)
        modules = list(model.modules())
        # handed to the step (``_walked_modules``, taken at its start): the walk of the modules it makes itself
        # where nothing has run in between (EGN.step: one walk a step fewer)
        self.__dict__["_walked_modules"] = modules
        if not any(isinstance(m, torch.nn.MultiheadAttention) for m in modules):
            return step(self, *args, **kwargs)
        with _NoMHAFastPath():
            return step(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def caller_autocast(optimizer: Any) -> Iterator[None]:
    """The autocast regions the step was called in, entered again (for the user's closure), without the casts
    of the parameters autocast keeps until its outermost region ends: made by a forward before the step wrote
    them, they are what a closure evaluated after a write read. SOAA's ``same_batch`` judged every trial at
    the weights before it (the loss equal to the bit: rejected with the stale-closure warning, d halved, 1
    of 6 steps at lr 1e-2 under CPU bf16 autocast, 4 of 6 under fp16; or it stood unjudged below the rounding)."""
    regions = optimizer.__dict__.get("_caller_autocast") or []
    _drop_stale_casts()  # (also for a step in an enabled=False region: the closure may open its own inside)
    with contextlib.ExitStack() as stack:
        for device, dtype in regions:
            stack.enter_context(torch.autocast(device, dtype=dtype))
        yield


def amp_unscale_(optimizer: Any, unscaled: list[torch.Tensor]) -> bool:
    """torch.amp.GradScaler's contract with optimizers that set ``_step_supports_amp_scaling``: the scaler
    calls ``step()`` at every iteration (on every rank: a skipped call under ``grad_reduction="mean"``
    without DDP left one rank's collectives pairing with the next iteration's of another, then hung) and
    hands over ``grad_scale`` (None when the user already called ``unscale_``) and ``found_inf``. The
    gradients are unscaled here in place, as ``unscale_`` does, except those a step that raised left unscaled
    (:func:`amp_after_raise`) and nothing touched since: dividing them again was silently wrong. ``unscaled``
    receives, as the unscaling goes, every gradient that holds its unscaled value on this step's account.
    Returns whether the scaler found an inf or NaN on this rank, which the step counts as a non-finite value
    (skipped on every rank)."""
    kept = optimizer.__dict__.pop("_amp_kept", None)
    found, scale = optimizer.__dict__.get("found_inf"), optimizer.__dict__.get("grad_scale")
    if scale is not None:
        _refuse_float16_grads(optimizer)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if kept is not None and _unchanged(kept.get(id(g)), g):
                    unscaled.append(g)
                else:
                    by_device.setdefault(g.device, []).append(g)
        for device, grads in by_device.items():
            inv = scale.double().reciprocal().float().reshape(1).to(device)
            seen = torch.zeros(1, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, seen, inv)
            unscaled.extend(grads)
    # found_inf is torch's sum over devices: the int 0 when no parameter had a gradient
    return found is not None and float(found.item() if isinstance(found, torch.Tensor) else found) > 0


def _refuse_float16_grads(optimizer: Any) -> None:
    """float16 gradients are not unscaled here, as torch.amp.GradScaler does not unscale them (its ``ValueError:
    Attempting to unscale FP16 gradients.`` in one process, under DDP, or after ``scaler.unscale_``): divided by
    the scale in float16 they lose what the scale kept (below ~6e-8 they flush to 0). Only this contract's route
    (``grad_reduction="mean"`` at W > 1) reached it, and ran on them: the same model trained at W = 1 raised.
    Raised before anything is written, so the step is refused on every rank with the gradients as they were.
    Not under FSDP2 (DTensor parameters), whose scaler, torch's ShardedGradScaler, unscales float16 gradients
    in place itself in one process too: the same step there."""
    if getattr(optimizer, "_dtensor", None) is not None:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and p.grad.dtype == torch.float16:
                i = next((i for i, q in enumerate(getattr(optimizer, "_params", [])) if q is p), None)
                names = getattr(optimizer, "_names", None) or []
                name = repr(names[i]) if i is not None and i < len(names) and names[i] else f"#{i}"
                raise ValueError(
                    f"{type(optimizer).__name__}: torch.amp.GradScaler with float16 gradients (parameter {name} has "
                    f"dtype={p.grad.dtype}): unscaling them in float16 loses the small values the scale kept, and "
                    "torch.amp.GradScaler refuses them ('Attempting to unscale FP16 gradients.'). Allowed: float32 "
                    "parameters under torch.autocast(dtype=torch.float16) with the scaler, or bfloat16/float16 "
                    "parameters without a GradScaler.")


def amp_after_raise(optimizer: Any, unscaled: list[torch.Tensor]) -> None:
    """A step that raised (an out of memory, a Ctrl+C, an error raised on every rank), as torch.amp.GradScaler
    needs it to step again exactly. The scaler deletes ``grad_scale``/``found_inf`` only after a step that
    returned: left behind, the retry's ``scaler.step`` multiplied its scale into the stale one (the gradients
    divided by the scale squared), and a later step without the scaler unscaled by it. The gradients
    ``amp_unscale_`` unscaled in place (``unscaled``) cannot be put back bit for bit (a scale that is not a power
    of two, subnormal values); they are remembered by identity, version counter and storage instead, so that
    the next step does not divide them again while they are unchanged, and does divide a new backward's. Weak
    references: a caller who frees the gradients to retry on a smaller batch frees them. (A gradient of
    inference mode, which has no version counter, is matched by identity and storage alone.)"""
    optimizer.__dict__.pop("grad_scale", None)
    optimizer.__dict__.pop("found_inf", None)
    if unscaled:
        optimizer._amp_kept = {id(g): (weakref.ref(g), _version(g), _storage(g)) for g in unscaled}


def _version(g: torch.Tensor) -> int:
    return -1 if g.is_inference() else g._version


def _storage(g: torch.Tensor) -> int:
    """Where ``g``'s values are (0 where there is no plain storage: a sparse or DTensor gradient)."""
    try:
        return int(g.data_ptr())
    except RuntimeError:
        return 0


def _unchanged(mark: tuple[Any, int, int] | None, g: torch.Tensor) -> bool:
    """Whether ``g`` is the gradient ``mark`` remembered, untouched since (not replaced, not written in place)."""
    return mark is not None and mark[0]() is g and mark[1] == _version(g) and mark[2] == _storage(g)
