#!/usr/bin/env python
"""Plain torch.distributed training with lightning-soaa optimizers, under any launcher.

The same script runs as

    python train.py --optimizer soaa                                # one process
    torchrun --nproc_per_node=2 train.py --optimizer soaa           # torchrun (one or more nodes)
    mpirun -np 2 python train.py --optimizer soaa                   # Open MPI / MPICH
    srun -N2 --ntasks-per-node=1 python train.py --optimizer soaa   # SLURM

:func:`lightning_soaa.distributed.launch.init_from_env` reads the launcher's variables and joins the
process group (gloo on CPU, NCCL on GPU). Every step draws the same *global* batch on every rank and each
rank trains on its contiguous slice, so a run on W ranks follows the single-process run on the whole
batch (up to float rounding): the tests in ``tests/multinode`` check exactly that.

Each rank writes ``result_rank{R}.json`` (losses, timings, launcher facts) and ``params_rank{R}.pt`` (the
final model ``state_dict``) under ``--out-dir``; rank 0 also prints its JSON on one stdout line.

``--optimizer soaa,egn`` (or ``all``: every optimizer of the registry) trains several optimizers one after
the other in the same process group, each on a fresh model with the same seed and data: every result is
bit-identical to a process that trains that optimizer alone, while the launch (interpreter, imports,
rendezvous) is paid once. Each optimizer's files then go to ``--out-dir/<name>/``, one JSON line each.

Fault tolerance (``torchrun --max-restarts=K``): with ``--checkpoint-dir`` rank 0 writes a checkpoint every
``--checkpoint-every`` steps (model, the consolidated optimizer state, the step counter, the losses so far,
each rank's RNG state), atomically; a restarted run resumes from the latest one and ends bit-identical to
an uninterrupted run (with DDP at W >= 3: equal to rounding, since DDP's buckets change after a restart).
``--fail-at-step N`` makes ``--fail-rank`` die hard after N steps on the first
attempt only (``TORCHELASTIC_RESTART_COUNT`` unset or 0), to try it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_soaa import registry
from lightning_soaa.distributed.launch import LaunchInfo, exit_without_teardown, init_from_env
from lightning_soaa.registry import OptimizerSpec, StepNeeds

log = logging.getLogger("train")

OPTIMIZERS = tuple(n.lower() for n in registry.names())
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", dest="optimizers", type=optimizer_names, default="adamw",
                   metavar="NAME[,NAME...]|all",
                   help=f"one of {', '.join(OPTIMIZERS)}; several comma-separated, or all, train one after "
                        "the other in this process")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global-batch", type=int, default=32, help="samples per step over all ranks")
    p.add_argument("--lr", type=float, default=None, help="default: the optimizer's own default (AdamW 1e-2)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grad-sync", choices=("ddp", "optimizer"), default="ddp",
                   help="ddp: DistributedDataParallel averages gradients; optimizer: the optimizer "
                        "reduce-scatters them to the owning ranks (grad_reduction='mean')")
    p.add_argument("--backend", choices=("gloo", "nccl"), default=None, help="default: nccl if CUDA, else gloo")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda:LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    p.add_argument("--out-dir", type=Path, default=None, help="where each rank writes its JSON and params")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="write checkpoints here and resume from the latest one (a directory every rank can "
                        "read: shared storage on several nodes)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: never)")
    p.add_argument("--fail-at-step", type=int, default=None,
                   help="simulate a crash: --fail-rank exits hard after this many steps, first attempt only")
    p.add_argument("--fail-rank", type=int, default=-1, help="the rank that crashes (default: the last)")
    args = p.parse_args(argv)
    if args.checkpoint_every < 0:
        p.error(f"Invalid --checkpoint-every={args.checkpoint_every}. Must be >= 0.")
    if args.checkpoint_every and args.checkpoint_dir is None:
        p.error("--checkpoint-every needs --checkpoint-dir")
    if len(args.optimizers) > 1:
        # a checkpoint, a simulated crash and the restart that resumes it belong to one training run
        for flag, value in (("--checkpoint-dir", args.checkpoint_dir), ("--fail-at-step", args.fail_at_step)):
            if value is not None:
                p.error(f"Invalid {flag}={value} with --optimizer={','.join(args.optimizers)}: fault tolerance "
                        f"is per run. Give {flag} with one optimizer only.")
    return args


def optimizer_names(value: str) -> list[str]:
    """``--optimizer``'s value: one name, several comma-separated, or ``all`` (the registry's order)."""
    if value.strip().lower() == "all":
        return list(OPTIMIZERS)
    names = [n.strip().lower() for n in value.split(",")]
    for n in names:
        if n not in OPTIMIZERS:
            raise argparse.ArgumentTypeError(f"invalid value {value!r}: {n!r} is not an optimizer. Must be one "
                                             f"or more of {', '.join(OPTIMIZERS)} (comma-separated), or all.")
    if len(set(names)) < len(names):  # the second run would overwrite the first one's files
        raise argparse.ArgumentTypeError(f"invalid value {value!r}: a name is repeated. Must name each "
                                         "optimizer at most once.")
    return names


def for_optimizer(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """The arguments of one optimizer's run (``args.optimizer``), as if it had been the only one named."""
    return argparse.Namespace(**{**vars(args), "optimizer": name})


def run_out_dir(args: argparse.Namespace, name: str) -> Path | None:
    """Where ``name``'s files go: ``--out-dir`` itself for a single optimizer (the layout every recipe and
    document expects), ``--out-dir/<name>`` when several share the process."""
    if args.out_dir is None or len(args.optimizers) == 1:
        return args.out_dir
    return args.out_dir / name


# ---------------------------------------------------------------------------------------- model and data
IN_DIM, OUT_DIM = 8, 4


def make_model(hidden: int, seed: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(seed)  # identical initial weights on every rank, no broadcast needed
    return nn.Sequential(
        nn.Linear(IN_DIM, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, OUT_DIM)
    ).to(dtype)


def global_batch(step: int, size: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic regression batch: a fixed random teacher network plus a little noise."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 7919)
    w1 = torch.randn(IN_DIM, 16, generator=g, dtype=torch.float64)
    w2 = torch.randn(16, OUT_DIM, generator=g, dtype=torch.float64) / 4.0
    g.manual_seed(seed * 1_000_003 + 1 + step)
    x = torch.randn(size, IN_DIM, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ w1) @ w2 + 0.01 * torch.randn(size, OUT_DIM, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def local_slice(global_size: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous share ``[start, stop)`` of the global batch."""
    n = global_size // world
    return rank * n, (rank + 1) * n


# ---------------------------------------------------------------------------------------- optimizers
def make_optimizer(spec: OptimizerSpec, model: nn.Module, args: argparse.Namespace) -> Any:
    """Build the optimizer the registry describes (its module is imported only now)."""
    kw: dict[str, Any] = {"lr": 1e-2} if spec.name == "AdamW" else {}  # AdamW's default 1e-3 is slow here
    if args.lr is not None:
        kw["lr"] = args.lr
    if spec.horizon_kwarg:
        kw[spec.horizon_kwarg] = args.steps
    if spec.needs is not StepNeeds.BATCH and getattr(args, "grad_sync", "ddp") == "optimizer":
        kw["grad_reduction"] = "mean"
    return spec.build(model, **kw)


def loss_of(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y)


def global_mean(value: torch.Tensor, world: int) -> float:
    """The loss averaged over ranks (equal local batch sizes), for logging only."""
    v = value.detach().to(torch.float64).reshape(1).clone()
    if world > 1:
        dist.all_reduce(v)
        v /= world
    return float(v.item())


# ---------------------------------------------------------------------------------------- checkpoints
CKPT_PREFIX = "step_"


def restart_count() -> int:
    """Which torchrun attempt this is (0: the first; also when not launched by torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def latest_checkpoint_step(ckpt_dir: Path | None, world: int) -> int:
    """The step of the newest complete checkpoint, agreed by every rank (rank 0's listing wins, so ranks
    never resume from different steps); 0 when there is none or no ``--checkpoint-dir`` (no collective
    then: every rank has the same arguments)."""
    if ckpt_dir is None:
        return 0
    step = 0
    if ckpt_dir.is_dir():
        # only finished files: a save is a write to a temporary name and an atomic rename
        steps = [int(f.stem[len(CKPT_PREFIX):]) for f in ckpt_dir.glob(f"{CKPT_PREFIX}*.pt")
                 if f.stem[len(CKPT_PREFIX):].isdigit()]
        step = max(steps, default=0)
    if world > 1:
        box = [step]
        dist.broadcast_object_list(box, src=0)  # on the current device under NCCL, on the CPU under gloo
        step = int(box[0])
    return step


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"{CKPT_PREFIX}{step:08d}.pt"


def rng_state() -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save_checkpoint(ckpt_dir: Path, step: int, model: nn.Module, opt: Any, losses: list[float], world: int,
                    rank: int) -> None:
    """Collective: consolidate the sharded optimizer state and every rank's RNG state onto rank 0, which
    writes ``step_<step>.pt`` atomically (a crash mid-write leaves the previous checkpoint the latest)."""
    if hasattr(opt, "consolidate_state_dict"):
        opt.consolidate_state_dict(to=0)
    rngs: list[Any] = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if rank != 0:
        return
    state = {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(), "losses": list(losses),
             "rng": rngs, "world_size": world}
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(ckpt_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename: after a power loss the newest name must not be truncated
    os.replace(tmp, final)
    try:  # the rename itself (some filesystems refuse a directory's fsync: the checkpoint is in place anyway)
        dir_fd = os.open(ckpt_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        log.debug("fsync of %s failed (%s); the rename stands", ckpt_dir, err)
    log.info("checkpoint after step %d: %s", step, final)


def load_checkpoint(ckpt_dir: Path, step: int, model: nn.Module, opt: Any, rank: int, world: int) -> list[float]:
    """Restore model, optimizer, RNG state; return the losses logged before ``step``."""
    path = checkpoint_path(ckpt_dir, step)
    if not path.is_file():
        raise FileNotFoundError(f"rank {rank}: checkpoint {path} (chosen by rank 0) is not readable here; "
                                "--checkpoint-dir must be shared by every rank")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if state["world_size"] == world:  # another world size: each rank keeps its fresh RNG stream
        torch.set_rng_state(state["rng"][rank]["cpu"])
        if state["rng"][rank]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"][rank]["cuda"])
    log.info("resumed from %s (attempt %d)", path, restart_count())
    return list(state["losses"])


def maybe_crash(args: argparse.Namespace, step: int, rank: int, world: int) -> None:
    """``--fail-at-step``: die without any cleanup, like a killed or segfaulted worker, first attempt only."""
    if args.fail_at_step is None:
        return
    if not -world <= args.fail_rank < world:
        raise ValueError(f"Invalid --fail-rank={args.fail_rank}. Must be in [{-world}, {world}).")
    fail_rank = args.fail_rank % world
    if args.fail_at_step == step and rank == fail_rank and restart_count() == 0:
        log.error("simulated crash of rank %d after %d steps (--fail-at-step)", rank, step)
        logging.shutdown()
        os._exit(17)


# ---------------------------------------------------------------------------------------- training
def train(args: argparse.Namespace, info: LaunchInfo) -> dict[str, Any]:
    rank, world = info.rank, info.world_size
    t_run = time.perf_counter()
    if args.global_batch % world:
        raise ValueError(f"Invalid --global-batch={args.global_batch}. Must be divisible by the world size {world}.")
    dtype = DTYPES[args.dtype]
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", info.local_rank) if cuda else torch.device("cpu")
    model = make_model(args.hidden, args.seed, dtype).to(device)
    spec = registry.get(args.optimizer)
    # An optimizer that takes the batch (EGN) forms its own Jacobians and Gram matrix across ranks: it
    # gets the bare module, no DDP.
    use_ddp = world > 1 and args.grad_sync == "ddp" and spec.needs is not StepNeeds.BATCH
    net: nn.Module = model
    if use_ddp:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = make_optimizer(spec, model, args)
    first = latest_checkpoint_step(args.checkpoint_dir, world)
    losses: list[float] = []
    if first:
        # the model's tensors are loaded in place, so DDP's and the optimizer's references stay valid
        losses = load_checkpoint(args.checkpoint_dir, first, model, opt, rank, world)

    start, stop = local_slice(args.global_batch, rank, world)
    step_times: list[float] = []
    for step in range(first, args.steps):
        maybe_crash(args, step, rank, world)
        x, y = global_batch(step, args.global_batch, args.seed, dtype)
        x, y = x[start:stop].to(device), y[start:stop].to(device)
        t0 = time.perf_counter()
        loss = spec.take_step(opt, net, x, y, loss_of)  # the step as the registry says to call it
        step_times.append(time.perf_counter() - t0)
        losses.append(global_mean(loss, world))
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            save_checkpoint(args.checkpoint_dir, step + 1, model, opt, losses, world, rank)

    stats = opt.statistics() if hasattr(opt, "statistics") else {}
    return {
        "launcher": info.launcher,
        "rank": rank,
        "world_size": world,
        "local_rank": info.local_rank,
        "node_rank": info.node_rank,
        "hostname": socket.gethostname(),
        "device": str(device),
        "slurm_nodename": os.environ.get("SLURMD_NODENAME"),
        "optimizer": args.optimizer,
        # what synchronised the gradients: EGN (the batch's Gram across ranks) takes neither DDP nor the optimizer's
        "grad_sync": ("ddp" if use_ddp else "none" if world == 1 or spec.needs is StepNeeds.BATCH
                      else args.grad_sync),
        "steps": args.steps,
        "global_batch": args.global_batch,
        "local_samples": [start, stop],
        "restart_count": restart_count(),
        "resumed_from_step": first,
        "losses": losses,
        "final_loss": losses[-1] if losses else None,
        "mean_step_s": sum(step_times) / max(len(step_times), 1),
        "train_s": time.perf_counter() - t_run,
        "statistics": {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))},
        "params": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # ranks sharing a node should not oversubscribe its cores
    t0 = time.perf_counter()
    info = init_from_env(args.backend)
    ok = False
    try:
        # One process group for every optimizer named: starting the processes and joining the group costs
        # seconds, the runs milliseconds. Each run builds its own model, DDP wrapper and optimizer.
        results = [train(for_optimizer(args, name), info) for name in args.optimizers]
        ok = True
    finally:
        # Without this, mpirun runs that succeeded can abort at exit (seen with Open MPI 4.1). The
        # barrier (success path only: after a failure the peers may never arrive) keeps a fast rank from
        # tearing down its gloo pairs while a peer still uses them; once, without it, a torchrun rank
        # aborted at exit ("terminate called without an active exception") after training finished.
        if dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()
    wall_s = time.perf_counter() - t0
    for result in results:
        write_result(result, run_out_dir(args, result["optimizer"]), info.rank, wall_s)
    return 0


def write_result(result: dict[str, Any], out_dir: Path | None, rank: int, wall_s: float) -> None:
    """Save the final parameters and the JSON (``wall_s``: the whole process, shared by every optimizer
    it trained; ``train_s``: this optimizer's run); rank 0 prints the JSON on one stdout line."""
    params = result.pop("params")
    result["wall_s"] = wall_s
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(params, out_dir / f"params_rank{rank}.pt")
        (out_dir / f"result_rank{rank}.json").write_text(json.dumps(result, indent=1))
    if rank == 0:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    exit_without_teardown(main())  # a gloo rank can abort in interpreter teardown after a finished run
