"""The class every rank raises when some ranks failed before a step's collective (agreement.agreed_error).

Each rank writes its error's flag into the reduced table; every rank then reads the same flags and must raise
an instance of one class, so that a caller's ``except`` (an out of memory caught to step again) takes the same
branch on every rank. These are the rule's cases without a process group (the flags as the table holds them);
tests/conformance/test_local_failures.py runs them on gloo ranks.
"""

from __future__ import annotations

import pytest
import torch

from lightning_soaa.distributed import agreement


class _Custom(Exception):
    pass


class _CustomValue(ValueError):
    pass


def _raised(errors: list[BaseException | None], rank: int) -> BaseException:
    flags = [agreement.error_flag(e) for e in errors]
    return agreement.agreed_error("X.step", flags, errors[rank])


@pytest.mark.parametrize(("errors", "cls"), [
    ([None, torch.OutOfMemoryError("oom")], torch.OutOfMemoryError),
    ([None, ValueError("bad")], ValueError),
    ([None, _CustomValue("bad"), ValueError("worse")], ValueError),  # a subclass counts as its known class
    ([None, TypeError("t"), TypeError("u")], TypeError),
    ([None, RuntimeError("r")], RuntimeError),
    ([None, torch.OutOfMemoryError("oom"), ValueError("bad")], RuntimeError),  # mixed: no out of memory
    ([None, _Custom("c")], RuntimeError),  # a class the peers cannot raise
    ([torch.OutOfMemoryError("oom"), KeyError("k")], RuntimeError),
])
def test_every_rank_raises_one_class(errors: list[BaseException | None], cls: type[BaseException]) -> None:
    failed = [r for r, e in enumerate(errors) if e is not None]
    for rank, own in enumerate(errors):
        raised = _raised(errors, rank)
        assert isinstance(raised, cls), (rank, raised)
        # an out of memory on some ranks only (a caller would catch it there and step again alone)
        assert cls is torch.OutOfMemoryError or not isinstance(raised, torch.OutOfMemoryError), (rank, raised)
        keeps = own is not None and isinstance(own, cls) and (
            cls is torch.OutOfMemoryError or not isinstance(own, torch.OutOfMemoryError))
        assert (raised is own) == keeps, (rank, raised)  # a failed rank's own error where it is of that class
        if raised is not own:
            assert f"rank(s) {failed}" in str(raised), str(raised)
        if own is not None and raised is not own:
            assert f"this rank's: {type(own).__name__}: " in str(raised), str(raised)


def test_every_rank_failing_with_one_other_class_raises_its_own() -> None:
    errors: list[BaseException | None] = [_Custom("a"), _Custom("b")]
    assert all(_raised(errors, r) is errors[r] for r in (0, 1))
    # not when a peer has no error (it cannot raise that class), nor when a rank's class is unknown (flag 1)
    assert type(_raised([None, _Custom("b")], 1)) is RuntimeError
    flags = [1.0, agreement.error_flag(_Custom("b"))]
    assert type(agreement.agreed_error("X.step", flags, _Custom("b"))) is RuntimeError


def test_the_flags_are_exact_in_the_float64_table() -> None:
    flags = [agreement.error_flag(c) for c in (torch.OutOfMemoryError, ValueError, TypeError, RuntimeError,
                                               NotImplementedError, _Custom, KeyError)]
    assert flags[0] == agreement.OOM_FLAG and flags[4] == flags[3]  # NotImplementedError is a RuntimeError
    assert len(set(flags)) == 6 and all(f > 1 for f in flags)
    assert all(torch.tensor(f, dtype=torch.float64).item() == f for f in flags)
    assert agreement.error_flag(None) == 0.0
