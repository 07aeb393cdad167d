"""DeepSpeed engine features around our client optimizer, against one process with plain torch, on 2 gloo ranks:
``gradient_clipping`` (the shipped configs/deepspeed/soaa_zero2.json uses 1.0), fp16 with a dynamic loss scale
and an overflow, a JSON ``scheduler`` (WarmupLR), and a resume that loads the module only.

One spawn (a module-scoped fixture) runs every engine in the same two processes (DeepSpeed's first engine costs
most of the time). The reference (:func:`reference`) is the package optimizer stepped in this process on the
gradient of the mean loss over both ranks' batches (what the engine's averaged gradient is), with torch's
``clip_grad_norm_``, the step skipped, the lr set or the optimizer made fresh where the engine should do so.
"""

from __future__ import annotations

import pytest
import torch

import lightning_soaa
from tests.deepspeed._workers import SIZES, w_autocast_scaler_resume, w_engine_features, w_manual_loss_after_skip
from tests.harness.compare import max_abs_diff
from tests.harness.distributed import run_distributed
from tests.harness.models import batch, loss_fn, tiny_mlp

pytestmark = [pytest.mark.deepspeed, pytest.mark.timeout(240)]

W = 2
STEPS = 5
CLIP = 0.5  # below the gradient norm of most steps here (asserted): the clipping binds
OVERFLOW_AT = 2
OPTS = {"SOAA": {"lr": 1e-2, "weight_decay": 0.1, "gamma": 0.1, "total_steps": 10},
        "AdamW": {"lr": 1e-2, "weight_decay": 0.1}}
WARMUP = {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-3, "warmup_max_lr": 1e-2, "warmup_num_steps": 3,
                                         "warmup_type": "linear"}}
# DeepSpeed's WarmupLR sets min_lr at construction and steps after each training step from iteration 0 (gamma 0):
# steps 0 and 1 both run at min_lr, step s >= 1 at min + (max - min) * min(1, (s - 1) / warmup_num_steps)
WARMUP_LRS = [1e-3 + 9e-3 * min(1.0, max(0, s - 1) / 3) for s in range(STEPS)]
RESUME_AT = 3
RESUMES = {"optimizer-states-off": {"load_optimizer_states": False, "load_lr_scheduler_states": False},
           "module-only": {"load_module_only": True}}


def _job(opt: str, stage: int, **kw) -> dict:
    return dict(stage=stage, opt_type=f"lightning_soaa.{opt}", opt_params=OPTS[opt], steps=STEPS, **kw)


def _jobs() -> dict[str, dict]:
    jobs = {}
    for opt in OPTS:
        for stage in (0, 2):
            jobs[f"clip-{opt}-{stage}"] = _job(opt, stage, clip=CLIP)
            jobs[f"warmup-{opt}-{stage}"] = _job(opt, stage, scheduler=WARMUP)
    for opt, stage in (("SOAA", 1), ("SOAA", 2), ("SOAA", 3), ("AdamW", 2)):  # fp16 is refused at stage 0
        jobs[f"fp16-{opt}-{stage}"] = _job(opt, stage, fp16=True, overflow_at=OVERFLOW_AT)
    for stage in (0, 2):
        for mode, kwargs in RESUMES.items():
            jobs[f"{mode}-SOAA-{stage}"] = _job("SOAA", stage, resume={"at": RESUME_AT, **kwargs})
    return jobs


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds_features")
    return run_distributed(w_engine_features, W, tmp, str(tmp / "ckpt"), _jobs(), timeout=220)


def reference(opt: str, *, clip: float = 0.0, skip: tuple[int, ...] = (), lrs: list[float] | None = None,
              fresh_at: int | None = None, half_init: bool = False) -> dict:
    """The package optimizer in one process on the mean loss over the W ranks' batches; ``half_init``: from the
    fp16-rounded weights (DeepSpeed's fp32 masters are made from the fp16 module)."""
    model = tiny_mlp(0, torch.float32, SIZES)
    if half_init:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    cls = getattr(lightning_soaa, opt)
    optimizer = cls(model.parameters(), **OPTS[opt])
    norms = []
    for s in range(STEPS):
        if s in skip:
            continue
        if s == fresh_at:  # the resumed engine: these weights, a new optimizer
            optimizer = cls(model.parameters(), **OPTS[opt])
        model.zero_grad()
        total = 0.0
        for r in range(W):
            x, y = batch(s, r, dtype=torch.float32)
            loss = loss_fn(model, x, y)
            (loss / W).backward()
            total += loss.item()
        if clip:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        if lrs is not None:
            for g in optimizer.param_groups:
                g["lr"] = lrs[s]
        if hasattr(optimizer, "set_loss"):
            optimizer.set_loss(total / W)
        optimizer.step()
    stats = optimizer.statistics()
    return {"params": [p.detach().clone() for p in model.parameters()], "norms": norms, "stats": stats}


def _check(ds: dict, ref: dict, tol: float, steps: int) -> None:
    assert max_abs_diff(ds["params"], ref["params"]) <= tol, max_abs_diff(ds["params"], ref["params"])
    assert ds["training_steps"] == steps
    if "t" in ref["stats"]:  # SOAA: its trust region advanced once per step taken, to the reference's d
        assert ds["stats"]["t"] == ref["stats"]["t"] == steps
        assert ds["stats"]["d"] == pytest.approx(ref["stats"]["d"], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("stage", [0, 2])
@pytest.mark.parametrize("opt", list(OPTS))
def test_gradient_clipping_clips_the_averaged_gradient(results, opt, stage):
    """gradient_clipping=0.5: DeepSpeed clips the averaged gradient by its global norm before our step, as
    clip_grad_norm_ on the one-process gradient."""
    ref = reference(opt, clip=CLIP)
    assert sum(n > CLIP for n in ref["norms"]) >= 3, ref["norms"]  # the clipping binds: not vacuous
    assert max_abs_diff(ref["params"], reference(opt)["params"]) > 1e-4  # and changes the result
    for rank_res in results:
        _check(rank_res[f"clip-{opt}-{stage}"], ref, 1e-6, STEPS)


@pytest.mark.parametrize("job", ["SOAA-1", "SOAA-2", "SOAA-3", "AdamW-2"])
def test_fp16_overflow_step_is_skipped_on_every_rank(results, job):
    """fp16, dynamic loss scale: rank 0 alone overflows at step 2; the step is skipped on both ranks (no
    optimizer step, SOAA's trust region not advanced, its loss dropped) and the others equal the fp32 reference
    that skips it, to fp16's rounding of the forward and backward (measured 7.6e-5 after 5 steps; 1.8e-2 from a
    reference that steps on the overflow step)."""
    opt = job.split("-")[0]
    ref = reference(opt, skip=(OVERFLOW_AT,), half_init=True)
    for rank_res in results:
        ds = rank_res[f"fp16-{job}"]
        assert ds["skipped"] == [0] * OVERFLOW_AT + [1] * (STEPS - OVERFLOW_AT)
        _check(ds, ref, 5e-4, STEPS - 1)


@pytest.mark.parametrize("stage", [0, 2])
@pytest.mark.parametrize("opt", list(OPTS))
def test_json_warmup_scheduler_drives_the_optimizer_lr(results, opt, stage):
    """A WarmupLR in the JSON writes each step's lr into the client's groups, and our step uses it."""
    ref = reference(opt, lrs=WARMUP_LRS)
    assert max_abs_diff(ref["params"], reference(opt)["params"]) > 1e-4  # the lr sequence matters
    for rank_res in results:
        ds = rank_res[f"warmup-{opt}-{stage}"]
        assert [lr for (lr,) in ds["lrs"]] == pytest.approx(WARMUP_LRS)  # one param group
        _check(ds, ref, 1e-6, STEPS)


@pytest.mark.parametrize("stage", [0, 2])
@pytest.mark.parametrize("mode", list(RESUMES))
def test_resume_without_optimizer_state_takes_the_weights_and_a_fresh_optimizer(results, mode, stage):
    """load_optimizer_states=False / load_module_only=True into an engine built from other weights: the weights
    saved after 3 steps, then a fresh SOAA (t restarts, its moments and trust region new), as the reference that
    builds a new optimizer over the saved weights; not the uninterrupted run."""
    ref = reference("SOAA", fresh_at=RESUME_AT)
    assert max_abs_diff(ref["params"], reference("SOAA")["params"]) > 1e-4  # a fresh optimizer makes a difference
    for rank_res in results:
        _check(rank_res[f"{mode}-SOAA-{stage}"], ref, 1e-6, STEPS - RESUME_AT)


def test_torch_autocast_grad_scaler_scale_survives_a_resume(tmp_path):
    """ZeRO-0 with ``torch_autocast`` float16 steps through DeepSpeed's torch GradScaler, whose state DeepSpeed's
    checkpoint left out: a run saved right after an overflow-skipped step (scale 65536 -> 32768) resumed from
    65536, so the next batch (gradients finite at 32768, not at 65536) was skipped after the resume and stepped
    on in the uninterrupted run (SOAA's weights then differ). The scale is restored with the optimizer state;
    the load hands back the caller's client_state without it."""
    res = run_distributed(w_autocast_scaler_resume, W, tmp_path, str(tmp_path / "ckpt"), STEPS, OVERFLOW_AT,
                          timeout=200)
    for r in res:
        assert r["scales"] == [65536.0, 65536.0, 32768.0, 32768.0, 32768.0]  # only the planted step skipped
        assert r["loaded_scale"] == 32768.0
        assert r["resumed_scales"] == r["scales"]
        assert r["client_state"]["mine"] == 1  # the caller's own, beside DeepSpeed's keys
        assert not [k for k in r["client_state"] if k.startswith("lightning_soaa")]
        assert max_abs_diff(r["resumed_params"], r["params"]) == 0.0


@pytest.mark.parametrize("route", ["fp16", "autocast"])
def test_loss_handed_over_for_a_skipped_step_is_dropped(tmp_path, route):
    """A loop that hands SOAA its loss itself (``feed_loss=False``, ``set_loss(loss)`` once per step), ZeRO-2 fp16
    or ZeRO-0 torch_autocast float16, rank 0 overflowing at step 2: DeepSpeed skips the step without stepping or
    zeroing SOAA, and the next ``set_loss`` logged SOAA's accumulation warning (two hand-overs before a step);
    a step handed no loss after the skipped one was judged by the skipped batch's loss. Now: no warning, the
    same weights as the engine's loss feed, and that step refused on every rank naming the missing loss."""
    res = run_distributed(w_manual_loss_after_skip, W, tmp_path, [route], timeout=200)
    for r in res:
        feed, manual, missing = (r[route, name] for name in ("feed", "manual", "no-loss-after-skip"))
        assert "error" not in feed and "error" not in manual
        assert feed["warnings"] == manual["warnings"] == []
        assert manual["stats"]["t"] == feed["stats"]["t"] == STEPS - 1
        assert max_abs_diff(manual["params"], feed["params"]) == 0.0
        assert missing["error"].startswith("SOAA needs the mini-batch loss of every step")
        assert "missing on 2 of 2 rank(s)" in missing["error"]
