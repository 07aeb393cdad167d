"""Checks of the Triton SOAA kernels (``kernels/soaa_triton.py``), each a function of the device: run on
CUDA in-process by ``test_soaa_cuda.py``, and on the CPU through Triton's interpreter by
``test_soaa_triton.py`` (in a subprocess with ``TRITON_INTERPRET=1``, which must be set before Triton
compiles anything). Not collected by pytest itself (the name starts with an underscore).

The references: the C kernels where they exist (same per-element arithmetic: on the interpreter, which
fuses nothing, the stored θ, m, v must be bit-identical to them), a float64 transcription, and eager torch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_soaa import SOAA
from lightning_soaa.functional.soaa import SOAAKernels
from lightning_soaa.kernels import soaa_triton
from lightning_soaa.kernels.soaa_triton import BLOCK, ITERS, TritonSOAA

SCAL = (0.1, 0.95, 0.05, 0.999, -1e-3, 2.0, 0.3, 1e-8)  # (1-β1, β2, 1-β2, decay, alr, k1, knee, ε)
SIZES = (2 * BLOCK * ITERS + BLOCK + 7, 3, 0, BLOCK, 100)  # several programs (the last ends in its
# second chunk), tiny, empty, exactly one chunk


def _blocks(device: str, dtype: torch.dtype, seed: int = 0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)

    def draw(pos: bool = False) -> list[torch.Tensor]:
        xs = [torch.randn(n, generator=gen, dtype=torch.float64) for n in SIZES]
        return [(x.abs() if pos else x).to(device, dtype) for x in xs]

    return [draw(), draw(), draw(), draw(pos=True)]  # θ, g, m, v


def _float64_step(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> list[float]:
    """[Σ m q, Σ (s q)², #(s < knee), Σ m_t², Σ v_t] of one block in float64."""
    a, b2, b2c, _, _, k1, knee, eps = SCAL
    g, m, v = g.double(), m.double(), v.double()
    mt, vt = m + (g - m) * a, v * b2 + g * g * b2c
    s = vt.sqrt()
    q = mt / (eps + k1 * s.clamp_min(knee) * s)
    return [float(x) for x in ((mt * q).sum(), ((s * q) ** 2).sum(), (s < knee).sum(), (mt * mt).sum(), vt.sum())]


def step_matches_float64_and_eager(device: str) -> None:
    """Every dtype: θ, m, v to the bit as the reference arithmetic (every operation rounded to the compute
    type, nothing fused: ``soaa_triton._reference_step``), the five sums as float64 (within the dtype's
    rounding of the stored moments), and the sums pass's two modes."""
    kernels = TritonSOAA(device)
    for dtype, rtol in ((torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)):
        p, g, m, v = _blocks(device, dtype)
        gm = kernels.sums(g, m, v, [TritonSOAA.SUMS_GM] * len(SIZES))
        new = [[x.clone() for x in xs] for xs in (p, g, m, v)]
        rows = kernels.step(*new, [SCAL] * len(SIZES))
        for i in range(len(SIZES)):
            want, _ = soaa_triton._reference_step(p[i], g[i], m[i], v[i], SCAL)
            for got, ref in zip((new[0][i], new[2][i], new[3][i]), want):
                assert torch.equal(got, ref), (dtype, i)
            ref64 = _float64_step(p[i], g[i], m[i], v[i])
            for j, (got_s, ref_s) in enumerate(zip(rows[i], ref64)):
                # #(s < knee) against float64: an element whose float32 s and float64 s straddle the knee
                tol = 1.0 if j == 2 and dtype != torch.float64 else 1e-9
                assert math.isclose(got_s, ref_s, rel_tol=20 * rtol, abs_tol=tol), (dtype, i, rows[i], ref64)
            mg = float((m[i].double() * g[i].double()).sum())
            g2 = float((g[i].double() ** 2).sum())
            assert math.isclose(gm[i][0], mg, rel_tol=1e-5, abs_tol=1e-9), (dtype, i)
            assert math.isclose(gm[i][1], g2, rel_tol=1e-5, abs_tol=1e-9), (dtype, i)
        # mode SUMS_MOMENTS on the moments the step stored: the step's own Σ m², Σ v, to the bit
        stored = kernels.sums(new[1], new[2], new[3], [TritonSOAA.SUMS_MOMENTS] * len(SIZES))
        assert [r[:2] for r in stored] == [r[3:] for r in rows], dtype
        # the per-block reduction over many iterations of its loop (a block spans few programs here)
        saved = soaa_triton.REDUCE_BLOCK
        soaa_triton.REDUCE_BLOCK = 2
        try:
            again = kernels.sums(new[1], new[2], new[3], [TritonSOAA.SUMS_MOMENTS] * len(SIZES))
        finally:
            soaa_triton.REDUCE_BLOCK = saved
        for r, r2 in zip(stored, again):
            assert all(math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-12) for x, y in zip(r, r2)), (dtype, r, r2)


def step_equals_the_c_kernels(device: str) -> None:
    """Against the C kernels on the same values (the C kernels run on CPU copies): θ, m, v bit-identical
    (neither side fuses a multiply-add; IEEE sqrt and division on both), the sums to their rounding."""
    from lightning_soaa.kernels.soaa_native import NativeSOAA

    native, kernels = NativeSOAA.load(), TritonSOAA(device)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        p, g, m, v = _blocks("cpu", dtype, seed=1)
        ours = [[x.clone().to(device) for x in xs] for xs in (p, g, m, v)]
        theirs = [[x.clone() for x in xs] for xs in (p, g, m, v)]
        rows = kernels.step(*ours, [SCAL] * len(SIZES))
        rows_c = native.step(*theirs, [SCAL] * len(SIZES))
        for a_list, b_list in zip((ours[0], ours[2], ours[3]), (theirs[0], theirs[2], theirs[3])):
            for a, b in zip(a_list, b_list):
                assert torch.equal(a.cpu(), b), dtype
        for r, rc in zip(rows, rows_c):
            for x, y in zip(r, rc):
                assert math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9), (dtype, r, rc)


def nonfinite_gradient_makes_the_sums_nonfinite_and_bf16_keeps_nan(device: str) -> None:
    kernels = TritonSOAA(device)
    p, g, m, v = _blocks(device, torch.float32)
    g[0][5] = float("nan")
    g[3][0] = float("inf")
    gm = kernels.sums(g, m, v, [TritonSOAA.SUMS_GM] * len(SIZES))
    assert not math.isfinite(gm[0][0]) and not math.isfinite(gm[3][1])
    assert all(math.isfinite(x) for i in (1, 2, 4) for x in gm[i])  # a block's sums are its own
    pb, gb, mb, vb = _blocks(device, torch.bfloat16)
    gb[0][1] = float("nan")
    kernels.step(pb, gb, mb, vb, [SCAL] * len(SIZES))
    assert torch.isnan(mb[0][1]) and torch.isnan(pb[0][1]) and torch.isfinite(pb[0][2:]).all()


def step_bumps_autograd_versions(device: str) -> None:
    kernels = TritonSOAA(device)
    p, g, m, v = _blocks(device, torch.float32)
    before = [x._version for x in (*p, *m, *v)]
    kernels.step(p, g, m, v, [SCAL] * len(SIZES))
    assert [x._version for x in (*p, *m, *v)] == [b + 1 for b in before]


def self_check_refuses_kernels_that_disagree(device: str) -> None:
    """A kernel build that computes something else, or fails, is never used: ``accepts`` says no (once
    checked, per device and dtype) and the reason is logged."""
    kernels = TritonSOAA(device)
    real = soaa_triton._reference_step

    def off_by_a_bit(*a: Any) -> Any:
        want, sums = real(*a)
        return [want[0] * 1.001, *want[1:]], sums

    soaa_triton._reference_step = off_by_a_bit  # type: ignore[assignment]
    try:
        why = soaa_triton.self_check(kernels, torch.device(device), torch.float32)
        assert why is not None and "theta" in why, why
    finally:
        soaa_triton._reference_step = real  # type: ignore[assignment]
    broken = TritonSOAA(device)

    def boom(*a: Any) -> Any:
        raise RuntimeError("no kernel image for this device")

    broken.run_step = boom  # type: ignore[method-assign]
    p, g, m, v = _blocks(device, torch.float32)
    assert not broken.accepts(p[0], g[0], m[0], v[0]) and not broken.accepts_all(p, g, m, v)
    assert broken._checked == {(p[0].device, torch.float32): False}
    assert kernels.accepts_all(p, g, m, v)  # the real ones pass


def _train(device: str, kernels: SOAAKernels | None, dtype: torch.dtype, steps: int,
           state: dict[str, Any] | None = None, start: int = 0) -> tuple[list[torch.Tensor], SOAA]:
    gen = torch.Generator().manual_seed(5)
    shapes = [(70, 130), (130,), (3, 5)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype)) for s in shapes]
    # compile=True: accelerators take fused kernels only when asked (the default there is foreach)
    opt = SOAA(ps, lr=1e-2, gamma=0.3, weight_decay=0.01, total_steps=20, compile=True)
    opt._soaa_kernels = kernels  # the kernels under test (the optimizer's own are C on CPU)
    if state is not None:
        with torch.no_grad():
            for p, saved in zip(ps, state["params"]):
                p.copy_(saved)
        opt.load_state_dict(state["opt"])
    for t in range(start, start + steps):
        g2 = torch.Generator().manual_seed(100 + t)
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=g2, dtype=torch.float64) * (0.5 + 0.1 * t)).to(device, dtype)
        opt.step(loss=10.0 - t + (3.0 if t == 4 else 0.0))
    return ps, opt


def optimizer_follows_the_c_kernels_and_resumes_to_the_bit(device: str) -> None:
    """SOAA with the Triton kernels follows SOAA with the C kernels (the same per-element arithmetic; the
    sums differ in rounding only), and a run resumed from a state dict takes the same bits as the
    uninterrupted one (the resumed run reads Σ m², Σ v once, by the step's own arithmetic). The Triton
    passes' calls are counted: a silent fallback to another path fails the check."""
    from lightning_soaa.kernels.soaa_native import NativeSOAA

    calls = {"sums": 0, "step": 0}

    def counted() -> TritonSOAA:
        fused = TritonSOAA(device)
        for name in calls:
            inner = getattr(fused, name)

            def wrapper(*a: Any, _inner: Any = inner, _name: str = name) -> Any:
                calls[_name] += 1
                return _inner(*a)

            setattr(fused, name, wrapper)
        return fused

    def ours() -> SOAAKernels:
        return SOAAKernels(cpu_loader=counted, accel_loader=counted)

    steps = 6
    a, a_opt = _train(device, ours(), torch.float32, steps)
    assert calls["step"] >= steps and calls["sums"] >= steps, calls
    b, b_opt = _train("cpu", SOAAKernels(cpu_loader=NativeSOAA.load), torch.float32, steps)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach().cpu(), y.detach(), rtol=1e-5, atol=1e-6)
    assert a_opt.statistics()["skipped_steps"] == b_opt.statistics()["skipped_steps"]
    half, half_opt = _train(device, ours(), torch.float32, 3)
    state = {"params": [p.detach().clone() for p in half], "opt": half_opt.state_dict()}
    resumed, _ = _train(device, ours(), torch.float32, steps - 3, state=state, start=3)
    for x, y in zip(resumed, a):
        assert torch.equal(x, y)


def programs_of_several_chunks_equal_the_reference(device: str) -> None:
    """Programs that loop over several chunks (``TritonSOAA(iters=...)``; the default may be one chunk):
    θ, m, v to the bit as the reference arithmetic, the sums as programs of one chunk add them (to their
    rounding), the sums pass's Σ m², Σ v equal to the step's to the bit, and the check before first use
    passes with that shape."""
    one, looped = TritonSOAA(device, block=64, iters=1), TritonSOAA(device, block=64, iters=3)
    sizes = (64 * 3 * 2 + 70, 64 * 3, 5, 0)  # two whole programs and a partial one; exactly one; tiny; empty
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        blocks = [[torch.randn(n, generator=gen, dtype=torch.float64).to(device, dtype) for n in sizes]
                  for _ in range(4)]
        blocks[3] = [x.abs() for x in blocks[3]]
        a = [[x.clone() for x in xs] for xs in blocks]
        b = [[x.clone() for x in xs] for xs in blocks]
        rows_one = one.step(*a, [SCAL] * len(sizes))
        rows = looped.step(*b, [SCAL] * len(sizes))
        for i in range(len(sizes)):
            want, _ = soaa_triton._reference_step(*(xs[i] for xs in blocks), SCAL)
            for got, ref in zip((b[0][i], b[2][i], b[3][i]), want):
                assert torch.equal(got, ref), (dtype, i)
            for x, y in zip(rows[i], rows_one[i]):
                assert math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-12), (dtype, i, rows[i], rows_one[i])
        stored = looped.sums(b[1], b[2], b[3], [TritonSOAA.SUMS_MOMENTS] * len(sizes))
        assert [r[:2] for r in stored] == [r[3:] for r in rows], dtype
        assert soaa_triton.self_check(looped, torch.device(device), dtype) is None, dtype
