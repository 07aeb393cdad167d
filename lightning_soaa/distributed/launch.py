"""Find out who launched this process (torchrun, mpirun, srun, or nobody) and join the process group.

:func:`detect_launch` is a pure function of the environment: it reads the variables each launcher sets
and returns one :class:`LaunchInfo` (rank, world size, local rank, node rank, rendezvous address).
:func:`init_from_env` uses it to call ``torch.distributed.init_process_group`` with gloo (CPU) or NCCL
(GPU). Precedence, most specific first, because launchers nest (``torchrun`` inside an ``sbatch`` script
still sees ``SLURM_*``; ``mpirun`` inside an allocation still sees ``SLURM_PROCID=0``):

1. ``torchrun`` / ``torch.distributed.run``: ``RANK`` and ``WORLD_SIZE`` (plus ``LOCAL_RANK``,
   ``MASTER_ADDR``, ``MASTER_PORT``); also any launcher that exports the torch ``env://`` variables.
2. ``mpirun`` (Open MPI): ``OMPI_COMM_WORLD_RANK`` / ``_SIZE`` / ``_LOCAL_RANK`` / ``_NODE_RANK``;
   MPICH / Intel MPI: ``PMI_RANK`` / ``PMI_SIZE`` / ``MPI_LOCALRANKID`` (``srun --mpi=pmi2`` sets the
   PMI pair without the local rank: then ``SLURM_LOCALID``).
3. ``srun``: ``SLURM_PROCID`` with ``SLURM_STEP_NUM_TASKS`` (set for a job *step*, i.e. by ``srun``).
   A plain batch script also sees ``SLURM_PROCID=0`` and ``SLURM_NTASKS`` but is a single process, so
   the step variable is what tells them apart.

The rendezvous address is ``MASTER_ADDR`` / ``MASTER_PORT`` when exported. Otherwise, under SLURM the
address is the first host of the step's node list and the port is derived from the job and step ids (every
task of a step computes the same one, concurrent steps of a job different ones, none of them Lightning's
SLURM port). Under MPI, the ranks that have ``MASTER_ADDR``/``MASTER_PORT`` first meet in a store rank 0
hosts there, telling it whether they have ``mpi4py``; when every rank arrives the group forms on that store
and MPI is never started. Otherwise the ranks agree through ``mpi4py`` (imported only then, never at module
import time): rank 0 broadcasts its ``MASTER_ADDR``/``MASTER_PORT``, or its host name and a free port, so
ranks that the variables did not reach (raw ``mpirun`` without ``-x`` forwards them only to the ranks on
its own node) join rank 0 rather than hang; where neither can work, every rank in the store fails naming
the ranks without mpi4py and those without the variables (:func:`_mpi_join`).

Restarts (``torchrun --max-restarts=K``): torchrun's agent keeps one TCP store for the whole job, and the
workers of every attempt meet in it. The keys a process group leaves there (each rank's gloo address)
outlive a dead attempt, so a restarted rank could read its dead peer's address ("Connection refused" in
``connectFullMesh``) or a stale count (a hang). :func:`init_from_env` therefore forms the group on a store
that rank 0 of the attempt hosts itself and announces in the agent's store, :func:`attempt_store`.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import logging
import math
import os
import re
import secrets
import socket
import sys
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from lightning_soaa.distributed.teardown import install_exit_drain

__all__ = ["LaunchInfo", "attempt_store", "detect_launch", "exit_without_teardown", "first_slurm_host",
           "init_from_env", "slurm_port"]

log = logging.getLogger(__name__)

LAUNCHERS = ("torchrun", "mpi", "slurm", "single")

#: SLURM-derived ports live in [_SLURM_PORT_BASE, _SLURM_PORT_BASE + _SLURM_PORT_SPAN) = [25000, 29400): above
#: Lightning's SLURMEnvironment ports (15000 + the job id's last four digits, 15000-24999; 12910 without a job id),
#: below torch's default rendezvous ports (29400 for torchrun's c10d rendezvous, 29500 for MASTER_PORT) and
#: below Linux's default ephemeral range (32768+, where a client socket may hold one). A step of the same job
#: started through Lightning's or torch's defaults therefore never gets our port. (It was 15000 + job id mod
#: 15000 for step 0: Lightning's port for a third of the job ids.)
_SLURM_PORT_BASE = 25000
_SLURM_PORT_SPAN = 4400


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchInfo:
    """Where this process sits in a job, as read from the launcher's environment variables.

    ``master_addr`` / ``master_port`` are ``None`` when the environment does not determine them
    (MPI without ``MASTER_ADDR``/``MASTER_PORT``: :func:`init_from_env` then agrees on them via mpi4py).
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str | None
    master_port: int | None

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"Invalid launcher={self.launcher!r}. Must be one of {LAUNCHERS}.")
        src = f" (read from the {self.launcher} launcher's environment variables)"
        if self.world_size < 1:
            raise ValueError(f"Invalid world_size={self.world_size}{src}. Must be >= 1.")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"Invalid rank={self.rank}{src}. Must be in [0, {self.world_size}).")
        # a local rank selects this process's GPU (torch.cuda.set_device): -1 or one past the node's
        # processes put ranks on a wrong or shared device
        if self.local_world_size < 1:
            raise ValueError(f"Invalid local_world_size={self.local_world_size}{src}. Must be >= 1.")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"Invalid local_rank={self.local_rank}{src}. Must be in [0, {self.local_world_size}) "
                             "(local_world_size: the processes on this node).")
        if self.node_rank < 0:
            raise ValueError(f"Invalid node_rank={self.node_rank}{src}. Must be >= 0.")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError(f"Invalid master_port={self.master_port}. Must be in [1, 65535].")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        if default is None:
            raise ValueError(f"environment variable {key} is not set")
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"Invalid {key}={raw!r}. Must be an integer.") from None


def _slurm_tasks_per_node(env: Mapping[str, str]) -> int:
    """Tasks of this step on this node. ``SLURM_STEP_TASKS_PER_NODE`` (the step's own layout, which may
    differ from the job's) looks like ``2(x3),1``: expand it and take this node's entry."""
    raw = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not raw:
        return _int(env, "SLURM_NTASKS_PER_NODE", 1)
    counts: list[int] = []
    for part in raw.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(f"Invalid SLURM_STEP_TASKS_PER_NODE={raw!r}. Must look like '2(x3),1'.")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = _int(env, "SLURM_NODEID", 0)
    return counts[node] if node < len(counts) else counts[-1]


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: ``"gpu[03-05,9],cpu1"`` -> ``"gpu03"``."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if m is None or not nodelist:
        raise ValueError(f"Invalid SLURM node list {nodelist!r}.")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]  # keep the zero padding: "03-05" -> "03"


#: how far apart (mod the span) the ports of consecutive steps of one job lie: a prime that does not divide the
#: span (4400 = 2^4 * 5^2 * 11), so any 4400 steps of a job get 4400 distinct ports. Step s of job j meets
#: step t of job k only when j - k = 1549 * (t - s) mod the span: for step ids up to 16 apart, jobs at least
#: 247 ids apart (chosen for that among the primes; a stride of 1 would pair step 1 of a job with step 0 of
#: the next job id).
_SLURM_STEP_STRIDE = 1549


def slurm_port(job_id: int, *, step_id: int = 0) -> int:
    """A rendezvous port every task of a job step derives identically from the job and step ids.

    The step id is in it because a batch script may run several steps of one job at once (``srun --exact
    ... &`` twice, to pack runs into one allocation): from the job id alone they got one port, and ranks of
    different steps joined each other's groups (a silently mixed run), or failed with EADDRINUSE. A missing
    ``SLURM_STEP_ID`` counts as step 0. The range is clear of Lightning's ``SLURMEnvironment`` port, so a step
    launched through Lightning and one through :func:`init_from_env` never meet (see ``_SLURM_PORT_BASE``).
    """
    return _SLURM_PORT_BASE + (job_id + _SLURM_STEP_STRIDE * step_id) % _SLURM_PORT_SPAN


def _master(env: Mapping[str, str]) -> tuple[str | None, int | None]:
    addr = env.get("MASTER_ADDR") or None
    port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else None
    return addr, port


#: the (rank, world size) variables each launcher sets together
_PAIRS: tuple[tuple[str, str, str], ...] = (("RANK", "WORLD_SIZE", "torchrun"),
                                            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"),
                                            ("PMI_RANK", "PMI_SIZE", "MPICH/Intel MPI"))


def _refuse_half_pairs(env: Mapping[str, str]) -> None:
    """Raise ``ValueError`` when one variable of a launcher's pair is set without the other. Such an
    environment was read as no launcher at all: the process trained alone on the whole batch, exit 0,
    while its peers waited for it until the rendezvous timed out (torch's ``env://`` refuses it too).
    Except ``WORLD_SIZE`` without ``RANK``: Lightning's own launcher starts its processes so (with
    ``LOCAL_RANK``; Lightning joins the group itself), and a script's ``init_from_env()`` must then leave it."""
    for rank, size, who in _PAIRS:
        if (rank in env) != (size in env) and not (rank == "RANK" and size in env):
            have, lack = (rank, size) if rank in env else (size, rank)
            raise ValueError(f"{have}={env[have]!r} is set but {lack} is not: {who} sets both. Set both (a "
                             "distributed launch) or neither (one process).")


def _pmi_local(env: Mapping[str, str], rank: int, world: int) -> tuple[int, int, int]:
    """``(local_rank, local_world_size, node_rank)`` of a PMI launch. MPICH's and Intel MPI's ``mpiexec``
    set ``MPI_LOCALRANKID``; ``srun --mpi=pmi2`` sets ``PMI_RANK`` without it but with SLURM's own
    variables. Reading 0 there gave every process local rank 0 (every process on GPU 0)."""
    if "MPI_LOCALRANKID" in env:
        return _int(env, "MPI_LOCALRANKID"), _int(env, "MPI_LOCALNRANKS", world), 0
    # srun started these processes only if its task ids are the PMI ranks (mpiexec inside an sbatch script
    # inherits the batch step's SLURM_LOCALID=0 and one task per node)
    if ("SLURM_LOCALID" in env and env.get("SLURM_PROCID") == env.get("PMI_RANK")
            and env.get("SLURM_STEP_NUM_TASKS") == env.get("PMI_SIZE")):
        return _int(env, "SLURM_LOCALID"), _slurm_tasks_per_node(env), _int(env, "SLURM_NODEID", 0)
    if "MPI_LOCALNRANKS" in env and _int(env, "MPI_LOCALNRANKS") != world:
        raise ValueError(f"PMI_RANK={rank} with MPI_LOCALNRANKS={env['MPI_LOCALNRANKS']!r} but without "
                         "MPI_LOCALRANKID: this process's local rank is unknown. Set MPI_LOCALRANKID (or "
                         "LOCAL_RANK with RANK and WORLD_SIZE).")
    return rank, world, 0  # no node layout given: one node, as local_world_size = world says


def detect_launch(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Read rank, world size, local rank and the rendezvous address from launcher variables.

    Args:
        env: the environment to read (default ``os.environ``); pass a dict in tests.

    Returns:
        A :class:`LaunchInfo`; ``launcher="single"`` with world size 1 when no launcher is detected.
    """
    env = os.environ if env is None else env
    _refuse_half_pairs(env)
    addr, port = _master(env)
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        return LaunchInfo(
            launcher="torchrun",
            rank=_int(env, "RANK"),
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK", 0),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE", world),
            node_rank=_int(env, "GROUP_RANK", _int(env, "NODE_RANK", 0)),
            master_addr=addr or "127.0.0.1",
            master_port=port if port is not None else 29500,  # torch's env:// default
        )
    if "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        world = _int(env, "OMPI_COMM_WORLD_SIZE")
        return LaunchInfo(
            launcher="mpi",
            rank=_int(env, "OMPI_COMM_WORLD_RANK"),
            world_size=world,
            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0),
            local_world_size=_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", world),
            node_rank=_int(env, "OMPI_COMM_WORLD_NODE_RANK", 0),
            master_addr=addr,
            master_port=port,
        )
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        world, rank = _int(env, "PMI_SIZE"), _int(env, "PMI_RANK")
        local_rank, local_world, node_rank = _pmi_local(env, rank, world)
        return LaunchInfo(launcher="mpi", rank=rank, world_size=world, local_rank=local_rank,
                          local_world_size=local_world, node_rank=node_rank, master_addr=addr, master_port=port)
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if addr is None:
            if not nodelist:
                raise ValueError("srun launch without MASTER_ADDR and without SLURM_STEP_NODELIST")
            addr = first_slurm_host(nodelist)
        if port is None:
            step = _int(env, "SLURM_STEP_ID", _int(env, "SLURM_STEPID", 0))  # SLURM_STEPID: the older name
            port = slurm_port(_int(env, "SLURM_JOB_ID", 0), step_id=step)
        return LaunchInfo(
            launcher="slurm",
            rank=_int(env, "SLURM_PROCID"),
            world_size=_int(env, "SLURM_STEP_NUM_TASKS"),
            local_rank=_int(env, "SLURM_LOCALID", 0),
            local_world_size=_slurm_tasks_per_node(env),
            node_rank=_int(env, "SLURM_NODEID", 0),
            master_addr=addr,
            master_port=port,
        )
    return LaunchInfo(launcher="single", rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
                      master_addr=addr, master_port=port)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


_EXPORT_HINT = "export MASTER_ADDR and MASTER_PORT to every rank (mpirun -x MASTER_ADDR -x MASTER_PORT)"


#: how long rank 0's store round waits for every rank before it settles for the MPI agreement, when every rank
#: that arrived has mpi4py: the ranks still missing may have no MASTER_ADDR/MASTER_PORT (raw mpirun without -x
#: forwards them only to the ranks on its own node) and wait in MPI_Init. What a partial export costs at start.
_STORE_ROUND_S = 10.0
#: how long a rank with mpi4py tries to reach rank 0's store before it goes to the MPI agreement instead (rank 0
#: may have no variables, or other values: the agreement then tells every rank).
_STORE_CONNECT_S = 30.0
#: how often rank 0 looks at the round's counters
_STORE_POLL_S = 0.05
#: how long a rank waits for the answer of what listens at rank 0's MASTER_PORT (a store answers at once)
_STORE_HANDSHAKE_S = 10.0


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
    arrived; ``mpi`` after :data:`_STORE_ROUND_S` when every rank that arrived has mpi4py (the others may wait
    in ``MPI_Init``); otherwise, after ``timeout_s``, ``fail`` with the ranks without mpi4py and those that did
    not arrive, raised on every rank that arrived. A rank without mpi4py never goes to MPI, so no decision
    leaves a rank waiting in ``MPI_Init`` for one that cannot get there, except one that arrives after ``mpi``
    was decided: it raises, naming itself, and mpirun ends the job.
    """
    assert info.master_addr is not None and info.master_port is not None
    where = f"{info.master_addr}:{info.master_port}"
    prefix = _round_prefix(info, env)
    store = _arrive(info, has_mpi4py, timeout_s, where, prefix)
    if store is None:
        return None, False
    if info.rank == 0:
        decision = _decide(store, prefix, info.world_size, timeout_s, where)
        store.set(prefix + "decision", decision)
    else:
        try:
            store.wait([prefix + "decision"], datetime.timedelta(seconds=timeout_s + _STORE_ROUND_S))
            decision = store.get(prefix + "decision").decode()
            store.add(prefix + "read", 1)
        except dist.DistError as e:
            raise RuntimeError(f"Rank {info.rank} reached rank 0's store at MASTER_ADDR:MASTER_PORT={where}, but "
                               f"rank 0 made no rendezvous decision there ({e}): did rank 0 fail?") from e
    kind, _, detail = decision.partition("\n")
    if kind == "fail" and info.rank == 0:
        # rank 0's store ends with its process: the ranks that arrived read the decision first (briefly)
        deadline = time.monotonic() + _STORE_ROUND_S
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


def _arrive(info: LaunchInfo, has_mpi4py: bool, timeout_s: float, where: str, prefix: str) -> dist.Store | None:
    """Reach rank 0's store (:func:`_round_store`) and count this rank in, saying whether it has mpi4py.

    A rank counted in as more than the world's ranks found the store of an earlier ``init_from_env`` of this
    job, which rank 0's group holds until rank 0 destroys it (a script that joins, destroys and joins again,
    one rank faster than rank 0): that round is complete and its decision not ours (the rank joined the old
    group's addresses and failed), so the rank waits for rank 0's next store, within its connect window."""
    connect = timeout_s if not has_mpi4py else min(timeout_s, _STORE_CONNECT_S)
    deadline = time.monotonic() + connect
    while True:
        store = _round_store(info, has_mpi4py, timeout_s, where, deadline)
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


def _round_store(info: LaunchInfo, has_mpi4py: bool, timeout_s: float, where: str,
                 deadline: float | None = None) -> dist.Store | None:
    """Rank 0 hosts the round's store at its ``MASTER_ADDR``/``MASTER_PORT``; the others connect to it. A
    rank with mpi4py that cannot reach it in :data:`_STORE_CONNECT_S` returns ``None`` (it has MPI left)."""
    assert info.master_addr is not None and info.master_port is not None
    timeout = datetime.timedelta(seconds=timeout_s + _STORE_ROUND_S)
    if info.rank == 0:
        try:
            return dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=True,
                                 timeout=timeout, wait_for_workers=False)
        except dist.DistError as e:
            raise RuntimeError(f"Rank 0 cannot host the rendezvous at MASTER_ADDR:MASTER_PORT={where}: {e}") from e
    connect = timeout_s if not has_mpi4py else min(timeout_s, _STORE_CONNECT_S)
    deadline = time.monotonic() + connect if deadline is None else deadline
    error = f"nothing listens there after {connect:g} s"  # the window _arrive gave, counted from its start
    # a bounded wait for the port first: TCPStore's own connect retries past its timeout, logging each try
    while _listening(info.master_addr, info.master_port, deadline - time.monotonic()):
        store, error = _store_client(info.master_addr, info.master_port, info.world_size, timeout,
                                     max(1.0, min(_STORE_HANDSHAKE_S, deadline - time.monotonic())))
        if store is not None or "does not answer" in error or time.monotonic() >= deadline:
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


def _store_client(addr: str, port: int, world_size: int, timeout: datetime.timedelta,
                  seconds: float) -> tuple[dist.Store | None, str]:
    """A client of the store at ``addr:port``, or ``None`` and why. TCPStore's handshake waits without bound
    for an answer from whatever accepts the connection (a service that is not a store never answers: the rank
    hung there while the others waited in ``MPI_Init``), so it runs in a thread given ``seconds``."""
    box: list[dist.Store | BaseException] = []

    def connect() -> None:
        try:
            box.append(dist.TCPStore(addr, port, world_size, is_master=False, timeout=timeout,
                                     wait_for_workers=False))
        except BaseException as e:  # noqa: BLE001  (handed to the caller's thread)
            box.append(e)

    thread = threading.Thread(target=connect, name="lightning_soaa-store-connect", daemon=True)
    thread.start()
    thread.join(seconds)
    if not box:
        # the thread stays blocked on that socket until the service closes it and the client's own timeout
        # passes; nothing waits for it (a process that exits while it still runs may end in an abort message)
        return None, (f"something accepts connections there but does not answer as a torch TCPStore within "
                      f"{seconds:g} s: another service on that port?")
    result = box[0]
    return (None, str(result)) if isinstance(result, BaseException) else (result, "")


def _listening(addr: str, port: int, seconds: float) -> bool:
    """Whether something accepts connections at ``addr:port`` within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((addr, port), timeout=max(0.1, min(5.0, left))):
                return True
        except OSError:  # refused, unreachable, or a name that does not resolve (yet)
            if left <= 0:
                return False
            time.sleep(min(0.2, max(left, 0.0)))


def _decide(store: dist.Store, prefix: str, world_size: int, timeout_s: float, where: str) -> str:
    """Rank 0's decision of the store round: ``"store"``, ``"mpi\\n<why>"`` or ``"fail\\n<message>"``."""
    start = time.monotonic()
    while True:
        arrived = store.add(prefix + "arrived", 0)
        without = store.add(prefix + "without", 0)
        waited = time.monotonic() - start
        if arrived == world_size:
            return "store"
        if without == 0 and waited >= min(_STORE_ROUND_S, timeout_s):
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


#: the key of torchrun's agent store under which rank 0 of an attempt publishes where its own store is
_ATTEMPT_KEY = "lightning_soaa/attempt_store"
#: the key in rank 0's own store that holds the nonce it published with: a store without it, or with
#: another nonce, is not this attempt's
_NONCE_KEY = "lightning_soaa/nonce"
#: the key in rank 0's own store that counts the ranks that took it: once world_size - 1 did, its group is
#: complete, and a rank that finds it later belongs to a later group (its rank 0 has not published yet)
_JOINED_KEY = "lightning_soaa/joined"
#: how long a rank gives one published address to answer before it reads the agent store's key again
_ATTEMPT_CONNECT_S = 10.0


def attempt_store(agent: dist.Store, *, rank: int, world_size: int, host: str,
                  timeout: datetime.timedelta) -> dist.Store:
    """A store that only the ranks of this attempt of a torchrun job use: rank 0 hosts it, fresh.

    torchrun's agent store (``TORCHELASTIC_USE_AGENT_STORE=True``) lives as long as the job, and the
    workers of every attempt meet in it; the keys a process group writes there (each rank's gloo address)
    outlive a dead attempt. A restarted rank that read them connected to a dead peer's port, or hung. A key
    space per attempt must be one every rank of the attempt finds from what all of them know, and torchrun
    gives them nothing to name it: ``TORCHELASTIC_RESTART_COUNT`` is counted per node agent (an agent that
    restarts its workers because another node failed or joined does not count it; a replacement agent
    starts at 0), so ranks of one attempt carry different counts; and a count of arrivals in the store is
    left misaligned by a failed attempt whose ranks did not all arrive.

    So rank 0 hosts a store of its own on a free port, with a random nonce in it, and publishes
    ``host``, port and nonce under one key of ``agent``. Every other rank reads that key, connects, and
    takes the store only if it holds the published nonce, is for its world size and has not been taken by
    ``world_size - 1`` ranks already. A value that an earlier group left is waited past: a dead attempt's
    (its port refuses, or another store answers there now), and a complete group's whose rank 0 still runs
    (torchrun's static rendezvous restarts each node's workers on its own, so a node's new workers start
    while another node's old rank 0 computes; a process that destroys its group and calls
    :func:`init_from_env` again may find its old rank 0 not yet there). The group forms on rank 0's store,
    which holds no key of an earlier attempt.

    Args:
        agent: torchrun's agent store.
        rank, world_size: this process in this attempt.
        host: rank 0's address as the other ranks reach it (``MASTER_ADDR``: torchrun runs rank 0 on the
            node whose agent hosts the agent store); only rank 0's value is used.
        timeout: how long a rank waits for rank 0's store (and the store's own timeout).

    Raises:
        RuntimeError: a rank other than 0 found no store of its attempt within ``timeout``.
    """
    if rank == 0:
        store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        nonce = secrets.token_hex(16)
        store.set(_NONCE_KEY, nonce)
        # MASTER_ADDR is rank 0's node for torchrun (its group rank 0 hosts the agent store), but torchrun keeps
        # that address from its first round: its own name too, in case the node ranks moved since
        hosts = list(dict.fromkeys((host, socket.getfqdn())))
        agent.set(_ATTEMPT_KEY, json.dumps({"hosts": hosts, "port": store.port, "nonce": nonce,
                                            "world_size": world_size}))
        log.debug("rank 0 hosts this attempt's store at %s, port %d", hosts, store.port)
        return store
    return _find_attempt_store(agent, rank, world_size, timeout)


def _find_attempt_store(agent: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The store that rank 0 of this attempt published in ``agent`` (see :func:`attempt_store`)."""
    deadline = time.monotonic() + timeout.total_seconds()
    stale: set[bytes] = set()  # values shown to be a dead attempt's: never tried again
    last = "nothing was published"
    while True:
        raw = agent.get(_ATTEMPT_KEY) if agent.check([_ATTEMPT_KEY]) else None
        if raw is not None and raw not in stale:
            found, why, final = _join_published(raw, world_size, deadline)
            if found is not None:
                found.set_timeout(timeout)
                return found
            last = f"{raw.decode(errors='replace')}: {why}"
            if final:
                log.debug("rank %d passes over a dead attempt's store, %s", rank, last)
                stale.add(raw)
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"Rank {rank} found no store of rank 0 of this attempt within {timeout.total_seconds():g} s "
                f"(torchrun's agent store, key {_ATTEMPT_KEY!r}: {last}). Rank 0 did not start or failed before "
                "it published its store, or this rank cannot reach rank 0's node on that port (a firewall?).")
        time.sleep(_STORE_POLL_S)


def _join_published(raw: bytes, world_size: int, deadline: float) -> tuple[dist.Store | None, str, bool]:
    """Connect to the store ``raw`` names and check its nonce: ``(store, "", _)``, or ``(None, why, final)``,
    ``final`` when ``raw`` is shown to be a dead attempt's (a refused port may only be not yet reachable)."""
    try:
        where = json.loads(raw)
        hosts, port, nonce = [str(h) for h in where["hosts"]], int(where["port"]), str(where["nonce"])
        size = int(where["world_size"])
    except (ValueError, KeyError, TypeError):
        return None, "not a value this library writes", True
    if size != world_size:
        return None, f"a group of {size} ranks, not {world_size} (an earlier attempt's)", True
    said, final = [], True
    for host in hosts:
        seconds = max(0.1, min(_ATTEMPT_CONNECT_S, deadline - time.monotonic()))
        try:  # a plain socket first: TCPStore's own connect logs every refused try at error level
            socket.create_connection((host, port), timeout=seconds).close()
        except OSError as e:
            said.append(f"{host}: cannot connect ({e})")
            final = False  # may be only not reachable yet
            continue
        # TCPStore's handshake waits past its timeout on a port that accepts but never answers (a dead
        # attempt's port taken by another program): bounded in _store_client
        store, why = _store_client(host, port, world_size, datetime.timedelta(seconds=seconds), seconds + 1.0)
        if store is None:
            said.append(f"{host}: no store answers there ({why.splitlines()[0] if why else ''})")
        elif not store.check([_NONCE_KEY]):
            said.append(f"{host}: another store answers there (a dead attempt's port, reused)")
        elif store.get(_NONCE_KEY).decode() != nonce:
            said.append(f"{host}: another attempt's store answers there (its nonce differs)")
        elif store.add(_JOINED_KEY, 1) >= world_size:
            # its rank 0 lives on, but its group is complete: an earlier attempt's or an earlier init_from_env's
            return None, f"{host}: its {world_size - 1} other ranks took this store already (an earlier group's)", True
        else:
            return store, "", False
    return None, "; ".join(said), final


def _torchrun_store(info: LaunchInfo, env: Mapping[str, str], timeout: datetime.timedelta) -> dist.Store:
    """The store of this attempt of a torchrun job (or of any launcher that exports the ``env://`` variables).

    With ``TORCHELASTIC_USE_AGENT_STORE=True`` torchrun's agent hosts a store on ``MASTER_ADDR:MASTER_PORT``
    that every attempt shares: the ranks meet there and form the group on a store rank 0 hosts for this
    attempt (:func:`attempt_store`). Otherwise (a launcher that only exports the ``env://`` variables, or
    torchrun with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``) rank 0 hosts the store at that address, as
    ``env://`` does: a new process's store, with no key of an earlier attempt in it.
    """
    assert info.master_addr is not None and info.master_port is not None
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=info.rank == 0,
                             timeout=timeout, multi_tenant=True)
    agent = dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=False, timeout=timeout)
    return attempt_store(agent, rank=info.rank, world_size=info.world_size, host=info.master_addr, timeout=timeout)


def init_from_env(
    backend: str | None = None,
    *,
    timeout_s: float = 300.0,
    env: Mapping[str, str] | None = None,
) -> LaunchInfo:
    """Initialise the default ``torch.distributed`` process group from whichever launcher started us.

    Does nothing (and returns ``launcher="single"``) when no launcher is detected or the world size is 1,
    so the same script runs as a plain ``python train.py``. Idempotent and local: an already initialised
    group is kept, and a later call needs no other rank (it may come from some ranks only).

    Args:
        backend: ``"gloo"``, ``"nccl"``, or ``None`` for NCCL when CUDA is available, else gloo.
        timeout_s: rendezvous and collective timeout in seconds (default 300).
        env: environment to read (default ``os.environ``).

    Returns:
        The :class:`LaunchInfo` used, with the rendezvous address filled in.
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise ValueError(f"Invalid timeout_s={timeout_s!r}. Must be a number of seconds > 0.")
    info = detect_launch(env)
    if not info.distributed:
        return info
    if dist.is_initialized():
        return _already_joined(info)
    store: dist.Store | None = None
    if info.launcher == "mpi":
        info, store = _mpi_join(info, timeout_s, os.environ if env is None else env)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    log.info("init_process_group(%s) rank %d/%d via %s:%s (%s)", backend, info.rank, info.world_size,
             info.master_addr, info.master_port, info.launcher)
    if info.launcher == "torchrun":
        store = _torchrun_store(info, os.environ if env is None else env, timeout)
        dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size, timeout=timeout)
    elif info.launcher == "mpi":
        # rank 0's store of the MPI round holds the agreed port already: a tcp:// rendezvous there would bind it twice
        if store is None:
            assert info.master_addr is not None and info.master_port is not None
            store = dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=info.rank == 0,
                                  timeout=timeout, wait_for_workers=False)
        dist.init_process_group(backend, store=dist.PrefixStore("lightning_soaa/group/", store), rank=info.rank,
                                world_size=info.world_size, timeout=timeout)
    else:
        url = f"tcp://{info.master_addr}:{info.master_port}"
        dist.init_process_group(backend, init_method=url, rank=info.rank, world_size=info.world_size,
                                timeout=timeout)
    install_exit_drain()  # a gloo rank must not abort in interpreter teardown (see teardown.py)
    global _joined
    # a weak reference: the group holds rank 0's store, which holds MASTER_PORT; a strong one kept the port bound
    # after destroy_process_group, and the next init_from_env of this process failed with EADDRINUSE
    _joined = (weakref.ref(dist.group.WORLD), info)
    return info


#: the default group :func:`init_from_env` joined, and the :class:`LaunchInfo` it joined it with
_joined: tuple[weakref.ref[Any], LaunchInfo] | None = None


def _already_joined(info: LaunchInfo) -> LaunchInfo:
    """What a call of :func:`init_from_env` returns once the default group exists: the facts it was joined
    with when :func:`init_from_env` joined it, else ``info`` (the environment's). Never the MPI agreement:
    every rank must join that allgather, and a later call may come from some ranks only (a rank-zero-only
    hook): rank 0 then waited in it forever, and a peer that failed meanwhile hung in ``MPI_Finalize``."""
    if _joined is not None and _joined[0]() is dist.group.WORLD:
        return _joined[1]
    return info


def exit_without_teardown(code: int) -> None:
    """End a training script's process with ``code`` now, skipping the interpreter's teardown.

    Why: a gloo rank can abort while the interpreter tears down after a finished run ("terminate called
    without an active exception", SIGABRT), which a launcher reports as a failed job: a gloo worker that
    still has to drop the last collective's Python tensor waits for the GIL and is ended by the
    finalising interpreter (cause and evidence: :mod:`lightning_soaa.distributed.teardown`, whose exit
    drain, registered by :func:`init_from_env`, closes the window on a normal exit too). Leaving through
    ``os._exit`` has no teardown at all. Streams and logging are flushed first, and MPI is finalised when
    mpi4py initialised it (mpirun reports a rank that exits without MPI_Finalize as failed); call it
    last, with nothing left to write. ``atexit`` handlers do not run.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)
