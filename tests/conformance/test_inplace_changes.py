"""Parameters changed in place between steps, outside the optimizer, on W = 2 gloo ranks.

Every registered optimizer updates each block from its owner's copy and sends it to every rank. A change
made between two steps on one replica only (nn.Embedding(max_norm=...) renormalises, in its forward, the
rows of this rank's own batch) used to be dropped on the ranks that do not own the block: the run silently
left the one-process run (AdamW 1.6e-3 off at W = 2 in 4 steps, ASGO and DASGO alike). Now, for every
optimizer in :data:`lightning_soaa.registry.REGISTRY`:

* a change made on one rank only is refused at the next step on every rank, naming the parameter, with the
  parameters and the optimizer unchanged by that step;
* the same change made on every rank (clipping after the step) trains on, equal to one process making it;
* a trained ``nn.Embedding(max_norm=...)`` under DDP is refused on every rank, naming its table (EGN refuses
  it at construction: tests/unit/test_egn_places.py).

EGN with ``shard=False`` (replicated state: every rank steps every block of its own copy) is checked alike
(``EGN-unsharded``, :data:`tests.conformance._battery.REPLICA_SPECS`): its copies changed apart stayed apart.

One launch serves all optimizers and all three cases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_soaa import SOAA
from lightning_soaa.registry import FirstArg, OptimizerSpec, StepNeeds
from tests.conformance._battery import (
    REPLICA_SPECS,
    assert_close,
    each_optimizer,
    each_replica_variant,
    make,
    params,
    step,
)
from tests.harness.distributed import run_distributed

WORLD, CHANGED_AFTER, STEPS = 2, 1, 3  # the change comes after step CHANGED_AFTER (the first has no record)
ROWS, DIM, PER_RANK = 40, 4, 6  # the table, and the rows each rank looks up per step (none twice in a run)


def _change(model: nn.Module, rank: int, alike: bool) -> None:
    """An in-place change of the last parameter: on every rank alike (a clip), or on rank 1 only."""
    last = list(model.parameters())[-1]
    with torch.no_grad():
        if alike:
            last.clamp_(-0.05, 0.05)
        elif rank == 1:
            last.add_(1e-3)


def _run_change(spec: OptimizerSpec, rank: int, world: int, alike: bool) -> dict[str, Any]:
    model, opt = make(spec)
    average = world > 1 and spec.needs is not StepNeeds.BATCH
    out: dict[str, Any] = {"error": None}
    for t in range(STEPS):
        if t == CHANGED_AFTER + 1:
            _change(model, rank, alike)
            out["before"], out["steps_before"] = params(model), opt.num_steps + opt.skipped_steps
        try:
            step(spec, model, opt, t, rank=rank, world=world, average=average)
        except RuntimeError as e:
            out["error"] = str(e)
            break
    out["params"], out["steps"] = params(model), opt.num_steps + opt.skipped_steps
    if out["error"] is not None:  # the same step again, nothing undone: refused again, not stepped
        try:
            step(spec, model, opt, CHANGED_AFTER + 1, rank=rank, world=world, average=average)
            out["retry_error"] = None
        except RuntimeError as e:
            out["retry_error"] = str(e)
        out["resynced"] = _resync_and_train(spec, model, opt, rank, world, average)
    return out


def _run_alike_then_one_rank(spec: OptimizerSpec, rank: int, world: int) -> str | None:
    """The first parameter clipped on every rank alike, the last changed on rank 1 only: the step's error."""
    model, opt = make(spec)
    average = world > 1 and spec.needs is not StepNeeds.BATCH
    try:
        for t in range(STEPS):
            if t == CHANGED_AFTER + 1:
                with torch.no_grad():
                    next(model.parameters()).clamp_(-0.05, 0.05)
                _change(model, rank, alike=False)
            step(spec, model, opt, t, rank=rank, world=world, average=average)
    except RuntimeError as e:
        return str(e)
    return None


def _run_put_back(spec: OptimizerSpec, rank: int, world: int) -> dict[str, Any]:
    """Rank 1 alone swaps other weights into every parameter between two steps and copies its own back (an
    evaluation with EMA weights on one rank): version counters moved there only, the values are the same."""
    model, opt = make(spec)
    average = world > 1 and spec.needs is not StepNeeds.BATCH
    try:
        for t in range(STEPS):
            if t == CHANGED_AFTER + 1 and rank == 1:
                saved = params(model)
                with torch.no_grad():
                    for p, kept in zip(model.parameters(), saved, strict=True):
                        p.mul_(0.5)
                        p.copy_(kept)
            step(spec, model, opt, t, rank=rank, world=world, average=average)
    except RuntimeError as e:
        return {"error": str(e)}
    return {"error": None, "params": params(model)}


def _run_put_back_and_change(spec: OptimizerSpec, rank: int, world: int) -> str | None:
    """Rank 1 alone swaps other weights into the first parameter and its own back, and changes the last: the error
    of the step after that."""
    model, opt = make(spec)
    average = world > 1 and spec.needs is not StepNeeds.BATCH
    for t in range(STEPS):
        if t == CHANGED_AFTER + 1 and rank == 1:
            first = next(iter(model.parameters()))
            with torch.no_grad():
                kept = first.clone()
                first.mul_(0.5)
                first.copy_(kept)
            _change(model, rank, alike=False)
        try:
            step(spec, model, opt, t, rank=rank, world=world, average=average)
        except RuntimeError as e:
            return str(e)
    return None


def _resync_and_train(spec: OptimizerSpec, model: nn.Module, opt: Any, rank: int, world: int,
                      average: bool) -> dict[str, Any]:
    """After the refusals: rank 0's parameters broadcast into every rank's ``p.data`` (no version counter moves:
    the mark still says rank 1 changed the last one), then the refused step again and the rest of the run."""
    import torch.distributed as dist

    for p in model.parameters():
        dist.broadcast(p.data, src=0)
    try:
        for t in range(CHANGED_AFTER + 1, STEPS):
            step(spec, model, opt, t, rank=rank, world=world, average=average)
    except RuntimeError as e:
        return {"error": str(e)}
    return {"error": None, "params": params(model)}


class _Table(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.emb = nn.Embedding(ROWS, DIM, max_norm=1.0, dtype=torch.float64)
        with torch.no_grad():  # every row longer than max_norm: its first lookup renormalises it
            self.emb.weight.copy_(3.0 * torch.randn(ROWS, DIM, generator=g, dtype=torch.float64))
        self.head = nn.Linear(DIM, 3, dtype=torch.float64)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(idx))


def _run_max_norm(spec: OptimizerSpec, rank: int, world: int) -> str | None:
    torch.manual_seed(0)
    model = _Table()
    opt = spec.build(model, **spec.test_kwargs)
    ddp = nn.parallel.DistributedDataParallel(model)
    for t in range(STEPS):
        start = (t * world + rank) * PER_RANK  # fresh rows: this rank alone renormalises them
        idx = torch.arange(start, start + PER_RANK)
        y = torch.linspace(-1.0, 1.0, PER_RANK * 3, dtype=torch.float64).reshape(PER_RANK, 3)
        try:
            spec.take_step(opt, ddp, idx, y)
        except RuntimeError as e:
            return str(e)
    return None


def _worker(rank: int, world: int) -> dict[str, dict[str, Any]]:
    torch.set_num_threads(1)
    out: dict[str, dict[str, Any]] = {}
    for spec in REPLICA_SPECS:
        out[spec.name] = {"one_rank": _run_change(spec, rank, world, alike=False),
                          "alike": _run_change(spec, rank, world, alike=True),
                          "alike_then_one_rank": _run_alike_then_one_rank(spec, rank, world),
                          "put_back": _run_put_back(spec, rank, world),
                          "put_back_and_change": _run_put_back_and_change(spec, rank, world),
                          "max_norm": None if spec.first_arg is FirstArg.MODULE else _run_max_norm(spec, rank, world)}
    return out


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, Any]]]:
    return run_distributed(_worker, WORLD, Path(tmp_path_factory.mktemp("inplace_changes")), timeout=300)


@each_replica_variant
def test_a_change_on_one_rank_is_refused_on_every_rank(spec: OptimizerSpec, launch: list[Any]) -> None:
    for rank, res in enumerate(launch):
        got = res[spec.name]["one_rank"]
        assert got["error"] is not None, f"rank {rank}: a parameter changed on rank 1 only was stepped"
        assert "were changed in place since the last step" in got["error"] and "rank(s) [1]" in got["error"]
        last = [n for n, _ in make(spec)[0].named_parameters()][-1]
        assert repr(last) in got["error"], got["error"]
        assert got["steps"] == got["steps_before"]  # nothing counted, nothing written
        retry = got["retry_error"]  # (the change is still there: a mark moved by the refusal hid it)
        assert retry is not None and "still differ from rank 0's" in retry and "rank(s) [1]" in retry, retry
        for a, b in zip(got["params"], got["before"], strict=True):
            assert torch.equal(a, b)


@each_replica_variant
def test_a_parameter_changed_alike_is_not_named_as_the_one_that_differs(spec: OptimizerSpec,
                                                                        launch: list[Any]) -> None:
    """Each rank's row holds the first index it changed: where that is the same on every rank (a clip of the first
    parameter everywhere, the last changed on rank 1 only) the refusal named the clipped one as differing."""
    first = repr(next(iter(make(spec)[0].named_parameters()))[0])
    for rank, res in enumerate(launch):
        error = res[spec.name]["alike_then_one_rank"]
        assert error is not None, f"rank {rank}: the change on rank 1 only was stepped"
        last = repr([n for n, _ in make(spec)[0].named_parameters()][-1])
        assert "rank(s) [1]" in error and f"(first: parameter {last})" in error and first not in error, error


@each_replica_variant
def test_the_parameter_that_differs_is_named_not_one_put_back(spec: OptimizerSpec, launch: list[Any]) -> None:
    """Rank 1 alone put the first parameter back after a swap and changed the last: the whole parameters are
    compared, and the refusal named the first (equal on every rank) as the one changed on some ranks only."""
    names = [repr(n) for n, _ in make(spec)[0].named_parameters()]
    for rank, res in enumerate(launch):
        error = res[spec.name]["put_back_and_change"]
        assert error is not None, f"rank {rank}: the change on rank 1 only was stepped"
        assert f"rank(s) [1] now differ from rank 0's (first: parameter {names[-1]})" in error, error
        assert names[0] not in error, error


@each_replica_variant
def test_after_a_refusal_ranks_made_equal_again_train_as_one_process(spec: OptimizerSpec, launch: list[Any]) -> None:
    """Under DDP (grad_reduction="none", no replica check due) a rank re-synced by broadcasting ``p.data`` was
    refused for ever (its version counter had moved, rank 0's had not); the step after a refusal now compares
    the whole parameters, on every rank alike, and trains on from the broadcast weights."""
    model, opt = make(spec)
    for t in range(STEPS):
        step(spec, model, opt, t)
    ref = params(model)
    for rank, res in enumerate(launch):
        got = res[spec.name]["one_rank"]["resynced"]
        assert got["error"] is None, f"rank {rank}: {got['error']}"
        assert_close(got["params"], ref, f"rank {rank} params")


@each_replica_variant
def test_parameters_changed_on_one_rank_and_put_back_train_as_one_process(spec: OptimizerSpec,
                                                                        launch: list[Any]) -> None:
    """Rank 0 alone swapping EMA weights in for an evaluation and its own back left the parameters equal on every
    rank, but their version counters had moved on that rank only: every rank raised. Where the ranks' in-place
    changes differ, the step now compares the whole parameters and trains on when they are equal."""
    _assert_equals_one_process(spec, launch, "put_back", alike=False)


@each_replica_variant
def test_the_same_change_on_every_rank_trains_as_one_process(spec: OptimizerSpec, launch: list[Any]) -> None:
    _assert_equals_one_process(spec, launch, "alike", alike=True)


def _assert_equals_one_process(spec: OptimizerSpec, launch: list[Any], case: str, alike: bool) -> None:
    """Every rank's run ``case`` raised nothing and equals one process's (which makes the change too if ``alike``)."""
    model, opt = make(spec)
    for t in range(STEPS):
        if alike and t == CHANGED_AFTER + 1:
            _change(model, 0, alike=True)
        step(spec, model, opt, t)
    ref = params(model)
    for rank, res in enumerate(launch):
        got = res[spec.name][case]
        assert got["error"] is None, f"rank {rank}: {got['error']}"
        assert_close(got["params"], ref, f"rank {rank} params")


@each_optimizer
def test_a_trained_max_norm_embedding_under_ddp_is_refused(spec: OptimizerSpec, launch: list[Any]) -> None:
    if spec.first_arg is FirstArg.MODULE:
        pytest.skip(f"{spec.name} refuses a trained nn.Embedding(max_norm=...) at construction")
    for rank, res in enumerate(launch):
        error = res[spec.name]["max_norm"]
        assert error is not None, f"rank {rank}: the replicas' renormalised rows were silently dropped"
        assert "'emb.weight'" in error and "max_norm" in error, error



def _run_same_batch_rejections(rank: int, world: int) -> dict[str, Any]:
    """SOAA's same_batch acceptance, its trials rejected (lr too large), with a parameter no loss reaches: the
    rejection puts back the blocks each rank owns and gathers the others after the step (its own writes, whatever
    parameters they reach on each rank), on the same batch on every rank."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"f": nn.Sequential(nn.Linear(8, 8, dtype=torch.float64), nn.Tanh(),
                                              nn.Linear(8, 1, dtype=torch.float64)),
                           "unused": nn.Linear(3, 3, dtype=torch.float64)})
    opt = SOAA(model.parameters(), lr=10.0, acceptance="same_batch")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randn(16, 1, generator=g, dtype=torch.float64)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (model["f"](x) - y).square().mean()
        loss.backward()
        return loss

    out: dict[str, Any] = {"error": None}
    try:
        for _ in range(STEPS):
            opt.step(closure)
    except RuntimeError as e:
        out["error"] = str(e)
    out["params"], out["rejected"] = params(model), opt.statistics()["rejected"]
    return out


@pytest.fixture(scope="module")
def same_batch(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_distributed(_run_same_batch_rejections, WORLD, Path(tmp_path_factory.mktemp("same_batch")), timeout=120)


def test_soaas_same_batch_rejection_is_not_taken_for_a_change_outside_the_optimizer(same_batch: list[Any]) -> None:
    ref = _run_same_batch_rejections(0, 1)
    assert ref["error"] is None and ref["rejected"] > 0, ref  # (the rejection path is exercised)
    for rank, got in enumerate(same_batch):
        assert got["error"] is None, f"rank {rank}: {got['error']}"
        assert got["rejected"] == ref["rejected"]
        assert_close(got["params"], ref["params"], f"rank {rank} params")
