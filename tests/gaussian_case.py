"""The shared exact-posterior test case: a random full-covariance Gaussian prior in d = 6 and a 3 x 6
linear-Gaussian measurement, with its exact posterior (Kalman form); and the weighted-particle errors against it."""
from __future__ import annotations

import torch

from reddiff import registry
from reddiff.operators.matrix import MatrixOperator
from reddiff.priors.gaussian import GaussianPrior
from reddiff.priors.gmm import GaussianMixturePrior
from reddiff.core.rng import BatchRNG


def gaussian_draws(sigma=0.3, seed=2):
    """``(prior covariance (d, d), A (m, d), y (m,))`` of the case: d = 6, m = 3, y = A x + sigma e."""
    g = torch.Generator().manual_seed(seed)
    d, m = 6, 3
    L = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = L @ L.T / d + 0.2 * torch.eye(d, dtype=torch.float64)
    A = torch.randn(m, d, generator=g, dtype=torch.float64)
    x = torch.linalg.cholesky(cov) @ torch.randn(d, generator=g, dtype=torch.float64)
    y = A @ x + sigma * torch.randn(m, generator=g, dtype=torch.float64)
    return cov, A, y


def gaussian_problem(sigma=0.3, seed=2):
    """``(prior, operator, y (m,), posterior mean (d,), posterior covariance (d, d))``."""
    cov, A, y = gaussian_draws(sigma, seed)
    d = cov.shape[0]
    prior = GaussianPrior(dim=d, cov=cov)
    mean, pcov = prior.posterior(A, y[None], sigma)
    return prior, MatrixOperator(A, sigma_y=sigma), y, mean.reshape(-1), pcov.reshape(d, d)


def weighted_errors(name, N, B=250, steps=100, **kw):
    """Relative errors of the pooled weighted particle mean / covariance of a particle sampler's ``run``
    (B items, N particles each) against the exact posterior."""
    prior, op, y, mean, pcov = gaussian_problem()
    smp = registry.build_sampler(name, steps=steps, particles=N, **kw)
    X, logw = smp.run(y[None].expand(B, -1).contiguous(), op, prior, BatchRNG(0, per_item=False))
    w = (torch.softmax(logw, 1) / B).reshape(-1)
    Xf = X.reshape(-1, X.shape[-1])
    mu = w @ Xf
    C = (Xf - mu).T @ ((Xf - mu) * w[:, None])
    return float((mu - mean).norm() / pcov.diag().sum().sqrt()), float((C - pcov).norm() / pcov.norm())


def gmm_problem(sigma=0.5, B=3):
    """A 4-D Gaussian-mixture prior, a 2 x 4 measurement and ``B`` noisy measurements: ``(prior, operator, y)``."""
    g = torch.Generator().manual_seed(0)
    prior = GaussianMixturePrior.mcgdiff(4, g)
    A = torch.randn(2, 4, generator=g, dtype=torch.float64)
    x = prior.sample(B, g)
    y = x @ A.T + sigma * torch.randn(B, 2, generator=g, dtype=torch.float64)
    return prior, MatrixOperator(A, sigma_y=sigma), y
