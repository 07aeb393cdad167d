"""Lightning Fabric, one process: what a helper's Fabric hunt found (W = 2 DDP, accumulation, checkpoints,
clipping, precisions and ModelParallelStrategy matched plain torch to ~1e-16; README "Lightning Fabric").

EGN under Fabric's '-true' precisions: Fabric's module wrapper casts the outputs to float32, and EGN's
refusal blamed "the cast at the end of forward", which the user never wrote; it now names Fabric and the
way that works (EGN on the wrapped module), checked here against the plain float64 run.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_soaa import EGN

pytestmark = pytest.mark.lightning
fabric = pytest.importorskip("lightning.fabric")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)


def test_egn_on_fabrics_wrapper_under_64_true_names_fabric() -> None:
    f = fabric.Fabric(accelerator="cpu", devices=1, precision="64-true")
    fm = f.setup_module(_model())
    opt = f.setup_optimizers(EGN(fm, loss="mse"))
    opt.set_batch(*_batch())
    with pytest.raises(ValueError, match=r"Lightning Fabric's wrapper.*EGN\(fabric_module\.module"):
        opt.step()


def test_egn_on_the_wrapped_module_under_64_true_equals_plain_float64() -> None:
    x, y = _batch()
    f = fabric.Fabric(accelerator="cpu", devices=1, precision="64-true")
    fm = f.setup_module(_model())
    opt = f.setup_optimizers(EGN(fm.module, loss="mse"))
    plain = _model().double()
    ref = EGN(plain, loss="mse")
    for _ in range(3):
        opt.set_batch(x, y)
        opt.step()
        ref.step(inputs=x, targets=y)
    for a, b in zip(fm.module.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
