"""The sharded core across real gloo ranks: the communication of one step, ranks that disagree (on the
parameters, or on the lightning_soaa code they run).

W-rank runs equal to one process, non-finite gradients on one rank, and checkpoints across world sizes
are checked for every optimizer (AdamW included) in tests/conformance/test_ranks.py.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_soaa.distributed.agreement import RECORD_SLOTS, STEP_ROW
from lightning_soaa.optim.adamw import ShardedAdamW
from tests.harness.distributed import run_distributed
from tests.harness.models import batch, loss_fn, tiny_mlp

KW = dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
SIZES = (6, 8, 5, 3)


def _w_train(rank, world_size, steps, sizes, grad_reduction):
    model = tiny_mlp(sizes=sizes)
    opt = ShardedAdamW(model.parameters(), grad_reduction=grad_reduction, **KW)
    for t in range(steps):
        opt.zero_grad()
        loss_fn(model, *batch(t, rank, d_out=sizes[-1])).backward()
        if grad_reduction == "none":  # what DDP would have done
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(world_size)
        opt.step()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "owned": len(opt.block_table.owned()),
        "stats": opt.statistics(),
        "last": opt.comm.step_stats.copy(),
        "padded": {str(dt): opt.exchange.padded_len(dt) for dt in opt.exchange.layouts},
        # the gradients' presence flags after each rank's blocks (one per block of the busiest rank)
        "flags": {str(dt): max(map(len, per_rank)) for dt, per_rank in opt.exchange.layouts.items()},
    }


def test_communication_per_step_matches_design(tmp_path: Path):
    """grad_reduction='mean', one dtype: 1 reduce-scatter + 1 scalar all-reduce + 1 all-gather per step."""
    results = run_distributed(_w_train, 2, tmp_path, 3, SIZES, "mean")
    for res in results:
        last = res["last"]
        (padded,), (flags,) = res["padded"].values(), res["flags"].values()
        assert last.calls == {"reduce_scatter": 1, "all_reduce": 1, "all_gather": 1}
        assert last.bytes["reduce_scatter"] == 2 * (padded + flags) * 8  # W * (padded + flags) fp64 sent
        assert last.bytes["all_gather"] == (padded + 1) * 8  # and the rank's word on its update (_update_and_gather)
        # the non-finite flag (AdamW has no partials) padded to RECORD_SLOTS, each rank's agreement row and
        # the stop vote
        assert last.bytes["all_reduce"] == 8 * (RECORD_SLOTS + STEP_ROW * 2 + 1)
        n = sum(p.numel() for p in tiny_mlp(sizes=SIZES).parameters())
        assert n / 2 <= padded < n  # sharded: each rank sends about half the model
        assert res["stats"]["comm_calls"] == 3.0


def _w_mismatch(rank, world_size):
    sizes = SIZES if rank == 0 else (6, 9, 5, 3)
    try:
        ShardedAdamW(tiny_mlp(sizes=sizes).parameters())
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_ranks_disagreeing_on_parameters_fail_fast(tmp_path: Path):
    msgs = run_distributed(_w_mismatch, 2, tmp_path, timeout=60)
    for m in msgs:
        assert "ranks disagree on the parameter list" in m
        assert "rank 0: 6 params" in m and "rank 1: 6 params" in m


def _skew(rank: int, how: str) -> None:
    """Make rank 1 run 'another lightning_soaa' (in this process only: each rank is a process of its own)."""
    if rank != 1:
        return
    from lightning_soaa.distributed import agreement
    from lightning_soaa.optim import asgo
    from lightning_soaa.optim.base import ShardedOptimizer

    if how == "block size":  # a version with another automatic block size: other blocks
        ShardedOptimizer.default_max_block_numel = 8
    elif how == "cost":  # a version whose cost model counted an AdamW element as 1: the same blocks, other owners
        asgo.ADAM_COST_PER_ELEMENT = 1.0
    elif how in ("source", "version"):  # a patched copy, or another release
        version = agreement.package_identity()[0] if how == "source" else "0.0.0+other"
        agreement.package_identity = lambda: (version, 12345)


def _w_skewed(rank, world_size, how):
    _skew(rank, how)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(512, 16), nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16), nn.Tanh(),
                          nn.Linear(16, 8), nn.Linear(8, 8)).double()
    try:
        if how == "cost":
            from lightning_soaa.optim.asgo import ASGO
            from lightning_soaa.optim.asgo_groups import asgo_param_groups

            opt = ASGO(asgo_param_groups(model), grad_reduction="mean")
        else:
            opt = ShardedAdamW(model.parameters(), grad_reduction="mean", **KW)
        x = torch.arange(8) * (rank + 1)
        model(x).square().mean().backward()
        opt.step()  # before the fix: gloo's "Received data size doesn't match" (SIGABRT), or silently another step
    except RuntimeError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("how", ["block size", "cost", "source", "version"])
def test_ranks_running_different_lightning_soaa_fail_together_at_construction(tmp_path: Path, how: str):
    """Ranks that agree on everything the user passed but run different code (one node upgraded, a patched
    copy) built different block tables, which met in a collective of another size (a crash of one rank inside
    gloo), or trained on silently. Now every rank raises the same error at construction, naming the field."""
    msgs = run_distributed(_w_skewed, 2, tmp_path, how, timeout=60)
    assert msgs[0] == msgs[1], msgs
    if how in ("block size", "cost"):
        assert "differ from rank 0 in: block table (blocks and their owners)." in msgs[0], msgs[0]
        assert "The block table alone differs" in msgs[0]
    else:
        assert "every rank must run the same lightning_soaa: rank(s) [1] run" in msgs[0], msgs[0]
        assert ("a different version" in msgs[0]) == (how == "version")
        assert "rank 1: 12345)" in msgs[0]  # as the node's package_identity() prints it


def _w_group_disagreement(rank, world_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    opt = ShardedAdamW(model[0].parameters(), **KW)
    try:
        opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.1 * (rank + 1)})
        msg = "no error"
    except RuntimeError as e:
        msg = str(e)
    groups = len(opt.param_groups)
    model(torch.ones(3, 4, dtype=torch.float64)).square().sum().backward()
    before = model[2].weight.detach().clone()
    opt.step()  # the optimizer as it was: the first layer's group only
    return msg, groups, torch.equal(before, model[2].weight)


def test_a_group_added_with_other_values_on_some_ranks_is_refused_on_every_rank_and_dropped(tmp_path: Path):
    """The cross-rank check of add_param_group raises on every rank together; the group stayed appended
    (only a ValueError dropped it), so param_groups and the block table disagreed from then on."""
    out = run_distributed(_w_group_disagreement, 2, tmp_path, timeout=60)
    assert out[0][0] == out[1][0] and "hyperparameters" in out[0][0], out
    assert all(groups == 1 and unmoved for _, groups, unmoved in out), out


def _w_group_refused_by_one_rank(rank, world_size):
    from lightning_soaa.optim.asgo import ASGO

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6)).double()
    opt = ASGO([model[0].weight], lr=1e-2)
    try:  # rank 1's row_parts=4 does not divide the 6 rows: its block specs raise, rank 0's do not
        opt.add_param_group({"params": [model[2].weight], "row_parts": 2 if rank == 0 else 4})
        msg = "no error"
    except (RuntimeError, ValueError) as e:
        msg = str(e)
    dist.barrier()  # every rank made the same collectives (a rank one all-gather ahead waited here: a hang)
    return msg, len(opt.param_groups)


def test_a_group_whose_blocks_are_refused_on_some_ranks_only_is_dropped_on_every_rank(tmp_path: Path):
    """The block table is built before the cross-rank check: a rank whose block specs raised skipped the
    check's all-gather, and rebuilding its old table (with the check) met the others' check of the new one;
    they raised there, rebuilt too, and waited in an all-gather the rank never made (a hang). It now joins
    the check with a failed row: every rank raises and drops the group, after the same all-gathers."""
    out = run_distributed(_w_group_refused_by_one_rank, 2, tmp_path, timeout=60)
    assert "raised on rank(s) [1]" in out[0][0], out
    assert "not a multiple of row_parts=4" in out[1][0], out
    assert all(groups == 1 for _, groups in out), out


def _w_join_refused_by_one_rank(rank, world_size, store2):
    import datetime

    dist.barrier()
    dist.destroy_process_group()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    opt = ShardedAdamW(model.parameters(), **KW)  # built before the group: it joins at its first step
    dist.init_process_group("gloo", store=dist.FileStore(store2, world_size), rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=30))
    if rank == 1:  # (a block spec valid at W = 1 refused at the join's W, on this rank only)
        def refuse(*args, **kwargs):
            raise ValueError("refused here")
        opt._block_specs = refuse
    model(torch.ones(3, 4, dtype=torch.float64)).square().sum().backward()
    try:
        opt.step()
        msg = "no error"
    except (RuntimeError, ValueError) as e:
        msg = str(e)
    dist.barrier()
    return msg, opt.join_pending


def test_a_join_whose_blocks_are_refused_on_some_ranks_only_raises_on_every_rank(tmp_path: Path):
    """At a join the table is built before the check too, and nothing else announced a rank's error there:
    the other ranks waited in the check's all-gather. It is now built before the join's first all-reduce, whose
    error flag carries it. (A join is part of a step: the others raise the same class, here a ValueError,
    naming rank 1.)"""
    out = run_distributed(_w_join_refused_by_one_rank, 2, tmp_path, str(tmp_path / "store2"), timeout=60)
    assert "rank(s) [1] raised an error as it joined the process group" in out[0][0], out
    assert "rank 1: ValueError" in out[0][0] and out[1][0] == "refused here", out
    assert all(pending for _, pending in out), out


def _built_without_last_layer(name):
    """The battery's model for optimizer ``name``, its optimizer built while the last layer was frozen."""
    from lightning_soaa import registry
    from tests.conformance._battery import make

    spec = registry.get(name)
    model, _ = make(spec)
    last = [p for p in model.parameters()][-2:]  # the last layer: built without it, added later
    for p in last:
        p.requires_grad_(False)
    return spec, model, last, spec.build(model, **spec.test_kwargs)


def _w_group_refused_on_one_rank(rank, world_size, name):
    from tests.conformance._battery import step

    spec, model, last, opt = _built_without_last_layer(name)
    for p in last:
        p.requires_grad_(True)
    try:
        opt.add_param_group({"params": last, "lr": -1.0 if rank == 1 else 0.1})
        msg = "no error"
    except (ValueError, RuntimeError) as e:
        msg = f"{type(e).__name__}: {e}"
    groups = len(opt.param_groups)
    for p in last:
        p.requires_grad_(False)
    step(spec, model, opt, 0, rank=rank, world=world_size, average=True)  # the optimizer as it was, on every rank
    return msg, groups, [p.detach().clone() for p in model.parameters()]


def _takes_groups() -> list[str]:
    from lightning_soaa.registry import REGISTRY, FirstArg

    return [s.name for s in REGISTRY if s.first_arg is FirstArg.NAMED_PARAMETERS]


@pytest.mark.parametrize("name", _takes_groups())
def test_a_group_refused_by_one_ranks_checks_is_dropped_on_every_rank(tmp_path: Path, name: str):
    """A group that one rank's own checks refuse (an invalid lr there only) raised on that rank alone, while
    the others went on into add_param_group's collectives (the state gather, the cross-rank check): a hang.
    Now every rank agrees first: the refusing rank raises its error, the others name it, nothing changes.
    Every optimizer of the registry that takes parameter groups (EGN takes a module and refuses groups)."""
    out = run_distributed(_w_group_refused_on_one_rank, 2, tmp_path, name, timeout=90)
    assert out[1][0].startswith("ValueError: Invalid lr=-1.0"), out[1][0]
    from lightning_soaa import registry

    cls = registry.get(name).load().__name__
    assert out[0][0].startswith(f"RuntimeError: {cls}.add_param_group: the group was refused on rank(s) [1]"), out
    assert "Invalid lr=-1.0" in out[0][0]
    assert out[0][1] == out[1][1] == 1
    for a, b in zip(out[0][2], out[1][2]):
        assert torch.equal(a, b)


def _w_group_added_on_one_rank(rank, world_size, name):
    """Rank 0 adds a group (a callback run on one rank only) between the gradients' averaging and the step."""
    from lightning_soaa.registry import StepNeeds, half_mse
    from tests.conformance._battery import data, step

    spec, model, last, opt = _built_without_last_layer(name)
    step(spec, model, opt, 0, rank=rank, world=world_size, average=True)
    x, y = data(1, rank=rank, world=world_size)
    opt.zero_grad()
    loss = half_mse(model(x), y)
    loss.backward()
    for p in model.parameters():  # what DDP does in backward
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size
    try:
        if rank == 0:
            for p in last:
                p.requires_grad_(True)
            opt.add_param_group({"params": last})
        opt.step(loss=loss.detach()) if spec.needs is StepNeeds.LOSS else opt.step()
        msg = "no error"
    except RuntimeError as e:
        msg = str(e)
    for p in last:
        p.requires_grad_(False)
    groups = len(opt.param_groups)
    step(spec, model, opt, 2, rank=rank, world=world_size, average=True)  # the optimizer as it was, on every rank
    return msg, groups, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", _takes_groups())
def test_a_group_added_on_some_ranks_only_is_refused_on_every_rank(tmp_path: Path, name: str):
    """add_param_group called on rank 0 only, where rank 1 went on to its step: add_param_group's agreement (an
    all-gather) met the step's first all-reduce, which passed, and both ranks then waited for ever in collectives
    of different kinds (a hang). Its agreement is now an all-reduce of the step record's size with its own
    instance id: both ranks raise, naming add_param_group; the group is dropped and the next steps agree."""
    from lightning_soaa import registry

    out = run_distributed(_w_group_added_on_one_rank, 2, tmp_path, name, timeout=60)
    cls = registry.get(name).load().__name__
    assert out[0][0].startswith(f"{cls}.add_param_group was called on rank(s) [0] only"), out[0][0]
    assert "add_param_group was called on some ranks only" in out[1][0] and "Nothing changed" in out[1][0], out[1][0]
    assert out[0][1] == out[1][1] == 1
    for a, b in zip(out[0][2], out[1][2]):
        assert torch.equal(a, b)


def _two_models_extended(name, rank, world_size, crossed):
    """Two models of one architecture (seeds 0 and 1), each with its optimizer built without its last layer
    and stepped twice; then each optimizer is given that layer, on rank 1 in the other order when ``crossed``
    (a loop over a dict of optimizers whose order differs between processes). The error raised, if any, each
    optimizer's group count, and both models' parameters after two more steps."""
    from lightning_soaa import registry
    from tests.conformance._battery import make, step

    spec = registry.get(name)
    built = []
    for seed in (0, 1):
        model, _ = make(spec, seed=seed)
        last = list(model.parameters())[-2:]
        for p in last:
            p.requires_grad_(False)
        built.append((model, last, spec.build(model, **spec.test_kwargs)))
    for t in range(2):
        for model, _, opt in built:
            step(spec, model, opt, t, rank=rank, world=world_size, average=True)
    order = built[::-1] if crossed and rank == 1 else built
    try:
        for _, last, opt in order:
            for p in last:
                p.requires_grad_(True)
            opt.add_param_group({"params": last})
        msg = "no error"
    except RuntimeError as e:
        msg = str(e)
        for _, last, _ in built:  # frozen again where no group took it
            for p in last:
                p.requires_grad_(False)
    for t in range(2, 4):
        for model, _, opt in built:
            step(spec, model, opt, t, rank=rank, world=world_size, average=True)
    return msg, [len(opt.param_groups) for _, _, opt in built], [
        p.detach().clone() for model, _, _ in built for p in model.parameters()]


def _w_two_models_extended(rank, world_size, name):
    return _two_models_extended(name, rank, world_size, crossed=True)


@pytest.mark.parametrize("name", _takes_groups())
def test_groups_added_to_different_optimizers_on_different_ranks_are_refused(tmp_path: Path, name: str):
    """Rank 0 adds a group to optimizer A while rank 1 adds one to B (two models of one architecture): every
    add_param_group meeting carried the same instance id, so the calls agreed and each passed the other's
    cross-rank check (shapes alike): both models ended 7e-2 (AdamW) to 1.3e-1 (SOAA) off the run adding in one
    order, silently. Now every rank raises, naming the ranks; no group is added, and the steps after it equal
    the one-process run of the optimizers as built."""
    from lightning_soaa import registry

    out = run_distributed(_w_two_models_extended, 2, tmp_path, name, timeout=120)
    for msg, groups, _ in out:
        assert "add_param_group: rank(s) [1] called it on another optimizer than rank 0" in msg, msg
        assert "nothing changed" in msg and groups == [1, 1], (msg, groups)
    spec = registry.get(name)
    ref = []
    for seed in (0, 1):
        from tests.conformance._battery import make, step

        model, _ = make(spec, seed=seed)
        for p in list(model.parameters())[-2:]:
            p.requires_grad_(False)
        opt = spec.build(model, **spec.test_kwargs)
        for t in range(4):
            step(spec, model, opt, t)
        ref += [p.detach() for p in model.parameters()]
    for r in range(2):
        for a, b in zip(out[r][2], ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _w_pickled(rank, world_size, shard):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    return pickle.dumps((model, ShardedAdamW(model[0].parameters(), shard=shard, **KW)))


@pytest.mark.parametrize("shard", [True, False])
def test_a_group_added_where_its_collectives_fail_leaves_the_optimizer_unchanged(tmp_path: Path, shard):
    """An optimizer pickled at W = 2 and loaded where no process group exists: add_param_group's first
    collective raises (its communicator cannot attach). The group stayed appended over the old block table
    (shard=True always; shard=False since the agreement's all-gather came first)."""
    model, opt = pickle.loads(run_distributed(_w_pickled, 2, tmp_path, shard, timeout=60)[0])
    with pytest.raises(RuntimeError, match="call torch.distributed.init_process_group"):
        opt.add_param_group({"params": list(model[2].parameters())})
    assert len(opt.param_groups) == 1


def _w_groups_added_one_at_a_time(rank, world_size):
    from lightning_soaa.registry import REGISTRY, FirstArg
    from tests.conformance._battery import step

    out = {}
    for spec in [s for s in REGISTRY if s.first_arg is FirstArg.NAMED_PARAMETERS]:
        models, opts = [tiny_mlp(0), tiny_mlp(0)], []
        for i, model in enumerate(models):
            named = list(model.named_parameters())
            groups = [{"params": named[:2]}] + [{"params": [np], "lr": spec.test_kwargs["lr"] * (0.5 + 0.1 * j)}
                                                for j, np in enumerate(named[2:])]
            opt = spec.load()(groups if i else groups[:1], **spec.test_kwargs)
            for g in groups[1:] if not i else ():  # the same collectives on every rank, in the same order
                opt.add_param_group(g)
            opts.append(opt)
        same_blocks = opts[0].block_table.blocks == opts[1].block_table.blocks
        for t in range(3):
            for model, opt in zip(models, opts):
                step(spec, model, opt, t, rank=rank, world=world_size, average=True)
        states = []
        for opt in opts:
            opt.consolidate_state_dict(to=None)
            states.append(opt.state_dict())
        out[spec.name] = (same_blocks, [o.block_table.owned() for o in opts], states,
                          [[p.detach().clone() for p in m.parameters()] for m in models])
    return out


def test_groups_added_one_at_a_time_equal_the_groups_given_up_front_at_w2(tmp_path: Path):
    """add_param_group appends the new group's blocks (owners assigned afresh over every block: an existing
    block may move to the other rank, its state with it) instead of rebuilding the table over every
    parameter: at W = 2 the blocks, owners, state and steps equal those of the optimizer built with every
    group at once, on every rank."""
    from tests.conformance._battery import assert_identical

    out = run_distributed(_w_groups_added_one_at_a_time, 2, tmp_path, timeout=120)
    for rank, per in enumerate(out):
        for name, (same_blocks, owned, states, ps) in per.items():
            assert same_blocks, (rank, name)
            assert owned[0] == owned[1] and owned[0], (rank, name)
            assert_identical(states[0], states[1], f"{name} rank {rank} state")
            assert_identical(ps[0], ps[1], f"{name} rank {rank} params")


def _w_memo_current_on_one_rank(rank, world_size):
    from lightning_soaa.optim.asgo import ASGO

    torch.manual_seed(0)
    d = [8, 40, 12, 36, 16, 32, 20]  # matrices of different costs: the owners follow the costs
    model = nn.Sequential(*[nn.Linear(d[i], d[i + 1], bias=False) for i in range(6)]).double()
    named = list(model.named_parameters())
    opt = ASGO([{"params": named[:4], "root_every": 1}], lr=1e-2)
    opt.param_groups[0]["root_every"] = 10  # a cost-only option: the existing blocks' costs change
    if rank == 1:  # moved on this rank only: its storage memo is stale, rank 0's current
        named[0][1].data = named[0][1].data.clone()
    try:
        opt.add_param_group({"params": named[4:]})
        msg = "no error"
    except RuntimeError as e:
        msg = str(e)
    return msg, [b.owner for b in opt.block_table.blocks]


def test_ranks_on_different_add_paths_agree_on_the_table(tmp_path: Path):
    """The storage memo that lets add_param_group extend the table is per rank (a parameter moved on one
    rank only); an extended table keeps the existing blocks' costs, a full build recomputes them (a
    root_every changed since), so one rank extending while the other rebuilt assigned other owners and the
    cross-rank check refused a valid group on every rank. The ranks agree on the path first."""
    out = run_distributed(_w_memo_current_on_one_rank, 2, tmp_path, timeout=90)
    assert [msg for msg, _ in out] == ["no error", "no error"], out
    assert out[0][1] == out[1][1] and len(out[0][1]) == 6, out
