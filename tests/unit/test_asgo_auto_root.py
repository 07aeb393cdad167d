"""ASGO ``root_every="auto"``: a block's root is recomputed when its statistic moved by more than
``root_tol`` (relative Frobenius change since the last root) or ``root_max_every`` steps passed.

The decision is the owner's, from the block's own state: the same at every world size (checked against
one process on real gloo ranks) and across a checkpoint taken at one W and resumed at another.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_soaa import ASGO
from lightning_soaa.optim import asgo as asgo_mod
from tests.conformance.test_checkpoint_validation import _without
from tests.harness.distributed import run_distributed
from tests.harness.models import batch, loss_fn, tiny_mlp

KW: dict[str, Any] = dict(lr=2e-2, max_block_size=4, damping=1e-6)  # split blocks, several batches


def _run(model: Any, opt: ASGO, start: int, steps: int) -> None:
    for t in range(start, start + steps):
        x, y = batch(t, 0)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()


def _trained(steps: int = 8, **kw: Any) -> tuple[Any, ASGO]:
    model = tiny_mlp()
    opt = ASGO(model.named_parameters(), **{**KW, **kw})
    _run(model, opt, 0, steps)
    return model, opt


@pytest.mark.parametrize("kwargs,msg", [
    (dict(root_every="sometimes"), "root_every='sometimes'"),
    (dict(root_every=0), "root_every=0"),
    (dict(root_every="auto", root_tol=-0.1), "root_tol"),
    (dict(root_every="auto", root_max_every=0), "root_max_every=0"),
])
def test_bad_options(kwargs: dict[str, Any], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        ASGO(tiny_mlp().named_parameters(), **kwargs)


@pytest.mark.parametrize("auto,fixed", [
    (dict(root_tol=0.0), dict(root_every=1)),  # any change triggers a root: every step
    (dict(root_tol=1e30, root_max_every=3), dict(root_every=3)),  # never by change: every 3rd step
])
def test_auto_limits_equal_fixed_schedules(auto: dict[str, Any], fixed: dict[str, Any]) -> None:
    m_auto, o_auto = _trained(root_every="auto", **auto)
    m_fix, o_fix = _trained(**fixed)
    for a, b in zip(m_auto.parameters(), m_fix.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert o_auto.statistics()["asgo_roots_computed"] == o_fix.statistics()["asgo_roots_computed"]


def test_auto_skips_roots_when_the_statistic_is_steady(monkeypatch: Any) -> None:
    """Each recomputation happens exactly when the rule says, judged from the stored V_root."""
    model = tiny_mlp()
    opt = ASGO(model.named_parameters(), **KW, root_every="auto", root_tol=0.3, root_max_every=4)
    decisions: list[list[bool]] = []
    real = ASGO._roots_due

    def spy(self: ASGO, views: list[Any], counts: list[float]) -> list[Any]:
        expected = []
        for v in views:
            st = v.state
            if asgo_mod.INV_ROOT not in st:
                expected.append(True)
                continue
            change = torch.linalg.matrix_norm(st["gram"] - st["gram_at_root"])
            ref = torch.linalg.matrix_norm(st["gram_at_root"])
            expected.append(bool(change > 0.3 * ref) or int(st["step"] - st["root_step"]) >= 4)
        assert counts == [float(v.state["step"]) for v in views]  # the advanced counters, known on the host
        due = real(self, views, counts)
        got = [any(v is d for d in due) for v in views]
        assert got == expected
        decisions.append(got)
        return due

    monkeypatch.setattr(ASGO, "_roots_due", spy)
    _run(model, opt, 0, 12)
    flat = [d for step in decisions[1:] for d in step]
    assert any(flat) and not all(flat)  # some roots skipped, some taken after step 1
    n_blocks = len(decisions[0])
    assert n_blocks < opt.statistics()["asgo_roots_computed"] < 12 * n_blocks


def test_auto_resume_equals_uninterrupted() -> None:
    m_ref, _ = _trained(steps=9, root_every="auto", root_tol=0.2)
    m1, o1 = _trained(steps=4, root_every="auto", root_tol=0.2)
    sd, model_sd = copy.deepcopy(o1.state_dict()), copy.deepcopy(m1.state_dict())
    m2 = tiny_mlp(seed=5)
    m2.load_state_dict(model_sd)
    o2 = ASGO(m2.named_parameters(), **KW, root_every="auto", root_tol=0.2)
    o2.load_state_dict(sd)
    _run(m2, o2, 4, 5)
    for a, b in zip(m_ref.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _ranks(rank: int, world: int, sd: Any, model_sd: Any, start: int, steps: int) -> dict[str, Any]:
    model = tiny_mlp()
    if model_sd is not None:
        model.load_state_dict(model_sd)
    opt = ASGO(model.named_parameters(), **KW, root_every="auto", root_tol=0.2)
    if sd is not None:
        opt.load_state_dict(sd)
    _run(model, opt, start, steps)  # the same batch on every rank: gradients as DDP would leave them
    opt.consolidate_state_dict(to=None)
    return {"params": [p.detach().clone() for p in model.parameters()], "sd": opt.state_dict(),
            "model_sd": copy.deepcopy(model.state_dict()), "owned": len(opt.block_table.owned())}


def test_auto_w2_equals_one_process_and_resumes_at_w1(tmp_path: Any) -> None:
    m_ref, _ = _trained(steps=9, root_every="auto", root_tol=0.2)
    m4, _ = _trained(steps=4, root_every="auto", root_tol=0.2)
    results = run_distributed(_ranks, 2, tmp_path, None, None, 0, 4)
    assert all(r["owned"] > 0 for r in results)
    for res in results:
        for a, b in zip(res["params"], m4.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a W=2 checkpoint resumed by one process continues exactly as the uninterrupted run
    final = _ranks(0, 1, results[0]["sd"], results[0]["model_sd"], 4, 5)
    for a, b in zip(final["params"], m_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_auto_root_without_its_step_is_due_at_every_world_size(tmp_path: Any) -> None:
    """A checkpoint whose blocks keep ``gram_at_root`` without ``root_step`` (the schema allows each on its own)
    loaded, then the step raised KeyError after the statistics were written (a reviewer's case). A root with no
    recorded step is due now, as one with no recorded statistic is: the same steps as with both keys removed,
    on each of two ranks as in one process."""
    m4, o4 = _trained(steps=4, root_every="auto", root_tol=0.2)
    sd, model_sd = copy.deepcopy(o4.state_dict()), copy.deepcopy(m4.state_dict())
    assert any("gram_at_root" in blk for per_param in sd["state"].values() for blk in per_param.values())
    one = _ranks(0, 1, _without(sd, {"root_step"}), model_sd, 4, 3)
    both = _ranks(0, 1, _without(sd, {"root_step", "gram_at_root"}), model_sd, 4, 3)
    results = run_distributed(_ranks, 2, tmp_path, _without(sd, {"root_step"}), model_sd, 4, 3)
    assert all(r["owned"] > 0 for r in results)
    for res in [one, *results]:
        for a, b in zip(res["params"], both["params"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_batched_roots_fall_back_per_block(monkeypatch: Any) -> None:
    """Two equal-shaped blocks share one batched root; a non-finite result in one of them keeps that
    block's previous P (counted) and leaves the other block's new root in place."""
    def make() -> tuple[list[torch.nn.Parameter], ASGO]:
        g = torch.Generator().manual_seed(0)
        ws = [torch.nn.Parameter(torch.randn(3, 6, dtype=torch.float64, generator=g)) for _ in range(2)]
        return ws, ASGO(ws, lr=1e-2)

    def step(ws: list[torch.nn.Parameter], opt: ASGO, t: int) -> None:
        g = torch.Generator().manual_seed(100 + t)
        for w in ws:
            w.grad = torch.randn(3, 6, dtype=torch.float64, generator=g)
        opt.step()

    ws_ref, ref = make()
    ws, opt = make()
    real = asgo_mod.pending_inverse_sqrt
    calls: list[int] = []

    def poison_second_block_once(v: torch.Tensor, *a: Any, **k: Any) -> Any:
        calls.append(v.shape[0])
        pending = real(v, *a, **k)
        if len(calls) == 2:
            out = pending.roots.clone()
            out[1] = float("nan")
            pending = dataclasses.replace(pending, roots=out)
        return pending

    step(ws_ref, ref, 0)
    step(ws_ref, ref, 1)
    monkeypatch.setattr(asgo_mod, "pending_inverse_sqrt", poison_second_block_once)
    step(ws, opt, 0)
    p_before = opt.state[ws[1]]["inv_root"].clone()
    step(ws, opt, 1)
    assert calls == [2, 2]  # one batch of both blocks per step
    torch.testing.assert_close(opt.state[ws[0]]["inv_root"], ref.state[ws_ref[0]]["inv_root"], rtol=0, atol=0)
    torch.testing.assert_close(opt.state[ws[1]]["inv_root"], p_before, rtol=0, atol=0)
    assert int(opt.state[ws[1]]["root_fallbacks"]) == 1 and int(opt.state[ws[0]]["root_fallbacks"]) == 0


class _LiveBytes(TorchDispatchMode):
    """The most bytes of the tensors made under it alive at once (each output counted until it is freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def _freed(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor):
                n = t.numel() * t.element_size()
                self.live += n
                weakref.finalize(t, self._freed, n)
        self.peak = max(self.peak, self.live)
        return out


def test_auto_decision_holds_a_bounded_part_of_the_grams(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deciding the roots due holds at most ``_AUTO_CHANGE_BYTES`` of differences ``V - V_root`` at once (one
    block's where a block is larger), not a second copy of every Gram the rank owns: all blocks' differences at
    once were made by one multi-tensor subtraction (8 blocks of 32 x 32 here: 8x one block's). The decisions
    are those of one chunk of all blocks."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(32, 48) * 0.1) for _ in range(8)]
    opt = ASGO([(f"w{i}", p) for i, p in enumerate(params)], lr=1e-2, root_every="auto", root_tol=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    views = [v for v in opt._owned_views() if "gram_at_root" in v.state]
    assert len(views) == 8
    for i in (1, 4, 5):  # their statistics moved since their roots (by 10% and 3%: due and not)
        views[i].state["gram"].mul_(1.1 if i < 5 else 1.03)
    counts = [float(v.state["step"]) + 1 for v in views]
    block = 32 * 32 * 4
    monkeypatch.setattr(asgo_mod, "_AUTO_CHANGE_BYTES", 1 << 40, raising=False)
    whole = asgo_mod._auto_roots_due(views, counts)
    monkeypatch.setattr(asgo_mod, "_AUTO_CHANGE_BYTES", 2 * block, raising=False)
    with _LiveBytes() as mem:
        chunked = asgo_mod._auto_roots_due(views, counts)
    assert chunked == whole == [i in (1, 4) for i in range(8)], whole
    assert mem.peak <= 2 * block + 1024, (mem.peak, block)
