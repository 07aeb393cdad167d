"""Tiny models and deterministic per-(seed, rank) data for tests."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["tiny_mlp", "batch", "global_batch", "loss_fn", "EmbeddingTabular", "EmbeddingTokens", "embedding_model",
           "embedding_batch", "QKVNet", "qkv_pair", "set_qkv_trainable"]


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


# -- a fused query/key/value projection and the same model with separate ones (ASGO's fused) ---------------

class QKVNet(nn.Module):
    """``batch``'s shapes (6 -> 3) through a query/key/value projection, fused (``qkv``: one Linear of 3 x 3
    outputs, rows q, k, v) or as three separate Linears (``q``, ``k``, ``v``)."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.inp = nn.Linear(6, 5)
        if fused:
            self.qkv = nn.Linear(5, 9)
        else:
            self.q, self.k, self.v = nn.Linear(5, 3), nn.Linear(5, 3), nn.Linear(5, 3)
        self.out = nn.Linear(3, 3)

    def projections(self) -> list[nn.Linear]:
        return [self.qkv] if self.fused else [self.q, self.k, self.v]

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        q, k, v = self.qkv(h).chunk(3, -1) if self.fused else (self.q(h), self.k(h), self.v(h))
        return self.out(torch.tanh(q * k) + v)


def qkv_pair(seed: int = 0) -> tuple[QKVNet, QKVNet]:
    """A float64 :class:`QKVNet` with the projection fused and one with the same weights as separate ones."""
    torch.manual_seed(seed)
    fused, separate = QKVNet(True).to(torch.float64), QKVNet(False).to(torch.float64)
    with torch.no_grad():
        for name in ("inp", "out"):
            getattr(separate, name).load_state_dict(getattr(fused, name).state_dict())
        for lin, w, b in zip(separate.projections(), fused.qkv.weight.chunk(3), fused.qkv.bias.chunk(3)):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
    return fused, separate


def set_qkv_trainable(model: QKVNet, trainable: bool) -> list[nn.Parameter]:
    """Freeze or unfreeze the projection(s); their parameters, in order."""
    ps = [p for lin in model.projections() for p in lin.parameters()]
    for p in ps:
        p.requires_grad_(trainable)
    return ps


# -- models with trained nn.Embedding tables (EGN's index factors) ------------------------------------

class EmbeddingTabular(nn.Module):
    """Three categorical columns, each with its own Embedding (T = 1), and numeric features into an MLP."""

    def __init__(self, c: int, pad: int | None = None, vocab: tuple[int, ...] = (5, 3, 7)) -> None:
        super().__init__()
        self.embs = nn.ModuleList([nn.Embedding(v, 3, padding_idx=pad if j == 0 else None)
                                   for j, v in enumerate(vocab)])
        self.mlp = nn.Sequential(nn.Linear(3 * len(vocab) + 2, 8), nn.Tanh(), nn.Linear(8, c))

    def forward(self, cat: Tensor, num: Tensor) -> Tensor:
        return self.mlp(torch.cat([e(cat[:, j]) for j, e in enumerate(self.embs)] + [num], dim=1))


class EmbeddingTokens(nn.Module):
    """A token sequence (T > 1) through one Embedding, averaged over the positions or flattened into a head."""

    def __init__(self, c: int, pad: int | None = None, t: int = 4, flat: bool = False) -> None:
        super().__init__()
        self.flat = flat
        self.emb = nn.Embedding(6, 3, padding_idx=pad)
        self.head = nn.Sequential(nn.Linear(3 * t if flat else 3, 5), nn.Tanh(), nn.Linear(5, c))

    def forward(self, tok: Tensor) -> Tensor:
        e = self.emb(tok)
        return self.head(e.flatten(1) if self.flat else e.mean(dim=1))


def embedding_model(kind: str, c: int, pad: int | None, seed: int = 3) -> nn.Module:
    """``tabular`` (:class:`EmbeddingTabular`), ``tokens`` or ``flat`` (:class:`EmbeddingTokens`), float64."""
    torch.manual_seed(seed)
    model = {"tabular": lambda: EmbeddingTabular(c, pad), "tokens": lambda: EmbeddingTokens(c, pad),
             "flat": lambda: EmbeddingTokens(c, pad, flat=True)}[kind]()
    with torch.no_grad():  # the padding row nonzero: its Jacobian columns must still be zero
        for m in model.modules():
            if isinstance(m, nn.Embedding):
                m.weight.normal_()
    return model.to(torch.float64)


def embedding_batch(kind: str, step: int, b: int, c: int, loss: str,
                    pad: int | None) -> tuple[tuple[Tensor, ...], Tensor]:
    """Step ``step``'s batch for :func:`embedding_model`: indices repeated within and across samples, and
    ``pad`` (when given) in the first column of samples 1 and 2."""
    g = torch.Generator().manual_seed(50 + step)
    if kind == "tabular":
        cat = torch.stack([torch.randint(0, v, (b,), generator=g) for v in (5, 3, 7)], dim=1)
        xs: tuple[Tensor, ...] = (cat, torch.randn(b, 2, generator=g, dtype=torch.float64))
    else:
        tok = torch.randint(0, 6, (b, 4), generator=g)
        tok[0] = 2  # one index repeated within a sample (and across samples: V = 6 for b·T draws)
        xs = (tok,)
    if pad is not None:
        xs[0][1:3, 0] = pad
    y = torch.randint(0, c, (b,), generator=g) if loss == "cross_entropy" else torch.randn(b, c, generator=g,
                                                                                         dtype=torch.float64)
    return xs, y


def forward_only_step(model: nn.Module, opt: Any, x: Tensor, y: Tensor, *, closure_autocast: torch.dtype | None = None,
                      step_region: Any = None) -> None:
    """One step whose closure only re-evaluates the loss (no backward; the gradient is the backward's before):
    SOAA's ``same_batch`` re-evaluation as users write it. ``closure_autocast``: the closure opens its own CPU
    autocast region of that dtype; ``step_region``: a context the step alone runs in (an ``enabled=False``
    autocast part)."""
    opt.zero_grad()
    loss_fn(model, x, y).backward()

    def closure() -> Tensor:
        region = (torch.autocast("cpu", dtype=closure_autocast) if closure_autocast is not None
                  else contextlib.nullcontext())
        with torch.no_grad(), region:
            return loss_fn(model, x, y)

    with step_region if step_region is not None else contextlib.nullcontext():
        opt.step(closure)
