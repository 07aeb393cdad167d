"""Sharding and communication: the only package that touches ``torch.distributed``."""

from lightning_soaa.distributed.assignment import assign_owners, rank_loads
from lightning_soaa.distributed.blocks import BlockInfo, BlockSpec, BlockTable
from lightning_soaa.distributed.comm import CommStats, Communicator, LocalComm, TorchComm, default_communicator

__all__ = [
    "assign_owners", "rank_loads", "BlockInfo", "BlockSpec", "BlockTable",
    "CommStats", "Communicator", "LocalComm", "TorchComm", "default_communicator",
]
