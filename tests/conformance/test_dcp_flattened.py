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

from lightning_soaa.registry import FirstArg, OptimizerSpec
from tests.conformance._battery import SPECS, assert_close, assert_identical, each_optimizer, params, step
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


def _asgo_with_adamw_indices(model: nn.Module) -> Any:
    from lightning_soaa import ASGO

    return ASGO([{"params": list(model.named_parameters()), "adamw_indices": [0]}], lr=5e-2, root_every=2)


def _asgo_with_a_frozen_fused_matrix(model: nn.Module) -> Any:
    from lightning_soaa import ASGO

    model.qkv.weight.requires_grad_(False)  # its group records fused_parts (stepped as 3 parts once it trains)
    return ASGO(model.named_parameters(), fused={"qkv.weight": 3}, lr=5e-2, root_every=2)


@pytest.mark.parametrize("build", [_asgo_with_adamw_indices, _asgo_with_a_frozen_fused_matrix],
                         ids=["adamw_indices", "fused_parts"])
def test_asgo_groups_with_options_kept_in_the_metadata_round_trip(build: Any) -> None:
    """ASGO's adamw_indices and fused_parts (``_meta_options``) live in the param group but are saved in the
    JSON metadata only. torch's rebuild of a flattened dict reads every live group key under the group's
    first parameter before the optimizer sees it: it raised a bare ``KeyError:
    'param_groups.inp.weight.adamw_indices'`` inside torch, for a checkpoint the save had written. Now the
    keys are written too, and the run resumes exactly."""
    import torch
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from tests.harness.models import QKVNet, batch

    def steps(model: nn.Module, opt: Any, ts: range) -> None:
        for t in ts:
            x, y = batch(t, 0)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    torch.manual_seed(0)
    model = QKVNet(True).to(torch.float64)
    opt = build(model)
    steps(model, opt, range(STEPS))
    sd = get_optimizer_state_dict(model, opt, options=_flat())
    model2 = QKVNet(True).to(torch.float64)
    model2.load_state_dict(model.state_dict())
    opt2 = build(model2)
    set_optimizer_state_dict(model2, opt2, sd, options=_flat())
    assert opt2.num_steps == STEPS
    steps(model, opt, range(STEPS, STEPS + 2))
    steps(model2, opt2, range(STEPS, STEPS + 2))
    assert_identical(params(model2), params(model))


@each_optimizer
def test_a_flattened_dict_handed_to_load_state_dict_names_torchs_loader(spec: OptimizerSpec) -> None:
    """torch's flattened dict given to ``opt.load_state_dict`` itself (not through set_optimizer_state_dict):
    refused naming torch's loader that rebuilds it by parameter name, with a bounded key list. Before, the
    message listed every key of the dict (one per value: megabytes for a large model) and gave no hint."""
    (model, opt), = _parts(spec)[:1]
    step(spec, model, opt, 0)
    sd = _merged([(model, opt)])
    (_, fresh), = _parts(spec)[:1]
    with pytest.raises(ValueError, match=r"flattened optimizer state dict.*set_optimizer_state_dict\(model") as err:
        fresh.load_state_dict(sd)
    assert f"({len(sd)} keys)" in str(err.value) and len(str(err.value)) < 2000
    assert fresh.num_steps == 0


def _two_matrices(out: int = 8) -> nn.Module:
    """Two bias-free layers (float64, seeded): 8x8 and ``out``x8."""
    import torch

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8, bias=False), nn.Tanh(), nn.Linear(8, out, bias=False)).double()


def _steps(m: nn.Module, opt: Any, n: int, seed: int) -> None:
    """``n`` steps on seeded random inputs (the same ones for the same seed)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        m(torch.randn(4, 8, generator=g, dtype=torch.float64)).pow(2).mean().backward()
        opt.step()


def _two_groups(cls_name: str, model: nn.Module, swapped: bool) -> Any:
    """Two groups of one equal-shaped matrix each, with their own lr; ``swapped``: built in the other order."""
    import lightning_soaa

    (na, a), (nb, b) = model.named_parameters()
    groups = [{"params": [(na, a)], "lr": 1e-2}, {"params": [(nb, b)], "lr": 3e-2}]
    return getattr(lightning_soaa, cls_name)(groups[::-1] if swapped else groups, lr=1e-2)


def _options(flat: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=flat)


FORMS = pytest.mark.parametrize("flat", [True, False], ids=["flattened", "unflattened"])


@FORMS
@pytest.mark.parametrize(("cls_name", "first", "second"), [
    ("ShardedAdamW", {"weight_decay": 0.1, "eps": 1e-6}, {"weight_decay": 0.0, "eps": 1e-8}),
    ("ASGO", {"adamw_indices": [0], "weight_decay": 0.1}, {"adamw_indices": [], "weight_decay": 0.0}),
])
def test_groups_built_in_another_order_resume_by_name(cls_name: str, first: dict[str, Any], second: dict[str, Any],
                                                      flat: bool) -> None:
    """Groups of other shapes and options (ASGO's ``adamw_indices``, kept in our JSON metadata: the first
    matrix takes the AdamW part) built in the other order than saved, through torch's tools (both forms):
    each group gets the options it was saved with and the run continues as uninterrupted. Before: refused
    (the metadata's per-group and per-parameter records follow the saved order; earlier still, "a different
    model" or, with equal shapes, the records of other groups taken by position)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    import lightning_soaa

    def build(m: nn.Module, swapped: bool) -> Any:
        (na, a), (nb, b) = m.named_parameters()
        groups = [{"params": [(na, a)], "lr": 1e-2, **first}, {"params": [(nb, b)], "lr": 3e-2, **second}]
        return getattr(lightning_soaa, cls_name)(groups[::-1] if swapped else groups, lr=1e-2)

    m = _two_matrices(4)
    opt = build(m, False)
    _steps(m, opt, STEPS, 0)
    sd = get_optimizer_state_dict(m, opt, options=_options(flat))
    m2 = _two_matrices(4)
    m2.load_state_dict(m.state_dict())
    opt2 = build(m2, True)
    set_optimizer_state_dict(m2, opt2, sd, options=_options(flat))
    assert opt2.num_steps == STEPS
    for got, want in zip(opt2.param_groups[::-1], opt.param_groups, strict=True):
        assert {k: got[k] for k in ("lr", *first)} == {k: want[k] for k in ("lr", *first)}
    _steps(m, opt, 2, 1)
    _steps(m2, opt2, 2, 1)
    assert_close(params(m2), params(m), "params", rtol=0, atol=1e-12)


def test_later_groups_built_in_another_order_resume_by_name() -> None:
    """Three groups of ASGO, the second's matrix in its AdamW part (``adamw_indices``, kept in our metadata),
    the first built as saved and the other two swapped (our metadata then rides with the saved first group,
    where this optimizer's is too): the records of the other two follow their parameters, and the run
    continues as uninterrupted (the flattened form; the unflattened one under FSDP2: tests/fsdp2). Before:
    refused."""
    import torch
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from lightning_soaa import ASGO

    def build(m: nn.Module, order: tuple[int, ...]) -> Any:
        named = list(m.named_parameters())  # the second matrix takes ASGO's AdamW part (kept in the metadata)
        return ASGO([{"params": [named[i]], "lr": 1e-2 * (i + 1), "adamw_indices": [0] if i == 1 else []}
                     for i in order], lr=1e-2)

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(*(nn.Linear(8, 8, bias=False) for _ in range(3))).double()

    m = model()
    opt = build(m, (0, 1, 2))
    _steps(m, opt, STEPS, 0)
    sd = get_optimizer_state_dict(m, opt, options=_flat())
    m2 = model()
    m2.load_state_dict(m.state_dict())
    opt2 = build(m2, (0, 2, 1))
    set_optimizer_state_dict(m2, opt2, sd, options=_flat())
    assert [(g["lr"], g["adamw_indices"]) for g in opt2.param_groups] == [(1e-2, []), (3e-2, []), (2e-2, [0])]
    _steps(m, opt, 2, 1)
    _steps(m2, opt2, 2, 1)
    assert_close(params(m2), params(m), "params", rtol=0, atol=1e-12)


def _layer_groups(spec: OptimizerSpec, model: nn.Module, swapped: bool) -> Any:
    """``spec``'s optimizer over two param groups, the first layer and the rest, with their own lr;
    ``swapped``: built in the other order."""
    named = list(model.named_parameters())
    lr = spec.test_kwargs.get("lr", 1e-2)
    groups = [{"params": named[:2], "lr": lr}, {"params": named[2:], "lr": lr / 2}]
    return spec.load()(groups[::-1] if swapped else groups, **spec.test_kwargs)


@FORMS
@pytest.mark.parametrize("spec", [s for s in SPECS if s.first_arg is not FirstArg.MODULE], ids=lambda s: s.name)
def test_each_optimizer_resumes_groups_built_in_another_order(spec: OptimizerSpec, flat: bool) -> None:
    """Every registry optimizer with param groups (EGN holds exactly one, of its module: it cannot be built
    in another order), saved through torch's getter with two groups, loaded by torch's setter into one built
    with the groups swapped: the remaining steps equal the uninterrupted run to 1e-12 (float64). Before:
    refused."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    (model, _), = _parts(spec)[:1]
    opt = _layer_groups(spec, model, False)
    for t in range(STEPS):
        step(spec, model, opt, t)
    sd = get_optimizer_state_dict(model, opt, options=_options(flat))
    (model2, _), = _parts(spec)[:1]
    model2.load_state_dict(model.state_dict())
    opt2 = _layer_groups(spec, model2, True)
    set_optimizer_state_dict(model2, opt2, sd, options=_options(flat))
    assert opt2.num_steps == STEPS
    for t in range(STEPS, STEPS + 2):
        step(spec, model, opt, t)
        step(spec, model2, opt2, t)
    assert_close(params(model2), params(model), "params", rtol=0, atol=1e-12)


class _Tied(nn.Module):
    """A tied embedding and head whose names sort against their order (``named_parameters`` gives the shared
    weight as ``z_emb.weight``, its names sort ``a_head.weight`` first)."""

    def __init__(self) -> None:
        import torch

        super().__init__()
        torch.manual_seed(0)
        self.z_emb, self.mid, self.a_head = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10, bias=False)
        self.a_head.weight = self.z_emb.weight

    def forward(self, x: Any) -> Any:
        import torch

        return self.a_head(torch.tanh(self.mid(self.z_emb(x))))


@FORMS
@pytest.mark.parametrize("swapped", [False, True], ids=["as_saved", "swapped"])
def test_a_shared_parameter_resumes_by_the_name_torch_saves_it_under(flat: bool, swapped: bool) -> None:
    """A tied weight has two names and torch saves it under the one ``named_parameters`` gives; the recorded
    order lists both, so the groups (the shared weight's, the middle layer's) resume as saved and swapped, as
    uninterrupted. Before: the flattened form was refused even as saved ("the parameter saved at position 0
    is 'a_head.weight', this optimizer's 'z_emb.weight'": the order recorded the name that sorts first),
    and a swap was refused in both forms."""
    import torch
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from lightning_soaa import ShardedAdamW

    def build(m: nn.Module, swap: bool) -> Any:
        (ne, e), *mid = m.named_parameters()
        groups = [{"params": [(ne, e)], "lr": 1e-2}, {"params": mid, "lr": 3e-2, "weight_decay": 0.0}]
        return ShardedAdamW(groups[::-1] if swap else groups)

    def steps(m: nn.Module, opt: Any, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(n):
            opt.zero_grad()
            m(torch.randint(0, 10, (5,), generator=g)).pow(2).mean().backward()
            opt.step()

    m = _Tied().double()
    opt = build(m, False)
    steps(m, opt, STEPS, 0)
    sd = get_optimizer_state_dict(m, opt, options=_options(flat))
    m2 = _Tied().double()
    m2.load_state_dict(m.state_dict())
    opt2 = build(m2, swapped)
    set_optimizer_state_dict(m2, opt2, sd, options=_options(flat))
    assert opt2.num_steps == STEPS
    steps(m, opt, 2, 1)
    steps(m2, opt2, 2, 1)
    assert_close(params(m2), params(m), "params", rtol=0, atol=1e-12)


def _without_recorded_order(sd: dict[str, Any], flat: bool) -> dict[str, Any]:
    """``sd`` as a version before the saved order was recorded wrote it (no ``param_fqns``/``group_sizes``)."""
    import json

    def strip(text: str) -> str:
        meta = json.loads(text)
        assert "param_fqns" in meta and "group_sizes" in meta
        return json.dumps({k: v for k, v in meta.items() if k not in ("param_fqns", "group_sizes")})

    out = copy.deepcopy(sd)
    if not flat:
        out["param_groups"][0]["lightning_soaa"] = strip(out["param_groups"][0]["lightning_soaa"])
        return out
    key = next(k for k in out if k.endswith(".lightning_soaa"))
    text = strip(out[key].to_bytes((out[key].bit_length() + 7) // 8, "big").decode())
    out[key] = int.from_bytes(text.encode(), "big")
    return out


@FORMS
@pytest.mark.parametrize("case", ["within_a_group", "regrouped", "unrecorded"])
def test_groups_not_the_saved_ones_reordered_are_refused_and_load_nothing(flat: bool, case: str) -> None:
    """Refused, naming the order and the fix, nothing loaded: a group's parameters in another order (its
    positional options follow it), the parameters grouped otherwise in the same order (the records of one
    group would land on another), and a reorder of a checkpoint that does not record the saved order. Before:
    the first two loaded the metadata's records by position where the shapes matched."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from lightning_soaa import ShardedAdamW

    m = _two_matrices()
    named = list(m.named_parameters())
    saved_groups = ([[0], [1]] if case != "within_a_group" else [[0, 1]])
    opt = ShardedAdamW([{"params": [named[i] for i in g], "lr": 1e-2 * (j + 1)} for j, g in enumerate(saved_groups)])
    _steps(m, opt, STEPS, 0)
    sd = get_optimizer_state_dict(m, opt, options=_options(flat))
    live = {"within_a_group": [[1, 0]], "regrouped": [[0, 1]], "unrecorded": [[1], [0]]}[case]
    dest = ShardedAdamW([{"params": [named[i] for i in g], "lr": 1e-2} for g in live])
    before = copy.deepcopy(dest.state_dict())
    said = {"within_a_group": r"position 0 is '0\.weight', this optimizer's '2\.weight'.*in their saved order",
            "regrouped": r"another order than this optimizer's \(or grouped otherwise\).*the same parameters per group",
            "unrecorded": (r"does not record its groups" if flat else
                           r"param groups are in another order.*param_groups\[1\] \(parameters \['0\.weight'\]\)")}
    with pytest.raises(ValueError, match=said[case] + ".*Nothing was loaded"):
        set_optimizer_state_dict(m, dest, _without_recorded_order(sd, flat) if case == "unrecorded" else sd,
                                 options=_options(flat))
    assert dest.num_steps == 0
    assert_identical(dest.state_dict(), before)


def test_parameters_saved_by_two_optimizers_loaded_into_one_is_refused_naming_the_split() -> None:
    """Pipeline stages merged (two optimizers saved into one flattened dict, one optimizer over all the
    parameters loads it): refused naming the split, nothing loaded. Before: "the state of 'layers.6.weight'
    has key(s) ['lightning_soaa'], which are neither per-block entries ..."."""
    import torch
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from lightning_soaa import ShardedAdamW

    model = tiny_mlp(0, torch.float64)
    opts = [ShardedAdamW(model[:2].parameters(), lr=1e-2), ShardedAdamW(model[2:].parameters(), lr=1e-2)]
    model(torch.ones(2, 6, dtype=torch.float64)).sum().backward()
    for opt in opts:
        opt.step()
    sd = get_optimizer_state_dict(model, opts, options=_flat())
    model2 = tiny_mlp(0, torch.float64)
    fresh = ShardedAdamW(model2.parameters(), lr=1e-2)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"entries of 2 optimizers.*split among several optimizers"):
        set_optimizer_state_dict(model2, fresh, sd, options=_flat())
    assert_identical(fresh.state_dict(), before)


def _full_flat(cpu_offload: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True, cpu_offload=cpu_offload)


@pytest.mark.parametrize("cpu_offload", [False, True], ids=["full", "full_cpu_offload"])
@each_optimizer
def test_a_full_flattened_save_is_refused_naming_the_options_and_changes_nothing(spec: OptimizerSpec,
                                                                                   cpu_offload: bool) -> None:
    """``StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)`` (with or without
    ``cpu_offload``): torch's set_optimizer_state_dict cannot load what it saves, for any optimizer (torch's AdamW
    fails with a bare ``KeyError: 'param_groups.0.params.0'`` too), so the save is refused naming both options
    and the fix, and the optimizer goes on as uninterrupted. Before: saved, then never loaded with those options."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    (model, opt), (model2, opt2) = _parts(spec)[0], _parts(spec)[0]  # the same first part twice
    step(spec, model, opt, 0)
    step(spec, model2, opt2, 0)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"StateDictOptions\(full_state_dict=True, flatten_optimizer_state_dict=True\)"
                                         r"\) is refused.*Drop one of the two.*Nothing was saved or changed"):
        get_optimizer_state_dict(model, opt, options=_full_flat(cpu_offload))
    assert_identical(opt.state_dict(), before)
    for t in (1, 2):
        step(spec, model, opt, t)
        step(spec, model2, opt2, t)
    assert_identical(params(model), params(model2))


@each_optimizer
def test_a_full_flattened_load_is_refused_naming_the_load_that_works(spec: OptimizerSpec) -> None:
    """A flattened state dict handed to ``set_optimizer_state_dict`` with ``full_state_dict=True`` too: refused
    naming the options and the load that works (the flattened option alone), nothing loaded; that load then
    resumes as uninterrupted. Before: a bare ``KeyError: 'param_groups.0.params.0'`` from inside torch."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    (model, opt), = _parts(spec)[:1]
    for t in range(STEPS):
        step(spec, model, opt, t)
    sd = get_optimizer_state_dict(model, opt, options=_flat())
    (model2, fresh), = _parts(spec)[:1]
    model2.load_state_dict(model.state_dict())
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"cannot load.*flatten_optimizer_state_dict=True\) alone.*Nothing was loaded"):
        set_optimizer_state_dict(model2, fresh, copy.deepcopy(sd), options=_full_flat())
    assert fresh.num_steps == 0
    assert_identical(fresh.state_dict(), before)
    set_optimizer_state_dict(model2, fresh, sd, options=_flat())  # the load the message names
    for t in range(STEPS, STEPS + 2):
        step(spec, model, opt, t)
        step(spec, model2, fresh, t)
    assert_close(params(model2), params(model), "params", rtol=0, atol=1e-12)


def _as_written_before_the_order_was_recorded(sd: dict[str, Any], first: str) -> dict[str, Any]:
    """``sd`` as the versions before the saved order was recorded wrote it: no ``param_fqns``/``group_sizes``,
    the metadata in the state of the first group's first parameter ``first``."""
    out = _without_recorded_order(sd, flat=True)
    key = next(k for k in out if k.endswith(".lightning_soaa"))
    return {**{k: v for k, v in out.items() if k != key}, f"state.{first}.lightning_soaa": out[key]}


@each_optimizer
def test_a_flattened_checkpoint_written_before_the_order_was_recorded_loads_through_dcp(spec: OptimizerSpec,
                                                                                       tmp_path: Path) -> None:
    """A flattened checkpoint of one param group as the versions before the saved order was recorded wrote it
    (the metadata in the state of the first parameter, ``stage0.0.weight``), through ``dcp.save`` and
    ``dcp.load`` into a fresh optimizer's dict: resumes as uninterrupted. Before: the destination showed the
    metadata under the name that sorts first (``stage0.0.bias``), so ``dcp.load`` refused every such
    checkpoint of a model with biases ("Missing key in checkpoint state_dict: optimizer.state.stage0.0.bias.
    lightning_soaa")."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    (model, opt), = _parts(spec)[:1]
    for t in range(STEPS):
        step(spec, model, opt, t)
    first = next(iter(dict(model.named_parameters())))
    old = _as_written_before_the_order_was_recorded(get_optimizer_state_dict(model, opt, options=_flat()), first)
    _dcp(dcp.save, {"optimizer": old}, tmp_path)
    (model2, fresh), = _parts(spec)[:1]
    model2.load_state_dict(model.state_dict())
    dest = {"optimizer": get_optimizer_state_dict(model2, fresh, options=_flat())}
    _dcp(dcp.load, dest, tmp_path)
    set_optimizer_state_dict(model2, fresh, dest["optimizer"], options=_flat())
    assert fresh.num_steps == STEPS
    for t in range(STEPS, STEPS + 2):
        step(spec, model, opt, t)
        step(spec, model2, fresh, t)
    assert_close(params(model2), params(model), "params", rtol=0, atol=1e-12)


def _with_an_empty_group(cls_name: str, model: nn.Module, order: tuple[int, ...]) -> Any:
    """``cls_name`` over three groups in ``order``: the first matrix, one without parameters, the second
    matrix, each with its own lr (torch allows an empty group only with unnamed parameters)."""
    import lightning_soaa

    a, b = model.parameters()
    groups = [{"params": [a], "lr": 1e-2}, {"params": [], "lr": 5e-2}, {"params": [b], "lr": 3e-2}]
    return getattr(lightning_soaa, cls_name)([groups[i] for i in order], lr=1e-2)


@pytest.mark.parametrize("cls_name", ["ShardedAdamW", "ASGO"])
def test_groups_with_an_empty_one_built_in_another_order_are_refused_saying_why(cls_name: str) -> None:
    """A param group without parameters among groups built in another order than saved (the unflattened
    form): refused naming the empty group, torch's misplacement and the fix, nothing loaded (torch 2.13's
    ``_split_optim_state_dict`` hands the live empty group the keys of the saved group it matched last and
    leaves that group none: the empty group took the other group's lr 3e-2, not its own 5e-2). Built as
    saved, it resumes as uninterrupted. Before: refused saying the checkpoint "does not record its groups
    (written before lightning_soaa resumed reordered groups)", which was not true."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    m = _two_matrices(4)
    opt = _with_an_empty_group(cls_name, m, (0, 1, 2))
    _steps(m, opt, STEPS, 0)
    sd = get_optimizer_state_dict(m, opt, options=_options(False))
    m2 = _two_matrices(4)
    m2.load_state_dict(m.state_dict())
    dest = _with_an_empty_group(cls_name, m2, (2, 1, 0))
    before = copy.deepcopy(dest.state_dict())
    with pytest.raises(ValueError, match=r"saved with param_groups\[1\] holding no parameters.*another order.*"
                                         r"the empty group where it was.*Nothing was loaded"):
        set_optimizer_state_dict(m2, dest, copy.deepcopy(sd), options=_options(False))
    assert dest.num_steps == 0
    assert_identical(dest.state_dict(), before)
    opt2 = _with_an_empty_group(cls_name, m2, (0, 1, 2))
    set_optimizer_state_dict(m2, opt2, sd, options=_options(False))
    assert [g["lr"] for g in opt2.param_groups] == [1e-2, 5e-2, 3e-2]
    _steps(m, opt, 2, 1)
    _steps(m2, opt2, 2, 1)
    assert_close(params(m2), params(m), "params", rtol=0, atol=1e-12)


def _refused_at_the_getter_and_unchanged(order: tuple[int, ...], options: Any, said: str) -> nn.Module:
    """ShardedAdamW over :func:`_with_an_empty_group` in ``order``, one step: torch's getter with ``options``
    raises a ValueError matching ``said`` and the run goes on as uninterrupted. Returns the model."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    m, m2 = _two_matrices(4), _two_matrices(4)
    opt, opt2 = _with_an_empty_group("ShardedAdamW", m, order), _with_an_empty_group("ShardedAdamW", m2, order)
    _steps(m, opt, 1, 0)
    _steps(m2, opt2, 1, 0)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=said + ".*Nothing was saved or changed"):
        get_optimizer_state_dict(m, opt, options=options)
    assert_identical(opt.state_dict(), before)
    _steps(m, opt, 2, 1)
    _steps(m2, opt2, 2, 1)
    assert_identical(params(m), params(m2))
    return m


def test_a_flattened_state_dict_of_an_optimizer_with_an_empty_group_is_refused_and_changes_nothing() -> None:
    """The flattened form of an optimizer with a param group without parameters: refused at the save (and
    at the destination's get_optimizer_state_dict, before dcp.load), naming the group and the fix; the
    optimizer goes on as uninterrupted. Before: saved, then set_optimizer_state_dict failed inside torch
    with a bare ``IndexError: list index out of range`` (as for torch's own AdamW)."""
    _refused_at_the_getter_and_unchanged((0, 1, 2), _flat(), r"flatten_optimizer_state_dict=True\)\) is refused: "
                                         r"param_groups\[1\] hold no parameters.*without the empty group")


def test_a_state_dict_of_an_optimizer_whose_first_group_is_empty_is_refused_and_changes_nothing() -> None:
    """The unflattened form of an optimizer whose first param group holds no parameters: refused at the save
    (and at the destination's get_optimizer_state_dict), naming the group and the fix; the optimizer goes on
    as uninterrupted; with the empty group after the others it resumes. Before: saved, then refused at the
    load as "not a lightning_soaa optimizer state" (torch's set_optimizer_state_dict hands a first empty
    group none of its saved keys, our metadata among them; torch's AdamW loses that group's lr)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    m = _refused_at_the_getter_and_unchanged((1, 0, 2), _options(False), r"StateDictOptions\(\)\) is refused: "
                                             r"param_groups\[0\] hold no parameters.*after a group with parameters")
    last = _with_an_empty_group("ShardedAdamW", m, (0, 2, 1))
    _steps(m, last, STEPS, 0)
    sd = get_optimizer_state_dict(m, last, options=_options(False))
    m3 = _two_matrices(4)
    m3.load_state_dict(m.state_dict())
    resumed = _with_an_empty_group("ShardedAdamW", m3, (0, 2, 1))
    set_optimizer_state_dict(m3, resumed, sd, options=_options(False))
    _steps(m, last, 2, 1)
    _steps(m3, resumed, 2, 1)
    assert_close(params(m3), params(m), "params", rtol=0, atol=1e-12)


def test_the_empty_first_group_refusal_names_the_options_the_getter_was_called_with() -> None:
    """With ``full_state_dict=True`` (Lightning's ModelParallelStrategy without a distributed checkpoint) the
    refusal of an empty first group names the options as passed and what torch's AdamW does there (keeps the
    lr it was built with: torch fills the dropped keys from the destination's own). Before: it named
    ``StateDictOptions()`` and said torch's AdamW loses its lr."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    _refused_at_the_getter_and_unchanged(
        (1, 0, 2), StateDictOptions(full_state_dict=True, cpu_offload=True),
        r"StateDictOptions\(full_state_dict=True, cpu_offload=True\)\) is refused: param_groups\[0\] hold no "
        r"parameters.*torch's AdamW keeps the lr it was built with")


@FORMS
def test_groups_built_in_another_order_warn_that_a_scheduler_state_follows_the_saved_order(
        flat: bool, caplog: pytest.LogCaptureFixture) -> None:
    """torch's LR schedulers keep per-group lists (``base_lrs``) by position: loaded as they are into groups
    built in another order, the next scheduler step swaps the groups' learning rates, silently (the optimizer
    does not see the scheduler). The load of the optimizer warns, naming the saved group of each group and
    the reorder; the scheduler state reordered so, the learning rates equal the uninterrupted run's; groups
    built as saved do not warn. Before: no word (the lrs came out swapped: 1.25e-3 where 3.75e-3 was due)."""
    import logging

    import torch
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    def build(m: nn.Module, swapped: bool) -> tuple[Any, Any]:
        opt = _two_groups("ShardedAdamW", m, swapped)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)

    def lrs(opt: Any) -> dict[str, float]:
        return {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}

    m = _two_matrices()
    opt, sched = build(m, False)
    _steps(m, opt, STEPS, 0)
    sched.step()
    sd, sched_sd = get_optimizer_state_dict(m, opt, options=_options(flat)), sched.state_dict()
    for swapped in (False, True):
        m2 = _two_matrices()
        opt2, sched2 = build(m2, swapped)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lightning_soaa"):
            set_optimizer_state_dict(m2, opt2, copy.deepcopy(sd), options=_options(flat))
        said = [r.getMessage() for r in caplog.records if "LR scheduler" in r.getMessage()]
        assert len(said) == int(swapped), said
        order = [1, 0] if swapped else [0, 1]
        if swapped:
            assert "param_groups[i] is the saved param_groups[[1, 0][i]]" in said[0], said[0]
        sched2.load_state_dict({**sched_sd, "base_lrs": [sched_sd["base_lrs"][j] for j in order]})
        sched2.step()
        assert lrs(opt2) == pytest.approx({n: v / 2 for n, v in lrs(opt).items()})  # (one scheduler step on)


@pytest.mark.parametrize("stepped", [True, False], ids=["stepped", "fresh"])
def test_the_full_flattened_refusals_say_how_torchs_own_adamw_fails_at_that_load(stepped: bool) -> None:
    """What the refusals say of torch's own AdamW holds (torch 2.13): a full flattened dict does not load into
    it with both options (a KeyError once stepped, an AssertionError before its first step), and loads with
    the flattened option alone, as the load's refusal says. Before: the save's refusal said torch could not
    load a dict "saved with" both options (it loads, with the flattened option alone) and named only the
    KeyError."""
    import torch
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from lightning_soaa import ShardedAdamW

    def adamw(m: nn.Module, steps: int) -> Any:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        _steps(m, opt, steps, 0)
        return opt

    m = _two_matrices()
    sd = get_optimizer_state_dict(m, adamw(m, 1), options=_full_flat())
    with pytest.raises((KeyError, AssertionError)) as torch_err:
        set_optimizer_state_dict(m, adamw(m, int(stepped)), copy.deepcopy(sd), options=_full_flat())
    set_optimizer_state_dict(m, adamw(m, int(stepped)), sd, options=_flat())
    with pytest.raises(ValueError) as ours:
        get_optimizer_state_dict(m, ShardedAdamW(m.parameters()), options=_full_flat())
    said = str(ours.value)
    assert "cannot load a state dict with both options" in said and str(torch_err.value).strip("'\"") in said, said
