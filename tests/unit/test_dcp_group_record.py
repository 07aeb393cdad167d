"""torch's DCP recipe over plain (non-FSDP2) parameters and the group options a checkpoint lacks.

``dcp.load`` refuses a checkpoint lacking a key its destination shows ("Missing key in checkpoint
state_dict"), and with ``DefaultLoadPlanner(allow_partial_load=True)`` keeps the destination's value for
it. Our metadata (one key, taken from the checkpoint) records the options each saved group had and keeps
ASGO's ``adamw_indices``/``fused_parts`` (keys some groups have) itself (``checkpoint.group_record``)."""

from __future__ import annotations

import copy
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_soaa import ASGO
from lightning_soaa.distributed.checkpoint import FORMAT_KEY
from tests.conformance._battery import assert_identical, params
from tests.harness.models import batch, loss_fn, tiny_mlp

KW: dict[str, Any] = {"lr": 0.03}


def _run(model: nn.Module, opt: ASGO, ts: range) -> None:
    for t in ts:
        opt.zero_grad()
        loss_fn(model, *batch(t, 0)).backward()
        opt.step()


def _save(model: nn.Module, opt: ASGO, path: Path, edit: Any = None) -> None:
    """torch's recipe: ``get_optimizer_state_dict`` -> ``dcp.save`` (``edit``: changes its torch form first,
    as an earlier version wrote it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = copy.deepcopy(get_optimizer_state_dict(model, opt))
    if edit is not None:
        edit(osd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one process: "assuming the intent is to save in a single ..."
        dcp.save({"optim": osd}, checkpoint_id=str(path))


def _load(model: nn.Module, opt: ASGO, path: Path, partial: bool = False) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    dest = {"optim": get_optimizer_state_dict(model, opt)}
    planner = DefaultLoadPlanner(allow_partial_load=True) if partial else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(dest, checkpoint_id=str(path), planner=planner)
    set_optimizer_state_dict(model, opt, dest["optim"])


def _groups(named: list[tuple[str, nn.Parameter]], adamw: list[int]) -> list[dict[str, Any]]:
    return [{"params": named, "adamw_indices": adamw}]


@pytest.mark.parametrize(("saved", "here"), [([], [1]), ([1], []), ([1], [1, 3])])
def test_a_dcp_checkpoint_loads_whatever_adamw_indices_the_groups_have_where_the_blocks_agree(
        saved: list[int], here: list[int], tmp_path: Path) -> None:
    """Found by a hunt: an empty ``adamw_indices`` was not saved (so that its remedy loads checkpoints of before
    the key), and a destination whose group has some showed the key: ``dcp.load`` refused the checkpoint
    ('Missing key ... adamw_indices') though the blocks agree (positions 1 and 3 are biases, in the AdamW part
    either way). The option rides in the metadata now: it loads in every direction and continues bit for bit."""
    a = tiny_mlp()
    opt = ASGO(_groups(list(a.named_parameters()), saved), **KW)
    _run(a, opt, range(3))
    _save(a, opt, tmp_path / "ckpt")
    b = tiny_mlp(seed=9)
    b.load_state_dict(a.state_dict())
    resumed = ASGO(_groups(list(b.named_parameters()), here), **KW)
    _load(b, resumed, tmp_path / "ckpt")
    assert resumed.num_steps == 3 and resumed.param_groups[0]["adamw_indices"] == here
    _run(a, opt, range(3, 6))
    _run(b, resumed, range(3, 6))
    assert_identical(params(b), params(a), "params")


def _saved_at_3(path: Path, edit: Any) -> nn.Module:
    model = tiny_mlp()
    opt = ASGO(model.named_parameters(), nesterov=False, **KW)
    _run(model, opt, range(3))
    _save(model, opt, path, edit)
    return model


def _uninterrupted(nesterov: bool) -> list[torch.Tensor]:
    model = tiny_mlp()
    _run(model, ASGO(model.named_parameters(), nesterov=nesterov, **KW), range(6))
    return params(model)


def _meta(osd: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads(osd["param_groups"][0][FORMAT_KEY])
    return meta


def _without_nesterov(osd: dict[str, Any], recorded: bool) -> None:
    """The groups of ``osd`` without ``nesterov``; ``recorded``: its metadata says so (as a checkpoint that
    records its groups and lacks an option), else it has no record (a version before it)."""
    meta = _meta(osd)
    for keys in meta.get("group_keys", []):
        keys.remove("nesterov")
    if not recorded:
        meta.pop("group_keys", None)
        meta.pop("group_options", None)
    for g in osd["param_groups"]:
        del g["nesterov"]
    osd["param_groups"][0][FORMAT_KEY] = json.dumps(meta)


def test_an_option_a_recorded_checkpoint_lacks_loads_as_absent_under_a_partial_load(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Found by a hunt: with ``allow_partial_load=True`` the missing ``nesterov`` kept the destination's True, and
    the run saved with the paper's rule continued with Nesterov (2.1e-3 off after 3 steps). A checkpoint that
    records its groups' keys tells the destination's value from a saved one: the option loads as absent
    (``absent_key_values``: False), the load says so, and the run continues bit for bit."""
    model = _saved_at_3(tmp_path / "ckpt", lambda osd: _without_nesterov(osd, recorded=True))
    b = tiny_mlp(seed=9)
    b.load_state_dict(model.state_dict())
    resumed = ASGO(b.named_parameters(), **KW)  # the default: nesterov=True
    with caplog.at_level(logging.WARNING):
        _load(b, resumed, tmp_path / "ckpt", partial=True)
    assert resumed.param_groups[0]["nesterov"] is False
    assert "saved without 'nesterov'" in caplog.text
    _run(b, resumed, range(3, 6))
    assert_identical(params(b), _uninterrupted(nesterov=False), "params")


def test_the_absent_option_is_said_once_and_not_for_another_optimizers_state(caplog: pytest.LogCaptureFixture) -> None:
    """Found by a hunt: loaded through torch's set_optimizer_state_dict, an earlier version's ASGO checkpoint
    (without ``nesterov``) logged that it resumes with nesterov=False twice, and SOAA's state logged it too,
    before being refused as SOAA's."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from lightning_soaa import SOAA

    a = tiny_mlp()
    opt = ASGO(a.named_parameters(), **KW)
    _run(a, opt, range(2))
    osd = get_optimizer_state_dict(a, opt)
    _without_nesterov(osd, recorded=True)
    b = tiny_mlp(seed=9)
    resumed = ASGO(b.named_parameters(), **KW)
    with caplog.at_level(logging.WARNING):
        set_optimizer_state_dict(b, resumed, osd)
    assert resumed.param_groups[0]["nesterov"] is False
    assert caplog.text.count("saved without 'nesterov'") == 1, caplog.text
    caplog.clear()
    soaa = SOAA(a.named_parameters(), lr=0.01)
    loss = loss_fn(a, *batch(0, 0))
    loss.backward()
    soaa.step(loss=loss.detach())
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError, match="saved by 'SOAA', not 'ASGO'"):
        set_optimizer_state_dict(b, resumed, get_optimizer_state_dict(a, soaa))
    assert "nesterov" not in caplog.text, caplog.text


def test_a_checkpoint_without_the_record_warns_where_a_partial_load_may_have_kept_the_destinations_value(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint of a version before the record cannot tell: without ``allow_partial_load`` torch refuses it
    when it lacks the key; with it, the loaded value is the destination's and the load warns, naming the option,
    the rule such a checkpoint was trained with and how to set it. A load that differs from the destination, or
    that equals the value a checkpoint without the option gets, does not warn."""
    _saved_at_3(tmp_path / "old", lambda osd: _without_nesterov(osd, recorded=False))
    b = tiny_mlp(seed=9)
    with pytest.raises(BaseException) as refused:  # torch's CheckpointException (a BaseException)
        _load(b, ASGO(b.named_parameters(), **KW), tmp_path / "old")
    assert "Missing key in checkpoint state_dict: optim.param_groups.0.nesterov" in str(
        getattr(refused.value, "failures", refused.value))
    resumed = ASGO(b.named_parameters(), **KW)
    with caplog.at_level(logging.WARNING, logger="lightning_soaa.optim.dcp_state"):
        _load(b, resumed, tmp_path / "old", partial=True)
    assert resumed.param_groups[0]["nesterov"] is True  # (what the checkpoint cannot say)
    assert "loads nesterov=True" in caplog.text and "set param_groups[0]['nesterov'] = False" in caplog.text
    def unrecorded(osd: dict[str, Any]) -> None:
        meta = {k: v for k, v in _meta(osd).items() if k not in ("group_keys", "group_options")}
        osd["param_groups"][0][FORMAT_KEY] = json.dumps(meta)

    for built in (True, False):  # saved False here: a value differing from the destination's, or the absent one
        caplog.clear()
        _saved_at_3(tmp_path / f"new{built}", unrecorded)
        other = ASGO(b.named_parameters(), nesterov=built, **KW)
        with caplog.at_level(logging.WARNING, logger="lightning_soaa.optim.dcp_state"):
            _load(b, other, tmp_path / f"new{built}", partial=True)
        assert other.param_groups[0]["nesterov"] is False and "loads nesterov" not in caplog.text


def _direct(opt: ASGO, path: Path, sd: dict[str, Any] | None = None, partial: bool = False) -> None:
    """``dcp.save({"optim": opt.state_dict()})`` (``sd`` given: that state) or, a fresh ``opt``, ``dcp.load``
    into its own ``state_dict()`` and ``load_state_dict``: DCP over the optimizer's own state dict, whose
    top-level metadata dict it saves key by key."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if sd is not None:
            dcp.save({"optim": sd}, checkpoint_id=str(path))
            return
        dest = {"optim": opt.state_dict()}
        dcp.load(dest, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=partial))
    opt.load_state_dict(dest["optim"])


@pytest.mark.parametrize(("earlier", "adamw"), [(True, None), (False, [1])])
def test_dcp_over_the_optimizers_own_state_dict_loads_an_earlier_checkpoint_and_a_one_sided_option(
        earlier: bool, adamw: list[int] | None, tmp_path: Path) -> None:
    """Found by a reviewer: the record sat in the top-level metadata dict, which DCP saves key by key (a list of
    dicts too), so ``dcp.save({"optim": opt.state_dict()})`` of an earlier version was refused ('Missing key in
    checkpoint state_dict: optim.lightning_soaa.group_keys'), and a group's ``adamw_indices`` only the destination
    has was refused as before the change ('...group_options.0.adamw_indices'). The record rides in the JSON copy
    in ``param_groups[0]`` (one DCP entry): both load without ``allow_partial_load`` and continue bit for bit."""
    from tests.harness.checkpoints import unrecorded

    a = tiny_mlp()
    named = list(a.named_parameters())
    opt = ASGO([{"params": named[:2]}, {"params": named[2:], "lr": 0.02}], **KW)
    _run(a, opt, range(3))
    sd = copy.deepcopy(opt.state_dict())
    _direct(opt, tmp_path / "ckpt", unrecorded(sd) if earlier else sd)
    b = tiny_mlp(seed=9)
    b.load_state_dict(a.state_dict())
    nb = list(b.named_parameters())
    first = {"params": nb[:2], **({} if adamw is None else {"adamw_indices": adamw})}  # ([1]: a bias, blocks agree)
    resumed = ASGO([first, {"params": nb[2:], "lr": 0.02}], **KW)
    _direct(resumed, tmp_path / "ckpt")
    assert resumed.num_steps == 3 and resumed.param_groups[0].get("adamw_indices") == adamw
    _run(a, opt, range(3, 6))
    _run(b, resumed, range(3, 6))
    assert_identical(params(b), params(a), "params")


@pytest.mark.parametrize("damage", [[[["lr"]]], "lr", [["lr"], ["lr"]]])
def test_a_damaged_group_record_is_refused_naming_it(damage: Any, tmp_path: Path) -> None:
    """Found by a reviewer: a record whose option names are not strings raised a bare TypeError ('unhashable
    type: list') from inside the load; every damage is a ValueError naming the record, nothing loaded."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    a = tiny_mlp()
    opt = ASGO(a.named_parameters(), **KW)
    _run(a, opt, range(2))
    for form in ("torch", "ours"):
        sd = copy.deepcopy(get_optimizer_state_dict(a, opt) if form == "torch" else opt.state_dict())
        meta = _meta(sd)
        meta["group_keys"] = damage
        sd["param_groups"][0][FORMAT_KEY] = json.dumps(meta)
        b = tiny_mlp()
        fresh = ASGO(b.named_parameters(), **KW)
        with pytest.raises(ValueError, match="group record .* a damaged checkpoint"):
            if form == "torch":
                set_optimizer_state_dict(b, fresh, sd)
            else:
                fresh.load_state_dict(sd)
        assert fresh.num_steps == 0 and not any(fresh.state.values())
