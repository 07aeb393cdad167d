"""torch's DCP recipe over plain (non-DTensor) parameters: placeholders in our consolidated format.

The recipe (torchtitan's and torch's tutorial's, also run under DDP or in one process)::

    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    ...                                                   # a fresh optimizer, any world size
    osd = get_optimizer_state_dict(model, opt)            # the destination's tensors
    dcp.load({"optim": osd}, checkpoint_id=path)          # fills those tensors, and only those
    set_optimizer_state_dict(model, opt, osd)

Over plain parameters ``state_dict()`` is our world-size independent consolidated format (every block's
state, gathered). ``dcp.load`` fills only the tensors the destination shows, and a fresh optimizer holds
none, so the recipe brought the step counts back (JSON in the first group) and no state; since turn 36 it
was refused. torch's own optimizers get their tensors by a zero-gradient ``step()``, which ours do not take
(SOAA needs a loss; any step would move counters and the trust region).

So, as the DTensor form does (:mod:`~lightning_soaa.optim.dcp_state`), every block of a trainable parameter
shows its state's full key set: a block without state shows zeros of its schema (``step`` 0), and a block
without an optional key (ASGO's ``inv_root`` after an all-zero Gram) shows zeros for it. Both directions of
DCP then see the same keys: a fresh destination has a tensor for every key the checkpoint holds, and a
checkpoint holds every key a destination shows. On load (any route: ``load_state_dict`` after
``torch.load`` too) an all-zero block is no state, an all-zero optional key is absent: zero state is exactly
"no state" for every optimizer here (Adam's moments and counter, ASGO's momentum and Gram, whose root is
recomputed at the next step, EGN's momentum EMA, ``beta * 0 + (1 - beta) d``). A held block is never all zero
(its ``step`` counts from 1; EGN's buffer: an all-zero one is the same as none).

Frozen parameters (``requires_grad=False``) show no placeholders: torch's tools leave their state out on
load, and a frozen backbone would cost a full zero state at every save.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_soaa.distributed.blocks import BlockInfo
from lightning_soaa.distributed.checkpoint import StateField

if TYPE_CHECKING:
    from lightning_soaa.optim.base import ShardedOptimizer

__all__ = ["holds_state", "show_placeholders", "without_placeholders"]


def _schema(opt: ShardedOptimizer, block: BlockInfo) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The keys ``block`` holds after a step (shape, dtype), as :func:`dcp_state.block_schema` has them (the
    keys of this group's options: ASGO's ``root_every="auto"`` ones only then, EGN's buffer only with
    momentum)."""
    from lightning_soaa.optim.dcp_state import block_schema
    from lightning_soaa.optim.egn import EGN

    if isinstance(opt, EGN):
        group = opt._group_as_built(block.group_index)
        if not float(group.get("momentum", 0.0)) > 0.0:
            return {}
        fields = opt._block_schema(block) or {}
        return {k: (tuple(f.shape), f.dtype or opt._params[block.param_index].dtype) for k, f in fields.items()}
    try:
        schema = block_schema(opt, block)
    except ValueError:  # an optimizer whose schema dcp_state does not know: no placeholders (the recipe is
        return {}  # then refused at load, as dcp_state._check_arrived says)
    return {k: (shape, dtype) for k, (_, shape, dtype) in schema.items()}


def show_placeholders(opt: ShardedOptimizer, sd: dict[str, Any]) -> None:
    """In place on our consolidated format over plain parameters (see the module docstring): zeros of the
    schema for every block of a trainable parameter without state, and for the optional keys a held block
    lacks. On the CPU, where the consolidated state is."""
    state: dict[int, dict[int, dict[str, Any]]] = sd["state"]
    cpu = torch.device("cpu")
    for b in opt.block_table.blocks:
        if not opt._params[b.param_index].requires_grad:
            continue
        schema = _schema(opt, b)
        if not schema:
            continue
        held = state.get(b.param_index, {}).get(b.sub_index)
        if held is not None and not set(schema) - set(held):
            continue
        missing = set(schema) if held is None else (set(schema) - set(held)) & _optional(opt, b.param_index)
        zeros = {k: torch.zeros(schema[k][0], dtype=schema[k][1], device=cpu) for k in sorted(missing)}
        state.setdefault(b.param_index, {})[b.sub_index] = {**zeros, **(held or {})}
    sd["state"] = {pi: dict(sorted(state[pi].items())) for pi in sorted(state)}


def holds_state(blk: Any) -> bool:
    """A block entry with some non-zero tensor (the placeholders shown for DCP hold none)."""
    return isinstance(blk, dict) and any(isinstance(v, Tensor) and bool(v.ne(0).any()) for v in blk.values())


def _optional(opt: ShardedOptimizer, pi: int) -> set[str]:
    """The keys a held block of parameter ``pi`` may lack (its schema's ``required=False`` fields)."""
    out: set[str] = set()
    for b in opt.block_table.by_param[pi]:
        out |= {k for k, f in (opt._block_schema(b) or {}).items() if not f.required}
    return out


def _zero_as_declared(v: Any, field: StateField | None) -> bool:
    """``v`` is zeros of ``field``'s shape and dtype: a placeholder. Zeros of another shape or dtype are a
    damaged checkpoint, left to the validation's refusal."""
    if field is None or not isinstance(v, Tensor) or tuple(v.shape) != tuple(field.shape):
        return False
    if field.dtype is not None and v.dtype != field.dtype:
        return False
    return not bool(v.ne(0).any())


def _placeholder(blk: Any, fields: dict[str, StateField]) -> bool:
    """A block entry of the declared keys, all zeros (``step`` first: a held block's is >= 1)."""
    if not isinstance(blk, dict) or not blk or set(blk) - set(fields):
        return False
    order = sorted(blk, key=lambda k: k != "step")
    return all(_zero_as_declared(blk[k], fields[k]) for k in order)


def _fields(opt: ShardedOptimizer, pi: int, si: Any) -> dict[str, StateField]:
    """The schema of block ``si`` of parameter ``pi`` in this optimizer's table ({} where it has no such
    block: a state saved with other row blocks, re-cut later and validated as it is)."""
    blocks = opt.block_table.by_param[pi]
    b = next((b for b in blocks if b.sub_index == si or str(b.sub_index) == str(si)), None)
    return (opt._block_schema(b) or {}) if b is not None else {}


def without_placeholders(opt: ShardedOptimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """``sd`` (our consolidated format) without :func:`show_placeholders`'s zeros: all-zero blocks left out,
    all-zero optional keys of held blocks left out. A new dict where anything was left out; ``sd`` is not
    changed (it is the caller's)."""
    state = sd.get("state") if isinstance(sd, dict) else None
    if not isinstance(state, dict):
        return sd  # the validation's message
    out: dict[Any, Any] = {}
    changed = False
    for key, entry in state.items():
        pi = int(key) if isinstance(key, int) or (isinstance(key, str) and key.isdigit()) else None
        if not isinstance(entry, dict) or pi is None or not 0 <= pi < len(opt._params):
            out[key] = entry
            continue
        kept: dict[Any, Any] = {}
        for si, blk in entry.items():
            fields = _fields(opt, pi, si)
            if _placeholder(blk, fields):
                changed = True
                continue
            zero_optional = {k for k, v in (blk.items() if isinstance(blk, dict) else ())
                             if k in fields and not fields[k].required and _zero_as_declared(v, fields[k])}
            if zero_optional:
                blk = {k: v for k, v in blk.items() if k not in zero_optional}
                changed = True
            kept[si] = blk
        if kept or not entry:
            out[key] = kept
        else:
            changed = True  # every block a placeholder: no state, as a parameter that never stepped
    return {**sd, "state": out} if changed else sd
