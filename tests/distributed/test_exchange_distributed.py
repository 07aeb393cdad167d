"""``OwnerExchange`` on real gloo ranks: sums reach the owners, owners' blocks reach every rank, with
one collective per dtype (sharded) or per channel (unsharded), also for ranks that own nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_soaa.distributed.blocks import BlockSpec, BlockTable
from lightning_soaa.distributed.comm import TorchComm
from lightning_soaa.distributed.exchange import OwnerExchange
from tests.harness.distributed import run_distributed

SHAPES = [((4, 3), torch.float64), ((5,), torch.float32), ((6, 2), torch.float64), ((2,), torch.float32)]


def _params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dt) for s, dt in SHAPES]


def _specs(p: torch.Tensor, i: int) -> list[BlockSpec]:
    if i == 2:  # one parameter cut in two blocks along dim 0
        return [BlockSpec(0, 0, 4, 8.0), BlockSpec(0, 4, 6, 4.0)]
    return [BlockSpec(None, 0, 0, float(p.numel()))]


def _worker(rank: int, world: int, shard: bool) -> dict:
    comm = TorchComm()
    params = _params()
    table = BlockTable(params, [0] * len(params), [_specs(p, i) for i, p in enumerate(params)],
                       world_size=world if shard else 1, rank=rank if shard else 0, shard=shard)
    ex = OwnerExchange(table, params, comm, sharded=shard)
    # channel 0: (rank + 1)·p; channel 1: p on rank 0 only (None elsewhere counts as zeros)
    channels = [[(rank + 1) * p for p in params], [p.clone() if rank == 0 else None for p in params]]
    comm.begin_step()
    sums = ex.sum_to_owners(channels)
    to_owners = comm.step_stats.copy()
    comm.begin_step()
    full = ex.gather_from_owners([2 * s for s in sums[0]])
    from_owners = comm.step_stats.copy()
    owned = [(b.param_index, b.sub_index) for b in ex.owned]
    return {"sums": [[s.clone() for s in ch] for ch in sums], "owned": owned, "full": full,
            "to": to_owners, "from": from_owners}


@pytest.mark.parametrize("world,shard", [(2, True), (3, True), (6, True), (2, False)])
def test_sum_to_owners_and_gather_from_owners(tmp_path: Path, world: int, shard: bool) -> None:
    results = run_distributed(_worker, world, tmp_path, shard)
    params = _params()
    total = sum(range(1, world + 1))
    blocks = {(i, b): spec for i, p in enumerate(params) for b, spec in enumerate(_specs(p, i))}

    def view(t: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
        spec = blocks[key]
        return t if spec.dim is None else t.narrow(spec.dim, spec.start, spec.stop - spec.start)

    seen = set()
    for res in results:
        for j, key in enumerate(res["owned"]):
            p = params[key[0]]
            torch.testing.assert_close(res["sums"][0][j], view(total * p, key), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(res["sums"][1][j], view(p, key), rtol=0, atol=0)
            seen.add(key)
        for got, p in zip(res["full"], params):  # every rank: 2·W̄·p assembled from all owners
            torch.testing.assert_close(got, 2 * total * p, rtol=1e-6, atol=1e-6)
        assert torch.equal(torch.cat([t.reshape(-1).double() for t in res["full"]]),
                           torch.cat([t.reshape(-1).double() for t in results[0]["full"]]))
    assert seen == set(blocks)  # every block owned somewhere (by everyone when unsharded)
    if shard:
        assert sum(len(r["owned"]) for r in results) == len(blocks)
        if world == 6:  # five blocks, six ranks
            assert min(len(r["owned"]) for r in results) == 0  # an idle rank joined every call
        for res in results:  # one collective per dtype, each direction
            assert res["to"].calls == {"reduce_scatter": 2}
            assert res["from"].calls == {"all_gather": 2}
    else:
        for res in results:  # one all-reduce per channel; gathers are local copies
            assert res["to"].calls == {"all_reduce": 2}
            assert res["from"].calls == {}


def _w_failed_pack_after_own_error(rank: int, world: int) -> dict:
    """Rank 1: an error of its own before the step (an lr written as NaN), then its gradient exchange's packing
    fails (out of memory, injected): every rank raises, and nothing of the exchange outlives the step."""
    from lightning_soaa import ShardedAdamW

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2).double())
    opt = ShardedAdamW(model.parameters(), lr=1e-2, grad_reduction="mean")

    def backward() -> None:
        model.zero_grad()
        model[1](model[0](torch.randn(5, 4)).double()).sum().backward()

    backward()
    opt.step()
    backward()
    pack = OwnerExchange._pack_grads
    if rank == 1:
        opt.param_groups[0]["lr"] = float("nan")

        def failing(*args: object) -> None:
            raise torch.OutOfMemoryError("injected: the exchange's packing")
        OwnerExchange._pack_grads = failing  # type: ignore[method-assign]
    raised = ""
    try:
        opt.step()
    except Exception as e:  # noqa: BLE001 - the parent checks what each rank raised
        raised = type(e).__name__
    finally:
        OwnerExchange._pack_grads = pack  # type: ignore[method-assign]
    # a held failure left on the optimizer keeps its traceback, and with it the exchange's buffers (per dtype about
    # the gradients' size), alive until the next step: just when a caller frees memory to retry
    return {"raised": raised, "left": sorted(k for k in vars(opt) if k == "_held_error")}


def test_a_held_exchange_failure_does_not_outlive_a_step_that_failed_before_it(tmp_path: Path) -> None:
    results = run_distributed(_w_failed_pack_after_own_error, 2, tmp_path, timeout=120)
    assert [r["raised"] for r in results] == ["ValueError", "ValueError"], results
    assert [r["left"] for r in results] == [[], []], results
