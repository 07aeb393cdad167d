"""ASGO's default float32 route on a CPU against a perfect float32 run, on Grams of k = 96..256.

The yardstick is the conformance battery's (tests/conformance/test_low_precision_accuracy.py), on a single
``k x 2k`` weight instead of its 16-wide MLP: the float64 algorithm (the float32 map: its floor and
iterations, by a float64 eigendecomposition) with the parameter and every float64 state tensor rounded to
float32 after each step. Both runs are measured against the float64 run without rounding, as the largest
``||p - p64|| / ||p64 - p0||`` over the steps; the float32 run may be at most 10x the yardstick's.

Grams: ordinary (full rank), rank-deficient (a batch smaller than k, rank 1, a fixed rank-k/4 subspace, a
LayerNorm-like mean-free side), sparse rows (a third of the rows get a gradient) and graded rows (row scales
from 1 to 1e-3). On rank-1 gradients and a batch below k ``P`` holds its null value (~1e3x its kept values) on
most directions: the float32 ``P M`` cancels, and is recomputed in float64 (``precondition_checked``); unchecked it
was 10-15x at k = 128..256 with either product of the root.

The route: a float64 eigendecomposition and, from k = 192 (``F32_PRODUCT_MIN_K``), the root's product
``Q diag(z) Q^T`` mostly in float32 (``linalg._compose_float32``: a shift chosen per matrix, its heaviest
eigenpairs in float64). Inaccurate routes fail the bound: the float32 iteration, a float32 eigendecomposition,
the float32 product without its float64 pairs on a mean-free Gram, and the Gram formed in float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_soaa import ASGO
from lightning_soaa.functional import asgo as asgo_math
from lightning_soaa.functional import linalg
from lightning_soaa.functional.linalg import default_root_iters, inverse_sqrt, root_floor
from lightning_soaa.optim import asgo as asgo_optim

f64 = torch.float64
STEPS = 6
BOUND = 10.0


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread: the float64 eigendecompositions of these Grams took ~1 s each instead of ~7 ms with two
    threads on a loaded 2-core host (OpenMP waits); the bound is a ratio, the same at any thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _grads(kind: str, k: int, seed: int = 0) -> list[torch.Tensor]:
    """``STEPS`` gradients of a ``k x 2k`` weight (left side: its Gram is ``k x k``), float32 values."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * k
    basis = torch.randn(k, k // 4, generator=g, dtype=f64)
    rows = torch.randperm(k, generator=g)[: k // 3]
    scales = torch.logspace(0, -3, k, dtype=f64)[torch.randperm(k, generator=g)]
    out = []
    for _ in range(STEPS):
        if kind == "batch":  # rank k/8 a step, in a new subspace
            grad = torch.randn(k, k // 8, generator=g, dtype=f64) @ torch.randn(k // 8, n, generator=g, dtype=f64)
        elif kind == "rank1":
            grad = torch.randn(k, 1, generator=g, dtype=f64) @ torch.randn(1, n, generator=g, dtype=f64)
        elif kind == "lowrank":  # one rank-k/4 subspace at every step (LoRA-like)
            grad = basis @ torch.randn(k // 4, n, generator=g, dtype=f64)
        elif kind == "sparse":
            grad = torch.zeros(k, n, dtype=f64)
            grad[rows] = torch.randn(len(rows), n, generator=g, dtype=f64)
        else:
            grad = torch.randn(k, n, generator=g, dtype=f64)
            if kind == "graded":
                grad *= scales.unsqueeze(1)
            elif kind == "meanfree":  # a LayerNorm's output: the Gram is singular along the ones vector
                grad -= grad.mean(0, keepdim=True)
        out.append(grad.float().double())
    return out


def _round_state_(opt: ASGO, w: torch.nn.Parameter) -> None:
    with torch.no_grad():
        w.copy_(w.float())
        for st in opt.state.values():
            for val in st.values():
                if torch.is_tensor(val) and val.dtype == f64:
                    val.copy_(val.float())


def _run(grads: list[torch.Tensor], w0: torch.Tensor, dtype: torch.dtype, perfect: bool = False,
         **kw: Any) -> list[torch.Tensor]:
    """The parameter after each step (float64). float64 runs compute the float32 map (its floor and
    iterations) by the float64 eigendecomposition; ``perfect``: rounded as the float32 run stores its state."""
    if dtype == f64:
        kw = dict(inverse_root="polar_express_eigh", root_floor=root_floor(torch.float32),
                  root_iters=default_root_iters("polar_express", torch.float32), **kw)
    w = torch.nn.Parameter(w0.clone().to(dtype))
    opt = ASGO([("w", w)], lr=1e-2, root_every=1, **kw)
    out = []
    for grad in grads:
        w.grad = grad.to(dtype)
        opt.step()
        if perfect:
            _round_state_(opt, w)
        out.append(w.detach().double().clone())
    return out


def _errors(kind: str, k: int, route: Any = None, **kw: Any) -> tuple[float, float]:
    """(the float32 run's error, the yardstick's); ``route``: a context manager the float32 run is made in."""
    grads = _grads(kind, k)
    w0 = (0.02 * torch.randn(k, 2 * k, generator=torch.Generator().manual_seed(1), dtype=f64)).float().double()
    exact = _run(grads, w0, f64)

    def err(run: list[torch.Tensor]) -> float:
        return max(float((p - e).norm() / (e - w0).norm()) for p, e in zip(run, exact))

    with route() if route is not None else nullcontext():
        low = _run(grads, w0, torch.float32, **kw)
    return err(low), err(_run(grads, w0, f64, perfect=True))


@pytest.mark.parametrize("kind,k", [("full", 192), ("lowrank", 192), ("sparse", 192), ("graded", 256),
                                    ("meanfree", 192), ("meanfree", 256), ("meanfree", 96), ("lowrank", 128)])
def test_default_float32_route_is_within_10x_of_a_perfect_float32_run(kind: str, k: int) -> None:
    err, ref = _errors(kind, k)
    assert err <= BOUND * ref, (kind, k, err, ref, err / ref)


@contextmanager
def _float64_product() -> Iterator[None]:
    """Every root's product in float64 (the route below ``F32_PRODUCT_MIN_K``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(linalg, "F32_PRODUCT_MIN_K", 2**31)
        yield


@pytest.mark.parametrize("kind,k", [("rank1", 128), ("rank1", 256), ("batch", 128), ("batch", 256)])
@pytest.mark.parametrize("product", [None, _float64_product])
def test_cancelling_products_are_within_10x_of_a_perfect_float32_run(kind: str, k: int, product: Any) -> None:
    """Rank-1 gradients and a batch below k, with either product of the root: 10.3-14.9x before ``P M`` was
    checked for cancellation (the float32 GEMM's accumulation), measured 3.1-5.5x with it."""
    err, ref = _errors(kind, k, product)
    assert err <= BOUND * ref, (kind, k, err, ref, err / ref)


@contextmanager
def _unchecked_product() -> Iterator[None]:
    """``P M`` in float32 whatever its cancellation."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(asgo_math, "CANCELLATION_RATIO", 0.0)
        yield


@contextmanager
def _float32_eigh() -> Iterator[None]:
    """The eigendecomposition route with a float32 eigendecomposition (LAPACK ssyevd) in place of the float64
    one: what it returns, in float64."""
    real = torch.linalg.eigh

    def eigh32(a: torch.Tensor, *args: Any, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        evals, evecs = real(a.float(), *args, **kw)
        return evals.to(a.dtype), evecs.to(a.dtype)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.linalg, "eigh", eigh32)
        yield


@contextmanager
def _no_float64_pairs() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(linalg, "_F32_PRODUCT_HEAVY", 0)
        yield


@contextmanager
def _float32_gram() -> Iterator[None]:
    """The Gram formed in float32 (``update_gram_`` in place) instead of in float64 on root steps."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(asgo_optim.ASGO, "_wide_gram", staticmethod(lambda view, count: False))
        yield


@pytest.mark.parametrize("kind,k,route,kw", [
    ("rank1", 96, None, dict(inverse_root="polar_express")),  # the float32 iteration
    ("lowrank", 128, None, dict(inverse_root="polar_express")),
    ("sparse", 96, _float32_eigh, {}),
    ("graded", 128, _float32_eigh, {}),
    ("meanfree", 256, _no_float64_pairs, {}),
    ("meanfree", 256, _float32_gram, {}),
    ("rank1", 256, _unchecked_product, {}),
    ("batch", 128, _unchecked_product, {}),
])
def test_the_bound_fails_inaccurate_float32_routes(kind: str, k: int, route: Any, kw: dict[str, Any]) -> None:
    err, ref = _errors(kind, k, route, **kw)
    assert err > BOUND * ref, (kind, k, err, ref, err / ref)


class _MatmulDtypes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in (torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default):
            self.seen.append((func.__name__.split(".")[0], args[1].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype,k,products", [
    (torch.float32, 192, [("bmm", torch.float32), ("baddbmm", f64)]),
    (torch.bfloat16, 256, [("bmm", torch.float32), ("baddbmm", f64)]),
    (torch.float32, 160, [("bmm", f64)]),
    (f64, 192, [("bmm", f64)]),
])
def test_eigh_route_forms_a_large_float32_root_mostly_in_float32_on_a_cpu(dtype: torch.dtype, k: int,
                                                                         products: list[Any]) -> None:
    """The root ``Q diag(z) Q^T`` of a float32 (or narrower) Gram of k >= 192 is a float32 product and a float64
    one of rank 8 on a CPU; a smaller Gram's and a float64 Gram's stay the float64 product, bit for bit."""
    a = torch.randn(2, k, k + 50, generator=torch.Generator().manual_seed(0), dtype=f64)
    v = (a @ a.mT).to(dtype)
    with _MatmulDtypes() as seen:
        root = inverse_sqrt(v, "polar_express_eigh")
    assert seen.seen == products and root.dtype == linalg.root_compute_dtype(dtype)
    v64 = v.to(f64)
    evals, evecs = torch.linalg.eigh(v64)
    want = torch.bmm(evecs * _map(evals, v64, dtype), evecs.transpose(-1, -2))
    if products == [("bmm", f64)]:
        assert torch.equal(root, want.to(root.dtype))
    else:  # within a few roundings of the float32 result
        assert float((root.double() - want).norm() / want.norm()) < 1e-6


def _map(evals: torch.Tensor, v64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The root's values ``z`` (``[n, 1, k]``) of a statistic of ``dtype`` with eigenvalues ``evals``."""
    n, floor = linalg._map_of("polar_express_eigh", dtype, None, None)
    scales = linalg._spectral_scales(v64, 1e-10)[0]
    z, _ = linalg._mapped_spectrum(evals, scales, linalg.POLAR_EXPRESS_COEFFS, n, floor)
    return z


@pytest.mark.parametrize("kind", ["rank1", "lowrank", "sparse", "graded"])
def test_the_float32_product_takes_the_better_shift(kind: str) -> None:
    """Per matrix the shift of the two (0, the largest ``z``) whose ``P M`` is closer to the float64 product's,
    ``M`` the gradient: the null value on rank-deficient Grams, 0 where the small ``z`` sit on few coordinates."""
    k = 256
    grad = _grads(kind, k)[0].float()
    v = (grad @ grad.T).unsqueeze(0).double()
    evals, evecs = torch.linalg.eigh(v)
    z = _map(evals, v, torch.float32)
    want = torch.bmm(evecs * z, evecs.mT)[0] @ grad.double()

    def err(p: torch.Tensor) -> float:
        return float((p[0].double() @ grad.double() - want).norm() / want.norm())

    top = z.amax(-1, keepdim=True)
    zero = err(linalg._compose_float32(evecs, z, torch.zeros_like(top)))
    shifted = err(linalg._compose_float32(evecs, z, top))
    better, worse = sorted((zero, shifted))
    assert worse > 1.5 * better, (zero, shifted)  # the choice matters on each of these Grams
    assert err(linalg._compose_float32(evecs, z)) <= 1.01 * better, (zero, shifted)


@pytest.mark.parametrize("side", [asgo_math.RIGHT, asgo_math.LEFT])
def test_the_cancellation_check_decides_each_vector_alone(side: str) -> None:
    """An FSDP2 rank holds a row shard of ``M`` (right side): ``P M`` checked on the shard must be the rows of
    ``P M`` checked whole, or a rank recomputes in float64 what one process keeps in float32 (the world size
    changes the result). A Gram of 16 kept directions (eigenvalues 1..1e-5) and a null space; half the vectors
    along its largest eigenvalues (their products cancel: ratio 3e-4), half along its smallest kept ones (3e-2):
    whole, the block's ratio (2e-2) kept all in float32, the first shard's (3e-4) recomputed its rows, 3.5e-4
    apart, before each vector was checked alone. (Within float32 rounding, not to the bit: a GEMM's rows are
    not always the same bits at another number of rows, in float32 or float64.)"""
    g = torch.Generator().manual_seed(0)
    n, m = 128, 64
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    lam = torch.zeros(n, dtype=torch.float64)
    lam[:16] = torch.logspace(0, -5, 16, dtype=torch.float64)
    p = linalg.inverse_sqrt(((q * lam) @ q.T).float(), "polar_express_eigh").float()
    coords = torch.zeros(m, n, dtype=torch.float64)
    coords[: m // 2, :4] = torch.randn(m // 2, 4, dtype=torch.float64, generator=g)
    coords[m // 2 :, 12:16] = torch.randn(m // 2, 4, dtype=torch.float64, generator=g)
    mom = (coords @ q.T).float()  # rows: the right side's vectors
    dim = 0 if side == asgo_math.RIGHT else 1
    if side == asgo_math.LEFT:
        mom = mom.T.contiguous()  # columns: the left side's
    whole = asgo_math.precondition_checked(p, mom, side).double()
    halves = [asgo_math.precondition_checked(p, h, side).double() for h in mom.split(m // 2, dim=dim)]
    exact = asgo_math.precondition(p.double(), mom.double(), side).split(m // 2, dim=dim)
    for i, (a, b, c) in enumerate(zip(whole.split(m // 2, dim=dim), halves, exact)):
        apart = ((a - b).norm() / a.norm()).item()
        assert apart < 1e-6, (side, i, apart)
        err = ((a - c).norm() / c.norm()).item()
        assert err < 2e-5, (side, i, err)  # the cancelling half recomputed (3.5e-4 in float32), the other 4e-6
