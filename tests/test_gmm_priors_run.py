"""prior=image_gmm and prior=latent_gmm through run.py's job runner: pixel samplers (linear, flow, nonlinear tasks)
on the exact image mixture, every latent solver on the same mixture behind the 2x nearest-neighbour decoder,
refusals in one line, and the latent prior's exactness (decoder, encoder and denoiser against dense float64 brute
force).  The image mixture's own denoiser is checked against the closed form in tests/test_image_gmm.py."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from reddiff import registry
from reddiff.core.errors import UserError
from reddiff.priors.latent import ImageMixtureLatent
from reddiff.run.experiment import run
from reddiff.run.photo_priors import image_gmm, latent_gmm

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["prior.families=1", "prior.variants=2"]  # K = 6 components: the same code path, a fast prior
F64 = torch.float64


def _cfg(prior: str, sampler: str, task: str, *extra: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["logger=none", "progress=false", "metrics=fast", f"prior={prior}",
                                            f"sampler={sampler}", f"task={task}", "data.count=1", *SMALL, *extra])


def _expected_nfe(cfg) -> int:
    return instantiate(cfg.sampler).expected_nfe(instantiate(cfg.prior))


def _assert_ran(s: dict, cfg) -> None:
    assert s["status"] == "ok" and s["n_images"] == 1
    assert set(s["metrics"]) >= {"psnr", "ssim"}
    for name, m in s["metrics"].items():
        v = m["mean"] if isinstance(m, dict) else m
        assert math.isfinite(float(v)), (name, m)
    assert s["cost"]["nfe_per_image"] == _expected_nfe(cfg) > 0


# ------------------------------------------------------------------------------------------ configs
def test_defaults_mirror_the_benchmark_and_follow_the_data_resolution():
    """K = 3 x 24 x 8 = 576 at the demo data's 64 px by default; data.resolution sets the size."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["prior=image_gmm"])
        small = compose("config", overrides=["prior=latent_gmm", "data.resolution=32"])
    assert {k: cfg.prior[k] for k in ("families", "variants", "std", "seed", "dialect")} == dict(
        families=24, variants=8, std=0.1, seed=0, dialect="vp_discrete")
    assert cfg.prior.size is None and small.prior.size == 32
    prior = instantiate(small.prior, families=1, variants=2)
    assert prior.shape == (3, 16, 16) and prior.pixel_shape == (3, 32, 32) and prior.K == 6
    assert image_gmm(families=1, variants=2).shape == (3, 64, 64)


def test_bad_settings_are_one_line():
    for kw in (dict(size=30), dict(families=0), dict(std=0.0)):
        with pytest.raises(ValueError) as e:
            image_gmm(**kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="multiples of factor=3"):
        latent_gmm(size=16, factor=3, families=1, variants=2)


# ------------------------------------------------------------------------------------------ pixel samplers
@pytest.mark.parametrize("sampler,task,extra", [
    ("reddiff", "sr4", ["sampler.steps=5"]),
    ("ddrm", "inpaint_box", ["sampler.steps=4"]),
    ("pnp_flow", "sr4", ["sampler.steps=4", "sampler.num_samples=2", "prior.dialect=flow"]),
    ("dps", "phase_retrieval", ["sampler.steps=4"]),
])
def test_pixel_samplers_run_on_image_gmm(sampler, task, extra, tmp_path):
    cfg = _cfg("image_gmm", sampler, task, *extra)
    s = run(cfg, tmp_path / sampler)
    _assert_ran(s, cfg)
    assert (tmp_path / sampler / "metrics.csv").is_file() and (tmp_path / sampler / "summary.json").is_file()


def test_a_latent_solver_on_image_gmm_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        run(_cfg("image_gmm", "latent_dps", "sr4", "sampler.steps=3"), tmp_path / "x")
    assert "needs a latent prior" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ latent solvers
LATENT = [n for n in registry.sampler_names() if getattr(registry.sampler_class(n), "needs_latent", False)]


@pytest.mark.parametrize("task", ["sr4", "hdr"])
@pytest.mark.parametrize("name", LATENT)
def test_every_latent_solver_runs_on_latent_gmm(name, task, tmp_path):
    """sr4 runs for every latent solver (scored in pixels, NFE counted); the nonlinear hdr runs too, except for a
    linear-only solver (PSLD), which is n/a in one line."""
    cls = registry.sampler_class(name)
    small = [f"sampler.{k}={v}" for k, v in cls.test_overrides.items() if v is not None and k != "steps"]
    cfg = _cfg("latent_gmm", name, task, "sampler.steps=4", *small)
    s = run(cfg, tmp_path / name)
    if "linear" in cls.requires and not registry.task_info(task)["linear"]:
        assert s["status"] == "n/a" and "needs an operator with" in s["reason"] and "\n" not in s["reason"]
        return
    _assert_ran(s, cfg)
    from PIL import Image

    assert Image.open(next((tmp_path / name / "images").rglob("*.png"))).size == (64, 64)  # decoded pixels


def test_an_svd_sampler_on_latent_gmm_is_refused_in_one_line(tmp_path):
    s = run(_cfg("latent_gmm", "ddrm", "sr4", "sampler.steps=3"), tmp_path / "ddrm")
    assert s["status"] == "n/a" and "\n" not in s["reason"]
    assert s["reason"].endswith("(a latent prior: the sampler sees A(D(z)))")


# ------------------------------------------------------------------------------------------ exactness
def _dense(f, n_in: int, shape) -> torch.Tensor:
    """The matrix of the linear map ``f`` on flattened inputs of ``shape`` (columns: images of the unit vectors)."""
    eye = torch.eye(n_in, dtype=F64).reshape((n_in,) + tuple(shape))
    return f(eye).reshape(n_in, -1).T


def test_latent_gmm_is_the_exact_image_of_the_pixel_mixture():
    """Two components on 4x4 RGB pixels, factor 2, float64 by brute force: D is nearest-neighbour upsampling with
    orthogonal columns, E = D^+, the latent components are the law of E x (means E m_k, covariance E s^2 I E^T),
    and the latent denoiser at several sigma is the dense Bayes posterior mean of z given z + sigma n."""
    g = torch.Generator().manual_seed(0)
    means, s = 0.5 * torch.randn(2, 3, 4, 4, generator=g, dtype=F64), 0.3
    prior = ImageMixtureLatent(means, s, factor=2, weights=torch.tensor([0.3, 0.7], dtype=F64))
    D = _dense(prior.decode, 12, (3, 2, 2))  # (48, 12)
    E = _dense(prior.encode, 48, (3, 4, 4))  # (12, 48)
    assert prior.decoder_calls == 1 and prior.encoder_calls == 1
    assert torch.allclose(D.T @ D, 4 * torch.eye(12, dtype=F64))  # orthogonal columns of norm 2
    assert torch.allclose(E, torch.linalg.pinv(D), atol=1e-12)
    mz = means.reshape(2, -1) @ E.T
    cov = s ** 2 * E @ E.T  # Cov(E x) for x ~ N(m_k, s^2 I)
    assert torch.allclose(prior.means, mz, atol=1e-12)
    for k in range(2):  # isotropic components: one variance each
        assert torch.allclose(prior.variances[k] * torch.eye(12, dtype=F64), cov, atol=1e-12)
    z = torch.randn(3, 12, generator=g, dtype=F64)
    w = torch.tensor([0.3, 0.7], dtype=F64)
    for sig in (0.05, 0.4, 3.0):
        x_e = z + sig * torch.randn(3, 12, generator=g, dtype=F64)
        C = cov + sig ** 2 * torch.eye(12, dtype=F64)  # x_e | k ~ N(mz_k, C)
        Ci = torch.linalg.inv(C)
        logp = torch.stack([torch.distributions.MultivariateNormal(mz[k], C).log_prob(x_e) for k in range(2)], -1)
        r = torch.softmax(logp + w.log(), -1)
        post_k = torch.stack([mz[k] + (cov @ Ci @ (x_e - mz[k]).T).T for k in range(2)], 1)  # (3, K, 12)
        ref = (r[..., None] * post_k).sum(1)
        out = prior.denoise(x_e.reshape(3, 3, 2, 2), sig).reshape(3, 12)
        assert (out - ref).abs().max() < 1e-10, sig
