"""Sharded AdamW: the simplest concrete :class:`ShardedOptimizer`, and ASGO's fallback."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lightning_soaa.config import REPLICA_CHECK_EVERY, AdamWConfig, config_from_group
from lightning_soaa.distributed.blocks import BlockInfo, row_block_specs
from lightning_soaa.distributed.checkpoint import StateField
from lightning_soaa.functional.adamw import adamw_update_
from lightning_soaa.optim.base import BlockView, ShardedOptimizer
from lightning_soaa.optim.stat_guard import MomentBlock, moments_overflow

__all__ = ["ShardedAdamW", "adam_guarded", "adam_state_schema", "init_adam_state", "moment_dtype"]

#: parameter dtype -> the dtype of its elementwise moments where they differ: float16 moments lose what
#: Adam needs ((1-β2) g² underflows to 0 for |g| < ~5e-3, so a later step is ~1000x too long, and
#: overflows to inf for |g| > ~8e3, which froze the coordinate, or every parameter under SOAA), so a
#: float16 parameter keeps float32 moments, as ASGO's matrix statistics do. bfloat16 has float32's range.
_WIDER_MOMENTS = {torch.float16: torch.float32}


def moment_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the elementwise optimizer state (Adam's moments) of a parameter of ``dtype``."""
    return _WIDER_MOMENTS.get(dtype, dtype)


def adam_state_schema(block: BlockInfo, param: torch.Tensor) -> dict[str, StateField]:
    """Adam's per-block state: the step counter and two moments shaped like the block (the second >= 0).
    A checkpoint of an earlier version holds a float16 parameter's moments in float16: they load,
    converted (any floating dtype does, see ``checkpoint._castable``)."""
    dtype = moment_dtype(param.dtype)
    return {
        "step": StateField((), torch.float32, nonnegative=True),
        "exp_avg": StateField(tuple(block.shape), dtype),
        "exp_avg_sq": StateField(tuple(block.shape), dtype, nonnegative=True),
    }


def init_adam_state(state: dict[str, Any], param: torch.Tensor) -> None:
    """A block's first Adam state: step 0 and zero moments (in :func:`moment_dtype`, ``param``'s layout)."""
    dtype = moment_dtype(param.dtype)
    # made first, entered in one call: an out of memory (or Ctrl+C) between the allocations left a state with
    # "step" and no "exp_avg_sq", which every later step took as initialised (a KeyError there)
    state.update(step=torch.zeros((), dtype=torch.float32),
                 exp_avg=torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format),
                 exp_avg_sq=torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format))


def adam_guarded(views: list[BlockView], betas_key: str = "betas") -> list[MomentBlock]:
    """The blocks of ``views`` with a gradient as :func:`~lightning_soaa.optim.stat_guard.moments_overflow`
    reads them (``betas_key``: the group option holding ``(beta1, beta2)``)."""
    return [MomentBlock(v.grad, v.state.get("exp_avg_sq"), float(v.group[betas_key][1]),
                        f"block {v.block.sub_index} of parameter {v.block.param_index if v.name is None else v.name}",
                        # before its first step: the dtype its moments will have (float16: float32)
                        moment_dtype(v.param.dtype))
            for v in views if v.grad is not None]


def _real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as real pairs (a view), as ``torch.optim.AdamW`` steps it: each of the real and
    imaginary parts gets its own second moment (``g*g`` on the complex numbers would not be ``|g|²``)."""
    return torch.view_as_real(t) if t.is_complex() else t


class ShardedAdamW(ShardedOptimizer):
    r"""AdamW with ZeRO-style sharded state; equal to ``torch.optim.AdamW`` up to float rounding.

    Complex parameters are stepped as ``torch.view_as_real`` pairs, like ``torch.optim.AdamW``; the
    moments are stored complex (the parameter's dtype), as torch stores them.

    .. math::
        \begin{aligned}
        &m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        &\theta_t = \theta_{t-1}(1 - \eta\lambda) - \eta\,\frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}
        \end{aligned}

    Args:
        params: tensors, ``named_parameters()`` or param groups.
        lr: learning rate :math:`\eta` (default 1e-3).
        betas: :math:`(\beta_1, \beta_2)` (default (0.9, 0.999)).
        eps: :math:`\epsilon` added outside the square root (default 1e-8).
        weight_decay: decoupled weight decay :math:`\lambda`, scaled by lr (default 1e-2).
        max_block_numel: parameters with more elements are cut into row ranges of at most this many
            elements, so that each rank keeps about 1/W of the state (a param-group option too; default
            None: about 8 blocks per rank, at least ``2**18`` elements each, see
            :meth:`ShardedOptimizer._auto_block_numel`). The result does not depend on it beyond
            rounding; a checkpoint loads with any value (its state is re-cut).
        max_grad_norm: clip the gradient the update reads (after ``grad_reduction="mean"`` averages it) by its
            global norm over all parameters, as torch's ``clip_grad_norm_`` (default None: no clipping); see
            :mod:`lightning_soaa.optim.grad_clip`.
        process_group, comm, shard, grad_reduction, replica_check_every: see :class:`ShardedOptimizer`.

    References:
        Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        max_block_numel: int | None = None,
        max_grad_norm: float | None = None,
        process_group: Any = None,
        comm: Any = None,
        shard: bool = True,
        grad_reduction: str = "none",
        replica_check_every: int = REPLICA_CHECK_EVERY,
    ) -> None:
        self.config = cfg = AdamWConfig(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                        max_grad_norm=max_grad_norm)
        defaults = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                        max_block_numel=max_block_numel, max_grad_norm=cfg.max_grad_norm)
        super().__init__(params, defaults, process_group=process_group, comm=comm, shard=shard,
                         grad_reduction=grad_reduction, replica_check_every=replica_check_every)

    elementwise = True  # row blocks of at most max_block_numel elements (see ShardedOptimizer)

    def _validate_group(self, group: dict[str, Any]) -> None:
        config_from_group(AdamWConfig, group)
        if group.get("max_block_numel") is not None:
            row_block_specs((1,), group["max_block_numel"])  # validates it

    def _state_schema(self, block: BlockInfo, param: torch.Tensor, group: dict[str, Any]) -> dict[str, StateField]:
        return adam_state_schema(block, param)

    def _statistic_overflows(self, views: list[BlockView], grad_sq: float) -> bool:
        """A step whose finite gradients would overflow ``exp_avg_sq`` is skipped (stat_guard.moments_overflow)."""
        return moments_overflow(grad_sq, lambda: adam_guarded(views))

    def _apply(self, views: list[BlockView], decision: Any) -> None:
        self._update_clean_on_raise = True  # until the first write: the lazy state below is zeros (no state)
        by_group: dict[int, list[BlockView]] = {}
        for v in views:
            if v.grad is not None:
                by_group.setdefault(v.block.group_index, []).append(v)
        for gi, vs in by_group.items():
            group = self.param_groups[gi]
            for v in vs:
                if "step" not in v.state:
                    init_adam_state(v.state, v.param)
            beta1, beta2 = group["betas"]
            self._update_clean_on_raise = False  # the counters, moments and parameters are written from here
            adamw_update_(
                [_real(v.param) for v in vs],
                [_real(v.grad) for v in vs],  # type: ignore[arg-type]
                [_real(v.state["exp_avg"]) for v in vs],
                [_real(v.state["exp_avg_sq"]) for v in vs],
                [v.state["step"] for v in vs],
                lr=float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )
