"""DDRM: denoising diffusion restoration models (Kawar, Elad, Ermon, Song, NeurIPS 2022).

Works in the spectral domain of an SVD operator ``H = U S V^T`` and in the variance-exploding parametrisation
``x_t / sqrt(a_t) = x0 + sigma_t e`` with ``sigma_t = sqrt(1 - a_t) / sqrt(a_t)``.  With ``xb = V^T x``,
``yb_i = (U^T y)_i / s_i`` (where ``s_i > 0``), the measurement noise ``sigma_y`` (model units, from
``operator.noise_std``), ``x0b = V^T x0_hat`` and ``eb = V^T eps``, one step t -> s updates each component:

* missing (``s_i = 0``):              ``x0b + sqrt(1 - eta^2) sigma_s eb + eta sigma_s z``
* less noisy than y (``s_i sigma_s < sigma_y``):
                                      ``x0b + sqrt(1 - eta^2) sigma_s (yb - x0b) s_i / sigma_y + eta sigma_s z``
* noisier than y (``s_i sigma_s >= sigma_y``):
                                      ``eta_b yb + (1 - eta_b) x0b + sqrt(sigma_s^2 - eta_b^2 sigma_y^2 / s_i^2) z``

and the chain starts from ``xb_T = yb + sqrt(sigma_T^2 - sigma_y^2/s_i^2) z`` on the observed components
(``sigma_T z`` elsewhere).  The last step (s = -1, ``sigma_s = 0``) returns the restoration.  Singular values may
be per image (``(B, k)``, e.g. per-image masks) and may contain zeros (treated as missing).  The algorithm follows
the DDRM paper and the copy in the RED-diff repository (defaults eta 0.85, eta_b 1, 20 steps); differences: the
chain is scaled by the exact ``sqrt(a_T)`` at the start (the official code divides by ``sigma_T`` instead,
DDRM ``functions/denoising.py:36``, i.e. ``1/sqrt(1 - a_T)`` larger), and a component with
``s_i sigma_s == sigma_y`` counts as "noisier than y".  So at the noiseless last step (``sigma_s = sigma_y = 0``)
ours returns ``y / s_i`` on the observed components; the official strict ``>`` (``denoising.py:74-75``) sends every
component to the "missing" branch and returns ``x0_hat`` (``last_step="x0_hat"``, ``compat.ddrm_last_step``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from reddiff.samplers.base import Sampler, validate_spacing, validate_steps


class DDRM(Sampler):
    """DDRM sampler; needs an SVD operator (refuses others with ``OperatorCapabilityError``).

    Args:
        steps: network evaluations (20 in the paper), every (T/steps)-th timestep.
        eta: ``eta`` (0.85), the fresh-noise fraction for missing / less-noisy components.
        eta_b: ``eta_b`` (1.0), how strongly noisier-than-y components are pulled to the measurement.
        log_every: callback every ``log_every`` steps and at the last one.
        last_step: "measurement" (y on the observed components when noiseless) or "x0_hat" (the official code).
        spacing: timestep spacing, "default" or "official" (``compat.timesteps``).
    """

    name = "ddrm"
    requires = ("svd",)
    gmm_hparams = {"eta": 1.0, "eta_b": 1.0}                    # GMM tuning seed (results/gmm_posterior.md)
    gmm_tune_grid = {"eta": [0.5, 0.85, 1.0], "eta_b": [0.5, 1.0]}
    # tuning space (reddiff.tune.sweeper; unverified: the whole [0, 1] range of both, official 0.85 / 1.0 inside)
    tune_space = {"eta": "interval(0.0, 1.0)", "eta_b": "interval(0.0, 1.0)"}

    def __init__(self, steps: int = 20, eta: float = 0.85, eta_b: float = 1.0, log_every: int = 10,
                 last_step: str = "measurement", spacing: str = "default"):
        if last_step not in ("measurement", "x0_hat"):
            raise ValueError(f"ddrm: last_step must be 'measurement' or 'x0_hat', got {last_step!r}")
        self.last_step = last_step
        self.spacing = validate_spacing("ddrm", spacing)
        if not 0.0 <= float(eta) <= 1.0 or not 0.0 <= float(eta_b) <= 1.0:
            raise ValueError(f"ddrm: eta and eta_b must be in [0, 1], got {eta}, {eta_b}")
        self.steps = validate_steps("ddrm", steps)
        self.eta = float(eta)
        self.eta_b = float(eta_b)
        self.log_every = max(1, int(log_every))

    @torch.no_grad()
    def sample(self, y: torch.Tensor, operator, prior, rng, callback: Optional[Callable] = None) -> torch.Tensor:
        self.check(operator)
        sch = prior.schedule
        ts = self.timesteps(prior)
        B = y.shape[0]
        shape = (B,) + tuple(prior.shape)
        dtype, device = y.dtype, y.device
        sig_y = float(operator.noise_std)
        eta, eta_b = self.eta, self.eta_b

        # spectral quantities, shape (1 or B, n): singulars zero-padded to n
        n = math.prod(prior.shape)                               # Vt(x) is (B, numel of one x) by the protocol
        s_k = operator.singulars().to(dtype=dtype, device=device)
        s_k = s_k.reshape(1, -1) if s_k.ndim == 1 else s_k
        k = s_k.shape[1]
        s = s_k.new_zeros(s_k.shape[0], n)
        s[:, :k] = s_k
        obs = s > 0
        s_safe = torch.where(obs, s, torch.ones_like(s))
        uty = operator.Ut(y)
        yb = torch.zeros(B, n, dtype=dtype, device=device)
        yb[:, :k] = uty[:, :k]
        yb = torch.where(obs, yb / s_safe, torch.zeros_like(yb))
        ny = torch.where(obs, sig_y / s_safe, torch.zeros_like(s))   # sigma_y / s_i: noise level of yb

        def sigma(t):
            a = float(sch.alpha_bar_at(t))
            return math.sqrt((1 - a) / a), a

        # initial state at the largest timestep
        sig_T, a_T = sigma(ts[0])
        z = rng.randn((B, n), dtype=dtype).to(device)
        large = obs & (s * sig_T > sig_y)
        xb = torch.where(large, yb + (sig_T ** 2 - ny.square()).clamp_min(0).sqrt() * z, sig_T * z)
        x = math.sqrt(a_T) * operator.V(xb).reshape(shape)

        last = len(ts) - 1
        c_miss = math.sqrt(1 - eta ** 2)
        for i, t in enumerate(ts):
            sig_s, a_s = sigma(ts[i + 1]) if i + 1 < len(ts) else (0.0, 1.0)
            a_t = float(sch.alpha_bar_at(t))
            eps = prior.eps(x, t)
            x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            x0b = operator.Vt(x0)
            eb = operator.Vt(eps)
            z = rng.randn((B, n), dtype=dtype).to(device)

            missing = x0b + c_miss * sig_s * eb + eta * sig_s * z
            before = obs & (s * sig_s >= sig_y)                  # noisier than y
            after = obs & ~before                                # less noisy than y (only when sigma_y > 0)
            out = missing
            if sig_y > 0:
                less = x0b + c_miss * sig_s * (yb - x0b) / ny.clamp_min(1e-30) + eta * sig_s * z
                out = torch.where(after, less, out)
            noisier = eta_b * yb + (1 - eta_b) * x0b + (sig_s ** 2 - eta_b ** 2 * ny.square()).clamp_min(0).sqrt() * z
            out = torch.where(before, noisier, out)
            if i == last and self.last_step == "x0_hat":
                out = x0b
            x = math.sqrt(a_s) * operator.V(out).reshape(shape)
            if callback is not None and self.should_log(i, last):
                callback(i, {"t": t, "x0": x0})
        return x
