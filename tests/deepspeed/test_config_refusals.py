"""DeepSpeed settings that trained silently wrong or failed unclearly with our optimizers, now refused (or
understood) when the config is read, on the JSON route and on a client passed in code alike; nothing here
starts a process group, except the W=1 run that checks the legacy ``cpu_offload`` flag end to end and the W=2
run that checks a ``checkpoint.writer`` refusal on every rank.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

import deepspeed_ext
from deepspeed_ext.client import DeepSpeedClientOptimizer
from deepspeed_ext.ds_config import parse_config
from deepspeed_ext.egn_client import DeepSpeedEGNOptimizer
from tests.harness.distributed import run_distributed

pytestmark = pytest.mark.deepspeed


def _cfg(opt_type: str | None = "lightning_soaa.AdamW", stage: int = 2, **zero: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage, **zero}}
    if opt_type is not None:
        cfg["optimizer"] = {"type": opt_type, "params": {}}
    return cfg


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


# ---------------------------------------------------------------------------------------- EGN, fp16 autocast
@pytest.mark.parametrize("dtype", ["float16", "fp16", "torch.float16", "half", torch.float16],
                         ids=["float16", "fp16", "torch.float16", "half", "dtype"])
def test_egn_with_float16_torch_autocast_is_refused(dtype: Any) -> None:
    """With float16 torch autocast DeepSpeed steps the ZeRO-0 client through torch's GradScaler, which skips
    step() on an overflowing gradient: EGN reads none, yet lost that step silently, and the next failed with
    a misleading set_batch error (/tmp/hunt/ds/repro_egn_autocast_fp16.py). Refused on both routes, for
    every spelling DeepSpeed reads as float16; bfloat16 autocast (no GradScaler) stays allowed."""
    from lightning_soaa.optim.egn import EGN

    autocast = {"enabled": True, "dtype": dtype}
    pattern = (rf"Invalid torch_autocast.dtype='{dtype}' \(with torch_autocast.enabled=True\) and "
               r"optimizer.type='lightning_soaa.EGN'.*GradScaler.*Must be a torch_autocast.dtype of \"bfloat16\"")
    with pytest.raises(ValueError, match=pattern):
        parse_config({**_cfg("lightning_soaa.EGN", 0), "torch_autocast": autocast})
    model = _model()
    client = DeepSpeedEGNOptimizer(model, EGN, {"loss": "mse"})
    with pytest.raises(ValueError, match=pattern):
        deepspeed_ext.initialize(model=model, config={**_cfg(None, 0), "torch_autocast": autocast}, optimizer=client)
    assert not torch.distributed.is_initialized()
    for allowed in ({"enabled": True, "dtype": "bfloat16"}, {"enabled": True, "dtype": "bf16"},
                    {"enabled": True}, {"enabled": False, "dtype": "float16"}):
        parse_config({**_cfg("lightning_soaa.EGN", 0), "torch_autocast": allowed})
    # the gradient-reading optimizers step correctly through the GradScaler: not refused
    parse_config({**_cfg("lightning_soaa.AdamW", 0), "torch_autocast": autocast})


# ---------------------------------------------------------------------------------------- legacy cpu_offload
@pytest.mark.parametrize("value", [True, "true"])
def test_legacy_cpu_offload_is_read_as_cpu_offload(value: Any) -> None:
    """DeepSpeed 0.19 reads ``"cpu_offload": true`` as offload_optimizer.device='cpu'; deepspeed_ext read
    only offload_optimizer, left zero_force_ds_cpu_optimizer unset, and DeepSpeed refused our client with an
    unclear ZeRO-Offload message (/tmp/hunt/ds/repro_config_names.py). Both routes now set the flag."""
    from deepspeed_ext.engine import _adopt_client
    from lightning_soaa.optim.soaa import SOAA

    assert parse_config(_cfg("lightning_soaa.SOAA", 2, cpu_offload=value)).ds_config[
        "zero_force_ds_cpu_optimizer"] is False
    model = _model()
    client = DeepSpeedClientOptimizer.from_optimizer(SOAA(model.parameters(), lr=1e-2), zero_stage=2,
                                                     layout="elementwise")
    adopted = _adopt_client(client, parse_config(_cfg(None, 2, cpu_offload=value)), model)
    assert adopted.ds_config["zero_force_ds_cpu_optimizer"] is False
    for off in (False, "false", None):
        assert "zero_force_ds_cpu_optimizer" not in parse_config(_cfg("lightning_soaa.SOAA", 2,
                                                                      cpu_offload=off)).ds_config


def w_offload_spellings(rank: int, world: int, steps: int) -> dict[str, Any]:
    """ShardedAdamW at ZeRO-2 under each spelling of CPU offload: the parameters after ``steps`` steps."""
    from tests.deepspeed._workers import SIZES, ds_env
    from tests.harness.models import batch, loss_fn, tiny_mlp

    ds_env(rank, world)
    out: dict[str, Any] = {}
    for label, zero in (("offload_optimizer", {"offload_optimizer": {"device": "cpu"}}), ("cpu_offload",
                                                                                          {"cpu_offload": True})):
        model = tiny_mlp(0, torch.float32, SIZES)
        cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.0, "steps_per_print": 10**9,
               "zero_optimization": {"stage": 2, **zero},
               "optimizer": {"type": "lightning_soaa.AdamW", "params": {"lr": 2e-2, "weight_decay": 0.1}}}
        engine, *_ = deepspeed_ext.initialize(model=model, config=cfg)
        for s in range(steps):
            x, y = batch(s, rank, dtype=torch.float32)
            engine.backward(loss_fn(engine, x, y))
            engine.step()
        out[label] = {"offload": engine.zero_cpu_offload(),
                      "params": [p.detach().clone() for p in model.parameters()]}
        del engine
    return out


@pytest.mark.timeout(240)
def test_legacy_cpu_offload_runs_as_offload_optimizer(tmp_path) -> None:
    (res,) = run_distributed(w_offload_spellings, 1, tmp_path, 3, timeout=220)
    a, b = res["offload_optimizer"], res["cpu_offload"]
    assert a["offload"] and b["offload"]
    assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))


# ---------------------------------------------------------------------------------------- misspelt names
@pytest.mark.parametrize(("typed", "meant"), [
    ("SOAA", "SOAA"), ("soaa", "SOAA"), ("EGN", "EGN"), ("asgo", "ASGO"), ("DASGO", "DASGO"),
    ("ShardedAdamW", "ShardedAdamW"), ("shardedadamw", "ShardedAdamW"), (" lightning_soaa.SOAA", "SOAA"),
    ("lightning_soaa.SOAA ", "SOAA"), ("lightning-soaa.SOAA", "SOAA"), ("Lightning Soaa.asgo", "ASGO"),
    ("lightningsoaa.EGN", "EGN"), ("lightning-soaa.AdamW", "AdamW"),
])
def test_our_names_spelt_without_the_prefix_say_how_to_write_them(typed: str, meant: str) -> None:
    """Passed through to DeepSpeed, these failed with "SOAA is not a supported DeepSpeed Optimizer"."""
    with pytest.raises(ValueError, match=rf"Invalid optimizer.type='{typed}'.*Write \"type\": "
                                         rf"\"lightning_soaa.{meant}\"\."):
        parse_config(_cfg(typed))


def test_deepspeed_and_torch_optimizer_names_pass_through_unchanged() -> None:
    """``AdamW`` is DeepSpeed's AdamW (ours is ``lightning_soaa.AdamW``); DeepSpeed's other built-ins and
    torch.optim's names are its own too. A misspelt prefix with a name we do not have lists ours."""
    import deepspeed.runtime.config as ds_runtime_config

    from deepspeed_ext.ds_config import DEEPSPEED_BUILTIN_OPTIMIZERS

    assert frozenset(ds_runtime_config.DEEPSPEED_OPTIMIZERS) == DEEPSPEED_BUILTIN_OPTIMIZERS
    for name in ("AdamW", "adamw", "ADAMW", "Adam", "Lamb", "Lion", "Adagrad", "SGD", "RMSprop", "Foo"):
        cfg = {"zero_optimization": {"stage": 1}, "optimizer": {"type": name, "params": {"lr": 1e-3}}}
        parsed = parse_config(cfg)
        assert parsed.entry is None and parsed.ds_config == cfg
    with pytest.raises(ValueError, match=r"Invalid optimizer.type='lightning-soaa.Nope'. Must be one of "
                                         r"lightning_soaa.SOAA.*lightning_soaa.AdamW"):
        parse_config(_cfg("lightning-soaa.Nope"))
    with pytest.raises(ValueError, match=r"Write \"type\": \"lightning_soaa.SOAA\""):
        parse_config(_cfg("SOAA"))  # and the pass-throughs above do not hide it


# ---------------------------------------------------------------------------------------- checkpoint.writer
# DeepSpeed 0.19.8 (runtime/checkpoint_engine/utils.py) builds a FastPersist / decoupled checkpoint engine for
# any non-null checkpoint.writer ({} included: its type defaults to "fast")
_WRITERS = [
    ({}, r"type 'fast' \(DeepSpeed's default when 'type' is left out\) is FastPersist"),
    ({"type": "fast"}, r"type 'fast' .*is FastPersist.*async_io"),
    ({"type": "FAST", "data_parallel": "replica"}, r"type 'FAST' .*is FastPersist"),
    ({"type": "mock"}, r"type 'mock' writes no data"),
    ({"type": "python"}, r"type 'python' writes the same torch.save files.*CROSS_SIZE.*dp_rank"),
    ({"type": "python", "data_parallel": "replica"}, r"every data-parallel rank writes the one model-states"),
    ({"type": "python", "decoupled": True}, r"decoupled=True writes the files in a background process"),
    ({"type": "python", "decoupled": "false"}, r"decoupled='false' writes the files in a background process"),
    ({"type": "nvme"}, r"type 'nvme' is not one DeepSpeed knows"),
    ("fast", r"not a JSON object"),
]


@pytest.mark.parametrize(("writer", "why"), _WRITERS, ids=[str(w) for w, _ in _WRITERS])
def test_a_checkpoint_writer_is_refused_naming_the_value_and_what_is_allowed(writer: Any, why: str) -> None:
    """``checkpoint.writer`` passed through unchecked; DeepSpeed then failed inside initialize on CPU
    (KeyError: 'CROSS_SIZE' outside its launcher; AttributeError ... 'dp_rank' without data_parallel;
    "Cannot access accelerator device" for FastPersist), or worse, wrote empty files (mock). Refused when the
    config is read, on the JSON route and on a client passed in code, before anything starts."""
    from lightning_soaa.optim.soaa import SOAA

    pattern = (rf"Invalid checkpoint\.writer={re.escape(repr(writer))} with optimizer\.type='lightning_soaa\.SOAA': "
               rf".*{why}.*Must be left out \(or null\)")
    with pytest.raises(ValueError, match=pattern):
        parse_config({**_cfg("lightning_soaa.SOAA"), "checkpoint": {"writer": writer}})
    model = _model()
    client = DeepSpeedClientOptimizer.from_optimizer(SOAA(model.parameters(), lr=1e-2), zero_stage=2,
                                                     layout="elementwise")
    with pytest.raises(ValueError, match=r"Invalid checkpoint.writer="):
        deepspeed_ext.initialize(model=model, config={**_cfg(None), "checkpoint": {"writer": writer}},
                                 optimizer=client)
    assert not torch.distributed.is_initialized()


def test_the_default_checkpoint_engine_and_other_optimizers_pass() -> None:
    for block in ({}, {"writer": None}, {"tag_validation": "Fail"}):
        parse_config({**_cfg("lightning_soaa.SOAA"), "checkpoint": block})
    with pytest.raises(ValueError, match=r"Invalid checkpoint=\['writer'\]\. Must be a JSON object"):
        parse_config({**_cfg("lightning_soaa.SOAA"), "checkpoint": ["writer"]})
    theirs = {**_cfg("AdamW"), "checkpoint": {"writer": {"type": "fast"}}}  # DeepSpeed's optimizer: its affair
    assert parse_config(theirs).ds_config == theirs
    parse_config({**_cfg("lightning_soaa.SOAA"), "datastates_ckpt": False})


@pytest.mark.parametrize("value", [True, 1, "false"])
def test_loading_a_universal_checkpoint_is_refused(value: Any) -> None:
    """``checkpoint.load_universal``: DeepSpeed's universal checkpoints keep only step, fp32, exp_avg and
    exp_avg_sq, none of our state (a reviewer): refused when the config is read, naming the value; false passes."""
    with pytest.raises(ValueError, match=rf"Invalid checkpoint\.load_universal={re.escape(repr(value))} with "
                                         r"optimizer\.type='lightning_soaa\.SOAA'.*Must be left out \(or false\)"):
        parse_config({**_cfg("lightning_soaa.SOAA"), "checkpoint": {"load_universal": value}})
    parse_config({**_cfg("lightning_soaa.SOAA"), "checkpoint": {"load_universal": False}})


@pytest.mark.parametrize("value", [{}, {"host_cache_size": 16}, True])
def test_datastates_checkpointing_is_refused(value: Any) -> None:
    """``datastates_ckpt`` (any value but false) makes DeepSpeed write checkpoints in the background, as
    ``checkpoint.writer.decoupled`` does: refused when the config is read, naming the value (a reviewer)."""
    with pytest.raises(ValueError, match=rf"Invalid datastates_ckpt={re.escape(repr(value))} with optimizer\.type="
                                         r"'lightning_soaa\.SOAA'.*background.*Must be left out \(or false\)"):
        parse_config({**_cfg("lightning_soaa.SOAA"), "datastates_ckpt": value})


def w_writer_refused(rank: int, world: int, writers: list[dict[str, Any]]) -> list[str]:
    """deepspeed_ext.initialize on every rank with each ``checkpoint.writer``: what each rank raised."""
    from tests.deepspeed._workers import SIZES, ds_env, make_config
    from tests.harness.models import tiny_mlp

    ds_env(rank, world)
    out = []
    for writer in writers:
        cfg = {**make_config(2, "fp32", "lightning_soaa.SOAA", {"lr": 1e-2}), "checkpoint": {"writer": writer}}
        try:
            deepspeed_ext.initialize(model=tiny_mlp(0, torch.float32, SIZES), config=cfg)
            out.append("initialized")
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            out.append(f"{type(exc).__name__}: {exc}")
    return out


@pytest.mark.timeout(120)
def test_a_checkpoint_writer_is_refused_on_every_rank_before_deepspeed_starts(tmp_path) -> None:
    """Two ranks, as a run starts them (no DeepSpeed launcher): each got KeyError: 'CROSS_SIZE' from deep
    inside deepspeed.initialize; each now gets the refusal."""
    writers = [{"type": "python"}, {"type": "fast", "data_parallel": "replica"}]
    for said in run_distributed(w_writer_refused, 2, tmp_path, writers, timeout=100):
        assert [s.split(":")[0] for s in said] == ["ValueError", "ValueError"], said
        assert all(s.startswith("ValueError: Invalid checkpoint.writer=") for s in said), said
