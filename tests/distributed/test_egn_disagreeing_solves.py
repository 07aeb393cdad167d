"""EGN at W > 1: ranks whose solves round differently still make the same collectives and the same decisions.

Every rank solves the same bc×bc system itself. On mixed hardware (another BLAS kernel, thread count or
device) those solves may differ in their last bits, and so does each rank's gᵀd = −rᵀKv/b and (Jd)ᵀQ(Jd).
The line search's Armijo test read its own rank's gᵀd: at a trial on the edge of acceptance one rank accepted
while another backtracked into one more trial's all-reduce (gloo: an abort, NCCL: a hang). Adaptive damping's
ρ read both: at ρ on a threshold the ranks' λ parted, and the next step refused them as a λ set by hand on some
ranks. Here one rank's solve is scaled by 1 + 2⁻⁴⁷ (a few ulps) inside its process, and the Armijo constant
(or ρ's threshold) is put between the two ranks' own values, measured by a first run without line search:
every rank must finish, decide from rank 0's values, and hold the same parameters, λ and α.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist

import lightning_soaa.functional.egn as egn_math
from lightning_soaa.optim.egn import EGN
from tests.harness.distributed import run_distributed
from tests.harness.models import batch, tiny_mlp

DT = torch.float64
#: the relative perturbation of one rank's solve: 32 ulps of 1.0
DELTA = 2.0 ** -47
KW: dict[str, Any] = {"loss": "mse", "lr": 1.0, "damping": 0.5, "adaptive_damping": True}


def _perturb_solves(scale: float, own: dict[str, float]) -> None:
    """In this process only: scale every dense solve's v by ``scale``, and record the gᵀd and (Jd)ᵀQ(Jd) EGN
    forms from it (``own``)."""
    solve, slope, q_norm = egn_math.solve_coefficients, egn_math.directional_derivative, egn_math.q_norm_sq

    def scaled_solve(*args: Any, **kwargs: Any) -> Any:
        sol = solve(*args, **kwargs)
        sol.v = sol.v * scale
        return sol

    def recorded_slope(*args: Any, **kwargs: Any) -> float:
        own["gtd"] = slope(*args, **kwargs)
        return own["gtd"]

    def recorded_q_norm(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = q_norm(*args, **kwargs)
        own["jd_qq"] = float(out)
        return out

    egn_math.solve_coefficients = scaled_solve  # type: ignore[assignment]
    egn_math.directional_derivative = recorded_slope  # type: ignore[assignment]
    egn_math.q_norm_sq = recorded_q_norm  # type: ignore[assignment]


def _edge(model: torch.nn.Module, own: dict[str, float], rank: int, world: int, what: str) -> dict[str, Any]:
    """One step without line search (its single trial is the line search's first, at α = lr) on a copy of the
    model, and from it the Armijo constant (``what="armijo"``) or ρ's threshold (``"rho"``) between rank 0's
    and rank 1's own values; with each rank's own verdict."""
    probe = EGN(copy.deepcopy(model), **KW, line_search=False)
    x, y = batch(0, rank)
    probe.step(inputs=x, targets=y)
    stats = probe.statistics()
    f0, f_new, alpha, b = stats["loss"], stats["loss_after"], float(KW["lr"]), int(stats["batch_size"])
    ranks: list[Any] = [None] * world
    dist.all_gather_object(ranks, (own["gtd"], own["jd_qq"]))  # the test's own collective, not EGN's
    if what == "armijo":
        slack = torch.finfo(DT).eps * abs(f0) * 4
        c = 2 * (f0 + slack - f_new) / (alpha * (abs(ranks[0][0]) + abs(ranks[1][0])))
        return {"kw": {"line_search": True, "armijo_c": c}, "values": ranks,
                "verdicts": [egn_math.armijo_ok(f_new, f0, alpha, g, c, slack) for g, _ in ranks]}
    resolution = torch.finfo(DT).eps * max(abs(f0), abs(f_new)) * 4  # (as EGN._adapt_damping)
    rhos = [egn_math.gain_ratio(f_new - f0, egn_math.model_change(g, q, alpha, b), resolution) for g, q in ranks]
    mid = (rhos[0] + rhos[1]) / 2
    key = "rho_high" if mid > 0.25 else "rho_low"
    return {"kw": {key: mid, "line_search": False}, "values": rhos,
            "verdicts": [rho > mid if key == "rho_high" else rho < mid for rho in rhos]}


def _worker(rank: int, world: int, perturbed: int, what: str) -> dict[str, Any]:
    own: dict[str, float] = {}
    _perturb_solves(1.0 + DELTA if rank == perturbed else 1.0, own)
    model = tiny_mlp(0, DT)
    edge = _edge(model, own, rank, world, what)
    opt = EGN(model, **KW, **edge["kw"])
    tries, dampings = [], []
    for t in range(3):
        x, y = batch(t, rank)
        opt.step(inputs=x, targets=y)
        tries.append(opt.statistics()["ls_tries"])
        dampings.append(opt.damping)
    return {**edge, "tries": tries, "dampings": dampings, "alpha": opt.alpha,
            "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()])}


@pytest.mark.parametrize(("what", "perturbed"), [("armijo", 0), ("armijo", 1), ("rho", 1)])
def test_ranks_whose_solves_round_differently_decide_alike(what: str, perturbed: int, tmp_path) -> None:
    out = run_distributed(_worker, 2, tmp_path, perturbed, what, timeout=60)
    # the set-up: the ranks' own values differ, and so do the verdicts each would reach from its own
    assert out[0]["values"][0] != out[0]["values"][1], out[0]["values"]
    assert out[0]["verdicts"][0] != out[0]["verdicts"][1], out[0]
    # every rank decides from rank 0's values: the same trials, λ and α, and the same parameters
    assert out[0]["tries"] == out[1]["tries"] and out[0]["dampings"] == out[1]["dampings"]
    assert out[0]["alpha"] == out[1]["alpha"]
    assert torch.equal(out[0]["params"], out[1]["params"])
    if what == "armijo":  # the first step takes 1 trial where rank 0 accepts, more where it rejects
        assert 0 < out[0]["kw"]["armijo_c"] < 1, out[0]["kw"]
        assert (out[0]["tries"][0] == 1) == out[0]["verdicts"][0], out[0]["tries"]
    else:  # λ moved (×0.99 above rho_high, ×1.01 below rho_low) where rank 0's ρ said so
        assert (out[0]["dampings"][0] != KW["damping"]) == out[0]["verdicts"][0], out[0]["dampings"]
