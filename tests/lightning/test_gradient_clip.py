"""Lightning's ``Trainer(gradient_clip_val=...)`` with an optimizer that averages the ranks' gradients itself
(``grad_reduction="mean"``, devices=2; DDP's own averaging is switched off by a communication hook that returns
each rank's gradient, registered at fit start: Lightning registers ``ddp_comm_hook`` on CUDA only). The optimizer
takes the value over as its ``max_grad_norm`` and clips the averaged gradient, equal to one process whose Trainer
clips the full batch's gradient (float64). Lightning used to clip each rank's own gradient by its own norm, before
the average (AdamW 0.10 off the one-process run in 4 steps), silently. ``gradient_clip_algorithm="value"`` is
refused."""

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import DoublePrecision

from lightning_soaa.lightning import LossToOptimizer, OptimizerFactory
from tests.lightning.helpers import RankRecorder, TinyRegressor, load_records, make_trainer

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(300)]

CLIP = 0.3
OPTIMIZERS = {"SOAA": ("lightning_soaa.SOAA", {"lr": 0.05}),
              "AdamW": ("lightning_soaa.AdamW", {"lr": 0.05}),
              "ASGO": ("lightning_soaa.ASGO", {"lr": 0.05}),
              "DASGO": ("lightning_soaa.DASGO", {"lr": 0.05})}


def _local_gradients(state: object, bucket: torch.distributed.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP communication hook that leaves each rank its own gradient (no averaging)."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


class _NoAveraging(pl.Callback):
    """Each rank keeps its own gradient (what the optimizer's ``grad_reduction="mean"`` is for)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.model.register_comm_hook(None, _local_gradients)


def _fit(tmp: Path, name: str, devices: int, **trainer_kw: Any) -> list[dict[str, Any]]:
    class_path, init = OPTIMIZERS[name]
    model = TinyRegressor(OptimizerFactory(class_path, {**init, "grad_reduction": "mean"}),
                          batch_size=8 // devices)
    extra = [_NoAveraging()] if devices > 1 else []
    trainer = make_trainer(tmp, devices=devices, max_steps=4,
                           callbacks=[LossToOptimizer(), RankRecorder(tmp), *extra], **trainer_kw)
    trainer.fit(model)
    return load_records(tmp, "", devices)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_gradient_clip_val_acts_on_the_averaged_gradient(name: str, tmp_path: Path) -> None:
    ref = _fit(tmp_path / "one", name, 1, gradient_clip_val=CLIP)[0]["params"]
    unclipped = _fit(tmp_path / "free", name, 1)[0]["params"]
    assert (ref - unclipped).abs().max() > 1e-3  # the clip binds in the reference run
    for rec in _fit(tmp_path / "two", name, 2, gradient_clip_val=CLIP):
        torch.testing.assert_close(rec["params"], ref, rtol=1e-10, atol=1e-12)


def test_gradient_clip_by_value_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"gradient_clip_algorithm='value'.*Must be 'norm'"):
        _fit(tmp_path, "AdamW", 2, gradient_clip_val=CLIP, gradient_clip_algorithm="value")


class _OwnPrecision(DoublePrecision):
    """A precision plugin of the user's own (a module outside Lightning's) that keeps Lightning's closure."""


def test_gradient_clip_val_under_a_precision_plugin_of_the_users_own(tmp_path: Path) -> None:
    """Lightning's closure comes from a subclass of its precision plugin defined outside Lightning: still taken
    over (it was recognised by the plugin class's own module: Lightning clipped each rank's own gradient,
    silently 0.1 off the one-process run)."""
    ref = _fit(tmp_path / "one", "AdamW", 1, gradient_clip_val=CLIP)[0]["params"]
    for rec in _fit(tmp_path / "two", "AdamW", 2, gradient_clip_val=CLIP, precision=None, plugins=[_OwnPrecision()]):
        torch.testing.assert_close(rec["params"], ref, rtol=1e-10, atol=1e-12)
