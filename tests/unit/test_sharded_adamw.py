"""ShardedOptimizer on one process, through its simplest concrete subclass: ShardedAdamW.

What every optimizer guarantees (state_dict round trips, rejected checkpoints, non-finite steps, step
hooks, copies, validation naming the field) is checked in tests/conformance; this file keeps AdamW's
oracle (torch.optim.AdamW), its pinned messages and base-class behaviours exercised through it.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from lightning_soaa.optim.adamw import ShardedAdamW
from tests.harness.models import batch, loss_fn, tiny_mlp


def _train(model, opt, steps, start=0, closure=False):
    for t in range(start, start + steps):
        x, y = batch(t, 0)
        if closure:
            def c():
                opt.zero_grad()
                loss = loss_fn(model, x, y)
                loss.backward()
                return loss
            opt.step(c)
        else:
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.step()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_matches_torch_adamw(dtype, tol):
    m1 = tiny_mlp(dtype=dtype)
    m2 = copy.deepcopy(m1)
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1)
    o1 = ShardedAdamW(m1.parameters(), **kw)
    o2 = torch.optim.AdamW(m2.parameters(), **kw)
    for t in range(30):
        x, y = batch(t, 0, dtype=dtype)
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            loss_fn(m, x, y).backward()
            o.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_param_groups_scheduler_closure_and_named_params():
    m1 = tiny_mlp()
    m2 = copy.deepcopy(m1)
    named = list(m1.named_parameters())
    groups1 = [{"params": named[:2], "lr": 1e-2}, {"params": named[2:], "weight_decay": 0.0}]
    o1 = ShardedAdamW(groups1, lr=5e-2)
    p2 = list(m2.parameters())
    o2 = torch.optim.AdamW([{"params": p2[:2], "lr": 1e-2}, {"params": p2[2:], "weight_decay": 0.0}],
                           lr=5e-2, weight_decay=1e-2)
    assert o1.param_groups[0]["param_names"] == [n for n, _ in named[:2]]
    s1 = torch.optim.lr_scheduler.StepLR(o1, step_size=3, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=3, gamma=0.5)
    for t in range(10):
        x, y = batch(t, 0)

        def closure():
            o1.zero_grad()
            loss = loss_fn(m1, x, y)
            loss.backward()
            return loss
        loss = o1.step(closure)
        assert torch.is_tensor(loss)
        o2.zero_grad()
        loss_fn(m2, x, y).backward()
        o2.step()
        s1.step()
        s2.step()
    assert o1.param_groups[0]["lr"] == pytest.approx(o2.param_groups[0]["lr"])
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, atol=1e-14, rtol=0)


def test_add_param_group_after_construction():
    m = tiny_mlp()
    params = list(m.parameters())
    opt = ShardedAdamW(params[:2], lr=1e-2)
    _train(m, opt, 2)
    opt.add_param_group({"params": params[2:], "lr": 1e-3})
    _train(m, opt, 2, start=2)
    assert len(opt.block_table.blocks) == len(params)
    assert float(opt.state[params[0]]["step"]) == 4.0
    assert float(opt.state[params[-1]]["step"]) == 2.0


def test_add_param_group_interrupted_in_its_checks_leaves_the_optimizer_unchanged(monkeypatch):
    """A Ctrl+C (a BaseException) inside add_param_group's own checks left the group appended over the old
    block table (the refusal path caught Exception only)."""
    m = tiny_mlp()
    params = list(m.parameters())
    opt = ShardedAdamW(params[:2], lr=1e-2)

    def interrupted(group):
        raise KeyboardInterrupt
    monkeypatch.setattr(opt, "_validate_group", interrupted)
    with pytest.raises(KeyboardInterrupt):
        opt.add_param_group({"params": params[2:]})
    assert len(opt.param_groups) == 1
    monkeypatch.undo()
    _train(m, opt, 1)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lr": -1.0}, "Invalid lr=-1.0. Must be in [0.0, inf)."),
        ({"betas": (0.9, 1.0)}, "Invalid betas[1]=1.0. Must be in [0.0, 1.0)."),
        ({"betas": (1.5, 0.9)}, "Invalid betas[0]=1.5. Must be in [0.0, 1.0)."),
        ({"betas": 0.9}, "Invalid betas=0.9. Must be a pair (beta1, beta2)."),
        ({"eps": float("nan")}, "Invalid eps=nan. Must be in [1.1754943508222875e-38, inf) "
     "(float32's smallest normal number: a smaller eps rounds to 0 in float32, where 0 / (0 + eps) is NaN)."),
        ({"eps": 1e-50}, "Invalid eps=1e-50. Must be in [1.1754943508222875e-38, inf) "),
        ({"weight_decay": -0.1}, "Invalid weight_decay=-0.1. Must be in [0.0, inf)."),
    ],
)
def test_invalid_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ShardedAdamW(tiny_mlp().parameters(), **kwargs)


def test_grad_none_params_are_skipped():
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)).double()
    opt = ShardedAdamW(m.parameters(), lr=1e-2)
    m[1](torch.randn(2, 3, dtype=torch.float64)).sum().backward()
    w0 = m[0].weight.detach().clone()
    opt.step()
    assert torch.equal(w0, m[0].weight)
    assert m[0].weight not in opt.state or not opt.state[m[0].weight]


# ---------------------------------------------------------------- the fused CPU kernel and its guard
def _adamw_reference(p, g, steps, lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, wd=0.1):
    """AdamW written out in float64 (torch's documented update), for ``steps`` steps of gradient ``g``."""
    p, m, v = p.double().clone(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
    g = g.double()
    for t in range(1, steps + 1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr / (1 - b1**t) * m / ((v / (1 - b2**t)).sqrt() + eps)
    return p


@pytest.mark.parametrize("view", ["whole", "rows", "columns"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_update_of_contiguous_and_strided_slices_matches_the_reference(view, dtype, tol, monkeypatch):
    """Every layout takes torch's fused CPU kernel (counted), a strided slice on contiguous copies written
    back (on the slice itself the kernel would update it wrongly, silently): each follows the written-out
    float64 update, and nothing outside the slice is written."""
    from lightning_soaa.functional import adamw as F

    calls = []
    fused = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: (calls.append(1), fused(*a, **k))[1])
    g0 = torch.Generator().manual_seed(3)
    orig, grad = torch.randn(12, 10, generator=g0, dtype=dtype), torch.randn(12, 10, generator=g0, dtype=dtype)
    index = {"whole": (slice(None),), "rows": (slice(2, 9),), "columns": (slice(None), slice(3, 8))}[view]
    full = orig.clone()
    p, g = full[index], grad[index]
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.zeros(())
    for _ in range(3):
        F.adamw_update_([p], [g], [m], [v], [step], lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    torch.testing.assert_close(p.double(), _adamw_reference(orig[index], g, 3), rtol=tol, atol=tol)
    assert step.item() == 3.0
    assert len(calls) == 3
    untouched = torch.ones(12, 10, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(full[untouched], orig[untouched])  # nothing outside the slice was written


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_every_parameter_the_update_writes_moves_its_version_counter(dtype):
    """torch's fused CPU kernel writes θ without moving its version counter: a graph that saved θ before the step
    then backpropagated at the stepped θ silently. Each θ of a call (whole, a row block, a column slice: the
    kernel's direct path and its contiguous copies) moves, as under the foreach ops; a backward through it refuses."""
    from lightning_soaa.functional import adamw as F

    g0 = torch.Generator().manual_seed(11)
    full = torch.randn(6, 5, generator=g0).to(dtype).requires_grad_()
    with torch.no_grad():
        ps = [full[:2], full[2:][:, 1:4], torch.randn(3, generator=g0).to(dtype)]
    graph = (full * full).sum()
    before = [p._version for p in ps]
    with torch.no_grad():  # (as the optimizers' steps run)
        F.adamw_update_(ps, [torch.ones_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
                        [torch.zeros_like(p) for p in ps], [torch.zeros(()) for _ in ps], lr=1e-2, beta1=0.9,
                        beta2=0.99, eps=1e-8, weight_decay=0.1)
    assert all(p._version > b for p, b in zip(ps, before))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        graph.backward()


def test_a_torch_without_the_fused_cpu_kernel_takes_the_foreach_ops(monkeypatch):
    """Where the dispatcher refuses the fused kernel on CPU (an older torch), the foreach ops do the
    step: the same update, nothing applied twice."""
    from lightning_soaa.functional import adamw as F

    def refuse(*a, **k):
        raise NotImplementedError("Could not run 'aten::_fused_adamw_' with arguments from the 'CPU' backend")

    g0 = torch.Generator().manual_seed(5)
    orig, grad = torch.randn(6, 4, generator=g0, dtype=torch.float64), torch.randn(6, 4, generator=g0,
                                                                                     dtype=torch.float64)
    out = []
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(torch, "_fused_adamw_", refuse)
        p, m, v, step = orig.clone(), torch.zeros(6, 4, dtype=torch.float64), torch.zeros(6, 4, dtype=torch.float64), \
            torch.zeros(())
        for _ in range(2):
            F.adamw_update_([p, p[:0]], [grad, grad[:0]], [m, m[:0]], [v, v[:0]], [step, step.clone()], lr=1e-2,
                            beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
        out.append(p)
    torch.testing.assert_close(out[1], _adamw_reference(orig, grad, 2), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(out[0], out[1], rtol=1e-14, atol=1e-14)


def test_float16_on_the_foreach_ops_steps_in_float32(monkeypatch):
    """The foreach ops (a GPU, or a torch without the fused CPU kernel) on float16 tensors with small
    gradients: in float16 eps = 1e-8 is 0 and v underflows, so the update was inf/NaN. They step in
    float32 and are stored back (as the fused kernel computes), next to a float32 tensor in one call."""
    from lightning_soaa.functional import adamw as F

    def refuse(*a, **k):
        raise NotImplementedError("Could not run 'aten::_fused_adamw_' with arguments from the 'CPU' backend")

    monkeypatch.setattr(torch, "_fused_adamw_", refuse)
    g0 = torch.Generator().manual_seed(9)
    orig, grad = torch.randn(8, 3, generator=g0), torch.randn(8, 3, generator=g0) * 1e-4
    p16, p32 = orig.half(), orig.clone()
    m16, v16, m32, v32 = (torch.zeros(8, 3, dtype=d) for d in (torch.float16,) * 2 + (torch.float32,) * 2)
    steps = [torch.zeros(()), torch.zeros(())]
    for _ in range(3):
        F.adamw_update_([p16, p32], [grad.half(), grad], [m16, m32], [v16, v32], steps, lr=1e-3, beta1=0.9,
                        beta2=0.999, eps=1e-8, weight_decay=0.0)
    assert torch.isfinite(p16).all()
    torch.testing.assert_close(p16.float(), p32, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(p32.double(), _adamw_reference(orig.double(), grad.double(), 3, wd=0.0, lr=1e-3,
                                                              b2=0.999), rtol=1e-5, atol=1e-6)


def test_the_fused_kernel_is_chosen_per_tensor(monkeypatch):
    """A call mixing a contiguous tensor and a column slice: both take the fused kernel, each with the
    bits it gets alone, the slice those of its contiguous copy (a tensor's result does not depend on
    its layout or on the tensors it shares a call with); both follow the reference."""
    from lightning_soaa.functional import adamw as F

    seen = []
    fused = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda p, *a, **k: (seen.append(len(p)), fused(p, *a, **k))[1])
    g0 = torch.Generator().manual_seed(7)
    w, gw = torch.randn(5, 4, generator=g0), torch.randn(5, 4, generator=g0)
    big, gbig = torch.randn(6, 6, generator=g0), torch.randn(6, 6, generator=g0)

    def run(tensors, sliced=True):
        ps = [t.clone() for t, _ in tensors]
        views = [p if i == 0 or not sliced else p[:, 1:4] for i, p in enumerate(ps)]
        grads = [g if i == 0 or not sliced else g[:, 1:4] for i, (_, g) in enumerate(tensors)]
        ms, vs = [torch.zeros_like(x) for x in views], [torch.zeros_like(x) for x in views]
        steps = [torch.zeros(()) for _ in views]
        for _ in range(3):
            F.adamw_update_(views, grads, ms, vs, steps, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
        return views

    mixed = run([(w, gw), (big, gbig)])
    assert seen == [2, 2, 2]  # one call a step, both tensors
    assert torch.equal(mixed[0], run([(w, gw)])[0])
    copy = run([(big[:, 1:4].contiguous(), gbig[:, 1:4].contiguous())], sliced=False)
    assert torch.equal(mixed[1], copy[0])
    torch.testing.assert_close(mixed[1].double(), _adamw_reference(big[:, 1:4], gbig[:, 1:4], 3), rtol=1e-6, atol=1e-6)


def test_a_state_recut_on_load_keeps_no_state_for_a_parameter_that_never_stepped():
    """Reviewer: a state dict shows zeros for a trainable parameter without state (for torch's DCP,
    optim/dcp_plain.py); loaded by an optimizer with other row blocks, the zeros were not recognised (the
    check compared them with this optimizer's blocks, before the re-cut) and became six step-0 blocks of
    real state. They are left out, and the run continues as the saved one."""
    import copy

    from lightning_soaa.optim.adamw import ShardedAdamW

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))
    model.register_parameter("aux", torch.nn.Parameter(torch.randn(6, 4)))  # trainable, outside the loss
    x, y = torch.randn(5, 6), torch.randn(5, 3)

    def train(opt: ShardedAdamW, steps: int) -> None:
        for _ in range(steps):
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()

    opt = ShardedAdamW(model.named_parameters(), lr=1e-2, max_block_numel=24)
    train(opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    names = [n for n, _ in model.named_parameters()]
    shown = sd["state"][names.index("aux")]  # zeros shown for DCP
    assert shown and all(not bool(t.ne(0).any()) for blk in shown.values() for t in blk.values())
    saved = copy.deepcopy(model.state_dict())
    other = ShardedAdamW(model.named_parameters(), lr=1e-2, max_block_numel=12)
    other.load_state_dict(sd)
    assert not any(isinstance(v, torch.Tensor) or v for v in other.state[model.aux].values())
    train(other, 2)
    after = copy.deepcopy(model.state_dict())
    model.load_state_dict(saved)
    train(opt, 2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, after[k]), k


def _state_tensors(state):
    """Every tensor of a (nested) optimizer state or state dict's ``state``."""
    for v in state.values():
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, dict):
            yield from _state_tensors(v)


def _flat(state, prefix=""):
    """A (nested) state's tensors by their key path."""
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
        elif isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
    return out


def test_saved_and_loaded_states_share_no_storage_and_a_loaded_block_holds_its_rows_alone():
    """The state dict joins a parameter's row blocks into one tensor (optim/dcp_plain.py) from the live
    tensors, and the load re-cuts it by views (distributed/reblock.py) and copies each block it keeps once.
    So: nothing saved shares the live state (the next step would change the checkpoint), nothing loaded
    shares the state dict, and a loaded block's storage is its own rows alone, not a view into the joined
    whole (at W > 1 that kept every parameter whole on every rank)."""
    torch.manual_seed(0)
    p, q = nn.Parameter(torch.randn(12, 5)), nn.Parameter(torch.randn(3, 2))  # p: three row blocks, q: one
    opt = ShardedAdamW([p, q], lr=1e-2, max_block_numel=20)
    assert [len(bl) for bl in opt.block_table.by_param] == [3, 1]
    for t in (p, q):
        t.grad = torch.randn_like(t)
    opt.step()
    sd = opt.state_dict()
    assert len(sd["state"][0]) == 1  # joined: one whole-parameter block
    saved = copy.deepcopy(sd)

    def ptrs(tensors):
        return {t.untyped_storage().data_ptr() for t in tensors}

    assert not ptrs(_state_tensors(opt.state)) & ptrs(_state_tensors(sd["state"]))
    other = ShardedAdamW([p, q], lr=1e-2, max_block_numel=20)
    other.load_state_dict(sd)
    assert not ptrs(_state_tensors(other.state)) & ptrs(_state_tensors(sd["state"]))
    for t in _state_tensors(other.state):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert opt.state.keys() == other.state.keys()
    for t in opt.state:  # key by key: the order of a block's keys after a load is not the live one's
        assert _flat(opt.state[t]).keys() == _flat(other.state[t]).keys()
        for k, v in _flat(opt.state[t]).items():
            assert torch.equal(v, _flat(other.state[t])[k]), k
    opt.step()
    other.step()
    assert _flat(sd["state"]).keys() == _flat(saved["state"]).keys()
    for k, v in _flat(sd["state"]).items():
        assert torch.equal(v, _flat(saved["state"])[k]), k
