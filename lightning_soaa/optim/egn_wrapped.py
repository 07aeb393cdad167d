"""EGN's step plan for a model that wraps its MLP: a module (a ``LightningModule``, say) whose forward runs the
children that hold its Linear layers one after the other on the input, e.g. ``self.net(x)`` or
``self.head(self.body(x))`` with ``body`` an ``nn.Sequential`` of Linear layers and activations.

Such a forward is Python and may do anything (preprocess, postprocess, branch on the input or a counter, call a
child twice, edit a tensor in place, run a child with other weights), so it is never assumed: every forward of a
planned step (the capture's and each line-search trial's) is the model's own ``model(x)``, run with each planned
child (a *piece*: the run of the model's direct children, in registration order, from the first to the last that
holds a trained Linear) standing in for itself: an instance ``forward`` put in its ``__dict__`` for the call and
removed after it, which runs the piece's part of the plan's program (the same ATen calls as its own forward)
and keeps each module's input. The forward was the planned chain, and the step keeps the plan's results, only
where

* every piece was called once, in order, from this thread, on one positional tensor: the first on ``x`` itself,
  each next on the very tensor the one before returned; and the model returned the last one's output itself;
* each piece's Linear layers held their planned parameters, over their planned memory, when it was called, its
  Dropout modules were in eval mode, and neither autocast (its calls would be autocast's, in its dtype) nor
  inference mode was enabled;
* none of those tensors, ``x`` or the trained parameters changed in place during the forward (version counters:
  the forward runs outside inference mode, under ``no_grad``, so every tensor involved has one).

Then the output is the chain's function of ``x`` whatever else the forward did: random draws did not reach it.
Every forward is bracketed by the general path's :class:`~lightning_soaa.optim.egn_rng.StepRng`, so that the
forward draws what the general path's draws and the generator ends where it leaves it (another thread's draws
are left alone, as there). Between steps the modules are checked as the plan's are
(:meth:`WrappedForward.as_planned`): the model's module tree, classes, hooks and instance attributes as built,
plain mode switches (the step puts every module in eval mode by its flag, as the general path does). A forward
that is not the chain raises :class:`NotPlanned` inside the step: the step puts back what it changed
(parameters, state, the generator) and declines, the general path takes it, and this plan is not used again (as
the trace plan, :mod:`~lightning_soaa.optim.egn_trace`, is dropped at its first miss). That one step ran the
model's forward once or more beyond the general path's forwards: a forward with Python side effects (a call
counter) sees them.

Cost: the report's ``DigitsMLP`` (64-128-128-10, b = 32) steps in 0.84x the general path's time; running its
forward through its own Python (module calls, stand-ins, checks) costs ~0.07 ms a forward over the plain MLP's
plan, whose forward is the program alone (1.06-1.08x its step).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from torch import Tensor, nn

from lightning_soaa.optim.egn_chain import Chain, chain_of
from lightning_soaa.optim.egn_rng import _CONCURRENT, DrawHistory, StepRng
from lightning_soaa.optim.step_context import AUTOCAST_DEVICES, _any_autocast

__all__ = ["Concurrent", "NotPlanned", "WrappedForward", "plan_pieces"]

log = logging.getLogger(__name__)

_inference_mode = torch._C._InferenceMode
#: modules whose presence changes what the general path's step does around the forward (the attention fast path
#: and nested tensors it turns off): such a model takes the general path
_SPECIAL = (nn.MultiheadAttention, nn.TransformerEncoder, nn.TransformerEncoderLayer)


class NotPlanned(Exception):  # noqa: N818 - not an error: the step declines
    """A forward of a planned step was not the planned chain (the reason in its message)."""


class Concurrent(RuntimeError):
    """The general path's refusal of a step whose forward draws beside another thread's EGN step (egn_rng), raised
    by a planned forward's bracket: raised as itself, as the general path raises it (not a declined step)."""


def plan_pieces(model: nn.Module, sites: list[Any]) -> tuple[Chain, list[nn.Module]] | None:
    """The chain of a wrapper and its pieces: the run of ``model``'s direct children, in registration order,
    from the first to the last that holds a factored Linear, each an ``nn.Sequential`` (exactly) or a known
    module; their modules one after the other are a chain (:func:`~lightning_soaa.optim.egn_chain.chain_of`).
    None where there is no such run, or the model holds a module around which the general path's step differs."""
    if type(model) in (nn.Sequential, nn.Linear) or any(isinstance(m, _SPECIAL) for m in model.modules()):
        return None
    site_ids = {id(s.module) for s in sites}
    children = list(model._modules.values())
    holding = [i for i, c in enumerate(children)
               if c is not None and any(id(m) in site_ids for m in c.modules())]
    if not holding:
        return None
    pieces = [c for c in children[holding[0]:holding[-1] + 1] if c is not None]
    if len(pieces) != holding[-1] + 1 - holding[0]:
        return None
    mods: list[nn.Module] = []
    for piece in pieces:
        if "forward" in piece.__dict__:
            return None
        mods.extend(piece if type(piece) is nn.Sequential else (piece,))
    chain = chain_of(tuple(mods), sites, None)
    if chain is None or len({id(p) for p in pieces}) != len(pieces):
        return None
    return chain, pieces


class _Run:
    """One forward's record: the next piece expected, the tensor it must be called on, what went wrong."""

    __slots__ = ("expect", "failed", "next", "outputs", "saved", "thread")

    def reset(self, x: Tensor | None) -> None:
        self.thread = threading.get_ident()
        self.next = 0
        self.expect: Tensor | None = x
        self.outputs: list[tuple[Tensor, int]] = []  # each piece's output and its version when returned
        self.saved: list[Tensor] = []
        self.failed: str | None = None


class WrappedForward:
    """The planned forward of a wrapper (see the module docstring): its checks between steps, its modes, and each
    forward run through the model's own with the pieces standing in for themselves."""

    def __init__(self, model: nn.Module, pieces: list[nn.Module], program: list[tuple[int, Any, Any]],
                 params: list[Tensor], run_piece: Any) -> None:
        self.model = model
        self.modules = list(model.modules())
        self.types = tuple(map(type, self.modules))
        self._children = [(m._modules, tuple(m._modules.values())) for m in self.modules]
        self._hook_dicts = [getattr(m, a) for m in self.modules for a in
                            ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")]
        self._instance_dicts = [m.__dict__ for m in self.modules]
        self.pieces = pieces
        spans, at = [], 0
        for piece in pieces:
            n = len(piece) if type(piece) is nn.Sequential else 1
            spans.append(program[at:at + n])
            at += n
        self._spans = spans
        # per piece, where its Linear layers hold their parameters and the planned ones: a forward may run a piece
        # with other weights for the call (torch.func.functional_call), which the program's own would not see
        self._slots = [[(m._parameters, m.__dict__, m.weight, m.bias) for m in
                        (piece if type(piece) is nn.Sequential else (piece,)) if type(m) is nn.Linear]
                       for piece in pieces]
        # per piece, its Dropout modules: the program takes them as the identity, as they are in eval mode (a
        # forward that calls train() would make them draw)
        self._dropouts = [[m for m in (piece if type(piece) is nn.Sequential else (piece,)) if type(m) is nn.Dropout]
                          for piece in pieces]
        self._ptrs: list[int] = []
        self._params = params
        self._run_piece = run_piece  # (program, h, saved) -> the piece's output: the plan's own ops
        self._modes: list[tuple[nn.Module, bool]] = []
        # the general path's bracket of every forward of the step (egn_rng), for this step (see begin())
        self._rng: StepRng | None = None
        self.refused: str | None = None
        self._run = _Run()
        self._calls = [self._stand_in(i) for i in range(len(pieces))]

    def as_planned(self) -> bool:
        """Whether the model is still the one planned: its module tree (each module's children), classes, no
        hooks, no instance ``forward``, ``train``, ``eval`` or in-place compiled call (what the general path's
        step would run otherwise); and no earlier forward found not planned."""
        if self.refused is not None or tuple(map(type, self.modules)) != self.types or any(self._hook_dicts):
            return False
        for held, was in self._children:
            if len(held) != len(was) or not all(a is b for a, b in zip(held.values(), was)):
                return False
        for d in self._instance_dicts:
            if "forward" in d or "train" in d or "eval" in d or d.get("_compiled_call_impl") is not None:
                return False
        from lightning_soaa.optim.egn import _plain_modes  # (egn imports the plan lazily; this module with it)

        return _plain_modes(self.modules)

    def begin(self, draws: DrawHistory) -> None:
        """At the step's start: every module in eval mode (its flag, as the general path sets it) and the step's
        :class:`~lightning_soaa.optim.egn_rng.StepRng` (``draws``: the optimizer's, which the general path's
        steps use too): every forward of the step starts from the first draw's start, as the general path's."""
        self._modes = [(m, m.training) for m in self.modules]
        for m in self.modules:
            object.__setattr__(m, "training", False)
        self._rng = StepRng((), draws)  # (the CPU generator: the plan's parameters and inputs are on the CPU)
        self._ptrs = [p.data_ptr() for p in self._params]

    def end(self, refused: NotPlanned | None, rewind: bool = False) -> None:
        """At the step's end: the modes as they were; where a forward was not planned, the plan given up (the
        general path takes this step and the next ones). The generator as the general path leaves it: as if the
        model had been run once, or not at all where the step declined, raised or was not planned (``rewind``,
        ``refused``: the general path then runs the step's forwards from the same draws). Judged by the general
        path's own :class:`~lightning_soaa.optim.egn_rng.StepRng`: a draw of another thread is left alone."""
        for m, mode in self._modes:
            object.__setattr__(m, "training", mode)
        self._modes = []
        if refused is not None:
            self.refused = str(refused)
            log.info("EGN: the model's forward is not its planned chain (%s); the step plan is not used from now on.",
                     refused)
        rng, self._rng = self._rng, None
        if rng is not None:
            rng.finish(rewind=refused is not None or rewind)

    def run(self, x: Tensor, capture: bool) -> tuple[Tensor, list[Tensor]]:
        """(z, each chain module's input) from ``model(x)``, the pieces standing in for themselves; raises
        :class:`NotPlanned` where the forward was not the planned chain. ``capture``: the step's first forward."""
        rng = self._rng
        assert rng is not None  # (begin() ran)
        run = self._run
        run.reset(x)
        x_version = x._version
        versions = [p._version for p in self._params]
        dicts = [piece.__dict__ for piece in self.pieces]
        try:
            for d, call in zip(dicts, self._calls):
                d["forward"] = call
            with _inference_mode(False), rng:  # (its tensors have version counters; the step's draw again)
                torch._C._set_grad_enabled(False)  # (the guard puts grad mode back with inference mode)
                z = self.model(x)
        except RuntimeError as e:
            if e.args == (_CONCURRENT,):
                raise Concurrent(_CONCURRENT) from None
            raise
        finally:
            for d, call in zip(dicts, self._calls):
                if d.get("forward") is call:
                    del d["forward"]
        why = run.failed or self._why_not(run, z, x, x_version, versions)
        saved = run.saved
        run.reset(None)  # (keeps no tensor of this forward)
        if why is not None:
            raise NotPlanned(why)
        if capture:
            rng.mark()
        return z, saved

    def _why_not(self, run: _Run, z: Any, x: Tensor, x_version: int, versions: list[int]) -> str | None:
        """Why the forward just run was not the planned chain, or None (see the module docstring)."""
        if run.next != len(self.pieces) or z is not run.expect:
            return "the model's output is not its last planned child's output"
        if x._version != x_version or any(t._version != v for t, v in run.outputs):
            return "an input or output of a planned child changed in place"
        if any(p._version != v for p, v in zip(self._params, versions)):
            return "a trained parameter changed in place during the forward"
        return None

    def _own_params(self, i: int) -> bool:
        """Whether piece ``i``'s Linear layers hold their planned parameters, over their planned memory, and its
        Dropout modules are in eval mode."""
        for held, attrs, w, b in self._slots[i]:
            if held.get("weight") is not w or held.get("bias") is not b or "weight" in attrs or "bias" in attrs:
                return False
        if any(m.training for m in self._dropouts[i]):
            return False
        return [p.data_ptr() for p in self._params] == self._ptrs

    def _stand_in(self, i: int) -> Any:
        """Piece ``i``'s ``forward`` during a run: the plan's program where it is the call expected next, else the
        piece's own forward (the run is then not planned)."""
        piece, span, run = self.pieces[i], self._spans[i], self._run

        def forward(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != run.thread:  # another thread's call: not this forward's
                return type(piece).forward(piece, *args, **kwargs)
            if run.failed is None:
                if run.next != i or len(args) != 1 or kwargs or args[0] is not run.expect:
                    run.failed = f"a planned child ({type(piece).__name__}) was not called as planned"
                elif run.outputs and run.outputs[-1][0]._version != run.outputs[-1][1]:
                    run.failed = "an output of a planned child changed in place"
                elif torch.is_inference_mode_enabled():  # (its outputs would have no version counter)
                    run.failed = f"a planned child ({type(piece).__name__}) was called in inference mode"
                elif _any_autocast() and any(map(torch.is_autocast_enabled, AUTOCAST_DEVICES)):
                    # (the program's calls would be autocast's: outputs and saved inputs in its dtype, which the
                    # plan's products do not take and the general path refuses, naming the cast)
                    run.failed = f"a planned child ({type(piece).__name__}) was called under autocast"
                elif not self._own_params(i):
                    run.failed = (f"a planned child ({type(piece).__name__}) ran with other parameters or a "
                                  "Dropout in training mode")
            if run.failed is not None:
                return type(piece).forward(piece, *args, **kwargs)
            out = self._run_piece(span, args[0], run.saved)
            run.next, run.expect = i + 1, out
            run.outputs.append((out, out._version))
            return out

        return forward
