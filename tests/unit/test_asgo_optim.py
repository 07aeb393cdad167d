"""ASGO / DASGO as optimizers on one process: routing, blocking, cost model, validation, checkpoints.

The guarantees every optimizer shares (round trips, copies, hooks, non-finite gradients, validation
naming the field, rejected checkpoints and param groups) are in tests/conformance.
"""

from __future__ import annotations

import copy
import importlib
import math
import re
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from lightning_soaa import ASGO, DASGO
from lightning_soaa.distributed.assignment import assign_owners, rank_loads
from lightning_soaa.distributed.checkpoint import with_saved_groups
from lightning_soaa.functional.linalg import ROOT_METHODS, resolve_root_method
from lightning_soaa.optim import asgo as asgo_mod
from lightning_soaa.optim.asgo import (
    ADAM_COST_PER_ELEMENT,
    GRAM_APPLY_COST,
    ROOT_COST,
    asgo_block_cost,
    asgo_block_specs,
    asgo_param_groups,
    asgo_root_cost,
    root_padding,
)
from tests.conformance._battery import assert_identical
from tests.harness.checkpoints import unrecorded
from tests.harness.models import batch, loss_fn, tiny_mlp

f64 = torch.float64


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tok_emb = nn.Embedding(10, 6)
        self.wpe = nn.Embedding(4, 6)  # a GPT-2 style name without "emb"
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 9)
        self.head = nn.Linear(9, 10, bias=False)
        self.double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=f64) * 0.3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx) + self.wpe(torch.arange(idx.shape[1]))
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.head(torch.tanh(self.fc(self.ln(x))))


def _net_loss(net: _Net, t: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(t)
    idx = torch.randint(0, 10, (3, 4), generator=g)
    return nn.functional.cross_entropy(net(idx).reshape(-1, 10), idx.reshape(-1))


def _routes(opt: ASGO) -> dict[str, bool]:
    return {n: opt.is_matrix_param(p, opt.param_groups[gi], n) for p, gi, n in opt._all_params()}


def test_routing_named_parameters():
    net = _Net()
    opt = ASGO(net.named_parameters())
    assert _routes(opt) == {
        "tok_emb.weight": False,  # name contains "emb"
        "wpe.weight": True,  # 2-D, name without "emb": routed by shape (use asgo_param_groups, below)
        "conv.weight": True, "conv.bias": False, "ln.weight": False, "ln.bias": False,
        "fc.weight": True, "fc.bias": False, "head.weight": True,
    }
    net.zero_grad()
    _net_loss(net, 0).backward()
    opt.step()
    assert set(opt.state[net.conv.weight]) >= {"exp_avg", "gram", "inv_root"}
    assert opt.state[net.conv.weight]["exp_avg"].shape == (6, 18)  # out x (in * k), right side
    assert opt.state[net.conv.weight]["gram"].shape == (6, 6)
    assert set(opt.state[net.tok_emb.weight]) == {"step", "exp_avg", "exp_avg_sq"}


def test_asgo_param_groups_finds_embeddings_and_tied_heads():
    net = _Net()
    net.head.weight = net.tok_emb.weight  # tie (10 x 6): named_parameters() reports it once
    net.head.in_features = 6
    net.fc = nn.Linear(6, 6).double()
    groups = asgo_param_groups(net, lr=3e-3)
    opt = ASGO(groups)
    routes = _routes(opt)
    assert routes["tok_emb.weight"] is False and routes["wpe.weight"] is False
    assert routes["fc.weight"] is True and routes["conv.weight"] is True
    assert opt.param_groups[1]["use_asgo"] is False and opt.param_groups[1]["lr"] == 3e-3


def test_asgo_param_groups_finds_embedding_bags_and_parametrized_tables():
    """An EmbeddingBag's table and a parametrized Embedding's originals went to the matrix method (only
    nn.Embedding's plain weight was matched); a Linear under weight_norm keeps its direction v a matrix,
    and its magnitude g (out, 1), a gain per output, goes to AdamW as a norm's gain does (the matrix method
    scaled it by one number: one large-gradient row took the whole step)."""
    net = nn.Module()
    net.bag = nn.EmbeddingBag(10, 6)
    net.emb = torch.nn.utils.parametrizations.weight_norm(nn.Embedding(10, 6))
    net.sn = torch.nn.utils.parametrizations.spectral_norm(nn.Embedding(10, 6))
    net.fc = torch.nn.utils.parametrizations.weight_norm(nn.Linear(6, 6))
    groups = asgo_param_groups(net)
    adam = {name for name, _ in groups[1]["params"]}
    assert adam == {"bag.weight", "emb.parametrizations.weight.original0", "emb.parametrizations.weight.original1",
                    "sn.parametrizations.weight.original", "fc.parametrizations.weight.original0"}
    assert {name for name, _ in groups[0]["params"]} == {"fc.bias", "fc.parametrizations.weight.original1"}


def test_asgo_param_groups_reads_the_older_hook_based_weight_and_spectral_norms():
    """torch.nn.utils.weight_norm / spectral_norm (hooks, deprecated but in older model code) keep an
    embedding's originals as weight_g / weight_v / weight_orig: they went to the matrix method."""
    import warnings

    net = nn.Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's deprecation of the hook-based forms
        net.wte = torch.nn.utils.weight_norm(nn.Embedding(10, 6))
        net.wpe = torch.nn.utils.spectral_norm(nn.Embedding(10, 6))
        net.fc = torch.nn.utils.weight_norm(nn.Linear(6, 6))
    groups = asgo_param_groups(net)
    assert {name for name, _ in groups[1]["params"]} == {"wte.weight_g", "wte.weight_v", "wpe.weight_orig",
                                                        "fc.weight_g"}
    assert {name for name, _ in groups[0]["params"]} == {"fc.bias", "fc.weight_v"}


def test_fused_on_a_weight_stored_in_by_out_is_refused():
    """transformers' Conv1D (GPT-2's c_attn) stores its weight (in, out): row_parts cut its inputs, not
    q/k/v, silently (2e-2 off ASGO on the separate matrices after 5 steps)."""

    class Conv1D(nn.Module):  # transformers.pytorch_utils.Conv1D's layout
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.zeros(nf))

    net = nn.Module()
    net.c_attn = Conv1D(3 * 6, 6)
    net.qkv = nn.Linear(6, 18)
    with pytest.raises(ValueError, match=r"'c_attn.weight', a Conv1D weight stored \(in, out\) = \(6, 18\)"):
        asgo_param_groups(net, fused={"c_attn.weight": 3})
    assert len(asgo_param_groups(net, fused={"qkv.weight": 3})) == 2  # an nn.Linear's: (out, in)


def test_use_asgo_group_option():
    net = _Net()
    params = dict(net.named_parameters())
    opt = ASGO([{"params": [params["fc.weight"], params["head.weight"]], "use_asgo": False},
                {"params": [params["conv.weight"]]}])
    g0 = opt.param_groups[0]
    assert [opt.is_matrix_param(p, g0, None) for p in g0["params"]] == [False, False]
    msg = "Invalid use_asgo=True for parameter 'fc.bias' of shape (9,)."
    with pytest.raises(ValueError, match=re.escape(msg)):
        ASGO([{"params": [("fc.bias", params["fc.bias"])], "use_asgo": True}])
    with pytest.raises(ValueError, match=re.escape("Invalid use_asgo='yes'. Must be True, False or None.")):
        ASGO([{"params": [params["fc.weight"]], "use_asgo": "yes"}])


def test_warns_when_nothing_is_a_matrix(caplog):
    # what a flat 1-D partition (DeepSpeed ZeRO) would look like: ASGO would silently be AdamW
    with caplog.at_level("WARNING"):
        ASGO([nn.Parameter(torch.randn(100))])
    assert "every parameter uses AdamW" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        ASGO([nn.Parameter(torch.randn(3, 4))])
    assert "every parameter uses AdamW" not in caplog.text
    # unnamed matrices (model.parameters(), the stock LightningCLI): routed by shape, and said so
    assert "1 parameter(s) with >= 2 dimensions came without names" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        ASGO(_Net().named_parameters())
    assert "came without names" not in caplog.text



@pytest.mark.parametrize("cls", [ASGO, DASGO])
def test_matrices_whose_names_hold_emb_inside_a_word_are_named(cls, caplog):
    """The official "emb" substring rule sends an ``ensemble`` / ``member_head`` Linear to AdamW too, where
    the user meant the matrix method: said, naming them (the rule itself is kept); real embedding names and
    a use_asgo=True group for those matrices are quiet."""
    w = {n: nn.Parameter(torch.randn(4, 4)) for n in
         ("ensemble.0.weight", "member_head.weight", "tok_emb.weight", "embed_tokens.weight", "tokEmb.weight",
          "fc.weight")}
    with caplog.at_level("WARNING"):
        opt = cls(list(w.items()))
    assert ('2 matrix parameter(s) go to AdamW because their names contain "emb" inside a word: '
            "ensemble.0.weight, member_head.weight." in caplog.text)
    g = opt.param_groups[0]
    assert [opt.is_matrix_param(p, g, n) for n, p in w.items()] == [False] * 5 + [True]  # the rule unchanged
    caplog.clear()
    inside = ("ensemble.0.weight", "member_head.weight")
    with caplog.at_level("WARNING"):
        cls([{"params": [(n, w[n]) for n in inside], "use_asgo": True},
             {"params": [(n, p) for n, p in w.items() if n not in inside]}])
    assert "inside a word" not in caplog.text

def test_adam_fallback_matches_torch_adamw_over_many_steps():
    b1 = nn.Parameter(torch.randn(7, dtype=f64))
    b2 = nn.Parameter(b1.detach().clone())
    o1 = ASGO([b1], lr=1e-2)
    o2 = torch.optim.AdamW([b2], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for t in range(20):
        g = torch.randn(7, dtype=f64, generator=torch.Generator().manual_seed(t))
        b1.grad, b2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(b1, b2, rtol=1e-14, atol=1e-14)


def test_conv_kernel_equals_reshaped_matrix():
    k4 = nn.Parameter(torch.randn(5, 3, 2, 2, dtype=f64))  # 5 x 12 -> left side
    k2 = nn.Parameter(k4.detach().reshape(5, 12).clone())
    o4, o2 = ASGO([k4], lr=0.1), ASGO([k2], lr=0.1)
    for t in range(4):
        g = torch.randn(5, 3, 2, 2, dtype=f64, generator=torch.Generator().manual_seed(t))
        k4.grad, k2.grad = g.clone(), g.reshape(5, 12).clone()
        o4.step()
        o2.step()
    torch.testing.assert_close(k4.detach().reshape(5, 12), k2.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("shape,split_dim,pieces", [
    ((8, 30), 0, [(0, 3), (3, 6), (6, 8)]),  # left: rows cut
    ((30, 8), 1, [(0, 3), (3, 6), (6, 8)]),  # right: columns cut
    ((40, 4, 2, 2), 1, [(0, 2), (2, 4)]),  # right side of a 40 x 16 kernel: whole input channels (4 cols)
])
def test_blocks_are_independent_asgo_problems(shape, split_dim, pieces):
    mbs = 3 if len(shape) == 2 else 8
    specs = asgo_block_specs(shape, mbs)
    assert [(s.dim, s.start, s.stop) for s in specs] == [(split_dim, a, b) for a, b in pieces]
    w = nn.Parameter(torch.randn(shape, dtype=f64))
    parts = [nn.Parameter(w.detach().narrow(split_dim, a, b - a).clone()) for a, b in pieces]
    o_big = ASGO([w], lr=0.1, max_block_size=mbs)
    o_parts = ASGO(parts, lr=0.1, max_block_size=10**6)
    assert len(o_big.block_table.blocks) == len(pieces)
    for t in range(3):
        g = torch.randn(shape, dtype=f64, generator=torch.Generator().manual_seed(t))
        w.grad = g.clone()
        for p, (a, b) in zip(parts, pieces):
            p.grad = g.narrow(split_dim, a, b - a).clone()
        o_big.step()
        o_parts.step()
    for p, (a, b) in zip(parts, pieces):
        torch.testing.assert_close(w.detach().narrow(split_dim, a, b - a), p.detach(), rtol=0, atol=0)
    assert set(o_big.state[w]) == set(range(len(pieces)))


def test_block_cost_model():
    # Estimated ps: the resolved method's root every root_every steps plus the Gram + apply
    # (constants fitted by benchmarks/calibrate_asgo_cost.py).
    (pa, pb), (ga, gb) = ROOT_COST["polar_express"], GRAM_APPLY_COST
    assert asgo_block_cost(768, 3072, 10, 1) == pytest.approx(
        pa * 10 * 768**3 + pb * 768**2 + ga * 768**2 * 3072 + gb * 768 * 3072, rel=1e-12)
    ea, eb = ROOT_COST["polar_express_eigh"]
    assert asgo_block_cost(768, 768, 10, 10, "polar_express_eigh") == pytest.approx(
        (ea * 768**3 + eb * 768**2) / 10 + ga * 768**3 + gb * 768**2, rel=1e-12)
    # What was measured: one float64 eigendecomposition is about 1/3 of the 10 matmul iterations at
    # k = 1024, about half at 256 and close to it at 128; Newton-Schulz's 18 iterations cost ~1.8x.
    for k, lo, hi in ((1024, 0.3, 0.45), (256, 0.4, 0.65), (128, 0.7, 1.1)):
        assert lo < asgo_root_cost(k, "polar_express_eigh", 10) / asgo_root_cost(k, "polar_express", 10) < hi
    assert 1.6 < asgo_root_cost(512, "newton_schulz", 18) / asgo_root_cost(512, "polar_express", 10) < 2.0
    with pytest.raises(ValueError, match=r"Invalid root_method='auto'\. Must be one of 'polar_express'"):
        asgo_block_cost(8, 8, 10, 1, "auto")
    spec = asgo_block_specs((3072, 768), 1024)
    assert len(spec) == 1 and spec[0].dim is None and spec[0].cost == asgo_block_cost(768, 3072, 10, 1)


@pytest.mark.parametrize("dtype,device,inverse_root,method", [
    (torch.float32, "cpu", "auto", "polar_express_eigh"),
    (torch.bfloat16, "cpu", "auto", "polar_express_eigh"),
    (torch.float64, "cpu", "auto", "polar_express"),
    (torch.float32, "meta", "auto", "polar_express"),  # any non-CPU device: the matmul iteration
    (torch.float32, "cpu", "eigh", "eigh"),
    (torch.float64, "cpu", "newton_schulz", "newton_schulz"),
])
def test_block_cost_uses_the_resolved_root_method(dtype, device, inverse_root, method):
    w = nn.Parameter(torch.empty(128, 200, dtype=dtype, device=device))
    small = nn.Parameter(torch.empty(40, 200, dtype=dtype, device=device))
    b = nn.Parameter(torch.empty(300, dtype=dtype, device=device))
    opt = ASGO([w, small, b], inverse_root=inverse_root, root_every=3)
    iters = 18 if method == "newton_schulz" else 10
    assert [blk.cost for blk in opt.block_table.blocks] == [  # "auto": one method at every size
        asgo_block_cost(128, 200, iters, 3, method), asgo_block_cost(40, 200, iters, 3, method),
        ADAM_COST_PER_ELEMENT * 300]


def _calibration() -> ModuleType:
    """benchmarks/calibrate_asgo_cost.py, which defines the mixed model and the previous cost model once for
    this test and its timed check (a hand copy here had drifted: it priced the embeddings as matrices)."""
    bench = str(Path(__file__).resolve().parents[2] / "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)  # it imports its sibling _timing
    return importlib.import_module("calibrate_asgo_cost")


@pytest.mark.parametrize("world_size", [2, 3, 4, 6])
def test_measured_cost_model_balances_a_mixed_model_better(world_size):
    # Loads in the new model's units (its constants are the measurement; the previous model saw neither
    # the eigendecomposition's lower cost nor the elementwise part of a step), owners from each model.
    # The mixed model: float32 on the CPU (so "auto" roots are eigendecompositions), matrices of k = 128
    # and 256, a large embedding and norm vectors for the AdamW fallback (23 + 15 blocks).
    # benchmarks/calibrate_asgo_cost.py checks the same against each parameter's timed step, where the
    # gain is smaller (W = 4: 1.01-1.02 vs 1.06-1.08, W = 6: 1.10-1.12 vs 1.14-1.15, W = 2, 3: equal
    # within 1-2%): each step's fixed overhead, which this model leaves out, evens the loads out.
    calibration = _calibration()
    opt = ASGO([(name, torch.empty(shape)) for name, shape in calibration.mixed_model()])
    measured = [blk.cost for blk in opt.block_table.blocks]
    ratios = {}
    for label, model_costs in (("new", measured), ("old", calibration.previous_costs(opt))):
        loads = rank_loads(measured, assign_owners(model_costs, world_size), world_size)
        ratios[label] = max(loads) / (sum(loads) / world_size)
    # measured: new 1.002, 1.012, 1.013, 1.135 and old 1.006, 1.024, 1.040, 1.158 for W = 2, 3, 4, 6. The
    # previous model already left the embedding to AdamW at 100 units per element, so the gain is small.
    assert ratios["new"] <= 1.15, ratios
    assert ratios["new"] < ratios["old"], ratios
def _gpt_like(n_layer: int, d: int, vocab: int = 50304, block: int = 256) -> list[tuple[str, torch.Tensor]]:
    def t(*s: int) -> torch.Tensor:
        return torch.empty(s, device="meta")
    out = [("wte_emb.weight", t(vocab, d)), ("wpe_emb.weight", t(block, d))]
    for i in range(n_layer):
        h = f"h.{i}."
        out += [(h + "ln_1.weight", t(d)), (h + "ln_1.bias", t(d))]
        for name in ("q", "k", "v", "o"):
            out += [(h + f"attn.{name}.weight", t(d, d)), (h + f"attn.{name}.bias", t(d))]
        out += [(h + "ln_2.weight", t(d)), (h + "ln_2.bias", t(d)),
                (h + "mlp.fc.weight", t(4 * d, d)), (h + "mlp.fc.bias", t(4 * d)),
                (h + "mlp.proj.weight", t(d, 4 * d)), (h + "mlp.proj.bias", t(d))]
    return out + [("ln_f.weight", t(d)), ("ln_f.bias", t(d))]


@pytest.mark.parametrize("n_layer,d,max_block_size", [(12, 768, 1024), (24, 1024, 512), (6, 384, 1024)])
@pytest.mark.parametrize("world_size", [2, 3, 4, 8, 16])
def test_ownership_balance_gpt_like(n_layer, d, max_block_size, world_size):
    # The optimizer's own blocking and cost model on meta tensors (no memory), then the pure assignment.
    opt = ASGO(_gpt_like(n_layer, d), max_block_size=max_block_size)
    costs = [b.cost for b in opt.block_table.blocks]
    owners = assign_owners(costs, world_size)
    loads = rank_loads(costs, owners, world_size)
    ideal = sum(costs) / world_size
    assert max(loads) <= 1.3 * ideal, f"max/ideal = {max(loads) / ideal:.3f}"
    assert min(loads) > 0
    if max_block_size == 512:  # 1024-wide matrices are cut in two along the preconditioned side
        assert max(b.shape[0] if b.dim == 0 else 1 for b in opt.block_table.blocks) <= 512


BAD = [
    (dict(lr=-1.0), "Invalid lr=-1.0. Must be in [0.0, inf)."),
    (dict(betas=(0.9, 1.0)), "Invalid betas[1]=1.0. Must be in [0.0, 1.0)."),
    (dict(betas=(0.9,)), "Invalid betas=(0.9,). Must be a pair (beta1, beta2)."),
    (dict(weight_decay=-0.1), "Invalid weight_decay=-0.1. Must be in [0.0, inf)."),
    (dict(rms_scale=0.0), "Invalid rms_scale=0.0. Must be in (0.0, inf)."),
    (dict(eps=-1e-3), "Invalid eps=-0.001. Must be in [0.0, inf)."),
    (dict(damping=float("nan")), "Invalid damping=nan. Must be in [0.0, inf)."),
    (dict(inverse_root="svd"),
     "Invalid inverse_root='svd'. Must be one of 'polar_express', 'newton_schulz', 'eigh', 'polar_express_eigh', "
     "'auto'."),
    (dict(root_iters=0), "Invalid root_iters=0. Must be an integer >= 1 or None."),
    (dict(root_every=0), "Invalid root_every=0. Must be an integer >= 1 or 'auto'."),
    (dict(root_every=2.0), "Invalid root_every=2.0. Must be an integer >= 1 or 'auto'."),
    (dict(max_block_size=0), "Invalid max_block_size=0. Must be an integer >= 1."),
    (dict(adam_betas=(1.0, 0.9)), "Invalid adam_betas[0]=1.0. Must be in [0.0, 1.0)."),
    (dict(adam_eps=-1.0), "Invalid adam_eps=-1.0. Must be in [1.1754943508222875e-38, inf) "
     "(float32's smallest normal number: a smaller eps rounds to 0 in float32, where 0 / (0 + eps) is NaN)."),
    (dict(adam_eps=1e-50), "Invalid adam_eps=1e-50. Must be in [1.1754943508222875e-38, inf) "),
    (dict(adam_weight_decay=-1.0), "Invalid adam_weight_decay=-1.0. Must be in [0.0, inf)."),
]


@pytest.mark.parametrize("kwargs,msg", BAD)
def test_bad_hyperparameters(kwargs, msg):
    w = nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match=re.escape(msg)):
        ASGO([w], **kwargs)


def test_an_eps_that_rounds_to_zero_in_float32_is_refused_by_dasgo_not_asgo() -> None:
    """DASGO's eps is the floor of a float32 denominator: 1e-50 rounds to 0 there and 0 / (0 + eps) was NaN in
    every entry of the parameter (through its norm). ASGO's eps scales its roots' regularisation (0 allowed)."""
    w = nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match=re.escape("Invalid eps=1e-50. Must be in [1.1754943508222875e-38, inf)")):
        DASGO([w], eps=1e-50)
    ASGO([w], eps=1e-50)


@pytest.mark.parametrize("kwargs,msg", [(k, m) for k, m in BAD if set(k) & {"lr", "betas", "weight_decay",
                                        "rms_scale", "eps", "adam_betas", "adam_eps", "adam_weight_decay"}])
def test_bad_hyperparameters_dasgo(kwargs, msg):
    w = nn.Parameter(torch.randn(3, 4))
    if "eps" in kwargs:  # DASGO's eps is Adam's denominator floor, ASGO's the roots' scaling (>= 0)
        msg = msg.replace("[0.0, inf).", "[1.1754943508222875e-38, inf) (float32's smallest normal number")
    with pytest.raises(ValueError, match=re.escape(msg)):
        DASGO([w], **kwargs)


def test_bad_group_override_is_rejected():
    w, b = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=re.escape("Invalid root_every=-2. Must be an integer >= 1 or 'auto'.")):
        ASGO([{"params": [w]}, {"params": [b], "root_every": -2}])


def _run(model, opt, start, steps):
    for t in range(start, start + steps):
        x, y = batch(t, 0)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()


# ASGO with split blocks and stored roots, and DASGO, resume in tests/conformance (their registry
# test_kwargs); this adds the other inverse root.
@pytest.mark.parametrize("cls,kw", [(ASGO, dict(inverse_root="newton_schulz"))])
def test_resume_equals_uninterrupted(cls, kw):
    m_ref = tiny_mlp()
    o_ref = cls(m_ref.named_parameters(), lr=2e-2, **kw)
    _run(m_ref, o_ref, 0, 7)

    m1 = tiny_mlp()
    o1 = cls(m1.named_parameters(), lr=2e-2, **kw)
    _run(m1, o1, 0, 3)  # resume at an odd step: the stored root (root_every=2) must come back
    sd = copy.deepcopy(o1.state_dict())
    model_sd = copy.deepcopy(m1.state_dict())

    m2 = tiny_mlp(seed=99)
    m2.load_state_dict(model_sd)
    o2 = cls(m2.named_parameters(), lr=0.5, **kw)  # lr comes back from the checkpoint
    o2.load_state_dict(sd)
    assert o2.param_groups[0]["lr"] == 2e-2
    _run(m2, o2, 3, 4)
    for a, b in zip(m_ref.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert o2.num_steps == 7


def _set_matrix_counts(opt: ASGO, offset: int) -> None:
    """Add ``offset`` to the step count (and "auto"'s root step) of every matrix block: ASGO has no bias
    correction, so a matrix block's count enters only its root schedule, through ``t mod root_every``
    or the age ``t - root_step``."""
    for p, st in opt.state.items():
        if p.dim() == 2:
            for key in ("step", "root_step"):
                if key in st:
                    st[key].fill_(float(st[key]) + offset)


@pytest.mark.parametrize("kw", [dict(root_every=3), dict(root_every="auto", root_tol=1e30, root_max_every=3)])
def test_root_schedule_holds_past_float32_counts(kw):
    """A float32 step count stops at 2**24 (16.7M steps): root_every=3 then computed a root at every step
    or at none, and "auto" saw an age of 0 for good (its root_max_every never fired). The matrix blocks
    count in float64: a run whose counts sit 3 * 2**23 above another's (same residue mod 3, same age)
    takes the same steps, bit for bit, with the same number of roots."""
    def run(offset: int) -> tuple[nn.Module, ASGO]:
        model = tiny_mlp()
        opt = ASGO(model.named_parameters(), lr=2e-2, **kw)
        _run(model, opt, 0, 2)
        _set_matrix_counts(opt, offset)
        _run(model, opt, 2, 7)
        return model, opt

    m_ref, o_ref = run(0)
    m_big, o_big = run(3 * 2**23)
    for a, b in zip(m_ref.parameters(), m_big.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    roots = o_ref.statistics()["asgo_roots_computed"]
    assert o_big.statistics()["asgo_roots_computed"] == roots == 3 * 3  # steps 1, 4, 7 of the 3 matrices
    assert float(o_big.state[m_big[0].weight]["step"]) == 3 * 2**23 + 9


@pytest.mark.parametrize("saved,resumed", [(dict(max_block_size=1024), dict(max_block_size=2048)),
                                          (dict(use_asgo=None), dict(use_asgo=True))])
def test_block_options_that_cut_the_same_blocks_load_and_keep_the_optimizers_own(saved, resumed):
    """A checkpoint saved with other block options that cut the same blocks loads (the layout is checked);
    the load took the saved values into the groups, and every later step refused them as "written into the
    group after construction". The optimizer keeps its own; the run continues as the uninterrupted one."""
    def build(model: nn.Module, options: dict) -> ASGO:  # both are param-group options (weights: use_asgo)
        named = list(model.named_parameters())
        return ASGO([{"params": [(n, p) for n, p in named if p.dim() == 2], **options},
                     {"params": [(n, p) for n, p in named if p.dim() < 2]}], lr=2e-2)

    m_ref = tiny_mlp()
    o_ref = build(m_ref, saved)
    _run(m_ref, o_ref, 0, 5)
    m1 = tiny_mlp()
    o1 = build(m1, saved)
    _run(m1, o1, 0, 3)
    o2 = build(m1, resumed)
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))
    key, value = next(iter(resumed.items()))
    assert o2.param_groups[0][key] == value
    _run(m1, o2, 3, 2)
    for a, b in zip(m_ref.parameters(), m1.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float32_step_counts_of_older_checkpoints_load():
    """Checkpoints saved before the matrix blocks counted in float64 hold float32 counts: they load,
    converted, and the run continues as the uninterrupted one."""
    kw = dict(root_every="auto", root_tol=1e30, root_max_every=2)
    m_ref = tiny_mlp()
    o_ref = ASGO(m_ref.named_parameters(), lr=2e-2, **kw)
    _run(m_ref, o_ref, 0, 6)
    m1 = tiny_mlp()
    o1 = ASGO(m1.named_parameters(), lr=2e-2, **kw)
    _run(m1, o1, 0, 3)
    sd = copy.deepcopy(o1.state_dict())
    for st in sd["state"].values():
        for blk in st.values():
            for key in ("step", "root_step"):
                if key in blk:
                    blk[key] = blk[key].to(torch.float32)
    o2 = ASGO(m1.named_parameters(), lr=2e-2, **kw)
    o2.load_state_dict(sd)
    assert o2.state[m1[0].weight]["step"].dtype == torch.float64
    _run(m1, o2, 3, 3)
    for a, b in zip(m_ref.parameters(), m1.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("inverse_root", ["polar_express", "polar_express_eigh", "eigh"])
@pytest.mark.parametrize("root_every", [4, "auto"])
def test_a_root_of_a_zero_statistic_is_not_reused(inverse_root, root_every):
    """Behind a zero-initialised layer the first Gram is 0: its root carries no direction (eigh's is 0,
    the iteration's a multiple of I) and must not be kept for ``root_every`` steps. The second step's
    root is then the same as with a root every step."""
    def trained(**kw):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        nn.init.zeros_(model[2].weight)
        opt = ASGO(model.named_parameters(), lr=1e-2, inverse_root=inverse_root, **kw)
        x, y = torch.randn(16, 5), torch.randn(16, 3)
        for _ in range(2):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return model, opt

    m_ref, _ = trained(root_every=1)
    model, opt = trained(root_every=root_every, root_tol=1e30, root_max_every=100) \
        if root_every == "auto" else trained(root_every=root_every)
    torch.testing.assert_close(model[0].weight, m_ref[0].weight, rtol=0, atol=0)
    assert opt.statistics()["asgo_roots_computed"] == 3  # both at step 1, the zero one's again at step 2


def test_float32_softmax_head_steps_like_float64():
    """A classifier's last layer: its gradient's columns sum to 0 over the classes, so V = Σ G Gᵀ is
    singular along 1 at every step, and in float32 its null eigenvalue is rounding noise. The default
    root of such a small Gram (the float32 iteration) went past the map's bound on 3 of 8 draws of
    the rounding and the update came out 40-140% off the float64 one, pointing along 1 (a direction the
    loss does not see, at the expense of the one it does). Such roots were then recomputed by an
    eigendecomposition (counted in statistics()); the float32 map's floor now keeps the iteration itself
    bounded on every draw."""
    x, y = torch.randn(32, 8, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 4

    def head_update(dtype, seed):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)
        opt = ASGO(model.named_parameters(), lr=1e-2)
        w0 = model[2].weight.detach().clone()
        nn.functional.cross_entropy(model(x.to(dtype)), y).backward()
        if seed is not None:  # another rounding of the same gradient (another W, BLAS or compile)
            g = model[2].weight.grad
            g.mul_(1 + 6e-8 * torch.randn(g.shape, generator=torch.Generator().manual_seed(seed)).to(dtype))
        opt.step()
        return (model[2].weight.detach() - w0).double(), opt.statistics()["asgo_roots_recomputed"]

    ref, recomputed = head_update(f64, None)
    assert recomputed == 0.0  # float64's rounding noise stays within the bound
    counts = []
    for seed in range(8):
        u, recomputed = head_update(torch.float32, seed)
        assert float((u - ref).norm() / ref.norm()) < 1e-2, seed
        counts.append(recomputed)
    assert set(counts) == {0.0}, counts  # no draw needs the eigendecomposition any more


def test_statistics_report_root_method_fallbacks_condition_and_balance():
    m = tiny_mlp()
    opt = ASGO(m.named_parameters(), inverse_root="newton_schulz", damping=1e-3)
    _run(m, opt, 0, 3)
    s = opt.statistics()
    assert s["asgo_root_method_newton_schulz"] == 1.0 and s["asgo_root_method_polar_express"] == 0.0
    assert s["asgo_root_fallbacks"] == 0.0
    assert s["asgo_blocks_owned"] == 3.0 and s["adam_blocks_owned"] == 3.0
    assert s["ownership_balance"] == 1.0
    # condition estimate vs the exact condition number of the damped statistic of the first layer
    conds = []
    for p in m.parameters():
        st = opt.state[p]
        if "gram" in st:
            v = st["gram"]
            vd = v + 1e-3 * torch.trace(v) / v.shape[0] * torch.eye(v.shape[0], dtype=v.dtype)
            ev = torch.linalg.eigvalsh(vd)
            conds.append((ev[-1] / ev[0]).item())
    assert math.isclose(s["asgo_cond_max"], max(conds), rel_tol=1e-2)
    assert s["asgo_mean_eig_max"] >= s["asgo_mean_eig_min"] > 0


def test_statistics_resolve_the_auto_root_method_per_block():
    # One CPU group with a float64 and a float32 Gram: "auto" runs the iteration on the float64 one and the
    # eigendecomposition on the float32 one. Resolving from the group's first parameter (here a bias, which
    # has no root at all) reported one method only.
    b = nn.Parameter(torch.zeros(200))
    small = nn.Parameter(torch.randn(24, 200, dtype=torch.float64))  # k = 24
    large = nn.Parameter(torch.randn(200, 80))  # k = 80 (the right side)
    opt = ASGO([("b", b), ("small", small), ("large", large)], inverse_root="auto")
    for p in (b, small, large):
        p.grad = torch.randn_like(p)
    opt.step()
    # the methods the step's own Grams resolve to
    ran = {resolve_root_method("auto", p.device, opt.state[p]["gram"].dtype) for p in (small, large)}
    assert ran == {"polar_express", "polar_express_eigh"}
    s = opt.statistics()
    assert {m for m in ROOT_METHODS if s[f"asgo_root_method_{m}"] == 1.0} == ran, s


def test_bf16_parameters_keep_fp32_state_and_train():
    m = tiny_mlp(dtype=torch.bfloat16)
    opt = ASGO(m.named_parameters())
    for t in range(3):
        x, y = batch(t, 0, dtype=torch.bfloat16)
        opt.zero_grad()
        loss_fn(m, x, y).backward()
        opt.step()
    w = m[0].weight
    assert opt.state[w]["gram"].dtype == torch.float32 and opt.state[w]["inv_root"].dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_dasgo_routes_like_asgo():
    net = _Net()
    opt = DASGO(net.named_parameters())
    net.zero_grad()
    _net_loss(net, 0).backward()
    opt.step()
    assert opt.state[net.fc.weight]["col_stat"].shape == (6,)
    assert opt.state[net.conv.weight]["col_stat"].shape == (18,)
    assert "exp_avg_sq" in opt.state[net.tok_emb.weight]
    assert opt.statistics()["dasgo_blocks_owned"] == 4.0


_SCALE_CASES = {"dasgo": lambda ps: DASGO(ps, lr=0.1, weight_decay=0.0),
                "asgo_iteration": lambda ps: ASGO(ps, lr=0.1, weight_decay=0.0, inverse_root="polar_express"),
                "asgo_eigh": lambda ps: ASGO(ps, lr=0.1, weight_decay=0.0, inverse_root="eigh")}


@pytest.mark.parametrize("case", sorted(_SCALE_CASES))
@pytest.mark.parametrize("scale", [1e-33, 1e-28, 1e10, 1e15])
def test_float32_update_has_its_rms_at_any_gradient_scale(case, scale):
    """The update is RMS-normalised to rms_scale (0.2) whatever the gradient's scale. In float32 a tiny
    update's squared norm underflowed (its factor became float32's largest number: updates of 1e13), and
    a large Gram's norm overflowed (the iteration's root became 0: no update); both norms are now taken
    in float64. Only a Gram that itself underflows to 0 gives eigh's pseudo-inverse root 0: no update."""
    g = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    p = nn.Parameter(torch.ones(6, 4))
    opt = _SCALE_CASES[case]([p])
    p.grad = g * scale
    opt.step()
    rms = float((p.detach() - 1.0).square().mean().sqrt()) / 0.1
    assert torch.isfinite(p).all()
    if case == "asgo_eigh" and scale < 1e-20:
        assert rms in (0.0, pytest.approx(0.2, rel=1e-3))
    else:
        assert rms == pytest.approx(0.2, rel=1e-3), rms


_OVERFLOW_CASES = {"asgo": lambda ps: ASGO(ps, lr=0.05), "asgo_eigh": lambda ps: ASGO(ps, lr=0.05, inverse_root="eigh"),
                   "dasgo": lambda ps: DASGO(ps, lr=0.05)}


@pytest.mark.parametrize("case", sorted(_OVERFLOW_CASES))
@pytest.mark.parametrize("spread", ["row", "entry", "column_7e18"])
def test_finite_gradients_that_would_overflow_a_statistic_are_skipped(case, spread, caplog):
    """One step of finite float32 gradients whose squared row norms exceed float32 (a row of 1e20) made
    ASGO's Gram inf for good: its roots were non-finite at every later step (the pre-spike root was kept,
    with a warning each step) and DASGO's columns got zero updates, silently. Such a step is skipped on
    every rank like a non-finite one: nothing changes, and the run goes on as if it had not happened."""
    def run(spike: bool) -> tuple[nn.Module, object]:
        model = tiny_mlp(0, torch.float32)
        opt = _OVERFLOW_CASES[case](model.named_parameters())
        for t in range(4):
            if spike and t == 2:
                model.zero_grad()
                loss_fn(model, *batch(t, 0, dtype=torch.float32)).backward()
                grad = model[0].weight.grad  # 8 x 6: right side, its Gram's diagonal holds column norms
                if spread == "row":
                    grad[3].fill_(1e20)  # finite; each square (1e40) is not
                elif spread == "entry":
                    grad[5, 2] = 1e20
                else:  # each square fits, their column sum (3.9e38) does not, (1 - beta2) times it does
                    grad[:, 2] = 7e18
                before = [p.detach().clone() for p in model.parameters()]
                opt.step()
                assert opt.skipped_steps == 1
                assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            model.zero_grad()
            loss_fn(model, *batch(t, 0, dtype=torch.float32)).backward()
            opt.step()
        return model, opt

    with caplog.at_level("WARNING"):
        spiked, opt = run(True)
    plain, ref = run(False)
    # 4 steps taken by each; the spike changed nothing
    assert opt.num_steps == 4 and ref.num_steps == 4
    for a, b in zip(spiked.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    assert "exceed the statistic's range" in caplog.text and "non-finite" not in caplog.text.replace(
        "non-finite gradient or statistic", "")


@pytest.mark.parametrize("cls", [ASGO, DASGO])
def test_a_float64_statistic_takes_what_only_float32_ones_cannot_hold(cls) -> None:
    """A float64 matrix whose finite gradients (~1e20) overflow a float32 statistic but not its own, in an
    optimizer that also holds a float32 matrix: each statistic is checked against its own dtype's range.
    Before, every block was held to the narrowest dtype's (the float32 one's) and all 3 steps were skipped on
    every rank, the float64 matrix 1.06e-2 off the run without the float32 one (a DASGO hunter's finding)."""
    w0 = torch.randn(4, 3, dtype=f64, generator=torch.Generator().manual_seed(0))

    def run(mixed: bool) -> tuple[torch.Tensor, int]:
        big = nn.Parameter(w0.clone())
        small = nn.Parameter(torch.ones(3, 2))
        opt = cls([("big", big), *([("small", small)] if mixed else [])], lr=1e-2)
        for t in range(3):
            big.grad = torch.full((4, 3), 1e20, dtype=f64) * (t + 1)
            small.grad = torch.ones(3, 2) if mixed else None
            opt.step()
        return big.detach(), opt.skipped_steps

    alone, skipped_alone = run(False)
    mixed, skipped_mixed = run(True)
    assert skipped_alone == skipped_mixed == 0
    assert float((alone - w0).abs().max()) > 1e-3  # it moved
    torch.testing.assert_close(mixed, alone, rtol=0, atol=0)


def test_root_padding_plan():
    """Small Gram sizes pad to a larger class only while the extra work stays within the budget (one
    48 x 48 product per matmul): a small MLP's 10 / 20 / 48 share one batch, a hundred 8 x 8 Grams do not
    pay 64^3 each, a class never pads down or past what is there."""
    assert root_padding({10: 1, 20: 1, 48: 1}) == {10: 48, 20: 48, 48: 48}
    assert root_padding({10: 1, 64: 1}) == {10: 10, 64: 64}  # 64^3: no faster (the digits MLP)
    assert root_padding({8: 100, 64: 1}) == {8: 8, 64: 64}
    assert root_padding({8: 50, 12: 3, 64: 1}) == {8: 12, 12: 12, 64: 64}
    assert root_padding({256: 12, 10: 1}) == {256: 256, 10: 10}
    assert root_padding({}) == {}


@pytest.mark.parametrize("dtype,inverse_root,sizes", [(torch.float32, "auto", [64, 64, 128]),
                                                      (torch.bfloat16, "polar_express_eigh", [64, 64, 128]),
                                                      (torch.float32, "polar_express", [10, 64, 128]),
                                                      (torch.float64, "auto", [10, 64, 128]),
                                                      (torch.float64, "polar_express_eigh", [10, 64, 128])])
def test_the_eigendecomposition_route_pads_within_its_own_budget(dtype, inverse_root, sizes):
    """Each call of the eigendecomposition route costs ~20 operator calls besides LAPACK, more than the
    iteration's few per matmul: its budget is one 64 x 64 product (ROOT_PAD_BUDGET_EIGH), so the digits MLP's
    k = 10 Gram shares its k = 64 one's batch where "auto" takes that route (float32 on a CPU), not under the
    iteration (by name, or float64's "auto") nor for float64 Grams (a bare map: their padded roots are not
    their own to rounding); many small Grams still keep their own size."""
    assert root_padding({10: 1, 64: 1}, asgo_mod.ROOT_PAD_BUDGET_EIGH) == {10: 64, 64: 64}
    assert root_padding({8: 100, 64: 1}, asgo_mod.ROOT_PAD_BUDGET_EIGH) == {8: 8, 64: 64}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)).to(dtype)
    opt = ASGO(model.named_parameters(), lr=1e-2, inverse_root=inverse_root)
    assert sorted(opt._root_sizes().values()) == sizes


def _three_size_mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)  # Grams of k = 10 (head), 20 (input side) and 48: one batch padded to 48
    return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 10)).to(dtype)


# float32: 1.6e-5 apart after 5 steps on an AMD EPYC host (1e-5 held on an Intel one): the two GEMM shapes
# round differently per CPU kernel, and the roots' small eigenvalues amplify it
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_small_roots_of_different_sizes_are_one_padded_batch(monkeypatch, dtype, tol):
    """A small MLP's three roots are computed as one zero-padded batch (one call of ~80 ops instead of
    three) and train as the roots computed one size at a time (ROOT_PAD_BUDGET = 0: no padding), up to
    the rounding of another GEMM kernel. (float32 asks for the iteration by name: "auto" takes the
    eigendecomposition route on a CPU, one root per size, which pads nothing.)"""
    calls: list[tuple[int, ...]] = []
    real = asgo_mod.pending_inverse_sqrt

    def spy(v, *a, **kw):
        calls.append(tuple(v.shape))
        return real(v, *a, **kw)

    monkeypatch.setattr(asgo_mod, "pending_inverse_sqrt", spy)

    def trained() -> nn.Module:
        model = _three_size_mlp(dtype)
        opt = ASGO(model.named_parameters(), lr=1e-2, inverse_root="polar_express")
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            x, y = torch.randn(32, 20, generator=g, dtype=dtype), torch.randn(32, 10, generator=g, dtype=dtype)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return model

    padded = trained()
    assert calls == [(3, 48, 48)] * 5, calls
    calls.clear()
    monkeypatch.setattr(asgo_mod, "ROOT_PAD_BUDGET", 0)
    alone = trained()
    assert sorted(calls[:3]) == [(1, 10, 10), (1, 20, 20), (1, 48, 48)], calls
    for (name, a), b in zip(padded.named_parameters(), alone.parameters()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


def test_padding_stays_within_one_root_method_and_options():
    """Sizes pad only among blocks that would share a batch anyway: a float32 Gram of k = 44 under "auto"
    (the eigendecomposition route on a CPU) next to a k = 48 one whose group asks for the iteration by name,
    and a k = 40 one with other iteration options: each keeps its own size (within budget, all three would
    pad to 48). Padded together, a batch ran the first block's method and options for all."""
    torch.manual_seed(0)
    a, b = nn.Linear(200, 44, bias=False), nn.Linear(200, 48, bias=False)
    c = nn.Linear(200, 40, bias=False)
    opt = ASGO([{"params": [a.weight]}, {"params": [b.weight], "inverse_root": "polar_express"},
                {"params": [c.weight], "inverse_root": "polar_express", "root_iters": 12}], lr=1e-2)
    assert sorted(opt._root_sizes().values()) == [40, 44, 48]
    x = torch.randn(16, 200)
    (a(x).square().mean() + b(x).square().mean() + c(x).square().mean()).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in (a.weight, b.weight, c.weight))


@pytest.mark.parametrize("budget", [0, asgo_mod.ROOT_PAD_BUDGET])
def test_a_huge_float64_gram_gets_its_root(monkeypatch, budget):
    """A float64 head whose gradient is ~1e80 for one step (its Gram ~1e160: finite, so the statistic guard
    lets it through): the root's scaling norm squared it to inf, the root came out NaN and the block fell
    back to its previous preconditioner (k = 2 alone, and k = 1 once padded). Now its root is computed."""
    monkeypatch.setattr(asgo_mod, "ROOT_PAD_BUDGET", budget)
    model = tiny_mlp(sizes=(20, 64, 48, 2))
    opt = ASGO(model.named_parameters(), lr=2e-2)
    for t in range(5):
        opt.zero_grad()
        loss_fn(model, *batch(t, 0, d_in=20, d_out=2)).backward()
        if t == 3:
            model[-1].weight.grad.mul_(1e80)
        opt.step()
    assert opt.statistics()["asgo_root_fallbacks"] == 0.0
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_checks.sh runs it)")
def test_padded_roots_add_no_host_sync_on_cuda(monkeypatch):
    """A padded batch's sizes and bound limits reach the GPU by non-blocking copies: an ASGO step with its
    three small roots in one padded batch makes no more host syncs than with one batch per size."""
    def syncs(budget: int) -> int:
        monkeypatch.setattr(asgo_mod, "ROOT_PAD_BUDGET", budget)
        model = _three_size_mlp(torch.float32).cuda()
        opt = ASGO(model.named_parameters(), lr=1e-2)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()  # the first step builds state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in seen)

    assert syncs(asgo_mod.ROOT_PAD_BUDGET) <= syncs(0)


def test_condition_estimates_are_batched_per_size():
    """statistics()'s condition estimates ran two 30-step power iterations per block (60 small matmuls
    each; 250 blocks: statistics() cost 2.3 steps): one batched iteration per Gram size now, the same
    values (to rounding) as each pair's own iteration."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lightning_soaa.optim.asgo import _cond_estimates

    def top(a: torch.Tensor) -> float:
        x = torch.ones(a.shape[0], dtype=torch.float64) / math.sqrt(a.shape[0])
        for _ in range(30):
            y = a.double() @ x
            x = y / y.norm()
        return float(x @ (a.double() @ x))

    g = torch.Generator().manual_seed(0)
    pairs = []
    for k in (3, 5, 3, 5, 5):
        m = torch.randn(k, 2 * k, generator=g)
        v = m @ m.T + 0.1 * torch.eye(k)
        pairs.append((v, torch.linalg.inv(torch.linalg.cholesky(v)).T @ torch.linalg.inv(torch.linalg.cholesky(v))))

    class Count(TorchDispatchMode):
        bmm = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.bmm += func is torch.ops.aten.bmm.default
            return func(*args, **(kwargs or {}))

    with Count():
        got = sorted(float(t) for t in _cond_estimates(pairs))
    want = sorted(top(v) * top(r) ** 2 for v, r in pairs)
    assert got == pytest.approx(want, rel=1e-12)
    assert Count.bmm == 2 * 31  # two sizes, 30 steps and the Rayleigh quotient each


def test_root_floor_option_reaches_the_root_and_old_groups_keep_the_default(monkeypatch):
    """``root_floor`` (per group) is the floor of the map each root is computed with: None (the dtype's,
    2e-7 for float32) by default, 0.0 for the bare map of the official code; groups with different floors
    are different root batches. A param group saved before the option existed has no key: the default."""
    floors: list[object] = []
    real = asgo_mod.pending_inverse_sqrt

    def spy(v, *a, **kw):
        floors.append(kw.get("floor"))
        return real(v, *a, **kw)

    monkeypatch.setattr(asgo_mod, "pending_inverse_sqrt", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8))
    x, y = torch.randn(16, 6), torch.randn(16, 8)

    def step(opt):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    groups = [{"params": [("0.weight", model[0].weight)], "root_floor": 0.0},
              {"params": [("2.weight", model[2].weight)], "root_floor": 1e-5}]
    step(ASGO(groups, inverse_root="polar_express"))
    assert sorted(floors) == [0.0, 1e-5]
    floors.clear()
    opt = ASGO([("0.weight", model[0].weight)], inverse_root="polar_express")
    step(opt)
    assert floors == [None]
    state = opt.state_dict()
    del state["param_groups"][0]["root_floor"]  # a checkpoint of before the option
    opt2 = ASGO([("0.weight", model[0].weight)], inverse_root="polar_express")
    opt2.load_state_dict(state)
    floors.clear()
    step(opt2)
    assert floors == [None]
    # and the two maps differ where it matters: a rank-3 Gram's null space gets z(0) = 2.2e4 bare, 7.5e3 floored
    v = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = (v @ v.T).float()[None]
    roots = []
    for floor in (0.0, None):
        pending = real(v, "polar_express", floor=floor)
        roots.append(pending.resolve(pending.bounded.tolist()))
    assert float((roots[0] - roots[1]).norm() / roots[0].norm()) > 0.5


@pytest.mark.parametrize("value", [-1e-7, 0.01, float("nan"), "small"])
def test_root_floor_is_checked(value):
    with pytest.raises(ValueError, match=r"Invalid root_floor=.*Must be in \[0\.0, 0\.001\].*None takes"):
        ASGO(tiny_mlp().named_parameters(), root_floor=value)


@pytest.mark.parametrize("root_iters", [1, 2, 3])
def test_few_root_iterations_step_like_float64_in_float32(root_iters):
    """A float32 ASGO step with root_iters=1-3 (the default floor) is the float64 step, as without the floor;
    with the floor polished after so few iterations it was 110-170% off (an indefinite root). An explicit
    floor with them is refused at construction."""
    def update(dtype):
        lin = torch.nn.Linear(48, 24, bias=False)
        lin.weight.data = torch.randn(24, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        lin = lin.to(dtype)
        w0 = lin.weight.detach().double().clone()
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(200, 48, generator=g, dtype=torch.float64), torch.randn(200, 24, generator=g,
                                                                                   dtype=torch.float64)
        opt = ASGO([("w", lin.weight)], lr=1.0, inverse_root="polar_express", root_iters=root_iters)
        nn.functional.mse_loss(lin(x.to(dtype)), y.to(dtype)).backward()
        opt.step()
        return lin.weight.detach().double() - w0

    ref = update(torch.float64)
    assert float((update(torch.float32) - ref).norm() / ref.norm()) < 1e-4
    with pytest.raises(ValueError, match=r"Invalid root_floor=2e-07 with root_iters=.*needs root_iters >= 4"):
        ASGO(tiny_mlp().named_parameters(), root_iters=root_iters, root_floor=2e-7)


@pytest.mark.parametrize("edit", [{"damping": 0.1}, {"inverse_root": "eigh"}, {"root_iters": 3}])
@pytest.mark.parametrize("every", [10, "auto"])
def test_an_edited_root_option_recomputes_the_stored_roots(edit, every):
    """With roots reused between recomputations (root_every=k, "auto"), a root option written into the
    group (damping, inverse_root, root_iters, ...: a schedule's or a hand's) takes effect at the next step,
    as it would at root_every=1, rather than at the block's next scheduled root up to k - 1 steps later
    (it changed nothing for 7 of 10 steps)."""
    def run(opts, at=3, n=5):
        model = tiny_mlp(0, torch.float64)
        opt = ASGO(model.named_parameters(), lr=0.02, root_every=every, root_tol=1.0, root_max_every=10,
                   damping=1e-6, max_block_size=4)
        for t in range(n):
            if t == at:
                opt.param_groups[0].update(opts)
            x, y = batch(t, 0)
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()], opt

    base, _ = run({})
    edited, opt = run(edit)
    assert any(not torch.equal(a, b) for a, b in zip(edited, base))  # read at steps 4-5, not from step 10
    # the recomputation is per block and not persisted: a loaded optimizer keeps the loaded roots
    fresh = ASGO(tiny_mlp(0, torch.float64).named_parameters(), lr=0.02, root_every=every, root_tol=1.0,
                 root_max_every=10, damping=1e-6, max_block_size=4)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.__dict__.get("_root_options_of") is None


def test_a_group_added_without_names_says_its_matrices_are_routed_by_shape(caplog):
    """Lightning's BaseFinetuning adds a backbone unfrozen later as a group of bare tensors: an embedding
    table in it gets the matrix method (nothing tells it from a weight), which the constructor says for
    model.parameters() and add_param_group said nowhere. Named or use_asgo groups stay quiet."""
    torch.manual_seed(0)
    emb, lin, head = nn.Embedding(7, 4), nn.Linear(4, 4), nn.Linear(4, 3)
    opt = ASGO([("head.weight", head.weight)], lr=1e-2)
    with caplog.at_level("WARNING", logger="lightning_soaa.optim.asgo"):
        caplog.clear()
        opt.add_param_group({"params": [emb.weight, lin.weight, lin.bias]})
    assert "ASGO.add_param_group: 2 parameter(s) with >= 2 dimensions came without names" in caplog.text
    with caplog.at_level("WARNING", logger="lightning_soaa.optim.asgo"):
        caplog.clear()
        opt.add_param_group({"params": [head.bias]})  # 1-D: AdamW whatever its name
        opt2 = ASGO([("head.weight", head.weight)], lr=1e-2)
        opt2.add_param_group({"params": [("tok.weight", emb.weight)], "use_asgo": False})
    assert "came without names" not in caplog.text


def test_a_group_added_later_is_routed_as_the_walk_of_its_module_recorded(caplog):
    """asgo_param_groups records every parameter of the module, frozen ones too: a backbone frozen at
    construction and added later as bare tensors (BaseFinetuning) takes the recorded names, its table the
    AdamW part, in the one group as added; copies route the same; a parameter the caller names otherwise is
    used as given; a refused group leaves the routing as it was. (The Lightning fit: tests/lightning.)"""
    torch.manual_seed(0)
    model = nn.ModuleDict({"tok": nn.Embedding(7, 4), "lin": nn.Linear(4, 4), "head": nn.Linear(4, 3)})
    backbone = [model.tok.weight, model.lin.weight, model.lin.bias]
    for p in backbone:
        p.requires_grad_(False)
    opt = ASGO(asgo_param_groups(model), lr=1e-2)
    for p in backbone:
        p.requires_grad_(True)
    with caplog.at_level("WARNING", logger="lightning_soaa.optim.asgo"):
        caplog.clear()
        opt.add_param_group({"params": backbone, "lr": 1e-3})
    assert "came without names" not in caplog.text
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["param_names"] == ["tok.weight", "lin.weight", "lin.bias"]
    want = {"head.weight": True, "head.bias": False, "tok.weight": False, "lin.weight": True, "lin.bias": False}
    assert _routes(opt) == want
    assert _routes(copy.deepcopy(opt)) == want
    with pytest.raises(ValueError):  # head.weight is already in: refused, nothing changed
        opt.add_param_group({"params": [model.tok.weight, model.head.weight]})
    assert _routes(opt) == want and len(opt.param_groups) == 2 and opt.param_groups[1]["adamw_indices"] == [0]
    own = ASGO([("head.weight", model.head.weight)], lr=1e-2)
    own.add_param_group({"params": [("table", model.tok.weight)]})
    assert _routes(own) == {"head.weight": True, "table": True}


def test_the_walks_record_routes_only_the_added_group_and_does_not_depend_on_later_walks():
    """Reviewer's cases. (1) Per-module groups (``asgo_param_groups(head) + asgo_param_groups(backbone)``)
    name from each module, so the head's Linear and the backbone's table are both ``0.weight``: routing the
    added table to AdamW by name also moved the head's matrix, whose state held a Gram (KeyError at the next
    step). The routing is the added group's own (``adamw_indices``) and a name already used is not given
    twice. (2) A later walk of a wrapper whose name contains "emb" renamed the Linear and sent it to AdamW:
    the first walk's record stands."""
    torch.manual_seed(0)
    head, backbone = nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 4))
    for p in backbone.parameters():
        p.requires_grad_(False)
    opt = ASGO(asgo_param_groups(head) + asgo_param_groups(backbone), lr=1e-2)
    nn.ModuleDict({"embedder": backbone})  # a wrapper never walked: no effect
    asgo_param_groups(nn.ModuleDict({"embedder": nn.ModuleDict({"lin": backbone[1]})}))  # a later walk
    head[0].weight.grad = torch.randn(3, 4)
    head[0].bias.grad = torch.randn(3)
    opt.step()
    for p in backbone.parameters():
        p.requires_grad_(True)
    opt.add_param_group({"params": list(backbone.parameters()), "lr": 1e-3})
    g = opt.param_groups[1]
    assert g["param_names"] == [None, "1.weight", "1.bias"] and g["adamw_indices"] == [0]
    assert [opt.is_matrix_param(p, opt.param_groups[gi], n) for p, gi, n in opt._all_params()] == [
        True, False, False, True, False]
    for p in (*head.parameters(), *backbone.parameters()):
        p.grad = torch.randn_like(p)
    opt.step()  # the head's matrix keeps its Gram and its method
    assert "gram" in opt.state[head[0].weight] and "exp_avg_sq" in opt.state[backbone[0].weight]
    sd = opt.state_dict()
    # saved with the group (in the metadata: torch's DCP refuses a checkpoint lacking a key its destination shows),
    # so a resume routes the same
    assert with_saved_groups("ASGO", sd)["param_groups"][1]["adamw_indices"] == [0]
    with pytest.raises(ValueError, match="adamw_indices"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2, 2))], "adamw_indices": [3]})


def test_added_group_routing_second_review():
    """Second reviewer's cases. (1) adamw_indices edited in place (a list, the first mutable layout value)
    was compared with itself and accepted; a copy then routed by the edit (KeyError). (2) A saved group
    replayed with its names (BackboneFinetuning's resume assigns it; None names from before the record
    existed) keeps the routing it was saved with. (3) An LM head tied to the backbone's table, walked before
    the backbone: the table is still a table. (4) A group refused while the table is rebuilt (row_parts that
    do not divide) is not left behind. (5) adamw_indices with use_asgo is refused."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 4))
    head = nn.Linear(4, 7, bias=False)
    head.weight = backbone[0].weight  # tied
    for p in backbone.parameters():
        p.requires_grad_(False)
    groups = [g for g in asgo_param_groups(head) + asgo_param_groups(backbone) if g["params"]]
    opt = ASGO([{"params": [("w", nn.Parameter(torch.randn(3, 4)))]}], lr=1e-2)
    for p in backbone.parameters():
        p.requires_grad_(True)
    assert len(groups) == 0 or all(not g["params"] for g in groups)  # everything frozen at the walks
    opt.add_param_group({"params": list(backbone.parameters())})
    g = opt.param_groups[1]
    assert g["param_names"] == ["weight", "1.weight", "1.bias"] and g["adamw_indices"] == [0]  # (3)
    for p in opt.param_groups[0]["params"] + g["params"]:
        p.grad = torch.randn_like(p)
    opt.step()
    w = [p.detach().clone() for p in g["params"]]
    g["adamw_indices"].append(1)  # (1)
    with pytest.raises(ValueError, match="adamw_indices=.*written into the group after construction"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(w, g["params"]))
    g["adamw_indices"].pop()
    opt.step()
    # (2) the group as saved before the record existed: names None, the table on the matrix method
    old = ASGO([{"params": [("w", nn.Parameter(torch.randn(3, 4)))]}], lr=1e-2)
    old.add_param_group({"params": list(backbone.parameters()), "param_names": [None, None, None]})
    assert "adamw_indices" not in old.param_groups[1]
    assert [old.is_matrix_param(p, old.param_groups[1], None) for p in backbone.parameters()] == [True, True, False]
    # (4)
    n = len(opt.param_groups)
    with pytest.raises(ValueError, match="row_parts"):
        opt.add_param_group({"params": [("q", nn.Parameter(torch.randn(5, 4)))], "row_parts": 3})
    assert len(opt.param_groups) == n
    opt.step()
    # (5)
    with pytest.raises(ValueError, match="use_asgo routes the whole group"):
        opt.add_param_group({"params": [("z", nn.Parameter(torch.randn(2, 2)))], "adamw_indices": [0],
                             "use_asgo": True})


def test_an_old_checkpoints_shape_routed_group_is_named_as_the_cause_and_continues_with_adamw_indices_empty(caplog):
    """Reviewer's leftovers. (1) A plain-torch loop that adds the unfrozen backbone again (bare tensors: the
    record now sends its table to AdamW) and loads a checkpoint saved before the record (the table on the
    matrix method) was refused with "unexpected key(s) ['gram', ...]" and no remedy: the refusal names
    adamw_indices and the remedy, and the remedy (``adamw_indices=[]``, by shape, unnamed, no warning) loads
    and continues as saved. (2) A group added with ``use_asgo`` takes the record's names (they label it;
    they do not route it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 4))

    def build(extra: dict) -> ASGO:
        model[0].weight.requires_grad_(False)
        opt = ASGO(asgo_param_groups(model), lr=1e-2)
        model[0].weight.requires_grad_(True)
        opt.add_param_group({"params": [model[0].weight], **extra})
        return opt

    with caplog.at_level("WARNING", logger="lightning_soaa.optim.asgo"):
        caplog.clear()
        saved_by = build({"adamw_indices": []})  # as a checkpoint of before the record routed it
    assert "came without names" not in caplog.text and saved_by.param_groups[1]["param_names"] == [None]
    x = torch.randint(0, 7, (5,))
    for _ in range(2):
        model(x).pow(2).mean().backward()
        saved_by.step()
        saved_by.zero_grad()
    sd = unrecorded(copy.deepcopy(saved_by.state_dict()))  # the key did not exist before 2026-12-04
    assert "gram" in sd["state"][2][0]
    assert not any("adamw_indices" in g for g in sd["param_groups"])
    fresh = build({})
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"saved without adamw_indices, this optimizer has adamw_indices=\[0\].*"
                                         r"add that group with adamw_indices=\[\]"):
        fresh.load_state_dict(sd)
    assert_identical(fresh.state_dict(), before)
    resumed = build({"adamw_indices": []})
    resumed.load_state_dict(sd)
    assert resumed.num_steps == 2 and "gram" in resumed.state[model[0].weight]
    named = build({"use_asgo": False})
    assert named.param_groups[1]["param_names"] == ["0.weight"] and "adamw_indices" not in named.param_groups[1]


@pytest.mark.parametrize("cls", [ASGO, DASGO])
def test_a_scheduler_cycling_betas_is_said_to_leave_the_adamw_part_alone(cls, caplog):
    """OneCycleLR (cycle_momentum=True by default) and CyclicLR write a group's ``betas``, which is the matrix
    method's: the biases in the same group (the AdamW part) read ``adam_betas`` and kept their β1 while the
    matrices' cycled, without a word. Logged once, naming the group and the key to write; not when
    ``adam_betas`` is written too, nor without momentum cycling."""
    def run(cycle: bool, both: bool) -> str:
        model = tiny_mlp(0, torch.float64)
        opt = cls(model.named_parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10, cycle_momentum=cycle)
        caplog.clear()
        with caplog.at_level("WARNING", logger="lightning_soaa.optim.asgo"):
            for t in range(4):
                opt.zero_grad()
                x, y = batch(t, 0, n=8, d_in=6, d_out=3)
                loss_fn(model, x, y).backward()
                opt.step()
                sched.step()
                if both:
                    for g in opt.param_groups:
                        g["adam_betas"] = (g["betas"][0], g["adam_betas"][1])
        return caplog.text

    text = run(cycle=True, both=False)
    assert text.count("adam_betas") == 2 and text.count("Logged once") == 1, text
    assert "param_groups[0]['betas']" in text and "block(s) in the AdamW part" in text, text
    assert "adam_betas" not in run(cycle=True, both=True)
    assert "adam_betas" not in run(cycle=False, both=False)


@pytest.mark.parametrize("cls", [ASGO, DASGO])
def test_betas_loaded_from_a_checkpoint_are_not_said_to_be_a_schedulers(cls, caplog):
    """The warning above compares a group's betas with those of its first step: a checkpoint saved with other
    betas, loaded after a step here (a warm-up step, then a pretrained optimizer's state), was logged as a
    scheduler's cycle_momentum at the next step, with no scheduler. The loaded groups are the reference; a
    scheduler cycling after the load is still said."""
    def stepped(opt: torch.optim.Optimizer, model: nn.Module, steps: range) -> None:
        for t in steps:
            opt.zero_grad()
            x, y = batch(t, 0, n=8, d_in=6, d_out=3)
            loss_fn(model, x, y).backward()
            opt.step()

    saved_model = tiny_mlp(0, torch.float64)
    saved = cls(saved_model.named_parameters(), lr=1e-2, betas=(0.8, 0.99))
    stepped(saved, saved_model, range(1))
    model = tiny_mlp(0, torch.float64)
    opt = cls(model.named_parameters(), lr=1e-2)
    caplog.clear()
    with caplog.at_level("WARNING", logger="lightning_soaa.optim.asgo"):
        stepped(opt, model, range(1))
        opt.load_state_dict(saved.state_dict())
        assert opt.param_groups[0]["betas"] == (0.8, 0.99) and opt.param_groups[0]["adam_betas"] == (0.9, 0.95)
        stepped(opt, model, range(1, 3))
        assert "adam_betas" not in caplog.text, caplog.text
        opt.param_groups[0]["betas"] = (0.7, 0.99)  # a scheduler's write after the load
        stepped(opt, model, range(3, 4))
    assert caplog.text.count("Logged once") == 1 and "is now (0.7, 0.99) ((0.8, 0.99)" in caplog.text, caplog.text
