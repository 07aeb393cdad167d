"""The mini-batch Gram matrix K = JJᵀ from per-layer factors or explicit Jacobian rows. Pure torch.

For ``nn.Linear`` (y = W a + β) the Jacobian row of output (i, k) with respect to (W, β) is
Σ_t δ_ikt ⊗ [a_it; 1], where a_it is the layer input of sample i at position t and δ_ikt = ∂z_ik/∂y_it
is the back-signal. Hence (spec §2.4, INFERRED "Gram trick")

    K_ℓ[(i,k),(j,l)] = Σ_{t,s} (a_it·a_js + 1) (δ_ikt·δ_jls)

and K = Σ_ℓ K_ℓ + J_rest J_restᵀ. With one position per sample (T = 1) this is (AAᵀ + 1) ⊙ (ΔΔᵀ)
and costs b·c·(d_in + d_out) memory per layer instead of b·c·d_in·d_out for the rows. When the only
trained layer is one whose output is the model's (Δ_i = I: linear regression, a linear probe on a frozen
network) K is the Kronecker product (AAᵀ + 1) ⊗ I_c (:func:`kronecker_sample_gram`).

An ``nn.Embedding`` (y_t = E[idx_t]) is a Linear without bias whose input is one-hot, so its inputs are kept
as the T indices per sample (``LinearFactorShape.vocab`` > 0, d_in = 1) and a_it·a_js becomes
[idx_it == idx_js]: K_emb[(i,k),(j,l)] = Σ_{t,s} [idx_it == idx_js] (δ_ikt·δ_jls) (:func:`embedding_gram`),
instead of b·c explicit rows of V·d mostly zero columns. Positions holding the padding index get no
gradient from torch's backward; the capture zeroes their back-signals, so they add nothing here either.

Across ranks the factors travel as one table with a row per sample (:class:`GramLayout`,
:func:`pack_factor_table`); the rows of all ranks stacked are the global batch's table, from which
:func:`assemble_gram` builds the same K on every rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "GramFactors",
    "GramLayout",
    "GramOperator",
    "LinearFactorShape",
    "assemble_gram",
    "add_rows",
    "embedding_gram",
    "factors_to",
    "gram_matvec",
    "jacobian_gram",
    "kronecker_sample_gram",
    "linear_gram",
    "linear_jacobian_rows",
    "pack_factor_table",
    "rows_per_sample",
    "split_factor_table",
    "transform_factors",
]


def linear_jacobian_rows(a: Tensor, delta: Tensor, *, weight: bool = True, bias: bool = True) -> Tensor:
    """Explicit Jacobian rows [b·c, d_out·d_in (+ d_out)] of one Linear from its factors.

    ``a``: [b, T, d_in] layer inputs; ``delta``: [b, c, T, d_out] back-signals. Columns are ordered
    like ``torch.cat([weight.flatten(), bias])``.
    """
    b, c, _, d_out = delta.shape
    parts = []
    if weight:
        parts.append(torch.einsum("ikto,itd->ikod", delta, a).reshape(b * c, -1))
    if bias:
        parts.append(delta.sum(dim=2).reshape(b * c, d_out))
    return torch.cat(parts, dim=1)


def linear_gram(a: Tensor, delta: Tensor, *, weight: bool = True, bias: bool = True) -> Tensor:
    """K_ℓ = J_ℓ J_ℓᵀ of one Linear ([b·c, b·c]) without forming J_ℓ when that is cheaper.

    Args:
        a: [b, T, d_in] inputs (T positions per sample, e.g. tokens; T = 1 for plain MLPs).
        delta: [b, c, T, d_out] back-signals ∂z_ik/∂y_it.
        weight, bias: which of the layer's parameters are trained.
    """
    b, c, t, d_out = delta.shape
    d_in = a.shape[-1]
    n = b * c
    if not (weight or bias):
        return torch.zeros(n, n, dtype=delta.dtype, device=delta.device)
    if t == 1:
        ga = a[:, 0] @ a[:, 0].T if weight else torch.zeros(b, b, dtype=a.dtype, device=a.device)
        if bias:
            ga = ga + 1.0
        dd = delta[:, :, 0].reshape(n, d_out)
        return (ga[:, None, :, None] * (dd @ dd.T).view(b, c, b, c)).reshape(n, n)
    row_cost = n * (d_out * (d_in + 1))
    pair_cost = (n * t) ** 2
    if row_cost <= pair_cost:
        rows = linear_jacobian_rows(a, delta, weight=weight, bias=bias)
        return rows @ rows.T
    if weight:
        ga = torch.einsum("itd,jsd->itjs", a, a)
    else:
        ga = torch.zeros(b, t, b, t, dtype=a.dtype, device=a.device)
    if bias:
        ga = ga + 1.0
    gd = torch.einsum("ikto,jlso->iktjls", delta, delta)
    return torch.einsum("itjs,iktjls->ikjl", ga, gd).reshape(n, n)


def _same_index(idx: Tensor, dtype: torch.dtype) -> Tensor:
    """[N, N] with 1 where two of the N indices are equal, else 0 (the Gram matrix of their one-hot rows)."""
    flat = idx.reshape(-1)
    return (flat[:, None] == flat[None, :]).to(dtype)


def add_rows(target: Tensor, index: Tensor, values: Tensor) -> Tensor:
    """``target[index[i]] += values[i]`` with repeats summed in a fixed order: the same bits on every run
    and every rank. On the CPU ``index_add_`` (a serial loop in index order; torch's CPU
    ``index_put_(accumulate=True)`` adds in parallel in no fixed order: 30 runs at 2 threads gave 30
    different results); on CUDA ``index_put_(accumulate=True)``, which sorts (``index_add_`` is atomic)."""
    if target.is_cpu:
        return target.index_add_(0, index, values)
    return target.index_put_((index,), values, accumulate=True)


def embedding_gram(idx: Tensor, delta: Tensor) -> Tensor:
    """K_ℓ = J_ℓ J_ℓᵀ of one nn.Embedding's table ([b·c, b·c]) from its indices and back-signals.

    Args:
        idx: [b, T, 1] the looked-up rows (integers, in a floating dtype: the factor table's).
        delta: [b, c, T, d] back-signals ∂z_ik/∂y_it (zero at padding positions).

    Only pairs of positions that look up the same row meet: K[(i,·),(j,·)] = Σ_{t,s: idx_it = idx_js}
    Δ_it Δ_jsᵀ. With T = 1 that is (same-index matrix) ⊙ ΔΔᵀ, one GEMM. With T > 1 the P = Σ_rows n_row²
    matching pairs (counted from the sorted indices) are summed block by block (c×c products of d), P·c²·d
    multiply-adds, when they are few (a large vocabulary: P ≈ b·T), else K is the T² masked GEMMs of the
    position pairs (a small vocabulary: P → (b·T)²). Either way no b·c × V·d rows, no (b·T)² matrix and no
    more than a b·c × b·c temporary; sums go through :func:`add_rows` (the same bits on every rank).
    """
    b, c, t, d = delta.shape
    n = b * c
    if t == 1:
        dd = delta.reshape(n, d)
        return (_same_index(idx, delta.dtype)[:, None, :, None] * (dd @ dd.T).view(b, c, b, c)).reshape(n, n)
    key, order = torch.sort(idx.reshape(-1), stable=True)
    counts = torch.unique_consecutive(key, return_counts=True)[1]
    sizes = counts * counts  # pairs per looked-up row
    pairs = int(sizes.sum())
    if 4 * pairs > (t * b) ** 2:  # many repeats: the dense GEMMs are cheaper than small blocks
        return _gram_by_positions(idx.reshape(b, t), delta)
    ends = torch.cumsum(sizes, 0)
    firsts = torch.cumsum(counts, 0) - counts  # each row's first place in the sorted order
    rows = delta.permute(0, 2, 1, 3).reshape(b * t, c, d)  # Δ at each position p = i·T + t
    k = delta.new_zeros(b * b, c, c)
    step = max(1, b * b)  # pairs per chunk: a temporary of at most (b·c)² numbers
    for lo in range(0, pairs, step):
        j = torch.arange(lo, min(lo + step, pairs), device=idx.device)
        g = torch.searchsorted(ends, j, right=True)  # the row whose pairs j enumerates
        local, width = j - (ends[g] - sizes[g]), counts[g]
        p, q = order[firsts[g] + local // width], order[firsts[g] + local % width]
        add_rows(k, (p // t) * b + q // t, torch.bmm(rows[p], rows[q].transpose(1, 2)))
    return k.view(b, b, c, c).permute(0, 2, 1, 3).reshape(n, n)


def _gram_by_positions(idx: Tensor, delta: Tensor) -> Tensor:
    """Σ_{t,s} [idx_:t == idx_:s] ⊙ Δ_t Δ_sᵀ ([b·c, b·c]; idx [b, T]): T² GEMMs of b·c × d × b·c, each
    with its own b × b mask (never the (b·T)² one)."""
    b, c, t, d = delta.shape
    n = b * c
    k = delta.new_zeros(b, c, b, c)
    for s in range(t):
        for u in range(t):
            g = delta[:, :, s].reshape(n, d) @ delta[:, :, u].reshape(n, d).T
            eq = (idx[:, s, None] == idx[None, :, u]).to(delta.dtype)
            k.addcmul_(g.view(b, c, b, c), eq.view(b, 1, b, 1))
    return k.reshape(n, n)


def jacobian_gram(rows: Tensor) -> Tensor:
    """K = J Jᵀ from explicit rows [b·c, n]."""
    return rows @ rows.T


# ---------------------------------------------------------------------- the gathered factor table
@dataclasses.dataclass(frozen=True)
class LinearFactorShape:
    """One factored Linear as the table sees it: positions per sample T, widths, trained parameters.

    ``vocab`` > 0: an nn.Embedding with that many rows (weight only, d_in = 1): its A holds the T looked-up
    indices per sample, exact in float64 and, as EGN plans it (vocab ≤ 2²⁴), in float32 too."""

    positions: int
    d_in: int
    d_out: int
    weight: bool = True
    bias: bool = True
    vocab: int = 0


@dataclasses.dataclass(frozen=True)
class GramLayout:
    """Columns of one sample's row in the factor table that ranks exchange to build K = JJᵀ.

    Per sample, in this order: the outputs z (c), the targets (c, or 1 class label), per factored Linear
    its inputs A (T·d_in) and back-signals Δ (c·T·d_out), then the explicit Jacobian rows of the other
    parameters (c·rest). Stacking the tables of several ranks along the samples gives the table of the
    global batch, so K is assembled from it exactly as from one process's batch.
    """

    num_outputs: int
    class_targets: bool
    sites: tuple[LinearFactorShape, ...]
    rest: int

    def widths(self) -> list[int]:
        c = self.num_outputs
        out = [c, 1 if self.class_targets else c]
        for s in self.sites:
            out += [s.positions * s.d_in, c * s.positions * s.d_out]
        if self.rest:
            out.append(c * self.rest)
        return out

    @property
    def width(self) -> int:
        return sum(self.widths())


@dataclasses.dataclass
class GramFactors:
    """A factor table split into its pieces (b samples): z [b, c], targets [b, c] or [b],
    per site (A [b, T, d_in], Δ [b, c, T, d_out]), explicit rows [b·c, rest] or None."""

    outputs: Tensor
    targets: Tensor
    linear: list[tuple[Tensor, Tensor]]
    rows: Tensor | None
    #: the site whose Δ is the identity (a network's last Linear: its output is z, Δ_i = I [c, 1, c]), or
    #: -1. Its Δ still holds that identity; products with it are exact copies (x·1 plus exact zeros), so
    #: :func:`transform_factors`, :func:`gram_matvec` and EGN's Jᵀv skip them (the same values, fewer ops)
    identity: int = -1


def pack_factor_table(layout: GramLayout, outputs: Tensor, targets: Tensor,
                      linear: Sequence[tuple[Tensor, Tensor]], rows: Tensor | None) -> Tensor:
    """One row per sample, float64 [b, layout.width]; the inverse of :func:`split_factor_table`.

    ``linear`` holds per site (A [b, T, d_in], Δ [b, c, T, d_out]); ``rows`` is [b, c, rest] or None.
    """
    b = outputs.shape[0]
    pieces = [outputs, targets]
    for a, delta in linear:
        pieces += [a, delta]
    if layout.rest:
        if rows is None:
            raise ValueError(f"layout has rest={layout.rest} explicit columns but rows is None")
        pieces.append(rows)
    widths = layout.widths()
    if len(pieces) != len(widths) or any(t.numel() != b * w for t, w in zip(pieces, widths)):
        got = [t.numel() // max(b, 1) for t in pieces]
        raise ValueError(f"factor table pieces have {got} columns per sample, the layout {widths}")
    table = torch.cat([t.detach().reshape(b, w).to(torch.float64) for t, w in zip(pieces, widths)], dim=1)
    return table


def split_factor_table(layout: GramLayout, table: Tensor) -> GramFactors:
    """Views of the pieces of a [b, layout.width] table (of any dtype)."""
    b, c = table.shape[0], layout.num_outputs
    parts = iter(torch.split(table, layout.widths(), dim=1))
    outputs = next(parts)
    targets = next(parts)
    if layout.class_targets:
        targets = targets.reshape(b)
    linear = []
    for s in layout.sites:
        a = next(parts).reshape(b, s.positions, s.d_in)
        linear.append((a, next(parts).reshape(b, c, s.positions, s.d_out)))
    rows = next(parts).reshape(b * c, layout.rest) if layout.rest else None
    return GramFactors(outputs, targets, linear, rows)


def rows_per_sample(layout: GramLayout, factors: GramFactors) -> int:
    """Rows of J per sample held by ``factors``: c, or c' < c for the factors of SᵀJ with a rectangular S
    (:func:`transform_factors`; the cross-entropy factor has c' = c − 1 columns)."""
    if factors.linear:
        return int(factors.linear[0][1].shape[1])
    if factors.rows is not None:
        return int(factors.rows.shape[0]) // max(int(factors.outputs.shape[0]), 1)
    return layout.num_outputs


#: a lower-triangle assembly splits the rows into at most this many sample-aligned blocks of at least
#: :data:`LOWER_BLOCK_ROWS` rows; block I is one GEMM against the columns of blocks 0..I (a staircase),
#: so the work is (q + 1)/(2q) of the full product (0.56x at q = 8) for q GEMMs per layer. 144 rows: two
#: blocks already pay at bc' = 288 (the digits MLP 64-128-128-10 at b = 32 under cross-entropy: the
#: assembly 1.22 -> 0.96 ms, 1 thread; 256 left that system whole)
LOWER_MAX_BLOCKS = 8
LOWER_BLOCK_ROWS = 144


def _row_blocks(b: int, c: int, lower_only: bool) -> list[tuple[int, int]]:
    """Sample ranges [i0, i1) of the row blocks of a bc×bc assembly (one block: the full product)."""
    q = min(LOWER_MAX_BLOCKS, (b * c) // LOWER_BLOCK_ROWS) if lower_only else 1
    if q <= 1:
        return [(0, b)]
    step = -(-b // q)
    return [(i, min(b, i + step)) for i in range(0, b, step)]


def assemble_gram(layout: GramLayout, factors: GramFactors, *, lower_only: bool = False) -> Tensor:
    """K = Σ_ℓ K_ℓ (Linear factors) + J_rest J_restᵀ, [b·c, b·c] in the table's dtype.

    ``lower_only``: only the lower triangle and the diagonal are guaranteed (all that a Cholesky
    factorization reads); large systems then skip up to ~45% of the GEMM and elementwise work and parts of
    the strict upper triangle are left zero. For factors of SᵀJ (:func:`transform_factors`) this is
    SᵀKS, [b·c', b·c']."""
    b = int(factors.outputs.shape[0])
    c = rows_per_sample(layout, factors)
    n = b * c
    blocks = _row_blocks(b, c, lower_only)
    k: Tensor | None = None  # made by the first term (a product, not 0 + the product: one pass fewer)
    for s, (a, delta) in zip(layout.sites, factors.linear):
        if not s.positions or not (s.weight or s.bias):
            continue
        if k is None and s.positions == 1 and not s.vocab:
            # mul(out=) records no autograd graph (it raises on inputs that require grad): those factors
            # take the additions onto zeros below, which are differentiable
            tracked = torch.is_grad_enabled() and (a.requires_grad or delta.requires_grad)
            if len(blocks) == 1:
                k = _linear_gram_t1_whole(a[:, 0], delta[:, :, 0], weight=s.weight, bias=s.bias)
            elif not tracked:  # the staircase's blocks written, not added to zeros (the whole product's bits)
                k = torch.empty(n, n, dtype=factors.outputs.dtype, device=factors.outputs.device)
                _add_linear_gram_t1(k, a[:, 0], delta[:, :, 0], blocks, weight=s.weight, bias=s.bias, fresh=True)
            if k is not None:
                continue
        if k is None:
            k = torch.zeros(n, n, dtype=factors.outputs.dtype, device=factors.outputs.device)
        if s.vocab and s.positions == 1:  # the equality of the indices in place of AAᵀ (no bias)
            _add_linear_gram_t1(k, a[:, 0], delta[:, :, 0], blocks, weight=True, bias=False,
                                ga=_same_index(a, k.dtype))
        elif s.vocab:
            k += embedding_gram(a, delta)
        elif s.positions == 1:
            _add_linear_gram_t1(k, a[:, 0], delta[:, :, 0], blocks, weight=s.weight, bias=s.bias)
        else:
            k += linear_gram(a, delta, weight=s.weight, bias=s.bias)
    if k is None:
        k = torch.zeros(n, n, dtype=factors.outputs.dtype, device=factors.outputs.device)
    if factors.rows is not None:
        for i0, i1 in blocks:
            k[i0 * c:i1 * c, :i1 * c].addmm_(factors.rows[i0 * c:i1 * c], factors.rows[:i1 * c].T)
    return k


def kronecker_sample_gram(layout: GramLayout, factors: GramFactors) -> Tensor | None:
    """The b×b sample Gram G with K = G ⊗ I_c, when K has that form, else None.

    That is the case when the only Jacobian is one Linear's at one position whose output is the model's
    (its back-signal Δ_i is I_c: a linear model, or a linear probe on a frozen network): K[(i,k),(j,l)] =
    (a_i·a_j + 1) δ_kl. The check reads the factors themselves (the identity flag of a chain capture, else
    Δ compared with I_c), so every rank, holding the same global factors, decides the same. G is built by
    the same products as :func:`assemble_gram`'s, so G ⊗ I_c equals its K bit for bit.
    """
    if len(layout.sites) != 1 or layout.rest or factors.rows is not None or not factors.linear:
        return None
    site, (a, delta) = layout.sites[0], factors.linear[0]
    b, c = int(factors.outputs.shape[0]), layout.num_outputs
    if site.vocab:  # an embedding's A holds indices, not inputs: a·a would be their product (the general solve)
        return None
    if site.positions != 1 or site.d_out != c or not (site.weight or site.bias) or delta.shape[1] != c:
        return None
    if factors.identity != 0:
        eye = torch.eye(c, dtype=delta.dtype, device=delta.device)
        if not torch.equal(delta.reshape(b, c, c), eye.expand(b, c, c)):
            return None
    if not site.weight:
        return torch.ones(b, b, dtype=a.dtype, device=a.device)
    a2 = a[:, 0]
    g = a2 @ a2.T
    if site.bias:
        g += 1.0
    return g


def _linear_gram_t1_whole(a: Tensor, delta: Tensor, *, weight: bool, bias: bool) -> Tensor:
    """(AAᵀ + 1) ⊙ (ΔΔᵀ) as a new [b·c, b·c] tensor (a [b, d_in], delta [b, c, d_out]): what
    :func:`_add_linear_gram_t1` adds to a zero matrix, the same bits (0 + x·y = x·y; only a −0 entry
    would read +0 there), without the zero fill and the read of it."""
    b, c, d_out = delta.shape
    dd = delta.reshape(b * c, d_out)
    g = dd @ dd.T
    if not weight:  # bias only: AAᵀ + 1 is all ones
        return g
    ga = a @ a.T
    if bias:
        ga += 1.0
    return (g.view(b, c, b, c) * ga.view(b, 1, b, 1)).view(b * c, b * c)


def _add_linear_gram_t1(k: Tensor, a: Tensor, delta: Tensor, blocks: list[tuple[int, int]], *, weight: bool,
                        bias: bool, ga: Tensor | None = None, fresh: bool = False) -> None:
    """k += (AAᵀ + 1) ⊙ (ΔΔᵀ) for one position per sample (a [b, d_in], delta [b, c, d_out]), in place, on
    the row blocks ``blocks`` (block [i0, i1) against the columns of samples [0, i1)): per block one GEMM
    over d_out and one fused broadcast multiply-add, so no n×n temporary besides that block of ΔΔᵀ.
    ``ga``: the b×b sample Gram in place of AAᵀ (+ 1) (an embedding's index equality). ``fresh`` (several
    blocks): ``k`` is uninitialised; the blocks are written (x·y, as :func:`_linear_gram_t1_whole` does) and
    the rest of their rows is zeroed."""
    b, c, d_out = delta.shape
    dd = delta.reshape(b * c, d_out)
    if ga is None and weight:
        ga = a @ a.T
        if bias:
            ga += 1.0
    if len(blocks) == 1:  # the whole product: no slicing (a small system pays per op, views included)
        g = dd @ dd.T
        if ga is None:
            k += g
        else:
            k.view(b, c, b, c).addcmul_(g.view(b, c, b, c), ga.view(b, 1, b, 1))
        return
    # the transposes and broadcast views made once, sliced per block (a small system pays per op)
    dd_t, gav = dd.T, (None if ga is None else ga.view(b, 1, b, 1))
    for i0, i1 in blocks:
        rows, cols = slice(i0 * c, i1 * c), slice(0, i1 * c)
        g = torch.mm(dd[rows], dd_t[:, cols])
        kv = k[rows, cols]
        if fresh and i1 < b:
            k[rows, i1 * c:].zero_()
        if gav is None and fresh:
            kv.copy_(g)
        elif gav is None:
            kv += g
        elif fresh:  # (factors that require no grad: mul(out=) records no graph)
            torch.mul(g.view(i1 - i0, c, i1, c), gav[i0:i1, :, :i1], out=kv.view(i1 - i0, c, i1, c))
        else:
            kv.view(i1 - i0, c, i1, c).addcmul_(g.view(i1 - i0, c, i1, c), gav[i0:i1, :, :i1])


def factors_to(factors: GramFactors, dtype: torch.dtype) -> GramFactors:
    """The same factors in another dtype (e.g. float32 for a Gram matrix that is refined in float64)."""
    return GramFactors(factors.outputs.to(dtype), factors.targets,
                       [(a.to(dtype), d.to(dtype)) for a, d in factors.linear],
                       None if factors.rows is None else factors.rows.to(dtype))


def transform_factors(layout: GramLayout, factors: GramFactors, s: Tensor) -> GramFactors:
    """The factors of SᵀJ for a block-diagonal S = blockdiag_i(S_i) ([b, c, c'], c' ≤ c: SᵀJ has c' rows
    per sample).

    Row (i, k) of SᵀJ is Σ_a S_i[a, k] J_(i,a); every Linear row is δ_ia ⊗ [a_i; 1], so SᵀJ has the
    same inputs A and back-signals Δ̃_i = S_iᵀ Δ_i, and :func:`assemble_gram` of the result is SᵀKS
    at the cost of K (no bc×bc×c products).
    """
    b, c = factors.outputs.shape[0], layout.num_outputs
    if s.dim() != 3 or s.shape[0] != b or s.shape[1] != c or s.shape[2] > c:
        raise ValueError(f"transform_factors needs S of shape [{b}, {c}, c' <= {c}]; got {tuple(s.shape)}")
    st = s.transpose(1, 2)
    cp = st.shape[1]
    # SᵀI = Sᵀ: for the identity site a copy in bmm's output layout (bmm would multiply by 1 and add zeros)
    linear = [(a, (st.contiguous() if i == factors.identity else torch.bmm(st, d.reshape(b, c, -1)))
               .reshape(b, cp, *d.shape[2:])) for i, (a, d) in enumerate(factors.linear)]
    rows = None
    if factors.rows is not None:
        rows = torch.bmm(st, factors.rows.reshape(b, c, -1)).reshape(b * cp, -1)
    return GramFactors(factors.outputs, factors.targets, linear, rows)


def _per_sample_apply(delta: Tensor, h: Tensor) -> Tensor:
    """``Δ_i h_i`` for every sample i (``delta`` [b, c, D], ``h`` [b, D]) as a [b, c] tensor.

    Written as the row vectors ``h_iᵀ Δ_iᵀ``: a batch of 1 x D by D x c products, which the CPU BLAS runs
    ~5x faster than the same numbers as a batch of c x D matrix-vector products (b = 256, c = 9, D = 138:
    79 vs 411 µs; this runs once per conjugate-gradient iteration). The sums are grouped differently, so
    the bits differ from the matrix-vector form by ~1e-16 relative; every rank runs this same product on
    the same all-gathered factors, so every world size still gets the same bits. A broadcast
    multiply-and-sum (138 µs) would also allocate a [b, c, D] temporary per application."""
    return torch.bmm(h.unsqueeze(1), delta.transpose(1, 2)).squeeze(1)


@dataclasses.dataclass(frozen=True)
class _Lookups:
    """An embedding site's N looked-up indices as positions among the batch's distinct ones (``rows`` of them):
    its table-shaped products then need U ≤ N rows, not the table's V."""

    inverse: Tensor  # [N] int64
    rows: int

    @staticmethod
    def of(idx: Tensor) -> _Lookups:
        uniq, inv = torch.unique(idx.reshape(-1), return_inverse=True)
        return _Lookups(inv, int(uniq.numel()))


class GramOperator:
    """x ↦ K x = J (Jᵀ x) from the factors without forming K, set up once per system and then applied
    many times (the conjugate-gradient solve applies it once per iteration).

    Per Linear, Jᵀx is the layer-shaped Σ_ik x_ik δ_ik ⊗ [a_i; 1], and J of it is read back through the
    same factors: O(b·T·d_out·(c + d_in)) per Linear instead of the (bc)² of a dense product. With
    ``concat`` (for repeated use) the back-signals of all one-position (T = 1) sites are concatenated along
    d_out at set-up, so that the two per-sample contractions with them are one batched product each for
    the whole model rather than one per layer; a single application does not repay that copy. For the
    factors of SᵀJ (c' rows per sample) x and the result are bc'-vectors.
    """

    def __init__(self, layout: GramLayout, factors: GramFactors, *, concat: bool = True) -> None:
        self.b = int(factors.outputs.shape[0])
        self.c = rows_per_sample(layout, factors)
        b, c = self.b, self.c
        # (site, A [b, d_in] or an embedding's _Lookups, Δ [b, c, d_out])
        t1: list[tuple[LinearFactorShape, Tensor | _Lookups, Tensor]] = []
        # (site, A [b·T, d_in] or _Lookups, Δ [b, c, T·d_out] or None: the identity site, whose products with Δ
        # are copies)
        self.multi: list[tuple[LinearFactorShape, Tensor | _Lookups, Tensor | None]] = []
        for i, (s, (a, delta)) in enumerate(zip(layout.sites, factors.linear)):
            if not s.positions or not (s.weight or s.bias):
                continue
            inputs = _Lookups.of(a) if s.vocab else a.reshape(b * s.positions, s.d_in)
            if s.positions == 1 and concat:
                t1.append((s, inputs, delta.reshape(b, c, s.d_out)))
            elif i == factors.identity and s.weight:  # with a weight, h below is a new tensor (summed into)
                self.multi.append((s, inputs, None))
            else:
                self.multi.append((s, inputs, delta.reshape(b, c, s.positions * s.d_out)))
        self.t1_sites = [(s, a) for s, a, _ in t1]
        self.t1_widths = [s.d_out for s, _, _ in t1]
        self.t1_delta = torch.cat([d for _, _, d in t1], dim=2) if t1 else None  # [b, c, Σ d_out]
        self.rows = factors.rows

    def __call__(self, u: Tensor) -> Tensor:
        """K u as a new tensor (a bc-vector, bc' for the factors of SᵀJ)."""
        b, c = self.b, self.c
        uu = u.reshape(b, c)
        # the first product is the sum so far (a new tensor, so the others add into it in place): no zero
        # tensor to add it to (this runs once per CG iteration; the values are the same, 0 + x = x)
        parts: list[Tensor] = []
        if self.t1_delta is not None:
            # m_i = Δ_iᵀ u_i for every T = 1 site at once ([b, Σ d_out]), one batched GEMM
            m_all = torch.bmm(uu.unsqueeze(1), self.t1_delta).squeeze(1)
            hs = [self._through_weight(s, a, m)
                  for (s, a), m in zip(self.t1_sites, torch.split(m_all, self.t1_widths, dim=1))]
            h = hs[0] if len(hs) == 1 else torch.cat(hs, dim=1)
            parts.append(_per_sample_apply(self.t1_delta, h))
        for s, a, d3 in self.multi:
            if d3 is None:  # the identity site (T = 1, d_out = c): Δᵀu = u and Δh = h
                parts.append(self._through_weight(s, a, uu))
                continue
            m = torch.bmm(uu.unsqueeze(1), d3).reshape(b * s.positions, s.d_out)
            h = self._through_weight(s, a, m)
            parts.append(_per_sample_apply(d3, h.reshape(b, s.positions * s.d_out)))
        if self.rows is not None:
            parts.append((self.rows @ (self.rows.T @ u)).reshape(b, c))
        if not parts:
            return torch.zeros_like(u)
        out = parts[0]
        for part in parts[1:]:
            out += part
        return out.reshape(-1)

    @staticmethod
    def _through_weight(s: LinearFactorShape, a: Tensor | _Lookups, m: Tensor) -> Tensor:
        """h = J_ℓ(J_ℓᵀ ·) read at the layer output: a (mᵀa)ᵀ through the weight plus Σ m through the bias,
        for inputs a [N, d_in] and signals m [N, d_out]. An embedding's Jᵀ· is the table-shaped sum of m into
        the looked-up rows (over the distinct ones only), and J of it reads those rows back."""
        if isinstance(a, _Lookups):
            table = add_rows(m.new_zeros(a.rows, m.shape[1]), a.inverse, m)
            return table[a.inverse]
        if s.weight:
            return torch.addmm(m.sum(dim=0), a, a.T @ m) if s.bias else a @ (a.T @ m)
        return m.sum(dim=0).expand_as(m)

    def flops(self) -> int:
        """Multiply-adds ×2 of one application (the solver's cost model; a matrix has ~2 flops/entry)."""
        b, c = self.b, self.c
        total = 0
        for s, _ in self.t1_sites:
            total += 4 * b * s.d_out * (c + (s.d_in if s.weight else 0))
        for s, _, _ in self.multi:
            total += 4 * b * s.positions * s.d_out * (c + (s.d_in if s.weight else 0))
        if self.rows is not None:
            total += 4 * self.rows.numel()
        return total


def gram_matvec(layout: GramLayout, factors: GramFactors, u: Tensor) -> Tensor:
    """K u = J (Jᵀ u) for a bc-vector u without forming K (one application of :class:`GramOperator`, per
    layer; build the operator once to apply it many times)."""
    return GramOperator(layout, factors, concat=False)(u)
