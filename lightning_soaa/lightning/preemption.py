"""Preemption checkpoints at a step every rank agrees on: Lightning's SLURM auto-requeue, made safe.

Lightning's SLURM auto-requeue (``SLURMEnvironment(auto_requeue=True)``, the default under SLURM, with
``#SBATCH --signal=SIGUSR1@90``) saves its checkpoint *inside the signal handler*, at whatever point each
rank was interrupted. The checkpoint's collectives (Lightning's barrier; a sharded optimizer's
consolidation) then pair with whatever the other ranks are doing. Measured on the test SLURM cluster (two
ranks, gloo, a signal sent by ``scancel --signal=USR1`` during training): with SOAA the consolidation met
the step's all-reduce and both ranks aborted without a checkpoint; with torch's AdamW 2 of 3 runs hung
until SLURM killed them, without a checkpoint. Either way the run is lost.

:class:`PreemptionCheckpoint` takes the signal over before Lightning installs its handler (Lightning then
installs none for it; SIGTERM, for which Lightning always installs its own, one that broadcasts inside the
handler, is taken back right after Lightning registered its handlers): the handler only records the request
(:class:`~lightning_soaa.distributed.stop_vote.StopVote`), every rank learns it after the same optimizer step
(carried by our optimizers' step all-reduce, or one small all-reduce per step where no optimizer of ours
spans the world), and then every rank saves the checkpoint together, at a step boundary, where Lightning's
own SLURM restart finds it (``hpc_ckpt_N.ckpt`` in ``default_root_dir``; ``fit(ckpt_path="hpc")`` elsewhere).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loops.fetchers import _DataLoaderIterDataFetcher, _PrefetchDataFetcher
from lightning.pytorch.loops.prediction_loop import _PredictionLoop
from lightning.pytorch.plugins import AsyncCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_soaa.distributed.stop_vote import StopVote
from lightning_soaa.lightning.factory import iter_wrapped
from lightning_soaa.lightning.stage_rounds import DONE, Outcome, StageRounds
from lightning_soaa.optim.base import ShardedOptimizer

__all__ = ["PreemptionCheckpoint"]

log = logging.getLogger(__name__)

# not named hpc_ckpt_*: Lightning's resume takes the highest hpc_ckpt_N in the folder, whatever it holds
_PARTIAL = ".lightning_soaa_preemption.partial"
_REGISTER = "register_signal_handlers"  # the signal connector's method that each callback wraps
_ABSENT = object()  # the connector had no attribute of its own by that name


def _ours(trainer: pl.Trainer) -> list[ShardedOptimizer]:
    """Our optimizers behind the trainer's (LightningOptimizer / DeepSpeed wrappers looked through)."""
    found: list[ShardedOptimizer] = []
    for opt in trainer.optimizers:
        inner = next((o for o in iter_wrapped(opt) if isinstance(o, ShardedOptimizer)), None)
        if inner is not None and all(inner is not f for f in found):
            found.append(inner)
    return found


def _job_id() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def _wait_for_writes(io: Any) -> None:
    """Return once every checkpoint write that ``io`` queued has ended. Lightning's ``AsyncCheckpointIO``
    (found by a hunter) writes on one background thread: ``save_checkpoint`` returned before the file existed,
    so the rename failed on rank 0 alone (no checkpoint for the requeued job), or renamed an earlier run's
    leftover (silently an older step). A task queued behind the writes on its single-thread executor runs
    after them (Lightning's own wait, ``teardown``, shuts the executor down; later saves of this fit need it)."""
    seen = 0
    while io is not None and seen < 8:  # a wrapper's checkpoint_io (AsyncCheckpointIO wraps one)
        executor = getattr(io, "_executor", None)
        if isinstance(executor, ThreadPoolExecutor) and isinstance(io, AsyncCheckpointIO):
            # a subclass may run more workers (a no-op then ran beside the write: the rename failed); its
            # _ensure_setup makes a new executor for a later save, as after Lightning's own teardown
            executor.shutdown(wait=True)
            io._executor = None
        elif isinstance(executor, ThreadPoolExecutor):
            executor.submit(lambda: None).result()
        error = getattr(io, "_error", None)
        if isinstance(error, BaseException):
            raise error
        io, seen = getattr(io, "checkpoint_io", None), seen + 1


def _fsync(name: str) -> None:
    fd = os.open(name, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_to_disk(path: str) -> None:
    """fsync a local checkpoint (a file, or every file of a directory the strategy wrote) before it is renamed into
    place: a rename is atomic against a killed process, but after a node's power loss the newest name could point
    at data the page cache never wrote (a truncated checkpoint that every requeued run fails to load). Remote
    filesystems (fsspec URLs) are left to their own guarantees."""
    if "://" in path or not os.path.exists(path):
        return
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    for name in files:
        _fsync(name)


def _sync_rename(path: str) -> None:
    """fsync the directory that a local checkpoint was renamed into (the rename itself). Some filesystems refuse
    a directory's fsync (EINVAL): the checkpoint is in place then, and raising here would skip the requeue."""
    if "://" not in path:
        try:
            _fsync(os.path.dirname(os.path.abspath(path)))
        except OSError as err:
            log.debug("PreemptionCheckpoint: the checkpoint directory's fsync failed (%s); the rename stands", err)


def _warn_plateau(trainer: pl.Trainer) -> None:
    """Say so where a plateau scheduler is configured: a fit resumed from this callback's checkpoint (written
    after an optimizer step, before the validation and the plateau update Lightning runs after it) misses an
    update. Per epoch, Lightning skips the update at the end of the epoch the fit resumes in (measured by a
    hunter: lr 0.005 or 0.01 for 0.0025); per step, the resume skips the validation due at the saved step and
    so its update (measured: one update behind, 1.7e-2 off)."""
    if not trainer.lightning_module.automatic_optimization:
        return  # Lightning steps no scheduler then: the user's code does, in the resumed epoch too
    for config in getattr(trainer, "lr_scheduler_configs", ()):
        # reduce_on_plateau: what Lightning treats as one (torch's, or a custom one declared so)
        if config.reduce_on_plateau:
            log.warning("PreemptionCheckpoint: a plateau scheduler (ReduceLROnPlateau, interval %r) is configured; "
                        "a fit resumed from a preemption checkpoint misses the update of the step or epoch it was "
                        "taken in (Lightning's resume skips that validation and, per epoch, that epoch's update), "
                        "so its lr can differ from an uninterrupted run's. Use another scheduler for an exact "
                        "resume.", config.interval)
            return


class _RegisterLink:
    """One callback's wrap of the signal connector's ``register_signal_handlers``: what was there (Lightning's
    method, or another wrapper), then the callback's take-over. Released links come out of the chain in any
    order: two callbacks on one trainer, or another library's wrapper below or above, keep their own (the
    old release popped whatever the connector held, the other callback's or the library's wrapper too)."""

    def __init__(self, inner: Callable[[], None], before: Any, take_over: Callable[[], None]) -> None:
        self.inner = inner  # what this link calls first
        self.before = before  # the connector's own attribute when this link was installed (_ABSENT: none)
        self.take_over: Callable[[], None] | None = take_over  # None once released: a plain pass-through

    def __call__(self) -> None:
        self.inner()
        if self.take_over is not None:
            self.take_over()

    @classmethod
    def install(cls, connector: Any, take_over: Callable[[], None]) -> _RegisterLink:
        link = cls(getattr(connector, _REGISTER), vars(connector).get(_REGISTER, _ABSENT), take_over)
        setattr(connector, _REGISTER, link)
        return link

    def release(self, connector: Any) -> None:
        """Out of the chain: the connector gets back what it had before this link, where this link is on top;
        under another of ours, that one is spliced past it; under a foreign wrapper (which will restore this
        link), it stays in place as a pass-through."""
        self.take_over = None
        top = vars(connector).get(_REGISTER, _ABSENT)
        if top is self:
            if self.before is _ABSENT:
                delattr(connector, _REGISTER)  # Lightning's own method again
            else:
                setattr(connector, _REGISTER, self.before)
            return
        node = top
        for _ in range(64):  # a chain of this length is a bug elsewhere: stop walking rather than spin
            if not isinstance(node, _RegisterLink) or node.inner is self:
                break
            node = node.inner
        if isinstance(node, _RegisterLink) and node.inner is self:
            node.inner, node.before = self.inner, self.before


class PreemptionCheckpoint(Callback):
    r"""On a preemption signal, every rank saves one checkpoint together at the next optimizer step, then
    the fit stops (and, under SLURM auto-requeue, rank 0 requeues the job).

    Args:
        signum: the signal to watch when the run is not under Lightning's SLURM auto-requeue (e.g.
            ``signal.SIGUSR1`` sent by a scheduler before it preempts); the checkpoint is then written and the
            fit stops, without requeue; resume with ``trainer.fit(model, ckpt_path="hpc")``. Under SLURM
            auto-requeue the environment's ``requeue_signal`` is watched and this argument is ignored.
            None (default): inactive outside SLURM auto-requeue. ``signal.SIGTERM`` (Kubernetes, spot VMs,
            torchrun's agent) works too: for the fit, Lightning's own SIGTERM handling (stop at the next batch,
            forward the signal to the ranks it launched) is replaced by this callback's; a SIGTERM that
            reaches one rank (e.g. rank 0 alone) stops every rank after the same step; one that
            arrives after the last training step goes to the handler installed before the fit, at its end.
            During ``validate``/``test``/``predict`` (nothing to checkpoint) a SIGTERM that reaches any rank
            ends the stage on every rank after the same batch: the signal goes there, on every rank, to the
            handler installed before the stage (the default action ends the process; a user's handler is
            called), and where that handler returns, the stage stops on every rank with Lightning's
            ``SIGTERMException`` (exit status 143). That agreement costs one small all-reduce per batch at
            W > 1, posted after a batch and read after the next one (its latency overlaps that batch: a
            SIGTERM during batch k ends the stage after batch k+1); a rank that runs out of batches first
            (``predict`` splits the data unevenly) answers the others' until they are done too; over several
            loaders of validate/test (a sequential CombinedLoader, Lightning's default for a list), a rank done
            with a loader first answers them there (Lightning reduces that loader's metrics). A rank whose
            stage raises leaves the others waiting in their next round until its process ends (or the process
            group's timeout): exit after the exception, as Lightning's launchers do.

    Under SLURM auto-requeue Lightning's restarted job resumes from the checkpoint by itself (``hpc_ckpt_N.
    ckpt`` in ``default_root_dir``, Lightning's own naming). The checkpoint is written under another name
    and renamed once complete, so a kill during the write leaves no truncated checkpoint for the restart to
    load. ``preempted`` is True after a fit this callback stopped: work after ``fit`` (a test run, a final
    export) should check it, since the job is about to be killed and requeued.

    The signal is acted on after the next optimizer step (in ``on_train_batch_end``): choose the signal's
    lead time (``--signal=SIGUSR1@90``) to cover a training step, any validation that may be running, and
    the write. Lightning keeps training past ``should_stop`` while ``min_steps``/``min_epochs`` are not
    reached (the requeue ends the job anyway). Under SLURM Lightning resumes from any ``hpc_ckpt_N.ckpt`` in
    ``default_root_dir``, also in a later job: give each job its own (e.g. one named after
    ``SLURM_JOB_ID``, which a requeue keeps). An exact resume from a checkpoint taken mid-epoch needs the data
    position restored too (a resumable dataloader, or data taken from the step's number); with a plain one
    Lightning starts the epoch's data again (it warns so), as for any mid-epoch checkpoint. ``preempted`` is
    set in the processes that trained: under ``ddp_spawn``/``ddp_fork`` the launching process's copy stays
    False (check for the checkpoint file there). A torch optimizer stepped past Lightning's wrapper in manual
    optimization moves no step count, so nothing is decided there: step it through ``self.optimizers()``.
    """

    def __init__(self, signum: int | None = None) -> None:
        if signum is not None and (isinstance(signum, bool) or not isinstance(signum, int)
                                   or signum not in signal.valid_signals()):
            raise ValueError(f"PreemptionCheckpoint: signum={signum!r} is not a signal of this platform "
                             "(pass e.g. signal.SIGUSR1, or None to act only under SLURM auto-requeue).")
        self.signum = signum
        self.preempted = False
        self._watching: int | None = None
        self._requeue = False
        self._previous: Any = None
        self._connector: Any = None  # Lightning's signal connector whose registration we wrapped
        self._link: _RegisterLink | None = None  # our wrap of it
        self._evaluating = False  # watching SIGTERM for validate/test/predict (not for a fit)
        self._joined = False  # this rank has answered every rank's agreement rounds of the stage
        self._group = 0  # the dataloader (of a sequential CombinedLoader) this rank's rounds are in
        self._owed = False  # past its last batch and its loaders' reduce: the others' rounds still to answer
        self._rounds: StageRounds | None = None  # those rounds (validate/test/predict)
        self._vote: StopVote | None = None
        self._last_step = -1
        self._rounds_seen = 0
        self._depth = 0  # stages of this trainer under way: a stage run from another's hooks nests (depth 2)

    def _handler(self, signum: int, frame: Any) -> None:
        # a signal handler runs between two bytecodes of whatever this rank was doing: record, nothing else
        if self._vote is not None:
            self._vote.request()
            return
        # the fit is over but this handler is still installed (something restored it): act as the one it replaced
        previous = _resolve(self._previous)
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)  # the default action, now that it is installed again

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._depth += 1
        if self._depth > 1:
            # trainer.validate/test run from the hooks of a stage under way (on_fit_end): that stage keeps the
            # signal, its vote and its own handler to give back (taken over again, they were lost: the user's
            # handler never came back and the next SIGTERM recursed in ours)
            return
        # setup runs before Trainer._run registers Lightning's handlers; finding ours installed for the
        # requeue signal, Lightning installs none for it (its _has_already_handler)
        # the environment Lightning's signal connector reads (a single-device strategy has none of its own)
        env = getattr(trainer.strategy, "cluster_environment", None) \
            or getattr(trainer._accelerator_connector, "cluster_environment", None)
        slurm = isinstance(env, SLURMEnvironment) and env.auto_requeue
        signum = env.requeue_signal if slurm else self.signum  # type: ignore[union-attr]
        # outside a fit only SIGTERM: Lightning's own handler for it broadcasts inside the handler in every stage
        if signum is None or (stage != "fit" and signum != signal.SIGTERM):
            return
        previous = signal.getsignal(signum)
        try:
            signal.signal(signum, self._handler)
        except ValueError:  # not the main thread: signals cannot be handled here
            log.warning("PreemptionCheckpoint: the Trainer runs outside the main thread, where no signal "
                        "handler can be installed; preemption checkpoints are off.")
            return
        if stage == "fit" and previous not in (None, signal.SIG_DFL, signal.SIG_IGN):  # outside one: passed on
            log.warning("PreemptionCheckpoint replaced the handler already installed for signal %d (%r) "
                        "for this fit.", int(signum), previous)
        self._watching, self._previous, self._requeue = int(signum), previous, slurm
        self._evaluating, self._joined, self._group, self._owed = stage != "fit", False, 0, False
        self._vote = StopVote(trainer.world_size)
        self._rounds = StageRounds(trainer.strategy, trainer.world_size) \
            if self._evaluating else None
        if stage == "fit":  # an evaluation after a preempted fit leaves it set: the job is still to be ended
            self.preempted = False
        self._last_step, self._rounds_seen = -1, 0
        if self._watching == signal.SIGTERM:
            self._take_over_after_registration(trainer)

    def _take_over_after_registration(self, trainer: pl.Trainer) -> None:
        """Lightning installs its own SIGTERM handler at every fit, ours composed after one that broadcasts
        inside the handler (and forwards the signal to the ranks it launched): that broadcast pairs with
        whatever collective another rank is in (measured: 2 gloo ranks hung, no checkpoint). Right after it
        registers (before its first barrier), ours alone takes the signal back: the vote then tells every
        rank, including those the signal did not reach."""
        connector = getattr(trainer, "_signal_connector", None)
        register = getattr(connector, "register_signal_handlers", None)
        if connector is None or register is None:
            return  # another Lightning: on_train_start takes it over (a later point, after Lightning's barrier)

        self._link = _RegisterLink.install(connector, self._take_over)
        self._connector = connector

    def _take_over(self) -> None:
        """Ours alone for the watched signal again, where Lightning composed ours into its own handler."""
        if self._watching is None:
            return
        current = signal.getsignal(self._watching)
        if current == self._handler:
            return
        if self._handler in getattr(current, "signal_handlers", ()):  # Lightning's _HandlersCompose, ours in it
            signal.signal(self._watching, self._handler)
        else:
            log.warning("PreemptionCheckpoint: the handler of signal %d was replaced during the fit (%r); "
                        "preemption checkpoints are off for it.", self._watching, current)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._vote is None:
            return
        self._last_step = trainer.global_step
        if self._watching == signal.SIGTERM:
            self._take_over()  # done at Lightning's registration already, unless this Lightning has none
        _warn_plateau(trainer)
        for opt in _ours(trainer):  # their step all-reduce carries the vote: no collective of its own
            if opt.comm.world_size == trainer.world_size:
                opt.stop_vote = self._vote

    def _agreed(self, trainer: pl.Trainer) -> bool:
        """The same answer on every rank, at the same step."""
        vote = self._vote
        assert vote is not None
        if trainer.world_size == 1:
            return vote.requested
        if vote.rounds != self._rounds_seen:  # an optimizer of ours stepped: its all-reduce carried the vote
            self._rounds_seen = vote.rounds
            return vote.agreed
        # no optimizer of ours all-reduced this step (torch's optimizers only): one small all-reduce
        return bool(trainer.strategy.reduce_boolean_decision(vote.requested, all=False))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # only after an optimizer step (not inside an accumulation window): Lightning counted one, or one of
        # ours all-reduced (also when called past Lightning's wrapper); both are equal on every rank
        vote = self._vote
        if vote is None or self.preempted or (trainer.global_step == self._last_step
                                              and vote.rounds == self._rounds_seen):
            return
        self._last_step = trainer.global_step
        if self._agreed(trainer):
            self._checkpoint_and_stop(trainer)

    def _checkpoint_and_stop(self, trainer: pl.Trainer) -> None:
        root = str(trainer.default_root_dir)
        path = trainer._checkpoint_connector.hpc_save_path(root)
        partial = os.path.join(root, _PARTIAL)
        log.info("PreemptionCheckpoint: signal %s; saving %s at step %d on every rank",
                 self._watching, path, trainer.global_step)
        fs = get_filesystem(path)
        if trainer.is_global_zero and fs.exists(partial):  # an earlier run's: it would be renamed for this one's
            fs.rm(partial, recursive=True)  # a directory where the strategy saves one (DeepSpeed, sharded FSDP)
        trainer.save_checkpoint(partial)  # every rank (a sharded optimizer consolidates); ends in a barrier
        if trainer.is_global_zero:
            _wait_for_writes(trainer.strategy.checkpoint_io)
            _sync_to_disk(partial)
            fs.mv(partial, path)
            _sync_rename(path)
            if self._requeue:
                self._requeue_job()
        self.preempted = True
        trainer.should_stop = True

    @staticmethod
    def _requeue_job() -> None:
        job = _job_id()
        if job is None:
            log.warning("PreemptionCheckpoint: no SLURM_JOB_ID in the environment; the job was not requeued.")
            return
        try:
            rc = subprocess.call(["scontrol", "requeue", job])
        except FileNotFoundError:
            log.warning("PreemptionCheckpoint: scontrol not found; job %s was not requeued.", job)
            return
        if rc == 0:
            log.info("PreemptionCheckpoint: requeued SLURM job %s", job)
        else:
            log.warning("PreemptionCheckpoint: 'scontrol requeue %s' failed with exit code %d (a job started "
                        "by srun alone, or without --requeue, cannot be requeued).", job, rc)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning tears the outer stage down under the inner one's name (its state.fn): count, not names
        self._depth = max(0, self._depth - 1)
        if self._depth > 0 or self._vote is None:
            return  # nothing installed for this stage
        if self._evaluating and (self._owed or not self._joined):
            self._answer_rounds(trainer)  # a rank that ran no batch of the stage: the others' rounds wait for it
        watching, vote, evaluating = self._watching, self._vote, self._evaluating
        self._release(trainer)
        if watching == signal.SIGTERM and vote is not None and vote.requested and (evaluating or not self.preempted):
            # a SIGTERM after the last step (the final validation, on_train_end) or the last agreement of an
            # evaluation stopped nothing: a request to terminate is not swallowed (Lightning alone stops, the
            # default action ends the process); the handler the stage found receives it now. SIGUSR1 is a
            # warning: no step left, nothing to do.
            log.warning("PreemptionCheckpoint: SIGTERM arrived after the last training step or evaluation "
                        "batch; passed on to the handler installed before the %s.", getattr(stage, "value", stage))
            signal.raise_signal(watching)

    @override
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._after_evaluation_batch(trainer, dataloader_idx)

    @override
    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._after_evaluation_batch(trainer, dataloader_idx)

    @override
    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._after_evaluation_batch(trainer, dataloader_idx)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._arm(trainer)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pay(trainer)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pay(trainer)

    def _pay(self, trainer: pl.Trainer) -> None:
        """After the loop's reduce of this rank's last loader (:meth:`_leave`), before the module's epoch-end hook:
        the rounds of the ranks still in later loaders."""
        if self._evaluating and self._owed:
            self._answer_rounds(trainer)

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._arm(trainer)

    @override
    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._arm(trainer)

    def _arm(self, trainer: pl.Trainer) -> None:
        """The stage's loop has made its fetcher: where no hook follows the end of this rank's batches, the
        loader's end answers the other ranks' rounds."""
        if not self._evaluating or self._rounds is None or trainer.world_size == 1:
            return
        fetcher = getattr(getattr(trainer, "_active_loop", None), "_data_fetcher", None)
        inner = getattr(fetcher, "iterator", None)
        if fetcher is None or inner is None:
            return
        at_end = functools.partial(self._loader_ended, trainer)
        if fetcher.done and not getattr(fetcher, "batches", None):
            # no batch on this rank: the loop's first fetch ends it before any hook, without asking the loader. A
            # prefetch met the end already (measured: W = 2, gloo, 3 batches and none: the epoch end's all_gather met
            # the other rank's round, a hang); a sized CombinedLoader of length 0 (min_size over an empty loader;
            # measured: W = 3, gloo, the same hang). That first fetch answers the rounds (here, an epoch-start hook
            # of the module or of a later callback could still run a collective of its own)
            if isinstance(fetcher, _DataLoaderIterDataFetcher):
                # its loop asks ``done`` alone, before the step: answered there (the step is not run, as in Lightning)
                _AnswerWhenDone.install(fetcher, at_end)
            else:
                fetcher.iterator, fetcher.done = _AnswerAtEnd(iter(()), at_end), False
            return
        if _prefetches(fetcher):
            return  # a prefetching fetcher tells the last batch's hook (``done``): the rounds are answered there
        # this loop learns that a rank's batches ended only from the loader's StopIteration, with no hook after
        # it before the epoch end's collectives (a sync_dist reduce): the rank answers the others' rounds there.
        # A step that takes dataloader_iter fetches its batch itself (a loader without __len__: the round after
        # its last batch said "more"; measured at W = 2, gloo, 3 batches and 1: a hang until the watchdog)
        iter_step = isinstance(fetcher, _DataLoaderIterDataFetcher)
        # one batch at a time over several loaders: the fetch of a later loader's batch comes before Lightning's
        # reduce at the switch (a loader's length can be a limit, not its batches: limit_val_batches over a loader
        # without __len__; measured W = 3, gloo, 1 batch of 2: the reduce met the others' round)
        fetched = functools.partial(self._fetched, trainer) if _switches(trainer) and not iter_step else None
        fetcher.iterator = _AnswerAtEnd(inner, at_end, fetched)
        if iter_step:
            # over a sized loader the dataloader_iter ends at ``done`` without asking the loader: a step that
            # fetches past its rank's last batch (two a step, 3 batches) raises StopIteration with no hook after it
            fetcher.iterator_wrapper = _AnswerAtEnd(fetcher.iterator_wrapper, at_end)

    def _fetched(self, trainer: pl.Trainer, item: Any) -> None:
        """A batch fetched one at a time (batch, batch_idx, dataloader_idx): where its loader is a later one, the
        rank waits for the others there, before the loop reduces the earlier loader's metrics."""
        group = item[2] if isinstance(item, tuple) and len(item) == 3 else None
        if isinstance(group, int) and group != self._group and not self._joined:
            self._drain(trainer, group, leaving=self._group)

    def _loader_ended(self, trainer: pl.Trainer) -> None:
        if not self._joined:  # a step that fetches again after the end (it caught the StopIteration) answers none
            self._leave(trainer, self._group)

    def _after_evaluation_batch(self, trainer: pl.Trainer, dataloader_idx: int) -> None:
        """validate/test/predict (not a fit's validation): every rank learns a SIGTERM after the same batch.
        Lightning's own handler broadcasts inside the handler: measured at W = 2 (gloo, trainer.validate), a
        SIGTERM on one rank paired that broadcast with the other rank's end of the stage: "Connection closed
        by peer" on both, the user's handler never called; on every rank, each stopped with exit status 0
        and the ddp_fork launcher waited for rank 0's results forever. The rounds go on while some rank has
        batches left: a rank done first (``predict`` gives ranks unequal shares) answers them until all are.
        The round posted after batch k is read after batch k+1 (:mod:`~lightning_soaa.lightning.stage_rounds`):
        a SIGTERM before batch k's end stops every rank after batch k+1. A rank whose next batch is from a later
        loader of a sequential CombinedLoader waits there for the ranks still in an earlier one (:meth:`_drain`)."""
        vote, rounds = self._vote, self._rounds
        if not self._evaluating or vote is None or rounds is None or self._joined:
            return  # joined: a dataloader_iter step that caught the loader's end (the rounds are over here)
        if trainer.world_size == 1:
            if vote.requested:
                self._end_stage(trainer)
            return
        loop = getattr(trainer, "_active_loop", None)
        # the fetcher's state now, after the step: a step that takes dataloader_iter fetches its batch itself,
        # after Lightning set is_last_batch (False at the last batch: that rank went on to the epoch end's
        # sync_dist reduce while the others still ran rounds, a hang); an unsized loader's end is unknown there
        # (the loader's StopIteration answers the rounds: _arm)
        done = getattr(getattr(loop, "_data_fetcher", None), "done", None)
        last = done if isinstance(done, bool) else bool(getattr(getattr(loop, "batch_progress", None),
                                                                "is_last_batch", False))
        group = DONE if last else _next_group(trainer, dataloader_idx)
        # the loader this rank leaves where its next batch is another's (the loop compares a dataloader_iter
        # step's fetch with the one before it)
        fetcher = getattr(loop, "_data_fetcher", None)
        current = self._group if isinstance(fetcher, _DataLoaderIterDataFetcher) else dataloader_idx
        self._settle(trainer, rounds.collect())
        rounds.post(vote.requested, group)
        if group == DONE:
            self._leave(trainer, current)
        elif group != current:
            # Lightning reduces the loader's sync_dist metrics before this rank's next batch (measured: W = 2,
            # gloo, shares 3 + 2 and 1 + 3 batches: that reduce met the other rank's round, a hang)
            self._drain(trainer, group, leaving=current)

    def _leave(self, trainer: pl.Trainer, current: int) -> None:
        """No batch left on this rank, its last in loader ``current``. Over several loaders (validate/test) the
        loop reduces that loader's metrics after it, where another rank leaving it reduces them at its switch to
        a later loader (measured: W = 2, gloo, 3 + 2 batches and 1 + 0, a sync_dist log in loader 0 only: the
        other rank's reduce met this rank's rounds, a hang): the rank waits there until every rank is past it,
        and answers the rounds of the ranks in later loaders from its epoch end (:meth:`_pay`)."""
        if not _switches(trainer) or trainer.world_size == 1:
            self._answer_rounds(trainer)
            return
        self._joined = self._owed = True
        self._drain(trainer, DONE, leaving=current)

    def _answer_rounds(self, trainer: pl.Trainer) -> None:
        """This rank has no batch left: one round per batch the others still run, then the stage ends here."""
        self._joined, self._owed = True, False
        rounds, vote = self._rounds, self._vote
        if rounds is None or vote is None or trainer.world_size == 1:
            return
        self._drain(trainer, DONE)

    def _drain(self, trainer: pl.Trainer, group: int, leaving: int | None = None) -> None:
        """This rank's next batch is in loader ``group`` (DONE: none left): one round per batch the others still
        run, until every rank is past loader ``leaving`` (None: until every rank has no batch left). Every rank
        leaving that loader leaves the wait at the same round (the first whose lowest group is above it), so the
        collectives Lightning runs there pair up; a rank whose next loader is further on (or none) waits no
        longer than they do (measured: W = 2, gloo, 3 + 2 batches and 1 + 0: waiting for every rank to reach its
        own next loader, it was held in rounds while the other reduced loader 0's metrics, a hang)."""
        rounds, vote = self._rounds, self._vote
        if rounds is None or vote is None:
            return
        bound = DONE if leaving is None else leaving + 1
        if rounds.pending is None and rounds.open:  # no round of this rank's since its last wait (or no batch yet)
            rounds.post(vote.requested, group)
        while rounds.pending is not None:
            outcome = rounds.collect()
            self._settle(trainer, outcome)
            if outcome is not None and outcome.low < bound:
                rounds.post(vote.requested, group)
        self._group = group

    def _settle(self, trainer: pl.Trainer, outcome: Outcome | None) -> None:
        """Act on a round's verdict, as every rank does at the same round."""
        if outcome is not None and outcome.requested:
            self._end_stage(trainer)

    def _end_stage(self, trainer: pl.Trainer) -> None:
        """Every rank at the same round: the signal to the handler the stage found, then Lightning's stop."""
        watching = self._watching
        assert watching is not None
        log.warning("PreemptionCheckpoint: SIGTERM during %s; every rank ends it after this batch (the handler "
                    "installed before it receives the signal).", getattr(trainer.state.fn, "value", "it"))
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, PreemptionCheckpoint):  # a second one's handler would take the signal, not the user's
                cb._release(trainer)
        self._release(trainer)
        signal.raise_signal(watching)  # the default action ends the process here; a user's handler runs here
        # that handler returned (or the signal is ignored): the stage stops as Lightning stops it on SIGTERM, but
        # with the status a shell gives a process SIGTERM ended (Lightning's 0 reads as success to a scheduler,
        # and under ddp_fork/ddp_spawn left the launching process waiting for results forever)
        raise SIGTERMException(128 + watching)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # a stage that raises calls no teardown hook: the handler must not outlive it (it would swallow the signal)
        self._depth = 0
        self._release(trainer)

    def _release(self, trainer: pl.Trainer) -> None:
        """Give the signal back to its previous handler and detach the vote (idempotent)."""
        if self._link is not None:  # the connector's registration as it was, less ours
            self._link.release(self._connector)
            self._connector = self._link = None
        if self._watching is None:
            return
        for opt in _ours(trainer):
            if opt.stop_vote is self._vote:
                opt.stop_vote = None
        previous = _resolve(self._previous)
        # after an exception Lightning's teardown comes after this and restores the handlers it found at the
        # start of the fit (this one): tell it the one to restore
        originals = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
        if isinstance(originals, dict) and originals.get(self._watching) == self._handler:
            originals[self._watching] = previous
        if signal.getsignal(self._watching) == self._handler:
            try:
                signal.signal(self._watching, previous)
            except ValueError:
                pass
        self._watching = None
        self._vote = None
        self._rounds = None

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles callbacks to the workers: a handler or a vote of the parent means nothing there
        state = self.__dict__.copy()
        state.update(_watching=None, _previous=None, _vote=None, _rounds=None, _connector=None, _link=None)
        return state


def _switches(trainer: pl.Trainer) -> bool:
    """Whether the stage's loop reduces something where a rank moves on to the next loader: validate/test over a
    sequential CombinedLoader of several (a loader's metrics; predict logs nothing)."""
    loop = getattr(trainer, "_active_loop", None)
    combined = getattr(loop, "_combined_loader", None)
    return (getattr(combined, "_mode", None) == "sequential" and len(getattr(combined, "flattened", ())) > 1
            and not isinstance(loop, _PredictionLoop))


def _next_group(trainer: pl.Trainer, dataloader_idx: int) -> int:
    """The loader of this rank's next batch (0 where the loop reduces nothing at a switch), as the stage's loop
    will see it at its next check for a new loader; called where the rank has a batch left."""
    if not _switches(trainer):
        return 0
    fetcher = getattr(getattr(trainer, "_active_loop", None), "_data_fetcher", None)
    if isinstance(fetcher, _DataLoaderIterDataFetcher):
        return int(fetcher._dataloader_idx)  # the step fetched it: the loop compares it before the next step
    batches = getattr(fetcher, "batches", None)
    if batches:  # prefetched (loaders without __len__): (batch, batch_idx, dataloader_idx)
        return int(batches[0][2])
    return dataloader_idx  # one batch at a time: the next fetch tells (_fetched)


def _prefetches(fetcher: Any) -> bool:
    """Whether the loop's fetcher reads one batch ahead (a batch-style step over a loader without __len__): the
    step of a rank's last batch then sees ``done`` already, and the loader's StopIteration comes before it."""
    return isinstance(fetcher, _PrefetchDataFetcher) and fetcher.length is None and fetcher.prefetch_batches > 0


class _AnswerAtEnd(Iterator[Any]):
    """The loader's iterator inside the loop's fetcher: at its StopIteration (no batch left on this rank) calls
    ``at_end`` first, which answers the other ranks' rounds; ``fetched`` (if any) sees each item first."""

    def __init__(self, inner: Iterator[Any], at_end: Callable[[], object],
                 fetched: Callable[[Any], object] | None = None) -> None:
        self.inner, self.at_end, self.fetched = inner, at_end, fetched

    def __next__(self) -> Any:
        try:
            item = next(self.inner)
        except StopIteration:
            self.at_end()
            raise
        if self.fetched is not None:
            self.fetched(item)
        return item

    def __getattr__(self, name: str) -> Any:
        # the step's dataloader_iter keeps Lightning's attributes (``done``, ``fetched``, ``length``)
        if "inner" not in self.__dict__:  # not yet set (copy, unpickling): no recursion through this method
            raise AttributeError(name)
        return getattr(self.__dict__["inner"], name)


class _AnswerWhenDone(_DataLoaderIterDataFetcher):
    """The fetcher of a dataloader_iter step on a rank with no batch: the loop's first ``next`` (which raises
    StopIteration at ``done``, before any hook) calls ``answer_at_end`` first."""

    answer_at_end: Callable[[], object]

    @classmethod
    def install(cls, fetcher: _DataLoaderIterDataFetcher, answer_at_end: Callable[[], object]) -> None:
        """Lightning's loop keeps the fetcher it made (and its state): only its class changes (a subclass)."""
        fetcher.__class__ = cls
        assert isinstance(fetcher, cls)
        fetcher.answer_at_end = answer_at_end

    @override
    def __next__(self) -> Any:
        if self.done:
            self.answer_at_end()
        return super().__next__()


def _resolve(previous: Any) -> Any:
    """The handler to give a signal back to: ``previous``, past any other PreemptionCheckpoint's handler released
    meanwhile (two on one trainer, released in the order they were installed: the second one found the first
    one's), to the handler that one found."""
    for _ in range(64):
        owner = getattr(previous, "__self__", None)
        if not isinstance(owner, PreemptionCheckpoint) or previous != owner._handler or owner._watching is not None:
            break
        previous = owner._previous
    return signal.SIG_DFL if previous is None else previous
