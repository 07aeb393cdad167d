"""A constructor's error raised on some ranks only reaches every rank (one job: that announcement).

Building an optimizer over a W > 1 group ends in a collective, the construction check
(:meth:`~lightning_soaa.optim.base.ShardedOptimizer._check_same_params_on_all_ranks`: an all-gather of a
fixed-size vector). A rank whose constructor raised before it (an argument valid on one rank only, a
parameter layout refused there) left the others waiting in that all-gather until the process group's
timeout or until its process exited (gloo: "Connection closed by peer"; NCCL may wait for its watchdog, and
``srun`` without ``--kill-on-bad-exit`` keeps the other ranks running). Now such a rank joins the check with
a row marked failed before it re-raises its own error, and every other rank raises naming it: together, at
once, with nothing built.

Only lightning_soaa's own classes are wrapped: a user's subclass may run collectives of its own before
``super().__init__``, which an announcement from a rank that failed there would meet instead of the check
(both ranks would then wait for the group's timeout); its failures inside our constructor are announced by
ours. The rank can only join where it knows the group the others gather over: the communicator the
constructor chose (once it has), or the one its arguments name (``comm``, ``process_group``, else the default group).
Parameters sharded by FSDP2 gather over their device mesh, which is read from the parameters only later:
with DTensor parameters (or parameters it cannot see without consuming an iterator) a rank that fails
before the communicator is chosen raises alone, as before.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_soaa.distributed.agreement import CONSTRUCTION_FAILED, FAILED_FLAG_COLUMN
from lightning_soaa.distributed.comm import Communicator, default_communicator, distributed_running
from lightning_soaa.distributed.dtensor import is_dtensor

__all__ = ["collective_construction", "failed_row"]


def failed_row(width: int, flag: float = 0.0) -> Tensor:
    """The construction row of a rank whose constructor raised: every column ``CONSTRUCTION_FAILED``, but
    the one after the step count (:data:`~lightning_soaa.distributed.agreement.FAILED_FLAG_COLUMN`) holds
    its error's :func:`~lightning_soaa.distributed.agreement.error_flag` where given (an integer)."""
    row = torch.full((width,), CONSTRUCTION_FAILED, dtype=torch.int64)
    if flag:
        row[FAILED_FLAG_COLUMN] = int(flag)
    return row


def _visible_tensors(params: Any) -> list[Tensor] | None:
    """The tensors of a constructor's first argument, or None where some cannot be seen without consuming
    an iterator (a param group whose ``params`` is a generator) or it is not a collection at all."""
    if params is None or isinstance(params, (str, bytes)):
        return None
    if isinstance(params, nn.Module):
        return list(params.parameters())
    if isinstance(params, Tensor):
        return [params]
    out: list[Tensor] = []
    for item in params:
        members = item.get("params", ()) if isinstance(item, dict) else [item]
        if isinstance(members, Iterator):
            return None
        for m in [members] if isinstance(members, Tensor) else members:
            m = m[1] if isinstance(m, tuple) and len(m) == 2 else m  # a (name, parameter) pair
            if isinstance(m, Tensor):
                out.append(m)
    return out


def _announce(optimizer: Any, params: Any, kwargs: dict[str, Any]) -> None:
    """Join the construction check with a failed row, where this rank can tell the group (see the module
    docstring); never raises (the caller re-raises the constructor's own error)."""
    state = optimizer.__dict__
    if state.get("_construction_gathered") or not distributed_running():
        return
    try:
        comm = state.get("_construction_comm")
        if comm is None:
            seen = _visible_tensors(params)
            if seen is None or any(is_dtensor(t) for t in seen):
                return
            given = kwargs.get("comm")
            comm = given if isinstance(given, Communicator) else default_communicator(kwargs.get("process_group"))
        if comm.world_size > 1:
            comm.all_gather_flat(failed_row(optimizer.construction_width()))
    except Exception:  # noqa: BLE001 - the constructor's own error is the one to raise
        return


def collective_construction(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap one of lightning_soaa's optimizer classes' ``__init__`` so that an error it raises before the
    construction check is announced to the other ranks (:func:`_announce`) by the outermost constructor. Its
    first argument (the parameters, or EGN's module; positional or by keyword) is what is looked at; an
    iterator of parameters is read into a list first (torch's ``Optimizer.__init__`` does the same)."""
    first = next(iter(list(inspect.signature(init).parameters)[1:]), "")

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        depth = self.__dict__.get("_init_depth", 0)
        if depth == 0 and args and isinstance(args[0], Iterator):
            args = (list(args[0]), *args[1:])
        elif depth == 0 and first in kwargs and isinstance(kwargs[first], Iterator):
            kwargs[first] = list(kwargs[first])
        self.__dict__["_init_depth"] = depth + 1
        try:
            init(self, *args, **kwargs)
        except Exception:
            if depth == 0:
                _announce(self, args[0] if args else kwargs.get(first), kwargs)
            raise
        finally:
            if depth == 0:
                self.__dict__.pop("_init_depth", None)
            else:
                self.__dict__["_init_depth"] = depth

    return wrapper
