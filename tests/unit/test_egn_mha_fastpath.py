"""EGN evaluates the model with a graph (its capture) and without one (the line search's and ρ's trial
losses, under no_grad). torch's MultiheadAttention fast path, taken only without a graph, computes another
function for a TransformerEncoder with a padding mask (nested tensors, zeros at padded positions): the trial
losses were of another function than the one whose Jacobian was taken (0.41 apart on this model), the line
search backtracked steps that lowered the true loss (0.35 off after 5 steps) and adaptive damping read
ρ < 0 at a good step; with attention trained, the explicit rows (vmap) failed on the fast path's nested
tensors, refused as 'cannot be trained by EGN'. The step runs with the fast path off: the same steps as a
run with it off throughout, and the caller's setting is restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_soaa import EGN

DT = torch.float64
B, T, D, C = 6, 5, 8, 3


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True, dtype=DT)
        self.enc = nn.TransformerEncoder(layer, 2)  # enable_nested_tensor=True, torch's default
        self.head = nn.Linear(D, C, dtype=DT)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x, src_key_padding_mask=mask).mean(dim=1))


def _batch() -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, -2:] = True
    return (torch.randn(B, T, D, generator=g, dtype=DT), mask), torch.randn(B, C, generator=g, dtype=DT)


def _run(train_attention: bool, fastpath: bool, **kw: object) -> torch.Tensor:
    torch.manual_seed(0)
    model = _Encoder()
    if not train_attention:  # fine-tune the feed-forward blocks and the head: no explicit rows
        for name, p in model.named_parameters():
            if "self_attn" in name or "norm" in name:
                p.requires_grad_(False)
    opt = EGN(model, loss="mse", **kw)
    xs, y = _batch()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        for _ in range(5 if not train_attention else 2):
            opt.step(inputs=xs, targets=y)
            assert torch.backends.mha.get_fastpath_enabled() == fastpath  # the caller's setting, restored
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("kw", [dict(line_search=True, lr=1.0), dict(adaptive_damping=True, lr=1.0)],
                         ids=["line_search", "adaptive_damping"])
def test_trial_losses_are_of_the_function_the_jacobian_was_taken_of(kw: dict) -> None:
    assert torch.equal(_run(False, True, **kw), _run(False, False, **kw))


def test_trained_attention_with_a_padding_mask_takes_explicit_rows() -> None:
    got = _run(True, True)
    assert torch.equal(got, _run(True, False))
    torch.manual_seed(0)
    assert not torch.equal(got, torch.cat([p.detach().flatten() for p in _Encoder().parameters()]))


def _fast_path_taken(enc: nn.TransformerEncoder) -> bool:
    """Whether an eval forward (no_grad, padding mask) took torch's fast path: its nested tensors come back
    with zeros at the padded positions, the plain path's outputs there are not zero."""
    (x, mask), _ = _batch()
    with torch.no_grad():
        out = enc(x, src_key_padding_mask=mask)
    return bool((out[:, -2:] == 0).all())


def test_a_step_turns_the_fast_path_off_in_its_own_thread_only() -> None:
    """EGN steps in one thread beside another thread's eval forwards of a TransformerEncoder (a background
    validation or serving thread): the step turned torch's process-wide switch off, and the eval forward that
    built nested tensors with it on ran its layers with it off (torch's AssertionError, 2 of 6,236 forwards);
    two EGN steps in two threads turned it back on in each other's middle. Now the step's own thread has no
    fast path from its start to its end, other threads keep theirs, and the switch is never touched."""
    import threading
    from types import SimpleNamespace

    from lightning_soaa.optim.step_context import one_model_function

    a_inside, b_inside, checked, a_done = (threading.Event() for _ in range(4))
    seen: dict[str, bool] = {}
    torch.manual_seed(0)
    enc = _Encoder().enc.eval()
    owner = SimpleNamespace(model=enc)  # what one_model_function reads of the optimizer

    @one_model_function
    def step_a(self: object) -> None:
        a_inside.set()
        assert checked.wait(10)
        seen["step a, its own forward"] = _fast_path_taken(enc)

    @one_model_function
    def step_b(self: object) -> None:
        b_inside.set()
        assert a_done.wait(10)
        seen["step b, after step a ended"] = _fast_path_taken(enc)

    def run_a() -> None:
        step_a(owner)
        a_done.set()

    assert _fast_path_taken(enc)  # this torch takes it here (the test checks something)
    ta, tb = threading.Thread(target=run_a), threading.Thread(target=step_b, args=(owner,))
    ta.start()
    assert a_inside.wait(10)
    tb.start()
    assert b_inside.wait(10)
    seen["another thread, during the steps"] = _fast_path_taken(enc)
    seen["switch, during the steps"] = torch.backends.mha.get_fastpath_enabled()
    checked.set()
    ta.join(10)
    tb.join(10)
    assert seen == {"another thread, during the steps": True, "switch, during the steps": True,
                    "step a, its own forward": False, "step b, after step a ended": False}
