"""Where a GPU optimizer step's time goes: torch.profiler over a few steps of each optimizer.

The model is ``bench_asgo.py``'s transformer; each optimizer takes a few warm-up steps, then ``--steps``
profiled ones. Written per optimizer: wall ms per step, how many kernels it launched, how many host
synchronisations (``cudaStreamSynchronize``/``cudaDeviceSynchronize``) and copies it made, and the ops
with the most self CPU time (on a GPU, host time per op is what a launch-bound step is made of).

Usage::

    python benchmarks/profile_gpu_step.py --device cuda         # ~1 minute on one GPU
    python benchmarks/profile_gpu_step.py --device cpu --d-model 64 --layers 2 --seq 32   # a dry run

Writes ``benchmarks/results/profile_gpu_step.json`` (and logs the tables).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_asgo import TinyGPT, add_model_args, make_optimizers  # noqa: E402

from lightning_soaa import SOAA, ShardedAdamW  # noqa: E402

log = logging.getLogger("profile_gpu_step")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _optimizers(lr: float) -> dict[str, Any]:
    made = make_optimizers(lr)
    out = {k: made[k] for k in ("adamw", "muon", "asgo_root_every_1", "asgo_root_every_10", "dasgo")
           if k in made}
    out["sharded_adamw"] = lambda m: ShardedAdamW(m.named_parameters(), lr=1e-3)
    # the default: the hand-written Triton passes (kernels/soaa_triton.py)
    out["soaa"] = lambda m: SOAA(m.named_parameters(), lr=1e-3, total_steps=1000)
    # torch's foreach ops (compile=False), the default on accelerators before the Triton passes were timed
    out["soaa_foreach"] = lambda m: SOAA(m.named_parameters(), lr=1e-3, total_steps=1000, compile=False)
    return out


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize()


def _step(model: torch.nn.Module, opt: Any, idx: torch.Tensor, vocab: int) -> None:
    opt.zero_grad(set_to_none=True)
    logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, vocab), idx[:, 1:].reshape(-1))
    loss.backward()
    if isinstance(opt, SOAA):
        opt.step(loss=loss.detach())
    else:
        opt.step()


def profile(name: str, make: Any, base: torch.nn.Module, idx: torch.Tensor, args: argparse.Namespace) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    model = copy.deepcopy(base)
    opt = make(model)
    for _ in range(args.warmup):
        _step(model, opt, idx, args.vocab)
    _sync(idx)
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(args.steps):
            _step(model, opt, idx, args.vocab)
            _sync(idx)
    # the optimizer step alone, timed without the profiler
    times = []
    for _ in range(args.steps):
        opt.zero_grad(set_to_none=True)
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), idx[:, 1:].reshape(-1))
        loss.backward()
        _sync(idx)
        t0 = time.perf_counter()
        opt.step(loss=loss.detach()) if isinstance(opt, SOAA) else opt.step()
        _sync(idx)
        times.append(time.perf_counter() - t0)
    events = p.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    counts = {k: sum(e.count for e in events if e.key == k) for k in SYNCS + ("cudaMemcpyAsync", "cudaLaunchKernel")}
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    table = [{"op": e.key, "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3 / args.steps}
             for e in top]
    log.info("%s: step %.2f ms; per profiled step (fwd+bwd+step): %s, device kernels %d", name,
             1e3 * sorted(times)[len(times) // 2], {k: v / args.steps for k, v in counts.items()},
             kernels / args.steps)
    for row in table:
        log.info("    %-50s %6d  %8.3f ms", row["op"][:50], row["count"], row["self_cpu_ms"])
    return {"step_ms_median": 1e3 * sorted(times)[len(times) // 2],
            "per_step_counts": {k: v / args.steps for k, v in counts.items()},
            "kernels_per_step": kernels / args.steps, "top_self_cpu": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    add_model_args(ap, d_model=768, layers=12, heads=12, vocab=256, seq=256, batch=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="profile only these optimizers")
    ap.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    base = TinyGPT(args.vocab, args.d_model, args.layers, args.heads, args.seq).to(args.device)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(args.device)
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    out = {"device": device, "torch": torch.__version__, "args": vars(args) | {"results": str(args.results)},
           "results": {}}
    for name, make in _optimizers(1e-3).items():
        if args.only and name not in args.only:
            continue
        out["results"][name] = profile(name, make, base, idx, args)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "profile_gpu_step.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
