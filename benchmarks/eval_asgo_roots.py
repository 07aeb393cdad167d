"""Which way of computing ASGO's inverse root is cheapest at equal quality? (An evaluation.)

Candidates, all for the same matrix function (the default 10-iteration Polar Express map, see
``lightning_soaa.functional.linalg``) unless marked:

* ``polar_express``: the coupled matmul iteration, in float32 on a float32 Gram (37 k x k matmuls);
* ``polar_express_eigh``: one float64 eigendecomposition, the scalar map applied to the eigenvalues
  (what ``inverse_root="auto"``, the default, runs for float32 Grams on a CPU);
* ``polar_express_eigh_fp32``: the same with a float32 eigendecomposition (not offered: inaccurate);
* ``eigh`` (a different function: the float64 pseudo-inverse root, no implicit damping).

On the Grams and momenta of a real ASGO run (the ``bench_asgo.py`` transformer, d=256, 2 layers, 12
blocks of k=256, trained on the pydoc topic texts, as ``eval_asgo_warm_start.py``) it reports:

* accuracy: the error of the update direction ``P M / ||P M||`` against the float64 reference of the
  same function (float64 eigh + the map), per block, each method on the float32 Gram;
* sensitivity (what decides whether W ranks reproduce one process): the change of that direction when
  ``V`` is perturbed at rounding level (``V + E``, ``E`` symmetric with ``||E||_F = 1e-16 ||V||_F``), each
  method on the float64 Gram;
* CPU time (1 thread) of the batched roots of one step, and the spectrum (condition numbers);
* training quality: the same model trained with each root for ``--train-steps`` steps on 90% of the
  text (same seeds, same batches), mean training loss of the last 20 steps and the loss on the held-out
  10% (``--val-batches`` fixed batches), per seed.

Usage::

    python benchmarks/eval_asgo_roots.py      # ~2-3 minutes on a 2-core CPU (1 thread)

Writes ``benchmarks/results/eval_asgo_roots.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

import torch
from bench_asgo import (  # sibling scripts: run this file as benchmarks/eval_asgo_roots.py
    TinyGPT,
    add_output_args,
    start,
    write_json,
)
from eval_asgo_warm_start import _cond, add_run_args, collect, cpu_ms, direction_error, summary
from torch.nn import functional as F

from lightning_soaa import ASGO
from lightning_soaa.functional.linalg import POLAR_EXPRESS_COEFFS, coupled_scalar_map, inverse_sqrt
from lightning_soaa.lightning.demo.data import topics_text, topics_vocab
from lightning_soaa.optim.asgo import asgo_param_groups

log = logging.getLogger("eval_asgo_roots")

METHODS = ("polar_express", "polar_express_eigh", "polar_express_eigh_fp32", "eigh")


def root(v: torch.Tensor, method: str) -> torch.Tensor:
    if method == "polar_express_eigh_fp32":
        return inv_sqrt_spectral_fp32(v)
    return inverse_sqrt(v, method)


def inv_sqrt_spectral_fp32(v: torch.Tensor) -> torch.Tensor:
    """The default map on the eigenvalues of a float32 eigendecomposition (evaluated, not offered)."""
    s = 1.01 * torch.linalg.matrix_norm(v.double() + 1e-10 * torch.eye(v.shape[-1], dtype=torch.float64))
    evals, evecs = torch.linalg.eigh(v.float())
    z = coupled_scalar_map(evals.double() / s.unsqueeze(-1), POLAR_EXPRESS_COEFFS, 10) / s.sqrt().unsqueeze(-1)
    return (evecs.double() * z.unsqueeze(-2)) @ evecs.double().mT


def reference(v: torch.Tensor) -> torch.Tensor:
    """The default map evaluated in float64 (float64 eigh: accurate to ~1e-16 ||V||)."""
    return inverse_sqrt(v.double(), "polar_express_eigh").double()


def sensitivity(v: torch.Tensor, moms: list[torch.Tensor], method: str, rel: float, seed: int) -> list[float]:
    """Direction change per block under a symmetric rounding-level perturbation of ``V`` (float64)."""
    v = v.double()
    gen = torch.Generator().manual_seed(seed)
    e = torch.randn(v.shape, generator=gen, dtype=torch.float64)
    e = 0.5 * (e + e.mT)
    e = e * (rel * torch.linalg.matrix_norm(v) / torch.linalg.matrix_norm(e)).reshape(-1, 1, 1)
    return direction_error(root(v + e, method), root(v, method), moms)


def train_quality(args: argparse.Namespace, method: str, seed: int) -> dict[str, float]:
    """Train ASGO (defaults but ``inverse_root=method``) on 90% of the text; losses as in the module doc."""
    torch.manual_seed(seed)
    vocab = topics_vocab()
    ids = torch.tensor([vocab.index(c) for c in topics_text()])
    cut = int(0.9 * len(ids))
    model = TinyGPT(len(vocab), args.d_model, args.layers, args.heads, args.seq)
    opt = ASGO(asgo_param_groups(model), lr=args.lr, inverse_root=method)
    gen = torch.Generator().manual_seed(seed + 1)

    def batch(lo: int, hi: int, g: torch.Generator) -> torch.Tensor:
        starts = torch.randint(lo, hi - args.seq - 1, (args.batch,), generator=g).tolist()
        return torch.stack([ids[s:s + args.seq + 1] for s in starts])

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(idx[:, :-1]).reshape(-1, len(vocab)), idx[:, 1:].reshape(-1))

    losses = []
    for _ in range(args.train_steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(batch(0, cut, gen))
        loss.backward()
        opt.step()
        losses.append(float(loss))
    val_gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        val = [float(loss_of(batch(cut, len(ids), val_gen))) for _ in range(args.val_batches)]
    return {"train_loss_last20": sum(losses[-20:]) / 20, "val_loss": sum(val) / len(val),
            "root_fallbacks": opt.statistics()["asgo_root_fallbacks"]}


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    data = collect(args)
    steps: dict[str, Any] = {}
    for t in args.eval_steps:
        grams, moms = data[t]
        p_ref = reference(grams)
        row: dict[str, Any] = {"cond_capped_1e16": summary(_cond(grams.double()))}
        for m in METHODS:
            row[f"{m}_direction_error"] = summary(direction_error(root(grams, m), p_ref, moms))
            if m != "polar_express_eigh_fp32":
                row[f"{m}_fp64_sensitivity_1e-16"] = summary(sensitivity(grams, moms, m, 1e-16, t))
        steps[str(t)] = row
        log.info("step %d: %s", t, json.dumps(row))
    grams = data[max(args.eval_steps)][0]
    timing = {"blocks": grams.shape[0], "k": grams.shape[-1],
              "one_batched_matmul_fp32_ms": cpu_ms(lambda: torch.bmm(grams, grams), args.reps)}
    for m in METHODS:
        timing[f"{m}_ms"] = cpu_ms(lambda m=m: root(grams, m), args.reps)
    log.info("root CPU time: %s", timing)
    quality = {m: [train_quality(args, m, seed) for seed in args.train_seeds] for m in args.train_methods}
    log.info("training quality: %s", json.dumps(quality))
    return {"benchmark": "eval_asgo_roots", "config": {k: v for k, v in vars(args).items() if k != "out"},
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_before_after": [list(load_before), list(os.getloadavg())],
            "steps": steps, "root_cpu_time": timing,
            "training_quality": quality}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--train-methods", nargs="+", default=["polar_express", "polar_express_eigh"],
                   help="inverse_root values of the training comparison")
    p.add_argument("--val-batches", type=int, default=20)
    add_output_args(p)
    args = p.parse_args()
    start(args)
    log.info("wrote %s", write_json(args, "eval_asgo_roots", evaluate(args)))


if __name__ == "__main__":
    main()
