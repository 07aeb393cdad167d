"""What EGN needs from a module: per-layer Gram factors for ``nn.Linear`` and ``nn.Embedding`` and explicit
per-sample Jacobians (torch.func) for every other trainable parameter. No communication here.

* :func:`plan_curvature` decides, once, which parameters go through layer factors and which through
  explicit Jacobians.
* :class:`LinearCapture` records each factored Linear's input ``a`` (forward hook) and hands back a copy
  of its output so the back-signals δ = ∂z/∂y can be read with ``torch.autograd.grad`` even when a later
  layer works in place; its forward runs under :class:`~lightning_soaa.optim.egn_guard.OwnUseGuard`, which
  reports a factored parameter used outside its layer's call (its Jacobian would be incomplete).
* :func:`explicit_jacobian_rows` is ``vmap(jacrev(functional_call))`` over the samples, restricted to the
  parameters that are not factored; :func:`checked_explicit_rows` also checks that they are the rows of
  the batch's own Jacobian (a per-sample model).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch._C._functorch import maybe_current_level
from torch.func import functional_call, jacrev, vmap
from torch.nn.modules import module as _module
from torch.nn.utils import parametrize

from lightning_soaa.optim.egn_guard import OwnUseGuard

log = logging.getLogger(__name__)

__all__ = ["LinearSite", "plan_curvature", "LinearCapture", "checked_back_signals", "checked_explicit_rows",
           "explicit_jacobian_rows", "changed_site", "probe_weights", "COUPLING_TOL"]


#: an nn.Embedding with more rows than this keeps explicit Jacobians: its indices travel in the factor table,
#: which a float32 solve (solve_dtype="model", or the float32 factorization of a mixed solve) holds exactly
#: only up to 2²⁴
MAX_FACTORED_ROWS = 1 << 24


@dataclasses.dataclass
class LinearSite:
    """One factored ``nn.Linear`` or ``nn.Embedding``: its module and which of its parameters are trained
    (an embedding's: its weight, the table)."""

    path: str
    module: nn.Linear | nn.Embedding
    weight: bool
    bias: bool
    param_names: tuple[str, ...]

    @property
    def vocab(self) -> int:
        """The table's rows for an embedding (its factor A holds indices), 0 for a Linear."""
        m = self.module
        return m.num_embeddings if isinstance(m, nn.Embedding) else 0

    def widths(self) -> tuple[int, int]:
        """(d_in, d_out) of the factors: an embedding's input is its index, one number per position."""
        m = self.module
        return (1, m.embedding_dim) if isinstance(m, nn.Embedding) else (m.in_features, m.out_features)

    @property
    def kind(self) -> str:
        return type(self.module).__name__


def _parametrized(m: nn.Module) -> bool:
    """``parametrize.is_parametrized(m)``, answered without its attribute look-up where that cannot find one:
    a module of exactly the plain class (``register_parametrization`` swaps the class for a subclass) holding
    nothing named ``parametrizations``. torch's look-up of the missing attribute raises and catches an
    AttributeError inside ``Module.__getattr__``, for every factored layer at every step."""
    if (type(m) in (nn.Linear, nn.Embedding) and "parametrizations" not in m.__dict__
            and "parametrizations" not in m._modules and "parametrizations" not in m._parameters
            and "parametrizations" not in m._buffers):
        return False
    return parametrize.is_parametrized(m)


def _own_linear_forward(m: nn.Linear) -> bool:
    """Whether calling ``m`` computes ``x Wᵀ + b`` from its own parameters: ``nn.Linear.forward``, not
    overridden by a subclass or on the instance, and no parametrization (its ``weight`` is computed from
    other tensors; reading it would also run the parametrization, e.g. spectral norm's power iteration
    in training mode, changing the model)."""
    return (type(m).forward is nn.Linear.forward and "forward" not in m.__dict__
            and not _parametrized(m))


def _own_embedding_forward(m: nn.Embedding) -> bool:
    """Whether calling ``m`` is the plain lookup ``E[idx]`` whose Jacobian the index factors describe:
    ``nn.Embedding.forward`` (as for a Linear, :func:`_own_linear_forward`), no ``max_norm`` (the forward then
    renormalises the looked-up rows in place), no ``scale_grad_by_freq`` (the backward rescales by the
    batch's counts) and not ``sparse`` (EGN refuses the three for a trained table; checked here too, so the
    plan never rests on them)."""
    return (type(m).forward is nn.Embedding.forward and "forward" not in m.__dict__
            and not _parametrized(m) and m.max_norm is None and not m.scale_grad_by_freq
            and not m.sparse)


def _own_forward(m: nn.Module) -> bool:
    return _own_embedding_forward(m) if isinstance(m, nn.Embedding) else _own_linear_forward(m)  # type: ignore[arg-type]


def changed_site(sites: list[LinearSite]) -> str | None:
    """The path of the first factored layer that no longer computes ``x Wᵀ + b`` (an embedding: ``E[idx]``)
    itself, else None.

    The plan is made once: a forward replaced on the instance after EGN was built (accelerate's
    ``add_hook_to_module``/``cpu_offload``, a scaling or casting wrapper) or a class swapped to a subclass
    left EGN stepping on the plain layer's Jacobian (0.19 off the true Gauss-Newton step)."""
    for site in sites:
        if not _own_forward(site.module):
            return site.path
    return None


def plan_curvature(model: nn.Module, trainable: dict[str, Tensor], mode: str,
                   factor_embeddings: bool = False) -> tuple[list[LinearSite], list[str]]:
    """Split the trainable parameters into factored Linear sites and explicit-Jacobian names.

    A Linear is factored only when it is a plain ``nn.Linear`` (:func:`_own_linear_forward`), its
    parameters belong to no other module (tied weights would miss the other module's contribution), and it
    is not an ``nn.MultiheadAttention``'s ``out_proj``: that module passes ``out_proj.weight`` and ``.bias``
    to ``F.multi_head_attention_forward`` and never calls the Linear, so no hook would see it (the guard
    refused such a model under "auto"); its parameters get explicit Jacobians, as under "explicit".
    With ``factor_embeddings``, an ``nn.Embedding`` is factored on the same terms
    (:func:`_own_embedding_forward`, its table owned by it alone: a tied table, e.g. a language model's
    head, keeps explicit rows) with at most :data:`MAX_FACTORED_ROWS` rows.
    """
    owners: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=True):
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    by_id = {id(p): n for n, p in trainable.items()}
    sites: list[LinearSite] = []
    factored: set[str] = set()
    if mode == "auto":
        never_called = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
        for path, m in model.named_modules(remove_duplicate=True):
            if not isinstance(m, nn.Linear) or not _own_linear_forward(m) or id(m) in never_called:
                continue
            ps = [p for p in (m.weight, m.bias) if p is not None]
            if any(owners.get(id(p), 0) > 1 for p in ps):
                continue
            w = id(m.weight) in by_id
            bb = m.bias is not None and id(m.bias) in by_id
            if not (w or bb):
                continue
            names = tuple(by_id[id(p)] for p in ps if id(p) in by_id)
            sites.append(LinearSite(path, m, w, bb, names))
            factored.update(names)
        for path, m in model.named_modules(remove_duplicate=True) if factor_embeddings else ():
            if (isinstance(m, nn.Embedding) and _own_embedding_forward(m) and owners.get(id(m.weight), 0) == 1
                    and id(m.weight) in by_id and m.num_embeddings <= MAX_FACTORED_ROWS):
                sites.append(LinearSite(path, m, True, False, (by_id[id(m.weight)],)))
                factored.add(by_id[id(m.weight)])
    explicit = [n for n in trainable if n not in factored]
    return sites, explicit


def site_params(site: LinearSite) -> tuple[Tensor | None, Tensor | None]:
    """(weight, bias) of a factored layer, None where that one is not trained (an embedding has no bias)."""
    m = site.module
    return (m.weight if site.weight else None, m.bias if site.bias and isinstance(m, nn.Linear) else None)


class LinearCapture:
    """Forward hooks that record (input, output) of each factored Linear or Embedding for one forward pass
    (an embedding's input: its indices, as float64)."""

    #: no site's back-signal is known to be the identity here (a chain capture knows its last Linear's)
    identity_site = -1

    def __init__(self, sites: Sequence[LinearSite], batch_size: int) -> None:
        self.sites = list(sites)
        self.batch_size = batch_size
        self.inputs: list[list[Tensor]] = [[] for _ in self.sites]
        self.outputs: list[list[Tensor]] = [[] for _ in self.sites]
        self.error: str | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._factors: list[tuple[Tensor, Tensor]] | None = None  # set by prepare()
        #: the explicit Jacobian rows of the parameters that are not factored, [b, c, rest] (set with
        #: :func:`checked_explicit_rows` by EGN's capture, which knows those parameters), else None
        self.rows: Tensor | None = None

    def __enter__(self) -> LinearCapture:
        self.guard = OwnUseGuard([(s.path, site_params(s)) for s in self.sites], [s.kind for s in self.sites])
        for i, site in enumerate(self.sites):
            self._handles.append(site.module.register_forward_pre_hook(self._enter_hook(i)))
            # first among the layer's forward hooks: ours sees the layer's own output x Wᵀ + b and hands
            # a copy to the user's hooks, whose changes (and their derivatives) then lie downstream of it
            self._handles.append(site.module.register_forward_hook(self._hook(i), with_kwargs=True, prepend=True))
        # global forward hooks run before any module's own: with some installed, the output a hook of ours
        # sees may already be changed, so each one is checked against the layer's function (_hook)
        self._global_hooks = bool(_module._global_forward_hooks)
        self.guard.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.guard.__exit__(*exc)  # type: ignore[no-untyped-call]
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.error is None:
            self.error = self.guard.misuse

    def _enter_hook(self, i: int) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.guard.enter(i, module)

        return pre_hook

    def _hook(self, i: int) -> Callable[..., Tensor | None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Tensor | None:
            a = args[0] if args else kwargs.get("input")  # Linear.forward(input): positional or by keyword
            site = self.sites[i]
            # (inside the layer's own bracket: the check below reads its parameters)
            changed = (self._global_hooks and isinstance(a, Tensor)
                       and not _is_layer_output(site.module, a, output))
            self.guard.leave(i)
            if self.guard.misuse is not None:  # the cause (e.g. a swapped parameter under torch.vmap, where the
                return None  # output then needs no grad): the errors below would name a consequence
            if maybe_current_level() is not None:  # (before the shape check, which a vmap's hidden dim trips)
                self.error = self.error or _transformed_call(site)
                return None
            if not isinstance(a, Tensor):
                self.error = self.error or (
                    f"EGN: the {site.kind} layer {site.path!r} was called without an input tensor.")
                return None
            # an embedding's input has no feature dimension: [b] indices are one position per sample
            if a.dim() < (1 if site.vocab else 2) or a.shape[0] != self.batch_size:
                self.error = self.error or _not_per_sample(site, tuple(a.shape), self.batch_size)
                return None
            if not output.requires_grad:  # no graph to read its back-signals from
                self.error = self.error or (
                    f"EGN: the {site.kind} layer {site.path!r} was called with gradients disabled inside "
                    "the model's forward (torch.no_grad, or a reentrant torch.utils.checkpoint); its Gram "
                    "factors need the call's graph. Under torch.utils.checkpoint pass use_reentrant=False (EGN's "
                    "default jacobian='auto' supports it where every trained parameter is a plain nn.Linear's "
                    "weight or bias or, with factor_embeddings=True, nn.Embedding's table; explicit Jacobians "
                    "(jacobian='explicit', or any other trained parameter) support no checkpoint regions); "
                    "for a layer run under torch.no_grad, jacobian='explicit'.")
                return None
            weight = getattr(site.module, "weight", None)
            if not changed and isinstance(weight, Tensor) and output.dtype != weight.dtype:
                # autocast inside the model's forward (accelerate's mixed_precision replaces model.forward
                # with an autocast wrapper): the Gram factors would pair bf16 signals with fp32 ones
                self.error = self.error or (
                    f"EGN: the {site.kind} layer {site.path!r} computed in {output.dtype} while its weight "
                    f"is {weight.dtype}: the model's forward runs under autocast (torch.autocast inside "
                    "forward, or a wrapper that replaced model.forward, e.g. accelerate's mixed_precision). "
                    "EGN's forwards need the parameters' dtype: run without mixed precision, or convert the "
                    "model (e.g. model.to(torch.bfloat16)).")
                return None
            if changed:
                self.error = self.error or (
                    f"EGN: a global forward hook (torch.nn.modules.module.register_module_forward_hook) changed "
                    f"the output of the {site.kind} layer {site.path!r}; its Gram factors need the layer's "
                    "own output. Remove the hook or use jacobian='explicit'.")
                return None
            # Cloned: a later in-place op on the input must not change the recorded factor.
            # (positions T from the shape, not -1: a rank's batch may be empty; an embedding's indices as
            # float64, the factor table's dtype, exact below 2⁵³)
            if site.vocab:
                self.inputs[i].append(a.detach().reshape(self.batch_size, math.prod(a.shape[1:]), 1)
                                      .to(torch.float64, copy=True))
            else:
                self.inputs[i].append(a.detach().reshape(self.batch_size, _positions(a), a.shape[-1]).clone())
            self.outputs[i].append(output)
            # Downstream layers see a copy, so in-place ops after this layer cannot rewrite the tensor
            # that the back-signals are read from.
            return output.clone()

        return hook

    def factors(self, deltas: list[Tensor | None], num_outputs: int) -> list[tuple[Tensor, Tensor]]:
        """Per site: A [b, T, d_in] and Δ [b, c, T, d_out], calls concatenated along T.

        ``deltas``: per recorded output (in :meth:`flat_outputs` order) its back-signals for all c
        output columns at once, [c, *output.shape] (None: the output does not reach z)."""
        out = []
        b, c = self.batch_size, num_outputs
        flat = iter(deltas)
        for i, site in enumerate(self.sites):
            m = site.module
            dt, dev = m.weight.dtype, m.weight.device
            d_in, d_out = site.widths()
            if not self.inputs[i]:
                out.append((torch.zeros(b, 0, d_in, dtype=torch.float64 if site.vocab else dt, device=dev),
                            torch.zeros(b, c, 0, d_out, dtype=dt, device=dev)))
                continue
            a = torch.cat(self.inputs[i], dim=1)
            ds = []
            for y in self.outputs[i]:
                g = next(flat)
                g = torch.zeros(c, *y.shape, dtype=y.dtype, device=y.device) if g is None else g
                ds.append(g.reshape(c, b, _positions(y), d_out).transpose(0, 1))
            delta = torch.cat(ds, dim=2)
            pad = getattr(m, "padding_idx", None)
            if site.vocab and pad is not None:
                # torch's backward gives the padding row no gradient: those positions are not in J (exact zeros,
                # not δ·0, so a non-finite δ there cannot leak into K)
                delta = delta.masked_fill((a[:, None, :, :] == pad), 0.0)
            out.append((a, delta))
        return out

    def flat_outputs(self) -> list[Tensor]:
        return [y for ys in self.outputs for y in ys]

    def prepare(self, z: Tensor, num_outputs: int) -> None:
        """Reads this forward's back-signals now, checking that the samples are independent
        (:func:`checked_back_signals`; ``error`` says so if not), so that a rank that finds a coupled
        model reports it before the ranks exchange anything."""
        deltas, coupled = checked_back_signals(z, self.flat_outputs(), num_outputs)
        self.error = self.error or coupled
        self._factors = self.factors(deltas, num_outputs)

    def local_factors(self, z: Tensor, num_outputs: int) -> list[tuple[Tensor, Tensor]]:
        """:meth:`factors` with the back-signals of ``z`` (the outputs of this capture's forward)."""
        if self._factors is None:
            self.prepare(z, num_outputs)
        assert self._factors is not None
        return self._factors


def _transformed_call(site: LinearSite) -> str:
    """The refusal of a factored layer called inside a torch.func transform of the forward: its output there
    is the transform's wrapper, not a tensor of the forward's own graph, so no back-signal reaches it (the
    step of a force -dE/dx taken with torch.func.grad was exactly 0, the exact one of norm 0.44)."""
    return (f"EGN: the {site.kind} layer {site.path!r} was called inside a torch.func transform (torch.func.grad, "
            "vjp, jacrev, jvp, vmap, ...) in the model's forward. What the layer's call sees there is the "
            "transform's own tensor, not one of the forward's graph, so the Gram factors of its trained "
            "parameters would miss their Jacobian (e.g. a force -torch.func.grad(energy)(x): the step was 0). "
            "Build EGN with jacobian='explicit' (its per-sample Jacobians are taken with torch.func, which "
            "composes with the transforms inside the forward), or freeze the layers used inside the transform.")


def _is_layer_output(m: nn.Linear | nn.Embedding, a: Tensor, out: Tensor) -> bool:
    """Whether ``out`` is the layer ``m``'s own output for input ``a`` (the same kernel again: equal up to
    a few ulps where a backend's GEMM is not bit-reproducible)."""
    with torch.no_grad():
        if isinstance(m, nn.Embedding):
            ref = torch.nn.functional.embedding(a, m.weight, m.padding_idx)
        else:
            ref = torch.nn.functional.linear(a, m.weight, m.bias)
    if ref.shape != out.shape:
        return False
    tol = 8 * torch.finfo(out.dtype).eps if out.is_floating_point() else 0.0
    return bool(((ref - out.detach()).abs().max() <= tol * ref.abs().max()).item()) if ref.numel() else True


def _positions(t: Tensor) -> int:
    """Positions per sample of a layer's input or output [b, ..., d] (1 for [b, d])."""
    return math.prod(t.shape[1:-1])


def _batched_grads(z: Tensor, outs: list[Tensor], cot: Tensor) -> list[Tensor | None]:
    """Per output y, [m, *y.shape]: the gradients for the m cotangents ``cot`` [m, *z.shape]."""
    try:
        grads = torch.autograd.grad(z, outs, grad_outputs=cot, retain_graph=True, allow_unused=True,
                                    is_grads_batched=True)
        return list(grads)
    except RuntimeError as exc:  # an op without a vmap rule for its backward
        log.debug("EGN: batched back-signals unavailable (%s); one backward per cotangent", exc)
    per_k = [torch.autograd.grad(z, outs, grad_outputs=cot[k], retain_graph=True, allow_unused=True)
             for k in range(cot.shape[0])]
    return [None if per_k[0][j] is None else torch.stack([g[j] for g in per_k])
            for j in range(len(outs))]


def part_of_batch_remedy(explicit: bool) -> str:
    """What works for a layer applied to a data-dependent part of the batch (a mixture of experts' dispatch);
    ``explicit``: said after vmap failed on it, where freezing the experts alone does not stop the vmap."""
    freeze = ("freeze the router and experts and, with jacobian='auto', every trained parameter that is not a "
              "plain nn.Linear's weight or bias (EGN then runs no vmap)" if explicit else
              "freeze the router and experts (EGN with jacobian='auto' trains the rest)")
    return ("Neither of EGN's Jacobian modes captures a layer applied to part of the batch: the Gram factors need "
            "the layer's input per sample of the whole batch, and jacobian='explicit' takes per-sample Jacobians "
            "with torch.vmap, which cannot run the dispatch (nonzero, boolean-mask indexing: data-dependent "
            "shapes). Compute every expert on the whole batch and mask its output (out = out + (pick == e)[:, "
            f"None] * gate[:, e, None] * expert_e(x)), or {freeze}, or train the model with another optimizer "
            "(e.g. ShardedAdamW, SOAA).")


def _not_per_sample(site: LinearSite, shape: tuple[int, ...], batch_size: int) -> str:
    """The refusal of a layer input whose first dimension is not the batch. Fewer rows than the batch, not
    sequence-first: the layer most likely sees part of the batch (an MoE expert), which jacobian='explicit'
    cannot run either; otherwise (flattened [b·T, d], sequence-first [T, b, d]) the explicit mode works."""
    head = (f"EGN: the {site.kind} layer {site.path!r} received an input of shape {shape} whose first "
            f"dimension is not the batch size {batch_size}; per-layer Gram factors need per-sample inputs. ")
    if site.vocab:
        return head + ("Use jacobian='explicit' or, for this table alone, factor_embeddings=False (explicit rows "
                       "for every nn.Embedding: a positional table looked up with arange(T) trains that way).")
    if shape[0] < batch_size and not (len(shape) > 2 and shape[1] == batch_size):
        return head + ("With fewer rows than the batch, the layer is applied to part of the batch (e.g. a "
                       "mixture of experts that sends each expert the samples its router picked). "
                       + part_of_batch_remedy(False) + " (Where the layer does see every sample, in another layout, "
                       "jacobian='explicit' works.)")
    return head + "Use jacobian='explicit' (per-sample Jacobians of the whole forward, by torch.func)."


#: relative difference, per dtype, between the probe's gradient and the same combination of the c
#: back-signals above which a model is taken to mix samples (per-sample models differ by rounding only)
COUPLING_TOL = {torch.float64: 1e-8, torch.float32: 1e-3}
COUPLING_MESSAGE = ("EGN: the model's outputs for one sample depend on other samples of the batch (in eval mode: "
                    "statistics of the batch, attention across it, a layer applied along the batch dimension). "
                    "EGN's Gram factors and back-signals are per sample; it needs a per-sample model. (A "
                    "per-sample model whose Linear layers see inputs whose first dimension is not the batch, "
                    "e.g. sequence-first [T, b, d], trips this check when T equals b: use jacobian='explicit'.) "
                    "If the model is per sample, the cause may instead be an op whose torch.func batching rule "
                    "gives wrong per-sample results (e.g. torch.cdist): EGN takes the per-sample Jacobians of "
                    "the parameters outside plain nn.Linear layers with vmap(jacrev) (of every parameter with "
                    "jacobian='explicit'; the Linear layers' back-signals come from a batched backward with the "
                    "default jacobian='auto'), and this check cannot tell the two causes apart. Then write that "
                    "op out with elementary tensor ops (torch.cdist(a, b) as ((a[:, None] - b) ** 2).sum(-1)"
                    ".sqrt()), or keep the parameters that feed it in nn.Linear layers with jacobian='auto'. "
                    "A forward run under autocast (torch.autocast inside forward, accelerate's mixed_precision) "
                    "trips it too, by its rounding: run EGN without mixed precision.")


def checked_back_signals(z: Tensor, outs: list[Tensor], num_outputs: int) -> tuple[list[Tensor | None], str | None]:
    """δ for every output column k at once, and whether the samples are independent.

    Per recorded layer output y, [c, *y.shape] with slice k the gradient of Σ_i z_ik with respect to y;
    for a per-sample model ∂(Σ_i z_ik)/∂y_j = ∂z_jk/∂y_j. The c one-hot cotangents go through ONE batched
    backward (``is_grads_batched``, vmap over the backward graph) instead of c backward passes; models
    whose backward ops have no batching rule fall back to the loop. The same backward takes one more
    cotangent, P_ik = w_i ρ_k (fixed, distinct weights): for a per-sample model its gradient at sample j is
    w_j Σ_k ρ_k δ_jk, the same combination of the back-signals; where z_i depends on y_j for i ≠ j, the
    one-hot cotangents sum those terms into δ_j (wrong factors) and the probe differs.
    Returns (back-signals, None) or (back-signals, the message)."""
    if not outs:
        return [], None
    b, c = z.shape[0], num_outputs
    eye = torch.eye(c, dtype=z.dtype, device=z.device)
    w = probe_weights(b, z)
    rho = probe_weights(c, z)
    cot = torch.cat([eye[:, None, :].expand(c, b, c), (w[:, None] * rho[None, :]).unsqueeze(0)])
    grads = _batched_grads(z, outs, cot)
    tol = COUPLING_TOL.get(z.dtype, 3e-2)
    norms = []
    for g in grads:
        if g is not None:
            want = torch.tensordot(rho, g[:c], dims=1) * w.view(b, *([1] * (g.dim() - 2)))
            norms += [(g[c] - want).norm(), g[c].norm() + want.norm()]
    values = torch.stack(norms).tolist() if norms else []  # one host read
    pairs = list(zip(values[0::2], values[1::2]))
    # a layer whose signals are rounding noise next to the others' (both sides ~0) is no evidence
    floor = 1e-6 * max((scale for _, scale in pairs), default=0.0)
    coupled = any(diff > tol * max(scale, floor) for diff, scale in pairs)
    return [None if t is None else t[:c] for t in grads], COUPLING_MESSAGE if coupled else None


def probe_weights(n: int, like: Tensor) -> Tensor:
    """n fixed, distinct weights in [1, 2) (fractional parts of multiples of the golden ratio)."""
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return (1.0 + torch.frac(i * 0.6180339887498949)).to(dtype=like.dtype, device=like.device)


def _call_slots(model: nn.Module, params: dict[str, Tensor]) -> dict[str, str]:
    """Every place in ``model`` that holds one of ``params``, once each: {that place's name: the name in
    ``params``}, for ``functional_call(..., tie_weights=False)``.

    torch's own tying (``tie_weights=True``) goes by name: a submodule registered under two names (one
    layer applied twice) is one place reached by two names, and torch swaps it twice and restores it in
    the same order, leaving the detached stand-in in the module instead of its Parameter (the model then
    no longer trains that layer). Here the places are told apart by (module, attribute): a reused module
    counts once, a Parameter shared by two modules (tied embeddings) is replaced in both."""
    want = {id(p): n for n, p in params.items()}
    slots: dict[str, str] = {}
    seen: set[tuple[int, str]] = set()
    for path, m in model.named_modules(remove_duplicate=False):
        for attr, p in m._parameters.items():
            if p is None or id(p) not in want or (id(m), attr) in seen:
                continue
            seen.add((id(m), attr))
            slots[f"{path}.{attr}" if path else attr] = want[id(p)]
    return slots


def _call(model: nn.Module, slots: dict[str, str], pdict: dict[str, Tensor], xs: tuple[Tensor, ...]) -> Tensor:
    """``model(*xs)`` with the parameters ``pdict`` in every place :func:`_call_slots` found."""
    out: Tensor = functional_call(model, {place: pdict[n] for place, n in slots.items()}, xs, tie_weights=False)
    return out


def _single(model: nn.Module, slots: dict[str, str], pdict: dict[str, Tensor], xs: tuple[Tensor, ...]) -> Tensor:
    return _call(model, slots, pdict, tuple(x.unsqueeze(0) for x in xs)).squeeze(0)


def explicit_jacobian_rows(model: nn.Module, params: dict[str, Tensor], xs: tuple[Tensor, ...]) -> Tensor:
    """Per-sample Jacobians of the outputs w.r.t. ``params``, flattened: [b, c, Σ numel]."""
    pdict = {n: p.detach() for n, p in params.items()}
    slots = _call_slots(model, params)
    jac = vmap(jacrev(_single, argnums=2), in_dims=(None, None, None, 0))(model, slots, pdict, xs)
    b = xs[0].shape[0]
    first = jac[next(iter(pdict))]
    c = first.shape[1]
    return torch.cat([jac[n].reshape(b, c, pdict[n].numel()) for n in pdict], dim=2)


def checked_explicit_rows(model: nn.Module, params: dict[str, Tensor], xs: tuple[Tensor, ...],
                          z: Tensor) -> tuple[Tensor, str | None]:
    """:func:`explicit_jacobian_rows`, and whether they are the rows of the batch's own Jacobian.

    The rows are the Jacobians of the model run on ONE sample; they are sample i's rows of the batch's
    Jacobian only if no sample's outputs depend on ``params`` through another sample. The check is the
    probe of :func:`checked_back_signals`: the gradient of Σ_ik P_ik z_ik (P_ik = w_i ρ_k) through the
    batch's own graph must equal the same combination of the rows. It sees mixing that changes the
    derivatives but not the values (a trained coefficient at 0 times a batch statistic); mixing that
    moves no derivative (a constant batch statistic added to the outputs) leaves the rows right and
    passes. Returns (rows [b, c, rest], None) or (rows, the message)."""
    b, c = z.shape
    if b == 0:  # a rank's empty share of the global batch: no rows, nothing to mix (vmap over no sample fails)
        p0 = next(iter(params.values()))
        return torch.zeros(0, c, sum(p.numel() for p in params.values()), dtype=p0.dtype, device=p0.device), None
    rows = explicit_jacobian_rows(model, params, xs)
    w, rho = probe_weights(b, z), probe_weights(c, z)
    plist = list(params.values())
    grads: Sequence[Tensor | None] = [None] * len(plist)
    if z.requires_grad:  # else no trained parameter reaches z: the batch's gradient is zero
        grads = torch.autograd.grad(z, plist, grad_outputs=w[:, None] * rho[None, :], retain_graph=True,
                                    allow_unused=True)
    got = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(plist, grads)])
    want = torch.einsum("i,k,ikp->p", w, rho, rows)
    diff, scale = torch.stack([(got - want).norm(), got.norm() + want.norm()]).tolist()  # one host read
    return rows, COUPLING_MESSAGE if diff > COUPLING_TOL.get(z.dtype, 3e-2) * scale else None
