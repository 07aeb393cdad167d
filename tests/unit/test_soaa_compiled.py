"""SOAA with its compiled kernels (``compile=True``) against the eager optimizer, and the flag's rules.

The kernels themselves are checked against the float64 transcription in ``test_soaa_functional.py``.
"""

from __future__ import annotations

import re

import pytest
import torch

from lightning_soaa import SOAA


def _model(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    # one tensor above the compiled kernels' size threshold (2**16), two below it
    shapes = [(300, 250), (250,), (7, 3)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def test_compiled_optimizer_follows_the_eager_one() -> None:
    runs = []
    for compile_ in (True, False):
        ps = _model(0)
        opt = SOAA(ps, lr=0.01, weight_decay=0.01, gamma=0.2, total_steps=10, compile=compile_)
        assert (opt._kernels() is not None) == compile_
        g = torch.Generator().manual_seed(1)
        for k in range(4):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g) * (0.1 + k)
            opt.step(loss=1.0 / (1 + k))
        kernels = opt._kernels()
        if kernels is not None and kernels.failure is not None:
            pytest.skip(f"torch.compile does not work here ({kernels.failure})")
        runs.append((ps, opt.trust_state(), opt))
    (pc, sc, oc), (pe, se, oe) = runs
    for a, b in zip(pc, pe):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for k in ("d", "c", "rho", "loss_ema"):
        assert sc[k] == pytest.approx(se[k], rel=1e-4), k
    for a, b in zip(oc.state.values(), oe.state.values()):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_compile_flag_default_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    p = [torch.nn.Parameter(torch.ones(3))]
    monkeypatch.setenv("LIGHTNING_SOAA_COMPILE", "0")
    assert SOAA(p)._kernels() is None
    assert SOAA(p, compile=True)._kernels() is not None  # the argument wins over the environment
    monkeypatch.delenv("LIGHTNING_SOAA_COMPILE")
    assert SOAA(p)._kernels() is not None
    assert SOAA(p, compile=False)._kernels() is None
    a, b = SOAA(p, compile=True), SOAA(p, compile=True)
    assert a._kernels() is not b._kernels()  # per instance (failures, records); compiled passes are shared
    with pytest.raises(ValueError, match=re.escape("Invalid compile='yes'. Must be True, False or None.")):
        SOAA(p, compile="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid compile=True in a param group"):
        SOAA([{"params": p, "compile": True}])


@pytest.mark.parametrize("compile_", [True, False])
def test_skipped_step_leaves_state_and_params_bit_identical_and_state_is_two_moments(compile_: bool) -> None:
    """A non-finite gradient in the small tensor skips the step after the sums pass ran over the large
    one (compiled or tiled): nothing changed. The state is m and v only (no spare buffers)."""
    ps = _model(2)
    opt = SOAA(ps, lr=0.01, weight_decay=0.01, compile=compile_)
    g = torch.Generator().manual_seed(3)
    for k in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step(loss=1.0 / (1 + k))
    kernels = opt._kernels()
    if kernels is not None and kernels.failure is not None:
        pytest.skip(f"torch.compile does not work here ({kernels.failure})")
    before = ([p.detach().clone() for p in ps],
              [{k: v.clone() for k, v in opt.state[p].items()} for p in ps], opt.trust_state())
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    ps[2].grad[1, 1] = float("nan")
    opt.step(loss=0.3)
    assert opt.skipped_steps == 1 and opt.num_steps == 2
    for p, saved in zip(ps, before[0]):
        assert torch.equal(p, saved)
    for p, saved in zip(ps, before[1]):
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
        for k, v in saved.items():
            assert torch.equal(opt.state[p][k], v), k
    assert opt.trust_state() == before[2]
    assert not hasattr(opt, "_spare")


def test_compiled_kernels_take_float16_parameters_with_their_float32_moments() -> None:
    """A float16 parameter keeps float32 moments: the compiled kernels take such a block (θ and g read in
    float32, θ rounded once when stored) and agree with the eager path, θ to one float16 rounding (the two
    paths' sums, and so the trust scalars, differ in their last float64 bits)."""
    from lightning_soaa.functional.soaa import split_blocks

    runs = []
    for compile_ in (True, False):
        ps = [torch.nn.Parameter(p.detach().half()) for p in _model(0)]
        opt = SOAA(ps, lr=0.01, weight_decay=0.01, gamma=0.2, total_steps=10, compile=compile_)
        g = torch.Generator().manual_seed(1)
        for k in range(3):
            for p in ps:
                p.grad = (torch.randn(p.shape, generator=g) * 1e-3).half()  # (1-β2) g² underflows in float16
            opt.step(loss=1.0 / (1 + k))
        kernels = opt._kernels()
        if kernels is not None and kernels.failure is not None:
            pytest.skip(f"torch.compile does not work here ({kernels.failure})")
        st = opt.state[ps[0]]
        assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
        if compile_:
            lists = ([ps[0]], [ps[0].grad], [st["exp_avg"]], [st["exp_avg_sq"]])
            assert split_blocks(kernels, *lists).compiled == [0]  # not sent to the eager path
        runs.append((ps, opt))
    (pc, oc), (pe, oe) = runs
    for a, b in zip(pc, pe):
        torch.testing.assert_close(a.float(), b.float(), rtol=torch.finfo(torch.float16).eps, atol=1e-7)
    for a, b in zip(oc.state.values(), oe.state.values()):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-5, atol=1e-15)


def _trial(dtype: torch.dtype, compile_: bool) -> tuple[list[torch.nn.Parameter], SOAA]:
    g = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in [(300, 250), (9,)]]
    opt = SOAA(ps, lr=0.01, weight_decay=0.01, compile=compile_)
    for k in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype) * (0.1 + k)
        opt.step(loss=1.0 / (1 + k))
    return ps, opt


@pytest.mark.parametrize("native", ["1", "0"])
def test_many_optimizers_in_one_process_share_one_set_of_compiled_kernels(
        native: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sweeps and notebooks build optimizers by the hundred: torch keeps every torch.compile wrapper for the life
    of the process (``cached_backends``), so they are made once, at the first use of the compiled path ("0":
    the torch.compile'd kernels on CPU; "1": the C loops, which never compile), and shared. A wrapper shared by
    fp32 and fp64 optimizers in turn gives each the eager optimizer's results (dynamo guards on the dtype)."""
    import torch._dynamo.eval_frame as ef

    monkeypatch.setenv("LIGHTNING_SOAA_NATIVE", native)
    _trial(torch.float32, True)  # the first use in this process may make the shared set
    before = len(ef.cached_backends)
    for dtype in (torch.float64, torch.float32, torch.float64):
        ps, opt = _trial(dtype, True)
        kernels = opt._kernels()
        assert kernels is not None
        if native == "0" and kernels.failure is not None:
            pytest.skip(f"torch.compile does not work here ({kernels.failure})")
        pe, _ = _trial(dtype, False)
        for a, b in zip(ps, pe):
            assert a.dtype == dtype
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(ef.cached_backends) == before
