"""EGN as an optimizer: line search, momentum, adaptive damping, modes, bad input.

The guarantees every optimizer shares (checkpoint round trips with momentum, line search and adaptive
damping on, copies, hooks, non-finite batches, validation naming the field) are in tests/conformance.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_soaa import EGN, EGNConfig
from tests.harness.models import tiny_mlp
from tests.unit._egn_oracle import direct_direction, flat_params, mean_loss

DT = torch.float64


def _data(loss: str = "mse", b: int = 8, seed: int = 0, c: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 6, generator=g, dtype=DT)
    if loss == "cross_entropy":
        return x, torch.randint(0, c, (b,), generator=g)
    if loss == "bce":
        return x, torch.rand(b, c, generator=g, dtype=DT)
    return x, torch.randn(b, c, generator=g, dtype=DT)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_line_search_satisfies_armijo_and_descends(loss: str) -> None:
    model = tiny_mlp(0, DT)
    x, y = _data(loss)
    lr = 6.0  # too long a step: the search must backtrack
    ref = direct_direction(model, x, y, loss, damping=0.01)
    f0 = mean_loss(model, x, y, loss)
    w0 = flat_params(model)
    opt = EGN(model, loss=loss, lr=lr, damping=0.01, line_search=True)
    opt.step(inputs=x, targets=y)
    st = opt.statistics()
    alpha, tries = st["alpha"], int(st["ls_tries"])
    assert 1 < tries < 15
    assert alpha == pytest.approx(lr * 0.8 ** (tries - 1), rel=1e-12) and alpha <= lr
    gtd = float(ref["g"] @ ref["d"])
    assert gtd < 0 and st["gtd"] == pytest.approx(gtd, rel=1e-9)
    f1 = mean_loss(model, x, y, loss)
    assert f1 == pytest.approx(st["loss_after"], rel=1e-10)
    assert f1 <= f0 + 0.1 * alpha * gtd
    # the previous trial (α/0.8) failed the test
    m2 = tiny_mlp(0, DT)
    torch.nn.utils.vector_to_parameters(w0 + (alpha / 0.8) * ref["d"], m2.parameters())
    assert mean_loss(m2, x, y, loss) > f0 + 0.1 * (alpha / 0.8) * gtd
    torch.testing.assert_close(flat_params(model) - w0, alpha * ref["d"], rtol=1e-9, atol=1e-12)


def test_line_search_resets_from_previous_alpha_and_hits_maxls() -> None:
    model = tiny_mlp(0, DT)
    x, y = _data()
    opt = EGN(model, lr=6.0, damping=0.01, line_search=True)
    opt.step(inputs=x, targets=y)
    a1 = opt.alpha
    opt.step(inputs=x, targets=y)
    tries = int(opt.statistics()["ls_tries"])
    assert opt.alpha == pytest.approx(min(1.5 * a1, 6.0) * 0.8 ** (tries - 1), rel=1e-12)
    # maxls = 1: the first α is taken even if Armijo fails (no rejection)
    m2 = tiny_mlp(0, DT)
    opt2 = EGN(m2, lr=1e4, damping=0.01, line_search=True, max_ls=1)
    opt2.step(inputs=x, targets=y)
    assert opt2.statistics()["ls_tries"] == 1.0 and opt2.alpha == 1e4


def test_armijo_slack_is_relative_to_the_loss() -> None:
    """The Armijo test allows the loss rounding, 4 eps(dtype) |f0|: at a bf16 loss of ~0.02 that is 6e-4.
    It was 4 eps max(1, |f0|), i.e. 0.031 for any loss below 1: a bf16 linear fit at its noise floor
    accepted trials that raised the loss from 0.026 to 0.041 as passing, before max_ls, and restarted the
    next search from the longer α. Every trial that passes (fewer than max_ls tries) now lowers the loss
    by Armijo's margin up to that rounding."""
    eps = torch.finfo(torch.bfloat16).eps
    for lr in (1.0, 2.0, 4.0):
        for seed in range(4):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(64, 4, generator=g)
            w = torch.randn(4, 2, generator=g)
            y = (x @ w + 0.14 * torch.randn(64, 2, generator=g)).bfloat16()
            model = nn.Linear(4, 2).to(torch.bfloat16)
            with torch.no_grad():
                model.weight.copy_(w.T + 0.02 * torch.randn(2, 4, generator=g))
                model.bias.zero_()
            opt = EGN(model, lr=lr, damping=1e-4, line_search=True)
            for _ in range(3):
                opt.step(inputs=x.bfloat16(), targets=y)
                st = opt.statistics()
                if st["ls_tries"] < 15:  # passed the test
                    bound = st["loss"] + 0.1 * st["alpha"] * st["gtd"] + 4 * eps * abs(st["loss"])
                    assert st["loss_after"] <= bound, (lr, seed, st["loss"], st["loss_after"])


def test_momentum_is_bias_corrected_and_rejected_when_not_descent() -> None:
    lin = nn.Linear(6, 3).double()
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    x, y = _data()
    beta = 0.5
    opt = EGN(lin, lr=1e-6, damping=0.1, momentum=beta)
    w0 = flat_params(lin)
    d1 = direct_direction(lin, x, y, "mse", 0.1)["d"]
    opt.step(inputs=x, targets=y)
    # bias correction: the first momentum direction equals the plain direction
    torch.testing.assert_close((flat_params(lin) - w0) / 1e-6, d1, rtol=1e-6, atol=1e-9)
    assert opt.statistics()["momentum_used"] == 1.0
    # second batch pulls the other way: β·d1 + d2 points uphill for it, so the plain d2 is used
    y2 = -0.1 * y
    ref2 = direct_direction(lin, x, y2, "mse", 0.1)
    m_dir = (beta * d1 + ref2["d"]) / (1 + beta)
    assert float(ref2["g"] @ m_dir) > 0
    w1 = flat_params(lin)
    opt.step(inputs=x, targets=y2)
    assert opt.momentum_rejections == 1 and opt.statistics()["momentum_used"] == 0.0
    torch.testing.assert_close((flat_params(lin) - w1) / 1e-6, ref2["d"], rtol=1e-6, atol=1e-9)
    assert opt.momentum_steps == 2
    # β = 0 leaves the direction unchanged
    m3 = tiny_mlp(0, DT)
    ref3 = direct_direction(m3, x, y, "mse", 0.1)["d"]
    w3 = flat_params(m3)
    EGN(m3, lr=1.0, damping=0.1, momentum=0.0).step(inputs=x, targets=y)
    torch.testing.assert_close(flat_params(m3) - w3, ref3, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("general", [False, True], ids=["plan", "general"])
def test_a_float16_gradient_near_its_range_is_not_scaled_past_it(general: bool) -> None:
    """The momentum's g is formed scaled by 2^e ~ 1/√(2·f0) so that a float32 model's tiny g does not underflow
    (egn_math.gradient_scale); a float16 model's g near 65504 at a loss below 1/2 overflowed that way: every
    momentum gᵀd inf, the step skipped where the unscaled g had been taken. Every step is taken, on the step plan
    and on the general path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    with torch.no_grad():  # back-signals x300 through the second layer, inputs ~1e3: g ~1e4, losses ~1e-2
        model[0].weight.mul_(1.0 / 300.0)
        model[0].bias.zero_()
        model[1].weight.mul_(300.0)
        model[1].bias.zero_()
    model = model.half()
    x = (torch.rand(16, 8) * 1000 + 1000).half()
    with torch.no_grad():
        y = (model(x).float() + 0.01 * torch.sign(torch.randn(16, 2))).half()
    opt = EGN(model, loss="mse", lr=0.5, momentum=0.5, damping=1e-2)
    if general:
        opt._planned_step = lambda: False  # type: ignore[method-assign]  # every step through the template
    losses = [float(opt.step(inputs=x, targets=y)) for _ in range(4)]
    assert all(math.isfinite(f) and 0 < f < 0.5 for f in losses), losses  # (the scale would be > 1)
    assert opt.skipped_steps == 0 and opt.momentum_steps == 4, (opt.skipped_steps, opt.momentum_steps)


@pytest.mark.parametrize("momentum", [0.0, 0.6])
def test_adaptive_damping_follows_gain_ratio(momentum: float) -> None:
    model = tiny_mlp(0, DT)
    x, y = _data("cross_entropy")
    opt = EGN(model, loss="cross_entropy", lr=0.5, damping=0.2, momentum=momentum, adaptive_damping=True)
    x0, y0 = _data("cross_entropy", seed=9)
    opt.step(inputs=x0, targets=y0)  # fills the momentum buffer
    lam = opt.damping
    w0 = flat_params(model)
    f0 = mean_loss(model, x, y, "cross_entropy")
    ref = direct_direction(model, x, y, "cross_entropy", lam)
    opt.step(inputs=x, targets=y)
    st = opt.statistics()
    delta = flat_params(model) - w0
    f1 = mean_loss(model, x, y, "cross_entropy")
    jd = ref["J"] @ delta
    predicted = float(ref["g"] @ delta) + 0.5 * float(jd @ ref["Q"] @ jd) / x.shape[0]
    rho = (f1 - f0) / predicted
    assert st["rho"] == pytest.approx(rho, rel=1e-8)
    expected = lam * (1.01 if rho < 0.25 else 0.99 if rho > 0.75 else 1.0)
    assert opt.damping == pytest.approx(expected, rel=1e-14)
    assert opt.damping != lam


def test_batchnorm_and_dropout_use_eval_mode_and_modes_are_restored() -> None:
    def make() -> nn.Module:
        torch.manual_seed(11)
        m = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5),
                          nn.Linear(8, 3)).double()
        with torch.no_grad():  # non-trivial running statistics
            for _ in range(3):
                m(torch.randn(16, 6, dtype=DT) * 2 + 1)
        return m

    x, y = _data("cross_entropy")
    a, b = make(), make()
    b.eval()
    a.train()
    a[1].eval()  # a submodule already in eval mode must stay so
    stats_before = (a[1].running_mean.clone(), a[1].running_var.clone(), int(a[1].num_batches_tracked))
    ref_model = copy.deepcopy(b)
    ref = direct_direction(ref_model, x, y, "cross_entropy", 0.3)
    wa, wb = flat_params(a), flat_params(b)
    for m in (a, b):
        EGN(m, loss="cross_entropy", lr=1.0, damping=0.3, line_search=True, adaptive_damping=True).step(
            inputs=x, targets=y)
    torch.testing.assert_close(flat_params(a) - wa, flat_params(b) - wb, rtol=0, atol=0)
    # the direction is the Gauss-Newton direction of the eval-mode network (BN params: explicit path)
    assert [m.training for m in a.modules()] == [True, True, False, True, True, True]
    assert not any(m.training for m in b.modules())
    torch.testing.assert_close(a[1].running_mean, stats_before[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1].running_var, stats_before[1], rtol=0, atol=0)
    assert int(a[1].num_batches_tracked) == stats_before[2]
    m3 = make()
    w3 = flat_params(m3)
    EGN(m3, loss="cross_entropy", lr=1.0, damping=0.3).step(inputs=x, targets=y)
    torch.testing.assert_close(flat_params(m3) - w3, ref["d"], rtol=1e-10, atol=1e-12)


def _assert_untouched(model: nn.Module, w0: torch.Tensor, opt: EGN) -> None:
    assert torch.equal(flat_params(model), w0)
    assert opt.num_steps == 0 and opt.skipped_steps == 0 and not any(opt.state.values())


def test_bad_input_raises_and_changes_nothing() -> None:
    with pytest.raises(ValueError, match="no trainable parameters"):
        EGN(tiny_mlp().requires_grad_(False))
    with pytest.raises(ValueError, match="damping"):
        EGN(tiny_mlp(), damping=0.0)
    with pytest.raises(ValueError, match="nn.Module"):
        EGN(list(tiny_mlp().parameters()))
    with pytest.raises(ValueError, match="momentum"):
        EGNConfig(momentum=1.0)
    model = tiny_mlp(0, DT)
    w0 = flat_params(model)
    x, y = _data()
    opt = EGN(model, lr=1.0, momentum=0.9, max_gram_size=20)
    with pytest.raises(ValueError, match=r"24x24 .*b=8 .*c=3.*max_gram_size=20"):
        opt.step(inputs=x, targets=y)
    _assert_untouched(model, w0, opt)
    opt = EGN(model, lr=1.0, momentum=0.9)
    cases = [
        (x, y[:, :2], r"targets of the outputs' shape \[8, 3\]"),
        (x, y[:5], "share the batch dimension"),
        (x[:, :4], y, "forward failed"),
        (x, y.long(), "floating-point targets"),
    ]
    for xi, yi, msg in cases:
        with pytest.raises(ValueError, match=msg):
            opt.step(inputs=xi, targets=yi)
        _assert_untouched(model, w0, opt)
    ce = EGN(model, loss="cross_entropy")
    for yi, msg in ((torch.randn(8), "integer class targets"), (torch.full((8,), 3), r"targets in \[0, 3\)")):
        with pytest.raises(ValueError, match=msg):
            ce.step(inputs=x, targets=yi)
        _assert_untouched(model, w0, ce)
    flat = nn.Sequential(nn.Linear(6, 3), nn.Unflatten(1, (3, 1))).double()
    with pytest.raises(ValueError, match=r"outputs of shape \[batch, outputs\]"):
        EGN(flat).step(inputs=x, targets=y)
    with pytest.raises(ValueError, match=r"got no mini-batch.*BatchToOptimizer"):
        opt.step(lambda: torch.tensor(1.0))
    _assert_untouched(model, w0, opt)


def test_closure_returning_batch_and_closure_with_inputs() -> None:
    x, y = _data()
    a, b = tiny_mlp(0, DT), tiny_mlp(0, DT)
    EGN(a, lr=0.5).step(lambda: (x, y))
    calls = []

    def closure():
        calls.append(1)
        return torch.tensor(7.0)

    out = EGN(b, lr=0.5).step(closure, inputs=x, targets=y)
    assert calls == [1] and float(out) == 7.0
    torch.testing.assert_close(flat_params(a), flat_params(b), rtol=0, atol=0)


@pytest.mark.parametrize("mode", [{}, {"line_search": True}, {"adaptive_damping": True}, {"momentum": 0.5}])
def test_step_to_a_nonfinite_loss_is_never_taken_and_damping_grows(mode: dict) -> None:
    """EGN never dies: a step whose loss L_b(w + αd) overflows is skipped (w, momentum and counters
    unchanged), λ grows ×10, and training continues from the same finite model."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)  # float32: outputs ~1e25 square to inf in the loss
    x, y = (t.float() for t in _data())
    opt = EGN(model, lr=1e25, damping=0.5, **mode)
    w0 = flat_params(model)
    opt.step(inputs=x, targets=y)
    assert opt.skipped_steps == 1 and opt.num_steps == 0 and opt.nonfinite_trials == 1
    assert opt.damping == pytest.approx(5.0)
    assert torch.equal(flat_params(model), w0)
    assert not any("momentum_buffer" in st for st in opt.state.values())  # nothing committed
    with torch.no_grad():
        assert bool(torch.isfinite(model(x)).all())
    opt.param_groups[0]["lr"] = 0.5  # a sane step size: training continues
    opt.alpha = 0.5
    before = float(opt.step(inputs=x, targets=y))
    assert opt.num_steps == 1
    assert 0.5 * float(((model(x) - y) ** 2).sum()) / x.shape[0] < before


def test_statistics_for_loggers() -> None:
    model = tiny_mlp(0, DT)
    x, y = _data()
    opt = EGN(model, lr=1.0, line_search=True, adaptive_damping=True)
    opt.step(inputs=x, targets=y)
    st = opt.statistics()
    for key in ("damping", "alpha", "ls_tries", "rho", "solve_fallbacks", "gtd", "loss", "gram_size"):
        assert key in st and isinstance(st[key], float)
    assert st["gram_size"] == 24.0 and st["steps"] == 1.0


def test_float32_model_trains() -> None:
    model = tiny_mlp(0, torch.float32)
    x, y = (t.float() for t in _data())
    opt = EGN(model, lr=1.0, damping=0.1, line_search=True)
    losses = [float(opt.step(inputs=x, targets=y)) for _ in range(5)]
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_line_search_warm_up_from_lr_zero() -> None:
    """lr = 0 (a warm-up's first step) takes no step, and must not pin every later α at 0."""
    model = tiny_mlp(0, DT)
    x, y = _data()
    opt = EGN(model, lr=0.0, damping=0.1, line_search=True)
    w0 = flat_params(model)
    opt.step(inputs=x, targets=y)
    assert torch.equal(flat_params(model), w0) and opt.alpha == 0.0
    opt.param_groups[0]["lr"] = 1.0
    opt.step(inputs=x, targets=y)
    assert 0.0 < opt.alpha <= 1.0 and not torch.equal(flat_params(model), w0)


def _compile_pair():
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()

    return make(), make()


def test_compiled_model_takes_the_eager_step() -> None:
    """EGN(torch.compile(model)) captures the real modules (_orig_mod): the step equals eager EGN's.
    Before, the capture ran through the compiled graph and the step was wrong (relative error ~3.6)."""
    eager, plain = _compile_pair()
    x, y = _data()
    compiled = torch.compile(plain, backend="aot_eager")
    ref = EGN(eager, lr=1.0, damping=0.5, momentum=0.5)
    opt = EGN(compiled, lr=1.0, damping=0.5, momentum=0.5)
    for _ in range(2):
        ref.step(inputs=x, targets=y)
        opt.step(inputs=x, targets=y)
    torch.testing.assert_close(flat_params(plain), flat_params(eager), rtol=1e-12, atol=1e-12)
    assert float((flat_params(plain) - flat_params(_compile_pair()[0])).abs().max()) > 1e-2  # it moved
    with torch.no_grad():  # the user's compiled forward sees the updated parameters
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-12, atol=1e-12)


def test_compiled_submodule_is_refused() -> None:
    outer = nn.Sequential(torch.compile(nn.Linear(6, 3).double(), backend="aot_eager"))
    with pytest.raises(ValueError, match=r"submodule '0' is torch.compile'd"):
        EGN(outer)


class _Noisy(nn.Module):
    """Noise injection and ``F.dropout`` (``training`` defaults to True): random draws eval() does not
    turn off. With ``fixed`` = (noise, mask) the same function without drawing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a, self.o = nn.Linear(6, 16).double(), nn.Linear(16, 3).double()
        self.fixed: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed is None:
            return self.o(nn.functional.dropout(torch.tanh(self.a(x + 0.3 * torch.randn_like(x))), 0.5))
        noise, mask = self.fixed
        return self.o(torch.tanh(self.a(x + noise)) * mask)


def test_a_forward_that_draws_random_numbers_sees_one_draw_per_step() -> None:
    """Spec §2.7: J and the line-search and ρ forwards must use the same mask. Every forward of a step
    repeats the capture forward's draw (the step of the model with that draw fixed), and the generator
    is left where one forward leaves it."""
    x, y = _data()
    kw = dict(loss="mse", lr=1.0, damping=0.05, line_search=True, adaptive_damping=True)
    noisy, fixed = _Noisy(), _Noisy()
    opt, ref = EGN(noisy, **kw), EGN(fixed, **kw)
    torch.manual_seed(7)
    for _ in range(3):
        state = torch.get_rng_state()
        fixed.fixed = (0.3 * torch.randn_like(x), nn.functional.dropout(torch.ones(8, 16, dtype=DT), 0.5))
        after_one_forward = torch.get_rng_state()
        torch.set_rng_state(state)
        opt.step(inputs=x, targets=y)
        assert torch.equal(torch.get_rng_state(), after_one_forward)
        ref.step(inputs=x, targets=y)
        got, want = opt.statistics(), ref.statistics()
        for key in ("loss", "loss_after", "alpha", "rho", "damping", "ls_tries"):
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-14), key
        torch.testing.assert_close(flat_params(noisy), flat_params(fixed), rtol=1e-12, atol=1e-14)
    assert want["ls_tries"] >= 1


@pytest.mark.parametrize("jacobian", ["auto", "explicit"])
def test_step_under_inference_mode_with_inference_tensors(jacobian: str) -> None:
    """A step called under torch.inference_mode(), on a batch made there, is the step made outside it."""
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()

    x, y = _data()
    a, b = make(), make()
    kw = dict(loss="mse", lr=1.0, damping=0.3, momentum=0.5, line_search=True, jacobian=jacobian)
    opt_a, opt_b = EGN(a, **kw), EGN(b, **kw)
    for _ in range(2):
        opt_a.step(inputs=x, targets=y)
        with torch.inference_mode():
            xi, yi = x.clone(), y.clone()
            loss = opt_b.step(inputs=xi, targets=yi)
        assert torch.equal(flat_params(a), flat_params(b))
        assert not loss.is_inference()
    assert not any(p.is_inference() for p in b.parameters())


class _Bag(nn.Module):
    """nn.EmbeddingBag has no forward-mode AD: Jd must come from the captured factors."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.e, self.o = nn.EmbeddingBag(20, 4, mode="mean").double(), nn.Linear(4, 3).double()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.e(t)))


def test_momentum_with_adaptive_damping_on_an_op_without_forward_mode_ad() -> None:
    """ρ of a momentum step needs (Jd)ᵀQ(Jd) of the momentum direction: from the Gram factors and the
    explicit rows, matching the float64 oracle on a model torch's forward-mode AD cannot run."""
    model = _Bag()
    g = torch.Generator().manual_seed(2)
    x0, x = torch.randint(0, 20, (6, 5), generator=g), torch.randint(0, 20, (6, 5), generator=g)
    y0, y = torch.randint(0, 3, (6,), generator=g), torch.randint(0, 3, (6,), generator=g)
    opt = EGN(model, loss="cross_entropy", lr=0.5, damping=0.2, momentum=0.6, adaptive_damping=True)
    opt.step(inputs=x0, targets=y0)  # fills the momentum buffer
    lam, w0 = opt.damping, flat_params(model)
    f0 = mean_loss(model, x, y, "cross_entropy")
    ref = direct_direction(model, x, y, "cross_entropy", lam)
    opt.step(inputs=x, targets=y)
    st = opt.statistics()
    assert st["momentum_used"] == 1.0
    delta = flat_params(model) - w0
    jd = ref["J"] @ delta
    predicted = float(ref["g"] @ delta) + 0.5 * float(jd @ ref["Q"] @ jd) / x.shape[0]
    assert st["rho"] == pytest.approx((mean_loss(model, x, y, "cross_entropy") - f0) / predicted, rel=1e-8)


def test_bce_targets_in_a_lower_dtype_step_as_float64_ones() -> None:
    """``loss="bce"`` with targets in bfloat16 (or float16, float32) and a float64 model: torch returns the
    summed loss in the targets' dtype, so the line search's and ρ's starting loss was a bfloat16 number
    against float64 trial losses (8.5e-2 off after 40 steps, the line search collapsed). The same values
    in any floating dtype give the same run."""
    torch.manual_seed(0)
    x = torch.randn(32, 6, dtype=torch.float64)
    y = (torch.randn(32, 3) > 0).to(torch.float64)  # 0 and 1: exact in every dtype
    runs = []
    for dtype in (torch.float64, torch.bfloat16, torch.float16, torch.float32):
        model = tiny_mlp(0, torch.float64, sizes=(6, 8, 3))
        opt = EGN(model, loss="bce", lr=1.0, line_search=True, adaptive_damping=True)
        losses = [float(opt.step(inputs=x, targets=y.to(dtype))) for _ in range(6)]
        runs.append((losses, flat_params(model), opt.damping, opt.alpha))
    for other in runs[1:]:
        assert other[0] == runs[0][0] and other[2:] == runs[0][2:]
        assert torch.equal(other[1], runs[0][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_solve_dtype_model_is_refused_for_half_precision_models(dtype: torch.dtype) -> None:
    """``solve_dtype="model"`` on a bfloat16/float16 model reached LAPACK's missing half-precision Cholesky
    (torch's bare NotImplementedError), and at W > 1 rounded class labels through the factor table."""
    model = tiny_mlp(0, dtype, sizes=(6, 8, 3))
    with pytest.raises(ValueError, match=r"Invalid solve_dtype='model' for a model whose first trained parameter "
                                         r"\('0.weight'\) is torch\.(bfloat16|float16)"):
        EGN(model, loss="cross_entropy", solve_dtype="model")
    EGN(model, loss="cross_entropy")  # the default float64 solve
    model.float()  # a float32 model: the solve runs in float32, as before
    EGN(model, loss="cross_entropy", solve_dtype="model")


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64), (torch.bfloat16, torch.float16),
                                    (torch.float64, torch.float32)], ids=str)
def test_trained_parameters_of_several_dtypes_are_refused_at_construction(dtypes: tuple[torch.dtype, ...]) -> None:
    """A float32 body under a float64 head (or bfloat16/float16 layers) crashed in the step's capture with
    torch's bare "both inputs should have same dtype". Refused when EGN is built, naming two parameters,
    their dtypes and the remedy; a head of another dtype that is frozen is no trained parameter."""
    model = tiny_mlp(0, torch.float64, sizes=(6, 8, 3))
    model[0].to(dtypes[0])
    model[2].to(dtypes[1])
    with pytest.raises(ValueError, match=rf"EGN: the model's trained parameters have more than one dtype .*'0.weight' "
                                         rf"is {dtypes[0]}, '2.weight' is {dtypes[1]}\. .*convert the model to one "
                                         r"dtype before building EGN"):
        EGN(model, loss="mse")
    model[2].requires_grad_(False)
    EGN(model, loss="mse")


@pytest.mark.parametrize("how", ["instance_forward", "class_swap"])
def test_a_linear_whose_forward_changed_after_construction_is_refused(how: str) -> None:
    """EGN plans which Linears it factors once; a forward replaced on the instance afterwards (accelerate's
    hooks, a scaling wrapper) or a class swapped to a subclass left it stepping on the plain layer's
    Jacobian (0.19 off the Gauss-Newton step). Refused at the step, nothing changed; the same change made
    before construction is planned for."""

    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2.0 * super().forward(x)

    def change(layer: nn.Linear) -> None:
        if how == "class_swap":
            layer.__class__ = Scaled
        else:
            plain = layer.forward
            layer.forward = lambda x: 2.0 * plain(x)

    torch.manual_seed(0)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    model = tiny_mlp(0, torch.float64, sizes=(6, 8, 3))
    opt = EGN(model, loss="mse", lr=1.0)
    opt.step(inputs=x, targets=y)
    change(model[-1])
    before = flat_params(model)
    with pytest.raises(RuntimeError, match=r"no longer computes x Wᵀ \+ b with nn.Linear's own forward"):
        opt.step(inputs=x, targets=y)
    assert torch.equal(flat_params(model), before)
    early = tiny_mlp(0, torch.float64, sizes=(6, 8, 3))
    change(early[-1])
    EGN(early, loss="mse", lr=1.0).step(inputs=x, targets=y)  # planned with the change: steps


def test_adaptive_damping_keeps_lambda_where_there_is_nothing_to_judge() -> None:
    # (1) lr = 0 (a warm-up from 0): no step, predicted change 0. Read as a failure it grew λ ×1.01 a
    # step (1.0 -> 2.1e4 over 1000 steps) and the run barely moved once lr rose.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x, w = torch.randn(64, 4, dtype=DT), torch.randn(4, 2, dtype=DT)
    y = torch.tanh(x @ w)
    opt = EGN(model, loss="mse", lr=0.0, damping=1.0, adaptive_damping=True)
    for _ in range(30):
        opt.step(inputs=x, targets=y)
    assert opt.damping == 1.0 and math.isnan(opt.statistics()["rho"])
    # (2) a converged full-batch least-squares fit: every further step changes the loss by rounding
    # only; λ used to climb to damping_max (1e6) and ~1400 steps were needed to train again after the
    # targets changed. It now stays where convergence left it and the new targets are fitted at once.
    lin = nn.Linear(5, 1).double()
    x, y = torch.randn(64, 5, dtype=DT), torch.randn(64, 1, dtype=DT)
    opt = EGN(lin, loss="mse", lr=1.0, damping=1.0, adaptive_damping=True)
    for _ in range(40):
        opt.step(inputs=x, targets=y)
    lam = opt.damping
    for _ in range(400):
        opt.step(inputs=x, targets=y)
    assert opt.damping <= lam * 1.01
    y2 = y + 5.0
    for _ in range(10):
        opt.step(inputs=x, targets=y2)
    design = torch.cat([x, torch.ones(64, 1, dtype=DT)], 1)
    best = 0.5 * float(((design @ torch.linalg.lstsq(design, y2).solution - y2) ** 2).mean())
    with torch.no_grad():
        fitted = 0.5 * float(((lin(x) - y2) ** 2).mean())
    assert fitted < best * 1.01


def test_gain_ratio_nothing_to_judge_is_nan() -> None:
    from lightning_soaa.functional.egn import gain_ratio, update_damping
    assert math.isnan(gain_ratio(0.0, 0.0)) and math.isnan(gain_ratio(1e-17, -1e-30, 1e-15))
    assert gain_ratio(-1e-3, -2e-3, 1e-15) == 0.5 and gain_ratio(1.0, 2.0) == 0.0  # predicted rise: λ grows
    assert math.isnan(gain_ratio(0.0, -0.3))  # the computed loss did not change at all: a rounding floor
    # a small loss is judged as a large one: float32 rounding of a 6.6e-5 loss, changes of 5e-8
    assert gain_ratio(-5e-8, -4e-8, 4 * 1.2e-7 * 6.6e-5) == pytest.approx(1.25)
    kw = dict(rho_low=0.25, rho_high=0.75, increase=1.01, decrease=0.99, lo=1e-12, hi=1e6)
    assert update_damping(2.0, float("nan"), **kw) == 2.0 and update_damping(2.0, 0.0, **kw) == 2.0 * 1.01


def test_bce_targets_outside_zero_one_are_refused() -> None:
    # documented as probabilities; outside [0, 1] the loss is unbounded below and EGN trained towards it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2)).double()
    opt = EGN(model, loss="bce", lr=0.5)
    x = torch.randn(6, 4, dtype=DT)
    w = [p.detach().clone() for p in model.parameters()]
    for bad in (2.0, -0.5):
        y = torch.full((6, 2), 0.5, dtype=DT)
        y[3, 1] = bad
        with pytest.raises(ValueError, match=r"loss='bce' needs targets in \[0, 1\] \(probabilities\); got values in"):
            opt.step(inputs=x, targets=y)
    assert all(torch.equal(a, b) for a, b in zip(w, model.parameters())) and opt.num_steps == 0
    opt.step(inputs=x, targets=torch.rand(6, 2, dtype=DT))
    assert opt.num_steps == 1


@pytest.mark.parametrize("attr,value", [("damping", math.nan), ("damping", -1.0), ("damping", 0.0),
                                        ("damping", math.inf), ("damping", "1"), ("alpha", math.nan),
                                        ("alpha", -0.5)])
@pytest.mark.parametrize("where", ["between steps", "in the closure"])
def test_optimizer_wide_values_set_by_hand_are_checked(attr: str, value: object, where: str) -> None:
    """``opt.damping`` (documented as settable between steps) took NaN or a negative value and every later
    step was skipped as 'could not be solved' (NaN for good); 0 and inf were stepped. Refused where it is
    set, as the constructor refuses it, also inside the step's closure (Lightning's
    on_before_optimizer_step runs there): nothing changed, the step after works; a valid value (a NumPy
    float32 too) is used as a Python float."""
    np = pytest.importorskip("numpy")
    model = tiny_mlp(0, DT)
    opt = EGN(model, loss="mse", lr=1.0, damping=0.5)
    x, y = _data()
    opt.step(inputs=x, targets=y)
    before, kept = flat_params(model), getattr(opt, attr)
    with pytest.raises(ValueError, match=rf"Invalid opt\.{attr}="):
        if where == "between steps":
            setattr(opt, attr, value)
        else:
            opt.step(lambda: (setattr(opt, attr, value), (x, y))[1])
    assert torch.equal(flat_params(model), before) and getattr(opt, attr) == kept
    setattr(opt, attr, np.float32(0.25))
    opt.step(inputs=x, targets=y)
    assert type(getattr(opt, attr)) is float and opt.statistics()["steps"] == 2.0


def test_damping_set_through_lightnings_wrapper_reaches_the_step() -> None:
    """``self.optimizers()`` in a LightningModule is Lightning's ``LightningOptimizer``, which copies the
    optimizer's attributes: ``self.optimizers().damping = 100`` changed the copy and the step used the old
    λ (silently). The attribute is the optimizer's, through the wrapper too."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    model = tiny_mlp(0, DT)
    opt = EGN(model, loss="mse", lr=1.0, damping=0.5)
    wrapped = LightningOptimizer(opt)
    wrapped.damping = 100.0
    assert opt.damping == 100.0 == wrapped.damping
    x, y = _data()
    opt.step(inputs=x, targets=y)
    assert opt.statistics()["solve_damping"] == 100.0


def test_a_checkpoint_after_a_step_at_lr_zero_loads() -> None:
    """Without a line search α becomes lr, so a step at lr = 0 (a warm-up from 0) saved α = 0, which
    load_state_dict refused ('Must be a finite number > 0')."""
    model = tiny_mlp(0, DT)
    opt = EGN(model, loss="mse", lr=0.0)
    x, y = _data()
    opt.step(inputs=x, targets=y)
    assert opt.alpha == 0.0
    fresh = EGN(tiny_mlp(0, DT), loss="mse", lr=0.0)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.alpha == 0.0


def test_a_damping_changed_since_the_save_is_named_at_load(caplog: pytest.LogCaptureFixture) -> None:
    """λ is state (adaptive damping and non-finite trials move it), so a load continues from the saved λ, as
    torch keeps a saved group's lr. Resumed with another damping= (adaptive_damping=False, where a user takes
    damping for a fixed option) the saved 0.5 won over 5.0 without a word; now a warning names both and the
    remedy. A resume with the same damping= (λ moved or not) says nothing; a state from before initial_damping
    was saved loads as before."""
    x, y = _data()
    opt = EGN(tiny_mlp(0, DT), loss="mse", lr=0.5, damping=0.5, momentum=0.5, line_search=False)
    for _ in range(2):
        opt.step(inputs=x, targets=y)
    sd = copy.deepcopy(opt.state_dict())
    for damping, warned in ((5.0, 1), (0.5, 0)):
        fresh = EGN(tiny_mlp(0, DT), loss="mse", lr=0.5, damping=damping, momentum=0.5, line_search=False)
        caplog.clear()
        with caplog.at_level("WARNING", logger="lightning_soaa.optim.egn"):
            fresh.load_state_dict(copy.deepcopy(sd))
        said = [r.getMessage() for r in caplog.records if "built with damping=" in r.getMessage()]
        assert len(said) == warned, said
        assert fresh.damping == 0.5
        if warned:
            assert "damping=5" in said[0] and "damping=0.5" in said[0] and "opt.damping" in said[0]
    old = copy.deepcopy(sd)
    del old["lightning_soaa"]["global"]["initial_damping"]
    fresh = EGN(tiny_mlp(0, DT), loss="mse", lr=0.5, damping=5.0, momentum=0.5, line_search=False)
    fresh.load_state_dict(old)
    assert fresh.damping == 0.5


def test_large_dense_jacobian_rows_are_announced_once(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Parameters without Gram factors (a norm's scale, a tied embedding) take dense per-sample Jacobians; a
    trained embedding of 3.2M entries cost +4.9 GB a step (before embeddings had index factors) and a larger
    one was killed with no message. Above the threshold EGN says so once, naming a parameter and the size;
    below it nothing is logged."""
    import lightning_soaa.optim.egn as egn_module

    model = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    x, y = _data(b=8)
    need = 2 * 8 * 3 * 12 * 8  # 2 copies x b x c x the LayerNorm's 12 elements x float64
    for limit, logged in ((need + 1, 0), (need, 1)):
        monkeypatch.setattr(egn_module, "DENSE_ROWS_WARN_BYTES", limit)
        opt = EGN(model, loss="mse", lr=1.0)
        caplog.clear()
        with caplog.at_level("WARNING", logger="lightning_soaa.optim.egn"):
            for _ in range(2):
                opt.step(inputs=x, targets=y)
        warned = [r.getMessage() for r in caplog.records if "no Gram factors" in r.getMessage()]
        assert len(warned) == logged, warned
        assert all("'1.weight'" in w and "8 samples x 3 outputs" in w for w in warned)


@pytest.mark.parametrize("returned", ["logits, y", "loss, logits"])
def test_a_closure_pair_computed_with_autograd_is_not_taken_as_the_batch(returned: str) -> None:
    """A closure's pair is read as (inputs, targets); ``return logits, y`` on a model whose input and output
    widths agree stepped silently on model(logits) (8.6e-2 off the step on (x, y)), and ``return loss,
    logits`` blamed the user's inputs. Refused naming the pair, nothing changed."""
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = EGN(model, loss="cross_entropy", lr=1.0)
    x, y = _data("cross_entropy", c=3)
    x = x[:, :3]

    def closure():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        return (logits, y) if returned == "logits, y" else (loss, logits)

    before = flat_params(model)
    with pytest.raises(ValueError, match="closure returned a pair, which EGN takes as the batch"):
        opt.step(closure)
    assert torch.equal(flat_params(model), before)
    opt.step(lambda: (x, y))  # the batch itself is taken
    assert opt.statistics()["steps"] == 1.0


@pytest.mark.parametrize("case,match", [
    ("tokens", "per-position \\(token\\) cross-entropy"),
    ("padding", "ignore_index such as -100, are not supported"),
])
def test_unsupported_cross_entropy_batches_say_what_is_unsupported(case: str, match: str) -> None:
    """Token logits [b, t, c] were told to add an nn.Flatten (then refused on the targets' shape); a
    padding label -100 was only 'out of [0, c)'. Each says what EGN does not support."""
    from lightning_soaa.functional.egn import check_outputs_targets

    if case == "tokens":
        outputs, targets = torch.zeros(4, 5, 3), torch.zeros(4, 5, dtype=torch.long)
    else:
        outputs, targets = torch.zeros(4, 3), torch.tensor([0, 2, -100, 1])
    with pytest.raises(ValueError, match=match):
        check_outputs_targets("cross_entropy", outputs, targets)


def test_a_closure_pair_computed_from_other_modules_is_the_batch() -> None:
    """Features of a backbone EGN does not train and a teacher's soft targets carry a grad_fn too (run
    without no_grad); they are a batch, stepped as the detached pair and as through step(inputs=...)."""
    def run(how: str) -> torch.Tensor:
        torch.manual_seed(0)
        backbone, teacher = nn.Linear(5, 6).double(), nn.Linear(6, 2).double()
        head = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        opt = EGN(head, loss="mse", lr=0.5)
        x = torch.randn(16, 5, dtype=DT)
        for _ in range(2):
            if how == "detached":
                opt.step(lambda: (backbone(x).detach(), teacher(backbone(x)).detach()))
            else:
                opt.step(lambda: (backbone(x), teacher(backbone(x))))
        return flat_params(head)

    assert torch.equal(run("with grad_fn"), run("detached"))


def test_a_closure_pair_from_a_checkpointed_forward_is_not_taken_as_the_batch() -> None:
    """A reentrant torch.utils.checkpoint hides the model's parameters from its output's graph: with
    inputs that require grad (enable_input_require_grads, an input-gradient penalty) `return logits, y`
    passed a check that looked for the parameters alone (7.8e-2 off the step on the batch). The model's
    own outputs in the closure are recognised too."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return checkpoint(self.block, x, use_reentrant=True)

    net = Net()
    opt = EGN(net, loss="mse", lr=1.0)
    x, y = torch.randn(8, 4, dtype=DT, requires_grad=True), torch.randn(8, 4, dtype=DT)
    before = flat_params(net)
    with pytest.raises(ValueError, match="computed by the model"):
        opt.step(lambda: (net(x), y))
    assert torch.equal(flat_params(net), before)


def test_a_checkpoint_region_with_debug_is_refused_naming_it() -> None:
    """torch.utils.checkpoint(..., debug=True) cannot be differentiated twice (torch's second backward through
    the region raises a bare AttributeError from its debug context), and EGN differentiates each step's
    forward more than once (back-signals, the factor probe): the step raised that AttributeError from
    inside EGN, naming neither the region nor the option. It is refused, naming both, nothing changed."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + checkpoint(self.block, x, use_reentrant=False, debug=True)  # (a residual: the general capture)

    net = Net()
    opt = EGN(net, loss="mse", lr=1.0)
    x, y = torch.randn(8, 4, dtype=DT), torch.randn(8, 4, dtype=DT)
    before = flat_params(net)
    with pytest.raises(ValueError, match=r"debug=True"):
        opt.step(inputs=x, targets=y)
    assert torch.equal(flat_params(net), before)


def test_a_bf16_model_with_float32_targets_measures_every_loss_on_the_same_targets() -> None:
    """EGN takes targets in the outputs' dtype for its solve and its line-search trials; the loss before
    the step (what step() returns, the Armijo test's and rho's reference) was computed on the float32
    targets: two functions up to 42% apart on this model, so the line search and the gain ratio compared
    them (a step that lowered the loss read as a rise; found by a hunter). Now step t+1 starts from step
    t's loss_after (the same weights and batch)."""
    from lightning_soaa.functional import egn as egn_math

    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = 30.0 + x @ torch.randn(3, 2) + 0.01 * torch.randn(64, 2)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].bias.fill_(30.0)
    model = model.to(torch.bfloat16)
    xb = x.bfloat16()
    opt = EGN(model, loss="mse", lr=1.0, damping=1e-2, line_search=True, adaptive_damping=True)
    after = None
    for _ in range(4):
        with torch.no_grad():
            on_bf16_targets = float(egn_math.loss_sum("mse", model(xb), y.bfloat16())) / 64
        start = float(opt.step(inputs=xb, targets=y))
        assert start == pytest.approx(on_bf16_targets, rel=1e-6)
        if after is not None:
            assert start == pytest.approx(after, rel=1e-6)
        after = opt._last["loss_after"]


class _RaisesOnCall(_Noisy):
    """:class:`_Noisy` whose forward raises ``kind`` on its ``at``-th call (0: never), after its noise and
    dropout drew (an out of memory in the output layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.at, self.kind = 0, 0, KeyboardInterrupt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        self.calls += 1
        if self.calls == self.at:
            raise self.kind("injected in a forward of the step")
        return out


# (which forward of the step raises: 1 the capture, 2 the first line-search trial; what it raises; what the
# step raises: an out of memory as itself, also in the capture forward, whose other errors are reported as the
# batch's, a ValueError: a caller's except torch.OutOfMemoryError missed it there)
_FORWARDS = [(2, KeyboardInterrupt, KeyboardInterrupt), (2, torch.OutOfMemoryError, torch.OutOfMemoryError),
             (1, KeyboardInterrupt, KeyboardInterrupt), (1, torch.OutOfMemoryError, torch.OutOfMemoryError)]


@pytest.mark.parametrize(("forward", "kind", "raised"), _FORWARDS)
def test_a_step_interrupted_in_its_forwards_steps_again_exactly(forward: int, kind: type[BaseException],
                                                                 raised: type[BaseException]) -> None:
    """Ctrl+C or an out of memory in a line-search forward (most of a step): the step put w0 back but left the
    random generators advanced (a model that draws then trained on other masks than the run without the
    interruption), with no refusal; in the capture forward, after the model drew (no draw replayed yet), the
    rewind missed that draw. Everything the step changed is put back, so stepping again on the same batch is
    the uninterrupted run bit for bit, and nothing is refused."""
    x, y = _data()
    kw = dict(loss="mse", lr=1.0, damping=0.05, momentum=0.5, line_search=True, adaptive_damping=True)
    model, ref = _RaisesOnCall(), _RaisesOnCall()
    opt, o_ref = EGN(model, **kw), EGN(ref, **kw)
    torch.manual_seed(7)
    opt.step(inputs=x, targets=y)
    model.at, model.kind = model.calls + forward, kind
    with pytest.raises(raised):
        opt.step(inputs=x, targets=y)
    assert opt.state_dict()  # not refused: nothing is left changed
    for _ in range(3):
        opt.step(inputs=x, targets=y)
    rng = torch.get_rng_state()
    torch.manual_seed(7)
    for _ in range(4):
        o_ref.step(inputs=x, targets=y)
    assert torch.equal(flat_params(model), flat_params(ref))
    assert opt.statistics() == pytest.approx(o_ref.statistics(), nan_ok=True, rel=0, abs=0)
    assert torch.equal(rng, torch.get_rng_state())


def test_a_step_interrupted_in_its_update_is_put_back_and_steps_again_exactly() -> None:
    """An exception in EGN's _apply (after the line search moved the parameters and the momentum buffers were
    replaced) refused every later step until a load; everything it changed is put back instead (w0, the old
    buffers, λ, α and the counters), and stepping again is the uninterrupted run bit for bit."""
    x, y = _data()
    kw = dict(loss="mse", lr=1.0, damping=0.05, momentum=0.5, line_search=True, adaptive_damping=True)
    a, b = tiny_mlp(seed=4), tiny_mlp(seed=4)
    opt, ref = EGN(a, **kw), EGN(b, **kw)
    for o in (opt, ref):
        o.step(inputs=x, targets=y)
    adapt = opt._adapt_damping

    def out_of_memory(*args: object) -> float:
        adapt(*args)  # λ written, then the failure
        raise torch.OutOfMemoryError("injected in the update")

    opt._adapt_damping = out_of_memory
    with pytest.raises(torch.OutOfMemoryError):
        opt.step(inputs=x, targets=y)
    del opt._adapt_damping
    for _ in range(3):
        opt.step(inputs=x, targets=y)
        ref.step(inputs=x, targets=y)
        assert torch.equal(flat_params(a), flat_params(b))
    assert opt.momentum_steps == ref.momentum_steps and opt.damping == ref.damping



@pytest.mark.parametrize("searched", [False, True], ids=["plain", "line_search_adaptive_damping"])
def test_state_clear_restarts_the_momentum_as_a_fresh_egn(searched: bool) -> None:
    """``optimizer.state.clear()`` removes every momentum buffer; the bias correction restarts with them (its
    count kept, the first step after the clear was 0.52x a fresh EGN's at β = 0.5 after 4 steps). With the line
    search and adaptive damping the fresh EGN takes the cleared one's λ and α, which a loop sets by hand alike."""
    kw = dict(lr=0.5, damping=0.5, momentum=0.5, line_search=searched, adaptive_damping=searched)
    model = tiny_mlp(0, DT)
    opt = EGN(model, **kw)
    batches = [_data(seed=s, b=8) for s in range(7)]
    for x, y in batches[:4]:
        opt.step(inputs=x, targets=y)
    opt.state.clear()
    twin = copy.deepcopy(model)
    fresh = EGN(twin, **kw)
    fresh.damping, fresh.alpha = opt.damping, opt.alpha
    for x, y in batches[4:]:
        opt.step(inputs=x, targets=y)
        fresh.step(inputs=x, targets=y)
        torch.testing.assert_close(flat_params(model), flat_params(twin), rtol=1e-12, atol=1e-14)
    assert opt.momentum_steps == fresh.momentum_steps == 3
    # a buffer removed from one parameter only keeps the count (one momentum vector, zero there)
    del opt.state[next(model.parameters())]
    steps = opt.momentum_steps
    opt.step(inputs=batches[0][0], targets=batches[0][1])
    assert opt.momentum_steps == steps + 1
