"""Multi-rank guarantees of every registered optimizer, on real gloo ranks (tests/harness).

Process launches cost seconds, so each world size is launched **once** for all optimizers and all checks;
the tests below are parametrized over the registry and read that launch's results:

* W ∈ {1, 2, 3, 4} equals one process on the same global batch (float64, rtol 1e-10): parameters on
  every rank (bit-identical across ranks) and the consolidated state (moments, optimizer-wide scalars);
  every rank made the same collectives (calls and bytes) in a step, and an optimizer on the base class's
  step template exactly one scalar all-reduce, one parameter all-gather and, with
  ``grad_reduction="mean"``, one gradient reduce-scatter;
  at W ≥ 3 also a two-block model, so some ranks own nothing and must still join every collective.
  Odd W use ``grad_reduction="mean"`` where the optimizer has it, even W average the gradients first
  (what DDP does), so both gradient paths are covered.
* sharding: the ranks own disjoint blocks covering the table, and each rank holds state for exactly
  the blocks it owns (after training and after loading a checkpoint saved at another world size).
* checkpoints: ``state_dict()`` before ``consolidate_state_dict()`` is an error at W > 1; checkpoints
  resume across world sizes 1 → 2, 2 → 3, 3 → 1 and 2 → 4, each continuing equal to the uninterrupted
  run.
* W = 2 and 3: a non-finite value on rank 1 only (a NaN gradient in a parameter rank 1 does not own,
  after the gradient averaging; a NaN target for optimizers that take the batch) is skipped on every
  rank with parameters and state unchanged and ``skipped_steps`` counted.
* W = 2 and 3: a stop vote (a preemption signal) requested on the last rank only rides the step's
  all-reduce: every rank agrees after the same step, with the same training as without it.
* W = 2: a parameter converted to another dtype after construction is refused on every rank before
  anything changes; under torch.amp.GradScaler with grad_reduction="mean", an overflow on one rank is
  skipped on every rank.
* W = 2: ``deepcopy`` and pickle of (model, optimizer) continue identically (the pickle re-attaches to
  the default group at its first collective).
* a pickle re-attaches only to the world size and rank it was made for; elsewhere every rank raises,
  also when a single rank moved.
* W = 2: steps in which no rank has a gradient (a frozen phase) change nothing: the run equals the one
  without them bit for bit (its own launch).
* W = 2: rank 1 running other lightning_soaa code (another source digest; another owner assignment, as a
  version with another cost model makes) is refused at construction with the same error on every rank.
"""

from __future__ import annotations

import copy
import functools
import pickle
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_soaa.optim import base
from lightning_soaa.registry import FirstArg, OptimizerSpec, StepNeeds
from tests.conformance._battery import (
    SIZES,
    SPECS,
    TINY,
    assert_close,
    assert_identical,
    data,
    each_optimizer,
    frozen_steps,
    make,
    params,
    state_dict_raises,
    step,
    takes_kwarg,
    without_skips,
)
from tests.harness.distributed import run_distributed
from tests.harness.models import tiny_mlp

STEPS, SAVE_AT, NAN_AT, TINY_STEPS, VOTE_AT = 6, 3, 2, 3, 2
NAN_WORLDS = (2, 3)  # grad_reduction "none" (gradients averaged first) and "mean"
UNUSED_WORLD, UNUSED_AT = 3, 2  # parameters without a gradient: grad_reduction="mean", from step 2 on
#: world size -> the world size whose checkpoint it resumes (0: the single-process reference run)
LAUNCHES: dict[int, int] = {2: 0, 3: 2, 1: 3, 4: 2}
PICKLED = "AdamW"  # whose W = 2 pickle the re-attachment checks use (the mechanism is in the base class)


# ---------------------------------------------------------------------------------------- one rank's work
def _build(spec: OptimizerSpec, world: int, sizes: tuple[int, ...] = SIZES, seed: int = 0):
    """Model and optimizer for ``world`` ranks, and whether the loop must average gradients itself."""
    extra = {}
    if takes_kwarg(spec, "grad_reduction"):
        extra["grad_reduction"] = "mean" if world % 2 else "none"
    model, opt = make(spec, sizes, seed, **extra)
    average = world > 1 and spec.needs is not StepNeeds.BATCH and extra.get("grad_reduction") != "mean"
    return model, opt, average


def _consolidated(opt: Any, rank: int, to: int | None = 0) -> dict[str, Any] | None:
    opt.consolidate_state_dict(to=to)  # collective
    return copy.deepcopy(opt.state_dict()) if to is None or rank == to else None


def _held_blocks(opt: Any) -> dict[str, list[tuple[int, int]]]:
    """The (param_index, sub_index) blocks this rank holds state for, and those it owns."""
    plist = [p for g in opt.param_groups for p in g["params"]]
    held = []
    for pi, p in enumerate(plist):
        st = opt.state.get(p)
        if st:
            subs = [k for k in st if isinstance(k, int)]
            held += [(pi, k) for k in subs] if subs else [(pi, 0)]
    return {"held": sorted(held), "owned": sorted(b.key for b in opt.block_table.owned())}


def _main_run(spec: OptimizerSpec, rank: int, world: int) -> tuple[Any, Any, dict[str, Any]]:
    model, opt, average = _build(spec, world)
    out: dict[str, Any] = {}
    for t in range(STEPS):
        if t == SAVE_AT:
            out["raises_before_consolidation"] = state_dict_raises(opt) if world > 1 else True
            sd = _consolidated(opt, rank)
            out["ckpt"] = None if sd is None else (copy.deepcopy(model.state_dict()), sd)
        step(spec, model, opt, t, rank=rank, world=world, average=average)
    last = opt.comm.step_stats  # the last step's collectives, before consolidation adds its own
    out["comm"] = (dict(last.calls), dict(last.bytes))
    out["several"] = base._built_over(opt.comm) > 1  # grad_reduction="mean" then checks the order first
    out["params"] = params(model)
    out["blocks"] = _held_blocks(opt)
    out["final"] = _consolidated(opt, rank)
    return model, opt, out


def _nan_run(spec: OptimizerSpec, rank: int, world: int) -> dict[str, Any]:
    """Two steps, then a step in which rank 1 alone sees a non-finite value (after the gradient
    averaging, so no other rank sees it)."""
    model, opt, average = _build(spec, world)
    for t in range(NAN_AT):
        step(spec, model, opt, t, rank=rank, world=world, average=average)
    before, w = _consolidated(opt, rank, to=None), params(model)
    step(spec, model, opt, NAN_AT, rank=rank, world=world, average=average, poison=rank == 1)
    return {"before": before, "after": _consolidated(opt, rank, to=None), "w_before": w,
            "w_after": params(model), "skipped": opt.skipped_steps}


def _changed_dtype_run(spec: OptimizerSpec, rank: int, world: int) -> dict[str, Any]:
    """Two steps, then the model converted to float32 on every rank: an owner used to raise alone inside
    the update (after the step's all-reduce; the others waited in the parameter gather), after some
    state had changed. Every rank must raise before anything changes."""
    model, opt, average = _build(spec, world)
    for t in range(2):
        step(spec, model, opt, t, rank=rank, world=world, average=average)
    model.float()
    before = params(model)
    x, y = (u.float() for u in data(2, rank=rank, world=world))
    try:
        spec.take_step(opt, model, x, y)
        error = None
    except RuntimeError as e:
        error = str(e)
    return {"error": error, "unchanged": all(torch.equal(a, b) for a, b in zip(before, params(model))),
            "steps": opt.num_steps}


def _converted_first_run(spec: OptimizerSpec, rank: int, world: int) -> dict[str, Any]:
    """The model converted to float32 after the optimizer was built, before its first step (Lightning
    Fabric's setup(model, optimizer) at W = 2): taken over on every rank, equal to building after the
    conversion (the parameter check had refused it here; before this turn it trained correctly);
    EGN, which plans its capture on the module, refuses on every rank."""
    out: dict[str, Any] = {}
    for late in (True, False):
        model, opt, average = _build(spec, world)
        if not late:
            model.float()
            opt = spec.build(model, **spec.test_kwargs)
        else:
            model.float()
        try:
            for t in range(2):
                x, y = (u.float() for u in data(t, rank=rank, world=world))
                spec.take_step(opt, model, x, y,
                               on_gradients=functools.partial(_average_grads, model, world) if average else None)
            out["late" if late else "early"] = params(model)
        except RuntimeError as e:
            out["late" if late else "early"] = str(e)
    return out


def _converted_on_one_rank_run(spec: OptimizerSpec, rank: int, world: int) -> dict[str, str]:
    """The model converted after construction on rank 1 only, before the first step: every rank must
    raise, naming the conversion (under grad_reduction="none" the message blamed the hyperparameters: the
    rebuilt table's fingerprint joins the hyperparameter digest). Each rank steps on its own gradients."""
    reductions = ("none", "mean") if takes_kwarg(spec, "grad_reduction") else (None,)
    out: dict[str, str] = {}
    for red in reductions:
        model, opt = make(spec, **({"grad_reduction": red} if red else {}))
        if rank == 1:
            model.float()
        x, y = (u.to(next(model.parameters()).dtype) for u in data(0, rank=rank, world=world))
        try:
            spec.take_step(opt, model, x, y)
            out[str(red)] = "no error"
        except (RuntimeError, ValueError) as e:  # EGN reports an invalid batch or module as a ValueError
            out[str(red)] = str(e)
    return out


def _average_grads(model: Any, world: int) -> None:
    import torch.distributed as dist

    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def _scaler_run(spec: OptimizerSpec, rank: int, world: int) -> dict[str, Any]:
    """torch.amp.GradScaler with grad_reduction="mean" (no DDP): an overflow on rank 1 alone. The scaler
    used to skip step() on rank 1 only, whose next call then paired with rank 0's (gradients of two
    iterations averaged), and the last one hung. Every rank must skip that step together."""
    model, opt = make(spec, grad_reduction="mean")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for t in range(3):
        x, y = data(t, rank=rank, world=world)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if t == 1 and rank == 1:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        scaler.step(opt, **({"loss": loss.detach()} if spec.needs is StepNeeds.LOSS else {}))
        scaler.update()
    return {"skipped": opt.skipped_steps, "steps": opt.num_steps, "params": params(model)}


def _unused_target(opt: Any) -> int:
    """The parameter the unused-parameter runs drop: the first one rank 0 owns a block of."""
    return min(b.param_index for b in opt.block_table.blocks if b.owner == 0)


def _unused_run(spec: OptimizerSpec, rank: int, world: int, how: str) -> dict[str, Any]:
    """From step ``UNUSED_AT`` on, one parameter has no gradient on every rank (``how="all"``: a layer
    unused this step, a frozen branch), or on rank 0 alone, its owner (``"rank0"``: its batch did not
    reach the layer), or rank 0 holds zeros instead (``"rank0_zeros"``, what ``"rank0"`` must equal)."""
    model, opt, average = _build(spec, world)
    target = _unused_target(opt)
    plist = list(model.parameters())

    def drop() -> None:
        if how == "all" or rank == 0:
            plist[target].grad = torch.zeros_like(plist[target]) if how == "rank0_zeros" else None

    for t in range(STEPS):
        if t < UNUSED_AT:
            step(spec, model, opt, t, rank=rank, world=world, average=average)
        else:
            x, y = data(t, SIZES, rank, world)
            spec.take_step(opt, model, x, y, on_gradients=drop)
    return {"params": params(model), "final": _consolidated(opt, rank), "target": target,
            "grad_none": plist[target].grad is None}


def _expanded_run(spec: OptimizerSpec, rank: int, world: int, dense: bool) -> dict[str, Any]:
    """Every gradient replaced by its mean, set as ``g.mean().expand_as(g)`` (one memory location for all
    elements, which torch's optimizers accept), or as a dense copy (``dense``, what it must equal)."""
    model, opt, average = _build(spec, world)

    def flatten() -> None:
        for p in model.parameters():
            if p.grad is not None:
                g = p.grad.mean().expand_as(p.grad)
                p.grad = g.contiguous() if dense else g

    try:
        for t in range(UNUSED_AT + 2):
            x, y = data(t, SIZES, rank, world)
            spec.take_step(opt, model, x, y, on_gradients=flatten)
    except RuntimeError as e:
        return {"error": str(e)}
    return {"params": params(model), "final": _consolidated(opt, rank)}


def _unsharded_mean_refusal(spec: OptimizerSpec) -> str | None:
    """The error of ``shard=False, grad_reduction="mean"`` at W > 1 (None if it was accepted)."""
    try:
        make(spec, SIZES, 0, shard=False, grad_reduction="mean")
    except ValueError as e:
        return str(e)
    return None


def _unsharded_replicas_run(spec: OptimizerSpec, rank: int, world: int) -> dict[str, Any]:
    """``shard=False`` (declared: each rank's parameters are its own partition) on a model replicated on
    every rank, gradients averaged as DDP does: the run of ``_main_run`` (``shard=True``), or refused."""
    model, opt = make(spec, SIZES, 0, shard=False)
    w0 = params(model)
    try:
        for t in range(STEPS):
            step(spec, model, opt, t, rank=rank, world=world, average=spec.needs is not StepNeeds.BATCH)
    except RuntimeError as e:
        return {"error": str(e), "unchanged": all(torch.equal(a, b) for a, b in zip(params(model), w0))}
    return {"error": None, "params": params(model)}


def _resumed_run(spec: OptimizerSpec, rank: int, world: int, ckpt: tuple[Any, Any]) -> dict[str, Any]:
    model, opt, average = _build(spec, world, seed=5)  # another init: everything comes from the checkpoint
    model.load_state_dict(ckpt[0])
    opt.load_state_dict(ckpt[1])
    loaded = _held_blocks(opt)
    for t in range(SAVE_AT, STEPS):
        step(spec, model, opt, t, rank=rank, world=world, average=average)
    return {"params": params(model), "final": _consolidated(opt, rank), "blocks": loaded}


def _vote_run(spec: OptimizerSpec, rank: int, world: int) -> dict[str, Any]:
    """A stop vote (a preemption signal) that only the last rank requested, before step ``VOTE_AT``."""
    from lightning_soaa.distributed.stop_vote import StopVote

    model, opt, average = _build(spec, world)
    vote = opt.stop_vote = StopVote(world)
    seen = []
    for t in range(STEPS):
        if t == VOTE_AT and rank == world - 1:
            vote.request()
        step(spec, model, opt, t, rank=rank, world=world, average=average)
        seen.append((vote.agreed, vote.rounds))
    return {"seen": seen, "params": params(model)}


def _tiny_run(spec: OptimizerSpec, rank: int, world: int) -> dict[str, Any]:
    model, opt, average = _build(spec, world, sizes=TINY)
    for t in range(TINY_STEPS):
        step(spec, model, opt, t, sizes=TINY, rank=rank, world=world, average=average)
    return {"params": params(model), "owned": len(opt.block_table.owned())}


def _copies_run(spec: OptimizerSpec, rank: int, world: int, model: Any, opt: Any) -> dict[str, Any]:
    """deepcopy and pickle of (model, optimizer) at W ranks, then every copy keeps stepping."""
    _, _, average = _build(spec, world)
    runs = {"original": (model, opt), "deepcopy": copy.deepcopy((model, opt)),
            "pickle": pickle.loads(pickle.dumps((model, opt)))}
    out: dict[str, Any] = {"comm": {k: type(o.comm).__name__ for k, (_, o) in runs.items()}}
    for t in range(STEPS, STEPS + 2):
        for m, o in runs.values():
            step(spec, m, o, t, rank=rank, world=world, average=average)
    out["params"] = {k: params(m) for k, (m, _) in runs.items()}
    out["final"] = {k: _consolidated(o, rank) for k, (_, o) in runs.items()}
    if spec.name == PICKLED:
        out["bytes"] = pickle.dumps((model, opt))
    return out


def _skewed_run(spec: OptimizerSpec, rank: int, world: int) -> dict[str, str]:
    """Each optimizer built while rank 1 runs 'another lightning_soaa' (patched in this process, then
    restored): another source digest, or another owner for every block (what a version with another cost
    model assigns). Before the check compared them, both built, and the first step met in collectives of
    other sizes (gloo aborts one rank) or trained on silently."""
    from lightning_soaa.distributed import agreement, blocks

    version = agreement.package_identity()[0]
    patches = {"source": (agreement, "package_identity", lambda: (version, 12345)),
               "owners": (blocks, "assign_owners",
                          lambda costs, w, f=blocks.assign_owners: [w - 1 - o for o in f(costs, w)])}
    out: dict[str, str] = {}
    for how, (module, attr, patched) in patches.items():
        original = getattr(module, attr)
        if rank == 1:
            setattr(module, attr, patched)
        try:
            make(spec)
            out[how] = "no error"
        except (RuntimeError, ValueError) as e:
            out[how] = str(e)
        finally:
            setattr(module, attr, original)
    return out


def _reattach_elsewhere(blob: bytes, rank: int, world: int) -> str:
    """A pickle made at W = 2 used at another world size: the first collective must refuse."""
    spec = next(s for s in SPECS if s.name == PICKLED)
    model, opt = pickle.loads(blob)
    try:
        step(spec, model, opt, 0, rank=rank, world=world)
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def _worker(rank: int, world: int, resume: dict[str, Any], blob: bytes | None) -> dict[str, Any]:
    torch.manual_seed(rank)  # nothing may depend on it
    out: dict[str, Any] = {}
    for spec in SPECS:
        model, opt, res = _main_run(spec, rank, world)
        if world in NAN_WORLDS:
            res["nan"] = _nan_run(spec, rank, world)
            res["vote"] = _vote_run(spec, rank, world)
        res["resumed"] = _resumed_run(spec, rank, world, resume[spec.name])
        if world >= 3:
            res["tiny"] = _tiny_run(spec, rank, world)
        if world == UNUSED_WORLD and spec.needs is not StepNeeds.BATCH:
            res["unused"] = {how: _unused_run(spec, rank, world, how) for how in ("all", "rank0", "rank0_zeros")}
            res["expanded"] = {dense: _expanded_run(spec, rank, world, dense) for dense in (False, True)}
            if takes_kwarg(spec, "shard") and takes_kwarg(spec, "grad_reduction"):
                res["unsharded"] = _unsharded_mean_refusal(spec)
        if world == 2:
            res["changed_dtype"] = _changed_dtype_run(spec, rank, world)
            res["converted_first"] = _converted_first_run(spec, rank, world)
            res["converted_one_rank"] = _converted_on_one_rank_run(spec, rank, world)
            if takes_kwarg(spec, "grad_reduction") and spec.needs is not StepNeeds.BATCH:
                res["scaler"] = _scaler_run(spec, rank, world)
            res["copies"] = _copies_run(spec, rank, world, model, opt)
            res["skewed"] = _skewed_run(spec, rank, world)
            if takes_kwarg(spec, "shard"):
                res["unsharded_replicas"] = _unsharded_replicas_run(spec, rank, world)
        out[spec.name] = res
    if blob is not None:
        out["reattach"] = _reattach_elsewhere(blob, rank, world)
    if world == 2:  # every rank loads rank 0's pickle: rank 1 alone moved, and both must refuse
        import torch.distributed as dist

        blobs: list[Any] = [None] * world
        dist.all_gather_object(blobs, out[PICKLED]["copies"]["bytes"])
        out["reattach"] = _reattach_elsewhere(blobs[0], rank, world)
    out["cpu_s"] = time.process_time()
    return out


# ---------------------------------------------------------------------------------------- launches
class _Launches:
    """Each world size launched once (on first use), chained so checkpoints cross world sizes."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.results: dict[int, list[dict[str, Any]]] = {}

    def get(self, world: int) -> list[dict[str, Any]]:
        if world not in self.results:
            src = LAUNCHES[world]
            resume = {s.name: _reference(s.name)["ckpt"] if src == 0 else self.get(src)[0][s.name]["ckpt"]
                      for s in SPECS}
            blob = self.get(2)[0][PICKLED]["copies"]["bytes"] if world == 3 else None
            self.results[world] = run_distributed(_worker, world, self.tmp, resume, blob, timeout=300)
        return self.results[world]


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory) -> _Launches:
    return _Launches(tmp_path_factory.mktemp("conformance_ranks"))


@functools.cache
def _reference(name: str, sizes: tuple[int, ...] = SIZES, steps: int = STEPS, unused: int | None = None
               ) -> dict[str, Any]:
    """One process on the global batch (no process group); ``unused``: the index of a parameter without
    a gradient from step ``UNUSED_AT`` on."""
    spec = next(s for s in SPECS if s.name == name)
    model, opt = make(spec, sizes)
    plist = list(model.parameters())
    out: dict[str, Any] = {}
    for t in range(steps):
        if t == SAVE_AT:
            out["ckpt"] = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        if unused is not None and t >= UNUSED_AT:
            spec.take_step(opt, model, *data(t, sizes), on_gradients=lambda: setattr(plist[unused], "grad", None))
            continue
        step(spec, model, opt, t, sizes=sizes)
    out["params"] = params(model)
    out["final"] = copy.deepcopy(opt.state_dict())
    out["blocks"] = [b.key for b in opt.block_table.blocks]
    return out


def _assert_equal_to_reference(got_params: list[list[torch.Tensor]], got_final: dict[str, Any],
                               ref: dict[str, Any], skipped: int, what: str) -> None:
    for r, ps in enumerate(got_params):
        assert_identical(ps, got_params[0], f"{what}: rank {r} vs rank 0")  # replicas agree bit for bit
        assert_close(ps, ref["params"], f"{what}: rank {r} params")
    assert got_final["lightning_soaa"]["global"]["skipped_steps"] == skipped
    assert_close(without_skips(got_final), without_skips(ref["final"]), f"{what}: state")


# ---------------------------------------------------------------------------------------- the checks
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@each_optimizer
def test_w_ranks_equal_one_process(launches: _Launches, spec: OptimizerSpec, world: int) -> None:
    results = [res[spec.name] for res in launches.get(world)]
    ref = _reference(spec.name)
    _assert_equal_to_reference([r["params"] for r in results], results[0]["final"], ref,
                               skipped=0, what=f"W={world}")
    assert all(r["final"] is None for r in results[1:])  # consolidate_state_dict(to=0) keeps it on rank 0
    for r, res in enumerate(results):  # the same collectives, in number and size, on every rank
        assert res["comm"] == results[0]["comm"], f"rank {r}: {res['comm']} vs rank 0: {results[0]['comm']}"
    assert (sum(results[0]["comm"][0].values()) > 0) == (world > 1)
    if world > 1 and spec.needs is not StepNeeds.BATCH:  # the base class's step template, one dtype
        expected = {"all_reduce": 1, "all_gather": 1}  # [flag, partials] in fp64; the updated parameters
        if world % 2 and takes_kwarg(spec, "grad_reduction"):
            expected["reduce_scatter"] = 1  # grad_reduction="mean": gradients to their owners
            # with several optimizers over the group, a record-sized order check before the exchange
            expected["all_reduce"] += int(results[0]["several"])
        assert results[0]["comm"][0] == expected
    owned = sorted(k for r in results for k in r["blocks"]["owned"])
    assert len(owned) == len(set(owned)) and len(owned) == len(_reference(spec.name)["blocks"])
    for r, res in enumerate(results):  # sharded: a rank holds the state of its own blocks, and only those
        assert res["blocks"]["held"] == res["blocks"]["owned"], f"rank {r}"
    if world >= 3:  # two blocks over W ranks: W - 2 ranks own nothing and still joined every collective
        tiny_ref = _reference(spec.name, TINY, TINY_STEPS)
        owned = [r["tiny"]["owned"] for r in results]
        assert sum(owned) == 2 and owned.count(0) == world - 2
        for r, res in enumerate(results):
            assert_close(res["tiny"]["params"], tiny_ref["params"], f"W={world} two-block model, rank {r}")


@pytest.mark.parametrize("world", [2, 3, 4])
@each_optimizer
def test_checkpoint_needs_consolidation_and_equals_one_process(launches: _Launches, spec: OptimizerSpec,
                                                               world: int) -> None:
    results = [res[spec.name] for res in launches.get(world)]
    assert all(r["raises_before_consolidation"] for r in results)
    _, sd = results[0]["ckpt"]
    assert_close(sd, _reference(spec.name)["ckpt"][1], f"checkpoint at W={world}")


@pytest.mark.parametrize("saved,resumed", [(1, 2), (2, 3), (3, 1), (2, 4)])
@each_optimizer
def test_resume_at_another_world_size_equals_uninterrupted(launches: _Launches, spec: OptimizerSpec,
                                                           saved: int, resumed: int) -> None:
    assert LAUNCHES[resumed] == (0 if saved == 1 else saved)  # W = 1: the reference run, no process group
    results = [res[spec.name]["resumed"] for res in launches.get(resumed)]
    for r, res in enumerate(results):  # loading keeps only the blocks this rank now owns
        assert res["blocks"]["held"] == res["blocks"]["owned"], f"rank {r}"
    _assert_equal_to_reference([r["params"] for r in results], results[0]["final"], _reference(spec.name),
                               skipped=0,
                               what=f"saved at W={saved}, resumed at W={resumed}")


#: (optimizer, W) -> why it fails today; strict, so the fix turns the XPASS into a failure to remove it
KNOWN_NONFINITE_FAILURES: dict[tuple[str, int], str] = {}


@pytest.mark.parametrize("world", NAN_WORLDS)
@each_optimizer
def test_stop_vote_reaches_every_rank_after_the_same_step(launches: _Launches, spec: OptimizerSpec,
                                                           world: int) -> None:
    """A stop request on one rank (lightning_soaa.lightning.PreemptionCheckpoint's signal) rides the step's
    one all-reduce: every rank agrees after the same step, and the training is the same as without it."""
    results = [res[spec.name] for res in launches.get(world)]
    expected = [(t >= VOTE_AT, t + 1) for t in range(STEPS)]  # (agreed, all-reduces that carried it)
    for r, res in enumerate(results):
        assert res["vote"]["seen"] == expected, f"rank {r}"
        assert_identical(res["vote"]["params"], res["params"], f"rank {r}: with the vote vs without")


def _nonfinite_cases() -> list[Any]:
    out = []
    for world in NAN_WORLDS:
        for spec in SPECS:
            why = KNOWN_NONFINITE_FAILURES.get((spec.name, world))
            marks = [pytest.mark.xfail(reason=why, strict=True)] if why else []
            out.append(pytest.param(spec, world, marks=marks, id=f"{spec.name}-{world}"))
    return out


@pytest.mark.parametrize("spec,world", _nonfinite_cases())
def test_nonfinite_on_one_rank_is_skipped_on_every_rank(launches: _Launches, spec: OptimizerSpec,
                                                        world: int) -> None:
    for r, res in enumerate(launches.get(world)):
        nan = res[spec.name]["nan"]
        assert nan["skipped"] == 1, f"rank {r}"
        assert nan["after"]["lightning_soaa"]["global"]["skipped_steps"] == 1
        assert_identical(nan["w_after"], nan["w_before"], f"rank {r} params")
        assert_identical(without_skips(nan["after"]), without_skips(nan["before"]), f"rank {r} state")


@pytest.mark.parametrize("spec", [s for s in SPECS if s.needs is not StepNeeds.BATCH
                                  and takes_kwarg(s, "grad_reduction")], ids=lambda s: s.name)
def test_grad_scaler_overflow_on_one_rank_is_skipped_on_every_rank(launches: _Launches, spec: OptimizerSpec) -> None:
    results = [res[spec.name]["scaler"] for res in launches.get(2)]
    assert all(r["skipped"] == 1 and r["steps"] == 2 for r in results), results
    assert_identical(results[1]["params"], results[0]["params"], "params across ranks")


@each_optimizer
def test_parameters_converted_before_the_first_step_are_taken_on_every_rank(launches: _Launches,
                                                                           spec: OptimizerSpec) -> None:
    results = [res[spec.name]["converted_first"] for res in launches.get(2)]
    if spec.first_arg is FirstArg.MODULE:
        assert all("but the optimizer was built for" in r["late"] for r in results), results
        return
    for r, res in enumerate(results):
        assert not isinstance(res["late"], str), (r, res["late"])
        assert_identical(res["late"], res["early"], f"rank {r}: converted after vs before construction")
    assert_identical(results[1]["late"], results[0]["late"], "params across ranks")


@each_optimizer
def test_parameters_converted_on_some_ranks_only_are_refused_on_every_rank_naming_it(launches: _Launches,
                                                                                    spec: OptimizerSpec) -> None:
    for r, res in enumerate(launches.get(2)):
        for red, msg in res[spec.name]["converted_one_rank"].items():
            if spec.first_arg is FirstArg.MODULE:  # EGN refuses any conversion; its peer learns it raised
                assert "but the optimizer was built for" in msg or "raised an error before" in msg, (r, msg)
            else:
                assert "converted" in msg and "Nothing changed" in msg, (r, red, msg)


@each_optimizer
def test_a_parameter_whose_dtype_changed_is_refused_on_every_rank(launches: _Launches, spec: OptimizerSpec) -> None:
    for r, res in enumerate(launches.get(2)):
        got = res[spec.name]["changed_dtype"]
        assert got["error"] is not None and "but the optimizer was built for" in got["error"], (r, got["error"])
        assert got["unchanged"] and got["steps"] == 2, r


@pytest.mark.parametrize("spec", [s for s in SPECS if s.needs is not StepNeeds.BATCH], ids=lambda s: s.name)
def test_a_parameter_without_a_gradient_is_stepped_as_in_one_process(launches: _Launches,
                                                                      spec: OptimizerSpec) -> None:
    """grad_reduction="mean": a parameter with no gradient on any rank is not stepped (one process and
    torch leave it alone: no weight decay, moments, counter); once stepped by its owner with a zero
    gradient it drifted 8e-2 from one process. One without a gradient on some ranks has one: theirs
    count as zeros. The owner's ``p.grad`` stays None like every other rank's."""
    results = [res[spec.name]["unused"] for res in launches.get(UNUSED_WORLD)]
    ref = _reference(spec.name, unused=results[0]["all"]["target"])
    _assert_equal_to_reference([r["all"]["params"] for r in results], results[0]["all"]["final"], ref,
                               skipped=0, what="no gradient on any rank")
    assert all(r["all"]["grad_none"] for r in results)
    for r, res in enumerate(results):
        assert_identical(res["rank0"]["params"], res["rank0_zeros"]["params"], f"rank {r}: None vs zeros")
    assert_identical(results[0]["rank0"]["final"], results[0]["rank0_zeros"]["final"], "None vs zeros")


@pytest.mark.parametrize("spec", [s for s in SPECS if s.needs is not StepNeeds.BATCH], ids=lambda s: s.name)
def test_an_expanded_gradient_steps_as_its_dense_copy(launches: _Launches, spec: OptimizerSpec) -> None:
    """grad_reduction="mean": a gradient set by hand as ``g.expand(...)`` (its elements share memory)
    made the owner's write of the averaged gradient raise torch's error on that rank alone, while the
    others waited in the next collective. It steps as its dense copy does, on every rank."""
    results = [res[spec.name]["expanded"] for res in launches.get(UNUSED_WORLD)]
    for r, res in enumerate(results):
        assert "error" not in res[False], (r, res[False])
        assert_identical(res[False]["params"], res[True]["params"], f"rank {r}: expanded vs dense")
    assert_identical(results[0][False]["final"], results[0][True]["final"], "expanded vs dense state")
    assert_identical(results[1][False]["params"], results[0][False]["params"], "params across ranks")


@pytest.mark.parametrize("spec", [s for s in SPECS if s.needs is not StepNeeds.BATCH and takes_kwarg(s, "shard")
                                  and takes_kwarg(s, "grad_reduction")], ids=lambda s: s.name)
def test_unsharded_mean_is_refused_on_every_rank(launches: _Launches, spec: OptimizerSpec) -> None:
    """shard=False (the caller's own partition on each rank) has nothing to average: with
    grad_reduction="mean" a replicated model once stepped each replica on its local gradient (0.2 apart
    after one step at lr 0.1) and counted SOAA's trust-region sums W times."""
    results = [res[spec.name]["unsharded"] for res in launches.get(UNUSED_WORLD)]
    assert all(msg is not None and "shard=False with grad_reduction='mean' is not supported" in msg
               for msg in results), results


@pytest.mark.parametrize("spec", [s for s in SPECS if takes_kwarg(s, "shard")], ids=lambda s: s.name)
def test_a_replicated_model_under_shard_false_steps_as_sharded_or_is_refused(launches: _Launches,
                                                                              spec: OptimizerSpec) -> None:
    """shard=False on a replicated model (DDP; the CLI offers --optimizer.shard): an optimizer whose
    global sums add up parts of one model (SOAA's trust region) counted it W times (5e-3 off after 8
    steps at W = 2, silently); it is refused at the first step, every rank, nothing changed. The others
    step exactly as with shard=True."""
    results = launches.get(2)
    runs = [res[spec.name]["unsharded_replicas"] for res in results]
    opt = make(spec)[1]
    if opt.sums_parts_over_ranks:
        assert all(r["error"] is not None and "whose parameters are all equal" in r["error"] and r["unchanged"]
                   for r in runs), runs
        return
    for r, (run, res) in enumerate(zip(runs, results)):
        assert run["error"] is None, (r, run["error"])
        assert_close(run["params"], res[spec.name]["params"], f"rank {r}", rtol=1e-12, atol=1e-14)


@each_optimizer
def test_copies_at_two_ranks_continue_identically(launches: _Launches, spec: OptimizerSpec) -> None:
    results = [res[spec.name]["copies"] for res in launches.get(2)]
    for r, res in enumerate(results):
        assert res["comm"] == {"original": "TorchComm", "deepcopy": "TorchComm", "pickle": "DeferredComm"}
        for how in ("deepcopy", "pickle"):
            assert_identical(res["params"][how], res["params"]["original"], f"rank {r} {how} params")
    for how in ("deepcopy", "pickle"):
        assert_identical(results[0]["final"][how], results[0]["final"]["original"], f"{how} state")


@each_optimizer
def test_ranks_running_other_lightning_soaa_code_are_refused_on_every_rank(launches: _Launches,
                                                                          spec: OptimizerSpec) -> None:
    results = [res[spec.name]["skewed"] for res in launches.get(2)]
    assert results[0] == results[1], results
    assert "every rank must run the same lightning_soaa: rank(s) [1] run the same version" in results[0]["source"]
    assert "differ from rank 0 in: block table (blocks and their owners)." in results[0]["owners"], results[0]


def test_a_pickle_reattaches_only_where_it_was_made(launches: _Launches) -> None:
    for r, res in enumerate(launches.get(3)):  # another world size: every rank moved
        assert f"pickled on rank 0 of world size 2 but is used on rank {r} of world size 3 (3 rank(s) moved)" \
            in res["reattach"], (r, res["reattach"])
    for r, res in enumerate(launches.get(2)):  # rank 1 alone moved: rank 0 must not wait in a collective
        assert f"pickled on rank 0 of world size 2 but is used on rank {r} of world size 2 (1 rank(s) moved)" \
            in res["reattach"], (r, res["reattach"])
    spec = next(s for s in SPECS if s.name == PICKLED)
    model, opt = pickle.loads(launches.get(2)[0][PICKLED]["copies"]["bytes"])  # no process group here
    assert opt.statistics()["comm_calls"] == 0.0  # reading counters needs no group
    with pytest.raises(RuntimeError, match="call torch.distributed.init_process_group"):
        step(spec, model, opt, 0)


def _frozen_phase_run(rank: int, world: int) -> dict[str, Any]:
    """Per optimizer that steps from .grad and gradient path (``grad_reduction="none"`` after the loop's
    averaging, and ``"mean"``): four steps alone, and the same four with two gradient-less steps before the
    first and before the third."""
    out: dict[str, Any] = {}
    for spec in (s for s in SPECS if s.needs is not StepNeeds.BATCH):
        for reduction in ("none", "mean") if takes_kwarg(spec, "grad_reduction") else ("none",):
            extra = {"grad_reduction": reduction} if takes_kwarg(spec, "grad_reduction") else {}
            runs = []
            for frozen in (False, True):
                model, opt = make(spec, **extra)
                for t in range(4):
                    if frozen and t in (0, 2):
                        frozen_steps(spec, model, opt, 2, rank=rank, world=world)
                    step(spec, model, opt, t, rank=rank, world=world, average=reduction == "none")
                runs.append({"params": params(model), "state": _consolidated(opt, rank, to=None)})
            out[f"{spec.name}-{reduction}"] = runs
    return out


def _inference_params_run(rank: int, world: int) -> dict[str, list[list[torch.Tensor]]]:
    """Per optimizer: the parameters after 3 steps of a model built inside ``torch.inference_mode()``, and of the
    same model built outside it (the same given gradients on every rank; EGN's batch is this rank's share)."""
    out = {}
    for spec in SPECS:
        runs = []
        for inside in (True, False):
            with torch.inference_mode(inside):
                model = tiny_mlp(0, torch.float64, sizes=SIZES)
            opt = spec.build(model, **spec.test_kwargs)
            g = torch.Generator().manual_seed(1)
            for t in range(3):
                if spec.needs is StepNeeds.BATCH:
                    step(spec, model, opt, t, rank=rank, world=world)
                    continue
                for p in model.parameters():
                    p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)
                opt.step(**({"loss": torch.tensor(0.5, dtype=torch.float64)} if spec.needs is StepNeeds.LOSS else {}))
            runs.append(params(model))
        out[spec.name] = runs
    return out


def test_parameters_made_under_inference_mode_step_as_plain_ones_on_two_ranks(tmp_path: Path) -> None:
    """W = 2: a model built inside ``torch.inference_mode()`` (inference-tensor parameters) raised torch's bare
    "Inference tensors do not track version counter" on every rank after the step had updated them, and the
    parameter gather could not write them ("Inplace update to inference tensor outside InferenceMode"). They
    are stepped as plain ones, bit for bit, on every rank (one process: tests/conformance/test_contract.py)."""
    results = run_distributed(_inference_params_run, 2, tmp_path, timeout=240)
    for r, res in enumerate(results):
        for name, (inside, plain) in res.items():
            assert_identical(inside, plain, f"rank {r} {name}: built under inference mode")
            assert_identical(inside, results[0][name][0], f"rank {r} {name}: vs rank 0")


def test_steps_without_any_gradient_on_any_rank_change_nothing(tmp_path: Path) -> None:
    """W = 2: steps in which no rank has a gradient (a frozen phase whose loop still calls step()) change
    nothing on any rank, as in one process (tests/conformance/test_contract.py): the run equals the one
    without them bit for bit, parameters and consolidated state (SOAA's trust region, the step counts).
    Every rank learns that no rank has a gradient from the step's all-reduce, so all return alike."""
    results = run_distributed(_frozen_phase_run, 2, tmp_path, timeout=240)
    for r, res in enumerate(results):
        for case, (alone, with_frozen) in res.items():
            assert_identical(with_frozen, alone, f"rank {r} {case}: with frozen steps")
            assert_identical(alone["params"], results[0][case][0]["params"], f"rank {r} {case}: vs rank 0")
