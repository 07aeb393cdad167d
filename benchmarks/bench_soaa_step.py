"""SOAA optimizer-step time against ``torch.optim.AdamW(fused=True)`` (and foreach AdamW), in one run.

What is measured: the wall time of ``optimizer.step()`` alone on ``--count`` tensors of ``--shape``
(default 10 x 1000x1000, 10M parameters, the figure of issue 14). Every optimizer gets its own copy of
the same parameters with the same fixed gradients (no forward/backward, only the optimizer is timed);
steps are interleaved and the order rotates every step, so machine noise and cache effects hit every
optimizer alike. The run is split into ``--rounds`` rounds; per round the median step time of each
optimizer and its ratio to fused AdamW are taken, and the report gives the median over rounds with the
min-max spread of the round medians (on a shared machine single rounds can be far off).

Optimizers: ``adamw_fused`` (baseline: one ATen kernel, at the memory-bandwidth bound), ``adamw_foreach``,
``soaa`` (the defaults: on CPU the two passes as C loops, on CUDA the hand-written Triton kernels of
``kernels/soaa_triton.py``), ``soaa_inductor`` (CPU only: ``compile=True`` with the C loops off, i.e. the
``torch.compile``'d kernels), ``soaa_foreach`` (CUDA only: ``compile=False``, torch's foreach ops, the
default there before the Triton kernels were timed), ``soaa_eager`` (CPU only, ``compile=False``: the
tiled loop), ``sharded_adamw`` (the package's AdamW) and, with ``--block-numel N``,
``soaa_blocks_N`` (SOAA with ``max_block_numel=N``: the default 2**18 cuts each 1000x1000 matrix into 4 row
blocks, 40 in all, and every block costs some Python per step besides its arithmetic). SOAA gets a loss every
step through ``step(loss=...)``; its trust-region statistics, one scalar all-reduce (a no-op here, W = 1)
and the lagged predicted-reduction sums are all part of the timed step.

Memory traffic per parameter (fp32): fused AdamW reads θ, g, m, v and writes θ, m, v: 28 B (16 B read).
SOAA's C path: the sums pass reads g and m (8 B; Σ v_t and Σ m_t² follow from the Σ v, Σ m² the previous
step's sweep returned), the step reads θ, g, m, v and writes θ, m, v in place, returning its update sums
from the same sweep (28 B): 36 B, 24 B of it read, a bound of 1.29x (1.5x where reads are the limit, as
on one core here). The inductor path: 12 + 28 + 8 = 48 B (1.71x; see ``lightning_soaa/functional/soaa.py``).

Usage::

    python benchmarks/bench_soaa_step.py --threads 2            # ~1-2 minutes on a 2-core CPU
    python benchmarks/bench_soaa_step.py --threads 1 --dtype bfloat16
    python benchmarks/bench_soaa_step.py --threads 2 --block-numel 1048576   # + SOAA with 10 whole blocks
    python benchmarks/bench_soaa_step.py --device cuda --steps 200

Writes ``benchmarks/results/bench_soaa_step_<device>_<dtype>_t<threads>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lightning_soaa import SOAA, ShardedAdamW

log = logging.getLogger("bench_soaa_step")


def _params(shape: tuple[int, ...], count: int, dtype: torch.dtype, device: torch.device,
            grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(shape, generator=g).to(device, dtype)) for _ in range(count)]
    for p, gr in zip(ps, grads):
        p.grad = gr.clone()
    return ps


def _optimizers(args: argparse.Namespace, make: Callable[[], list[torch.nn.Parameter]]) -> dict[str, Any]:
    kw = dict(lr=1e-3, weight_decay=0.01)
    opts: dict[str, Any] = {
        "adamw_fused": torch.optim.AdamW(make(), fused=True, **kw),
        "adamw_foreach": torch.optim.AdamW(make(), foreach=True, **kw),
        "soaa": SOAA(make(), total_steps=1000, **kw),  # the default: C loops on CPU, Triton on CUDA
    }
    if getattr(args, "device", "cpu") != "cpu":  # the eager foreach path (compile=False), the default before
        opts["soaa_foreach"] = SOAA(make(), total_steps=1000, compile=False, **kw)
    else:
        opts["soaa_eager"] = SOAA(make(), total_steps=1000, compile=False, **kw)
        os.environ["LIGHTNING_SOAA_NATIVE"] = "0"  # the torch.compile kernels, which the C loops replace on CPU
        try:
            opts["soaa_inductor"] = SOAA(make(), total_steps=1000, compile=True, **kw)
        finally:
            del os.environ["LIGHTNING_SOAA_NATIVE"]
    if getattr(args, "with_sharded_adamw", False):
        opts["sharded_adamw"] = ShardedAdamW(make(), **kw)
    if getattr(args, "block_numel", 0):  # the same SOAA with another block size: what a block's machinery costs
        opts[f"soaa_blocks_{args.block_numel}"] = SOAA(
            [{"params": make(), "max_block_numel": args.block_numel}], total_steps=1000, **kw)
    if getattr(args, "only", None):  # the baseline and the default SOAA always run (ratios, plot title)
        opts = {k: o for k, o in opts.items() if k in {"adamw_fused", "soaa", *args.only}}
    return opts


def _timed_rounds(opts: dict[str, Any], args: argparse.Namespace, sync: Callable[[], None]
                  ) -> tuple[dict[str, list[list[float]]], dict[str, list[list[float]]]]:
    """Per optimizer and round: the wall times and the process CPU times (s) of the timed steps."""
    names = list(opts)
    step_no = [0]

    def runner(k: str) -> Callable[[], Any]:
        opt = opts[k]
        if isinstance(opt, SOAA):
            return lambda: opt.step(loss=1.0 / (1.0 + 0.01 * step_no[0]))
        return opt.step

    runs = {k: runner(k) for k in names}
    for i in range(args.warmup):  # includes the compilation of SOAA's kernels
        step_no[0] = i
        for k in names:
            runs[k]()
    sync()
    times: dict[str, list[list[float]]] = {k: [] for k in names}
    cpu: dict[str, list[list[float]]] = {k: [] for k in names}
    for r in range(args.rounds):
        for k in names:
            times[k].append([])
            cpu[k].append([])
        for i in range(args.steps):
            step_no[0] += 1
            j = i % len(names)
            for k in names[j:] + names[:j]:  # rotate: no optimizer always goes first
                sync()
                c0, t0 = time.process_time(), time.perf_counter()
                runs[k]()
                sync()
                times[k][r].append(time.perf_counter() - t0)
                cpu[k][r].append(time.process_time() - c0)
        log.info("round %d: %s", r,
                 "  ".join(f"{k} {statistics.median(times[k][r]) * 1e3:.2f}" for k in names))
    return times, cpu


def _summary(times: dict[str, list[list[float]]]) -> dict[str, Any]:
    base = "adamw_fused"
    out: dict[str, Any] = {}
    for k, rounds in times.items():
        med = [statistics.median(r) * 1e3 for r in rounds]
        ratio = [statistics.median(r) / statistics.median(b) for r, b in zip(rounds, times[base])]
        flat = sorted(t * 1e3 for r in rounds for t in r)
        out[k] = {
            "median_ms": statistics.median(med), "round_medians_ms": med,
            "min_ms": flat[0], "p10_ms": flat[len(flat) // 10], "p90_ms": flat[(9 * len(flat)) // 10],
            "ratio_to_adamw_fused": statistics.median(ratio),
            "ratio_round_min": min(ratio), "ratio_round_max": max(ratio),
        }
    return out


def _plot(times: dict[str, list[list[float]]], summary: dict[str, Any], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(times)
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    ax[0].boxplot([[t * 1e3 for r in times[k] for t in r] for k in names], showfliers=False)
    ax[0].set_xticks(range(1, len(names) + 1), names, rotation=15)
    ax[0].set_ylabel("optimizer.step() [ms]")
    ax[0].set_title(title, fontsize=9)
    for k in names:
        ax[1].plot([t * 1e3 for r in times[k] for t in r], label=k, lw=0.7)
    ax[1].set_yscale("log")
    ax[1].set_xlabel("timed step (interleaved, all rounds)")
    ax[1].set_ylabel("ms")
    ax[1].legend(fontsize=8)
    s = summary["soaa"]
    ax[1].set_title(f"SOAA / fused AdamW: median {s['ratio_to_adamw_fused']:.2f}x "
                    f"(rounds {s['ratio_round_min']:.2f}-{s['ratio_round_max']:.2f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1000x1000", help="shape of each tensor, e.g. 1000x1000")
    ap.add_argument("--count", type=int, default=10, help="number of tensors")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=25, help="timed steps per optimizer and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    ap.add_argument("--with-sharded-adamw", action="store_true", help="also time the package's ShardedAdamW")
    ap.add_argument("--block-numel", type=int, default=0,
                    help="also time SOAA with this max_block_numel (default 2**18 cuts a 1000x1000 matrix in 4)")
    ap.add_argument("--only", nargs="+", default=None,
                    help="time only these besides adamw_fused and soaa (e.g. soaa_blocks_1048576): the slow "
                         "eager variants between the steps change what the fast ones measure")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = tuple(int(x) for x in args.shape.split("x"))
    g = torch.Generator().manual_seed(1)
    grads = [(torch.randn(shape, generator=g) * 1e-3).to(device, dtype) for _ in range(args.count)]
    opts = _optimizers(args, lambda: _params(shape, args.count, dtype, device, grads))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    times, cpu = _timed_rounds(opts, args, sync)
    summary = _summary(times)
    summary_cpu = _summary(cpu)
    n_params = args.count * int(torch.Size(shape).numel())
    kernels = opts["soaa"]._kernels()
    result = {
        "benchmark": "bench_soaa_step",
        "tensors": {"shape": list(shape), "count": args.count, "params": n_params, "dtype": args.dtype},
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "steps_per_round": args.steps, "rounds": args.rounds, "warmup": args.warmup,
        "wall_s": time.perf_counter() - t0,
        "soaa_compiled_kernels": kernels is not None and kernels.failure is None,
        "soaa_blocks": {k: len(o._owned) for k, o in opts.items() if isinstance(o, SOAA)},
        "summary": summary,
        # CPU time of the process per step (all threads): what the step costs in work, much less
        # sensitive than wall time to other processes taking the cores (it still pays for their
        # cache and memory-bandwidth use)
        "summary_cpu_time": summary_cpu,
        "goal": "soaa / adamw_fused <= 1.5 (traffic bound of this layout 48/28 B = 1.71)",
        "goal_met": summary["soaa"]["ratio_to_adamw_fused"] <= 1.5,
    }
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench_soaa_step_{device.type}_{args.dtype}_t{torch.get_num_threads()}"
    if (args.shape, args.count) != ("1000x1000", 10):  # another size: its own file
        stem += f"_{args.count}x{args.shape}"
    if args.block_numel or args.only:  # another selection: its own file too
        stem += f"_blocks{args.block_numel}" if args.block_numel else "_only"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    for label, summ in (("wall", summary), ("cpu", summary_cpu)):
        for k, s in summ.items():
            log.info("%s %-14s median %8.2f ms (rounds %.2f-%.2f)   / fused AdamW %.2fx (rounds %.2f-%.2f)",
                     label, k, s["median_ms"], min(s["round_medians_ms"]), max(s["round_medians_ms"]),
                     s["ratio_to_adamw_fused"], s["ratio_round_min"], s["ratio_round_max"])
    title = (f"{n_params / 1e6:.0f}M {args.dtype} params ({args.count} x {args.shape}), {device}, "
             f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps")
    _plot(times, summary, title, out_dir / f"{stem}.png")
    log.info("wrote %s.json and .png", out_dir / stem)


if __name__ == "__main__":
    main()
