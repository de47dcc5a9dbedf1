"""The latent-diffusion solvers (reddiff/baselines/latent/): ReSample and Latent-DAPS.

End to end through the runner on the tiny random latent model (a linear and a nonlinear task, pixels scored), the
one-line refusal of a pixel prior, the exact pixel posterior of ``LinearDecoderGMM`` (a Gaussian on latents with a
linear decoder: Latent-DAPS's exact variant converges to it as the annealing levels grow), ReSample's stochastic
resampling law (its eq. 9) and its hard data consistency.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from reddiff import registry
from reddiff.baselines.latent.latent_daps import LatentDAPS
from reddiff.baselines.latent.resample import ReSample, stochastic_resample
from reddiff.core.errors import UserError
from reddiff.core.rng import BatchRNG
from reddiff.operators.base import ThroughDecoder
from reddiff.operators.matrix import MatrixOperator
from reddiff.priors.latent import LinearDecoderGMM

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

SMALL = {"resample": ["sampler.steps=6", "sampler.travel_every=2", "sampler.inter_steps=2", "sampler.pixel_iters=5",
                      "sampler.latent_iters=5", "sampler.patience=2"],
         "latent_daps": ["sampler.steps=4", "sampler.ode_steps=2", "sampler.langevin_steps=2"]}


def _cfg(name: str, task: str, prior: str = "latent_tiny"):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["logger=none", "progress=false", "metrics=fast", f"prior={prior}",
                                             f"sampler={name}", "data.count=1", f"task={task}"] + SMALL[name])


@pytest.mark.parametrize("task", ["sr4", "phase_retrieval", "hdr"])
@pytest.mark.parametrize("name", ["resample", "latent_daps"])
def test_runs_end_to_end_on_the_tiny_latent_model(name, task, tmp_path):
    pytest.importorskip("diffusers")
    from reddiff.priors.latent import LatentPrior
    from reddiff.run.experiment import run

    cfg = _cfg(name, task)
    s = run(cfg, tmp_path / name)
    assert s["status"] == "ok" and s["n_images"] == 1
    smp = registry.build_sampler(name, **{o.split("=")[0][8:]: int(o.split("=")[1]) for o in SMALL[name]})
    assert s["cost"]["nfe_per_image"] == smp.expected_nfe(LatentPrior("latent_tiny"))
    png = next((tmp_path / name / "images").rglob("*.png"))
    from PIL import Image

    assert Image.open(png).size == (64, 64)  # pixels: the runner decoded the latent


@pytest.mark.parametrize("name", ["resample", "latent_daps"])
def test_a_pixel_prior_is_refused_in_one_line(name, tmp_path):
    from reddiff.run.experiment import run

    with pytest.raises(UserError, match=rf"^sampler=\S+: {name}: needs a latent prior .* is a pixel prior$"):
        run(_cfg(name, "sr4", prior="embedded"), tmp_path / name)


# ------------------------------------------------------------------------------------------ exact posterior
def gaussian_problem(seed: int = 0):
    """One Gaussian component on latents z in R^3 (variance 0.7), an anisotropic decoder W (5 x 3), y = A W z + e
    with A (2 x 5), sigma 0.3: the exact pixel posterior is Gaussian (``LinearDecoderGMM.pixel_posterior``)."""
    g = torch.Generator().manual_seed(seed)
    k, d, m, s = 3, 5, 2, 0.3
    W = torch.randn(d, k, generator=g, dtype=torch.float64)
    prior = LinearDecoderGMM(torch.randn(1, k, generator=g, dtype=torch.float64), W,
                             covs=torch.tensor([0.7], dtype=torch.float64))
    A = torch.randn(m, d, generator=g, dtype=torch.float64)
    z = prior.sample(1, g)[0]
    y = A @ (W @ z) + s * torch.randn(m, generator=g, dtype=torch.float64)
    post = prior.pixel_posterior(y, A, s)
    mean = W @ post.mean().reshape(-1)
    cov = W @ post.covs()[0] @ W.T
    return prior, ThroughDecoder(MatrixOperator(A, sigma_y=s), prior.decode, prior.encode), y, mean, cov


def posterior_errors(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> tuple[float, float]:
    """Relative errors of the sample mean (in units of the posterior's total std) and covariance (Frobenius)."""
    err_m = float((x.mean(0) - mean).norm() / cov.trace().sqrt())
    err_c = float((torch.cov(x.T) - cov).norm() / cov.norm())
    return err_m, err_c


def run_latent(smp, prior, op, y, n: int, seed: int = 0) -> torch.Tensor:
    z = smp.sample(y[None].expand(n, -1).contiguous(), op, prior, BatchRNG(seed, per_item=False))
    return prior.decode(z).double()


#: Latent-DAPS's exact variant (module docstring): the true likelihood, no clipping, Langevin, Tweedie z0_hat
DAPS_EXACT = {"tau": None, "grad_clip": None, "mc_algo": "langevin", "ode_steps": 1, "ode_sigma_min": 0.0,
              "sigma_max": 20.0, "sigma_min": 0.05, "langevin_steps": 30, "lr": 0.005, "lr_min_ratio": 0.3}


def test_latent_daps_converges_to_the_exact_posterior_of_linear_decoder_gmm():
    """The error against the exact pixel posterior falls as the annealing levels grow (8 -> 80) and is small at 80
    (mean and covariance within 0.1; measured about 0.03 / 0.05)."""
    prior, op, y, mean, cov = gaussian_problem()
    errs = {}
    for steps in (8, 80):
        x = run_latent(LatentDAPS(steps=steps, **DAPS_EXACT), prior, op, y, 3000)
        errs[steps] = posterior_errors(x, mean, cov)
    print("latent_daps errors (mean, cov) by levels:", errs)
    assert errs[80][0] < 0.1 and errs[80][1] < 0.1, errs
    assert errs[80][0] + errs[80][1] < errs[8][0] + errs[8][1], errs


def test_latent_daps_official_hmc_settings_run_and_fit_the_data():
    """The official settings (HMC, clipped gradient, tau 0.01) on the same problem: finite, and the decoded
    samples fit the measurement far better than prior draws do."""
    prior, op, y, mean, cov = gaussian_problem()
    x = run_latent(LatentDAPS(steps=20), prior, op, y, 200)
    assert torch.isfinite(x).all()
    A = op.pixel.A if hasattr(op.pixel, "A") else None
    res = (op.pixel.forward(x) - y).norm(dim=1).mean()
    res_prior = (op.pixel.forward(prior.decode(prior.sample(200, torch.Generator().manual_seed(9)))) - y).norm(dim=1).mean()
    assert res < 0.5 * res_prior, (float(res), float(res_prior), A is None)


# ------------------------------------------------------------------------------------------ ReSample
def test_stochastic_resample_is_the_product_of_the_two_gaussians():
    """Eq. 9: N(sqrt(a) z0, (1 - a)) times N(z_t, gamma), as a density in x: precision 1/(1 - a) + 1/gamma."""
    n = 200000
    z0, zt, a, gam = torch.tensor(0.8), torch.tensor(-1.3), 0.6, 0.25
    x = stochastic_resample(z0.expand(n), zt.expand(n), a, gam, torch.randn(n, generator=torch.Generator().manual_seed(0),
                                                                         dtype=torch.float64))
    prec = 1 / (1 - a) + 1 / gam
    mean = (a ** 0.5 * float(z0) / (1 - a) + float(zt) / gam) / prec
    assert abs(float(x.mean()) - mean) < 5 * (1 / prec / n) ** 0.5
    assert abs(float(x.var()) - 1 / prec) < 0.01 / prec


def test_resample_hard_consistency_fits_the_measurement():
    """Noiseless, well-posed: A W is injective (4 x 3), so hard data consistency (the final latent optimisation)
    recovers z with A W z = y; without it (final_opt=False) the residual is far larger."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(5, 3, generator=g, dtype=torch.float64)
    prior = LinearDecoderGMM(torch.zeros(1, 3, dtype=torch.float64), W)
    A = torch.randn(4, 5, generator=g, dtype=torch.float64)
    op = ThroughDecoder(MatrixOperator(A, sigma_y=0.0), prior.decode, prior.encode)
    z_true = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = z_true @ (A @ W).T
    kw = {"steps": 20, "travel_every": 5, "latent_iters": 2000, "patience": None, "eps": 1e-5, "latent_lr": 0.05}
    z = ReSample(**kw).sample(y, op, prior, BatchRNG([0, 1, 2, 3]))
    z_raw = ReSample(**kw, final_opt=False).sample(y, op, prior, BatchRNG([0, 1, 2, 3]))
    res = float((op(z) - y).norm() / y.norm())
    res_raw = float((op(z_raw) - y).norm() / y.norm())
    assert res < 1e-3 and res_raw > 10 * res, (res, res_raw)
    assert (z - z_true).abs().max() < 1e-2


def test_resample_error_against_the_exact_posterior_is_reported():
    """ReSample is not a posterior sampler (hard consistency): its error against the exact posterior is measured
    (docs/SAMPLERS.md) and bounded loosely here, at the GMM-benchmark settings."""
    prior, op, y, mean, cov = gaussian_problem()
    smp = registry.build_sampler("resample", **ReSample.gmm_hparams)
    prior.reset_nfe()
    x = run_latent(smp, prior, op, y, 500)
    err = posterior_errors(x, mean, cov)
    # the counters count batched calls: per image they are the same numbers
    print("resample errors (mean, cov):", err, "nfe", prior.nfe, "decoder calls", prior.decoder_calls)
    assert prior.nfe == smp.expected_nfe(prior)
    assert torch.isfinite(x).all() and err[0] < 1.0, err
