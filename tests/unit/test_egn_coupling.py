"""EGN needs a per-sample model: sample i's outputs may depend on sample i alone. A forward that mixes
samples (statistics of the batch, attention across it) would get summed back-signals and wrong Gram factors;
the general capture checks it with one more cotangent in its batched backward and refuses the step, changing
nothing. Per-sample models of every shape the capture sees must pass, in float32 and float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from lightning_soaa.optim.egn import EGN
from lightning_soaa.optim.egn_capture import COUPLING_MESSAGE
from tests.unit._egn_oracle import direct_direction, flat_params


class Net(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.norm = nn.LayerNorm(16)
        self.bn = nn.BatchNorm1d(16)
        self.norm_in = nn.LayerNorm(6)
        self.gain = nn.Parameter(torch.zeros(()))  # trained, not a Linear: an explicit-Jacobian parameter

    def forward(self, x: Tensor) -> Tensor:
        k = self.kind
        if k == "norm_centred":  # mixing between an explicit-Jacobian module and the first factored Linear
            x = self.norm_in(x)
            x = x - x.mean(0, keepdim=True)
        h = torch.tanh(self.a(x))
        if k == "centred":  # batch statistics between two layers
            h = h - h.mean(0, keepdim=True)
        elif k == "attention":  # every sample attends to the whole batch
            h = h + 0.5 * torch.softmax(h @ h.T, dim=-1) @ h
        elif k == "residual":
            h = h + torch.tanh(self.b(h))
        elif k == "layernorm":  # per sample: an explicit-Jacobian module between the layers
            h = self.norm(self.b(h))
        elif k == "batchnorm":  # per sample in eval mode (running statistics), which EGN's step uses
            h = self.bn(self.b(h))
        elif k == "positions":  # [b, T, d]: a Linear per position, then the mean over positions
            h = torch.tanh(self.b(h.unsqueeze(1).expand(-1, 4, -1) * torch.linspace(0.5, 1.5, 4)[:, None])).mean(1)
        z: Tensor = self.c(h)
        if k == "centred_out":  # batch statistics after the last layer
            z = z - z.mean(0, keepdim=True)
        elif k == "gain_mean":  # a trained coefficient at 0 times a batch statistic: same values, other derivatives
            z = z + self.gain * x.mean(0)[:3]
        elif k == "gain":  # per sample: the same coefficient on the sample's own inputs
            z = z + self.gain * x[:, :3]
        elif k == "offset":  # a batch statistic that moves no derivative: the per-sample rows are still right
            z = z + x.mean(0)[:3] + self.gain * x[:, :3]
        return z


def _batch(b: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(b)
    return torch.randn(b, 6, generator=g, dtype=dtype), torch.randn(b, 3, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["centred", "attention", "centred_out"])
def test_a_model_that_mixes_samples_is_refused_and_nothing_changes(kind: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = Net(kind).to(dtype)
    opt = EGN(model, loss="mse", lr=1.0, damping=0.1)
    w0 = flat_params(model)
    with pytest.raises(ValueError, match="depend on other samples of the batch"):
        opt.step(inputs=_batch(64, dtype)[0], targets=_batch(64, dtype)[1])
    assert torch.equal(flat_params(model), w0)
    assert "per-sample model" in COUPLING_MESSAGE


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["norm_centred", "gain_mean", "centred"])
def test_mixing_that_only_explicit_jacobians_see_is_refused(kind: str, dtype: torch.dtype) -> None:
    """The explicit rows are the Jacobians of the model on one sample: a model that mixes samples before
    its first factored Linear (or only through a non-Linear parameter, or under jacobian='explicit', where
    nothing is factored) must be refused too, not stepped with the wrong rows."""
    torch.manual_seed(0)
    model = Net(kind).to(dtype)
    jacobian = "explicit" if kind == "centred" else "auto"
    opt = EGN(model, loss="mse", lr=1.0, damping=0.1, jacobian=jacobian)
    w0 = flat_params(model)
    with pytest.raises(ValueError, match="depend on other samples of the batch"):
        opt.step(inputs=_batch(32, dtype)[0], targets=_batch(32, dtype)[1])
    assert torch.equal(flat_params(model), w0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["plain", "residual", "layernorm", "batchnorm", "positions", "gain",
                                  "offset", "explicit"])
def test_per_sample_models_pass_the_check(kind: str, dtype: torch.dtype) -> None:
    """No false alarm over several steps at b = 128 (float32 rounding included); float64 steps match the
    parameter-space oracle, so what passed was computed right."""
    torch.manual_seed(0)
    jacobian = "explicit" if kind == "explicit" else "auto"
    model = Net("layernorm" if kind == "explicit" else kind).to(dtype)
    opt = EGN(model, loss="mse", lr=0.5, damping=0.3, line_search=True, jacobian=jacobian)
    for _ in range(4):
        opt.step(inputs=_batch(128, dtype)[0], targets=_batch(128, dtype)[1])
    if dtype == torch.float64:
        x, y = _batch(16, dtype)
        ref = direct_direction(copy.deepcopy(model).eval(), x, y, "mse", damping=0.3)
        opt = EGN(model, loss="mse", lr=1.0, damping=0.3, jacobian=jacobian)
        w0 = flat_params(model)
        opt.step(inputs=x, targets=y)
        torch.testing.assert_close(flat_params(model) - w0, ref["d"], rtol=1e-9, atol=1e-11)


def test_a_refusal_caused_by_a_torch_func_batching_rule_says_so() -> None:
    """A per-sample RBF layer with torch.cdist: torch.func's vmap(jacrev) batches cdist wrongly, which the
    check cannot tell from mixing samples; the message names that cause and the workarounds."""

    class RBF(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.o = nn.Linear(4, 5).double(), nn.Linear(6, 3).double()
            self.c = nn.Parameter(torch.randn(6, 5, dtype=torch.float64))

        def forward(self, x: Tensor) -> Tensor:
            return self.o(torch.exp(-torch.cdist(torch.tanh(self.a(x)), self.c) ** 2))

    torch.manual_seed(1)
    model = RBF()
    with pytest.raises(ValueError, match="depend on other samples") as info:
        EGN(model, loss="mse").step(inputs=torch.randn(6, 4, dtype=torch.float64),
                                    targets=torch.randn(6, 3, dtype=torch.float64))
    for words in ("batching rule", "torch.cdist", "jacobian='auto'", "jacobian='explicit'"):
        assert words in str(info.value)
