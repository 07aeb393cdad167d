"""EGN's fast paths against float64 references: factor mat-vecs K·u, the SᵀJ factors (SᵀKS without
bc×bc×c products), the float32-factorization + float64-refinement solve, batched back-signals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_soaa.functional import egn as F
from lightning_soaa.functional.gram import (
    GramFactors,
    GramLayout,
    LinearFactorShape,
    assemble_gram,
    factors_to,
    gram_matvec,
    transform_factors,
)
from lightning_soaa.optim.egn import EGN, MIXED_MIN_SIZE
from lightning_soaa.optim.egn_capture import LinearCapture, checked_back_signals, plan_curvature
from tests.harness.models import tiny_mlp
from tests.unit._egn_oracle import direct_direction, flat_params

DT = torch.float64


def _factors(b: int, c: int, seed: int = 0, scale: float = 1.0) -> tuple[GramLayout, GramFactors]:
    """Two Linear sites (T=1 with weight+bias, T=3 weight only), a bias-only site, explicit rows."""
    g = torch.Generator().manual_seed(seed)
    sites = (LinearFactorShape(1, 5, 4), LinearFactorShape(3, 3, 2, bias=False),
             LinearFactorShape(1, 2, 3, weight=False), LinearFactorShape(0, 2, 2))
    linear = [(scale * torch.randn(b, s.positions, s.d_in, generator=g, dtype=DT),
               torch.randn(b, c, s.positions, s.d_out, generator=g, dtype=DT)) for s in sites]
    layout = GramLayout(num_outputs=c, class_targets=True, sites=sites, rest=4)
    z = torch.randn(b, c, generator=g, dtype=DT)
    y = torch.randint(0, c, (b,), generator=g)
    return layout, GramFactors(z, y, linear, torch.randn(b * c, 4, generator=g, dtype=DT))


def test_gram_matvec_and_transformed_factors_match_dense_products() -> None:
    layout, fac = _factors(b=6, c=3)
    k = assemble_gram(layout, fac)
    u = torch.randn(18, generator=torch.Generator().manual_seed(1), dtype=DT)
    torch.testing.assert_close(gram_matvec(layout, fac, u), k @ u, rtol=1e-12, atol=1e-12)
    _, s = F.residual_and_factor("cross_entropy", fac.outputs, fac.targets)
    assert s.shape == (6, 3, 2)  # cross-entropy's Q_i has rank c − 1: SᵀJ has c − 1 rows per sample
    stks = torch.einsum("iak,iajb,jbl->ikjl", s, k.view(6, 3, 6, 3), s).reshape(12, 12)
    sp = transform_factors(layout, fac, s)
    torch.testing.assert_close(assemble_gram(layout, sp), stks, rtol=1e-12, atol=1e-12)
    u2 = u[:12]
    torch.testing.assert_close(gram_matvec(layout, sp, u2), stks @ u2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_site_shortcuts_equal_the_products_bitwise(dtype: torch.dtype) -> None:
    # a network's last Linear has Δ_i = I: K·u and SᵀΔ skip the products with it, with the same bits
    b, c = 7, 4
    g = torch.Generator().manual_seed(6)
    sites = (LinearFactorShape(1, 5, 6), LinearFactorShape(1, 6, c))
    eye = torch.eye(c, dtype=dtype).expand(b, c, c).unsqueeze(2)
    linear = [(torch.randn(b, 1, 5, generator=g, dtype=dtype), torch.randn(b, c, 1, 6, generator=g, dtype=dtype)),
              (torch.randn(b, 1, 6, generator=g, dtype=dtype), eye)]
    layout = GramLayout(num_outputs=c, class_targets=True, sites=sites, rest=0)
    z = torch.randn(b, c, generator=g, dtype=dtype)
    plain = GramFactors(z, torch.randint(0, c, (b,), generator=g), linear, None)
    marked = GramFactors(plain.outputs, plain.targets, linear, None, identity=1)
    r, s = F.residual_and_factor("cross_entropy", z, plain.targets)
    assert torch.equal(gram_matvec(layout, marked, r.reshape(-1)), gram_matvec(layout, plain, r.reshape(-1)))
    for (a, d), (a_ref, d_ref) in zip(transform_factors(layout, marked, s).linear,
                                      transform_factors(layout, plain, s).linear):
        assert a is a_ref and d.shape == d_ref.shape and d.is_contiguous() and torch.equal(d, d_ref)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "bce"])
def test_float32_factorization_with_refinement_meets_float64(loss: str) -> None:
    b, c = 130, 4  # bc = 520: EGN solves such systems in float32 + refinement
    layout, fac = _factors(b, c, seed=2)
    g = torch.Generator().manual_seed(3)
    y = fac.targets if loss == "cross_entropy" else torch.rand(b, c, generator=g, dtype=DT)
    r2, s = F.residual_and_factor(loss, fac.outputs, y)
    r = r2.reshape(-1)
    k = assemble_gram(layout, fac)
    ref = F.solve_coefficients(k, r, s, b, 0.05)
    sp = fac if s is None else transform_factors(layout, fac, s)
    base32 = assemble_gram(layout, factors_to(sp, torch.float32))
    assert base32.dtype == torch.float32
    st_kr = F.apply_st(s, gram_matvec(layout, fac, r))
    sol = F.solve_damped(base32, r, st_kr, s, b, 0.05, apply_base=lambda x: gram_matvec(layout, sp, x))
    assert sol.ok and not sol.refine_failed and sol.refinements >= 1 and sol.v.dtype == DT
    torch.testing.assert_close(sol.v, ref.v, rtol=1e-12, atol=1e-12)


def _refined_and_direct(loss: str, damping: float) -> tuple[F.SolveResult, F.SolveResult]:
    """The float32-factored, float64-refined solve of a bc = 520 system and the float64 direct one."""
    b, c = 130, 4
    layout, fac = _factors(b, c, seed=2)
    y = fac.targets if loss == "cross_entropy" else torch.rand(b, c, generator=torch.Generator().manual_seed(3),
                                                               dtype=DT)
    r2, s = F.residual_and_factor(loss, fac.outputs, y)
    r = r2.reshape(-1)
    ref = F.solve_coefficients(assemble_gram(layout, fac), r, s, b, damping)
    sp = fac if s is None else transform_factors(layout, fac, s)
    base32 = assemble_gram(layout, factors_to(sp, torch.float32))
    st_kr = F.apply_st(s, gram_matvec(layout, fac, r))
    return F.solve_damped(base32, r, st_kr, s, b, damping, apply_base=lambda x: gram_matvec(layout, sp, x)), ref


@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "bce"])
def test_refinement_stops_at_the_error_its_measured_contraction_leaves(loss: str) -> None:
    # well conditioned (λ = 0.05): each sweep shrinks the correction ~1e6-fold, so after the second the error
    # left (~1e-6 of a ~1e-12 correction) is far below REFINE_TOL: 2 sweeps, where waiting for a correction
    # below REFINE_TOL itself took 3; float64's accuracy all the same
    sol, ref = _refined_and_direct(loss, 0.05)
    assert sol.ok and sol.refinements == 2, sol.refinements
    torch.testing.assert_close(sol.v, ref.v, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("damping", [1e-3, 1e-4, 1e-5])
def test_a_slower_refinement_is_not_stopped_early(damping: float) -> None:
    # worse conditioned: the corrections shrink by less than REFINE_RATE per sweep (at 1e-4 and 1e-5), so the
    # error is not extrapolated from them: the sweeps go on to the float64 solve's accuracy (~κ·eps64)
    sol, ref = _refined_and_direct("cross_entropy", damping)
    assert sol.ok and sol.refinements >= 3
    # (norm-wise: the float64 direct solve is itself ~1e-12 / 1e-11 off at 1e-4 / 1e-5)
    assert float((sol.v - ref.v).norm()) <= 1e-10 * float(ref.v.norm())


def test_refinement_that_cannot_reach_float64_says_so() -> None:
    # K of rank 4·… ≪ bc with λ = 1e-13: float32's Cholesky of K + bλI fails, the caller must re-solve
    layout, fac = _factors(130, 4, seed=4, scale=30.0)
    r = torch.randn(520, generator=torch.Generator().manual_seed(5), dtype=DT)
    base32 = assemble_gram(layout, factors_to(fac, torch.float32))
    sol = F.solve_damped(base32, r, r, None, 130, 1e-13, apply_base=lambda x: gram_matvec(layout, fac, x))
    assert sol.refine_failed and not sol.ok and sol.fallbacks == 0


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_egn_step_on_a_large_system_matches_the_parameter_space_oracle(loss: str) -> None:
    b, c = 112, 5  # b(c−1) = 448 >= MIXED_MIN_SIZE: float32 Gram + Cholesky, float64 refinement
    assert b * (c - 1) >= MIXED_MIN_SIZE
    g = torch.Generator().manual_seed(7)
    x = torch.randn(b, 6, generator=g, dtype=DT)
    y = torch.randint(0, c, (b,), generator=g) if loss == "cross_entropy" else torch.randn(b, c, generator=g,
                                                                                         dtype=DT)
    model = tiny_mlp(2, DT, sizes=(6, 8, 5))
    ref = direct_direction(tiny_mlp(2, DT, sizes=(6, 8, 5)), x, y, loss, damping=0.02)
    opt = EGN(model, loss=loss, lr=1.0, damping=0.02)
    w0 = flat_params(model)
    opt.step(inputs=x, targets=y)
    assert opt.statistics()["solve_refinements"] >= 1
    torch.testing.assert_close(flat_params(model) - w0, ref["d"], rtol=1e-10, atol=1e-12)


def test_batched_back_signals_equal_one_backward_per_output() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    trainable = dict(model.named_parameters())
    sites, _ = plan_curvature(model, trainable, "auto")
    x = torch.randn(5, 4, dtype=DT, generator=torch.Generator().manual_seed(0))
    cap = LinearCapture(sites, 5)
    with torch.enable_grad(), cap:
        z = model(x)
    got, coupled = checked_back_signals(z, cap.flat_outputs(), 3)
    assert coupled is None  # an MLP is per sample
    for j, y in enumerate(cap.flat_outputs()):
        for k in range(3):
            e = torch.zeros_like(z)
            e[:, k] = 1.0
            (ref,) = torch.autograd.grad(z, y, grad_outputs=e, retain_graph=True)
            torch.testing.assert_close(got[j][k], ref, rtol=0, atol=0)


@pytest.mark.parametrize("c", [2, 3, 10])
def test_cross_entropy_factor_has_c_minus_1_columns_and_reproduces_the_hessian(c: int) -> None:
    g = torch.Generator().manual_seed(c)
    z = torch.randn(40, c, generator=g, dtype=DT) * 3
    z[0] = torch.tensor([800.0] + [0.0] * (c - 1), dtype=DT)  # one-hot p: exact zeros and a 1
    z[1] = 0.0  # uniform p: every class the largest (argmax ties)
    z[2, -1] = 60.0  # the largest class last
    p = torch.softmax(z, -1)
    s = F.ce_factor(p)
    assert s.shape == (40, c, c - 1)
    hess = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    torch.testing.assert_close(s @ s.transpose(1, 2), hess, rtol=0, atol=1e-15)
    # the same Hessian as autograd's second derivative of the per-sample loss
    y = torch.randint(0, c, (1,), generator=g)
    h_auto = torch.autograd.functional.hessian(
        lambda zz: torch.nn.functional.cross_entropy(zz.unsqueeze(0), y, reduction="sum"), z[3])
    torch.testing.assert_close(s[3] @ s[3].T, h_auto, rtol=0, atol=1e-14)


@pytest.mark.parametrize("transformed", [False, True])
def test_lower_triangle_assembly_equals_the_full_gram(transformed: bool) -> None:
    b, c = 150, 4  # bc = 600: two or more row blocks of the staircase
    layout, fac = _factors(b, c, seed=11)
    full = assemble_gram(layout, fac)
    if transformed:
        _, s = F.residual_and_factor("cross_entropy", fac.outputs, fac.targets)
        fac = transform_factors(layout, fac, s)
        full = torch.einsum("iak,iajb,jbl->ikjl", s, full.view(b, c, b, c), s).reshape(b * 3, b * 3)
    lower = assemble_gram(layout, fac, lower_only=True)
    assert lower.shape == full.shape
    torch.testing.assert_close(lower.tril(), full.tril(), rtol=1e-12, atol=1e-12)
    # the Cholesky factors agree: the strict upper triangle is never read
    eye = 10.0 * torch.eye(full.shape[0], dtype=DT)
    torch.testing.assert_close(torch.linalg.cholesky(lower + eye), torch.linalg.cholesky(full + eye),
                               rtol=1e-10, atol=1e-12)


def test_transform_factors_refuses_a_factor_of_the_wrong_shape() -> None:
    layout, fac = _factors(6, 3)
    with pytest.raises(ValueError, match=r"\[6, 3, c' <= 3\]"):
        transform_factors(layout, fac, torch.zeros(6, 3, 4, dtype=DT))


@pytest.mark.parametrize("first_weight", [True, False])
def test_a_bc_288_system_is_assembled_as_a_two_block_staircase(first_weight: bool,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The digits MLP's system (b = 32, c = 10 under cross-entropy: bc' = 288) is assembled for the Cholesky
    as two row blocks: the second block's columns of the first block's rows are skipped (left zero), the
    lower triangle is the full SᵀKS (the first site's blocks are written into an uninitialised matrix: with
    its weight, or its bias alone; here one filled with NaN, so an entry left unwritten is seen whatever
    memory the allocator hands out)."""
    b, c = 32, 10
    g = torch.Generator().manual_seed(3)
    sites = (LinearFactorShape(1, 6, 16, weight=first_weight), LinearFactorShape(1, 16, 16),
             LinearFactorShape(1, 16, c))
    linear = [(torch.randn(b, 1, s.d_in, generator=g, dtype=DT), torch.randn(b, c, 1, s.d_out, generator=g, dtype=DT))
              for s in sites]
    layout = GramLayout(num_outputs=c, class_targets=True, sites=sites, rest=0)
    fac = GramFactors(torch.randn(b, c, generator=g, dtype=DT), torch.randint(0, c, (b,), generator=g), linear, None)
    _, s = F.residual_and_factor("cross_entropy", fac.outputs, fac.targets)
    fac = transform_factors(layout, fac, s)
    full = assemble_gram(layout, fac)
    empty = torch.empty
    with monkeypatch.context() as mp:
        mp.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(float("nan")))
        lower = assemble_gram(layout, fac, lower_only=True)
    n, half = b * (c - 1), b * (c - 1) // 2
    assert lower.shape == (n, n)
    assert not lower[:half, half:].any() and full[:half, half:].abs().min() > 0
    assert torch.isfinite(lower).all()
    torch.testing.assert_close(lower.tril(), full.tril(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_a_lower_triangle_assembly_is_differentiable(bias: bool) -> None:
    """assemble_gram(lower_only=True) of factors that require grad (the staircase's first site written into
    an uninitialised matrix) gives the gradients of the full assembly's lower triangle: a block written by
    ``mul(out=)`` would refuse them."""
    b, c = 32, 9  # bc = 288: two row blocks
    g = torch.Generator().manual_seed(4)
    sites = (LinearFactorShape(1, 6, 8, bias=bias), LinearFactorShape(1, 8, c))
    linear = [(torch.randn(b, 1, s.d_in, generator=g, dtype=DT).requires_grad_(),
               torch.randn(b, c, 1, s.d_out, generator=g, dtype=DT).requires_grad_()) for s in sites]
    layout = GramLayout(num_outputs=c, class_targets=False, sites=sites, rest=0)
    fac = GramFactors(torch.randn(b, c, generator=g, dtype=DT), torch.randn(b, c, generator=g, dtype=DT), linear,
                      None)
    leaves = [t for pair in linear for t in pair]
    want = torch.autograd.grad(assemble_gram(layout, fac).tril().sum(), leaves, allow_unused=True)
    got = torch.autograd.grad(assemble_gram(layout, fac, lower_only=True).tril().sum(), leaves, allow_unused=True)
    for w, h in zip(want, got):
        assert (w is None) == (h is None)
        if w is not None:
            torch.testing.assert_close(h, w, rtol=1e-12, atol=1e-10)
