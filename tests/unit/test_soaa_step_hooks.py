"""SOAA's ``step`` wrapper (optim/step_hooks.py) hands a pre hook's returned ``(args, kwargs)`` to the step, as
torch's ``Optimizer.profile_hook_step`` does: here SOAA's own ``loss=`` keyword, trained bit-equal to stepping
with the replaced loss. What every registered optimizer's wrapper guarantees (hooks once in torch's order, the
profiler's labels, no profiler op outside a profiler, subclasses) is in tests/conformance/test_step_wrapper.py."""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from lightning_soaa import SOAA
from tests.harness.models import batch, loss_fn, tiny_mlp


def _loss(opt: SOAA, model: torch.nn.Module, step: int) -> torch.Tensor:
    x, y = batch(step, 0)
    opt.zero_grad()
    loss = loss_fn(model, x, y)
    loss.backward()
    return loss.detach()


def test_hooks_run_in_torchs_order_and_a_pre_hook_replaces_the_arguments() -> None:
    models = [tiny_mlp(0), tiny_mlp(0)]
    opts = [SOAA(m.parameters(), lr=1e-2) for m in models]
    calls: list[str] = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post"))]
    try:
        opts[0].register_step_pre_hook(lambda o, a, k: calls.append("pre"))
        opts[0].register_step_post_hook(lambda o, a, k: calls.append(f"post {sorted(k)}"))
        # a pre hook's (args, kwargs) replace the step's: here the loss it is handed
        opts[0].register_step_pre_hook(lambda o, a, k: (a, {"loss": k["loss"] * 2.0}))
        for s in range(3):
            loss = _loss(opts[0], models[0], s)
            opts[0].step(loss=loss)
            _loss(opts[1], models[1], s)
            opts[1].step(loss=loss * 2.0)
    finally:
        for h in handles:
            h.remove()
    assert calls[:4] == ["global pre", "pre", "post ['loss']", "global post"]
    assert calls.count("pre") == 3 and calls.count("global pre") == 6  # (the second optimizer's too)
    assert opts[0].trust_state() == opts[1].trust_state()
    assert all(torch.equal(a, b) for a, b in zip(*(m.parameters() for m in models)))
