"""Groups unfrozen during a fit, as Lightning's ``BaseFinetuning`` / ``BackboneFinetuning`` adds them, and
the resume of such a run (every optimizer that takes parameters; EGN plans from the model at construction).

* ``unfreeze_and_add_param_group`` adds a group of bare tensors; an optimizer built from named parameters
  (the factory and ``lightning-soaa fit`` pass ``named_parameters()``) raised torch's 'cannot add param group
  without names' one epoch into the fit.
* Resuming, the callback assigns ``optimizer.param_groups = [...]`` (new dicts over the same parameters, the
  unfrozen group appended) before the optimizer's state is loaded; the load refused the state as 'a
  different model' (its blocks were cut for the built groups only).

The resumed run must equal the uninterrupted one (float64, bit for bit where the state is loaded exactly).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from lightning_soaa.registry import FirstArg, OptimizerSpec
from tests.conformance._battery import SPECS, assert_close, assert_identical, params, step
from tests.harness.models import tiny_mlp

_TAKES_PARAMS = [s for s in SPECS if s.first_arg is FirstArg.NAMED_PARAMETERS]


def _frozen_start(spec: OptimizerSpec) -> tuple[nn.Module, Any]:
    model = tiny_mlp(0)
    model[0].requires_grad_(False)  # the backbone
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return model, spec.load()(trainable, **spec.test_kwargs)


def _unfreeze(model: nn.Module, opt: Any, lr: float) -> None:
    """What BaseFinetuning.unfreeze_and_add_param_group does: bare tensors, a group of their own."""
    model[0].requires_grad_(True)
    opt.add_param_group({"params": list(model[0].parameters()), "lr": lr})


def _as_lightning_restores(opt: Any, saved: list[dict[str, Any]], model: nn.Module) -> None:
    """BaseFinetuning.on_fit_start when restarting: new group dicts over the parameters found by name."""
    by_name = dict(model.named_parameters())
    opt.param_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [by_name[n] for n in names]}
                        for g, names in saved]


@pytest.mark.parametrize("spec", _TAKES_PARAMS, ids=[s.name for s in _TAKES_PARAMS])
def test_a_group_unfrozen_mid_fit_trains_and_the_run_resumes(spec: OptimizerSpec) -> None:
    lr = spec.test_kwargs["lr"] / 2
    model, opt = _frozen_start(spec)
    names = {id(p): n for n, p in model.named_parameters()}
    for t in range(2):
        step(spec, model, opt, t)
    _unfreeze(model, opt, lr)
    assert len(opt.param_groups) == 2
    assert opt.param_groups[1].get("param_names") == [None, None]  # named like the others, as unnamed
    for t in range(2, 4):
        step(spec, model, opt, t)
    saved_state, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    saved_groups = [({k: v for k, v in g.items() if k != "params"}, [names[id(p)] for p in g["params"]])
                    for g in opt.param_groups]
    for t in range(4, 6):
        step(spec, model, opt, t)

    resumed, opt2 = _frozen_start(spec)
    resumed.load_state_dict(saved_model)
    resumed[0].requires_grad_(True)
    _as_lightning_restores(opt2, saved_groups, resumed)
    opt2.load_state_dict(saved_state)
    assert len(opt2.param_groups) == 2 and opt2.param_groups[1]["lr"] == lr
    for t in range(4, 6):
        step(spec, resumed, opt2, t)
    assert_close(params(resumed), params(model), "params", rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("spec", _TAKES_PARAMS, ids=[s.name for s in _TAKES_PARAMS])
def test_groups_assigned_over_other_parameters_are_still_refused(spec: OptimizerSpec) -> None:
    """Only groups holding exactly the built groups' parameters, in order, are taken over; groups over
    other parameters stay refused at the step, nothing changed."""
    model, opt = _frozen_start(spec)
    step(spec, model, opt, 0)
    w = params(model)
    opt.param_groups = [{**opt.param_groups[0], "params": list(reversed(opt.param_groups[0]["params"]))}]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\] is no longer the list"):
        step(spec, model, opt, 1)
    assert all(torch.equal(a, b) for a, b in zip(params(model), w))


def _groups_of(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """The first layer as one group, then one group per parameter, each with its own lr (layer-wise lr)."""
    named = list(model.named_parameters())
    return [{"params": named[:2]}] + [{"params": [np], "lr": lr * (0.5 + 0.1 * i)} for i, np in enumerate(named[2:])]


@pytest.mark.parametrize("spec", _TAKES_PARAMS, ids=[s.name for s in _TAKES_PARAMS])
def test_groups_added_one_at_a_time_equal_the_groups_given_up_front(spec: OptimizerSpec) -> None:
    """add_param_group appends the new group's blocks to the table (the existing ones kept as cut), not a
    rebuild over every parameter at each call (one group per layer was quadratic): the blocks, the state and
    the steps must be those of the optimizer built with every group at once, bit for bit."""
    lr = spec.test_kwargs["lr"]
    added, given = tiny_mlp(0), tiny_mlp(0)
    groups = _groups_of(added, lr)
    opt_a = spec.load()(groups[:1], **spec.test_kwargs)
    for g in groups[1:]:
        opt_a.add_param_group(g)
    opt_b = spec.load()(_groups_of(given, lr), **spec.test_kwargs)
    assert opt_a.block_table.blocks == opt_b.block_table.blocks
    assert [g["param_names"] for g in opt_a.param_groups] == [g["param_names"] for g in opt_b.param_groups]
    for t in range(3):
        step(spec, added, opt_a, t)
        step(spec, given, opt_b, t)
    assert_identical(opt_a.state_dict(), opt_b.state_dict())
    assert_identical(params(added), params(given), "params")
