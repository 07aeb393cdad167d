"""Pure owner assignment: block costs and a world size in, one owner rank per block out.

No process group is involved, so every rank computes the same answer from the same inputs, and tests
can check uneven and idle-rank cases in microseconds.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

__all__ = ["assign_owners", "rank_loads"]


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy longest-processing-time assignment.

    Blocks are visited from the most to the least expensive (ties by block index) and each goes to the
    currently least-loaded rank (ties by rank). The result depends only on ``costs`` and
    ``world_size``; with more ranks than blocks the extra ranks own nothing.

    Args:
        costs: one non-negative cost per block.
        world_size: number of ranks, at least 1.

    Returns:
        ``owners[i]`` is the rank that owns block ``i``.
    """
    if world_size < 1:
        raise ValueError(f"Invalid world_size={world_size}. Must be >= 1.")
    for i, c in enumerate(costs):
        if not c >= 0:  # also rejects NaN
            raise ValueError(f"Invalid cost of block {i}: {c}. Must be >= 0.")
    order = sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i))
    heap = [(0.0, r) for r in range(world_size)]
    owners = [0] * len(costs)
    for i in order:
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + float(costs[i]), r))
    return owners


def rank_loads(costs: Sequence[float], owners: Sequence[int], world_size: int) -> list[float]:
    """Total cost owned by each rank."""
    loads = [0.0] * world_size
    for c, r in zip(costs, owners):
        loads[r] += float(c)
    return loads
