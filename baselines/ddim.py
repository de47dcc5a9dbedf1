"""Unconditional DDIM (Song, Meng, Ermon, ICLR 2021): a reference row that ignores the measurement.

    x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    x_s    = sqrt(a_s) x0_hat + c1 z + c2 eps,   c1 = eta sqrt((1 - a_t/a_s)(1 - a_s)/(1 - a_t)),  c2 = sqrt(1 - a_s - c1^2)

starting from ``x_T ~ N(0, I)``; ``eta = 1`` is ancestral DDPM on the strided schedule, ``eta = 0`` deterministic
DDIM.  ``y`` only fixes the batch size, dtype and device.  Also the sample generator of the embedded prior.
"""
from __future__ import annotations

import math

import torch

from reddiff.samplers.base import DDIMFamily, validate_steps, validate_spacing


class DDIM(DDIMFamily):
    """Unconditional DDIM.

    Args:
        steps: network evaluations, every (T/steps)-th timestep.
        eta: stochasticity in [0, 1] (official RED-diff config: 0.5).
        clip_x0: clamp ``x0_hat`` to [-1, 1] in each step (images).
        log_every: callback every ``log_every`` steps and at the last one.
    """

    name = "ddim"
    requires: tuple = ()

    def __init__(self, steps: int = 100, eta: float = 0.5, clip_x0: bool = False, log_every: int = 10,
                 spacing: str = "default"):
        self.steps = validate_steps("ddim", steps)
        self.spacing = validate_spacing("ddim", spacing)
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"ddim: eta must be in [0, 1], got {eta}")
        self.eta = float(eta)
        self.clip_x0 = bool(clip_x0)
        self.log_every = max(1, int(log_every))

    def update(self, ctx, i, t, x, a_t, a_s, y, operator, prior):
        eps = prior.eps(x, t)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if self.clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        return x0, eps, None, {"x0": x0}
