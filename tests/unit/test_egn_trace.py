"""EGN's traced chain (``egn_trace``): a model that is not an ``nn.Sequential`` but whose forward runs its
Linear layers and activations one after the other takes the chain rule's back-signals, verified at every
step. Each case trains against the general capture (hooks and autograd) and must give the same parameters
bit for bit; the cases that are not chains must be recognised, fall back, and never be traced again."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_soaa.optim import egn as egn_module
from lightning_soaa.optim.egn import EGN

DT = torch.float64


class Wrapped(nn.Module):
    """The usual user model: a body and a head, ``forward`` = head(body(x)), with a twist per ``kind``."""

    def __init__(self, kind: str = "chain") -> None:
        super().__init__()
        self.kind = kind
        relu = nn.ReLU(inplace=kind == "inplace_relu")
        self.body = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Dropout(0.3), nn.Linear(7, 5), relu)
        self.head = nn.Linear(5, 3)
        self.norm = nn.LayerNorm(5, elementwise_affine=False)  # no parameters; called by "norm" only
        if kind == "act_last":
            self.squash = nn.Sigmoid()  # after the head: z is an activation's output
        if kind in ("unused", "shared"):
            self.spare = nn.Linear(5, 5)  # trained; never called ("unused": J is zero), or twice ("shared")

    def forward(self, x: Tensor) -> Tensor:
        k = self.kind
        if k == "flatten":  # preprocessing before the first module: irrelevant to J
            x = x.reshape(x.shape[0], 2, 3).flatten(1)
        h = self.body(x)
        if k == "scaled":
            h = h * 2.0
        elif k == "residual":
            h = h + self.body[3](self.body[1](self.body[0](x)))  # modules run twice, a sum
        elif k == "norm":
            h = self.norm(h)
        elif k == "branch" and x.shape[0] % 2:  # a chain on even batches only
            h = h * 1.0
        elif k == "shared":  # one Linear at two places of the chain (two positions of one site)
            h = self.spare(self.body[1](self.spare(h)))
        out: Tensor = self.head(input=h) if k == "keyword" else self.head(h)
        if k == "inplace_op":  # z changed after the head returned it (autograd does not mind: same J)
            out.add_(0.1)
        if k == "act_last":
            out = self.squash(out)
        return out * 1.0 if k == "post" else out


def _run(kind: str, loss: str, traced: bool, monkeypatch: pytest.MonkeyPatch, sizes: tuple[int, ...] = (8,) * 5,
         hook: Callable[[nn.Module], None] | None = None) -> tuple[list[Tensor], EGN]:
    torch.manual_seed(0)
    model = Wrapped(kind).double()
    if hook is not None:
        hook(model)
    with monkeypatch.context() as m:
        if not traced:
            m.setattr(egn_module, "plan_trace", lambda *a: None)
        opt = EGN(model, loss=loss, lr=0.7, damping=0.5, momentum=0.5, line_search=True, adaptive_damping=True)
    assert (opt._trace is not None) == traced
    g = torch.Generator().manual_seed(1)
    out = []
    for b in sizes:
        x = torch.randn(b, 6, generator=g, dtype=DT)
        if loss == "cross_entropy":
            y = torch.randint(0, 3, (b,), generator=g)
        else:  # bce: targets in [0, 1]
            y = torch.randn(b, 3, generator=g, dtype=DT) if loss == "mse" else torch.rand(b, 3, generator=g, dtype=DT)
        opt.step(inputs=x, targets=y)
        out.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return out, opt


def _assert_same(got: list[Tensor], want: list[Tensor]) -> None:
    for t, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"step {t}: {(a - b).abs().max().item()}"


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "bce"])
@pytest.mark.parametrize("kind", ["chain", "flatten", "act_last"])
def test_a_chain_behind_a_custom_forward_is_traced_with_the_general_paths_bits(
        kind: str, loss: str, monkeypatch: pytest.MonkeyPatch) -> None:
    traced, opt = _run(kind, loss, True, monkeypatch)
    assert opt._trace is not None  # stayed traced at every step
    general, _ = _run(kind, loss, False, monkeypatch)
    _assert_same(traced, general)


@pytest.mark.parametrize("kind", ["scaled", "residual", "inplace_op", "norm", "post", "inplace_relu", "branch",
                                  "unused", "shared", "keyword"])
def test_a_forward_that_is_not_a_chain_falls_back_for_good(kind: str, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    sizes = (8, 8, 7, 8, 8) if kind == "branch" else (8,) * 5  # "branch": a chain until the odd batch
    with caplog.at_level("INFO", logger="lightning_soaa.optim.egn"):
        traced, opt = _run(kind, "cross_entropy", True, monkeypatch, sizes=sizes)
    assert opt._trace is None
    assert sum("is not a chain" in r.getMessage() for r in caplog.records) == 1
    general, _ = _run(kind, "cross_entropy", False, monkeypatch, sizes=sizes)
    _assert_same(traced, general)


def _output_hook(model: nn.Module) -> None:
    model.body[1].register_forward_hook(lambda m, i, o: o * 0.5)  # replaces the Tanh's output


def _inplace_hook(model: nn.Module) -> None:
    model.body[0].register_forward_hook(lambda m, i, o: o.mul_(0.5))  # changes a Linear's output in place


def _input_hook(model: nn.Module) -> None:
    model.head.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))  # replaces the head's input


@pytest.mark.parametrize("hook", [_output_hook, _inplace_hook, _input_hook])
def test_user_hooks_that_change_the_forward_are_seen(hook: Callable[[nn.Module], None],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    traced, opt = _run("chain", "cross_entropy", True, monkeypatch, hook=hook)
    assert opt._trace is None
    general, _ = _run("chain", "cross_entropy", False, monkeypatch, hook=hook)
    _assert_same(traced, general)


def test_a_frozen_layer_and_a_failing_forward() -> None:
    """A frozen Linear is part of the chain but no site; an error in the forward is reported as before."""
    torch.manual_seed(0)
    model = Wrapped().double()
    model.body[0].requires_grad_(False)
    opt = EGN(model, loss="cross_entropy", lr=0.5)
    opt.step(inputs=torch.randn(8, 6, dtype=DT), targets=torch.randint(0, 3, (8,)))
    assert opt._trace is not None
    with pytest.raises(ValueError, match="the model's forward failed: RuntimeError"):
        opt.step(inputs=torch.randn(8, 5, dtype=DT), targets=torch.randint(0, 3, (8,)))


def test_an_inference_tensor_input_is_traced() -> None:
    """Data made under inference mode (no version counter) does not break the trace or the forward."""
    torch.manual_seed(0)
    model = Wrapped().double()
    opt = EGN(model, loss="cross_entropy", lr=0.5)
    with torch.inference_mode():
        x, y = torch.randn(8, 6, dtype=DT), torch.randint(0, 3, (8,))
    opt.step(inputs=x, targets=y)
    assert opt._trace is not None


def test_a_dropout_left_in_training_mode_is_not_traced_as_the_identity() -> None:
    """A model whose train() does not reach its Dropout keeps it active inside the step: the trace must
    not take it for the identity."""
    torch.manual_seed(0)
    model = Wrapped().double()
    opt = EGN(model, loss="cross_entropy", lr=0.5)
    object.__setattr__(model, "train", lambda mode=True: model)  # eval() no longer reaches the Dropout
    model.body[2].training = True
    opt.step(inputs=torch.randn(8, 6, dtype=DT), targets=torch.randint(0, 3, (8,)))
    assert opt._trace is None


def _train_calls(step: Callable[[], None]) -> int:
    """Calls of ``nn.Module.train`` (the code object itself: a patched class attribute would still be
    seen) while ``step`` runs."""
    calls = 0

    def prof(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call" and frame.f_code is nn.Module.train.__code__:
            calls += 1

    before = sys.getprofile()  # a profiler the runner set (put back, not dropped)
    sys.setprofile(prof)
    try:
        step()
    finally:
        sys.setprofile(before)
    return calls


class _OwnTrain(Wrapped):
    """A model whose ``train`` does more than set the flags (here: counts its switches)."""

    def __init__(self) -> None:
        super().__init__()
        self.switches = 0

    def train(self, mode: bool = True) -> _OwnTrain:
        self.switches += 1
        return super().train(mode)


def test_a_plain_traced_model_is_switched_to_eval_mode_by_its_flags_alone() -> None:
    """No class of the model extends ``train``, ``eval`` or ``__setattr__``: the step only sets the modules'
    ``training`` flags (no ``Module.train`` recursion) and puts them back; a model whose class (or instance)
    extends ``train`` still has it called, every step."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 6, dtype=DT), torch.randint(0, 3, (8,))
    model = Wrapped().double()
    model.body[1].training = False  # a mixed state comes back as it was
    modes = [m.training for m in model.modules()]
    opt = EGN(model, loss="cross_entropy", lr=0.5)
    assert opt._trace is not None
    assert _train_calls(lambda: opt.step(inputs=x, targets=y)) == 0
    assert [m.training for m in model.modules()] == modes and opt._trace is not None
    own = _OwnTrain().double()
    opt = EGN(own, loss="cross_entropy", lr=0.5)
    assert _train_calls(lambda: opt.step(inputs=x, targets=y)) > 0 and own.switches == 1
    patched = Wrapped().double()
    opt = EGN(patched, loss="cross_entropy", lr=0.5)
    seen: list[bool] = []
    object.__setattr__(patched.body, "train", lambda mode=True: seen.append(mode) or patched.body)
    opt.step(inputs=x, targets=y)
    assert seen == [False]  # the instance's own train() ran (and stopped the recursion there)
    assert all(m.training for m in patched.modules())
