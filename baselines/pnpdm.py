"""PnP-DM: split Gibbs sampling with a diffusion model as plug-and-play prior (Wu, Sun, Chen, Zhang, Yue, Bouman,
"Principled Probabilistic Imaging using Diffusion Models as Plug-and-Play Priors", NeurIPS 2024,
arXiv 2405.18782; code zihuiwu/PnP-DM-public, ``pnpdm/samplers/pnp_edm/``).

Gibbs sampling of ``pi_rho(x, z) ~ p(x) N(z; x, rho^2 I) p(y | z)`` with ``rho`` annealed,
``rho_i = max(rho_0 decay^i, rho_min)`` (``pnp_edm.py:71-79``), alternating

* likelihood step ``z ~ p(z | x, y) ~ N(z; x, rho^2 I) exp(-||y - A(z)||^2 / (2 sigma^2))``: an exact Gaussian draw
  for SVD operators (``tasks/__init__.py:98-103``; :func:`reddiff.baselines.daps.gaussian_conditional`), otherwise
  Langevin ``z <- z - lr [grad ||A(z) - y||^2 / (2 sigma^2) + (z - x) / rho^2] + sqrt(2 lr) n`` started at ``x``
  (``tasks/phase_retrieval.py:25-32``); only the data term's gradient is needed, so nonlinear operators work;
* prior step ``x ~ p(x | z)``: ``z`` is the VE state ``x + rho n``, denoised by the EDM sampler started at noise
  level ``rho`` (``denoiser_edm.py:126-156``): Euler-Maruyama steps of the reverse SDE
  ``x <- x + 2 (s' - s) eps + sqrt(2 s (s - s')) n`` (``mode="sde"``; ``"ode"``: the PF-ODE Euler step
  ``x + (s' - s) eps``, a DDIM eta = 0 step) through the EDM poly-7 grid of ``denoise_steps`` levels below rho.

VP to VE (our priors are VP, eps-prediction, DDPM schedule), exactly: ``sigma_t = sqrt((1 - a_t) / a_t)``,
``x_VE = x_VP / sqrt(a_t)``, same ``eps``, ``D(x, sigma_t) = x - sigma_t eps(sqrt(a_t) x, t)``.  Every noise level
(``rho_i`` and the EDM grid) is snapped to the nearest discrete ``sigma_t`` in log scale and ``rho_i`` is the
snapped value in both steps.  This is ours, not the official: the official ``round_sigma`` is the identity and the
network sees EDM ``VPPrecond``'s ``999 sigma_inv(sigma)`` at the level as it is (``time_input="vp_continuous"``,
``compat.pnpdm_time_input``; docs/DIFFERENCES.md).  Further differences: the prior step starts at ``rho_i`` itself (official: at the first grid level below rho, while
``z`` has noise level rho), and its last step to sigma = 0 is the plain denoiser ``D(x, sigma)`` in both modes
(official ``sde``: the ``lambda = 2`` drift also there, negligible at its sigma_min = 0.002).  The last ``x`` is
returned (the official "one sample" statistic, ``posterior_sample.py:118``).

Exactness: for fixed rho the x-marginal of ``pi_rho`` is the posterior of ``y = A x + n`` with noise covariance
``sigma^2 I + rho^2 A A^T`` (Gaussian case), so the chain tends to the exact posterior as rho_min -> 0 with enough
iterations and prior-step levels (tests/test_pnpdm.py).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from reddiff.baselines.daps import (TIME_INPUTS, LikelihoodNoiseError, data_grad, gaussian_conditional, poly_grid, snap,
                            ve_sigmas)
from reddiff.operators.base import SVDOperator
from reddiff.samplers.base import Sampler, validate_steps


def _positive(name: str, v, zero_ok: bool = False) -> float:
    v = float(v)
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
        raise ValueError(f"pnpdm: {name} must be a finite number {'>= 0' if zero_ok else '> 0'}, got {v}")
    return v


class PnPDM(Sampler):
    """PnP-DM sampler (defaults: ``configs/sampler/pnp_edm.yaml`` and the ``edm_sde`` runs of ``commands.sh``).

    Args:
        steps: Gibbs iterations (100).
        rho, rho_decay, rho_min: coupling annealing ``max(rho decay^i, rho_min)`` (10, 0.9, 0.3).
        mode: ``"sde"`` (Euler-Maruyama, ``edm_sde``) or ``"ode"`` (Euler PF-ODE, ``edm``).
        denoise_steps, sigma_max, sigma_min, poly: the EDM grid of the prior step (100, 80, 0.002, 7); levels
            below the prior's smallest sigma_t snap onto it.
        likelihood: ``"auto"`` (exact for SVD operators, Langevin otherwise), ``"exact"`` or ``"langevin"``.
        langevin_steps, lr: the Langevin likelihood step (100, 1e-4).
        sigma_floor: the likelihood's noise std is ``max(operator.noise_std, sigma_floor)`` (model units), so
            noiseless tasks get a finite likelihood (0.01, unverified: the official runs always have noise).
        init: ``"pinv"`` (``operator.pinv(y)``, official ``LinearSVDOperator.initialize``) or ``"zeros"``.
        spacing: accepted for the compat profile; PnP-DM uses sigma grids, not strided timesteps.
        time_input: ``"grid"`` (ours: every level snapped to the prior's discrete ``sigma_t``), ``"continuous"`` or
            ``"vp_continuous"`` (the levels as they are through ``prior.denoise``; the latter with EDM ``VPPrecond``'s
            ``999 sigma_inv(sigma)``, the official ``models/edm/edm.py:35-62`` with ``round_sigma`` the identity;
            ``compat.pnpdm_time_input``), as :class:`reddiff.baselines.daps.DAPS`.
        log_every: callback every ``log_every`` iterations and at the last one.
    """

    name = "pnpdm"
    requires: tuple = ("grad",)  # differentiates the data term through operator.forward (refuses a black-box task)
    needs_grad = False
    per_item: tuple = ()
    # GMM settings: exact likelihood step; rho from the top of the schedule (150: the prior's spread along the
    # means is 8 sqrt(d), 226 at d = 800; from rho = 10 and x = A^+ y every chain falls into the modes nearest the
    # origin) down to the smallest sigma_t (0.01, small against sigma_y / s); ODE prior step on a 3-level grid.
    # Chosen on the tuning seed (results/gmm_daps_pnpdm.md): first over mode {sde, ode} x denoise_steps {3, 5} x
    # rho {10, 150} (ode / 3 / 150: score 0.636, sde: 0.735, rho 10: worst cell 1.15x the prior), then over the grid
    # below with steps = 28, so that every point reaches rho_min:
    # python -m benchmarks.gmm_posterior --tune --samplers pnpdm --dims 8,80 --dims-y 1,4 --problems 3 --samples 500
    # (decay 0.6 / 3 levels: 0.626 on d = 8, 80; 0.7: 0.636).  Decay 0.6 reaches 0.01 at iteration 20, and 20
    # iterations gave the identical tuning ratios as 28, so 20: 49 NFE, about 0.5-1.2 s per problem at d = 800.
    gmm_hparams = {"steps": 20, "rho": 150.0, "rho_decay": 0.6, "rho_min": 0.01, "denoise_steps": 3,
                   "mode": "ode", "sigma_floor": 0.0}
    gmm_tune_grid = {"rho_decay": [0.6, 0.7], "denoise_steps": [3, 5]}
    test_overrides = {"steps": 4, "denoise_steps": 8, "langevin_steps": 3}
    # slow annealing: the Gibbs chain mixes in O(rho^2) per iteration (errors about 0.06 / 0.07 here)
    exact_gaussian = {"overrides": {"steps": 120, "rho": 10.0, "rho_decay": 0.95, "rho_min": 0.1,
                                    "denoise_steps": 50, "sigma_floor": 0.0},
                      "mean_tol": 0.12, "cov_tol": 0.12}

    def __init__(self, steps: int = 100, rho: float = 10.0, rho_decay: float = 0.9, rho_min: float = 0.3,
                 mode: str = "sde", denoise_steps: int = 100, sigma_max: float = 80.0, sigma_min: float = 0.002,
                 poly: float = 7.0, likelihood: str = "auto", langevin_steps: int = 100, lr: float = 1e-4,
                 sigma_floor: float = 0.01, init: str = "pinv", spacing: str = "default", time_input: str = "grid",
                 log_every: int = 10):
        self.steps = validate_steps("pnpdm", steps)
        if time_input not in TIME_INPUTS:
            raise ValueError(f"pnpdm: time_input must be one of {', '.join(TIME_INPUTS)}, got {time_input!r}")
        self.time_input = time_input
        self.rho = _positive("rho", rho)
        self.rho_min = _positive("rho_min", rho_min)
        self.rho_decay = _positive("rho_decay", rho_decay)
        if self.rho_decay > 1 or self.rho_min > self.rho:
            raise ValueError(f"pnpdm: need rho_decay <= 1 and rho_min <= rho, got {rho_decay}, {rho_min}, {rho}")
        if mode not in ("sde", "ode"):
            raise ValueError(f"pnpdm: mode must be 'sde' or 'ode', got {mode!r}")
        self.mode = mode
        self.denoise_steps = validate_steps("pnpdm (denoise_steps)", denoise_steps)
        self.sigma_max, self.sigma_min = _positive("sigma_max", sigma_max), _positive("sigma_min", sigma_min)
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"pnpdm: need sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.poly = _positive("poly", poly)
        if likelihood not in ("auto", "exact", "langevin"):
            raise ValueError(f"pnpdm: likelihood must be 'auto', 'exact' or 'langevin', got {likelihood!r}")
        self.likelihood = likelihood
        self.requires = ("svd",) if likelihood == "exact" else ("grad",)
        if isinstance(langevin_steps, bool) or not isinstance(langevin_steps, int) or langevin_steps < 0:
            raise ValueError(f"pnpdm: langevin_steps must be an integer >= 0, got {langevin_steps!r}")
        self.langevin_steps = langevin_steps
        self.lr = _positive("lr", lr)
        self.sigma_floor = _positive("sigma_floor", sigma_floor, zero_ok=True)
        if init not in ("pinv", "zeros"):
            raise ValueError(f"pnpdm: init must be 'pinv' or 'zeros', got {init!r}")
        self.init = init
        self.spacing = spacing
        self.log_every = max(1, int(log_every))

    def check(self, operator) -> None:
        super().check(operator)
        if not max(float(operator.noise_std), self.sigma_floor) > 0:
            raise LikelihoodNoiseError("pnpdm: the likelihood needs a noise std > 0: the operator is noiseless and "
                                       "sigma_floor = 0 (set sampler.sigma_floor > 0)")

    # ------------------------------------------------------------------ schedule
    def plan(self, prior) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """Per iteration ``(t_rho, rho_i, pts)``: the snapped coupling level and the prior step's points
        ``[(t_rho, rho_i), (t, sigma) below rho_i ..., (-1, 0.0)]`` (one network call per consecutive pair)."""
        sig = ve_sigmas(prior.schedule)
        if self.time_input != "grid":  # the levels as they are (t = -1: no grid step)
            levels = poly_grid(min(self.sigma_max, float(sig[-1])), self.sigma_min, self.denoise_steps, self.poly)
            out = []
            for i in range(self.steps):
                r = max(self.rho * self.rho_decay ** i, self.rho_min)
                out.append((-1, r, [(-1, r)] + [(-1, s) for s in levels if s < r] + [(-1, 0.0)]))
            return out
        grid = []
        for s in poly_grid(min(self.sigma_max, float(sig[-1])), max(self.sigma_min, float(sig[0])),
                           self.denoise_steps, self.poly):
            j = snap(s, sig)
            if not grid or grid[-1] != j:
                grid.append(j)
        out = []
        for i in range(self.steps):
            t = snap(max(self.rho * self.rho_decay ** i, self.rho_min), sig)
            pts = [(t, float(sig[t]))] + [(j, float(sig[j])) for j in grid if j < t] + [(-1, 0.0)]
            out.append((t, float(sig[t]), pts))
        return out

    def expected_nfe(self, prior) -> int:
        return sum(len(pts) - 1 for _, _, pts in self.plan(prior))

    # ------------------------------------------------------------------ the two Gibbs steps
    def _likelihood_step(self, x, y, operator, rho2, prec, rng, exact: bool):
        if exact:
            return gaussian_conditional(x, rho2, prec, y, operator, rng)
        z = x
        for _ in range(self.langevin_steps):
            g = 0.5 * prec * data_grad(z, y, operator) + (z - x) / rho2
            z = z - self.lr * g + math.sqrt(2 * self.lr) * rng.randn(x.shape, dtype=x.dtype).to(x.device)
        return z

    def _prior_step(self, z, pts, prior, rng):
        x = z
        dialect = None if self.time_input in ("grid", "continuous") else self.time_input
        for (t, s), (_, s_next) in zip(pts[:-1], pts[1:]):
            if self.time_input == "grid":
                a = float(prior.schedule.alpha_bar_at(t))
                eps = prior.eps(math.sqrt(a) * x, t)
            else:
                eps = (x - prior.denoise(x, s, dialect=dialect)) / s
            if s_next == 0.0:
                x = x - s * eps                                  # D(x, sigma): the last step
            elif self.mode == "ode":
                x = x + (s_next - s) * eps
            else:
                x = (x + 2.0 * (s_next - s) * eps
                     + math.sqrt(2.0 * s * (s - s_next)) * rng.randn(x.shape, dtype=x.dtype).to(x.device))
        return x

    def sample(self, y: torch.Tensor, operator, prior, rng, callback: Optional[Callable] = None) -> torch.Tensor:
        self.check(operator)
        self.check_prior(prior)
        plan = self.plan(prior)
        sigma = max(float(operator.noise_std), self.sigma_floor)
        exact = self.likelihood == "exact" or (self.likelihood == "auto" and isinstance(operator, SVDOperator))
        shape = self.sample_shape(y, prior)
        last = len(plan) - 1
        with torch.no_grad():
            x = operator.pinv(y).reshape(shape) if self.init == "pinv" else y.new_zeros(shape)
            for i, (t, rho_i, pts) in enumerate(plan):
                z = self._likelihood_step(x, y, operator, rho_i ** 2, 1.0 / sigma ** 2, rng, exact)
                x = self._prior_step(z, pts, prior, rng)
                if callback is not None and self.should_log(i, last):
                    callback(i, {"t": t, "rho": rho_i, "x0": x})
        return x.detach()
