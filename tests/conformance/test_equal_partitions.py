"""``shard=False`` over partitions of one model that hold equal values (every rank built its part from one seed:
identical pipeline stages, a manual tensor-parallel layer's shards) with ``max_grad_norm``: the step must either
train like one process clipping the whole model by its global norm, or refuse with an error whose fix works.

The first-step check cannot tell such partitions from a replicated model (DDP), whose norm the step would count W
times; it refuses both. Its error must then name a fix that trains the partitions (``shard=True`` would average
them as replicas: wrong), and that fix must train them like one process (float64).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.conformance._battery import assert_close, data, make, params
from tests.conformance.test_grad_clip import CLIPPED
from tests.harness.distributed import run_distributed

STEPS = 3
BOUND = 0.5
# (SOAA refused these since before max_grad_norm did, for its trust region, whose loss the step needs too)
STEPPED = [s for s in CLIPPED if not getattr(s.load(), "sums_parts_over_ranks", False)]


def _loss(model: torch.nn.Module, t: int, rank: int, world: int) -> torch.Tensor:
    x, y = data(t, rank=rank, world=world)
    return torch.nn.functional.mse_loss(model(x), y)


def _partitions(rank: int, world: int) -> dict[str, Any]:
    """Each rank's model is its own partition, built from seed 0 like every other rank's. The first step is
    refused (equal to replicas); the error's fix is then applied and the run must step."""
    out = {}
    for spec in STEPPED:
        model, opt = make(spec, seed=0, shard=False, max_grad_norm=BOUND)
        message = None
        for t in range(STEPS):
            opt.zero_grad()
            _loss(model, t, rank, world).backward()
            try:
                opt.step()
            except RuntimeError as e:
                message = str(e)
                assert "partitioned_by_caller = True" in message, message
                opt.partitioned_by_caller = True  # the fix the error names
                opt.step()
        out[spec.name] = {"params": params(model), "message": message}
    return out


def _reference(spec: Any, world: int) -> list[list[torch.Tensor]]:
    """One process over the whole model (W parts built from seed 0, each fed its rank's batch): the global norm
    clips every part alike."""
    parts = [make(spec, seed=0)[0] for _ in range(world)]
    whole = torch.nn.ModuleList(parts)
    opt = spec.build(whole, **{**spec.test_kwargs, "max_grad_norm": BOUND})
    for t in range(STEPS):
        opt.zero_grad()
        sum(_loss(m, t, r, world) for r, m in enumerate(parts)).backward()
        opt.step()
    return [params(m) for m in parts]


def test_equal_partitions_with_max_grad_norm_train_through_the_named_fix(tmp_path: Path) -> None:
    results = run_distributed(_partitions, 2, tmp_path, timeout=300.0)
    assert [s.name for s in STEPPED] == ["ASGO", "DASGO", "AdamW"]
    for spec in STEPPED:
        ref = _reference(spec, 2)
        for rank, res in enumerate(results):
            r = res[spec.name]
            assert r["message"] is not None and "whose parameters are all equal" in r["message"], (spec.name, r)
            assert_close(r["params"], ref[rank], f"{spec.name} rank {rank}")
