"""reduce_order's parts that need no process group: a group it cannot wrap, and how a refusal shows orders."""

from __future__ import annotations

import logging

import pytest

from lightning_soaa.distributed import reduce_order


class _Sealed:
    """A parameter group of a torch whose ``post_backward`` cannot be replaced on the instance."""

    __slots__ = ()

    def post_backward(self) -> None:
        pass


def test_a_group_that_cannot_be_wrapped_is_named_in_a_warning_not_skipped_silently(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=reduce_order.__name__):
        reduce_order.watch([_Sealed()])
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "is not compared for _Sealed on torch" in said[0], said
    assert "run the same units in the same order on every rank" in said[0], said


def test_a_rank_with_one_more_reduction_is_shown_from_where_the_orders_part() -> None:
    names = [f"u{i}" for i in range(20)]
    said = reduce_order.first_order_difference([(20, 1, names), (21, 2, names + ["extra"])])
    assert said == ("rank(s) [1] differ from rank 0 at reduction 21 (from reduction 19 on: rank 0: ..., "
                    "'u18', 'u19'; rank 1: ..., 'u18', 'u19', 'extra')"), said
    assert reduce_order.first_order_difference([(3, 5, names[:3]), (3, 5, names[:3])]) == ""
