"""Keep an installed mpi4py that cannot load an MPI library from breaking a run that does not use MPI.

Why: every ``Trainer(...)`` asks each cluster environment whether it applies. Lightning's
``MPIEnvironment.detect()`` runs ``from mpi4py import MPI`` whenever the mpi4py package is installed and
catches only ``ImportError``; mpi4py >= 4 raises ``RuntimeError("cannot load MPI library")`` when it finds
no ``libmpi`` (mpi4py installed by the ``[mpi]`` extra on a machine without MPI, or a wheel MPI whose
library went missing). The Trainer then dies before doing anything, in runs that never asked for MPI.
Even when the library loads, ``detect()`` initialises MPI (``MPI_Init``) in every Trainer-making process.

The fix is a narrower ``detect()``: MPI can only apply when an MPI launcher started this process, and
every launcher says so in the environment (:data:`MPI_LAUNCH_VARIABLES`). Without those variables MPI's
world would be this process alone (``Get_size() == 1``), which Lightning's own ``detect()`` answers with
False, so the guarded one answers False without importing mpi4py. Under an MPI launcher it defers to
Lightning's ``detect()``, and a library that cannot load becomes an error saying what to install:
continuing without MPI there would train W unconnected copies, one per rank.

:func:`guard_mpi_detection` installs it once per process; importing :mod:`lightning_soaa.lightning`
(our callbacks, the CLI, the main job, the DeepSpeed strategy's users) calls it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

__all__ = ["MPI_LAUNCH_VARIABLES", "guard_mpi_detection", "launched_by_mpi"]

log = logging.getLogger(__name__)

#: set by the MPI launchers for every rank: Open MPI (mpirun/prterun), PMIx, MPICH/Intel MPI (hydra),
#: MVAPICH
MPI_LAUNCH_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")

_MARK = "_lightning_soaa_mpi_guard"


def launched_by_mpi(env: Mapping[str, str] | None = None) -> str | None:
    """The first :data:`MPI_LAUNCH_VARIABLES` entry set in ``env`` (default ``os.environ``), else None."""
    env = os.environ if env is None else env
    return next((v for v in MPI_LAUNCH_VARIABLES if v in env), None)


def _guarded(original: Callable[[], bool]) -> Callable[[], bool]:
    def detect() -> bool:
        var = launched_by_mpi()
        if var is None:
            return False  # not started by an MPI launcher: MPI's world is this one process
        try:
            return bool(original())
        except RuntimeError as err:
            raise RuntimeError(
                f"This process was started by an MPI launcher ({var} is set), but mpi4py cannot load an "
                f"MPI library: {err}. Install one into this environment (pip install "
                "'lightning-soaa[mpi]' brings Open MPI's wheel), point MPI4PY_LIBMPI at your libmpi.so, "
                "or launch without mpirun (torchrun, srun, Lightning's own launcher)."
            ) from err

    setattr(detect, _MARK, True)
    detect.__doc__ = original.__doc__
    return detect


def guard_mpi_detection() -> bool:
    """Replace ``MPIEnvironment.detect`` (Lightning's, shared by Fabric and the Trainer) with the guarded
    one described in the module docstring. Idempotent; returns True when the guard is (now) in place,
    False when Lightning is not installed or has no ``MPIEnvironment``."""
    try:
        from lightning.fabric.plugins.environments import MPIEnvironment
    except ImportError:
        return False
    current = MPIEnvironment.detect
    if getattr(current, _MARK, False):
        return True
    MPIEnvironment.detect = staticmethod(_guarded(current))  # type: ignore[method-assign]
    log.debug("lightning_soaa: MPIEnvironment.detect guarded against an unloadable MPI library")
    return True
