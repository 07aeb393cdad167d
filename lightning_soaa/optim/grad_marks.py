"""Which optimizer wrote the ranks' average into a ``p.grad`` (``grad_reduction="mean"``, W > 1).

The ``"mean"`` exchange writes the average into the ``p.grad`` blocks a rank owns and leaves the local
gradient in the others (:meth:`~lightning_soaa.distributed.exchange.OwnerExchange.reduce_scatter_grads`).
A second optimizer of ours over the same parameter (torch allows a parameter in two optimizers), stepped
after the first on the same gradients, averaged them again: an average of one rank's average and the
others' local gradients. The parameter then trained on a wrong gradient, alike on every rank, so nothing
noticed (two ShardedAdamW at W = 2: 6.7e-2 off one process after 5 steps; SOAA 1.8e-1). Under DDP
(``"none"``) every rank holds the average before either step, and the same two optimizers train exactly.

The same holds for one optimizer stepped twice on one backward (a second ``step()`` call, or a step taken
again after one that raised once it had exchanged the gradients): one process applies the same gradient
again, W ranks averaged the mix (ShardedAdamW: 8.2e-2 off one process after 3 such iterations).

Each step marks the gradients it wrote averages into (the tensor, its version counter at the end of that
step, the optimizer), and a step refuses a gradient still marked. A new backward
clears a mark: it makes a new tensor after ``zero_grad(set_to_none=True)``, or moves the version counter
of the one it accumulates into (as ``zero_grad(set_to_none=False)`` does).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor

__all__ = ["averaged_already", "note_averaged"]

#: the attribute of a gradient tensor holding its mark: (``id`` of the tensor, its version counter when marked, the
#: token of the optimizer that wrote an average into it). On the tensor itself, so that a new gradient tensor has none,
#: and reading it costs an attribute lookup per parameter and step: the check and the marks of a step over 1000
#: parameters 0.5 ms (median of 31, at a load of 7 on 2 cores), a weak-keyed table of the tensors 12.7 ms. Plain
#: integers: the tensor's ``__dict__`` is pickled with it (torch.save of a gradient, all_gather_object), where a weak
#: reference raised TypeError and a class of ours would not load under ``weights_only``; a copy so made is another
#: tensor (``id``), so it carries no mark.
_MARK = "_lightning_soaa_averaged"
#: token -> the optimizer it stands for (dropped with it; the token is kept in the optimizer's ``__dict__``)
_WRITERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_TOKENS = itertools.count(1)
_TOKEN = "_lightning_soaa_mark_token"


def _token(optimizer: Any) -> int:
    token: int | None = optimizer.__dict__.get(_TOKEN)
    if token is None or _WRITERS.get(token) is not optimizer:  # (a copy of an optimizer carries the original's)
        token = next(_TOKENS)
        optimizer.__dict__[_TOKEN] = token
        _WRITERS[token] = optimizer
    return token


def note_averaged(optimizer: Any, grads: Iterable[Tensor | None]) -> None:
    """Mark ``grads`` as holding ``optimizer``'s average (in the blocks this rank owns) as they are now."""
    token = _token(optimizer)
    for g in grads:
        if g is not None:
            setattr(g, _MARK, (id(g), g._version, token))


def averaged_already(params: Sequence[Tensor]) -> tuple[int, Any] | None:
    """The index of the first of ``params`` whose ``p.grad`` holds, unchanged since, the average a live optimizer
    wrote into it, and that optimizer; None if there is none."""
    for i, p in enumerate(params):
        g = p.grad
        mark = None if g is None else getattr(g, _MARK, None)
        if mark is None or g is None or mark[0] != id(g) or mark[1] != g._version:
            continue
        writer = _WRITERS.get(mark[2])
        if writer is not None:
            return i, writer
    return None
