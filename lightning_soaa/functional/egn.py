"""Exact Gauss-Newton math in the bc×bc mini-batch space (spec/algorithms.md §2). Pure torch.

Notation (§2.1): b samples, c outputs each, model outputs ``z`` of shape ``[b, c]``, loss
L_b = (1/b) Σ_i ℓ(y_i, z_i). Row ``i*c + k`` of the stacked Jacobian J is ∂z_ik/∂w, so every bc-vector
here is laid out sample-major. r = −∇_zℓ is the pseudo-residual and Q = blockdiag_i(∇²_zℓ_i) = S Sᵀ
with per-sample factors ``S[i]`` of shape [c, c'] (``None`` stands for Q = I). Cross-entropy's Q_i has rank
c − 1, so its factor has c' = c − 1 columns and the system below is b(c−1)×b(c−1) (0.73x the Cholesky
work at c = 10), the same step.

Direction (Duncan-Guttman, §2.2): d = Jᵀv with v = (QK + bλI)⁻¹ r and K = JJᵀ. Because QK + bλI is not
symmetric when Q ≠ I, it is solved in the SPD form (INFERRED, exact):

    A = SᵀKS + bλI,     v = (r − S A⁻¹ Sᵀ K r) / (bλ)

which is the push-through identity (bλI + S·SᵀK)⁻¹ = (1/bλ)[I − S(bλI + SᵀKS)⁻¹SᵀK].

A is solved directly (:func:`solve_damped`: Cholesky, optionally of a float32 matrix refined to float64
accuracy) or, given only x ↦ SᵀKS·x, by conjugate gradients (:func:`solve_damped_cg`) to a guaranteed
forward error, since A ⪰ bλI.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "LOSSES",
    "check_outputs_targets",
    "loss_sum",
    "residual_and_factor",
    "apply_q",
    "ce_factor",
    "apply_s",
    "apply_st",
    "q_norm_sq",
    "SolveResult",
    "solve_coefficients",
    "solve_damped",
    "CG_TOL",
    "conjugate_gradient",
    "solve_damped_cg",
    "directional_derivative",
    "gradient_scale",
    "model_change",
    "gain_ratio",
    "armijo_ok",
    "update_damping",
]

LOSSES = ("mse", "cross_entropy", "bce")


def check_outputs_targets(loss: str, outputs: Tensor, targets: Tensor) -> None:
    """Raise ``ValueError`` unless ``outputs`` ([b, c]) and ``targets`` fit ``loss``."""
    if loss not in LOSSES:
        raise ValueError(f"Invalid loss={loss!r}. Must be one of {', '.join(repr(x) for x in LOSSES)}.")
    if outputs.dim() != 2:
        # a language model's [batch, time, classes] logits: flattening them (the old advice) only moved the
        # refusal to the targets' shape
        advice = ("loss='cross_entropy' takes one class per sample, so per-position (token) cross-entropy "
                  "over [batch, time, classes] logits is not supported" if loss == "cross_entropy" and
                  outputs.dim() > 2 else "reshape the model's output, e.g. a final nn.Flatten, or use c = 1 columns")
        raise ValueError(
            f"EGN needs model outputs of shape [batch, outputs]; got shape {tuple(outputs.shape)} ({advice})."
        )
    b, c = outputs.shape
    if loss == "cross_entropy":
        if targets.shape != (b,) or targets.is_floating_point() or targets.is_complex():
            raise ValueError(
                f"loss='cross_entropy' needs integer class targets of shape [{b}]; got "
                f"{tuple(targets.shape)} of dtype {targets.dtype}."
            )
        if b:
            lo_t, hi_t = torch.aminmax(targets)  # one reduction for both ends (a step pays per op)
            lo, hi = int(lo_t), int(hi_t)
            if lo < 0 or hi >= c:
                pad = (" (padding labels, torch's ignore_index such as -100, are not supported: every sample "
                       "needs a class)" if lo < 0 else "")
                raise ValueError(f"loss='cross_entropy' needs targets in [0, {c}); got values in [{lo}, {hi}]{pad}.")
        if c < 2:
            raise ValueError(f"loss='cross_entropy' needs at least 2 output classes; got c={c}.")
    else:
        if tuple(targets.shape) != (b, c):
            raise ValueError(
                f"loss={loss!r} needs targets of the outputs' shape [{b}, {c}]; got {tuple(targets.shape)}."
            )
        if not targets.is_floating_point():
            raise ValueError(f"loss={loss!r} needs floating-point targets; got dtype {targets.dtype}.")
        if loss == "bce" and targets.numel():
            # outside [0, 1] the loss is unbounded below: EGN would train towards it, not refuse it
            lo_p, hi_p = torch.aminmax(targets)
            lo_f, hi_f = float(lo_p), float(hi_p)
            if lo_f < 0.0 or hi_f > 1.0:  # NaN targets pass: a non-finite loss skips the step, as for mse
                raise ValueError(f"loss='bce' needs targets in [0, 1] (probabilities); got values in [{lo_f}, {hi_f}].")


def _labels(y: Tensor) -> Tensor:
    """Class targets as int64; ``y`` itself when it already is (``.long()`` is an ATen call even then)."""
    return y if y.dtype == torch.int64 else y.long()


def loss_sum(loss: str, z: Tensor, y: Tensor) -> Tensor:
    """Σ_i ℓ(y_i, z_i) (a sum over samples: the caller divides by the global batch size). Under MSE the squares
    of a narrower model's residuals are summed in float64: a float32 residual below ~1e-19 has a square below
    float32's normal range (outputs and targets ~1e-25: the loss 0, and the line search, ρ and so λ then judged
    every trial a failure; EGN 1e6x a perfect float32 run off the float64 one). A sum beyond the model dtype's
    range is inf, as it was in that dtype: a step to a loss that overflows there is never taken."""
    if loss == "mse":
        r = y - z
        if r.dtype == torch.float64:
            return 0.5 * r.pow(2).sum()
        total = 0.5 * r.double().pow(2).sum()
        return total.masked_fill(total > torch.finfo(r.dtype).max, math.inf)  # (NaN stays NaN)
    if loss == "cross_entropy":
        return torch.nn.functional.cross_entropy(z, _labels(y), reduction="sum")
    if loss == "bce":
        # in z's dtype: torch returns this loss in the targets' dtype (bfloat16 targets made the line
        # search's f0 a bfloat16 number, compared with float64 trial losses)
        return torch.nn.functional.binary_cross_entropy_with_logits(z, y.to(z.dtype), reduction="sum")
    raise ValueError(f"Invalid loss={loss!r}. Must be one of {', '.join(repr(x) for x in LOSSES)}.")


def residual_and_factor(loss: str, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
    """The pseudo-residual r = −∇_zℓ ([b, c]) and S ([b, c, c'], Q_i = S_i S_iᵀ; ``None`` for Q = I).

    c' = c for BCE (S diagonal) and c' = c − 1 for cross-entropy (:func:`ce_factor`)."""
    if loss == "mse":
        return y - z, None
    if loss == "cross_entropy":
        p = torch.softmax(z, dim=-1)
        # the one-hot targets written directly in z's dtype: one_hot would check the labels' range again
        # (two host reads; check_outputs_targets did) and build an int64 matrix first
        r = torch.zeros_like(z).scatter_(1, _labels(y).unsqueeze(1), 1.0) - p
        return r, ce_factor(p)
    if loss == "bce":
        sig = torch.sigmoid(z)
        return y - sig, torch.diag_embed((sig * (1 - sig)).sqrt())
    raise ValueError(f"Invalid loss={loss!r}. Must be one of {', '.join(repr(x) for x in LOSSES)}.")


def ce_factor(p: Tensor) -> Tensor:
    """L [b, c, c−1] with L_i L_iᵀ = diag(p_i) − p_i p_iᵀ (the softmax cross-entropy Hessian, rank c − 1).

    With s = √p (‖s‖ = 1), diag(p) − ppᵀ = diag(s)(I − ssᵀ)diag(s), and I − ssᵀ = U Uᵀ for any orthonormal
    basis U of s^⊥. U is the Householder reflection H = I − wwᵀ/(1 + s_c), w = s + e_c (H s = −e_c), without
    its last column; the denominator wᵀw/2 = 1 + s_c lies in [1, 2] whatever p is (the sign of e_c is the one
    that never cancels), so no pivot class is needed. L_i = diag(s_i) U_i.
    """
    s = p.sqrt()
    w = s.clone()
    w.select(1, -1).add_(1.0)  # s + e_c: 3 ATen calls (slicing both parts and a cat made 4)
    u = w.unsqueeze(2) * (s[:, :-1] / w[:, -1:]).unsqueeze(1)
    u.neg_().diagonal(dim1=1, dim2=2).add_(1.0)  # I − wwᵀ/(1 + s_c), first c − 1 columns, no eye built
    return s.unsqueeze(2) * u


def _apply_s(s: Tensor, u: Tensor) -> Tensor:
    """S u for a bc'-vector u (blockwise S_i u_i): a bc-vector."""
    b, _, cp = s.shape
    return torch.bmm(s, u.view(b, cp, 1)).reshape(-1)


def _apply_st(s: Tensor, u: Tensor) -> Tensor:
    """Sᵀ u for a bc-vector u: a bc'-vector."""
    b, c, _ = s.shape
    return torch.bmm(u.view(b, 1, c), s).reshape(-1)


def apply_s(s: Tensor | None, u: Tensor) -> Tensor:
    """S u (u itself when ``s`` is None, i.e. S = I); u has b·c' entries, the result b·c."""
    return u if s is None else _apply_s(s, u)


def apply_st(s: Tensor | None, u: Tensor) -> Tensor:
    """Sᵀ u (u itself when ``s`` is None); u has b·c entries, the result b·c'."""
    return u if s is None else _apply_st(s, u)


def apply_q(s: Tensor | None, u: Tensor) -> Tensor:
    """Q u = S Sᵀ u (identity when ``s`` is None)."""
    return u if s is None else _apply_s(s, _apply_st(s, u))


def q_norm_sq(s: Tensor | None, u: Tensor) -> Tensor:
    """uᵀQu = ‖Sᵀu‖²."""
    w = u if s is None else _apply_st(s, u)
    return w.dot(w)


@dataclasses.dataclass
class SolveResult:
    """The bc-vector v, the damping the solve succeeded with, and how many retries it took.

    ``refine_failed``: a mixed-precision solve (:func:`solve_damped` with ``apply_base``) could not reach
    float64 accuracy (its low-precision Cholesky failed or the refinement stagnated); the caller must
    solve again in float64. ``refinements``: refinement sweeps taken."""

    v: Tensor
    damping: float
    fallbacks: int
    ok: bool
    refine_failed: bool = False
    refinements: int = 0
    cg_iterations: int = 0  # operator applications of a conjugate-gradient solve (0: a direct solve)


#: iterative refinement stops when the error it estimates is below this fraction of the solution: the last
#: correction, or, where the corrections shrink fast (by REFINE_RATE or more), the error left after it,
#: ‖dx‖·θ/(1 − θ) with θ = ‖dx‖/‖dx_prev‖ (the sweeps' measured contraction; see _cholesky_refined)
REFINE_TOL = 1e-14
#: the largest measured contraction θ from which the error left after a correction is estimated as
#: ‖dx‖·θ/(1 − θ) (one sweep fewer); a slower refinement waits for a correction below REFINE_TOL itself
REFINE_RATE = 1e-3
#: a refinement that stagnates (correction shrinking by less than 2×) is accepted only below this
#: relative size: there the float64 solve itself is no more accurate (forward error ≈ κ·eps64).
REFINE_STAGNATION_OK = 1e-10


def solve_coefficients(
    k: Tensor, r: Tensor, s: Tensor | None, batch_size: int, damping: float, *, max_retries: int = 6,
    kr: Tensor | None = None,
) -> SolveResult:
    """Solve (QK + bλI) v = r through its SPD form with Cholesky, from a dense K.

    On a Cholesky failure (or a non-finite v) λ is multiplied by 10 and the solve retried, at most
    ``max_retries`` times (spec §2.7); the returned ``damping`` is the λ actually used. ``ok=False``
    means every try failed (the caller skips the step).

    Args:
        k: the Gram matrix JJᵀ, [bc, bc], in the solve dtype.
        r: the pseudo-residual, [bc].
        s: per-sample factors of Q, [b, c, c'], or ``None`` for Q = I (the system is then bc'×bc').
        batch_size: the global b (the system is damped with bλ).
        damping: λ > 0.
        kr: K·r when the caller has it already.
    """
    # Cholesky reads one triangle only, so K's round-off asymmetry needs no symmetrising pass.
    st_kr = apply_st(s, k @ r if kr is None else kr)
    if s is not None:
        base = _st_k_s(s, k)
    else:
        base = k.clone()  # solve_damped writes the damping into base's diagonal
    return solve_damped(base, r, st_kr, s, batch_size, damping, max_retries=max_retries)


def _st_k_s(s: Tensor, k: Tensor) -> Tensor:
    """SᵀKS[(i,k),(j,l)] = Σ_{a,e} S_i[a,k] K[(i,a),(j,e)] S_j[e,l] as two batched products, in the order
    einsum("iak,iajb,jbl->ikjl") contracts (the same bits; einsum's own permutes and reshapes cost 3x the
    ops on a small system)."""
    b, c, cp = s.shape
    y = torch.bmm(s.transpose(1, 2), k.view(b, c, b * c))  # [i, k, (j,e)]: Σ_a S_i[a,k] K[(i,a),(j,e)]
    z = torch.bmm(y.view(b * cp, b, c).transpose(0, 1), s)  # [j, (i,k), l]: Σ_e (...)[(i,k),(j,e)] S_j[e,l]
    return z.permute(1, 0, 2).reshape(b * cp, b * cp)


def solve_damped(
    base: Tensor, r: Tensor, st_kr: Tensor, s: Tensor | None, batch_size: int, damping: float, *,
    max_retries: int = 6, apply_base: Callable[[Tensor], Tensor] | None = None, max_refine: int = 10,
) -> SolveResult:
    """v from ``base`` = SᵀKS (K when ``s`` is None): A = base + bλI, w = A⁻¹SᵀKr,
    v = (r − S w)/(bλ) (v = A⁻¹ r when Q = I), with the λ×10 retries of :func:`solve_coefficients`.

    With ``apply_base`` (the exact product x ↦ base·x in ``r``'s dtype, e.g. float64 from the Gram
    factors) ``base`` may be held in a lower precision (float32): its Cholesky factor is then only a
    preconditioner and the solution is refined with residuals in ``r``'s dtype until the correction is
    below :data:`REFINE_TOL`. Where that cannot reach ``r``'s accuracy, ``refine_failed`` is set and
    nothing else is decided (no λ retry: the caller re-solves in full precision).

    With ``s`` None, ``r`` may also be an [n, m] block of right-hand sides sharing ``base`` (the m = c
    systems of a Kronecker K = G ⊗ I_c, n = b); ``v`` then has that shape.

    ``base`` is overwritten (its diagonal holds the damping on return).
    """
    rhs = r if s is None else st_kr
    lam = float(damping)
    fallbacks = 0
    added = 0.0  # the damping now on base's diagonal: updated in place, a bc×bc copy costs as much
    for attempt in range(max_retries + 1):  # as several triangular solves
        lam_b = batch_size * lam
        base.diagonal().add_(lam_b - added)
        added = lam_b
        chol, info = torch.linalg.cholesky_ex(base)
        factored = int(info) == 0  # one host read of the status
        if not factored and apply_base is not None:
            return SolveResult(torch.full_like(r, float("nan")), lam, fallbacks, False, refine_failed=True)
        if factored:
            w, sweeps = _cholesky_refined(chol, rhs, lam_b, apply_base, max_refine)
            if w is None:
                return SolveResult(torch.full_like(r, float("nan")), lam, fallbacks, False,
                                   refine_failed=True, refinements=sweeps)
            v = w if s is None else (r - _apply_s(s, w)) / lam_b
            if bool(torch.isfinite(v).all()):
                return SolveResult(v, lam, fallbacks, True, refinements=sweeps)
        if attempt < max_retries:
            lam *= 10.0
            fallbacks += 1
    return SolveResult(torch.full_like(r, float("nan")), lam, fallbacks, False)


def _cholesky_refined(chol: Tensor, rhs: Tensor, lam_b: float, apply_base: Callable[[Tensor], Tensor] | None,
                      max_refine: int) -> tuple[Tensor | None, int]:
    """x = (base + λ_b I)⁻¹ rhs from a Cholesky factor; refined in ``rhs``'s dtype when ``apply_base``
    is given (classic mixed-precision iterative refinement). None: the refinement did not converge."""
    def lowp_solve(u: Tensor) -> Tensor:
        # two triangular solves: ~4x faster than cholesky_solve for one right-hand side on CPU
        # the casts only where the dtypes differ (the mixed-precision solve): a no-op cast is an ATen call
        uc = u if u.dtype == chol.dtype else u.to(chol.dtype)
        column = uc.dim() == 1  # one right-hand side, else a [n, m] block of them (a Kronecker system)
        y = torch.linalg.solve_triangular(chol, uc.unsqueeze(1) if column else uc, upper=False)
        x: Tensor = torch.linalg.solve_triangular(chol.mH, y, upper=True)
        x = x.squeeze(1) if column else x
        return x if x.dtype == rhs.dtype else x.to(rhs.dtype)

    x = lowp_solve(rhs)
    if apply_base is None:
        return x, 0
    prev = math.inf
    last = float(x.norm())  # (x = 0 + x: the first correction, against which the first sweep's is measured)
    for sweep in range(1, max_refine + 1):
        dx = lowp_solve(rhs - apply_base(x) - lam_b * x)
        x = x + dx
        nd, nx = float(dx.norm()), float(x.norm())
        if not math.isfinite(nd) or not math.isfinite(nx):
            return None, sweep
        if nd <= REFINE_TOL * nx or _converged(nd, last, nx):
            return x, sweep
        if nd > 0.5 * prev:  # stagnating: at the float64 noise floor, or the factor is too inaccurate
            return (x if nd <= REFINE_STAGNATION_OK * nx else None), sweep
        prev = last = nd
    return None, max_refine


def _converged(nd: float, last: float, nx: float) -> bool:
    """Whether the error left after a correction of norm ``nd`` (the one before it ``last``) is below
    REFINE_TOL·``nx``, estimated from the sweeps' contraction θ = nd/last where θ ≤ REFINE_RATE.

    Why it holds: with the low-precision factor M ≈ A, a sweep maps the error e to (I − M⁻¹A)e, and its
    correction is dx = M⁻¹A·e; so the corrections shrink by the contraction ρ = ‖I − M⁻¹A‖ (≈ κ·eps32 for a
    float32 factor) and the error left after adding dx is ≤ ρ‖e‖ ≈ ρ‖dx‖/(1 − ρ). θ measures ρ (a θ this small
    is no accident of rounding: the corrections shrank by 1000x or more); the test waits for one correction
    fewer than ``nd ≤ REFINE_TOL·nx`` alone, which needs the sweep after the one whose error is already below it
    (a float32 factor of a well-conditioned system: 2 sweeps instead of 3)."""
    theta = nd / last if last > 0 else 0.0
    return theta <= REFINE_RATE and nd * theta <= REFINE_TOL * (1.0 - theta) * nx


#: conjugate gradients stop once ‖rhs − (A + σI)x‖ ≤ CG_TOL·σ·‖x‖. A + σI ⪰ σI (A is PSD), so the error
#: then obeys ‖x − x*‖ ≤ ‖residual‖/σ ≤ CG_TOL·‖x‖: a guaranteed forward error, whatever the conditioning,
#: at the level the mixed-precision refinement accepts (REFINE_TOL..REFINE_STAGNATION_OK).
CG_TOL = 1e-13


def conjugate_gradient(apply_a: Callable[[Tensor], Tensor], rhs: Tensor, shift: float, *, max_iter: int,
                       tol: float = CG_TOL, lookahead: bool | None = None) -> tuple[Tensor | None, int]:
    """x = (A + σI)⁻¹ rhs for a symmetric PSD A given as x ↦ A x (a new tensor: the result is updated in
    place), by conjugate gradients (σ = ``shift`` > 0).

    Converged when the residual, recomputed from ``apply_a`` (not the recurrence, which can drift below
    the true residual), meets ‖rhs − (A + σI)x‖ ≤ ``tol``·σ·‖x‖, so ‖x − x*‖ ≤ ``tol``·‖x‖. A recurrence
    that claims convergence the true residual does not confirm restarts from the true residual. Returns
    (x, operator applications), or (None, applications) when ``max_iter`` applications were not enough
    or a value became non-finite: the caller solves another way. No preconditioner: block-Jacobi and
    diagonal ones were measured to need as many or more iterations on EGN's Gram systems, whose hard
    part is a spread of large eigenvalues across samples, not a badly scaled diagonal.

    Host reads: one per iteration with ``lookahead`` (the default off the CPU, where a read waits for the
    queued kernels): the next direction is formed on the device and its curvature pᵀAp read with this
    iteration's stopping test, at the price of one unused operator application per recurrence cycle. On
    the CPU a read costs ~2 µs against ~160 µs for an application (bc = 650, one thread), so by default
    it reads pᵀAp and the stopping test separately there. The same x either way, bit for bit.
    """
    if not shift > 0.0:
        raise ValueError(f"conjugate_gradient needs shift > 0; got {shift}")
    ahead = rhs.device.type != "cpu" if lookahead is None else lookahead
    x = torch.zeros_like(rhs)
    res = rhs.clone()
    rr_t = res.dot(res)
    rr = float(rr_t)
    used = 0
    while used < max_iter:
        if rr == 0.0:
            return x, used
        converged, used = _cg_cycle(apply_a, x, res, rr_t, rr, shift, tol, used, max_iter, ahead)
        if not converged:
            return None, used
        res = rhs - apply_a(x) - shift * x  # the true residual
        used += 1
        rr_t = res.dot(res)  # the next cycle's, read with the test (one host read)
        res_norm, x_norm, rr = torch.stack([res.norm(), x.norm(), rr_t]).tolist()
        if res_norm <= tol * shift * x_norm:
            return x, used
    return None, used


def _cg_cycle(apply_a: Callable[[Tensor], Tensor], x: Tensor, res: Tensor, rr_t: Tensor, rr: float,
              shift: float, tol: float, used: int, max_iter: int, ahead: bool) -> tuple[bool, int]:
    """CG iterations from p = ``res`` (rᵀr = ``rr``, also as the tensor ``rr_t``), updating ``x`` and
    ``res`` in place until the recurrence's residual meets the test: (True, applications), or (False,
    applications) on a budget spent or a non-finite value. The step size stays a host float (``add_``
    with ``alpha`` fuses the multiply-add; a device scalar would round differently); β = rᵀr/rᵀr₋₁ is
    formed on the device under ``ahead``: the same IEEE quotient, so the same direction."""
    p = res.clone()
    ap = apply_a(p).add_(p, alpha=shift)
    used += 1
    pap = float(p.dot(ap))
    while True:
        if not (math.isfinite(pap) and pap > 0.0):
            return False, used
        step = rr / pap
        x.add_(p, alpha=step)
        res.add_(ap, alpha=-step)
        rr_new_t = res.dot(res)
        reads = [rr_new_t, x.dot(x)]
        if ahead and used < max_iter:  # the next direction's curvature, wasted if this test passes
            p.mul_(rr_new_t / rr_t).add_(res)
            ap = apply_a(p).add_(p, alpha=shift)
            used += 1
            reads.append(p.dot(ap))
        vals = torch.stack(reads).tolist()  # one host read per iteration (two without `ahead`)
        rr_new, xx = vals[0], vals[1]
        if not math.isfinite(rr_new):
            return False, used
        if rr_new <= (tol * shift) ** 2 * xx:
            return True, used
        if len(vals) == 3:  # the look-ahead's application was within the budget
            pap = vals[2]
        elif used >= max_iter:
            return False, used
        else:
            p.mul_(rr_new / rr).add_(res)
            ap = apply_a(p).add_(p, alpha=shift)
            used += 1
            pap = float(p.dot(ap))
        rr, rr_t = rr_new, rr_new_t


def solve_damped_cg(
    apply_base: Callable[[Tensor], Tensor], r: Tensor, st_kr: Tensor, s: Tensor | None, batch_size: int,
    damping: float, *, max_iter: int, tol: float = CG_TOL,
) -> SolveResult:
    """:func:`solve_damped`'s v from ``apply_base`` (x ↦ SᵀKS x, K x when ``s`` is None) by
    :func:`conjugate_gradient` on A = SᵀKS + bλI, without forming the matrix. ``ok=False`` (and
    ``refine_failed``) when it did not converge within ``max_iter`` operator applications: the caller
    then solves directly (which also owns the λ×10 retries)."""
    lam_b = batch_size * float(damping)
    w, used = conjugate_gradient(apply_base, r if s is None else st_kr, lam_b, max_iter=max_iter, tol=tol)
    if w is not None:
        v = w if s is None else (r - _apply_s(s, w)) / lam_b
        if bool(torch.isfinite(v).all()):
            return SolveResult(v, float(damping), 0, True, cg_iterations=used)
    return SolveResult(torch.full_like(r, float("nan")), float(damping), 0, False, refine_failed=True,
                       cg_iterations=used)


def directional_derivative(r: Tensor, kv: Tensor, batch_size: int) -> float:
    """gᵀd = −rᵀKv / b for d = Jᵀv (exact when no momentum changed d). K is symmetric, so the arguments
    may also be (v, Kr)."""
    dot = r.dot(kv)
    if dot.dtype == torch.float64:  # the same IEEE double negation and division on the host: 2 ATen calls fewer
        return -float(dot) / batch_size
    return float(-dot / batch_size)  # rounded in the vectors' dtype, as the solve_dtype="model" path always was


#: the largest power of two :func:`gradient_scale` returns: b / 2^100 and 2^-100 r stay normal float32 numbers
MAX_GRADIENT_EXPONENT = 100


def gradient_scale(f0: float, dtype: torch.dtype) -> float:
    """2^e (0 <= e <= 100) near 1 / √(2·f0): g = −Jᵀr/b (the momentum's gᵀd) is formed as 2^e·g, in the model's
    dtype, and gᵀd divided by 2^e (exact, as any scaling by a power of two that neither underflows nor
    overflows). A float32 model's back-signals and residuals both ~1e-25 made g ~1e-50, zero in float32: its gᵀd
    0 rejected every momentum direction (EGN 1e6x a perfect float32 run off the float64 one). r is then about
    unit size: |r_ik| <= √(2b·f0) under MSE, and cross-entropy's and BCE's residuals are at most their loss.
    1 for a loss of 1/2 or more, or one that is not finite (the step is skipped) or zero, and for a ``dtype`` (g's)
    with float16's narrow exponent range: 2^e g could overflow there where g does not (a float16 model whose g is
    near 65504 at a loss of 0.01: every momentum gᵀd inf, the step skipped), and its residuals cannot be the
    ~1e-25 this scale is for."""
    if torch.finfo(dtype).max < torch.finfo(torch.float32).max or not (math.isfinite(f0) and 0.0 < f0 < 0.5):
        return 1.0
    _, e = math.frexp(math.sqrt(2.0 * f0))  # √(2 f0) = m·2^e, m in [1/2, 1)
    return math.ldexp(1.0, min(-e, MAX_GRADIENT_EXPONENT))


def model_change(gtd: float, jd_q_norm_sq: float, alpha: float, batch_size: int) -> float:
    """The Gauss-Newton model change gᵀΔ + ½(1/b)(JΔ)ᵀQ(JΔ) for Δ = αd (negative on a good step)."""
    return alpha * gtd + 0.5 * alpha * alpha * jd_q_norm_sq / batch_size


def gain_ratio(actual: float, predicted: float, resolution: float = 0.0) -> float:
    """ρ = actual / predicted change. INFERRED: a positive prediction (the step predicted to raise the
    loss) counts as ρ = 0 so that λ grows. NaN (nothing to judge: :func:`update_damping` keeps λ) where
    the step did not move (a zero prediction: α = 0, as in an lr warm-up from 0, or a zero gradient),
    where the loss did not change at all (a converged batch, or one fitted to the rounding floor, where
    even a predicted 100% decrease leaves the computed loss's bits as they were), or where both changes
    are within ``resolution``, the rounding of the loss values (relative to them: a loss of 1e-6 is
    judged as one of 1). Read as failures, those grew λ ×1.01 per step to ``damping_max``, and the run
    then needed ~1400 steps of ×0.99 to move again once the data changed.
    """
    if predicted == 0.0 or actual == 0.0 or (abs(actual) <= resolution and abs(predicted) <= resolution):
        return float("nan")
    if not (predicted < 0.0) or not math.isfinite(actual):
        return 0.0
    return actual / predicted


def armijo_ok(f_new: float, f0: float, alpha: float, gtd: float, c: float, slack: float) -> bool:
    """The Armijo test L(w + αd) ≤ L(w) + c·α·gᵀd (+ round-off slack); NaN fails."""
    return math.isfinite(f_new) and f_new <= f0 + c * alpha * gtd + slack


def update_damping(damping: float, rho: float, *, rho_low: float, rho_high: float, increase: float,
                   decrease: float, lo: float, hi: float) -> float:
    """ρ < rho_low: λ·increase; ρ > rho_high: λ·decrease; clipped to [lo, hi] (spec §2.3 step 7).
    A NaN ρ (:func:`gain_ratio`: nothing to judge) keeps λ."""
    if rho < rho_low:
        damping *= increase
    elif rho > rho_high:
        damping *= decrease
    return min(max(damping, lo), hi)
