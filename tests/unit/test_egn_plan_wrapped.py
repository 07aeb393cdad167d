"""EGN's step plan for a model that wraps its MLP (``egn_wrapped``: a module whose forward runs its Sequential /
Linear children one after the other on the input): such models take the plan with the general path's bits, and a
wrapper whose forward does anything else (preprocess, postprocess, two calls of the child, a branch taken later,
random draws, an in-place edit, a hook added later) never takes a wrong plan: it trains as the general path does,
and the plan is dropped at its first miss."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812 - torch's own alias

from lightning_soaa.lightning.demo import DigitsMLP
from lightning_soaa.optim.egn import EGN
from tests.unit.test_egn_plan import _counting, _general_only, _same_state

KW = dict(lr=1.0, damping=0.5, momentum=0.3, line_search=True, adaptive_damping=True)


class Wrapper(nn.Module):
    """``forward(x) = self.net(x)`` unless ``how`` says otherwise (the variants below)."""

    def __init__(self, how: str = "plain", d_out: int = 3) -> None:
        super().__init__()
        self.how = how
        self.net = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Dropout(0.2), nn.Linear(9, 6), nn.Tanh(),
                                 nn.Linear(6, d_out))
        self.drop = nn.Dropout(0.5)  # (off the chain: the identity in the step's eval mode)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        how, net = self.how, self.net
        self.calls += 1
        if how == "preprocess":
            return net(x * 0.5)
        if how == "postprocess":
            return net(x) * 2.0
        if how == "twice":
            return net(net(x))
        if how == "branch":  # a later batch takes the other branch
            return net(x) * 0.5 if x[:, 0].mean() > 1.0 else net(x)
        if how == "dropout_train":
            return net(F.dropout(x, 0.3, training=True))
        if how == "draws":  # the output is the chain's, but the forward moves the generator
            torch.rand(())
            return net(x)
        if how == "in_place":
            z = net(x)
            return z.mul_(2.0)
        if how == "train_inside":  # its Dropout draws
            self.train()
            return net(x)
        if how == "train_branch":
            return net(x) * 3.0 if self.training else net(self.drop(x))
        if how == "draws_kept":  # the output is the chain's; what the forward drew is kept on the model
            self.drawn = torch.rand(4)
            return net(x)
        if how == "other_thread" and self.calls % 2 == 0:  # (a line-search forward) another thread draws
            self.helper.draw()
        if how == "inference":  # the chain, in inference mode (the general path trains it)
            with torch.inference_mode():
                return net(x)
        if how == "autocast":  # the chain's calls, each on the one before's output, in bfloat16
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return net(x)
        return net(x)


def _wrapper(how: str, dtype: torch.dtype = torch.float32, d_out: int = 3) -> Wrapper:
    torch.manual_seed(0)
    return Wrapper(how, d_out).to(dtype)


def _batch(b: int, step: int, dtype: torch.dtype, shift: float = 0.0, c: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(200 + step)
    x = torch.randn(b, 6, generator=g, dtype=dtype)
    x[:, 0] += shift
    return x, torch.randint(0, c, (b,), generator=g)


def _both(opt: EGN, ref: EGN, x: Tensor, y: Tensor) -> None:
    """One step of each from the same generator state; the same loss and the generator left in the same state."""
    torch.manual_seed(7)
    got = opt.step(inputs=x, targets=y)
    after = torch.get_rng_state()
    torch.manual_seed(7)
    want = ref.step(inputs=x, targets=y)
    assert torch.equal(got, want)
    assert torch.equal(after, torch.get_rng_state())


@pytest.mark.parametrize("case", ["digits", "one_child", "float64", "mse"])
def test_a_wrapped_mlp_takes_the_plan_with_the_general_paths_bits(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    dtype = torch.float64 if case == "float64" else torch.float32
    loss = "mse" if case == "mse" else "cross_entropy"

    def make() -> nn.Module:
        torch.manual_seed(0)
        if case == "digits":  # the report's model: self.head(self.body(x)), a LightningModule
            return DigitsMLP(hidden=(16, 12), in_features=6, num_classes=3).to(dtype)
        return _wrapper("plain", dtype)

    ma, mb = make(), make()
    ma.train()
    opt, ref = EGN(ma, loss=loss, **KW), _general_only(EGN(mb, loss=loss, **KW))
    with _counting(monkeypatch) as counts:
        for t in range(6):
            x, y = _batch(16, t, dtype)
            if loss == "mse":
                y = torch.tanh(x[:, :3] - x[:, 3:]).contiguous()
            _both(opt, ref, x, y)
            _same_state(opt, ref, ma, mb)
    assert counts == [6, 0]  # every step planned
    assert all(m.training for m in ma.modules())  # the modes put back after each step


def _chain_params(how: str, steps: int, shift: float) -> list[Tensor]:
    """The parameters a bare Sequential of the same layers reaches: what a plan that trusted the wrapper's
    structure would give (the variants must differ from it, or their test could not catch such a plan)."""
    model = _wrapper(how).net
    opt = EGN(model, loss="cross_entropy", **KW)
    for t in range(steps):
        x, y = _batch(16, t, torch.float32, shift if t >= 3 else 0.0)
        torch.manual_seed(7)
        opt.step(inputs=x, targets=y)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("how", ["preprocess", "postprocess", "twice", "branch", "dropout_train", "draws", "in_place",
                                 "train_inside", "hook_later", "pre_hook_later"])
def test_a_wrapper_whose_forward_is_not_the_chain_trains_as_the_general_path(
        how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    shift = 3.0 if how == "branch" else 0.0
    c = 6 if how == "twice" else 3  # (twice: the child maps 6 -> 6)
    ma, mb = _wrapper(how, d_out=c), _wrapper(how, d_out=c)
    opt, ref = EGN(ma, loss="cross_entropy", **KW), _general_only(EGN(mb, loss="cross_entropy", **KW))
    with _counting(monkeypatch) as counts:
        for t in range(6):
            if t == 3 and how.endswith("hook_later"):
                for m in (ma, mb):
                    if how == "hook_later":
                        m.register_forward_hook(lambda mod, args, out: out * 1.5)
                    else:
                        m.net.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))
            x, y = _batch(16, t, torch.float32, shift if t >= 3 else 0.0, c=c)
            _both(opt, ref, x, y)
            _same_state(opt, ref, ma, mb)
    hooked = how.endswith("hook_later")  # (declined before a forward ran)
    # (the steps before the change planned; a forward that draws but returns the chain's output, every step)
    assert counts[0] == (6 if how == "draws" else 3 if how == "branch" or hooked else 0)
    assert ma.calls == mb.calls + (not hooked and how != "draws")  # (the first declined step's forward, once more)
    if how not in ("twice", "draws"):  # a plan trusting the structure would have trained the bare chain
        assert not all(map(torch.equal, ma.parameters(), _chain_params(how, 6, shift)))


def test_a_wrapper_branching_on_its_mode_steps_in_eval_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward sees eval mode, as the general path runs it (its Dropout module the identity), and the modes
    are put back after the step."""
    ma, mb = _wrapper("train_branch"), _wrapper("train_branch")
    ma.train()
    mb.train()
    opt, ref = EGN(ma, loss="cross_entropy", **KW), _general_only(EGN(mb, loss="cross_entropy", **KW))
    with _counting(monkeypatch) as counts:
        for t in range(4):
            _both(opt, ref, *_batch(16, t, torch.float32))
            _same_state(opt, ref, ma, mb)
    assert counts == [4, 0] and ma.training and ma.drop.training


def test_a_wrapper_keeping_its_draws_keeps_the_general_paths_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward that draws (outside its output) and keeps the draw: the general path rewinds the generator before
    each forward of the step, so each draws the capture forward's numbers; the plan's line-search forwards must
    draw those too (they drew on, leaving other numbers on the model after the step)."""
    ma, mb = _wrapper("draws_kept"), _wrapper("draws_kept")
    opt, ref = EGN(ma, loss="cross_entropy", **KW), _general_only(EGN(mb, loss="cross_entropy", **KW))
    with _counting(monkeypatch) as counts:
        for t in range(4):
            _both(opt, ref, *_batch(16, t, torch.float32))
            _same_state(opt, ref, ma, mb)
            assert torch.equal(ma.drawn, mb.drawn), t
    assert counts == [4, 0] and ma.calls == mb.calls


class _Drawer:
    """A thread that draws from torch's generator when asked (a data-augmentation thread, say), alive throughout."""

    def __init__(self) -> None:
        self.ask, self.done, self.stop = threading.Event(), threading.Event(), threading.Event()
        self.drawn: list[Tensor] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while self.ask.wait(10) and not self.stop.is_set():
            self.ask.clear()
            self.drawn.append(torch.rand(4))
            self.done.set()

    def draw(self) -> None:
        self.done.clear()
        self.ask.set()
        assert self.done.wait(10)

    def close(self) -> None:
        self.stop.set()
        self.ask.set()
        self.thread.join(10)


def test_another_threads_draws_during_a_planned_step_are_left_as_the_general_path_leaves_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward draws nothing; another thread draws while it runs. The general path judges its forwards'
    draws (egn_rng.StepRng, watching them once it sees the generator move beside other threads) and leaves that
    thread's draws alone; the plan put the generator back at every step's end, so that thread drew the same
    numbers again and again."""
    ma, mb = _wrapper("other_thread"), _wrapper("other_thread")
    ma.helper, mb.helper = _Drawer(), _Drawer()
    opt, ref = EGN(ma, loss="cross_entropy", **KW), _general_only(EGN(mb, loss="cross_entropy", **KW))
    try:
        with _counting(monkeypatch) as counts:
            for t in range(5):
                _both(opt, ref, *_batch(16, t, torch.float32))
                _same_state(opt, ref, ma, mb)
                assert len(ma.helper.drawn) == len(mb.helper.drawn) > 0
                assert all(map(torch.equal, ma.helper.drawn, mb.helper.drawn)), t
    finally:
        ma.helper.close()
        mb.helper.close()
    assert counts == [5, 0]


def test_a_wrapper_running_its_chain_in_inference_mode_drops_the_plan_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its children's outputs are inference tensors (no version counter to check): not the planned forward, so the
    plan is given up at the first step, not tried (the forward run once more, its side effects seen) at every one."""
    ma, mb = _wrapper("inference"), _wrapper("inference")
    opt, ref = EGN(ma, loss="cross_entropy", **KW), _general_only(EGN(mb, loss="cross_entropy", **KW))
    for t in range(4):
        _both(opt, ref, *_batch(16, t, torch.float32))
        _same_state(opt, ref, ma, mb)
    plan = opt._step_plan()
    assert plan is not None and plan.wrapped is not None and plan.wrapped.refused is not None
    assert ma.calls == mb.calls + 1  # (the first step's planned forward, once)


@pytest.mark.parametrize("momentum", [0.0, 0.3])
def test_a_wrapper_running_its_chain_under_autocast_is_refused_as_the_general_path_refuses_it(
        momentum: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Autocast inside the forward makes the children's calls bfloat16 ones (the chain's calls all the same): the
    plan must not step on those outputs (without momentum it did, silently, where the general path refuses the
    outputs' dtype), nor fail in its own products (with momentum: a bare dtype error); it declines, and the general
    path's error is raised, nothing changed."""
    kw = {**KW, "momentum": momentum}
    ma, mb = _wrapper("autocast"), _wrapper("autocast")
    opt, ref = EGN(ma, loss="cross_entropy", **kw), _general_only(EGN(mb, loss="cross_entropy", **kw))
    before = [p.detach().clone() for p in ma.parameters()]
    with _counting(monkeypatch) as counts:
        for t in range(2):
            for o in (opt, ref):
                with pytest.raises(ValueError, match="outputs are torch.bfloat16"):
                    o.step(inputs=_batch(16, t, torch.float32)[0], targets=_batch(16, t, torch.float32)[1])
            _same_state(opt, ref, ma, mb)
    assert counts == [0, 2]
    plan = opt._step_plan()
    assert plan is not None and plan.wrapped is not None and plan.wrapped.refused is not None  # (not used again)
    assert all(map(torch.equal, ma.parameters(), before)) and opt.num_steps == 0


@pytest.mark.parametrize("change", ["child_replaced", "module_added", "instance_forward"])
def test_a_changed_wrapper_declines(change: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ma, mb = _wrapper("plain"), _wrapper("plain")
    opt, ref = EGN(ma, loss="cross_entropy", **KW), _general_only(EGN(mb, loss="cross_entropy", **KW))
    edit: dict[str, Callable[[Wrapper], None]] = {
        "child_replaced": lambda m: m.net.__setitem__(1, nn.Sigmoid()),
        "module_added": lambda m: setattr(m, "extra", torch.manual_seed(1) and nn.MultiheadAttention(6, 2)),
        "instance_forward": lambda m: setattr(m, "forward", lambda x: m.net(x) * 2.0),
    }
    with _counting(monkeypatch) as counts:
        for t in range(4):
            if t == 2:
                edit[change](ma)
                edit[change](mb)
            _both(opt, ref, *_batch(16, t, torch.float32))
            _same_state(opt, ref, ma, mb)
    assert counts == [2, 2]


class _Seq(nn.Sequential):
    """A Sequential subclass: its forward, the Sequential's or its own, is run and checked at every forward."""

    def __init__(self, scale: float) -> None:
        super().__init__(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = super().forward(x)
        return out if self.scale == 1.0 else out * self.scale


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_a_sequential_subclass_is_planned_only_where_its_forward_is_the_chain(
        scale: float, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    ma = _Seq(scale)
    mb = _Seq(scale)
    mb.load_state_dict(ma.state_dict())
    opt, ref = EGN(ma, loss="cross_entropy", **KW), _general_only(EGN(mb, loss="cross_entropy", **KW))
    with _counting(monkeypatch) as counts:
        for t in range(4):
            _both(opt, ref, *_batch(16, t, torch.float32))
            _same_state(opt, ref, ma, mb)
    assert counts == ([4, 0] if scale == 1.0 else [0, 4])
    plan = opt._step_plan()
    assert plan is not None and plan.wrapped is not None and (plan.wrapped.refused is None) == (scale == 1.0)
