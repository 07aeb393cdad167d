"""The ``lightning-soaa`` console script: a LightningCLI that knows our optimizers.

Usage::

    lightning-soaa fit --config configs/digits_soaa.yaml
    lightning-soaa fit --config configs/digits_soaa.yaml --optimizer lightning_soaa.ASGO --optimizer.lr 0.01

Differences from a stock ``LightningCLI``, each for a reason:

* ``--optimizer`` is constructed inside ``configure_optimizers`` (after ``torch.distributed`` started),
  not at parse time, so our optimizers shard across DDP ranks (see
  :mod:`lightning_soaa.lightning.factory`). EGN receives the module, ASGO/DASGO groups made from it
  (embedding tables to their AdamW part), our other optimizers ``named_parameters()``; the argument
  ``model`` of EGN is therefore not a CLI option.
* An unknown optimizer class path fails with the list of valid ones; a bad option of a known optimizer
  (``--optimizer.gama``) fails naming that option and the ones it accepts.
* Our optimizers' ``horizon_kwarg`` (SOAA's ``total_steps``) is filled from
  ``trainer.estimated_stepping_batches`` when the config leaves it out (see
  :class:`~lightning_soaa.lightning.factory.OptimizerFactory`).
* :class:`LossToOptimizer`, :class:`BatchToOptimizer` and :class:`OptimizerDiagnostics` are added to the
  trainer unless the config already has them (each does nothing for optimizers that do not need it).
* Model and data are given by class path (``model.class_path``, ``data.class_path``), e.g. the demo
  modules in :mod:`lightning_soaa.lightning.demo`.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import logging
import re
import sys
import textwrap
from typing import Any

import yaml  # type: ignore[import-untyped]  # Lightning's own dependency (PyYAML)
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.optim import Optimizer

from lightning_soaa.lightning.callbacks import BatchToOptimizer, LossToOptimizer, OptimizerDiagnostics
from lightning_soaa.lightning.factory import (
    OptimizerFactory,
    attach_optimizer,
    resolve_optimizer_class,
    valid_optimizer_names,
)
from lightning_soaa.lightning.preemption import PreemptionCheckpoint
from lightning_soaa.lightning.resume_check import OptimizerStateCheck

__all__ = ["SOAAArgumentParser", "SOAALightningCLI", "explain_optimizer_error", "main"]

log = logging.getLogger(__name__)

_AUTO_CALLBACKS = (LossToOptimizer, BatchToOptimizer, OptimizerDiagnostics, PreemptionCheckpoint,
                   OptimizerStateCheck)


def _to_dict(obj: Any) -> Any:
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    return obj


class SOAAArgumentParser(LightningArgumentParser):
    """Lightning's parser, whose optimizer groups skip the constructor arguments no command line can give (EGN's
    ``model``, which the factory passes; a communicator or process group)."""

    def add_optimizer_args(self, optimizer_class: type[Optimizer] | tuple[type[Optimizer], ...] = (Optimizer,),
                           nested_key: str = "optimizer", link_to: str = "AUTOMATIC") -> None:
        _add_optimizer_args(self, optimizer_class, nested_key, link_to)


def _add_optimizer_args(parser: LightningArgumentParser,
                        optimizer_class: type[Optimizer] | tuple[type[Optimizer], ...] = (Optimizer,),
                        nested_key: str = "optimizer", link_to: str = "AUTOMATIC") -> None:
    classes = optimizer_class if isinstance(optimizer_class, tuple) else (optimizer_class,)
    if not all(isinstance(c, type) and issubclass(c, Optimizer) for c in classes):
        raise TypeError(f"add_optimizer_args takes subclasses of torch.optim.Optimizer, got {optimizer_class!r}")
    kwargs: dict[str, Any] = {"instantiate": False, "fail_untyped": False, "skip": set(_NOT_OPTIONS)}
    if isinstance(optimizer_class, tuple):
        parser.add_subclass_arguments(optimizer_class, nested_key, required=False, **kwargs)
    else:
        parser.add_class_arguments(optimizer_class, nested_key, sub_configs=True, **kwargs)
    parser._optimizers[nested_key] = (optimizer_class, link_to)


class SOAALightningCLI(LightningCLI):
    """A ``LightningCLI`` whose ``--optimizer`` works with sharded optimizers under DDP.

    Accepts every ``LightningCLI`` argument; defaults: any LightningModule / LightningDataModule by class
    path, and configs saved with ``overwrite=True``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        # Errors are raised (not printed + exit) while parsing so that an unknown optimizer can be
        # reported with the list of valid ones; parse_arguments restores the normal CLI behaviour.
        parser_kwargs.setdefault("exit_on_error", False)
        for sub in self.subcommands():
            parser_kwargs.setdefault(sub, {}).setdefault("exit_on_error", False)
        kwargs["parser_kwargs"] = parser_kwargs
        # --optimizer is added where the stock CLI adds it (only if add_arguments_to_parser added no optimizer
        # group, and not without auto_configure_optimizers), by a parser that skips EGN's "model": added here
        # before, a subclass's own add_optimizer_args after super() failed ("Group with name optimizer already
        # exists"), and one without super() got the stock group, where EGN was refused for a missing "model"
        kwargs.setdefault("parser_class", SOAAArgumentParser)
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        if type(parser).add_optimizer_args is LightningArgumentParser.add_optimizer_args:
            # a parser_class of the user's own (not a SOAAArgumentParser) got the stock optimizer group, where
            # EGN was refused for a "model" no command line can give. Set on the instance, not by a class made
            # here: Lightning pickles the parser with the trainer under ddp_spawn; an override of the user's stays
            parser.add_optimizer_args = functools.partial(_add_optimizer_args, parser)  # type: ignore[method-assign]
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            parser.exit_on_error = True
            parser.error(explain_optimizer_error(str(err)))
        tokens = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        sub = self.config.get("subcommand")  # self.subcommand is set after this method
        node = self.config.get(sub, self.config) if sub else self.config
        carried = _carried_defaults(tokens, _to_dict(node.get("optimizer")))
        if carried:
            parser.exit_on_error = True
            parser.error(carried)

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        """Like LightningCLI's, but the optimizer is built lazily inside ``configure_optimizers``."""
        if not self.auto_configure_optimizers:
            return
        init = self._automatic(subcommand, "_optimizers")
        sched = self._automatic(subcommand, "_lr_schedulers")
        if not init:
            if sched:
                # the stock CLI drops it silently: the model's own configure_optimizers trains without it
                parser = self._parser(subcommand)
                parser.exit_on_error = True
                parser.error(_SCHEDULER_WITHOUT_OPTIMIZER.format(sched=sched["class_path"],
                                                                model=type(self.model).__name__))
            return
        if is_overridden("configure_optimizers", self.model, LightningModule):  # as the stock CLI says it
            log.warning("`%s.configure_optimizers` will be overridden by the --optimizer of %s (%s).",
                        type(self.model).__name__, type(self).__name__, init["class_path"])
        factory = OptimizerFactory(init["class_path"], dict(init.get("init_args") or {}), lr_scheduler=sched)
        attach_optimizer(self.model, factory)

    def _automatic(self, subcommand: str | None, kind: str) -> dict[str, Any] | None:
        """The optimizer (``kind="_optimizers"``) or scheduler (``"_lr_schedulers"``) this CLI builds,
        ``{"class_path", "init_args"}``, or None: an ``"AUTOMATIC"`` group only, as the stock CLI (one a
        subclass adds with ``link_to="model...."`` is the model's; read as ours it failed for a missing
        class_path, or was built a second time), its class filled in where the group was added for a single
        class (its value is then the init args alone)."""
        parser = self._parser(subcommand)
        registered = getattr(parser, kind)
        keys = [k for k, (_, link) in registered.items() if link == "AUTOMATIC"]
        if len(keys) > 1:  # the stock CLI refuses it too; reading the first would ignore the others' values
            parser.exit_on_error = True
            parser.error(f"{type(self).__name__} builds one optimizer and one scheduler, but {', '.join(keys)} "
                         "are all automatic groups. Give each extra group link_to='model.<argument>' and build "
                         "it in configure_optimizers.")
        value = self._get(self.config_init, keys[0]) if keys else None
        if not value:
            return None
        value = _to_dict(value)
        cls = registered[keys[0]][0]
        if not isinstance(cls, tuple) and "class_path" not in value:
            value = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": value}
        return dict(value)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Trainer.callbacks is set by Lightning's callback connector and not declared on the class.
        callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]
        # a subclass counts (a user's BatchToOptimizer that hands over a transformed batch): a default one
        # added after it would overwrite what it set
        missing = [cls() for cls in _AUTO_CALLBACKS if not any(isinstance(c, cls) for c in callbacks)]
        # Keep checkpoint callbacks last, as Lightning orders them.
        at = next((i for i, c in enumerate(callbacks) if isinstance(c, Checkpoint)), len(callbacks))
        callbacks[at:at] = missing
        return trainer


# The class path's problem runs to the next item of the same list (the Union's "Expected a NoneType"), not
# to the first such line: an option that also takes None (``total_steps: int | None``) has its own, nested
# deeper, and cutting there dropped the value the user gave.
_SCHEDULER_WITHOUT_OPTIMIZER = (
    "--lr_scheduler {sched} was given without --optimizer: the CLI builds a scheduler only around the "
    "optimizer it builds from --optimizer, and {model}.configure_optimizers would train without it. Give "
    "--optimizer <class path> too (it replaces configure_optimizers), or create the scheduler in "
    "configure_optimizers (e.g. from a LRSchedulerCallable argument of the model, --model.<name>).")

_CLASS_PATH_PROBLEM = re.compile(
    r"^([ \t]*)- Problem with given class_path '([^']+)':\n(.*?)(?=^\1- |\Z)", re.S | re.M)


def explain_optimizer_error(msg: str) -> str:
    """The parser's error, said about the right thing.

    jsonargparse reports every problem under ``--optimizer`` as "does not validate against any of the
    Union subtypes". When the class path names a real optimizer, the problem is one of its options (a typo
    such as ``--optimizer.gama``, a bad value): say that, with the options it accepts, and nothing about
    unknown optimizers. When the class does not resolve, list the valid optimizers. Other errors pass
    through unchanged.
    """
    if not msg.startswith('Parser key "optimizer"'):
        return msg
    found = _CLASS_PATH_PROBLEM.search(msg)
    if found is None:
        return f"{msg}\nUnknown or invalid optimizer. Valid optimizers: {valid_optimizer_names()}."
    class_path, detail = found.group(2), textwrap.dedent(found.group(3)).strip()
    beside = _options_beside_class_path(msg, detail)
    if beside:
        return beside
    try:
        cls = resolve_optimizer_class(class_path)
        if "has no attribute" in detail or "No module named" in detail:
            # the class path itself did not import (our registry's lookup ignores case, the import does not)
            raise ValueError(class_path)
    except ValueError:
        return (f"Unknown optimizer {class_path!r} ({detail}). "
                f"Valid optimizers: {valid_optimizer_names()}.")
    accepted = [n for n, prm in inspect.signature(cls.__init__).parameters.items()
                if n not in _NOT_OPTIONS and prm.kind not in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD)]
    return (f"Invalid option for --optimizer {class_path}: {detail}\n"
            f"{class_path} accepts: {', '.join('--optimizer.' + n for n in accepted)}.")


_GIVEN_VALUE = re.compile(r"^  Given value: (.*)\Z", re.M | re.S)


def _options_beside_class_path(msg: str, detail: str) -> str:
    """The message for a config whose options sit beside ``class_path`` instead of under ``init_args``
    (``optimizer: {class_path: lightning_soaa.SOAA, lr: 0.03}``), else "". jsonargparse then tries the base
    class and says "Option 'class_path' is not accepted" of ``torch.optim.Optimizer``, which the user never
    wrote."""
    given = _GIVEN_VALUE.search(msg)
    if "Option 'class_path' is not accepted" not in detail or given is None:
        return ""
    try:
        value = ast.literal_eval(given.group(1).strip())
    except (ValueError, SyntaxError):
        return ""
    if not isinstance(value, dict) or "class_path" not in value:
        return ""
    options = {k: v for k, v in value.items() if k not in ("class_path", "init_args", "dict_kwargs")}
    if not options:
        return ""
    lines = "\n".join(f"      {k}: {v!r}" for k, v in options.items())
    return (f"Invalid --optimizer config: option(s) {', '.join(options)} sit beside class_path; an optimizer's "
            f"options go under init_args:\n  optimizer:\n    class_path: {value['class_path']}\n    init_args:\n"
            f"{lines}")


def _flag_values(tokens: list[str], flag: str) -> list[str]:
    """The values of ``flag`` in a command line (``--flag v`` or ``--flag=v``), in order."""
    out = []
    for i, tok in enumerate(tokens):
        if tok == flag and i + 1 < len(tokens):
            out.append(tokens[i + 1])
        elif tok.startswith(flag + "="):
            out.append(tok[len(flag) + 1:])
    return out


def _plain(v: Any) -> Any:
    """YAML's lists and the parser's tuples compare alike."""
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _defaults(cls: type) -> dict[str, Any]:
    return {n: prm.default for n, prm in inspect.signature(cls).parameters.items()
            if prm.default is not inspect.Parameter.empty}


def _config_optimizer(tokens: list[str]) -> Any:
    """The ``optimizer`` entry of the last ``--config`` file that has one (None if none can be read)."""
    found = None
    for path in _flag_values(tokens, "--config"):
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            return None
        if isinstance(data, dict) and data.get("optimizer") is not None:
            found = data["optimizer"]
    return found


def _carried_defaults(tokens: list[str], final: Any) -> str:
    """The error for ``--optimizer B`` given over a config whose optimizer is another class A, when the
    config spells out A's defaults (a ``--print_config`` output, Lightning's saved config.yaml): jsonargparse
    keeps every option B also takes, so B silently trained with A's ``betas``/``eps``/``weight_decay``
    (ASGO got SOAA's (0.9, 0.999), 1e-8 and 0.0). Options given on the command line, values A's defaults
    do not explain (a chosen lr) and values equal to B's defaults pass. ``""`` when nothing is carried."""
    chosen = [v for v in _flag_values(tokens, "--optimizer") if not v.lstrip().startswith(("{", "["))]
    old = _config_optimizer(tokens)
    if not chosen or not isinstance(final, dict) or not isinstance(old, dict):
        return ""
    try:
        old_cls, new_cls = resolve_optimizer_class(old["class_path"]), resolve_optimizer_class(final["class_path"])
    except (KeyError, ValueError):
        return ""
    if old_cls is new_cls:
        return ""
    explicit = {t.split("=")[0].removeprefix("--optimizer.").removeprefix("init_args.")
                for t in tokens if t.startswith("--optimizer.")}
    old_init, new_init = dict(old.get("init_args") or {}), dict(final.get("init_args") or {})
    old_def, new_def = _defaults(old_cls), _defaults(new_cls)
    carried = {k: v for k, v in new_init.items()
               if k in old_init and k not in explicit and _plain(old_init[k]) == _plain(v)
               and k in old_def and _plain(old_def[k]) == _plain(v) and _plain(new_def.get(k)) != _plain(v)}
    if not carried:
        return ""
    given = ", ".join(f"{k}={v!r}" for k, v in carried.items())
    theirs = ", ".join(f"{k}={new_def.get(k)!r}" for k in carried)
    return (f"--optimizer {final['class_path']} over a config whose optimizer is {old['class_path']}: the config's "
            f"{given} (the defaults of {old_cls.__name__}) would be carried over to {new_cls.__name__} "
            f"(jsonargparse keeps the options the new class also takes), whose defaults are {theirs}. Remove them "
            "from the config's optimizer init_args, or give them on the command line (--optimizer.NAME VALUE) "
            "to keep them.")


# constructor arguments that are not CLI options (the factory passes the first; a process group or a
# communicator is an object no command line can give)
_NOT_OPTIONS = ("self", "params", "model", "comm", "process_group")


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-soaa`` console script."""
    SOAALightningCLI(args=args)


if __name__ == "__main__":
    main()
