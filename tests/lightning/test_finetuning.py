"""Lightning's BaseFinetuning with our optimizers, through the factory (``lightning-soaa fit``'s route, which
hands the optimizer ``named_parameters()``): the backbone unfrozen at epoch 1 by
``unfreeze_and_add_param_group`` trains (torch refused the unnamed group one epoch into the fit), and a fit
resumed from a checkpoint saved after the unfreeze loads (refused as 'a different model': the callback
assigns ``optimizer.param_groups`` before the state is loaded). ShardedAdamW against torch's AdamW on the
same route, uninterrupted and resumed (Lightning's own resume of this callback is not the uninterrupted run,
for torch's optimizer too: it leaves the backbone frozen after the restart)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, BaseFinetuning, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader

from lightning_soaa import ASGO, DASGO
from lightning_soaa.lightning import LossToOptimizer, OptimizerFactory
from lightning_soaa.optim.asgo import asgo_param_groups
from tests.harness.models import QKVNet
from tests.lightning.helpers import (
    D_IN,
    D_OUT,
    RankRecorder,
    TinyRegressor,
    load_records,
    make_trainer,
    regression_data,
)
from tests.lightning.test_finetuning_egn import _RequiresGradUnfreeze
from tests.lightning.test_strategies import _case

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(240)]

HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 1e-2}


class _Unfreeze(BaseFinetuning):
    def freeze_before_training(self, pl_module: Any) -> None:
        self.freeze(pl_module.net[0])

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Any) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.net[0], optimizer, lr=5e-3, initial_denom_lr=1.0)


class _TorchAdamW(TinyRegressor):
    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], **HYPER)


def _fit(model: TinyRegressor, out: Path, ckpt: Path | None = None) -> torch.Tensor:
    saver = ModelCheckpoint(dirpath=str(out / "ckpt"), save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    trainer = make_trainer(out, max_steps=-1, max_epochs=3, enable_checkpointing=ckpt is None,
                           callbacks=[_Unfreeze(), LossToOptimizer(), *([saver] if ckpt is None else [])])
    trainer.fit(model, ckpt_path=None if ckpt is None else str(ckpt))
    assert len(trainer.optimizers[0].param_groups) == 2  # the backbone's group
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", ["AdamW", "SOAA", "ASGO"])
def test_backbone_unfrozen_mid_fit_trains_and_resumes(name: str, tmp_path: Path) -> None:
    class_path, _ = _case(name)
    args = HYPER if name == "AdamW" else {"lr": 1e-2}
    start = torch.cat([p.detach().flatten() for p in TinyRegressor().parameters()])
    full = _fit(TinyRegressor(OptimizerFactory(class_path, args)), tmp_path / "full")
    first = torch.cat([p.detach().flatten() for p in TinyRegressor().net[0].parameters()]).numel()
    assert not torch.equal(full[:first], start[:first])  # the unfrozen backbone trained
    ckpt = tmp_path / "full" / "ckpt" / "epoch=1-step=16.ckpt"
    resumed = _fit(TinyRegressor(OptimizerFactory(class_path, args)), tmp_path / "resumed", ckpt)
    if name == "AdamW":
        torch.testing.assert_close(full, _fit(_TorchAdamW(), tmp_path / "torch"), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(resumed, _fit(_TorchAdamW(), tmp_path / "torch_resumed",
                                                 tmp_path / "torch" / "ckpt" / "epoch=1-step=16.ckpt"),
                                   rtol=1e-12, atol=1e-14)


def _fit_ddp(name: str, devices: int, out: Path, late: bool = False, **extra: Any) -> torch.Tensor:
    """The stock recipe (``_Unfreeze``), or with ``late`` the one that freezes nothing before the wrap, at
    ``devices`` processes (DDP, forked): rank 0's final parameters."""
    class_path, _ = _case(name)
    model = TinyRegressor(OptimizerFactory(class_path, {"lr": 1e-2, **extra}), batch_size=16 // devices)
    strategy = DDPStrategy(start_method="fork", find_unused_parameters=late) if devices > 1 else None
    trainer = make_trainer(out, devices=devices, strategy=strategy, max_steps=-1, max_epochs=3,
                           callbacks=[_RequiresGradUnfreeze() if late else _Unfreeze(), LossToOptimizer(),
                                      RankRecorder(out)])
    trainer.fit(model)
    return load_records(out, "", devices)[0]["params"]


@pytest.mark.parametrize("name", ["AdamW", "SOAA", "ASGO"])
def test_backbone_unfrozen_under_ddp_is_refused_naming_the_callback_and_trains_with_mean(name: str,
                                                                                         tmp_path: Path) -> None:
    """Under strategy='ddp' the callback freezes the backbone before DDP wraps the model, so DDP never averages
    it once unfrozen: the optimizer refuses the first step after the unfreeze (the ranks' gradients differ).
    The refusal listed every cause of such gradients; it now names the added group, the callback and
    grad_reduction='mean', with which the same fit equals one process, as does the other route it names
    (the backbone frozen and made trainable from finetune_function)."""
    with pytest.raises(Exception, match=r"param_groups\[1\], which add_param_group added") as err:
        _fit_ddp(name, 2, tmp_path / "none")
    assert "BaseFinetuning" in str(err.value) and "grad_reduction='mean'" in str(err.value)
    torch.testing.assert_close(_fit_ddp(name, 2, tmp_path / "mean", grad_reduction="mean"),
                               _fit_ddp(name, 1, tmp_path / "one"), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_fit_ddp(name, 2, tmp_path / "late2", late=True),
                               _fit_ddp(name, 1, tmp_path / "late1", late=True), rtol=1e-12, atol=1e-14)


class _Backbone(nn.Module):
    """An embedding table named ``tok`` (no "emb": the name rule alone would precondition it) and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(5, D_IN, dtype=torch.float64)
        self.proj = nn.Linear(D_IN, 8, dtype=torch.float64)


class _RegressionSteps(pl.LightningModule):
    """The training step and data of the backboned models below (their forward is their own)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(regression_data(), batch_size=8, shuffle=False)


class _Backboned(_RegressionSteps):
    """A frozen backbone (table + Linear) under a Linear head, built with ASGO's documented routes. Records,
    at each step the backbone trains, its parameters before the step, their gradients and the group's lr."""

    def __init__(self, route: str) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.backbone = _Backbone()
        self.head = nn.Linear(8, D_OUT, dtype=torch.float64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        self.route = route
        self.steps: list[tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = ((2 * x).floor().clamp(-2, 2) + 2).long()  # 0..4
        return self.head(torch.tanh(self.backbone.proj(x + self.backbone.tok(tokens).mean(dim=1))))

    def configure_optimizers(self) -> Any:
        if self.route == "asgo_param_groups":  # the README's route for a model with a table
            return ASGO(asgo_param_groups(self), lr=1e-2)
        return OptimizerFactory("lightning_soaa.DASGO", {"lr": 1e-2})(self)  # the registry's route_param_groups

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        named = dict(self.backbone.named_parameters(prefix="backbone"))
        if all(p.grad is not None for p in named.values()):
            self.steps.append((optimizer.param_groups[-1]["lr"], {n: p.detach().clone() for n, p in named.items()},
                               {n: p.grad.detach().clone() for n, p in named.items()}))


@pytest.mark.parametrize("route", ["asgo_param_groups", "factory"])
def test_backbone_table_unfrozen_by_backbone_finetuning_takes_the_adamw_part(route: str, tmp_path: Path) -> None:
    """Lightning's BackboneFinetuning adds the unfrozen backbone as one group of bare tensors: its embedding
    table was routed by shape to the matrix method (the Linear rightly so). Built from the module, the
    optimizer knows the frozen parameters' names and tables: the table takes the AdamW part, per parameter,
    in the one group BackboneFinetuning drives (``param_groups[-1]["lr"]``), and each backbone update is
    the one of an optimizer given the same parameters by name (table in a ``use_asgo=False`` group). A fit
    resumed after the unfreeze routes the same (the callback re-adds the group before the state loads)."""
    cls = ASGO if route == "asgo_param_groups" else DASGO
    saver = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1,
                            save_on_train_epoch_end=True)
    model = _Backboned(route)
    trainer = make_trainer(tmp_path, max_steps=-1, max_epochs=3, enable_checkpointing=True,
                           callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1), saver])
    trainer.fit(model)
    opt = trainer.optimizers[0]
    assert isinstance(opt, cls) and len(opt.param_groups) == 2  # the head's group, the backbone's (not split)
    names = {id(p): n for n, p in model.named_parameters()}

    def routes(o: Any) -> dict[str, bool]:
        return {names[id(p)]: o.is_matrix_param(p, o.param_groups[gi], n) for p, gi, n in o._all_params()}

    first = routes(opt)
    assert first == {"head.weight": True, "head.bias": False, "backbone.tok.weight": False,
                     "backbone.proj.weight": True, "backbone.proj.bias": False}
    # the reference: the backbone's parameters given by name, replayed on the recorded gradients and lrs
    assert len(model.steps) == 16 and len({lr for lr, _, _ in model.steps}) == 2  # epochs 1, 2 (lr raised)
    start = {n: nn.Parameter(t.clone()) for n, t in model.steps[0][1].items()}
    ref = cls([{"params": [(n, start[n]) for n in ("backbone.proj.weight", "backbone.proj.bias")]},
               {"params": [("backbone.tok.weight", start["backbone.tok.weight"])], "use_asgo": False}], lr=1e-2)
    for i, (lr, before, grads) in enumerate(model.steps):
        for n, p in start.items():
            torch.testing.assert_close(p.detach(), before[n], rtol=1e-12, atol=1e-14, msg=f"step {i}: {n}")
            p.grad = grads[n]
        for group in ref.param_groups:
            group["lr"] = lr
        ref.step()
    for n, p in model.backbone.named_parameters(prefix="backbone"):
        torch.testing.assert_close(p.detach(), start[n].detach(), rtol=1e-12, atol=1e-14, msg=n)
    # resumed after the unfreeze: the callback assigns the saved groups (names included) before the state loads
    resumed = _Backboned(route)
    trainer = make_trainer(tmp_path / "resumed", max_steps=-1, max_epochs=3,
                           callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1)])
    trainer.fit(resumed, ckpt_path=str(tmp_path / "ckpt" / "epoch=1-step=16.ckpt"))
    names = {id(p): n for n, p in resumed.named_parameters()}
    assert routes(trainer.optimizers[0]) == first


class _QKVBackboned(_RegressionSteps):
    """A frozen backbone with a fused query/key/value projection (``backbone.qkv``, 3 parts) under a Linear head,
    built with ``fused`` by ASGO's documented routes."""

    def __init__(self, route: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = QKVNet(fused=True).to(torch.float64)
        self.head = nn.Linear(D_OUT, D_OUT, dtype=torch.float64)
        self.route = route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def configure_optimizers(self) -> Any:
        if self.route == "asgo_param_groups":
            return ASGO(asgo_param_groups(self, fused={"qkv.weight": 3}), lr=1e-2)
        return OptimizerFactory("lightning_soaa.ASGO", {"lr": 1e-2, "fused": {"qkv.weight": 3}})(self)


@pytest.mark.parametrize("route", ["asgo_param_groups", "factory"])
def test_a_fused_projection_unfrozen_by_backbone_finetuning_is_stepped_as_its_parts(route: str,
                                                                                  tmp_path: Path) -> None:
    """``fused`` with the only fused matrix in a backbone frozen while the optimizer is built: it was refused at
    construction (no trainable match), and a fused matrix added later was stepped whole. The one group
    BackboneFinetuning adds records the parts (``fused_parts``), and a fit resumed after the unfreeze (the
    callback assigns the saved groups before the state loads) steps the same three parts."""
    saver = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1,
                            save_on_train_epoch_end=True)
    trainer = make_trainer(tmp_path, max_steps=-1, max_epochs=3, enable_checkpointing=True,
                           callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1), saver])
    trainer.fit(_QKVBackboned(route))

    def parts(o: Any) -> tuple[Any, list[tuple[int, ...]], bool]:
        assert isinstance(o, ASGO) and len(o.param_groups) == 2  # the head's group, the backbone's (not split)
        g = o.param_groups[1]
        j = g["param_names"].index("backbone.qkv.weight")
        blocks = o.block_table.by_param[next(i for i, p in enumerate(o._params) if p is g["params"][j])]
        return (g["fused_parts"], [b.shape for b in blocks],
                all("gram" in o.block_state(b) for b in blocks) and int(o.block_state(blocks[0])["step"]) > 0)

    first = parts(trainer.optimizers[0])
    assert first == (((2, 3),), [(3, 5)] * 3, True)
    resumed = _QKVBackboned(route)
    trainer = make_trainer(tmp_path / "resumed", max_steps=-1, max_epochs=3,
                           callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1)])
    trainer.fit(resumed, ckpt_path=str(tmp_path / "ckpt" / "epoch=1-step=16.ckpt"))
    assert parts(trainer.optimizers[0]) == first
