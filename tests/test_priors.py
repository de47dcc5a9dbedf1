"""UNetPrior: the Prior protocol on top of the ADM UNet, strict loading, options, Hydra configs."""
from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from reddiff.core import weights as W
from reddiff.priors.adm import UNet, UNetConfig
from reddiff.priors.unet import ARCH_OF_WEIGHTS, ARCHS, StateDictMismatchError, UNetPrior
from reddiff.priors.training.train import EMBEDDED_CONFIG, export

ROOT = Path(__file__).resolve().parents[1]
TINY = UNetConfig(image_size=16, model_channels=32, out_channels=3, num_res_blocks=1, attention_resolutions=(8,),
                  channel_mult=(1, 2), num_head_channels=16)


def perturbed(cfg: UNetConfig, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)) and all((p == 0).all() for p in m.parameters()):
                m.weight.normal_(0, 1 / math.sqrt(m.weight[0].numel()), generator=g)
                m.bias.normal_(0, 0.05, generator=g)
    return net


@pytest.fixture
def tiny_file(tmp_path):
    net = perturbed(TINY, seed=1)
    path = tmp_path / "tiny.safetensors"
    export(net, TINY, str(path), {"steps": 1})
    return net, path


def test_protocol_shape_eps_x0_nfe(tiny_file):
    net, path = tiny_file
    prior = UNetPrior(str(path))  # arch from the file's unet_config metadata
    assert prior.shape == (3, 16, 16) and prior.resolution == 16
    assert prior.name == "tiny" and prior.arch == "metadata"
    assert not any(p.requires_grad for p in prior.parameters()) and not prior.training
    x = torch.randn(3, 3, 16, 16)
    prior.reset_nfe()
    with torch.no_grad():
        eps = prior.eps(x, 300)
        assert torch.equal(eps, net(x, torch.full((3,), 300)))
        x0 = prior.x0(x, torch.tensor([300, 300, 300]))
    a = prior.schedule.alpha_bar_at(300).item()
    assert torch.allclose(x0, (x - math.sqrt(1 - a) * eps) / math.sqrt(a), atol=1e-5)
    assert prior.nfe == 2
    prior.reset_nfe()
    assert prior.nfe == 0


def test_wrong_input_shape_is_refused(tiny_file):
    _, path = tiny_file
    prior = UNetPrior(str(path))
    with pytest.raises(ValueError, match=r"expects samples of shape \(B, 3, 16, 16\)"):
        prior.eps(torch.randn(1, 3, 32, 32), 10)


def test_mismatched_state_dict_lists_keys(tmp_path):
    sd = perturbed(TINY).state_dict()
    sd.pop("out.2.weight")
    sd["extra.weight"] = torch.zeros(3)
    sd["time_embed.0.bias"] = torch.zeros(7)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(StateDictMismatchError) as e:
        UNetPrior(str(path), arch=TINY)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing keys: out.2.weight" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "time_embed.0.bias file [7] vs model [128]" in msg


def test_wrapper_prefix_and_conditional_hints(tmp_path):
    sd = {"module." + k: v for k, v in perturbed(TINY).state_dict().items()}
    torch.save(sd, tmp_path / "wrapped.pt")
    with pytest.raises(StateDictMismatchError, match="starts with 'module.'"):
        UNetPrior(str(tmp_path / "wrapped.pt"), arch=TINY)
    cond = perturbed(UNetConfig(**{**TINY.__dict__, "num_classes": 10})).state_dict()
    torch.save(cond, tmp_path / "cond.pt")
    with pytest.raises(StateDictMismatchError, match="class-conditional"):
        UNetPrior(str(tmp_path / "cond.pt"), arch=TINY)


def test_path_without_metadata_needs_arch(tmp_path):
    torch.save(perturbed(TINY).state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="pass arch="):
        UNetPrior(str(tmp_path / "plain.pt"))
    with pytest.raises(ValueError, match="unknown arch 'nope'"):
        UNetPrior(str(tmp_path / "plain.pt"), arch="nope")
    # a dict of UNetConfig fields works (what a Hydra config would pass)
    prior = UNetPrior(str(tmp_path / "plain.pt"), arch={**TINY.__dict__, "attention_resolutions": [8]})
    assert prior.shape == (3, 16, 16)


def test_class_conditional_labels(tmp_path):
    cfg = UNetConfig(**{**TINY.__dict__, "num_classes": 10})
    export(perturbed(cfg, seed=3), cfg, str(tmp_path / "cond.safetensors"), {})
    prior = UNetPrior(str(tmp_path / "cond.safetensors"))
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="class-conditional"):
        prior.eps(x, 5)
    prior.class_labels = 3
    with torch.no_grad():
        e3 = prior.eps(x, 5)
        prior.class_labels = torch.tensor([7, 7])
        e7 = prior.eps(x, 5)
    assert not torch.allclose(e3, e7)
    prior.class_labels = 10
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        prior.eps(x, 5)


def test_dtype_channels_last_autocast_options(tiny_file):
    net, path = tiny_file
    x, t = torch.randn(2, 3, 16, 16), 200
    with torch.no_grad():
        ref = UNetPrior(str(path)).eps(x, t)
        cl = UNetPrior(str(path), channels_last=True).eps(x, t)
        bf = UNetPrior(str(path), dtype="bfloat16").eps(x, t)
        ac = UNetPrior(str(path), autocast=True).eps(x, t)
    assert torch.allclose(cl, ref, atol=1e-5)
    scale = ref.abs().max()
    for out in (bf, ac):
        assert out.dtype == torch.float32  # results come back in the caller's dtype
        assert (out - ref).abs().max() <= 0.05 * scale
    assert UNetPrior(str(path), device="auto").device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        UNetPrior(str(path), dtype="int7")


def test_gradient_wrt_input_through_prior(tiny_file):
    _, path = tiny_file
    prior = UNetPrior(str(path))
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    prior.eps(x, 400).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["embedded", "adm_imagenet256", "dps_ffhq256"])
def test_prior_yaml_is_consistent(name):
    cfg = OmegaConf.load(ROOT / "conf" / "prior" / f"{name}.yaml")
    assert cfg._target_ == "reddiff.priors.unet.UNetPrior"
    params = set(inspect.signature(UNetPrior.__init__).parameters) - {"self"}
    keys = set(cfg.keys()) - {"_target_"}
    assert keys <= params, keys - params
    assert cfg.weights in W.REGISTRY and ARCH_OF_WEIGHTS[cfg.weights] == cfg.arch and cfg.arch in ARCHS
    assert cfg.verify is True
    assert not (cfg.channels_last or cfg.autocast or cfg.compile)  # perf switches are opt-in


def test_embedded_yaml_instantiates_the_shipped_prior():
    from hydra.utils import instantiate

    if W.REGISTRY["embedded64"].find() is None:
        pytest.skip("embedded64.safetensors not present (train it: python -m reddiff.priors.training.train ... --export)")
    root = OmegaConf.create({"device": "cpu", "prior": OmegaConf.load(ROOT / "conf" / "prior" / "embedded.yaml")})
    prior = instantiate(root.prior)
    assert isinstance(prior, UNetPrior) and prior.shape == (3, 64, 64) and prior.device.type == "cpu"
    # the shipped file was trained with the embedded configuration: same structure, strictly loaded
    assert prior.cfg == EMBEDDED_CONFIG
    with torch.no_grad():
        assert prior.eps(torch.randn(1, 3, 64, 64), 500).shape == (1, 3, 64, 64)


# ---------------------------------------------------------------------------------------- real weights
@pytest.mark.weights
@pytest.mark.parametrize("name", ["adm_imagenet256_uncond", "dps_ffhq256"])
def test_published_weights_load_strictly(name):
    if W.REGISTRY[name].find() is None:
        pytest.skip(f"{name} not in the cache: {W.REGISTRY[name].missing_message()}")
    prior = UNetPrior(name)
    assert prior.shape == (3, 256, 256) and prior.learn_sigma
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = prior.eps(x, 999)
    assert eps.shape == (1, 3, 256, 256) and torch.isfinite(eps).all()
    # at t = T-1 (alpha_bar ~ 4e-5) x_t is almost pure noise, so a trained model returns almost x_t itself
    assert torch.nn.functional.cosine_similarity(eps.flatten(), x.flatten(), dim=0) > 0.9


# ---------------------------------------------------------------------------------------- eval_prior
class _PointPrior(__import__("reddiff.priors.base", fromlist=["Prior"]).Prior):
    """The exact epsilon of a data distribution concentrated on one image x*."""

    def __init__(self, x_star):
        super().__init__()
        self.x_star = x_star
        self.shape = tuple(x_star.shape)

    def _eps(self, x_t, t):
        a = self.alpha_bar(t, x_t).view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * self.x_star) / (1 - a).sqrt()


def test_eval_prior_ddim_and_denoiser_are_exact_for_a_point_prior():
    from reddiff.priors.training.evaluate import ddim_sample, denoise_eval

    x_star = torch.rand(3, 8, 8) * 1.6 - 0.8
    prior = _PointPrior(x_star)
    out = ddim_sample(prior, n=3, steps=10, seed=1)
    assert torch.allclose(out, x_star.expand(3, -1, -1, -1), atol=1e-4)
    assert prior.nfe == 10
    rows = denoise_eval(prior, x_star.expand(4, -1, -1, -1).clone(), [0.1, 0.4])
    for r in rows:
        assert r["psnr_prior"] > 60 and r["psnr_prior"] > r["psnr_gauss"] > r["psnr_noisy"]
        assert abs(r["sigma_eff"] - r["sigma"]) < 0.01 * r["sigma"] + 2e-3  # the timestep matches the level


def test_eval_prior_gaussian_filter_and_psnr():
    from reddiff.priors.training.evaluate import gaussian_blur, psnr

    c = torch.full((1, 3, 12, 12), 0.3)
    assert torch.allclose(gaussian_blur(c, 1.5), c, atol=1e-6)  # constants are preserved (reflect padding)
    x = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(psnr(x + 0.2, x), torch.full((2,), 20.0), atol=1e-4)  # error 0.1 on [0,1] -> 20 dB


def test_eval_prior_cli_writes_grid_and_card(tiny_file, tmp_path):
    from PIL import Image

    from reddiff.priors.training.evaluate import BEGIN, END, main

    _, path = tiny_file
    card = tmp_path / "CARD.md"
    card.write_text(f"# card\n\nbefore\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    out = tmp_path / "grid.png"
    res = main(["--weights", str(path), "--out", str(out), "--card", str(card), "--samples", "4",
                "--ddim-steps", "3", "--log", str(tmp_path / "nolog.jsonl")])
    assert Image.open(out).size == (2 * (2 * (16 + 2) + 2),) * 2
    text = card.read_text()
    assert text.startswith("# card\n\nbefore") and text.rstrip().endswith("after") and "old" not in text
    assert text.count(BEGIN) == 1 and "| 0.10 |" in text and "grid.png" in text
    assert [r["sigma"] for r in res["denoise"]] == [0.1, 0.2, 0.4] and res["denoise"][0]["n"] == 12
