"""DPS: diffusion posterior sampling (Chung, Kim, Mccann, Klasky, Ye, ICLR 2023).

Ancestral sampling (DDIM form with ``eta``; ``eta = 1`` is DDPM on the strided schedule), with a gradient step on
the measurement residual after each denoising step, as in the RED-diff repository's ``algos/dps.py``:

    x0_hat = (x_t - sqrt(1 - a_t) eps(x_t, t)) / sqrt(a_t)
    x_s    = sqrt(a_s) x0_hat + c1 z + c2 eps - zeta / ||y - H(x0_hat)|| * grad_{x_t} ||y - H(x0_hat)||^2

with ``c1 = eta sqrt((1 - a_t/a_s)(1 - a_s)/(1 - a_t))`` and ``c2 = sqrt(1 - a_s - c1^2)``.  The norm is per image,
and the gradient flows through the network (and the operator) with respect to ``x_t``, so only ``forward`` is
needed: nonlinear operators work.

Scale convention: this is the DPS paper's ``zeta_t = zeta' / ||y - A(x0_hat)||`` times the gradient of the
*squared* norm (RED-diff code).  The DPS authors' code steps along the gradient of the (unsquared) norm times
``zeta'``, i.e. twice smaller: their ``zeta'`` corresponds to ``zeta = zeta' / 2`` here.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from reddiff.diffusion import ddim_coefficients, timesteps
from reddiff.samplers.base import Sampler, bcast


class DPS(Sampler):
    """DPS sampler.

    Args:
        steps: denoising steps = network evaluations (1..T); every (T/steps)-th timestep.
        zeta: step size ``zeta'`` (float, or one value per batch item). ANCHORS: 1.0 for sr4, 0.1 for
            inpainting, HDR 0.1, phase retrieval 0.4, nonlinear deblur 0.05, Gaussian deblur 2.0.
        eta: DDIM stochasticity (1.0 = ancestral DDPM, the DPS setting).
        clip_x0: clamp ``x0_hat`` to [-1, 1] in the denoising step (images); the gradient is unaffected.
        log_every: callback every ``log_every`` steps and at the last one.
    """

    name = "dps"
    requires: tuple = ()

    def __init__(self, steps: int = 100, zeta=1.0, eta: float = 1.0, clip_x0: bool = False, log_every: int = 10):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"dps: steps must be an integer in [1, T], got {steps!r}")
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"dps: eta must be in [0, 1], got {eta}")
        zs = list(zeta) if not isinstance(zeta, (int, float)) else [zeta]
        if any(not (math.isfinite(float(z)) and float(z) >= 0) for z in zs):
            raise ValueError(f"dps: zeta must be finite and >= 0, got {zeta}")
        self.steps = steps
        self.zeta = float(zeta) if isinstance(zeta, (int, float)) else [float(z) for z in zs]
        self.eta = float(eta)
        self.clip_x0 = bool(clip_x0)
        self.log_every = max(1, int(log_every))

    def sample(self, y: torch.Tensor, operator, prior, rng, callback: Optional[Callable] = None) -> torch.Tensor:
        self.check(operator)
        sch = prior.schedule
        ts = timesteps(self.steps, "descending", T=sch.T)
        B = y.shape[0]
        shape = (B,) + tuple(prior.shape)
        x = rng.randn(shape, dtype=y.dtype).to(y.device)
        if isinstance(self.zeta, list) and len(self.zeta) != B:
            raise ValueError(f"dps: per-item zeta has {len(self.zeta)} values for a batch of {B}")
        zeta = bcast(torch.as_tensor(self.zeta, dtype=torch.float64), x)

        # per-step constants (python floats from the float64 schedule)
        consts = [(math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(a_s), c1, c2)
                  for a_t, a_s, c1, c2 in ddim_coefficients(sch, ts, self.eta)]

        last = len(ts) - 1
        for i, t in enumerate(ts):
            sa, s1a, sa_s, c1, c2 = consts[i]
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                eps = prior.eps(xg, t)
                x0 = (xg - s1a * eps) / sa
                res = (y - operator.forward(x0)).reshape(B, -1)
                sq = res.square().sum(1)                         # (B,) per-image squared norms
                (grad,) = torch.autograd.grad(sq.sum(), xg)
            norm = sq.detach().sqrt()
            step = zeta / bcast(norm.clamp_min(1e-20), x)         # zeta / ||y - H(x0_hat)||, per image
            x0d = x0.detach()
            if self.clip_x0:
                x0d = x0d.clamp(-1.0, 1.0)
            x_new = sa_s * x0d + c2 * eps.detach() - step * grad
            if c1 > 0:
                x_new = x_new + c1 * rng.randn(shape, dtype=x.dtype).to(x.device)
            if callback is not None and (i % self.log_every == 0 or i == last):
                callback(i, {"t": t, "residual_norm": norm, "x0": x0d})
            x = x_new
        return x.detach()
