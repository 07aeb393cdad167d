"""Lightning's gradient clipping routed into the step's clip where Lightning would clip the wrong gradient.

Under ``grad_reduction="mean"`` at W > 1 the optimizer averages the ranks' gradients inside ``step()``; whatever
Lightning clips before that is one rank's gradient, by its own norm (the runs left the one-process run by 5e-2 to
1.3e-1 in 4 steps at W = 2), silently. Every clip Lightning makes goes through one documented method, the precision
plugin's ``clip_gradients(optimizer, clip_val, gradient_clip_algorithm)``: ``LightningModule.clip_gradients`` calls
it, and the default ``configure_gradient_clipping`` calls that with the Trainer's ``gradient_clip_val``.

The step finds the Trainer that runs it on the call stack (the frame of one of ``Trainer``'s own methods: ``fit``,
``_fit_impl`` in a launched worker), not from the closure's shape, which a Lightning release or a precision plugin of
the user's own changes. From the optimizer's construction under that Trainer (``configure_optimizers``), from when
Lightning wraps it (the start of ``fit``, for one built before the Trainer: :func:`lightning_wrapping`), from its
first clip through a plugin that keeps another's, from its ``zero_grad`` under that Trainer (one the Trainer does
not run, in a Trainer that runs none of ours: Lightning's manual recipe zeroes before it clips), and from each of its
steps on, that method of the Trainer's
precision plugin keeps this optimizer's clips for its next step (:class:`_KeptClips`), clipping nothing: Lightning
clips nothing per rank (so never twice), and the step applies a clip by norm as ``max_grad_norm`` to the averaged
gradient, on every rank alike, where it clipped the gradient the step takes: one made in the step's closure (automatic
optimization: the default ``configure_gradient_clipping``) or before ``step()`` on the very gradient it takes (a
manual ``training_step``, Lightning's recipe; a precision plugin that runs the closure before ``step()``). A clip
whose gradient was zeroed (the optimizer's ``zero_grad``, :func:`drop_kept_clips`; the module's
``zero_grad(set_to_none=False)`` before Lightning's next backward, :class:`_WatchedBackward`) or replaced before the
step took it
(a skipped step's, or one before a closure that computes the gradient again) is dropped; one followed by another
backward is refused. Then the step checks what happened: a Trainer whose ``gradient_clip_val`` is set must have
clipped this optimizer's step through that method, or its ``configure_gradient_clipping`` left the gradient alone (a
hook that clips on some steps only: :class:`_WatchedHook`), where the step is one of Lightning's loop (its precision
plugin's ``optimizer_step`` on the call stack; a callback's own ``opt.step()`` is one Lightning never clips), or the
step raises (a clip it can neither see nor apply: a ``configure_gradient_clipping`` that clips without
``self.clip_gradients``, a Lightning release that clips elsewhere). ``gradient_clip_algorithm="value"``, two clips in
one step and a clip with ``max_grad_norm`` also set are refused. The errors are raised in the step and held for its
record: every rank raises together (the Trainer is configured alike on every rank). Elsewhere (DDP's averaged
gradients under ``"none"``, one process) Lightning's own clip is exact and is left. No Lightning import: its classes
are read where the user's program imported them.
"""

from __future__ import annotations

import contextlib
import operator
import sys
import types
import weakref
from collections.abc import Iterator
from typing import Any

__all__ = ["clip_difference", "drop_kept_clips", "keep_clips", "lightning_wrapping", "routed_clip", "running_trainer",
           "unread_clip_error"]

_TRAINER_MODULES = ("lightning.pytorch", "pytorch_lightning")
_LOOKUPS: dict[tuple[Any, ...], tuple[tuple[type, ...], frozenset[int]]] = {}  # by the imported modules


def _method_codes(classes: tuple[type, ...]) -> frozenset[int]:
    """The ids of the code of the Trainer classes' own functions (and of what their decorators wrap), which the
    classes keep alive (ids: hashing a code object hashes its bytecode, 1 us a frame)."""
    codes: set[int] = set()
    for cls in classes:
        for value in vars(cls).values():
            func = getattr(value, "__func__", value)  # (a staticmethod's or classmethod's function)
            while isinstance(func, types.FunctionType):
                codes.add(id(func.__code__))
                func = getattr(func, "__wrapped__", None)
    return frozenset(codes)


def _trainer_lookup() -> tuple[tuple[type, ...], frozenset[int]] | None:
    """The imported Trainer classes and :func:`_method_codes`, kept while the same modules are imported."""
    modules = (sys.modules.get(_TRAINER_MODULES[0]), sys.modules.get(_TRAINER_MODULES[1]))
    found = _LOOKUPS.get(modules)
    if found is None:
        classes = tuple(cls for m in modules if isinstance(cls := getattr(m, "Trainer", None), type))
        if not classes:
            return None  # (not kept: a module still importing has no Trainer yet)
        found = _LOOKUPS[modules] = (classes, _method_codes(classes))
    return found


def running_trainer() -> Any | None:
    """The Lightning ``Trainer`` one of whose methods is on this thread's call stack (it runs this step), else
    None. About 1 us, and 0.3 us a frame (measured at a load of 8 on 2 cores); nothing more where Lightning was
    never imported."""
    found = _trainer_lookup()
    if found is None:
        return None
    classes, codes = found
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if id(frame.f_code) in codes:
            owner = frame.f_locals.get("self")
            if isinstance(owner, classes):
                return owner
        frame = frame.f_back
    return None


def _wraps(candidate: Any, optimizer: Any) -> bool:
    """Whether ``candidate`` is ``optimizer`` or a wrapper of it (``LightningOptimizer._optimizer``)."""
    for _ in range(4):
        if candidate is optimizer:
            return True
        candidate = getattr(candidate, "_optimizer", None)
    return False


def _algorithm(chosen: Any) -> str:
    return "norm" if chosen is None else str(getattr(chosen, "value", chosen))  # (None: Lightning's default)


def _where(optimizer: Any) -> str:
    return (f"{type(optimizer).__name__} with grad_reduction='mean' averages the ranks' gradients inside step(), "
            "after Lightning clips them (each rank's own)")


def _taken_clip(optimizer: Any, taken: list[float], clip_val: float, algorithm: str) -> None:
    """Take one clip Lightning asked for (``clip_val`` > 0), or refuse it (``ValueError``)."""
    name = type(optimizer).__name__
    if algorithm != "norm":
        raise ValueError(f"Invalid gradient_clip_algorithm={algorithm!r} with gradient_clip_val={clip_val!r}: "
                         f"{_where(optimizer)}. Must be 'norm' (the optimizer then clips the averaged gradient by its "
                         "norm), or average the gradients before step() (DDP, with grad_reduction='none').")
    if taken:
        raise ValueError(f"Lightning clipped {name}'s gradients twice in one step (clip_gradients with "
                         f"gradient_clip_val={taken[0]!r}, then {clip_val!r}): {_where(optimizer)}, which clips "
                         "once, by one bound. Clip once per step (Trainer(gradient_clip_val=...) or one "
                         "self.clip_gradients call in configure_gradient_clipping).")
    if any(g.get("max_grad_norm") is not None for g in optimizer.param_groups):
        raise ValueError(f"gradient_clip_val={clip_val!r} and {name}'s max_grad_norm are both set: set one of them "
                         f"(with grad_reduction='mean' both clip the averaged gradient).")
    taken.append(float(clip_val))


def _clip_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, str]:
    """``(clip_val, algorithm)`` of a call ``clip_gradients(optimizer, *args, **kwargs)``."""
    clip_val = args[0] if args else kwargs.get("clip_val", 0.0)
    return clip_val, _algorithm(args[1] if len(args) > 1 else kwargs.get("gradient_clip_algorithm"))


def _missed(optimizer: Any, trainer: Any, hooked: bool) -> ValueError:
    """``hooked``: the module's ``configure_gradient_clipping`` ran for this step and changed the gradient in place
    without ``self.clip_gradients`` (a torch clip)."""
    how = ("its configure_gradient_clipping changed the gradient in place without self.clip_gradients (a torch "
           "clip_grad_norm_?)" if hooked else "no clip of it reached the precision plugin's clip_gradients for this "
           "step (a Lightning version that clips elsewhere, or a precision plugin that skips "
           "configure_gradient_clipping)")
    return ValueError(f"Trainer(gradient_clip_val={trainer.gradient_clip_val!r}) with {type(optimizer).__name__}: "
                      f"{how}. {_where(optimizer)}, so that clip would act on the wrong gradient. Pass max_grad_norm "
                      "to the optimizer instead of gradient_clip_val, or clip through self.clip_gradients (a step "
                      "whose configure_gradient_clipping leaves the gradient alone is not clipped).")


@contextlib.contextmanager
def routed_clip(optimizer: Any, trainer: Any) -> Iterator[list[float]]:
    """Around the step's run of its closure under ``trainer`` (:func:`running_trainer`): yields a list that receives
    the bound of the Lightning clip this step takes over (at most one), else stays empty: the clips kept since the
    last step (:class:`_KeptClips`: made in the closure, or before ``step()``) that clipped the gradient the step
    takes, the closure having run. Raises where the Trainer's ``gradient_clip_val`` was not taken over in a step of
    Lightning's loop (see the module's text)."""
    keep_clips(optimizer, trainer)
    taken: list[float] = []
    try:
        yield taken
    finally:  # (dropped where the closure raised)
        kept = optimizer.__dict__.pop("_kept_clips", [])
        hook = optimizer.__dict__.pop("_clip_hook", None)  # (_WatchedHook: what configure_gradient_clipping did)
    for (clip_val, algorithm), grads in kept:  # after the closure: on the gradient the step takes
        if _still_clipped(optimizer, grads, clip_val):
            _taken_clip(optimizer, taken, clip_val, algorithm)
    # (a step of the user's own, e.g. a callback's opt.step(), is one Lightning never clips: nothing was missed)
    # (a configure_gradient_clipping that left the gradient alone skipped this step's clip, as one process does)
    if (not taken and hook != "skipped" and getattr(trainer, "gradient_clip_val", None)
            and _plugin_steps(trainer, optimizer)):
        raise _missed(optimizer, trainer, hook == "changed")


def _plugin_steps(trainer: Any, optimizer: Any) -> bool:
    """Whether ``trainer``'s precision plugin's ``optimizer_step`` for ``optimizer`` is on the call stack: the step
    is one of Lightning's loop (the one Lightning clips before), not one a callback or the user makes."""
    plugin = trainer.precision_plugin
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "optimizer_step" and frame.f_locals.get("self") is plugin:
            return _wraps(frame.f_locals.get("optimizer"), optimizer)
        frame = frame.f_back
    return False


class _StandIn:
    """A method of the precision plugin stood in for by an instance attribute while its Trainer runs optimizers that
    take Lightning's clips over (:func:`keep_clips`). A copy or pickle of the plugin gets the plugin's own method
    back: the stand-in belongs to this run, not to the plugin's state (a weak set cannot be pickled, and a copy would
    have called the original plugin)."""

    name = ""

    def __init__(self, plugin: Any) -> None:
        self.plugin, self.original = plugin, getattr(plugin, self.name)

    def __reduce__(self) -> tuple[Any, tuple[Any, str]]:
        return getattr, (self.plugin, self.name)  # (read before the copy's state: the class's method)


class _KeptClips(_StandIn):
    """The plugin's ``clip_gradients``: a clip of one of ``optimizers`` (or of another optimizer that takes
    Lightning's clips, added then: built before the Trainer, or not Lightning's) clips nothing and is kept on that
    optimizer for its next step, which applies it to the averaged gradient (Lightning clipped each rank's own
    gradient, silently), or, for one that never reads the gradients (EGN, at any W), refuses it
    (:func:`unread_clip_error`); other optimizers' clips are Lightning's."""

    name = "clip_gradients"

    def __init__(self, plugin: Any) -> None:
        super().__init__(plugin)
        self.optimizers: weakref.WeakSet[Any] = weakref.WeakSet()

    def mine(self, opt: Any) -> Any | None:
        """The optimizer of ours that ``opt`` is or wraps, registered here (now, where it takes clips), else None."""
        inner = opt
        for _ in range(4):  # (to the innermost: Lightning's wrapper subclasses our class, with its own __dict__)
            if inner in self.optimizers:
                return inner
            if (wrapped := getattr(inner, "_optimizer", None)) is None:
                break
            inner = wrapped
        takes = getattr(type(inner), "_takes_lightning_clips", None)
        if takes is None or not takes(inner):
            return None
        self.optimizers.add(inner)
        return inner

    def __call__(self, opt: Any, *args: Any, **kwargs: Any) -> Any:
        # (under a GradScaler ("16-mixed") Lightning refuses the clip for an optimizer that unscales in step(), as
        # under automatic optimization; one process clips the scaled gradient there, which the step would not)
        clip_val, algorithm = _clip_args(args, kwargs)
        kept = clip_val is not None and clip_val > 0 and getattr(self.plugin, "scaler", None) is None
        mine = self.mine(opt) if kept else None  # (Lightning clips nothing by 0: no gradient_clip_val)
        if mine is None:
            return self.original(opt, *args, **kwargs)
        mine.__dict__.setdefault("_kept_clips", []).append(((clip_val, algorithm), _grads_now(mine)))
        return None


class _WatchedHook(_StandIn):
    """The plugin's ``_clip_gradients`` (Lightning's call of the module's ``configure_gradient_clipping`` with the
    Trainer's ``gradient_clip_val``): notes on the optimizer whether the hook, where it clipped nothing through
    ``self.clip_gradients``, left the gradient alone (``"skipped"``: one process clips nothing in that step either)
    or changed it in place (``"changed"``: a clip of its own, per rank), for :func:`routed_clip`. A Lightning
    release without this method: no note, and a step without a clip is refused as before."""

    name = "_clip_gradients"

    def __init__(self, plugin: Any, clips: _KeptClips) -> None:
        super().__init__(plugin)
        self.clips = clips

    def __call__(self, model: Any, opt: Any, clip_val: Any = None, *args: Any, **kwargs: Any) -> Any:
        mine = self.clips.mine(opt) if clip_val else None  # (no gradient_clip_val: nothing is refused as missed)
        if mine is None:
            return self.original(model, opt, clip_val, *args, **kwargs)
        before, kept = _held(mine), len(mine.__dict__.get("_kept_clips", ()))
        result = self.original(model, opt, clip_val, *args, **kwargs)
        if len(mine.__dict__.get("_kept_clips", ())) == kept:
            mine._clip_hook = "skipped" if _held_unchanged(before, mine) else "changed"
        return result


class _WatchedBackward(_StandIn):
    """The plugin's ``backward`` (Lightning's ``manual_backward``, and the closure's backward): before a backward adds
    to the gradient, forgets the clips kept (:class:`_KeptClips`) for each parameter whose gradient was zeroed in
    place since the clip (:func:`_forget_zeroed`: the module's own ``zero_grad(set_to_none=False)``, which the
    optimizer never sees). One process clipped a gradient that no step takes; without this the step would see that
    gradient changed since the clip and refuse legitimate code. A gradient that a backward adds to without zeroing
    keeps its clip, and the step refuses it (:func:`_still_clipped`)."""

    name = "backward"

    def __init__(self, plugin: Any, clips: _KeptClips) -> None:
        super().__init__(plugin)
        self.clips = clips

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for opt in list(self.clips.optimizers):
            for _, grads in opt.__dict__.get("_kept_clips", ()):
                _forget_zeroed(grads)
        return self.original(*args, **kwargs)


def _zeroed(was: tuple[weakref.ref[Any], int] | None) -> bool:
    """Whether the very gradient a clip clipped (:func:`_grads_now`) was changed in place since and is all zeros now:
    the clip's effect is gone, as in one process (asked only where the version moved: one reduction a parameter)."""
    grad = None if was is None else was[0]()
    if grad is None or grad._version == was[1]:  # type: ignore[index]
        return False
    local = grad.to_local() if callable(getattr(grad, "to_local", None)) else grad  # (a DTensor: this rank's part)
    return not bool(local.any())


def _forget_zeroed(grads: list[tuple[weakref.ref[Any], int] | None]) -> bool:
    """Each entry of a kept clip's ``grads`` whose gradient was zeroed since (:func:`_zeroed`) becomes None, as for a
    parameter that had no gradient at the clip: the gradient the step takes is then one the clip never saw. Returns
    whether the clip still names a gradient."""
    for i, was in enumerate(grads):
        if _zeroed(was):
            grads[i] = None
    return any(was is not None for was in grads)


_grad_of, _version_of = operator.attrgetter("grad"), operator.attrgetter("_version")


def _params(optimizer: Any) -> list[Any]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _any_none(values: list[Any]) -> bool:
    """``None in values`` without ``==`` (a tensor's ``__eq__`` runs torch's dispatch: some 25 us each)."""
    return any(v is None for v in values)


def _versions(grads: list[Any]) -> list[int]:
    """Each gradient's version (-1 for none): one C-level pass where every parameter has one (~0.1 us each)."""
    try:
        return list(map(_version_of, grads))
    except AttributeError:
        return [-1 if g is None else g._version for g in grads]


def _grads_now(optimizer: Any) -> list[tuple[weakref.ref[Any], int] | None]:
    """Which gradient a kept clip clipped: each parameter's ``.grad`` (a weak reference: a clip kept until the next
    step must not keep a replaced gradient alive) and its version."""
    grads = list(map(_grad_of, _params(optimizer)))
    if not _any_none(grads):  # (the usual case, in C-level passes)
        return list(zip(map(weakref.ref, grads), map(_version_of, grads)))
    return [None if g is None else (weakref.ref(g), g._version) for g in grads]


def _compared(grads: list[tuple[weakref.ref[Any], int] | None], params: list[Any]) -> tuple[bool, bool, bool]:
    """``(same, replaced, changed)``: whether some parameter's gradient is the very tensor of ``grads``
    (:func:`_grads_now`) unchanged, another tensor (or none, or one where there was none), the same tensor changed
    in place. Read from the parameters directly: no second snapshot."""
    same = replaced = changed = False
    for was, g in zip(grads, map(_grad_of, params)):
        if was is None:
            replaced = replaced or g is not None
        elif g is None or was[0]() is not g:
            replaced = True
        elif was[1] == _version_of(g):
            same = True
        else:
            changed = True
    return same, replaced, changed


def _held(optimizer: Any) -> tuple[list[Any], list[int]]:
    """Each parameter's ``.grad`` itself (held only while one call of the hook runs) and its version: what
    :func:`_held_unchanged` compares, cheaper than :func:`_grads_now`'s weak references."""
    grads = list(map(_grad_of, _params(optimizer)))
    return grads, _versions(grads)


def _held_unchanged(held: tuple[list[Any], list[int]], optimizer: Any) -> bool:
    """Whether every parameter's gradient is still the very tensor of ``held`` (:func:`_held`), unchanged."""
    now = list(map(_grad_of, _params(optimizer)))
    return all(map(operator.is_, held[0], now)) and held[1] == _versions(now)


def _still_clipped(optimizer: Any, grads: list[tuple[weakref.ref[Any], int] | None], clip_val: Any) -> bool:
    """Whether a clip kept since ``grads`` (:func:`_grads_now`) applies to the gradient the step takes: the very
    tensors, unchanged (True); all replaced or dropped since (False: a skipped step's clip, whose gradient was
    zeroed, ``zero_grad()``, or one before a step whose closure computes the gradient again; in one process it
    clipped a gradient that no step took). Raises where some changed in
    place (a backward after the clip adds to it: one process clipped a part of the gradient, which the step cannot
    do on the averaged one)."""
    same, replaced, changed = _compared(grads, _params(optimizer))
    if changed:  # (zeroed since, with no backward after: one process steps on the zeros)
        _forget_zeroed(grads)
        same, replaced, changed = _compared(grads, _params(optimizer))
    if not changed and not (same and replaced):
        return not replaced
    raise ValueError(f"self.clip_gradients(gradient_clip_val={clip_val!r}) with {type(optimizer).__name__}: its "
                     "gradient changed after the clip and before step() took it (a backward after the clip, or a "
                     "zero_grad that kept the tensors followed by a backward other than self.manual_backward). "
                     f"{_where(optimizer)}, so the clip is applied in step(), to the "
                     "gradient step() takes. Clip after the last backward of the step, right before opt.step().")


def keep_clips(optimizer: Any, trainer: Any) -> None:
    """From now on ``trainer``'s precision plugin keeps ``optimizer``'s clips for its next step (:class:`_KeptClips`).
    Called where the optimizer is built (``configure_optimizers``: before a manual ``training_step`` clips), where
    Lightning wraps it (:func:`lightning_wrapping`: one built before the Trainer runs), at its ``zero_grad`` and at
    every step."""
    plugin = trainer.precision_plugin
    kept = vars(plugin).get("clip_gradients")
    if not isinstance(kept, _KeptClips):
        kept = plugin.clip_gradients = _KeptClips(plugin)
        for watch in (_WatchedHook, _WatchedBackward):
            if callable(getattr(plugin, watch.name, None)):
                setattr(plugin, watch.name, watch(plugin, kept))
    kept.optimizers.add(optimizer)


def lightning_wrapping(cls: type) -> Any | None:
    """The optimizer that Lightning's ``LightningOptimizer`` is wrapping, where ``cls`` is the class it makes for
    that (``type("Lightning" + name, (LightningOptimizer, type(optimizer)), {})``, which calls the optimizer class's
    ``__init_subclass__``); else None. Lightning wraps every optimizer it runs, when the Trainer sets up (one built
    before the Trainer, or assigned to ``trainer.optimizers`` later): the first point at which such an optimizer
    can keep its clips before a manual ``training_step`` clips it."""
    if not cls.__name__.startswith("Lightning") or len(cls.__bases__) != 2:
        return None
    frame: types.FrameType | None = sys._getframe(2)  # (past the __init_subclass__ that asks)
    for _ in range(4):  # (to LightningOptimizer.__init__, which calls type(); a subclass's hooks in between)
        if frame is None:
            return None
        wrapper = frame.f_locals.get("self")
        optimizer = getattr(wrapper, "_optimizer", None)
        if type(wrapper) is cls.__bases__[0] and type(optimizer) is cls.__bases__[1]:
            return optimizer
        frame = frame.f_back
    return None


def drop_kept_clips(optimizer: Any) -> None:
    """``optimizer.zero_grad()``: the clips kept for its next step clipped a gradient that no step takes (one process
    zeroes the clipped gradient too; a backward then writes a new one into the same tensors)."""
    optimizer.__dict__.pop("_kept_clips", None)


def unread_clip_error(optimizer: Any) -> ValueError | None:
    """The refusal of the clips kept (:class:`_KeptClips`) for an optimizer that never reads ``p.grad`` (EGN), which
    drops them; None where none was kept. Lightning clipped the gradients and the step went on unclipped, silently.
    A clip whose gradients were all zeroed since (:func:`_forget_zeroed`) clipped nothing the step could take."""
    kept = [(clip, grads) for clip, grads in optimizer.__dict__.pop("_kept_clips", ())
            if _forget_zeroed(grads)]
    if not kept:
        return None
    (clip_val, algorithm), _ = kept[0]
    name = type(optimizer).__name__
    return ValueError(f"self.clip_gradients(gradient_clip_val={clip_val!r}, gradient_clip_algorithm={algorithm!r}) "
                      f"with {name}: {name} builds its step from the model and the batch, never from the gradients, "
                      "so the clip would change nothing. Remove the clip_gradients call and bound the step with lr, "
                      "damping or line_search=True.")


def clip_difference(by_rank: list[float | None], ranks: list[int]) -> str:
    """``": ..."`` naming the first of ``ranks`` whose Lightning clip this step differs from rank 0's; '' if none."""
    for r in ranks:
        if by_rank[r] != by_rank[0]:
            return (f": Lightning's clip_gradients bounded this step's gradient norm by {by_rank[0]} on rank 0, "
                    f"{by_rank[r]} on rank {r} (None: no clip; a configure_gradient_clipping that decides per rank)")
    return ""
