"""The ATen operator counters the benchmarks report with (benchmarks/_timing.py's ``CountOps``, ``CountReads``),
for tests that hold a step to an operator budget. benchmarks/ is not a package, so the module is loaded by its path."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def _load_timing() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "_timing.py"
    spec = importlib.util.spec_from_file_location("_bench_timing", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_TIMING = _load_timing()
CountOps = _TIMING.CountOps
CountReads = _TIMING.CountReads  # CountOps and, of its calls, the host reads (``reads``)
