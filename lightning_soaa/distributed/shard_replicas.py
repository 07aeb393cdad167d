"""Which ranks hold the same piece of a DTensor parameter (HSDP's replicas), so the step can compare them.

Under HSDP (``fully_shard`` over a replicate x shard mesh) the ranks that share a coordinate on the shard dim
hold the same piece of every parameter, and FSDP2 averages their gradients over the replicate dim: pieces that
started different (another seed per replicate group, weights loaded on one replica after ``fully_shard``) or
were written in place on one replica stay different at every step, silently. Across the shard dim the pieces
differ by design, so the step's agreement compares each rank's piece with the lowest rank holding the same one
(:func:`~lightning_soaa.distributed.agreement.read_step_rows`'s ``replica_of``), never with rank 0's.

A parameter is compared when it is ``Replicate`` over some mesh dim of more than one rank (HSDP; a tensor
parallel ``Replicate`` weight too, which DTensor defines as equal on every rank). Two ranks count as replicas
when their coordinates are equal on every mesh dim that any compared parameter is not ``Replicate`` over: then
they hold the same piece of every compared parameter. A 1-D ``fully_shard`` mesh (every parameter ``Shard``)
and tensor-parallel ``Shard`` weights have no replicas: nothing is compared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
from torch import Tensor

from lightning_soaa.distributed.dtensor import is_dtensor

__all__ = ["ShardReplicas", "shard_replicas"]


@dataclasses.dataclass(frozen=True)
class ShardReplicas:
    """The compared DTensor parameters and, per rank of the optimizer's communicator, its replica's rank."""

    #: indices (in the optimizer's parameter order) of the DTensor parameters with replicas
    indices: tuple[int, ...]
    #: per rank: the lowest rank that holds the same pieces (itself where it is the lowest)
    replica_of: tuple[int, ...]

    def odd_ranks(self, values: Sequence[Any]) -> list[int]:
        """Ranks whose value (one per rank; None: a rank that could not tell) differs from their replica's."""
        return [r for r, v in enumerate(values) if v is None or values[self.replica_of[r]] is None
                or v != values[self.replica_of[r]]]


def _comm_global_ranks(comm: Any) -> list[int] | None:
    """The global rank of each rank of ``comm`` (a TorchComm), or None where it does not say (another kind)."""
    group = getattr(comm, "group", "absent")
    if isinstance(group, str) or not dist.is_initialized():
        return None
    ranks = list(range(dist.get_world_size())) if group is None else dist.get_process_group_ranks(group)
    return [int(r) for r in ranks] if len(ranks) == comm.world_size else None


def _replicated_over(p: Any, mesh: Any) -> list[int]:
    """The mesh dims of more than one rank that ``p`` is ``Replicate`` over."""
    from torch.distributed.tensor import Replicate

    return [d for d, pl in enumerate(p.placements) if isinstance(pl, Replicate) and mesh.size(d) > 1]


def shard_replicas(params: Sequence[Tensor], comm: Any) -> ShardReplicas | None:
    """The DTensor parameters of ``params`` that have replicas, and each rank's replica (see the module), or
    None where none has (a 1-D ``fully_shard`` mesh), at W = 1, or where ``comm``'s ranks cannot be placed
    on the mesh (a communicator of another kind). No communication: read from the mesh, the same on every
    rank."""
    if comm.world_size == 1:
        return None
    dts = [(i, p) for i, p in enumerate(params) if is_dtensor(p)]
    if not dts:
        return None
    mesh = dts[0][1].device_mesh  # type: ignore[attr-defined]  # (one mesh per optimizer: DTensorLayout)
    compared = [(i, p) for i, p in dts if _replicated_over(p, mesh)]
    ranks = _comm_global_ranks(comm)
    if not compared or ranks is None:
        return None
    split = sorted({d for _, p in compared for d, pl in enumerate(p.placements)  # type: ignore[attr-defined]
                    if d not in _replicated_over(p, mesh) and mesh.size(d) > 1})
    grid = mesh.mesh
    keys = []
    for g in ranks:
        where = (grid == g).nonzero()
        if where.shape[0] != 1:
            return None  # (a communicator over other ranks than the mesh's: DTensorLayout refuses it)
        coord = where[0].tolist()
        keys.append(tuple(coord[d] for d in split))
    first: dict[tuple[int, ...], int] = {}
    return ShardReplicas(tuple(i for i, _ in compared), tuple(first.setdefault(k, r) for r, k in enumerate(keys)))

