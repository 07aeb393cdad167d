"""EGN on a model whose parameters (or the submodules holding them) were replaced after EGN was built:
``load_state_dict(sd, assign=True)``, a tie undone, a layer assigned anew, a frozen parameter swapped.
EGN used to step its own stale Parameters while the model's forward used the new ones (the model never
moved; steps counted, losses returned). Each is refused at the next step with a message naming the first
replaced parameter, with nothing changed; an EGN built afterwards trains as the float64 oracle."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_soaa.optim.egn import EGN
from tests.unit._egn_oracle import direct_direction, flat_params
from tests.unit.test_egn_structure import _Net  # not a Sequential: traced as a chain at every step

DT = torch.float64


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(5)


def _batch(step: int, b: int = 8) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(300 + step)
    return torch.randn(b, 4, generator=g, dtype=DT), torch.randn(b, 2, generator=g, dtype=DT)


#: the three capture paths: a planned chain, a traced chain, the general capture with explicit rows
MODELS: dict[str, Callable[[], nn.Module]] = {
    "chain": lambda: nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT),
    "traced": lambda: _Net().to(DT),
    "general": lambda: nn.Sequential(nn.Linear(4, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 2)).to(DT),
}
FIRST = {"chain": "0.weight", "traced": "a.weight", "general": "0.weight"}


def _snapshot(opt: EGN) -> tuple[Tensor, dict, tuple]:
    sd = copy.deepcopy(opt.state_dict())
    return flat_params(opt.model), sd, (opt.num_steps, opt.damping, opt.alpha, opt.momentum_steps)


def _unchanged(opt: EGN, model: nn.Module, before: tuple[Tensor, dict, tuple]) -> None:
    w, sd, counters = before
    assert torch.equal(flat_params(model), w)
    assert (opt.num_steps, opt.damping, opt.alpha, opt.momentum_steps) == counters
    now = opt.state_dict()
    assert now["state"].keys() == sd["state"].keys()
    for i, blocks in sd["state"].items():
        for j, fields in blocks.items():
            for k, v in fields.items():
                assert torch.equal(now["state"][i][j][k], v), (i, j, k)


@pytest.mark.parametrize("stepped", [True, False], ids=["after_a_step", "before_the_first_step"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_load_state_dict_assign_is_refused_and_a_new_egn_trains_as_the_oracle(kind: str, stepped: bool) -> None:
    """Also before the first step: the planned chain's plan, made at that step, took the model's new Parameters
    for its forward and stepped EGN's old ones (the model never moved, silently)."""
    model = MODELS[kind]()
    opt = EGN(model, loss="mse", lr=0.5, damping=0.3, momentum=0.5)
    if stepped:
        opt.step(inputs=_batch(0)[0], targets=_batch(0)[1])  # some state to keep
    loaded = {k: v.detach().clone() + 0.01 for k, v in model.state_dict().items()}
    model.load_state_dict(loaded, assign=True)
    before = _snapshot(opt)
    for _ in range(2):  # refused at every step, not only the first
        with pytest.raises(RuntimeError, match=rf"'{FIRST[kind]}' is no longer the tensor .*"
                                               r"load_state_dict\(\.\.\., assign=True\).*Build the EGN after"):
            opt.step(inputs=_batch(1)[0], targets=_batch(1)[1])
        _unchanged(opt, model, before)
    # an EGN built on the model as it now stands trains it, each step the oracle's direction
    fresh = EGN(model, loss="mse", lr=1.0, damping=0.3)
    for t in range(1, 3):
        x, y = _batch(t)
        ref = direct_direction(copy.deepcopy(model).eval(), x, y, "mse", damping=0.3)["d"]
        w0 = flat_params(model)
        fresh.step(inputs=x, targets=y)
        torch.testing.assert_close(flat_params(model) - w0, ref, rtol=1e-9, atol=1e-12)


def _untie(model: nn.Module) -> str:
    model[2].weight = nn.Parameter(model[2].weight.detach().clone())
    return "2.weight"


def _new_layer(model: nn.Module) -> str:
    model[2] = nn.Linear(4, 4).to(DT)
    return "2.weight"


def _same_params_new_layer(model: nn.Module) -> str:
    """A new Linear holding the same Parameters: EGN's plan still points at the old module."""
    new = nn.Linear(4, 4).to(DT)
    new.weight, new.bias = model[2].weight, model[2].bias
    model[2] = new
    return "2.weight"


def _frozen_swapped(model: nn.Module) -> str:
    model[0].bias = nn.Parameter(model[0].bias.detach().clone(), requires_grad=False)
    return "0.bias"


CHANGES = {"untie": _untie, "new_layer": _new_layer, "same_params_new_layer": _same_params_new_layer,
           "frozen_swapped": _frozen_swapped}


@pytest.mark.parametrize("stepped", [True, False], ids=["after_a_step", "before_the_first_step"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_parameter_or_its_submodule_replaced_is_refused(change: str, stepped: bool) -> None:
    """Layers 0 and 2 share their weight (two places of one Parameter); layer 0's bias is frozen."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    model[2].weight = model[0].weight
    model[0].bias.requires_grad_(False)
    opt = EGN(model, loss="mse", lr=0.5, damping=0.3)
    if stepped:
        opt.step(inputs=_batch(0)[0], targets=_batch(0)[1])
    name = CHANGES[change](model)
    before = _snapshot(opt)
    if "layer" in change:
        match = rf"the submodule '2', which held the model's parameter '{name}', was replaced.*Nothing changed"
    else:
        match = rf"'{name}' is no longer the tensor .*holds another Parameter there.*Nothing changed"
    with pytest.raises(RuntimeError, match=match):
        opt.step(inputs=_batch(1)[0], targets=_batch(1)[1])
    _unchanged(opt, model, before)


@pytest.mark.parametrize("stepped", [True, False], ids=["after_a_step", "before_the_first_step"])
def test_spectral_norm_applied_after_construction_is_refused_naming_it(stepped: bool) -> None:
    """torch.nn.utils.spectral_norm renames the weight 'weight_orig' as prune does: EGN's refusal blamed prune
    alone (and a "masked copy"), which sent a user of spectral_norm looking for a pruning call. Now it names
    both, and what to do, which works: an EGN built after spectral_norm steps the layer's 'weight_orig'."""
    model = MODELS["chain"]()
    opt = EGN(model, loss="mse", lr=0.5, damping=0.3)
    if stepped:
        opt.step(inputs=_batch(0)[0], targets=_batch(0)[1])
    nn.utils.spectral_norm(model[2])
    before = _snapshot(opt)
    with pytest.raises(RuntimeError, match=r"'2.weight' is now registered as 'weight_orig'.*torch.nn.utils."
                                           r"spectral_norm.*apply spectral_norm before building EGN.*Nothing changed"):
        opt.step(inputs=_batch(1)[0], targets=_batch(1)[1])
    _unchanged(opt, model, before)
    fresh = EGN(model, loss="mse", lr=0.5, damping=0.3)
    was = model[2].weight_orig.detach().clone()
    fresh.step(inputs=_batch(1)[0], targets=_batch(1)[1])
    assert not torch.equal(was, model[2].weight_orig) and torch.isfinite(model[2].weight_orig).all()


def _tie_data(model: nn.Module) -> None:
    model[2].weight.data = model[0].weight.data.t()


def _tie_set(model: nn.Module) -> None:
    with torch.no_grad():
        model[2].weight.set_(model[0].weight.detach().t())


def _overlapping_rows(model: nn.Module) -> None:
    """Two Parameters over overlapping row slices of one new tensor (rows 1-3 are both's)."""
    rows = torch.randn(5, 4, dtype=DT)
    model[0].weight.data, model[2].weight.data = rows[:4], rows[1:]


MEMORY_TIES = {"data": _tie_data, "set_": _tie_set, "overlapping_rows": _overlapping_rows}


@pytest.mark.parametrize("tie", sorted(MEMORY_TIES))
def test_parameters_over_one_memory_since_construction_are_refused_on_one_process(tie: str) -> None:
    """Construction refuses two Parameters over one memory (EGN's system takes them as independent
    coordinates: its Gram and update are wrong over them); one made since (``p.data = other.data.t()``,
    ``p.set_(...)``, overlapping slices) stepped silently on one process. Refused at every step, naming both,
    with nothing changed; once given its own memory again the parameter trains on."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    opt = EGN(model, loss="mse", lr=0.5, damping=0.3, momentum=0.5, line_search=True)
    opt.step(inputs=_batch(0)[0], targets=_batch(0)[1])
    MEMORY_TIES[tie](model)
    before = _snapshot(opt)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"parameters '0.weight' and '2.weight' share memory.*"
                                             r"p\.data\.copy_\(other\).*Nothing changed"):
            opt.step(inputs=_batch(1)[0], targets=_batch(1)[1])
        _unchanged(opt, model, before)
    model[2].weight.data = model[2].weight.data.clone()
    w0 = flat_params(model)
    opt.step(inputs=_batch(1)[0], targets=_batch(1)[1])
    assert opt.num_steps == 2 and not torch.equal(flat_params(model), w0)


@pytest.mark.parametrize("bag", [False, True], ids=["Embedding", "EmbeddingBag"])
@pytest.mark.parametrize("option, shown", [({"sparse": True}, "sparse=True"),
                                           ({"scale_grad_by_freq": True}, "scale_grad_by_freq=True"),
                                           ({"max_norm": 1.0}, "max_norm=1.0")])
def test_a_trained_embedding_with_an_option_egn_cannot_follow_is_refused_naming_it(
        option: dict[str, Any], shown: str, bag: bool) -> None:
    """sparse=True failed at the first step with torch.func's internal 'aten::view ... SparseCPU' error,
    scale_grad_by_freq=True with a batch-dependence error that did not name it (it rescales only the
    backward's gradient), max_norm with vmap's error about embedding_renorm_ (an in-place forward). Each is
    refused at construction, naming the module and the option; frozen, the table is accepted and EGN steps."""
    table = nn.EmbeddingBag(10, 4, mode="mean", **option) if bag else nn.Embedding(10, 4, **option)
    model = nn.Sequential(table, nn.Identity() if bag else nn.Flatten(), nn.Linear(4 if bag else 8, 2)).to(DT)
    kind = type(table).__name__
    with pytest.raises(ValueError, match=rf"module '0' is {kind}\({re.escape(shown)}\).*or freeze it"):
        EGN(model, loss="mse")
    model[0].weight.requires_grad_(False)
    opt = EGN(model, loss="mse")
    before = model[2].weight.detach().clone()
    opt.step(inputs=torch.randint(0, 10, (6, 2)), targets=torch.randn(6, 2, dtype=DT))
    assert not torch.equal(model[2].weight, before)


class _CastOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x).float()  # logits cast up, as under precision="bf16-true"


def test_outputs_in_another_dtype_than_the_parameters_are_refused_clearly() -> None:
    """A forward ending in .float() on a float64 (or bf16) model failed inside the capture with torch's bare
    'both inputs should have same dtype'; refused naming both dtypes, nothing changed."""
    model = _CastOut().to(DT)
    opt = EGN(model, loss="mse")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"outputs are torch.float32, its trained parameters \['torch.float64'\]"):
        opt.step(inputs=torch.randn(8, 4, dtype=DT), targets=torch.randn(8, 2))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and opt.num_steps == 0
