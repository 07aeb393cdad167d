"""ASGO's constructor option ``fused`` (``split_fused``): the matrices named by a suffix regrouped into
``row_parts`` groups before the blocks are cut, so routes that build the optimizer from options alone
(OptimizerFactory, the CLI, a DeepSpeed config) reach ``row_parts``.

The oracle: ASGO over the same groups written by hand (a ``row_parts`` group) steps bit for bit the same.
The DeepSpeed config route: tests/deepspeed/test_equivalence.py and test_config.py; the CLI:
tests/lightning/test_cli.py.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_soaa import ASGO, DASGO
from lightning_soaa.distributed.checkpoint import with_saved_groups
from lightning_soaa.lightning.factory import OptimizerFactory
from lightning_soaa.optim.asgo import asgo_param_groups
from lightning_soaa.optim.asgo_groups import split_fused
from tests.conformance._battery import assert_identical
from tests.harness.checkpoints import unrecorded
from tests.harness.models import QKVNet, batch, loss_fn, qkv_pair, set_qkv_trainable

f64 = torch.float64
KW: dict[str, Any] = dict(lr=5e-2, root_every=2, damping=1e-6)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_emb, self.qkv, self.proj = nn.Embedding(11, 6), nn.Linear(6, 18), nn.Linear(6, 6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(6, 12)  # a longer suffix ("attn.qkv.weight") picks another part count

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok_emb(ids)
        q, k, v = self.qkv(h).chunk(3, -1)
        a, b = self.attn.qkv(h).chunk(2, -1)
        return self.proj(torch.tanh(q * k + v) + a * b)


def _model(seed: int = 0) -> _Block:
    torch.manual_seed(seed)
    return _Block().to(f64)


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int = 4) -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(n):
        ids = torch.randint(0, 11, (5, 4), generator=g)
        opt.zero_grad()
        model(ids).square().mean().backward()
        opt.step()


def test_fused_steps_as_the_row_parts_groups_written_by_hand() -> None:
    fused = {"qkv.weight": 3, "attn.qkv.weight": 2}
    a, b, c = _model(), _model(), _model()
    opt_a = ASGO(a.named_parameters(), fused=fused, **KW)
    named = dict(b.named_parameters())
    by_hand = [{"params": [(n, p) for n, p in named.items() if n not in ("qkv.weight", "attn.qkv.weight")]},
               {"params": [("qkv.weight", named["qkv.weight"])], "row_parts": 3},
               {"params": [("attn.qkv.weight", named["attn.qkv.weight"])], "row_parts": 2}]
    opt_b = ASGO(by_hand, **KW)
    opt_c = ASGO(c.named_parameters(), **KW)
    assert [g.get("param_names") for g in opt_a.param_groups] == [g.get("param_names") for g in opt_b.param_groups]
    assert [g["row_parts"] for g in opt_a.param_groups] == [1, 3, 2]
    for m, o in ((a, opt_a), (b, opt_b), (c, opt_c)):
        _steps(m, o)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=n)
    assert (a.qkv.weight - c.qkv.weight).abs().max() > 1e-4  # fused changed the step: not vacuous


def test_fused_keeps_each_groups_options_and_the_order_of_asgo_param_groups() -> None:
    m = _model()
    groups = split_fused(asgo_param_groups(m, lr=0.1), {"qkv.weight": 3})
    assert groups == asgo_param_groups(m, fused={"qkv.weight": 3}, lr=0.1)
    assert [(g.get("use_asgo"), g.get("row_parts"), g["lr"]) for g in groups] == [
        (None, None, 0.1), (False, None, 0.1), (None, 3, 0.1)]
    # two groups with their own lr: each matched matrix keeps its group's options
    named = dict(m.named_parameters())
    two = [{"params": [("qkv.weight", named["qkv.weight"]), ("proj.weight", named["proj.weight"])], "lr": 0.3},
           {"params": [("attn.qkv.weight", named["attn.qkv.weight"])], "lr": 0.2, "betas": (0.9, 0.9)}]
    opt = ASGO(two, fused={"qkv.weight": 3})
    # group 1, whose every matrix moved, keeps its index (a per-group LR schedule's list still fits it);
    # the part of group 0 that moved is appended
    assert [(g["param_names"], g["lr"], g["row_parts"], g["betas"]) for g in opt.param_groups] == [
        (["proj.weight"], 0.3, 1, (0.9, 0.8)), (["attn.qkv.weight"], 0.2, 3, (0.9, 0.9)),
        (["qkv.weight"], 0.3, 3, (0.9, 0.8))]
    # the embedding table stays in the AdamW part, its suffix counted as found
    assert split_fused(asgo_param_groups(m), {"tok_emb.weight": 2}) == asgo_param_groups(m)


def test_a_group_all_of_whose_matrices_move_keeps_its_index_under_a_per_group_schedule() -> None:
    """Found by review: the groups were reordered (the moved ones last), so LambdaLR's per-group list froze
    the wrong group (0.094 off the same run with the row_parts group written by hand, 5 steps)."""
    runs = []
    for by_hand in (False, True):
        m = _model()
        named = dict(m.named_parameters())
        fused = ("qkv.weight", "attn.qkv.weight")
        qkv = {"params": [(n, named[n]) for n in fused], "lr": 0.05, **({"row_parts": 3} if by_hand else {})}
        rest = {"params": [(n, p) for n, p in named.items() if n not in fused], "lr": 0.01}
        opt = ASGO([qkv, rest], **({} if by_hand else {"fused": {"qkv.weight": 3}}))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0, lambda s: 0.0])  # freeze group 1
        g = torch.Generator().manual_seed(3)
        for _ in range(5):
            opt.zero_grad()
            m(torch.randint(0, 11, (5, 4), generator=g)).square().mean().backward()
            opt.step()
            sched.step()
        runs.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_suffixes_match_whole_dotted_parts_trainable_matrices_move_and_frozen_ones_are_recorded() -> None:
    """Found by review: "kv.weight" (a cross-attention's fused k/v, 2 parts) also caught "self_attn.qkv.weight"
    (3 parts), which was stepped as two parts of 1.5 heads each. A frozen matrix stays in its group, which
    records its parts (``fused_parts``); a group that sets ``fused_parts`` itself keeps it."""
    m = _model()
    named = [(n, p) for n, p in m.named_parameters() if n != "attn.qkv.weight"]
    with pytest.raises(ValueError, match="no matrix parameter's name, trainable or frozen, ends with 'kv.weight'"):
        split_fused(named, {"kv.weight": 2})
    assert [g.get("row_parts") for g in split_fused(named, {"qkv.weight": 3})] == [None, 3]
    m.proj.requires_grad_(False)
    groups = split_fused(m.named_parameters(), {"proj.weight": 2})
    assert len(groups) == 1 and groups[0]["fused_parts"] == ((3, 2),)
    assert [n for n, _ in groups[0]["params"]][3] == "proj.weight"
    given = [{"params": list(m.named_parameters()), "fused_parts": []}]  # decided by the caller: kept, and the
    got = split_fused(given, {"proj.weight": 2, "qkv.weight": 3})  # trainable matrices move as in any group
    assert [(g.get("fused_parts"), g.get("row_parts")) for g in got] == [([], None), (None, 3)]
    assert [n for n, _ in got[1]["params"]] == ["qkv.weight", "attn.qkv.weight"]


def _routing(opt: ASGO) -> dict[str, tuple[str, int]]:
    """name -> (the method, its parts) of every parameter."""
    out = {}
    for g in opt.param_groups:
        for p, n in zip(g["params"], g["param_names"]):
            out[n] = ("asgo", opt._row_parts_of(p, g)) if opt.is_matrix_param(p, g, n) else ("adamw", 0)
    return out


def test_a_groups_adamw_indices_move_with_their_parameters_when_fused_splits_it() -> None:
    """Found by a helper: ``split_fused`` copied a group's ``adamw_indices`` into both halves as given, so they
    named other parameters or none: the fused QKV moved to its parts group took the AdamW part (position 0
    there) and the matrix the user sent to AdamW the matrix method, silently; or the constructor refused
    'adamw_indices=[3]: positions 0..0', a group the user never wrote. Each half's now name the same
    parameters; one at a matched matrix keeps it in its group (the AdamW part has no parts), like a
    ``use_asgo=False`` group's. The oracle: the groups written by hand, bit for bit."""
    fused = {"qkv.weight": 3, "attn.qkv.weight": 2}
    for first in ("proj.weight", "qkv.weight"):  # proj.weight (to AdamW) at position 0, or at 3
        a, b = _model(), _model()
        names = [first] + [n for n, _ in a.named_parameters() if n != first]
        at = [names.index("proj.weight")]
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        opt_a = ASGO([{"params": [(n, pa[n]) for n in names], "adamw_indices": at}], fused=fused, **KW)
        stay = [n for n in names if n not in fused]
        by_hand = [{"params": [(n, pb[n]) for n in stay], "adamw_indices": [stay.index("proj.weight")]},
                   {"params": [("qkv.weight", pb["qkv.weight"])], "row_parts": 3},
                   {"params": [("attn.qkv.weight", pb["attn.qkv.weight"])], "row_parts": 2}]
        opt_b = ASGO(by_hand, **KW)
        assert _routing(opt_a) == _routing(opt_b), first
        assert _routing(opt_a)["proj.weight"] == ("adamw", 0) and _routing(opt_a)["qkv.weight"] == ("asgo", 3)
        assert [g["adamw_indices"] for g in opt_a.param_groups] == [by_hand[0]["adamw_indices"], [], []]
        _steps(a, opt_a)
        _steps(b, opt_b)
        for (n, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m, n=n, f=first: f"{f} first, {n}: {m}")
    m = _model()
    named = list(m.named_parameters())  # a matched matrix at a position of adamw_indices stays, in the AdamW part
    groups = split_fused([{"params": named, "adamw_indices": (1,)}], fused)
    assert [([n for n, _ in g["params"]], g["adamw_indices"]) for g in groups] == [
        (["tok_emb.weight", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "attn.qkv.bias"], (1,)),
        (["attn.qkv.weight"], ())]
    assert _routing(ASGO(groups))["qkv.weight"] == ("adamw", 0)
    with pytest.raises(ValueError, match=re.escape("Invalid adamw_indices=[7]: a list of distinct positions 0..6 "
                                                   "of the group's parameters")):
        ASGO([{"params": named, "adamw_indices": [7]}], fused=fused)  # the group as given, not a half of it


def test_a_group_given_as_a_set_is_left_for_torch_to_refuse() -> None:
    m = _model()
    with pytest.raises(TypeError, match="ordered collections"):
        ASGO([{"params": set(m.named_parameters())}], fused={"qkv.weight": 3})


def test_names_given_apart_by_id_as_deepspeeds_client_has_them() -> None:
    m = _model()
    tensors = [p for p in m.parameters()]
    groups = split_fused(tensors, {"proj.weight": 2}, names={id(p): n for n, p in m.named_parameters()})
    assert [[id(p) for p in g["params"]] for g in groups] == [
        [id(p) for n, p in m.named_parameters() if n != "proj.weight"], [id(m.proj.weight)]]
    assert groups[1]["row_parts"] == 2


@pytest.mark.parametrize("value", [{"qkv.weight": 0}, {"qkv.weight": True}, {"qkv.weight": 1.5}, {"": 3},
                                   ["qkv.weight"], "qkv.weight"])
def test_bad_fused_raises_naming_field_value_and_what_is_allowed(value: Any) -> None:
    with pytest.raises(ValueError, match=re.escape(f"Invalid fused={value!r}. Must be a dict of parameter-name "
                                                   "suffix -> number of parts (an int >= 1)")):
        ASGO(_model().named_parameters(), fused=value)


def test_a_suffix_that_matches_nothing_is_refused_with_a_hint_for_unnamed_parameters() -> None:
    with pytest.raises(ValueError, match=re.escape("no matrix parameter's name, trainable or frozen, ends with "
                                                   "'kv.bias'")):
        ASGO(_model().named_parameters(), fused={"kv.bias": 2})  # a bias is not a matrix
    with pytest.raises(ValueError, match=r"ends with 'qkv.weight'.*4 matrix parameter\(s\) came without names: "
                                         r"pass model.named_parameters\(\)"):
        ASGO(_model().parameters(), fused={"qkv.weight": 3})
    # a frozen matrix that the walk left out of the groups is found in the walked module (a later
    # add_param_group steps it as its parts); a suffix that matches nothing there is still refused
    frozen = _model()
    frozen.proj.requires_grad_(False)
    ASGO(asgo_param_groups(frozen), fused={"proj.weight": 2})
    with pytest.raises(ValueError, match="ends with 'prj.weight'"):
        ASGO(asgo_param_groups(frozen), fused={"prj.weight": 2})


def test_a_group_that_sets_another_row_parts_is_refused() -> None:
    m = _model()
    with pytest.raises(ValueError, match=re.escape("'qkv.weight' matches parameters of a param group that sets "
                                                   "row_parts=2")):
        ASGO([{"params": [("qkv.weight", m.qkv.weight)], "row_parts": 2}], fused={"qkv.weight": 3})
    opt = ASGO([{"params": [("qkv.weight", m.qkv.weight)], "row_parts": 3}], fused={"qkv.weight": 3})
    assert [g["row_parts"] for g in opt.param_groups] == [3]


def test_checkpoint_of_a_fused_run_resumes_exactly_and_loads_into_a_fused_optimizer_only() -> None:
    a = _model()
    opt = ASGO(a.named_parameters(), fused={"qkv.weight": 3}, **KW)
    _steps(a, opt, 2)
    b = _model(seed=1)
    b.load_state_dict(a.state_dict())
    again = ASGO(b.named_parameters(), fused={"qkv.weight": 3}, **KW)
    again.load_state_dict(opt.state_dict())
    _steps(a, opt, 2)
    _steps(b, again, 2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    with pytest.raises(ValueError):  # other groups: refused (the message is the conformance battery's)
        ASGO(_model().named_parameters(), **KW).load_state_dict(opt.state_dict())


def test_the_factory_passes_fused_to_asgo() -> None:
    opt = OptimizerFactory("ASGO", {"lr": 0.02, "fused": {"qkv.weight": 3}}).build(_model())
    assert [(g["param_names"], g["row_parts"]) for g in opt.param_groups][-1] == (["qkv.weight", "attn.qkv.weight"], 3)


def test_a_group_given_one_bare_tensor_is_read_as_torch_reads_it() -> None:
    w = nn.Parameter(torch.randn(6, 4))
    opt = ASGO([{"params": w, "param_names": ["qkv.weight"]}], fused={"qkv.weight": 3})
    assert [(g["row_parts"], g["param_names"]) for g in opt.param_groups] == [(3, ["qkv.weight"])]
    with pytest.raises(TypeError, match="should be an iterable of Tensors or dicts"):  # torch's own refusal
        ASGO(w, fused={"qkv.weight": 3})


class _Wte(_Block):
    """:class:`_Block` with its table named as GPT-2's ``wte`` (no "emb" in the name)."""

    tok_emb = property(lambda self: self.wte)  # what _Block.forward reads

    def __init__(self) -> None:
        super().__init__()
        self.wte = self._modules.pop("tok_emb")


def test_the_factory_sends_an_embedding_named_wte_to_adamw_also_with_fused() -> None:
    """Found by a hunter: the factory handed ASGO ``named_parameters()`` alone, so a table named ``wte`` was
    preconditioned as a matrix. Now it takes the registry's module groups, and ``fused`` regroups those:
    4 steps bit for bit ASGO over ``asgo_param_groups(model, fused=...)``. A table whose name says "emb"
    keeps the single group ``named_parameters()`` gave (same checkpoints); other optimizers are unchanged."""
    fused = {"qkv.weight": 3}
    torch.manual_seed(0)
    a = _Wte().to(f64)
    torch.manual_seed(0)
    b = _Wte().to(f64)
    opt_a = OptimizerFactory("ASGO", {**KW, "fused": fused}).build(a)
    opt_b = ASGO(asgo_param_groups(b, fused=fused), **KW)
    assert [(g["param_names"], g.get("use_asgo"), g["row_parts"]) for g in opt_a.param_groups] == [
        (["qkv.bias", "proj.weight", "proj.bias", "attn.qkv.bias"], None, 1),
        (["wte.weight"], False, 1), (["qkv.weight", "attn.qkv.weight"], None, 3)]
    _steps(a, opt_a)
    _steps(b, opt_b)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=n)
    m = _model()
    assert [g["param_names"] for g in OptimizerFactory("ASGO", KW).build(m).param_groups] == [
        [n for n, _ in m.named_parameters()]]
    adamw = OptimizerFactory("AdamW").build(a)
    assert [g["param_names"] for g in adamw.param_groups] == [[n for n, _ in a.named_parameters()]]


def test_route_param_groups_reads_a_zero3_partitions_full_shape() -> None:
    """Found by a reviewer: under ``deepspeed.zero.Init`` (Lightning's ``configure_model`` at ZeRO-3) a
    parameter is an empty 1-D partition with its shape in ``ds_shape``; the name rule then said AdamW
    anyway, so a table named ``wte`` stayed in the matrix group (2.3e-2 off after one step at W=2)."""
    from lightning_soaa.optim.asgo_groups import route_param_groups

    class _Tok(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.lin = nn.Embedding(5, 4), nn.Linear(4, 4)

    m = _Tok()
    for p in m.parameters():  # as deepspeed.zero.Init leaves them
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    assert [([n for n, _ in g["params"]], g.get("use_asgo")) for g in route_param_groups(m)] == [
        (["lin.weight", "lin.bias"], None), (["wte.weight"], False)]


# ------------------------------------------------------------ a fused matrix frozen at construction or added later
FUSED = {"qkv.weight": 3}


def _build(route: str, model: QKVNet, fused: dict[str, int] | None, **group: Any) -> ASGO:
    """ASGO over ``model``, its projection(s) frozen now, by one of the routes that leave them out of the
    regrouping: the constructor given them frozen (``named``), or a walk that leaves them out for a later
    ``add_param_group`` (``walk``: asgo_param_groups; ``recorded``: asgo_param_groups given ``fused``, ASGO
    not; ``factory``: OptimizerFactory's route_param_groups). ``group``: options of the constructor's one
    group (``named`` only)."""
    set_qkv_trainable(model, False)
    extra = {} if fused is None else {"fused": fused}
    if route == "named":
        return ASGO([{"params": list(model.named_parameters()), **group}], **KW, **extra)
    if route == "walk":
        return ASGO(asgo_param_groups(model), **KW, **extra)
    if route == "recorded":
        return ASGO(asgo_param_groups(model, **extra), **KW)
    return OptimizerFactory("ASGO", {**KW, **extra}).build(model)  # type: ignore[no-any-return]


def _unfreeze(route: str, model: QKVNet, opt: ASGO) -> None:
    """Lightning's BaseFinetuning: unfreeze the projection(s) and (walked routes) add them as one group of bare
    tensors with its own lr."""
    ps = set_qkv_trainable(model, True)
    if route != "named":
        opt.add_param_group({"params": ps, "lr": KW["lr"] / 2})


def _train(model: QKVNet, opt: ASGO, ts: range) -> None:
    for t in ts:
        opt.zero_grad()
        loss_fn(model, *batch(t, 0)).backward()
        opt.step()


def _run(route: str, model: QKVNet, fused: dict[str, int] | None, **group: Any) -> ASGO:
    """Two steps frozen, then unfrozen (``_unfreeze``) and three more."""
    opt = _build(route, model, fused, **group)
    _train(model, opt, range(2))
    _unfreeze(route, model, opt)
    _train(model, opt, range(2, 5))
    return opt


def _same_as_separate(fused: QKVNet, separate: QKVNet, atol: float) -> None:
    want = dict(separate.named_parameters())
    for name in ("weight", "bias"):
        parts = torch.cat([getattr(lin, name) for lin in separate.projections()])
        torch.testing.assert_close(getattr(fused.qkv, name), parts, rtol=0, atol=atol, msg=lambda m: f"qkv.{name}: {m}")
    for n, p in fused.named_parameters():
        if not n.startswith("qkv."):
            torch.testing.assert_close(p, want[n], rtol=0, atol=atol, msg=n)


@pytest.mark.parametrize("route", ["named", "walk", "recorded", "factory"])
def test_a_fused_matrix_frozen_at_construction_steps_as_its_parts_once_unfrozen(route: str) -> None:
    """Found by a hunter: ``fused`` regrouped the trainable matrices given to the constructor only, so a fused
    QKV frozen then, or brought later by BaseFinetuning's one group of bare tensors, was stepped as one matrix
    once it trained (and a model whose only fused matrix was frozen was refused at construction). Its parts
    are decided when the group is built or added (``fused_parts``): 2 steps frozen and 3 unfrozen match ASGO
    on q, k and v as separate parameters (float64, the same routes), and stepped whole they do not."""
    a, b = qkv_pair()
    opt = _run(route, a, FUSED)
    _run(route, b, None)
    gi = 0 if route == "named" else 1  # the constructor's group, or the one added
    assert opt.param_groups[gi]["fused_parts"] == (((2, 3),) if route == "named" else ((0, 3),))
    qkv = next(i for i, p in enumerate(opt._params) if p is a.qkv.weight)
    assert [blk.shape for blk in opt.block_table.by_param[qkv]] == [(3, 5)] * 3
    _same_as_separate(a, b, atol=1e-12)
    whole, c = qkv_pair()
    _run("named", whole, FUSED, fused_parts=[])  # decided by the caller: one matrix
    assert (whole.qkv.weight - a.qkv.weight).abs().max() > 1e-4  # the parts changed the step: not vacuous


def _copy_of(model: QKVNet) -> QKVNet:
    twin = QKVNet(True).to(torch.float64)
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("route", ["named", "walk"])
@pytest.mark.parametrize("form", ["state_dict", "dcp"])
def test_the_parts_are_saved_with_the_group_and_a_resume_steps_them_again(route: str, form: str,
                                                                           tmp_path: Path) -> None:
    """The part decision is made once and saved with the group: a fresh optimizer built as the first (the
    projection frozen at construction; the walked route re-adds it when it unfreezes it, or replays the saved
    group as BaseFinetuning's resume assigns it) loads the state, plain or by torch's DCP recipe, over the same
    three parts, and continues bit for bit as the uninterrupted run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    a, _ = qkv_pair()
    opt = _run(route, a, FUSED)
    gi = 0 if route == "named" else 1
    sd = copy.deepcopy(opt.state_dict())
    # (in the metadata, not a key of the group: torch's DCP refuses a checkpoint lacking a key its destination shows)
    as_saved = with_saved_groups("ASGO", sd)["param_groups"]
    assert "fused_parts" not in sd["param_groups"][gi]
    assert tuple(map(tuple, as_saved[gi]["fused_parts"])) == opt.param_groups[gi]["fused_parts"]
    for replay in ([False, True] if route == "walk" else [False]):
        b = _copy_of(a)
        fresh = _build(route, b, FUSED)
        if replay:  # the saved group, its keys as saved (param_names, fused_parts), over this model's tensors
            saved = {k: v for k, v in as_saved[gi].items() if k != "params"}
            fresh.add_param_group({**saved, "params": set_qkv_trainable(b, True)})
        else:
            _unfreeze(route, b, fresh)
        assert tuple(map(tuple, fresh.param_groups[gi]["fused_parts"])) == opt.param_groups[gi]["fused_parts"]
        if form == "state_dict":
            fresh.load_state_dict(copy.deepcopy(sd))
        else:
            path = str(tmp_path / f"{route}_{replay}")
            dcp.save({"optim": get_optimizer_state_dict(a, opt)}, checkpoint_id=path)
            dest = {"optim": get_optimizer_state_dict(b, fresh)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to load in a single process"
                dcp.load(dest, checkpoint_id=path)
            set_optimizer_state_dict(b, fresh, dest["optim"])
        qkv = next(i for i, p in enumerate(fresh._params) if p is b.qkv.weight)
        assert len(fresh.block_table.by_param[qkv]) == 3
        assert all("gram" in fresh.block_state(blk) for blk in fresh.block_table.by_param[qkv])
        ref = copy.deepcopy((a, opt))
        _train(ref[0], ref[1], range(5, 7))
        _train(b, fresh, range(5, 7))
        for (n, p), q in zip(b.named_parameters(), ref[0].parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_a_checkpoint_saved_without_fused_parts_is_refused_naming_the_remedy_which_continues_it_whole() -> None:
    """A checkpoint of before the key stepped a fused matrix frozen at construction whole: loaded into an
    optimizer that now decides its parts, the blocks differ. Refused naming fused_parts and the remedy, nothing
    changed; the remedy (the group given ``fused_parts=[]``) loads it and continues as saved."""
    a, _ = qkv_pair()
    saved_by = _run("named", a, FUSED, fused_parts=[])  # stepped whole, as before the key
    sd = unrecorded(copy.deepcopy(saved_by.state_dict()))  # as before the key: the groups without it
    assert not any("fused_parts" in g for g in sd["param_groups"])
    b = _copy_of(a)
    fresh = _build("named", b, FUSED)
    set_qkv_trainable(b, True)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"saved without fused_parts, this optimizer has fused_parts=\(\(2, 3\),\).*"
                                         r"give that group fused_parts=\[\]"):
        fresh.load_state_dict(copy.deepcopy(sd))
    assert_identical(fresh.state_dict(), before)
    resumed = _build("named", b, FUSED, fused_parts=[])
    set_qkv_trainable(b, True)
    resumed.load_state_dict(sd)
    _train(a, saved_by, range(5, 7))
    _train(b, resumed, range(5, 7))
    for p, q in zip(b.parameters(), a.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def _dcp_save(model: QKVNet, opt: ASGO, path: Path, **group: Any) -> None:
    """A DCP checkpoint of ``opt`` (torch's recipe over plain parameters); ``group``: keys written into every
    saved group (a checkpoint of an earlier version)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, opt)
    for g in sd["param_groups"]:
        g.update(group)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one process: "assuming the intent is to save in a single ..."
        dcp.save({"optim": sd}, checkpoint_id=str(path))


def _dcp_resume(model: QKVNet, opt: ASGO, path: Path) -> None:
    """``dcp.load`` (without allow_partial_load) into ``opt``'s destination, then set_optimizer_state_dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    dest = {"optim": get_optimizer_state_dict(model, opt)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(dest, checkpoint_id=str(path))  # (it refused: 'Missing key in checkpoint state_dict: ...fused_parts')
    assert not any("fused_parts" in g for g in dest["optim"]["param_groups"])  # a key no old checkpoint has
    set_optimizer_state_dict(model, opt, dest["optim"])


def test_an_empty_fused_parts_is_not_saved_so_its_remedy_loads_an_old_dcp_checkpoint_as_it_is(tmp_path: Path) -> None:
    """Found by a helper: the remedy for a checkpoint saved before ``fused_parts`` (the group given
    ``fused_parts=[]``) was saved with the group, so the DCP destination showed a key that checkpoint lacks and
    ``dcp.load`` refused it ('Missing key in checkpoint state_dict: ...fused_parts') unless given
    ``allow_partial_load``. A load keeps the optimizer's own layout options (the blocks are cut with them) and the
    saved layout is checked beside, so an empty one (and an empty ``adamw_indices``) is left out of the saved
    groups: the old checkpoint (an optimizer without the key: the matrix stepped whole), one saved with ``[]``
    before this change, and a torch state dict all load plainly and continue bit for bit, the group keeping []."""
    a, _ = qkv_pair()
    old = _run("named", a, None)  # as saved before the key: the projection frozen at construction stepped whole
    _dcp_save(a, old, tmp_path / "without")
    _dcp_save(a, old, tmp_path / "with", fused_parts=[])
    ref = copy.deepcopy((a, old))
    _train(*ref, range(5, 7))
    for ckpt in ("without", "with"):
        b = _copy_of(a)
        resumed = _build("named", b, FUSED, fused_parts=[])  # the remedy the refusal names
        set_qkv_trainable(b, True)
        _dcp_resume(b, resumed, tmp_path / ckpt)
        assert resumed.param_groups[0]["fused_parts"] == [] and resumed.num_steps == 5, ckpt
        sd = copy.deepcopy(resumed.state_dict())
        assert "fused_parts" not in sd["param_groups"][0]
        again = _build("named", _copy_of(b), FUSED, fused_parts=[])
        again.load_state_dict(sd)  # a torch state dict round trip (Lightning's checkpoint holds this one)
        assert again.param_groups[0]["fused_parts"] == []
        _train(b, resumed, range(5, 7))
        for (n, p), q in zip(b.named_parameters(), ref[0].parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m, n=n, c=ckpt: f"{c} the key, {n}: {m}")
    m, _ = qkv_pair()
    by_shape = ASGO([{"params": list(m.named_parameters()), "adamw_indices": []}], **KW)  # its own remedy
    assert "adamw_indices" not in by_shape.state_dict()["param_groups"][0]


def test_a_refused_checkpoint_saved_with_an_empty_layout_option_is_not_said_to_be_older_than_the_key() -> None:
    """Found by a reviewer: an empty ``adamw_indices`` (or ``fused_parts``) is not saved, so a checkpoint saved
    with one today, loaded into a group that sets positions (other blocks), was refused only with the note for a
    checkpoint 'saved before 2026-12-04', a cause the user could rule out. The message now says both; a
    checkpoint that records its groups (the metadata keeps these options) is said to be saved with []."""
    m, _ = qkv_pair()
    named = list(m.named_parameters())
    saved_by = ASGO([{"params": named, "adamw_indices": []}], **KW)  # inp.weight: the matrix method
    for t in range(2):
        saved_by.zero_grad()
        loss_fn(m, *batch(t, 0)).backward()
        saved_by.step()
    sd = copy.deepcopy(saved_by.state_dict())
    other = ASGO([{"params": list(_copy_of(m).named_parameters()), "adamw_indices": [0]}], **KW)  # AdamW
    with pytest.raises(ValueError, match=r"saved without adamw_indices, this optimizer has adamw_indices=\[0\].*"
                                         r"A checkpoint of an earlier version saved with adamw_indices=\[\] lacks "
                                         r"the key too"):
        other.load_state_dict(unrecorded(sd))
    with pytest.raises(ValueError, match=r"saved with adamw_indices=\[\], this optimizer has adamw_indices=\[0\]"):
        other.load_state_dict(sd)


def test_bad_fused_parts_are_refused_naming_the_value_and_what_is_allowed() -> None:
    """``fused_parts`` is a layout option of ASGO's groups: malformed values, a position that is not a matrix
    of the matrix method, and a group that cuts its matrices otherwise are refused; DASGO refuses it; a
    frozen matrix in a group whose ``row_parts`` differs from its ``fused`` count is refused as a trainable one."""
    m, _ = qkv_pair()
    named = list(m.named_parameters())  # inp.weight, inp.bias, qkv.weight, qkv.bias, out.weight, out.bias
    for bad in ([[2, 1]], [[6, 3]], [[2, 3], [2, 3]], [(2, 3.0)], 3, [[True, 3]]):
        with pytest.raises(ValueError, match=re.escape(f"Invalid fused_parts={bad!r}: a list of (position, parts) "
                                                       "pairs, distinct positions 0..5")):
            ASGO([{"params": named, "fused_parts": bad}])
    with pytest.raises(ValueError, match=r"position 3 is parameter 'qkv.bias' of shape \(9,\).*AdamW part"):
        ASGO([{"params": named, "fused_parts": [[3, 3]]}])
    for clash in ({"row_parts": 3}, {"use_asgo": False}):
        with pytest.raises(ValueError, match=f"Invalid fused_parts=.* with {next(iter(clash))}="):
            ASGO([{"params": named[2:3], "fused_parts": [[0, 3]], **clash}])
    with pytest.raises(ValueError, match="Invalid fused_parts=.*for DASGO"):
        DASGO([{"params": named, "fused_parts": [[2, 3]]}])
    ASGO([{"params": named, "fused_parts": [[2, 3]]}])  # by hand: taken
    set_qkv_trainable(m, False)
    with pytest.raises(ValueError, match=re.escape("'qkv.weight' matches parameters of a param group that sets "
                                                   "row_parts=2")):
        ASGO([{"params": named, "row_parts": 1}, {"params": [named[2]], "row_parts": 2}], fused=FUSED)
    opt = ASGO([{"params": named[:2]}, {"params": [named[2]], "row_parts": 3}], fused=FUSED)  # the group's own
    assert "fused_parts" not in opt.param_groups[1] and len(opt.block_table.by_param[2]) == 3
    with pytest.raises(ValueError, match=re.escape("parameter qkv.weight of shape (9, 5), 2 parts by its group's "
                                                   "fused_parts (from fused), has 9 rows, not a multiple of parts=2")):
        ASGO(named, fused={"qkv.weight": 2})  # frozen: refused as a trainable one (it was stepped whole)


def test_the_remedy_for_a_checkpoint_saved_without_fused_parts_loads_it_where_another_fused_matrix_trained() -> None:
    """Found by a reviewer: the remedy the refusal names (the group given ``fused_parts=[]``) kept that group's
    trainable fused matrices in it too, while the run that saved the checkpoint had moved them to their
    ``row_parts`` group, so a model with one trainable and one frozen fused matrix (a partly frozen model)
    was refused again, as 'the state has 2 param groups, this optimizer has 1'. The trainable ones move as
    they always did; the checkpoint (written here in the layout of before the key) loads and continues bit
    for bit."""
    a = _model()
    a.attn.qkv.requires_grad_(False)  # 'attn.qkv.weight' frozen; 'qkv.weight' (same suffix) trains
    named = dict(a.named_parameters())
    kept = [(n, p) for n, p in named.items() if n != "qkv.weight"]
    saved_by = ASGO([{"params": kept, "fused_parts": []}, {"params": [("qkv.weight", named["qkv.weight"])],
                                                          "row_parts": 3}], **KW)  # as fused laid it out then
    _steps(a, saved_by, 2)
    a.attn.qkv.requires_grad_(True)
    _steps(a, saved_by, 2)
    sd = unrecorded(copy.deepcopy(saved_by.state_dict()))  # (the empty fused_parts: as before the key)
    b = _model()
    b.load_state_dict(a.state_dict())
    b.attn.qkv.requires_grad_(False)
    resumed = ASGO([{"params": list(b.named_parameters()), "fused_parts": []}], fused={"qkv.weight": 3}, **KW)
    assert [g.get("row_parts", 1) for g in resumed.param_groups] == [1, 3]
    b.attn.qkv.requires_grad_(True)
    resumed.load_state_dict(sd)
    _steps(a, saved_by, 2)
    _steps(b, resumed, 2)
    for (n, p), q in zip(b.named_parameters(), a.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_a_group_that_sets_fused_parts_keeps_them_on_the_parameters_that_stay() -> None:
    """Its trainable fused matrices move out (above): the given positions follow the parameters that stay,
    and an entry that gives a moved matrix other parts than ``fused`` is refused naming both."""
    m, _ = qkv_pair()
    named = list(m.named_parameters())  # inp.weight, inp.bias, qkv.weight, qkv.bias, out.weight, out.bias
    twin = [(f"x.{n}", p.detach().clone().requires_grad_(False)) for n, p in named[2:3]]  # a frozen 'x.qkv.weight'
    opt = ASGO([{"params": named + twin, "fused_parts": [(6, 3)]}], fused=FUSED)
    assert opt.param_groups[0]["fused_parts"] == [(5, 3)] and opt.param_groups[0]["param_names"][5] == "x.qkv.weight"
    assert opt.param_groups[1]["param_names"] == ["qkv.weight"] and "fused_parts" not in opt.param_groups[1]
    with pytest.raises(ValueError, match=re.escape("Invalid fused_parts=[(2, 2)]: position 2 gives 2 parts to a "
                                                   "trainable matrix to which fused={'qkv.weight': 3} gives 3")):
        ASGO([{"params": named, "fused_parts": [(2, 2)]}], fused=FUSED)


def test_parts_recorded_by_an_earlier_walk_given_fused_do_not_cut_an_optimizer_built_later_without_it() -> None:
    """Found by a reviewer: the parts ``asgo_param_groups(model, fused=...)`` recorded outlived its optimizer,
    so an ablation in the same process (``asgo_param_groups(model)``, ASGO without ``fused``) stepped the
    projection that BaseFinetuning adds as its parts, nothing having asked for them. The latest walk decides."""
    m, _ = qkv_pair()
    set_qkv_trainable(m, False)
    asgo_param_groups(m, fused=FUSED)
    opt = ASGO(asgo_param_groups(m), **KW)
    opt.add_param_group({"params": set_qkv_trainable(m, True)})
    assert "fused_parts" not in opt.param_groups[-1]
    assert len(opt.block_table.by_param[next(i for i, p in enumerate(opt._params) if p is m.qkv.weight)]) == 1


def test_a_frozen_fused_matrix_is_found_after_a_wrapper_walked_first_is_gone() -> None:
    """Found by a reviewer: the walk's module was the first walk's, kept by weak reference; a wrapper walked
    first and dropped left it dead, and ``fused`` refused a model whose only fused matrix is frozen as
    matching nothing. A later walk's module replaces a dead one."""
    import gc

    from lightning_soaa.optim.asgo_groups import route_param_groups

    m, _ = qkv_pair()
    set_qkv_trainable(m, False)
    route_param_groups(nn.Sequential(m))
    gc.collect()
    opt = ASGO(asgo_param_groups(m), fused=FUSED, **KW)
    opt.add_param_group({"params": set_qkv_trainable(m, True)})
    assert opt.param_groups[-1]["fused_parts"] == ((0, 3),)


def test_the_recorded_parts_survive_a_swapping_conversion_before_the_unfreeze() -> None:
    """Found by a hunter: the walk's record was a weak reference to each parameter, and torch.utils.swap_tensors
    refuses a tensor that has one, so ``model.to(...)`` under ``set_swap_module_params_on_conversion(True)`` failed
    ("Couldn't swap"). A swap keeps each Parameter object: the record of a frozen fused matrix is still found when
    BaseFinetuning's ``add_param_group`` brings it, which steps it as its parts."""
    m, _ = qkv_pair()
    set_qkv_trainable(m, False)
    opt = ASGO(asgo_param_groups(m), fused=FUSED, **KW)
    was = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        m.to("cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(was)
    opt.add_param_group({"params": set_qkv_trainable(m, True)})
    assert opt.param_groups[-1]["fused_parts"] == ((0, 3),)


def test_the_module_walks_and_fused_refuse_a_lazy_parameter_naming_it() -> None:
    """``asgo_param_groups`` and ``fused`` read shapes before the optimizer's own check: a lazy module's
    uninitialized parameter raised torch's message there, naming nothing (the walk's: one that blamed
    ``load_state_dict``)."""
    model = nn.Sequential(nn.LazyLinear(6), nn.Tanh(), nn.Linear(6, 2))
    msg = r"parameter '0.weight' is an uninitialized parameter of a lazy module"
    with pytest.raises(ValueError, match="asgo_param_groups: " + msg):
        asgo_param_groups(model, fused={"0.weight": 3})
    with pytest.raises(ValueError, match="ASGO: " + msg):
        ASGO(model.named_parameters(), fused={"0.weight": 3}, **KW)
    model(torch.randn(2, 5))  # the dry run: now it builds
    ASGO(asgo_param_groups(model, fused={"0.weight": 3}), **KW)
