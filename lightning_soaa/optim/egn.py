"""``EGN``: exact Gauss-Newton with the mini-batch Gram matrix assembled across ranks."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_soaa.config import EGNConfig, check_range
from lightning_soaa.distributed.blocks import BlockInfo
from lightning_soaa.distributed.checkpoint import StateField, check_finite_number
from lightning_soaa.functional import egn as F
from lightning_soaa.functional.gram import jacobian_gram, linear_gram
from lightning_soaa.optim.base import ShardedOptimizer
from lightning_soaa.optim.egn_capture import (
    LinearCapture,
    back_signals,
    explicit_jacobian_rows,
    jvp_outputs,
    plan_curvature,
)

__all__ = ["EGN", "MISSING_BATCH_MESSAGE"]

log = logging.getLogger(__name__)

MISSING_BATCH_MESSAGE = (
    "EGN.step() got no mini-batch: EGN forms Jacobians from the inputs and targets, not from a loss. "
    "Call opt.step(inputs=x, targets=y) or opt.set_batch(x, y) before step(); under Lightning add the "
    "callback lightning_soaa.lightning.BatchToOptimizer() to the Trainer, or use manual optimization."
)


class _Invalid(ValueError):
    pass


class EGN(ShardedOptimizer):
    r"""Exact Gauss-Newton (Levenberg-Marquardt in the bc×bc mini-batch space), sharded and exact
    across ranks.

    .. math::
        \begin{aligned}
        &z = f(X; w) \in \mathbb{R}^{b\times c},\quad L_b = \tfrac1b\textstyle\sum_i \ell(y_i, z_i),\quad
          r = -\nabla_z \ell,\quad Q = \mathrm{blockdiag}_i(\nabla_z^2 \ell_i) = SS^\top,\quad K = JJ^\top \\
        &v = (QK + b\lambda I)^{-1} r = \big(r - S(S^\top K S + b\lambda I)^{-1} S^\top K r\big)/(b\lambda),
          \qquad d = J^\top v = (J^\top Q J + b\lambda I)^{-1} J^\top r \\
        &\textit{momentum: } m \leftarrow \beta_m m + (1-\beta_m) d,\quad d \leftarrow m/(1-\beta_m^t)
          \quad(\text{kept only if } g^\top d < 0) \\
        &\textit{line search: } \alpha \leftarrow \min(1.5\,\alpha_{t-1}, \alpha_0);\ \text{while }
          L_b(w+\alpha d) > L_b(w) + 0.1\,\alpha\, g^\top d:\
          \alpha \leftarrow 0.8\,\alpha\ (\le 15\text{ tries}) \\
        &w \leftarrow w + \alpha d \\
        &\textit{adaptive damping: } \rho = \frac{L_b(w+\alpha d) - L_b(w)}
          {\alpha g^\top d + \tfrac{\alpha^2}{2b}(Jd)^\top Q (Jd)};\
          \rho < 0.25 \Rightarrow \lambda \leftarrow 1.01\lambda,\
          \rho > 0.75 \Rightarrow \lambda \leftarrow 0.99\lambda
        \end{aligned}

    Without momentum g^\top d = -r^\top K v / b and Jd = Kv, so the line search and ρ need no extra
    parameter-space pass; with momentum g^\top d is an explicit dot product and Jd a forward-mode JVP.

    **Calling it.** ``opt.step(inputs=x, targets=y)``: EGN runs the model itself. ``step(closure)``
    works when the closure returns ``(inputs, targets)``; a closure together with ``inputs=``/``targets=``
    or after :meth:`set_batch` is simply run first (e.g. Lightning's training-step closure, fed by the
    ``BatchToOptimizer`` callback) and its return value is returned. The gradients in ``p.grad`` are
    never read.

    **Mode.** The whole step (Jacobians, Gram factors, line-search and ρ forwards) runs with every
    submodule in eval mode — BatchNorm uses its running statistics and dropout is off — so the
    function whose Gauss-Newton model is built is deterministic and per-sample; each submodule's own
    mode is restored afterwards and BatchNorm running statistics are not updated by ``step``.

    **Across ranks (exact).** Every rank holds its own samples (local batch sizes may differ; b is the
    global sum). Per step, on every rank and in this order:

    1. ``all_reduce_scalars``: validity flags, local batch sizes, layer layouts and the local loss sum.
    2. ``all_gather_flat`` of one padded float64 buffer per rank: outputs z, targets, each factored
       Linear's inputs A and back-signals Δ, and the explicit Jacobian rows of the other parameters
       (≈ b·(2c + Σ_ℓ T_ℓ(d_in + c·d_out) + c·n_rest) numbers in total). Every rank builds the same
       global K, r, Q and solves the same bc×bc system.
    3. ``reduce_scatter_flat``: d = Jᵀv as the sum over ranks of each rank's VJP with its slice of v
       (and g = −Jᵀr/b when momentum is on), delivered to the parameter owners.
    4. ``all_reduce_scalars``: non-finite flag and the owners' partial gᵀd.
    5. ``all_gather_flat`` of the owners' final direction. Every rank then applies w ← w + αd to all
       parameters itself; this replaces the base class's parameter all-gather (same bytes) because the
       line search needs the full d on every rank anyway.
    6. One ``all_reduce_scalars`` per line-search trial (and one for ρ without line search; one for
       (Jd)ᵀQ(Jd) with momentum and adaptive damping).

    A non-finite value anywhere skips the step on every rank, leaving all state unchanged.

    Args:
        model: the ``nn.Module``; its trainable parameters are optimized (one param group).
        loss: ``"mse"`` (ℓ = ½‖y − z‖²), ``"cross_entropy"`` (softmax, integer targets), ``"bce"``
            (sigmoid logits) (default ``"mse"``).
        lr: step size α₀, the maximum α with line search (default 0.1).
        damping: initial λ (default 1.0).
        momentum: β_m (default 0.0).
        line_search: Armijo backtracking (default False).
        adaptive_damping: λ from ρ (default False).
        armijo_c, ls_decrease, ls_increase, max_ls, ls_reset: line search (0.1, 0.8, 1.5, 15, "increase").
        rho_low, rho_high, damping_increase, damping_decrease, damping_min, damping_max: λ rule
            (0.25, 0.75, 1.01, 0.99, 1e-12, 1e6).
        solve_dtype: ``"float64"`` (default) or ``"model"``.
        max_solve_retries: Cholesky retries with 10·λ (default 6).
        max_gram_size: largest bc allowed (default 4096); larger batches raise ``ValueError``.
        jacobian: ``"auto"`` (Linear factors + explicit rest) or ``"explicit"`` (default ``"auto"``).
        process_group, comm, shard: see :class:`ShardedOptimizer`.

    References:
        Korbit, Adeoye, Bemporad, Zanon, *Exact Gauss-Newton Optimization for Training Deep Neural
        Networks*, arXiv 2405.14402 — direction, line search, momentum [P TL;DR; C somax egn.py].
        INFERRED (spec §2): the SPD form of the solve, the Gram-factor K for Linear layers, the exact
        cross-rank assembly, the gᵀd/Jd identities, eval mode for the curvature pass, ρ = 0 when the
        model predicts no decrease, keeping the momentum buffer updated when its direction is rejected.
        Adaptive damping follows the paper-era rule (commented out in the authors' code) [C].
    """

    #: the constructor takes the module itself, not its parameters (read by the Lightning factory)
    takes_module = True

    def __init__(
        self,
        model: nn.Module,
        loss: str = "mse",
        lr: float = 0.1,
        damping: float = 1.0,
        momentum: float = 0.0,
        line_search: bool = False,
        adaptive_damping: bool = False,
        *,
        armijo_c: float = 0.1,
        ls_decrease: float = 0.8,
        ls_increase: float = 1.5,
        max_ls: int = 15,
        ls_reset: str = "increase",
        rho_low: float = 0.25,
        rho_high: float = 0.75,
        damping_increase: float = 1.01,
        damping_decrease: float = 0.99,
        damping_min: float = 1e-12,
        damping_max: float = 1e6,
        solve_dtype: str = "float64",
        max_solve_retries: int = 6,
        max_gram_size: int = 4096,
        jacobian: str = "auto",
        process_group: Any = None,
        comm: Any = None,
        shard: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"Invalid model={type(model).__name__}. EGN needs the nn.Module itself "
                             "(it forms Jacobians from it), not its parameters.")
        cfg = EGNConfig(
            loss=loss, lr=lr, damping=damping, momentum=momentum, line_search=line_search,
            adaptive_damping=adaptive_damping, armijo_c=armijo_c, ls_decrease=ls_decrease,
            ls_increase=ls_increase, max_ls=max_ls, ls_reset=ls_reset, rho_low=rho_low, rho_high=rho_high,
            damping_increase=damping_increase, damping_decrease=damping_decrease, damping_min=damping_min,
            damping_max=damping_max, solve_dtype=solve_dtype, max_solve_retries=max_solve_retries,
            max_gram_size=max_gram_size, jacobian=jacobian,
        )
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("EGN: the model has no trainable parameters (none with requires_grad=True).")
        self.cfg = cfg
        self.model = model
        super().__init__(named, dict(lr=cfg.lr, momentum=cfg.momentum), process_group=process_group,
                         comm=comm, shard=shard, grad_reduction="none")
        self._trainable = dict(named)
        self._pending_batch: tuple[Any, Tensor] | None = None  # from set_batch(), used by the next step
        self._sites, self._explicit = plan_curvature(model, self._trainable, cfg.jacobian)
        self.damping = float(cfg.damping)
        self.alpha = float(cfg.lr)  # α of the previous step (the line search resets from it)
        self.momentum_steps = 0
        self.solve_fallbacks = 0
        self.momentum_rejections = 0
        self._last: dict[str, float] = {}

    # ------------------------------------------------------------------ groups and checkpoints
    def _validate_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("momentum", group["momentum"], 0.0, 1.0, hi_inclusive=False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:
            raise ValueError("EGN has exactly one param group (the model's trainable parameters); "
                             "construct a new EGN for a different model.")
        super().add_param_group(param_group)

    def _global_state(self) -> dict[str, Any]:
        return {"damping": self.damping, "alpha": self.alpha, "momentum_steps": self.momentum_steps,
                "solve_fallbacks": self.solve_fallbacks, "momentum_rejections": self.momentum_rejections}

    def _state_schema(self, block: BlockInfo, param: Tensor, group: dict[str, Any]) -> dict[str, StateField]:
        # the momentum EMA of directions exists only with momentum > 0
        return {"momentum_buffer": StateField(tuple(block.shape), param.dtype, required=False)}

    def _validate_global_state(self, state: dict[str, Any]) -> None:
        where = "EGN.load_state_dict: lightning_soaa.global"
        for key in ("damping", "alpha"):
            if key in state:
                check_finite_number(f"{where}.{key}", state[key], positive=True)
        for key in ("momentum_steps", "solve_fallbacks", "momentum_rejections"):
            if key in state:
                check_finite_number(f"{where}.{key}", state[key], integer=True, nonnegative=True)

    def _load_global_state(self, state: dict[str, Any]) -> None:
        self.damping = float(state.get("damping", self.cfg.damping))
        self.alpha = float(state.get("alpha", self.cfg.lr))
        self.momentum_steps = int(state.get("momentum_steps", 0))
        self.solve_fallbacks = int(state.get("solve_fallbacks", 0))
        self.momentum_rejections = int(state.get("momentum_rejections", 0))

    def _extra_statistics(self) -> dict[str, float]:
        out = {"damping": self.damping, "alpha": self.alpha, "solve_fallbacks": float(self.solve_fallbacks),
               "momentum_rejections": float(self.momentum_rejections)}
        out.update(self._last)
        return out

    # ------------------------------------------------------------------ the step
    def set_batch(self, inputs: Any, targets: Tensor) -> None:
        """Store the mini-batch for the next :meth:`step` when the caller cannot pass it there
        (Lightning's automatic optimization via ``BatchToOptimizer``, the DeepSpeed engine)."""
        self._pending_batch = (inputs, targets)

    def step(self, closure: Callable[[], Any] | None = None, *, inputs: Any = None,  # type: ignore[override]
             targets: Tensor | None = None) -> Any:
        """One EGN step on the batch ``(inputs, targets)``; collective when W > 1.

        Returns the closure's value when a closure was given, else the global mean loss L_b(w) before
        the step (a 0-d tensor).
        """
        pending, self._pending_batch = self._pending_batch, None  # a batch belongs to one step
        self._join_before_step()  # built before the process group existed: join it now (collective)
        closure_value = None
        xs: tuple[Tensor, ...] = ()
        error: Exception | None = None
        try:  # an error on one rank is reported through the first all-reduce and raised on every rank
            if closure is not None:
                with torch.enable_grad():
                    closure_value = closure()
            if inputs is None and targets is None:
                if pending is not None:  # set_batch() wins; a closure then only supplies the returned loss
                    inputs, targets = pending
                elif isinstance(closure_value, (tuple, list)) and len(closure_value) == 2:
                    inputs, targets = closure_value
                    closure_value = None
            if inputs is None or targets is None:
                raise ValueError(MISSING_BATCH_MESSAGE)
            xs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
            if not xs or not all(isinstance(x, Tensor) for x in xs) or not isinstance(targets, Tensor):
                raise ValueError("EGN.step: inputs must be a tensor or a tuple of tensors, targets a tensor.")
        except Exception as e:  # noqa: BLE001 - raised on every rank after the first all-reduce
            if self.comm.world_size == 1:
                raise
            error = e
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            f0 = self._egn_step(xs, targets, error)  # type: ignore[arg-type]
        finally:
            for m, mode in modes:
                m.training = mode
        if closure_value is not None:
            return closure_value
        return torch.tensor(f0, dtype=torch.float64)

    # -- pieces -----------------------------------------------------------------------------
    def _forward_capture(self, xs: tuple[Tensor, ...], targets: Tensor):  # noqa: ANN202
        """Local forward with Linear capture; returns (z, capture, message-or-None)."""
        b = xs[0].shape[0] if xs[0].dim() else -1
        if any(x.dim() == 0 or x.shape[0] != b for x in xs) or targets.dim() == 0 or targets.shape[0] != b:
            shapes = [tuple(x.shape) for x in xs]
            return None, None, (f"EGN: inputs {shapes} and targets {tuple(targets.shape)} must share the "
                                "batch dimension (dim 0).")
        cap = LinearCapture(self._sites, b)
        try:
            with torch.enable_grad(), cap:
                z = self.model(*xs)
        except Exception as exc:  # noqa: BLE001 - reported on every rank, never a hang
            return None, None, f"EGN: the model's forward failed: {type(exc).__name__}: {exc}"
        if cap.error is not None:
            return None, None, cap.error
        if not isinstance(z, Tensor):
            return None, None, f"EGN: the model must return a tensor; got {type(z).__name__}."
        try:
            F.check_outputs_targets(self.cfg.loss, z, targets.to(z.device))
        except ValueError as exc:
            return None, None, str(exc)
        return z, cap, None

    def _solve_dtype(self) -> torch.dtype:
        return torch.float64 if self.cfg.solve_dtype == "float64" else self._params[0].dtype

    def _egn_step(self, xs: tuple[Tensor, ...], targets: Tensor, error: Exception | None = None) -> float:
        cfg = self.cfg
        comm = self.comm
        comm.begin_step()
        world, rank = comm.world_size, comm.rank
        nsites = len(self._sites)

        # -- 1. local forward + validation; every rank reports into one scalar all-reduce ---------
        if error is not None:  # raised before the step on this rank: report it, raise on every rank
            z, cap, err, b_r = None, None, f"{type(error).__name__}: {error}", 0
        else:
            z, cap, err = self._forward_capture(xs, targets)
            b_r = int(xs[0].shape[0]) if xs[0].dim() else 0
        per_rank = torch.zeros(world, 3 + nsites, dtype=torch.float64)
        head = torch.zeros(2, dtype=torch.float64)
        if err is None:
            assert z is not None and cap is not None
            y = targets.to(z.device)
            with torch.no_grad():
                local_loss = float(F.loss_sum(cfg.loss, z.detach(), y))
            per_rank[rank, 0] = 0.0
            per_rank[rank, 1] = b_r
            per_rank[rank, 2] = z.shape[1]
            for i in range(nsites):
                per_rank[rank, 3 + i] = sum(a.shape[1] for a in cap.inputs[i])
            head[1] = local_loss
            nonfinite = not (math.isfinite(local_loss) and bool(torch.isfinite(z.detach()).all()))
            head[0] = 1.0 if nonfinite else 0.0
        else:
            per_rank[rank, 0] = 1.0
        red = comm.all_reduce_scalars(torch.cat([head, per_rank.reshape(-1)]))
        info = red[2:].view(world, 3 + nsites)
        bad = [r for r in range(world) if info[r, 0] > 0]
        if bad:
            if error is not None:
                raise error
            raise ValueError(err if err is not None
                             else f"EGN: invalid batch on rank(s) {bad} (see that rank's error).")
        sizes = [int(info[r, 1]) for r in range(world)]
        cs = {int(info[r, 2]) for r in range(world)}
        if len(cs) != 1:
            raise ValueError(f"EGN: ranks disagree on the number of outputs c: {sorted(cs)}.")
        if nsites and not bool((info[:, 3:] == info[0:1, 3:]).all()):
            raise ValueError("EGN: ranks disagree on the number of positions per sample seen by the Linear "
                             "layers (e.g. sequence lengths); pad the batches to equal lengths.")
        c = cs.pop()
        b = sum(sizes)
        if b <= 0:
            raise ValueError("EGN: the global batch is empty.")
        if b * c > cfg.max_gram_size:
            raise ValueError(
                f"EGN: the Gram matrix would be {b * c}x{b * c} (global batch b={b} times c={c} outputs), "
                f"above max_gram_size={cfg.max_gram_size}. Use a smaller batch or raise max_gram_size."
            )
        assert z is not None and cap is not None
        y = targets.to(device=z.device, dtype=z.dtype if targets.is_floating_point() else targets.dtype)
        if red[0] > 0:
            return self._skip("non-finite model outputs or loss", float("nan"))
        f0 = float(red[1]) / b
        ts = [int(info[0, 3 + i]) for i in range(nsites)]

        # -- 2. local factors, gathered so every rank holds the global batch ----------------------
        deltas = back_signals(z, cap.flat_outputs(), c)
        factors = cap.factors(deltas, c)
        rows = None
        if self._explicit:
            rows = explicit_jacobian_rows(self.model, {n: self._trainable[n] for n in self._explicit}, xs)
        sdt = self._solve_dtype()
        cols = [z.detach().to(torch.float64),
                (y.reshape(b_r, 1) if cfg.loss == "cross_entropy" else y).to(torch.float64)]
        for a, dl in factors:
            cols.append(a.reshape(b_r, -1).to(torch.float64))
            cols.append(dl.reshape(b_r, -1).to(torch.float64))
        if rows is not None:
            cols.append(rows.reshape(b_r, -1).to(torch.float64))
        local = torch.cat(cols, dim=1).detach()
        width = local.shape[1]
        bmax = max(sizes)
        buf = torch.zeros(bmax, width, dtype=torch.float64, device=local.device)
        buf[:b_r] = local
        gathered = comm.all_gather_flat(buf.reshape(-1)).view(world, bmax, width)
        glob = torch.cat([gathered[r, :sizes[r]] for r in range(world)], dim=0).to(sdt)
        del buf, gathered

        # -- 3. identical on every rank: K, r, Q, the bc×bc solve ---------------------------------
        off = 0

        def take(n: int) -> Tensor:
            nonlocal off
            out = glob[:, off:off + n]
            off += n
            return out

        zg = take(c)
        yg = take(1).reshape(b) if cfg.loss == "cross_entropy" else take(c)
        k = torch.zeros(b * c, b * c, dtype=sdt, device=glob.device)
        for site, (a, dl), t in zip(self._sites, factors, ts):
            ag = take(t * a.shape[-1]).reshape(b, t, a.shape[-1])
            dg = take(c * t * dl.shape[-1]).reshape(b, c, t, dl.shape[-1])
            if t:
                k += linear_gram(ag, dg, weight=site.weight, bias=site.bias)
        if rows is not None:
            k += jacobian_gram(take(c * rows.shape[-1]).reshape(b * c, -1))
        r2, s = F.residual_and_factor(cfg.loss, zg, yg)
        r = r2.reshape(-1)
        sol = F.solve_coefficients(k, r, s, b, self.damping, max_retries=cfg.max_solve_retries)
        if not sol.ok:
            return self._skip(f"the bc system could not be solved after {sol.fallbacks} damping retries", f0)
        v = sol.v
        kv = k @ v
        gtd_plain = F.directional_derivative(r, kv, b)
        jd_qq_plain = float(F.q_norm_sq(s, kv))
        start = sum(sizes[:rank]) * c
        v_local = v[start:start + b_r * c].view(b_r, c).to(z.dtype)
        r_local = r[start:start + b_r * c].view(b_r, c).to(z.dtype)

        # -- 4. d = Jᵀv (and g with momentum) to the owners -------------------------------------
        params = self._params
        beta = float(self.param_groups[0]["momentum"])
        channels = [self._vjp(z, v_local, params, retain=beta > 0)]
        if beta > 0:
            channels.append(self._vjp(z, -r_local / b, params, retain=False))
        owned = self._to_owners(channels)
        d_owned = owned[0]
        flag = 0.0
        gtd_m_part = 0.0
        new_bufs: list[Tensor] = []
        t_next = self.momentum_steps + 1
        for j, blk in enumerate(self._owned):
            d = d_owned[j]
            if not bool(torch.isfinite(d).all()):
                flag = 1.0
            if beta > 0:
                st = self.block_state(blk)
                m_old = st.get("momentum_buffer")
                m_new = (1 - beta) * d if m_old is None else beta * m_old + (1 - beta) * d
                new_bufs.append(m_new)
                gtd_m_part += float((owned[1][j].to(torch.float64) * (m_new / (1 - beta ** t_next))
                                     .to(torch.float64)).sum())
        red2 = comm.all_reduce_scalars(torch.tensor([flag, gtd_m_part], dtype=torch.float64))
        if red2[0] > 0:
            return self._skip("non-finite direction", f0)
        use_momentum = False
        gtd = gtd_plain
        if beta > 0:
            gtd_m = float(red2[1])
            if gtd_m < 0:
                use_momentum, gtd = True, gtd_m
            else:
                self.momentum_rejections += 1
                log.info("EGN: momentum direction is not a descent direction (gᵀd=%.3e); plain step used",
                         gtd_m)
            for blk, m_new in zip(self._owned, new_bufs):
                self.block_state(blk)["momentum_buffer"] = m_new
            self.momentum_steps = t_next
            if use_momentum:
                d_owned = [m / (1 - beta ** t_next) for m in new_bufs]
        self.solve_fallbacks += sol.fallbacks

        # -- 5. the full final direction on every rank ----------------------------------------
        d_full = self._from_owners(d_owned)

        # -- 6. step size: fixed, or Armijo on the same batch; ρ and λ ---------------------------
        lr = float(self.param_groups[0]["lr"])
        w0 = [p.detach().clone() for p in params]
        jd_qq = jd_qq_plain
        if use_momentum and cfg.adaptive_damping:
            jd = jvp_outputs(self.model, self._trainable,
                             {n: d_full[i] for i, n in enumerate(self._names)}, xs)
            part = F.q_norm_sq(None if s is None else s[start // c:start // c + b_r],
                               jd.detach().reshape(-1).to(sdt))
            jd_qq = float(comm.all_reduce_scalars(torch.tensor([float(part)], dtype=torch.float64))[0])
        tries = 0
        f_new = float("nan")
        if cfg.line_search:
            prev = min(self.alpha, lr)
            alpha = min(cfg.ls_increase * prev, lr) if cfg.ls_reset == "increase" else prev
            slack = torch.finfo(z.dtype).eps * max(1.0, abs(f0)) * 4
            for i in range(cfg.max_ls):
                f_new = self._trial_loss(w0, d_full, alpha, xs, y, b)
                tries += 1
                if F.armijo_ok(f_new, f0, alpha, gtd, cfg.armijo_c, slack):
                    break
                if i < cfg.max_ls - 1:
                    alpha *= cfg.ls_decrease
        else:
            alpha = lr
            if cfg.adaptive_damping:
                f_new = self._trial_loss(w0, d_full, alpha, xs, y, b)
        rho = float("nan")
        if cfg.adaptive_damping:
            rho = F.gain_ratio(f_new - f0, F.model_change(gtd, jd_qq, alpha, b))
            self.damping = F.update_damping(
                self.damping, rho, rho_low=cfg.rho_low, rho_high=cfg.rho_high, increase=cfg.damping_increase,
                decrease=cfg.damping_decrease, lo=cfg.damping_min, hi=cfg.damping_max)

        # -- 7. apply on every rank (identical inputs, identical result) ------------------------
        with torch.no_grad():
            for p, w, d in zip(params, w0, d_full):
                p.copy_(w + alpha * d)
        self.alpha = alpha
        self.num_steps += 1
        self._last = {"loss": f0, "loss_after": f_new, "gtd": gtd, "ls_tries": float(tries), "rho": rho,
                      "step_fallbacks": float(sol.fallbacks), "solve_damping": sol.damping,
                      "momentum_used": float(use_momentum), "gram_size": float(b * c), "batch_size": float(b)}
        return f0

    def _skip(self, why: str, f0: float) -> float:
        self.skipped_steps += 1
        log.warning("EGN: %s; step skipped on every rank (skipped so far: %d)", why, self.skipped_steps)
        self._on_skip()
        return f0

    @staticmethod
    def _vjp(z: Tensor, cot: Tensor, params: list[Tensor], retain: bool) -> list[Tensor]:
        grads = torch.autograd.grad(z, params, grad_outputs=cot, retain_graph=retain, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]

    def _trial_loss(self, w0: list[Tensor], d: list[Tensor], alpha: float, xs: tuple[Tensor, ...],
                    y: Tensor, b: int) -> float:
        """L_b(w0 + αd): a local forward and one scalar all-reduce (every rank, same order)."""
        with torch.no_grad():
            for p, w, dd in zip(self._params, w0, d):
                p.copy_(w + alpha * dd)
            local = float(F.loss_sum(self.cfg.loss, self.model(*xs), y))
        return float(self.comm.all_reduce_scalars(torch.tensor([local], dtype=torch.float64))[0]) / b

    # -- routing between "every rank's local sum" and "owners" ------------------------------
    def _to_owners(self, channels: list[list[Tensor]]) -> list[list[Tensor]]:
        """Sum per-parameter tensors over ranks; return, per channel, the owned blocks' sums."""
        world, rank = self.comm.world_size, self.comm.rank
        if world == 1:
            return [[blk.view(ch[blk.param_index]) for blk in self._owned] for ch in channels]
        if not self._sharded_multi_rank():
            out = []
            for ch in channels:
                flat = torch.cat([t.reshape(-1) for t in ch])
                self.comm.all_reduce_(flat)
                full = list(torch.split(flat, [t.numel() for t in ch]))
                out.append([blk.view(full[blk.param_index].view_as(ch[blk.param_index]))
                            for blk in self._owned])
            return out
        nch = len(channels)
        result: dict[int, list[Tensor]] = {}
        for dt, layout in self._flat_layouts.items():
            n = self._padded_len(layout)
            if n == 0:
                continue
            dev = channels[0][layout[0][0].param_index].device if layout[0] else self._params[0].device
            buf = torch.zeros(world * nch * n, dtype=dt, device=dev)
            for r in range(world):
                for ci, ch in enumerate(channels):
                    o = (r * nch + ci) * n
                    for blk in layout[r]:
                        buf[o:o + blk.numel].view(blk.shape).copy_(blk.view(ch[blk.param_index]))
                        o += blk.numel
            mine = self.comm.reduce_scatter_flat(buf)
            for ci in range(nch):
                o = ci * n
                for blk in layout[rank]:
                    slot = result.setdefault(blk.block_id, [None] * nch)  # type: ignore[list-item]
                    slot[ci] = mine[o:o + blk.numel].view(blk.shape)
                    o += blk.numel
        return [[result[blk.block_id][ci] for blk in self._owned] for ci in range(nch)]

    def _from_owners(self, owned: list[Tensor]) -> list[Tensor]:
        """Every rank gets every parameter's tensor from its owner (the owned list follows ``_owned``)."""
        world, rank = self.comm.world_size, self.comm.rank
        full = [torch.zeros_like(p) for p in self._params]
        if world == 1 or not self._sharded_multi_rank():
            for blk, t in zip(self._owned, owned):
                blk.view(full[blk.param_index]).copy_(t)
            return full
        mine = {blk.block_id: t for blk, t in zip(self._owned, owned)}
        for dt, layout in self._flat_layouts.items():
            n = self._padded_len(layout)
            if n == 0:
                continue
            dev = self._params[0].device
            buf = torch.zeros(n, dtype=dt, device=dev)
            o = 0
            for blk in layout[rank]:
                buf[o:o + blk.numel].view(blk.shape).copy_(mine[blk.block_id])
                o += blk.numel
            out = self.comm.all_gather_flat(buf)
            for r in range(world):
                o = r * n
                for blk in layout[r]:
                    blk.view(full[blk.param_index]).copy_(out[o:o + blk.numel].view(blk.shape))
                    o += blk.numel
        return full
