"""ASGO's param groups: embeddings to the AdamW part, fused projections to ``row_parts`` groups.

Builders with one job: decide which group a parameter belongs to, before the optimizer cuts blocks.

* :func:`asgo_param_groups` walks a module (it alone can see which parameters are embedding tables);
  :func:`route_param_groups` gives the same routing in the fewest groups, for the routes that build the
  optimizer from the module alone (the registry's ``module_groups``);
* :func:`split_fused` regroups what any caller already has (tensors, ``named_parameters()`` pairs or param
  groups, names optionally given apart as ``{id(param): name}``, as DeepSpeed's client has them). ASGO's
  constructor option ``fused`` and the DeepSpeed client's JSON ``fused`` use it, so the routes that build
  the optimizer for the user (OptimizerFactory, LightningCLI, a DeepSpeed config) reach ``row_parts`` too.
  A matched matrix that is frozen stays in its group, which records its parts (:func:`fused_parts_of`,
  the group key ``fused_parts``), as ASGO's ``add_param_group`` records them for a group added later.

The two walks of a module also record, for every parameter of it (frozen ones included), its name there and
whether they send it to the AdamW part (:func:`route_hint`): ASGO/DASGO read it for parameters added after
construction without names (Lightning's BaseFinetuning unfreezing a backbone), which shape alone would route.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_soaa.optim.param_checks import check_initialized

__all__ = ["asgo_param_groups", "route_param_groups", "split_fused", "check_fused", "fused_suffix", "fused_parts_of",
           "route_hint", "RouteHint"]


class RouteHint(NamedTuple):
    """What a walk of a module knew of one of its parameters."""

    name: str  #: its name in ``module.named_parameters()``
    adamw: bool  #: an embedding table (or behind one) or a weight norm's gain: the AdamW part whatever its name
    #: a weak reference to the module of the walk that named it (None where gone or not recorded): ``fused``
    #: looks there for the frozen matrices the walk left out of the groups (:func:`split_fused`)
    module: Any = None
    #: the parts of a matrix that a walk given ``fused`` matched (1: none): ASGO built without ``fused`` steps
    #: it as those parts when a later ``add_param_group`` brings it (:func:`fused_parts_of`)
    parts: int = 1


#: Where a walk found a parameter: (a weak reference to a module, the parameter's key in its ``_parameters``).
_Place = tuple["weakref.ref[nn.Module]", str]


class _Entry(NamedTuple):
    """One parameter's record in :data:`_HINTS`: every place a walk found it (a tied weight has several), its
    shape then, and its hint."""

    places: tuple[_Place, ...]
    shape: tuple[int, ...]
    hint: RouteHint


#: id(parameter) -> its :class:`_Entry`, from the first walk of a module holding it (so routing does not depend on
#: which wrapper or part of the model was walked since). Never a weak reference to the parameter itself:
#: torch.utils.swap_tensors refuses a tensor that has one, and ``model.to(...)`` / ``model.load_state_dict(...)``
#: swap every parameter under ``torch.__future__.set_swap_module_params_on_conversion(True)`` (and FSDP2's
#: DTensors whatever the flag), so a walk made them fail for good. An id is reused once its tensor is gone, often
#: by the next parameter made (re-wrapping a module's parameters one by one gave ``proj`` the dead
#: ``pos_embedding``'s id, name and AdamW routing): a hint counts only for the tensor at one of its places
#: (:func:`_holds`) with its shape. :func:`_record_hints` drops the entries whose places hold it no more.
_HINTS: dict[int, _Entry] = {}


def _holds(place: _Place, param: Any) -> bool:
    """Whether the module of ``place`` still holds ``param`` there (or, where that key is gone from it,
    under another key: prune and the old-style weight_norm / spectral_norm rename a weight ``weight_orig``)."""
    module = place[0]()
    if module is None:
        return False
    held = module._parameters
    if place[1] in held:
        return held[place[1]] is param
    return any(q is param for q in held.values())


def _entry_of(param: Any) -> _Entry | None:
    """``param``'s entry in :data:`_HINTS` where it is that parameter's (not that of a dead one at its id)."""
    entry = _HINTS.get(id(param)) if isinstance(param, Tensor) else None
    if entry is None or tuple(param.shape) != entry.shape or not any(_holds(pl, param) for pl in entry.places):
        return None
    return entry


def route_hint(param: Any) -> RouteHint | None:
    """The name and routing that :func:`asgo_param_groups` / :func:`route_param_groups` found for ``param``
    when they first walked a module holding it, trainable or not then; None for a parameter of no such module.
    ASGO/DASGO's ``add_param_group`` reads it: a backbone frozen while the optimizer was built and added later
    as bare tensors (Lightning's BaseFinetuning) is routed as those walks would have routed it."""
    entry = _entry_of(param)
    return None if entry is None else entry.hint


def _record_hints(module: nn.Module, adamw: set[int], fused: Mapping[str, int] | None = None) -> None:
    """A :class:`RouteHint` for every parameter of ``module``, frozen ones included (they are the ones a
    later ``add_param_group`` brings); ``fused``: the parts of the matrices it matches (``{}``: none, a walk
    for groups that asked for none; None: those an earlier walk recorded are kept)."""
    _drop_stale()
    # each parameter's places from the modules themselves, not from its name: a wrapper may name parameters
    # otherwise than its submodule paths (FSDP1 strips its own)
    places: dict[int, list[_Place]] = {}
    for sub in module.modules():
        for key, q in sub._parameters.items():
            if q is not None:
                places.setdefault(id(q), []).append((weakref.ref(sub), key))
    for name, p in module.named_parameters(remove_duplicate=False):
        was = _entry_of(p)
        old = None if was is None else was.hint
        s = fused_suffix(name, p, fused) if fused else None
        # the first walk's name (a later walk of a part or a wrapper names from another root); a table is
        # a table if any walk saw its module (a head tied to it is walked without the nn.Embedding); the
        # parts of the latest walk of asgo_param_groups: an earlier fused= must not cut the matrices of an
        # optimizer built later without it (found by a reviewer: an ablation in the same process); the first
        # walk's module while it lives (a wrapper walked first and dropped left a dead reference, and fused
        # refused a model whose only fused matrix is frozen)
        alive = old is not None and old.module is not None and old.module() is not None
        hint = RouteHint(name if old is None else old.name, id(p) in adamw or (old is not None and old.adamw),
                         old.module if alive and old is not None else weakref.ref(module),
                         (fused[s] if s else 1) if fused is not None else (1 if old is None else old.parts))
        if id(p) in places:  # (a walk of part of a model keeps the places an earlier walk found too)
            kept = () if was is None else tuple(pl for pl in was.places if _holds(pl, p))
            _HINTS[id(p)] = _Entry(tuple(dict.fromkeys(kept + tuple(places[id(p)]))), tuple(p.shape), hint)


def _drop_stale() -> None:
    """Drop the entries of :data:`_HINTS` whose parameter none of its places holds any more (its module is
    gone, or holds another tensor there): the record stays as large as the walked parameters still in use."""
    held: dict[int, set[int]] = {}  # id(module) -> the ids of its parameters (one pass over each module)

    def ids(ref: weakref.ref[nn.Module]) -> set[int]:
        m = ref()
        if m is None:
            return set()
        if id(m) not in held:
            held[id(m)] = {id(q) for q in m._parameters.values()}
        return held[id(m)]

    for key in [k for k, e in _HINTS.items() if not any(k in ids(pl[0]) for pl in e.places)]:
        del _HINTS[key]


def check_fused(fused: Any) -> dict[str, int]:
    """``fused`` as a plain dict, or a ValueError naming the field, the value and what is allowed."""
    ok = isinstance(fused, Mapping) and all(
        isinstance(k, str) and k and isinstance(v, int) and not isinstance(v, bool) and v >= 1
        for k, v in fused.items())
    if not ok:
        raise ValueError(f"Invalid fused={fused!r}. Must be a dict of parameter-name suffix -> number of parts "
                         "(an int >= 1), e.g. {'qkv.weight': 3} for fused query/key/value projections.")
    return dict(fused)


def fused_suffix(name: str | None, tensor: Any, fused: Mapping[str, int]) -> str | None:
    """The longest suffix of ``fused`` that the name of a matrix, trainable or frozen, ends with, or None."""
    if name is None or not isinstance(tensor, Tensor) or tensor.dim() < 2:
        return None
    ends = [s for s in fused if name == s or name.endswith("." + s)]
    return max(ends, key=len) if ends else None


def _name_of(item: Any, i: int, group_names: list[str] | None, names: Mapping[int, str]) -> tuple[str | None, Any]:
    """(name or None, tensor) of one entry of a group's ``params``."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return item[0], item[1]
    if group_names is not None and i < len(group_names):
        return group_names[i], item
    return names.get(id(item)), item


def _suffix(name: str | None, tensor: Any, fused: Mapping[str, int]) -> str | None:
    """The longest suffix of ``fused`` that the name of a trainable matrix ends with, whole dotted parts
    ("attn.qkv.weight" before "qkv.weight"; "kv.weight" does not match "qkv.weight"), or None."""
    if isinstance(tensor, Tensor) and not tensor.requires_grad:
        return None
    return fused_suffix(name, tensor, fused)


def fused_parts_of(group: Mapping[str, Any], fused: Mapping[str, int] | None,
                   names: Mapping[int, str] | None = None) -> tuple[tuple[int, int], ...]:
    """``((position, parts), ...)``: the matrices of ``group`` (trainable or frozen) whose names end with a
    suffix of ``fused`` (None: that :func:`asgo_param_groups` given ``fused`` matched, :attr:`RouteHint.parts`)
    and that the group would step as one matrix, each with its number of parts: the value of ASGO's group key
    ``fused_parts``. Left out: a group with ``use_asgo=False`` or that sets ``fused_parts`` itself (decided:
    ``()`` steps each whole), positions of its ``adamw_indices``, names the routing sends to the AdamW part
    ("emb"), one part, and a group whose ``row_parts`` already is that count.

    Raises:
        ValueError: a matched matrix sits in a group that sets another ``row_parts``.
    """
    from lightning_soaa.optim.asgo import ASGO  # the name rule (that module imports this one)

    if group.get("use_asgo") is False or "fused_parts" in group:
        return ()
    items = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
    adamw = set(group.get("adamw_indices") or ())
    routing = {"use_asgo": group.get("use_asgo")}
    out = []
    for j, item in enumerate(items):
        name, t = _name_of(item, j, group.get("param_names"), names or {})
        label, parts = _parts_of(name, t, fused)
        if parts == 1 or j in adamw or not ASGO.name_rule(t, routing, name):
            continue
        if group.get("row_parts", 1) not in (1, parts):
            what = f"fused={dict(fused)!r}" if fused else "asgo_param_groups(..., fused=...)"
            raise ValueError(f"Invalid {what}: {label!r} matches parameters of a param group that sets "
                             f"row_parts={group['row_parts']!r}. Give those matrices one of the two.")
        if group.get("row_parts", 1) == 1:
            out.append((j, parts))
    return tuple(out)


def _parts_of(name: str | None, tensor: Any, fused: Mapping[str, int] | None) -> tuple[str | None, int]:
    """(the suffix or recorded name, parts) of one parameter, by ``fused`` or (None) by the walk's record."""
    if fused:
        s = fused_suffix(name, tensor, fused)
        return s, (fused[s] if s else 1)
    hint = route_hint(tensor)
    if hint is None or not isinstance(tensor, Tensor) or tensor.dim() < 2:
        return None, 1
    return hint.name, hint.parts


def _walked_frozen_suffixes(given: list[Any], fused: Mapping[str, int]) -> set[str]:
    """The suffixes of ``fused`` that the name of a frozen matrix ends with, in the modules that
    :func:`asgo_param_groups` / :func:`route_param_groups` walked to name the ``given`` tensors: the walks
    leave frozen parameters out of the groups, and a later ``add_param_group`` (Lightning's BaseFinetuning)
    names such a matrix from that walk and steps it as its parts."""
    modules = {}
    for t in given:
        hint = route_hint(t)
        m = hint.module() if hint is not None and hint.module is not None else None
        if m is not None:
            modules[id(m)] = m
    found: set[str] = set()
    for m in modules.values():
        for name, p in m.named_parameters():
            s = None if p.requires_grad else fused_suffix(name, p, fused)
            found.update([s] if s else [])
    return found


def _subgroup(group: dict[str, Any], picked: list[int], items: list[Any], **extra: Any) -> dict[str, Any]:
    """The parameters of ``group`` at ``picked`` (positions in ``items``) with its other options; its
    ``adamw_indices`` moved with their parameters (copied as given, they pointed at other parameters of
    either half, or past its end: found by a helper)."""
    # fused_parts are positions in the group as given: the caller moves them (_head), a parts group has none
    out = {k: v for k, v in group.items() if k not in ("params", "param_names", "fused_parts")}
    out["params"] = [items[i] for i in picked]
    if "param_names" in group:
        out["param_names"] = [group["param_names"][i] for i in picked]
    at = group.get("adamw_indices")
    if isinstance(at, (list, tuple)):  # (checked by split_fused: distinct positions of the group as given)
        moved = [j for j, i in enumerate(picked) if i in at]
        out["adamw_indices"] = moved if isinstance(at, list) else tuple(moved)
    out.update(extra)
    return out


def _adamw_positions(group: dict[str, Any], plist: list[Any]) -> set[int]:
    """The positions of ``group``'s ``adamw_indices`` (the AdamW part: they stay in the group, which the
    AdamW part's parameters do, as a ``use_asgo=False`` group's), refused here when malformed, against the
    group as given (its halves' lengths would make the message point elsewhere)."""
    from lightning_soaa.optim.asgo import _check_adamw_indices  # (that module imports this one)

    if group.get("adamw_indices") is None:
        return set()
    _check_adamw_indices({**group, "params": plist})
    return set(group["adamw_indices"])


def _head(group: dict[str, Any], by: dict[str | None, list[int]], items: list[Any], fused: Mapping[str, int],
          names: Mapping[int, str]) -> dict[str, Any]:
    """What stays of ``group`` once its trainable matrices of ``fused`` moved to their parts groups (``by``:
    suffix, or None for those that stay -> positions in ``items``), with its ``fused_parts``: decided now for
    the frozen matrices that stayed, or the group's own (:func:`_given_parts`)."""
    head = _subgroup(group, by.get(None, []), items)
    if "fused_parts" in group:
        return {**head, "fused_parts": _given_parts(group, by, fused)}
    frozen = fused_parts_of(head, fused, names)  # what stayed: frozen matrices, decided now
    return {**head, "fused_parts": frozen} if frozen else head


def _given_parts(group: dict[str, Any], by: dict[str | None, list[int]], fused: Mapping[str, int]) -> Any:
    """The ``fused_parts`` a group sets, its entries moved to the positions of the parameters that stay
    (``by[None]``). Why a group that sets it is split too: ``fused_parts=[]`` is the remedy for a checkpoint
    saved before the key, whose run moved the trainable matrices out all the same (a model with a trainable
    and a frozen fused matrix was refused as 'a different number of param groups'). An entry of a moved
    matrix is dropped (its parts group steps it as its parts) unless it gives other parts: refused."""
    given = group["fused_parts"]
    kept = by.get(None, [])
    pairs = isinstance(given, (list, tuple)) and all(
        isinstance(e, (list, tuple)) and len(e) == 2 and all(type(x) is int for x in e) for e in given)
    if not pairs or len(kept) == sum(map(len, by.values())):  # malformed (ASGO's check names it), or none moved
        return given
    parts_of = {i: fused[s] for s, picked in by.items() if s is not None for i in picked}
    clash = [(i, k) for i, k in given if i in parts_of and k != parts_of[i]]
    if clash:
        i, k = clash[0]
        raise ValueError(f"Invalid fused_parts={given!r}: position {i} gives {k} parts to a trainable matrix to "
                         f"which fused={dict(fused)!r} gives {parts_of[i]}. Give it one of the two.")
    at = {i: j for j, i in enumerate(kept)}
    moved = [(at[i], k) for i, k in given if i in at]
    return moved if isinstance(given, list) else tuple(moved)


def split_fused(params: Iterable[Any], fused: Mapping[str, int],
                names: Mapping[int, str] | None = None) -> list[Any]:
    """``params`` as param groups in which every trainable matrix whose name ends with a suffix of
    ``fused`` (whole dotted parts) sits in a group of its own with ``row_parts=fused[suffix]`` (each such
    group keeps the other options of the group it came from). The given groups keep their indices: a
    group every parameter of which moved is replaced by its parts group in place; the other parts groups
    are appended (in the order of their source group and of ``fused``), so ``asgo_param_groups(m)``
    followed by this gives the groups ``asgo_param_groups(m, fused=...)`` always gave. Matrices of a
    ``use_asgo=False`` group, or at a position of its ``adamw_indices``, stay there (the AdamW part has no
    parts); their suffix counts as found. A group's ``adamw_indices`` move with their parameters: each
    resulting group's are the positions there of the parameters the given ones named (``[]`` in a parts group).

    A matched matrix that is frozen stays in its group (so the groups do not depend on what trains now),
    which records its parts as ``fused_parts`` (:func:`fused_parts_of`): decided here, once, it is stepped
    as its parts whenever it trains, and the key is saved with the group. A group that sets
    ``fused_parts`` itself keeps it (its positions moved to the parameters that stay; ``[]``: each whole);
    its trainable matrices move as any group's.

    Raises:
        ValueError: ``fused`` is not ``{str: int >= 1}``; a group's ``adamw_indices`` are not distinct
            positions of its parameters (or come with ``use_asgo``); a suffix matches no matrix given, nor a frozen one
            that :func:`asgo_param_groups` / :func:`route_param_groups` recorded (with the hint to pass
            names when some matrices came without); a matched matrix sits in a group that already sets
            another ``row_parts``.
    """
    fused = check_fused(fused)
    if isinstance(params, Tensor):  # torch refuses a bare tensor (not an iterable of them): left to it
        return params  # type: ignore[return-value]
    items = list(params)
    if not fused or not items:
        return items
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    if any(isinstance(g.get("params"), set) for g in groups if isinstance(g, dict)):
        return items  # torch refuses a set (its order changes between runs): left to it
    names = names or {}
    heads: list[dict[str, Any]] = []
    tails: list[dict[str, Any]] = []
    found: set[str] = set()
    given: list[Any] = []
    unnamed = 0
    for g in groups:
        plist = [g["params"]] if isinstance(g["params"], Tensor) else list(g["params"])  # as torch reads it
        by: dict[str | None, list[int]] = {}
        adamw = _adamw_positions(g, plist)
        for i, item in enumerate(plist):
            name, t = _name_of(item, i, g.get("param_names"), names)
            check_initialized("ASGO", t, repr(name) if name else f"#{i} of its group")
            given.append(t)
            unnamed += int(name is None and isinstance(t, Tensor) and t.dim() >= 2)
            s = fused_suffix(name, t, fused)
            found.update([s] if s else [])  # a frozen matrix too: it is stepped as its parts (fused_parts)
            s = _suffix(name, t, fused)
            by.setdefault(None if g.get("use_asgo") is False or i in adamw else s, []).append(i)
        moved = [s for s in fused if s in by]
        parts = []
        for s in moved:
            if g.get("row_parts", 1) not in (1, fused[s]):
                raise ValueError(f"Invalid fused={fused!r}: {s!r} matches parameters of a param group that sets "
                                 f"row_parts={g['row_parts']!r}. Give those matrices one of the two.")
            parts.append(_subgroup(g, by[s], plist, row_parts=fused[s]))
        if by.get(None) or not moved:
            heads.append(_head(g, by, plist, fused, names))
        else:  # every parameter left the group: its (first) parts group takes its place, so the user's
            if "fused_parts" in g:  # its entries named moved matrices only: checked, then dropped
                _given_parts(g, by, fused)
            heads.append(parts.pop(0))  # groups keep their indices (an LR schedule's per-group list)
        tails += parts
    missing = [s for s in fused if s not in found]
    if missing:
        walked = _walked_frozen_suffixes(given, fused)
        missing = [s for s in missing if s not in walked]
    if missing:
        hint = (f" {unnamed} matrix parameter(s) came without names: pass model.named_parameters() (the stock "
                "LightningCLI passes model.parameters(); the lightning-soaa command, SOAALightningCLI, passes "
                "names)." if unnamed else "")
        raise ValueError(f"Invalid fused={fused!r}: no matrix parameter's name, trainable or frozen, ends with "
                         f"{', '.join(repr(s) for s in missing)} (the suffix of a name in "
                         f"module.named_parameters(), e.g. 'attn.qkv.weight' or 'qkv.weight').{hint}")
    return heads + tails


def asgo_param_groups(module: nn.Module, *, fused: dict[str, int] | None = None,
                      **group_options: Any) -> list[dict[str, Any]]:
    """Named param groups for ASGO/DASGO from a module, with every :class:`nn.Embedding` and
    :class:`nn.EmbeddingBag` table (including an output head tied to it; for a parametrized table, e.g.
    ``weight_norm``, the parameters it is computed from, also under the older hook-based
    ``torch.nn.utils.weight_norm`` / ``spectral_norm``) and every weight norm's magnitude ``g`` (a gain per
    output, shaped ``(out, 1, ...)``: a vector, which the matrix method would scale by one number for the
    whole tensor) in a ``use_asgo=False`` group.

    ``fused`` (ASGO): ``{name suffix: parts}``, e.g. ``{"qkv.weight": 3}``: the matrices whose names end
    with a suffix go to a group with ``row_parts=parts`` (each stepped as its parts: see ASGO's
    ``row_parts``; the longest suffix a name ends with wins); a suffix that matches no matrix of the
    module, trainable or frozen, raises (:func:`split_fused`). A frozen one is left out here (as every
    frozen parameter) and recorded (:attr:`RouteHint.parts`): ASGO's ``add_param_group`` steps it as its
    parts when it brings it. ``group_options`` are added to every group. Parameters without
    ``requires_grad`` are left out. Returns at most ``2 + len(fused)`` groups: ``[{"params": [(name, p),
    ...], **opts}, {"params": [...], "use_asgo": False, **opts}, {"params": [...], "row_parts": parts,
    **opts}, ...]`` (empty groups are dropped). Every parameter's name and routing, frozen ones too, is
    recorded for a later ``add_param_group`` (:func:`route_hint`).
    """
    _check_initialized(module, "asgo_param_groups")
    emb_ids = _embedding_table_ids(module) | _weight_norm_gains(module)
    if fused:
        _refuse_transposed_fused(module, check_fused(fused))
    _record_hints(module, emb_ids, fused or {})  # (without fused: this walk's groups ask for no parts)
    rest: list[tuple[str, Tensor]] = []
    emb: list[tuple[str, Tensor]] = []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (emb if id(p) in emb_ids else rest).append((name, p))
    groups: list[dict[str, Any]] = []
    if rest:
        groups.append({"params": rest, **group_options})
    if emb:
        groups.append({"params": emb, **group_options, "use_asgo": False})
    if fused is None:
        return groups
    return split_fused(groups, fused)


def route_param_groups(module: nn.Module) -> list[dict[str, Any]]:
    """The param groups of ASGO/DASGO where a route builds the optimizer from the module alone (the
    registry's ``module_groups``: OptimizerFactory, the lightning-soaa CLI, a DeepSpeed config naming it):
    the routing of :func:`asgo_param_groups`, in the fewest groups. The trainable parameters stay in one
    group, named, in ``named_parameters()`` order, except those that :func:`asgo_param_groups` sends to AdamW
    and the name rule alone would precondition (an embedding table named ``wte``, a weight norm's gain):
    they form a second group with ``use_asgo=False``. A model without such parameters (no embedding table,
    or tables whose names contain ``"emb"``) gets the one group these routes always gave, so its
    checkpoints, its DeepSpeed partitions and a per-group LR schedule stay as they were. Like
    :func:`asgo_param_groups` it records every parameter's name and routing (:func:`route_hint`)."""
    from lightning_soaa.optim.asgo import ASGO  # the name rule (that module imports this one)

    _check_initialized(module, "ASGO/DASGO")
    adam = _embedding_table_ids(module) | _weight_norm_gains(module)
    _record_hints(module, adam)
    keep: list[tuple[str, Tensor]] = []
    moved: list[tuple[str, Tensor]] = []
    for name, p in module.named_parameters():
        if p.requires_grad:
            # the name rule on the full shape: a ZeRO-3 parameter made under deepspeed.zero.Init (Lightning's
            # configure_model at stage 3) is an empty 1-D partition here, which the rule would send to AdamW
            whole = torch.empty(tuple(getattr(p, "ds_shape", p.shape)), device="meta")
            (moved if id(p) in adam and ASGO.name_rule(whole, {}, name) else keep).append((name, p))
    groups: list[dict[str, Any]] = [{"params": keep}] if keep else []
    return groups + ([{"params": moved, "use_asgo": False}] if moved else [])


def _check_initialized(module: nn.Module, what: str) -> None:
    """Refuse a lazy module's uninitialized parameter, naming it, before the walk reads its shape."""
    for name, p in module.named_parameters():
        check_initialized(what, p, repr(name))


def _embedding_table_ids(module: nn.Module) -> set[int]:
    """``id`` of the parameters behind every embedding table of ``module``. A parametrized table's
    ``weight`` is computed at each read (not a parameter, and reading it runs the parametrization, e.g. a
    spectral_norm power iteration), so its originals are taken instead."""
    ids: set[int] = set()
    for m in module.modules():
        if not isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            continue
        if torch.nn.utils.parametrize.is_parametrized(m, "weight"):
            lists = m.parametrizations  # a ModuleDict of ParametrizationLists, by tensor name
            assert isinstance(lists, nn.ModuleDict)
            ids.update(id(p) for p in lists["weight"].parameters())
        elif m._parameters.get("weight") is not None:
            ids.add(id(m._parameters["weight"]))
        else:  # the older hooks keep the originals as weight_g / weight_v or weight_orig (found by a helper)
            ids.update(id(p) for n, p in m._parameters.items()
                       if p is not None and n in ("weight_g", "weight_v", "weight_orig"))
    return ids


def _weight_norm_gains(module: nn.Module) -> set[int]:
    """``id`` of every weight norm's magnitude: ``parametrizations.weight_norm``'s ``original0`` and the
    hook-based ``torch.nn.utils.weight_norm``'s ``<name>_g``."""
    from torch.nn.utils.parametrizations import _WeightNorm
    from torch.nn.utils.weight_norm import WeightNorm

    ids: set[int] = set()
    for m in module.modules():
        lists = getattr(m, "parametrizations", None)
        if isinstance(lists, nn.ModuleDict):
            for plist in lists.values():
                g = plist._parameters.get("original0")
                if g is not None and any(isinstance(f, _WeightNorm) for f in plist.children()):
                    ids.add(id(g))
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                g = m._parameters.get(f"{hook.name}_g")
                if g is not None:
                    ids.add(id(g))
    return ids


def _refuse_transposed_fused(module: nn.Module, fused: Mapping[str, int]) -> None:
    """Refuse ``fused`` on a weight stored ``(in, out)``: transformers' ``Conv1D`` (GPT-2's ``c_attn``).
    ``row_parts`` cuts rows, which there are the inputs, not query/key/value: accepted silently before
    (2e-2 off ASGO on the separate matrices after 5 steps; found by a helper). A frozen one too: a later
    ``add_param_group`` steps it as its parts."""
    for path, m in module.named_modules():
        if type(m).__name__ != "Conv1D" or not hasattr(m, "nf"):
            continue
        name = f"{path}.weight" if path else "weight"
        hit = next((s for s in fused if name == s or name.endswith("." + s)), None)
        if hit is not None:
            raise ValueError(
                f"Invalid fused={dict(fused)!r}: {hit!r} matches {name!r}, a Conv1D weight stored (in, out) = "
                f"{tuple(m.weight.shape)} (transformers' GPT-2 layout), whose rows are its inputs: row_parts would "
                "cut those, not the fused outputs. Leave it out of fused (or replace the Conv1D layers with "
                "nn.Linear, whose weight is (out, in)).")
