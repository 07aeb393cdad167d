"""``add_param_group`` after construction, called once per layer (Lightning's BaseFinetuning unfreezing layer by
layer, per-layer lr groups built incrementally): each call re-cut every existing parameter's blocks and
re-checked every parameter's storage, so N calls cost N^2 / 2 parameter visits (1000 one-parameter groups:
11 s, against 0.19 s for torch's AdamW). A group is now appended to the block table while the existing groups
and their parameters are as built (their storage re-read, not re-checked); anything else takes the full path.
The guarantees (overlap refused, a moved parameter checked at its new memory) are those of the full check, held
for every optimizer in tests/conformance/test_parameters.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_soaa import ASGO, SOAA, AdamW
from lightning_soaa.optim.base import ShardedOptimizer

CLASSES = [AdamW, SOAA, ASGO]


def _opt(cls: type, first: list[nn.Parameter]) -> ShardedOptimizer:
    return cls(first, lr=1e-3) if cls is not SOAA else cls(first, lr=1e-3, total_steps=10)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_existing_blocks_are_not_cut_again_at_each_added_group(cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    """Structural, not timed: N groups of one parameter each cut N blocks in all (N(N+1)/2 before)."""
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(4, 3)) for _ in range(41)]
    opt = _opt(cls, ps[:1])
    cut: list[int] = []
    real = cls._block_specs

    def counting(self, param, group, name):  # type: ignore[no-untyped-def]
        cut.append(id(param))
        return real(self, param, group, name)

    monkeypatch.setattr(cls, "_block_specs", counting)
    for p in ps[1:]:
        opt.add_param_group({"params": [p], "lr": 1e-4})
    assert sorted(cut) == sorted(id(p) for p in ps[1:]), f"{len(cut)} cuts for {len(ps) - 1} added parameters"
    assert len(opt.block_table.blocks) == len(ps)


@pytest.mark.parametrize("cls,option", [(SOAA, {"max_block_numel": 0}), (ASGO, {"row_parts": 4})],
                         ids=["SOAA", "ASGO"])
def test_a_group_refused_by_its_blocks_is_not_held_alive(cls: type, option: dict[str, int]) -> None:
    """A group that passes the storage check and is refused when its blocks are cut (ASGO's row_parts that do
    not divide the rows) is dropped: the storage memo, which the check had extended with its parameters, must
    not keep them (a whole refused backbone) alive for the optimizer's life."""
    import gc
    import weakref

    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(6, 4)) for _ in range(2)]
    opt = _opt(cls, ps[:1])
    refused = nn.Parameter(torch.randn(6, 4))
    ref = weakref.ref(refused)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [refused], **option})
    del refused
    gc.collect()
    assert ref() is None, "the refused group's parameter is still referenced"
    opt.add_param_group({"params": [ps[1]]})
    assert [b.param_index for b in opt.block_table.blocks] == [0, 1]
