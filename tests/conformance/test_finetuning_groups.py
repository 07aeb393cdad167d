"""Groups unfrozen during a fit, as Lightning's ``BaseFinetuning`` / ``BackboneFinetuning`` adds them, and
the resume of such a run (every optimizer that takes parameters; EGN plans from the model at construction).

* ``unfreeze_and_add_param_group`` adds a group of bare tensors; an optimizer built from named parameters
  (the factory and ``lightning-soaa fit`` pass ``named_parameters()``) raised torch's 'cannot add param group
  without names' one epoch into the fit.
* Resuming, the callback assigns ``optimizer.param_groups = [...]`` (new dicts over the same parameters, the
  unfrozen group appended) before the optimizer's state is loaded; the load refused the state as 'a
  different model' (its blocks were cut for the built groups only).

The resumed run must equal the uninterrupted one (float64, bit for bit where the state is loaded exactly).

At W = 2 and 3 (one gloo launch per W for every optimizer): groups added one at a time equal the groups given up
front (owners, state, parameters bit for bit); added after steps, the run equals one process (an added block
that takes an existing block's owner away re-shards the state, gathered once; otherwise no state crosses the
ranks and each add digests only the new group's hyperparameters: N adds cost O(N), not O(N^2)); an existing
group's lr changed on one rank only is still refused on every rank, nothing changed.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_soaa.distributed import agreement, hyper_digest
from lightning_soaa.registry import FirstArg, OptimizerSpec
from tests.conformance._battery import SPECS, assert_close, assert_identical, data, params, step, without_skips
from tests.harness.distributed import run_distributed
from tests.harness.models import tiny_mlp

_TAKES_PARAMS = [s for s in SPECS if s.first_arg is FirstArg.NAMED_PARAMETERS]


def _frozen_start(spec: OptimizerSpec) -> tuple[nn.Module, Any]:
    model = tiny_mlp(0)
    model[0].requires_grad_(False)  # the backbone
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return model, spec.load()(trainable, **spec.test_kwargs)


def _unfreeze(model: nn.Module, opt: Any, lr: float) -> None:
    """What BaseFinetuning.unfreeze_and_add_param_group does: bare tensors, a group of their own."""
    model[0].requires_grad_(True)
    opt.add_param_group({"params": list(model[0].parameters()), "lr": lr})


def _as_lightning_restores(opt: Any, saved: list[dict[str, Any]], model: nn.Module) -> None:
    """BaseFinetuning.on_fit_start when restarting: new group dicts over the parameters found by name."""
    by_name = dict(model.named_parameters())
    opt.param_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [by_name[n] for n in names]}
                        for g, names in saved]


@pytest.mark.parametrize("spec", _TAKES_PARAMS, ids=[s.name for s in _TAKES_PARAMS])
def test_a_group_unfrozen_mid_fit_trains_and_the_run_resumes(spec: OptimizerSpec) -> None:
    lr = spec.test_kwargs["lr"] / 2
    model, opt = _frozen_start(spec)
    names = {id(p): n for n, p in model.named_parameters()}
    for t in range(2):
        step(spec, model, opt, t)
    _unfreeze(model, opt, lr)
    assert len(opt.param_groups) == 2
    assert opt.param_groups[1].get("param_names") == [None, None]  # named like the others, as unnamed
    for t in range(2, 4):
        step(spec, model, opt, t)
    saved_state, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    saved_groups = [({k: v for k, v in g.items() if k != "params"}, [names[id(p)] for p in g["params"]])
                    for g in opt.param_groups]
    for t in range(4, 6):
        step(spec, model, opt, t)

    resumed, opt2 = _frozen_start(spec)
    resumed.load_state_dict(saved_model)
    resumed[0].requires_grad_(True)
    _as_lightning_restores(opt2, saved_groups, resumed)
    opt2.load_state_dict(saved_state)
    assert len(opt2.param_groups) == 2 and opt2.param_groups[1]["lr"] == lr
    for t in range(4, 6):
        step(spec, resumed, opt2, t)
    assert_close(params(resumed), params(model), "params", rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("spec", _TAKES_PARAMS, ids=[s.name for s in _TAKES_PARAMS])
def test_groups_assigned_over_other_parameters_are_still_refused(spec: OptimizerSpec) -> None:
    """Only groups holding exactly the built groups' parameters, in order, are taken over; groups over
    other parameters stay refused at the step, nothing changed."""
    model, opt = _frozen_start(spec)
    step(spec, model, opt, 0)
    w = params(model)
    opt.param_groups = [{**opt.param_groups[0], "params": list(reversed(opt.param_groups[0]["params"]))}]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\] is no longer the list"):
        step(spec, model, opt, 1)
    assert all(torch.equal(a, b) for a, b in zip(params(model), w))


def _groups_of(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """The first layer as one group, then one group per parameter, each with its own lr (layer-wise lr)."""
    named = list(model.named_parameters())
    return [{"params": named[:2]}] + [{"params": [np], "lr": lr * (0.5 + 0.1 * i)} for i, np in enumerate(named[2:])]


@pytest.mark.parametrize("spec", _TAKES_PARAMS, ids=[s.name for s in _TAKES_PARAMS])
def test_groups_added_one_at_a_time_equal_the_groups_given_up_front(spec: OptimizerSpec) -> None:
    """add_param_group appends the new group's blocks to the table (the existing ones kept as cut), not a
    rebuild over every parameter at each call (one group per layer was quadratic): the blocks, the state and
    the steps must be those of the optimizer built with every group at once, bit for bit."""
    lr = spec.test_kwargs["lr"]
    added, given = tiny_mlp(0), tiny_mlp(0)
    groups = _groups_of(added, lr)
    opt_a = spec.load()(groups[:1], **spec.test_kwargs)
    for g in groups[1:]:
        opt_a.add_param_group(g)
    opt_b = spec.load()(_groups_of(given, lr), **spec.test_kwargs)
    assert opt_a.block_table.blocks == opt_b.block_table.blocks
    assert [g["param_names"] for g in opt_a.param_groups] == [g["param_names"] for g in opt_b.param_groups]
    for t in range(3):
        step(spec, added, opt_a, t)
        step(spec, given, opt_b, t)
    assert_identical(opt_a.state_dict(), opt_b.state_dict())
    assert_identical(params(added), params(given), "params")


# ---------------------------------------------------------------------------------------- W = 2 and 3
STEPS_BEFORE, STEPS_AFTER = 2, 2


class _Adds:
    """Counts, over the ``add_param_group`` calls made inside it, the adds, those that moved an existing block
    to another owner (read from the tables before and after), the full-state gathers and the group texts
    digested (:func:`agreement.group_rest_text`, by the cached digest or the uncached one)."""

    def __init__(self, opt: Any, monkeypatch: Any) -> None:
        self.opt, self.adds, self.moves, self.gathers, self.texts = opt, 0, 0, 0, 0
        gather = opt._gather_full_state

        def counted_gather(*args: Any, **kwargs: Any) -> Any:
            self.gathers += 1
            return gather(*args, **kwargs)

        def counted_text(group: dict[str, Any], _text: Any = agreement.group_rest_text) -> str:
            self.texts += 1
            return _text(group)

        monkeypatch.setattr(opt, "_gather_full_state", counted_gather, raising=False)
        monkeypatch.setattr(agreement, "group_rest_text", counted_text)
        monkeypatch.setattr(hyper_digest, "group_rest_text", counted_text)

    def add(self, group: dict[str, Any]) -> None:
        before = [b.owner for b in self.opt.block_table.blocks]
        self.opt.add_param_group(group)
        self.adds += 1
        self.moves += [b.owner for b in self.opt.block_table.blocks][:len(before)] != before

    def counts(self) -> tuple[int, int, int, int]:
        return self.adds, self.moves, self.gathers, self.texts


def _consolidated(opt: Any) -> dict[str, Any]:
    opt.consolidate_state_dict(to=None)
    return copy.deepcopy(opt.state_dict())


def _added_before_stepping(spec: OptimizerSpec, rank: int, world: int, mp: Any) -> dict[str, Any]:
    added, given = tiny_mlp(0), tiny_mlp(0)
    lr = spec.test_kwargs["lr"]
    groups = _groups_of(added, lr)
    opt_a = spec.load()(groups[:1], **spec.test_kwargs)
    adds = _Adds(opt_a, mp)
    for g in groups[1:]:
        adds.add(g)
    counts = adds.counts()
    mp.undo()
    opt_b = spec.load()(_groups_of(given, lr), **spec.test_kwargs)
    same_blocks = opt_a.block_table.blocks == opt_b.block_table.blocks
    for t in range(3):
        step(spec, added, opt_a, t, rank=rank, world=world, average=True)
        step(spec, given, opt_b, t, rank=rank, world=world, average=True)
    return {"same_blocks": same_blocks, "owned": [b.key for b in opt_a.block_table.owned()], "counts": counts,
            "states": (_consolidated(opt_a), _consolidated(opt_b)), "params": (params(added), params(given))}


def _added_after_steps(spec: OptimizerSpec, rank: int = 0, world: int = 1, mp: Any = None) -> dict[str, Any]:
    """Built over the first layer, ``STEPS_BEFORE`` steps, every other parameter added as a group of its own
    (its own lr), ``STEPS_AFTER`` steps more; at W = 1 (``mp`` None) the reference."""
    model = tiny_mlp(0)
    groups = _groups_of(model, spec.test_kwargs["lr"])
    opt = spec.load()(groups[:1], **spec.test_kwargs)
    for t in range(STEPS_BEFORE):
        step(spec, model, opt, t, rank=rank, world=world, average=world > 1)
    adds = _Adds(opt, mp) if mp is not None else None
    for g in groups[1:]:
        if adds is not None:
            adds.add(g)
        else:
            opt.add_param_group(g)
    counts = adds.counts() if adds is not None else None
    if mp is not None:
        mp.undo()
    for t in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER):
        step(spec, model, opt, t, rank=rank, world=world, average=world > 1)
    # the block keys this rank holds state for: (param, 0) for a whole parameter's entries, (param, i) for
    # block i of a cut one (to be exactly the blocks it owns: nothing left behind by an add)
    held = sorted({(p, k) for p, st in enumerate(opt.state.get(q, {}) for q in opt._params) for k in
                   ([0] if any(not isinstance(x, int) for x in st) else []) + [x for x in st if isinstance(x, int)]})
    return {"counts": counts, "params": params(model), "state": _consolidated(opt), "held": held,
            "owned": sorted(b.key for b in opt.block_table.owned())}


def _lr_changed_on_one_rank(spec: OptimizerSpec, rank: int, world: int) -> dict[str, Any]:
    """Two groups added on every rank, a step; then the last rank alone changes the first group's lr (a new
    float, as a scheduler writes it) before the next add: refused on every rank, nothing changed; with the lr
    written back on that rank the same add goes through."""
    model = tiny_mlp(0)
    groups = _groups_of(model, spec.test_kwargs["lr"])
    opt = spec.load()(groups[:1], **spec.test_kwargs)
    for g in groups[1:3]:
        opt.add_param_group(g)
    step(spec, model, opt, 0, rank=rank, world=world, average=True)

    def held() -> list[Any]:
        return copy.deepcopy([dict(opt.state.get(p, {})) for p in opt._params])

    lr, table, state, weights = opt.param_groups[0]["lr"], opt.block_table, held(), params(model)
    if rank == world - 1:
        opt.param_groups[0]["lr"] = lr * 2
    try:
        opt.add_param_group(groups[3])
        msg = "no error"
    except RuntimeError as e:
        msg = str(e)
    unchanged = len(opt.param_groups) == 3 and opt.block_table is table and len(opt._params) == len(state)
    try:
        assert_identical(held(), state)
        assert_identical(params(model), weights)
    except AssertionError:
        unchanged = False
    opt.param_groups[0]["lr"] = lr
    opt.add_param_group(groups[3])
    step(spec, model, opt, 1, rank=rank, world=world, average=True)
    return {"msg": msg, "unchanged": unchanged, "groups": len(opt.param_groups), "params": params(model)}


def _unfrozen_under_ddp(spec: OptimizerSpec, rank: int = 0, world: int = 1, **kwargs: Any) -> dict[str, Any]:
    """Lightning's BaseFinetuning under strategy='ddp', as a loop: the backbone frozen when DDP wraps the model
    (DDP leaves it out of its buckets), the optimizer over the rest; a step, then the backbone unfrozen and
    added as a group of its own, then steps (at W = 1: no DDP, the reference). The first error, if any, and
    whether that step changed nothing."""
    model = tiny_mlp(0)
    model[0].requires_grad_(False)
    opt = spec.load()([(n, p) for n, p in model.named_parameters() if p.requires_grad],
                      **{**spec.test_kwargs, **kwargs})
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    msg, unchanged = None, True
    for t in range(STEPS_BEFORE + STEPS_AFTER):
        if t == STEPS_BEFORE:
            model[0].requires_grad_(True)
            opt.add_param_group({"params": list(model[0].parameters()), "lr": spec.test_kwargs["lr"] / 2})
        before = params(model)
        x, y = data(t, rank=rank, world=world)
        try:
            spec.take_step(opt, wrapped, x, y)
        except RuntimeError as e:
            msg, unchanged = str(e), all(torch.equal(a, b) for a, b in zip(before, params(model)))
            break
    return {"msg": msg, "unchanged": unchanged, "params": params(model)}


def _w_groups(rank: int, world: int) -> dict[str, Any]:
    out = {}
    for spec in _TAKES_PARAMS:
        with pytest.MonkeyPatch.context() as mp:
            before = _added_before_stepping(spec, rank, world, mp)
        with pytest.MonkeyPatch.context() as mp:
            after = _added_after_steps(spec, rank, world, mp)
        out[spec.name] = {"before": before, "after": after, "refused": _lr_changed_on_one_rank(spec, rank, world),
                          "ddp": {how: _unfrozen_under_ddp(spec, rank, world, grad_reduction=how)
                                  for how in ("none", "mean")}}
    return out


@functools.cache
def _launch(world: int, tmp: str) -> list[dict[str, Any]]:
    return run_distributed(_w_groups, world, Path(tmp), timeout=300)


@pytest.fixture(scope="module")
def _tmp(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("finetuning_groups"))


def _check_counts(per_rank: list[tuple[int, int, int, int]], what: str) -> tuple[int, int]:
    """Every rank counted alike; a gather only where an owner moved; each add digested a bounded number of
    groups (the new one; every group at every add before: quadratic)."""
    assert all(c == per_rank[0] for c in per_rank), (what, per_rank)
    adds, moves, gathers, texts = per_rank[0]
    assert gathers == moves, f"{what}: {gathers} full-state gathers in {adds} adds, {moves} of which moved an owner"
    assert texts <= 2 * adds, f"{what}: {texts} group texts digested in {adds} adds"
    return adds, moves


@pytest.mark.parametrize("world", [2, 3])
def test_groups_added_one_at_a_time_at_w_ranks(world: int, _tmp: str) -> None:
    """Added before the first step: the table, owners, state and parameters of the optimizer given every group
    up front, bit for bit, on every rank; added after steps: the one-process run (rtol 1e-10, as
    test_ranks.py compares); in both, the full state gathered only at the adds that moved an owner, and
    each add digested only the new group. Both kinds of add occur (an add of a block larger than an
    existing one moves it to another rank)."""
    out = _launch(world, _tmp)
    total = [0, 0]
    for spec in _TAKES_PARAMS:
        name = spec.name
        runs = [res[name] for res in out]
        for key in ("before", "after"):
            adds, moves = _check_counts([r[key]["counts"] for r in runs], f"{name} W={world} {key}")
            total[0] += adds - moves
            total[1] += moves
        owned: set[Any] = set()
        for rank, r in enumerate(runs):
            b = r["before"]
            assert b["same_blocks"], (name, rank)
            assert_identical(b["states"][0], b["states"][1], f"{name} W={world} rank {rank} state")
            assert_identical(b["params"][0], b["params"][1], f"{name} W={world} rank {rank} params")
            assert_identical(r["after"]["params"], runs[0]["after"]["params"], f"{name} rank {rank} vs rank 0")
            assert r["after"]["held"] == r["after"]["owned"] or not r["after"]["held"], (name, rank, r["after"])
            assert not owned & set(r["after"]["owned"]), (name, rank)
            owned |= set(r["after"]["owned"])
        ref = _added_after_steps(spec)
        assert_close(runs[0]["after"]["params"], ref["params"], f"{name} W={world} params after steps")
        assert_close(without_skips(runs[0]["after"]["state"]), without_skips(ref["state"]),
                     f"{name} W={world} state after steps")
    assert total[0] > 0 and total[1] > 0, f"adds that kept / moved the owners: {total}"


@pytest.mark.parametrize("world", [2, 3])
def test_an_lr_changed_on_one_rank_is_refused_at_the_next_add_on_every_rank(world: int, _tmp: str) -> None:
    """Each add digests only the new group, the existing groups' digests kept while their values are the same
    objects: an lr written into an existing group (on one rank only) is read again and refused on every rank
    together, naming it; the group is dropped and nothing else changed; the same add, the lr written back,
    goes through and the ranks step alike."""
    out = _launch(world, _tmp)
    for spec in _TAKES_PARAMS:
        runs = [res[spec.name]["refused"] for res in out]
        msgs = [r["msg"] for r in runs]
        assert all(m == msgs[0] for m in msgs), msgs
        assert "hyperparameters" in msgs[0] and f"[{world - 1}]" in msgs[0], msgs[0]
        assert all(r["unchanged"] and r["groups"] == 4 for r in runs), (spec.name, runs)
        for r in runs:
            assert_identical(r["params"], runs[0]["params"], f"{spec.name} params")


@pytest.mark.parametrize("world", [2, 3])
def test_a_group_unfrozen_under_ddp_is_refused_naming_it_and_the_route_that_trains(world: int, _tmp: str) -> None:
    """BaseFinetuning under DDP: the backbone frozen when DDP wraps the model is never averaged by it once
    unfrozen and added. Refused on every rank, nothing changed, as before, but the message listed six causes
    (and "build the DDP wrapper again", which Lightning gives no way to do); it now names the added group
    and the two routes that work in Lightning. The first of them, grad_reduction='mean', equals one process."""
    out = _launch(world, _tmp)
    for spec in _TAKES_PARAMS:
        runs = [res[spec.name]["ddp"] for res in out]
        for r in runs:
            msg = r["none"]["msg"]
            assert msg is not None and r["none"]["unchanged"], (spec.name, r["none"])
            assert "param_groups[1], which add_param_group added after the optimizer was built" in msg, msg
            assert "BaseFinetuning" in msg and "grad_reduction='mean'" in msg and "finetune_function" in msg, msg
            assert r["mean"]["msg"] is None, (spec.name, r["mean"]["msg"])
        ref = _unfrozen_under_ddp(spec, grad_reduction="mean")
        for rank, r in enumerate(runs):
            assert_close(r["mean"]["params"], ref["params"], f"{spec.name} W={world} rank {rank} params")
