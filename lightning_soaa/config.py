"""Typed, frozen hyperparameter sets, validated on construction.

Every optimizer builds its config from its keyword arguments (and again for each param group, so that
per-group overrides are checked too). Error messages name the field, the value and what is allowed:
``Invalid betas[1]=1.5. Must be in [0.0, 1.0).``
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

__all__ = [
    "check_range",
    "check_choice",
    "check_int",
    "check_max_grad_norm",
    "AdamWConfig",
    "ShardingConfig",
    "config_from_group",
    "ASGOConfig",
    "DASGOConfig",
    "SOAAConfig",
    "EGNConfig",
    "REPLICA_CHECK_EVERY",
]


#: the smallest eps (and adam_eps) allowed: float32's smallest normal number. The eps of a float32 (or bfloat16)
#: model is added in float32; a smaller one rounds to a subnormal or to 0 there (1e-50 is 0), and a coordinate
#: whose gradient has been 0 so far is then 0 / 0: NaN written into the parameters (DASGO: into every entry
#: of the parameter, through its norm). Float64 models are held to the same floor: one rule for every dtype.
EPS_FLOOR = 1.1754943508222875e-38
EPS_WHY = "float32's smallest normal number: a smaller eps rounds to 0 in float32, where 0 / (0 + eps) is NaN"
#: the smallest SOAA d_min: the capped step's knee 1 / (sqrt(bc2) k1), with k1 = d c / bc2, must stay finite
#: in float32 (and k1 nonzero) at every allowed beta2; at d = 1e-60 it overflowed, 0 * inf wrote NaN into the
#: trial step and the trust state, and every later step was skipped
D_MIN_FLOOR = 1e-30
#: ``replica_check_every``'s default: the checking step's digest (one read of every replicated parameter) cost
#: 0.67-0.73 AdamW / SOAA steps on 10 x 1000x1000 float32 (2 gloo ranks, one CPU thread each), 0.07% of a step
#: amortised over 1000 steps; at most 0.06% on the report's small models (benchmarks/bench_replica_check.py)
REPLICA_CHECK_EVERY = 1000


def check_range(
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_inclusive: bool = True,
    hi_inclusive: bool = True,
    lo_from: str | None = None,
    why: str | None = None,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number in the given interval.

    Infinity is never a valid hyperparameter (``lr=inf`` would write inf into the parameters), so an
    open end of the interval is written ``inf)``. ``lo_from`` names the field the lower bound is
    (``eta2 >= eta1``): "Must be in [0.8, inf)" alone reads as if 0.8 were a constant; ``why`` says why
    the bound is what it is where that is not obvious.
    """
    # numbers.Real: numpy's scalars too (a LambdaLR whose factor is an np.float32 makes the lr one); a plain
    # float or int first (the ABC's isinstance costs ~1 us: EGN checks its α and λ at every step)
    if type(value) is not float and type(value) is not int and (
            isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise ValueError(f"Invalid {name}={value!r}. "
                         f"{_allowed(lo, hi, lo_inclusive, hi_inclusive, lo_from, why)}{_tensor_hint(value)}")
    v = float(value)
    if (not math.isfinite(v) or (lo is not None and (v < lo or (v == lo and not lo_inclusive)))
            or (hi is not None and (v > hi or (v == hi and not hi_inclusive)))):
        raise ValueError(f"Invalid {name}={value!r}. {_allowed(lo, hi, lo_inclusive, hi_inclusive, lo_from, why)}")


def _allowed(lo: float | None, hi: float | None, lo_inclusive: bool, hi_inclusive: bool, lo_from: str | None,
             why: str | None) -> str:
    """:func:`check_range`'s "Must be in ..." (made only for an error: the step checks values every time)."""
    lb = "[" if lo_inclusive and lo is not None else "("
    rb = "]" if hi_inclusive and hi is not None else ")"
    lo_s = "-inf" if lo is None else repr(float(lo))
    hi_s = "inf" if hi is None else repr(float(hi))
    source = f" (the lower bound is {lo_from}={lo!r})" if lo_from is not None else ""
    return f"Must be in {lb}{lo_s}, {hi_s}{rb}{source}" + (f" ({why})." if why else ".")


def _tensor_hint(value: Any) -> str:
    """Why a tensor is refused where a number is expected (without importing torch here)."""
    if type(value).__module__.startswith("torch") and hasattr(value, "item"):
        return (" Tensor hyperparameters are not supported (the step reads them as Python numbers); pass "
                "a Python float, e.g. float(t).")
    if isinstance(value, str):
        # "Invalid lr='1e-3'. Must be in [0.0, inf)." read as if 1e-3 were out of range
        try:
            float(value)
        except ValueError:
            return ""
        return (f" It is a string, not a number (YAML 1.1, PyYAML's, reads 1e-3 as a string: write 1.0e-3), "
                f"e.g. float({value!r}).")
    return ""


def check_int(name: str, value: Any, lo: int | None = None, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= lo (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo):
        extra = " or None" if allow_none else ""
        bound = f" >= {lo}" if lo is not None else ""
        raise ValueError(f"Invalid {name}={value!r}. Must be an integer{bound}{extra}.")


def check_batch_dims(value: Any) -> None:
    """ASGO's ``batch_dims``: 0 or 1, as an int (``True`` is an int to Python, and ``1.0`` compares equal to 1,
    but neither says which layout the user meant)."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1):
        raise ValueError(f"Invalid batch_dims={value!r}. Must be 0 (a parameter with more than two dimensions "
                         "is one matrix of shape[0] rows) or 1 (its dim 0 indexes independent matrices of "
                         "shape[1] x prod(shape[2:]), e.g. stacked expert weights).")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}={value!r}. Must be one of {', '.join(repr(c) for c in choices)}.")


def check_betas(name: str, betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid {name}={betas!r}. Must be a pair (beta1, beta2).")
    check_range(f"{name}[0]", betas[0], 0.0, 1.0, hi_inclusive=False)
    check_range(f"{name}[1]", betas[1], 0.0, 1.0, hi_inclusive=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardingConfig:
    """How an optimizer spreads its state over ranks.

    Attributes:
        shard: keep state only for owned blocks and all-gather parameters after the update. ``False``
            means the caller already partitioned the parameters (DeepSpeed ZeRO): every local block is
            owned, nothing is gathered, and only the global scalars are all-reduced. SOAA sums its
            trust-region scalars over ranks as parts of one model: on W > 1 ranks whose parameters are
            all equal (a replicated model, e.g. DDP) it refuses ``shard=False`` at the first step, and so
            does every optimizer given ``max_grad_norm`` (its norm sums the ranks' parts too); partitions
            that hold equal values (one seed on every rank) set ``opt.partitioned_by_caller = True``. (EGN,
            whose ZeRO stage is 0 only, reads ``shard=False`` as replicated state: every rank steps every
            block, and the replica checks compare its copies as they compare sharded replicas.)
        grad_reduction: ``"none"`` when gradients arrive already averaged (DDP, Lightning, DeepSpeed);
            ``"mean"`` to have the optimizer reduce-scatter and average them itself (plain torchrun
            without DDP), so each rank only receives the gradients of the blocks it owns. As DDP does, it
            averages the ranks' gradients with equal weights: with per-rank batches of different sizes and
            a mean loss per rank, that is not the gradient of the mean over the global batch (a rank's
            sample counts more on a smaller batch). Use equal per-rank batches, or weight each rank's loss
            by its share of the global batch (``loss * world * n_rank / n_global``) before ``backward()``.
            A rank with an empty batch has a NaN mean loss: its non-finite values make every rank skip
            the step (with a warning, as for any non-finite value), so give every rank a sample. With
            ``"mean"`` the ranks must start from the same weights (the optimizer does not broadcast them,
            as DDP does at wrap): replicas that differ raise on every rank at the first step after
            construction or ``load_state_dict``; with ``"none"`` too (weights loaded on rank 0 only after
            DDP's wrap).
        replica_check_every: every this many steps (W > 1 replicas: sharded ranks, EGN's ``shard=False``
            copies, an FSDP2 model's plain parameters with ``grad_reduction="mean"``; under ``"none"`` their
            gradients are compared to a
            tolerance, so honest copies may drift in their last bits) the step compares a bitwise digest of the
            replicated parameters across ranks, in its existing all-reduce, and refuses on every rank where they
            differ (DTensor ``Replicate`` pieces, whose copies drift by ulps under non-deterministic kernels: by
            more than ``replica_drift.DRIFT_RTOL`` of their largest magnitude, compared where the bits differ). It
            catches writes made on some ranks only that move no version counter, which the per-step
            in-place check cannot see (``p.data.mul_``, ``p.data = t``, a NumPy view of a parameter): the
            sharded optimizers silently trained on a mix of each owner's blocks, EGN's replicas stayed apart.
            ``0`` turns it off. The checking step reads every replicated parameter once (on one CPU thread
            about 0.7 AdamW steps of the same model); the default keeps that under 0.1% of the run
            (benchmarks/bench_replica_check.py).
    """

    shard: bool = True
    grad_reduction: str = "none"
    replica_check_every: int = REPLICA_CHECK_EVERY

    def __post_init__(self) -> None:
        if not isinstance(self.shard, bool):
            raise ValueError(f"Invalid shard={self.shard!r}. Must be True or False.")
        check_choice("grad_reduction", self.grad_reduction, ("none", "mean"))
        check_int("replica_check_every", self.replica_check_every, 0)


def check_max_grad_norm(value: Any) -> None:
    """``max_grad_norm``: None (no clipping) or a finite number > 0 (see :mod:`lightning_soaa.optim.grad_clip`)."""
    if value is not None:
        check_range("max_grad_norm", value, 0.0, lo_inclusive=False,
                    why="the bound on the global gradient norm the update reads; None clips nothing")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamWConfig:
    """AdamW (decoupled weight decay), the fallback for non-matrix parameters in ASGO."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        check_range("lr", self.lr, 0.0)
        check_betas("betas", self.betas)
        # > 0: a coordinate whose gradient has been 0 so far is 0 / (0 + eps), NaN at eps = 0
        check_range("eps", self.eps, EPS_FLOOR, why=EPS_WHY)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_max_grad_norm(self.max_grad_norm)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EGNConfig:
    """Exact Gauss-Newton (spec/algorithms.md §2.3); defaults from the authors' code unless marked.

    Attributes:
        loss: ``"mse"`` (ℓ = ½‖y − z‖²), ``"cross_entropy"`` (softmax, integer targets) or ``"bce"``
            (sigmoid logits, targets in [0, 1]); always averaged over the global batch b.
        lr: the step size α₀, or α_max when ``line_search`` is on (>= 0; 0 leaves the parameters
            unchanged).
        damping: initial λ (> 0; the bc system is solved with bλ).
        momentum: β_m of the bias-corrected EMA of directions (0 disables it).
        line_search: Armijo backtracking on the same batch.
        adaptive_damping: λ update from the gain ratio ρ.
        armijo_c, ls_decrease, ls_increase, max_ls, ls_reset: the line search (c = 0.1, ×0.8, ×1.5, 15,
            ``"increase"`` or ``"conservative"``).
        rho_low, rho_high, damping_increase, damping_decrease, damping_min, damping_max: the λ rule
            (ρ < 0.25 → λ·1.01; ρ > 0.75 → λ·0.99; λ clipped to [1e-12, 1e6]).
        solve_dtype: ``"float64"`` (default) or ``"model"``: the dtype of K and the bc×bc solve.
        max_solve_retries: Cholesky failures retried with 10·λ this many times (each one counted).
        max_gram_size: memory guard: the largest allowed bc (K is bc×bc); b for a linear model under MSE
            (K = G ⊗ I_c, a b×b solve).
        jacobian: ``"auto"`` (Gram factors for plain ``nn.Linear`` layers, and ``nn.Embedding`` tables with
            ``factor_embeddings``; explicit per-sample Jacobians for the rest) or ``"explicit"`` (explicit
            Jacobians everywhere).
        factor_embeddings: under ``jacobian="auto"``, plain ``nn.Embedding`` tables get Gram factors from
            their indices (orders of magnitude less time and memory than explicit rows of V·d columns) where
            each table is looked up per sample (a first dimension of the batch) and used only by its own
            call; a positional table looked up with ``arange(T)``, or a table also read as a weight (a head
            tied by ``F.linear(h, emb.weight)``), is then refused at the first step, naming the table. Off by
            default: every table keeps explicit rows, as before the option existed.
    """

    loss: str = "mse"
    lr: float = 0.1
    damping: float = 1.0
    momentum: float = 0.0
    line_search: bool = False
    adaptive_damping: bool = False
    armijo_c: float = 0.1
    ls_decrease: float = 0.8
    ls_increase: float = 1.5
    max_ls: int = 15
    ls_reset: str = "increase"
    rho_low: float = 0.25
    rho_high: float = 0.75
    damping_increase: float = 1.01
    damping_decrease: float = 0.99
    damping_min: float = 1e-12
    damping_max: float = 1e6
    solve_dtype: str = "float64"
    max_solve_retries: int = 6
    max_gram_size: int = 4096
    jacobian: str = "auto"
    factor_embeddings: bool = False

    def __post_init__(self) -> None:
        check_choice("loss", self.loss, ("mse", "cross_entropy", "bce"))
        check_range("lr", self.lr, 0.0)  # 0 is allowed, as in torch: warm-up schedules start there
        check_range("damping", self.damping, 0.0, lo_inclusive=False)
        check_range("momentum", self.momentum, 0.0, 1.0, hi_inclusive=False)
        for name in ("line_search", "adaptive_damping", "factor_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Invalid {name}={getattr(self, name)!r}. Must be True or False.")
        check_range("armijo_c", self.armijo_c, 0.0, 1.0, lo_inclusive=False, hi_inclusive=False)
        check_range("ls_decrease", self.ls_decrease, 0.0, 1.0, lo_inclusive=False, hi_inclusive=False)
        check_range("ls_increase", self.ls_increase, 1.0)
        check_int("max_ls", self.max_ls, 1)
        check_choice("ls_reset", self.ls_reset, ("increase", "conservative"))
        check_range("rho_low", self.rho_low, 0.0, 1.0)
        check_range("rho_high", self.rho_high, self.rho_low, 1.0, lo_from="rho_low")
        check_range("damping_increase", self.damping_increase, 1.0)
        check_range("damping_decrease", self.damping_decrease, 0.0, 1.0, lo_inclusive=False)
        check_range("damping_min", self.damping_min, 0.0, lo_inclusive=False)
        check_range("damping_max", self.damping_max, self.damping_min, lo_from="damping_min")
        check_choice("solve_dtype", self.solve_dtype, ("float64", "model"))
        check_int("max_solve_retries", self.max_solve_retries, 0)
        check_int("max_gram_size", self.max_gram_size, 1)
        check_choice("jacobian", self.jacobian, ("auto", "explicit"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SOAAConfig:
    """SOAA (spec/algorithms.md §1, variant A). See :class:`lightning_soaa.optim.soaa.SOAA`.

    Attributes:
        lr, betas, eps, weight_decay: as in AdamW (weight decay decoupled and scaled by lr).
        gamma: band factor γ in [0, 1) (default 0.05): d is clipped into the band [lo_t, hi_t] every step.
        band_schedule: ``"final"`` (default): the band is [1-γ, 1+γ] at every step; ``"paper"``: the
            spec's band (1-γ)^{(t-1)/T} .. 1+γ^{(t-1)/T}, which narrows from [1, 2] at t = 1 to [1-γ, 1+γ]
            at t = T. On a noisy mini-batch loss ρ's sign is close to a coin flip, so d sits at a band
            edge nearly every step and the band *is* the lr multiplier: "paper" multiplies the lr by
            up to ~1.9 early (d = hi through a warm-up, where the loss falls steadily), which cost 0.18
            validation loss against AdamW on a character LM (benchmarks/soaa_lm_study.py); "final" with
            the default γ = 0.05 matched AdamW there. See :class:`~lightning_soaa.optim.soaa.SOAA`.
        total_steps: T, the number of optimizer steps the "paper" band narrows over (the final band from t = T + 1);
            ``None`` uses the final band [1-γ, 1+γ] from the first step. Unused by ``"final"``.
        acceptance: ``"lagged"`` (the paper's rule, no extra forward) or ``"same_batch"`` (trial step,
            re-evaluated on the same batch through the closure; may reject).
        rho_smoothing: β_ρ in [0, 1) (default 0: the spec's per-step ρ). > 0: the lagged rule's ρ is a
            ratio of discounted sums of actual and predicted reductions over ~1/(1-β_ρ) steps
            (:func:`lightning_soaa.functional.soaa.smoothed_ratio`). Lagged acceptance only.
        trust_warmup: K >= 0 (default 0): d = 1 for the first K steps (the sums still accumulate).
            Lagged acceptance only.
        eta1, eta2: same_batch thresholds: reject when ρ < eta1, expand when ρ > eta2 (0 <= eta1 <= eta2).
        shrink, expand: same_batch factors on d after a rejection (in (0, 1)) and an expansion (>= 1).
        d_min: same_batch floor for d (> 0); the ceiling is the band's hi_t.
        compile: run the two elementwise passes as one sweep each (C loops on CPU, Triton kernels on
            CUDA, ``torch.compile``'d kernels elsewhere; see :class:`~lightning_soaa.optim.soaa.SOAA`);
            ``None`` leaves the choice to the optimizer (the environment variable
            ``LIGHTNING_SOAA_COMPILE``).
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    gamma: float = 0.05
    band_schedule: str = "final"
    total_steps: int | None = None
    acceptance: str = "lagged"
    rho_smoothing: float = 0.0
    trust_warmup: int = 0
    eta1: float = 0.25
    eta2: float = 0.75
    shrink: float = 0.5
    expand: float = 2.0
    d_min: float = 1e-3
    compile: bool | None = None
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        check_max_grad_norm(self.max_grad_norm)
        check_range("lr", self.lr, 0.0)
        check_betas("betas", self.betas)
        if self.compile is not None and not isinstance(self.compile, bool):
            raise ValueError(f"Invalid compile={self.compile!r}. Must be True, False or None.")
        # > 0: eps is also the floor of the predicted reduction the trust ratio divides by (p_0 = 0)
        check_range("eps", self.eps, EPS_FLOOR, why=EPS_WHY)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("gamma", self.gamma, 0.0, 1.0, hi_inclusive=False)
        check_choice("band_schedule", self.band_schedule, ("final", "paper"))
        check_int("total_steps", self.total_steps, 1, allow_none=True)
        check_choice("acceptance", self.acceptance, ("lagged", "same_batch"))
        check_range("rho_smoothing", self.rho_smoothing, 0.0, 1.0, hi_inclusive=False)
        check_int("trust_warmup", self.trust_warmup, 0)
        if self.acceptance == "same_batch":  # same_batch has its own rule for d; these would be ignored
            for name, off in (("rho_smoothing", 0.0), ("trust_warmup", 0)):
                if getattr(self, name) != off:
                    raise ValueError(f"Invalid {name}={getattr(self, name)!r} with acceptance='same_batch'. "
                                     f"Must be {off!r}: it applies to acceptance='lagged' only.")
        check_range("eta1", self.eta1, 0.0)
        check_range("eta2", self.eta2, self.eta1, lo_from="eta1")
        check_range("shrink", self.shrink, 0.0, 1.0, lo_inclusive=False, hi_inclusive=False)
        check_range("expand", self.expand, 1.0)
        check_range("d_min", self.d_min, D_MIN_FLOOR, 1.0,
                    why="the capped step's knee 1 / (sqrt(bc2) d c / bc2) must stay finite in float32")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ASGOConfig:
    """ASGO hyperparameters (one-sided matrix preconditioning); see :class:`lightning_soaa.ASGO`.

    ``root_iters=None`` uses the method's default iteration count; ``root_floor=None`` the map's floor for
    the statistic's dtype (``functional.linalg.root_floor``). ``adam_*`` configure the AdamW fallback for
    1-D parameters and embeddings (same ``lr``). ``nesterov`` (default True): precondition Muon's Nesterov
    direction ``beta1 M_t + (1 - beta1) G_t`` instead of ``M_t`` (matrix blocks only); ``False`` is the
    paper's rule.
    """

    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.8)
    weight_decay: float = 0.1
    rms_scale: float = 0.2
    eps: float = 1e-10
    damping: float = 0.0
    inverse_root: str = "auto"
    root_iters: int | None = None
    root_floor: float | None = None
    root_every: int | str = 1
    root_tol: float = 0.05
    root_max_every: int = 10
    max_block_size: int = 1024
    batch_dims: int = 0
    row_parts: int = 1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    adam_weight_decay: float = 0.0
    nesterov: bool = True
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        check_max_grad_norm(self.max_grad_norm)
        check_range("lr", self.lr, 0.0)
        check_betas("betas", self.betas)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("rms_scale", self.rms_scale, 0.0, lo_inclusive=False)
        check_range("eps", self.eps, 0.0)
        check_range("damping", self.damping, 0.0)
        if not isinstance(self.nesterov, bool):  # the string "false" is truthy: only a bool says which rule
            raise ValueError(f"Invalid nesterov={self.nesterov!r}. Must be True or False.")
        check_batch_dims(self.batch_dims)
        check_int("row_parts", self.row_parts, 1)
        if self.row_parts > 1 and self.batch_dims == 1:
            raise ValueError(f"Invalid row_parts={self.row_parts!r} with batch_dims=1. Must be 1: a stack of "
                             "experts is already separate matrices (batch_dims=1); row_parts splits a 2-D "
                             "matrix (a fused projection) into its parts.")
        check_choice("inverse_root", self.inverse_root,
                     ("polar_express", "newton_schulz", "eigh", "polar_express_eigh", "auto"))
        check_int("root_iters", self.root_iters, 1, allow_none=True)
        if self.root_floor is not None:
            check_range("root_floor", self.root_floor, 0.0, 1e-3,
                        why="the floor of the scaled spectrum V/s, whose eigenvalues lie in [0, 1); None takes the "
                            "statistic's dtype default, 0.0 none")
            self._check_floored_iters()
        if self.root_every != "auto":
            try:
                check_int("root_every", self.root_every, 1)
            except ValueError:
                raise ValueError(f"Invalid root_every={self.root_every!r}. Must be an integer >= 1 or "
                                 "'auto'.") from None
        check_range("root_tol", self.root_tol, 0.0)
        check_int("root_max_every", self.root_max_every, 1)
        check_int("max_block_size", self.max_block_size, 1)
        check_betas("adam_betas", self.adam_betas)
        check_range("adam_eps", self.adam_eps, EPS_FLOOR, why=EPS_WHY)
        check_range("adam_weight_decay", self.adam_weight_decay, 0.0)

    def _check_floored_iters(self) -> None:
        """An explicit floor with too few explicit iterations (``functional.linalg.floor_min_iters``): its
        polished map has negative values, an indefinite preconditioner (the default floor is then dropped)."""
        from lightning_soaa.functional.linalg import floor_min_iters

        if self.root_floor and self.root_iters is not None and self.inverse_root != "eigh" \
                and self.root_iters < floor_min_iters(self.inverse_root):
            raise ValueError(
                f"Invalid root_floor={self.root_floor!r} with root_iters={self.root_iters!r} and inverse_root="
                f"{self.inverse_root!r}. A floored map needs root_iters >= {floor_min_iters(self.inverse_root)} "
                "(after fewer Polar Express iterations the polishing steps turn roots negative); use "
                "root_floor=None (the default floor, dropped for so few iterations) or 0.0, or more root_iters.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DASGOConfig:
    """DASGO hyperparameters (diagonal one-sided variant); see :class:`lightning_soaa.DASGO`."""

    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    rms_scale: float = 0.2
    eps: float = 1e-8
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    adam_weight_decay: float = 0.0
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        check_max_grad_norm(self.max_grad_norm)
        check_range("lr", self.lr, 0.0)
        check_betas("betas", self.betas)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("rms_scale", self.rms_scale, 0.0, lo_inclusive=False)
        # > 0: a coordinate whose gradient has been 0 so far is 0 / (0 + eps), NaN at eps = 0
        check_range("eps", self.eps, EPS_FLOOR, why=EPS_WHY)
        check_betas("adam_betas", self.adam_betas)
        check_range("adam_eps", self.adam_eps, EPS_FLOOR, why=EPS_WHY)
        check_range("adam_weight_decay", self.adam_weight_decay, 0.0)


def config_from_group(cls: type, group: dict[str, Any]) -> Any:
    """Build (and so validate) ``cls`` from the matching keys of a param group. Lists become tuples
    (a YAML or JSON file gives ``betas`` as a list); anything else is left for ``cls`` to reject."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(group[k]) if isinstance(group[k], list) else group[k] for k in names if k in group}
    return cls(**kwargs)
