"""EGN under Lightning's BaseFinetuning. The stock recipe (freeze before ``configure_optimizers``, then
``unfreeze_and_add_param_group``) cannot work for EGN, which has one param group over the model it was built
on: refused epochs into the fit, where the error used to say only "construct a new EGN for a different
model". It now names the callback and the route that works, and that route (EGN built over every layer,
frozen and made trainable by ``requires_grad`` from ``finetune_function``) trains as the plain loop does,
on one process and on two (DDP with ``find_unused_parameters``, which a frozen layer needs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.strategies import DDPStrategy

from lightning_soaa import EGN
from lightning_soaa.lightning import BatchToOptimizer, OptimizerFactory
from tests.lightning.helpers import N_SAMPLES, RankRecorder, TinyRegressor, load_records, make_trainer, regression_data

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(240)]

ARGS = {"loss": "mse", "lr": 0.5}
EPOCHS, BATCH = 3, 16


class _StockUnfreeze(BaseFinetuning):
    """Lightning's documented recipe: frozen before the optimizer is built, unfrozen as a new group."""

    def freeze_before_training(self, pl_module: Any) -> None:
        self.freeze(pl_module.net[0])

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Any) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.net[0], optimizer)


class _RequiresGradUnfreeze(BaseFinetuning):
    """The route the refusal names: nothing frozen before EGN is built, then requires_grad per epoch."""

    def freeze_before_training(self, pl_module: Any) -> None:
        pass

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Any) -> None:
        if epoch == 0:
            self.freeze(pl_module.net[0])
        elif epoch == 1:
            self.make_trainable(pl_module.net[0])


def _plain_loop() -> torch.Tensor:
    model = TinyRegressor()
    opt = EGN(model, **ARGS)
    x, y = regression_data().tensors
    for epoch in range(EPOCHS):
        model.net[0].requires_grad_(epoch >= 1)
        for i in range(0, N_SAMPLES, BATCH):
            opt.step(inputs=x[i:i + BATCH], targets=y[i:i + BATCH])
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_backbone_unfrozen_as_a_new_group_is_refused_naming_the_route(tmp_path: Path) -> None:
    model = TinyRegressor(OptimizerFactory("lightning_soaa.EGN", ARGS), batch_size=BATCH)
    trainer = make_trainer(tmp_path, max_steps=-1, max_epochs=EPOCHS, callbacks=[_StockUnfreeze(), BatchToOptimizer()])
    with pytest.raises(ValueError, match="BaseFinetuning") as err:
        trainer.fit(model)
    assert "make_trainable" in str(err.value) and "freeze_before_training" in str(err.value)
    assert len(trainer.optimizers[0].param_groups) == 1  # nothing added


@pytest.mark.parametrize("devices", [1, 2])
def test_backbone_frozen_and_unfrozen_by_requires_grad_trains_as_the_plain_loop(devices: int, tmp_path: Path) -> None:
    model = TinyRegressor(OptimizerFactory("lightning_soaa.EGN", ARGS), batch_size=BATCH // devices)
    strategy = DDPStrategy(find_unused_parameters=True, start_method="fork") if devices > 1 else None
    trainer = make_trainer(tmp_path, devices=devices, strategy=strategy, max_steps=-1, max_epochs=EPOCHS,
                           callbacks=[_RequiresGradUnfreeze(), BatchToOptimizer(), RankRecorder(tmp_path)])
    trainer.fit(model)
    for rec in load_records(tmp_path, "", devices):
        torch.testing.assert_close(rec["params"], _plain_loop(), rtol=1e-12, atol=1e-13)
