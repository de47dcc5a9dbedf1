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

import torch

from reddiff.samplers.base import DDIMFamily, bcast, validate_steps


class DPS(DDIMFamily):
    """DPS sampler.

    Args:
        steps: denoising steps = network evaluations (1..T); every (T/steps)-th timestep.
        zeta: step size (float, or one value per batch item); per-task values in ``conf/task/*.yaml``.
        eta: DDIM stochasticity (1.0 = ancestral DDPM, the DPS setting).
        clip_x0: clamp ``x0_hat`` to [-1, 1] in the denoising step (images); the gradient is unaffected.
        log_every: callback every ``log_every`` steps and at the last one.
    """

    name = "dps"
    requires: tuple = ()
    needs_grad = True
    per_item = ("zeta",)
    gmm_hparams = {"zeta": 0.3, "eta": 1.0}                     # tuned on the GMM tuning seed (results/gmm_posterior.md)
    gmm_tune_grid = {"zeta": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]}

    def __init__(self, steps: int = 100, zeta=1.0, eta: float = 1.0, clip_x0: bool = False, log_every: int = 10):
        self.steps = validate_steps("dps", steps)
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"dps: eta must be in [0, 1], got {eta}")
        zs = list(zeta) if not isinstance(zeta, (int, float)) else [zeta]
        if any(not (math.isfinite(float(z)) and float(z) >= 0) for z in zs):
            raise ValueError(f"dps: zeta must be finite and >= 0, got {zeta}")
        self.zeta = float(zeta) if isinstance(zeta, (int, float)) else [float(z) for z in zs]
        self.eta = float(eta)
        self.clip_x0 = bool(clip_x0)
        self.log_every = max(1, int(log_every))

    def prepare(self, y, operator, prior):
        B = y.shape[0]
        if isinstance(self.zeta, list) and len(self.zeta) != B:
            raise ValueError(f"dps: per-item zeta has {len(self.zeta)} values for a batch of {B}")
        like = torch.empty(self.sample_shape(y, prior), dtype=y.dtype, device=y.device)
        return {"zeta": bcast(torch.as_tensor(self.zeta, dtype=torch.float64), like)}

    def update(self, ctx, i, t, x, a_t, a_s, y, operator, prior):
        B = y.shape[0]
        sa, s1a = math.sqrt(a_t), math.sqrt(1 - a_t)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            eps = prior.eps(xg, t)
            x0 = (xg - s1a * eps) / sa
            res = (y - operator.forward(x0)).reshape(B, -1)
            sq = res.square().sum(1)                             # (B,) per-image squared norms
            (grad,) = torch.autograd.grad(sq.sum(), xg)
        norm = sq.detach().sqrt()
        step = ctx["zeta"] / bcast(norm.clamp_min(1e-20), x)     # zeta / ||y - H(x0_hat)||, per image
        x0d = x0.detach()
        if self.clip_x0:
            x0d = x0d.clamp(-1.0, 1.0)
        return x0d, eps.detach(), -(step * grad), {"residual_norm": norm, "x0": x0d}
