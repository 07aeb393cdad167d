"""Workloads, optimizers and one timed training run for ``benchmarks/report.py``.

Three small workloads that ship offline (the demo models of :mod:`lightning_soaa.lightning.demo`):

* ``digits``: the demo's tanh MLP 64-128-128-10 on scikit-learn's digits, cross-entropy, batch 32;
* ``lstsq``: linear least squares (``nn.Linear(32, 4)``, loss ½‖Wx + b − y‖²), inputs with a
  condition number of 100 and a little label noise, batch 64;
* ``chars``: the demo's character transformer (d_model 64, 2 layers, context 64) on
  ``pydoc_data.topics``, batch 32, linear warm-up then cosine decay to 10% of the peak lr.

Every run is a plain torch loop (no Lightning), one torch thread, timed in CPU time of the process
(``time.process_time``) over the training steps only: data slicing, forward, backward and ``step()``;
the validation passes are not timed. The seed sets the model initialisation and the batch order.

Optimizers: ours through :mod:`lightning_soaa.registry` (``build``/``take_step`` know how each one is
stepped; SOAA gets ``total_steps`` = the run's length), torch ``AdamW(fused=True)``, torch ``Muon`` on the
matrices with AdamW for the rest (``bench_asgo.make_optimizers``' setup), HeavyBall's ``SOAP`` and
``PSGDKron`` when the ``heavyball`` package imports. Weight decay is 0 for every optimizer (short runs,
validation loss is the objective); everything else is each optimizer's default.

Two more rows on ``chars`` only (:data:`CHARS_ONLY`): ``ASGO-parts``, ASGO with each fused QKV projection
stepped as its three matrices (``asgo_param_groups(model, fused={"qkv.weight": 3})``: ASGO's ``row_parts``;
the official ASGO model has separate Q, K, V projections), and ``Muon-split``, the same Muon baseline on the
model with each fused ``qkv`` ``Linear(d, 3d)`` replaced by three ``Linear(d, d)`` (:class:`SplitLinear`,
the same function at initialisation), so that Muon too orthogonalises Q, K and V separately.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_soaa import registry

__all__ = ["Workload", "WORKLOADS", "OPTIMIZERS", "LR_GRID", "EGN_SETTINGS", "CHARS_ONLY", "SplitLinear",
           "heavyball_status", "run_one", "applies", "interleaved_step_ms"]


@dataclasses.dataclass(frozen=True)
class Workload:
    """A training problem: its length, batch, validation cadence and lr schedule."""

    name: str
    steps: int
    eval_every: int
    batch: int
    warmup_cosine: bool = False


#: full-size workloads; ``--quick`` shrinks them with :func:`quick`
WORKLOADS = {
    "digits": Workload("digits", steps=300, eval_every=15, batch=32),
    "lstsq": Workload("lstsq", steps=300, eval_every=15, batch=64),
    "chars": Workload("chars", steps=500, eval_every=25, batch=32, warmup_cosine=True),
}

#: optimizer -> its lr grid: values x3 apart (x2 for EGN's step size) around its usual lr on models of this
#: size; a best lr at either end of the grid is flagged in the report. Turn 10 reached one point further
#: wherever turn 9's best sat at an end (lstsq: AdamW and SOAA at 3e-2; digits: ASGO at 3e-3, EGN at 2;
#: chars: SOAP at 3e-2, PSGD at 1e-2). EGN on lstsq stays flagged: every lr from 1 up reaches the problem's
#: noise floor (validation loss 0.0005), so its "best" is a tie broken by the last digit.
LR_GRID: dict[str, tuple[float, ...]] = {
    "AdamW": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "SOAA": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "ASGO": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "ASGO-parts": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "ASGO-r4": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "EGN": (0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
    "EGN-m": (0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
    "Muon": (3e-3, 1e-2, 3e-2, 1e-1),
    "Muon-split": (3e-3, 1e-2, 3e-2, 1e-1),
    "SOAP": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "PSGD": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
}
OPTIMIZERS = tuple(LR_GRID)
#: settings of ours besides the lr: EGN as the README shows it (λ₀ = 1, line search), and EGN-m, with a
#: smaller initial damping and momentum, picked from a 12-point grid (lr 1/2 on digits, 2/8 on lstsq; λ₀
#: 1/0.3; momentum 0/0.5/0.8; 3 seeds) on the two workloads it runs on: λ₀ = 0.3 with momentum 0.8 was
#: best on both (digits: 0.76x AdamW's steps, lstsq: 0.29x) and λ₀ = 1 without momentum among the worst
EGN_SETTINGS: dict[str, dict[str, Any]] = {
    "EGN": {"damping": 1.0, "line_search": True},
    "EGN-m": {"damping": 0.3, "momentum": 0.8, "line_search": True},
}
#: EGN needs the module and the batch (per-sample Jacobians): only the small tabular problems
EGN_WORKLOADS = ("digits", "lstsq")
HEAVYBALL = ("SOAP", "PSGD")
#: the language model's fused QKV projections, stepped as three matrices (ASGO-parts) or split into three
#: Linears (Muon-split, so that Muon, too, sees Q, K and V apart): rows of ``chars`` only
FUSED_QKV = {"qkv.weight": 3}
#: ASGO-r4: ASGO-parts with its roots every 4 steps, the setting a study on ``chars`` picked for time to the
#: target (turn 37, with Nesterov's direction, ASGO's default since turn 40: 225 -> 200 steps, lower final
#: loss in 6 of 6 seeds; roots every 4 steps, the step 1.18x -> 1.08x AdamW's): tuned on what it is scored
#: on, as EGN-m is
ASGO_R4 = {"root_every": 4}
CHARS_ONLY = ("ASGO-parts", "ASGO-r4", "Muon-split")
#: the optimizers trained on the model with its QKV split (:func:`split_qkv`)
SPLIT_MODEL = ("Muon-split",)


def quick(w: Workload) -> Workload:
    """The ``--quick`` version of a workload: a few dozen steps."""
    return dataclasses.replace(w, steps=20 if w.name == "chars" else 30, eval_every=5)


def applies(opt: str, workload: str) -> bool:
    if opt in CHARS_ONLY:
        return workload == "chars"
    return opt not in EGN_SETTINGS or workload in EGN_WORKLOADS


@functools.lru_cache(maxsize=1)
def heavyball_status() -> str:
    """``""`` when HeavyBall imports, else why not (the report says so and skips its rows)."""
    try:
        import heavyball  # noqa: F401
    except Exception as e:  # any import failure means: no HeavyBall rows
        return f"{type(e).__name__}: {e}"
    return ""


# ---------------------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=4)
def data(name: str, quick_mode: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_val, y_val); for ``chars`` the train ids, None, and the val windows."""
    if name == "digits":
        from lightning_soaa.lightning.demo import DigitsDataModule

        dm = DigitsDataModule(val_fraction=0.2, seed=0)
        dm.setup()
        tr, va = dm.train_set.tensors, dm.val_set.tensors  # type: ignore[union-attr]
        return tr[0], tr[1], va[0], va[1]
    if name == "lstsq":
        return _lstsq_data()
    from lightning_soaa.lightning.demo import topics_text, topics_vocab

    table = {c: i for i, c in enumerate(topics_vocab())}
    ids = torch.tensor([table[c] for c in topics_text()], dtype=torch.long)
    split = int(0.9 * len(ids))
    ctx, n_val = 64, 32 if quick_mode else 128
    val = ids[split:split + n_val * ctx + 1]
    xv = torch.stack([val[i * ctx:(i + 1) * ctx] for i in range(n_val)])
    yv = torch.stack([val[i * ctx + 1:(i + 1) * ctx + 1] for i in range(n_val)])
    return ids[:split], torch.empty(0), xv, yv


def _lstsq_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    d, k, n = 32, 4, 2560
    scales = torch.logspace(0, -2, d)  # condition number 100 of the input covariance (square root)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    x = (torch.randn(n, d, generator=g) * scales) @ basis.T
    w = torch.randn(d, k, generator=g) / math.sqrt(d)
    y = x @ w + 0.01 * torch.randn(n, k, generator=g)
    return x[:2048], y[:2048], x[2048:], y[2048:]


class SplitLinear(nn.Module):
    """A fused ``nn.Linear(d, p * n)`` as ``p`` ``nn.Linear(d, n)`` whose weights and biases are copies of
    its row blocks: the same function (the outputs concatenated on the last dimension), but ``p`` matrix
    parameters, each orthogonalised on its own by Muon."""

    def __init__(self, fused: nn.Linear, parts: int) -> None:
        super().__init__()
        if fused.out_features % parts:
            raise ValueError(f"Invalid parts={parts!r}. Must divide out_features={fused.out_features}.")
        n, bias = fused.out_features // parts, fused.bias is not None
        kw = {"device": fused.weight.device, "dtype": fused.weight.dtype}
        with torch.random.fork_rng(devices=[]):  # the parts' own init draws leave the seeded stream alone
            self.parts = nn.ModuleList(nn.Linear(fused.in_features, n, bias=bias, **kw) for _ in range(parts))
        with torch.no_grad():
            for i, lin in enumerate(self.parts):
                lin.weight.copy_(fused.weight[i * n:(i + 1) * n])
                if bias:
                    lin.bias.copy_(fused.bias[i * n:(i + 1) * n])

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([lin(x) for lin in self.parts], dim=-1)


def split_qkv(model: nn.Module) -> nn.Module:
    """``model`` with every fused ``qkv`` Linear replaced by its :class:`SplitLinear` (in place)."""
    parts = FUSED_QKV["qkv.weight"]
    fused = [(m, c) for m in model.modules() for c_name, c in m.named_children()
             if c_name == "qkv" and isinstance(c, nn.Linear)]
    if not fused:
        raise ValueError(f"split_qkv: {type(model).__name__} has no Linear named 'qkv'.")
    for parent, lin in fused:
        parent.qkv = SplitLinear(lin, parts)
    return model


def model_for(name: str, seed: int, split: bool = False) -> nn.Module:
    """The workload's model, initialised from ``seed``; ``split``: its fused QKV Linears split
    (:func:`split_qkv`, the same initial function)."""
    if split:
        return split_qkv(model_for(name, seed))
    torch.manual_seed(seed)
    if name == "digits":
        from lightning_soaa.lightning.demo import DigitsMLP

        return DigitsMLP(hidden=(128, 128))
    if name == "lstsq":
        return nn.Linear(32, 4)
    from lightning_soaa.lightning.demo import CharTransformer

    return CharTransformer(context=64, d_model=64, n_heads=4, n_layers=2)


def loss_fn(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    if name == "lstsq":
        return registry.half_mse  # EGN's "mse"
    return lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def batches(w: Workload, xtr: Tensor, ytr: Tensor, seed: int) -> Callable[[], tuple[Tensor, Tensor]]:
    """Draws the next training batch (reshuffled epochs; random windows of the text for ``chars``)."""
    g = torch.Generator().manual_seed(1000 + seed)
    if w.name == "chars":
        ctx = 64

        def window() -> tuple[Tensor, Tensor]:
            starts = torch.randint(0, len(xtr) - ctx - 1, (w.batch,), generator=g)
            rows = torch.stack([xtr[s:s + ctx + 1] for s in starts.tolist()])
            return rows[:, :-1], rows[:, 1:]

        return window
    order: list[Tensor] = []

    def shuffled() -> tuple[Tensor, Tensor]:
        if not order:
            perm = torch.randperm(len(xtr), generator=g)
            order.extend(perm[i:i + w.batch] for i in range(0, len(perm) - w.batch + 1, w.batch))
        idx = order.pop(0)
        return xtr[idx], ytr[idx]

    return shuffled


# ---------------------------------------------------------------------------------------- optimizers
def _torch_step(opt: Any, model: nn.Module, fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., None]:
    def step(x: Tensor, y: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        fn(model(x), y).backward()
        opt.step()

    return step


def _ours(opt: str, model: nn.Module, lr: float, w: Workload) -> tuple[Any, Callable[..., None]]:
    spec = registry.get("EGN" if opt in EGN_SETTINGS else opt)
    fn = loss_fn(w.name)
    if spec.first_arg is registry.FirstArg.MODULE:  # EGN: a damped Gauss-Newton step with line search
        kw: dict[str, Any] = {"loss": "mse" if w.name == "lstsq" else "cross_entropy", **EGN_SETTINGS[opt]}
    else:
        kw = {"weight_decay": 0.0}
    if spec.horizon_kwarg:
        kw[spec.horizon_kwarg] = w.steps
    o = spec.build(model, lr=lr, **kw)
    if spec.needs is registry.StepNeeds.BATCH:
        # EGN forms its loss itself (its ``loss`` above is the workload's): take_step's extra no-grad
        # forward, which returns the loss to a driver, is work no training loop of EGN's does
        return o, lambda x, y: o.step(inputs=x, targets=y)
    return o, lambda x, y: spec.take_step(o, model, x, y, fn)


def _muon(model: nn.Module, lr: float) -> Any:
    from bench_asgo import make_optimizers  # the project's Muon baseline: Muon on matrices, AdamW on the rest

    combo = make_optimizers(lr)["muon"](model)
    for o in combo.opts:
        for g in o.param_groups:
            g["weight_decay"] = 0.0
    return combo


def _asgo_parts(model: nn.Module, lr: float, w: Workload, **options: Any) -> tuple[Any, Callable[..., None]]:
    """ASGO with the fused QKV matrices in a ``row_parts`` group, stepped as ``_ours`` steps ASGO."""
    from lightning_soaa.optim.asgo import ASGO, asgo_param_groups

    o = ASGO(asgo_param_groups(model, fused=FUSED_QKV), lr=lr, weight_decay=0.0, **options)
    spec, fn = registry.get("ASGO"), loss_fn(w.name)
    return o, lambda x, y: spec.take_step(o, model, x, y, fn)


def build(opt: str, model: nn.Module, lr: float, w: Workload) -> tuple[list[Any], Callable[..., None]]:
    """(the torch optimizers whose param groups carry the lr, the training step ``step(x, y)``). For
    ``Muon-split`` ``model`` is the split one (:func:`model_for` with ``split=True``). ``AdamW`` is torch's
    fused AdamW, the baseline every ratio is against, not the registry's ``AdamW`` (the package's ShardedAdamW,
    which this took from 2026-11-30 to 2026-12-06: a slower step, about 1% of a ``chars`` training step)."""
    if opt == "AdamW":
        o: Any = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
        return [o], _torch_step(o, model, loss_fn(w.name))
    if opt in registry.names() or opt in EGN_SETTINGS:
        o, step = _ours(opt, model, lr, w)
        return [o], step
    if opt in ("ASGO-parts", "ASGO-r4"):
        o, step = _asgo_parts(model, lr, w, **(ASGO_R4 if opt == "ASGO-r4" else {}))
        return [o], step
    if opt in SPLIT_MODEL and not any(isinstance(m, SplitLinear) for m in model.modules()):
        raise ValueError(f"{opt} trains the split model: build it with model_for(..., split=True).")
    if opt in ("Muon", "Muon-split"):
        o = _muon(model, lr)
    elif opt in HEAVYBALL:
        import heavyball

        heavyball.utils.compile_mode = None  # eager: max-autotune compiles for minutes on this CPU
        cls = heavyball.SOAP if opt == "SOAP" else heavyball.PSGDKron
        o = cls(model.parameters(), lr=lr, weight_decay=0.0)
    else:
        raise ValueError(f"Invalid optimizer={opt!r}. Must be one of {', '.join(OPTIMIZERS)}.")
    return list(getattr(o, "opts", [o])), _torch_step(o, model, loss_fn(w.name))


def lr_factor(w: Workload, t: int) -> float:
    """The schedule's multiplier of the peak lr at step t: 1, or 10% linear warm-up then cosine to 0.1."""
    if not w.warmup_cosine:
        return 1.0
    warm = max(1, w.steps // 10)
    if t < warm:
        return (t + 1) / warm
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * (t - warm) / max(1, w.steps - warm)))


# ---------------------------------------------------------------------------------------------- runs
@torch.no_grad()
def _val_loss(model: nn.Module, name: str, xv: Tensor, yv: Tensor) -> float:
    v = float(loss_fn(name)(model(xv), yv))
    return v if math.isfinite(v) else math.inf


_WARMED: set[tuple[str, str]] = set()


def _train(w: Workload, opt: str, lr: float, seed: int, quick_mode: bool, steps: int) -> dict[str, Any]:
    xtr, ytr, xv, yv = data(w.name, quick_mode)
    model = model_for(w.name, seed, split=opt in SPLIT_MODEL)
    opts, step = build(opt, model, lr, w)
    bases = [[g["lr"] for g in o.param_groups] for o in opts]
    next_batch = batches(w, xtr, ytr, seed)
    curve = {"step": [0], "cpu_s": [0.0], "val": [_val_loss(model, w.name, xv, yv)]}
    cpu = 0.0
    for t in range(steps):
        c0 = time.process_time()
        x, y = next_batch()
        f = lr_factor(w, t)
        for o, base in zip(opts, bases):
            for g, b in zip(o.param_groups, base):
                g["lr"] = b * f
        step(x, y)
        cpu += time.process_time() - c0
        if (t + 1) % w.eval_every == 0 or t + 1 == steps:
            curve["step"].append(t + 1)
            curve["cpu_s"].append(cpu)
            curve["val"].append(_val_loss(model, w.name, xv, yv))
            if curve["val"][-1] == math.inf:  # diverged: the curve stops here
                break
    return curve


def run_one(workload: str, opt: str, lr: float, seed: int, quick_mode: bool) -> dict[str, Any]:
    """One timed run (after an untimed warm-up of the same workload and optimizer in this process, so
    imports, lazy initialisation and compiled kernels are not charged to it). Errors are returned, not
    raised: the report lists them."""
    torch.set_num_threads(1)
    w = quick(WORKLOADS[workload]) if quick_mode else WORKLOADS[workload]
    out: dict[str, Any] = {"workload": workload, "optimizer": opt, "lr": lr, "seed": seed}
    try:
        if (workload, opt) not in _WARMED:
            _train(w, opt, lr, seed + 7919, quick_mode, steps=3)
            _WARMED.add((workload, opt))
        curve = _train(w, opt, lr, seed, quick_mode, steps=w.steps)
    except Exception as e:  # an optimizer that fails on a workload is a row of the report, not a crash
        out.update(error=f"{type(e).__name__}: {e}", step=[0], cpu_s=[0.0], val=[math.inf], final=math.inf)
        return out
    out.update(curve)
    out["final"] = curve["val"][-1] if curve["step"][-1] == w.steps else math.inf
    out["ms_per_step"] = 1e3 * curve["cpu_s"][-1] / max(1, curve["step"][-1])
    return out


def interleaved_step_ms(workload: str, best_lr: dict[str, float], quick_mode: bool, rounds: int,
                        steps: int) -> dict[str, list[float]]:
    """CPU ms per training step (batch, forward, backward, ``step()``) of each optimizer at its lr, taken
    in one process in interleaved rounds: every round times ``steps`` steps of each optimizer in turn, so
    a slower or busier stretch of the machine falls on all of them alike (the tuning runs are timed one
    run at a time, two in parallel, and on the small workloads their ms per step moved by up to 1.6x
    between runs of the same optimizer). Each optimizer trains its own seed-0 model on its own batches at
    the peak lr, after 3 untimed steps. Returns the per-round ms per step."""
    torch.set_num_threads(1)
    w = quick(WORKLOADS[workload]) if quick_mode else WORKLOADS[workload]
    xtr, ytr, _, _ = data(w.name, quick_mode)
    runs = {}
    for o, lr in best_lr.items():
        model = model_for(w.name, 0, split=o in SPLIT_MODEL)
        _, step = build(o, model, lr, w)
        runs[o] = (step, batches(w, xtr, ytr, 0))
        for _ in range(3):
            step(*runs[o][1]())
    out: dict[str, list[float]] = {o: [] for o in runs}
    for _ in range(rounds):
        for o, (step, next_batch) in runs.items():
            c0 = time.process_time()
            for _ in range(steps):
                step(*next_batch())
            out[o].append(1e3 * (time.process_time() - c0) / steps)
    return out
