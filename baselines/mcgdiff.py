"""MCG-diff: Monte Carlo guided diffusion (Cardoso, Janati El Idrissi, Le Corff, Moulines, ICLR 2024;
official code gabrielvc/mcg_diff, ``mcg_diff/particle_filter.py``).

SMC in the SVD basis (:mod:`reddiff.samplers.smc`).  Observed coordinate ``i`` (``s_i > 0``) carries
``y_hat_i = x0_i + sqrt(r_i) e`` with ``r_i = sigma_y^2 / s_i^2``.  Its pinning level ``L_i`` is the first level
whose diffusion noise is not above the data noise, ``(1 - a_L)/a_L <= r_i`` (``a`` = alpha_bar; ``L_i = S``,
the clean level, when sigma_y = 0).  Since ``N(y_hat_i; x0_i, r_i) ∝ N(sqrt(a_L) y_hat_i; x_{L,i}, kappa_i)``
integrated over the forward kernel ``x_{L,i} | x0`` with ``kappa_i = a_L r_i - (1 - a_L) >= 0``, the posterior is
exactly the marginal of the backward chain with the terminal potential ``N(sqrt(a_L) y_hat_i; x_{L,i}, kappa_i)``
at level ``L_i``.  Before it (``L < L_i``) the potential is that pseudo-observation pushed forward,

    g_{L,i}(x) = N(sqrt(a_L) y_hat_i; x, 1 - rho + rho kappa_i),   rho = a_L / a_{L_i}

(the official ``1 - (1 - kappa) a_t / a_tau``, particle_filter.py:102-107), and after it the coordinate follows the
prior's backward kernel.  The weight of a step is ``∫ p(x' | x) g_L(x') dx' / g_{L-1}(x)`` over the coordinates
still active at ``L`` (particle_filter.py:100-109), ancestors are resampled every step and the active coordinates
are drawn from the Gaussian product (particle_filter.py:115-120).  The backward kernel is DDIM with ``eta``
(official eta = 1, particle_filter.py:48).  Exact as N grows, up to the Gaussian backward kernel of the strided chain.

Differences from the official code: the pinning level and ``kappa_i`` are exact per coordinate (the official picks
the nearest timestep, utils.py:128-133, and uses one ``gaussian_var`` for all; here ``kappa`` is only a floor, needed
when sigma_y = 0); the potential of a coordinate is not divided out at the step after its pinning level (it is part
of the target; the official divides, which with a tiny kappa multiplies the weights by an independent heavy-tailed
factor); the chain runs to alpha_bar = 1 and the noisy case needs no final likelihood reweighting (the official
multiplies by p(y | x0) at the end, particle_filter.py:146-149); the official script returns one particle per run
drawn by the final weights (scripts/viz_gaussian.py:150-151), as here by default, while ``draws_per_system``
can also keep every particle of a system (the GMM benchmark setting); any strided schedule (no singular-value
adapted timesteps, utils.py:136-155).  Level 0 draws ``N(0, I)`` times the level-0 potential (``init="potential"``),
the target the first weight's division by that potential assumes; the official starts from plain ``N(0, I)``
(particle_filter.py:67-69; the caller's ``initial_particles``, scripts/viz_gaussian.py) and still divides
(:100-109), so it weights by ``1 / g_0``: ``init="prior"`` (``compat.mcgdiff_init``).  With sigma_y = 0 the last step
gains ``K = (1 - a_0) / (1 - a_0 + kappa)``: 0.5 at the default ``kappa = 1e-4 = 1 - a_0``, so the observed
coordinates are only half pinned (the official last step, into t = 0, has a gain of 0.499 at 20 steps,
particle_filter.py:115-120); a smaller
``kappa`` (1e-8: K = 0.9999) pins them.  The official chain also stops at the last visited timestep (t = 0,
``a_0 < 1``) without a last denoising step, pins there with variance ``kappa`` and divides that potential out of the
final weights (particle_filter.py:124-131, 150-151: ``log_weights = -previous_log_likelihood``): ``end="t0"``
(``compat.mcgdiff_end``), one network call fewer.
"""
from __future__ import annotations

import math

import torch

from reddiff.samplers.smc import SpectralSMC

INITS, ENDS = ("potential", "prior"), ("clean", "t0")


class MCGDiff(SpectralSMC):
    """MCG-diff sampler; needs an SVD operator.

    Args:
        steps: network evaluations per particle (official scripts: 100, scripts/viz_gaussian.py:129).
        particles: N particles per item (official GMM script 128, scripts/viz_gaussian.py:158).
        eta: DDIM stochasticity of the backward kernel (official 1, particle_filter.py:48).
        kappa: floor of the terminal pseudo-observation variance (official ``gaussian_var`` 1e-4,
            particle_filter.py:50; the GMM script uses 1e-8, viz_gaussian.py:147).
        resampling, ess_threshold: multinomial every step as the official (particle_filter.py:112).
        chunk_elements: most particle entries per network call (0: all N at once).
        draws_per_system: samples taken from one system of items sharing a measurement (1: one per item, as the
            official script; 0: all N particles; reddiff/samplers/smc.py).
        init: level-0 particles, "potential" (``N(0, I) g_0``) or "prior" (plain ``N(0, I)``, official).
        end: "clean" (run into alpha_bar = 1) or "t0" (official: stop at the last visited timestep; module docstring).
    """

    name = "mcgdiff"
    divide_previous = True
    per_item = ()
    test_overrides = {"particles": 4}
    # GMM: 4 pooled systems of N = 500 particles, all particles kept (draws_per_system = 0: 2000 network evaluations
    # per step for the 2000 samples, like the other samplers), 50 steps, resampling when ESS < N/2: chosen by
    # `python -m benchmarks.gmm_posterior --tune --samplers mcgdiff --problems 5` on the tuning seed
    # (results/gmm_particles.md); one draw per system as the official script costs N times more
    # (results/particle_curve.md)
    gmm_hparams = {"particles": 500, "draws_per_system": 0, "steps": 50, "ess_threshold": 0.5,
                   "resampling": "systematic", "kappa": 1e-8}
    gmm_tune_grid = {"particles": [250, 500, 1000, 2000], "draws_per_system": [0], "steps": [50, 100],
                     "ess_threshold": [1.0, 0.5], "resampling": ["systematic"]}
    tune_space = {"eta": "interval(0.0, 1.0)"}  # reddiff.tune.sweeper (unverified: the DDIM range, official 1.0 inside)
    exact_gaussian = {"overrides": {"steps": 50, "particles": 16}, "mean_tol": 0.45, "cov_tol": 0.3}

    def __init__(self, steps: int = 100, particles: int = 16, eta: float = 1.0, kappa: float = 1e-4,
                 resampling: str = "multinomial", ess_threshold: float = 1.0, chunk_elements: int = 2 ** 17,
                 spacing: str = "default", log_every: int = 10, draws_per_system: int = 1, init: str = "potential",
                 end: str = "clean"):
        super().__init__(steps, particles, resampling, ess_threshold, chunk_elements, spacing, log_every,
                         draws_per_system)
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"mcgdiff: eta must be in [0, 1], got {eta}")
        if not float(kappa) > 0.0:
            raise ValueError(f"mcgdiff: kappa must be > 0 (the pseudo-observation variance floor), got {kappa}")
        for key, v, allowed in (("init", init, INITS), ("end", end, ENDS)):
            if v not in allowed:
                raise ValueError(f"mcgdiff: {key} must be one of {', '.join(allowed)}, got {v!r}")
        if end == "t0" and self.steps < 2:
            raise ValueError(f"mcgdiff: end='t0' stops one step early and needs steps >= 2, got {self.steps}")
        self.end = end
        self.eta = float(eta)
        self.kappa = float(kappa)
        self.init_draw = "product" if init == "potential" else "prior"

    def kernel_std(self, a_t: float, a_s: float) -> float:
        return self.eta * math.sqrt(max((1 - a_t / a_s) * (1 - a_s) / (1 - a_t), 0.0))

    def setup_potentials(self, ctx: dict, rng) -> None:
        lv = ctx["levels"].to(ctx["device"])                       # (S+1,), increasing alpha_bar
        ratio = (1 - lv) / lv                                      # decreasing to 0 at the clean level
        r, obs = ctx["r"], ctx["obs"]
        L = (ratio[None, None, :] > r[..., None]).sum(-1).clamp_max(len(lv) - 1)   # first level with ratio <= r
        aL = lv[L]
        kappa = (aL * r - (1 - aL)).clamp_min(self.kappa)
        ctx["pin"] = torch.where(obs, L, torch.full_like(L, -1))
        ctx["a_pin"] = torch.where(obs, aL, torch.ones_like(aL))
        ctx["kappa"] = kappa
        ctx["lv"] = lv

    def potential(self, ctx: dict, L: int):
        aL = float(ctx["lv"][L])
        act = ctx["pin"] >= L
        rho = (aL / ctx["a_pin"]).clamp_max(1.0)
        v = torch.where(act, (1 - rho) + rho * ctx["kappa"], torch.ones_like(rho))
        return math.sqrt(aL) * ctx["y_hat"], v, act
