"""OT-ODE: training-free linear inverse problems with flow priors (Pokle, Muckley, Chen, Karrer, TMLR 2024).

Pi-GDM's Gaussian approximation ``p(x0 | x_s) ~ N(D(x_s), r_s^2 I)`` carried to the flow ODE, as the PnP-Flow
repository implements it.  On our flow time ``s`` (noise at ``s = 1``; that code has data at ``t = 1``, ``s = 1 - t``),
from ``x = (1 - s_0) H^T y + s_0 n`` at ``s_0 = 1 - start_time`` with Euler steps of ``1 / N``:

    D    = D(x / (1 - s), s / (1 - s))                    clean estimate (one network call, differentiated)
    r^2  = s^2 / (s^2 + (1 - s)^2)                         Cov[x0 | x_s] of a standard-normal prior
    g    = J^T H^T (r^2 H H^T + sigma_y^2 I)^{-1} (y - H D),   J = dD / dx   (a vector-Jacobian product)
    v    = (D - x) / s + gamma s / (1 - s) g               posterior velocity towards the data (t = 1 - s)
    x   <- x + v / N

with ``gamma = 1`` (``constant``) or ``sqrt(t / (t^2 + (1 - t)^2))`` (``gamma_t``), ``t = 1 - s``.  Since
``v_data = x / t + (1 - t) / t * score``, ``s / (1 - s) g`` is the Gaussian-approximation likelihood score added
to the score: with ``gamma = 1`` and a standard-normal prior the approximation is exact and the ODE transports
``p(x_{s_0} | y)`` to the exact posterior (tested).  The inverse is the closed form in the operator's SVD
(``U diag(1 / (r^2 s_i^2 + sigma_y^2)) U^T``, as Pi-GDM here), so the operator must have an SVD; sigma_y is the
operator's model-space noise std.  One NFE per step (forward + VJP, counted as DPS counts it).
"""
from __future__ import annotations

import math

import torch

from reddiff.baselines.flow.common import max_time
from reddiff.samplers.base import Sampler, bcast, validate_steps

GAMMAS = ("constant", "gamma_t")


class OTODE(Sampler):
    """OT-ODE sampler (paper: arXiv 2310.04432, Alg. 1; code: annegnx/PnP-Flow ``pnpflow/methods/ot_ode.py``).

    Args:
        steps: N, the Euler grid ``t_k = k / N`` (official ``steps_ode`` 100); the chain runs its last
            ``N - max(1, int(N start_time))`` steps, one NFE each.
        start_time: official ``start_time`` in (0, 1) (data time; ours ``s_0 = 1 - start_time``), per task.
        gamma: ``constant`` or ``gamma_t`` (per task in the official scripts).
        log_every: callback every ``log_every`` steps and at the last one.
    """

    name = "ot_ode"
    requires: tuple = ("svd",)
    needs_grad = True
    # tuned on the GMM tuning seed (docs/SAMPLERS.md, ot_ode), same command with --samplers ot_ode: start_time 0.01,
    # gamma_t: mean SW/SW(prior) 0.488 (official 0.2 constant: 0.909); 99 NFE
    gmm_hparams = {"steps": 100, "start_time": 0.01, "gamma": "gamma_t"}
    gmm_tune_grid = {"start_time": [0.01, 0.1, 0.2, 0.4], "gamma": ["constant", "gamma_t"]}
    # tuning space (reddiff.tune.sweeper; unverified: our range around the official 0.1..0.4)
    tune_space = {"start_time": "interval(0.02, 0.6)", "gamma": "choice(constant, gamma_t)"}
    # exact for a standard-normal prior (r_s^2 is then Cov[x0 | x_s]); the start x = (1 - s_0) H^T y + s_0 n is
    # off p(x_{s_0} | y) by O(start_time), and Euler's error is O(1 / N)
    exact_gaussian = {"overrides": {"steps": 1000, "start_time": 0.007, "gamma": "constant"}, "prior": "standard",
                      "mean_tol": 0.05, "cov_tol": 0.1}

    def __init__(self, steps: int = 100, start_time: float = 0.2, gamma: str = "constant", log_every: int = 10):
        self.steps = validate_steps("ot_ode", steps)
        if not (isinstance(start_time, (int, float)) and 0.0 < float(start_time) < 1.0):
            raise ValueError(f"ot_ode: start_time must be in (0, 1), got {start_time!r}")
        if gamma not in GAMMAS:
            raise ValueError(f"ot_ode: gamma must be one of {', '.join(GAMMAS)}, got {gamma!r}")
        self.start_time, self.gamma = float(start_time), gamma
        self.log_every = max(1, int(log_every))

    def first(self) -> int:
        """Index of the first Euler step, ``int(N start_time)`` as the official loop, at least 1 (at t = 0 the
        official guidance weight ``(1 - t) / t`` is infinite)."""
        return max(1, int(self.steps * self.start_time))

    def expected_nfe(self, prior) -> int:
        self.check_prior(prior)
        return self.steps - self.first()

    def guidance_vector(self, operator, y, D, r2, sigma2, shape):
        """``H^T (r^2 H H^T + sigma_y^2 I)^{-1} (y - H D)`` in the operator's SVD (zero singular values dropped)."""
        s = operator.singulars().to(D)
        s = s.reshape(1, -1) if s.ndim == 1 else s
        s_m = s.new_zeros(s.shape[0], operator.y_numel())
        s_m[:, : s.shape[1]] = s
        obs = s_m > 0
        den = torch.where(obs, r2 * s_m.square() + sigma2, torch.ones_like(s_m))
        inv = torch.where(obs, 1.0 / den, torch.zeros_like(s_m))
        return operator.adjoint(operator.U(inv * operator.Ut(y - operator.forward(D)))).reshape(shape)

    def sample(self, y, operator, prior, rng, callback=None):
        self.check(operator)
        self.check_prior(prior)
        s_cap = max_time(prior)
        shape = self.sample_shape(y, prior)
        sigma2 = float(operator.noise_std) ** 2
        N, k0 = self.steps, self.first()
        with torch.no_grad():
            x_adj = operator.adjoint(y).reshape(shape)
            s0 = 1.0 - self.start_time
            x = (1.0 - s0) * x_adj + s0 * rng.randn(shape, dtype=y.dtype).to(y.device)
        for k in range(k0, N):
            t = k / N
            s = 1.0 - t
            sc = min(s, s_cap)
            r2 = s * s / (s * s + t * t)
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                D = prior.denoise(xg / (1.0 - sc), sc / (1.0 - sc))
                vec = self.guidance_vector(operator, y, D.detach(), r2, sigma2, shape)
                (g,) = torch.autograd.grad((D * vec).sum(), xg)
            gamma = 1.0 if self.gamma == "constant" else math.sqrt(t / (t * t + s * s))
            with torch.no_grad():
                v = (D.detach() - x) / s + gamma * (s / t) * g
                x = x + v / N
            if callback is not None and self.should_log(k - k0, N - 1 - k0):
                callback(k - k0, {"t": s, "x0": D.detach(), "guidance_norm": g.reshape(shape[0], -1).norm(dim=1)})
        return x.detach()
