"""Latent-DAPS: DAPS's decoupled annealing on the latent of a latent diffusion model (Zhang, Chu, Berner, Meng,
Anandkumar, Song, "Improving Diffusion Inverse Problem Solving with Decoupled Noise Annealing", CVPR 2025,
arXiv 2407.01521, section 4.3 "latent DAPS"; code zhangbingliang2019/DAPS @098df6b: ``sampler.py:138-189``
``LatentDAPS``, ``cores/mcmc.py``, ``forward_operator/__init__.py:381-406`` ``LatentWrapper``,
``configs/sampler/latent_edm_daps.yaml`` and ``sd_edm_daps.yaml``, the ``ldm:`` / ``sd:`` blocks of
``configs/task/*.yaml``).

For the annealing levels ``sigma_0 > ... > sigma_{N-1}`` (poly-7 from ``sigma_max`` to ``sigma_min``) one level is,
in latent coordinates ``z`` (the VE view ``z_sigma = z0 + sigma n`` of the prior's latent denoiser):

1. ``z0_hat``: ``ode_steps`` Euler steps of the PF-ODE from ``sigma_k`` to ``ode_sigma_min`` (no gradient);
2. MCMC on ``p(z0 | z_k, y) ~ N(z0; z0_hat, sigma_k^2 I) exp(-||A(D(z0)) - y||^2 / tau^2)``, started at
   ``z0_hat``, with the score ``s(z) = (z0_hat - z) / sigma_k^2 - clip(grad_z ||A(D(z)) - y||^2) / tau^2`` (the
   data gradient through the decoder, clipped elementwise to ``[-grad_clip, grad_clip]``) and the step size
   ``lr_k = lr (1 + k / (N + 1) (lr_min_ratio - 1))``:

   * ``mc_algo="hmc"`` (the official latent configs): damped Hamiltonian dynamics, ``v ~ N(0, I)`` at the start of
     each level, ``v <- m v + sqrt(lr_k) s(z) + sqrt(2 (1 - m)) xi``, ``z <- z + sqrt(lr_k) v``
     (``cores/mcmc.py:82-83, 89-92``);
   * ``mc_algo="langevin"``: ``z <- z + lr_k s(z) + sqrt(2 lr_k) xi`` (``cores/mcmc.py:87-88``);
3. re-noise ``z_{k+1} = z0_y + sigma_{k+1} n``; the last ``z0_y`` is returned (the runner decodes it).

The level plan, the Euler ODE (``time_input``), the step-size schedule and the per-item ``lr`` / ``tau`` are the
pixel DAPS's (:class:`reddiff.baselines.daps.DAPS`), reused as they are: the difference is only the inner chain
(through the decoder, clipped gradient, HMC).  Network calls per image: ``steps * ode_steps`` (100 with the
defaults); decoder calls: ``steps * langevin_steps`` forward + backward (one per MCMC step).

Exactness: on :class:`reddiff.priors.latent.LinearDecoderGMM` with ``tau=None`` (the true likelihood),
``grad_clip=None``, ``mc_algo="langevin"``, ``ode_steps=1, ode_sigma_min=0`` (Tweedie), the chain is the pixel
DAPS's exact variant on the latent posterior under ``A W``; its error against the exact posterior falls with the
number of levels (tests/test_latent_solvers.py).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from reddiff.baselines.daps import DAPS, per_item_value

MC_ALGOS = ("hmc", "langevin")


def clipped_data_grad(z: torch.Tensor, y: torch.Tensor, operator, clip: Optional[float]) -> torch.Tensor:
    """``grad_z ||A(D(z)) - y||^2`` per item by autograd through the operator (one decoder call, forward and
    backward), clipped elementwise to ``[-clip, clip]`` (``forward_operator/__init__.py:396-402``); ``None``: not
    clipped."""
    with torch.enable_grad():
        zg = z.detach().requires_grad_(True)
        loss = (operator.forward(zg) - y).square().sum()
        (g,) = torch.autograd.grad(loss, zg)
    return g if clip is None else g.clamp(-clip, clip)


class LatentDAPS(DAPS):
    """Latent-DAPS (DAPS-100 on a latent prior; defaults: ``configs/sampler/latent_edm_daps.yaml`` and the ``ldm:``
    block of ``configs/task/down_sampling.yaml``).

    Args (besides the pixel DAPS's ``sigma_max``, ``sigma_min``, ``ode_sigma_min``, ``poly``, ``time_input``):
        steps: annealing levels (50); ode_steps: Euler steps per level (2); NFE = steps * ode_steps.
        langevin_steps: MCMC steps per level (24); lr, lr_min_ratio: step size and its final ratio (1.35e-4, 0.023).
        tau: data-term scale, likelihood ``exp(-||.||^2 / tau^2)`` (0.01); ``None``: ``sqrt(2) * noise_std``.
        mc_algo: ``"hmc"`` (official latent configs) or ``"langevin"``; momentum: the HMC damping ``m`` (0.86).
        grad_clip: elementwise clip of the data gradient (1.0, the official ``LatentWrapper``); ``None``: none.
    """

    name = "latent_daps"
    needs_latent = True
    needs_grad = False  # differentiates through the decoder only, never through the network
    requires: tuple = ("grad",)  # differentiates the data term through operator.forward (refuses a black-box task)
    per_item = ("lr", "tau")
    # LinearDecoderGMM (benchmarks/gmm_posterior.py --latent): the exact variant of the pixel DAPS's GMM settings
    gmm_hparams = {"steps": 80, "sigma_max": 100.0, "sigma_min": 0.1, "ode_steps": 1, "ode_sigma_min": 0.0,
                   "tau": None, "grad_clip": None, "mc_algo": "langevin", "langevin_steps": 30, "lr": 0.005,
                   "lr_min_ratio": 0.3}
    gmm_tune_grid = {"steps": [25, 40, 80], "lr": [0.002, 0.005]}
    tune_space = {"lr": "tag(log, interval(1e-6, 1e-3))", "tau": "tag(log, interval(0.003, 0.1))",
                  "momentum": "interval(0.3, 0.95)"}
    test_overrides = {"steps": 6, "ode_steps": 2, "langevin_steps": 3, "tau": None, "sigma_max": 10.0}
    exact_gaussian = None  # the latent exactness test is in tests/test_latent_solvers.py (LinearDecoderGMM)

    def __init__(self, steps: int = 50, ode_steps: int = 2, sigma_max: float = 10.0, sigma_min: float = 0.1,
                 ode_sigma_min: float = 0.001, poly: float = 7.0, langevin_steps: int = 24, lr=1.35e-4,
                 lr_min_ratio: float = 0.023, tau=0.01, mc_algo: str = "hmc", momentum: float = 0.86,
                 grad_clip: Optional[float] = 1.0, spacing: str = "default", time_input: str = "grid",
                 log_every: int = 10):
        super().__init__(steps=steps, ode_steps=ode_steps, sigma_max=sigma_max, sigma_min=sigma_min,
                         ode_sigma_min=ode_sigma_min, poly=poly, langevin_steps=langevin_steps, lr=lr,
                         lr_min_ratio=lr_min_ratio, tau=tau, mcmc="langevin", langevin_impl="loop",
                         spacing=spacing, time_input=time_input, log_every=log_every)
        if mc_algo not in MC_ALGOS:
            raise ValueError(f"latent_daps: mc_algo must be one of {', '.join(MC_ALGOS)}, got {mc_algo!r}")
        self.mc_algo = mc_algo
        if isinstance(momentum, bool) or not 0 <= float(momentum) < 1:
            raise ValueError(f"latent_daps: momentum must be in [0, 1), got {momentum!r}")
        self.momentum = float(momentum)
        if grad_clip is not None:
            grad_clip = per_item_value("grad_clip", grad_clip)
            if isinstance(grad_clip, list):
                raise ValueError("latent_daps: grad_clip must be one number (or null)")
        self.grad_clip = grad_clip

    def sample(self, y: torch.Tensor, operator, prior, rng, callback: Optional[Callable] = None) -> torch.Tensor:
        self.check_prior(prior)  # a pixel prior is refused here, before any work
        self.check(operator)
        plan = self.plan(prior)
        B = y.shape[0]
        shape = self.sample_shape(y, prior)
        like = torch.empty(shape, dtype=y.dtype, device=y.device)
        tau = self._coef(math.sqrt(2.0) * operator.noise_std if self.tau is None else self.tau, B, like, "tau")
        inv_tau2 = 1.0 / tau.square()
        lr0 = self._coef(self.lr, B, like, "lr")
        last = len(plan) - 1
        m = self.momentum

        def noise():
            return rng.randn(shape, dtype=y.dtype).to(y.device)

        with torch.no_grad():
            z = plan[0][1] * noise()
            for k, (t, s_k, pts, s_next) in enumerate(plan):
                z0_hat = self._ode(z, pts, prior)
                lr = lr0 * (1.0 + k / (self.steps + 1) * (self.lr_min_ratio - 1.0))
                u = z0_hat
                v = noise() if self.mc_algo == "hmc" and self.langevin_steps > 0 else None
                for _ in range(self.langevin_steps):
                    score = (z0_hat - u) / s_k ** 2 - clipped_data_grad(u, y, operator, self.grad_clip) * inv_tau2
                    if v is None:
                        u = u + lr * score + (2.0 * lr).sqrt() * noise()
                    else:
                        v = m * v + lr.sqrt() * score + math.sqrt(2.0 * (1.0 - m)) * noise()
                        u = u + lr.sqrt() * v
                z = u + s_next * noise() if s_next > 0 else u
                if callback is not None and self.should_log(k, last):
                    callback(k, {"t": t, "sigma": s_k, "x0": u})
        return z.detach()
