"""``agreement.param_digest``, the replicas' check under ``grad_reduction="mean"``: every bit of every
parameter counts, a complex one's imaginary part and a conjugate view's included; and the naming of the
hyperparameter that differs across ranks."""

from __future__ import annotations

import pytest
import torch

from lightning_soaa.distributed.agreement import first_group_difference, group_values, param_digest


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_parameters_differing_in_one_part_digest_apart(dtype: torch.dtype) -> None:
    base = torch.full((3,), 0.3 + 0.1j, dtype=dtype)  # |real| < 1: an int64 cast made every such value 0
    assert param_digest([base]) != param_digest([base + 0.25j])
    assert param_digest([base]) != param_digest([base + 0.25])


def test_a_conjugate_view_digests_as_its_values() -> None:
    c = torch.randn(4, 3, dtype=torch.complex128)
    view = c.conj()  # keeps the conjugate bit: view_as_real refuses it unresolved (found by the reviewer)
    assert view.is_conj()
    assert param_digest([view]) == param_digest([view.resolve_conj()])
    assert param_digest([view]) != param_digest([c])


def test_changes_a_plain_sum_of_the_bits_cancels_are_seen() -> None:
    """Sign flips of an even number of float64 elements (each moves the bit sum by 2^63) and values swapped
    between positions (a square matrix against its transpose) leave a plain sum unchanged."""
    w = torch.randn(4, 4, dtype=torch.float64)
    flipped = w.clone()
    flipped[0, :2] = -flipped[0, :2]
    assert param_digest([w]) != param_digest([flipped])
    assert param_digest([w]) != param_digest([w.T.contiguous()])
    assert param_digest([w]) == param_digest([w.clone()])  # and equal values digest alike


def test_the_digest_does_not_depend_on_the_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_soaa.distributed import agreement

    ps = [torch.randn(1000, dtype=torch.float32), torch.randn(7, 5, dtype=torch.bfloat16)]
    whole = param_digest(ps)
    monkeypatch.setattr(agreement, "_DIGEST_CHUNK", 64)
    assert param_digest(ps) == whole


def test_the_hyperparameter_that_differs_is_named():
    """The error for hyperparameters that differ across ranks names the first differing value (by group,
    then key), with both ranks' values: a key one rank lacks, a group count, a tensor value."""
    base = [{"params": [0], "lr": 0.1, "eps": 1e-8}, {"params": [1], "lr": 0.2, "eps": 1e-8}]
    other = [{"params": [0], "lr": 0.1, "eps": 1e-8}, {"params": [1], "lr": 0.2, "eps": 1e-7}]
    texts = [group_values(base), group_values(other)]
    assert first_group_difference(texts, [1]) == ": param_groups[1]['eps'] is 1e-08 on rank 0, 1e-07 on rank 1"
    noted = [dict(base[0], note="x"), base[1]]
    assert first_group_difference([group_values(base), group_values(noted)], [1]) == \
        ": param_groups[0]['note'] is (absent) on rank 0, 'x' on rank 1"
    assert first_group_difference([group_values(base), group_values(base[:1])], [1]) == \
        ": rank 0 has 2 param groups, rank 1 has 1"
    assert first_group_difference([group_values(base), group_values(base)], [1]) == ""
    assert group_values([{"lr": torch.tensor(0.5)}]) == [{"lr": "tensor(0.5)"}]
