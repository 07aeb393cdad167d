"""BatchNorm's running statistics under EGN (README, "Using the optimizers": EGN and BatchNorm).

EGN's forwards run the model in eval mode (the flags restored after), so they never move a BatchNorm's running
statistics: a model trained only through ``opt.step(inputs=x, targets=y)`` keeps the ones it started with, and
its eval-mode outputs use them. The README says so and names two cures, checked here: a training-mode forward of
each batch (as Lightning's ``training_step`` runs), or ``torch.optim.swa_utils.update_bn`` after training.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_soaa import EGN

DT = torch.float64
STEPS, B = 3, 16


def _bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8, dtype=DT), nn.BatchNorm1d(8, dtype=DT), nn.Tanh(), nn.Linear(8, 2, dtype=DT))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(2.0 + torch.randn(B, 4, generator=g, dtype=DT), torch.randn(B, 2, generator=g, dtype=DT))
            for _ in range(STEPS)]


@pytest.mark.parametrize("path", ["plan", "closure"])
def test_egn_steps_alone_keep_the_starting_running_stats(path: str) -> None:
    """Both of EGN's step paths (the one-process plan of ``step(inputs, targets)``, and the template, taken with
    a closure that runs no forward): the weights move, the running statistics and the count do not."""
    model = _bn_model()
    bn = model[1]
    start = [t.clone() for t in (bn.running_mean, bn.running_var)]
    w0 = model[0].weight.detach().clone()
    opt = EGN(model, loss="mse", lr=0.5, damping=1.0)
    for x, y in _batches():
        if path == "plan":
            opt.step(inputs=x, targets=y)
        else:
            opt.step(lambda: None, inputs=x, targets=y)
    assert model.training and bn.training  # the flags restored
    assert not torch.equal(model[0].weight, w0)  # it trained
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, start[0]) and torch.equal(bn.running_var, start[1])


def test_a_training_forward_of_each_batch_updates_them() -> None:
    model = _bn_model()
    opt = EGN(model, loss="mse", lr=0.5, damping=1.0)
    for x, y in _batches():
        with torch.no_grad():
            model(x)  # training mode: BatchNorm takes this batch's statistics
        opt.step(inputs=x, targets=y)
    assert int(model[1].num_batches_tracked) == STEPS
    assert float(model[1].running_mean.abs().max()) > 0.05


def test_update_bn_after_training_sets_them_from_the_data() -> None:
    model = _bn_model()
    batches = _batches()
    opt = EGN(model, loss="mse", lr=0.5, damping=1.0)
    for x, y in batches:
        opt.step(inputs=x, targets=y)
    torch.optim.swa_utils.update_bn(batches, model)  # takes each batch's first element as the input
    bn = model[1]
    with torch.no_grad():
        h = model[0](torch.cat([x for x, _ in batches]))
    assert int(bn.num_batches_tracked) == STEPS
    torch.testing.assert_close(bn.running_mean, h.mean(0), rtol=1e-12, atol=1e-12)  # equal batches: their mean
