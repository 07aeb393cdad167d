"""Optimizer state per rank vs world size: 10 equal fp32 matrices, W = 1, 2, 4 gloo processes.

Each rank builds the optimizer over the same parameters, takes one step with the same gradients, and
reports the bytes of the tensors in its ``optimizer.state`` (owned blocks only). The figure is the
largest rank's bytes at W divided by the bytes at W = 1 (ideal: 1/W). Elementwise optimizers (SOAA,
ShardedAdamW) cut parameters larger than ``max_block_numel`` into row blocks (by default about 8 blocks
per rank over the model, at least 2**18 elements each, so it depends on W); ASGO/DASGO own whole
matrices (or ASGO's ``max_block_size`` blocks), so 10 matrices over 4 ranks give 3/10 at best.

Usage::

    python benchmarks/bench_state_per_rank.py                  # ~1 minute on 2 cores
    python benchmarks/bench_state_per_rank.py --rows 1000 --cols 1000 --max-block-numel 262144

Writes ``benchmarks/results/state_per_rank.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_soaa import ASGO, DASGO, SOAA, ShardedAdamW

log = logging.getLogger("bench_state_per_rank")
OPTIMIZERS = ("AdamW", "SOAA", "DASGO", "ASGO")


def _build(name: str, params: list[torch.Tensor], max_block_numel: int | None) -> Any:
    if name == "AdamW":
        return ShardedAdamW(params, lr=1e-3, max_block_numel=max_block_numel)
    if name == "SOAA":  # the block size is a param-group option for every elementwise optimizer
        return SOAA([{"params": params, "max_block_numel": max_block_numel}], lr=1e-3, compile=False)
    named = [(f"w{i}", p) for i, p in enumerate(params)]  # matrices by name: no "routed by shape" warning
    if name == "DASGO":
        return DASGO(named, lr=1e-2)
    return ASGO(named, lr=1e-2)


def _state_bytes(opt: Any) -> int:
    total = 0
    for st in opt.state.values():
        for v in st.values():
            for t in (v.values() if isinstance(v, dict) else [v]):
                if torch.is_tensor(t):
                    total += t.numel() * t.element_size()
    return total


def _measure(args: argparse.Namespace) -> dict[str, int]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name in args.optimizers:
        params = [torch.nn.Parameter(torch.randn(args.rows, args.cols, generator=gen)) for _ in range(args.n)]
        opt = _build(name, params, args.max_block_numel)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        if name == "SOAA":
            opt.step(loss=1.0)
        else:
            opt.step()
        out[name] = _state_bytes(opt)
        del opt, params
    return out


def _worker(rank: int, world: int, store: str, args: argparse.Namespace, q: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        q.put((rank, _measure(args)))
    finally:
        dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> list[dict[str, int]]:
    if world == 1:
        return [_measure(args)]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_worker, args=(r, world, os.path.join(d, "store"), args, q))
                 for r in range(world)]
        for p in procs:
            p.start()
        got = dict(q.get(timeout=600) for _ in procs)
        for p in procs:
            p.join()
    return [got[r] for r in range(world)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--cols", type=int, default=1000)
    p.add_argument("--max-block-numel", type=int, default=None,
                   help="SOAA's and ShardedAdamW's block size (default: theirs, about 8 blocks per rank)")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    per_world = {w: run_world(w, args) for w in args.worlds}
    config = {k: str(v) for k, v in vars(args).items() if k != "out"}  # no path of this machine
    report: dict[str, Any] = {"benchmark": "state_per_rank", "config": config,
                              "bytes_per_rank": {}, "max_rank_over_w1": {}}
    for name in args.optimizers:
        base = per_world[1][0][name] if 1 in per_world else None
        report["bytes_per_rank"][name] = {w: [r[name] for r in ranks] for w, ranks in per_world.items()}
        if base:
            report["max_rank_over_w1"][name] = {w: max(r[name] for r in ranks) / base
                                                for w, ranks in per_world.items()}
            log.info("%-6s W=1 %.1f MiB; max rank / W=1: %s", name, base / 2**20,
                     {w: round(v, 3) for w, v in report["max_rank_over_w1"][name].items()})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "state_per_rank.json").write_text(json.dumps(report, indent=2))
    log.info("wrote %s", args.out / "state_per_rank.json")


if __name__ == "__main__":
    main()
