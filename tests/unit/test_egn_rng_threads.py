"""EGN replays one random draw (dropout) in every forward of a step by rewinding torch's process-wide
generators (egn_rng.StepRng). Two EGN steps in two threads rewound them under each other: the step's trial
forwards drew other masks than its capture, silently. A step whose forward draws now raises, naming the cause."""

from __future__ import annotations

import threading

import torch
from torch import nn
from torch.nn import functional as F

from lightning_soaa import EGN


class _Dropping(nn.Module):
    def __init__(self, gate: threading.Event | None = None, inside: threading.Event | None = None) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8, dtype=torch.float64), nn.Linear(8, 2, dtype=torch.float64)
        self.gate, self.inside = gate, inside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(torch.tanh(self.a(x)), 0.5)  # drawn in eval mode too
        if self.gate is not None and self.inside is not None and not self.inside.is_set():
            self.inside.set()  # the first (capture) forward waits for the other thread's whole step
            assert self.gate.wait(10)
        return self.b(h)


def _step_in_a_thread(opt: EGN, x: torch.Tensor, y: torch.Tensor) -> tuple[threading.Thread, list[BaseException]]:
    """``opt.step`` started in a thread of its own: (the thread, the exceptions it raised, once joined)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            opt.step(inputs=x, targets=y)
        except BaseException as e:  # noqa: BLE001 - checked by the caller
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def test_a_step_that_draws_refuses_another_threads_step_in_its_middle() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    gate, inside = threading.Event(), threading.Event()
    slow, other = _Dropping(gate, inside), _Dropping()
    opt_a, opt_b = EGN(slow, loss="mse", line_search=True), EGN(other, loss="mse", line_search=True)
    w0 = [p.detach().clone() for p in slow.parameters()]
    ta, errors = _step_in_a_thread(opt_a, x, y)
    assert inside.wait(10)
    opt_b.step(inputs=x, targets=y)  # a whole step of another EGN while A's capture forward runs
    gate.set()
    ta.join(10)
    assert len(errors) == 1 and isinstance(errors[0], (RuntimeError, ValueError)), errors  # (every rank's error)
    assert "another EGN step ran in another thread" in str(errors[0])
    assert all(torch.equal(a, b) for a, b in zip(w0, slow.parameters()))  # refused before any change
    opt_a.step(inputs=x, targets=y)  # alone again: steps


def test_steps_in_turn_in_two_threads_still_step() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    opt = EGN(_Dropping(), loss="mse", line_search=True)
    t = threading.Thread(target=lambda: opt.step(inputs=x, targets=y))
    t.start()
    t.join(10)
    opt.step(inputs=x, targets=y)  # one after the other: no error


class _LastWaits(nn.Module):
    """Draws in eval mode; its ``wait_at``-th forward (the step's last: the ρ forward) waits for ``gate``."""

    def __init__(self, wait_at: int, gate: threading.Event, inside: threading.Event) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b = nn.Linear(4, 16, dtype=torch.float64), nn.Linear(16, 2, dtype=torch.float64)
        self.calls, self.wait_at, self.gate, self.inside = 0, wait_at, gate, inside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.wait_at:
            self.inside.set()
            assert self.gate.wait(10)
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.5))


def test_another_threads_step_during_the_last_forward_is_refused() -> None:
    """The check ran only before a forward (at the rewind): another thread's whole step during the step's last
    forward (here the ρ forward) went unseen, and ρ was of another mask than the capture's (0.16 instead of
    0.92 alone, the damping raised instead of lowered), silently."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    gate, inside = threading.Event(), threading.Event()
    alone = _LastWaits(0, gate, inside)
    per_step = EGN(alone, loss="mse", lr=1.0, damping=0.05, adaptive_damping=True)
    per_step.step(inputs=x, targets=y)  # how many forwards a first step runs: wait in the last one
    slow = _LastWaits(alone.calls, gate, inside)
    opt_a = EGN(slow, loss="mse", lr=1.0, damping=0.05, adaptive_damping=True)
    opt_b = EGN(_LastWaits(0, gate, inside), loss="mse", adaptive_damping=True)
    w0 = [p.detach().clone() for p in slow.parameters()]
    ta, errors = _step_in_a_thread(opt_a, x, y)
    assert inside.wait(10)
    opt_b.step(inputs=x, targets=y)  # a whole EGN step of another model during A's last forward
    gate.set()
    ta.join(10)
    assert len(errors) == 1 and "another EGN step ran in another thread" in str(errors[0]), errors
    assert all(torch.equal(a, b) for a, b in zip(w0, slow.parameters()))  # the step's change undone
