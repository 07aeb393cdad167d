"""Lightning's ``DeepSpeedStrategy`` with lightning_soaa optimizers, on GPUs and (for tests) on CPU.

What it adds to the stock strategy:

* **Our optimizers as client optimizers.** The optimizer from ``configure_optimizers`` (or
  ``LightningCLI --optimizer``), or a ``"optimizer": {"type": "lightning_soaa.X"}`` block in the DeepSpeed
  config, becomes a :class:`~deepspeed_ext.client.DeepSpeedClientOptimizer` for the configured ZeRO stage,
  bound to the engine. Feed SOAA its loss with the ``lightning_soaa.lightning.LossToOptimizer`` callback
  (DeepSpeed passes no closure). Every client is checked against the config as Lightning formatted it
  (``precision=`` adds its block after ``__init__``), as ``deepspeed_ext.initialize`` checks the JSON.
* **CPU with gloo** (three overrides, each only taken when the accelerator is not CUDA, so GPU runs are
  the stock code path): ``setup_environment`` skips the "only supported on CUDA GPUs" check;
  ``setup_distributed`` skips ``_validate_device_index_selection`` (CPU devices have index None);
  ``deepspeed.initialize`` gets ``device_rank=local_rank`` (Lightning passes ``root_device.index``, None
  on CPU, and DeepSpeed fails on ``None >= 0``).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from deepspeed_ext.client import DeepSpeedClientOptimizer
from deepspeed_ext.ds_config import ParsedConfig, parse_config, patch_for_client, zero_stage_of
from deepspeed_ext.registry import lookup
from lightning_soaa.distributed.teardown import install_exit_drain
from lightning_soaa.lightning.mpi_guard import guard_mpi_detection
from lightning_soaa.registry import qualified_names, spec_of

__all__ = ["DeepSpeedStrategy"]

log = logging.getLogger(__name__)

# a Trainer with this strategy must not die on an installed mpi4py that cannot load libmpi
guard_mpi_detection()
# nor a gloo rank abort in interpreter teardown after the fit (lightning_soaa.distributed.teardown)
install_exit_drain()


def _is_ours(optimizer: Any) -> bool:
    from lightning_soaa.optim.base import ShardedOptimizer

    return isinstance(optimizer, (ShardedOptimizer, DeepSpeedClientOptimizer))


def _entry_for(optimizer: Any) -> Any:
    cls = optimizer.optimizer_cls if isinstance(optimizer, DeepSpeedClientOptimizer) else type(optimizer)
    spec = spec_of(cls)
    if spec is None:
        raise ValueError(f"{cls.__name__} is not a lightning_soaa optimizer that DeepSpeed supports; "
                         f"supported: {', '.join(qualified_names())}")
    return lookup(spec.qualified_name)


class DeepSpeedStrategy(_LightningDeepSpeedStrategy):
    """``lightning.pytorch.strategies.DeepSpeedStrategy`` plus lightning_soaa optimizers (and CPU/gloo).

    Takes every argument of the stock strategy, plus ``start_method`` (``"popen"``, the default, as the
    stock strategy; ``"spawn"`` to start the ranks with ``torch.multiprocessing`` -- e.g. inside pytest,
    where popen would re-run the pytest command line). A ``config`` whose ``optimizer.type`` is
    ``"lightning_soaa.X"`` is validated here, at construction (unknown optimizer, bad params or an
    unsupported stage raise ``ValueError`` before any process starts); its block is then taken out of the
    config DeepSpeed sees and the optimizer is built in ``deepspeed.initialize``.
    """

    strategy_name = "deepspeed_lightning_soaa"

    def __init__(self, *args: Any, start_method: str = "popen", **kwargs: Any) -> None:
        if start_method not in ("popen", "spawn", "fork", "forkserver"):
            raise ValueError(f"Invalid start_method={start_method!r}. Must be one of 'popen', 'spawn', "
                             "'fork', "
                             "'forkserver'.")
        super().__init__(*args, **kwargs)
        self._start_method = start_method  # DDPStrategy._configure_launcher reads it
        self._parsed: ParsedConfig | None = None
        if isinstance(self.config, dict):
            parsed = parse_config(self.config)
            if parsed.entry is not None:
                self._parsed = parsed
                self.config = parsed.ds_config

    # ------------------------------------------------------------------ CPU overrides
    def _on_cuda(self) -> bool:
        return isinstance(self.accelerator, CUDAAccelerator)

    @override
    def setup_environment(self) -> None:
        if self._on_cuda():
            super().setup_environment()
        else:
            DDPStrategy.setup_environment(self)  # skips the CUDA-only check; calls setup_distributed

    @override
    def setup_distributed(self) -> None:
        from deepspeed_ext.compat import maybe_skip_shm_comm_op

        maybe_skip_shm_comm_op()
        if self._on_cuda():
            super().setup_distributed()
            return
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    # ------------------------------------------------------------------ optimizer
    def _zero_stage(self) -> int:
        assert isinstance(self.config, dict)
        return zero_stage_of(self.config)

    def _client_for(self, model: torch.nn.Module, optimizer: Any) -> DeepSpeedClientOptimizer | None:
        stage = self._zero_stage()
        names = {id(p): n for n, p in model.named_parameters()}
        if self._parsed is not None:
            if optimizer is not None and _is_ours(optimizer):
                raise ValueError("the DeepSpeed config names a lightning_soaa optimizer and "
                                 "configure_optimizers "
                                 "returned one too; use one of them")
            from deepspeed_ext.engine import build_client_optimizer

            if self._parsed.entry is not None and self._parsed.entry.layout == "model":
                raise ValueError(f"{self._parsed.entry.name} under Lightning's DeepSpeed strategy is not "
                                 "supported; use strategy='ddp' with the BatchToOptimizer callback.")
            return build_client_optimizer(model, self._parsed)  # type: ignore[return-value]
        if optimizer is None or not _is_ours(optimizer):
            return None
        entry = _entry_for(optimizer)
        if entry.layout == "model":
            raise ValueError(
                f"{entry.name} under Lightning's DeepSpeed strategy is not supported (EGN differentiates the "
                "module itself and needs its batch every step). Use strategy='ddp' with the BatchToOptimizer "
                "callback (EGN shards its own state), or deepspeed_ext.initialize at "
                "zero_optimization.stage 0."
            )
        if isinstance(optimizer, DeepSpeedClientOptimizer):
            return optimizer
        # checked with the config in _setup_model_and_optimizer (from_optimizer builds no inner optimizer)
        return DeepSpeedClientOptimizer.from_optimizer(optimizer, zero_stage=stage, layout=entry.layout,
                                                       param_names=names)

    def _check_client(self, client: Any) -> None:
        """Check every client against the config as Lightning formatted it (``setup`` added the precision
        block after ``__init__`` parsed the config): fp16 at stage 0 from ``precision="16-mixed"`` was run
        silently (6.5e-3 off 32-true in 5 steps) while the JSON route refused it. Then the flags DeepSpeed
        needs for a client optimizer, set in the one place the JSON route sets them."""
        from deepspeed_ext.engine import check_client

        assert isinstance(self.config, dict)
        entry = check_client(client, self.config)
        patch_for_client(self.config, entry, self._zero_stage())

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """Nothing for our clients: Lightning drops ``optimizer_states`` from a DeepSpeed checkpoint, whose
        optimizer state ``engine.save_checkpoint`` writes (consolidated at stage 0). Lightning's default
        would consolidate to rank 0 for a state it then throws away."""
        from deepspeed_ext.engine import find_client_optimizer

        if find_client_optimizer(optimizer) is not None:
            return {}
        return super().optimizer_state(optimizer)

    @override
    def _setup_model_and_optimizer(self, model: torch.nn.Module, optimizer: Any,
                                   lr_scheduler: Any = None) -> Any:
        import deepspeed

        client = self._client_for(model, optimizer)
        if client is None:
            if self._on_cuda():
                engine, ds_optimizer = super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
                self._guard_foreign_engine(engine)
                return engine, ds_optimizer
            client_opt = optimizer
        else:
            self._check_client(client)
            client_opt = client
            rank_zero_info(f"lightning_soaa: {client.optimizer_cls.__name__} as DeepSpeed client optimizer "
                           f"(ZeRO-{client.zero_stage}, {client.layout})")
        device_rank = self.root_device.index if self.root_device.index is not None else self.local_rank
        if client is not None:
            client.suspended = True
        try:
            engine, ds_optimizer, _, _ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=device_rank),
                config=self.config,
                model=model,
                model_parameters=None if client is not None else [p for p in model.parameters()
                                                                   if p.requires_grad],
                optimizer=client_opt,
                lr_scheduler=lr_scheduler,
                dist_init_required=False,
            )
        finally:
            if client is not None:
                client.suspended = False
        if client is not None:
            from deepspeed_ext.engine import bind

            bind(engine)  # the ZeRO wrapper, and save_checkpoint consolidating a stage-0 state first
        else:
            self._guard_foreign_engine(engine)
        return engine, ds_optimizer

    def _guard_foreign_engine(self, engine: Any) -> None:
        """The engine of an optimizer that is not ours refuses, at ``fit(ckpt_path=...)``, optimizer state ours
        wrote (it loaded it silently, with our hyperparameters and fresh moments)."""
        from deepspeed_ext.engine import install_foreign_load_check

        install_foreign_load_check(engine)
