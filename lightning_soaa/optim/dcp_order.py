"""Param groups built in another order than saved, loaded by parameter name through torch's DCP tools.

torch's ``set_optimizer_state_dict`` matches a saved state to the destination by parameter name (FQN): the
unflattened form's groups are rebuilt in the destination's order (``_split_optim_state_dict``), the flattened
form's by our :mod:`~lightning_soaa.optim.dcp_flat` from the destination's groups. Each group's own keys and
each parameter's state follow their names there; our metadata does not: its per-parameter records
(``shapes``, ``layout``, ``blocks_with_state``) and per-group records (``group_options``, ``group_keys``) are
lists in the saved order, and matched by position they would land on other parameters and groups (ASGO's
``adamw_indices``, under FSDP2 every option the metadata keeps: silently another group's values).

So a save through torch's getter records the saved order in the metadata (:func:`with_saved_order`: the
parameters' names and the groups' sizes), and the load puts every record into the destination's order
(:func:`in_live_order`) where the destination's groups are the saved groups, each with its parameters in
their saved order, in any group order: a group's positional options (``adamw_indices``, ``fused_parts``,
``param_names``) then stay valid. Anything else (groups split or merged, a group's parameters reordered) is
refused, as is any reorder of a checkpoint that does not record the order (written before this module).
Deterministic in the dict alone: every rank, handed the same dict, decides alike, before anything changes.
"""

from __future__ import annotations

import json
import logging
from typing import Any

__all__ = ["NAMES", "SIZES", "in_live_order", "live_record", "with_saved_order"]

#: the metadata's key for the names of the parameters in the saved order
NAMES = "param_fqns"
#: the metadata's key for the number of parameters of each saved group, in order
SIZES = "group_sizes"
#: the metadata's records with one entry per parameter / per group, in the saved order
_PER_PARAMETER = ("shapes", "layout", "blocks_with_state")
_PER_GROUP = ("group_keys", "group_options")

log = logging.getLogger(__name__)


def with_saved_order(sd: dict[str, Any], names: list[str | list[str]], key: str) -> dict[str, Any]:
    """``sd`` (our torch form, the JSON metadata in ``param_groups[0][key]``) with the saved order recorded in
    the metadata: ``names`` (every parameter's, in the optimizer's order; a shared parameter's names as a
    list: torch saves it under one of them) and the groups' sizes. Unchanged where there is no such JSON or
    the names do not fit the groups. The dicts changed are copies."""
    groups = sd.get("param_groups")
    if not groups or not isinstance(groups[0].get(key), str):
        return sd
    sizes = [len(g["params"]) for g in groups]
    if sum(sizes) != len(names):
        return sd
    meta = {**json.loads(groups[0][key]), NAMES: names, SIZES: sizes}
    return {**sd, "param_groups": [{**groups[0], key: json.dumps(meta)}, *groups[1:]]}


def _positions(saved: Any, mine: list[str]) -> list[int | None]:
    """The saved position of each of ``mine`` (a shared parameter's entry lists its names: any one matches)."""
    at: dict[str, int] = {}
    for i, entry in enumerate(saved if isinstance(saved, list) else ()):
        for n in [entry] if isinstance(entry, str) else entry if isinstance(entry, list) else ():
            at[str(n)] = i
    return [at.get(n) for n in mine]


def live_record(opt_name: str, record: dict[str, Any], live: list[list[str]]) -> dict[str, Any]:
    """``record`` (our metadata, as saved) without the saved order, its per-parameter and per-group records in
    the order of ``live`` (the destination's groups, each the names of its parameters). Raises ``ValueError``
    where the live groups are not the saved ones reordered, or the order is not recorded and differs."""
    out = dict(record)
    saved, sizes = out.pop(NAMES, None), out.pop(SIZES, None)
    mine = [n for g in live for n in g]
    pos = _positions(saved, mine)
    if saved is None or (pos == list(range(len(saved))) and sizes in (None, [len(g) for g in live])):
        return out
    if _fits(saved, sizes) and 0 in sizes:
        raise ValueError(_empty_group_refusal(opt_name, sizes))
    starts = _starts(saved, sizes)
    at, order = 0, []
    for g in live:  # each live group: one saved group's positions, in their order
        p = pos[at:at + len(g)]
        at += len(g)
        order.append(_saved_group(p, starts))
    groups = [o for o in order if o is not None]
    if not starts or len(groups) != len(order) or sorted(groups) != list(range(len(starts))):
        raise ValueError(_refusal(opt_name, saved, mine, pos, recorded=bool(starts)))
    if groups != sorted(groups):
        log.warning(_scheduler_warning(opt_name, groups))
    perm = [p for p in pos if p is not None]  # (all of them: every live group matched a saved one)
    for k in _PER_PARAMETER:
        if isinstance(out.get(k), list) and len(out[k]) == len(perm):
            out[k] = [out[k][i] for i in perm]
    for k in _PER_GROUP:
        if isinstance(out.get(k), list) and len(out[k]) == len(order):
            out[k] = [out[k][i] for i in groups]
    return out


def _scheduler_warning(opt_name: str, groups: list[int]) -> str:
    """Why: a torch LR scheduler's state (``base_lrs``, ``_last_lr``, ...) is a list by group position, which
    its ``load_state_dict`` takes as it is: into groups built in another order it swaps their learning rates
    at the scheduler's next step, silently; the optimizer does not see the scheduler."""
    return (f"{opt_name}.load_state_dict: param groups built in another order than saved, loaded by parameter name: "
            f"this optimizer's param_groups[i] is the saved param_groups[{groups}[i]]. A torch LR scheduler's state "
            "keeps its per-group lists (base_lrs, _last_lr, ...) in the saved order and would swap the groups' "
            "learning rates at its next step: put them into this order before scheduler.load_state_dict "
            f"(e.g. sd['base_lrs'] = [sd['base_lrs'][j] for j in {groups}]), or build the groups as saved.")


def _saved_group(pos: list[int | None], starts: dict[tuple[int, int], int]) -> int | None:
    """The saved group whose parameters are at ``pos``, in that order; else None."""
    first = pos[0] if pos else None
    if first is None or pos != list(range(first, first + len(pos))):
        return None
    return starts.get((first, len(pos)))


def _starts(saved: Any, sizes: Any) -> dict[tuple[int, int], int]:
    """``(first position, size) -> saved group index`` of the saved groups with parameters; empty where the
    record does not fit (no sizes: written before they were recorded)."""
    if not _fits(saved, sizes):
        return {}
    out, at = {}, 0
    for gi, n in enumerate(sizes):
        out[(at, n)] = gi
        at += n
    return out


def _fits(saved: Any, sizes: Any) -> bool:
    return (isinstance(saved, list) and isinstance(sizes, list) and all(isinstance(s, int) for s in sizes)
            and sum(sizes) == len(saved))


def _empty_group_refusal(opt_name: str, sizes: list[int]) -> str:
    """Why: torch's ``set_optimizer_state_dict`` (``_split_optim_state_dict``, torch 2.13) hands a live group
    without parameters the keys of the saved group it matched last, not those of the saved empty group, and
    leaves that group's own keys out: right only where the groups are built as saved."""
    empty = [i for i, n in enumerate(sizes) if n == 0]
    return (f"{opt_name}.load_state_dict: the optimizer state dict was saved with param_groups{empty} holding no "
            "parameters, and this optimizer's param groups are built in another order than saved (or grouped "
            "otherwise). torch's set_optimizer_state_dict gives a group without parameters the options of another "
            "saved group in that case (and that group none), so this state cannot be loaded into these groups. "
            "Build the optimizer's param groups as they were saved (the same parameters per group, in the same "
            "order, the empty group where it was), load, and then continue. Nothing was loaded.")


def _refusal(opt_name: str, saved: Any, mine: list[str], pos: list[int | None], recorded: bool) -> str:
    at = next((i for i, p in enumerate(pos) if p != i), None) if isinstance(saved, list) and saved else None
    at = at if at is not None and at < len(saved) else None
    where = (f"the parameter saved at position {at} is {saved[at]!r}, this optimizer's {mine[at]!r}" if at is not None
             else f"it holds {len(saved) if isinstance(saved, list) else '?'} parameters, this optimizer {len(mine)}")
    why = ("Param groups built in another order load by name, but each group must hold the parameters it was "
           "saved with, in their saved order (its positional options, e.g. ASGO's adamw_indices, follow it)"
           if recorded else
           "This checkpoint does not record its groups (written before lightning_soaa resumed reordered groups), "
           "and the saved group options and block layout follow the saved order")
    return (f"{opt_name}.load_state_dict: the optimizer state dict was saved with its parameters in another order "
            f"than this optimizer's (or grouped otherwise): {where}. {why}, so this state cannot be loaded into "
            "these groups. Build the optimizer's param groups as they were saved (the same parameters per group, "
            "in the same order), load, and then continue. Nothing was loaded.")


def in_live_order(opt_name: str, sd: Any, key: str) -> Any:
    """torch's rebuild of our unflattened form (groups in the destination's order, matched by name; our JSON
    metadata in ``param_groups[i][key]`` of the group that holds the saved first group's parameters) with the
    metadata in the first group and in the destination's order (:func:`live_record`). Unchanged where there
    is no such JSON (our consolidated format's own metadata beside it, or none); where the groups list their
    parameters by position, not name, only without the recorded order. A copy where changed."""
    groups = sd.get("param_groups") if isinstance(sd, dict) and key not in sd else None
    if not groups or not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return sd
    holder = next((i for i, g in enumerate(groups) if isinstance(g.get(key), str)), None)
    if holder is None:
        return sd
    try:
        record = json.loads(groups[holder][key])
    except ValueError:
        return sd  # the validation's message
    if not isinstance(record, dict) or NAMES not in record:
        return sd  # (written before the order was recorded: dcp_state.refuse_reordered_groups says so)
    if not all(isinstance(n, str) for g in groups for n in g.get("params", [])):
        # parameters by position (FSDP.rekey_optim_state_dict's ids, our own indices): the saved order itself
        if holder != 0:
            return sd  # (dcp_state.refuse_reordered_groups says so)
        meta = json.dumps({k: v for k, v in record.items() if k not in (NAMES, SIZES)})
    else:
        meta = json.dumps(live_record(opt_name, record, [list(g.get("params", [])) for g in groups]))
    out = [{k: v for k, v in g.items() if k != key} for g in groups]
    out[0][key] = meta
    return {**sd, "param_groups": out}
