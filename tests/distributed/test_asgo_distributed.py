"""ASGO / DASGO across real gloo ranks: what is specific to them.

W-rank runs equal to one process (ASGO with split blocks and stored roots, DASGO), idle ranks, non-finite
gradients and checkpoints across world sizes are checked for every optimizer in
tests/conformance/test_ranks.py (ASGO's registry test_kwargs cut the tiny MLP into 8 blocks). Here: one
W = 3 launch checks the collectives of a step (the base's flag all-reduce, the parameter all-gather, and
with grad_reduction="mean" one reduce-scatter: no extra communication for the matrix methods), the block
split across ranks, that no root fell back, that a step whose gradients would overflow a statistic on
its owner is skipped on every rank, and a fused matrix stepped as its parts (``row_parts``; ``fused`` of a
matrix frozen at construction, ``fused_parts``, at W = 2 and resumed at W = 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_soaa import ASGO, DASGO
from lightning_soaa.distributed.assignment import assign_owners
from lightning_soaa.optim import base
from lightning_soaa.optim.asgo import asgo_block_cost, asgo_param_groups
from tests.harness.compare import max_abs_diff
from tests.harness.distributed import run_distributed
from tests.harness.models import batch, global_batch, loss_fn, qkv_pair, set_qkv_trainable, tiny_mlp

SIZES = (6, 8, 5, 3)  # weights 8x6 (right, cut in 2), 5x8 (left, cut in 2), 3x5: 8 blocks with the biases
ASGO_KW: dict[str, Any] = dict(lr=2e-2, max_block_size=4, root_every=2, damping=1e-6)
DASGO_KW: dict[str, Any] = dict(lr=2e-2)
STEPS = 4
WORLD = 3


def _make(kind: str, **extra: Any):
    model = tiny_mlp(sizes=SIZES)
    cls, kw = (ASGO, ASGO_KW) if kind == "asgo" else (DASGO, DASGO_KW)
    return model, cls(model.named_parameters(), **kw, **extra)


def _mixed_f32() -> list[tuple[str, torch.Tensor]]:
    """float32 on the CPU: "auto" costs its roots as eigendecompositions; a large AdamW embedding."""
    shapes = [("emb.weight", (2048, 64)), ("a.weight", (64, 64)), ("b.weight", (256, 64)), ("c.weight", (64, 256)),
              ("d.weight", (32, 128)), ("e.weight", (96, 96)), ("ln.weight", (64,)), ("b.bias", (256,))]
    g = torch.Generator().manual_seed(0)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=g))) for n, s in shapes]


def _owners(opt: Any) -> list[tuple[int, float]]:
    return [(b.owner, b.cost) for b in opt.block_table.blocks]


def _worker(rank: int, world_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {"mixed_owners": _owners(ASGO(_mixed_f32()))}
    for kind in ("asgo", "dasgo"):
        model, opt = _make(kind, grad_reduction="mean")
        for t in range(STEPS):
            opt.zero_grad()
            loss_fn(model, *batch(t, rank)).backward()
            opt.step()
        out[kind] = {"params": [p.detach().clone() for p in model.parameters()],
                     "owned": len(opt.block_table.owned()), "calls": dict(opt.comm.step_stats.calls),
                     "several": base._built_over(opt.comm) > 1,
                     "stats": opt.statistics()}
        out[f"{kind}_spike"] = _spiked_run(kind, rank)
    out["asgo_row_parts"] = _row_parts_run(rank)
    return out


def _row_parts_run(rank: int | None) -> list[torch.Tensor]:
    """ASGO with the first weight (8 x 6) as two fused 4 x 6 matrices (``row_parts=2``: two row blocks,
    each its own left-side problem); ``rank=None``: one process on the global batch."""
    model = tiny_mlp(sizes=SIZES)
    named = list(model.named_parameters())
    extra: dict[str, Any] = {} if rank is None else {"grad_reduction": "mean"}
    opt = ASGO([{"params": named[:1], "row_parts": 2}, {"params": named[1:]}], **ASGO_KW, **extra)
    assert [b.shape for b in opt.block_table.by_param[0]] == [(4, 6), (4, 6)]
    for t in range(STEPS):
        opt.zero_grad()
        loss_fn(model, *(global_batch(t, WORLD) if rank is None else batch(t, rank))).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _spiked_run(kind: str, rank: int | None) -> dict[str, Any]:
    """float32, 3 steps; at the second, the last rank's gradient of the first weight has a row of 1e20
    (finite; its squares are not): the Gram / column statistic would overflow, so every rank skips that
    step, also the ranks that do not own the block. ``rank=None``: one process without the spike."""
    model = tiny_mlp(sizes=SIZES, dtype=torch.float32)
    extra: dict[str, Any] = {} if rank is None else {"grad_reduction": "mean"}
    opt = (ASGO if kind == "asgo" else DASGO)(model.named_parameters(), lr=2e-2, **extra)
    shape = dict(dtype=torch.float32)
    for t in ((0, 2) if rank is None else (0, 1, 2)):
        opt.zero_grad()
        loss_fn(model, *(global_batch(t, WORLD, **shape) if rank is None else batch(t, rank, **shape))).backward()
        if t == 1 and rank == WORLD - 1:
            model[0].weight.grad[2].fill_(1e20)
        opt.step()
    return {"params": [p.detach().clone() for p in model.parameters()], "skipped": opt.skipped_steps}


def _single(kind: str) -> list[torch.Tensor]:
    model, opt = _make(kind)
    for t in range(STEPS):
        opt.zero_grad()
        loss_fn(model, *global_batch(t, WORLD)).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_collectives_blocks_and_roots_at_three_ranks(tmp_path: Path) -> None:
    results = run_distributed(_worker, WORLD, tmp_path)
    for kind in ("asgo", "dasgo"):
        expected = _single(kind)
        for r, res in enumerate(results):
            for a, b in zip(res[kind]["params"], expected):  # float64: only the gradient sums' order differs
                torch.testing.assert_close(a, b, atol=1e-13, rtol=0, msg=lambda m, k=kind, r=r: f"{k} rank {r}: {m}")
            # grad_reduction="mean": the gradient exchange (after an order check where several optimizers
            # were built over the group), the record, the parameters
            all_reduce = 1 + int(res[kind]["several"])
            assert res[kind]["calls"] == {"reduce_scatter": 1, "all_reduce": all_reduce, "all_gather": 1}
        spiked = _spiked_run(kind, None)["params"]
        for r, res in enumerate(results):
            assert res[f"{kind}_spike"]["skipped"] == 1, (kind, r)
            for a, b in zip(res[f"{kind}_spike"]["params"], spiked):
                torch.testing.assert_close(a, b, atol=2e-5, rtol=0,  # float32 sums in another order
                                           msg=lambda m, k=kind, r=r: f"{k} spike, rank {r}: {m}")
    parts = _row_parts_run(None)
    for r, res in enumerate(results):
        for a, b in zip(res["asgo_row_parts"], parts):
            torch.testing.assert_close(a, b, atol=1e-13, rtol=0, msg=lambda m, r=r: f"row_parts, rank {r}: {m}")
    assert sum(res["asgo"]["owned"] for res in results) == 8  # split blocks: 2 + 1 + 2 + 1 + 1 + 1
    assert sum(res["asgo"]["stats"]["asgo_root_fallbacks"] for res in results) == 0.0
    # The cost model (by the resolved root method) gives every rank the same owners and costs, the ones
    # one process computes for W = 3 from the same shapes; every rank owns some of the 8 blocks.
    single = ASGO(_mixed_f32())
    expected = list(zip(assign_owners([b.cost for b in single.block_table.blocks], WORLD),
                        [b.cost for b in single.block_table.blocks]))
    assert all(res["mixed_owners"] == expected for res in results), [res["mixed_owners"] for res in results]
    assert sorted({o for o, _ in expected}) == [0, 1, 2]
    # float32 on a CPU: the eigendecomposition route at every size
    assert expected[1][1] == asgo_block_cost(64, 64, 10, 1, "polar_express_eigh")
    assert expected[4][1] == asgo_block_cost(32, 128, 10, 1, "polar_express_eigh")
    assert expected[5][1] == asgo_block_cost(96, 96, 10, 1, "polar_express_eigh")


def _nesterov_run(rank: int | None, world: int, nesterov: bool = True) -> list[torch.Tensor]:
    """ASGO_KW (blocks split over the ranks, stored roots) with the first layer's group ``nesterov``, the rest
    without; ``rank=None``: one process on the global batch of ``world`` ranks."""
    model = tiny_mlp(sizes=SIZES)
    named = list(model.named_parameters())
    extra: dict[str, Any] = {} if rank is None else {"grad_reduction": "mean"}
    opt = ASGO([{"params": named[:2], "nesterov": nesterov}, {"params": named[2:]}], **ASGO_KW, **extra)
    for t in range(STEPS):
        opt.zero_grad()
        loss_fn(model, *(global_batch(t, world) if rank is None else batch(t, rank))).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _nesterov_worker(rank: int, world_size: int) -> list[torch.Tensor]:
    return _nesterov_run(rank, world_size)


def test_nesterov_at_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """A ``nesterov`` group's direction is made by each block's owner from its own momentum and gradient:
    W = 2 steps as one process on the global batch (float64: only the gradient sums' order differs)."""
    results = run_distributed(_nesterov_worker, 2, tmp_path)
    expected = _nesterov_run(None, 2)
    for r, res in enumerate(results):
        for a, b in zip(res, expected):
            torch.testing.assert_close(a, b, atol=1e-13, rtol=0, msg=lambda m, r=r: f"nesterov, rank {r}: {m}")
    assert max_abs_diff(expected, _nesterov_run(None, 2, nesterov=False)) > 1e-6  # the option did act


F32_SIZES = (24, 32, 20, 3)  # wide enough for ill-conditioned, rank-deficient Grams (k up to 32)
F32_STEPS = 8


def _f32_run(rank: int | None, inverse_root: str) -> list[torch.Tensor]:
    """ASGO defaults (no damping) on a float32 MLP; ``rank=None``: one process on the global batch of 2."""
    model = tiny_mlp(sizes=F32_SIZES, dtype=torch.float32)
    extra: dict[str, Any] = {} if rank is None else {"grad_reduction": "mean"}
    opt = ASGO(model.named_parameters(), lr=2e-2, inverse_root=inverse_root, **extra)
    shape = dict(d_in=F32_SIZES[0], d_out=F32_SIZES[-1], dtype=torch.float32)
    for t in range(F32_STEPS):
        opt.zero_grad()
        x, y = global_batch(t, 2, **shape) if rank is None else batch(t, rank, **shape)
        loss_fn(model, x, y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _f32_worker(rank: int, world_size: int) -> dict[str, list[torch.Tensor]]:
    return {m: _f32_run(rank, m) for m in ("polar_express_eigh", "polar_express")}


def test_float32_eigh_route_reproduces_one_process_far_better_than_the_iteration(tmp_path: Path) -> None:
    """In float32, W = 2 and one process differ in G at float32 rounding; the Polar Express map by a
    float64 eigendecomposition (the default for float32 Grams on a CPU; asked for by name here, as the
    iteration is) passes that on as float32 noise, while the float32 matmul iteration amplifies
    it on these rank-deficient Grams (measured max |diff| 2.5e-4 vs 2.2e-2 on parameters of size ~0.8, on
    a Xeon with AMX; 1.8e-4 vs 5.2e-4 on an AMD EPYC with AVX2, whose float32 matmuls round differently).
    Guards the reason the default is what it is where it pays: never worse, within 2e-3."""
    results = run_distributed(_f32_worker, 2, tmp_path)
    diffs = {}
    for m in ("polar_express_eigh", "polar_express"):
        ref = _f32_run(None, m)
        diffs[m] = max_abs_diff([a for res in results for a in res[m]], [b for _ in results for b in ref])
    assert diffs["polar_express_eigh"] <= 2e-3, diffs
    assert diffs["polar_express_eigh"] * 2 <= diffs["polar_express"], diffs


FUSED_QKV = {"qkv.weight": 3}


def _frozen_fused_run(rank: int | None, world: int, route: str, sd: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
    """ASGO (ASGO_KW: blocks split over the ranks) with ``fused`` over a :class:`QKVNet` whose fused projection is
    frozen at construction (``named``: given to the constructor; ``walk``: left out by asgo_param_groups and
    added as one group of bare tensors once unfrozen, as BaseFinetuning does): 2 steps frozen, then 2 unfrozen
    (``sd`` None), or, from ``sd``, built as the first, unfrozen, loaded and 2 steps more. ``rank=None``: one
    process on the global batch of ``world`` ranks. Returns the parameters, ``fused_parts`` of the qkv's group,
    the qkv's blocks and the consolidated state (rank 0)."""
    model, _ = qkv_pair()
    set_qkv_trainable(model, False)
    extra: dict[str, Any] = {} if rank is None else {"grad_reduction": "mean"}
    groups = list(model.named_parameters()) if route == "named" else asgo_param_groups(model)
    opt = ASGO(groups, fused=FUSED_QKV, **ASGO_KW, **extra)

    def train(ts: range) -> None:
        for t in ts:
            opt.zero_grad()
            loss_fn(model, *(global_batch(t, world) if rank is None else batch(t, rank))).backward()
            opt.step()

    def unfreeze() -> None:
        ps = set_qkv_trainable(model, True)
        if route == "walk":
            opt.add_param_group({"params": ps})

    if sd is None:
        train(range(2))
        unfreeze()
        train(range(2, 4))
    else:
        model.load_state_dict(sd["model"])
        unfreeze()
        opt.load_state_dict(sd["optim"])
        train(range(4, 6))
    qkv = next(i for i, p in enumerate(opt._params) if p is model.qkv.weight)
    gi = opt.block_table.by_param[qkv][0].group_index
    opt.consolidate_state_dict(to=None)  # sharded ranks: state_dict() is then the gathered state
    state = {"model": model.state_dict(), "optim": opt.state_dict()} if not rank else None
    return {"params": [p.detach().clone() for p in model.parameters()], "state": state,
            "fused_parts": opt.param_groups[gi].get("fused_parts"),
            "blocks": [b.shape for b in opt.block_table.by_param[qkv]]}


def _frozen_fused_worker(rank: int, world_size: int) -> dict[str, Any]:
    return {route: _frozen_fused_run(rank, world_size, route) for route in ("named", "walk")}


def test_a_fused_matrix_frozen_at_construction_steps_as_its_parts_at_two_ranks_and_resumes_at_one(
        tmp_path: Path) -> None:
    """The parts of a fused QKV frozen at construction (or added later) are decided from names and shapes
    alone and saved with its group: W = 2 steps it as its 3 parts as one process does, on the global batch
    (float64: only the gradient sums' order differs), and the consolidated state of W = 2 resumes at W = 1
    over the same parts, continuing as the one-process run."""
    results = run_distributed(_frozen_fused_worker, 2, tmp_path, timeout=120)
    for route in ("named", "walk"):
        ref = _frozen_fused_run(None, 2, route)
        assert ref["blocks"] == [(3, 5)] * 3 and ref["fused_parts"] == (((2, 3),) if route == "named" else ((0, 3),))
        for r, res in enumerate(results):
            got = res[route]
            assert got["blocks"] == ref["blocks"] and got["fused_parts"] == ref["fused_parts"], (route, r)
            for a, b in zip(got["params"], ref["params"]):
                torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=lambda m, r=r: f"{route}, rank {r}: {m}")
        resumed = _frozen_fused_run(None, 2, route, sd=results[0][route]["state"])
        assert resumed["blocks"] == ref["blocks"] and resumed["fused_parts"] == ref["fused_parts"]
        for a, b in zip(resumed["params"], _frozen_fused_run(None, 2, route, sd=ref["state"])["params"]):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=lambda m: f"{route}, resumed at W=1: {m}")
