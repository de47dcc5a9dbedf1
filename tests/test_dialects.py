"""The noise-level protocol (reddiff/priors/dialects.py): conversions are identities, every dialect's time and
state maps invert, exact priors denoise exactly at any sigma in every dialect (against Monte Carlo), DDIM (eta 0) on
the VP view is the Euler flow ODE on the flow view, and the ADM network is evaluated at the grid's integers in every
dialect but vp_continuous, whose time input is EDM's VPPrecond ``999 t``."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from reddiff import registry
from reddiff.core.diffusion import Schedule
from reddiff.core.rng import BatchRNG
from reddiff.operators.matrix import MatrixOperator
from reddiff.priors import dialects as D
from reddiff.priors.gaussian import GaussianPrior
from reddiff.priors.gmm import GaussianMixturePrior

NAMES = list(D.DIALECTS)
sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers


def test_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    sigma = torch.exp(torch.randn(5, generator=g, dtype=torch.float64) * 2)
    x_e = x0 + sigma[:, None] * n
    eps = D.eps_from_x0(x_e, x0, sigma)
    assert torch.allclose(eps, n, rtol=0, atol=1e-12)
    assert torch.allclose(D.x0_from_eps(x_e, eps, sigma), x0, rtol=0, atol=1e-12)
    for name in NAMES:
        view = D.make_dialect(name)
        s = view.scale(sigma)
        score = D.score_from_eps(eps, sigma, s)
        assert torch.allclose(D.eps_from_score(score, sigma, s), eps, rtol=1e-12, atol=0)
        # the score of N(x; s x0, s^2 sigma^2 I) at x = s x_e
        assert torch.allclose(score, -(s[:, None] * x_e - s[:, None] * x0) / (s * sigma)[:, None] ** 2, rtol=1e-12)
    t = sigma / (1 + sigma)
    x_flow = (1 - t)[:, None] * x0 + t[:, None] * n  # the linear interpolant
    v = D.velocity_from_x0(eps, x0)
    assert torch.allclose(v, n - x0, rtol=0, atol=1e-12)
    assert torch.allclose(D.x0_from_velocity(x_flow, v, t), x0, rtol=0, atol=1e-12)
    assert torch.allclose(D.eps_from_velocity(x_flow, v, t), n, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_dialect_time_and_state_maps(name):
    view = D.make_dialect(name)
    sigma = torch.tensor([0.02, 0.3, 1.0, 7.5, 80.0], dtype=torch.float64)
    assert torch.allclose(view.sigma(view.tau(sigma)), sigma, rtol=1e-12, atol=0)
    a = 1 / (1 + sigma ** 2)
    expected = {"vp_discrete": a.sqrt(), "vp_continuous": a.sqrt(), "edm": torch.ones_like(sigma),
                "flow": 1 - sigma / (1 + sigma)}[name]
    assert torch.allclose(view.scale(sigma), expected, rtol=1e-14, atol=0)


def test_vp_continuous_is_edm_vpprecond():
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) with 0.1 / 19.9 and network input 999 t (NVlabs/edm
    VPPrecond); on the DDPM grid the input is 0.5 to 3.4 steps off the integer t (issue: DAPS's official input)."""
    view, sched = D.make_dialect("vp_continuous"), Schedule()
    t = torch.tensor([1e-5, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(view.sigma(t), torch.sqrt(torch.exp(0.5 * 19.9 * t ** 2 + 0.1 * t) - 1), rtol=1e-12)
    off = view.network_time(sched.sigmas, sched) - torch.arange(1000, dtype=torch.float64)
    assert 0.4 < float(off[100:].abs().min()) and float(off.abs().max()) < 3.5
    grid = D.make_dialect("flow").network_time(sched.sigmas, sched)
    assert torch.equal(grid, torch.arange(1000, dtype=torch.float64))  # every other dialect: the integers


def test_unknown_dialect_is_one_line():
    with pytest.raises(ValueError, match=r"^unknown prior dialect 'vp'; valid: vp_discrete, vp_continuous, edm, flow$"):
        GaussianPrior(dim=2, dialect="vp")


def _gmm(dialect="vp_discrete", d=3):
    g = torch.Generator().manual_seed(1)
    means = torch.randn(4, d, generator=g, dtype=torch.float64) * 2
    covs = torch.rand(4, generator=g, dtype=torch.float64) * 0.5 + 0.2
    return GaussianMixturePrior(means, weights=torch.tensor([0.1, 0.2, 0.3, 0.4]), covs=covs, dialect=dialect)


@pytest.mark.parametrize("name", NAMES)
def test_gmm_denoiser_matches_monte_carlo_in_every_dialect(name):
    """D(x_e, sigma) = E[x0 | x0 + sigma n = x_e] by self-normalised importance sampling from the prior, at random
    sigmas, reached through the dialect's own time (sigma -> tau -> sigma) and state (x = scale x_e)."""
    prior = _gmm(name)
    view = prior.view
    g = torch.Generator().manual_seed(2)
    x0 = prior.sample(400_000, g)
    for sigma in (0.15, 0.7, 2.5):
        tau = view.tau(torch.tensor(sigma, dtype=torch.float64))
        s = float(view.sigma(tau))
        x_e = prior.sample(1, g) + s * torch.randn(1, 3, generator=g, dtype=torch.float64)
        x = view.scale(torch.tensor(s, dtype=torch.float64)) * x_e  # the dialect's state, back to EDM units below
        got = prior.denoise(x / view.scale(torch.tensor(s, dtype=torch.float64)), s)
        logw = -((x_e - x0) ** 2).sum(-1) / (2 * s * s)
        w = torch.softmax(logw, 0)
        mc = (w[:, None] * x0).sum(0)
        se = torch.sqrt((w[:, None] ** 2 * (x0 - mc) ** 2).sum(0))  # delta-method standard error
        assert ((got[0] - mc).abs() <= 5 * se + 1e-3).all(), (name, sigma, got, mc, se)


def test_gmm_grid_protocol_is_identical_in_every_dialect():
    """An exact prior has no time input: every dialect gives the same eps on the grid, bit for bit."""
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = _gmm().eps(x, 700)
    for name in NAMES:
        assert torch.equal(_gmm(name).eps(x, 700), ref)


def test_ddim_eta0_on_vp_is_euler_flow_on_flow_view():
    """DDIM with eta = 0 on the VP view equals the Euler flow ODE dz/dt = v = (z - D) / t on the flow view
    (the same update), to 1e-10 in float64."""
    vp, flow = _gmm("vp_discrete", d=4), _gmm("flow", d=4)
    sampler = registry.build_sampler("ddim", steps=25, eta=0.0)
    y = torch.zeros(3, 1, dtype=torch.float64)
    op = MatrixOperator(torch.zeros(1, 4, dtype=torch.float64), sigma_y=0.1)
    out = sampler.sample(y, op, vp, BatchRNG([0, 1, 2]))
    z = sampler.init_noise(BatchRNG([0, 1, 2]), y, vp)  # the same x_T
    ts = sampler.timesteps(vp)
    sig = [float(vp.schedule.sigma_at(t)) for t in ts] + [0.0]
    view = flow.view
    z = z * float(view.scale(torch.tensor(sig[0], dtype=torch.float64))) / float(vp.view.scale(torch.tensor(sig[0], dtype=torch.float64)))
    for k in range(len(ts)):
        t, t_next = sig[k] / (1 + sig[k]), sig[k + 1] / (1 + sig[k + 1])
        d0 = flow.denoise(z / (1 - t), sig[k])
        z = z + (t_next - t) * (z - d0) / t
    assert (z - out).abs().max() < 1e-10
    assert (z - out).abs().max() < (out.abs().max() * 1e-3)  # and not trivially: the chain moved
    assert (out - sampler.init_noise(BatchRNG([0, 1, 2]), y, vp)).abs().max() > 0.1


@pytest.mark.parametrize("name", registry.sampler_names())
@pytest.mark.parametrize("dialect", NAMES)
def test_every_sampler_runs_in_every_dialect(name, dialect):
    """Every (sampler, dialect) pair: runs where the sampler declares the dialect (an exact prior gives the
    vp_discrete output bit for bit, since it has no time input), refused with one line where it does not."""
    from test_sampler_contract import problem_for, small

    prior, op, y = problem_for(name)  # a latent-only sampler: the mixture on latents, seen through the decoder
    prior.view = D.make_dialect(dialect, prior.schedule)
    s = small(name)
    allowed = type(s).dialects
    if allowed is not None and dialect not in allowed:
        with pytest.raises(ValueError, match=f"^{name}: runs on the .* dialect"):
            s.sample(y, op, prior, BatchRNG([0, 1, 2]))
        return
    ref_prior, _, _ = problem_for(name)
    ref = small(name).sample(y, op, ref_prior, BatchRNG([0, 1, 2]))
    prior.reset_nfe()
    out = s.sample(y, op, prior, BatchRNG([0, 1, 2]))
    assert torch.equal(out, ref)
    assert prior.nfe == s.expected_nfe(prior)


def test_a_sampler_that_declares_its_dialects_refuses_the_others():
    from reddiff.baselines.ddim import DDIM

    class FlowOnly(DDIM):
        name = "flow_only"
        dialects = ("flow",)

    prior = GaussianPrior(dim=2)
    with pytest.raises(ValueError, match=r"^flow_only: runs on the flow dialect of a prior; prior.dialect="
                                         r"vp_discrete is not one \(set prior.dialect=flow\)$"):
        FlowOnly(steps=3).check_prior(prior)
    FlowOnly(steps=3).check_prior(GaussianPrior(dim=2, dialect="flow"))


def test_embedded_network_time_input_per_dialect(tmp_path):
    """The ADM network sees the integer t in vp_discrete, edm and flow (bit-identical eps on the grid) and EDM's
    VPPrecond input in vp_continuous; denoise() off the grid is continuous in sigma."""
    from reddiff.priors.unet import UNetPrior

    priors = {n: UNetPrior(weights="embedded64", arch="embedded64", dialect=n) for n in NAMES}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ref = priors["vp_discrete"].eps(x, 600)
    for n in ("edm", "flow"):
        assert torch.equal(priors[n].eps(x, 600), ref)
    assert not torch.allclose(priors["vp_continuous"].eps(x, 600), ref, atol=1e-4)
    p = priors["edm"]
    s0, s1 = float(p.schedule.sigmas[600]), float(p.schedule.sigmas[601])
    xe = x * math.sqrt(1 + s0 * s0)
    d0, d1 = p.denoise(xe, s0), p.denoise(xe, s1)
    dm = p.denoise(xe, math.sqrt(s0 * s1))  # half-way in log sigma: time input 600.5
    assert (dm - 0.5 * (d0 + d1)).abs().max() < (d1 - d0).abs().max()
