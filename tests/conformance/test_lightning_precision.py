"""Lightning's Trainer under ``precision="bf16-mixed"`` and ``"bf16-true"`` with every registered optimizer.

- W = 1 and W = 2 (``strategy="ddp"`` over gloo, each rank its rows of the same global batch): every rank ends
  with the same parameters, bit for bit, and W = 2 equals W = 1 to ``TOL_ULPS`` bfloat16 roundings of each
  parameter's largest magnitude (see :func:`_tolerance`).
- The dtypes the README documents: ``"bf16-mixed"`` keeps the model's float32 parameters and the optimizer's
  state in float32 (autocast casts inside the forward only); ``"bf16-true"`` converts the parameters to bfloat16,
  and the state follows :data:`TRUE_STATE` (SOAA, ShardedAdamW and ASGO/DASGO's Adam moments stay bfloat16 as
  torch's AdamW keeps them, ASGO's matrix statistics float32, EGN's momentum in the parameters' dtype).
- An optimizer that steps from the batch (EGN, ``StepNeeds.BATCH``) under ``"bf16-mixed"`` with automatic
  optimization (``BatchToOptimizer``) is refused on every rank before its first step, naming the precision and what
  to use: its own forwards would not run under the Trainer's autocast. Under manual optimization
  (``opt.step(inputs=x, targets=y)``) it trains, in float32, as above.

The W = 2 fits run inside one pair of processes (Lightning's ``"ddp"`` joins the harness's group), as in
:mod:`tests.conformance.test_lightning_clip`.
"""

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_soaa.registry import OptimizerSpec, StepNeeds, half_mse
from tests.conformance._battery import SIZES, SPECS, data
from tests.harness.distributed import run_distributed
from tests.harness.models import tiny_mlp

pl = pytest.importorskip("lightning.pytorch", reason="the [lightning] extra is not installed")

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(900)]

STEPS = 3
PRECISIONS = ("bf16-mixed", "bf16-true")


class _Module(pl.LightningModule):
    """The battery's model in float32 and its data (rank ``r`` of ``W`` takes its rows of each global batch)."""

    def __init__(self, spec: OptimizerSpec, mode: str) -> None:
        super().__init__()
        self.net = tiny_mlp(0, torch.float32, sizes=SIZES)
        self.spec = spec
        self.automatic_optimization = mode == "auto"

    def configure_optimizers(self) -> Any:
        self.opt = self.spec.build(self.net, **self.spec.test_kwargs)
        return self.opt

    def train_dataloader(self) -> Any:
        steps = [tuple(v.float() for v in data(t, rank=self.trainer.global_rank, world=self.trainer.world_size))
                 for t in range(STEPS)]
        return torch.utils.data.DataLoader(steps, batch_size=None)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        if self.automatic_optimization:
            return half_mse(self.net(x), y)
        self.optimizers().step(inputs=x, targets=y)  # (manual: the batch optimizer's step, no backward)
        return None


def _fit(spec: OptimizerSpec, precision: str, mode: str, out: Path, world: int = 1) -> dict[str, Any] | str:
    """The parameters (float64 copies), their dtypes and the state's dtypes after ``STEPS`` steps, or the error."""
    from lightning_soaa.lightning import BatchToOptimizer, LossToOptimizer

    module = _Module(spec, mode)
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
                         max_steps=STEPS, precision=precision, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         use_distributed_sampler=False,
                         callbacks=[LossToOptimizer(), BatchToOptimizer()] if mode == "auto" else [],
                         default_root_dir=str(out))
    before = [p.detach().clone() for p in module.net.parameters()]
    try:
        trainer.fit(module)
    except Exception as e:
        changed = any(not torch.equal(a, b.to(a.dtype)) for a, b in zip(before, module.net.parameters()))
        return f"{type(e).__name__}: {e}" + (" [and the parameters changed]" if changed else "")
    state = sorted({f"{k}:{v.dtype}" for s in module.opt.state.values() for k, v in s.items()
                    if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0})
    return {"params": [p.detach().double() for p in module.net.parameters()],
            "param_dtypes": sorted({str(p.dtype) for p in module.net.parameters()}), "state": state,
            "steps": module.opt.num_steps}


#: ``"bf16-true"``: each state tensor's dtype by its key (a key in two dtypes: ASGO/DASGO's matrix blocks and their
#: Adam-stepped vectors both keep an ``exp_avg``); ``"bf16-mixed"``: every one float32
TRUE_STATE = {
    "SOAA": {"exp_avg:torch.bfloat16", "exp_avg_sq:torch.bfloat16"},
    "EGN": {"momentum_buffer:torch.bfloat16"},
    "ASGO": {"exp_avg:torch.bfloat16", "exp_avg_sq:torch.bfloat16", "exp_avg:torch.float32", "gram:torch.float32",
             "gram_at_root:torch.float32", "inv_root:torch.float32"},
    "DASGO": {"exp_avg:torch.bfloat16", "exp_avg_sq:torch.bfloat16", "exp_avg:torch.float32",
              "col_stat:torch.float32"},
    "AdamW": {"exp_avg:torch.bfloat16", "exp_avg_sq:torch.bfloat16"},
}
#: the W = 2 run against the W = 1 run, in bfloat16 roundings of each parameter (see _tolerance)
TOL_ULPS = 2
#: an optimizer that steps from the batch (EGN) runs its own forwards, outside the Trainer's autocast: refused under
#: automatic optimization (BatchToOptimizer); under manual optimization it steps on the batch handed to ``step``,
#: in the parameters' dtype (the README's advice for EGN under "16-mixed")
REFUSED = [(s, p, "auto") for s in SPECS for p in PRECISIONS if s.needs is StepNeeds.BATCH and p.endswith("-mixed")]
TRAINED = [*((s, p, "auto") for s in SPECS for p in PRECISIONS if (s, p, "auto") not in REFUSED),
           *((s, p, "manual") for s, p, _ in REFUSED)]
CASES = [*TRAINED, *REFUSED]


def _launch(rank: int, world: int, out: Path) -> dict[tuple[str, str, str], Any]:
    """Every optimizer and precision in turn, in this pair of processes (Lightning's ``"ddp"`` joins the group)."""
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))
    return {(s.name, p, m): _fit(s, p, m, out / f"{s.name}-{p}-{m}", world) for s, p, m in CASES}


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[tuple[str, str, str], Any]]]:
    """Per world size, each rank's results."""
    tmp = tmp_path_factory.mktemp("lightning_precision")
    one = {(s.name, p, m): _fit(s, p, m, tmp / f"{s.name}-{p}-{m}") for s, p, m in CASES}
    return {1: [one], 2: run_distributed(_launch, 2, tmp, tmp / "W2", timeout=600.0)}


def _tolerance(p: torch.Tensor) -> float:
    """``TOL_ULPS`` bfloat16 spacings at the largest magnitude in ``p``. The W = 2 step takes each rank's half of
    the batch and DDP's average, W = 1 the whole batch at once; bfloat16 rounds the two differently (its products
    under autocast, everything under "bf16-true"), by about one spacing of the gradient's largest entries, and the
    parameter that rounds to the other side of a bfloat16 value (under "bf16-true") carries that spacing on.
    Measured over the 3 steps: at most 1.0 spacing (ASGO, "bf16-true"), 0.07-0.5 elsewhere (EGN 0: its step
    runs in float32 on the gathered batch); each rank stepping on the same half of the batch instead is off by
    tens of spacings."""
    return TOL_ULPS * 2.0 ** (int(torch.frexp(p.abs().max()).exponent) - 8)


@pytest.mark.parametrize("spec,precision,mode", TRAINED, ids=[f"{s.name}-{p}-{m}" for s, p, m in TRAINED])
def test_lightning_bf16_trains_alike_on_every_rank_and_world(
        spec: OptimizerSpec, precision: str, mode: str, fits: dict[int, list[dict[tuple[str, str, str], Any]]]) -> None:
    assert spec.name in TRUE_STATE, f"{spec.name}: add its bf16-true state dtypes to TRUE_STATE (and the README)"
    want_params = "torch.float32" if precision == "bf16-mixed" else "torch.bfloat16"
    want_state = ({k.split(":")[0] + ":torch.float32" for k in TRUE_STATE[spec.name]} if precision == "bf16-mixed"
                  else TRUE_STATE[spec.name])
    one = fits[1][0][(spec.name, precision, mode)]
    runs = [one, *(r[(spec.name, precision, mode)] for r in fits[2])]
    for i, res in enumerate(runs):
        where = "W = 1" if i == 0 else f"W = 2 rank {i - 1}"
        assert not isinstance(res, str), f"{where} raised {res}"
        assert res["steps"] == STEPS, (where, res["steps"])
        assert res["param_dtypes"] == [want_params], (where, res["param_dtypes"])
        # sharded at W = 2: a rank holds some of the keys; all of them together, and none other
        assert set(res["state"]) <= want_state, (where, res["state"])
        assert all(torch.isfinite(p).all() for p in res["params"]), where
    assert set(one["state"]) == want_state, one["state"]
    assert set(runs[1]["state"]) | set(runs[2]["state"]) == want_state
    for a, b in zip(runs[1]["params"], runs[2]["params"]):
        assert torch.equal(a, b), "the ranks' parameters differ"
    for a, b in zip(runs[1]["params"], one["params"]):
        off = float((a - b).abs().max()) / _tolerance(b)
        assert off <= 1, f"W = 2 off W = 1 by {off * TOL_ULPS:.2f} bf16 spacings"


@pytest.mark.parametrize("spec,precision,mode", REFUSED, ids=[f"{s.name}-{p}-{m}" for s, p, m in REFUSED])
def test_a_batch_optimizer_under_bf16_mixed_is_refused_on_every_rank(
        spec: OptimizerSpec, precision: str, mode: str, fits: dict[int, list[dict[tuple[str, str, str], Any]]]) -> None:
    """EGN's own forwards do not run under the Trainer's autocast: refused before the first step, on every rank,
    naming the precision and the ones to use."""
    for world, ranks in fits.items():
        for rank, res in enumerate(r[(spec.name, precision, mode)] for r in ranks):
            assert isinstance(res, str) and res.startswith("ValueError: "), (world, rank, res)
            assert f"precision={precision!r}" in res and "use '32-true', '64-true' or 'bf16-true'" in res, \
                (world, rank, res)
            assert not res.endswith("changed]"), (world, rank, res)
