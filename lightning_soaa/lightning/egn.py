"""EGN under Lightning's automatic optimization: the batch arrives through :meth:`EGN.set_batch`.

Lightning steps an optimizer as ``optimizer.step(closure)``, and the closure returns a loss, while EGN
needs the mini-batch (it forms Jacobians from the model and the inputs). The
:class:`~lightning_soaa.lightning.callbacks.BatchToOptimizer` callback calls ``set_batch(inputs, targets)``
before every training batch; this subclass of :class:`lightning_soaa.EGN` uses that batch when ``step``
gets none. Same class name, same constructor, same checkpoints as :class:`lightning_soaa.EGN`.

Automatic optimization (``training_step`` unchanged)::

    from lightning_soaa.lightning import EGN, BatchToOptimizer

    def configure_optimizers(self):
        return EGN(self, loss="cross_entropy", lr=1.0, line_search=True)   # self(x) must give the logits

    Trainer(callbacks=[BatchToOptimizer()], ...)   # batch = (x, y); pass split_batch= for other layouts

Cost: Lightning's closure (``training_step`` + backward) still runs inside ``step``, for the returned loss
and the logged metrics; EGN never reads ``p.grad``. Manual optimization skips that pass and works with
:class:`lightning_soaa.EGN` directly (tested in ``tests/lightning/test_callbacks.py``)::

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.optimizers().step(inputs=x, targets=y)   # the mean loss before the step
        self.log("train_loss", loss)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from lightning_soaa.optim.egn import EGN as _BaseEGN

__all__ = ["EGN", "MISSING_BATCH_MESSAGE"]

MISSING_BATCH_MESSAGE = (
    "EGN.step() got no mini-batch: EGN forms Jacobians from the inputs and targets, not from a loss. "
    "Under Lightning add the callback lightning_soaa.lightning.BatchToOptimizer() to the Trainer "
    "(Trainer(callbacks=[BatchToOptimizer()])), or use manual optimization and call "
    "opt.step(inputs=x, targets=y)."
)


class EGN(_BaseEGN):
    """:class:`lightning_soaa.EGN` plus :meth:`set_batch` for Lightning's automatic optimization."""

    takes_module = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_batch: tuple[Any, Tensor] | None = None

    def set_batch(self, inputs: Any, targets: Tensor) -> None:
        """Store the mini-batch for the next :meth:`step` (called by ``BatchToOptimizer``)."""
        self._pending_batch = (inputs, targets)

    def step(self, closure: Callable[[], Any] | None = None, *, inputs: Any = None,  # type: ignore[override]
             targets: Tensor | None = None) -> Any:
        if inputs is None and targets is None:
            if self._pending_batch is None:
                raise ValueError(MISSING_BATCH_MESSAGE)
            inputs, targets = self._pending_batch
        try:
            return super().step(closure, inputs=inputs, targets=targets)
        finally:
            self._pending_batch = None  # a batch belongs to one step
