"""EGN's Kronecker solve: when the only trained layer is a Linear whose output is the model's (linear
regression, a linear probe on a frozen network) and the loss is MSE, K = G ⊗ I_c and the bc×bc system is
c right-hand sides of one b×b factorization. Checked against the float64 parameter-space oracle and
against the general (bc×bc) path, and refused wherever K does not have that form."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from lightning_soaa.functional.gram import (
    GramFactors,
    GramLayout,
    LinearFactorShape,
    assemble_gram,
    kronecker_sample_gram,
)
from lightning_soaa.optim import egn as egn_module
from lightning_soaa.optim.egn import CG_MIN_SIZE, EGN, SMALL_DENSE_MAX
from tests.unit._egn_oracle import direct_direction, flat_params

DT = torch.float64


def _identity_factors(b: int, c: int, d_in: int, *, weight: bool = True, bias: bool = True,
                      flagged: bool = False) -> tuple[GramLayout, GramFactors]:
    g = torch.Generator().manual_seed(b + c)
    a = torch.randn(b, 1, d_in, generator=g, dtype=DT)
    delta = torch.eye(c, dtype=DT).expand(b, c, c).reshape(b, c, 1, c).clone()
    layout = GramLayout(num_outputs=c, class_targets=False,
                        sites=(LinearFactorShape(1, d_in, c, weight=weight, bias=bias),), rest=0)
    z, y = torch.randn(b, c, generator=g, dtype=DT), torch.randn(b, c, generator=g, dtype=DT)
    return layout, GramFactors(z, y, [(a, delta)], None, identity=0 if flagged else -1)


@pytest.mark.parametrize("flagged", [False, True])
@pytest.mark.parametrize("weight,bias", [(True, True), (True, False), (False, True)])
def test_sample_gram_kron_identity_is_the_assembled_gram_bitwise(weight: bool, bias: bool, flagged: bool) -> None:
    layout, fac = _identity_factors(7, 3, 5, weight=weight, bias=bias, flagged=flagged)
    g = kronecker_sample_gram(layout, fac)
    assert g is not None and g.shape == (7, 7)
    assert torch.equal(torch.kron(g, torch.eye(3, dtype=DT)), assemble_gram(layout, fac))


def test_sample_gram_is_refused_where_k_is_not_a_kronecker_product() -> None:
    layout, fac = _identity_factors(6, 3, 4)
    bent = GramFactors(fac.outputs, fac.targets, [(fac.linear[0][0], fac.linear[0][1] * 1.5)], None)
    assert kronecker_sample_gram(layout, bent) is None  # Δ is not the identity (a layer before a frozen one)
    two = GramLayout(3, False, layout.sites * 2, 0)
    assert kronecker_sample_gram(two, GramFactors(fac.outputs, fac.targets, fac.linear * 2, None)) is None
    rows = torch.zeros(18, 2, dtype=DT)
    assert kronecker_sample_gram(GramLayout(3, False, layout.sites, 2),
                                 GramFactors(fac.outputs, fac.targets, fac.linear, rows)) is None
    seq = GramLayout(3, False, (LinearFactorShape(2, 4, 3),), 0)  # two positions per sample
    a2 = torch.randn(6, 2, 4, dtype=DT)
    d2 = torch.zeros(6, 3, 2, 3, dtype=DT)
    assert kronecker_sample_gram(seq, GramFactors(fac.outputs, fac.targets, [(a2, d2)], None)) is None


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, per solve, whether the Kronecker path was taken."""
    taken: list[bool] = []
    real = egn_module.kronecker_sample_gram

    def spy(layout: GramLayout, factors: GramFactors) -> Tensor | None:
        g = real(layout, factors)
        taken.append(g is not None)
        return g

    monkeypatch.setattr(egn_module, "kronecker_sample_gram", spy)
    return taken


def _probe() -> nn.Module:
    """A linear probe: a frozen tanh layer, a trained head."""
    m = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4)).double()
    m[0].requires_grad_(False)
    return m


def _frozen_head() -> nn.Module:
    """One trained layer of output width c, but before a frozen one: Δ ≠ I, the general path."""
    m = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    m[2].requires_grad_(False)
    return m


MODELS: dict[str, tuple[Callable[[], nn.Module], bool]] = {
    "linear": (lambda: nn.Linear(6, 4).double(), True),
    "linear_no_bias": (lambda: nn.Linear(6, 4, bias=False).double(), True),
    "probe": (_probe, True),
    "frozen_head": (_frozen_head, False),
}


@pytest.mark.parametrize("b", [16, 150])  # bc = 64 <= SMALL_DENSE_MAX; 600 >= CG_MIN_SIZE on the general path
@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_step_matches_the_parameter_space_oracle(name: str, b: int, monkeypatch: pytest.MonkeyPatch) -> None:
    assert 16 * 4 <= SMALL_DENSE_MAX and 150 * 4 >= CG_MIN_SIZE
    build, kron = MODELS[name]
    g = torch.Generator().manual_seed(b)
    x, y = torch.randn(b, 6, generator=g, dtype=DT), torch.randn(b, 4, generator=g, dtype=DT)
    torch.manual_seed(0)
    model = build()
    torch.manual_seed(0)
    ref = direct_direction(build(), x, y, "mse", damping=0.03)
    taken = _spy(monkeypatch)
    opt = EGN(model, loss="mse", lr=1.0, damping=0.03)
    w0 = flat_params(model)
    opt.step(inputs=x, targets=y)
    assert taken == [kron]
    torch.testing.assert_close(flat_params(model) - w0, ref["d"], rtol=1e-10, atol=1e-12)


def _run(model: nn.Module, kron: bool, steps: int, monkeypatch: pytest.MonkeyPatch, **kw: object) -> list[dict]:
    with monkeypatch.context() as m:
        if not kron:
            m.setattr(egn_module, "kronecker_sample_gram", lambda layout, factors: None)
        opt = EGN(model, loss="mse", **kw)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(3)
        out = []
        for _ in range(steps):
            x = torch.randn(40, 6, generator=g, dtype=DT)
            y = torch.tanh(x[:, :4]) + 0.1 * torch.randn(40, 4, generator=g, dtype=DT)
            opt.step(inputs=x, targets=y)
            out.append({"w": flat_params(model), **opt.statistics()})
    return out


@pytest.mark.parametrize("name", ["linear", "probe"])
def test_kronecker_and_general_solves_train_alike(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over 8 steps with momentum, line search and adaptive damping (which read gᵀd and (Jd)ᵀ(Jd) from the
    solve): the same parameters, damping and step sizes to float64 rounding."""
    build, _ = MODELS[name]
    kw = dict(lr=1.0, damping=0.5, momentum=0.7, line_search=True, adaptive_damping=True)
    runs = []
    for kron in (True, False):
        torch.manual_seed(0)
        runs.append(_run(build(), kron, 8, monkeypatch, **kw))
    for got, want in zip(*runs):
        torch.testing.assert_close(got["w"], want["w"], rtol=1e-10, atol=1e-12)
        assert got.keys() == want.keys()
        for key in want:
            if key != "w":
                assert got[key] == pytest.approx(want[key], rel=1e-8, abs=1e-12), key
    assert runs[0][-1]["damping"] != 0.5  # adaptive damping moved λ: its ρ was exercised


def test_max_gram_size_bounds_b_for_the_kronecker_solve(monkeypatch: pytest.MonkeyPatch) -> None:
    """max_gram_size guards memory: for a linear model under MSE the system is b×b, so b is what it bounds
    (b·c = 160 > 50 is solved); above it the error names the b×b matrix. Any other model keeps the bc bound."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(40, 6, generator=g, dtype=DT), torch.randn(40, 4, generator=g, dtype=DT)
    torch.manual_seed(0)
    model = nn.Linear(6, 4).double()
    torch.manual_seed(0)
    ref = direct_direction(nn.Linear(6, 4).double(), x, y, "mse", damping=0.03)
    taken = _spy(monkeypatch)
    opt = EGN(model, loss="mse", lr=1.0, damping=0.03, max_gram_size=50)
    w0 = flat_params(model)
    opt.step(inputs=x, targets=y)
    assert taken == [True]
    torch.testing.assert_close(flat_params(model) - w0, ref["d"], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"sample Gram matrix would be 60x60 .*b=60.*max_gram_size=50"):
        opt.step(inputs=torch.randn(60, 6, dtype=DT), targets=torch.randn(60, 4, dtype=DT))
    for other, loss, tgt in ((_probe(), "cross_entropy", torch.randint(0, 4, (20,))),
                             (_frozen_head(), "mse", torch.randn(20, 4, dtype=DT))):
        with pytest.raises(ValueError, match=r"Gram matrix would be 80x80 .*max_gram_size=50"):
            EGN(other, loss=loss, max_gram_size=50).step(inputs=torch.randn(20, 6, dtype=DT), targets=tgt)


@pytest.mark.parametrize("hook", ["forward", "backward"])
def test_a_hooked_linear_model_above_the_limit_is_refused_as_any_model(hook: str) -> None:
    """One Linear under MSE is admitted by b (K = G ⊗ I_c, a b x b solve); a forward hook that scales the
    output (or a backward pre-hook the signal) makes K another matrix, and the bc system above
    max_gram_size ended in an internal 'please report this' RuntimeError: the max_gram_size ValueError,
    nothing changed (the model without the hook steps)."""
    torch.manual_seed(1)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double()
    EGN(copy.deepcopy(model), loss="mse", max_gram_size=10).step(inputs=x, targets=y)  # b = 8 <= 10
    if hook == "forward":
        model.register_forward_hook(lambda m, i, o: o * 2)
    else:
        model[0].register_full_backward_pre_hook(lambda m, go: (go[0] * 0.5,))
    w0 = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"the Gram matrix would be 24x24 .* above max_gram_size=10"):
        EGN(model, loss="mse", max_gram_size=10).step(inputs=x, targets=y)
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
