"""DPS: diffusion posterior sampling (Chung, Kim, Mccann, Klasky, Ye, ICLR 2023).

Ancestral sampling (DDIM form with ``eta``; ``eta = 1`` is DDPM on the strided schedule), with a gradient step on
the measurement residual after each denoising step, as in the RED-diff repository's ``algos/dps.py``:

    x0_hat = (x_t - sqrt(1 - a_t) eps(x_t, t)) / sqrt(a_t)
    x_s    = sqrt(a_s) x0_hat + c1 z + c2 eps - zeta / ||y - H(x0_hat)|| * grad_{x_t} ||y - H(x0_hat)||^2

with ``c1 = eta sqrt((1 - a_t/a_s)(1 - a_s)/(1 - a_t))`` and ``c2 = sqrt(1 - a_s - c1^2)``.  The norm is per image,
and the gradient flows through the network (and the operator) with respect to ``x_t``, so only ``forward`` is
needed: nonlinear operators work.

Scale convention (``zeta_convention``).  ``reddiff`` (default): the step above, ``zeta / ||r||`` times the gradient
of the *squared* norm (RED-diff ``algos/dps.py:52-63``, code).  ``dps``: ``zeta`` is the DPS authors' ``zeta'``,
which steps along the gradient of the unsquared norm ``||r||`` (DPS ``guided_diffusion/condition_methods.py:31-32,
86``, code); since ``grad ||r|| = grad ||r||^2 / (2 ||r||)``, it runs here as ``zeta' / 2``.  A value cited from
the DPS paper must carry ``zeta_convention: dps`` (``conf/task/*.yaml``).

The DPS authors' code also clamps ``x0_hat`` to [-1, 1] before the norm (``posterior_mean_variance.py:40-44,
126``; ``clip_denoised: True``), and takes one norm over the whole batch (its ``p_sample`` loop is run at batch
1, where that equals ours).  ``clamp_x0_norm=True`` clamps inside the differentiated residual (the gradient is
then 0 on clamped pixels); ``clip_x0`` clamps the ``x0_hat`` of the update; both together are the authors' code.
"""
from __future__ import annotations

import math

import torch

from reddiff.samplers.base import DDIMFamily, bcast, validate_spacing, validate_steps


class DPS(DDIMFamily):
    """DPS sampler.

    Args:
        steps: denoising steps = network evaluations (1..T); every (T/steps)-th timestep.
        zeta: step size (float, or one value per batch item); per-task values in ``conf/task/*.yaml``.
        zeta_convention: "reddiff" (zeta as above) or "dps" (the DPS authors' zeta', run as zeta' / 2).
        clamp_x0_norm: clamp ``x0_hat`` to [-1, 1] inside the residual norm, as the DPS authors' code.
        spacing: timestep spacing, "default" or "official" (``compat.timesteps``).
        eta: DDIM stochasticity (1.0 = ancestral DDPM, the DPS setting).
        clip_x0: clamp ``x0_hat`` to [-1, 1] in the denoising step (images); the gradient is unaffected.
        log_every: callback every ``log_every`` steps and at the last one.
    """

    name = "dps"
    requires: tuple = ("grad",)  # differentiates the data term through operator.forward (refuses a black-box task)
    needs_grad = True
    per_item = ("zeta",)
    gmm_hparams = {"zeta": 0.3, "eta": 1.0}                     # tuned on the GMM tuning seed (results/gmm_posterior.md)
    gmm_tune_grid = {"zeta": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]}
    # tuning space (reddiff.tune.sweeper; unverified: our range, 10x below / 30x above the official 0.1 and 1.0)
    tune_space = {"zeta": "tag(log, interval(0.01, 30.0))"}

    def __init__(self, steps: int = 100, zeta=1.0, eta: float = 1.0, clip_x0: bool = False, log_every: int = 10,
                 zeta_convention: str = "reddiff", clamp_x0_norm: bool = False, spacing: str = "default"):
        self.steps = validate_steps("dps", steps)
        self.spacing = validate_spacing("dps", spacing)
        if zeta_convention not in ("reddiff", "dps"):
            raise ValueError(f"dps: zeta_convention must be 'reddiff' or 'dps', got {zeta_convention!r}")
        self.zeta_convention = zeta_convention
        self.clamp_x0_norm = bool(clamp_x0_norm)
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
        zeta = torch.as_tensor(self.zeta, dtype=torch.float64)
        if self.zeta_convention == "dps":  # zeta' grad ||r|| = (zeta' / 2) grad ||r||^2 / ||r||
            zeta = zeta / 2
        return {"zeta": bcast(zeta, like)}

    def update(self, ctx, i, t, x, a_t, a_s, y, operator, prior):
        B = y.shape[0]
        sa, s1a = math.sqrt(a_t), math.sqrt(1 - a_t)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            eps = prior.eps(xg, t)
            x0 = (xg - s1a * eps) / sa
            res = (y - operator.forward(x0.clamp(-1.0, 1.0) if self.clamp_x0_norm else x0)).reshape(B, -1)
            sq = res.square().sum(1)                             # (B,) per-image squared norms
            (grad,) = torch.autograd.grad(sq.sum(), xg)
        norm = sq.detach().sqrt()
        step = ctx["zeta"] / bcast(norm.clamp_min(1e-20), x)     # zeta / ||y - H(x0_hat)||, per image
        x0d = x0.detach()
        if self.clip_x0:
            x0d = x0d.clamp(-1.0, 1.0)
        return x0d, eps.detach(), -(step * grad), {"residual_norm": norm, "x0": x0d}
