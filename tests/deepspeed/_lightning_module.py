"""A picklable LightningModule for the DeepSpeed strategy test.

``training_step`` ignores the loader's content and trains on ``batch(step, rank)`` from the harness, so
the run is comparable with our sharded reference. ``on_fit_end`` (every rank, process group still up)
gathers the fp32 master parameters, runs the reference, and writes both to ``<out>/rank{r}.pt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.deepspeed._workers import SIZES, run_reference, split_groups
from tests.harness.models import batch, loss_fn, tiny_mlp


class _ForkSafe(pl.LightningModule):
    """One intra-op thread in the launched processes. The tests launch with start_method="fork" from the
    pytest process; where that process already ran a multi-threaded OpenMP region (libgomp's thread pool),
    a forked child's next parallel region waits at a barrier for pool threads it does not have (found
    hanging in torch's own fused AdamW kernel after tests/fsdp2 ran in the same process). One thread
    starts no team, so the child never waits for one."""

    def setup(self, stage: str) -> None:
        torch.set_num_threads(1)


class DSModule(_ForkSafe):
    def __init__(self, out_dir: str, opt_params: dict[str, Any], steps: int, stage: int, dtype: str,
                 from_json: bool = False) -> None:
        super().__init__()
        self.net = tiny_mlp(0, torch.float32, SIZES)
        self.out_dir, self.opt_params, self.steps = out_dir, opt_params, steps
        self.stage, self.dtype_name, self.from_json = stage, dtype, from_json

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(64, 1)), batch_size=1)

    def training_step(self, _batch: Any, _idx: int) -> torch.Tensor:
        x, y = batch(self.global_step, self.global_rank, dtype=torch.float32)
        dt = torch.bfloat16 if self.dtype_name == "bf16" else torch.float32
        return loss_fn(self.net, x.to(dt), y.to(dt))

    def configure_optimizers(self) -> Any:
        from lightning_soaa.optim.soaa import SOAA

        if self.from_json:  # the DeepSpeed config names the optimizer
            return None

        # same code as under DDP; two groups so that ZeRO-1/2 step twice per training step
        return SOAA(split_groups(self.net), **self.opt_params)

    def on_fit_end(self) -> None:
        import deepspeed_ext

        client = deepspeed_ext.find_client_optimizer(self.trainer.optimizers[0])
        if self.stage >= 1:
            from deepspeed.utils import safe_get_full_fp32_param

            params = [safe_get_full_fp32_param(p).detach().clone().float() for p in self.net.parameters()]
        else:
            raise NotImplementedError("stage 0 is covered by test_equivalence.py")
        from lightning_soaa.optim.soaa import SOAA

        ref = run_reference(self.global_rank, self.trainer.world_size, self.dtype_name, SOAA, self.opt_params,
                            self.steps, groups=not self.from_json)
        torch.save({"params": params, "ref": ref["params"], "stats": client.statistics(),
                    "ref_stats": ref["stats"], "wrapper": type(self.trainer.optimizers[0]).__name__,
                    "step_calls": client.step_calls},
                   Path(self.out_dir) / f"rank{self.global_rank}.pt")


class AccumModule(_ForkSafe):
    """SOAA under DeepSpeed's own gradient accumulation: records every micro-batch's loss and, after each
    micro-batch, the loss SOAA's last step ran on; rank 0 writes both to ``<out>/accum.pt``."""

    def __init__(self, out_dir: str, batches_per_epoch: int) -> None:
        super().__init__()
        self.net = tiny_mlp(0, torch.float32, SIZES)
        self.out_dir, self.batches_per_epoch = out_dir, batches_per_epoch
        self.losses: list[float] = []
        self.step_losses: list[tuple[float, float]] = []  # (SOAA's step count, its step's loss)

    def train_dataloader(self) -> DataLoader:
        xs, ys = zip(*(batch(i, 0, dtype=torch.float32) for i in range(self.batches_per_epoch)))
        return DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=8)

    def training_step(self, data: Any, _idx: int) -> torch.Tensor:
        loss = loss_fn(self.net, *data)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> Any:
        from lightning_soaa.optim.soaa import SOAA

        return SOAA(self.net.parameters(), lr=1e-2)

    def on_train_batch_end(self, *_: Any) -> None:
        import deepspeed_ext

        stats = deepspeed_ext.find_client_optimizer(self.trainer.optimizers[0]).statistics()
        self.step_losses.append((stats.get("t", 0.0), stats.get("loss", float("nan"))))

    def on_fit_end(self) -> None:
        if self.global_rank == 0:
            torch.save({"losses": self.losses, "step_losses": self.step_losses}, Path(self.out_dir) / "accum.pt")


def _ramp(step: int) -> float:
    """The LR schedule of :class:`SchedModule`: 0.1, 0.2, ... times the base lr."""
    return 0.1 * (step + 1)


class SchedModule(_ForkSafe):
    """lightning_soaa's AdamW with a per-step ``LambdaLR`` from ``configure_optimizers``; ``on_fit_end``
    (rank 0 of one) writes the trained parameters and the same run without DeepSpeed to ``<out>/sched.pt``."""

    LR = 2e-2

    def __init__(self, out_dir: str, steps: int) -> None:
        super().__init__()
        self.net = tiny_mlp(0, torch.float32, SIZES)
        self.out_dir, self.steps = out_dir, steps

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(64, 1)), batch_size=1)

    def training_step(self, _batch: Any, _idx: int) -> torch.Tensor:
        return loss_fn(self.net, *batch(self.global_step, 0, dtype=torch.float32))

    @staticmethod
    def _optimizer(params: Any) -> tuple[Any, Any]:
        from lightning_soaa.optim.adamw import ShardedAdamW

        opt = ShardedAdamW(params, lr=SchedModule.LR, weight_decay=0.1)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, _ramp)

    def configure_optimizers(self) -> Any:
        opt, sched = self._optimizer(self.net.parameters())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_end(self) -> None:
        ref_net = tiny_mlp(0, torch.float32, SIZES)
        opt, sched = self._optimizer(ref_net.parameters())
        for s in range(self.steps):
            opt.zero_grad()
            loss_fn(ref_net, *batch(s, 0, dtype=torch.float32)).backward()
            opt.step()
            sched.step()
        torch.save({"params": [p.detach().clone() for p in self.net.parameters()],
                    "ref": [p.detach().clone() for p in ref_net.parameters()]}, Path(self.out_dir) / "sched.pt")


class TokenDSModule(_ForkSafe):
    """:class:`~tests.deepspeed._workers.TokenModel` (an embedding table named ``wte``) with the optimizer
    named in the DeepSpeed config; ``on_fit_end`` writes the fp32 parameters (ZeRO-1/2), the reference's and
    the inner optimizer's groups to ``<out>/rank{r}.pt``."""

    def __init__(self, out_dir: str, name: str, opt_params: dict[str, Any], steps: int) -> None:
        super().__init__()
        from tests.deepspeed._workers import TokenModel

        self.model = TokenModel(tied=False)
        self.out_dir, self.name, self.opt_params, self.steps = out_dir, name, opt_params, steps

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(64, 1)), batch_size=1)

    def training_step(self, _batch: Any, _idx: int) -> torch.Tensor:
        x, y = batch(self.global_step, self.global_rank, dtype=torch.float32)
        return loss_fn(self.model, x, y)

    def configure_optimizers(self) -> Any:
        return None  # the DeepSpeed config names the optimizer

    def on_fit_end(self) -> None:
        from deepspeed.utils import safe_get_full_fp32_param

        import deepspeed_ext
        from tests.deepspeed._workers import _token_reference

        client = deepspeed_ext.find_client_optimizer(self.trainer.optimizers[0])
        params = [safe_get_full_fp32_param(p).detach().clone().float() for p in self.model.parameters()]
        ref = _token_reference(self.name, False, self.trainer.world_size, self.steps, self.opt_params)
        torch.save({"params": params, "ref": ref, "names": [n for n, _ in self.model.named_parameters()],
                    "inner_groups": [(g.get("param_names"), g.get("use_asgo")) for g in client.inner.param_groups]},
                   Path(self.out_dir) / f"rank{self.global_rank}.pt")


class SwitchModule(_ForkSafe):
    """``tiny_mlp`` with lightning_soaa's AdamW (``ours``) or torch's AdamW, two param groups; with ``save_to``,
    the fit ends with ``trainer.save_checkpoint(save_to)`` (a DeepSpeed checkpoint folder, every rank)."""

    def __init__(self, ours: bool, save_to: str | None = None) -> None:
        super().__init__()
        self.net = tiny_mlp(0, torch.float32, SIZES)
        self.ours, self.save_to = ours, save_to

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(64, 1)), batch_size=1)

    def training_step(self, _batch: Any, _idx: int) -> torch.Tensor:
        return loss_fn(self.net, *batch(self.global_step, self.global_rank, dtype=torch.float32))

    def configure_optimizers(self) -> Any:
        if self.ours:
            from lightning_soaa.optim.adamw import ShardedAdamW

            return ShardedAdamW(split_groups(self.net), lr=1e-2, betas=(0.5, 0.6), weight_decay=0.3)
        return torch.optim.AdamW(split_groups(self.net), lr=1e-3)

    def on_train_end(self) -> None:
        if self.save_to is not None:
            self.trainer.save_checkpoint(self.save_to)


def unguarded_strategy(**kwargs: Any) -> Any:
    """deepspeed_ext's strategy (for its CPU support) whose engine of a foreign optimizer has nothing of ours on it:
    the engine Lightning's own DeepSpeedStrategy builds on GPUs, which OptimizerStateCheck guards."""
    from deepspeed_ext.strategy import DeepSpeedStrategy

    class Unguarded(DeepSpeedStrategy):
        def _guard_foreign_engine(self, engine: Any) -> None:
            pass

    return Unguarded(**kwargs)
