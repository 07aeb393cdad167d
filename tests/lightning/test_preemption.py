"""PreemptionCheckpoint: a signal that reaches one rank stops every rank after the same optimizer step,
with one complete checkpoint written together (never from inside the signal handler); and an optimizer of
ours warns when Lightning's own SLURM handler, which checkpoints inside the handler, is installed.

The signal is real (``os.kill`` of the rank's own process); SLURM's part (``scancel --signal``, the
requeue and the restart that resumes exactly) runs on the test cluster in tests/multinode/test_launchers.py.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.utilities import CombinedLoader

from lightning_soaa.lightning import LossToOptimizer, OptimizerFactory, PreemptionCheckpoint
from tests.conformance._battery import assert_close
from tests.harness.distributed import run_distributed
from tests.lightning.helpers import N_SAMPLES, RankRecorder, TinyRegressor, load_records, make_trainer, regression_data

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(240)]

SIGNAL_BEFORE_STEP = 3  # the signal arrives before this (1-based) step; every rank stops after it


class SignalAt(pl.Callback):
    """Sends the signal to this rank's own process before step ``SIGNAL_BEFORE_STEP``, on ``rank`` only."""

    def __init__(self, rank: int | None, signum: int = signal.SIGUSR1) -> None:
        self.rank = rank
        self.signum = signum

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step == SIGNAL_BEFORE_STEP - 1 and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signum)


class CountingPreemption(PreemptionCheckpoint):
    """Also writes, per rank, how the ranks agreed: the callback's own all-reduces (Lightning's
    ``reduce_boolean_decision``) and the step all-reduces of ours that carried the vote."""

    def __init__(self, out: Path) -> None:
        super().__init__(signum=signal.SIGUSR1)
        self.out = str(out)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.own = 0
        decide = trainer.strategy.reduce_boolean_decision

        def counted(*args: Any, **kwargs: Any) -> bool:
            self.own += 1
            return decide(*args, **kwargs)

        trainer.strategy.reduce_boolean_decision = counted  # type: ignore[method-assign]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._vote is not None
        torch.save({"own": self.own, "rounds": self._vote.rounds},
                   Path(self.out) / f"vote-rank{trainer.global_rank}.pt")


def _factory(torch_adamw: bool) -> OptimizerFactory:
    if torch_adamw:
        return OptimizerFactory("torch.optim.AdamW", {"lr": 1e-2})
    return OptimizerFactory("lightning_soaa.SOAA", {"lr": 1e-2})


def _preempted_fit(tmp_path: Path, devices: int, torch_adamw: bool = False) -> pl.Trainer:
    callbacks = [LossToOptimizer(), CountingPreemption(tmp_path),
                 SignalAt(rank=1 if devices > 1 else None), RankRecorder(tmp_path, "pre-")]
    trainer = make_trainer(tmp_path, devices=devices, max_steps=8, callbacks=callbacks)
    trainer.fit(TinyRegressor(_factory(torch_adamw), batch_size=16 // devices))
    return trainer


def _reference(tmp_path: Path, steps: int) -> dict[str, Any]:
    """One process on the global batch, stopped after ``steps`` and saved by Lightning outside any handler."""
    trainer = make_trainer(tmp_path, max_steps=steps, callbacks=[LossToOptimizer()])
    trainer.fit(TinyRegressor(_factory(False), batch_size=16))
    trainer.save_checkpoint(tmp_path / "reference.ckpt")
    return torch.load(tmp_path / "reference.ckpt", weights_only=False)


@pytest.mark.parametrize("torch_adamw", [False, True], ids=["soaa", "torch-adamw"])
def test_signal_on_one_rank_stops_every_rank_with_one_checkpoint(tmp_path: Path, torch_adamw: bool) -> None:
    """W = 2 under DDP: the signal reaches rank 1 only. SOAA carries the vote in its step all-reduce;
    torch's AdamW (nothing of ours steps) takes the callback's own all-reduce."""
    _preempted_fit(tmp_path, devices=2, torch_adamw=torch_adamw)
    records = load_records(tmp_path, "pre-", 2)
    assert [r["global_step"] for r in records] == [SIGNAL_BEFORE_STEP] * 2
    saved = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".ckpt" or "partial" in p.name)
    assert saved == ["hpc_ckpt_1.ckpt"], saved  # complete, renamed; nothing left half-written
    ckpt = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=False)
    assert ckpt["global_step"] == SIGNAL_BEFORE_STEP
    params = torch.cat([v.reshape(-1) for v in ckpt["state_dict"].values()])
    torch.testing.assert_close(params, records[0]["params"], rtol=0, atol=0)
    votes = [torch.load(tmp_path / f"vote-rank{r}.pt") for r in range(2)]
    # SOAA: carried by each step's all-reduce, no collective of the callback's own; torch's AdamW: one each
    expected = {"own": SIGNAL_BEFORE_STEP, "rounds": 0} if torch_adamw else {"own": 0, "rounds": SIGNAL_BEFORE_STEP}
    assert votes == [expected, expected]
    if not torch_adamw:  # the whole state at that step: as one process saves it after the same steps
        ref = _reference(tmp_path / "ref", SIGNAL_BEFORE_STEP)
        assert_close(ckpt["optimizer_states"][0], ref["optimizer_states"][0], "optimizer state")
        assert_close(list(ckpt["state_dict"].values()), list(ref["state_dict"].values()), "parameters")


def test_one_process_stops_after_the_step_and_restores_the_handler(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGUSR1)
    trainer = _preempted_fit(tmp_path, devices=1)
    assert trainer.global_step == SIGNAL_BEFORE_STEP
    assert next(c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)).preempted
    assert signal.getsignal(signal.SIGUSR1) == before  # the fit's handler is gone with the fit
    ckpt = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=False)
    assert ckpt["global_step"] == SIGNAL_BEFORE_STEP
    # resumable by Lightning's own "hpc" path (where a SLURM restart looks by itself)
    resumed = make_trainer(tmp_path, max_steps=SIGNAL_BEFORE_STEP + 2, callbacks=[LossToOptimizer()])
    resumed.fit(TinyRegressor(_factory(False), batch_size=16), ckpt_path="hpc")
    assert resumed.global_step == SIGNAL_BEFORE_STEP + 2


#: a rank that has not finished its fit by then prints its stack and exits: a hang fails the test, bounded
WATCHDOG_S = 90


def _users_sigterm_handler(signum: int, frame: Any) -> None:
    """The handler a user installed before the fit: the one every rank must have again after it."""


class Watchdog(pl.Callback):
    """Arms a per-rank watchdog in each rank (W > 1: ranks are processes of their own) that bounds a hang."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            faulthandler.cancel_dump_traceback_later()


class SigtermGuard(Watchdog):
    """A :class:`Watchdog` that also writes, at teardown (after the preemption callback's), whether the user's
    SIGTERM handler is installed again."""

    def __init__(self, out: Path) -> None:
        self.out = str(out)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        restored = signal.getsignal(signal.SIGTERM) is _users_sigterm_handler
        torch.save(restored, Path(self.out) / f"sigterm-handler-rank{trainer.global_rank}.pt")


class StepDataRegressor(TinyRegressor):
    """Takes step s's global batch of 16 from s (rank r its r-th part), not from the loader: a run resumed
    mid-epoch sees the same data as an uninterrupted one."""

    def __init__(self) -> None:
        super().__init__(OptimizerFactory("lightning_soaa.SOAA", {"lr": 1e-2}), batch_size=16)
        self.data = regression_data().tensors

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        n = 16 // self.trainer.world_size
        start = (16 * self.trainer.global_step + n * self.trainer.global_rank) % N_SAMPLES
        return super().training_step(tuple(t[start:start + n] for t in self.data), batch_idx)


def _sigterm_fit(out: Path, devices: int, steps: int, callbacks: list[Any], ckpt_path: str | None = None) -> None:
    trainer = make_trainer(out, devices=devices, max_steps=steps, callbacks=[LossToOptimizer(), *callbacks])
    trainer.fit(StepDataRegressor(), ckpt_path=ckpt_path)


@pytest.mark.parametrize("devices,rank", [(2, 1), (2, 0), (1, None)], ids=["W2-rank1", "W2-rank0", "W1"])
def test_sigterm_stops_every_rank_after_the_same_step_and_resumes_exactly(tmp_path: Path, devices: int,
                                                                          rank: int | None) -> None:
    """SIGTERM (Kubernetes, spot VMs, torchrun's agent) on one rank: Lightning always installs its own SIGTERM
    handler, which broadcasts inside the handler (the ranks hung, no checkpoint); the callback takes it back,
    every rank stops after the same step with one checkpoint, the user's handler is back after the fit, and
    the fit resumed from the checkpoint ends where an uninterrupted one does."""
    before = signal.signal(signal.SIGTERM, _users_sigterm_handler)  # W > 1: the forked ranks inherit it
    try:
        _sigterm_fit(tmp_path, devices, 6, [PreemptionCheckpoint(signum=signal.SIGTERM),
                                            SignalAt(rank, signal.SIGTERM), SigtermGuard(tmp_path),
                                            RankRecorder(tmp_path, "pre-")])
    finally:
        signal.signal(signal.SIGTERM, before)
    assert [r["global_step"] for r in load_records(tmp_path, "pre-", devices)] == [SIGNAL_BEFORE_STEP] * devices
    assert all(torch.load(tmp_path / f"sigterm-handler-rank{r}.pt") for r in range(devices))
    saved = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".ckpt" or "partial" in p.name)
    assert saved == ["hpc_ckpt_1.ckpt"], saved
    assert torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"] == SIGNAL_BEFORE_STEP

    _sigterm_fit(tmp_path, devices, 6, [RankRecorder(tmp_path, "resumed-")], ckpt_path="hpc")
    _sigterm_fit(tmp_path / "full", devices, 6, [RankRecorder(tmp_path, "full-")])
    resumed, full = load_records(tmp_path, "resumed-", devices), load_records(tmp_path, "full-", devices)
    for r in range(devices):
        assert resumed[r]["global_step"] == full[r]["global_step"] == 6
        torch.testing.assert_close(resumed[r]["params"], full[r]["params"], rtol=0, atol=1e-12)


class _Fails(TinyRegressor):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 1:
            raise RuntimeError("the user's step failed")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("name", ["SIGUSR1", "SIGTERM"])
def test_a_fit_that_raises_gives_the_signal_back(tmp_path: Path, name: str) -> None:
    """Lightning calls no teardown hook after an exception and restores the handlers it found at the start
    of the fit (the callback's): the one installed before the fit must be back, and receive the signal."""
    signum = getattr(signal, name)
    got: list[int] = []
    before = signal.signal(signum, lambda signum, frame: got.append(signum))
    try:
        cb = PreemptionCheckpoint(signum=signum)
        trainer = make_trainer(tmp_path, max_steps=4, callbacks=[LossToOptimizer(), cb])
        with pytest.raises(RuntimeError, match="the user's step failed"):
            trainer.fit(_Fails(_factory(False), batch_size=16))
        os.kill(os.getpid(), signum)
        assert got == [signum]
        assert "register_signal_handlers" not in vars(trainer._signal_connector)  # Lightning's own again
    finally:
        signal.signal(signum, before)


def test_inactive_without_a_signal_to_watch(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGUSR1)
    cb = PreemptionCheckpoint()  # outside SLURM auto-requeue and no signum: nothing installed
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[LossToOptimizer(), cb])
    trainer.fit(TinyRegressor(_factory(False), batch_size=16))
    assert trainer.global_step == 2 and not cb.preempted
    assert signal.getsignal(signal.SIGUSR1) == before
    assert not list(tmp_path.glob("hpc_ckpt_*"))


@pytest.mark.parametrize("signum", ["SIGUSR1", 0, -3, True, 1.5])
def test_signum_refused(signum: Any) -> None:
    value = getattr(signal, signum) if isinstance(signum, str) else signum
    if isinstance(signum, str):
        PreemptionCheckpoint(signum=value)
        return
    with pytest.raises(ValueError, match=r"signum=.*not a signal"):
        PreemptionCheckpoint(signum=value)


def _step_under_lightnings_handler(rank: int, world: int) -> list[str]:
    from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose, _SignalConnector

    from lightning_soaa import ShardedAdamW

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("lightning_soaa").addHandler(Keep())
    # what Lightning installs under SLURM auto-requeue (its handler is never called here)
    signal.signal(signal.SIGUSR1, _HandlersCompose([_SignalConnector(None)._slurm_sigusr_handler_fn]))  # type: ignore[arg-type]
    model = torch.nn.Linear(4, 3)
    opt = ShardedAdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model.weight.grad, model.bias.grad = torch.ones_like(model.weight), torch.ones_like(model.bias)
        opt.step()
    return [m for m in records if "PreemptionCheckpoint" in m]


def test_optimizer_warns_under_lightnings_in_handler_checkpoint(tmp_path: Path) -> None:
    for warned in run_distributed(_step_under_lightnings_handler, 2, tmp_path):
        assert len(warned) == 1, warned  # once, at the first W > 1 step
        assert "inside its handler of signal" in warned[0]


class _PlateauRegressor(TinyRegressor):
    def configure_optimizers(self) -> Any:
        opt = super().configure_optimizers()
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "train_loss",
                                                   "interval": getattr(self, "interval", "epoch")}}

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_a_plateau_scheduler_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture, interval: str) -> None:
    """Found by hunters: Lightning skips a per-epoch ReduceLROnPlateau's update at the end of the epoch a fit
    resumes in from a mid-epoch checkpoint; a per-step one misses the validation due at the saved step (its
    update: one behind, 1.7e-2 off). So a preempted run resumed with another lr, silently."""
    cb = PreemptionCheckpoint(signum=signal.SIGUSR1)
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[LossToOptimizer(), cb])
    model = _PlateauRegressor(_factory(False), batch_size=16)
    model.interval = interval
    with caplog.at_level(logging.WARNING, logger="lightning_soaa.lightning.preemption"):
        trainer.fit(model)
    assert f"a plateau scheduler (ReduceLROnPlateau, interval '{interval}') is configured" in caplog.text


class _SlowIO(TorchCheckpointIO):
    """A writer on slow storage (NFS, an object store): each checkpoint takes a second to land."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        time.sleep(1.0)
        super().save_checkpoint(checkpoint, path, storage_options)


def test_an_async_checkpoint_writer_is_waited_for_and_a_stale_partial_is_not_renamed(tmp_path: Path) -> None:
    """Found by a hunter: under Lightning's AsyncCheckpointIO save_checkpoint returns before the file exists,
    so the rename on rank 0 failed (no checkpoint for the requeued job), or renamed the partial file an earlier
    run left (silently that run's step)."""
    stale = tmp_path / ".lightning_soaa_preemption.partial"
    torch.save({"global_step": 999}, stale)  # an earlier run's leftover
    cb = PreemptionCheckpoint(signum=signal.SIGUSR1)
    trainer = make_trainer(tmp_path, max_steps=8, callbacks=[LossToOptimizer(), cb, SignalAt(rank=None)],
                           plugins=[AsyncCheckpointIO(_SlowIO())])
    trainer.fit(TinyRegressor(_factory(False), batch_size=16))
    assert cb.preempted and trainer.global_step == SIGNAL_BEFORE_STEP
    ckpt = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=False)
    assert ckpt["global_step"] == SIGNAL_BEFORE_STEP
    assert not stale.exists()


class _FourWriters(AsyncCheckpointIO):
    """An AsyncCheckpointIO of more than one writer thread: a no-op queued behind the write ran beside it."""

    def _ensure_setup(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=4)


def test_an_async_writer_of_several_threads_is_waited_for_and_a_stale_partial_directory_removed(
        tmp_path: Path) -> None:
    """Reviewer: with four writer threads the rename ran before the file existed (FileNotFoundError on rank 0
    alone, no checkpoint); a partial directory an earlier run left (strategies that save directories) made
    the removal raise on rank 0 alone, before the save's collectives."""
    stale = tmp_path / ".lightning_soaa_preemption.partial"
    (stale / "checkpoint").mkdir(parents=True)
    cb = PreemptionCheckpoint(signum=signal.SIGUSR1)
    trainer = make_trainer(tmp_path, max_steps=8, callbacks=[LossToOptimizer(), cb, SignalAt(rank=None)],
                           plugins=[_FourWriters(_SlowIO())])
    trainer.fit(TinyRegressor(_factory(False), batch_size=16))
    assert cb.preempted and trainer.global_step == SIGNAL_BEFORE_STEP
    assert torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"] == SIGNAL_BEFORE_STEP
    assert not stale.exists()

class _SigtermAfterTraining(pl.Callback):
    """SIGTERM after the last optimizer step (the fit's final validation, on_train_end): no step follows."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_after_the_last_step_reaches_the_users_handler(tmp_path: Path) -> None:
    """No step is left to stop after: the termination request must not be swallowed (Lightning alone calls
    the user's handler and stops; the default action ends the process): it goes to the handler the fit
    found, once, after the fit."""
    got: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        cb = PreemptionCheckpoint(signum=signal.SIGTERM)
        trainer = make_trainer(tmp_path, max_steps=3, callbacks=[LossToOptimizer(), cb, _SigtermAfterTraining()])
        trainer.fit(TinyRegressor(_factory(False), batch_size=16))
        assert trainer.global_step == 3 and not cb.preempted
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)


class _ManualPlateauRegressor(_PlateauRegressor):
    """Manual optimization: Lightning steps no scheduler; the user's code steps the plateau (a resume does too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        opt = self.optimizers()
        opt.zero_grad()  # type: ignore[union-attr]
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        opt.step()  # type: ignore[union-attr]
        return loss

    def on_train_epoch_end(self) -> None:
        self.lr_schedulers().step(self.trainer.callback_metrics["train_loss"])  # type: ignore[union-attr]


class _CustomPlateau:
    """A plateau scheduler not derived from torch's, declared to Lightning with ``reduce_on_plateau``."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def step(self, metrics: Any = None) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class _CustomPlateauRegressor(_PlateauRegressor):
    def configure_optimizers(self) -> Any:
        opt = TinyRegressor.configure_optimizers(self)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": _CustomPlateau(opt), "monitor": "train_loss",
                                                   "interval": "epoch", "reduce_on_plateau": True}}

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:  # Lightning's hook for a custom scheduler
        scheduler.step(metric)


@pytest.mark.parametrize("model,warned", [(_ManualPlateauRegressor, False), (_CustomPlateauRegressor, True)],
                         ids=["manual-optimization", "custom-plateau"])
def test_the_plateau_warning_follows_lightnings_own_update(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                          model: type, warned: bool) -> None:
    """Lightning skips the update only where it steps the scheduler itself (automatic optimization), and it
    treats as a plateau scheduler whatever is configured ``reduce_on_plateau``."""
    cb = PreemptionCheckpoint(signum=signal.SIGUSR1)
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[LossToOptimizer(), cb])
    with caplog.at_level(logging.WARNING, logger="lightning_soaa.lightning.preemption"):
        trainer.fit(model(_factory(False), batch_size=16))
    assert ("a plateau scheduler (ReduceLROnPlateau" in caplog.text) == warned, caplog.text


class _ForeignWrap:
    """Another library's wrap of the signal connector's registration, installed before the callbacks'."""

    def __init__(self, connector: Any) -> None:
        self.inner = connector.register_signal_handlers
        self.calls = 0
        connector.register_signal_handlers = self

    def __call__(self) -> None:
        self.calls += 1
        self.inner()


def _assert_released(trainer: pl.Trainer, foreign: _ForeignWrap, calls: int) -> None:
    """The connector holds exactly what it held before the callbacks (the library's wrap, called once per
    registration) and SIGTERM has the user's handler again."""
    assert vars(trainer._signal_connector)["register_signal_handlers"] is foreign
    assert foreign.calls == calls
    assert signal.getsignal(signal.SIGTERM) is _users_sigterm_handler


@pytest.mark.parametrize("first", [0, 1], ids=["released-in-install-order", "released-in-reverse-order"])
def test_two_callbacks_release_in_either_order(tmp_path: Path, first: int) -> None:
    """Gap found by a read-through: a release popped whatever wrap the connector held (the other callback's,
    another library's beneath). Two callbacks and a library's wrap on one trainer, through Lightning's own
    registration: releasing either callback leaves the other's take-over working, and releasing both leaves
    the library's wrap and the user's handler."""
    before = signal.signal(signal.SIGTERM, _users_sigterm_handler)
    try:
        cbs = [PreemptionCheckpoint(signum=signal.SIGTERM), PreemptionCheckpoint(signum=signal.SIGTERM)]
        trainer = make_trainer(tmp_path, callbacks=[LossToOptimizer(), *cbs])
        model = TinyRegressor(_factory(False), batch_size=16)
        connector = trainer._signal_connector
        foreign = _ForeignWrap(connector)
        for cb in cbs:  # as Trainer._run calls them: the callbacks' order
            cb.setup(trainer, model, "fit")
        connector.register_signal_handlers()  # Lightning's registration, through every wrap
        assert signal.getsignal(signal.SIGTERM) == cbs[1]._handler  # the last take-over
        cbs[first].teardown(trainer, model, "fit")
        connector.register_signal_handlers()
        assert signal.getsignal(signal.SIGTERM) == cbs[1 - first]._handler  # the other still takes it back
        cbs[1 - first].teardown(trainer, model, "fit")
        _assert_released(trainer, foreign, calls=2)
        connector.register_signal_handlers()  # Lightning's alone now, composed with the user's handler
        parts = signal.getsignal(signal.SIGTERM).signal_handlers  # type: ignore[union-attr]
        assert _users_sigterm_handler in parts and not any(getattr(h, "__self__", None) in cbs for h in parts)
        connector.teardown()
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("n", [1, 2], ids=["one-callback", "two-callbacks"])
def test_fit_twice_on_one_trainer_installs_and_releases_each_time(tmp_path: Path, n: int) -> None:
    """fit, then fit again on the same trainer: each fit takes SIGTERM back and gives it back, and another
    library's wrap of the registration outlives both (the first release popped it: the second fit ran
    without it)."""
    before = signal.signal(signal.SIGTERM, _users_sigterm_handler)
    try:
        cbs = [PreemptionCheckpoint(signum=signal.SIGTERM) for _ in range(n)]
        trainer = make_trainer(tmp_path, max_steps=2,
                               callbacks=[LossToOptimizer(), *cbs, SignalAt(None, signal.SIGTERM)])
        foreign = _ForeignWrap(trainer._signal_connector)
        model = TinyRegressor(_factory(False), batch_size=16)
        trainer.fit(model)  # steps 1 and 2, no signal
        assert trainer.global_step == 2 and not any(cb.preempted for cb in cbs)
        _assert_released(trainer, foreign, calls=1)
        trainer.fit_loop.epoch_loop.max_steps = 8
        trainer.fit(model)  # SIGTERM before step 3: stopped after it by the callback whose handler took it
        assert trainer.global_step == SIGNAL_BEFORE_STEP
        assert [cb.preempted for cb in cbs] == [False] * (n - 1) + [True]
        _assert_released(trainer, foreign, calls=2)
        assert torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"] == SIGNAL_BEFORE_STEP
    finally:
        signal.signal(signal.SIGTERM, before)


#: where _recording_sigterm_handler writes (set before the stage; forked ranks inherit it)
_HANDLER_LOG: list[Path] = []


def _recording_sigterm_handler(signum: int, frame: Any) -> None:
    """A user's SIGTERM handler that records the call, per rank, and returns (keeps the process)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with open(_HANDLER_LOG[0] / f"user-handler-rank{rank}", "a") as f:
        f.write(f"{signum}\n")


class _Evaluated(TinyRegressor):
    """validate/test/predict over ``n`` samples in batches of ``eval_batch``; with ``shares``, rank r takes the
    r-th share of them itself (for a trainer without Lightning's distributed sampler)."""

    def __init__(self, n: int = N_SAMPLES, eval_batch: int = 4, shares: tuple[int, ...] | None = None) -> None:
        super().__init__(_factory(False), batch_size=16)
        self.n, self.eval_batch, self.shares = n, eval_batch, shares
        self.allow_zero_length_dataloader_with_multiple_devices = True  # a share may be empty: Lightning allows it

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self(batch[0]), batch[1])

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.validation_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(batch[0])

    def _loader(self) -> torch.utils.data.DataLoader:
        start, stop = 0, self.n
        if self.shares is not None:
            rank = self.trainer.global_rank
            start, stop = sum(self.shares[:rank]), sum(self.shares[:rank + 1])
        subset = torch.utils.data.Subset(regression_data(), range(start, stop))
        return torch.utils.data.DataLoader(subset, batch_size=self.eval_batch)

    val_dataloader = test_dataloader = predict_dataloader = _loader


class SigtermInStage(Watchdog):
    """SIGTERM to this rank's own process before batch ``at`` of the stage (on ``rank``; None: every rank);
    writes, per rank, the last batch that ended; a per-rank watchdog bounds a hang (W > 1)."""

    def __init__(self, out: Path, at: int | None, rank: int | None) -> None:
        self.out, self.at, self.rank = str(out), at, rank

    def _start(self, trainer: pl.Trainer, batch_idx: int) -> None:
        if batch_idx == self.at and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), signal.SIGTERM)

    def _end(self, trainer: pl.Trainer, batch_idx: int) -> None:
        (Path(self.out) / f"last-batch-rank{trainer.global_rank}").write_text(str(batch_idx))

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._start(trainer, batch_idx)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._end(trainer, batch_idx)

    on_test_batch_start = on_predict_batch_start = on_validation_batch_start
    on_test_batch_end = on_predict_batch_end = on_validation_batch_end


def _stage_records(out: Path, world: int) -> tuple[list[int], list[int]]:
    """(last batch that ended, calls of the user's handler), per rank."""
    last = [int((out / f"last-batch-rank{r}").read_text()) for r in range(world)]
    calls = [len((out / f"user-handler-rank{r}").read_text().split()) if (out / f"user-handler-rank{r}").exists()
             else 0 for r in range(world)]
    return last, calls


@pytest.mark.parametrize("rank,users_handler", [(1, True), (0, True), (1, False)],
                         ids=["rank1-users-handler", "rank0-users-handler", "rank1-default-action"])
def test_sigterm_during_validate_ends_every_rank_after_the_same_batch(tmp_path: Path, rank: int,
                                                                     users_handler: bool) -> None:
    """trainer.validate at W = 2, SIGTERM on one rank. Lightning's own handler broadcast inside the handler:
    that broadcast met the other rank's end of the stage, both ranks failed on "Connection closed by peer"
    and the user's handler was never called. Now every rank ends after the same batch: the user's handler
    is called on each, then Lightning's SIGTERMException stops them (exit status 143); without one, the
    default action ends every rank."""
    _HANDLER_LOG[:] = [tmp_path]
    before = signal.signal(signal.SIGTERM, _recording_sigterm_handler if users_handler else signal.SIG_DFL)
    try:
        trainer = make_trainer(tmp_path, devices=2, callbacks=[SigtermInStage(tmp_path, 2, rank),
                                                               PreemptionCheckpoint(signum=signal.SIGTERM)])
        with pytest.raises(torch.multiprocessing.ProcessExitedException) as ended:
            trainer.validate(_Evaluated())
    finally:
        signal.signal(signal.SIGTERM, before)
    if users_handler:
        assert ended.value.exit_code == 128 + signal.SIGTERM, ended.value
    else:
        assert ended.value.signal_name == "SIGTERM", ended.value
    last, calls = _stage_records(tmp_path, 2)
    # of 8 batches per rank: the round after batch 2 (the signal's) is read after batch 3, on both
    assert last == [3, 3]
    assert calls == ([1, 1] if users_handler else [0, 0])


@pytest.mark.parametrize("stage,n", [("test", 1), ("predict", 1), ("validate", 2)],
                         ids=["test", "predict", "validate-two-callbacks"])
def test_sigterm_during_test_or_predict_stops_the_stage_after_the_users_handler(tmp_path: Path, stage: str,
                                                                               n: int) -> None:
    """W = 1: the user's handler is called once and the stage stops after the batch with SIGTERMException,
    exit status 143 (Lightning's stopped test with status 0, a success to a scheduler, and never stopped a
    predict: it ran to its end). With two callbacks, the signal reaches the user's handler, not the other
    callback's."""
    _HANDLER_LOG[:] = [tmp_path]
    before = signal.signal(signal.SIGTERM, _recording_sigterm_handler)
    try:
        cbs = [PreemptionCheckpoint(signum=signal.SIGTERM) for _ in range(n)]
        trainer = make_trainer(tmp_path, callbacks=[SigtermInStage(tmp_path, 2, None), *cbs])
        with pytest.raises(SystemExit) as ended:
            getattr(trainer, stage)(_Evaluated())
        assert signal.getsignal(signal.SIGTERM) is _recording_sigterm_handler
    finally:
        signal.signal(signal.SIGTERM, before)
    assert ended.value.code == 128 + signal.SIGTERM
    assert _stage_records(tmp_path, 1) == ([2], [1])


def test_predict_with_unequal_shares_ends_together(tmp_path: Path) -> None:
    """predict at W = 2 gives the ranks unequal shares (Lightning's UnrepeatedDistributedSampler): 9 samples
    in batches of 2 are 3 batches on rank 0, 2 on rank 1; a user's own split can leave a rank none. The
    per-batch agreement must not hang there; and a SIGTERM on rank 1 at its last batch ends rank 0 after the
    same round (read after its batch 2: rank 1 has none), the user's handler called on both."""
    _HANDLER_LOG[:] = [tmp_path]
    before = signal.signal(signal.SIGTERM, _recording_sigterm_handler)
    try:
        for shares in (None, (3, 0)):
            trainer = make_trainer(tmp_path, devices=2, use_distributed_sampler=shares is None,
                                   callbacks=[SigtermInStage(tmp_path, None, None),
                                              PreemptionCheckpoint(signum=signal.SIGTERM)])
            trainer.predict(_Evaluated(n=9, eval_batch=2, shares=shares), return_predictions=False)
        assert not list(tmp_path.glob("user-handler-*"))
        trainer = make_trainer(tmp_path, devices=2, callbacks=[SigtermInStage(tmp_path, 1, 1),
                                                               PreemptionCheckpoint(signum=signal.SIGTERM)])
        with pytest.raises(torch.multiprocessing.ProcessExitedException) as ended:
            trainer.predict(_Evaluated(n=9, eval_batch=2), return_predictions=False)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert ended.value.exit_code == 128 + signal.SIGTERM, ended.value
    assert _stage_records(tmp_path, 2) == ([2, 1], [1, 1])


class _IterStepLogged(_Evaluated):
    """A validation_step that takes ``dataloader_iter`` (it fetches its batch itself) and logs an epoch metric
    with ``sync_dist`` (one reduce per rank at the end of the stage)."""

    def validation_step(self, dataloader_iter: Any) -> torch.Tensor:  # type: ignore[override]
        batch, _, _ = next(dataloader_iter)
        loss = torch.nn.functional.mse_loss(self(batch[0]), batch[1])
        self.log("val_loss", loss, sync_dist=True, batch_size=len(batch[0]))
        return loss


def test_dataloader_iter_steps_with_unequal_shares_end_together(tmp_path: Path) -> None:
    """validate at W = 2 with a dataloader_iter step, 3 batches on rank 0 and 1 on rank 1 (Lightning alone
    ends it). The step fetches its batch after Lightning set is_last_batch, so rank 1 did not know its batch
    was its last: it went on to the epoch end's sync_dist reduce while rank 0 ran the callback's rounds (a
    hang until the watchdog)."""
    trainer = make_trainer(tmp_path, devices=2, use_distributed_sampler=False,
                           callbacks=[Watchdog(), PreemptionCheckpoint(signum=signal.SIGTERM)])
    results = trainer.validate(_IterStepLogged(eval_batch=4, shares=(12, 4)), verbose=False)
    assert "val_loss" in results[0]


class _UnsizedShare(torch.utils.data.IterableDataset):
    """Rank r's share (``shares[r]`` samples) of the regression data, without ``__len__``: Lightning cannot tell
    a rank's last batch before the loader ends."""

    def __init__(self, shares: tuple[int, ...]) -> None:
        self.shares = shares

    def __iter__(self) -> Any:
        data, rank = regression_data(), torch.distributed.get_rank()
        yield from (data[i] for i in range(sum(self.shares[:rank]), sum(self.shares[:rank + 1])))


class _IterStepUnsized(_IterStepLogged):
    """dataloader_iter steps over :class:`_UnsizedShare`; each stage's epoch end all-gathers the batches every
    rank ran (the collective the rank done first meets while the others still run rounds), written by rank 0."""

    def __init__(self, out: Path, shares: tuple[int, ...]) -> None:
        super().__init__(shares=shares)
        self.out, self.seen = str(out), 0

    def _loader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(_UnsizedShare(self.shares), batch_size=self.eval_batch)

    val_dataloader = test_dataloader = predict_dataloader = _loader

    def validation_step(self, dataloader_iter: Any) -> torch.Tensor:  # type: ignore[override]
        self.seen += 1  # the step that meets the loader's end counts too: the gather says it ran on each rank
        return super().validation_step(dataloader_iter)

    def test_step(self, dataloader_iter: Any) -> torch.Tensor:  # type: ignore[override]
        return self.validation_step(dataloader_iter)

    def predict_step(self, dataloader_iter: Any) -> torch.Tensor:  # type: ignore[override]
        self.seen += 1
        batch, _, _ = next(dataloader_iter)
        return self(batch[0])

    def _gather_seen(self) -> None:
        seen = self.all_gather(torch.tensor(self.seen)).tolist()
        if self.trainer.is_global_zero:
            (Path(self.out) / "seen").write_text(str(seen))

    on_validation_epoch_end = on_test_epoch_end = on_predict_epoch_end = _gather_seen


@pytest.mark.parametrize("stage,shares", [("validate", (12, 4)), ("test", (4, 12)), ("predict", (12, 4))])
def test_dataloader_iter_steps_over_an_unsized_loader_with_unequal_shares_end_together(
        tmp_path: Path, stage: str, shares: tuple[int, int]) -> None:
    """W = 2 (gloo), a dataloader_iter step over an IterableDataset without __len__, 3 batches on one rank and
    1 on the other (plain Lightning ends each stage). The rank done first could not know its batch was its
    last (it said "more" in that round), then met the loader's end inside its step, with no hook after it
    before the epoch end: it went on to the sync_dist reduce / the all_gather while the other rank waited in
    the callback's round (a hang until the watchdog, in validate, test and predict). Now it answers the rounds
    at the loader's end."""
    trainer = make_trainer(tmp_path, devices=2, use_distributed_sampler=False,
                           callbacks=[Watchdog(), PreemptionCheckpoint(signum=signal.SIGTERM)])
    if stage == "predict":
        trainer.predict(_IterStepUnsized(tmp_path, shares), return_predictions=False)
    else:
        results = getattr(trainer, stage)(_IterStepUnsized(tmp_path, shares), verbose=False)
        assert "val_loss" in results[0]
    # the batches each rank ran, and the step that found its loader's end
    assert (tmp_path / "seen").read_text() == str([s // 4 + 1 for s in shares])


def _validate_under_sigterm(tmp_path: Path, signal_at: pl.Callback, module: pl.LightningModule) -> None:
    """W = 2 validate with the user's recording SIGTERM handler and ``signal_at`` sending the signal: every rank
    exits with status 143."""
    _HANDLER_LOG[:] = [tmp_path]
    before = signal.signal(signal.SIGTERM, _recording_sigterm_handler)
    try:
        trainer = make_trainer(tmp_path, devices=2, use_distributed_sampler=False,
                               callbacks=[signal_at, PreemptionCheckpoint(signum=signal.SIGTERM)])
        with pytest.raises(torch.multiprocessing.ProcessExitedException) as ended:
            trainer.validate(module, verbose=False)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert ended.value.exit_code == 128 + signal.SIGTERM, ended.value


def test_a_sigterm_reaches_a_rank_whose_unsized_loader_ended(tmp_path: Path) -> None:
    """As above (validate, 3 batches on rank 0, 1 on rank 1), SIGTERM on rank 0 before its batch 1: rank 1, whose
    loader ended inside its step 1, learns it in the round it answers there; both ranks end after that round
    (rank 0 after its batch 2), the user's handler called on both, then exit status 143."""
    _validate_under_sigterm(tmp_path, SigtermInStage(tmp_path, 1, 0), _IterStepUnsized(tmp_path, (12, 4)))
    assert _stage_records(tmp_path, 2) == ([2, 0], [1, 1])


class _TwoAStep(_IterStepUnsized):
    """dataloader_iter steps over a SIZED share (Lightning's own ``done``) taking two batches a step: the step
    after a rank's odd last batch fetches past it and raises StopIteration, with no hook after it."""

    def _loader(self) -> torch.utils.data.DataLoader:
        return _Evaluated._loader(self)

    val_dataloader = _loader

    def validation_step(self, dataloader_iter: Any) -> torch.Tensor:  # type: ignore[override]
        self.seen += 1
        for _ in range(2):
            loss = _IterStepLogged.validation_step(self, dataloader_iter)
        return loss


def test_dataloader_iter_steps_that_fetch_past_a_sized_loaders_end_end_together(tmp_path: Path) -> None:
    """W = 2 (gloo), validate, a dataloader_iter step that takes two batches, a sized share of 4 batches on rank 0
    and 3 on rank 1 (plain Lightning ends). Rank 1's step 2 fetched its last batch, then its next() raised
    StopIteration at Lightning's ``done`` without asking the loader (where the loader's end answered the
    rounds): no hook after it, its last round said "more"; it went on to the all_gather while rank 0 waited in
    its round (a hang until the watchdog)."""
    trainer = make_trainer(tmp_path, devices=2, use_distributed_sampler=False,
                           callbacks=[Watchdog(), PreemptionCheckpoint(signum=signal.SIGTERM)])
    results = trainer.validate(_TwoAStep(tmp_path, (16, 12)), verbose=False)
    assert "val_loss" in results[0]
    assert (tmp_path / "seen").read_text() == str([2, 2])


class _BatchStepUnsized(_IterStepUnsized):
    """Batch-style steps over :class:`_UnsizedShare` (Lightning's prefetching fetcher)."""

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:  # type: ignore[override]
        self.seen += 1
        return torch.nn.functional.mse_loss(self(batch[0]), batch[1])

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:  # type: ignore[override]
        self.seen += 1
        return self(batch[0])


@pytest.mark.parametrize("stage", ["validate", "predict"])
def test_a_rank_whose_unsized_loader_has_no_batch_answers_the_rounds(tmp_path: Path, stage: str) -> None:
    """W = 2 (gloo), batch-style steps over a loader without __len__, 3 batches on rank 0 and none on rank 1 (plain
    Lightning ends). Lightning's prefetch met rank 1's loader end before the stage's hooks: no batch hook ran
    there, and it went on to the epoch end's all_gather while rank 0 waited in its first round (a hang until the
    watchdog). Now the loop's first fetch meets that end again and answers the rounds."""
    trainer = make_trainer(tmp_path, devices=2, use_distributed_sampler=False,
                           callbacks=[Watchdog(), PreemptionCheckpoint(signum=signal.SIGTERM)])
    if stage == "predict":
        trainer.predict(_BatchStepUnsized(tmp_path, (12, 0)), return_predictions=False)
    else:
        trainer.validate(_BatchStepUnsized(tmp_path, (12, 0)), verbose=False)
    assert (tmp_path / "seen").read_text() == str([3, 0])


class _TwoLoaders(_Evaluated):
    """validate over two loaders (Lightning's sequential CombinedLoader) with unequal shares per rank: rank r takes
    ``shares[k][r]`` samples of loader k, in batches of 4 (``sized``: a Subset, else one without ``__len__``). Each
    loader's loss is logged with ``sync_dist``: Lightning reduces it where the rank moves on to the next loader."""

    def __init__(self, shares: tuple[tuple[int, int], ...], sized: bool) -> None:
        super().__init__()
        self.loader_shares, self.sized = shares, sized

    def _loaders(self) -> list[torch.utils.data.DataLoader]:
        loaders, rank, offset = [], self.trainer.global_rank, 0
        for share in self.loader_shares:
            start = offset + sum(share[:rank])
            subset = torch.utils.data.Subset(regression_data(), range(start, start + share[rank]))
            data = subset if self.sized else _Unsized(subset)
            loaders.append(torch.utils.data.DataLoader(data, batch_size=self.eval_batch))
            offset += sum(share)
        return loaders

    val_dataloader = _loaders

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(self(batch[0]), batch[1])
        self.log("val_loss", loss, sync_dist=True, batch_size=len(batch[0]))
        return loss


class _TwoLoadersIterStep(_TwoLoaders):
    """:class:`_TwoLoaders` with a step that takes ``dataloader_iter``."""

    def validation_step(self, dataloader_iter: Any) -> torch.Tensor:  # type: ignore[override]
        batch, batch_idx, dataloader_idx = next(dataloader_iter)
        return super().validation_step(batch, batch_idx, dataloader_idx)


class _Unsized(torch.utils.data.IterableDataset):
    """A Subset without ``__len__``."""

    def __init__(self, subset: torch.utils.data.Subset) -> None:
        self.subset = subset

    def __iter__(self) -> Any:
        yield from (self.subset[i] for i in range(len(self.subset)))


@pytest.mark.parametrize("sized,step,limit", [(True, _TwoLoaders, None), (False, _TwoLoaders, None),
                                              (False, _TwoLoaders, 2), (True, _TwoLoadersIterStep, None),
                                              (False, _TwoLoadersIterStep, None)],
                         ids=["sized", "unsized", "unsized-limited", "sized-dataloader_iter",
                              "unsized-dataloader_iter"])
def test_two_loaders_with_unequal_shares_end_together_with_lightnings_results(tmp_path: Path, sized: bool,
                                                                                step: type[_TwoLoaders],
                                                                                limit: int | None) -> None:
    """W = 2 (gloo), validate over two loaders (sequential), 3 + 2 batches on rank 0 and 1 + 3 on rank 1 (plain
    Lightning ends, the results below). Rank 1 went on to loader 1 after its batch 0, where Lightning reduces
    loader 0's sync_dist loss, while rank 0 posted its round after batch 1: that reduce met the round (a hang
    until the watchdog, in each variant). Now a rank waits there, in rounds, until every rank is past loader 0.
    ``limit_val_batches=2`` over loaders without __len__ gives Lightning a length (2 + 2 on each rank) that is not
    rank 1's batches: the switch is seen at its fetch."""
    shares, kw = ((12, 4), (8, 12)), {} if limit is None else {"limit_val_batches": limit}
    plain = make_trainer(tmp_path, devices=2, use_distributed_sampler=False, callbacks=[Watchdog()], **kw)
    expected = plain.validate(step(shares, sized), verbose=False)
    trainer = make_trainer(tmp_path, devices=2, use_distributed_sampler=False,
                           callbacks=[Watchdog(), PreemptionCheckpoint(signum=signal.SIGTERM)], **kw)
    assert trainer.validate(step(shares, sized), verbose=False) == expected
    assert len(expected) == 2 and all(len(metrics) == 1 for metrics in expected)


def test_a_sigterm_reaches_a_rank_that_waits_at_a_loader_switch(tmp_path: Path) -> None:
    """As above (sized), SIGTERM on rank 1 before its only batch of loader 0: it waits there for rank 0 (batches 0-2
    of loader 0) and learns the signal in the round it waits in; rank 0 learns it after its batch 1, the same
    round. Both call the user's handler, then exit status 143. Before, rank 1 met Lightning's reduce of loader 0's
    loss with rank 0's round: rank 0 alone called the handler and ended, rank 1 was held in the reduce."""
    _validate_under_sigterm(tmp_path, SigtermInStage(tmp_path, 0, 1), _TwoLoaders(((12, 4), (8, 12)), sized=True))
    assert _stage_records(tmp_path, 2) == ([1, 0], [1, 1])


class _ThroughIter:
    """A mixin (first base): the module's validation step, taking ``dataloader_iter``."""

    def validation_step(self, dataloader_iter: Any) -> torch.Tensor:
        batch, batch_idx, dataloader_idx = next(dataloader_iter)
        return super().validation_step(batch, batch_idx, dataloader_idx)  # type: ignore[misc]


def _write_seen(module: Any) -> None:
    """The epoch end's collective: every rank's count of batches run, all-gathered, written by rank 0."""
    seen = module.all_gather(torch.tensor(module.seen)).tolist()
    if module.trainer.is_global_zero:
        (Path(module.out) / "seen").write_text(str(seen))


class _FirstLoaderLogged(_TwoLoaders):
    """:class:`_TwoLoaders` logging (sync_dist) in loader 0 only; loader 1's batches are counted and all-gathered at
    the epoch end (written by rank 0)."""

    def __init__(self, out: Path, shares: tuple[tuple[int, int], ...], sized: bool) -> None:
        super().__init__(shares, sized)
        self.out, self.seen = str(out), 0

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        self.seen += 1
        loss = torch.nn.functional.mse_loss(self(batch[0]), batch[1])
        if dataloader_idx == 0:
            self.log("val_loss", loss, sync_dist=True, batch_size=len(batch[0]))
        return loss

    def on_validation_epoch_end(self) -> None:
        _write_seen(self)


class _FirstLoaderLoggedIterStep(_ThroughIter, _FirstLoaderLogged):
    """:class:`_FirstLoaderLogged` with a step that takes ``dataloader_iter``."""


@pytest.mark.parametrize("sized,step", [(True, _FirstLoaderLogged), (False, _FirstLoaderLogged),
                                        (True, _FirstLoaderLoggedIterStep), (False, _FirstLoaderLoggedIterStep)],
                         ids=["sized", "unsized", "sized-dataloader_iter", "unsized-dataloader_iter"])
def test_a_rank_whose_later_loader_is_empty_meets_the_others_reduce(tmp_path: Path, sized: bool,
                                                                     step: type[_FirstLoaderLogged]) -> None:
    """W = 2 (gloo), validate over two loaders, 3 + 2 batches on rank 0 and 1 + 0 on rank 1, a sync_dist log in
    loader 0 only (plain Lightning ends: rank 1's reduce of loader 0's metrics after its last batch meets rank 0's
    at its switch to loader 1). Rank 1 answered rounds until every rank had no batch left, while rank 0 reduced
    loader 0's metrics at its switch: that reduce met rank 1's round (a hang until the watchdog, each variant). Now
    rank 1 waits only until every rank is past loader 0, and answers the rest from its epoch end."""
    shares = ((12, 4), (8, 0))
    plain = make_trainer(tmp_path, devices=2, use_distributed_sampler=False, callbacks=[Watchdog()])
    expected = plain.validate(step(tmp_path, shares, sized), verbose=False)
    assert (tmp_path / "seen").read_text() == "[5, 1]"
    (tmp_path / "seen").unlink()
    trainer = make_trainer(tmp_path, devices=2, use_distributed_sampler=False,
                           callbacks=[Watchdog(), PreemptionCheckpoint(signum=signal.SIGTERM)])
    assert trainer.validate(step(tmp_path, shares, sized), verbose=False) == expected
    assert (tmp_path / "seen").read_text() == "[5, 1]"


class _EmptyMinSize(_TwoLoaders):
    """A user's min_size CombinedLoader over :class:`_TwoLoaders`' loaders: a rank with an empty one has no batch
    (the CombinedLoader's length is 0 there; Lightning runs the stage's epoch hooks, no batch hook). The epoch end
    all-gathers the batches each rank ran (no sync_dist log: Lightning alone hangs on a metric one rank never
    logged), written by rank 0."""

    def __init__(self, out: Path, shares: tuple[tuple[int, int], ...]) -> None:
        super().__init__(shares, sized=True)
        self.out, self.seen = str(out), 0

    def _combined(self) -> CombinedLoader:
        return CombinedLoader(self._loaders(), "min_size")

    val_dataloader = _combined

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        self.seen += 1
        return sum(torch.nn.functional.mse_loss(self(x), y) for x, y in batch)  # type: ignore[return-value]

    def on_validation_epoch_end(self) -> None:
        _write_seen(self)


class _EmptyMinSizeIterStep(_ThroughIter, _EmptyMinSize):
    """:class:`_EmptyMinSize` with a step that takes ``dataloader_iter``."""


@pytest.mark.parametrize("step", [_EmptyMinSize, _EmptyMinSizeIterStep], ids=["batch", "dataloader_iter"])
def test_a_rank_whose_sized_combined_loader_is_empty_answers_the_rounds(tmp_path: Path,
                                                                        step: type[_EmptyMinSize]) -> None:
    """W = 2 (gloo), validate over a min_size CombinedLoader of two sized loaders, rank 1's second one empty: 2
    batches on rank 0, none on rank 1 (plain Lightning ends). Lightning's fetcher is ``done`` at once on rank 1 and
    its first fetch ends the loop without asking the loader, before any hook: rank 1 went on to the epoch end's
    all_gather while rank 0 waited in its first round (a hang until the watchdog, both steps). Now that first
    fetch answers the rounds (the step is not run there, as in Lightning)."""
    shares = ((12, 4), (8, 0))
    plain = make_trainer(tmp_path, devices=2, use_distributed_sampler=False, callbacks=[Watchdog()])
    plain.validate(step(tmp_path, shares), verbose=False)
    assert (tmp_path / "seen").read_text() == "[2, 0]"
    (tmp_path / "seen").unlink()
    trainer = make_trainer(tmp_path, devices=2, use_distributed_sampler=False,
                           callbacks=[Watchdog(), PreemptionCheckpoint(signum=signal.SIGTERM)])
    trainer.validate(step(tmp_path, shares), verbose=False)
    assert (tmp_path / "seen").read_text() == "[2, 0]"


class _SigtermAt(pl.Callback):
    """SIGTERM to this process before training step ``step``, or after the validation's batches (None)."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.step is None and not trainer.sanity_checking and trainer.state.fn == "validate":
            os.kill(os.getpid(), signal.SIGTERM)


def test_an_evaluation_after_a_preempted_fit_leaves_preempted_set(tmp_path: Path) -> None:
    """W = 1: ``preempted`` says the job is to be ended; a validate after the preempted fit reset it to False
    (work after the fit read it as not preempted). A SIGTERM after that validate's last batch still reaches
    the user's handler."""
    _HANDLER_LOG[:] = [tmp_path]
    before = signal.signal(signal.SIGTERM, _recording_sigterm_handler)
    try:
        callback = PreemptionCheckpoint(signum=signal.SIGTERM)
        model = _Evaluated()
        trainer = make_trainer(tmp_path, max_steps=6, callbacks=[LossToOptimizer(), callback, _SigtermAt(2)])
        trainer.fit(model)
        assert callback.preempted and trainer.global_step == 3
        trainer = make_trainer(tmp_path, callbacks=[callback, _SigtermAt(None)])
        trainer.validate(model, verbose=False)
        assert signal.getsignal(signal.SIGTERM) is _recording_sigterm_handler
    finally:
        signal.signal(signal.SIGTERM, before)
    assert callback.preempted
    assert (tmp_path / "user-handler-rank0").read_text().split() == ["15"]


class _ValidateAtFitEnd(pl.Callback):
    """Runs trainer.validate from the fit's own hooks (on_fit_end), as a final evaluation."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.validate(pl_module, verbose=False)


def test_a_validate_run_from_the_fit_s_hooks_leaves_the_fit_its_handler(tmp_path: Path) -> None:
    """W = 1, trainer.validate called in on_fit_end: its setup took the signal over again (the handler it found
    was the callback's own) and its teardown released the fit's: after the fit the callback's handler stayed
    installed and the next SIGTERM recursed in it (RecursionError), the user's handler never called."""
    _HANDLER_LOG[:] = [tmp_path]
    before = signal.signal(signal.SIGTERM, _recording_sigterm_handler)
    try:
        trainer = make_trainer(tmp_path, max_steps=2, callbacks=[LossToOptimizer(), _ValidateAtFitEnd(),
                                                                 PreemptionCheckpoint(signum=signal.SIGTERM)])
        trainer.fit(_Evaluated())
        assert signal.getsignal(signal.SIGTERM) is _recording_sigterm_handler
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert (tmp_path / "user-handler-rank0").read_text().split() == ["15"]



#: how long the failing rank's process lives on after its exception (a logger's upload, a caller's cleanup),
#: unless the other rank's stage ended before


class _RaisesOnOneRank(_Evaluated):
    """Rank ``failing_rank``'s step raises at batch 2 of the stage (of 8); the other rank goes on."""

    def __init__(self, failing_rank: int) -> None:
        super().__init__()
        self.failing_rank = failing_rank

    def _fail(self, batch_idx: int) -> None:
        if batch_idx == 2 and self.trainer.global_rank == self.failing_rank:
            raise RuntimeError("the user's step failed")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._fail(batch_idx)
        return super().validation_step(batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._fail(batch_idx)
        return super().test_step(batch, batch_idx)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        self._fail(batch_idx)
        return super().predict_step(batch, batch_idx, dataloader_idx)


class _RaisesBeforeAGather(_RaisesOnOneRank):
    """Every step all-gathers (as an FSDP/ZeRO-3 forward, a per-step ``sync_dist`` log, ``self.all_gather``);
    rank ``failing_rank``'s step raises at batch 2 before it."""

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().validation_step(batch, batch_idx)
        self.all_gather(loss.detach())
        return loss


def _validate_with_a_gather(rank: int, world: int, out: Path, failing_rank: int) -> tuple[str, float]:
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))  # the group exists already
    trainer = make_trainer(out, devices=world, strategy="ddp", callbacks=[PreemptionCheckpoint(signum=signal.SIGTERM)])
    start = time.monotonic()
    try:
        trainer.validate(_RaisesBeforeAGather(failing_rank), verbose=False)
        error = ""
    except RuntimeError as e:
        error = str(e)
    return error, time.monotonic() - start


def test_a_rank_that_raises_before_a_collective_of_the_step_is_not_held_in_its_exception(tmp_path: Path) -> None:
    """W = 2 (gloo): rank 1's step raises at batch 2 before the step's all-gather, which rank 0 enters. Rank 1's
    exception reaches its caller (its process then ends and rank 0's gather fails), as without the callback
    (0.1-0.2 s). A 'failed' round posted from on_exception (tried in turn 40) paired with rank 0's all-gather
    instead of a round: rank 1 waited for it in on_exception, rank 0 in the gather, both until the process
    group's timeout (and a user's all-reduce of the round's size was silently changed)."""
    results = run_distributed(_validate_with_a_gather, 2, tmp_path, tmp_path, 1, timeout=60)
    (own, took), (other, _) = results[1], results[0]
    assert own == "the user's step failed" and took < 10, (own, took)
    assert other, "rank 0 ended its stage without an error"
