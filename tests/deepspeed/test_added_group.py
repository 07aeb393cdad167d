"""``add_param_group`` on a DeepSpeed client optimizer after ``deepspeed_ext.initialize``: torch's appended the
group to the client alone, the inner lightning_soaa optimizer it runs never saw it, and the group's
parameters never moved (ZeRO stage 0: no error, steps counted). Now refused on every rank, nothing changed,
also where only some ranks call it (the others went on to their step: they raise too) and the run then goes
on as if the call never happened."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.deepspeed._workers import SIZES, ds_env, make_config
from tests.harness.distributed import run_distributed
from tests.harness.models import batch, loss_fn, tiny_mlp

pytestmark = [pytest.mark.deepspeed, pytest.mark.timeout(200)]


def _engine(name: str, frozen: list[torch.Tensor], model: torch.nn.Module) -> tuple[Any, Any]:
    import deepspeed_ext

    for p in frozen:
        p.requires_grad_(False)
    params = {"loss": "mse", "lr": 0.5} if name == "EGN" else {"lr": 1e-2}
    cfg = make_config(0, "fp32", f"lightning_soaa.{name}", params)
    trained = None if name == "EGN" else [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed_ext.initialize(model=model, config=cfg, model_parameters=trained)
    return engine, deepspeed_ext.find_client_optimizer(engine)


def _backward(engine: Any, s: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(s, rank, dtype=torch.float32)
    engine.backward(loss_fn(engine, x, y))
    return x, y


def _step(engine: Any, client: Any, s: int, rank: int, xy: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    x, y = _backward(engine, s, rank) if xy is None else xy
    if hasattr(client, "set_batch"):  # EGN's client: the batch its step takes
        client.set_batch(x, y)
    engine.step()


def _w_added(rank: int, world: int, name: str, adders: str) -> dict[str, Any]:
    ds_env(rank, world)
    out: dict[str, Any] = {}
    for add in (False, True):
        model = tiny_mlp(0, torch.float32, SIZES)
        last = list(model.parameters())[-2:]
        engine, client = _engine(name, last, model)
        _step(engine, client, 0, rank)
        message = None
        if add:
            xy = _backward(engine, 1, rank)  # (its gradient exchange: a call before it would cross it)
            try:
                if adders == "every" or rank == 0:
                    client.add_param_group({"params": last})
                _step(engine, client, 1, rank, xy)  # where rank 0 added alone, only the others reach it
            except (ValueError, RuntimeError) as exc:
                message = f"{type(exc).__name__}: {exc}"
            engine.zero_grad()
            _step(engine, client, 2, rank)
        else:  # the reference: the same steps, no call
            _step(engine, client, 2, rank)
        out[add] = {"message": message, "groups": len(client.param_groups),
                    "params": [p.detach().clone() for p in model.parameters()]}
    return out


@pytest.mark.parametrize("adders", ["every", "rank0"])
@pytest.mark.parametrize("name", ["AdamW", "EGN"])
def test_a_group_added_to_the_client_is_refused_on_every_rank(name: str, adders: str, tmp_path) -> None:
    out = run_distributed(_w_added, 2, tmp_path, name, adders, timeout=100)
    for rank, res in enumerate(out):
        msg = res[True]["message"]
        assert msg is not None, (rank, "no error: the group was taken and never stepped")
        if adders == "every" or rank == 0:
            assert msg.startswith("ValueError: DeepSpeed") and "add_param_group: a group cannot be added" in msg, msg
        else:
            assert "rank(s) [1] are in the step of another optimizer" in msg and "add_param_group" in msg, msg
        assert res[True]["groups"] == res[False]["groups"]
        for a, b in zip(res[True]["params"], res[False]["params"]):
            assert torch.equal(a, b)
