"""ASGO's ``nesterov`` (default True; Muon's Nesterov direction, ``D = beta1 M_t + (1 - beta1) G_t``
preconditioned instead of ``M_t``; False is the paper's rule): the rule against an independent float64
transcription, per-group use (the other groups and the AdamW fallback bit for bit as without it), validation,
checkpoints (one saved before the option existed resumes with the paper's rule), the entry points (factory, DCP
options), and torch's ``nesterov`` group key, still refused by the optimizers that do not implement it."""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import pytest
import torch
from torch import nn

from lightning_soaa import ASGO
from lightning_soaa.config import ASGOConfig
from lightning_soaa.functional.asgo import nesterov_direction
from lightning_soaa.registry import FirstArg, OptimizerSpec
from tests.conformance._battery import SPECS, assert_identical, make, params, step
from tests.harness.models import batch, loss_fn, tiny_mlp

f64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inv_sqrt(v: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(v)
    return (evecs * evals.rsqrt()) @ evecs.T


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("root_every", [1, 2])
@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (6, 6)])
def test_nesterov_oracle(shape: tuple[int, int], root_every: int, steps: int) -> None:
    """P_t (beta1 M_t + (1 - beta1) G_t) (left; right: D P_t), RMS-normalised, with weight decay; M_t and
    V_t as without Nesterov. One step and several, the root stored for ``root_every`` steps."""
    m, n = shape
    lr, wd, b1, b2 = 0.05, 0.1, 0.9, 0.8
    left = m < n
    w = nn.Parameter(torch.randn(m, n, dtype=f64, generator=_gen(3)))
    ref = w.detach().clone()
    opt = ASGO([w], lr=lr, betas=(b1, b2), weight_decay=wd, inverse_root="eigh", root_every=root_every,
               nesterov=True)
    mom = torch.zeros(m, n, dtype=f64)
    v = torch.zeros((m, m) if left else (n, n), dtype=f64)
    p = None
    for t in range(steps):
        g = torch.randn(m, n, dtype=f64, generator=_gen(30 + t))
        mom = b1 * mom + (1 - b1) * g
        v = b2 * v + (1 - b2) * (g @ g.T if left else g.T @ g)
        if t % root_every == 0:
            p = _inv_sqrt(v)
        d = b1 * mom + (1 - b1) * g
        u = p @ d if left else d @ p
        ref = ref * (1 - lr * wd) - lr * 0.2 * math.sqrt(m * n) * u / u.norm()
        w.grad = g
        opt.step()
        torch.testing.assert_close(w.detach(), ref, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(opt.state[w]["exp_avg"], mom, rtol=1e-14, atol=1e-15)  # M_t unchanged


def test_nesterov_direction_is_the_lerp_of_the_rule() -> None:
    mom, g = (torch.randn(4, 7, dtype=f64, generator=_gen(s)) for s in (1, 2))
    torch.testing.assert_close(nesterov_direction(mom, g, 0.9), 0.9 * mom + 0.1 * g, rtol=1e-15, atol=1e-15)
    assert torch.equal(nesterov_direction(mom, g, 0.0), g)


def _fixed_grad_run(groups: list[dict[str, Any]], steps: int = 4, **kw: Any) -> list[torch.Tensor]:
    """ASGO over fresh copies of three parameters (two matrices, a bias: the AdamW fallback) in ``groups``
    (``{"idx": [...], **options}``), stepped on fixed gradients (independent of the parameters)."""
    shapes = [(5, 9), (7, 4), (7,)]
    ps = [nn.Parameter(torch.randn(s, dtype=f64, generator=_gen(i))) for i, s in enumerate(shapes)]
    opt = ASGO([{"params": [(f"p{i}", ps[i]) for i in g["idx"]], **{k: v for k, v in g.items() if k != "idx"}}
                for g in groups], lr=0.03, **kw)
    for t in range(steps):
        for i, p in enumerate(ps):
            p.grad = torch.randn(p.shape, dtype=f64, generator=_gen(100 * t + i))
        opt.step()
    return [p.detach().clone() for p in ps]


def test_nesterov_is_per_group_and_leaves_the_rest_bit_for_bit() -> None:
    """A group's ``nesterov`` changes its matrices only: the other group's matrix and the AdamW fallback
    (torch's AdamW has no Nesterov) step bit for bit as with it off; ``nesterov=True`` is the default."""
    on = _fixed_grad_run([{"idx": [0, 1, 2]}], nesterov=True)
    assert_identical(_fixed_grad_run([{"idx": [0, 1, 2]}]), on, "params")
    off = _fixed_grad_run([{"idx": [0, 1, 2]}], nesterov=False)
    assert not torch.equal(on[0], off[0]) and not torch.equal(on[1], off[1])
    assert torch.equal(on[2], off[2])  # the bias: AdamW
    mixed = _fixed_grad_run([{"idx": [0], "nesterov": True}, {"idx": [1, 2]}], nesterov=False)
    assert_identical([mixed[0], mixed[1], mixed[2]], [on[0], off[1], off[2]], "params")
    mixed = _fixed_grad_run([{"idx": [0], "nesterov": False}, {"idx": [1, 2]}])  # the paper's rule in one group
    assert_identical([mixed[0], mixed[1], mixed[2]], [off[0], on[1], on[2]], "params")


def test_nesterov_written_into_a_group_is_a_hyperparameter_like_betas() -> None:
    """Set after construction it is read at the next step (no block depends on it); a non-bool is refused
    there with nothing changed."""
    w = nn.Parameter(torch.randn(5, 9, dtype=f64, generator=_gen(0)))
    ref = nn.Parameter(w.detach().clone())
    opt, opt_ref = ASGO([w], lr=0.03, nesterov=False), ASGO([ref], lr=0.03, nesterov=True)
    for t in range(3):
        g = torch.randn(5, 9, dtype=f64, generator=_gen(10 + t))
        if t == 1:
            opt.param_groups[0]["nesterov"] = True
            w.data.copy_(ref.detach())  # the states agree (M and V do not see nesterov): so will the steps
        w.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        opt_ref.step()
        if t >= 1:
            assert torch.equal(w.detach(), ref.detach())
    before, sd = w.detach().clone(), copy.deepcopy(opt.state_dict())
    opt.param_groups[0]["nesterov"] = "yes"
    w.grad = torch.ones_like(w)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: Invalid nesterov='yes'\. Must be True or False\."):
        opt.step()
    assert torch.equal(w.detach(), before)
    opt.param_groups[0]["nesterov"] = True
    assert_identical(opt.state_dict(), sd)


@pytest.mark.parametrize("value", ["true", 1, 0, None, 1.0])
def test_nesterov_must_be_a_bool(value: Any) -> None:
    msg = rf"Invalid nesterov={value!r}\. Must be True or False\."
    with pytest.raises(ValueError, match=msg):
        ASGOConfig(nesterov=value)
    with pytest.raises(ValueError, match=msg):
        ASGO([nn.Parameter(torch.zeros(3, 4))], nesterov=value)
    with pytest.raises(ValueError, match=msg):
        ASGO([{"params": [nn.Parameter(torch.zeros(3, 4))], "nesterov": value}])


_CKPT_KW: dict[str, Any] = dict(lr=2e-2, max_block_size=4, root_every=2, damping=1e-6)


def _run(model: nn.Module, opt: Any, ts: range) -> None:
    for t in ts:
        opt.zero_grad()
        loss_fn(model, *batch(t, 0)).backward()
        opt.step()


def _uninterrupted(**kw: Any) -> list[torch.Tensor]:
    model = tiny_mlp()
    _run(model, ASGO(model.named_parameters(), **_CKPT_KW, **kw), range(7))
    return params(model)


def _saved_at_3(nesterov: bool) -> tuple[nn.Module, dict[str, Any]]:
    model = tiny_mlp()
    opt = ASGO(model.named_parameters(), nesterov=nesterov, **_CKPT_KW)
    _run(model, opt, range(3))
    return model, copy.deepcopy(opt.state_dict())


def _resumed(model: nn.Module, sd: dict[str, Any], **kw: Any) -> tuple[nn.Module, ASGO]:
    m2 = tiny_mlp(seed=99)
    m2.load_state_dict(model.state_dict())
    o2 = ASGO(m2.named_parameters(), **_CKPT_KW, **kw)
    o2.load_state_dict(sd)
    return m2, o2


@pytest.mark.parametrize("saved", [True, False])
def test_nesterov_checkpoint_resumes_bit_for_bit(saved: bool) -> None:
    """Saved in the groups, loaded into an optimizer built with the other value (the checkpoint's value is
    taken, as ``betas`` is), continuing as the uninterrupted run to the last bit; the two rules differ."""
    m1, sd = _saved_at_3(saved)
    assert [g["nesterov"] for g in sd["param_groups"]] == [saved]
    m2, o2 = _resumed(m1, sd, nesterov=not saved)
    assert o2.param_groups[0]["nesterov"] is saved
    _run(m2, o2, range(3, 7))
    assert_identical(params(m2), _uninterrupted(nesterov=saved), "params")
    assert not torch.equal(_uninterrupted(nesterov=not saved)[0], params(m2)[0])


def _without_nesterov(sd: dict[str, Any]) -> dict[str, Any]:
    """``sd`` as a version before the option wrote it: no ``nesterov`` in its groups."""
    return {**sd, "param_groups": [{k: v for k, v in g.items() if k != "nesterov"} for g in sd["param_groups"]]}


def test_a_checkpoint_saved_before_nesterov_existed_resumes_with_the_papers_rule(
        caplog: pytest.LogCaptureFixture) -> None:
    """A state dict without the key (an earlier version's: the paper's rule, nesterov off) loaded into the
    default optimizer (nesterov=True) resumes with nesterov=False, equal to the last bit to the run without
    Nesterov (torch's load keeps the current value of a missing key: it continued with Nesterov), and says
    that it overrode the built value; the default run is another one."""
    m1, sd = _saved_at_3(False)
    with caplog.at_level(logging.WARNING, logger="lightning_soaa.distributed.checkpoint"):
        m2, o2 = _resumed(m1, _without_nesterov(sd))
    assert o2.param_groups[0]["nesterov"] is False
    assert "saved without 'nesterov'" in caplog.text and "nesterov=False" in caplog.text
    _run(m2, o2, range(3, 7))
    assert_identical(params(m2), _uninterrupted(nesterov=False), "params")
    assert not torch.equal(_uninterrupted()[0], params(m2)[0])
    # torch's rebuild of it (set_optimizer_state_dict, FSDP.rekey_optim_state_dict: the metadata in the groups)
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    m3 = tiny_mlp()
    o3 = ASGO(m3.named_parameters(), nesterov=False, **_CKPT_KW)
    _run(m3, o3, range(3))
    torch_form = _without_nesterov(copy.deepcopy(get_optimizer_state_dict(m3, o3)))
    m4, o4 = tiny_mlp(seed=99), None
    m4.load_state_dict(m3.state_dict())
    o4 = ASGO(m4.named_parameters(), **_CKPT_KW)
    set_optimizer_state_dict(m4, o4, torch_form)
    assert o4.param_groups[0]["nesterov"] is False
    _run(m4, o4, range(3, 7))
    assert_identical(params(m4), _uninterrupted(nesterov=False), "params")


def test_nesterov_rides_in_the_dcp_metadata_not_as_a_flat_key() -> None:
    """DCP's form keeps only the options of its first version as keys of their own (a later one made every
    older checkpoint unloadable); ``nesterov`` is one of the later, carried in the JSON metadata."""
    from lightning_soaa.optim.dcp_state import _DCP_FLAT_OPTIONS, _json_options

    opt = ASGO([nn.Parameter(torch.zeros(3, 4))], nesterov=True)
    assert "nesterov" in _json_options(opt) and "nesterov" not in _DCP_FLAT_OPTIONS["ASGO"]


def test_the_factory_builds_asgo_with_nesterov() -> None:
    from lightning_soaa.lightning.factory import OptimizerFactory

    model = tiny_mlp()
    opt = OptimizerFactory("lightning_soaa.ASGO", {"lr": 0.02, "nesterov": True}).build(model)
    assert isinstance(opt, ASGO) and all(g["nesterov"] is True for g in opt.param_groups)


# ------------------------------------------------------------------ torch's key in other optimizers' groups
def _nesterov_key(spec: OptimizerSpec) -> None:
    implements = spec.name == "ASGO"
    if spec.first_arg is FirstArg.NAMED_PARAMETERS:
        named = list(tiny_mlp(0).named_parameters())
        if implements:
            assert spec.load()([{"params": named, "nesterov": True}], **spec.test_kwargs).param_groups[0]["nesterov"]
        else:
            with pytest.raises(ValueError, match=r"nesterov=True is a torch optimizer option that .* does not "
                                                 r"implement"):
                spec.load()([{"params": named, "nesterov": True}], **spec.test_kwargs)
            spec.load()([{"params": named, "nesterov": False}], **spec.test_kwargs)
    model, opt = make(spec)
    step(spec, model, opt, 0)
    w = params(model)
    opt.param_groups[0]["nesterov"] = True
    if implements:
        step(spec, model, opt, 1)
        assert not torch.equal(params(model)[0], w[0])
        return
    with pytest.raises(ValueError, match=r"param_groups\[0\]: nesterov=True is a torch optimizer option"):
        step(spec, model, opt, 1)
    assert_identical(params(model), w, "params")


def test_torch_nesterov_key_is_refused_except_by_asgo() -> None:
    """``nesterov=True`` in a group: ASGO's own option; every other optimizer (DASGO, SOAA, AdamW, EGN) still
    refuses it at construction and, written into a group later, at the step with nothing changed."""
    assert {s.name for s in SPECS} == {"ASGO", "DASGO", "SOAA", "AdamW", "EGN"}
    for spec in SPECS:
        _nesterov_key(spec)
