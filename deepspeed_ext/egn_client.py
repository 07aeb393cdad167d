"""EGN as a DeepSpeed client optimizer -- ZeRO stage 0, fp32 only.

EGN differentiates the model itself (per-sample Jacobians, a Gram matrix over the global mini-batch), so
it needs the real ``nn.Module`` with its real parameters and the batch, not a gradient:

* ZeRO-1/2/3 hand the client optimizer flat partitions of fp32 master copies (and ZeRO-3 even removes
  the module's parameters between forwards): there is no model for EGN to differentiate. Refused.
* bf16/fp16 keep fp32 master copies that DeepSpeed copies back over the module after every step, so an
  update EGN applies to the module would be overwritten. Refused.
* Stage 0, fp32: DeepSpeed steps the client optimizer directly and the module's parameters are the ones
  it trains. EGN shards its own state over the data-parallel group and assembles the exact Gram matrix
  across ranks (see :class:`lightning_soaa.optim.egn.EGN`).

Usage (the engine still runs forward/backward; EGN ignores ``p.grad``)::

    engine, opt, _, _ = deepspeed_ext.initialize(model=model, config="configs/deepspeed/egn_zero0.json")
    for x, y in loader:
        opt.set_batch(x, y)            # the (micro-)batch EGN's step works on
        loss = loss_fn(engine(x), y)
        engine.backward(loss)
        engine.step()                  # -> EGN.step(inputs=x, targets=y)

Under ``gradient_accumulation_steps = k`` call ``set_batch`` once per micro-batch: the batches collect until
the engine steps at the accumulation boundary, and EGN steps once on their concatenation (the exact
Gauss-Newton step of the accumulated batch, as ``BatchToOptimizer`` does under Lightning). Gradient clipping
is refused (EGN reads no gradient; see :func:`deepspeed_ext.ds_config.check_entry`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from deepspeed_ext.added_group import refuse_added_group
from deepspeed_ext.client import EGN_STATE_KEY as STATE_KEY
from deepspeed_ext.client import NOT_CONSOLIDATED, check_writer, group_size, marker_group
from lightning_soaa.optim.egn_batches import concat_batches
from lightning_soaa.optim.sd_hooks import hooked_load, hooked_state_dict

__all__ = ["DeepSpeedEGNOptimizer"]

log = logging.getLogger(__name__)


class DeepSpeedEGNOptimizer(torch.optim.Optimizer):
    """Holds the batch for EGN and runs ``EGN.step(inputs=..., targets=...)`` when DeepSpeed steps.

    Args:
        model: the module handed to ``deepspeed.initialize``.
        optimizer_cls: :class:`lightning_soaa.optim.egn.EGN`.
        hyperparams: its keyword arguments (validated right here on a probe instance).
        process_group: the data-parallel group (``None``: the default group).
    """

    def __init__(self, model: torch.nn.Module, optimizer_cls: type, hyperparams: dict[str, Any] | None = None,
                 *, process_group: Any = None) -> None:
        from lightning_soaa.distributed.comm import LocalComm

        self.model = model
        self.optimizer_cls = optimizer_cls
        self.hyperparams = dict(hyperparams or {})
        self.process_group = process_group
        probe = optimizer_cls(model, comm=LocalComm(), **self.hyperparams)  # raises on bad values
        params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, {k: v for k, v in probe.defaults.items()
                                  if k not in ("params", "param_names")})
        self._built = True  # add_param_group from here on is refused (refuse_added_group)
        self._inner: Any = None
        self._batches: list[tuple[Any, Tensor]] = []  # the micro-batches of the coming step
        self.gradient_accumulation_steps = 1  # the engine's, read in bind()
        self._consolidated_at: int | None = None  # training_steps when consolidate_state_dict kept a state
        self.zero_stage = 0
        self.layout = "model"
        self.suspended = False
        self.training_steps = 0
        self.ignored_steps = 0
        self.step_calls = 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self.__dict__.get("_built"):  # torch's constructor adding the groups given
            return super().add_param_group(param_group)
        refuse_added_group(self, self._inner)

    @property
    def inner(self) -> Any:
        return self._inner

    @property
    def damping(self) -> float:
        """EGN's λ (:attr:`lightning_soaa.optim.egn.EGN.damping`), read and set on the EGN this client steps:
        ``engine.optimizer.damping = x`` set an attribute of the client the step never read."""
        if self._inner is None:  # not built yet: building it is a collective at W > 1 (one rank's read hung)
            from lightning_soaa.config import EGNConfig
            return float(self.hyperparams.get("damping", EGNConfig.damping))
        return float(self._inner.damping)

    @damping.setter
    def damping(self, value: float) -> None:
        if self._inner is None:  # the EGN built at the first step starts from it
            from lightning_soaa.optim.egn import _checked_global
            self.hyperparams["damping"] = _checked_global("damping", value, positive=True)
            return
        self._inner.damping = value

    def bind(self, engine_or_optimizer: Any) -> None:
        """Read the engine's gradient accumulation (how many micro-batches one step concatenates)."""
        gas = getattr(engine_or_optimizer, "gradient_accumulation_steps", None)
        if callable(gas):
            self.gradient_accumulation_steps = int(gas())

    def _ensure_inner(self) -> Any:
        if self._inner is None:
            from lightning_soaa.distributed.comm import default_communicator

            self._inner = self.optimizer_cls(self.model, comm=default_communicator(self.process_group),
                                             **self.hyperparams)
            self.state = self._inner.state
        return self._inner

    def set_batch(self, inputs: Any, targets: Tensor) -> None:
        """This rank's samples of the next micro-batch; the step concatenates the micro-batches handed over
        since the previous step (one per micro-batch under gradient accumulation)."""
        self._batches.append((inputs, targets))

    def _take_batch(self) -> tuple[Any, Tensor]:
        """The concatenated batch of this step; refuses a count that differs from the engine's
        accumulation (EGN would step on a batch other than the one the engine accumulated)."""
        batches, self._batches = self._batches, []
        if not batches:
            raise ValueError(
                "EGN under DeepSpeed needs the batch: call optimizer.set_batch(inputs, targets) before "
                "engine.step() (deepspeed_ext.find_client_optimizer(engine) returns this optimizer)."
            )
        if len(batches) != self.gradient_accumulation_steps:
            raise ValueError(
                f"EGN under DeepSpeed got {len(batches)} set_batch() calls for a step with "
                f"gradient_accumulation_steps={self.gradient_accumulation_steps}. Must be one per "
                "micro-batch (call set_batch before every engine.step(); an engine built with plain "
                "deepspeed.initialize needs deepspeed_ext.bind(engine)). Nothing was updated.")
        return concat_batches(batches)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self.suspended:
            self.ignored_steps += 1
            return None
        self.step_calls += 1
        inputs: Any
        targets: Tensor | None
        try:
            inputs, targets = self._take_batch()
        except ValueError as e:
            if group_size(self.process_group) == 1:
                raise
            # Held, not raised here: EGN.step reports a closure's error through its first all-reduce and
            # raises it on every rank (a rank raising alone left the others in that all-reduce)
            error = e

            def closure() -> Any:
                raise error

            inputs = targets = None
        inner = self._ensure_inner()
        for k, v in self.param_groups[0].items():  # LR schedulers change the wrapper's group
            if k not in ("params", "param_names") and k in inner.param_groups[0]:
                inner.param_groups[0][k] = v
        with torch.enable_grad():
            loss = inner.step(closure, inputs=inputs, targets=targets)
        self.training_steps += 1
        return loss

    def statistics(self) -> dict[str, float]:
        stats = {} if self._inner is None else dict(self._inner.statistics())
        stats["deepspeed_training_steps"] = float(self.training_steps)
        return stats

    def state_dict(self) -> dict[str, Any]:
        return hooked_state_dict(self, self._own_state_dict)  # torch's state-dict hooks, as torch runs them

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        hooked_load(self, state_dict, self._load_own_state_dict)

    def consolidate_state_dict(self, to: int | None = 0) -> None:
        """Collective with several ranks: gather EGN's sharded state so that :meth:`state_dict` returns it
        on rank ``to`` (``None``: every rank). ``engine.save_checkpoint`` calls it on every rank."""
        if group_size(self.process_group) == 1:
            return
        inner = self._ensure_inner()
        inner.consolidate_state_dict(to=to)
        self._consolidated_at = self.training_steps if to is None or to == inner.comm.rank else None

    def _own_state_dict(self) -> dict[str, Any]:
        """EGN's world-size independent state, consolidated by :meth:`consolidate_state_dict` since the last
        step (never here: a rank-0-only call would enter the collective alone and hang)."""
        if group_size(self.process_group) > 1 and self._consolidated_at != self.training_steps:
            raise RuntimeError(NOT_CONSOLIDATED.format(cls=type(self).__name__))
        inner = self._ensure_inner()
        groups = [{k: v for k, v in g.items() if k not in ("params", "param_names")}
                  | {"params": list(range(len(g["params"])))} for g in self.param_groups]
        groups.append(marker_group(self.optimizer_cls.__name__))  # a foreign optimizer's load refuses the state
        return {"state": {}, "param_groups": groups,
                STATE_KEY: {"inner": inner.state_dict(), "training_steps": self.training_steps}}

    def _load_own_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_writer(state_dict, STATE_KEY, self.optimizer_cls.__name__, type(self).__name__)
        self._ensure_inner().load_state_dict(state_dict[STATE_KEY]["inner"])
        self.training_steps = int(state_dict[STATE_KEY].get("training_steps", 0))
        for g, sg in zip(self.param_groups, state_dict["param_groups"]):  # zip: the marker group is the last
            g.update({k: v for k, v in sg.items() if k not in ("params", "param_names")})
        self._consolidated_at = None  # the inner optimizer dropped its consolidated state

    def __repr__(self) -> str:
        return f"DeepSpeedEGNOptimizer({self.optimizer_cls.__name__}, zero_stage=0)"
