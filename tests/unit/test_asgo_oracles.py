"""ASGO / DASGO update rules against the float64 oracles of algorithms.md §4 (ASGO 1-6), one process."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import lightning_soaa.optim.asgo as asgo_mod
from lightning_soaa import ASGO, DASGO
from lightning_soaa.functional.asgo import rms_factor, rms_numerator
from lightning_soaa.functional.linalg import inv_sqrt_eigh

f64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _one_step_update(opt: torch.optim.Optimizer, w: nn.Parameter, g: torch.Tensor) -> torch.Tensor:
    """Apply one step with gradient g; return U = -(W_new - W_old)/lr (lr=1, wd=0 in these tests)."""
    before = w.detach().clone()
    w.grad = g.clone()
    opt.step()
    return before - w.detach()


def _direction(mom: torch.Tensor, g: torch.Tensor, beta1: float, nesterov: bool) -> torch.Tensor:
    """What is preconditioned: the momentum M_t (the paper's rule, ``nesterov=False``) or, by default, Muon's
    Nesterov direction beta1 M_t + (1 - beta1) G_t."""
    return beta1 * mom + (1 - beta1) * g if nesterov else mom


#: each oracle of the rule checks the paper's rule and the default
NESTEROV = pytest.mark.parametrize("nesterov", [False, True], ids=["paper", "nesterov"])


def _polar(g: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (6, 6), (1, 7), (7, 1)])
@pytest.mark.parametrize("method,tol", [("eigh", 1e-11), ("polar_express", 1e-8), ("newton_schulz", 1e-8),
                                        ("polar_express_eigh", 1e-8)])
def test_polar_factor_oracle(shape, method, tol):
    # beta1 = beta2 = 0 and an exact root: U = 0.2 sqrt(mn) polar(G)/||polar(G)||_F (Muon without momentum)
    m, n = shape
    w = nn.Parameter(torch.randn(m, n, dtype=f64, generator=_gen(1)))
    opt = ASGO([w], lr=1.0, betas=(0.0, 0.0), weight_decay=0.0, inverse_root=method)
    for t in range(3):
        g = torch.randn(m, n, dtype=f64, generator=_gen(10 + t))
        u = _one_step_update(opt, w, g)
        pol = _polar(g)
        expected = 0.2 * math.sqrt(m * n) * pol / torch.linalg.matrix_norm(pol)
        torch.testing.assert_close(u, expected, rtol=tol, atol=tol)


def test_polar_factor_oracle_rank_deficient_gradient_with_eigh():
    # rank(G) = 2 < min(m, n): the pseudo-inverse root still gives the polar factor on the range
    m, n = 4, 7
    a = torch.randn(m, 2, dtype=f64, generator=_gen(2))
    b = torch.randn(2, n, dtype=f64, generator=_gen(3))
    g = a @ b
    w = nn.Parameter(torch.zeros(m, n, dtype=f64))
    opt = ASGO([w], lr=1.0, betas=(0.0, 0.0), weight_decay=0.0, inverse_root="eigh")
    u = _one_step_update(opt, w, g)
    uu, s, vh = torch.linalg.svd(g, full_matrices=False)
    pol = uu[:, :2] @ vh[:2]
    expected = 0.2 * math.sqrt(m * n) * pol / torch.linalg.matrix_norm(pol)
    torch.testing.assert_close(u, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("m", [16, 64])
def test_float32_eigh_rank_deficient_gradient_is_the_float64_polar_factor(m):
    # A float32 Gram of rank m/4: its null space holds rounding noise that a cut-off of 1e-12 inverted (the
    # update 3e-4 to 7e-4 off the float64 oracle); below 4 eps of the largest eigenvalue it counts as zero.
    n, r = 2 * m, m // 4
    g = (torch.randn(m, r, dtype=f64, generator=_gen(m)) @ torch.randn(r, n, dtype=f64, generator=_gen(m + 1)))
    g = g.float().double()  # float32-exact, so both runs see the same gradient
    w = nn.Parameter(torch.zeros(m, n))
    opt = ASGO([("w", w)], lr=1.0, betas=(0.0, 0.0), weight_decay=0.0, inverse_root="eigh")
    u = _one_step_update(opt, w, g.float()).double()
    uu, _, vh = torch.linalg.svd(g, full_matrices=False)
    pol = uu[:, :r] @ vh[:r]
    expected = 0.2 * math.sqrt(m * n) * pol / torch.linalg.matrix_norm(pol)
    err = (torch.linalg.matrix_norm(u - expected) / torch.linalg.matrix_norm(expected)).item()
    assert err < 1e-5, err


@pytest.mark.parametrize(("m", "n"), [(16, 24), (24, 16)])
def test_float32_default_root_of_a_rank_deficient_gram_is_the_float64_one(m, n):
    # G of rank 12 < k = 16, singular values 1 to 1e-3 (V's eigenvalues down to ~1e-6 s, where the map is exact):
    # taken from the Gram rounded to float32 (its null space and smallest eigenvalues rounding noise), the
    # default root of a float32 run put the update 8e-3 to 2e-2 off the float64 run's; from the float64 V,
    # ~7e-5 (the float32 map's floor on G's own float32 rounding, ~1e-8 of it, outside its rank-12 part)
    r = 12
    u_, _, vh = torch.linalg.svd(torch.randn(m, n, dtype=f64, generator=_gen(m)), full_matrices=False)
    g = ((u_[:, :r] * torch.logspace(0.0, -3.0, r, dtype=f64)) @ vh[:r]).float()
    updates = []
    for dtype in (torch.float32, f64):
        w = nn.Parameter(torch.zeros(m, n, dtype=dtype))
        opt = ASGO([("w", w)], lr=1.0, betas=(0.0, 0.0), weight_decay=0.0)  # inverse_root "auto", no damping
        updates.append(_one_step_update(opt, w, g.to(dtype)).double())
    err = (torch.linalg.matrix_norm(updates[0] - updates[1]) / torch.linalg.matrix_norm(updates[1])).item()
    assert err < 1e-3, err


@NESTEROV
@pytest.mark.parametrize("method", ["polar_express", "eigh", "polar_express_eigh"])
def test_row_vector_is_normalised_momentum(method, nesterov):
    # m = 1: V is a scalar, U = 0.2 sqrt(n) D/||D||_F exactly (D = M under the paper's rule); ||U||_F = 0.2 sqrt(mn)
    n = 11
    w = nn.Parameter(torch.zeros(1, n, dtype=f64))
    opt = ASGO([w], lr=1.0, betas=(0.9, 0.8), weight_decay=0.0, inverse_root=method, nesterov=nesterov)
    mom = torch.zeros(1, n, dtype=f64)
    for t in range(6):
        g = torch.randn(1, n, dtype=f64, generator=_gen(t))
        mom = 0.9 * mom + 0.1 * g
        d = _direction(mom, g, 0.9, nesterov)
        u = _one_step_update(opt, w, g)
        torch.testing.assert_close(u, 0.2 * math.sqrt(n) * d / d.norm(), rtol=1e-12, atol=1e-14)
        assert abs(u.norm().item() - 0.2 * math.sqrt(n)) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(f64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("method", ["polar_express", "newton_schulz", "eigh", "polar_express_eigh"])
def test_norm_invariant(dtype, tol, method):
    shapes = [(3, 8), (8, 3), (6, 6), (2, 3, 2, 2)]
    ws = [nn.Parameter(torch.randn(s, dtype=dtype, generator=_gen(i))) for i, s in enumerate(shapes)]
    opt = ASGO(ws, lr=1.0, weight_decay=0.0, inverse_root=method)
    for t in range(4):
        before = [w.detach().clone() for w in ws]
        for i, w in enumerate(ws):
            w.grad = torch.randn(w.shape, dtype=dtype, generator=_gen(100 * t + i))
        opt.step()
        for w, b in zip(ws, before):
            target = 0.2 * math.sqrt(w.numel())
            assert abs((b - w.detach()).double().norm().item() / target - 1) < tol


@pytest.mark.parametrize("method", ["polar_express", "eigh", "polar_express_eigh"])
def test_transpose_equivariance(method):
    m, n = 4, 9
    w1 = nn.Parameter(torch.randn(m, n, dtype=f64, generator=_gen(5)))
    w2 = nn.Parameter(w1.detach().T.clone())
    o1 = ASGO([w1], lr=0.1, inverse_root=method)
    o2 = ASGO([w2], lr=0.1, inverse_root=method)
    for t in range(5):
        g = torch.randn(m, n, dtype=f64, generator=_gen(20 + t))
        w1.grad, w2.grad = g.clone(), g.T.clone()
        o1.step()
        o2.step()
        torch.testing.assert_close(w2.detach(), w1.detach().T, rtol=1e-12, atol=1e-12)


def test_rotation_equivariance_on_the_preconditioned_side():
    # G -> O G (left side, O orthogonal m x m) gives U -> O U: the Polar Express polynomials commute with O
    m, n = 5, 12
    o, _ = torch.linalg.qr(torch.randn(m, m, dtype=f64, generator=_gen(7)))
    w1 = nn.Parameter(torch.zeros(m, n, dtype=f64))
    w2 = nn.Parameter(torch.zeros(m, n, dtype=f64))
    o1 = ASGO([w1], lr=1.0, weight_decay=0.0)
    o2 = ASGO([w2], lr=1.0, weight_decay=0.0)
    for t in range(4):
        g = torch.randn(m, n, dtype=f64, generator=_gen(40 + t))
        u1 = _one_step_update(o1, w1, g)
        u2 = _one_step_update(o2, w2, o @ g)
        torch.testing.assert_close(u2, o @ u1, rtol=1e-10, atol=1e-10)


@NESTEROV
def test_orthogonal_rows_give_per_row_rms_normalisation(nesterov):
    # rows with disjoint column supports: G G^T diagonal at every step, V diagonal, U_i ~ D_i / sqrt(V_ii)
    m, n = 3, 9
    mask = torch.zeros(m, n, dtype=f64)
    for i in range(m):
        mask[i, 3 * i:3 * i + 3] = 1.0
    w = nn.Parameter(torch.zeros(m, n, dtype=f64))
    opt = ASGO([w], lr=1.0, betas=(0.9, 0.8), weight_decay=0.0, inverse_root="eigh", nesterov=nesterov)
    mom = torch.zeros(m, n, dtype=f64)
    v = torch.zeros(m, dtype=f64)
    for t in range(5):
        g = torch.randn(m, n, dtype=f64, generator=_gen(60 + t)) * mask
        mom = 0.9 * mom + 0.1 * g
        v = 0.8 * v + 0.2 * (g * g).sum(1)
        u = _one_step_update(opt, w, g)
        expected = _direction(mom, g, 0.9, nesterov) / v.sqrt().unsqueeze(1)
        expected = 0.2 * math.sqrt(m * n) * expected / expected.norm()
        torch.testing.assert_close(u, expected, rtol=1e-11, atol=1e-12)


@NESTEROV
def test_full_reference_with_momentum_damping_and_weight_decay(nesterov):
    # the whole rule of the ASGO docstring, in float64, against the optimizer over several steps
    m, n, lr, wd, delta = 6, 4, 0.05, 0.1, 1e-3  # right side (m >= n)
    w = nn.Parameter(torch.randn(m, n, dtype=f64, generator=_gen(8)))
    ref = w.detach().clone()
    opt = ASGO([w], lr=lr, weight_decay=wd, damping=delta, inverse_root="eigh", nesterov=nesterov)
    mom = torch.zeros(m, n, dtype=f64)
    v = torch.zeros(n, n, dtype=f64)
    for t in range(5):
        g = torch.randn(m, n, dtype=f64, generator=_gen(80 + t))
        mom = 0.9 * mom + 0.1 * g
        v = 0.8 * v + 0.2 * g.T @ g
        vd = v + delta * torch.trace(v) / n * torch.eye(n, dtype=f64)
        evals, evecs = torch.linalg.eigh(vd)
        u = _direction(mom, g, 0.9, nesterov) @ (evecs * evals.rsqrt()) @ evecs.T
        u = 0.2 * math.sqrt(m * n) * u / u.norm()
        ref = ref * (1 - lr * wd) - lr * u
        w.grad = g
        opt.step()
        torch.testing.assert_close(w.detach(), ref, rtol=1e-11, atol=1e-12)


def test_zero_update_is_guarded():
    w = nn.Parameter(torch.ones(3, 5, dtype=f64))
    opt = ASGO([w], lr=0.1, weight_decay=0.1)
    w.grad = torch.zeros(3, 5, dtype=f64)
    opt.step()
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.detach(), torch.full((3, 5), 1 - 0.1 * 0.1, dtype=f64))


@pytest.mark.parametrize("cls", [ASGO, DASGO])
@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_zero_update_of_a_large_block_stays_zero(cls, dtype):
    # rms_scale * sqrt(mn) = 6.9 > 4: 1 / tiny times it overflowed, and 0 * inf made every entry NaN
    w = nn.Parameter(torch.ones(30, 40, dtype=dtype))
    opt = cls([w], lr=0.1, weight_decay=0.1)
    w.grad = torch.zeros(30, 40, dtype=dtype)
    opt.step()
    assert torch.equal(w.detach(), torch.full((30, 40), 1 - 0.1 * 0.1, dtype=dtype))


@NESTEROV
def test_root_every_reuses_the_stored_preconditioner(nesterov):
    m, n = 4, 7
    w = nn.Parameter(torch.zeros(m, n, dtype=f64))
    opt = ASGO([w], lr=1.0, weight_decay=0.0, root_every=3, inverse_root="eigh", nesterov=nesterov)
    mom = torch.zeros(m, n, dtype=f64)
    v = torch.zeros(m, m, dtype=f64)
    p = None
    for t in range(7):
        g = torch.randn(m, n, dtype=f64, generator=_gen(90 + t))
        mom = 0.9 * mom + 0.1 * g
        v = 0.8 * v + 0.2 * g @ g.T
        if t % 3 == 0:  # steps 1, 4, 7 recompute
            p = inv_sqrt_eigh(v)
        u = _one_step_update(opt, w, g)
        expected = p @ _direction(mom, g, 0.9, nesterov)
        expected = 0.2 * math.sqrt(m * n) * expected / expected.norm()
        torch.testing.assert_close(u, expected, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(opt.state[w]["inv_root"], p)


@NESTEROV
def test_non_finite_root_keeps_previous_preconditioner_and_is_counted(monkeypatch, caplog, nesterov):
    m, n = 3, 6
    w = nn.Parameter(torch.zeros(m, n, dtype=f64))
    opt = ASGO([w], lr=1.0, weight_decay=0.0, nesterov=nesterov)
    real = asgo_mod.pending_inverse_sqrt
    calls = {"n": 0}

    def flaky(v, *a, **k):
        calls["n"] += 1
        pending = real(v, *a, **k)
        return dataclasses.replace(pending, roots=pending.roots * float("nan")) if calls["n"] == 2 else pending

    monkeypatch.setattr(asgo_mod, "pending_inverse_sqrt", flaky)
    g1 = torch.randn(m, n, dtype=f64, generator=_gen(1))
    _one_step_update(opt, w, g1)
    p1 = opt.state[w]["inv_root"].clone()
    g2 = torch.randn(m, n, dtype=f64, generator=_gen(2))
    with caplog.at_level("WARNING"):
        u2 = _one_step_update(opt, w, g2)
    assert "keeping the previous preconditioner" in caplog.text
    torch.testing.assert_close(opt.state[w]["inv_root"], p1)  # kept, not the identity
    mom = 0.9 * (0.1 * g1) + 0.1 * g2
    expected = p1 @ _direction(mom, g2, 0.9, nesterov)
    torch.testing.assert_close(u2, 0.2 * math.sqrt(m * n) * expected / expected.norm())
    assert opt.statistics()["asgo_root_fallbacks"] == 1.0
    _one_step_update(opt, w, g1)  # step 3 is fine again
    assert opt.statistics()["asgo_root_fallbacks"] == 1.0


@NESTEROV
def test_non_finite_first_root_uses_eigh_and_is_counted(monkeypatch, nesterov):
    m, n = 3, 6
    w = nn.Parameter(torch.zeros(m, n, dtype=f64))
    opt = ASGO([w], lr=1.0, weight_decay=0.0, damping=1e-4, nesterov=nesterov)
    monkeypatch.setattr(asgo_mod, "pending_inverse_sqrt",
                        lambda v, *a, **k: asgo_mod.PendingRoots(torch.full_like(v, float("nan")), None))
    g = torch.randn(m, n, dtype=f64, generator=_gen(4))
    u = _one_step_update(opt, w, g)
    v = 0.2 * g @ g.T
    p = inv_sqrt_eigh(v + 1e-4 * torch.trace(v) / m * torch.eye(m, dtype=f64))
    expected = p @ _direction(0.1 * g, g, 0.9, nesterov)
    torch.testing.assert_close(u, 0.2 * math.sqrt(m * n) * expected / expected.norm())
    assert opt.statistics()["asgo_root_fallbacks"] == 1.0


def test_dasgo_reference():
    m, n, lr, wd, eps = 5, 3, 0.05, 0.1, 1e-8
    w = nn.Parameter(torch.randn(m, n, dtype=f64, generator=_gen(9)))
    b = nn.Parameter(torch.zeros(n, dtype=f64))
    ref = w.detach().clone()
    opt = DASGO([w, b], lr=lr, weight_decay=wd, eps=eps)
    mom = torch.zeros(m, n, dtype=f64)
    v = torch.zeros(n, dtype=f64)
    for t in range(5):
        g = torch.randn(m, n, dtype=f64, generator=_gen(120 + t))
        mom = 0.9 * mom + 0.1 * g
        v = 0.95 * v + 0.05 * (g * g).sum(0)
        u = mom / (v + eps).sqrt()
        u = 0.2 * math.sqrt(m * n) * u / u.norm()
        ref = ref * (1 - lr * wd) - lr * u
        w.grad = g
        b.grad = torch.ones(n, dtype=f64)
        opt.step()
        torch.testing.assert_close(w.detach(), ref, rtol=1e-12, atol=1e-13)
    assert "col_stat" in opt.state[w] and "exp_avg_sq" in opt.state[b]  # b went to AdamW


def _tail_reference(opt: ASGO | DASGO, pi: int, w0: torch.Tensor, lr: float, wd: float) -> torch.Tensor:
    """Parameter ``pi`` after one step by the simple formula, blocks one at a time, from the step's own
    stored state: U (ASGO: P M or M P of each block, normalised per block; DASGO: M (v + eps)^{-1/2},
    normalised over the whole parameter), U * rms_scale * sqrt(numel) / ||U||_F, W (1 - lr wd) - lr U."""
    group = opt.param_groups[opt.block_table.by_param[pi][0].group_index]
    pieces = []
    for b in opt.block_table.by_param[pi]:
        st = opt.block_state(b)
        if isinstance(opt, DASGO):
            pieces.append((b, st["exp_avg"] * (st["col_stat"] + group["eps"]).rsqrt()))
        else:
            m, n = st["exp_avg"].shape
            left = m < n
            pieces.append((b, st["inv_root"] @ st["exp_avg"] if left else st["exp_avg"] @ st["inv_root"]))
    whole = math.sqrt(sum(float(u.norm()) ** 2 for _, u in pieces))
    ref = w0.clone()
    for b, u in pieces:
        norm, numel = (whole, w0.numel()) if isinstance(opt, DASGO) else (float(u.norm()), u.numel())
        u = u * group["rms_scale"] * math.sqrt(numel) / norm
        b.view(ref).copy_(b.view(w0) * (1 - lr * wd) - lr * u.reshape(b.shape))
    return ref


@pytest.mark.parametrize("cls,kw", [(ASGO, dict(max_block_size=48)), (DASGO, dict(max_block_numel=2000))])
def test_batched_tail_equals_the_per_block_formula(cls, kw):
    # The step normalises and applies all blocks at once (functional rms_factor over a vector of norms,
    # multi-tensor ops grouped by lr and weight decay); per parameter it must be the simple formula.
    # Both sides of the preconditioner, a row vector, split parameters (ASGO: 3 row blocks, each
    # normalised alone; DASGO: column blocks normalised together) and two groups with different lr, wd.
    g = _gen(31)
    shapes = [(30, 100), (100, 30), (20, 20), (1, 50), (120, 200)]
    ws = [nn.Parameter(torch.randn(s, generator=g, dtype=f64)) for s in shapes]
    before = [w.detach().clone() for w in ws]
    hyper = [(0.05, 0.1), (0.02, 0.0)]
    opt = cls([{"params": ws[:3], "lr": hyper[0][0], "weight_decay": hyper[0][1]},
               {"params": ws[3:], "lr": hyper[1][0], "weight_decay": hyper[1][1]}], rms_scale=0.3, **kw)
    assert len(opt.block_table.by_param[4]) > 1  # a split parameter
    for w in ws:
        w.grad = torch.randn(w.shape, generator=g, dtype=f64)
    opt.step()
    for pi, (w, w0) in enumerate(zip(ws, before)):
        lr, wd = hyper[0] if pi < 3 else hyper[1]
        torch.testing.assert_close(w.detach(), _tail_reference(opt, pi, w0, lr, wd), rtol=1e-13, atol=1e-15)


def test_rms_factor_rounds_alike_batched_and_alone():
    # The step computes most blocks' factors as one vector (tensor numerators) and a split or sharded
    # block's alone (a float numerator): both must round alike, in float32 too; a zero norm is finite.
    norms = torch.rand(500, generator=_gen(5)) * 100
    norms[7] = 0.0
    numels = [int(n) for n in torch.randint(1, 10**6, (500,), generator=_gen(6))]
    numer = [rms_numerator(0.2, n) for n in numels]
    batched = rms_factor(norms, torch.tensor(numer, dtype=norms.dtype))
    alone = torch.stack([rms_factor(norms[i], numer[i]) for i in range(len(numer))])
    assert torch.equal(batched, alone) and torch.isfinite(batched).all()
