"""The launcher tests' comparison can fail: perturbed parameters, a wrong data split, a diverging replica."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from tests.multinode.runner import assert_matches_single


def _result(rank: int, world: int, params: dict[str, torch.Tensor], launcher: str) -> dict[str, Any]:
    n = 16 // world
    return {"launcher": launcher, "rank": rank, "world_size": world, "steps": 3, "optimizer": "adamw",
            "global_batch": 16, "local_samples": [rank * n, (rank + 1) * n], "losses": [1.0, 0.8, 0.5],
            "params": {k: v.clone() for k, v in params.items()}}


@pytest.fixture
def runs() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    params = {"0.weight": torch.randn(4, 3, generator=g, dtype=torch.float64),
              "0.bias": torch.randn(4, generator=g, dtype=torch.float64)}
    return [_result(r, 2, params, "torchrun") for r in range(2)], _result(0, 1, params, "single")


def test_identical_runs_pass(runs) -> None:
    ranks, single = runs
    assert_matches_single(ranks, single, launcher="torchrun")


def test_parameter_difference_fails(runs) -> None:
    ranks, single = runs
    for r in ranks:
        r["params"]["0.bias"][1] += 1e-6
    with pytest.raises(AssertionError, match="0.bias"):
        assert_matches_single(ranks, single, launcher="torchrun")


def test_diverging_replica_fails(runs) -> None:
    ranks, single = runs
    ranks[1]["params"]["0.weight"][0, 0] += 1e-15  # within tolerance of the reference, but not a copy
    with pytest.raises(AssertionError, match="rank 1 differs"):
        assert_matches_single(ranks, single, launcher="torchrun")


def test_ranks_that_all_train_on_the_whole_batch_fail(runs) -> None:
    ranks, single = runs
    for r in ranks:
        r["local_samples"] = [0, 16]
    with pytest.raises(AssertionError):
        assert_matches_single(ranks, single, launcher="torchrun")


def test_wrong_launcher_or_missing_rank_fails(runs) -> None:
    ranks, single = runs
    with pytest.raises(AssertionError):
        assert_matches_single(ranks, single, launcher="mpi")
    with pytest.raises(AssertionError):
        assert_matches_single([copy.deepcopy(ranks[0]), copy.deepcopy(ranks[0])], single, launcher="torchrun")


def test_a_run_that_did_not_train_fails(runs) -> None:
    ranks, single = runs
    for r in (*ranks, single):
        r["losses"] = [1.0, 1.0, 1.0]
    with pytest.raises(AssertionError):
        assert_matches_single(ranks, single, launcher="torchrun")
