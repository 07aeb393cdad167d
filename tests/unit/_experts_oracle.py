"""The oracle of ASGO's ``batch_dims=1``: stacked experts step exactly as separate 2-D parameters.

One model, two spellings: ``separate`` holds every expert as its own parameter (``E`` per stack, the
default ``batch_dims=0``: a 2-D expert is a matrix, a 3-D one ``shape[0] x prod(shape[1:])``), ``stacked``
holds each stack as one ``[E, ...]`` parameter stepped with ``batch_dims=1``. Both get the same
gradients (the stacked one is ``torch.stack`` of the separate ones), so after any number of steps the
stacked experts must equal the separate ones: by construction, not up to a tolerance of the method.
Used by tests/unit/test_asgo_batch_dims.py (one process) and tests/distributed (W gloo ranks).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_soaa import ASGO

E = 3  # experts per stack: W = 2 splits them unevenly, W = 3 gives every rank some
#: one expert's shape per stack: 3x7 (left side, k = 3), 6x4 (right side, k = 4), and 3x2x2 (the matrix
#: 3 x 4 = shape[1] x prod(shape[2:]) of a 4-D stack)
EXPERT_SHAPES: tuple[tuple[int, ...], ...] = ((3, 7), (6, 4), (3, 2, 2))
DENSE_SHAPES: tuple[tuple[str, tuple[int, ...]], ...] = (("router.weight", (E, 7)), ("norm.weight", (7,)))
KW: dict[str, Any] = dict(lr=2e-2, damping=1e-6, root_every=2)


def _initial(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The dense parameters' and the stacks' initial values."""
    g = torch.Generator().manual_seed(0)
    dense = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for _, s in DENSE_SHAPES]
    stacks = [torch.randn((E, *s), generator=g, dtype=torch.float64).to(dtype) for s in EXPERT_SHAPES]
    return dense, stacks


def separate_params(dtype: torch.dtype = torch.float64) -> list[tuple[str, nn.Parameter]]:
    dense, stacks = _initial(dtype)
    named = [(n, nn.Parameter(t.clone())) for (n, _), t in zip(DENSE_SHAPES, dense)]
    for j, st in enumerate(stacks):
        named += [(f"experts{j}.{e}", nn.Parameter(st[e].clone())) for e in range(E)]
    return named


def stacked_params(dtype: torch.dtype = torch.float64) -> list[tuple[str, nn.Parameter]]:
    dense, stacks = _initial(dtype)
    named = [(n, nn.Parameter(t.clone())) for (n, _), t in zip(DENSE_SHAPES, dense)]
    return named + [(f"experts{j}", nn.Parameter(st.clone())) for j, st in enumerate(stacks)]


def _grads(t: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Step ``t``'s gradients of the dense parameters and of every expert (per stack, E of them)."""
    g = torch.Generator().manual_seed(100 + t)
    dense = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for _, s in DENSE_SHAPES]
    # expert 1 of the first stack gets much larger gradients: a shared normalisation would shrink the others
    experts = [torch.randn((E, *s), generator=g, dtype=torch.float64).to(dtype) for s in EXPERT_SHAPES]
    experts[0][1] *= 50.0
    return dense, experts


def idle(t: int) -> set[tuple[int, int]]:
    """(stack, expert) pairs that get no tokens at step ``t``: the stack's gradient is zero there, a
    separate expert's is None (an MoE layer skips an expert without tokens). Expert 2 of stack 0 every
    third step, expert 0 of stack 2 in the first two steps (idle before it has any state)."""
    out = set()
    if t % 3 == 1:
        out.add((0, 2))
    if t < 2:
        out.add((2, 0))
    return out


def set_grads(named: list[tuple[str, nn.Parameter]], t: int, stacked: bool) -> None:
    dtype = named[0][1].dtype
    dense, experts = _grads(t, dtype)
    n_dense = len(DENSE_SHAPES)
    for (_, p), gd in zip(named[:n_dense], dense):
        p.grad = gd.clone()
    rest = [p for _, p in named[n_dense:]]
    for j, e in idle(t):
        experts[j][e].zero_()
    if stacked:
        for p, ge in zip(rest, experts):
            p.grad = ge.clone()
    else:
        for j, ge in enumerate(experts):
            for e in range(E):
                rest[j * E + e].grad = None if (j, e) in idle(t) else ge[e].clone()


def run(stacked: bool, steps: int, dtype: torch.dtype = torch.float64, start: int = 0,
        opt: ASGO | None = None, named: list[tuple[str, nn.Parameter]] | None = None,
        **kw: Any) -> tuple[list[tuple[str, nn.Parameter]], ASGO]:
    """``steps`` steps from step ``start``; a new model and optimizer unless given (``kw`` go to ASGO,
    which gets ``batch_dims=1`` when ``stacked``)."""
    if named is None:
        named = stacked_params(dtype) if stacked else separate_params(dtype)
    if opt is None:
        opt = ASGO(named, **{**KW, **({"batch_dims": 1} if stacked else {}), **kw})
    for t in range(start, start + steps):
        opt.zero_grad()
        set_grads(named, t, stacked)
        opt.step()
    return named, opt


def as_stacks(named: list[tuple[str, nn.Parameter]], stacked: bool) -> list[torch.Tensor]:
    """The dense parameters, then each stack ``[E, ...]`` (separate experts stacked), detached copies."""
    n_dense = len(DENSE_SHAPES)
    out = [p.detach().clone() for _, p in named[:n_dense]]
    rest = [p.detach() for _, p in named[n_dense:]]
    if stacked:
        return out + [p.clone() for p in rest]
    return out + [torch.stack(rest[j * E:(j + 1) * E]) for j in range(len(EXPERT_SHAPES))]
