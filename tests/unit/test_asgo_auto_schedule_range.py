"""ASGO's root_every="auto" decides from the Gram's change in float64: a float32 Gram of huge (or tiny)
gradients whose float32 norm overflows re-roots when it moves, as the float64 run does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_soaa.optim.asgo import ASGO


def _run(dtype: torch.dtype, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = nn.Parameter((torch.randn(12, 20, generator=g) * 0.3).to(dtype))
    opt = ASGO([("w", w)], lr=1e-2, root_every="auto", root_tol=0.05, root_max_every=10)
    for _ in range(6):
        grad = torch.randn(12, 20, generator=g)  # float32-representable, then scaled by a power of ten
        w.grad = (grad.double() * scale).to(dtype)
        opt.step()
    return w.detach().double()


@pytest.mark.parametrize("scale", [1e15, 1e13])
def test_auto_schedule_of_a_float32_gram_beyond_float32_norms_follows_float64(scale: float) -> None:
    g = torch.Generator().manual_seed(0)
    p0 = (torch.randn(12, 20, generator=g) * 0.3).double()
    ref, got = _run(torch.float64, scale), _run(torch.float32, scale)
    # 0.68 (1e15) off before, when the float32 norms were inf and no root was taken for root_max_every steps
    assert float((got - ref).norm() / (ref - p0).norm()) < 1e-4
