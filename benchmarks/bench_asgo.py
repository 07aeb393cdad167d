"""ASGO step time vs torch.optim.Muon and AdamW on a small transformer, in one run.

What is measured (all optimizers on identical copies of one model, same data, interleaved step by step
so that machine noise hits every optimizer alike):

* ``step_ms``: wall time of ``optimizer.step()`` alone (median over the timed steps), and
  ``step_cpu_ms``: the process CPU time of the same calls (less sensitive to other jobs on a shared
  machine than wall time; with one torch thread it is the work done). The load average is recorded;
* ``fwd_bwd_ms``: forward + backward of the same step (the denominator for the overhead ratio);
* the ASGO root cost, by comparing ``root_every`` = 1 and 10 (and the float64 ``eigh`` root);
* the loss after the timed steps (a sanity check that every optimizer trains, not a quality claim).

Optimizers: AdamW (torch), Muon (torch.optim.Muon on hidden matrices + AdamW on the rest, Muon's RMS
matched to AdamW as in the ASGO paper's baseline; torch runs its Newton-Schulz in bf16: fast on a CPU
with bf16 matrix units (Intel AMX: 27 ms against 96 ms in fp32 on this benchmark), emulated and ~50x
slower on one without; ``muon_fp32`` is the same update with the 5 quintic iterations in fp32, written
here), ASGO (default root, i.e. ``inverse_root="auto"``, with ``root_every`` 1, 10 and ``"auto"``; the
matmul iteration ``"polar_express"`` that was the default before, and the same without the float32 map's
floor, ``root_floor=0.0``, as ``asgo_bare_map``; the float64 pseudo-inverse ``"eigh"``), DASGO.

Usage::

    python benchmarks/bench_asgo.py                 # ~1-3 minutes on a 2-core CPU (1 thread)
    python benchmarks/bench_asgo.py --d-model 768 --layers 12 --threads 0 --device cuda

Writes ``benchmarks/results/bench_asgo.json`` and ``bench_asgo.png`` (``bench_asgo_cuda.*`` on a GPU).
"""

from __future__ import annotations

import argparse
import copy
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
from torch import nn
from torch.nn import functional as F

from lightning_soaa import ASGO, DASGO
from lightning_soaa.optim.asgo import asgo_param_groups

log = logging.getLogger("bench_asgo")


class Block(nn.Module):
    """Pre-norm transformer block with separate q/k/v/o projections (as the ASGO GPT code)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln_1(x)
        q, k, v = (m(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for m in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, block: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as GPT-2
        with torch.no_grad():  # GPT-2 initialisation scale for the (tied) embeddings
            self.wte.weight.normal_(0.0, 0.02)
            self.wpe.weight.normal_(0.0, 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def _newton_schulz5(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's orthogonalisation: 5 quintic Newton-Schulz steps (torch's coefficients), in fp32."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class MuonFP32(torch.optim.Optimizer):
    """torch.optim.Muon's update (momentum, no Nesterov, RMS matched to AdamW, decoupled weight decay)
    with the Newton-Schulz iterations in fp32: the CPU reference the issue's ratio is taken against."""

    def __init__(self, params: Any, lr: float, momentum: float = 0.9, weight_decay: float = 0.1) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                u = _newton_schulz5(buf)
                scale = 0.2 * max(p.shape) ** 0.5  # torch's adjust_lr_fn="match_rms_adamw"
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(u, alpha=-group["lr"] * scale)


class _Combo:
    """Muon on hidden matrices plus AdamW on the rest, stepped together."""

    def __init__(self, opts: list[torch.optim.Optimizer]) -> None:
        self.opts = opts

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.opts:
            o.step()


def make_optimizers(lr: float) -> dict[str, Callable[[nn.Module], Any]]:
    def adamw(m: nn.Module) -> Any:
        return torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def muon(m: nn.Module) -> Any:
        groups = asgo_param_groups(m)  # the same routing as ASGO: matrices vs embeddings/1-D
        mats = [p for _, p in groups[0]["params"] if p.dim() == 2]
        rest = [p for g in groups for _, p in g["params"] if not (g is groups[0] and p.dim() == 2)]
        return _Combo([
            torch.optim.Muon(mats, lr=lr, weight_decay=0.1, momentum=0.9, nesterov=False,
                             adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW(rest, lr=lr, betas=(0.9, 0.95), weight_decay=0.0),
        ])

    def muon_fp32(m: nn.Module) -> Any:
        groups = asgo_param_groups(m)
        mats = [p for _, p in groups[0]["params"] if p.dim() == 2]
        rest = [p for g in groups for _, p in g["params"] if not (g is groups[0] and p.dim() == 2)]
        return _Combo([MuonFP32(mats, lr=lr), torch.optim.AdamW(rest, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)])

    return {
        "adamw": adamw,
        "muon": muon,
        "muon_fp32": muon_fp32,
        "asgo_root_every_1": lambda m: ASGO(asgo_param_groups(m), lr=lr, root_every=1),
        "asgo_root_every_10": lambda m: ASGO(asgo_param_groups(m), lr=lr, root_every=10),
        "asgo_auto": lambda m: ASGO(asgo_param_groups(m), lr=lr, root_every="auto"),
        "asgo_eigh": lambda m: ASGO(asgo_param_groups(m), lr=lr, inverse_root="eigh"),
        "asgo_polar_express": lambda m: ASGO(asgo_param_groups(m), lr=lr, inverse_root="polar_express"),
        # the bare map of the official code (no floor): on float32 Grams with a null space its iteration leaves
        # its bound and those roots go to the float64 eigendecomposition (asgo_roots_recomputed)
        "asgo_bare_map": lambda m: ASGO(asgo_param_groups(m), lr=lr, inverse_root="polar_express", root_floor=0.0),
        "dasgo": lambda m: DASGO(asgo_param_groups(m), lr=lr),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _batch(args: argparse.Namespace, gen: torch.Generator) -> torch.Tensor:
    """A learnable task: a random first token, then every next token a fixed function of the current one."""
    idx = torch.empty(args.batch, args.seq + 1, dtype=torch.long)
    idx[:, 0] = torch.randint(0, args.vocab, (args.batch,), generator=gen)
    for j in range(args.seq):
        idx[:, j + 1] = (idx[:, j] * 7 + 3) % args.vocab
    return idx


def _train(args: argparse.Namespace, runs: dict[str, dict[str, Any]], device: torch.device) -> None:
    """Every optimizer steps on the same batches, interleaved, recording its step and forward-backward times."""
    gen = torch.Generator().manual_seed(1)
    total = args.warmup + args.steps
    for t in range(total):
        idx = _batch(args, gen).to(device)
        for r in runs.values():
            r["opt"].zero_grad(set_to_none=True)
            _sync(device)
            t0 = time.perf_counter()
            logits = r["model"](idx[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, args.vocab), idx[:, 1:].reshape(-1))
            loss.backward()
            _sync(device)
            t1, c1 = time.perf_counter(), time.process_time()
            r["opt"].step()
            _sync(device)
            t2, c2 = time.perf_counter(), time.process_time()
            if t >= args.warmup:
                r["fb"].append(t1 - t0)
                r["step"].append(t2 - t1)
                r["cpu"].append(c2 - c1)
            r["loss"].append(float(loss.detach()))
        if t % 10 == 0:
            log.info("step %d/%d: %s", t, total, {n: round(r["loss"][-1], 3) for n, r in runs.items()})


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    step_ms = 1e3 * statistics.median(r["step"])
    fb_ms = 1e3 * statistics.median(r["fb"])
    out = {
        "step_ms_median": step_ms,
        "step_ms_mean": 1e3 * statistics.fmean(r["step"]),
        "step_ms_p90": 1e3 * sorted(r["step"])[int(0.9 * (len(r["step"]) - 1))],
        "step_cpu_ms_median": 1e3 * statistics.median(r["cpu"]),
        "step_cpu_ms_p10_p90": [1e3 * sorted(r["cpu"])[int(q * (len(r["cpu"]) - 1))] for q in (0.1, 0.9)],
        "fwd_bwd_ms_median": fb_ms,
        "step_over_fwd_bwd": step_ms / fb_ms,
        "loss_first": r["loss"][0],
        "loss_last": statistics.fmean(r["loss"][-5:]),
        "step_times_ms": [1e3 * x for x in r["step"]],
        "losses": r["loss"],
    }
    if isinstance(r["opt"], (ASGO, DASGO)):
        st = r["opt"].statistics()
        out["optimizer_statistics"] = {k: v for k, v in st.items() if not k.startswith("comm")}
    return out


def _ratios(results: dict[str, Any]) -> dict[str, float]:
    ratios = {}
    for n in results:
        if "adamw" in results:
            ratios[f"{n}_over_adamw"] = results[n]["step_ms_median"] / results["adamw"]["step_ms_median"]
        if "muon" in results:
            ratios[f"{n}_over_muon"] = results[n]["step_ms_median"] / results["muon"]["step_ms_median"]
        if "muon_fp32" in results:
            ratios[f"{n}_over_muon_fp32_cpu"] = (results[n]["step_cpu_ms_median"]
                                                 / results["muon_fp32"]["step_cpu_ms_median"])
    if "asgo_root_every_1" in results and "asgo_root_every_10" in results:
        s1 = results["asgo_root_every_1"]["step_ms_median"]
        s10 = results["asgo_root_every_10"]["step_ms_median"]
        # step(tau) = other + root/tau  =>  root = (s1 - s10) * 10/9
        ratios["asgo_root_cost_ms_estimate"] = (s1 - s10) * 10.0 / 9.0
        ratios["asgo_root_share_of_step"] = ratios["asgo_root_cost_ms_estimate"] / s1
    return ratios


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = TinyGPT(args.vocab, args.d_model, args.layers, args.heads, args.seq).to(device)
    factories = make_optimizers(args.lr)
    runs = {}
    for n in [n for n in factories if n in args.optimizers]:
        model = copy.deepcopy(base)
        runs[n] = {"model": model, "opt": factories[n](model), "step": [], "cpu": [], "fb": [], "loss": []}
    load_before = os.getloadavg()
    _train(args, runs, device)
    results = {n: _summary(r) for n, r in runs.items()}
    n_params = sum(p.numel() for p in base.parameters())
    return {
        "benchmark": "bench_asgo",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "model_params": n_params,
        "matrix_shapes": sorted({tuple(p.shape) for p in base.parameters() if p.dim() == 2}),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "results": results,
        "ratios": _ratios(results),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    names = list(res)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.5))
    step = [res[n]["step_ms_median"] for n in names]
    fb = [res[n]["fwd_bwd_ms_median"] for n in names]
    x = range(len(names))
    ax1.bar(x, fb, label="forward+backward", color="#bbbbbb")
    ax1.bar(x, step, bottom=fb, label="optimizer.step()", color="#3b75af")
    ax1.set_xticks(list(x), names, rotation=30, ha="right")
    ax1.set_ylabel("ms per training step (median)")
    cfg = report["config"]
    ax1.set_title(f"TinyGPT d={cfg['d_model']} L={cfg['layers']} on {report['device']} "
                  f"({report['threads']} threads)")
    ax1.legend()
    for i in range(len(names)):
        ax1.text(i, fb[i] + step[i], f"{step[i]:.1f}", ha="center", va="bottom", fontsize=8)
    for n in names:
        ax2.plot(res[n]["step_times_ms"], label=n)
    ax2.set_xlabel("timed step")
    ax2.set_ylabel("optimizer.step() ms")
    ax2.set_yscale("log")
    ax2.legend(fontsize=8)
    for n in names:
        ax3.plot(res[n]["losses"], label=n)
    ax3.set_xlabel("step (warm-up included)")
    ax3.set_ylabel("training loss (sanity check, AdamW at lr 1e-3)")
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- command line (shared by the ASGO scripts)
def add_model_args(p: argparse.ArgumentParser, *, d_model: int = 128, layers: int = 4, heads: int = 4,
                   vocab: int | None = 64, seq: int = 64, batch: int = 8) -> None:
    """:class:`TinyGPT`'s shape and the batch (``vocab=None``: the script takes it from its text)."""
    p.add_argument("--d-model", type=int, default=d_model)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=heads)
    if vocab is not None:
        p.add_argument("--vocab", type=int, default=vocab)
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--batch", type=int, default=batch)


def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")


def start(args: argparse.Namespace) -> None:
    """Logging with timestamps and ``--threads``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)


def write_json(args: argparse.Namespace, stem: str, report: dict[str, Any]) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--optimizers", nargs="+",
                   default=["adamw", "muon", "muon_fp32", "asgo_root_every_1", "asgo_polar_express",
                            "asgo_bare_map", "asgo_root_every_10", "asgo_auto", "asgo_eigh", "dasgo"])
    add_output_args(p)
    args = p.parse_args()
    start(args)
    report = run(args)
    kind = torch.device(args.device).type
    stem = "bench_asgo" if kind == "cpu" else f"bench_asgo_{kind}"
    path = write_json(args, stem, report)
    plot(report, path.with_suffix(".png"))
    for n, r in report["results"].items():
        log.info("%-20s step %8.2f ms (cpu %8.2f ms; fwd+bwd %7.2f ms, ratio %.2f), loss %.3f -> %.3f", n,
                 r["step_ms_median"], r["step_cpu_ms_median"],
                 r["fwd_bwd_ms_median"], r["step_over_fwd_bwd"], r["loss_first"], r["loss_last"])
        st = r.get("optimizer_statistics", {})
        if "asgo_roots_computed" in st:  # roots that left the iteration's bound cost an eigendecomposition each
            log.info("%-20s roots computed %d, recomputed by eigendecomposition %d", n, st["asgo_roots_computed"],
                     st["asgo_roots_recomputed"])
    log.info("ratios: %s", json.dumps({k: round(v, 3) for k, v in report["ratios"].items()}))
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
