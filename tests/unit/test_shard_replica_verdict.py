"""The step's verdict compares HSDP's replicated shards with their replica's row, not with rank 0's."""

from __future__ import annotations

from lightning_soaa.distributed import agreement as A

WORLD = 4
REPLICA_OF = (0, 1, 0, 1)  # a 2 x 2 replicate x shard mesh: ranks 0 and 2 hold one shard, 1 and 3 the other


def _rows(shards: list[int], check: bool = False, moved: list[int] | None = None,
          shards_only: bool = False) -> list[float]:
    rows = [0.0] * (WORLD * A.STEP_ROW)
    for r in range(WORLD):
        rows[r * A.STEP_ROW:(r + 1) * A.STEP_ROW] = A.step_row_values(
            r, WORLD, error=0.0, hyper=1, grad_sq=0.0, grad_count=0, replica_check=check, params_digest=5,
            shards=shards[r], moved=(moved or [0] * WORLD)[r],
            shards_only=shards_only)[r * A.STEP_ROW:(r + 1) * A.STEP_ROW]
    return rows


def test_shards_equal_within_their_replicas_pass_though_they_differ_across_the_shard_dim() -> None:
    for check in (False, True):
        verdict = A.read_step_rows(_rows([7, 9, 7, 9], check), WORLD, False, replica_of=REPLICA_OF)
        assert verdict.moved_ranks == [] and verdict.param_ranks == [], (check, verdict)


def test_a_shard_that_differs_from_its_replica_is_named() -> None:
    moved = A.read_step_rows(_rows([7, 0, 0, 0]), WORLD, False, replica_of=REPLICA_OF)
    assert moved.moved_ranks == [2] and moved.param_ranks == []
    start = A.read_step_rows(_rows([7, 9, 8, 6], True), WORLD, False, replica_of=REPLICA_OF)
    assert start.param_ranks == [2, 3] and not start.replicated


def test_without_replicas_no_shard_is_compared() -> None:
    assert A.read_step_rows(_rows([7, 0, 0, 0]), WORLD, False).moved_ranks == []
    assert A.read_step_rows(_rows([7, 9, 8, 6], True), WORLD, False).param_ranks == []


def test_a_check_of_the_shards_alone_still_judges_the_replicas_changed_in_place() -> None:
    """Under "none" the periodic check digests HSDP's shards only: equal shards say nothing of the plain
    replicas, whose in-place changes on rank 0 alone are named as at any other step."""
    alone = A.read_step_rows(_rows([7, 9, 7, 9], True, [3, 0, 0, 0], shards_only=True), WORLD, False,
                             replica_of=REPLICA_OF)
    assert alone.moved_ranks == [1, 2, 3] and alone.param_ranks == [] and not alone.replicated
    whole = A.read_step_rows(_rows([7, 9, 7, 9], True, [3, 0, 0, 0]), WORLD, False, replica_of=REPLICA_OF)
    assert whole.moved_ranks == [] and whole.replicated
