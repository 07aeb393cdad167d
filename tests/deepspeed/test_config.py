"""The DeepSpeed JSON side: names, parameters, stages, flags -- all checked before any engine exists.

No process group here: these run in-process in milliseconds.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import deepspeed_ext
from deepspeed_ext.client import DeepSpeedClientOptimizer, StateLayoutError
from deepspeed_ext.ds_config import parse_config
from deepspeed_ext.registry import lookup, valid_names
from lightning_soaa.optim.adamw import ShardedAdamW
from lightning_soaa.registry import REGISTRY, StepNeeds
from tests.deepspeed._workers import w_raw_deepspeed
from tests.harness.distributed import run_distributed
from tests.harness.models import batch, loss_fn, qkv_pair, set_qkv_trainable

pytestmark = pytest.mark.deepspeed

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


def _cfg(opt_type: str = "lightning_soaa.AdamW", stage: int = 2, **params):
    return {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
            "optimizer": {"type": opt_type, "params": params}}


def test_unknown_optimizer_lists_the_valid_ones():
    with pytest.raises(ValueError) as exc:
        parse_config(_cfg("lightning_soaa.Adamz"))
    msg = str(exc.value)
    assert "'lightning_soaa.Adamz'" in msg
    for name in valid_names():
        assert name in msg
    assert {"lightning_soaa.SOAA", "lightning_soaa.ASGO", "lightning_soaa.AdamW"} <= set(valid_names())


def test_unknown_param_key_lists_the_accepted_ones():
    with pytest.raises(ValueError, match=r"Invalid optimizer.params key 'lrr'.*Must be one of .*\blr\b.*weight_decay"):
        parse_config(_cfg(lrr=0.1))


@pytest.mark.parametrize("key", ["shard", "process_group", "comm", "grad_reduction"])
def test_reserved_keys_are_refused(key):
    with pytest.raises(ValueError, match=f"'{key}'.*sets it itself"):
        parse_config(_cfg(**{key: True}))


def test_invalid_param_value_raises_before_deepspeed_starts():
    """Hyperparameter values are checked by building the client optimizer, which happens before
    deepspeed.init_distributed / initialize: no process group exists here and none is needed."""
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"Invalid betas\[1\]=1.5"):
        deepspeed_ext.initialize(model=model, config=_cfg(betas=[0.9, 1.5]))
    assert not torch.distributed.is_initialized()


def test_asgo_nesterov_from_the_json_steps_as_asgo_with_it():
    """``"params": {"nesterov": true}`` reaches ASGO (a constructor keyword), checked before DeepSpeed starts
    (a string refused naming field, value and what is allowed); the client's step at stage 0 equals ASGO's
    own, bit for bit."""
    from lightning_soaa import ASGO

    assert parse_config(_cfg("lightning_soaa.ASGO", nesterov=True)).optimizer_params == {"nesterov": True}
    with pytest.raises(ValueError, match=r"Invalid nesterov='true'\. Must be True or False\."):
        deepspeed_ext.initialize(model=torch.nn.Linear(3, 2), config=_cfg("lightning_soaa.ASGO", nesterov="true"))
    assert not torch.distributed.is_initialized()
    params = parse_config(_cfg("lightning_soaa.ASGO", stage=0, lr=0.1, nesterov=True)).optimizer_params
    ws = [torch.nn.Parameter(torch.randn(8, 6, generator=torch.Generator().manual_seed(0))) for _ in range(2)]
    client = DeepSpeedClientOptimizer([("w", ws[0])], ASGO, params, zero_stage=0, layout="structured")
    plain = ASGO([("w", ws[1])], lr=0.1, nesterov=True)
    for t in range(3):
        g = torch.randn(8, 6, generator=torch.Generator().manual_seed(10 + t))
        for w, opt in zip(ws, (client, plain)):
            w.grad = g.clone()
            opt.step()
    assert torch.equal(ws[0].detach(), ws[1].detach())
    assert client.inner.param_groups[0]["nesterov"] is True


def _asgo_client(w: torch.nn.Parameter, **params: Any) -> DeepSpeedClientOptimizer:
    from lightning_soaa import ASGO

    params = parse_config(_cfg("lightning_soaa.ASGO", stage=0, lr=0.1, **params)).optimizer_params
    return DeepSpeedClientOptimizer([("w", w)], ASGO, params, zero_stage=0, layout="structured")


def _client_steps(w: torch.nn.Parameter, client: DeepSpeedClientOptimizer, ts: range) -> None:
    for t in ts:
        w.grad = torch.randn(8, 6, generator=torch.Generator().manual_seed(10 + t))
        client.step()


def test_asgo_nesterov_is_the_json_default_and_an_older_client_checkpoint_resumes_without_it():
    """Without ``nesterov`` in the JSON the client's ASGO has the default (True, through ASGOConfig), with
    ``false`` the paper's rule. A client state saved before the option existed (no key in its groups nor in
    the inner optimizer's) resumes with nesterov=False in both, and so steps exactly as the run saved without
    it (the client copies its groups into the inner ones at every step: True there would have won)."""
    from deepspeed_ext.client import STATE_KEY

    def w0() -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.randn(8, 6, generator=torch.Generator().manual_seed(0)))

    for params, value in (({}, True), ({"nesterov": False}, False)):
        w = w0()
        client = _asgo_client(w, **params)
        _client_steps(w, client, range(1))
        assert client.param_groups[0]["nesterov"] is value and client.inner.param_groups[0]["nesterov"] is value
    ref = w0()
    _client_steps(ref, _asgo_client(ref, nesterov=False), range(6))
    saved = w0()
    client = _asgo_client(saved, nesterov=False)
    _client_steps(saved, client, range(3))
    sd = client.state_dict()
    sd["param_groups"] = [{k: v for k, v in g.items() if k != "nesterov"} for g in sd["param_groups"]]
    inner = sd[STATE_KEY]["inner"]
    inner["param_groups"] = [{k: v for k, v in g.items() if k != "nesterov"} for g in inner["param_groups"]]
    resumed = torch.nn.Parameter(saved.detach().clone())
    again = _asgo_client(resumed)
    again.load_state_dict(sd)
    assert again.param_groups[0]["nesterov"] is False and again.inner.param_groups[0]["nesterov"] is False
    _client_steps(resumed, again, range(3, 6))
    assert torch.equal(resumed.detach(), ref.detach())
    default = w0()
    _client_steps(default, _asgo_client(default), range(6))
    assert not torch.equal(default.detach(), ref.detach())


def test_egn_only_at_stage_0_in_fp32_with_a_pointer_to_what_works():
    for stage in (1, 2, 3):
        with pytest.raises(ValueError) as exc:
            parse_config(_cfg("lightning_soaa.EGN", stage=stage))
        msg = str(exc.value)
        assert f"zero_optimization.stage={stage}" in msg and "supports ZeRO stages: 0" in msg
        assert "Use zero_optimization.stage 0" in msg and "strategy='ddp'" in msg
    assert parse_config(_cfg("lightning_soaa.EGN", stage=0, damping=0.5)).optimizer_params == {"damping": 0.5}
    cfg = _cfg("lightning_soaa.EGN", stage=0)
    cfg["bf16"] = {"enabled": True}
    with pytest.raises(ValueError, match=r"bf16.enabled=true.*Must run in fp32"):
        parse_config(cfg)


def test_soaa_same_batch_needs_a_closure_deepspeed_never_passes():
    with pytest.raises(ValueError, match="acceptance='same_batch'.*Must be one of 'lagged'"):
        parse_config(_cfg("lightning_soaa.SOAA", acceptance="same_batch"))


@pytest.mark.parametrize("name", ["lightning_soaa.AdamW", "lightning_soaa.SOAA", "lightning_soaa.DASGO"])
def test_fp16_at_stage_0_is_refused(name):
    """DeepSpeed 0.19's stage-0 fp16 wrapper divides the gradients by a loss scale engine.backward never
    applied: the optimizer saw them 65536x too small (SOAA 2.4e-3 off an fp32 run in 5 steps, where ZeRO-2
    fp16 is 2.1e-4), with no overflow ever detected. fp16 at stage >= 1 and bf16 at stage 0 still parse."""
    cfg = _cfg(name, stage=0)
    cfg["fp16"] = {"enabled": True}
    with pytest.raises(ValueError, match=r"fp16.enabled=true at zero_optimization.stage=0.*65536x too small"):
        parse_config(cfg)
    parse_config({**_cfg(name, stage=1), "fp16": {"enabled": True}})
    parse_config({**_cfg(name, stage=0), "bf16": {"enabled": True}})


def test_soaa_without_managed_gradient_accumulation_is_refused():
    """With managed_gradient_accumulation=false DeepSpeed reports the accumulation boundary only inside
    engine.step(), so engine.backward never handed SOAA its loss (every step failed with 'needs the loss')."""
    cfg = {**_cfg("lightning_soaa.SOAA", stage=0), "managed_gradient_accumulation": False}
    with pytest.raises(ValueError, match="managed_gradient_accumulation=false"):
        parse_config(cfg)
    parse_config({**_cfg("lightning_soaa.AdamW", stage=0), "managed_gradient_accumulation": False})


def test_a_lightning_soaa_optimizer_object_is_not_handed_to_deepspeed_raw():
    """Handed to deepspeed.initialize as it is, DeepSpeed stepped it over ZeRO's flat partitions (3e-2 off
    one process at ZeRO-2 for ShardedAdamW and ASGO); refused before DeepSpeed starts, pointing to the
    config's optimizer section."""
    model = torch.nn.Linear(4, 2)
    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2},
           "zero_allow_untested_optimizer": True}
    with pytest.raises(ValueError, match=r'optimizer= is a lightning_soaa ShardedAdamW.*"lightning_soaa.ShardedAdamW"'):
        deepspeed_ext.initialize(model=model, config=cfg, optimizer=ShardedAdamW(model.parameters(), lr=0.1))


@pytest.mark.parametrize("name", [s.name for s in REGISTRY if s.needs is not StepNeeds.BATCH])
def test_groups_replaced_by_deepspeeds_own_initialize_are_refused(name, tmp_path):
    """deepspeed.initialize (DeepSpeed's own, as Lightning's stock DeepSpeedStrategy calls it) handed the
    optimizer object: ZeRO-2 puts its flat partitions into the groups, and the optimizer stepped the
    original tensors, which had no gradients; the model never changed, with no error (0.29 off in 6
    steps). Refused at the first step on every rank."""
    results = run_distributed(w_raw_deepspeed, 2, tmp_path, name, timeout=240)
    assert all("is no longer the list of tensors the optimizer was built over" in r for r in results), results


def test_nvme_offload_is_refused():
    cfg = _cfg()
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "nvme", "nvme_path": "/tmp"}
    with pytest.raises(ValueError, match="nvme.*Must be 'cpu' or 'none'"):
        parse_config(cfg)


@pytest.mark.parametrize("name,stage", [(n, s) for n in valid_names() for s in lookup(n).stages if s >= 1])
def test_elastic_checkpoints_are_refused(name, stage):
    """DeepSpeed's elastic checkpoints (ZeRO 1-2) hold only its per-partition tensors: SOAA's trust region
    and all of ASGO's state were missing, and their load ended in a bare AssertionError (ZeRO-3 refuses
    them itself, at save). Refused when the config is read."""
    cfg = _cfg(name, stage=stage)
    cfg["zero_optimization"]["elastic_checkpoint"] = True
    with pytest.raises(ValueError, match=r"Invalid zero_optimization.elastic_checkpoint=true with "
                                         rf"optimizer.type='{re.escape(name)}'"):
        parse_config(cfg)
    cfg["zero_optimization"]["elastic_checkpoint"] = False
    parse_config(cfg)


def test_bad_stage_is_refused():
    with pytest.raises(ValueError, match=r"Invalid zero_optimization.stage=4"):
        parse_config(_cfg(stage=4))


def test_flags_set_for_deepspeed_and_block_removed():
    p = parse_config(_cfg(stage=1, lr=0.1))
    assert "optimizer" not in p.ds_config and p.ds_config["zero_allow_untested_optimizer"] is True
    assert p.optimizer_params == {"lr": 0.1} and p.zero_stage == 1
    cfg = _cfg(stage=2)
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    assert parse_config(cfg).ds_config["zero_force_ds_cpu_optimizer"] is False
    assert "zero_allow_untested_optimizer" not in parse_config(_cfg(stage=0)).ds_config


def test_deepspeed_builtin_optimizers_pass_through_untouched():
    cfg = {"zero_optimization": {"stage": 1}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    p = parse_config(cfg)
    assert p.entry is None and p.ds_config == cfg


def test_config_may_be_a_path_or_json_text(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(_cfg(stage=3)))
    assert parse_config(str(path)).zero_stage == 3
    assert parse_config(json.dumps(_cfg(stage=1))).zero_stage == 1
    with pytest.raises(ValueError, match="Must be a dict, a JSON string or the path"):
        parse_config(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_parse_and_build(path):
    """Every example config names a registered optimizer, at a stage it supports, with valid params."""
    parsed = parse_config(path)
    if parsed.entry is None:
        return
    cls = parsed.entry.load()
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    if parsed.entry.layout == "model":
        from deepspeed_ext.egn_client import DeepSpeedEGNOptimizer

        egn = DeepSpeedEGNOptimizer(model, cls, parsed.optimizer_params)
        assert parsed.zero_stage == 0 and egn.zero_stage == 0
        return
    client = DeepSpeedClientOptimizer(model.parameters(), cls, parsed.optimizer_params,
                                      zero_stage=parsed.zero_stage, layout=parsed.entry.layout)
    assert client.zero_stage == parsed.zero_stage


def test_zero_partition_state_refuses_another_layout():
    """ZeRO-1/2/3 state is per partition: loading it into another partitioning says what to do."""
    flat = torch.zeros(10, requires_grad=True)
    a = DeepSpeedClientOptimizer([flat], ShardedAdamW, {"lr": 0.1}, zero_stage=1)
    flat.grad = torch.ones(10)
    a.step()
    sd = a.state_dict()
    other = torch.zeros(6, requires_grad=True)
    b = DeepSpeedClientOptimizer([other], ShardedAdamW, {"lr": 0.1}, zero_stage=1)
    before = other.detach().clone()
    with pytest.raises(StateLayoutError, match="same world size and ZeRO config.*load_optimizer_states=False"):
        b.load_state_dict(sd)
    assert torch.equal(other.detach(), before) and b.inner is not None and not any(b.inner.state.values())
    c = DeepSpeedClientOptimizer([torch.zeros(10, requires_grad=True)], ShardedAdamW, {"lr": 0.1}, zero_stage=1)
    c.load_state_dict(sd)  # same layout: fine
    assert int(next(iter(c.inner.state.values()))["step"]) == 1


def test_client_refuses_a_checkpoint_saved_with_other_block_options():
    """ASGO's block options (here batch_dims) decide its blocks: under ZeRO-1/2/3 the inner load refused
    another value only on ranks holding a parameter it acts on, so the client refuses it first, on all."""
    from lightning_soaa import ASGO

    def make(batch_dims: int) -> tuple[DeepSpeedClientOptimizer, torch.nn.Parameter]:
        experts = torch.nn.Parameter(torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)))
        return DeepSpeedClientOptimizer([experts], ASGO, {"lr": 0.1, "batch_dims": batch_dims}, zero_stage=0,
                                        layout="structured"), experts

    a, pa = make(1)
    pa.grad = torch.ones_like(pa)
    a.step()
    sd = a.state_dict()
    b, pb = make(0)
    before = pb.detach().clone()
    with pytest.raises(StateLayoutError, match=r"saved with batch_dims=1 and this run has batch_dims=0"):
        b.load_state_dict(sd)
    assert torch.equal(pb.detach(), before) and not any(b._ensure_inner().state.values())
    c, _ = make(1)
    c.load_state_dict(sd)  # the same option: loads
    # other block options are the inner load's to judge: a larger max_block_size re-cuts nothing and loads
    w = torch.nn.Parameter(torch.randn(8, 6))
    d = DeepSpeedClientOptimizer([("w", w)], ASGO, {"lr": 0.1, "max_block_size": 1024}, zero_stage=0,
                                 layout="structured")
    w.grad = torch.ones_like(w)
    d.step()
    DeepSpeedClientOptimizer([("w", torch.nn.Parameter(torch.randn(8, 6)))], ASGO, {"lr": 0.1, "max_block_size": 2048},
                             zero_stage=0, layout="structured").load_state_dict(d.state_dict())


def test_client_refuses_bad_group_options_at_construction(caplog: pytest.LogCaptureFixture) -> None:
    """A param group's own option (ASGO's batch_dims here) was checked only when the inner optimizer was
    built, at the first engine step; and the check's probe parameter made ASGO warn about unnamed matrices."""
    from lightning_soaa import ASGO

    experts = torch.nn.Parameter(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match=r"ASGO: param_groups\[0\]: Invalid batch_dims=2\. Must be 0"):
        DeepSpeedClientOptimizer([{"params": [("experts", experts)], "batch_dims": 2}], ASGO, {"lr": 0.1},
                                 zero_stage=2, layout="structured")
    with caplog.at_level(logging.WARNING):
        DeepSpeedClientOptimizer([{"params": [("experts", experts)], "batch_dims": 1}], ASGO, {"lr": 0.1},
                                 zero_stage=2, layout="structured")
    assert "without names" not in caplog.text


@pytest.mark.parametrize("where", ["group", "constructor"])
def test_client_refuses_row_parts_where_partitions_cut_the_parts(where: str) -> None:
    """ZeRO-1/2/3 hand ASGO a partition's rows of a fused matrix: row_parts would cut those rows into
    wrong parts (or fail at the first step). Refused at construction; accepted at stage 0 (real shapes)."""
    from lightning_soaa import ASGO

    qkv = torch.nn.Parameter(torch.randn(18, 6))
    group: dict[str, Any] = {"params": [("qkv.weight", qkv)], **({"row_parts": 3} if where == "group" else {})}
    hyper = {"lr": 0.1, **({"row_parts": 3} if where == "constructor" else {})}
    for stage in (1, 2, 3):
        with pytest.raises(ValueError, match=re.escape(f"param_groups[0]: row_parts=3 (a fused matrix stepped as "
                                                       f"its parts) is not supported at ZeRO stage {stage}")):
            DeepSpeedClientOptimizer([dict(group)], ASGO, hyper, zero_stage=stage, layout="structured")
    DeepSpeedClientOptimizer([dict(group)], ASGO, hyper, zero_stage=0, layout="structured")
    # (review) the hyperparameter probe's parts fit any max_block_size, as the real matrices' may
    DeepSpeedClientOptimizer([dict(group)], ASGO, {**hyper, "max_block_size": 1}, zero_stage=0, layout="structured")


def test_client_refuses_adamw_indices_where_partitions_are_not_the_groups_parameters() -> None:
    """ASGO's adamw_indices are positions of a group's parameters; ZeRO-1/2/3 hand the inner optimizer flat
    partitions, different on every rank, where those positions point elsewhere (or past the end on one rank).
    Refused at construction, naming it; taken at stage 0."""
    from lightning_soaa import ASGO

    tok, lin = torch.nn.Parameter(torch.randn(7, 4)), torch.nn.Parameter(torch.randn(4, 4))
    group = {"params": [("tok", tok), ("lin", lin)], "adamw_indices": [0]}
    for stage in (1, 2, 3):
        with pytest.raises(ValueError, match=re.escape(f"param_groups[0]: adamw_indices is not supported at ZeRO "
                                                       f"stage {stage}")):
            DeepSpeedClientOptimizer([dict(group)], ASGO, {"lr": 0.1}, zero_stage=stage, layout="structured")
    DeepSpeedClientOptimizer([dict(group)], ASGO, {"lr": 0.1}, zero_stage=0, layout="structured")


def test_client_applies_fused_at_stage_0_and_refuses_it_where_partitions_cut_the_parts() -> None:
    """``fused`` (a config's or a caller's): the client regroups its own canonical groups (the inner groups
    are mapped to them by index), its probe never sees the option; ZeRO-1/2/3 refuse it naming it; an
    optimizer without the option is refused naming it."""
    from lightning_soaa import ASGO, SOAA

    qkv, proj = torch.nn.Parameter(torch.randn(18, 6)), torch.nn.Parameter(torch.randn(6, 6))
    names = {id(qkv): "blk.qkv.weight", id(proj): "blk.proj.weight"}
    hyper = {"lr": 0.1, "fused": {"qkv.weight": 3}}
    for stage in (1, 2, 3):
        with pytest.raises(ValueError, match=re.escape("ASGO: fused={'qkv.weight': 3} (fused matrices stepped as "
                                                       f"their parts) is not supported at ZeRO stage {stage}")):
            DeepSpeedClientOptimizer([proj, qkv], ASGO, hyper, zero_stage=stage, layout="structured",
                                     param_names=names)
    c = DeepSpeedClientOptimizer([proj, qkv], ASGO, hyper, zero_stage=0, layout="structured", param_names=names)
    assert [([id(p) for p in g["params"]], g["row_parts"]) for g in c.param_groups] == [([id(proj)], 1),
                                                                                       ([id(qkv)], 3)]
    assert "fused" not in c.hyperparams
    with pytest.raises(ValueError, match="no matrix parameter's name, trainable or frozen, ends with 'qkv.weight'"):
        DeepSpeedClientOptimizer([proj, qkv], ASGO, hyper, zero_stage=0, layout="structured")  # no names
    with pytest.raises(TypeError, match="fused"):
        DeepSpeedClientOptimizer([proj, qkv], SOAA, hyper, zero_stage=0)


def test_client_collects_multi_call_steps_without_double_stepping():
    """ZeRO-1/2 call step() once per param group with param_groups narrowed to that group: the first call
    is only collected. Unbound to an engine, the completing call cannot write back the first group, so
    it refuses before updating anything (the bound path is tested in test_equivalence.py)."""
    f1, f2 = torch.zeros(4, requires_grad=True), torch.zeros(3, requires_grad=True)
    c = DeepSpeedClientOptimizer([{"params": [f1]}, {"params": [f2], "lr": 0.5}], ShardedAdamW,
                                 {"lr": 0.1, "weight_decay": 0.0}, zero_stage=2)
    f1.grad, f2.grad = torch.ones(4), -torch.ones(3)
    groups = c.param_groups
    c.param_groups = [groups[0]]
    c.step()  # first call: collected only
    assert torch.equal(f1.detach(), torch.zeros(4)) and c.training_steps == 0
    c.param_groups = [groups[1]]
    with pytest.raises(RuntimeError, match="not bound to the engine.*Nothing was updated"):
        c.step()
    assert c.training_steps == 0 and c.inner is None
    assert torch.equal(f1.detach(), torch.zeros(4)) and torch.equal(f2.detach(), torch.zeros(3))
    # one call holding every group (BF16_Optimizer, or a single group): steps at once, per-group lr
    c.param_groups = groups
    c.step()
    assert c.training_steps == 1
    assert torch.allclose(f1.detach(), torch.full((4,), -0.1)) and torch.allclose(f2.detach(), torch.full((3,), 0.5))


@pytest.mark.parametrize(("value", "wanted"), [(None, False), ("1", False), ("true", False), ("0", True),
                                               ("no", True)])
def test_shm_op_is_skipped_unless_asked_for(value, wanted, monkeypatch):
    """Skipping DeepSpeed's CPU shm op JIT is the default; DEEPSPEED_EXT_SKIP_SHM_OP=0 keeps the op."""
    import importlib

    from deepspeed_ext.compat import maybe_skip_shm_comm_op, shm_op_wanted

    comm_torch = importlib.import_module("deepspeed.comm.torch")
    original = comm_torch.build_shm_op
    monkeypatch.setattr(comm_torch, "build_shm_op", original)  # restored after the test
    if value is None:
        monkeypatch.delenv("DEEPSPEED_EXT_SKIP_SHM_OP", raising=False)
    else:
        monkeypatch.setenv("DEEPSPEED_EXT_SKIP_SHM_OP", value)
    assert shm_op_wanted() is wanted
    assert maybe_skip_shm_comm_op() is (not wanted)
    assert (comm_torch.build_shm_op is original) is wanted


def test_shm_op_setting_rejects_other_values():
    from deepspeed_ext.compat import shm_op_wanted

    with pytest.raises(ValueError, match="DEEPSPEED_EXT_SKIP_SHM_OP='maybe'"):
        shm_op_wanted({"DEEPSPEED_EXT_SKIP_SHM_OP": "maybe"})


def test_malformed_configs_say_what_is_wrong(tmp_path: Path) -> None:
    """A JSON syntax error came out as a bare JSONDecodeError (which input?), and a zero_optimization that is
    not an object as stage 0 and then an AttributeError."""
    with pytest.raises(ValueError, match=r"Invalid JSON in the DeepSpeed config string: Expecting property name"):
        parse_config('{"train_batch_size": 8,}')
    bad = tmp_path / "ds.json"
    bad.write_text('{"train_batch_size": 8,}')
    with pytest.raises(ValueError, match=re.escape(f"Invalid JSON in the DeepSpeed config file {str(bad)!r}")):
        parse_config(str(bad))
    for zero in (True, [1], "2"):
        with pytest.raises(ValueError, match=re.escape(f"Invalid zero_optimization={zero!r}. Must be a JSON object")):
            parse_config({"zero_optimization": zero})
    assert parse_config({"zero_optimization": {"stage": 2}}).zero_stage == 2


def test_precision_flags_are_read_as_deepspeed_reads_them():
    """DeepSpeed's pydantic config reads ``"enabled": "false"`` as False (Python's truth test said True:
    a refusal that named ``fp16.enabled=true``), and takes bf16 from the old key ``bfloat16`` when ``bf16``
    is absent (EGN under it was not refused, and DeepSpeed's fp32 master weights overwrote its steps)."""
    for value in ("false", "False", "0", "off"):
        parse_config({**_cfg("lightning_soaa.SOAA", stage=0), "fp16": {"enabled": value}})
        parse_config({**_cfg("lightning_soaa.EGN", stage=0), "bf16": {"enabled": value}})
    with pytest.raises(ValueError, match=r"fp16.enabled=true at zero_optimization.stage=0"):
        parse_config({**_cfg("lightning_soaa.SOAA", stage=0), "fp16": {"enabled": "true"}})
    with pytest.raises(ValueError, match=r"bf16.enabled=true.*Must run in fp32"):
        parse_config({**_cfg("lightning_soaa.EGN", stage=0), "bfloat16": {"enabled": True}})
    parse_config({**_cfg("lightning_soaa.EGN", stage=0), "bf16": {"enabled": False}, "bfloat16": {"enabled": True}})


def w_frozen_fused(rank: int, world: int, dtype: str) -> dict[str, Any]:
    """ASGO from a DeepSpeed config with ``fused`` at stage 0 over :class:`QKVNet` whose fused projection is frozen
    at ``initialize`` and unfrozen before two steps: the inner optimizer's ``fused_parts`` and the blocks of its
    matrices, by shape (bf16: DeepSpeed drops the frozen parameters from the groups in place)."""
    from tests.deepspeed._workers import _feed, ds_env, make_config

    ds_env(rank, world)
    model = qkv_pair()[0].float()
    set_qkv_trainable(model, False)
    cfg = make_config(0, dtype, "lightning_soaa.ASGO", {"lr": 0.05, "fused": {"qkv.weight": 3}})
    engine, _, _, _ = deepspeed_ext.initialize(model=model, config=cfg,
                                               model_parameters=[{"params": list(model.named_parameters())}])
    set_qkv_trainable(model, True)
    for s in range(2):
        x, y = batch(s, rank, dtype=torch.float32)
        engine.backward(loss_fn(engine, _feed(x, dtype), _feed(y, dtype)))
        engine.step()
    inner = deepspeed_ext.find_client_optimizer(engine.optimizer)._inner
    g = inner.param_groups[0]
    return {"fused_parts": g.get("fused_parts"),
            "blocks": {tuple(p.shape): [tuple(b.shape) for b in inner.block_table.by_param[i]]
                       for i, p in enumerate(inner._params) if p.dim() == 2}}


def test_a_fused_matrix_frozen_at_initialize_is_stepped_as_its_parts_and_a_dropped_one_moves_no_parts(
        tmp_path: Path) -> None:
    """A DeepSpeed config's ``fused`` at stage 0 with the fused projection frozen at ``initialize``: the client's
    group records its parts (``fused_parts``, a position in the group) and, once unfrozen, it is stepped as its
    3 parts (fp32). In bf16 DeepSpeed drops the frozen parameters from the groups in place, so that position
    named the next matrix (``out.weight``, 3 x 3, cut into 3 one-row parts: silently wrong); the positions now
    follow DeepSpeed's filter (the dropped matrix, never stepped by DeepSpeed, has none)."""
    fp32 = run_distributed(w_frozen_fused, 1, tmp_path, "fp32", timeout=240)[0]
    assert fp32["fused_parts"] == ((2, 3),)
    assert fp32["blocks"] == {(5, 6): [(5, 6)], (9, 5): [(3, 5)] * 3, (3, 3): [(3, 3)]}
    bf16 = run_distributed(w_frozen_fused, 1, tmp_path, "bf16", timeout=240)[0]
    assert bf16["fused_parts"] == ()
    assert bf16["blocks"] == {(5, 6): [(5, 6)], (3, 3): [(3, 3)]}
