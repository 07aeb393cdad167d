"""A resumed run whose optimizer cannot continue the checkpoint's optimizer state fails naming both.

Our optimizers refuse another optimizer's state themselves (their ``load_state_dict`` checks the format).
The other way round is not ours to check: a torch optimizer handed our state fails inside torch
(``KeyError: 'step'`` in ``Adam.__setstate__``: our per-parameter entries are per block and carry no
``step``), which names neither the checkpoint nor the switch. Under ``lightning-soaa fit`` that is one
flag away (``--ckpt_path ... --optimizer torch.optim.AdamW``), so the CLI adds :class:`OptimizerStateCheck`,
which reads the checkpoint's optimizer states before Lightning loads them and refuses the switch. Under
Lightning's DeepSpeed strategy the checkpoint is a folder the DeepSpeed engine loads itself (callbacks never see
its optimizer state, and a torch optimizer there took ours silently, with our hyperparameters): the check makes
that engine refuse it (:func:`deepspeed_ext.engine.install_foreign_load_check`).
"""

from __future__ import annotations

import importlib
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from lightning_soaa.distributed.checkpoint import FORMAT_KEY
from lightning_soaa.lightning.factory import iter_wrapped
from lightning_soaa.optim.base import ShardedOptimizer

__all__ = ["OptimizerStateCheck", "check_optimizer_states", "guard_deepspeed_engine"]


def _saved_by_us(states: list[Any]) -> list[str | None]:
    """Per saved optimizer state: the name of the lightning_soaa optimizer that wrote it, or None."""
    out: list[str | None] = []
    for sd in states:
        meta = sd.get(FORMAT_KEY) if isinstance(sd, dict) else None
        out.append(str(meta.get("optimizer", "?")) if isinstance(meta, dict) else None)
    return out


def _ours(optimizer: Any) -> bool:
    """Whether one of ours is in the wrapper chain (LightningOptimizer -> a DeepSpeed client -> ours); a DeepSpeed
    client stands for the class it wraps (it builds the optimizer at its first step or load)."""
    for o in iter_wrapped(optimizer):
        cls = getattr(o, "optimizer_cls", None)
        if isinstance(o, ShardedOptimizer) or (isinstance(cls, type) and issubclass(cls, ShardedOptimizer)):
            return True
    return False


def guard_deepspeed_engine(trainer: pl.Trainer) -> None:
    """Under Lightning's DeepSpeed strategy, make the engine of an optimizer that is not ours refuse, when the fit
    loads a checkpoint folder (after ``on_fit_start``), optimizer state that ours wrote, on every rank, before it
    reads anything (an engine running ours checks the state itself)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    engine = getattr(trainer.strategy, "deepspeed_engine", None) if isinstance(trainer.strategy, DeepSpeedStrategy) \
        else None
    if engine is None or any(_ours(o) for o in trainer.optimizers):
        return
    # by name: deepspeed_ext is the package's DeepSpeed layer, built on lightning_soaa, not a dependency of it
    importlib.import_module("deepspeed_ext.engine").install_foreign_load_check(engine)


def check_optimizer_states(saved: list[str | None], optimizers: list[Any]) -> None:
    """Raise when a state written by one of our optimizers (``saved[i]``, its name) would be loaded into an
    optimizer that is not one of ours; our own check the rest (another of ours, a torch state)."""
    for i, (name, opt) in enumerate(zip(saved, optimizers)):
        if name is not None and not _ours(opt):
            inner = list(iter_wrapped(opt))[-1]
            cls = f"{type(inner).__module__}.{type(inner).__qualname__}"
            raise ValueError(
                f"Cannot resume: the checkpoint's optimizer_states[{i}] was written by lightning_soaa's {name}, and "
                f"the run's optimizer {i} is {cls}, which cannot continue that state (its moments are per block, "
                f"as {name} keeps them). Resume with --optimizer lightning_soaa.{name} (its options may change), "
                "or start a new run from the weights only (e.g. the LightningModule's load_from_checkpoint, or "
                "model.load_state_dict(torch.load(ckpt)['state_dict'])), which starts the new optimizer afresh.")


class OptimizerStateCheck(Callback):
    """Refuses, before Lightning loads the optimizer states of a checkpoint, a resume that hands a state
    written by a lightning_soaa optimizer to an optimizer that is not one (see the module docstring).

    Lightning calls ``on_load_checkpoint`` before building the optimizers for most strategies and after it
    for those with ``restore_checkpoint_after_setup``; either way the optimizer states are loaded later, so
    the check runs in whichever of ``on_load_checkpoint`` / ``on_fit_start`` comes second (before setup,
    ``trainer.optimizers`` may still be an earlier fit's). Only ``fit`` loads optimizer states; a
    checkpoint without ``optimizer_states`` (a sharded ModelParallelStrategy one) is not read here. Under
    Lightning's DeepSpeed strategy, ``on_fit_start`` makes the engine refuse our state at its load
    (:func:`guard_deepspeed_engine`)."""

    def __init__(self) -> None:
        self._saved: list[str | None] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._saved = None  # this run's checkpoint, if any, is read after setup (not an earlier fit's)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("optimizer_states")
        fitting = trainer.state.fn == TrainerFn.FITTING
        self._saved = _saved_by_us(states) if fitting and isinstance(states, list) else None
        if self._saved is not None and trainer.strategy.restore_checkpoint_after_setup:  # after on_fit_start
            check_optimizer_states(self._saved, trainer.optimizers)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._saved is not None:  # read before setup: this fit's optimizers exist now
            check_optimizer_states(self._saved, trainer.optimizers)
        guard_deepspeed_engine(trainer)  # its folder is loaded after this hook, by the engine
