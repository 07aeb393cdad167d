"""DeferredComm, what a pickled TorchComm becomes: it refuses, on first use, every place it cannot
re-attach to (the multi-rank re-attachment itself is checked in tests/conformance/test_ranks.py)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from lightning_soaa.distributed.comm import DeferredComm


def test_refuses_without_a_process_group_and_for_a_non_default_group() -> None:
    comm = DeferredComm(1, 4)
    assert comm.step_stats.total_calls == 0 and comm.last_step_stats.total_calls == 0  # no group needed
    with pytest.raises(RuntimeError, match=r"pickled on rank 1 of world size 4; call torch.distributed"):
        comm.all_reduce_scalars(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"non-default process group.*opt.comm = "):
        DeferredComm(0, 2, default_group=False).begin_step()


def test_pickles_and_copies_as_itself() -> None:
    for twin in (pickle.loads(pickle.dumps(DeferredComm(1, 3, False))), copy.deepcopy(DeferredComm(1, 3, False))):
        assert (twin.rank, twin.world_size, twin.default_group) == (1, 3, False)
        assert "not attached yet" in repr(twin)
