"""Run as a script: Lightning's ModelParallelStrategy (FSDP2) on 2 CPU processes with one of our
optimizers. Lightning launches the ranks by re-running this file, so it cannot run inside pytest.

Usage: ``python _lightning_model_parallel.py OUT_FILE``. Rank 0 writes the final parameters of every
optimizer's fit (full tensors) to OUT_FILE. Data: 64 rows, 8 per rank per step (rank r: rows r, r + 2, ...), so step i
of the 2-rank run sees rows 16i..16i+15: the batch of a single process with batch size 16.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_soaa import ASGO, SOAA
from lightning_soaa.lightning import LossToOptimizer

STEPS = 3
KWARGS = {"SOAA": dict(lr=3e-2, gamma=0.3), "ASGO": dict(lr=2e-2, damping=1e-6)}


def make_net() -> nn.Module:
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    return TensorDataset(x, torch.tanh(x[:, :2] - x[:, 2:]))


def optimizer(name: str, params):
    return {"SOAA": SOAA, "ASGO": ASGO}[name](params, **KWARGS[name])


class Module(L.LightningModule):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.net = name, make_net()

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for m in self.net:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * (self.net(x) - y).pow(2).sum(dim=1).mean()

    def configure_optimizers(self):
        return optimizer(self.name, self.net.named_parameters())

    def train_dataloader(self) -> DataLoader:
        # Our own split (Lightning's sampler shuffles): rank r takes rows r, r + 2, ...
        return DataLoader(Subset(data(), range(self.global_rank, 64, 2)), batch_size=8)


def fit(name: str) -> tuple[list[torch.Tensor], int, int]:
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=STEPS, logger=False,
                        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                        enable_checkpointing=False, use_distributed_sampler=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[LossToOptimizer()])
    module = Module(name)
    trainer.fit(module)
    params = [p.full_tensor().detach().clone() for p in module.net.parameters()]  # collective
    return params, trainer.global_step, trainer.global_rank


def main(out: str) -> None:
    results, rank = {}, 0
    for name in KWARGS:  # one launch for every optimizer: each launch costs seconds
        params, steps, rank = fit(name)
        results[name] = {"params": params, "steps": steps}
    if rank == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
