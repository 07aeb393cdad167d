"""The per-batch agreement rounds of an evaluation stage (validate/test/predict) under PreemptionCheckpoint.

After each batch every rank contributes one small all-reduce: whether it received SIGTERM, whether it has
batches left, whether it raised. A round is posted asynchronously after batch k and read after batch k+1
(or at once where the rank has no batch left), so its latency overlaps the next batch's compute; every rank
reads round k at the same point of its stage, so every rank stops after the same batch.

A rank whose stage raised posts one more round saying so (in the callback's ``on_exception``): the others,
which wait in their next round for it, stop there with an error naming it, instead of waiting until that
rank's process ends (a logger's upload, a caller that catches the exception: until the process group's
timeout, 30 minutes by default).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

__all__ = ["Outcome", "StageRounds"]

log = logging.getLogger(__name__)


class Outcome(NamedTuple):
    """One round's verdict, the same on every rank."""

    requested: bool  # some rank received SIGTERM
    more: bool  # some rank has batches left
    failed: int  # ranks that raised
    failed_rank: int | None  # the one that raised, where one did


class StageRounds:
    """The rounds of one stage: at most one posted and not yet read (``pending``).

    ``open``: the other ranks will post another round (no round read so far said the stage ends);
    ``in_collective``: an exception raised now came from a round itself (no further round can pair);
    ``armed``: the stage's loop has begun on this rank (before it, the others may be in one of Lightning's
    barriers: a round posted then would pair with that barrier)."""

    def __init__(self, strategy: Any, world_size: int, rank: int) -> None:
        self.strategy, self.world_size, self.rank = strategy, world_size, rank
        self.pending: tuple[torch.Tensor, Any] | None = None
        self.open = True
        self.in_collective = False
        self.armed = False
        # torch.distributed's default group spans the trainer's ranks (DDP, FSDP, DeepSpeed): an async all-reduce
        # on it; any other strategy: its own reduce, synchronously
        self._async = dist.is_available() and dist.is_initialized() and dist.get_world_size() == world_size

    def post(self, requested: bool, more: bool, failed: bool = False) -> None:
        """This rank's entry of the next round (read by :meth:`collect`)."""
        assert self.pending is None, "a round is posted while the previous one is unread"
        flags = torch.tensor([int(requested), int(more), int(failed), self.rank + 1 if failed else 0],
                             dtype=torch.int64, device=self.strategy.root_device)
        self.in_collective = True
        if self._async:
            work = dist.all_reduce(flags, op=dist.ReduceOp.SUM, async_op=True)
        else:
            flags, work = self.strategy.reduce(flags, reduce_op="sum"), None
        self.in_collective = False
        self.pending = (flags, work)

    def collect(self) -> Outcome | None:
        """The verdict of the posted round (None: none posted)."""
        if self.pending is None:
            return None
        flags, work = self.pending
        self.in_collective = True
        if work is not None:
            work.wait()
        requested, more, failed, ranks = (int(v) for v in flags.tolist())
        self.in_collective = False
        self.pending = None
        outcome = Outcome(requested > 0, more > 0, failed, ranks - 1 if failed == 1 else None)
        if outcome.requested or outcome.failed or not outcome.more:
            self.open = False  # every rank ends its stage at this round: none posts another
        return outcome

    def announce_failure(self, exception: BaseException) -> None:
        """This rank raised: the others learn it at the round they wait in (theirs after the batch this rank
        did not finish). Never raises: the caller's exception is the one to see."""
        if not self.armed or self.in_collective or self.world_size == 1:
            return
        try:
            self.collect()  # posted after this rank's previous batch: every other rank posts it too
            if self.open:
                log.error("rank %d raised %s: %s; the other ranks stop at their next agreement round",
                          self.rank, type(exception).__name__, exception)
                self.post(requested=False, more=False, failed=True)
                self.collect()
        except Exception as error:  # a dead peer, a timeout: nothing more to tell
            log.warning("could not tell the other ranks that rank %d raised: %s", self.rank, error)
