"""Read a DeepSpeed config that names one of our optimizers; check it before anything starts.

Users write a normal DeepSpeed JSON with::

    "optimizer": {"type": "lightning_soaa.SOAA", "params": {"lr": 1e-3, "total_steps": 1000}}

:func:`parse_config` splits that block off (DeepSpeed could not build it), validates the name, the
parameters and the ZeRO stage, and returns the config DeepSpeed gets: without the block, with
``zero_allow_untested_optimizer`` (ZeRO >= 1 refuses client optimizers otherwise) and, with ZeRO-Offload,
``zero_force_ds_cpu_optimizer: false``. A config without one of our optimizers passes through untouched.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from deepspeed_ext.registry import PREFIX, REGISTRY, RESERVED_PARAMS, OptimizerEntry, constructor_params, lookup
from lightning_soaa import registry as optimizer_registry
from lightning_soaa.registry import StepNeeds

__all__ = ["ParsedConfig", "bf16_enabled", "check_entry", "load_config", "parse_config", "patch_for_client",
           "zero_stage_of"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParsedConfig:
    """A DeepSpeed config split into DeepSpeed's part and ours.

    Attributes:
        ds_config: what to pass to ``deepspeed.initialize(config=...)``.
        entry: our optimizer (``None`` when the config names a DeepSpeed/torch optimizer or none).
        optimizer_params: its keyword arguments from the JSON.
        zero_stage: 0-3.
    """

    ds_config: dict[str, Any]
    entry: OptimizerEntry | None
    optimizer_params: dict[str, Any]
    zero_stage: int


# DeepSpeed's elastic checkpoints (ZeRO 1-2) are built from optimizer.state[flat] alone, never through the
# optimizer's state_dict(): SOAA's trust region and step counts, and all of ASGO's state, were missing from
# them, and their load ended in a bare AssertionError (found by a helper)
ELASTIC_MESSAGE = (
    "Invalid zero_optimization.elastic_checkpoint=true with optimizer.type={name!r}: DeepSpeed's elastic "
    "checkpoints keep only its per-partition tensors, not the lightning_soaa optimizer's state (its "
    "trust-region scalars, step counts, block layout), so they could not be resumed. Leave it false "
    "(the default); the rigid checkpoints resume at any world size through lightning_soaa's own format."
)

def load_config(config: Any) -> dict[str, Any]:
    """A config given as a dict, a path to a JSON file, or a JSON string; returns a deep copy."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, (str, os.PathLike)):
        text = str(config)
        path = None if text.lstrip().startswith("{") else Path(text)
        if path is not None and not path.is_file():
            raise ValueError(
                f"Invalid config={text!r}. Must be a dict, a JSON string or the path of a JSON file.")
        try:
            if path is None:
                loaded = json.loads(text)
            else:
                with path.open() as fh:
                    loaded = json.load(fh)
        except json.JSONDecodeError as e:  # say which input: the error alone names a line and column only
            where = "the DeepSpeed config string" if path is None else f"the DeepSpeed config file {str(path)!r}"
            raise ValueError(f"Invalid JSON in {where}: {e}.") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"Invalid DeepSpeed config: a JSON {type(loaded).__name__}. Must be a JSON object.")
        return loaded
    raise ValueError(
        f"Invalid config of type {type(config).__name__}. Must be a dict, a JSON string or a path.")


def zero_stage_of(ds_config: dict[str, Any]) -> int:
    zero = ds_config.get("zero_optimization") or {}
    if not isinstance(zero, dict):  # `true` or a list read as stage 0, then an AttributeError later
        raise ValueError(f"Invalid zero_optimization={zero!r}. Must be a JSON object, e.g. {{\"stage\": 2}}.")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"Invalid zero_optimization.stage={stage!r}. Must be one of 0, 1, 2, 3.")
    return int(stage)


def _offload_device(ds_config: dict[str, Any]) -> str:
    """Where DeepSpeed will keep the optimizer state: "none", "cpu" or "nvme"."""
    zero = ds_config.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        return "none"
    off = zero.get("offload_optimizer")
    if off is None and read_bool(zero.get("cpu_offload", False)):
        # DeepSpeed 0.19 still reads the deprecated `"cpu_offload": true` as offload_optimizer.device="cpu"
        # (zero/config.py): missed here, zero_force_ds_cpu_optimizer stayed unset and DeepSpeed refused our
        # client with a ZeRO-Offload message. (Both keys together: DeepSpeed refuses them itself, clearly.)
        return "cpu"
    off = off or {}
    return str(off.get("device", "none")).lower() if isinstance(off, dict) else "none"


def check_params(entry: OptimizerEntry, params: Any) -> dict[str, Any]:
    """Names of the JSON's optimizer params must be constructor keywords (values are checked by the
    optimizer itself when it is built)."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ValueError(f"Invalid optimizer.params={params!r}. Must be a JSON object of keyword arguments.")
    cls = entry.load()
    allowed = constructor_params(cls)
    out = {}
    for k, v in params.items():
        if k in RESERVED_PARAMS:
            raise ValueError(
                f"Invalid optimizer.params key {k!r} for {entry.name}: deepspeed_ext sets it itself "
                "(the data-parallel group and the sharding mode follow from the ZeRO stage)."
            )
        if k not in allowed:
            raise ValueError(
                f"Invalid optimizer.params key {k!r} for {entry.name}. Must be one of "
                f"{', '.join(sorted(allowed))}."
            )
        out[k] = tuple(v) if k in ("betas", "adam_betas") and isinstance(v, list) else v
    for name, allowed, why in entry.constraints:
        if name in out and out[name] not in allowed:
            raise ValueError(
                f"Invalid optimizer.params {name}={out[name]!r} for {entry.name} under DeepSpeed. "
                "Must be one of "
                f"{', '.join(repr(a) for a in allowed)}: {why}."
            )
    return out


# the strings pydantic (DeepSpeed's config models) reads as booleans, case-insensitively
_TRUE_STRINGS = frozenset({"1", "on", "t", "true", "y", "yes"})


def read_bool(value: Any) -> bool:
    """A flag that DeepSpeed's pydantic config models read: ``"false"`` / ``"off"`` (strings, any case) are
    False there, though non-empty strings to Python."""
    if isinstance(value, str):
        return value.strip().lower() in _TRUE_STRINGS
    return bool(value)


def _precision_enabled(ds: dict[str, Any], key: str) -> bool:
    """Whether DeepSpeed will run ``key`` ("fp16" or "bf16") mixed precision, read as DeepSpeed reads it:
    ``bf16`` falls back to its old name ``bfloat16``, and ``"enabled": "false"`` (a string) is False to
    DeepSpeed's pydantic model, though a non-empty string to Python."""
    block = ds.get(key)
    if block is None and key == "bf16":
        block = ds.get("bfloat16")
    if not isinstance(block, dict):
        return False
    return read_bool(block.get("enabled", False))


def bf16_enabled(ds: dict[str, Any]) -> bool:
    """Whether the DeepSpeed config ``ds`` runs bf16 mixed precision, read as DeepSpeed reads it."""
    return _precision_enabled(ds, "bf16")


# DeepSpeed 0.19's spellings of float16 for torch_autocast.dtype (runtime/config.py DtypeEnum.fp16, matched
# exactly: any other spelling DeepSpeed refuses itself)
_AUTOCAST_FP16 = ("torch.float16", "fp16", "float16", "half")


def _torch_autocast_fp16(ds: dict[str, Any]) -> bool:
    """Whether DeepSpeed will run torch autocast in float16 (at ZeRO-0 it then steps the client optimizer
    through torch's GradScaler). DeepSpeed reads this ``enabled`` raw, by Python's truth test (no pydantic
    model here, unlike fp16/bf16), so the same test is used; a missing dtype builds no GradScaler."""
    block = ds.get("torch_autocast")
    if not isinstance(block, dict) or not block.get("enabled", False):
        return False
    dtype = block.get("dtype")
    return dtype is torch.float16 or (isinstance(dtype, str) and dtype in _AUTOCAST_FP16)


def _check_precision_and_accumulation(ds: dict[str, Any], entry: OptimizerEntry, stage: int) -> None:
    """Refuse the DeepSpeed settings under which our optimizer would step on the wrong numbers."""
    if stage == 0 and _precision_enabled(ds, "fp16"):
        # measured with DeepSpeed 0.19: engine.backward scales the loss only for ZeRO optimizers, yet
        # FP16_UnfusedOptimizer (stage 0) divides the gradients by the loss scale: 2^-16 too small
        raise ValueError(
            f"Invalid combination optimizer.type={entry.name!r} with fp16.enabled=true at "
            "zero_optimization.stage=0: DeepSpeed's stage-0 fp16 wrapper divides the gradients by a loss "
            "scale the engine never applied, so the optimizer would see them 65536x too small and never "
            "detect an overflow. Use bf16, fp16 with zero_optimization.stage >= 1, or fp32.")
    if entry.spec.needs is StepNeeds.LOSS and ds.get("managed_gradient_accumulation", True) is False:
        raise ValueError(
            f"Invalid combination optimizer.type={entry.name!r} with managed_gradient_accumulation=false: "
            f"{entry.spec.name} takes the step's loss from engine.backward at the gradient-accumulation "
            "boundary, which DeepSpeed then reports only inside engine.step(), so no loss would arrive. "
            "Leave managed_gradient_accumulation at its default (true).")


def check_entry(ds: dict[str, Any], entry: OptimizerEntry, stage: int) -> None:
    """Refuse the DeepSpeed settings of ``ds`` under which ``entry``'s optimizer would not train as it does
    without DeepSpeed. Every route runs this on the config DeepSpeed will get: the JSON's optimizer block
    (:func:`parse_config`), a client optimizer passed in code (:func:`deepspeed_ext.initialize`) and
    Lightning's strategy (on the config after Lightning added its precision and accumulation blocks)."""
    if stage not in entry.stages:
        supported = ", ".join(str(s) for s in entry.stages) or "none"
        raise ValueError(
            f"Invalid combination optimizer.type={entry.name!r} with zero_optimization.stage={stage}. "
            f"{entry.name} supports ZeRO stages: {supported}. {entry.unsupported_reason}".rstrip()
        )
    if entry.fp32_only:
        for key in ("bf16", "fp16"):
            if _precision_enabled(ds, key):
                raise ValueError(
                    f"Invalid combination optimizer.type={entry.name!r} with {key}.enabled=true. "
                    f"{entry.name} updates the module's parameters itself, and DeepSpeed's {key} mode "
                    "copies its fp32 master "
                    "weights over them after every step. Must run in fp32 (leave bf16/fp16 disabled; "
                    "torch_autocast with dtype \"bfloat16\" is allowed: it keeps no master weights)."
                )
    _check_precision_and_accumulation(ds, entry, stage)
    if entry.spec.needs is StepNeeds.BATCH:
        _check_batch_optimizer(ds, entry)
    if _offload_device(ds) == "nvme":
        raise ValueError(
            "Invalid zero_optimization.offload_optimizer.device='nvme' with "
            f"optimizer.type={entry.name!r}: NVMe swaps optimizer state between sub-group steps, which "
            "lightning_soaa optimizers do not support. Must be 'cpu' or 'none'."
        )
    zero = ds.get("zero_optimization")
    if stage >= 1 and isinstance(zero, dict) and zero.get("elastic_checkpoint", False):
        raise ValueError(ELASTIC_MESSAGE.format(name=entry.name))
    _check_checkpoint_writer(ds, entry)


def _writer_problem(writer: Any) -> str:
    """Why DeepSpeed 0.19.8's checkpoint writer ``writer`` (runtime/model_checkpointing/config.py,
    runtime/checkpoint_engine/utils.py) cannot save lightning_soaa checkpoints, as measured on CPU."""
    if not isinstance(writer, dict):
        return "not a JSON object (DeepSpeed fails on it with an AttributeError)."
    if writer.get("decoupled", False):  # DeepSpeed tests it by Python's truth: "false" is decoupled there
        return (f"decoupled={writer['decoupled']!r} writes the files in a background process after "
                "save_checkpoint returned, so 'latest' could name files still being written, and a load's checks "
                "could read them half-written.")
    kind = writer.get("type", "fast")
    upper = kind.upper() if isinstance(kind, str) else kind
    if upper == "FAST":
        default = " (DeepSpeed's default when 'type' is left out)" if "type" not in writer else ""
        return (f"type {kind!r}{default} is FastPersist, which writes through DeepSpeed's async_io op: without an "
                "accelerator DeepSpeed fails in initialize (\"Cannot access accelerator device when none is "
                "available\"), and its writes are not tested with lightning_soaa's checkpoints.")
    if upper == "MOCK":
        return (f"type {kind!r} writes no data: every checkpoint file is empty, so the checkpoint is lost without "
                "an error until a load fails on it (EOFError).")
    if upper == "PYTHON":
        return (f"type {kind!r} writes the same torch.save files as DeepSpeed's default engine, but DeepSpeed "
                "then needs its own launcher's variables (KeyError: 'CROSS_SIZE' under torchrun, Lightning, "
                "mpirun or SLURM) and, at ZeRO 0-2, a data_parallel unit (AttributeError: 'UniversalParallelInfo' "
                "object has no attribute 'dp_rank' without one), with which every data-parallel rank writes the "
                "one model-states file at once.")
    return f"type {kind!r} is not one DeepSpeed knows (it accepts 'fast', 'python' and 'mock')."


def _check_checkpoint_writer(ds: dict[str, Any], entry: OptimizerEntry) -> None:
    """Refuse DeepSpeed's ``checkpoint.writer`` (FastPersist and decoupled checkpointing): passed through,
    it failed deep inside ``deepspeed.initialize`` (KeyError: 'CROSS_SIZE', an AttributeError, "Cannot access
    accelerator device"), or wrote empty files (``"mock"``). deepspeed_ext's checkpoint guarantees ('latest'
    moved only once every rank's files are complete; a load refused on every rank when a file is unreadable or
    the files mix two saves) rest on DeepSpeed's default engine, which writes them before returning."""
    datastates = ds.get("datastates_ckpt")
    if datastates is not None and datastates is not False:  # DeepSpeed enables it for any other value
        raise ValueError(
            f"Invalid datastates_ckpt={datastates!r} with optimizer.type={entry.name!r}: DeepSpeed's DataStates "
            "engine writes the checkpoint in the background after save_checkpoint returned, so 'latest' could name "
            "files still being written and a load's checks could read them half-written. Must be left out (or "
            "false): DeepSpeed's default checkpoint engine, on which deepspeed_ext's checkpoint checks rest.")
    block = ds.get("checkpoint")
    if block is None:
        return
    if not isinstance(block, dict):
        raise ValueError(f"Invalid checkpoint={block!r}. Must be a JSON object (DeepSpeed's checkpoint options).")
    if block.get("load_universal"):  # DeepSpeed takes it by Python's truth
        raise ValueError(
            f"Invalid checkpoint.load_universal={block['load_universal']!r} with optimizer.type={entry.name!r}: "
            "DeepSpeed's universal checkpoints keep only step, fp32, exp_avg and exp_avg_sq of an optimizer, not "
            "lightning_soaa's state, so the optimizer would resume without it. Must be left out (or false): resume "
            "at the data-parallel size the checkpoint was saved at, or start from its weights "
            "(load_optimizer_states=False, or zero_to_fp32.py at ZeRO-3).")
    writer = block.get("writer")
    if writer is None:
        return
    raise ValueError(
        f"Invalid checkpoint.writer={writer!r} with optimizer.type={entry.name!r}: {_writer_problem(writer)} "
        "Must be left out (or null): DeepSpeed's default checkpoint engine (torch.save, each rank's files complete "
        "before save_checkpoint returns), on which deepspeed_ext's checkpoint checks rest.")


def _check_batch_optimizer(ds: dict[str, Any], entry: OptimizerEntry) -> None:
    """EGN solves for its step from the module and the batch and never reads a gradient: DeepSpeed's
    gradient clipping would be silently ignored (as Lightning's gradient_clip_val, which is refused too)."""
    clip = ds.get("gradient_clipping")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip != 0):
        raise ValueError(
            f"Invalid gradient_clipping={clip!r} with optimizer.type={entry.name!r}: {entry.spec.name} "
            "computes its step from the module and the batch, not from the gradients, so DeepSpeed's "
            "gradient clipping would be silently ignored. Must be 0.0 (or left out).")
    if _torch_autocast_fp16(ds):
        # at ZeRO-0 (EGN's only stage) DeepSpeed steps the client through torch's GradScaler, which skips
        # step() whenever the gradients overflow: EGN reads none, yet its step was lost silently, and the
        # next step failed with a misleading set_batch-count error (found by a helper)
        block = ds["torch_autocast"]
        raise ValueError(
            f"Invalid torch_autocast.dtype={str(block.get('dtype'))!r} (with torch_autocast.enabled="
            f"{block.get('enabled')!r}) and optimizer.type={entry.name!r}: DeepSpeed then steps "
            f"{entry.spec.name} through torch's GradScaler, which skips a step whenever the (unused) gradients "
            f"overflow in float16, losing {entry.spec.name}'s step. Must be a torch_autocast.dtype of "
            "\"bfloat16\" (no GradScaler), or torch_autocast disabled (fp32).")


def patch_for_client(ds: dict[str, Any], entry: OptimizerEntry, stage: int) -> None:
    """The flags DeepSpeed needs to run one of our optimizers as its client optimizer (in place)."""
    if stage >= 1:
        ds["zero_allow_untested_optimizer"] = True  # ZeRO >= 1 refuses client optimizers otherwise
    if _offload_device(ds) == "cpu":
        ds["zero_force_ds_cpu_optimizer"] = False
    if entry.spec.needs is StepNeeds.BATCH:
        # DeepSpeed's default is 1.0: it would clip gradients that EGN never reads (wasted work)
        ds.setdefault("gradient_clipping", 0.0)


# DeepSpeed 0.19's built-in optimizer names (runtime/config.py DEEPSPEED_OPTIMIZERS, matched in lower case);
# spelled here so that reading a config does not import deepspeed (tests check the list against it)
DEEPSPEED_BUILTIN_OPTIMIZERS = frozenset(
    {"adagrad", "adam", "adamw", "lamb", "muadam", "muadamw", "musgd", "lion", "muon"})

# our package prefix as users misspell it: any case, "-", "_", a space or nothing between the words
_LOOSE_PREFIX = re.compile(r"lightning[\s_-]*soaa\s*\.\s*", re.IGNORECASE)


def _deepspeed_accepts(type_name: str) -> bool:
    """Whether DeepSpeed builds ``type_name`` itself: one of its built-ins (any case) or a torch.optim class
    (exact spelling), as DeepSpeed 0.19's engine tests it."""
    return type_name.lower() in DEEPSPEED_BUILTIN_OPTIMIZERS or getattr(torch.optim, type_name, None) is not None


def _check_misspelt_name(type_name: Any) -> None:
    """Refuse an ``optimizer.type`` that means one of ours but is not spelled ``lightning_soaa.<Name>``:
    without the prefix, with a misspelt one, or with spaces. DeepSpeed answered "SOAA is not a supported
    DeepSpeed Optimizer", with no hint at the spelling. Names DeepSpeed builds itself (``AdamW``, ``Adam``,
    ``SGD``...) are left to it: ``"AdamW"`` is DeepSpeed's AdamW, only ``"lightning_soaa.AdamW"`` is ours."""
    if not isinstance(type_name, str) or type_name.lower() in REGISTRY:
        return
    text = type_name.strip()
    prefix = _LOOSE_PREFIX.match(text)
    if prefix is None and _deepspeed_accepts(text):
        return
    bare = text[prefix.end():] if prefix else text
    spelled = {n.lower(): n for spec in optimizer_registry.REGISTRY for n in (spec.name, *spec.aliases)}
    if bare.lower() in spelled:
        raise ValueError(
            f"Invalid optimizer.type={type_name!r}: not a DeepSpeed optimizer, and not a lightning_soaa one as "
            f"spelled (those are named exactly \"{PREFIX}<Name>\"). Write \"type\": "
            f"\"{PREFIX}{spelled[bare.lower()]}\".")
    if prefix is not None:
        lookup(type_name)  # meant as ours, but no such optimizer: the error lists the valid names


def parse_config(config: Any) -> ParsedConfig:
    """Split and validate; raises ``ValueError`` before any process group or engine exists."""
    ds = load_config(config)
    stage = zero_stage_of(ds)
    opt = ds.get("optimizer")
    if isinstance(opt, dict):
        _check_misspelt_name(opt.get("type"))
    if not isinstance(opt, dict) or not str(opt.get("type", "")).lower().startswith(PREFIX):
        return ParsedConfig(ds_config=ds, entry=None, optimizer_params={}, zero_stage=stage)
    entry = lookup(opt.get("type"))
    check_entry(ds, entry, stage)
    params = check_params(entry, opt.get("params"))
    ds.pop("optimizer")
    patch_for_client(ds, entry, stage)
    return ParsedConfig(ds_config=ds, entry=entry, optimizer_params=params, zero_stage=stage)
