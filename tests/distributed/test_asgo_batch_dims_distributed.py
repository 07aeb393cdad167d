"""ASGO's ``batch_dims=1`` (stacked experts) across real gloo ranks.

The oracle of tests/unit/_experts_oracle.py at W = 1, 2, 3: each stack's experts are blocks of their own,
owned by different ranks (W = 2: uneven; W = 3: every rank owns experts), and the stacked run equals
the run of separate expert parameters on the same ranks and the one-process run. Every rank is given
the same (already averaged) gradients. Also: a checkpoint consolidated at W loads in one process and
continues as the uninterrupted run. Stacks under FSDP2: tests/fsdp2/test_fsdp2_experts.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_soaa import ASGO
from tests.harness.distributed import run_distributed
from tests.unit._experts_oracle import DENSE_SHAPES, KW, as_stacks, run

STEPS = 4
CASES: tuple[tuple[torch.dtype, Any], ...] = ((torch.float64, 2), (torch.float64, "auto"), (torch.float32, 2))


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dtype, every in CASES:
        sep, _ = run(False, STEPS, dtype, root_every=every)
        stk, opt = run(True, STEPS, dtype, root_every=every)
        out[(dtype, every)] = {"separate": as_stacks(sep, False), "stacked": as_stacks(stk, True),
                               "owned": sorted(b.key for b in opt.block_table.owned())}
    named, opt = run(True, 3)
    opt.consolidate_state_dict(to=0)
    out["checkpoint"] = (opt.state_dict(), [p.detach().clone() for _, p in named]) if rank == 0 else None
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_stacked_experts_equal_separate_ones_at_every_world_size(world: int, tmp_path: Path) -> None:
    results = run_distributed(_worker, world, tmp_path, timeout=240.0)
    for dtype, every in CASES:
        single, _ = run(False, STEPS, dtype, root_every=every)
        expected = as_stacks(single, False)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        for r, res in enumerate(results):
            got = res[(dtype, every)]
            for a, b, c in zip(got["stacked"], got["separate"], expected):
                torch.testing.assert_close(a, b, rtol=0, atol=tol, msg=lambda m, r=r: f"rank {r} vs separate: {m}")
                torch.testing.assert_close(a, c, rtol=0, atol=tol, msg=lambda m, r=r: f"rank {r} vs W=1: {m}")
        owned = [set(res[(dtype, every)]["owned"]) for res in results]
        n_dense = len(DENSE_SHAPES)
        expert_keys = [{k for k in o if k[0] >= n_dense} for o in owned]
        assert sum(len(k) for k in expert_keys) == 9 and set().union(*expert_keys) == {
            (n_dense + j, e) for j in range(3) for e in range(3)}
        if world > 1:  # the experts of the stacks are spread: every rank owns some
            assert all(expert_keys), owned
    # consolidated at W, resumed on one process: as the uninterrupted run
    ref, _ = run(True, 5)
    named, _ = run(True, 0)
    state, values = results[0]["checkpoint"]
    with torch.no_grad():
        for (_, p), v in zip(named, values):
            p.copy_(v)
    resumed = ASGO(named, **KW, batch_dims=1)
    resumed.load_state_dict(state)
    run(True, 2, start=3, opt=resumed, named=named)
    for (_, a), (_, b) in zip(ref, named):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
