"""Independent float64 oracles for EGN tests: explicit J via torch.func, Q and r via autograd of ℓ."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap


def per_sample_loss(loss: str, z: Tensor, y: Tensor) -> Tensor:
    """ℓ(y, z) for ONE sample, written independently of lightning_soaa."""
    if loss == "mse":
        return 0.5 * ((y - z) ** 2).sum()
    if loss == "cross_entropy":
        return torch.logsumexp(z, 0) - z[y.long()]
    if loss == "bce":
        return (torch.clamp(z, min=0) - z * y + torch.log1p(torch.exp(-z.abs()))).sum()
    raise ValueError(loss)


def full_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """[b·c, n] with rows (i, k) sample-major and columns in named_parameters order (trainable only)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    b = x.shape[0]
    c = jac[next(iter(params))].shape[1]
    return torch.cat([jac[n].reshape(b * c, -1) for n in params], dim=1)


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def assert_steps_by(opt: torch.optim.Optimizer, model: nn.Module, x: Tensor, y: Tensor, ref: Tensor) -> None:
    """One EGN step on ``(x, y)`` moves ``model``'s parameters by ``ref`` (the oracle's direction)."""
    w0 = flat_params(model)
    opt.step(inputs=x, targets=y)  # type: ignore[call-arg]
    torch.testing.assert_close(flat_params(model) - w0, ref, rtol=1e-9, atol=1e-12)


def direct_direction(model: nn.Module, x: Tensor, y: Tensor, loss: str, damping: float) -> dict[str, Tensor]:
    """d = (JᵀQJ + bλI)⁻¹ Jᵀ r in parameter space, plus the pieces (eval mode is the caller's job)."""
    with torch.no_grad():
        z = model(x)
    b, c = z.shape
    jmat = full_jacobian(model, x)
    r = torch.stack([-grad(lambda zi: per_sample_loss(loss, zi, y[i]))(z[i]) for i in range(b)]).reshape(-1)
    q = torch.block_diag(*[hessian(lambda zi: per_sample_loss(loss, zi, y[i]))(z[i]) for i in range(b)])
    n = jmat.shape[1]
    h = jmat.T @ q @ jmat + b * damping * torch.eye(n, dtype=jmat.dtype)
    d = torch.linalg.solve(h, jmat.T @ r)
    g = -(jmat.T @ r) / b
    return {"d": d, "J": jmat, "Q": q, "r": r, "g": g, "z": z}


def mean_loss(model: nn.Module, x: Tensor, y: Tensor, loss: str) -> float:
    with torch.no_grad():
        z = model(x)
        return float(torch.stack([per_sample_loss(loss, z[i], y[i]) for i in range(z.shape[0])]).mean())
