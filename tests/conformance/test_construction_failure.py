"""A constructor that raises on some ranks only raises on every rank, together (every registered optimizer).

Building an optimizer over a W > 1 group ends in the construction check (an all-gather). A rank whose
constructor raised before it left the other ranks waiting there until its process exited or the process
group timed out (NCCL, ``srun`` without ``--kill-on-bad-exit``: minutes). The failing rank now joins the
check with a failed row before it re-raises: the others raise at once naming it, and the next construction
on every rank pairs with the next one (nothing left half-built or out of step).
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import pytest
import torch
from torch import nn

from lightning_soaa import SOAA
from lightning_soaa.optim.egn import EGN
from lightning_soaa.registry import FirstArg
from tests.conformance._battery import SIZES, SPECS, bad_values
from tests.harness.distributed import run_distributed
from tests.harness.models import tiny_mlp

pytestmark = pytest.mark.timeout(240)

#: ways a constructor fails on the ranks that fail: a bad hyperparameter (the config's check), a parameter
#: listed twice (torch's / our storage check inside add_param_group), parameters from a generator
FAILURES = ("bad hyperparameter", "duplicate parameter", "bad hyperparameter, generator")


def _build(spec: Any, failing: bool, how: str) -> Any:
    model = tiny_mlp(0, torch.float64, SIZES)
    kwargs = dict(spec.test_kwargs)
    if spec.first_arg is FirstArg.MODULE:
        kwargs.setdefault("loss", "mse")
    if failing and how.startswith("bad hyperparameter"):
        name, value = next(bad_values(spec))
        kwargs[name] = value
    if spec.first_arg is FirstArg.MODULE:
        first: Any = model
    elif failing and how == "duplicate parameter":
        named = list(model.named_parameters())
        first = named + named[:1]
    elif how.endswith("generator"):
        first = ((n, p) for n, p in model.named_parameters())
    else:
        first = list(model.named_parameters())
    return spec.load()(first, **kwargs)


class _UserSOAA(SOAA):
    """A user's subclass with its own signature (not wrapped itself: it may run collectives of its own before
    ``super().__init__``); a failure inside SOAA's constructor is still announced, by SOAA's."""

    def __init__(self, model: nn.Module, *, scale: float) -> None:
        super().__init__(model.parameters(), lr=1e-2 * scale)


def _worker(rank: int, world: int, failing_ranks: list[int]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    try:
        _UserSOAA(tiny_mlp(0, torch.float64, SIZES), scale=-1.0 if rank in failing_ranks else 1.0)
        out[("user subclass", "bad hyperparameter")] = ("built", 0.0)
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        out[("user subclass", "bad hyperparameter")] = (f"{type(exc).__name__}: {exc}", 0.0)
    for spec in SPECS:
        for how in FAILURES:
            if spec.first_arg is FirstArg.MODULE and how != FAILURES[0]:
                continue  # EGN takes the module: one way to fail
            t0 = time.monotonic()
            try:
                _build(spec, rank in failing_ranks, how)
                out[(spec.name, how)] = ("built", time.monotonic() - t0)
            except Exception as exc:  # noqa: BLE001 - the message is what the test checks
                out[(spec.name, how)] = (f"{type(exc).__name__}: {exc}", time.monotonic() - t0)
        # and an agreed construction right after: every rank pairs with the same check again
        _build(spec, False, FAILURES[0])
        out[(spec.name, "after")] = "built"
    return out


@pytest.mark.parametrize("world,failing", [(2, [1]), (3, [0, 2]), (2, [0, 1])])
def test_a_constructor_error_on_some_ranks_is_raised_on_every_rank(tmp_path, world, failing) -> None:
    res = run_distributed(_worker, world, tmp_path, failing, timeout=200)
    for rank, got in enumerate(res):
        for (name, how), value in got.items():
            if how == "after":
                assert value == "built"
                continue
            msg, seconds = value
            assert seconds < 30, (rank, name, how, seconds)
            if rank in failing:  # its own error, unchanged
                assert msg.startswith("ValueError: Invalid") or "duplicate" in msg.lower() or \
                    "more than once" in msg or "overlap" in msg, (rank, name, how, msg)
            elif failing:
                assert msg.startswith("RuntimeError: ") and f"the constructor raised on rank(s) {failing}" in msg, \
                    (rank, name, how, msg)


def test_constructors_keep_their_signatures() -> None:
    """The wrapper passes the arguments through as given: EGN's module by keyword, parameters by keyword, a
    user's subclass with a signature of its own (not wrapped) with no arguments or keyword-only ones."""

    class Fixed(SOAA):
        def __init__(self) -> None:
            super().__init__(tiny_mlp(0, torch.float64, SIZES).parameters(), lr=1e-3)

    class KeywordOnly(SOAA):
        def __init__(self, *, params: Any) -> None:
            super().__init__(params, lr=1e-3)

    model = tiny_mlp(0, torch.float64, SIZES)
    EGN(model=model, loss="mse")
    SOAA(params=(p for p in model.parameters()), lr=1e-3)
    Fixed()
    KeywordOnly(params=model.parameters())
    assert inspect.signature(EGN).parameters["model"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD


def _mixed_dtype_worker(rank: int, world: int, mixed_ranks: list[int]) -> str:
    model = tiny_mlp(0, torch.float64, SIZES)
    if rank in mixed_ranks:
        model[0].float()  # a float32 first layer under float64 ones: refused by EGN's constructor
    try:
        EGN(model, loss="mse")
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return f"{type(exc).__name__}: {exc}"
    return "built"


@pytest.mark.parametrize("mixed", [[0, 1], [1]], ids=["every rank", "rank 1"])
def test_egn_over_parameters_of_several_dtypes_is_refused_on_every_rank(tmp_path, mixed: list[int]) -> None:
    """EGN's refusal of trained parameters of more than one dtype (a float32 layer in a float64 model) is
    raised on every rank together: by each rank whose model has them, and by the others naming them."""
    res = run_distributed(_mixed_dtype_worker, 2, tmp_path, mixed, timeout=120)
    for rank, msg in enumerate(res):
        if rank in mixed:
            assert msg.startswith("ValueError: EGN: the model's trained parameters have more than one dtype"), msg
            assert "'0.weight' is torch.float32, '2.weight' is torch.float64" in msg, msg
        else:
            assert msg.startswith("RuntimeError: ") and f"the constructor raised on rank(s) {mixed}" in msg, msg
