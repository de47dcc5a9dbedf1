"""Sampler protocol: ``sample(y, operator, prior, rng, callback=None) -> x0``, and the work samplers share.

Samplers are configured through Hydra (one ``conf/sampler/<name>.yaml`` whose ``_target_`` is the class), never
assume 4-D images (the Gaussian-mixture prior is ``(B, d)``), and draw all randomness from ``rng``
(:class:`reddiff.core.rng.BatchRNG`), so a batch gives the same result as a loop over its items.

A sampler declares what it needs and how it is benchmarked as class attributes, so nothing outside its own file
lists it: ``requires`` (operator capabilities, checked up front by :meth:`Sampler.check`), ``needs_grad`` (it
differentiates through the network: speed limit 1.10 x forward+backward instead of 1.05 x forward),
``gmm_hparams`` / ``gmm_tune_grid`` (the Gaussian-mixture benchmark's settings; ``None``: not in its default list),
``per_item`` (hyperparameters that may take one value per batch item, for batched tuning).

``callback(step, info)`` (optional) receives sparse progress every ``log_every`` steps and at the last one.
:class:`DDIMFamily` is the loop ``eps -> x0_hat -> guidance hook -> DDIM update`` of DDIM, DPS and Pi-GDM.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from reddiff.core.diffusion import SPACINGS, ddim_coefficients, timesteps


def validate_steps(name: str, steps) -> int:
    """``steps`` as an int >= 1 (the upper bound is checked against the prior's schedule by ``check_prior``)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name}: steps must be an integer in [1, T] (T = 1000 for the standard schedule), "
                         f"got {steps!r}")
    return steps


def validate_spacing(name: str, spacing) -> str:
    """``spacing`` of :func:`reddiff.core.diffusion.timesteps`: "default" (exactly ``steps`` steps) or "official"
    (``range(0, T, T // steps)``, the official list, ``compat.timesteps``)."""
    if spacing not in SPACINGS:
        raise ValueError(f"{name}: spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    return str(spacing)


class Sampler:
    name: str = "sampler"
    #: capabilities required from the operator ("adjoint", "svd", "linear")
    requires: tuple = ()
    #: True when the sampler backpropagates through the network (speed limit 1.10 instead of 1.05)
    needs_grad: bool = False
    #: hyperparameters of the Gaussian-mixture benchmark (``None``: not run there unless asked for by name)
    gmm_hparams: Optional[dict] = None
    #: the grid ``benchmarks.gmm_posterior --tune`` searches (one list per hyperparameter)
    gmm_tune_grid: dict = {}
    #: search space of ``python run.py -m +tune=<name>`` (reddiff.tune.sweeper): hyperparameter -> Hydra Optuna-sweeper
    #: expression, e.g. ``{"zeta": "tag(log, interval(0.03, 30.0))"}``; empty: the sampler has nothing to tune
    tune_space: dict = {}
    #: hyperparameters that accept one value per batch item
    per_item: tuple = ()
    #: small settings for the generic tests (tests/test_sampler_contract.py), e.g. fewer particles
    test_overrides: dict = {}
    #: where the method is exact for a Gaussian prior and a linear-Gaussian measurement: settings and tolerances
    #: ``{"overrides": {...}, "mean_tol": float, "cov_tol": float}`` (relative errors), checked by the generic tests
    exact_gaussian: Optional[dict] = None
    #: the prior dialects (reddiff/priors/dialects.py) the method is defined on; ``None``: every one (a sampler on the
    #: discrete VP grid runs on any prior evaluated at the grid's sigmas)
    dialects: Optional[tuple] = None
    #: True for a solver defined only on a latent prior (one with ``decode``/``encode``, reddiff/priors/latent.py):
    #: ``check_prior`` refuses any other prior in one line, and the generic tests run it on a latent test prior
    needs_latent: bool = False
    #: timestep spacing passed to :func:`reddiff.core.diffusion.timesteps` (the compat profile may change it)
    spacing: str = "default"
    log_every: int = 10

    # ------------------------------------------------------------------ checks done before any work
    def check(self, operator) -> None:
        for cap in self.requires:
            operator.require(cap, self.name)

    def check_prior(self, prior) -> None:
        """Refuse, before any sampling, a prior dialect the method is not defined on or a step count the prior's
        schedule cannot provide."""
        if self.needs_latent and not callable(getattr(prior, "decode", None)):
            raise ValueError(f"{self.name}: needs a latent prior (an encoder and a decoder: prior=latent_tiny, latent_gmm, "
                             "sd15, ...); "
                             f"prior {getattr(prior, 'name', type(prior).__name__)} is a pixel prior")
        dialect = getattr(prior, "dialect", "vp_discrete")
        if self.dialects is not None and dialect not in self.dialects:
            raise ValueError(f"{self.name}: runs on the {' / '.join(self.dialects)} dialect of a prior; prior.dialect="
                             f"{dialect} is not one (set prior.dialect={self.dialects[0]})")
        steps = getattr(self, "steps", None)
        T = prior.schedule.T
        if steps is not None and not 1 <= int(steps) <= T:
            raise ValueError(f"{self.name}: steps must be in [1, {T}] for this prior's schedule, got {steps}")

    # ------------------------------------------------------------------ shared pieces
    def timesteps(self, prior, ordering: str = "descending", T: Optional[int] = None, seed: int = 0) -> list[int]:
        """The visited timesteps for ``self.steps`` on the prior's schedule (validated against it)."""
        self.check_prior(prior)
        kw = {} if self.spacing == "default" else {"spacing": self.spacing}
        return timesteps(self.steps, ordering, T=prior.schedule.T if T is None else T, seed=seed, **kw)

    def should_log(self, i: int, last: int) -> bool:
        return i % self.log_every == 0 or i == last

    @staticmethod
    def sample_shape(y: torch.Tensor, prior) -> tuple:
        return (y.shape[0],) + tuple(prior.shape)

    def init_noise(self, rng, y: torch.Tensor, prior) -> torch.Tensor:
        """``x_T ~ N(0, I)`` in the prior's sample shape, dtype/device of ``y`` (one draw per item)."""
        return rng.randn(self.sample_shape(y, prior), dtype=y.dtype).to(y.device)

    def expected_nfe(self, prior) -> int:
        """Network evaluations per image of one ``sample`` call (the generic tests check the prior's count)."""
        return len(self.timesteps(prior)) if hasattr(self, "steps") else 0

    def sample(self, y: torch.Tensor, operator, prior, rng, callback: Optional[Callable] = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class DDIMFamily(Sampler):
    """``x_s = sqrt(a_s) x0 + c2 eps [+ extra] [+ c1 z]`` over the strided schedule, where a subclass's
    :meth:`update` turns ``x_t`` into ``(x0, eps, extra, info)`` (unguided: Tweedie's ``x0_hat`` and the network's
    ``eps``; guided samplers add their correction).  ``c1 = eta sqrt((1 - a_t/a_s)(1 - a_s)/(1 - a_t))``,
    ``c2 = sqrt(1 - a_s - c1^2)`` (:func:`reddiff.core.diffusion.ddim_coefficients`); ``eta = 1`` is ancestral DDPM.
    The loop runs under ``no_grad``; a hook that differentiates opens ``torch.enable_grad()`` itself."""

    eta: float = 1.0

    def prepare(self, y, operator, prior) -> dict:
        """Per-call state for :meth:`update` (default: none)."""
        return {}

    def start(self, ctx: dict, y, operator, prior, rng, ts, consts) -> torch.Tensor:
        return self.init_noise(rng, y, prior)

    def schedule_T(self, prior) -> int:
        return prior.schedule.T

    def update(self, ctx: dict, i: int, t: int, x: torch.Tensor, a_t: float, a_s: float, y, operator, prior):  # pragma: no cover
        raise NotImplementedError

    def expected_nfe(self, prior) -> int:
        return len(self.timesteps(prior, T=self.schedule_T(prior)))

    def sample(self, y: torch.Tensor, operator, prior, rng, callback: Optional[Callable] = None) -> torch.Tensor:
        self.check(operator)
        ts = self.timesteps(prior, T=self.schedule_T(prior))
        consts = ddim_coefficients(prior.schedule, ts, self.eta)
        shape = self.sample_shape(y, prior)
        with torch.no_grad():
            ctx = self.prepare(y, operator, prior)
            x = self.start(ctx, y, operator, prior, rng, ts, consts)
            last = len(ts) - 1
            for i, t in enumerate(ts):
                a_t, a_s, c1, c2 = consts[i]
                x0, eps, extra, info = self.update(ctx, i, t, x, a_t, a_s, y, operator, prior)
                x_new = math.sqrt(a_s) * x0 + c2 * eps
                if extra is not None:
                    x_new = x_new + extra
                if c1 > 0:
                    x_new = x_new + c1 * rng.randn(shape, dtype=x.dtype).to(x.device)
                if callback is not None and self.should_log(i, last):
                    callback(i, {"t": t, **info})
                x = x_new
        return x.detach()


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-item ``(B,)`` (or scalar) tensor to broadcast against ``x`` of shape ``(B, *shape)``."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.ndim == 0:
        return v
    return v.reshape((-1,) + (1,) * (x.ndim - 1))
