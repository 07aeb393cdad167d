"""The rendezvous address of an ``mpirun`` launch, the same on every rank (used by
:func:`~lightning_soaa.distributed.launch.init_from_env`).

The ranks that have ``MASTER_ADDR``/``MASTER_PORT`` first meet in a store rank 0 hosts there, telling it whether
they have ``mpi4py``; when every rank arrives the group forms on that store and MPI is never started. Otherwise
the ranks agree through ``mpi4py`` (imported only then, never at module import time): rank 0 broadcasts its
``MASTER_ADDR``/``MASTER_PORT``, or its host name and a free port, so ranks that the variables did not reach
(raw ``mpirun`` without ``-x`` forwards them only to the ranks on its own node) join rank 0 rather than hang;
where neither can work, every rank in the store fails naming the ranks without mpi4py and those without the
variables (:func:`_mpi_join`).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import logging
import math
import socket
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from lightning_soaa.distributed.store_probe import (
    _STORE_POLL_S,
    CLOSED_WITHOUT_ANSWER,
    _listening,
    _store_client,
)

if TYPE_CHECKING:
    from lightning_soaa.distributed.launch import LaunchInfo

__all__: list[str] = []

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


_EXPORT_HINT = "export MASTER_ADDR and MASTER_PORT to every rank (mpirun -x MASTER_ADDR -x MASTER_PORT)"


#: how long rank 0's store round waits for every rank before it settles for the MPI agreement, when every rank
#: that arrived has mpi4py: the ranks still missing may have no MASTER_ADDR/MASTER_PORT (raw mpirun without -x
#: forwards them only to the ranks on its own node) and wait in MPI_Init. What a partial export costs at start.
#: ``LIGHTNING_SOAA_STORE_ROUND_S`` overrides it (a slow start of many ranks: longer).
_STORE_ROUND_S = 10.0
#: how long a rank with mpi4py tries to reach rank 0's store before it goes to the MPI agreement instead (rank 0
#: may have no variables, or other values: the agreement then tells every rank). ``LIGHTNING_SOAA_STORE_CONNECT_S``
#: overrides it.
_STORE_CONNECT_S = 30.0
#: the environment variables that override the two windows above
ROUND_ENV, CONNECT_ENV = "LIGHTNING_SOAA_STORE_ROUND_S", "LIGHTNING_SOAA_STORE_CONNECT_S"
#: the longest window they may set (about 11.6 days): torch counts a store's timeout in nanoseconds from now, and
#: past about 9.2e9 s that overflows (rank 0 then failed to host its store, "timed out after 10000000030000ms")
_MAX_WINDOW_S = 1e6
#: how long a rank waits for the answer of what listens at rank 0's MASTER_PORT (a store answers at once)
_STORE_HANDSHAKE_S = 10.0


@dataclasses.dataclass(frozen=True)
class _Windows:
    """The store round's windows in seconds: ``round_s`` (:data:`_STORE_ROUND_S`), ``connect_s``
    (:data:`_STORE_CONNECT_S`)."""

    round_s: float
    connect_s: float


def _windows(env: Mapping[str, str]) -> _Windows:
    """The windows of the store round: the module's defaults, or :data:`ROUND_ENV`/:data:`CONNECT_ENV` from
    ``env``. Raises ``ValueError`` naming the variable, its value and what is allowed."""
    def one(name: str, default: float) -> float:
        raw = env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not 0 < value <= _MAX_WINDOW_S:  # nan fails too
            raise ValueError(f"Invalid {name}={env[name]!r}. Must be a number of seconds > 0 (default {default:g}, "
                             f"at most {_MAX_WINDOW_S:g}).")
        return value

    return _Windows(one(ROUND_ENV, _STORE_ROUND_S), one(CONNECT_ENV, _STORE_CONNECT_S))


def _mpi4py_importable() -> bool:
    """Whether this rank can join the MPI agreement, found out without starting MPI: ``from mpi4py import MPI``
    runs ``MPI_Init``, which waits until every rank of the job has run it too."""
    if sys.modules.get("mpi4py.MPI") is not None:
        return True
    try:
        import mpi4py  # noqa: F401  (the package alone starts nothing)

        return importlib.util.find_spec("mpi4py.MPI") is not None
    except (ImportError, ValueError):
        return False


def _mpi_join(info: LaunchInfo, timeout_s: float, env: Mapping[str, str]) -> tuple[LaunchInfo, dist.Store | None]:
    """The rendezvous address of an MPI launch, the same on every rank, and the store a rank already holds there.

    A rank with ``MASTER_ADDR``/``MASTER_PORT`` first meets the others in a store at that address
    (:func:`_store_round`), before anything starts MPI: whether a rank can start MPI (mpi4py importable) is
    only known to that rank, and ``MPI_Init`` waits for every rank, so ranks with mpi4py that went there
    first waited for the ranks without it until the job timed out, with a message naming neither cause.
    When every rank arrives the group forms on that store and MPI is never started; otherwise every rank
    that can goes to the MPI agreement (:func:`_mpi_rendezvous`), or all of them fail naming the ranks
    without mpi4py and those that did not arrive. A rank without the variables has only MPI.
    """
    has_mpi4py = _mpi4py_importable()
    store = None
    if info.master_addr is not None and info.master_port is not None:
        store, formed = _store_round(info, has_mpi4py, timeout_s, env)
        if formed:
            return info, store
    elif not has_mpi4py:
        raise RuntimeError(
            f"Launched by mpirun without MASTER_ADDR/MASTER_PORT on rank {info.rank}, and mpi4py is missing there: "
            "install mpi4py (pip install 'lightning-soaa[mpi]') on every rank so that rank 0 can broadcast a "
            f"rendezvous port, or {_EXPORT_HINT}.")
    return _mpi_rendezvous(info), store


def _round_prefix(info: LaunchInfo, env: Mapping[str, str]) -> str:
    # the launch's namespace where the launcher names one (PMIx): a store of another job at this address has
    # other keys, so its decision is never taken for ours
    return f"lightning_soaa/mpi_round/{env.get('PMIX_NAMESPACE', '')}/{info.world_size}/"


def _store_round(info: LaunchInfo, has_mpi4py: bool, timeout_s: float,
                 env: Mapping[str, str]) -> tuple[dist.Store | None, bool]:
    """Meet the other ranks that have ``MASTER_ADDR``/``MASTER_PORT`` in a store rank 0 hosts there; return
    the store (``None``: rank 0 could not be reached and this rank goes to MPI) and whether the group forms
    on it (every rank arrived).

    Each rank counts itself in, saying whether it has mpi4py; rank 0 alone decides and writes the decision,
    and every rank, also one that arrives after it, acts on that one decision: ``store`` once every rank has
    arrived; ``mpi`` after :data:`_STORE_ROUND_S` (or :data:`ROUND_ENV`) when every rank that arrived has mpi4py
    (the others may wait
    in ``MPI_Init``); otherwise, after ``timeout_s``, ``fail`` with the ranks without mpi4py and those that did
    not arrive, raised on every rank that arrived. A rank without mpi4py never goes to MPI, so no decision
    leaves a rank waiting in ``MPI_Init`` for one that cannot get there, except one that arrives after ``mpi``
    was decided: it raises, naming itself, and mpirun ends the job.
    """
    assert info.master_addr is not None and info.master_port is not None
    windows = _windows(env)  # a bad value fails here, before this rank meets anyone
    where = f"{info.master_addr}:{info.master_port}"
    prefix = _round_prefix(info, env)
    store = _arrive(info, has_mpi4py, timeout_s, where, prefix, windows)
    if store is None:
        return None, False
    if info.rank == 0:
        decision = _decide(store, prefix, info.world_size, timeout_s, where, windows.round_s)
        store.set(prefix + "decision", decision)
    else:
        try:
            store.wait([prefix + "decision"], datetime.timedelta(seconds=timeout_s + windows.round_s))
            decision = store.get(prefix + "decision").decode()
            store.add(prefix + "read", 1)
        except dist.DistError as e:
            raise RuntimeError(f"Rank {info.rank} reached rank 0's store at MASTER_ADDR:MASTER_PORT={where}, but "
                               f"rank 0 made no rendezvous decision there ({e}): did rank 0 fail?") from e
    kind, _, detail = decision.partition("\n")
    if kind == "fail" and info.rank == 0:
        # rank 0's store ends with its process: the ranks that arrived read the decision first (briefly)
        deadline = time.monotonic() + windows.round_s
        while store.add(prefix + "read", 0) < store.add(prefix + "arrived", 0) - 1 and time.monotonic() < deadline:
            time.sleep(_STORE_POLL_S)
    log.debug("rank %d: rendezvous decision %r", info.rank, decision)
    if kind == "store":
        return store, True
    if kind == "mpi" and has_mpi4py:
        return store, False
    if kind == "mpi":
        raise RuntimeError(f"mpi4py is missing on rank {info.rank}, and the ranks need MPI to agree on the "
                           f"rendezvous: {detail}. Install mpi4py on every rank, or {_EXPORT_HINT}.")
    raise RuntimeError(detail)


def _arrive(info: LaunchInfo, has_mpi4py: bool, timeout_s: float, where: str, prefix: str,
            windows: _Windows) -> dist.Store | None:
    """Reach rank 0's store (:func:`_round_store`) and count this rank in, saying whether it has mpi4py.

    A rank counted in as more than the world's ranks found the store of an earlier ``init_from_env`` of this
    job, which rank 0's group holds until rank 0 destroys it (a script that joins, destroys and joins again,
    one rank faster than rank 0): that round is complete and its decision not ours (the rank joined the old
    group's addresses and failed), so the rank waits for rank 0's next store, within its connect window."""
    connect = timeout_s if not has_mpi4py else min(timeout_s, windows.connect_s)
    deadline = time.monotonic() + connect
    while True:
        store = _round_store(info, has_mpi4py, timeout_s, where, windows, deadline)
        if store is None:
            return None
        # "without" is counted before "arrived", and rank 0 reads them the other way round: a rank it counts as
        # arrived is in its count of ranks without mpi4py already when it lacks it
        if not has_mpi4py:
            store.add(prefix + "without", 1)
        store.set(f"{prefix}rank/{info.rank}", "1" if has_mpi4py else "0")
        if store.add(prefix + "arrived", 1) <= info.world_size or info.rank == 0:
            return store
        del store
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    stale = (f"rank 0's store at MASTER_ADDR:MASTER_PORT={where} still holds the group of an earlier "
             f"init_from_env after {connect:g} s")
    if has_mpi4py:
        log.info("rank %d: %s: agreeing through MPI", info.rank, stale)
        return None
    raise RuntimeError(f"Rank {info.rank}: {stale}; destroy that group on every rank (dist.destroy_process_group()) "
                       "before calling init_from_env again, or install mpi4py on every rank.")


def _round_store(info: LaunchInfo, has_mpi4py: bool, timeout_s: float, where: str, windows: _Windows,
                 deadline: float | None = None) -> dist.Store | None:
    """Rank 0 hosts the round's store at its ``MASTER_ADDR``/``MASTER_PORT``; the others connect to it. A
    rank with mpi4py that cannot reach it in :data:`_STORE_CONNECT_S` returns ``None`` (it has MPI left)."""
    assert info.master_addr is not None and info.master_port is not None
    timeout = datetime.timedelta(seconds=timeout_s + windows.round_s)
    if info.rank == 0:
        try:
            return dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=True,
                                 timeout=timeout, wait_for_workers=False)
        except dist.DistError as e:
            raise RuntimeError(f"Rank 0 cannot host the rendezvous at MASTER_ADDR:MASTER_PORT={where}: {e}") from e
    connect = timeout_s if not has_mpi4py else min(timeout_s, windows.connect_s)
    deadline = time.monotonic() + connect if deadline is None else deadline
    error = f"nothing listens there after {connect:g} s"  # the window _arrive gave, counted from its start
    # a bounded wait for the port first: TCPStore's own connect retries past its timeout, logging each try
    while _listening(info.master_addr, info.master_port, deadline - time.monotonic()):
        store, error = _store_client(info.master_addr, info.master_port, info.world_size, timeout,
                                     max(1.0, min(_STORE_HANDSHAKE_S, deadline - time.monotonic())))
        # a service that accepts and closes without a store's answer will not become one either (each probe
        # of it takes the probe client's whole timeout: retrying it to the window's end cost up to timeout_s)
        if store is not None or "does not answer" in error or error == CLOSED_WITHOUT_ANSWER \
                or time.monotonic() >= deadline:
            break  # a store, or a service that is none (it will not become one), or no time left
        time.sleep(_STORE_POLL_S)  # refused or reset: a store that closed (an earlier group's), or not up yet
    else:
        store = None
    if store is not None:
        return store
    if has_mpi4py:
        log.info("rank %d: rank 0's store at %s unreachable (%s): agreeing through MPI", info.rank, where, error)
        return None
    raise RuntimeError(
        f"Rank {info.rank} cannot reach rank 0's store at MASTER_ADDR:MASTER_PORT={where} ({error}): rank 0 has "
        "other values or none, or did not start; and mpi4py is missing on this rank, so MPI cannot tell it rank "
        f"0's: {_EXPORT_HINT} (the same values), or install mpi4py on every rank.")


def _decide(store: dist.Store, prefix: str, world_size: int, timeout_s: float, where: str, round_s: float) -> str:
    """Rank 0's decision of the store round: ``"store"``, ``"mpi\\n<why>"`` or ``"fail\\n<message>"``."""
    start = time.monotonic()
    while True:
        arrived = store.add(prefix + "arrived", 0)
        without = store.add(prefix + "without", 0)
        waited = time.monotonic() - start
        if arrived == world_size:
            return "store"
        if without == 0 and waited >= min(round_s, timeout_s):
            absent = _absent(store, prefix, world_size)[0]
            return (f"mpi\nrank(s) {_ranks(absent)} had not reached rank 0's store at MASTER_ADDR:MASTER_PORT="
                    f"{where} after {waited:.0f} s (no MASTER_ADDR/MASTER_PORT there, or other values, or a late "
                    "start), so rank 0 chose the MPI agreement")
        if waited >= timeout_s:
            break
        time.sleep(_STORE_POLL_S)
    absent, lacking = _absent(store, prefix, world_size)
    return (f"fail\nmpi4py is missing on rank(s) {_ranks(lacking)} and rank(s) {_ranks(absent)} did not reach rank "
            f"0's store at MASTER_ADDR:MASTER_PORT={where} within {timeout_s:g} s (no MASTER_ADDR/MASTER_PORT "
            "there, or other values, or they did not start): the group can form neither on the store (every rank "
            f"there) nor through MPI (mpi4py on every rank). {_EXPORT_HINT[0].upper()}{_EXPORT_HINT[1:]}, or "
            "install mpi4py on every rank.")


def _absent(store: dist.Store, prefix: str, world_size: int) -> tuple[list[int], list[int]]:
    """The ranks that have not arrived in the round, and those that arrived without mpi4py."""
    absent, lacking = [], []
    for rank in range(world_size):
        key = f"{prefix}rank/{rank}"
        if not store.check([key]):
            absent.append(rank)
        elif store.get(key) == b"0":
            lacking.append(rank)
    return absent, lacking


def _ranks(ranks: list[int], most: int = 16) -> str:
    shown = ", ".join(map(str, ranks[:most]))
    return shown + (f" and {len(ranks) - most} more" if len(ranks) > most else "")


def _mpi_rendezvous(info: LaunchInfo) -> LaunchInfo:
    """The rendezvous address of an MPI launch agreed through mpi4py, the same on every rank.

    Every rank asks rank 0 (:func:`_mpi_agree`), whether or not it sees ``MASTER_ADDR``/``MASTER_PORT``
    itself: deciding per rank (variables: tcp:// rendezvous; none: mpi4py's broadcast) hung the ranks without
    them in a broadcast that rank 0 never joined when ``mpirun`` had forwarded the variables to some ranks only
    (those on its own node, without ``-x``). Only called where MPI is the way left (:func:`_mpi_join`): a rank
    whose mpi4py does not work raises, its own variables would not reach the ranks without them.
    """
    try:
        from mpi4py import MPI  # imported here only: mpi4py initialises MPI on import
    except (ImportError, RuntimeError) as e:  # RuntimeError: mpi4py installed, no MPI library to load
        raise RuntimeError(
            f"mpi4py does not work on rank {info.rank} ({e}), and the ranks need MPI to agree on a rendezvous: "
            f"install mpi4py (pip install 'lightning-soaa[mpi]') with an MPI library on every rank, or {_EXPORT_HINT}."
        ) from e
    comm = MPI.COMM_WORLD
    mpi_rank, mpi_size = comm.Get_rank(), comm.Get_size()
    if mpi_size != info.world_size:
        # Not the launcher's world (an mpi4py built against another MPI than the mpirun that started us sees
        # each process as a world of its own): no collective reaches the other ranks.
        raise RuntimeError(
            f"mpi4py's MPI.COMM_WORLD has this process as rank {mpi_rank} of {mpi_size}, the launcher's variables "
            f"as rank {info.rank} of {info.world_size}: mpi4py was likely built against another MPI than the one "
            "that launched it, or cannot attach to this launcher (Open MPI 5 under srun --mpi=pmi2). Rebuild mpi4py "
            f"against the launching MPI (pip install --no-binary mpi4py mpi4py), or {_EXPORT_HINT}.")
    return _mpi_agree(info, comm)


def _mpi_agree(info: LaunchInfo, comm: Any) -> LaunchInfo:
    """Every rank takes rank 0's choice: its ``MASTER_ADDR``/``MASTER_PORT``, else its host name and a
    free port. One allgather carries that choice and every rank's own view, so each rank checks all of
    them and every rank raises the same error, or none does (a rank alone raising leaves its peers waiting
    for it until the rendezvous timeout)."""
    choice = None
    if comm.Get_rank() == 0:
        # The host *name*, resolved by each rank itself: resolving it here could give a loopback
        # alias (Debian maps the own hostname to 127.0.1.1) that other hosts cannot reach.
        choice = (info.master_addr or socket.gethostname(), info.master_port or _free_port())
    every = comm.allgather((choice, info.rank, info.master_addr, info.master_port))
    addr, port = every[0][0]
    problems = []
    for mpi_rank, (_, rank, own_addr, own_port) in enumerate(every):
        if rank != mpi_rank:
            problems.append(f"MPI rank {mpi_rank} is rank {rank} by the launcher's variables (mpi4py built "
                            "against another MPI than the one that launched it?)")
        elif (own_addr is not None and own_addr != addr) or (own_port is not None and own_port != port):
            problems.append(f"rank {rank} has MASTER_ADDR={own_addr or '(unset)'} "
                            f"MASTER_PORT={own_port or '(unset)'}")
    if problems:
        origin = ("its MASTER_ADDR" if every[0][2] else "its host name") + ", " + \
            ("its MASTER_PORT" if every[0][3] else "a free port it picked")
        raise RuntimeError(f"MPI ranks disagree on the rendezvous address: rank 0 uses MASTER_ADDR={addr} "
                           f"MASTER_PORT={port} ({origin}), but " + "; ".join(problems) + ". Give every rank "
                           f"the same values, or none (rank 0 then picks them): {_EXPORT_HINT}.")
    return dataclasses.replace(info, master_addr=addr, master_port=int(port))
