"""ASGO's constructor option ``fused`` (``split_fused``): the matrices named by a suffix regrouped into
``row_parts`` groups before the blocks are cut, so routes that build the optimizer from options alone
(OptimizerFactory, the CLI, a DeepSpeed config) reach ``row_parts``.

The oracle: ASGO over the same groups written by hand (a ``row_parts`` group) steps bit for bit the same.
The DeepSpeed config route: tests/deepspeed/test_equivalence.py and test_config.py; the CLI:
tests/lightning/test_cli.py.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
import torch
from torch import nn

from lightning_soaa import ASGO
from lightning_soaa.lightning.factory import OptimizerFactory
from lightning_soaa.optim.asgo import asgo_param_groups
from lightning_soaa.optim.asgo_groups import split_fused

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


def test_suffixes_match_whole_dotted_parts_and_trainable_matrices_only() -> None:
    """Found by review: "kv.weight" (a cross-attention's fused k/v, 2 parts) also caught "self_attn.qkv.weight"
    (3 parts), which was stepped as two parts of 1.5 heads each."""
    m = _model()
    named = [(n, p) for n, p in m.named_parameters() if n != "attn.qkv.weight"]
    with pytest.raises(ValueError, match="no trainable matrix parameter's name ends with 'kv.weight'"):
        split_fused(named, {"kv.weight": 2})
    assert [g.get("row_parts") for g in split_fused(named, {"qkv.weight": 3})] == [None, 3]
    m.proj.requires_grad_(False)  # a frozen matrix is not a match (as asgo_param_groups leaves it out)
    with pytest.raises(ValueError, match="no trainable matrix parameter's name ends with 'proj.weight'"):
        split_fused(m.named_parameters(), {"proj.weight": 2})


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
    with pytest.raises(ValueError, match=re.escape("no trainable matrix parameter's name ends with 'kv.bias'")):
        ASGO(_model().named_parameters(), fused={"kv.bias": 2})  # a bias is not a matrix
    with pytest.raises(ValueError, match=r"ends with 'qkv.weight'.*4 matrix parameter\(s\) came without names: "
                                         r"pass model.named_parameters\(\)"):
        ASGO(_model().parameters(), fused={"qkv.weight": 3})
    frozen = _model()
    frozen.proj.requires_grad_(False)
    with pytest.raises(ValueError, match="ends with 'proj.weight'"):
        ASGO(asgo_param_groups(frozen), fused={"proj.weight": 2})


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


def test_a_matched_matrix_frozen_at_construction_or_added_later_is_stepped_whole_and_said_so(
        caplog: pytest.LogCaptureFixture) -> None:
    """Found by a hunter: fused regroups the trainable matrices given to the constructor only, so a fused QKV
    frozen then (or brought later by BaseFinetuning's one group of bare tensors) was stepped as one matrix
    once it trained, unlike the same model never frozen, and nothing said so. It still is (the added group
    is not split: BaseFinetuning drives its lr), and a warning names it; the trainable ones are not named."""
    m = _model()
    m.qkv.requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="lightning_soaa.optim.asgo"):
        opt = ASGO(m.named_parameters(), fused={"qkv.weight": 3}, **KW)
    assert "matches ['qkv.weight'], which are frozen now" in caplog.text
    assert [g["row_parts"] for g in opt.param_groups] == [1, 3]  # attn.qkv.weight, trainable, as its parts
    assert len(opt.block_table.by_param[1]) == 1  # qkv.weight whole
    caplog.clear()
    m = _model()
    m.qkv.requires_grad_(False)
    opt = ASGO(asgo_param_groups(m), fused={"qkv.weight": 3}, **KW)  # the walk names what is added later
    m.qkv.requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="lightning_soaa.optim.asgo"):
        opt.add_param_group({"params": list(m.qkv.parameters())})
    assert "matches ['qkv.weight'], which come in a group added after construction" in caplog.text
    assert "attn.qkv.weight" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightning_soaa.optim.asgo"):
        ASGO(_model().named_parameters(), fused={"qkv.weight": 3}, **KW)  # all trainable: nothing to say
    assert "fused=" not in caplog.text
