"""EGN replays one random draw (dropout) in every forward of a step by rewinding torch's process-wide
generators (egn_rng.StepRng). Two EGN steps in two threads rewound them under each other: the step's trial
forwards drew other masks than its capture, silently. A step whose forward draws now raises, naming the cause;
a step whose forwards draw nothing leaves the generators (and other threads' random streams) alone."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import pytest
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


def _call_in_a_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    """``call()`` started in a thread of its own: (the thread, the exceptions it raised, once joined)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as e:  # noqa: BLE001 - checked by the caller
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def _step_in_a_thread(opt: EGN, x: torch.Tensor, y: torch.Tensor) -> tuple[threading.Thread, list[BaseException]]:
    """``opt.step`` started in a thread of its own: (the thread, the exceptions it raised, once joined)."""
    return _call_in_a_thread(lambda: opt.step(inputs=x, targets=y))


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


class _Plain(nn.Module):
    """Draws nothing (``attention``: through torch's fused attention kernel, tagged as random whatever its
    dropout); each forward records how many torch dispatch modes are active (EGN's watch of random ops is one)
    and calls ``handshake`` (another thread acts inside it) before going on (not a chain of layers: every
    forward of the step is this one)."""

    def __init__(self, attention: bool = False) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.a, self.b = nn.Linear(4, 8, dtype=torch.float64), nn.Linear(8, 2, dtype=torch.float64)
        self.attention = attention
        self.handshake: Callable[[], None] | None = None
        self.modes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.attention:  # 2 tokens of 4 features per sample: attention within each sample
            t = h.view(-1, 1, 2, 4)
            h = h + F.scaled_dot_product_attention(t, t, t).reshape(h.shape)
        self.modes.append(torch._C._len_torch_dispatch_stack())
        if self.handshake is not None:
            self.handshake()
        return self.b(h) + x[:, :2]


def _plain(attention: bool = False) -> tuple[_Plain, Callable[[], None]]:
    """:class:`_Plain` and one EGN step of it (line search and ρ: several forwards a step); made here, the
    steps draw nothing from torch's generator."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    model = _Plain(attention)
    opt = EGN(model, loss="mse", lr=1.0, damping=0.05, line_search=True, adaptive_damping=True)
    return model, lambda: opt.step(inputs=x, targets=y)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


class _Drawer:
    """Thread B, while entered: draws ``torch.rand(3)`` each time a forward of another thread calls
    :meth:`handshake` (the draw falls inside that forward); ``stream``: what it drew."""

    def __init__(self) -> None:
        self.inside, self.drawn, self.done = threading.Event(), threading.Event(), threading.Event()
        self.stream: list[torch.Tensor] = []
        self.thread = threading.Thread(target=self._run)

    def __enter__(self) -> _Drawer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(10)

    def handshake(self) -> None:  # (in the other thread's forward) B draws now, then that forward goes on
        self.inside.set()
        assert self.drawn.wait(10)
        self.drawn.clear()

    def _run(self) -> None:
        while not self.done.is_set():
            if self.inside.wait(0.01):
                self.inside.clear()
                self.stream.append(torch.rand(3, dtype=torch.float64))
                self.drawn.set()


@pytest.mark.parametrize("attention", [False, True])
def test_a_step_that_draws_nothing_leaves_another_threads_random_stream_alone(attention: bool) -> None:
    """Every step rewound torch's generator before each later forward and set it at its end: another thread's
    draws made during the step were drawn again (its stream repeated numbers, silently), though the model drew
    nothing. Here thread B draws once inside each of A's forwards. The first such draw counts as A's (a forward
    is watched only once the optimizer saw the generator move beside other threads); from then on B's stream is
    the generator's own, as if A did not run, and A's steps are those made alone. ``attention``: torch's fused
    attention kernel is tagged as random though it draws nothing without dropout: taken for a draw, every
    step replayed B's draws."""
    model, step = _plain(attention)
    for _ in range(4):
        step()
    alone = _params(model)
    model, step = _plain(attention)
    with _Drawer() as b:
        model.handshake = b.handshake
        step()  # (B's draw inside it is replayed, as if it were A's: A learns that another thread draws)
        torch.manual_seed(123)
        first = len(b.stream)
        for _ in range(3):
            step()
    torch.manual_seed(123)
    want = [torch.rand(3, dtype=torch.float64) for _ in b.stream[first:]]
    assert len(want) >= 6  # (3 steps of >= 2 forwards: the capture, a trial whose loss also gives ρ)
    assert all(torch.equal(s, w) for s, w in zip(b.stream[first:], want))
    assert all(torch.equal(g, a) for g, a in zip(_params(model), alone))


def test_a_step_that_draws_nothing_is_not_refused_for_another_threads_step_that_draws() -> None:
    """A step whose model draws nothing saw the generator move during its capture forward (another thread's
    step drew) and took it for its own draw: it was refused as overlapping a step that draws. Now (once it has
    seen another thread draw) it steps as alone, and the other thread's step (dropout) is the one it makes
    alone too."""
    def dropping() -> tuple[nn.Module, Callable[[], None]]:
        torch.manual_seed(1)
        model = _Dropping()
        x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
        opt = EGN(model, loss="mse", line_search=True)
        return model, lambda: opt.step(inputs=x, targets=y)

    model_a, step_a = _plain()
    step_a()
    step_a()
    alone_a = _params(model_a)
    model_b, step_b = dropping()
    torch.manual_seed(9)
    step_b()
    alone_b = _params(model_b)
    model_a, step_a = _plain()
    with _Drawer() as d:  # (its first step tried the chain trace first: the next one's first forward is the capture's)
        model_a.handshake = d.handshake
        step_a()  # another thread draws inside it: from now on A's forwards are watched
    model_b, step_b = dropping()
    inside, gate = threading.Event(), threading.Event()

    def handshake() -> None:  # (A's capture forward) B's whole step runs now, its draws too
        if not inside.is_set():
            inside.set()
            assert gate.wait(10)

    model_a.handshake = handshake
    torch.manual_seed(9)
    a, errors = _call_in_a_thread(step_a)
    try:
        assert inside.wait(10)
        step_b()
    finally:
        gate.set()
        a.join(10)
    assert not errors, errors
    assert all(torch.equal(g, w) for g, w in zip(_params(model_a), alone_a))
    assert all(torch.equal(g, w) for g, w in zip(_params(model_b), alone_b))


class _Idle:
    """Another Python thread that draws nothing (a logger's writer) while entered."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.done.wait, args=(30,))

    def __enter__(self) -> None:
        self.thread.start()

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(10)


def test_a_model_that_draws_nothing_is_not_watched_beside_an_idle_thread() -> None:
    """Lightning runs have other Python threads that draw nothing: each forward of every step ran under the
    watch of random ops (a Python call per torch op, a small MLP's forward 38 -> 145 µs). The generator never
    moves there: nothing is watched, and nothing touches the generator."""
    model, step = _plain()
    with _Idle():
        torch.manual_seed(7)
        state = torch.get_rng_state()
        for _ in range(3):
            step()
        assert torch.equal(torch.get_rng_state(), state)
    assert len(model.modes) >= 6 and not any(model.modes), model.modes


class _RecordingDropout(_Dropping):
    """:class:`_Dropping` that records how many torch dispatch modes each forward runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(torch._C._len_torch_dispatch_stack())
        return super().forward(x)


def test_a_model_that_draws_is_watched_once_beside_an_idle_thread_and_steps_as_alone() -> None:
    """A dropout model's capture forward ran under the watch at every step beside another thread, though its
    own draw decides alike watched or not. Its first forward beside the thread counts as drawing (the
    generator moved), one watched forward shows the draw is the model's, and no later one is watched; the
    steps and the generator are those of the steps made alone."""
    def run(beside: bool) -> tuple[_RecordingDropout, list[torch.Tensor], torch.Tensor]:
        torch.manual_seed(1)
        model = _RecordingDropout()
        x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
        opt = EGN(model, loss="mse", lr=1.0, damping=0.05, line_search=True, adaptive_damping=True)
        with _Idle() if beside else contextlib.nullcontext():
            torch.manual_seed(9)
            for _ in range(5):
                opt.step(inputs=x, targets=y)
        return model, _params(model), torch.get_rng_state()

    _, alone, state = run(False)
    model, params, after = run(True)
    assert all(torch.equal(g, a) for g, a in zip(params, alone))
    assert torch.equal(after, state)
    assert len(model.modes) >= 10 and sum(model.modes) <= 1, model.modes
