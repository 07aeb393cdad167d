"""``consolidate_state_dict`` sends the state tensors as flat byte buffers, not pickled one by one.

Before: every state tensor went through an object collective (``torch.save``'s pickler on the sender,
``torch.load`` on the receiver): 1.1 s at W = 2 for 3,000 parameter tensors, at every checkpoint save
Lightning makes. The state dict must stay bit for bit the one the pickled gather gives (the reference
here, run in the same processes on the same state), for ``to=None`` and ``to=k``, with windows small
enough that tensors straddle them, ranks that own nothing, no state yet, and mixed dtypes.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_soaa import registry
from lightning_soaa.distributed import state_gather
from lightning_soaa.distributed.comm import gather_object
from lightning_soaa.optim import base
from lightning_soaa.registry import StepNeeds
from tests.conformance._battery import SIZES, SPECS, TINY, assert_identical, make, step, takes_kwarg
from tests.harness.distributed import run_distributed


def _pickled_gather(comm: Any, blocks: dict[Any, dict[str, Any]], to: int | None) -> list[Any] | None:
    """The reference: every rank's blocks through the object collectives, as the state was gathered before."""
    if to is None:
        return comm.all_gather_object(blocks)
    parts = gather_object(comm, None if comm.rank == to else blocks, to)
    if parts is not None:
        parts[to] = blocks
    return parts


def _object_bytes(opt: Any) -> int:
    stats = opt.comm.total_stats.bytes
    return stats.get("gather_object", 0) + stats.get("all_gather_object", 0)


def _state_bytes(opt: Any) -> int:
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


def _consolidated(opt: Any, rank: int, to: int | None, reference: bool) -> tuple[Any, int]:
    """The state dict (None where this rank does not receive it) and the bytes sent through object
    collectives, by the flat gather or by the pickled reference."""
    saved = base.gather_block_states
    if reference:
        base.gather_block_states = _pickled_gather  # type: ignore[assignment]
    try:
        before = _object_bytes(opt)
        opt.consolidate_state_dict(to=to)
        sent = _object_bytes(opt) - before
    finally:
        base.gather_block_states = saved
    return (copy.deepcopy(opt.state_dict()) if to is None or to == rank else None), sent


def _both(opt: Any, rank: int, world: int) -> list[dict[str, Any]]:
    """Flat and pickled consolidations, for ``to=None`` and for the last rank."""
    out = []
    for to in (None, world - 1):
        flat, sent = _consolidated(opt, rank, to, reference=False)
        ref, _ = _consolidated(opt, rank, to, reference=True)
        out.append({"to": to, "flat": flat, "ref": ref, "sent": sent, "state_bytes": _state_bytes(opt)})
    return out


def _small_windows() -> None:
    # windows of a few dozen bytes: tensors straddle them, and there are many rounds
    state_gather.RECV_BYTES, state_gather.MIN_WINDOW_BYTES = 64, 24


def _w_registry(rank: int, world: int, name: str, sizes: tuple[int, ...]) -> list[list[dict[str, Any]]]:
    _small_windows()
    spec = registry.get(name)
    extra = {"grad_reduction": "none"} if takes_kwarg(spec, "grad_reduction") else {}
    model, opt = make(spec, sizes=sizes, **extra)
    rounds = [_both(opt, rank, world)]  # before the first step: no state yet
    for t in range(2):
        step(spec, model, opt, t, sizes=sizes, rank=rank, world=world, average=spec.needs is not StepNeeds.BATCH)
    rounds.append(_both(opt, rank, world))
    return rounds


def _check(results: list[Any]) -> None:
    for rank, rounds in enumerate(results):
        for i, cases in enumerate(rounds):
            for c in cases:
                assert (c["flat"] is None) == (c["ref"] is None), (rank, i, c["to"])
                if c["flat"] is not None:
                    assert_identical(c["flat"], c["ref"])
                # the tensors do not travel as objects: what does is a small skeleton
                assert c["sent"] < 4096 + c["state_bytes"] // 4, (rank, i, c["to"], c["sent"], c["state_bytes"])


@pytest.mark.parametrize("name", [s.name for s in SPECS])
@pytest.mark.parametrize("world", [2, 3])
def test_flat_consolidation_is_the_pickled_one(tmp_path: Path, name: str, world: int) -> None:
    """W = 2 (the battery's model) and W = 3 (one Linear: two blocks, so a rank owns nothing): the state
    dict is bit for bit the pickled gather's, before the first step and after two, for ``to=None`` and
    ``to=W-1``; no state tensor is pickled (the object collectives carry far less than the state)."""
    _check(run_distributed(_w_registry, world, tmp_path, name, SIZES if world == 2 else TINY, timeout=240.0))


class _Mixed(nn.Module):
    """Parameters of several dtypes (float16's Adam moments are float32, bfloat16's bfloat16)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(7, 5, generator=g).to(torch.float16))
        self.b = nn.Parameter(torch.randn(6, 3, generator=g).to(torch.bfloat16))
        self.c = nn.Parameter(torch.randn(9, generator=g))
        self.d = nn.Parameter(torch.randn(4, 4, generator=g, dtype=torch.float64))
        self.e = nn.Parameter(torch.randn(3, generator=g).to(torch.bfloat16))


def _w_mixed(rank: int, world: int, name: str) -> list[list[dict[str, Any]]]:
    _small_windows()
    spec = registry.get(name)
    model = _Mixed()
    extra = {"grad_reduction": "none"} if takes_kwarg(spec, "grad_reduction") else {}
    opt = spec.build(model, **{**spec.test_kwargs, **extra})
    g = torch.Generator().manual_seed(1)  # the same gradients on every rank
    for _ in range(2):
        for p in model.parameters():
            p.grad = (0.1 * torch.randn(p.shape, generator=g)).to(p.dtype)
        opt.step(loss=torch.tensor(1.0)) if spec.needs is StepNeeds.LOSS else opt.step()
    return [_both(opt, rank, world)]


@pytest.mark.parametrize("name", [s.name for s in SPECS if s.needs is not StepNeeds.BATCH])
def test_flat_consolidation_mixed_dtypes(tmp_path: Path, name: str) -> None:
    """float16, bfloat16, float32 and float64 parameters at W = 2: each state tensor comes back in its dtype,
    bit for bit (the byte stream mixes them)."""
    _check(run_distributed(_w_mixed, 2, tmp_path, name, timeout=240.0))


def test_windows_cut_the_stream_exactly() -> None:
    """Every window ``[a, b)`` of a rank's byte stream (empty tensors among the others, windows past its end)
    packs exactly those bytes, zero-padded."""
    sizes = (0, 3, 0, 0, 5, 1, 0, 4, 0)
    views = [torch.arange(n, dtype=torch.uint8) + 10 * i for i, n in enumerate(sizes)]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    stream = torch.cat(views)
    for a in range(stream.numel() + 2):
        for b in range(a + 1, stream.numel() + 4):
            want = torch.cat([stream[a:b], torch.zeros(b - a - stream[a:b].numel(), dtype=torch.uint8)])
            assert torch.equal(state_gather._pack(offsets, views, a, b - a), want), (a, b)


def _w_default_device(rank: int, world: int, device: str) -> list[str]:
    from lightning_soaa.distributed.comm import TorchComm

    _small_windows()
    comm = TorchComm()
    g = torch.Generator().manual_seed(rank)
    mine = {(rank, 0): {"m": torch.randn(5, 3, generator=g, dtype=torch.float64), "step": torch.tensor(rank + 2)}}
    everyone = [{(r, 0): {"m": torch.randn(5, 3, generator=torch.Generator().manual_seed(r), dtype=torch.float64),
                          "step": torch.tensor(r + 2)}} for r in range(world)]
    seen = []
    for to in (None, 0, world - 1):
        torch.set_default_device(device)
        try:
            got = state_gather.gather_block_states(comm, mine, to)
        finally:
            torch.set_default_device(None)
        if got is not None:
            seen += [t.device.type for part in got for st in part.values() for t in st.values()]
            for r in range(world):
                assert_identical(got[r], everyone[r])
    return seen


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_flat_consolidation_ignores_the_default_device(tmp_path: Path, device: str) -> None:
    """Under ``torch.set_default_device`` (a global some training scripts set to "cuda") the gathered state is
    the CPU state, as the pickled gather gave: the buffers and the received tensors were made on the default
    device, so packing the CPU state into a GPU window raised on the senders while the receiver, which packs
    nothing, went on into the gather alone (meta stands in for a GPU on machines without one)."""
    for seen in run_distributed(_w_default_device, 2, tmp_path, device, timeout=120.0):
        assert seen and set(seen) == {"cpu"}, seen


def _w_subgroup(rank: int, world: int) -> list[Any]:
    import torch.distributed as dist

    from lightning_soaa.distributed.comm import TorchComm

    _small_windows()
    group = dist.new_group([1, 2])  # (every rank makes the call)
    if rank == 0:
        return []
    comm = TorchComm(group)
    blocks = [{(0, 0): {"m": torch.arange(11.0, dtype=torch.float64)}}, {}]  # group rank 1 sends nothing
    got = []
    for to in (None, 0, 1):
        parts = state_gather.gather_block_states(comm, blocks[comm.rank], to)
        if parts is not None:
            for r in range(2):
                assert_identical(parts[r], blocks[r])
        got.append(parts is not None)
    return got


def test_flat_consolidation_over_a_subgroup(tmp_path: Path) -> None:
    """A process group other than the default one (a user's ``process_group=``, an HSDP shard group): ``to`` is
    a rank of that group (global rank 1 here), not of the world."""
    assert run_distributed(_w_subgroup, 3, tmp_path, timeout=120.0) == [[], [True, True, False], [True, False, True]]
