"""Gram factors for ``nn.Embedding``: the indices instead of b·c explicit rows of V·d mostly zero columns.

Against references in float64: the Gram matrix of the one-hot explicit rows (functional), and EGN with
``jacobian="explicit"`` (every parameter by vmap(jacrev)): the same K and the same steps (momentum, line
search, adaptive damping) over several steps, for tabular models (T = 1: one Embedding per categorical
column, plus an MLP) and token models (T > 1, averaged or flattened into a head), with repeated indices
within and across samples, a padding index, cross-entropy and MSE, and the dense, mixed-precision and
conjugate-gradient solves. The variants whose Jacobian the index factors do not describe (tied, parametrized,
overridden forward) keep explicit rows and still match; max_norm / scale_grad_by_freq stay refused.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_soaa.functional import gram as gram_module
from lightning_soaa.functional.gram import (
    GramFactors,
    GramLayout,
    GramOperator,
    LinearFactorShape,
    add_rows,
    assemble_gram,
    embedding_gram,
    factors_to,
    gram_matvec,
    kronecker_sample_gram,
    transform_factors,
)
from lightning_soaa.optim import egn_capture
from lightning_soaa.optim.egn import EGN, _Pass
from tests.harness.models import EmbeddingTabular, EmbeddingTokens, embedding_batch, embedding_model
from tests.unit._egn_oracle import flat_params

DT = torch.float64
FEGN = functools.partial(EGN, factor_embeddings=True)  # the factored tables are opt-in


# -- the functional Gram of an embedding site -----------------------------------------------------

def _one_hot_rows(idx: Tensor, delta: Tensor, vocab: int) -> Tensor:
    """The explicit Jacobian rows [b·c, V·d] of a table: row (i, k) holds Σ_t δ_ikt in row idx_it."""
    b, c, t, d = delta.shape
    hot = nn.functional.one_hot(idx.reshape(b, t).long(), vocab).to(delta.dtype)  # [b, T, V]
    return torch.einsum("itv,iktd->ikvd", hot, delta).reshape(b * c, vocab * d)


def _embedding_factors(b: int, c: int, t: int, vocab: int, d: int, seed: int, pad: int | None = None):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (b, t, 1), generator=g).to(DT)
    idx[0, :, 0] = 1.0  # a sample repeating one index, and the same index in another sample
    idx[-1, 0, 0] = 1.0
    delta = torch.randn(b, c, t, d, generator=g, dtype=DT)
    if pad is not None:
        idx[1, 0, 0] = pad
        delta = delta.masked_fill(idx[:, None] == pad, 0.0)  # as the capture leaves padding positions
    a = torch.randn(b, 1, 4, generator=g, dtype=DT)  # and a Linear site beside it
    dl = torch.randn(b, c, 1, 3, generator=g, dtype=DT)
    sites = (LinearFactorShape(t, 1, d, True, False, vocab=vocab), LinearFactorShape(1, 4, 3))
    layout = GramLayout(num_outputs=c, class_targets=False, sites=sites, rest=0)
    z = torch.randn(b, c, generator=g, dtype=DT)
    factors = GramFactors(z, torch.randn(b, c, generator=g, dtype=DT), [(idx, delta), (a, dl)], None)
    rows = torch.cat([_one_hot_rows(idx, delta, vocab),
                      torch.cat([torch.einsum("iko,id->ikod", dl[:, :, 0], a[:, 0]).reshape(b * c, -1),
                                 dl[:, :, 0].reshape(b * c, -1)], dim=1)], dim=1)
    return layout, factors, rows


# (b, c, T, V, d, T > 1 route): T = 1; T > 1 by the matching pairs (a large vocabulary, in chunks of b² pairs)
# and by the T² position GEMMs (a small vocabulary: most pairs match)
SHAPES = [(9, 3, 1, 5, 4, None), (7, 3, 4, 40, 2, "pairs"), (6, 2, 3, 2, 16, "positions")]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pad", [None, 0])
def test_embedding_gram_and_operator_equal_the_one_hot_rows(shape: tuple, pad: int | None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    b, c, t, vocab, d, route = shape
    calls = []
    by_positions = gram_module._gram_by_positions
    monkeypatch.setattr(gram_module, "_gram_by_positions", lambda *a: calls.append(1) or by_positions(*a))
    layout, factors, rows = _embedding_factors(b, c, t, vocab, d, seed=b + c + t + vocab + d, pad=pad)
    k = rows @ rows.T
    idx, delta = factors.linear[0]
    torch.testing.assert_close(embedding_gram(idx, delta), (rows[:, :vocab * d] @ rows[:, :vocab * d].T),
                               rtol=1e-13, atol=1e-13)
    assert bool(calls) == (route == "positions")
    torch.testing.assert_close(assemble_gram(layout, factors), k, rtol=1e-13, atol=1e-13)
    low = assemble_gram(layout, factors, lower_only=True)
    torch.testing.assert_close(low.tril(), k.tril(), rtol=1e-13, atol=1e-13)
    u = torch.randn(b * c, dtype=DT, generator=torch.Generator().manual_seed(5))
    for concat in (True, False):
        torch.testing.assert_close(GramOperator(layout, factors, concat=concat)(u), k @ u, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(gram_matvec(layout, factors, u), k @ u, rtol=1e-13, atol=1e-13)
    # SᵀJ: the same indices, Δ̃ = SᵀΔ
    s = torch.randn(b, c, c - 1, dtype=DT, generator=torch.Generator().manual_seed(6))
    sbd = torch.block_diag(*s)
    torch.testing.assert_close(assemble_gram(layout, transform_factors(layout, factors, s)), sbd.T @ k @ sbd,
                               rtol=1e-12, atol=1e-12)
    # float32 factors (the mixed solve's assembly): the indices stay exact, K to float32 rounding
    k32 = assemble_gram(layout, factors_to(factors, torch.float32))
    assert torch.equal(factors_to(factors, torch.float32).linear[0][0].double(), idx)
    torch.testing.assert_close(k32.double(), k, rtol=1e-5, atol=1e-5)


def test_kronecker_shortcut_does_not_take_an_embedding_for_a_linear() -> None:
    """A lone embedding site whose output is the model's (Δ_i = I): its A holds indices, whose products are
    not the sample Gram; the general solve is used."""
    b, c = 5, 3
    idx = torch.tensor([[[0.0]], [[2.0]], [[2.0]], [[1.0]], [[0.0]]], dtype=DT)
    delta = torch.eye(c, dtype=DT).expand(b, c, c).reshape(b, c, 1, c)
    layout = GramLayout(c, False, (LinearFactorShape(1, 1, c, True, False, vocab=4),), 0)
    factors = GramFactors(torch.zeros(b, c, dtype=DT), torch.zeros(b, c, dtype=DT), [(idx, delta)], None)
    assert kronecker_sample_gram(layout, factors) is None
    same = (idx.reshape(-1, 1) == idx.reshape(1, -1)).to(DT)
    torch.testing.assert_close(assemble_gram(layout, factors), torch.kron(same, torch.eye(c, dtype=DT)))


# -- EGN with factored embeddings against explicit Jacobians ---------------------------------------

def _gram(opt: EGN, xs: tuple[Tensor, ...], y: Tensor) -> tuple[Tensor, GramLayout]:
    """The K of EGN's next step on (xs, y), from its own capture and gathered factors."""
    opt._pass = _Pass(xs, y)
    try:
        batch = opt._agree_on_batch(xs, y)
        layout, pieces = opt._gather_factors(batch)
        return assemble_gram(layout, pieces), layout
    finally:
        opt._pass = None


KW = dict(lr=1.0, damping=0.3, momentum=0.5, line_search=True, adaptive_damping=True)
# (b, c) per solve: a dense bc ≤ 128 system, a 400 float32-factored and refined one, conjugate gradients
SOLVES = {"dense": (12, 3), "mixed": (100, 5), "cg": (140, 5)}


def _run(kind: str, loss: str, pad: int | None, solve: str, jacobian: str, steps: int = 3):
    b, c = SOLVES[solve]
    model = embedding_model(kind, c, pad)
    opt = FEGN(model, loss=loss, jacobian=jacobian, **KW)
    grams = []
    for t in range(steps):
        xs, y = embedding_batch(kind, t, b, c, loss, pad)
        grams.append(_gram(opt, xs, y))
        opt.step(inputs=xs, targets=y)
    return model, opt, grams


@pytest.mark.parametrize("solve", sorted(SOLVES))
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("pad", [None, 0])
@pytest.mark.parametrize("kind", ["tabular", "tokens", "flat"])
def test_factored_embeddings_step_as_explicit_jacobians(kind: str, pad: int | None, loss: str, solve: str) -> None:
    got_model, got, got_k = _run(kind, loss, pad, solve, "auto")
    ref_model, ref, ref_k = _run(kind, loss, pad, solve, "explicit")
    n_emb = sum(isinstance(m, nn.Embedding) for m in got_model.modules())
    # every trained parameter is factored: no explicit rows, each table an index site
    assert got._explicit == [] and sum(s.vocab > 0 for s in got._sites) == n_emb
    assert got._chain is None and got._trace is None  # the chain captures know Linear only
    for (k, layout), (k_ref, layout_ref) in zip(got_k, ref_k):
        assert layout.rest == 0 and layout_ref.rest > 0
        torch.testing.assert_close(k, k_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flat_params(got_model), flat_params(ref_model), rtol=1e-11, atol=1e-12)
    assert got.damping == pytest.approx(ref.damping, rel=1e-12)
    assert got.alpha == pytest.approx(ref.alpha, rel=1e-12)
    st = got.statistics()
    if solve == "cg":
        assert st["solve_cg_iterations"] >= 2
    if solve == "mixed":
        assert st["solve_refinements"] >= 1
    if pad is not None:  # the padding row never moves
        first = [m for m in got_model.modules() if isinstance(m, nn.Embedding)][0]
        start = [m for m in embedding_model(kind, SOLVES[solve][1], pad).modules() if isinstance(m, nn.Embedding)][0]
        assert first.padding_idx == pad and torch.equal(first.weight[pad], start.weight[pad])


# -- what keeps explicit rows, or stays refused ----------------------------------------------------

class _Tied(nn.Module):
    """A language-model-like head tied to its embedding table."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.mid = nn.Linear(3, 3)
        self.head = nn.Linear(3, 6, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tok: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mid(self.emb(tok).mean(dim=1))))


class _Scaled(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return 0.5 * w


class _OwnLookup(nn.Embedding):
    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Embedding's argument name
        return 2.0 * super().forward(input)


def _variant(which: str) -> nn.Module:
    torch.manual_seed(11)
    if which == "tied":
        return _Tied().to(DT)
    model = EmbeddingTokens(6).to(DT)
    if which == "parametrized":
        parametrize.register_parametrization(model.emb, "weight", _Scaled())
    elif which == "subclass":
        model.emb = _OwnLookup(6, 3).to(DT)
    elif which == "instance_forward":
        emb = model.emb
        model.emb.forward = lambda tok: nn.functional.embedding(tok, emb.weight) * 1.5  # type: ignore[method-assign]
    return model


@pytest.mark.parametrize("which", ["tied", "parametrized", "subclass", "instance_forward"])
def test_embeddings_the_index_factors_do_not_describe_keep_explicit_rows(which: str) -> None:
    """Regression guard: these stay on the explicit path (and match jacobian='explicit')."""
    got_model, ref_model = _variant(which), _variant(which)
    got = FEGN(got_model, loss="cross_entropy", jacobian="auto", **KW)
    ref = FEGN(ref_model, loss="cross_entropy", jacobian="explicit", **KW)
    assert not any(isinstance(s.module, nn.Embedding) for s in got._sites)
    assert any("emb" in n for n in got._explicit)
    for t in range(3):
        xs, y = embedding_batch("tokens", t, 10, 6, "cross_entropy", None)
        got.step(inputs=xs, targets=y)
        ref.step(inputs=xs, targets=y)
    torch.testing.assert_close(flat_params(got_model), flat_params(ref_model), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("option", [dict(max_norm=1.0), dict(scale_grad_by_freq=True), dict(sparse=True)])
def test_embedding_options_without_a_per_sample_jacobian_stay_refused(option: dict) -> None:
    """Regression guard: refused at construction, naming the module, under either jacobian."""
    model = EmbeddingTokens(3).to(DT)
    model.emb = nn.Embedding(6, 3, **option).to(DT)
    for jacobian in ("auto", "explicit"):
        with pytest.raises(ValueError, match=r"module 'emb' is Embedding\("):
            FEGN(model, loss="cross_entropy", jacobian=jacobian)


def test_a_table_above_the_float32_exact_range_keeps_explicit_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Indices travel in the factor table; beyond 2²⁴ rows float32 would round them: explicit rows."""
    monkeypatch.setattr(egn_capture, "MAX_FACTORED_ROWS", 5)
    model = EmbeddingTabular(3).to(DT)  # tables of 5, 3 and 7 rows
    opt = FEGN(model, loss="mse")
    assert sorted(s.path for s in opt._sites if s.vocab) == ["embs.0", "embs.1"]
    assert opt._explicit == ["embs.2.weight"]
    ref_model = EmbeddingTabular(3).to(DT)
    ref_model.load_state_dict(model.state_dict())
    ref = FEGN(ref_model, loss="mse", jacobian="explicit")
    for t in range(2):
        xs, y = embedding_batch("tabular", t, 9, 3, "mse", None)
        opt.step(inputs=xs, targets=y)
        ref.step(inputs=xs, targets=y)
    torch.testing.assert_close(flat_params(model), flat_params(ref_model), rtol=1e-11, atol=1e-12)


def test_a_factored_table_used_outside_its_lookup_is_refused() -> None:
    """The own-use guard covers a factored table: a penalty on it in the outputs is a Jacobian term no
    index factor holds; the message names the nn.Embedding, and jacobian='explicit' steps it."""
    class _Penalised(EmbeddingTokens):
        def forward(self, tok: Tensor) -> Tensor:
            return super().forward(tok) + 0.1 * self.emb.weight.sum()

    torch.manual_seed(2)
    model = _Penalised(3).to(DT)
    w0 = flat_params(model)
    xs, y = embedding_batch("tokens", 0, 8, 3, "mse", None)
    with pytest.raises(ValueError, match=r"'emb.weight' is used outside its nn.Embedding's own call"):
        FEGN(model, loss="mse").step(inputs=xs, targets=y)
    assert torch.equal(flat_params(model), w0)
    FEGN(model, loss="mse", jacobian="explicit").step(inputs=xs, targets=y)


def test_an_embedding_whose_lookup_changes_after_construction_is_refused() -> None:
    model = EmbeddingTokens(3).to(DT)
    opt = FEGN(model, loss="mse")
    xs, y = embedding_batch("tokens", 0, 8, 3, "mse", None)
    opt.step(inputs=xs, targets=y)
    emb = model.emb
    emb.forward = lambda tok: nn.functional.embedding(tok, emb.weight) * 2.0  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match=r"nn.Embedding 'emb' no longer computes E\[idx\]"):
        opt.step(inputs=xs, targets=y)


def test_a_factored_table_trains_inside_a_non_reentrant_checkpoint_region() -> None:
    """Explicit rows (torch.func) cannot run a torch.utils.checkpoint region (refused before); index factors
    are read by the capture's hooks and batched backward, as a Linear's are: the same steps as without it."""
    class _Checkpointed(EmbeddingTokens):
        def forward(self, tok: Tensor) -> Tensor:
            return torch.utils.checkpoint.checkpoint(super().forward, tok, use_reentrant=False)

    got_model, ref_model = embedding_model("tokens", 3, 0), embedding_model("tokens", 3, 0)
    got_model.__class__ = _Checkpointed
    got, ref = FEGN(got_model, loss="cross_entropy", **KW), FEGN(ref_model, loss="cross_entropy", **KW)
    for t in range(3):
        xs, y = embedding_batch("tokens", t, 10, 3, "cross_entropy", 0)
        got.step(inputs=xs, targets=y)
        ref.step(inputs=xs, targets=y)
    assert got._explicit == []
    torch.testing.assert_close(flat_params(got_model), flat_params(ref_model), rtol=1e-12, atol=1e-13)


def test_one_table_looked_up_by_two_calls_is_one_site_of_their_positions() -> None:
    """Two categorical columns sharing one table (two calls of the module): one site whose positions are both
    calls' (T = 2), as for a Linear applied twice; the same steps as explicit Jacobians."""
    class _SharedTable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 3, padding_idx=4)
            self.head = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))

        def forward(self, cat: Tensor, num: Tensor) -> Tensor:
            return self.head(self.emb(cat[:, 0]) * self.emb(cat[:, 1]) + num[:, :1])

    def run(jacobian: str) -> tuple[nn.Module, EGN]:
        torch.manual_seed(4)
        model = _SharedTable().to(DT)
        opt = FEGN(model, loss="cross_entropy", jacobian=jacobian, **KW)
        for t in range(3):
            (cat, num), y = embedding_batch("tabular", t, 11, 3, "cross_entropy", 4)
            opt.step(inputs=(cat % 5, num), targets=y)
        return model, opt

    (got_model, got), (ref_model, _) = run("auto"), run("explicit")
    assert got._explicit == [] and [s.path for s in got._sites if s.vocab] == ["emb"]
    torch.testing.assert_close(flat_params(got_model), flat_params(ref_model), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("pad", [None, 0])
@pytest.mark.parametrize("kind", ["tabular", "tokens", "flat"])
def test_jacobian_products_of_the_index_factors_equal_the_explicit_rows(kind: str, pad: int | None) -> None:
    """Jᵀu (the table-shaped [V, d] gradient: the step's direction) and J·d (the momentum direction's
    (Jd)ᵀQ(Jd) for adaptive damping) from the index factors, against the explicit rows' products."""
    xs, y = embedding_batch(kind, 0, 9, 3, "mse", pad)
    g = torch.Generator().manual_seed(8)
    products = []
    for jacobian in ("auto", "explicit"):
        opt = FEGN(embedding_model(kind, 3, pad), loss="mse", jacobian=jacobian)
        assert (opt._explicit == []) == (jacobian == "auto")  # the tables by their index factors
        opt._pass = _Pass(xs, y)
        batch = opt._agree_on_batch(xs, y)
        opt._gather_factors(batch)  # keeps this rank's factors on the batch
        g.manual_seed(8)
        u = torch.randn(9, 3, generator=g, dtype=DT)
        d = [torch.randn(p.shape, generator=g, dtype=DT) for p in opt._params]
        products.append((opt._vjp(batch, u), opt._jvp(batch, d)))
        opt._pass = None
    (vjp, jvp), (vjp_ref, jvp_ref) = products
    for got, want in zip(vjp, vjp_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(jvp, jvp_ref, rtol=1e-13, atol=1e-13)


# -- factor_embeddings=False (the default): every table keeps explicit rows ------------------------

class _Positional(EmbeddingTokens):
    """Tokens plus a positional table looked up with arange(T): [T] indices, no batch dimension."""

    def __init__(self) -> None:
        super().__init__(3)
        self.pos = nn.Embedding(4, 3)

    def forward(self, tok: Tensor) -> Tensor:
        return self.head((self.emb(tok) + self.pos(torch.arange(tok.shape[1]))).mean(dim=1))


class _FunctionalTie(nn.Module):
    """A head tied to the table by F.linear(h, emb.weight): the table read as a weight too."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.mid = nn.Linear(3, 3)

    def forward(self, tok: Tensor) -> Tensor:
        return nn.functional.linear(torch.tanh(self.mid(self.emb(tok).mean(dim=1))), self.emb.weight)


@pytest.mark.parametrize("which", ["positional", "functional_tie"])
def test_tables_index_factors_cannot_take_train_by_default_and_are_refused_when_factored(which: str) -> None:
    """By default (explicit rows for every table) these train as under jacobian='explicit'; with
    factor_embeddings=True the first step is refused naming the table and the option, nothing changed."""
    def make() -> nn.Module:
        torch.manual_seed(12)
        return (_Positional() if which == "positional" else _FunctionalTie()).to(DT)

    c = 3 if which == "positional" else 6
    got_model, ref_model = make(), make()
    got = EGN(got_model, loss="cross_entropy", **KW)
    ref = EGN(ref_model, loss="cross_entropy", jacobian="explicit", **KW)
    assert not any(s.vocab for s in got._sites) and "emb.weight" in got._explicit
    for t in range(3):
        xs, y = embedding_batch("tokens", t, 10, c, "cross_entropy", None)
        got.step(inputs=xs, targets=y)
        ref.step(inputs=xs, targets=y)
    torch.testing.assert_close(flat_params(got_model), flat_params(ref_model), rtol=1e-11, atol=1e-12)

    model = make()
    w0 = flat_params(model)
    xs, y = embedding_batch("tokens", 0, 10, c, "cross_entropy", None)
    with pytest.raises(ValueError, match=r"factor_embeddings=False") as info:
        FEGN(model, loss="cross_entropy").step(inputs=xs, targets=y)
    assert ("'pos'" if which == "positional" else "'emb.weight'") in str(info.value)
    assert torch.equal(flat_params(model), w0)


def test_by_default_every_table_keeps_explicit_rows() -> None:
    opt = EGN(embedding_model("tabular", 3, None), loss="mse")
    assert not any(s.vocab for s in opt._sites)
    assert sorted(opt._explicit) == ["embs.0.weight", "embs.1.weight", "embs.2.weight"]
    with pytest.raises(ValueError, match=r"Invalid factor_embeddings='yes'. Must be True or False."):
        EGN(embedding_model("tabular", 3, None), factor_embeddings="yes")


def test_sums_into_rows_are_the_same_bits_every_run() -> None:
    """torch's CPU index_put_(accumulate=True) adds repeats in parallel in no fixed order (different bits
    run to run at 2 threads): add_rows and the pairs route of a T > 1 Gram are the same bits every time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        index = torch.randint(0, 50, (200_000,), generator=g)
        values = torch.randn(200_000, 16, generator=g)
        sums = {add_rows(torch.zeros(50, 16), index, values).numpy().tobytes() for _ in range(10)}
        assert len(sums) == 1
        want = torch.zeros(50, 16, dtype=DT).index_add_(0, index, values.to(DT))
        torch.testing.assert_close(add_rows(torch.zeros(50, 16), index, values).to(DT), want, rtol=1e-4, atol=1e-3)
        idx = torch.randint(0, 400, (64, 32, 1), generator=g).to(DT)  # few repeats: the pairs route
        delta = torch.randn(64, 2, 32, 8, generator=g)
        grams = {embedding_gram(idx, delta).numpy().tobytes() for _ in range(5)}
        assert len(grams) == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("b,c,t,vocab,d", [(5, 2, 6, 50, 3), (3, 1, 9, 200, 2), (8, 3, 5, 30, 4), (2, 2, 12, 400, 1)])
def test_pairs_route_over_many_chunks_equals_the_one_hot_rows(b: int, c: int, t: int, vocab: int, d: int) -> None:
    """The matching pairs enumerated from the sorted indices, many chunks of b² pairs, rows repeated within
    and across samples, against the one-hot explicit rows."""
    g = torch.Generator().manual_seed(b * t + vocab)
    idx = torch.randint(0, vocab, (b, t, 1), generator=g).to(DT)
    idx[0, : t // 2, 0] = 3.0  # one row looked up many times, in two samples
    idx[-1, -1, 0] = 3.0
    delta = torch.randn(b, c, t, d, generator=g, dtype=DT)
    rows = _one_hot_rows(idx, delta, vocab)
    torch.testing.assert_close(embedding_gram(idx, delta), rows @ rows.T, rtol=1e-13, atol=1e-13)
