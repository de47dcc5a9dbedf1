"""PSLD (baselines/latent/psld.py) on the linear-decoder Gaussian mixture, where every term has a closed form."""
from __future__ import annotations

import pytest
import torch

from reddiff.baselines.latent.latent_dps import LatentDPS
from reddiff.baselines.latent.psld import PSLD
from reddiff.core.rng import BatchRNG
from reddiff.operators.base import ThroughDecoder
from reddiff.operators.matrix import MatrixOperator
from reddiff.priors.gmm import GaussianMixturePrior
from reddiff.priors.latent import LinearDecoderGMM


def problem(sigma_y=0.1, B=3, k=4, d=8, m=3):
    g = torch.Generator().manual_seed(0)
    base = GaussianMixturePrior.mcgdiff(k, g)
    W = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64)).Q  # orthonormal columns: E = W^T
    prior = LinearDecoderGMM(base.means, W, base.weights)
    A = MatrixOperator(torch.randn(m, d, generator=g, dtype=torch.float64), sigma_y=sigma_y)
    y = torch.randn(B, m, generator=g, dtype=torch.float64)
    return prior, A, ThroughDecoder(A, prior.decode, prior.encode), y


def test_measurement_term_alone_is_latent_dps():
    """gamma = 0: omega grad ||A D(z0) - y|| is DPS's zeta grad ||r||^2 / ||r|| with zeta = omega / 2."""
    prior, _, seen, y = problem()
    a = PSLD(steps=20, gamma=0.0, omega=0.6, eta=0.5, noisy_residual=False).sample(y, seen, prior, BatchRNG([1, 2, 3]))
    b = LatentDPS(steps=20, zeta=0.3, eta=0.5).sample(y, seen, prior, BatchRNG([1, 2, 3]))
    assert (a - b).abs().max() < 1e-10


def test_gluing_norm_is_the_projected_residual():
    """With D = W, E = W^T (W^T W = I): E(A^+ y + (I - A^+ A) W z0) - z0 = W^T A^+ (y - A W z0), per image."""
    prior, A, seen, y = problem(sigma_y=0.0)
    seen_z0, logged = [], []
    smp = PSLD(steps=5, gamma=0.3, omega=0.0, log_every=1, noisy_residual=False)
    orig = prior.eps

    def spy(x_t, t):
        out = orig(x_t, t)
        a = float(prior.schedule.alpha_bar[int(t if isinstance(t, int) else t.reshape(-1)[0])])
        seen_z0.append(((x_t - (1 - a) ** 0.5 * out) / a ** 0.5).detach())
        return out

    prior.eps = spy
    smp.sample(y, seen, prior, BatchRNG([4, 5, 6]), callback=lambda i, info: logged.append(info["gluing_norm"]))
    Wm, Ap = prior.W, torch.linalg.pinv(A._A64)
    for z0, g in zip(seen_z0, logged):
        ref = ((y - z0 @ (A._A64 @ Wm).T) @ Ap.T @ Wm).norm(dim=1)
        assert torch.allclose(g, ref, atol=1e-10)


def test_refuses_a_pixel_prior_and_a_nonlinear_task():
    from reddiff.operators.base import OperatorCapabilityError

    base = GaussianMixturePrior.mcgdiff(4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"^psld: needs a latent prior \(an encoder and a decoder: prior=latent_tiny"):
        PSLD(steps=5).check_prior(base)

    class Square(MatrixOperator):
        linear = False

    prior, A, _, _ = problem()
    sq = Square(A._A64, sigma_y=0.1)
    with pytest.raises(OperatorCapabilityError, match="psld needs an operator with linear"):
        PSLD(steps=5).check(ThroughDecoder(sq, prior.decode, prior.encode))


def test_gmm_latent_mode_keeps_the_problem_and_psld_beats_the_prior():
    """--latent: the same exact posterior, floor and prior reference as the pixel problem; PSLD at its tuned
    settings below the prior reference."""
    from benchmarks.gmm_posterior import run_problem

    kw = dict(samples=400, steps=50, seed=3, samplers=["psld"])
    lat = run_problem(8, 2, 0, latent=True, **kw)["methods"]
    pix = run_problem(8, 2, 0, **{**kw, "samplers": []})["methods"]
    assert lat["exact"]["sw"] == pix["exact"]["sw"] and lat["prior"]["sw"] == pix["prior"]["sw"]
    assert lat["psld"]["sw"] < 0.6 * lat["prior"]["sw"], (lat["psld"]["sw"], lat["prior"]["sw"])
