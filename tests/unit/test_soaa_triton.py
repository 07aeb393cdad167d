"""The Triton SOAA kernels (``kernels/soaa_triton.py``) on the CPU, through Triton's interpreter.

Each check (``_soaa_triton_checks.py``) runs in a fresh Python with ``TRITON_INTERPRET=1``: Triton reads
it when a kernel is defined, so it cannot be switched on inside a process that may also run them on a
GPU. Skipped where Triton is not installed (the CPU-only torch wheel does not pull it in); on CUDA the
same checks run compiled, in ``test_soaa_cuda.py``. The routing of accelerator blocks to these kernels
(``SOAAKernels(accel_loader=...)``) is tested in ``test_soaa_functional.py`` without Triton.
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
)


@pytest.mark.parametrize("check", CHECKS)
def test_interpreted_on_cpu(check: str) -> None:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    code = f"from tests.unit import _soaa_triton_checks as c; c.{check}('cpu')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
