"""float64 oracles for the SOAA kernels (spec/algorithms.md §1.3 and §4)."""

from __future__ import annotations

import pytest
import torch

import lightning_soaa.functional.soaa as soaa_mod
from lightning_soaa.functional.soaa import (
    SOAAKernels,
    _sum64,
    _sum_sq64,
    band,
    predicted_reduction,
    soaa_moments,
    soaa_step_,
    trust_region_scalars,
)
from lightning_soaa.kernels.soaa_native import NativeSOAA

B1, B2 = 0.9, 0.999


def _state(seed: int, shapes: list[tuple[int, ...]], gscale: list[float]):
    g = torch.Generator().manual_seed(seed)
    grads = [s * torch.randn(sh, generator=g, dtype=torch.float64) for sh, s in zip(shapes, gscale)]
    ms = [0.5 * s * torch.randn(sh, generator=g, dtype=torch.float64) for sh, s in zip(shapes, gscale)]
    vs = [s * s * torch.rand(sh, generator=g, dtype=torch.float64) for sh, s in zip(shapes, gscale)]
    ps = [torch.randn(sh, generator=g, dtype=torch.float64) for sh in shapes]
    return grads, ms, vs, ps


def _reference(grads, ms, vs, ps, t, *, lr, eps, wd, d, c=None):
    """Direct transcription of §1.3 steps 1-7 and 11 on the concatenation of all tensors."""
    g = torch.cat([x.reshape(-1) for x in grads])
    m = B1 * torch.cat([x.reshape(-1) for x in ms]) + (1 - B1) * g
    v = B2 * torch.cat([x.reshape(-1) for x in vs]) + (1 - B2) * g * g
    mh, vh = m / (1 - B1**t), v / (1 - B2**t)
    if c is None:
        c = 1 + (mh**2).sum() / (vh + eps).sum()
    F = c * vh
    r = torch.maximum(d * F, vh.sqrt())
    u = d * mh / (r + eps)
    p = torch.cat([x.reshape(-1) for x in ps])
    new_p = p - lr * wd * p - lr * u
    return dict(m=m, v=v, mh=mh, vh=vh, c=float(c), u=u, p=new_p,
                s_m2=float((mh**2).sum()), s_veps=float((vh + eps).sum()),
                s_mu=float((mh * u).sum()), s_vu=float((vh * u * u).sum()))


def _flat(xs):
    return torch.cat([x.reshape(-1) for x in xs])


@pytest.mark.parametrize("foreach", [False, True])
def test_kernels_match_the_spec_transcription(foreach: bool) -> None:
    shapes = [(7, 5), (5,), (3, 2, 4)]
    # scales straddle 1, so both branches of the cap are active
    grads, ms, vs, ps = _state(0, shapes, [3.0, 1e-3, 0.3])
    t, lr, eps, wd, d = 3, 0.1, 1e-8, 0.01, 1.3
    ref = _reference(grads, ms, vs, ps, t, lr=lr, eps=eps, wd=wd, d=d)
    ms0, vs0 = [x.clone() for x in ms], [x.clone() for x in vs]
    ps0, grads0 = [x.clone() for x in ps], [x.clone() for x in grads]
    part = soaa_moments(grads, ms, vs, [t] * 3, beta1=B1, beta2=B2, eps=eps, foreach=foreach)
    for a, b in zip(ms + vs + ps + grads, ms0 + vs0 + ps0 + grads0):  # the sums pass only reads
        assert torch.equal(a, b)
    assert part.dtype == torch.float64
    assert part[0].item() == pytest.approx(ref["s_m2"], rel=1e-13)
    assert part[1].item() == pytest.approx(ref["s_veps"], rel=1e-13)
    c = 1 + part[0].item() / part[1].item()
    assert c == pytest.approx(ref["c"], rel=1e-13)
    parts2 = soaa_step_(ps, grads, ms, vs, [t] * 3, lr=lr, beta1=B1, beta2=B2, eps=eps, weight_decay=wd,
                        d=d, c=c, foreach=foreach)
    torch.testing.assert_close(_flat(ms), ref["m"], rtol=1e-14, atol=0)  # the moments, in place
    torch.testing.assert_close(_flat(vs), ref["v"], rtol=1e-14, atol=0)
    torch.testing.assert_close(_flat(ps), ref["p"], rtol=1e-13, atol=1e-15)
    assert parts2[0].item() == pytest.approx(ref["s_mu"], rel=1e-12)
    assert parts2[1].item() == pytest.approx(ref["s_vu"], rel=1e-12)


def test_per_coordinate_identity_eps0() -> None:
    """|u| = min(|m̂|/F, d·|m̂|/sqrt(v̂)) with ε = 0 (§4 SOAA 2), with both branches present."""
    shapes = [(40,), (6, 7)]
    grads, ms, vs, ps = _state(1, shapes, [5.0, 1e-2])
    t, lr, d = 4, 1.0, 0.8
    part = soaa_moments(grads, ms, vs, [t, t], beta1=B1, beta2=B2, eps=0.0)
    c = 1 + part[0].item() / part[1].item()
    ps = [torch.zeros_like(p) for p in ps]  # θ = 0, so θ_new = −lr·u has no cancellation
    soaa_step_(ps, grads, ms, vs, [t, t], lr=lr, beta1=B1, beta2=B2, eps=0.0, weight_decay=0.0, d=d, c=c)
    m_new, v_new = ms, vs
    u = -_flat(ps) / lr
    mh, vh = _flat(m_new) / (1 - B1**t), _flat(v_new) / (1 - B2**t)
    F = c * vh
    fisher, adam = mh.abs() / F, d * mh.abs() / vh.sqrt()
    torch.testing.assert_close(u.abs(), torch.minimum(fisher, adam), rtol=1e-13, atol=0)
    assert bool((fisher < adam).any()) and bool((adam < fisher).any())  # both branches exercised
    assert bool((torch.sign(u) == torch.sign(mh)).all())


def test_count_limited_counts_the_d_branch() -> None:
    grads, ms, vs, ps = _state(2, [(50,)], [1.0])
    part = soaa_moments(grads, ms, vs, [2], beta1=B1, beta2=B2, eps=1e-8)
    c, d = 1 + part[0].item() / part[1].item(), 1.0
    out = soaa_step_(ps, grads, ms, vs, [2], lr=0.1, beta1=B1, beta2=B2, eps=1e-8, weight_decay=0.0,
                     d=d, c=c, count_limited=True)
    vh = vs[0] / (1 - B2**2)
    assert out.shape == (3,)
    assert out[2].item() == float((d * c * vh < vh.sqrt()).sum())


def test_flat_slices_give_the_same_update_and_sums() -> None:
    """A DeepSpeed-like 1-D flat partition cut anywhere gives the same result as whole tensors."""
    shapes = [(7, 5), (11,), (4, 3)]
    grads, ms, vs, ps = _state(3, shapes, [1.0, 0.1, 2.0])
    t, kw = 5, dict(lr=0.05, beta1=B1, beta2=B2, eps=1e-8, weight_decay=0.1, d=1.1)
    flat = [_flat(x).clone() for x in (grads, ms, vs, ps)]
    a1 = soaa_moments(grads, ms, vs, [t] * 3, beta1=B1, beta2=B2, eps=1e-8)
    c = 1 + a1[0].item() / a1[1].item()
    b1 = soaa_step_(ps, grads, ms, vs, [t] * 3, c=c, **kw)
    cuts = [0, 13, 14, 60, flat[0].numel()]  # uneven cuts across tensor boundaries, one of length 1
    sl = [[x[cuts[i]:cuts[i + 1]] for i in range(len(cuts) - 1)] for x in flat]
    a2 = soaa_moments(sl[0], sl[1], sl[2], [t] * 4, beta1=B1, beta2=B2, eps=1e-8)
    torch.testing.assert_close(a2, a1, rtol=1e-13, atol=0)
    b2 = soaa_step_(sl[3], sl[0], sl[1], sl[2], [t] * 4, c=c, **kw)
    torch.testing.assert_close(b2, b1, rtol=1e-13, atol=0)
    for i, xs in ((1, ms), (2, vs), (3, ps)):
        torch.testing.assert_close(flat[i], _flat(xs), rtol=0, atol=0)


@pytest.mark.parametrize("tile", [1 << 18, 5000])
def test_loop_and_foreach_paths_agree_in_fp32(monkeypatch: pytest.MonkeyPatch, tile: int) -> None:
    """The CPU loop path (tiled, into buffers) against the foreach path; tile 5000 cuts every tensor
    into several tiles with ragged ends (and rows of _CHUNK with tails)."""
    monkeypatch.setattr(soaa_mod, "_TILE", tile)
    shapes = [(640, 33), (33,), (9001,)]
    grads, ms, vs, ps = (list(map(lambda x: x.float(), xs)) for xs in _state(4, shapes, [1.0, 0.01, 3.0]))
    ps2 = [p.clone() for p in ps]
    res = []
    for fe, pp in ((False, ps), (True, ps2)):
        m, v = [x.clone() for x in ms], [x.clone() for x in vs]
        a = soaa_moments(grads, m, v, [7, 7, 7], beta1=B1, beta2=B2, eps=1e-8, foreach=fe)
        b = soaa_step_(pp, grads, m, v, [7, 7, 7], lr=0.1, beta1=B1, beta2=B2, eps=1e-8, weight_decay=0.01,
                       d=1.2, c=1 + a[0].item() / a[1].item(), foreach=fe)
        res.append((m, v, a, b))
    # the moments are bit-identical; the update differs at most by the rounding of a fused addcmul
    for x, y in zip(res[0][0] + res[0][1], res[1][0] + res[1][1]):
        assert torch.equal(x, y)
    for x, y in zip(ps, ps2):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(res[0][2], res[1][2], rtol=1e-6, atol=0)  # fp32 rows cut differently
    torch.testing.assert_close(res[0][3], res[1][3], rtol=1e-5, atol=0)


def _kernels_or_skip(kernels: SOAAKernels, native: bool = False) -> None:
    """Skip where the backend under test cannot run here; otherwise check it is the one that ran."""
    if native:
        if kernels.native_failure is not None:
            pytest.skip(f"no C kernels here ({kernels.native_failure}); the other paths are tested")
        assert kernels._native is not None  # the C loops took the big blocks
    elif kernels.failure is not None:
        pytest.skip(f"torch.compile does not work here ({kernels.failure}); the eager paths are tested above")


# Both one-sweep backends: the C loops (CPU default) and torch.compile's kernels (CUDA, or no compiler).
BACKENDS = pytest.mark.parametrize("native", [True, False], ids=["c", "inductor"])


def _run_both_passes(grads, ms, vs, ps, ts, *, kernels, foreach=None, count_limited=False, **kw):
    """The sums pass (checked to leave everything as it was), then the step pass; returns the moments
    (updated in place), the partials of both passes and c."""
    before = [x.clone() for x in grads + ms + vs + ps]
    a = soaa_moments(grads, ms, vs, ts, beta1=B1, beta2=B2, eps=kw["eps"], foreach=foreach, kernels=kernels)
    assert all(torch.equal(x, y) for x, y in zip(grads + ms + vs + ps, before))
    c = 1 + a[0].item() / a[1].item()
    b = soaa_step_(ps, grads, ms, vs, ts, beta1=B1, beta2=B2, c=c, count_limited=count_limited, foreach=foreach,
                   kernels=kernels, **kw)
    return ms, vs, a, b, c


@BACKENDS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_kernels_match_the_spec_transcription(dtype: torch.dtype, native: bool) -> None:
    """Both compiled passes (the big tensors) mixed with the eager path (the small ones) against the
    float64 transcription; in float64 the compiled arithmetic must agree to rounding."""
    kernels = SOAAKernels(min_numel=1000, cpu_loader=NativeSOAA.load if native else None)
    shapes = [(70, 50), (5,), (3001,), (40, 30)]
    grads, ms, vs, ps = _state(21, shapes, [3.0, 1e-3, 0.3, 1.0])
    t, lr, eps, wd, d = 3, 0.1, 1e-8, 0.01, 1.3
    def cast(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [x.to(dtype) for x in xs]

    grads_c, ms_c, vs_c, ps_c = cast(grads), cast(ms), cast(vs), cast(ps)
    # the transcription of the rounded inputs: what is left is the kernels' own arithmetic
    ref = _reference(*[[x.double() for x in xs] for xs in (grads_c, ms_c, vs_c, ps_c)], t, lr=lr, eps=eps,
                     wd=wd, d=d)
    m, v, a, b, c = _run_both_passes(grads_c, ms_c, vs_c, ps_c, [t] * 4, kernels=kernels, lr=lr, eps=eps,
                                     weight_decay=wd, d=d)
    _kernels_or_skip(kernels, native)
    tight = dtype == torch.float64
    rtol = 1e-13 if tight else 2e-6
    # m = m + (g - m)(1 - β1) cancels where g ≈ m: an absolute bound at the scale of the inputs (~3)
    torch.testing.assert_close(_flat(m).double(), ref["m"], rtol=rtol, atol=1e-15 if tight else 1e-6)
    torch.testing.assert_close(_flat(v).double(), ref["v"], rtol=rtol, atol=1e-15 if tight else 1e-6)
    assert a[0].item() == pytest.approx(ref["s_m2"], rel=1e-12 if tight else 1e-6)
    assert a[1].item() == pytest.approx(ref["s_veps"], rel=1e-12 if tight else 1e-6)
    torch.testing.assert_close(_flat(ps_c).double(), ref["p"], rtol=1e-12 if tight else 1e-5,
                               atol=1e-14 if tight else 1e-6)
    assert b[0].item() == pytest.approx(ref["s_mu"], rel=1e-11 if tight else 1e-5)
    assert b[1].item() == pytest.approx(ref["s_vu"], rel=1e-11 if tight else 1e-5)


@BACKENDS
def test_compiled_kernels_agree_with_the_loop_path_per_tensor_steps_and_count(native: bool) -> None:
    """Tensors with different step counts (bias corrections), count_limited, float32: compiled and loop
    paths give the same moments, θ and sums (up to a contracted multiply-add)."""
    shapes = [(4000,), (2000, 3), (17,)]
    data = [list(map(lambda x: x.float(), xs)) for xs in _state(22, shapes, [1.0, 0.01, 3.0])]
    ts = [2, 9, 9]
    runs = []
    for kernels in (SOAAKernels(min_numel=1000, cpu_loader=NativeSOAA.load if native else None), None):
        grads, ms, vs, ps = ([x.clone() for x in xs] for xs in data)
        m, v, a, b, c = _run_both_passes(grads, ms, vs, ps, ts, kernels=kernels, foreach=False,
                                         count_limited=True, lr=0.1, eps=1e-8, weight_decay=0.01, d=1.2)
        if kernels is not None:
            _kernels_or_skip(kernels, native)
        runs.append((m, v, a, b, ps))
    (mc, vc, ac, bc, pc), (me, ve, ae, be, pe) = runs
    for x, y in zip(mc + vc, me + ve):  # a contracted multiply-add apart, near cancellations too
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ac, ae, rtol=1e-6, atol=0)
    for x, y in zip(pc, pe):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bc[:2], be[:2], rtol=1e-5, atol=0)
    assert bc[2].item() == be[2].item() > 0  # the same coordinates on the d-branch, and some exist


@BACKENDS
def test_compiled_kernels_bf16_match_the_reference(native: bool) -> None:
    """bfloat16 state and parameters: the compiled passes compute in float32 and round once per store."""
    kernels = SOAAKernels(min_numel=1000, cpu_loader=NativeSOAA.load if native else None)
    grads, ms, vs, ps = _state(23, [(3000,)], [1.0])
    t, kw = 4, dict(lr=0.05, eps=1e-8, weight_decay=0.01, d=1.1)
    def bf(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [x.bfloat16() for x in xs]

    grads_b, ms_b, vs_b, ps_b = bf(grads), bf(ms), bf(vs), bf(ps)
    inputs64 = [[x.double() for x in xs] for xs in (grads_b, ms_b, vs_b, ps_b)]  # before the in-place step
    m, v, a, b, c = _run_both_passes(grads_b, ms_b, vs_b, ps_b, [t], kernels=kernels, **kw)
    _kernels_or_skip(kernels, native)
    # the reference from the same (bf16-rounded) inputs, and the c the kernels found
    ref = _reference(*inputs64, t, lr=0.05, eps=1e-8, wd=0.01, d=1.1, c=c)
    assert c == pytest.approx(ref["c"], rel=1e-2)
    torch.testing.assert_close(_flat(m).double(), ref["m"], rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(_flat(ps_b).double(), ref["p"], rtol=8e-3, atol=1e-3)
    assert b[0].item() == pytest.approx(ref["s_mu"], rel=2e-2)
    assert b[1].item() == pytest.approx(ref["s_vu"], rel=2e-2)


def test_compiler_failure_falls_back_to_eager_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    """A kernel that raises (as a missing compiler does, at the first call) turns the object off; the
    results are the eager path's, θ is updated exactly once."""
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    kernels = SOAAKernels(min_numel=10)  # the torch.compile backend
    kernels.sums = broken
    kernels.step = kernels.update_sums = kernels.update_count = broken
    data = _state(24, [(300,), (50,)], [1.0, 0.1])
    grads, ms, vs, ps = ([x.clone() for x in xs] for xs in data)
    m1, v1, a1, b1, _ = _run_both_passes(grads, ms, vs, ps, [3, 3], kernels=kernels, lr=0.1, eps=1e-8,
                                         weight_decay=0.0, d=1.0)
    assert kernels.failure is not None and "no C++ compiler" in kernels.failure
    assert sum("compiled kernels failed" in r.message for r in caplog.records) == 1
    grads, ms, vs, ps2 = ([x.clone() for x in xs] for xs in data)
    m2, v2, a2, b2, _ = _run_both_passes(grads, ms, vs, ps2, [3, 3], kernels=None, lr=0.1, eps=1e-8,
                                         weight_decay=0.0, d=1.0)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert all(torch.equal(x, y) for x, y in zip(ps + m1 + v1, ps2 + m2 + v2))


@pytest.mark.parametrize("count_limited", [False, True])
def test_compiler_failure_after_the_step_kernel_updates_each_tensor_once(count_limited: bool) -> None:
    """The update-sums kernel fails after the (here: eager) step kernel has updated the first tensor: that
    tensor's sums come from the eager fallback, the others take the eager path; θ, m, v and the sums equal
    the eager run's."""
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    kernels = SOAAKernels(min_numel=10)  # the torch.compile backend
    kernels.sums = soaa_mod._sums_kernel
    kernels.step = soaa_mod._step_kernel
    kernels.update_sums = kernels.update_count = broken
    data = _state(26, [(300,), (200,)], [1.0, 0.1])
    runs = []
    for k in (kernels, None):
        grads, ms, vs, ps = ([x.clone() for x in xs] for xs in data)
        runs.append(_run_both_passes(grads, ms, vs, ps, [3, 3], kernels=k, foreach=False,
                                     count_limited=count_limited, lr=0.1, eps=1e-8, weight_decay=0.01,
                                     d=1.1) + (ps,))
    assert kernels.failure is not None
    (m1, v1, _, b1, _, p1), (m2, v2, _, b2, _, p2) = runs
    for x, y in zip(m1 + v1 + p1, m2 + v2 + p2):  # float64: equal up to rounding, and updated once
        torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-16)
    torch.testing.assert_close(b1, b2, rtol=1e-12, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton kernels)")
def test_compiled_kernels_on_cuda_match_the_reference() -> None:
    kernels = SOAAKernels(min_numel=1000)
    shapes = [(300, 40), (7,)]
    grads, ms, vs, ps = _state(25, shapes, [1.0, 0.1])
    t, lr, eps, wd, d = 5, 0.05, 1e-8, 0.01, 1.2
    ref = _reference(grads, ms, vs, ps, t, lr=lr, eps=eps, wd=wd, d=d)
    def cu(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [x.float().cuda() for x in xs]

    grads_c, ms_c, vs_c, ps_c = cu(grads), cu(ms), cu(vs), cu(ps)
    m, v, a, b, c = _run_both_passes(grads_c, ms_c, vs_c, ps_c, [t, t], kernels=kernels, lr=lr, eps=eps,
                                     weight_decay=wd, d=d)
    assert kernels.failure is None, kernels.failure
    # m = β₁m + (1-β₁)g of unit-scale float32 terms: Triton contracts it into an FMA, so where the terms
    # nearly cancel the result is off by up to a float32 ulp of the terms (~6e-8; seen 2.4e-8 on an H200)
    torch.testing.assert_close(_flat(m).double().cpu(), ref["m"], rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(_flat(ps_c).double().cpu(), ref["p"], rtol=1e-5, atol=1e-6)
    assert a[0].item() == pytest.approx(ref["s_m2"], rel=1e-6)
    assert b[0].item() == pytest.approx(ref["s_mu"], rel=1e-5)
    assert b[1].item() == pytest.approx(ref["s_vu"], rel=1e-5)


def test_nonfinite_gradient_makes_the_partials_nonfinite() -> None:
    grads, ms, vs, _ = _state(5, [(4,)], [1.0])
    grads[0][2] = float("inf")
    part = soaa_moments(grads, ms, vs, [1], beta1=B1, beta2=B2, eps=1e-8)
    assert not bool(torch.isfinite(part).all())
    grads[0][2] = float("nan")
    part = soaa_moments(grads, ms, vs, [1], beta1=B1, beta2=B2, eps=1e-8)
    assert not bool(torch.isfinite(part).all())


def test_chunked_fp32_sums_are_accurate() -> None:
    x = 1.0 + 1e-3 * torch.rand(3_000_017, generator=torch.Generator().manual_seed(0))
    ref1, ref2 = x.double().sum().item(), (x.double() ** 2).sum().item()
    assert _sum64(x).item() == pytest.approx(ref1, rel=1e-7)
    assert _sum_sq64(x).item() == pytest.approx(ref2, rel=1e-7)


def test_band_schedule() -> None:
    assert band(1, 0.1, 100) == (1.0, 2.0)
    lo, hi = band(100, 0.1, 100)
    assert lo == pytest.approx(0.9 ** 0.99) and hi == pytest.approx(1 + 0.1 ** 0.99)
    # the formula reaches the final band at t = T + 1 and keeps it (for T = 1 too: not [1, 2] forever)
    assert band(101, 0.1, 100) == band(500, 0.1, 100) == (0.9, 1.1)
    assert band(1, 0.1, 1) == (1.0, 2.0) and band(2, 0.1, 1) == band(9, 0.1, 1) == (0.9, 1.1)
    assert band(2, 0.05, 2) == pytest.approx((0.95 ** 0.5, 1 + 0.05 ** 0.5)) and band(3, 0.05, 2) == (0.95, 1.05)
    assert band(1, 0.25, None) == band(77, 0.25, None) == (0.75, 1.25)
    assert band(1, 0.0, 10) == (1.0, 2.0) and band(2, 0.0, 10) == (1.0, 1.0)
    # "final" is the final band at every step, whatever T; "paper" is the default of the function
    assert band(1, 0.1, 100, "final") == band(500, 0.1, 100, "final") == (0.9, 1.1)
    assert band(7, 0.1, 100, "paper") == band(7, 0.1, 100)
    with pytest.raises(ValueError, match=r"Invalid band_schedule='warm'\. Must be one of 'final', 'paper'\."):
        band(1, 0.1, 100, "warm")
    for t in range(1, 60):  # the band narrows monotonically and always contains 1
        lo, hi = band(t, 0.2, 50)
        lo2, hi2 = band(t + 1, 0.2, 50)
        assert lo2 <= lo <= 1.0 <= hi2 <= hi


def _scalars(**kw):
    base = dict(sum_mhat_sq=1.0, sum_vhat_eps=2.0, loss=1.0, loss_ema=0.0, pred_prev=0.0, d_prev=1.0, t=1,
                beta1=B1, eps=1e-8, gamma=0.1, total_steps=20)
    base.update(kw)
    return trust_region_scalars(**base)


def test_trust_region_scalars() -> None:
    s = _scalars()
    assert s.c == 1.5 and s.d == 1.0 and (s.lo, s.hi) == (1.0, 2.0)  # d after step 1 is 1
    # ρ = (ℓ̂ − ℓ) / max(p, ε) scales d multiplicatively, then the band clips it.
    s = _scalars(loss=1.0, loss_ema=0.5, t=3, pred_prev=0.01, d_prev=1.0)
    loss_ema = B1 * 0.5 + (1 - B1) * 1.0
    assert s.loss_ema == pytest.approx(loss_ema)
    assert s.rho == pytest.approx((loss_ema / (1 - B1**3) - 1.0) / 0.01)
    assert s.d == pytest.approx(min(max(s.rho, s.lo), s.hi))
    # p <= 0 uses ε in the denominator; a loss increase gives ρ < 0 and d = lo.
    s = _scalars(loss=5.0, loss_ema=1.0, t=4, pred_prev=-1.0, d_prev=1.5)
    assert s.rho < 0 and s.d == s.lo
    assert predicted_reduction(3.0, 2.0) == 2.0
    s = _scalars(band_schedule="final", loss=5.0, loss_ema=1.0, t=40, pred_prev=0.1)  # ρ < 0 gives lo
    assert (s.lo, s.hi) == (0.9, 1.1) and s.d == 0.9


def test_constant_loss_drives_d_to_lo() -> None:
    loss_ema, d = 0.0, 1.0
    for t in range(1, 40):
        s = _scalars(loss=2.5, loss_ema=loss_ema, t=t, pred_prev=0.3, d_prev=d, total_steps=30)
        loss_ema, d = s.loss_ema, s.d
        assert abs(s.rho) < 1e-6  # ℓ̂ equals the constant loss up to rounding
        assert d == s.lo and s.lo <= d <= s.hi
    assert d == band(31, 0.1, 30)[0] == 0.9  # the final band's lo after T


def test_smoothed_ratio_is_a_ratio_of_discounted_sums() -> None:
    """rho_smoothing = β: ρ_t = Σ β^(t-k) a_k / Σ β^(t-k) p_{k-1}; β = 0 is the spec's per-step ratio."""
    beta, loss_ema, a_sum, p_sum, d = 0.7, 0.0, 0.0, 0.0, 1.0
    losses, preds = [3.0, 2.0, 2.5, 1.0, 1.8, 1.2], [0.0, 0.4, 1e-12, 0.3, -0.2, 0.5]
    actuals = []
    for t, (ell, p) in enumerate(zip(losses, preds), start=1):
        s = _scalars(loss=ell, loss_ema=loss_ema, t=t, pred_prev=p, d_prev=d, band_schedule="final",
                     gamma=0.3, rho_smoothing=beta, actual_sum=a_sum, pred_sum=p_sum)
        spec = _scalars(loss=ell, loss_ema=loss_ema, t=t, pred_prev=p, d_prev=d, band_schedule="final", gamma=0.3)
        assert spec.actual_sum == spec.pred_sum == 0.0 and spec.actual == s.actual
        actuals.append(s.actual)
        w = [beta ** (t - k) for k in range(1, t + 1)]
        num, den = sum(x * y for x, y in zip(w, actuals)), sum(x * y for x, y in zip(w, preds[:t]))
        assert s.rho == pytest.approx(num / max(den, 1e-8), rel=1e-12) and abs(s.rho) < 100.0
        assert s.d == pytest.approx(min(max(s.rho * d, 0.7), 1.3), rel=1e-12)
        loss_ema, a_sum, p_sum, d = s.loss_ema, s.actual_sum, s.pred_sum, s.d
    # step 3's p = 1e-12 makes the spec's ρ explode (the sums' ratio above stayed < 100)
    assert abs(_scalars(loss=2.5, loss_ema=0.5, t=3, pred_prev=1e-12).rho) > 1e6
    # β = 0 reproduces the spec's ρ and d exactly
    a = _scalars(loss=1.0, loss_ema=0.5, t=3, pred_prev=0.01, rho_smoothing=0.0, actual_sum=7.0, pred_sum=9.0)
    b = _scalars(loss=1.0, loss_ema=0.5, t=3, pred_prev=0.01)
    assert (a.rho, a.d) == (b.rho, b.d)


def test_trust_warmup_holds_d_at_one() -> None:
    for t, want_one in ((1, True), (5, True), (6, False)):
        s = _scalars(loss=5.0, loss_ema=1.0, t=t, pred_prev=0.1, d_prev=1.0, band_schedule="final",
                     trust_warmup=5)
        assert (s.d == 1.0) == want_one and (want_one or s.d == s.lo)
