"""The cheap paths of the step template keep every guarantee of the slow ones they replace.

* ``HyperparameterDigest``: the digest the rank would have computed afresh, whatever it reused (values
  changed in place included).
* ``StepRecord.values`` / ``host_floats`` / ``with_sums``: the same floats as the fp64 vector.
* A single process makes no collective and builds no agreement rows, yet raises a held error and skips
  a non-finite step as before.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

from lightning_soaa import SOAA, ShardedAdamW
from lightning_soaa.distributed import agreement
from lightning_soaa.distributed.hyper_digest import HyperparameterDigest
from lightning_soaa.functional.adamw import increment_counts_
from lightning_soaa.optim.base import StepRecord, host_floats, summed


def _groups(**over: Any) -> list[dict[str, Any]]:
    g = {"params": [torch.zeros(1)], "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "flag": True,
         "name": "a", "opt": None, "n": 3}
    g.update(over)
    return [g]


@pytest.mark.parametrize("a,b", [
    (dict(lr=0.0), dict(lr=-0.0)),  # canonical() tells the signs apart
    (dict(n=1), dict(n=1.0)),
    (dict(n=1), dict(n=True)),
    (dict(betas=(0.9, 0.999)), dict(betas=[0.9, 0.999])),
    (dict(lr=1e-3), dict(lr=1e-3 * (1 + 2**-52))),  # one ulp
    (dict(name="a"), dict(name="b")),
    (dict(opt=None), dict(opt="None")),
    (dict(lr=1e-3), dict(lr=torch.tensor(1e-3))),
])
def test_reused_digest_differs_whenever_the_digest_does(a: dict[str, Any], b: dict[str, Any]) -> None:
    """The cached digest (HyperparameterDigest) is the plain one, from a fresh cache and after a change."""
    ga, gb = _groups(**a), _groups(**b)
    assert agreement.hyperparameter_digest(ga) != agreement.hyperparameter_digest(gb)
    cached = HyperparameterDigest()
    assert cached(ga) == agreement.hyperparameter_digest(ga)
    ga[0].update(b)  # the same group object, changed in place as a scheduler or a user changes it
    assert cached(ga) == agreement.hyperparameter_digest(gb)


def test_values_changed_in_place_are_read_again() -> None:
    """Identity is trusted only for immutable values: a tensor lr, a list of betas or a dict changed in
    place still changes the digest."""
    groups = _groups(lr=torch.tensor(1e-3), betas=[0.9, 0.999], extra={"a": 1})
    cached = HyperparameterDigest()
    seen = {cached(groups)}
    for change in (lambda g: g["lr"].mul_(0.5), lambda g: g["betas"].__setitem__(0, 0.8),
                   lambda g: g["extra"].__setitem__("a", 2)):
        change(groups[0])
        now = cached(groups)
        assert now == agreement.hyperparameter_digest(groups) and now not in seen
        seen.add(now)
    assert cached(groups) == agreement.hyperparameter_digest(groups)  # unchanged: the same


def test_reused_digest_follows_every_change_of_the_groups() -> None:
    opt = ShardedAdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-2})
    for change in (lambda g: g.update(lr=g["lr"] * 0.5), lambda g: g.update(betas=(0.8, 0.99)),
                   lambda g: g.update(lr=torch.tensor(1e-4)), lambda g: g.update(lr=1e-4),
                   lambda g: g.update(weight_decay=-0.0), lambda g: g.pop("eps"),
                   lambda g: g.update(eps=1e-8)):
        for group in opt.param_groups:
            change(group)
            assert opt._hyper_digest() == agreement.hyperparameter_digest(opt.param_groups)
            assert opt._hyper_digest() == agreement.hyperparameter_digest(opt.param_groups)  # from the cache
    opt.param_groups.reverse()  # other groups at each place
    assert opt._hyper_digest() == agreement.hyperparameter_digest(opt.param_groups)
    opt.param_groups.pop()
    assert opt._hyper_digest() == agreement.hyperparameter_digest(opt.param_groups)


@dataclasses.dataclass
class _Rec(StepRecord):
    a: Any = summed()
    b: Any = summed()
    c: float = summed()
    plain: Any = None


def test_record_values_match_the_fp64_vector() -> None:
    rec = _Rec(nonfinite=0, a=torch.tensor(1.5, dtype=torch.float32), b=torch.tensor([2.25], dtype=torch.float64),
               c=3, plain="kept")
    assert _Rec.summed_fields() == ("nonfinite", "gradient_ranks", "a", "b", "c")
    assert StepRecord.summed_fields() == ("nonfinite", "gradient_ranks")  # the subclass's entry is its own
    assert rec.values() == [0.0, 0.0, 1.5, 2.25, 3.0]
    assert rec.vector().dtype == torch.float64 and rec.vector().tolist() == rec.values()
    back = rec.with_sums([1.0, 1.0, 2.0, 3.0, 4.0])
    assert (back.nonfinite, back.gradient_ranks, back.a, back.b, back.c, back.plain) == (1.0, 1.0, 2.0, 3.0, 4.0,
                                                                                         "kept")
    assert rec.with_sums(torch.tensor([1.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)) == back
    # a copy (not dataclasses.replace, for speed) with replace's result; the record itself is unchanged
    assert type(back) is type(rec) and back == dataclasses.replace(rec, nonfinite=1.0, gradient_ranks=1.0, a=2.0,
                                                                   b=3.0, c=4.0)
    assert rec.values() == [0.0, 0.0, 1.5, 2.25, 3.0] and rec.plain == "kept"
    assert host_floats([1, 2.5, torch.tensor(float("inf"))]) == [1.0, 2.5, math.inf]


def test_single_process_step_makes_no_collective_and_keeps_guarantees(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = SOAA(model.parameters(), lr=1e-2)

    def fail(*_: Any, **__: Any) -> Any:
        raise AssertionError("a single process made a collective")
    monkeypatch.setattr(type(opt.comm), "all_reduce_scalars", fail)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step(loss=1.0)
    assert opt.num_steps == 1
    with pytest.raises(ValueError, match="needs the mini-batch loss"):  # a held error still raises
        opt.step()
    next(iter(model.parameters())).grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(loss=1.0)  # a non-finite gradient still skips, changing nothing
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_increment_counts_writes_what_add_writes(dtype: torch.dtype) -> None:
    values = [0.0, 1.0, 2.5, 1e-30, 2.0**24 - 1, 2.0**24, 2.0**24 + 2, 3.0e38 if dtype == torch.float32 else 1e300,
              2.0**53 if dtype == torch.float64 else 7.0]
    mine = [torch.tensor(v, dtype=dtype) for v in values]
    ref = [torch.tensor(v, dtype=dtype) for v in values]
    for _ in range(3):
        counts = increment_counts_(mine)
        torch._foreach_add_(ref, 1.0)
        assert [t.item() for t in mine] == [t.item() for t in ref] == counts


def test_construction_digest_tells_device_types_apart() -> None:
    # ASGO costs, and so assigns, a block by the root its device and dtype resolve to: ranks whose
    # parameters live on different device types must fail the construction check, not own different blocks
    opt = torch.optim.SGD([torch.zeros(3)], lr=0.1)
    opt.sharding = None  # type: ignore[attr-defined]
    field = agreement.CONSTRUCTION_FIELDS.index("parameter shapes, dtypes and device types (in order)")
    cpu = agreement.construction_digests(opt, [torch.zeros(4, 2)], ["w"], 0)
    meta = agreement.construction_digests(opt, [torch.zeros(4, 2, device="meta")], ["w"], 0)
    double = agreement.construction_digests(opt, [torch.zeros(4, 2, dtype=torch.float64)], ["w"], 0)
    assert cpu[field] != meta[field] and cpu[field] != double[field]
    others = [i for i in range(len(cpu)) if i != field]
    assert torch.equal(cpu[others], meta[others])
