"""Inverse square roots (functional/linalg.py) against a float64 eigh reference."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_soaa.functional.linalg import (
    EIGH_NOISE_ULPS,
    FLOOR_MIN_ITERS,
    NEWTON_SCHULZ_COEFFS,
    POLAR_EXPRESS_COEFFS,
    ROOT_METHODS,
    _polish_keeps_sign,
    coupled_scalar_map,
    damp,
    default_root_iters,
    eigh_rcond,
    inv_sqrt_coupled,
    inv_sqrt_eigh,
    inv_sqrt_spectral,
    inverse_sqrt,
    pad_batch,
    pending_inverse_sqrt,
    resolve_root_method,
    root_compute_dtype,
    root_floor,
)


def _spd(k: int, lo: float, hi: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float64 SPD matrix with a log-spaced spectrum in [lo, hi], its eigenvectors and eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    ev = torch.logspace(torch.log10(torch.tensor(lo)).item(), torch.log10(torch.tensor(hi)).item(), k,
                        dtype=torch.float64)
    return (q * ev) @ q.T, q, ev


def _ref_inv_sqrt(q: torch.Tensor, ev: torch.Tensor) -> torch.Tensor:
    return (q * ev.rsqrt()) @ q.T


@pytest.mark.parametrize("method", ROOT_METHODS)
@pytest.mark.parametrize("k", [8, 48])
def test_inverse_root_accuracy_float64(method, k):
    v, q, ev = _spd(k, 1e-6, 1.0, seed=k)
    z = inverse_sqrt(v, method)
    assert z.dtype == torch.float64
    eye = torch.eye(k, dtype=torch.float64)
    # the oracle of algorithms.md §4 (ASGO 6): ||Z V Z - I|| <= 1e-3; float64 iterations do far better
    assert torch.linalg.matrix_norm(z @ v @ z - eye, ord=2) <= 1e-3
    ref = _ref_inv_sqrt(q, ev)
    rel = torch.linalg.matrix_norm(z - ref) / torch.linalg.matrix_norm(ref)
    assert rel <= 1e-8, f"{method}: relative error {rel:.2e} vs float64 eigh"


@pytest.mark.parametrize("method", ROOT_METHODS)
def test_inverse_root_accuracy_float32(method):
    # In float32 the rounding of V itself (cond 1e6 x eps 6e-8) limits every method, eigh included, to
    # about 1e-3 relative; the iterations must stay within a small factor of that.
    k = 48
    v, q, ev = _spd(k, 1e-6, 1.0, seed=3)
    z = inverse_sqrt(v.float(), method)
    assert z.dtype == torch.float32
    ref = _ref_inv_sqrt(q, ev)
    rel = torch.linalg.matrix_norm(z.double() - ref) / torch.linalg.matrix_norm(ref)
    assert rel <= 5e-3, f"{method}: relative error {rel:.2e}"
    zvz = z.double() @ v @ z.double() - torch.eye(k, dtype=torch.float64)
    assert torch.linalg.matrix_norm(zvz, ord=2) <= 2e-2


def test_half_precision_is_promoted_never_computed_in_bf16():
    v, _, _ = _spd(16, 1e-3, 1.0)
    assert root_compute_dtype(torch.bfloat16) == torch.float32
    assert root_compute_dtype(torch.float64) == torch.float64
    for method in ROOT_METHODS:
        assert inverse_sqrt(v.to(torch.bfloat16), method).dtype == torch.float32


def test_scalar_recursion_matches_spec_behaviour():
    # algorithms.md §3.3: with 10 Polar Express iterations, eigenvalues of V/s >= 1e-6 are exact to (far
    # better than) 4 digits and 1e-8 comes out about 0.6% low. Diagonal matrices run the scalar recursion.
    # V = diag(x) has ||V||_F ~ 1.04, so the scaled eigenvalues x/(1.01 ||V||_F) are x/1.05.
    x = torch.tensor([1.0, 0.3, 1e-2, 1e-4, 1e-6, 1e-7, 1e-8], dtype=torch.float64)
    z = torch.diagonal(inverse_sqrt(torch.diag(x), "polar_express", eps=0.0)) * torch.sqrt(x)
    assert (z[:6] - 1).abs().max() < 1e-9
    assert -0.01 < z[6].item() - 1 < -0.004
    assert POLAR_EXPRESS_COEFFS[-1] == (1.875, -1.25, 0.375) and len(POLAR_EXPRESS_COEFFS) == 8


def test_damping_really_damps():
    # A rank-1 statistic: without damping the null space gets the iteration's implicit ~1/sqrt(2e-9||V||)
    # gain; with damping delta the smallest eigenvalue becomes delta * tr(V)/k exactly.
    k = 6
    u = torch.zeros(k, dtype=torch.float64)
    u[0] = 2.0
    v = torch.outer(u, u)  # eigenvalues 4, 0, ..., 0; tr/k = 4/6
    vd = damp(v, 0.1)
    floor = torch.full((k - 1,), 0.1 * 4 / 6, dtype=torch.float64)
    assert torch.allclose(torch.linalg.eigvalsh(vd)[:-1], floor)
    assert torch.equal(v, torch.outer(u, u))  # not modified in place
    for method in ROOT_METHODS:
        z = inverse_sqrt(v, method, damping=0.1)
        ref = inv_sqrt_eigh(vd)
        torch.testing.assert_close(z, ref, rtol=1e-8, atol=1e-8)
        # the null direction is scaled by (0.1 * 4/6)^{-1/2} ~ 3.87, not by thousands
        assert abs(z[1, 1].item() - (0.1 * 4 / 6) ** -0.5) < 1e-6
    undamped = inverse_sqrt(v, "polar_express")
    assert undamped[1, 1].item() > 1e3  # the implicit damping of the iteration is tiny


def test_eigh_is_a_pseudo_inverse_root_on_rank_deficient_input():
    g = torch.randn(3, 7, dtype=torch.float64)
    v = g.T @ g  # 7x7 of rank 3
    p = inv_sqrt_eigh(v)
    assert torch.isfinite(p).all()
    u_, _, vh = torch.linalg.svd(g, full_matrices=False)
    torch.testing.assert_close(g @ p, u_ @ vh, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [16, 64, 256])
def test_eigh_of_a_float32_gram_cuts_its_rounding_noise(k: int):
    """A float32 ``G G^T`` of rank ``k/4``: its null space carries rounding noise (up to ~0.5 eps of the largest
    eigenvalue, some positive) that a cut-off at 1e-12 inverted, 4e-4 to 1.1e-3 off the polar factor of G
    (float64 oracle); cut at EIGH_NOISE_ULPS eps, 1e-7 (float32's own resolution)."""
    gen = torch.Generator().manual_seed(k)
    r = k // 4
    g32 = (torch.randn(k, r, generator=gen, dtype=torch.float64)
           @ torch.randn(r, 2 * k, generator=gen, dtype=torch.float64)).float()
    g = g32.double()
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u[:, :r] @ vh[:r]
    for out in (inverse_sqrt(g32 @ g32.T, "eigh"), inv_sqrt_eigh(g32 @ g32.T)):
        assert out.dtype == torch.float32
        err = ((out.double() @ g - polar).norm() / polar.norm()).item()
        assert err < 1e-5, err


def test_eigh_cut_off_is_the_statistics_dtype_resolution_and_float64_keeps_rcond():
    """float64 keeps ``rcond`` (eigenvalues down to 1e-11 of the largest are inverted, as before); a float32
    statistic promoted to float64 (ASGO's first-root fallback) is cut as float32 through ``dtype``."""
    k = 8
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    ev = torch.tensor([1.0] * (k - 1) + [1e-11], dtype=torch.float64)
    v = (q * ev) @ q.T
    exact = (q * ev.rsqrt()) @ q.T
    torch.testing.assert_close(inv_sqrt_eigh(v), exact, rtol=1e-4, atol=0.0)
    assert eigh_rcond(torch.float64) == 1e-12
    assert eigh_rcond(torch.float32) == EIGH_NOISE_ULPS * torch.finfo(torch.float32).eps
    assert eigh_rcond(torch.bfloat16) == EIGH_NOISE_ULPS * torch.finfo(torch.bfloat16).eps
    cut = inv_sqrt_eigh(v, dtype=torch.float32)  # the 1e-11 direction is float32 noise: dropped
    torch.testing.assert_close(cut, (q[:, :-1] * ev[:-1].rsqrt()) @ q[:, :-1].T, rtol=1e-8, atol=1e-8)


def test_non_finite_input_gives_non_finite_output_not_identity():
    v, _, _ = _spd(5, 0.1, 1.0)
    v[0, 1] = float("nan")
    for method in ("polar_express", "newton_schulz", "polar_express_eigh"):
        assert not torch.isfinite(inverse_sqrt(v, method)).all()
    # in a batch only the non-finite block is non-finite (eigh must neither raise nor poison the batch)
    both = inverse_sqrt(torch.stack([v, _spd(5, 0.1, 1.0)[0]]), "polar_express_eigh")
    assert not torch.isfinite(both[0]).any() and torch.isfinite(both[1]).all()


def test_spectral_root_failure_stays_in_its_matrix(monkeypatch):
    # LAPACK raises for a whole batch when one matrix does not converge. Emulate that deterministically:
    # eigh fails on any batch holding `bad` (a healthy matrix, as such a failure would look). Healthy
    # batch-mates must equal their one-at-a-time roots bit for bit (batches follow rank ownership), and
    # `bad` and a NaN matrix must come back as they do alone.
    real_eigh = torch.linalg.eigh
    bad = _spd(6, 1e-3, 1.0, seed=7)[0].float()

    def eigh(a, *args, **kwargs):
        if any(torch.equal(m, bad.double()) for m in a.reshape(-1, *a.shape[-2:])):
            raise torch.linalg.LinAlgError("emulated: the algorithm failed to converge")
        return real_eigh(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    nan = _spd(6, 1e-3, 1.0, seed=8)[0].float()
    nan[2, 3] = float("nan")
    healthy = [_spd(6, 1e-4, 1.0, seed=s)[0].float() for s in range(3)]
    batch = torch.stack([healthy[0], bad, healthy[1], nan, healthy[2]])

    def root(v):
        return inverse_sqrt(v, "polar_express_eigh")  # undamped: eigh sees `bad` itself

    out = root(batch)
    assert out.dtype == torch.float32
    for i, h in zip((0, 2, 4), healthy):
        assert torch.isfinite(out[i]).all() and torch.equal(out[i], root(h))
    assert torch.isnan(out[1]).all() and torch.isnan(root(bad)).all()
    assert torch.isnan(out[3]).all() and torch.isnan(root(nan)).all()


def test_unknown_method_message():
    with pytest.raises(ValueError, match=re.escape(
            "Invalid inverse_root='cholesky'. Must be one of 'polar_express', 'newton_schulz', 'eigh', "
            "'polar_express_eigh', "
            "'auto'.")):
        inverse_sqrt(torch.eye(2), "cholesky")


def test_auto_root_is_the_polar_express_function_evaluated_per_device_and_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_root_method("auto", cpu) == "polar_express_eigh"  # float32 statistics by default
    assert resolve_root_method("auto", cpu, torch.bfloat16) == "polar_express_eigh"
    assert resolve_root_method("auto", cpu, torch.float64) == "polar_express"  # see its docstring
    assert resolve_root_method("auto", cuda, torch.float32) == "polar_express"
    assert resolve_root_method("newton_schulz", cpu) == "newton_schulz"
    assert resolve_root_method("eigh", cpu, torch.float32) == "eigh"  # an explicit choice stays
    g = torch.Generator().manual_seed(5)
    for k in (1, 6, 48):  # every size: the eigendecomposition route's fixed cost is below the iteration's
        a = torch.randn(k, k + 3, generator=g, dtype=torch.float64)
        v = a @ a.T
        assert torch.equal(inverse_sqrt(v, "auto"), inverse_sqrt(v, "polar_express"))
        assert torch.equal(inverse_sqrt(v.float(), "auto"), inverse_sqrt(v.float(), "polar_express_eigh"))


def test_auto_float32_root_of_a_rank_deficient_gram_is_as_accurate_as_float32_storage():
    """A float32 Gram with a null space (rank-1 gradients, 3 steps, k = 8 and 32): the default root's P M is
    within 2e-3 of the same map evaluated in float64 on the same V and M (rounding V, M and P to float32 costs
    ~5e-4). The floored float32 iteration was 5-18% off (its rounding between the kept and the null directions,
    times the map's null value 7.5e3 twice); padded batches as the optimizer builds them too."""
    g = torch.Generator().manual_seed(0)
    for k, r in ((8, 1), (32, 4)):
        for _ in range(4):
            v, m = torch.zeros(k, k), torch.zeros(k + 3, k)
            for _ in range(3):
                grad = torch.randn(k + 3, r, generator=g) @ torch.randn(r, k, generator=g)
                v.mul_(0.8).addmm_(grad.T, grad, alpha=0.2)
                m.lerp_(grad, 0.1)
            ref = m.double() @ inverse_sqrt(v.double(), "polar_express_eigh", floor=root_floor(torch.float32),
                                            num_iters=default_root_iters("polar_express", torch.float32))
            padded = pending_inverse_sqrt(pad_batch([v], k + 5), "auto", sizes=[k])
            for p in (inverse_sqrt(v, "auto"), padded.resolve([True])[0, :k, :k]):
                assert p.dtype == torch.float32
                err = float(((m @ p).double() - ref).norm() / ref.norm())
                assert err < 2e-3, (k, err)


def test_scalar_map_is_the_iteration_on_diagonal_matrices():
    # a diagonal V runs the coupled iteration eigenvalue by eigenvalue: the map is that recursion
    x = torch.tensor([1.0, 0.3, 1e-2, 1e-4, 1e-6, 1e-8, 1e-11, 0.0], dtype=torch.float64)
    s = 1.01 * torch.linalg.matrix_norm(torch.diag(x)).item()
    z_iter = torch.diagonal(inverse_sqrt(torch.diag(x), "polar_express", eps=0.0)) * s**0.5
    z_map = coupled_scalar_map(x / s, POLAR_EXPRESS_COEFFS, 10)
    torch.testing.assert_close(z_map, z_iter, rtol=1e-12, atol=0.0)
    assert 2.0e4 < z_map[-1].item() < 2.5e4  # z(0): the bounded implicit damping of algorithms.md §3.3
    # a negative (rounding-noise) eigenvalue counts as zero instead of running the polynomial off [0, 1]
    assert coupled_scalar_map(torch.tensor([-1e-6], dtype=torch.float64), POLAR_EXPRESS_COEFFS, 10).item() \
        == z_map[-1].item()


@pytest.mark.parametrize("lo,tol", [(1e-6, 1e-9), (1e-10, 1e-7), (0.0, 1e-7)])
def test_eigh_evaluation_equals_the_polar_express_iteration_float64(lo, tol):
    # The same matrix function: float64 results agree to rounding, also on (nearly) singular spectra.
    # Near zero the map z(x) ~ (x + 2e-9)^{-1/2} turns an eigenvalue error of ~k * 1e-16 into a relative
    # change of z of up to ~0.5 * 2.4e-15 / 2e-9 ~ 6e-7 in those directions (either evaluation rounds
    # there); measured 2.7e-9 (1e-10) and 5.3e-9 (singular), so 1e-7 still catches a wrong map or scale.
    k = 24
    v, q, ev = _spd(k, max(lo, 1e-16), 1.0, seed=11)
    if lo == 0.0:  # rank 12: half the spectrum exactly zero
        ev = torch.cat([torch.zeros(12, dtype=torch.float64), ev[12:]])
        v = (q * ev) @ q.T
    a = inverse_sqrt(v, "polar_express_eigh")
    b = inverse_sqrt(v, "polar_express")
    rel = torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b)
    assert rel <= tol, f"lo={lo}: relative difference {rel:.2e}"


@pytest.mark.parametrize("method", ROOT_METHODS)
def test_batched_roots_equal_one_at_a_time(method):
    vs = torch.stack([_spd(6, 1e-4, 1.0, seed=s)[0] for s in range(3)])
    batched = inverse_sqrt(vs, method, damping=1e-3)
    assert batched.shape == (3, 6, 6)
    for i in range(3):
        single = inverse_sqrt(vs[i], method, damping=1e-3)
        torch.testing.assert_close(batched[i], single, rtol=1e-12, atol=1e-12)


def test_eigh_evaluation_of_zero_and_empty_statistics():
    # V = 0 (a block with zero gradients so far): both evaluations give z(0)/sqrt(s) I; k = 0 stays empty
    zero = torch.zeros(2, 3, 3)
    torch.testing.assert_close(inverse_sqrt(zero, "polar_express_eigh"), inverse_sqrt(zero, "polar_express"),
                               rtol=1e-6, atol=0.0)
    assert inverse_sqrt(torch.zeros(3, 0, 0), "polar_express_eigh").shape == (3, 0, 0)


@pytest.mark.parametrize("method", ["polar_express", "newton_schulz"])
def test_iteration_scale_is_taken_in_float64(method):
    """A float32 Gram with entries ~1e20 (gradients ~1e10) is finite but its float32 Frobenius norm is
    not: Y = V / inf = 0 once made the root exactly 0, a finite result the optimizer took for a root."""
    v = 1e20 * torch.eye(3)
    root = inverse_sqrt(v, method)
    torch.testing.assert_close(root, 1e-10 * torch.eye(3), rtol=1e-4, atol=0.0)
    # a scale beyond float32 itself: the float32 iteration gives a non-finite root, never 0, and the
    # check of the result (checked_coupled) recomputes it by the float64 eigendecomposition
    assert not torch.isfinite(inv_sqrt_coupled(3e38 * torch.eye(3), POLAR_EXPRESS_COEFFS, 10)).all()
    torch.testing.assert_close(inverse_sqrt(3e38 * torch.eye(3), method), 3e38 ** -0.5 * torch.eye(3),
                               rtol=1e-4, atol=0.0)


def test_eigh_of_an_overflowed_gram_is_non_finite_not_an_exception():
    """linalg.eigh raises on an inf matrix; the module's contract is a non-finite result the caller checks."""
    v = torch.full((4, 4), float("inf"))
    assert not torch.isfinite(inverse_sqrt(v, "eigh")).any()


@pytest.mark.parametrize("k,rank", [(4, 3), (10, 9), (64, 8), (90, 20)])
@pytest.mark.parametrize("method", ["polar_express", "newton_schulz"])
def test_a_float32_gram_with_a_null_space_gets_the_maps_root(method, k, rank):
    """A Gram of rank below k (a softmax head's, whose gradient's columns sum to 0; any Gram in the first
    steps) rounded to float32 has eigenvalues at the rounding level, some negative, where the coupled
    iteration grows without bound instead of settling at z(0): its P·G came out up to 1e5 times the
    exact one. P·G must match the same map evaluated in float64 on the same float32 matrix."""
    g = torch.Generator().manual_seed(k + rank)
    grad = (torch.randn(k, rank, generator=g, dtype=torch.float64)
            @ torch.randn(rank, 2 * k, generator=g, dtype=torch.float64))
    if rank == k - 1:  # the softmax head: every column sums to 0 over the classes
        grad = torch.randn(k, 2 * k, generator=g, dtype=torch.float64)
        grad -= grad.mean(0)
    grad = grad.float()
    v = grad @ grad.T
    coeffs = POLAR_EXPRESS_COEFFS if method == "polar_express" else (NEWTON_SCHULZ_COEFFS,)
    # the float32 statistic's map (its floor, its iterations), evaluated in float64 on the same matrix
    floor, n = root_floor(torch.float32), default_root_iters(method, torch.float32)
    exact = inv_sqrt_spectral(v.double(), coeffs, n, floor=floor) @ grad.double()
    got = inverse_sqrt(v, method).double() @ grad.double()
    assert float((got - exact).norm() / exact.norm()) < 2e-2
    # the floor keeps the iteration itself bounded: no recomputation by the eigendecomposition
    pending = pending_inverse_sqrt(v[None], method)
    assert pending.bounded is not None and bool(pending.bounded.all())


def _head_gram(k: int) -> torch.Tensor:
    """A float32 softmax-head Gram (every column of its gradient sums to 0: rank k - 1); for k = 4 and 12
    the float32 Polar Express iteration leaves the map's bound on it (test above)."""
    g = torch.Generator().manual_seed(2 * k - 1)  # the draw of the test above
    torch.randn(k * (k - 1) + (k - 1) * 2 * k, generator=g, dtype=torch.float64)
    grad = torch.randn(k, 2 * k, generator=g, dtype=torch.float64)
    grad = (grad - grad.mean(0)).float()
    return grad @ grad.T


def _not_psd(v: torch.Tensor) -> torch.Tensor:
    """``v`` with one null direction turned into an eigenvalue of -1e-4 ``||v||_F`` (a corrupted statistic)."""
    v = v.double()
    evals, evecs = torch.linalg.eigh(v)
    evals[0] = -1e-4 * torch.linalg.matrix_norm(v)
    return (evecs * evals) @ evecs.T


@pytest.mark.parametrize("damping", [0.0, 1e-3])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
@pytest.mark.parametrize("method", ["polar_express", "newton_schulz"])
def test_padded_batch_gives_each_matrix_its_own_root(method, dtype, tol, damping):
    """Grams of different sizes zero-padded into one batch (how ASGO batches small roots): each corner is
    the root of its own matrix, with its own scale and relative damping (a damping over the padded size
    is ~30% off on the small eigenvalues here), the padding never leaks into it, and the bound check
    judges each matrix by its own size: the null-space Grams that leave it are recomputed from their
    corners alone, their batch-mates kept."""
    full = [_spd(3, 1e-3, 2.0, seed=1)[0].to(dtype), _spd(7, 1e-5, 1.0, seed=2)[0].to(dtype)]
    heads = [_head_gram(4).to(dtype), _head_gram(12).to(dtype), _not_psd(_head_gram(5)).to(dtype)]
    ks = [m.shape[0] for m in full + heads]
    pending = pending_inverse_sqrt(pad_batch(full + heads, 12), method, damping=damping, sizes=ks)
    assert pending.bounded is not None
    flags = pending.bounded.tolist()
    roots = pending.resolve(flags)
    coeffs = POLAR_EXPRESS_COEFFS if method == "polar_express" else (NEWTON_SCHULZ_COEFFS,)
    floor, n = root_floor(dtype), default_root_iters(method, dtype)
    for i, (m, k) in enumerate(zip(full, ks)):  # the function itself, in float64 on the same matrix
        exact = inv_sqrt_spectral(damp(m.double(), damping), coeffs, n, floor=floor)
        err = float((roots[i, :k, :k].double() - exact).norm() / exact.norm())
        assert err <= tol, (k, err)
    if dtype == torch.float32 and damping == 0.0:
        # the softmax heads' null spaces stay within the floored map's bound (before the floor the k = 4
        # head left it on every CPU tried); an eigenvalue of -1e-4 s is beyond any rounding: recomputed
        assert flags == [True, True, True, True, False]
    for i, m in enumerate(heads, start=len(full)):
        k = ks[i]
        if not flags[i]:  # recomputed: the eigendecomposition of its own corner
            torch.testing.assert_close(roots[i, :k, :k], inv_sqrt_spectral(damp(m, damping), coeffs, n))
    for i, k in enumerate(ks):
        assert not roots[i, :k, k:].any() and not roots[i, k:, :k].any()


def test_padded_batches_are_for_the_iterations_only():
    v = pad_batch([torch.eye(2), torch.eye(3)], 3)
    with pytest.raises(ValueError, match=r"sizes=\(2, 3\) for method='eigh'.*iterations"):
        pending_inverse_sqrt(v, "eigh", sizes=[2, 3])


@pytest.mark.parametrize("method", ["auto", "polar_express_eigh", "eigh"])
def test_a_float64_copy_of_a_float32_statistic_takes_its_map(method):
    """``dtype``: a float32 statistic's V handed over in float64 (ASGO forms it so before rounding it) gets the
    float32 statistic's route, map (floor), cut-off and root dtype: on the same values, the same bits."""
    v = _spd(12, 1e-9, 1.0, seed=3)[0].float()
    own = pending_inverse_sqrt(v[None], method).roots
    wide = pending_inverse_sqrt(v.double()[None], method, dtype=torch.float32).roots
    assert wide.dtype == torch.float32 and torch.equal(wide, own)
    assert not torch.equal(wide, pending_inverse_sqrt(v.double()[None], method).roots.float())  # float64's map


def test_a_float64_copy_of_a_statistic_is_for_the_eigendecompositions_only():
    with pytest.raises(ValueError, match=r"dtype=torch.float32 for a torch.float64 v with method='polar_express'"):
        pending_inverse_sqrt(torch.eye(3, dtype=torch.float64)[None], "polar_express", dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padded_eigh_route_gives_each_matrix_its_own_root(dtype):
    """The eigendecomposition route on a zero-padded batch (one LAPACK call for a small model's Grams of
    several sizes): each corner is its own matrix's root, to rounding, rank-deficient ones (whose null space
    meets the padding's zeros) and a softmax head's too, with eps on its own diagonal; outside the corner the
    root is block-diagonal exactly. (Refused before: sizes were for the iterations only.)"""
    g = torch.Generator().manual_seed(3)
    mats = []
    for k, r in ((3, 3), (10, 2), (20, 20), (17, 1)):
        a = torch.randn(k, r, generator=g, dtype=torch.float64)
        mats.append((a @ a.T).to(dtype))
    mats.append(_head_gram(6).to(dtype))
    ks = [m.shape[0] for m in mats]
    pending = pending_inverse_sqrt(pad_batch(mats, 24), "polar_express_eigh", eps=1e-3, sizes=ks)
    assert pending.bounded is None
    for i, (m, k) in enumerate(zip(mats, ks)):
        alone = inverse_sqrt(m, "polar_express_eigh", eps=1e-3)
        torch.testing.assert_close(pending.roots[i, :k, :k], alone, rtol=1e-5 if dtype == torch.float32 else 1e-9,
                                   atol=1e-5 * float(alone.abs().max()))
        assert not pending.roots[i, :k, k:].any() and not pending.roots[i, k:, :k].any()


@pytest.mark.parametrize("k", [1, 2, 7])
@pytest.mark.parametrize("scale", [2.0**530, 1e160, 1e-170])
def test_roots_of_huge_and_tiny_float64_grams_are_finite(k, scale):
    """The map depends on V only through V / s, so root(c V) = root(V) / sqrt(c) (with eps = 0). A float64
    Gram with entries ~1e160 (finite; the statistic guard takes it) squared to inf in the scaling norm,
    ~1e-170 to 0, and the root came out NaN: the block fell back to its previous preconditioner. Padded
    (how ASGO batches a 1 x 1 Gram with larger ones) the iteration's own norm overflows; its bound check
    then recomputes the root by the eigendecomposition, whose scale is taken safely."""
    v = _spd(k, 1e-3, 2.0, seed=k)[0]
    ref = inv_sqrt_spectral(v, POLAR_EXPRESS_COEFFS, 10, eps=0.0)
    got = inv_sqrt_spectral(v * scale, POLAR_EXPRESS_COEFFS, 10, eps=0.0) * scale**0.5
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))
    pending = pending_inverse_sqrt(pad_batch([v * scale, _spd(9, 1e-3, 2.0)[0]], 9), "polar_express", eps=0.0,
                                   sizes=[k, 9])
    assert pending.bounded is not None
    roots = pending.resolve(pending.bounded.tolist())
    assert torch.isfinite(roots).all()
    torch.testing.assert_close(roots[0, :k, :k] * scale**0.5, inverse_sqrt(v, "polar_express", eps=0.0),
                               rtol=1e-9, atol=1e-9 * float(ref.abs().max()))


@pytest.mark.parametrize("sizes", [[3], [7, 5], [0, 5], [3, 5, 4]])
def test_padded_batch_sizes_are_checked(sizes):
    v = pad_batch([torch.eye(3), torch.eye(5)], 6)
    msg = r"Invalid sizes=.*one size per matrix.*each from 1 to k \(here n = 2, k = 6\)"
    with pytest.raises(ValueError, match=msg):
        pending_inverse_sqrt(v, "polar_express", sizes=sizes)


def test_float32_map_has_a_floor_and_keeps_the_spec_accuracy():
    """A float32 statistic's map: the iteration from V/s + 2e-7 I (8 Polar Express iterations), then three
    Newton-Schulz steps towards V/s. Above 1e-6 s it is x^{-1/2} to far better than the spec's 4 digits;
    z(0) is 7.5e3 (the bare map's 2.2e4), and it is what the iteration computes, eigenvalue by eigenvalue."""
    floor, n = root_floor(torch.float32), default_root_iters("polar_express", torch.float32)
    assert (floor, n) == (2e-7, 8) and root_floor(torch.bfloat16) == floor and root_floor(torch.float64) == 0.0
    assert default_root_iters("polar_express", torch.float64) == 10
    x = torch.tensor([1.0, 0.3, 1e-2, 1e-4, 1e-6, 1e-7, 0.0], dtype=torch.float64)
    z = coupled_scalar_map(x, POLAR_EXPRESS_COEFFS, n, floor)
    assert (z[:5] * x[:5].sqrt() - 1).abs().max() < 1e-6
    assert abs(z[5].item() * 1e-7**0.5 - 1) < 1e-2
    assert 7e3 < z[6].item() < 8e3
    # negative rounding noise counts as 0 in the map, as in the bare one
    assert coupled_scalar_map(torch.tensor([-1e-8], dtype=torch.float64), POLAR_EXPRESS_COEFFS, n, floor).item() \
        == z[6].item()
    s = 1.01 * torch.linalg.matrix_norm(torch.diag(x)).item()
    z_iter = torch.diagonal(inv_sqrt_coupled(torch.diag(x), POLAR_EXPRESS_COEFFS, n, eps=0.0, floor=floor)) * s**0.5
    torch.testing.assert_close(coupled_scalar_map(x / s, POLAR_EXPRESS_COEFFS, n, floor), z_iter, rtol=1e-10,
                               atol=0.0)


@pytest.mark.parametrize("seed", range(4))
def test_float32_iteration_and_eigh_evaluation_agree_on_a_gram_with_a_null_space(seed):
    """The CPU's route for float32 Grams (eigendecomposition of the floored map) and the accelerators' (the
    floored iteration) compute one function: on a Gram of rank k/2 whose null space is float32 rounding
    noise, P G agrees to float32 accuracy, and the iteration stays within its bound (before the floor the
    bare iteration's root came out up to 1e5 times the exact one there and was recomputed)."""
    k = 64
    g = torch.Generator().manual_seed(seed)
    grad = (torch.randn(k, k // 2, generator=g, dtype=torch.float64) @ torch.randn(k // 2, 3 * k, generator=g,
                                                                                 dtype=torch.float64)).float()
    v = grad @ grad.T
    pending = pending_inverse_sqrt(v[None], "polar_express")
    assert pending.bounded is not None and bool(pending.bounded.all())
    it = pending.roots[0].double() @ grad.double()
    eig = inverse_sqrt(v, "polar_express_eigh").double() @ grad.double()
    assert float((it - eig).norm() / eig.norm()) < 5e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_checks.sh runs it)")
def test_float32_roots_of_null_space_grams_stay_bounded_on_cuda():
    """On an H200 (turn 34) 39-57 of a d=768 transformer's 72 float32 roots a step left the bare
    iteration's bound and went to a float64 eigendecomposition on the GPU. With the float32 map's floor
    the iteration on the GPU stays bounded on Grams with a null space (rank k/4 to k - 1, k up to 768) and
    computes the CPU's eigendecomposition route's function to float32 accuracy."""
    g = torch.Generator().manual_seed(0)
    for k, rank in [(64, 63), (256, 64), (768, 192), (768, 767)]:
        grad = torch.randn(k, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, 2 * k, generator=g,
                                                                                   dtype=torch.float64)
        grad = grad.float()
        v = grad @ grad.T
        pending = pending_inverse_sqrt(v[None].cuda(), "polar_express")
        assert pending.bounded is not None and bool(pending.bounded.all()), (k, rank)
        got = pending.roots[0].double().cpu() @ grad.double()
        ref = inverse_sqrt(v, "polar_express_eigh").double() @ grad.double()
        assert float((got - ref).norm() / ref.norm()) < 1e-2, (k, rank)


@pytest.mark.parametrize("num_iters", [1, 2, 3, 4])
@pytest.mark.parametrize("method", ["polar_express", "polar_express_eigh"])
def test_few_iterations_keep_a_positive_root_in_float32(method, num_iters):
    """The floor's Newton-Schulz polish turns an eigenvalue's sign where the iteration overshoots (z^2 x > 3),
    which 1-3 Polar Express iterations do: their float32 roots had eigenvalues down to -25 (indefinite P,
    steps uphill). The default floor is dropped there (the bare map, positive), an explicit one refused."""
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    v = ((q * torch.logspace(-3, 0, 32, dtype=torch.float64)) @ q.T).float()
    root = inverse_sqrt(v, method, num_iters=num_iters).double()
    assert float(torch.linalg.eigvalsh(0.5 * (root + root.T)).min()) > 0.0
    bare = inverse_sqrt(v, method, num_iters=num_iters, floor=0.0).double()
    if num_iters < FLOOR_MIN_ITERS["polar_express"]:
        torch.testing.assert_close(root, bare)
        with pytest.raises(ValueError, match="needs at least 4 iterations"):
            inverse_sqrt(v, method, num_iters=num_iters, floor=2e-7)
    coeffs = tuple(POLAR_EXPRESS_COEFFS)
    assert _polish_keeps_sign(coeffs, num_iters, 2e-7) == (num_iters >= FLOOR_MIN_ITERS["polar_express"])
    assert all(_polish_keeps_sign((NEWTON_SCHULZ_COEFFS,), n, 2e-7) for n in range(1, 19))


@pytest.mark.parametrize("method", ["polar_express", "polar_express_eigh"])
def test_a_float32_statistic_far_below_its_scale_takes_the_bare_map(method):
    """Gradients ~1e-8 at eps 1e-10: eps makes most of the scale s, every eigenvalue of V/s is below the float32
    floor (2e-7), and the floored map was nearly constant where the float64 (bare) map still resolves them (the
    root was 2e-5 / 8e-2 / 0.45 off it at gradients 1e-8 / 3e-9 / 1e-9, now 3e-8 / 2e-8 / 6e-8); the noise the floor
    covers is ~1e-8 of ||V||, far below the bare map's resolution there."""
    g = 1e-9 * torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = g @ g.T
    want = inverse_sqrt(v, "polar_express")  # float64: the bare map
    got = inverse_sqrt(v.float(), method)
    assert got.dtype == torch.float32
    assert float((got.double() - want).norm() / want.norm()) < 1e-6
