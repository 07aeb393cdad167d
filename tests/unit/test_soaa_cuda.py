"""SOAA's compiled passes inside the optimizer on a CUDA device, against the float64 CPU run, and the
hand-written Triton kernels (``kernels/soaa_triton.py``) compiled for the GPU.

Skipped without CUDA (CI has none). By default (and with ``compile=True``) the whole optimizer takes its
blocks through the Triton kernels (their calls counted, so the test fails if they silently fall back to
eager) and must follow the float64 CPU optimizer fed the same gradients and losses. The kernel-level checks are the ones
``test_soaa_triton.py`` runs on the CPU through Triton's interpreter, here on the GPU.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from lightning_soaa import SOAA

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton kernels)")

SHAPES = [(512, 256), (256,), (300, 300)]  # two above the compiled kernels' 2**16-element floor, one below
STEPS = 6
KW: dict[str, Any] = dict(lr=1e-2, gamma=0.3, weight_decay=0.01, total_steps=20)


def _params(device: str, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype)) for s in SHAPES]


def _feed(t: int) -> tuple[list[torch.Tensor], float]:
    """Step ``t``'s gradients (float64, CPU) and a loss that falls, then rises once (a rejected step)."""
    g = torch.Generator().manual_seed(100 + t)
    grads = [torch.randn(s, generator=g, dtype=torch.float64) * (0.5 + 0.1 * t) for s in SHAPES]
    return grads, 10.0 - t + (3.0 if t == 4 else 0.0)


def _counted(kernels: Any, name: str, calls: dict[str, int], key: str | None = None) -> None:
    inner = getattr(kernels, name)

    def wrapper(*a: Any, **k: Any) -> Any:
        calls[key or name] = calls.get(key or name, 0) + 1
        return inner(*a, **k)

    setattr(kernels, name, wrapper)


def _count_triton(kernels: Any, calls: dict[str, int]) -> None:
    """Count the calls of the Triton passes the kernels object loads (``triton_sums``, ``triton_step``)."""
    load = kernels._accel_loader

    def counted_load() -> Any:
        fused = load()
        for name in ("sums", "step"):
            _counted(fused, name, calls, f"triton_{name}")
        return fused

    kernels._accel_loader = counted_load


def _run(device: str, dtype: torch.dtype, calls: dict[str, int] | None = None, compile: bool | None = None):
    ps = _params(device, dtype)
    opt = SOAA(ps, compile=compile, **KW)
    kernels = opt._kernels()
    if calls is not None and kernels is not None:  # compile=False: no kernels, nothing to count
        for name in ("sums", "step", "update_sums", "update_count"):
            _counted(kernels, name, calls)
        _count_triton(kernels, calls)
    for t in range(STEPS):
        grads, loss = _feed(t)
        for p, g in zip(ps, grads):
            p.grad = g.to(device, dtype)
        opt.step(loss=torch.tensor(loss, device=device))
    return ps, opt


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


@needs_triton
@pytest.mark.parametrize("compile", [None, True])  # the default takes them too
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
def test_optimizer_on_cuda_takes_the_triton_passes_and_follows_the_float64_cpu_run(
        dtype: torch.dtype, rtol: float, compile: bool | None, caplog: pytest.LogCaptureFixture) -> None:
    calls: dict[str, int] = {}
    with caplog.at_level("WARNING"):
        gpu, gpu_opt = _run("cuda", dtype, calls, compile=compile)
    assert not [r.message for r in caplog.records if "SOAA" in r.message]  # no fallback, no slow-path warning
    cpu, cpu_opt = _run("cpu", torch.float64, compile=False)
    kernels = gpu_opt._kernels()
    assert kernels is not None and kernels.accel_failure is None, kernels and kernels.accel_failure
    # every block (both above and below the torch.compile floor) in one call per pass; nothing compiled
    assert calls.get("triton_step", 0) >= STEPS and calls.get("triton_sums", 0) >= STEPS, calls
    assert not {"sums", "step", "update_sums", "update_count"} & set(calls), calls
    _assert_follows(cpu, cpu_opt, gpu, gpu_opt, dtype, rtol)


@needs_triton
@pytest.mark.parametrize("check", ["step_matches_float64_and_eager", "step_equals_the_c_kernels",
                                   "nonfinite_gradient_makes_the_sums_nonfinite_and_bf16_keeps_nan",
                                   "step_bumps_autograd_versions", "self_check_refuses_kernels_that_disagree",
                                   "optimizer_follows_the_c_kernels_and_resumes_to_the_bit",
                                   "programs_of_several_chunks_equal_the_reference"])
def test_triton_kernels_compiled_for_the_gpu(check: str) -> None:
    from tests.unit import _soaa_triton_checks

    getattr(_soaa_triton_checks, check)("cuda")


def test_compile_false_on_cuda_is_the_foreach_path_and_follows_the_float64_cpu_run() -> None:
    """``compile=False`` takes no compiled or Triton pass on an accelerator."""
    calls: dict[str, int] = {}
    gpu, gpu_opt = _run("cuda", torch.float32, calls, compile=False)
    cpu, cpu_opt = _run("cpu", torch.float64, compile=False)
    assert not calls, calls
    _assert_follows(cpu, cpu_opt, gpu, gpu_opt, torch.float32, 2e-4)


def _assert_follows(cpu: list[torch.Tensor], cpu_opt: SOAA, gpu: list[torch.Tensor], gpu_opt: SOAA,
                    dtype: torch.dtype, rtol: float) -> None:
    for a, b in zip(cpu, gpu):
        assert b.dtype == dtype and b.device.type == "cuda"
        scale = a.detach().abs().max().item()
        torch.testing.assert_close(b.detach().double().cpu(), a.detach(), rtol=rtol, atol=rtol * scale)
    s_gpu, s_cpu = gpu_opt.statistics(), cpu_opt.statistics()
    assert s_gpu["skipped_steps"] == s_cpu["skipped_steps"]
    for k in ("d", "rho", "fisher_scale"):
        assert s_gpu[k] == pytest.approx(s_cpu[k], rel=10 * rtol, abs=1e-6), k
