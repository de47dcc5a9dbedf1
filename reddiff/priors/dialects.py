"""One noise-level protocol for every diffusion and flow model, and the dialects (views) that speak it.

Every model is a denoiser ``D(x, sigma) = E[x0 | x0 + sigma n = x]`` on the variance-exploding axis ``sigma`` in
x0 units; a dialect only scales that state and names the time (``x_e = x0 + sigma n`` is the EDM state):

==============  ===============================  ==========================================  ===============================
dialect          state ``x_tau``                  ``sigma(tau)``                               eps-VP network's time input
==============  ===============================  ==========================================  ===============================
vp_discrete      ``sqrt(a_t) x_e``                ``sqrt((1 - a_t) / a_t)``, t in {0..T-1}      t (continuous inverse off grid)
vp_continuous    ``sqrt(a(t)) x_e``, t in (0, 1]  ``sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``  ``(M - 1) t`` (EDM ``VPPrecond``)
edm              ``x_e``                          ``sigma``                                     as vp_discrete
flow             ``(1 - t) x_e``, t in [0, 1)     ``t / (1 - t)``                               as vp_discrete
==============  ===============================  ==========================================  ===============================

``a = 1 / (1 + sigma^2)`` in both VP views (``sqrt(a) = 1 / sqrt(1 + sigma^2)``), so the VP state is
``sqrt(a) x0 + sqrt(1 - a) n``; the flow state is the linear interpolant ``(1 - t) x0 + t n`` of rectified flow /
OT flow matching (noise at t = 1).  vp_continuous uses beta_min 0.1, beta_d 19.9, M = 1000 (NVlabs/edm
``training/networks.py`` ``VPPrecond``: ``sigma(t)``, ``sigma_inv``, ``c_noise = (M - 1) t``; DAPS ``model/precond.py``).

Conversions (``s`` the dialect's scale, ``x = s x_e``; :func:`eps_from_x0` and the rest below), exact identities:

    eps   = (x_e - D) / sigma                 D = x_e - sigma eps
    score = grad_x log p(x) = -eps / (s sigma)
    v     = dx/dt on the flow state = eps - D,  D = x - t v,  eps = x + (1 - t) v

A network trained on the discrete grid is evaluated at a continuous sigma by its continuous time input: its time
embedding takes a real t, and :meth:`reddiff.core.diffusion.Schedule.t_of_sigma` interpolates the grid in log sigma
(exact integers on the grid).  Only vp_continuous feeds another time input, by design: the official DAPS / PnP-DM
convention for VP checkpoints.
"""
from __future__ import annotations

import torch


def _f64(v, like: torch.Tensor | None = None) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float64)
    return t if like is None else t.to(like.device)


# ------------------------------------------------------------------------------------------ conversions
def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-item ``(B,)`` or scalar coefficient shaped to broadcast against ``x`` (dtype/device of ``x``)."""
    v = torch.as_tensor(v).to(device=x.device, dtype=x.dtype)
    return v if v.ndim == 0 else v.reshape((-1,) + (1,) * (x.ndim - 1))


def eps_from_x0(x_e, x0, sigma):
    return (x_e - x0) / bcast(sigma, x_e)


def x0_from_eps(x_e, eps, sigma):
    return x_e - bcast(sigma, x_e) * eps


def score_from_eps(eps, sigma, scale):
    """``grad_x log p(x)`` on the state ``x = scale * x_e``."""
    return -eps / (bcast(scale, eps) * bcast(sigma, eps))


def eps_from_score(score, sigma, scale):
    return -score * bcast(scale, score) * bcast(sigma, score)


def velocity_from_x0(eps, x0):
    """Flow velocity ``dx/dt`` of the linear interpolant: ``E[n - x0 | x]``."""
    return eps - x0


def x0_from_velocity(x_flow, v, t):
    return x_flow - bcast(t, x_flow) * v


def eps_from_velocity(x_flow, v, t):
    return x_flow + (1 - bcast(t, x_flow)) * v


# ------------------------------------------------------------------------------------------ the dialects
class Dialect:
    """A view of the noise level: ``sigma(tau)``, ``tau(sigma)``, the state ``scale(sigma)`` and the time input of
    an epsilon-VP network at ``sigma`` (float64 tensors in, float64 out)."""

    name = ""

    def sigma(self, tau):  # pragma: no cover - abstract
        raise NotImplementedError

    def tau(self, sigma):  # pragma: no cover - abstract
        raise NotImplementedError

    def scale(self, sigma):  # pragma: no cover - abstract
        raise NotImplementedError

    def network_time(self, sigma, schedule) -> torch.Tensor:
        """The time input of an epsilon network trained on ``schedule``: its own continuous time."""
        return schedule.t_of_sigma(sigma)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class VPDiscrete(Dialect):
    """ADM / DDPM: integer t on the prior's own schedule (the default; every result before dialects)."""

    name = "vp_discrete"

    def __init__(self, schedule=None):
        from reddiff.core.diffusion import Schedule

        self.schedule = schedule or Schedule()

    def sigma(self, tau):
        return self.schedule.sigma_at(tau)

    def tau(self, sigma):
        return self.schedule.t_of_sigma(sigma)

    def scale(self, sigma):
        return 1.0 / torch.sqrt(1.0 + _f64(sigma) ** 2)


class VPContinuous(Dialect):
    """VP-SDE time t in (0, 1] with EDM's ``VPPrecond`` network input ``(M - 1) t``."""

    name = "vp_continuous"

    def __init__(self, beta_min: float = 0.1, beta_d: float = 19.9, M: int = 1000):
        self.beta_min, self.beta_d, self.M = float(beta_min), float(beta_d), int(M)

    def sigma(self, tau):
        t = _f64(tau)
        return torch.sqrt(torch.expm1(0.5 * self.beta_d * t ** 2 + self.beta_min * t))

    def tau(self, sigma):
        s = _f64(sigma)
        return (torch.sqrt(self.beta_min ** 2 + 2 * self.beta_d * torch.log1p(s ** 2)) - self.beta_min) / self.beta_d

    def scale(self, sigma):
        return 1.0 / torch.sqrt(1.0 + _f64(sigma) ** 2)

    def network_time(self, sigma, schedule) -> torch.Tensor:
        return (self.M - 1) * self.tau(sigma)


class EDM(Dialect):
    """Karras et al.: the state is ``x0 + sigma n`` and the time is sigma itself."""

    name = "edm"

    def sigma(self, tau):
        return _f64(tau)

    def tau(self, sigma):
        return _f64(sigma)

    def scale(self, sigma):
        return torch.ones_like(_f64(sigma))


class Flow(Dialect):
    """Rectified flow / OT flow matching: ``x_t = (1 - t) x0 + t n`` (noise at t = 1)."""

    name = "flow"

    def sigma(self, tau):
        t = _f64(tau)
        return t / (1 - t)

    def tau(self, sigma):
        s = _f64(sigma)
        return s / (1 + s)

    def scale(self, sigma):
        return 1.0 / (1.0 + _f64(sigma))


DIALECTS = {cls.name: cls for cls in (VPDiscrete, VPContinuous, EDM, Flow)}


def make_dialect(name: str, schedule=None) -> Dialect:
    """The dialect called ``name`` (one line naming the valid ones otherwise)."""
    if isinstance(name, Dialect):
        return name
    if name not in DIALECTS:
        raise ValueError(f"unknown prior dialect {name!r}; valid: {', '.join(DIALECTS)}")
    return DIALECTS[name](schedule) if name == VPDiscrete.name else DIALECTS[name]()

