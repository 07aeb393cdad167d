"""``max_grad_norm`` over FSDP2 ``fully_shard`` (DTensor) parameters at W = 2 on gloo: the norm over the ranks'
local shards (summed across ranks) and, with a plain last Linear under ``grad_reduction="mean"``, its averaged
gradient counted once, equal to one process clipping the full batch's gradient with torch's ``clip_grad_norm_``
(float64). ``asgo_wide`` is left out: under FSDP2 it preconditions the other side by design (1.6e-2 off the
plain run with or without the clip)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.fsdp2 import _workers as W
from tests.harness.distributed import run_distributed
from tests.harness.models import loss_fn, tiny_mlp

CLIP = 0.5
NAMES = [c[0] for c in W.OPTIMIZER_CASES]


def _reference(name: str) -> list[torch.Tensor]:
    _, cls, kw, sizes = W.CASE[name]
    model = tiny_mlp(sizes=sizes)
    opt = cls(model.named_parameters(), **kw)
    norms = []
    for t in range(W.STEPS):
        x, y = W.global_batch(t, sizes)
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        W.hand_loss(opt, loss)
        opt.step()
    assert max(norms) > CLIP, norms  # the clip binds
    return [p.detach().clone() for p in model.parameters()]


def _clipped(rank: int, world: int) -> dict[tuple[str, bool], list[torch.Tensor]]:
    out = {}
    mesh = W.make_mesh(world, False)
    for name in NAMES:
        for plain_last in (False, True):
            _, cls, kw, sizes = W.CASE[name]
            model = W.sharded_model(sizes, mesh, plain_last=plain_last)
            opt = cls(model.named_parameters(), **kw, max_grad_norm=CLIP,
                      grad_reduction="mean" if plain_last else "none")
            for t in range(W.STEPS):
                W.train_step(model, opt, *W.local_batch(t, sizes, rank, world))
            out[(name, plain_last)] = W.full_params(model)
    return out


@pytest.fixture(scope="module")
def clipped(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    return run_distributed(_clipped, 2, tmp_path_factory.mktemp("fsdp2_clip"), timeout=300.0)


@pytest.mark.parametrize("plain_last", [False, True], ids=["dtensor-none", "plain-last-mean"])
@pytest.mark.parametrize("name", NAMES)
def test_max_grad_norm_under_fsdp2_equals_one_process_clip(name: str, plain_last: bool, clipped: list[Any]) -> None:
    ref = _reference(name)
    for rank, res in enumerate(clipped):
        for a, b in zip(res[(name, plain_last)], ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{name} rank {rank}")
