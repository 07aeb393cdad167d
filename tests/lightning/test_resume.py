"""Lightning checkpoints hold the consolidated, world-size independent optimizer state:
a run checkpointed on 2 processes resumes on 1 (and on 2) and continues exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_soaa import registry
from lightning_soaa.lightning import BatchToOptimizer, LossToOptimizer, OptimizerFactory
from tests.lightning.helpers import RankRecorder, TinyRegressor, load_records, make_trainer
from tests.lightning.test_strategies import _case, class_name

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(240)]


def _assert_state_equal(a: object, b: object, path: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=path)
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: {type(b).__name__}"
        assert set(map(str, a)) == set(map(str, b)), f"{path}: {sorted(map(str, a))} vs {sorted(map(str, b))}"
        bs = {str(k): v for k, v in b.items()}
        for k, v in a.items():
            _assert_state_equal(v, bs[str(k)], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_state_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.parametrize("name", registry.names())
def test_resume_2_to_1(name: str, tmp_path: Path) -> None:
    """2 -> 1 for every optimizer; 2 -> 2 as well for one of them (each spawn costs seconds)."""
    class_path, init_args = _case(name)
    if name == "EGN":  # momentum gives EGN per-parameter state to carry over
        init_args = {**init_args, "momentum": 0.5}
    factory = OptimizerFactory(class_path, init_args)
    ckpt_dir = tmp_path / "ckpt"
    also_two = name == "AdamW"
    # Uninterrupted: 2 processes x batch 8, 2 epochs of 4 steps, a checkpoint after each epoch.
    full = make_trainer(
        tmp_path, devices=2, max_steps=-1, max_epochs=2, enable_checkpointing=True,
        callbacks=[LossToOptimizer(), BatchToOptimizer(), RankRecorder(tmp_path, "full-"),
                   ModelCheckpoint(dirpath=str(ckpt_dir), save_top_k=-1, every_n_epochs=1,
                                   save_on_train_epoch_end=True)],
    )
    full.fit(TinyRegressor(factory, batch_size=8))
    ckpt = ckpt_dir / "epoch=0-step=4.ckpt"
    assert ckpt.exists(), sorted(p.name for p in ckpt_dir.iterdir())
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    assert saved["lightning_soaa"]["optimizer"] == class_name(name)
    # the consolidated state holds every block, not only rank 0's
    n_params = len(list(TinyRegressor().parameters()))
    assert len(saved["state"]) == n_params

    # Resume on 1 process with the same global batch (16): same data, same optimizer state.
    one = make_trainer(tmp_path, devices=1, max_steps=-1, max_epochs=2,
                       callbacks=[LossToOptimizer(), BatchToOptimizer(), RankRecorder(tmp_path, "one-")])
    one.fit(TinyRegressor(factory, batch_size=16), ckpt_path=str(ckpt))
    if also_two:  # ... and on 2 processes again.
        two = make_trainer(tmp_path, devices=2, max_steps=-1, max_epochs=2,
                           callbacks=[LossToOptimizer(), BatchToOptimizer(), RankRecorder(tmp_path, "two-")])
        two.fit(TinyRegressor(factory, batch_size=8), ckpt_path=str(ckpt))

    ref = load_records(tmp_path, "full-", 2)[0]
    r1 = load_records(tmp_path, "one-", 1)[0]
    r2 = load_records(tmp_path, "two-", 2) if also_two else []
    # The optimizer continues from exactly the saved state, whatever the world size.
    _assert_state_equal(saved["state"], r1["start_state"]["state"])
    _assert_state_equal(saved["lightning_soaa"]["global"], r1["start_state"]["lightning_soaa"]["global"])
    for r in r2:
        _assert_state_equal(saved["state"], r["start_state"]["state"])
    assert r1["comm_world_size"] == 1 and all(r["comm_world_size"] == 2 for r in r2)
    if name in ("SOAA", "EGN"):  # optimizer-wide scalars (SOAA's d and loss average, EGN's damping) too
        assert saved["lightning_soaa"]["global"], "the global trust-region / damping state must be saved"
    assert r1["global_step"] == 8 and r1["stats"]["steps"] == 8.0
    # ... and the continued runs match the uninterrupted one (float64; DDP averages in a different order).
    torch.testing.assert_close(r1["params"], ref["params"], rtol=0, atol=1e-10)
    for r in r2:
        torch.testing.assert_close(r["params"], ref["params"], rtol=0, atol=1e-12)
