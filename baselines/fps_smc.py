"""FPS-SMC: filtering posterior sampling with SMC (Dou, Song, ICLR 2024, "Diffusion posterior sampling for linear
inverse problem solving: a filtering perspective"; official code ZehaoDou-official/FPS-SMC-2023,
``guided_diffusion/gaussian_diffusion.py``).

In the SVD basis (:mod:`reddiff.samplers.smc`), with ``y_hat_i = (U^T y)_i / s_i`` and ``r_i = sigma_y^2/s_i^2``:

1. a sequence of noised measurements is drawn backwards from noise to ``y``, once per item and shared by its
   particles (gaussian_diffusion.py:229-247): ``y_0 = sqrt(a_0) y_hat + sqrt(1 - a_0) e`` and, level L -> L+1,
   ``y_{L+1} = sqrt(a_{L+1}) y_hat + c1 (y_L - sqrt(a_L) y_hat) + c4 e`` with
   ``c1 = sqrt((1 - c)(1 - a_{L+1}) / (1 - a_L))``, ``c4 = sqrt(c (1 - a_{L+1}))`` (``c`` = ``c_rate``), so that
   ``y_S = y_hat`` at the clean level;
2. the backward kernel is DDIM with noise variance ``c (1 - a_s)`` (mean ``sqrt(a_s) x0_hat + sqrt((1 - c)(1 - a_s))
   eps``, posterior_mean_variance.py:130-136 and gaussian_diffusion.py:116) and the potential at level L is
   ``p(y_L | x_L) = N(y_L; x_L, a_L r_i)`` (``variance_diff = a sigma^2``, gaussian_diffusion.py:94);
3. ``x_L`` is drawn from the Gaussian product of kernel and potential, the weight is the predictive
   ``N(y_L; m, sig^2 + a_L r_i)`` and the particles are resampled every step (multinomial, ``random.choices``).

Differences from the official code, each switchable (``compat.fps_smc_*``, docs/DIFFERENCES.md; ours first):
``y_level`` "s" | "t": step t -> s conditions on the pseudo-observation of level s, the official on level t
(gaussian_diffusion.py:263, 283, 315); ``proposal_var`` "s" | "t": the proposal's potential variance is the
weight's ``a_s sigma^2``, the official's ``a_t sigma^2`` (:94, 122, 316) while its weight uses ``sigma^2 a_s``
(:318, 467, 504), so the official weight is not the predictive; ``clip_x0``: the official clamps x0_hat to [-1, 1]
(configs/diffusion_config.yaml:7, posterior_mean_variance.py:43-44, 133); ``var_jitter``: the official gain divides
by ``c (1 - a_s) + 1e-6`` (:122); ``order`` "adapted" | "draw_first": the official draws from every particle,
weights the drawn states by the three-term ratio and copies the survivors (:499-511): same marginals, another
joint; ``start`` "product" | "official": level 0 is ``N(0, I)`` times the level-0 potential, the official's mean
misses the ``1 / vd`` of ``(I + A^T A / vd)^{-1} A^T y / vd`` and its noise is one draw shared by all particles
(:273-277, svd_replacement.py:232-260); ``last_step`` "condition" | "x0_hat": the official t = 0 step returns the
clipped x0_hat, unconditioned and unweighted (:309, 464).  Not switchable: the measurement noise is the operator's
``noise_std`` (the official hard-codes ``sigma = 0.05``, :77), floored at ``min_noise_std`` so that noiseless tasks
keep a proper final potential; the y-sequence starts at ``sqrt(a_0) y + sqrt(1 - a_0) H e`` instead of ``H e``
(:229-233); the final particle is drawn by the last weights (the official returns particle 0 after the last
resampling); any strided schedule (the official runs 1000 steps); the weights are computed in the spectral domain.
"""
from __future__ import annotations

import math

import torch

from reddiff.samplers.smc import SpectralSMC

LEVELS, ORDERS, STARTS, LASTS = ("s", "t"), ("adapted", "draw_first"), ("product", "official"), ("condition", "x0_hat")


class FPSSMC(SpectralSMC):
    """FPS-SMC sampler; needs an SVD operator.

    Args:
        steps: network evaluations per particle (official 1000, configs/diffusion_config.yaml).
        particles: ``M`` particles per item (official 5, sample_condition.py:38).
        c_rate: fresh-noise fraction ``c`` of the y- and x-chains (official 0.95, sample_condition.py:37).
        min_noise_std: floor of the measurement noise std (model units) used by the potentials (unverified).
        resampling, ess_threshold: multinomial every step, as the official (gaussian_diffusion.py:502).
        chunk_elements: most particle entries per network call (0: all at once).
        draws_per_system: samples taken from one system of items sharing a measurement (1: one per item, as the
            official; 0: all M particles; reddiff/samplers/smc.py).
        y_level, proposal_var, clip_x0, var_jitter, order, start, last_step: our form or the official one (module
            docstring; ``compat.fps_smc_*``).
    """

    name = "fps_smc"
    divide_previous = False
    per_item = ()
    test_overrides = {"particles": 4}
    # GMM: 10 pooled systems of M = 200 particles, all particles kept (draws_per_system = 0: 2000 network
    # evaluations per step for the 2000 samples), 100 steps, c_rate 0.2: chosen by
    # `python -m benchmarks.gmm_posterior --tune --samplers fps_smc --problems 5` on the tuning seed
    # (results/gmm_particles.md); one y-sequence per system, so fewer, larger systems are not better
    gmm_hparams = {"particles": 200, "draws_per_system": 0, "steps": 100, "c_rate": 0.2, "resampling": "systematic"}
    gmm_tune_grid = {"particles": [50, 200, 1000], "draws_per_system": [0], "steps": [100],
                     "c_rate": [0.05, 0.2, 0.5, 0.8, 0.95], "resampling": ["systematic"]}
    tune_space = {"c_rate": "interval(0.5, 1.0)"}  # reddiff.tune.sweeper (unverified: around the official 0.95)
    exact_gaussian = {"overrides": {"steps": 50, "particles": 16, "c_rate": 0.05}, "mean_tol": 0.45, "cov_tol": 0.3}

    def __init__(self, steps: int = 100, particles: int = 5, c_rate: float = 0.95, min_noise_std: float = 1e-3,
                 resampling: str = "multinomial", ess_threshold: float = 1.0, chunk_elements: int = 2 ** 17,
                 spacing: str = "default", log_every: int = 10, draws_per_system: int = 1, y_level: str = "s",
                 proposal_var: str = "s", clip_x0: bool = False, var_jitter: float = 0.0, order: str = "adapted",
                 start: str = "product", last_step: str = "condition"):
        super().__init__(steps, particles, resampling, ess_threshold, chunk_elements, spacing, log_every,
                         draws_per_system)
        for key, v, allowed in (("y_level", y_level, LEVELS), ("proposal_var", proposal_var, LEVELS),
                                ("order", order, ORDERS), ("start", start, STARTS), ("last_step", last_step, LASTS)):
            if v not in allowed:
                raise ValueError(f"fps_smc: {key} must be one of {', '.join(allowed)}, got {v!r}")
        if not float(var_jitter) >= 0.0:
            raise ValueError(f"fps_smc: var_jitter must be >= 0, got {var_jitter}")
        self.y_level, self.proposal_var, self.start_form = y_level, proposal_var, start
        self.clip_x0, self.gain_jitter, self.order, self.last_step = bool(clip_x0), float(var_jitter), order, last_step
        if not 0.0 < float(c_rate) <= 1.0:
            raise ValueError(f"fps_smc: c_rate must be in (0, 1], got {c_rate}")
        if not float(min_noise_std) > 0.0:
            raise ValueError(f"fps_smc: min_noise_std must be > 0, got {min_noise_std}")
        self.c_rate = float(c_rate)
        self.min_noise_std = float(min_noise_std)

    def kernel_std(self, a_t: float, a_s: float) -> float:
        return math.sqrt(self.c_rate * (1 - a_s))

    def setup_potentials(self, ctx: dict, rng) -> None:
        lv = ctx["levels"].tolist()
        obs, y_hat = ctx["obs"], ctx["y_hat"]
        s = torch.where(obs, ctx["s"], torch.ones_like(ctx["s"]))
        ctx["r_eff"] = max(ctx["sig2"], self.min_noise_std ** 2) / s ** 2
        B, k, S = y_hat.shape[0], ctx["k"], len(lv) - 1
        e = rng.randn((B, S + 1, k), dtype=torch.float64).to(y_hat.device)
        c = self.c_rate
        ys = [math.sqrt(lv[0]) * y_hat + math.sqrt(1 - lv[0]) * e[:, 0]]
        for L in range(S):
            a, a2 = lv[L], lv[L + 1]
            c1 = math.sqrt((1 - c) * (1 - a2) / (1 - a))
            c4 = math.sqrt(c * (1 - a2))
            ys.append(math.sqrt(a2) * y_hat + c1 * (ys[-1] - math.sqrt(a) * y_hat) + c4 * e[:, L + 1])
        ctx["ys"] = ys
        ctx["lv"] = lv

    def potential(self, ctx: dict, L: int):
        return ctx["ys"][L], ctx["lv"][L] * ctx["r_eff"], ctx["obs"]

    def step_potential(self, ctx: dict, i: int):
        """Step i (level i = t -> i + 1 = s): centre ``y`` of level s (ours) or t (official); the weight's variance
        ``a_s r`` and the proposal's ``a_s r`` (ours) or ``a_t r`` (official)."""
        lv, r = ctx["lv"], ctx["r_eff"]
        c = ctx["ys"][i + 1 if self.y_level == "s" else i]
        return c, lv[i + 1] * r, lv[i + 1 if self.proposal_var == "s" else i] * r, ctx["obs"]

    def start(self, ctx: dict, z: torch.Tensor) -> torch.Tensor:
        """Level 0: ``N(0, I) g_0`` (ours) or the official ``get_mean(A^T y, vd) + get_noise(e, vd)`` with
        ``vd = a_0 sigma^2``: mean ``vd / (vd + s^2) s (U^T y)``, i.e. ``vd`` times the product's mean, and
        one noise draw (particle 0's) for all particles."""
        if self.start_form == "product":
            return super().start(ctx, z)
        k = ctx["k"]
        c, v, act = self.potential(ctx, 0)
        vd = v * torch.where(ctx["obs"], ctx["s"], torch.ones_like(ctx["s"])) ** 2
        z = z[:1].expand_as(z).clone()
        z0 = z[:, :, :k].to(torch.float64)
        Kp = 1.0 / (1.0 + v)
        z[:, :, :k] = torch.where(act, vd * Kp * c + (Kp * v).sqrt() * z0, z0).to(z.dtype)
        return z
