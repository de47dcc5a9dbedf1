"""DDSMC (baselines/pixel/ddsmc.py): the weighted particles against the exact Gaussian posterior, noiseless data,
the official rho pairing, and refusals.  The generic contract tests (batch = loop, seeds, refusal of non-SVD
operators, NFE) run from tests/test_sampler_contract.py and tests/test_particle_chunking.py."""
from __future__ import annotations

import pytest
import torch

from reddiff import registry
from reddiff.operators.matrix import MatrixOperator
from reddiff.core.rng import BatchRNG

from gaussian_case import gmm_problem, weighted_errors  # noqa: E402 - tests/ helper

torch.set_num_threads(1)
NAME = "ddsmc"


def test_weighted_particles_match_exact_gaussian_posterior():
    """eta = 1 (the DDPM transition: the path's prior marginal is the prior's): pooled weighted particles of 250
    items against the exact posterior of the d = 6 case, N = 16 and 128 (measured 0.036 / 0.12 and 0.034 / 0.093
    at N = 16 / 256).  Broken on purpose (2026-12-06): not dividing the weight by the parent's likelihood
    (``incr = ell + lq - lr_prop``, the data counted at every level) gave a mean error of 0.29 at N = 16 and this
    test failed.  Not caught: dropping the proposal's log-density ``lr_prop`` (0.036 -> 0.066 at N = 16, within
    the bound; the guided proposal is close to the transition here)."""
    for N in (16, 128):
        em, ec = weighted_errors(NAME, N, eta=1.0)
        print("ddsmc errors", N, em, ec)
        assert em < 0.08 and ec < 0.16, (N, em, ec)


def test_eta_below_one_shrinks_the_path():
    """The official eta = 0.5 is not marginal-preserving (the transition's variance plus the carried part is
    below sigma_s^2 by eta (1 - eta) sigma_s^2 D / (eta sigma_s^2 + D)^2 sigma_s^2): its covariance error stays
    large however many particles (docs/SAMPLERS.md#ddsmc)."""
    smp = registry.build_sampler(NAME, eta=0.5)
    mf, pf = smp.transition(2.0, 1.0)
    assert abs(mf + pf - 1) < 1e-12 and pf ** 2 * 4.0 + mf * 1.0 < 1.0
    mf1, pf1 = registry.build_sampler(NAME, eta=1.0).transition(2.0, 1.0)
    assert abs(pf1 ** 2 * 4.0 + mf1 * 1.0 - 1.0) < 1e-12


def test_rho_follows_the_official_pairing():
    smp = registry.build_sampler(NAME)
    assert abs(smp.rho_of_sigma(100.0) - 47.0) < 1e-9 and abs(smp.rho_of_sigma(0.01) - 0.01) < 1e-12
    assert smp.rho_of_sigma(500.0) == pytest.approx(47.0) and smp.rho_of_sigma(1e-4) == pytest.approx(0.01)
    p = 7.0
    u = 0.5
    s = ((100 ** (1 / p)) + u * (0.01 ** (1 / p) - 100 ** (1 / p))) ** p
    r = ((47 ** (1 / p)) + u * (0.01 ** (1 / p) - 47 ** (1 / p))) ** p
    assert smp.rho_of_sigma(s) == pytest.approx(r, rel=1e-9)


def test_noiseless_observation_is_reproduced():
    prior, _, _ = gmm_problem()
    A = torch.randn(2, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    op = MatrixOperator(A, sigma_y=0.0)
    y = prior.sample(3, torch.Generator().manual_seed(6)) @ A.T
    x = registry.build_sampler(NAME, steps=20, particles=8).sample(y, op, prior, BatchRNG([0, 1, 2]))
    assert (x @ A.T - y).abs().max() < 1e-2


def test_bad_arguments():
    for kw in ({"particles": 0}, {"eta": 2.0}, {"rho_max": 0.0}, {"rho_min": 50.0}, {"sigma_min": 200.0},
               {"resampling": "stratified"}, {"min_noise_std": 0.0}):
        with pytest.raises(ValueError, match=NAME):
            registry.build_sampler(NAME, **kw)
