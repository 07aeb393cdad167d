"""Rank functions and one-process runs for the FSDP2 test of ASGO's ``batch_dims=1`` (stacked experts).

The model is tests/unit/_experts_oracle.py's (three stacks of E = 3 experts, a router, a norm) plus
``gate``, a tall 8 x 3 matrix, and ``solo``, a stack of one expert: at W = 2 and 3 every rank but the
first holds none of it. Under FSDP2 the whole model is one ``fully_shard`` unit (every parameter
``Shard(0)``): the experts lie whole on their holders, while ``gate`` is row-sharded (its Gram and norm
all-reduced, in the same steps). The router and the norm go to the AdamW fallback (``use_asgo=False``):
FSDP2 preconditions a row-sharded matrix on its right, plain ASGO the wide router on its left
(tests/fsdp2/test_fsdp2.py covers that); ``gate`` is tall, right-side either way. The gradients
are the oracle's, the same on every rank (what FSDP2's reduce-scatter hands each rank: its rows of the
mean gradient), with its idle experts (all-zero gradient rows of a stack; a separate expert's is None).

The oracle: the one-process run of every expert as a separate 2-D parameter (batch_dims=0).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_soaa import ASGO
from tests.unit._experts_oracle import DENSE_SHAPES, KW, as_stacks, separate_params, set_grads, stacked_params

SOLO = (4, 6)  # the single expert of the stack ``solo`` (left side, k = 4)
GATE = (8, 3)  # rows >= columns: the right side, with FSDP2 or without
STEPS = 5
CKPT_AT = 3  # root_every=2: the resumed step 4 reuses the stored root, step 5 computes one
N_DENSE = len(DENSE_SHAPES)
AUTO: dict[str, Any] = {"root_every": "auto"}  # its gram_at_root and root_step are per-expert state too
#: the options of the versions that wrote the "flat" form (12-02/12-03): no ``nesterov``, the paper's rule
FLAT: dict[str, Any] = {"nesterov": False}


def _solo_init() -> torch.Tensor:
    return torch.randn(SOLO, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def _solo_grad(t: int) -> torch.Tensor:
    g = torch.randn(SOLO, generator=torch.Generator().manual_seed(500 + t), dtype=torch.float64)
    return g * 0.0 if t == 1 else g  # no tokens at step 1 (after its first step: it keeps its state)


def _gate(seed: int) -> torch.Tensor:
    return torch.randn(GATE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def named_params(stacked: bool) -> list[tuple[str, nn.Parameter]]:
    """The oracle's parameters, then ``gate`` and ``solo`` (``[1, 4, 6]`` stacked, ``4 x 6`` separate)."""
    named = stacked_params() if stacked else separate_params()
    solo = _solo_init()
    return named + [("gate", nn.Parameter(_gate(6))),
                    ("solo", nn.Parameter(solo[None].clone())) if stacked else ("solo.0", nn.Parameter(solo))]


def param_groups(named: list[tuple[str, Any]], stacked: bool) -> list[dict[str, Any]]:
    return [{"params": named[N_DENSE:], **({"batch_dims": 1} if stacked else {})},
            {"params": named[:N_DENSE], "use_asgo": False}]


def set_all_grads(named: list[tuple[str, nn.Parameter]], t: int, stacked: bool) -> None:
    set_grads(named[:-2], t, stacked)
    named[-2][1].grad = _gate(600 + t)
    g = _solo_grad(t)
    named[-1][1].grad = (g[None].clone() if stacked else None if t == 1 else g.clone())


def as_list(named: list[tuple[str, nn.Parameter]], stacked: bool) -> list[torch.Tensor]:
    """Dense parameters, the oracle's stacks, ``gate`` and ``solo`` as ``[1, 4, 6]``: comparable across
    spellings."""
    solo = named[-1][1].detach().clone()
    return as_stacks(named[:-2], stacked) + [named[-2][1].detach().clone(), solo if stacked else solo[None]]


def one_process(stacked: bool, steps: range, start: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """The plain one-process run (no process group); ``start``: a consolidated checkpoint to resume;
    ``kw``: ASGO's options beyond the oracle's."""
    named = named_params(stacked)
    opt = ASGO(param_groups(named, stacked), **{**KW, **kw})
    if start is not None:
        with torch.no_grad():
            for (_, p), v in zip(named, start["params"], strict=True):
                p.copy_(v)
        opt.load_state_dict(start["opt"])
    for t in steps:
        opt.zero_grad()
        set_all_grads(named, t, stacked)
        opt.step()
    return {"params": as_list(named, stacked), "opt": opt.state_dict(), "steps": opt.num_steps}


# ---------------------------------------------------------------------- FSDP2 ranks
class _Holder(nn.Module):
    """The stacked parameters under their names (dots would be submodules: replaced)."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
        super().__init__()
        for name, p in named:
            self.register_parameter(name.replace(".", "_"), p)


def sharded(world_size: int, start: dict[str, Any] | None = None, **kw: Any) -> tuple[nn.Module, ASGO]:
    """The model under fully_shard on a 1-D mesh of the whole world (every parameter Shard(0)) and its
    ASGO; ``start``: a consolidated checkpoint (full parameters and our consolidated optimizer state)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    named = named_params(True)
    if start is not None:
        with torch.no_grad():
            for (_, p), v in zip(named, start["params"], strict=True):
                p.copy_(v)
    model = _Holder(named)
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    opt = ASGO(param_groups(list(model.named_parameters()), True), **{**KW, **kw})
    if start is not None:
        opt.load_state_dict(start["opt"])
    return model, opt


def train(model: nn.Module, opt: ASGO, steps: range) -> None:
    """The oracle's gradients, each rank given its rows of them as FSDP2's reduce-scatter would."""
    from torch.distributed.tensor import distribute_tensor

    mirror = named_params(True)
    params = list(model.parameters())
    for t in steps:
        opt.zero_grad()
        set_all_grads(mirror, t, True)
        for p, (_, m) in zip(params, mirror, strict=True):
            p.grad = distribute_tensor(m.grad, p.device_mesh, p.placements, src_data_rank=None)  # type: ignore[attr-defined]
        opt.step()


def full_params(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]  # type: ignore[attr-defined]


def held_experts(opt: ASGO) -> list[tuple[int, int]]:
    """The keys (parameter index in the optimizer: the stacks, then solo; expert) of this rank's experts."""
    return sorted(b.key for b in opt._owned if opt._batched(b))


def save_dcp(model: nn.Module, opt: ASGO, path: str, older: str | None = None, options: Any = None) -> None:
    """torch's recipe; ``older``: the optimizer state in the form an earlier version wrote
    (``tests.fsdp2._workers._as_older_version``: ``"flat"``, ``batch_dims`` a key of its own, 12-02/12-03);
    ``options``: torch's ``StateDictOptions``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from tests.fsdp2._workers import _as_older_version

    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    if older is not None:
        optim_sd = _as_older_version(optim_sd, older)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def resume_dcp(world_size: int, path: str, **kw: Any) -> dict[str, Any]:
    """A fresh model and optimizer at this W, torch's recipe to load ``path`` (saved at any W), then the
    remaining steps. Also what the stacked state looked like, and the step count loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = sharded(world_size, **kw)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    form = {k: (type(v).__name__, tuple(v.shape), str(tuple(getattr(v, "placements", ()))))
            for k, v in optim_sd["state"]["experts0"].items()}
    at = opt.num_steps
    train(model, opt, range(CKPT_AT, STEPS))
    return {"params": full_params(model), "resumed_at": at, "form": form}


def corrupted_load(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """The DCP recipe with the last rank's experts' step counts of ``experts0`` set past the optimizer's
    (a state whose tensors changed after it was taken): only that rank can see it, every rank must raise
    (one raising alone left the others in their next step's collective) and load nothing."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = sharded(world_size)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    if rank == world_size - 1:
        optim_sd["state"]["experts0"]["step"].to_local().fill_(99.0)
    try:
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    except ValueError as e:
        return {"error": str(e), "steps": opt.num_steps, "state": sum(len(v) for v in opt.state.values())}
    return {"error": "loaded", "steps": opt.num_steps}


def resume_consolidated(world_size: int, path: str) -> list[torch.Tensor]:
    model, opt = sharded(world_size, torch.load(path, weights_only=False))
    train(model, opt, range(CKPT_AT, STEPS))
    return full_params(model)


def consolidated(model: nn.Module, opt: ASGO, rank: int, path: str) -> None:
    """Our consolidated form (a collective), written by rank 0 with the full parameters."""
    params = full_params(model)
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({"params": params, "opt": opt.state_dict()}, path)
    dist.barrier()


def run_world(rank: int, world_size: int, root: str, loads: tuple[int, ...], consolidated_from: tuple[str, ...],
              fresh: bool) -> dict[str, Any]:
    """At this W: with ``fresh``, the full run, checkpoints after CKPT_AT steps (DCP ``{root}/dcp_w{W}``,
    consolidated ``{root}/cons_w{W}.pt``) and the refusals; then resumed from the DCP checkpoints of the
    world sizes ``loads`` and from the consolidated files ``consolidated_from`` (under ``root``)."""
    out: dict[str, Any] = {}
    if fresh:
        model, opt = sharded(world_size)
        train(model, opt, range(STEPS))
        out.update(params=full_params(model), held=held_experts(opt), calls=dict(opt.comm.step_stats.calls),
                   refusals=refused(world_size), autograd=autograd_run(rank, world_size))
        model, opt = sharded(world_size)
        train(model, opt, range(CKPT_AT))
        save_dcp(model, opt, f"{root}/dcp_w{world_size}")
        consolidated(model, opt, rank, f"{root}/cons_w{world_size}.pt")
        model, opt = sharded(world_size, **FLAT)  # resumed by this version's default (nesterov=True)
        train(model, opt, range(CKPT_AT))
        save_dcp(model, opt, f"{root}/dcp_flat_w{world_size}", older="flat")
        model, opt = sharded(world_size, **AUTO)  # root_every="auto": two more stacked keys
        train(model, opt, range(CKPT_AT))
        save_dcp(model, opt, f"{root}/dcp_auto_w{world_size}")
    out["dcp"] = {w: resume_dcp(world_size, f"{root}/dcp_w{w}") for w in loads}
    out["dcp_flat"] = {w: resume_dcp(world_size, f"{root}/dcp_flat_w{w}") for w in loads}
    out["dcp_auto"] = {w: resume_dcp(world_size, f"{root}/dcp_auto_w{w}", **AUTO) for w in loads}
    if not fresh:
        out["corrupted"] = corrupted_load(rank, world_size, f"{root}/dcp_w{loads[0]}")
    out["consolidated"] = {name: resume_consolidated(world_size, f"{root}/{name}") for name in consolidated_from}
    return out


class _Experts(nn.Module):
    """A stack used in a forward pass: every token through every expert (no routing: the gradient is
    FSDP2's own, reduce-scattered from a backward, rather than one set by hand)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ni,eio->neo", x, self.w).clone()  # einsum's view: FSDP2 warns about views


def _autograd_batches(rank: int, world_size: int) -> list[torch.Tensor]:
    """Two steps' batches of 6 rows (divisible by W = 1, 2, 3): this rank's rows (``world_size=1``: all)."""
    out = []
    for t in range(2):
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(700 + t), dtype=torch.float64)
        n = 6 // world_size
        out.append(x[rank * n:(rank + 1) * n])
    return out


def autograd_run(rank: int, world_size: int) -> list[torch.Tensor]:
    """Two steps of a ``[3, 4, 5]`` stack trained through ``fully_shard``'s forward and backward (its
    gradient a ``Shard(0)`` DTensor, uneven at W = 2); at ``world_size=0`` the one-process run."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    w = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    model = _Experts(w)
    if world_size:
        fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    opt = ASGO(model.named_parameters(), batch_dims=1, **KW)
    for x in _autograd_batches(rank, max(world_size, 1)):
        opt.zero_grad()
        model(x).square().mean().backward()  # FSDP2 averages over ranks: the global batch's mean loss
        opt.step()
    w_now = model.w
    return [w_now.full_tensor().detach().clone() if world_size else w_now.detach().clone()]  # type: ignore[operator]


def refused(world_size: int) -> dict[str, str]:
    """batch_dims=1 under FSDP2 other than as a Shard(0) DTensor on a 1-D mesh: refused on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.randn(4, 2 * world_size, 5, dtype=torch.float64)
    out: dict[str, str] = {}
    for key, placements, m in (("shard1", [Shard(1)], mesh),
                               ("hsdp", [Replicate(), Shard(0)], init_device_mesh("cpu", (world_size, 1)))):
        stack = nn.Parameter(distribute_tensor(full, m, placements))
        out[key] = _error(lambda: ASGO([("experts", stack)], batch_dims=1))
    router = nn.Parameter(distribute_tensor(torch.randn(4, 6, dtype=torch.float64), mesh, [Shard(0)]))
    plain = nn.Parameter(full.clone())
    out["plain"] = _error(lambda: ASGO([{"params": [("router", router)]},
                                        {"params": [("experts", plain)], "batch_dims": 1}]))
    # a fused matrix stepped as its parts (row_parts): a row shard would cross the parts
    qkv = nn.Parameter(distribute_tensor(torch.randn(6 * world_size, 2, dtype=torch.float64), mesh, [Shard(0)]))
    out["row_parts"] = _error(lambda: ASGO([{"params": [("qkv.weight", qkv)], "row_parts": 3}]))
    return out


def _error(fn: Any) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "accepted"


# ---------------------------------------------------------------------- a first step whose Grams are zero
def _first_step_underflows(named: list[tuple[str, nn.Parameter]], t: int) -> None:
    """The oracle's gradients, but at step 0 every stack's scaled by 1e-300 (their Grams underflow to
    zero: an uninformed root, dropped after the step) and ``gate``'s zero: every ASGO block is left
    without ``inv_root``, which torch.distributed.checkpoint must still save (it needs every key)."""
    set_all_grads(named, t, True)
    if t == 0:
        for _, p in named[:-2] + named[-1:]:
            if p.grad is not None and p.dim() == 3:
                p.grad.mul_(1e-300)
        named[-2][1].grad.zero_()  # type: ignore[union-attr]  # gate: set just above


def zero_gram_reference(steps: int) -> list[torch.Tensor]:
    """One process, uninterrupted, on :func:`_first_step_underflows`' gradients."""
    named = named_params(True)
    opt = ASGO(param_groups(named, True), **KW)
    for t in range(steps):
        opt.zero_grad()
        _first_step_underflows(named, t)
        opt.step()
    return [p.detach().clone() for _, p in named]


def zero_gram_resume(rank: int, world_size: int, path: str, steps: int, flat: bool = False) -> list[torch.Tensor]:
    """Step 0 under FSDP2, a DCP checkpoint (every expert and ``gate`` without ``inv_root``), a fresh model
    and optimizer loading it, then the remaining steps. ``flat``: torch's flattened optimizer state dict
    (``StateDictOptions(flatten_optimizer_state_dict=True)``, torchtitan's) at both ends."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    from torch.distributed.tensor import distribute_tensor

    options = StateDictOptions(flatten_optimizer_state_dict=flat)

    def step(model: nn.Module, opt: ASGO, t: int) -> None:
        mirror = named_params(True)
        _first_step_underflows(mirror, t)
        opt.zero_grad()
        for p, (_, m) in zip(model.parameters(), mirror, strict=True):
            p.grad = distribute_tensor(m.grad, p.device_mesh, p.placements, src_data_rank=None)  # type: ignore[attr-defined]
        opt.step()

    model, opt = sharded(world_size)
    step(model, opt, 0)
    save_dcp(model, opt, path, options=options)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = sharded(world_size)
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    assert flat == ("state" not in optim_sd)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)
    for t in range(1, steps):
        step(model, opt, t)
    return full_params(model)
