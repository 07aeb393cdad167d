"""The C kernels of SOAA's CPU passes (``kernels/soaa_native.py``): building, caching, fallback,
thread-count determinism, non-finite values, autograd's version counters. Their arithmetic against
the float64 transcription is in ``test_soaa_functional.py`` (the ``c`` backend cases)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from lightning_soaa.functional.soaa import SOAAKernels, soaa_moments, soaa_step_
from lightning_soaa.kernels.soaa_native import NativeSOAA, NativeUnavailable

B1, B2 = 0.9, 0.999


def _native_or_skip() -> NativeSOAA:
    try:
        return NativeSOAA.load()
    except NativeUnavailable as e:
        pytest.skip(f"no C compiler here: {e}")


def _block(n: int, seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    g_, m, p = (torch.randn(n, generator=g).to(dtype) for _ in range(3))
    return [g_, m, torch.rand(n, generator=g).to(dtype), p]  # g, m, v >= 0, θ


def test_build_is_cached_and_reused(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_SOAA_CACHE", str(tmp_path))
    _native_or_skip()
    built = list(tmp_path.glob("soaa_cpu-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    NativeSOAA.load()
    assert [p.stat().st_mtime_ns for p in tmp_path.glob("soaa_cpu-*.so")] == [stamp]  # found, not rebuilt
    assert not list(tmp_path.glob("*.so.tmp*")) and len(list(tmp_path.iterdir())) == 1  # no leftovers


def test_without_a_compiler_the_kernels_fall_back_with_one_warning(
        tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("LIGHTNING_SOAA_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang either
    with pytest.raises(NativeUnavailable, match="no C compiler found"):
        NativeSOAA.load()
    kernels = SOAAKernels(min_numel=10, cpu_loader=NativeSOAA.load)
    g, m, v, p = _block(100, 0)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            soaa_moments([g], [m], [v], [1], beta1=B1, beta2=B2, eps=1e-8, kernels=kernels)
    assert kernels._native is None and "no C compiler found" in (kernels.native_failure or "")
    assert sum("no C kernels here" in r.message for r in caplog.records) == 1


def test_env_switch_turns_the_c_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimizer reads LIGHTNING_SOAA_NATIVE (functional/ never reads the environment)."""
    from lightning_soaa import SOAA

    block = _block(1 << 17, 0)
    monkeypatch.setenv("LIGHTNING_SOAA_NATIVE", "0")
    off = SOAA([torch.nn.Parameter(torch.ones(3))], compile=True)._kernels()
    assert off is not None and off.native_for(*block) is None
    assert SOAAKernels().native_for(*block) is None  # no loader, no C kernels
    monkeypatch.delenv("LIGHTNING_SOAA_NATIVE")
    _native_or_skip()
    on = SOAA([torch.nn.Parameter(torch.ones(3))], compile=True)._kernels()
    assert on is not None and on.native_for(*block) is not None
    kernels = SOAAKernels(cpu_loader=NativeSOAA.load)
    assert kernels.native_for(*_block(1 << 17, 0)) is not None
    assert kernels.native_for(*_block(100, 0)) is not None  # any size: one call takes all blocks
    g, m, v, p = _block(1 << 17, 0)
    assert kernels.native_for(g, m, torch.randn(2 << 17)[::2], p) is None  # not contiguous
    assert kernels.native_for(*_block(1 << 17, 0, torch.float16)) is None  # fp16: torch.compile's


class _FakeFused:
    """Stands in for the Triton passes in a test of the routing only (which kernels object a block of a
    device goes to); the kernels themselves are tested in test_soaa_triton.py / test_soaa_cuda.py."""

    SUMS_MOMENTS, SUMS_GM = 0, 1

    def accepts(self, *ts: torch.Tensor) -> bool:
        return all(t.device.type == "meta" for t in ts)

    def accepts_all(self, *lists: list[torch.Tensor]) -> bool:
        return all(self.accepts(*xs) for xs in lists)


def test_accelerator_blocks_go_to_the_accelerator_kernels_and_cpu_blocks_to_the_c_ones(
        caplog: pytest.LogCaptureFixture) -> None:
    fake = _FakeFused()
    kernels = SOAAKernels(accel_loader=lambda: fake)
    on_device = [torch.empty(5, device="meta") for _ in range(4)]
    assert kernels.native_for(*on_device) is fake
    assert kernels.native_for_all(*[[t] for t in on_device]) is fake
    assert kernels.native_for(*_block(100, 0)) is None  # CPU blocks: the C loader, none here
    assert kernels.native_failure is not None and kernels.accel_failure is None

    def unavailable() -> _FakeFused:
        raise RuntimeError("Triton is not installed")

    refused = SOAAKernels(accel_loader=unavailable)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert refused.native_for(*on_device) is None and refused.native_for_all(*[[t] for t in on_device]) is None
    assert refused.accel_failure == "Triton is not installed"
    assert sum("no fused accelerator kernels" in r.message for r in caplog.records) == 1
    assert SOAAKernels().native_for(*on_device) is None  # no loader: no accelerator kernels
    # SOAA's default (compile=None) on an accelerator without them (MPS, no Triton): foreach, said at INFO
    caplog.clear()
    quiet = SOAAKernels(accel_loader=unavailable, compile_accelerators=False)
    with caplog.at_level(logging.INFO):
        assert quiet.native_for(*on_device) is None
    said = [r for r in caplog.records if "no fused accelerator kernels" in r.message]
    assert [r.levelno for r in said] == [logging.INFO] and "foreach" in said[0].message


def test_kernels_refuse_tensors_without_their_own_storage() -> None:
    """A wrapper subclass (DTensor and the like) reports data_ptr() == 0: a kernel writing through it would
    fault. Only the public functional API could hand one over (the optimizer passes local shards)."""
    from torch.testing._internal.two_tensor import TwoTensor

    from lightning_soaa.kernels.raw import own_storage

    native = _native_or_skip()
    g, m, v, p = _block(100, 0)
    wrapped = TwoTensor(m.clone(), m.clone())
    assert wrapped.data_ptr() == 0 and own_storage([g, m]) and not own_storage([g, wrapped])
    assert native.accepts(g, m, v, p) and not native.accepts(g, wrapped, v, p)
    assert not native.accepts_all([g], [wrapped], [v], [p])


def test_an_accelerator_step_that_fails_says_the_state_is_inconsistent() -> None:
    """The fused accelerator step can fail after its kernel wrote (a device fault): it raises saying so,
    and the accelerator kernels are not used again."""

    class Faulting(_FakeFused):
        def step(self, *a: object) -> list[list[float]]:
            raise RuntimeError("an illegal memory access was encountered")

    kernels = SOAAKernels(accel_loader=Faulting)
    p, g, m, v = ([torch.zeros(4, device="meta")] for _ in range(4))
    with pytest.raises(RuntimeError, match="no longer consistent"):
        soaa_step_(p, g, m, v, [1], lr=0.1, beta1=B1, beta2=B2, eps=1e-8, weight_decay=0.0, d=1.0, c=1.0,
                   kernels=kernels)
    assert kernels.accel_failure is not None and "illegal memory access" in kernels.accel_failure
    assert kernels.native_for(p[0], g[0], m[0], v[0]) is None


def test_compile_none_never_compiles_for_accelerator_blocks() -> None:
    """Accelerator blocks the fused (Triton) kernels do not take go the foreach path by default: a group
    that also holds CPU blocks keeps the C loops for those, and its accelerator blocks do not take the
    torch.compile'd kernels (measured 5-10x slower than foreach on an H200)."""
    big = [torch.empty(1 << 17, device="meta") for _ in range(4)]
    assert SOAAKernels(compile_accelerators=True).accepts(*big)
    assert not SOAAKernels(compile_accelerators=False).accepts(*big)
    assert SOAAKernels(compile_accelerators=False).accepts(*_block(1 << 17, 0))  # CPU: torch.compile's still


def test_the_optimizer_takes_the_triton_kernels_unless_compile_is_false() -> None:
    """The Triton passes are the default on accelerators (timed on an H200: 1.5-3x faster steps than
    foreach); ``compile=False`` is eager everywhere. Where they cannot load (no Triton, no CUDA), the
    default sends accelerator blocks to foreach, ``compile=True`` to the torch.compile'd kernels."""
    from types import SimpleNamespace

    from lightning_soaa import SOAA
    from lightning_soaa.kernels.soaa_triton import TritonUnavailable

    def make(compile: bool | None) -> SOAA:
        return SOAA([torch.nn.Parameter(torch.ones(3))], compile=compile)

    for compile in (None, True):
        kernels = make(compile)._kernels()
        assert kernels is not None and kernels._accel_loader is not None, compile
    assert make(False)._kernels() is None
    views = [SimpleNamespace(param=torch.empty(1 << 17, device="meta"))]

    def unavailable() -> _FakeFused:
        raise TritonUnavailable("no CUDA device")

    for compile, want in ((None, None), (True, "kernels")):
        opt = make(compile)
        kernels = opt._kernels()
        assert kernels is not None
        kernels._accel_loader = unavailable
        got = opt._kernels_for(views)  # type: ignore[arg-type]
        assert (got is kernels) if want else got is None, compile

    opt = make(None)
    kernels = opt._kernels()
    assert kernels is not None
    kernels._accel_loader = lambda: _FakeFused()
    assert opt._kernels_for(views) is kernels  # type: ignore[arg-type]


class _Recorder(_FakeFused):
    """Takes blocks of any device and records the devices of each call (zero sums)."""

    def __init__(self) -> None:
        self.calls: list[set[torch.device]] = []

    def accepts(self, *ts: torch.Tensor) -> bool:
        return True

    def accepts_all(self, *lists: list[torch.Tensor]) -> bool:
        return len({t.device for xs in lists for t in xs}) == 1

    def sums(self, g: list[torch.Tensor], m: list[torch.Tensor], v: list[torch.Tensor], modes: list[int]
             ) -> list[list[float]]:
        self.calls.append({t.device for t in (*g, *m, *v)})
        return [[0.0, 0.0] for _ in g]


def test_one_fused_call_never_mixes_devices_and_each_kind_gets_its_own_kernels() -> None:
    """A group with blocks on several devices (a model split over GPUs, or CPU and GPU): each fused call
    gets the blocks of one device, through the kernels of that device's kind (the C loops would read a
    CUDA pointer as host memory), whatever the order of the blocks."""
    for order in (("cpu", "meta", "cpu", "meta"), ("meta", "cpu", "meta", "cpu")):
        on_cpu, on_device = _Recorder(), _Recorder()
        kernels = SOAAKernels(cpu_loader=lambda: on_cpu, accel_loader=lambda: on_device)
        blocks = [[torch.zeros(4, device=dev) for _ in range(3)] for dev in order]
        g, m, v = ([b[i] for b in blocks] for i in range(3))
        soaa_moments(g, m, v, [1] * 4, beta1=B1, beta2=B2, eps=1e-8, kernels=kernels)
        assert on_cpu.calls and all(devs == {torch.device("cpu")} for devs in on_cpu.calls), on_cpu.calls
        assert on_device.calls and all(devs == {torch.device("meta")} for devs in on_device.calls), on_device.calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sums_and_step_do_not_depend_on_the_thread_count(dtype: torch.dtype) -> None:
    native = _native_or_skip()
    threads = torch.get_num_threads()
    out = []
    try:
        for k in (1, 2, 3):
            torch.set_num_threads(k)
            # 940k elements: 1, 2 and 3 threads really run (one per 2**18 elements at most)
            blocks = [_block(n, 1 + n, dtype) for n in (900_003, 0, 7, 40_000)]
            g, m, v, p = ([b[j] for b in blocks] for j in range(4))
            a = native.sums(g, m, v, [0, 1, 0, 1])
            b = native.step(p, g, m, v, [(1 - B1, B2, 1 - B2, 0.999, -0.01, 2.0, 0.3, 1e-8)] * 4)
            out.append((a, b, p + m + v))
    finally:
        torch.set_num_threads(threads)
    for a, b, ts in out[1:]:
        assert a == out[0][0] and b == out[0][1]  # bit-identical sums, whatever the threads
        assert all(torch.equal(x, y) for x, y in zip(ts, out[0][2]))
    assert out[0][0][1] == [0.0, 0.0] and out[0][1][1] == [0.0] * 5  # the empty block


def test_step_sums_and_both_sums_modes_against_float64() -> None:
    """Per block: mode 0 ``[Σ m², Σ v]``, mode 1 ``[Σ m g, Σ g²]``; the step's five sums, whose last two
    are bit-identical to mode 0 on the new moments (a resumed run takes the same bits)."""
    native = _native_or_skip()
    blocks = [_block(n, 10 + n, torch.float64) for n in (50_001, 3)]
    g, m, v, p = ([b[j] for b in blocks] for j in range(4))
    a = 1 - B1
    mt = [x + (y - x) * a for x, y in zip(m, g)]
    vt = [B2 * x + (1 - B2) * y * y for x, y in zip(v, g)]
    full = native.sums(g, m, v, [0, 0])
    gm = native.sums(g, m, v, [1, 1])
    for k in range(2):
        assert full[k] == pytest.approx([float((m[k] ** 2).sum()), float(v[k].sum())], rel=1e-13)
        assert gm[k] == pytest.approx([float((m[k] * g[k]).sum()), float((g[k] ** 2).sum())], rel=1e-12)
    k1, knee, eps = 3.0, 0.4, 1e-8
    p0 = [x.clone() for x in p]
    rows = native.step(p, g, m, v, [(a, B2, 1 - B2, 0.99, -0.1, k1, knee, eps)] * 2)
    for k in range(2):
        s = vt[k].sqrt()
        q = mt[k] / (eps + k1 * s.clamp_min(knee) * s)
        torch.testing.assert_close(p[k], p0[k] * 0.99 - 0.1 * q, rtol=1e-14, atol=1e-15)
        want = [(mt[k] * q).sum(), ((s * q) ** 2).sum(), (s < knee).sum(), (mt[k] ** 2).sum(), vt[k].sum()]
        assert rows[k] == pytest.approx([float(w) for w in want], rel=1e-12)
    assert [r[3:] for r in rows] == native.sums(g, m, v, [0, 0])  # the same bits


def test_lagged_sums_are_used_only_for_moments_the_step_left_unchanged() -> None:
    """Σ m_t², Σ v_t from the remembered Σ m², Σ v (reading g and m only) equal the full pass; any
    change to the moments (an in-place op, a new tensor, forget()) makes the next pass read v again."""
    _native_or_skip()
    kernels = SOAAKernels(cpu_loader=NativeSOAA.load)
    g, m, v, p = _block(30_000, 4, torch.float64)
    kw = dict(beta1=B1, beta2=B2, eps=1e-8)
    step_kw = dict(lr=0.01, weight_decay=0.0, d=1.0, c=1.5, kernels=kernels, **kw)
    assert kernels.stored_sums(m, v) is None
    soaa_step_([p], [g], [m], [v], [1], **step_kw)
    assert kernels.stored_sums(m, v) is not None
    g2 = torch.randn(30_000, dtype=torch.float64)
    lagged = soaa_moments([g2], [m], [v], [2], kernels=kernels, **kw)
    fresh_kernels = SOAAKernels(cpu_loader=NativeSOAA.load)  # reads Σm², Σv once
    fresh = soaa_moments([g2], [m], [v], [2], kernels=fresh_kernels, **kw)
    assert torch.equal(lagged, fresh)  # the same bits: what a resumed run relies on
    mt, vt = m + (g2 - m) * (1 - B1), B2 * v + (1 - B2) * g2 * g2
    want = [float((mt**2).sum()) / (1 - B1**2) ** 2, float(vt.sum()) / (1 - B2**2) + 1e-8 * 30_000]
    assert lagged.tolist() == pytest.approx(want, rel=1e-12)
    m.mul_(2.0)  # the user (or a loader) changed the moments: the memory no longer applies
    assert kernels.stored_sums(m, v) is None
    soaa_step_([p], [g], [m], [v], [2], **step_kw)
    assert kernels.stored_sums(m, v) is not None
    m2 = m.clone()
    assert kernels.stored_sums(m2, v) is None  # another tensor with the same values
    kernels.forget()
    assert kernels.stored_sums(m, v) is None


def test_nonfinite_gradient_makes_the_partials_nonfinite_and_nothing_is_written() -> None:
    _native_or_skip()
    kernels = SOAAKernels(min_numel=10, cpu_loader=NativeSOAA.load)
    for bad in (float("nan"), float("inf")):
        g, m, v, _ = _block(5000, 2)
        g[4321] = bad
        before = (m.clone(), v.clone())
        part = soaa_moments([g], [m], [v], [3], beta1=B1, beta2=B2, eps=1e-8, kernels=kernels)
        assert kernels._native is not None and not bool(torch.isfinite(part).all())
        assert torch.equal(m, before[0]) and torch.equal(v, before[1])


def test_bf16_store_rounds_to_nearest_even_and_keeps_nan() -> None:
    """With g = m = v = 0 the step is θ ← θ·decay: for every bf16 value (inf and NaN included) the C
    loop's float32 product, rounded to bf16, equals torch's (round to nearest even)."""
    native = _native_or_skip()
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    for decay in (1.0, 1.0 + 2.0**-9, 0.7):
        p = bits.view(torch.bfloat16).clone()
        zeros = [torch.zeros_like(p) for _ in range(3)]
        native.step([p], *([z] for z in zeros), [(1 - B1, B2, 1 - B2, decay, 0.0, 1.0, 1.0, 1e-8)])
        want = (bits.view(torch.bfloat16).float() * decay + 0.0).bfloat16()
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(p), nan)
        assert torch.equal(p.view(torch.int16)[~nan], want.view(torch.int16)[~nan]), decay


def test_the_step_bumps_autograd_version_counters() -> None:
    """The C loop writes through raw pointers; a graph that saved θ must still refuse to backward."""
    _native_or_skip()
    kernels = SOAAKernels(min_numel=10, cpu_loader=NativeSOAA.load)
    p = torch.nn.Parameter(torch.randn(5000))
    loss = (p * p).sum()  # saves p for backward
    g, m, v, _ = _block(5000, 3)
    versions = (p._version, m._version, v._version)
    soaa_step_([p], [g], [m], [v], [1], lr=0.1, beta1=B1, beta2=B2, eps=1e-8, weight_decay=0.0, d=1.0,
               c=1.0, kernels=kernels)
    assert kernels._native is not None
    assert (p._version, m._version, v._version) > versions and all(
        a > b for a, b in zip((p._version, m._version, v._version), versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


_FORK_SCRIPT = """
import os, signal, sys, torch
torch.set_num_threads(2)
mode = sys.argv[1]
x = [torch.rand(1 << 20) for _ in range(4)]
torch.add(x[0], x[1])  # torch's own pool has run: its workers are not in a child
copies = [[t.clone() for t in x] for _ in range(2)]  # made here: torch's own parallel ops hang in the child
sc = [(0.1, 0.999, 0.001, 0.99, -0.01, 2.0, 0.3, 1e-8)]

def run(nat, k):
    p, g, m, v = copies[k]
    return nat.sums([g], [m], [v], [1]), nat.step([p], [g], [m], [v], sc), p, m, v

nat = None
if mode != "import-in-child":  # else the parent never imports the package: no fork hook registered
    from lightning_soaa.kernels.soaa_native import NativeSOAA, _openmp_runtime
    if mode == "loaded-before-fork":
        nat = NativeSOAA.load()
        if nat.on_pool != (_openmp_runtime() is not None):
            raise SystemExit(4)  # torch's GNU OpenMP pool is there and the kernels do not run on it
pid = os.fork()
if pid == 0:
    signal.alarm(60)  # a hang ends the child itself, not only the parent's wait
    torch.set_num_threads(2)
    from lightning_soaa.kernels.soaa_native import NativeSOAA
    child = nat or NativeSOAA.load()
    if child.on_pool:
        os._exit(5)  # the parent's pool would hang here
    torch.save(run(child, 0), sys.argv[2])
    os._exit(0)
_, status = os.waitpid(pid, 0)
code = os.waitstatus_to_exitcode(status)
if code == 0:
    from lightning_soaa.kernels.soaa_native import NativeSOAA
    want, got = run(nat or NativeSOAA.load(), 1), torch.load(sys.argv[2])
    same = want[:2] == got[:2] and all(torch.equal(a, b) for a, b in zip(want[2:], got[2:]))
    code = 0 if same else 3  # two threads of its own in the child, the pool here: the same bits
raise SystemExit(code)
"""


@pytest.mark.parametrize("when", ["loaded-before-fork", "load-in-child", "import-in-child"])
def test_a_forked_child_runs_the_kernels_on_threads_of_their_own(when: str, tmp_path) -> None:
    """In the parent the kernels run on torch's OpenMP pool (where torch uses GNU OpenMP); a forked
    child cannot use that pool (a parallel region there waits forever for the parent's workers), whether
    the library was loaded before the fork, first in the child, or the package first imported there: it
    starts threads of its own and takes the same bits."""
    _native_or_skip()
    proc = subprocess.run([sys.executable, "-c", _FORK_SCRIPT, when, str(tmp_path / "child.pt")], timeout=120,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])


_FORKS_SCRIPT = """
import os, subprocess, sys
late = sys.argv[1] == "import-after-fork"  # then only the auxiliary vectors can tell

def judge():
    from lightning_soaa.kernels import forks
    return forks.forked()

seen = [] if late else [judge()]
pid = os.fork()
if pid == 0:
    inner = os.fork()
    if inner == 0:
        os._exit(0 if judge() else 1)  # a fork of a fork
    _, st = os.waitpid(inner, 0)
    os._exit(0 if judge() and os.waitstatus_to_exitcode(st) == 0 else 1)
_, st = os.waitpid(pid, 0)
seen.append(os.waitstatus_to_exitcode(st) == 0)
exec_child = subprocess.run([sys.executable, "-c", "from lightning_soaa.kernels import forks; print(forks.forked())"],
                            capture_output=True, text=True, check=True).stdout.strip()
print(seen, exec_child, judge())
"""


@pytest.mark.parametrize("when", ["import-before-fork", "import-after-fork"])
def test_a_fork_is_told_from_an_exec(when: str) -> None:
    """The process, its forks (and theirs), and a process it starts by exec (torchrun, spawn): only the
    forks are forks, also when the package is first imported after the fork (no fork hook then)."""
    if not os.path.exists("/proc/self/auxv"):
        pytest.skip("no /proc here")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("LIGHTNING_SOAA_OPENMP_POOL", None)
    if os.getppid() == 1:
        pytest.skip("this process's parent is process 1: its children are judged forked")
    out = subprocess.run([sys.executable, "-c", _FORKS_SCRIPT, when], timeout=120, capture_output=True, text=True,
                         env=env, check=True).stdout
    want = "[True] False False" if when == "import-after-fork" else "[False, True] False False"
    assert out.split() == want.split(), out


def test_the_pool_switch_overrides_the_judgement(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_soaa.kernels import forks

    monkeypatch.setenv("LIGHTNING_SOAA_OPENMP_POOL", "0")
    assert forks.forked()
    monkeypatch.setenv("LIGHTNING_SOAA_OPENMP_POOL", "1")
    assert not forks.forked()


def test_a_pool_build_the_linker_refuses_is_remembered_with_its_reason(tmp_path, monkeypatch) -> None:
    """A runtime without OpenMP's symbols: the link is refused, the reason kept, no retry; a compiler
    that fails for another reason (killed, disk full) leaves nothing behind and is tried again."""
    from lightning_soaa.kernels import soaa_native

    _native_or_skip()
    monkeypatch.setenv("LIGHTNING_SOAA_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "libgomp_fake.so"
    subprocess.run([soaa_native._compiler(), "-shared", "-fPIC", "-x", "c", "-", "-o", str(fake)],
                   input=b"int not_openmp(void) { return 0; }", check=True, timeout=120)
    for _ in range(2):
        with pytest.raises(NativeUnavailable, match="undefined reference"):
            soaa_native._build(fake)
    (marker,) = (tmp_path / "cache").glob("*.failed")
    assert "undefined reference" in marker.read_text()
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".failed"]  # no temp files

    full = tmp_path / "cc-full"
    full.write_text("#!/bin/sh\necho 'No space left on device' >&2\nexit 1\n")
    full.chmod(0o755)
    monkeypatch.setenv("CC", str(full))
    monkeypatch.setenv("LIGHTNING_SOAA_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(NativeUnavailable, match="No space left"):
        soaa_native._build(fake)
    assert not list((tmp_path / "cache2").iterdir())  # nothing remembered: the next process tries again


def test_on_linux_torch_the_kernels_link_the_openmp_runtime_torch_loaded_and_no_other() -> None:
    from lightning_soaa.kernels.soaa_native import _openmp_runtime

    before = _openmp_runtime()
    native = _native_or_skip()
    if before is None:
        pytest.skip("torch does not run on GNU OpenMP here")
    from lightning_soaa.kernels.forks import forked

    if forked():  # e.g. pytest started in the background by a shell that exited: its parent is process 1
        pytest.skip("this process counts as a fork (kernels.forks): the kernels run on threads of their own")
    assert native.on_pool and _openmp_runtime() == before  # one runtime in the process, torch's


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_resumed_optimizer_takes_the_same_bits_as_the_uninterrupted_one(dtype: torch.dtype) -> None:
    """The kernels remember Σm², Σv between steps; a fresh optimizer loading a checkpoint reads them
    once from the moments, by the same accumulation: parameters and trust scalars bit-identical."""
    from lightning_soaa import SOAA

    _native_or_skip()
    gen = torch.Generator().manual_seed(11)
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in ((300, 40), (40,))] for _ in range(6)]

    def run(opt: SOAA, params: list[torch.nn.Parameter], steps: range) -> None:
        for k in steps:
            for p, g in zip(params, grads[k]):
                p.grad = g.clone()
            opt.step(loss=1.0 / (1 + k))

    def fresh() -> tuple[SOAA, list[torch.nn.Parameter]]:
        ps = [torch.nn.Parameter(torch.ones(s, dtype=dtype)) for s in ((300, 40), (40,))]
        return SOAA(ps, lr=0.01, total_steps=6), ps

    a, pa = fresh()
    run(a, pa, range(6))
    b, pb = fresh()
    run(b, pb, range(3))
    c, pc = fresh()
    with torch.no_grad():
        for x, y in zip(pc, pb):
            x.copy_(y)
    c.load_state_dict(b.state_dict())
    run(c, pc, range(3, 6))
    assert all(torch.equal(x, y) for x, y in zip(pa, pc))
    assert a.trust_state() == c.trust_state()


def _fresh_step(opt_state: dict, values: list[torch.Tensor], grads: list[torch.Tensor], loss: float
                ) -> tuple[list[torch.Tensor], dict]:
    """One step by an optimizer built for it (nothing cached: every view, pointer, counter and
    remembered sum is made from the state dict): the uncached reference."""
    from lightning_soaa import SOAA

    ps = [torch.nn.Parameter(v.clone()) for v in values]
    opt = SOAA([{"params": ps, "max_block_numel": 700}], lr=0.01, weight_decay=0.1, total_steps=20)
    opt.load_state_dict(opt_state)
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt.step(loss=loss)
    return [p.detach().clone() for p in ps], opt.trust_state()


def test_cached_step_takes_the_bits_of_an_uncached_one_after_every_kind_of_change() -> None:
    """The optimizer reuses block views, argument arrays, step counts and the moments' Σm², Σv between
    steps. After each change from outside (new gradient tensors, an in-place gradient edit, ``p.data``
    replaced, moments and counters edited in place or replaced, ``load_state_dict``) its step must take
    the same bits as a fresh optimizer loading the same state; and unchanged blocks must really come
    from the cache (no re-read of their moments)."""
    from lightning_soaa import SOAA

    _native_or_skip()
    gen = torch.Generator().manual_seed(5)
    shapes = ((60, 50), (30, 20), (7,))  # 3000 / 600 / 7 elements: 5 + 1 + 1 blocks of <= 700
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = SOAA([{"params": ps, "max_block_numel": 700}], lr=0.01, weight_decay=0.1, total_steps=20)
    assert len(opt._owned) == 7
    mode0_blocks: list[int] = []

    def spy_on_native() -> None:
        native = opt._kernels()._native
        assert native is not None
        if getattr(native, "_spied", False):
            return
        inner = native.sums_at  # what every sums pass calls (NativeSOAA.sums and the step plan)

        def sums_at(dtype, g, m, v, n, modes, *out):  # type: ignore[no-untyped-def]  # (out: the plan's buffer)
            mode0_blocks.append(sum(1 for x in modes if x == native.SUMS_MOMENTS))
            return inner(dtype, g, m, v, n, modes, *out)
        native.sums_at = sums_at  # type: ignore[method-assign]
        native._spied = True

    def step(k: int, grads: list[torch.Tensor] | None = None, new_grads: bool = True) -> None:
        if grads is None:
            grads = [torch.randn(p.shape, generator=gen) for p in ps]
        if new_grads:
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        grads = [p.grad.clone() for p in ps]  # what the step sees
        want, want_trust = _fresh_step(opt.state_dict(), [p.detach() for p in ps], grads, 1.0 / (1 + k))
        mode0_blocks.clear()
        opt.step(loss=1.0 / (1 + k))
        spy_on_native()
        assert all(torch.equal(p, w) for p, w in zip(ps, want)), f"step {k}: parameters differ"
        assert opt.trust_state() == want_trust, f"step {k}: trust state differs"

    step(0)
    step(1)
    step(2)
    assert mode0_blocks == [0]  # steady state: every block's Σm², Σv came from the last step
    with torch.no_grad():
        ps[1].grad.mul_(2.0)  # the same gradient tensor, edited in place
    step(3, new_grads=False)
    ps[0].data = ps[0].data.clone()  # new storage, same values: views must follow it
    step(4)
    ps[0].data = ps[0].data * 0.5
    step(5)
    blocks = [opt.block_state(b) for b in opt._owned]
    blocks[1]["exp_avg"].mul_(0.5)  # moments edited in place
    blocks[6]["exp_avg_sq"].add_(1e-3)
    step(6)
    assert mode0_blocks == [2, 0] or mode0_blocks == [2]  # only the two edited blocks were read again
    blocks[2]["step"].sub_(2.0)  # a counter edited in place (down: a block never counts more steps than its optimizer)
    blocks[3]["exp_avg"] = blocks[3]["exp_avg"].clone() * 1.5  # a moment replaced
    step(7)
    saved, values = opt.state_dict(), [p.detach().clone() for p in ps]
    step(8)
    step(9)
    opt.load_state_dict(saved)  # back to step 8's state: counters, moments and sums all change
    with torch.no_grad():
        for p, v in zip(ps, values):
            p.copy_(v)
    step(10)
    step(11)
    assert mode0_blocks == [0]
