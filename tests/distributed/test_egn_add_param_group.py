"""EGN.add_param_group at W > 1: always refused after construction (EGN has one param group), and collective
like the other optimizers': called on some ranks only (a callback guarded by ``is_global_zero``) where the
others went on to their step, it raised on the adding ranks alone while the others waited in the step's first
all-reduce (NCCL: a hang; here, the adding rank's next step paired with the others' step of the previous
batch, and the run then hung). Now every rank raises, together, nothing changed, and the next steps equal one
process that never saw the call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_soaa.optim.egn import EGN
from tests.harness.distributed import run_distributed
from tests.harness.models import tiny_mlp

DT = torch.float64
KW: dict[str, Any] = {"loss": "mse", "lr": 0.8, "momentum": 0.5}


def _batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(700 + t)
    x = torch.randn(8, 6, generator=g, dtype=DT)
    return x, torch.randn(8, 3, generator=g, dtype=DT)


def _step(opt: EGN, t: int, rank: int, world: int) -> None:
    x, y = _batch(t)
    n = 8 // world
    opt.step(inputs=x[rank * n:(rank + 1) * n], targets=y[rank * n:(rank + 1) * n])


def _w_add(rank: int, world: int, adders: str) -> dict[str, Any]:
    model = tiny_mlp(0, DT)
    opt = EGN(model, **KW)
    _step(opt, 0, rank, world)
    try:
        if adders == "every" or rank == 0:
            opt.add_param_group({"params": [nn.Parameter(torch.zeros(3, dtype=DT))]})
        _step(opt, 1, rank, world)  # where rank 0 added alone, only the others reach it
        message = None
    except (ValueError, RuntimeError) as exc:
        message = f"{type(exc).__name__}: {exc}"
    groups = len(opt.param_groups)
    _step(opt, 2, rank, world)
    return {"message": message, "groups": groups, "params": torch.cat([p.detach().reshape(-1)
                                                                        for p in model.parameters()])}


@pytest.mark.parametrize("adders", ["rank0", "every"])
def test_egn_add_param_group_raises_on_every_rank(adders: str, tmp_path: Path) -> None:
    out = run_distributed(_w_add, 2, tmp_path, adders, timeout=90)
    model = tiny_mlp(0, DT)
    ref = EGN(model, **KW)
    for t in (0, 2):
        x, y = _batch(t)
        ref.step(inputs=x, targets=y)
    for rank, got in enumerate(out):
        msg = got["message"]
        assert msg is not None, rank
        if adders == "every" or rank == 0:
            assert msg.startswith("ValueError: EGN.add_param_group: EGN has exactly one param group"), msg
        else:
            assert "rank(s) [1] are in the step of another optimizer" in msg and "add_param_group" in msg, msg
        assert got["groups"] == 1
        torch.testing.assert_close(got["params"], torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                                   rtol=1e-12, atol=1e-14)
