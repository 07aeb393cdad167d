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


def test_a_step_in_another_thread_keeps_the_fast_path_off_until_it_ends() -> None:
    """Two EGN steps in two threads (two models trained concurrently): the one that ended first turned the
    process-wide flag back on in the middle of the other, whose explicit rows then failed under vmap (2 of
    4 runs of 300 steps) or whose trial losses were of another function."""
    import threading

    from lightning_soaa.optim.step_context import one_model_function

    a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    @one_model_function
    def step_a() -> None:
        a_inside.set()
        assert b_inside.wait(10)

    @one_model_function
    def step_b() -> None:
        b_inside.set()
        assert a_done.wait(10)
        seen.append(torch.backends.mha.get_fastpath_enabled())  # after step_a ended, before step_b ends

    def run_a() -> None:
        step_a()
        a_done.set()

    assert torch.backends.mha.get_fastpath_enabled()
    ta = threading.Thread(target=run_a)
    ta.start()
    assert a_inside.wait(10)
    tb = threading.Thread(target=step_b)
    tb.start()
    ta.join(10)
    tb.join(10)
    assert seen == [False]
    assert torch.backends.mha.get_fastpath_enabled()  # the caller's setting, restored by the last step out
