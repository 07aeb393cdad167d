"""EGN's step plan: one process training a plain MLP (an ``nn.Sequential`` of ``nn.Linear`` layers and
element-wise activations, or one ``nn.Linear``, or a module that runs such children one after the other on its
input: a ``LightningModule`` with ``self.head(self.body(x))``) on the CPU steps without the sharded template.

Why: on a small model an EGN step is its fixed costs, not its arithmetic. The synthetic 20-32-32-2 MLP at b = 32
made 175 ATen calls and ~900 Python calls a step; the template's machinery (agreement tables, step records, block
views, the owner exchange, the capture objects) and the views, reshapes and allocations of the small products
were about half of them. What they decide is fixed for such a model on one process: no rank to agree with, every
block a whole parameter, back-signals by the chain rule (:mod:`~lightning_soaa.optim.egn_chain`). The plan
decides that once (:meth:`StepPlan.build`, cached by the optimizer) and keeps what a step would rebuild: the
forward as the modules' own ATen calls on the parameters themselves, the operands of K and Jᵀv in buffers
(:class:`~lightning_soaa.functional.chain_gram.ChainWork`, per batch shape), the direction d = Jᵀv in one flat
buffer per dtype (its finiteness read from it whole, its blocks views of it).

The arithmetic is the general path's, call for call: the same kernels on operands of the same values and
layouts, in the same order, so a planned step takes the same bits (``benchmarks/egn_bit_identity.py``). The
general path's own functions do the rest: the solve of every system but a small dense one (:meth:`EGN._solve`),
the momentum (:meth:`EGN._add_momentum`), the direction's choice, the line search (:meth:`EGN._step_size`), the
commit of momentum, λ and the statistics (:meth:`EGN._commit`), the roll-back of a step that raised.

A step first checks, without reading a tensor's values, that it is the one planned (:meth:`StepPlan.usable`):
``step(inputs=x, targets=y)`` with plain tensors and no closure or pending batch; the model's modules, classes,
parameters and hooks as planned; the general path's checks of the parameters and groups passing; one process (no
process group of several ranks to join), no autocast region, no interrupted update. Anything else declines, as
does a batch the general path refuses before a parameter moves (targets out of range, a batch too large for
``max_gram_size``, a forward that raises other than out of memory): the general path then takes the whole step,
with its messages, skips and errors. Any other error (an out of memory, a Ctrl+C) is raised with the step put back
as the general path puts it back. The plan is EGN's shortcut past the template (``_planned_step``, which the
tests turn off to compare it with the template, as SOAA's).

A wrapper's forward is Python, so it is run, not assumed: every forward of its planned steps is the model's own,
with its planned children standing in for themselves and checked to have been the chain on that very input
(:mod:`~lightning_soaa.optim.egn_wrapped`); one that was not puts the step back, declines, and the plan is not
used again. The report's digits ``DigitsMLP`` (64-128-128-10, ``self.head(self.body(x))``, b = 32, EGN-m) took the
general (traced) path before; through the plan its step is 0.83-0.84x that path's CPU time, the same bits
(``egn_step_floor.py --routes --model report``, alternated in one process, load 11-12: 4.51 vs 5.33 and 5.65 vs
6.64 ms medians), and 1.07x the step of the same layers as an ``nn.Sequential`` (its forward run and checked).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812 - torch's own alias
from torch.nn.modules import module as _module

from lightning_soaa.distributed.comm import LocalComm, default_group_ready
from lightning_soaa.functional import egn as egn_math
from lightning_soaa.functional.chain_gram import ChainSystem, ChainWork
from lightning_soaa.functional.gram import GramFactors, _row_blocks, gram_matvec
from lightning_soaa.optim import egn as egn_module
from lightning_soaa.optim.base import host_floats
from lightning_soaa.optim.egn import _UNDONE, EGN, _Batch, _Curvature, _EGNRecord, _Undo
from lightning_soaa.optim.egn_chain import Chain, back_signals
from lightning_soaa.optim.egn_wrapped import Concurrent, NotPlanned, WrappedForward, plan_pieces
from lightning_soaa.optim.param_checks import check_step

__all__ = ["StepPlan"]

_LINEAR, _ACTIVATION, _IDENTITY = 0, 1, 2

#: what ``m.forward`` of each planned activation calls (nn.ReLU: ``F.relu(x, inplace=False)``, i.e. torch.relu)
_FORWARDS: dict[type[nn.Module], Callable[[Tensor], Tensor]] = {
    nn.Tanh: torch.tanh, nn.Sigmoid: torch.sigmoid, nn.ReLU: torch.relu}

_data_ptr = Tensor.data_ptr
#: ``torch.inference_mode``'s own guard (what its ``__enter__`` makes), without the Python context manager around it
_inference_mode = torch._C._InferenceMode
_signature = operator.attrgetter("shape", "dtype", "requires_grad")

#: the direction's blocks start this many elements apart in their flat buffer: 256 bytes of float32, a multiple of
#: the 64 bytes to which torch's CPU allocator aligns every tensor (:meth:`StepPlan._flat`)
ALIGN = 64

#: batch shapes whose buffers a plan keeps (a data loader's last, smaller batch is a second shape)
MAX_SHAPES = 4


class _Solved(NamedTuple):
    """What a step's pure part (:meth:`StepPlan._curvature`) hands to the rest of it."""

    f0: float  # L_b(w)
    z: Tensor  # the outputs [b, c]
    y: Tensor  # the targets (in the outputs' dtype where floating)
    curv: _Curvature
    nonfinite: Tensor  # 0-d: True where d has a non-finite entry
    direction: list[Tensor]  # d = Jᵀv per parameter (views of the flat buffer of the parameters' dtype)
    grads: list[Tensor]  # g = −Jᵀr/b per parameter (momentum only; else empty)
    saved: list[Tensor]  # every module's input
    deltas: list[Tensor | None]  # the back-signals per site in the model's dtype (None: the identity)


class _Sized:
    """The batch size, all :meth:`EGN._solve` reads of its batch."""

    __slots__ = ("b",)

    def __init__(self, b: int) -> None:
        self.b = b


class StepPlan:
    """The planned step of one EGN (see the module docstring); made by :meth:`build`, used by ``EGN.step``."""

    def __init__(self, opt: EGN, chain: Chain, pieces: list[nn.Module] | None = None) -> None:
        self.chain = chain
        self._capture = (opt._chain, opt._sites)  # the capture plan this plan follows
        self.modules = chain.modules
        self.types = tuple(map(type, chain.modules))
        # the forward, per module: (_LINEAR, weight, bias), (_ACTIVATION, its forward, None) or
        # (_IDENTITY, None, None) for nn.Identity and nn.Dropout, the identity in eval mode (the step's mode)
        self.program: list[tuple[int, Any, Any]] = []
        for m in chain.modules:
            if type(m) is nn.Linear:
                self.program.append((_LINEAR, m.weight, m.bias))
            elif type(m) in _FORWARDS:
                self.program.append((_ACTIVATION, _FORWARDS[type(m)], None))
            else:
                self.program.append((_IDENTITY, None, None))
        # what _module_as_planned reads at every step: the root's and the modules' hook, instance and parameter dicts
        root = chain.root  # (None: a wrapper's chain, whose modules self.wrapped checks)
        self.root_type = type(root)
        mods = () if root is None else chain.modules if root is chain.modules[0] else (root, *chain.modules)
        self._hook_dicts = [getattr(m, a) for m in mods for a in
                            ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")]
        self._instance_dicts = [m.__dict__ for m in mods]
        self._held = None if root is None or root is chain.modules[0] else root._modules
        linears = [m for m in chain.modules if type(m) is nn.Linear]
        self._param_dicts = [m._parameters for m in linears for _ in range(2)]
        self._param_names = ["weight", "bias"] * len(linears)
        self._slot_params = [getattr(m, name) for m in linears for name in ("weight", "bias")]
        self.site_inputs = [j for j, i in enumerate(chain.site_of) if i >= 0]  # the module of each site
        self.params = list(opt._params)
        self.dtype = self.params[0].dtype
        self.device_index = self.params[0].get_device()
        self.identity = chain.site_of[-1]  # the site whose back-signal is the identity (the last Linear), or -1
        index = {id(p): i for i, p in enumerate(self.params)}
        # per site: the direction's blocks it writes (positions among the parameters; None: not trained)
        self.site_blocks = [(None if w is None else index[id(w)], None if b is None else index[id(b)])
                            for w, b in opt._site_params]
        self._flats: dict[torch.dtype, tuple[Tensor, list[Tensor]]] = {}
        self._works: dict[tuple[int, int, torch.dtype], ChainWork] = {}
        self._eyes: dict[tuple[int, int], Tensor] = {}
        self._w0: list[Tensor] | None = None  # the parameters before a step's trials (_copy_of_params)
        # the parameters' signatures and the freezing when the general path's checks of them last passed
        self._checked: tuple[Any, ...] = ()
        self._active: tuple[bool, ...] | None = None
        self._groups: tuple[Any, ...] | None = None  # what _hyperparameter_error read when it last passed
        #: a wrapper's forward, run and checked at every forward of a step (egn_wrapped); None: a plain MLP's
        self.wrapped = None if pieces is None else WrappedForward(opt.model, pieces, self.program, self.params,
                                                                  _run_span)

    @staticmethod
    def build(opt: EGN) -> StepPlan | None:
        """The plan of ``opt``'s steps, or None where they are not plannable: more than one process (or a
        communicator other than ``LocalComm``), DTensor parameters, a model that is not a planned chain
        (:func:`~lightning_soaa.optim.egn_chain.plan_chain`), blocks that are not whole parameters, parameters
        of several dtypes, or not on the CPU (the kept buffers' products were checked bit for bit against the
        general path's on the CPU's BLAS only: an accelerator's library may pick another kernel for them)."""
        chain, pieces = opt._chain, None
        if chain is None and opt._trace is not None:  # a wrapper of its chain (egn_wrapped)
            got = plan_pieces(opt.model, opt._sites)
            if got is None or not _holds_all(got[0], opt._params):
                return None
            chain, pieces = got
        if (chain is None or (pieces is None and chain.root is not opt.model) or type(opt.comm) is not LocalComm
                or opt._dtensor is not None or opt._explicit or any(s.vocab for s in opt._sites)
                or len(opt._owned) != len(opt._params)
                or any(b.dim is not None or b.param_index != i for i, b in enumerate(opt._owned))
                or len({p.dtype for p in opt._params}) != 1 or not all(p.device.type == "cpu" for p in opt._params)):
            return None
        # the plan keeps the Parameters the modules hold now for its forward, and checks at every step that they
        # still hold them: made at the first step after load_state_dict(..., assign=True), it ran the model's new
        # ones and stepped EGN's (the model never moved). Declined, the general path refuses that, naming it.
        if opt._places.first_replaced() is not None:
            return None
        return StepPlan(opt, chain, pieces)

    # ------------------------------------------------------------------ is this step the planned one?
    def usable(self, opt: EGN, x: Any, y: Any) -> bool:
        """Whether this step may run as planned: the general path's checks at its start pass (the parameters,
        the groups, the module's places and hooks, the freezing) and nothing it would decide otherwise (a joined
        process group, an autocast region, a tuple of inputs) is there. Changes nothing."""
        if type(x) is not Tensor or type(y) is not Tensor or x.dim() != 2 or y.dim() == 0:
            return False
        if x.layout is not torch.strided or y.layout is not torch.strided:  # sparse: the general path's error
            return False
        # column-major inputs (x.T of a batch, a Fortran-ordered array): the general path's factors keep their
        # strides (``to`` preserves a dense layout) and the BLAS sums A·Aᵀ in another order for them than for the
        # row-major copies in the kept buffers, so the last bits of v, gᵀd and ρ differed; rare enough to decline
        if not x.is_contiguous():
            return False
        if (x.shape[0] != y.shape[0] or x.dtype != self.dtype or x.get_device() != self.device_index
                or y.get_device() != self.device_index):
            return False
        d = opt.__dict__
        if (d.get("_caller_autocast") or d.get("_interrupted") is not None or d.get("_optimizer") is not None
                or opt._chain is not self._capture[0] or opt._sites is not self._capture[1] or "grad_scale" in d
                or "found_inf" in d or d.get("_amp_found_inf")):
            return False
        # a wrapper's forward sees x itself (the general path gives it a normal copy of an inference tensor)
        if self.wrapped is not None and x.is_inference():
            return False
        # a process group of several ranks: the general path joins it or refuses the step, collectives both (made
        # here, a refused join's meeting would be made twice); without one, EGN._join_before_step does nothing
        if default_group_ready():
            return False
        if type(opt.comm) is not LocalComm or not self._module_as_planned(opt) or not self._params_as_checked(opt):
            return False
        return self._groups_as_checked(opt)

    def _groups_as_checked(self, opt: EGN) -> bool:
        """``EGN._hyperparameter_error() is None``, asked again only where what it reads of the groups changed
        since it last passed here: the groups list, the group, its keys, its values (by identity: a scheduler's
        new lr is a new float) and the elements of its list values (``params``, ``param_names``)."""
        groups = opt.param_groups
        kept = self._groups
        if kept is not None and groups is kept[0] and len(groups) == 1:
            group = groups[0]
            if (group is kept[1] and group.keys() == kept[2] and all(map(operator.is_, group.values(), kept[3]))
                    and all(len(v) == len(was) and all(map(operator.is_, v, was)) for v, was in kept[4])):
                return True
        if opt._hyperparameter_error() is not None:
            return False
        group = groups[0]
        lists = [(v, tuple(v)) for v in group.values() if type(v) is list]
        self._groups = None if len(groups) != 1 else (groups, group, set(group), tuple(group.values()), lists)
        return True

    def _module_as_planned(self, opt: EGN) -> bool:
        """The planned modules, classes and parameters, and no hook that could change an input, an output or a
        back-signal: what ``Chain.usable``, ``changed_site`` and ``EGN._check_places`` look at (the chain's modules
        hold every parameter of the model). Read from the dicts kept at construction: torch registers a hook into
        a module's hook dict and a parameter into its parameter dict, and never replaces either."""
        if (_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks):
            return False
        if getattr(torch.nn.utils.parametrize, "_cache_enabled", 0):  # (EGN._refuse_parametrize_cache raises)
            return False
        if any(self._hook_dicts) or any("forward" in d for d in self._instance_dicts):
            return False
        if tuple(map(type, self.modules)) != self.types or type(self.chain.root) is not self.root_type:
            return False
        held = self._held
        if held is not None and (len(held) != len(self.modules) or not all(map(operator.is_, held.values(),
                                                                                self.modules))):
            return False  # (model[1] = ...: another module in the Sequential)
        if not all(map(operator.is_, map(dict.get, self._param_dicts, self._param_names), self._slot_params)):
            return False  # (a parameter replaced in its module)
        if any(hooks for _, hooks in opt.__dict__.get("_wrapper_hooks", [])):
            return False
        # a wrapper: its other modules and parameters too (EGN._check_places: the chain holds only some of them)
        return self.wrapped is None or (self.wrapped.as_planned() and opt._places.first_replaced() is None)

    def _params_as_checked(self, opt: EGN) -> bool:
        """The general path's checks of the parameters (:func:`check_step` against the signatures they were
        built with, ``_check_ties``, the freezing), made again only where an address, shape, dtype or
        ``requires_grad`` changed since they last passed here (what they read: a meta tensor has no address, and
        a parameter moved to another device has another one)."""
        params = opt._params
        now = (*map(_data_ptr, params), *map(_signature, params))
        if now == self._checked and opt._active is self._active and not any(p.requires_grad for _, p in opt._frozen):
            return True
        if opt._active != tuple(p.requires_grad for p in params) or any(p.requires_grad for _, p in opt._frozen):
            return False
        try:
            check_step(opt, opt._params, opt._names, gradients=False, built=opt.__dict__.get("_built"))
            opt._check_ties()
        except (RuntimeError, ValueError):
            return False
        self._checked, self._active = now, opt._active
        return True

    # ------------------------------------------------------------------ the forward and its factors
    def outputs(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The model's outputs z (each module's own forward, as ``model(x)`` runs it in eval mode) and every
        module's input (the chain capture's ``saved``); a wrapper's through its own forward (raising
        :class:`~lightning_soaa.optim.egn_wrapped.NotPlanned` where that was not the chain)."""
        if self.wrapped is not None:
            return self.wrapped.run(x, capture=True)
        h = x
        saved = []
        for kind, f, g in self.program:
            saved.append(h)
            if kind == _LINEAR:
                h = F.linear(h, f, g)
            elif kind == _ACTIVATION:
                h = f(h)
        return h, saved

    def trial_outputs(self, x: Tensor) -> Tensor:
        """:meth:`outputs` without the saved inputs (a line-search trial)."""
        if self.wrapped is not None:
            try:
                return self.wrapped.run(x, capture=False)[0]
            except (torch.OutOfMemoryError, NotPlanned, Concurrent):
                raise
            except Exception as e:  # a wrapper's own error: the general path's step raises it its own way
                raise NotPlanned(f"its forward raised {type(e).__name__} in a line-search trial") from e
        h = x
        for kind, f, g in self.program:
            if kind == _LINEAR:
                h = F.linear(h, f, g)
            elif kind == _ACTIVATION:
                h = f(h)
        return h

    def _eye(self, b: int, c: int, dtype: torch.dtype) -> Tensor:
        """I_c for every sample, [b, c, c], as the chain capture expands it (kept per batch shape)."""
        eye = self._eyes.get((b, c))
        if eye is None or eye.dtype != dtype:
            eye = self._eyes[(b, c)] = torch.eye(c, dtype=dtype, device=self.params[0].device).expand(b, c, c)
        return eye

    def _work(self, opt: EGN, b: int, c: int, dtype: torch.dtype, dense: bool) -> ChainWork:
        """The kept buffers of K and Jᵀv for this batch shape (at most :data:`MAX_SHAPES` shapes are kept)."""
        key = (b, c, dtype)
        work = self._works.get(key)
        if work is None or work.dense != dense:
            if len(self._works) >= MAX_SHAPES:
                self._works.clear()
            layout = opt._factor_layout(c, [1] * self.chain.num_sites)
            work = self._works[key] = ChainWork(layout.sites, b, c, dtype, self.params[0].device, self.identity,
                                                dense=dense)
        return work

    def _flat(self, dtype: torch.dtype) -> tuple[Tensor, list[Tensor]]:
        """A flat buffer of every parameter's elements in ``dtype`` and its views shaped as the parameters, each
        starting :data:`ALIGN` elements apart (as a new tensor starts: the BLAS picks its kernel, and so the
        order of its sums, by the output's alignment; ``mm(out=)`` into a view 4 bytes off differed from ``mm``
        in the last bit). The padding and a frozen parameter's block stay zero (its direction is a zero block)."""
        kept = self._flats.get(dtype)
        if kept is None:
            starts, at = [], 0
            for p in self.params:
                starts.append(at)
                at += -(-p.numel() // ALIGN) * ALIGN
            flat = torch.zeros(at, dtype=dtype, device=self.params[0].device)
            views = [flat[a:a + p.numel()].view(p.shape) for a, p in zip(starts, self.params)]
            kept = self._flats[dtype] = (flat, views)
        return kept

    # ------------------------------------------------------------------ the step
    def step(self, opt: EGN, x: Tensor, y: Tensor) -> Tensor | None:
        """``opt.step(inputs=x, targets=y)`` as the general path takes it (the same bits, state, statistics, skips
        and logs), returning L_b(w) before the step; None, with nothing changed, where it declines. A step that
        raises is put back as ``EGN._abandon`` puts it back (parameters, momentum buffers, scalars)."""
        if not self.usable(opt, x, y):
            return None
        undo = _Undo(opt.num_steps + opt.skipped_steps, _undone(opt), opt._last)
        wrapped, refused, rewind = self.wrapped, None, False
        if wrapped is not None:
            wrapped.begin(opt._draws)
        try:
            f0 = self._step(opt, x, y, undo)
            rewind = f0 is None  # (declined: the general path runs a wrapper's forward again, from the same draws)
        except NotPlanned as e:  # a wrapper's forward that was not the chain: put back, the general path's step
            refused = e
            opt._roll_back(undo)
            return None
        except BaseException as e:  # KeyboardInterrupt too: a trial's forward is most of a step
            if opt.num_steps + opt.skipped_steps == undo.counted:
                rewind = True  # (a wrapper's generator put back with the step, as the general path's)
                try:
                    opt._roll_back(undo)
                except BaseException:
                    opt._update_interrupted(e)
                    raise
            raise
        finally:
            if wrapped is not None:
                wrapped.end(refused, rewind)
        # made outside inference mode: the caller may keep it or use it in autograd
        return None if f0 is None else torch.scalar_tensor(f0, dtype=torch.float64)

    def _step(self, opt: EGN, x: Tensor, y: Tensor, undo: _Undo) -> float | None:
        """:meth:`step`'s work: the loss before the step, or None to decline (before anything changed)."""
        opt.comm.begin_step()
        with _inference_mode(True):
            got = self._curvature(opt, x, y)
        if not isinstance(got, _Solved):
            return got
        f0, z, y, curv, nonfinite, direction, grads, saved, deltas = got
        b, c = z.shape
        beta = float(opt.param_groups[0]["momentum"])
        states: list[dict[Any, Any]] = []
        rec = _EGNRecord(direction=direction)
        if beta > 0:  # (outside inference mode: the buffers are kept)
            states = [opt.state[p] for p in self.params]
            opt._add_momentum(rec, states, direction, grads, list(opt._active), beta)
        flag, rec.gtd_momentum = host_floats([nonfinite, rec.gtd_momentum])
        if flag > 0 or not math.isfinite(rec.gtd_momentum):  # the template's non-finite verdict (one process)
            opt._skip_step("non-finite gradient or statistic on 1 rank(s)")
            return f0
        dec = opt._direction_of(rec, curv.gtd, egn_math.gradient_scale(f0, z.dtype))
        with _inference_mode(True):
            w0 = dec.w0 = undo.w0 = self._copy_of_params()
            dec.jd_qq = curv.jd_qq
            if dec.use_momentum and opt.config.adaptive_damping:
                dec.jd_qq = opt._jd_q_norm(self._batch(x, y, z, f0, saved, deltas), curv, dec.direction)
            d, moved = dec.direction, [False]
            gtd = dec.gtd  # (one process: its own solve's is the agreed one)
            dec.alpha, dec.f_new, dec.tries = opt._step_size(
                lambda alpha: (self._trial(opt, x, y, b, w0, d, alpha, moved), gtd), f0, z.dtype)
            if not math.isfinite(dec.f_new):
                opt._restore(w0)
        if not math.isfinite(dec.f_new):  # never taken (EGN._decide): skipped, and λ grows
            opt._skip_step(f"non-finite loss after the step (α={dec.alpha:.3g}); the damping grows")
            opt._after_rejected_trial()
            return f0
        opt._update_clean_on_raise = True  # (as the template's _apply: a raise from here on is put back)
        opt._commit(states, dec, curv.sol, undo, b, c, f0, z.dtype)
        opt._count_step()
        return f0

    def _trial(self, opt: EGN, x: Tensor, y: Tensor, b: int, w0: list[Tensor], d: list[Tensor], alpha: float,
               moved: list[bool]) -> float:
        """L_b(w0 + αd), w0 + αd left in the parameters (``EGN._trial_loss`` of one process): added to the parameters
        in place, after w0 is put back where an earlier trial ``moved`` them (the same sums, w0 + α·d, element by
        element)."""
        if moved[0]:
            torch._foreach_copy_(self.params, w0)
        moved[0] = True
        torch._foreach_add_(self.params, d, alpha=alpha)
        return float(egn_math.loss_sum(opt.config.loss, self.trial_outputs(x), y)) / b

    def _copy_of_params(self) -> list[Tensor]:
        """w0: the parameters as they are, copied into tensors kept from step to step (``EGN._decide``'s copy)."""
        if self._w0 is None:
            self._w0 = [torch.empty_like(p) for p in self.params]
        torch._foreach_copy_(self._w0, self.params)
        return self._w0

    def _curvature(self, opt: EGN, x: Tensor, y: Tensor) -> _Solved | float | None:
        """In inference mode: the forward, the batch's checks, the factors, the solve and the direction d = Jᵀv
        (and g = −Jᵀr/b with momentum); or the step's loss where the step was skipped; or None to decline."""
        cfg = opt.config
        try:
            z, saved = self.outputs(x)
        except (torch.OutOfMemoryError, NotPlanned, Concurrent):  # raised as the general path raises it; declined
            raise
        except Exception:  # noqa: BLE001 - the general path raises it within its message, naming the forward
            return None
        b, c = z.shape
        positions = [1] * self.chain.num_sites
        try:  # what the general path refuses (with its message): it takes the step instead
            egn_math.check_outputs_targets(cfg.loss, z, y)
            opt._check_sizes(b, c, positions)
        except ValueError:
            return None
        if y.is_floating_point() and y.dtype != z.dtype:  # (the targets in the outputs' dtype)
            y = y.to(z.dtype)
        # the loss plus Σ 0·z in one host read: NaN where an output is not finite (EGN._local_batch)
        loss = float(egn_math.loss_sum(cfg.loss, z, y).add_(z.mul(0.0).sum()))
        if not math.isfinite(loss):
            opt._skip_step("non-finite model outputs or loss")
            return float("nan")
        f0 = loss / b
        deltas = back_signals(self.chain, z, saved)
        solved = self._solve(opt, z, y, saved, deltas, positions)
        if solved is None:
            return f0  # (skipped)
        curv, flat, views = solved
        grads: list[Tensor] = []
        if float(opt.param_groups[0]["momentum"]) > 0:
            grads = self._gradient(curv.r.view(b, c).to(z.dtype), [saved[j] for j in self.site_inputs], deltas,
                                   egn_math.gradient_scale(f0, z.dtype))
        # Σ 0·d: NaN where an entry of d is not finite (EGN._prepare), read with the momentum's gᵀd
        nonfinite = flat.mul(0.0).sum().ne(0.0)
        return _Solved(f0, z, y, curv, nonfinite, views, grads, saved, deltas)

    def _solve(self, opt: EGN, z: Tensor, y: Tensor, saved: list[Tensor], deltas: list[Tensor | None],
               positions: list[int]) -> tuple[_Curvature, Tensor, list[Tensor]] | None:
        """The system's solution and d = Jᵀv in the parameters' dtype (its flat buffer and the blocks' views), or
        None where the system could not be solved (the step is skipped). The factors in the solve dtype
        (``EGN._gather_factors``) are written into the kept buffers, K and Jᵀv formed there (:class:`ChainWork`);
        where the solve dtype is the model's (a float64 model, ``solve_dtype="model"``) the general path uses the
        chain's own tensors as the factors (no conversion: a copy could be aligned otherwise), and so does this."""
        cfg = opt.config
        b, c = z.shape
        dt = opt._solve_dtype()
        if dt == self.dtype:
            local = self._local_factors(z, saved, deltas)
            pieces = GramFactors(z, y, local, None, identity=self.identity)
            curv = opt._solve(_Sized(b), opt._factor_layout(c, positions), pieces)  # type: ignore[arg-type]
            if not curv.sol.ok:
                return self._unsolved(opt, curv)
            flat, views = self._flat(dt)
            blocks = opt._factor_vjp(local, self.identity, curv.sol.v.view(b, c))
            mine = [(v, blocks[id(p)]) for v, p in zip(views, self.params) if id(p) in blocks]
            torch._foreach_copy_([v for v, _ in mine], [t for _, t in mine])
            return curv, flat, views
        dense = b * c <= egn_module.SMALL_DENSE_MAX and not (cfg.loss == "mse" and len(positions) == 1)
        work = self._work(opt, b, c, dt, dense)
        for a, j in zip(work.inputs, self.site_inputs):
            a.copy_(saved[j])  # (the rounding of .to(dt): none, into a wider dtype)
        for dk, dl in zip(work.signals, deltas):
            if dl is not None:
                dk.copy_(dl)
        z64, y64 = z.to(dt), y if cfg.loss == "cross_entropy" else y.to(dt)
        if dense:
            curv = self._solve_dense(opt, work, z64, y64)
        else:
            curv = self._solve_factored(opt, work, z64, y64, positions)
        if not curv.sol.ok:
            return self._unsolved(opt, curv)
        flat, views = self._flat(dt)
        work.vjp_into(curv.sol.v.view(b, c), [None if w is None else views[w] for w, _ in self.site_blocks],
                      [None if i is None else views[i] for _, i in self.site_blocks])
        out, views = self._flat(self.dtype)
        out.copy_(flat)  # rounded to the parameters' dtype at once (each block's .to(dtype) in the exchange)
        return curv, out, views

    def _solve_factored(self, opt: EGN, work: ChainWork, z: Tensor, y: Tensor, positions: list[int]) -> _Curvature:
        """``EGN._solve`` of a larger system (bc > ``SMALL_DENSE_MAX``) from the factors, where K is not G ⊗ I_c
        (one Linear under MSE: ``EGN._solve`` itself): K·r and the factors of SᵀJ in kept buffers
        (:class:`ChainSystem`); a system solved directly (bc' below ``MIXED_MIN_SIZE`` in float64) from the lower
        triangle of SᵀKS assembled there (``EGN._direct_solve``), a larger one by ``EGN._solve_system`` with the
        kept operator x ↦ SᵀKS x (:class:`ChainOperator`) for its conjugate gradients and refinement."""
        cfg = opt.config
        b, c = z.shape
        layout = opt._factor_layout(c, positions)

        def pieces() -> GramFactors:  # the buffers as the general path's factors (shaped as the chain keeps them)
            factors = [(a.unsqueeze(1), dk.unsqueeze(2)) for a, dk in zip(work.inputs, work.signals)]
            return GramFactors(z, y, factors, None, identity=self.identity)

        cp = c - 1 if cfg.loss == "cross_entropy" else c  # SᵀJ's rows per sample (ce_factor's c − 1)
        if b * c > cfg.max_gram_size or (cfg.loss == "mse" and len(positions) == 1):
            return opt._solve(_Sized(b), layout, pieces())  # type: ignore[arg-type]
        iterative = z.dtype == torch.float64 and b * cp >= egn_module.MIXED_MIN_SIZE  # (EGN._solve_system's 1., 2.)
        r2, s = egn_math.residual_and_factor(cfg.loss, z, y)
        system = work.system
        if system is None or system.cp != cp:
            blocks = None if iterative else _row_blocks(b, cp, lower_only=True)
            system = work.system = ChainSystem(work, cp, blocks)
        r = r2.reshape(-1)
        kr = system.gram_matvec(r).view(-1)
        st_kr = egn_math.apply_st(s, kr)
        signals = system.transform(None if s is None else s.transpose(1, 2))
        if iterative:
            sp = GramFactors(z, y, [(a.unsqueeze(1), d.unsqueeze(2)) for a, d in zip(work.inputs, signals)], None)
            blocks32 = _row_blocks(b, cp, lower_only=True)  # (assemble_gram's staircase in float32)
            sol = opt._solve_system(b, layout, sp, r, st_kr, s, system.apply,
                                    lambda: system.gram_lower_in(torch.float32, blocks32))
        else:
            sol = opt._direct_solve(system.gram_lower(), r, st_kr, s, b)
        return opt._curvature_of(sol, r, kr, s, b, lambda v: gram_matvec(layout, pieces(), v))

    @staticmethod
    def _unsolved(opt: EGN, curv: _Curvature) -> None:
        opt._skip_step(f"the bc system could not be solved after {curv.sol.fallbacks} damping retries")

    def _solve_dense(self, opt: EGN, work: ChainWork, z: Tensor, y: Tensor) -> _Curvature:
        """``EGN._solve`` of a small system (bc ≤ ``SMALL_DENSE_MAX``): K whole (:meth:`ChainWork.gram`), K·r a
        mat-vec, the SPD solve from K (:func:`~lightning_soaa.functional.egn.solve_coefficients`), gᵀd = −rᵀKv/b."""
        r2, s = egn_math.residual_and_factor(opt.config.loss, z, y)
        return opt._dense_curvature(work.gram(), r2.reshape(-1), s, work.b)

    def _gradient(self, r: Tensor, inputs: list[Tensor], deltas: list[Tensor | None], scale: float) -> list[Tensor]:
        """``scale``·g, g = −Jᵀr/b per parameter in the model's dtype, from the factors in it (``EGN._vjps``' second
        channel: the momentum's gᵀd; ``scale`` a power of two, egn_math.gradient_scale); a frozen parameter's is a
        zero block."""
        b = r.shape[0]
        cot = r / (-b / scale)
        blocks: list[Tensor | None] = [None] * len(self.params)
        for (i_w, i_b), a, delta in zip(self.site_blocks, inputs, deltas):
            m = cot if delta is None else torch.bmm(cot.unsqueeze(1), delta).reshape(b, delta.shape[2])
            if i_w is not None:
                blocks[i_w] = m.T @ a
            if i_b is not None:
                blocks[i_b] = m.sum(dim=0)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, blocks)]

    def _batch(self, x: Tensor, y: Tensor, z: Tensor, f0: float, saved: list[Tensor],
               deltas: list[Tensor | None]) -> _Batch:
        """The general path's record of this batch (for ``EGN._jd_q_norm``: J·d from the factors in the model's
        dtype, shaped as the chain capture keeps them)."""
        b, c = z.shape
        factors = self._local_factors(z, saved, deltas)
        return _Batch(xs=(x,), y=y, z=z, cap=None, sizes=[b], c=c, rank=0,  # type: ignore[arg-type]
                      positions=[1] * len(factors), nonfinite=False, f0=f0, local_factors=factors)

    def _local_factors(self, z: Tensor, saved: list[Tensor],
                       deltas: list[Tensor | None]) -> list[tuple[Tensor, Tensor]]:
        """The factors in the model's dtype as ``ChainCapture.local_factors`` hands them (A [b, 1, d_in], Δ [b, c, 1,
        d_out], the identity expanded)."""
        b, c = z.shape
        eye = self._eye(b, c, z.dtype)
        return [(saved[j].unsqueeze(1), (eye if d is None else d).unsqueeze(2))
                for j, d in zip(self.site_inputs, deltas)]


#: the optimizer-wide values a step changes before it is counted, read at once (EGN._exchange_in's _Undo)
_undone = operator.attrgetter(*_UNDONE)


def _run_span(program: list[tuple[int, Any, Any]], h: Tensor, saved: list[Tensor]) -> Tensor:
    """``program``'s modules on ``h`` (:meth:`StepPlan.outputs`' loop), each one's input appended to ``saved``."""
    for kind, f, g in program:
        saved.append(h)
        if kind == _LINEAR:
            h = F.linear(h, f, g)
        elif kind == _ACTIVATION:
            h = f(h)
    return h


def _holds_all(chain: Chain, params: list[Tensor]) -> bool:
    """Whether every one of ``params`` is a weight or bias of the chain's Linear layers (a wrapper may hold
    others: frozen ones, or trained ones of layers off the chain, whose direction the plan would not form)."""
    held = {id(p) for m in chain.modules if type(m) is nn.Linear for p in (m.weight, m.bias) if p is not None}
    return all(id(p) in held for p in params)
