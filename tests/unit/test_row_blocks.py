"""Finer sharding of elementwise optimizers: parameters cut into row blocks of <= max_block_numel
(DASGO: its matrices into column blocks, its AdamW parameters into row blocks).

The cut must not change the result (SOAA and AdamW are elementwise; SOAA's global sums only change
their summation order), must not depend on W, and must spread the state so each rank holds ~1/W.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_soaa import registry
from lightning_soaa.distributed.blocks import row_block_specs
from tests.harness.distributed import run_distributed
from tests.harness.models import batch

N_MATRICES, D = 10, 10
SPLIT = 30  # a 10 x 10 weight -> rows (3, 3, 2, 2): four blocks per matrix, 40 in all


def test_row_block_specs_ranges() -> None:
    assert [(s.dim, s.start, s.stop, s.cost) for s in row_block_specs((10, 10), 30)] == [
        (0, 0, 3, 30.0), (0, 3, 6, 30.0), (0, 6, 8, 20.0), (0, 8, 10, 20.0)]
    assert [(s.dim, s.cost) for s in row_block_specs((10, 10), 100)] == [(None, 100.0)]
    # a row larger than the limit is not cut; 1-D parameters cut into element ranges
    assert [(s.start, s.stop) for s in row_block_specs((3, 50), 20)] == [(0, 1), (1, 2), (2, 3)]
    assert [(s.start, s.stop) for s in row_block_specs((7,), 3)] == [(0, 3), (3, 5), (5, 7)]
    assert len(row_block_specs((1, 1000), 10)) == 1 and len(row_block_specs((), 1)) == 1


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_row_block_specs_rejects(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_block_numel"):
        row_block_specs((4, 4), bad)


def test_adamw_rejects_bad_option() -> None:
    with pytest.raises(ValueError, match="max_block_numel=0"):
        registry.get("AdamW").build(nn.Linear(2, 2), max_block_numel=0)


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(N_MATRICES):
        layers += [nn.Linear(D, D, bias=False), nn.Tanh()]
    return nn.Sequential(*layers).double()


def _build(name: str, model: nn.Module, max_block_numel: int | None) -> Any:
    spec = registry.get(name)
    kwargs = {k: v for k, v in spec.test_kwargs.items() if k != "max_block_numel"}
    group: dict[str, Any] = {"params": list(model.parameters())}
    if max_block_numel is not None:
        group["max_block_numel"] = max_block_numel  # a param-group option for every elementwise optimizer
    return spec.load()([group], **kwargs)


def _train(name: str, max_block_numel: int | None, steps: int = 4) -> tuple[Any, nn.Module]:
    model = _model()
    opt = _build(name, model, max_block_numel)
    for t in range(steps):
        x, y = batch(t, 0, n=8, d_in=D, d_out=D)
        registry.get(name).take_step(opt, model, x, y)
    return opt, model


def _state_numel(opt: Any) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            items = v.values() if isinstance(v, dict) else [v]
            total += sum(t.numel() for t in items if torch.is_tensor(t) and t.dim() > 0)
    return total


@pytest.mark.parametrize("name", ["SOAA", "AdamW", "DASGO"])
def test_split_equals_whole_one_process(name: str) -> None:
    opt_split, split = _train(name, SPLIT)
    opt_whole, whole = _train(name, 10**6)
    assert len(opt_split.block_table.blocks) == 4 * N_MATRICES
    assert len(opt_whole.block_table.blocks) == N_MATRICES
    for a, b in zip(split.parameters(), whole.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert _state_numel(opt_split) == _state_numel(opt_whole)


def _ranks(rank: int, world: int, name: str) -> dict[str, Any]:
    model = _model()
    opt = _build(name, model, SPLIT)
    for t in range(4):
        x, y = batch(t, 0, n=8, d_in=D, d_out=D)  # the same batch on every rank (gradients already averaged)
        registry.get(name).take_step(opt, model, x, y)
    state = _state_numel(opt)
    opt.consolidate_state_dict(to=None)  # the W-independent checkpoint a run at another W resumes from
    return {"params": [p.detach().clone() for p in model.parameters()], "state": state,
            "sd": opt.state_dict()["state"]}


@pytest.mark.parametrize("name", ["SOAA", "AdamW", "DASGO"])
@pytest.mark.parametrize("world", [2, 4])
def test_split_w_ranks_equal_one_process_and_state_is_1_over_w(name: str, world: int, tmp_path: Any) -> None:
    opt_ref, ref = _train(name, SPLIT)
    full = _state_numel(opt_ref)
    results = run_distributed(_ranks, world, tmp_path, name)
    for r, res in enumerate(results):
        for a, b in zip(res["params"], ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"rank {r}")
        # 40 equal-ish blocks over W ranks: at most ceil(40/W) blocks of <= 30 of the 100 elements
        assert res["state"] <= full / world * 1.05, (r, res["state"], full)
    assert sum(res["state"] for res in results) == full
    torch.testing.assert_close(results[0]["sd"], opt_ref.state_dict()["state"], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- the automatic block size
AUTO_FLOOR = 8  # the automatic size's floor for these tests (2**18 by default: no 10 x 10 matrix is cut)


def _auto_ranks(rank: int, world: int, name: str) -> dict[str, Any]:
    registry.get(name).load().default_max_block_numel = AUTO_FLOOR  # this worker process only
    model = _model()
    opt = _build(name, model, None)  # max_block_numel unset: automatic
    for t in range(4):
        x, y = batch(t, 0, n=8, d_in=D, d_out=D)
        registry.get(name).take_step(opt, model, x, y)
    state = _state_numel(opt)
    opt.consolidate_state_dict(to=None)
    return {"params": [p.detach().clone() for p in model.parameters()], "state": state,
            "blocks": len(opt.block_table.blocks), "sd": opt.state_dict()}


@pytest.mark.parametrize("name", ["SOAA", "AdamW"])
def test_automatic_block_size_follows_the_world_size_and_checkpoints_move_between_them(
        name: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset ``max_block_numel``: ~8 blocks per rank (here 1000 elements, floor 8: W = 1 keeps the 10
    matrices whole, W = 2 cuts each in 2, W = 4 in 4), each rank keeps ~1/W of the state, the ranks equal
    one process, and the checkpoint of any W loads into any other (its state re-cut)."""
    monkeypatch.setattr(registry.get(name).load(), "default_max_block_numel", AUTO_FLOOR)
    opt_ref, ref = _train(name, None)
    assert len(opt_ref.block_table.blocks) == N_MATRICES
    full = _state_numel(opt_ref)
    for world, blocks in ((2, 2 * N_MATRICES), (4, 4 * N_MATRICES)):
        results = run_distributed(_auto_ranks, world, tmp_path, name)
        for r, res in enumerate(results):
            assert res["blocks"] == blocks
            for a, b in zip(res["params"], ref.parameters()):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"W={world} rank {r}")
            assert res["state"] <= full / world * 1.05, (world, r, res["state"], full)
        model = _model()
        resumed = _build(name, model, None)  # one process: whole matrices
        resumed.load_state_dict(results[0]["sd"])
        torch.testing.assert_close(resumed.state_dict()["state"], opt_ref.state_dict()["state"],
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["SOAA", "AdamW"])
def test_automatic_block_size_at_the_real_floor(name: str) -> None:
    """The README's example with the default floor (2**18): ten 1000 x 1000 matrices stay whole in one
    process (10 blocks) and are cut into 4 each for W = 4 (312,500 elements: 10 blocks per rank)."""
    params = [nn.Parameter(torch.zeros(1000, 1000)) for _ in range(10)]
    opt = registry.get(name).load()(params)
    assert len(opt.block_table.blocks) == 10
    limit = opt._auto_block_numel(params, 4)
    assert limit == 312_500
    assert sum(len(row_block_specs((1000, 1000), limit)) for _ in params) == 40
    assert opt._auto_block_numel(params[:1], 4) == opt.default_max_block_numel == 2**18  # the floor
