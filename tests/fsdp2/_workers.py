"""Rank functions and single-process references for the FSDP2 tests.

Data: one global batch of ``N`` rows per step, split evenly over the data-parallel ranks (every rank of
the mesh, HSDP included), so a W-rank run and the single-process reference see the same data at every W
and FSDP2's gradient mean equals the single-process gradient of the global mean loss.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_soaa import ASGO, DASGO, SOAA, ShardedAdamW, registry
from lightning_soaa.optim import base
from lightning_soaa.registry import OptimizerSpec, StepNeeds
from tests.harness.models import forward_only_step, loss_fn, tiny_mlp

N = 8  # global rows per step (divisible by 1, 2 and 4)
TALL = (3, 5, 7, 9)  # weights 5x3, 7x5, 9x7: rows >= cols, so ASGO's right side is also the unsharded choice
WIDE = (9, 7, 5, 3)  # weights 7x9, 5x7, 3x5: rows < cols, unsharded ASGO preconditions the left side
STEPS = 4
CKPT_AT = 3  # the resumed step 4 reuses a root ASGO stored at step 3 (the registry's root_every="auto")

Case = tuple[str, type, dict[str, Any], tuple[int, ...]]
#: (name, class, kwargs, model sizes): every registered optimizer that takes DTensors, named in lower case, with
#: the registry's test hyperparameters (which exercise all of its state: ASGO's split blocks and stored roots, its
#: "auto" state in DCP), on the TALL model (rows >= cols: ASGO's side is the one-process choice, so every run
#: equals the plain one). Each guarantee of this suite is checked for each, and for the next one registered.
OPTIMIZER_CASES: list[Case] = [(s.name.lower(), s.load(), dict(s.test_kwargs), TALL)
                               for s in registry.REGISTRY if s.supports_dtensor]
#: the registered optimizers that refuse DTensor parameters (EGN): each is checked to refuse them on every rank
REFUSING: list[OptimizerSpec] = [s for s in registry.REGISTRY if not s.supports_dtensor]
#: the optimizer cases and ASGO's own on the WIDE model, where FSDP2 preconditions the other side than one process
#: (tests/fsdp2/test_fsdp2.py compares it with a reference whose side is forced)
CASES: list[Case] = [*OPTIMIZER_CASES, ("asgo_wide", ASGO, dict(registry.get("ASGO").test_kwargs), WIDE)]
CASE = {c[0]: c for c in CASES}
#: the options a case ran with in a version before ASGO's ``nesterov`` existed (the paper's rule, False: the
#: default since is True), what a checkpoint of such a version was trained with
BEFORE_NESTEROV: dict[str, dict[str, Any]] = {name: {"nesterov": False} for name, cls, *_ in CASES if cls is ASGO}


def global_batch(step: int, sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7919 * step + 17)
    x = torch.randn(N, sizes[0], generator=g, dtype=torch.float64)
    y = torch.randn(N, sizes[-1], generator=g, dtype=torch.float64)
    return x, y


def local_batch(step: int, sizes: tuple[int, ...], rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = global_batch(step, sizes)
    n = N // world_size
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def train_step(model: nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    loss = loss_fn(model, x, y)
    loss.backward()
    hand_loss(opt, loss)
    opt.step()


def hand_loss(opt: Any, loss: torch.Tensor) -> None:
    """Give ``opt`` the loss where its registry entry says its step needs it (SOAA)."""
    spec = registry.spec_of(opt)
    assert spec is not None and spec.needs is not StepNeeds.BATCH, f"teach train_step to step {type(opt).__name__}"
    if spec.needs is StepNeeds.LOSS:
        opt.set_loss(loss)


#: SOAA's global scalars: the trust-region sums enter them, so a sum counted twice (an HSDP replica)
#: or missed (a shard) shows here even where the parameters hide it (d clipped to its band).
SOAA_STATS = ("predicted_reduction", "actual_reduction", "rho", "d", "fisher_scale", "loss")


def soaa_stats(opt: Any) -> list[float]:
    st = opt.statistics()
    return [st[k] for k in SOAA_STATS] if isinstance(opt, SOAA) else []


def reference(name: str, steps: range, start: dict[str, Any] | None = None, *,
              older: bool = False) -> dict[str, Any]:
    """The plain single-process run (no DTensor, no process group) of case ``name``; ``older``: with the
    options of a version before ASGO's ``nesterov`` (:data:`BEFORE_NESTEROV`)."""
    _, cls, kw, sizes = CASE[name]
    model = tiny_mlp(sizes=sizes)
    opt = cls(model.named_parameters(), **kw, **(BEFORE_NESTEROV.get(name, {}) if older else {}))
    if start is not None:
        model.load_state_dict(start["model"])
        opt.load_state_dict(start["opt"])
    for t in steps:
        train_step(model, opt, *global_batch(t, sizes))
    return {"params": [p.detach().clone() for p in model.parameters()], "stats": soaa_stats(opt)}


def make_mesh(world_size: int, hsdp: bool):
    from torch.distributed.device_mesh import init_device_mesh

    if hsdp:
        return init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh("cpu", (world_size,))


def sharded_model(sizes: tuple[int, ...], mesh: Any, *, plain_last: bool = False,
                  state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """tiny_mlp under fully_shard: every Linear its own FSDP unit, or all but the last one (which then
    keeps plain tensors: a model mixing DTensor and ordinary parameters)."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_mlp(sizes=sizes)
    if state is not None:
        model.load_state_dict(state)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for lin in linears[:-1] if plain_last else linears:
        fully_shard(lin, mesh=mesh)
    if not plain_last:
        fully_shard(model, mesh=mesh)
    return model


def full_params(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter as a full tensor (DTensor all-gathers: a collective, in parameter order)."""
    from torch.distributed.tensor import DTensor

    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for p in model.parameters()]


def run_case(name: str, rank: int, world_size: int, mesh: Any, *, plain_last: bool = False,
             steps: range = range(STEPS), start: dict[str, Any] | None = None, older: bool = False):
    _, cls, kw, sizes = CASE[name]
    model = sharded_model(sizes, mesh, plain_last=plain_last, state=None if start is None else start["model"])
    kw = {**kw, **(BEFORE_NESTEROV.get(name, {}) if older else {})}  # (see reference)
    opt = cls(model.named_parameters(), **kw, grad_reduction="mean" if plain_last else "none")
    if start is not None:
        opt.load_state_dict(start["opt"])
    for t in steps:
        train_step(model, opt, *local_batch(t, sizes, rank, world_size))
    return model, opt


def equivalence(rank: int, world_size: int, hsdp: bool = False, plain_last: bool = False) -> dict[str, Any]:
    mesh = make_mesh(world_size, hsdp)
    out: dict[str, Any] = {}
    for name, *_ in CASES:
        model, opt = run_case(name, rank, world_size, mesh, plain_last=plain_last)
        out[name] = {"params": full_params(model), "stats": soaa_stats(opt),
                     "calls": dict(opt.comm.step_stats.calls),
                     # grad_reduction="mean" with several optimizers over the group: an order check first
                     "order_check": int(opt.sharding.grad_reduction == "mean" and base._built_over(opt.comm) > 1)}
    return out


def pipeline_stages(rank: int, world_size: int) -> dict[str, Any]:
    """Two pipeline stages of 2 ranks (W = 4), each an HSDP (replicate x shard) sub-mesh of the world
    (``world["rep", "shard"]``), each training the same model on the same data (so each equals one
    process); the optimizers get no process_group and must make their own over their stage's ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    world = init_device_mesh("cpu", (2, 1, world_size // 2), mesh_dim_names=("pp", "rep", "shard"))
    mesh, stage_rank = world["rep", "shard"], rank % (world_size // 2)
    out: dict[str, Any] = {}
    for name, *_ in CASES:
        model, opt = run_case(name, stage_rank, world_size // 2, mesh)
        out[name] = {"params": full_params(model), "stats": soaa_stats(opt),
                     "group": sorted(dist.get_process_group_ranks(opt.comm.group))}
    return out


def save_checkpoints(rank: int, world_size: int, path: str) -> None:
    """After CKPT_AT steps: the consolidated optimizer state and the full model, written by rank 0."""
    mesh = make_mesh(world_size, False)
    saved: dict[str, Any] = {}
    for name, *_ in CASES:
        model, opt = run_case(name, rank, world_size, mesh, steps=range(CKPT_AT))
        names = [n for n, _ in model.named_parameters()]
        params = full_params(model)
        opt.consolidate_state_dict(to=0)
        if rank == 0:
            saved[name] = {"opt": opt.state_dict(), "model": dict(zip(names, params))}
    if rank == 0:
        torch.save(saved, path)
    dist.barrier()


def resume(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """Load the checkpoint written at another world size and run the remaining steps."""
    saved = torch.load(path, weights_only=False)
    mesh = make_mesh(world_size, False)
    out: dict[str, Any] = {}
    for name, *_ in CASES:
        model, opt = run_case(name, rank, world_size, mesh, steps=range(CKPT_AT, STEPS), start=saved[name])
        out[name] = {"params": full_params(model), "stats": soaa_stats(opt)}
    return out


def expect_error(fn: Any) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def bad_combinations(rank: int, world_size: int) -> dict[str, str]:
    """Each construction must raise, with a clear message, on every rank (and hang nowhere)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = make_mesh(world_size, False)
    out: dict[str, str] = {}
    model = sharded_model(WIDE, mesh)
    for spec in REFUSING:
        out[f"refuses_{spec.name}"] = expect_error(lambda spec=spec: spec.build(model, **spec.test_kwargs))
    col = tiny_mlp(sizes=(8, 4, 4))  # FSDP2 needs Shard(1) dims divisible by W
    fully_shard(col, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0))
    out["asgo_shard1"] = expect_error(lambda: ASGO(col.named_parameters()))
    out["dasgo_shard1"] = expect_error(lambda: DASGO(col.named_parameters()))
    solo = init_device_mesh("cpu", (world_size,), mesh_dim_names=("other",))
    a = nn.Parameter(distribute_tensor(torch.zeros(4, 3, dtype=torch.float64), mesh, [Shard(0)]))
    b = nn.Parameter(distribute_tensor(torch.zeros(4, 3, dtype=torch.float64), solo, [Shard(0)]))
    over_tp = _fsdp_over_tp(world_size)
    for name, cls, kw, _ in OPTIMIZER_CASES:
        out[f"two_meshes_{name}"] = expect_error(lambda cls=cls, kw=kw: cls([a, b], **kw))
        out[f"add_group_{name}"] = expect_error(
            lambda cls=cls, kw=kw: cls([a], **kw).add_param_group({"params": [nn.Parameter(torch.zeros(2))]}))
        out[f"fsdp_tp_{name}"] = expect_error(lambda cls=cls, kw=kw: cls(over_tp.named_parameters(), **kw))
    return out


def _fsdp_over_tp(world_size: int) -> nn.Module:
    """fully_shard over tensor-parallel layers on a (dp=1, tp=W) mesh: _StridedShard placements."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("dp", "tp"))
    model = tiny_mlp(sizes=(6, 8, 4))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    return model


def nonfinite_skip(rank: int, world_size: int) -> dict[str, Any]:
    """A NaN only in rank 1's gradient of a plain (uncounted there) tensor skips the step on every rank."""
    mesh = make_mesh(world_size, False)
    model = sharded_model(TALL, mesh, plain_last=True)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("lightning_soaa.optim.base").addHandler(handler)
    try:
        opt = SOAA(model.named_parameters(), lr=1e-2)  # plain tensors + grad_reduction="none": warned
    finally:
        logging.getLogger("lightning_soaa.optim.base").removeHandler(handler)
    warned = any("grad_reduction='mean'" in r.getMessage() for r in records)
    before = full_params(model)
    opt.zero_grad()
    loss = loss_fn(model, *local_batch(0, TALL, rank, world_size))
    loss.backward()
    last = [p for p in model.parameters()][-2]  # the plain last weight
    if rank == 1:
        last.grad[0, 0] = float("nan")
    opt.step(loss=loss)
    after = full_params(model)
    return {"skipped": opt.skipped_steps, "unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
            "warned": warned}


SAME_BATCH = dict(lr=0.3, gamma=0.3, acceptance="same_batch")  # lr large enough that steps get rejected


def _same_batch_steps(model: nn.Module, opt: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for x, y in batches:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn(model, x, y)
            loss.backward()
            return loss.detach()

        opt.step(closure)


def same_batch_reference() -> dict[str, Any]:
    model = tiny_mlp(sizes=TALL)
    opt = SOAA(model.named_parameters(), **SAME_BATCH)
    _same_batch_steps(model, opt, [global_batch(t, TALL) for t in range(STEPS)])
    return {"params": [p.detach().clone() for p in model.parameters()], "stats": soaa_stats(opt),
            "rejected": opt.statistics()["rejected"]}


def same_batch(rank: int, world_size: int) -> dict[str, Any]:
    """SOAA(acceptance="same_batch") over FSDP2: the re-evaluated loss, the trial sums and a rejected
    step's restore of the local shards."""
    model = sharded_model(TALL, make_mesh(world_size, False))
    opt = SOAA(model.named_parameters(), **SAME_BATCH)
    _same_batch_steps(model, opt, [local_batch(t, TALL, rank, world_size) for t in range(STEPS)])
    return {"params": full_params(model), "stats": soaa_stats(opt), "rejected": opt.statistics()["rejected"]}


def _forward_only_steps(model: nn.Module, opt: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """A closure that only re-evaluates the loss (no backward): the gradient comes from the backward before."""
    for x, y in batches:
        forward_only_step(model, opt, x, y)


def same_batch_layouts(rank: int, world_size: int) -> dict[str, Any]:
    """SOAA(acceptance="same_batch") with a forward-only closure in FSDP2 layouts whose forward leaves
    unsharded copies: ``fully_shard(model)`` alone and a root holding the last Linear (FSDP2 never reshards
    the root after forward), every unit with reshard_after_forward=False, the root not wrapped."""
    from torch.distributed.fsdp import fully_shard

    mesh = make_mesh(world_size, False)
    out: dict[str, Any] = {}
    for layout in ("root_only", "root_holds_last", "no_reshard", "root_not_wrapped"):
        model = tiny_mlp(sizes=TALL)
        linears = [m for m in model if isinstance(m, nn.Linear)]
        units = {"root_only": [], "root_holds_last": linears[:-1]}.get(layout, linears)
        kw: dict[str, Any] = {"reshard_after_forward": False} if layout == "no_reshard" else {}  # else torch's default
        for lin in units:
            fully_shard(lin, mesh=mesh, **kw)
        if layout != "root_not_wrapped":
            fully_shard(model, mesh=mesh, **kw)
        opt = SOAA(model.named_parameters(), **SAME_BATCH)
        _forward_only_steps(model, opt, [local_batch(t, TALL, rank, world_size) for t in range(STEPS)])
        out[layout] = {"params": full_params(model), "stats": soaa_stats(opt), "rejected": opt.statistics()["rejected"]}
    return out


def eval_forward_before_step(rank: int, world_size: int) -> dict[str, Any]:
    """Every case under ``fully_shard(model)`` alone, with and without a forward without backward (an
    evaluation) between backward() and step(): FSDP2 leaves the root unsharded after it (never resharded
    after forward), and the next step's forward read those copies, the weights before the step."""
    from torch.distributed.fsdp import fully_shard

    out: dict[str, Any] = {}
    for name, cls, kw, sizes in CASES:
        for evaluate in (False, True):
            model = tiny_mlp(sizes=sizes)
            fully_shard(model, mesh=make_mesh(world_size, False))
            opt = cls(model.named_parameters(), **kw)
            for t in range(STEPS):
                x, y = local_batch(t, sizes, rank, world_size)
                opt.zero_grad()
                loss = loss_fn(model, x, y)
                loss.backward()
                if evaluate:
                    with torch.no_grad():
                        loss_fn(model, x, y)  # e.g. a metric, logged before the step
                hand_loss(opt, loss)
                opt.step()
            out[name, evaluate] = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                                   for g in opt.param_groups for p in g["params"]]
    return out


def same_batch_bf16(rank: int, world_size: int) -> dict[str, Any]:
    """SOAA(acceptance="same_batch") on a float32 model under MixedPrecisionPolicy(param_dtype=bf16), lr so
    small that a trial mostly leaves the bf16 copies of the weights unchanged."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = make_mesh(world_size, False)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = tiny_mlp(sizes=TALL, dtype=torch.float32)
    for lin in [m for m in model if isinstance(m, nn.Linear)]:
        fully_shard(lin, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    opt = SOAA(model.named_parameters(), lr=1e-4, gamma=0.3, acceptance="same_batch")
    batches = [tuple(t.float() for t in local_batch(t, TALL, rank, world_size)) for t in range(12)]
    _forward_only_steps(model, opt, batches)  # type: ignore[arg-type]
    st = opt.statistics()
    return {"d": st["d"], "rejected": st["rejected"], "finite": all(p.isfinite().all() for p in full_params(model))}


class _Collect(logging.Handler):
    """The warnings a logger emits in this process."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def same_batch_bf16_invisible(rank: int, world_size: int) -> dict[str, Any]:
    """SOAA(acceptance="same_batch") under MixedPrecisionPolicy(param_dtype=bf16) on float32 weights of 6 (bf16
    rounding there 0.03) moved by lr = 5e-3: no bf16 copy changes, the loss is equal to the bit, the predicted
    reduction is 70 roundings of the loss. Each rank holds 2 of the 4 rows."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = nn.Sequential(nn.Linear(64, 4, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(6.0)
    fully_shard(model, mesh=make_mesh(world_size, False), mp_policy=policy)
    opt = SOAA(model.named_parameters(), lr=5e-3, gamma=0.3, acceptance="same_batch")
    x, y = torch.ones(2, 64), torch.full((2, 4), 64 * 6.0 - 0.25)
    actual, warned = [], _Collect()
    logger = logging.getLogger("lightning_soaa.optim.soaa")
    logger.addHandler(warned)
    try:
        for _ in range(3):
            _forward_only_steps(model, opt, [(x, y)])
            actual.append(opt.statistics()["actual_reduction"])
    finally:
        logger.removeHandler(warned)
    st = opt.statistics()
    return {"d": st["d"], "rejected": st["rejected"], "actual": actual, "warned": warned.messages,
            "weight": opt.param_groups[0]["params"][0].full_tensor()}  # the float32 weights (sharded)


# ---------------------------------------------------------------------- torch.distributed.checkpoint
def _describe(v: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(v, dict):
        return {k: _describe(x) for k, x in v.items()}
    if isinstance(v, DTensor):
        return ("DTensor", str(tuple(v.placements)), tuple(v.shape), tuple(v.to_local().shape))
    return ("Tensor", tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__


def save_dcp(rank: int, world_size: int, root: str, hsdp: bool = False, plain_last: bool = False) -> dict[str, Any]:
    """After CKPT_AT steps: torch's recipe, unchanged (get_state_dict, dcp.save), one folder per case.
    Returns how each optimizer state dict looked and what loading one into another optimizer raised."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    mesh = make_mesh(world_size, hsdp)
    out: dict[str, Any] = {}
    for name, *_ in CASES:
        model, opt = run_case(name, rank, world_size, mesh, plain_last=plain_last, steps=range(CKPT_AT))
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{root}/{name}")
        out[name] = {"state": _describe(optim_sd["state"]), "groups": len(optim_sd["param_groups"])}
        if name == "soaa":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            other = ShardedAdamW(model.named_parameters(), lr=1e-2)
            out["wrong_optimizer"] = expect_error(lambda: other.load_state_dict(optim_sd))
            full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
            out["full_tensors"] = expect_error(lambda: opt.load_state_dict(full))
    return out


def resume_dcp(rank: int, world_size: int, root: str, plain_last: bool = False) -> dict[str, Any]:
    """A fresh model and optimizer at this W (1-D mesh): dcp.load into get_state_dict's tensors,
    set_state_dict, then the remaining steps. Also whether get_state_dict stepped the fresh optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    mesh = make_mesh(world_size, False)
    out: dict[str, Any] = {}
    for name, cls, kw, sizes in CASES:
        model = sharded_model(sizes, mesh, plain_last=plain_last)
        opt = cls(model.named_parameters(), **kw, grad_reduction="mean" if plain_last else "none")
        model_sd, optim_sd = get_state_dict(model, opt)  # must not step the fresh optimizer
        fresh = {"num_steps": opt.num_steps, "state": sum(len(v) for v in opt.state.values())}
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{root}/{name}")
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
        resumed_at = opt.num_steps
        for t in range(CKPT_AT, STEPS):
            train_step(model, opt, *local_batch(t, sizes, rank, world_size))
        out[name] = {"params": full_params(model), "stats": soaa_stats(opt), "fresh": fresh,
                     "resumed_at": resumed_at}
    return out


def checkpoint_misuse(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """(1) ``consolidate_state_dict(to=0)``, the lr changed, then ``state_dict()`` on every rank (as a DCP save
    would call it): rank 0 gets the full form with the new lr; the other ranks raise, without entering the
    sharded form's collective (SOAA's: it hung). (2) :func:`save_dcp`'s ASGO saved with root_every="auto"
    loaded into one built with root_every=2: refused (DCP dropped the "auto" state: 2.4e-3 off)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    mesh = make_mesh(world_size, False)
    out: dict[str, Any] = {}
    _, opt = run_case("soaa", rank, world_size, mesh, steps=range(1))
    opt.consolidate_state_dict(to=0)
    opt.param_groups[0]["lr"] = 1e-5
    if rank == 0:
        sd = opt.state_dict()
        out["consolidated"] = {"full": "lightning_soaa" in sd, "lr": sd["param_groups"][0]["lr"]}
    else:
        out["consolidated"] = expect_error(opt.state_dict)
    # a load voids an earlier consolidation (at the same step count it made state_dict() refuse everywhere)
    opt.consolidate_state_dict(to=None)
    opt.load_state_dict(opt.state_dict())
    out["after_load_is_dcp"] = "lightning_soaa" in opt.state_dict()["param_groups"][0]
    _, _, kw, sizes = CASE["asgo_wide"]
    model = sharded_model(sizes, mesh)
    asgo = ASGO(model.named_parameters(), **{**kw, "root_every": 2})
    model_sd, optim_sd = get_state_dict(model, asgo)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{root}/asgo_wide")
    out["auto_into_fixed"] = expect_error(
        lambda: set_state_dict(model, asgo, model_state_dict=model_sd, optim_state_dict=optim_sd))
    out["auto_into_fixed_steps"] = asgo.num_steps
    # (3) a consolidated checkpoint through torch's recipe for loading by param_names: the hook starts
    # from optimizer.state_dict(), the DCP form under FSDP2, and copied the full format's entries into it
    # (they loaded as nothing: a fresh optimizer, 0.05-0.11 off)
    _, soaa = run_case("soaa", rank, world_size, mesh, steps=range(2))
    soaa.consolidate_state_dict(to=None)
    full = soaa.state_dict()
    _, fresh = run_case("soaa", rank, world_size, mesh, steps=range(0))
    fresh.register_load_state_dict_pre_hook(_load_by_param_names)
    out["hooked_full_into_dcp"] = expect_error(lambda: fresh.load_state_dict(full))
    out["hooked_full_into_dcp_steps"] = fresh.num_steps
    return out


def _load_by_param_names(optimizer: Any, loaded: dict[str, Any]) -> dict[str, Any]:
    """torch's documented load pre-hook for loading by ``param_names`` (docs/source/optim.rst)."""
    adapted = copy.deepcopy(optimizer.state_dict())
    lookup = dict(zip(loaded["param_groups"][0]["param_names"], loaded["param_groups"][0]["params"]))
    for pid, name in zip(adapted["param_groups"][0]["params"], adapted["param_groups"][0]["param_names"]):
        if name in lookup and lookup[name] in loaded["state"]:
            adapted["state"][pid] = copy.deepcopy(loaded["state"][lookup[name]])
    return adapted


def two_groups_roundtrip(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """SOAA with two param groups through DCP at the same W: the second group's hyperparameters come
    back from the checkpoint (the fresh optimizer was built with another lr), the state exactly."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    mesh = make_mesh(world_size, False)

    def build(bias_lr: float) -> tuple[nn.Module, Any]:
        model = sharded_model(TALL, mesh)
        named = list(model.named_parameters())
        groups = [{"params": [(n, p) for n, p in named if n.endswith("weight")]},
                  {"params": [(n, p) for n, p in named if n.endswith("bias")], "lr": bias_lr, "weight_decay": 0.0}]
        return model, SOAA(groups, lr=3e-2, gamma=0.3)

    model, opt = build(1e-2)
    for t in range(CKPT_AT):
        train_step(model, opt, *local_batch(t, TALL, rank, world_size))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{root}/two_groups")
    model2, opt2 = build(5e-2)
    model_sd, optim_sd = get_state_dict(model2, opt2)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{root}/two_groups")
    set_state_dict(model2, opt2, model_state_dict=model_sd, optim_state_dict=optim_sd)
    pairs = [(opt.state[p][k], opt2.state[q].get(k))
             for p, q in zip(model.parameters(), model2.parameters(), strict=True) for k in opt.state[p]]
    same_state = len(pairs) == 3 * 6 and all(b is not None and torch.equal(a, b) for a, b in pairs)
    # "lag" differs by design: rank-local partial sums before, their global sum on rank 0 after (the
    # continuation tests show it is right); every other trust-region scalar comes back exactly
    trust, trust2 = opt.trust_state(), opt2.trust_state()
    same_trust = all(trust[k] == trust2[k] for k in trust if k != "lag")
    return {"lrs": [g["lr"] for g in opt2.param_groups], "same_state": same_state,
            "trust": same_trust, "steps": opt2.num_steps}


# ------------------------------------------------- full-file checkpoints between plain runs and FSDP2
#: the cases whose FSDP2 run equals the plain one (ASGO's: a parameter cut into two blocks)
SWITCH_CASES = tuple(name for name, *_ in OPTIMIZER_CASES)


def plain_checkpoint(name: str) -> dict[str, Any]:
    """A plain single-process run's checkpoint after CKPT_AT steps (our consolidated format)."""
    _, cls, kw, sizes = CASE[name]
    model = tiny_mlp(sizes=sizes)
    opt = cls(model.named_parameters(), **kw)
    for t in range(CKPT_AT):
        train_step(model, opt, *global_batch(t, sizes))
    return {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict())}


def _full_file_into_fsdp2(name: str, rank: int, world_size: int, start: dict[str, Any],
                          osd: dict[str, Any]) -> dict[str, Any]:
    """Lightning ModelParallelStrategy's resume of a full-file checkpoint: rekey to parameter names, then
    set_optimizer_state_dict(full_state_dict=True, broadcast_from_rank0=True); then the remaining steps.
    Returns the final parameters, or the error and the optimizer's step count after the refused load."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import OptimStateKeyType

    _, cls, kw, sizes = CASE[name]
    model = sharded_model(sizes, make_mesh(world_size, False), state=start["model"])
    opt = cls(model.named_parameters(), **kw)
    if osd:
        osd = FSDP.rekey_optim_state_dict(osd, OptimStateKeyType.PARAM_NAME, model)
    try:
        set_optimizer_state_dict(model, opt, optim_state_dict=osd,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    except ValueError as e:
        return {"error": str(e), "num_steps": opt.num_steps}
    resumed_at = opt.num_steps
    for t in range(CKPT_AT, STEPS):
        train_step(model, opt, *local_batch(t, sizes, rank, world_size))
    return {"params": full_params(model), "resumed_at": resumed_at}


def plain_into_fsdp2(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """A plain run's checkpoint resumed under FSDP2 (it restarted the optimizer from scratch, silently);
    given on rank 0 only (refused on every rank: the other ranks would start afresh); and with its
    metadata's copy in param_groups[0] removed, as an earlier version saved it (refused on every rank)."""
    saved = torch.load(path, weights_only=False)
    out: dict[str, Any] = {name: _full_file_into_fsdp2(name, rank, world_size, saved[name],
                                                       copy.deepcopy(saved[name]["opt"]))
                           for name in SWITCH_CASES}
    start = saved["soaa"]
    out["rank0_only"] = _full_file_into_fsdp2("soaa", rank, world_size, start,
                                              copy.deepcopy(start["opt"]) if rank == 0 else {})
    old = copy.deepcopy(start["opt"])
    old["param_groups"][0].pop("lightning_soaa", None)
    out["without_group_meta"] = _full_file_into_fsdp2("soaa", rank, world_size, start, old)
    return out


def save_full_file(rank: int, world_size: int, path: str) -> None:
    """After CKPT_AT steps under FSDP2: Lightning ModelParallelStrategy's full-file optimizer state
    (get_optimizer_state_dict(full_state_dict=True, cpu_offload=True), rekeyed to parameter ids on rank 0)
    and the full model, written by rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import OptimStateKeyType

    mesh = make_mesh(world_size, False)
    saved: dict[str, Any] = {}
    for name in SWITCH_CASES:
        model, opt = run_case(name, rank, world_size, mesh, steps=range(CKPT_AT))
        names = [n for n, _ in model.named_parameters()]
        params = full_params(model)
        osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            osd = FSDP.rekey_optim_state_dict(osd, OptimStateKeyType.PARAM_ID, model)
            saved[name] = {"opt": osd, "model": dict(zip(names, params))}
    if rank == 0:
        torch.save(saved, path)
    dist.barrier()


#: group options added after DCP support first saved the param groups (a checkpoint of that time lacks them,
#: one of 12-02/12-03 has them as keys of their own)
LATER_OPTIONS = ("batch_dims", "row_parts", "root_tol", "root_max_every", "max_block_numel")


def _as_older_version(optim_sd: dict[str, Any], form: str) -> dict[str, Any]:
    """``optim_sd`` as an earlier lightning_soaa wrote it: ``"before"`` the later options existed (in no
    key and not in the metadata), or with them ``"flat"`` (a key each, no copy in the metadata)."""
    import json

    from lightning_soaa.distributed.checkpoint import FORMAT_KEY

    sd = copy.copy(optim_sd)
    sd["param_groups"] = [dict(g) for g in optim_sd["param_groups"]]
    meta = json.loads(sd["param_groups"][0][FORMAT_KEY])
    options = meta.pop("group_options", [{} for _ in sd["param_groups"]])
    for g, o in zip(sd["param_groups"], options):
        both = {**{k: g.pop(k) for k in LATER_OPTIONS if k in g}, **o}
        if form == "flat":
            g.update(both)
    sd["param_groups"][0][FORMAT_KEY] = json.dumps(meta)
    return sd


def older_dcp_forms(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Each case checkpointed with torch's recipe in the forms of :func:`_as_older_version`, then resumed
    with this version by the recipe (dcp.load into a fresh optimizer's get_state_dict: it failed on a key
    the older checkpoint lacks, "Missing key in checkpoint state_dict: optim.param_groups.0.row_parts").
    The saved run has the options of those versions (ASGO without Nesterov, :data:`BEFORE_NESTEROV`), the
    resumed optimizer this version's defaults (nesterov=True): the checkpoint's rule must win."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    mesh = make_mesh(world_size, False)
    out: dict[str, Any] = {}
    for name, cls, kw, sizes in CASES:
        model, opt = run_case(name, rank, world_size, mesh, steps=range(CKPT_AT), older=True)
        model_sd, optim_sd = get_state_dict(model, opt)
        for form in ("before", "flat"):
            path = f"{root}/{name}_{form}"
            dcp.save({"model": model_sd, "optim": _as_older_version(optim_sd, form)}, checkpoint_id=path)
            fresh = sharded_model(sizes, mesh)
            fresh_opt = cls(fresh.named_parameters(), **kw)
            msd, osd = get_state_dict(fresh, fresh_opt)
            dcp.load({"model": msd, "optim": osd}, checkpoint_id=path)
            with _captured("lightning_soaa.optim.dcp_state") as said:
                set_state_dict(fresh, fresh_opt, model_state_dict=msd, optim_state_dict=osd)
            for t in range(CKPT_AT, STEPS):
                train_step(fresh, fresh_opt, *local_batch(t, sizes, rank, world_size))
            out[f"{name}_{form}"] = {"params": full_params(fresh), "stats": soaa_stats(fresh_opt), "said": said,
                                     "nesterov": [g.get("nesterov") for g in fresh_opt.param_groups]}
    return out


@contextlib.contextmanager
def _captured(logger: str) -> Any:
    """The messages ``logger`` logs inside the block (a list, filled as they come)."""
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger(logger)
    log.addHandler(handler)
    try:
        yield said
    finally:
        log.removeHandler(handler)


def built_before_fully_shard(rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """Every registry optimizer over parameters that ``fully_shard`` replaced afterwards (built before it, or
    built after it from a list taken before): what each raises, and whether the model stayed as it was.
    The stale originals never get a gradient again, so such an optimizer trained nothing (it warned once)."""
    from torch.distributed.fsdp import fully_shard

    mesh = make_mesh(world_size, False)
    out: dict[str, dict[str, Any]] = {}
    for name in registry.names():
        spec = registry.get(name)
        got: dict[str, Any] = {}
        for when in ("built_before", "list_taken_before"):
            model = tiny_mlp(sizes=TALL)
            taken = list(model.named_parameters())
            opt = spec.build(model, **spec.test_kwargs) if when == "built_before" else None
            for lin in model:
                if isinstance(lin, nn.Linear):
                    fully_shard(lin, mesh=mesh)
            fully_shard(model, mesh=mesh)
            before = full_params(model)
            x, y = local_batch(0, TALL, rank, world_size)

            def run(opt: Any = opt) -> None:
                if opt is None:
                    opt = type(spec.build(tiny_mlp(sizes=TALL), **spec.test_kwargs))(taken, **spec.test_kwargs)
                spec.take_step(opt, model, x, y)

            got[when] = expect_error(run)
            got[when + "_unchanged"] = all(torch.equal(a, b) for a, b in zip(before, full_params(model)))
        out[name] = got
    return out


#: torch's flattened optimizer state dict, torchtitan's default
def _flat() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _full_flat(cpu_offload: bool = False) -> Any:
    """The flattened form with full_state_dict=True: torch cannot load it (dcp_flat.py refuses it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True, cpu_offload=cpu_offload)


def save_flattened(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """torchtitan's recipe after CKPT_AT steps of every case: ``get_model_state_dict`` and
    ``get_optimizer_state_dict(options=StateDictOptions(flatten_optimizer_state_dict=True))``, ``dcp.save``;
    then the run goes on to STEPS (the uninterrupted run). Before, the save was refused (dcp_flat.py). First
    the save with full_state_dict=True too (with and without cpu_offload), which is refused."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    mesh = make_mesh(world_size, False)
    out: dict[str, Any] = {}
    for name, _, _, sizes in CASES:
        model, opt = run_case(name, rank, world_size, mesh, steps=range(CKPT_AT))
        # with full_state_dict=True too (cpu_offload or not): refused on every rank, nothing changed
        refused = [expect_error(lambda off=off: get_optimizer_state_dict(model, opt, options=_full_flat(off)))
                   for off in (False, True)]
        osd = get_optimizer_state_dict(model, opt, options=_flat())
        dcp.save({"model": get_model_state_dict(model), "optimizer": osd}, checkpoint_id=f"{root}/{name}")
        for t in range(CKPT_AT, STEPS):
            train_step(model, opt, *local_batch(t, sizes, rank, world_size))
        out[name] = {"params": full_params(model), "stats": soaa_stats(opt), "flat": "state" not in osd,
                     "full_flat_save": refused}
    return out


def resume_flattened(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """A fresh model and optimizer at this W: ``get_state_dict(options=flattened)`` as the destination,
    ``dcp.load``, ``set_state_dict(options=flattened)``, then the remaining steps. First the load with
    full_state_dict=True too, which is refused."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_optimizer_state_dict, set_state_dict

    mesh = make_mesh(world_size, False)
    out: dict[str, Any] = {}
    for name, cls, kw, sizes in CASES:
        model = sharded_model(sizes, mesh)
        opt = cls(model.named_parameters(), **kw, grad_reduction="none")
        model_sd, optim_sd = get_state_dict(model, opt, options=_flat())  # must not step the fresh optimizer
        fresh = {"num_steps": opt.num_steps, "state": sum(len(v) for v in opt.state.values())}
        dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=f"{root}/{name}")
        refused = expect_error(lambda: set_optimizer_state_dict(model, opt, dict(optim_sd), options=_full_flat()))
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_flat())
        resumed_at = opt.num_steps
        for t in range(CKPT_AT, STEPS):
            train_step(model, opt, *local_batch(t, sizes, rank, world_size))
        out[name] = {"params": full_params(model), "stats": soaa_stats(opt), "fresh": fresh,
                     "resumed_at": resumed_at, "full_flat_load": refused}
    return out


def built_after_a_forward(rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """Every registry optimizer that steps gradients, built after a forward under ``torch.no_grad()`` (the
    initial model evaluated first): fully_shard's root keeps its own parameters (here the last Linear's)
    unsharded after a forward, so ``model.parameters()`` handed the optimizer FSDP2's unsharded copies. Cases:
    ``forward`` (the next backward frees their memory), ``kept`` (``set_reshard_after_backward(False)``: they
    keep it, nothing refused them and the last layer never trained) and ``resharded`` (``model.reshard()``
    before building: the sharded parameters, which train). What construction and 3 steps raise, and which
    parameters (as full tensors) changed."""
    from torch.distributed.fsdp import fully_shard

    mesh = make_mesh(world_size, False)
    out: dict[str, dict[str, Any]] = {}
    for spec in registry.REGISTRY:
        if not spec.supports_dtensor:
            continue  # (refused at construction: bad_combinations)
        name = spec.name
        for case in ("forward", "kept", "resharded"):
            model = tiny_mlp(sizes=TALL)
            for lin in [m for m in model if isinstance(m, nn.Linear)][:-1]:
                fully_shard(lin, mesh=mesh)
            fully_shard(model, mesh=mesh)
            if case == "kept":
                model.set_reshard_after_backward(False)
            with torch.no_grad():
                model(*local_batch(0, TALL, rank, world_size)[:1])
            if case == "resharded":
                model.reshard()
            before = full_params(model)
            opts: list[Any] = []
            error = expect_error(lambda spec=spec, model=model: opts.append(spec.build(model, **spec.test_kwargs)))
            for step in range(3 if opts else 0):
                x, y = local_batch(step, TALL, rank, world_size)
                error = expect_error(lambda opt=opts[0], model=model, x=x, y=y: spec.take_step(opt, model, x, y))
            model.reshard()  # (full_params then reads the sharded parameters, which are what trains)
            out[name, case] = {"error": error, "changed": [not torch.equal(a, b) for a, b in
                                                           zip(before, full_params(model), strict=True)]}
    return out


#: equal shapes: a group's records taken by position then fit another group's parameters (no "different model")
SQUARE = (6, 6, 6, 6)


def _reorder_groups(model: nn.Module, order: tuple[int, ...]) -> list[dict[str, Any]]:
    """ASGO's groups for :func:`reordered_groups`: one Linear each (weight and bias), with options its DCP form
    keeps in the metadata only (``nesterov``, ``root_tol``), in ``order``."""
    named = list(model.named_parameters())
    options = [{"nesterov": True, "root_tol": 0.5}, {"nesterov": False, "root_tol": 1.0},
               {"nesterov": True, "root_tol": 2.0}]
    return [{"params": named[2 * i:2 * i + 2], "lr": 1e-2 * (i + 1), **options[i]} for i in order]


def reordered_groups(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """ASGO over three groups of equal shapes (6x6 weights) under FSDP2, saved by torch's recipe after CKPT_AT
    steps (both forms), resumed with the later two groups swapped (our metadata, with the saved first group,
    stays where it was) and with all three reversed; the uninterrupted run goes on beside. Per case: the max
    difference of the parameters after STEPS, and each resumed group's options."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    mesh = make_mesh(world_size, False)
    kw = dict(lr=2e-2, damping=1e-6, root_every=2, grad_reduction="none")
    out: dict[str, Any] = {}
    for flat in (False, True):
        options = StateDictOptions(flatten_optimizer_state_dict=flat)
        model = sharded_model(SQUARE, mesh)
        opt = ASGO(_reorder_groups(model, (0, 1, 2)), **kw)
        for t in range(CKPT_AT):
            train_step(model, opt, *local_batch(t, SQUARE, rank, world_size))
        model_sd, optim_sd = get_state_dict(model, opt, options=options)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{root}/reordered_{flat}")
        for t in range(CKPT_AT, STEPS):
            train_step(model, opt, *local_batch(t, SQUARE, rank, world_size))
        want = full_params(model)
        for order in ((0, 2, 1), (2, 1, 0)):
            model2 = sharded_model(SQUARE, mesh)
            opt2 = ASGO(_reorder_groups(model2, order), **{**kw, "nesterov": True})
            model_sd, optim_sd = get_state_dict(model2, opt2, options=options)
            dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{root}/reordered_{flat}")
            got: dict[str, Any] = {"error": expect_error(lambda: set_state_dict(  # noqa: B023 (called at once)
                model2, opt2, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options))}
            if got["error"] == "no error":
                for t in range(CKPT_AT, STEPS):
                    train_step(model2, opt2, *local_batch(t, SQUARE, rank, world_size))
                got["diff"] = max(float((a - b).abs().max()) for a, b in zip(full_params(model2), want, strict=True))
                got["groups"] = [(g["lr"], g["nesterov"], g["root_tol"]) for g in opt2.param_groups]
            out[f"{'flat' if flat else 'plain'}{order}"] = got
    return out
