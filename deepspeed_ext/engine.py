"""``deepspeed_ext.initialize``: ``deepspeed.initialize`` with one of our optimizers as client optimizer."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from deepspeed_ext.client import (
    DeepSpeedClientOptimizer,
    OptimizerSwitchError,
    StateLayoutError,
    real_groups,
    switch_message,
    writer_of,
)
from deepspeed_ext.ds_config import (
    ParsedConfig,
    bf16_enabled,
    check_entry,
    parse_config,
    patch_for_client,
    read_bool,
    zero_stage_of,
)
from deepspeed_ext.egn_client import DeepSpeedEGNOptimizer
from deepspeed_ext.load_route import agreed_tag, load_zero3_weights, zero3_weights_only

#: the client optimizers deepspeed_ext builds
CLIENT_TYPES = (DeepSpeedClientOptimizer, DeepSpeedEGNOptimizer)
# client_state key of the ZeRO-0 torch_autocast float16 GradScaler's state (see _with_grad_scaler_state)
GRAD_SCALER_KEY = "lightning_soaa_torch_autocast_grad_scaler"

__all__ = ["initialize", "bind", "build_client_optimizer", "check_client", "find_client_optimizer",
           "init_distributed"]

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


def _named_trainable(model: torch.nn.Module, model_parameters: Iterable[Any]) -> tuple[list[Any], dict[int, str]]:
    """``model_parameters`` (tensors, pairs or groups) as tensors or groups of tensors, and every name."""
    names = {id(p): n for n, p in model.named_parameters()}
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
    if model_parameters is None:  # the model alone: ASGO/DASGO's groups from the module (registry)
        model_parameters = parsed.entry.spec.first_argument(model)
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
    """Tell our client optimizer about the engine (its ZeRO wrapper, needed for ZeRO-3 and multi-group
    steps; its gradient accumulation, needed by EGN) and make ``engine.save_checkpoint`` consolidate a
    stage-0 state first. Returns the client optimizer, or ``None`` when the engine does not run one of ours."""
    client = find_client_optimizer(getattr(engine, "optimizer", None))
    if client is not None:
        client.bind(engine)
        install_checkpoint_hooks(engine, client)
    return client


def entry_of_client(client: Any) -> Any:
    """The registry entry (:class:`~deepspeed_ext.registry.OptimizerEntry`) of a client optimizer's class."""
    from deepspeed_ext.registry import lookup
    from lightning_soaa.registry import qualified_names, spec_of

    spec = spec_of(client.optimizer_cls)
    if spec is None:
        raise ValueError(f"{client.optimizer_cls.__name__} is not a lightning_soaa optimizer that DeepSpeed "
                         f"supports; supported: {', '.join(qualified_names())}")
    return lookup(spec.qualified_name)


def check_client(client: Any, ds_config: dict[str, Any], model: torch.nn.Module | None = None) -> Any:
    """Check a client optimizer against the config DeepSpeed will get, as the JSON route checks its
    optimizer block (stage, precision, accumulation, offload), plus what only a built client can get wrong:
    its ``zero_stage``, its layout, and (EGN) its module. Returns the registry entry."""
    entry = entry_of_client(client)
    stage = zero_stage_of(ds_config)
    check_entry(ds_config, entry, stage)
    if client.zero_stage != stage:
        raise ValueError(
            f"Invalid {type(client).__name__}(zero_stage={client.zero_stage}) with "
            f"zero_optimization.stage={stage} in the DeepSpeed config: the client optimizer must be built for "
            f"the stage the engine runs (zero_stage={stage}), since it reads ZeRO's partitions accordingly.")
    if client.layout != entry.layout:
        raise ValueError(
            f"Invalid {type(client).__name__}(layout={client.layout!r}) for {entry.name}. Must be "
            f"{entry.layout!r} (how {entry.spec.name} sees a ZeRO partition).")
    if model is not None and getattr(client, "model", model) is not model:
        raise ValueError(f"{type(client).__name__} was built over another module than the model passed to "
                         "deepspeed_ext.initialize; build it over that model.")
    return entry


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
        model_parameters: parameters or param groups, used as given. Default: what the registry builds
            from the model (:meth:`~lightning_soaa.registry.OptimizerSpec.first_argument`): its trainable
            ``named_parameters()``, for ASGO/DASGO with the embedding tables in a ``use_asgo=False`` group.
            Names (``named_parameters()`` pairs) help structure-aware optimizers.
        args: passed to DeepSpeed (``argparse`` namespace; ``local_rank``/``device_rank`` used if set).
        feed_loss: when the optimizer uses the loss (SOAA), every ``engine.backward(loss)`` also hands it
            ``loss`` (the mean over gradient-accumulation micro-steps of one training step).
        kwargs: anything else ``deepspeed.initialize`` accepts (``lr_scheduler``, ``mpu``, ...).
            ``optimizer=`` may be one of our client optimizers built in code
            (``DeepSpeedClientOptimizer.from_optimizer(...)``,
            :class:`~deepspeed_ext.egn_client.DeepSpeedEGNOptimizer`) with a config without an optimizer
            block: it is checked and run exactly as one named in the JSON (its ``zero_stage`` must be the
            config's).

    Returns:
        ``(engine, optimizer, training_dataloader, lr_scheduler)`` as ``deepspeed.initialize``.

    Raises:
        ValueError: unknown optimizer (the message lists the valid ones), invalid params, a ZeRO stage or
            precision the optimizer does not support, or a client optimizer built for another stage -- all
            before any engine is built.
    """
    import deepspeed

    args, config = _split_args(args, config)
    if config is None:
        raise ValueError("Invalid config=None. Must be a DeepSpeed config (dict, JSON or path), directly "
                         "or as "
                         "args.deepspeed_config.")
    parsed = parse_config(config)  # validate the JSON first: nothing has started yet
    optimizer = kwargs.pop("optimizer", None)
    if parsed.entry is None and not isinstance(optimizer, CLIENT_TYPES):
        _refuse_raw_optimizer(optimizer)
        out = deepspeed.initialize(model=model, config=parsed.ds_config, model_parameters=model_parameters,
                                   args=args, optimizer=optimizer, **kwargs)
        install_foreign_load_check(out[0])  # refuses our optimizers' checkpoints, which it cannot continue
        return out
    if parsed.entry is not None:
        if optimizer is not None:
            raise ValueError("pass either optimizer= or a config naming a lightning_soaa optimizer, not both")
        client = build_client_optimizer(model, parsed, model_parameters=model_parameters,
                                        process_group=None)  # group resolved below, after init
        client.process_group = _data_parallel_group(kwargs.get("mpu"))
    else:
        client = optimizer
        parsed = _adopt_client(client, parsed, model)
        if client.process_group is None:
            client.process_group = _data_parallel_group(kwargs.get("mpu"))
    return _initialize_with_client(model, client, parsed, args, feed_loss, kwargs)


def _adopt_client(client: Any, parsed: ParsedConfig, model: torch.nn.Module) -> ParsedConfig:
    """A client optimizer passed in code (``optimizer=DeepSpeedClientOptimizer.from_optimizer(...)``) gets
    what the JSON route gives its own: the same checks on the config, the same flags for DeepSpeed. Before,
    it skipped them all (stage-0 bf16 took DeepSpeed's zero-gradient init step, 1.6e-2 off; stage-0 fp16
    was accepted, 1.5e-2 off; EGN at ZeRO-2 counted steps while the model did not move)."""
    if "optimizer" in parsed.ds_config:
        raise ValueError("pass either optimizer= or a config with an optimizer block, not both")
    ds = parsed.ds_config  # parse_config's own copy
    entry = check_client(client, ds, model)
    patch_for_client(ds, entry, parsed.zero_stage)
    return ParsedConfig(ds_config=ds, entry=entry, optimizer_params=dict(client.hyperparams),
                        zero_stage=parsed.zero_stage)


def _initialize_with_client(model: torch.nn.Module, client: Any, parsed: ParsedConfig, args: Any,
                            feed_loss: bool, kwargs: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` with ``client`` as the client optimizer: its init-time step ignored, then
    bound to the engine, with the loss feed when asked for."""
    import deepspeed

    init_distributed()
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
    bind(engine)
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
            # replaces a loss an overflow-skipped step left pending (DeepSpeed fp16 skips without stepping us)
            self.client.set_loss(self.total / self.count, replace=True)
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


def install_checkpoint_hooks(engine: Any, client: Any) -> None:
    """Wrap ``engine.save_checkpoint`` / ``load_checkpoint`` (instance attributes: only this engine).

    * save: consolidate the client's stage-0 state on every rank first. DeepSpeed requires
      ``save_checkpoint`` on every rank, so the collective is safe there; the client's ``state_dict()``
      itself no longer consolidates (a rank-0-only call entered the collective alone and hung) but raises
      unless a consolidation ran since the last step.
      It also records the engine's global step in the client's ZeRO optimizer files, beside its own steps.
    * load: refuse optimizer state written under another ZeRO stage, naming both, before DeepSpeed reads
      it (2 -> 0 said "not a lightning_soaa DeepSpeed optimizer state", 3 -> x a bare AssertionError,
      0 -> 1/2 a FileNotFoundError); refuse, on every rank, a file some rank cannot read (truncated) and files
      that mix two saves of one tag (:func:`check_saved_steps`). First of all, refuse optimizer state another
      optimizer wrote (:func:`check_saved_optimizer`), which the later checks would name as something else.
    """
    if getattr(engine, "_lightning_soaa_checkpoint_hooks", False):
        return
    save, load = engine.save_checkpoint, engine.load_checkpoint

    def save_checkpoint(*args: Any, **kwargs: Any) -> Any:
        import inspect

        client.consolidate_state_dict(to=None)  # every rank: DeepSpeed reads the state on every rank
        given = inspect.signature(save).bind(*args, **kwargs).arguments
        decoupled = getattr(getattr(engine, "checkpoint_engine", None), "is_decoupled", lambda: False)()
        if hasattr(client, "saving_at_global_step"):  # beside the optimizer's steps in its ZeRO files
            client.saving_at_global_step = _global_steps_written(engine, given.get("client_state"))
        given = _with_grad_scaler_state(engine, given)
        try:
            if not given.get("save_latest", True) or decoupled:
                return save(**given)
            tag = str(given["tag"]) if given.get("tag") is not None else f"global_step{engine.global_steps}"
            out = save(**{**given, "save_latest": False})
        finally:
            if hasattr(client, "saving_at_global_step"):
                client.saving_at_global_step = None
        agreed_checks(lambda: _write_latest(str(given["save_dir"]), tag, engine.global_rank),
                      peer_failed="could not point 'latest' at the checkpoint just saved (its files are complete)")
        return out

    def load_checkpoint(*args: Any, **kwargs: Any) -> Any:
        given = _given_with_agreed_tag(engine, load, args, kwargs)
        if zero3_weights_only(engine, given):
            return load_zero3_weights(engine, load, given)
        load_dir, tag, rank = given["load_dir"], given.get("tag"), int(engine.global_rank)
        if given.get("load_optimizer_states", True) and not given.get("load_module_only", False):
            def checks() -> SavedSteps | None:
                check_saved_optimizer(engine_saved_optimizer(engine, load_dir, tag), client.optimizer_cls.__name__,
                                      load_dir, tag, zero3=bool(engine.zero_optimization_partition_weights()))
                check_checkpoint_stage(load_dir, tag, engine.zero_optimization_stage(),
                                       bool(getattr(engine.optimizer, "round_robin_gradients", False)), rank=rank)
                check_checkpoint_precision(load_dir, tag, engine.zero_optimization_stage(),
                                           bool(engine.bfloat16_enabled()), rank=rank)
                check_checkpoint_groups(load_dir, tag, client, bool(engine.bfloat16_enabled()), rank=rank)
                return _own_saved_steps(engine, client, load_dir, tag)
            check_saved_steps(agreed_checks(checks), load_dir, tag)
        return _restore_grad_scaler(engine, given, load(**given))

    engine.save_checkpoint = save_checkpoint
    engine.load_checkpoint = load_checkpoint
    engine._lightning_soaa_checkpoint_hooks = True


def _with_grad_scaler_state(engine: Any, given: dict[str, Any]) -> dict[str, Any]:
    """``save_checkpoint``'s arguments with the loss scale of DeepSpeed's ZeRO-0 ``torch_autocast`` float16
    GradScaler in its ``client_state``. DeepSpeed saves the fp16 loss scaler of its own wrappers with the
    optimizer state but not this one: a resume started again from the initial scale (65536), so a batch the
    saved scale (lowered by an overflow-skipped step) had stepped on overflowed and was skipped."""
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    if scaler is None or not scaler.is_enabled():
        return given
    return {**given, "client_state": {**(given.get("client_state") or {}), GRAD_SCALER_KEY: scaler.state_dict()}}


def _restore_grad_scaler(engine: Any, given: dict[str, Any], out: Any) -> Any:
    """Take the GradScaler state :func:`_with_grad_scaler_state` saved out of the ``client_state`` DeepSpeed's
    ``load_checkpoint`` returns and load it, with the optimizer state (as DeepSpeed restores its own fp16 loss
    scalers: not under ``load_optimizer_states=False`` or ``load_module_only=True``). A checkpoint without it
    (older, or saved without the scaler) leaves the engine's scaler as it is."""
    client_state = out[1] if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict) else None
    saved = None if client_state is None else client_state.pop(GRAD_SCALER_KEY, None)
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    with_optimizer = given.get("load_optimizer_states", True) and not given.get("load_module_only", False)
    if saved and scaler is not None and scaler.is_enabled() and with_optimizer:
        scaler.load_state_dict(saved)
    return out


def _given_with_agreed_tag(engine: Any, load: Callable[..., Any], args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> dict[str, Any]:
    """``load_checkpoint``'s arguments by name, its tag the one every rank loads (:func:`agreed_tag`)."""
    import inspect

    given = dict(inspect.signature(load).bind(*args, **kwargs).arguments)
    given["tag"] = agreed_tag(engine, given["load_dir"], given.get("tag"))
    return given


def _write_latest(save_dir: str, tag: str, global_rank: int) -> None:
    """On global rank 0, point ``latest`` at ``tag``, atomically, once every rank's files are written (the
    caller runs this after DeepSpeed's save returned on every rank). DeepSpeed itself writes ``latest`` on
    rank 0 before its last barrier: a rank killed while writing its optimizer file (ZeRO-1/2/3) left
    ``latest`` naming a checkpoint with a truncated file, which the next load refused on that rank only
    (found by a hunter: the previous checkpoint was fine, but ``latest`` had moved past it). The engine's
    global rank, as DeepSpeed's own write (also under node-local storage: ``latest`` on global rank 0's node)."""
    if global_rank != 0:
        return
    path = os.path.join(save_dir, "latest")
    try:
        with open(path + ".tmp", "w") as fd:
            fd.write(tag)
        os.replace(path + ".tmp", path)
    except BaseException:
        if os.path.exists(path + ".tmp"):  # no stray file beside the checkpoints
            os.remove(path + ".tmp")
        raise


def _global_steps_written(engine: Any, client_state: Any) -> int | None:
    """The ``global_steps`` DeepSpeed's save writes into the model-states file: the engine's, unless
    ``client_state`` has that key (DeepSpeed writes ``client_state`` over its own keys, and its load then
    sets the engine's step from it). None when that is not an int: the load's torn-save check is skipped."""
    if isinstance(client_state, dict) and "global_steps" in client_state:
        return _int_or_none(client_state["global_steps"])
    return _int_or_none(engine.global_steps)


_PEER_REFUSED = ("refused the checkpoint, from files this rank does not read or cannot see (that rank's own, or "
                 "rank 0's under node-local storage); nothing was loaded on any rank")


def agreed_checks(checks: Callable[[], Any], *, peer_failed: str = _PEER_REFUSED) -> list[Any]:
    """Run the checkpoint checks on this rank, then refuse on every rank when any rank refused. They read
    rank 0's files (its model states for the saved config, its optimizer file for the group count); on a
    rank that cannot see them (DeepSpeed's node-local checkpoint storage, no shared filesystem) they find
    nothing and pass, so that rank went on into DeepSpeed's load while rank 0 raised: a hang in the load's
    collectives, or a load of a state the check refuses. ``load_checkpoint`` runs on every rank (DeepSpeed
    requires it), so the all-gather here is joined by all. Returns what ``checks`` returned, by rank (the
    same list on every rank, so that a decision taken on it is taken alike); ``peer_failed`` says, on the
    other ranks, what a failing rank's error means."""
    import torch.distributed as dist

    error: Exception | None = None
    value: Any = None
    try:
        value = checks()
    except Exception as e:  # noqa: BLE001 - any refusal (or a damaged file) must reach the all-gather
        error = e
    mine = (None if error is None else f"{type(error).__name__}: {error}", value)
    said: list[Any] = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        said = [None] * dist.get_world_size()
        dist.all_gather_object(said, mine)
        other = next(((r, m) for r, (m, _) in enumerate(said) if m is not None), None)
        if error is None and other is not None:
            raise StateLayoutError(f"Rank {other[0]} {peer_failed}: {other[1]}")
    if error is not None:
        raise error
    return [v for _, v in said]


class UnreadableCheckpointError(StateLayoutError):
    """A checkpoint file that exists but cannot be read: truncated (a save killed while it wrote the file) or
    otherwise damaged."""


def _read_checkpoint_file(path: str, rank: int, what: str) -> Any:
    """``torch.load`` of a file of the checkpoint this rank is about to load, for the checks: mmap (the
    tensors are not read), or whole for torch's legacy format (not a zip archive; mmap cannot read it, yet
    DeepSpeed can). A file that cannot be read either way is refused naming this rank and the file: left to
    DeepSpeed, only the rank that reads it failed, after DeepSpeed had loaded the module, while the others
    went on loading (a hang in the load's collectives, or ranks at different steps)."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # noqa: BLE001 - read it whole below; only that failing refuses the file
        log.debug("deepspeed_ext: could not mmap %s; reading it whole", path, exc_info=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as e:  # a pickled class (e.g. in client_state) this process lacks
        raise UnreadableCheckpointError(
            f"Rank {rank} could not unpickle {what} {path!r} ({type(e).__name__}: {str(e)[:200]}): it holds an "
            "object of a class this process cannot import (saved through client_state, for example). Nothing was "
            "loaded. Make that class importable on every rank (the same module path as when it was saved).") from e
    except Exception as e:  # noqa: BLE001 - any other failure to read it is a damaged file here
        raise UnreadableCheckpointError(
            f"Rank {rank} could not read {what} {path!r} ({type(e).__name__}: {str(e).split('. ')[0][:200]}): it "
            "is truncated or damaged, as a save into this folder and tag leaves it when it is stopped while the "
            "file is written. Nothing was loaded. Resume from the previous checkpoint, and save each "
            "checkpoint under a tag (or folder) of its own: DeepSpeed's default tag global_step<N> is one.") from e


class SavedSteps(NamedTuple):
    """What one rank's files of a checkpoint say about the save that wrote them (None: cannot be told)."""

    training: int | None  # the client's training steps, in this rank's ZeRO optimizer file
    optimizer_global: int | None  # the engine's global step that file was saved at (files since 2026-12-05)
    model_global: int | None  # DeepSpeed's global_steps in the model-states file this rank loads
    model_file: str | None  # that file's name


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _own_model_file(engine: Any, folder: str) -> str | None:
    """The model-states file DeepSpeed loads on this rank: rank 0's at ZeRO 0-2, this rank's own at ZeRO-3."""
    import torch.distributed as dist

    try:
        mp_rank = int(engine.checkpoint_mp_rank)
        if engine.zero_optimization_partition_weights():
            dp_rank = dist.get_rank(group=engine.optimizer.dp_process_group)
            return os.path.join(folder, f"zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_model_states.pt")
    except Exception:  # noqa: BLE001 - another engine layout: leave it to DeepSpeed
        log.debug("deepspeed_ext: could not tell this rank's model-states file", exc_info=True)
        return None
    return os.path.join(folder, f"mp_rank_{mp_rank:02d}_model_states.pt")


def _own_optimizer_file(engine: Any, client: Any, folder: str) -> str | None:
    """This rank's own ZeRO-1/2/3 optimizer file of the checkpoint (under node-local storage it is on this
    rank's node); None at stage 0 (one consolidated copy, inside the model-states file) or when absent."""
    import torch.distributed as dist

    if getattr(client, "zero_stage", 0) == 0:
        return None
    try:
        dp_rank = dist.get_rank(group=engine.optimizer.dp_process_group)
        mp_rank = int(engine.checkpoint_mp_rank)
        bf16 = bool(engine.bfloat16_enabled())
    except Exception:  # noqa: BLE001 - another engine layout: leave it to DeepSpeed
        log.debug("deepspeed_ext: could not tell this rank's optimizer file", exc_info=True)
        return None
    for prefix in (("bf16_", "") if bf16 else ("", "bf16_")):  # DeepSpeed's own order of the two names
        path = os.path.join(folder, f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt")
        if os.path.isfile(path):
            return path
    return None


def _own_saved_steps(engine: Any, client: Any, load_dir: str, tag: Any) -> SavedSteps | None:
    """This rank's :class:`SavedSteps`, from the files it is about to load. A file that exists but cannot be
    read raises :class:`UnreadableCheckpointError`; a readable one in another format (an older save's, a
    foreign optimizer's) tells what it can and leaves the rest to DeepSpeed."""
    from deepspeed_ext.client import STATE_KEY

    folder = _tag_folder(load_dir, tag)
    if folder is None:
        return None
    rank = int(getattr(engine, "global_rank", 0))
    model_file, model_global = _own_model_file(engine, folder), None
    _check_own_zero3_files(engine, folder, model_file)
    if model_file is not None and os.path.isfile(model_file):
        state = _read_checkpoint_file(model_file, rank, "the model-states file it loads")
        model_global = _int_or_none(state.get("global_steps")) if isinstance(state, dict) else None
        _check_saved_dp_size(engine, state, model_file)
    training = optimizer_global = None
    path = _own_optimizer_file(engine, client, folder)
    if path is not None:
        state = _read_checkpoint_file(path, rank, "its ZeRO optimizer file")
        try:
            outer = state["optimizer_state_dict"]
            ours = outer.get("base_optimizer_state", outer.get("optimizer_state_dict"))[STATE_KEY]  # ZeRO-1/2, 3
            training, optimizer_global = _int_or_none(ours["training_steps"]), _int_or_none(ours.get("global_steps"))
        except Exception:  # noqa: BLE001 - readable, in another format: left to DeepSpeed
            log.debug("deepspeed_ext: no saved steps in %s", path, exc_info=True)
    name = None if model_file is None else os.path.basename(model_file)
    return SavedSteps(training, optimizer_global, model_global, name)


def _check_own_zero3_files(engine: Any, folder: str, model_file: str | None) -> None:
    """Refuse a ZeRO-3 checkpoint without this rank's own model-states file, which DeepSpeed's load needs on
    every rank: saved on fewer data-parallel ranks (a hunter resumed 2 -> 3: the ranks the save had raised
    DeepSpeed's clear "DP world size" error, the new rank a bare AssertionError from DeepSpeed's file list), or
    a rank whose node-local copy of the folder lacks its files (a replaced node: that rank raised the bare
    AssertionError alone while the others went on into the load's collectives). A universal checkpoint is
    read from rank 0's files on every rank (DeepSpeed's rule), so it is not judged here."""
    import glob

    if (model_file is None or os.path.isfile(model_file) or not engine.zero_optimization_partition_weights()
            or engine.load_universal_checkpoint()):
        return
    mp_rank = int(engine.checkpoint_mp_rank)
    saved = glob.glob(os.path.join(glob.escape(folder), f"zero_pp_rank_*_mp_rank_{mp_rank:02d}_model_states.pt"))
    size = _saved_dp_size(saved[0]) if saved else None
    seen = (f"it has files for {len(saved)} data-parallel rank(s)" if saved else
            "this rank sees no ZeRO-3 model-states file in it (node-local storage: this node's copy lacks them?)")
    raise StateLayoutError(
        f"The ZeRO-3 checkpoint {folder!r} has no {os.path.basename(model_file)!r}, which this rank loads: {seen}"
        + (f"; it was saved on {size} data-parallel rank(s)" if size is not None else "")
        + f", this run has {int(engine.dp_world_size)}. " + _ZERO_DP_REMEDY)


#: what a ZeRO-1/2/3 checkpoint of another data-parallel size can do
_ZERO_DP_REMEDY = (
    "ZeRO-1/2/3 state (and at ZeRO-3 the weights) is partitioned per rank and loads only at the data-parallel "
    "size it was saved at, each rank reading its own files (DeepSpeed's universal-checkpoint converter does not "
    "keep lightning_soaa's state): resume on as many ranks with every rank's files, load the module only "
    "(load_optimizer_states=False, load_lr_scheduler_states=False), or start a new run from the full weights "
    "(DeepSpeed's zero_to_fp32.py in the checkpoint folder). Nothing was loaded.")


def _saved_dp_size(path: str) -> int | None:
    """The data-parallel size DeepSpeed recorded in a model-states file (None when it cannot be told)."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # noqa: BLE001 - unreadable files are named by the steps check
        return None
    return _int_or_none(state.get("dp_world_size")) if isinstance(state, dict) else None


def _check_saved_dp_size(engine: Any, state: Any, model_file: str) -> None:
    """Refuse ZeRO-1/2/3 optimizer state saved at another data-parallel size, from the model-states file this
    rank loads, before anything is loaded. DeepSpeed refuses it too, but only after its load had set the
    engine's global_steps, skipped_steps and lr scheduler (and at ZeRO-1/2 the weights) from the checkpoint:
    a run that caught the error and trained on did so half-resumed."""
    if (not engine.zero_optimization() or engine.load_universal_checkpoint()
            or engine.zero_nvme_offload_optimizer() or not isinstance(state, dict)):
        return
    saved, mine = _int_or_none(state.get("dp_world_size")), int(engine.seq_dp_world_size)
    if saved is None or saved == mine:
        return
    raise StateLayoutError(
        f"The checkpoint's {os.path.basename(model_file)!r} was saved on {saved} data-parallel rank(s), this run has "
        f"{mine}. " + _ZERO_DP_REMEDY)


def check_saved_steps(steps: list[SavedSteps | None], load_dir: str, tag: Any) -> None:
    """Refuse a checkpoint whose files mix two saves (every rank gets the same ``steps``, so every rank
    refuses, before DeepSpeed reads anything): optimizer files of different steps, or a model-states file of
    another global step than the optimizer files."""
    check_same_saved_steps([None if s is None else s.training for s in steps], load_dir, tag)
    torn = [s for s in steps if s is not None and None not in (s.model_global, s.optimizer_global)
            and s.model_global != s.optimizer_global]
    if not torn:
        return
    first = torn[0]
    raise StateLayoutError(
        f"The checkpoint {load_dir!r} (tag {_tag_shown(load_dir, tag)}) mixes two saves: its model-states file "
        f"{first.model_file} was written at global step {first.model_global}, its ZeRO optimizer files at global step "
        f"{first.optimizer_global} (by rank: {[None if s is None else s.optimizer_global for s in steps]}). A "
        "save into this folder and tag stopped between the two (DeepSpeed writes the model states first), so "
        "loading it would pair the module of one step with the optimizer state of another. Nothing was loaded. "
        "Resume from the previous checkpoint, and save each checkpoint under a tag (or folder) of its own: "
        "DeepSpeed's default tag global_step<N> is one.")


def check_same_saved_steps(steps: list[int | None], load_dir: str, tag: Any) -> None:
    """Refuse a checkpoint whose ranks' optimizer files were written at different steps. Found by a hunter: a
    tag saved twice into one folder (Lightning's ``last.ckpt`` is, under tag ``checkpoint``) where a rank died
    before it rewrote its file kept that rank's file of the earlier save; the load passed and the first
    ``step()`` said the optimizers were at different steps, blaming a load on some ranks only."""
    known = {s for s in steps if s is not None}
    if len(known) <= 1:
        return
    raise StateLayoutError(
        f"The checkpoint {load_dir!r} (tag {_tag_shown(load_dir, tag)}) holds optimizer files written at different "
        "steps (training "
        f"steps by rank: {steps}): a save into this folder and tag was overwritten in part (a rank stopped before "
        "it rewrote its file), so the files mix two saves. Nothing was loaded. Resume from the previous "
        "checkpoint, and save each checkpoint under a tag (or folder) of its own: DeepSpeed's default tag "
        "global_step<N> is one.")


def _tag_shown(load_dir: str, tag: Any) -> str:
    """``tag`` for a message; the one ``latest`` names when it is None."""
    folder = None if tag is not None else _tag_folder(load_dir, None)
    return repr(tag) if folder is None else f"{os.path.basename(folder)!r}, which 'latest' names"


def _tag_folder(load_dir: str, tag: Any) -> str | None:
    """The folder of checkpoint ``tag`` (None: the one DeepSpeed's ``latest`` file names), or None when
    there is no ``latest`` to read."""
    import os

    if tag is None:
        latest = os.path.join(load_dir, "latest")
        if not os.path.isfile(latest):
            return None
        with open(latest) as fh:
            tag = fh.read().strip()
    return os.path.join(load_dir, str(tag))


def saved_ds_config(load_dir: str, tag: Any = None, *, zero3: bool = False) -> dict[str, Any] | None:
    """The DeepSpeed config a checkpoint was written with (DeepSpeed stores it in its model-states file);
    ``None`` when that cannot be told (then DeepSpeed's own checks apply). ``zero3``: read for a ZeRO-3 engine,
    which loads the per-rank files: a folder and tag saved again keeps the other stages' file beside them, and
    a ZeRO-3 run's own resume was refused as "written under ZeRO-2" from that stale file (a reviewer)."""
    return _saved_ds_config_at(load_dir, tag, zero3=zero3)[0]


def _saved_ds_config_at(load_dir: str, tag: Any, *, zero3: bool) -> tuple[dict[str, Any] | None, str | None]:
    """:func:`saved_ds_config` and the name of the file it was read from (rank 0's: under node-local storage on
    rank 0's node only, which a message naming it says)."""
    folder = _tag_folder(load_dir, tag)
    if folder is None:
        return None, None
    # stages 0-2 write mp_rank_00_model_states.pt; ZeRO-3 one zero_pp_rank_<r>_... file per rank
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    for name in (names[::-1] if zero3 else names):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:  # mmap: the module's tensors are not read
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
            config = state["ds_config"]
            return (config, name) if isinstance(config, dict) else (None, None)
        except Exception:  # noqa: BLE001 - an unreadable or foreign file: leave it to DeepSpeed
            log.debug("deepspeed_ext: could not read the DeepSpeed config of %s", path, exc_info=True)
            return None, None
    return None, None


def _saved_group_count(load_dir: str, tag: Any, bf16: bool = False) -> tuple[int | None, str | None]:
    """How many param groups the client optimizer had when a ZeRO-1/2/3 checkpoint was written (rank 0's
    optimizer file, read by every rank so that every rank decides alike; ``bf16_``-named first on a ``bf16``
    engine, as DeepSpeed loads them: a folder saved again keeps the other precision's files), and that file's name;
    None when that cannot be told."""
    folder = _tag_folder(load_dir, tag)
    if folder is None:
        return None, None
    names = ("bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    path = next((os.path.join(folder, n) for n in (names if bf16 else names[::-1])
                 if os.path.isfile(os.path.join(folder, n))), None)
    if path is None:
        return None, None
    try:
        outer = torch.load(path, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
        base = outer.get("base_optimizer_state", outer.get("optimizer_state_dict"))  # ZeRO-1/2, ZeRO-3
        count = len(real_groups(base["param_groups"])) if isinstance(base, dict) else None
        return count, os.path.basename(path)
    except Exception:  # noqa: BLE001 - an unreadable or foreign file: leave it to DeepSpeed
        log.debug("deepspeed_ext: could not read the param groups of %s", path, exc_info=True)
        return None, None


def check_checkpoint_groups(load_dir: str, tag: Any, client: Any, bf16: bool = False, *, rank: int = 0) -> None:
    """Refuse, before DeepSpeed reads it, ZeRO-1/2/3 optimizer state saved with another number of param groups
    (DeepSpeed said "parameter-alignment layout does not match" at ZeRO-1/2 and our layout check "resume with
    the same world size" at ZeRO-3, for a run of the same world size and config). The usual cause: a
    checkpoint from before ASGO/DASGO, built from the model alone, sent embedding tables to a group of their
    own, which this message names. ``rank``: this rank, named with the file it read (rank 0's)."""

    if getattr(client, "zero_stage", 0) == 0:
        return  # lightning_soaa's own state: its load_state_dict names the moved parameter
    (saved, file), mine = _saved_group_count(load_dir, tag, bf16), len(client._canonical_groups)
    if saved is None or saved == mine:
        return
    moved = [n for g, gn in zip(client._canonical_groups, getattr(client, "_group_names", ()))
             if g.get("use_asgo") is False for n in gn]
    why = (f" This run puts {', '.join(map(repr, moved[:3]))}{' and more' if len(moved) > 3 else ''} in a "
           "use_asgo=False group of its own (ASGO/DASGO given the model alone route embedding tables to their "
           "AdamW part since 2026-12-04); a checkpoint saved before had it in the one group, with the matrix "
           "method's state." if moved and saved < mine else "")
    raise StateLayoutError(
        f"The checkpoint {load_dir!r} (tag {tag!r}; {file}, read by rank {rank}) holds optimizer state for {saved} "
        "param group(s); this "
        f"engine's {client.optimizer_cls.__name__} has {mine}.{why} Build the optimizer with the groups the "
        "state was saved with (deepspeed_ext.initialize(model_parameters=...)), or load the module only: "
        "engine.load_checkpoint(..., load_optimizer_states=False, load_lr_scheduler_states=False).")


def saved_zero_stage(load_dir: str, tag: Any = None) -> int | None:
    """The ZeRO stage a DeepSpeed checkpoint was written under; ``None`` when that cannot be told."""
    config = saved_ds_config(load_dir, tag)
    return None if config is None else zero_stage_of(config)


def _round_robin(config: dict[str, Any]) -> bool:
    """The saved config's round_robin_gradients as DeepSpeed read it (1, "on", "yes" are true there too)."""
    zero = config.get("zero_optimization")
    return read_bool(zero.get("round_robin_gradients", False)) if isinstance(zero, dict) else False


def check_checkpoint_stage(load_dir: str, tag: Any, stage: int, round_robin: bool = False, *, rank: int = 0) -> None:
    """Refuse optimizer state written under another ZeRO stage (ZeRO-1 and -2 share their partitioning;
    there the client's own layout check speaks) or, at ZeRO-1/2, in the other order of the flat partitions:
    ``round_robin_gradients`` lays a group's parameters out in another order, so its per-partition state (and
    DeepSpeed's fp32 partitions) would land on other parameters' entries, silently. ``rank``: this rank, named
    with the file it read (rank 0's)."""
    config, file = _saved_ds_config_at(load_dir, tag, zero3=stage == 3)
    saved = None if config is None else zero_stage_of(config)
    if config is None or saved is None:
        return
    where = f"{load_dir!r} (tag {tag!r}; {file}, read by rank {rank})"
    was = _round_robin(config)
    if saved in (1, 2) and stage in (1, 2) and was != round_robin:
        raise StateLayoutError(
            f"The checkpoint {where} was written with zero_optimization.round_robin_gradients="
            f"{str(was).lower()}; this engine runs with {str(round_robin).lower()}. ZeRO-1/2 state is per "
            "partition and that option changes which entries a partition holds. Resume with "
            f"round_robin_gradients={str(was).lower()}, or load the module only: "
            "engine.load_checkpoint(..., load_optimizer_states=False, load_lr_scheduler_states=False).")
    if saved == stage or {saved, stage} <= {1, 2}:
        return
    if 3 in (saved, stage):
        module_only = ("or start from its weights only (a ZeRO-3 checkpoint's module is partitioned as well: "
                       "DeepSpeed's zero_to_fp32.py turns it into plain weights)")
    else:
        module_only = ("or load the module only: engine.load_checkpoint(..., load_optimizer_states=False, "
                       "load_lr_scheduler_states=False)")
    raise StateLayoutError(
        f"The checkpoint {where} was written under ZeRO-{saved}; this engine runs ZeRO-{stage}. "
        "Optimizer state cannot move between these stages (stage 0 keeps lightning_soaa's own, world-size "
        "independent state; ZeRO-1/2/3 DeepSpeed's per-partition files). Resume with "
        f"zero_optimization.stage={saved}, {module_only}.")


def check_checkpoint_precision(load_dir: str, tag: Any, stage: int, bf16: bool, *, rank: int = 0) -> None:
    """Refuse optimizer state written with bf16 on when this engine runs with it off, or the other way round.
    DeepSpeed keeps a bf16 run's optimizer state elsewhere: at ZeRO-1/2/3 in ``bf16_zero_pp_rank_*`` files (a
    bare FileNotFoundError on every rank), at ZeRO-0 inside its bf16 wrapper's state around ours (fp32 -> bf16
    said ``KeyError: 'dynamic_loss_scale'``, bf16 -> fp32 "not a lightning_soaa DeepSpeed optimizer state").
    fp16 and fp32 share their file names at ZeRO-1/2/3 (fp16 at ZeRO-0 is refused at initialize): left to
    DeepSpeed. ``rank``: this rank, named with the file it read (rank 0's)."""
    config, file = _saved_ds_config_at(load_dir, tag, zero3=stage == 3)
    if config is None or bf16_enabled(config) == bf16:
        return
    was = bf16_enabled(config)

    def shown(on: bool) -> str:
        return "bf16.enabled=true" if on else "bf16 off (fp32 or fp16)"

    raise StateLayoutError(
        f"The checkpoint {load_dir!r} (tag {tag!r}; {file}, read by rank {rank}) was written with {shown(was)}; "
        f"this engine runs with {shown(bf16)}. DeepSpeed keeps a bf16 run's optimizer state in other files "
        "(ZeRO-1/2/3) or inside its bf16 wrapper's state (ZeRO-0), so it cannot load across that change. Resume "
        f"with bf16.enabled={str(was).lower()}, or load the module only: engine.load_checkpoint(..., "
        "load_optimizer_states=False, load_lr_scheduler_states=False). Nothing was loaded.")


# ---------------------------------------------------------------------- which optimizer wrote a checkpoint
class SavedOptimizer(NamedTuple):
    """The optimizer state a rank found in a checkpoint: who wrote it, in which file."""

    writer: str | None  # the class name of our optimizer that wrote it; None: another optimizer's state
    file: str
    reader: int = 0  # the rank that read it (rank 0's file is on rank 0's node only under node-local storage)


def read_saved_optimizer(load_dir: str, tag: Any, *, rank: int, dp_rank: int, mp_rank: int = 0,
                         bf16: bool = False, zero3: bool = False) -> SavedOptimizer | None:
    """The optimizer state of checkpoint ``tag`` (None: the one ``latest`` names) as rank ``rank`` finds it, in the
    files DeepSpeed loads and in its order: the model-states file (ZeRO stage 0; at ZeRO-1/2 its entry is None),
    else its own ZeRO optimizer file (``dp_rank``'s) or rank 0's, ``bf16_``-named first on a ``bf16`` engine.
    A ``zero3`` engine loads other model-states files: there the stage-0 one is read last (a checkpoint of ZeRO
    0-2 is named as such). Why DeepSpeed's choice: a folder and tag saved again (Lightning's last.ckpt, tag
    "checkpoint") keeps the files of an earlier run of another precision or stage, which DeepSpeed does not
    load. None when there is none to read. A file that exists but cannot be read raises
    :class:`UnreadableCheckpointError`."""
    folder = _tag_folder(load_dir, tag)
    if folder is None:
        return None
    stage0 = [("optimizer", f"mp_rank_{mp_rank:02d}_model_states.pt", "the model-states file it loads")]
    names = [("optimizer_state_dict", f"{prefix}zero_pp_rank_{r}_mp_rank_{mp_rank:02d}_optim_states.pt",
              "its ZeRO optimizer file" if r == dp_rank else f"rank {r}'s ZeRO optimizer file")
             for prefix in (("bf16_", "") if bf16 else ("", "bf16_")) for r in dict.fromkeys((dp_rank, 0))]
    for key, name, what in (names + stage0 if zero3 else stage0 + names):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        state = _read_checkpoint_file(path, rank, what)
        inner = state.get(key) if isinstance(state, dict) else None
        if isinstance(inner, dict):
            return SavedOptimizer(writer_of(inner), name, rank)
    return None


def engine_saved_optimizer(engine: Any, load_dir: str, tag: Any) -> SavedOptimizer | None:
    """:func:`read_saved_optimizer` for this rank of ``engine``."""
    import torch.distributed as dist

    rank = int(getattr(engine, "global_rank", 0))
    try:
        dp_rank = dist.get_rank(group=engine.optimizer.dp_process_group)
    except Exception:  # noqa: BLE001 - no ZeRO wrapper (stage 0): its data-parallel rank is its rank
        dp_rank = rank
    try:
        bf16, zero3 = bool(engine.bfloat16_enabled()), bool(engine.zero_optimization_partition_weights())
    except Exception:  # noqa: BLE001 - another engine layout: DeepSpeed's fp32 file names first
        log.debug("deepspeed_ext: could not tell the engine's precision and ZeRO stage", exc_info=True)
        bf16 = zero3 = False
    mp_rank = int(getattr(engine, "checkpoint_mp_rank", 0) or 0)
    return read_saved_optimizer(load_dir, tag, rank=rank, dp_rank=dp_rank, mp_rank=mp_rank, bf16=bf16, zero3=zero3)


def check_saved_optimizer(saved: SavedOptimizer | None, mine: str | None, load_dir: str, tag: Any,
                          loading: str | None = None, *, zero3: bool = False) -> None:
    """Refuse optimizer state written by another optimizer than ``mine`` (our optimizer's class name; None: an
    optimizer that is not ours, ``loading`` its class path). Between two optimizers that are not ours, nothing
    is told. A foreign writer is named from the DeepSpeed config saved with the checkpoint when it names one
    (``zero3``: the model-states files a ZeRO-3 engine loads, see :func:`saved_ds_config`)."""
    if saved is None or saved.writer == mine or (mine is not None and saved.writer == ""):
        return  # "": ours, its name unreadable (damaged): the client's load names what is wrong
    where = f"checkpoint {load_dir!r} (tag {_tag_shown(load_dir, tag)}, {saved.file}, read by rank {saved.reader})"
    if mine is None:
        raise OptimizerSwitchError(switch_message(saved.writer, loading or "another optimizer", where=where,
                                                  ours=False) + " Nothing was loaded.")
    foreign = _saved_optimizer_type(load_dir, tag, zero3) if saved.writer is None else None
    raise OptimizerSwitchError(switch_message(saved.writer, mine, where=where, foreign=foreign)
                               + " Nothing was loaded.")


def _saved_optimizer_type(load_dir: str, tag: Any, zero3: bool) -> str | None:
    """``optimizer.type`` in the DeepSpeed config saved with a checkpoint (DeepSpeed's own optimizer that wrote
    it); None when the config names none (an optimizer object passed to DeepSpeed) or cannot be read."""
    config = saved_ds_config(load_dir, tag, zero3=zero3)
    block = config.get("optimizer") if isinstance(config, dict) else None
    kind = block.get("type") if isinstance(block, dict) else None
    return str(kind) if kind else None


def optimizer_class_path(optimizer: Any) -> str:
    """``module.Class`` of the optimizer inside DeepSpeed's wrappers (ZeRO, fp16, bf16)."""
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 4:
        optimizer, seen = optimizer.optimizer, seen + 1
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def install_foreign_load_check(engine: Any) -> None:
    """Wrap ``engine.load_checkpoint`` of an engine whose optimizer is not ours (built by
    :func:`initialize` or :class:`~deepspeed_ext.strategy.DeepSpeedStrategy`) so that, loading optimizer
    states, it refuses a checkpoint our optimizers wrote, on every rank, before DeepSpeed reads anything. Found by
    a hunter: DeepSpeed's own AdamW took SOAA's checkpoint silently (no state, step counts from 1, SOAA's lr,
    betas and weight decay)."""
    if getattr(engine, "optimizer", None) is None or getattr(engine, "_lightning_soaa_foreign_check", False):
        return
    load = engine.load_checkpoint
    loading = optimizer_class_path(engine.optimizer)

    def load_checkpoint(*args: Any, **kwargs: Any) -> Any:
        given = _given_with_agreed_tag(engine, load, args, kwargs)
        if zero3_weights_only(engine, given):
            return load_zero3_weights(engine, load, given)
        if given.get("load_optimizer_states", True) and not given.get("load_module_only", False):
            load_dir, tag = given["load_dir"], given.get("tag")
            for saved in agreed_checks(lambda: engine_saved_optimizer(engine, load_dir, tag)):
                check_saved_optimizer(saved, None, load_dir, tag, loading)
        return load(**given)

    engine.load_checkpoint = load_checkpoint
    engine._lightning_soaa_foreign_check = True
