"""Could ASGO's inverse root run its matmuls in bf16, as torch's Muon runs its Newton-Schulz? (An evaluation.)

On a CPU with bf16 matrix units (Intel AMX) a bf16 ``bmm`` is several times faster than a float32 one, and
torch's Muon gets its speed there from bf16. This script runs the float32 map of ASGO's root (the floored
Polar Express iteration with its polishing steps, ``functional/linalg.py``) with every product in bf16 and in
float32, and compares both with the same map evaluated by a float64 eigendecomposition (the oracle of
``tests/unit/test_linalg.py``): the root's relative Frobenius error and, where a momentum is given, the
update direction ``P M / ||P M||``. Test tolerance for a float32 root of the SPD case: 5e-3.

Cases: ``test_linalg``'s SPD matrix (k = 48, spectrum 1e-6..1), and Grams of k = 256 from 1024 and from 128
rows (graded columns; the second rank-deficient, as a batch below ``k`` makes them).

    python benchmarks/eval_asgo_bf16_root.py
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from torch import Tensor

from lightning_soaa.functional import linalg

log = logging.getLogger("eval_asgo_bf16_root")

ITERS = linalg.default_root_iters("polar_express", torch.float32)
FLOOR = linalg.root_floor(torch.float32)


def iteration_root(v: Tensor, dtype: torch.dtype, eps: float = 1e-10) -> Tensor:
    """The floored Polar Express root of float64 ``v`` with every product in ``dtype`` (the scale in float64,
    as ``linalg._coupled`` takes it), as float64."""
    k = v.shape[-1]
    s = 1.01 * float(torch.linalg.matrix_norm(v + eps * torch.eye(k, dtype=torch.float64)))
    eye = torch.eye(k, dtype=dtype).unsqueeze(0)
    y0 = (v / s).to(dtype).unsqueeze(0)
    z, y = linalg._iterate(torch.add(y0, eye, alpha=FLOOR), eye, linalg.POLAR_EXPRESS_COEFFS, ITERS, last_y=True)
    z = linalg._polish(z, y - FLOOR * z, linalg.FLOOR_POLISH_STEPS)
    return z[0].double() / s ** 0.5


def oracle_root(v: Tensor) -> Tensor:
    """The same map by one float64 eigendecomposition."""
    return linalg.inverse_sqrt(v, "polar_express_eigh", floor=FLOOR, num_iters=ITERS)


def compare(name: str, v: Tensor, m: Tensor | None = None) -> None:
    ref = oracle_root(v)
    for dtype in (torch.float32, torch.bfloat16):
        z = iteration_root(v, dtype)
        line = f"{name:40s} {str(dtype):15s} root error {float((z - ref).norm() / ref.norm()):.2e}"
        if m is not None:
            u, ur = m @ z, m @ ref
            line += f"  P M direction error {float((u / u.norm() - ur / ur.norm()).norm()):.2e}"
        log.info(line)


def bmm_ms(dtype: torch.dtype, reps: int = 9) -> float:
    a = torch.randn(12, 256, 256).to(dtype)
    torch.bmm(a, a)
    times = []
    for _ in range(reps):
        c0 = time.thread_time()
        torch.bmm(a, a)
        times.append(time.thread_time() - c0)
    return 1e3 * statistics.median(times)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))
    compare("SPD k=48, spectrum 1e-6..1", (q * torch.logspace(-6, 0, 48, dtype=torch.float64)) @ q.T)
    for rows in (1024, 128):
        grad = torch.randn(rows, 256, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 256,
                                                                                         dtype=torch.float64)
        v = (grad.T @ grad).float().double()  # a float32 statistic, as ASGO stores it
        m = torch.randn(512, 256, generator=g, dtype=torch.float64) @ v / rows
        compare(f"Gram k=256 of {rows} rows, graded columns", v, m)
    log.info("12 x 256^3 bmm, one thread: float32 %.2f ms, bf16 %.2f ms", bmm_ms(torch.float32),
             bmm_ms(torch.bfloat16))


if __name__ == "__main__":
    main()
