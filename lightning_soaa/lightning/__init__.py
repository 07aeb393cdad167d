"""Lightning adapter: callbacks, an optimizer factory, the ``lightning-soaa`` CLI and offline demos.

Typical use in a LightningModule::

    from lightning_soaa import SOAA
    from lightning_soaa.lightning import LossToOptimizer, OptimizerDiagnostics

    def configure_optimizers(self):          # built after torch.distributed started: sharded
        return SOAA(self.parameters(), lr=1e-3)

    trainer = Trainer(callbacks=[LossToOptimizer(), OptimizerDiagnostics()], strategy="ddp", devices=2)
"""

from lightning_soaa.lightning.callbacks import (
    BatchToOptimizer,
    LossToOptimizer,
    OptimizerDiagnostics,
    default_split_batch,
)
from lightning_soaa.lightning.egn import EGN
from lightning_soaa.lightning.factory import (
    KNOWN_OPTIMIZERS,
    OptimizerFactory,
    attach_optimizer,
    resolve_optimizer_class,
    unwrap_optimizer,
)

__all__ = [
    "BatchToOptimizer",
    "EGN",
    "KNOWN_OPTIMIZERS",
    "LossToOptimizer",
    "OptimizerDiagnostics",
    "OptimizerFactory",
    "attach_optimizer",
    "default_split_batch",
    "resolve_optimizer_class",
    "unwrap_optimizer",
]
