"""The shape of SOAA's Triton programs on a GPU: elements per chunk, chunks per program, warps.

Times the two passes of :class:`lightning_soaa.kernels.soaa_triton.TritonSOAA` alone (the sums pass, then
the step, each with its reduction and its one wait for the device, as the optimizer calls them) for each
program shape, against torch's ``AdamW(fused=True)`` step on the same tensors and a device copy of the
same bytes (the bandwidth bound: SOAA moves 36 B/param in fp32, fused AdamW 28 B), and checks each shape
against the IEEE reference first (:func:`~lightning_soaa.kernels.soaa_triton.self_check`). Writes
``tune_soaa_triton_<device>.json`` and a PNG. Needs CUDA (``--device cpu`` with ``TRITON_INTERPRET=1``
only smoke-tests the script).

    python benchmarks/tune_soaa_triton.py --results benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lightning_soaa.kernels import soaa_triton

log = logging.getLogger("tune_soaa_triton")

#: (elements per chunk, chunks per program, warps): the default first
SHAPES = ((1024, 1, 8), (1024, 1, 4), (2048, 1, 8), (4096, 1, 8), (512, 1, 4), (1024, 4, 8), (1024, 16, 8),
          (2048, 4, 8), (512, 8, 4), (4096, 4, 16))
SCAL = (0.1, 0.95, 0.05, 0.999, -1e-3, 2.0, 0.3, 1e-8)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Any, reps: int, device: torch.device) -> tuple[float, list[float]]:
    fn()
    _sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), ts


def _tensors(count: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> list[list[torch.Tensor]]:
    gen = torch.Generator(device=device).manual_seed(0)
    out = [[torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype).flatten()
            for _ in range(count)] for _ in range(4)]
    out[3] = [x.abs_() for x in out[3]]
    return out


def _baselines(p: list[torch.Tensor], g: list[torch.Tensor], reps: int, device: torch.device) -> dict[str, float]:
    params = [torch.nn.Parameter(x.clone()) for x in p]
    for q, gr in zip(params, g):
        q.grad = gr.clone()
    opt = torch.optim.AdamW(params, lr=1e-3, fused=device.type == "cuda")
    adamw, _ = _median_ms(opt.step, reps, device)
    numel = sum(x.numel() for x in p)
    src = torch.empty(numel * 9 // 2, dtype=p[0].dtype, device=device)  # 36 B/param read + written in fp32
    dst = torch.empty_like(src)
    copy, _ = _median_ms(lambda: dst.copy_(src), reps, device)
    return {"adamw_fused_ms": adamw, "copy_36B_per_param_ms": copy}


def _time_shape(shape: tuple[int, int, int], tensors: list[list[torch.Tensor]], reps: int,
                device: torch.device) -> dict[str, Any]:
    block, iters, warps = shape
    kernels = soaa_triton.TritonSOAA(device.type, block=block, iters=iters, num_warps=warps)
    p, g, m, v = tensors
    why = soaa_triton.self_check(kernels, device, p[0].dtype)
    if why is not None:
        return {"shape": list(shape), "check": why}
    modes = [soaa_triton.TritonSOAA.SUMS_GM] * len(p)
    scal = [SCAL] * len(p)
    sums, _ = _median_ms(lambda: kernels.run_sums(g, m, v, modes), reps, device)
    step, _ = _median_ms(lambda: kernels.run_step(p, g, m, v, scal), reps, device)
    both, rounds = _median_ms(lambda: (kernels.run_sums(g, m, v, modes), kernels.run_step(p, g, m, v, scal)),
                              reps, device)
    return {"shape": list(shape), "check": "ok", "sums_ms": sums, "step_ms": step, "both_ms": both,
            "both_min_ms": min(rounds)}


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        rows = [r for r in res["shapes"] if r["check"] == "ok"]
        labels = ["{}x{}/{}w".format(*r["shape"]) for r in rows]
        ax.bar(labels, [r["both_ms"] / res["adamw_fused_ms"] for r in rows])
        ax.axhline(1.5, color="k", ls="--", lw=1, label="1.5x fused AdamW")
        ax.axhline(res["copy_36B_per_param_ms"] / res["adamw_fused_ms"], color="g", ls=":", lw=1,
                   label="copy of 36 B/param")
        ax.set_title(f"{res['layout']} {res['dtype']}")
        ax.set_ylabel("both passes / fused AdamW step")
        ax.tick_params(axis="x", rotation=60)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layouts", default="10x1000x1000,10x4096x4096", help="COUNTxROWSxCOLS, comma-separated")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    results = []
    for layout in args.layouts.split(","):
        count, *dims = (int(x) for x in layout.split("x"))
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            tensors = _tensors(count, tuple(dims), dtype, device)
            res: dict[str, Any] = {"layout": layout, "dtype": name, **_baselines(tensors[0], tensors[1], args.reps,
                                                                                 device)}
            res["shapes"] = [_time_shape(s, tensors, args.reps, device) for s in SHAPES]
            for r in res["shapes"]:
                ratio = r["both_ms"] / res["adamw_fused_ms"] if "both_ms" in r else float("nan")
                log.info("%s %s shape %s: %s sums %.3f step %.3f both %.3f ms = %.2fx fused AdamW (%.3f ms; copy "
                         "%.3f ms)", layout, name, r["shape"], r["check"], r.get("sums_ms", float("nan")),
                         r.get("step_ms", float("nan")), r.get("both_ms", float("nan")), ratio,
                         res["adamw_fused_ms"], res["copy_36B_per_param_ms"])
            results.append(res)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    meta = {"device": gpu, "torch": torch.__version__, "default_shape": [soaa_triton.BLOCK, soaa_triton.ITERS,
                                                                           soaa_triton.NUM_WARPS]}
    stem = out / f"tune_soaa_triton_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps({**meta, "results": results}, indent=1))
    _plot(results, stem.with_suffix(".png"))
    log.info("wrote %s.json and .png", stem)


if __name__ == "__main__":
    main()
