"""``shard=False`` checkpoints at W > 1 of every registered optimizer that takes ``shard``: one rank's file loaded on
every rank (``if rank == 0: torch.save(opt.state_dict(), f)``, then a load of ``f`` everywhere).

On the caller's partitions (each rank its own parameters: another seed per rank here, as pipeline stages of
equal-shaped blocks) rank 1 took rank 0's moments and trained on from them, silently. Now the first step after
such a load compares the parameters across ranks and refuses on every rank, nothing changed, naming the saved rank,
this rank and the fix (one file per rank); loading each rank's own file then steps. On replicas (equal parameters,
gradients averaged as DDP does) the same idiom is right and steps as the run without the save and load. A state
dict without the recorded rank (saved before this was recorded) loads as before. Real gloo ranks, W = 2 and 3,
float64.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_soaa.distributed.checkpoint import FORMAT_KEY
from lightning_soaa.optim.saving_rank import SAVED_BY_KEY
from lightning_soaa.registry import OptimizerSpec, StepNeeds
from tests.conformance._battery import SPECS, assert_identical, make, params, step, takes_kwarg
from tests.harness.distributed import run_distributed

UNSHARDED = [s for s in SPECS if takes_kwarg(s, "shard")]
WORLDS = (2, 3)


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _saved(opt: Any, path: Path, rank: int, own: bool) -> dict[str, Any]:
    """Rank 0's state dict (``own``: this rank's), written to ``path`` and read back on every rank."""
    if own or rank == 0:
        torch.save(opt.state_dict(), path.with_suffix(f".{rank}.pt") if own else path)
    _barrier()
    return torch.load(path.with_suffix(f".{rank}.pt") if own else path, weights_only=False)


def _tried(spec: OptimizerSpec, model: Any, opt: Any, t: int, rank: int, world: int, average: bool) -> dict[str, Any]:
    w0 = params(model)
    try:
        step(spec, model, opt, t, rank=rank, world=world, average=average)
    except RuntimeError as e:
        return {"error": str(e), "unchanged": all(torch.equal(a, b) for a, b in zip(params(model), w0))}
    return {"error": None, "params": params(model)}


def _partitions(spec: OptimizerSpec, rank: int, world: int, path: Path) -> dict[str, Any]:
    """Rank 0's file on every rank of partitions: refused; then each rank's own file: steps; a file without the
    recorded rank (an older checkpoint): loads as before."""
    model, opt = make(spec, seed=10 + rank, shard=False)
    first = _tried(spec, model, opt, 0, rank, world, False)
    if first["error"] is not None:  # (EGN: its shard=False copies are replicas, compared at every first step)
        return {"first": first["error"]}
    own = _saved(opt, path / f"{spec.name}-own", rank, own=True)
    opt.load_state_dict(_saved(opt, path / f"{spec.name}-rank0.pt", rank, own=False))
    out = {"rank0": _tried(spec, model, opt, 1, rank, world, False), "saved_by": own[FORMAT_KEY].get(SAVED_BY_KEY)}
    opt.load_state_dict(own)
    out["own"] = _tried(spec, model, opt, 1, rank, world, False)
    old = _saved(opt, path / f"{spec.name}-old.pt", rank, own=False)
    opt.load_state_dict({**old, FORMAT_KEY: {k: v for k, v in old[FORMAT_KEY].items() if k != SAVED_BY_KEY}})
    out["old"] = _tried(spec, model, opt, 2, rank, world, False)
    return out


def _replicas(spec: OptimizerSpec, rank: int, world: int, path: Path) -> dict[str, Any]:
    """Rank 0's file on every rank of replicas: steps as the twin that was neither saved nor loaded."""
    average = spec.needs is not StepNeeds.BATCH
    (model, opt), (twin, twin_opt) = make(spec, shard=False), make(spec, shard=False)
    first = _tried(spec, model, opt, 0, rank, world, average)
    if first["error"] is not None:  # (SOAA: its trust region's sums refuse replicas under shard=False)
        return {"first": first["error"]}
    step(spec, twin, twin_opt, 0, rank=rank, world=world, average=average)
    opt.load_state_dict(_saved(opt, path / f"{spec.name}-replicas.pt", rank, own=False))
    step(spec, twin, twin_opt, 1, rank=rank, world=world, average=average)
    return {"rank0": _tried(spec, model, opt, 1, rank, world, average), "twin": params(twin)}


def _launch(rank: int, world: int, folder: str) -> dict[str, dict[str, Any]]:
    path = Path(folder)
    return {spec.name: {"partitions": _partitions(spec, rank, world, path),
                        "replicas": _replicas(spec, rank, world, path)} for spec in UNSHARDED}


@pytest.mark.parametrize("world", WORLDS)
def test_one_ranks_unsharded_file_is_refused_on_partitions_and_loads_on_replicas(tmp_path: Path, world: int) -> None:
    assert {s.name for s in UNSHARDED} >= {"ASGO", "DASGO", "EGN", "SOAA"}  # (drawn from the registry)
    results = run_distributed(_launch, world, tmp_path, str(tmp_path), timeout=600.0)
    for rank, res in enumerate(results):
        for name, r in res.items():
            part, rep = r["partitions"], r["replicas"]
            if "first" in part:  # partitions refused at their first step already (replicated state: EGN)
                assert "differ" in part["first"], (name, part["first"])
            else:
                assert part["saved_by"] == [rank, world], (name, rank, part["saved_by"])
                message = part["rank0"]["error"]
                assert message is not None and part["rank0"]["unchanged"], (name, rank, message)
                assert "rank 1 loaded the state saved by rank 0 of" in message, (name, message)
                assert "one file per rank" in message and "Nothing changed" in message, (name, message)
                assert part["own"]["error"] is None, (name, rank, part["own"]["error"])
                assert part["old"]["error"] is None, (name, rank, part["old"]["error"])
            if "first" in rep:  # replicas refused under shard=False at their first step already (SOAA)
                assert "whose parameters are all equal" in rep["first"], (name, rep["first"])
                continue
            assert rep["rank0"]["error"] is None, (name, rank, rep["rank0"]["error"])
            for got, want in zip(rep["rank0"]["params"], rep["twin"]):
                assert torch.equal(got, want), (name, rank)
            for got, want in zip(rep["rank0"]["params"], results[0][name]["replicas"]["rank0"]["params"]):
                assert torch.equal(got, want), (name, rank)


@pytest.mark.parametrize("spec", UNSHARDED, ids=[s.name for s in UNSHARDED])
@pytest.mark.parametrize("bad", ["0", [0], [2, 2], [-1, 2], [True, 2], [0.0, 2]])
def test_an_invalid_saving_rank_is_refused_naming_it_and_changes_nothing(spec: OptimizerSpec, bad: Any) -> None:
    model, opt = make(spec)
    step(spec, model, opt, 0)
    sd = opt.state_dict()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=rf"invalid {SAVED_BY_KEY}=.*Must be \[rank, world_size\]"):
        opt.load_state_dict({**sd, FORMAT_KEY: {**sd[FORMAT_KEY], SAVED_BY_KEY: bad}})
    assert_identical(opt.state_dict(), before)
    # a valid one saved elsewhere (rank 1 of 2) means nothing at W = 1: the state loads
    opt.load_state_dict({**sd, FORMAT_KEY: {**sd[FORMAT_KEY], SAVED_BY_KEY: [1, 2]}})
    assert_identical(opt.state_dict(), before)
