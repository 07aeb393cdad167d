"""Cost of ``consolidate_state_dict`` at W = 2 (gloo): ours against torch's ZeroRedundancyOptimizer.

Lightning calls ``consolidate_state_dict()`` on every rank before each checkpoint save under DDP, so its
time is paid at every checkpoint. What is measured: two gloo CPU processes, ``n`` parameter tensors (300,
1000, 3000 by default) cycling through a few shapes (matrices, vectors, a scalar-like bias), one optimizer
step with fixed gradients (so the state exists), then ``consolidate_state_dict(to=0)`` timed on each rank
(wall and process CPU time; median of ``--reps`` calls, after one untimed call, a barrier before each).
Optimizers: SOAA, ShardedAdamW and ASGO (this package, sharded over the two ranks) and
``torch.distributed.optim.ZeroRedundancyOptimizer`` over ``torch.optim.AdamW`` (the reference). The
figure is rank 0's (the destination's) wall time per optimizer and tensor count.

Usage::

    python benchmarks/bench_consolidate.py                      # ~1-2 minutes on 2 cores
    python benchmarks/bench_consolidate.py --counts 3000 --reps 5 --tag after
    python benchmarks/bench_consolidate.py --memory-mib 128   # peak memory instead (Linux), no figure

Writes ``benchmarks/results/bench_consolidate[_TAG].json`` and ``.png`` (``--memory-mib``:
``bench_consolidate_memory[_TAG].json``: per rank, the peak resident memory of one
``consolidate_state_dict(to)`` over ShardedAdamW with that much state per rank, for ``to=0`` and ``to=None``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

log = logging.getLogger("bench_consolidate")
OPTIMIZERS = ("SOAA", "AdamW", "ASGO", "torch_ZeRO")
SHAPES = ((64, 64), (256,), (128, 32), (32,), (96, 48))


def _params(n: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(SHAPES[i % len(SHAPES)], generator=gen)) for i in range(n)]


def _build(name: str, params: list[torch.nn.Parameter]) -> Any:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from lightning_soaa import ASGO, SOAA, ShardedAdamW

    if name == "torch_ZeRO":
        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-3)
    if name == "AdamW":
        return ShardedAdamW(params, lr=1e-3)
    if name == "SOAA":
        return SOAA(params, lr=1e-3, compile=False)
    # by name: no "routed by shape" warning; vectors go to ASGO's elementwise fallback
    return ASGO([(f"p{i}", p) for i, p in enumerate(params)], lr=1e-2)


def _time_one(name: str, n: int, reps: int) -> dict[str, float]:
    params = _params(n)
    opt = _build(name, params)
    gen = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step(loss=1.0) if name == "SOAA" else opt.step()
    walls, cpus = [], []
    for i in range(reps + 1):
        dist.barrier()
        w, c = time.perf_counter(), time.process_time()
        opt.consolidate_state_dict(to=0)
        if i:  # the first call is a warm-up
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
    states = (opt.optim if name == "torch_ZeRO" else opt).state.values()
    state_bytes = sum(t.numel() * t.element_size() for st in states for t in st.values()
                      if torch.is_tensor(t))
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus), "state_bytes_rank": state_bytes}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))


def _peak_one(mib: int, to: int | None) -> dict[str, float]:
    """MiB of resident memory above the level before one ``consolidate_state_dict(to)`` at its peak (VmHWM,
    reset through ``/proc/self/clear_refs``), ShardedAdamW with ``mib`` MiB of state on each rank."""
    from lightning_soaa import ShardedAdamW

    # two float32 moments per element: 4 MiB matrices, mib MiB of state per rank once sharded over W ranks
    params = [torch.nn.Parameter(torch.randn(1024, 1024)) for _ in range(mib * dist.get_world_size() // 8)]
    opt = ShardedAdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    opt.consolidate_state_dict(to=to)
    peak = _status_kib("VmHWM")
    dist.barrier()
    return {"peak_mib": (peak - before) / 1024, "state_mib_rank": mib}


def _worker(rank: int, world: int, store: str, args: argparse.Namespace, q: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        if args.memory_mib:
            out = {f"memory/to={to}": _peak_one(args.memory_mib, to) for to in (0, None)}
        else:
            out = {f"{name}/{n}": _time_one(name, n, args.reps) for n in args.counts for name in args.optimizers}
        q.put((rank, out))
    finally:
        dist.destroy_process_group()


def run_world(args: argparse.Namespace) -> list[dict[str, dict[str, float]]]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_worker, args=(r, args.world, os.path.join(d, "store"), args, q))
                 for r in range(args.world)]
        for p in procs:
            p.start()
        got = dict(q.get(timeout=args.timeout) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    return [got[r] for r in range(args.world)]


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts, names = report["config"]["counts"], report["config"]["optimizers"]
    fig, ax = plt.subplots(figsize=(8, 4.6))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        ys = [report["rank0"][f"{name}/{n}"]["wall_s"] for n in counts]
        ax.bar([i + j * width for i in range(len(counts))], ys, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(counts))], [f"{n} tensors" for n in counts])
    ax.set_ylabel("consolidate_state_dict(to=0) wall time, rank 0 [s]")
    ax.set_title(f"W = {report['config']['world']} gloo, median of {report['config']['reps']} "
                 f"({report['config'].get('tag') or 'current'})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", type=int, nargs="+", default=[300, 1000, 3000])
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the ranks")
    p.add_argument("--tag", default="", help="suffix of the output files (e.g. before/after)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--memory-mib", type=int, default=0, help="measure peak memory at this much state per rank")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ranks = run_world(args)
    if args.memory_mib:
        for key in ranks[0]:
            log.info("%s: %s MiB above the start on ranks 0..%d", key,
                     [round(r[key]["peak_mib"]) for r in ranks], args.world - 1)
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / ("bench_consolidate_memory" + (f"_{args.tag}" if args.tag else "") + ".json")
        path.write_text(json.dumps({"benchmark": "consolidate_memory", "world": args.world, "ranks": ranks,
                                    "torch": torch.__version__}, indent=2))
        return
    config = {"counts": args.counts, "optimizers": args.optimizers, "reps": args.reps, "world": args.world,
              "tag": args.tag, "shapes": [list(s) for s in SHAPES], "torch": torch.__version__,
              "machine": platform.machine()}
    report: dict[str, Any] = {"benchmark": "consolidate", "config": config, "rank0": ranks[0], "ranks": ranks}
    for key, r in ranks[0].items():
        log.info("%-18s rank 0: %.3f s wall, %.3f s CPU (rank 1: %.3f s wall); state %.1f MiB per rank", key,
                 r["wall_s"], r["cpu_s"], ranks[-1][key]["wall_s"], r["state_bytes_rank"] / 2**20)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_consolidate" + (f"_{args.tag}" if args.tag else "")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    _plot(report, args.out / f"{stem}.png")
    log.info("wrote %s", args.out / f"{stem}.json")


if __name__ == "__main__":
    main()
