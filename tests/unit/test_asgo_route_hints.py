"""ASGO/DASGO's record of a walked module's parameters (:func:`route_hint`), kept by ``id(param)`` (a weak
reference to the parameter would block ``torch.utils.swap_tensors``): a parameter made after another died gets
that one's id, often in the same module, and must not get its name and routing; a tied weight keeps its record
while any of its modules holds it; the record does not grow with the parameters a model replaced."""

from __future__ import annotations

import torch
import torch.nn.utils.prune as prune
from torch import nn

from lightning_soaa.optim import asgo_groups
from lightning_soaa.optim.asgo import ASGO
from lightning_soaa.optim.asgo_groups import asgo_param_groups, route_hint


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.randn(16, 8, dtype=torch.float64))
        self.proj = nn.Parameter(torch.randn(8, 8, dtype=torch.float64))


def _frozen_model() -> tuple[nn.Module, ASGO]:
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), nn.Linear(8, 2, dtype=torch.float64))
    model[0].requires_grad_(False)
    return model, ASGO(asgo_param_groups(model), lr=1e-2)


def _rewrap(block: nn.Module) -> None:
    """Each parameter replaced by a copy, one by one (the old one dies as the next is made)."""
    for name in ["pos_embedding", "proj"]:
        setattr(block, name, nn.Parameter(getattr(block, name).detach().clone(), requires_grad=False))


def _unfreeze(model: nn.Module, opt: ASGO) -> dict[str, bool]:
    """BaseFinetuning's add of the backbone as bare tensors: each parameter's name -> preconditioned."""
    model[0].requires_grad_(True)
    opt.add_param_group({"params": list(model[0].parameters())})
    group = opt.param_groups[-1]
    return {n: opt.is_matrix_param(p, group, group["param_names"][j])
            for j, (n, p) in enumerate(model[0].named_parameters())}


def test_a_parameter_made_after_another_died_gets_nothing_of_its_record() -> None:
    model, opt = _frozen_model()
    _rewrap(model[0])
    for name, p in model.named_parameters():
        hint = route_hint(p)
        assert hint is None or hint.name == name, (name, hint)
    assert _unfreeze(model, opt) == {"pos_embedding": True, "proj": True}  # by shape, as any new tensors


def test_a_parameter_at_the_id_of_a_dead_one_of_its_module_gets_nothing_of_its_record() -> None:
    """The same as the allocator's reuse above, made certain: the new ``proj`` at the old ``pos_embedding``'s id
    was named ``pos_embedding`` and sent to AdamW by the ``emb`` rule."""
    model, opt = _frozen_model()
    dead = id(model[0].pos_embedding)
    _rewrap(model[0])
    asgo_groups._HINTS[id(model[0].proj)] = asgo_groups._HINTS.pop(dead)  # what a reused id finds
    assert route_hint(model[0].proj) is None
    assert _unfreeze(model, opt)["proj"]


def test_a_tied_weight_keeps_its_record_while_one_of_its_modules_holds_it() -> None:
    torch.manual_seed(0)
    emb, head = nn.Embedding(10, 8), nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Linear(8, 8), head)
    asgo_param_groups(model)
    head.weight = nn.Parameter(emb.weight.detach().clone())  # untied after the walk
    hint = route_hint(emb.weight)
    assert hint is not None and hint.adamw  # still the embedding table


def test_a_weight_renamed_by_prune_keeps_its_record() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    asgo_param_groups(model)
    table = model[0].weight
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    hint = route_hint(table)
    assert hint is not None and hint.adamw and model[0].weight_orig is table


def test_the_record_does_not_grow_with_the_parameters_a_model_replaced() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
    asgo_param_groups(model)
    before = len(asgo_groups._HINTS)
    for _ in range(50):
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        asgo_param_groups(model)
    assert len(asgo_groups._HINTS) <= before


def test_walks_of_one_model_again_and_again_keep_one_place_a_parameter() -> None:
    """Many fits in one process walk the same model at each ``configure_optimizers``."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    for _ in range(20):
        asgo_param_groups(model)
    assert {len(asgo_groups._HINTS[id(p)].places) for p in model.parameters()} == {1}
