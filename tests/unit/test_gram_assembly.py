"""Float64 oracles for the Gram assembly in ``functional/gram.py``: factor tables of several "ranks",
stacked, assemble exactly J Jᵀ of the global batch, with J from explicit per-sample Jacobians.

The factors A (layer inputs) and Δ (back-signals ∂z/∂y) are written out by hand here from the
closed-form derivatives of the test models, independently of ``optim/egn_capture.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_soaa.functional.gram import (
    GramLayout,
    LinearFactorShape,
    assemble_gram,
    pack_factor_table,
    split_factor_table,
)
from tests.unit._egn_oracle import full_jacobian

DT = torch.float64


class _SeqMLP(nn.Module):
    """x [b, T, d] -> Linear per position -> tanh -> flatten -> Linear -> z [b, c]."""

    def __init__(self, d: int, h: int, t: int, c: int, bias1: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.l1 = nn.Linear(d, h, bias=bias1, dtype=DT)
        self.l2 = nn.Linear(t * h, c, dtype=DT)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)).flatten(1))


def _factors(model: _SeqMLP, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A and Δ of both layers in closed form: Δ1[i,k,t,o] = W2[k, t·h+o]·(1 − tanh²(y1[i,t,o]))."""
    b, t, _ = x.shape
    c, h = model.l2.out_features, model.l1.out_features
    with torch.no_grad():
        y1 = model.l1(x)
        a2 = torch.tanh(y1).reshape(b, 1, t * h)
        w2 = model.l2.weight.view(c, t, h)
        delta1 = w2.unsqueeze(0) * (1 - torch.tanh(y1) ** 2).unsqueeze(1)  # [b, c, t, h]
        delta2 = torch.eye(c, dtype=DT).expand(b, c, c).reshape(b, c, 1, c)  # ∂z_ik/∂z_il
    return [(x, delta1), (a2, delta2)]


def _layout(model: _SeqMLP, t: int, *, class_targets: bool, rest: int = 0) -> GramLayout:
    l1, l2 = model.l1, model.l2
    return GramLayout(
        num_outputs=l2.out_features, class_targets=class_targets, rest=rest,
        sites=(LinearFactorShape(t, l1.in_features, l1.out_features, True, l1.bias is not None),
               LinearFactorShape(1, l2.in_features, l2.out_features, True, True)),
    )


def _stacked_table(layout, model, x, y, sizes, rows=None):
    """Each "rank" packs its own samples; the stacked tables are what the all-gather delivers."""
    parts, lo = [], 0
    for n in sizes:
        xs = x[lo:lo + n]
        z = model(xs).detach()
        r = None if rows is None else rows[lo:lo + n]
        parts.append(pack_factor_table(layout, z, y[lo:lo + n], _factors(model, xs), r))
        lo += n
    return torch.cat(parts, dim=0)


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("sizes", [[5], [2, 3], [1, 0, 4]])
@pytest.mark.parametrize("bias1", [True, False])
def test_assembled_gram_equals_explicit_jacobian_product(t: int, sizes: list[int], bias1: bool) -> None:
    d, h, c = 4, 3, 2
    model = _SeqMLP(d, h, t, c, bias1=bias1)
    b = sum(sizes)
    x = torch.randn(b, t, d, generator=torch.Generator().manual_seed(7), dtype=DT)
    y = torch.randn(b, c, dtype=DT)
    layout = _layout(model, t, class_targets=False)
    table = _stacked_table(layout, model, x, y, sizes)
    assert table.shape == (b, layout.width)
    k = assemble_gram(layout, split_factor_table(layout, table))
    jac = full_jacobian(model, x)  # [b·c, n], rows sample-major like K
    torch.testing.assert_close(k, jac @ jac.T, rtol=0, atol=1e-12)


def test_explicit_rows_and_class_targets_round_trip() -> None:
    """Some parameters through explicit rows (here: layer 2's), class labels; pieces come back exact."""
    d, h, t, c = 3, 4, 2, 3
    model = _SeqMLP(d, h, t, c)
    b = 5
    x = torch.randn(b, t, d, generator=torch.Generator().manual_seed(9), dtype=DT)
    y = torch.randint(0, c, (b,))
    jac = full_jacobian(model, x)
    n1 = sum(p.numel() for p in model.l1.parameters())
    rows = jac[:, n1:].reshape(b, c, -1)  # layer 2 as explicit rows (columns after layer 1's)
    layout = GramLayout(num_outputs=c, class_targets=True, rest=rows.shape[-1],
                        sites=(LinearFactorShape(t, d, h),))
    tables = []
    for lo, hi in [(0, 2), (2, 5)]:
        a, delta = _factors(model, x[lo:hi])[0]
        tables.append(pack_factor_table(layout, model(x[lo:hi]).detach(), y[lo:hi], [(a, delta)], rows[lo:hi]))
    pieces = split_factor_table(layout, torch.cat(tables))
    assert torch.equal(pieces.targets, y.to(DT))
    assert torch.equal(pieces.rows, rows.reshape(b * c, -1))
    # exact: the outputs each piece packed. A whole-batch forward may round differently (the CPU BLAS picks
    # its kernel by the batch size: on an AVX-512/AMX host the 5-row and the 2- and 3-row products differed
    # in the last bit, 7e-16), so against it only to rounding
    packed = torch.cat([model(x[lo:hi]).detach() for lo, hi in [(0, 2), (2, 5)]])
    torch.testing.assert_close(pieces.outputs, packed, rtol=0, atol=0)
    torch.testing.assert_close(pieces.outputs, model(x).detach(), rtol=1e-14, atol=1e-15)
    k = assemble_gram(layout, pieces)
    torch.testing.assert_close(k, jac @ jac.T, rtol=0, atol=1e-12)


def test_pack_rejects_a_table_that_does_not_fit_the_layout() -> None:
    model = _SeqMLP(3, 2, 1, 2)
    x = torch.randn(4, 1, 3, dtype=DT)
    layout = _layout(model, 1, class_targets=False, rest=5)
    with pytest.raises(ValueError, match="rest=5"):
        pack_factor_table(layout, model(x).detach(), torch.zeros(4, 2, dtype=DT), _factors(model, x), None)
    wrong = _layout(model, 2, class_targets=False)  # T = 2 expected, factors have T = 1
    with pytest.raises(ValueError, match="columns"):
        pack_factor_table(wrong, model(x).detach(), torch.zeros(4, 2, dtype=DT), _factors(model, x), None)
