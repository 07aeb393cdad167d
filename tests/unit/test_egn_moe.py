"""EGN on a mixture of experts: a layer applied to the part of the batch its router picked (``nonzero`` or
boolean-mask dispatch) can be captured by neither Jacobian mode, so both refusals say what works (every
expert on the whole batch, its output masked) instead of sending the user from one refusal to the other;
and that remedy takes the exact Gauss-Newton step."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from lightning_soaa.optim.egn import EGN
from tests.unit._egn_oracle import assert_steps_by, direct_direction


class _MoE(nn.Module):
    """Top-1 routing with a softmax gate; ``how`` dispatches each expert to the samples routed to it
    ("nonzero", "mask": a data-dependent part of the batch) or runs it on the whole batch ("dense")."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.router = nn.Linear(4, 2)
        self.experts = nn.ModuleList([nn.Linear(4, 3) for _ in range(2)])

    def forward(self, x: Tensor) -> Tensor:
        gate = torch.softmax(self.router(x), -1)
        pick = gate.argmax(-1)
        out = x.new_zeros(x.shape[0], 3)
        for e, expert in enumerate(self.experts):
            if self.how == "nonzero":
                idx = (pick == e).nonzero().squeeze(-1)
                out = out.index_add(0, idx, gate[idx, e, None] * expert(x[idx]))
            elif self.how == "mask":
                m = pick == e
                out = out.masked_scatter(m[:, None], gate[m, e, None] * expert(x[m]))
            else:
                out = out + (pick == e)[:, None] * gate[:, e, None] * expert(x)
        return out


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(8, 4, generator=g, dtype=torch.float64),
            torch.randn(8, 3, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("jacobian", ["auto", "explicit"])
@pytest.mark.parametrize("how", ["nonzero", "mask"])
def test_experts_on_a_routed_part_of_the_batch_are_refused_with_the_remedy_that_works(how: str,
                                                                                       jacobian: str) -> None:
    torch.manual_seed(0)
    model = _MoE(how).double()
    x, y = _data()
    opt = EGN(model, loss="mse", lr=1.0, jacobian=jacobian)
    with pytest.raises(ValueError) as info:
        opt.step(inputs=x, targets=y)
    text = str(info.value)
    assert "part of the batch" in text and "whole batch and mask" in text, text
    assert "another optimizer" in text, text
    # the explicit mode is not offered as the way out: it cannot run the dispatch either
    assert "Use jacobian='explicit'" not in text and "(freeze them to train the rest with EGN)" not in text, text
    # the remedy named: every expert on the whole batch, masked, takes the exact step in both modes
    model.how = "dense"
    ref = direct_direction(copy.deepcopy(model).eval(), x, y, "mse", damping=1.0)["d"]
    assert_steps_by(EGN(model, loss="mse", lr=1.0, damping=1.0, jacobian=jacobian), model, x, y, ref)


def test_a_sequence_first_layer_is_still_sent_to_the_explicit_mode() -> None:
    """Where the layer sees every sample in another layout, jacobian='explicit' works and is still named."""

    class _SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.o = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:  # x [b, T, d] -> [T, b, d] through the layer
            h = torch.tanh(self.a(x.transpose(0, 1))).transpose(0, 1)
            out: Tensor = self.o(h.mean(1))
            return out

    torch.manual_seed(0)
    model = _SeqFirst().double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    y = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"jacobian='explicit'") as info:
        EGN(model, loss="mse", lr=1.0).step(inputs=x, targets=y)
    assert "whole batch and mask" not in str(info.value)
    ref = direct_direction(copy.deepcopy(model).eval(), x, y, "mse", damping=1.0)["d"]
    assert_steps_by(EGN(model, loss="mse", lr=1.0, damping=1.0, jacobian="explicit"), model, x, y, ref)
