"""The README's Python snippets run as written.

Every fenced ``python`` block of README.md, those indented inside a list item too (dedented), is written to a
file and run by this interpreter in a fresh process (a block that starts Lightning DDP re-launches its own
script, which must not be pytest), from a scratch directory that sees the repository's ``configs/``. Blocks
share nothing: each must be complete. Other fences (``bash``, plain) are not run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A fence may be indented (a block inside a list item); its closing fence has the same indentation.
_BLOCK = re.compile(r"^([ \t]*)```python\n(.*?)^\1```", re.S | re.M)
_HEADING = re.compile(r"^#+ +(.*)$", re.M)
_FENCED = re.compile(r"^([ \t]*)```.*?^\1```", re.S | re.M)  # any fenced block: its `# comments` are no headings

pytestmark = pytest.mark.timeout(420)


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """``(id, code)`` per python block; the id is the nearest heading above it, numbered if repeated."""
    out: list[tuple[str, str]] = []
    for m in _BLOCK.finditer(text):
        headings = _HEADING.findall(_FENCED.sub("", text[:m.start()]))
        base = re.sub(r"\W+", "-", headings[-1]).strip("-").lower() if headings else "top"
        seen = sum(1 for i, _ in out if i == base or re.fullmatch(re.escape(base) + r"-\d+", i))
        out.append((f"{base}-{seen + 1}" if seen else base, textwrap.dedent(m.group(2))))
    return out


BLOCKS = readme_blocks((REPO / "README.md").read_text())


def test_readme_has_the_snippets() -> None:
    assert len(BLOCKS) >= 3, [i for i, _ in BLOCKS]


def test_indented_blocks_are_found_and_dedented() -> None:
    text = "# A\n\n* item:\n\n  ```python\n  x = 1\n\n  if x:\n      y = 2\n  ```\n\n```python\nz = 3\n```\n"
    assert readme_blocks(text) == [("a", "x = 1\n\nif x:\n    y = 2\n"), ("a-2", "z = 3\n")]
    assert [i for i, _ in readme_blocks(text.replace("z = 3", "# not a heading"))] == ["a", "a-2"]
    assert [i for i, _ in readme_blocks(text + "\n```python\nw = 4\n```\n")] == ["a", "a-2", "a-3"]  # not a-2 twice


def _needs(code: str) -> list[str]:
    """Top-level packages the block imports that are optional extras here."""
    mods = set(re.findall(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", code, re.M))
    return sorted(m for m in mods & {"lightning", "deepspeed_ext", "deepspeed", "mpi4py"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[i for i, _ in BLOCKS])
def test_readme_snippet_runs(code: str, tmp_path: Path) -> None:
    for mod in _needs(code):
        dist = "deepspeed" if mod == "deepspeed_ext" else mod
        if importlib.util.find_spec(dist) is None:
            pytest.skip(f"{dist} not installed")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if "deepspeed_ext" in _needs(code) or "deepspeed" in _needs(code):
        # one process as DeepSpeed's launcher would start it: without these DeepSpeed picks its fixed port 29500,
        # which another job on a shared CI host may hold (the snippet then failed to rendezvous)
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, f"README snippet failed:\n{code}\n---\n{proc.stdout[-3000:]}{proc.stderr[-5000:]}"
