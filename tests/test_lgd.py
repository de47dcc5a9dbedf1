"""LGD-MC (baselines/pixel/lgd.py) against closed forms on a Gaussian prior.

LGD has no exactness guarantee (it is DPS with a Monte-Carlo loss); what it computes is checked instead:
1. one step equals the reference formula written with the prior's analytic Tweedie map x0_hat = mu + J (x_t - sqrt(a) mu),
   J = sqrt(a) Sigma (a Sigma + (1 - a) I)^{-1}, and the same Monte-Carlo draws;
2. for a linear operator the averaged gradient is unbiased for DPS's: over many draws the guidance direction tends
   to J^T 2 A^T (A x0_hat - y).
"""
from __future__ import annotations

import math

import pytest
import torch

from reddiff.baselines.pixel.lgd import LGD
from reddiff.core.rng import BatchRNG

from gaussian_case import gaussian_draws, gaussian_problem  # noqa: E402 - tests/ helper

torch.set_num_threads(1)


def tweedie(prior, x, a):
    """Analytic ``(x0_hat, J)`` of the Gaussian prior at ``alpha_bar = a`` (float64)."""
    S = prior.covariance
    J = math.sqrt(a) * S @ torch.linalg.inv(a * S + (1 - a) * torch.eye(S.shape[0], dtype=S.dtype))
    return prior.mean + (x - math.sqrt(a) * prior.mean) @ J.T, J


@pytest.mark.parametrize("n", [1, 4])
def test_one_step_equals_the_reference_formula(n):
    prior, op, y, _, _ = gaussian_problem()
    A, B, scale = gaussian_draws()[1], 3, 0.7
    Y = y[None].expand(B, -1).contiguous()
    smp = LGD(steps=1, scale=scale, num_samples=n)
    (t,) = smp.timesteps(prior)
    a = float(prior.schedule.alpha_bar_at(t))
    out = smp.sample(Y, op, prior, BatchRNG(5, per_item=False))
    rng = BatchRNG(5, per_item=False)                     # the same draws, in the sampler's order
    xT = rng.randn((B, 6), dtype=torch.float64)
    z = rng.randn((B, n, 6), dtype=torch.float64)
    x0, J = tweedie(prior, xT, a)
    xs = x0[:, None] + math.sqrt(1 - a) * z               # (B, n, d)
    res = xs @ A.T - Y[:, None]                           # (B, n, m)
    L = res.square().sum(2)                               # (B, n)
    avg = (2 * res @ A).mean(1)                           # (1/n) sum_j grad L_j
    g = avg @ J                                           # J^T avg (J symmetric)
    ref = x0 - scale * 0.5 * g / L.sum(1, keepdim=True).sqrt()   # last step: a_s = 1, c1 = c2 = 0
    assert torch.allclose(out, ref, rtol=1e-9, atol=1e-9), (out - ref).abs().max()


def test_averaged_gradient_is_unbiased_for_dps_with_a_linear_operator():
    prior, op, y, _, _ = gaussian_problem()
    A = gaussian_draws()[1]
    smp = LGD(steps=1, scale=1.0, num_samples=4000)
    (t,) = smp.timesteps(prior)
    a = float(prior.schedule.alpha_bar_at(t))
    x = torch.randn(1, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ctx = smp.prepare(y[None], op, prior)
    ctx["rng"] = BatchRNG(0, per_item=False)
    _, _, extra, info = smp.update(ctx, 0, t, x, a, 1.0, y[None], op, prior)
    x0, J = tweedie(prior, x, a)
    dps = (2 * (x0 @ A.T - y) @ A) @ J                    # DPS's gradient J^T grad ||y - A x0_hat||^2
    total = 4000 * info["residual_norm"].square()         # sum_j L_j
    g = -extra * 2 * total.sqrt()                          # undo the step: the averaged gradient J^T avg
    spread = 2 * math.sqrt(1 - a) * (A.T @ A @ J).norm() / math.sqrt(4000)
    assert (g - dps).norm() < 5 * spread, ((g - dps).norm(), spread)


def test_bad_input_is_refused_in_one_line():
    for kw in ({"num_samples": 0}, {"scale": -1.0}, {"eta": 2.0}):
        with pytest.raises(ValueError, match="^lgd: ") as e:
            LGD(**kw)
        assert "\n" not in str(e.value)
