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

__all__ = ["ChainWork", "Site"]


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
