"""The Triton SOAA kernels (``kernels/soaa_triton.py``) without a GPU: compiled for NVIDIA targets
(Triton ships its own ``ptxas``), and run on the CPU through Triton's interpreter.

The compile check catches what the interpreter accepts but the compiler does not (it rejected the first
version's ``typing.Any`` annotations: a compiled kernel may read no non-constexpr global).

Each check (``_soaa_triton_checks.py``) runs in a Python of its own with ``TRITON_INTERPRET=1`` (a child
forked from one that did the imports): Triton reads it when a kernel is defined, so it cannot be switched
on inside a process that may also run them on a GPU. Skipped where Triton is not installed (the CPU-only
torch wheel does not pull it in); on CUDA the same checks run compiled, in ``test_soaa_cuda.py``. The
routing of accelerator blocks to these kernels (``SOAAKernels(accel_loader=...)``) is tested in
``test_soaa_functional.py`` without Triton.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

ROOT = Path(__file__).resolve().parents[2]
CHECKS = (
    "step_matches_float64_and_eager",
    "step_equals_the_c_kernels",
    "nonfinite_gradient_makes_the_sums_nonfinite_and_bf16_keeps_nan",
    "step_bumps_autograd_versions",
    "self_check_refuses_kernels_that_disagree",
    "optimizer_follows_the_c_kernels_and_resumes_to_the_bit",
    "programs_of_several_chunks_equal_the_reference",
)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
def test_kernels_compile_for_nvidia_gpus(arch: int, dtype: str) -> None:
    """Both passes and the reduction compile to PTX and through ptxas for A100 (sm_80) and H100 (sm_90),
    with the options the launches use, and the PTX has no fused multiply-add (the kernels' results are
    defined as unfused IEEE arithmetic)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lightning_soaa.kernels import soaa_triton as k

    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": k.NUM_WARPS, "enable_fp_fusion": False}
    head = {"prog_blk": "*i32", "prog_lo": "*i64", "part": "*fp64", "nprog": "i32", "DTYPE": "constexpr",
            "COMPUTE": "constexpr", "BLOCK": "constexpr", "ITERS": "constexpr"}
    passes = ((k.sums_kernel, {"tab": "*i64", "modes": "*i32"}), (k.step_kernel, {"tab": "*i64", "scal": "*fp64"}))
    for iters in sorted({1, k.ITERS, 4}):  # programs of one chunk and looping ones
        consts = {"DTYPE": getattr(tl, dtype), "COMPUTE": tl.float64 if dtype == "float64" else tl.float32,
                  "BLOCK": k.BLOCK, "ITERS": iters}
        for fn, first in passes:
            src = ASTSource(fn=fn, signature={**first, **head}, constexprs=consts)
            ptx = triton.compile(src, target=target, options=options).asm["ptx"]
            assert "ld.global" in ptx and "fma." not in ptx
    reduce_sig = {"part": "*fp64", "first": "*i64", "out": "*fp64", "nprog": "i32", "K": "constexpr",
                  "BLOCK": "constexpr"}
    for outputs in (k.SUMS_OUT, k.STEP_OUT):
        src = ASTSource(fn=k.reduce_kernel, signature=reduce_sig, constexprs={"K": outputs, "BLOCK": k.REDUCE_BLOCK})
        triton.compile(src, target=target, options={"enable_fp_fusion": False})


#: Runs every check in a child forked from one Python that imported torch, Triton and the checks with
#: ``TRITON_INTERPRET=1``: each check starts from that state alone, as in a fresh Python, without paying the
#: imports again (~3 s of CPU a check). A check's exit status and output go to ``<out>/<check>.rc``/``.log``.
_FORKED_CHECKS = """
import os, sys, traceback
from tests.unit import _soaa_triton_checks as c
out = sys.argv[1]
for check in sys.argv[2:]:
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        fd = os.open(os.path.join(out, check + ".log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1); os.dup2(fd, 2)
        try:
            getattr(c, check)("cpu")
            code = 0
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    with open(os.path.join(out, check + ".rc"), "w") as f:
        f.write(str(os.waitstatus_to_exitcode(status)))
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int | None, str]]:
    """Every check's exit status (None: it never finished) and output, from one run of them all."""
    out = tmp_path_factory.mktemp("triton_checks")
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", _FORKED_CHECKS, str(out), *CHECKS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    results = {}
    for check in CHECKS:
        rc, log = out / f"{check}.rc", out / f"{check}.log"
        text = (log.read_text() if log.exists() else "")[-6000:]
        text += done.stdout[-1000:] + done.stderr[-3000:]
        results[check] = (int(rc.read_text()) if rc.exists() else None, text)
    return results


@pytest.mark.timeout(660)  # the first test runs every check (the fixture), each check its own ~5-60 s
@pytest.mark.parametrize("check", CHECKS)
def test_interpreted_on_cpu(check: str, interpreted: dict[str, tuple[int | None, str]]) -> None:
    rc, output = interpreted[check]
    assert rc == 0, output
