#!/usr/bin/env python
"""The same regression task as ``train.py``, trained by a Lightning ``Trainer`` with our optimizers.

    python train_lightning.py --optimizer soaa                                  # one process
    srun -N2 --ntasks-per-node=1 python train_lightning.py --num-nodes 2 --devices 1   # SLURM (see
                                                                               # slurm_lightning.sbatch)

Lightning finds its ranks itself (``SLURMEnvironment`` under srun, ``TorchElasticEnvironment`` under
torchrun, ``MPIEnvironment`` under mpirun with mpi4py installed). Under SLURM, ``--ntasks-per-node``
must equal ``--devices`` and ``--num-nodes`` the number of nodes: Lightning rejects ``--ntasks`` alone.

The dataset is the concatenation of ``train.py``'s global batches and every rank reads its contiguous
slice of each step's batch (an explicit sampler built once the ranks are known, so Lightning's own
``DistributedSampler`` is switched off), exactly as ``train.py`` does: a W-rank run follows the
single-process one. Each rank writes ``result_rank{R}.json`` and
``params_rank{R}.pt`` like ``train.py``.

``--optimizer soaa,egn`` (or ``all``) fits one ``Trainer`` per optimizer in turn, in the same process:
under DDP the later Trainers reuse the process group the first one joined (Lightning does not destroy it
after ``fit``). Files then go to ``--out-dir/<name>/``, as with ``train.py``.

Preemption (``slurm_lightning.sbatch`` asks SLURM for ``SIGUSR1`` 90 s before the time limit and makes the
job requeueable): :class:`~lightning_soaa.lightning.PreemptionCheckpoint` saves ``hpc_ckpt_N.ckpt`` in
``--root-dir`` (``./lightning-<SLURM_JOB_ID>``) on every rank at the next step and requeues the job; the
restarted job resumes from it (Lightning's SLURM restart) and, since each step's data is taken from the
step's number, continues exactly as the uninterrupted run would have. A preempted process writes no
results.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the example's own train.py, also when copied
from train import (  # noqa: E402
    DTYPES,
    OPTIMIZERS,
    for_optimizer,
    global_batch,
    local_slice,
    loss_of,
    make_model,
    make_optimizer,
    optimizer_names,
    run_out_dir,
    write_result,
)

from lightning_soaa import registry  # noqa: E402
from lightning_soaa.distributed.launch import exit_without_teardown  # noqa: E402
from lightning_soaa.lightning import PreemptionCheckpoint  # noqa: E402
from lightning_soaa.registry import StepNeeds  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", dest="optimizers", type=optimizer_names, default="adamw",
                   metavar="NAME[,NAME...]|all",
                   help=f"one of {', '.join(OPTIMIZERS)}; several comma-separated, or all, fit one after the "
                        "other in this process")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-nodes", type=int, default=int(os.environ.get("SLURM_NNODES", "1")))
    p.add_argument("--devices", type=int, default=1, help="processes per node (= --ntasks-per-node)")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=None)
    # per SLURM job (its id survives a requeue): a later job started from the same directory must not
    # resume from this one's preemption checkpoint (Lightning resumes from any hpc_ckpt_N.ckpt it finds there)
    job = os.environ.get("SLURM_JOB_ID")
    p.add_argument("--root-dir", type=Path, default=Path.cwd() / f"lightning-{job}" if job else Path.cwd(),
                   help="the Trainer's default_root_dir, where preemption checkpoints go and a SLURM restart finds "
                        "them (default: ./lightning-<SLURM_JOB_ID> under SLURM, else .; <root-dir>/<name> when "
                        "several optimizers share the process)")
    return p.parse_args(argv)


class Regression(pl.LightningModule):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.net = make_model(args.hidden, args.seed, DTYPES[args.dtype])
        # EGN solves its own Gauss-Newton system from inputs and targets: it runs in manual optimization.
        self.automatic_optimization = registry.get(args.optimizer).needs is not StepNeeds.BATCH
        self.losses: list[float] = []
        xs, ys = zip(*(global_batch(s, args.global_batch, args.seed, DTYPES[args.dtype]) for s in range(args.steps)))
        self.data = TensorDataset(torch.cat(xs), torch.cat(ys))

    def train_dataloader(self) -> DataLoader:
        # Called after the process group exists, so the rank is known: step s of rank r reads samples
        # [s*B + r*B/W, s*B + (r+1)*B/W), the same slice train.py takes.
        world, rank, b = self.trainer.world_size, self.trainer.global_rank, self.args.global_batch
        local = self.local_samples = local_slice(b, rank, world)
        # Built after a resumed fit loaded its checkpoint: the data of step s is step s's, however many times
        # the run was preempted. The loader keeps its length (Lightning ends the resumed epoch after its
        # length minus the batches already done), so the steps before `start` go last, never reached.
        start = self.start_step = self.trainer.global_step
        steps = [*range(start, self.args.steps), *range(start)]
        order = [s * b + i for s in steps for i in range(*local)]
        return DataLoader(self.data, batch_size=local[1] - local[0], sampler=order, shuffle=False)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        if self.automatic_optimization:
            loss = loss_of(self.net(x), y)
        else:
            with torch.no_grad():
                loss = loss_of(self.net(x), y)
            self.optimizers().step(inputs=x, targets=y)  # through Lightning's wrapper: counted in global_step
        # the global mean loss, logged identically on every rank
        self.losses.append(float(self.all_gather(loss.detach()).mean()))
        return loss if self.automatic_optimization else None

    def on_train_start(self) -> None:
        sys.stderr.write(f"rank {self.trainer.global_rank}: fitting {self.args.optimizer} from step "
                         f"{self.trainer.global_step} of {self.args.steps}\n")
        sys.stderr.flush()

    def configure_optimizers(self) -> Any:
        # train.py's recipe (the registry's entry, with its horizon and lr); SOAA gets Lightning's closure.
        return make_optimizer(registry.get(self.args.optimizer), self.net, self.args)


def fit(args: argparse.Namespace, world: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One optimizer's run (``args.optimizer``): a fresh model and Trainer; its result and final params."""
    t0 = time.perf_counter()
    model = Regression(args)
    preemption = PreemptionCheckpoint()  # inactive outside SLURM auto-requeue
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
        strategy="ddp" if world > 1 else "auto", max_steps=args.steps, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=[preemption],
        default_root_dir=args.root_dir if len(args.optimizers) == 1 else args.root_dir / args.optimizer,
    )
    trainer.fit(model)
    if preemption.preempted:
        return None
    opt = trainer.optimizers[0]
    result = {
        "launcher": type(trainer.strategy.cluster_environment).__name__ if world > 1 else "single",
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "node_rank": trainer.node_rank,
        "slurm_nodename": os.environ.get("SLURMD_NODENAME"),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "start_step": model.start_step,  # > 0: resumed from a preemption checkpoint
        "optimizer": args.optimizer,
        "steps": trainer.global_step,
        "global_batch": args.global_batch,
        "local_samples": list(model.local_samples),
        "losses": model.losses,
        "statistics": {k: float(v) for k, v in getattr(opt, "statistics", dict)().items()
                       if isinstance(v, (int, float))},
        "train_s": time.perf_counter() - t0,
    }
    return result, {k: v.detach().cpu() for k, v in model.net.state_dict().items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    world = args.num_nodes * args.devices
    if args.global_batch % world:
        raise ValueError(f"Invalid --global-batch={args.global_batch}. Must be divisible by {world} processes.")
    runs = []
    for name in args.optimizers:
        run = fit(for_optimizer(args, name), world)
        if run is None:  # preempted: the checkpoint is written, the job requeued; the restart continues
            return 0
        runs.append(run)
    wall_s = time.perf_counter() - t0  # the whole process, shared by every optimizer it fitted
    for result, params in runs:
        write_result({**result, "params": params}, run_out_dir(args, result["optimizer"]), result["rank"], wall_s)
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())  # a gloo rank can abort in interpreter teardown after a finished run
