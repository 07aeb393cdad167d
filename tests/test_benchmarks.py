"""Every benchmark script starts: it imports and its ``--help`` parses (a benchmark whose import broke,
e.g. on a helper another benchmark dropped, otherwise stays broken until someone needs its numbers).

One subprocess runs them all (one torch import), each as ``python benchmarks/<name>.py --help`` would,
from a working directory outside the repository, so that only what the script arranges itself (its own
``sys.path`` entries, the installed package) is importable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

#: scripts whose command line is not argparse (``--help`` would be read as an argument): imported only
IMPORT_ONLY = {"egn_bit_identity.py"}

_DRIVER = r"""
import json, runpy, sys, traceback
from pathlib import Path
results = {}
for path in sorted(Path(sys.argv[1]).glob("*.py")):
    if path.name.startswith("_"):
        continue
    # a module of the others (no __main__ block) and the scripts without argparse are imported only
    as_main = "__main__" in path.read_text() and path.name not in set(sys.argv[2].split(","))
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [str(path), "--help"]
    sys.path.insert(0, str(path.parent))  # as `python benchmarks/x.py` does
    try:
        runpy.run_path(str(path), run_name="__main__" if as_main else "bench_import_check")
        results[path.name] = "ok" if not as_main else "no exit: --help did not stop the script"
    except SystemExit as e:
        results[path.name] = "ok" if e.code in (0, None) else f"exit {e.code!r}"
    except BaseException:
        results[path.name] = traceback.format_exc(limit=3)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
print("RESULTS " + json.dumps(results))
"""


def test_every_benchmark_imports_and_parses_help(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(BENCHMARKS), ",".join(sorted(IMPORT_ONLY))],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, f"the driver did not finish (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    results = json.loads(line[len("RESULTS "):])
    scripts = {p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")}
    assert set(results) == scripts
    broken = {k: v for k, v in results.items() if v != "ok"}
    assert not broken, "benchmarks that do not start:\n" + "\n".join(f"{k}: {v}" for k, v in broken.items())
