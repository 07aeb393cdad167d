"""One random draw for all of EGN's forwards of one step.

EGN runs the model several times per step: the capture forward (Jacobians, Gram factors, L_b(w)), one
forward per line-search trial (L_b(w + αd)), and the one whose loss feeds ρ. Eval mode turns off
dropout *modules*, but not randomness a forward draws itself: ``F.dropout(h, p)`` (whose ``training``
defaults to True), noise injection ``x + σ·randn_like(x)``. Each of those forwards would then draw a
different mask, and the Armijo test and ρ would compare the losses of different functions (spec §2.7: J
and the line-search forwards must use the same mode and mask). :class:`StepRng` rewinds the global
generators to the state the capture forward started from before every later forward, and at the end
of the step leaves them where the capture forward left them: the caller's random stream advances as if
the model had been run once.

Covered: torch's CPU generator and the default generator of every accelerator device given (the
devices of the parameters and inputs). A ``torch.Generator`` the model keeps and passes to its own
random calls is not rewound.

These generators are process-wide: two EGN steps in two threads rewind them under each other, and a model
that draws (dropout) then gets other masks in its later forwards than in its capture, silently. A step whose
forward draws raises instead where another thread's EGN step began or ended since it started
(:class:`_Overlap`); a step that draws nothing is unaffected by the rewinds and runs on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["StepRng"]


def _device_generator(device: torch.device) -> tuple[Callable[[], Tensor], Callable[[Tensor], object]] | None:
    """(get_state, set_state) of ``device``'s default generator through its torch backend module
    (``torch.cuda``, ``torch.xpu``, ...), or None where that backend has no such functions."""
    mod: Any = getattr(torch, device.type, None)
    get, put = getattr(mod, "get_rng_state", None), getattr(mod, "set_rng_state", None)
    if get is None or put is None:
        return None
    index = device.index if device.index is not None else mod.current_device()

    def get_state() -> Tensor:
        state: Tensor = get(index)
        return state

    def set_state(state: Tensor) -> None:
        put(state, index)

    return get_state, set_state


class _Overlap:
    """A count of EGN steps' starts and ends in this process: a step that sees it moved by more than its own
    start overlapped another thread's step."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events = 0

    def tick(self) -> int:
        with self.lock:
            self.events += 1
            return self.events


_OVERLAP = _Overlap()
_CONCURRENT = (
    "EGN: another EGN step ran in another thread during this one, and torch's random generator moved during this "
    "step's forward (its model draws random numbers: dropout, noise; or another thread drew meanwhile, which this "
    "step cannot tell apart). EGN replays the step's draw in every forward by rewinding torch's process-wide "
    "generators, which the other step rewinds too: the line search and rho would compare losses under other masks "
    "than the Jacobian's. Step EGN optimizers of models that draw random numbers in one thread at a time (e.g. "
    "under one lock), or in separate processes.")


class StepRng:
    """The generators' states at the start of one step's first forward (:meth:`rewind` goes back there)
    and after it (:meth:`mark` records it, :meth:`finish` leaves the generators there). The CPU
    generator's state is a 5 KB host tensor: taking it costs ~1 µs and setting it ~0.3 µs."""

    def __init__(self, devices: Iterable[torch.device]) -> None:
        self._cpu = torch.default_generator
        # accelerator generators: (get_state, set_state) per device (none for a CPU model: no per-step work)
        self._devices: list[tuple[Callable[[], Tensor], Callable[[Tensor], object]]] = []
        accelerators = {d for d in devices if d.type not in ("cpu", "meta")}
        for dev in sorted(accelerators, key=str) if accelerators else ():
            gen = _device_generator(dev)
            if gen is not None:
                self._devices.append(gen)
        self._start = self._states()
        self._end: tuple[Tensor, list[Tensor]] | None = None
        self._seen = _OVERLAP.tick()
        self._drew = False

    def _states(self) -> tuple[Tensor, list[Tensor]]:
        return self._cpu.get_state(), [get() for get, _ in self._devices]

    def _set(self, states: tuple[Tensor, list[Tensor]]) -> None:
        self._cpu.set_state(states[0])
        for (_, put), state in zip(self._devices, states[1]):
            put(state)

    def mark(self) -> None:
        """After the first forward: where the generators are left at the end of the step."""
        self._end = self._states()
        self._drew = not torch.equal(self._end[0], self._start[0]) or any(
            not torch.equal(a, b) for a, b in zip(self._end[1], self._start[1]))
        self.check()

    def check(self) -> None:
        """Raise if this step's forward draws and another thread's EGN step began or ended since this one
        began: after each forward too (its rewinds may have come during it, also in the step's last one)."""
        if self._drew and _OVERLAP.events != self._seen:
            raise RuntimeError(_CONCURRENT)

    def rewind(self) -> None:
        """Before a later forward: the first forward's draw again."""
        self.check()
        self._set(self._start)

    def finish(self) -> None:
        """At the end of the step: as if the model had been run once (nothing, if it never ran)."""
        _OVERLAP.tick()
        if self._end is not None:
            self._set(self._end)
