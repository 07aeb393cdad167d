"""A saved state cut into another row blocking, for elementwise optimizers.

An elementwise optimizer's block state is the parameter's state restricted to the block's rows (moments
of the block's shape) plus per-block counters that all blocks of a parameter share. Such a state can be
re-cut: the saved blocks of a parameter are joined along dim 0 and cut again at this optimizer's row
ranges. So a checkpoint loads whatever ``max_block_numel`` (or world size, see
``ShardedOptimizer._auto_block_numel``) either side used. The re-cut blocks are views into the saved
tensors (or the joined ones); whoever keeps them as state copies them.

:func:`fit_layout` returns the state dict in this optimizer's layout, or the input unchanged when the
layouts already agree or when it cannot re-cut it (the caller's validation then names the mismatch); it
never modifies its input. Only for optimizers that declare their state elementwise
(``CheckpointView.elementwise``: a square block's k x k statistic has the block's shape too). What cannot
be re-cut: a blocking that is not whole rows of dim 0 (ASGO's and DASGO's blocks), a field that is
neither of the block's shape nor a scalar (a k x k statistic), scalars that differ between the blocks of
one parameter, or a parameter whose blocks have state only in part.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_soaa.distributed.checkpoint import FORMAT_KEY, CheckpointView, lookup

__all__ = ["fit_layout", "joined_rows"]

Ranges = list[tuple[int, int]]  # the row ranges [start, stop) of a parameter's blocks, in order


def _rows(layout: Any, shape: tuple[int, ...]) -> Ranges | None:
    """The row ranges of one parameter's blocks when they tile dim 0 in order (a whole-parameter block
    is one range over all rows), else None."""
    if not isinstance(layout, (list, tuple)) or not layout:
        return None
    rows = shape[0] if shape else 1
    out: Ranges = []
    for entry in layout:
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            return None
        dim, start, stop = entry
        if dim is None:
            out.append((0, rows))
        elif dim == 0 and isinstance(start, int) and isinstance(stop, int):
            out.append((start, stop))
        else:
            return None
    tiles = out[0][0] == 0 and out[-1][1] == rows and all(a[1] == b[0] for a, b in zip(out, out[1:]))
    return out if tiles else None


def _joined(saved: list[dict[str, Any]], ranges: Ranges, shape: tuple[int, ...]) -> dict[str, Any] | None:
    """One parameter's saved block states joined into whole-parameter fields (tensor of the parameter's
    shape, or one scalar shared by every block), or None when they cannot be."""
    keys = set(saved[0])
    if any(set(blk) != keys for blk in saved):
        return None
    rows_of = [(stop - start, *shape[1:]) if shape else () for start, stop in ranges]
    out: dict[str, Any] = {}
    for key in keys:
        values = [blk[key] for blk in saved]
        if not all(isinstance(v, torch.Tensor) for v in values):
            return None
        if all(tuple(v.shape) == want for v, want in zip(values, rows_of)):
            out[key] = torch.cat(values, 0) if len(values) > 1 else values[0]
        elif all(v.dim() == 0 for v in values) and all(torch.equal(v, values[0]) for v in values[1:]):
            out[key] = values[0]
        else:
            return None
    return out


def _cut(joined: dict[str, Any], ranges: Ranges, shape: tuple[int, ...]) -> dict[int, dict[str, Any]]:
    """``joined`` cut at ``ranges``: views (row slices; a shared scalar is the same tensor in every block),
    no copies. The load copies the blocks this rank owns (``select_owned_state``), each once and compact,
    and none of another rank's: a clone here made every block twice (+763 MiB at a 381 MiB state, W = 1)."""
    out: dict[int, dict[str, Any]] = {}
    for si, (start, stop) in enumerate(ranges):
        blk = {}
        for key, v in joined.items():
            whole = v.dim() > 0 and tuple(v.shape) == tuple(shape)
            blk[key] = v.narrow(0, start, stop - start) if whole and len(ranges) > 1 else v
        out[si] = blk
    return out


def _refit_param(per_param: Any, old: Ranges, new: Ranges, shape: tuple[int, ...]) -> dict[int, Any] | None:
    """A parameter's saved block states (``{sub_index: state}``) in the new row ranges, or None."""
    if isinstance(per_param, dict) and any(str(k) not in {str(si) for si in range(len(old))} for k in per_param):
        return None  # keys that are not the saved blocks' (a torch.optim entry): the validation names them
    saved = [lookup(per_param, si) for si in range(len(old))]
    if not any(saved):
        return {}
    if not all(isinstance(blk, dict) and blk for blk in saved):
        return None  # state for some of the rows only
    joined = _joined(saved, old, shape)
    return None if joined is None else _cut(joined, new, shape)


def joined_rows(blocks: list[Any], layout: Any, shape: tuple[int, ...]) -> dict[str, Any] | None:
    """One parameter's block states (in its blocks' order) joined into one whole-parameter state, where its
    ``layout`` is whole rows of dim 0 and the states can be joined (every block held, per-block counters
    equal), else None."""
    ranges = _rows(layout, shape)
    if ranges is None or len(ranges) != len(blocks) or not all(isinstance(b, dict) and b for b in blocks):
        return None
    return _joined(blocks, ranges, shape)


def _normal(layout: Any) -> list[list[tuple[Any, ...]]] | None:
    try:
        return [[tuple(x) for x in blist] for blist in layout]
    except TypeError:
        return None


def fit_layout(optimizer: CheckpointView, sd: Any) -> Any:
    """``sd`` re-cut to ``optimizer``'s row blocking (see the module docstring), else ``sd`` itself."""
    meta = sd.get(FORMAT_KEY) if isinstance(sd, dict) else None
    if not optimizer.elementwise or not isinstance(meta, dict) or not isinstance(sd.get("state"), dict):
        return sd
    shapes = [tuple(s) for s in optimizer.shapes]
    saved, mine = _normal(meta.get("layout")), _normal(optimizer.block_table.layout())
    if saved is None or mine is None or saved == mine or _normal([meta.get("shapes")]) != [shapes]:
        return sd  # the same layout, or a mismatch (another model, a damaged entry) validate_state_dict reports
    state = dict(sd["state"])
    for pi, (saved_blocks, my_blocks, shape) in enumerate(zip(saved, mine, shapes)):
        if saved_blocks == my_blocks:
            continue
        old, new = _rows(saved_blocks, shape), _rows(my_blocks, shape)
        refit = None if old is None or new is None else _refit_param(lookup(state, pi) or {}, old, new, shape)
        if refit is None:
            return sd
        state.pop(str(pi), None)
        state[pi] = refit
    out = dict(sd)
    out["state"] = state
    out[FORMAT_KEY] = {**meta, "layout": [[list(x) for x in blist] for blist in mine]}
    return out
