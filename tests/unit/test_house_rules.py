"""House rules that are cheap to check mechanically (see the README's layout section):

* no function in the library (``lightning_soaa/``, ``deepspeed_ext/``) is longer than
  :data:`MAX_LINES` lines of body, not counting its docstring;
* the arrows between the packages run one way: ``distributed/`` and ``functional/`` never import
  ``optim/``, ``lightning/`` or ``deepspeed_ext``; ``functional/`` never imports ``torch.distributed``
  (nor ``lightning_soaa.distributed``, which does). Checked on the source (every import statement,
  including those inside functions and ``TYPE_CHECKING`` blocks) and at run time (importing every module
  of both packages in a fresh interpreter loads none of the forbidden ones).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = [ROOT / "lightning_soaa", ROOT / "deepspeed_ext"]
MAX_LINES = 80

#: Functions over MAX_LINES that may stay for now, as "path:qualified name" -> their body length when
#: listed (for a function in a file another change is editing, listed rather than split). Empty: no
#: library function is over the limit today. Shrink this table, never grow it; a listed function that
#: drops under the limit, disappears or grows fails the test, so the table stays exact.
ALLOWED_LONG: dict[str, int] = {}

FORBIDDEN = {
    "lightning_soaa/distributed": ("lightning_soaa.optim", "lightning_soaa.lightning", "deepspeed_ext"),
    "lightning_soaa/functional": ("lightning_soaa.optim", "lightning_soaa.lightning", "deepspeed_ext",
                                  "lightning_soaa.distributed", "torch.distributed",
                                  # pure math: no compilers, shared libraries, processes or environment
                                  "lightning_soaa.kernels", "ctypes", "subprocess", "os"),
}


def _library_files() -> list[Path]:
    return sorted(p for root in LIBRARY for p in root.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the function's last line."""
    body = fn.body
    if (len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        body = body[1:]
    end = fn.end_lineno
    assert end is not None
    return end - body[0].lineno + 1


def _function_lengths(path: Path) -> dict[str, int]:
    """Qualified name (``Class.method``, ``outer.inner``) -> body lines, for every function in ``path``."""
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                out[name] = _body_lines(child)
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(), filename=str(path)), "")
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in ``path``; ``from a import b`` yields a and a.b."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def test_no_library_function_is_longer_than_the_limit() -> None:
    too_long: list[str] = []
    seen: dict[str, int] = {}
    for path in _library_files():
        for name, n in _function_lengths(path).items():
            key = f"{_rel(path)}:{name}"
            if key in ALLOWED_LONG:
                seen[key] = n
            elif n > MAX_LINES:
                too_long.append(f"{key} has {n} lines (limit {MAX_LINES})")
    assert not too_long, "split these functions:\n" + "\n".join(too_long)
    stale = [f"{k}: listed at {v}, now {seen.get(k, 'gone')}" for k, v in ALLOWED_LONG.items()
             if k not in seen or seen[k] <= MAX_LINES or seen[k] > v]
    assert not stale, ("ALLOWED_LONG is out of date (remove entries that are now short enough or gone; "
                       "a listed function must not grow):\n" + "\n".join(stale))


def test_the_length_rule_counts_body_lines_without_the_docstring(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(81))
    src = f'def f():\n    """Doc\n\n    string."""\n{body}\n\ndef g():\n    """Doc."""\n    return 1\n'
    (tmp_path / "m.py").write_text(src)
    assert _function_lengths(tmp_path / "m.py") == {"f": 81, "g": 1}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_arrows_run_one_way_in_the_source(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    bad = [f"{_rel(p)}:{line} imports {mod}" for p in files for line, mod in _imports(p)
           if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN[package])]
    assert not bad, "\n".join(bad)


def test_import_arrows_run_one_way_at_run_time() -> None:
    """A fresh interpreter imports every module of distributed/ and functional/ and reports what got loaded."""
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for pkg in FORBIDDEN for p in (ROOT / pkg).rglob("*.py"))
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "print('\\n'.join(sorted(sys.modules)))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    loaded = set(res.stdout.split())
    assert set(modules) <= loaded
    # torch itself loads torch.distributed, so at run time only our own packages can be checked.
    bad = sorted(m for m in loaded
                 if m.startswith(("lightning_soaa.optim", "lightning_soaa.lightning", "deepspeed_ext")))
    assert not bad, f"importing distributed/ and functional/ loaded {bad}"
