"""Lightning + DeepSpeed on CPU (gloo) through deepspeed_ext.DeepSpeedStrategy: SOAA from an unchanged
``configure_optimizers``, its loss fed by the LossToOptimizer callback, equals our sharded run."""

from __future__ import annotations

import csv
from typing import Any

import pytest
import torch

from tests.harness.compare import max_abs_diff

pytest.importorskip("lightning")

pytestmark = [pytest.mark.deepspeed, pytest.mark.lightning, pytest.mark.timeout(240)]

STEPS = 4
PARAMS = {"lr": 1e-2, "weight_decay": 0.1, "gamma": 0.1, "total_steps": 10}


def test_soaa_under_lightning_deepspeed_equals_sharded_run(tmp_path):
    """ZeRO-2, bf16-mixed, two param groups (two step() calls per training step). ZeRO-3 is covered by
    test_equivalence.py: Lightning's spawn launcher (needed inside pytest) copies rank 0's module
    state_dict back to the parent, which fails on ZeRO-3's partitioned (shape 0) parameters."""
    stage = 2
    import lightning.pytorch as pl

    from deepspeed_ext.strategy import DeepSpeedStrategy
    from lightning_soaa.lightning.callbacks import LossToOptimizer
    from tests.deepspeed._lightning_module import DSModule

    config = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 8,
              "gradient_clipping": 0.0}
    strategy = DeepSpeedStrategy(config=config, start_method="fork", process_group_backend="gloo")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, precision="bf16-mixed", max_steps=STEPS,
                         callbacks=[LossToOptimizer()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(DSModule(str(tmp_path), PARAMS, STEPS, stage, "bf16"))
    assert trainer.state.finished
    for r in range(2):
        rec = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert rec["wrapper"] == "DeepSpeedZeroOptimizer"
        assert rec["stats"]["t"] == STEPS and rec["step_calls"] == 2 * STEPS
        assert rec["stats"]["d"] == pytest.approx(rec["ref_stats"]["d"], rel=1e-6)
        diff = max_abs_diff(rec["params"], rec["ref"])
        assert diff <= 1e-6


def test_soaa_named_in_the_deepspeed_json_under_lightning(tmp_path):
    """The optimizer block of the DeepSpeed config (``"type": "lightning_soaa.SOAA"``) instead of
    configure_optimizers: ZeRO-1, fp32, one param group."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from deepspeed_ext.strategy import DeepSpeedStrategy
    from lightning_soaa.lightning.callbacks import LossToOptimizer, OptimizerDiagnostics
    from tests.deepspeed._lightning_module import DSModule

    config = {"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.0,
              "optimizer": {"type": "lightning_soaa.SOAA", "params": PARAMS}}
    strategy = DeepSpeedStrategy(config=config, start_method="fork", process_group_backend="gloo")
    with pytest.raises(ValueError, match="Invalid optimizer.type='lightning_soaa.Nope'"):
        DeepSpeedStrategy(config={**config, "optimizer": {"type": "lightning_soaa.Nope"}})
    logger = CSVLogger(str(tmp_path), name="logs", version=0)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, precision="32-true", max_steps=STEPS,
                         callbacks=[LossToOptimizer(), OptimizerDiagnostics()], logger=logger,
                         log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(DSModule(str(tmp_path), PARAMS, STEPS, 1, "fp32", from_json=True))
    assert trainer.state.finished
    # the diagnostics carry the optimizer's name, as under DDP (not the DeepSpeed client's class name)
    with open(tmp_path / "logs" / "version_0" / "metrics.csv", newline="") as f:
        columns = set(next(csv.reader(f)))
    assert {"SOAA/d", "SOAA/steps", "SOAA/world_size"} <= columns, sorted(columns)
    assert not any(c.startswith("DeepSpeed") for c in columns), sorted(columns)
    for r in range(2):
        rec = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        assert rec["wrapper"] == "DeepSpeedZeroOptimizer"
        assert rec["stats"]["t"] == STEPS and rec["step_calls"] == STEPS
        diff = max_abs_diff(rec["params"], rec["ref"])
        assert diff <= 1e-6


def test_soaa_step_loss_under_deepspeed_gradient_accumulation(tmp_path):
    """accumulate_grad_batches=2: DeepSpeed accumulates itself, so Lightning runs the optimizer-step hooks
    after every micro-batch and only the engine's boundary steps. SOAA's step must run on the mean loss of
    the engine's two micro-batches (its window runs on across the epoch's end: 5 batches an epoch).
    Before, the callback restarted every micro-batch and SOAA saw the last micro-batch's loss / 2."""
    import lightning.pytorch as pl

    from deepspeed_ext.strategy import DeepSpeedStrategy
    from lightning_soaa.lightning.callbacks import LossToOptimizer
    from tests.deepspeed._lightning_module import AccumModule

    config = {"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.0}
    strategy = DeepSpeedStrategy(config=config, start_method="fork", process_group_backend="gloo")
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, precision="32-true", max_steps=3,
                         accumulate_grad_batches=2, callbacks=[LossToOptimizer()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(AccumModule(str(tmp_path), batches_per_epoch=5))
    rec = torch.load(tmp_path / "accum.pt", weights_only=False)
    losses, step_losses = rec["losses"], rec["step_losses"]
    # SOAA's step count after each micro-batch: it steps after every second one
    assert [t for t, _ in step_losses][:6] == [0, 1, 1, 2, 2, 3], step_losses
    for i in (1, 3, 5):
        assert step_losses[i][1] == pytest.approx((losses[i - 1] + losses[i]) / 2, rel=1e-6), (i, rec)


def _quiet_trainer(strategy: Any, **kwargs: Any) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_lr_scheduler_from_configure_optimizers_reaches_the_client(tmp_path):
    """A torch LR scheduler returned with our optimizer stays bound to that optimizer; the client DeepSpeed
    steps shares its param-group dicts, so the schedule applies. Before, the client held copies: a LambdaLR
    left the lr at its first value (2e-2 off torch's AdamW with the same schedule after 5 steps)."""
    from deepspeed_ext.strategy import DeepSpeedStrategy
    from tests.deepspeed._lightning_module import SchedModule

    config = {"zero_optimization": {"stage": 0}, "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.0}
    strategy = DeepSpeedStrategy(config=config, start_method="fork", process_group_backend="gloo")
    _quiet_trainer(strategy, precision="32-true", max_steps=STEPS).fit(SchedModule(str(tmp_path), STEPS))
    rec = torch.load(tmp_path / "sched.pt", weights_only=False)
    diff = max_abs_diff(rec["params"], rec["ref"])
    assert diff <= 1e-6, diff


@pytest.mark.parametrize("from_json", [False, True], ids=["configure_optimizers", "json"])
def test_fp16_at_stage_0_is_refused_under_lightning(tmp_path, from_json):
    """precision='16-mixed' makes Lightning add the fp16 block after the strategy parsed its config: stage-0
    fp16 (refused on the deepspeed_ext.initialize route: DeepSpeed's stage-0 fp16 wrapper unscales gradients
    the engine never scaled) ran silently, 6.5e-3 off 32-true in 5 steps. The strategy now checks the config
    as Lightning formatted it, for every client."""
    from deepspeed_ext.strategy import DeepSpeedStrategy
    from tests.deepspeed._lightning_module import DSModule

    config: dict[str, Any] = {"zero_optimization": {"stage": 0}, "train_micro_batch_size_per_gpu": 8,
                              "gradient_clipping": 0.0}
    if from_json:
        config["optimizer"] = {"type": "lightning_soaa.SOAA", "params": PARAMS}
    strategy = DeepSpeedStrategy(config=config, start_method="fork", process_group_backend="gloo")
    trainer = _quiet_trainer(strategy, precision="16-mixed", max_steps=STEPS)
    with pytest.raises(Exception, match=r"Invalid combination optimizer.type='lightning_soaa.SOAA' with "
                                        r"fp16.enabled=true at zero_optimization.stage=0"):
        trainer.fit(DSModule(str(tmp_path), PARAMS, STEPS, 0, "fp32", from_json=from_json))


def test_asgo_named_in_the_json_under_lightning_steps_an_embedding_named_wte_by_adamw(tmp_path):
    """Found by a hunter: the strategy built the JSON's ASGO over the LightningModule's bare parameters, so
    an ``nn.Embedding`` named ``wte`` was preconditioned as a matrix. Now the registry's module groups:
    at ZeRO-1, after one step, the table equals ASGO over ``asgo_param_groups(model)`` in one process (the
    partitions cut the other matrices into other blocks) and every piece of it is in a ``use_asgo=False``
    group."""
    import lightning.pytorch as pl

    from deepspeed_ext.strategy import DeepSpeedStrategy
    from tests.deepspeed._lightning_module import TokenDSModule

    params = {"lr": 2e-2}
    config = {"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.0,
              "optimizer": {"type": "lightning_soaa.ASGO", "params": params}}
    strategy = DeepSpeedStrategy(config=config, start_method="fork", process_group_backend="gloo")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, precision="32-true", max_steps=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(TokenDSModule(str(tmp_path), "ASGO", params, 1))
    assert trainer.state.finished
    for r in range(2):
        rec = torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
        table = rec["names"].index("wte.weight")
        torch.testing.assert_close(rec["params"][table], rec["ref"][table], rtol=0, atol=1e-6)
        routed = {n.removesuffix("[cut]"): use for names, use in rec["inner_groups"] for n in names or ()
                  if ".wte." in n}
        assert routed == {"model.wte.weight": False}, rec["inner_groups"]


def test_a_torch_optimizer_resuming_our_deepspeed_checkpoint_under_lightning_is_refused(tmp_path):
    """Found by a hunter: a DeepSpeed checkpoint folder of our AdamW (ZeRO-2, 2 ranks) resumed by a fit whose
    configure_optimizers returns torch's AdamW loaded silently (no state, our lr/betas/weight decay). Refused on
    every rank, naming both optimizers: by OptimizerStateCheck on an engine with nothing of ours on it (Lightning's
    own strategy on GPUs), and by deepspeed_ext's strategy itself without the callback."""
    from deepspeed_ext.strategy import DeepSpeedStrategy
    from lightning_soaa.lightning import OptimizerStateCheck
    from tests.deepspeed._lightning_module import SwitchModule, unguarded_strategy

    config = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.0}
    kwargs = {"config": config, "start_method": "fork", "process_group_backend": "gloo"}
    ckpt = str(tmp_path / "ours.ckpt")

    def trainer(strategy: Any, **kw: Any) -> Any:
        import lightning.pytorch as pl

        return pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, precision="32-true", logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)

    trainer(DeepSpeedStrategy(**kwargs), max_steps=2).fit(SwitchModule(ours=True, save_to=ckpt))
    said = r"written by lightning_soaa\.AdamW; this engine's optimizer is torch\.optim\.adamw\.AdamW"
    with pytest.raises(Exception, match=said):
        trainer(unguarded_strategy(**kwargs), max_steps=4,
                callbacks=[OptimizerStateCheck()]).fit(SwitchModule(ours=False), ckpt_path=ckpt)
    with pytest.raises(Exception, match=said):
        trainer(DeepSpeedStrategy(**kwargs), max_steps=4).fit(SwitchModule(ours=False), ckpt_path=ckpt)
