"""ASGO's step on transformer-sized float32 blocks (k = 256, n = 256 and 1024): work that changes no result.

* The float64 Gram of a root step (``asgo_math.gram_wide``) is formed on its lower triangle's row strips and
  mirrored: at most 0.6x the float64 multiply-adds of the full product, and the same Gram (each entry the same
  float64 dot product; rounded to float32 as it is stored).
* The column norms of ``P M``'s cancellation check (``asgo_math.precondition_checked``) of a wide left-side
  block are not reduced along the strided dim (torch's norm there is ~50x slower than along rows).

Both are counted with a dispatch mode, so the budgets are exact, not timings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_soaa import ASGO
from lightning_soaa.functional import asgo as asgo_math

f64 = torch.float64
BETA2 = 0.8

#: name -> (shape, side, k, n): the bench transformer's three kinds of matrices
SHAPES = {"proj.weight": ((256, 1024), "left"), "fc.weight": ((1024, 256), "right"), "q.weight": ((256, 256), "right")}

_MATMULS = {"aten.mm.default": 1, "aten.addmm.default": 1, "aten.addmm_.default": 1, "aten.bmm.default": 0,
            "aten.baddbmm.default": 0, "aten.baddbmm_.default": 0}


class _Record(TorchDispatchMode):
    """Float64 matmul multiply-adds (``macs64``) and the vector norms reduced along a strided dim of a matrix with
    at least 512 vectors (``strided_norms``)."""

    def __init__(self) -> None:
        super().__init__()
        self.macs64 = 0
        self.strided_norms: list[tuple[tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        if name in _MATMULS:
            a, b = (args[1], args[2]) if name.startswith(("aten.addmm", "aten.baddbmm")) else (args[0], args[1])
            if a.dtype == f64:
                self.macs64 += a.numel() * b.shape[-1]
        elif name == "aten.linalg_vector_norm.default" and len(args) > 2 and args[0].dim() == 2:
            x, dims = args[0], args[2]
            if dims is not None and len(dims) == 1:
                d = dims[0] % 2
                if x.stride(d) != 1 and x.shape[1 - d] >= 512:
                    self.strided_norms.append((tuple(x.shape), d))
        return func(*args, **(kwargs or {}))


def _optimizer() -> tuple[ASGO, dict[str, torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(0)
    params = {n: torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02) for n, (shape, _) in SHAPES.items()}
    opt = ASGO(list(params.items()), lr=1e-2, betas=(0.9, BETA2), root_every=1)
    return opt, params


def _set_grads(params: dict[str, torch.nn.Parameter], g: torch.Generator) -> None:
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g)


def _gram_macs() -> int:
    """The float64 multiply-adds of the three full Gram products."""
    total = 0
    for shape, side in SHAPES.values():
        k, n = (shape[0], shape[1]) if side == "left" else (shape[1], shape[0])
        total += k * k * n
    return total


def test_a_root_step_forms_its_float64_gram_on_the_lower_triangle_and_the_same_gram() -> None:
    """One root step's float64 matmul work is at most 0.6x the full Grams' (before: 1.01x, the three full products
    and the root's few float64 eigenpairs), and the stored Grams are the float64 EMA of the gradients' Grams,
    exactly symmetric, rounded to float32 (within 2 float32 ulps of its largest entry: only the float64 sum's
    last bits may differ from one product over the whole matrix)."""
    opt, params = _optimizer()
    g = torch.Generator().manual_seed(1)
    wide = {n: torch.zeros(shape[0] if side == "left" else shape[1], shape[0] if side == "left" else shape[1],
                           dtype=f64) for n, (shape, side) in SHAPES.items()}
    for step in range(3):
        _set_grads(params, g)
        for n, (_, side) in SHAPES.items():
            gr = params[n].grad.to(f64)  # type: ignore[union-attr]
            gram = gr @ gr.T if side == "left" else gr.T @ gr
            wide[n] = BETA2 * opt.state[params[n]]["gram"].to(f64) + (1 - BETA2) * gram if step else (1 - BETA2) * gram
        record = _Record()
        with record:
            opt.step()
        for n in SHAPES:
            stored = opt.state[params[n]]["gram"]
            assert stored.dtype == torch.float32 and torch.equal(stored, stored.T), n
            ulp = torch.finfo(torch.float32).eps * float(wide[n].abs().max())
            assert float((stored.to(f64) - wide[n]).abs().max()) <= 2 * ulp, (n, step)
        assert record.macs64 <= 0.6 * _gram_macs(), (record.macs64, _gram_macs())


def test_the_cancellation_check_takes_column_norms_along_rows() -> None:
    """``P M``'s check of a 256 x 1024 left-side block reduces no norm along the strided dim (before: two, of M
    and of P M), and its decision is unchanged: every column of ``P M`` equals its float32 product (no column of
    these full-rank Grams cancels), to the bit."""
    opt, params = _optimizer()
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        _set_grads(params, g)
        opt.step()
    p, mom = opt.state[params["proj.weight"]]["inv_root"], opt.state[params["proj.weight"]]["exp_avg"]
    record = _Record()
    with record:
        u = asgo_math.precondition_checked(p, mom, "left")
    assert record.strided_norms == [], record.strided_norms
    assert torch.equal(u, p @ mom)


def test_a_wide_gram_first_formed_under_inference_mode_can_later_be_differentiated() -> None:
    """The strips' mirror mask is kept from call to call: one first made under ``torch.inference_mode`` (an
    optimizer stepped there, EGN's passes) was an inference tensor, and every later ``gram_wide`` of that size
    that autograd records (``torch.where`` saves its mask) raised; the math must not depend on what ran before."""
    k, n = asgo_math.GRAM_STRIPS_MIN_K + 3, 7  # a size no other test forms
    g = torch.randn(k, n, dtype=torch.float32)
    v = torch.zeros(k, k, dtype=torch.float32)
    with torch.inference_mode():
        asgo_math.gram_wide(v, g, BETA2, "left")
    x = g.clone().requires_grad_(True)
    asgo_math.gram_wide(v, x, BETA2, "left").sum().backward()
    x64 = g.to(f64).requires_grad_(True)
    ((1.0 - BETA2) * (x64 @ x64.T)).sum().backward()
    assert x.grad is not None and x64.grad is not None
    torch.testing.assert_close(x.grad.to(f64), x64.grad.to(torch.float32).to(f64), rtol=1e-6, atol=1e-6)
