"""The callbacks and the factory in one process: what reaches the optimizer, errors, pickling."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

import lightning_soaa
from lightning_soaa.lightning import (
    BatchToOptimizer,
    LossToOptimizer,
    OptimizerDiagnostics,
    OptimizerFactory,
    attach_optimizer,
    resolve_optimizer_class,
)
from lightning_soaa.lightning.factory import check_sharding_matches_world
from lightning_soaa.optim.adamw import ShardedAdamW
from lightning_soaa.registry import StepNeeds
from tests.lightning.helpers import PlainRegressor, TinyRegressor, make_trainer

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(120)]


class RecordingAdamW(ShardedAdamW):
    """ShardedAdamW that records every set_loss and the loss it holds when a step runs."""

    step_needs = StepNeeds.LOSS  # declared, so LossToOptimizer hands it the loss like SOAA

    def __init__(self, params: Any, **kw: Any) -> None:
        super().__init__(params, **kw)
        self.handed: list[float] = []
        self.pending: float | None = None
        self.at_step: list[float | None] = []

    def set_loss(self, loss: Any) -> None:
        self.pending = float(loss)
        self.handed.append(self.pending)

    def step(self, closure: Any = None) -> Any:
        ret = super().step(closure)
        self.at_step.append(self.pending)
        self.pending = None
        return ret


@pytest.mark.parametrize("accumulate", [1, 3])
def test_loss_to_optimizer_hands_the_step_loss(accumulate: int, tmp_path: Path) -> None:
    model = TinyRegressor(OptimizerFactory(RecordingAdamW, {"lr": 0.01}), batch_size=4)
    trainer = make_trainer(tmp_path, max_steps=4, accumulate_grad_batches=accumulate,
                           callbacks=[LossToOptimizer()])
    trainer.fit(model)
    opt = trainer.optimizers[0]
    assert len(opt.at_step) == 4
    losses = model.losses  # unscaled per-micro-batch losses, recorded in training_step
    assert len(losses) == 4 * accumulate
    for k, handed in enumerate(opt.at_step):
        expected = sum(losses[k * accumulate:(k + 1) * accumulate]) / accumulate
        assert handed == pytest.approx(expected, rel=1e-12), (k, handed, expected)


def test_soaa_refuses_accumulation_without_the_loss_callback(tmp_path: Path) -> None:
    """accumulate_grad_batches=k without LossToOptimizer: the closure's value is loss_k / k, not the step's
    loss. SOAA refuses before its first step instead of running the trust region on it (before this,
    it trained on with 0.52 where the step's loss was 0.93)."""
    model = TinyRegressor(OptimizerFactory("SOAA", {"lr": 0.01}), batch_size=4)
    trainer = make_trainer(tmp_path, max_steps=2, accumulate_grad_batches=2)
    with pytest.raises(ValueError, match=r"accumulate_grad_batches=2.*LossToOptimizer"):
        trainer.fit(model)
    opt = trainer.optimizers[0]
    assert opt.num_steps == 0 and opt.skipped_steps == 0
    # ... and with the callback the same fit runs
    model = TinyRegressor(OptimizerFactory("SOAA", {"lr": 0.01}), batch_size=4)
    trainer = make_trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, callbacks=[LossToOptimizer()])
    trainer.fit(model)
    assert trainer.optimizers[0].num_steps == 2


def _manual_module(opt_kind: str) -> PlainRegressor:
    class Manual(PlainRegressor):
        def __init__(self) -> None:
            super().__init__(batch_size=8)
            self.automatic_optimization = False

        def configure_optimizers(self) -> Any:
            if opt_kind == "SOAA":
                return lightning_soaa.SOAA(self.parameters(), lr=0.01)
            return lightning_soaa.EGN(self, loss="mse", lr=0.5)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            opt = self.optimizers()
            x, y = batch
            loss = F.mse_loss(self(x), y)
            self.losses.append(float(loss.detach()))
            if opt_kind == "SOAA":
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()  # no closure, no loss=: only LossToOptimizer can supply the loss
            else:
                # The documented manual-optimization recipe for EGN: hand it the batch.
                opt.step(inputs=x, targets=y)
            return loss

    return Manual()


def test_soaa_without_loss_names_the_callback(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match="LossToOptimizer"):
        trainer.fit(_manual_module("SOAA"))
    # ... and with the callback the same module trains.
    model = _manual_module("SOAA")
    trainer = make_trainer(tmp_path, max_steps=4, callbacks=[LossToOptimizer()])
    trainer.fit(model)
    stats = trainer.optimizers[0].statistics()
    assert stats["steps"] == 4.0 and stats["loss"] == pytest.approx(model.losses[-1], rel=1e-6)


def test_egn_manual_optimization_recipe(tmp_path: Path) -> None:
    model = _manual_module("EGN")
    trainer = make_trainer(tmp_path, max_steps=6)
    trainer.fit(model)
    assert trainer.optimizers[0].statistics()["steps"] == 6.0
    assert model.losses[-1] < model.losses[0]


def test_egn_without_batch_names_the_callback(tmp_path: Path) -> None:
    model = TinyRegressor(OptimizerFactory("lightning_soaa.EGN", {"loss": "mse", "lr": 0.5}))
    with pytest.raises(ValueError, match="BatchToOptimizer"):
        make_trainer(tmp_path, max_steps=2).fit(model)


def test_egn_with_batch_callback_keeps_training_step(tmp_path: Path) -> None:
    # The user writes lightning_soaa.EGN in configure_optimizers, unchanged training_step.
    from lightning_soaa.lightning import EGN

    class UsesEGN(PlainRegressor):
        def configure_optimizers(self) -> Any:
            return EGN(self, loss="mse", lr=0.5)

    model = UsesEGN()
    trainer = make_trainer(tmp_path, max_steps=6, callbacks=[BatchToOptimizer()])
    trainer.fit(model)
    assert trainer.optimizers[0].statistics()["steps"] == 6.0
    assert model.losses[-1] < model.losses[0]


@pytest.mark.parametrize("setting,match", [
    ({"gradient_clip_val": 1.0}, "gradient_clip_val=1.0"),
    ({"precision": "bf16-mixed"}, "precision='bf16-mixed'"),
])
def test_egn_refuses_trainer_settings_it_would_ignore(tmp_path: Path, setting: dict, match: str) -> None:
    """Gradient clipping and mixed precision (EGN never reads p.grad, runs its own forwards) used to
    train on silently; now fit() raises before any step."""
    pytest.importorskip("lightning_soaa.optim.egn")
    from lightning_soaa.lightning import EGN

    class UsesEGN(PlainRegressor):
        def configure_optimizers(self) -> Any:
            return EGN(self, loss="mse", lr=0.5)

    model = UsesEGN()
    w0 = [p.detach().clone() for p in model.parameters()]
    trainer = make_trainer(tmp_path, max_steps=4, callbacks=[BatchToOptimizer()], **setting)
    with pytest.raises(ValueError, match=match):
        trainer.fit(model)
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))  # no step was taken


def _egn_params_after(tmp_path: Path, batch_size: int, steps: int, **trainer_kw: Any) -> list[torch.Tensor]:
    from lightning_soaa.lightning import EGN

    class UsesEGN(PlainRegressor):
        def configure_optimizers(self) -> Any:
            return EGN(self, loss="mse", lr=0.5, damping=0.3, momentum=0.5)

    model = UsesEGN(batch_size=batch_size)
    trainer = make_trainer(tmp_path, max_steps=steps, callbacks=[BatchToOptimizer()], **trainer_kw)
    trainer.fit(model)
    assert trainer.optimizers[0].statistics()["batch_size"] == 8.0
    return [p.detach().clone() for p in model.parameters()]


def test_egn_under_gradient_accumulation_uses_every_micro_batch(tmp_path: Path) -> None:
    """accumulate_grad_batches=2 with batches of 4 is EGN's exact step on the batches of 8 they make
    (before, the Gram matrix came from the last micro-batch only)."""
    pytest.importorskip("lightning_soaa.optim.egn")
    ref = _egn_params_after(tmp_path / "ref", 8, 3)
    got = _egn_params_after(tmp_path / "acc", 4, 3, accumulate_grad_batches=2)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _fit_with_diagnostics(tmp_path: Path, max_steps: int, log_every_n_steps: int) -> list[dict[str, str]]:
    """SOAA on the tiny regressor with the diagnostics callback; the CSV logger's rows."""
    model = TinyRegressor(OptimizerFactory("SOAA", {"lr": 0.01}))
    logger = CSVLogger(str(tmp_path), name="diag", version=0)
    trainer = make_trainer(tmp_path, max_steps=max_steps, logger=logger, log_every_n_steps=log_every_n_steps,
                           callbacks=[LossToOptimizer(), OptimizerDiagnostics()])
    trainer.fit(model)
    with open(tmp_path / "diag" / "version_0" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_diagnostics_in_csv_logger(tmp_path: Path) -> None:
    rows = _fit_with_diagnostics(tmp_path, 5, 1)
    for key in ("SOAA/d", "SOAA/rho", "SOAA/accepted", "SOAA/steps", "SOAA/lr", "SOAA/ownership_balance"):
        values = [r[key] for r in rows if r.get(key)]
        assert values, f"{key} missing from the CSV log (columns: {sorted(rows[0])})"
    assert [float(r["SOAA/steps"]) for r in rows if r.get("SOAA/steps")] == [1.0, 2.0, 3.0, 4.0, 5.0]
    # the sharding layout is fixed for the fit: once, not in every row
    for key in ("SOAA/world_size", "SOAA/owned_blocks", "SOAA/ownership_balance"):
        assert [float(r[key]) for r in rows if r.get(key)] in ([1.0], [4.0]), key


def test_diagnostics_only_at_the_logging_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With log_every_n_steps=3 the statistics are collected at the steps whose values reach the logger
    (Lightning drops the others), and every one of those reaches it."""
    calls: list[int] = []
    collect = OptimizerDiagnostics.collect

    def counted(self: OptimizerDiagnostics, trainer: Any) -> dict[str, float]:
        calls.append(trainer.global_step)
        return collect(self, trainer)
    monkeypatch.setattr(OptimizerDiagnostics, "collect", counted)
    logged = [float(r["SOAA/steps"]) for r in _fit_with_diagnostics(tmp_path, 9, 3) if r.get("SOAA/steps")]
    assert logged == [3.0, 6.0, 9.0] and calls == [3, 6, 9], (logged, calls)


def test_optimizer_name_is_the_registry_name_behind_any_wrapper() -> None:
    """One name per optimizer in the logs: AdamW (not ShardedAdamW), and the optimizer a DeepSpeed client
    wraps (not DeepSpeedClientOptimizer)."""
    from lightning_soaa.lightning.callbacks import optimizer_name

    module = PlainRegressor()
    assert optimizer_name(ShardedAdamW(module.parameters())) == "AdamW"
    assert optimizer_name(torch.optim.SGD(module.parameters(), lr=0.1)) == "SGD"
    ds_client = pytest.importorskip("deepspeed_ext.client")
    soaa = pytest.importorskip("lightning_soaa.optim.soaa")
    client = ds_client.DeepSpeedClientOptimizer(list(module.parameters()), soaa.SOAA, {"lr": 1e-3},
                                                zero_stage=0)
    assert optimizer_name(client) == "SOAA"


def test_diagnostics_rejects_bad_interval() -> None:
    with pytest.raises(ValueError, match="every_n_steps=0"):
        OptimizerDiagnostics(every_n_steps=0)


def test_callbacks_and_attached_module_pickle() -> None:
    for cb in (LossToOptimizer(), BatchToOptimizer(), OptimizerDiagnostics(every_n_steps=2)):
        clone = pickle.loads(pickle.dumps(cb))
        assert type(clone) is type(cb) and clone.__dict__.keys() == cb.__dict__.keys()
    module = attach_optimizer(PlainRegressor(), OptimizerFactory("ShardedAdamW", {"lr": 0.1}))
    clone = pickle.loads(pickle.dumps(module))
    opt = clone.configure_optimizers()
    assert isinstance(opt, ShardedAdamW) and opt.param_groups[0]["lr"] == 0.1
    # the clone's optimizer holds the clone's parameters, not the original's
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in clone.parameters()}


def test_factory_names_and_first_argument() -> None:
    assert resolve_optimizer_class("ShardedAdamW") is ShardedAdamW
    assert resolve_optimizer_class("torch.optim.AdamW") is torch.optim.AdamW
    listed = r"Unknown optimizer .*lightning_soaa\.SOAA.*lightning_soaa\.EGN"
    bad_names = ("lightning_soaa.Nope", "SOAAA", "torch.optim.Adamm", "os.path", "lightning_soaa.config.check_range")
    for bad in bad_names:
        with pytest.raises(ValueError, match=listed):
            resolve_optimizer_class(bad)
    module = PlainRegressor()
    torch_opt = OptimizerFactory("torch.optim.SGD", {"lr": 0.1}).build(module)
    assert isinstance(torch_opt, torch.optim.SGD)
    ours = OptimizerFactory("ShardedAdamW").build(module)
    assert ours.param_groups[0]["param_names"] == [n for n, _ in module.named_parameters()]


def test_check_sharding_detects_optimizer_built_too_early(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_soaa.distributed.comm import LocalComm

    early = ShardedAdamW(PlainRegressor().parameters())  # no process group yet: joins at its first step
    forced = ShardedAdamW(PlainRegressor().parameters(), comm=LocalComm())  # explicitly single-process
    assert early.join_pending and not forced.join_pending
    check_sharding_matches_world(early)  # fine while torch.distributed is not running
    check_sharding_matches_world(forced)
    # undone inside the test: the autouse teardown asks torch.distributed whether a group is left over
    with monkeypatch.context() as m:
        m.setattr(torch.distributed, "is_initialized", lambda: True)
        m.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
        check_sharding_matches_world(early)  # will join (real two-rank test: tests/conformance/test_misuse.py)
        with pytest.raises(RuntimeError, match="comm=LocalComm"):
            check_sharding_matches_world(forced)


def test_soaa_sees_the_mean_loss_under_gradient_accumulation(tmp_path: Path) -> None:
    model = TinyRegressor(OptimizerFactory("SOAA", {"lr": 0.01}), batch_size=4)
    trainer = make_trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, callbacks=[LossToOptimizer()])
    trainer.fit(model)
    expected = sum(model.losses[2:4]) / 2
    assert trainer.optimizers[0].statistics()["loss"] == pytest.approx(expected, rel=1e-9)
