"""SITCOM: step-wise triple-consistent diffusion sampling (Alkhouri, Liang, Huang, Shen, Ravishankar et al., ICML
2025; official code sjames40/SITCOM ``SITCOM_with_noise.py`` @445738a).

Few steps, each an optimisation of the network *input*: at level ``t`` (strided schedule, ``K = steps``), starting
from ``v = x_t``, ``N = inner`` Adam steps on

    L(v) = || H(clip(f(v, t))) - y ||^2 + lam || v - x_t ||^2,     f(v, t) = (v - sqrt(1 - a_t) eps(v, t)) / sqrt(a_t)

(network-regularised data consistency: the estimate stays on the denoiser's range; ``lam`` the paper's proximity
to ``x_t``), stopped early for an item once its data term falls below ``(noise_std + stop_tol)^2 m`` (``m``
entries of y: the noise level, SITCOM_with_noise.py:141-145); then ``x0 = f(v, t)`` is diffused forward to the
next level, ``x_s = sqrt(a_s) x0 + sqrt(1 - a_s) z`` (:238-239).  Returns the last ``x0``.  Every inner step is one
forward+backward through the network: NFE ``K N`` per image at most (counted through ``prior.nfe`` as DPS's).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from reddiff.samplers.base import Sampler, validate_spacing, validate_steps


def _nonneg(name: str, v) -> float:
    v = float(v)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"sitcom: {name} must be finite and >= 0, got {v}")
    return v


class SITCOM(Sampler):
    """SITCOM sampler (needs a differentiable ``forward``).

    Args:
        steps: ``K`` diffusion levels (official ``--n_step`` 20, README.md:94).
        inner: ``N`` Adam iterations per level (official ``--num_steps`` 30, README.md:93).
        lr: Adam learning rate on the network input (official 0.02, README.md:92).
        lam: weight of ``||v - x_t||^2`` (the official code has no such term, SITCOM_with_noise.py:141: 0).
        stop_tol: the early stop's ``delta`` added to the noise std (official 0.001, SITCOM_with_noise.py:144);
            ``early_stop=False`` runs all ``inner`` steps.
        clip_x0: clamp ``f(v, t)`` to [-1, 1] inside the data term (official, SITCOM_with_noise.py:136; images).
        betas, eps: Adam's (torch defaults, as the official ``torch.optim.Adam``).
    """

    name = "sitcom"
    requires: tuple = ("grad",)
    needs_grad = True
    per_item = ()
    test_overrides = {"inner": 3, "early_stop": False}
    # GMM (benchmarks.gmm_posterior --tune --samplers sitcom, tuning seed; docs/SAMPLERS.md#sitcom)
    gmm_hparams = {"steps": 20, "inner": 30, "lr": 0.5, "lam": 1.0, "clip_x0": False}
    gmm_tune_grid = {"steps": [20], "inner": [30], "lr": [0.1, 0.5, 2.0], "lam": [0.0, 1.0], "clip_x0": [False]}
    # reddiff.tune.sweeper (unverified: 10x around the official lr 0.02; lam from 0, the official code)
    tune_space = {"lr": "tag(log, interval(0.002, 0.2))", "lam": "interval(0.0, 1.0)"}

    def __init__(self, steps: int = 20, inner: int = 30, lr: float = 0.02, lam: float = 0.0,
                 stop_tol: float = 0.001, early_stop: bool = True, clip_x0: bool = True, betas=(0.9, 0.999),
                 eps: float = 1e-8, spacing: str = "default", log_every: int = 10):
        self.steps = validate_steps("sitcom", steps)
        if isinstance(inner, bool) or not isinstance(inner, int) or inner < 1:
            raise ValueError(f"sitcom: inner must be an integer >= 1, got {inner!r}")
        self.inner = inner
        self.lr, self.lam, self.stop_tol = _nonneg("lr", lr), _nonneg("lam", lam), _nonneg("stop_tol", stop_tol)
        self.early_stop, self.clip_x0 = bool(early_stop), bool(clip_x0)
        b1, b2 = (float(b) for b in betas)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"sitcom: betas must be in [0, 1), got {betas}")
        self.betas, self.eps = (b1, b2), _nonneg("eps", eps)
        self.spacing = validate_spacing("sitcom", spacing)
        self.log_every = max(1, int(log_every))

    def expected_nfe(self, prior) -> int:
        """``K N``: exact without the early stop, an upper bound with it."""
        return len(self.timesteps(prior)) * self.inner

    def optimise(self, x: torch.Tensor, t: int, a: float, y, operator, prior, thr: float):
        """``N`` Adam steps on the network input from ``x`` at level ``t``: ``(x0, data_loss, iterations)``,
        ``x0`` of each item from its last evaluation (at its early stop)."""
        B = x.shape[0]
        b1, b2 = self.betas
        v, m1, m2 = x.clone(), torch.zeros_like(x), torch.zeros_like(x)
        active = torch.ones(B, dtype=torch.bool, device=x.device)
        x0_out, loss_out = torch.empty_like(x), torch.zeros(B, dtype=torch.float64, device=x.device)
        sa, s1a = math.sqrt(a), math.sqrt(1 - a)
        it = 0
        for k in range(self.inner):
            with torch.enable_grad():
                vg = v.detach().requires_grad_(True)
                x0 = (vg - s1a * prior.eps(vg, t)) / sa
                r = (operator.forward(x0.clamp(-1.0, 1.0) if self.clip_x0 else x0) - y).reshape(B, -1)
                data = r.square().sum(1)
                loss = data + self.lam * (vg - x).reshape(B, -1).square().sum(1)
                it += 1
                x0_out = torch.where(active.reshape((-1,) + (1,) * (x.ndim - 1)), x0.detach(), x0_out)
                loss_out = torch.where(active, data.detach().to(torch.float64), loss_out)
                if self.early_stop:
                    active = active & ~(data.detach() < thr)
                if not bool(active.any()):
                    break
                (g,) = torch.autograd.grad(loss.sum(), vg)
            m1 = b1 * m1 + (1 - b1) * g
            m2 = b2 * m2 + (1 - b2) * g * g
            step = (m1 / (1 - b1 ** (k + 1))) / ((m2 / (1 - b2 ** (k + 1))).sqrt() + self.eps)
            v = torch.where(active.reshape((-1,) + (1,) * (v.ndim - 1)), v - self.lr * step, v)
        return x0_out, loss_out, it

    def sample(self, y: torch.Tensor, operator, prior, rng, callback: Optional[Callable] = None) -> torch.Tensor:
        self.check(operator)
        ts = self.timesteps(prior)
        sch = prior.schedule
        thr = (float(operator.noise_std) + self.stop_tol) ** 2 * (y[0].numel())
        x = self.init_noise(rng, y, prior)
        last = len(ts) - 1
        x0 = x
        for i, t in enumerate(ts):
            a = float(sch.alpha_bar_at(t))
            a_s = float(sch.alpha_bar_at(ts[i + 1] if i < last else 0))   # the official's last level: t = 0
            x0, loss, it = self.optimise(x.detach(), t, a, y, operator, prior, thr)
            x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * rng.randn(x.shape, dtype=x.dtype).to(x.device)
            if callback is not None and self.should_log(i, last):
                callback(i, {"t": t, "data_loss": loss, "inner": it, "x0": x0})
        return x0.detach()
