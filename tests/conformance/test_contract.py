"""Single-process guarantees of every registered optimizer.

Constructor validation (derived from the config dataclass), lr = 0, step hooks, non-finite steps,
``state_dict`` round trips (through ``torch.save``/``torch.load(weights_only=True)``), ``deepcopy`` and
pickle, and rejected checkpoints that leave the optimizer unchanged. The multi-rank guarantees are in
:mod:`tests.conformance.test_ranks`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import io
import json
import pickle
import random
import re
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_soaa.optim.base import ShardedOptimizer
from lightning_soaa.registry import FirstArg, OptimizerSpec, StepNeeds, get, half_mse
from tests.conformance._battery import (
    SIZES,
    SPECS,
    assert_close,
    assert_identical,
    bad_values,
    data,
    each_optimizer,
    edge_values,
    frozen_steps,
    make,
    params,
    step,
    takes_kwarg,
    without_skips,
)
from tests.harness.models import tiny_mlp


def _bad_cases() -> list[Any]:
    return [pytest.param(spec, name, value, id=f"{spec.name}-{name}={value!r}")
            for spec in SPECS for name, value in bad_values(spec)]


# ---------------------------------------------------------------------------------------- construction
@each_optimizer
def test_config_fields_are_constructor_keywords_with_the_same_defaults(spec: OptimizerSpec) -> None:
    config = spec.load_config()
    sig = inspect.signature(spec.load()).parameters
    for f in dataclasses.fields(config):
        assert f.name in sig, f"{config.__name__}.{f.name} is not a keyword of {spec.name}()"
        assert sig[f.name].default == f.default, (f.name, sig[f.name].default, f.default)
    assert spec.load_config()() is not None  # the defaults themselves are valid


@pytest.mark.parametrize("spec,name,value", _bad_cases())
def test_bad_hyperparameter_raises_naming_field_and_value(spec: OptimizerSpec, name: str, value: Any) -> None:
    with pytest.raises(ValueError) as info:
        make(spec, **{name: value})
    msg = str(info.value)
    shown = [repr(value)] + ([repr(v) for v in value] if isinstance(value, tuple) else [])
    assert re.search(rf"Invalid {re.escape(name)}(\[\d\])?=", msg), msg
    assert any(s in msg for s in shown), msg
    assert "Must be" in msg, msg  # says what is allowed


@pytest.mark.parametrize("spec,name,value", [pytest.param(spec, name, value, id=f"{spec.name}-{name}={value!r}")
                                              for spec in SPECS for name, value in edge_values(spec)])
def test_an_edge_value_is_refused_or_steps(spec: OptimizerSpec, name: str, value: Any) -> None:
    """What the constructor accepts, the step runs with: a value at the edge of its range is refused
    with the field's message, or three steps run and leave the parameters finite, also where a
    coordinate's gradient has been 0 so far (an input feature that is always 0: Adam's 0 / (0 + eps) is
    NaN at eps = 0, which DASGO and AdamW once accepted)."""
    try:
        model, opt = make(spec, **{name: value})
    except ValueError as exc:
        assert re.search(rf"Invalid {re.escape(name)}(\[\d\])?=", str(exc)) and "Must be" in str(exc), exc
        return
    first = next(model.parameters())  # the first Linear's weight [hidden, inputs]

    def zero_column() -> None:
        if first.grad is not None:
            first.grad[:, 0] = 0.0

    for t in range(3):
        if spec.needs is StepNeeds.BATCH:
            step(spec, model, opt, t)
        else:
            spec.take_step(opt, model, *data(t), on_gradients=zero_column)
    assert all(torch.isfinite(p).all() for p in params(model))


@functools.cache
def _group_keys(name: str) -> frozenset[str]:
    return frozenset(make(next(s for s in SPECS if s.name == name))[1].param_groups[0])


def _midtraining_cases() -> list[Any]:
    out = []
    for spec in SPECS:
        cases = [(n, v) for n, v in bad_values(spec) if n in _group_keys(spec.name)]
        cases += [("lr", float("inf")), ("lr", torch.tensor(0.01))]
        out += [pytest.param(spec, n, v, id=f"{spec.name}-{n}={v!r}") for n, v in cases]
    return out


@pytest.mark.parametrize("spec,name,value", _midtraining_cases())
def test_bad_value_written_into_a_group_mid_training_raises_at_the_step(spec: OptimizerSpec, name: str,
                                                                          value: Any) -> None:
    """A value the constructor refuses, written into ``param_groups`` later (by hand or by a scheduler),
    is refused by the next step with the constructor's message, naming the group, before anything
    changes (``lr=nan`` once wrote NaN into every parameter); the optimizer then steps on once the value
    is put back."""
    model, opt = make(spec)
    step(spec, model, opt, 0)
    before, w = copy.deepcopy(opt.state_dict()), params(model)
    good = opt.param_groups[0][name]
    opt.param_groups[0][name] = value
    with pytest.raises(ValueError) as info:
        step(spec, model, opt, 1)
    msg = str(info.value)
    assert "param_groups[0]" in msg and re.search(rf"Invalid {re.escape(name)}(\[\d\])?=", msg), msg
    assert "Must be" in msg, msg
    if isinstance(value, Tensor):
        assert "Tensor hyperparameters are not supported" in msg, msg
    assert_identical(params(model), w, "params")
    opt.param_groups[0][name] = good
    assert_identical(opt.state_dict(), before)
    step(spec, model, opt, 1)
    assert opt.num_steps == 2 and opt.skipped_steps == 0


@each_optimizer
def test_a_key_removed_from_a_group_is_refused_at_the_step(spec: OptimizerSpec) -> None:
    """Every default key, popped from a group after a step: refused naming it, nothing changed (a bare
    KeyError before; ASGO/DASGO had stepped their AdamW part and counters first, EGN raised on one rank)."""
    model, opt = make(spec)
    step(spec, model, opt, 0)
    for key in [k for k, v in opt.defaults.items() if v is not None]:  # absent reads as None
        before, w = copy.deepcopy(opt.state_dict()), params(model)
        good = opt.param_groups[0].pop(key)
        with pytest.raises(ValueError, match=rf"param_groups\[0\] has no '{key}' \(removed after construction\)"):
            step(spec, model, opt, 1)
        assert_identical(params(model), w, f"params ({key})")
        opt.param_groups[0][key] = good
        assert_identical(opt.state_dict(), before)
    step(spec, model, opt, 1)
    assert opt.num_steps == 2


@each_optimizer
def test_input_errors_say_what_is_wrong(spec: OptimizerSpec) -> None:
    """Three inputs whose errors misled: a number as a string ("Invalid lr='1e-3'. Must be in [0.0, inf)."
    read as out of range; PyYAML reads 1e-3 as a string), a consolidation target that is no rank (no rank
    kept the state, and state_dict() asked for the call just made), non-string parameter names (an
    AttributeError deep in ASGO's routing)."""
    model, opt = make(spec)
    with pytest.raises(ValueError, match=r"Invalid lr='1e-3'\..*It is a string, not a number"):
        make(spec, lr="1e-3")
    for bad in ("0", -1, 1, True, 0.0):
        with pytest.raises(ValueError, match=rf"consolidate_state_dict: invalid to={re.escape(repr(bad))}\. Must"):
            opt.consolidate_state_dict(to=bad)
    opt.consolidate_state_dict(to=0)
    if spec.first_arg is FirstArg.NAMED_PARAMETERS:
        params_ = [p for _, p in tiny_mlp(0).named_parameters()]
        with pytest.raises(ValueError, match=r"names parameter 0 1 \(int\); names must be strings"):
            spec.load()([(i + 1, p) for i, p in enumerate(params_)], **spec.test_kwargs)


@each_optimizer
def test_torch_join_is_refused_clearly_when_it_is_built(spec: OptimizerSpec) -> None:
    """torch's Join (uneven inputs) asks each joinable for its hook when it is constructed, on every rank
    and before any collective: a clear refusal there (it was a bare AttributeError) ends every rank
    together. A joined rank could not shadow the step's collectives."""
    from torch.distributed.algorithms.join import Join

    model, opt = make(spec)
    with pytest.raises(ValueError, match=rf"{type(opt).__name__} does not support .*Join .*throw_on_early_termination"):
        Join([opt])


@each_optimizer
def test_calls_through_lightnings_optimizer_wrapper_reach_the_optimizer(spec: OptimizerSpec) -> None:
    """Under manual optimization ``self.optimizers()`` is Lightning's LightningOptimizer, made on the fly as a
    subclass of ours with its own ``__dict__``: what our methods wrote through it stayed on the wrapper (a
    state_dict saved as 'Lightning<name>', which no load accepted; a consolidation the optimizer never saw)."""
    core = pytest.importorskip("lightning.pytorch.core.optimizer")
    model, opt = make(spec)
    step(spec, model, opt, 0)
    wrapped = core.LightningOptimizer(opt)
    wrapped.consolidate_state_dict()
    assert opt.__dict__.get("_consolidated") is not None
    saved = wrapped.state_dict()
    assert saved["lightning_soaa"]["optimizer"] == type(opt).__name__, saved["lightning_soaa"]
    wrapped.load_state_dict(saved)
    opt.load_state_dict(saved)
    step(spec, model, opt, 1)
    assert opt.num_steps == 2


_HANDED = [s for s in SPECS if s.needs in (StepNeeds.LOSS, StepNeeds.BATCH)]


@pytest.mark.parametrize("spec", _HANDED, ids=[s.name for s in _HANDED])
def test_a_second_hand_over_before_a_step_warns_once(spec: OptimizerSpec,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """set_loss / set_batch once per micro-batch of a manual accumulation loop: the step used the last
    value alone, silently (EGN 0.26 off the step on both micro-batches; DeepSpeed's client collects one
    set_batch per micro-batch, so the pattern is natural). The last value still wins, with a warning, once;
    replace=True (the Lightning callbacks' running values) does not warn."""
    model, opt = make(spec)
    x, y = data(0)

    def hand(replace: bool = False) -> None:
        if spec.needs is StepNeeds.BATCH:
            opt.set_batch(x, y, replace=replace)
        else:
            opt.set_loss(half_mse(model(x), y).detach(), replace=replace)

    hand()
    hand(replace=True)
    assert "called again before step()" not in caplog.text
    hand()
    hand()
    assert caplog.text.count(f"{type(opt).__name__}.set_") == 1, caplog.text
    assert "called again before step(): the step uses the last value only" in caplog.text
    if spec.needs is StepNeeds.LOSS:  # with gradients: a step without any changes nothing, counts nothing
        half_mse(model(x), y).backward()
    opt.step()  # the handed value is taken
    assert opt.num_steps == 1


_GROUPED = [s for s in SPECS if s.first_arg is FirstArg.NAMED_PARAMETERS]


@pytest.mark.parametrize("spec", _GROUPED, ids=[s.name for s in _GROUPED])
def test_bad_group_values_raise_and_a_rejected_group_changes_nothing(spec: OptimizerSpec) -> None:
    model = tiny_mlp(0)
    named = list(model.named_parameters())
    cls = spec.load()
    with pytest.raises(ValueError, match=re.escape("Invalid lr=-1.0")):
        cls([{"params": named[:2]}, {"params": named[2:], "lr": -1.0}], **spec.test_kwargs)
    opt = cls(named[:4], **spec.test_kwargs)
    before, blocks = copy.deepcopy(opt.state_dict()), len(opt.block_table.blocks)
    with pytest.raises(ValueError, match=re.escape("Invalid lr=-1.0")):
        opt.add_param_group({"params": named[4:], "lr": -1.0})
    assert len(opt.param_groups) == 1 and len(opt.block_table.blocks) == blocks
    assert_identical(opt.state_dict(), before)


# ---------------------------------------------------------------------------------------- lr = 0
@each_optimizer
def test_lr_zero_is_accepted_and_leaves_the_parameters_unchanged(spec: OptimizerSpec) -> None:
    model, opt = make(spec, lr=0.0)
    w0 = params(model)
    for t in range(2):
        step(spec, model, opt, t)
    assert opt.num_steps == 2 and opt.skipped_steps == 0
    assert_identical(params(model), w0, "params")
    # a warm-up: the same optimizer moves once lr > 0
    for group in opt.param_groups:
        group["lr"] = spec.test_kwargs["lr"]
    step(spec, model, opt, 2)
    assert not all(torch.equal(a, b) for a, b in zip(params(model), w0))


# ---------------------------------------------------------------------------------------- numpy lr
@each_optimizer
def test_a_numpy_lr_from_a_scheduler_is_a_number(spec: OptimizerSpec) -> None:
    """A LambdaLR whose factor is a numpy float32 writes an np.float32 lr into the groups (torch accepts
    it); it steps like the same Python float, and its checkpoint loads, also with torch.load's default
    weights_only=True (which refused the np.float32 the checkpoint held, as it does torch's AdamW's)."""
    import numpy as np

    runs = []
    for factor in (np.float32(0.5), 0.5):
        model, opt = make(spec, lr=2.0 ** -6)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _s, f=factor: f)
        for t in range(3):
            step(spec, model, opt, t)
            sched.step()
        runs.append((model, opt))
    assert isinstance(runs[0][1].param_groups[0]["lr"], np.floating)
    assert_identical(params(runs[0][0]), params(runs[1][0]), "params")
    model, opt = make(spec, lr=2.0 ** -6)
    opt.load_state_dict(_round_trip_bytes(runs[0][1].state_dict()))
    assert float(opt.param_groups[0]["lr"]) == 2.0 ** -7


def _train_alike(spec: OptimizerSpec, prepare: Any, steps: int) -> None:
    """Two fresh runs, each after ``prepare(model, opt, variant)`` with variant True, then False, must
    train to the same parameters, bit for bit."""
    runs = []
    for variant in (True, False):
        model, opt = make(spec)
        prepare(model, opt, variant)
        for t in range(steps):
            step(spec, model, opt, t)
        runs.append(params(model))
    assert_identical(runs[0], runs[1], "params")


# ---------------------------------------------------------------------------------------- group edits
@each_optimizer
def test_torch_options_the_optimizer_lacks_are_refused(spec: OptimizerSpec) -> None:
    """torch's own flags (``maximize``, ``amsgrad``, ...) in a param-group dict passed through torch's
    add_param_group and were silently not used (``maximize=True`` went downhill): refused at construction
    and, written into a group later, at the step with nothing changed. False (torch's default) passes."""
    if spec.first_arg is FirstArg.NAMED_PARAMETERS:
        named = list(tiny_mlp(0).named_parameters())
        with pytest.raises(ValueError, match=r"maximize=True is a torch optimizer option that .* does not implement"):
            spec.load()([{"params": named, "maximize": True}], **spec.test_kwargs)
        spec.load()([{"params": named, "maximize": False, "amsgrad": False}], **spec.test_kwargs)
    model, opt = make(spec)
    step(spec, model, opt, 0)
    before, w = copy.deepcopy(opt.state_dict()), params(model)
    opt.param_groups[0]["amsgrad"] = True
    with pytest.raises(ValueError, match=r"param_groups\[0\]: amsgrad=True is a torch optimizer option"):
        step(spec, model, opt, 1)
    assert_identical(params(model), w, "params")
    del opt.param_groups[0]["amsgrad"]
    assert_identical(opt.state_dict(), before)
    # a group copied from torch.optim.Adam: its weight_decay is an L2 term (decoupled_weight_decay=False)
    opt.param_groups[0]["decoupled_weight_decay"] = False
    if opt.param_groups[0].get("weight_decay"):
        with pytest.raises(ValueError, match=r"decoupled_weight_decay=False with weight_decay=.*L2 penalty"):
            step(spec, model, opt, 1)
        assert_identical(params(model), w, "params")
    del opt.param_groups[0]["decoupled_weight_decay"]


@pytest.mark.parametrize("spec", [s for s in SPECS if s.first_arg is FirstArg.NAMED_PARAMETERS], ids=lambda s: s.name)
def test_a_misspelt_group_key_is_named_with_the_key_it_resembles(spec: OptimizerSpec,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A group's ``weight_decy`` (or ``Lr``) was ignored without a word, as torch ignores it: the group
    trained on the default. A warning names the key and the hyperparameter it resembles; the user's own
    tags and the keys torch's schedulers write stay quiet."""
    named = list(tiny_mlp(0).named_parameters())
    with caplog.at_level("WARNING", logger="lightning_soaa.optim.param_checks"):
        spec.load()([{"params": named[:1], "weight_decy": 0.1, "tag": "decay", "initial_lr": 0.1, "lr_scale": 0.5},
                     {"params": named[1:2], "LR": 0.5, "name": "rest", "max_lr": 1.0, "lrs": 2},
                     {"params": named[2:], "learning_rate": 0.1}], **spec.test_kwargs)
    said = [r.getMessage() for r in caplog.records if r.name == "lightning_soaa.optim.param_checks"]
    assert len(said) == 3, said
    assert "param group 0 has the key 'weight_decy'" in said[0] and "Did you mean 'weight_decay'?" in said[0]
    assert "param group 1 has the key 'LR'" in said[1] and "Did you mean 'lr'?" in said[1]
    assert "param group 2 has the key 'learning_rate'" in said[2] and "Did you mean 'lr'?" in said[2]


def test_another_optimizers_option_in_a_group_is_named(caplog: pytest.LogCaptureFixture) -> None:
    """ASGO's ``max_block_size`` in a DASGO group was accepted and never read (DASGO cuts by
    ``max_block_numel``): a warning names whose option it is."""
    named = list(tiny_mlp(0).named_parameters())
    with caplog.at_level("WARNING", logger="lightning_soaa.optim.param_checks"):
        get("DASGO").load()([{"params": named, "max_block_size": 3}], lr=1e-2)
    said = [r.getMessage() for r in caplog.records if r.name == "lightning_soaa.optim.param_checks"]
    assert len(said) == 1 and "'max_block_size', an option of ASGO that DASGO does not have" in said[0], said


@each_optimizer
def test_params_list_edited_in_place_is_refused(spec: OptimizerSpec) -> None:
    """``param_groups[0]["params"].append(p)`` (or ``pop()``) keeps the list's identity: an appended
    parameter was never stepped and a removed one still was, silently (2.6e-2 off torch). Refused at the
    step, naming add_param_group, with nothing changed; the list put back, training goes on."""
    model, opt = make(spec)
    step(spec, model, opt, 0)
    before, w = copy.deepcopy(opt.state_dict()), params(model)
    plist = opt.param_groups[0]["params"]
    for edit in ("append", "pop", "replace"):
        saved = list(plist)
        if edit == "append":
            plist.append(torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)))
        elif edit == "pop":
            plist.pop()
        else:
            plist[0] = torch.nn.Parameter(plist[0].detach().clone())
        with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\] was edited in place.*add_param_group"):
            step(spec, model, opt, 1)
        plist[:] = saved
        assert_identical(params(model), w, "params")
        assert_identical(opt.state_dict(), before)
    step(spec, model, opt, 1)
    assert opt.num_steps == 2


@each_optimizer
def test_a_list_hyperparameter_edited_in_place_is_checked(spec: OptimizerSpec) -> None:
    """``betas=[0.9, 0.95]`` (a YAML list) edited in place, ``group["betas"][1] = 1.5``, is the same
    object, so the per-step check skipped it: NaN in the parameters (AdamW, DASGO), a bare math error
    (SOAA). Refused like the same value assigned anew; a valid in-place edit is used."""
    model, opt = make(spec)
    group = opt.param_groups[0]
    key = next((k for k, v in group.items() if k != "params" and isinstance(v, tuple) and len(v) == 2
                and all(isinstance(x, float) for x in v)), None)
    if key is None:
        pytest.skip(f"{spec.name} has no pair of float hyperparameters")
    group[key] = list(group[key])
    step(spec, model, opt, 0)
    w = params(model)
    good = group[key][1]
    group[key][1] = 1.5
    with pytest.raises(ValueError, match=re.escape(f"Invalid {key}[1]=1.5")):
        step(spec, model, opt, 1)
    assert_identical(params(model), w, "params")
    group[key][1] = good
    step(spec, model, opt, 1)
    assert opt.num_steps == 2


def _another_value(value: Any) -> Any:
    """A value unlike ``value`` of its kind (valid or not: either way the optimizer must not ignore it)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return type(value)(value * 2 + 1)
    if isinstance(value, tuple):
        return tuple(_another_value(v) for v in value)
    return 1 if value is None else f"{value}_changed"


@each_optimizer
def test_a_constructor_option_written_into_a_param_group_is_refused_not_ignored(spec: OptimizerSpec) -> None:
    """Writing a hyperparameter into ``param_groups`` is how torch code anneals it (a scheduler, a callback).
    An option of the constructor that the optimizer does not read from its groups (EGN's damping, line
    search, ...; SOAA's trust region) was stepped as if unwritten: the run equalled the unedited one bit for
    bit (EGN). Each is refused at the step, naming it, with nothing changed; the next step works."""
    fields = [f.name for f in dataclasses.fields(spec.load_config())]
    model, opt = make(spec)
    step(spec, model, opt, 0)
    group = opt.param_groups[0]
    config = getattr(opt, "config", None)
    outside = [k for k in fields if k not in group and hasattr(config, k)]
    if not outside:
        pytest.skip(f"every option of {spec.name} is a param-group option")
    for k in outside:
        w = params(model)
        group[k] = _another_value(getattr(config, k))
        with pytest.raises(ValueError, match=rf"Invalid {k}="):
            step(spec, model, opt, 1)
        assert_identical(params(model), w, "params")
        del group[k]
    step(spec, model, opt, 1)
    assert opt.num_steps == 2


@each_optimizer
def test_a_loss_or_batch_passed_as_the_closure_is_refused_saying_how(spec: OptimizerSpec) -> None:
    """``opt.step(loss)`` / ``EGN.step((x, y))``: the argument is the closure, and torch's "'Tensor' object is
    not callable" said nothing of the keyword that takes it. Refused naming it, nothing changed."""
    model, opt = make(spec)
    x, y = data(0)
    w = params(model)
    arg: Any = (x, y) if spec.needs is StepNeeds.BATCH else half_mse(model(x), y).detach()
    with pytest.raises(TypeError, match=r"step\((inputs=x, targets=y|loss=loss)\)"):
        opt.step(arg)
    assert_identical(params(model), w, "params")
    assert opt.num_steps == 0


@each_optimizer
def test_a_group_value_holding_tensors_is_not_compared_by_value(spec: OptimizerSpec) -> None:
    """A list of tensors kept in a group (user data next to the hyperparameters) is compared by identity:
    ``==`` on its elements raised torch's "Boolean value of Tensor ... is ambiguous" outside the held
    error path (at W = 2 the other rank was left waiting)."""
    model, opt = make(spec)
    opt.param_groups[0]["aux"] = [torch.zeros(3), torch.ones(3)]
    step(spec, model, opt, 0)
    opt.param_groups[0]["aux"][0] = torch.full((3,), 2.0)
    step(spec, model, opt, 1)
    assert opt.num_steps == 2


@each_optimizer
def test_load_state_dict_inside_inference_mode_then_steps(spec: OptimizerSpec) -> None:
    """A state loaded inside ``torch.inference_mode()`` was made of inference tensors: every later step
    raised torch's bare "Inplace update to inference tensor" (torch's AdamW steps on). The load runs with
    inference mode off: the resumed run equals the one loaded outside it, bit for bit."""
    model, opt = make(spec)
    for t in range(2):
        step(spec, model, opt, t)
    sd, w = copy.deepcopy(opt.state_dict()), {k: v.clone() for k, v in model.state_dict().items()}
    runs = []
    for inside in (True, False):
        m, o = make(spec)
        m.load_state_dict(w)
        with torch.inference_mode() if inside else contextlib.nullcontext():
            o.load_state_dict(copy.deepcopy(sd))
        for t in range(2, 4):
            step(spec, m, o, t)
        runs.append(params(m))
    assert_identical(runs[0], runs[1], "params")


@each_optimizer
def test_numpy_float32_hyperparameters_step_as_python_floats(spec: OptimizerSpec) -> None:
    """Float hyperparameters written as NumPy float32 (a config or sweep tool's values) step exactly as the
    same values as Python floats (SOAA's scalar arithmetic became float32: 6e-8 off in 6 steps)."""
    import numpy as np

    def prepare(_model: Any, opt: Any, as_numpy: bool) -> None:
        for g in opt.param_groups:
            for k, v in list(g.items()):
                pair = isinstance(v, tuple) and v and all(type(x) is float for x in v)
                if k == "lr" or type(v) is not float and not pair:
                    continue
                conv = (lambda x: np.float32(x)) if as_numpy else (lambda x: float(np.float32(x)))
                g[k] = tuple(conv(x) for x in v) if isinstance(v, tuple) else conv(v)

    _train_alike(spec, prepare, steps=4)


@each_optimizer
def test_a_step_inside_inference_mode_equals_one_outside(spec: OptimizerSpec) -> None:
    """torch's optimizers step inside ``torch.inference_mode()``; ours raised torch's bare "Inference tensors
    do not track version counter", and a first step there left inference-tensor state no later step could
    update. The step runs with inference mode off: equal, bit for bit, to the steps outside."""
    runs = []
    for inside in (True, False):
        model, opt = make(spec)
        for t in range(3):
            if inside and t < 2:  # the first steps inside, the last outside (the state made inside)
                x, y = data(t)
                if spec.needs is StepNeeds.BATCH:
                    with torch.inference_mode():
                        opt.step(inputs=x, targets=y)
                    continue
                opt.zero_grad(set_to_none=True)
                loss = half_mse(model(x), y)
                loss.backward()
                with torch.inference_mode():
                    opt.step(loss=loss.detach()) if spec.needs is StepNeeds.LOSS else opt.step()
            else:
                step(spec, model, opt, t)
        runs.append(params(model))
    assert_identical(runs[0], runs[1], "params")


@each_optimizer
def test_parameters_made_under_inference_mode_step_as_plain_ones(spec: OptimizerSpec) -> None:
    """A model built inside ``torch.inference_mode()`` has inference-tensor parameters, which torch lets change
    in place only inside it. ASGO's and DASGO's matrix update wrote them outside it: torch's bare "Inplace
    update to inference tensor outside InferenceMode" mid-update, the biases already stepped and the matrices
    not. Every optimizer steps them as it steps plain ones, bit for bit (the gradients are given: autograd
    cannot save such a weight for backward, an optimizer taking the batch differentiates its own copy)."""
    runs = []
    for inside in (True, False):
        with torch.inference_mode() if inside else contextlib.nullcontext():
            model = tiny_mlp(0, torch.float64, sizes=SIZES)
        opt = spec.build(model, **spec.test_kwargs)
        g = torch.Generator().manual_seed(1)
        for t in range(3):
            if spec.needs is StepNeeds.BATCH:
                step(spec, model, opt, t)
                continue
            for p in model.parameters():
                p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)
            opt.step(loss=torch.tensor(0.5, dtype=torch.float64)) if spec.needs is StepNeeds.LOSS else opt.step()
        runs.append(params(model))
    assert_identical(runs[0], runs[1], "params")


# ---------------------------------------------------------------------------------------- layout options
@each_optimizer
def test_a_block_layout_option_written_after_construction_is_refused(spec: OptimizerSpec) -> None:
    """``max_block_numel`` / ``max_block_size`` / ``use_asgo`` decide the block table when the optimizer is
    built; written into a group later, they were accepted and silently not used (ASGO: 7 blocks instead
    of 4, 3.6e-2 off an optimizer built with the value)."""
    model, opt = make(spec)
    step(spec, model, opt, 0)
    keys = list(opt._layout[0])
    if spec.name == "EGN":
        assert not keys  # whole parameters are its blocks: no such option
        return
    assert keys, spec.name
    for k in keys:
        old = opt.param_groups[0].get(k)
        opt.param_groups[0][k] = ((old is False) if k == "use_asgo" else 1 - old if k == "batch_dims"  # 0 or 1
                                  else (None if old else [0]) if k == "adamw_indices"  # positions in the group
                                  # (position, parts) pairs: the first weight (8 x 6) as two parts
                                  else (None if old else ((0, 2),)) if k == "fused_parts"
                                  else (3 if old != 3 else 5))
        sd, w = copy.deepcopy(opt.state_dict()), params(model)
        # a state dict saved in between holds the value the blocks were built with (it carried the written
        # one, which no optimizer could load: the built one refused the value, one built with it the layout)
        assert sd["param_groups"][0].get(k) == opt._layout[0][k], (k, sd["param_groups"][0].get(k))
        fresh_model, fresh = make(spec)
        fresh.load_state_dict(copy.deepcopy(sd))
        with pytest.raises(ValueError, match=re.escape(f"{k}=") + ".*written into the group after construction"):
            step(spec, model, opt, 1)
        assert_identical(params(model), w, "params")
        # add_param_group rebuilds the table: it took the written value as built (ASGO then stepped a block
        # holding ASGO state as AdamW: KeyError; a re-cut left the new group and table half-installed)
        groups = len(opt.param_groups)
        extra = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"add_param_group: param_groups\[0\]: .*written into the group"):
            opt.add_param_group({"params": [("extra", extra)] if "param_names" in opt.param_groups[0] else [extra]})
        assert len(opt.param_groups) == groups
        assert_identical(opt.state_dict()["state"], sd["state"])
        if old is None:  # unset (or None) either way: the option as built
            opt.param_groups[0].pop(k, None)
        else:
            opt.param_groups[0][k] = old
    step(spec, model, opt, 1)  # put back: steps again
    assert opt.num_steps == 2


# ---------------------------------------------------------------------------------------- replaced groups
@each_optimizer
def test_groups_whose_tensors_a_wrapper_replaced_are_refused(spec: OptimizerSpec) -> None:
    """A wrapper that puts its own tensors into the groups (DeepSpeed's ZeRO optimizer, handed the
    optimizer object; tested with the real DeepSpeed in tests/deepspeed/test_config.py) left the optimizer
    stepping tensors nothing reads: the model never changed, silently. Refused, nothing changed."""
    model, opt = make(spec)
    step(spec, model, opt, 0)
    original = opt.param_groups[0]["params"]
    opt.param_groups[0]["params"] = [p.detach().clone().requires_grad_() for p in original]
    sd, w = copy.deepcopy(opt.state_dict()), params(model)
    with pytest.raises(ValueError, match=re.escape("param_groups[0]['params'] is no longer the list of tensors")):
        step(spec, model, opt, 1)
    assert_identical(params(model), w, "params")
    assert_identical(opt.state_dict()["state"], sd["state"])
    assert opt.num_steps == 1
    opt.param_groups[0]["params"] = original  # put back: steps again
    step(spec, model, opt, 1)
    assert opt.num_steps == 2


# ---------------------------------------------------------------------------------------- zero gradients
#: the zero-gradient step's dtypes, with the tolerance of "scaled by one factor" in each
_ZERO_GRAD_DTYPES = {torch.float64: (1e-12, 1e-14), torch.float32: (1e-6, 1e-7), torch.bfloat16: (1e-2, 1e-2)}


@pytest.mark.parametrize("dtype", list(_ZERO_GRAD_DTYPES), ids=str)
@each_optimizer
def test_zero_gradients_move_the_parameters_by_weight_decay_at_most_and_write_no_nan(spec: OptimizerSpec,
                                                                                      dtype: torch.dtype) -> None:
    """A step with all gradients zero (a batch the model already fits, a frozen branch, an adaLN-Zero
    gate): updates that normalise by the update's size must not divide zero by zero (ASGO's RMS factor
    over a 32x24 matrix once turned such a step into NaN parameters; DASGO's float64 norm of a float32 or
    bf16 matrix cut into blocks once gave a factor that rounded to inf). Each parameter may only be
    scaled (weight decay). Parameters are cut into several blocks where the optimizer takes
    ``max_block_numel``."""
    sizes = (6, 32, 24, 3)
    model = tiny_mlp(0, dtype, sizes=sizes)
    split = {"max_block_numel": 64} if takes_kwarg(spec, "max_block_numel") else {}
    opt = spec.build(model, **{**spec.test_kwargs, **split})
    if split:
        assert any(len(blocks) > 1 for blocks in opt.block_table.by_param)
    w0 = params(model)

    def zero() -> None:
        for p in model.parameters():
            assert p.grad is not None
            p.grad.zero_()

    for t in range(3):
        x, y = (u.to(dtype) for u in data(t, sizes))
        if spec.needs is StepNeeds.BATCH:  # the optimizer differentiates itself: a zero residual
            with torch.no_grad():
                y = model(x)
        spec.take_step(opt, model, x, y, on_gradients=zero)
    rtol, atol = _ZERO_GRAD_DTYPES[dtype]
    for i, (a, b) in enumerate(zip(params(model), w0)):
        assert torch.isfinite(a).all(), (spec.name, i)
        a64, b64 = a.double(), b.double()
        scale = float((a64 * b64).sum() / (b64 * b64).sum())
        assert 0.0 < scale <= 1.0 + rtol, (spec.name, i, scale)
        torch.testing.assert_close(a64, b64 * scale, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------- float16
@pytest.mark.parametrize("strided", [False, True], ids=["", "strided"])
@each_optimizer
def test_float16_parameters_with_small_gradients_step_like_float32(spec: OptimizerSpec, strided: bool) -> None:
    """Pure float16 training (``model.half()``, Lightning's ``precision="16-true"``) with small gradients:
    in float16 eps = 1e-8 and v = (1 - β2) g² round to 0, so an update computed in float16 divides by
    zero (SOAA wrote inf into a fifth of the parameters at its first step). The first step from a zero
    state must match the same step in float32 to float16's rounding, and no step may write a non-finite
    value. ``strided``: the weights stored transposed (as channels_last stores a conv's): AdamW's blocks
    of another layout than contiguous took the float16 foreach ops (NaN and inf in every weight)."""
    sizes = (6, 32, 24, 3)
    model16 = tiny_mlp(0, torch.float16, sizes=sizes)
    model32 = copy.deepcopy(model16).float()
    for p in (*model16.parameters(), *model32.parameters()):
        if strided and p.dim() == 2:
            p.data = p.data.t().contiguous().t()
    opts = [spec.build(m, **spec.test_kwargs) for m in (model16, model32)]

    def small() -> None:
        for p in model16.parameters():
            if p.grad is not None:
                p.grad.mul_(1e-3)

    def same_as_float16() -> None:  # the optimizers' arithmetic is compared, not the two backward passes
        for p, q in zip(model32.parameters(), model16.parameters()):
            p.grad = None if q.grad is None else q.grad.float()

    for t in range(3):
        for model, opt, hook in ((model16, opts[0], small), (model32, opts[1], same_as_float16)):
            dtype = next(model.parameters()).dtype
            x, y = (u.to(dtype) for u in data(t, sizes))
            spec.take_step(opt, model, x, y, on_gradients=hook)
        for i, p in enumerate(model16.parameters()):
            assert torch.isfinite(p).all(), (spec.name, t, i)
        if t == 0:
            for a, b in zip(model16.parameters(), model32.parameters()):
                torch.testing.assert_close(a.float(), b, rtol=2e-3, atol=2e-3)


def _widened(sd: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """A state dict with its ``dtype`` state tensors in float32 (exactly: float32 holds every such value)."""
    def widen(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: widen(v) for k, v in x.items()}
        return x.float() if isinstance(x, Tensor) and x.dtype == dtype else x

    return {**sd, "state": widen(sd["state"])}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@each_optimizer
def test_low_precision_parameters_are_stepped_in_float32_and_rounded_once(spec: OptimizerSpec,
                                                                          dtype: torch.dtype) -> None:
    """A float16/bf16 parameter's step (decay and update) is computed in float32 and rounded once: at
    every step the result is the float32 step from the same weights and gradients, rounded. ASGO/DASGO
    decayed such weights in their own dtype and added the update cast to it (three roundings a step: 2-7x
    the error of one after 50 steps, against float64). The reference starts every step from the low run's
    weights and state (SOAA and AdamW keep float16 moments, as torch's fused AdamW does) and gets its
    gradients: elements may differ by one ulp where the new moments' rounding moves the update, few of
    them, none by more."""
    if spec.needs is StepNeeds.BATCH:
        pytest.skip("it differentiates the model itself: its step from a low-precision forward is not the "
                    "float32 one (and it has no weight decay to round twice)")
    sizes = (6, 32, 24, 3)
    low = tiny_mlp(0, dtype, sizes=sizes)
    ref = copy.deepcopy(low).float()
    opts = [spec.build(m, **spec.test_kwargs) for m in (low, ref)]
    off = total = 0

    def same() -> None:
        for p, q in zip(ref.parameters(), low.parameters()):
            p.grad = q.grad.float()

    for t in range(6):
        with torch.no_grad():  # the reference steps from the same weights, state and gradients
            for p, q in zip(ref.parameters(), low.parameters()):
                p.copy_(q)
        if t:
            opts[1].load_state_dict(_widened(opts[0].state_dict(), dtype))
        x, y = data(t, sizes)
        loss = spec.take_step(opts[0], low, x.to(dtype), y.to(dtype))
        spec.take_step(opts[1], ref, x.float(), y.float(), lambda o, yy, v=float(loss): half_mse(o, yy) * 0.0 + v,
                       on_gradients=same)
        for a, b in zip(low.parameters(), ref.parameters()):
            r = b.to(dtype).float()  # in ulps of the rounded reference's own binade
            ulps = (a.float() - r).abs() / (torch.finfo(dtype).eps * r.abs().clamp_min(torch.finfo(dtype).tiny))
            assert float(ulps.max()) <= 1.0 + 1e-6, (spec.name, t, float(ulps.max()))
            off += int((ulps > 0).sum())
            total += a.numel()
    assert off <= 0.02 * total, (spec.name, off, total)


# ---------------------------------------------------------------------------------------- torch.compile
@each_optimizer
def test_a_compiled_training_step_equals_the_eager_one(spec: OptimizerSpec) -> None:
    """``torch.compile`` of a function that runs forward, backward and ``opt.step()`` (torch's recipe for
    its own optimizers): the step runs eagerly inside it. Traced, ShardedAdamW/ASGO/DASGO failed in
    AOT functionalization (an internal assert, after their step counters had moved), EGN with an
    AttributeError, and SOAA recompiled at every step (its scalars were baked into the graphs). The
    function also sets the lr (a hand-written schedule): dynamo writes the traced groups back with
    ``capturable=True`` in them, which every optimizer refused as an option it lacks, at every step.
    ``aot_eager``: the same tracing and functionalization as inductor, without its C++ build."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    runs = []
    for compiled in (False, True):
        model, opt = make(spec)

        lr0 = opt.param_groups[0]["lr"]

        def train(t: int, model: torch.nn.Module = model, opt: Any = opt, lr0: float = lr0) -> None:
            for g in opt.param_groups:
                g["lr"] = lr0 / (1.0 + t)
            x, y = data(t)
            spec.take_step(opt, model, x, y)

        fn = torch.compile(train, backend="aot_eager") if compiled else train
        for t in range(5):
            fn(t)
            if t == 2:  # (t, a Python int, and the lr written from it become dynamic by their third values)
                graphs = counters["stats"]["unique_graphs"]
        runs.append((model, opt))
    (m_eager, o_eager), (m_comp, o_comp) = runs
    assert o_comp.num_steps == o_eager.num_steps == 5
    assert_close(params(m_comp), params(m_eager), rtol=1e-12, atol=1e-14)
    # graphs of the forward, backward and the lr writes only: nothing of the step's is traced, nothing is
    # recompiled at later steps (SOAA's scalars baked into a graph recompiled it at every one)
    assert counters["stats"]["unique_graphs"] == graphs <= 6, dict(counters["stats"])


# ---------------------------------------------------------------------------------------- hooks
@each_optimizer
def test_step_hooks_fire_once_per_step_including_skipped_steps(spec: OptimizerSpec) -> None:
    """Hooks wrap ``step()`` (torch's rule): every call fires pre and post once, also one the optimizer
    skips for a non-finite value. A copy does not carry them (torch's ``__getstate__`` drops hooks)."""
    model, opt = make(spec)
    calls: list[tuple[str, int]] = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o.num_steps + o.skipped_steps)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o.num_steps + o.skipped_steps)))
    step(spec, model, opt, 0)
    step(spec, model, opt, 1, poison=True)
    step(spec, model, opt, 2)
    assert opt.skipped_steps == 1 and opt.num_steps == 2
    assert calls == [("pre", 0), ("post", 1), ("pre", 1), ("post", 2), ("pre", 2), ("post", 3)]
    model2, opt2 = copy.deepcopy((model, opt))
    step(spec, model2, opt2, 3)
    assert len(calls) == 6


# ---------------------------------------------------------------------------------------- non-finite
@each_optimizer
def test_nonfinite_step_is_skipped_and_changes_nothing(spec: OptimizerSpec) -> None:
    model, opt = make(spec)
    for t in range(2):
        step(spec, model, opt, t)
    sd, w = copy.deepcopy(opt.state_dict()), params(model)
    step(spec, model, opt, 2, poison=True)
    assert opt.skipped_steps == 1 and opt.num_steps == 2
    assert opt.statistics()["skipped_steps"] == 1.0
    assert_identical(params(model), w, "params")
    assert_identical(without_skips(opt.state_dict()), without_skips(sd))


@pytest.mark.parametrize("spec", [s for s in SPECS if s.needs is not StepNeeds.BATCH], ids=lambda s: s.name)
def test_finite_gradients_whose_float32_norm_overflows_are_stepped(spec: OptimizerSpec) -> None:
    """Ten gradient entries of 1e19 are finite (torch's AdamW steps them), but their float32 norm is
    not (3e19 squared > 3.4e38): the non-finite check must not skip the step for that."""
    model = tiny_mlp(0, torch.float32)
    opt = spec.build(model, **spec.test_kwargs)
    target = list(model.parameters())[0]

    def huge() -> None:
        assert target.grad is not None
        target.grad.view(-1)[:10] = 1e19

    x, y = (u.float() for u in data(0))
    spec.take_step(opt, model, x, y, on_gradients=huge)
    assert opt.skipped_steps == 0 and opt.num_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------- shortcuts
def _shortcut_pair(spec: OptimizerSpec) -> tuple[list[tuple[Any, Any]], list[bool]]:
    """Two equal runs, the first with its shortcut (counted in the returned list), the second always on
    the template."""
    runs = [make(spec), make(spec)]
    runs[1][1]._planned_step = lambda: False  # type: ignore[method-assign]  # always the template
    taken: list[bool] = []
    shortcut = runs[0][1]._planned_step

    def counted() -> bool:
        taken.append(shortcut())
        return taken[-1]
    runs[0][1]._planned_step = counted  # type: ignore[method-assign]
    return runs, taken


def _assert_same_runs(runs: list[tuple[Any, Any]]) -> None:
    (ma, oa), (mb, ob) = runs
    assert_identical(params(ma), params(mb), "params")
    assert_identical(oa.state_dict(), ob.state_dict())
    assert oa.statistics() == ob.statistics()
    assert (oa.num_steps, oa.skipped_steps) == (ob.num_steps, ob.skipped_steps)


def _assert_taken_if_any(spec: OptimizerSpec, runs: list[tuple[Any, Any]], taken: list[bool]) -> None:
    if type(runs[0][1])._planned_step is not ShardedOptimizer._planned_step:
        assert any(taken), f"{spec.name} has a shortcut step but never took it"


@each_optimizer
def test_a_shortcut_step_takes_the_templates_bits_and_effects(spec: OptimizerSpec) -> None:
    """``ShardedOptimizer._planned_step`` (a shortcut past the step template, SOAA's planned step at W = 1)
    either runs the whole step with the template's bits and effects or changes nothing: training with it
    and with it turned off gives the same parameters, state, statistics and step counts after every step,
    through a skipped (non-finite) step and a missing gradient. An optimizer that has a shortcut must take
    it here (else the comparison would test nothing)."""
    runs, taken = _shortcut_pair(spec)
    for t in range(8):
        for model, opt in runs:
            if t == 5 and spec.needs is not StepNeeds.BATCH:  # the first parameter without a gradient
                first = next(iter(model.parameters()))
                spec.take_step(opt, model, *data(t), on_gradients=lambda p=first: setattr(p, "grad", None))
            else:
                step(spec, model, opt, t, poison=t == 3)
        _assert_same_runs(runs)
    assert runs[1][1].skipped_steps == 1
    _assert_taken_if_any(spec, runs, taken)


#: what a training loop may do between steps, for any optimizer (a shortcut must notice each, or be immune)
_BETWEEN_STEPS: dict[str, Any] = {
    "lr": lambda model, opt: [g.__setitem__("lr", g["lr"] * 0.7) for g in opt.param_groups],
    "reload": lambda model, opt: opt.load_state_dict(copy.deepcopy(opt.state_dict())),
    "move_parameter": lambda model, opt: setattr(next(iter(model.parameters())), "data",
                                                 next(iter(model.parameters())).data.clone()),
    "scale_parameter": lambda model, opt: next(iter(model.parameters())).data.mul_(0.9),
}


@pytest.mark.parametrize("seed", range(2))
@each_optimizer
def test_a_shortcut_step_holds_through_random_interference(spec: OptimizerSpec, seed: int) -> None:
    """The same comparison through random sequences of what a loop does between steps (an lr schedule,
    a state_dict reload, a parameter moved to new storage or scaled in place) and of non-finite or
    missing gradients, several per run and on consecutive steps (fixed seeds)."""
    rng = random.Random(seed)
    events = [*sorted(_BETWEEN_STEPS), "poison"] + (["drop_gradient"] if spec.needs is not StepNeeds.BATCH else [])
    plan = [rng.choice(events) if t > 0 and rng.random() < 0.5 else None for t in range(16)]
    runs, taken = _shortcut_pair(spec)
    for t, event in enumerate(plan):
        for model, opt in runs:
            if event in _BETWEEN_STEPS:
                _BETWEEN_STEPS[event](model, opt)
            if event == "drop_gradient":
                first = next(iter(model.parameters()))
                spec.take_step(opt, model, *data(t), on_gradients=lambda p=first: setattr(p, "grad", None))
            else:
                step(spec, model, opt, t, poison=event == "poison")
        _assert_same_runs(runs)
    _assert_taken_if_any(spec, runs, taken)


@each_optimizer
def test_a_subclass_overriding_a_template_hook_has_it_called_at_every_step(spec: OptimizerSpec) -> None:
    """A subclass that overrides the template's ``_apply`` (say, to log or clip the update) has it called at
    every step it takes, as the template calls it: a shortcut step that stands in for the hook (the planned
    steps of SOAA, ASGO and EGN at W = 1) is not taken for it (they were: SOAA's and ASGO's override ran at the
    first step only, EGN's never, skipped without a word at the others)."""
    calls: list[int] = []

    def _apply(self: Any, views: Any, decision: Any) -> None:
        calls.append(self.num_steps)
        super(sub, self)._apply(views, decision)

    base = spec.load()
    sub = type(f"Logging{base.__name__}", (base,), {"_apply": _apply})
    model = tiny_mlp(0, torch.float64)
    kwargs = dict(spec.test_kwargs, loss="mse") if spec.first_arg is FirstArg.MODULE else dict(spec.test_kwargs)
    opt = sub(spec.first_argument(model), **kwargs)
    for t in range(8):
        step(spec, model, opt, t)
    assert opt.num_steps == 8 and calls == list(range(8)), (opt.num_steps, calls)


# ---------------------------------------------------------------------------------------- checkpoints
def _round_trip_bytes(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what torch.load does by default since 2.6


def _continue_both(spec: OptimizerSpec, a: tuple[Any, Any], b: tuple[Any, Any], steps: range) -> None:
    for t in steps:
        step(spec, *b, t)  # the copy first: a shared buffer would show up as a difference
        step(spec, *a, t)
    assert_identical(params(b[0]), params(a[0]), "params")
    assert_identical(b[1].state_dict(), a[1].state_dict())


@each_optimizer
def test_state_dict_round_trip_continues_identically(spec: OptimizerSpec) -> None:
    model, opt = make(spec)
    for t in range(3):
        step(spec, model, opt, t)
    saved = _round_trip_bytes({"model": model.state_dict(), "opt": opt.state_dict()})
    model2, opt2 = make(spec, seed=7, lr=3 * spec.test_kwargs["lr"])  # lr comes back from the state
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["lr"] == spec.test_kwargs["lr"]
    assert opt2.num_steps == 3
    assert_identical(opt2.state_dict(), opt.state_dict())
    _continue_both(spec, (model, opt), (model2, opt2), range(3, 6))


def _tensors(tree: Any) -> list[Tensor]:
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


@each_optimizer
def test_a_state_dict_shares_no_memory_with_the_live_state_or_the_loaded_one(spec: OptimizerSpec) -> None:
    """A save hands the live tensors to its join and copies what it keeps; a load re-cuts by views and copies
    each block once (optim/base.py, distributed/reblock.py: the memory of turn 38). So: a state dict held in
    memory (an async writer's, a DCP stage's) does not change with the next step, and a loaded optimizer does
    not share memory with the dict it loaded (loading it twice does not couple the two)."""
    model, opt = make(spec)
    for t in range(2):
        step(spec, model, opt, t)
    sd = opt.state_dict()
    kept = copy.deepcopy(sd)

    def ptrs(tensors: list[Tensor]) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}

    assert not ptrs(_tensors(sd["state"])) & ptrs(_tensors(opt.state))
    model2, opt2 = make(spec)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(sd)
    assert not ptrs(_tensors(opt2.state)) & ptrs(_tensors(sd["state"]))
    for t in range(2, 4):
        step(spec, model, opt, t)
        step(spec, model2, opt2, t)
    assert_identical(sd, kept)


def _row_blocked(spec: OptimizerSpec) -> bool:
    """Optimizers whose blocks are the base's row ranges of ``max_block_numel`` elements (a param-group
    option): their elementwise state loads into any other row blocking."""
    cls = spec.load()
    return (issubclass(cls, ShardedOptimizer) and cls.elementwise
            and cls._block_specs is ShardedOptimizer._block_specs)


def _make_blocked(spec: OptimizerSpec, max_block_numel: int) -> tuple[Any, Any]:
    model, _ = make(spec)
    kwargs = {k: v for k, v in spec.test_kwargs.items() if k != "max_block_numel"}
    return model, spec.load()([{"params": list(model.parameters()), "max_block_numel": max_block_numel}], **kwargs)


@pytest.mark.parametrize("numels", [(7, 10**9), (10**9, 7), (7, 13)],
                         ids=["cut-to-whole", "whole-to-cut", "cut-to-cut"])
@each_optimizer
def test_a_checkpoint_loads_into_another_row_blocking(spec: OptimizerSpec, numels: tuple[int, int]) -> None:
    """Saved with one ``max_block_numel`` (or world size: the automatic block size depends on it),
    resumed with another: the state is re-cut and the run continues as if it had used the new blocks
    from the start (to rounding: global sums are added in another order)."""
    if not _row_blocked(spec):
        pytest.skip(f"{spec.name} does not cut parameters into row blocks")
    saved_numel, new_numel = numels
    model_ref, opt_ref = _make_blocked(spec, new_numel)
    model, opt = _make_blocked(spec, saved_numel)
    for t in range(3):
        step(spec, model_ref, opt_ref, t)
        step(spec, model, opt, t)
    saved = _round_trip_bytes({"model": model.state_dict(), "opt": opt.state_dict()})
    model2, opt2 = _make_blocked(spec, new_numel)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert len(opt2.block_table.blocks) == len(opt_ref.block_table.blocks) != len(opt.block_table.blocks)
    assert opt2.param_groups[0]["max_block_numel"] == new_numel
    for t in range(3, 6):
        step(spec, model_ref, opt_ref, t)
        step(spec, model2, opt2, t)
    assert_close(params(model2), params(model_ref), "params")
    assert_close(opt2.state_dict(), opt_ref.state_dict())


@pytest.mark.parametrize("scheduled", [False, True], ids=["", "scheduled"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@each_optimizer
def test_copies_continue_identically(spec: OptimizerSpec, how: str, scheduled: bool) -> None:
    """``scheduled``: an LR scheduler puts a wrapper of the original's step() into the optimizer's
    ``__dict__``; copied along, the copy's step() stepped the original (pickle refused it)."""
    model, opt = make(spec)
    if scheduled:
        torch.optim.lr_scheduler.StepLR(opt, step_size=100)  # lr unchanged over the test
    for t in range(2):
        step(spec, model, opt, t)
    if how == "deepcopy":
        alone = copy.deepcopy(opt)  # the optimizer alone: its own copies of the parameters
        assert_identical(alone.state_dict(), opt.state_dict())
        assert not any(p is q for p, q in zip(alone.param_groups[0]["params"], model.parameters()))
        twin = copy.deepcopy((model, opt))
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps((model, opt)))
    else:
        buf = io.BytesIO()
        torch.save((model, opt), buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    assert twin[1].param_groups[0]["params"][0] is next(twin[0].parameters())
    assert_identical(twin[1].state_dict(), opt.state_dict())
    _continue_both(spec, (model, opt), twin, range(2, 5))


@each_optimizer
def test_parameters_replaced_through_data_are_the_ones_updated(spec: OptimizerSpec) -> None:
    # Optimizers keep views into the parameters between steps; `p.data = ...` (new storage, as a
    # checkpoint loader or a dtype round trip does) must be followed, bit for bit as an in-place change.
    model, opt = make(spec)
    for t in range(2):
        step(spec, model, opt, t)
    twin = copy.deepcopy((model, opt))
    with torch.no_grad():
        for p, q in zip(model.parameters(), twin[0].parameters()):
            p.data = p.data * 0.5  # new storage on one side
            q.mul_(0.5)  # the same values in place on the other
    _continue_both(spec, (model, opt), twin, range(2, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()  # new storage, same values
    _continue_both(spec, (model, opt), twin, range(5, 7))


def _state_tensors(state: Any) -> Iterator[tuple[dict[Any, Any], Any, Tensor]]:
    """(dict, key, tensor) of every floating-point tensor in an optimizer's state (row blocks: sub-dicts)."""
    for st in list(state.values()):
        yield from _in_dict(st)


def _in_dict(st: Any) -> Iterator[tuple[dict[Any, Any], Any, Tensor]]:
    if not isinstance(st, dict):
        return
    for k, v in list(st.items()):
        if isinstance(v, dict):
            yield from _in_dict(v)
        elif isinstance(v, Tensor) and v.is_floating_point():
            yield st, k, v


@pytest.mark.parametrize("how", ["in-place", "replaced", "new-storage"])
@pytest.mark.parametrize("which", ["counters", "arrays"])
@each_optimizer
def test_state_changed_between_steps_is_what_the_next_step_reads(spec: OptimizerSpec, which: str, how: str) -> None:
    """Optimizers keep what they derive from their state between steps (step counts, the moments' sums,
    SOAA's step plan): a state tensor changed from outside, in place, replaced by another tensor or given
    new storage through ``.data`` (no version bump), must be read as it is now, bit for bit as a copy of
    the optimizer (which carries none of those caches) reads the same values. ``counters``: the 0-d
    tensors (step counts) go back by one; ``arrays``: the others are halved."""
    model, opt = make(spec)
    for t in range(3):
        step(spec, model, opt, t)
    twin = copy.deepcopy((model, opt))
    pairs = [(a, b) for a, b in zip(_state_tensors(opt.state), _state_tensors(twin[1].state))
             if (a[2].dim() == 0) == (which == "counters")]
    if not pairs:
        pytest.skip(f"{spec.name} keeps no {which} in its state")

    def change(x: Tensor) -> Tensor:
        return x - 1.0 if which == "counters" else x * 0.5

    with torch.no_grad():
        for (st, k, x), (_, _, y) in pairs:
            if how == "in-place":
                x.copy_(change(x))
            elif how == "replaced":
                st[k] = change(x)
            else:
                x.data = change(x.data)
            y.copy_(change(y))
    for t in range(3, 6):  # compared after every step: a stale statistic may be overwritten by the next one
        _continue_both(spec, (model, opt), twin, range(t, t + 1))


def _cut_model(spec: OptimizerSpec) -> tuple[nn.Module, Any]:
    """A model and the optimizer over it with some parameter cut into several blocks (the spec's test options
    cut ASGO's and AdamW's; an elementwise optimizer's group option ``max_block_numel`` cuts the others)."""
    model = tiny_mlp(0, torch.float64, sizes=SIZES)
    if spec.first_arg is FirstArg.MODULE:
        return model, spec.build(model, **spec.test_kwargs)
    opt = spec.load()([{"params": list(model.named_parameters()), "max_block_numel": 12}], **spec.test_kwargs) \
        if spec.load().elementwise else spec.build(model, **spec.test_kwargs)
    return model, opt


@each_optimizer
def test_a_value_written_at_the_top_level_of_a_cut_parameters_state_is_refused(spec: OptimizerSpec) -> None:
    """A parameter cut into blocks keeps one state entry per block (``state[p][i]``): a reset written the way
    torch's AdamW takes it, ``state[p]["exp_avg"] = zeros``, was ignored there, silently (2.9e-2 off torch's
    AdamW honouring it; SOAA bit for bit the run without the reset). Refused at the next step, naming the
    parameter, the keys and how to reset; nothing changed; ``del state[p]`` then resets it."""
    model, opt = _cut_model(spec)
    for t in range(2):
        step(spec, model, opt, t)
    cut = {b.param_index for b in opt.block_table.blocks if b.dim is not None}
    if not cut:
        pytest.skip(f"{spec.name} cuts no parameter of the test model")
    p = opt._params[min(cut)]
    opt.state[p]["exp_avg"] = torch.zeros_like(p)
    before, state = params(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"holds \['exp_avg'\] at its top level, but the parameter is cut into "
                                         r"blocks.*del optimizer.state\[p\].*Nothing changed"):
        step(spec, model, opt, 2)
    assert_identical(params(model), before, "params")
    del opt.state[p]["exp_avg"]
    assert_identical(opt.state_dict(), state, "state")
    del opt.state[p]  # the documented reset
    step(spec, model, opt, 2)


def _bad_checkpoints(spec: OptimizerSpec, good: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(what, state dict, expected message) for checkpoints that must be rejected."""
    other = next(s for s in SPECS if s.name != spec.name and s.load() is not spec.load())
    m_other, o_other = make(other)
    step(other, m_other, o_other, 0)
    m_wide, o_wide = make(spec, sizes=(6, 9, 5, 3))
    step(spec, m_wide, o_wide, 0, sizes=(6, 9, 5, 3))
    m_short, o_short = make(spec, sizes=(6, 3))
    step(spec, m_short, o_short, 0, sizes=(6, 3))
    torch_model = tiny_mlp(0)
    torch_opt = torch.optim.AdamW(torch_model.parameters())
    torch_model(torch.ones(2, SIZES[0], dtype=torch.float64)).sum().backward()
    torch_opt.step()  # a user switching from torch's AdamW: its state, with entries
    torch_sd = torch_opt.state_dict()
    cases = [
        # what to do too: the class that saved it, or the weights alone (the bare refusal left users guessing)
        ("another optimizer", o_other.state_dict(), f"saved by '{other.load().__name__}'.*Resume with that class.*"
         "loading the model's weights alone"),
        ("wrong shapes", o_wide.state_dict(), r"different model: parameter 0 has shape \[9, 6\]"),
        ("fewer parameters", o_short.state_dict(), "parameters in the state"),
        # the remedy first (weights only, under Lightning too), DCP's flattened form only as the alternative
        ("a torch optimizer's state", torch_sd, "not a lightning_soaa optimizer state.*looks like a torch.optim.*"
         r"load_from_checkpoint\(path\) and fit without ckpt_path\)\. Or, if it is this optimizer's own state"),
        ("not a dict", [1, 2], "not a lightning_soaa optimizer state"),
    ]
    for key in ("state", "param_groups", "lightning_soaa"):
        sd = copy.deepcopy(good)
        del sd[key]
        if key == "lightning_soaa":  # and its JSON copy in the first group (with it, the state loads)
            del sd["param_groups"][0]["lightning_soaa"]
        # a state with torch's keys only (what DCP's flatten_optimizer_state_dict / full_state_dict rebuild)
        # names those options as the likely cause and the way that keeps the metadata
        why = "flatten_optimizer_state_dict=True" if key == "lightning_soaa" else "not a lightning_soaa optimizer state"
        cases.append((f"no {key!r}", sd, why))
    for key in ("version", "optimizer", "shapes", "layout", "global"):
        sd = copy.deepcopy(good)
        del sd["lightning_soaa"][key]
        cases.append((f"no lightning_soaa.{key!r}", sd, re.escape(f"'{key}'")))
    sd = copy.deepcopy(good)  # column blocks: no optimizer's state can be re-cut from them
    sd["lightning_soaa"]["layout"][0] = [[1, 0, 1], [1, 1, SIZES[0]]]
    cases.append(("a block layout that cannot be re-cut", sd, "different block layout"))
    sd = copy.deepcopy(good)
    sd["param_groups"][0]["lr"] = -1.0
    cases.append(("a bad hyperparameter", sd,
                  re.escape("load_state_dict: the state dict's param_groups[0]: Invalid lr=-1.0")))
    return cases


@each_optimizer
def test_bad_checkpoints_are_rejected_and_change_nothing(spec: OptimizerSpec) -> None:
    model, opt = make(spec)
    for t in range(2):
        step(spec, model, opt, t)
    twin = copy.deepcopy((model, opt))  # never sees a bad checkpoint
    good = copy.deepcopy(opt.state_dict())
    for what, sd, message in _bad_checkpoints(spec, good):
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(sd)
        assert_identical(opt.state_dict(), good, f"after loading {what}")
    _continue_both(spec, (model, opt), twin, range(2, 4))  # the optimizer behaves as if nothing happened


@each_optimizer
def test_registry_driver_matches_what_the_optimizer_needs(spec: OptimizerSpec) -> None:
    """The driver takes the step the way the spec says; a step without what it needs is an error."""
    model, opt = make(spec)
    if spec.needs is StepNeeds.NOTHING:
        model(torch.zeros(1, 6, dtype=torch.float64)).sum().backward()
        opt.step()
        assert opt.num_steps == 1
        return
    w = params(model)
    if spec.needs is StepNeeds.LOSS:
        model(torch.zeros(1, 6, dtype=torch.float64)).sum().backward()
    with pytest.raises(ValueError):
        opt.step()
    assert opt.num_steps == 0
    assert_identical(params(model), w, "params")


@each_optimizer
def test_the_battery_hyperparameters_move_the_model(spec: OptimizerSpec) -> None:
    """Guards every check above against passing vacuously: the steps change parameters and state."""
    model, opt = make(spec)
    w0 = params(model)
    for t in range(3):
        step(spec, model, opt, t)
    moved = max((a - b).abs().max().item() for a, b in zip(params(model), w0))
    assert 1e-4 < moved < 10.0 and opt.num_steps == 3
    assert all(torch.isfinite(p).all() for p in params(model))
    assert opt.state_dict()["state"] or opt.state_dict()["lightning_soaa"]["global"]


# ---------------------------------------------------------------------------------------- autocast
def _step_under(spec: OptimizerSpec, model: torch.nn.Module, opt: Any, t: int, region: bool) -> None:
    """Step ``t`` with the forward and backward outside any autocast region and ``step()`` inside a CPU
    bf16 one (``region``) or not: what a manual-optimization ``training_step`` under Lightning's
    ``precision="bf16-mixed"`` does."""
    x, y = (u.float() for u in data(t))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if region else contextlib.nullcontext()
    if spec.needs is StepNeeds.BATCH:
        with ctx:
            opt.step(inputs=x, targets=y)
        return
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    with ctx:
        if spec.needs is StepNeeds.LOSS:
            opt.step(loss=loss.detach())
        else:
            opt.step()


@each_optimizer
def test_a_step_inside_an_autocast_region_equals_the_step_outside(spec: OptimizerSpec) -> None:
    """An optimizer step is the optimizer's arithmetic, not the model's: inside ``torch.autocast`` ASGO's
    Grams and roots and EGN's Jacobians and solve ran in bf16 (1e-3 to 8e-2 off the same step outside,
    silently). The step runs with autocast off; a closure it calls runs under the caller's region."""
    runs = []
    for region in (False, True):
        model = tiny_mlp(0, torch.float32)
        opt = spec.build(model, **spec.test_kwargs)
        for t in range(3):
            _step_under(spec, model, opt, t, region)
        runs.append([p.detach().clone() for p in model.parameters()])
        assert not torch.is_autocast_enabled("cpu")
    assert_identical(runs[1], runs[0], "params")
    if spec.needs is StepNeeds.BATCH:
        return
    model = tiny_mlp(0, torch.float32)
    opt = spec.build(model, **spec.test_kwargs)
    seen: list[bool] = []
    x, y = (u.float() for u in data(0))

    def closure() -> Tensor:
        seen.append(torch.is_autocast_enabled("cpu"))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        return loss

    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt.step(closure)
    assert seen and all(seen), seen  # the user's forward keeps the caller's autocast


@pytest.mark.parametrize("step_region", ["enabled", "disabled"])
@each_optimizer
def test_a_forward_after_a_step_in_the_same_autocast_region_reads_the_stepped_weights(
        spec: OptimizerSpec, step_region: str) -> None:
    """torch.autocast keeps its bf16 casts of the weights until its outermost region ends: a forward after a
    step in the same region (a loop run under one region, a step in an ``autocast(enabled=False)`` region
    inside it, as the AMP recipe keeps steps out of autocast) read the weights of before the step. The step
    leaves the region without them. (Lightning's Trainer opens its bf16-mixed region with the cache off.)"""
    model = tiny_mlp(0, torch.float32)
    opt = spec.build(model, **spec.test_kwargs)
    x, y = (u.float() for u in data(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(x).detach()  # casts the weights (kept by autocast)
        with torch.autocast("cpu", enabled=step_region == "enabled"):
            if spec.needs is StepNeeds.BATCH:
                opt.step(inputs=x, targets=y)
            else:
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
                loss.backward()
                opt.step(loss=loss.detach()) if spec.needs is StepNeeds.LOSS else opt.step()
        after = model(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = model(x).detach()
    assert not torch.equal(fresh, before)  # the step moved what a forward computes
    assert_identical([after], [fresh], "output after the step")


# ---------------------------------------------------------------------------------------- torch's DCP API
@each_optimizer
def test_torch_get_optimizer_state_dict_does_not_step_a_fresh_optimizer(spec: OptimizerSpec) -> None:
    """torch.distributed.checkpoint.state_dict.get_optimizer_state_dict (the first call of torch's resume
    recipe, a step-0 checkpoint) initialises an optimizer whose ``state`` is empty by a zero-gradient,
    lr=0 ``step()``: ASGO/DASGO/AdamW took it (a step counted, moments formed; 1.2e-2 off after 5 steps),
    SOAA and EGN raised 'needs the loss / the batch' and left lr=0 and zero gradients behind. Every
    optimizer keeps an entry per parameter, so torch sees it initialised and leaves it alone."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    def prepare(model: Any, opt: Any, call: bool) -> None:
        if call:
            get_optimizer_state_dict(model, opt)
            assert opt.num_steps == 0 and all(g["lr"] == spec.test_kwargs["lr"] for g in opt.param_groups)
            assert all(p.grad is None for p in model.parameters())

    _train_alike(spec, prepare, steps=3)


@each_optimizer
def test_torch_dcp_recipe_over_plain_parameters_resumes_exactly(spec: OptimizerSpec, tmp_path: Any) -> None:
    """torch's DCP recipe (get_optimizer_state_dict -> dcp.save; a fresh optimizer: get_optimizer_state_dict
    -> dcp.load -> set_optimizer_state_dict) over plain parameters in one process: dcp.load fills only the
    tensors the fresh optimizer's state dict shows. It showed none, so the step counts came back and no state
    (ASGO: 4 empty entries after 2 steps; the run continued on fresh moments), then (turn 36) the load was
    refused. A fresh optimizer now shows zeros of every block's state (optim/dcp_plain.py): the run resumes
    bit for bit, with the momentum variant of EGN (the battery's EGN keeps no per-block state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    kwargs = {"momentum": 0.5} if spec.name == "EGN" else {}
    model, opt = make(spec, **kwargs)
    for t in range(2):
        step(spec, model, opt, t)
    assert any(opt.state.values())  # per-block state to lose
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
    model2, fresh = make(spec, **kwargs)
    model2.load_state_dict(model.state_dict())
    dest = {"optim": get_optimizer_state_dict(model2, fresh)}
    held = [v for st in fresh.state.values() for v in st.values() if isinstance(v, Tensor)
            or (isinstance(v, dict) and v)]
    assert fresh.num_steps == 0 and not held  # the placeholders are the state dict's, not the optimizer's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to load in a single process"
        dcp.load(dest, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(model2, fresh, dest["optim"])
    assert fresh.num_steps == 2
    assert_identical(fresh.state_dict(), opt.state_dict())
    _continue_dcp(spec, model, opt, model2, fresh)


def _dcp_round_trip(spec: OptimizerSpec, model: Any, opt: Any, model2: Any, fresh: Any, path: str) -> None:
    """torch's DCP recipe from ``opt`` into ``fresh`` (one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    model2.load_state_dict(model.state_dict())
    dest = {"optim": get_optimizer_state_dict(model2, fresh)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to load in a single process"
        dcp.load(dest, checkpoint_id=path)
    set_optimizer_state_dict(model2, fresh, dest["optim"])


@each_optimizer
def test_torch_dcp_recipe_resumes_blocks_whose_state_is_all_zero(spec: OptimizerSpec, tmp_path: Any) -> None:
    """Reviewer: a held block that is all zero (SOAA's, made at a first step that was then skipped; EGN's
    momentum of a trainable parameter outside the loss) is "no state" on load, like the placeholders, but
    the saved block counts counted it, so the recipe was refused ("did not arrive"). Saved after a skipped
    step and with an unused parameter, then after one more step: both resume bit for bit, and the unused
    parameter gets no state."""
    def build() -> tuple[Any, Any]:
        m = tiny_mlp(0, torch.float64, sizes=SIZES)
        m.register_parameter("unused", nn.Parameter(torch.zeros(4, 3, dtype=torch.float64)))
        return m, spec.build(m, **spec.test_kwargs)

    model, opt = build()
    step(spec, model, opt, 0, poison=True)
    assert opt.skipped_steps == 1
    for t in range(1, 3):
        model2, fresh = build()
        _dcp_round_trip(spec, model, opt, model2, fresh, str(tmp_path / f"t{t}"))
        assert fresh.num_steps == opt.num_steps and fresh.skipped_steps == 1
        unused = fresh.state[model2.unused].values()
        assert not any(isinstance(v, Tensor) or (isinstance(v, dict) and v) for v in unused)
        for u in range(t, t + 2):
            step(spec, model2, fresh, u)
        ref = copy.deepcopy((model, opt))  # one copy: the optimizer steps the copied model
        for u in range(t, t + 2):
            step(spec, ref[0], ref[1], u)
        assert_identical(params(model2), params(ref[0]), "params")
        step(spec, model, opt, t)


def _continue_dcp(spec: OptimizerSpec, model: Any, opt: Any, model2: Any, fresh: Any) -> None:
    for t in range(2, 4):
        step(spec, model, opt, t)
        step(spec, model2, fresh, t)
    assert_identical(params(model2), params(model), "params")


@each_optimizer
def test_state_dict_hooks_run_as_in_torch(spec: OptimizerSpec) -> None:
    """torch.optim.Optimizer's four state-dict hooks (register_state_dict_pre/post_hook,
    register_load_state_dict_pre/post_hook) were accepted and never called: a key a post hook added was
    missing, a load pre hook could not remap a checkpoint (torch documents it for that), a load post
    hook's change was lost. They run as torch runs them, a returned dict replacing the state."""
    model, opt = make(spec)
    step(spec, model, opt, 0)
    calls: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))

    def add_key(o: Any, sd: dict[str, Any]) -> dict[str, Any]:
        calls.append("post")
        return {**sd, "note": "kept"}

    opt.register_state_dict_post_hook(add_key)
    sd = opt.state_dict()
    assert calls == ["pre", "post"] and sd["note"] == "kept"
    model2, fresh = make(spec)

    def strip(o: Any, loaded: dict[str, Any]) -> dict[str, Any]:
        calls.append("load_pre")
        return {k: v for k, v in loaded.items() if k != "note"}  # the format has no "note"

    def lower_lr(o: Any) -> None:
        calls.append("load_post")
        for g in o.param_groups:
            g["lr"] = 1e-4

    def rewrite(o: Any, loaded: dict[str, Any]) -> None:
        loaded["note"] = "rewritten"  # in place: torch hands hooks a copy, the caller's dict stays

    fresh.register_load_state_dict_pre_hook(rewrite)
    fresh.register_load_state_dict_pre_hook(strip)
    fresh.register_load_state_dict_post_hook(lower_lr)
    fresh.load_state_dict(sd)
    assert calls[2:] == ["load_pre", "load_post"] and all(g["lr"] == 1e-4 for g in fresh.param_groups)
    assert fresh.num_steps == opt.num_steps == 1 and sd["note"] == "kept"


def _load_by_param_names(optimizer: Any, loaded: dict[str, Any]) -> dict[str, Any]:
    """torch's documented load pre hook for loading by ``param_names`` (docs/source/optim.rst): start
    from the optimizer's own state dict, take the checkpoint's group settings, copy each parameter's
    state by name."""
    adapted = copy.deepcopy(optimizer.state_dict())
    for k, v in loaded["param_groups"][0].items():
        if k not in ("params", "param_names"):
            adapted["param_groups"][0][k] = v
    lookup = dict(zip(loaded["param_groups"][0]["param_names"], loaded["param_groups"][0]["params"]))
    for pid, name in zip(adapted["param_groups"][0]["params"], adapted["param_groups"][0]["param_names"]):
        if name in lookup:
            adapted["state"][pid] = copy.deepcopy(loaded["state"][lookup[name]])
    return adapted


@each_optimizer
def test_torchs_load_by_param_names_recipe_continues_identically(spec: OptimizerSpec) -> None:
    """torch's recipe rebuilds the state from the fresh optimizer's and copies the per-parameter entries:
    the optimizer-wide state (step counts, SOAA's trust region, EGN's damping) was the fresh one's, and
    SOAA/EGN continued 4e-2/7e-2 off the uninterrupted run. It is the checkpoint's; a hook returning the
    fresh state unchanged (do not load) still loads nothing."""
    model, opt = make(spec)
    for t in range(3):
        step(spec, model, opt, t)
    saved = _round_trip_bytes({"model": model.state_dict(), "opt": opt.state_dict()})
    model2, opt2 = make(spec, seed=7)
    model2.load_state_dict(saved["model"])
    opt2.register_load_state_dict_pre_hook(_load_by_param_names)
    opt2.load_state_dict(saved["opt"])
    assert opt2.num_steps == 3
    _continue_both(spec, (model, opt), (model2, opt2), range(3, 6))
    model3, opt3 = make(spec)
    opt3.register_load_state_dict_pre_hook(lambda o, loaded: o.state_dict())
    opt3.load_state_dict(saved["opt"])
    assert opt3.num_steps == 0 and not any(opt3.state.values())
    assert_identical(opt3.state_dict(), make(spec)[1].state_dict())


@each_optimizer
def test_a_checkpoint_saved_before_the_block_counts_resumes_and_one_that_brings_no_state_is_warned_about(
        spec: OptimizerSpec, tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint from before ``blocks_with_state`` through the same DCP recipe resumes exactly (a fresh
    optimizer shows every block's keys). One whose state was lost on the way (an older version's fresh
    destination showed none) cannot be told from an optimizer that keeps no per-parameter state (EGN without
    momentum), so it loads, with a warning naming the cause (reviewer)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, opt = make(spec)
    for t in range(2):
        step(spec, model, opt, t)
    sd = get_optimizer_state_dict(model, opt)
    meta = json.loads(sd["param_groups"][0]["lightning_soaa"])
    del meta["blocks_with_state"]  # as saved before the counts
    sd["param_groups"][0]["lightning_soaa"] = json.dumps(meta)
    dcp.save({"optim": sd}, checkpoint_id=str(tmp_path))
    model2, fresh = make(spec)
    model2.load_state_dict(model.state_dict())
    dest = {"optim": get_optimizer_state_dict(model2, fresh)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(dest, checkpoint_id=str(tmp_path))
    with caplog.at_level("WARNING"):
        set_optimizer_state_dict(model2, fresh, dest["optim"])
    assert "brought no per-parameter state" not in caplog.text and fresh.num_steps == 2
    _continue_dcp(spec, model, opt, model2, fresh)
    model3, lost = make(spec)
    with caplog.at_level("WARNING"):
        set_optimizer_state_dict(model3, lost, {**sd, "state": {}})
    assert "brought no per-parameter state" in caplog.text and lost.num_steps == 2


@each_optimizer
def test_torchs_param_names_hook_over_a_state_torch_rebuilt_continues_identically(spec: OptimizerSpec) -> None:
    """The same recipe on a state from get_optimizer_state_dict (torch keeps only ``state`` and
    ``param_groups``; our metadata rides as JSON in the first group): the optimizer-wide state was read from
    the top-level metadata only, so EGN continued with a never-stepped optimizer's (num_steps 0, damping 0.5
    for 0.49: 8.9e-2 off) and the others were refused with a misleading message (reviewer)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, opt = make(spec)
    for t in range(3):
        step(spec, model, opt, t)
    saved = _round_trip_bytes({"model": model.state_dict(), "opt": get_optimizer_state_dict(model, opt)})
    model2, opt2 = make(spec, seed=7)
    model2.load_state_dict(saved["model"])
    opt2.register_load_state_dict_pre_hook(_load_by_param_names)
    set_optimizer_state_dict(model2, opt2, saved["opt"])
    assert opt2.num_steps == 3
    _continue_both(spec, (model, opt), (model2, opt2), range(3, 6))


@each_optimizer
def test_state_of_a_parameter_frozen_since_is_left_out_by_torchs_tools_with_a_warning(
        spec: OptimizerSpec, caplog: pytest.LogCaptureFixture) -> None:
    """torch's set_optimizer_state_dict leaves out the state of parameters without requires_grad (as for
    torch's AdamW): the rest loads, the frozen one starts afresh, and the load says so (the check that the
    checkpoint's blocks all arrived first refused this, blaming a fresh optimizer; reviewer)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, opt = make(spec)
    for t in range(2):
        step(spec, model, opt, t)
    last = list(model.parameters())[-1]
    last.requires_grad_(False)
    saved = _round_trip_bytes({"model": model.state_dict(), "opt": get_optimizer_state_dict(model, opt)})
    model2, opt2 = make(spec)
    model2.load_state_dict(saved["model"])
    list(model2.parameters())[-1].requires_grad_(False)
    with caplog.at_level("WARNING"):
        set_optimizer_state_dict(model2, opt2, saved["opt"])
    assert opt2.num_steps == 2
    if opt.state.get(last):  # it had state: left out, said
        assert "requires_grad=False" in caplog.text and not opt2.state.get(list(model2.parameters())[-1])
    for p, q in zip(list(model.parameters())[:-1], list(model2.parameters())[:-1]):
        assert_identical(opt2.state.get(q, {}), opt.state.get(p, {}), "state")


@pytest.mark.parametrize("spec", [s for s in SPECS if s.needs is not StepNeeds.BATCH], ids=lambda s: s.name)
def test_a_step_without_any_gradient_says_so_once(spec: OptimizerSpec, caplog: pytest.LogCaptureFixture) -> None:
    """An optimizer built before fully_shard replaced the parameters, or FSDP2's gradient sync left off:
    every .grad is None at every step, the model never moves, silently (torch's optimizers too). The
    first such step logs why it changes nothing; later ones do not repeat it."""
    model, opt = make(spec)
    w = params(model)
    with caplog.at_level("WARNING"):
        for _ in range(3):
            if spec.needs is StepNeeds.LOSS:
                opt.step(loss=1.0)
            else:
                opt.step()
    assert caplog.text.count("none of the") == 1 and "has a gradient" in caplog.text
    assert_identical(params(model), w, "params")


@pytest.mark.parametrize("spec", [s for s in SPECS if s.needs is not StepNeeds.BATCH], ids=lambda s: s.name)
def test_steps_without_any_gradient_change_nothing(spec: OptimizerSpec) -> None:
    """Steps in which every .grad is None (a frozen phase whose loop still calls step(), with the loss)
    change nothing, as torch's optimizers: a run with such steps before and between its real steps equals
    the run without them bit for bit, parameters and state dict (step counts and SOAA's trust region too).
    SOAA's trust region advanced its step number, shrank d and took the loss into its EMA at each: 3.9e-2 off
    after four real steps. (EGN is left out: it steps from the batch, never from .grad.)"""
    runs = []
    for frozen in (False, True):
        model, opt = make(spec)
        for t in range(4):
            if frozen and t in (0, 2):
                frozen_steps(spec, model, opt, 2)
            step(spec, model, opt, t)
        runs.append({"params": params(model), "state": opt.state_dict()})
    assert_identical(runs[1], runs[0], "with frozen steps")



@pytest.mark.parametrize("spec", [s for s in SPECS if s.needs is StepNeeds.LOSS], ids=lambda s: s.name)
def test_steps_without_any_gradient_change_nothing_whatever_their_loss(spec: OptimizerSpec) -> None:
    """A step without any gradient changes nothing also when the loss handed to it is not finite (a frozen
    phase whose forward overflowed): it was counted as a skipped step (skipped_steps 2 after two such
    steps, a warning each, the state dict differing from the run without them)."""
    runs = []
    for frozen in (False, True):
        model, opt = make(spec)
        for t in range(3):
            if frozen and t == 1:
                frozen_steps(spec, model, opt, 2, loss_value=float("nan"))
            step(spec, model, opt, t)
        runs.append({"params": params(model), "state": opt.state_dict()})
    assert_identical(runs[1], runs[0], "with frozen steps of a NaN loss")

def _mse_step(spec: OptimizerSpec, model: torch.nn.Module, opt: Any, t: int,
              scaler: torch.amp.GradScaler | None = None, overflow: bool = False, unscale: bool = False) -> None:
    x, y = data(t)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    kwargs = {"loss": loss.detach()} if spec.needs is StepNeeds.LOSS else {}
    if scaler is None:
        loss.backward()
        opt.step(**kwargs)
        return
    scaler.scale(loss).backward()
    if overflow:
        next(model.parameters()).grad.view(-1)[0] = float("inf")
    if unscale:
        scaler.unscale_(opt)
    scaler.step(opt, **kwargs)
    scaler.update()


@pytest.mark.parametrize("unscale", [False, True], ids=["scaler_unscales", "user_unscales"])
@pytest.mark.parametrize("spec", [s for s in SPECS if s.needs is not StepNeeds.BATCH], ids=lambda s: s.name)
def test_grad_scaler_steps_equal_unscaled_steps_and_skip_overflows(spec: OptimizerSpec, unscale: bool) -> None:
    """torch.amp.GradScaler on one process: with a power-of-two scale the run equals the unscaled one bit
    for bit, whether the scaler or the user unscales; an overflow is not stepped and the scaler backs off.
    With the scaler's contract forced on (``_step_supports_amp_scaling``, what grad_reduction="mean" at
    W > 1 uses: tests/conformance/test_ranks.py) the step unscales the gradients itself and skips the
    overflow (counted), with the same result."""
    ref_model, ref = make(spec)
    for t in (0, 2):  # the run without the overflowing iteration
        _mse_step(spec, ref_model, ref, t)
    for contract in (False, True):
        model, opt = make(spec)
        if contract:
            type(opt)._step_supports_amp_scaling = property(lambda self: True)  # type: ignore[assignment]
        try:
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
            for t in range(3):
                _mse_step(spec, model, opt, t, scaler, overflow=t == 1, unscale=unscale)
        finally:
            if contract:
                del type(opt)._step_supports_amp_scaling
        assert opt.num_steps == 2 and opt.skipped_steps == int(contract) and scaler.get_scale() == 2.0**9
        assert_identical(params(model), params(ref_model), "params")
