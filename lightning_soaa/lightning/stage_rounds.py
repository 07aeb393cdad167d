"""The per-batch agreement rounds of an evaluation stage (validate/test/predict) under PreemptionCheckpoint.

After each batch every rank contributes one small all-reduce: whether it received SIGTERM, and the dataloader
of its next batch (its "group"; :data:`DONE`: no batch left). A round is posted asynchronously after batch k
and read after batch k+1 (or at once where the rank has no batch left in its group), so its latency overlaps
the next batch's compute; every rank reads round k at the same point of its stage, so every rank stops after
the same batch.

The group is what a sequential CombinedLoader (Lightning's default for several evaluation loaders) needs: a
rank leaving a dataloader (for a later one, or with no batch left) goes on only once every rank is past that
dataloader (the lowest group of a round is above it). Lightning reduces the ``sync_dist`` metrics of a dataloader at
that switch, on each rank after its own last batch of it: ranks with unequal shares of a dataloader met
that reduce with another rank's round (measured: W = 2, gloo, 3 + 2 batches and 1 + 3, a hang).

A rank whose stage raises posts nothing more: the others wait in their next round until its process ends
(or the process group's timeout). A "failed" round posted from ``on_exception`` (tried in turn 40) paired
with whatever collective the others were in (an FSDP2 all-gather, a ``sync_dist`` log, a user's all-reduce
of the same size, which it silently changed) and held both ranks there.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist

__all__ = ["DONE", "Outcome", "StageRounds"]

#: the group of a rank with no batch left (above any dataloader index)
DONE = 2**62


class Outcome(NamedTuple):
    """One round's verdict, the same on every rank."""

    requested: bool  # some rank received SIGTERM
    low: int  # the lowest group any rank posted: DONE once no rank has a batch left

    @property
    def more(self) -> bool:
        """Some rank has batches left."""
        return self.low < DONE


class StageRounds:
    """The rounds of one stage: at most one posted and not yet read (``pending``).

    ``open``: the other ranks will post another round (no round read so far said the stage ends)."""

    def __init__(self, strategy: Any, world_size: int) -> None:
        self.strategy = strategy
        self.pending: tuple[torch.Tensor, Any] | None = None
        self.open = True
        # torch.distributed's default group spans the trainer's ranks (DDP, FSDP, DeepSpeed): an async all-reduce
        # on it; any other strategy: its own reduce, synchronously
        self._async = dist.is_available() and dist.is_initialized() and dist.get_world_size() == world_size

    def post(self, requested: bool, group: int) -> None:
        """This rank's entry of the next round (read by :meth:`collect`): ``group`` is the dataloader of its next
        batch, :data:`DONE` where it has none left."""
        assert self.pending is None, "a round is posted while the previous one is unread"
        # one MAX reduce: any request, and the lowest group (negated)
        flags = torch.tensor([int(requested), -group], dtype=torch.int64, device=self.strategy.root_device)
        if self._async:
            work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True)
        else:
            flags, work = self.strategy.reduce(flags, reduce_op="max"), None
        self.pending = (flags, work)

    def collect(self) -> Outcome | None:
        """The verdict of the posted round (None: none posted)."""
        if self.pending is None:
            return None
        flags, work = self.pending
        if work is not None:
            work.wait()
        requested, low = (int(v) for v in flags.tolist())
        self.pending = None
        outcome = Outcome(requested > 0, -low)
        if outcome.requested or not outcome.more:
            self.open = False  # every rank ends its stage at this round: none posts another
        return outcome
