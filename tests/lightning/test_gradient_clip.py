"""How Lightning's clip is found and taken over when an optimizer averages the ranks' gradients itself
(``grad_reduction="mean"``, devices=2; DDP's own averaging is switched off by a communication hook that returns
each rank's gradient, registered at fit start: Lightning registers ``ddp_comm_hook`` on CUDA only), float64, against
the one-process run. The guarantee itself (``gradient_clip_val``, ``configure_gradient_clipping``, a manual
``self.clip_gradients``, by norm and by value, at W = 1 and 2, for every registered optimizer) lives in the
conformance battery (tests/conformance/test_lightning_clip.py). Here, with AdamW (the route is the base class's,
the same for every optimizer): the precision plugins and closures of other shapes (one that runs the closure before
``step()`` included), the refusals of a clip the step cannot take over (made without ``clip_gradients``, on some
ranks only, twice), a step of the user's own, copies of the plugin, the manual clips
of skipped steps, and the clip of an optimizer of ours that Lightning does not run."""

import copy
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import DoublePrecision

from lightning_soaa.lightning import LossToOptimizer, OptimizerFactory
from tests.lightning.helpers import RankRecorder, TinyRegressor, load_records, make_trainer, regression_data

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(300)]

CLIP = 0.3


def _local_gradients(state: object, bucket: torch.distributed.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP communication hook that leaves each rank its own gradient (no averaging)."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


class _NoAveraging(pl.Callback):
    """Each rank keeps its own gradient (what the optimizer's ``grad_reduction="mean"`` is for)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.model.register_comm_hook(None, _local_gradients)


def _fit(tmp: Path, devices: int, module: type[TinyRegressor] = TinyRegressor,
         callbacks: tuple[pl.Callback, ...] = (), **trainer_kw: Any) -> list[dict[str, Any]]:
    model = module(OptimizerFactory("lightning_soaa.AdamW", {"lr": 0.05, "grad_reduction": "mean"}),
                   batch_size=8 // devices)
    extra = [_NoAveraging()] if devices > 1 else []
    trainer = make_trainer(tmp, devices=devices, max_steps=4,
                           callbacks=[LossToOptimizer(), RankRecorder(tmp), *extra, *callbacks], **trainer_kw)
    trainer.fit(model)
    return load_records(tmp, "", devices)


class _OwnPrecision(DoublePrecision):
    """A precision plugin of the user's own (a module outside Lightning's) that keeps Lightning's closure."""


def test_gradient_clip_val_under_a_precision_plugin_of_the_users_own(tmp_path: Path) -> None:
    """Lightning's closure comes from a subclass of its precision plugin defined outside Lightning: still taken
    over (it was recognised by the plugin class's own module: Lightning clipped each rank's own gradient,
    silently 0.1 off the one-process run)."""
    ref = _fit(tmp_path / "one", 1, gradient_clip_val=CLIP)[0]["params"]
    for rec in _fit(tmp_path / "two", 2, gradient_clip_val=CLIP, precision=None, plugins=[_OwnPrecision()]):
        torch.testing.assert_close(rec["params"], ref, rtol=1e-10, atol=1e-12)


class _OwnClosurePrecision(DoublePrecision):
    """A precision plugin whose ``optimizer_step`` hands ``step()`` a closure of its own around Lightning's (as a
    Lightning release that changes the closure's shape would)."""

    def optimizer_step(self, optimizer: Any, model: Any, closure: Any, **kwargs: Any) -> Any:
        def run() -> Any:
            return self._wrap_closure(model, optimizer, closure)
        return optimizer.step(closure=run, **kwargs)


def test_gradient_clip_val_under_a_closure_of_another_shape(tmp_path: Path) -> None:
    """Recognised by the Trainer that runs the step, not by the closure's shape: it was missed, and Lightning
    clipped each rank's own gradient, silently (0.1 off the one-process run)."""
    ref = _fit(tmp_path / "one", 1, gradient_clip_val=CLIP)[0]["params"]
    for rec in _fit(tmp_path / "two", 2, gradient_clip_val=CLIP, precision=None,
                    plugins=[_OwnClosurePrecision()]):
        torch.testing.assert_close(rec["params"], ref, rtol=1e-10, atol=1e-12)


class _ClipsByItself(TinyRegressor):
    """Clips with torch in its own ``configure_gradient_clipping``: a clip the step never sees."""

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)


def test_configure_gradient_clipping_that_clips_by_itself_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"gradient_clip_val=0.3.*its configure_gradient_clipping changed the "
                                        r"gradient in place without self.clip_gradients.*Pass max_grad_norm"):
        _fit(tmp_path, 2, module=_ClipsByItself, gradient_clip_val=CLIP)


class _ClosureBeforeStep(DoublePrecision):
    """Runs the closure, and with it Lightning's clip, before ``step()`` (as Lightning's GradScaler path does)."""

    def optimizer_step(self, optimizer: Any, model: Any, closure: Any, **kwargs: Any) -> Any:
        result = closure()
        self._after_closure(model, optimizer)
        optimizer.step(**kwargs)
        return result


def test_a_clip_before_step_acts_on_the_averaged_gradient(tmp_path: Path) -> None:
    """Lightning clipped each rank's own gradient before the step, which went on without a word; then (turn 52) it
    was refused. The clip is kept for the step, which takes the very gradient it clipped: equal to one process."""
    ref = _fit(tmp_path / "one", 1, gradient_clip_val=CLIP)[0]["params"]
    for rec in _fit(tmp_path / "two", 2, gradient_clip_val=CLIP, precision=None, plugins=[_ClosureBeforeStep()]):
        torch.testing.assert_close(rec["params"], ref, rtol=1e-10, atol=1e-12)


class _ClipsOnRankZero(TinyRegressor):
    """Clips through ``self.clip_gradients`` on rank 0 only, from the second step on."""

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        if self.global_rank == 0 and self.global_step >= 1:
            self.clip_gradients(optimizer, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")


def test_a_clip_on_some_ranks_only_is_refused_on_every_rank(tmp_path: Path) -> None:
    """Rank 0 clipped its own gradient and the step went on, silently; taken over on rank 0 alone, rank 0 met in
    the clip's all-reduce and rank 1 in the record's."""
    with pytest.raises(Exception, match=r"hyperparameters.*differ.*clip_gradients bounded this step's gradient "
                                        r"norm by 0.3 on rank 0, None on rank 1"):
        _fit(tmp_path, 2, module=_ClipsOnRankZero)


class _ClipsTwice(TinyRegressor):
    """Clips through ``self.clip_gradients`` twice in one step."""

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        for bound in (CLIP, 2 * CLIP):
            self.clip_gradients(optimizer, gradient_clip_val=bound, gradient_clip_algorithm="norm")


def test_two_clips_in_one_step_are_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"clipped ShardedAdamW's gradients twice in one step.*0.3, then 0.6"):
        _fit(tmp_path, 2, module=_ClipsTwice)


class _ManualTwoOptimizers(TinyRegressor):
    """Manual optimization with Lightning's recipe, ``self.clip_gradients(opt, ...)`` after ``manual_backward``:
    the first layer with the optimizer under test (``grad_reduction="mean"``), the last with torch's SGD, whose
    gradients the module averages itself (DDP's averaging is off in these runs); both clipped."""

    def __init__(self, factory: OptimizerFactory, batch_size: int = 8) -> None:
        super().__init__(factory, batch_size=batch_size)
        self.automatic_optimization = False

    def configure_optimizers(self) -> Any:
        assert self.factory is not None
        ours = self.factory(self.net[0])
        return [ours, torch.optim.SGD(self.net[2].parameters(), lr=0.1)]

    def _backward(self, batch: Any) -> tuple[Any, Any, torch.Tensor]:
        """(ours, sgd, loss): both optimizers' gradients zeroed, then the batch's loss and its backward."""
        ours, sgd = self.optimizers()
        ours.zero_grad()
        sgd.zero_grad()
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.manual_backward(loss)
        return ours, sgd, loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ours, sgd, loss = self._backward(batch)
        if self.trainer.world_size > 1:
            for p in self.net[2].parameters():
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.trainer.world_size
        self.clip_gradients(ours, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")
        self.clip_gradients(sgd, gradient_clip_val=CLIP / 3, gradient_clip_algorithm="norm")
        ours.step()
        sgd.step()
        return loss


class _StepsByItself(pl.Callback):
    """At the end of the epoch takes one more step of its own, on a batch of its own (each rank its half):
    Lightning clips nothing there, whatever gradient_clip_val says."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        x, y = regression_data().tensors
        rows = slice(4 * trainer.global_rank, 4 * (trainer.global_rank + 1)) if trainer.world_size > 1 else slice(8)
        opt = trainer.optimizers[0]
        opt.zero_grad()
        F.mse_loss(pl_module(x[rows]), y[rows]).backward()
        opt.step()


def test_a_step_of_the_users_own_under_the_trainer_is_not_refused(tmp_path: Path) -> None:
    """A step that Lightning's loop did not make (a callback's opt.step()) was refused with gradient_clip_val set,
    saying that Lightning had run its clip before step(): Lightning clips nothing there. Now it steps unclipped,
    as in one process."""
    recs = []
    for devices in (1, 2):
        model = TinyRegressor(OptimizerFactory("lightning_soaa.AdamW", {"lr": 0.05, "grad_reduction": "mean"}),
                              batch_size=8 // devices)
        out = tmp_path / str(devices)
        extra = [_NoAveraging()] if devices > 1 else []
        trainer = make_trainer(out, devices=devices, max_epochs=1, max_steps=-1, gradient_clip_val=CLIP,
                               callbacks=[_StepsByItself(), RankRecorder(out), *extra])
        trainer.fit(model)
        recs.append(load_records(out, "", devices))
    for rec in recs[1]:
        torch.testing.assert_close(rec["params"], recs[0][0]["params"], rtol=1e-10, atol=1e-12)


class _CopiesThePlugin(pl.Callback):
    """Pickles and deep-copies the Trainer's precision plugin in ``on_before_optimizer_step`` (inside the closure the
    step runs, while the plugin's ``clip_gradients`` is taken over; under manual optimization, while the plugin
    keeps the optimizer's clips): each copy clips through its own method."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        plugin = trainer.precision_plugin
        for copied in (pickle.loads(pickle.dumps(plugin)), copy.deepcopy(plugin)):
            for name in ("clip_gradients", "_clip_gradients", "backward"):  # (stood in for: lightning_clip.py)
                assert getattr(copied, name).__self__ is copied
                assert getattr(copied, name).__func__ is getattr(type(plugin), name)


@pytest.mark.parametrize("module", [TinyRegressor, _ManualTwoOptimizers])
def test_the_precision_plugin_copies_while_the_clip_is_taken_over(module: type[TinyRegressor],
                                                                   tmp_path: Path) -> None:
    """The plugin's clip_gradients was a local function while the step ran the closure: a pickle of the plugin
    (or of what holds it) raised, and a deep copy clipped through the original plugin."""
    ref = _fit(tmp_path / "one", 1, module=module, gradient_clip_val=CLIP if module is TinyRegressor else None)
    for rec in _fit(tmp_path / "two", 2, module=module, callbacks=(_CopiesThePlugin(),),
                    gradient_clip_val=CLIP if module is TinyRegressor else None):
        torch.testing.assert_close(rec["params"], ref[0]["params"], rtol=1e-10, atol=1e-12)


class _ManualSkips(_ManualTwoOptimizers):
    """Lightning's recipe, but the second iteration clips and then skips its step (``zero_grad()`` at the next
    one, no ``step()``), and the third steps without a clip: one process clipped a gradient that no step took."""

    clips_at_the_third = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ours, _, loss = self._backward(batch)
        if batch_idx != 2 or self.clips_at_the_third:
            self.clip_gradients(ours, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")
        if batch_idx != 1:
            ours.step()
        return loss


class _ManualSkipsThenClips(_ManualSkips):
    """As :class:`_ManualSkips`, the third iteration clipping before its step (one clip per step taken)."""

    clips_at_the_third = True


class _ManualClipsInTheClosure(_ManualTwoOptimizers):
    """Manual optimization with a closure that clips after its backward: ``opt.step(closure=...)``."""

    clips_in_the_closure = True

    def training_step(self, batch: Any, batch_idx: int) -> None:
        ours = self.optimizers()[0]
        x, y = batch

        def closure() -> torch.Tensor:
            ours.zero_grad()
            loss = F.mse_loss(self(x), y)
            self.manual_backward(loss)
            if self.clips_in_the_closure:
                self.clip_gradients(ours, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")
            return loss

        if not self.clips_in_the_closure:
            closure()
            self.clip_gradients(ours, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")
        ours.step(closure=closure)


class _ManualClipsThenRecomputes(_ManualClipsInTheClosure):
    """Clips after its backward, then steps with a closure that computes the gradient again (``zero_grad``, a
    backward) without clipping it: the step takes a gradient no clip touched."""

    clips_in_the_closure = False


@pytest.mark.parametrize("module", [_ManualSkips, _ManualSkipsThenClips, _ManualClipsInTheClosure,
                                    _ManualClipsThenRecomputes])
def test_manual_optimization_clips_the_step_they_were_made_for(module: type[TinyRegressor], tmp_path: Path) -> None:
    """A kept clip was applied at the optimizer's next step, whichever: a skipped step's clip clipped the next
    step, silently (or was refused with that step's own clip as 'clipped twice'), and a clip made in the step's
    closure clipped the next step instead of its own, silently; a clip before a step whose closure computes the
    gradient again clipped that new gradient, silently. A clip now applies to the gradient it clipped."""
    ref = _fit(tmp_path / "one", 1, module=module)[0]["params"]
    for rec in _fit(tmp_path / "two", 2, module=module):
        torch.testing.assert_close(rec["params"], ref, rtol=1e-10, atol=1e-12)


class _ManualOwnOptimizer(_ManualTwoOptimizers):
    """The last layer's optimizer is one of ours built with the module and never handed to Lightning: the
    ``training_step`` zeroes, clips (``self.clip_gradients``) and steps it itself, beside the one Lightning runs."""

    def __init__(self, factory: OptimizerFactory, batch_size: int = 8) -> None:
        super().__init__(factory, batch_size=batch_size)
        self.own = factory(self.net[2])

    def configure_optimizers(self) -> Any:
        assert self.factory is not None
        return self.factory(self.net[0])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ours = self.optimizers()
        ours.zero_grad()
        self.own.zero_grad()
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.manual_backward(loss)
        self.clip_gradients(ours, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")
        self.clip_gradients(self.own, gradient_clip_val=CLIP / 3, gradient_clip_algorithm="norm")
        ours.step()
        self.own.step()
        return loss


def test_a_clip_of_an_optimizer_lightning_does_not_run_is_taken_over(tmp_path: Path) -> None:
    """An optimizer of ours that the Trainer does not run (not returned by configure_optimizers) was registered at its
    first step only: its first clip clipped each rank's own gradient, silently. The precision plugin, which keeps the
    clips of the optimizer Lightning runs, now keeps that one's clips too."""
    ref = _fit(tmp_path / "one", 1, module=_ManualOwnOptimizer)[0]["params"]
    for rec in _fit(tmp_path / "two", 2, module=_ManualOwnOptimizer):
        torch.testing.assert_close(rec["params"], ref, rtol=1e-10, atol=1e-12)


class _OnlyOwnOfOurs(_ManualOwnOptimizer):
    """As :class:`_ManualOwnOptimizer`, but the Trainer runs torch's SGD alone (at lr=0: the first layer stays as
    built, so its gradient, clipped by Lightning per rank, is never averaged): no optimizer of ours is built under the
    Trainer or wrapped by Lightning before ``own``'s first clip."""

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.net[0].parameters(), lr=0.0)


def test_a_clip_of_ours_in_a_trainer_that_runs_none_of_ours_is_taken_over(tmp_path: Path) -> None:
    """An optimizer of ours built before the Trainer and never handed to Lightning, beside a Trainer that runs
    torch's SGD only, was registered at its first step: its first clip clipped each rank's own gradient, silently.
    Its zero_grad under the Trainer (Lightning's recipe zeroes before the clip) now keeps its clips from then on."""
    ref = _fit(tmp_path / "one", 1, module=_OnlyOwnOfOurs)[0]["params"]
    for rec in _fit(tmp_path / "two", 2, module=_OnlyOwnOfOurs):
        torch.testing.assert_close(rec["params"], ref, rtol=1e-10, atol=1e-12)


class _ManualBackwardAfterTheClip(_ManualTwoOptimizers):
    """Clips after the first half batch's backward and then adds the second half's gradient before the step."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        ours = self.optimizers()[0]
        ours.zero_grad()
        x, y = batch
        self.manual_backward(F.mse_loss(self(x[:2]), y[:2]))
        self.clip_gradients(ours, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")
        self.manual_backward(F.mse_loss(self(x[2:]), y[2:]))
        ours.step()


def test_a_manual_clip_before_another_backward_is_refused(tmp_path: Path) -> None:
    """One process clips the first part of the gradient only, which the step cannot do on the averaged gradient:
    the step clipped the whole averaged gradient, silently."""
    with pytest.raises(Exception, match="its gradient changed after the clip and before step"):
        _fit(tmp_path, 2, module=_ManualBackwardAfterTheClip)


class _ManualClips(_ManualTwoOptimizers):
    """Lightning's manual recipe for the optimizer under test alone (torch's SGD steps unclipped)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ours, sgd, loss = self._backward(batch)
        self.clip_gradients(ours, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")
        ours.step()
        sgd.step()
        return loss


@pytest.mark.parametrize("module", [TinyRegressor, _ManualClips])
def test_a_clip_under_a_grad_scaler_is_left_to_lightnings_refusal(module: type[TinyRegressor], tmp_path: Path) -> None:
    """Under a GradScaler ("16-mixed" with a scaler) one process clips the scaled gradient under manual optimization
    and Lightning refuses any clip of an optimizer that unscales in step(): the stand-in passes the clip to Lightning,
    which refuses it on every rank (taken over, it would have clipped the unscaled, averaged gradient)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    with pytest.raises(Exception, match=r"does not allow for gradient clipping"):
        _fit(tmp_path, 2, module=module, precision=None, plugins=[plugin],
             gradient_clip_val=CLIP if module is TinyRegressor else None)
