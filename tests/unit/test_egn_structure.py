"""EGN on models whose structure is not a plain tree of distinct trained parameters: a submodule applied
twice (layer sharing), and layers frozen or unfrozen (``requires_grad``) after EGN was built. Each either
trains as the float64 oracle (or as an EGN built on the model as it stands) does, leaving the model's
Parameters in place, or is refused with a message that names the cause and changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from lightning_soaa.optim.egn import EGN
from tests.unit._egn_oracle import direct_direction, flat_params

DT = torch.float64


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1)


def _batch(step: int, b: int = 8, d_in: int = 4, c: int = 2) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(b, d_in, generator=g, dtype=DT), torch.randn(b, c, generator=g, dtype=DT)


# -- a submodule applied twice ------------------------------------------------------------------

def _shared_linear() -> tuple[nn.Module, nn.Module]:
    shared = nn.Linear(6, 6)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(6, 2))
    return model.to(DT), shared


def _shared_layernorm() -> tuple[nn.Module, nn.Module]:
    shared = nn.LayerNorm(6)
    with torch.no_grad():  # away from the identity: its Jacobian columns then differ from a fresh one's
        shared.weight.uniform_(0.5, 1.5)
        shared.bias.uniform_(-0.5, 0.5)
    return nn.Sequential(nn.Linear(4, 6), shared, nn.Tanh(), nn.Linear(6, 6), shared, nn.Tanh(),
                         nn.Linear(6, 2)).to(DT), shared


SHARED = {"linear": _shared_linear, "layernorm": _shared_layernorm}


def _in_place(model: nn.Module, params: list[Tensor], shared: nn.Module) -> None:
    """The model still holds its own Parameters, in each of the shared module's places."""
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    for p in (shared.weight, shared.bias):
        assert isinstance(p, nn.Parameter) and p.requires_grad
    assert sum(1 for m in model.modules() if m is shared) == 1
    assert all(m.weight is shared.weight for m in model if m is shared)


@pytest.mark.parametrize("jacobian", ["auto", "explicit"])
@pytest.mark.parametrize("kind", sorted(SHARED))
def test_a_module_applied_twice_trains_as_the_oracle(kind: str, jacobian: str) -> None:
    """Each step (lr 1, no line search) is the oracle's direction of the model as it stands; the first
    step used to leave a detached tensor in the shared module (torch's functional_call restored the
    module reached by two names twice), so the next one refused the model as mixing samples."""
    model, shared = SHARED[kind]()
    params = list(model.parameters())
    opt = EGN(model, loss="mse", lr=1.0, damping=0.3, jacobian=jacobian)
    for t in range(3):
        x, y = _batch(t)
        ref = direct_direction(copy.deepcopy(model).eval(), x, y, "mse", damping=0.3)["d"]
        w0 = flat_params(model)
        opt.step(inputs=x, targets=y)
        torch.testing.assert_close(flat_params(model) - w0, ref, rtol=1e-9, atol=1e-12)
        _in_place(model, params, shared)


@pytest.mark.parametrize("kind", sorted(SHARED))
def test_a_module_applied_twice_with_momentum_keeps_its_parameters(kind: str) -> None:
    """Momentum with adaptive damping takes Jd by a forward-mode JVP through the model (functional_call):
    the shared module keeps its Parameters, and the explicit and factored captures agree."""
    runs = {}
    for jacobian in ("auto", "explicit"):
        torch.manual_seed(2)
        model, shared = SHARED[kind]()
        params = list(model.parameters())
        opt = EGN(model, loss="mse", lr=0.5, damping=0.3, momentum=0.5, adaptive_damping=True, jacobian=jacobian)
        for t in range(4):
            opt.step(inputs=_batch(t)[0], targets=_batch(t)[1])
            _in_place(model, params, shared)
        assert opt.momentum_steps == 4 and opt.statistics()["momentum_used"] == 1.0
        runs[jacobian] = flat_params(model)
    torch.testing.assert_close(runs["auto"], runs["explicit"], rtol=1e-9, atol=1e-12)


class _NoSingles(nn.Module):
    """Refuses a one-sample batch: EGN's explicit per-sample Jacobians fail inside functional_call."""

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] == 1:
            raise RuntimeError("no single samples")
        return x


@pytest.mark.parametrize("jacobian", ["auto", "explicit"])
def test_a_failed_step_leaves_the_shared_module_in_place(jacobian: str) -> None:
    norm = nn.LayerNorm(6)
    model = nn.Sequential(nn.Linear(4, 6), norm, nn.Tanh(), norm, _NoSingles(), nn.Linear(6, 2)).to(DT)
    params = list(model.parameters())
    opt = EGN(model, loss="mse", lr=1.0, damping=0.3, jacobian=jacobian)
    w0 = flat_params(model)
    # the message names the parameters that need those Jacobians (a trained PReLU's weight was not named)
    with pytest.raises(ValueError, match=r"explicit per-sample Jacobians failed(.|\n)*Here: .*'1\.weight', '1\.bias'"):
        opt.step(inputs=_batch(0)[0], targets=_batch(0)[1])
    _in_place(model, params, norm)
    assert torch.equal(flat_params(model), w0)


# -- requires_grad changed after EGN was built -------------------------------------------------------

class _Net(nn.Module):
    """Not a Sequential: traced as a chain at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 7), nn.Linear(7, 5), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)


def _mixed() -> nn.Module:  # the general capture: Linear factors and a LayerNorm's explicit rows
    return nn.Sequential(nn.Linear(4, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(),
                         nn.Linear(5, 2)).to(DT)


MODELS = {"mlp": _mlp, "net": lambda: _Net().to(DT), "mixed": _mixed}
KW = {"plain": {}, "all": dict(momentum=0.5, line_search=True, adaptive_damping=True),
      "explicit": dict(jacobian="explicit", momentum=0.5)}
#: per model, the parameters frozen: a whole first layer, and a trained LayerNorm / a bias alone
FREEZE = {"mlp": ["0.weight", "0.bias"], "net": ["a.weight", "b.bias"], "mixed": ["0.weight", "0.bias", "1.weight"]}


def _run(opt: EGN, steps: range) -> None:
    for t in steps:
        x, y = _batch(t)
        opt.step(inputs=x, targets=y)


def _freeze(model: nn.Module, names: list[str], on: bool = False) -> None:
    for n, p in model.named_parameters():
        if n in names:
            p.requires_grad_(on)


@pytest.mark.parametrize("kw", sorted(KW))
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_parameters_frozen_after_construction_are_left_out(kind: str, kw: str) -> None:
    """Frozen after EGN was built: those parameters stay put and the others take the steps of an EGN
    built on the frozen model (the same Gauss-Newton system, of the still trainable parameters)."""
    torch.manual_seed(3)
    model = MODELS[kind]()
    ref_model = copy.deepcopy(model)
    opt = EGN(model, loss="mse", lr=0.7, damping=0.3, **KW[kw])  # type: ignore[arg-type]
    _freeze(model, FREEZE[kind])
    _freeze(ref_model, FREEZE[kind])
    ref = EGN(ref_model, loss="mse", lr=0.7, damping=0.3, **KW[kw])  # type: ignore[arg-type]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n in FREEZE[kind]}
    _run(opt, range(3))
    _run(ref, range(3))
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    want = torch.cat([p.detach().reshape(-1) for p in ref_model.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert opt.damping == pytest.approx(ref.damping, rel=1e-12) and opt.alpha == pytest.approx(ref.alpha, rel=1e-12)


def test_freezing_mid_run_keeps_the_frozen_momentum_and_unfreezing_resumes() -> None:
    """Frozen after some steps: no update, its momentum buffer kept (torch's momentum skips a
    parameter without a gradient); unfrozen again: trained again, the step an EGN on the whole model
    takes from there (no momentum, so the step depends on the model alone)."""
    model = _mlp()
    opt = EGN(model, loss="mse", lr=0.5, damping=0.3, momentum=0.5)
    _run(opt, range(2))
    first = model[0].weight
    first_buf, head_buf = _buffer(opt, 0), _buffer(opt, 4)
    model[0].requires_grad_(False)
    w = first.detach().clone()
    _run(opt, range(2, 4))
    assert torch.equal(first, w)
    assert torch.equal(_buffer(opt, 0), first_buf)  # kept as it was
    assert not torch.equal(_buffer(opt, 4), head_buf)  # the head's moved on

    model[0].requires_grad_(True)
    opt2 = EGN(model, loss="mse", lr=0.5, damping=0.3)  # no momentum: comparable with a fresh EGN
    model[0].requires_grad_(False)
    _run(opt2, range(4, 5))  # one step planned without layer 0
    plain = EGN(copy.deepcopy(model).requires_grad_(True), loss="mse", lr=0.5, damping=0.3)
    model[0].requires_grad_(True)
    _run(opt2, range(5, 6))
    _run(plain, range(5, 6))
    assert not torch.equal(first, w)
    torch.testing.assert_close(flat_params(model), flat_params(plain.model), rtol=1e-12, atol=1e-14)


def _buffer(opt: EGN, index: int) -> Tensor:
    """The momentum buffer of parameter ``index`` (its one block), a copy."""
    return opt.state_dict()["state"][index][0]["momentum_buffer"].clone()


def test_unfreezing_a_parameter_frozen_at_construction_is_refused() -> None:
    model = _mlp()
    model[0].requires_grad_(False)
    opt = EGN(model, loss="mse", lr=0.5, damping=0.3)
    _run(opt, range(1))
    model[0].requires_grad_(True)
    w0 = flat_params(model)
    with pytest.raises(ValueError, match=r"'0\.weight' was frozen .* when this EGN was built.*new EGN"):
        _run(opt, range(1, 2))
    assert torch.equal(flat_params(model), w0)
    model[0].requires_grad_(False)  # frozen again: EGN goes on
    _run(opt, range(1, 2))


def test_freezing_every_parameter_is_refused() -> None:
    model = _mlp()
    opt = EGN(model, loss="mse", lr=0.5, damping=0.3)
    model.requires_grad_(False)
    w0 = flat_params(model.requires_grad_(True))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter has been frozen"):
        _run(opt, range(1))
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), w0)


class _Gated(nn.Module):
    """A layer torch.func cannot take per-sample Jacobians through (nn.PReLU's backward under vmap, nn.RNN)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.inner = nn.PReLU(6) if kind == "prelu" else nn.RNN(6, 6, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x) if isinstance(self.inner, nn.PReLU) else self.inner(x.unsqueeze(1))[0].squeeze(1)


@pytest.mark.parametrize(("kind", "holder"), [("prelu", "nn.PReLU"), ("rnn", "nn.RNN")])
def test_a_layer_torch_func_cannot_differentiate_is_named_by_its_class(kind: str, holder: str) -> None:
    """torch.func's own message is a shape mismatch from inside torch ("The size of tensor a (8) must match
    the size of tensor b (2)"): the refusal names the trained parameters and the class of the layer holding
    them, on the first step, changing nothing."""
    model = nn.Sequential(nn.Linear(4, 6), _Gated(kind), nn.Linear(6, 2)).to(DT)
    opt = EGN(model, loss="mse", lr=1.0, damping=0.3)
    w0 = flat_params(model)
    with pytest.raises(ValueError, match=rf"Here: '1\.inner\.weight.*held by {holder} \(freeze them"):
        opt.step(inputs=_batch(0)[0], targets=_batch(0)[1])
    assert torch.equal(flat_params(model), w0)
