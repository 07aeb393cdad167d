"""Sharded optimizer state to and from a world-size independent ``state_dict``.

Layout (torch-like, with block keys inside each parameter entry)::

    {
      "state": {param_index: {sub_index: {"exp_avg": Tensor, "step": Tensor, ...}}},
      "param_groups": [{"lr": ..., "params": [param_index, ...]}, ...],
      "lightning_soaa": {"version": 1, "optimizer": "SOAA", "shapes": [...], "layout": [...],
                         "global": {...optimizer-wide scalars...}},
    }

Only the owner column of the block table depends on the world size, so a state saved on W ranks is
loaded on W' ranks by letting each rank pick the blocks it now owns.

Loading validates **everything** before anything changes (:func:`validate_state_dict`): the format, the
model (shapes, layout), every saved block state against the optimizer's declared schema (each optimizer
says, per block, which keys it keeps, with which shape and dtype, and which must be non-negative: see
``ShardedOptimizer._state_schema``), and the optimizer-wide state (``_validate_global_state``). Every
rank validates the whole state, not only its blocks, so every rank reaches the same verdict without a
collective.

The functions take a :class:`CheckpointView` of the optimizer (built by
``ShardedOptimizer._checkpoint_view``), not the optimizer itself, so ``distributed/`` never imports
``optim/`` and never reads an optimizer's private attributes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import torch

from lightning_soaa.distributed.blocks import BlockInfo, BlockTable

__all__ = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "CheckpointView",
    "StateField",
    "build_state_dict",
    "check_block_steps",
    "check_finite_number",
    "group_record",
    "holds_state",
    "restored_groups",
    "saved_block_schema",
    "select_owned_state",
    "steps_ahead",
    "steps_limit",
    "validate_state_dict",
    "with_group_meta",
    "with_saved_groups",
]

log = logging.getLogger(__name__)

FORMAT_KEY = "lightning_soaa"
FORMAT_VERSION = 1
_META_KEYS = ("version", "optimizer", "shapes", "layout", "global")


@dataclasses.dataclass(frozen=True)
class StateField:
    """One tensor an optimizer keeps per block, as its checkpoint must hold it.

    Attributes:
        shape: the exact shape.
        dtype: the exact dtype; None accepts any floating or integer dtype.
        nonnegative: every element must be >= 0 (second moments, counters).
        required: a block that has any state must have this key (False: kept only in some steps).
        legacy: other dtypes that checkpoints of earlier versions hold for this key; accepted, and
            converted to ``dtype`` on load (any floating dtype is, for a floating ``dtype``: _castable).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype | None = None
    nonnegative: bool = False
    required: bool = True
    legacy: tuple[torch.dtype, ...] = ()


def check_finite_number(where: str, value: Any, *, positive: bool = False, integer: bool = False,
                        nonnegative: bool = False) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``value`` is a finite real number as asked."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok and integer:
        ok = float(value) == int(value)
    if ok and positive:
        ok = float(value) > 0
    if ok and nonnegative:
        ok = float(value) >= 0
    if not ok:
        what = "an integer" if integer else "a finite number"
        what += " > 0" if positive else (" >= 0" if nonnegative else "")
        raise ValueError(f"{where}={value!r} is invalid. Must be {what}.")


@dataclasses.dataclass(frozen=True)
class CheckpointView:
    """What checkpointing reads from an optimizer: a snapshot built by the optimizer for one call."""

    name: str  #: the optimizer's class name (saved, and checked on load)
    param_groups: Sequence[dict[str, Any]]  #: the optimizer's groups (hyperparameters, parameter counts)
    block_table: BlockTable  #: the blocking (saved and checked) and the blocks this rank owns
    shapes: tuple[tuple[int, ...], ...]  #: per parameter, its (global) shape
    devices: tuple[torch.device, ...]  #: per parameter, where its loaded state goes
    names: tuple[str | None, ...] = ()  #: per parameter, its name (error messages)
    #: the optimizer's block state is elementwise (a saved state may then be re-cut to other row blocks)
    elementwise: bool = False
    #: per block, the state the optimizer keeps for it (None: not declared, nothing checked)
    block_schema: Callable[[BlockInfo], dict[str, StateField] | None] = lambda b: None
    #: raises ``ValueError`` naming the field when the saved optimizer-wide state is invalid
    validate_global: Callable[[dict[str, Any]], None] = lambda state: None
    #: appended to a refused layout or state shape: an optimizer-specific cause (ASGO's side under FSDP2)
    layout_hint: str = ""
    #: the group options that decide the blocks (a refused layout names the one that differs)
    layout_keys: tuple[str, ...] = ()
    #: ``option -> what it is and how to continue a checkpoint saved without it``, for the layout keys an
    #: earlier version did not save (a refused layout then names the option, though the saved group lacks it)
    absent_key_notes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: group options saved in the metadata's JSON copy, not as keys of the groups (:func:`saved_groups`)
    meta_options: tuple[str, ...] = ()


#: what a load keeps of the current groups: their tensors, and the block size the table was built with (a
#: state saved with other blocks is re-cut to it); our metadata's copy (:func:`with_group_meta`) is no
#: hyperparameter
_KEPT_ON_LOAD = ("params", "param_names", "max_block_numel", FORMAT_KEY)


def loaded_groups(current: list[dict[str, Any]], saved: list[dict[str, Any]],
                  validate: Callable[[dict[str, Any]], None], keep: Sequence[str] = (),
                  absent: Mapping[str, Any] | None = None, say_absent: bool = True) -> list[dict[str, Any]]:
    """The groups a load gives: each current group with the saved hyperparameters (``betas`` as a tuple),
    each checked by ``validate`` before anything changes. Apply them with :func:`commit_groups`.

    ``absent``: ``option -> value`` for options an earlier version did not save, whose value in those runs
    was not the current default (ASGO's ``nesterov``: False, the paper's rule, before it became the
    default): a saved group without the option gets that value, not the current group's, so the resumed
    run steps as it was saved (torch keeps the current value of a missing key; see :func:`with_absent`).

    ``keep``: the optimizer's block options besides ``max_block_numel`` (ASGO's ``max_block_size`` and
    ``use_asgo``): its blocks were cut with the current values and the saved layout is checked equal to
    them, so a checkpoint saved with other values that cut the same blocks loads; taking the saved values
    made every later step refuse them as "written into the group after construction".

    ``say_absent``: log where an ``absent`` option overrides the built value (False for a look ahead of the
    load itself, which logs it once the state is known to be this optimizer's)."""
    out = []
    kept = (*_KEPT_ON_LOAD, *keep)
    for i, (group, old) in enumerate(zip(current, with_absent(saved, absent or {}))):
        if say_absent:
            _say_absent(i, group, saved[i] if i < len(saved) else None, absent or {})
        g = dict(group)
        # a tuple comes back a list from JSON-like round trips (betas, adam_betas): as the group holds it
        g.update({k: (tuple(v) if isinstance(v, list) and isinstance(group.get(k), tuple) else v)
                  for k, v in old.items() if k not in kept})
        try:
            validate(g)
        except ValueError as e:  # "Invalid lr=-1.0" alone does not say it came from the checkpoint
            raise ValueError(f"load_state_dict: the state dict's param_groups[{i}]: {e} Nothing was loaded.") from e
        out.append(g)
    return out


def _say_absent(i: int, group: dict[str, Any], saved: Any, absent: Mapping[str, Any]) -> None:
    """Log where a saved group's missing option overrides the value this optimizer was built with: the
    user asked for one rule and the resumed run takes the one it was trained with."""
    for k, v in absent.items():
        if isinstance(saved, dict) and k not in saved and k in group and group[k] != v:
            log.warning("load_state_dict: param_groups[%d] was saved without %r (a version before the option): "
                        "it resumes with %s=%r, the rule it was trained with, not this optimizer's %r. Set "
                        "group[%r] after the load to change it.", i, k, k, v, group[k], k)


def with_absent(saved: Sequence[Any], absent: Mapping[str, Any]) -> list[Any]:
    """``saved`` (a state dict's param groups) with each ``absent`` option a group lacks filled in with its
    value there (copies where filled; what is not a dict is left to the validation)."""
    return [{**{k: v for k, v in absent.items() if k not in g}, **g} if isinstance(g, dict) else g for g in saved]


def commit_groups(current: list[dict[str, Any]], new: list[dict[str, Any]]) -> None:
    """Write :func:`loaded_groups`' values into the optimizer's own group dicts (their tensor lists stay)."""
    for group, g in zip(current, new):
        group.update({k: v for k, v in g.items() if k not in ("params", "param_names")})


def _shapes(opt: CheckpointView) -> list[list[int]]:
    return [list(s) for s in opt.shapes]


def _plain(value: Any) -> Any:
    """A NumPy scalar as the Python number it equals (also inside a tuple or list): a scheduler that
    computes in NumPy writes np.float32 lrs into the groups, and a checkpoint holding one cannot be
    read by ``torch.load(weights_only=True)``, torch's default (nor can torch's own optimizers')."""
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    return value.item() if type(value).__module__ == "numpy" and hasattr(value, "item") else value


def saved_groups(param_groups: Sequence[dict[str, Any]], meta_options: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The groups as a state dict holds them: the hyperparameters as they are now (NumPy scalars as
    Python numbers), ``params`` as the running indices torch uses.

    ``meta_options``: layout options (ASGO's ``fused_parts``, ``adamw_indices``) left out of the groups, at
    any value: :func:`group_record` keeps them in the metadata's JSON copy. ``dcp.load`` refuses a checkpoint lacking a
    key its destination shows ("Missing key in checkpoint state_dict"), and these keys are in some groups
    only: a group given ``[]`` (the documented way to continue a checkpoint saved before the key) made an
    old DCP checkpoint unloadable, and when ``[]`` was not saved, a checkpoint saved with ``[]`` could not
    load into a group that has some (found by helpers). The copy is one DCP entry whatever it holds."""
    groups = []
    index = 0
    for group in param_groups:
        g = {k: _plain(v) for k, v in group.items() if k != "params" and k not in meta_options}
        g["params"] = list(range(index, index + len(group["params"])))
        index += len(group["params"])
        groups.append(g)
    return groups


def _as_json(value: Any) -> Any:
    """``value`` as JSON gives it back: tuples as lists (also nested)."""
    if isinstance(value, (tuple, list)):
        return [_as_json(v) for v in value]
    return _plain(value)


def group_record(param_groups: Sequence[dict[str, Any]], meta_options: Sequence[str] = ()) -> dict[str, Any]:
    """What the metadata's JSON copy (:func:`with_group_meta`) keeps of the groups: ``group_keys``, per group
    the options it had when saved, and ``group_options``, per group the values of its ``meta_options``
    (:func:`saved_groups`). Why the keys: with ``DefaultLoadPlanner(allow_partial_load=True)`` ``dcp.load``
    keeps the destination's value for a key the checkpoint lacks, so a loaded group cannot tell a saved option
    from one the destination filled; the record (a JSON string, which the load takes from the checkpoint whole)
    can (:func:`restored_groups`), and an option the checkpoint lacked then loads as any absent one
    (``absent_key_values``). Only in the copy: DCP saves the top-level metadata dict key by key (a list of
    dicts too), so a new key there made every earlier ``dcp.save({"optim": opt.state_dict()})`` checkpoint
    unloadable ("Missing key in checkpoint state_dict: optim.lightning_soaa.group_keys"), and one group's
    option there a checkpoint without it (found by a reviewer)."""
    keys = [sorted(str(k) for k in g if k not in ("params", FORMAT_KEY)) for g in param_groups]
    options = [{k: _as_json(g[k]) for k in meta_options if k in g} for g in param_groups]
    return {"group_keys": keys, "group_options": options}


def _record_fits(keys: Any, options: Any, n: int) -> bool:
    """Whether a :func:`group_record` fits ``n`` param groups: one list of option names and one dict per group."""
    return (isinstance(keys, list) and isinstance(options, list) and len(keys) == len(options) == n
            and all(isinstance(k, list) and all(isinstance(x, str) for x in k) for k in keys)
            and all(isinstance(o, dict) for o in options))


def restored_groups(name: str, groups: list[Any], meta: Any) -> list[Any]:
    """``groups`` (a state dict's) as they were saved, from the metadata's :func:`group_record`: each with
    its ``group_options`` put back and without the options its ``group_keys`` do not list (values a
    partial ``dcp.load`` kept from the destination). Unchanged where the metadata has no record (an earlier
    version's); a record that does not fit the groups is refused (a damaged checkpoint)."""
    meta = meta if isinstance(meta, dict) else {}
    keys, options = meta.get("group_keys"), meta.get("group_options", [{} for _ in groups])
    if keys is None:
        return groups
    if not _record_fits(keys, options, len(groups)):
        raise ValueError(f"{name}.load_state_dict: the metadata's group record (group_keys {keys!r}, group_options "
                         f"{options!r}) does not fit the state's {len(groups)} param groups (one list of option "
                         "names and one dict per group): a damaged checkpoint. Nothing was loaded.")
    out = []
    for g, k, o in zip(groups, keys, options):
        if not isinstance(g, dict):
            out.append(g)  # left to the validation
            continue
        kept = set(k) | {"params", FORMAT_KEY}
        out.append({**{key: v for key, v in g.items() if key in kept}, **o})
    return out


def with_saved_groups(name: str, sd: Any) -> Any:
    """``sd`` (our consolidated format) with its groups as saved (:func:`restored_groups`, by the record in
    the metadata's copy in ``param_groups[0]``): a new dict where they change. Use it to read a saved group's
    options (ASGO's ``adamw_indices``, ``fused_parts``)."""
    if not isinstance(sd, dict) or not isinstance(sd.get("param_groups"), list):
        return sd  # the validation's message
    groups = restored_groups(name, sd["param_groups"], group_meta_copy(sd))
    return sd if groups is sd["param_groups"] else {**sd, "param_groups": groups}


def with_group_meta(sd: dict[str, Any], record: dict[str, Any] | None = None) -> dict[str, Any]:
    """``sd`` (our consolidated format) with a JSON copy of its metadata in ``param_groups[0]`` (a new
    dict; the metadata marked ``"form": "consolidated"``), and ``record`` (:func:`group_record`) in the copy
    alone. torch's own state-dict tools keep only ``state``
    and ``param_groups`` (``FSDP.rekey_optim_state_dict``, ``set_optimizer_state_dict``: Lightning's
    ModelParallelStrategy resuming a checkpoint saved without FSDP2), and without the optimizer-wide state
    (step counts, SOAA's trust region) the per-block state cannot continue the run. On load the top-level
    entry wins; the copy is read only where it is gone (and for the record)."""
    groups = [dict(g) for g in sd["param_groups"]]
    try:
        copy = json.dumps({**sd[FORMAT_KEY], **(record or {}), "form": "consolidated"})
    except (TypeError, ValueError):  # an optimizer-wide value JSON cannot hold: no copy, such a load is refused
        return {**sd, "param_groups": groups}
    if groups:
        groups[0][FORMAT_KEY] = copy
    return {**sd, "param_groups": groups}


def group_meta_copy(sd: Any) -> dict[str, Any] | None:
    """The metadata copy :func:`with_group_meta` put in ``param_groups[0]``, or None where there is none
    (or it is not our JSON)."""
    groups = sd.get("param_groups") if isinstance(sd, dict) else None
    first = groups[0] if isinstance(groups, list) and groups and isinstance(groups[0], dict) else {}
    text = first.get(FORMAT_KEY)
    try:
        meta = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def holds_state(blk: Any) -> bool:
    """A block entry with some non-zero tensor: held state. An all-zero one is exactly "no state" for every
    optimizer here (zero moments and counter; a root recomputed; ``beta * 0 + (1 - beta) d``): a SOAA block
    made at a step that was then skipped, the placeholders shown for DCP (optim/dcp_plain.py). A non-zero
    ``step`` answers without reading the rest."""
    if not isinstance(blk, dict):
        return False
    step = blk.get("step")
    if isinstance(step, torch.Tensor) and step.numel() and bool(step.ne(0).any()):
        return True
    return any(isinstance(v, torch.Tensor) and bool(v.ne(0).any()) for v in blk.values())


def _blocks_with_state(num_params: int, block_states: dict[tuple[int, int], Any]) -> list[int]:
    counts = [0] * num_params
    for (pi, _), blk in block_states.items():
        counts[pi] += holds_state(blk)
    return counts


def build_state_dict(
    optimizer: CheckpointView,
    block_states: dict[tuple[int, int], dict[str, Any]],
    global_state: dict[str, Any],
    layout: list[list[tuple[int | None, int, int]]] | None = None,
) -> dict[str, Any]:
    """Our consolidated format of ``block_states`` (keyed ``(param_index, sub_index)``); ``layout``: the
    blocks they are cut in, where not the optimizer's own (joined rows: optim/dcp_plain.py)."""
    layout = optimizer.block_table.layout() if layout is None else layout
    state: dict[int, dict[int, dict[str, Any]]] = {}
    for (pi, si), blk in sorted(block_states.items()):
        state.setdefault(pi, {})[si] = blk
    return with_group_meta({
        "state": state,
        "param_groups": saved_groups(optimizer.param_groups, optimizer.meta_options),
        FORMAT_KEY: {
            "version": FORMAT_VERSION,
            "optimizer": optimizer.name,
            "shapes": _shapes(optimizer),
            "layout": [[list(x) for x in blist] for blist in layout],
            "global": global_state,
            # per parameter, how many of its blocks hold (non-zero) state: a tool that rebuilds the state (DCP)
            # lets the load tell that entries went missing on the way (dcp_state._check_arrived)
            "blocks_with_state": _blocks_with_state(len(optimizer.shapes), block_states),
        },
    }, group_record(optimizer.param_groups, optimizer.meta_options))


#: where deepspeed_ext's client optimizers keep ours in their state dicts (deepspeed_ext/client.py STATE_KEY and
#: EGN_STATE_KEY; spelled here because importing lightning_soaa must not import deepspeed_ext)
_DEEPSPEED_CLIENT_KEYS = ("lightning_soaa_deepspeed", "lightning_soaa_deepspeed_egn")


#: where DeepSpeed's optimizer wrappers keep the state of the optimizer they wrap: its ZeRO-0 fp16/bf16 wrapper
#: and ZeRO-3 under 'optimizer_state_dict', ZeRO-1/2 and its bf16 optimizer under 'base_optimizer_state' (a ZeRO
#: file's entry holds one inside the other)
_DEEPSPEED_WRAPPER_KEYS = ("optimizer_state_dict", "base_optimizer_state")


def _deepspeed_client_state(sd: Any, depth: int = 2) -> tuple[tuple[str, ...], str, dict[str, Any]] | None:
    """``(wrappers, key, entry)``: our DeepSpeed client's state ``entry`` under ``key`` in ``sd``, at its top level
    or inside DeepSpeed's wrappers (``wrappers``: the keys that lead there), else None."""
    if not isinstance(sd, dict):
        return None
    key = next((k for k in _DEEPSPEED_CLIENT_KEYS if isinstance(sd.get(k), dict)), None)
    if key is not None:
        return (), key, sd[key]
    for wrapper in _DEEPSPEED_WRAPPER_KEYS if depth > 0 else ():
        found = _deepspeed_client_state(sd.get(wrapper), depth - 1)
        if found is not None:
            return (wrapper, *found[0]), found[1], found[2]
    return None


def _deepspeed_client_hint(sd: Any) -> str:
    """For the state of our DeepSpeed client optimizer (``engine.save_checkpoint``'s ``optimizer`` entry, or
    DeepSpeed's wrapper state around it: a bf16 run's at ZeRO-0, a ZeRO file's), loaded into the plain optimizer
    (a run leaving DeepSpeed): where its own state is, or why there is none to take. Before, the message blamed
    torch's DCP options (and, for a bf16 ZeRO-0 run, whose state DeepSpeed's wrapper holds, said nothing)."""
    found = _deepspeed_client_state(sd)
    if found is None:
        return ""
    wrappers, key, ours = found
    layout = ours.get("layout")
    stage = layout.get("zero_stage", 0) if isinstance(layout, dict) else 0
    what = " It is the state of lightning_soaa's DeepSpeed client optimizer (deepspeed_ext, engine.save_checkpoint)"
    if stage == 0:
        path = "state_dict" + "".join(f"[{k!r}]" for k in (*wrappers, key))
        return (f"{what}: at ZeRO-0 this optimizer's own state, independent of the world size, is "
                f"{path}['inner']; load that (with the param groups the DeepSpeed run had).")
    return (f"{what} at ZeRO-{stage}: DeepSpeed's per-partition state, which this optimizer cannot continue. "
            f"Resume under DeepSpeed at ZeRO-{stage}, or load only the weights (DeepSpeed's zero_to_fp32.py) "
            "into a fresh optimizer.")


def _refuse_not_ours(name: str, sd: Any) -> NoReturn:
    """Raise for a state that is not in our format, with a hint at where it likely came from: another
    optimizer (switching from torch.optim), our DeepSpeed client's state, or torch's DCP helpers rebuilding ours
    from their own keys."""
    ds_hint = _deepspeed_client_hint(sd)
    hint, torch_like = ds_hint, not ds_hint and _torch_optimizer_state(sd)
    if torch_like:  # a torch optimizer's own state dict (switching from torch.optim)
        hint = (" It looks like a torch.optim optimizer's state (per-parameter entries of tensors, no "
                f"'{FORMAT_KEY}'): another optimizer's state cannot be continued by this one. Build this "
                "optimizer fresh and load only the weights (model.load_state_dict; under Lightning, "
                "LightningModule.load_from_checkpoint(path) and fit without ckpt_path).")
    if not ds_hint and isinstance(sd, dict) and "state" in sd and "param_groups" in sd:
        # what torch.distributed.checkpoint.state_dict hands back when it rebuilt the state itself (its
        # flattened form has per-parameter tensors too, so the two cannot always be told apart)
        hint += (" Or, if it is this optimizer's own state" if torch_like else " If it came") + (
                " from torch.distributed.checkpoint.state_dict: with full_state_dict=True (FSDP2), or a "
                "flattened state dict (StateDictOptions(flatten_optimizer_state_dict=True)) unflattened other "
                "than by set_optimizer_state_dict / set_state_dict (which hand it to the optimizer whole), torch "
                "rebuilds the state from its own keys, dropping this optimizer's metadata and global state. Save "
                "and load with torch's set_optimizer_state_dict / set_state_dict (DCP: any world size, also "
                "fully_shard on one rank), or without FSDP2 with consolidate_state_dict() and state_dict().")
    if not ds_hint and _torch_flattened(sd):
        hint = (" It is torch's flattened optimizer state dict (StateDictOptions(flatten_optimizer_state_dict=True),"
                " one key per value): load it with torch's set_optimizer_state_dict(model, optimizer, state_dict, "
                "options=StateDictOptions(flatten_optimizer_state_dict=True)) or set_state_dict, which rebuild it "
                "by parameter name; the optimizer alone has no names to rebuild it by.")
    raise ValueError(
        f"{name}.load_state_dict: not a lightning_soaa optimizer state (expected keys 'state', "
        f"'param_groups' and '{FORMAT_KEY}'; got {_shown_keys(sd) if isinstance(sd, dict) else type(sd)})." + hint
    )


def _shown_keys(sd: dict[Any, Any], most: int = 12) -> str:
    """The first ``most`` keys of ``sd``, sorted, and how many there are: a flattened state dict has one key
    per value (megabytes of message for a large model)."""
    keys = sorted(map(str, sd))
    return str(keys) if len(keys) <= most else f"{keys[:most]} ... ({len(keys)} keys)"


def _torch_flattened(sd: Any) -> bool:
    """Whether ``sd`` has the shape of torch's flattened optimizer state dict: only ``state.<name>...`` and
    ``param_groups.<name>...`` keys (torch's get_optimizer_state_dict with flatten_optimizer_state_dict=True)."""
    return (isinstance(sd, dict) and bool(sd)
            and all(isinstance(k, str) and k.startswith(("state.", "param_groups.")) for k in sd))


def validate_state_dict(optimizer: CheckpointView, sd: Any, by_position: bool = True) -> None:
    """Raise ``ValueError`` with a precise reason when ``sd`` does not fit ``optimizer``. ``by_position``:
    the state maps to the parameters by position (not for torch.distributed.checkpoint's, keyed by name)."""
    name = optimizer.name
    if not isinstance(sd, dict) or FORMAT_KEY not in sd or "state" not in sd or "param_groups" not in sd:
        _refuse_not_ours(name, sd)
    meta = sd[FORMAT_KEY]
    missing = [k for k in _META_KEYS if k not in meta] if isinstance(meta, dict) else list(_META_KEYS)
    if missing:  # checked here, before anything changes (a missing "global" used to fail mid-load)
        raise ValueError(
            f"{name}.load_state_dict: the '{FORMAT_KEY}' entry of the state lacks "
            f"{', '.join(repr(k) for k in missing)} (a damaged or foreign checkpoint)."
        )
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{name}.load_state_dict: unsupported format version {meta.get('version')!r}")
    if meta.get("optimizer") != name:
        raise ValueError(f"{name}.load_state_dict: the state was saved by {meta.get('optimizer')!r}, not {name!r}: "
                         "a state continues only in the optimizer class that saved it. Resume with that class (its "
                         "options may change), or switch by loading the model's weights alone and starting this "
                         "optimizer's state fresh (Lightning: load the checkpoint's 'state_dict' into the module "
                         "and fit without ckpt_path). Nothing was loaded.")
    groups = sd["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"{name}.load_state_dict: the state has {len(groups)} param groups, this optimizer has "
            f"{len(optimizer.param_groups)}{_regrouped(groups, optimizer.param_groups)}. Build the optimizer "
            "with the param groups the state was saved with."
        )
    for gi, (saved, mine) in enumerate(zip(groups, optimizer.param_groups)):
        if len(saved["params"]) != len(mine["params"]):
            # parameters of the state in other groups here: the groups were cut otherwise (per-layer lr groups
            # changed), which the names-only-one-side-has guess ('frozen or unfrozen since') misnamed
            moved = _regrouped(groups, optimizer.param_groups)
            raise ValueError(
                f"{name}.load_state_dict: param group {gi} has {len(saved['params'])} parameters in the "
                f"state and {len(mine['params'])} in this optimizer"
                + (f": its parameters are grouped otherwise{moved}" if moved else _names_differ(saved, mine))
                + ". Build the optimizer with the param groups the state was saved with (the same parameters in "
                "each group, in the same order). Nothing was loaded."
            )
        if by_position:
            _check_name_order(name, gi, saved.get("param_names"), mine.get("param_names"))
    if by_position:
        _check_group_order(name, [g.get("param_names") for g in groups],
                           [g.get("param_names") for g in optimizer.param_groups])
        _warn_no_shared_names(name, [g.get("param_names") for g in groups],
                              [g.get("param_names") for g in optimizer.param_groups])
    shapes = _shapes(optimizer)
    saved_shapes = [list(s) for s in meta["shapes"]]
    if saved_shapes != shapes:
        bad = next(i for i, (a, b) in enumerate(zip(saved_shapes, shapes)) if a != b) \
            if len(saved_shapes) == len(shapes) else None
        detail = (f"parameter {bad} has shape {saved_shapes[bad]} in the state and {shapes[bad]} here"
                  if bad is not None else f"{len(saved_shapes)} parameters in the state, {len(shapes)} here")
        raise ValueError(f"{name}.load_state_dict: the state belongs to a different model: {detail}.")
    layout = [[list(x) for x in blist] for blist in optimizer.block_table.layout()]
    saved_layout = [[list(x) for x in blist] for blist in meta["layout"]]
    if saved_layout != layout:
        _validate_saved_rows(optimizer, sd["state"], meta)  # a damaged block is named, not "a layout"
        change = _layout_option_change(optimizer, groups, saved_layout, layout)
        raise ValueError(
            f"{name}.load_state_dict: the state was saved with a different block layout ({change}) that cannot "
            "be re-cut to this one (only whole-row blocks of an elementwise optimizer's state can); construct the "
            "optimizer with the same blocking options."
            + optimizer.layout_hint
        )
    glob = meta.get("global")
    if not isinstance(glob, dict):
        raise ValueError(f"{name}.load_state_dict: '{FORMAT_KEY}.global' is missing or not a dict.")
    for key in ("num_steps", "skipped_steps"):
        if key in glob:
            check_finite_number(f"{name}.load_state_dict: {FORMAT_KEY}.global.{key}", glob[key],
                                integer=True, nonnegative=True)
    _validate_block_states(optimizer, sd["state"], steps_limit(glob), groups)
    optimizer.validate_global(glob)


def steps_limit(glob: dict[str, Any]) -> float:
    """The most steps a block of a state can have taken: its optimizer's steps (taken and skipped)."""
    return float(glob.get("num_steps", 0)) + float(glob.get("skipped_steps", 0))


def steps_ahead(blk: Any, limit: float) -> float | None:
    """A block state's step count where it exceeds ``limit`` (its optimizer's steps), else None."""
    step = blk.get("step") if isinstance(blk, dict) else None
    if isinstance(step, torch.Tensor) and step.numel() == 1 and float(step) > limit:
        return float(step)
    return None


def check_block_steps(where: str, blk: dict[str, Any], limit: float) -> None:
    """Raise when a block's step count exceeds its optimizer's: the state's per-parameter entries and its
    optimizer-wide state are not of one moment (tensors that kept changing after the state dict was
    taken: on the CPU ``get_optimizer_state_dict`` hands out the optimizer's own step tensors; or entries
    copied in from another checkpoint)."""
    step = steps_ahead(blk, limit)
    if step is not None:
        raise ValueError(
            f"{where} has taken {step:g} steps, but the state's optimizer {limit:g}: its per-parameter "
            "entries and its optimizer-wide state are not of one moment (a state dict whose tensors kept "
            "changing after it was taken: copy it, e.g. torch.save it, before stepping again; or entries "
            "copied in from another checkpoint).")


def _names_differ(saved: dict[str, Any], mine: dict[str, Any]) -> str:
    """'' or, where both groups name their parameters, which names only one side has (a layer frozen or
    unfrozen since the state was saved, the usual cause)."""
    a, b = saved.get("param_names"), mine.get("param_names")
    if not (isinstance(a, list) and isinstance(b, list)):
        return ""
    only_saved = [n for n in a if n is not None and n not in b]
    only_here = [n for n in b if n is not None and n not in a]

    def some(ns: list[Any]) -> str:
        return ", ".join(map(repr, ns[:6])) + (f" and {len(ns) - 6} more" if len(ns) > 6 else "")
    parts = ([f"only in the state: {some(only_saved)}"] if only_saved else []) + (
        [f"only here: {some(only_here)}"] if only_here else [])
    return f" ({'; '.join(parts)}: trained parameters frozen or unfrozen since it was saved?)" if parts else ""


def _regrouped(saved: Sequence[Any], mine: Sequence[Any]) -> str:
    """'' or, where both sides name their parameters, the first one in another group here (e.g. an
    embedding table that ASGO's routes now put in a ``use_asgo=False`` group of its own)."""
    where = {str(n): gi for gi, g in enumerate(saved) if isinstance(g, dict)
             for n in g.get("param_names") or () if n is not None}
    moved = [(n, where[str(n)], gi) for gi, g in enumerate(mine) for n in g.get("param_names") or ()
             if n is not None and where.get(str(n), gi) != gi]
    if not moved:
        return ""
    n, was, now = moved[0]
    more = f" and {len(moved) - 1} more" if len(moved) > 1 else ""
    return f" ({n!r}{more} in group {was} of the state, in group {now} here)"


def _moved_name(saved: list[Any], mine: list[Any]) -> int | None:
    """The first position of ``saved`` whose name (not None) is also in ``mine``, at another position."""
    here = {str(n): k for k, n in enumerate(mine) if n is not None}
    return next((k for k, n in enumerate(saved) if n is not None and here.get(str(n), k) != k), None)


def _moved_message(saved: list[Any], mine: list[Any], k: int, where: str, flat: bool = False) -> str:
    """What a state whose names sit at other positions lists, said after 'lists' (the name at ``k``
    moved; ``where``: how position ``k`` is said, e.g. 'position 2'; ``flat``: positions over all groups)."""
    if sorted(map(str, saved)) == sorted(map(str, mine)):
        return f"the same parameters in another order ({where}: {saved[k]!r} in the state, {mine[k]!r} here)"
    other = next(i for i, n in enumerate(mine) if n is not None and str(n) == str(saved[k]))
    return (f"{saved[k]!r} at another position (the state's {where}; position {other} here"
            f"{' counted over all groups' if flat else ''}): another set of trained parameters, e.g. other "
            "layers frozen since it was saved (to load by position anyway, delete 'param_names' from the "
            "state's param groups)")


def _check_name_order(name: str, gi: int, saved: Any, mine: Any) -> None:
    """Raise when both sides name their parameters and a name of both sides sits at another position.

    The state maps to parameters by position, as torch's does. The same names in another order are the
    same model with its modules registered in another order, and names shared at other positions are
    another set of trained parameters (a checkpoint saved with layer 4 frozen, loaded with layer 0 frozen):
    position by position the state would land on the wrong tensors (equal shapes load silently; 0.06-0.23
    off the uninterrupted run after 3 steps; 0.04 for the frozen layers, on every optimizer). Names shared
    by none (a renamed module) load by position, as in torch."""
    if not (isinstance(saved, list) and isinstance(mine, list)) or saved == mine:
        return
    j = _moved_name(saved, mine)
    if j is not None:
        raise ValueError(
            f"{name}.load_state_dict: param group {gi} lists "
            f"{_moved_message(saved, mine, j, f'position {j}')}; the state maps by position, so it would load "
            "into the wrong tensors. Build the optimizer over the parameters in the order they were saved in.")


def _layout_option_change(optimizer: CheckpointView, saved_groups: list[Any], saved_layout: list[Any],
                          layout: list[Any]) -> str:
    """The first blocking option (``layout_keys``, ``max_block_numel``) whose value differs between the
    saved groups and this optimizer's in a group whose parameters' blocks differ (another option may differ
    harmlessly elsewhere), said as such; else the options that could."""
    start = 0
    for gi, mine in enumerate(optimizer.param_groups[:len(saved_groups)]):
        n = len(mine["params"])
        moved = saved_layout[start:start + n] != layout[start:start + n]
        start += n
        said = _option_change(optimizer, saved_groups, gi) if moved else None
        if said is not None:
            return said
    return "for example a different " + " or ".join(k for k in optimizer.layout_keys if k != "use_asgo")


def _option_change(optimizer: CheckpointView, saved_groups: list[Any], gi: int) -> str | None:
    """``param_groups[gi] was saved with k=a, this optimizer has k=b`` for the first blocking option
    (``layout_keys``, ``max_block_numel``) of group ``gi`` whose saved value differs, else None."""
    saved, mine = (saved_groups[gi] if gi < len(saved_groups) else None), optimizer.param_groups[gi]
    if not isinstance(saved, dict):
        return None
    for k in optimizer.layout_keys:
        if k in saved and _as_json(saved[k]) != _as_json(mine.get(k)):  # (a list from the metadata's JSON)
            return f"param_groups[{gi}] was saved with {k}={saved[k]!r}, this optimizer has {k}={mine.get(k)!r}"
        empty = k in optimizer.meta_options and isinstance(mine.get(k), (list, tuple)) and not mine[k]
        if k not in saved and k in mine and k in optimizer.absent_key_notes and not empty:  # ([]: not saved)
            # absent also when saved empty by an earlier version: the note's dated cause alone misnamed it
            also = (f" (A checkpoint of an earlier version saved with {k}=[] lacks the key too, and so does a "
                    f"torch DCP checkpoint of an earlier version whatever it saved: this version does not read "
                    f"that key, it keeps {k} in the metadata.)" if k in optimizer.meta_options else "")
            return (f"param_groups[{gi}] was saved without {k}, this optimizer has {k}={mine[k]!r}: "
                    + optimizer.absent_key_notes[k] + also)
    return None


def _torch_optimizer_state(sd: Any) -> bool:
    """Whether ``sd`` has the shape of a torch.optim optimizer's state dict: param groups without our
    metadata's copy, and some per-parameter entry of plain values (``step``, ``exp_avg``, ...), not of
    per-block entries as ours."""
    if not (isinstance(sd, dict) and isinstance(sd.get("state"), dict) and isinstance(sd.get("param_groups"), list)):
        return False
    if any(isinstance(g, dict) and FORMAT_KEY in g for g in sd["param_groups"]):
        return False
    entries = [e for e in sd["state"].values() if isinstance(e, dict) and e]
    return any(all(isinstance(v, (torch.Tensor, int, float)) for v in e.values()) for e in entries)


def _check_group_order(name: str, saved: list[Any], mine: list[Any]) -> None:
    """:func:`_check_name_order` across groups: names spread over the groups at other positions (param
    groups built in another order, e.g. two equal-shaped layers with different lrs) map state and
    hyperparameters to the wrong parameters (0.03 off the uninterrupted run in 3 steps; torch's loader
    does the same, silently)."""
    if not all(isinstance(g, list) for g in (*saved, *mine)):
        return
    where = [(gi, j) for gi, g in enumerate(mine) for j in range(len(g))]
    flat_saved, flat_mine = [n for g in saved for n in g], [n for g in mine for n in g]
    if flat_saved == flat_mine or (k := _moved_name(flat_saved, flat_mine)) is None:
        return
    gi, j = where[k]
    said = _moved_message(flat_saved, flat_mine, k, f"group {gi}, position {j}", flat=True)
    raise ValueError(
        f"{name}.load_state_dict: the param groups list {said}; the state and each group's "
        "hyperparameters map by position, so they would load into the wrong tensors. Build the param groups "
        "in the order they were saved in.")


#: the name parts torch's wrappers add (DDP, torch.compile, activation checkpointing, FSDP1): a state saved from
#: a wrapped module and loaded into the bare one (a resume at W = 1 without DDP) names the same parameters
_WRAPPER_PARTS = frozenset({"module", "_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def _unwrapped(name: Any) -> str:
    return ".".join(p for p in str(name).split(".") if p not in _WRAPPER_PARTS)


def _warn_no_shared_names(name: str, saved: list[Any], mine: list[Any]) -> None:
    """Warn when both sides name every parameter and share no name: the state loads by position, as torch's
    does, which is right for a renamed module (``self.net`` now ``self.backbone``) and wrong for two
    optimizers of one class over equal-shaped modules resumed in another order (``configure_optimizers``
    returning them swapped: each loads the other's moments, 2e-2 to 5e-2 off the uninterrupted run in a
    hunter's runs, silently, as torch's AdamW). The two cannot be told apart from the state, so this says it."""
    flat_saved, flat_mine = [n for g in saved for n in (g or [None])], [n for g in mine for n in (g or [None])]
    if not flat_saved or None in flat_saved or None in flat_mine:
        return
    if set(map(_unwrapped, flat_saved)) & set(map(_unwrapped, flat_mine)):
        return
    log.warning("%s.load_state_dict: none of the state's parameter names is among this optimizer's (the state's "
                "first: %r; this optimizer's first: %r), so the state loads by position. Right if the module was "
                "renamed; wrong if optimizers over equal-shaped modules were built in another order than they "
                "were saved in (e.g. configure_optimizers returning them swapped): then build them in the saved "
                "order.", name, str(flat_saved[0]), str(flat_mine[0]))


def lookup(mapping: Any, key: int) -> Any:
    """``mapping[key]`` where saved keys may be ints or their strings (a state that went through JSON)."""
    return mapping.get(key, mapping.get(str(key))) if isinstance(mapping, dict) else None


def _validate_block_states(optimizer: CheckpointView, state: Any, limit: float, groups: list[Any]) -> None:
    """Every saved block state against the optimizer's schema and its step ``limit`` (all blocks: same
    verdict on every rank). ``groups``: the saved param groups, whose blocking options a refusal names
    where they differ from the block's group's here (``use_asgo`` routes a matrix to other state, with
    the same layout)."""
    name = optimizer.name
    if not isinstance(state, dict):
        raise ValueError(f"{name}.load_state_dict: 'state' must be a dict, got {type(state).__name__}.")
    n_params = len(optimizer.shapes)
    for key in state:
        if not (str(key).isdigit() and int(key) < n_params):
            raise ValueError(f"{name}.load_state_dict: state[{key!r}] names no parameter (there are {n_params}).")
    _check_block_keys(optimizer, state)
    for b in optimizer.block_table.blocks:
        blk = lookup(lookup(state, b.param_index) or {}, b.sub_index)
        if not blk:
            continue  # no state yet (the block never had a gradient): valid, starts from zero
        schema = optimizer.block_schema(b)
        if schema is None:
            continue
        names = optimizer.names
        label = (names[b.param_index] if b.param_index < len(names) else None) or f"#{b.param_index}"
        where = f"{name}.load_state_dict: state[{b.param_index}][{b.sub_index}] (parameter {label})"
        _validate_block(where, blk, schema, optimizer.layout_hint,
                        functools.partial(_option_said, optimizer, groups, b.group_index))
        check_block_steps(where, blk, limit)


def saved_block_schema(optimizer: CheckpointView, meta: Any, pi: int, si: Any) -> dict[str, StateField] | None:
    """The schema saved block ``si`` of parameter ``pi`` had: this optimizer's, with an elementwise
    optimizer's block-shaped fields in the saved block's rows (saved with other row blocks, or joined into
    one: re-cut on load, :mod:`~lightning_soaa.distributed.reblock`); None where that cannot be told."""
    blocks = optimizer.block_table.by_param[pi]
    try:
        saved = [tuple(x) for x in meta["layout"][pi]]
        shape = tuple(int(x) for x in meta["shapes"][pi])
        dim, start, stop = saved[int(si)]
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if saved == [(b.dim, b.start, b.stop) for b in blocks]:  # this optimizer's blocks
        b = next((b for b in blocks if str(b.sub_index) == str(si)), None)
        return optimizer.block_schema(b) if b is not None else None
    in_rows = all(e[0] in (None, 0) for e in saved) and all(b.dim in (None, 0) for b in blocks)
    if not optimizer.elementwise or not in_rows:  # (DASGO's matrices: column blocks, which no re-cut joins)
        return None
    rows = shape if dim is None else (int(stop) - int(start), *shape[1:]) if shape else None
    fields = optimizer.block_schema(blocks[0])
    if rows is None or fields is None:
        return None
    mine = tuple(blocks[0].shape)
    return {k: dataclasses.replace(f, shape=rows) if f.shape and tuple(f.shape) == mine else f
            for k, f in fields.items()}


def _validate_saved_rows(optimizer: CheckpointView, state: Any, meta: dict[str, Any]) -> None:
    """The saved blocks of a state whose layout is not this optimizer's, each against its own rows' schema:
    a damaged field is named there (the re-cut, which joins the blocks, gave up on it without a word)."""
    if not optimizer.elementwise or not isinstance(state, dict):
        return
    _check_block_keys(optimizer, state, meta["layout"])
    for key, per_param in state.items():
        pi = int(key) if str(key).isdigit() else None
        if pi is None or pi >= len(optimizer.block_table.by_param) or not isinstance(per_param, dict):
            continue
        for si, blk in per_param.items():
            schema = saved_block_schema(optimizer, meta, pi, si) if blk else None
            if schema is not None:
                _validate_block(f"{optimizer.name}.load_state_dict: state[{pi}][{si}]", blk, schema)


def _check_block_keys(optimizer: CheckpointView, state: dict[Any, Any], saved_layout: Any = None) -> None:
    """Raise unless every parameter's entry is keyed by the indices of that parameter's blocks (of
    ``saved_layout`` where given, else of this optimizer's). Anything else would be skipped by the block
    look-ups (and by the re-cut), i.e. dropped while the rest of the checkpoint loads: a torch.optim state's
    flat ``{step, exp_avg, exp_avg_sq}`` (torch's load-by-name recipe copies such entries into our own state
    dict) restarted Adam from zero moments, 5.5e-2 off torch continuing."""
    blocks: dict[int, list[int]] = {}
    if saved_layout is not None:
        blocks = {pi: list(range(len(bl))) for pi, bl in enumerate(saved_layout)}
    else:
        for b in optimizer.block_table.blocks:
            blocks.setdefault(b.param_index, []).append(b.sub_index)
    for key, per_param in state.items():
        if per_param is None or (isinstance(per_param, dict) and not per_param):
            continue  # no state yet
        allowed = sorted(blocks.get(int(key), []))
        where = f"{optimizer.name}.load_state_dict: state[{key!r}]"
        if not isinstance(per_param, dict):
            raise ValueError(f"{where} must be a dict keyed by block index {allowed}, got {type(per_param).__name__}.")
        bad = sorted(str(k) for k in per_param if not (str(k).isdigit() and int(k) in allowed))
        if not bad:
            continue
        flat = all(isinstance(v, (torch.Tensor, int, float)) for v in per_param.values())
        raise ValueError(
            f"{where} has key(s) {bad}; this optimizer keeps one entry per block of the parameter, keyed by block "
            f"index {allowed}." + (" These look like a torch.optim per-parameter state: another optimizer's state "
                                   "cannot be continued by this one; build it fresh (or drop 'state')."
                                   if flat else ""))


def _option_said(optimizer: CheckpointView, saved_groups: list[Any], gi: int) -> str:
    """:func:`_option_change` as a sentence appended to a refusal ('' when no option differs)."""
    said = _option_change(optimizer, saved_groups, gi)
    return f" {said}." if said else ""


def _validate_block(where: str, blk: Any, schema: dict[str, StateField], hint: str = "",
                    options: Callable[[], str] = str) -> None:
    """``hint``: said with a wrong shape; ``options()`` (the group's blocking options that differ from the
    saved ones, made only for a refusal): with wrong keys and shapes."""
    if not isinstance(blk, dict):
        raise ValueError(f"{where} must be a dict of tensors, got {type(blk).__name__}.")
    unknown = sorted(str(k) for k in blk if k not in schema)
    if unknown:
        raise ValueError(f"{where} has unexpected key(s) {unknown}; this optimizer keeps {sorted(schema)}." + options())
    for key, field in schema.items():
        if key not in blk:
            if field.required:
                raise ValueError(f"{where} is missing {key!r} (a block with state keeps {sorted(schema)})." + options())
            continue
        v = blk[key]
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{where}[{key!r}] must be a tensor, got {type(v).__name__}.")
        if tuple(v.shape) != tuple(field.shape):
            raise ValueError(f"{where}[{key!r}] has shape {tuple(v.shape)}; it must be {tuple(field.shape)}."
                             + options() + hint)
        if field.dtype is not None and v.dtype != field.dtype and not _castable(v.dtype, field):
            raise ValueError(f"{where}[{key!r}] has dtype {v.dtype}; it must be {field.dtype}"
                             f"{' (or another floating dtype)' if field.dtype.is_floating_point else ''}.")
        complex_ok = field.dtype is not None and field.dtype.is_complex  # complex parameters' moments
        if (v.is_complex() and not complex_ok) or v.dtype == torch.bool:
            raise ValueError(f"{where}[{key!r}] has dtype {v.dtype}; it must be a real number type.")
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{where}[{key!r}] holds non-finite values (NaN or inf).")
        parts = torch.view_as_real(v) if v.is_complex() else v  # a complex second moment: both parts >= 0
        if field.nonnegative and v.numel() and bool((parts < 0).any()):
            raise ValueError(f"{where}[{key!r}] holds negative values (min {float(parts.min())}); it must be >= 0.")


def select_owned_state(optimizer: CheckpointView, sd: dict[str, Any]) -> dict[tuple[int, int], dict[str, Any]]:
    """The saved states of the blocks this rank owns, moved to their parameters' devices."""
    out: dict[tuple[int, int], dict[str, Any]] = {}
    state = sd["state"]
    for b in optimizer.block_table.owned():
        per_param = state.get(b.param_index, state.get(str(b.param_index)))
        if not per_param:
            continue
        blk = per_param.get(b.sub_index, per_param.get(str(b.sub_index)))
        if blk is None:
            continue
        device = optimizer.devices[b.param_index]
        schema = optimizer.block_schema(b) or {}
        out[b.key] = {k: (_owned_value(v, device, schema.get(k)) if isinstance(v, torch.Tensor) else v)
                      for k, v in blk.items()}
    return out


def _castable(saved: torch.dtype, field: StateField) -> bool:
    """Whether a saved value of dtype ``saved`` loads into ``field`` converted: an earlier version's dtype
    (``field.legacy``), or a floating dtype into a floating field: a model converted since it was saved
    (trained in float32, resumed in float64 or bfloat16), whose state follows its parameters' dtype as
    torch's optimizers convert it on load (refused before: 'has dtype torch.float32; it must be
    torch.float64', on every optimizer)."""
    assert field.dtype is not None
    return saved in field.legacy or (saved.is_floating_point and field.dtype.is_floating_point)


def _owned_value(v: torch.Tensor, device: torch.device, field: StateField | None) -> torch.Tensor:
    """A copy of a saved tensor on ``device``, in the field's dtype where :func:`_castable` converts it: the
    load's one copy of it (``v`` may be a view into a larger saved tensor, :mod:`~lightning_soaa.distributed.reblock`;
    the copy holds the view's elements alone, so the state keeps nothing of the rest alive)."""
    dtype = v.dtype
    if field is not None and field.dtype is not None and v.dtype != field.dtype and _castable(v.dtype, field):
        dtype = field.dtype
    # one copy made where it is kept (a clone first, then .to(device): the block twice on the host)
    return v.detach().to(device=device, dtype=dtype, copy=True)
