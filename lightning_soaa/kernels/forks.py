"""Whether this process is a fork (without exec) of another: there the parent's OpenMP pool is dead.

GNU libgomp's worker threads are not copied by ``fork()``; a parallel region in the child waits for them
forever. Kernels that run on torch's pool (:mod:`lightning_soaa.kernels.soaa_native`) ask
:func:`forked` first and start threads of their own when it says so.

Two signals, either one enough:
- a fork after this module was imported (``os.register_at_fork``; ``import lightning_soaa`` imports
  this module, so the usual "import at the top, fork later" is covered however late the kernels load);
- the process's auxiliary vector equals its parent's: ``exec`` builds a new one (new stack addresses,
  new ``AT_RANDOM``), ``fork`` copies it, so equality means a fork of the parent, or of a fork of its
  parent, all without exec. This covers a child whose parent never imported the package. A parent whose
  vector cannot be read (another user, e.g. a root launcher such as ``slurmstepd``) is not the process
  this one was forked from (a fork keeps the parent's user).

A wrong "forked" only costs speed (threads of our own, as before the pool); a wrong "not forked" would
hang, so an unreadable own vector counts as forked.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["forked"]

_forked_here = False


def _after_fork_in_child() -> None:
    global _forked_here
    _forked_here = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _auxv(pid: int | str) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/auxv").read_bytes()
    except PermissionError:
        return None
    except OSError:  # no such process (the parent exited), or no /proc
        return b""


def forked() -> bool:
    """True when this process may be a fork, without exec, of a process whose OpenMP pool ran."""
    if _forked_here:
        return True
    own = _auxv("self")
    if not own:  # cannot tell: the safe answer
        return True
    return own == _auxv(os.getppid())
