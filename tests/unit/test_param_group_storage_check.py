"""The constructor's storage check (parameters over the same memory are refused) with one param group per
parameter, as layer-wise lr decay builds them: every group was checked again at each later group's
``add_param_group``, so the constructor grew as groups x parameters (2000 groups: 8-17 s, against 0.4 s for
torch's AdamW). Each parameter is now examined once while the constructor adds its groups, and the
refusals are those of the full check after each group."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from lightning_soaa import SOAA, AdamW
from lightning_soaa.optim import param_checks


def _per_parameter_groups(n: int) -> list[dict]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(n // 2)])
    return [{"params": [(name, p)], "lr": 1e-3 * 0.99 ** i} for i, (name, p) in enumerate(model.named_parameters())]


@pytest.mark.parametrize("cls", [AdamW, SOAA])
def test_each_parameter_storage_examined_once_at_construction(cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    """Structural, not timed: the storage check looks at each parameter once over the constructor's groups
    (it looked at every earlier group's parameters again at each group: 200 groups, 20100 looks)."""
    seen: list[int] = []
    real = param_checks.is_dtensor

    def counting(p: torch.Tensor) -> bool:
        seen.append(id(p))
        return real(p)

    monkeypatch.setattr(param_checks, "is_dtensor", counting)
    groups = _per_parameter_groups(200)
    params = [g["params"][0][1] for g in groups]
    cls(groups, lr=1e-3)
    assert len(seen) == len(params), f"{len(seen)} looks at {len(params)} parameters"
    assert sorted(seen) == sorted(id(p) for p in params)


def _reference_refusal(groups: list[dict]) -> str:
    """What the check of every parameter after each group (the old construction) refuses first."""
    named = type("ShardedAdamW", (), {})()
    params: list[torch.Tensor] = []
    for g in groups:
        params.extend(g["params"])
        try:
            param_checks.check_disjoint_storage(named, params, [f"#{i}" for i in range(len(params))])
        except ValueError as e:
            return str(e)
    return "ok"


def _addresses(t: torch.Tensor) -> list[int]:
    """The byte address of every element of ``t`` (a small tensor), straight from its strides."""
    base = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
    idx = torch.zeros((), dtype=torch.long)
    for size, stride in zip(t.shape, t.stride()):
        idx = idx.unsqueeze(-1) + torch.arange(size) * stride
    return [base + int(i) * t.element_size() for i in idx.reshape(-1)]


def _naive_overlap(groups: list[dict]) -> bool:
    """Whether any element's memory is used twice, within one parameter or between two (brute force:
    independent of param_checks)."""
    seen: set[int] = set()
    for g in groups:
        for p in g["params"]:
            mine = _addresses(p)
            if len(set(mine)) < len(mine) or seen.intersection(mine):
                return True
            seen.update(mine)
    return False


def test_refusals_are_those_of_the_full_check_after_each_group() -> None:
    """Random groups of views into one buffer and of tensors of their own (overlapping, nested, strided):
    the constructor names the same parameter pair as checking every parameter after each group."""
    rng = random.Random(0)
    flat = torch.randn(400)
    refused = 0
    for _ in range(60):
        groups = []
        for _ in range(rng.randint(1, 6)):
            params = []
            for _ in range(rng.randint(1, 4)):
                a, n = rng.randint(0, 380), rng.randint(1, 16)
                kind = rng.random()
                t = flat[a:a + n] if kind < 0.4 else flat[a:a + 2 * n:2] if kind < 0.6 else torch.randn(n)
                params.append(nn.Parameter(t))
            groups.append({"params": params})
        expected = _reference_refusal(groups)
        try:
            AdamW(groups, lr=1e-3)
            got = "ok"
        except ValueError as e:
            got = str(e)
        assert got == expected
        assert (got != "ok") == _naive_overlap(groups), (got, groups)
        refused += got != "ok"
    assert 10 < refused < 60  # both outcomes covered


def test_group_added_after_construction_sees_memory_moved_since() -> None:
    """After construction a parameter's memory may change (``p.data = ...``, ``model.half()``): a group
    added then is checked against where the parameters are now, not where they were when built."""
    a, b = nn.Parameter(torch.randn(3, 5)), nn.Parameter(torch.randn(5, 3))
    opt = AdamW([a], lr=1e-3)
    a.data = b.data.t()  # a is now a view of b's memory
    with pytest.raises(ValueError, match=r"parameters #0 and #1 share memory"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [nn.Parameter(torch.randn(2))]})  # a fresh one is accepted
    assert len(opt.param_groups) == 2
