"""Messages of hyperparameters whose allowed range comes from another field."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_soaa import EGN, SOAA


@pytest.mark.parametrize(("build", "kwargs", "message"), [
    ("soaa", {"eta1": 0.8, "eta2": 0.5}, "Invalid eta2=0.5. Must be in [0.8, inf) (the lower bound is eta1=0.8)."),
    ("egn", {"damping_min": 10.0, "damping_max": 1.0},
     "Invalid damping_max=1.0. Must be in [10.0, inf) (the lower bound is damping_min=10.0)."),
    ("egn", {"rho_low": 0.9, "rho_high": 0.5},
     "Invalid rho_high=0.5. Must be in [0.9, 1.0] (the lower bound is rho_low=0.9)."),
])
def test_a_bound_taken_from_another_field_names_that_field(build: str, kwargs: dict, message: str) -> None:
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=re.escape(message)):
        if build == "soaa":
            SOAA(model.parameters(), **kwargs)
        else:
            EGN(model, **kwargs)
