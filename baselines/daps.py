"""DAPS: decoupled annealing posterior sampling (Zhang, Chu, Berner, Meng, Anandkumar, Song, CVPR 2025,
arXiv 2407.01521; code zhangbingliang2019/DAPS, ``sampler.py`` and ``cores/``).

DAPS works in the variance-exploding (EDM) parametrisation ``x_sigma = x0 + sigma n``.  Our priors are VP
(``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) e``, DDPM schedule), and the conversion is exact: ``sigma_t =
sqrt((1 - a_t) / a_t)``, ``x_VE = x_VP / sqrt(a_t)``, the same ``eps``, so the EDM denoiser is
``D(x, sigma_t) = x - sigma_t eps(sqrt(a_t) x, t)``.  The network exists only at the discrete ``t``, so every
continuous noise level of DAPS's schedules is snapped to the nearest discrete ``sigma_t`` (in log sigma) and the
snapped value is used everywhere (ODE steps, Langevin prior width, re-noising), which keeps each step consistent
with the level the network was evaluated at.  For the annealing levels ``sigma_0 > ... > sigma_{N-1}`` (EDM
"poly-7" grid from ``sigma_max`` to ``sigma_min``, N + 1 points, the last dropped; ``cores/scheduler.py:38-44,
272-315``) one step is

1. ``x0_hat``: the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma = eps`` from ``sigma_k`` to
   ``ode_sigma_min`` with ``ode_steps`` Euler steps on a poly-7 grid (``cores/scheduler.py:366-408``,
   ``sampler.py:66-70``); in VP terms each Euler step is exactly a DDIM (eta = 0) step.  One network call per step.
2. Langevin on ``p(x0 | x_k, y) ~ N(x0; x0_hat, r_k^2 I) exp(-||y - A(x0)||^2 / tau^2)`` with ``r_k = sigma_k``
   (``cores/mcmc.py:46-50, 72, 88``): ``x <- x + lr_k [-grad ||A(x) - y||^2 / tau^2 + (x0_hat - x) / r_k^2]
   + sqrt(2 lr_k) z``, started at ``x0_hat``, ``lr_k = lr (1 + k / (N + 1) (lr_min_ratio - 1))``
   (``cores/mcmc.py:174-180``, ``sampler.py:73``).  Only the data term's gradient is needed (adjoint for linear
   operators, autograd through ``forward`` otherwise): nonlinear operators work, and no network gradient.
   For an SVD operator the target is Gaussian and the chain linear, so by default (``langevin_impl="auto"``) the
   ``langevin_steps`` steps are replaced by one draw from their exact joint law (:func:`ula_gaussian`): the same
   distribution of ``x0_y`` as the loop, for one noise draw per level instead of 100 (on the 100-NFE demo rows
   the loop took most of the time); ``langevin_impl="loop"`` runs the official step-by-step chain.
3. Re-noise: ``x_{k+1} = x0_y + sigma_{k+1} n`` (``sigma_N = 0``: the last ``x0_y`` is returned).

``tau`` keeps the official convention (likelihood ``exp(-||.||^2 / tau^2)``, i.e. noise std ``tau / sqrt(2)``);
``tau=None`` uses the true likelihood of the operator, ``tau = sqrt(2) * noise_std``.  Exactness (tests): for a
Gaussian prior and ``ode_steps=1, ode_sigma_min=0`` (``x0_hat`` = Tweedie), the low-noise steps are unadjusted
Langevin on the posterior with step ``sigma_k^2``, so the output tends to the exact posterior as the annealing and
Langevin steps grow; the multi-step ODE endpoint instead shrinks by ``1/sqrt(1 + sigma^2)`` rather than
``1/(1 + sigma^2)`` and the chain then targets a prior of twice the variance (measured in docs/SAMPLERS.md).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from reddiff.core.errors import UserError
from reddiff.operators.base import SVDOperator
from reddiff.samplers.base import Sampler, bcast, validate_steps


class LikelihoodNoiseError(UserError, ValueError):
    """The configured likelihood needs a noise std > 0 and the task has none (raised up front by ``check``:
    one line, exit code 2, before any image is processed)."""


#: how DAPS evaluates the prior at its noise levels (``time_input``; the official is ``vp_continuous``)
TIME_INPUTS = ("grid", "continuous", "vp_continuous")


def ve_sigmas(schedule) -> torch.Tensor:
    """``sigma_t = sqrt((1 - a_t) / a_t)`` for ``t = 0..T-1`` (float64, increasing)."""
    a = schedule.alpha_bar
    return ((1 - a) / a).sqrt()


def snap(sigma: float, sigmas: torch.Tensor) -> int:
    """The discrete ``t`` whose ``sigma_t`` is nearest to ``sigma`` in log scale."""
    return int(torch.argmin((sigmas.log() - math.log(sigma)).abs()))


def poly_grid(s_max: float, s_min: float, n: int, p: float = 7.0) -> list[float]:
    """EDM "poly-p" grid: ``(s_max^(1/p) + r (s_min^(1/p) - s_max^(1/p)))^p`` for ``r = linspace(0, 1, n)``
    (``cores/scheduler.py:278``; the same formula as EDM's Karras schedule)."""
    a, b = s_max ** (1 / p), s_min ** (1 / p)
    return [(a + (i / (n - 1)) * (b - a)) ** p if n > 1 else s_max for i in range(n)]


def data_grad(x: torch.Tensor, y: torch.Tensor, operator) -> torch.Tensor:
    """``grad_x ||A(x) - y||^2`` per item: ``2 A^T (A x - y)`` for linear operators, autograd otherwise."""
    if operator.linear:
        return 2.0 * operator.adjoint(operator.forward(x) - y)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        loss = (operator.forward(xg) - y).square().sum()
        (g,) = torch.autograd.grad(loss, xg)
    return g


def _per_item(v):
    """A float, a 0-d tensor or a per-item tensor ``(B, 1, ...)``, made broadcastable against ``(B, k)``."""
    return v.reshape(v.shape[0], 1) if isinstance(v, torch.Tensor) and v.ndim > 1 else v


def _spectral(m: torch.Tensor, y: torch.Tensor, operator):
    """``V^T m``, the singular values as ``(1 or B, k)``, ``k`` and ``(U^T y)[:, :k]`` (SVD operators)."""
    mb = operator.Vt(m)
    s = operator.singulars().to(mb)
    s = s.reshape(1, -1) if s.ndim == 1 else s
    k = s.shape[1]
    return mb, s, k, operator.Ut(y)[:, :k]


def gaussian_conditional(m: torch.Tensor, r2, prec, y: torch.Tensor, operator, rng) -> torch.Tensor:
    """One exact draw from ``N(x; m, r2 I) exp(-prec/2 ||y - A x||^2)`` for an SVD operator ``A = U S V^T``:
    independent in the spectral basis, component ``i`` with precision ``1/r2 + prec s_i^2`` and mean
    ``(mb_i / r2 + prec s_i (U^T y)_i) / (1/r2 + prec s_i^2)`` (``mb = V^T m``); null-space components keep
    ``N(mb_i, r2)``.  ``r2``/``prec`` are floats or per-item tensors.  The limit of infinitely many
    Langevin steps on the same target (DAPS's inner chain, PnP-DM's likelihood step)."""
    r2, prec = _per_item(r2), _per_item(prec)
    mb, s, k, uty = _spectral(m, y, operator)
    noise = rng.randn(mb.shape, dtype=mb.dtype).to(mb.device)
    # null-space components: N(mb_i, r2), in one fused pass (this draw dominates the cost at large d)
    out = torch.add(mb, noise, alpha=math.sqrt(r2)) if isinstance(r2, float) else mb + r2.sqrt() * noise
    p_k = 1.0 / r2 + prec * s.square()
    out[:, :k] = (mb[:, :k] / r2 + prec * s * uty) / p_k + p_k.rsqrt() * noise[:, :k]
    return operator.V(out).reshape(m.shape)


def ula_gaussian(m: torch.Tensor, r2: float, prec, lr, n: int, y: torch.Tensor, operator, rng) -> torch.Tensor:
    """One draw from the law of ``n`` unadjusted Langevin steps ``x <- x + lr grad log pi(x) + sqrt(2 lr) z`` on
    ``pi = N(m, r2 I) exp(-prec/2 ||y - A x||^2)``, started at ``m``, for an SVD operator (DAPS's inner loop).

    In the spectral basis each component is an AR(1) chain ``u <- a u + (1 - a) mu + sqrt(2 lr) xi`` with ``p`` its
    precision (as in :func:`gaussian_conditional`), ``mu`` its exact conditional mean and ``a = 1 - lr p``; ``V`` is
    orthonormal, so ``V^T z`` is again standard normal and the chains are independent.  After ``n`` steps
    ``u_n = a^n m + (1 - a^n) mu + sqrt(2 (1 - a^(2n)) / (p (2 - lr p))) xi``: the same law as the loop, its step-size
    bias included (variance ``-> 2 / (p (2 - lr p))``, not ``1 / p``), for one noise draw instead of ``n``."""
    lr, prec = _per_item(lr), _per_item(prec)
    mb, s, k, uty = _spectral(m, y, operator)
    f64 = dict(dtype=torch.float64, device=mb.device)
    lr = torch.as_tensor(lr, **f64)
    prec = torch.as_tensor(prec, **f64)

    def coefs(p):
        """``a^n`` and the standard deviation after ``n`` steps for precision ``p`` (float64)."""
        c = lr * p
        an = (1.0 - c) ** n
        two_minus_c = 2.0 - c
        # a = -1 (lr p = 2): the variance sum is 2 lr n (the closed form is 0/0 there)
        var = torch.where(two_minus_c.abs() > 1e-12, 2.0 * (1.0 - an.square()) / (p * two_minus_c), 2.0 * lr * n)
        return an, var.sqrt()

    noise = rng.randn(mb.shape, dtype=mb.dtype).to(mb.device)
    _, sd0 = coefs(torch.as_tensor(1.0 / r2, **f64))            # null space: mean stays m
    out = mb + sd0.to(mb.dtype).reshape(-1, 1) * noise if sd0.ndim else torch.add(mb, noise, alpha=float(sd0))
    p_k = 1.0 / r2 + prec * s.double().square()
    mu = (mb[:, :k].double() / r2 + prec * s.double() * uty.double()) / p_k
    an, sd = coefs(p_k)
    out[:, :k] = (an * mb[:, :k].double() + (1.0 - an) * mu + sd * noise[:, :k].double()).to(mb.dtype)
    return operator.V(out).reshape(m.shape)


def per_item_value(name: str, v, allow_none: bool = False):
    """A positive finite float or a list of them (one per batch item); ``None`` passes when allowed."""
    if v is None and allow_none:
        return None
    vals = [v] if isinstance(v, (int, float)) else list(v)
    if not vals or any(isinstance(u, bool) or not (math.isfinite(float(u)) and float(u) > 0) for u in vals):
        raise ValueError(f"daps: {name} must be a positive finite number (or one per item), got {v!r}")
    return float(vals[0]) if isinstance(v, (int, float)) else [float(u) for u in vals]


class DAPS(Sampler):
    """DAPS sampler (defaults: DAPS-1K, ``configs/sampler/edm_daps.yaml`` and ``configs/task/*.yaml`` "pixel").

    Args:
        steps: annealing levels N (200).  Network calls per image: about ``steps * ode_steps``
            (:meth:`expected_nfe` is exact: ODE steps that snap onto one discrete level are skipped).
        ode_steps: Euler steps of the inner PF-ODE (5).
        sigma_max, sigma_min: annealing range in VE units (100, 0.1).
        ode_sigma_min: where the inner ODE stops (0.01; 0 = finish with a full denoising step, Tweedie).
        poly: exponent of the poly grids (7).
        langevin_steps, lr, lr_min_ratio: the inner Langevin chain (100, 1e-4, 0.01); ``lr`` may be per item.
        tau: data-term scale, official convention (0.01); per item allowed; ``None``: ``sqrt(2) * noise_std``.
        mcmc: ``"langevin"`` (official) or ``"exact"``: draw ``x0_y`` exactly from the same Gaussian target
            (:func:`gaussian_conditional`, SVD operators only), the limit of infinitely many Langevin steps.
        langevin_impl: how ``mcmc="langevin"`` runs: ``"loop"`` (step by step, as the official code; any
            operator), ``"closed_form"`` (SVD operators: one draw from the law of the ``langevin_steps`` steps,
            :func:`ula_gaussian`; the same distribution, not the same random numbers) or ``"auto"`` (closed form
            where the operator has an SVD, else the loop).
        spacing: accepted for the compat profile; DAPS uses sigma grids, not strided timesteps.
        time_input: how the prior is evaluated at DAPS's noise levels: ``"grid"`` (ours: every level snapped to the
            nearest discrete ``sigma_t``, the network at its integer t), ``"continuous"`` (the levels as they are,
            ``prior.denoise`` in the prior's own dialect) or ``"vp_continuous"`` (the official: the levels as they
            are, an epsilon network fed EDM ``VPPrecond``'s ``999 sigma_inv(sigma)``, ``model/precond.py:48-56``;
            ``compat.daps_time_input``).
        log_every: callback every ``log_every`` annealing levels and at the last one.
    """

    name = "daps"
    requires: tuple = ("grad",)  # differentiates the data term through operator.forward (refuses a black-box task)
    needs_grad = False
    per_item = ("lr", "tau")
    # GMM settings: exact inner draw, Tweedie x0_hat (1 NFE per level), the operator's own likelihood (tau=None);
    # levels and range chosen from gmm_tune_grid on the tuning seed (results/gmm_daps_pnpdm.md):
    # python -m benchmarks.gmm_posterior --tune --samplers daps --dims 8,80 --dims-y 1,4 --problems 3 --samples 500
    # (and with --dims 8,80,800: the same winner).  Winner: 80 levels, sigma_max 100, sigma_min 0.1 (score 0.567 on
    # d = 8, 80; 40 levels: 0.622, 25: 0.667).  80 NFE: about 1-2 s per problem at d = 800 (2000 samples).
    gmm_hparams = {"steps": 80, "sigma_max": 100.0, "sigma_min": 0.1, "ode_steps": 1, "ode_sigma_min": 0.0,
                   "mcmc": "exact", "tau": None}
    # steps <= 80: the time budget at d = 800 (about 25 ms per level for 2000 samples, unloaded); sigma_max 150
    # covers the prior's spread along the means at d = 800 (std 8 sqrt(d) = 226; the largest sigma_t is 157)
    gmm_tune_grid = {"steps": [25, 40, 80], "sigma_max": [100.0, 150.0], "sigma_min": [0.02, 0.1]}
    test_overrides = {"steps": 6, "ode_steps": 2, "langevin_steps": 3, "tau": None}
    # Tweedie x0_hat (one Euler step to sigma = 0): the variant that is asymptotically exact (module docstring);
    # lr below 2 / (max curvature) of this problem.  Errors at 120 levels: about 0.06 / 0.06 (tests/test_daps.py)
    exact_gaussian = {"overrides": {"steps": 120, "ode_steps": 1, "ode_sigma_min": 0.0, "sigma_max": 20.0,
                                    "sigma_min": 0.05, "langevin_steps": 30, "lr": 0.005, "lr_min_ratio": 0.3,
                                    "tau": None},
                      "mean_tol": 0.12, "cov_tol": 0.12}

    def __init__(self, steps: int = 200, ode_steps: int = 5, sigma_max: float = 100.0, sigma_min: float = 0.1,
                 ode_sigma_min: float = 0.01, poly: float = 7.0, langevin_steps: int = 100, lr=1e-4,
                 lr_min_ratio: float = 0.01, tau=0.01, mcmc: str = "langevin", langevin_impl: str = "auto",
                 spacing: str = "default", time_input: str = "grid", log_every: int = 10):
        self.steps = validate_steps("daps", steps)
        if time_input not in TIME_INPUTS:
            raise ValueError(f"daps: time_input must be one of {', '.join(TIME_INPUTS)}, got {time_input!r}")
        self.time_input = time_input
        self.ode_steps = validate_steps("daps (ode_steps)", ode_steps)
        if isinstance(langevin_steps, bool) or not isinstance(langevin_steps, int) or langevin_steps < 0:
            raise ValueError(f"daps: langevin_steps must be an integer >= 0, got {langevin_steps!r}")
        self.langevin_steps = langevin_steps
        self.sigma_max, self.sigma_min, self.ode_sigma_min = float(sigma_max), float(sigma_min), float(ode_sigma_min)
        if not (math.isfinite(self.sigma_max) and self.sigma_max > self.sigma_min > 0):
            raise ValueError(f"daps: need sigma_max > sigma_min > 0, got {sigma_max}, {sigma_min}")
        if not 0 <= self.ode_sigma_min < self.sigma_min:
            raise ValueError(f"daps: need 0 <= ode_sigma_min < sigma_min, got {ode_sigma_min}")
        if not (math.isfinite(float(poly)) and float(poly) > 0):
            raise ValueError(f"daps: poly must be > 0, got {poly}")
        self.poly = float(poly)
        self.lr = per_item_value("lr", lr)
        self.tau = per_item_value("tau", tau, allow_none=True)
        if not 0 < float(lr_min_ratio) <= 1:
            raise ValueError(f"daps: lr_min_ratio must be in (0, 1], got {lr_min_ratio}")
        self.lr_min_ratio = float(lr_min_ratio)
        if mcmc not in ("langevin", "exact"):
            raise ValueError(f"daps: mcmc must be 'langevin' or 'exact', got {mcmc!r}")
        self.mcmc = mcmc
        if langevin_impl not in ("auto", "loop", "closed_form"):
            raise ValueError(f"daps: langevin_impl must be 'auto', 'loop' or 'closed_form', got {langevin_impl!r}")
        self.langevin_impl = langevin_impl
        if mcmc == "exact" or (mcmc == "langevin" and langevin_impl == "closed_form"):
            self.requires = ("svd",)
        self.spacing = spacing
        self.log_every = max(1, int(log_every))

    def check(self, operator) -> None:
        super().check(operator)
        if self.tau is None and not operator.noise_std > 0:
            raise LikelihoodNoiseError("daps: tau=None (the operator's own likelihood) needs a noisy operator "
                                       "(sigma_y > 0); give sampler.tau explicitly for noiseless tasks")

    # ------------------------------------------------------------------ schedule (snapped to the prior's levels)
    def plan(self, prior) -> list[tuple[int, float, list[tuple[int, float]], float]]:
        """Per annealing level ``(t_k, sigma_k, ode, sigma_{k+1})``; ``ode`` is the list of snapped ODE points
        ``(t, sigma)`` from ``(t_k, sigma_k)`` down (``(-1, 0.0)`` for ``ode_sigma_min = 0``), consecutive
        duplicates removed: one Euler step, one network call, per pair of consecutive points."""
        sig = ve_sigmas(prior.schedule)
        if self.sigma_max > float(sig[-1]) * 1.01:
            raise ValueError(f"daps: sigma_max={self.sigma_max:g} exceeds the prior's largest noise level "
                             f"{float(sig[-1]):.4g}")
        if self.time_input != "grid":  # the levels as they are: t = -1 marks "no grid step"
            grid = poly_grid(self.sigma_max, self.sigma_min, self.steps + 1, self.poly)[:-1]
            return [(-1, s, [(-1, p) for p in poly_grid(s, self.ode_sigma_min, self.ode_steps + 1, self.poly)],
                     grid[k + 1] if k + 1 < len(grid) else 0.0) for k, s in enumerate(grid)]
        levels = [snap(s, sig) for s in poly_grid(self.sigma_max, self.sigma_min, self.steps + 1, self.poly)[:-1]]
        out = []
        for k, t in enumerate(levels):
            pts: list[tuple[int, float]] = []
            for s in poly_grid(float(sig[t]), self.ode_sigma_min, self.ode_steps + 1, self.poly):
                j = snap(s, sig) if s > 0 else -1
                if not pts or j != pts[-1][0]:
                    pts.append((j, float(sig[j]) if j >= 0 else 0.0))
            s_next = float(sig[levels[k + 1]]) if k + 1 < len(levels) else 0.0
            out.append((t, float(sig[t]), pts, s_next))
        return out

    def expected_nfe(self, prior) -> int:
        return sum(len(pts) - 1 for _, _, pts, _ in self.plan(prior))

    # ------------------------------------------------------------------ sampling
    def _ode(self, x, pts, prior):
        """Euler steps of the PF-ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` in VE coordinates through the points
        (one network call each): at the snapped grid steps, or at the levels themselves (``time_input``)."""
        if self.time_input != "grid":
            dialect = None if self.time_input == "continuous" else self.time_input
            for (_, s), (_, s_next) in zip(pts[:-1], pts[1:]):
                x = x + (s_next - s) * (x - prior.denoise(x, s, dialect=dialect)) / s
            return x
        for (t, s), (_, s_next) in zip(pts[:-1], pts[1:]):
            a = float(prior.schedule.alpha_bar_at(t))
            eps = prior.eps(math.sqrt(a) * x, t)
            x = x + (s_next - s) * eps
        return x

    def closed_form(self, operator) -> bool:
        """Whether the Langevin chain runs as one closed-form draw (:func:`ula_gaussian`) on this operator."""
        return self.mcmc == "langevin" and self.langevin_impl != "loop" and isinstance(operator, SVDOperator)

    def _coef(self, value, B, like, name):
        if isinstance(value, list) and len(value) != B:
            raise ValueError(f"daps: per-item {name} has {len(value)} values for a batch of {B}")
        return bcast(torch.as_tensor(value, dtype=torch.float64), like)

    def sample(self, y: torch.Tensor, operator, prior, rng, callback: Optional[Callable] = None) -> torch.Tensor:
        self.check(operator)
        self.check_prior(prior)
        plan = self.plan(prior)
        B = y.shape[0]
        shape = self.sample_shape(y, prior)
        like = torch.empty(shape, dtype=y.dtype, device=y.device)
        if self.tau is None:
            tau = self._coef(math.sqrt(2.0) * operator.noise_std, B, like, "tau")
        else:
            tau = self._coef(self.tau, B, like, "tau")
        inv_tau2 = 1.0 / tau.square()
        lr0 = self._coef(self.lr, B, like, "lr")
        last = len(plan) - 1
        closed = self.closed_form(operator)
        loop_steps = self.langevin_steps if self.mcmc == "langevin" and not closed else 0
        with torch.no_grad():
            x = plan[0][1] * rng.randn(shape, dtype=y.dtype).to(y.device)
            for k, (t, s_k, pts, s_next) in enumerate(plan):
                x0_hat = self._ode(x, pts, prior)
                lr = lr0 * (1.0 + k / (self.steps + 1) * (self.lr_min_ratio - 1.0))
                noise_scale = (2.0 * lr).sqrt()
                z = x0_hat
                if self.mcmc == "exact":
                    z = gaussian_conditional(x0_hat, s_k ** 2, 2.0 * inv_tau2, y, operator, rng)
                elif closed and self.langevin_steps > 0:
                    z = ula_gaussian(x0_hat, s_k ** 2, 2.0 * inv_tau2, lr, self.langevin_steps, y, operator, rng)
                for _ in range(loop_steps):
                    score = (x0_hat - z) / s_k ** 2 - data_grad(z, y, operator) * inv_tau2
                    z = z + lr * score + noise_scale * rng.randn(shape, dtype=y.dtype).to(y.device)
                x = z + s_next * rng.randn(shape, dtype=y.dtype).to(y.device) if s_next > 0 else z
                if callback is not None and self.should_log(k, last):
                    callback(k, {"t": t, "sigma": s_k, "x0": z})
        return x.detach()
