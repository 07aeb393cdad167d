"""EGN's fixed cost per step on a small model (a single process): the step's machinery in operator calls and
host reads, with the same bits (benchmarks/egn_bit_identity.py compares whole runs against another checkout;
tests/unit/test_egn_plan.py the step plan against the general path).

A 20-32-32-2 MLP at b = 32 (the ``synthetic2`` benchmark's model: EGN's step, not its arithmetic, is its cost):
no agreement table at W = 1, the loss and the outputs' finiteness in one host read, no slice or detach of what
is already whole or without a graph, the cross-entropy factor's shifted root without slicing and a cat; the step
plan's kept buffers for K and Jᵀv (no view, reshape or allocation per product) and no template.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_soaa import EGN
from tests.harness.op_count import CountReads


def _counted_step(opt: EGN, x: torch.Tensor, y: torch.Tensor) -> CountReads:
    """The operator calls and host reads of the fourth step on one batch (after three of warm-up)."""
    for _ in range(3):
        opt.step(inputs=x, targets=y)
    with CountReads() as count:
        opt.step(inputs=x, targets=y)
    return count


@pytest.mark.parametrize("line_search", [False, True])
def test_a_single_process_step_of_a_small_mlp_stays_within_its_operator_budget(line_search: bool) -> None:
    """One step after warm-up, with one line-search trial: at most 118 ATen calls and 8 host reads, through the
    step plan of one process training a plain MLP (egn_plan: 116 calls; the template's general path takes 175,
    which the budget was until then; before that 174 and 9 reads, and 170 until d = Jᵀv of a float32 model was
    formed in the float64 solve's dtype)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2))
    x, y = torch.randn(32, 20), torch.randint(0, 2, (32,))
    opt = EGN(model, loss="cross_entropy", lr=0.5, damping=1.0, line_search=line_search)
    count = _counted_step(opt, x, y)
    assert opt.statistics()["ls_tries"] <= 1.0  # (a backtracking trial adds a forward: not this budget's subject)
    assert count.n <= 118, count.n
    assert count.reads <= 8, count.reads


def test_a_single_process_step_of_a_larger_system_stays_within_its_operator_budget() -> None:
    """The digits MLP 64-32-32-10 at b = 32 under cross-entropy (bc = 320, a system of bc' = 288 solved directly in
    float64, above the whole-K size): at most 140 ATen calls and 8 host reads with one line-search trial, through the
    step plan's kept operands of K·r, SᵀJ and the lower triangle of SᵀKS (egn_plan's ChainSystem: 137 calls; 230
    when the plan handed such systems to EGN._solve, which allocates, slices and reshapes them per step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    opt = EGN(model, loss="cross_entropy", lr=1.0, damping=0.5, line_search=True)
    count = _counted_step(opt, x, y)
    assert opt.statistics()["ls_tries"] <= 1.0
    assert count.n <= 140, count.n
    assert count.reads <= 8, count.reads


def test_a_single_process_step_of_a_mixed_precision_system_stays_within_its_operator_budget() -> None:
    """The digits MLP at b = 48 (bc' = 432: a float64 system from MIXED_MIN_SIZE on, below CG_MIN_SIZE: float32
    lower triangle and Cholesky, refined in float64): at most 227 ATen calls and 13 host reads with one line-search
    trial and two refinement sweeps, the float32 triangle assembled in the step plan's kept buffers
    (ChainSystem.gram_lower_in: 221 calls; 339 when each step converted the factors and assembled it through
    assemble_gram, the same bits; 249 and 14 reads with the third sweep the refinement took before it stopped
    at the error its measured contraction leaves, functional/egn._converged)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))
    x, y = torch.randn(48, 64), torch.randint(0, 10, (48,))
    opt = EGN(model, loss="cross_entropy", lr=1.0, damping=0.5, line_search=True)
    count = _counted_step(opt, x, y)
    st = opt.statistics()
    assert st["ls_tries"] <= 1.0 and st["solve_cg_iterations"] == 0.0
    assert st["solve_refinements"] <= 2.0, st["solve_refinements"]
    assert count.n <= 227, count.n
    assert count.reads <= 13, count.reads
