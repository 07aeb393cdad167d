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
SLURM port). Under MPI, the ranks agree on rank 0's address through a store round or mpi4py
(:mod:`~lightning_soaa.distributed.mpi_rendezvous`). Under torchrun with its agent's store (kept for the whole
job, so a dead attempt's keys outlive it) the group forms on a store rank 0 of the attempt hosts itself
(:mod:`~lightning_soaa.distributed.attempt_store`).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import re
import sys
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from lightning_soaa.distributed.attempt_store import _torchrun_store, attempt_store
from lightning_soaa.distributed.mpi_rendezvous import _mpi_join
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
