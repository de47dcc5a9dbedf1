"""FPS-SMC (baselines/fps_smc.py): exactness trend on a Gaussian prior (small c_rate), chunking, NFE.

The generic contract tests (batch = loop, seeds, refusal of non-SVD operators, NFE) run from
tests/test_sampler_contract.py."""
from __future__ import annotations

import pytest
import torch

from reddiff import registry
from reddiff.operators.matrix import MatrixOperator
from reddiff.priors.gmm import GaussianMixturePrior
from reddiff.rng import BatchRNG

from gaussian_case import weighted_errors  # noqa: E402 - tests/ helper

torch.set_num_threads(1)
NAME = "fps_smc"


def test_error_shrinks_with_particles():
    """With a small fresh-noise fraction (c_rate = 0.05, a DDPM-like chain) the weighted mean error against the
    exact Gaussian posterior decreases from N = 16 to 64 to 256 (measured 0.40 / 0.13 / 0.04 here,
    B = 250 items, 100 steps).  At the official c_rate = 0.95 the covariance error stays ~0.4 whatever N (a biased kernel)."""
    errs = {N: weighted_errors(NAME, N, c_rate=0.05) for N in (16, 64, 256)}
    print("fps_smc errors (mean, cov) by N:", errs)
    em = [errs[N][0] for N in (16, 64, 256)]
    assert em[0] > em[1] > em[2], errs
    assert em[2] < 0.15 and all(errs[N][1] < 0.2 for N in (64, 256)), errs


def gmm_problem(sigma=0.5, B=3):
    g = torch.Generator().manual_seed(0)
    prior = GaussianMixturePrior.mcgdiff(4, g)
    A = torch.randn(2, 4, generator=g, dtype=torch.float64)
    x = prior.sample(B, g)
    y = x @ A.T + sigma * torch.randn(B, 2, generator=g, dtype=torch.float64)
    return prior, MatrixOperator(A, sigma_y=sigma), y


def test_chunked_equals_unchunked_and_nfe():
    """Chunks of one particle slab give the same particles as one network call on all of them, and the
    prior counts N evaluations per step either way."""
    prior, op, y = gmm_problem()
    out = []
    for chunk in (0, 1):
        smp = registry.build_sampler(NAME, steps=8, particles=5, chunk_elements=chunk)
        prior.reset_nfe()
        out.append(smp.run(y, op, prior, BatchRNG([1, 2, 3])))
        assert prior.nfe == 8 * 5 == smp.expected_nfe(prior)
    assert (out[0][0] - out[1][0]).abs().max() < 1e-10
    assert (out[0][1] - out[1][1]).abs().max() < 1e-8


def test_bad_arguments():
    for kw in ({"particles": 0}, {"min_noise_std": 0.0}, {"c_rate": 0.0}, {"resampling": "stratified"},
               {"chunk_elements": -1}, {"ess_threshold": 0.0}):
        with pytest.raises(ValueError, match=NAME):
            registry.build_sampler(NAME, **kw)
