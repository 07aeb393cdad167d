"""EGN's step plan (``egn_plan``: one process training a plain MLP) against the general path (the template): the
same parameters, state, statistics and skips, bit for bit, on every step it takes; and the general path wherever
the plan does not apply, decided once per capture plan and declined (nothing changed) at every step that is not
the one planned."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_soaa.optim.egn import EGN
from lightning_soaa.optim.egn_plan import StepPlan

#: model name -> builder; every one is a planned chain
MODELS: dict[str, Callable[[], nn.Module]] = {
    "tanh": lambda: nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3)),
    "relu_dropout": lambda: nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Dropout(0.3), nn.Linear(9, 7), nn.Sigmoid(),
                                          nn.Identity(), nn.Linear(7, 3)),
    "bare_linear": lambda: nn.Linear(6, 3),
    "one_output": lambda: nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 1)),
}

#: name -> (model, loss, batch size, dtype, frozen parameter names, EGN keyword arguments). Small systems (bc <=
#: SMALL_DENSE_MAX) take the plan's own solve, larger ones EGN._solve (factors, mixed precision, conjugate gradients)
CASES: dict[str, tuple[str, str, int, torch.dtype, tuple[str, ...], dict[str, Any]]] = {
    "ce_line_search": ("tanh", "cross_entropy", 16, torch.float32, (), dict(lr=1.0, damping=0.5, line_search=True)),
    "ce_momentum_adaptive": ("tanh", "cross_entropy", 16, torch.float32, (),
                             dict(lr=0.5, damping=1.0, momentum=0.6, adaptive_damping=True, line_search=True)),
    "ce_factor_path": ("tanh", "cross_entropy", 60, torch.float32, (), dict(lr=1.0, damping=0.5, line_search=True)),
    "ce_conjugate_gradients": ("tanh", "cross_entropy", 300, torch.float32, (), dict(lr=0.5, adaptive_damping=True)),
    "mse_relu_momentum": ("relu_dropout", "mse", 20, torch.float32, (),
                          dict(lr=0.5, momentum=0.5, adaptive_damping=True)),
    "mse_mixed_precision": ("tanh", "mse", 140, torch.float32, (), dict(lr=0.5, damping=0.01, line_search=True)),
    # bc' = 400 in [MIXED_MIN_SIZE, CG_MIN_SIZE) under cross-entropy (SᵀΔ): the float32 lower triangle in the plan's
    # kept buffers (ChainSystem.gram_lower_in) against the template's assemble_gram of the converted factors
    "ce_mixed_precision": ("tanh", "cross_entropy", 200, torch.float32, (),
                           dict(lr=1.0, damping=0.5, line_search=True)),
    "bce_frozen": ("relu_dropout", "bce", 12, torch.float32, ("0.bias", "3.weight"),
                   dict(lr=1.0, damping=0.5, momentum=0.3, line_search=True, adaptive_damping=True)),
    "mse_float64": ("tanh", "mse", 10, torch.float64, (), dict(lr=1.0, momentum=0.4, line_search=True)),
    "ce_solve_in_model_dtype": ("tanh", "cross_entropy", 16, torch.float32, (),
                                dict(lr=1.0, line_search=True, solve_dtype="model")),
    "linear_regression_kronecker": ("bare_linear", "mse", 24, torch.float32, (), dict(lr=1.0, adaptive_damping=True)),
    "logistic_regression": ("bare_linear", "cross_entropy", 24, torch.float32, (), dict(lr=1.0, line_search=True)),
    "mse_one_output": ("one_output", "mse", 8, torch.float32, (), dict(lr=1.0, momentum=0.5, line_search=True)),
    # bc' in [288, MIXED_MIN_SIZE): the kept lower triangle of SᵀKS in two row blocks (ChainSystem), a frozen weight
    # and a frozen bias among its sites
    "ce_staircase": ("tanh", "cross_entropy", 160, torch.float32, (), dict(lr=1.0, damping=0.5, line_search=True)),
    "bce_frozen_staircase": ("relu_dropout", "bce", 100, torch.float32, ("0.bias", "3.weight"),
                             dict(lr=1.0, damping=0.5, momentum=0.3, line_search=True, adaptive_damping=True)),
    "mse_staircase": ("tanh", "mse", 110, torch.float32, (), dict(lr=0.5, momentum=0.5, adaptive_damping=True)),
    # a step size the Armijo test cuts back several times a step (w0 put back before each later trial)
    "mse_backtracking": ("tanh", "mse", 16, torch.float32, (), dict(lr=50.0, damping=1e-3, line_search=True)),
}


def _model(name: str, dtype: torch.dtype, frozen: tuple[str, ...] = ()) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]().to(dtype)
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    return model


def _batch(loss: str, b: int, step: int, dtype: torch.dtype, c: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(b, 6, generator=g, dtype=dtype)
    if loss == "cross_entropy":
        return x, torch.randint(0, 3, (b,), generator=g)
    if loss == "bce":
        return x, torch.rand(b, 3, generator=g, dtype=dtype)
    return x, torch.tanh(x[:, :c] - x[:, 3:3 + c]).contiguous()


def _general_only(opt: EGN) -> EGN:
    """``opt`` with its shortcut past the template (the step plan) turned off: every step through the template
    (the reference), as the conformance battery turns it off."""
    opt._planned_step = lambda: False  # type: ignore[method-assign]
    return opt


@contextlib.contextmanager
def _counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """[steps the plan took, steps it declined] while inside."""
    counts = [0, 0]
    step = StepPlan.step

    def counted(self: StepPlan, opt: EGN, x: Tensor, y: Tensor) -> Tensor | None:
        out = step(self, opt, x, y)
        counts[out is None] += 1
        return out

    monkeypatch.setattr(StepPlan, "step", counted)
    yield counts


def _leaves(obj: Any, path: str = "") -> dict[str, Any]:
    """Every leaf of a nested state dict, by path."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _leaves(val, f"{path}/{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _leaves(val, f"{path}/{i}").items()}
    return {path: obj}


def _same_state(a: EGN, b: EGN, ma: nn.Module, mb: nn.Module) -> None:
    """The same parameters, state dict (momentum buffers, λ, α, counters) and statistics, bit for bit."""
    for (n, p), q in zip(ma.named_parameters(), mb.parameters()):
        assert torch.equal(p, q), n
    la, lb = _leaves(a.state_dict()), _leaves(b.state_dict())
    assert la.keys() == lb.keys()
    for k, v in la.items():
        assert (torch.equal(v, lb[k]) and v.dtype == lb[k].dtype) if isinstance(v, Tensor) else v == lb[k], k
    stats_a, stats_b = a.statistics(), b.statistics()
    assert stats_a.keys() == stats_b.keys()
    for k, v in stats_a.items():
        assert v == stats_b[k] or (math.isnan(v) and math.isnan(stats_b[k])), k


@pytest.mark.parametrize("case", sorted(CASES))
def test_planned_steps_are_the_general_paths_bit_for_bit(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name, loss, b, dtype, frozen, kw = CASES[case]
    ma, mb = _model(name, dtype, frozen), _model(name, dtype, frozen)
    opt, ref = EGN(ma, loss=loss, **kw), _general_only(EGN(mb, loss=loss, **kw))
    tries = []
    with _counting(monkeypatch) as counts:
        for t in range(6):
            x, y = _batch(loss, b, t, dtype, c=1 if name == "one_output" else 3)
            got, want = opt.step(inputs=x, targets=y), ref.step(inputs=x, targets=y)
            assert torch.equal(got, want) and not got.is_inference()
            _same_state(opt, ref, ma, mb)
            tries.append(opt.statistics().get("ls_tries", 0.0))
    assert counts == [6, 0]  # every step planned
    if case == "mse_backtracking":
        assert max(tries) >= 3


def test_the_plan_is_decided_once_and_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    build = StepPlan.build

    def counted(opt: EGN) -> StepPlan | None:
        built.append(opt)
        return build(opt)

    monkeypatch.setattr(StepPlan, "build", staticmethod(counted))
    model = _model("tanh", torch.float32)
    opt = EGN(model, loss="cross_entropy", lr=1.0, line_search=True)
    for t in range(3):
        opt.step(inputs=_batch("cross_entropy", 8, t, torch.float32)[0],
                 targets=_batch("cross_entropy", 8, t, torch.float32)[1])
    plan = opt._step_plan()
    assert plan is not None and len(built) == 1
    model[2].requires_grad_(False)  # a freezing change plans the capture again, and the steps with it
    x, y = _batch("cross_entropy", 8, 3, torch.float32)
    opt.step(inputs=x, targets=y)
    opt.step(inputs=x, targets=y)
    assert len(built) == 2 and opt._step_plan() is not plan and opt._step_plan() is not None


@pytest.mark.parametrize(("make", "jacobian"), [
    (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)), "auto"),  # another trained layer
    (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), "explicit"),
], ids=["layer_norm", "explicit"])
def test_no_plan_outside_a_planned_chain(make: Callable[[], nn.Module], jacobian: str) -> None:
    opt = EGN(make(), loss="mse", jacobian=jacobian)
    x, y = _batch("mse", 8, 0, torch.float32)
    opt.step(inputs=x, targets=y)
    assert opt._step_plan() is None


def test_the_directions_blocks_start_where_new_tensors_start() -> None:
    """Each parameter's block of the flat direction buffers starts on a 64-byte boundary, as a tensor torch
    allocates does: the BLAS picks its kernel by the output's alignment (an ``mm(out=)`` into a view 8 bytes off
    a boundary differed from ``mm`` in the last bit, e.g. a [1, 7] float64 weight of a one-output MLP)."""
    model = _model("one_output", torch.float32)
    opt = EGN(model, loss="mse")
    x, y = _batch("mse", 8, 0, torch.float32, c=1)
    opt.step(inputs=x, targets=y)
    plan = opt._step_plan()
    assert plan is not None
    for dtype in (torch.float64, torch.float32):
        _, views = plan._flat(dtype)
        assert [v.data_ptr() % 64 for v in views] == [0] * len(views)


def _hook_forward(model: nn.Module) -> Any:
    return model[2].register_forward_hook(lambda m, a, out: out * 1.5)


def _hook_global(model: nn.Module) -> Any:
    return nn.modules.module.register_module_forward_hook(lambda m, a, out: out)


def _hook_backward(model: nn.Module) -> Any:
    return model[1].register_full_backward_hook(lambda m, gi, go: (gi[0] * 2.0,))


def _replace_module(model: nn.Module) -> Any:
    model[1] = nn.Sigmoid()  # the Sequential now computes another function


def _instance_forward(model: nn.Module) -> Any:
    model[1].forward = lambda h: torch.tanh(h) * 0.5


@pytest.mark.parametrize("change", [_hook_forward, _hook_global, _hook_backward, _replace_module, _instance_forward],
                         ids=["forward_hook", "global_hook", "backward_hook", "replaced_module", "instance_forward"])
def test_a_changed_model_declines_the_plan_and_steps_as_the_general_path(
        change: Callable[[nn.Module], Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook, a module replaced in the Sequential or an instance forward after planned steps: the plan declines
    and the general path takes the step, with what it makes of the change (the same as without a plan)."""
    ma, mb = _model("tanh", torch.float32), _model("tanh", torch.float32)
    kw = dict(loss="cross_entropy", lr=1.0, line_search=True)
    opt, ref = EGN(ma, **kw), _general_only(EGN(mb, **kw))
    x, y = _batch("cross_entropy", 8, 0, torch.float32)
    for o in (opt, ref):
        o.step(inputs=x, targets=y)
    handles = [change(ma), change(mb)]
    try:
        with _counting(monkeypatch) as counts:
            for t in (1, 2):
                x, y = _batch("cross_entropy", 8, t, torch.float32)
                try:
                    want: Any = ref.step(inputs=x, targets=y)
                except RuntimeError as e:
                    want = e
                if isinstance(want, RuntimeError):
                    with pytest.raises(RuntimeError, match=str(want)[:40].replace("(", r"\(").replace(")", r"\)")):
                        opt.step(inputs=x, targets=y)
                else:
                    assert torch.equal(opt.step(inputs=x, targets=y), want)
        assert counts[0] == 0  # declined every time
        _same_state(opt, ref, ma, mb)
    finally:
        for h in handles:
            if h is not None:
                h.remove()


def test_calls_the_plan_does_not_cover_take_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A closure, a pending set_batch, inputs as a tuple, an autocast region: the general path, the same steps."""
    ma, mb = _model("tanh", torch.float32), _model("tanh", torch.float32)
    kw = dict(loss="cross_entropy", lr=1.0, line_search=True, momentum=0.5)
    opt, ref = EGN(ma, **kw), _general_only(EGN(mb, **kw))
    x, y = _batch("cross_entropy", 8, 0, torch.float32)
    calls: list[Callable[[EGN], Any]] = [
        lambda o: o.step(lambda: (x, y)),
        lambda o: (o.set_batch(x, y), o.step())[1],
        lambda o: o.step(inputs=(x,), targets=y),
    ]

    def in_autocast(o: EGN) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return o.step(inputs=x, targets=y)

    calls.append(in_autocast)
    with _counting(monkeypatch) as counts:
        for call in calls:
            assert torch.equal(call(opt), call(ref))
            _same_state(opt, ref, ma, mb)
    assert counts[0] == 0


def test_refused_batches_are_refused_by_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Targets out of range, a batch above max_gram_size, inputs the forward cannot take (sparse ones too): the plan
    declines and the general path raises its own error, nothing changed."""
    model = _model("tanh", torch.float32)
    opt = EGN(model, loss="cross_entropy", max_gram_size=30)
    x, y = _batch("cross_entropy", 8, 0, torch.float32)
    opt.step(inputs=x, targets=y)
    before = [p.clone() for p in model.parameters()]
    with _counting(monkeypatch) as counts:
        with pytest.raises(ValueError, match=r"targets in \[0, 3\)"):
            opt.step(inputs=x, targets=torch.full((8,), 3))
        with pytest.raises(ValueError, match="max_gram_size=30"):
            opt.step(inputs=torch.cat([x, x]), targets=torch.cat([y, y]))
        with pytest.raises(ValueError, match="forward failed"):
            opt.step(inputs=x[:, :4], targets=y)
        with pytest.raises(ValueError, match="forward failed"):  # sparse inputs: not the plan's own error
            opt.step(inputs=x.to_sparse(), targets=y)
    assert counts == [0, 4]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and opt.num_steps == 1


@pytest.mark.parametrize("kind", ["nonfinite_outputs", "unsolvable", "nonfinite_trial"])
def test_skipped_steps_are_the_general_paths(kind: str, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """Non-finite outputs, a system that cannot be solved (an infinite input: K is not finite) and a step to a
    non-finite loss are skipped by the plan as by the general path: the same counters, λ (×10 after the non-finite
    trial), returned loss and warning."""
    ma, mb = _model("tanh", torch.float32), _model("tanh", torch.float32)
    kw: dict[str, Any] = dict(loss="mse", lr=1.0, max_solve_retries=1)
    if kind == "nonfinite_trial":
        kw.update(lr=1e30, damping=1e-6)
    opt, ref = EGN(ma, **kw), _general_only(EGN(mb, **kw))
    x, y = _batch("mse", 8, 0, torch.float32)
    if kind == "nonfinite_outputs":
        x[3, 0] = float("nan")
    elif kind == "unsolvable":
        x[3, 0] = float("inf")
    with _counting(monkeypatch) as counts:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            got = opt.step(inputs=x, targets=y)
        planned = [r.getMessage() for r in caplog.records]
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            want = ref.step(inputs=x, targets=y)
        assert planned == [r.getMessage() for r in caplog.records] and planned
    assert counts == [1, 0] and opt.skipped_steps == 1
    assert torch.equal(got, want) or (got.isnan() and want.isnan())
    _same_state(opt, ref, ma, mb)


def test_a_planned_step_that_raises_is_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl+C in a line-search trial's forward (the parameters hold w0 + αd) or in the commit (the momentum buffers
    replaced): everything goes back, and stepping again is the uninterrupted run bit for bit."""
    ma, mb = _model("tanh", torch.float32), _model("tanh", torch.float32)
    kw = dict(loss="cross_entropy", lr=1.0, momentum=0.5, line_search=True, adaptive_damping=True)
    opt, ref = EGN(ma, **kw), EGN(mb, **kw)
    x, y = _batch("cross_entropy", 8, 0, torch.float32)
    for o in (opt, ref):
        o.step(inputs=x, targets=y)
    plan = opt._step_plan()
    assert plan is not None

    def interrupted(*args: Any) -> Any:
        raise KeyboardInterrupt

    for where in ("trial_outputs", "_commit"):
        target: Any = plan if where == "trial_outputs" else opt
        monkeypatch.setattr(target, where, interrupted)
        with pytest.raises(KeyboardInterrupt):
            opt.step(inputs=x, targets=y)
        monkeypatch.undo()
        _same_state(opt, ref, ma, mb)
    for t in (1, 2):
        x, y = _batch("cross_entropy", 8, t, torch.float32)
        assert torch.equal(opt.step(inputs=x, targets=y), ref.step(inputs=x, targets=y))
    _same_state(opt, ref, ma, mb)


def test_a_state_saved_from_planned_steps_resumes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """state_dict() after planned steps, loaded into a new EGN (and into the same one, mid-run): the resumed run is
    the uninterrupted one bit for bit (the plan reads the momentum buffers and λ, α from the optimizer at every
    step, and a load replaces them)."""
    kw = dict(loss="cross_entropy", lr=1.0, momentum=0.5, line_search=True, adaptive_damping=True)
    ma, mb = _model("tanh", torch.float32), _model("tanh", torch.float32)
    opt, ref = EGN(ma, **kw), EGN(mb, **kw)
    batches = [_batch("cross_entropy", 12, t, torch.float32) for t in range(6)]
    for x, y in batches[:3]:
        opt.step(inputs=x, targets=y)
        ref.step(inputs=x, targets=y)
    saved, weights = opt.state_dict(), {k: v.clone() for k, v in ma.state_dict().items()}
    mc = _model("tanh", torch.float32)
    mc.load_state_dict(weights)
    resumed = EGN(mc, **kw)
    resumed.load_state_dict(saved)
    opt.step(inputs=batches[3][0], targets=batches[3][1])  # a step, then back to the saved state
    ma.load_state_dict(weights)
    opt.load_state_dict(saved)
    with _counting(monkeypatch) as counts:
        for x, y in batches[3:]:
            want = ref.step(inputs=x, targets=y)
            assert torch.equal(opt.step(inputs=x, targets=y), want)
            assert torch.equal(resumed.step(inputs=x, targets=y), want)
    assert counts == [9, 0]
    _same_state(opt, ref, ma, mb)
    _same_state(resumed, ref, mc, mb)


@pytest.mark.parametrize("b", [8, 20])  # bc = 80: K whole; 200: SᵀKS kept (ChainSystem)
def test_column_major_inputs_take_the_general_paths_bits(b: int) -> None:
    """Inputs whose columns are contiguous (``x.T`` of a row-major batch, a Fortran-ordered numpy array): the
    general path's float64 factors keep their strides (``to`` preserves a dense layout), and the BLAS sums A·Aᵀ in
    another order for them than for the row-major copies in the plan's kept buffers (ChainWork's K at bc <= 128,
    ChainSystem's SᵀKS above): v, gᵀd and ρ differed in their last bits. The plan declines such a batch."""
    torch.manual_seed(0)
    ma = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 10))
    mb = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 10))
    mb.load_state_dict(ma.state_dict())
    kw: dict[str, Any] = dict(loss="mse", lr=1.0, damping=0.5, line_search=True, adaptive_damping=True)
    opt, ref = EGN(ma, **kw), _general_only(EGN(mb, **kw))
    for t in range(4):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(6, b, generator=g).T, torch.randn(b, 10, generator=g)
        assert x.stride() == (1, b)
        got, want = opt.step(inputs=x, targets=y), ref.step(inputs=x, targets=y)
        assert torch.equal(got, want)
        _same_state(opt, ref, ma, mb)
