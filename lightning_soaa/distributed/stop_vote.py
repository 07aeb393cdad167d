"""A stop request (a preemption signal) that every rank learns at the same optimizer step.

A signal reaches each rank at its own moment: one rank may be inside a collective, another between two.
Work done in the signal handler itself (Lightning's SLURM auto-requeue saves a checkpoint there) then
makes collectives that pair with whatever the other ranks are doing: with a sharded optimizer the
consolidation's gathers met the step's all-reduce (gloo: "Received data size doesn't match expected
size", no checkpoint written). The handler must only record the request; the ranks then decide together.

:class:`StopVote` is that record. ``request()`` (async-signal-safe: it sets a flag) is what the handler
calls. Every step of an optimizer that carries the vote (``ShardedOptimizer.stop_vote``) adds
``requested`` to the step's one fp64 all-reduce, so the vote costs no collective of its own; the sum is
the same on every rank, and ``agreed`` turns True on every rank after the same step. ``rounds`` counts
those all-reduces: equal on every rank, since every rank makes the same steps.
"""

from __future__ import annotations

import signal

__all__ = ["StopVote", "in_handler_checkpoint_signal"]


class StopVote:
    """A local stop request and the verdict every rank reached on it (see the module docstring)."""

    def __init__(self, world_size: int) -> None:
        #: the number of ranks the optimizers carrying this vote must span (their communicator's world)
        self.world_size = world_size
        self.requested = False  # this rank received the signal
        self.agreed = False  # some rank had, at an all-reduce every rank made
        self.rounds = 0  # all-reduces that carried the vote

    def request(self) -> None:
        """Record a stop request (from a signal handler: nothing else happens here)."""
        self.requested = True

    def value(self) -> float:
        """This rank's entry of the all-reduce."""
        return 1.0 if self.requested else 0.0

    def record(self, total: float) -> None:
        """The all-reduced entry: the same on every rank."""
        self.rounds += 1
        self.agreed = self.agreed or total > 0


def in_handler_checkpoint_signal() -> int | None:
    """The signal for which Lightning's SLURM auto-requeue handler (the one that checkpoints inside the
    handler) is installed in this process, else None. Recognised by its names, without importing
    Lightning: a composed handler whose parts include ``_slurm_sigusr_handler_fn``."""
    for name in ("SIGUSR1", "SIGUSR2"):
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        parts = getattr(signal.getsignal(signum), "signal_handlers", None)
        if isinstance(parts, list) and any(getattr(h, "__name__", "") == "_slurm_sigusr_handler_fn" for h in parts):
            return int(signum)
    return None
