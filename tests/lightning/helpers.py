"""Tiny picklable LightningModules, data and a per-rank recorder for the Lightning tests.

Everything here is module-level so that ``ddp_spawn`` can pickle it to the worker processes. Results
come back through files each rank writes (``rank{r}.pt``); the parent's trainer is not informative after
a spawn fit (its ``global_step`` is 0).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_soaa.lightning.factory import OptimizerFactory, unwrap_optimizer

N_SAMPLES = 64
D_IN, D_OUT = 6, 3


def regression_data(seed: int = 0, dtype: torch.dtype = torch.float64) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, D_IN, generator=g, dtype=dtype)
    w = torch.randn(D_IN, D_OUT, generator=g, dtype=dtype)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(N_SAMPLES, D_OUT, generator=g, dtype=dtype)
    return TensorDataset(x, y)


class PlainRegressor(pl.LightningModule):
    """6 -> 8 -> 3 tanh MLP with an MSE loss and no ``configure_optimizers`` (for ``--optimizer``)."""

    def __init__(self, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        dtype = torch.float64
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, D_OUT))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        self.net.to(dtype)
        self.batch_size = batch_size
        self.dtype_ = dtype
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.losses.append(float(loss.detach()))
        self.log("train_loss", loss, on_step=True, batch_size=len(x))
        return loss

    def train_dataloader(self) -> DataLoader:
        # Lightning's automatic DistributedSampler always shuffles the training set; an explicit
        # unshuffled one makes the global batch k of a W-process run equal batch k of a 1-process run
        # with a W times larger batch (the resume test relies on it).
        data = regression_data(dtype=self.dtype_)
        world = self.trainer.world_size if self._trainer is not None else 1
        sampler = None
        if world > 1:
            sampler = DistributedSampler(data, num_replicas=world, rank=self.trainer.global_rank,
                                         shuffle=False)
        return DataLoader(data, batch_size=self.batch_size, shuffle=False, sampler=sampler)


class TokenRegressor(PlainRegressor):
    """:class:`PlainRegressor` that also reads each input as 6 token ids through an ``nn.Embedding`` named
    ``wte`` (GPT-2's name, without "emb": ASGO's name rule alone would precondition it), plus an output head
    ``head`` over the inputs, tied to the table or not."""

    def __init__(self, tied: bool = False, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        self.wte = nn.Embedding(5, D_IN, dtype=torch.float64)
        self.head = nn.Linear(D_IN, 5, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.wte.weight.copy_(torch.randn(5, D_IN, generator=g, dtype=torch.float64))
            self.head.weight.copy_(torch.randn(5, D_IN, generator=g, dtype=torch.float64))
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = ((2 * x).floor().clamp(-2, 2) + 2).long()  # 0..4
        return self.net(x + self.wte(tokens).mean(dim=1)) + self.head(x)[:, :D_OUT]


class TinyRegressor(PlainRegressor):
    """:class:`PlainRegressor` whose ``configure_optimizers`` uses the given factory."""

    def __init__(self, factory: OptimizerFactory | None = None, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, seed=seed)
        self.factory = factory

    def configure_optimizers(self) -> Any:
        assert self.factory is not None
        return self.factory(self)


class RankRecorder(pl.Callback):
    """Each rank writes what it saw at the end of training to ``<out>/<tag>rank<r>.pt``."""

    def __init__(self, out: str | os.PathLike[str], tag: str = "") -> None:
        self.out = str(out)
        self.tag = tag
        self.start_state: dict[str, Any] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a checkpoint restore: what the optimizer continues from (its state is consolidated here
        # so the 2-rank and 1-rank cases are comparable; a collective, run on every rank).
        opt = unwrap_optimizer(trainer.optimizers[0], "consolidate_state_dict")
        if opt is not None:
            opt.consolidate_state_dict(to=None)
            self.start_state = opt.state_dict()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opt = trainer.optimizers[0]
        inner = unwrap_optimizer(opt, "statistics")
        rec = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "params": torch.cat([p.detach().reshape(-1).cpu().double() for p in pl_module.parameters()]),
            "optimizer": type(inner or opt).__name__,
            "comm_world_size": getattr(getattr(inner, "comm", None), "world_size", None),
            "owned_blocks": len(getattr(inner, "_owned", [])),
            "stats": inner.statistics() if inner is not None else {},
            "losses": list(getattr(pl_module, "losses", [])),
            "start_state": self.start_state,
            "callbacks": [type(c).__name__ for c in trainer.callbacks],
        }
        Path(self.out).mkdir(parents=True, exist_ok=True)
        torch.save(rec, Path(self.out) / f"{self.tag}rank{trainer.global_rank}.pt")


def load_records(out: Path, tag: str, world_size: int) -> list[dict[str, Any]]:
    recs = []
    for r in range(world_size):
        f = out / f"{tag}rank{r}.pt"
        assert f.exists(), f"rank {r} wrote no record ({f}); the fit did not finish on that rank"
        recs.append(torch.load(f, weights_only=False))
    return recs


#: Multi-process fits in the tests fork (``ddp`` would re-run pytest's command line). Measured on the 2-core
#: CI box for a 2k-parameter fit, Trainer built -> fit returned: ddp_spawn 63.6 s at load ~17 (7.1 s at
#: load ~4), ddp_fork 1.9 s (0.5 s). A spawned rank re-imports torch and Lightning (13 + 34 s; 1.2 + 3 s)
#: and finalises its interpreter at exit (13 s; 2 s); a forked rank inherits the imports and leaves
#: through os._exit. Our own share (importing lightning_soaa.lightning, building the optimizer) is < 0.1 s.
#: Lightning runs the same
#: launcher for both (results come back the same way); test_strategies keeps one ddp_spawn fit, the
#: pickling path.
MULTI_PROCESS_STRATEGY = "ddp_fork"


def make_trainer(out: Path, *, devices: int = 1, max_steps: int = 6, callbacks: list[Any] | None = None,
                 logger: Any = False, strategy: str | None = None, **kw: Any) -> pl.Trainer:
    """A quiet CPU trainer; ``devices > 1`` uses :data:`MULTI_PROCESS_STRATEGY` unless ``strategy`` says."""
    opts: dict[str, Any] = dict(
        accelerator="cpu",
        devices=devices,
        strategy=strategy or (MULTI_PROCESS_STRATEGY if devices > 1 else "auto"),
        max_steps=max_steps,
        precision="64-true",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks or [],
        default_root_dir=str(out),
    )
    opts.update(kw)
    return pl.Trainer(**opts)
