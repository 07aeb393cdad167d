"""A factored Linear's parameters used outside its own call (F.linear on its weight, a matmul with it, a
penalty on it added to the outputs) would leave part of the Jacobian out of EGN's Gram factors: the step
must raise and change nothing, and ``jacobian="explicit"`` (the remedy the message names) must match the
float64 oracle. Reading metadata (``weight.shape``) or using a frozen layer's weight is fine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_soaa.optim.egn import EGN
from tests.unit._egn_oracle import direct_direction, flat_params

DT = torch.float64


class Uses(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(6, 5)
        self.act = nn.Tanh()  # a module: "plain" and "pre" forwards are chains of calls (traced)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        k, fc = self.kind, self.fc
        if k == "pre":  # before the first layer: the chain of calls after it is intact
            x = x + 1e-2 * self.head.weight.sum()
        if k == "functional":
            h = F.linear(x, fc.weight, fc.bias)
        elif k == "matmul":
            h = x @ fc.weight.T + fc.bias
        elif k == "called_and_reused":  # the layer is called, and its weight used once more
            h = fc(x) + 0.1 * F.linear(x, fc.weight)
        else:
            h = fc(x)
        if k == "metadata":  # reads the weight's shape only
            h = h.reshape(-1, fc.weight.shape[0])
        if k == "no_grad_read":  # a value read for logging or a statistic: no path into the outputs' graph
            with torch.no_grad():
                self.last_norm = fc.weight.norm()
        if k == "detached_read":  # a detached weight scaling the activations: a constant, as torch sees it
            h = h * (1.0 + 0.0 * fc.weight.detach().sum())
        out: Tensor = self.head(self.act(h))
        if k == "penalty":
            out = out + 1e-2 * self.head.weight.sum()
        return out


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 6, generator=g, dtype=DT), torch.randn(8, 3, generator=g, dtype=DT)


@pytest.mark.parametrize("kind", ["functional", "matmul", "called_and_reused", "penalty", "pre"])
def test_a_factored_parameter_used_outside_its_layer_raises_and_changes_nothing(kind: str) -> None:
    torch.manual_seed(0)
    model = Uses(kind).double()
    opt = EGN(model, loss="mse", lr=1.0, damping=0.1)
    w0 = flat_params(model)
    name = "head.weight" if kind in ("penalty", "pre") else "fc.weight"
    with pytest.raises(ValueError, match=rf"parameter '{name}' is used outside its nn.Linear's own call"):
        opt.step(inputs=_data()[0], targets=_data()[1])
    assert torch.equal(flat_params(model), w0)
    # the remedy the message names: explicit Jacobians, exact
    torch.manual_seed(0)
    ref = direct_direction(Uses(kind).double(), *_data(), "mse", damping=0.1)
    opt = EGN(model, loss="mse", lr=1.0, damping=0.1, jacobian="explicit")
    opt.step(inputs=_data()[0], targets=_data()[1])
    torch.testing.assert_close(flat_params(model) - w0, ref["d"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["metadata", "plain", "frozen_functional", "no_grad_read", "detached_read"])
def test_metadata_and_frozen_weights_are_fine(kind: str) -> None:
    """Also a read under torch.no_grad or of weight.detach() (refused before: no Jacobian term to miss)."""
    torch.manual_seed(0)
    model = Uses("functional" if kind == "frozen_functional" else kind).double()
    torch.manual_seed(0)
    ref_model = Uses("functional" if kind == "frozen_functional" else kind).double()
    if kind == "frozen_functional":  # its weight is no parameter of the step: no Jacobian to miss
        for m in (model, ref_model):
            m.fc.requires_grad_(False)
    ref = direct_direction(ref_model, *_data(), "mse", damping=0.1)
    opt = EGN(model, loss="mse", lr=1.0, damping=0.1)
    w0 = flat_params(model)
    opt.step(inputs=_data()[0], targets=_data()[1])
    torch.testing.assert_close(flat_params(model) - w0, ref["d"], rtol=1e-10, atol=1e-12)
