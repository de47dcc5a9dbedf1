"""TMPD (baselines/pixel/tmpd.py) against the exact Gaussian posterior.

For a Gaussian prior and a linear operator Tweedie's moments are exact, so one TMPD step's x0_post is exactly
E[x0 | x_t, y] (checked against an independent Kalman computation that treats x_t as a second measurement of x0);
the chain's samples then match the exact posterior up to the plug-in bias of each transition, which shrinks with
the steps.  The generic test (tests/test_sampler_contract.py, ``exact_gaussian``) runs 200 steps.
"""
from __future__ import annotations

import math

import pytest
import torch

from reddiff.baselines.pixel.tmpd import TMPD
from reddiff.core.rng import BatchRNG
from reddiff.operators.base import OperatorCapabilityError

from gaussian_case import gaussian_draws, gaussian_problem  # noqa: E402 - tests/ helper

torch.set_num_threads(1)


@pytest.mark.parametrize("t", [50, 400, 900])
def test_one_step_mean_is_the_exact_conditional_mean(t):
    prior, op, y, _, _ = gaussian_problem()
    A, sig = gaussian_draws()[1], 0.3
    a = float(prior.schedule.alpha_bar_at(t))
    B = 5
    x = torch.randn(B, 6, generator=torch.Generator().manual_seed(t), dtype=torch.float64) * 2
    Y = y[None].expand(B, -1).contiguous()
    smp = TMPD(covariance="cg", cg_iters=3, cg_tol=0.0)           # 3 = dim(y): CG is exact
    ctx = smp.prepare(Y, op, prior)
    prior.reset_nfe()
    x0p, eps_p, extra, _ = smp.update(ctx, 0, t, x, a, 1.0, Y, op, prior)
    assert prior.nfe == 4 and extra is None                         # forward + 3 CG products + the final one
    # x_t / sqrt(a) = x0 + s n: a second linear-Gaussian measurement of x0; stack both, whiten, one Kalman update
    s = math.sqrt((1 - a) / a)
    A2 = torch.cat([A / sig, torch.eye(6, dtype=torch.float64) / s])
    Y2 = torch.cat([Y / sig, x / (math.sqrt(a) * s)], 1)
    ref, _ = prior.posterior(A2, Y2, 1.0)
    assert torch.allclose(x0p, ref.reshape(B, 6), rtol=1e-8, atol=1e-8), (x0p - ref.reshape(B, 6)).abs().max()
    assert torch.allclose(eps_p, (x - math.sqrt(a) * x0p) / math.sqrt(1 - a))


def errors(steps, n=4000):
    prior, op, y, mean, pcov = gaussian_problem()
    X = TMPD(steps=steps, covariance="cg", cg_iters=3).sample(y[None].expand(n, -1).contiguous(), op, prior,
                                                              BatchRNG(0, per_item=False)).double()
    return (float((X.mean(0) - mean).norm() / pcov.diag().sum().sqrt()),
            float((torch.cov(X.T) - pcov).norm() / pcov.norm()))


def test_samples_match_the_exact_posterior_and_improve_with_steps():
    m50, c50 = errors(20)
    m, c = errors(500)
    print("tmpd errors: 20 steps", m50, c50, "500 steps", m, c)
    assert m < 0.04 and c < 0.06, (m, c)
    assert c < c50


def test_rowsum_is_refused_on_a_dense_operator_in_one_line():
    prior, op, y, _, _ = gaussian_problem()
    with pytest.raises(OperatorCapabilityError, match="^tmpd: covariance=rowsum") as e:
        TMPD(covariance="rowsum").sample(y[None], op, prior, BatchRNG(0))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="^tmpd: covariance"):
        TMPD(covariance="full")


def test_rowsum_is_exact_for_a_mask_and_a_diagonal_prior():
    """With a pixel mask and independent pixels H C_t H^T is diagonal, so the authors' row-sum approximation is
    exact: per pixel x0_post = x0_hat + c/(c + s^2) (y - x0_hat) on observed pixels, c = (1-a) v / (a v + 1 - a)."""
    from reddiff.operators.inpainting import BoxInpainting
    from reddiff.priors.gaussian import GaussianPrior

    g = torch.Generator().manual_seed(0)
    var = torch.rand(16, generator=g, dtype=torch.float64) + 0.2
    prior = GaussianPrior(shape=(1, 4, 4), cov=var)
    op = BoxInpainting(sigma_y=0.1, frac=0.5)
    op.setup([0, 1], (2, 1, 4, 4), dtype=torch.float64)
    x = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    y = op.forward(torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64))
    t = 300
    a = float(prior.schedule.alpha_bar_at(t))
    smp = TMPD(covariance="rowsum")
    prior.reset_nfe()
    x0p, _, _, _ = smp.update(smp.prepare(y, op, prior), 0, t, x, a, 1.0, y, op, prior)
    assert prior.nfe == 2
    v = var.reshape(1, 1, 4, 4)
    x0h = math.sqrt(a) * v * x / (a * v + 1 - a)
    c = (1 - a) * v / (a * v + 1 - a)
    mask = op.forward(torch.ones_like(x))
    ref = x0h + mask * c / (c + float(op.noise_std) ** 2) * (y - op.forward(x0h))
    assert torch.allclose(x0p, ref, rtol=1e-10, atol=1e-10), (x0p - ref).abs().max()
