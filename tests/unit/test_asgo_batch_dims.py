"""ASGO's ``batch_dims=1`` (stacked Mixture-of-Experts weights) on one process.

The oracle (tests/unit/_experts_oracle.py): experts stacked into ``[E, ...]`` parameters and stepped with
``batch_dims=1`` equal the same experts as separate parameters, bit for bit. Here also: the blocks and
state per expert, the default unchanged, checkpoints (round trip; a checkpoint of the other batch_dims is
refused), validation. W = 2 and 3: tests/distributed/test_asgo_batch_dims_distributed.py.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

import pytest
import torch
from torch import nn

from lightning_soaa import ASGO, DASGO
from lightning_soaa.optim.asgo import asgo_block_cost, asgo_block_specs
from tests.unit._experts_oracle import DENSE_SHAPES, EXPERT_SHAPES, KW, E, as_stacks, run, stacked_params

f64 = torch.float64


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("root_every", [2, "auto"])
def test_stacked_experts_step_as_separate_matrices(dtype: torch.dtype, root_every: Any) -> None:
    """Every expert is its own matrix: its own momentum, V, root and RMS normalisation (expert 1 of the
    first stack has 50x larger gradients, which a shared normalisation would pass on to the others).
    The arithmetic is the same per expert, so the runs agree to the bit in both dtypes."""
    sep, _ = run(False, 6, dtype, root_every=root_every)
    stk, opt = run(True, 6, dtype, root_every=root_every)
    for a, b in zip(as_stacks(sep, False), as_stacks(stk, True)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12 if dtype == f64 else 1e-6)
    assert opt.statistics()["asgo_root_fallbacks"] == 0.0


def test_an_expert_without_tokens_is_not_stepped() -> None:
    # its gradient slice is all zero; stepped, its stale momentum moved it by lr * rms_scale per entry at
    # every idle step (37% of its norm in 30 steps, measured), where a skipped separate expert stays put
    named, opt = run(True, 2)  # expert 0 of stack 2 is idle in steps 0 and 1 (oracle.idle)
    stack = dict(named)["experts2"]
    block = opt.block_table.by_param[len(DENSE_SHAPES) + 2][0]
    assert opt.state[stack].get(block.sub_index, {}) == {}
    torch.testing.assert_close(stack.detach()[0], stacked_params()[len(DENSE_SHAPES) + 2][1].detach()[0],
                               rtol=0, atol=0)
    named, opt = run(True, 5)  # expert 2 of stack 0: idle at steps 1 and 4, stepped at 0, 2, 3
    stack = dict(named)["experts0"]
    steps = [int(opt.state[stack][b.sub_index]["step"]) for b in opt.block_table.by_param[len(DENSE_SHAPES)]]
    assert steps == [5, 5, 3], steps


def test_each_expert_is_one_block_with_its_own_state() -> None:
    named, opt = run(True, 3)
    experts = dict(named)
    for j, shape in enumerate(EXPERT_SHAPES):
        p = experts[f"experts{j}"]
        blocks = opt.block_table.by_param[len(DENSE_SHAPES) + j]
        assert [(b.dim, b.start, b.stop) for b in blocks] == [(0, e, e + 1) for e in range(E)]
        m, n = shape[0], int(torch.tensor(shape[1:]).prod())
        k = min(m, n)
        for b in blocks:
            st = opt.state[p][b.sub_index]
            assert st["exp_avg"].shape == (m, n) and st["gram"].shape == (k, k) and st["inv_root"].shape == (k, k)
            # ownership is weighed per expert, with the cost of an m x n matrix
            assert b.cost == asgo_block_cost(k, max(m, n), 10, 2, "polar_express")
    # the 2-D router and the 1-D norm are unaffected (ignored there)
    assert [len(opt.block_table.by_param[i]) for i in range(len(DENSE_SHAPES))] == [1, 1]
    assert opt.state[experts["router.weight"]]["gram"].shape == (E, E)
    assert opt._split_layout() is None  # experts are separate matrices, not pieces of one


def test_block_specs_of_a_stack() -> None:
    specs = asgo_block_specs((4, 5, 3, 2), 1024, batch_dims=1)
    assert [(s.dim, s.start, s.stop) for s in specs] == [(0, e, e + 1) for e in range(4)]
    assert len({s.cost for s in specs}) == 1
    assert asgo_block_specs((4, 5, 6), 1024, batch_dims=0) == asgo_block_specs((4, 5, 6), 1024)
    assert asgo_block_specs((4, 5), 1024, batch_dims=1) == asgo_block_specs((4, 5), 1024)  # < 3-D: ignored


def test_batch_dims_0_is_the_default_and_unchanged() -> None:
    """``batch_dims=0`` (given or not) keeps a stack one ``E x prod(rest)`` matrix, as before the option;
    ``batch_dims=1`` steps it differently."""
    given, o_given = run(True, 4, batch_dims=0)
    default, o_default = run(True, 4, batch_dims=0)
    named = stacked_params()
    o_plain = ASGO(named, **KW)
    assert o_plain.param_groups[0]["batch_dims"] == 0
    _, o_plain = run(True, 4, opt=o_plain, named=named)
    for (_, a), (_, b), (_, c) in zip(given, default, named):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
        torch.testing.assert_close(b, c, rtol=0, atol=0)
    p = dict(named)["experts0"]
    assert [(b.dim, b.start, b.stop) for b in o_plain.block_table.by_param[len(DENSE_SHAPES)]] == [(None, 0, 0)]
    assert o_plain.state[p]["exp_avg"].shape == (E, 21) and o_plain.state[p]["gram"].shape == (E, E)
    batched, _ = run(True, 4)
    assert not torch.equal(dict(batched)["experts0"], p)


def test_ignored_for_parameters_with_fewer_than_three_dimensions() -> None:
    named = [(n, p) for n, p in stacked_params() if p.dim() < 3]
    twin = copy.deepcopy(named)
    o1, o2 = ASGO(named, batch_dims=1, **KW), ASGO(twin, **KW)
    for o, ps in ((o1, named), (o2, twin)):
        for t in range(3):
            g = torch.Generator().manual_seed(t)
            for _, p in ps:
                p.grad = torch.randn(p.shape, generator=g, dtype=f64)
            o.step()
    for (_, a), (_, b) in zip(named, twin):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert o1.block_table.layout() == o2.block_table.layout()


def test_experts_wider_than_max_block_size_stay_whole_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    """A block is one range along one dimension, so an expert cannot be cut on its own: it stays one
    block (the oracle holds against separate experts that fit max_block_size) and a warning says so."""
    with caplog.at_level(logging.WARNING, logger="lightning_soaa.optim.asgo"):
        stk, opt = run(True, 3, max_block_size=2)
    assert "experts1 of shape (3, 6, 4) (batch_dims=1): each of its 3 experts is a 6x4 matrix" in caplog.text
    assert "max_block_size=2" in caplog.text
    assert all(len(opt.block_table.by_param[len(DENSE_SHAPES) + j]) == E for j in range(len(EXPERT_SHAPES)))
    sep, _ = run(False, 3)
    for a, b in zip(as_stacks(sep, False)[len(DENSE_SHAPES):], as_stacks(stk, True)[len(DENSE_SHAPES):]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_param_group_option_per_group() -> None:
    """One group of stacks with ``batch_dims=1``, another with the default: each as its own spelling."""
    named = stacked_params()
    stacks = [(n, p) for n, p in named if p.dim() >= 3]
    opt = ASGO([{"params": stacks[:1], "batch_dims": 1}, {"params": stacks[1:]}], **KW)
    assert [g["batch_dims"] for g in opt.param_groups] == [1, 0]
    assert [len(opt.block_table.by_param[i]) for i in range(3)] == [E, 1, 1]


# ------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_continues_as_the_uninterrupted_run() -> None:
    ref, _ = run(True, 5)
    named, opt = run(True, 3)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["param_groups"][0]["batch_dims"] == 1
    resumed = ASGO(named, **KW, batch_dims=1)
    resumed.load_state_dict(sd)
    run(True, 2, start=3, opt=resumed, named=named)
    for (_, a), (_, b) in zip(ref, named):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("saved,here", [(0, 1), (1, 0)])
@pytest.mark.parametrize("max_block_size", [1024, 1])
def test_checkpoint_of_the_other_batch_dims_is_refused(saved: int, here: int, max_block_size: int) -> None:
    """With ``max_block_size=1`` a 3 x (7) stack of batch_dims=0 is cut into the same one-row blocks as
    its experts with batch_dims=1: the layout alone would not tell them apart."""
    named, opt = run(True, 2, batch_dims=saved, max_block_size=max_block_size)
    sd = copy.deepcopy(opt.state_dict())
    other = ASGO(named, **KW, batch_dims=here, max_block_size=max_block_size)
    if max_block_size == 1:
        assert opt.block_table.layout()[len(DENSE_SHAPES)] == other.block_table.layout()[len(DENSE_SHAPES)]
    with pytest.raises(ValueError, match=re.escape(f"param_groups[0] was saved with batch_dims={saved} and this "
                                                   f"optimizer has batch_dims={here}")):
        other.load_state_dict(sd)
    assert not any(other.state.values()) and other.num_steps == 0  # nothing changed


def test_checkpoint_of_the_other_batch_dims_loads_where_it_changes_nothing() -> None:
    """A group without >= 3-D matrices cuts and steps the same with either value: its checkpoint loads."""
    named = [(n, p) for n, p in stacked_params() if p.dim() < 3]
    opt = ASGO(named, **KW)
    _, opt = run(True, 0, opt=opt, named=named)
    for p in dict(named).values():
        p.grad = torch.ones_like(p)
    opt.step()
    other = ASGO(named, **KW, batch_dims=1)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert other.param_groups[0]["batch_dims"] == 1 and other.num_steps == 1


# ------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("value", [-1, 2, 1.5, 1.0, True, False, "1", None])
def test_bad_batch_dims_raise_naming_field_value_and_range(value: Any) -> None:
    msg = f"Invalid batch_dims={value!r}. Must be 0 (a parameter with more than two dimensions is one matrix"
    with pytest.raises(ValueError, match=re.escape(msg)):
        ASGO(stacked_params(), batch_dims=value)
    with pytest.raises(ValueError, match=re.escape(msg)):  # as a param-group option
        ASGO([{"params": stacked_params(), "batch_dims": value}])


def test_batch_dims_written_into_a_group_after_construction_is_refused() -> None:
    named, opt = run(True, 1, batch_dims=0)
    opt.param_groups[0]["batch_dims"] = 1
    for _, p in named:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=re.escape("batch_dims=1 was written into the group after construction")):
        opt.step()


@pytest.mark.parametrize("value", [1, True])
def test_dasgo_refuses_batch_dims(value: Any) -> None:
    with pytest.raises(ValueError, match=re.escape(f"Invalid batch_dims={value!r} for DASGO. Must be 0")):
        DASGO([{"params": stacked_params(), "batch_dims": value}])
    DASGO([{"params": stacked_params(), "batch_dims": 0}])  # the default is accepted


def test_a_stack_routed_to_adamw_ignores_batch_dims() -> None:
    named = [(n, p) for n, p in stacked_params() if p.dim() >= 3]
    opt = ASGO([{"params": named, "use_asgo": False, "batch_dims": 1}], **KW)
    assert all(len(b) == 1 for b in opt.block_table.by_param)
    p = nn.Parameter(torch.zeros(2, 3, 4, dtype=f64))
    ASGO([("tok_emb", p)], batch_dims=1)  # an "emb" name: AdamW, one block


def test_a_step_that_would_overflow_one_experts_statistic_is_skipped() -> None:
    """The statistic guard reads each expert's gradient as that expert's matrix: finite float32 gradients
    of 1e20 in one row of one expert (whose Gram would overflow) skip the step, as for a 2-D parameter."""
    named, opt = run(True, 1, torch.float32)
    before = [p.detach().clone() for _, p in named]
    for _, p in named:
        p.grad = torch.ones_like(p)
    dict(named)["experts1"].grad[2, 4].fill_(1e20)
    opt.step()
    assert opt.skipped_steps == 1
    for (_, p), b in zip(named, before):
        torch.testing.assert_close(p, b, rtol=0, atol=0)
