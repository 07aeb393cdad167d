"""EGN under DeepSpeed: ZeRO stage 0, fp32 (other stages are refused before training, see test_config)."""

from __future__ import annotations

import pytest
import torch

from tests.deepspeed._workers import w_egn, w_egn_accumulation
from tests.harness.compare import max_abs_diff
from tests.harness.distributed import run_distributed

pytestmark = [pytest.mark.deepspeed, pytest.mark.timeout(200)]


def test_egn_stage0_equals_sharded_egn(tmp_path):
    params = {"loss": "mse", "lr": 0.5, "damping": 1.0, "momentum": 0.5, "line_search": True}
    res = run_distributed(w_egn, 2, tmp_path, params, 4, timeout=180)
    for r in res:
        assert r["wrapper"] == "DeepSpeedEGNOptimizer" and r["training_steps"] == 4
        diff = max_abs_diff(r["params"], r["ref"])
        assert diff <= 1e-6
        moved = max_abs_diff(r["params"], _init())
        assert moved > 1e-3
        assert r["stats"]["damping"] == r["ref_stats"]["damping"]


def _init():
    import torch

    from tests.deepspeed._workers import SIZES
    from tests.harness.models import tiny_mlp

    return [p.detach() for p in tiny_mlp(0, torch.float32, SIZES).parameters()]


def test_egn_gradient_accumulation_steps_on_the_whole_accumulated_batch(tmp_path):
    """gradient_accumulation_steps=2 with set_batch on every micro-batch: EGN steps once per training step
    on the concatenation of both micro-batches (as BatchToOptimizer under Lightning). Before, each set_batch
    replaced the last and EGN stepped on the last micro-batch alone (1.15e-1 off). A step that got fewer
    set_batch calls than micro-batches is refused, on every rank, before anything changes."""
    params = {"loss": "mse", "lr": 0.5, "damping": 1.0}
    res = run_distributed(w_egn_accumulation, 2, tmp_path, params, 3, 2, timeout=180)
    for r in res:
        assert r["training_steps"] == 3
        diff = max_abs_diff(r["params"], r["ref"])
        assert diff <= 1e-6, diff
        assert r["unchanged"]
    assert "got 1 set_batch() calls for a step with gradient_accumulation_steps=2" in res[0]["error"], res[0]["error"]
    assert "rank(s) [0] raised an error before" in res[1]["error"], res[1]["error"]  # raised together, not left waiting


def test_egn_refuses_gradient_clipping():
    """EGN never reads a gradient: DeepSpeed's gradient clipping would be silently ignored (Lightning's
    gradient_clip_val is refused with EGN for the same reason). Left out, it is set to 0.0 (DeepSpeed's
    default 1.0 would clip gradients nobody reads)."""
    from deepspeed_ext.ds_config import parse_config

    cfg = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 0},
           "optimizer": {"type": "lightning_soaa.EGN", "params": {"loss": "mse"}}}
    with pytest.raises(ValueError, match=r"Invalid gradient_clipping=1.0 with optimizer.type='lightning_soaa.EGN'.*"
                                         r"Must be 0.0 \(or left out\)"):
        parse_config({**cfg, "gradient_clipping": 1.0})
    assert parse_config(cfg).ds_config["gradient_clipping"] == 0.0
    assert parse_config({**cfg, "gradient_clipping": 0}).ds_config["gradient_clipping"] == 0


def test_the_clients_damping_is_the_egn_it_steps() -> None:
    """``engine.optimizer.damping = x`` set an attribute of the client that its EGN never read (silently):
    the client's ``damping`` is its EGN's, checked as EGN checks it."""
    from deepspeed_ext.egn_client import DeepSpeedEGNOptimizer
    from lightning_soaa.optim.egn import EGN

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    client = DeepSpeedEGNOptimizer(model, EGN, {"loss": "mse", "lr": 1.0, "damping": 0.5})
    assert client.damping == 0.5 and client.inner is None  # read before the first step: nothing built
    client.damping = 2.0  # (building EGN is a collective at W > 1: one rank's read or write hung every rank)
    with pytest.raises(ValueError, match=r"Invalid opt\.damping=-1"):
        client.damping = -1
    assert client._ensure_inner().damping == 2.0  # the EGN built at the first step starts from it
    client.damping = 3.0
    assert client.inner.damping == 3.0 == client.damping
    with pytest.raises(ValueError, match=r"Invalid opt\.damping=-1"):
        client.damping = -1
    assert client.inner.damping == 3.0
