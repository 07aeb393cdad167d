"""A client optimizer passed in code, ``deepspeed_ext.initialize(model, config_without_optimizer_block,
optimizer=DeepSpeedClientOptimizer.from_optimizer(opt, ...))`` (the route the refusal of a raw optimizer
points to), is checked and run exactly as one named in the JSON.

Before, that route skipped the JSON route's protections: stage-0 bf16 took DeepSpeed's zero-gradient step
during initialize (1.55e-2 off), stage-0 fp16 was accepted (1.5e-2 off), ZeRO-3 failed telling the user to
use deepspeed_ext.initialize (which they did), SOAA got no loss, EGN at ZeRO-2 counted steps while the
model did not move, and a client built for another stage failed with misleading errors.
"""

from __future__ import annotations

import pytest
import torch

from tests.deepspeed._workers import w_client_route, w_embedding_route
from tests.harness.compare import max_abs_diff
from tests.harness.distributed import run_distributed

pytestmark = [pytest.mark.deepspeed, pytest.mark.timeout(240)]

STEPS = 3
ADAMW = {"lr": 2e-2, "weight_decay": 0.1}
SOAA = {"lr": 1e-2, "weight_decay": 0.1, "gamma": 0.1, "total_steps": 10}


def test_client_passed_in_code_runs_as_the_json_route(tmp_path):
    same = [(0, "bf16", "AdamW", ADAMW), (3, "fp32", "AdamW", ADAMW), (0, "fp32", "SOAA", SOAA)]
    jobs = [(route, *case) for case in same for route in ("json", "client")]
    jobs += [("client", 0, "fp16", "AdamW", ADAMW), ("client", 2, "fp32", "AdamW", ADAMW, 1)]
    res = run_distributed(w_client_route, 2, tmp_path, jobs, STEPS, timeout=220)
    for r in res:
        for stage, dtype, name, _ in same:
            a, b = r[("json", stage, dtype, name)], r[("client", stage, dtype, name)]
            assert "error" not in a and "error" not in b, (a.get("error"), b.get("error"))
            assert b["training_steps"] == STEPS and b["ignored"] == a["ignored"], (stage, dtype, name, b)
            assert max_abs_diff(a["params"], b["params"]) == 0.0, (stage, dtype, name)
            if name == "SOAA":  # the loss reached SOAA's trust region
                assert b["stats"]["loss"] == a["stats"]["loss"] and b["stats"]["t"] == STEPS
        assert r[("client", 0, "fp16", "AdamW")]["error"].startswith(
            "ValueError: Invalid combination optimizer.type='lightning_soaa.AdamW' with fp16.enabled=true at "
            "zero_optimization.stage=0")
        msg = r[("client", 2, "fp32", "AdamW")]["error"]
        assert "DeepSpeedClientOptimizer(zero_stage=1) with zero_optimization.stage=2" in msg, msg


def test_client_route_checks_layout_module_and_duplicate_optimizer():
    """Refused before any process group or engine exists."""
    import torch

    import deepspeed_ext
    from deepspeed_ext.client import DeepSpeedClientOptimizer
    from deepspeed_ext.egn_client import DeepSpeedEGNOptimizer
    from lightning_soaa.optim.asgo import ASGO
    from lightning_soaa.optim.egn import EGN

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1}}
    asgo = DeepSpeedClientOptimizer.from_optimizer(ASGO(model.named_parameters(), lr=1e-2), zero_stage=1,
                                                   layout="elementwise")
    with pytest.raises(ValueError, match=r"layout='elementwise'\) for lightning_soaa.ASGO. Must be 'structured'"):
        deepspeed_ext.initialize(model=model, config=cfg, optimizer=asgo)
    egn = DeepSpeedEGNOptimizer(torch.nn.Linear(4, 2), EGN, {"loss": "mse"})
    with pytest.raises(ValueError, match="built over another module"):
        deepspeed_ext.initialize(model=model, config={**cfg, "zero_optimization": {"stage": 0}}, optimizer=egn)
    egn = DeepSpeedEGNOptimizer(model, EGN, {"loss": "mse"})
    with pytest.raises(ValueError, match=r"'lightning_soaa.EGN' with zero_optimization.stage=2.*ZeRO stages: 0"):
        deepspeed_ext.initialize(model=model, config={**cfg, "zero_optimization": {"stage": 2}}, optimizer=egn)
    with pytest.raises(ValueError, match=r"Invalid gradient_clipping=1.0 with optimizer.type='lightning_soaa.EGN'"):
        deepspeed_ext.initialize(model=model, config={**cfg, "zero_optimization": {"stage": 0},
                                                      "gradient_clipping": 1.0}, optimizer=egn)
    with pytest.raises(ValueError, match="not both"):
        deepspeed_ext.initialize(model=model, config={**cfg, "optimizer": {"type": "Adam"}}, optimizer=asgo)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("layout", ["elementwise", "structured"])
def test_an_egn_built_in_code_is_pointed_to_its_own_client(layout):
    """Found by a docs hunter: the README's route for an optimizer built in code,
    ``DeepSpeedClientOptimizer.from_optimizer(opt, ...)``, given an EGN (built over the module, as EGN must be)
    failed with "Invalid model=list. EGN needs the nn.Module itself ..., not its parameters", which blamed the
    user for what the client did (it hands its optimizer param groups). Now the client refuses EGN itself,
    naming the route that takes it."""
    import deepspeed_ext
    from deepspeed_ext.client import DeepSpeedClientOptimizer
    from lightning_soaa.optim.egn import EGN

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"DeepSpeedClientOptimizer\(optimizer_cls=EGN\).*"
                                         r"deepspeed_ext.DeepSpeedEGNOptimizer\(model, EGN, \{.*stage 0"):
        DeepSpeedClientOptimizer.from_optimizer(EGN(model, loss="mse"), zero_stage=0, layout=layout)
    with pytest.raises(ValueError, match=r"DeepSpeedEGNOptimizer"):
        deepspeed_ext.DeepSpeedClientOptimizer(model.parameters(), EGN, {"loss": "mse"}, zero_stage=0)
    assert not torch.distributed.is_initialized()


def test_asgo_named_in_the_json_steps_an_embedding_named_wte_by_adamw(tmp_path):
    """Found by a hunter: a JSON naming ``lightning_soaa.ASGO``/``DASGO``, given the model alone, handed the
    optimizer bare parameters and their names, so an ``nn.Embedding`` named ``wte`` (no "emb" in its name)
    was preconditioned as a matrix (spec/algorithms.md §3.4: embeddings go to the AdamW fallback). Now the
    registry's module groups are used: at ZeRO-0 every parameter equals ASGO over ``asgo_param_groups(model)``
    in one process after 3 steps; at ZeRO-2/3, whose partitions cut the other matrices (other blocks, so
    other gradients after the first step), the table (tied to the head or not) does after one step, and
    every piece of it sits in a ``use_asgo=False`` group."""
    jobs = [(name, stage, tied, STEPS if stage == 0 else 1) for name in ("ASGO", "DASGO") for stage in (0, 2, 3)
            for tied in (False, True)]
    res = run_distributed(w_embedding_route, 2, tmp_path, jobs, {"lr": 2e-2}, timeout=220)
    for r in res:
        for job in jobs:
            got = r[job]
            for n, a, b in zip(got["names"], got["params"], got["reference"]):
                assert a.isfinite().all(), (job, n)
                if job[1] == 0 or n == "wte.weight":
                    torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m, n=n, j=job: f"{j} {n}: {m}")
            routed = {nm.removesuffix("[cut]"): use for names, use in got["inner_groups"] for nm in names or ()
                      if nm.startswith("wte.")}
            assert routed == {"wte.weight": False}, (job, got["inner_groups"])


def test_a_checkpoint_saved_with_the_table_in_the_one_group_is_refused_naming_it(tmp_path):
    """Found by a reviewer: at ZeRO-1/2 DeepSpeed refused a checkpoint saved before the routes moved the table
    named ``wte`` to a group of its own with "parameter-alignment layout does not match the current
    zero_optimization.parameter_alignment setting", at ZeRO-3 our layout check said "resume with the same world
    size and ZeRO config" (both were the same). Now every rank refuses it before DeepSpeed reads it, naming
    the parameter."""
    from tests.deepspeed._workers import w_regrouped_checkpoint

    res = run_distributed(w_regrouped_checkpoint, 2, tmp_path, str(tmp_path), [0, 1, 2, 3], timeout=300)
    for r in res:
        for stage, msg in r.items():
            assert "'wte.weight'" in msg and "param group" in msg, (stage, msg)


def test_a_sharding_option_of_an_optimizer_built_in_code_is_carried_over():
    """``from_optimizer`` rebuilds the optimizer from its constructor arguments: ``replica_check_every`` lives in
    ``opt.sharding`` (not in its config or defaults) and fell back to the default."""
    from deepspeed_ext.client import DeepSpeedClientOptimizer
    from lightning_soaa import SOAA

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    client = DeepSpeedClientOptimizer.from_optimizer(SOAA(model.parameters(), lr=1e-2, replica_check_every=7),
                                                     zero_stage=0, layout="elementwise")
    assert client.hyperparams["replica_check_every"] == 7
