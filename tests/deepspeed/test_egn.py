"""EGN under DeepSpeed: ZeRO stage 0, fp32 (other stages are refused before training, see test_config)."""

from __future__ import annotations

import pytest

from tests.deepspeed._workers import w_egn
from tests.harness.distributed import run_distributed

pytestmark = [pytest.mark.deepspeed, pytest.mark.timeout(200)]


def test_egn_stage0_equals_sharded_egn(tmp_path):
    params = {"loss": "mse", "lr": 0.5, "damping": 1.0, "momentum": 0.5, "line_search": True}
    res = run_distributed(w_egn, 2, tmp_path, params, 4, timeout=180)
    for r in res:
        assert r["wrapper"] == "DeepSpeedEGNOptimizer" and r["training_steps"] == 4
        diff = max(float((a - b).abs().max()) for a, b in zip(r["params"], r["ref"]))
        assert diff <= 1e-6
        moved = max(float((a - b).abs().max()) for a, b in zip(r["params"], _init()))
        assert moved > 1e-3
        assert r["stats"]["damping"] == r["ref_stats"]["damping"]


def _init():
    import torch

    from tests.deepspeed._workers import SIZES
    from tests.harness.models import tiny_mlp

    return [p.detach() for p in tiny_mlp(0, torch.float32, SIZES).parameters()]
