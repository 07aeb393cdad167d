"""An installed mpi4py that cannot load an MPI library must not break a run that does not use MPI.

The failure is reproduced, not mocked: ``MPI4PY_LIBMPI`` points mpi4py >= 4 at a library that does not
exist, which is what a machine without MPI looks like to it (``RuntimeError: cannot load MPI library``
from ``from mpi4py import MPI``). Each case runs in a fresh interpreter, since a process that already
loaded MPI would not notice.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_soaa.lightning.mpi_guard import MPI_LAUNCH_VARIABLES, launched_by_mpi

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]

# A tiny Trainer fit, the way a user's script makes one (one CPU process).
FIT = textwrap.dedent("""
    import sys
    if sys.argv[1] == "ours":
        import lightning_soaa.lightning  # noqa: F401
    import torch
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)
        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.lin(x), y)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 1))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=4))
    print("FIT_OK", trainer.global_step, "mpi4py.MPI" in sys.modules)
""")


def broken_mpi_env(**extra: str) -> dict[str, str]:
    """This environment with mpi4py unable to load any MPI library, and no launcher variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in MPI_LAUNCH_VARIABLES and not k.startswith(("OMPI_", "PMI", "PMIX_", "SLURM_"))}
    env["MPI4PY_LIBMPI"] = os.path.join(os.sep, "nonexistent", "libmpi.so")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def _run(code: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=240)


@pytest.fixture(scope="module", autouse=True)
def _needs_mpi4py() -> None:
    pytest.importorskip("lightning")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed: nothing to guard against (pip install 'lightning-soaa[mpi]')")


def test_the_failure_is_real_without_the_guard() -> None:
    """The control: stock Lightning dies in Trainer(...) in this environment (else the tests below prove
    nothing)."""
    proc = _run(FIT, "stock", env=broken_mpi_env())
    assert proc.returncode != 0, proc.stdout
    assert "cannot load MPI library" in proc.stderr, proc.stderr[-3000:]


def test_trainer_fit_works_after_importing_lightning_soaa() -> None:
    proc = _run(FIT, "ours", env=broken_mpi_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    # it trained, and never touched MPI (no MPI_Init in a run that does not use MPI)
    assert "FIT_OK 2 False" in proc.stdout, proc.stdout


def test_under_an_mpi_launcher_the_error_says_what_to_do() -> None:
    """Started by mpirun (its variables set) with no loadable MPI: a clear error, not W unconnected runs."""
    code = ("import lightning_soaa.lightning\n"
            "from lightning.fabric.plugins.environments import MPIEnvironment\n"
            "MPIEnvironment.detect()\n")
    proc = _run(code, env=broken_mpi_env(OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="0"))
    assert proc.returncode != 0
    assert "OMPI_COMM_WORLD_SIZE is set" in proc.stderr and "cannot load MPI library" in proc.stderr, \
        proc.stderr[-3000:]


def test_guard_is_installed_once_and_lightning_sees_it() -> None:
    from lightning.fabric.plugins.environments import MPIEnvironment
    from lightning.pytorch.trainer.connectors import accelerator_connector

    from lightning_soaa.lightning import guard_mpi_detection

    assert guard_mpi_detection() and guard_mpi_detection()
    guarded = MPIEnvironment.detect
    assert getattr(guarded, "_lightning_soaa_mpi_guard", False)
    assert accelerator_connector.MPIEnvironment.detect is guarded  # the class the Trainer asks


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE"),
    ({"PMI_SIZE": "4", "PMI_RANK": "1"}, "PMI_SIZE"),
    ({"PMIX_RANK": "0"}, "PMIX_RANK"),
    ({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "0"}, None),
])
def test_launched_by_mpi(env: dict[str, str], expected: str | None) -> None:
    assert launched_by_mpi(env) == expected
