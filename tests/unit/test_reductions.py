"""float64 norms and dot products of float32 tensors without a float64 copy of a large one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from lightning_soaa.functional.reductions import CHUNK, dot_f64, norms_f64, sq_norm_f64


def _largest_allocation(fn: Callable[[], Any]) -> int:
    """The most memory one ATen call inside ``fn`` allocated (bytes, the profiler's count: it also sees a
    kernel's internal float64 copy, which no dispatched op shows)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    big = torch.randn(4 * CHUNK + 7, generator=g)
    mat = torch.randn(3 * CHUNK // 512 + 5, 1024, generator=g)
    return {"small": torch.randn(33, 17, generator=g), "flat": big, "matrix": mat, "transposed": mat.t(),
            "wide": torch.randn(CHUNK + CHUNK // 2, 3, generator=g).t(), "scalar": torch.tensor(3.0),
            "empty": torch.zeros(0, 5), "tiny": torch.full((2 * CHUNK + 1,), 1e-28)}


@pytest.mark.parametrize("name", list(_tensors()))
def test_reductions_equal_float64_and_make_no_large_copy(name: str) -> None:
    """Each equals the float64 reduction (exactly at up to CHUNK elements, as the one call before); a
    large tensor's largest temporary is one chunk's float64 copy, not the whole tensor's (vector_norm with
    dtype=float64 copied all of it: 2x the float32 bytes; the float64 dot three times that)."""
    t = _tensors()[name]
    ref = t.double()
    other = torch.roll(t.flatten(), 1).reshape(t.shape) if t.numel() else t
    sq, norms, dot = sq_norm_f64(t), norms_f64([t, t[:1] if t.dim() else t]), dot_f64(t, other)
    want_dot = (ref * other.double()).sum()
    if t.numel() <= CHUNK:
        assert torch.equal(sq, torch.linalg.vector_norm(t, dtype=torch.float64).square())
        assert torch.equal(dot, want_dot)
    else:  # one chunk's float64 copy (8 MiB); the one-call forms allocate the whole tensor's
        for fn in (lambda: sq_norm_f64(t), lambda: norms_f64([t]), lambda: dot_f64(t, other)):
            assert _largest_allocation(fn) <= CHUNK * 8
        assert _largest_allocation(lambda: torch.linalg.vector_norm(t, dtype=torch.float64)) >= t.numel() * 8
    torch.testing.assert_close(sq, ref.square().sum(), rtol=1e-11, atol=0.0)
    torch.testing.assert_close(norms[0], ref.square().sum().sqrt(), rtol=1e-11, atol=0.0)
    torch.testing.assert_close(dot, want_dot, rtol=1e-11, atol=1e-300)
    assert sq.dtype == norms.dtype == dot.dtype == torch.float64
    if name == "tiny":  # float32 squares of 1e-28 underflow; accumulated in float64 they do not
        assert float(sq) > 0.0


def test_norms_of_a_mixed_list_keep_its_order() -> None:
    """Small tensors in one multi-tensor call (bit for bit as before), large ones in chunks, in order."""
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(5, generator=g), 3 * torch.randn(2 * CHUNK + 3, generator=g), torch.randn(4, 4, generator=g)]
    got = norms_f64(ts)
    small = torch.stack(torch._foreach_norm([ts[0], ts[2]], dtype=torch.float64))
    assert torch.equal(got[[0, 2]], small)
    torch.testing.assert_close(got[1], ts[1].double().norm(), rtol=1e-11, atol=0.0)

