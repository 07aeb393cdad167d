"""Every optimizer fits a tiny model with Lightning on 1 CPU process and on 2 (ddp_fork, sharded; SOAA also
under ddp_spawn, whose ranks get the module, callbacks and optimizer factory by pickling)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_soaa import registry
from lightning_soaa.lightning import BatchToOptimizer, LossToOptimizer, OptimizerDiagnostics, OptimizerFactory
from tests.lightning.helpers import RankRecorder, TinyRegressor, load_records, make_trainer

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(180)]


# Per registry entry: (class path, init args) that make a tiny fit decrease the loss.
_TINY_FIT = {"SOAA": {"lr": 0.05}, "EGN": {"loss": "mse", "lr": 0.5}, "ASGO": {"lr": 0.05},
             "DASGO": {"lr": 0.05}, "AdamW": {"lr": 0.05}}
CASES = {spec.name: (spec.qualified_name, _TINY_FIT[spec.name]) for spec in registry.REGISTRY}


def _case(name: str) -> tuple[str, dict]:
    return CASES[name]


def class_name(name: str) -> str:
    """The optimizer's class name, as checkpoints and RankRecorder record it (AdamW is ShardedAdamW)."""
    return registry.get(name).attr


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# every optimizer on 1 process and on 2 forked ones; one ddp_spawn fit (SOAA) covers the pickling path
FITS = [(n, d, None) for n in CASES for d in (1, 2)] + [("SOAA", 2, "ddp_spawn")]


@pytest.mark.parametrize(("name", "devices", "strategy"), FITS)
def test_fit_tiny_model(name: str, devices: int, strategy: str | None, tmp_path: Path) -> None:
    class_path, init_args = _case(name)
    model = TinyRegressor(OptimizerFactory(class_path, init_args))
    logger = CSVLogger(str(tmp_path), name="logs", version=0)
    trainer = make_trainer(
        tmp_path, devices=devices, strategy=strategy, max_steps=8, logger=logger, log_every_n_steps=1,
        callbacks=[LossToOptimizer(), BatchToOptimizer(), OptimizerDiagnostics(), RankRecorder(tmp_path)],
    )
    trainer.fit(model)
    assert trainer.state.finished
    recs = load_records(tmp_path, "", devices)
    for r in recs:
        assert r["optimizer"] == class_name(name)
        assert r["world_size"] == devices
        assert r["global_step"] == 8
        # sharding is automatic: the communicator spans the DDP ranks
        assert r["comm_world_size"] == devices
        assert r["stats"]["steps"] == 8.0
        assert r["stats"]["skipped_steps"] == 0.0
        losses = r["losses"]
        assert losses[-1] < losses[0], f"{name} on {devices} device(s) did not reduce the loss: {losses}"
    # replicas stay identical (owners all-gather their blocks)
    for r in recs[1:]:
        torch.testing.assert_close(r["params"], recs[0]["params"], rtol=0, atol=1e-12)
    if devices == 2:
        # each rank owns a strict subset of the blocks
        assert sum(r["owned_blocks"] for r in recs) == 4 and all(r["owned_blocks"] < 4 for r in recs)
    # diagnostics reach the logger (rank 0 writes the CSV)
    rows = _read_csv(tmp_path / "logs" / "version_0" / "metrics.csv")
    keys = rows[0].keys()
    assert f"{name}/steps" in keys and f"{name}/lr" in keys
    assert [float(x[f"{name}/world_size"]) for x in rows if x.get(f"{name}/world_size")] == [devices]
    if devices == 2:
        comm = [float(x[f"{name}/comm_bytes"]) for x in rows if x.get(f"{name}/comm_bytes")]
        assert comm and all(c > 0 for c in comm), "communication bytes per step must be logged under DDP"
