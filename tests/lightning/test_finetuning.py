"""Lightning's BaseFinetuning with our optimizers, through the factory (``lightning-soaa fit``'s route, which
hands the optimizer ``named_parameters()``): the backbone unfrozen at epoch 1 by
``unfreeze_and_add_param_group`` trains (torch refused the unnamed group one epoch into the fit), and a fit
resumed from a checkpoint saved after the unfreeze loads (refused as 'a different model': the callback
assigns ``optimizer.param_groups`` before the state is loaded). ShardedAdamW against torch's AdamW on the
same route, uninterrupted and resumed (Lightning's own resume of this callback is not the uninterrupted run,
for torch's optimizer too: it leaves the backbone frozen after the restart)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import BaseFinetuning, ModelCheckpoint

from lightning_soaa.lightning import LossToOptimizer, OptimizerFactory
from tests.lightning.helpers import TinyRegressor, make_trainer
from tests.lightning.test_strategies import _case

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(240)]

HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 1e-2}


class _Unfreeze(BaseFinetuning):
    def freeze_before_training(self, pl_module: Any) -> None:
        self.freeze(pl_module.net[0])

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Any) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.net[0], optimizer, lr=5e-3, initial_denom_lr=1.0)


class _TorchAdamW(TinyRegressor):
    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], **HYPER)


def _fit(model: TinyRegressor, out: Path, ckpt: Path | None = None) -> torch.Tensor:
    saver = ModelCheckpoint(dirpath=str(out / "ckpt"), save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    trainer = make_trainer(out, max_steps=-1, max_epochs=3, enable_checkpointing=ckpt is None,
                           callbacks=[_Unfreeze(), LossToOptimizer(), *([saver] if ckpt is None else [])])
    trainer.fit(model, ckpt_path=None if ckpt is None else str(ckpt))
    assert len(trainer.optimizers[0].param_groups) == 2  # the backbone's group
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", ["AdamW", "SOAA", "ASGO"])
def test_backbone_unfrozen_mid_fit_trains_and_resumes(name: str, tmp_path: Path) -> None:
    class_path, _ = _case(name)
    args = HYPER if name == "AdamW" else {"lr": 1e-2}
    start = torch.cat([p.detach().flatten() for p in TinyRegressor().parameters()])
    full = _fit(TinyRegressor(OptimizerFactory(class_path, args)), tmp_path / "full")
    first = torch.cat([p.detach().flatten() for p in TinyRegressor().net[0].parameters()]).numel()
    assert not torch.equal(full[:first], start[:first])  # the unfrozen backbone trained
    ckpt = tmp_path / "full" / "ckpt" / "epoch=1-step=16.ckpt"
    resumed = _fit(TinyRegressor(OptimizerFactory(class_path, args)), tmp_path / "resumed", ckpt)
    if name == "AdamW":
        torch.testing.assert_close(full, _fit(_TorchAdamW(), tmp_path / "torch"), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(resumed, _fit(_TorchAdamW(), tmp_path / "torch_resumed",
                                                 tmp_path / "torch" / "ckpt" / "epoch=1-step=16.ckpt"),
                                   rtol=1e-12, atol=1e-14)
