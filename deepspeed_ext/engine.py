"""``deepspeed_ext.initialize``: ``deepspeed.initialize`` with one of our optimizers as client optimizer."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from typing import Any

import torch

from deepspeed_ext.client import DeepSpeedClientOptimizer
from deepspeed_ext.ds_config import ParsedConfig, parse_config
from deepspeed_ext.egn_client import DeepSpeedEGNOptimizer

#: the client optimizers deepspeed_ext builds
CLIENT_TYPES = (DeepSpeedClientOptimizer, DeepSpeedEGNOptimizer)

__all__ = ["initialize", "bind", "build_client_optimizer", "find_client_optimizer", "init_distributed"]

log = logging.getLogger(__name__)


def init_distributed(dist_backend: str | None = None) -> None:
    """Initialize DeepSpeed's communication backend, reusing torch's default group when it exists."""
    import deepspeed
    import torch.distributed as dist

    from deepspeed_ext.compat import maybe_skip_shm_comm_op

    maybe_skip_shm_comm_op()
    if dist.is_available() and dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    else:
        deepspeed.init_distributed(dist_backend=dist_backend)


def _named_trainable(model: torch.nn.Module,
                     model_parameters: Iterable[Any] | None) -> tuple[list[Any], dict[int, str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    if model_parameters is None:
        return [p for p in model.parameters() if p.requires_grad], names
    items = list(model_parameters)
    out: list[Any] = []
    for it in items:
        if isinstance(it, tuple) and len(it) == 2 and isinstance(it[0], str):
            names[id(it[1])] = it[0]
            out.append(it[1])
        elif isinstance(it, dict):
            g = dict(it)
            ps = list(g["params"])
            if ps and isinstance(ps[0], tuple):
                for n, p in ps:
                    names[id(p)] = n
                ps = [p for _, p in ps]
            g["params"] = ps
            g.pop("param_names", None)
            out.append(g)
        else:
            out.append(it)
    return out, names


def build_client_optimizer(
    model: torch.nn.Module,
    parsed: ParsedConfig,
    *,
    model_parameters: Iterable[Any] | None = None,
    process_group: Any = None,
) -> DeepSpeedClientOptimizer | DeepSpeedEGNOptimizer:
    """Our optimizer for ``parsed`` (from :func:`~deepspeed_ext.ds_config.parse_config`), ready to pass
    to ``deepspeed.initialize(optimizer=...)``. Validates the hyperparameters immediately."""
    if parsed.entry is None:
        raise ValueError(
            "the config does not name a lightning_soaa optimizer (optimizer.type='lightning_soaa.X')")
    if parsed.entry.layout == "model":
        if model_parameters is not None:
            raise ValueError(f"{parsed.entry.name} optimizes all trainable parameters of the model; "
                             "model_parameters must be None")
        return DeepSpeedEGNOptimizer(model, parsed.entry.load(), parsed.optimizer_params,
                                     process_group=process_group)
    params, names = _named_trainable(model, model_parameters)
    layout = parsed.entry.layout
    return DeepSpeedClientOptimizer(
        params, parsed.entry.load(), parsed.optimizer_params, zero_stage=parsed.zero_stage, layout=layout,
        process_group=process_group, param_names=names,
    )


def find_client_optimizer(obj: Any) -> Any:
    """Unwrap an engine / ZeRO wrapper / LightningOptimizer chain down to our client optimizer
    (:class:`DeepSpeedClientOptimizer` or :class:`DeepSpeedEGNOptimizer`); ``None`` if there is none."""
    seen = 0
    while obj is not None and seen < 8:
        if isinstance(obj, CLIENT_TYPES):
            return obj
        obj = getattr(obj, "optimizer", None) if not hasattr(obj, "_optimizer") else obj._optimizer
        seen += 1
    return None


def bind(engine: Any) -> Any:
    """Tell our client optimizer about the engine's ZeRO wrapper (needed for ZeRO-3 and multi-group
    steps). Returns the client optimizer, or ``None`` when the engine does not run one of ours."""
    client = find_client_optimizer(getattr(engine, "optimizer", None))
    if client is not None:
        client.bind(engine.optimizer)
    return client


def _data_parallel_group(mpu: Any) -> Any:
    if mpu is not None and hasattr(mpu, "get_data_parallel_group"):
        return mpu.get_data_parallel_group()
    return None


def _split_args(args: Any, config: Any) -> tuple[Any, Any]:
    """Take the config from ``args.deepspeed_config`` when not given, and hide it from DeepSpeed (which
    refuses a config both in ``args`` and in the call; we always pass the translated one)."""
    if args is None:
        return None, config
    from_args = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if config is None:
        config = from_args
    if from_args is not None:
        args = argparse.Namespace(**vars(args))
        for attr in ("deepspeed_config", "deepscale_config"):
            if hasattr(args, attr):
                setattr(args, attr, None)
    return args, config


def initialize(
    model: torch.nn.Module,
    config: Any = None,
    *,
    model_parameters: Iterable[Any] | None = None,
    args: Any = None,
    feed_loss: bool = True,
    **kwargs: Any,
) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` for a config whose ``optimizer.type`` may be ``"lightning_soaa.X"``.

    Args:
        model: the module.
        config: a DeepSpeed config (dict, JSON string or path); default ``args.deepspeed_config``.
        model_parameters: parameters or param groups (default: the model's trainable parameters). Names
            (``named_parameters()`` pairs) help structure-aware optimizers.
        args: passed to DeepSpeed (``argparse`` namespace; ``local_rank``/``device_rank`` used if set).
        feed_loss: when the optimizer uses the loss (SOAA), every ``engine.backward(loss)`` also hands it
            ``loss`` (the mean over gradient-accumulation micro-steps of one training step).
        kwargs: anything else ``deepspeed.initialize`` accepts (``lr_scheduler``, ``mpu``, ...).

    Returns:
        ``(engine, optimizer, training_dataloader, lr_scheduler)`` as ``deepspeed.initialize``.

    Raises:
        ValueError: unknown optimizer (the message lists the valid ones), invalid params, or a ZeRO stage
            the optimizer does not support -- all before any engine is built.
    """
    import deepspeed

    args, config = _split_args(args, config)
    if config is None:
        raise ValueError("Invalid config=None. Must be a DeepSpeed config (dict, JSON or path), directly "
                         "or as "
                         "args.deepspeed_config.")
    parsed = parse_config(config)  # validate the JSON first: nothing has started yet
    if parsed.entry is None:
        _refuse_raw_optimizer(kwargs.get("optimizer"))
        return deepspeed.initialize(model=model, config=parsed.ds_config, model_parameters=model_parameters,
                                    args=args, **kwargs)
    if kwargs.get("optimizer") is not None:
        raise ValueError("pass either optimizer= or a config naming a lightning_soaa optimizer, not both")
    kwargs.pop("optimizer", None)
    client = build_client_optimizer(model, parsed, model_parameters=model_parameters,
                                    process_group=None)  # group resolved below, after init
    init_distributed()
    client.process_group = _data_parallel_group(kwargs.get("mpu"))
    if args is None:
        # DeepSpeed reads device_rank / local_rank from args; on CPU the Lightning-style None index fails.
        import os

        args = argparse.Namespace(local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    client.suspended = True
    try:
        engine, optimizer, loader, sched = deepspeed.initialize(
            model=model, optimizer=client, config=parsed.ds_config, args=args, **kwargs
        )
    finally:
        client.suspended = False
    client.bind(engine.optimizer)
    if feed_loss:
        install_loss_feed(engine, client)
    log.info("deepspeed_ext: %s under %s (ZeRO-%d)", client.optimizer_cls.__name__,
             type(engine.optimizer).__name__, parsed.zero_stage)
    return engine, optimizer, loader, sched


def _refuse_raw_optimizer(optimizer: Any) -> None:
    """A lightning_soaa optimizer object handed to DeepSpeed as it is would be stepped over ZeRO's flat
    partitions as if they were its parameters (ASGO's matrices, SOAA's loss and every sharded state lost;
    measured 3e-2 off one process at ZeRO-2), so it must go through the config or the client wrapper."""
    from lightning_soaa.optim.base import ShardedOptimizer

    if isinstance(optimizer, ShardedOptimizer):
        name = type(optimizer).__name__
        raise ValueError(
            f"deepspeed_ext.initialize: optimizer= is a lightning_soaa {name}, which DeepSpeed would step over "
            f"its own flat partitions without the adapter. Name it in the config instead: \"optimizer\": "
            f"{{\"type\": \"lightning_soaa.{name}\", \"params\": {{...}}}} (or pass "
            "deepspeed_ext.client.DeepSpeedClientOptimizer.from_optimizer(opt, zero_stage=..., layout=...); "
            "Lightning's DeepSpeed strategy of this package wraps it for you).")


class _LossFeed:
    """Averages the losses of one training step's micro-steps and hands the mean to the optimizer."""

    def __init__(self, engine: Any, client: DeepSpeedClientOptimizer) -> None:
        self.engine, self.client = engine, client
        self.total = 0.0
        self.count = 0
        self._backward = engine.backward
        self._step = engine.step

    def backward(self, loss: Any, *a: Any, **kw: Any) -> Any:
        self.total += float(loss.detach())
        self.count += 1
        if self.engine.is_gradient_accumulation_boundary():
            self.client.set_loss(self.total / self.count)
            self.total, self.count = 0.0, 0
        return self._backward(loss, *a, **kw)


def install_loss_feed(engine: Any, client: Any) -> None:
    """Route ``engine.backward(loss)`` through :class:`_LossFeed` when the optimizer's step needs the loss
    (``StepNeeds.LOSS`` in :mod:`lightning_soaa.registry`)."""
    from lightning_soaa.registry import StepNeeds, spec_of

    spec = spec_of(client.optimizer_cls)
    if spec is None or spec.needs is not StepNeeds.LOSS:
        return
    feed = _LossFeed(engine, client)
    engine.backward = feed.backward  # instance attribute: only this engine is affected
    engine._lightning_soaa_loss_feed = feed
