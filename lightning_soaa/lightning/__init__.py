"""Lightning adapter: callbacks, an optimizer factory, the ``lightning-soaa`` CLI and offline demos.

Typical use in a LightningModule::

    from lightning_soaa import SOAA
    from lightning_soaa.lightning import LossToOptimizer, OptimizerDiagnostics

    def configure_optimizers(self):          # built after torch.distributed started: sharded
        return SOAA(self.parameters(), lr=1e-3)

    trainer = Trainer(callbacks=[LossToOptimizer(), OptimizerDiagnostics()], strategy="ddp", devices=2)

Importing this package guards Lightning's MPI detection (:mod:`lightning_soaa.lightning.mpi_guard`): an
installed mpi4py that cannot load an MPI library must not break a Trainer that does not use MPI. It also
registers the exit drain of :mod:`lightning_soaa.distributed.teardown`: Lightning creates the process group
itself, and a gloo rank must not abort in interpreter teardown after a finished fit.
"""

from typing import Any

from lightning_soaa.distributed.teardown import install_exit_drain
from lightning_soaa.lightning.callbacks import (
    BatchToOptimizer,
    LossToOptimizer,
    OptimizerDiagnostics,
    default_split_batch,
)
from lightning_soaa.lightning.factory import (
    KNOWN_OPTIMIZERS,
    OptimizerFactory,
    attach_optimizer,
    resolve_optimizer_class,
    unwrap_optimizer,
)
from lightning_soaa.lightning.mpi_guard import guard_mpi_detection
from lightning_soaa.lightning.preemption import PreemptionCheckpoint
from lightning_soaa.lightning.resume_check import OptimizerStateCheck

guard_mpi_detection()
install_exit_drain()


def __getattr__(name: str) -> Any:
    # EGN on first use: importing its optimizer module (~0.7 s of torch.func set-up under load) would be paid
    # by every process of every Lightning run, ddp_spawn children included, that only wants the callbacks.
    if name == "EGN":
        from lightning_soaa.lightning.egn import EGN

        return EGN
    raise AttributeError(f"module 'lightning_soaa.lightning' has no attribute {name!r}")


__all__ = [
    "BatchToOptimizer",
    "EGN",
    "KNOWN_OPTIMIZERS",
    "LossToOptimizer",
    "OptimizerDiagnostics",
    "OptimizerFactory",
    "OptimizerStateCheck",
    "PreemptionCheckpoint",
    "attach_optimizer",
    "default_split_batch",
    "guard_mpi_detection",
    "resolve_optimizer_class",
    "unwrap_optimizer",
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
