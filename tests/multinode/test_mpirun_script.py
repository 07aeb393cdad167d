"""``multinode_examples/mpirun.sh`` picks the interpreter that has our package (the active venv, else the
one ``dev.sh`` made) and the ``mpirun`` beside it, not whatever ``python``/``mpirun`` PATH has first.

The real launches are in test_launchers.py; here stand-in ``python`` and ``mpirun`` executables print
how they were called, so only the script's choice is under test."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "multinode_examples" / "mpirun.sh"


def _fake_venv(root: Path) -> Path:
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "mpirun"):
        exe = bin_dir / name
        exe.write_text(f'#!/bin/sh\necho "{name}:$0 $*"\n')
        exe.chmod(0o755)
    return root


def _run(env_extra: dict[str, str], tmp_path: Path) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHON", "MPIRUN", "VIRTUAL_ENV", "LSOAA_VENV", "HOSTFILE", "NP", "OVERSUBSCRIBE")}
    env.update(env_extra)
    proc = subprocess.run(["bash", str(SCRIPT), "--optimizer", "soaa"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("var", ["VIRTUAL_ENV", "LSOAA_VENV"])
def test_uses_the_venv_python_and_its_mpirun(var: str, tmp_path: Path) -> None:
    venv = _fake_venv(tmp_path / "venv")
    out = _run({var: str(venv)}, tmp_path)
    # the venv's mpirun ran, and was asked to start the venv's python on train.py
    assert out.startswith(f"mpirun:{venv}/bin/mpirun -np 2"), out
    assert f" {venv}/bin/python {SCRIPT.parent}/train.py --optimizer soaa" in out, out


def test_explicit_python_and_mpirun_win(tmp_path: Path) -> None:
    venv = _fake_venv(tmp_path / "venv")
    other = _fake_venv(tmp_path / "other")
    out = _run({"VIRTUAL_ENV": str(venv), "PYTHON": str(other / "bin" / "python"),
                "MPIRUN": str(other / "bin" / "mpirun")}, tmp_path)
    assert out.startswith(f"mpirun:{other}/bin/mpirun") and f" {other}/bin/python " in out, out
