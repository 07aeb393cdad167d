"""Our optimizers over an FSDP2 (``fully_shard``) model vs ``torch.optim.AdamW`` on the same model.

What is measured, per rank, at W = 1, 2, 4 gloo CPU processes (one thread each):

* optimizer state bytes held by the rank (every tensor in ``optimizer.state``, local shards of DTensors);
* ``optimizer.step()`` wall time: every optimizer has its own copy of the same fully_shard'ed MLP with
  the same gradients (one forward/backward, then only steps are timed); steps are interleaved with a
  rotating order so machine noise hits all alike. Reported: the median per rank, and the slowest rank's
  median (what a synchronous step waits for), and its ratio to torch AdamW's in the same run.

Optimizers: ``torch.optim.AdamW(foreach=True)`` (baseline; it handles DTensors itself), ``SOAA``,
``ShardedAdamW``, ``DASGO``. ASGO is left out: its inverse root of a 1024 x 1024 Gram per matrix every
step dominates and is measured in ``bench_asgo.py``. SOAA runs with its defaults (on CPU its C loops,
built once and cached, well under a second); ``--eager`` sets ``LIGHTNING_SOAA_COMPILE=0`` (the eager
torch update) instead. Until turn 15 eager was this script's default, from the time when SOAA's CPU update
was compiled by inductor in every rank.

Usage::

    python benchmarks/bench_fsdp2.py                 # ~1-3 minutes on a 2-core CPU
    python benchmarks/bench_fsdp2.py --width 512 --steps 10

Writes ``benchmarks/results/bench_fsdp2.json`` and ``bench_fsdp2.png``.
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
from torch import nn

log = logging.getLogger("bench_fsdp2")

OPTIMIZERS = ("torch_adamw", "soaa", "sharded_adamw", "dasgo")


def build_model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*mods)


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    from lightning_soaa import DASGO, SOAA, ShardedAdamW

    params = list(model.named_parameters())
    if name == "torch_adamw":
        return torch.optim.AdamW([p for _, p in params], lr=1e-3, foreach=True)
    if name == "soaa":
        return SOAA(params, lr=1e-3)
    if name == "sharded_adamw":
        return ShardedAdamW(params, lr=1e-3)
    return DASGO(params, lr=1e-3)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor this rank keeps for the optimizer (local pieces of DTensors)."""
    from lightning_soaa.distributed.dtensor import local

    total = 0

    def walk(obj: Any) -> None:  # state tensors are distinct objects: no de-duplication needed
        nonlocal total
        if isinstance(obj, torch.Tensor):
            t = local(obj)
            total += t.numel() * t.element_size()  # type: ignore[union-attr]
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(list(opt.state.values()))
    walk(list(getattr(opt, "_spare", {}).values()))
    return total


def _setup(width: int, layers: int, batch: int, rank: int, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(batch, width, generator=g)
    setups = {}
    for name in OPTIMIZERS:
        model = build_model(width, layers)
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model(x).square().mean().backward()  # the same gradients for every optimizer
        setups[name] = (model, make_optimizer(name, model))
    return setups


def _step(name: str, opt: Any) -> float:
    t0 = time.perf_counter()
    if name == "soaa":
        opt.step(loss=1.0)
    else:
        opt.step()
    return time.perf_counter() - t0


def _rank_main(rank: int, world: int, store: str, args: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        setups = _setup(args.width, args.layers, args.batch, rank, world)
        times: dict[str, list[float]] = {n: [] for n in OPTIMIZERS}
        for i in range(args.warmup + args.steps):
            order = OPTIMIZERS[i % len(OPTIMIZERS):] + OPTIMIZERS[:i % len(OPTIMIZERS)]
            for name in order:  # every rank the same order: the steps are collectives
                dt = _step(name, setups[name][1])
                if i >= args.warmup:
                    times[name].append(dt)
        res = {n: {"step_ms_median": 1e3 * statistics.median(times[n]),
                   "state_bytes": state_bytes(setups[n][1])} for n in OPTIMIZERS}
        params = sum(p.numel() for p in setups["torch_adamw"][0].parameters())
        torch.save({"rank": rank, "results": res, "params": params}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(world, str(Path(tmp) / "store"), args, tmp), nprocs=world, join=True)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
    per_rank = [r["results"] for r in ranks]
    out: dict[str, Any] = {"params": ranks[0]["params"], "per_rank": per_rank, "optimizers": {}}
    base = max(r["torch_adamw"]["step_ms_median"] for r in per_rank)
    base_state = max(r["torch_adamw"]["state_bytes"] for r in per_rank)
    for n in OPTIMIZERS:
        slow = max(r[n]["step_ms_median"] for r in per_rank)
        state = max(r[n]["state_bytes"] for r in per_rank)
        out["optimizers"][n] = {"step_ms_slowest_rank": slow, "state_bytes_max_rank": state,
                                "step_ratio_vs_torch_adamw": slow / base,
                                "state_ratio_vs_torch_adamw": state / base_state}
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = sorted(report["worlds"], key=int)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for n in OPTIMIZERS:
        axes[0].plot([int(w) for w in worlds],
                     [report["worlds"][w]["optimizers"][n]["state_bytes_max_rank"] / 2**20 for w in worlds],
                     marker="o", label=n)
        axes[1].plot([int(w) for w in worlds],
                     [report["worlds"][w]["optimizers"][n]["step_ms_slowest_rank"] for w in worlds],
                     marker="o", label=n)
    axes[0].set(xlabel="ranks (W)", ylabel="optimizer state per rank (MiB)", title="state per rank")
    axes[1].set(xlabel="ranks (W)", ylabel="step (ms, slowest rank's median)", title="optimizer step")
    for ax in axes:
        ax.set_xticks([int(w) for w in worlds])
        ax.legend()
    fig.suptitle(f"FSDP2 fully_shard MLP, {report['params'] / 1e6:.2f}M parameters, gloo CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--eager", action="store_true", help="SOAA's eager torch update (LIGHTNING_SOAA_COMPILE=0)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.eager:
        os.environ["LIGHTNING_SOAA_COMPILE"] = "0"  # inherited by the spawned ranks
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(args).items() if k != "out"}  # no local paths in the JSON
    report: dict[str, Any] = {"machine": platform.platform(), "torch": torch.__version__,
                              "cpus": os.cpu_count(), "args": settings, "worlds": {}}
    for w in args.worlds:
        report["worlds"][str(w)] = run_world(w, args)
        report["params"] = report["worlds"][str(w)]["params"]
        for n, r in report["worlds"][str(w)]["optimizers"].items():
            log.info("W=%d %-14s state/rank %7.2f MiB (%.2fx AdamW)  step %8.2f ms (%.2fx AdamW)", w, n,
                     r["state_bytes_max_rank"] / 2**20, r["state_ratio_vs_torch_adamw"],
                     r["step_ms_slowest_rank"], r["step_ratio_vs_torch_adamw"])
    (args.out / "bench_fsdp2.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "bench_fsdp2.png")


if __name__ == "__main__":
    main()
