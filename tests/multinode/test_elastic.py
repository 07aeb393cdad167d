"""Fault tolerance: a crashed torchrun worker restarts, resumes from the latest checkpoint, and the run
ends bit-identical to one that never crashed.

``torchrun --max-restarts=1`` restarts every worker of the group when one dies; the new workers join
the *same* TCP store as the dead ones (torchrun's agent keeps it), which is why ``init_from_env`` prefixes
the process group's keys by the attempt (see :func:`lightning_soaa.distributed.launch.init_from_env`).
Without that prefix about half of the restarts failed to come up (gloo ``connectFullMesh`` connecting to
the dead attempt's address, or a hang).
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_soaa import registry
from lightning_soaa.distributed.launch import attempt_store
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


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """The uninterrupted two-rank torchrun run without any checkpointing, once per optimizer."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def get(optimizer: str) -> list[dict[str, Any]]:
        if optimizer not in cache:
            out = tmp_path_factory.mktemp(f"ref_{optimizer}")
            runner.run(_torchrun(*runner.train_args(optimizer, out, steps=STEPS)), env=runner.clean_env(),
                       timeout=180)
            cache[optimizer] = runner.load(out, 2)
        return cache[optimizer]

    return get


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
    _assert_bit_identical(resumed, reference(optimizer))


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


def test_attempt_store_separates_attempts() -> None:
    """Keys that a dead attempt left in the shared store are invisible to the next attempt, also when
    the restart count repeats (torchrun restarts on a membership change without counting it)."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=30))
    first = attempt_store(server, restart_count=0, rank=0, world_size=1)
    first.set("default_pg/rank_0", "address of a dead process")
    again = attempt_store(server, restart_count=0, rank=0, world_size=1)  # same count, next attempt
    restarted = attempt_store(server, restart_count=1, rank=0, world_size=1)
    for store in (again, restarted):
        assert not store.check(["default_pg/rank_0"])
    assert first.check(["default_pg/rank_0"])


def test_attempt_store_agrees_across_ranks() -> None:
    """Every rank of one attempt gets the same prefix, whatever order they arrive in."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=30))
    for _attempt in range(3):
        stores = [attempt_store(server, restart_count=2, rank=r, world_size=3) for r in (2, 0, 1)]
        stores[0].set("k", "v")
        assert all(s.check(["k"]) for s in stores)
