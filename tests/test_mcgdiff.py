"""MCG-diff (baselines/mcgdiff.py): exactness trend on a Gaussian prior, chunking, NFE and noiseless pinning.

The generic contract tests (batch = loop, seeds, refusal of non-SVD operators, NFE) run from
tests/test_sampler_contract.py."""
from __future__ import annotations

import pytest
import torch

from reddiff import registry
from reddiff.operators.matrix import MatrixOperator
from reddiff.core.rng import BatchRNG

from gaussian_case import gmm_problem, weighted_errors  # noqa: E402 - tests/ helper

torch.set_num_threads(1)
NAME = "mcgdiff"


def test_error_shrinks_with_particles():
    """Weighted mean error against the exact Gaussian posterior decreases from N = 16 to 64 to 256
    (measured 0.27 / 0.10 / 0.04 here, B = 250 items, 100 steps); the covariance stays within 0.2.
    Not caught (measured by hand, 2026-12-01): dropping the division by the previous potential
    (``divide_previous = False``) gives 0.25 / 0.14 / 0.041, inside this test's Monte Carlo error, and on five GMM
    tuning problems (d = 8) it moved SW by less than their spread; the division is kept because it is the
    official weight (particle_filter.py:100-109) and the one whose path target telescopes to the posterior."""
    errs = {N: weighted_errors(NAME, N) for N in (16, 64, 256)}
    print("mcgdiff errors (mean, cov) by N:", errs)
    em = [errs[N][0] for N in (16, 64, 256)]
    assert em[0] > em[1] > em[2], errs
    assert em[2] < 0.15 and all(errs[N][1] < 0.2 for N in (64, 256)), errs


def test_noiseless_observation_is_pinned():
    """sigma_y = 0: every returned sample reproduces the measurement (the observed spectral coordinates are
    pinned at the clean level, up to the kappa floor)."""
    prior, _, y = gmm_problem()
    A = torch.randn(2, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    op = MatrixOperator(A, sigma_y=0.0)
    y = prior.sample(3, torch.Generator().manual_seed(6)) @ A.T
    x = registry.build_sampler(NAME, steps=20, particles=8, kappa=1e-8).sample(y, op, prior, BatchRNG([0, 1, 2]))
    assert (x @ A.T - y).abs().max() < 1e-3


def test_bad_arguments():
    for kw in ({"particles": 0}, {"kappa": 0.0}, {"eta": 2.0}, {"resampling": "stratified"},
               {"chunk_elements": -1}, {"ess_threshold": 0.0}):
        with pytest.raises(ValueError, match=NAME):
            registry.build_sampler(NAME, **kw)
