"""EGN under Lightning's automatic optimization: the batch arrives through :meth:`EGN.set_batch`.

:class:`lightning_soaa.EGN` itself offers ``set_batch``; this module re-exports it under
``lightning_soaa.lightning.EGN`` and documents the two recipes.

Lightning steps an optimizer as ``optimizer.step(closure)``, and the closure returns a loss, while EGN
needs the mini-batch (it forms Jacobians from the model and the inputs). The
:class:`~lightning_soaa.lightning.callbacks.BatchToOptimizer` callback calls ``set_batch(inputs, targets)``
before every training batch; :class:`lightning_soaa.EGN` uses that batch when ``step``
gets none.

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

from lightning_soaa.optim.egn import EGN, MISSING_BATCH_MESSAGE

__all__ = ["EGN", "MISSING_BATCH_MESSAGE"]
