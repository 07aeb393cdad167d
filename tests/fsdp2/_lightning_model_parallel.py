"""Run as a script: Lightning's ModelParallelStrategy (FSDP2) on CPU processes with our optimizers,
fitting, checkpointing and resuming. Lightning launches the ranks by re-running this file, so it cannot
run inside pytest.

Usage: ``python _lightning_model_parallel.py OUT_FILE DEVICES CKPT_ROOT``. Rank 0 writes the final
parameters (full tensors) of every fit to OUT_FILE.

* ``DEVICES=2``: per optimizer, a fit of STEPS steps that checkpoints at the end of every epoch, once in
  Lightning's distributed format (``save_distributed_checkpoint=True``, a DCP folder: each rank writes
  its shards) and once in its full format (one file assembled on rank 0); then, from the checkpoint of
  step 2 of each, a fresh Trainer and module resume (``fit(ckpt_path=...)``) to step STEPS.
* ``DEVICES=1``: the same two checkpoints, written by 2 ranks, resumed on 1.

Data: 16 rows, one batch per epoch, so every step of every run sees the same global batch whatever
Lightning's loop does on resume (it restarts a plain DataLoader: a resume from an end-of-epoch
checkpoint of a 2-batch epoch replays batch 0 as the epoch's third batch). Rank r of W takes rows r,
r + W, ... in one batch of 16 / W: with equal per-rank batches the mean of the ranks' mean losses is the
single-process mean over the 16 rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_soaa import registry
from lightning_soaa.lightning import LossToOptimizer

STEPS = 4
ROWS = 16
#: every registered optimizer that takes DTensor parameters, with the battery's hyperparameters (they exercise
#: each one's state: ASGO's "auto" roots reuse a stored root at the resumed steps, SOAA's trust band...)
KWARGS = {s.name: dict(s.test_kwargs) for s in registry.REGISTRY if s.supports_dtensor}
FORMATS = {"dist": True, "full": False}  # save_distributed_checkpoint


def make_net() -> nn.Module:
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(ROWS, 4, generator=g, dtype=torch.float64)
    return TensorDataset(x, torch.tanh(x[:, :2] - x[:, 2:]))


def optimizer(name: str, params):
    return registry.get(name).load()(params, **KWARGS[name])


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
        # Our own split (Lightning's sampler shuffles): rank r takes rows r, r + W, ...
        w = self.trainer.world_size
        return DataLoader(Subset(data(), range(self.global_rank, ROWS, w)), batch_size=ROWS // w)


def fit(name: str, devices: int, distributed: bool, *, save_to: Path | None = None,
        resume: Path | None = None) -> dict:
    callbacks: list = [LossToOptimizer()]
    if save_to is not None:  # end of every second epoch (of one step): step=2.ckpt, step=4.ckpt
        callbacks.append(ModelCheckpoint(dirpath=save_to, filename="{step}", every_n_epochs=2, save_top_k=-1,
                                         save_on_train_epoch_end=True))
    trainer = L.Trainer(accelerator="cpu", devices=devices, max_steps=STEPS, logger=False,
                        strategy=ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1,
                                                       save_distributed_checkpoint=distributed),
                        enable_checkpointing=save_to is not None, use_distributed_sampler=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    module = Module(name)
    trainer.fit(module, ckpt_path=resume)
    opt = trainer.optimizers[0]
    params = [p.full_tensor().detach().clone() for p in module.net.parameters()]  # collective
    return {"params": params, "steps": trainer.global_step, "opt_steps": opt.num_steps, "rank": trainer.global_rank}


def main(out: str, devices: int, root: Path) -> None:
    results, rank = {}, 0
    for name in KWARGS:  # one launch for every optimizer and format: each launch costs seconds
        for fmt, distributed in FORMATS.items():
            where = root / name / fmt
            if devices == 2:
                results[(name, fmt, "straight")] = fit(name, devices, distributed, save_to=where)
            results[(name, fmt, "resumed")] = fit(name, devices, distributed, resume=where / "step=2.ckpt")
            rank = results[(name, fmt, "resumed")]["rank"]
    if rank == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
