"""EGN on W gloo ranks holding disjoint slices of the batch equals one process holding all of it.

The battery (tests/conformance/test_ranks.py) checks EGN with the MSE loss, momentum, line search and
adaptive damping on equal batches at W ∈ {1, 2, 3, 4}, checkpoints across world sizes and non-finite
batches. Here: the other losses, uneven per-rank batches, explicit Jacobians (LayerNorm), replicated
state (``shard=False``) and idle ranks on a one-layer model, each resumed in one process.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_soaa.optim.egn import EGN
from tests.harness.distributed import run_distributed
from tests.harness.models import embedding_batch, embedding_model, tiny_mlp

DT = torch.float64
STEPS = 3


class _Mixed(nn.Module):
    """Linear layers (Gram factors) plus a LayerNorm (explicit Jacobians)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(21)
        self.l1 = nn.Linear(6, 5).double()
        self.ln = nn.LayerNorm(5).double()
        self.l2 = nn.Linear(5, 3).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=DT) + (1.0 if p.dim() == 1 else 0.0))

    def forward(self, x):
        return self.l2(torch.tanh(self.ln(self.l1(x))))


class _Wrapped(nn.Module):
    """A plain MLP behind a custom forward: traced as a chain at every step (egn_trace)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = tiny_mlp(0, DT)

    def forward(self, x):
        return self.body(x)


CONFIGS = {
    "ce_all": dict(model="mlp", kw=dict(loss="cross_entropy", lr=2.0, damping=0.5, momentum=0.7,
                                        line_search=True, adaptive_damping=True), uneven=True),
    "bce_mixed": dict(model="mixed", kw=dict(loss="bce", lr=1.0, damping=0.2, momentum=0.5,
                                             adaptive_damping=True), uneven=False),
    # the chain traced behind a custom forward: each rank verifies its own forward
    "ce_traced": dict(model="wrapped", kw=dict(loss="cross_entropy", lr=1.0, damping=0.5, momentum=0.5,
                                               line_search=True), uneven=True),
    # replicated state (shard=False): d is all-reduced instead of reduce-scattered to owners
    "mse_unsharded": dict(model="mlp", kw=dict(loss="mse", lr=1.0, damping=0.3, momentum=0.5, shard=False),
                          uneven=True),
    # a linear model under MSE: K = G ⊗ I_c, the Kronecker solve (with every statistic it feeds)
    "linear_idle": dict(model="linear", kw=dict(loss="mse", lr=3.0, damping=0.05, line_search=True, momentum=0.5,
                                                adaptive_damping=True), uneven=True),
    # a rank with an empty batch takes part in every collective with no rows of its own: the chain (mlp),
    # the general capture with explicit rows (mixed) and the traced chain (wrapped)
    "mse_empty": dict(model="mlp", kw=dict(loss="mse", lr=1.0, damping=0.3, momentum=0.5, line_search=True),
                      uneven=False, empty=True),
    # (momentum and adaptive damping take J·d from the explicit rows too: a reshape of the empty rank's rows
    # by -1 raised there alone, the other ranks waiting in the next all-reduce)
    "ce_empty_mixed": dict(model="mixed", kw=dict(loss="cross_entropy", lr=1.0, damping=0.5, line_search=True,
                                                  momentum=0.5, adaptive_damping=True), uneven=False, empty=True),
    # a BatchNorm's affine parameters by explicit Jacobians: vmap over the empty rank's no samples failed
    "mse_empty_batchnorm": dict(model="batchnorm", kw=dict(loss="mse", lr=1.0, damping=0.5, momentum=0.5),
                                uneven=False, empty=True),
    "bce_empty_traced": dict(model="wrapped", kw=dict(loss="bce", lr=1.0, damping=0.5, adaptive_damping=True),
                             uneven=False, empty=True),
    # bc >= CG_MIN_SIZE: the system is solved by conjugate gradients on the gathered factors, identically
    # on every rank (same iterations, same decision to fall back)
    "mse_cg": dict(model="mlp", kw=dict(loss="mse", lr=1.0, damping=0.5, momentum=0.5, line_search=True,
                                        adaptive_damping=True), uneven=True, big=True),
}


def _model(kind: str) -> nn.Module:
    if kind == "mlp":
        return tiny_mlp(0, DT)
    if kind == "mixed":
        return _Mixed()
    if kind == "wrapped":
        return _Wrapped()
    if kind == "batchnorm":
        torch.manual_seed(5)
        return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    torch.manual_seed(4)
    return nn.Linear(6, 3).double()


def _global_batch(step: int, loss: str, world: int, uneven: bool, big: bool = False, empty: bool = False):
    sizes = [2 + r for r in range(world)] if uneven else [4] * world
    if empty:  # rank 0's batch is empty (its data ran out first): the others hold the global batch
        sizes = [0] + [6] * (world - 1)
    if big:  # at least 180 samples (bc >= 540) in all, unevenly split
        sizes = [-(-180 // world) + r for r in range(world)]
    g = torch.Generator().manual_seed(1000 + step)
    b = sum(sizes)
    x = torch.randn(b, 6, generator=g, dtype=DT)
    if loss == "cross_entropy":
        y = torch.randint(0, 3, (b,), generator=g)
    elif loss == "bce":
        y = torch.rand(b, 3, generator=g, dtype=DT)
    else:
        y = torch.randn(b, 3, generator=g, dtype=DT)
    return x, y, sizes


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _worker(rank: int, world: int) -> dict:
    out = {}
    for name, cfg in CONFIGS.items():
        model = _model(cfg["model"])
        opt = EGN(model, **cfg["kw"])
        ckpt = None
        for t in range(STEPS):
            x, y, sizes = _global_batch(t, cfg["kw"]["loss"], world, cfg["uneven"], cfg.get("big", False),
                                        cfg.get("empty", False))
            lo = sum(sizes[:rank])
            opt.step(inputs=x[lo:lo + sizes[rank]], targets=y[lo:lo + sizes[rank]])
            if t == STEPS - 2:
                opt.consolidate_state_dict(to=0)
                if rank == 0:
                    ckpt = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                            "opt": opt.state_dict()}
        st = opt.statistics()
        out[name] = {"params": _flat(model), "damping": opt.damping, "alpha": opt.alpha,
                     "owned": st["owned_blocks"], "calls": st.get("comm_calls", 0.0), "ckpt": ckpt,
                     "cg": st["solve_cg_iterations"],
                     "last_calls": dict(opt.comm.step_stats.calls), "traced": opt._trace is not None,
                     "planned": opt._step_plan() is not None}
    return out


def _single(name: str, world: int, start: int = 0, ckpt: dict | None = None) -> tuple[torch.Tensor, EGN]:
    cfg = CONFIGS[name]
    model = _model(cfg["model"])
    opt = EGN(model, **cfg["kw"])
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
    for t in range(start, STEPS):
        x, y, _ = _global_batch(t, cfg["kw"]["loss"], world, cfg["uneven"], cfg.get("big", False),
                                cfg.get("empty", False))
        opt.step(inputs=x, targets=y)
    return _flat(model), opt


@pytest.mark.parametrize("world", [2, 3, 4])
def test_w_ranks_equal_one_process(world: int, tmp_path) -> None:
    results = run_distributed(_worker, world, tmp_path, timeout=240)
    for name in CONFIGS:
        ref, ref_opt = _single(name, world)
        for r, res in enumerate(results):
            got = res[name]
            # every rank holds bit-identical parameters
            assert torch.equal(got["params"], results[0][name]["params"]), (name, r)
            torch.testing.assert_close(got["params"], ref, rtol=1e-10, atol=1e-12, msg=f"{name} rank {r}")
            assert got["damping"] == pytest.approx(ref_opt.damping, rel=1e-12)
            assert got["alpha"] == pytest.approx(ref_opt.alpha, rel=1e-12)
            assert got["cg"] == results[0][name]["cg"]  # the same solve path and iterations on every rank
            assert not got["planned"]  # the step plan is one process's (egn_plan): ranks take the template
        if name == "mse_cg":
            assert results[0][name]["cg"] >= 2 and ref_opt.statistics()["solve_cg_iterations"] >= 2
        if world > 1 and CONFIGS[name]["kw"].get("shard", True):
            n_params = len(list(_model(CONFIGS[name]["model"]).parameters()))
            assert sum(res[name]["owned"] for res in results) == n_params
            assert len({res[name]["calls"] for res in results}) == 1  # same collectives on every rank
            if name == "mse_plain":  # the documented step: validation, factors, d to owners, the template's
                # all-reduce, d from owners, one trial loss (never accept a non-finite loss)
                for res in results:
                    assert res[name]["last_calls"] == {"all_reduce": 3, "all_gather": 2, "reduce_scatter": 1}
        if name == "ce_traced":  # every rank stepped through the traced chain, none fell back
            assert all(res[name]["traced"] for res in results)
        if name == "linear_idle" and world >= 3:
            assert min(res[name]["owned"] for res in results) == 0  # an idle rank took part
        # a state saved on W ranks resumes in one process and continues the same trajectory
        resumed, _ = _single(name, world, start=STEPS - 1, ckpt=results[0][name]["ckpt"])
        torch.testing.assert_close(resumed, ref, rtol=1e-10, atol=1e-12, msg=f"{name} resume from W={world}")


class _GainMix(nn.Module):
    """A Linear plus a trained scalar: per sample on rank 0, times the batch mean on the last rank (a
    mixing only the explicit Jacobian check of that rank sees)."""

    def __init__(self, mixes: bool) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.lin = nn.Linear(6, 3).double()
        self.gain = nn.Parameter(torch.zeros((), dtype=DT))
        self.mixes = mixes

    def forward(self, x):
        return self.lin(x) + self.gain * (x.mean(0) if self.mixes else x)[..., :3]


def _uneven_share(t: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of step ``t``'s global mse batch, split unevenly."""
    x, y, sizes = _global_batch(t, "mse", world, uneven=True)
    lo = sum(sizes[:rank])
    return x[lo:lo + sizes[rank]], y[lo:lo + sizes[rank]]


def _mixing_worker(rank: int, world: int) -> dict:
    model = _GainMix(mixes=rank == world - 1)
    opt = EGN(model, loss="mse", lr=1.0, damping=0.1)
    before = _flat(model)
    x, y = _uneven_share(0, rank, world)
    try:
        opt.step(inputs=x, targets=y)
        message = None
    except ValueError as exc:
        message = str(exc)
    return {"message": message, "unchanged": torch.equal(_flat(model), before)}


def test_one_rank_mixing_samples_is_refused_on_every_rank(tmp_path) -> None:
    """The explicit rows are checked on each rank before the ranks exchange anything: the one rank
    whose model mixes samples makes every rank raise in the same step, with no parameter changed."""
    results = run_distributed(_mixing_worker, 2, tmp_path, timeout=120)
    assert "depend on other samples of the batch" in results[1]["message"]
    assert results[0]["message"] is not None  # rank 0's own model is per sample; it raises too
    assert all(res["unchanged"] for res in results)


def _attempt(opt: EGN, model: nn.Module, step: int, rank: int, world: int) -> tuple[str | None, bool]:
    """Step ``step`` on this rank's share of the uneven MSE batch: (the error or None, parameters unchanged)."""
    before = _flat(model)
    x, y, sizes = _global_batch(step, "mse", world, uneven=True)
    lo = sum(sizes[:rank])
    try:
        opt.step(inputs=x[lo:lo + sizes[rank]], targets=y[lo:lo + sizes[rank]])
        return None, torch.equal(_flat(model), before)
    except (ValueError, RuntimeError) as exc:
        return str(exc), torch.equal(_flat(model), before)


def _freezing_worker(rank: int, world: int) -> dict:
    """Ranks that freeze the same parameters after construction; then only one rank freezes, then a rank
    unfreezes a parameter frozen at construction."""
    out: dict = {}
    for kind, frozen in (("mlp", "0."), ("mixed", "ln.")):
        model = _model(kind)
        opt = EGN(model, loss="mse", lr=1.0, damping=0.3, momentum=0.5, line_search=True)
        for n, p in model.named_parameters():
            p.requires_grad_(not n.startswith(frozen))
        for t in range(STEPS):
            x, y, sizes = _global_batch(t, "mse", world, uneven=True)
            lo = sum(sizes[:rank])
            opt.step(inputs=x[lo:lo + sizes[rank]], targets=y[lo:lo + sizes[rank]])
        out[kind] = _flat(model)

    def attempt(opt: EGN, model: nn.Module, step: int) -> tuple[str | None, bool]:
        return _attempt(opt, model, step, rank, world)

    model = tiny_mlp(0, DT)
    opt = EGN(model, loss="mse", lr=1.0, damping=0.3)
    model[0].requires_grad_(rank != world - 1)  # only the last rank freezes the first layer
    out["one_froze"] = attempt(opt, model, 0)
    model[0].requires_grad_(False)  # now every rank has: they step together again
    out["then_all"] = attempt(opt, model, 1)
    model = tiny_mlp(0, DT)
    model[0].requires_grad_(False)
    opt = EGN(model, loss="mse", lr=1.0, damping=0.3)
    model[0].requires_grad_(rank == 0)  # rank 0 unfreezes a layer EGN never trained
    out["unfroze"] = attempt(opt, model, 0)
    return out


def _frozen_single(kind: str, frozen: str, world: int) -> torch.Tensor:
    model = _model(kind)
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith(frozen))
    opt = EGN(model, loss="mse", lr=1.0, damping=0.3, momentum=0.5, line_search=True)
    for t in range(STEPS):
        x, y, _ = _global_batch(t, "mse", world, uneven=True)
        opt.step(inputs=x, targets=y)
    return _flat(model)


def test_freezing_is_followed_together_or_refused_on_every_rank(tmp_path) -> None:
    """Every rank follows the same freezing (the steps of one process's EGN built on the frozen model);
    ranks whose trainable parameters differ, or a rank that unfreezes a parameter EGN never trained,
    make every rank raise in the same step (through the batch agreement), nothing changed."""
    results = run_distributed(_freezing_worker, 2, tmp_path, timeout=180)
    for kind, frozen in (("mlp", "0."), ("mixed", "ln.")):
        ref = _frozen_single(kind, frozen, 2)
        for res in results:
            torch.testing.assert_close(res[kind], ref, rtol=1e-10, atol=1e-12, msg=kind)
    for res in results:
        message, unchanged = res["one_froze"]
        assert message is not None and "disagree on which of the model's parameters are trainable" in message
        assert unchanged
        assert res["then_all"] == (None, False)  # a step taken by both ranks
        message, unchanged = res["unfroze"]
        assert message is not None and unchanged
    assert "'0.weight' was frozen" in results[0]["unfroze"][0]


def _bn_model(extra: str = "") -> nn.Module:
    """Linear, BatchNorm (explicit-Jacobian affine parameters, floating running statistics), Linear."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(8, track_running_stats=extra != "untracked")
    model = nn.Sequential(nn.Linear(6, 8), bn, nn.Tanh(), nn.Linear(8, 3)).double()
    if extra == "buffer":  # one more floating buffer than the other ranks' model
        model.register_buffer("scale", torch.ones(2, dtype=DT))
    return model


def _bn_local_stats(model: nn.Module, x: torch.Tensor) -> None:
    """A DDP rank's training forward: its BatchNorm running statistics from its own samples."""
    model.train()
    with torch.no_grad():
        model(x)


def _bn_worker(rank: int, world: int) -> dict:
    out: dict = {}
    model = _bn_model()
    opt = EGN(model, loss="mse", lr=1.0, damping=0.3, line_search=True)
    for t in range(STEPS):
        x, y, sizes = _global_batch(t, "mse", world, uneven=True)
        lo = sum(sizes[:rank])
        _bn_local_stats(model, x[lo:lo + sizes[rank]])
        opt.step(inputs=x[lo:lo + sizes[rank]], targets=y[lo:lo + sizes[rank]])
    out["params"], out["buffers"] = _flat(model), torch.cat([b.reshape(-1) for b in model.buffers()]).double()
    for case in ("buffer", "untracked"):  # the last rank's model has other floating buffers
        model = _bn_model(case if rank == world - 1 else "")
        opt = EGN(model, loss="mse", lr=1.0, damping=0.3)
        before = _flat(model)
        x, y = _uneven_share(0, rank, world)
        try:
            opt.step(inputs=x, targets=y)
            out[case] = (None, torch.equal(_flat(model), before))
        except ValueError as exc:
            out[case] = (str(exc), torch.equal(_flat(model), before))
    return out


def test_ranks_take_rank_0s_buffers_before_the_eval_mode_pass(tmp_path) -> None:
    """Each rank's BatchNorm running statistics come from its own samples (DDP without SyncBatchNorm);
    EGN's eval-mode pass runs on rank 0's on every rank: the step of one process on the global batch with
    rank 0's buffers, at every step. Ranks whose floating buffers differ raise together, nothing changed."""
    world = 2
    results = run_distributed(_bn_worker, world, tmp_path, timeout=180)
    model = _bn_model()
    opt = EGN(model, loss="mse", lr=1.0, damping=0.3, line_search=True)
    for t in range(STEPS):
        x, y, sizes = _global_batch(t, "mse", world, uneven=True)
        _bn_local_stats(model, x[:sizes[0]])  # rank 0's samples
        opt.step(inputs=x, targets=y)
    for res in results:
        torch.testing.assert_close(res["params"], _flat(model), rtol=1e-10, atol=1e-12)
        assert torch.equal(res["buffers"], results[0]["buffers"])  # every rank holds rank 0's buffers
    for res in results:
        message, unchanged = res["buffer"]
        assert message is not None and "different floating-point buffers" in message and unchanged
        message, unchanged = res["untracked"]
        assert message is not None and "disagree on whether the model has floating-point buffers" in message
        assert unchanged


def _swapped_worker(rank: int, world: int, fail: bool = False) -> dict:
    """EGN over a BatchNorm model (its step begins with the buffer agreement) and our AdamW over another
    model: one step in the same order on every rank, then the last rank steps them the other way round
    (``fail``: its EGN step also raises, called without a batch)."""
    from lightning_soaa import AdamW

    model, other = _bn_model(), nn.Sequential(nn.Linear(6, 3)).double()
    egn, adamw = EGN(model, loss="mse", lr=1.0, damping=0.3), AdamW(other.parameters(), lr=1e-2)
    x, y = _uneven_share(0, rank, world)

    def step_adamw() -> None:
        adamw.step()

    def step_egn() -> None:
        if fail and rank == world - 1 and msgs:  # the crossed step, after the first try (the order check)
            egn.step()
        else:
            egn.step(inputs=x, targets=y)

    other.zero_grad()
    ((other(x) - y) ** 2).mean().backward()  # the same gradient on every rank is not needed here
    for p in other.parameters():
        torch.distributed.all_reduce(p.grad)  # what DDP does in backward: every rank, same order
    msgs: list[str] = []
    step_egn(), step_adamw()
    before = [_flat(model), _flat(other)]
    for f in ((step_adamw, step_egn) if rank == world - 1 else (step_egn, step_adamw)):
        try:
            f()
            msgs.append("no error")
        except (RuntimeError, ValueError) as exc:
            msgs.append(str(exc))
    return {"msgs": msgs, "unchanged": torch.equal(before[0], _flat(model)) and torch.equal(before[1], _flat(other))}


def test_egn_buffer_agreement_meets_another_optimizers_step_and_every_rank_raises(tmp_path) -> None:
    """EGN's first collective (here the buffer agreement of a BatchNorm model, W = 3) has the size of the
    step record's all-reduce and carries the optimizer's id where the record does: a rank that steps
    another optimizer first meets it there, and every rank raises the same error (before: gloo's
    size-mismatch abort of the process; on NCCL a hang). Nothing changed."""
    world = 3
    for rank, out in enumerate(run_distributed(_swapped_worker, world, tmp_path, timeout=180)):
        assert all("another optimizer than rank 0" in m and f"[{world - 1}]" in m for m in out["msgs"]), (rank, out)
        assert out["unchanged"], rank


def test_a_crossing_with_an_error_on_the_egn_rank_raises_the_same_error_everywhere(tmp_path) -> None:
    """The crossed rank's EGN step also raises (no batch) while rank 0 is in AdamW's step: both sides read
    the crossing first (the base's record and EGN's agreement alike), so every rank raises the same error
    (before, AdamW's ranks said that rank 1 raised an error and the EGN rank that it was out of order)."""
    world = 2
    for rank, out in enumerate(run_distributed(_swapped_worker, world, tmp_path, True, timeout=180)):
        assert all("another optimizer than rank 0" in m and f"[{world - 1}]" in m for m in out["msgs"]), (rank, out)
        assert out["unchanged"], rank


def _replaced_step(opt: EGN, model: nn.Module, rank: int, world: int) -> tuple[str | None, bool, int]:
    """(the step's error or None, whether the model's local tensors and EGN's are unchanged, num_steps)."""
    def local() -> list[torch.Tensor]:
        ts = [*model.parameters(), *(p for g in opt.param_groups for p in g["params"])]
        return [(t.to_local() if hasattr(t, "to_local") else t).detach().clone() for t in ts]
    before = local()
    x, y = _uneven_share(0, rank, world)
    try:
        opt.step(inputs=x, targets=y)
        message = None
    except (RuntimeError, ValueError) as exc:
        message = f"{type(exc).__name__}: {exc}"
    return message, all(torch.equal(a, b) for a, b in zip(before, local(), strict=True)), opt.num_steps


def _replaced_worker(rank: int, world: int) -> dict:
    """Parameters replaced after EGN was built: by load_state_dict(assign=True) on the last rank only,
    then by fully_shard (FSDP2's DTensor Parameters) on every rank; last, EGN built on a model whose frozen
    layer alone is fully_shard'ed."""
    from torch.distributed.fsdp import fully_shard

    out: dict = {}
    model = tiny_mlp(0)
    opt = EGN(model, loss="mse", lr=0.5)
    if rank == world - 1:
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    out["assign"] = _replaced_step(opt, model, rank, world)

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    model = tiny_mlp(0)
    opt = EGN(model, loss="mse", lr=0.5)
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    out["fully_shard"] = _replaced_step(opt, model, rank, world)

    model = tiny_mlp(0)  # only a frozen layer sharded: refused at construction (the trained ones by the base)
    model[0].requires_grad_(False)
    fully_shard(model[0], mesh=mesh)
    try:
        EGN(model, loss="mse")
        out["frozen_dtensor"] = None
    except ValueError as exc:
        out["frozen_dtensor"] = str(exc)
    return out


def test_parameters_replaced_after_construction_are_refused_on_every_rank(tmp_path) -> None:
    """EGN kept stepping its own Parameters while the model's forward used the replacements (the model
    never moved; steps counted). Every rank raises in the same step, before anything changes: also the
    ranks whose model is intact when one rank's parameters were replaced."""
    if not hasattr(pytest.importorskip("torch.distributed.fsdp"), "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard")
    world = 2
    results = run_distributed(_replaced_worker, world, tmp_path, timeout=120)
    for rank, res in enumerate(results):
        message, unchanged, steps = res["assign"]
        assert message is not None and unchanged and steps == 0
        if rank == world - 1:
            assert "'0.weight' is no longer the tensor" in message and "assign=True" in message
        message, unchanged, steps = res["fully_shard"]
        assert message is not None and unchanged and steps == 0
        # (the step's parameter check names the original fully_shard replaced, for every optimizer: 066117c)
        assert "'0.weight' was given to FSDP2's fully_shard" in message
        assert "Build the optimizer after fully_shard" in message
        assert "EGN does not support DTensor" in (res["frozen_dtensor"] or "")


def _damping_worker(rank: int, world: int) -> dict:
    """``opt.damping`` set by hand (README: from a callback) on one rank, then an invalid value (refused
    where it is set), then the same valid value on every rank, which is then stepped as a run built with it."""
    model = tiny_mlp(0, DT)
    opt = EGN(model, loss="mse", lr=1.0, damping=0.5)

    def attempt(step: int) -> tuple[str | None, bool]:
        return _attempt(opt, model, step, rank, world)

    out = {"first": attempt(0)}
    if rank == 1:
        opt.damping = 100.0
    out["one_rank"] = attempt(1)
    try:
        opt.damping = float("nan")
        out["nan"] = None
    except ValueError as exc:
        out["nan"] = str(exc)
    opt.damping = 100.0
    out["both"] = attempt(1)
    out["params"] = _flat(model)
    return out


def test_damping_set_by_hand_is_compared_across_ranks_and_checked(tmp_path) -> None:
    """λ set on one rank only was used as it was on each rank (no error; 0.26 off both one-process runs,
    the ranks' λ stayed [0.5, 100]); NaN or a negative λ was taken and every later step skipped as
    'could not be solved'. The first is refused at the step on every rank with nothing changed, the second
    where it is set; λ set on every rank is used (equal to one process with λ = 100 from step 1)."""
    results = run_distributed(_damping_worker, 2, tmp_path, timeout=120)
    for r, res in enumerate(results):
        assert res["first"] == (None, False)
        msg, unchanged = res["one_rank"]
        assert msg is not None and "opt.damping" in msg and "rank(s) [1]" in msg and unchanged, (r, msg)
        assert res["nan"] is not None and "Invalid opt.damping=nan" in res["nan"], (r, res["nan"])
        assert res["both"] == (None, False)
    model = tiny_mlp(0, DT)
    opt = EGN(model, loss="mse", lr=1.0, damping=0.5)
    for t in (0, 1):
        x, y, _ = _global_batch(t, "mse", 2, uneven=True)
        opt.step(inputs=x, targets=y)
        opt.damping = 100.0
    torch.testing.assert_close(results[0]["params"], _flat(model), rtol=1e-12, atol=1e-14)
    assert torch.equal(results[0]["params"], results[1]["params"])


# -- nn.Embedding tables by their index factors: the indices travel in the gathered table ----------------
#: (model kind, loss, padding index, per-rank batch sizes, c): uneven shares, an empty rank, the dense,
#: float32-factored (bc' = 400) and conjugate-gradient (bc' = 560) solves
EMBEDDING_CONFIGS = {
    "tabular_ce_pad": ("tabular", "cross_entropy", 0, [5, 7], 3),
    "tokens_mse_pad": ("tokens", "mse", 0, [4, 6], 3),
    "flat_ce_empty": ("flat", "cross_entropy", None, [0, 9], 3),
    "tabular_mse_mixed": ("tabular", "mse", None, [47, 53], 4),
    "flat_ce_cg": ("flat", "cross_entropy", 0, [68, 72], 5),
}
EMBEDDING_KW = dict(lr=1.0, damping=0.3, momentum=0.5, line_search=True, adaptive_damping=True)


def _embedding_run(name: str, rank: int, world: int, jacobian: str = "auto") -> dict:
    kind, loss, pad, sizes, c = EMBEDDING_CONFIGS[name]
    model = embedding_model(kind, c, pad)
    opt = EGN(model, loss=loss, jacobian=jacobian, factor_embeddings=True, **EMBEDDING_KW)
    lo = sum(sizes[:rank]) if world > 1 else 0
    n = sizes[rank] if world > 1 else sum(sizes)
    for t in range(STEPS):
        xs, y = embedding_batch(kind, t, sum(sizes), c, loss, pad)
        opt.step(inputs=tuple(x[lo:lo + n] for x in xs), targets=y[lo:lo + n])
    st = opt.statistics()
    return {"params": _flat(model), "damping": opt.damping, "alpha": opt.alpha, "explicit": list(opt._explicit),
            "tables": sum(s.vocab > 0 for s in opt._sites), "cg": st["solve_cg_iterations"],
            "refinements": st["solve_refinements"]}


def _embedding_worker(rank: int, world: int) -> dict:
    return {name: _embedding_run(name, rank, world) for name in EMBEDDING_CONFIGS}


def test_factored_embeddings_at_two_ranks_equal_one_process(tmp_path) -> None:
    """Each rank's index factors join the global table; every rank builds the same K from it and steps as one
    process does, and as explicit Jacobians do (with an empty rank, uneven shares and every solve)."""
    results = run_distributed(_embedding_worker, 2, tmp_path, timeout=300)
    for name, (kind, *_rest) in EMBEDDING_CONFIGS.items():
        ref = _embedding_run(name, 0, 1)
        explicit = _embedding_run(name, 0, 1, jacobian="explicit")
        for r, res in enumerate(results):
            got = res[name]
            assert got["explicit"] == [] and got["tables"] == (3 if kind == "tabular" else 1), (name, r)
            assert torch.equal(got["params"], results[0][name]["params"]), (name, r)
            torch.testing.assert_close(got["params"], ref["params"], rtol=1e-10, atol=1e-12, msg=f"{name} rank {r}")
            torch.testing.assert_close(got["params"], explicit["params"], rtol=1e-10, atol=1e-12, msg=name)
            assert got["damping"] == pytest.approx(ref["damping"], rel=1e-12)
            assert got["alpha"] == pytest.approx(ref["alpha"], rel=1e-12)
            assert got["cg"] == ref["cg"] and got["refinements"] == ref["refinements"]
        if name.endswith("_cg"):
            assert ref["cg"] >= 2
        if name.endswith("_mixed"):
            assert ref["refinements"] >= 1


def _trunk_head(rank: int, world: int) -> dict:
    """SOAA (grad_reduction='mean') trains a trunk and EGN the head on its features, from one backward of
    the whole model per step: that backward also leaves gradients on the head, different on every rank (each
    has its own slice of the batch). EGN never reads them (its directions come from the batch)."""
    from lightning_soaa import SOAA

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 5), nn.Tanh()).double()
    head = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    soaa = SOAA(trunk.parameters(), lr=1e-2, grad_reduction="mean")
    egn = EGN(head, loss="mse", lr=0.5, damping=1.0, line_search=True)
    for t in range(STEPS):
        x, y, _ = _global_batch(t, "mse", 2, uneven=False)  # 8 samples, whatever W
        x, y = x[rank::world], y[rank::world]
        trunk.zero_grad(set_to_none=True)
        h = trunk(x)
        loss = 0.5 * ((head(h) - y) ** 2).sum(1).mean()
        loss.backward()
        soaa.step(loss=loss.detach())
        egn.step(inputs=h.detach(), targets=y)
    return {"params": torch.cat([_flat(trunk), _flat(head)])}


def test_egn_ignores_gradients_another_optimizers_backward_left_on_its_parameters(tmp_path) -> None:
    """Before: EGN at W > 1 compared those head gradients across ranks and refused the step on every rank
    ("the gradients on rank(s) [1] differ ... wrap the model in DistributedDataParallel"), a correct setup
    (the same run with the head's gradients cleared equalled one process to 1e-16)."""
    ref = _trunk_head(0, 1)["params"]
    for rank, out in enumerate(run_distributed(_trunk_head, 2, tmp_path, timeout=180)):
        torch.testing.assert_close(out["params"], ref, rtol=0, atol=1e-12, msg=f"rank {rank}")


class _Odd(nn.Module):
    """A Linear-Tanh-Linear model whose forward, where ``odd`` is set, scales its input in place
    ("inplace") or returns the force -dE/dx of its energy ("force"; "func_force": by torch.func.grad): one
    rank's forward only."""

    def __init__(self, odd: str | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.odd = odd
        self.a, self.act, self.o = nn.Linear(3, 5).double(), nn.Tanh(), nn.Linear(5, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.odd == "force":
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                e = self.o(self.act(self.a(x))).sum()
                return -torch.autograd.grad(e, x, create_graph=True)[0]
        if self.odd == "func_force":
            return -torch.func.grad(lambda xx: self.o(self.act(self.a(xx))).sum())(x)
        if self.odd == "inplace":
            x /= 255.0
        out: torch.Tensor = self.o(self.act(self.a(x)))
        return out


def _misuse_worker(rank: int, world: int) -> dict:
    """A forward that changes its input in place, one that differentiates itself (by torch.autograd.grad or
    torch.func.grad), and a hook registered on the torch.compile wrapper after EGN was built: each on the
    last rank only."""
    last = rank == world - 1
    out: dict = {}
    for case in ("inplace", "force", "func_force", "wrapper_hook"):
        model = _Odd(None)
        compiled = torch.compile(model, backend="aot_eager")
        opt = EGN(compiled if case == "wrapper_hook" else model, loss="mse", lr=0.5, momentum=0.5)
        x, y = _uneven_share(0, rank, world)
        opt.step(inputs=x[:, :3].clone(), targets=y)
        if last and case == "wrapper_hook":
            compiled.register_forward_hook(lambda m, args, z: 2.0 * z)
        elif last:
            model.odd = case
        state = {k: v.clone() for p in model.parameters() for k, v in opt.state.get(p, {}).items()
                 if isinstance(v, torch.Tensor)}
        before = (_flat(model), opt.num_steps, opt.damping, opt.alpha, opt.momentum_steps)
        message = _step_message(opt, 1, rank, world)
        now = {k: v for p in model.parameters() for k, v in opt.state.get(p, {}).items() if isinstance(v, torch.Tensor)}
        unchanged = (torch.equal(_flat(model), before[0])
                     and (opt.num_steps, opt.damping, opt.alpha, opt.momentum_steps) == before[1:]
                     and now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state))
        out[case] = (message, unchanged)
    return out


def _step_message(opt: EGN, t: int, rank: int, world: int) -> str | None:
    """This rank's share of batch ``t`` stepped: None, or the refusal's message."""
    x, y = _uneven_share(t, rank, world)
    try:
        opt.step(inputs=x[:, :3].clone(), targets=y)
        return None
    except (ValueError, RuntimeError) as exc:
        return str(exc)


def test_forward_misuse_on_one_rank_is_refused_on_every_rank(tmp_path) -> None:
    """Each refusal reaches every rank in the same step (the rank's error rides the batch agreement), with
    nothing changed anywhere, also on the rank whose forward is fine."""
    results = run_distributed(_misuse_worker, 2, tmp_path, timeout=150)
    want = {"inplace": "changed its input in place", "force": "differentiates itself",
            "func_force": "called inside a torch.func transform",
            "wrapper_hook": "torch.compile wrapper EGN was built on has hooks"}
    for rank, res in enumerate(results):
        for case, text in want.items():
            message, unchanged = res[case]
            assert message is not None and unchanged, (rank, case, message)
            if rank == 1:
                assert text in message, (case, message)


def _probe_worker(rank: int, world: int) -> dict:
    """The last rank's forward is a force by torch.func.grad with the transform check turned off there, so
    only the first step's factor probe can see it; the other ranks' forwards are fine."""
    from lightning_soaa.optim import egn_capture

    last = rank == world - 1
    if last:
        egn_capture.maybe_current_level = lambda: None  # (this worker process only)
    model = _Odd("func_force" if last else None)
    opt = EGN(model, loss="mse", lr=0.5, momentum=0.5)
    before = _flat(model)
    message = _step_message(opt, 0, rank, world)
    return {"message": message, "unchanged": torch.equal(_flat(model), before) and opt.num_steps == 0
            and opt.momentum_steps == 0 and opt.damping == 1.0}


def test_the_factor_probe_refuses_on_every_rank(tmp_path) -> None:
    for rank, res in enumerate(run_distributed(_probe_worker, 2, tmp_path, timeout=120)):
        assert res["message"] is not None and res["unchanged"], (rank, res)
        if rank == 1:
            assert "Gram factors captured for the trained parameter 'a.weight'" in res["message"], res


class _TaskHead(nn.Module):
    """An MLP whose extra head applies to the samples of one task (the first feature > 0): called only when
    the batch has such a sample (``masked=False``), or on every batch with its output masked."""

    def __init__(self, masked: bool) -> None:
        super().__init__()
        self.body = tiny_mlp(0, DT)
        self.head = nn.Linear(3, 3).double()
        self.masked = masked
        with torch.no_grad():
            self.head.weight.copy_(0.3 * torch.eye(3, dtype=DT) + 0.1)
            self.head.bias.copy_(torch.tensor([0.1, -0.2, 0.05], dtype=DT))

    def forward(self, x):
        z = self.body(x)
        task = x[:, 0] > 0
        if self.masked or bool(task.any()):
            z = torch.where(task[:, None], self.head(z), z)
        return z


def _task_share(t: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``t``: 4 samples per rank, every one of rank 0's in the task and none of the other ranks'."""
    x, y, _ = _global_batch(t, "mse", world, uneven=False)
    x = x.clone()
    x[:, 0] = x[:, 0].abs() * torch.where(torch.arange(len(x)) < 4, 1.0, -1.0).to(DT)
    return x[4 * rank:4 * rank + 4], y[4 * rank:4 * rank + 4]


def _task_head_worker(rank: int, world: int) -> dict:
    out: dict = {}
    for masked in (False, True):
        model = _TaskHead(masked)
        opt = EGN(model, loss="mse", lr=0.5, damping=0.5, momentum=0.5, line_search=True)
        before, message = _flat(model), None
        try:
            for t in range(STEPS):
                x, y = _task_share(t, rank, world)
                opt.step(inputs=x, targets=y)
        except ValueError as exc:
            message = str(exc)
        out[masked] = {"message": message, "unchanged": torch.equal(_flat(model), before), "params": _flat(model)}
    return out


def test_a_layer_some_ranks_do_not_call_is_named_on_every_rank(tmp_path) -> None:
    """A task head called only for batches that hold its task's samples: one process calls it on the global
    batch, the ranks whose share has none do not. Refused on every rank in the first step, naming the layer
    and each rank's positions (the message spoke of sequence lengths only); the masked forward its hint
    describes equals one process."""
    world = 2
    results = run_distributed(_task_head_worker, world, tmp_path, timeout=120)
    for rank, res in enumerate(results):
        message = res[False]["message"]
        assert message is not None and res[False]["unchanged"], (rank, res[False])
        assert "'head' (T by rank: [1, 0])" in message and "did not call the layer" in message, message
        assert res[True]["message"] is None, res[True]["message"]
    model = _TaskHead(False)
    opt = EGN(model, loss="mse", lr=0.5, damping=0.5, momentum=0.5, line_search=True)
    for t in range(STEPS):
        parts = [_task_share(t, r, world) for r in range(world)]
        opt.step(inputs=torch.cat([p[0] for p in parts]), targets=torch.cat([p[1] for p in parts]))
    for res in results:
        torch.testing.assert_close(res[True]["params"], _flat(model), rtol=0, atol=1e-12)
