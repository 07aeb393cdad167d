"""K = JJᵀ and d = Jᵀv of a chain's Gram factors (Linear layers, one position per sample) in buffers kept from
one step to the next. Pure torch.

:class:`ChainWork` holds, for one batch shape (b samples, c outputs, one dtype), every operand of those two
products and every view of them that the products read: each site's inputs A [b, d_in] and back-signals
Δ [b, c, d_out] (filled by the caller, e.g. with ``copy_``, which rounds as ``to`` does), their transposes, the
sample Grams AAᵀ + 1 and ΔΔᵀ, K, and the per-sample contractions m = Σ_k v_k δ_k of Jᵀv. The products are
those of :func:`~lightning_soaa.functional.gram.assemble_gram` and of EGN's ``_factor_vjp``, in their order
and on operands of the same layout, written with ``out=`` into the buffers: the same bits, without the views,
reshapes and allocations a small system pays per call (the synthetic 20-32-32-2 MLP at b = 32: 28 ATen calls
for K become 11, 15 for Jᵀv become 10).

The site whose back-signal is the identity (a network's last Linear: its output is z) keeps Δ = I_c per sample
and its ΔΔᵀ, the constant [k = l] over every pair of samples: a product of 0/1 entries, exact, so keeping it
gives the bits forming it gives. Its m is v itself, as in ``_factor_vjp``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["ChainSystem", "ChainWork", "Site"]


class Site(Protocol):
    """What :class:`ChainWork` reads of a factored Linear layer (``gram.LinearFactorShape`` has it): its sizes and
    which of its weight and bias are trained. Structural, so this module imports nothing but torch."""

    @property
    def d_in(self) -> int: ...

    @property
    def d_out(self) -> int: ...

    @property
    def weight(self) -> bool: ...

    @property
    def bias(self) -> bool: ...


class ChainWork:
    """The kept operands of K and Jᵀv for ``sites`` at one batch shape (see the module docstring).

    Args:
        sites: the factored Linear layers (T = 1 each), in the Gram's order.
        b, c: samples and outputs per sample.
        dtype, device: the products' (the solve's) dtype and device.
        identity: the index of the site whose Δ is the identity (-1: none).
        dense: whether K itself is formed (:meth:`gram`); else only the factors and Jᵀv are kept.
    """

    def __init__(self, sites: Sequence[Site], b: int, c: int, dtype: torch.dtype, device: torch.device,
                 identity: int = -1, *, dense: bool = True) -> None:
        def new(*shape: int) -> Tensor:
            return torch.empty(*shape, dtype=dtype, device=device)

        n = b * c
        self.sites, self.b, self.c, self.identity = list(sites), b, c, identity
        self.inputs = [new(b, s.d_in) for s in sites]
        self.inputs_t = [a.T for a in self.inputs]
        eye = torch.eye(c, dtype=dtype, device=device).expand(b, c, c).contiguous()
        self.signals = [eye if i == identity else new(b, c, s.d_out) for i, s in enumerate(sites)]
        flat = [d.view(n, d.shape[2]) for d in self.signals]
        self._flat_t = [(d, d.T) for d in flat]
        self.dense = dense
        if dense:
            self._dd = [new(n, n) for _ in sites]
            if identity >= 0:
                torch.mm(*self._flat_t[identity], out=self._dd[identity])
            self._ga = [new(b, b) for _ in sites]
            self.k = new(n, n)
            # the broadcast views of the products: (ΔΔᵀ)[i, k, j, l] ⊙ (AAᵀ + 1)[i, j] into K[i, k, j, l]
            self._dd4 = [dd.view(b, c, b, c) for dd in self._dd]
            self._ga4 = [ga.view(b, 1, b, 1) for ga in self._ga]
            self._k4 = self.k.view(b, c, b, c)
        self._m = [new(b, 1, s.d_out) for s in sites]
        self._m_flat = [m.view(b, m.shape[2]) for m in self._m]
        self._m_t = [m.T for m in self._m_flat]
        #: a larger system's kept operands (:class:`ChainSystem`), made by its user for the c' it needs
        self.system: ChainSystem | None = None

    def gram(self) -> Tensor:
        """K = Σ_ℓ (A_ℓA_ℓᵀ + 1) ⊙ (Δ_ℓΔ_ℓᵀ) over the sites (a trained weight gives the A_ℓA_ℓᵀ term, a trained bias
        the + 1), [b·c, b·c], in the kept buffer (overwritten by the next call): :func:`assemble_gram`'s
        whole-matrix products for one position per sample (``_linear_gram_t1_whole`` for the first site, then
        ``_add_linear_gram_t1``), the same bits."""
        k4 = self._k4
        first = True
        for i, s in enumerate(self.sites):
            if not (s.weight or s.bias):
                continue
            dd = self._dd[i]
            if i != self.identity:
                torch.mm(*self._flat_t[i], out=dd)
            ga = None
            if s.weight:
                ga = self._ga[i]
                torch.mm(self.inputs[i], self.inputs_t[i], out=ga)
                if s.bias:
                    ga.add_(1.0)
            if ga is None:  # bias only: AAᵀ + 1 is all ones
                if first:
                    self.k.copy_(dd)
                else:
                    self.k.add_(dd)
            elif first:
                torch.mul(self._dd4[i], self._ga4[i], out=k4)
            else:
                k4.addcmul_(self._dd4[i], self._ga4[i])
            first = False
        if first:
            self.k.zero_()
        return self.k

    def vjp_into(self, v: Tensor, weights: Sequence[Tensor | None], biases: Sequence[Tensor | None]) -> None:
        """Jᵀv written into ``weights`` [d_out, d_in] and ``biases`` [d_out] (per site; None: not trained), for v
        [b, c] of the buffers' dtype: per site m = Σ_k v_k δ_k [b, d_out] (one batched product; m = v for the
        identity site), then mᵀA and Σ_i m_i (EGN's ``_factor_vjp``, the same bits)."""
        cols = v.unsqueeze(1)
        for i, (w_out, b_out) in enumerate(zip(weights, biases)):
            if i == self.identity:
                m, m_t = v, v.T
            else:
                torch.bmm(cols, self.signals[i], out=self._m[i])
                m, m_t = self._m_flat[i], self._m_t[i]
            if w_out is not None:
                torch.mm(m_t, self.inputs[i], out=w_out)
            if b_out is not None:
                torch.sum(m, dim=0, out=b_out)


class ChainSystem:
    """The kept operands of a larger system's products (bc above the whole-K size) for ``sites`` at one batch shape
    and one c' (the rows per sample of SᵀJ: c − 1 for cross-entropy, c for a diagonal S or none): K·u from the
    factors, the factors of SᵀJ (Δ̃ = SᵀΔ) and the lower triangle of SᵀKS, written with ``out=`` into kept buffers.

    The products are those of :func:`~lightning_soaa.functional.gram.gram_matvec` (one application per layer),
    :func:`~lightning_soaa.functional.gram.transform_factors` and the lower-triangle
    :func:`~lightning_soaa.functional.gram.assemble_gram` (its row-block staircase, ``blocks``), in their order and
    on operands of the same layouts: the same bits, without their views, reshapes and allocations (the digits MLP
    64-32-32-10 at b = 32, bc' = 288: 128 ATen calls for these three become 39).

    Args:
        work: the batch shape's :class:`ChainWork` (its inputs A and back-signals Δ are the factors read here).
        cp: c', the rows per sample of SᵀJ.
        blocks: the sample ranges [i0, i1) of the lower triangle's row blocks (one block: the whole product);
            None: no lower triangle is assembled here (a system solved iteratively: :meth:`apply`).
    """

    def __init__(self, work: ChainWork, cp: int, blocks: Sequence[tuple[int, int]] | None) -> None:
        b, c = work.b, work.c
        like = work.inputs[0] if work.inputs else work.signals[0]

        def new(*shape: int) -> Tensor:
            return torch.empty(*shape, dtype=like.dtype, device=like.device)

        self.work, self.cp, self.blocks = work, cp, list(blocks or ())
        sites = work.sites
        # K·u, per site: m = Δᵀu [b, 1, d_out], Σ_i m_i, Aᵀm, h = A(Aᵀm) + Σ m, its part Δh [b, 1, c]
        self._m = [new(b, 1, s.d_out) for s in sites]
        self._m_flat = [m.view(b, s.d_out) for m, s in zip(self._m, sites)]
        self._m_sum = [new(s.d_out) for s in sites]
        self._atm = [new(s.d_in, s.d_out) for s in sites]
        self._h = [new(b, s.d_out) for s in sites]
        self._h_rows = [h.unsqueeze(1) for h in self._h]
        self._signals_t = [d.transpose(1, 2) for d in work.signals]
        self._parts = [new(b, 1, c) for _ in sites]
        self._part_flat = [p.view(b, c) for p in self._parts]
        # SᵀJ's back-signals [b, c', d_out] (the identity site's: Sᵀ itself), flat [b·c', d_out] and transposed
        self.signals = [new(b, cp, c if i == work.identity else s.d_out) for i, s in enumerate(sites)]
        self._flat = [d.view(b * cp, d.shape[2]) for d in self.signals]
        self._flat_t = [d.T for d in self._flat]
        self.operator: ChainOperator | None = None  # made at the first use (conjugate gradients' products)
        self._low: ChainSystem | None = None  # a mixed-precision solve's low-precision copy (:meth:`gram_lower_in`)
        if blocks is None:  # (a system solved without its assembly here: no K kept)
            return
        n = b * cp
        self.k = new(n, n)
        self._ga = [new(b, b) for _ in sites]
        # AAᵀ + 1 broadcast over the outputs, per site and row block: [i1 − i0, 1, i1, 1]
        self._gav = [[g.view(b, 1, b, 1)[i0:i1, :, :i1] for i0, i1 in self.blocks] for g in self._ga]
        # per row block: its product with the columns of the blocks before it, and the views it is written through
        self._g = [new((i1 - i0) * cp, i1 * cp) for i0, i1 in self.blocks]
        self._g4 = [g.view(i1 - i0, cp, i1, cp) for g, (i0, i1) in zip(self._g, self.blocks)]
        self._k4 = [self.k[i0 * cp:i1 * cp, :i1 * cp].view(i1 - i0, cp, i1, cp) for i0, i1 in self.blocks]
        self._k_block = [self.k[i0 * cp:i1 * cp, :i1 * cp] for i0, i1 in self.blocks]
        self._rest = [self.k[i0 * cp:i1 * cp, i1 * cp:] for i0, i1 in self.blocks]
        self._rows = [(f[i0 * cp:i1 * cp], f_t[:, :i1 * cp]) for f, f_t in zip(self._flat, self._flat_t)
                      for i0, i1 in self.blocks]

    def gram_matvec(self, u: Tensor) -> Tensor:
        """K·u [b, c] for a bc-vector u of the buffers' dtype (``gram_matvec``: per site m = Δᵀu, h = J_ℓ(J_ℓᵀ·) at
        the layer's output, its part Δh; the identity site's Δᵀu = u and Δh = h), the parts summed in the sites'
        order into the first one's buffer (overwritten by the next call)."""
        work = self.work
        b, c = work.b, work.c
        uu = u.view(b, c)
        rows = uu.unsqueeze(1)
        total: Tensor | None = None
        for i, s in enumerate(work.sites):
            if not (s.weight or s.bias):
                continue
            if i == work.identity and s.weight:
                part = self._through_weight(i, uu)  # (a kept buffer of its own, [b, c])
            else:
                torch.bmm(rows, work.signals[i], out=self._m[i])
                h = self._through_weight(i, self._m_flat[i])
                h_rows = self._h_rows[i] if s.weight else h.unsqueeze(1)  # (bias only: Σ m broadcast)
                torch.bmm(h_rows, self._signals_t[i], out=self._parts[i])
                part = self._part_flat[i]
            if total is None:
                total = part
            else:
                total.add_(part)
        if total is None:
            total = self._part_flat[0].zero_()
        return total

    def _through_weight(self, i: int, m: Tensor) -> Tensor:
        """h = A(Aᵀm) + Σ m for site i (``GramOperator._through_weight`` of a Linear)."""
        s, a = self.work.sites[i], self.work.inputs[i]
        if s.weight:
            torch.mm(self.work.inputs_t[i], m, out=self._atm[i])
            if s.bias:
                torch.sum(m, dim=0, out=self._m_sum[i])
                return torch.addmm(self._m_sum[i], a, self._atm[i], out=self._h[i])
            return torch.mm(a, self._atm[i], out=self._h[i])
        torch.sum(m, dim=0, out=self._m_sum[i])
        return self._m_sum[i].expand_as(m)

    def transform(self, st: Tensor | None) -> list[Tensor]:
        """SᵀJ's back-signals Δ̃ = SᵀΔ per site into the kept buffers (``st``: Sᵀ [b, c', c]; None: S = I, the
        back-signals themselves are copied), as ``transform_factors`` forms them (the identity site's Sᵀ a
        contiguous copy)."""
        work = self.work
        for i, (out, d) in enumerate(zip(self.signals, work.signals)):
            if st is None:
                out.copy_(d)
            elif i == work.identity:
                out.copy_(st)
            else:
                torch.bmm(st, d, out=out)
        return self.signals

    def gram_lower(self) -> Tensor:
        """The lower triangle and diagonal of Σ_ℓ (A_ℓA_ℓᵀ + 1) ⊙ (Δ̃_ℓΔ̃_ℓᵀ) (SᵀKS), [b·c', b·c'], in the kept
        buffer: ``assemble_gram(lower_only=True)``'s products per row block of :attr:`blocks`, the first site's
        written (the rest of its rows zeroed), the others' added."""
        work = self.work
        nb = len(self.blocks)
        first = True
        for i, s in enumerate(work.sites):
            if not (s.weight or s.bias):
                continue
            if s.weight:
                torch.mm(work.inputs[i], work.inputs_t[i], out=self._ga[i])
                if s.bias:
                    self._ga[i].add_(1.0)
            for q, (_, i1) in enumerate(self.blocks):
                torch.mm(*self._rows[i * nb + q], out=self._g[q])
                if first and i1 < work.b:
                    self._rest[q].zero_()
                ga = self._gav[i][q] if s.weight else None
                if ga is None and first:
                    self._k_block[q].copy_(self._g[q])
                elif ga is None:
                    self._k_block[q].add_(self._g[q])
                elif first:
                    torch.mul(self._g4[q], ga, out=self._k4[q])
                else:
                    self._k4[q].addcmul_(self._g4[q], ga)
            first = False
        if first:
            self.k.zero_()
        return self.k

    def gram_lower_in(self, dtype: torch.dtype, blocks: Sequence[tuple[int, int]]) -> Tensor:
        """:meth:`gram_lower` of this step's factors (the inputs A and :attr:`signals` Δ̃, after :meth:`transform`)
        rounded to ``dtype``, assembled in the kept buffers of a second system of that dtype with row blocks
        ``blocks``: ``assemble_gram(factors_to(SᵀJ, dtype), lower_only=True)``'s bits (``copy_`` rounds as ``to``
        does; the products are :meth:`gram_lower`'s), without its conversions, views and allocations per step."""
        work = self.work
        low = self._low
        if low is None or low.blocks != list(blocks) or low.k.dtype != dtype:
            like = work.inputs[0] if work.inputs else work.signals[0]
            kept = ChainWork(work.sites, work.b, work.c, dtype, like.device, work.identity, dense=False)
            low = self._low = ChainSystem(kept, self.cp, blocks)
        for a_low, a in zip(low.work.inputs, work.inputs):
            a_low.copy_(a)
        for d_low, d in zip(low.signals, self.signals):
            d_low.copy_(d)
        return low.gram_lower()

    def apply(self) -> ChainOperator:
        """x ↦ SᵀKS x from this step's :attr:`signals` (after :meth:`transform`), in kept buffers."""
        if self.operator is None:
            self.operator = ChainOperator(self)
        self.operator.update()
        return self.operator


class ChainOperator:
    """x ↦ SᵀKS x from a :class:`ChainSystem`'s factors of SᵀJ without forming the matrix:
    ``GramOperator``'s products (``concat``: the sites' Δ̃ side by side along d_out, one batched product for
    m = Δ̃ᵀx and one for Δ̃h; per site h = A(Aᵀm) + Σ m) in their order and on operands of the same layouts, the
    intermediate ones kept (the same bits; a conjugate-gradient solve applies it once per iteration). Each
    application returns a new tensor (the solver updates it in place)."""

    def __init__(self, system: ChainSystem) -> None:
        work = system.work
        b, cp = work.b, system.cp
        self.b, self.cp = b, cp
        self.live = [i for i, s in enumerate(work.sites) if s.weight or s.bias]
        self.widths = [system.signals[i].shape[2] for i in self.live]
        self._parts = [system.signals[i] for i in self.live]
        like = system.signals[0]

        def new(*shape: int) -> Tensor:
            return torch.empty(*shape, dtype=like.dtype, device=like.device)

        total = sum(self.widths)
        self.work, self.system = work, system
        self.delta = new(b, cp, total)
        self._delta_t = self.delta.transpose(1, 2)
        self._m_all = new(b, 1, total)
        flat = self._m_all.view(b, total)
        self._ms = list(torch.split(flat, self.widths, dim=1)) if self.widths else []
        self._sums = [new(w) for w in self.widths]
        self._atm = [new(work.sites[i].d_in, w) for i, w in zip(self.live, self.widths)]
        self._hs = [new(b, w) for w in self.widths]
        self._h = self._hs[0] if len(self._hs) == 1 else new(b, total)

    def update(self) -> None:
        """Δ̃ of every live site side by side (``torch.cat`` along d_out), from the system's signals."""
        if self._parts:
            torch.cat(self._parts, dim=2, out=self.delta)

    def __call__(self, u: Tensor) -> Tensor:
        if not self.live:
            return torch.zeros_like(u)
        work = self.work
        torch.bmm(u.view(self.b, 1, self.cp), self.delta, out=self._m_all)
        hs = []
        for k, i in enumerate(self.live):
            s, m = work.sites[i], self._ms[k]
            if s.weight:
                torch.mm(work.inputs_t[i], m, out=self._atm[k])
                if s.bias:
                    torch.sum(m, dim=0, out=self._sums[k])
                    hs.append(torch.addmm(self._sums[k], work.inputs[i], self._atm[k], out=self._hs[k]))
                else:
                    hs.append(torch.mm(work.inputs[i], self._atm[k], out=self._hs[k]))
            else:
                hs.append(torch.sum(m, dim=0, out=self._sums[k]).expand_as(m))
        h = hs[0] if len(hs) == 1 else torch.cat(hs, dim=1, out=self._h)
        return torch.bmm(h.unsqueeze(1), self._delta_t).view(-1)

    def flops(self) -> int:
        """``GramOperator.flops`` of the same factors (the conjugate-gradient budget's cost model)."""
        total = 0
        for i, w in zip(self.live, self.widths):
            s = self.work.sites[i]
            total += 4 * self.b * w * (self.cp + (s.d_in if s.weight else 0))
        return total
