"""Both particle samplers (MCG-diff, FPS-SMC; the shared loop reddiff/samplers/smc.py): chunked network calls give
the same particles and weights as one call on all of them, and the prior counts N evaluations per step."""
from __future__ import annotations

import pytest
import torch

from reddiff import registry
from reddiff.rng import BatchRNG

from gaussian_case import gmm_problem  # noqa: E402 - tests/ helper

torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["mcgdiff", "fps_smc"])
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
