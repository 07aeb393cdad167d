"""DeepSpeed 0.19 runs a direct ``loss.backward()`` at ZeRO 1-3 (its torch-style backward), which hands SOAA no
loss: ``engine.step()`` then raised SOAA's own advice, which names plain torch, Lightning and Fabric but not
what works under DeepSpeed. The error now says it (``engine.backward(loss)``, or ``set_loss`` after a direct
backward), on every rank, with the weights unchanged; and that second route trains as ``engine.backward``."""

from __future__ import annotations

import pytest

from tests.deepspeed._workers import w_torch_style_backward
from tests.harness.compare import max_abs_diff
from tests.harness.distributed import run_distributed

pytestmark = [pytest.mark.deepspeed, pytest.mark.timeout(240)]

STAGES = [2, 3]
STEPS = 3


def test_a_direct_loss_backward_under_deepspeed_names_what_hands_soaa_its_loss(tmp_path):
    res = run_distributed(w_torch_style_backward, 2, tmp_path, STAGES, STEPS, timeout=220)
    for rank_res in res:
        for stage in STAGES:
            r = rank_res[stage]
            assert r["error"] is not None, stage
            assert r["error"].startswith("SOAA needs the mini-batch loss of every step"), r["error"]
            assert "missing on 2 of 2 rank(s)" in r["error"]
            assert "engine.backward(loss)" in r["error"]
            assert "find_client_optimizer(engine).set_loss(loss)" in r["error"]
            assert r["moved"] == 0.0
            assert r["set_loss"]["t"] == r["engine.backward"]["t"] == STEPS
            assert max_abs_diff(r["set_loss"]["params"], r["engine.backward"]["params"]) == 0.0
