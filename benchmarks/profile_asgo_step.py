"""Where an ASGO step spends its time: torch.profiler self time per ATen op, per step.

The ``bench_asgo.py`` transformer (default d=256, 2 layers: 12 blocks of k=256), random tokens, 3 warm-up
steps, then ``--steps`` profiled ``step()`` calls (CPU, one thread). Self times are wall time of each op,
so on a loaded machine they are inflated alike; compare shares, not absolute values.

Usage::

    python benchmarks/profile_asgo_step.py --inverse-root auto            # the default
    python benchmarks/profile_asgo_step.py --inverse-root polar_express   # the matmul iteration
"""

from __future__ import annotations

import argparse
import collections
import logging
import time

import torch
from bench_asgo import TinyGPT, add_model_args  # a sibling script: run this file as benchmarks/profile_asgo_step.py
from torch.nn import functional as F

from lightning_soaa import ASGO
from lightning_soaa.optim.asgo import asgo_param_groups

log = logging.getLogger("profile_asgo_step")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inverse-root", default="auto")
    add_model_args(p, d_model=256, layers=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyGPT(args.vocab, args.d_model, args.layers, args.heads, args.seq)
    opt = ASGO(asgo_param_groups(model), lr=1e-2, inverse_root=args.inverse_root)
    gen = torch.Generator().manual_seed(1)

    def make_grads() -> None:
        idx = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
        opt.zero_grad(set_to_none=True)
        logits = model(idx[:, :-1])
        F.cross_entropy(logits.reshape(-1, args.vocab), idx[:, 1:].reshape(-1)).backward()

    for _ in range(3):
        make_grads()
        opt.step()
    self_us: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    cpu = 0.0
    for _ in range(args.steps):
        make_grads()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            c = time.process_time()
            opt.step()
            cpu += time.process_time() - c
        for e in prof.key_averages():
            self_us[e.key] += e.self_cpu_time_total
            calls[e.key] += e.count
    total = sum(self_us.values())
    log.info("inverse_root=%s: step CPU time %.1f ms (profiled)", args.inverse_root, 1e3 * cpu / args.steps)
    for key, us in self_us.most_common(args.top):
        log.info("  %-36s %8.2f ms/step %5.1f%%  calls/step %d", key, us / 1e3 / args.steps, 100 * us / total,
                 calls[key] // args.steps)


if __name__ == "__main__":
    main()
