"""EGN steps the function ``model(x)`` computes, whatever a user did to the modules: hooks on the model,
on its layers or global ones, a forward patched on an instance, a Sequential edited after EGN was built,
a parametrization, a layer called with gradients off. Each setup either matches the float64 oracle of
that function, or is refused with a message that names the cause and changes nothing."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook

from lightning_soaa.optim.egn import EGN
from lightning_soaa.optim.egn_capture import COUPLING_MESSAGE
from tests.unit._egn_oracle import direct_direction, flat_params

DT = torch.float64


class Net(nn.Module):
    """Not a Sequential: traced as a chain when nothing interferes, else the general capture."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.act(self.a(x)))


def _seq() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, 5, generator=g, dtype=DT), torch.randn(8, 3, generator=g, dtype=DT)


def _step_matches_oracle(model: nn.Module, copy_for_oracle: bool = True, **kw: object) -> EGN:
    """One EGN step (lr 1, no line search) equals the oracle's direction of the model as it stands."""
    x, y = _data()
    ref_model = copy.deepcopy(model) if copy_for_oracle else model
    ref = direct_direction(ref_model.eval(), x, y, "mse", damping=0.3)["d"]
    model.train()
    opt = EGN(model, loss="mse", lr=1.0, damping=0.3, **kw)  # type: ignore[arg-type]
    w0 = flat_params(model)
    opt.step(inputs=x, targets=y)
    torch.testing.assert_close(flat_params(model) - w0, ref, rtol=1e-9, atol=1e-12)
    return opt


def test_the_plain_net_is_traced() -> None:
    """(so the hook tests below run the traced chain's checks where they apply)"""
    assert _step_matches_oracle(Net().to(DT))._trace is not None


def _refused(model: nn.Module, match: str, **kw: object) -> None:
    x, y = _data()
    opt = EGN(model, loss="mse", lr=1.0, damping=0.3, **kw)  # type: ignore[arg-type]
    w0 = flat_params(model)
    with pytest.raises(ValueError, match=match):
        opt.step(inputs=x, targets=y)
    assert torch.equal(flat_params(model), w0)


@pytest.fixture(autouse=True)
def _float64() -> None:
    torch.manual_seed(1)


HOOKS: dict[str, Callable[..., object]] = {
    "scale": lambda mod, args, out: out * 2.0,
    "tanh": lambda mod, args, out: torch.tanh(out),
    "observe": lambda mod, args, out: None,
}


@pytest.mark.parametrize("hook", sorted(HOOKS))
@pytest.mark.parametrize("where", ["sequential_root", "sequential_layer", "net_layer"])
def test_forward_hooks_that_change_outputs_are_stepped_through(where: str, hook: str) -> None:
    """A hook on the Sequential itself (the planned chain ran its children directly and ignored it), or on
    a factored Linear (ours ran after it and took its output for the layer's own)."""
    model: nn.Module = (_seq() if where.startswith("sequential") else Net()).to(DT)
    target = {"sequential_root": model, "sequential_layer": model[0] if where == "sequential_layer" else None,
              "net_layer": getattr(model, "a", None)}[where]
    assert target is not None
    target.register_forward_hook(HOOKS[hook])
    _step_matches_oracle(model)


def test_a_pre_hook_on_the_sequential_is_stepped_through() -> None:
    model = _seq().to(DT)
    model.register_forward_pre_hook(lambda mod, args: (args[0] * 2.0,))
    _step_matches_oracle(model)


def test_a_hook_that_uses_the_layer_weight_is_refused() -> None:
    model = Net().to(DT)
    model.a.register_forward_hook(lambda mod, args, out: out + 0.5 * mod.weight.sum(1))
    _refused(model, "'a.weight' is used outside its nn.Linear's own call")


def _scale_linear(mod: nn.Module, args: object, out: Tensor) -> Tensor | None:
    return out * 2.0 if isinstance(mod, nn.Linear) else None


def _scale_linear_in_place(mod: nn.Module, args: object, out: Tensor) -> None:
    if isinstance(mod, nn.Linear):
        out.mul_(2.0)  # returns None: the traced chain's own checks (identity, versions) see nothing


@pytest.mark.parametrize("changer", [_scale_linear, _scale_linear_in_place])
@pytest.mark.parametrize("make", [Net, _seq])
def test_global_forward_hooks(make: Callable[[], nn.Module], changer: Callable[..., object]) -> None:
    """Global hooks run before any module's own: one that changes a Linear's output is refused (the
    layer's own output is no longer seen); one that only observes changes nothing."""
    handle = register_module_forward_hook(changer)
    try:
        _refused(make().to(DT), "global forward hook .* changed the output of the Linear layer '(a|0)'")
    finally:
        handle.remove()
    seen: list[str] = []
    handle = register_module_forward_hook(lambda mod, args, out: seen.append(type(mod).__name__))
    try:
        _step_matches_oracle(make().to(DT))
    finally:
        handle.remove()
    assert "Linear" in seen


def test_a_forward_patched_on_a_linear_instance_is_not_factored() -> None:
    """``layer.forward = ...`` (as wrapper libraries do): the layer no longer computes x Wᵀ + b."""
    model = Net().to(DT)
    lin = model.a
    lin.forward = lambda inp: 0.5 * F.linear(inp, lin.weight, lin.bias)  # type: ignore[method-assign]
    # the lambda reads the original module's parameters: the oracle runs on the model itself
    _step_matches_oracle(model, copy_for_oracle=False)


def test_a_sequential_edited_after_egn_was_built() -> None:
    model = _seq().to(DT)
    x, y = _data()
    opt = EGN(model, loss="mse", lr=1.0, damping=0.3)
    opt.step(inputs=x, targets=y)
    model[1] = nn.ReLU()
    ref = direct_direction(copy.deepcopy(model).eval(), x, y, "mse", damping=0.3)["d"]
    w0 = flat_params(model)
    opt.step(inputs=x, targets=y)
    torch.testing.assert_close(flat_params(model) - w0, ref, rtol=1e-9, atol=1e-12)


def test_building_egn_leaves_a_spectral_norm_model_unchanged() -> None:
    """Reading a parametrized Linear's ``weight`` runs the parametrization (spectral norm's power
    iteration in training mode): building EGN must not, and the layer is not factored."""
    model = Net().to(DT)
    torch.nn.utils.parametrizations.spectral_norm(model.a)
    model.train()
    u = model.a.parametrizations.weight[0]._u.clone()
    x, y = _data()
    ref = direct_direction(copy.deepcopy(model).eval(), x, y, "mse", damping=0.3)["d"]
    opt = EGN(model, loss="mse", lr=1.0, damping=0.3)
    assert torch.equal(model.a.parametrizations.weight[0]._u, u)
    assert [s.path for s in opt._sites] == ["b"]
    w0 = flat_params(model)
    opt.step(inputs=x, targets=y)
    torch.testing.assert_close(flat_params(model) - w0, ref, rtol=1e-9, atol=1e-12)


class _StopGrad(nn.Module):
    """A trained Linear also called with gradients off (a stop-gradient branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.head = nn.Linear(5, 4), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            frozen = self.enc(x)
        return self.head(torch.cat([torch.tanh(self.enc(x)), frozen], dim=1))


def test_a_layer_called_with_gradients_off() -> None:
    _refused(_StopGrad().to(DT), "'enc' was called with gradients disabled .* jacobian='explicit'")
    _step_matches_oracle(_StopGrad().to(DT), jacobian="explicit")


def test_modules_without_torch_func_support_are_named() -> None:
    class Rnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.out = nn.GRU(5, 4, batch_first=True), nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(self.rnn(x.unsqueeze(1))[0][:, -1])

    _refused(Rnn().to(DT), "nn.GRU")


def test_the_coupling_message_points_sequence_first_models_to_explicit() -> None:
    assert "sequence-first" in COUPLING_MESSAGE and "jacobian='explicit'" in COUPLING_MESSAGE


class _Residual(nn.Module):
    """Not a chain: the general capture, whose guard refuses a Linear's parameters used outside its call."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.ln, self.b = nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        return self.b(h + torch.tanh(self.ln(h)))


@pytest.mark.parametrize("where", ["root", "submodule"])
def test_a_model_compiled_in_place_is_stepped_eagerly(where: str) -> None:
    """``model.compile()`` leaves no wrapper to unwrap: the module's own calls run the compiled graph,
    whose fused addmm EGN's capture refused as a use of ``a.bias`` outside its layer. EGN's step runs
    the eager forwards; the user's calls stay compiled after it."""
    torch._dynamo.reset()
    model = _Residual().to(DT)
    target = model if where == "root" else model.a
    target.compile(backend="eager")
    compiled = target.__dict__["_compiled_call_impl"]
    _step_matches_oracle(model)
    assert target.__dict__["_compiled_call_impl"] is compiled


def test_a_forward_under_autocast_is_refused_naming_it() -> None:
    """accelerate's mixed_precision replaces model.forward with an autocast wrapper (outputs cast back to
    float32): the Linear layers computed in bf16 and the capture's tensordot raised torch's "both inputs
    should have same dtype". Refused naming the layer and autocast, parameters unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    plain_forward = model.forward

    def autocast_forward(*args: Any) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return plain_forward(*args).float()

    model.forward = autocast_forward  # type: ignore[method-assign]  # what the wrapper does
    opt = EGN(model, loss="mse")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"'0' computed in torch.bfloat16 while its weight is torch.float32: "
                                         r"the model's forward runs under autocast"):
        opt.step(inputs=torch.randn(16, 4), targets=torch.randn(16, 2))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class _Swapped(nn.Module):
    """A trained Linear run through ``torch.func.functional_call`` with another weight (a hypernetwork's
    or a teacher's): the output does not depend on ``a.weight`` at all (autograd gives it no gradient)."""

    def __init__(self, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.a, self.act, self.b = nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)
        self.register_buffer("other", torch.randn(7, 5) * 0.3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.func.functional_call(self.a, {"weight": self.other}, (x,))
        return self.b(self.act(h + x.sum(1, keepdim=True) if self.residual else h))


@pytest.mark.parametrize("residual", [False, True], ids=["traced", "general"])
def test_a_linear_called_with_another_weight_is_refused(residual: bool) -> None:
    """The Gram factors gave the unused ``a.weight`` Jacobian rows a ⊗ δ: it moved 0.15 in one step and
    every other parameter's step was 2e-2 off. Refused on both captures, naming the parameter; the explicit
    Jacobians step the function as it is."""
    _refused(_Swapped(residual).to(DT), r"nn.Linear 'a' was called with another tensor in place of its trained "
                                        r"parameter 'a.weight' .*jacobian='explicit'")
    model = _Swapped(residual).to(DT)
    model.a.weight.requires_grad_(False)  # the oracle's Jacobian has no column for a parameter out of use
    _step_matches_oracle(model)


def _scaled_direction(model: nn.Module, first_layer_scale: float, all_scale: float) -> Tensor:
    """The oracle's step with the Jacobian a back-signal-scaling hook defines: every column times
    ``all_scale``, the first Linear's (the first 5·7 + 7 columns) once more times ``first_layer_scale``."""
    x, y = _data()
    o = direct_direction(copy.deepcopy(model).eval(), x, y, "mse", damping=0.3)
    jmat = o["J"] * all_scale
    jmat[:, :42] *= first_layer_scale
    n = jmat.shape[1]
    return torch.linalg.solve(jmat.T @ o["Q"] @ jmat + x.shape[0] * 0.3 * torch.eye(n, dtype=DT), jmat.T @ o["r"])


@pytest.mark.parametrize("kind", ["full_pre", "full", "global_pre"])
@pytest.mark.parametrize("make", [Net, _seq])
def test_backward_hooks_that_change_back_signals_are_stepped_through(make: Callable[[], nn.Module],
                                                                      kind: str) -> None:
    """A gradient-scaling backward hook (gradient reversal, per-layer scaling) ran on the general capture's
    autograd back-signals but not on the chain captures' (no autograd there): the same function and batch
    stepped 2.9e-2 apart depending on how the forward was written. Every path now takes the Jacobian the
    hooks define, as a first-order optimizer takes the gradient they define."""
    from torch.nn.modules.module import register_module_full_backward_pre_hook

    model = make().to(DT)
    last = model.b if isinstance(model, Net) else model[2]
    if kind == "full":  # the back-signal leaving the last layer toward the first: the first layer's rows
        expected = _scaled_direction(model, 0.5, 1.0)
        handle = last.register_full_backward_hook(lambda m, gi, go: (gi[0] * 0.5,))
    else:  # the back-signal entering the last layer: every row
        expected = _scaled_direction(model, 1.0, 0.5)
        if kind == "full_pre":
            handle = last.register_full_backward_pre_hook(lambda m, go: (go[0] * 0.5,))
        else:
            handle = register_module_full_backward_pre_hook(lambda m, go: (go[0] * 0.5,) if m is last else None)
    try:
        x, y = _data()
        opt = EGN(model, loss="mse", lr=1.0, damping=0.3)
        w0 = flat_params(model)
        opt.step(inputs=x, targets=y)
        torch.testing.assert_close(flat_params(model) - w0, expected, rtol=1e-9, atol=1e-12)
    finally:
        handle.remove()
    if make is _seq:  # the hook gone, the planned chain is used again
        assert opt._chain is not None and opt._chain.usable((x,))


class _CheckpointedNorm(nn.Module):
    """A checkpoint region (use_reentrant=False) and a trained LayerNorm, which needs explicit Jacobians."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.ln, self.b = nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3)
        self.checkpointed = True

    def forward(self, x: Tensor) -> Tensor:
        def inner(t: Tensor) -> Tensor:
            return torch.tanh(self.a(t))

        h = torch.utils.checkpoint.checkpoint(inner, x, use_reentrant=False) if self.checkpointed else inner(x)
        return self.b(self.ln(h))


def test_a_checkpoint_region_with_explicit_jacobians_is_named() -> None:
    """torch.func's "don't yet support saved tensor hooks" read as a module without torch.func support (GRU):
    the message names the checkpoint region and the parameter that needs explicit Jacobians; with that one
    frozen the factored layers step through the region."""
    _refused(_CheckpointedNorm().to(DT), r"torch.utils.checkpoint region .* \('ln.weight' and others\): freeze")
    model = _CheckpointedNorm().to(DT)
    model.ln.requires_grad_(False)
    plain = copy.deepcopy(model)
    plain.checkpointed = False  # the same function; torch.func (the oracle) cannot run the region
    x, y = _data()
    ref = direct_direction(plain.eval(), x, y, "mse", damping=0.3)["d"]
    opt = EGN(model, loss="mse", lr=1.0, damping=0.3)
    w0 = flat_params(model)
    opt.step(inputs=x, targets=y)
    torch.testing.assert_close(flat_params(model) - w0, ref, rtol=1e-9, atol=1e-12)


def test_a_backward_hook_where_explicit_jacobians_are_needed_is_named() -> None:
    """torch wraps a module with a full backward hook in an autograd.Function, which torch.func (explicit
    Jacobians) cannot run: the refusal named nn.GRU-like modules; it names the backward hook."""
    model = _CheckpointedNorm().to(DT)
    model.checkpointed = False
    model.b.register_full_backward_hook(lambda m, gi, go: None)
    _refused(model, r"runs a module with a backward hook .* \('ln.weight' and others\): freeze")


class _KeptView(nn.Module):
    """A tied decoder whose transposed weight is a view kept from ``__init__`` (torch trains it like
    ``self.a.weight.t()`` written in the forward: the view reads the parameter at every call)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)
        self.tied = self.a.weight.t()  # [5, 7]: a view of a.weight, not a parameter

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.a(x))
        return self.b(h) + F.linear(h, self.tied)[:, :3]  # a decoder back to the input's 5, cut to 3


def test_a_view_of_a_layer_weight_made_before_the_forward_is_refused() -> None:
    """The guard matched parameters by identity, so the kept view passed unseen: the Gram factors missed
    its part of the Jacobian and the step was 0.17 (relative) off the explicit Levenberg-Marquardt step,
    silently. A view's base is now matched too: refused, naming the parameter, as for ``.t()`` in the
    forward."""
    model = _KeptView().to(DT)
    model.tied = model.a.weight.t()  # again, after .to(DT) made a new parameter
    _refused(model, "'a.weight' is used outside its nn.Linear's own call")


class _VmappedEnsemble(nn.Module):
    """An ensemble by torch.func.stack_module_state: each member's weights run through functional_call on
    the registered base Linear, under torch.vmap; the base layer is also used as itself."""

    def __init__(self) -> None:
        super().__init__()
        members = [nn.Linear(5, 3) for _ in range(2)]
        params, _ = torch.func.stack_module_state(members)  # type: ignore[arg-type]
        self.w = nn.Parameter(params["weight"].detach().clone())
        self.bias_ = nn.Parameter(params["bias"].detach().clone())
        self.base = members[0]

    def forward(self, x: Tensor) -> Tensor:
        def member(w: Tensor, b: Tensor) -> Tensor:
            return torch.func.functional_call(self.base, {"weight": w, "bias": b}, (x,))

        return torch.vmap(member)(self.w, self.bias_).mean(0) + self.base(x)


def test_a_linear_called_with_other_weights_under_vmap_names_the_swap() -> None:
    """Under torch.vmap the swapped call's output needs no grad, and the hook's 'called with gradients
    disabled' message (a consequence) won over the swap the guard had seen first (the cause)."""
    _refused(_VmappedEnsemble().to(DT), r"nn.Linear 'base' was called with another tensor in place of its trained")


def test_a_step_inside_parametrize_cached_is_refused() -> None:
    """Every forward of the step read the weights the cache held (computed before): refused at the step,
    naming the block, where it raised about batch dependence or, with the cache filled under no_grad,
    stepped the other parameters by a wrong Jacobian (0.23 relative off), silently."""
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)
    torch.nn.utils.parametrizations.weight_norm(model[0])
    opt = EGN(model, loss="mse", lr=1.0, damping=0.3)
    x, y = _data()
    w0 = flat_params(model)
    with torch.nn.utils.parametrize.cached():
        with torch.no_grad():
            model(x)  # fills the cache
        with pytest.raises(ValueError, match=r"inside torch.nn.utils.parametrize.cached\(\)"):
            opt.step(inputs=x, targets=y)
    assert torch.equal(flat_params(model), w0)
    opt.step(inputs=x, targets=y)  # outside the block: steps
    assert not torch.equal(flat_params(model), w0)


@pytest.mark.parametrize("how", ["script", "trace", "submodule"])
def test_a_torchscript_model_is_refused_at_construction(how: str) -> None:
    """EGN hooks and swaps eager modules' parameters; a ScriptModule's first step failed with
    "'OrderedModuleDict' object has no attribute 'get'". Refused when built, naming the module."""
    x, _ = _data()
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)
    if how == "script":
        model = torch.jit.script(model)
    elif how == "trace":
        model = torch.jit.trace(model, (x,))
    else:
        model[2] = torch.jit.script(model[2])
    where = "module '2'" if how == "submodule" else "the model"
    with pytest.raises(ValueError, match=rf"EGN: {where} is a TorchScript module"):
        EGN(model, loss="mse")


class _Attention(nn.Module):
    """MHA reads out_proj.weight inside F.multi_head_attention_forward, never calling out_proj."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mha, self.head = nn.Linear(5, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        return self.head(self.mha(h, h, h, need_weights=False)[0].mean(1))


def test_multihead_attention_out_proj_gets_explicit_jacobians_under_auto() -> None:
    """Under "auto" the out_proj was planned as a factored Linear; its hook never fired and the guard refused
    the model ('used outside its nn.Linear's own call'), though "explicit" trained it. It is planned explicit
    now; the Linears around it stay factored, and the step equals the float64 oracle."""
    model = _Attention().to(DT)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 4, 5, generator=g, dtype=DT), torch.randn(6, 3, generator=g, dtype=DT)
    ref = direct_direction(copy.deepcopy(model).eval(), x, y, "mse", damping=0.3)["d"]
    opt = EGN(model, loss="mse", lr=1.0, damping=0.3)
    assert [s.path for s in opt._sites] == ["inp", "head"]
    w0 = flat_params(model)
    opt.step(inputs=x, targets=y)
    torch.testing.assert_close(flat_params(model) - w0, ref, rtol=1e-9, atol=1e-12)
