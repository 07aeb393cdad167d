"""SOAA the optimizer against an independent float64 transcription of spec/algorithms.md §1.3, over many
steps: moments, the Fisher cap, the lagged ρ, the band (both ``band_schedule`` values) and d; also the
denoised ρ (``rho_smoothing``: a ratio of discounted sums) and the trust-region warm-up (``trust_warmup``).

The oracle below shares no code with the package: it keeps one flat float64 vector per quantity, writes
the band of each schedule out from its definition, and trains its own copy of the model. The optimizer
must follow it to 1e-10 (parameters and the trust-region scalars at every step).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lightning_soaa import SOAA
from tests.harness.models import batch, loss_fn, tiny_mlp

B1, B2, EPS = 0.9, 0.95, 1e-8
KW = dict(lr=0.05, gamma=0.3, total_steps=10, weight_decay=0.01)
STEPS = 16  # past T = 10, so the "paper" band's clamp is exercised
SCALE = 8.0  # loss scale: large enough that the Fisher branch of the cap binds for some coordinates


def _oracle_band(t: int, gamma: float, total: int, schedule: str) -> tuple[float, float]:
    if schedule == "final":
        return 1.0 - gamma, 1.0 + gamma
    f = min(t - 1, total) / total  # spec §1.3 step 10; the final band [1-γ, 1+γ] from t = T + 1 on
    return (1.0 - gamma) ** f, 1.0 + gamma**f


class _Oracle:
    """§1.3 steps 1-11 on the concatenation of all parameters, float64."""

    def __init__(self, model: torch.nn.Module, schedule: str, smoothing: float = 0.0, warmup: int = 0) -> None:
        self.model, self.schedule, self.smoothing, self.warmup = model, schedule, smoothing, warmup
        self.actuals: list[float] = []  # every step's ℓ̂_t - ℓ_t and p_{t-1}, for the smoothed ratio
        self.preds: list[float] = []
        n = sum(p.numel() for p in model.parameters())
        self.m = torch.zeros(n, dtype=torch.float64)
        self.v = torch.zeros(n, dtype=torch.float64)
        self.loss_ema, self.d, self.p, self.t = 0.0, 1.0, 0.0, 0
        self.capped = 0  # coordinates that took the Fisher branch, over all steps

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        params = list(self.model.parameters())
        self.model.zero_grad()
        loss = SCALE * loss_fn(self.model, x, y)
        loss.backward()
        ell = float(loss.detach())
        g = torch.cat([p.grad.reshape(-1) for p in params])
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        self.t += 1
        t, lr, wd, gamma = self.t, KW["lr"], KW["weight_decay"], KW["gamma"]
        self.m = B1 * self.m + (1 - B1) * g
        self.v = B2 * self.v + (1 - B2) * g * g
        mh, vh = self.m / (1 - B1**t), self.v / (1 - B2**t)
        c = 1.0 + float((mh * mh).sum()) / float((vh + EPS).sum())
        fisher = c * vh
        r = torch.maximum(self.d * fisher, vh.sqrt())
        self.capped += int((self.d * fisher > vh.sqrt()).sum())
        u = self.d * mh / (r + EPS)
        theta = theta - lr * wd * theta - lr * u
        self.loss_ema = B1 * self.loss_ema + (1 - B1) * ell
        ell_hat = self.loss_ema / (1 - B1**t)
        rho = (ell_hat - ell) / max(self.p, EPS)
        if self.smoothing > 0.0:  # written out as explicit weighted sums, not as the package's recursion
            self.actuals.append(ell_hat - ell)
            self.preds.append(self.p)
            w = [self.smoothing ** (t - k) for k in range(1, t + 1)]
            num = sum(wk * a for wk, a in zip(w, self.actuals))
            den = sum(wk * q for wk, q in zip(w, self.preds))
            rho = num / max(den, EPS)
        lo, hi = _oracle_band(t, gamma, KW["total_steps"], self.schedule)
        self.d = 1.0 if t <= self.warmup else min(max(rho * self.d, lo), hi)
        self.p = lr * (float((mh * u).sum()) - 0.5 * float((vh * u * u).sum()))
        with torch.no_grad():
            offset = 0
            for p in params:
                p.copy_(theta[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        return {"d": self.d, "rho": rho, "fisher_scale": c, "band_lo": lo, "band_hi": hi}


def _run_soaa(model: torch.nn.Module, schedule: str, foreach: bool, **extra: float) -> list[dict[str, float]]:
    opt = SOAA(model.parameters(), betas=(B1, B2), eps=EPS, band_schedule=schedule, foreach=foreach,
               compile=False, **KW, **extra)
    out = []
    for s in range(STEPS):
        x, y = batch(s, 0)
        opt.zero_grad()
        loss = SCALE * loss_fn(model, x, y)
        loss.backward()
        opt.step(loss=loss)
        st = opt.statistics()
        out.append({k: st[k] for k in ("d", "rho", "fisher_scale", "band_lo", "band_hi")} | {
            "params": [p.detach().clone() for p in model.parameters()]})
    return out


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("schedule,smoothing,warmup", [("final", 0.0, 0), ("paper", 0.0, 0), ("final", 0.8, 0),
                                                       ("final", 0.8, 4), ("paper", 0.5, 3)])
def test_soaa_follows_the_float64_oracle(schedule: str, smoothing: float, warmup: int, foreach: bool) -> None:
    model = tiny_mlp(5)
    oracle = _Oracle(copy.deepcopy(model), schedule, smoothing, warmup)
    got = _run_soaa(model, schedule, foreach, rho_smoothing=smoothing, trust_warmup=warmup)
    ds = []
    for s, row in enumerate(got):
        x, y = batch(s, 0)
        ref = oracle.step(x, y)
        for key in ("d", "fisher_scale", "band_lo", "band_hi"):
            assert math.isclose(row[key], ref[key], rel_tol=1e-10, abs_tol=1e-12), (s, key, row[key], ref[key])
        assert math.isclose(row["rho"], ref["rho"], rel_tol=1e-8, abs_tol=1e-10), (s, row["rho"], ref["rho"])
        for a, b in zip(row["params"], oracle.model.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)
        ds.append(ref["d"])
    # the check is not vacuous: both branches of the cap ran, and d moved (it visits both band edges)
    assert 0 < oracle.capped < STEPS * sum(p.numel() for p in model.parameters())
    assert len({round(d, 12) for d in ds}) >= 2
    if warmup:  # d = 1 exactly through the warm-up, and the rule takes over right after it
        assert all(d == 1.0 for d in ds[:warmup]) and ds[warmup] != 1.0


def test_smoothing_and_warmup_change_the_trajectory() -> None:
    """The new options are not no-ops on the oracle's problem: each moves d and the parameters."""
    base = _run_soaa(tiny_mlp(5), "final", False)
    for extra in (dict(rho_smoothing=0.8), dict(trust_warmup=4)):
        other = _run_soaa(tiny_mlp(5), "final", False, **extra)
        assert [r["d"] for r in other] != [r["d"] for r in base], extra
        assert max((p - q).abs().max().item() for p, q in zip(base[-1]["params"], other[-1]["params"])) > 1e-6


def test_the_band_schedules_differ_where_the_spec_says() -> None:
    """"paper" starts at [1, 2] and narrows to the final band; "final" is the final band from step 1."""
    a, b = _run_soaa(tiny_mlp(5), "final", False), _run_soaa(tiny_mlp(5), "paper", False)
    g = KW["gamma"]
    assert all((r["band_lo"], r["band_hi"]) == (1 - g, 1 + g) for r in a)
    assert (b[0]["band_lo"], b[0]["band_hi"]) == (1.0, 2.0)
    T = KW["total_steps"]
    assert b[T - 1]["band_lo"] == pytest.approx((1 - g) ** 0.9) and b[T - 1]["band_hi"] == pytest.approx(1 + g**0.9)
    assert all((r["band_lo"], r["band_hi"]) == (1 - g, 1 + g) for r in b[T:])  # the final band from t = T + 1
    assert max((p - q).abs().max().item() for p, q in zip(a[-1]["params"], b[-1]["params"])) > 1e-4
