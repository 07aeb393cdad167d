"""Owner assignment and the block table: pure functions, no process group."""

from __future__ import annotations

import pytest
import torch

from lightning_soaa.distributed.assignment import assign_owners, rank_loads
from lightning_soaa.distributed.blocks import BlockSpec, BlockTable, param_fingerprint


def test_uneven_sizes_are_balanced_largest_first():
    costs = [900, 400, 400, 300, 10]
    owners = assign_owners(costs, 3)
    # LPT by hand: 900->r0, 400->r1, 400->r2, 300->r1 (tie 400/400 -> lowest rank), 10->r2
    assert owners == [0, 1, 2, 1, 2]
    assert rank_loads(costs, owners, 3) == [900.0, 700.0, 410.0]


def test_more_ranks_than_blocks_leaves_idle_ranks():
    owners = assign_owners([5.0, 3.0], 4)
    assert owners == [0, 1]
    assert rank_loads([5.0, 3.0], owners, 4)[2:] == [0.0, 0.0]


def test_one_huge_block_goes_alone():
    costs = [1e9] + [1.0] * 10
    owners = assign_owners(costs, 3)
    assert owners[0] == 0
    assert all(o != 0 for o in owners[1:])


def test_deterministic_and_independent_of_input_object():
    costs = [float((i * 7919) % 101) for i in range(200)]
    a = assign_owners(costs, 4)
    b = assign_owners(list(reversed(list(reversed(costs)))), 4)
    assert a == b
    # equal costs: ties broken by block index, then rank, so the answer is fixed
    assert assign_owners([1.0] * 5, 2) == [0, 1, 0, 1, 0]


def test_lpt_within_four_thirds_of_ideal():
    costs = [float(c) for c in torch.randint(1, 1000, (300,), generator=torch.Generator().manual_seed(0))]
    for w in (2, 3, 4, 7):
        loads = rank_loads(costs, assign_owners(costs, w), w)
        assert max(loads) <= (4 / 3) * max(sum(costs) / w, max(costs))


@pytest.mark.parametrize("bad", [[-1.0], [float("nan")]])
def test_bad_costs(bad):
    with pytest.raises(ValueError, match="Invalid cost of block 0"):
        assign_owners(bad, 2)


def test_bad_world_size():
    with pytest.raises(ValueError, match=r"Invalid world_size=0\. Must be >= 1\."):
        assign_owners([1.0], 0)


def test_block_table_views_and_layout():
    p = torch.arange(12.0).view(3, 4)
    q = torch.zeros(5)
    specs = [[BlockSpec(1, 0, 2, 6.0), BlockSpec(1, 2, 4, 6.0)], [BlockSpec(None, 0, 0, 5.0)]]
    table = BlockTable([p, q], [0, 0], specs, world_size=2, rank=1)
    assert [b.owner for b in table.blocks] == [0, 1, 0]
    assert table.blocks[1].view(p).tolist() == [[2.0, 3.0], [6.0, 7.0], [10.0, 11.0]]
    assert table.blocks[1].shape == (3, 2)
    assert [b.block_id for b in table.owned()] == [1]
    assert table.layout() == [[(1, 0, 2), (1, 2, 4)], [(None, 0, 0)]]
    with pytest.raises(ValueError, match="invalid range"):
        BlockTable([p], [0], [[BlockSpec(0, 2, 9, 1.0)]], world_size=1, rank=0)


def test_fingerprint_sees_shape_and_dtype():
    a = [torch.zeros(3, 4), torch.zeros(4)]
    assert param_fingerprint(a) == param_fingerprint([torch.ones(3, 4), torch.ones(4)])
    assert param_fingerprint(a) != param_fingerprint([torch.zeros(4, 3), torch.zeros(4)])
    assert param_fingerprint(a) != param_fingerprint([torch.zeros(3, 4, dtype=torch.float64), torch.zeros(4)])


@pytest.mark.parametrize("world,rank,shard", [(1, 0, True), (3, 1, True), (4, 3, True), (2, 1, False)])
def test_an_extended_table_is_the_table_built_over_every_parameter(world, rank, shard):
    """``BlockTable.extended`` (add_param_group appends a group's blocks instead of rebuilding): the blocks,
    owners (an existing block may move to another rank at W > 1) and per-parameter lists a full build makes;
    the table extended is left as it was."""
    g = torch.Generator().manual_seed(world)
    params = [torch.zeros(int(torch.randint(1, 9, (), generator=g)), 3) for _ in range(12)]
    specs = [[BlockSpec(None, 0, 0, float(p.numel()))] if i % 3 else
             [BlockSpec(0, 0, 1, 3.0), BlockSpec(0, 1, p.shape[0], 3.0 * (p.shape[0] - 1))] if p.shape[0] > 1 else
             [BlockSpec(None, 0, 0, 3.0)] for i, p in enumerate(params)]
    groups = [min(i, 5) for i in range(len(params))]
    table = BlockTable(params[:2], groups[:2], specs[:2], world_size=world, rank=rank, shard=shard)
    for k in range(2, len(params)):
        before = list(table.blocks)
        grown = table.extended(params[k:k + 1], groups[k:k + 1], specs[k:k + 1])
        assert table.blocks == before
        table = grown
        full = BlockTable(params[:k + 1], groups[:k + 1], specs[:k + 1], world_size=world, rank=rank, shard=shard)
        assert table.blocks == full.blocks and table.by_param == full.by_param and table.owned() == full.owned()
        assert (table.world_size, table.rank, table.shard) == (full.world_size, full.rank, full.shard)
