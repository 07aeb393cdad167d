"""ASGO's ``batch_dims=1`` (stacked experts) under FSDP2 ``fully_shard``, on real gloo ranks.

``Shard(0)`` puts each expert whole on one rank (E = 3 at W = 2: 2 + 1; at W = 3: 1 each; the one-expert
stack ``solo``: rank 0 only), which steps it locally. Oracle: the one-process run of every expert as a
separate 2-D parameter (tests/fsdp2/_experts_workers.py). Four launches, in order (each resumes what the
earlier ones saved after CKPT_AT steps):

* W = 2: the full run; resumes the one-process consolidated checkpoint; the refusals;
* W = 1: the full run; resumes W = 2's DCP and consolidated checkpoints;
* W = 3: the full run; resumes W = 2's and W = 1's DCP checkpoints and W = 2's consolidated one;
* W = 2: resumes W = 1's and W = 3's DCP checkpoints; one with a corrupt expert state is refused on
  every rank.

and the parent resumes W = 3's consolidated checkpoint in one process. Every continuation must end where
the uninterrupted run does. Equality to 1e-12 in float64 (summation order only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fsdp2 import _experts_workers as X
from tests.harness.distributed import run_distributed

ATOL = 1e-12
#: (world size, DCP checkpoints resumed (by their W), consolidated files resumed, fresh run)
LAUNCHES: tuple[tuple[int, tuple[int, ...], tuple[str, ...], bool], ...] = (
    (2, (), ("cons_plain.pt",), True),
    (1, (2,), ("cons_w2.pt",), True),
    (3, (2, 1), ("cons_w2.pt",), True),
    (2, (1, 3), (), False),
)


@pytest.fixture(scope="module")
def oracle() -> list[torch.Tensor]:
    return X.one_process(False, range(X.STEPS))["params"]


@pytest.fixture(scope="module")
def oracle_auto() -> list[torch.Tensor]:
    return X.one_process(False, range(X.STEPS), **X.AUTO)["params"]


@pytest.fixture(scope="module")
def oracle_flat() -> list[torch.Tensor]:
    return X.one_process(False, range(X.STEPS), **X.FLAT)["params"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[list[dict[str, Any]]], Path]:
    root = tmp_path_factory.mktemp("fsdp2_experts")
    plain = X.one_process(True, range(X.CKPT_AT))
    torch.save({"params": plain["params"], "opt": plain["opt"]}, root / "cons_plain.pt")
    results = [run_distributed(X.run_world, w, root, str(root), loads, cons, fresh, timeout=300)
               for w, loads, cons, fresh in LAUNCHES]
    return results, root


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m, i=i: f"{what}, parameter {i}: {m}")


def test_stacked_experts_under_fsdp2_equal_separate_experts(runs, oracle) -> None:
    results, _ = runs
    for (w, *_), res in zip(LAUNCHES[:3], results[:3]):
        for r, rr in enumerate(res):
            _assert_close(rr["params"], oracle, f"W={w} rank {r}")
            # the last step's collectives: the skip flag, gate's Gram and its norm; none for the experts
            assert rr["calls"] == ({"all_reduce": 3} if w > 1 else {}), (w, r, rr["calls"])
    # who holds which expert: torch.chunk's split of dim 0 (optimizer parameters 0..2: the stacks, 4: solo)
    held = [[rr["held"] for rr in res] for res in results[:3]]
    assert held[0] == [sorted([(p, e) for p in range(3) for e in (0, 1)] + [(4, 0)]), [(p, 2) for p in range(3)]]
    assert held[1] == [sorted([(p, e) for p in range(3) for e in range(3)] + [(4, 0)])]
    assert held[2] == [[(p, 0) for p in (0, 1, 2, 4)], [(p, 1) for p in range(3)], [(p, 2) for p in range(3)]]


def test_stack_trained_through_fully_shard_backward_equals_one_process(runs) -> None:
    """The gradient FSDP2 itself reduce-scatters from a backward (not set by hand) steps the same."""
    results, _ = runs
    want = X.autograd_run(0, 0)
    for (w, *_), res in zip(LAUNCHES[:3], results[:3]):
        for r, rr in enumerate(res):
            _assert_close(rr["autograd"], want, f"autograd W={w} rank {r}")


def test_dcp_checkpoint_resumes_at_other_world_sizes(runs, oracle, oracle_auto, oracle_flat) -> None:
    """Saved at W = 2, resumed at W = 1 and 3, and saved at W = 1 and 3, resumed at W = 2 (also with
    root_every="auto"); the experts' state is stacked: one DTensor [E, ...] per key, sharded like the stack.
    The "flat" checkpoint of 12-02/12-03 was trained without Nesterov (the option did not exist): it resumes so
    under this version's default nesterov=True."""
    results, _ = runs
    checked = 0
    for (w, loads, *_), res in zip(LAUNCHES, results):
        for src in loads:
            for r, rr in enumerate(res):
                # dcp_flat: written as 12-02/12-03's versions did (batch_dims a key of its own, read as 0
                # and refused before the reviewer's fix of the DCP options' move)
                for key, want in (("dcp", oracle), ("dcp_auto", oracle_auto), ("dcp_flat", oracle_flat)):
                    got = rr[key][src]
                    assert got["resumed_at"] == X.CKPT_AT
                    _assert_close(got["params"], want, f"{key} saved at W={src}, resumed at W={w}, rank {r}")
                    assert got["form"]["gram"] == ("DTensor", (3, 3, 3), "(Shard(dim=0),)"), got["form"]
                    assert got["form"]["step"] == ("DTensor", (3,), "(Shard(dim=0),)"), got["form"]
                    assert ("gram_at_root" in got["form"]) == (key == "dcp_auto"), got["form"]
                    checked += 1
    assert checked == 3 * (1 + 2 * 3 + 2 * 2)
    # a step count only the last rank's experts show as ahead of the optimizer's: refused on every rank
    last = results[-1]
    assert "has taken 99 steps" in last[-1]["corrupted"]["error"], last[-1]["corrupted"]
    # the other ranks name the rank that refused it and its reason
    assert f"another rank (rank {len(last) - 1}) found the state invalid" in last[0]["corrupted"]["error"]
    assert "has taken 99 steps" in last[0]["corrupted"]["error"], last[0]["corrupted"]
    assert [rr["corrupted"]["steps"] for rr in last] == [0] * len(last)


def test_consolidated_checkpoint_moves_between_fsdp2_and_one_process(runs, oracle) -> None:
    results, root = runs
    for (w, _, cons, _), res in zip(LAUNCHES, results):
        for name in cons:
            for r, rr in enumerate(res):
                _assert_close(rr["consolidated"][name], oracle, f"{name} resumed at W={w}, rank {r}")
    resumed = X.one_process(True, range(X.CKPT_AT, X.STEPS), start=torch.load(root / "cons_w3.pt", weights_only=False))
    assert resumed["steps"] == X.STEPS
    _assert_close(resumed["params"], oracle, "FSDP2 W=3 consolidated, resumed in one process")


def test_other_placements_of_a_stack_are_refused_on_every_rank(runs) -> None:
    results, _ = runs
    for r, rr in enumerate(results[0]):
        errors = rr["refusals"]
        assert "batch_dims=1 parameter experts of shape (4, 4, 5) has placements (Shard(dim=1),)" in errors["shard1"]
        assert "has placements (Replicate(), Shard(dim=0))" in errors["hsdp"], errors["hsdp"]
        assert "experts of shape (4, 4, 5) is a plain tensor in an optimizer with DTensor" in errors["plain"]
        row_parts = errors.pop("row_parts")
        assert "parameter qkv.weight of shape (12, 2) in a row_parts=3 group is an FSDP2 (DTensor) parameter; " \
               "row_parts is not supported under FSDP2" in row_parts, (r, row_parts)
        for e in errors.values():
            assert "must be a DTensor with placements (Shard(dim=0),)" in e, (r, e)


@pytest.mark.parametrize("flat", [False, True], ids=["default", "flattened"])
def test_a_first_step_with_zero_grams_saves_and_resumes_through_dcp(tmp_path: Path, flat: bool) -> None:
    """A block whose first Gram is all zero (a layer behind a zero-initialised one; an expert's tiny
    gradient) keeps no root after the step. torch.distributed.checkpoint's save raised an internal schema
    error, for an expert on its holder rank alone (the others went on into dcp.save). Saved as zeros and
    left out again on load: the resumed run ends where the uninterrupted one does. Also in torch's flattened
    form (torchtitan's StateDictOptions(flatten_optimizer_state_dict=True): the stacked experts' state and
    per-block entries as flattened keys), which was refused at the save."""
    steps = 3
    ref = X.zero_gram_reference(steps)
    for r, got in enumerate(run_distributed(X.zero_gram_resume, 2, tmp_path, str(tmp_path / "dcp"), steps, flat,
                                            timeout=180)):
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=ATOL, msg=lambda m: f"rank {r}: {m}")
