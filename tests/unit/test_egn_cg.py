"""EGN's matrix-free conjugate-gradient solve against the exact float64 solve: the solver itself
(well and ill conditioned, budget exhausted, non-finite operator), the factor operator, and whole EGN
steps that take the CG path, fall back from it to the direct solve, and resume it."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_soaa.functional import egn as F
from lightning_soaa.functional.gram import GramOperator, assemble_gram, transform_factors
from lightning_soaa.optim.egn import CG_MIN_SIZE, CG_PAUSE_STEPS, EGN
from tests.harness.models import tiny_mlp
from tests.unit._egn_oracle import direct_direction, flat_params
from tests.unit.test_egn_direction import _data
from tests.unit.test_egn_fast_paths import _factors

DT = torch.float64


def _spd_psd(n: int, rank: int, top: float, seed: int) -> torch.Tensor:
    """A PSD matrix of the given rank whose eigenvalues spread log-uniformly over [1e-3·top, top]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=DT))
    ev = top * torch.logspace(-3, 0, rank, dtype=DT)
    return (q * ev) @ q.T


@pytest.mark.parametrize("shift", [10.0, 1.0])  # κ ≈ 11 and κ ≈ 100 (low damping)
def test_conjugate_gradient_meets_the_exact_solve(shift: float) -> None:
    a = _spd_psd(300, 120, 100.0, seed=1)
    rhs = torch.randn(300, generator=torch.Generator().manual_seed(2), dtype=DT)
    ref = torch.linalg.solve(a + shift * torch.eye(300, dtype=DT), rhs)
    x, used = F.conjugate_gradient(lambda u: a @ u, rhs, shift, max_iter=2000)
    assert x is not None and used >= 2
    # the guaranteed bound: ‖x − x*‖ ≤ CG_TOL·‖x‖
    assert float((x - ref).norm()) <= F.CG_TOL * float(x.norm()) * 1.01
    torch.testing.assert_close(x, ref, rtol=1e-11, atol=1e-13)


def test_conjugate_gradient_gives_up_within_its_budget_and_on_nan() -> None:
    a = _spd_psd(300, 120, 100.0, seed=3)
    rhs = torch.randn(300, generator=torch.Generator().manual_seed(4), dtype=DT)
    x, used = F.conjugate_gradient(lambda u: a @ u, rhs, 0.1, max_iter=10)
    assert x is None and used == 10
    # κ ≈ 1e6: float64 round-off keeps the residual above what would guarantee CG_TOL, so even a large
    # budget ends without a value rather than with an unverified one
    x, used = F.conjugate_gradient(lambda u: a @ u, rhs, 1e-4, max_iter=3000)
    assert x is None and used >= 3000
    calls = []

    def poisoned(u: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return a @ u if len(calls) < 3 else torch.full_like(u, math.nan)

    x, used = F.conjugate_gradient(poisoned, rhs, 1.0, max_iter=100)
    assert x is None and used == 3
    # a zero right-hand side is solved by x = 0 without touching the operator
    x, used = F.conjugate_gradient(poisoned, torch.zeros(300, dtype=DT), 1.0, max_iter=100)
    assert x is not None and used == 0 and not bool(x.any())
    with pytest.raises(ValueError, match="shift > 0"):
        F.conjugate_gradient(lambda u: a @ u, rhs, 0.0, max_iter=5)


@pytest.mark.parametrize("shift", [10.0, 1.0, 1e-4])
def test_conjugate_gradient_lookahead_takes_the_same_bits(shift: float) -> None:
    """The look-ahead (the default off the CPU: one host read per iteration) forms β on the device and
    reads the next pᵀAp with the stopping test: the same x, bit for bit, for one more operator
    application per recurrence cycle; it gives up where the plain loop does (budget, NaN)."""
    a = _spd_psd(300, 120, 100.0, seed=11)
    rhs = torch.randn(300, generator=torch.Generator().manual_seed(12), dtype=DT)
    for max_iter in (3000, 10):
        plain, used = F.conjugate_gradient(lambda u: a @ u, rhs, shift, max_iter=max_iter, lookahead=False)
        ahead, used_ahead = F.conjugate_gradient(lambda u: a @ u, rhs, shift, max_iter=max_iter, lookahead=True)
        assert (plain is None) == (ahead is None)
        if plain is not None and ahead is not None:
            assert torch.equal(plain, ahead) and used < used_ahead <= used + 4
    calls = []

    def poisoned(u: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return a @ u if len(calls) < 3 else torch.full_like(u, math.nan)

    x, used = F.conjugate_gradient(poisoned, rhs, 1.0, max_iter=100, lookahead=True)
    assert x is None and used == 3


@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "bce"])
@pytest.mark.parametrize("damping", [0.5, 0.02, 1e-6])
def test_solve_damped_cg_equals_the_dense_float64_solve(loss: str, damping: float) -> None:
    b, c = 40, 4
    layout, fac = _factors(b, c, seed=5)
    g = torch.Generator().manual_seed(6)
    y = fac.targets if loss == "cross_entropy" else torch.rand(b, c, generator=g, dtype=DT)
    r2, s = F.residual_and_factor(loss, fac.outputs, y)
    r = r2.reshape(-1)
    ref = F.solve_coefficients(assemble_gram(layout, fac), r, s, b, damping)
    sp = fac if s is None else transform_factors(layout, fac, s)
    st_kr = F.apply_st(s, GramOperator(layout, fac)(r))
    sol = F.solve_damped_cg(GramOperator(layout, sp), r, st_kr, s, b, damping, max_iter=5000)
    if damping < 1e-3:  # κ ~ 1e7: CG cannot guarantee float64 accuracy; it must say so, not guess
        assert not sol.ok and sol.refine_failed and sol.cg_iterations >= 5000
        return
    assert sol.ok and sol.cg_iterations >= 2 and sol.fallbacks == 0 and sol.damping == damping
    torch.testing.assert_close(sol.v, ref.v, rtol=1e-10, atol=1e-12)
    # a budget too small: no value, and the caller is told to solve another way
    short = F.solve_damped_cg(GramOperator(layout, sp), r, st_kr, s, b, damping, max_iter=1)
    assert not short.ok and short.refine_failed and bool(short.v.isnan().all())


def test_gram_operator_counts_flops_and_matches_dense_products() -> None:
    layout, fac = _factors(7, 3, seed=8)
    op = GramOperator(layout, fac)
    k = assemble_gram(layout, fac)
    u = torch.randn(21, generator=torch.Generator().manual_seed(9), dtype=DT)
    torch.testing.assert_close(op(u), k @ u, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op(2.0 * u), 2.0 * (k @ u), rtol=1e-12, atol=1e-12)  # reusable
    assert op.flops() > 0


def _problem(loss: str, b: int, c: int):
    return _data(loss, b=b, c=c, seed=10)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_egn_step_by_conjugate_gradients_matches_the_parameter_space_oracle(loss: str) -> None:
    b, c = 130, 5  # b(c−1) = 520 and bc = 650 >= CG_MIN_SIZE
    assert b * (c - 1) >= CG_MIN_SIZE
    x, y = _problem(loss, b, c)
    ref = direct_direction(tiny_mlp(2, DT, sizes=(6, 8, 5)), x, y, loss, damping=0.5)
    model = tiny_mlp(2, DT, sizes=(6, 8, 5))
    opt = EGN(model, loss=loss, lr=1.0, damping=0.5)
    w0 = flat_params(model)
    opt.step(inputs=x, targets=y)
    st = opt.statistics()
    assert st["solve_cg_iterations"] >= 2 and st["solve_refinements"] == 0
    torch.testing.assert_close(flat_params(model) - w0, ref["d"], rtol=1e-10, atol=1e-12)


def test_egn_falls_back_from_conjugate_gradients_at_low_damping_and_pauses_them() -> None:
    b, c = 130, 5
    x, y = _problem("cross_entropy", b, c)
    damping = 1e-4  # κ beyond what CG can do within its budget of n/16 mat-vecs
    ref = direct_direction(tiny_mlp(2, DT, sizes=(6, 8, 5)), x, y, "cross_entropy", damping=damping)
    model = tiny_mlp(2, DT, sizes=(6, 8, 5))
    opt = EGN(model, loss="cross_entropy", lr=1.0, damping=damping)
    w0 = flat_params(model)
    calls = []
    orig = F.solve_damped_cg

    def spy(*args, **kw):
        calls.append(kw["max_iter"])
        return orig(*args, **kw)

    F.solve_damped_cg = spy
    try:
        opt.step(inputs=x, targets=y)
        assert len(calls) == 1 and opt._cg_pause == CG_PAUSE_STEPS  # tried, failed: paused
        resumed = EGN(tiny_mlp(2, DT, sizes=(6, 8, 5)), loss="cross_entropy", lr=1.0, damping=damping)
        resumed.load_state_dict(opt.state_dict())  # a resumed run takes the same solve path
        assert resumed._cg_pause == CG_PAUSE_STEPS
        st = opt.statistics()
        assert st["solve_cg_iterations"] == 0  # the direction came from the direct solve
        torch.testing.assert_close(flat_params(model) - w0, ref["d"], rtol=1e-9, atol=1e-11)
        opt.damping = 0.5
        for _ in range(CG_PAUSE_STEPS):  # paused: straight to the direct solve, even though CG would do
            opt.step(inputs=x, targets=y)
            assert opt.statistics()["solve_cg_iterations"] == 0
        assert len(calls) == 1 and opt._cg_pause == 0
        opt.step(inputs=x, targets=y)  # tried again
        assert len(calls) == 2 and opt.statistics()["solve_cg_iterations"] >= 2
    finally:
        F.solve_damped_cg = orig


@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "bce"])
@pytest.mark.parametrize("small_max", [0, 128])  # 0: the factor-transform direct path for every size
def test_small_dense_and_factored_direct_paths_match_the_oracle(loss: str, small_max: int, monkeypatch) -> None:
    import lightning_soaa.optim.egn as egn_module

    monkeypatch.setattr(egn_module, "SMALL_DENSE_MAX", small_max)
    b, c = 20, 3  # bc = 60: the whole-K path when small_max = 128
    x, y = _data(loss, b=b, c=c, seed=12)
    ref = direct_direction(tiny_mlp(3, DT), x, y, loss, damping=0.05)
    model = tiny_mlp(3, DT)
    opt = EGN(model, loss=loss, lr=1.0, damping=0.05)
    w0 = flat_params(model)
    opt.step(inputs=x, targets=y)
    torch.testing.assert_close(flat_params(model) - w0, ref["d"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.tensor(opt.statistics()["gtd"], dtype=DT), ref["g"].dot(ref["d"]),
                               rtol=1e-10, atol=1e-14)
