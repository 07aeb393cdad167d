"""FSDP2 units whose gradients are reduced in another order on some ranks, on real gloo ranks.

FSDP2 reduce-scatters each ``fully_shard`` unit's gradient when its backward ends; the collectives pair up by
their order. Where the forward ran the units in another order on some ranks (both heads of a model, each rank's
batch taking them in its own order; or a gradient accumulation whose micro-batches take a branch each, in another
order per rank), every unit ran on every rank, every parameter got a gradient, and each reduce-scatter met another
unit's: the gradients written were mixtures, and every optimizer (torch's too) stepped on them silently, 0.05-0.2
away from the one-process run. The step now compares the order on every rank and refuses it, nothing changed.
The same model with one order on every rank (gradient accumulation under ``set_requires_gradient_sync(False)``,
a head per micro-batch) equals the one-process float64 run, and so does a head per rank where both heads are in
one unit that reduces its unused parameters as zeros (``set_reduce_scatter_unused_params(True)``, the error's
other cure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.fsdp2 import _workers as W
from tests.harness.distributed import run_distributed
from tests.harness.models import loss_fn, tiny_mlp

OPTIMIZERS = W.OPTIMIZER_CASES  # (tall weights: ASGO's side is the unsharded choice)


class _Heads(nn.Module):
    """A trunk and two heads of one shape; ``order`` says which head the forward builds first (``"bc"``,
    ``"cb"``) or that it takes one head only (``"b"``, ``"c"``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = tiny_mlp(sizes=(3, 5)), tiny_mlp(1, sizes=(5, 9)), tiny_mlp(2, sizes=(5, 9))
        self.order = "bc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if len(self.order) == 1:
            return getattr(self, self.order)(h)
        first, second = (getattr(self, k) for k in self.order)
        y = first(h)
        return y + second(h)


def _sharded(world_size: int, heads_in_root: bool = False) -> _Heads:
    """Each part its own unit; or (``heads_in_root``) the heads in the root's unit, whose unused parameters
    FSDP2 then reduces as zeros (``set_reduce_scatter_unused_params``)."""
    from torch.distributed.fsdp import fully_shard

    model, mesh = _Heads(), W.make_mesh(world_size, False)
    for sub in (model.a,) if heads_in_root else (model.a, model.b, model.c):
        fully_shard(sub, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if heads_in_root:
        model.set_reduce_scatter_unused_params(True)  # type: ignore[operator]
    return model


def _accumulate(model: Any, opt: Any, micro: list[tuple[str, torch.Tensor, torch.Tensor]], fsdp: bool) -> None:
    """One step over ``micro`` (order, x, y); under FSDP2 the gradient sync is left off but for the last."""
    opt.zero_grad()
    total = torch.zeros((), dtype=torch.float64)
    for i, (order, x, y) in enumerate(micro):
        model.order = order
        if fsdp:
            model.set_requires_gradient_sync(i == len(micro) - 1)
        loss = loss_fn(model, x, y) / len(micro)
        loss.backward()
        total += loss.detach()
    W.hand_loss(opt, total)
    opt.step()


def _micro(step: int, orders: tuple[str, ...], rank: int, world_size: int) -> list[tuple[str, Any, Any]]:
    return [(o, *W.local_batch(10 * step + m, (3, 9), rank, world_size)) for m, o in enumerate(orders)]


def _reference(cls: type, kw: dict[str, Any], per_rank: bool) -> list[torch.Tensor]:
    """The one-process run of :func:`_orders`'s first steps: three steps of micro-batches b then c, or
    (``per_rank``) two steps whose rows of rank 0 take head b and those of rank 1 head c."""
    model = _Heads()
    opt = cls(model.named_parameters(), **kw)
    for t in range(2 if per_rank else 3):
        micro = ([(o, *W.local_batch(t, (3, 9), r, 2)) for r, o in enumerate("bc")] if per_rank
                 else _micro(t, ("b", "c"), 0, 1))
        _accumulate(model, opt, micro, fsdp=False)
    return [p.detach().clone() for p in model.parameters()]


def _orders(rank: int, world_size: int) -> dict[str, Any]:
    """Per optimizer: three accumulated steps with one order on every rank; then a step whose heads ran in
    another order on rank 1 (both heads in one forward), one whose micro-batches took the heads in another order
    on rank 1; then a step with one order again."""
    out: dict[str, Any] = {}
    for name, cls, kw, _ in OPTIMIZERS:
        model = _sharded(world_size)
        opt = cls(model.named_parameters(), **kw)
        for t in range(3):
            _accumulate(model, opt, _micro(t, ("b", "c"), rank, world_size), fsdp=True)
        res: dict[str, Any] = {"one_order": W.full_params(model)}
        swapped = {"forward": (("bc",) if rank == 0 else ("cb",)),
                   "micro_batches": (("b", "c") if rank == 0 else ("c", "b"))}
        for what, orders in swapped.items():
            before = [p.to_local().clone() for p in model.parameters()]  # type: ignore[operator]
            res[what] = W.expect_error(lambda: _accumulate(model, opt, _micro(3, orders, rank, world_size), True))
            res[what + "_unchanged"] = all(torch.equal(b, p.to_local())  # type: ignore[operator]
                                           for b, p in zip(before, model.parameters()))
            res[what + "_retry"] = W.expect_error(opt.step)  # (the same mixed gradients: refused again)
        _accumulate(model, opt, _micro(3, ("b", "c"), rank, world_size), fsdp=True)
        res["steps"] = opt.num_steps
        model = _sharded(world_size, heads_in_root=True)  # a head per rank, in one unit: equals one process
        opt = cls(model.named_parameters(), **kw)
        for t in range(2):
            _accumulate(model, opt, [("bc"[rank], *W.local_batch(t, (3, 9), rank, world_size))], fsdp=True)
        res["per_rank_in_root"] = W.full_params(model)
        out[name] = res
    return out


#: the orders each refusal names (autograd runs the head built last first; a unit that ran in an earlier micro-batch
#: only is reduced at the end of the backward)
ORDERS = {"forward": "rank(s) [1] differ from rank 0 (rank 0: 'c', 'b', 'a'; rank 1: 'b', 'c', 'a')",
          "micro_batches": "rank(s) [1] differ from rank 0 (rank 0: 'c', 'a', 'b'; rank 1: 'b', 'a', 'c')"}


def test_units_reduced_in_another_order_on_some_ranks_are_refused_on_every_rank(tmp_path: Path) -> None:
    results = run_distributed(_orders, 2, tmp_path, timeout=300)
    for name, cls, kw, _ in OPTIMIZERS:
        refs = {"one_order": _reference(cls, kw, False), "per_rank_in_root": _reference(cls, kw, True)}
        for r, res in enumerate(results):
            got = res[name]
            for run, ref in refs.items():
                for i, (a, b) in enumerate(zip(got[run], ref, strict=True)):
                    torch.testing.assert_close(a, b, atol=1e-10, rtol=0,
                                               msg=lambda m: f"{name} {run} rank {r} param {i}: {m}")
            for what in ("forward", "micro_batches"):
                said = got[what]
                assert "reduced the gradients of its fully_shard units in another order" in said, (name, r, what, said)
                assert ORDERS[what] in said, (name, r, what, said)
                assert got[what + "_unchanged"], (name, r, what)
                assert got[what + "_retry"] == said, (name, r, what, got[what + "_retry"])
            assert got["steps"] == 4, (name, r, got["steps"])


class _Deep(nn.Module):
    """``pre``, two branches of one shape in ``order``, then a chain of :data:`DEEP` units: backward reduces the
    chain first, so the branches' swap comes after the first 12 reductions (a refusal used to keep 12 names)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.b, self.c = tiny_mlp(sizes=(3, 3)), tiny_mlp(1, sizes=(3, 4)), tiny_mlp(2, sizes=(3, 4))
        self.chain = nn.ModuleList(tiny_mlp(3 + i, sizes=(4, 4)) for i in range(DEEP))
        self.order = "bc"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        first, second = (getattr(self, k) for k in self.order)
        h = first(h) + second(h)
        for unit in self.chain:
            h = torch.tanh(unit(h))
        return h


DEEP = 14


def _late_swap(rank: int, world_size: int) -> dict[str, Any]:
    """A step with one order, then one whose branches ran in another order on rank 1 (after 14 reductions)."""
    from torch.distributed.fsdp import fully_shard

    model, mesh = _Deep(), W.make_mesh(world_size, False)
    for sub in (model.pre, model.b, model.c, *model.chain):
        fully_shard(sub, mesh=mesh)
    fully_shard(model, mesh=mesh)
    name, cls, kw, _ = OPTIMIZERS[1]
    opt = cls(model.named_parameters(), **kw)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    res = {"one_order": W.expect_error(lambda: _accumulate(model, opt, [("bc", x, y)], fsdp=True))}
    res["swapped"] = W.expect_error(lambda: _accumulate(model, opt, [("bc" if rank == 0 else "cb", x, y)], True))
    return res


def test_a_swap_after_many_units_is_refused_as_an_order_naming_the_swapped_units(tmp_path: Path) -> None:
    """Not as a difference of hyperparameters: the refusal names the units around the first difference."""
    results = run_distributed(_late_swap, 2, tmp_path, timeout=300)
    for r, res in enumerate(results):
        assert res["one_order"] == "no error", (r, res["one_order"])
        said = res["swapped"]
        assert "reduced the gradients of its fully_shard units in another order" in said, (r, said)
        assert ("rank(s) [1] differ from rank 0 at reduction 15 (from reduction 13 on: rank 0: ..., "
                "'chain.1', 'chain.0', 'c', 'b', 'pre'; rank 1: ..., 'chain.1', 'chain.0', 'b', 'c', 'pre')") in said, (
            r, said)


def _other_optimizer(rank: int, world_size: int) -> dict[str, Any]:
    """Ours over the trunk, torch's AdamW over the heads (each head its own unit on the same mesh), the heads run
    in another order on rank 1: ours refuses, although none of its own units moved in the order."""
    model = _sharded(world_size)
    named = dict(model.named_parameters())
    name, cls, kw, _ = OPTIMIZERS[1]
    ours = cls([(n, p) for n, p in named.items() if n.startswith("a.")], **kw)
    theirs = torch.optim.AdamW([p for n, p in named.items() if not n.startswith("a.")], lr=1e-2)
    x, y = W.local_batch(0, (3, 9), rank, world_size)

    def step(order: str) -> str:
        ours.zero_grad()
        theirs.zero_grad()
        model.order = order
        loss_fn(model, x, y).backward()
        return W.expect_error(ours.step)

    return {"one_order": step("bc"), "swapped": step("bc" if rank == 0 else "cb")}


def test_units_of_another_optimizer_on_the_same_mesh_are_compared_too(tmp_path: Path) -> None:
    results = run_distributed(_other_optimizer, 2, tmp_path, timeout=300)
    for r, res in enumerate(results):
        assert res["one_order"] == "no error", (r, res["one_order"])
        assert ORDERS["forward"] in res["swapped"], (r, res["swapped"])
