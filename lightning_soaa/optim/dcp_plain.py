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
checkpoint holds every key a destination shows. And the keys must not depend on the world size: an
elementwise optimizer's automatic row blocks do (``_auto_block_numel``: a model over ~2M x W elements is cut
finer at larger W), so its state dict joins each parameter's row blocks into one whole-parameter block
(``layout`` says so; any world size re-cuts it on load, :mod:`~lightning_soaa.distributed.reblock`).

On load (any route: ``load_state_dict`` after ``torch.load`` too) an all-zero block is no state, an
all-zero optional key is absent: zero state is exactly "no state" for every optimizer here (Adam's moments
and counter, ASGO's momentum and Gram, whose root is recomputed at the next step, EGN's momentum EMA,
``beta * 0 + (1 - beta) d``). So is a held block that is all zero (a SOAA block made at a step that was
then skipped; an EGN buffer of a parameter outside the loss): the block counts saved beside the state
(``blocks_with_state``) count non-zero blocks only (:func:`~lightning_soaa.distributed.checkpoint.holds_state`).

The keys a destination shows are those of its own options (:func:`placeholder_schema`), and the checkpoint's
group values win on load (as in torch): where an option decides the keys (ASGO's ``root_every="auto"``,
EGN's ``momentum``), a checkpoint that keeps keys the destination does not show is refused on load naming
the option (:func:`dcp_state._check_option_keys`; it continued without them), and one that lacks keys the
destination shows is refused by ``dcp.load`` itself ("Missing key in checkpoint state_dict"; with
``allow_partial_load=True`` they load as "no state" and the run continues exactly).

Frozen parameters (``requires_grad=False``) show no placeholders: torch's tools leave their state out on
load, and a frozen backbone would cost a full zero state at every save.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_soaa.distributed.blocks import BlockInfo
from lightning_soaa.distributed.checkpoint import FORMAT_KEY, StateField, group_meta_copy, saved_block_schema
from lightning_soaa.distributed.reblock import joined_rows

if TYPE_CHECKING:
    from lightning_soaa.optim.base import ShardedOptimizer

__all__ = ["handed_out", "placeholder_schema", "without_placeholders"]

Blocks = dict[tuple[int, int], dict[str, Any]]
Layout = list[list[tuple[int | None, int, int]]]


def placeholder_schema(opt: ShardedOptimizer, block: BlockInfo,
                       group: dict[str, Any] | None = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The keys ``block`` holds after a step (shape, dtype), as :func:`dcp_state.block_schema` has them (the
    keys of its group's options: ASGO's ``root_every="auto"`` ones only then, EGN's buffer only with
    momentum); under ``group``'s options where given (a checkpoint's: what it holds), else under the options
    the block was built with (what a destination shows)."""
    from lightning_soaa.optim.dcp_state import block_schema
    from lightning_soaa.optim.egn import EGN

    group = opt._group_as_built(block.group_index) if group is None else group
    if isinstance(opt, EGN):
        if not float(group.get("momentum", 0.0)) > 0.0:
            return {}
        p = opt._params[block.param_index]
        fields = opt._state_schema(block, p, group) or {}
        return {k: (tuple(f.shape), f.dtype or p.dtype) for k, f in fields.items()}
    try:
        schema = block_schema(opt, block, group)
    except ValueError:  # an optimizer whose schema dcp_state does not know: no placeholders (the recipe is
        return {}  # then refused at load, as dcp_state._check_arrived says)
    return {k: (shape, dtype) for k, (_, shape, dtype) in schema.items()}


def handed_out(opt: ShardedOptimizer, blocks: Blocks) -> tuple[Blocks, Layout]:
    """The gathered block states of a state dict handed out over plain parameters (see the module docstring):
    placeholders added, an elementwise optimizer's row blocks joined per parameter; with the layout they
    are cut in. On the CPU, where the gathered state is. Takes ``blocks`` over (changed in place): each
    parameter's blocks are let go as they are joined, so the join holds one parameter's state twice at
    most, not the whole state (a copy of the dict doubled a save's memory: +769 MiB for +387)."""
    out = blocks
    cpu = torch.device("cpu")
    for b in opt.block_table.blocks:
        if not opt._params[b.param_index].requires_grad:
            continue  # torch's tools leave a frozen parameter's state out on load; zeros would cost a full state
        schema = placeholder_schema(opt, b)
        held = out.get(b.key)
        missing = set(schema) - set(held or {})
        if held is not None and missing:  # (the optional keys read only where a held block lacks some)
            missing &= _optional(opt, b.param_index)
        if missing:
            zeros = {k: torch.zeros(schema[k][0], dtype=schema[k][1], device=cpu) for k in sorted(missing)}
            out[b.key] = {**zeros, **(held or {})}
    layout: Layout = [list(bl) for bl in opt.block_table.layout()]
    if opt.elementwise:
        for pi, blist in enumerate(opt.block_table.by_param):
            if len(blist) < 2 or any(b.key not in out for b in blist):
                continue
            shape = tuple(int(s) for s in opt._params[pi].shape)
            parts = [out.pop(b.key) for b in blist]
            whole = joined_rows(parts, layout[pi], shape)
            if whole is None:  # (per-block counters that differ: kept as they are)
                out.update({b.key: part for b, part in zip(blist, parts)})
                continue
            del parts
            out[(pi, 0)] = whole
            layout[pi] = [(None, 0, 0)]
    return out, layout


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


def without_placeholders(opt: ShardedOptimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """``sd`` (our consolidated format) without :func:`handed_out`'s zeros: all-zero blocks left out,
    all-zero optional keys of held blocks left out. A new dict where anything was left out; ``sd`` is not
    changed (it is the caller's)."""
    state = sd.get("state") if isinstance(sd, dict) else None
    if not isinstance(state, dict):
        return sd  # the validation's message
    meta = sd.get(FORMAT_KEY) if isinstance(sd.get(FORMAT_KEY), dict) else group_meta_copy(sd)
    view = opt._checkpoint_view()
    out: dict[Any, Any] = {}
    changed = False
    for key, entry in state.items():
        pi = int(key) if isinstance(key, int) or (isinstance(key, str) and key.isdigit()) else None
        if not isinstance(entry, dict) or pi is None or not 0 <= pi < len(opt._params):
            out[key] = entry
            continue
        kept: dict[Any, Any] = {}
        for si, blk in entry.items():
            fields = saved_block_schema(view, meta, pi, si) or {}
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
