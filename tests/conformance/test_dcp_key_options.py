"""torch's DCP recipe over plain parameters across a change of an option that decides the state keys.

Some group options decide which keys a block keeps (``OptimizerSpec.state_key_options``: ASGO's
``root_every="auto"`` keeps ``gram_at_root``/``root_step``, EGN's momentum its buffer). ``dcp.load`` fills
only the keys the fresh optimizer's state dict shows, which are those of its own options, while the
checkpoint's group values win on load (as in torch). So, for every such option of every optimizer:

* saved with the value that keeps more keys, resumed with the other: refused on every rank before anything
  changes, naming the option, both values and the remedy (it loaded, continued with the saved value without
  that state: ASGO 4.9e-3 off the uninterrupted run at W = 1, 3.3e-3 at W = 2 on both ranks; hunter). The
  same state dict handed to ``set_optimizer_state_dict`` without DCP brings every key: it loads, the saved
  value wins, and the run continues exactly, as with torch.save.
* the other way round ``dcp.load`` itself refuses, on every rank and before reading anything, naming the key
  the checkpoint lacks (torch's ``CheckpointException``; our code does not run). With
  ``planner=DefaultLoadPlanner(allow_partial_load=True)`` the load goes through, the saved value wins, the
  keys it does not keep stay absent, and the run continues exactly.

And no other option of an optimizer's config changes the keys (else it belongs in ``state_key_options``).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from torch import Tensor

from lightning_soaa import registry
from lightning_soaa.optim.dcp_plain import placeholder_schema
from lightning_soaa.registry import OptimizerSpec, StepNeeds
from tests.conformance._battery import SPECS, assert_close, assert_identical, each_optimizer, make, params, step
from tests.harness.distributed import run_distributed

KEY_OPTIONS = [pytest.param(s.name, o, more, fewer, id=f"{s.name}-{o}")
               for s in SPECS for o, more, fewer in s.state_key_options]
STEPS = 2


# ---------------------------------------------------------------------------------------- which options
def _keys(opt: Any) -> dict[tuple[int, int], frozenset[str]]:
    """The keys a fresh destination shows per block (what ``dcp.load`` can fill)."""
    return {b.key: frozenset(placeholder_schema(opt, b)) for b in opt.block_table.blocks}


def _choices(spec: OptimizerSpec, name: str) -> tuple[Any, ...]:
    """A string option's choices, as the constructor's refusal lists them ("Must be one of 'a', 'b'.")."""
    try:
        make(spec, **{name: "no-such-choice"})
    except ValueError as e:
        listed = re.search(r"Must be one of (.*)\.", str(e))
        if listed:
            return tuple(re.findall(r"'([^']*)'", listed.group(1)))
    raise AssertionError(f"{spec.name}: {name}: the refusal of a bad choice lists no choices")


def _values(spec: OptimizerSpec) -> Iterator[tuple[str, Any]]:
    """Other values for every field of the spec's config (the constructor refuses some: skipped)."""
    config = spec.load_config()
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        kind = hints[f.name]
        optional = (type(None),) if type(None) in typing.get_args(kind) else ()
        base = [k for k in (typing.get_args(kind) or (kind,)) if k is not type(None)]
        if base == [bool]:
            values: tuple[Any, ...] = (True, False)
        elif base == [float]:
            values = (0.0, 0.5, 2.0)
        elif base == [int]:
            values = (0, 1, 3)
        elif set(base) == {int, str}:  # a count or a named mode (ASGO's root_every)
            values = (1, 3, "auto")
        elif base == [str]:
            values = _choices(spec, f.name)
        elif typing.get_origin(kind) is tuple:
            values = ((0.0, 0.0), (0.5, 0.5))
        else:  # a new field type: teach the battery about it
            raise AssertionError(f"{spec.name}: {f.name}: no values known for type {kind}")
        yield from ((f.name, v) for v in (*values, *(None for _ in optional)))


@each_optimizer
def test_every_option_that_changes_the_state_keys_is_declared(spec: OptimizerSpec) -> None:
    """Each config option, set to other values: where the blocks stay the same (the blocking options are
    checked by the layout), a value that changes the keys a block shows names an option that
    ``state_key_options`` must declare; and each declared option's values do change them, the first
    keeping more."""
    _, base = make(spec)
    found: set[str] = set()
    for name, value in _values(spec):
        if name in base._block_option_keys():
            continue
        try:
            _, opt = make(spec, **{name: value})
        except (ValueError, TypeError):
            continue  # a value this optimizer refuses
        keys, mine = _keys(opt), _keys(base)
        if set(keys) == set(mine) and keys != mine:
            found.add(name)
    declared = {o for o, _, _ in spec.state_key_options}
    assert found == declared, f"{spec.name}: options that change the state keys {sorted(found)}, declared " \
                              f"{sorted(declared)} (registry.OptimizerSpec.state_key_options)"
    for o, more, fewer in spec.state_key_options:
        a, b = _keys(make(spec, **{o: more})[1]), _keys(make(spec, **{o: fewer})[1])
        assert all(a[k] >= b[k] for k in a) and a != b, f"{spec.name}: {o}={more!r} keeps no more keys than {fewer!r}"


# ---------------------------------------------------------------------------------------- the recipe
def _trained(spec: OptimizerSpec, option: str, value: Any, rank: int = 0, world: int = 1) -> tuple[Any, Any]:
    model, opt = make(spec, **{option: value})
    for t in range(STEPS):
        step(spec, model, opt, t, rank=rank, world=world, average=world > 1 and spec.needs is not StepNeeds.BATCH)
    return model, opt


def _save(model: Any, opt: Any, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    opt.consolidate_state_dict(to=None)  # sharded ranks (W > 1): state_dict() is the gathered state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one process: "assuming the intent is to save in a single ..."
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)


def _fresh(spec: OptimizerSpec, model: Any, option: str, value: Any) -> tuple[Any, Any, dict[str, Any]]:
    """A fresh optimizer (the trained weights) and its DCP destination."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model2, fresh = make(spec, **{option: value})
    model2.load_state_dict(model.state_dict())
    fresh.consolidate_state_dict(to=None)
    return model2, fresh, {"optim": get_optimizer_state_dict(model2, fresh)}


def _dcp_load(dest: dict[str, Any], path: str, partial: bool = False) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one process: "assuming the intent is to load in a single ..."
        dcp.load(dest, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=partial))


def _untouched(fresh: Any, option: str, value: Any) -> bool:
    held = [v for st in fresh.state.values() for v in st.values() if isinstance(v, Tensor) or v]
    return fresh.num_steps == 0 and not held and all(g[option] == value for g in fresh.param_groups)


def _continued(spec: OptimizerSpec, ref: tuple[Any, Any], resumed: tuple[Any, Any], rank: int = 0,
               world: int = 1) -> list[Tensor]:
    """Both runs two more steps from a copy of the reference; the resumed run's parameters (checked equal)."""
    ref = copy.deepcopy(ref)  # one copy: the optimizer steps the copied model
    avg = world > 1 and spec.needs is not StepNeeds.BATCH
    for t in range(STEPS, STEPS + 2):
        step(spec, *ref, t, rank=rank, world=world, average=avg)
        step(spec, *resumed, t, rank=rank, world=world, average=avg)
    assert_close(params(resumed[0]), params(ref[0]), "params", rtol=0, atol=1e-12)
    return params(resumed[0])


def _refusal_names_it(msg: str, option: str, more: Any, fewer: Any) -> None:
    assert f"{option}={more!r}" in msg and f"{option}={fewer!r}" in msg, msg
    assert "Build the optimizer with" in msg and "Nothing was loaded" in msg, msg


@pytest.mark.parametrize(("name", "option", "more", "fewer"), KEY_OPTIONS)
def test_a_dcp_resume_across_a_state_key_option_resumes_exactly_or_is_refused_naming_it(
        name: str, option: str, more: Any, fewer: Any, tmp_path: Path) -> None:
    """Both directions of a change of ``option`` on torch's DCP recipe (see the module docstring)."""
    spec = registry.get(name)
    _more_into_fewer(spec, option, more, fewer, tmp_path / "more")
    _fewer_into_more(spec, option, more, fewer, tmp_path / "fewer")


def _more_into_fewer(spec: OptimizerSpec, option: str, more: Any, fewer: Any, path: Path) -> None:
    """Saved with ``option=more``, resumed with ``fewer``: refused before anything changes; the same state
    dict without DCP loads with the saved value and continues exactly."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, opt = _trained(spec, option, more)
    assert any(opt.state.values()), f"{spec.name}: no per-block state to carry"
    _save(model, opt, str(path))
    model2, fresh, dest = _fresh(spec, model, option, fewer)
    before = copy.deepcopy(fresh.state_dict())
    _dcp_load(dest, str(path))  # the checkpoint holds more keys than the destination: torch takes it
    with pytest.raises(ValueError) as err:
        set_optimizer_state_dict(model2, fresh, dest["optim"])
    _refusal_names_it(str(err.value), option, more, fewer)
    assert _untouched(fresh, option, fewer)
    assert_identical(fresh.state_dict(), before)
    # torch rebuilding our own state dict (no DCP) brings every key: loads, the saved value wins
    model3, other, _ = _fresh(spec, model, option, fewer)
    set_optimizer_state_dict(model3, other, copy.deepcopy(get_optimizer_state_dict(model, opt)))
    assert all(g[option] == more for g in other.param_groups) and other.num_steps == STEPS
    _continued(spec, (model, opt), (model3, other))


def _fewer_into_more(spec: OptimizerSpec, option: str, more: Any, fewer: Any, path: Path) -> None:
    """Saved with ``option=fewer``, resumed with ``more``: ``dcp.load`` refuses the keys the checkpoint lacks
    (torch's message names the key; nothing is read); with ``allow_partial_load=True`` the saved value wins
    and the run continues exactly (the README's remedy)."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    model, opt = _trained(spec, option, fewer)
    _save(model, opt, str(path))
    model2, fresh, dest = _fresh(spec, model, option, more)
    lacking = set().union(*_keys(fresh).values()) - set().union(*_keys(opt).values())
    with pytest.raises(CheckpointException) as err:
        _dcp_load(dest, str(path))
    assert "Missing key in checkpoint state_dict" in str(err.value)
    assert any(f".{k}" in str(err.value) for k in lacking), str(err.value)
    assert _untouched(fresh, option, more)
    _dcp_load(dest, str(path), partial=True)
    set_optimizer_state_dict(model2, fresh, dest["optim"])
    assert all(g[option] == fewer for g in fresh.param_groups) and fresh.num_steps == STEPS
    _continued(spec, (model, opt), (model2, fresh))


def _w_both_ways(rank: int, world: int, name: str, option: str, more: Any, fewer: Any, root: str) -> dict[str, Any]:
    """W ranks: ``more -> fewer`` refused (the message, and the optimizer still steps with the others), then
    ``fewer -> more`` with a partial load continuing as the uninterrupted W-rank run."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    spec = registry.get(name)
    model, opt = _trained(spec, option, more, rank, world)
    _save(model, opt, f"{root}/more")
    model2, fresh, dest = _fresh(spec, model, option, fewer)
    _dcp_load(dest, f"{root}/more")
    out: dict[str, Any] = {"refused": None}
    try:
        set_optimizer_state_dict(model2, fresh, dest["optim"])
    except ValueError as e:
        out["refused"] = str(e)
    out["untouched"] = _untouched(fresh, option, fewer)
    step(spec, model2, fresh, 0, rank=rank, world=world, average=spec.needs is not StepNeeds.BATCH)
    out["steps_after"] = fresh.num_steps
    model, opt = _trained(spec, option, fewer, rank, world)
    _save(model, opt, f"{root}/fewer")
    model2, fresh, dest = _fresh(spec, model, option, more)
    _dcp_load(dest, f"{root}/fewer", partial=True)
    set_optimizer_state_dict(model2, fresh, dest["optim"])
    out["value"] = fresh.param_groups[0][option]
    out["params"] = _continued(spec, (model, opt), (model2, fresh), rank, world)
    return out


@pytest.mark.parametrize(("name", "option", "more", "fewer"), KEY_OPTIONS)
def test_at_two_ranks_every_rank_refuses_alike_and_a_partial_load_resumes(
        name: str, option: str, more: Any, fewer: Any, tmp_path: Path) -> None:
    """W = 2 (each rank consolidates, saves and loads the whole state): the refusal on both ranks, the same,
    nothing loaded, and a step after it still taken together; the partial load's runs equal on both ranks."""
    res = run_distributed(_w_both_ways, 2, tmp_path, name, option, more, fewer, str(tmp_path), timeout=150)
    for r, out in enumerate(res):
        assert out["refused"] is not None, f"rank {r}: loaded"
        _refusal_names_it(out["refused"], option, more, fewer)
        assert out["untouched"] and out["steps_after"] == 1, f"rank {r}"
        assert out["value"] == fewer, f"rank {r}"
    assert res[0]["refused"] == res[1]["refused"]
    assert_identical(res[0]["params"], res[1]["params"], "params")
