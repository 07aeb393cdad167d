"""torch's flattened optimizer state dict (``StateDictOptions(flatten_optimizer_state_dict=True)``, torchtitan's).

torch flattens what ``state_dict()`` returns into one key per value (``get_optimizer_state_dict``)::

    state.<fqn>.<key>[.<key>...]      every state value, nested dicts joined by dots
    param_groups.<fqn>.<option>       every key of a group, once per parameter of the group

and rebuilds it on load (``set_optimizer_state_dict``, ``_unflatten_optim_state_dict``) from the keys the
*destination* optimizer holds: a key of its live param groups must be in the dict (``KeyError`` else), and
only the keys of its live ``state[p]`` are read back. A fresh optimizer here holds an empty ``state[p]``
until its first step (:func:`~lightning_soaa.optim.dcp_state.hold_state_entries`: torch would otherwise
run a zero-gradient step), and our metadata (options, block layout, step counts, SOAA's trust region)
rides in a JSON entry of the first group that no live group holds: torch's rebuild drops all of it.

So both ends take the dict itself:

* save: under FSDP2 every option stays a key of its own in the saved groups
  (:func:`~lightning_soaa.optim.dcp_state.dcp_state_dict` ``keep_options``), as the live groups hold them,
  so torch's rebuild finds each (the unflattened form keeps some in the JSON only, for older checkpoints).
  Over plain parameters our form holds them already. The layout options every form leaves to the JSON
  (ASGO's ``adamw_indices``, ``fused_parts``) :func:`for_flattening` writes back as keys.
* load: torch calls ``load_state_dict`` with its lossy rebuild; :func:`flat_source` finds the flattened
  dict torch was given (its caller's frame, as for the save's option: torch hands the optimizer nothing
  else) and :func:`unflattened` rebuilds our torch form from it by this optimizer's parameter names:
  every saved key of every block, and the groups as saved. Groups built in another order than saved load,
  the metadata put into their order (:func:`_in_live_order`, :mod:`~lightning_soaa.optim.dcp_order`). The
  usual validation follows.

The JSON rides in the state of the first parameter of the group whose first parameter's name sorts first
(:func:`for_flattening`; with one group, its first parameter, as before the saved order was recorded): torch's
flattening repeats every group key once per parameter. Where torch's code moves so that the frame is not
found, the rebuild without metadata is refused by the load as before ("not a lightning_soaa optimizer
state").
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from typing import TYPE_CHECKING, Any

from lightning_soaa.distributed.checkpoint import FORMAT_KEY
from lightning_soaa.optim.dcp_order import NAMES, live_record

if TYPE_CHECKING:
    from lightning_soaa.optim.base import ShardedOptimizer

__all__ = ["flat_source", "for_flattening", "saving_names", "unflattened"]

_TORCH_DSD = "torch.distributed.checkpoint.state_dict"
#: torch's function that calls an optimizer's ``state_dict()`` and flattens the result when asked
_GET = "_get_optim_state_dict"
#: torch's function that unflattens a state dict without ``"state"`` and calls ``load_state_dict()``
_LOAD = "_load_optim_state_dict"
#: frames searched above the optimizer's own method: a LightningOptimizer's, decorators, torch's helpers
_CALLER_DEPTH = 6


def _torch_frame(function: str) -> Any:
    """The frame of torch's ``function`` within :data:`_CALLER_DEPTH` frames above our caller's caller."""
    frame = sys._getframe(2)
    for _ in range(_CALLER_DEPTH):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            return None
        if _is_torch(frame, function):
            return frame
    return None


def saving_names(opt: ShardedOptimizer) -> tuple[list[str | list[str]] | None, bool]:
    """Where torch's ``get_optimizer_state_dict`` (``get_state_dict``) calls ``opt.state_dict()``: the name
    each parameter of ``opt`` may be saved under, in its order (a shared one's names, sorted, as a list:
    torch saves it under the name ``named_parameters`` gives it; None where torch names not every one), and
    whether torch will flatten the result; else ``(None, False)``. Each rank decides from its own call's
    options, which every rank passes alike. Flattened with ``full_state_dict=True`` it is refused
    (:func:`_refuse_full_flattened`)."""
    frame = _torch_frame(_GET)
    if frame is None:
        return None, False
    info = frame.f_locals.get("info")
    flat = bool(getattr(info, "flatten_optimizer_state_dict", False))
    if flat:
        _refuse_full_flattened(opt, frame, info)
    _refuse_empty_group(opt, flat, info)
    mapping = getattr(info, "fqn_param_mapping", None)
    names = [sorted(str(n) for n in mapping.get(p, ())) if isinstance(mapping, dict) else [] for p in opt._params]
    return ([n[0] if len(n) == 1 else n for n in names] if all(names) else None), flat


_FULL_FLAT = "StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)"
#: how torch's own optimizers fail at that load (torch 2.13): a stepped one, and one before its first step
_TORCH_FAILS = "KeyError 'param_groups.0.params.0', or before their first step 'Expected device to be set'"


def _refuse_full_flattened(opt: ShardedOptimizer, frame: Any, info: Any) -> None:
    """Refuse torch's flattened form with ``full_state_dict=True``, saved or loaded. Why: torch's
    ``set_optimizer_state_dict`` cannot load it, for any optimizer (torch's AdamW too, torch 2.13): its
    full-state branch merges the flattened dict's rebuild (``param_groups.0.params.0``, ...) into the
    destination's own flattened dict and loses the keys' paths (a bare ``KeyError: 'param_groups.0.params.0'``),
    so a checkpoint saved so could only be loaded by another recipe, found by the user after the run. That
    branch is the only caller of torch's getter inside its load (with ``full_state_dict`` off meanwhile), so a
    load is told by the getter's caller. Decided from the options alone, which every rank passes alike: every
    rank raises together, before any collective or change."""
    loading = _is_torch(_caller(frame), _LOAD)
    if not (loading or getattr(info, "full_state_dict", False)):
        return
    name = type(opt).__name__
    if loading:
        raise ValueError(
            f"{name}: set_optimizer_state_dict(..., options={_FULL_FLAT}) cannot load any optimizer's state (torch "
            f"fails inside, for its own optimizers too: {_TORCH_FAILS}). Load a flattened "
            "state dict with StateDictOptions(flatten_optimizer_state_dict=True) alone: over plain (non-FSDP2) "
            "parameters a full flattened dict loads that way as it is; under FSDP2 save it with dcp.save and "
            "dcp.load it into get_optimizer_state_dict(model, opt, options=StateDictOptions("
            "flatten_optimizer_state_dict=True)), which shards it, then set_optimizer_state_dict with those "
            "options. Nothing was loaded.")
    raise ValueError(
        f"{name}: get_optimizer_state_dict(..., options={_FULL_FLAT}) is refused: torch's "
        "set_optimizer_state_dict cannot load a state dict with both options, for any optimizer (torch's own "
        f"fail inside: {_TORCH_FAILS}), so what they save loads only by another recipe, found after the run. "
        "Drop one of the two: StateDictOptions("
        "flatten_optimizer_state_dict=True) with dcp.save / dcp.load (torchtitan's recipe: resharded at any "
        "world size), or StateDictOptions(full_state_dict=True) (add cpu_offload=True to gather on rank 0) and "
        "load it with set_optimizer_state_dict(..., options=StateDictOptions(full_state_dict=True, "
        "broadcast_from_rank0=True)). Nothing was saved or changed.")


def _passed_options(info: Any) -> str:
    """The ``StateDictOptions`` fields torch's getter was called with that differ from their defaults, as the
    caller wrote them (``full_state_dict=True, cpu_offload=True``): what a refusal names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    default = StateDictOptions()
    return ", ".join(f"{f.name}={getattr(info, f.name)!r}" for f in dataclasses.fields(StateDictOptions)
                     if hasattr(info, f.name) and getattr(info, f.name) != getattr(default, f.name))


def _refuse_empty_group(opt: ShardedOptimizer, flat: bool, info: Any) -> None:
    """Refuse torch's form of an optimizer with a param group without parameters where torch's
    ``set_optimizer_state_dict`` cannot load it back, for any optimizer (torch's AdamW too, torch 2.13): the
    flattened form with any such group (``IndexError`` in ``_unflatten_optim_state_dict``, which reads each
    live group's keys under its first parameter's name: the flattened form keeps a group's keys only there),
    the unflattened one with such a first group (``_split_optim_state_dict`` hands it no keys, and with them
    our metadata, which rides in the first group: "not a lightning_soaa optimizer state"; torch's AdamW loses
    that group's lr, or with ``full_state_dict=True`` keeps the options it was built with). The refusal names
    the options the getter was called with (it named none with ``full_state_dict=True``). Raised at the save
    and at the destination's ``get_optimizer_state_dict``, before ``dcp.load``; the groups are alike on every
    rank, so every rank raises together."""
    empty = [i for i, g in enumerate(opt.param_groups) if not g["params"]]
    if not (empty if flat else empty[:1] == [0]):
        return
    options = _passed_options(info)
    torchs = "keeps the lr it was built with" if getattr(info, "full_state_dict", False) else "loses its lr"
    why = ("torch's set_optimizer_state_dict cannot load a flattened state dict into an optimizer with such a group "
           "(for any optimizer: torch's own fail with IndexError)" if flat else
           "torch's set_optimizer_state_dict gives a first group without parameters none of its saved options (for "
           f"any optimizer: torch's AdamW {torchs}), and this optimizer's metadata rides in the first group")
    fix = ("or save without flatten_optimizer_state_dict, the empty group after a group with parameters" if flat else
           "or put it after a group with parameters")
    raise ValueError(
        f"{type(opt).__name__}: get_optimizer_state_dict(..., options=StateDictOptions({options})) is refused: "
        f"param_groups{empty if flat else [0]} hold no parameters, and {why}. Build the optimizer without the empty "
        f"group (it steps nothing), {fix}. Nothing was saved or changed.")


def _caller(frame: Any) -> Any:
    """The frame that called ``frame``'s function, past decorators' wrappers (torch's ``no_grad``)."""
    frame = frame.f_back
    while frame is not None and frame.f_globals.get("__name__") == "torch.utils._contextlib":
        frame = frame.f_back
    return frame


def _is_torch(frame: Any, function: str) -> bool:
    return frame is not None and (frame.f_globals.get("__name__"), frame.f_code.co_name) == (_TORCH_DSD, function)


def flat_source(opt: ShardedOptimizer) -> tuple[dict[str, Any], dict[Any, Any]] | None:
    """The flattened dict torch's ``set_optimizer_state_dict`` (``set_state_dict``) was given and torch's
    ``fqn_param_mapping`` (parameter -> its names), where torch is loading ``opt`` from one; else None.
    torch unflattens any optimizer state dict without ``"state"`` (whatever the options say)."""
    frame = _torch_frame(_LOAD)
    if frame is None:
        return None
    sd, info = frame.f_locals.get("state_dict"), frame.f_locals.get("info")
    mapping = getattr(info, "fqn_param_mapping", None)
    if not isinstance(sd, dict) or not sd or "state" in sd or not isinstance(mapping, dict):
        return None
    return sd, mapping


def _by_name(flat: dict[str, Any], section: str, names: set[str]) -> dict[str, dict[str, Any]]:
    """The keys of ``section`` (``"state"``, ``"param_groups"``) by parameter name, one of ``names`` (a name
    has dots too, so each of a key's prefixes is tried; no name is another's prefix plus a dot, as no module
    holds a parameter and a submodule of one name): ``name -> {rest of the key: value}``. One pass."""
    out: dict[str, dict[str, Any]] = {}
    head = section + "."
    for key, value in flat.items():
        if not key.startswith(head):
            continue
        parts = key[len(head):].split(".")
        for i in range(1, len(parts)):
            name = ".".join(parts[:i])
            if name in names:
                out.setdefault(name, {})[".".join(parts[i:])] = value
                break
    return out


def _name_of(opt: ShardedOptimizer, saved: dict[str, Any], mapping: dict[Any, Any], p: Any) -> str:
    """The name a parameter is saved under (``saved``: the names with group keys): torch lists one name per
    parameter (a shared one: the name ``named_parameters`` gives it)."""
    names = sorted(str(n) for n in mapping.get(p, ()))
    found = [n for n in names if n in saved]
    if not found:
        pi = next((i for i, q in enumerate(opt._params) if q is p), -1)
        label = (opt._names[pi] if pi >= 0 else "") or f"#{pi}"
        raise ValueError(
            f"{type(opt).__name__}.load_state_dict: the flattened optimizer state dict (StateDictOptions("
            f"flatten_optimizer_state_dict=True)) holds no param group keys for parameter {label} (names "
            f"{names}): it was saved from another model or optimizer. Nothing was loaded.")
    return found[0]


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"block0.exp_avg": v}`` -> ``{"block0": {"exp_avg": v}}``: the nesting torch's flattening joined."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def for_flattening(sd: dict[str, Any], names: list[str | list[str]] | None) -> dict[str, Any]:
    """``sd`` (our torch form) with the JSON metadata moved from the first group into the state of the first
    parameter of the group whose first parameter's name (``names``: each parameter's, in the optimizer's order)
    sorts first, else of the first group's first parameter: a place that does not depend on the groups' order,
    as ``dcp.load`` fills only the keys the destination shows (a destination with its groups built in another
    order showed the metadata under its own first parameter: "Missing key in checkpoint state_dict"); with one
    group, the first parameter, where checkpoints written before the saved order was recorded hold it (the
    name that sorts first of all, ``0.bias`` before ``0.weight``, made every such checkpoint fail in
    ``dcp.load``: "Missing key"). As one Python int of its UTF-8 bytes: torch's flattening writes every group
    key once per parameter of the group (the JSON holds the block layout, ~26 bytes per parameter: quadratic,
    2.4 MB at 300 parameters), a state value once; and a state value must be a tensor, int, float or dict (a
    tensor would need the destination's length to load into). The dicts changed are copies.

    The layout options the groups leave to the metadata (``_meta_options``: ASGO's ``adamw_indices``,
    ``fused_parts``) become keys again, with the values of its record: torch's rebuild reads every key a live
    group holds (a bare ``KeyError`` inside torch else, for a checkpoint already written); the load puts the
    record's values back over them anyway (:func:`~lightning_soaa.distributed.checkpoint.restored_groups`).

    The saved order (:func:`~lightning_soaa.optim.dcp_order.with_saved_order`) rides in the metadata: the
    flattened dict keeps nothing else of it, and the load needs it for groups built in another order."""
    groups = sd.get("param_groups")
    keys = [k for g in groups or () for k in g.get("params", ())]
    if not groups or FORMAT_KEY not in groups[0] or not keys:
        return sd  # nothing to move (a group without parameters is written by no parameter at all)
    meta = json.loads(groups[0][FORMAT_KEY])
    options = meta.get("group_options") or [{} for _ in groups]
    out = [{**kept, **{k: v for k, v in g.items() if k != FORMAT_KEY}} for g, kept in zip(groups, options, strict=True)]
    # (the state is keyed by index, in the optimizer's order, which torch renames by ``names``)
    first = [n if isinstance(n, str) else n[0] for n in names or ()]
    starts = list(itertools.accumulate([len(g["params"]) for g in groups[:-1]], initial=0))
    heads = [i for i, g in zip(starts, groups, strict=True) if g["params"]]  # (each group's first parameter)
    key = keys[min(heads, key=lambda i: first[i])] if len(first) == len(keys) else keys[0]
    state = dict(sd.get("state", {}))
    state[key] = {**state.get(key, {}), FORMAT_KEY: int.from_bytes(groups[0][FORMAT_KEY].encode(), "big")}
    return {**sd, "state": state, "param_groups": out}


def _metadata(opt: ShardedOptimizer, state: dict[str, dict[str, Any]]) -> str | None:
    """The JSON :func:`for_flattening` put into the state of a parameter of ``opt`` (taken out of it), if any.
    Looked for in every parameter's state (where :func:`for_flattening` puts it; the first group's first
    parameter's before the saved order was recorded); two optimizers' entries mean the parameters were split
    among optimizers otherwise when saved (pipeline stages merged), which no optimizer here can continue."""
    name = type(opt).__name__
    holders = [n for n, st in state.items() if FORMAT_KEY in st]
    if len(holders) > 1:
        raise ValueError(
            f"{name}.load_state_dict: the flattened optimizer state dict holds the '{FORMAT_KEY}' entries of "
            f"{len(holders)} optimizers among this optimizer's parameters (in the states of {holders}): it was "
            "saved with these parameters split among several optimizers (e.g. other pipeline stages, torchtitan's "
            "model parts). Load it with the split it was saved with. Nothing was loaded.")
    if not holders:
        return None
    packed = state[holders[0]].pop(FORMAT_KEY)
    if not isinstance(packed, int) or packed <= 0:
        raise ValueError(f"{name}.load_state_dict: the flattened optimizer state dict's '{FORMAT_KEY}' state entry "
                         f"is a {type(packed).__name__}, not the int this version writes. Nothing was loaded.")
    return packed.to_bytes((packed.bit_length() + 7) // 8, "big").decode()


def _in_live_order(opt: ShardedOptimizer, holder: str | None, meta: str, groups: list[dict[str, Any]]) -> str:
    """``meta`` in the order of this optimizer's groups (:func:`~lightning_soaa.optim.dcp_order.live_record`),
    else refused. A checkpoint without the saved order (written before it was recorded) loads only into the
    saved order, which its metadata's holder (the saved first group's first parameter) then shows."""
    record = json.loads(meta)
    live = [list(g["params"]) for g in groups]
    if NAMES not in record and live and live[0] and holder != live[0][0]:
        record[NAMES] = [holder] if holder else []  # (no sizes: refused as not recorded, naming the holder)
    return json.dumps(live_record(type(opt).__name__, record, live))


def unflattened(opt: ShardedOptimizer, flat: dict[str, Any], mapping: dict[Any, Any]) -> dict[str, Any]:
    """Our torch form (``state`` keyed by parameter name, the groups as saved, with our metadata) from
    torch's flattened dict (which may hold other optimizers' keys too: torchtitan's model parts share one)."""
    names = {str(n) for p in opt._params for n in mapping.get(p, ())}
    saved_groups, saved_state = _by_name(flat, "param_groups", names), _by_name(flat, "state", names)
    state: dict[str, Any] = {}
    groups: list[dict[str, Any]] = []
    for group in opt.param_groups:
        fqns = [_name_of(opt, saved_groups, mapping, p) for p in group["params"]]
        state.update((n, _nested(saved_state.get(n, {}))) for n in fqns)
        saved = saved_groups[fqns[0]] if fqns else {}  # (torch too reads the first parameter's)
        groups.append({**{k: v for k, v in saved.items() if "." not in k}, "params": fqns})
    holder = next((n for n, st in state.items() if FORMAT_KEY in st), None)
    meta = _metadata(opt, state)
    if meta is not None:
        meta = _in_live_order(opt, holder, meta, groups)
    if meta is None or not groups:
        raise ValueError(
            f"{type(opt).__name__}.load_state_dict: the flattened optimizer state dict (StateDictOptions("
            f"flatten_optimizer_state_dict=True)) has no '{FORMAT_KEY}' entry in the state of this optimizer's "
            "parameters: it was not saved by a lightning_soaa optimizer (earlier versions refused this option), "
            "or saved with these parameters split among optimizers otherwise (e.g. other pipeline stages). "
            "Nothing was loaded.")
    groups[0][FORMAT_KEY] = meta
    return {"state": {n: st for n, st in state.items() if st}, "param_groups": groups}
