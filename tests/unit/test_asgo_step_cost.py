"""ASGO's fixed cost per step on a small model: the cheaper evaluations compute the same bits.

* The eigendecomposition route's scalar map (``linalg._scalar_map``) in fewer operator calls, bit for bit
  the recursion its docstring states (the same roundings in the same order).
* ``asgo._finite_rows``: one float64 sum per matrix instead of ``isfinite``'s three passes, exact for NaN,
  inf and finite entries near the dtype's largest number.
* A whole step on a 64-128-128-10 MLP (its k = 128, 64 and 10 float32 Grams by the eigendecomposition route)
  within an operator-call budget, and one of benchmarks/bench_step_overhead.py's 20-64-48-10 MLP within a budget
  of operator calls and host reads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import nn

from lightning_soaa import ASGO
from lightning_soaa.functional.linalg import (
    FLOOR_POLISH_STEPS,
    NEWTON_SCHULZ_COEFFS,
    POLAR_EXPRESS_COEFFS,
    _host_scalar_map,
    _scalar_map,
)
from lightning_soaa.optim.asgo import _finite_rows
from tests.harness.op_count import CountOps, CountReads

_Count = CountOps


def _plain_map(x: torch.Tensor, coeffs: Sequence[tuple[float, float, float]], num_iters: int,
               floor: float) -> torch.Tensor:
    """The recursion as coupled_scalar_map states it, one operation at a time."""
    y = x + floor
    z = torch.ones_like(y)
    for i in range(num_iters):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        t = z * y
        q = a + t * (b + c * t)
        y = y * q
        z = z * q
    if floor > 0.0:
        for _ in range(FLOOR_POLISH_STEPS):
            z = z * (1.5 - 0.5 * z * z * x)
    return z


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(a.dtype == b.dtype and torch.equal(a.view(torch.int64), b.view(torch.int64)))


@pytest.mark.parametrize("coeffs,num_iters", [(POLAR_EXPRESS_COEFFS, 8), (POLAR_EXPRESS_COEFFS, 10),
                                              (POLAR_EXPRESS_COEFFS, 1), ((NEWTON_SCHULZ_COEFFS,), 18)])
@pytest.mark.parametrize("floor", [0.0, 2e-7])
def test_scalar_map_is_the_plain_recursion_in_fewer_operator_calls(coeffs: Any, num_iters: int,
                                                                   floor: float) -> None:
    """Bit for bit the plain recursion (NaN payloads and signed zeros included) on a batch of scaled
    eigenvalues from 1e-16 to 1, rounding noise below 0, 0, NaN and inf; in at most 6 calls per iteration
    and 5 per polishing step (the plain form: 7 and 5, plus the start)."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(2, 64, generator=g, dtype=torch.float64),
                   torch.logspace(-16, 0, 128, dtype=torch.float64).reshape(2, 64),
                   -torch.logspace(-12, -7, 16, dtype=torch.float64).reshape(2, 8),
                   torch.tensor([[0.0, float("nan"), float("inf")]] * 2, dtype=torch.float64)], dim=1)
    with _Count() as count:
        got = _scalar_map(x, coeffs, num_iters, floor)
    assert _same_bits(got, _plain_map(x, coeffs, num_iters, floor))
    polish = FLOOR_POLISH_STEPS if floor > 0.0 else 0
    assert count.n <= 6 * num_iters + 5 * polish + 2, count.n
    # the host evaluation (Python floats, for a few eigenvalues) too
    host = torch.tensor(_host_scalar_map(x.flatten().tolist(), coeffs, num_iters, floor), dtype=torch.float64)
    assert _same_bits(host.reshape(x.shape), got)
    # numpy's (many eigenvalues, no C compiler) and the C loop (kernels/asgo_map.c), which clamps below 0 first
    from lightning_soaa.functional import linalg
    from lightning_soaa.kernels.asgo_native import spectral_map

    if linalg._np is not None:
        assert _same_bits(torch.from_numpy(linalg._numpy_scalar_map(x.numpy(), coeffs, num_iters, floor)), got)
    native = spectral_map()
    if native is not None:
        flat = tuple(c for i in range(num_iters) for c in coeffs[min(i, len(coeffs) - 1)])
        ones = [1.0] * x.shape[0]
        z, tops = native(x, ones, ones, flat, num_iters, floor, polish)
        assert _same_bits(z.squeeze(1), _scalar_map(x.clamp_min(0.0), coeffs, num_iters, floor))
        assert all(t != t for t in tops)  # each row holds a NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigh_route_is_a_few_operator_calls_and_the_same_bits(monkeypatch: pytest.MonkeyPatch,
                                                             dtype: torch.dtype) -> None:
    """The eigendecomposition route's fixed cost: ~106 ATen calls around the LAPACK call (its ~270 us made it
    slower than the iteration below k = 48); now at most 25 for a few eigenvalues (the scale's tail and the
    map on the host), with the bits of the tensor evaluation (forced by _HOST_MAP_MAX = 0 without numpy),
    numpy's and the C loop's, batches, a non-finite matrix and the zero matrix with eps = 0 (0 / 0) included."""
    from lightning_soaa.functional import linalg
    from lightning_soaa.kernels.asgo_native import spectral_map

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 10, 4, generator=g, dtype=torch.float64)
    v = (a @ a.transpose(-1, -2)).to(dtype)
    linalg.inverse_sqrt(v[0], "polar_express_eigh")  # fills the host-side caches (the map's checks)
    with _Count() as count:
        linalg.inverse_sqrt(v[0], "polar_express_eigh")
    assert count.n <= 25, count.n
    bad = v.clone()
    bad[1, 2, 3] = float("nan")
    cases = [(v[0], 1e-10), (v, 1e-10), (bad, 1e-10), (v * 1e150, 1e-10), (torch.zeros_like(v), 0.0)]
    host = [linalg.inverse_sqrt(m, "polar_express_eigh", eps=eps) for m, eps in cases]
    native = spectral_map()
    if native is not None:  # the C loop (the optimizer's route on a CPU), with the roots' flags
        for (m, eps), got in zip(cases, host):
            pending = linalg.pending_inverse_sqrt(m if m.dim() == 3 else m.unsqueeze(0), "polar_express_eigh",
                                                  eps=eps, host_map=native)
            assert _same_bits(got.double().reshape(pending.roots.shape), pending.roots.double())
    if linalg._np is not None:  # numpy's (from any count of eigenvalues)
        monkeypatch.setattr(linalg, "_NUMPY_MAP_MIN", 0)
        for (m, eps), got in zip(cases, host):
            assert _same_bits(got.double(), linalg.inverse_sqrt(m, "polar_express_eigh", eps=eps).double())
    monkeypatch.setattr(linalg, "_np", None)  # the scales' reductions as tensor operations too
    monkeypatch.setattr(linalg, "_HOST_MAP_MAX", 0)
    for (m, eps), got in zip(cases, host):
        assert _same_bits(got.double(), linalg.inverse_sqrt(m, "polar_express_eigh", eps=eps).double())


def test_spectral_scales_scaled_copy_is_the_division_bit_for_bit() -> None:
    """The scale's largest magnitudes (``max(max, -min)``, no ``|V|`` temporary) and the scaled copy (a product with
    each power of two's inverse, ``linalg._scaled_down``) give the bits of ``|V|.max()`` and of the division they
    replace: graded entries, subnormal ones (a matrix of subnormals only takes the division), entries of 2^1023 and
    more (scale inf), NaN, inf, -0.0 and the zero matrix, in one batch and alone. So does the compiled map's one C
    call for both (``scaled_down``, the optimizer's route on a CPU), and the scales, magnitudes and norms made from
    it are numpy's."""
    import numpy as np

    from lightning_soaa.functional import linalg
    from lightning_soaa.kernels.asgo_native import spectral_map

    native = spectral_map()

    g = torch.Generator().manual_seed(0)
    a = torch.randn(9, 6, 6, generator=g, dtype=torch.float64)
    v = a @ a.transpose(-1, -2)
    v[1] *= 1e-300
    v[2] = torch.full((6, 6), 5e-324, dtype=torch.float64) * torch.randint(-3, 4, (6, 6), generator=g)
    v[3] *= 1e307
    v[3, 0, 0] = 1.7e308  # scale 2^1024: inf
    v[4, 2, 3] = float("nan")
    v[5, 1, 1] = float("-inf")
    v[6] = -0.0
    v[7] = 0.0
    for batch in (v, v[:2], v[2:3], v[6:8], v[3:4]):
        host = batch.numpy()
        tops = linalg._spectral_scales(batch, 1e-10)[1]
        assert _same_bits(torch.tensor(tops, dtype=torch.float64), torch.from_numpy(np.abs(host).max(axis=(1, 2))))
        scales = [math.ldexp(1.0, e) if e <= 1023 else math.inf for e in (math.frexp(t)[1] for t in tops)]
        quotient = torch.from_numpy(host / np.array(scales)[:, None, None])
        assert _same_bits(torch.from_numpy(linalg._scaled_down(host, scales)), quotient)
        if native is not None:
            u, native_tops, native_scales = native.scaled_down(batch)
            assert _same_bits(u, quotient)
            assert str((native_tops, native_scales)) == str((tops, scales))  # (NaN-safe: as written)
            for mine, theirs in zip(linalg._spectral_scales(batch, 1e-10, host_map=native),
                                    linalg._spectral_scales(batch, 1e-10)):
                assert _same_bits(torch.tensor(mine, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64))


def test_finite_rows_is_exact_for_every_dtype() -> None:
    """Per matrix: False for a NaN or an inf entry, True for finite entries however large (float32's
    largest numbers summed in float64 stay finite; a float64 batch whose sum overflows is still finite)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        top = torch.finfo(dtype).max
        batch = torch.ones(5, 4, 4, dtype=dtype)
        batch[1, 2, 3] = float("nan")
        batch[2, 0, 0] = float("inf")
        batch[3, 1, 1] = float("-inf")
        batch[4] = top  # every entry the largest finite number: its sum overflows in the dtype itself
        assert _finite_rows(batch).tolist() == [True, False, False, False, True], dtype
        both = batch[2:4].clone()
        both[0, 1, 1] = float("-inf")  # inf + -inf: NaN, still not finite
        assert _finite_rows(both).tolist() == [False, False], dtype


class _CountReads(CountReads):  # type: ignore[misc]
    """The ATen calls (``n``) and, of them or besides them, the host reads (``reads``): ``.item()`` and
    ``Tensor.tolist()``, which copies to the host without an operator call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        tolist = torch.Tensor.tolist

        def counted(t: torch.Tensor) -> Any:
            self.reads += 1
            return tolist(t)
        monkeypatch.setattr(torch.Tensor, "tolist", counted)


def _fast_map() -> bool:
    """Whether the spectral map here is one call (the C loop) or numpy's (else ~60 tensor operations)."""
    try:
        from lightning_soaa.kernels.asgo_native import spectral_map
    except ImportError:  # (a checkout before the C loop: numpy's map, or none, decides)
        spectral_map = None  # type: ignore[assignment]
    try:
        import numpy  # noqa: F401
    except ImportError:
        return spectral_map is not None and spectral_map() is not None
    return True


@pytest.mark.parametrize("root_every,calls,reads", [(1, 50, 3), (10, 25, 2), ("auto", 35, 6)])
def test_bench_mlp_step_stays_within_its_operator_and_read_budget(monkeypatch: pytest.MonkeyPatch, root_every: Any,
                                                                  calls: int, reads: int) -> None:
    """One step after warm-up (``root_every=10``: a step without a root): at most ``calls`` ATen calls and
    ``reads`` host reads. Before: 152 calls and 5 reads with a root (the tensor map's ~60 calls, a padded batch
    made afresh, the roots' flags read), 36 and 1 without; 53 and 5 with a root until the scales' square roots
    were taken on the host (two tensor operations and reads each). Without a root the RMS factors are one read
    of the norms instead of five operator calls; on a CPU no read waits for anything. With a root, 52 until the
    float32 Grams were formed in float64 for their root (G and V widened per block, all copied back rounded in
    one call: tests/conformance/test_low_precision_accuracy.py); 55 until the compiled map's eligibility was asked
    without making a numpy array of the eigenvalues (a ``detach``: linalg._host_readable). 54 and 30 (54 and 29
measured) until the step counters were advanced through their values' addresses (base.StepCounts: a ``fill_`` and
a ``_foreach_copy_`` for the AdamW fallback's counters and again for the matrices'). ``root_every="auto"``: a step
that takes no root (the 15th; its Grams formed in float64, their change since the root measured); 45 calls until
the changes were one multi-tensor subtraction and their norms one call (three calls a block before) and the root
steps read as host floats (an ``item`` a block)."""
    if not _fast_map():
        pytest.skip("neither a C compiler nor numpy: the spectral map is ~60 tensor operations here")
    torch.manual_seed(0)  # benchmarks/bench_step_overhead.py's model (Grams of k = 20, 48, 10: one padded batch)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 10))
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-2
    opt = ASGO(list(model.named_parameters()), lr=1e-3, root_every=root_every)
    for _ in range(14 if root_every == "auto" else 12):  # root_every=10: roots at steps 1 and 11, none at 13
        opt.step()
    roots = opt._roots_computed
    count = _CountReads(monkeypatch)
    with count:
        opt.step()
    assert count.n <= calls, count.n
    assert count.reads <= reads, count.reads
    assert opt._roots_computed == roots + 3 * (root_every == 1)  # ("auto": the step counted takes no root)


def _mlp_step_calls(steps: int = 8) -> int:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    opt = ASGO(list(model.named_parameters()), lr=0.01)
    nn.functional.cross_entropy(model(torch.randn(32, 64)), torch.randint(0, 10, (32,))).backward()
    for _ in range(steps):
        opt.step()
    with _Count() as count:
        opt.step()
    return count.n


def test_small_mlp_step_operator_budget() -> None:
    """The fixed cost of a step on a small MLP is per-operator overhead: 352 ATen calls before the
    cheaper root bookkeeping (constants kept between steps, no clone of an undamped Gram, one-pass
    finiteness flags, the map in fewer calls), 293 after. A budget, so that it stays down. 340 since the
    k = 64 float32 Gram takes the eigendecomposition route (EIGH_MIN_K = 48: ~105 calls against the float64
    iteration's ~60, which costs more CPU time there: 0.88 against 0.74 ms, one thread). 205 since that route
    costs ~25 calls (the scale's tail and a small map on the host) and takes every float32 Gram on a CPU. 95
    since the map is one call (the C loop; numpy's without a compiler), the roots' flags are known on the host,
    the Nesterov directions one multi-tensor call and the RMS factors floats (198 before). 70 since the k = 10
    Gram shares the k = 64 one's batch (ROOT_PAD_BUDGET_EIGH: one route call fewer, 89 before). 76 since a float32
    ``P M`` of k >= 96 is checked for cancellation (4 calls, ``asgo_math.precondition_checked``) and this MLP's
    128 x 128 Gram, of rank 32 (a batch of 32), has its ``P M`` recomputed in float64 (2 calls more). 82 since
    each row of ``P M`` is checked alone (two row norms and their arrays for numpy: an FSDP2 rank's shard decided
    for its rows alone) and only this MLP's cancelling rows are recomputed (index_select, index_copy_). 78 since
    ``P``'s largest diagonal entry is read through numpy with the norms (no diagonal, amax, item) and the compiled
    map's eligibility is asked without making a numpy array (a detach per root batch, two batches here). 74 since the
step counters are advanced through their values' addresses (two fill_ and two _foreach_copy_ calls fewer)."""
    if not _fast_map():
        pytest.skip("neither a C compiler nor numpy: the spectral map is ~60 tensor operations here")
    assert _mlp_step_calls() <= 74


def test_kept_constants_are_never_handed_between_fake_and_real_calls() -> None:
    """The identity kept between calls (``linalg._constants``) is for plain tensors: one made while tracing
    with fake tensors (FakeTensorMode, as torch.compile and torch.export trace) was handed to the next real
    call of the same size, which raised at every later step, and a real one to a fake call; each now
    computes as it did without the cache. Padded shifts ``[n, k, k]`` too large to keep are not kept."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lightning_soaa.functional import linalg

    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 12, generator=g)
    v = (a @ a.T).unsqueeze(0)
    expect = linalg.pending_inverse_sqrt(v.clone(), "polar_express").roots  # warms the host-side caches
    for k in (9, 8):  # a size first seen fake (9), and one first seen real (8)
        x = torch.nn.functional.pad(v, (0, k - 8, 0, k - 8)) if k > 8 else v
        with FakeTensorMode() as mode:
            fake = linalg.pending_inverse_sqrt(mode.from_tensor(x), "polar_express").roots
        assert type(fake) is not torch.Tensor and fake.shape == x.shape
        real = linalg.pending_inverse_sqrt(x, "polar_express").roots
        assert type(real) is torch.Tensor and bool(real.isfinite().all())
    assert torch.equal(real, expect)
    linalg._cached_constants.cache_clear()
    linalg._constants(256, torch.float32, torch.device("cpu"), 1e-10, (256, 100, 50))
    linalg._constants(256, torch.float32, torch.device("cpu"), 1e-10, None)
    assert linalg._cached_constants.cache_info().currsize == 1  # the unpadded k = 256 pair only


def test_a_pending_root_refuses_an_input_written_before_resolve() -> None:
    """Without damping a float32 batch is not copied, so a recomputation at ``resolve`` reads the caller's
    tensor again: written in between (a Gram's next update) it silently gave the root of the new matrix
    (half the root after ``v *= 4``). It raises instead; unchanged, or all roots bounded, it resolves."""
    from lightning_soaa.functional.linalg import inverse_sqrt, pending_inverse_sqrt

    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 16, generator=g)
    v = (a @ a.T).unsqueeze(0)
    expect = inverse_sqrt(v, "polar_express_eigh")
    assert torch.equal(pending_inverse_sqrt(v, "polar_express").resolve([False]), expect)
    pending = pending_inverse_sqrt(v, "polar_express")
    v.mul_(4.0)
    assert pending.resolve([True]) is pending.roots  # nothing recomputed: nothing read again
    with pytest.raises(RuntimeError, match="modified in place before resolve"):
        pending.resolve([False])
