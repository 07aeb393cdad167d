"""torch's flattened optimizer state dict (``StateDictOptions(flatten_optimizer_state_dict=True)``), as
torchtitan uses it, for every optimizer of the registry (one process; across world sizes:
``tests/distributed/test_dcp_plain.py`` over plain parameters, ``tests/fsdp2`` under FSDP2).

torchtitan's ``OptimizersContainer`` keeps one optimizer per model part (pipeline stages) and merges their
flattened dicts into one: ``get_optimizer_state_dict(part, opt, options=flat)`` per part, ``dcp.save`` /
``dcp.load`` of the merged dict, then ``set_optimizer_state_dict(part, opt, merged, options=flat)`` per
part. torch rebuilds each optimizer's part from the keys that optimizer's live groups and state hold, which
lost our metadata and every state before the first step; ``lightning_soaa/optim/dcp_flat.py`` rebuilds it
from the dict itself. This was refused at the save before.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from lightning_soaa.registry import OptimizerSpec
from tests.conformance._battery import assert_close, assert_identical, each_optimizer, params, step
from tests.harness.models import tiny_mlp

STEPS = 2
PARTS = ("stage0", "stage1")


def _flat() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _parts(spec: OptimizerSpec) -> list[tuple[nn.Module, Any]]:
    """One model and optimizer per part; each part's parameter names start with its own name, as pipeline
    stages of one model keep theirs (float64; another seed per part)."""
    import torch

    out = []
    for i, name in enumerate(PARTS):
        model = nn.Sequential(OrderedDict([(name, tiny_mlp(i, torch.float64))]))
        out.append((model, spec.build(model, **spec.test_kwargs)))
    return out


def _merged(parts: list[tuple[nn.Module, Any]]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    merged: dict[str, Any] = {}
    for model, opt in parts:
        merged.update(get_optimizer_state_dict(model, opt, options=_flat()))
    assert "state" not in merged and "param_groups" not in merged  # torch's flattened form
    # our metadata once per optimizer (torch repeats a group key once per parameter: it grew quadratically)
    assert [k.split(".")[0] for k in merged if k.endswith(".lightning_soaa")] == ["state"] * len(parts)
    return merged


def _dcp(fn: Any, sd: dict[str, Any], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one process: "assuming the intent is to ... in a single ..."
        fn(sd, checkpoint_id=str(path))


@each_optimizer
def test_model_parts_sharing_one_flattened_dict_resume_exactly(spec: OptimizerSpec, tmp_path: Path) -> None:
    """Two parts trained STEPS steps, saved as torchtitan does, loaded into fresh parts (the trained
    weights), two more steps: equal to the uninterrupted run, part by part."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    parts = _parts(spec)
    for model, opt in parts:
        for t in range(STEPS):
            step(spec, model, opt, t)
    _dcp(dcp.save, {"optimizer": _merged(parts)}, tmp_path)
    fresh = _parts(spec)
    for (model, _), (model2, _) in zip(parts, fresh):
        model2.load_state_dict(model.state_dict())
    dest = {"optimizer": _merged(fresh)}
    _dcp(dcp.load, dest, tmp_path)
    for model2, opt2 in fresh:
        set_optimizer_state_dict(model2, opt2, dest["optimizer"], options=_flat())
        assert opt2.num_steps == STEPS
    for (model, opt), (model2, opt2) in zip(parts, fresh):
        for t in range(STEPS, STEPS + 2):
            step(spec, model, opt, t)
            step(spec, model2, opt2, t)
        assert_close(params(model2), params(model), "params", rtol=0, atol=1e-12)


@each_optimizer
def test_a_flattened_dict_without_our_metadata_is_refused_and_loads_nothing(spec: OptimizerSpec) -> None:
    """A flattened dict whose metadata entry is gone (not written by this optimizer): a ValueError naming
    the option and the missing entry, and the optimizer as it was (before, torch's rebuild reached the
    validation as "not a lightning_soaa optimizer state", or failed inside torch)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    (model, opt), = _parts(spec)[:1]
    step(spec, model, opt, 0)
    sd = {k: v for k, v in _merged([(model, opt)]).items() if not k.endswith(".lightning_soaa")}
    (model2, fresh), = _parts(spec)[:1]
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"flatten_optimizer_state_dict=True.*has no 'lightning_soaa' entry"):
        set_optimizer_state_dict(model2, fresh, sd, options=_flat())
    assert fresh.num_steps == 0
    assert_identical(fresh.state_dict(), before)
