"""Latent priors (reddiff/priors/latent.py): strict, safe loading of diffusers folders, the protocol in latent space,
the data term through the decoder, and the linear-decoder Gaussian mixture whose pixel posterior is exact."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from reddiff import registry
from reddiff.core.folders import FOLDERS, resolve_folder
from reddiff.core.weights import MissingWeightsError
from reddiff.operators.base import ThroughDecoder
from reddiff.operators.matrix import MatrixOperator
from reddiff.priors.latent import LatentPrior, LinearDecoderGMM, make_tiny, schedule_of

ROOT = Path(__file__).resolve().parents[1]
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("latent")
    return {"plain": make_tiny(base / "plain", seed=1), "cond": make_tiny(base / "cond", seed=2, conditional=True)}


@pytest.mark.parametrize("kind", ["plain", "cond"])
def test_loader_round_trips_a_random_diffusers_model_bit_for_bit(tiny_dirs, kind):
    root = tiny_dirs[kind]
    prior = LatentPrior(str(root))
    cls = diffusers.UNet2DConditionModel if kind == "cond" else diffusers.UNet2DModel
    # frozen like ours (with parameter gradients on, the CPU kernels differ in the last bit even under no_grad)
    ref_net = cls.from_pretrained(str(root / "unet")).requires_grad_(False)
    ref_ae = diffusers.AutoencoderKL.from_pretrained(str(root / "vae")).requires_grad_(False)
    for mine, ref in ((prior.net, ref_net), (prior.ae, ref_ae)):
        a, b = mine.state_dict(), ref.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    z = torch.randn(2, *prior.shape, generator=torch.Generator().manual_seed(0))
    kw = {"encoder_hidden_states": prior.cond.expand(2, -1, -1)} if kind == "cond" else {}
    with torch.no_grad():
        assert torch.equal(prior.eps(z, 500), ref_net(z, torch.tensor([500.0, 500.0]), **kw).sample)
        x = prior.decode(z)
        assert torch.equal(x, ref_ae.decode(z / 0.18215).sample)
        assert torch.equal(prior.encode(x), ref_ae.encode(x).latent_dist.mean * 0.18215)
    assert (prior.nfe, prior.decoder_calls, prior.encoder_calls) == (1, 1, 1)
    assert prior.pixel_shape == (3, 64, 64) and prior.shape == (4, 16, 16)


def test_scaled_linear_schedule_equals_diffusers():
    cfg = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    sched, pred = schedule_of(cfg)
    ref = diffusers.DDPMScheduler(**cfg)
    assert pred == "epsilon"
    assert torch.allclose(sched.betas, ref.betas.double(), rtol=1e-6, atol=0)  # diffusers builds them in float32
    assert torch.allclose(sched.alpha_bar, ref.alphas_cumprod.double(), rtol=1e-5, atol=0)


def test_v_prediction_is_converted_to_epsilon(tiny_dirs, tmp_path):
    root = make_tiny(tmp_path / "v", seed=3)
    p = root / "scheduler" / "scheduler_config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "prediction_type": "v_prediction"}))
    prior = LatentPrior(str(root))
    z = torch.randn(3, *prior.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v = prior.net(z, torch.full((3,), 200.0)).sample
        a = float(prior.schedule.alpha_bar[200])
        # x_t = sqrt(a) x0 + sqrt(1 - a) eps and v = sqrt(a) eps - sqrt(1 - a) x0  =>  eps = sqrt(a) v + sqrt(1 - a) x_t
        assert torch.allclose(prior.eps(z, 200), a ** 0.5 * v + (1 - a) ** 0.5 * z, atol=1e-6)


def test_strict_and_safe_loading_refuses_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    root = make_tiny(tmp_path / "t", seed=4)
    w = root / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(w))
    save_file({**sd, "extra.weight": torch.zeros(1)}, str(w))
    with pytest.raises(ValueError, match=r"does not match UNet2DModel of its config.json: missing \[\], unexpected "
                                         r"\['extra.weight'\] \(strict loading\)"):
        LatentPrior(str(root))
    w.unlink()  # a folder with only a pickle is not loaded
    torch.save(sd, root / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(MissingWeightsError, match=r"lacks unet/diffusion_pytorch_model.safetensors"):
        LatentPrior(str(root))


def test_a_missing_registered_folder_names_the_folder_and_its_files(monkeypatch, tmp_path):
    monkeypatch.setenv("REDDIFF_HOME", str(tmp_path))
    monkeypatch.delenv("REDDIFF_SD15", raising=False)
    with pytest.raises(MissingWeightsError) as e:
        LatentPrior("sd15")
    msg = str(e.value)
    assert msg.startswith(f"sd15: expected a diffusers-format folder at {tmp_path / 'latent' / 'sd15'} with vae/config.json")
    assert "the folder is absent" in msg and "\n" not in msg
    (tmp_path / "latent" / "sd15" / "vae").mkdir(parents=True)
    (tmp_path / "latent" / "sd15" / "vae" / "config.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match=r"it lacks vae/diffusion_pytorch_model.safetensors, unet/config.json"):
        resolve_folder("sd15")
    from reddiff.core.folders import status_rows

    rows = {r["name"]: r["state"] for r in status_rows()}
    assert rows["sd15"].startswith("incomplete: lacks vae/diffusion_pytorch_model.safetensors")
    assert rows["sd21_base"] == rows["ldm_ffhq256"] == "missing" and rows["latent_tiny"] == "present (no pinned hash)"
    assert {"sd15", "sd21_base", "ldm_ffhq256", "ldm_celebahq256", "latent_tiny"} <= set(FOLDERS)


def test_through_decoder_is_the_composition_and_refuses_svd_samplers():
    g = torch.Generator().manual_seed(0)
    prior = LinearDecoderGMM(torch.randn(3, 4, generator=g, dtype=torch.float64),
                             torch.randn(6, 4, generator=g, dtype=torch.float64))
    A = torch.randn(2, 6, generator=g, dtype=torch.float64)
    op = MatrixOperator(A, sigma_y=0.1)
    seen = ThroughDecoder(op, prior.decode, prior.encode)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64)
    assert torch.allclose(seen(z), z @ (A @ prior.W).T, atol=1e-12)
    y = seen(z)
    assert torch.allclose(seen.pinv(y), op.pinv(y) @ torch.linalg.pinv(prior.W).T, atol=1e-12)
    assert seen.noise_std == op.noise_std and not seen.linear
    with pytest.raises(Exception, match=r"ddrm needs an operator with svd; task operator ThroughDecoder"):
        seen.require("svd", "ddrm")


def test_linear_decoder_gmm_pixel_posterior_is_exact():
    """One component: the latent posterior of y = A W z + s e in the precision form, against the mixture code's
    Kalman form; the pixel samples are W z (mean and covariance to Monte-Carlo accuracy)."""
    g = torch.Generator().manual_seed(1)
    k, d, dy, s = 3, 5, 2, 0.3
    m = torch.randn(1, k, generator=g, dtype=torch.float64)
    W = torch.randn(d, k, generator=g, dtype=torch.float64)
    A = torch.randn(dy, d, generator=g, dtype=torch.float64)
    y = torch.randn(dy, generator=g, dtype=torch.float64)
    prior = LinearDecoderGMM(m, W, covs=torch.tensor([0.7], dtype=torch.float64))
    B = A @ W
    prec = torch.eye(k, dtype=torch.float64) / 0.7 + B.T @ B / s**2
    cov = torch.linalg.inv(prec)
    mean = cov @ (m[0] / 0.7 + B.T @ y / s**2)
    post = prior.pixel_posterior(y, A, s)
    assert torch.allclose(post.mean(), mean, atol=1e-12)
    assert torch.allclose(post.covs()[0], cov, atol=1e-12)
    x = prior.pixel_posterior_samples(y, A, s, 40000, torch.Generator().manual_seed(2))
    assert torch.allclose(x.mean(0), W @ mean, atol=0.03)
    assert torch.allclose(torch.cov(x.T), W @ cov @ W.T, atol=0.05)


def test_run_py_on_the_tiny_latent_prior_scores_pixels(tmp_path):
    from reddiff.run.experiment import run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", "progress=false", "metrics=fast", "prior=latent_tiny",
                                           "sampler=dps", "sampler.steps=3", "data.count=2", "task=sr4"])
        na = compose("config", overrides=["logger=none", "progress=false", "metrics=fast", "prior=latent_tiny",
                                          "sampler=ddrm", "sampler.steps=3", "data.count=2", "task=sr4"])
    s = run(cfg, tmp_path / "dps")
    assert s["status"] == "ok" and s["n_images"] == 2 and s["cost"]["nfe_per_image"] == 3
    from PIL import Image

    img = next((tmp_path / "dps" / "images").rglob("*.png"))
    assert Image.open(img).size == (64, 64)  # pixels, decoded
    fp = json.loads((tmp_path / "dps" / "fingerprint.json").read_text())["values"]
    assert fp["prior.weights_sha256"] == json.dumps(LatentPrior("latent_tiny").weights_sha256)
    s = run(na, tmp_path / "ddrm")
    assert s["status"] == "n/a" and s["reason"].endswith("does not provide it (a latent prior: the sampler sees A(D(z)))")


LATENT = [n for n in registry.sampler_names() if getattr(registry.sampler_class(n), "needs_latent", False)]


@pytest.mark.parametrize("prior", ["latent_tiny", pytest.param("latent_gmm", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", LATENT)
def test_every_latent_solver_runs_or_is_refused_in_one_line_on_every_task(name, prior, tmp_path):
    """On the tiny latent model and on the linear-decoder mixture (``prior=latent_gmm``), through run.py's job
    runner: every task either runs (scored in pixels, NFE counted) or is n/a with the capability it lacks; every
    linear task runs; at least one nonlinear one runs or the solver is linear-only by declaration.  (Tasks whose
    operator needs absent weights are skipped.)"""
    from reddiff.core.errors import UserError
    from reddiff.run.experiment import run

    cls = registry.sampler_class(name)
    small = [f"sampler.{k}={v}" for k, v in cls.test_overrides.items() if v is not None and k != "steps"]
    ran, refused = set(), set()
    for task in registry.task_names():
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=["logger=none", "progress=false", "metrics=fast", f"prior={prior}",
                                               f"sampler={name}", f"task={task}", "data.count=1",
                                               "sampler.steps=4", *small])
        try:
            s = run(cfg, tmp_path / task)
        except UserError as e:  # an operator whose weights are absent (deblur_nonlinear): one line, not our case
            assert "not found" in str(e) and "\n" not in str(e)
            continue
        if s["status"] == "ok":
            assert s["n_images"] == 1 and s["cost"]["nfe_per_image"] > 0
            ran.add(task)
        else:
            assert s["status"] == "n/a" and "needs an operator with" in s["reason"] and "\n" not in s["reason"]
            refused.add(task)
    linear = {t for t in registry.task_names() if registry.task_info(t)["linear"]}
    assert linear <= ran, sorted(linear - ran)
    assert ran - linear or "linear" in cls.requires, f"{name} ran no nonlinear task"
