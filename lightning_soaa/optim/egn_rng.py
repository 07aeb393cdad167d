"""One random draw for all of EGN's forwards of one step.

EGN runs the model several times per step: the capture forward (Jacobians, Gram factors, L_b(w)), one
forward per line-search trial (L_b(w + αd)), and the one whose loss feeds ρ. Eval mode turns off
dropout *modules*, but not randomness a forward draws itself: ``F.dropout(h, p)`` (whose ``training``
defaults to True), noise injection ``x + σ·randn_like(x)``. Each of those forwards would then draw a
different mask, and the Armijo test and ρ would compare the losses of different functions (spec §2.7: J
and the line-search forwards must use the same mode and mask). :class:`StepRng` brackets every forward of
the step. Once one of them has drawn, it rewinds the global generators to the state that forward started
from before every later forward, and at the end of the step leaves them where the capture forward left
them: the caller's random stream advances as if the model had been run once. Until a forward draws, the
generators are not touched: a step whose forwards draw nothing leaves them alone.

Covered: torch's CPU generator and the default generator of every accelerator device given (the
devices of the parameters and inputs). A ``torch.Generator`` the model keeps and passes to its own
random calls is not rewound.

These generators are process-wide, so "this forward drew" is judged in the forward's own thread. With no
other Python thread in the process, a generator that moved during the forward was moved by it (a state
comparison). Otherwise another thread may have drawn meanwhile: once the optimizer has seen that (a forward
of its moved the generators beside other threads, and nothing showed its model draws: :class:`DrawHistory`)
its forwards run under :class:`_DrawWatch`, a torch dispatch mode of their thread alone that sees every random
op they run (torch's ``nondeterministic_seeded`` ops; one given a generator, and ops of other namespaces, e.g.
a custom kernel or a higher-order op's body, count too), and a forward drew where it ran one and the
generators moved. A watched step whose forwards draw nothing thus neither rewinds another thread's draws nor
is refused for them. An unwatched forward that moved them counts as drawing, as before the watch: the first
such forward (and any while the model is known to draw) replays another thread's draws made meanwhile.

A step whose forward draws cannot share the generators: two EGN steps in two threads rewind them under each
other, and a model that draws (dropout) then gets other masks in its later forwards than in its capture,
silently. It raises instead where another thread's EGN step that draws began to rewind or ended since it
started (:class:`_Overlap`); draws of a thread that is not an EGN step go unseen there.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["DrawHistory", "StepRng"]


def _device_generator(device: torch.device) -> tuple[Callable[[], Tensor], Callable[[Tensor], object]] | None:
    """(get_state, set_state) of ``device``'s default generator through its torch backend module
    (``torch.cuda``, ``torch.xpu``, ...), or None where that backend has no such functions."""
    mod: Any = getattr(torch, device.type, None)
    get, put = getattr(mod, "get_rng_state", None), getattr(mod, "set_rng_state", None)
    if get is None or put is None:
        return None
    current = getattr(mod, "current_device", None)  # (torch.mps has one generator and no current_device)
    index = device.index if device.index is not None else (current() if current is not None else 0)

    def get_state() -> Tensor:
        state: Tensor = get(index)
        return state

    def set_state(state: Tensor) -> None:
        put(state, index)

    return get_state, set_state


class _Overlap:
    """A count of the events of EGN steps that rewind the generators in this process (a forward of theirs drew;
    their end): a step that draws and sees it moved by more than its own events overlapped another thread's
    such step. Steps that draw nothing leave it (and the generators) alone."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events = 0

    def tick(self) -> int:
        with self.lock:
            self.events += 1
            return self.events


_OVERLAP = _Overlap()
_CONCURRENT = (
    "EGN: another EGN step ran in another thread during this one, and this step's model draws random numbers in "
    "its forward (dropout, noise). EGN replays the step's draw in every forward by rewinding torch's process-wide "
    "generators, which the other step rewinds too: the line search and rho would compare losses under other masks "
    "than the Jacobian's. Step EGN optimizers of models that draw random numbers in one thread at a time (e.g. "
    "under one lock), or in separate processes.")

_SEEDED = torch.Tag.nondeterministic_seeded
_TORCH_NAMESPACES = frozenset({"aten", "prims"})  # their random ops carry the tag: no other op of theirs draws
# what an op tells of a draw: 0 nothing, 1 a draw from the global generators (no generator passed), 2 a draw
# that may be from them (a generator passed: torch.default_generator passed arrives as another object) or an
# op of another namespace (a custom kernel may draw without the tag); per op, read once
_KIND: dict[Any, int] = {}
# the seeded ops that draw only at a nonzero dropout argument (attention kernels, RNNs: tagged whatever it is;
# a model's eval-mode attention runs them at 0): that argument's position and default, per op
_DROPOUT: dict[Any, tuple[int, Any]] = {}


def _kind(func: Any) -> int:
    """What ``func`` tells of a draw (:data:`_KIND`); a seeded op's dropout argument goes to :data:`_DROPOUT`."""
    if _SEEDED in getattr(func, "tags", ()):
        schema = getattr(func, "_schema", None)
        for i, arg in enumerate(schema.arguments if schema is not None else ()):
            if arg.name in ("dropout_p", "dropout") and not arg.kwarg_only and str(arg.type) == "float":
                _DROPOUT[func] = (i, arg.default_value)
        return 1
    # (a higher-order op, torch.cond or flex_attention, runs its body past the watch: namespace "higher_order")
    return 0 if getattr(func, "namespace", None) in _TORCH_NAMESPACES else 2


def _draws(func: Any, args: Any, kwargs: dict[str, Any]) -> bool:
    """Whether a seeded op called so draws from the global generators."""
    if kwargs.get("generator") is not None:
        return False
    dropout = _DROPOUT.get(func)
    if dropout is None:
        return True
    i, default = dropout
    p = args[i] if len(args) > i else default  # (torch passes the arguments before the keyword-only ones by position)
    return not (isinstance(p, (int, float)) and p == 0)


class _DrawWatch(TorchDispatchMode):  # type: ignore[no-untyped-call]  # (torch's class is untyped)
    """Sees the random ops of a forward in its own thread (the dispatch mode stack is thread-local): ``drew``
    where one drew from the global generators, ``maybe`` where one may have. Each torch op of the forward
    passes through a Python call (~10 µs): it watches only where :class:`DrawHistory` says it can tell
    something."""

    supports_higher_order_operators = True  # (torch.cond, flex_attention: without it they raise under the mode)

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """Off while torch.compile compiles (eager flex_attention compiles itself, refused under other modes),
        on for what it compiled."""
        return True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.drew = False
        self.maybe = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if not self.drew:
            kind = _KIND.get(func)
            if kind is None:
                kind = _KIND[func] = _kind(func)
            if kind == 1 and _draws(func, args, kwargs):
                self.drew = True
            elif kind == 2 or kind == 1 and kwargs.get("generator") is not None:
                self.maybe = True
        return func(*args, **kwargs)


def _other_threads() -> bool:
    """Whether another Python thread exists (each one that runs Python has a frame there; threads that never
    entered Python are not seen: their draws during a step that draws nothing count as the step's)."""
    return len(sys._current_frames()) > 1


def _equal(a: Tensor, b: Tensor) -> bool:
    """Whether two generator states are equal: host byte tensors (every backend's here) by their bytes, ~5 µs
    for the CPU generator's 5 KB where ``torch.equal`` takes ~11 µs (a forward before any draw compares once)."""
    if a.device.type == "cpu" and b.device.type == "cpu":
        return bool(a.numpy().tobytes() == b.numpy().tobytes())
    return torch.equal(a, b)


class DrawHistory:
    """What one optimizer's forwards showed of the generators, kept across its steps: whether its next forward
    beside other Python threads runs under :class:`_DrawWatch`. The watch costs every torch op of the forward a
    Python call (~10 µs; a 2-layer MLP's forward 38 -> 145 µs), and Lightning runs have other threads (a
    logger's writer) that draw nothing: a forward is watched only where the watch can tell something.

    ``QUIET``: no movement seen that the watch would settle; unwatched, a forward that moves the generators
    beside other threads counts as drawing (its draw is replayed, as if it were the model's) and the forwards
    after it are watched. ``WATCH``: such a movement was seen (or a watched forward saw another thread draw):
    watched while other threads exist. ``OWN``: the model draws (a watched forward ran a random op and the
    generators moved, or they moved with no other thread): unwatched, a movement is its draw, as the watch
    would also say while the model draws; back to ``QUIET`` at the first forward that moves nothing."""

    QUIET, WATCH, OWN = 0, 1, 2

    def __init__(self) -> None:
        self.seen = DrawHistory.QUIET

    def watch(self) -> bool:
        """Whether the forward starting now runs under the watch."""
        return self.seen == DrawHistory.WATCH and _other_threads()

    def judge(self, moved: bool, watch: _DrawWatch | None, device_moved: bool = False) -> bool:
        """Whether an unreplayed forward drew (``moved``: the generators moved during it; ``device_moved``: an
        accelerator's did), and what it tells of the model (:attr:`seen`)."""
        if watch is not None:  # its own random op (or one that may be: a custom kernel) and the movement
            # (a seeded op that drew nothing: flash attention). An accelerator's generator that moved counts
            # as the model's draw even where the watch saw no random op: a replayed CUDA graph draws past the
            # dispatch mode (not measured: no GPU here), and silently different masks are worse than replaying
            # another thread's rare accelerator draws, which is what every step did before the watch.
            drew = moved and (watch.drew or watch.maybe or device_moved)
            self.seen = DrawHistory.OWN if drew else DrawHistory.WATCH
            return drew
        if moved:  # its draw, or another thread's: replayed, as before the watch existed
            own = self.seen == DrawHistory.OWN or not _other_threads()
            self.seen = DrawHistory.OWN if own else DrawHistory.WATCH
        elif self.seen == DrawHistory.OWN:
            self.seen = DrawHistory.QUIET
        return moved


class StepRng:
    """Bracket of each forward of one step (``with rng:``). The generators' states at the start of the first
    forward that drew (every later forward starts there again) and where the step leaves them (:meth:`finish`):
    after the capture forward (:meth:`mark`), or, when only a later forward drew, the state before it. The
    CPU generator's state is a 5 KB host tensor: taking it costs ~3 µs and setting it ~0.4 µs; a forward
    before any draw takes it twice. ``history``: the optimizer's, across its steps (a new one: this step's
    alone)."""

    def __init__(self, devices: Iterable[torch.device], history: DrawHistory | None = None) -> None:
        self._cpu = torch.default_generator
        # accelerator generators: (get_state, set_state) per device (none for a CPU model: no per-step work)
        self._devices: list[tuple[Callable[[], Tensor], Callable[[Tensor], object]]] = []
        accelerators = {d for d in devices if d.type not in ("cpu", "meta")}
        for dev in sorted(accelerators, key=str) if accelerators else ():
            gen = _device_generator(dev)
            if gen is not None:
                self._devices.append(gen)
        self._history = history if history is not None else DrawHistory()
        self._replay: tuple[Tensor, list[Tensor]] | None = None  # where a forward drew from (None: none drew)
        self._end: tuple[Tensor, list[Tensor]] | None = None
        # the start of an unreplayed forward that raised (its draws are not judged): where a rewind goes when
        # no forward finished drawing (an out of memory in the capture forward after its dropout drew)
        self._raised: tuple[Tensor, list[Tensor]] | None = None
        self._marked = False
        self._seen = _OVERLAP.events  # the count this step expects: moved by its own events only
        self._before: tuple[Tensor, list[Tensor]] | None = None  # the running forward's start, before any draw
        self._watch: _DrawWatch | None = None

    def _states(self) -> tuple[Tensor, list[Tensor]]:
        return self._cpu.get_state(), [get() for get, _ in self._devices]

    def _set(self, states: tuple[Tensor, list[Tensor]]) -> None:
        self._cpu.set_state(states[0])
        for (_, put), state in zip(self._devices, states[1]):
            put(state)

    def __enter__(self) -> StepRng:
        """Before a forward: the first draw's start again, once a forward drew; else where they are now (and
        the watch of this thread's random ops, where :class:`DrawHistory` says it can tell something)."""
        if self._replay is not None:
            self.check()
            self._set(self._replay)
            self._before = None
            return self
        self._before = self._states()
        if self._history.watch():
            self._watch = _DrawWatch()
            self._watch.__enter__()  # type: ignore[no-untyped-call]
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        before, self._before = self._before, None
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.__exit__(kind, exc, tb)  # type: ignore[no-untyped-call]
        if kind is not None:
            if before is not None and self._raised is None:
                self._raised = before
            return
        if before is None:  # a replayed forward: another thread's step during it (the last one has no rewind)
            self.check()
            return
        now = self._states()
        device_moved = not all(_equal(x, y) for x, y in zip(now[1], before[1]))
        if self._history.judge(device_moved or not _equal(now[0], before[0]), watch, device_moved):
            self._replay = before
            if self._marked:  # only a later forward drew: the capture's stream did not advance
                self._end = before
            self._own(_OVERLAP.tick())
            self.check()

    def _own(self, count: int) -> None:
        """One event of this step's, ``count`` the count it made: another step's before it stays seen."""
        self._seen = count if count == self._seen + 1 else -1

    def mark(self) -> None:
        """After the capture forward: where the generators are left at the end of the step, if it drew."""
        self._marked = True
        if self._replay is not None:
            self._end = self._states()

    def check(self) -> None:
        """Raise if a forward of this step drew and another thread's EGN step began or ended since this one
        began: after each forward too (its rewinds may have come during it, also in the step's last one)."""
        if self._replay is not None and _OVERLAP.events != self._seen:
            raise RuntimeError(_CONCURRENT)

    def finish(self, rewind: bool = False) -> None:
        """At the end of the step: as if the model had been run once (nothing, if no forward drew); ``rewind``:
        as if it had not been run (a step that raised and put back what it changed: the first draw's start)."""
        start = self._replay if self._replay is not None else self._raised if rewind else None
        if start is None:
            return
        self._own(_OVERLAP.tick())
        if rewind:
            self._set(start)
        elif self._end is not None:
            self._set(self._end)
