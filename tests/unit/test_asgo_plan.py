"""ASGO's planned step (``optim/asgo_plan.py``): at W = 1 a step past the template's no-op machinery takes
exactly the bits of the template's step, and every change between steps is seen as the template sees it.

Each case trains two optimizers on copies of one model with the same gradients, one as shipped and one whose
planned step is turned off (every step through the template), applies the same interference to both between
steps, and compares parameters, state, step counts and statistics bit for bit after every step, with roots on
a fixed schedule (every 3 and 4 steps), at every step (``root_every=1``, the default) and ``root_every="auto"``.
The planned path is checked to be what runs (its steps without a root and its steps that may take one).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from lightning_soaa import ASGO
from lightning_soaa.optim import asgo_plan

Between = Callable[[int, ASGO, torch.nn.Module], None]


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    # Grams of both sides (6 x 10 and 3 x 9: left, 9 x 6: right) and biases for the AdamW fallback
    return torch.nn.Sequential(torch.nn.Linear(10, 6), torch.nn.Tanh(), torch.nn.Linear(6, 9), torch.nn.Tanh(),
                               torch.nn.Linear(9, 3)).to(dtype)


def _make(model: torch.nn.Module, every: tuple[Any, Any] = (3, 4), cls: type[ASGO] = ASGO) -> ASGO:
    """Two groups with different hyperparameters: roots every 3 and every 4 steps (or ``every``), Nesterov and
    not; for ``"auto"`` a tolerance and a longest interval that make some steps take roots and others none."""
    ps = list(model.named_parameters())
    auto = {"root_tol": 0.6, "root_max_every": 5}
    return cls([{"params": ps[:3], "lr": 2e-2, "betas": (0.9, 0.8), "weight_decay": 0.1, "root_every": every[0],
                  "adam_weight_decay": 0.01, **auto},
                 {"params": ps[3:], "lr": 1e-2, "betas": (0.85, 0.95), "weight_decay": 0.0, "root_every": every[1],
                  "nesterov": False, "adam_betas": (0.8, 0.99), **auto}])


#: the root schedules the planned step is compared under: fixed, every step, "auto", and "auto" beside a fixed one
EVERY: dict[str, tuple[Any, Any]] = {"3_and_4": (3, 4), "1": (1, 1), "auto": ("auto", "auto"),
                                     "auto_and_2": ("auto", 2)}


def _flat(state: dict[Any, Any]) -> list[Any]:
    out: list[Any] = []
    for _, v in sorted(state.items(), key=lambda kv: str(kv[0])):
        out += _flat(v) if isinstance(v, dict) else [v.clone() if isinstance(v, torch.Tensor) else v]
    return out


def _state_of(opt: ASGO, model: torch.nn.Module) -> list[Any]:
    out: list[Any] = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        out += [sorted(opt.state[p])] + _flat(opt.state[p])
    stats = opt.statistics()
    return out + [stats[k] for k in sorted(stats)] + [opt.num_steps, opt.skipped_steps]


def _same_bits(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
        else:
            assert x == y or (x != x and y != y)


def _spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often the planned step ran, and of those how often without a root and with roots possibly due (the
    plan's two matrix steps); of the latter, how often a root was taken (``roots``)."""
    calls = {"planned": 0, "without_roots": 0, "with_roots": 0, "roots": 0}
    apply, lean, full = asgo_plan._apply, asgo_plan._matrix_step_without_roots, asgo_plan._matrix_step_with_roots

    def counted_full(opt: ASGO, *a: Any) -> None:
        calls["with_roots"] += 1
        before = opt._roots_computed
        full(opt, *a)
        calls["roots"] += opt._roots_computed > before

    def counted_apply(*a: Any) -> None:
        calls["planned"] += 1
        apply(*a)

    def counted_lean(*a: Any) -> None:
        calls["without_roots"] += 1
        lean(*a)
    monkeypatch.setattr(asgo_plan, "_apply", counted_apply)
    monkeypatch.setattr(asgo_plan, "_matrix_step_without_roots", counted_lean)
    monkeypatch.setattr(asgo_plan, "_matrix_step_with_roots", counted_full)
    return calls


def _run(between: Between, dtype: torch.dtype = torch.float32, steps: int = 14, in_place: bool = False,
         make: Callable[[torch.nn.Module], ASGO] = _make) -> None:
    models = [_model(dtype), _model(dtype)]
    opts = [make(models[0]), make(models[1])]
    opts[1]._planned_step = lambda: False  # type: ignore[method-assign]  # every step through the template
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) * 0.1
                 for p in models[0].parameters()]
        for model, opt in zip(models, opts):
            for p, gr in zip(model.parameters(), grads):
                if in_place and p.grad is not None:  # accumulated into the same tensors (zero_grad to zeros)
                    p.grad.zero_().add_(gr)
                else:
                    p.grad = gr.clone()
            between(t, opt, model)
            opt.step()
        _same_bits(_state_of(opts[0], models[0]), _state_of(opts[1], models[1]))


def _nothing(t: int, opt: ASGO, model: torch.nn.Module) -> None:
    pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_planned_steps_take_the_template_steps_bits(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch)
    _run(_nothing, dtype)
    # every step after the first (which makes the state); roots at steps 1, 4, 7, 10, 13 (every 3) and 1, 5,
    # 9, 13 (every 4): steps 2, 3, 6, 8, 11, 12, 14 take none
    assert calls == {"planned": 13, "without_roots": 7, "with_roots": 6, "roots": 6}, calls


def test_gradients_accumulated_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch)
    _run(_nothing, in_place=True)
    assert calls["without_roots"] == 7, calls


def _lr_schedule(t: int, opt: ASGO, model: torch.nn.Module) -> None:
    for i, g in enumerate(opt.param_groups):
        g["lr"] = (2e-2 if i == 0 else 1e-2) * 0.8**t
        g["weight_decay"] = 0.1 if t % 2 else 0.05


def _drop_gradients(t: int, opt: ASGO, model: torch.nn.Module) -> None:
    ps = list(model.parameters())
    if t in (3, 4, 8):
        ps[0].grad = None  # a matrix
    if t in (5, 6, 11):
        ps[3].grad = None  # a bias
    if t == 12:
        for p in ps:
            p.grad = None  # no gradient at all: nothing changes, nothing is counted


def _edit_state(t: int, opt: ASGO, model: torch.nn.Module) -> None:
    w0, b0, w1 = list(model.parameters())[:3]
    if t == 4:
        opt.state[w0]["exp_avg"].mul_(0.5)
        opt.state[w1]["gram"].mul_(2.0)
        opt.state[b0]["exp_avg_sq"].mul_(3.0)
    if t == 5:
        opt.state[w0]["inv_root"].mul_(0.5)
    if t == 7:
        opt.state[w1]["gram"] = opt.state[w1]["gram"].clone() * 0.5  # a new tensor in the state
        del opt.state[w0]["inv_root"]  # its root is due at the next step
    if t == 9:
        # a write that bumps no autograd version: the counters' values are read, not remembered
        opt.state[w1]["step"].data.add_(1.0)
        opt.state[b0]["step"].data.add_(2.0)


def _reassign_data(t: int, opt: ASGO, model: torch.nn.Module) -> None:
    w0, b0 = list(model.parameters())[:2]
    if t in (4, 5):
        w0.data = w0.data.clone()  # new storage
        b0.data = b0.data * 1.0


def _root_options(t: int, opt: ASGO, model: torch.nn.Module) -> None:
    if t == 5:  # a root due off the schedule, for that group's blocks
        opt.param_groups[1]["damping"] = 1e-3
    if t == 8:
        opt.param_groups[0]["root_every"] = 2


def _load_mid_run(t: int, opt: ASGO, model: torch.nn.Module) -> None:
    kept = opt.__dict__.setdefault("_test_saved", [])
    if t == 4:
        kept.append((copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in model.parameters()]))
    if t == 8:  # back to step 4's model and state
        sd, params = kept[0]
        with torch.no_grad():
            for p, x in zip(model.parameters(), params):
                p.copy_(x)
        opt.load_state_dict(sd)


def _bad_gradients(t: int, opt: ASGO, model: torch.nn.Module) -> None:
    ps = list(model.parameters())
    if t == 4:
        ps[2].grad[0, 0] = float("nan")  # type: ignore[index]  # skipped
    if t == 6:
        ps[1].grad[0] = float("inf")  # type: ignore[index]
    if t == 8:
        ps[0].grad.mul_(1e20)  # type: ignore[union-attr]  # finite, and its Gram overflows float32: skipped


@pytest.mark.parametrize("between", [_lr_schedule, _drop_gradients, _edit_state, _reassign_data, _root_options,
                                     _load_mid_run, _bad_gradients])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_changes_between_steps(between: Between, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch)
    _run(between, dtype)
    assert calls["without_roots"] >= 2 and calls["with_roots"] >= 2, calls


@pytest.mark.parametrize("between", [_nothing, _lr_schedule, _drop_gradients, _edit_state, _reassign_data,
                                     _root_options, _load_mid_run, _bad_gradients])
@pytest.mark.parametrize("every", ["1", "auto", "auto_and_2"])
def test_root_steps_take_the_template_steps_bits(between: Between, every: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Root steps at every step (the default) and ``root_every="auto"`` steps (with a root due and without) are
    planned too, with the template's bits, through the same changes between steps. Before, they were the
    template's ``_matrix_step`` (not the plan's)."""
    calls = _spy(monkeypatch)
    _run(between, make=lambda model: _make(model, EVERY[every]))
    assert calls["with_roots"] >= 8, calls
    if every == "1":  # a root every step: no step without one
        assert calls["without_roots"] == 0 and calls["roots"] == calls["with_roots"], calls
    else:  # "auto": steps that took a root and steps that took none
        assert 2 <= calls["roots"] <= calls["with_roots"] - 2, calls


def _root_step_written_as_a_number(t: int, opt: ASGO, model: torch.nn.Module) -> None:
    w0 = next(iter(model.parameters()))
    if t == 6:  # a number written into the state from outside: read as before (a float), its root now due by age
        opt.state[w0]["root_step"] = 0.0
    if t == 7:  # its root taken at step 7 and marked as a tensor again
        assert torch.equal(opt.state[w0]["root_step"], torch.tensor(7.0, dtype=torch.float64))


def test_auto_root_step_written_as_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    """``root_every="auto"`` reads a root step written as a Python number as it did before the multi-tensor
    decision (an AttributeError on ``float.dim`` there, the step then refused until a load)."""
    calls = _spy(monkeypatch)
    _run(_root_step_written_as_a_number, steps=9, make=lambda model: _make(model, EVERY["auto"]))
    assert calls["with_roots"] == 8, calls


class _WideStatistics(ASGO):
    """Statistics in float64 for every parameter (a subclass's choice of :meth:`ASGO._state_dtype`)."""

    @staticmethod
    def _state_dtype(param: torch.Tensor) -> torch.dtype:
        return torch.float64


@pytest.mark.parametrize("every", ["3_and_4", "1"])
def test_a_subclass_state_dtype_is_the_planned_statistics_dtype(every: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The planned statistics take the gradients in the dtype the optimizer's ``_state_dtype`` gives, as the
    template does: the plan's own dtype (the parameter's, promoted to float32) made a float32 gradient for
    float64 moments ("expected dtype double for `end`" in the momentum's lerp), at every step once roots were
    planned too (``root_every=1``, the default)."""
    calls = _spy(monkeypatch)
    _run(_nothing, make=lambda model: _make(model, EVERY[every], cls=_WideStatistics))
    assert calls["with_roots"] >= 5, calls


def test_a_param_group_added_between_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """add_param_group rebuilds the block table: the plan of the old one is not used."""
    calls = _spy(monkeypatch)

    def first_group(model: torch.nn.Module) -> ASGO:
        return ASGO(list(model.named_parameters())[:3], lr=2e-2, root_every=3)

    def add_last(t: int, opt: ASGO, model: torch.nn.Module) -> None:
        if t == 5:
            opt.add_param_group({"params": list(model.named_parameters())[3:], "lr": 3e-2, "root_every": 2})
    _run(add_last, make=first_group)
    assert calls["without_roots"] >= 2, calls


def test_parameters_cut_into_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row blocks (``max_block_size``) are stepped by the plan too, each its own problem."""
    calls = _spy(monkeypatch)

    def cut(model: torch.nn.Module) -> ASGO:
        return ASGO(list(model.named_parameters()), lr=2e-2, max_block_size=4, root_every=3)
    _run(_drop_gradients, make=cut)
    assert calls["without_roots"] >= 4, calls


def test_no_plan_for_experts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The experts of a ``batch_dims=1`` stack (an expert with an all-zero gradient is not stepped) take the
    template at every step."""
    calls = _spy(monkeypatch)
    experts = torch.nn.Parameter(torch.randn(3, 4, 5))
    opt = ASGO([{"params": [experts], "batch_dims": 1}], lr=1e-2, root_every=2)
    for t in range(4):
        experts.grad = torch.randn(3, 4, 5)
        experts.grad[t % 3] = 0.0
        opt.step()
    assert asgo_plan.StepPlan.of(opt) is None and calls["planned"] == 0 and opt.num_steps == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_counters_advance_through_their_addresses(dtype: torch.dtype) -> None:
    """``StepCounts`` writes count + 1 into 0-d CPU counters at their addresses, without an ATen call: the bits
    and the one version bump of the copy it replaced; a write that bumps no version is read, not overwritten."""
    from lightning_soaa.optim.base import StepCounts
    from tests.harness.op_count import CountOps

    cs = [torch.zeros((), dtype=dtype) for _ in range(3)]
    counts = StepCounts()
    assert counts.advance("k", cs) == [1.0] * 3
    versions = [c._version for c in cs]
    with CountOps() as ops:
        assert counts.advance("k", cs) == [2.0] * 3
    assert ops.n == 0
    assert [c.item() for c in cs] == [2.0] * 3 and all(c.dtype == dtype for c in cs)
    assert [c._version for c in cs] == [v + 1 for v in versions]  # as _foreach_copy_ bumps them
    cs[1].data.add_(5.0)  # no version bump
    assert counts.advance("k", cs) == [3.0, 8.0, 3.0]
    assert [c.item() for c in cs] == [3.0, 8.0, 3.0]
