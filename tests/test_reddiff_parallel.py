"""RED-diff's ``parallel`` option (reddiff/samplers/reddiff.py; official NVlabs/RED-diff algos/reddiff_parallel.py).

With ``parallel = k`` each Adam step takes one x0 sample and the denoiser terms of k consecutive timesteps, averaged
(the official one mean over the k copies, reddiff_parallel.py:70-76, 125); checked against that loss written out
and minimised with torch.optim.Adam.  ``parallel = 1`` is the sequential sampler, checked bit for bit by
tests/test_reddiff.py (unchanged).
"""
from __future__ import annotations

import pytest
import torch

from reddiff.core.rng import BatchRNG
from reddiff.samplers.reddiff import REDDiff

from gaussian_case import gaussian_problem  # noqa: E402 - tests/ helper

torch.set_num_threads(1)


@pytest.mark.parametrize("k,returns", [(3, "mu"), (2, "last_sample"), (1, "mu")])
def test_parallel_step_equals_the_official_loss_with_torch_adam(k, returns):
    prior, op, y, _, _ = gaussian_problem()
    Y = y[None]
    steps, lr, lam, sx0 = 6, 0.3, 0.7, 0.2
    smp = REDDiff(steps=steps, lr=lr, lam=lam, sigma_x0=sx0, parallel=k, returns=returns)
    prior.reset_nfe()
    out = smp.sample(Y, op, prior, BatchRNG(4, per_item=False))
    assert prior.nfe == steps == smp.expected_nfe(prior)
    ts = smp.timesteps(prior)
    rng = BatchRNG(4, per_item=False)
    mu = torch.nn.Parameter(op.pinv(Y).detach().clone())
    opt = torch.optim.Adam([mu], lr=lr, betas=(0.9, 0.99), eps=1e-8)
    n, m = mu.numel(), Y.numel()
    for g in range(steps // k):
        e1 = rng.randn_like(mu)
        x0 = mu + sx0 * e1
        noise = 0
        for j in range(g * k, g * k + k):
            a = prior.schedule.alpha_bar_at(ts[j])
            e2 = rng.randn_like(mu)
            with torch.no_grad():
                eps = prior.eps(a.sqrt() * x0 + (1 - a).sqrt() * e2, ts[j])
            w = lam * ((1 - a).sqrt() / a.sqrt())
            noise = noise + (w * (eps - e2) * x0).sum() / n
        loss = noise / k + (Y - op.forward(x0)).square().sum() / m / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref = mu if returns == "mu" else x0
    assert torch.allclose(out, ref.detach(), rtol=1e-10, atol=1e-12), (out - ref).abs().max()


def test_parallel_must_divide_steps_in_one_line():
    with pytest.raises(ValueError, match="^reddiff: parallel") as e:
        REDDiff(steps=10, parallel=3)
    assert "\n" not in str(e.value)
