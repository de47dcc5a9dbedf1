"""DiffPIR (baselines/diffpir.py): the data proximal step and the sampler against exact posteriors.

* the closed-form SVD step is the minimiser of ``||y - H x||^2 + rho ||x - x0||^2`` (stationarity, dense and image
  operators), and the gradient data step converges to it;
* on a Gaussian prior with a linear-Gaussian measurement, ``lam = 1`` (``rho_t = sigma_n^2 / sigma_t^2``, the
  Gaussian-approximation weight for vector signals) gives the posterior mean; a wrong ``lam`` does not; for a full
  covariance the mean error shrinks as steps grow;
* nonlinear operators (HDR, phase retrieval) run through the gradient step, which fits the data.
"""
from __future__ import annotations

import pytest
import torch

from reddiff.baselines.diffpir import DiffPIR, quad_timesteps
from reddiff.operators.matrix import MatrixOperator
from reddiff.priors.gaussian import GaussianPrior
from reddiff.registry import build_operator
from reddiff.core.rng import BatchRNG

torch.set_num_threads(1)


def test_quad_timesteps_official_rule():
    ts = quad_timesteps(100, 1000)
    assert ts[:4] == [999, 899, 857, 825] and ts[-4:] == [15, 10, 5, 0] and len(ts) == 100
    assert quad_timesteps(1, 1000) == [999]
    with pytest.raises(ValueError, match="repeat timesteps"):
        quad_timesteps(1000, 1000)


def test_rho_is_lambda_sigma_n2_over_sigma_t2():
    """Official ``rhos = lambda_ * sigma**2 / sigma_ks**2`` with ``sigma_ks = sqrt(1 - a) / sqrt(a)``."""
    smp = DiffPIR(lam=3.0)
    for a in (0.5, 0.9, 0.02):
        assert smp.rho(a, 0.05) == pytest.approx(3.0 * 0.05 ** 2 / ((1 - a) / a), rel=1e-12)
    assert smp.rho(0.5, 0.0) == pytest.approx(3.0 * 0.001 ** 2, rel=1e-12)          # sigma floor 0.001


def _stationarity(x, x0, y, op, rho):
    g = op.adjoint(op.forward(x) - y) + rho * (x - x0)
    return float(g.abs().max() / (op.adjoint(y).abs().max() + rho * x0.abs().max()))


@pytest.mark.parametrize("rho", [1e-3, 0.5, 20.0])
def test_prox_svd_is_the_minimiser_dense(rho):
    g = torch.Generator().manual_seed(0)
    op = MatrixOperator(torch.randn(3, 5, generator=g, dtype=torch.float64))
    x0, y = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    x = DiffPIR.prox_svd(x0, y, op, rho)
    assert _stationarity(x, x0, y, op, rho) < 1e-12


@pytest.mark.parametrize("task", ["sr4", "inpaint_random", "deblur_gauss", "colorization"])
def test_prox_svd_is_the_minimiser_images(task):
    shape = (2, 3, 16, 16)
    op = build_operator(task, sigma_y=0.0).setup([0, 1], shape, "cpu", torch.float64)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    y = op.forward(torch.randn(shape, generator=g, dtype=torch.float64))
    x = DiffPIR.prox_svd(x0, y, op, 0.3)
    assert _stationarity(x, x0, y, op, 0.3) < 1e-10
    assert _stationarity(x0, x0, y, op, 0.3) > 1e-2                     # x0 itself is not the minimiser


def test_gradient_data_step_converges_to_closed_form():
    g = torch.Generator().manual_seed(2)
    op = MatrixOperator(torch.randn(3, 5, generator=g, dtype=torch.float64))
    x0, y = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    L = float(op.singulars().max()) ** 2
    rho = 0.5
    exact = DiffPIR.prox_svd(x0, y, op, rho)
    smp = DiffPIR(data_step="grad", grad_steps=400, grad_lr=(1 + rho) / (L + rho))
    assert float((smp.prox_grad(x0, y, op, rho) - exact).abs().max()) < 1e-8
    one = DiffPIR(data_step="grad", grad_steps=1).prox_grad(x0, y, op, rho)
    assert float((one - exact).abs().max()) > 1e-3                      # one step is only an approximation


def _gaussian_errors(smp, full: bool, n=4000):
    g = torch.Generator().manual_seed(2)
    d, m, sy = 6, 3, 0.3
    A = torch.randn(m, d, generator=g, dtype=torch.float64)
    L = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = L @ L.T / d + 0.2 * torch.eye(d, dtype=torch.float64) if full else torch.eye(d, dtype=torch.float64)
    prior = GaussianPrior(dim=d, cov=cov)
    x = torch.linalg.cholesky(cov) @ torch.randn(d, generator=g, dtype=torch.float64)
    y1 = A @ x + sy * torch.randn(m, generator=g, dtype=torch.float64)
    mean, pcov = prior.posterior(A, y1[None], sy)
    mean, pcov = mean.reshape(-1), pcov.reshape(d, d)
    X = smp.sample(y1[None].expand(n, m).contiguous(), MatrixOperator(A, sigma_y=sy), prior,
                   BatchRNG(0, per_item=False))
    return float((X.mean(0) - mean).norm() / pcov.diag().sum().sqrt())


def test_posterior_mean_standard_gaussian_and_lambda_matters():
    """N(0, I): lam = 1 -> mean error 0.01 (Monte Carlo ~0.02); lam = 4 -> 0.12; ignoring y -> 1.37."""
    good = _gaussian_errors(DiffPIR(steps=100, lam=1.0, zeta=0.3, clip_x0=False), full=False)
    bad = _gaussian_errors(DiffPIR(steps=100, lam=4.0, zeta=0.3, clip_x0=False), full=False)
    print("diffpir N(0,I) mean errors: lam 1", good, "lam 4", bad)
    assert good < 0.04 and bad > 0.08


def test_posterior_mean_full_covariance_improves_with_steps():
    """Full covariance, lam 1, zeta 1: mean error 0.11 (20 steps) -> 0.025 (400 steps)."""
    errs = [_gaussian_errors(DiffPIR(steps=s, lam=1.0, zeta=1.0, clip_x0=False), full=True) for s in (20, 400)]
    print("diffpir full-cov mean errors 20/400 steps", errs)
    assert errs[1] < 0.06 and errs[0] > 2.5 * errs[1]


@pytest.mark.parametrize("task,kw", [("hdr", {"grad_lr": 0.25, "grad_steps": 3}), ("phase_retrieval", {"grad_steps": 3})])
def test_nonlinear_tasks_fit_the_data(task, kw):
    shape = (3, 16, 16)
    x_true = (torch.rand((2,) + shape, generator=torch.Generator().manual_seed(3)) * 2 - 1) * 0.8
    prior = GaussianPrior(shape=shape, cov=torch.full((768,), 0.25))
    op = build_operator(task, sigma_y=0.05).setup([0, 1], (2,) + shape, "cpu", torch.float32)
    y = op.measure(x_true, BatchRNG([0, 1]))
    fit = DiffPIR(steps=30, zeta=0.3, **kw).sample(y, op, prior, BatchRNG([0, 1]))
    free = DiffPIR(steps=30, zeta=0.3, lam=1e8, **kw).sample(y, op, prior, BatchRNG([0, 1]))   # prior-dominated
    rms = lambda x: float((op.forward(x) - y).square().mean().sqrt())  # noqa: E731
    print(task, "misfit rms", rms(fit), "prior-dominated", rms(free), "noise", op.noise_std)
    assert rms(fit) < 2.5 * op.noise_std and rms(free) > 2 * rms(fit)


def test_last_step_official_returns_the_renoised_state():
    prior = GaussianPrior(dim=4)
    op = MatrixOperator(torch.randn(2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                        sigma_y=0.1)
    y = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seen = []
    a = DiffPIR(steps=10, clip_x0=False).sample(y, op, prior, BatchRNG([0, 1, 2]))
    b = DiffPIR(steps=10, clip_x0=False, last_step="official").sample(y, op, prior, BatchRNG([0, 1, 2]),
                                                                     callback=lambda i, info: seen.append(info))
    assert not torch.allclose(a, b)
    assert prior.nfe == 20 and len(seen) == 2                          # both spend `steps` network calls


def test_bad_arguments():
    for kw, msg in [({"zeta": 1.5}, "zeta"), ({"lam": 0.0}, "lam"), ({"skip_type": "log"}, "skip_type"),
                    ({"grad_steps": 0}, "grad_steps"), ({"last_step": "x"}, "last_step"), ({"data_step": "y"}, "data_step")]:
        with pytest.raises(ValueError, match=msg):
            DiffPIR(**kw)
