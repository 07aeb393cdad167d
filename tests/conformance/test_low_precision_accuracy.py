"""Low-precision accuracy, for every optimizer of the registry: a float32 or bfloat16 run is within a few times
the error of a *perfect* low-precision run of the same algorithm.

Three runs from one start (parameters representable in the low dtype; inputs and targets rounded to it):

* exact: the optimizer on the float64 model;
* perfect: the same float64 optimizer, with the parameters, their gradients, the loss it is handed and every
  state tensor that the low run keeps in a lower dtype rounded to that dtype (and back) after every step: the
  roundings a low-precision run cannot avoid, nothing else. The state is matched by its place in
  ``opt.state[p]`` (nested per block), so any optimizer's tensors are rounded without knowing their names;
  optimizer-wide scalars (SOAA's trust multiplier, EGN's damping and step size) are Python floats in every run;
* low: the optimizer on the model in the low dtype.

Metric: the largest ``‖θ − θ_exact‖ / ‖θ_exact − θ_0‖`` over the steps. The low run passes while its metric is
at most ``factor`` times the perfect run's plus ``floor`` (:data:`BOUNDS`).

Gradients: an optimizer that steps on gradients gets them from a forward pass with the parameters upcast to
float64, rounded once to the parameter's dtype (:class:`_Upcast`): its own arithmetic is under test, not the
model's float32 forward. An optimizer that takes the batch (EGN) differentiates the low-dtype model itself, so
its forward pass in the model's dtype is part of what it is held to.

Cases (one 8-16-16-4 tanh MLP but ``wide``, 12 samples a step, 6 steps, the registry's ``test_kwargs``):

* ``ordinary``: 12 distinct samples;
* ``rank_deficient``: two distinct inputs, each six times with different targets: every layer's gradient has
  rank <= 2, below the layer width (ASGO's Grams have a null space), and EGN's Gram K of the 48 residuals rank
  <= 8 (the residual outside its range is divided by bλ, and Jᵀ cancels it); at ``damping`` 1e-6 where the
  optimizer has that option, the regime of those defects (at EGN's test damping 0.5 its old float32 Jᵀv was
  within 1.35x);
* ``no_decay`` (bfloat16 and float16 only): ``ordinary`` at ``weight_decay`` 0, the other branch of the update;
* ``cross_entropy``: ``ordinary`` with a classification head: class labels and the mean cross-entropy (EGN at
  ``loss="cross_entropy"``: its Gauss-Newton factor of the softmax Hessian);
* ``ce_rank_deficient``: ``rank_deficient``'s inputs with class labels (each input's six samples split among
  classes) at the same small damping: EGN's float32 Jᵀv was 1.8e5x the perfect run here (bfloat16 2.7e5x; float16
  skipped its steps as non-finite), fixed in 4db378f;
* ``tiny`` (float32): ``ordinary`` with the loss times :data:`TINY`, so the gradients are ~1e-8 and ASGO's
  ``eps`` (1e-10) makes most of its root's scale ``s``: its float32 map's floor (2e-7 s) flattened every real
  eigenvalue there, 1e5x the perfect run's error (1.6-2.5x since; see ``BARE_MAP_RATIO`` in
  lightning_soaa/functional/linalg.py). An optimizer that takes the batch forms the loss itself: its model's
  outputs and the targets are times :data:`TINY_OUTPUTS` (residuals and Jacobian ~1e-25, their products and the
  loss ~1e-50, below float32's range) and its options in the loss's units (the registry's ``loss_unit_kwargs``:
  EGN's λ) times its square, the same algorithm on that loss. EGN summed the squared float32 residuals in float32
  (the loss 0: every line-search trial and ρ failed) and formed the momentum's g = −Jᵀr/b in float32 (0: every
  momentum direction rejected): 3.4e6x / 1.3e6x the perfect run with either left, 1.15x since;
* ``wide`` (float32; each optimizer's default route and :data:`WIDE_ROUTES`, :data:`WIDE_STEPS` steps): one
  160 -> 128 Linear (:data:`WIDE_SIZES`) on ``ordinary``'s 12 samples: a weight whose smaller side is 128 with a
  gradient of rank <= 12 (each step's batch below k), where ASGO's float32 ``P·M`` is checked for cancellation
  (from k = 96) and, on this Gram, recomputed in float64; EGN's K = G ⊗ I_c solve of c = 128 outputs.

bfloat16 and float16 runs otherwise take ``weight_decay`` 0.1 where the optimizer has it: a step that decays θ
in place before adding the update rounds a bfloat16 θ twice and loses a decay below half an ulp (1.6-1.8x and
4.2-4.6x the perfect run on the cases above, cross-entropy included, before 858fee1; float16's finer grid keeps
that decay: 1.00x either way). float16 parameters are accepted by every optimizer (no refusal to check): the
elementwise moments are float32 (``test_half_precision.py``), and what a perfect run rounds is what the low run
keeps, so a narrower state than float32 is held to its own rounding, not refused here.

Routes: each optimizer's default on a CPU and the routes users select by an option (:data:`ROUTES`; SOAA's
``acceptance="same_batch"`` under ``step(closure)``, each evaluation rounding its gradients and loss: judging
its trials at 256 roundings of the loss instead of 4, a resolution too coarse for the narrow dtypes, was 12-115x
the perfect bfloat16 run and 51-300x the float16 one); for ASGO also
``user_defaults``, its ``test_kwargs`` set back to the constructor's own defaults but ``lr`` (one block per
matrix, a root every step, no damping, in both cases): the configuration of ``ASGO(params, lr=...)``. Runs held
to a wider factor are in :data:`WIDER`, to a narrower one (a known defect below the bound) in :data:`NARROWER`,
and defects found by this test, not fixed yet, in :data:`NEW_DEFECTS`
(``xfail(strict=True)``), each with its reason and numbers. Not run, as inherently far from the perfect run:

* ASGO's explicit float32 iterations (``"polar_express"``, ``"newton_schulz"``) on rank-deficient Grams below
  ``damping`` 1e-2: the README bounds them only by damping (here 495x / 377x the perfect run at 1e-6, 63x /
  44x at 1e-4, 9.5x / 3.9x at 1e-3, 3.1x / 2.5x at 1e-2): their route runs at 1e-2;
* EGN at damping 1e-6 on the ``ordinary`` case in bfloat16 (that case keeps the test damping, 0.5): the solve
  amplifies the model's own bfloat16 forward pass, which the perfect run does not have (the float64 run moves
  9.4e-3 of its displacement under a relative change of 2^-9 in its inputs): 3.0-5.1x the perfect run over
  4 draws (float32: 4.3-6.9x);
* runs to convergence, where EGN keeps its momentum only while gᵀd < 0, a sign any rounding decides.

The same runs on W = 2 and 3 gloo ranks: ``test_low_precision_ranks.py`` (:func:`runs` with ``shares``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_soaa import registry
from lightning_soaa.registry import OptimizerSpec, StepNeeds
from tests.harness.models import batch, tiny_mlp

SIZES = (8, 16, 16, 4)
BATCH = 12
STEPS = 6
SMALL_DAMPING = 1e-6
BF16_DECAY = 0.1
CASES = ("ordinary", "rank_deficient", "no_decay", "cross_entropy", "ce_rank_deficient", "tiny", "wide")
DEFICIENT = ("rank_deficient", "ce_rank_deficient")  # the cases of two distinct inputs, at SMALL_DAMPING
CLASSES = ("cross_entropy", "ce_rank_deficient")  # the cases of a classification head
NARROW = (torch.bfloat16, torch.float16)  # the dtypes whose runs decay at BF16_DECAY
#: the loss factor of the ``tiny`` case
TINY = 1e-8
#: the outputs' and targets' factor of the ``tiny`` case for an optimizer that takes the batch (the loss's: its
#: square)
TINY_OUTPUTS = 1e-25
#: the ``wide`` case's model: one Linear whose weight's smaller side is 128 (ASGO's float32 ``P M`` is checked from
#: k = 96: asgo_math.CHECKED_PRODUCT_MIN_K)
WIDE_SIZES = (160, 128)
WIDE_STEPS = 3
#: the routes beyond each optimizer's default that run the ``wide`` case (the others cut the same blocks as the
#: default, or blocks of 4: the 128x160 weight's many small blocks cost seconds and test nothing new)
WIDE_ROUTES = (("ASGO", "user_defaults"),)  # one block per matrix: a 128 x 128 Gram
FLOAT32_ONLY = ("tiny", "wide")  # the cases run in float32 only


@dataclasses.dataclass(frozen=True)
class Bound:
    """The low run's metric may be at most ``factor`` x the perfect run's + ``floor``."""

    factor: float
    floor: float


#: float32: the current code is within 1.0-4.3x (outside WIDER and NEW_DEFECTS; 4 draws); the float32 defects
#: fixed last (ASGO's float32 iteration, EGN's float32 Jᵀv) were 495x and 3e5x here. The floor (~8 float32 ulps
#: of the displacement) keeps a perfect run that happens to round very little from failing a low run that rounds
#: a little more. bfloat16: both runs round θ to one grid, which dominates (1e-2..4e-1 of the displacement):
#: the current code is within 0.89-1.23x; θ rounded twice a step with decay was 1.6-1.8x (SOAA's eager step)
#: and 4.2-4.5x (ShardedAdamW's foreach path), which a factor of 3 would let through.
#: float16 (three more bits than bfloat16: a grid 8x finer, its floor 10x lower): the current code is within
#: 0.11-1.24x on every case and route.
BOUNDS = {torch.float32: Bound(10.0, 1e-6), torch.bfloat16: Bound(1.5, 1e-4), torch.float16: Bound(1.5, 1e-5)}


@dataclasses.dataclass(frozen=True)
class Route:
    """A way through an optimizer's step that users select: constructor options over the spec's test ones,
    and ``fused_adamw=False`` for a torch without the fused CPU AdamW kernel (the foreach path CUDA takes)."""

    name: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    fused_adamw: bool = True
    closure: bool = False


DEFAULT = Route("default")


def _constructor_defaults(name: str, keep: tuple[str, ...] = ("lr",)) -> dict[str, Any]:
    """The options of ``name``'s ``test_kwargs`` but ``keep``, at its config's defaults: a route over them runs
    what a user who passes only ``keep`` runs."""
    spec = registry.get(name)
    default = {f.name: f.default for f in dataclasses.fields(spec.load_config())}
    return {k: default[k] for k in spec.test_kwargs if k not in keep}


#: the routes beyond each optimizer's default, by registry name
ROUTES: dict[str, tuple[Route, ...]] = {
    # the default on a CPU is the native C loops; compile=False the eager torch ops
    "SOAA": (Route("eager_foreach", {"compile": False, "foreach": True}),
             Route("eager_single", {"compile": False, "foreach": False}),
             # the trust region judged on the step's own batch: step(closure), evaluated again after the trial
             Route("same_batch", {"acceptance": "same_batch"}, closure=True)),
    # the test_kwargs' root_every="auto" reuses roots; ASGO's default schedule takes one every step
    "ASGO": (Route("user_defaults", _constructor_defaults("ASGO")),
             Route("root_every_1", {"root_every": 1}),
             Route("eigh", {"inverse_root": "eigh", "root_every": 1}),
             # the float32 iteration: bounded on rank-deficient Grams by damping (module docstring)
             Route("polar_express", {"inverse_root": "polar_express", "root_every": 1, "damping": 1e-2})),
    "AdamW": (Route("foreach", fused_adamw=False),),
}

#: (optimizer, route, dtype, case): a factor wider than BOUNDS' and why. Each range is over 12 draws of the
#: model and the data (the seeds of tiny_mlp and batch; this test's draw is the first), this CPU, one thread.
WIDER: dict[tuple[str, str, str, str], tuple[float, str]] = {}

#: (optimizer, route, dtype, case): a factor narrower than BOUNDS' where a known defect lies between the measured
#: range and the bound, and why (8 draws, this CPU, one thread).
NARROWER: dict[tuple[str, str, str, str], tuple[float, str]] = {
    ("ASGO", "user_defaults", "float32", "wide"): (
        1.0, "0.60-0.63x; the float32 P·M not checked for cancellation (asgo_math.precondition_checked, which "
             "recomputes every vector of it here) 1.72-1.78x: a perfect run that rounds ASGO's 128 x 128 root and "
             "Gram after every step is itself ~2e-4 off the float64 one, so the GEMM's cancellation is a ~3x effect "
             "here, not the 10-15x of tests/unit/test_asgo_float32_accuracy.py's yardstick"),
}

#: (optimizer, route, dtype, case): defects found by this test, not fixed yet (strict xfail: a fix makes it pass).
#: Fixed: ASGO took its float32 roots from the Gram after rounding it to float32, where a rank-deficient Gram's
#: small and null eigenvalues are rounding: over 12 draws the default route 11-1176x (rank_deficient),
#: ``user_defaults`` 51-474x (ordinary: batch 12 < width 16), ``root_every_1`` 3.8-41x (rank_deficient); with
#: the Gram formed in float64 and rooted before its rounding (ASGO's ``_wide_gram``) 2.1-2.9x, 0.91-3.5x,
#: 2.1-2.9x, and ``eigh`` (rank_deficient, held to 100x for 0.2-28x) 0.18-0.75x.
NEW_DEFECTS: dict[tuple[str, str, str, str], str] = {}


def _config_fields(spec: OptimizerSpec) -> set[str]:
    return {f.name for f in dataclasses.fields(spec.load_config())}


def _options(spec: OptimizerSpec, route: Route, dtype: torch.dtype, case: str) -> dict[str, Any]:
    fields = _config_fields(spec)
    out = dict(spec.test_kwargs)
    if case in DEFICIENT and "damping" in fields:
        out["damping"] = SMALL_DAMPING
    if case in CLASSES and "loss" in fields:
        out["loss"] = "cross_entropy"
    if case == "tiny":  # the same algorithm on the loss times TINY_OUTPUTS² (registry: loss_unit_kwargs)
        config = {f.name: f.default for f in dataclasses.fields(spec.load_config())}
        out.update({k: out.get(k, config[k]) * TINY_OUTPUTS ** 2 for k in spec.loss_unit_kwargs})
    if "weight_decay" in fields:
        if case == "no_decay":
            out["weight_decay"] = 0.0
        elif dtype in NARROW:
            out["weight_decay"] = BF16_DECAY
    return {**out, **route.options}


def _sizes(case: str) -> tuple[int, ...]:
    return WIDE_SIZES if case == "wide" else SIZES


def _output_scale(spec: OptimizerSpec, case: str) -> float:
    """The factor of the model's outputs and targets: ``tiny``'s for an optimizer that forms the loss itself from
    them (it is handed no loss to scale), else 1."""
    return TINY_OUTPUTS if case == "tiny" and spec.needs is StepNeeds.BATCH else 1.0


def _data(case: str, t: int, dtype: torch.dtype, rank: int = 0, world: int = 1,
          scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s share of step ``t``'s batch (of ``world`` equal shares) in float64, its values rounded to
    ``dtype`` (cross-entropy: class labels; the targets times ``scale`` first)."""
    sizes = _sizes(case)
    x, y = batch(t, 0, n=BATCH, d_in=sizes[0], d_out=sizes[-1])
    if case in DEFICIENT:
        x = x[:2].repeat(BATCH // 2, 1)
    y = y.argmax(dim=-1) if case in CLASSES else (y * scale).to(dtype).double()
    n = BATCH // world
    return x.to(dtype).double()[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def _loss(case: str) -> Any:
    """The objective of ``case``, in the outputs' dtype: mean cross-entropy over classes, or ``half_mse``."""
    if case == "tiny":  # (an optimizer that takes the batch forms its own: its outputs are scaled, _ScaledOutputs)
        return lambda out, target: TINY * registry.half_mse(out, target)
    return nn.functional.cross_entropy if case in CLASSES else registry.half_mse


class _ScaledOutputs(nn.Module):
    """The model with its outputs times ``scale``: residuals and Jacobian that small (``tiny``, for an optimizer
    that forms the loss itself)."""

    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.model(x) * self.scale
        return out


class _Upcast(nn.Module):
    """The model's forward with its parameters upcast to float64: the gradient reaches a low-dtype parameter
    rounded once (the exact gradient at the low-dtype parameters, stored in their dtype)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        wide = {n: p.double() for n, p in self.model.named_parameters()}
        out: Tensor = torch.func.functional_call(self.model, wide, (x.double(),))
        return out


def _state_tensors(opt: Any, model: nn.Module) -> dict[tuple[Any, ...], Tensor]:
    """Every floating tensor of ``opt.state``, by (parameter position, key, ...): whole-parameter or per block."""
    out: dict[tuple[Any, ...], Tensor] = {}

    def walk(d: dict[Any, Any], path: tuple[Any, ...]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, path + (k,))
            elif isinstance(v, Tensor) and v.is_floating_point():
                out[path + (k,)] = v

    for i, p in enumerate(model.parameters()):
        walk(opt.state.get(p, {}), (i,))
    return out


@torch.no_grad()
def _round_like_low(perfect: tuple[nn.Module, Any], low: tuple[nn.Module, Any], dtype: torch.dtype) -> None:
    """Round the perfect run's parameters to ``dtype`` and each of its state tensors to the dtype the low run
    keeps that tensor in."""
    for p in perfect[0].parameters():
        p.copy_(p.to(dtype))
    kept = _state_tensors(low[1], low[0])
    ours = _state_tensors(perfect[1], perfect[0])
    assert ours.keys() == kept.keys(), sorted(map(str, ours.keys() ^ kept.keys()))
    for path, v in ours.items():
        if kept[path].dtype != v.dtype:
            v.copy_(v.to(kept[path].dtype))


def _step(spec: OptimizerSpec, model: nn.Module, opt: Any, t: int, case: str, dtype: torch.dtype,
          run: str, route: Route = DEFAULT, rank: int = 0, world: int = 1, shares: int = 1) -> None:
    """One step of run ``run`` ("exact", "perfect" or "low") through the registry's driver (under a closure
    for a route that takes one), on rank ``rank``'s share of the batch. ``shares`` > 1: the perfect run of
    ``shares`` ranks (:func:`_shares_step`)."""
    x, y = _data(case, t, dtype, rank, world, _output_scale(spec, case))
    own = next(model.parameters()).dtype
    forward = model if spec.needs is StepNeeds.BATCH else _Upcast(model)
    objective = _loss(case)

    def loss_fn(out: Tensor, target: Tensor) -> Tensor:  # the loss a low-precision loop hands the optimizer
        value: Tensor = objective(out, target)
        return value if run == "exact" else value.to(dtype).to(out.dtype)

    def round_gradients() -> None:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.copy_(p.grad.to(dtype))

    x, y = x.to(own), y if case in CLASSES else y.to(own)
    hook = round_gradients if run == "perfect" else None
    if run == "perfect" and shares > 1 and spec.needs is not StepNeeds.BATCH:
        _shares_step(spec, model, opt, shares, lambda r: _data(case, t, dtype, r, shares), objective, dtype, route)
    elif route.closure:
        _closure_step(model, opt, forward, x, y, loss_fn, hook)
    else:
        spec.take_step(opt, forward, x, y, loss_fn, on_gradients=hook)


def _shares_step(spec: OptimizerSpec, model: nn.Module, opt: Any, world: int,
                 share: Callable[[int], tuple[Tensor, Tensor]], objective: Callable[[Tensor, Tensor], Tensor],
                 dtype: torch.dtype, route: Route) -> None:
    """A perfect step of ``world`` data-parallel ranks: each rank's gradient and loss come out of its backward
    in ``dtype`` (``share(r)``: rank r's batch); their mean is taken exactly and rounded once. The optimizer
    cannot avoid a rank's own rounding: it is handed the narrow gradients (a component whose ranks' parts nearly
    cancel may change sign, and Adam's first step moves it by ±lr either way)."""
    forward = _Upcast(model)

    def closure() -> Tensor:
        total = [torch.zeros_like(p) for p in model.parameters()]
        loss = 0.0
        for r in range(world):
            x, y = share(r)
            model.zero_grad(set_to_none=True)
            value = objective(forward(x), y)
            value.backward()
            loss += float(value.detach().to(dtype))
            for acc, p in zip(total, model.parameters()):
                acc.add_(p.grad.to(dtype).double())  # type: ignore[union-attr]  # every parameter is reached
        for acc, p in zip(total, model.parameters()):
            p.grad = acc.div_(world).to(dtype).double()
        return torch.tensor(loss / world, dtype=torch.float64).to(dtype).double()

    if route.closure:
        opt.step(closure)
    elif spec.needs is StepNeeds.LOSS:
        opt.step(loss=closure())
    else:
        closure()
        opt.step()


def _closure_step(model: nn.Module, opt: Any, forward: nn.Module, x: Tensor, y: Tensor,
                  loss_fn: Callable[[Tensor, Tensor], Tensor], on_gradients: Callable[[], None] | None) -> None:
    """``opt.step(closure)``: each evaluation a backward, its gradients (and loss) rounded as a low loop's."""

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(forward(x), y)
        loss.backward()
        if on_gradients is not None:
            on_gradients()
        return loss.detach()

    opt.step(closure)


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


@dataclasses.dataclass(frozen=True)
class Runs:
    """One optimizer, route, dtype and case: the perfect and low runs' metrics, and the float64 run's path
    (θ_0, then θ after each step) for a run elsewhere (on W ranks) to be measured against (:func:`metric`)."""

    perfect: float
    low: float
    exact: list[Tensor]


def metric(path: list[Tensor], exact: list[Tensor]) -> float:
    """``max_t ‖θ_t − θ_exact,t‖ / ‖θ_exact,t − θ_0‖`` over the steps after which the float64 run has moved (a
    step the trust region rejects leaves it in place)."""
    moved = [float((e - exact[0]).norm()) for e in exact[1:]]
    assert moved[-1] > 0.0, f"the float64 run did not move in {len(moved)} steps"
    return max((float((p - e).norm()) / m for p, e, m in zip(path, exact[1:], moved) if m > 0.0), default=0.0)


def start_model(dtype: torch.dtype, case: str = "ordinary") -> nn.Module:
    """The model every run of ``case`` starts from, in ``dtype`` (its parameters representable in the low dtype)."""
    return tiny_mlp(0, dtype, sizes=_sizes(case))


def trained(spec: OptimizerSpec, case: str, model: nn.Module) -> nn.Module:
    """What the optimizer of ``spec`` is built on and steps through: ``model``, its outputs scaled where the case
    scales them (:func:`_output_scale`)."""
    scale = _output_scale(spec, case)
    return model if scale == 1.0 else _ScaledOutputs(model, scale)


def runs(spec: OptimizerSpec, route: Route, dtype: torch.dtype, case: str, shares: int = 1) -> Runs:
    """The exact, perfect and low runs of one optimizer, route, dtype and case (one process); ``shares``: the
    perfect run that of as many data-parallel ranks (:func:`_shares_step`)."""
    start = start_model(dtype, case)
    dtypes = {"exact": torch.float64, "perfect": torch.float64, "low": dtype}
    models = {k: trained(spec, case, copy.deepcopy(start).to(d)) for k, d in dtypes.items()}
    kw = _options(spec, route, dtype, case)
    opts = {k: spec.build(m, **kw) for k, m in models.items()}
    paths: dict[str, list[Tensor]] = {k: [_flat(m)] for k, m in models.items()}
    for t in range(WIDE_STEPS if case == "wide" else STEPS):
        for k in dtypes:
            _step(spec, models[k], opts[k], t, case, dtype, k, route, shares=shares)
        _round_like_low((models["perfect"], opts["perfect"]), (models["low"], opts["low"]), dtype)
        for k, m in models.items():
            paths[k].append(_flat(m))
    exact = paths["exact"]
    return Runs(metric(paths["perfect"][1:], exact), metric(paths["low"][1:], exact), exact)


def errors(spec: OptimizerSpec, route: Route, dtype: torch.dtype, case: str) -> tuple[float, float]:
    """(the perfect run's metric, the low run's metric) for one optimizer, route, dtype and case."""
    r = runs(spec, route, dtype, case)
    return r.perfect, r.low


def _cases() -> Iterator[Any]:
    for spec in registry.REGISTRY:
        for route in (DEFAULT, *ROUTES.get(spec.name, ())):
            for dtype in BOUNDS:
                for case in CASES:
                    if case == "no_decay" and (dtype not in NARROW or "weight_decay" not in _config_fields(spec)):
                        continue  # float32 runs decay at test_kwargs' rate; without the option: "ordinary"
                    if case in FLOAT32_ONLY and dtype != torch.float32:
                        continue  # bfloat16's own grid dominates
                    if case == "wide" and route is not DEFAULT and (spec.name, route.name) not in WIDE_ROUTES:
                        continue
                    key = (spec.name, route.name, str(dtype).removeprefix("torch."), case)
                    marks = [pytest.mark.xfail(strict=True, reason=NEW_DEFECTS[key])] if key in NEW_DEFECTS else []
                    yield pytest.param(spec, route, dtype, case, marks=marks, id="-".join(key))


@pytest.mark.parametrize(("spec", "route", "dtype", "case"), list(_cases()))
def test_low_precision_run_is_within_a_few_times_the_perfect_one(spec: OptimizerSpec, route: Route,
                                                                 dtype: torch.dtype, case: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if not route.fused_adamw:
        monkeypatch.setattr(torch, "_fused_adamw_", None)
    perfect, low = errors(spec, route, dtype, case)
    bound = BOUNDS[dtype]
    key = (spec.name, route.name, str(dtype).removeprefix("torch."), case)
    if key in WIDER or key in NARROWER:
        bound = dataclasses.replace(bound, factor={**WIDER, **NARROWER}[key][0])
    assert low <= bound.factor * perfect + bound.floor, (
        f"{spec.name} ({route.name}, {key[2]}, {case}): {low:.3g} off the float64 run, the perfect {key[2]} run "
        f"{perfect:.3g} ({low / perfect:.1f}x; allowed {bound.factor}x + {bound.floor:g})")


def test_the_tables_name_registered_optimizers_and_routes() -> None:
    """A renamed optimizer or route would leave its wider bound or its xfail silently unused."""
    routes = {(s.name, r.name) for s in registry.REGISTRY for r in (DEFAULT, *ROUTES.get(s.name, ()))}
    assert set(ROUTES) <= set(registry.names())
    assert set(WIDE_ROUTES) <= routes, WIDE_ROUTES
    for name, route, dtype, case in (*WIDER, *NARROWER, *NEW_DEFECTS):
        assert (name, route) in routes and case in CASES, (name, route, case)
        assert dtype in {str(d).removeprefix("torch.") for d in BOUNDS}, dtype
