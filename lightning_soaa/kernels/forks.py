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
hang, so an unreadable own vector counts as forked, and so does a process whose parent is process 1: a
fork whose parent exited is reparented there and its vector can no longer be compared. What this misses:
a fork reparented to a subreaper other than process 1 after its parent exited, in a process tree that
never imported the package before forking (torch's own parallel ops hang in such a child too);
``LIGHTNING_SOAA_OPENMP_POOL=0`` is the switch for it. Also judged forked, at a cost in speed only: the
children of a ``forkserver`` (whose server seldom ran the pool) and, with address-space randomisation off,
a process exec'd by a parent of the same program and environment size.
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
    """True when this process may be a fork, without exec, of a process whose OpenMP pool ran.

    ``LIGHTNING_SOAA_OPENMP_POOL=0`` says "forked" always (never use the pool), ``=1`` never (the caller
    vouches that no ancestor's pool is in this process: e.g. a service started by systemd, whose
    parent is process 1)."""
    override = os.environ.get("LIGHTNING_SOAA_OPENMP_POOL")
    if override in ("0", "1"):
        return override == "0"
    if _forked_here:
        return True
    ppid = os.getppid()
    if ppid == 1:  # an orphan (its parent exited: a double-fork daemon) cannot be told from a child of init
        return True
    own = _auxv("self")
    if not own:  # cannot tell: the safe answer
        return True
    return own == _auxv(ppid)
