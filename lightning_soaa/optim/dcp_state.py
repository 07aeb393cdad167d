"""``torch.distributed.checkpoint`` (DCP) state dicts for optimizers over DTensor (FSDP2) parameters.

torch's recipe, unchanged (also what Lightning's ``ModelParallelStrategy`` runs)::

    osd = get_optimizer_state_dict(model, opt)            # every rank: opt.state_dict()
    dcp.save({"optim": osd}, checkpoint_id=path)          # each rank writes its shards
    ...                                                   # any number of ranks, fresh optimizer
    osd = get_optimizer_state_dict(model, opt)            # destination tensors, sharded for this W
    dcp.load({"optim": osd}, checkpoint_id=path)          # filled in place, resharded by DCP
    set_optimizer_state_dict(model, opt, osd)             # every rank: opt.load_state_dict(osd)

Under DTensor parameters :meth:`ShardedOptimizer.state_dict` therefore returns torch's shape:

* ``state[param_index]``: the state of a whole-parameter block as a flat dict (``step``,
  ``exp_avg``, ...); a parameter cut into several blocks (ASGO's ``max_block_size``) holds one dict
  per block under ``"block<sub_index>"`` (string keys: DCP turns every key into a string). A state
  tensor shaped like its parameter's local piece (``exp_avg`` and, for AdamW-like blocks,
  ``exp_avg_sq``; ASGO/DASGO keep momentum in ``rows x rest`` form) is a DTensor with the parameter's
  mesh and placements; everything else (``step``, ASGO's ``gram``/``inv_root``, DASGO's ``col_stat``,
  the state of plain parameters) is identical on every rank (the sums behind it are all-reduced) and
  stays a plain tensor, which DCP treats as replicated.
* ASGO's ``batch_dims=1`` stacks (``Shard(0)``): each expert is a block whole on one rank, its holder,
  and only the holder keeps its state, so a per-expert entry would exist on one rank only and its
  owner would change with W. The stack's entry is instead flat, every key stacked over the experts: a
  DTensor ``[E, ...]`` (``exp_avg`` ``[E, rows, rest]``, ``gram``/``inv_root`` ``[E, k, k]``, ``step`` and
  ``root_fallbacks`` ``[E]``) with the stack's mesh and ``Shard(0)``, each rank holding its experts' rows,
  which are the rows it holds of the stack at any W. DCP reshards it like the stack; an expert without
  state is a zero row (``step`` 0).
* ``param_groups``: torch's (hyperparameters, ``params`` as indices, which DCP turns into FQNs); the
  first group also carries ``"lightning_soaa"``: a JSON string with what our own format keeps beside
  the state (optimizer name, shapes and block layout for validation, the optimizer-wide scalars such
  as SOAA's trust region, ``num_steps``). ``get_optimizer_state_dict`` keeps only ``state`` and
  ``param_groups``, so those scalars ride in a group; a string is one DCP entry whatever its keys.

DCP loads into the tensors of the *destination* state dict, so a fresh optimizer must already show
every key with its shape. torch gets that by a zero-gradient ``step()`` (``_init_optim_state``), which
our optimizers cannot take (SOAA needs a loss; any step would move the trust region and counters).
Instead, a block without state appears with zeros of its full schema (:func:`block_schema`, ``step``
0), and the optimizer keeps an (empty) entry per parameter so that torch's ``if optim.state`` sees an
initialised optimizer and skips its step. On load, a block whose ``step`` is 0 gets no state: zero
state is exactly "no state" for every optimizer here (ASGO recomputes its root at the first step).

:func:`block_schema` knows each optimizer's state keys; :func:`dcp_state_dict` checks every real
block against it, so a new state key fails loudly here instead of being silently dropped by DCP.
Without DTensor parameters the optimizers keep their own world-size independent format
(:mod:`lightning_soaa.distributed.checkpoint`), with the same placeholders for DCP
(:mod:`lightning_soaa.optim.dcp_plain`). torch's flattened form (``StateDictOptions(
flatten_optimizer_state_dict=True)``, torchtitan's) is either of these, flattened and rebuilt by
:mod:`lightning_soaa.optim.dcp_flat`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_soaa.distributed.blocks import BlockInfo
from lightning_soaa.distributed.checkpoint import (
    FORMAT_KEY,
    build_state_dict,
    check_block_steps,
    commit_groups,
    group_record,
    holds_state,
    loaded_groups,
    restored_groups,
    steps_limit,
    validate_state_dict,
)
from lightning_soaa.distributed.dtensor import _contiguous_stride, is_dtensor, local
from lightning_soaa.optim.dcp_plain import placeholder_schema, without_placeholders

if TYPE_CHECKING:
    from lightning_soaa.optim.base import ShardedOptimizer

__all__ = ["block_schema", "dcp_state_dict", "hold_state_entries", "is_dcp_state_dict", "load_torch_form",
           "options_unread", "refuse_reordered_groups", "saved_param_groups"]

log = logging.getLogger(__name__)

#: key -> (sharded like the parameter, local shape, dtype)
Schema = dict[str, tuple[bool, tuple[int, ...], torch.dtype]]


def _name(opt: ShardedOptimizer) -> str:
    return type(opt).__name__


#: Each optimizer's group options as DCP support first saved them (428b4d7), the only ones kept as keys of
#: their own in the param groups. ``dcp.load`` fills the destination state dict key by key and refuses a
#: checkpoint that lacks one of its keys, so an option added since (ASGO's ``batch_dims``, ``row_parts``,
#: ``root_tol``, ``root_max_every``; the elementwise ``max_block_numel``) made every older checkpoint
#: unloadable ("Missing key in checkpoint state_dict: optim.param_groups.0.row_parts", found by an upgrade
#: hunt; torch's own AdamW hit the same, pytorch#146157). The others, and every option added from now on,
#: ride in the JSON metadata (one key whatever it holds); an older checkpoint that lacks one keeps the
#: optimizer's current value (except an ``absent_key_values`` option, ASGO's ``nesterov``: the value the versions
#: without it ran), and the block layout, saved beside, is checked as before. Never add to these.
_DCP_FLAT_OPTIONS: dict[str, frozenset[str]] = {
    "SOAA": frozenset({"lr", "betas", "eps", "weight_decay"}),
    "ShardedAdamW": frozenset({"lr", "betas", "eps", "weight_decay"}),
    "ASGO": frozenset({"lr", "betas", "eps", "weight_decay", "adam_betas", "adam_eps", "adam_weight_decay",
                       "damping", "inverse_root", "max_block_size", "rms_scale", "root_every", "root_iters",
                       "use_asgo"}),
    "DASGO": frozenset({"lr", "betas", "eps", "weight_decay", "adam_betas", "adam_eps", "adam_weight_decay",
                        "rms_scale", "use_asgo"}),
}


_JSON_SCALARS = (int, float, str, bool, type(None))


#: Options added after the DCP form began to keep its options in the metadata (``group_options``), with the
#: value every earlier version ran: a checkpoint of the older form, which lacks them, loaded into an optimizer
#: built with that value loses nothing, so :func:`_warn_options_unread` does not name them (another value is
#: named: the resumed run then differs from the saved one on purpose or by mistake).
_ADDED_SINCE: dict[str, Any] = {"max_grad_norm": None}


def _json_options(opt: ShardedOptimizer) -> set[str]:
    """The group options of ``opt`` saved in the JSON metadata (see :data:`_DCP_FLAT_OPTIONS`; a subclass
    has its base's flat ones, an optimizer without an entry none). Keys that are not its options (a
    scheduler's ``initial_lr``, a user's own) stay flat, as torch keeps them."""
    flat = next((_DCP_FLAT_OPTIONS[c.__name__] for c in type(opt).__mro__ if c.__name__ in _DCP_FLAT_OPTIONS),
                frozenset())
    return (set(opt.defaults) | set(opt._block_option_keys())) - flat


def block_schema(opt: ShardedOptimizer, block: BlockInfo, group: dict[str, Any] | None = None) -> Schema:
    """The state keys of ``block`` after its first step, with this rank's shapes and dtypes (under
    ``group``'s hyperparameters when given, else its own group's)."""
    from lightning_soaa.functional.asgo import LEFT
    from lightning_soaa.optim.adamw import ShardedAdamW, moment_dtype
    from lightning_soaa.optim.asgo import DASGO, GRAM_AT_ROOT, MATRIX_STEP_DTYPE, ROOT_STEP, _matrix_shape, _OneSided
    from lightning_soaa.optim.base import BlockView
    from lightning_soaa.optim.soaa import SOAA

    p = opt._params[block.param_index]
    view = _piece(opt, block)
    # the options the blocks were built with (one written into a group since is refused at the next step)
    group = opt._group_as_built(block.group_index) if group is None else group
    name = opt._names[block.param_index]
    step = (False, (), torch.float32)
    if isinstance(opt, _OneSided) and opt.is_matrix_param(p, group, name):
        m, n = _matrix_shape(view.shape, opt._batched(block))  # this rank's rows; an expert: shape[1] x rest
        sdt = opt._state_dtype(view)
        if isinstance(opt, DASGO):
            return {"step": step, "exp_avg": (True, (m, n), sdt), "col_stat": (False, (n,), sdt)}
        bv = BlockView(block=block, param=view, grad=None, state={}, group=group, name=name)
        k = m if opt._side_of(bv, m, n) == LEFT else n  # the side ASGO's own step picks
        step = (False, (), MATRIX_STEP_DTYPE)  # a float32 count saved before it was widened converts on load
        out: Schema = {"step": step, "exp_avg": (True, (m, n), sdt), "gram": (False, (k, k), sdt),
                       "inv_root": (False, (k, k), sdt), "root_fallbacks": (False, (), torch.int64)}
        if group["root_every"] == "auto":  # the statistic and step of the current root, kept for "auto"
            out.update({GRAM_AT_ROOT: (False, (k, k), sdt), ROOT_STEP: (False, (), MATRIX_STEP_DTYPE)})
        return out
    if isinstance(opt, (SOAA, ShardedAdamW, _OneSided)):  # Adam's moments (ASGO/DASGO: the fallback)
        shape, mdt = tuple(int(s) for s in view.shape), moment_dtype(view.dtype)  # float16: float32 moments
        return {"step": step, "exp_avg": (True, shape, mdt), "exp_avg_sq": (True, shape, mdt)}
    raise ValueError(f"{_name(opt)}: no DCP state schema for this optimizer (DTensor checkpoints support "
                     "SOAA, ShardedAdamW, ASGO and DASGO).")


def _piece(opt: ShardedOptimizer, block: BlockInfo) -> Tensor:
    """This rank's view of ``block`` in its parameter; for a block cut across the shards (an expert of an
    FSDP2 stack, whole on its holder, maybe another rank) a meta tensor of its shape: the schema reads
    shapes and dtypes only, and every rank must read the same."""
    p = opt._params[block.param_index]
    if opt._dtensor is not None and opt._dtensor.cut_across(block):
        return torch.empty(block.shape, dtype=p.dtype, device="meta")
    return block.view(local(p))  # type: ignore[arg-type]


def _stacks(opt: ShardedOptimizer) -> dict[int, list[BlockInfo]]:
    """``param_index -> its blocks`` for the parameters cut across the shards (ASGO's ``batch_dims=1``
    stacks under FSDP2: one block per index of dim 0, in order), whose state is saved stacked."""
    layout = opt._dtensor
    if layout is None:
        return {}
    out: dict[int, list[BlockInfo]] = {}
    for pi, blocks in enumerate(opt.block_table.by_param):
        cut = [layout.cut_across(b) for b in blocks]
        if not any(cut):
            continue
        if not all(cut) or [(b.start, b.stop) for b in blocks] != [(i, i + 1) for i in range(len(blocks))]:
            raise RuntimeError(f"{_name(opt)}: parameter #{pi} is cut across its shards other than one block "
                               "per index of dim 0; its DCP state has no stacked form (internal).")
        out[pi] = blocks
    return out


def hold_state_entries(opt: ShardedOptimizer) -> None:
    """An (empty) state entry per parameter, the same as the first access of ``opt.state[p]`` creates:
    torch's ``_init_optim_state`` then sees an initialised optimizer and does not step it."""
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p]  # defaultdict access creates the entry


def _real_state(opt: ShardedOptimizer, block: BlockInfo) -> dict[str, Any]:
    st = opt.state.get(opt._params[block.param_index], {})
    if block.dim is not None:
        return dict(st.get(block.sub_index, {}))
    return {k: v for k, v in st.items() if not isinstance(k, int)}


def _global_shape(opt: ShardedOptimizer, block: BlockInfo, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The full shape of a parameter-like state tensor whose local piece has ``shape``."""
    layout = opt._dtensor
    assert layout is not None
    loc, glob = layout._block_shapes(block)
    if shape == loc:
        return glob
    if set(layout.placements[block.param_index].sharded_dims) <= {0} and shape[:1] == loc[:1]:
        return (glob[0],) + shape[1:]  # rows x rest form of a row-sharded block
    raise ValueError(f"{_name(opt)}: state {key!r} of block {block.key} has local shape {shape}, which is "
                     f"neither the block's local shape {loc} nor a row-sharded matrix form of it.")


def _wrap(opt: ShardedOptimizer, block: BlockInfo, key: str, t: Tensor) -> Any:
    from torch.distributed.tensor import DTensor

    p = opt._params[block.param_index]
    if not is_dtensor(p):
        return t
    glob = _global_shape(opt, block, key, tuple(int(s) for s in t.shape))
    return DTensor.from_local(t.contiguous(), p.device_mesh, p.placements, run_check=False,  # type: ignore[attr-defined]
                              shape=torch.Size(glob), stride=_contiguous_stride(glob))


def _device(shape: tuple[int, ...], param_device: torch.device) -> torch.device:
    """Where the optimizers keep a state tensor: counters (0-d) on the CPU, the rest with the parameter."""
    return torch.device("cpu") if shape == () else param_device


def _optional_keys(opt: ShardedOptimizer, block: BlockInfo) -> set[str]:
    """The state keys a stepped block may lack (ASGO's ``inv_root`` after a step whose Gram was all zero,
    which :func:`_block_entry` saves as zeros: DCP needs every key; none of them is all zero when held)."""
    fields = opt._block_schema(block) or {}
    return {k for k, f in fields.items() if not f.required}


def _without_zero_optional(opt: ShardedOptimizer, block: BlockInfo, vals: dict[str, Tensor]) -> dict[str, Tensor]:
    """A loaded block's state with the optional keys that were saved as zeros (absent) left out again."""
    optional = _optional_keys(opt, block)
    return {k: v for k, v in vals.items() if k not in optional or bool(v.ne(0).any())}


def _block_entry(opt: ShardedOptimizer, block: BlockInfo) -> dict[str, Any]:
    schema = block_schema(opt, block)
    real = _real_state(opt, block)
    dev = local(opt._params[block.param_index]).device  # type: ignore[union-attr]
    # no state yet: zeros of the full schema (step 0 == no state on load); an optional key the block does
    # not hold now (inv_root after an all-zero Gram): zeros, left out again on load. It raised here, and for
    # a stack's expert on its holder alone while the other ranks went on into the save
    missing = set(schema) if not real else (set(schema) - set(real)) & _optional_keys(opt, block)
    real = {**{k: torch.zeros(schema[k][1], dtype=schema[k][2], device=_device(schema[k][1], dev)) for k in missing},
            **real}
    if set(real) != set(schema):
        raise RuntimeError(f"{_name(opt)}: block {block.key} holds state keys {sorted(real)}, the DCP schema "
                           f"expects {sorted(schema)}; update lightning_soaa.optim.dcp_state.block_schema.")
    out = {}
    for k, (sharded, shape, dt) in schema.items():
        t = real[k]
        if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != dt:
            got = (tuple(t.shape), t.dtype) if isinstance(t, Tensor) else type(t)
            raise RuntimeError(f"{_name(opt)}: state {k!r} of block {block.key} is {got}, the DCP schema "
                               f"expects {(shape, dt)}; update lightning_soaa.optim.dcp_state.block_schema.")
        # a block cut across the shards is whole here: stacked with its parameter's others (_stack_entry)
        out[k] = _wrap(opt, block, k, t) if sharded and not opt._dtensor.cut_across(block) else t  # type: ignore[union-attr]
    return out


def _stack_entry(opt: ShardedOptimizer, pi: int, blocks: list[BlockInfo]) -> dict[str, Any]:
    """The state of a stack's experts as one entry: every key a DTensor ``[E, ...]`` with the stack's
    placements (``Shard(0)``), each rank holding its experts' rows (zeros of an expert without state:
    ``step`` 0 loads as no state). DCP reshards it like the stack, so each rank of another world size
    reads the rows of the experts it holds there."""
    from torch.distributed.tensor import DTensor

    p: Any = opt._params[pi]  # a DTensor (only DTensors are cut across shards)
    schema = block_schema(opt, blocks[0])  # the same for every expert of the stack
    held = [_block_entry(opt, b) for b in opt._owned if b.param_index == pi]
    dev = local(p).device  # type: ignore[union-attr]
    out: dict[str, Any] = {}
    for k, (_, shape, dt) in schema.items():
        rows = (torch.stack([e[k].to(dev) for e in held]) if held
                else torch.zeros((0, *shape), dtype=dt, device=dev))
        glob = (len(blocks), *shape)
        out[k] = DTensor.from_local(rows.contiguous(), p.device_mesh, p.placements, run_check=False,
                                    shape=torch.Size(glob), stride=_contiguous_stride(glob))
    return out


def dcp_state_dict(opt: ShardedOptimizer, keep_options: bool = False) -> dict[str, Any]:
    """torch's optimizer state dict shape, with DTensor state (see the module docstring). A collective
    where the optimizer-wide state needs one (SOAA's pending sums): call it on every rank. ``keep_options``:
    every option a key of its own in the groups, none moved into the metadata (for torch's flattened form,
    :mod:`~lightning_soaa.optim.dcp_flat`, whose load needs each key the live groups hold)."""
    state: dict[int, dict[str, Any]] = {}
    stacks = _stacks(opt)
    for pi, blocks in stacks.items():
        state[pi] = _stack_entry(opt, pi, blocks)
    for b in opt._owned:  # every rank holds (its piece of) every block but the stacks' experts
        if b.param_index in stacks:
            continue
        entry = _block_entry(opt, b)
        if b.dim is None:
            state[b.param_index] = entry
        else:
            state.setdefault(b.param_index, {})[f"block{b.sub_index}"] = entry
    glob = {**opt._global_state(), "num_steps": opt.num_steps, "skipped_steps": opt.skipped_steps}
    sd = build_state_dict(opt._checkpoint_view(), {}, glob)
    meta = sd.pop(FORMAT_KEY)
    del meta["blocks_with_state"]  # counted from no blocks here: the DCP form has an entry for every block
    meta["form"] = "dcp"
    moved = set() if keep_options else _json_options(opt)
    # plain JSON scalars only (a subclass's tuple would come back a list, a dtype not at all: kept as keys)
    record = group_record(opt._groups_as_built(), opt._meta_options)  # (the options saved_groups leaves out)
    meta["group_keys"] = record["group_keys"]
    meta["group_options"] = [{**kept, **{k: g.pop(k) for k in sorted(moved & set(g)) if type(g[k]) in _JSON_SCALARS}}
                             for kept, g in zip(record["group_options"], sd["param_groups"])]
    if sd["param_groups"]:
        sd["param_groups"][0][FORMAT_KEY] = json.dumps(meta)
    sd["state"] = state
    return sd


def is_dcp_state_dict(sd: Any) -> bool:
    """Whether ``sd`` is :func:`dcp_state_dict`'s shape (our JSON metadata in the first param group)."""
    groups = sd.get("param_groups") if isinstance(sd, dict) else None
    if not groups or not isinstance(groups, list) or not isinstance(groups[0], dict):
        return False
    return isinstance(groups[0].get(FORMAT_KEY), str)


def refuse_reordered_groups(name: str, sd: Any) -> None:
    """Raise ``ValueError`` where our JSON metadata sits in a later param group than the first: torch's
    ``set_optimizer_state_dict`` rebuilds an unflattened state dict group by group in the *destination's*
    order (matching the saved groups by parameter name), so a destination whose groups were built in another
    order than saved carries the saved first group's keys, the metadata among them, in another group. Where
    the metadata records the saved order, :mod:`~lightning_soaa.optim.dcp_order` put it into the
    destination's order before; a checkpoint written earlier does not record it, and its group options and
    block layout, in the saved order, cannot be matched safely; before, such a dict was refused as "not a
    lightning_soaa optimizer state". Deterministic in the dict alone: every rank, handed the same dict,
    raises together, before anything changes."""
    groups = sd.get("param_groups") if isinstance(sd, dict) and FORMAT_KEY not in sd else None
    if not groups or not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return
    holder = next((i for i, g in enumerate(groups) if isinstance(g.get(FORMAT_KEY), str)), None)
    if holder is None or holder == 0:
        return
    first = list(groups[holder].get("params", []))
    raise ValueError(
        f"{name}.load_state_dict: the checkpoint's param groups are in another order than this optimizer's (or "
        f"grouped otherwise): its first param group (which holds the lightning_soaa metadata) is this optimizer's "
        f"param_groups[{holder}] (parameters {first[:3]}{' ...' if len(first) > 3 else ''}), as torch's "
        "set_optimizer_state_dict matched them by parameter name. The saved group options and block layout "
        "follow the saved order, so this state cannot be loaded into these groups. Build the optimizer's param "
        "groups in the order they were saved (the group holding those parameters first), load, and then "
        "continue. Nothing was loaded.")


def _keys_to_index(opt: ShardedOptimizer, groups: list[dict[str, Any]]) -> dict[Any, int]:
    """Saved ``params`` entries (indices, or FQNs after ``set_optimizer_state_dict``) -> our parameter
    index, by position (torch's rule: the groups list the parameters in the optimizer's order)."""
    keys = [k for g in groups for k in g["params"]]
    return {k: i for i, k in enumerate(keys)}


def _local_value(opt: ShardedOptimizer, block: BlockInfo, key: str, v: Any, sharded: bool) -> Tensor:
    """This rank's piece of a loaded value: a DTensor's local tensor, or a plain (replicated) tensor."""
    p: Any = opt._params[block.param_index]  # a DTensor where it matters (typed as Tensor)
    if is_dtensor(v):
        if not sharded or not is_dtensor(p) or tuple(v.placements) != tuple(p.placements) \
                or v.device_mesh != p.device_mesh:
            raise ValueError(f"{_name(opt)}.load_state_dict: state {key!r} of block {block.key} is a DTensor "
                             f"with placements {tuple(v.placements)}; expected those of its parameter.")
        local_piece: Tensor = v.to_local()
        return local_piece
    if not isinstance(v, Tensor):
        raise TypeError(f"{_name(opt)}.load_state_dict: state {key!r} of block {block.key} is a "
                        f"{type(v).__name__}, expected a tensor.")
    if sharded and is_dtensor(p):
        raise ValueError(f"{_name(opt)}.load_state_dict: state {key!r} of block {block.key} is a plain tensor "
                         f"of shape {tuple(v.shape)}; under DTensor parameters it must be a DTensor sharded "
                         "like its parameter. Load a full (gathered) optimizer state with torch's "
                         "set_optimizer_state_dict(..., options=StateDictOptions(full_state_dict=True, "
                         "broadcast_from_rank0=True)), which shards it.")
    return v


def _entry_keys(opt: ShardedOptimizer, pi: int, stacks: dict[int, list[BlockInfo]]) -> set[str]:
    """The keys :func:`dcp_state_dict` gives parameter ``pi``'s entry: its block's state keys (a whole
    parameter, or a stack's stacked keys), else ``"block<sub_index>"`` per block."""
    blocks = stacks.get(pi) or opt.block_table.by_param[pi]
    if pi in stacks or (len(blocks) == 1 and blocks[0].dim is None):
        return set(block_schema(opt, blocks[0]))
    return {f"block{b.sub_index}" for b in blocks}


def _check_entry_keys(opt: ShardedOptimizer, by_index: dict[int, Any], stacks: dict[int, list[BlockInfo]]) -> None:
    """Raise where an entry holds keys the load would not read: they were dropped while the rest loaded
    (a consolidated checkpoint's per-block entries restarted the optimizer from scratch, silently). Every
    rank sees the whole state dict: the same verdict everywhere."""
    for pi, entry in by_index.items():
        label = opt._names[pi] or f"#{pi}"
        if not isinstance(entry, dict):
            raise ValueError(f"{_name(opt)}.load_state_dict: the state of parameter {label} is a "
                             f"{type(entry).__name__}; expected a dict.")
        allowed = _entry_keys(opt, pi, stacks)
        bad = sorted(str(k) for k in entry if k not in allowed)
        if bad:
            raise ValueError(f"{_name(opt)}.load_state_dict: the state of parameter {label} has key(s) {bad}, "
                             f"which this optimizer's torch.distributed.checkpoint form does not hold (it holds "
                             f"{sorted(allowed)}); they would be dropped. Nothing was loaded.")


def _loaded_blocks(opt: ShardedOptimizer, sd: dict[str, Any],
                   limit: float) -> dict[tuple[int, int], dict[str, Tensor]]:
    """Validated local state per block (placeholders, step 0, left out); ``limit``: the most steps a
    block can have taken (its optimizer's). Changes nothing."""
    index = _keys_to_index(opt, sd["param_groups"])
    by_index = {index[k]: v for k, v in sd["state"].items() if k in index}
    unknown = [k for k in sd["state"] if k not in index]
    if unknown:
        raise ValueError(f"{_name(opt)}.load_state_dict: state for {unknown[:3]} is not listed in any "
                         "param group's 'params'.")
    stacks = _stacks(opt)
    _check_entry_keys(opt, by_index, stacks)
    out: dict[tuple[int, int], dict[str, Tensor]] = {}
    if stacks:
        out.update(_loaded_stacks(opt, stacks, by_index, limit))
    for b in opt._owned:
        if b.param_index in stacks:
            continue
        entry = by_index.get(b.param_index, {})
        blk = entry if b.dim is None else entry.get(f"block{b.sub_index}", {})
        if not blk:
            continue
        schema = block_schema(opt, b)
        if not isinstance(blk, dict) or set(blk) != set(schema):
            got = sorted(map(str, blk)) if isinstance(blk, dict) else type(blk).__name__
            raise ValueError(f"{_name(opt)}.load_state_dict: block {b.key} has state keys {got}; "
                             f"expected {sorted(schema)}.")
        dev = local(opt._params[b.param_index]).device  # type: ignore[union-attr]
        vals: dict[str, Tensor] = {}
        for k, (sharded, shape, dt) in schema.items():
            t = _local_value(opt, b, k, blk[k], sharded)
            if tuple(t.shape) != shape:
                raise ValueError(f"{_name(opt)}.load_state_dict: state {k!r} of block {b.key} has local shape "
                                 f"{tuple(t.shape)} on rank {opt.comm.rank}; expected {shape}.")
            vals[k] = t.detach().to(device=_device(shape, dev), dtype=dt, copy=True)
        check_block_steps(f"{_name(opt)}.load_state_dict: block {b.key}", vals, limit)
        if float(vals["step"]) != 0.0:
            out[b.key] = _without_zero_optional(opt, b, vals)
    return out


def _stack_rows(opt: ShardedOptimizer, pi: int, key: str, v: Any, shape: tuple[int, ...]) -> Tensor:
    """This rank's rows of a loaded stacked value (:func:`_stack_entry`), checked to be a DTensor of the
    stack's global ``shape`` sharded like the stack."""
    p: Any = opt._params[pi]
    label = opt._names[pi] or f"#{pi}"
    if not is_dtensor(v):
        raise ValueError(f"{_name(opt)}.load_state_dict: state {key!r} of the stacked experts {label} is a "
                         f"{type(v).__name__}; under FSDP2 it must be a DTensor of shape {shape} sharded like the "
                         "stack. Load a full (gathered) optimizer state with torch's set_optimizer_state_dict(..., "
                         "options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)), which shards it.")
    if tuple(v.shape) != shape or tuple(v.placements) != tuple(p.placements) or v.device_mesh != p.device_mesh:
        raise ValueError(f"{_name(opt)}.load_state_dict: state {key!r} of the stacked experts {label} is a DTensor "
                         f"of shape {tuple(v.shape)} with placements {tuple(v.placements)}; expected shape {shape} "
                         f"with the stack's placements {tuple(p.placements)} on its mesh.")
    rows: Tensor = v.to_local()
    return rows


def _loaded_stacks(opt: ShardedOptimizer, stacks: dict[int, list[BlockInfo]], by_index: dict[int, Any],
                   limit: float) -> dict[tuple[int, int], dict[str, Tensor]]:
    """:func:`_loaded_stack` of every stack. A rank sees only its own experts' values (a step count ahead
    of the optimizer's): :func:`load_torch_form` gives every rank one verdict."""
    out: dict[tuple[int, int], dict[str, Tensor]] = {}
    for pi, blocks in stacks.items():
        out.update(_loaded_stack(opt, pi, blocks, by_index.get(pi, {}), limit))
    return out


def _loaded_stack(opt: ShardedOptimizer, pi: int, blocks: list[BlockInfo], entry: dict[str, Any],
                  limit: float) -> dict[tuple[int, int], dict[str, Tensor]]:
    """The validated state of the experts this rank holds of a stack saved by :func:`_stack_entry` (at
    any world size: DCP read the rows of this rank's experts into the destination's DTensors)."""
    if not entry:
        return {}
    schema = block_schema(opt, blocks[0])
    if set(entry) != set(schema):
        raise ValueError(f"{_name(opt)}.load_state_dict: the stacked experts {opt._names[pi] or f'#{pi}'} have "
                         f"state keys {sorted(entry)}; expected {sorted(schema)}.")
    rows = {k: _stack_rows(opt, pi, k, entry[k], (len(blocks), *shape)) for k, (_, shape, _) in schema.items()}
    start = opt._dtensor.rows(pi)[0]  # type: ignore[union-attr]
    dev = local(opt._params[pi]).device  # type: ignore[union-attr]
    out: dict[tuple[int, int], dict[str, Tensor]] = {}
    for b in opt._owned:
        if b.param_index != pi:
            continue
        vals = {k: rows[k][b.start - start].detach().to(device=_device(shape, dev), dtype=dt, copy=True)
                for k, (_, shape, dt) in schema.items()}
        check_block_steps(f"{_name(opt)}.load_state_dict: block {b.key}", vals, limit)
        if float(vals["step"]) != 0.0:
            out[b.key] = _without_zero_optional(opt, b, vals)
    return out


def _check_kept_keys(opt: ShardedOptimizer, new_groups: list[dict[str, Any]]) -> None:
    """Raise when the checkpoint's hyperparameters keep other state keys than this optimizer's (ASGO's
    ``root_every="auto"`` keeps ``gram_at_root``/``root_step``). DCP fills only the keys of this optimizer's
    placeholders, so such a load took the checkpoint's groups without their state: ASGO saved with "auto"
    and resumed with ``root_every=2`` recomputed its roots early, 2.4e-3 off the uninterrupted run.
    Every block of the table, held here or not: the same verdict on every rank."""
    for b in opt.block_table.blocks:
        mine, theirs = block_schema(opt, b), block_schema(opt, b, new_groups[b.group_index])
        if set(mine) != set(theirs):
            cur = opt.param_groups[b.group_index]
            diff = {k: (v, cur.get(k)) for k, v in new_groups[b.group_index].items()
                    if k not in ("params", "param_names", "lr") and v != cur.get(k)}
            raise ValueError(
                f"{_name(opt)}.load_state_dict: the checkpoint's param_groups[{b.group_index}] keep state "
                f"{sorted(theirs)}, this optimizer's {sorted(mine)}, and torch.distributed.checkpoint loads only "
                f"the keys this optimizer holds. Build it with the checkpoint's hyperparameters (saved vs here: "
                f"{', '.join(f'{k}={a!r} vs {c!r}' for k, (a, c) in diff.items())}), load, then change them.")


def _group_meta(opt: ShardedOptimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """Our metadata from its JSON copy in ``param_groups[0]``."""
    try:
        meta = json.loads(sd["param_groups"][0][FORMAT_KEY])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{_name(opt)}.load_state_dict: param_groups[0][{FORMAT_KEY!r}] is not our JSON "
                         f"metadata ({e}).") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{_name(opt)}.load_state_dict: param_groups[0][{FORMAT_KEY!r}] is not our JSON "
                         f"metadata (a JSON {type(meta).__name__}).")
    return meta


def _is_block_index(key: Any) -> bool:
    return (isinstance(key, int) and not isinstance(key, bool)) or (isinstance(key, str) and key.isdigit())


def _nested_entries(sd: dict[str, Any]) -> dict[Any, dict[int, Any]]:
    """Our consolidated format's per-block entries inside torch's form: ``state[param][block index]``
    (an int, or its string: torch's flatten/unflatten in set_optimizer_state_dict makes every key one)."""
    out: dict[Any, dict[int, Any]] = {}
    for key, entry in sd["state"].items():
        if isinstance(entry, dict):
            blocks = {int(k): v for k, v in entry.items() if _is_block_index(k) and isinstance(v, dict)}
            if blocks:
                out[key] = blocks
    return out


def saved_param_groups(opt: ShardedOptimizer, sd: dict[str, Any]) -> Any:
    """A state dict's param groups as saved: :func:`dcp_state_dict`'s with the options it keeps in the
    metadata put back; any other form's as they are (also a malformed one, left to the validation)."""
    if is_dcp_state_dict(sd):
        try:
            return _plain_groups(opt, sd, _group_meta(opt, sd))
        except ValueError:
            pass  # malformed: the full validation says so
    return sd.get("param_groups") if isinstance(sd, dict) else None


def options_unread(opt: ShardedOptimizer, sd: Any) -> bool:
    """Whether ``sd`` is a DCP form written before its options rode in the metadata: ``dcp.load`` then
    filled only this version's keys, so the options :func:`_json_options` moves were not read (the
    checkpoint may hold them as keys of their own, or not at all)."""
    if not is_dcp_state_dict(sd):
        return False
    try:
        return _predates_group_options(_group_meta(opt, sd))
    except ValueError:
        return False  # malformed: the full validation says so


def _predates_group_options(meta: dict[str, Any]) -> bool:
    # (our consolidated form after torch rebuilt it carries the metadata there too: its groups are whole)
    return meta.get("form") == "dcp" and "group_options" not in meta


def _warn_options_unread(opt: ShardedOptimizer, groups: list[dict[str, Any]]) -> None:
    """Say which options of this optimizer's groups a DCP checkpoint of an earlier version could not give
    (:func:`options_unread`), and the values kept: the run continues with them, which a run that set other
    values must know. The blocking options are left out: the block layout, saved beside, checks them."""
    moved = _json_options(opt) - set(opt._block_option_keys()) - set(opt.absent_key_values)

    def said(g: dict[str, Any]) -> list[str]:
        # an option no version of that form had, kept at the value those versions ran, changes nothing
        return sorted(k for k in moved & set(g) if k not in _ADDED_SINCE or g[k] != _ADDED_SINCE[k])

    kept = [f"param_groups[{i}]: " + ", ".join(f"{k}={g[k]!r}" for k in said(g))
            for i, g in enumerate(groups) if said(g)]
    # the options that version did not have at all load as it ran (loaded_groups' absent values)
    absent = ", ".join(f"{k}={v!r}" for k, v in sorted(opt.absent_key_values.items()))
    if kept:
        log.warning("%s.load_state_dict: this torch.distributed.checkpoint was written by an earlier "
                    "lightning_soaa, which saved these group options as keys of their own or not at all; dcp.load "
                    "reads only the keys this version's state dict has, so they keep the values this optimizer was "
                    "built with (%s)%s. If the run used other values, build the optimizer with them before loading.",
                    _name(opt), "; ".join(kept),
                    f"; the options it did not have load as it ran them ({absent})" if absent else "")


def _plain_groups(opt: ShardedOptimizer, sd: dict[str, Any], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The saved param groups with the options :func:`dcp_state_dict` keeps in the metadata put back (a
    checkpoint older than that has none there: its groups are as saved)."""
    groups = [{k: v for k, v in g.items() if k != FORMAT_KEY} for g in sd["param_groups"]]
    options = meta.get("group_options", [{} for _ in groups])
    if isinstance(options, list) and len(options) != len(groups):
        raise ValueError(f"{_name(opt)}.load_state_dict: the checkpoint has {len(options)} param groups and this "
                         f"optimizer {len(groups)}: build it with the param groups it was saved with.")
    if not (isinstance(options, list) and all(isinstance(o, dict) for o in options)):
        raise ValueError(f"{_name(opt)}.load_state_dict: the metadata's 'group_options' must be one dict per param "
                         f"group; got {options!r}.")
    merged = [{**g, **o} for g, o in zip(groups, options)]
    # without the options a partial dcp.load kept from the destination (the saved keys are recorded)
    return restored_groups(_name(opt), merged, {k: meta[k] for k in ("group_keys",) if k in meta})


def _param_index(opt: ShardedOptimizer, index: dict[Any, int], key: Any) -> int:
    """Our parameter index of a state key (torch's rule: by position in the groups' ``params``; a key
    flattened to its string matches too)."""
    pi = index.get(key, index.get(str(key)))
    if pi is None:
        raise ValueError(f"{_name(opt)}.load_state_dict: state for {key!r} is not listed in any param group's "
                         "'params'.")
    return pi


def _consolidated_from_nested(opt: ShardedOptimizer, sd: dict[str, Any], meta: dict[str, Any],
                              nested: dict[Any, dict[int, Any]]) -> dict[str, Any]:
    """Our consolidated format back from torch's rebuild of it (see :func:`load_torch_form`): its per-block
    entries, keyed by parameter index. The other keys of an entry are the destination's own
    (:func:`dcp_state_dict`'s placeholders, which set_optimizer_state_dict started from) and are replaced
    by the checkpoint; any other key is refused (it would be dropped)."""
    groups = _plain_groups(opt, sd, meta)
    index = {k: i for i, k in enumerate(k for g in groups for k in g["params"])}
    stacks = _stacks(opt)
    state: dict[int, dict[int, Any]] = {}
    for key, entry in sd["state"].items():
        pi = _param_index(opt, index, key)
        own = _entry_keys(opt, pi, stacks) if opt._dtensor is not None else set()
        blocks = nested.get(key, {})
        bad = sorted(str(k) for k in (entry if isinstance(entry, dict) else {"<not a dict>": 0})
                     if k not in own and not (_is_block_index(k) and int(k) in blocks))
        if bad:
            raise ValueError(f"{_name(opt)}.load_state_dict: the state of {key!r} has key(s) {bad}, which are "
                             "neither per-block entries of our consolidated format (block indices) nor this "
                             f"optimizer's own {sorted(own)}; they would be dropped. Nothing was loaded.")
        if blocks:
            state[pi] = blocks
    if "group_keys" not in meta:
        _warn_unrecorded(opt, groups)
    _check_option_keys(opt, groups, meta, state)  # (the keys as they came, before the placeholders go)
    # the destination's placeholders (dcp_plain) that the checkpoint filled with zeros are no state: counted out
    state = without_placeholders(opt, {"state": state, FORMAT_KEY: meta})["state"]
    _check_arrived(opt, meta, state)
    return {"state": state, "param_groups": groups,
            FORMAT_KEY: {k: v for k, v in meta.items() if k not in ("form", "group_options")}}


def _warn_unrecorded(opt: ShardedOptimizer, groups: list[dict[str, Any]]) -> None:
    """Warn where a group of a checkpoint that does not record its groups' keys (written before
    :func:`~lightning_soaa.distributed.checkpoint.group_record`) loads an ``absent_key_values`` option (ASGO's
    ``nesterov``) at the value this optimizer has, not the one a checkpoint without the option gets. torch's
    DCP recipe over plain parameters shows every option as a key of its own, and with
    ``DefaultLoadPlanner(allow_partial_load=True)`` a key the checkpoint lacks keeps the destination's value:
    a checkpoint saved before the option existed (trained with the other rule) then loads this optimizer's
    value, and nothing in it tells the two apart. Without ``allow_partial_load`` torch refuses such a
    checkpoint ("Missing key"), so only a load that allowed it can be wrong."""
    for i, (g, mine) in enumerate(zip(groups, opt.param_groups)):
        for k, v in opt.absent_key_values.items():
            if k in g and k in mine and g[k] == mine[k] != v:
                log.warning(
                    "%s.load_state_dict: param_groups[%d] loads %s=%r, the value this optimizer was built with, "
                    "from a checkpoint in torch's form that does not record which options it saved (lightning_soaa "
                    "before 2026-12-05). If it was loaded by torch.distributed.checkpoint with "
                    "DefaultLoadPlanner(allow_partial_load=True) and saved before the option existed (it then "
                    "lacks the key: the load kept this optimizer's value), it was trained with %s=%r: set "
                    "param_groups[%d][%r] = %r after loading to continue it as saved.",
                    _name(opt), i, k, g[k], k, v, i, k, v)


def _check_option_keys(opt: ShardedOptimizer, groups: list[dict[str, Any]], meta: dict[str, Any],
                       state: dict[int, dict[int, Any]]) -> None:
    """Refuse a state that lost the keys its saved options keep (:func:`_lost_option_keys`), naming the
    options, both values and the remedy. Why: torch's DCP recipe over plain parameters fills only the keys
    the destination shows (:func:`~lightning_soaa.optim.dcp_plain.placeholder_schema`, this optimizer's
    options), and the checkpoint's group values win on load, as in torch: ASGO saved with
    ``root_every="auto"`` and resumed with ``root_every=1`` continued as "auto" without ``gram_at_root`` and
    ``root_step`` (its roots recomputed early: 4.9e-3 off the uninterrupted run; the FSDP2 form refuses this
    in :func:`_check_kept_keys`). Every rank holds the whole state and the same blocks: the same verdict on
    every rank, before anything changes."""
    try:
        # quiet: ahead of the state's validation (another optimizer's state warned about ASGO's nesterov, then
        # was refused), and the load that follows says it (an earlier version's checkpoint warned twice)
        saved = loaded_groups(opt.param_groups, groups, opt._validate_group, keep=opt.layout_keys,
                              absent=opt.absent_key_values, say_absent=False)
    except ValueError:
        return  # a group value this optimizer refuses: the validation's message names it
    for gi, (lost, block) in _lost_option_keys(opt, saved, meta, state).items():
        mine, theirs = opt._group_as_built(gi), saved[gi]
        options = _key_options(opt, block, mine, theirs)
        was = ", ".join(f"{k}={theirs.get(k)!r}" for k in options)
        here = ", ".join(f"{k}={mine.get(k)!r}" for k in options)
        raise ValueError(
            f"{_name(opt)}.load_state_dict: the checkpoint's param_groups[{gi}] were saved with {was}, this "
            f"optimizer has {here}. With {was} its blocks keep state {sorted(lost)}, which did not arrive: "
            "torch.distributed.checkpoint's load fills only the keys the destination's state dict shows, and this "
            f"optimizer's ({here}) shows none of them. The checkpoint's values win on load (as in torch), so the "
            f"run would continue with {was} without that state, not as saved. Build the optimizer with {was}, "
            "load, then change the value in param_groups if you mean to; or save and load the optimizer's own "
            "state dict (torch.save / load_state_dict), which keeps every key. Nothing was loaded.")


def _lost_option_keys(opt: ShardedOptimizer, saved: list[dict[str, Any]], meta: dict[str, Any],
                      state: dict[int, dict[int, Any]]) -> dict[int, tuple[set[str], BlockInfo]]:
    """Per group: the state keys its saved options keep and this optimizer's do not (with a block that
    keeps them), where the checkpoint holds state for the group and none of those keys came with it. A
    destination shows every key of its options in every block of a trainable parameter (zeros where it has
    none), so through DCP such keys arrive in no block at all; a state torch rebuilt from our own format
    (``set_optimizer_state_dict`` of a state dict, no DCP) brings them, and loads. Frozen parameters show
    nothing (torch leaves their state out, :func:`_check_arrived` says so)."""
    counts = meta.get("blocks_with_state")
    counts = counts if isinstance(counts, list) and len(counts) == len(opt._params) else None
    extra: dict[int, set[str]] = {}
    where: dict[int, BlockInfo] = {}
    for b in opt.block_table.blocks:
        gi = b.group_index
        if gi >= len(saved) or not opt._params[b.param_index].requires_grad:
            continue
        keys = set(placeholder_schema(opt, b, saved[gi])) - set(placeholder_schema(opt, b))
        if keys:
            extra.setdefault(gi, set()).update(keys)
            where.setdefault(gi, b)
    out: dict[int, tuple[set[str], BlockInfo]] = {}
    for gi, keys in extra.items():
        params = {b.param_index for b in opt.block_table.blocks
                  if b.group_index == gi and opt._params[b.param_index].requires_grad}
        blocks = [blk for pi in params for blk in state.get(pi, {}).values() if isinstance(blk, dict)]
        held = (any(isinstance(counts[pi], int) and counts[pi] > 0 for pi in params) if counts is not None
                else any(holds_state(blk) for blk in blocks))
        if held and not keys & {k for blk in blocks for k in blk}:
            out[gi] = (keys, where[gi])
    return out


def _key_options(opt: ShardedOptimizer, block: BlockInfo, mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """The options whose saved value alone changes ``block``'s keys (ASGO's ``root_every``, EGN's
    ``momentum``), else every option that differs."""
    differ = [k for k in theirs if k not in ("params", "param_names", FORMAT_KEY) and theirs[k] != mine.get(k)]
    keys = set(placeholder_schema(opt, block, mine))
    deciding = [k for k in differ if set(placeholder_schema(opt, block, {**mine, k: theirs[k]})) != keys]
    return deciding or differ


def _steps_of_meta(meta: dict[str, Any]) -> int:
    glob = meta.get("global")
    steps = glob.get("num_steps", 0) if isinstance(glob, dict) else 0
    return steps if isinstance(steps, int) else 0


def _check_arrived(opt: ShardedOptimizer, meta: dict[str, Any], state: dict[int, dict[int, Any]]) -> None:
    """Refuse a rebuilt state that lost per-block entries on the way. Why: ``dcp.load`` fills only the
    tensors the destination state dict already shows. Over plain (non-DTensor) parameters a fresh
    optimizer's state dict showed none before :mod:`~lightning_soaa.optim.dcp_plain` (torch's recipe makes
    them by a zero-gradient step, which these optimizers do not take), so torch's DCP recipe brought the step
    counts back and no state: the run continued on fresh moments, silently. A destination built otherwise can
    still lack them. torch's tools also leave out the state of parameters without ``requires_grad`` (as for
    torch's optimizers): those start afresh, with a warning. Checkpoints from before the counts were saved
    are not checked."""
    saved, steps = meta.get("blocks_with_state"), _steps_of_meta(meta)
    if saved is None and not state and steps > 0:
        log.warning("%s.load_state_dict: a checkpoint of %d step(s) (saved before its blocks were counted) "
                    "brought no per-parameter state. If it had some (every optimizer here but EGN without "
                    "momentum), it was lost on the way: torch.distributed.checkpoint's load over plain "
                    "(non-FSDP2) parameters fills only what a fresh optimizer shows, nothing. Load the "
                    "optimizer's own state dict instead (torch.save / load_state_dict).", _name(opt), steps)
    if not isinstance(saved, list) or len(saved) != len(opt._params):
        return
    missing: list[str] = []
    frozen: list[str] = []
    for pi, n in enumerate(saved):
        if isinstance(n, int) and len(state.get(pi, {})) < n:
            label = repr(opt._names[pi]) if opt._names[pi] else f"#{pi}"
            (missing if opt._params[pi].requires_grad else frozen).append(label)
    if frozen:
        log.warning("%s.load_state_dict: the state of %s (requires_grad=False) did not come with the checkpoint "
                    "(torch's state-dict tools leave frozen parameters out); unfrozen, they start afresh.",
                    _name(opt), ", ".join(frozen[:5]) + (" ..." if len(frozen) > 5 else ""))
    if missing:
        raise ValueError(
            f"{_name(opt)}.load_state_dict: the checkpoint holds state for parameter(s) "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} that did not arrive. "
            "torch.distributed.checkpoint's load fills only the tensors the destination's state dict shows, and "
            "this one showed none for them: build the destination with get_optimizer_state_dict(model, opt) of "
            "this version's optimizer (over plain parameters at W > 1 after opt.consolidate_state_dict(to=None)), "
            "or save and load the optimizer's own state dict with torch.save / load_state_dict. Nothing was "
            "loaded.")


def _dcp_blocks(opt: ShardedOptimizer, key: Any, entry: Any) -> dict[int, dict[str, Any]]:
    """The blocks of one entry of :func:`dcp_state_dict`'s form holding full (gathered) tensors: a whole
    parameter's block (sub-index 0), ``"block<i>"`` entries, or a stack's rows (``step`` of shape [E])."""
    where = f"{_name(opt)}.load_state_dict: the state of {key!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is a {type(entry).__name__}; expected a dict.")
    values = [v for e in entry.values() for v in (e.values() if isinstance(e, dict) else [e])]
    if any(is_dtensor(v) for v in values):
        raise ValueError(f"{where} holds DTensors: a state of torch.distributed.checkpoint's sharded form, which "
                         "only an optimizer over the same FSDP2 (DTensor) parameters loads. Without FSDP2 load a "
                         "full one: get_optimizer_state_dict(..., options=StateDictOptions(full_state_dict=True)) "
                         "under FSDP2 (Lightning ModelParallelStrategy(save_distributed_checkpoint=False)).")
    split = {k: v for k, v in entry.items() if isinstance(k, str) and k.startswith("block") and k[5:].isdigit()}
    if split:
        if len(split) != len(entry) or not all(isinstance(v, dict) for v in split.values()):
            raise ValueError(f"{where} mixes per-block entries with other keys: {sorted(map(str, entry))}.")
        return {int(k[5:]): v for k, v in split.items()}
    step = entry.get("step")
    if isinstance(step, Tensor) and step.dim() == 1:  # a stack's experts, one row each (_stack_entry)
        return {i: {k: v[i] for k, v in entry.items()} for i in range(step.shape[0])}
    return {0: entry} if entry else {}


def _consolidated_from_dcp(opt: ShardedOptimizer, sd: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Our consolidated format from :func:`dcp_state_dict`'s form with full tensors (saved under FSDP2 with
    ``full_state_dict=True``), for an optimizer without DTensor parameters. A block saved as zeros with
    ``step`` 0 had no state; an optional key saved as zeros was absent (:func:`_block_entry`)."""
    groups = _plain_groups(opt, sd, meta)
    index = {k: i for i, k in enumerate(k for g in groups for k in g["params"])}
    by_key = {b.key: b for b in opt.block_table.blocks}
    state: dict[int, dict[int, Any]] = {}
    for key, entry in sd["state"].items():
        pi = _param_index(opt, index, key)
        for si, blk in _dcp_blocks(opt, key, entry).items():
            step = blk.get("step")
            if isinstance(step, Tensor) and step.numel() == 1 and float(step) == 0.0:
                if any(isinstance(v, Tensor) and bool(v.ne(0).any()) for v in blk.values()):
                    raise ValueError(f"{_name(opt)}.load_state_dict: block {si} of {key!r} has step 0 but non-zero "
                                     "state (a block without state is saved as zeros): a damaged checkpoint.")
                continue
            b = by_key.get((pi, si))
            state.setdefault(pi, {})[si] = dict(blk) if b is None else _without_zero_optional(opt, b, blk)
    return {"state": state, "param_groups": groups,
            FORMAT_KEY: {k: v for k, v in meta.items() if k not in ("form", "group_options")}}


NESTED_WITHOUT_META = (
    "{name}.load_state_dict: the state of {key!r} holds the consolidated format's per-block entries inside "
    "torch.distributed.checkpoint's form, without the checkpoint's own metadata (step counts, trust region): "
    "torch rebuilt a consolidated checkpoint of an earlier lightning_soaa version (FSDP.rekey_optim_state_dict "
    "and set_optimizer_state_dict(full_state_dict=True): Lightning's ModelParallelStrategy resuming a "
    "checkpoint saved without FSDP2), or a load pre-hook (torch's recipe for loading by param_names starts from "
    "optimizer.state_dict(), which is that form under FSDP2) copied its entries in; the optimizer would start "
    "afresh. Load the consolidated checkpoint directly on every rank: optimizer.load_state_dict(checkpoint) "
    "(it takes that form under FSDP2 too; parameter names are checked), or resave it with this version "
    "without FSDP2 (its state_dict() then carries the metadata through torch's tools).")


def load_torch_form(opt: ShardedOptimizer, sd: dict[str, Any],
                    prepare_consolidated: Callable[[dict[str, Any]], Callable[[], None]]) -> None:
    """Load a state dict in torch's shape: our metadata as JSON in ``param_groups[0]``, none beside.

    * Saved under FSDP2 (:func:`dcp_state_dict`, metadata ``"form": "dcp"``): over DTensor parameters
      loaded as such (:func:`_prepare_dcp_load`); without them (a full-file checkpoint of Lightning's
      ModelParallelStrategy resumed under DDP or in one process) its full tensors in our consolidated
      format (:func:`_consolidated_from_dcp`).
    * Our consolidated format after torch rebuilt it (``"form": "consolidated"``, the copy of
      :func:`~lightning_soaa.distributed.checkpoint.with_group_meta`): FSDP.rekey_optim_state_dict drops
      the top-level metadata, and set_optimizer_state_dict(full_state_dict=True) merges the checkpoint's
      per-block entries into the destination's own state dict; those entries are the checkpoint.

    ``prepare_consolidated`` validates a state of our consolidated format and returns its load. Nothing
    changes unless everything is valid. Over DTensor parameters with W > 1 every rank reaches one verdict
    (one object all-gather; every rank loads): set_optimizer_state_dict(broadcast_from_rank0=True) gives a
    checkpoint's own entries only to the ranks that passed it, and a rank raising alone left the others
    waiting in their next step's collective."""
    nested = _nested_entries(sd)

    def prepare() -> Callable[[], None]:
        meta = _group_meta(opt, sd)
        if meta.get("form") == "dcp":
            if nested:
                raise ValueError(NESTED_WITHOUT_META.format(name=_name(opt), key=next(iter(nested))))
            if _predates_group_options(meta):
                _warn_options_unread(opt, opt.param_groups)
            if opt._dtensor is not None:
                return _prepare_dcp_load(opt, sd, meta)
            return prepare_consolidated(_consolidated_from_dcp(opt, sd, meta))
        return prepare_consolidated(_consolidated_from_nested(opt, sd, meta, nested))

    if opt._dtensor is None or opt.comm.world_size == 1:
        # plain parameters: each rank on its own, as for our format (a load on some ranks only is refused
        # at the next step, on every rank, by the step's agreement: no collective here that others skip)
        prepare()()
        return
    _agreed(opt, prepare, sum(len(b) for b in nested.values()))()


def _agreed(opt: ShardedOptimizer, prepare: Callable[[], Callable[[], None]], entries: int) -> Callable[[], None]:
    """``prepare()`` on every rank, then one verdict: a rank's error raised on every rank, and per-block
    entries (``entries``: how many this rank was given) that reached some ranks only refused everywhere."""
    load, error = None, None
    try:
        load = prepare()
    except Exception as e:  # any error (a malformed state: KeyError too) must still reach the all-gather
        error = e
    views = opt.comm.all_gather_object((None if error is None else f"{type(error).__name__}: {error}", entries))
    counts = [int(c) for _, c in views]
    if len(set(counts)) > 1:
        raise ValueError(
            f"{_name(opt)}.load_state_dict: the checkpoint's per-block entries reached the ranks unequally "
            f"(per rank {counts}): set_optimizer_state_dict(..., broadcast_from_rank0=True) hands our consolidated "
            "format's entries only to the ranks that passed the checkpoint. Pass the full checkpoint on every "
            "rank (torch.load it on every rank, as Lightning does). Nothing was loaded.")
    if error is not None:
        raise error
    other = next(((r, msg) for r, (msg, _) in enumerate(views) if msg is not None), None)
    if other is not None:
        raise ValueError(f"{_name(opt)}.load_state_dict: another rank (rank {other[0]}) found the state invalid: "
                         f"{other[1]} Nothing was loaded.")
    assert load is not None
    return load


def _prepare_dcp_load(opt: ShardedOptimizer, sd: dict[str, Any], meta: dict[str, Any]) -> Callable[[], None]:
    """Validate :func:`dcp_state_dict`'s shape (after ``dcp.load``/``set_optimizer_state_dict``, at any world
    size) against this optimizer over DTensor parameters; returns the load. Changes nothing."""
    groups = _plain_groups(opt, sd, meta)
    validate_state_dict(opt._checkpoint_view(), {"state": {}, "param_groups": groups, FORMAT_KEY: meta},
                        by_position=False)  # DCP's state is keyed by parameter name
    new_groups = loaded_groups(opt.param_groups, groups, opt._validate_group, keep=opt.layout_keys,
                               absent=opt.absent_key_values)
    _check_kept_keys(opt, new_groups)
    blocks = _loaded_blocks(opt, sd, steps_limit(meta["global"]))
    return lambda: _apply_dcp_load(opt, blocks, new_groups, meta)


def _apply_dcp_load(opt: ShardedOptimizer, blocks: dict[tuple[int, int], dict[str, Tensor]],
                    new_groups: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    opt.state.clear()
    for b in opt._owned:
        vals = blocks.get(b.key)
        if vals is None:
            continue
        st = opt.state[opt._params[b.param_index]]
        if b.dim is None:
            st.update(vals)
        else:
            st[b.sub_index] = vals
    hold_state_entries(opt)
    commit_groups(opt.param_groups, new_groups)
    glob = dict(meta["global"])
    opt.num_steps = int(glob.pop("num_steps", 0))
    opt.skipped_steps = int(glob.pop("skipped_steps", 0))
    opt._load_global_state(glob)
    opt._consolidated, opt._consolidated_at = None, -1  # a consolidation before the load is void
    opt._own_state_dicts()
