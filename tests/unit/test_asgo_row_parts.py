"""ASGO's ``row_parts`` (a fused matrix, e.g. a QKV projection, stepped as its parts) on one process.

The oracle: the parts as separate parameters. A fused ``[p * r, n]`` weight in a ``row_parts=p`` group
equals them bit for bit (each part its own blocks, momentum, V, root and RMS normalisation). Also: the
blocks, checkpoints (round trip; a checkpoint of another ``row_parts`` refused), validation. W = 3:
tests/distributed/test_asgo_distributed.py.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
from torch import nn

from lightning_soaa import ASGO, DASGO

f64 = torch.float64
KW: dict[str, Any] = dict(lr=5e-2, root_every=2, damping=1e-6)


def _fused(parts: int, rows: int, cols: int) -> tuple[nn.Parameter, list[nn.Parameter]]:
    """A fused ``[parts * rows, cols]`` weight and the same numbers as ``parts`` separate weights."""
    g = torch.Generator().manual_seed(0)
    fused = nn.Parameter(torch.randn(parts * rows, cols, generator=g, dtype=f64))
    return fused, [nn.Parameter(fused.detach()[i * rows:(i + 1) * rows].clone()) for i in range(parts)]


def _train(fused: nn.Parameter, separate: list[nn.Parameter], steps: int, **kw: Any) -> tuple[ASGO, ASGO]:
    """Both stepped on the same gradients; part 1's are 50x larger (a shared normalisation would pass
    that on to the other parts)."""
    parts = len(separate)
    a = ASGO([{"params": [("qkv.weight", fused)], "row_parts": parts}], **KW, **kw)
    b = ASGO([(f"part{i}.weight", p) for i, p in enumerate(separate)], **KW, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=g, dtype=f64) * (50.0 if i == 1 else 1.0)
                 for i, p in enumerate(separate)]
        fused.grad = torch.cat(grads)
        for p, gr in zip(separate, grads):
            p.grad = gr.clone()
        a.step()
        b.step()
    return a, b


@pytest.mark.parametrize("rows,cols,max_block_size", [(6, 6, 1024), (6, 4, 1024), (4, 10, 1024), (4, 10, 2)],
                         ids=["square-right", "tall-right", "wide-left", "wide-left-cut"])
def test_a_fused_matrix_steps_as_its_parts_bit_for_bit(rows: int, cols: int, max_block_size: int) -> None:
    fused, separate = _fused(3, rows, cols)
    a, b = _train(fused, separate, 5, max_block_size=max_block_size)
    torch.testing.assert_close(fused.detach(), torch.cat([p.detach() for p in separate]), rtol=0, atol=0)
    assert [blk.shape for blk in a.block_table.blocks] == [blk.shape for blk in b.block_table.blocks]
    assert a.statistics()["asgo_root_fallbacks"] == 0.0


def test_without_row_parts_the_fused_matrix_shares_one_preconditioner() -> None:
    """(so the test above can fail: one Gram and one norm over the three parts is another step)"""
    fused, separate = _fused(3, 6, 6)
    a = ASGO([("qkv.weight", fused)], **KW)
    b = ASGO([(f"part{i}.weight", p) for i, p in enumerate(separate)], **KW)
    for opt, params in ((a, [fused]), (b, separate)):
        for p in params:
            p.grad = torch.ones_like(p) + torch.arange(p.numel(), dtype=f64).reshape(p.shape) / 7
        opt.step()
    assert (fused.detach() - torch.cat([p.detach() for p in separate])).abs().max() > 1e-3
    assert len(a.block_table.blocks) == 1


def test_checkpoint_round_trip_and_another_row_parts_refused() -> None:
    fused, separate = _fused(3, 6, 6)
    a, _ = _train(fused, separate, 3)
    sd = copy.deepcopy(a.state_dict())
    again = ASGO([{"params": [("qkv.weight", fused)], "row_parts": 3}], **KW)
    again.load_state_dict(sd)
    assert again.num_steps == 3
    other = ASGO([("qkv.weight", fused)], **KW)
    with pytest.raises(ValueError, match=re.escape("param_groups[0] was saved with row_parts=3, this optimizer has "
                                                   "row_parts=1")):
        other.load_state_dict(copy.deepcopy(sd))
    assert not any(other.state.values()) and other.num_steps == 0  # nothing changed


def test_a_refused_layout_names_the_option_of_the_group_whose_blocks_differ() -> None:
    """(review) Another max_block_size in group 0 changes nothing there (a 3 x 4 matrix fits either): the
    message named it instead of group 1's row_parts, which moved the blocks."""
    a = nn.Parameter(torch.randn(3, 4, dtype=f64))
    fused, _ = _fused(3, 6, 6)

    def build(max_block_size: int, parts: int) -> ASGO:
        return ASGO([{"params": [("a.weight", a)], "max_block_size": max_block_size},
                     {"params": [("qkv.weight", fused)], "row_parts": parts}], **KW)

    opt = build(1024, 3)
    a.grad, fused.grad = torch.ones_like(a), torch.ones_like(fused)
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match=re.escape("param_groups[1] was saved with row_parts=3, this optimizer has "
                                                   "row_parts=1")):
        build(512, 1).load_state_dict(copy.deepcopy(sd))
    build(512, 3).load_state_dict(copy.deepcopy(sd))  # the same blocks: loads


def test_row_parts_written_into_a_group_after_construction_is_refused() -> None:
    fused, _ = _fused(3, 6, 6)
    opt = ASGO([{"params": [("qkv.weight", fused)], "row_parts": 3}], **KW)
    opt.param_groups[0]["row_parts"] = 1
    fused.grad = torch.ones_like(fused)
    with pytest.raises(ValueError, match=re.escape("row_parts=1 was written into the group after construction")):
        opt.step()


# ------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "3", None])
def test_bad_row_parts_raise_naming_field_value_and_range(value: Any) -> None:
    fused, _ = _fused(3, 6, 6)
    msg = f"Invalid row_parts={value!r}. Must be an integer >= 1."
    with pytest.raises(ValueError, match=re.escape(msg)):
        ASGO([("qkv.weight", fused)], row_parts=value)
    with pytest.raises(ValueError, match=re.escape(msg)):  # as a param-group option
        ASGO([{"params": [("qkv.weight", fused)], "row_parts": value}])


def test_rows_not_a_multiple_of_row_parts_are_refused_naming_the_parameter() -> None:
    p = nn.Parameter(torch.zeros(7, 4, dtype=f64))
    with pytest.raises(ValueError, match=re.escape("parameter qkv.weight of shape (7, 4) in a row_parts=3 group "
                                                   "has 7 rows, not a multiple of row_parts=3")):
        ASGO([{"params": [("qkv.weight", p)], "row_parts": 3}])


def test_a_part_wider_than_max_block_size_on_its_right_side_is_refused() -> None:
    p = nn.Parameter(torch.zeros(24, 8, dtype=f64))  # parts of 8 x 8: right side, k = 8 > 4
    with pytest.raises(ValueError, match=re.escape("preconditioned on their right side of 8 > max_block_size=4")):
        ASGO([{"params": [("qkv.weight", p)], "row_parts": 3}], max_block_size=4)


def test_row_parts_with_batch_dims_and_in_dasgo_are_refused() -> None:
    fused, _ = _fused(3, 6, 6)
    with pytest.raises(ValueError, match=re.escape("Invalid row_parts=3 with batch_dims=1. Must be 1")):
        ASGO([("qkv.weight", fused)], row_parts=3, batch_dims=1)
    with pytest.raises(ValueError, match=re.escape("Invalid row_parts=3 for DASGO. Must be 1")):
        DASGO([{"params": [("qkv.weight", fused)], "row_parts": 3}])


def test_one_dimensional_and_adamw_parameters_ignore_row_parts() -> None:
    bias = nn.Parameter(torch.zeros(7, dtype=f64))
    table = nn.Parameter(torch.zeros(7, 4, dtype=f64))
    opt = ASGO([{"params": [("qkv.bias", bias), ("tok_emb.weight", table)], "row_parts": 3}], **KW)
    assert [len(b) for b in opt.block_table.by_param] == [1, 1]


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_emb, self.qkv, self.proj = nn.Embedding(11, 6), nn.Linear(6, 18), nn.Linear(6, 6)


def test_asgo_param_groups_puts_the_fused_matrices_in_a_row_parts_group() -> None:
    from lightning_soaa.optim.asgo import asgo_param_groups

    groups = asgo_param_groups(_Attention(), fused={"qkv.weight": 3}, lr=0.1)
    assert [[n for n, _ in g["params"]] for g in groups] == [
        ["qkv.bias", "proj.weight", "proj.bias"], ["tok_emb.weight"], ["qkv.weight"]]
    assert groups[2]["row_parts"] == 3 and all(g["lr"] == 0.1 for g in groups)
    opt = ASGO(groups)
    assert [b.shape for b in opt.block_table.by_param[4]] == [(6, 6)] * 3
    with pytest.raises(ValueError, match=re.escape("no matrix parameter's name, trainable or frozen, ends with "
                                                   "'kv_proj.weight'")):
        asgo_param_groups(_Attention(), fused={"kv_proj.weight": 2})
    # overlapping suffixes, in either order: the longest a name ends with wins, the other is not "unmatched"
    for fused in ({"weight": 2, "qkv.weight": 3}, {"qkv.weight": 3, "weight": 2}):
        groups = asgo_param_groups(_Attention(), fused=fused)
        assert {g.get("row_parts"): [n for n, _ in g["params"]] for g in groups if "row_parts" in g} == {
            3: ["qkv.weight"], 2: ["proj.weight"]}
