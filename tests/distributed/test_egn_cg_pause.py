"""EGN at W > 1: the conjugate-gradient pause is decided from every rank's verdict, alike on every rank.

Every rank solves the same system itself; on mixed hardware (another BLAS kernel, thread count or device) the
solves round differently, and conjugate gradients may converge within their budget on one rank and not on
another. That rank alone then paused them for ``CG_PAUSE_STEPS`` solves (its next solves direct, the others'
iterative), and a checkpoint, which saves rank 0's pause, resumed it on another path than its uninterrupted run.
Here one rank's conjugate gradients are given a budget of one mat-vec (they cannot converge) in its process only.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import lightning_soaa.functional.egn as egn_math
from lightning_soaa.optim.egn import CG_PAUSE_STEPS, EGN
from tests.harness.distributed import run_distributed
from tests.harness.models import tiny_mlp

DT = torch.float64
SIZES = (90, 91)  # bc = 543 >= CG_MIN_SIZE: conjugate gradients first
#: the statistics of each rank's own solve (a checkpoint saves rank 0's solve_fallbacks; nothing decides from them)
_SOLVE_STATISTICS = ("solve_fallbacks", "step_fallbacks", "solve_damping", "solve_refinements", "solve_cg_iterations")


def _step(opt: EGN, t: int, rank: int) -> None:
    g = torch.Generator().manual_seed(700 + t)
    x = torch.randn(sum(SIZES), 6, generator=g, dtype=DT)
    y = torch.randn(sum(SIZES), 3, generator=g, dtype=DT)
    lo = sum(SIZES[:rank])
    opt.step(inputs=x[lo:lo + SIZES[rank]], targets=y[lo:lo + SIZES[rank]])


def _worker(rank: int, world: int, failing: int) -> dict[str, Any]:
    opt = EGN(tiny_mlp(0, DT), loss="mse", lr=1.0, damping=0.5)
    _step(opt, 0, rank)
    cg_before = opt.statistics()["solve_cg_iterations"]
    real = egn_math.solve_damped_cg
    if rank == failing:
        def short(*args: Any, **kwargs: Any) -> Any:
            return real(*args, **{**kwargs, "max_iter": 1})

        egn_math.solve_damped_cg = short  # type: ignore[assignment]
    try:
        _step(opt, 1, rank)
    finally:
        egn_math.solve_damped_cg = real  # type: ignore[assignment]
    pause = opt._cg_pause
    _step(opt, 2, rank)
    st = opt.statistics()
    return {"cg_before": cg_before, "pause": pause, "cg_after": st["solve_cg_iterations"],
            "saved_pause": opt._global_state()["cg_pause"], "solve": {k: st[k] for k in _SOLVE_STATISTICS}}


@pytest.mark.parametrize("failing", [0, 1])
def test_one_ranks_unconverged_conjugate_gradients_pause_every_rank(failing: int, tmp_path) -> None:
    results = run_distributed(_worker, 2, tmp_path, failing, timeout=120)
    assert all(r["cg_before"] >= 2 for r in results), results  # (the step before: conjugate gradients converged)
    assert [r["pause"] for r in results] == [CG_PAUSE_STEPS] * 2, results
    # the next solve: direct on every rank, and the pause a checkpoint saves is every rank's own
    assert [r["cg_after"] for r in results] == [0.0, 0.0], results
    assert results[0]["saved_pause"] == results[1]["saved_pause"] == CG_PAUSE_STEPS - 1, results
    # with the same solve path, the same hardware and the same gathered system, every rank's solve is the same
    assert results[0]["solve"] == results[1]["solve"], results
