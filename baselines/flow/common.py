"""Flow-view pieces shared by the flow solvers (velocity, the prior's time limits, the data term).

Every prior is a denoiser ``D(x_e, sigma)``; on the linear interpolant ``x_t = (1 - t) x0 + t n`` (noise at
``t = 1``) the state is ``x_e = x_t / (1 - t)`` at ``sigma = t / (1 - t)``, and the velocity is ``v = eps - D``
with ``eps = (x_t - (1 - t) D) / t`` (:mod:`reddiff.priors.dialects`).  One call of :func:`velocity` is one
``prior.denoise`` call: one NFE on the prior's counter, differentiable when the caller enables gradients.
The official code of D-Flow and Flow-Priors (PnP-Flow) runs its time the other way (noise at ``s = 0``, data at
``s = 1``): there ``s = 1 - t`` and the velocity is ``-v``.
"""
from __future__ import annotations

import torch


def velocity(prior, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, D)`` at the flow state ``x`` and time ``t`` in (0, 1): one network evaluation."""
    t = float(t)
    if not 0.0 < t < 1.0:
        raise ValueError(f"flow time must be in (0, 1), got {t}")
    D = prior.denoise(x / (1.0 - t), t / (1.0 - t))
    eps = (x - (1.0 - t) * D) / t
    return eps - D, D


def max_time(prior) -> float:
    """The largest flow time the prior answers for: ``t = sigma_max / (1 + sigma_max)`` with ``sigma_max`` the end
    of its schedule's grid (``Schedule.sigmas[-1]``, about 157 for the DDPM schedule: t = 0.99368).  An epsilon
    network's time input is clamped there, so a larger sigma would feed it a state it was not trained on."""
    s = float(prior.schedule.sigmas[-1])
    return s / (1.0 + s)


def min_time(prior) -> float:
    """The smallest flow time queried: ``sigma_min / (1 + sigma_min)`` with ``sigma_min = Schedule.sigmas[0]``
    (0.0099 on the DDPM schedule); at ``t = 0`` the velocity ``(x - D) / t`` is not defined for a denoiser."""
    s = float(prior.schedule.sigmas[0])
    return s / (1.0 + s)


def data_loss(x: torch.Tensor, y: torch.Tensor, operator, reduce: str = "sum") -> torch.Tensor:
    """Per-item ``||H(x) - y||^2`` (``reduce="sum"``) or its mean over the measurement's elements (``"mean"``),
    shape ``(B,)``; differentiable, so nonlinear operators work."""
    r = (operator.forward(x) - y).reshape(x.shape[0], -1).square()
    return r.sum(1) if reduce == "sum" else r.mean(1)


def data_grad(x: torch.Tensor, y: torch.Tensor, operator, reduce: str = "sum") -> torch.Tensor:
    """``grad_x`` of :func:`data_loss` per item (no network involved)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(data_loss(xg, y, operator, reduce).sum(), xg)
    return g


def per_item(name: str, v, B: int, like: torch.Tensor) -> torch.Tensor:
    """A float or one value per batch item, finite and >= 0, shaped to broadcast against ``like``."""
    vals = [float(u) for u in (v if isinstance(v, (list, tuple)) else [v])]
    if len(vals) not in (1, B):
        raise ValueError(f"{name}: {len(vals)} per-item values for a batch of {B}")
    t = torch.tensor(vals, dtype=like.dtype, device=like.device)
    return t.reshape((-1,) + (1,) * (like.ndim - 1)) if len(vals) > 1 else t.reshape(())


def check_value(sampler: str, name: str, v, low: float = 0.0, allow_list: bool = True):
    """Validate a hyperparameter (a float, or a list of them where ``allow_list``): finite and >= ``low``."""
    vals = list(v) if (allow_list and isinstance(v, (list, tuple))) else [v]
    try:
        ok = all(float(u) == float(u) and abs(float(u)) != float("inf") and float(u) >= low for u in vals)
    except (TypeError, ValueError):
        ok = False
    if not ok or isinstance(v, bool):
        raise ValueError(f"{sampler}: {name} must be a finite number >= {low}, got {v!r}")
    return [float(u) for u in vals] if isinstance(v, (list, tuple)) else float(v)
