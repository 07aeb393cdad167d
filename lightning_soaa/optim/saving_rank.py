"""The rank that saved a ``shard=False`` state dict, and the refusal of another rank's state on partitions.

With ``shard=False`` at W > 1 (and no DeepSpeed or DTensor layout behind it) ``state_dict()`` needs no
consolidation: each rank returns the state of its own parameters. Where the ranks hold different parameters
(the caller's partitions: pipeline stages of equal-shaped blocks, a manual split), the usual idiom
``if rank == 0: torch.save(opt.state_dict(), f)`` followed by a load of ``f`` on every rank put rank 0's
moments on every rank, with no error: each rank trained on from another partition's state. Where the ranks
are replicas (equal parameters) that same idiom is right, so the load itself cannot tell.

So the state dict records who saved it (:data:`SAVED_BY_KEY` in our metadata: ``[rank, world_size]``), and the
first step after a load of such a state compares the parameters across ranks inside the step's existing
all-reduce (its replica-check digest; each rank's row also says whose state it loaded,
:data:`~lightning_soaa.distributed.agreement.LOADED_SLOT`). Every rank reads the same verdict: parameters that
differ across ranks, where some rank loaded another rank's state, are refused on every rank; equal ones
(replicas) step. A state dict without the key (written before, or by DeepSpeed's per-rank checkpoints, whose
optimizer records none) loads as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["SAVED_BY_KEY", "foreign_load_error", "loaded_slot", "saved_origin", "slot_origin", "with_saving_rank"]

#: our metadata's key for ``[rank, world_size]`` of the rank that wrote a ``shard=False``, W > 1 state dict
SAVED_BY_KEY = "saved_by"

#: the world size's factor in a row's :data:`~lightning_soaa.distributed.agreement.LOADED_SLOT` value
_WORLD_FACTOR = 1 << 24


def with_saving_rank(sd: dict[str, Any], meta_key: str, rank: int, world: int) -> dict[str, Any]:
    """``sd`` (our consolidated format, metadata under ``meta_key``) with ``[rank, world]`` recorded in its
    metadata (a new metadata dict: the optimizer may keep the one it built)."""
    return {**sd, meta_key: {**sd[meta_key], SAVED_BY_KEY: [int(rank), int(world)]}}


def saved_origin(name: str, meta: Any) -> tuple[int, int] | None:
    """The ``(rank, world_size)`` a state dict's metadata says saved it; None where it says nothing (a state
    saved sharded, at W = 1, by DeepSpeed's client, or before this was recorded). Raises ``ValueError`` for a
    value that is no such pair (before anything is loaded)."""
    value = meta.get(SAVED_BY_KEY) if isinstance(meta, dict) else None
    if value is None:
        return None
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value) and 0 <= value[0] < value[1])
    if not ok:
        raise ValueError(
            f"{name}.load_state_dict: invalid {SAVED_BY_KEY}={value!r} in the state dict's 'lightning_soaa' metadata. "
            "Must be [rank, world_size] of the rank that saved it (0 <= rank < world_size), as state_dict() wrote "
            f"it; delete the key to load the state as one saved before it was recorded. Nothing changed.")
    return int(value[0]), int(value[1])


def loaded_slot(origin: tuple[int, int] | None, rank: int, world: int) -> float:
    """This rank's :data:`~lightning_soaa.distributed.agreement.LOADED_SLOT` value: 0 unless it loaded a state
    saved by another rank (or at another world size), else that origin encoded."""
    if origin is None or origin == (rank, world):
        return 0.0
    return float(1 + origin[0] + origin[1] * _WORLD_FACTOR)


def slot_origin(value: float) -> tuple[int, int]:
    """The ``(rank, world_size)`` a non-zero :func:`loaded_slot` value encodes."""
    code = int(value) - 1
    return code % _WORLD_FACTOR, code // _WORLD_FACTOR


def foreign_load_error(name: str, loads: Sequence[tuple[int, float]], world: int, differ: Sequence[int]) -> str:
    """The refusal of a state saved by another rank on ranks whose parameters differ (``loads``: each rank that
    loaded another's state and its slot value; ``differ``: the ranks whose parameters differ from rank 0's)."""
    said = ", ".join(f"rank {r} loaded the state saved by rank {o[0]} of {o[1]}"
                     for r, o in ((r, slot_origin(v)) for r, v in loads))
    return (
        f"{name}.step: shard=False on {world} ranks whose parameters differ (rank(s) {list(differ)} from rank 0's: "
        "each rank's own partition), but the optimizer state loaded is another rank's: "
        f"{said}. Each rank would train on from another partition's moments, silently. Save one file per rank "
        "(torch.save(opt.state_dict(), f'optim_rank{rank}.pt') on every rank) and load each rank's own; a model "
        "replicated on every rank (equal parameters) may load one rank's file everywhere. Nothing changed; the "
        "optimizer keeps the loaded state until a load of this rank's own state.")
