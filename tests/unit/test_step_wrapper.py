"""The step's one wrapper (``full_precision_no_grad``: inference mode off, autocast off, no grad, each restored) and
the C step's scalar buffer (``_scalar_rows``): the contexts the three stacked decorators gave, and the rows in
block order whichever way the buffer is built."""

from __future__ import annotations

import array
import itertools
from typing import Any

import pytest
import torch

from lightning_soaa.kernels.soaa_native import _scalar_rows
from lightning_soaa.optim.step_context import AUTOCAST_DEVICES, full_precision_no_grad


class _Stepper:
    """Records the contexts its step ran in."""

    def __init__(self, device: str = "cpu") -> None:
        self.seen: dict[str, Any] = {}
        self.device = device  # whose autocast state "device_autocast" records

    @full_precision_no_grad
    def step(self, fail: bool = False) -> str:
        self.seen = {"grad": torch.is_grad_enabled(), "inference": torch.is_inference_mode_enabled(),
                     "autocast": torch.is_autocast_enabled("cpu"), "regions": self.__dict__.get("_caller_autocast"),
                     "device_autocast": torch.is_autocast_enabled(self.device)}
        if fail:
            raise RuntimeError("boom")
        return "ok"


@pytest.mark.parametrize("grad", [True, False])
def test_the_step_runs_without_grad_and_the_callers_grad_mode_comes_back(grad: bool) -> None:
    s = _Stepper()
    with torch.set_grad_enabled(grad):
        assert s.step() == "ok"
        assert s.seen["grad"] is False and torch.is_grad_enabled() is grad
        with pytest.raises(RuntimeError, match="boom"):
            s.step(fail=True)
        assert torch.is_grad_enabled() is grad


def test_inside_inference_mode_the_step_runs_outside_it_and_without_grad() -> None:
    s = _Stepper()
    with torch.inference_mode():
        s.step()
        assert torch.is_inference_mode_enabled()
    assert s.seen["inference"] is False and s.seen["grad"] is False
    assert torch.is_grad_enabled()


def test_inside_autocast_the_step_runs_without_it_and_remembers_the_callers_region() -> None:
    s = _Stepper()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s.step()
        assert torch.is_autocast_enabled("cpu")
    assert s.seen["autocast"] is False and s.seen["grad"] is False
    assert s.seen["regions"] == [("cpu", torch.bfloat16)]
    assert s.__dict__.get("_caller_autocast") is None  # the caller's regions belong to that step only


@pytest.mark.parametrize("device", AUTOCAST_DEVICES)
def test_autocast_enabled_on_any_device_type_the_step_reads_is_disabled_for_the_step(device: str) -> None:
    """Each device type's autocast state set directly (torch.autocast refuses a device type this build lacks):
    torch's one-call ``_is_any_autocast_enabled`` leaves MPS out, so an MPS region once reached the step."""
    s = _Stepper(device)
    before = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    torch.set_autocast_enabled(device, True)
    torch.set_autocast_dtype(device, torch.float16)
    try:
        s.step()
        assert torch.is_autocast_enabled(device)  # the caller's state comes back
    finally:
        torch.set_autocast_enabled(device, before[0])
        torch.set_autocast_dtype(device, before[1])
    assert s.seen["regions"] == [(device, torch.float16)]
    assert s.seen["device_autocast"] is False


def _chained(rows: list[tuple[float, ...]]) -> bytes:
    return array.array("d", itertools.chain.from_iterable(rows)).tobytes()


def test_the_scalar_buffer_holds_every_blocks_row_in_order() -> None:
    a = (0.1, 0.999, 1e-3, 1.0, -1e-2, 1.5, 0.25, 1e-8)
    b = tuple(x * 2.0 for x in a)
    same_values = tuple(list(a))  # equal to a, another object: the general branch, same bytes
    for rows in ([a] * 6, [a], [a, b, a], [b, a, a], [a, same_values], []):
        assert _scalar_rows(rows).tobytes() == _chained(rows)
