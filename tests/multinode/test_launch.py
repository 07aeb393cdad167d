"""``detect_launch`` reads each launcher's variables; precedence when launchers nest; bad values."""

from __future__ import annotations

import concurrent.futures
import datetime
import gc
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch.distributed as dist

from lightning_soaa.distributed.launch import (
    LaunchInfo,
    detect_launch,
    first_slurm_host,
    init_from_env,
    slurm_port,
)
from lightning_soaa.distributed.mpi_rendezvous import _mpi4py_importable, _mpi_join, _mpi_rendezvous, _store_round
from lightning_soaa.distributed.store_probe import _store_client

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
            "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x"}
OMPI = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_COMM_WORLD_NODE_RANK": "1"}
SRUN = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
        "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_NTASKS": "4"}
# what a batch script sees outside any srun step: one process, although SLURM_NTASKS says 4
SBATCH = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242",
          "SLURM_NODEID": "0", "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "2(x2)"}


def test_single_process_when_no_launcher() -> None:
    info = detect_launch({})
    assert info == LaunchInfo(launcher="single", rank=0, world_size=1, local_rank=0, local_world_size=1,
                              node_rank=0, master_addr=None, master_port=None)
    assert not info.distributed


def test_torchrun() -> None:
    info = detect_launch(TORCHRUN)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank) == \
        ("torchrun", 3, 4, 1, 2, 1)
    assert (info.master_addr, info.master_port) == ("10.0.0.5", 29400)


def test_open_mpi_without_rendezvous_address() -> None:
    info = detect_launch(OMPI)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank) == \
        ("mpi", 5, 8, 1, 4, 1)
    assert info.master_addr is None and info.master_port is None  # init_from_env asks mpi4py


def test_open_mpi_with_exported_rendezvous_address() -> None:
    info = detect_launch({**OMPI, "MASTER_ADDR": "node7", "MASTER_PORT": "1234"})
    assert (info.master_addr, info.master_port) == ("node7", 1234)


def test_mpich_pmi() -> None:
    info = detect_launch({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"})
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("mpi", 1, 2, 1)


def test_srun_derives_address_and_port_from_the_step() -> None:
    info = detect_launch(SRUN)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank) == \
        ("slurm", 3, 4, 1, 2, 1)
    assert info.master_addr == "gpu07"
    assert info.master_port == slurm_port(4242)
    # every task of the job derives the same port, in a range clear of the ephemeral ports
    assert 1024 < slurm_port(4242) < 32768 and slurm_port(4242) == slurm_port(4242)
    assert detect_launch({**SRUN, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "23456"}).master_addr == "127.0.0.1"


def test_concurrent_steps_of_a_job_derive_distinct_ports() -> None:
    """Two steps of one job running at once (``srun --exact ... &`` twice in a batch script) derived one port
    from the job id: ranks of the two steps met in one group (a mixed run) or failed with EADDRINUSE."""
    port = {s: detect_launch({**SRUN, "SLURM_STEP_ID": str(s)}).master_port for s in range(3)}
    assert len(set(port.values())) == 3, port
    # every task of a step derives the same port: it depends on the job and step ids, not on the task
    assert detect_launch({**SRUN, "SLURM_STEP_ID": "1", "SLURM_PROCID": "0", "SLURM_NODEID": "0",
                          "SLURM_LOCALID": "0"}).master_port == port[1] == slurm_port(4242, step_id=1)
    # no step id at all is step 0; the older SLURM_STEPID name is read too
    assert port[0] == detect_launch(SRUN).master_port == slurm_port(4242) == 25000 + 4242
    assert detect_launch({**SRUN, "SLURM_STEPID": "2"}).master_port == port[2]
    # any 4400 steps of a job get distinct ports, all in [25000, 29400): clear of the ephemeral ports
    ports = {slurm_port(4242, step_id=s) for s in range(4400)}
    assert len(ports) == 4400 and min(ports) == 25000 and max(ports) == 29399
    assert slurm_port(29999, step_id=7) == slurm_port(29999 + 4400, step_id=7)


def _lightning_slurm_port(job_id: int | None, monkeypatch: pytest.MonkeyPatch) -> int:
    """The port Lightning's SLURMEnvironment derives for a job (its own code; it sets MASTER_PORT as it goes)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if job_id is None:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    else:
        monkeypatch.setenv("SLURM_JOB_ID", str(job_id))
    monkeypatch.delenv("MASTER_PORT", raising=False)
    # main_port reads only the environment: the instance skips __init__'s checks of the srun environment
    return int(SLURMEnvironment.main_port.fget(object.__new__(SLURMEnvironment)))  # type: ignore[attr-defined]


def test_slurm_ports_never_meet_lightnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's SLURMEnvironment derives 15000 + the job id's last four digits for every step of a job. Our
    step-0 port was 15000 + job id mod 15000: the same port for a third of the job ids, so a step launched
    through Lightning and a concurrent one through init_from_env clashed (EADDRINUSE, or one group of both).
    Ours now lie in [25000, 29400), clear of Lightning's ports for any job (and of torch's 29400 and 29500)."""
    pytest.importorskip("lightning")
    jobs = [*range(0, 30000, 7), 4242, 9999, 10000, 15000, 123456, 7654321, 4294967295]
    lightning = {job: _lightning_slurm_port(job, monkeypatch) for job in jobs}
    taken = {*lightning.values(), _lightning_slurm_port(None, monkeypatch)}  # no job id: a fixed port
    assert min(taken) == 12910 and 15000 + 9999 in taken  # Lightning's whole range: 12910, 15000-24999
    for job in jobs:
        ports = [slurm_port(job, step_id=step) for step in range(64)]
        assert lightning[job] not in ports and not taken.intersection(ports), job
        assert 29400 not in ports and 29500 not in ports and len(set(ports)) == 64


def test_batch_script_outside_srun_is_a_single_process() -> None:
    assert detect_launch(SBATCH).launcher == "single"


def test_nested_launchers_most_specific_wins() -> None:
    # torchrun inside an sbatch/srun step: torchrun's ranks, not SLURM's
    assert detect_launch({**SRUN, **TORCHRUN}).launcher == "torchrun"
    # mpirun inside an allocation: the batch step's SLURM_PROCID=0 must not win
    assert detect_launch({**SBATCH, **OMPI}).launcher == "mpi"
    assert detect_launch({**SRUN, **OMPI}).rank == 5


@pytest.mark.parametrize(("nodelist", "first"), [
    ("node1", "node1"), ("node[1-2]", "node1"), ("gpu[03-05,9],cpu1", "gpu03"), ("a-b[10,2]", "a-b10"),
    ("x1,x2", "x1"),
])
def test_first_slurm_host(nodelist: str, first: str) -> None:
    assert first_slurm_host(nodelist) == first


def test_slurm_tasks_per_node_formats() -> None:
    env = {k: v for k, v in SRUN.items()}
    env["SLURM_STEP_TASKS_PER_NODE"] = "3,2(x2)"
    env["SLURM_NODEID"] = "2"
    assert detect_launch(env).local_world_size == 2
    env["SLURM_NODEID"] = "0"
    assert detect_launch(env).local_world_size == 3


@pytest.mark.parametrize(("env", "field"), [
    ({"RANK": "a", "WORLD_SIZE": "2"}, "RANK='a'"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank=2"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "world_size=0"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "MASTER_PORT": "70000"}, "master_port=70000"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_STEP_NODELIST"),
    ({**SRUN, "SLURM_STEP_TASKS_PER_NODE": "2(y3)"}, "SLURM_STEP_TASKS_PER_NODE='2(y3)'"),
    # one variable of a launcher's pair alone was read as one process: it trained alone, its peers timed out
    ({"RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "RANK='1' is set but WORLD_SIZE is not"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, "OMPI_COMM_WORLD_RANK='0' is set but OMPI_COMM_WORLD_SIZE is not"),
    ({"PMI_SIZE": "2"}, "PMI_SIZE='2' is set but PMI_RANK is not"),
    # a local rank picks the GPU: -1 or one past the node's processes was accepted
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "local_rank=-1 (read from the torchrun launcher's"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "local_rank=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "0"}, "local_world_size=0"),
])
def test_bad_values_name_the_variable(env: dict[str, str], field: str) -> None:
    with pytest.raises(ValueError, match=re.escape(field)):
        detect_launch(env)


def test_lightning_launcher_environment_is_left_to_lightning() -> None:
    """Lightning's launcher starts rank 1 with WORLD_SIZE, LOCAL_RANK and NODE_RANK but no RANK (Lightning
    joins the group itself): read as no launcher, so a script's init_from_env() leaves it alone."""
    assert detect_launch({"WORLD_SIZE": "2", "LOCAL_RANK": "1", "NODE_RANK": "0"}).launcher == "single"


def test_init_from_env_single_process_does_not_initialise() -> None:
    info = init_from_env(env={})
    assert info.launcher == "single" and not dist.is_initialized()


def test_module_import_does_not_import_mpi4py() -> None:
    code = ("import sys, lightning_soaa.distributed.launch as m, lightning_soaa.distributed.mpi_rendezvous as r; "
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_init_from_env_refuses_a_timeout_that_is_no_duration() -> None:
    from lightning_soaa.distributed.launch import init_from_env

    for bad in (0, -5.0, float("inf"), "300", True):
        with pytest.raises(ValueError, match=re.escape(f"Invalid timeout_s={bad!r}. Must be a number of seconds > 0.")):
            init_from_env(env={}, timeout_s=bad)  # type: ignore[arg-type]


def test_pmi_without_mpich_local_rank_reads_slurm_or_assumes_one_node() -> None:
    """``srun --mpi=pmi2`` sets PMI_RANK/PMI_SIZE and SLURM's variables, not MPI_LOCALRANKID: every process
    read local rank 0 (all on GPU 0). Without any node layout the world is one node."""
    srun_pmi = {"PMI_RANK": "3", "PMI_SIZE": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
                "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4"}
    info = detect_launch(srun_pmi)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank) == \
        ("mpi", 3, 4, 1, 2, 1)
    info = detect_launch({"PMI_RANK": "2", "PMI_SIZE": "3"})
    assert (info.local_rank, info.local_world_size, info.node_rank) == (2, 3, 0)
    # mpiexec inside an sbatch script: the batch step's SLURM variables are not this process's
    batch_step = {"PMI_RANK": "3", "PMI_SIZE": "4", "SLURM_LOCALID": "0", "SLURM_PROCID": "0",
                  "SLURM_TASKS_PER_NODE": "1"}
    info = detect_launch(batch_step)
    assert (info.local_rank, info.local_world_size) == (3, 4)
    with pytest.raises(ValueError, match="PMI_RANK=1 with MPI_LOCALNRANKS='2' but without MPI_LOCALRANKID"):
        detect_launch({"PMI_RANK": "1", "PMI_SIZE": "4", "MPI_LOCALNRANKS": "2"})


# ------------------------------------------------------------------- MPI rendezvous (mpi4py faked)
class _FakeComm:
    """MPI.COMM_WORLD of one rank: ``allgather`` returns the peers' given contributions around this rank's."""

    def __init__(self, rank: int, size: int, peers: dict[int, object]) -> None:
        self.rank, self.size, self.peers = rank, size, peers

    def Get_rank(self) -> int:  # noqa: N802 (mpi4py's names)
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.size

    def allgather(self, obj: object) -> list[object]:
        return [obj if i == self.rank else self.peers[i] for i in range(self.size)]


def _with_mpi(monkeypatch: pytest.MonkeyPatch, comm: _FakeComm | None) -> None:
    """Make ``from mpi4py import MPI`` give ``comm`` as COMM_WORLD (``None``: mpi4py not installed)."""
    fake = None if comm is None else types.SimpleNamespace(MPI=types.SimpleNamespace(COMM_WORLD=comm))
    monkeypatch.setitem(sys.modules, "mpi4py", fake)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None if fake is None else fake.MPI)


MPI2 = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}
MASTER = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29731"}
RANK0_CHOICE = (("127.0.0.1", 29731), 0, "127.0.0.1", 29731)  # rank 0's allgather entry when it has MASTER


def test_mpi_ranks_without_master_variables_take_rank_0s(monkeypatch: pytest.MonkeyPatch) -> None:
    """Raw mpirun forwards MASTER_ADDR/MASTER_PORT only to the ranks on its own node: a rank without them
    waited in mpi4py's broadcast that rank 0 (which had them) never joined, forever. Every rank now asks
    rank 0, whichever variables it sees."""
    _with_mpi(monkeypatch, _FakeComm(1, 2, {0: RANK0_CHOICE}))
    info = _mpi_rendezvous(detect_launch(MPI2))
    assert (info.rank, info.master_addr, info.master_port) == (1, "127.0.0.1", 29731)
    # rank 0 with the variables offers them; without, its host name and a free port
    _with_mpi(monkeypatch, _FakeComm(0, 2, {1: (None, 1, None, None)}))
    info = _mpi_rendezvous(detect_launch({**MPI2, "OMPI_COMM_WORLD_RANK": "0", **MASTER}))
    assert (info.master_addr, info.master_port) == ("127.0.0.1", 29731)
    info = _mpi_rendezvous(detect_launch({**MPI2, "OMPI_COMM_WORLD_RANK": "0"}))
    assert info.master_addr == socket.gethostname() and info.master_port is not None
    # a rank that has only MASTER_ADDR, the same as rank 0's, takes rank 0's port
    _with_mpi(monkeypatch, _FakeComm(1, 2, {0: RANK0_CHOICE}))
    assert _mpi_rendezvous(detect_launch({**MPI2, "MASTER_ADDR": "127.0.0.1"})).master_port == 29731


def test_mpi_ranks_with_other_master_variables_all_fail_naming_both(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank told another address than rank 0 used it silently (or its own: a timeout). Each rank sees
    every rank's values, so all of them raise the same error, naming both values."""
    message = ("rank 0 uses MASTER_ADDR=127.0.0.1 MASTER_PORT=29731 (its MASTER_ADDR, its MASTER_PORT), but "
               "rank 1 has MASTER_ADDR=127.0.0.1 MASTER_PORT=1234")
    rank1 = {**MPI2, **MASTER, "MASTER_PORT": "1234"}
    _with_mpi(monkeypatch, _FakeComm(1, 2, {0: RANK0_CHOICE}))
    with pytest.raises(RuntimeError, match=re.escape(message)):
        _mpi_rendezvous(detect_launch(rank1))
    _with_mpi(monkeypatch, _FakeComm(0, 2, {1: (None, 1, "127.0.0.1", 1234)}))
    with pytest.raises(RuntimeError, match=re.escape(message)):
        _mpi_rendezvous(detect_launch({**MPI2, "OMPI_COMM_WORLD_RANK": "0", **MASTER}))
    # MPI's ranks are not the launcher's: refused on every rank too
    _with_mpi(monkeypatch, _FakeComm(1, 2, {0: (("h", 1), 1, None, None)}))
    with pytest.raises(RuntimeError, match="MPI rank 0 is rank 1 by the launcher's variables"):
        _mpi_rendezvous(detect_launch({**MPI2, "OMPI_COMM_WORLD_RANK": "0"}))


def test_mpi4py_of_another_mpi_fails_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """An mpi4py built against another MPI sees each process as a world of one: no collective reaches the
    peers. The MPI agreement is only asked when the store round could not form the group (some rank has no
    variables, and waits in MPI), so this rank's own variables would not do either: it fails naming mpi4py
    and -x (never hangs). With the variables on every rank the store round forms the group without MPI."""
    _with_mpi(monkeypatch, _FakeComm(0, 1, {}))
    for env in ({**MPI2, **MASTER}, MPI2):
        with pytest.raises(RuntimeError, match=r"rank 0 of 1, the launcher's variables as rank 1 of 2: mpi4py was "
                                               r"likely built against another MPI.*mpirun -x MASTER_ADDR"):
            _mpi_rendezvous(detect_launch(env))


def test_mpi_without_mpi4py_asks_for_it_or_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    _with_mpi(monkeypatch, None)
    assert not _mpi4py_importable()
    # no variables (MASTER_PORT missing) and no mpi4py: nothing to meet the others with
    expected = ("without MASTER_ADDR/MASTER_PORT on rank 1, and mpi4py is missing there: install mpi4py (pip "
                "install 'lightning-soaa[mpi]')")
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        _mpi_join(detect_launch({**MPI2, "MASTER_ADDR": "127.0.0.1"}), 5.0, {})
    with pytest.raises(RuntimeError, match=re.escape("mpi4py does not work on rank 1")):
        _mpi_rendezvous(detect_launch({**MPI2, **MASTER}))


# ----------------------------------------------------------- the store round before MPI (real TCPStores)
def _round(ranks: dict[int, bool], world: int, timeout_s: float,
           extra: dict[str, str] | None = None) -> tuple[dict[int, object], list[object]]:
    """``_store_round`` of the given ranks (rank -> has mpi4py), each in a thread of its own, all given the same
    MASTER_ADDR/MASTER_PORT (and the variables ``extra``); the others never come. Returns each rank's ``formed``
    flag or the error it raised, and the stores (kept alive: rank 0's store is where late ranks would arrive)."""
    env = {"OMPI_COMM_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           **(extra or {})}
    stores: list[object] = []

    def one(rank: int) -> object:
        try:
            launch = {**env, "OMPI_COMM_WORLD_RANK": str(rank)}
            store, formed = _store_round(detect_launch(launch), ranks[rank], timeout_s, launch)
            stores.append(store)
            return formed
        except RuntimeError as e:
            return str(e)

    with concurrent.futures.ThreadPoolExecutor(len(ranks)) as pool:
        results = dict(zip(ranks, pool.map(one, ranks)))
    return results, [env, *stores]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_store_round_forms_the_group_when_every_rank_arrives_whatever_has_mpi4py() -> None:
    """Every rank has MASTER_ADDR/MASTER_PORT, mpi4py only some: the group forms on rank 0's store, and no
    rank starts MPI (whose MPI_Init would wait for the ranks without mpi4py: the hang this replaces)."""
    results, _ = _round({0: True, 1: False, 2: True}, 3, timeout_s=30)
    assert results == {0: True, 1: True, 2: True}


def test_store_round_without_mpi4py_and_a_missing_rank_fails_on_every_rank_naming_both() -> None:
    start = time.monotonic()
    results, _ = _round({0: True, 1: False}, 3, timeout_s=1.0)
    assert len(set(results.values())) == 1, results
    message = str(results[0])
    assert message.startswith("mpi4py is missing on rank(s) 1 and rank(s) 2 did not reach rank 0's store at "
                              "MASTER_ADDR:MASTER_PORT=127.0.0.1:"), message
    assert "within 1 s" in message and time.monotonic() - start < 15


def test_store_round_settles_for_mpi_and_a_late_rank_without_mpi4py_names_itself(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 2 has no variables (raw mpirun without -x) and waits in MPI_Init: the ranks that arrived, all with
    mpi4py, go to the MPI agreement after _STORE_ROUND_S. A rank that turns up after that without mpi4py
    cannot follow them there: it raises, naming itself and why MPI was chosen."""
    import lightning_soaa.distributed.mpi_rendezvous as rendezvous

    monkeypatch.setattr(rendezvous, "_STORE_ROUND_S", 0.5)
    results, keep = _round({0: True, 1: True}, 3, timeout_s=30)
    assert results == {0: False, 1: False}
    env = keep[0]
    assert isinstance(env, dict)
    with pytest.raises(RuntimeError, match=r"mpi4py is missing on rank 2, and the ranks need MPI to agree on the "
                                           r"rendezvous: rank\(s\) 2 had not reached rank 0's store"):
        _store_round(detect_launch({**env, "OMPI_COMM_WORLD_RANK": "2"}), False, 30, {})


def test_store_round_windows_come_from_the_environment() -> None:
    """LIGHTNING_SOAA_STORE_ROUND_S and LIGHTNING_SOAA_STORE_CONNECT_S set the two windows (10 s and 30 s by
    default): rank 0 settles for MPI after the round's, a rank with mpi4py that finds no store gives up after the
    connect window."""
    start = time.monotonic()
    results, _ = _round({0: True, 1: True}, 3, timeout_s=30, extra={"LIGHTNING_SOAA_STORE_ROUND_S": "0.5"})
    assert results == {0: False, 1: False} and time.monotonic() - start < 8, results
    env = {**MPI2, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),  # nothing listens there
           "LIGHTNING_SOAA_STORE_CONNECT_S": "1.5"}
    start = time.monotonic()
    assert _store_round(detect_launch(env), True, 30, env) == (None, False)
    assert 1.5 <= time.monotonic() - start < 8


@pytest.mark.parametrize("name", ["LIGHTNING_SOAA_STORE_ROUND_S", "LIGHTNING_SOAA_STORE_CONNECT_S"])
@pytest.mark.parametrize("value", ["ten", "0", "-1", "nan", "inf", "1e10", "1e15"])
def test_store_round_window_variables_are_checked(name: str, value: str) -> None:
    env = {**MPI2, "OMPI_COMM_WORLD_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           name: value}
    with pytest.raises(ValueError, match=re.escape(f"Invalid {name}={value!r}. Must be a number of seconds > 0 "
                                                   "(default ")):
        _store_round(detect_launch(env), True, 30, env)


def test_a_probe_interrupted_by_a_signal_leaves_no_thread() -> None:
    """A signal handler's exception (a SIGTERM handler that exits, Ctrl-C) while the probe waits on a service that
    never answers: the relay and its client were left running, and when that service then closed during the
    interpreter's exit, the client threw at its deadline and the process aborted (status 134)."""

    class Interrupted(Exception):
        pass

    def interrupt(*_: object) -> None:
        raise Interrupted

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: [held.append(listener.accept()[0]) for _ in range(4)], daemon=True).start()
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(Interrupted):
            _store_client("127.0.0.1", listener.getsockname()[1], 2, datetime.timedelta(seconds=3.0), 3.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        left = [t.name for t in threading.enumerate() if t.name.startswith("lightning_soaa-store")]
        for conn in held:
            conn.close()
        listener.close()
    assert not left, left


def test_store_round_against_a_service_that_is_no_store_ends_in_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1's MASTER_PORT leads to a service that accepts connections but is no TCPStore (rank 1 given another
    port than rank 0's, held by something else): TCPStore's handshake waited for its answer without bound, while
    rank 0 settled for MPI and waited in MPI_Init (the job hung; the MPI agreement had named both ports). The
    rank now gives up on it: to the MPI agreement with mpi4py, else with an error naming the service."""
    import lightning_soaa.distributed.mpi_rendezvous as rendezvous

    monkeypatch.setattr(rendezvous, "_STORE_HANDSHAKE_S", 1.0, raising=False)
    monkeypatch.setattr(rendezvous, "_STORE_ROUND_S", 1.0)  # the clients' own timeout: timeout_s + this
    held: list[tuple[socket.socket, object]] = []  # accepted, never answered
    with socket.socket() as service:
        service.bind(("127.0.0.1", 0))
        service.listen(8)
        threading.Thread(target=lambda: [held.append(service.accept()) for _ in range(4)], daemon=True).start()
        env = {**MPI2, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(service.getsockname()[1])}
        for has_mpi4py in (True, False):
            outcome: list[object] = []

            def one(has: bool = has_mpi4py, out: list[object] = outcome) -> None:
                try:
                    out.append(_store_round(detect_launch(env), has, 3.0, {}))
                except RuntimeError as e:
                    out.append(str(e))

            worker = threading.Thread(target=one, daemon=True)
            worker.start()
            worker.join(20)
            assert outcome, f"has_mpi4py={has_mpi4py}: still connecting after 20 s (timeout_s=3)"
            if has_mpi4py:
                assert outcome == [(None, False)]
            else:
                assert "does not answer as a torch TCPStore" in str(outcome[0]), outcome
        # the probe's threads ended when the rank gave up, while the service still holds their connections (a
        # client left waiting there threw when the service closed, and at the interpreter's exit that aborted
        # the process: pytest's exit status 134, test_a_silent_service_closing_at_exit_leaves_the_exit_status)
        assert not [t.name for t in threading.enumerate() if t.name.startswith("lightning_soaa-store")]
        for conn, _ in held:
            conn.close()


def test_store_round_against_a_service_that_accepts_and_closes_gives_up_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A service that accepts the connection and closes it without a store's answer will not become a store:
    the rank gives up after the first probe of it, as for a silent one (it retried to the end of its window,
    each probe taking the probe client's whole timeout: 53 s at timeout_s=60, 10 s before the probe)."""
    import lightning_soaa.distributed.mpi_rendezvous as rendezvous

    monkeypatch.setattr(rendezvous, "_STORE_HANDSHAKE_S", 1.0, raising=False)
    monkeypatch.setattr(rendezvous, "_STORE_ROUND_S", 1.0)
    accepted = [0]
    with socket.socket() as service:
        service.bind(("127.0.0.1", 0))
        service.listen(8)

        def closer() -> None:
            while True:
                try:
                    conn, _ = service.accept()
                except OSError:
                    return
                accepted[0] += 1
                conn.close()

        threading.Thread(target=closer, daemon=True).start()
        env = {**MPI2, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(service.getsockname()[1])}
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="closed the connection without answering"):
            _store_round(detect_launch(env), False, 30.0, {})
        took = time.monotonic() - start
    assert took < 12.0, f"gave up after {took:.1f} s ({accepted[0]} connections) with timeout_s=30"


SILENT_SERVICE_AT_EXIT = '''
import datetime, socket, sys, threading, time
from lightning_soaa.distributed.store_probe import _store_client
listener = socket.create_server(("127.0.0.1", 0))
held = []
threading.Thread(target=lambda: [held.append(listener.accept()[0]) for _ in range(8)], daemon=True).start()
store, why = _store_client("127.0.0.1", listener.getsockname()[1], 2, datetime.timedelta(seconds=0.5), 1.0)
print("gave up:", why, flush=True)
time.sleep(0.5)  # the client's own timeout passes while the service holds its connection
# the service closes as the interpreter exits; the main thread keeps the GIL into finalisation (a long switch
# interval and a spin: the race made deterministic, as in tests/distributed/test_teardown.py)
sys.setswitchinterval(0.5)
for conn in held:
    conn.close()
end = time.monotonic() + 0.3
while time.monotonic() < end:
    pass
sys.exit(3)
'''


def test_a_silent_service_closing_at_exit_leaves_the_exit_status(tmp_path: Path) -> None:
    """A rank gave up on a service that accepts connections but never answers as a store; the client it left
    waiting there threw when that service closed, and when that was while the interpreter exited the process
    ended with SIGABRT ("terminate called without an active exception", status 134) after a clean run. The
    probe now leaves no thread behind: the process ends with its own status."""
    script = tmp_path / "silent_service.py"
    script.write_text(SILENT_SERVICE_AT_EXIT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for _ in range(2):  # the race is deterministic here (10 of 10 aborted before the fix); twice for good measure
        p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
        assert "does not answer as a torch TCPStore within 1 s" in p.stdout, (p.stdout, p.stderr[-2000:])
        assert p.returncode == 3 and "terminate called" not in p.stderr, (p.returncode, p.stderr[-2000:])


def test_a_later_call_waits_for_rank_0s_next_store_not_the_earlier_groups() -> None:
    """init_from_env, destroy_process_group, init_from_env: rank 0's store lives until rank 0 destroys its group,
    and a rank faster than rank 0 found there the complete round of the earlier call, took its decision and
    joined the old group's addresses (gloo: connection reset by peer). It now waits for rank 0's next store."""
    results, keep = _round({0: True, 1: True}, 2, timeout_s=30)  # the earlier call: the group formed
    assert results == {0: True, 1: True}
    env = keep[0]
    assert isinstance(env, dict)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        later = pool.submit(_store_round, detect_launch({**env, "OMPI_COMM_WORLD_RANK": "1"}), True, 30, {})
        time.sleep(1.5)
        assert not later.done(), later.result()
        del keep[1:]  # rank 0 destroys the earlier group: its store closes
        gc.collect()
        store0, formed0 = pool.submit(_store_round, detect_launch({**env, "OMPI_COMM_WORLD_RANK": "0"}), True, 30,
                                      {}).result(timeout=30)
        store1, formed1 = later.result(timeout=30)
    assert formed0 and formed1 and store0 is not None and store1 is not None
    store0.set("generation", "later")
    assert store1.get("generation") == b"later"  # rank 1 joined rank 0's new store


class _CollectiveRefused(_FakeComm):
    def allgather(self, obj: object) -> list[object]:
        raise AssertionError("a later init_from_env made an MPI collective")


def test_a_later_init_from_env_makes_no_mpi_collective(monkeypatch: pytest.MonkeyPatch) -> None:
    """init_from_env is idempotent, and a later call may come from some ranks only (a rank-zero-only hook):
    it made the MPI allgather again, so under mpirun rank 0 waited in it forever, and a peer that then failed
    hung in MPI_Finalize (the job never ended). A later call returns what the group was joined with."""
    import lightning_soaa.distributed.launch as launch

    real_init = dist.init_process_group
    # rank 0 of 2 by the variables; the group itself is this process alone (no peer to start)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: real_init(backend, store=dist.HashStore(), rank=0, world_size=1))
    monkeypatch.setattr(launch, "install_exit_drain", lambda: None)
    _with_mpi(monkeypatch, _FakeComm(0, 2, {1: (None, 1, None, None)}))
    rank0 = {**MPI2, "OMPI_COMM_WORLD_RANK": "0"}
    try:
        joined = init_from_env("gloo", env=rank0)
        assert dist.is_initialized() and joined.master_port is not None
        _with_mpi(monkeypatch, _CollectiveRefused(0, 2, {}))
        assert init_from_env("gloo", env=rank0) == joined
        assert init_from_env("gloo", env={**rank0, **MASTER}) == joined  # the group's, not the variables'
    finally:
        dist.destroy_process_group()
    # a group made elsewhere (Lightning's MPIEnvironment): the environment's values, still no collective
    real_init("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        info = init_from_env("gloo", env={**rank0, **MASTER})
        assert (info.master_addr, info.master_port) == ("127.0.0.1", 29731)
    finally:
        dist.destroy_process_group()
