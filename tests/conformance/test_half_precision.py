"""float16 parameters trained directly (``model.half()``, no float32 master copy), for every optimizer that
steps from gradients, and the second moments' range in every dtype.

* The elementwise state of a float16 parameter (Adam's moments: SOAA's, ShardedAdamW's, ASGO's and
  DASGO's AdamW fallback) is float32, as ASGO's matrix statistics are: in float16 ``(1 - β2) g²``
  underflows to 0 for ``|g| < ~5e-3`` (a later step was ~1000x too long: 0.65 instead of 6.7e-4) and
  overflows to inf for ``|g| > ~8e3``.
* Small gradients: the float16 run follows the same optimizer's float64 run on the same gradients to the
  float16 rounding of the parameters.
* One large finite gradient (float16: 9000 on a bias; float32: 1e21) never stops training: the step is
  either skipped or taken with a finite state, later steps move the parameters, and the optimizer's own
  ``state_dict`` loads (an inf ``exp_avg_sq`` froze its coordinate, under SOAA every parameter, and was
  refused by ``load_state_dict``).
* A checkpoint of an earlier version, whose float16 parameters' moments are float16, loads converted
  to float32.

EGN steps from the batch, not from gradients, and keeps its momentum in the parameters' dtype (a linear
recurrence: float16 rounds it relatively, it neither underflows like ``g²`` nor overflows before the
parameters do); it is not part of these checks.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_soaa import registry
from lightning_soaa.registry import OptimizerSpec, StepNeeds

SPECS = [pytest.param(spec, id=spec.name) for spec in registry.REGISTRY if spec.needs is not StepNeeds.BATCH]
SHAPES = ((4, 3), (4,))  # a matrix (ASGO/DASGO's own statistics) and a bias (their AdamW fallback)
#: per step, the scale of the gradients: all below float16's (1 - β2) g² underflow (|g| < ~5e-3)
SMALL = (1e-3, 1e-6, 1e-4, 2e-3)


def _step(spec: OptimizerSpec, opt: Any, i: int) -> None:
    if spec.needs is StepNeeds.LOSS:
        opt.step(loss=1.0 / (i + 1))
    else:
        opt.step()


def _params(dtype: torch.dtype, scale: float = 1.0) -> list[tuple[str, nn.Parameter]]:
    g = torch.Generator().manual_seed(0)
    # float16 values in every dtype: the float16 and float64 runs start from the same point
    return [(f"p{k}", nn.Parameter((torch.randn(s, dtype=torch.float64, generator=g) * scale).half().to(dtype)))
            for k, s in enumerate(SHAPES)]


def _build(spec: OptimizerSpec, params: list[tuple[str, nn.Parameter]]) -> Any:
    return spec.load()(params, **spec.test_kwargs)


def _state_tensors(opt: Any) -> list[tuple[str, torch.Tensor]]:
    """Every floating tensor of the optimizer's per-parameter state (whole-parameter or per block)."""
    out = []
    for st in opt.state.values():
        blocks = st.values() if st and all(isinstance(k, int) for k in st) else [st]
        for blk in blocks:
            out += [(k, v) for k, v in blk.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return out


@pytest.mark.parametrize("spec", SPECS)
def test_float16_small_gradients_follow_the_float64_run(spec: OptimizerSpec) -> None:
    grads = []
    gen = torch.Generator().manual_seed(1)
    for scale in SMALL:  # float16 values, given to both runs
        grads.append([(torch.randn(s, dtype=torch.float64, generator=gen) * scale).half() for s in SHAPES])
    runs = {}
    for dtype in (torch.float16, torch.float64):
        params = _params(dtype, scale=0.05)
        opt = _build(spec, params)
        for i, gs in enumerate(grads):
            for (_, p), g in zip(params, gs):
                p.grad = g.to(dtype)
            _step(spec, opt, i)
        runs[dtype] = [p.detach().double() for _, p in params]
        if dtype == torch.float16:
            state_dtypes = {v.dtype for _, v in _state_tensors(opt)}
    eps16 = torch.finfo(torch.float16).eps
    start = [p.detach().double() for _, p in _params(torch.float64, 0.05)]
    moved = max(float((a - b).abs().max()) for a, b in zip(runs[torch.float64], start))
    assert moved > 10 * eps16 * 0.05  # the float64 run moved well beyond the float16 rounding checked below
    for half, ref, first in zip(runs[torch.float16], runs[torch.float64], start):
        # each step rounds θ once to float16: half an ulp of its magnitude on the way (at most its larger
        # end's, the run moves ~lr per step) per step, with a margin of 2
        tol = len(SMALL) * eps16 * (torch.maximum(ref.abs(), first.abs()) + 2.0**-14)
        assert bool(((half - ref).abs() <= tol).all()), (
            f"{spec.name}: float16 run off the float64 one by {float((half - ref).abs().max()):.3g} "
            f"(allowed ~{float(tol.max()):.3g})")
    assert state_dtypes <= {torch.float32, torch.float64}, state_dtypes  # no float16 state


@pytest.mark.parametrize(("dtype", "spike"), [(torch.float16, 9000.0), (torch.float32, 1e21)],
                         ids=["float16", "float32"])
@pytest.mark.parametrize("spec", SPECS)
def test_a_large_finite_gradient_does_not_stop_training(spec: OptimizerSpec, dtype: torch.dtype,
                                                        spike: float) -> None:
    params = _params(dtype)
    opt = _build(spec, params)
    gen = torch.Generator().manual_seed(2)
    for i in range(6):
        for k, (_, p) in enumerate(params):
            p.grad = (torch.randn(p.shape, dtype=torch.float64, generator=gen) * 0.1).to(dtype)
            if i == 2 and k == 1:
                p.grad.fill_(spike)  # finite in its dtype; (1 - β2) g² is not, in float16 (or g² in float32)
        before = [p.detach().clone() for _, p in params]
        _step(spec, opt, i)
        if i > 2:  # every later step moves both parameters
            for (name, p), b in zip(params, before):
                assert not torch.equal(p.detach(), b), f"{spec.name}: {name} did not move at step {i}"
    for key, v in _state_tensors(opt):
        assert bool(torch.isfinite(v).all()), f"{spec.name}: state {key!r} holds non-finite values"
    again = _build(spec, [(n, nn.Parameter(p.detach().clone())) for n, p in params])
    again.load_state_dict(opt.state_dict())  # its own checkpoint loads


@pytest.mark.parametrize("spec", SPECS)
def test_a_checkpoint_with_float16_moments_loads_as_float32(spec: OptimizerSpec) -> None:
    params = _params(torch.float16)
    opt = _build(spec, params)
    for i in range(2):
        for _, p in params:
            p.grad = torch.full_like(p, 0.01)
        _step(spec, opt, i)
    sd = opt.state_dict()
    old = 0
    for st in sd["state"].values():  # an earlier version's checkpoint: the moments in float16
        for blk in (st.values() if all(isinstance(k, int) for k in st) else [st]):
            for key in ("exp_avg", "exp_avg_sq"):
                if key in blk and "exp_avg_sq" in blk:  # Adam's (ASGO's matrix state has no exp_avg_sq)
                    blk[key] = blk[key].half()
                    old += 1
    assert old  # every optimizer here keeps Adam moments for the bias
    fresh = [(n, nn.Parameter(p.detach().clone())) for n, p in params]
    again = _build(spec, fresh)
    again.load_state_dict(sd)
    loaded = [(k, v) for k, v in _state_tensors(again) if k in ("exp_avg", "exp_avg_sq")]
    assert loaded and all(v.dtype == torch.float32 for _, v in loaded), [(k, v.dtype) for k, v in loaded]
    for _, p in fresh:
        p.grad = torch.full_like(p, 0.01)
    _step(spec, again, 2)  # and steps, its state finite and float32
    assert all(v.dtype != torch.float16 and bool(torch.isfinite(v).all()) for _, v in _state_tensors(again))


@pytest.mark.parametrize("spec", SPECS)
def test_a_float16_parameters_first_step_is_judged_by_its_float32_moments(spec: OptimizerSpec) -> None:
    """Reviewer: the overflow guard judged a float16 parameter without state by float16's range (65504),
    though its moments are made in float32: with another parameter's gradients large enough to need the
    exact check (float32 1e19), a float16 gradient of 9000 skipped the step, and every later one like it."""
    big = nn.Parameter(torch.zeros(4))
    small = nn.Parameter(torch.zeros(3, dtype=torch.float16))
    opt = spec.load()([("big", big), ("small", small)], **spec.test_kwargs)
    big.grad = torch.full_like(big, 1e19)  # Σ g² = 4e38: past the fast bound
    small.grad = torch.full_like(small, 9000.0)  # (1 - β2) g² ~ 8e4 .. 8e5: float32 holds it
    before = small.detach().clone()
    _step(spec, opt, 0)
    assert opt.skipped_steps == 0 and not torch.equal(small.detach(), before)
    assert all(bool(t.isfinite().all()) for _, t in _state_tensors(opt))
