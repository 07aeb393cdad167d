"""Run as a script by tests/lightning/test_fabric_ddp.py: Lightning Fabric DDP on 2 CPU ranks (gloo), every
optimizer of the registry, float64, against the same optimizer in a one-process loop over the same global
batches. Gradient accumulation by ``fabric.no_backward_sync``, ``fabric.clip_gradients`` (not EGN: it never
reads ``.grad``), and ``fabric.save`` at step 4 then ``fabric.load`` into a fresh model and optimizer.
Rank 0 writes the largest difference per optimizer and phase as JSON to ``argv[1]``."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_soaa import registry

STEPS, HALF, B, K, CLIP = 8, 4, 16, 2, 0.3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(B, 6, generator=g, dtype=torch.float64), torch.randn(B, 3, generator=g, dtype=torch.float64)


def _loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (z - y).pow(2).sum(-1).mean()


def _flat(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def _reference(spec: Any) -> list[torch.Tensor]:
    m = _model()
    opt = spec.build(m, **spec.test_kwargs)
    out = []
    for s in range(STEPS):
        x, y = _data(s)
        if spec.needs is registry.StepNeeds.BATCH:
            opt.step(inputs=x, targets=y)
        else:
            opt.zero_grad(set_to_none=True)
            loss = _loss(m(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP)
            opt.step(loss=loss.detach()) if spec.needs is registry.StepNeeds.LOSS else opt.step()
        out.append(_flat(m))
    return out


def _train(fabric: Any, spec: Any, fm: Any, fo: Any, steps: range, ckpt: str | None) -> dict[int, torch.Tensor]:
    w, r = fabric.world_size, fabric.global_rank
    mb, got = B // (w * K), {}
    for s in steps:
        x, y = _data(s)
        xs = [x[(r * K + j) * mb:(r * K + j + 1) * mb] for j in range(K)]
        ys = [y[(r * K + j) * mb:(r * K + j + 1) * mb] for j in range(K)]
        if spec.needs is registry.StepNeeds.BATCH:
            fo.set_batch(torch.cat(xs), torch.cat(ys))
        else:
            fo.zero_grad(set_to_none=True)
            losses = []
            for j in range(K):
                with fabric.no_backward_sync(fm, enabled=j < K - 1):
                    loss = _loss(fm(xs[j]), ys[j]) / K
                    fabric.backward(loss)
                losses.append(loss.detach() * K)
            fabric.clip_gradients(fm, fo, max_norm=CLIP)
            if spec.needs is registry.StepNeeds.LOSS:
                # the global batch's loss: the mean over ranks of the window's mean
                fo.set_loss(fabric.all_reduce(torch.stack(losses).mean(), reduce_op="mean"))
        fo.step()
        got[s] = _flat(fm)
        if ckpt is not None and s + 1 == HALF:
            fabric.save(ckpt, {"model": fm, "opt": fo, "step": s + 1})
    return got


def main() -> None:
    out_path = sys.argv[1]
    refs = {name: _reference(registry.get(name)) for name in registry.names()}  # before the process group
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    torch.set_num_threads(1)
    result: dict[str, dict[str, float]] = {}
    for name in registry.names():
        spec = registry.get(name)
        ckpt = os.path.join(os.path.dirname(out_path), f"{name}.ckpt")
        fm = fabric.setup_module(_model())
        fo = fabric.setup_optimizers(spec.build(fm.module, **spec.test_kwargs))
        got = _train(fabric, spec, fm, fo, range(STEPS), ckpt)
        fm2 = fabric.setup_module(_model())
        fo2 = fabric.setup_optimizers(spec.build(fm2.module, **spec.test_kwargs))
        state = {"model": fm2, "opt": fo2, "step": 0}
        fabric.load(ckpt, state)
        resumed = _train(fabric, spec, fm2, fo2, range(int(state["step"]), STEPS), None)
        result[name] = {"run": max(float((got[s] - refs[name][s]).abs().max()) for s in got),
                        "resumed": max(float((resumed[s] - refs[name][s]).abs().max()) for s in resumed)}
    if fabric.global_rank == 0:
        with open(out_path, "w") as fh:
            json.dump(result, fh)


if __name__ == "__main__":
    main()
