"""The battery on an accelerator: every registered optimizer on a CUDA device.

CI has no GPU, so these are skipped there; they run wherever ``torch.cuda.is_available()`` (``pytest
tests/conformance/test_accelerator.py``). What a user moving a run to a GPU relies on:

* a float64 run on the GPU equals the CPU run step for step (summation order only), and every piece of
  state lives on the parameters' device (nothing silently kept on, or copied back to, the host);
* a non-finite step is skipped there too, changing nothing;
* a checkpoint written on one device resumes on the other and continues as the uninterrupted run;
* with a process group: a one-rank NCCL group, and FSDP2 over a CUDA mesh, equal the plain run (one GPU
  here: NCCL refuses two ranks on one device, so W >= 2 is the gloo battery's job).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_soaa.registry import OptimizerSpec
from tests.conformance._battery import (
    SPECS,
    assert_close,
    each_optimizer,
    make,
    params,
    step,
    without_skips,
)
from tests.harness.distributed import run_distributed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS, SAVE_AT = 6, 3
# float64 on both devices: only the order of summation differs (cuBLAS vs MKL/OpenBLAS), ~1e-15 a step.
RTOL, ATOL = 1e-9, 1e-11


def _host(obj: Any) -> Any:
    """A state dict with every tensor copied to the CPU (for comparing across devices)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host(v) for v in obj)
    return obj


def _state_devices(opt: Any) -> set[str]:
    """The device types of every non-scalar state tensor (scalars such as step counts may stay on the
    host, as torch's own optimizers keep them)."""
    found = set()
    for st in opt.state.values():
        for v in st.values() if isinstance(st, dict) else ():
            for t in v.values() if isinstance(v, dict) else (v,):
                if isinstance(t, torch.Tensor) and t.numel() > 1:
                    found.add(t.device.type)
    return found


def _run(spec: OptimizerSpec, device: str, steps: range, model_opt: tuple[Any, Any] | None = None,
         **overrides: Any):
    model, opt = model_opt or make(spec, device=device, **overrides)
    for t in steps:
        step(spec, model, opt, t)
    return model, opt


@each_optimizer
def test_float64_on_the_accelerator_equals_the_cpu_run(spec: OptimizerSpec) -> None:
    cpu_model, cpu_opt = _run(spec, "cpu", range(STEPS))
    gpu_model, gpu_opt = _run(spec, "cuda", range(STEPS))
    for i, (a, b) in enumerate(zip(params(cpu_model), params(gpu_model))):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, rtol=RTOL, atol=ATOL, msg=lambda m: f"parameter {i}: {m}")
    assert_close(_host(gpu_opt.state_dict()), cpu_opt.state_dict(), rtol=1e-8, atol=1e-10)
    assert _state_devices(gpu_opt) == {"cuda"}, _state_devices(gpu_opt)


@each_optimizer
def test_nonfinite_step_on_the_accelerator_is_skipped_and_changes_nothing(spec: OptimizerSpec) -> None:
    model, opt = _run(spec, "cuda", range(2))
    before_w, before = params(model), _host(opt.state_dict())
    step(spec, model, opt, 2, poison=True)
    for a, b in zip(before_w, params(model)):
        assert torch.equal(a, b)
    assert opt.skipped_steps == 1
    assert_close(without_skips(_host(opt.state_dict())), without_skips(before), rtol=0, atol=0)


@pytest.mark.parametrize("src,dst", [("cuda", "cpu"), ("cpu", "cuda")])
@each_optimizer
def test_checkpoint_resumes_on_the_other_device(spec: OptimizerSpec, src: str, dst: str) -> None:
    """A checkpoint written on ``src`` (tensors saved on that device, as ``torch.save`` keeps them) and
    loaded into a fresh run on ``dst`` continues as the uninterrupted ``src`` run, its state on ``dst``."""
    model, opt = _run(spec, src, range(SAVE_AT))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _run(spec, src, range(SAVE_AT, STEPS), (model, opt))

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    resumed = make(spec, seed=5, device=dst)  # another init: everything comes from the checkpoint
    resumed[0].load_state_dict(ckpt["model"])
    resumed[1].load_state_dict(ckpt["opt"])
    r_model, r_opt = _run(spec, dst, range(SAVE_AT, STEPS), resumed)
    for a, b in zip(params(model), params(r_model)):
        assert b.device.type == dst
        torch.testing.assert_close(b.cpu(), a.cpu(), rtol=RTOL, atol=ATOL)
    assert _state_devices(r_opt) == {dst}, _state_devices(r_opt)


# ------------------------------------------------------------------------------ with a process group
def _nccl_run(rank: int, world: int, name: str) -> dict[str, Any]:
    from lightning_soaa.distributed.comm import TorchComm

    spec = next(s for s in SPECS if s.name == name)
    # an explicit communicator: at W = 1 the default one is local and would make no NCCL collective
    model, opt = _run(spec, "cuda", range(STEPS), comm=TorchComm())
    assert type(opt.comm).__name__ == "TorchComm" and opt.comm.device.type == "cuda"
    opt.consolidate_state_dict(to=0)
    return {"params": [p.cpu() for p in params(model)], "state": _host(opt.state_dict())}


@each_optimizer
def test_one_nccl_rank_equals_the_plain_run(spec: OptimizerSpec, tmp_path: Path) -> None:
    (got,) = run_distributed(_nccl_run, 1, tmp_path, spec.name, backend="nccl", timeout=300)
    model, opt = _run(spec, "cuda", range(STEPS))
    for a, b in zip(params(model), got["params"]):
        torch.testing.assert_close(b, a.cpu(), rtol=1e-12, atol=1e-14)
    assert_close(got["state"], _host(opt.state_dict()), rtol=1e-12, atol=1e-14)


def _fsdp2_run(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_soaa.distributed.comm import TorchComm
    from tests.fsdp2 import _workers as W

    mesh = init_device_mesh("cuda", (world,))
    out = {}
    for name, cls, kw, sizes in W.CASES:
        model = W.sharded_model(sizes, mesh)  # fully_shard moves the shards to the mesh's device
        opt = cls(model.named_parameters(), comm=TorchComm(), **kw)  # NCCL collectives even at W = 1
        for t in range(W.STEPS):
            x, y = W.local_batch(t, sizes, rank, world)
            W.train_step(model, opt, x.cuda(), y.cuda())
        out[name] = {"params": [p.cpu() for p in W.full_params(model)], "stats": W.soaa_stats(opt),
                     "devices": sorted(_state_devices(opt))}
    return out


def test_fsdp2_on_a_cuda_mesh_equals_the_plain_cpu_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_soaa.functional.asgo as asgo_functional
    from tests.fsdp2 import _workers as W

    (got,) = run_distributed(_fsdp2_run, 1, tmp_path, backend="nccl", timeout=300)
    # row-sharded matrices are preconditioned on the right (see tests/fsdp2/test_fsdp2.py), which for
    # the wide model is not plain ASGO's own choice: its reference forces that side
    monkeypatch.setattr(asgo_functional, "preconditioned_side", lambda m, n: asgo_functional.RIGHT)
    for name, *_ in W.CASES:
        ref = W.reference(name, range(W.STEPS))
        for a, b in zip(ref["params"], got[name]["params"]):
            torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
        assert got[name]["stats"] == pytest.approx(ref["stats"], rel=1e-8, abs=1e-12), name
        assert got[name]["devices"] == ["cuda"], (name, got[name]["devices"])
