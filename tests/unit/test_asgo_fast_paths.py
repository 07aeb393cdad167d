"""ASGO's single-process step on a small model: its fast paths give the bits of the slow paths they replace
(its budget of operator calls and host reads: tests/unit/test_asgo_step_cost.py).

The paths, each of which gives the bits of the one it replaces (checked by running the same steps with it undone):
the compiled spectral map (``kernels.asgo_native``) and numpy's, for ~60 tensor operations; a kept zero-padded
batch for ``pad_batch``; the roots' finiteness and the statistics' zero flags known on the host
(``PendingRoots.host_flags``) for a read of the roots; the Nesterov directions of small blocks in one multi-tensor
lerp; the RMS factors as floats (``asgo.rms_factors_host``) for five tensor operations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import lightning_soaa.optim.asgo as asgo_mod
from lightning_soaa import ASGO
from lightning_soaa.functional import asgo as asgo_math
from lightning_soaa.functional import linalg
from lightning_soaa.kernels import asgo_native, soaa_native


def _mlp(sizes: tuple[int, ...], dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def _set_grads(model: nn.Module, step: int, rank: int | None = None, zero_first: bool = False) -> None:
    """Gradients of step ``step``: random, of rank ``rank`` for the matrices (a batch smaller than k), the first
    layer's zero (its Gram stays zero: an uninformed root)."""
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(model.parameters()):
        grad = torch.randn(p.shape, generator=g, dtype=torch.float64) * 1e-2
        if rank is not None and p.dim() == 2:
            grad = (torch.randn(p.shape[0], rank, generator=g, dtype=torch.float64)
                    @ torch.randn(rank, p.shape[1], generator=g, dtype=torch.float64)) * 1e-2
        if zero_first and i == 0:
            grad.zero_()
        p.grad = grad.to(p.dtype)


def _undo(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Replace one fast path by what it replaced (the slow path's own code, or what it computes)."""
    if path in ("no_native_map", "no_numpy"):
        monkeypatch.setattr(asgo_mod, "spectral_map", lambda: None)
    if path == "no_numpy":
        monkeypatch.setattr(linalg, "_np", None)
    if path == "pad_batch":
        monkeypatch.setattr(asgo_mod.ASGO, "_padded_grams",
                            lambda self, vs, grams, size: linalg.pad_batch(grams, size))
    if path == "read_flags":
        pending = asgo_mod.pending_inverse_sqrt
        monkeypatch.setattr(asgo_mod, "pending_inverse_sqrt",
                            lambda *a, **k: dataclasses.replace(pending(*a, **k), host_flags=None))
    if path == "directions_one_by_one":
        monkeypatch.setattr(asgo_mod, "_DIRECTIONS_AHEAD_MAX_NUMEL", 0)
    if path == "tensor_factors":
        f64 = torch.float64
        monkeypatch.setattr(asgo_math, "rms_factors_host", lambda norms, numer, dtype: list(asgo_math.rms_factor(
            torch.tensor(norms, dtype=f64), torch.tensor(numer, dtype=f64), dtype).unbind(0)))


_PATHS = ["no_native_map", "no_numpy", "pad_batch", "read_flags", "directions_one_by_one", "tensor_factors"]


def _run(sizes: tuple[int, ...], dtype: torch.dtype, kw: dict[str, Any], rank: int | None,
         zero_first: bool) -> list[torch.Tensor]:
    """Six steps, a save and load into a new optimizer, three more: the parameters, the state and statistics."""
    model = _mlp(sizes, dtype)
    opt = ASGO(list(model.named_parameters()), lr=1e-2, **kw)
    for t in range(6):
        _set_grads(model, t, rank, zero_first)
        opt.step()
    saved = opt.state_dict()
    opt = ASGO(list(model.named_parameters()), lr=1e-2, **kw)
    opt.load_state_dict(saved)
    for t in range(6, 9):
        _set_grads(model, t, rank, zero_first)
        opt.step()
    stats = opt.statistics()
    out = [p.detach().clone() for p in model.parameters()]
    out += [torch.tensor([stats[k] for k in sorted(stats)], dtype=torch.float64)]
    return out + list(_tensors(opt.state_dict()["state"]))


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for k in sorted(x, key=str):
            yield from _tensors(x[k])
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


@pytest.mark.parametrize("case", [
    ((20, 64, 48, 10), torch.float32, {}, None, False),  # one padded batch (k = 20, 48, 10)
    ((20, 64, 48, 10), torch.bfloat16, {"nesterov": False}, 3, True),  # rank 3, a zero first layer
    ((6, 40, 40, 3), torch.float32, {"damping": 1e-3, "root_every": 2}, 2, False),  # damping: flags read
    ((16, 16, 16, 16), torch.float32, {"eps": 0.0, "weight_decay": 0.0}, None, True),  # one stacked batch
    ((20, 64, 48, 10), torch.float64, {"inverse_root": "polar_express_eigh"}, 3, False),  # float64 roots
    ((5, 3, 7, 2), torch.float32, {"root_every": "auto"}, None, False),  # Python floats' map (few values)
])
@pytest.mark.parametrize("path", [*_PATHS, "all"])
def test_each_fast_path_gives_the_bits_of_the_path_it_replaced(monkeypatch: pytest.MonkeyPatch, case: Any,
                                                               path: str) -> None:
    """The same steps (with a state saved and loaded midway) with one fast path undone, or all: the same
    parameters, state and statistics, bit for bit, on float32, bfloat16 and float64 models, padded, stacked and
    single Grams, rank-deficient and zero statistics, damping, ``eps = 0`` and the root schedules."""
    sizes, dtype, kw, rank, zero_first = case
    fast = _run(sizes, dtype, kw, rank, zero_first)
    for p in _PATHS if path == "all" else [path]:
        _undo(monkeypatch, p)
    slow = _run(sizes, dtype, kw, rank, zero_first)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("map_path", ["native", "numpy", "python"])
def test_host_flags_are_what_a_read_of_the_roots_says(monkeypatch: pytest.MonkeyPatch, padded: bool,
                                                      map_path: str) -> None:
    """The eigendecomposition route's ``host_flags`` (finite roots, nonzero statistics, known without reading
    the roots) against the roots and statistics themselves: a NaN, an inf, a zero and huge, tiny and ordinary
    Grams; none given where a scale is 0 (a zero Gram with ``eps = 0``: the tensor map's 0 / 0) or damping was
    applied (the flags are the damped matrix's)."""
    if map_path == "numpy" and linalg._np is None:
        pytest.skip("numpy is not installed")
    host_map = asgo_native.spectral_map() if map_path == "native" else None
    if map_path == "native" and host_map is None:
        pytest.skip("no C compiler here")
    if map_path == "python":
        monkeypatch.setattr(linalg, "_np", None)
    g = torch.Generator().manual_seed(0)
    mats = []
    for k, scale in ((6, 1.0), (4, 1e150), (5, 1e-150), (6, 1.0), (3, 1.0), (6, 1.0)):
        a = torch.randn(k, 2, generator=g, dtype=torch.float64)
        mats.append(a @ a.T * scale)
    mats[3][1, 1] = math.nan
    mats[4][0, 0] = math.inf
    mats[5].zero_()
    ks = [m.shape[0] for m in mats]
    batches = [(linalg.pad_batch(mats, 6), ks)] if padded else [(m.unsqueeze(0), None) for m in mats]
    for eps in (0.0, 1e-10):
        for v, sizes in batches:
            pending = linalg.pending_inverse_sqrt(v, "polar_express_eigh", eps=eps, sizes=sizes, host_map=host_map)
            zero_scale = eps == 0.0 and not bool(v.flatten(1).any(1).all())  # 0 / 0: the tensor map, unknown
            assert (pending.host_flags is None) == zero_scale
            if zero_scale:
                continue
            finite, nonzero = pending.host_flags  # type: ignore[misc]
            assert list(finite) == asgo_mod._finite_rows(pending.roots).tolist()
            assert list(nonzero) == v.flatten(1).any(1).tolist()
            damped = linalg.pending_inverse_sqrt(v, "polar_express_eigh", eps=eps, sizes=sizes, damping=0.1,
                                                 host_map=host_map)
            assert damped.host_flags is None


def test_host_rms_factors_are_the_tensor_factors() -> None:
    """``rms_factors_host`` gives :func:`rms_factor`'s floats for zero, tiny, huge, inf and NaN norms, capped at a
    float32 update's largest number; and a float32 or float64 update is scaled alike by the float and by the 0-d
    float64 tensor (a bfloat16 one would not be: the factors are floats for float32 and float64 updates only)."""
    tiny, big = torch.finfo(torch.float64).tiny, torch.finfo(torch.float64).max
    norms = [0.0, tiny / 4, 1e-300, 3.7, 1e300, big, math.inf, math.nan]
    numer = [0.2 * math.sqrt(n) for n in (1, 7, 64 * 20, 48 * 64, 10, 5, 3, 2)]
    for out_dtype in (torch.float32, torch.float64):
        ref = asgo_math.rms_factor(torch.tensor(norms, dtype=torch.float64), torch.tensor(numer, dtype=torch.float64),
                                   out_dtype)
        got = torch.tensor(asgo_math.rms_factors_host(norms, numer, out_dtype), dtype=torch.float64)
        assert torch.equal(_bits(got), _bits(ref))
        g = torch.Generator().manual_seed(1)
        us = [torch.randn(6, 5, generator=g, dtype=torch.float64).mul(10.0 ** e).to(out_dtype) for e in (-30, 0, 30)]
        fs = torch.rand(3, generator=g, dtype=torch.float64) * torch.tensor([1e-20, 1.0, 1e20], dtype=torch.float64)
        by_tensor, by_float = [u.clone() for u in us], [u.clone() for u in us]
        torch._foreach_mul_(by_tensor, list(fs.unbind(0)))
        torch._foreach_mul_(by_float, fs.tolist())
        assert all(torch.equal(a, b) for a, b in zip(by_tensor, by_float))


def test_without_a_compiler_the_map_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """No C compiler: :func:`spectral_map` is None (said at debug level) and ASGO steps on with numpy or
    tensor operations."""
    def no_compiler() -> str:
        raise asgo_native.NativeUnavailable("no C compiler found (emulated)")
    monkeypatch.setattr(soaa_native, "_compiler", no_compiler)  # the kernels' build (soaa_native.build_library)
    asgo_native.spectral_map.cache_clear()
    try:
        assert asgo_native.spectral_map() is None
        model = _mlp((5, 3, 7, 2))
        _set_grads(model, 0)
        opt = ASGO(list(model.named_parameters()), lr=1e-2)
        opt.step()
        assert all(bool(p.isfinite().all()) for p in model.parameters())
    finally:
        asgo_native.spectral_map.cache_clear()
