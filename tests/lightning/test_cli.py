"""LightningCLI: ``--optimizer <class path>`` on a module without configure_optimizers, unknown optimizers,
and the ``lightning-soaa`` console script running ``fit`` from a config on 2 processes."""

from __future__ import annotations

import csv
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.cli import LightningArgumentParser

from lightning_soaa import registry
from lightning_soaa.lightning import BatchToOptimizer, LossToOptimizer, OptimizerDiagnostics
from lightning_soaa.lightning.cli import SOAALightningCLI
from tests.lightning.helpers import TinyRegressor

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
BASE = ["fit", "--model", "tests.lightning.helpers.PlainRegressor", "--trainer.accelerator", "cpu",
        "--trainer.devices", "1", "--trainer.max_steps", "3", "--trainer.precision", "64-true",
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _cli_case(spec: registry.OptimizerSpec) -> tuple[str, list[str], dict]:
    extra = ["--optimizer.lr", "0.02"]
    if spec.first_arg is registry.FirstArg.MODULE:
        extra += ["--optimizer.loss", "mse"]
    return spec.qualified_name, extra, {"lr": 0.02}


@pytest.mark.parametrize(("class_path", "extra", "check"), [
    *[_cli_case(spec) for spec in registry.REGISTRY],
    ("lightning_soaa.ShardedAdamW", ["--optimizer.lr", "0.02"], {"lr": 0.02}),  # the alias still works
    ("lightning_soaa.SOAA", ["--optimizer.lr", "0.02", "--optimizer.gamma", "0.2"], {"lr": 0.02}),
    ("torch.optim.AdamW", ["--optimizer.lr", "0.02"], {"lr": 0.02}),
])
def test_cli_optimizer_class_path(class_path: str, extra: list[str], check: dict, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    spec = registry.lookup(class_path)
    expected = spec.load() if spec else torch.optim.AdamW
    monkeypatch.chdir(tmp_path)
    cli = SOAALightningCLI(args=[*BASE, "--optimizer", class_path, *extra])
    opt = cli.trainer.optimizers[0]
    assert type(opt) is expected
    for k, v in check.items():
        assert opt.param_groups[0][k] == v
    if hasattr(opt, "statistics"):
        assert opt.statistics()["steps"] == 3.0
    names = {type(c) for c in cli.trainer.callbacks}
    assert {LossToOptimizer, BatchToOptimizer, OptimizerDiagnostics} <= names
    assert cli.trainer.state.finished


def test_cli_asgo_fused_steps_the_named_matrix_as_its_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--optimizer.fused`` reaches ASGO's row_parts through the factory (the CLI builds the optimizer from
    options alone); the same 3 steps as ASGO built with the groups by hand."""
    from lightning_soaa import ASGO
    from tests.lightning.helpers import PlainRegressor

    monkeypatch.chdir(tmp_path)
    cli = SOAALightningCLI(args=[*BASE, "--optimizer", "lightning_soaa.ASGO", "--optimizer.lr", "0.02",
                                 "--optimizer.fused", '{"net.0.weight": 2}'])
    opt = cli.trainer.optimizers[0]
    assert [(g["param_names"], g["row_parts"]) for g in opt.param_groups] == [
        (["net.0.bias", "net.2.weight", "net.2.bias"], 1), (["net.0.weight"], 2)]
    model = PlainRegressor()
    named = dict(model.named_parameters())
    hand = ASGO([{"params": [(n, p) for n, p in named.items() if n != "net.0.weight"]},
                 {"params": [("net.0.weight", named["net.0.weight"])], "row_parts": 2}], lr=0.02)
    import lightning.pytorch as pl

    model.configure_optimizers = lambda: hand  # type: ignore[method-assign]
    pl.Trainer(accelerator="cpu", devices=1, max_steps=3, precision="64-true", logger=False,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(model)
    assert hand.statistics()["steps"] == 3.0
    for a, b in zip(cli.model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cli_asgo_nesterov_reaches_every_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--optimizer.nesterov true`` (the CLI reads the option from ASGO's signature): every group the route
    builds has it, and the 3 steps equal, to the last bit, ASGO(asgo_param_groups(model), nesterov=True)."""
    from lightning_soaa import ASGO
    from lightning_soaa.optim.asgo_groups import asgo_param_groups
    from tests.lightning.helpers import PlainRegressor

    monkeypatch.chdir(tmp_path)
    cli = SOAALightningCLI(args=[*BASE, "--optimizer", "lightning_soaa.ASGO", "--optimizer.lr", "0.02",
                                 "--optimizer.nesterov", "true"])
    opt = cli.trainer.optimizers[0]
    assert [g["nesterov"] for g in opt.param_groups] == [True] * len(opt.param_groups)
    model = PlainRegressor()
    hand = ASGO(asgo_param_groups(model), lr=0.02, nesterov=True)
    model.configure_optimizers = lambda: hand  # type: ignore[method-assign]
    _fit(model)
    assert hand.statistics()["steps"] == opt.statistics()["steps"] == 3.0
    for a, b in zip(cli.model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _fit(model: Any, max_steps: int = 3, ckpt_path: str | None = None) -> Any:
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, precision="64-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


TOKENS = [*BASE[:2], "tests.lightning.helpers.TokenRegressor", *BASE[3:]]


@pytest.mark.parametrize("tied", [False, True], ids=["untied_head", "tied_head"])
@pytest.mark.parametrize("name", ["ASGO", "DASGO"])
def test_cli_asgo_steps_an_embedding_named_wte_by_adamw(name: str, tied: bool, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a hunter: the CLI (through the OptimizerFactory) handed ASGO and DASGO ``named_parameters()``
    alone, so an ``nn.Embedding`` named ``wte`` (no "emb" in its name) was preconditioned as a matrix
    (spec/algorithms.md §3.4: embeddings go to the AdamW fallback). The routes now take the registry's
    module groups: 3 steps equal, to the last bit, ASGO built with ``asgo_param_groups(model)`` by hand."""
    from lightning_soaa.optim.asgo_groups import asgo_param_groups
    from tests.lightning.helpers import TokenRegressor

    monkeypatch.chdir(tmp_path)
    cli = SOAALightningCLI(args=[*TOKENS, "--model.tied", str(tied).lower(), "--optimizer",
                                 f"lightning_soaa.{name}", "--optimizer.lr", "0.02"])
    opt = cli.trainer.optimizers[0]
    assert [(g["param_names"], g.get("use_asgo")) for g in opt.param_groups][-1] == (["wte.weight"], False)
    model = TokenRegressor(tied=tied)
    hand = registry.get(name).load()(asgo_param_groups(model), lr=0.02)
    model.configure_optimizers = lambda: hand  # type: ignore[method-assign]
    _fit(model)
    assert hand.statistics()["steps"] == opt.statistics()["steps"] == 3.0
    for (n, a), b in zip(cli.model.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, n=n: f"{n}: {m}")


def test_cli_asgo_resumes_its_groups_and_names_a_regrouped_checkpoint(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """On resume the route rebuilds the same groups: its checkpoint loads into the CLI's ASGO and into one
    built with ``asgo_param_groups(model)``, and both go on alike. A checkpoint saved with the table in the
    one group the routes gave before is refused, naming the parameter that moved."""
    from lightning_soaa import ASGO
    from lightning_soaa.optim.asgo_groups import asgo_param_groups
    from tests.lightning.helpers import TokenRegressor

    monkeypatch.chdir(tmp_path)
    args = [*TOKENS, "--model.batch_size", "32", "--optimizer", "lightning_soaa.ASGO", "--optimizer.lr", "0.02"]
    SOAALightningCLI(args=[*args, "--trainer.max_steps", "2"]).trainer.save_checkpoint(tmp_path / "two.ckpt")
    resumed = SOAALightningCLI(args=[*args, "--trainer.max_steps", "4", "--ckpt_path", str(tmp_path / "two.ckpt")])
    assert resumed.trainer.global_step == 4
    model = TokenRegressor(batch_size=32)
    hand = ASGO(asgo_param_groups(model), lr=0.02)
    model.configure_optimizers = lambda: hand  # type: ignore[method-assign]
    _fit(model, max_steps=4, ckpt_path=str(tmp_path / "two.ckpt"))
    for a, b in zip(resumed.model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    old = TokenRegressor()
    one_group = ASGO(old.named_parameters(), lr=0.02)
    old.configure_optimizers = lambda: one_group  # type: ignore[method-assign]
    _fit(old, max_steps=2).save_checkpoint(tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match=r"the state has 1 param groups, this optimizer has 2 \('wte.weight' in "
                                         r"group 0 of the state, in group 1 here\)"):
        SOAALightningCLI(args=[*args, "--trainer.max_steps", "4", "--ckpt_path", str(tmp_path / "old.ckpt")])


PRINTED_SOAA = """optimizer:
  class_path: lightning_soaa.SOAA
  init_args:
    lr: 0.003
    betas: [0.9, 0.999]
    eps: 1.0e-08
    weight_decay: 0.0
"""


def test_cli_switching_the_optimizer_over_a_printed_config_refuses_the_old_defaults(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Found by a hunter: ``--optimizer lightning_soaa.ASGO`` over a ``--print_config`` output of a SOAA config
    (every default spelled out) trained ASGO with SOAA's betas, eps and weight_decay (jsonargparse keeps the
    options the new class also takes). Refused naming them; given on the command line, or a config that sets
    only the lr (the shipped ones), it runs, with the lr carried as chosen."""
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "printed.yaml"
    cfg.write_text(PRINTED_SOAA)
    with pytest.raises(SystemExit):
        SOAALightningCLI(args=[*BASE, "--config", str(cfg), "--optimizer", "lightning_soaa.ASGO"])
    err = capsys.readouterr().err
    assert "over a config whose optimizer is lightning_soaa.SOAA" in err and "would be carried over to ASGO" in err
    assert all(f in err for f in ("betas=(0.9, 0.999)", "eps=1e-08", "weight_decay=0.0", "betas=(0.9, 0.8)")), err
    cli = SOAALightningCLI(args=[*BASE, "--config", str(cfg), "--optimizer", "lightning_soaa.ASGO", "--optimizer.betas",
                                 "[0.9, 0.999]", "--optimizer.eps", "1e-8", "--optimizer.weight_decay", "0.0"])
    assert cli.trainer.optimizers[0].param_groups[0]["betas"] == (0.9, 0.999)
    cfg.write_text("optimizer:\n  class_path: lightning_soaa.SOAA\n  init_args:\n    lr: 0.003\n")
    cli = SOAALightningCLI(args=[*BASE, "--config", str(cfg), "--optimizer", "lightning_soaa.ASGO"])
    group = cli.trainer.optimizers[0].param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (0.003, (0.9, 0.8), 0.1)


@pytest.mark.parametrize("spec", list(registry.REGISTRY), ids=lambda s: s.name)
def test_cli_resuming_our_state_with_a_torch_optimizer_is_refused_naming_both(
        spec: registry.OptimizerSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--ckpt_path`` of a run of ours with ``--optimizer torch.optim.AdamW`` failed inside torch
    (``KeyError: 'step'`` in ``Adam.__setstate__``, found by a hunter); now refused before the load,
    with nothing stepped. Resuming with the same optimizer still continues."""
    monkeypatch.chdir(tmp_path)
    name, extra, _ = _cli_case(spec)
    args = [a if a != "false" or BASE[i - 1] != "--trainer.enable_checkpointing" else "true"
            for i, a in enumerate(BASE)] + ["--trainer.default_root_dir", str(tmp_path)]
    SOAALightningCLI(args=[*args, "--optimizer", name, *extra])
    ckpt = next(tmp_path.rglob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["lightning_soaa"]["optimizer"]
    assert registry.lookup(f"lightning_soaa.{saved}") is spec  # the class path the message offers is valid
    more = [a if a != "3" else "5" for a in args] + ["--ckpt_path", str(ckpt)]
    with pytest.raises(ValueError, match=rf"optimizer_states\[0\] was written by lightning_soaa's {saved}, "
                                         r"and the run's optimizer 0 is torch\.optim\.adamw\.AdamW") as err:
        SOAALightningCLI(args=[*more, "--optimizer", "torch.optim.AdamW", "--optimizer.lr", "0.02"])
    assert f"--optimizer lightning_soaa.{saved} " in str(err.value)
    cli = SOAALightningCLI(args=[*more, "--optimizer", name, *extra])
    assert cli.trainer.global_step == 5 and cli.trainer.optimizers[0].statistics()["steps"] == 5.0


def test_cli_says_when_it_replaces_the_models_own_configure_optimizers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """As the stock LightningCLI does (found by a hunter: ours replaced it silently)."""
    import logging

    monkeypatch.chdir(tmp_path)
    args = [a if a != "tests.lightning.helpers.PlainRegressor" else "tests.lightning.helpers.TinyRegressor"
            for a in BASE]
    with caplog.at_level(logging.WARNING, logger="lightning_soaa.lightning.cli"):
        SOAALightningCLI(args=[*args, "--optimizer", "lightning_soaa.AdamW"])
    assert any("TinyRegressor.configure_optimizers` will be overridden" in r.getMessage() for r in caplog.records)


def test_cli_a_wrong_case_class_path_is_an_unknown_optimizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        SOAALightningCLI(args=[*BASE, "--optimizer", "lightning_soaa.asgo"])
    err = capsys.readouterr().err
    assert "Unknown optimizer 'lightning_soaa.asgo'" in err and "Valid optimizers" in err, err


def test_cli_unknown_optimizer_lists_valid_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        SOAALightningCLI(args=[*BASE, "--optimizer", "lightning_soaa.SOAB"])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "lightning_soaa.SOAB" in err
    for name in ("lightning_soaa.SOAA", "lightning_soaa.EGN", "lightning_soaa.ASGO", "torch.optim.AdamW"):
        assert name in err, err
    # the same from a YAML config file
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("optimizer:\n  class_path: lightning_soaa.NotAnOptimizer\n  init_args:\n    lr: 0.1\n")
    with pytest.raises(SystemExit):
        SOAALightningCLI(args=[*BASE, "--config", str(cfg)])
    err = capsys.readouterr().err
    assert "NotAnOptimizer" in err and "Valid optimizers" in err and "lightning_soaa.SOAA" in err


def test_cli_option_typo_names_the_option_not_the_optimizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        SOAALightningCLI(args=[*BASE, "--optimizer", "lightning_soaa.SOAA", "--optimizer.gama", "0.1"])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "'gama' is not accepted" in err and "--optimizer.gamma" in err, err
    assert "Unknown optimizer" not in err and "Valid optimizers" not in err, err
    # objects no command line can give are not offered as options
    assert "--optimizer.comm" not in err and "--optimizer.process_group" not in err, err


@pytest.mark.parametrize(("option", "value"), [("total_steps", "2.5"), ("max_grad_norm", "big"), ("lr", "abc")])
def test_cli_bad_value_names_the_option_and_the_value(option: str, value: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A wrong type for an option that also takes None (``total_steps: int | None``) lost the value given:
    the message was cut at the option's own "Expected a NoneType", before its "Given value"."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        SOAALightningCLI(args=[*BASE, "--optimizer", "lightning_soaa.SOAA", f"--optimizer.{option}", value])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert f'Parser key "{option}"' in err and f"value: {value}" in err, err
    assert "Unknown optimizer" not in err, err


def test_cli_options_beside_class_path_are_pointed_to_init_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``optimizer: {class_path: lightning_soaa.SOAA, lr: 0.03}`` (init_args left out) was reported as "Invalid
    option for --optimizer torch.optim.Optimizer: Option 'class_path' is not accepted", about a class the
    config does not name."""
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "flat.yaml"
    cfg.write_text("optimizer:\n  class_path: lightning_soaa.SOAA\n  lr: 0.03\n  gamma: 0.1\n")
    with pytest.raises(SystemExit) as exc:
        SOAALightningCLI(args=[*BASE, "--config", str(cfg)])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "lr, gamma sit beside class_path" in err and "init_args:" in err and "lr: 0.03" in err, err
    assert "torch.optim.Optimizer" not in err, err


class _OwnOptimizer(TinyRegressor):
    """A module whose configure_optimizers builds its optimizer itself, without a scheduler."""

    def configure_optimizers(self) -> Any:
        return registry.get("AdamW").load()(self.named_parameters(), lr=0.02)


def test_cli_lr_scheduler_without_optimizer_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``--lr_scheduler`` is built around the optimizer of ``--optimizer``; without one, the model's own
    configure_optimizers ran and the scheduler was dropped without a word (StepLR's lr stayed at 0.02 for
    two epochs where it was to reach 2e-4)."""
    monkeypatch.chdir(tmp_path)
    args = [a if a != "tests.lightning.helpers.PlainRegressor" else "tests.lightning.test_cli._OwnOptimizer"
            for a in BASE]
    with pytest.raises(SystemExit) as exc:
        SOAALightningCLI(args=[*args, "--lr_scheduler", "torch.optim.lr_scheduler.StepLR",
                               "--lr_scheduler.step_size", "1"])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "--lr_scheduler torch.optim.lr_scheduler.StepLR" in err and "without --optimizer" in err, err
    assert "configure_optimizers" in err, err
    # without it the model's own optimizer trains, as before
    cli = SOAALightningCLI(args=args)
    assert cli.trainer.global_step == 3 and not cli.trainer.lr_scheduler_configs


class _LinkedScheduler(TinyRegressor):
    """A module handed its scheduler's init args by a CLI link (``add_lr_scheduler_args(link_to=...)``)."""

    def __init__(self, lr_scheduler_init: dict | None = None) -> None:
        super().__init__()
        self.lr_scheduler_init = lr_scheduler_init

    def configure_optimizers(self) -> Any:
        from lightning.pytorch.cli import instantiate_class

        opt = registry.get("AdamW").load()(self.named_parameters(), lr=0.02)
        return [opt], [instantiate_class(opt, self.lr_scheduler_init)]


class _LinkingCLI(SOAALightningCLI):
    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lr_scheduler_args(torch.optim.lr_scheduler.StepLR, link_to="model.lr_scheduler_init")


class _OneSchedulerCLI(SOAALightningCLI):
    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lr_scheduler_args(torch.optim.lr_scheduler.StepLR)  # "AUTOMATIC", one class: no class_path


class _LinkedOptimizer(TinyRegressor):
    """A module handed its optimizer's init args by a CLI link (``add_optimizer_args(link_to=...)``)."""

    def __init__(self, optimizer_init: dict | None = None) -> None:
        super().__init__()
        self.optimizer_init = optimizer_init

    def configure_optimizers(self) -> Any:
        from lightning.pytorch.cli import instantiate_class

        return instantiate_class(self.named_parameters(), self.optimizer_init)


class _LinkingOptimizerCLI(SOAALightningCLI):
    def add_arguments_to_parser(self, parser: Any) -> None:  # Lightning's documented pattern, without super()
        parser.add_optimizer_args(registry.get("AdamW").load(), link_to="model.optimizer_init")


class _TwoOptimizersCLI(SOAALightningCLI):
    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_optimizer_args(torch.optim.SGD, nested_key="second_optimizer")  # "AUTOMATIC" too


def test_cli_groups_a_subclass_adds_are_read_as_the_stock_cli_reads_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduler group linked to the model is the model's (it was refused as a --lr_scheduler without
    --optimizer), and so is an optimizer group; an automatic group of one class carries its init args alone
    (it was refused for a missing class_path). All as the stock CLI; 16 steps are 2 epochs: StepLR(1, 0.1)
    takes 0.02 to 2e-4."""
    monkeypatch.chdir(tmp_path)
    args = [a if a != "3" else "16" for a in BASE[3:]]
    args += ["--lr_scheduler.step_size", "1", "--lr_scheduler.gamma", "0.1"]
    linked = _LinkingCLI(_LinkedScheduler, args=["fit", *args])
    one = _OneSchedulerCLI(TinyRegressor, args=["fit", *args, "--optimizer", "lightning_soaa.AdamW",
                                                "--optimizer.lr", "0.02"])
    for cli in (linked, one):
        assert len(cli.trainer.lr_scheduler_configs) == 1
        assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(2e-4, rel=1e-12)
    # an optimizer linked to the model (it failed with KeyError: 'class_path'): the model builds it
    own = _LinkingOptimizerCLI(_LinkedOptimizer, args=["fit", *BASE[3:], "--optimizer.lr", "0.03"])
    opt = own.trainer.optimizers[0]
    assert type(opt) is registry.get("AdamW").load() and opt.param_groups[0]["lr"] == 0.03
    assert opt.statistics()["steps"] == 3.0
    # two automatic optimizer groups: the stock CLI refuses; the second's values were ignored
    with pytest.raises(SystemExit):
        _TwoOptimizersCLI(TinyRegressor, args=["fit", *BASE[3:], "--optimizer", "lightning_soaa.AdamW",
                                               "--second_optimizer.lr", "0.5"])


class _OwnOptimizerGroupCLI(SOAALightningCLI):
    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_optimizer_args(torch.optim.Adam)  # Lightning's documented group, after the habitual super()


class _SchedulerOnlyCLI(SOAALightningCLI):
    def add_arguments_to_parser(self, parser: Any) -> None:  # without super(): the CLI's --optimizer is still added
        parser.add_lr_scheduler_args(torch.optim.lr_scheduler.StepLR)


def test_cli_optimizer_group_is_added_where_the_stock_cli_adds_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A subclass's own optimizer group after ``super().add_arguments_to_parser`` failed ("Group with name
    optimizer already exists"; the stock CLI takes it); a subclass without super() got the stock --optimizer,
    where EGN was refused for a "model" no command line can give."""
    monkeypatch.chdir(tmp_path)
    own = _OwnOptimizerGroupCLI(args=[*BASE, "--optimizer.lr", "0.02"])
    assert type(own.trainer.optimizers[0]) is torch.optim.Adam
    assert own.trainer.optimizers[0].param_groups[0]["lr"] == 0.02
    egn = _SchedulerOnlyCLI(args=[*BASE, "--optimizer", "lightning_soaa.EGN", "--lr_scheduler.step_size", "1"])
    assert type(egn.trainer.optimizers[0]) is registry.get("EGN").load() and egn.trainer.global_step == 3
    assert len(egn.trainer.lr_scheduler_configs) == 1


class _OwnParser(LightningArgumentParser):
    pass


class _LinkedOptimizerCLI(SOAALightningCLI):
    def add_arguments_to_parser(self, parser: Any) -> None:  # the README's way to link to or set --optimizer
        super().add_arguments_to_parser(parser)
        parser.add_optimizer_args()
        parser.set_defaults({"optimizer": {"class_path": "lightning_soaa.SOAA", "init_args": {"lr": 0.02}}})
        parser.link_arguments("trainer.max_steps", "optimizer.init_args.total_steps")


def test_cli_own_parser_class_keeps_egn_and_linked_optimizer_options(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's own ``parser_class`` got the stock optimizer group, where EGN was refused for a "model" no
    command line can give (it built before --optimizer moved to the parser); the parser still pickles
    (Lightning pickles it with the trainer under ddp_spawn). Linking to or setting --optimizer in
    add_arguments_to_parser works once the subclass adds the group."""
    monkeypatch.chdir(tmp_path)
    egn = SOAALightningCLI(parser_class=_OwnParser,
                           args=[*BASE, "--optimizer", "lightning_soaa.EGN", "--optimizer.loss", "mse"])
    assert type(egn.trainer.optimizers[0]) is registry.get("EGN").load() and egn.trainer.global_step == 3
    assert type(egn._parser("fit")) is _OwnParser
    assert type(pickle.loads(pickle.dumps(egn.parser))) is _OwnParser
    linked = _LinkedOptimizerCLI(args=BASE)
    assert type(linked.trainer.optimizers[0]) is registry.get("SOAA").load()
    assert linked.trainer.optimizers[0].param_groups[0]["lr"] == 0.02
    assert linked.config.fit.optimizer.init_args.total_steps == 3


def test_cli_without_auto_configure_optimizers_has_no_optimizer_option(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``auto_configure_optimizers=False`` (as the stock CLI: no --optimizer, no --lr_scheduler): our CLI still
    offered --optimizer, and a given one was ignored, the model's own optimizer training instead."""
    monkeypatch.chdir(tmp_path)
    args = [a if a != "tests.lightning.helpers.PlainRegressor" else "tests.lightning.test_cli._OwnOptimizer"
            for a in BASE]
    with pytest.raises(SystemExit) as exc:
        SOAALightningCLI(args=[*args, "--optimizer", "lightning_soaa.SOAA"], auto_configure_optimizers=False)
    assert exc.value.code != 0
    assert "optimizer" in capsys.readouterr().err
    cli = SOAALightningCLI(args=args, auto_configure_optimizers=False)
    assert cli.trainer.global_step == 3


class _HalvedBatch(BatchToOptimizer):
    """A user's subclass: hands EGN the batch as the training_step would transform it."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        super().on_train_batch_start(trainer, pl_module, (x * 0.5, y), batch_idx)


def test_cli_keeps_a_users_subclass_of_a_default_callback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A default BatchToOptimizer added after the user's subclass overwrote the batch it had set (EGN
    stepped on the untransformed batch: 6.8e-2 off in 4 steps, silently)."""
    monkeypatch.chdir(tmp_path)
    cli = SOAALightningCLI(args=[*BASE, "--optimizer", "lightning_soaa.AdamW",
                                 "--trainer.callbacks+=tests.lightning.test_cli._HalvedBatch"])
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert _HalvedBatch in kinds and BatchToOptimizer not in kinds, kinds
    assert LossToOptimizer in kinds and OptimizerDiagnostics in kinds


@pytest.mark.parametrize(("extra", "expected"), [([], 3), (["--optimizer.total_steps", "50"], 50)])
def test_cli_fills_soaa_horizon_from_the_trainer(extra: list[str], expected: int, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """SOAA's total_steps (the registry's horizon_kwarg) = trainer.estimated_stepping_batches (max_steps 3)
    unless given."""
    pytest.importorskip("lightning_soaa.optim.soaa")
    assert registry.get("SOAA").horizon_kwarg == "total_steps"
    monkeypatch.chdir(tmp_path)
    cli = SOAALightningCLI(args=[*BASE, "--optimizer", "lightning_soaa.SOAA", "--optimizer.lr", "0.01", *extra])
    assert cli.trainer.optimizers[0].config.total_steps == expected


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("lightning-soaa")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lightning_soaa.lightning.cli"]


def test_console_script_fits_from_config_on_two_processes(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK")}
    cmd = [*_console_script(), "fit", "--config", str(REPO / "configs" / "digits_soaa.yaml"),
           "--trainer.max_steps", "12", "--trainer.val_check_interval", "6",
           "--trainer.log_every_n_steps", "2",
           "--trainer.enable_progress_bar", "false",
           "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    # strategy="ddp" re-launches the command for rank 1: fine in a subprocess, never inside pytest itself.
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = next((tmp_path / "logs" / "digits_soaa").glob("version_*/metrics.csv"))
    with open(metrics, newline="") as f:
        rows = list(csv.DictReader(f))
    world = [float(r["SOAA/world_size"]) for r in rows if r.get("SOAA/world_size")]
    assert world == [2.0], "the optimizer must be sharded across the 2 DDP processes (logged once)"
    assert all(float(r["SOAA/comm_bytes"]) > 0 for r in rows if r.get("SOAA/comm_bytes"))
    steps = [float(r["SOAA/steps"]) for r in rows if r.get("SOAA/steps")]
    assert steps and steps[-1] == 12.0
    assert any(r.get("val_loss") for r in rows)


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every configs/*.yaml names importable classes and valid arguments (parsed, not run)."""
    import yaml

    assert config.read_text().splitlines()[0] == f"# lightning-soaa fit --config configs/{config.name}"
    class_path = yaml.safe_load(config.read_text())["optimizer"]["class_path"]
    assert registry.lookup(class_path) is not None, f"{config.name} names {class_path}, not in the registry"
    with pytest.raises(SystemExit) as exc:
        SOAALightningCLI(args=["fit", "--config", str(config), "--print_config"])
    assert exc.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "optimizer:" in printed and "class_path: lightning_soaa." in printed


class _Validated(TinyRegressor):
    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self(batch[0]), batch[1])

    def val_dataloader(self) -> Any:
        return self.train_dataloader()


def test_optimizer_state_check_reads_only_this_fits_checkpoint_and_optimizers(tmp_path: Path) -> None:
    """On a Trainer whose earlier fit used a torch optimizer, a validate from our checkpoint (it loads no
    optimizer state) and a fit resuming our checkpoint with ours are not refused (the check read the
    earlier fit's optimizers before setup, found by the reviewer)."""
    from lightning_soaa.lightning import OptimizerFactory, OptimizerStateCheck
    from tests.lightning.helpers import make_trainer

    ours = OptimizerFactory("lightning_soaa.AdamW", {"lr": 0.02})
    first = make_trainer(tmp_path / "a", max_steps=3, enable_checkpointing=True)
    first.fit(_Validated(ours))
    ckpt = str(next((tmp_path / "a").rglob("*.ckpt")))
    trainer = make_trainer(tmp_path / "b", max_steps=2, callbacks=[OptimizerStateCheck()])
    trainer.fit(_Validated(OptimizerFactory("torch.optim.SGD", {"lr": 0.02})))
    trainer.validate(_Validated(ours), ckpt_path=ckpt, verbose=False)
    trainer.fit_loop.epoch_loop.max_steps = 5
    trainer.fit(_Validated(ours), ckpt_path=ckpt)
    assert trainer.global_step == 5 and trainer.optimizers[0].statistics()["steps"] == 5.0
