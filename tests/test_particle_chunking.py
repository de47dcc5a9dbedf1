"""The particle samplers (every registered subclass of the shared loop reddiff/samplers/smc.py: MCG-diff, FPS-SMC,
DDSMC):
chunked network calls give the same particles and weights as one call on all of them, the prior counts N
evaluations per step, and pooled systems (``draws_per_system``) return the particle cloud itself, keep a batch
equal to a loop over systems, draw from the system's particles and refuse what they cannot pool."""
from __future__ import annotations

import pytest
import torch

from reddiff import registry
from reddiff.operators.matrix import MatrixOperator
from reddiff.core.rng import BatchRNG
from reddiff.samplers.smc import SpectralSMC

from gaussian_case import gmm_problem  # noqa: E402 - tests/ helper

torch.set_num_threads(1)
PARTICLE = [n for n in registry.sampler_names() if issubclass(registry.sampler_class(n), SpectralSMC)]


def test_particle_samplers_found():
    assert len(PARTICLE) >= 2, PARTICLE


@pytest.mark.parametrize("name", PARTICLE)
def test_chunked_equals_unchunked_and_nfe(name):
    prior, op, y = gmm_problem()
    out = []
    for chunk in (0, 1):
        smp = registry.build_sampler(name, steps=8, particles=5, chunk_elements=chunk)
        prior.reset_nfe()
        out.append(smp.run(y, op, prior, BatchRNG([1, 2, 3])))
        assert prior.nfe == 8 * 5 == smp.expected_nfe(prior)
    assert (out[0][0] - out[1][0]).abs().max() < 1e-10
    assert (out[0][1] - out[1][1]).abs().max() < 1e-8


@pytest.mark.parametrize("name", PARTICLE)
def test_pooled_draws_are_the_particles(name):
    """``draws_per_system = 0`` with B = N items of one measurement returns exactly the N particles of that one
    system (resampled at every step, so its final weights are uniform and the systematic draw is the identity);
    where the last weights are not uniform (DDSMC), N draws from those particles."""
    prior, op, y = gmm_problem(B=1)
    N = 6
    pooled = registry.build_sampler(name, steps=8, particles=N, draws_per_system=0)
    X = pooled.sample(y.expand(N, -1).contiguous(), op, prior, BatchRNG([4] + [9] * (N - 1)))
    x_run, logw = registry.build_sampler(name, steps=8, particles=N).run(y, op, prior, BatchRNG([4]))
    if torch.equal(logw, logw[:, :1].expand_as(logw)):        # uniform final weights: the particles themselves
        assert torch.equal(logw, torch.zeros_like(logw))
        assert torch.equal(X, x_run[0])
    else:                                                       # DDSMC ends on an importance weight: draws of them
        assert (X[:, None, :] == x_run[0][None]).all(-1).any(1).all()


@pytest.mark.parametrize("name", PARTICLE)
def test_pooled_batch_equals_loop_over_systems(name):
    """Two systems of 4 draws in one batch (per-item generators: each system draws from its first item's) give the
    same draws as each system alone."""
    prior, op, y = gmm_problem(B=2)
    smp = registry.build_sampler(name, steps=6, particles=4, draws_per_system=4)
    Y = y.repeat_interleave(4, 0)
    seeds = list(range(10, 18))
    both = smp.sample(Y, op, prior, BatchRNG(seeds))
    for s in range(2):
        alone = smp.sample(Y[4 * s:4 * s + 4], op, prior, BatchRNG(seeds[4 * s:4 * s + 4]))
        assert torch.equal(both[4 * s:4 * s + 4], alone)


@pytest.mark.parametrize("name", PARTICLE)
def test_pooled_refusals(name):
    prior, op, y = gmm_problem(B=2)
    smp = registry.build_sampler(name, steps=4, particles=3, draws_per_system=3)
    with pytest.raises(ValueError, match=f"{name}: draws_per_system=3 must divide the batch size 4"):
        smp.sample(y.repeat_interleave(2, 0), op, prior, BatchRNG(0, per_item=False))
    with pytest.raises(ValueError, match="must share their measurement"):
        smp.sample(torch.cat([y, y[:1]]), op, prior, BatchRNG(0, per_item=False))
    with pytest.raises(ValueError, match="draws_per_system must be an integer >= 0"):
        registry.build_sampler(name, draws_per_system=-1)


@pytest.mark.parametrize("name", PARTICLE)
def test_fewer_draws_than_particles_are_particles(name):
    """``draws_per_system = k < N``: the k draws of a system are k of its N final particles, chosen by systematic
    resampling (each particle at most once when the final weights are uniform).  Exactness of the weighted
    particles themselves is the trend test in the sampler's own test file."""
    prior, op, y = gmm_problem(B=1)
    x_run, logw = registry.build_sampler(name, steps=8, particles=8).run(y, op, prior, BatchRNG([3]))
    X = registry.build_sampler(name, steps=8, particles=8, draws_per_system=4).sample(
        y.expand(4, -1).contiguous(), op, prior, BatchRNG([3, 0, 0, 0]))
    match = (X[:, None, :] == x_run[0][None]).all(-1)          # (4 draws, 8 particles)
    assert match.any(1).all(), match
    distinct = x_run[0].unique(dim=0).shape[0] == x_run.shape[1]
    if distinct and torch.equal(logw, logw[:, :1].expand_as(logw)):  # DDSMC: importance weights, and copies
        assert (match.sum(0) <= 1).all(), match                       # (its last step is deterministic)
