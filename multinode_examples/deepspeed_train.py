#!/usr/bin/env python
"""Train a small digits classifier with a lightning_soaa optimizer under the DeepSpeed launcher.

The optimizer and ZeRO stage come from an ordinary DeepSpeed JSON (``configs/deepspeed/*.json``)::

    deepspeed --num_gpus 2 multinode_examples/deepspeed_train.py \\
        --deepspeed_config configs/deepspeed/soaa_zero2.json
    deepspeed --num_gpus 2 multinode_examples/deepspeed_train.py \\
        --deepspeed_config configs/deepspeed/asgo_zero3.json --steps 50
    deepspeed --num_gpus 2 multinode_examples/deepspeed_train.py \
        --deepspeed_config configs/deepspeed/egn_zero0.json        # EGN: stage 0, fp32
    # more nodes: deepspeed --hostfile hosts --num_nodes 2 ... (or --launcher slurm)

On a machine without GPUs DeepSpeed picks its CPU accelerator and gloo, and ``--num_gpus N`` starts N
processes. ``deepspeed_ext.initialize`` builds the optimizer named in the JSON (``"type":
"lightning_soaa.SOAA"``), and ``engine.backward(loss)`` also hands the loss to SOAA's trust region.

Data: scikit-learn's bundled ``load_digits`` (1797 8x8 images, nothing downloaded), standardized; every
rank trains on its own slice of each global batch. Each rank writes ``result_rank{R}.json`` (losses,
optimizer statistics, timings) under ``--out-dir``; rank 0 logs a summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_soaa.distributed.teardown import install_exit_drain
from lightning_soaa.registry import StepNeeds, spec_of

log = logging.getLogger("deepspeed_train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON naming the optimizer")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", "0")),
                   help="set by the deepspeed launcher")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="deepspeed_run")
    p.add_argument("--save-checkpoint", action="store_true", help="engine.save_checkpoint at the end")
    p.add_argument("--skip-shm-op", action="store_true",
                   help="do not JIT-compile DeepSpeed's CPU shm op (inference-only; saves ~30 s on first use)")
    return p.parse_args(argv)


def load_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm], torch.tensor(y, dtype=torch.long)[perm]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import deepspeed_ext

    if args.skip_shm_op:
        deepspeed_ext.skip_shm_comm_op()
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 10))
    engine, _, _, _ = deepspeed_ext.initialize(model=model, config=args.deepspeed_config, args=args)
    rank, world = engine.global_rank, engine.world_size
    micro = engine.train_micro_batch_size_per_gpu()
    dtype = next(p for p in engine.module.parameters()).dtype if engine.zero_optimization_stage() < 3 else (
        torch.bfloat16 if engine.bfloat16_enabled() else torch.float32)
    x, y = load_data(args.seed)
    client = deepspeed_ext.find_client_optimizer(engine.optimizer)
    spec = spec_of(client.optimizer_cls) if client else None
    needs = spec.needs if spec else StepNeeds.NOTHING
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        for micro_step in range(engine.gradient_accumulation_steps()):
            start = ((step * engine.gradient_accumulation_steps() + micro_step) * world + rank) * micro % len(x)
            xb, yb = x[start:start + micro], y[start:start + micro]
            if needs is StepNeeds.BATCH:  # EGN (ZeRO stage 0) works on the batch itself
                client.set_batch(xb.to(dtype), yb)
            loss = F.cross_entropy(engine(xb.to(dtype)).float(), yb)
            engine.backward(loss)
            engine.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    if args.save_checkpoint:
        engine.save_checkpoint(os.path.join(args.out_dir, "checkpoint"), tag=f"step{args.steps}")
    result = {
        "rank": rank, "world_size": world, "zero_stage": engine.zero_optimization_stage(),
        "optimizer": client.optimizer_cls.__name__ if client else type(engine.optimizer).__name__,
        "deepspeed_optimizer": type(engine.optimizer).__name__, "losses": losses, "train_seconds": seconds,
        "statistics": client.statistics() if client else {},
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"result_rank{rank}.json").write_text(json.dumps(result))
    if rank == 0:
        log.info("%s ZeRO-%d on %d ranks: loss %.4f -> %.4f in %d steps (%.2f s)", result["optimizer"],
                 result["zero_stage"], world, losses[0], losses[-1], args.steps, seconds)
    return result


if __name__ == "__main__":
    # DeepSpeed makes the process group: let gloo's workers finish with Python before the interpreter
    # exits, or a rank can abort after a finished run (lightning_soaa.distributed.teardown)
    install_exit_drain()
    main()
    # A clean shutdown: every rank arrives, then the process group is torn down before exit.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
