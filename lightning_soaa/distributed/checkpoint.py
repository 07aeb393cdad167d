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

The functions take a :class:`CheckpointView` of the optimizer (built by
``ShardedOptimizer._checkpoint_view``), not the optimizer itself, so ``distributed/`` never imports
``optim/`` and never reads an optimizer's private attributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from lightning_soaa.distributed.blocks import BlockTable

__all__ = ["FORMAT_KEY", "FORMAT_VERSION", "CheckpointView", "build_state_dict", "validate_state_dict",
           "select_owned_state"]

FORMAT_KEY = "lightning_soaa"
FORMAT_VERSION = 1
_META_KEYS = ("version", "optimizer", "shapes", "layout", "global")


@dataclasses.dataclass(frozen=True)
class CheckpointView:
    """What checkpointing reads from an optimizer: a snapshot built by the optimizer for one call."""

    name: str  #: the optimizer's class name (saved, and checked on load)
    param_groups: Sequence[dict[str, Any]]  #: the optimizer's groups (hyperparameters, parameter counts)
    block_table: BlockTable  #: the blocking (saved and checked) and the blocks this rank owns
    shapes: tuple[tuple[int, ...], ...]  #: per parameter, its (global) shape
    devices: tuple[torch.device, ...]  #: per parameter, where its loaded state goes


def _shapes(opt: CheckpointView) -> list[list[int]]:
    return [list(s) for s in opt.shapes]


def build_state_dict(
    optimizer: CheckpointView,
    block_states: dict[tuple[int, int], dict[str, Any]],
    global_state: dict[str, Any],
) -> dict[str, Any]:
    state: dict[int, dict[int, dict[str, Any]]] = {}
    for (pi, si), blk in sorted(block_states.items()):
        state.setdefault(pi, {})[si] = blk
    groups = []
    index = 0
    for group in optimizer.param_groups:
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = list(range(index, index + len(group["params"])))
        index += len(group["params"])
        groups.append(g)
    return {
        "state": state,
        "param_groups": groups,
        FORMAT_KEY: {
            "version": FORMAT_VERSION,
            "optimizer": optimizer.name,
            "shapes": _shapes(optimizer),
            "layout": [[list(x) for x in blist] for blist in optimizer.block_table.layout()],
            "global": global_state,
        },
    }


def validate_state_dict(optimizer: CheckpointView, sd: Any) -> None:
    """Raise ``ValueError`` with a precise reason when ``sd`` does not fit ``optimizer``."""
    name = optimizer.name
    if not isinstance(sd, dict) or FORMAT_KEY not in sd or "state" not in sd or "param_groups" not in sd:
        raise ValueError(
            f"{name}.load_state_dict: not a lightning_soaa optimizer state (expected keys 'state', "
            f"'param_groups' and '{FORMAT_KEY}'; got {sorted(sd) if isinstance(sd, dict) else type(sd)})."
        )
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
        raise ValueError(f"{name}.load_state_dict: the state was saved by {meta.get('optimizer')!r}, not {name!r}")
    groups = sd["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"{name}.load_state_dict: the state has {len(groups)} param groups, this optimizer has "
            f"{len(optimizer.param_groups)}."
        )
    for gi, (saved, mine) in enumerate(zip(groups, optimizer.param_groups)):
        if len(saved["params"]) != len(mine["params"]):
            raise ValueError(
                f"{name}.load_state_dict: param group {gi} has {len(saved['params'])} parameters in the "
                f"state and {len(mine['params'])} in this optimizer."
            )
    shapes = _shapes(optimizer)
    saved_shapes = [list(s) for s in meta["shapes"]]
    if saved_shapes != shapes:
        bad = next(i for i, (a, b) in enumerate(zip(saved_shapes, shapes)) if a != b) \
            if len(saved_shapes) == len(shapes) else None
        detail = (f"parameter {bad} has shape {saved_shapes[bad]} in the state and {shapes[bad]} here"
                  if bad is not None else f"{len(saved_shapes)} parameters in the state, {len(shapes)} here")
        raise ValueError(f"{name}.load_state_dict: the state belongs to a different model: {detail}.")
    layout = [[list(x) for x in blist] for blist in optimizer.block_table.layout()]
    if [[list(x) for x in blist] for blist in meta["layout"]] != layout:
        raise ValueError(
            f"{name}.load_state_dict: the state was saved with a different block layout (for example a "
            "different max_block_size); construct the optimizer with the same blocking options."
        )


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
        out[b.key] = {
            k: (v.detach().clone().to(device) if isinstance(v, torch.Tensor) else v) for k, v in blk.items()
        }
    return out
