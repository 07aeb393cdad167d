"""Fault tolerance: a crashed torchrun worker restarts, resumes from the latest checkpoint, and the run
ends bit-identical to one that never crashed.

``torchrun --max-restarts=1`` restarts every worker of the group when one dies; the new workers join
the *same* TCP store as the dead ones (torchrun's agent keeps it), which is why ``init_from_env`` forms the
group on a store that rank 0 of the attempt hosts (:func:`lightning_soaa.distributed.attempt_store.attempt_store`).
In the agent's store, about half of the restarts failed to come up (gloo ``connectFullMesh`` connecting to
the dead attempt's address, or a hang); in key spaces named by ``TORCHELASTIC_RESTART_COUNT``, every restart
on two nodes did (torchrun counts restarts per node).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_soaa import registry
from lightning_soaa.distributed.attempt_store import _ATTEMPT_KEY, _NONCE_KEY, attempt_store
from tests.multinode import runner

OPTIMIZERS = [spec.name.lower() for spec in registry.REGISTRY]
STEPS, EVERY, FAIL_AT = 12, 4, 10  # checkpoints after steps 4 and 8; the crash comes after step 10


def _ckpt_args(ckpt: Path, fail_rank: int) -> tuple[str, ...]:
    return ("--checkpoint-dir", str(ckpt), "--checkpoint-every", str(EVERY), "--fail-at-step", str(FAIL_AT),
            "--fail-rank", str(fail_rank))


def _assert_bit_identical(resumed: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    assert len(resumed) == len(reference)
    for got, ref in zip(resumed, reference):
        assert got["params"].keys() == ref["params"].keys()
        for k in ref["params"]:
            assert torch.equal(got["params"][k], ref["params"][k]), (
                f"rank {got['rank']} {k}: max diff {(got['params'][k] - ref['params'][k]).abs().max().item()}")
        # every loss, including those logged before the crash and carried in the checkpoint
        assert got["losses"] == ref["losses"], (got["losses"], ref["losses"])
    assert min(reference[0]["losses"][1:]) < reference[0]["losses"][0]  # it trained


def _torchrun(*extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *extra]


#: the optimizers of test_torchrun_restart_recipe_resumes_bit_identical (its parameters)
RESTART_OPTIMIZERS = ("soaa", "asgo")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> runner.Once[dict[str, list[dict[str, Any]]]]:
    """The uninterrupted two-rank torchrun run without any checkpointing: one launch trains every optimizer
    of the restart tests, on first use (a launch costs seconds, 12 steps milliseconds; train.py's runs in one
    process are bit-identical to separate ones, test_launchers.py checks it)."""
    def launch() -> dict[str, list[dict[str, Any]]]:
        out = tmp_path_factory.mktemp("reference")
        runner.run(_torchrun(*runner.train_args(",".join(RESTART_OPTIMIZERS), out, steps=STEPS)),
                   env=runner.clean_env(), timeout=runner.launch_timeout(180, len(RESTART_OPTIMIZERS)))
        return runner.load_each(out, 2, RESTART_OPTIMIZERS)

    return runner.Once(launch)


@pytest.mark.parametrize("optimizer", ["soaa", pytest.param("asgo", marks=pytest.mark.slow)])
def test_torchrun_restart_recipe_resumes_bit_identical(optimizer: str, tmp_path: Path, reference) -> None:
    """The recipe ``torchrun_restarts.sh`` (torchrun --max-restarts=1 here): rank 1 dies hard after 10 of
    12 steps; torchrun restarts both ranks, which resume from the step-8 checkpoint and end with exactly
    the parameters and losses of the run that never crashed. (SOAA: trust state and the lagged loss;
    ASGO: blocks split across the ranks.)"""
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    env = runner.clean_env(PYTHON=sys.executable, NPROC_PER_NODE="2", MAX_RESTARTS="1", CHECKPOINT_DIR=str(ckpt),
                           CHECKPOINT_EVERY=str(EVERY))
    args = runner.train_args(optimizer, out, steps=STEPS, extra=("--fail-at-step", str(FAIL_AT), "--fail-rank", "1"))
    log = runner.run(["bash", str(runner.EXAMPLES / "torchrun_restarts.sh"), *args[1:]], env=env, timeout=240)
    assert "simulated crash of rank 1 after 10 steps" in log, log[-3000:]
    resumed = runner.load(out, 2)
    # the files come from the second attempt, which resumed from the last checkpoint before the crash
    assert [(r["restart_count"], r["resumed_from_step"]) for r in resumed] == [(1, 8), (1, 8)]
    assert sorted(p.name for p in ckpt.glob("step_*.pt")) == [
        "step_00000004.pt", "step_00000008.pt", "step_00000012.pt"]
    _assert_bit_identical(resumed, reference()[optimizer])


def test_two_agents_worker_crash_resumes_bit_identical(tmp_path: Path) -> None:
    """Two torchrun agents (two nodes on loopback, two workers each, c10d rendezvous, ``--max-restarts=1``);
    rank 3 dies hard after 10 of 12 steps. Its agent counts the restart (``TORCHELASTIC_RESTART_COUNT=1``);
    the other restarts its workers because that node re-joined, mostly uncounted (0). The new group forms anyway,
    resumes from the step-8 checkpoint and ends bit-identical to an uninterrupted four-rank run. (Before,
    the ranks waited in key spaces of different restart counts until the rendezvous timed out.) The
    optimizer reduces the gradients: with DDP, a run resumed at four ranks ends ~1e-17 off the uninterrupted
    one also under one agent (the order DDP sums more than two ranks' gradients in; two ranks are exact)."""
    ref, out, ckpt = tmp_path / "ref", tmp_path / "out", tmp_path / "ckpt"
    env, port, sync = runner.clean_env(), _free_port(), ("--grad-sync", "optimizer")
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2", "--max-restarts=1",
             "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=two_agents_{port}",
             "--monitor-interval=0.5", *runner.train_args("soaa", out, steps=STEPS, extra=sync + _ckpt_args(ckpt, 3))]
    logs = runner.run_together([(agent, env), (agent, env)], timeout=150)
    assert any("simulated crash of rank 3 after 10 steps" in log for log in logs), logs[0][-3000:]
    resumed = runner.load(out, 4)
    # the other agent's count is 0 in most runs and 1 when it noticed the failure itself (a race in torchrun):
    # the differing counts are covered for certain by test_group_forms_across_restart_counts
    assert [r["resumed_from_step"] for r in resumed] == [8] * 4
    counts = [r["restart_count"] for r in resumed]
    assert counts[2:] == [1, 1] and counts[0] == counts[1] and counts[0] in (0, 1), counts
    runner.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                *runner.train_args("soaa", ref, steps=STEPS, extra=sync)], env=env, timeout=120)
    _assert_bit_identical(resumed, runner.load(ref, 4))


class _Crashed(Exception):
    pass


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_single_process_resume_every_optimizer(optimizer: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint holds everything each optimizer needs: a one-process run that crashes after step 10,
    run again as the second attempt, ends bit-identical to the uninterrupted run. (In this process, to
    save three interpreter starts per optimizer: the hard exit raises instead.)"""
    train = runner.train_module()

    def crash(code: int) -> None:
        raise _Crashed(code)

    monkeypatch.setattr(train.os, "_exit", crash)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    ref_dir, out, ckpt = tmp_path / "ref", tmp_path / "out", tmp_path / "ckpt"
    assert train.main(runner.train_args(optimizer, ref_dir, steps=STEPS)[1:]) == 0
    args = runner.train_args(optimizer, out, steps=STEPS, extra=_ckpt_args(ckpt, fail_rank=0))[1:]
    with pytest.raises(_Crashed):
        train.main(args)
    assert not (out / "result_rank0.json").exists()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # the second attempt does not crash
    assert train.main(args) == 0
    resumed = runner.load(out, 1)
    assert (resumed[0]["restart_count"], resumed[0]["resumed_from_step"]) == (1, 8)
    _assert_bit_identical(resumed, runner.load(ref_dir, 1))


_T = datetime.timedelta(seconds=20)


def _store(**kw: Any) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=_T, **kw)


def _published(port: int, nonce: str, world_size: int = 2) -> str:
    return json.dumps({"hosts": ["127.0.0.1"], "port": port, "nonce": nonce, "world_size": world_size})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_attempt_store_is_rank_0s_fresh_store() -> None:
    """A rank that arrives before rank 0 waits past what a dead attempt published in the agent store (a
    port that refuses; then a live store with another nonce: the dead port taken again) and gets rank 0's
    own store, which holds none of the dead attempt's keys."""
    agent = _store()
    agent.set(_ATTEMPT_KEY, _published(_free_port(), "dead"))
    got: list[Any] = []
    early = threading.Thread(target=lambda: got.append(
        attempt_store(agent, rank=1, world_size=2, host="127.0.0.1", timeout=_T)))
    early.start()
    time.sleep(0.5)
    other = _store()
    other.set(_NONCE_KEY, "another attempt")
    other.set("default_pg/rank_0", "address of a dead process")
    agent.set(_ATTEMPT_KEY, _published(other.port, "dead too"))
    time.sleep(0.5)
    assert early.is_alive() and not got
    ours = attempt_store(agent, rank=0, world_size=2, host="127.0.0.1", timeout=_T)
    early.join(15)
    assert len(got) == 1 and got[0].port == ours.port != other.port
    ours.set("k", "v")
    assert got[0].get("k") == b"v" and not got[0].check(["default_pg/rank_0"])
    assert got[0].timeout == _T


def test_attempt_store_without_rank_0_fails_in_time() -> None:
    """No rank 0 publishes: the rank fails after its timeout, naming itself, the key and why the value
    found there is not its attempt's."""
    agent = _store()
    agent.set(_ATTEMPT_KEY, _published(_free_port(), "dead", 3))
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"Rank 2 found no store of rank 0 .*attempt_store.*cannot connect"):
        attempt_store(agent, rank=2, world_size=3, host="127.0.0.1", timeout=datetime.timedelta(seconds=2))
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("world_size", [2, 3])
def test_attempt_store_passes_over_a_complete_group_whose_rank_0_lives(world_size: int) -> None:
    """What an earlier group published while its rank 0 still runs, its store holding the published nonce:
    torchrun's static rendezvous restarts one node's workers while another node's old rank 0 computes, and
    a process that destroys its group and joins again may come before its rank 0 does. A rank of the new
    group waits past that complete group's store (or one of another world size) and gets its own rank 0's.
    Before, it took the old store at once: the static two-agent restart hung in gloo's connect."""
    agent = _store()
    old = attempt_store(agent, rank=0, world_size=world_size, host="127.0.0.1", timeout=_T)
    for rank in range(1, world_size):
        assert attempt_store(agent, rank=rank, world_size=world_size, host="127.0.0.1", timeout=_T).port == old.port
    got: list[Any] = []
    late = threading.Thread(target=lambda: got.append(
        attempt_store(agent, rank=1, world_size=world_size, host="127.0.0.1", timeout=_T)))
    late.start()
    time.sleep(1.0)
    assert late.is_alive() and not got
    agent.set(_ATTEMPT_KEY, _published(old.port, json.loads(agent.get(_ATTEMPT_KEY))["nonce"], world_size + 1))
    time.sleep(0.5)
    assert late.is_alive() and not got
    ours = attempt_store(agent, rank=0, world_size=world_size, host="127.0.0.1", timeout=_T)
    late.join(15)
    assert len(got) == 1 and got[0].port == ours.port != old.port


_REINIT = """
import os, time, torch, torch.distributed as dist
from lightning_soaa.distributed.launch import exit_without_teardown, init_from_env
for group in range(2):
    init_from_env("gloo", timeout_s=20)
    total = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(total)
    print(f"rank {dist.get_rank()} group {group} sum {total.item():g}", flush=True)
    if dist.get_rank() == 0:
        time.sleep(1.0)  # rank 0 leaves its group last (it writes a checkpoint, say)
    dist.destroy_process_group()
exit_without_teardown(0)
"""


def test_torchrun_group_destroyed_and_joined_again(tmp_path: Path) -> None:
    """Under torchrun, every rank destroys its group and calls ``init_from_env`` again, rank 0 a second
    after the others: the second group forms on rank 0's new store. Before, rank 1 took rank 0's old
    store (still up, its nonce the one published) and both waited until the timeout."""
    script = tmp_path / "reinit.py"
    script.write_text(_REINIT)
    out = runner.run(_torchrun(str(script)), env=runner.clean_env(), timeout=90)
    for rank in range(2):
        assert f"rank {rank} group 1 sum 3" in out, out[-3000:]


_STATIC_WORKER = """
import os, sys, time, torch, torch.distributed as dist
from lightning_soaa.distributed.launch import exit_without_teardown, init_from_env
init_from_env("gloo", timeout_s=40)
for step in range(2):
    if dist.get_rank() == 3 and step == 1 and not os.path.exists(sys.argv[1]):
        open(sys.argv[1], "w").close()
        os._exit(1)
    if dist.get_rank() < 2 and step == 1:
        time.sleep(8.0)  # node 0 computes, its old rank 0 and store up, while node 1 restarts
    total = torch.tensor([1.0])
    dist.all_reduce(total)
print(f"rank {dist.get_rank()} restart {os.environ['TORCHELASTIC_RESTART_COUNT']} sum {total.item():g}", flush=True)
dist.barrier()
exit_without_teardown(0)
"""


def test_two_static_agents_worker_crash(tmp_path: Path) -> None:
    """torchrun's default (static) rendezvous on two nodes, ``--max-restarts=1``: rank 3 dies; its agent
    restarts its workers at once, while node 0's keep computing for 8 s before they find the peer gone. The
    new workers wait past node 0's old rank 0's store and form the group with node 0's new workers. Before,
    they took the old store and hung in gloo's connect beyond the timeout."""
    script, flag = tmp_path / "static.py", tmp_path / "crashed"
    script.write_text(_STATIC_WORKER)
    port = _free_port()
    agents = [([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                "--nproc_per_node=2", "--max-restarts=1", "--master-addr=127.0.0.1", f"--master-port={port}",
                "--monitor-interval=0.5", str(script), str(flag)], runner.clean_env()) for node in range(2)]
    logs = "".join(runner.run_together(agents, timeout=120))
    assert flag.exists()
    for rank in range(4):
        assert f"rank {rank} restart 1 sum 4" in logs, logs[-3000:]


_WORKER = """
import os, torch, torch.distributed as dist
from lightning_soaa.distributed.launch import exit_without_teardown, init_from_env
init_from_env("gloo", timeout_s=20)
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)
print(f"rank {dist.get_rank()} restart {os.environ['TORCHELASTIC_RESTART_COUNT']} sum {total.item():g}", flush=True)
dist.barrier()
exit_without_teardown(0)
"""


def _dead_attempt(agent: dist.Store) -> dist.TCPStore:
    """What a failed attempt left in torchrun's agent store: the store its rank 0 published, whose port
    another store holds now, and a count of its ranks that arrived before it failed (3 of 4)."""
    other = _store()
    other.set(_NONCE_KEY, "a later attempt of another job")
    agent.set(_ATTEMPT_KEY, _published(other.port, "a dead attempt", 4))
    agent.add("lightning_soaa/attempt/0/4/arrivals", 3)
    return other


@pytest.mark.parametrize("agent_store", [True, False], ids=["agent_store", "rank0_store"])
def test_group_forms_across_restart_counts(agent_store: bool) -> None:
    """torchrun counts restarts per node agent: when a worker of node B dies, B's new workers get
    ``TORCHELASTIC_RESTART_COUNT=1``, node A's (restarted because B re-joined) keep 0, a replacement agent
    starts at 0. Four such ranks (counts 1, 1, 0, 0) form one group through ``init_from_env``: in an agent
    store holding a dead attempt's keys (torchrun's default), and with rank 0 hosting the store
    (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``). Before, the ranks waited in per-count key spaces until the
    rendezvous timed out."""
    agent = _store() if agent_store else None
    dead = _dead_attempt(agent) if agent is not None else None
    port = agent.port if agent is not None else _free_port()
    procs = []
    for rank, count in enumerate([1, 1, 0, 0]):
        env = runner.clean_env(RANK=str(rank), WORLD_SIZE="4", LOCAL_RANK=str(rank % 2), LOCAL_WORLD_SIZE="2",
                               GROUP_RANK=str(rank // 2), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                               TORCHELASTIC_RESTART_COUNT=str(count), TORCHELASTIC_USE_AGENT_STORE=str(agent_store))
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    deadline = time.monotonic() + 90
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
    for rank, (proc, out) in enumerate(zip(procs, outs)):
        assert proc.returncode == 0 and f"rank {rank} restart" in out and "sum 10" in out, out[-3000:]
    del dead  # the store on the dead attempt's port answered until every rank had formed the group
