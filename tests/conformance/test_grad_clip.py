"""``max_grad_norm`` of every registered optimizer that reads ``p.grad``: the gradient the update reads is
clipped by its global norm, equal to one process clipping the full-batch gradient with torch's
``clip_grad_norm_(model.parameters(), max_norm)`` (float64, rtol 1e-10).

Under ``grad_reduction="mean"`` that gradient is the ranks' average, which no code before ``step()`` sees: a
``clip_grad_norm_`` there clipped each rank's own gradient by its own norm (W = 2, max_norm 0.3, 4 steps: SOAA
1.3e-1, ASGO 4.7e-2, AdamW 5.3e-2 off the one-process run, silently). The bound follows a schedule written into
the param groups between steps: step 0 does not bind (‖g‖ ≈ 1.6 < 5), the later steps do (‖g‖ > 1 > 0.5); the
reference run checks both. Launches: W = 1, W = 2 and 3 under ``"mean"``, W = 2 under ``"none"`` (the
gradients averaged first, as DDP does). Also: a non-finite gradient on one rank skips the step on every rank
(no NaN written), ranks whose bounds differ raise together, and EGN (which never reads ``p.grad``) refuses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_soaa.registry import OptimizerSpec, StepNeeds
from tests.conformance._battery import SPECS, assert_close, data, make, params, step
from tests.harness.distributed import run_distributed

SCHEDULE = (5.0, 0.5, 0.5, 0.5)  # the bound at each step: the first does not bind, the others do
CLIPPED = [s for s in SPECS if s.needs is not StepNeeds.BATCH]
LAUNCHES = ((1, "none"), (2, "mean"), (3, "mean"), (2, "none"))


def _average(model: torch.nn.Module, world: int) -> None:
    import torch.distributed as dist

    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def _run(spec: OptimizerSpec, rank: int, world: int, reduction: str, ours: bool) -> dict[str, Any]:
    """The schedule's steps: with the optimizer's ``max_grad_norm`` (``ours``), or torch's ``clip_grad_norm_``
    on the full batch's gradient in one process (the reference, which also reports the norms it clipped)."""
    kwargs: dict[str, Any] = {"max_grad_norm": SCHEDULE[0]} if ours else {}
    if world > 1:
        kwargs["grad_reduction"] = reduction
    model, opt = make(spec, **kwargs)
    norms: list[float] = []
    for t, bound in enumerate(SCHEDULE):
        x, y = data(t, rank=rank, world=world)
        if ours:
            for group in opt.param_groups:
                group["max_grad_norm"] = bound

        def on_gradients(bound: float = bound) -> None:
            if world > 1 and reduction == "none":
                _average(model, world)
            if not ours:
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), bound)))

        spec.take_step(opt, model, x, y, on_gradients=on_gradients)
    return {"params": params(model), "norms": norms, "skipped": opt.skipped_steps}


def _launch(rank: int, world: int, reduction: str) -> dict[str, Any]:
    return {spec.name: _run(spec, rank, world, reduction, ours=True) for spec in CLIPPED}


@pytest.fixture(scope="module")
def clipped_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, str], list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("clip")
    out = {}
    for world, reduction in LAUNCHES:
        out[(world, reduction)] = (
            [_launch(0, 1, reduction)] if world == 1
            else run_distributed(_launch, world, tmp, reduction, timeout=300.0))
    return out


@pytest.mark.parametrize("launch", LAUNCHES, ids=[f"W{w}-{r}" for w, r in LAUNCHES])
@pytest.mark.parametrize("spec", CLIPPED, ids=[s.name for s in CLIPPED])
def test_max_grad_norm_equals_one_process_clip(spec: OptimizerSpec, launch: tuple[int, str],
                                               clipped_runs: dict[Any, list[dict[str, Any]]]) -> None:
    ref = _run(spec, 0, 1, "none", ours=False)
    assert ref["norms"][0] < SCHEDULE[0] and all(n > b for n, b in zip(ref["norms"][1:], SCHEDULE[1:])), ref["norms"]
    results = [r[spec.name] for r in clipped_runs[launch]]
    for rank, res in enumerate(results):
        assert res["skipped"] == 0
        assert_close(res["params"], ref["params"], f"{spec.name} rank {rank} params")
        for a, b in zip(res["params"], results[0]["params"]):
            assert torch.equal(a, b), f"{spec.name}: rank {rank}'s parameters differ from rank 0's"


def _nan_launch(rank: int, world: int) -> dict[str, Any]:
    """A NaN in a gradient of rank 1 alone at step 2 with the clip binding ("mean"): every rank skips it."""
    out = {}
    for spec in CLIPPED:
        model, opt = make(spec, grad_reduction="mean", max_grad_norm=0.5)
        for t in range(2):
            step(spec, model, opt, t, rank=rank, world=world)
        before = params(model)
        step(spec, model, opt, 2, rank=rank, world=world, poison=rank == 1)
        after = params(model)
        out[spec.name] = {"unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
                          "finite": all(bool(p.isfinite().all()) for p in after), "skipped": opt.skipped_steps}
    return out


def test_nonfinite_gradient_is_skipped_on_every_rank(tmp_path: Path) -> None:
    for rank, res in enumerate(run_distributed(_nan_launch, 2, tmp_path, timeout=300.0)):
        for name, r in res.items():
            assert r == {"unchanged": True, "finite": True, "skipped": 1}, (name, rank, r)


def _unequal_launch(rank: int, world: int) -> dict[str, str]:
    """Rank 1 turns the clip off at step 1 (rank 0 keeps it): its record's all-reduce meets rank 0's clip
    all-reduce, and both must raise (not hang, not step)."""
    out = {}
    for spec in CLIPPED:
        model, opt = make(spec, grad_reduction="mean", max_grad_norm=0.5)
        step(spec, model, opt, 0, rank=rank, world=world)
        if rank == 1:
            for group in opt.param_groups:
                group["max_grad_norm"] = None
        try:
            step(spec, model, opt, 1, rank=rank, world=world)
            out[spec.name] = "no error"
        except RuntimeError as e:
            out[spec.name] = str(e)
    return out


def test_ranks_with_different_bounds_raise_together(tmp_path: Path) -> None:
    for res in run_distributed(_unequal_launch, 2, tmp_path, timeout=300.0):
        for name, message in res.items():
            assert "hyperparameters" in message and "max_grad_norm" in message, (name, message)



def _unsharded_launch(rank: int, world: int) -> dict[str, dict[str, Any]]:
    """``shard=False`` (each rank's parameters declared its own partition) with ``max_grad_norm``: on a model
    replicated on every rank (DDP), whose norm the step would sum over the ranks as parts of one model, and on
    partitions of their own (another seed per rank), which must step."""
    out = {}
    for spec in CLIPPED:
        res: dict[str, Any] = {}
        for how, seed in (("replicas", 0), ("partitions", 10 + rank)):
            model, opt = make(spec, seed=seed, shard=False, max_grad_norm=0.5)
            w0 = params(model)
            try:
                step(spec, model, opt, 0, rank=rank, world=world, average=how == "replicas")
                res[how] = None
            except RuntimeError as e:
                res[how] = str(e)
            res[how + "_unchanged"] = all(torch.equal(a, b) for a, b in zip(params(model), w0))
        # the bound written into the groups after a step without it (by hand, a schedule): refused at that step
        # (SOAA refuses these replicas at the first step already, for its trust region)
        model, opt = make(spec, shard=False)
        if not opt.sums_parts_over_ranks:
            step(spec, model, opt, 0, rank=rank, world=world, average=True)
            for group in opt.param_groups:
                group["max_grad_norm"] = 0.5
            w1 = params(model)
            try:
                step(spec, model, opt, 1, rank=rank, world=world, average=True)
                res["late"] = None
            except RuntimeError as e:
                res["late"] = str(e)
            res["late_unchanged"] = all(torch.equal(a, b) for a, b in zip(params(model), w1))
        out[spec.name] = res
    return out


def test_unsharded_replicas_with_max_grad_norm_are_refused_on_every_rank(tmp_path: Path) -> None:
    """The clip's norm summed W copies of the model: it clipped harder than one process, silently (W = 2, 4
    steps: AdamW 1.2e-6, ASGO 4.6e-7, DASGO 3.6e-5 off the one-process run in float64)."""
    for rank, res in enumerate(run_distributed(_unsharded_launch, 2, tmp_path, timeout=300.0)):
        for name, r in res.items():
            for how in ("replicas", "late") if "late" in r else ("replicas",):
                message = r[how]
                assert message is not None and "whose parameters are all equal" in message, (name, rank, how, message)
                assert "shard=True" in message and r[how + "_unchanged"], (name, rank, how, message)
            message = r["replicas"]
            if not make(next(s for s in CLIPPED if s.name == name))[1].sums_parts_over_ranks:
                assert "max_grad_norm's gradient norm" in message, (name, message)
            assert r["partitions"] is None and not r["partitions_unchanged"], (name, rank, r["partitions"])
        assert {n for n, r in res.items() if "late" not in r} == {"SOAA"}


@pytest.mark.parametrize("spec", CLIPPED, ids=[s.name for s in CLIPPED])
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "1.0", True])
def test_invalid_max_grad_norm_is_refused(spec: OptimizerSpec, bad: Any) -> None:
    with pytest.raises(ValueError, match=r"Invalid max_grad_norm=.*Must be"):
        make(spec, max_grad_norm=bad)


@pytest.mark.parametrize("spec", CLIPPED, ids=[s.name for s in CLIPPED])
def test_groups_with_different_bounds_are_refused(spec: OptimizerSpec) -> None:
    model, _ = make(spec)
    plist = list(model.parameters())
    groups = [{"params": plist[:2]}, {"params": plist[2:], "max_grad_norm": 1.0}]
    opt = spec.load()(groups, **{**spec.test_kwargs, "max_grad_norm": 0.5})
    before = params(model)
    with pytest.raises(ValueError, match=r"max_grad_norm=1.0 in param group .*same value"):
        step(spec, model, opt, 0)
    assert all(torch.equal(a, b) for a, b in zip(before, params(model)))


def test_egn_refuses_max_grad_norm() -> None:
    egn = next(s for s in SPECS if s.name == "EGN")
    with pytest.raises(TypeError, match="max_grad_norm"):
        make(egn, max_grad_norm=1.0)
    model, opt = make(egn)
    opt.param_groups[0]["max_grad_norm"] = 1.0
    with pytest.raises(ValueError, match=r"Invalid max_grad_norm=1.0 in EGN's param group.*never"):
        step(egn, model, opt, 0)


@pytest.mark.parametrize("spec", CLIPPED, ids=[s.name for s in CLIPPED])
def test_max_grad_norm_is_saved_and_loaded(spec: OptimizerSpec) -> None:
    """A hyperparameter like the others: a checkpoint resumes with the bound it was saved with."""
    model, opt = make(spec, max_grad_norm=0.5)
    step(spec, model, opt, 0)
    _, resumed = make(spec)
    resumed.load_state_dict(opt.state_dict())
    assert [g["max_grad_norm"] for g in resumed.param_groups] == [0.5] * len(resumed.param_groups)


def _scaled_launch(rank: int, world: int) -> dict[str, list[list[torch.Tensor]]]:
    """Three steps under torch.amp.GradScaler (scale 2**10, exact in float64) and without it, ``"mean"``."""
    out: dict[str, list[list[torch.Tensor]]] = {}
    for spec in CLIPPED:
        out[spec.name] = []
        for scaled in (True, False):
            model, opt = make(spec, grad_reduction="mean", max_grad_norm=0.5)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled)
            for t in range(3):
                x, y = data(t, rank=rank, world=world)
                opt.zero_grad()
                loss = 0.5 * (model(x) - y).pow(2).sum(-1).mean()
                scaler.scale(loss).backward()
                scaler.step(opt, **({"loss": loss.detach()} if spec.needs is StepNeeds.LOSS else {}))
                scaler.update()
            out[spec.name].append(params(model))
    return out


def test_grad_scaler_clips_the_unscaled_gradient(tmp_path: Path) -> None:
    """The bound applies to the unscaled gradient (clipped before the unscale, the scale 2**10 would bind)."""
    for res in run_distributed(_scaled_launch, 2, tmp_path, timeout=300.0):
        for name, (scaled, plain) in res.items():
            for a, b in zip(scaled, plain):
                assert torch.equal(a, b), name


def _soaa_steps(retried: bool) -> list[torch.Tensor]:
    """Two SOAA steps whose bound binds (1e-3); ``retried``: the first is called without its loss first (which
    raises after the clip), then again with it, on the same gradients."""
    spec = next(s for s in CLIPPED if s.name == "SOAA")
    model, opt = make(spec, max_grad_norm=1e-3)
    for t in range(2):
        x, y = data(t)
        opt.zero_grad()
        loss = 0.5 * (model(x) - y).pow(2).sum(-1).mean()
        loss.backward()
        if retried and t == 0:
            with pytest.raises(ValueError, match="needs the mini-batch loss"):
                opt.step()
        opt.step(loss=loss.detach())
    return params(model)


def test_a_retried_step_clips_the_gradient_once() -> None:
    """A step that raises after clipping (SOAA without its loss) leaves p.grad clipped; its retry on the same
    gradients is the step it would have been. It used to clip the clipped gradient again (a factor of
    1 - 1e-6 / max_grad_norm: 1e-3 at a bound of 1e-3), silently."""
    assert all(torch.equal(a, b) for a, b in zip(_soaa_steps(True), _soaa_steps(False)))
