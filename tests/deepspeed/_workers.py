"""Module-level workers for the DeepSpeed tests (spawned by tests/harness/distributed.py).

Each worker sets the env DeepSpeed insists on (LOCAL_RANK, ...) and keeps its shm-op JIT out (see
deepspeed_ext.compat.skip_shm_comm_op), then reuses the gloo group the harness already initialized.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from lightning_soaa.registry import StepNeeds
from tests.harness.compare import max_abs_diff
from tests.harness.models import batch, loss_fn, tiny_mlp

SIZES = (6, 8, 5, 3)


def ds_env(rank: int, world: int) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed_ext

    deepspeed_ext.skip_shm_comm_op()


def make_config(stage: int, dtype: str, opt_type: str, opt_params: dict[str, Any], *,
                sub_group_size: int | None = None, grad_accum: int = 1, offload: bool = False,
                round_robin: Any = False) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if round_robin is not False:  # True, or a spelling DeepSpeed reads as true ("on", 1)
        zero["round_robin_gradients"] = round_robin
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    if stage == 3:
        # persistence 0: every parameter is partitioned (the flat partitions cut through all of them)
        zero["stage3_param_persistence_threshold"] = 0
        if sub_group_size is not None:
            zero["sub_group_size"] = sub_group_size
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0; the references do not clip
        "zero_optimization": zero,
        "optimizer": {"type": opt_type, "params": dict(opt_params)},
        "steps_per_print": 10_000,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def split_groups(model: torch.nn.Module, named: bool = False) -> list[dict[str, Any]]:
    """Two param groups (matrices, vectors) with different weight decay: several step() calls per
    training step at ZeRO-1/2/3."""
    mats = [(n, p) for n, p in model.named_parameters() if p.ndim >= 2]
    vecs = [(n, p) for n, p in model.named_parameters() if p.ndim < 2]
    pick = (lambda xs: xs) if named else (lambda xs: [p for _, p in xs])
    return [{"params": pick(mats)}, {"params": pick(vecs), "weight_decay": 0.0}]


def full_fp32_params(engine: Any, stage: int, client: Any, model_params: list[torch.Tensor],
                     group_order: list[torch.Tensor]) -> list[torch.Tensor]:
    """The fp32 master value of every model parameter, in module order (collective at ZeRO >= 1)."""
    if stage >= 1:
        from deepspeed.utils import safe_get_full_fp32_param

        return [safe_get_full_fp32_param(p).detach().clone().float() for p in model_params]
    # stage 0: the client's groups hold the parameters (fp32) or DeepSpeed's fp32 masters (bf16), in
    # param-group order
    masters = [p for g in client._canonical_groups for p in g["params"]]
    by_id = {id(p): m for p, m in zip(group_order, masters)}
    return [by_id[id(p)].detach().clone().float() for p in model_params]


def _feed(x: torch.Tensor, dtype: str) -> torch.Tensor:
    return x.to(torch.bfloat16) if dtype == "bf16" else x


def run_deepspeed(rank: int, world: int, stage: int, dtype: str, opt_type: str, opt_params: dict[str, Any],
                  steps: int, *, groups: bool = False, sub_group_size: int | None = None,
                  grad_accum: int = 1, offload: bool = False, round_robin: bool = False) -> dict[str, Any]:
    import deepspeed_ext

    model = tiny_mlp(0, torch.float32, SIZES)
    model_params = list(model.parameters())
    cfg = make_config(stage, dtype, opt_type, opt_params, sub_group_size=sub_group_size, grad_accum=grad_accum,
                      offload=offload, round_robin=round_robin)
    model_parameters = split_groups(model, named=True) if groups else None
    ordered = model_parameters
    if groups and "fused" in opt_params:  # the client's canonical groups are regrouped (ASGO's fused)
        from lightning_soaa.optim.asgo_groups import split_fused

        ordered = split_fused(model_parameters, opt_params["fused"])
    group_order = [p for g in ordered for _, p in g["params"]] if groups else model_params
    t0 = time.perf_counter()
    engine, _, _, _ = deepspeed_ext.initialize(model=model, config=cfg, model_parameters=model_parameters)
    t1 = time.perf_counter()
    client = deepspeed_ext.find_client_optimizer(engine.optimizer)
    losses = []
    for s in range(steps):
        for m in range(grad_accum):
            x, y = batch(s * grad_accum + m, rank, dtype=torch.float32)
            loss = loss_fn(engine, _feed(x, dtype), _feed(y, dtype))
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    t2 = time.perf_counter()
    if round_robin:  # DeepSpeed's own full-parameter reads follow its per-parameter maps, which the
        # round-robin order breaks (deepspeed_ext/structure.py); in fp32 the parameters are the masters
        assert dtype == "fp32"
        params = [p.detach().clone() for p in model_params]
    else:
        params = full_fp32_params(engine, stage, client, model_params, group_order)
    out = {"params": params, "losses": losses, "init_s": t1 - t0, "train_s": t2 - t1,
           "training_steps": client.training_steps, "ignored_steps": client.ignored_steps,
           "wrapper": type(engine.optimizer).__name__, "stats": client.statistics(),
           "step_calls": client.step_calls, "pieces": _pieces(client)}
    del engine
    return out


def _pieces(client: Any) -> list[tuple[Any, ...]] | None:
    vp = client._vparams
    if vp is None or not any(p is not None for p in vp.pieces):
        return None
    return [(g, p.param_name, p.lp_start, p.numel, p.shape, p.name, p.kind) for g, p in zip(vp.groups, vp.pieces)]


def _piece_params(master: torch.nn.Module, pieces: list[tuple[Any, ...]], groups: bool):
    """Views of the master parameters laid out like DeepSpeed's pieces (the documented ZeRO-1/2/3
    decomposition), as param groups, plus a function that attaches the matching gradient views."""
    by_name = dict(master.named_parameters())
    views, grads_of, per_group = [], [], {}
    for g, pname, start, n, shape, name, _kind in sorted(pieces, key=lambda x: (x[0], x[1], x[2])):
        base = by_name[pname]
        v = base.detach().view(-1).narrow(0, start, n).view(shape)
        views.append(v)
        grads_of.append((v, base, start, n, shape))
        per_group.setdefault(g, []).append((name, v))
    extra = [{}, {"weight_decay": 0.0}] if groups else [{}]
    param_groups = [dict(extra[g], params=per_group[g]) for g in sorted(per_group)]

    def attach() -> None:
        for v, base, start, n, shape in grads_of:
            v.grad = base.grad.view(-1).narrow(0, start, n).view(shape)

    return param_groups, attach


def run_reference(rank: int, world: int, dtype: str, opt_cls: type, opt_params: dict[str, Any], steps: int,
                  *, groups: bool = False, grad_accum: int = 1, named: bool = False,
                  pieces: list[tuple[Any, ...]] | None = None) -> dict[str, Any]:
    """Our own sharded run (shard=True over the default group) with DeepSpeed's numerics: fp32 master
    weights; under bf16 the forward/backward run on a bf16 copy and bf16 gradients are averaged in bf16."""
    master = tiny_mlp(0, torch.float32, SIZES)
    work = tiny_mlp(0, torch.bfloat16 if dtype == "bf16" else torch.float32, SIZES)
    attach = None
    if pieces is not None:
        params, attach = _piece_params(master, pieces, groups)
    else:
        params = split_groups(master, named=named) if groups else list(master.parameters())
    opt = opt_cls(params, **opt_params)
    mp, wp = list(master.parameters()), list(work.parameters())
    if dtype == "bf16":  # DeepSpeed makes its fp32 masters from the bf16 model: start from rounded values
        with torch.no_grad():
            for b in mp:
                b.copy_(b.to(torch.bfloat16).float())
    for s in range(steps):
        with torch.no_grad():
            for a, b in zip(wp, mp):
                a.copy_(b)
        for p in wp:
            p.grad = None
        total = 0.0
        for m in range(grad_accum):
            x, y = batch(s * grad_accum + m, rank, dtype=torch.float32)
            loss = loss_fn(work, _feed(x, dtype), _feed(y, dtype))
            (loss / grad_accum).backward()
            total += loss.item()
        for a, b in zip(wp, mp):
            g = a.grad  # DeepSpeed reduces bf16 gradients in bf16
            dist.all_reduce(g)
            b.grad = (g / world).float()
        if attach is not None:
            attach()
        if hasattr(opt, "set_loss"):
            opt.set_loss(total / grad_accum)
        opt.step()
    return {"params": [p.detach().clone() for p in mp], "stats": opt.statistics()}


def w_equivalence(rank: int, world: int, cases: list[dict[str, Any]], opt_path: tuple[str, str],
                  opt_params: dict[str, Any], steps: int, ref_variants: list[dict[str, Any]]) -> dict[str, Any]:
    """Run each DeepSpeed case, then each reference variant; return everything for the parent."""
    ds_env(rank, world)
    import importlib

    opt_cls = getattr(importlib.import_module(opt_path[0]), opt_path[1])
    out: dict[str, Any] = {"ds": [], "ref": []}
    for case in cases:
        out["ds"].append(run_deepspeed(rank, world, steps=steps, opt_params=opt_params, **case))
    for var in ref_variants:
        var = dict(var)
        if "pieces_from" in var:  # the union over ranks of DeepSpeed's pieces in that case
            mine = out["ds"][var.pop("pieces_from")]["pieces"]
            everyone: list[Any] = [None] * world
            dist.all_gather_object(everyone, mine)
            var["pieces"] = [p for part in everyone for p in part]
        out["ref"].append(run_reference(rank, world, opt_cls=opt_cls, opt_params=opt_params, steps=steps, **var))
    return out


def w_many(rank: int, world: int, jobs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Several :func:`w_equivalence` jobs in the same two processes (DeepSpeed's first engine costs most
    of the time: imports; later engines take ~0.1-1.5 s each)."""
    out = {}
    for name, job in jobs.items():
        t0 = time.perf_counter()
        out[name] = w_equivalence(rank, world, **job)
        out[name]["seconds"] = time.perf_counter() - t0
    return out


def _train(engine: Any, rank: int, steps: range, dtype: str = "fp32") -> None:
    for s in steps:
        x, y = batch(s, rank, dtype=torch.float32)
        loss = loss_fn(engine, _feed(x, dtype), _feed(y, dtype))
        engine.backward(loss)
        engine.step()


def w_checkpoint(rank: int, world: int, ckpt_root: str, stages: list[int], opt_type: str,
                 opt_params: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Per stage: train 3 steps, save, train 3 more (run A); a fresh engine (other initial weights)
    loads the checkpoint and trains the same 3 steps (run B). Returns both runs' parameters and
    optimizer statistics."""
    ds_env(rank, world)
    import deepspeed_ext

    out: dict[str, Any] = {}
    for stage in stages:
        cfg = make_config(stage, dtype, opt_type, opt_params, sub_group_size=40 if stage == 3 else None)
        runs = {}
        for label, seed in (("A", 0), ("B", 7)):
            model = tiny_mlp(seed, torch.float32, SIZES)
            params = list(model.parameters())
            engine, _, _, _ = deepspeed_ext.initialize(model=model, config=cfg, model_parameters=split_groups(model))
            client = deepspeed_ext.find_client_optimizer(engine.optimizer)
            path = os.path.join(ckpt_root, f"stage{stage}")
            if label == "A":
                _train(engine, rank, range(3), dtype)
                engine.save_checkpoint(path, tag="t3")
            else:
                engine.load_checkpoint(path, tag="t3")
            _train(engine, rank, range(3, 6), dtype)
            order = [p for g in split_groups(model) for p in g["params"]]
            runs[label] = {"params": full_fp32_params(engine, stage, client, params, order),
                           "stats": client.statistics()}
            del engine
        out[stage] = runs
    return out


def w_resume_other_world(
    rank: int, world: int, ckpt_root: str, opt_type: str, opt_params: dict[str, Any]
) -> dict[str, Any]:
    """Load checkpoints written on 2 ranks: stage 0 (our sharding: world-size independent) must resume;
    stage 2 must fail with an error naming the supported path."""
    ds_env(rank, world)
    import deepspeed_ext

    out: dict[str, Any] = {}
    for stage in (0, 2):
        cfg = make_config(stage, "fp32", opt_type, opt_params)
        model = tiny_mlp(7, torch.float32, SIZES)
        engine, _, _, _ = deepspeed_ext.initialize(model=model, config=cfg, model_parameters=split_groups(model))
        client = deepspeed_ext.find_client_optimizer(engine.optimizer)
        try:
            engine.load_checkpoint(os.path.join(ckpt_root, f"stage{stage}"), tag="t3")
            out[stage] = {"ok": True, "stats": client.statistics(),
                          "params": [p.detach().clone() for p in model.parameters()]}
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            out[stage] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        del engine
    return out


def w_egn(rank: int, world: int, opt_params: dict[str, Any], steps: int) -> dict[str, Any]:
    """EGN at ZeRO stage 0 under the engine vs our own sharded EGN on the same per-rank batches."""
    ds_env(rank, world)
    import deepspeed_ext
    from lightning_soaa.optim.egn import EGN

    cfg = make_config(0, "fp32", "lightning_soaa.EGN", opt_params)
    model = tiny_mlp(0, torch.float32, SIZES)
    engine, _, _, _ = deepspeed_ext.initialize(model=model, config=cfg)
    client = deepspeed_ext.find_client_optimizer(engine)
    for s in range(steps):
        x, y = batch(s, rank, dtype=torch.float32)
        client.set_batch(x, y)
        loss = loss_fn(engine, x, y)
        engine.backward(loss)
        engine.step()
    ds_params = [p.detach().clone() for p in model.parameters()]
    stats = client.statistics()
    ref_model = tiny_mlp(0, torch.float32, SIZES)
    ref = EGN(ref_model, **opt_params)
    for s in range(steps):
        x, y = batch(s, rank, dtype=torch.float32)
        ref.step(inputs=x, targets=y)
    return {"params": ds_params, "ref": [p.detach().clone() for p in ref_model.parameters()], "stats": stats,
            "ref_stats": ref.statistics(), "training_steps": client.training_steps,
            "wrapper": type(engine.optimizer).__name__}


def w_raw_deepspeed(rank: int, world: int, name: str) -> str:
    """DeepSpeed's own initialize handed a lightning_soaa optimizer object (what Lightning's stock
    DeepSpeedStrategy does): ZeRO-2 swaps the groups' tensors for its flat partitions. The error of the
    first step, on every rank (or "no error")."""
    import deepspeed

    from lightning_soaa.registry import get

    ds_env(rank, world)
    torch.manual_seed(0)
    model = tiny_mlp(0, torch.float32, sizes=SIZES)
    spec = get(name)
    opt = spec.build(model, **spec.test_kwargs)
    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2},
           "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    x, y = batch(0, rank, n=4, d_in=SIZES[0], d_out=SIZES[-1], dtype=torch.float32)
    loss = loss_fn(engine, x, y)
    engine.backward(loss)
    if spec.needs is StepNeeds.LOSS:
        opt.set_loss(loss.detach())
    try:
        engine.step()
    except ValueError as e:
        return str(e)
    return "no error"


def _client_engine(rank: int, route: str, stage: int, dtype: str, name: str, params: dict[str, Any],
                   client_stage: int | None = None) -> tuple[Any, Any, torch.nn.Module]:
    """An engine whose optimizer is named in the JSON (``route="json"``) or passed in code as
    ``DeepSpeedClientOptimizer.from_optimizer(...)`` with a config without an optimizer block."""
    import deepspeed_ext
    from deepspeed_ext.client import DeepSpeedClientOptimizer
    from lightning_soaa.registry import get

    model = tiny_mlp(0, torch.float32, SIZES)
    cfg = make_config(stage, dtype, f"lightning_soaa.{name}", params)
    if dtype == "fp16":
        cfg["fp16"] = {"enabled": True}
    if route == "json":
        engine, _, _, _ = deepspeed_ext.initialize(model=model, config=cfg)
    else:
        cfg.pop("optimizer")
        spec = get(name)
        opt = spec.load()(model.parameters(), **params)
        client = DeepSpeedClientOptimizer.from_optimizer(
            opt, zero_stage=stage if client_stage is None else client_stage, layout=spec.ds_layout.value)
        engine, _, _, _ = deepspeed_ext.initialize(model=model, config=cfg, optimizer=client)
    return engine, deepspeed_ext.find_client_optimizer(engine), model


def w_client_route(rank: int, world: int, jobs: list[tuple[str, int, str, str, dict[str, Any]]],
                   steps: int) -> dict[Any, Any]:
    """Per job (route, stage, dtype, optimizer name, params): the fp32 parameters and counters after
    ``steps`` steps, or the error's text."""
    ds_env(rank, world)
    out: dict[Any, Any] = {}
    for job in jobs:
        route, stage, dtype, name, params = job[:5]
        client_stage = job[5] if len(job) > 5 else None
        try:
            engine, client, model = _client_engine(rank, route, stage, dtype, name, params, client_stage)
            _train(engine, rank, range(steps), dtype)
            out[job[:4]] = {"params": full_fp32_params(engine, stage, client, list(model.parameters()),
                                                       list(model.parameters())),
                            "training_steps": client.training_steps, "ignored": client.ignored_steps,
                            "stats": client.statistics()}
            del engine
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            out[job[:4]] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def w_egn_accumulation(rank: int, world: int, opt_params: dict[str, Any], steps: int, gas: int) -> dict[str, Any]:
    """EGN at ZeRO stage 0 with gradient_accumulation_steps=gas (set_batch on every micro-batch) vs our
    own EGN stepping on the concatenation of each step's micro-batches; then one step for which rank 0
    alone got a single set_batch for its gas micro-batches (its error, raised on every rank)."""
    ds_env(rank, world)
    import deepspeed_ext
    from lightning_soaa.optim.egn import EGN

    cfg = make_config(0, "fp32", "lightning_soaa.EGN", opt_params, grad_accum=gas)
    model = tiny_mlp(0, torch.float32, SIZES)
    engine, _, _, _ = deepspeed_ext.initialize(model=model, config=cfg)
    client = deepspeed_ext.find_client_optimizer(engine)
    for s in range(steps):
        for m in range(gas):
            x, y = batch(s * gas + m, rank, dtype=torch.float32)
            client.set_batch(x, y)
            engine.backward(loss_fn(engine, x, y))
            engine.step()
    out: dict[str, Any] = {"params": [p.detach().clone() for p in model.parameters()],
                           "training_steps": client.training_steps}
    before = [p.detach().clone() for p in model.parameters()]
    try:
        for m in range(gas):
            x, y = batch(100 + m, rank, dtype=torch.float32)
            if m == gas - 1 or rank > 0:  # rank 0 alone misses set_batch calls: every rank must raise
                client.set_batch(x, y)
            engine.backward(loss_fn(engine, x, y))
            engine.step()
        out["error"] = "no error"
    except ValueError as exc:
        out["error"] = str(exc)
    out["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    ref_model = tiny_mlp(0, torch.float32, SIZES)
    ref = EGN(ref_model, **opt_params)
    for s in range(steps):
        xs, ys = zip(*(batch(s * gas + m, rank, dtype=torch.float32) for m in range(gas)))
        ref.step(inputs=torch.cat(xs), targets=torch.cat(ys))
    out["ref"] = [p.detach().clone() for p in ref_model.parameters()]
    return out


def w_state_dict_one_rank(rank: int, world: int, ckpt_root: str) -> dict[str, Any]:
    """Stage 0 (our sharding) on W ranks: ``engine.optimizer.state_dict()`` on rank 0 alone (a common
    ``if rank == 0: torch.save(...)`` pattern) for AdamW and EGN; then engine.save_checkpoint on every
    rank, and consolidate_state_dict on every rank followed by state_dict on rank 0."""
    ds_env(rank, world)
    import deepspeed_ext

    out: dict[str, Any] = {}
    for name, params in (("AdamW", {"lr": 1e-2}), ("EGN", {"loss": "mse", "lr": 0.5})):
        model = tiny_mlp(0, torch.float32, SIZES)
        engine, _, _, _ = deepspeed_ext.initialize(model=model, config=make_config(0, "fp32",
                                                                                   f"lightning_soaa.{name}", params))
        client = deepspeed_ext.find_client_optimizer(engine)
        for s in range(2):
            x, y = batch(s, rank, dtype=torch.float32)
            if name == "EGN":
                client.set_batch(x, y)
            engine.backward(loss_fn(engine, x, y))
            engine.step()
        res: dict[str, Any] = {}
        if rank == 0:
            try:
                engine.optimizer.state_dict()
                res["alone"] = "no error"
            except RuntimeError as exc:
                res["alone"] = str(exc)
        dist.barrier()
        engine.save_checkpoint(os.path.join(ckpt_root, name), tag="t2")
        res["saved"] = True
        client.consolidate_state_dict()  # to rank 0, as Lightning and torch's ZeRO do
        if rank == 0:
            res["after_consolidate_keys"] = sorted(engine.optimizer.state_dict())
        out[name] = res
        del engine
    return out


def w_round_robin_resume(rank: int, world: int, ckpt_root: str, opt_type: str) -> dict[Any, Any]:
    """ZeRO-2, fp32: a checkpoint written with round_robin_gradients on (spelt "on") or off, loaded by an engine
    with each setting: the error of the load, or the parameters after 2 more steps (and those of the run that
    wrote it)."""
    ds_env(rank, world)
    import deepspeed_ext

    def engine_with(rr: Any, seed: int) -> Any:
        cfg = make_config(2, "fp32", opt_type, {"lr": 1e-2}, round_robin=rr)
        model = tiny_mlp(seed, torch.float32, SIZES)
        return deepspeed_ext.initialize(model=model, config=cfg, model_parameters=split_groups(model))[0], model

    out: dict[Any, Any] = {}
    for rr in (False, True):
        engine, model = engine_with("on" if rr else rr, 0)  # saved spelt as DeepSpeed also reads true
        _train(engine, rank, range(2))
        engine.save_checkpoint(os.path.join(ckpt_root, f"rr{int(rr)}"), tag="t2")
        _train(engine, rank, range(2, 4))
        out[("uninterrupted", rr)] = [p.detach().clone() for p in model.parameters()]
        del engine
    for saved in (False, True):
        for rr in (False, True):
            engine, model = engine_with(rr, 7)
            try:
                engine.load_checkpoint(os.path.join(ckpt_root, f"rr{int(saved)}"), tag="t2")
                _train(engine, rank, range(2, 4))
                out[(saved, rr)] = [p.detach().clone() for p in model.parameters()]
            except Exception as exc:  # noqa: BLE001 - the message is what the test checks
                out[(saved, rr)] = f"{type(exc).__name__}: {exc}"
            del engine
    return out


def w_cross_stage(rank: int, world: int, ckpt_root: str, pairs: list[tuple[int, int]]) -> dict[Any, str]:
    """Per (saved stage, loading stage): the error of loading, with optimizer state, a checkpoint written
    under the other stage (AdamW, fp32, one step), or "ok"; ("module", 0, 2): stage 0's module loaded by a
    ZeRO-2 engine with load_optimizer_states=False."""
    ds_env(rank, world)
    import deepspeed_ext

    params = {"lr": 1e-2}

    def engine_at(stage: int) -> Any:
        cfg = make_config(stage, "fp32", "lightning_soaa.AdamW", params)
        engine, _, _, _ = deepspeed_ext.initialize(model=tiny_mlp(0, torch.float32, SIZES), config=cfg)
        return engine

    for stage in sorted({s for s, _ in pairs}):
        engine = engine_at(stage)
        _train(engine, rank, range(1))
        engine.save_checkpoint(os.path.join(ckpt_root, f"s{stage}"), tag="t1")
        del engine
    out: dict[Any, str] = {}
    for saved, stage in pairs:
        engine = engine_at(stage)
        try:
            engine.load_checkpoint(os.path.join(ckpt_root, f"s{saved}"))  # tag from 'latest'
            out[(saved, stage)] = "ok"
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            out[(saved, stage)] = f"{type(exc).__name__}: {exc}"
        del engine
    engine = engine_at(2)
    engine.load_checkpoint(os.path.join(ckpt_root, "s0"), load_optimizer_states=False, load_lr_scheduler_states=False)
    out[("module", 0, 2)] = "ok"
    return out


def w_cross_precision(rank: int, world: int, ckpt_root: str, cases: list[tuple[int, str, str]]) -> dict[Any, str]:
    """Per (stage, saved dtype, loading dtype): the error of loading, with optimizer state, a checkpoint written
    with bf16 on by an engine with it off or the other way round (SOAA, one step), or "ok"; ("module", stage,
    saved, loading): the same load with load_optimizer_states=False."""
    ds_env(rank, world)
    import deepspeed_ext

    params = {"lr": 1e-2, "gamma": 0.1, "total_steps": 10}

    def engine_at(stage: int, dtype: str) -> Any:
        cfg = make_config(stage, dtype, "lightning_soaa.SOAA", params)
        engine, _, _, _ = deepspeed_ext.initialize(model=tiny_mlp(0, torch.float32, SIZES), config=cfg)
        return engine

    out: dict[Any, str] = {}
    for stage, saved, loading in cases:
        path = os.path.join(ckpt_root, f"s{stage}-{saved}")
        engine = engine_at(stage, saved)
        _train(engine, rank, range(1), saved)
        engine.save_checkpoint(path, tag="t1")
        del engine
        for module_only in (False, True):
            engine = engine_at(stage, loading)
            key = ("module", stage, saved, loading) if module_only else (stage, saved, loading)
            try:
                engine.load_checkpoint(path, load_optimizer_states=not module_only,
                                       load_lr_scheduler_states=not module_only)
                out[key] = "ok"
            except Exception as exc:  # noqa: BLE001 - the message is what the test checks
                out[key] = f"{type(exc).__name__}: {exc}"
            del engine
    return out


def w_leave_deepspeed(rank: int, world: int, ckpt_root: str) -> dict[str, Any]:
    """What engine.save_checkpoint wrote (SOAA, 3 steps, saved at ZeRO-0 and ZeRO-2) loaded into a plain SOAA
    without DeepSpeed: the client's state as saved (refused: what it is), and at ZeRO-0 its inner state (3 more
    steps); ``ds``: the same 6 steps under the engine (ZeRO-0), this world size."""
    ds_env(rank, world)
    import glob

    import deepspeed_ext
    from lightning_soaa.optim.soaa import SOAA

    params = {"lr": 1e-2, "gamma": 0.1, "total_steps": 10}
    out: dict[str, Any] = {}
    for stage in (0, 2):
        engine, _, _, _ = deepspeed_ext.initialize(model=tiny_mlp(0, torch.float32, SIZES),
                                                   config=make_config(stage, "fp32", "lightning_soaa.SOAA", params))
        _train(engine, rank, range(3))
        engine.save_checkpoint(os.path.join(ckpt_root, f"s{stage}"), tag="t3")
        if stage == 0:
            _train(engine, rank, range(3, 6))
            out["ds"] = [p.detach().clone() for p in engine.module.parameters()]
        del engine
    folder = os.path.join(ckpt_root, "s0", "t3")
    saved = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), weights_only=False)
    z2 = glob.glob(os.path.join(ckpt_root, "s2", "t3", f"zero_pp_rank_{rank}_*optim_states.pt"))[0]
    z2_state = torch.load(z2, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
    for key, sd in (("as_saved", saved["optimizer"]), ("zero2", z2_state), ("inner", None)):
        model = tiny_mlp(7, torch.float32, SIZES)
        model.load_state_dict(saved["module"])
        opt = SOAA(model.parameters(), **params)
        try:
            opt.load_state_dict(sd if sd is not None else saved["optimizer"]["lightning_soaa_deepspeed"]["inner"])
        except ValueError as exc:
            out[key] = str(exc)
            continue
        for s in range(3, 6):  # the engine averaged the ranks' gradients: each rank's batch, then the mean
            x, y = batch(s, rank, dtype=torch.float32)
            opt.zero_grad()
            loss = loss_fn(model, x, y)
            loss.backward()
            for p in model.parameters():
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(world)
            torch.distributed.all_reduce(loss)
            opt.step(loss=loss.detach() / world)
        out[key] = [p.detach().clone() for p in model.parameters()]
    return out


def w_leave_deepspeed_bf16(rank: int, world: int, ckpt_root: str) -> dict[str, Any]:
    """A bf16 run's state (SOAA, 3 steps) loaded into a plain SOAA without DeepSpeed: at ZeRO-0 the optimizer
    entry engine.save_checkpoint wrote is DeepSpeed's bf16 wrapper state around the client's; at ZeRO-1 the
    bf16_zero_pp file's entry wraps it too. Per stage: the refusal of the entry as saved, and at ZeRO-0 the
    load of the path that refusal names (the optimizer's steps then)."""
    ds_env(rank, world)
    import deepspeed_ext
    from lightning_soaa.optim.soaa import SOAA

    params = {"lr": 1e-2, "gamma": 0.1, "total_steps": 10}
    out: dict[str, Any] = {}
    for stage in (0, 1):
        engine, _, _, _ = deepspeed_ext.initialize(model=tiny_mlp(0, torch.float32, SIZES),
                                                   config=make_config(stage, "bf16", "lightning_soaa.SOAA", params))
        _train(engine, rank, range(3), "bf16")
        engine.save_checkpoint(os.path.join(ckpt_root, f"s{stage}"), tag="t3")
        del engine
        folder = os.path.join(ckpt_root, f"s{stage}", "t3")
        if stage == 0:
            entry = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), weights_only=False)["optimizer"]
        else:
            name = f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            entry = torch.load(os.path.join(folder, name), weights_only=False)["optimizer_state_dict"]
        opt = SOAA(tiny_mlp(7, torch.float32, SIZES).parameters(), **params)
        try:
            opt.load_state_dict(entry)
            out[stage] = "ok"
        except ValueError as exc:
            out[stage] = str(exc)
        if stage == 0:
            opt = SOAA(tiny_mlp(7, torch.float32, SIZES).parameters(), **params)
            opt.load_state_dict(entry["optimizer_state_dict"]["lightning_soaa_deepspeed"]["inner"])
            out["inner_steps"] = opt.num_steps
    return out


def allow_cpu_fp16() -> None:
    """DeepSpeed's CPU accelerator reports fp16 as supported only where oneDNN has fp16 kernels (not on every CI
    machine), and the engine then refuses fp16. Its fp16 path (loss scaler, overflow check, fp32 masters) is the
    same on every device, so the fp16 tests claim support in their ranks."""
    from deepspeed.accelerator import get_accelerator

    type(get_accelerator()).is_fp16_supported = lambda self: True


def _feature_engine(stage: int, opt_type: str, opt_params: dict[str, Any], seed: int, *, clip: float = 0.0,
                    fp16: bool = False, scheduler: dict[str, Any] | None = None) -> tuple[Any, Any, Any]:
    import deepspeed_ext

    cfg = make_config(stage, "fp32", opt_type, opt_params)
    cfg["gradient_clipping"] = clip
    if fp16:  # dynamic loss scale from 2^8: only the planted overflow skips (2^16 x a loss ~2 is inf in fp16)
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}
    if scheduler is not None:
        cfg["scheduler"] = scheduler
    model = tiny_mlp(seed, torch.float32, SIZES)
    engine, _, _, _ = deepspeed_ext.initialize(model=model, config=cfg)
    return engine, deepspeed_ext.find_client_optimizer(engine), model


def _feature_steps(engine: Any, client: Any, rank: int, steps: range, fp16: bool,
                   overflow_at: int | None, log: dict[str, list[Any]]) -> None:
    """One micro-batch per step; rank 0's inputs at step ``overflow_at`` scaled by 1e4 (its fp16 loss is inf)."""
    for s in steps:
        x, y = batch(s, rank, dtype=torch.float32)
        if s == overflow_at and rank == 0:
            x, y = x * 1e4, y * 1e4
        if fp16:
            x, y = x.half(), y.half()
        log["lrs"].append([g["lr"] for g in client.param_groups])  # what this step runs with
        engine.backward(loss_fn(engine, x, y))
        engine.step()
        log["skipped"].append(engine.skipped_steps)


def w_engine_features(rank: int, world: int, ckpt_root: str, jobs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per job: ``steps`` steps of one engine (gradient_clipping, fp16, a JSON scheduler as the job says), or, with
    ``resume={"at": k, **load_kwargs}``, k steps saved by one engine and loaded by a fresh one (other initial
    weights) with those kwargs, which trains steps k.. . Returns the fp32 parameters, lrs, skipped-step counts,
    the client's counters and statistics."""
    ds_env(rank, world)
    allow_cpu_fp16()
    out: dict[str, Any] = {}
    for name, job in jobs.items():
        job = dict(job)
        steps, overflow_at, resume = job.pop("steps"), job.pop("overflow_at", None), job.pop("resume", None)
        t0 = time.perf_counter()
        log: dict[str, list[Any]] = {"lrs": [], "skipped": []}
        engine, client, model = _feature_engine(seed=0, **job)
        start = 0
        if resume is not None:
            resume = dict(resume)
            start = resume.pop("at")
            _feature_steps(engine, client, rank, range(start), job.get("fp16", False), overflow_at, log)
            path = os.path.join(ckpt_root, name)
            engine.save_checkpoint(path, tag="t")
            del engine
            log = {"lrs": [], "skipped": []}
            engine, client, model = _feature_engine(seed=7, **job)
            engine.load_checkpoint(path, tag="t", **resume)
        _feature_steps(engine, client, rank, range(start, steps), job.get("fp16", False), overflow_at, log)
        params = list(model.parameters())
        out[name] = {"params": full_fp32_params(engine, job["stage"], client, params, params), **log,
                     "training_steps": client.training_steps, "stats": client.statistics(),
                     "seconds": time.perf_counter() - t0}
        del engine
    return out


class TokenModel(torch.nn.Module):
    """Each input also read as 6 token ids through an ``nn.Embedding`` named ``wte`` (GPT-2's name, without
    "emb"), and an output head ``head`` tied to the table or not (float32)."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.wte = torch.nn.Embedding(5, SIZES[0])
        self.net = tiny_mlp(0, torch.float32, SIZES)
        self.head = torch.nn.Linear(SIZES[0], 5, bias=False)
        with torch.no_grad():
            self.wte.weight.copy_(torch.randn(self.wte.weight.shape, generator=g))
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g))
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = ((2 * x).floor().clamp(-2, 2) + 2).long()  # 0..4
        return self.net(x + self.wte(tokens).mean(dim=1)) + self.head(x)[:, :SIZES[-1]]


def _token_reference(name: str, tied: bool, world: int, steps: int, params: dict[str, Any]) -> list[torch.Tensor]:
    """ASGO/DASGO over ``asgo_param_groups(model)`` in one process, each step's gradient the mean of every
    rank's (what data parallelism gives)."""
    from lightning_soaa.distributed.comm import LocalComm
    from lightning_soaa.optim.asgo_groups import asgo_param_groups
    from lightning_soaa.registry import get

    model = TokenModel(tied)
    opt = get(name).load()(asgo_param_groups(model), comm=LocalComm(), **params)
    for s in range(steps):
        opt.zero_grad()
        for r in range(world):
            x, y = batch(s, r, dtype=torch.float32)
            (loss_fn(model, x, y) / world).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def w_embedding_route(rank: int, world: int, jobs: list[tuple[str, int, bool, int]],
                      params: dict[str, Any]) -> dict[Any, Any]:
    """Per job (optimizer name, ZeRO stage, tied head, steps): the optimizer named in the JSON, given the
    model alone, after that many fp32 steps: the model's parameters (full fp32), the reference's
    (:func:`_token_reference`) and the inner optimizer's groups as ``(names, use_asgo)``."""
    import deepspeed_ext

    ds_env(rank, world)
    out: dict[Any, Any] = {}
    for name, stage, tied, steps in jobs:
        model = TokenModel(tied)
        cfg = make_config(stage, "fp32", f"lightning_soaa.{name}", params)
        engine, _, _, _ = deepspeed_ext.initialize(model=model, config=cfg)
        client = deepspeed_ext.find_client_optimizer(engine)
        order = [p for g in client._canonical_groups for p in g["params"]]  # stage 0: the model's, grouped
        _train(engine, rank, range(steps))
        out[(name, stage, tied, steps)] = {
            "params": full_fp32_params(engine, stage, client, list(model.parameters()), order),
            "reference": _token_reference(name, tied, world, steps, params),
            "inner_groups": [(g.get("param_names"), g.get("use_asgo")) for g in client.inner.param_groups],
            "names": [n for n, _ in model.named_parameters()]}
        del engine
    return out


def w_regrouped_checkpoint(rank: int, world: int, ckpt_root: str, stages: list[int]) -> dict[int, str]:
    """Per ZeRO stage: ASGO named in the JSON over ``named_parameters()`` as one group (what the routes gave a
    model alone before 2026-12-04), 2 steps, saved; then the model alone (the table named ``wte`` in a group of
    its own) loads it. Returns each stage's error (type: message), or "loaded"."""
    import deepspeed_ext

    ds_env(rank, world)
    out: dict[int, str] = {}
    for stage in stages:
        cfg = make_config(stage, "fp32", "lightning_soaa.ASGO", {"lr": 2e-2})
        model = TokenModel(False)
        engine, _, _, _ = deepspeed_ext.initialize(model=model, config=cfg, model_parameters=model.named_parameters())
        _train(engine, rank, range(2))
        engine.save_checkpoint(f"{ckpt_root}/z{stage}", tag="old")
        del engine
        model = TokenModel(False)
        engine, _, _, _ = deepspeed_ext.initialize(model=model, config=cfg)
        try:
            engine.load_checkpoint(f"{ckpt_root}/z{stage}", tag="old")
            out[stage] = "loaded"
        except Exception as e:  # noqa: BLE001 - the message is the result
            out[stage] = f"{type(e).__name__}: {e}"
        del engine
    return out


def w_node_local_refusal(rank: int, world: int, ckpt_root: str) -> str:
    """A ZeRO-0 checkpoint loaded by a ZeRO-2 engine where rank 1 cannot see rank 0's files (node-local
    storage: its copy of the folder lacks them): the error each rank raises, or "ok"."""
    import shutil

    ds_env(rank, world)
    import deepspeed_ext

    def engine_at(stage: int) -> Any:
        cfg = make_config(stage, "fp32", "lightning_soaa.AdamW", {"lr": 1e-2})
        engine, _, _, _ = deepspeed_ext.initialize(model=tiny_mlp(0, torch.float32, SIZES), config=cfg)
        return engine

    engine = engine_at(0)
    _train(engine, rank, range(1))
    saved = os.path.join(ckpt_root, "s0")
    engine.save_checkpoint(saved, tag="t1")
    del engine
    torch.distributed.barrier()
    where = saved
    if rank == 1:  # this node's copy: the files rank 0 wrote are on rank 0's node only
        where = os.path.join(ckpt_root, "node1")
        shutil.copytree(saved, where)
        for f in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            path = os.path.join(where, "t1", f)
            if os.path.exists(path):
                os.remove(path)
    engine = engine_at(2)
    try:
        engine.load_checkpoint(where)
        return "ok"
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return f"{type(exc).__name__}: {exc}"


def w_latest_after_a_failed_save(rank: int, world: int, ckpt_root: str) -> tuple[str, str]:
    """ZeRO-2 at W = 2: save tag t1, train, save tag t2 while rank 1's optimizer file cannot be written (as
    when that rank is killed mid-write). Returns (this rank's outcome, what ``latest`` names afterwards)."""
    ds_env(rank, world)
    import deepspeed_ext

    cfg = make_config(2, "fp32", "lightning_soaa.SOAA", {"lr": 1e-2})
    engine, _, _, _ = deepspeed_ext.initialize(model=tiny_mlp(0, torch.float32, SIZES), config=cfg)
    _train(engine, rank, range(1))
    engine.save_checkpoint(ckpt_root, tag="t1")
    _train(engine, rank, range(1, 2))
    if rank == 1:
        real_save = engine.checkpoint_engine.save

        def failing_save(state: Any, path: str, *args: Any, **kwargs: Any) -> Any:
            if "optim_states" in str(path):
                raise OSError(f"disk gone while writing {path}")
            return real_save(state, path, *args, **kwargs)

        engine.checkpoint_engine.save = failing_save
    try:
        engine.save_checkpoint(ckpt_root, tag="t2")
        outcome = "saved"
    except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
        outcome = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(ckpt_root, "latest")) as fd:
        return outcome, fd.read()


def w_mixed_saves_refused(rank: int, world: int, ckpt_root: str) -> str:
    """ZeRO-2 at W = 2: tag t saved at step 1 and again at step 3 into the same folder, where rank 1 stopped
    before it rewrote its optimizer file (its file is the step-1 one, copied back in). Loading it (the tag
    that ``latest`` names): the error each rank raises, or "loaded"."""
    import shutil

    ds_env(rank, world)
    import deepspeed_ext

    cfg = make_config(2, "fp32", "lightning_soaa.SOAA", {"lr": 1e-2})
    engine, _, _, _ = deepspeed_ext.initialize(model=tiny_mlp(0, torch.float32, SIZES), config=cfg)
    first, second = os.path.join(ckpt_root, "first"), os.path.join(ckpt_root, "second")
    _train(engine, rank, range(1))
    engine.save_checkpoint(first, "t")  # positional tag, as DeepSpeed's signature allows
    _train(engine, rank, range(1, 3))
    engine.save_checkpoint(second, tag="t")
    if rank == 0:
        name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        shutil.copyfile(os.path.join(first, "t", name), os.path.join(second, "t", name))
    dist.barrier()
    try:
        engine.load_checkpoint(second)
        return "loaded"
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        return f"{type(exc).__name__}: {exc}"


def _own_optim_file(engine: Any, folder: str) -> str:
    dp_rank = dist.get_rank(group=engine.optimizer.dp_process_group)
    return os.path.join(folder, f"zero_pp_rank_{dp_rank}_mp_rank_00_optim_states.pt")


def _live_state(engine: Any, client: Any) -> dict[str, Any]:
    """What a refused load must leave as it was: the module, DeepSpeed's fp32 partitions, the client's state
    and the step counts (ZeRO-1/2)."""
    import copy

    return {"module": [p.detach().clone() for p in engine.module.parameters()],
            "fp32": [t.detach().clone() for t in engine.optimizer.single_partition_of_fp32_groups],
            "client": copy.deepcopy(client.state_dict()), "steps": (engine.global_steps, client.training_steps)}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _refused_load(engine: Any, client: Any, rank: int, load_dir: str) -> dict[str, Any]:
    """Load ``load_dir`` (the tag ``latest`` names) into the live engine, expecting a refusal: the error this
    rank raised, whether the live state was left as it was, then one more training step on every rank (a
    rank that went on into DeepSpeed's load alone would hang here or in the load: the test's timeout)."""
    before = _live_state(engine, client)
    try:
        engine.load_checkpoint(load_dir)
        said = "loaded"
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        said = f"{type(exc).__name__}: {exc}"
    unchanged = _same(before, _live_state(engine, client))
    _train(engine, rank, range(20, 21))
    return {"said": said, "unchanged": unchanged}


def _as_an_older_save_wrote_it(path: str) -> None:
    """Rewrite a ZeRO optimizer file as a save before 2026-12-05 wrote it (no global step of its save) and in
    torch's legacy serialization (not a zip archive, which torch.load cannot mmap): readable, not damaged."""
    from deepspeed_ext.client import STATE_KEY

    state = torch.load(path, map_location="cpu", weights_only=False)
    outer = state["optimizer_state_dict"]
    outer.get("base_optimizer_state", outer.get("optimizer_state_dict"))[STATE_KEY].pop("global_steps", None)
    torch.save(state, path, _use_new_zipfile_serialization=False)


def w_unreadable_optimizer_file(rank: int, world: int, ckpt_root: str) -> dict[str, Any]:
    """ZeRO-2 at W = 2, SOAA, tag t saved into one folder twice. First every rank's optimizer file rewritten
    as an older save wrote it (legacy serialization, no global step): the load must pass. Then t saved again
    and rank 1's optimizer file cut to half its size (that rank killed while it wrote it; ``latest`` still
    names t): the load must be refused on every rank, leaving the live engine as it was."""
    ds_env(rank, world)
    import deepspeed_ext

    cfg = make_config(2, "fp32", "lightning_soaa.SOAA", {"lr": 1e-2})
    engine, _, _, _ = deepspeed_ext.initialize(model=tiny_mlp(0, torch.float32, SIZES), config=cfg)
    client = deepspeed_ext.find_client_optimizer(engine.optimizer)
    path = _own_optim_file(engine, os.path.join(ckpt_root, "t"))
    _train(engine, rank, range(1))
    engine.save_checkpoint(ckpt_root, tag="t")
    _as_an_older_save_wrote_it(path)
    dist.barrier()
    _train(engine, rank, range(1, 3))
    out: dict[str, Any] = {}
    try:
        engine.load_checkpoint(ckpt_root)
        out["older"] = ("loaded", engine.global_steps, client.training_steps)
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        out["older"] = (f"{type(exc).__name__}: {exc}",)
    _train(engine, rank, range(3, 5))
    engine.save_checkpoint(ckpt_root, tag="t")
    if rank == 1:
        os.truncate(path, os.path.getsize(path) // 2)
    dist.barrier()
    _train(engine, rank, range(5, 6))
    out["truncated"] = _refused_load(engine, client, rank, ckpt_root)
    return out


def w_torn_save(rank: int, world: int, ckpt_root: str) -> dict[str, Any]:
    """ZeRO-2 at W = 2, SOAA: tag t saved at global step 1, then again at step 3 into the same folder, torn
    between the model-states file and the optimizer files. "model ahead": every rank's optimizer-file write
    fails (the job killed after rank 0 wrote the model states, before any optimizer file): model at step 3,
    optimizer files at step 1. "optimizer ahead": the save completes, then the first save's model-states
    file is back in the folder: model at step 1, optimizer files at step 3. Each loaded into the live
    engine: what each rank raised, whether the engine was left as it was."""
    import shutil

    ds_env(rank, world)
    import deepspeed_ext

    cfg = make_config(2, "fp32", "lightning_soaa.SOAA", {"lr": 1e-2})
    engine, _, _, _ = deepspeed_ext.initialize(model=tiny_mlp(0, torch.float32, SIZES), config=cfg)
    client = deepspeed_ext.find_client_optimizer(engine.optimizer)
    out: dict[str, Any] = {}
    for case in ("model ahead", "optimizer ahead"):
        where = os.path.join(ckpt_root, case.replace(" ", "_"))
        model_file = os.path.join(where, "t", "mp_rank_00_model_states.pt")
        start = engine.global_steps
        _train(engine, rank, range(start, start + 1))
        engine.save_checkpoint(where, tag="t")
        if rank == 0:
            shutil.copyfile(model_file, model_file + ".first")
        _train(engine, rank, range(start + 1, start + 3))
        real_save = engine.checkpoint_engine.save
        if case == "model ahead":
            def killed(*args: Any, **kwargs: Any) -> Any:  # DeepSpeed passes the path by name or position
                path = str(kwargs.get("path", args[1] if len(args) > 1 else ""))
                if "optim_states" in path:
                    raise OSError(f"killed before writing {path}")
                return real_save(*args, **kwargs)

            engine.checkpoint_engine.save = killed
        try:
            engine.save_checkpoint(where, tag="t")
        except OSError:
            pass
        finally:
            engine.checkpoint_engine.save = real_save
        if rank == 0 and case == "optimizer ahead":
            shutil.copyfile(model_file + ".first", model_file)
        dist.barrier()
        out[case] = _refused_load(engine, client, rank, where)
    return out


def w_client_state_global_steps(rank: int, world: int, ckpt_root: str) -> dict[str, Any]:
    """ZeRO-2 at W = 2, AdamW: 3 steps saved with ``client_state={"global_steps": 12}`` (a run's own counter,
    e.g. of micro-batches, under DeepSpeed's key: DeepSpeed writes it over its own), loaded by a fresh
    engine. Returns what the load said and the engine's and the client's steps after it."""
    ds_env(rank, world)
    import deepspeed_ext

    cfg = make_config(2, "fp32", "lightning_soaa.AdamW", {"lr": 1e-2})
    engine, _, _, _ = deepspeed_ext.initialize(model=tiny_mlp(0, torch.float32, SIZES), config=cfg)
    _train(engine, rank, range(3))
    engine.save_checkpoint(ckpt_root, tag="t", client_state={"global_steps": 12})
    del engine
    engine, _, _, _ = deepspeed_ext.initialize(model=tiny_mlp(7, torch.float32, SIZES), config=cfg)
    client = deepspeed_ext.find_client_optimizer(engine)
    try:
        engine.load_checkpoint(ckpt_root)
        said = "loaded"
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        said = f"{type(exc).__name__}: {exc}"
    return {"said": said, "steps": (engine.global_steps, client.training_steps)}


def w_zero3_saved_on_fewer_ranks(rank: int, world: int, ckpt_root: str) -> dict[str, Any]:
    """ZeRO-3, SOAA: at W = 2 save 2 steps (tag t), at W = 3 load it. Returns what the load said."""
    ds_env(rank, world)
    import deepspeed_ext

    cfg = make_config(3, "fp32", "lightning_soaa.SOAA", {"lr": 1e-2})
    cfg["train_micro_batch_size_per_gpu"] = 12 // world
    engine, _, _, _ = deepspeed_ext.initialize(model=tiny_mlp(0, torch.float32, SIZES), config=cfg)
    if world == 2:
        _train(engine, rank, range(2))
        engine.save_checkpoint(ckpt_root, tag="t")
        return {"said": "saved"}
    before = _zero3_partitions(engine)  # the module's own parameters are empty at ZeRO-3
    try:
        engine.load_checkpoint(ckpt_root, tag="t")
        said = "loaded"
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        said = f"{type(exc).__name__}: {exc}"
    return {"said": said, "unchanged": engine.global_steps == 0 and _same_partitions(before, engine)}


def _zero3_partitions(engine: Any) -> list[torch.Tensor]:
    """Copies of this rank's ZeRO-3 partitions of the module's parameters (``ds_tensor``; no collective)."""
    return [p.ds_tensor.detach().clone() for p in engine.module.parameters()]


def _same_partitions(before: list[torch.Tensor], engine: Any) -> bool:
    """Whether no byte of this rank's ZeRO-3 partitions changed since :func:`_zero3_partitions` took ``before``.
    Bytes, not values: the last data-parallel rank's partitions end in padding that DeepSpeed allocates with
    ``torch.empty`` and never writes, and garbage there that reads as NaN made ``torch.equal`` (NaN != NaN)
    say "changed" with nothing written (a flaky CI failure, on the highest rank only)."""
    now = [p.ds_tensor.detach() for p in engine.module.parameters()]
    return len(now) == len(before) and all(
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.contiguous().view(torch.uint8))
        for a, b in zip(before, now))


# ---------------------------------------------------------------------- the optimizer switched between save and load
FOREIGN = ("AdamW", {"lr": 1e-3, "torch_adam": True})  # DeepSpeed's own AdamW: torch.optim.AdamW


def _switch_engine(stage: int, opt: tuple[str, dict[str, Any]], seed: int, *, precision: str = "fp32",
                   raw: bool = False) -> tuple[Any, torch.nn.Module]:
    """An engine over ``tiny_mlp(seed)`` (two param groups, or the model alone for EGN) running ``opt``: (type,
    params). ``raw``: built by ``deepspeed.initialize`` itself, with nothing of ours around it."""
    import deepspeed

    import deepspeed_ext

    opt_type, params = opt
    cfg = make_config(stage, "bf16" if precision == "bf16" else "fp32", opt_type, params)
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}
    model = tiny_mlp(seed, torch.float32, SIZES)
    groups = None if opt_type == "lightning_soaa.EGN" else split_groups(model)
    if raw:
        engine = deepspeed.initialize(model=model, config=cfg, model_parameters=groups)[0]
    else:
        engine = deepspeed_ext.initialize(model=model, config=cfg, model_parameters=groups)[0]
    return engine, model


def _switch_train(engine: Any, rank: int, steps: range, precision: str = "fp32") -> None:
    import deepspeed_ext

    client = deepspeed_ext.find_client_optimizer(engine)
    for s in steps:
        x, y = batch(s, rank, dtype=torch.float32)
        if client is not None and hasattr(client, "set_batch"):  # EGN
            client.set_batch(x, y)
        if precision != "fp32":
            dt = torch.bfloat16 if precision == "bf16" else torch.float16
            x, y = x.to(dt), y.to(dt)
        engine.backward(loss_fn(engine, x, y))
        engine.step()


def _base_optimizer(engine: Any) -> Any:
    opt = engine.optimizer
    while hasattr(opt, "optimizer"):  # DeepSpeed's ZeRO / fp16 wrappers
        opt = opt.optimizer
    return opt


def _foreign_snapshot(engine: Any, model: torch.nn.Module) -> dict[str, Any]:
    """What a refused load must leave as it was on the engine of DeepSpeed's own AdamW."""
    base = _base_optimizer(engine)
    return {"module": [p.detach().clone() for p in model.parameters()],
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups],
            "state": len(base.state), "steps": engine.global_steps}


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def w_switch_to_foreign(rank: int, world: int, ckpt_root: str,
                        cases: list[tuple[int, str, dict[str, Any]]]) -> dict[Any, Any]:
    """Per (stage, our optimizer type, its params): 3 steps of ours, saved; an engine of DeepSpeed's own AdamW (built
    by deepspeed_ext.initialize, other initial weights) loads it. Returns what each rank's load raised (or what it
    loaded), whether the engine was left as it was, and whether the module-only load then took the saved weights;
    every rank trains one more step after each (a rank that went on alone would hang the test)."""
    ds_env(rank, world)
    out: dict[Any, Any] = {}
    for i, (stage, opt_type, params) in enumerate(cases):
        path = os.path.join(ckpt_root, f"c{i}")
        engine, model = _switch_engine(stage, (opt_type, params), 0)
        _switch_train(engine, rank, range(3))
        engine.save_checkpoint(path, tag="t3")
        saved = [p.detach().clone() for p in model.parameters()]
        del engine
        engine, model = _switch_engine(stage, FOREIGN, 7)
        before = _foreign_snapshot(engine, model)
        try:
            engine.load_checkpoint(path, tag="t3")
            base = _base_optimizer(engine)
            said = f"loaded: group 0 lr={base.param_groups[0]['lr']} betas={base.param_groups[0]['betas']}"
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            said = _error(exc)
        unchanged = _same(before, _foreign_snapshot(engine, model))
        _switch_train(engine, rank, range(3, 4))
        engine.load_checkpoint(path, tag="t3", load_optimizer_states=False, load_lr_scheduler_states=False)
        module_only = all(torch.equal(a, b) for a, b in zip(saved, model.parameters()))
        _switch_train(engine, rank, range(4, 5))
        out[(stage, opt_type)] = {"said": said, "unchanged": unchanged, "module_only": module_only}
        del engine
    return out


def w_switch_between_ours(rank: int, world: int, ckpt_root: str, stages: list[int]) -> dict[Any, Any]:
    """SOAA saved (3 steps) at each stage, loaded by an ASGO engine of the same stage and world size: what the
    engine's load raised; at ZeRO-2 also what the ASGO client's own load_state_dict raised when handed this
    rank's SOAA state (the order of the client's checks, apart from the engine's). "foreign": DeepSpeed's own
    AdamW saved at ZeRO-2, loaded by a SOAA engine: what it raised and whether its module was left as it was."""
    ds_env(rank, world)
    import deepspeed_ext

    out: dict[Any, Any] = {}
    path = os.path.join(ckpt_root, "foreign")
    engine, _ = _switch_engine(2, FOREIGN, 0)
    _switch_train(engine, rank, range(3))
    engine.save_checkpoint(path, tag="t3")
    del engine
    engine, model = _switch_engine(2, ("lightning_soaa.SOAA", {"lr": 1e-2, "total_steps": 10}), 7)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        engine.load_checkpoint(path, tag="t3")
        out["foreign"] = ("loaded", False)
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        out["foreign"] = (_error(exc), all(torch.equal(a, b) for a, b in zip(before, model.parameters())))
    del engine
    for stage in stages:
        path = os.path.join(ckpt_root, f"s{stage}")
        engine, _ = _switch_engine(stage, ("lightning_soaa.SOAA", {"lr": 1e-2, "total_steps": 10}), 0)
        _switch_train(engine, rank, range(3))
        engine.save_checkpoint(path, tag="t3")
        del engine
        engine, _ = _switch_engine(stage, ("lightning_soaa.ASGO", {"lr": 1e-2}), 7)
        try:
            engine.load_checkpoint(path, tag="t3")
            out[stage] = "loaded"
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            out[stage] = _error(exc)
        if stage == 2:
            state = torch.load(_own_optim_file(engine, os.path.join(path, "t3")), weights_only=False)
            try:
                deepspeed_ext.find_client_optimizer(engine).load_state_dict(
                    state["optimizer_state_dict"]["base_optimizer_state"])
                out["client"] = "loaded"
            except Exception as exc:  # noqa: BLE001 - the message is what the test checks
                out["client"] = _error(exc)
        del engine
    return out


def _fp32_of(engine: Any, stage: int, model: torch.nn.Module) -> list[torch.Tensor]:
    import deepspeed_ext

    client = deepspeed_ext.find_client_optimizer(engine)
    if not hasattr(client, "_canonical_groups"):  # EGN: ZeRO-0, fp32, the module's own parameters
        return [p.detach().clone() for p in model.parameters()]
    order = [p for g in split_groups(model) for p in g["params"]]
    return full_fp32_params(engine, stage, client, list(model.parameters()), order)


def w_wrappers_round_trip(rank: int, world: int, ckpt_root: str, cases: list[tuple[int, str]]) -> dict[Any, Any]:
    """Per (stage, precision) -- each of DeepSpeed's optimizer wrappers around our client: SOAA 2 steps, saved, 2
    more (the uninterrupted run); a fresh SOAA engine (other weights) loads it and takes the same 2 steps; then an
    engine of DeepSpeed's own AdamW built by deepspeed.initialize itself (nothing of ours around it) loads it.
    Returns both runs' fp32 parameters and what the foreign load did."""
    ds_env(rank, world)
    allow_cpu_fp16()
    soaa = ("lightning_soaa.SOAA", {"lr": 1e-2, "weight_decay": 0.1, "total_steps": 10})
    out: dict[Any, Any] = {}
    for stage, precision in cases:
        path = os.path.join(ckpt_root, f"{precision}{stage}")
        runs = []
        for seed in (0, 7):
            engine, model = _switch_engine(stage, soaa, seed, precision=precision)
            if seed == 0:
                _switch_train(engine, rank, range(2), precision)
                engine.save_checkpoint(path, tag="t2")
            else:
                engine.load_checkpoint(path, tag="t2")
            _switch_train(engine, rank, range(2, 4), precision)
            runs.append(_fp32_of(engine, stage, model))
            del engine
        engine, _ = _switch_engine(stage, FOREIGN, 7, precision=precision, raw=True)
        try:
            engine.load_checkpoint(path, tag="t2")
            said = f"loaded: group 0 lr={_base_optimizer(engine).param_groups[0]['lr']}"
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            said = _error(exc)
        out[(stage, precision)] = {"runs": runs, "foreign": said}
        del engine
    return out


def _as_the_previous_version_wrote_it(folder: str) -> int:
    """Rewrite every file of a checkpoint folder holding our client's state as the code before 2026-12-05 wrote it:
    no marker param group after the real ones. Returns how many marker groups were dropped."""
    from deepspeed_ext.client import SAVED_BY_KEY

    def strip(sd: Any, depth: int = 0) -> int:
        if not isinstance(sd, dict) or depth > 3:
            return 0
        groups = sd.get("param_groups")
        if isinstance(groups, list) and groups and isinstance(groups[-1], dict) and SAVED_BY_KEY in groups[-1]:
            groups.pop()
            return 1
        return sum(strip(sd.get(k), depth + 1) for k in ("optimizer", "optimizer_state_dict", "base_optimizer_state"))

    dropped = 0
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        state = torch.load(path, map_location="cpu", weights_only=False)
        n = strip(state)
        if n:
            torch.save(state, path)
        dropped += n
    return dropped


def w_previous_version_resumes(rank: int, world: int, ckpt_root: str,
                               cases: list[tuple[int, str, dict[str, Any]]]) -> dict[Any, Any]:
    """Per (stage, our optimizer type, its params): 2 steps, saved, 2 more (the uninterrupted run); a fresh engine
    (other weights) loads the checkpoint and takes the same 2 steps; then rank 0 rewrites the checkpoint as the
    previous version of deepspeed_ext wrote it and another fresh engine does the same. Returns the marker groups
    dropped, and the three runs' fp32 parameters."""
    ds_env(rank, world)
    out: dict[Any, Any] = {}
    for stage, opt_type, params in cases:
        path = os.path.join(ckpt_root, f"s{stage}{opt_type}")
        engine, model = _switch_engine(stage, (opt_type, params), 0)
        _switch_train(engine, rank, range(2))
        engine.save_checkpoint(path, tag="t2")
        _switch_train(engine, rank, range(2, 4))
        runs = [_fp32_of(engine, stage, model)]
        del engine
        dropped = None
        for previous in (False, True):
            if previous and rank == 0:
                dropped = _as_the_previous_version_wrote_it(os.path.join(path, "t2"))
            dist.barrier()
            engine, model = _switch_engine(stage, (opt_type, params), 7)
            engine.load_checkpoint(path, tag="t2")
            _switch_train(engine, rank, range(2, 4))
            runs.append(_fp32_of(engine, stage, model))
            del engine
        out[(stage, opt_type)] = {"dropped": dropped, "runs": runs}
    return out


def w_tag_saved_again(rank: int, world: int, ckpt_root: str) -> dict[Any, Any]:
    """One folder and tag saved by two runs (Lightning's last.ckpt: tag "checkpoint" every time), the second of
    another precision or stage, whose files leave some of the first's in place. Per (first, second): the second
    optimizer resumes its own state (what DeepSpeed loads); ("switch", ...): an engine of the first optimizer and
    the second's precision loads it, which is a switch. Returns what each load did."""
    ds_env(rank, world)
    soaa = ("lightning_soaa.SOAA", {"lr": 1e-2, "total_steps": 10})
    runs = {"SOAA fp32 ZeRO-2, then AdamW bf16": ((2, soaa, "fp32"), (2, FOREIGN, "bf16")),
            "AdamW fp32 ZeRO-2, then SOAA bf16": ((2, FOREIGN, "fp32"), (2, soaa, "bf16")),
            "SOAA ZeRO-0, then AdamW ZeRO-3": ((0, soaa, "fp32"), (3, FOREIGN, "fp32"))}
    out: dict[Any, Any] = {}
    for i, (name, saves) in enumerate(runs.items()):
        path = os.path.join(ckpt_root, f"again{i}")
        for stage, opt, precision in saves:
            engine, _ = _switch_engine(stage, opt, 0, precision=precision)
            _switch_train(engine, rank, range(2), precision)
            engine.save_checkpoint(path, tag="checkpoint")
            del engine
        (_, first, _), (stage, second, precision) = saves
        for key, opt in ((name, second), (("switch", name), first)):
            engine, _ = _switch_engine(stage, opt, 7, precision=precision)
            try:
                engine.load_checkpoint(path, tag="checkpoint")
                out[key] = "loaded"
            except Exception as exc:  # noqa: BLE001 - the message is what the test checks
                out[key] = _error(exc)
            _switch_train(engine, rank, range(2, 3), precision)
            del engine
    return out


def w_own_tag_saved_again(rank: int, world: int, ckpt_root: str) -> dict[str, str]:
    """SOAA's own runs saving one folder and tag twice, the second of another stage or precision and group count:
    (ZeRO-2, then ZeRO-3) and (fp32 with two param groups, then bf16 with one). The second run's resume must
    load: its files are complete, the first's stale ones beside them are not what DeepSpeed loads."""
    ds_env(rank, world)
    import deepspeed_ext

    runs = {"ZeRO-2, then ZeRO-3": ((2, "fp32", True), (3, "fp32", True)),
            "fp32 two groups, then bf16 one group": ((2, "fp32", True), (2, "bf16", False))}
    out: dict[str, str] = {}
    for i, (name, saves) in enumerate(runs.items()):
        path = os.path.join(ckpt_root, f"own{i}")
        for j, (stage, precision, groups) in enumerate((*saves, saves[-1])):
            cfg = make_config(stage, precision, "lightning_soaa.SOAA", {"lr": 1e-2, "total_steps": 10})
            model = tiny_mlp(j, torch.float32, SIZES)
            engine = deepspeed_ext.initialize(model=model, config=cfg,
                                              model_parameters=split_groups(model) if groups else None)[0]
            if j < len(saves):
                _switch_train(engine, rank, range(2), precision)
                engine.save_checkpoint(path, tag="checkpoint")
                continue
            try:
                engine.load_checkpoint(path, tag="checkpoint")
                out[name] = "loaded"
            except Exception as exc:  # noqa: BLE001 - the message is what the test checks
                out[name] = f"{type(exc).__name__}: {exc}"
    return out


def w_zero3_other_dp_size(rank: int, world: int, ckpt_root: str, mode: str) -> dict[str, Any]:
    """ZeRO-3, SOAA. ``mode`` "save": save 2 steps (tag t); "load": load it; "node-local": load it where rank 1
    reads its own copy of the folder, which lacks every file (a replaced node's local storage). Returns what the
    load said and whether the engine's steps and this rank's partitions stayed as they were."""
    ds_env(rank, world)
    import deepspeed_ext

    cfg = make_config(3, "fp32", "lightning_soaa.SOAA", {"lr": 1e-2})
    cfg["train_micro_batch_size_per_gpu"] = 12 // world
    engine, _, _, _ = deepspeed_ext.initialize(model=tiny_mlp(0, torch.float32, SIZES), config=cfg)
    if mode == "save":
        _train(engine, rank, range(2))
        engine.save_checkpoint(ckpt_root, tag="t")
        return {"said": "saved"}
    where = ckpt_root
    if mode == "node-local" and rank == 1:
        where = os.path.join(os.path.dirname(ckpt_root), "node1")
        os.makedirs(os.path.join(where, "t"), exist_ok=True)
    before = _zero3_partitions(engine)
    try:
        engine.load_checkpoint(where, tag="t")
        said = "loaded"
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        said = f"{type(exc).__name__}: {exc}"
    return {"said": said, "unchanged": engine.global_steps == 0 and _same_partitions(before, engine)}


# -------------------------------------------------------------- weights-only ZeRO-3 loads, the tag 'latest' names
def _zero3_soaa(world: int, seed: int) -> Any:
    import deepspeed_ext

    cfg = make_config(3, "fp32", "lightning_soaa.SOAA", {"lr": 1e-2})
    cfg["train_micro_batch_size_per_gpu"] = 12 // world
    return deepspeed_ext.initialize(model=tiny_mlp(seed, torch.float32, SIZES), config=cfg)[0]


def _zero3_full(engine: Any) -> list[torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p).detach().clone() for p in engine.module.parameters()]


WEIGHTS_ONLY = {"module-only": {"load_module_only": True},
                "no optimizer states": {"load_optimizer_states": False, "load_lr_scheduler_states": False}}


def w_zero3_weights_only(rank: int, world: int, ckpt_root: str, mode: str) -> Any:
    """ZeRO-3, SOAA. "save" (W = 2): tag t after 2 steps, tag u after 3 (``latest`` names u); returns t's full fp32
    weights. "load": per way of loading the weights only (:data:`WEIGHTS_ONLY`), a fresh engine of other initial
    weights loads tag t: what it said, whether this rank's partitions stayed as they were, and (W = 2) the full
    fp32 weights after."""
    ds_env(rank, world)
    if mode == "save":
        engine = _zero3_soaa(world, 0)
        _train(engine, rank, range(2))
        engine.save_checkpoint(ckpt_root, tag="t")
        weights = _zero3_full(engine)
        _train(engine, rank, range(2, 3))
        engine.save_checkpoint(ckpt_root, tag="u")
        return weights
    return _weights_only_loads(lambda: _zero3_soaa(world, 7), ckpt_root,
                               lambda engine: _zero3_full(engine) if world == 2 else None)


def _weights_only_loads(make: Callable[[], Any], ckpt_root: str,
                        weights: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """Each way of WEIGHTS_ONLY on a fresh engine from ``make``: what the load said, whether this rank's
    partitions stayed as they were, the engine's step count (and ``weights(engine)`` where given)."""
    out: dict[str, Any] = {}
    for name, kwargs in WEIGHTS_ONLY.items():
        engine = make()
        before = _zero3_partitions(engine)
        try:
            engine.load_checkpoint(ckpt_root, tag="t", **kwargs)
            said = "loaded"
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            said = f"{type(exc).__name__}: {exc}"
        out[name] = {"said": said, "unchanged": _same_partitions(before, engine), "steps": engine.global_steps}
        if weights is not None:
            out[name]["weights"] = weights(engine)
        del engine
    return out


def w_latest_on_rank_0s_node_only(rank: int, world: int, ckpt_root: str) -> dict[str, Any]:
    """ZeRO-2, SOAA, node-local storage: tags t0 (1 step) and t1 (2 steps) saved, each rank's node with its own copy
    of the folder; ``latest`` (t1) is on rank 0's node only (DeepSpeed writes it on global rank 0). Loads with
    tag=None into a fresh engine (other weights): "missing" (rank 1's copy has no ``latest``) and "other" (rank 1's
    copy's ``latest`` names t0). Returns per case what the load said, the engine's global step and its full fp32
    weights, and t1's weights."""
    import shutil

    ds_env(rank, world)
    cfg = make_config(2, "fp32", "lightning_soaa.SOAA", {"lr": 1e-2, "total_steps": 10})

    def engine_of(seed: int) -> Any:
        import deepspeed_ext

        return deepspeed_ext.initialize(model=tiny_mlp(seed, torch.float32, SIZES), config=cfg)[0]

    def full(engine: Any) -> list[torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        return [safe_get_full_fp32_param(p).detach().clone() for p in engine.module.parameters()]

    shared = os.path.join(ckpt_root, "shared")
    engine = engine_of(0)
    _train(engine, rank, range(1))
    engine.save_checkpoint(shared, tag="t0")
    _train(engine, rank, range(1, 2))
    engine.save_checkpoint(shared, tag="t1")
    out: dict[str, Any] = {"saved": full(engine)}
    del engine
    for case, latest in (("missing", None), ("other", "t0")):
        where = os.path.join(ckpt_root, f"node{rank}_{case}")
        if rank == 0:
            shutil.copytree(shared, where)
        else:  # this node's copy: every file but rank 0's node's ``latest``
            shutil.copytree(shared, where, ignore=shutil.ignore_patterns("latest"))
            if latest is not None:
                with open(os.path.join(where, "latest"), "w") as fh:
                    fh.write(latest)
        torch.distributed.barrier()
        engine = engine_of(7)
        try:
            engine.load_checkpoint(where)
            said = "loaded"
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            said = f"{type(exc).__name__}: {exc}"
        out[case] = {"said": said, "steps": engine.global_steps, "weights": full(engine)}
        del engine
    return out


def w_zero3_frozen_weights_only(rank: int, world: int, ckpt_root: str, mode: str) -> Any:
    """ZeRO-3, SOAA, the first layer frozen. "save" (W = 2): tag t after 2 steps. "load" (W = 1): per way of loading
    the weights only (:data:`WEIGHTS_ONLY`), a fresh engine loads t: what it said, whether its weights and fp32
    masters stayed as they were, and its global step."""
    import deepspeed_ext

    ds_env(rank, world)
    cfg = make_config(3, "fp32", "lightning_soaa.SOAA", {"lr": 1e-2})
    cfg["train_micro_batch_size_per_gpu"] = 12 // world

    def engine_of(seed: int) -> Any:
        model = tiny_mlp(seed, torch.float32, SIZES)
        for p in list(model.parameters())[:2]:
            p.requires_grad_(False)
        return deepspeed_ext.initialize(model=model, config=cfg)[0]

    if mode == "save":
        engine = engine_of(0)
        _train(engine, rank, range(2))
        engine.save_checkpoint(ckpt_root, tag="t")
        return None
    return _weights_only_loads(lambda: engine_of(7), ckpt_root)


def _autocast_steps(engine: Any, rank: int, steps: range, log: list[float]) -> None:
    """ZeRO-0 torch_autocast float16 steps: rank 0's batch at step 2 scaled by 1e4 (DeepSpeed's GradScaler finds
    an inf and skips the step, halving its scale to 32768), every rank's at step 3 by 2 (its gradients overflow
    at the initial scale 65536, not at 32768). Logs the scale after each step."""
    for s in steps:
        x, y = batch(s, rank, dtype=torch.float32)
        factor = 1e4 if s == 2 and rank == 0 else 2.0 if s == 3 else 1.0
        engine.backward(loss_fn(engine, x * factor, y * factor))
        engine.step()
        log.append(float(engine.torch_autocast_z0_gradscaler.get_scale()))


def w_autocast_scaler_resume(rank: int, world: int, ckpt_root: str, steps: int, save_after: int) -> dict[str, Any]:
    """SOAA at ZeRO-0 with ``torch_autocast`` float16: ``steps`` steps of one engine, and the same run saved after
    step ``save_after`` and resumed by a fresh engine (other initial weights). Returns both runs' fp32 parameters
    and scales, the scale right after the load and the client_state the load handed back."""
    import deepspeed_ext

    ds_env(rank, world)
    params = {"lr": 1e-2, "weight_decay": 0.1, "gamma": 0.1, "total_steps": 10}

    def engine_of(seed: int) -> tuple[Any, torch.nn.Module]:
        cfg = make_config(0, "fp32", "lightning_soaa.SOAA", params)
        cfg["torch_autocast"] = {"enabled": True, "dtype": "float16"}
        model = tiny_mlp(seed, torch.float32, SIZES)
        engine, _, _, _ = deepspeed_ext.initialize(model=model, config=cfg)
        return engine, model

    out: dict[str, Any] = {"scales": [], "resumed_scales": []}
    engine, model = engine_of(0)
    _autocast_steps(engine, rank, range(steps), out["scales"])
    out["params"] = [p.detach().clone() for p in model.parameters()]
    del engine
    engine, model = engine_of(0)
    _autocast_steps(engine, rank, range(save_after + 1), out["resumed_scales"])
    path = os.path.join(ckpt_root, "autocast")
    engine.save_checkpoint(path, tag="t", client_state={"mine": 1})
    del engine
    engine, model = engine_of(7)
    _, out["client_state"] = engine.load_checkpoint(path, tag="t")
    out["loaded_scale"] = float(engine.torch_autocast_z0_gradscaler.get_scale())
    _autocast_steps(engine, rank, range(save_after + 1, steps), out["resumed_scales"])
    out["resumed_params"] = [p.detach().clone() for p in model.parameters()]
    return out


class _Warnings(logging.Handler):
    """The WARNING records of the ``lightning_soaa`` and ``deepspeed_ext`` loggers."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("lightning_soaa", "deepspeed_ext")):
            self.messages.append(record.getMessage())


def _manual_loss_run(rank: int, route: str, feed: bool, losses: set[int]) -> dict[str, Any]:
    """5 steps of SOAA under ZeRO-2 fp16 (``route="fp16"``) or ZeRO-0 torch_autocast float16 (``"autocast"``),
    rank 0's batch at step 2 overflowing (the step is skipped). ``feed``: the engine hands the loss over;
    otherwise the loop calls ``set_loss(loss)`` itself, at the steps in ``losses``."""
    import deepspeed_ext

    cfg = make_config(2 if route == "fp16" else 0, "fp32", "lightning_soaa.SOAA",
                      {"lr": 1e-2, "weight_decay": 0.1, "gamma": 0.1, "total_steps": 10})
    if route == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}
    else:
        cfg["torch_autocast"] = {"enabled": True, "dtype": "float16"}
    model = tiny_mlp(0, torch.float32, SIZES)
    engine, _, _, _ = deepspeed_ext.initialize(model=model, config=cfg, feed_loss=feed)
    client = deepspeed_ext.find_client_optimizer(engine)
    out: dict[str, Any] = {}
    try:
        for s in range(5):
            x, y = batch(s, rank, dtype=torch.float32)
            x, y = (x * 1e4, y * 1e4) if s == 2 and rank == 0 else (x, y)
            loss = loss_fn(engine, x.half(), y.half()) if route == "fp16" else loss_fn(engine, x, y)
            if not feed and s in losses:
                client.set_loss(loss)
            engine.backward(loss)
            engine.step()
    except ValueError as exc:
        out["error"] = str(exc)
    out["params"] = full_fp32_params(engine, 2 if route == "fp16" else 0, client, list(model.parameters()),
                                     list(model.parameters()))
    out["stats"] = client.statistics()
    return out


def w_manual_loss_after_skip(rank: int, world: int, routes: list[str]) -> dict[str, Any]:
    """Per route: the engine's loss feed, the loop's own ``set_loss`` at every step, and the loop's ``set_loss``
    at every step but the one after the skipped step; with the warnings each logged."""
    ds_env(rank, world)
    allow_cpu_fp16()
    handler = _Warnings()
    logging.getLogger().addHandler(handler)
    out: dict[str, Any] = {}
    for route in routes:
        for name, feed, losses in (("feed", True, set()), ("manual", False, {0, 1, 2, 3, 4}),
                                   ("no-loss-after-skip", False, {0, 1, 2, 4})):
            handler.messages = []
            out[route, name] = {**_manual_loss_run(rank, route, feed, losses), "warnings": handler.messages}
    logging.getLogger().removeHandler(handler)
    return out


def _soaa_engine(stage: int) -> tuple[Any, Any, Any]:
    import deepspeed_ext

    cfg = make_config(stage, "fp32", "lightning_soaa.SOAA", {"lr": 1e-2, "gamma": 0.1, "total_steps": 10})
    model = tiny_mlp(0, torch.float32, SIZES)
    engine, _, _, _ = deepspeed_ext.initialize(model=model, config=cfg)
    return engine, deepspeed_ext.find_client_optimizer(engine), model


def w_torch_style_backward(rank: int, world: int, stages: list[int], steps: int) -> dict[int, dict[str, Any]]:
    """Per ZeRO stage, SOAA named in the JSON: a ``loss.backward()`` (DeepSpeed's torch-style backward, which
    hands SOAA no loss) then ``engine.step()``: the error and whether the weights moved; then ``steps`` steps of
    ``loss.backward()`` + ``set_loss(loss)`` and of ``engine.backward(loss)``: their weights and trust regions."""
    ds_env(rank, world)
    out: dict[int, dict[str, Any]] = {}
    for stage in stages:
        res: dict[str, Any] = {}
        engine, client, model = _soaa_engine(stage)
        params = list(model.parameters())
        before = full_fp32_params(engine, stage, client, params, params)
        x, y = batch(0, rank, dtype=torch.float32)
        loss_fn(engine, x, y).backward()
        try:
            engine.step()
            res["error"] = None
        except ValueError as e:
            res["error"] = str(e)
        res["moved"] = max_abs_diff(full_fp32_params(engine, stage, client, params, params), before)
        del engine
        for route in ("set_loss", "engine.backward"):
            engine, client, model = _soaa_engine(stage)
            for s in range(steps):
                x, y = batch(s, rank, dtype=torch.float32)
                loss = loss_fn(engine, x, y)
                if route == "set_loss":
                    loss.backward()
                    client.set_loss(loss)
                else:
                    engine.backward(loss)
                engine.step()
            params = list(model.parameters())
            res[route] = {"params": full_fp32_params(engine, stage, client, params, params),
                          "t": client.statistics()["t"]}
            del engine
        out[stage] = res
    return out
