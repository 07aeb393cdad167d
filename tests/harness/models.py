"""Tiny models and deterministic per-(seed, rank) data for tests."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["tiny_mlp", "batch", "global_batch", "loss_fn"]


def tiny_mlp(seed: int = 0, dtype: torch.dtype = torch.float64, sizes: tuple[int, ...] = (6, 8, 5, 3)) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / sizes[i] ** 0.5)
            lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=g))
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).to(dtype)


def batch(step: int, rank: int, n: int = 8, d_in: int = 6, d_out: int = 3, seed: int = 0,
          dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    y = torch.randn(n, d_out, generator=g, dtype=dtype)
    return x, y


def global_batch(step: int, world_size: int, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenation of every rank's batch: what a single process sees in a W-rank run."""
    parts = [batch(step, r, **kw) for r in range(world_size)]  # type: ignore[arg-type]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (model(x) - y).pow(2).sum(dim=1).mean()
