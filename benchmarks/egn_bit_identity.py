"""Bit-identity of EGN between two checkouts: the same seeded training runs in each (a subprocess with
that checkout first on PYTHONPATH), and every parameter and every optimizer state tensor (momentum
buffers, global scalars) must be byte-for-byte equal after the run (``torch.equal``, and equal floats).

    python benchmarks/egn_bit_identity.py /path/to/old/checkout /path/to/new/checkout

Cases: cross-entropy (digits-like d-32-32-10 at b = 32; the report's digits MLP 64-128-128-10 with EGN-m's
settings; the bench MLP 32-64-64-10 at b = 8 / 16, the dense and direct paths; at b = 64 with a small λ, the
mixed-precision path; at b = 256, conjugate gradients), a 2-class cross-entropy, MSE (direct,
mixed-precision and conjugate-gradient paths), BCE, ReLU / Sigmoid chains, momentum, adaptive damping, line
search on and off, a float32 solve (``solve_dtype="model"``), frozen parameters (the last Linear trains its
bias only), and a model outside the chain capture (a Sequential subclass: the general capture). The last
step's statistics (loss, λ, α, gᵀd, ρ, CG mat-vecs, refinement sweeps) are compared too, so each case is known
to take the same path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: name -> (widths, activation, loss, batch size, steps, EGN keyword arguments)
CASES: dict[str, tuple[tuple[int, ...], str, str, int, int, dict[str, Any]]] = {
    "ce_digits_ls": ((64, 32, 32, 10), "tanh", "cross_entropy", 32, 30,
                     dict(lr=1.0, damping=0.5, line_search=True)),
    # the benchmark report's digits configuration: the MLP 64-128-128-10 at b = 32 with EGN-m's settings
    # (bc' = 288: the Cholesky's lower-triangle assembly in two row blocks)
    "ce_digits_egn_m": ((64, 128, 128, 10), "tanh", "cross_entropy", 32, 30,
                        dict(lr=1.0, damping=0.3, momentum=0.8, line_search=True)),
    "ce_digits_mom_adapt": ((64, 32, 32, 10), "tanh", "cross_entropy", 32, 30,
                            dict(lr=0.5, damping=1.0, momentum=0.5, adaptive_damping=True)),
    "ce_2class_ls": ((20, 32, 32, 2), "tanh", "cross_entropy", 32, 30,
                     dict(lr=1.0, damping=0.5, line_search=True, adaptive_damping=True)),
    "ce_dense_b8": ((32, 64, 64, 10), "tanh", "cross_entropy", 8, 25, dict(lr=0.5, damping=1.0, momentum=0.3)),
    "ce_b16": ((32, 64, 64, 10), "tanh", "cross_entropy", 16, 25, dict(lr=0.5, damping=1.0)),
    "ce_mixed_b64": ((32, 64, 64, 10), "tanh", "cross_entropy", 64, 20,
                     dict(lr=0.5, damping=0.01, line_search=True)),
    "ce_cg_b256": ((32, 64, 64, 10), "tanh", "cross_entropy", 256, 20,
                   dict(lr=0.5, damping=1.0, adaptive_damping=True)),
    "mse_mom_adapt": ((16, 32, 32, 3), "tanh", "mse", 32, 40,
                      dict(lr=0.5, damping=1.0, momentum=0.5, adaptive_damping=True)),
    "mse_cg_b200": ((16, 32, 32, 3), "tanh", "mse", 200, 20, dict(lr=0.5, damping=1.0, adaptive_damping=True)),
    "mse_mixed_b140": ((16, 32, 32, 3), "tanh", "mse", 140, 20, dict(lr=0.5, damping=0.01, line_search=True)),
    "mse_relu_ls": ((16, 32, 32, 3), "relu", "mse", 32, 30, dict(lr=1.0, damping=0.5, line_search=True)),
    "bce_sigmoid_ls": ((20, 32, 32, 4), "sigmoid", "bce", 32, 30,
                       dict(lr=1.0, damping=0.5, line_search=True, momentum=0.3, adaptive_damping=True)),
    "ce_solve_dtype_model": ((64, 32, 32, 10), "tanh", "cross_entropy", 32, 20,
                             dict(lr=1.0, damping=0.5, line_search=True, adaptive_damping=True, solve_dtype="model")),
    "ce_frozen_last_weight": ((64, 32, 32, 10), "tanh", "cross_entropy", 32, 20,
                              dict(lr=1.0, damping=0.5, momentum=0.3, freeze=("4.weight", "0.bias"))),
    "ce_general_capture": ((64, 32, 32, 10), "tanh-subclass", "cross_entropy", 32, 20,
                           dict(lr=1.0, damping=0.5, line_search=True)),
}

#: the last step's statistics compared too (the solve path taken: CG mat-vecs, refinement sweeps)
_STATS = ("loss", "damping", "alpha", "solve_", "gtd", "rho")
_ACT = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


class _Seq(nn.Sequential):
    """A Sequential subclass: not a planned chain, so EGN takes its general (autograd) capture."""


def _model(widths: tuple[int, ...], act: str) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(_ACT[act.split("-")[0]]())
    return _Seq(*layers) if act.endswith("-subclass") else nn.Sequential(*layers)


def _data(widths: tuple[int, ...], loss: str, b: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    w_true = torch.randn(widths[0], widths[-1], generator=g)
    out = []
    for _ in range(steps):
        x = torch.randn(b, widths[0], generator=g)
        logits = x @ w_true / widths[0] ** 0.5
        if loss == "cross_entropy":
            y = (logits + 0.5 * torch.randn(b, widths[-1], generator=g)).argmax(dim=1)
        elif loss == "bce":
            y = (logits > 0).float()
        else:
            y = torch.tanh(logits)
        out.append((x, y))
    return out


def run_case(name: str) -> dict[str, Any]:
    """The final parameters, state tensors and global scalars of one case (run in this process)."""
    from lightning_soaa import EGN

    widths, act, loss, b, steps, kw = CASES[name]
    model = _model(widths, act)
    kw = dict(kw)
    frozen = set(kw.pop("freeze", ()))
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    opt = EGN(model, loss=loss, max_gram_size=1 << 14, **kw)
    for x, y in _data(widths, loss, b, steps):
        opt.step(inputs=x, targets=y)
    stats = {k: v for k, v in opt.statistics().items() if k.startswith(_STATS)}
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "state": opt.state_dict(),
            "stats": stats}


def _tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a nested state dict, by path (tensors and plain values)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
        return out
    return {prefix: obj}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.numel() else a,
                                                       b.view(torch.uint8) if b.numel() else b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # both NaN
    return bool(a == b)


def compare(old: dict[str, Any], new: dict[str, Any]) -> tuple[int, list[str]]:
    """(leaves compared, paths that differ)."""
    la, lb = _tensors(old), _tensors(new)
    bad = sorted(set(la) ^ set(lb)) + [k for k in la if k in lb and not _equal(la[k], lb[k])]
    return len(la), bad


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        torch.set_num_threads(1)
        torch.save({n: run_case(n) for n in CASES}, sys.argv[2])
        return
    old_tree, new_tree = sys.argv[1], sys.argv[2]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for tag, tree in (("old", old_tree), ("new", new_tree)):
            env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
            subprocess.run([sys.executable, __file__, "--worker", str(Path(tmp) / f"{tag}.pt")], check=True, env=env)
        old = torch.load(Path(tmp) / "old.pt", weights_only=False)
        new = torch.load(Path(tmp) / "new.pt", weights_only=False)
    ok = True
    for name in CASES:
        n, bad = compare(old[name], new[name])
        ok = ok and not bad
        results.append({"case": name, "leaves": n, "differ": bad[:5], "identical": not bad})
        print(f"{name:22s} {n:3d} leaves (params, state tensors, global state, last-step statistics)  "
              f"{'IDENTICAL' if not bad else 'DIFFER: ' + ', '.join(bad[:5])}")
    print(json.dumps({"all_identical": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
