"""``EGN``: exact Gauss-Newton with the mini-batch Gram matrix assembled across ranks."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_soaa.config import REPLICA_CHECK_EVERY, EGNConfig, check_range
from lightning_soaa.distributed import agreement
from lightning_soaa.distributed.blocks import BlockInfo
from lightning_soaa.distributed.checkpoint import StateField, check_finite_number
from lightning_soaa.distributed.comm import LocalComm, comm_device, flat_buffers
from lightning_soaa.distributed.dtensor import has_dtensor
from lightning_soaa.distributed.exchange import HeldBuffers
from lightning_soaa.functional import egn as egn_math
from lightning_soaa.functional.chain_gram import ChainOperator
from lightning_soaa.functional.gram import (
    GramFactors,
    GramLayout,
    GramOperator,
    LinearFactorShape,
    add_rows,
    assemble_gram,
    factors_to,
    gram_matvec,
    kronecker_sample_gram,
    pack_factor_table,
    split_factor_table,
    transform_factors,
)
from lightning_soaa.functional.reductions import dot_f64
from lightning_soaa.optim.base import (
    TEMPLATE_HOOKS,
    BlockView,
    ShardedOptimizer,
    SkipStep,
    StepRecord,
    host_floats,
    overrides_any,
    summed,
)
from lightning_soaa.optim.egn_capture import (
    COUPLING_TOL,
    LinearCapture,
    changed_site,
    checked_explicit_rows,
    part_of_batch_remedy,
    plan_curvature,
    probe_weights,
    site_params,
)
from lightning_soaa.optim.egn_chain import ChainCapture, grad_off, plan_chain
from lightning_soaa.optim.egn_places import ParamPlaces, replaced_message
from lightning_soaa.optim.egn_rng import DrawHistory, StepRng
from lightning_soaa.optim.egn_trace import plan_trace
from lightning_soaa.optim.lightning_clip import unread_clip_error
from lightning_soaa.optim.param_checks import check_step
from lightning_soaa.optim.step_context import caller_autocast, full_precision, one_model_function
from lightning_soaa.optim.step_hooks import hooked_step

if TYPE_CHECKING:
    from lightning_soaa.optim.egn_plan import StepPlan

__all__ = ["EGN", "MISSING_BATCH_MESSAGE"]

log = logging.getLogger(__name__)

#: from this system size (bc, or b(c−1) for cross-entropy) on, a float64 system is assembled and
#: Cholesky-factored in float32 and refined to float64 accuracy: below it the float64 factorization costs
#: less than the refinement sweeps (measured, 1 thread, MLP factors: float64 / mixed 1.4 / 2.2 ms at 288,
#: 4.2 / 3.4 ms at 432, 16 / 11 ms at 864, with 3 sweeps of a float64 factor mat-vec; with the 2 sweeps of
#: functional/egn._converged the whole digits step at 288 is still 1.07x (64-32-32-10) / 1.01x (64-128-128-10)
#: the float64 solve's: benchmarks/egn_step_floor.py --routes).
MIXED_MIN_SIZE = 384

#: systems with bc up to this size are solved from the whole K (K·r a dense mat-vec, SᵀKS one contraction):
#: cheaper per step for small models, where the op count matters more than the flops (measured, 1 thread,
#: MLP 64-32-32-c at b=32: the solve phase 0.88 -> 0.73 ms at bc=64; at bc=320 it was slower, 2.3 -> 2.9)
SMALL_DENSE_MAX = 128

#: from this system size on, a float64 system is first solved by matrix-free conjugate gradients (measured,
#: the solve alone, 1 thread, bench MLP 32-64-64-10, λ=1: CG 5.4 vs 4.5 ms direct at 432, 4.8 vs 7.7 at 576,
#: 9.0 vs 32 at 1152, 13 vs 139 ms at 2304; 12-14 mat-vecs)
CG_MIN_SIZE = 512
#: CG is not tried when fewer mat-vecs than this fit the budget (:func:`_cg_budget`)
CG_MIN_BUDGET = 16
#: after CG failed to converge, the next this many solves go straight to the direct solve (λ changes
#: slowly, so the next systems would most likely fail too)
CG_PAUSE_STEPS = 16


def _cg_budget(layout: GramLayout, n: int, op: GramOperator | ChainOperator) -> int:
    """Mat-vecs CG may spend before EGN falls back to the direct solve: about the break-even with that
    solve, from a flop count, and at most n/16 (the break-even measured on the bench MLP at n = 576 and
    2304 was 34 and ~170 mat-vecs). The direct solve's flops: Cholesky n³/3 plus the lower-triangle
    assembly, ~n² per Gram column of every factor; a mat-vec is counted at twice its flops (its small
    products run at about half the rate of the dense factorization)."""
    cols = sum(s.positions * s.d_out for s in layout.sites if s.weight or s.bias) + layout.rest
    direct = n ** 3 / 3 + n * n * cols
    return int(min(n // 16, direct / (2 * max(op.flops(), 1))))


def _as(t: Tensor, dtype: torch.dtype | None = None, device: torch.device | None = None) -> Tensor:
    """``t.to(device, dtype)`` where that changes something, else ``t`` itself (what ``to`` returns then,
    after an ATen call that a small model's step pays for)."""
    if (dtype is None or t.dtype == dtype) and (device is None or t.device == device):
        return t
    return t.to(device=device, dtype=dtype)


MISSING_BATCH_MESSAGE = (
    "EGN.step() got no mini-batch: EGN forms Jacobians from the inputs and targets, not from a loss. "
    "Call opt.step(inputs=x, targets=y) or opt.set_batch(x, y) before step(); under Lightning add the "
    "callback lightning_soaa.lightning.BatchToOptimizer() to the Trainer, or use manual optimization. "
    "(Lightning's learning-rate and batch-size finders, Tuner.lr_find / Tuner.scale_batch_size or the "
    "LearningRateFinder / BatchSizeFinder callbacks, run their search with the Trainer's callbacks replaced "
    "by their own, so no batch reaches EGN there: EGN's line search picks the step size itself, with lr as "
    "its cap; do not run either finder on it.)"
)


def _check_solve_dtype(solve_dtype: str, named: Sequence[tuple[str, Tensor]]) -> None:
    """Refuse ``solve_dtype="model"`` where the model's dtype (the first trained parameter's, as
    ``EGN._solve_dtype`` reads it) is half precision: LAPACK has no half-precision Cholesky (torch's bare
    NotImplementedError), and class labels sent through a bfloat16 factor table round (299 -> 300: an
    index error at W > 1)."""
    solve = named[0][1].dtype
    if solve_dtype == "model" and solve in (torch.float16, torch.bfloat16):
        raise ValueError(f"Invalid solve_dtype='model' for a model whose first trained parameter "
                         f"({named[0][0]!r}) is {solve}: the solve, in that dtype, needs float32 or float64. "
                         "Use solve_dtype='float64' (the default).")


def _check_one_dtype(named: Sequence[tuple[str, Tensor]]) -> None:
    """Refuse trained parameters of more than one floating dtype. EGN pairs every layer's captured inputs
    and back-signals with the model's outputs in one dtype: a float32 body under a float64 head crashed in
    the capture with torch's bare "both inputs should have same dtype"; a float32 layer between float64 ones
    was refused as "outputs depend on other samples" (its rounding read as coupling)."""
    first_name, first = named[0]
    other = next(((n, p) for n, p in named if p.dtype != first.dtype), None)
    if other is not None:
        dtypes = sorted({str(p.dtype) for _, p in named})
        raise ValueError(
            f"EGN: the model's trained parameters have more than one dtype ({', '.join(dtypes)}): {first_name!r} "
            f"is {first.dtype}, {other[0]!r} is {other[1].dtype}. EGN needs one dtype for every trained "
            "parameter: convert the model to one dtype before building EGN (e.g. model.double() or "
            "model.to(torch.float32)).")


def _compiled_inner(module: nn.Module) -> nn.Module | None:
    """The eager module inside a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``), else None."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else None


def _eager_module(model: nn.Module) -> nn.Module:
    """The module EGN hooks, differentiates and runs. Its capture (forward hooks on each Linear) and
    ``torch.func`` transforms need eager modules: a compiled graph does not run the hooks as eager code
    would (the step was wrong by 0.29-3.6 relative to eager). A ``torch.compile``'d model is unwrapped (the
    wrapper shares its parameters, so the user's compiled forward still sees every update); a compiled
    submodule cannot be unwrapped without changing the user's model and is refused."""
    inner = _compiled_inner(model)
    if inner is not None:
        log.info("EGN: the model is torch.compile'd; EGN runs its own forwards on the eager _orig_mod.")
        model = inner
    for name, m in model.named_modules():
        if _compiled_inner(m) is not None:
            raise ValueError(
                f"EGN: the submodule {name!r} is torch.compile'd; EGN's per-layer capture needs the eager "
                f"modules. Pass EGN the compiled module itself (e.g. EGN(self.{name}, ...) in a LightningModule: "
                "EGN then runs its eager _orig_mod), compile in place with module.compile() instead of "
                "replacing it by torch.compile(module), or do not compile it."
            )
    return model


def _bypass_compiled(modules: list[nn.Module]) -> list[tuple[nn.Module, Any]]:
    """Modules compiled in place (``module.compile()``: no wrapper to unwrap, their ``__call__`` runs
    the compiled graph) run their eager forward during EGN's step: the capture's hooks and ``torch.func``
    need the eager calls (the compiled graph's fused ``addmm`` was refused as a use of a Linear's
    parameters outside its call). Returns what to put back after the step; the user's own calls stay
    compiled."""
    out = []
    for m in modules:
        impl = m.__dict__.get("_compiled_call_impl")
        if impl is not None:
            out.append((m, impl))
            object.__setattr__(m, "_compiled_call_impl", None)
    return out


def _fingerprint(active: tuple[bool, ...]) -> float:
    """Which of EGN's parameters are trainable, as one float for the agreement all-reduce: the tuple's
    hash (not salted across processes for bools), cut to the 52 bits a float64 holds exactly."""
    return float(hash(active) & ((1 << 52) - 1))


#: nn.Module's own mode switch (a class whose attribute is another one extends it: see :func:`_plain_modes`)
_MODULE_TRAIN, _MODULE_EVAL, _MODULE_SETATTR = nn.Module.train, nn.Module.eval, nn.Module.__setattr__


def _plain_modes(modules: list[nn.Module]) -> bool:
    """Whether switching ``modules`` to eval mode is only setting their ``training`` flags: no class among
    them overrides ``nn.Module``'s ``eval``, ``train`` or ``__setattr__`` (checked at every step: a class or
    an instance may be patched between steps)."""
    return all(type(m).train is _MODULE_TRAIN and type(m).eval is _MODULE_EVAL
               and type(m).__setattr__ is _MODULE_SETATTR and "train" not in m.__dict__ and "eval" not in m.__dict__
               for m in modules)


def _no_nested_tensors(modules: list[nn.Module]) -> list[tuple[nn.TransformerEncoder, bool]]:
    """Turn off the padding-mask-to-nested-tensor path of the model's TransformerEncoders for the step; returns
    their settings to restore. The step runs with torch's MHA fast path off in its own thread
    (``one_model_function``), but an eval-mode TransformerEncoder checks its mask with
    ``torch._nested_tensor_from_mask_left_aligned`` before it looks at that, which has no vmap rule (the
    explicit rows failed). torch's process-wide switch skipped that check, and turning it off for the step
    broke other threads' eval forwards; this attribute belongs to EGN's own model, whose modes the step
    already sets (eval mode)."""
    found = [m for m in modules
             if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False)]
    for m in found:
        m.use_nested_tensor = False
    return [(m, True) for m in found]


def _refuse_parametrize_cache() -> None:
    """A step inside ``torch.nn.utils.parametrize.cached()``: every forward of the step (the capture, the
    explicit Jacobians' functional_call, the line search's trials) would read the weights the cache computed
    before, not from the parameters being differentiated or moved (a step raised about batch dependence, or,
    with the cache filled under no_grad, moved the other parameters by the wrong Jacobian, silently)."""
    if getattr(torch.nn.utils.parametrize, "_cache_enabled", 0):
        raise ValueError(
            "EGN.step: called inside torch.nn.utils.parametrize.cached(); its cached parametrized weights would "
            "stand in for the parameters EGN differentiates and moves. Call step() outside the cached() block.")


#: the hooks of a module's call that a torch.compile wrapper runs around its compiled forward, and how
#: they are registered (for the message)
_CALL_HOOKS = (("_forward_pre_hooks", "register_forward_pre_hook"), ("_forward_hooks", "register_forward_hook"),
               ("_backward_pre_hooks", "register_full_backward_pre_hook"),
               ("_backward_hooks", "register_full_backward_hook"))


def _wrapper_hooks(wrapper: nn.Module) -> list[tuple[str, dict[int, Any]]]:
    """The hook dicts of a ``torch.compile`` wrapper (live: hooks registered on it later show there)."""
    return [(how, getattr(wrapper, attr)) for attr, how in _CALL_HOOKS]


def _refuse_wrapper_hooks(hooks: list[tuple[str, dict[int, Any]]]) -> None:
    """Hooks on the ``torch.compile`` wrapper EGN was given: its own ``__call__`` runs them around the
    compiled forward, but EGN runs the eager ``_orig_mod`` (:func:`_eager_module`), without them: a forward
    hook scaling the outputs left EGN stepping another function (0.35 off the exact step, and the loss it
    returned was not the model's)."""
    found = [f"{how}({getattr(h, '__qualname__', type(h).__name__)})" for how, d in hooks for h in d.values()]
    if found:
        raise ValueError(
            f"EGN: the torch.compile wrapper EGN was built on has hooks ({', '.join(found[:4])}"
            f"{' and others' if len(found) > 4 else ''}); EGN runs its forwards on the wrapper's eager "
            "_orig_mod, where they do not run, so it would step another function than the one you train. "
            "Register them on the inner module instead (compiled._orig_mod.register_forward_hook(...), or on the "
            "model before torch.compile: the compiled forward runs them too). Nothing changed.")


#: why add_param_group is refused, and the route that works for a schedule of frozen and unfrozen layers
ADD_PARAM_GROUP_MESSAGE = (
    "EGN.add_param_group: EGN has exactly one param group, the parameters of the model it was built on, and "
    "takes no other (Lightning's BaseFinetuning/BackboneFinetuning add one when they unfreeze a backbone, with "
    "unfreeze_and_add_param_group). EGN follows requires_grad at every step over the parameters it was built "
    "with: build it while every layer to be trained is trainable, then freeze and unfreeze with "
    "requires_grad_. In a BaseFinetuning subclass leave freeze_before_training empty (it runs before "
    "configure_optimizers) and in finetune_function call self.freeze(...) at the first epoch and "
    "self.make_trainable(...) at the epoch to unfreeze; under DDP at W > 1 use "
    "strategy='ddp_find_unused_parameters_true'. For another model construct a new EGN. Nothing changed."
)


def _the_module(model: Any) -> tuple[nn.Module, list[tuple[str, dict[int, Any]]]]:
    """The eager module EGN works on, and the hook dicts of the ``torch.compile`` wrapper it came in (EGN runs
    the inner module without them: refused here and at every step while any is registered)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model={type(model).__name__}. EGN needs the nn.Module itself "
                         "(it forms Jacobians from it), not its parameters.")
    wrapper_hooks = _wrapper_hooks(model) if _compiled_inner(model) is not None else []
    _refuse_wrapper_hooks(wrapper_hooks)
    return _eager_module(model), wrapper_hooks


def _changed_input(xs: tuple[Tensor, ...], versions: list[int]) -> str | None:
    """Why the forward just run cannot be run again on ``xs`` (it changed one of them in place: its version
    counter moved), else None. EGN runs the forward several times a step on the same tensors (the capture,
    the line-search, damping and non-finite trials): ``x /= 255`` there (after ``x = x.float()``, which
    returns ``x`` itself when it is float already) scaled each of those forwards' batch again (0.90 off the
    exact step, and the caller's batch divided by 255³). An in-place op that gives the same value again
    (``x.clamp_(0, 1)``) cannot be told apart without a copy of the batch, so it is refused too."""
    for i, (x, v) in enumerate(zip(xs, versions)):
        if x._version != v:
            which = "its input" if len(xs) == 1 else f"its input {i}"
            return (f"EGN: the model's forward changed {which} in place (e.g. x /= 255 or x.sub_(mean), also after "
                    "x = x.float() or x.to(dtype), which return x itself when its dtype already matches, or an "
                    "in-place activation applied to the input, nn.ReLU(inplace=True) first in the forward). EGN runs "
                    "the forward several times a step on the same batch (its capture, line-search and damping "
                    "trials), and each would see a batch changed again. Use out-of-place ops in the forward "
                    "(x = x / 255, x = x - mean; nn.ReLU() for an activation that the input meets first), or "
                    "prepare the batch before the step. The optimizer and the "
                    "parameters are unchanged; the batch itself may have been changed once by this forward.")
    return None


def _refuse_scripted(model: nn.Module) -> None:
    """A TorchScript module (``torch.jit.script``/``trace``, or one inside an eager model): EGN plans, hooks
    and swaps eager modules' parameters, which a ScriptModule's compiled forward bypasses (its first step
    failed with "'OrderedModuleDict' object has no attribute 'get'")."""
    for name, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule):
            where = "the model" if not name else f"module {name!r}"
            raise ValueError(
                f"EGN: {where} is a TorchScript module ({type(m).__name__}); EGN needs eager modules (it hooks "
                "their calls and differentiates them with torch.func). Pass the module before torch.jit.script "
                "or torch.jit.trace.")


def _refuse_embedding_options(model: nn.Module) -> None:
    """A trained ``nn.Embedding`` / ``EmbeddingBag`` built with an option EGN's Jacobians cannot follow:
    ``sparse=True`` (torch.func cannot batch sparse gradients: the step failed with an internal
    'aten::view ... SparseCPU' error), ``scale_grad_by_freq=True`` (it changes only the gradient torch's
    backward returns, by the batch's index counts, not the function: one sample's Jacobian then differs
    from its share of the batch's, and the step failed with a misleading batch-dependence error), or
    ``max_norm`` (the forward renormalises the looked-up rows of the table in place, which vmap refuses)."""
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Embedding, nn.EmbeddingBag)) or not m.weight.requires_grad:
            continue
        kind = type(m).__name__
        if m.sparse:
            why = (f"{kind}(sparse=True), whose sparse gradients EGN's Jacobians cannot use. Build it with "
                   "sparse=False (EGN forms its own dense Jacobian rows)")
        elif m.scale_grad_by_freq:
            why = (f"{kind}(scale_grad_by_freq=True), which rescales the gradient torch's backward returns by "
                   "the batch's index counts; EGN differentiates the forward itself, per sample, and cannot "
                   "follow that rescaling. Build it with scale_grad_by_freq=False")
        elif m.max_norm is not None:
            why = (f"{kind}(max_norm={m.max_norm}), whose forward renormalises the looked-up rows of its table "
                   "in place, which EGN's per-sample Jacobians (torch.func.vmap) cannot run. Build it without "
                   "max_norm (renormalise the rows yourself after each step if you need it)")
        else:
            continue
        raise ValueError(f"EGN: module {name!r} is {why}, or freeze it (weight.requires_grad_(False)).")


def _buffer_layout(buffers: list[tuple[str, Tensor]]) -> list[float]:
    """[count, numel, crc32 of the names, shapes and dtypes] of floating-point buffers: equal on ranks that
    hold the same model (crc32, not ``hash``: Python salts string hashes per process)."""
    key = ";".join(f"{n}:{tuple(b.shape)}:{b.dtype}" for n, b in buffers)
    return [float(len(buffers)), float(sum(t.numel() for _, t in buffers)), float(zlib.crc32(key.encode()))]


def _buffer_transfer(tensors: list[Tensor], rank: int, numel: int, device: torch.device) -> Tensor:
    """The float64 buffer of the buffer transfer's all-reduce: rank 0's values, zeros on the other ranks; on the
    collective's ``device`` (else the all-reduce copied it there: an allocation after the layout agreement)."""
    if rank == 0:
        return torch.cat([b.detach().reshape(-1).to(torch.float64) for b in tensors]).to(device)
    return torch.zeros(numel, dtype=torch.float64, device=device)


#: the agreement table (:meth:`EGN._agreement_table`) has the size and layout of the step record's all-reduce
#: (:func:`agreement.record_size`): a head of ``RECORD_SLOTS`` summed values [non-finite, loss sum, 0...], one
#: ``STEP_ROW`` row per rank, the stop vote's slot (0). A row: [error, b_r, c, trainable fingerprint, kind,
#: crc of T per Linear site, samples its all-gather buffers hold, instance id] in the batch agreement; [error,
#: buffer count, buffer numel, buffer layout crc, kind, 0, 0, instance id] in the buffer agreement. The error flag
#: and the instance id sit where the step record's rows hold them, so a rank in EGN's first collective and a
#: rank in another optimizer's step record (optimizers stepped in different orders) meet in one call of equal
#: size and both raise the same error, instead of gloo's size-mismatch abort or NCCL's hang.
_KIND_SLOT, _SITES_SLOT = 4, 5
#: the batch agreement's slot of the samples per rank that this rank's buffers of the factors' all-gather hold (made
#: before the agreement: :meth:`EGN._reserve_gather`)
_RESERVE_SLOT = 6
#: the kind of agreement a rank's row belongs to: the buffer agreement before the capture forward (W > 1,
#: floating buffers only) or the batch agreement after it. Both tables have the same size, so a rank that
#: makes one while another makes the other meets it in the same all-reduce, and both raise.
_BATCH_KIND, _BUFFER_KIND = 0.0, 1.0
#: the size of the explicit Jacobian rows of a step (bytes) from which EGN warns (:meth:`EGN._warn_dense_rows`)
DENSE_ROWS_WARN_BYTES = 1 << 30

#: EGN's constructor options that are not read from its param group (lr and momentum are)
_CONSTRUCTOR_ONLY = frozenset(f.name for f in dataclasses.fields(EGNConfig)) - {"lr", "momentum"}


class _ModelOutputs:
    """The autograd nodes of every tensor the model's forward returns while the closure runs (a forward
    hook, removed after). A checkpointed forward (``torch.utils.checkpoint``, reentrant) hides the model's
    parameters from the graph of its output, but not the output's own node."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.nodes: set[Any] = set()
        self._handle: Any = None

    def __enter__(self) -> _ModelOutputs:
        def record(_module: nn.Module, _args: Any, out: Any) -> None:
            stack = [out]
            while stack:  # a tensor, or tuples / lists / dicts of them
                o = stack.pop()
                if isinstance(o, Tensor):
                    if o.grad_fn is not None:
                        self.nodes.add(o.grad_fn)
                elif isinstance(o, (tuple, list)):
                    stack.extend(o)
                elif isinstance(o, dict):
                    stack.extend(o.values())

        self._handle = self.model.register_forward_hook(record)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


def _computed_by_model(tensors: Sequence[Any], params: set[int], outputs: set[Any], seen: set[Any]) -> bool:
    """Whether the autograd graph of one of ``tensors`` reaches one of ``params`` (EGN's parameters, by id)
    or a node in ``outputs`` (the model's outputs in the closure): it was computed by the model. ``seen``:
    the nodes already walked (shared by the items of one pair: one pass over the graph)."""
    todo: list[Any] = [t.grad_fn for t in tensors if isinstance(t, Tensor) and t.grad_fn is not None]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in outputs or id(getattr(fn, "variable", None)) in params:
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


def _check_closure_batch(inputs: Any, targets: Any, params: set[int], outputs: set[Any]) -> None:
    """Refuse a pair a closure returned as the batch when an item was computed by the model (its graph
    reaches EGN's own parameters or the model's outputs in the closure): a model's output or a loss
    (``return logits, y``, ``return loss, logits``), never a data batch. Taken as (inputs, targets),
    ``(logits, y)`` on a model whose input and output widths agree stepped silently on ``model(logits)``.
    Tensors computed with autograd by other modules (a backbone's features, a teacher's targets,
    adversarial inputs) are a batch, as through ``step(inputs=...)``."""
    seen: set[Any] = set()
    for which, item in (("first", inputs), ("second", targets)):
        if _computed_by_model(item if isinstance(item, (tuple, list)) else (item,), params, outputs, seen):
            raise ValueError(
                f"EGN.step: the closure returned a pair, which EGN takes as the batch (inputs, targets), but its "
                f"{which} item was computed by the model (its autograd graph reaches the model's parameters or "
                "output): a model output or a loss, e.g. `return logits, y` or `return loss, logits`. Return only "
                "the batch (x, y) from the closure (.detach() what is meant as data), or pass it with "
                "step(inputs=x, targets=y) / set_batch(x, y) and return the loss.")


def _checked_global(key: str, value: Any, *, positive: bool) -> float:
    """``value`` for ``opt.<key>`` as a Python float, or ``ValueError`` naming it (set by hand, NaN or a
    negative λ made every later step a skip "could not be solved"; 0 and inf were stepped)."""
    check_range(f"opt.{key}", value, 0.0, lo_inclusive=not positive)
    return float(value)


_KIND_MESSAGE = ("EGN: the ranks disagree on whether the model has floating-point buffers (e.g. BatchNorm "
                 "running statistics); every rank must hold the same model.")


@dataclasses.dataclass
class _Batch:
    """This rank's batch after the validation all-reduce: every rank agrees on sizes and shapes."""

    xs: tuple[Tensor, ...]
    y: Tensor  # targets on the outputs' device (float targets in the outputs' dtype)
    z: Tensor  # outputs [b_r, c]: attached to the general capture's graph (a chain capture has none)
    cap: LinearCapture | ChainCapture
    sizes: list[int]  # local batch size of every rank
    c: int
    rank: int
    positions: list[int]  # T per factored Linear
    nonfinite: bool  # some rank saw non-finite outputs or loss
    f0: float  # L_b(w), the global mean loss
    # this rank's Gram factors in the model's dtype (set by _gather_factors): per Linear site (A, Δ), and
    # the explicit Jacobian rows [b_r, c, rest] or None; d = Jᵀv is read back from them
    local_factors: list[tuple[Tensor, Tensor]] = dataclasses.field(default_factory=list)
    local_rows: Tensor | None = None
    reserved: list[int] = dataclasses.field(default_factory=list)  # samples of every rank's all-gather buffers

    @property
    def b(self) -> int:
        return sum(self.sizes)

    @property
    def b_r(self) -> int:
        return self.sizes[self.rank]

    @property
    def start(self) -> int:
        """Index of this rank's first sample in the global batch."""
        return sum(self.sizes[:self.rank])


@dataclasses.dataclass
class _Curvature:
    """The global Gauss-Newton system's solution, identical on every rank."""

    r: Tensor  # pseudo-residual [bc]
    s: Tensor | None  # Q's per-sample factors
    sol: egn_math.SolveResult
    gtd: float  # gᵀd of the plain direction d = Jᵀv
    jd_qq: float  # (Jd)ᵀQ(Jd) of the plain direction (NaN without adaptive damping: unused)


@dataclasses.dataclass
class _EGNRecord(StepRecord):
    """The template's all-reduce: [non-finite flag, ranks with a gradient (not read: EGN steps from the
    batch), owners' partial gᵀd of the momentum direction]."""

    gtd_momentum: float = summed()
    # W > 1: the ranks whose conjugate gradients did not converge this step (every rank pauses them alike after it)
    cg_failed: float = summed()
    # the ranks holding a momentum buffer (with momentum): none on any rank after steps with it is a restart
    # (optimizer.state.clear()), whose count starts again as a fresh optimizer's (see EGN._restart_momentum)
    holds_momentum: float = summed()
    direction: list[Tensor] = dataclasses.field(default_factory=list)  # owned blocks of d = Jᵀv
    # new momentum buffers (owned; None: a frozen parameter's, kept as it is)
    buffers: list[Tensor | None] = dataclasses.field(default_factory=list)
    momentum_dirs: list[Tensor] = dataclasses.field(default_factory=list)  # m/(1 − β^t) (owned; 0 if frozen)


@dataclasses.dataclass
class _EGNDecision:
    direction: list[Tensor]  # owned blocks of the direction taken
    gtd: float
    buffers: list[Tensor | None]
    use_momentum: bool = False
    momentum_rejected: bool = False
    momentum_restarted: bool = False  # no buffer on any rank: the count starts again at this step
    full: list[Tensor] = dataclasses.field(default_factory=list)  # the direction, every parameter
    w0: list[Tensor] = dataclasses.field(default_factory=list)  # the parameters before the step
    jd_qq: float = float("nan")
    alpha: float = float("nan")
    f_new: float = float("nan")  # L_b(w0 + αd)
    tries: int = 0


@dataclasses.dataclass
class _Pass:
    """What one step's hooks hand each other (lives inside :meth:`EGN.step` only)."""

    xs: tuple[Tensor, ...]
    targets: Tensor
    batch: _Batch | None = None
    curvature: _Curvature | None = None
    at_owners: list[list[Tensor]] = dataclasses.field(default_factory=list)  # [d (, g)] owned blocks
    f0: float = float("nan")
    trial_rejected: bool = False  # the loss after the step was non-finite
    error: Exception | None = None  # raised on this rank before the step; every rank raises with it
    late_error: Exception | None = None  # local work failed after the exchanges began (solve, Jᵀv, w0)
    # W > 1: why the step is skipped (the system could not be solved), decided with the ranks' late errors by
    # the template's all-reduce (an error on any rank wins: _prepare)
    unsolved: str | None = None
    use_chain: bool | None = None  # whether the step's forwards go through the planned chain (once known)
    rng: StepRng | None = None  # the random draw every forward of the step repeats (not for a planned chain)
    probed: bool = False  # this step's capture passed the factor probe (_factor_probe)
    undo: _Undo | None = None  # what the step changed before it was counted, to put back if it raises
    agreed: bool = False  # the step raises on every rank together (EGN._agreeing)
    rewind: bool = False  # the step raised before it was counted: the generators go back too (StepRng.finish)
    cg_failed: bool = False  # W > 1: this rank's conjugate gradients did not converge (EGN._reduce_record)
    groups_checked: bool = False  # step() found the param groups valid and nothing of the user's ran since
    # W > 1: the buffers of the step's exchanges, made before the agreement that precedes each (a failure to make
    # them rides its error flag): the factors' all-gather (send, out), the reduce-scatter's, the gather's
    gather: tuple[Tensor, Tensor] | None = None
    sums: HeldBuffers | None = None
    gathers: HeldBuffers | None = None


#: EGN's optimizer-wide values that a step changes before it is counted (_Undo)
_UNDONE = ("damping", "alpha", "momentum_steps", "momentum_rejections", "solve_fallbacks", "nonfinite_trials",
           "_cg_pause")


@dataclasses.dataclass
class _Undo:
    """What one step changes before the template counts it, as it was (:meth:`EGN._roll_back`): the line search
    moves every parameter long before ``_apply`` (its trial forwards are most of a step: a Ctrl+C lands there),
    the solve moves the conjugate-gradient pause, ``_apply`` the momentum buffers and scalars. Old objects
    only (``w0`` is the line search's own copy): nothing is copied for it."""

    counted: int  # num_steps + skipped_steps before the step: the step is done once they changed
    scalars: tuple[Any, ...]  # _UNDONE's values
    last: dict[str, float]
    w0: list[Tensor] = dataclasses.field(default_factory=list)  # the parameters before the first trial
    # (owned state, its momentum buffer before _apply or None) of every owned block
    buffers: list[tuple[dict[str, Any], Tensor | None]] = dataclasses.field(default_factory=list)



def _output_cast_advice(model: Any) -> str:
    """Where an output cast comes from, and what to do about it."""
    if type(model).__module__.startswith("lightning.fabric") and hasattr(model, "_forward_module"):  # _FabricModule
        return ("The model is Lightning Fabric's wrapper (fabric.setup_module), whose forward casts the outputs "
                "to float32 under its '-true' precisions: build EGN on the wrapped module, EGN(fabric_module."
                "module, ...), and hand it inputs in the parameters' dtype.")
    return "Remove the cast at the end of forward (e.g. logits.float()) or convert the model to the outputs' dtype."


#: What EGN's step plan (:mod:`~lightning_soaa.optim.egn_plan`) stands in for: the general step and the template's hooks
_PLANNED_HOOKS = ("_general_step", *TEMPLATE_HOOKS)


def _backward_failed(exc: Exception) -> str:
    """The refusal of a capture whose forward could not be differentiated (EGN differentiates each step's forward
    several times: back-signals, the factor probe)."""
    text = f"EGN: differentiating the model's forward failed: {type(exc).__name__}: {exc}."
    if isinstance(exc, AttributeError) and "_GeneratorContextManager" in str(exc):
        # torch's checkpoint(debug=True) re-enters one spent context manager at a second recomputation
        text += (" A torch.utils.checkpoint region with debug=True cannot be differentiated twice (torch raises "
                 "this at a second backward through it), and EGN differentiates each step's forward more than "
                 "once: call checkpoint without debug=True (keep it for a plain loss.backward() while debugging).")
    return text


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

    α₀ is the group's ``lr`` at the step (a scheduler's), also at the first step, which has no α_{t-1}.
    Without momentum g^\top d = -r^\top K v / b and Jd = Kv, so the line search and ρ need no extra
    parameter-space pass; with momentum g^\top d is an explicit dot product and Jd is read from the
    captured Gram factors and explicit rows (the adjoint of d = J^\top v; no forward-mode pass).

    **Calling it.** ``opt.step(inputs=x, targets=y)``: EGN runs the model itself. ``step(closure)``
    works when the closure returns ``(inputs, targets)``; a closure together with ``inputs=``/``targets=``
    or after :meth:`set_batch` is simply run first (e.g. Lightning's training-step closure, fed by the
    ``BatchToOptimizer`` callback) and its return value is returned. The gradients in ``p.grad`` are
    never read.

    **Mode.** The whole step (Jacobians, Gram factors, line-search and ρ forwards) runs with every
    submodule in eval mode — BatchNorm uses its running statistics and dropout is off — so the
    function whose Gauss-Newton model is built is deterministic and per-sample (random numbers the forward
    draws itself, e.g. ``F.dropout(h, p)`` or noise injection, are drawn once per step: every later forward
    of the step repeats the first one's draw, :mod:`~lightning_soaa.optim.egn_rng`); each submodule's own
    mode is restored afterwards and BatchNorm running statistics are not updated by ``step``. The model
    must be per-sample in eval mode (sample i's outputs depend on sample i alone: no statistics of the
    batch, no attention across it): the Gram factors and back-signals are per sample. The general capture
    checks it (one more cotangent in its batched backward,
    :func:`~lightning_soaa.optim.egn_capture.checked_back_signals`) and refuses a model that mixes samples
    on every rank; chains are per sample by construction. The explicit Jacobians of the other parameters
    are those of the model run on one sample; they are checked against the batch's forward (its outputs,
    and the same probe through its graph, :func:`~lightning_soaa.optim.egn_capture.checked_explicit_rows`).

    **Capture.** The back-signals of the Linear layers come from one batched backward pass in general; a
    model that is a chain of Linear layers and element-wise activations takes them by the chain rule
    without autograd: an ``nn.Sequential`` (or one ``nn.Linear``) planned once
    (:mod:`~lightning_soaa.optim.egn_chain`), any other model whose forward is verified to be such a chain
    at every step, e.g. ``head(body(x))`` in a ``LightningModule`` (:mod:`~lightning_soaa.optim.egn_trace`).
    Both give the general capture's factors bit for bit.

    **One process, plain MLP.** Where there is no rank to exchange with and the model is such a planned
    ``nn.Sequential`` (or one ``nn.Linear``) on the CPU, ``step(inputs=x, targets=y)`` takes the step plan
    (:mod:`~lightning_soaa.optim.egn_plan`): the same step, bit for bit, without the template's machinery below
    and with the small products' operands kept from step to step (the synthetic 20-32-32-2 MLP at b = 32: 116 ATen
    calls instead of 175, ~0.7x the CPU time). A closure, ``set_batch``, a hook, an autocast region, several ranks
    or any other model take the general path, as does a step the plan finds anything unusual in before it moves a
    parameter.

    **Across ranks (exact).** Every rank holds its own samples (local batch sizes may differ; b is the
    global sum). Per step, on every rank and in this order, through the base class's step template
    (:meth:`_exchange_in` → :meth:`_prepare` → the template's one all-reduce → :meth:`_decide` →
    :meth:`_apply` → :meth:`_exchange_out`):

    0. Only for a model with floating-point buffers (BatchNorm running statistics, which each DDP rank
       updates from its own samples): ``all_reduce_scalars`` of the buffer layouts, then ``all_reduce_`` of
       rank 0's buffer values (``_take_rank0_buffers``): every rank's eval-mode pass runs on rank 0's buffers.
    1. ``all_reduce_scalars`` (``_agree_on_batch``): validity flags, local batch sizes, layer layouts and
       the local loss sum, in a table of the step record's size with the optimizer's id where the record
       holds it (so does 0's first): a rank that steps another optimizer first meets it and both raise.
    2. ``all_gather_flat`` (``_gather_factors``) of one padded float64 buffer per rank (the factor table
       of :mod:`lightning_soaa.functional.gram`): outputs z, targets, each factored
       Linear's inputs A (an Embedding's indices) and back-signals Δ, and the explicit Jacobian rows of the
       other parameters
       (≈ b·(2c + Σ_ℓ T_ℓ(d_in + c·d_out) + c·n_rest) numbers in total). Every rank builds the same
       global r, Q and SᵀKS and solves the same bc×bc system (b(c−1) for cross-entropy; ``_solve``). A
       single process skips this gather (there is nothing to exchange) and uses its factors directly.
    3. ``reduce_scatter_flat`` (``exchange.sum_to_owners``): d = Jᵀv as the sum over ranks of each rank's
       J_rᵀv_r, read from its own captured factors with its slice of v (no backward pass; and g = −Jᵀr/b
       when momentum is on), delivered to the parameter owners. A float32 or bf16 model's J_rᵀv_r is formed
       and summed in the float64 solve's dtype, then rounded (the parts cancel across ranks at a small λ).
    4. ``all_reduce_scalars`` (the template's): non-finite flag and the owners' partial gᵀd.
    5. ``all_gather_flat`` (``exchange.gather_from_owners``, in ``_decide``) of the owners' final
       direction. Every rank then applies w ← w + αd to all
       parameters itself; this replaces the base class's parameter all-gather (same bytes) because the
       line search needs the full d on every rank anyway.
    6. One ``all_reduce_scalars`` per line-search trial (``_trial_loss``; exactly one without line
       search) and one for (Jd)ᵀQ(Jd) with momentum and adaptive damping (``_jd_q_norm``). The first
       trial's also carries rank 0's gᵀd and (Jd)ᵀQ(Jd), which the Armijo test and ρ read on every rank:
       each rank's own come from its own solve, whose last bits may differ on mixed hardware, and the
       number of trials, like every count of collectives, is decided from values equal on every rank.

    A rank whose local work between these collectives raises (out of memory, a model raising on its own
    samples) still joins the next one, with zeros and a failure flag (packing its factors: 2; the solve
    and Jᵀv: 3, its error then in the template's agreement rows, 4; the copy of the parameters, J·d and the
    trial forwards: 6): every rank raises together, with the parameters as before the step, also where the
    others found the system unsolvable (at W > 1 that skip is decided in 4, after 3 with nothing: an error
    wins). The exchanges' own buffers are made before the agreement that precedes each (2's in 1, 3's in 2, 5's
    before 4; :class:`~lightning_soaa.distributed.exchange.HeldBuffers`), so a failure to make them (out of
    memory) rides its error flag too; 2's is padded to the largest batch, known only after 1: where a rank's
    (its batch or the last step's largest) is short, one more all-reduce of failure flags follows 1.

    A non-finite value anywhere (outputs, loss, direction) or an unsolvable system skips the step on
    every rank through the base's skip path, leaving all state unchanged. **A step whose loss
    L_b(w + αd) is non-finite is never taken** (also without line search, which is why a trial loss is
    always evaluated): it is skipped and λ grows ×10 (up to ``damping_max``; counted in
    ``nonfinite_trials``), so a too-long step cannot leave the model with non-finite outputs.

    Args:
        model: the ``nn.Module``; its trainable parameters are optimized (one param group). Freezing
            follows ``requires_grad`` at every step: a parameter frozen later is not updated and the
            system is that of the still trainable ones; unfreezing one that was frozen when EGN was
            built is refused (build a new EGN). The parameters, and the submodules that hold them, are those
            of the model when EGN was built: replacing them later (``load_state_dict(sd, assign=True)``,
            ``fully_shard``, ``model.layer = ...``) is refused at the next step, before anything changes.
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
        solve_dtype: ``"float64"`` (default) or ``"model"``. With float64, systems of size (bc, b(c−1) for
            cross-entropy) ≥ ``CG_MIN_SIZE`` (512) are first solved by matrix-free conjugate gradients on the
            Gram factors, to a guaranteed relative error ≤ 1e-13 (statistic ``solve_cg_iterations``); where
            that does not converge within a budget (small λ), and for sizes ≥ ``MIXED_MIN_SIZE`` (384), the
            system is assembled and Cholesky-factored in float32 and refined with exact float64 mat-vecs to
            float64 accuracy (re-solved in float64 when the refinement cannot get there). With MSE and one
            trained Linear whose output is the model's (linear regression, a linear probe on a frozen
            network), K = G ⊗ I_c and the system is c right-hand sides of one b×b Cholesky factor instead.
        max_solve_retries: Cholesky retries with 10·λ (default 6).
        max_gram_size: largest bc allowed (default 4096); larger batches raise ``ValueError``. For a
            linear model under MSE (the Kronecker solve below) the largest b.
        jacobian: ``"auto"`` (Linear factors + explicit rest) or ``"explicit"`` (default ``"auto"``).
        factor_embeddings: Gram factors from the indices of plain ``nn.Embedding`` tables looked up per
            sample (default False: explicit rows, a V·d-column row per sample and output; see EGNConfig).
        process_group, comm, shard, replica_check_every: see :class:`ShardedOptimizer`.

    References:
        Korbit, Adeoye, Bemporad, Zanon, *Exact Gauss-Newton Optimization for Training Deep Neural
        Networks*, arXiv 2405.14402 — direction, line search, momentum [P TL;DR; C somax egn.py].
        INFERRED (spec §2): the SPD form of the solve, the Gram-factor K for Linear layers, the exact
        cross-rank assembly, the gᵀd/Jd identities, eval mode for the curvature pass, ρ = 0 when the
        model predicts no decrease, keeping the momentum buffer updated when its direction is rejected.
        Adaptive damping follows the paper-era rule (commented out in the authors' code) [C].
    """

    step_record = _EGNRecord
    #: the torch.compile wrapper's hook dicts (their hooks may not pickle; a copy's model is not wrapped), and the
    #: step plan (views of this process's parameters and buffers: a copy plans its own at its first step)
    _transient = ("_wrapper_hooks", "_plan_cache")
    _steps_gradients = False  # its directions come from the batch, never from p.grad
    _hyper_what = "param_groups, e.g. lr, or opt.damping"
    #: EGN never reads ``p.grad`` (Lightning may leave stale or non-finite ones): the base must not scan
    #: them; ``_prepare`` flags a non-finite direction itself.
    partials_cover_grads = True
    #: FSDP2 refused: EGN's forwards run the module itself and its Gram factors are built from whole
    #: layer weights; over sharded parameters that needs FSDP's unshard hooks inside EGN's passes.
    supports_dtensor = False
    #: ``shard=False``: replicated state, every rank steps every block of its own copy (no block is sent), so
    #: copies that differ (one rank's ``p.data`` write, another seed per rank) stayed apart silently
    unsharded_replicas = True

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """torch.amp.GradScaler's flag (the base's): at W > 1 the scaler calls ``step()`` on every rank and an
        overflow on any rank skips it on every rank. EGN differentiates the bare module (no DDP averages the
        gradients of a scaled backward), so each rank's scaler decided from its own: one rank skipped the step
        and the others' collectives paired with its next one (the batches of two iterations solved together, or
        a hang where the counts differed). One process: the scaler's own flow (it skips without a call)."""
        return self._world_at_step() > 1

    def _check_before_exchange(self, unscaled: list[Tensor]) -> None:
        """The base's checks and the scaler's contract; then, under the contract, a scaler handed no gradient to
        check: EGN needs no backward, and without one torch's scaler raised 'No inf checks were recorded prior to
        update' at ``scaler.update()``, after the step (in one process it raises before it, in ``scaler.step``)."""
        super()._check_before_exchange(unscaled)
        if "found_inf" in self.__dict__ and not any(p.grad is not None for p in self._params):
            raise ValueError(
                "EGN: torch.amp.GradScaler.step(opt) on a rank whose parameters hold no gradient: the scaler "
                "checks the gradients of a scaled backward for infs, and EGN builds its step from the batch "
                "without one. Call opt.step(inputs=x, targets=y) without the scaler (EGN runs its own forwards "
                "in full precision), or run scaler.scale(loss).backward() before scaler.step(opt, ...).")

    def _replicas_why(self, shards: bool = False) -> str:
        """Every rank applies the gathered direction to its own copy (no block is sent), its Jacobians taken at
        that copy: replicas built from another seed per rank trained on, 1.36 apart after 3 steps. (``shards``:
        never, EGN refuses DTensors.)"""
        return ("every rank applies the same step to its own copy, so different replicas would silently stay "
                "apart, each with Jacobians taken at other weights")

    def _check_step(self, warn: bool) -> None:
        """Nothing: :meth:`step` checked the parameters (their memory too: :meth:`_check_ties`) already,
        inside its held-error block (the base's check again would cost a second pass over them, and its
        rebuild of a table for parameters converted before the first step would make EGN take, at its
        next step, what it just refused).
        EGN reads no ``.grad``, so there are no gradients to miss either."""

    def _hyperparameter_error(self) -> ValueError | None:
        """The base's check, once per step: :meth:`step` checked the groups before the template's own call
        (the same groups, when no closure ran in between: ``_Pass.groups_checked``)."""
        ps = self.__dict__.get("_pass")
        if ps is not None and ps.groups_checked:
            return None
        return super()._hyperparameter_error()

    def _dtensor_refusal(self) -> Exception:
        from lightning_soaa import registry  # (here: the registry loads the optimizer classes, this one's too)

        return ValueError(
            "EGN does not support DTensor (FSDP2 fully_shard / ModelParallelStrategy) parameters. EGN "
            "shards its own state over ranks: run it on a model that is not fully_shard'ed (plain "
            "torchrun, DDP, or Lightning's DDPStrategy); under FSDP2 use one of "
            f"{', '.join(registry.dtensor_class_names())}."
        )

    #: its parameter check refuses a conversion after construction even before the first step (its
    #: captured places and chain plan are made for the parameters it was built over)
    rebuilds_before_first_step = False
    batch_statistic = "the Gauss-Newton system (the Gram matrix of the batch, the line search's losses)"

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
        factor_embeddings: bool = False,
        process_group: Any = None,
        comm: Any = None,
        shard: bool = True,
        replica_check_every: int = REPLICA_CHECK_EVERY,
    ) -> None:
        model, wrapper_hooks = _the_module(model)
        cfg = EGNConfig(
            loss=loss, lr=lr, damping=damping, momentum=momentum, line_search=line_search,
            adaptive_damping=adaptive_damping, armijo_c=armijo_c, ls_decrease=ls_decrease,
            ls_increase=ls_increase, max_ls=max_ls, ls_reset=ls_reset, rho_low=rho_low, rho_high=rho_high,
            damping_increase=damping_increase, damping_decrease=damping_decrease, damping_min=damping_min,
            damping_max=damping_max, solve_dtype=solve_dtype, max_solve_retries=max_solve_retries,
            max_gram_size=max_gram_size, jacobian=jacobian, factor_embeddings=factor_embeddings,
        )
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("EGN: the model has no trainable parameters (none with requires_grad=True).")
        _refuse_scripted(model)
        _refuse_embedding_options(model)
        _check_one_dtype(named)
        _check_solve_dtype(cfg.solve_dtype, named)
        self.config = cfg
        self.model = model
        # weight_decay: every torch optimizer's groups carry it, and tools read it (Lightning's
        # LearningRateMonitor(log_weight_decay=True) raised KeyError); EGN has none: it must stay 0.0
        super().__init__(named, dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0),
                         process_group=process_group, comm=comm, shard=shard, grad_reduction="none",
                         replica_check_every=replica_check_every)
        self._named = named  # EGN's parameters (the base's, in its order); fixed at construction
        self._index = {n: i for i, (n, _) in enumerate(named)}
        self._param_devices: set[torch.device] | None = None  # see _devices
        # the parameters frozen when EGN was built: EGN has no shard or state for them (_follow_freezing)
        self._frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
        if has_dtensor([p for _, p in self._frozen]):  # (the trained ones: refused by the base)
            raise self._dtensor_refusal()
        # where each of the module's parameters sits: checked at every step (_check_places)
        self._places = ParamPlaces(model)
        self._wrapper_hooks = wrapper_hooks
        #: requires_grad of each of EGN's parameters as last planned: the trained ones are those still
        #: trainable (_follow_freezing); ``_trainable`` and the plan below are made from them
        self._active = (True,) * len(named)
        self._trainable: dict[str, Tensor] = dict(named)
        self._pending_batch: tuple[Any, Tensor] | None = None  # from set_batch(), used by the next step
        self._pending_plain = False  # the pending batch came from a set_batch without replace=True
        self._pass: _Pass | None = None  # the step in progress
        self._draws = DrawHistory()  # what its forwards showed of torch's generators (egn_rng)
        self._plan()
        self._start_run_state(cfg)

    def _start_run_state(self, cfg: EGNConfig) -> None:
        """The optimizer-wide state of a run that has not stepped (what the checkpoint's global state holds)."""
        self.damping = float(cfg.damping)
        # α of the previous step, which the line search resets from; 0: none yet, so the first search starts
        # from the group's lr at that step. It was the constructor's lr, which capped the first α at 1.5x it
        # when a scheduler or the user had raised the group's lr before the first step (OneCycleLR, LambdaLR).
        self.alpha = 0.0
        self.momentum_steps = 0
        self.solve_fallbacks = 0
        self.momentum_rejections = 0
        self.nonfinite_trials = 0  # steps skipped because the loss after them was non-finite
        self._cg_pause = 0  # solves left before conjugate gradients are tried again (after a failure)
        self._last: dict[str, float] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key in ("damping", "alpha"):  # pickles of versions that kept them as plain attributes
            if key in state:
                state[f"_{key}"] = state.pop(key)
        state.setdefault("_draws", DrawHistory())  # (pickles of versions without it)
        super().__setstate__(state)

    @property
    def damping(self) -> float:
        """λ of the next step (adapted by the step's rules; set it between steps, on every rank alike: it is
        compared across ranks like ``lr``). Through Lightning's ``self.optimizers()`` too: the wrapper's copy
        of the attributes was set and the step read the optimizer's (silently)."""
        return float(self._receiver().__dict__["_damping"])

    @damping.setter
    def damping(self, value: float) -> None:
        self._receiver().__dict__["_damping"] = _checked_global("damping", value, positive=True)

    @property
    def alpha(self) -> float:
        """The step size α of the previous step (the line search starts from it); 0.0 before the first step
        (none yet: the first search starts from the group's ``lr``) and after a step at ``lr`` 0."""
        return float(self._receiver().__dict__["_alpha"])

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._receiver().__dict__["_alpha"] = _checked_global("alpha", value, positive=False)

    def _plan(self) -> None:
        """How the curvature of the parameters in ``_trainable`` is captured (as an EGN built on the model
        with exactly those trainable would plan it)."""
        model, cfg = self.model, self.config
        self._sites, self._explicit = plan_curvature(model, self._trainable, cfg.jacobian,
                                                         cfg.factor_embeddings)
        # the general capture's factors are checked against autograd once per plan (_factor_probe)
        self._probe_due = True
        # per site its trained (weight, bias) tensors, read once: Module.__getattr__ costs per lookup
        self._site_params = [site_params(s) for s in self._sites]
        # and their positions among EGN's parameters (positions, not ids: they survive copies and pickles)
        index_of = {id(p): i for i, (_, p) in enumerate(self._named)}
        self._site_index = [(None if w is None else index_of[id(w)], None if b is None else index_of[id(b)])
                            for w, b in self._site_params]
        # a plain MLP (Sequential of Linear and activations): its capture needs no autograd (egn_chain)
        self._chain = plan_chain(model, self._sites, self._explicit)
        # any other model whose forward may be such a chain: checked at every step (egn_trace)
        self._trace = plan_trace(model, self._sites, self._explicit) if self._chain is None else None
        # one trained Linear that outputs z, under MSE: K = G ⊗ I_c whenever T = 1 (either capture), so the
        # solve is b×b (kronecker_sample_gram) and max_gram_size bounds b rather than bc
        self._kronecker = (cfg.loss == "mse" and self._chain is not None and self._chain.num_sites == 1
                           and self._chain.site_of[-1] == 0)
        self.__dict__.pop("_plan_cache", None)  # (the step plan follows the capture plan: _step_plan)

    def _step_plan(self) -> StepPlan | None:
        """The step plan of a single process training a plain MLP (:mod:`~lightning_soaa.optim.egn_plan`), or
        None where the steps are not plannable; decided once per capture plan, communicator and block table (a
        freezing change, a joined process group or a rebuilt table decide again)."""
        cached = self.__dict__.get("_plan_cache")
        if cached is None or cached[0] is not self.comm or cached[1] is not self._table:
            from lightning_soaa.optim.egn_plan import StepPlan  # (it imports this module)

            cached = self._plan_cache = (self.comm, self._table, StepPlan.build(self))
        plan: StepPlan | None = cached[2]
        return plan

    def _follow_freezing(self) -> None:
        """Follow ``requires_grad`` as torch's optimizers do (a parameter without a gradient is not
        stepped): a parameter frozen since the last step gets no update, and the Gauss-Newton system is
        that of the still trainable ones (re-planned, as an EGN built on the model as it stands would be);
        one unfrozen again is trained again. A parameter frozen when EGN was built has no shard, owner or
        state here: unfreezing it is refused before anything changes (on every rank, by the caller)."""
        for name, p in self._frozen:
            if p.requires_grad:
                raise ValueError(
                    f"EGN: the parameter {name!r} was frozen (requires_grad=False) when this EGN was built and "
                    "has been unfrozen since; EGN's parameters are fixed at construction and it cannot start "
                    "training another one. Build a new EGN for the model after unfreezing it (or keep it frozen).")
        active = tuple(p.requires_grad for _, p in self._named)
        if active == self._active:
            return
        if not any(active):
            raise ValueError("EGN: every parameter has been frozen (requires_grad=False); there is nothing to "
                             "train. Unfreeze some of them before calling step().")
        self._active = active
        self._trainable = {n: p for (n, p), on in zip(self._named, active) if on}
        self._plan()

    def _check_places(self) -> None:
        """Raise ``RuntimeError`` naming the first of the module's parameters (trained or frozen) that is
        no longer the tensor EGN was built with (:mod:`~lightning_soaa.optim.egn_places`): the forward would
        use the new one while EGN stepped the old one, and the capture plan, the chain and the guard are
        keyed to the old ones. Called inside :meth:`step`'s held-error block: every rank raises together,
        before anything changes."""
        bad = self._places.first_replaced()
        if bad is not None:
            raise RuntimeError(replaced_message(*bad, dtensor_refusal=str(self._dtensor_refusal())))
        path = changed_site(self._sites)
        if path is not None:
            embedding = any(s.vocab for s in self._sites if s.path == path)
            kind, formula = ("Embedding", "E[idx]") if embedding else ("Linear", "x Wᵀ + b")
            raise RuntimeError(
                f"EGN: the nn.{kind} {path!r} no longer computes {formula} with nn.{kind}'s own forward (its forward "
                "was replaced on the instance, its class changed, a parametrization was added, or an embedding's "
                "max_norm, scale_grad_by_freq or sparse was set) since EGN was "
                "built, and EGN takes that layer's Jacobian from the plain formula: its step would be wrong. Build "
                "EGN after changing the model (e.g. after accelerate's hooks or a wrapper), or pass "
                "jacobian='explicit'.")

    # ------------------------------------------------------------------ groups and checkpoints
    def _validate_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("momentum", group["momentum"], 0.0, 1.0, hi_inclusive=False)
        try:
            check_range("weight_decay", group.get("weight_decay", 0.0), 0.0, 0.0)
        except ValueError as e:
            raise ValueError(f"{e} EGN has no weight decay (add an L2 term to the loss to regularise).") from None
        if group.get("max_grad_norm") is not None:  # the other optimizers' option: EGN never reads p.grad
            raise ValueError(f"Invalid max_grad_norm={group['max_grad_norm']!r} in EGN's param group. EGN builds its "
                             "step from the model and the batch, never from the gradients, so there is nothing to "
                             "clip: bound its step with lr, damping or line_search=True.")
        # EGN reads only lr and momentum from its group (a scheduler's keys); an option of its constructor
        # written there was ignored without a word (a callback annealing damping that way did nothing)
        ignored = sorted(k for k in group if k in _CONSTRUCTOR_ONLY)
        if ignored:
            raise ValueError(
                f"Invalid {ignored[0]}={group[ignored[0]]!r} in EGN's param group: EGN reads only lr, momentum (and "
                f"weight_decay=0.0) from it; {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} fixed at "
                "construction" + ("; the damping λ in use is the attribute opt.damping (set it there between steps)."
                                  if "damping" in ignored else "."))

    def _global_hyperparameters(self) -> dict[str, float]:
        return {"damping": self.damping, "alpha": self.alpha}

    def _hyper_digest(self) -> int:
        # λ and the line search's α are optimizer-wide and set by hand too (README: opt.damping from a
        # callback): a value set on some ranks only must be refused like a param group's
        own = self._global_hyperparameters()
        cached = self.__dict__.get("_global_digest")
        if cached is None or cached[0] != own:
            cached = (own, agreement.hyperparameter_digest([own]))
            self._global_digest = cached
        return super()._hyper_digest() ^ cached[1]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:
            # Lightning's BaseFinetuning/BackboneFinetuning reach this epochs into a fit when they unfreeze a
            # backbone: say what works there (EGN follows requires_grad over the parameters it was built with)
            error = ValueError(ADD_PARAM_GROUP_MESSAGE)
            if self._table is not None and self.comm.world_size > 1:
                # collective as the other optimizers' is: called on some ranks only, this rank raised alone while
                # its peers waited in their step's first all-reduce (a hang); met here, every rank raises (this
                # one its own refusal, which says what to do, with the meeting's verdict as its cause)
                try:
                    self._agree_on_added_group(error, extend=False)
                except RuntimeError as met:
                    raise error from met
            raise error
        super().add_param_group(param_group)

    def _global_state(self) -> dict[str, Any]:
        return {"damping": self.damping, "alpha": self.alpha, "momentum_steps": self.momentum_steps,
                "solve_fallbacks": self.solve_fallbacks, "momentum_rejections": self.momentum_rejections,
                "nonfinite_trials": self.nonfinite_trials,
                # saved so a resumed run takes the same solve path (CG or direct) as an uninterrupted one
                "cg_pause": self._cg_pause,
                # the constructor's λ: a load can tell a damping= changed since the save (see _load_global_state)
                "initial_damping": float(self.config.damping)}

    def _state_schema(self, block: BlockInfo, param: Tensor, group: dict[str, Any]) -> dict[str, StateField]:
        # the momentum EMA of directions exists only with momentum > 0
        return {"momentum_buffer": StateField(tuple(block.shape), param.dtype, required=False)}

    def _validate_global_state(self, state: dict[str, Any]) -> None:
        where = "EGN.load_state_dict: lightning_soaa.global"
        if "damping" in state:
            check_finite_number(f"{where}.damping", state["damping"], positive=True)
        if "alpha" in state:  # 0 before the first step, or after a step at lr = 0 (a warm-up from 0)
            check_finite_number(f"{where}.alpha", state["alpha"], nonnegative=True)
        if "initial_damping" in state:
            check_finite_number(f"{where}.initial_damping", state["initial_damping"], positive=True)
        for key in ("momentum_steps", "solve_fallbacks", "momentum_rejections", "nonfinite_trials", "cg_pause"):
            if key in state:
                check_finite_number(f"{where}.{key}", state[key], integer=True, nonnegative=True)

    def _load_global_state(self, state: dict[str, Any]) -> None:
        self.damping = float(state.get("damping", self.config.damping))
        saved_initial = state.get("initial_damping")
        if saved_initial is not None and float(saved_initial) != float(self.config.damping):
            # λ is state (adaptive damping and non-finite trials move it), so a resume continues from the saved
            # λ, as torch keeps a saved group's lr; a damping= changed since the save did nothing without a word
            log.warning("EGN.load_state_dict: this EGN was built with damping=%g, the state was saved by one built "
                        "with damping=%g; the resumed run continues from the saved λ=%g (damping= is the initial λ "
                        "of a fresh run). To start from another λ, set opt.damping after the load (on every rank).",
                        float(self.config.damping), float(saved_initial), self.damping)
        self.alpha = float(state.get("alpha", 0.0))  # absent: none yet, as in a fresh run (_start_run_state)
        self.momentum_steps = int(state.get("momentum_steps", 0))
        self.solve_fallbacks = int(state.get("solve_fallbacks", 0))
        self.momentum_rejections = int(state.get("momentum_rejections", 0))
        self.nonfinite_trials = int(state.get("nonfinite_trials", 0))
        self._cg_pause = int(state.get("cg_pause", 0))

    def _extra_statistics(self) -> dict[str, float]:
        out = {"damping": self.damping, "alpha": self.alpha, "solve_fallbacks": float(self.solve_fallbacks),
               "momentum_rejections": float(self.momentum_rejections),
               "nonfinite_trials": float(self.nonfinite_trials)}
        out.update(self._last)
        return out

    # ------------------------------------------------------------------ the step
    def set_batch(self, inputs: Any, targets: Tensor, *, replace: bool = False) -> None:
        """Store the mini-batch for the next :meth:`step` when the caller cannot pass it there
        (Lightning's automatic optimization via ``BatchToOptimizer``, the DeepSpeed engine).

        The last call before a step wins: under manual gradient accumulation hand over the step's
        micro-batches concatenated along the samples once (``lightning_soaa.optim.egn_batches.concat_batches``),
        or pass them to ``step(inputs=..., targets=...)`` (DeepSpeed's client, by contrast, collects one
        ``set_batch`` per micro-batch). A second call before a step logs that warning once per optimizer
        (stepping on the last of 2 micro-batches was 0.26 off the step on both); ``replace=True`` says the
        call replaces the earlier batch on purpose (``BatchToOptimizer`` hands over the growing concatenation
        after every micro-batch)."""
        receiver = self._receiver()
        if receiver is not self and isinstance(receiver, EGN):  # called through Lightning's LightningOptimizer
            receiver.set_batch(inputs, targets, replace=replace)
            return
        if self._pending_plain and not replace:  # two calls of the user's own (a callback's running value replaces)
            self._warn_repeated_handover("set_batch", "hand over the step's micro-batches concatenated once "
                                         "(lightning_soaa.optim.egn_batches.concat_batches)")
        self._pending_batch, self._pending_plain = (inputs, targets), not replace

    @hooked_step  # torch's step hooks and profiler label, without the label's cost where no profiler records
    @torch._disable_dynamo  # eager under torch.compile (see ShardedOptimizer.step)
    @full_precision  # inside an autocast region too (optim/step_context.py)
    def step(self, closure: Callable[[], Any] | None = None, *, inputs: Any = None,
             targets: Tensor | None = None) -> Any:
        """One EGN step on the batch ``(inputs, targets)``; collective when W > 1.

        Returns the closure's value when a closure was given, else the global mean loss L_b(w) before
        the step (a 0-d tensor). Under ``torch.inference_mode()`` the step runs with it disabled
        (:func:`~lightning_soaa.optim.step_context.full_precision`): the capture differentiates the model.
        """
        # one process training a plain MLP on step(inputs=x, targets=y): the step plan (egn_plan.py), the same
        # bits without the template's machinery; it declines (nothing changed) whatever it does not cover
        # (not with a Lightning clip kept for it: the template's check refuses it)
        if closure is None and inputs is not None and self._pending_batch is None and "_kept_clips" not in vars(self):
            self.__dict__["_plan_call"] = (inputs, targets)
            try:
                if self._planned_step():
                    return self.__dict__.pop("_plan_result")
            finally:
                self.__dict__.pop("_plan_call", None)
        return self._general_step(closure, inputs=inputs, targets=targets)

    def _planned_step(self) -> bool:
        """The base's shortcut past the step template (:meth:`ShardedOptimizer._planned_step`): EGN's is the step
        plan (:mod:`~lightning_soaa.optim.egn_plan`) of the ``step(inputs=x, targets=y)`` in progress, asked by
        :meth:`step` before anything else (its result kept for it); False where it declines, and inside the
        template (no call in progress: EGN's shortcut has been asked already)."""
        call: tuple[Any, Any] | None = self.__dict__.get("_plan_call")
        # (a subclass overriding a hook the plan stands in for takes the template, where its override runs)
        plan = None if call is None or overrides_any(self, EGN, _PLANNED_HOOKS) else self._step_plan()
        if call is None or plan is None:
            return False
        out = plan.step(self, *call)
        if out is None:
            return False
        self.__dict__["_plan_result"] = out
        return True

    @one_model_function  # the same function of the model with and without a graph (step_context.py)
    def _general_step(self, closure: Callable[[], Any] | None = None, *, inputs: Any = None,
                      targets: Tensor | None = None) -> Any:
        """:meth:`step` through the base's template (every world size, model, capture and closure)."""
        pending, self._pending_batch, self._pending_plain = self._pending_batch, None, False  # one step's
        walked = self.__dict__.pop("_walked_modules", None)  # the model's modules, as one_model_function saw them
        self._join_before_step()  # built before the process group existed: join it now (collective)
        closure_value = None
        xs: tuple[Tensor, ...] = ()
        error: Exception | None = None
        try:  # an error on one rank is reported through the first all-reduce and raised on every rank
            self._check_before_closure(closure)
            outputs = _ModelOutputs(self.model)  # what the model returns in the closure (_check_closure_batch)
            # watched only when the closure's value may be the batch (not under set_batch, Lightning's way)
            watch = outputs if inputs is None and targets is None and pending is None else contextlib.nullcontext()
            if closure is not None:
                with torch.enable_grad(), caller_autocast(self), watch:
                    closure_value = closure()
                # a clip made in the closure (a manual opt.step(closure) that clips, on_before_optimizer_step): this
                # step's, refused before it changes anything (at the next step, this one had gone on unclipped)
                unread = unread_clip_error(self)
                if unread is not None:
                    raise unread
            if inputs is None and targets is None:
                if pending is not None:  # set_batch() wins; a closure then only supplies the returned loss
                    inputs, targets = pending
                elif isinstance(closure_value, (tuple, list)) and len(closure_value) == 2:
                    inputs, targets = closure_value
                    closure_value = None
                    _check_closure_batch(inputs, targets, {id(p) for p in self._params}, outputs.nodes)
            if inputs is None or targets is None:
                raise ValueError(MISSING_BATCH_MESSAGE)
            xs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
            if not xs or not all(isinstance(x, Tensor) for x in xs) or not isinstance(targets, Tensor):
                raise ValueError("EGN.step: inputs must be a tensor or a tuple of tensors, targets a tensor.")
            self._follow_freezing()  # after the closure: it may freeze or unfreeze layers itself
        except Exception as e:  # noqa: BLE001 - raised on every rank after the first all-reduce
            if self.comm.world_size == 1:
                raise
            error = e
        # one walk for the three settings (one_model_function's, unless a closure ran since: it may add modules)
        modes, modules = self._eval_mode(walked if walked is not None and closure is None
                                         else list(self.model.modules()))
        nested = _no_nested_tensors(modules)
        compiled = _bypass_compiled(modules)
        self._pass = _Pass(xs, targets)  # type: ignore[arg-type]  # targets is None only with an error
        # (a closure may have written into the groups since: the template then checks them again)
        self._pass.groups_checked = error is None and closure is None
        try:
            self._pass.error = error  # raised before the step on this rank: reported by _agree_on_batch
            self._sharded_step()  # the base's template, through the hooks below
            f0 = self._pass.f0
        except BaseException as e:  # KeyboardInterrupt too: most of a step is its forwards
            self._abandon(e)
            raise
        finally:
            if self._pass.rng is not None:  # the generators as if the model had been run once (or not at all)
                self._pass.rng.finish(rewind=self._pass.rewind)
            self._pass = None
            for m, mode in modes:
                # the attribute itself (what Module.__setattr__ ends in for it), without that method's
                # parameter/buffer/module look-ups: this runs for every module at every step
                object.__setattr__(m, "training", mode)
            for enc, use in nested:
                enc.use_nested_tensor = use
            for m, impl in compiled:
                object.__setattr__(m, "_compiled_call_impl", impl)
        if closure_value is not None:
            return closure_value
        return torch.scalar_tensor(f0, dtype=torch.float64)  # (torch.tensor's parsing of a float: 2x slower)

    def _check_before_closure(self, closure: Any) -> None:
        """What :meth:`step` checks before the closure runs the model (raised on every rank at W > 1)."""
        # meta or changed parameters (.grad is unused), before the closure runs the model on them
        check_step(self, self._params, self._names, gradients=False, built=self.__dict__.get("_built"))
        # before the passes, which read the groups (a key removed from one was a KeyError on that rank)
        hyper = self._hyperparameter_error()
        if hyper is not None:
            raise hyper
        unread = unread_clip_error(self)  # a manual training_step's self.clip_gradients(opt, ...)
        if unread is not None:
            raise unread
        self._check_places()  # the module still holds EGN's parameters (not replaced since)
        # no two of them over one memory since (p.data = other.data.t()): its Gauss-Newton system takes
        # them as independent coordinates, at any W (one data_ptr() per parameter while none moved)
        self._check_ties()
        # (not kept by a copy or pickle, whose model is a copy of the inner module, not the wrapper's)
        _refuse_wrapper_hooks(self.__dict__.get("_wrapper_hooks", []))
        _refuse_parametrize_cache()
        if closure is not None and not callable(closure):  # EGN.step((x, y)): say what it takes
            raise TypeError(f"EGN.step: its argument is a closure (a callable), got {type(closure).__name__}; "
                            "pass the batch by keyword: step(inputs=x, targets=y), or set_batch(x, y).")

    def _eval_mode(self, modules: list[nn.Module]) -> tuple[list[tuple[nn.Module, bool]], list[nn.Module]]:
        """Put every submodule (``modules``: the model's) in eval mode; returns their modes to restore and the
        model's modules after the switch (walked again only after the model's own ``eval()``). Where
        no module's class extends ``eval``, ``train`` or ``__setattr__`` (a planned chain's exact torch types,
        or a plain model such as a traced MLP) only the flag is set: what ``Module.train`` ends in for each
        module, without its recursion and attribute look-ups (~15 of ~3700 us of the digits MLP's step); any
        other model is put in eval mode by its own ``eval()``, which a submodule may extend."""
        modes = [(m, m.training) for m in modules]
        if self._chain is None and not _plain_modes(modules):
            self.model.eval()
            return modes, list(self.model.modules())
        for m, _ in modes:
            object.__setattr__(m, "training", False)
        return modes, modules

    def _sum_scalars(self, values: list[float]) -> list[float]:
        """``comm.all_reduce_scalars`` of host floats, read back as host floats; a single process
        (``LocalComm``) has nothing to reduce and no tensor is made (the values are the same floats)."""
        if isinstance(self.comm, LocalComm):
            return [float(v) for v in values]
        out: list[float] = self.comm.all_reduce_scalars(torch.tensor(values, dtype=torch.float64)).tolist()
        return out

    def _sum_together(self, local: Callable[[], list[float]], n: int, where: str) -> list[float]:
        """:meth:`_sum_scalars` of ``local()``'s ``n`` floats, with one failure flag per rank in the same
        all-reduce: a rank whose local work raises (a forward out of memory, a model raising on its own
        samples) still joins, with zeros, and every rank raises together instead of the others waiting
        in the step's next collective. A single process raises at once."""
        if isinstance(self.comm, LocalComm):
            return self._sum_scalars(local())
        world, rank = self.comm.world_size, self.comm.rank
        error = self._pass.late_error if self._pass is not None else None  # an earlier local failure
        values = [0.0] * n
        if error is None:
            try:
                values = local()
            except Exception as e:
                error = e
        flags = [0.0] * world
        flags[rank] = agreement.error_flag(error)
        red = self._sum_scalars([*values, *flags])
        self._raise_failed(red[n:], error, where)
        return red[:n]

    def _raise_failed(self, flags: list[float], error: Exception | None, where: str) -> None:
        """Raise on every rank when some rank failed (``flags``: every rank's :func:`agreement.error_flag`): its own
        error there, a pointer to it elsewhere (an out of memory where every failed rank's was one)."""
        failed = [r for r, f in enumerate(flags) if f > 0]
        if not failed:
            return
        with self._agreeing():
            self._raise_agreed(flags, error, where)

    @contextlib.contextmanager
    def _agreeing(self) -> Any:
        """An Exception raised inside is decided from values every rank reduced: every rank raises with it, none
        is left in the step's collectives (:meth:`_abandon` does not flag it). Any other error of a W > 1 step is
        taken as this rank's alone."""
        try:
            yield
        except Exception:
            if self._pass is not None:
                self._pass.agreed = True
            raise

    def _raise_disagreement(self, verdict: agreement.StepVerdict, error: BaseException | None) -> None:
        with self._agreeing():  # the template's step record: a rank's error reported through its all-reduce
            super()._raise_disagreement(verdict, error)

    # -- template hooks ---------------------------------------------------------------------
    def _exchange_in(self, error: BaseException | None = None) -> str | None:
        """Before the template's all-reduce: agree on the batch, gather the Gram factors, solve the
        bc×bc system (identically on every rank), and sum each rank's Jᵀv into the owners. ``error``: the
        template's held error (its checks), raised like the pass's own through the batch agreement, on every
        rank, before a non-finite batch or a failed solve could skip the step and drop it."""
        ps = self._current()
        if isinstance(error, Exception) and ps.error is None:  # (only Exceptions are held)
            ps.error = error
        # the values the step changes before it is counted, as they were (the solve moves _cg_pause)
        ps.undo = _Undo(self.num_steps + self.skipped_steps, tuple(getattr(self, k) for k in _UNDONE), self._last)
        with self._autograd_free(ps.xs):
            return self._curvature_pass(ps)

    def _autograd_free(self, xs: tuple[Tensor, ...]) -> contextlib.AbstractContextManager[Any]:
        """``torch.inference_mode`` around a chain model's passes (its capture needs no autograd): each
        ATen op then skips autograd's and the version counters' bookkeeping (synthetic MLP at b=32: ~0.19
        of 1.5 ms a step). Only temporaries of the step are made there; what outlives the step (momentum
        buffers, the parameters' values) is computed outside it or written into normal tensors. Other
        models keep autograd (their capture differentiates)."""
        if self._use_chain(xs):
            return torch.inference_mode()
        return contextlib.nullcontext()

    def _use_chain(self, xs: tuple[Tensor, ...]) -> bool:
        """Whether the forwards of ``xs`` go through the planned chain (:meth:`Chain.usable`), decided once
        per step for the step's own inputs (a step asks 4 times; nothing it checks changes within a step)."""
        ps = self._pass
        if ps is not None and xs is ps.xs and ps.use_chain is not None:
            return ps.use_chain
        ok = self._chain is not None and self._chain.usable(xs)
        if ps is not None and xs is ps.xs:
            ps.use_chain = ok
        return ok

    def _curvature_pass(self, ps: _Pass) -> str | None:
        """:meth:`_exchange_in`'s work: the batch, its Gram factors, the solve and Jᵀv at the owners."""
        if self.comm.world_size > 1:
            self._take_rank0_buffers()  # collectives (floating buffers only): all_reduce_scalars, all_reduce
        batch = ps.batch = self._agree_on_batch(ps.xs, ps.targets)  # collective: all_reduce_scalars
        if ps.probed:  # (every rank's capture passed it: the agreement raises otherwise)
            self._probe_due = False
        if batch.nonfinite:
            return "non-finite model outputs or loss"
        ps.f0 = batch.f0
        layout, pieces = self._gather_factors(batch)  # collective: all_gather_flat (W > 1)
        # the solve and Jᵀv differentiate nothing, whatever the model: no autograd bookkeeping per op
        with torch.inference_mode():
            channels = self._solved_vjps(ps, batch, layout, pieces)
            if isinstance(channels, str):
                return channels
            # a wide Jᵀv is summed over ranks in its dtype and rounded after (_vjps)
            self._sum_to_owners(ps, channels, self._wide_dtype(batch))  # collective: reduce_scatter
        return None

    def _sum_to_owners(self, ps: _Pass, channels: list[list[Tensor | None]], wide: torch.dtype | None) -> None:
        """Jᵀv (and g) to the owners, at W > 1 into the buffers made before the factors' all-gather (``ps.sums``):
        nothing is allocated before the collective, and a failure of this rank's local work in it (its packing,
        the sums read back in the parameters' dtypes) joins the collective first and is held (``held.error``) for
        the template's all-reduce (:meth:`_prepare`), like the solve's. (An error raised out of the exchange did not
        join: this rank's alone, :meth:`_abandon`.)"""
        held, ps.sums = ps.sums, None
        ps.at_owners = self.exchange.sum_to_owners(channels, wide, held)
        if held is not None and held.error is not None:
            ps.late_error = ps.late_error or held.error

    def _solved_vjps(self, ps: _Pass, batch: _Batch, layout: GramLayout,
                     pieces: GramFactors | None) -> list[list[Tensor | None]] | str:
        """The solve and Jᵀv (or why the step is skipped: identical on every rank, from identical data).
        At W > 1 a rank whose local work raises here (out of memory: the bc×bc system is EGN's largest
        allocation), or raised since the factors' all-gather (``pieces`` None), still joins the
        reduce-scatter, with nothing (zeros), and raises its error from :meth:`_prepare`: the template's
        all-reduce that follows makes every rank raise together, before anything changed."""
        try:
            if pieces is None:
                raise ps.late_error or RuntimeError("EGN: no Gram factors")  # (held by _gather_factors)
            curv = ps.curvature = self._solve(batch, layout, pieces)
            if not curv.sol.ok:
                why = f"the bc system could not be solved after {curv.sol.fallbacks} damping retries"
                if isinstance(self.comm, LocalComm):
                    return why
                # W > 1: a rank whose solve (or stacking) raised cannot know that the system is unsolvable and
                # waits in the reduce-scatter; skipping here left it there (gloo: an abort, NCCL: a hang). The
                # skip joins it with nothing and is decided by the template's all-reduce, where an error wins.
                ps.unsolved = why
                return self._no_vjps()
            return self._vjps(batch, curv, pieces)
        except Exception as e:
            if isinstance(self.comm, LocalComm):
                raise
            ps.late_error = e
            return self._no_vjps()

    def _no_vjps(self) -> list[list[Tensor | None]]:
        """The reduce-scatter's channels of a rank with no Jᵀv to add (zeros: d, and g with momentum)."""
        channels = 2 if float(self.param_groups[0]["momentum"]) > 0 else 1
        return [[None] * len(self._params) for _ in range(channels)]

    def _prepare(self, views: list[BlockView]) -> _EGNRecord:
        """The owners' direction blocks, new momentum buffers and their partial gᵀd (momentum only)."""
        ps = self._current()
        if ps.late_error is not None:  # reported through the template's all-reduce (_prepare_locally)
            raise ps.late_error
        if ps.unsolved is not None:  # a skip, by this flag in the same all-reduce, unless a rank raised (_skip_step)
            return _EGNRecord(nonfinite=1.0, cg_failed=float(ps.cg_failed))
        # the direction's gather from its owners (_decide): its buffers before the template's all-reduce, whose flag
        # carries a failure to make them (made after it, a rank failing there raised alone: the others waited)
        ps.gathers = self.exchange.gather_buffers()
        at_owners = ps.at_owners
        beta = float(self.param_groups[0]["momentum"])
        rec = _EGNRecord(direction=at_owners[0], cg_failed=float(ps.cg_failed))
        if at_owners[0]:
            # one finiteness check over every owned block, read by the template's single host copy (a
            # 0-d tensor, no sync here): a small model's step pays per op, not per element
            flat = torch.cat([d.reshape(-1) for d in at_owners[0]])
            # Σ 0·d is ±0 when every entry is finite and NaN otherwise (0·inf = NaN): 3 ATen calls where
            # isfinite(...).logical_not().any() makes 6 (isfinite itself is abs, ne, eq, mul)
            rec.nonfinite = flat.mul(0.0).sum().ne(0.0)  # type: ignore[assignment]
        if beta > 0:
            active = [self._active[v.block.param_index] for v in views]
            self._add_momentum(rec, [v.state for v in views], at_owners[0], at_owners[1], active, beta)
        return rec

    def _add_momentum(self, rec: _EGNRecord, states: list[dict[Any, Any]], directions: list[Tensor],
                      grads: list[Tensor], active: list[bool], beta: float) -> None:
        """Onto ``rec``: the new momentum buffers of the owned blocks (``states``: their state dicts, ``directions``
        d and ``grads`` g = −Jᵀr/b: their blocks), the bias-corrected momentum directions and their partial gᵀd."""
        parts = []
        rec.holds_momentum = float(any(st.get("momentum_buffer") is not None for st in states))
        news = self._momentum_buffers(states, directions, active, beta)
        scale = 1 - beta ** (self.momentum_steps + 1)
        dirs = iter(torch._foreach_div(news, scale) if news else ())
        new_iter = iter(news)
        for j, d in enumerate(directions):
            if not active[j]:
                # frozen: no step (d is its zero block) and its buffer is kept, as torch's momentum
                # optimizers skip a parameter without a gradient
                rec.buffers.append(None)
                rec.momentum_dirs.append(d)
                continue
            rec.buffers.append(next(new_iter))
            rec.momentum_dirs.append(next(dirs))
            # gᵀm in float64 without float64 copies of a large block (three of them: 6x its float32 bytes)
            parts.append(dot_f64(grads[j], rec.momentum_dirs[-1]))
        # shard=False: every rank holds every block, with the same d and g (all-reduced), so one rank
        # counts them; summed over W ranks, gᵀm was W times too large (the line search's and adaptive
        # damping's gᵀd: 1.7e-3 off shard=True at W = 2 in 4 steps)
        if parts and (self.sharding.shard or self.comm.rank == 0):
            rec.gtd_momentum = torch.stack(parts).sum()  # type: ignore[assignment]

    @staticmethod
    def _momentum_buffers(states: list[dict[Any, Any]], dirs: list[Tensor], active: list[bool],
                          beta: float) -> list[Tensor]:
        """The new momentum buffers β·m + (1 − β)·d of the active blocks (d·(1 − β) where a block has none yet),
        in order; the old ones stay until the step is accepted. One multi-tensor call per operation where
        every active block has a buffer (or none has): on the CPU those run the same kernel per block as
        the per-block calls, so the same bits, at one Python call instead of one per block."""
        olds = [st.get("momentum_buffer") for st, a in zip(states, active) if a]
        ds = [d for d, a in zip(dirs, active) if a]
        if not ds:
            return []
        if all(m is None for m in olds):
            return list(torch._foreach_mul(ds, 1 - beta))
        if all(m is not None for m in olds):
            news = list(torch._foreach_mul(olds, beta))  # type: ignore[arg-type]
            torch._foreach_add_(news, ds, alpha=1 - beta)
            return news
        return [d.mul(1 - beta) if m is None else m.mul(beta).add_(d, alpha=1 - beta) for m, d in zip(olds, ds)]

    def _decide(self, reduced: StepRecord) -> _EGNDecision | SkipStep:
        """The direction (momentum kept only when it descends) and the step size, identically on every
        rank. A non-finite loss after the step is never accepted: the step is skipped (parameters back
        at w) and :meth:`_on_skip` raises the damping."""
        dec = self._choose_direction(reduced)
        ps = self._current()
        curv, batch = ps.curvature, ps.batch
        assert curv is not None and batch is not None
        held, ps.gathers = ps.gathers, None
        dec.full = self.exchange.gather_from_owners(dec.direction, held)  # collective: all_gather_flat
        try:
            with torch.no_grad():  # w0: a copy of the parameters in one op (×1 is exact, -0 and inf included)
                dec.w0 = list(torch._foreach_mul(self._params, 1.0))
        except Exception as e:  # raised together by the next all-reduce (_sum_together)
            if isinstance(self.comm, LocalComm):
                raise
            ps.late_error = e
        dec.jd_qq = curv.jd_qq
        if dec.use_momentum and self.config.adaptive_damping:
            dec.jd_qq = self._jd_q_norm(batch, curv, dec.full)  # collective: all_reduce_scalars
        assert ps.undo is not None  # (_exchange_in)
        ps.undo.w0 = dec.w0  # a trial, or anything up to the step's count, that raises puts w0 back (_abandon)
        dec.alpha, dec.f_new, dec.tries = self._step_size(  # all_reduce per trial
            self._agreed_trials(batch, dec), batch.f0, batch.z.dtype)
        if not math.isfinite(dec.f_new):
            self._restore(dec.w0)
            ps.trial_rejected = True
            return SkipStep(f"non-finite loss after the step (α={dec.alpha:.3g}); the damping grows")
        return dec

    def _restore(self, w0: list[Tensor]) -> None:
        with torch.no_grad():
            for p, w in zip(self._params, w0):
                p.copy_(w)

    def _abandon(self, error: BaseException) -> None:
        """The step raised: what it changed before it was counted is put back (:class:`_Undo`), and the random
        generators rewound, so that a caller who catches the error (an out of memory in a line-search forward,
        a Ctrl+C) and steps again trains exactly as without it. (A step raising after it was counted is done.)
        Flagged as interrupted (:meth:`_update_interrupted`) where that is not enough: the putting back itself
        raised, or at W > 1 the error came from this rank alone (any error that no agreement raised on every rank,
        :meth:`_agreeing`, once the step's collectives began: a Ctrl+C, an out of memory in an exchange's own
        buffer): the other ranks are left in the step's collectives or went on to the update, and this rank is
        out of step with them (a save from it met their collective and both hung)."""
        ps = self._current()
        undo = ps.undo
        if undo is None or self.num_steps + self.skipped_steps != undo.counted:
            return
        ps.rewind = True
        try:
            self._roll_back(undo)
        except BaseException:  # a second Ctrl+C: the parameters partly back
            self._update_interrupted(error)
            raise
        # (EGN's passes report an Exception of their local work through their next all-reduce, raised on every
        # rank under _agreeing; an error outside them, Exception or not, leaves the peers in a collective)
        if not ps.agreed and self.comm.world_size > 1 and self.__dict__.get("_interrupted") is None:
            self._update_interrupted(error)

    def _roll_back(self, undo: _Undo) -> None:
        """Parameters, momentum buffers and the optimizer-wide values as before the step (bit for bit: w0 is an
        exact copy, the rest are the old objects)."""
        if undo.w0:
            self._restore(undo.w0)
        for state, old in undo.buffers:
            if old is None:
                state.pop("momentum_buffer", None)
            else:
                state["momentum_buffer"] = old
        for key, value in zip(_UNDONE, undo.scalars):
            setattr(self, key, value)
        self._last = undo.last

    def _choose_direction(self, reduced: StepRecord) -> _EGNDecision:
        """Keep the momentum direction only when it descends (gᵀd < 0)."""
        assert isinstance(reduced, _EGNRecord)
        ps = self._current()
        assert ps.curvature is not None and ps.batch is not None
        return self._direction_of(reduced, ps.curvature.gtd, egn_math.gradient_scale(ps.batch.f0, ps.batch.z.dtype))

    def _direction_of(self, reduced: _EGNRecord, gtd: float, scale: float) -> _EGNDecision:
        """:meth:`_choose_direction` from the reduced record, gᵀd of the plain direction and the ``scale`` g was
        formed at (egn_math.gradient_scale)."""
        beta = float(self.param_groups[0]["momentum"])
        dec = _EGNDecision(direction=reduced.direction, gtd=gtd, buffers=reduced.buffers)
        if beta <= 0:
            return dec
        reduced.gtd_momentum /= scale  # (a power of two: exact)
        if reduced.holds_momentum == 0 and self.momentum_steps > 0:
            dec.momentum_restarted = True
            self._restart_momentum(reduced, beta)
        if reduced.gtd_momentum < 0:
            dec.use_momentum, dec.gtd = True, reduced.gtd_momentum
            dec.direction = reduced.momentum_dirs
        else:
            dec.momentum_rejected = True
            log.info("EGN: momentum direction is not a descent direction (gᵀd=%.3e); plain step used",
                     reduced.gtd_momentum)
        return dec

    def _restart_momentum(self, reduced: _EGNRecord, beta: float) -> None:
        """The momentum direction of a step where no rank holds a momentum buffer after steps with momentum
        (``optimizer.state.clear()``, or every parameter's ``del optimizer.state[p]``): the momentum vector
        starts again, and its bias correction with it, as in a fresh optimizer: m/(1 − β), not m/(1 − β^(t+1))
        (the count kept, its first step was (1 − β)/(1 − β^(t+1)) of a fresh EGN's: 0.52x at β = 0.5, t = 4).
        Decided from the template's all-reduce, so alike on every rank. A buffer removed from some parameters
        only keeps the count (one momentum vector, zero there: as a layer unfrozen later)."""
        # each rank's partial gᵀm was divided by 1 − β^(t+1): the sum is rescaled (the owners' blocks, not rescaled,
        # are made again as a fresh EGN makes them, bit for bit)
        reduced.gtd_momentum *= (1 - beta ** (self.momentum_steps + 1)) / (1 - beta)
        reduced.momentum_dirs = [d if m is None else m / (1 - beta)
                                 for d, m in zip(reduced.momentum_dirs, reduced.buffers, strict=True)]

    def _apply(self, views: list[BlockView], decision: _EGNDecision) -> None:
        """Commit the owned state (momentum buffers), the counters and λ from ρ. w ← w + αd is already in
        place on every rank for every parameter (each rank holds the full direction): :meth:`_step_size`'s
        last trial is the α taken."""
        ps = self._current()
        curv, batch = ps.curvature, ps.batch
        assert curv is not None and batch is not None and ps.undo is not None
        self._update_clean_on_raise = True  # what it writes, _abandon puts back (with the trials' w0 + αd)
        self._commit([v.state for v in views], decision, curv.sol, ps.undo, batch.b, batch.c, batch.f0,
                     batch.z.dtype)

    def _commit(self, states: list[dict[Any, Any]], decision: _EGNDecision, sol: egn_math.SolveResult, undo: _Undo,
                b: int, c: int, f0: float, dtype: torch.dtype) -> None:
        """What a taken step writes besides the parameters (they hold w0 + αd already: :meth:`_step_size`'s last
        trial is the α taken): the momentum buffers of the owned blocks (``states``, their state dicts; the old
        ones kept in ``undo`` first), the counters, λ from ρ, α and the step's statistics. Shared by the template
        (:meth:`_apply`) and the step plan (:mod:`~lightning_soaa.optim.egn_plan`)."""
        if float(self.param_groups[0]["momentum"]) > 0:
            undo.buffers = [(st, st.get("momentum_buffer")) for st in states]
            for st, m_new in zip(states, decision.buffers):
                if m_new is not None:
                    st["momentum_buffer"] = m_new
            self.momentum_steps = 1 if decision.momentum_restarted else self.momentum_steps + 1
            self.momentum_rejections += int(decision.momentum_rejected)
        self.solve_fallbacks += sol.fallbacks
        rho = self._adapt_damping(b, f0, dtype, decision.gtd, decision.jd_qq, decision.alpha, decision.f_new)
        self.alpha = decision.alpha
        self._last = {"loss": f0, "loss_after": decision.f_new, "gtd": decision.gtd,
                      "ls_tries": float(decision.tries), "rho": rho, "step_fallbacks": float(sol.fallbacks),
                      "solve_damping": sol.damping,
                      "solve_refinements": float(sol.refinements),
                      "solve_cg_iterations": float(sol.cg_iterations),
                      "momentum_used": float(decision.use_momentum),
                      "gram_size": float(b * c), "batch_size": float(b)}

    def _exchange_out(self, decision: _EGNDecision) -> None:
        """No parameter gather: ``_decide`` gathered the full direction from its owners (the same bytes)
        and every rank applied it to every parameter."""

    def _skip_step(self, why: str) -> bool:
        """The base's skip, with the reason of an unsolvable system at W > 1 (:meth:`_solved_vjps`: flagged as
        non-finite in the template's all-reduce; every rank that flagged it has the same reason)."""
        unsolved = self._pass.unsolved if self._pass is not None else None
        return super()._skip_step(unsolved or why)

    def _on_skip(self) -> None:
        if self._pass is not None and self._pass.trial_rejected:
            self._after_rejected_trial()

    def _after_rejected_trial(self) -> None:
        """A step skipped because its loss L_b(w + αd) was non-finite. INFERRED: λ ×10 as for a failed solve
        (spec §2.7): a non-finite trial means the model's quadratic model was far off; 1.01 would take hundreds
        of skipped steps to matter."""
        self.damping = min(self.damping * 10.0, self.config.damping_max)
        self.nonfinite_trials += 1

    def _current(self) -> _Pass:
        if self._pass is None:
            raise RuntimeError("EGN: the step hooks run only inside EGN.step().")
        return self._pass

    def _hold_out_of_memory(self, exc: Exception) -> None:
        """An out of memory in a local pass whose failure the batch agreement reports as text (the capture
        forward, the explicit Jacobians: EGN's most memory-hungry ones) is kept as this rank's own error: raised
        as itself (it was a ValueError naming it, which a caller's ``except torch.OutOfMemoryError`` that frees
        memory or shrinks the batch and steps again missed), and as an out of memory on the peers
        (:meth:`_raise_rank_errors`), so that every rank takes that branch together."""
        if isinstance(exc, torch.OutOfMemoryError) and self._pass is not None and self._pass.error is None:
            self._pass.error = exc

    # -- 1. the batch: local forward and validation, one all-reduce -------------------------
    def _forward_capture(
        self, xs: tuple[Tensor, ...], targets: Tensor
    ) -> tuple[Tensor | None, LinearCapture | ChainCapture | None, str | None]:
        """Local forward with Linear capture; returns (z, capture, message-or-None)."""
        b = xs[0].shape[0] if xs[0].dim() else -1
        if any(x.dim() == 0 or x.shape[0] != b for x in xs) or targets.dim() == 0 or targets.shape[0] != b:
            shapes = [tuple(x.shape) for x in xs]
            return None, None, (f"EGN: inputs {shapes} and targets {tuple(targets.shape)} must share the "
                                "batch dimension (dim 0).")
        cap: LinearCapture | ChainCapture | None
        try:
            if self._chain is not None and self._use_chain(xs):  # no random draws: modules known, eval mode
                chain = ChainCapture(self._chain, xs[0])
                cap, z = chain, chain.z  # (the chain's own forward: its modules work out of place)
            else:
                # data made under inference mode cannot be saved for the capture's backward: a normal copy
                xs = tuple(x.clone() if x.is_inference() else x for x in xs)
                cap, z, changed = self._user_forward(xs, b)
                if changed is not None:
                    return None, None, changed
        except Exception as exc:  # noqa: BLE001 - reported on every rank, never a hang
            self._hold_out_of_memory(exc)
            return None, None, f"EGN: the model's forward failed: {type(exc).__name__}: {exc}"
        assert cap is not None
        if cap.error is not None:
            return None, None, cap.error
        if not isinstance(z, Tensor):
            return None, None, f"EGN: the model must return a tensor; got {type(z).__name__}."
        if z.dtype not in self._param_dtypes():  # the Gram factors pair outputs with parameter-dtype signals
            return None, None, (f"EGN: the model's outputs are {z.dtype}, its trained parameters "
                                f"{sorted(map(str, self._param_dtypes()))}; EGN needs outputs in a parameter "
                                "dtype. " + _output_cast_advice(self.model))
        try:
            egn_math.check_outputs_targets(self.config.loss, z, _as(targets, device=z.device))
        except ValueError as exc:
            return None, None, str(exc)
        if isinstance(cap, LinearCapture):  # its back-signals now: a model that mixes samples is refused
            try:                            # before the ranks exchange anything
                self._differentiate_capture(cap, xs, z)
            except Exception as exc:  # noqa: BLE001 - reported on every rank, never a hang
                self._hold_out_of_memory(exc)
                return None, None, _backward_failed(exc)
            if cap.error is not None:
                return None, None, cap.error
        return z, cap, None

    def _differentiate_capture(self, cap: LinearCapture, xs: tuple[Tensor, ...], z: Tensor) -> None:
        """The capture's back-signals, the explicit rows and the factor probe: each differentiates the forward's
        graph again (a refusal goes to ``cap.error``)."""
        cap.prepare(z, z.shape[1])
        if cap.error is None and self._explicit:
            cap.error = self._explicit_rows(cap, xs, z)
        if cap.error is None and self.__dict__.get("_probe_due", True):
            cap.error, decided = self._factor_probe(cap, z)
            self._current().probed = cap.error is None and decided

    def _user_forward(self, xs: tuple[Tensor, ...], b: int) -> tuple[LinearCapture | ChainCapture | None, Any,
                                                                    str | None]:
        """The capture forward of a model that is not a planned chain (the user's forward runs) on ``xs`` (no
        inference tensors): the traced chain or the general capture; (capture, outputs, None), or (None, None,
        why) when the forward changed its input in place (refused before a second forward could see the
        changed batch)."""
        # the user's forward may draw random numbers (F.dropout, noise): each later forward of this step
        # repeats the first draw (egn_rng: every forward is bracketed by ``with rng``)
        rng = self._current().rng = StepRng(self._devices() | {x.device for x in xs}, self._draws)
        versions = [x._version for x in xs]
        cap: LinearCapture | ChainCapture | None = None
        if self._trace is not None:
            with rng:
                cap, z, why = self._trace.capture(xs)
            changed = _changed_input(xs, versions)
            if changed is not None:  # (the trace plan is kept: nothing of the optimizer changes)
                return None, None, changed
            if cap is None:  # the forward is not a chain: the general capture, now and from now on
                log.info("EGN: the model's forward is not a chain of its Linear layers and activations "
                         "(%s); the general capture is used from now on.", why)
                self._trace = None
        if cap is None:
            cap = LinearCapture(self._sites, b)
            with torch.enable_grad(), cap, rng:
                z = self.model(*xs)
            changed = _changed_input(xs, versions)
            if changed is not None:
                return None, None, changed
        rng.mark()
        return cap, z, None

    def _param_dtypes(self) -> set[torch.dtype]:
        return {p.dtype for p in self._params}

    def _devices(self) -> set[torch.device]:
        """The devices of EGN's parameters (their generators are rewound, :class:`StepRng`): kept from the
        last look, looked at again when the first parameter is no longer on one of them (a moved model);
        reading ``.device`` of every parameter at every step costs ~1 µs each."""
        if self._param_devices is None or self._params[0].device not in self._param_devices:
            self._param_devices = {p.device for p in self._params}
        return self._param_devices

    def _warn_dense_rows(self, z: Tensor) -> None:
        """Say once when the explicit rows will be large: they are dense [b, c, n] tensors (made twice),
        so a trained nn.Embedding of 3.2M entries takes +4.9 GB a step at b = 16, c = 8 with explicit rows
        (almost all zeros; factor_embeddings=True gives a plain one index factors), and a larger one was
        killed for memory with no message."""
        if self.__dict__.get("_warned_dense_rows"):
            return
        params = [self._trainable[n] for n in self._explicit]
        numel = sum(p.numel() for p in params)
        need = 2 * z.shape[0] * z.shape[1] * numel * params[0].element_size()
        if need < DENSE_ROWS_WARN_BYTES:
            return
        self._warned_dense_rows = True
        log.warning(
            "EGN: %d trained parameter(s) have no Gram factors (only plain nn.Linear layers, and nn.Embedding "
            "tables with factor_embeddings=True, are factored), e.g. %r, %d elements in all: their per-sample "
            "Jacobians are dense, about %.1f GiB a step at this batch (%d samples x %d outputs). An embedding's are "
            "almost all zeros: EGN(..., factor_embeddings=True) factors a plain nn.Embedding looked up per sample. "
            "If memory runs out, freeze them or train them with another optimizer. Logged once.", len(params),
            self._explicit[0], numel, need / 2**30, z.shape[0], z.shape[1])

    def _explicit_rows(self, cap: LinearCapture, xs: tuple[Tensor, ...], z: Tensor) -> str | None:
        """The explicit Jacobian rows onto ``cap``, checked against the batch's forward; the error, if any."""
        self._warn_dense_rows(z)
        try:
            rows, coupled = checked_explicit_rows(
                self.model, {n: self._trainable[n] for n in self._explicit}, xs, z)
        except Exception as exc:  # noqa: BLE001 - reported on every rank, never a hang
            self._hold_out_of_memory(exc)
            text = str(exc)
            hooks = ("a torch.utils.checkpoint region or another saved-tensor-hooks context (e.g. "
                     "torch.autograd.graph.save_on_cpu)" if "saved tensor hooks" in text else
                     "a module with a backward hook (register_full_backward_hook / _pre_hook, or a global one), "
                     "which torch wraps in an autograd.Function" if "setup_context" in text else None)
            if hooks is not None:
                return (f"EGN: the explicit per-sample Jacobians failed: {type(exc).__name__}: {exc}. The model's "
                        f"forward runs {hooks}, which torch.func cannot differentiate. " + (
                            "jacobian='explicit' takes every trained parameter's Jacobian that way: use "
                            "jacobian='auto', or run the forward without them."
                            if self.config.jacobian == "explicit" else
                            "EGN needs explicit Jacobians for the trained parameters that are not a plain "
                            "nn.Linear's weight or bias (or, with factor_embeddings=True, nn.Embedding's table) "
                            f"({self._explicit[0]!r}"
                            f"{' and others' if len(self._explicit) > 1 else ''}): freeze those, or run the "
                            "forward without them."))
            if "dynamic shape" in text:  # vmap of nonzero / boolean-mask indexing: a data-dependent dispatch
                return (f"EGN: the explicit per-sample Jacobians failed: {type(exc).__name__}: {exc}. The model's "
                        "forward picks a data-dependent part of the batch (e.g. a mixture of experts that sends "
                        "each expert the samples its router picked), which torch.func's vmap cannot run, whichever "
                        "parameters are trained. " + part_of_batch_remedy(True))
            return (f"EGN: the explicit per-sample Jacobians failed: {type(exc).__name__}: {exc}. EGN takes them "
                    "with torch.func (vmap of jacrev over one-sample batches); modules that do not support it "
                    "(e.g. nn.GRU, nn.LSTM, nn.RNN, nn.PReLU) cannot be trained by EGN, nor can a forward that "
                    "draws random numbers itself (F.dropout) when some parameter needs these explicit Jacobians "
                    "(one that is not a plain Linear's weight or bias, or with factor_embeddings=True an "
                    "Embedding's table: a norm's scale, an EmbeddingBag, a tied embedding, a raw nn.Parameter). "
                    f"Here: {', '.join(repr(n) for n in self._explicit[:4])}"
                    f"{' and others' if len(self._explicit) > 4 else ''}, held by {self._holders(self._explicit)} "
                    "(freeze them to train the rest with EGN).")
        # detached: the rows are built from the live (trainable) factored parameters, so autograd would
        # otherwise record every product of the solve and of Jᵀv made from them
        cap.rows = rows.detach()
        return coupled

    def _holders(self, names: list[str]) -> str:
        """``nn.GRU, nn.PReLU``: the classes of the modules holding the parameters ``names``, so that a
        torch.func failure (a shape message from inside torch) points at the layers to freeze."""
        kinds: list[str] = []
        for name in names:
            try:
                owner = self.model.get_submodule(name.rpartition(".")[0])
            except AttributeError:
                continue
            kind = ("nn." if type(owner).__module__.startswith("torch.nn") else "") + type(owner).__name__
            if kind not in kinds:
                kinds.append(kind)
        return ", ".join(kinds) or "the model itself"

    def _factor_probe(self, cap: LinearCapture, z: Tensor) -> tuple[str | None, bool]:
        """Whether the general capture's Gram factors are the Jacobian of this forward: Jᵀu read from them
        (:meth:`_factor_vjp`, as the step reads d = Jᵀv) against autograd's gradient of Σ u·z through the
        forward's own graph, for a fixed probe u_ik = w_i ρ_k, per factored parameter; None, or the
        refusal naming the first one that differs beyond rounding (:data:`COUPLING_TOL`).

        The capture sees a parameter only through its layer's call: a dependence it cannot see (a forward
        that differentiates a trained layer in a way the guards do not recognise, an op that bypasses the
        hooks) leaves factors that give a wrong step, and nothing else would say so. One backward to the
        parameters, once per capture plan (the first general capture after EGN is built or re-planned on a
        freezing change, and so after a traced chain falls back to it); the explicit rows of the other
        parameters are checked at every step already (:func:`checked_explicit_rows`). Returns (the refusal or
        None, whether the probe decided): a batch with non-finite outputs decides nothing (every comparison
        with NaN is False), so the probe runs again at the next step (it was spent on such a first batch)."""
        b, c = z.shape
        named = [(self._named[j][0], self._named[j][1]) for pair in self._site_index for j in pair if j is not None]
        if b == 0 or not named:
            return None, True
        cot = probe_weights(b, z)[:, None] * probe_weights(c, z)[None, :]
        got: Sequence[Tensor | None] = [None] * len(named)
        if z.requires_grad:  # else no trained parameter reaches z: its gradient is zero
            got = torch.autograd.grad(z, [p for _, p in named], grad_outputs=cot, retain_graph=True,
                                      allow_unused=True)
        with grad_off():
            want = self._factor_vjp(cap.local_factors(z, c), cap.identity_site, cot)
            acc = torch.promote_types(z.dtype, torch.float32)
            norms = []
            for (_, p), g in zip(named, got):
                w = want[id(p)].to(acc)
                g = torch.zeros_like(w) if g is None else g.to(acc)
                norms += [(g - w).norm(), g.norm() + w.norm()]
            values = torch.stack(norms).tolist()  # one host read
        if not all(math.isfinite(v) for v in values):
            return None, False
        pairs = list(zip(values[0::2], values[1::2]))
        tol = COUPLING_TOL.get(z.dtype, 3e-2)
        floor = 1e-6 * max(scale for _, scale in pairs)  # a parameter whose gradient is rounding noise: no evidence
        for (name, _), (diff, scale) in zip(named, pairs):
            if diff > tol * max(scale, floor):
                return (f"EGN: the Gram factors captured for the trained parameter {name!r} do not give its gradient "
                        f"through the model's forward (relative difference {diff / max(scale, floor):.2g} for a "
                        "probe of the outputs, checked once per capture plan): the forward makes the outputs "
                        "depend on it in a way EGN's per-layer capture does not see, and the step would be "
                        "silently wrong. Build EGN with jacobian='explicit' (per-sample Jacobians of the whole "
                        "forward, by torch.func), freeze that parameter, or train this model with a first-order "
                        "optimizer (e.g. ShardedAdamW, SOAA).", True)
        return None, True

    def _agree_on_batch(self, xs: tuple[Tensor, ...], targets: Tensor) -> _Batch:
        """Local forward; then ONE all-reduce of [non-finite, loss sum, per rank: error, b_r, c, trainable
        set, T per Linear site], so that every rank raises together or goes on with the same global sizes
        and the same trained parameters (each rank follows its own ``requires_grad``). The table
        is built and read as host lists (one tensor, one host copy): a small model's step is dominated by
        per-op overhead, and element-wise tensor writes and reads cost one op each."""
        world, rank = self.comm.world_size, self.comm.rank
        err: str | None
        if self._pass is not None and self._pass.error is not None:  # every rank raises together
            error = self._pass.error
            z, cap, err = None, None, f"{type(error).__name__}: {error}"
        else:
            z, cap, err = self._forward_capture(xs, targets)
        if isinstance(self.comm, LocalComm):  # nobody to agree with: no table (the same checks, the same f0)
            return self._local_batch(xs, targets, z, cap, err)
        table, row = self._agreement_table(_BATCH_KIND)
        positions: list[int] = []
        y: Tensor | None = None
        if err is None:
            assert z is not None and cap is not None
            try:
                positions, y = self._batch_row(table, row, xs, targets, z, cap)
                table[row + _RESERVE_SLOT] = self._reserve_gather(int(xs[0].shape[0]), int(z.shape[1]), positions,
                                                                  z.device)
            except Exception as exc:  # this rank's alone (out of memory in the loss): held for the all-reduce
                if self._pass is not None and self._pass.error is None:
                    self._pass.error = exc
                table, row = self._agreement_table(_BATCH_KIND)  # (a fresh one: that one is partly filled)
                err, positions = f"{type(exc).__name__}: {exc}", []
        own = self._pass.error if self._pass is not None else None  # (from before the step, or a held out of memory)
        table[row] = 0.0 if err is None else agreement.error_flag(own or ValueError)  # (an invalid batch: ValueError)
        table[row + 3] = _fingerprint(self._active)
        red = self._sum_scalars(table)  # collective
        info = agreement.meeting_rows(red, world)
        with self._agreeing():
            sizes, c = self._check_agreement(info, err, positions)
        assert z is not None and cap is not None and y is not None  # (an error raised in the agreement)
        b = sum(sizes)
        return _Batch(xs=xs, y=y, z=z, cap=cap, sizes=sizes, c=c, rank=rank,
                      positions=positions, nonfinite=red[0] > 0,
                      f0=float("nan") if red[0] > 0 else red[1] / b,
                      reserved=[int(info[r][_RESERVE_SLOT]) for r in range(world)])

    def _reserve_gather(self, b_r: int, c: int, positions: list[int], device: torch.device) -> float:
        """The factors' all-gather buffers (send, out), made before the batch agreement, whose error flag carries a
        failure to make them (out of memory): made after it, a rank failing there raised alone while the others
        waited in the all-gather (gloo: an abort, NCCL: a hang). Each rank's part is padded to the largest batch,
        known only from the agreement: they hold this rank's samples or the last step's largest batch, whichever is
        more (the number is this rank's agreement value: every rank learns who is short, :meth:`_gather_buffers`)."""
        try:
            self._check_sizes(max(b_r, 1), c, positions)
        except ValueError:  # a batch the agreement refuses on every rank (max_gram_size): nothing made for it
            return 0.0  # (its refusal, not an out of memory of a buffer that size, is what every rank raises)
        rows = max(b_r, int(self.__dict__.get("_gather_rows", 0)))
        n = rows * self._factor_layout(c, positions).width + 1  # (the rows, then the failure flag)
        self._current().gather = flat_buffers(self.comm, n, self.comm.world_size * n, torch.float64, device)
        return float(rows)

    def _gather_buffers(self, batch: _Batch, n: int) -> tuple[Tensor, Tensor]:
        """The factors' all-gather buffers for ``n`` values per rank (then its flag): views of those made before
        the agreement (:meth:`_reserve_gather`). Where a rank's are short (uneven batches at their first step, or
        a batch larger than the last step's largest; every rank knows from the agreement), that rank makes them
        now and every rank joins one all-reduce of failure flags first (a collective on that path only)."""
        ps = self._current()
        world, rank = self.comm.world_size, self.comm.rank
        need = max(batch.sizes)
        self._gather_rows = need  # (what the next step reserves; only a size, told to every rank as it is used)
        if any(k < need for k in batch.reserved):
            error: Exception | None = None
            if batch.reserved[rank] < need:
                ps.gather = None  # (too small: freed first)
                try:
                    ps.gather = flat_buffers(self.comm, n + 1, world * (n + 1), torch.float64, batch.z.device)
                except Exception as e:
                    error = e
            flags = [0.0] * world
            flags[rank] = agreement.error_flag(error)
            self._raise_failed(self._sum_scalars(flags), error, "while making its Gram factors' all-gather buffers")
        assert ps.gather is not None  # (made, or every rank raised above)
        send, out = ps.gather
        if send.numel() == n + 1:  # (the usual case: no op between the agreement and the all-gather)
            return send, out
        # made for a larger batch (the last step's): views, which allocate nothing
        return send[:n + 1], out[:world * (n + 1)]

    def _batch_row(self, table: list[float], row: int, xs: tuple[Tensor, ...], targets: Tensor, z: Tensor,
                   cap: LinearCapture | ChainCapture) -> tuple[list[int], Tensor]:
        """Fill this rank's values into the batch agreement's ``table`` (its row at ``row``; the non-finite flag
        and the loss sum first); returns this rank's T per Linear site and the targets in the outputs' dtype
        (made here, where an error of this rank is held for the agreement, not after it)."""
        with grad_off():
            zd = z.detach()
            # the loss sum and the finiteness of z in one host copy, on the targets the trials and the
            # solve use (in the outputs' dtype: float32 targets of a bf16 model measured f0 on other
            # targets than the line search's trials, up to 42% apart)
            y = _as(targets, z.dtype if targets.is_floating_point() else targets.dtype, z.device)
            # Σ 0·z is ±0 when every output is finite and NaN otherwise (0·inf = NaN): 2 ATen calls where
            # isfinite(z).all() makes 5 (isfinite itself is abs, ne, eq, mul)
            local_loss, z_probe = host_floats([egn_math.loss_sum(self.config.loss, zd, y), zd.mul(0.0).sum()])
        table[row + 1:row + 3] = [float(xs[0].shape[0]), float(z.shape[1])]
        positions = [sum(a.shape[1] for a in cap.inputs[i]) for i in range(len(self._sites))]
        table[row + _SITES_SLOT] = float(zlib.crc32(repr(positions).encode()))
        nonfinite = not (math.isfinite(local_loss) and math.isfinite(z_probe))
        table[0:2] = [1.0 if nonfinite else 0.0, local_loss]
        return positions, y

    def _local_batch(self, xs: tuple[Tensor, ...], targets: Tensor, z: Tensor | None,
                     cap: LinearCapture | ChainCapture | None, err: str | None) -> _Batch:
        """:meth:`_agree_on_batch` of a single process (``LocalComm``): the capture's error raised, the sizes
        checked (:meth:`_check_sizes`) and the loss read as the all-reduce would leave them (its sum of one
        row is the row), without the agreement table, its fingerprints and its reads of other ranks' rows (a
        small MLP's step is its fixed costs)."""
        if err is not None:
            if self._pass is not None and self._pass.error is not None:  # an out of memory, as itself
                raise self._pass.error  # (_hold_out_of_memory; an error before the step was raised there)
            raise ValueError(err)
        assert z is not None and cap is not None
        with grad_off():
            zd = z.detach() if z.requires_grad else z  # (a chain capture's z has no graph: no detach op)
            y = _as(targets, z.dtype if targets.is_floating_point() else targets.dtype, z.device)
            # the loss plus Σ 0·z in one host read: ±0 added to a finite loss leaves it as it is (f0's bits), and
            # a non-finite output makes it NaN
            loss = float(egn_math.loss_sum(self.config.loss, zd, y).add_(zd.mul(0.0).sum()))
        positions = [sum(a.shape[1] for a in cap.inputs[i]) for i in range(len(self._sites))]
        b, c = int(xs[0].shape[0]), int(z.shape[1])
        self._check_sizes(b, c, positions)
        nonfinite = not math.isfinite(loss)
        return _Batch(xs=xs, y=y, z=z, cap=cap, sizes=[b], c=c, rank=0, positions=positions,
                      nonfinite=nonfinite, f0=float("nan") if nonfinite else loss / b)

    def _agreement_table(self, kind: float) -> tuple[list[float], int]:
        """(table, this rank's row offset) of an agreement all-reduce (layout at ``_KIND_SLOT``): the size
        of the step record's all-reduce on every rank, whatever its trainable set (a rank that froze a
        layer plans fewer sites) or optimizer class, so that ranks that disagree meet in one all-reduce and
        raise together."""
        table, row = agreement.meeting_table(self.comm.rank, self.comm.world_size,
                                             float(self.__dict__.get("_instance_id", 0)))
        table[row + _KIND_SLOT] = kind
        return table, row

    def _raise_rank_errors(self, info: list[list[float]], kind: float, err: str | None) -> None:
        """Raise on every rank if a rank is in another optimizer's step (the base's error, checked first
        there too: a rank in the other optimizer's step record decides from the same ids), made the other
        agreement, or had an error (in this order: a rank in the other agreement may fail where this one
        would not)."""
        world = len(info)
        others = agreement.other_instances(info)
        if others:  # this rank's own error, if any, is the cause (the base reads a crossing first too)
            raise self._out_of_order(others) from (self._pass.error if self._pass is not None else None)
        if any(info[r][_KIND_SLOT] != kind for r in range(world)):
            raise ValueError(_KIND_MESSAGE)
        flags = [info[r][agreement.ERROR_SLOT] for r in range(world)]
        if any(flags):
            own = self._pass.error if self._pass is not None else None  # this rank's exception, with its traceback
            self._raise_agreed(flags, own if own is not None or err is None else ValueError(err),
                               "before the step's first all-reduce (an invalid batch, or parameters changed since "
                               "construction)")

    def _take_rank0_buffers(self) -> None:
        """At W > 1, before the capture forward: every rank takes rank 0's floating-point buffers, so that
        every rank's samples are evaluated by the same function in eval mode (each DDP rank's training
        forward updates its BatchNorm running statistics from its own samples; DDP itself broadcasts the
        buffers at each forward with ``broadcast_buffers=True``). First one all-reduce of the buffer
        layouts (the agreement table, of the batch agreement's size), so that ranks whose buffers differ
        raise together before any transfer; then rank 0's values in one float64 all-reduce, to which the
        other ranks add zeros (exact: x + 0 = x, and float64 holds every floating dtype's values). That
        all-reduce's buffer is made before the layout agreement, which carries a failure to make it (out of
        memory) to every rank. Without floating buffers: nothing, no collective."""
        buffers = [(n, b) for n, b in self.model.named_buffers() if b.is_floating_point()]
        if not buffers:
            return
        world, rank = self.comm.world_size, self.comm.rank
        ps = self._current()
        tensors = [b for _, b in buffers]
        layout = _buffer_layout(buffers)
        flat: Tensor | None = None
        if ps.error is None:
            # the transfer's buffer before the layout agreement, whose error flag carries a failure here (out of
            # memory): made after it, a rank raising alone left the others waiting in the transfer's all-reduce
            try:
                flat = _buffer_transfer(tensors, rank, int(layout[1]), comm_device(self.comm, tensors[0].device))
            except Exception as e:
                ps.error = e
        error = ps.error
        table, row = self._agreement_table(_BUFFER_KIND)
        table[row] = agreement.error_flag(error)
        table[row + 1:row + 4] = layout
        red = self._sum_scalars(table)  # collective: all_reduce_scalars
        info = agreement.meeting_rows(red, world)
        with self._agreeing():
            self._raise_rank_errors(info, _BUFFER_KIND, None if error is None else f"{type(error).__name__}: {error}")
            if any(info[r][1:4] != layout for r in range(world)):
                raise ValueError(
                    "EGN: the ranks' models have different floating-point buffers (count, sizes, names or dtypes: "
                    f"{[[int(v) for v in info[r][1:3]] for r in range(world)]} as [count, numel] per rank); EGN "
                    "gives every rank rank 0's buffers before its eval-mode pass, which needs the same model on "
                    "every rank.")
        assert flat is not None  # (a rank without it had an error: every rank raised above)
        self.comm.all_reduce_(flat)  # collective: rank 0's values, the others' zeros
        if rank != 0:
            try:
                with torch.no_grad():
                    for b, v in zip(tensors, torch.split(flat, [b.numel() for b in tensors])):
                        b.copy_(v.view(b.shape))
            except Exception as e:  # (a buffer not writable in place) this rank's alone: raised on every rank by
                self._current().error = e  # the batch agreement next (rank 0 went on to it: a hang, raised here)

    def _check_agreement(self, info: list[list[float]], err: str | None,
                         positions: list[int]) -> tuple[list[int], int]:
        """Raise (on every rank: ``info`` is the reduced table, a row per rank) unless the ranks' batches
        fit together. ``positions``: this rank's T per Linear site (equal on every rank once checked)."""
        world = len(info)
        self._raise_rank_errors(info, _BATCH_KIND, err)
        if any(info[r][3] != info[0][3] for r in range(world)):
            raise ValueError("EGN: the ranks disagree on which of the model's parameters are trainable "
                             "(requires_grad); freeze and unfreeze the same parameters on every rank.")
        sizes = [int(info[r][1]) for r in range(world)]
        cs = {int(info[r][2]) for r in range(world)}
        if len(cs) != 1:
            raise ValueError(f"EGN: ranks disagree on the number of outputs c: {sorted(cs)}.")
        if self._sites and any(info[r][_SITES_SLOT] != info[0][_SITES_SLOT] for r in range(world)):
            raise self._positions_error(positions)
        c = cs.pop()
        self._check_sizes(sum(sizes), c, positions)
        return sizes, c

    def _check_sizes(self, b: int, c: int, positions: list[int]) -> None:
        """Raise unless the global batch (``b`` samples of ``c`` outputs) is not empty and its system fits
        ``max_gram_size``."""
        if b <= 0:
            raise ValueError("EGN: the global batch is empty.")
        if self._kronecker and positions[:1] == [1]:  # K = G ⊗ I_c: the solve is b×b (_solve_kronecker)
            if b > self.config.max_gram_size:
                raise ValueError(
                    f"EGN: the sample Gram matrix would be {b}x{b} (global batch b={b}; K = G ⊗ I_c for this "
                    f"linear model under MSE), above max_gram_size={self.config.max_gram_size}. Use a smaller "
                    "batch or raise max_gram_size.")
        elif b * c > self.config.max_gram_size:
            raise ValueError(
                f"EGN: the Gram matrix would be {b * c}x{b * c} (global batch b={b} times c={c} outputs), "
                f"above max_gram_size={self.config.max_gram_size}. Use a smaller batch or raise max_gram_size."
            )

    def _positions_error(self, positions: list[int]) -> ValueError:
        """The error for Linear sites whose positions per sample differ across ranks, naming them (every
        rank is here: the check reads the reduced table, so one more collective, on this path only, gathers
        each rank's T per site). A layer a rank's forward did not call has T = 0 there: a branch taken only
        for some ranks' samples (a task head, an expert) trains in one process but not across ranks; the
        message said "sequence lengths" alone."""
        every = self.comm.all_gather_object(positions)
        rows = [f"'{site.path}' (T by rank: {[p[i] for p in every]})" for i, site in enumerate(self._sites)
                if any(p[i] != every[0][i] for p in every)]
        skipped = any(min(p[i] for p in every) == 0 < max(p[i] for p in every) for i in range(len(self._sites)))
        hint = (" T = 0: that rank's forward did not call the layer (a branch taken only for some samples, e.g. "
                "a task head or an expert no sample of that rank's batch needs): call it on every rank's batch "
                "and mask its output where it does not apply (torch.where(mask, layer(h), h)), which is what "
                "one process running the global batch computes." if skipped else "")
        return ValueError(
            "EGN: the ranks disagree on the positions per sample T (summed over its calls in the forward) that "
            f"a factored layer sees: {', '.join(rows)}. EGN assembles one Gram matrix of the global batch, so "
            "every rank's forward must call the same Linear and Embedding layers with the same T: pad "
            f"sequences to one length on every rank.{hint}")

    # -- 2. the Gram factors of the global batch on every rank: one all-gather --------------
    def _gather_factors(self, batch: _Batch) -> tuple[GramLayout, GramFactors | None]:
        """Pack this rank's factor table (one row per sample), all-gather the padded tables, and stack
        the rows of every rank: the global batch's factors, in the solve dtype. A single process has
        nobody to exchange with: its factors are used as they are (packing would only copy them).

        Each rank's table ends with a failure flag: a rank whose packing raises (out of memory) still
        joins the all-gather, and every rank raises together, before the solve. None for the factors: this
        rank's stacking raised (held for the step's all-reduce, :meth:`_solved_vjps`)."""
        c = batch.c
        layout = self._factor_layout(c, batch.positions)
        dt = self._solve_dtype()
        if self.comm.world_size == 1:
            factors, rows = self._local_factors(batch)
            y = batch.y if layout.class_targets else batch.y.to(dt)
            z = batch.z.detach() if batch.z.requires_grad else batch.z
            return layout, GramFactors(z.to(dt), y, [(a.to(dt), d.to(dt)) for a, d in factors],
                                       None if rows is None else rows.reshape(batch.b * c, rows.shape[-1]).to(dt),
                                       identity=batch.cap.identity_site)
        n = max(batch.sizes) * layout.width
        buf, out = self._gather_buffers(batch, n)
        ps = self._current()
        error: Exception | None = None
        try:
            factors, rows = self._local_factors(batch)
            buf[:batch.b_r * layout.width] = pack_factor_table(layout, batch.z, batch.y, factors, rows).reshape(-1)
            # the reduce-scatter's buffers, before this all-gather, whose flag carries a failure to make them
            ps.sums = self.exchange.sum_buffers(len(self._no_vjps()), self._wide_dtype(batch))
        except Exception as e:
            error = e
            buf[n] = agreement.error_flag(e)  # this rank's flag, after its (zero) rows
        gathered = self.comm.all_gather_flat(buf, out).view(len(batch.sizes), n + 1)
        ps.gather = None  # (freed with this frame, as the buffers made here were)
        self._raise_failed(gathered[:, n].tolist(), error, "while packing its Gram factors")
        try:  # (the global table: an allocation) this rank's alone until the reduce-scatter: held like the solve's
            table = torch.cat([gathered[r, :k * layout.width].view(k, layout.width)
                               for r, k in enumerate(batch.sizes)])
            return layout, split_factor_table(layout, table.to(device=batch.z.device, dtype=dt))
        except Exception as e:
            assert self._pass is not None
            self._pass.late_error = e
            return layout, None

    def _factor_layout(self, c: int, positions: list[int]) -> GramLayout:
        """The factor table's layout for ``c`` outputs and ``positions`` (T per site): kept from the last step
        while the plan (its sites, read for their widths) and these are the same, else made again."""
        rest = sum(self._trainable[n].numel() for n in self._explicit)
        key = (self._sites, c, tuple(positions), rest, self.config.loss)
        kept = self.__dict__.get("_kept_layout")
        if kept is not None and kept[0][0] is key[0] and kept[0][1:] == key[1:]:
            layout: GramLayout = kept[1]
            return layout
        layout = GramLayout(
            num_outputs=c, class_targets=self.config.loss == "cross_entropy",
            sites=tuple(LinearFactorShape(t, *s.widths(), s.weight, s.bias, vocab=s.vocab)
                        for s, t in zip(self._sites, positions)),
            rest=rest,
        )
        self._kept_layout = (key, layout)
        return layout

    def _local_factors(self, batch: _Batch) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
        """This rank's per-Linear factors (A, Δ) and explicit rows, kept on ``batch`` for Jᵀv and J·d."""
        factors = batch.cap.local_factors(batch.z, batch.c)
        rows = batch.cap.rows if isinstance(batch.cap, LinearCapture) else None  # set by the capture
        batch.local_factors, batch.local_rows = factors, rows
        return factors, rows

    # -- 3. identical on every rank: K, r, Q and the bc×bc solve (no communication) ---------
    def _solve_dtype(self) -> torch.dtype:
        return torch.float64 if self.config.solve_dtype == "float64" else self._params[0].dtype

    def _solve(self, batch: _Batch, layout: GramLayout, pieces: GramFactors) -> _Curvature:
        """v, gᵀd and (Jd)ᵀQ(Jd) from the factor table, on the factors of SᵀJ (Δ̃ = SᵀΔ; b(c−1) rows for
        cross-entropy). Small systems (bc ≤ :data:`SMALL_DENSE_MAX`) form K whole and take K·r and K·v
        as dense mat-vecs; larger ones never form K: K·r and K·v are factor mat-vecs, and the system
        SᵀKS + bλI is solved (:meth:`_solve_system`) by matrix-free conjugate gradients when it is large
        and that is expected to be cheaper, else directly (Cholesky of the assembled lower triangle)."""
        r2, s = egn_math.residual_and_factor(self.config.loss, pieces.outputs, pieces.targets)
        r = r2.reshape(-1)
        g = kronecker_sample_gram(layout, pieces) if s is None else None
        if g is not None:
            return self._solve_kronecker(g, r2)
        if r.numel() > self.config.max_gram_size:
            # admitted by b alone (_check_agreement: one Linear whose output is z, under MSE), but this step's
            # back-signal is not the identity: a forward hook changes the output, a backward hook the signal.
            # Decided from the gathered factors, alike on every rank.
            n = r.numel()
            raise ValueError(
                f"EGN: the Gram matrix would be {n}x{n} (global batch b={r2.shape[0]} times c={r2.shape[1]} "
                f"outputs), above max_gram_size={self.config.max_gram_size}. (A linear model under MSE is "
                "solved as b x b, K = G ⊗ I_c, only where its Linear's output is the model's output; here a "
                "hook on the model or the layer changes it.) Use a smaller batch or raise max_gram_size.")
        if r.numel() <= SMALL_DENSE_MAX:
            # a small system: K itself, assembled whole, gives K·r as one mat-vec and SᵀKS as one
            # contraction, instead of a factor transform and a factor mat-vec (per-op overhead dominates)
            return self._dense_curvature(assemble_gram(layout, pieces), r, s, batch.b)
        kr = gram_matvec(layout, pieces, r)
        st_kr = egn_math.apply_st(s, kr)
        sp = pieces if s is None else transform_factors(layout, pieces, s)
        sol = self._solve_system(batch.b, layout, sp, r, st_kr, s)
        return self._curvature_of(sol, r, kr, s, batch.b, lambda v: gram_matvec(layout, pieces, v))

    def _curvature_of(self, sol: egn_math.SolveResult, r: Tensor, kr: Tensor, s: Tensor | None, b: int,
                      apply_k: Callable[[Tensor], Tensor]) -> _Curvature:
        """The curvature record of a solved system: gᵀd = −rᵀKv/b from the K·r already formed ((Kr)ᵀv: K is
        symmetric), and (Jd)ᵀQ(Jd) from Jd = Kv (``apply_k``: one more product) only with adaptive damping (it
        feeds only ρ); NaN for both where the solve failed."""
        if not sol.ok:
            return _Curvature(r=r, s=s, sol=sol, gtd=float("nan"), jd_qq=float("nan"))
        gtd = egn_math.directional_derivative(sol.v, kr, b)
        jd_qq = float(egn_math.q_norm_sq(s, apply_k(sol.v))) if self.config.adaptive_damping else float("nan")
        return _Curvature(r=r, s=s, sol=sol, gtd=gtd, jd_qq=jd_qq)

    def _dense_curvature(self, k: Tensor, r: Tensor, s: Tensor | None, b: int) -> _Curvature:
        """:meth:`_solve` of a small system from K whole (the general path's assembled K, or the step plan's
        kept one): K·r a mat-vec, the SPD solve from K, then :meth:`_curvature_of` with Jd = Kv."""
        kr = k @ r
        sol = egn_math.solve_coefficients(k, r, s, b, self.damping, max_retries=self.config.max_solve_retries, kr=kr)
        return self._curvature_of(sol, r, kr, s, b, k.__matmul__)

    def _solve_kronecker(self, g: Tensor, r2: Tensor) -> _Curvature:
        """:meth:`_solve` when K = G ⊗ I_c (:func:`kronecker_sample_gram`; Q = I): K + bλI = (G + bλI) ⊗ I_c,
        so the system is c right-hand sides (R = r as [b, c]) of one b×b Cholesky factor, and K·X = G X.
        Linear regression at b = 64, c = 4: a 64×64 factorization instead of 256×256 (~30 vs ~600 us)."""
        b = r2.shape[0]
        r = r2.reshape(-1)
        kr = g @ r2
        # the solve writes bλ into its matrix's diagonal: a copy where G itself is needed again
        base = g.clone() if self.config.adaptive_damping else g
        sol = egn_math.solve_damped(base, r2, kr, None, b, self.damping, max_retries=self.config.max_solve_retries)
        sol.v = sol.v.reshape(-1)
        if not sol.ok:
            return _Curvature(r=r, s=None, sol=sol, gtd=float("nan"), jd_qq=float("nan"))
        gtd = egn_math.directional_derivative(sol.v, kr.reshape(-1), b)
        jd_qq = float("nan")
        if self.config.adaptive_damping:
            jd_qq = float(egn_math.q_norm_sq(None, (g @ sol.v.view(b, -1)).reshape(-1)))
        return _Curvature(r=r, s=None, sol=sol, gtd=gtd, jd_qq=jd_qq)

    def _solve_system(self, b: int, layout: GramLayout, sp: GramFactors, r: Tensor, st_kr: Tensor,
                      s: Tensor | None, operator: Callable[[], GramOperator | ChainOperator] | None = None,
                      lower32: Callable[[], Tensor] | None = None) -> egn_math.SolveResult:
        """The damped system, in the cheapest way expected to reach float64 accuracy (the same choice on
        every rank: it depends only on the gathered factors and on state every rank shares).

        1. Float64 systems of size ≥ :data:`CG_MIN_SIZE`: conjugate gradients with the factor mat-vec
           (:func:`egn_math.solve_damped_cg`, forward error ≤ CG_TOL·‖x‖ guaranteed), within
           :func:`_cg_budget` mat-vecs. If it does not converge (a small λ), the direct solve below is
           used and CG is not tried again for :data:`CG_PAUSE_STEPS` solves (at W > 1 on every rank, from the
           step after any rank's did not: :meth:`_pause_cg`).
        2. Float64 systems of size ≥ :data:`MIXED_MIN_SIZE`: float32 assembly and Cholesky, refined with
           the exact float64 mat-vec; if that cannot reach float64 accuracy, 3.
        3. Assembly and Cholesky in the solve dtype (with the λ×10 retries).

        ``operator`` makes x ↦ SᵀKS x for 1. and 2. (default: a ``GramOperator`` of ``sp``), ``lower32`` the float32
        lower triangle of 2. (default: ``assemble_gram`` of ``sp`` in float32; the step plan's kept buffers, the
        same bits).
        """
        args = (r, st_kr, s, b, self.damping)
        retries = self.config.max_solve_retries
        n = st_kr.numel()  # the system's size, bc'
        mixed = r.dtype == torch.float64 and n >= MIXED_MIN_SIZE
        # only the iterative solves apply it (``operator``: the step plan's, on kept buffers, the same products)
        op = (GramOperator(layout, sp) if operator is None else operator()) if mixed else None
        if op is not None and n >= CG_MIN_SIZE:
            budget = _cg_budget(layout, n, op)
            if self._cg_pause > 0:
                self._cg_pause -= 1
            elif budget >= CG_MIN_BUDGET:
                sol = egn_math.solve_damped_cg(op, *args, max_iter=budget)
                if sol.ok:
                    return sol
                self._pause_cg()
                log.info("EGN: conjugate gradients did not converge in %d mat-vecs (system %d, λ=%.3g); "
                         "solving directly for the next %d steps", sol.cg_iterations, n, self.damping,
                         CG_PAUSE_STEPS)
        if op is not None:
            base32 = (assemble_gram(layout, factors_to(sp, torch.float32), lower_only=True) if lower32 is None
                      else lower32())
            sol = egn_math.solve_damped(base32, *args, max_retries=retries, apply_base=op)
            if not sol.refine_failed:
                return sol
            log.info("EGN: float32 factorization + refinement did not reach float64 accuracy "
                     "(bc=%d, λ=%.3g); solving in float64", r.numel(), self.damping)
        return self._direct_solve(assemble_gram(layout, sp, lower_only=True), r, st_kr, s, b)

    def _pause_cg(self) -> None:
        """Conjugate gradients did not converge: not tried again for :data:`CG_PAUSE_STEPS` solves. At W > 1 this
        rank's verdict rides the template's all-reduce and every rank pauses when any did (:meth:`_reduce_record`):
        a verdict from rank-local bits (another BLAS kernel, thread count or device rounds the same system
        differently) paused one rank alone, and a checkpoint, which saves rank 0's pause, resumed the others on
        another solve path than their uninterrupted run."""
        ps = self._pass
        if ps is not None and self.comm.world_size > 1:
            ps.cg_failed = True
        else:
            self._cg_pause = CG_PAUSE_STEPS

    def _reduce_record(self, views: list[BlockView], local_error: BaseException | None) -> StepRecord:
        """The template's all-reduce; then the conjugate-gradient pause, from every rank's verdict (:meth:`_pause_cg`),
        the same on every rank (undone with the step's other values where it raises later)."""
        reduced = super()._reduce_record(views, local_error)
        if isinstance(reduced, _EGNRecord) and reduced.cg_failed > 0:
            self._cg_pause = CG_PAUSE_STEPS
        return reduced

    def _direct_solve(self, base: Tensor, r: Tensor, st_kr: Tensor, s: Tensor | None, b: int) -> egn_math.SolveResult:
        """:meth:`_solve_system`'s direct solve (step 3) from ``base``, the lower triangle of SᵀKS (K where ``s``
        is None) in the solve dtype: the general path's assembly, or the step plan's kept one (overwritten)."""
        return egn_math.solve_damped(base, r, st_kr, s, b, self.damping, max_retries=self.config.max_solve_retries)

    # -- 4. d = Jᵀv (and g = −Jᵀr/b with momentum): this rank's samples, from its factors ------
    def _vjps(self, batch: _Batch, curv: _Curvature, pieces: GramFactors) -> list[list[Tensor | None]]:
        """d = Jᵀv in the solve's dtype where it is wider than the model's (:meth:`_wide_dtype`: the default
        float64 solve of a float32 or bf16 model), from the solve's own factors (``pieces``: no conversion),
        rounded to the parameters' dtypes by the exchange after the sum over ranks. Why: with a small λ, v
        carries the part of r outside the range of K divided by bλ (b > the parameters per output: a
        rank-deficient batch), which Jᵀ annihilates, over the whole batch; in float32 the rounding of that
        cancellation was multiplied by 1/(bλ): linear least squares b = 64 > d = 9, λ = 1e-5: the parameters
        4e-3 off the float64 run after 8 steps, λ = 1e-8: 400% (float32 storage alone: 2e-8; now 2e-8, also at
        W = 2, where rounding each rank's part before the sum left 5.6e-4 and 66%). g = −Jᵀr/b (momentum) has
        no 1/(bλ): its rounding is a float32 gradient's, as backprop's, so it is formed in the model's dtype."""
        lo, hi = batch.start * batch.c, (batch.start + batch.b_r) * batch.c
        whole = lo == 0 and hi == curv.sol.v.numel()  # one process: its rows are all of them (no slice op)
        wide = self._wide_dtype(batch)
        dt = batch.z.dtype if wide is None else wide
        factors, rows = (None, None) if wide is None else self._wide_factors(batch, pieces, wide, whole)
        v_local = _as((curv.sol.v if whole else curv.sol.v[lo:hi]).view(batch.b_r, batch.c), dt)
        with grad_off():
            channels: list[list[Tensor | None]] = [self._vjp(batch, v_local, factors, rows)]
            if float(self.param_groups[0]["momentum"]) > 0:
                r_local = (curv.r if whole else curv.r[lo:hi]).view(batch.b_r, batch.c).to(batch.z.dtype)
                # 2^e g (egn_math.gradient_scale): a division by −b/2^e rounds as −r/b, scaled exactly
                scale = egn_math.gradient_scale(batch.f0, batch.z.dtype)
                channels.append(self._vjp(batch, r_local / (-batch.b / scale)))
        return channels

    def _wide_dtype(self, batch: _Batch) -> torch.dtype | None:
        """The solve's dtype where it is wider than the model's outputs' (Jᵀv is formed and summed in it), else
        None; the same on every rank (a Python comparison: torch.promote_types is an ATen call)."""
        solve = self._solve_dtype()
        return solve if torch.finfo(solve).bits > torch.finfo(batch.z.dtype).bits else None

    @staticmethod
    def _wide_factors(batch: _Batch, pieces: GramFactors, dt: torch.dtype,
                      whole: bool) -> tuple[list[tuple[Tensor, Tensor]], Tensor | None]:
        """This rank's factors in ``dt``: its samples' rows of the gathered ones (already in the solve dtype, the
        same values as its own factors), shaped as :meth:`_local_factors` keeps them."""
        lo, hi = batch.start, batch.start + batch.b_r
        factors = [(_as(a if whole else a[lo:hi], dt), _as(d if whole else d[lo:hi], dt)) for a, d in pieces.linear]
        rows = pieces.rows
        if rows is not None:
            rows = _as(rows if whole else rows[lo * batch.c:hi * batch.c], dt)
        return factors, rows

    def _vjp(self, batch: _Batch, cot: Tensor, factors: list[tuple[Tensor, Tensor]] | None = None,
             rows: Tensor | None = None) -> list[Tensor | None]:
        """Jᵀu for this rank's samples (u = ``cot`` [b_r, c]) from the captured factors (``factors``, ``rows``:
        ``batch``'s in ``cot``'s dtype, the blocks then left in it; None: ``batch``'s own, the blocks in the
        parameters' dtypes), without a backward pass: per Linear,
        Σ_{i,t} m_it ⊗ [a_it; 1] with m_it = Σ_k u_ik δ_ikt (one batched GEMM over the samples, then one GEMM
        over b·T); per Embedding, m_it summed into the table's rows idx_it (a [V, d] tensor, the weight's shape);
        and J_restᵀu from the explicit rows for the other parameters."""
        b, c = cot.shape
        keep = factors is not None  # wide blocks: the exchange rounds them after the sum over ranks
        if factors is None:
            factors, rows = batch.local_factors, batch.local_rows
        grads = self._factor_vjp(factors, batch.cap.identity_site, cot, keep)
        if rows is not None:
            flat = cot.reshape(1, b * c) @ rows.reshape(b * c, rows.shape[-1])
            off = 0
            for name in self._explicit:
                p = self._trainable[name]
                # a copy, not a view of ``flat``: the exchange writes into the blocks it is handed (a wide
                # block is copied by the exchange's rounding or packing)
                piece = flat[0, off:off + p.numel()].reshape(p.shape)
                grads[id(p)] = piece if keep else piece.to(p.dtype, copy=True)
                off += p.numel()
        # a frozen parameter has no column in J: None, a zero block at its owner (it does not move)
        return [grads.get(id(p)) for p in self._params]

    def _factor_vjp(self, factors: list[tuple[Tensor, Tensor]], identity: int, cot: Tensor,
                    keep: bool = False) -> dict[int, Tensor]:
        """:meth:`_vjp`'s part from the Gram factors: {id(parameter): its block of Jᵀu} per factored one, in
        the parameter's dtype (``keep``: in ``cot``'s)."""
        b, c = cot.shape
        grads: dict[int, Tensor] = {}
        for i, ((weight, bias), (a, delta)) in enumerate(zip(self._site_params, factors)):
            t, d_in, d_out = a.shape[1], a.shape[2], delta.shape[3]
            if i == identity:  # Δ_i = I (T = 1, d_out = c): m = u, the bmm would copy it
                m = cot
            else:
                m = torch.bmm(cot.unsqueeze(1), delta.reshape(b, c, t * d_out)).reshape(b * t, d_out)
            if weight is not None and self._sites[i].vocab:  # an embedding: m_it summed into the rows idx_it
                # summed in m's dtype (a bf16 table would round at every repeat), in a fixed order
                table = add_rows(m.new_zeros(weight.shape), a.reshape(-1).long(), m)
                grads[id(weight)] = _as(table, None if keep else weight.dtype)
            elif weight is not None:
                grads[id(weight)] = _as(m.T @ a.reshape(b * t, d_in), None if keep else weight.dtype)
            if bias is not None:
                grads[id(bias)] = _as(m.sum(dim=0), None if keep else bias.dtype)
        return grads

    # -- 6. step size and damping: identical on every rank ----------------------------------
    def _jd_q_norm(self, batch: _Batch, curv: _Curvature, d_full: list[Tensor]) -> float:
        """(Jd)ᵀQ(Jd) for the momentum direction: Jd of this rank's samples from its factors, one all-reduce."""
        def local() -> list[float]:
            with grad_off():
                jd = self._jvp(batch, d_full)
            s_local = None if curv.s is None else curv.s[batch.start:batch.start + batch.b_r]
            return [float(egn_math.q_norm_sq(s_local, jd.reshape(-1).to(self._solve_dtype())))]
        return self._sum_together(local, 1, "computing (Jd)ᵀQ(Jd) for adaptive damping")[0]  # collective

    def _jvp(self, batch: _Batch, d_full: list[Tensor]) -> Tensor:
        """J·d for this rank's samples [b_r, c] from the captured factors: the adjoint of :meth:`_vjp`. Per
        Linear, Σ_t δ_it·(dW a_it + db); per Embedding, Σ_t δ_it·dE[idx_it]; for the other parameters, the
        explicit rows times d. The factors are the J the system was built from, so no forward-mode pass is
        needed (torch's forward-mode AD lacks ops that the capture handles, e.g. nn.EmbeddingBag, torch.cdist)."""
        b, c = batch.b_r, batch.c
        jd = torch.zeros(b, c, dtype=batch.z.dtype, device=batch.z.device)
        for site, (i_w, i_b), (a, delta) in zip(self._sites, self._site_index, batch.local_factors):
            t, d_out = a.shape[1], delta.shape[3]
            u = torch.zeros(b, t, d_out, dtype=delta.dtype, device=delta.device)  # dW a_it + db
            if i_w is not None and site.vocab:  # an embedding: the rows idx_it of dE
                u = u + _as(d_full[i_w], delta.dtype)[a.reshape(b, t).long()]
            elif i_w is not None:
                u = u + a @ _as(d_full[i_w], a.dtype).T
            if i_b is not None:
                u = u + _as(d_full[i_b], a.dtype)
            jd += torch.bmm(delta.reshape(b, c, t * d_out), u.reshape(b, t * d_out, 1)).view(b, c)
        if batch.local_rows is not None:
            d_rest = torch.cat([d_full[self._index[n]].reshape(-1) for n in self._explicit])
            rows = batch.local_rows.reshape(b * c, batch.local_rows.shape[-1])  # (not -1: b may be 0 here)
            jd += (rows @ _as(d_rest, batch.local_rows.dtype)).view(b, c)
        return jd

    def _step_size(self, trial: Callable[[float], tuple[float, float]], f0: float,
                   dtype: torch.dtype) -> tuple[float, float, int]:
        """(α, L_b(w0 + αd), trials): Armijo backtracking from the previous α, or α = lr with one trial
        (for ρ, and so that a step to a non-finite loss is never taken). ``trial(α)`` puts w0 + αd in place and
        returns its loss and the gᵀd to test it against (the one every rank agreed on: :meth:`_agreed_trials`);
        ``f0`` = L_b(w0), ``dtype`` the outputs' (its rounding is the test's slack)."""
        cfg = self.config
        lr = float(self.param_groups[0]["lr"])
        if not cfg.line_search:
            return lr, trial(lr)[0], 0
        # α = 0 (lr = 0 at the start of a warm-up) must not pin every later α at 0: restart from lr.
        prev = min(self.alpha, lr) if self.alpha > 0 else lr
        alpha = min(cfg.ls_increase * prev, lr) if cfg.ls_reset == "increase" else prev
        # the loss's rounding, relative: its terms are nonnegative, so their sum rounds (on any rank
        # split) within a few eps of its own value. An absolute floor (max(1, |f0|)) let a bf16 loss of
        # 0.026 pass a trial at 0.041 (0.031 of slack below a loss of 1).
        slack = torch.finfo(dtype).eps * abs(f0) * 4
        f_new, tries = float("nan"), 0
        for i in range(cfg.max_ls):  # (the number of trials, each an all-reduce, read from agreed values only)
            f_new, gtd = trial(alpha)
            tries += 1
            if egn_math.armijo_ok(f_new, f0, alpha, gtd, cfg.armijo_c, slack):
                break
            if i < cfg.max_ls - 1:
                alpha *= cfg.ls_decrease
        return alpha, f_new, tries

    def _agreed_trials(self, batch: _Batch, dec: _EGNDecision) -> Callable[[float], tuple[float, float]]:
        """:meth:`_step_size`'s trial: (L_b(w0 + αd), the gᵀd its Armijo test reads). The first trial's all-reduce
        carries rank 0's gᵀd and (Jd)ᵀQ(Jd), which replace ``dec``'s: every rank solved the system itself, so
        without momentum these are its own solve's (``_Curvature``), and a solve that rounds differently on one
        rank (another BLAS kernel, thread count or device) made its Armijo test, and so its number of trials and
        their all-reduces, differ (gloo: an abort, NCCL: a hang), and its λ from ρ drift. Rank 0's value, the
        others adding zeros, is exact: where the solves agree, the step is the same bit for bit."""
        w0, full = dec.w0, dec.full
        agreed = [False]

        def trial(alpha: float) -> tuple[float, float]:
            if agreed[0]:
                return self._trial_loss(batch, w0, full, alpha)[0], dec.gtd
            agreed[0] = True
            f, dec.gtd, dec.jd_qq = self._trial_loss(batch, w0, full, alpha, (dec.gtd, dec.jd_qq))
            return f, dec.gtd
        return trial

    def _trial_loss(self, batch: _Batch, w0: list[Tensor], d: list[Tensor], alpha: float,
                    rank0: tuple[float, ...] = ()) -> list[float]:
        """[L_b(w0 + αd), *rank 0's ``rank0``]: a local forward and one scalar all-reduce (every rank, same order),
        where the other ranks add zeros to rank 0's values (a sum with zeros is exact)."""
        def local() -> list[float]:
            with self._autograd_free(batch.xs), grad_off():  # inference mode (a chain) or no_grad
                torch._foreach_copy_(self._params, torch._foreach_add(w0, d, alpha=alpha))
                f = float(egn_math.loss_sum(self.config.loss, self._outputs(batch.xs), batch.y))
            return [f, *(rank0 if self.comm.rank == 0 else [0.0] * len(rank0))]
        red = self._sum_together(local, 1 + len(rank0), "in a line-search trial's forward")  # collective
        return [red[0] / batch.b, *red[1:]]

    def _outputs(self, xs: tuple[Tensor, ...]) -> Tensor:
        """The model's outputs, nothing captured: through the planned chain's modules where it applies
        (the same forwards without the module-call machinery)."""
        if self._chain is not None and self._use_chain(xs):
            return self._chain.forward(xs[0])[0]  # a line-search trial: the outputs only
        rng = self._pass.rng if self._pass is not None else None
        with rng if rng is not None else contextlib.nullcontext():  # the step's first draw again, if one drew
            z: Tensor = self.model(*xs)                              # (egn_rng)
        return z

    def _adapt_damping(self, b: int, f0: float, dtype: torch.dtype, gtd: float, jd_qq: float, alpha: float,
                       f_new: float) -> float:
        """ρ from the actual and predicted change; λ follows it (adaptive damping only). ``b``: the global batch,
        ``f0`` = L_b(w), ``dtype`` the outputs' (the losses' rounding)."""
        cfg = self.config
        if not cfg.adaptive_damping:
            return float("nan")
        # the rounding of the two loss values: changes below it are noise, not a verdict (relative, so
        # that a small loss is judged as a large one would be)
        resolution = torch.finfo(dtype).eps * max(abs(f0), abs(f_new)) * 4
        rho = egn_math.gain_ratio(f_new - f0, egn_math.model_change(gtd, jd_qq, alpha, b), resolution)
        self.damping = egn_math.update_damping(
            self.damping, rho, rho_low=cfg.rho_low, rho_high=cfg.rho_high, increase=cfg.damping_increase,
            decrease=cfg.damping_decrease, lo=cfg.damping_min, hi=cfg.damping_max)
        return rho
