"""EGN's capture for plain MLPs (``egn_chain``) against the general capture (hooks + batched backward):
the same outputs and Gram factors, bit for bit, and the general path wherever the chain does not apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_soaa.optim.egn import EGN
from lightning_soaa.optim.egn_capture import LinearCapture, plan_curvature
from lightning_soaa.optim.egn_chain import ChainCapture, plan_chain


def _general(model: nn.Module, x: torch.Tensor, c: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
    sites, _ = plan_curvature(model, {n: p for n, p in model.named_parameters() if p.requires_grad}, "auto")
    cap = LinearCapture(sites, x.shape[0])
    with torch.enable_grad(), cap:
        z = model(x)
    return z.detach(), cap.local_factors(z, c)


def _chain(model: nn.Module, x: torch.Tensor, c: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
    sites, explicit = plan_curvature(model, {n: p for n, p in model.named_parameters() if p.requires_grad},
                                     "auto")
    chain = plan_chain(model, sites, explicit)
    assert chain is not None and chain.usable((x,))
    cap = ChainCapture(chain, x)
    return cap.z, cap.local_factors(cap.z, c)


MODELS = {
    "tanh": lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 4)),
    "relu_sigmoid_pass": lambda: nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Dropout(0.5), nn.Linear(7, 6),
                                               nn.Sigmoid(), nn.Identity(), nn.Linear(6, 4)),
    "stacked_activations": lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Sigmoid(), nn.Linear(7, 4)),
    "one_layer": lambda: nn.Sequential(nn.Linear(5, 4)),
    "bare_linear": lambda: nn.Linear(5, 4),  # linear or logistic regression: the chain of one layer
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("frozen", ["none", "first_weight", "middle"])
def test_chain_factors_equal_the_general_capture_bitwise(name: str, dtype: torch.dtype, frozen: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().to(dtype).eval()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if frozen == "first_weight":
        linears[0].weight.requires_grad_(False)
    elif frozen == "middle" and len(linears) > 2:
        linears[1].requires_grad_(False)
    x = torch.randn(9, 5, dtype=dtype)
    z_ref, ref = _general(model, x, 4)
    z, got = _chain(model, x, 4)
    assert torch.equal(z, z_ref)
    assert len(got) == len(ref)
    for (a, d), (a_ref, d_ref) in zip(got, ref):
        assert a.shape == a_ref.shape and d.shape == d_ref.shape
        assert torch.equal(a, a_ref)
        assert torch.equal(d, d_ref)


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)),  # in place
    nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)),  # not element-wise
    nn.Sequential(nn.Linear(3, 4), nn.Tanh()),  # does not end in a Linear
    nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)),  # an activation not in the table
])
def test_plan_chain_refuses_what_it_does_not_know(model: nn.Module) -> None:
    sites, explicit = plan_curvature(model, dict(model.named_parameters()), "auto")
    assert plan_chain(model, sites, explicit) is None


def test_shared_linear_and_subclass_are_refused() -> None:
    lin = nn.Linear(4, 4)
    for shared in (nn.Sequential(lin, nn.Tanh(), lin), nn.Sequential(lin, lin)):
        sites, explicit = plan_curvature(shared, dict(shared.named_parameters()), "auto")
        assert plan_chain(shared, sites, explicit) is None

    class Seq(nn.Sequential):
        pass

    sub = Seq(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    sites, explicit = plan_curvature(sub, dict(sub.named_parameters()), "auto")
    assert plan_chain(sub, sites, explicit) is None


def test_a_hook_or_a_3d_input_takes_the_general_path_with_the_same_step() -> None:
    def run(hook: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        opt = EGN(model, loss="cross_entropy", lr=0.5, line_search=True)
        assert opt._chain is not None
        calls = []
        if hook:  # a no-op hook: the step must not use the chain, and must give the same result
            model[1].register_forward_hook(lambda m, i, o: calls.append(1))
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            opt.step(inputs=torch.randn(8, 5, generator=g, dtype=torch.float64),
                     targets=torch.randint(0, 3, (8,), generator=g))
        assert bool(calls) == hook
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    torch.testing.assert_close(run(True), run(False), rtol=1e-13, atol=1e-15)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    sites, explicit = plan_curvature(model, dict(model.named_parameters()), "auto")
    chain = plan_chain(model, sites, explicit)
    assert chain is not None
    assert not chain.usable((torch.randn(2, 4, 5),))
    assert not chain.usable((torch.randn(2, 5), torch.randn(2, 5)))


def test_a_chain_in_train_mode_steps_in_eval_mode_and_gets_its_modes_back() -> None:
    def run(train: bool) -> tuple[torch.Tensor, list[bool]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).double()
        model.train(train)
        model[1].training = False  # a mixed state must come back as it was
        opt = EGN(model, loss="cross_entropy", lr=0.5, line_search=True)
        assert opt._chain is not None
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            opt.step(inputs=torch.randn(8, 5, generator=g, dtype=torch.float64),
                     targets=torch.randint(0, 3, (8,), generator=g))
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), [m.training for m in model.modules()]

    w_train, modes_train = run(True)
    w_eval, modes_eval = run(False)
    assert torch.equal(w_train, w_eval)  # dropout is off inside the step
    assert modes_train == [True, True, False, True, True] and not any(modes_eval)


@pytest.mark.parametrize("chain", [True, False])
def test_what_outlives_a_step_is_not_an_inference_tensor(chain: bool) -> None:
    """The solve and Jᵀv (and a chain's whole curvature pass) run under inference_mode: the momentum
    buffers, the parameters and the returned loss must stay normal tensors (usable by autograd, updatable
    in place, loadable from a checkpoint)."""
    torch.manual_seed(0)
    norm = [] if chain else [nn.LayerNorm(6)]  # a LayerNorm: the general capture (autograd)
    model = nn.Sequential(nn.Linear(5, 6), *norm, nn.Tanh(), nn.Linear(6, 3)).double()
    opt = EGN(model, loss="cross_entropy", lr=0.5, momentum=0.5, line_search=True, adaptive_damping=True)
    assert (opt._chain is not None) == chain
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    for _ in range(3):
        loss = opt.step(inputs=x, targets=y)
    assert not loss.is_inference()
    buffers = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert buffers and not any(t.is_inference() for t in buffers)
    assert not any(p.is_inference() for p in model.parameters())
    nn.functional.cross_entropy(model(x), y).backward()  # autograd through the stepped parameters
    with torch.no_grad():
        for t in buffers:
            t.mul_(1.0)  # in place outside inference mode
    opt.load_state_dict(opt.state_dict())
    opt.step(inputs=x, targets=y)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_a_bare_linear_steps_through_the_chain_with_the_general_paths_bits(loss: str) -> None:
    """A model that is one ``nn.Linear`` (linear or logistic regression) takes the chain: the same
    parameters, bit for bit, as the general capture over steps with momentum and line search."""
    def run(chain: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Linear(6, 3)
        opt = EGN(model, loss=loss, lr=1.0, damping=0.3, momentum=0.8, line_search=True)
        assert opt._chain is not None
        if not chain:
            opt._chain = None
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            x = torch.randn(16, 6, generator=g)
            y = torch.randn(16, 3, generator=g) if loss == "mse" else torch.randint(0, 3, (16,), generator=g)
            opt.step(inputs=x, targets=y)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)
