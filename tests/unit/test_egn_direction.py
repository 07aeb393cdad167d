"""EGN direction oracles (spec/algorithms.md §4 EGN 1-6), float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_soaa.functional import egn as egn_math
from lightning_soaa.functional.gram import linear_gram, linear_jacobian_rows
from lightning_soaa.optim.egn import EGN
from tests.harness.models import tiny_mlp
from tests.unit._egn_oracle import direct_direction, flat_params, mean_loss

DT = torch.float64


def _data(loss: str, b: int = 8, d_in: int = 6, c: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d_in, generator=g, dtype=DT)
    if loss == "cross_entropy":
        y = torch.randint(0, c, (b,), generator=g)
    elif loss == "bce":
        y = torch.rand(b, c, generator=g, dtype=DT)
    else:
        y = torch.randn(b, c, generator=g, dtype=DT)
    return x, y


class _InplaceMLP(nn.Module):
    """Linear layers followed by in-place activations and a LayerNorm (explicit-Jacobian path)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.l1 = nn.Linear(6, 7).double()
        self.ln = nn.LayerNorm(7).double()
        self.l2 = nn.Linear(7, 3, bias=False).double()

    def forward(self, x):
        h = self.l1(x)
        h = torch.relu_(h)
        return self.l2(self.ln(h))


class _SeqShared(nn.Module):
    """Inputs [b, T, 4]; one Linear called twice per forward, then mean pooling (T > 1 factors)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.l1 = nn.Linear(4, 4).double()
        self.l2 = nn.Linear(4, 3).double()

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        h = torch.tanh(self.l1(h))
        return self.l2(h.mean(dim=1))


def _step_direction(model: nn.Module, x, y, loss: str, damping: float,
                    jacobian: str = "auto") -> torch.Tensor:
    w0 = flat_params(model)
    opt = EGN(model, loss=loss, lr=1.0, damping=damping, jacobian=jacobian)
    opt.step(inputs=x, targets=y)
    return flat_params(model) - w0


@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "bce"])
@pytest.mark.parametrize("jacobian", ["auto", "explicit"])
def test_direction_equals_parameter_space_solve(loss: str, jacobian: str) -> None:
    model = tiny_mlp(0, DT)  # n = 6*8+8 + 8*5+5 + 5*3+3 = 119 <= 200
    x, y = _data(loss)
    ref = direct_direction(model, x, y, loss, damping=0.3)
    d = _step_direction(model, x, y, loss, 0.3, jacobian)
    torch.testing.assert_close(d, ref["d"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_gram_factor_path_equals_explicit_path_on_mixed_models(loss: str) -> None:
    for make, x in ((_InplaceMLP, _data(loss)[0]),
                    (_SeqShared, torch.randn(5, 3, 4, dtype=DT, generator=torch.Generator().manual_seed(1)))):
        _, y = _data(loss, b=x.shape[0])
        a, b_ = make(), make()
        da = _step_direction(a, x, y, loss, 0.2, "auto")
        db = _step_direction(b_, x, y, loss, 0.2, "explicit")
        torch.testing.assert_close(da, db, rtol=1e-10, atol=1e-12)
        ref = direct_direction(make(), x, y, loss, damping=0.2)
        torch.testing.assert_close(da, ref["d"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weight,bias,t", [(True, True, 1), (True, False, 1), (False, True, 1),
                                           (True, True, 3), (True, False, 40), (False, True, 40)])
def test_linear_gram_matches_rows(weight: bool, bias: bool, t: int) -> None:
    g = torch.Generator().manual_seed(t)
    a = torch.randn(4, t, 3, generator=g, dtype=DT)
    delta = torch.randn(4, 2, t, 2, generator=g, dtype=DT)
    rows = linear_jacobian_rows(a, delta, weight=weight, bias=bias)
    torch.testing.assert_close(linear_gram(a, delta, weight=weight, bias=bias), rows @ rows.T)


@pytest.mark.parametrize("loss", ["cross_entropy", "bce"])
def test_spd_form_equals_duncan_guttman_lu_form(loss: str) -> None:
    g = torch.Generator().manual_seed(0)
    b, c, lam = 5, 3, 0.07
    j = torch.randn(b * c, 11, generator=g, dtype=DT)
    k = j @ j.T
    z = torch.randn(b, c, generator=g, dtype=DT)
    if loss == "cross_entropy":
        y = torch.randint(0, c, (b,), generator=g)
    else:
        y = torch.rand(b, c, generator=g, dtype=DT)
    r2, s = egn_math.residual_and_factor(loss, z, y)
    r = r2.reshape(-1)
    q = torch.block_diag(*[si @ si.T for si in s])
    v_lu = torch.linalg.solve(q @ k + b * lam * torch.eye(b * c, dtype=DT), r)
    sol = egn_math.solve_coefficients(k, r, s, b, lam)
    assert sol.ok and sol.fallbacks == 0
    torch.testing.assert_close(sol.v, v_lu, rtol=1e-10, atol=1e-12)
    # Q's factor: S Sᵀ equals the true Hessian of the per-sample loss
    if loss == "cross_entropy":
        p = torch.softmax(z, -1)
        torch.testing.assert_close(q, torch.block_diag(*[torch.diag(pi) - torch.outer(pi, pi) for pi in p]))


def test_identities_and_gradient_consistency() -> None:
    model = tiny_mlp(1, DT)
    x, y = _data("cross_entropy", seed=4)
    ref = direct_direction(model, x, y, "cross_entropy", damping=0.5)
    jm, r, b = ref["J"], ref["r"], x.shape[0]
    k = jm @ jm.T
    _, s = egn_math.residual_and_factor("cross_entropy", ref["z"], y)
    v = egn_math.solve_coefficients(k, r, s, b, 0.5).v
    d = jm.T @ v
    g = ref["g"]
    torch.testing.assert_close(d, ref["d"], rtol=1e-10, atol=1e-12)
    assert abs(egn_math.directional_derivative(r, k @ v, b) - float(g @ d)) < 1e-12
    assert float(g @ d) < 0
    torch.testing.assert_close(jm @ d, k @ v)
    # −Jᵀr/b equals autograd's gradient of L_b
    m2 = copy.deepcopy(model)
    loss = torch.nn.functional.cross_entropy(m2(x), y)
    loss.backward()
    torch.testing.assert_close(g, torch.cat([p.grad.reshape(-1) for p in m2.parameters()]))
    # per-sample Jacobians from torch.func match central finite differences (one column)
    w = flat_params(model)
    col, eps = 17, 1e-6
    def outputs_at(wv):
        m3 = copy.deepcopy(model)
        torch.nn.utils.vector_to_parameters(wv, m3.parameters())
        with torch.no_grad():
            return m3(x).reshape(-1)
    e = torch.zeros_like(w)
    e[col] = eps
    fd = (outputs_at(w + e) - outputs_at(w - e)) / (2 * eps)
    torch.testing.assert_close(jm[:, col], fd, rtol=1e-6, atol=1e-8)


def test_linear_least_squares_one_step() -> None:
    g = torch.Generator().manual_seed(0)
    # N >= n: the least-squares solution
    x = torch.randn(30, 5, generator=g, dtype=DT)
    y = torch.randn(30, 2, generator=g, dtype=DT)
    lin = nn.Linear(5, 2).double()
    # With N > n the residual r has a part orthogonal to range(J); v carries it as r_perp/(bλ) and Jᵀ
    # cancels it only up to round-off u·‖J‖‖r_perp‖/(bλ). λ = 1e-8 balances that against the bias O(λ).
    EGN(lin, loss="mse", lr=1.0, damping=1e-8).step(inputs=x, targets=y)
    xa = torch.cat([x, torch.ones(30, 1, dtype=DT)], dim=1)
    sol = torch.linalg.lstsq(xa, y).solution  # [6, 2]
    torch.testing.assert_close(lin.weight.detach(), sol[:5].T, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lin.bias.detach(), sol[5], rtol=1e-6, atol=1e-7)
    # N < n: an interpolant with zero residual, the minimum-norm change from w0
    x = torch.randn(6, 20, generator=g, dtype=DT)
    y = torch.randn(6, 1, generator=g, dtype=DT)
    lin = nn.Linear(20, 1, bias=False).double()
    w0 = lin.weight.detach().clone()
    EGN(lin, loss="mse", lr=1.0, damping=1e-12).step(inputs=x, targets=y)
    with torch.no_grad():
        assert float((lin(x) - y).abs().max()) < 1e-8
    delta = (lin.weight.detach() - w0).reshape(-1)
    min_norm = torch.linalg.pinv(x) @ (y - x @ w0.T).reshape(-1)
    torch.testing.assert_close(delta, min_norm, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "bce"])
def test_large_damping_is_gradient_descent(loss: str) -> None:
    model = tiny_mlp(2, DT)
    x, y = _data(loss, seed=7)
    lam = 1e7
    g = direct_direction(model, x, y, loss, damping=lam)["g"]
    d = _step_direction(model, x, y, loss, lam)
    # bλ·d → −b·g, i.e. one step is gradient descent with lr 1/λ
    torch.testing.assert_close(lam * d, -g, rtol=1e-5, atol=1e-9)


def test_solve_falls_back_with_ten_times_damping() -> None:
    k = -torch.eye(4, dtype=DT)  # indefinite: K + bλI fails Cholesky until bλ > 1
    r = torch.arange(1.0, 5.0, dtype=DT)
    sol = egn_math.solve_coefficients(k, r, None, 1, 0.3)
    assert sol.ok and sol.fallbacks == 1 and sol.damping == pytest.approx(3.0)
    torch.testing.assert_close(sol.v, r / 2.0)
    bad = egn_math.solve_coefficients(k, r, None, 1, 1e-9, max_retries=2)
    assert not bad.ok and bad.fallbacks == 2


def test_loss_values_match_oracle() -> None:
    model = tiny_mlp(0, DT)
    for loss in ("mse", "cross_entropy", "bce"):
        x, y = _data(loss)
        with torch.no_grad():
            got = float(egn_math.loss_sum(loss, model(x), y)) / x.shape[0]
        assert got == pytest.approx(mean_loss(model, x, y, loss), rel=1e-12)


@pytest.mark.parametrize("make", [_InplaceMLP, _SeqShared])
def test_gradient_channel_from_factors_matches_the_oracle(make) -> None:
    # with momentum, g = −Jᵀr/b is read back from the factors like d; on the first step the bias-corrected
    # momentum direction is d itself, so the reported gᵀd is (factor g)·(factor d) against the oracle's
    x = _data("cross_entropy")[0] if make is _InplaceMLP else torch.randn(
        5, 3, 4, dtype=DT, generator=torch.Generator().manual_seed(1))
    _, y = _data("cross_entropy", b=x.shape[0])
    ref = direct_direction(make(), x, y, "cross_entropy", damping=0.2)
    model = make()
    w0 = flat_params(model)
    opt = EGN(model, loss="cross_entropy", lr=1.0, damping=0.2, momentum=0.9)
    opt.step(inputs=x, targets=y)
    torch.testing.assert_close(flat_params(model) - w0, ref["d"], rtol=1e-10, atol=1e-12)
    st = opt.statistics()
    assert st["momentum_used"] == 1.0
    assert st["gtd"] == pytest.approx(float(ref["g"] @ ref["d"]), rel=1e-10)
