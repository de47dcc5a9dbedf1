"""Image-scale mixture prior: exact denoiser in every dialect, and the SVD posterior of every SVD task against
brute force (dense matrices, float64) and against importance sampling (a two-sample test), noiseless limit too."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reddiff import registry
from reddiff.priors.dialects import DIALECTS
from reddiff.priors.gmm import GaussianMixturePrior
from reddiff.priors.image_gmm import ImageMixturePrior

torch.set_num_threads(1)
F64 = torch.float64
N = 8  # image side for the brute-force checks (d = 192)


def svd_tasks() -> list[str]:
    return [t for t in registry.task_names()
            if registry.task_info(t)["svd"] and not registry.task_info(t)["needs_weights"]]


def _prior(n=N, K=12, std=0.3, seed=0):
    """Families of means that share a block average (ambiguous for SR) plus random ones, so weights spread."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.rand(K // 3, 3, n // 4, n // 4, generator=g, dtype=F64),
                                           scale_factor=4, mode="nearest") * 2 - 1
    hi = 0.5 * torch.randn(K // 3 * 2, 3, n, n, generator=g, dtype=F64)
    hi = hi - torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(hi, 4), scale_factor=4, mode="nearest")
    fam = base.repeat_interleave(2, 0) + hi
    rest = 0.6 * torch.randn(K - fam.shape[0], 3, n, n, generator=g, dtype=F64)
    w = torch.rand(K, generator=g, dtype=F64) + 0.2
    return ImageMixturePrior(torch.cat([fam, rest]), std, w)


def _binder(task, n=N, sigma_y=0.0):
    cache = {}

    def bind(B):
        if B not in cache:
            cache[B] = registry.build_operator(task, sigma_y=sigma_y).setup([3] * B, (B, 3, n, n), dtype=F64)
        return cache[B]
    return bind


def _dense(bind, d, n=N):
    """The operator as a dense matrix (forward on the identity basis), float64."""
    E = torch.eye(d, dtype=F64).reshape(d, 3, n, n)
    return torch.cat([bind(64).forward(E[i:i + 64]).reshape(64, -1) for i in range(0, d, 64)]).T  # (m, d)


def _brute(prior, bind, x_star, sigma):
    """Posterior from dense matrices: y reduced to the row space of A by a numerical SVD (the dropped
    coordinates carry no information about x), then the Kalman form of :class:`GaussianMixturePrior`."""
    A = _dense(bind, prior.d)
    y = bind(1).forward(x_star[None]).reshape(-1)
    if sigma > 0:
        y = y + sigma * torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    r = int((s > s.max() * 1e-9).sum())
    Ar, yr = U[:, :r].T @ A, U[:, :r].T @ y
    dense = GaussianMixturePrior(prior.means, prior.weights, prior.variances).posterior(yr, Ar, sigma)
    return y.reshape((1,) + tuple(bind(1).forward(x_star[None]).shape[1:])), dense


@pytest.mark.parametrize("sigma_y", [0.1, 0.0])
@pytest.mark.parametrize("task", svd_tasks())
def test_spectral_posterior_matches_brute_force(task, sigma_y):
    prior = _prior()
    bind = _binder(task, sigma_y=sigma_y)
    sigma = bind(1).noise_std
    x_star = prior.sample(1, torch.Generator().manual_seed(1))[0]
    y, dense = _brute(prior, bind, x_star, sigma)
    post = prior.spectral_posterior(y, bind, sigma)
    assert (post.weights - dense.weights).abs().max() < 1e-10
    ev, evd = post.log_evidence_components, dense.log_evidence_components
    assert ((ev - ev[0]) - (evd - evd[0])).abs().max() < 1e-8  # equal up to a constant common to all components
    assert (post.component_means().reshape(prior.K, -1) - dense.means).abs().max() < 1e-10
    covs = dense.covs()
    assert (post.mean().reshape(-1) - dense.mean()).abs().max() < 1e-10
    mix_cov = (dense.weights[:, None, None] * (covs + dense.means[:, :, None] * dense.means[:, None, :])).sum(0) \
        - dense.mean()[:, None] * dense.mean()[None, :]
    assert (post.pixel_variance().reshape(-1) - torch.diagonal(mix_cov)).abs().max() < 1e-10
    assert abs(post.total_variance() - float(torch.trace(mix_cov))) < 1e-9
    # the shared covariance V diag(v) V^T is every component's dense posterior covariance
    E = torch.eye(prior.d, dtype=F64)
    Vb = torch.cat([bind(64).V(E[i:i + 64]).reshape(64, -1) for i in range(0, prior.d, 64)])  # rows: V^T e_i... (V z)
    shared = Vb.T @ torch.diag(post.var) @ Vb
    assert (shared - covs[0]).abs().max() < 1e-10


def test_noiseless_limit_is_continuous():
    prior = _prior()
    bind = _binder("sr4")
    x_star = prior.sample(1, torch.Generator().manual_seed(2))[0]
    y = bind(1).forward(x_star[None])
    p0 = prior.spectral_posterior(y, bind, 0.0)
    p1 = prior.spectral_posterior(y, bind, 1e-7)
    assert (p0.weights - p1.weights).abs().max() < 1e-6
    assert (p0.mean() - p1.mean()).abs().max() < 1e-6
    # noiseless: every exact sample reproduces y
    X = p0.sample(16, torch.Generator().manual_seed(3))
    assert (bind(16).forward(X) - y).abs().max() < 1e-10


def _energy_pvalue(X, Y, perms, g):
    """Permutation p-value of the energy distance between two samples (rows)."""
    Z = torch.cat([X, Y]).to(F64)
    D = torch.cdist(Z, Z)
    n = X.shape[0]

    def stat(idx):
        a, b = idx[:n], idx[n:]
        return 2 * D[a][:, b].mean() - D[a][:, a].mean() - D[b][:, b].mean()

    idx = torch.arange(Z.shape[0])
    e0 = stat(idx)
    count = sum(int(stat(torch.randperm(Z.shape[0], generator=g)) >= e0) for _ in range(perms))
    return (1 + count) / (1 + perms)


def _importance_draws(prior, bind, y, sigma, n_prop, n_out, g):
    """Sampling-importance-resampling: prior proposals weighted by the likelihood N(y; H x, sigma^2)."""
    X = prior.sample(n_prop, g)
    r = torch.cat([(bind(1000).forward(X[i:i + 1000]) - y).reshape(1000, -1) for i in range(0, n_prop, 1000)])
    logw = -0.5 * (r * r).sum(-1) / sigma ** 2
    w = torch.softmax(logw, 0)
    ess = float(1 / (w * w).sum())
    idx = torch.multinomial(w, n_out, replacement=True, generator=g)
    return X[idx].reshape(n_out, -1), ess


@pytest.mark.parametrize("task,sigma_y", [("sr4", 0.15), ("inpaint_box", 0.5), ("colorization", 0.3),
                                          ("deblur_gauss", 0.3)])
def test_samples_pass_two_sample_test_against_importance_sampling(task, sigma_y):
    n = 4
    g = torch.Generator().manual_seed(11)
    means = 0.5 * torch.randn(3, 3, n, n, generator=g, dtype=F64)
    means = torch.cat([means, means + 0.4 * torch.randn(3, 3, n, n, generator=g, dtype=F64)])
    prior = ImageMixturePrior(means, 0.25, torch.tensor([1, 2, 1, 2, 1, 1.0], dtype=F64))
    bind = _binder(task, n=n, sigma_y=sigma_y)
    sigma = bind(1).noise_std
    x_star = prior.sample(1, g)[0]
    y = bind(1).measure(x_star[None], _Noise(g))
    post = prior.spectral_posterior(y, bind, sigma)
    X_is, ess = _importance_draws(prior, bind, y, sigma, 200_000, 600, g)
    assert ess > 2000, ess
    assert post.effective_modes() > 1.05  # more than one component carries weight
    X = post.sample(600, g).reshape(600, -1)
    p = _energy_pvalue(X, X_is, 200, g)
    assert p > 0.01, f"exact samples differ from importance sampling (p={p:.3f}, ESS {ess:.0f})"
    # power: a posterior with its spread scaled by 1.5 is rejected
    wrong = post.mean().reshape(1, -1) + 1.5 * (X - post.mean().reshape(1, -1))
    assert _energy_pvalue(wrong, X_is, 200, g) < 0.01


class _Noise:
    """The operator's ``measure`` needs ``randn_like``; a torch generator behind it."""

    def __init__(self, g):
        self.g = g

    def randn_like(self, t):
        return torch.randn(t.shape, generator=self.g, dtype=t.dtype)


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_denoiser_is_the_closed_form_in_every_dialect(dialect):
    prior = _prior(K=9)
    prior_d = ImageMixturePrior(prior.means, prior.std, prior.weights, prior.shape, dialect=dialect)
    g = torch.Generator().manual_seed(4)
    x0 = prior.sample(3, g)
    for sig in (0.05, 0.7, 8.0):
        x_e = x0 + sig * torch.randn(x0.shape, generator=g, dtype=F64)
        prior_d.reset_nfe()
        D = prior_d.denoise(x_e, sig)
        assert prior_d.nfe == 1
        # closed form: responsibilities of N(m_k, (s^2 + sig^2) I), shrinkage s^2/(s^2+sig^2) towards each mean
        v = prior.std ** 2 + sig ** 2
        X = x_e.reshape(3, -1)
        logr = prior.log_weights[None] - 0.5 * torch.cdist(X, prior.means) ** 2 / v
        r = torch.softmax(logr, -1)
        ref = (r @ prior.means) + (prior.std ** 2 / v) * (X - r @ prior.means)
        assert (D.reshape(3, -1) - ref).abs().max() < 1e-9 * max(1.0, sig)
