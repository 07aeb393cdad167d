"""The mini-batch Gram matrix K = JJᵀ from per-layer factors or explicit Jacobian rows. Pure torch.

For ``nn.Linear`` (y = W a + β) the Jacobian row of output (i, k) with respect to (W, β) is
Σ_t δ_ikt ⊗ [a_it; 1], where a_it is the layer input of sample i at position t and δ_ikt = ∂z_ik/∂y_it
is the back-signal. Hence (spec §2.4, INFERRED "Gram trick")

    K_ℓ[(i,k),(j,l)] = Σ_{t,s} (a_it·a_js + 1) (δ_ikt·δ_jls)

and K = Σ_ℓ K_ℓ + J_rest J_restᵀ. With one position per sample (T = 1) this is (AAᵀ + 1) ⊙ (ΔΔᵀ)
and costs b·c·(d_in + d_out) memory per layer instead of b·c·d_in·d_out for the rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_gram", "linear_jacobian_rows", "jacobian_gram"]


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


def jacobian_gram(rows: Tensor) -> Tensor:
    """K = J Jᵀ from explicit rows [b·c, n]."""
    return rows @ rows.T
