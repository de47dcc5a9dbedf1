"""SITCOM (baselines/pixel/sitcom.py): equality with the official per-image loop (torch.optim.Adam on the network
input, forward diffusion to the next level), the early stop and its NFE, and the refusal of a black-box task.
The generic contract tests run from tests/test_sampler_contract.py and tests/test_samplers.py."""
from __future__ import annotations

import math

import pytest
import torch

from reddiff import registry
from reddiff.core.rng import BatchRNG
from reddiff.operators.base import OperatorCapabilityError

from gaussian_case import gaussian_problem  # noqa: E402 - tests/ helper

torch.set_num_threads(1)
NAME = "sitcom"


def official_loop(y, op, prior, seed, steps, inner, lr, lam):
    """The official sampler (SITCOM_with_noise.py:125-147, 205-239) for one item, with torch.optim.Adam, no
    clamp (vectors) and no early stop; the same random draws as the harness's BatchRNG([seed])."""
    rng = BatchRNG([seed])
    x = rng.randn((1,) + tuple(prior.shape), dtype=y.dtype)
    ts = registry.build_sampler(NAME, steps=steps).timesteps(prior)
    sch = prior.schedule
    for i, t in enumerate(ts):
        a = float(sch.alpha_bar_at(t))
        a_s = float(sch.alpha_bar_at(ts[i + 1] if i + 1 < len(ts) else 0))
        v = x.clone().requires_grad_(True)
        opt = torch.optim.Adam([v], lr=lr)
        for _ in range(inner):
            opt.zero_grad()
            x0 = (v - math.sqrt(1 - a) * prior.eps(v, t)) / math.sqrt(a)
            loss = (op.forward(x0) - y).square().sum() + lam * (v - x).square().sum()
            loss.backward()
            opt.step()
        x0 = x0.detach()
        x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * rng.randn(x.shape, dtype=x.dtype)
    return x0


def test_equals_the_official_loop():
    """Batch of two items against the official loop run item by item (float64, exact Gaussian prior).  Broken on
    purpose (2026-12-06): Adam's second-moment bias correction with ``b1`` instead of ``b2`` gave a 1.9
    difference and this test failed."""
    prior, op, y, _, _ = gaussian_problem()
    Y = torch.stack([y, y + 0.3])
    smp = registry.build_sampler(NAME, steps=3, inner=5, lr=0.05, lam=0.2, clip_x0=False, early_stop=False)
    got = smp.sample(Y, op, prior, BatchRNG([7, 8]))
    for b, seed in enumerate((7, 8)):
        ref = official_loop(Y[b:b + 1], op, prior, seed, 3, 5, 0.05, 0.2)
        assert (got[b] - ref[0]).abs().max() < 1e-10, (got[b], ref)


def test_early_stop_counts_only_the_evaluations_made():
    """A stop threshold above every residual stops each level after its first evaluation: NFE = steps, and x0
    is the first denoised estimate."""
    prior, op, y, _, _ = gaussian_problem()
    smp = registry.build_sampler(NAME, steps=4, inner=30, clip_x0=False, stop_tol=1e3)
    prior.reset_nfe()
    smp.sample(y[None], op, prior, BatchRNG([0]))
    assert prior.nfe == 4 < smp.expected_nfe(prior) == 120


def test_refuses_a_black_box_operator():
    op = registry.build_operator("quantize")
    with pytest.raises(OperatorCapabilityError, match="sitcom needs an operator with grad"):
        registry.build_sampler(NAME).check(op)


def test_bad_arguments():
    for kw in ({"inner": 0}, {"lr": -1.0}, {"lam": -0.1}, {"betas": (1.0, 0.9)}, {"spacing": "odd"}):
        with pytest.raises(ValueError, match=NAME):
            registry.build_sampler(NAME, **kw)
