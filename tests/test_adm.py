"""The ADM UNet re-implementation (reddiff/priors/adm.py): published shapes, strict loading, gradients.

The numerical comparison against openai/guided-diffusion itself is done outside the repository (third-party
code is not vendored); its method and numbers are in docs/MODEL_CARD.md ("Verification").
"""
from __future__ import annotations

import math

import pytest
import torch

from reddiff.core.checkpoint import load_state_dict
from reddiff.priors.adm import (ADM_IMAGENET_256_COND, ADM_IMAGENET_256_UNCOND, DPS_FFHQ_256, AttentionBlock, UNet,
                                UNetConfig)
from reddiff.priors.training.train import EMBEDDED_CONFIG, export

TINY = UNetConfig(image_size=16, model_channels=32, out_channels=3, num_res_blocks=1, attention_resolutions=(8,),
                  channel_mult=(1, 2), num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True)


def perturbed(cfg: UNetConfig, seed: int = 0) -> UNet:
    """A UNet whose zero-initialised layers (and norm affines) carry random values, so every path matters."""
    torch.manual_seed(seed)
    net = UNet(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)) and all((p == 0).all() for p in m.parameters()):
                m.weight.normal_(0, 1 / math.sqrt(m.weight[0].numel()), generator=g)
                m.bias.normal_(0, 0.05, generator=g)
            elif isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return net


# -------------------------------------------------------------------------------- published configurations
@pytest.mark.parametrize("cfg,params,entries", [
    (ADM_IMAGENET_256_UNCOND, 552_814_086, 566),   # 256x256_diffusion_uncond.pt
    (ADM_IMAGENET_256_COND, 553_838_086, 567),     # 256x256_diffusion.pt: + label_emb (1000 x 1024)
    (DPS_FFHQ_256, 93_563_910, 362),               # ffhq_10m.pt
    (EMBEDDED_CONFIG, 3_705_571, 254),             # reddiff/assets/embedded64.safetensors
], ids=["adm_uncond", "adm_cond", "dps_ffhq", "embedded64"])
def test_published_parameter_and_entry_counts(cfg, params, entries):
    with torch.device("meta"):
        net = UNet(cfg)
    assert sum(p.numel() for p in net.parameters()) == params
    assert len(net.state_dict()) == entries


def test_published_key_layout():
    """Names the published files use (spot checks across every block type)."""
    with torch.device("meta"):
        sd = UNet(ADM_IMAGENET_256_UNCOND).state_dict()
    for k, shape in {
        "time_embed.0.weight": (1024, 256),
        "input_blocks.0.0.weight": (256, 3, 3, 3),
        "input_blocks.3.0.op.weight": None,  # absent: resblock_updown uses a ResBlock, not a Downsample
        "input_blocks.3.0.in_layers.2.weight": (256, 256, 3, 3),
        "input_blocks.10.1.qkv.weight": (1536, 512, 1),  # first attention at 32 px (ds=8)
        "middle_block.1.proj_out.weight": (1024, 1024, 1),
        "output_blocks.17.0.skip_connection.weight": (256, 512, 1, 1),
        "out.2.weight": (6, 256, 3, 3),
    }.items():
        if shape is None:
            assert k not in sd
        else:
            assert tuple(sd[k].shape) == shape, k


# -------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_strict_load_round_trip(tmp_path, fmt):
    src = perturbed(TINY, seed=1)
    path = tmp_path / f"w.{fmt}"
    if fmt == "pt":
        torch.save(src.state_dict(), path)
    else:
        export(src, TINY, str(path), {"steps": 0})
    dst = UNet(TINY).eval()
    res = dst.load_state_dict(load_state_dict(path), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 900])
    with torch.no_grad():
        a, b = src(x, t), dst(x, t)
    assert a.abs().max() > 0.1  # the perturbed output path carries signal
    assert torch.equal(a, b)


def test_strict_load_rejects_other_architecture():
    sd = perturbed(TINY).state_dict()
    other = UNet(UNetConfig(**{**TINY.__dict__, "num_res_blocks": 2}))
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict(sd, strict=True)


# -------------------------------------------------------------------------------- attention
def attention_formula(block: AttentionBlock, x: torch.Tensor, new_order: bool) -> torch.Tensor:
    """Independent statement of ADM attention: softmax(q^T k / sqrt(ch)) per head, residual + proj_out."""
    b, c, hh, ww = x.shape
    xs = x.reshape(b, c, -1)
    qkv = block.qkv(block.norm(xs))
    heads = block.num_heads
    ch = c // heads
    if new_order:   # [q(all heads), k(all heads), v(all heads)]
        q, k, v = (z.reshape(b, heads, ch, -1) for z in qkv.chunk(3, dim=1))
    else:           # legacy: per head [q, k, v]
        q, k, v = qkv.reshape(b, heads, 3 * ch, -1).split(ch, dim=2)
    w = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / math.sqrt(ch), dim=-1)
    h = torch.einsum("bhts,bhcs->bhct", w, v).reshape(b, c, -1)
    return (xs + block.proj_out(h)).reshape(b, c, hh, ww)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_matches_formula(new_order):
    torch.manual_seed(0)
    blk = AttentionBlock(64, num_head_channels=16, new_order=new_order).eval()
    torch.nn.init.normal_(blk.proj_out.weight, 0, 0.2)
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        assert torch.allclose(blk(x), attention_formula(blk, x, new_order), atol=1e-5)
    assert blk.num_heads == 4


def _directional_check(f, x: torch.Tensor, h: float = 1e-2):
    """autograd directional derivative against a central finite difference (float32 tolerances)."""
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    xg = x.clone().requires_grad_(True)
    f(xg).backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    auto = (xg.grad * v).sum().item()
    with torch.no_grad():
        fd = (f(x + h * v) - f(x - h * v)).item() / (2 * h)
    assert abs(auto) > 1e-3
    assert abs(auto - fd) <= 2e-2 * abs(fd) + 1e-3, (auto, fd)
    return xg.grad


def test_input_gradient_flows_through_attention_with_frozen_weights():
    torch.manual_seed(0)
    blk = AttentionBlock(64, num_head_channels=16).eval().requires_grad_(False)
    torch.nn.init.normal_(blk.proj_out.weight, 0, 0.2)
    w = torch.randn(2, 64, 4, 4)
    x = torch.randn(2, 64, 4, 4)
    # the residual alone has gradient w; the attention path must add to it
    grad = _directional_check(lambda z: (blk(z) * w).sum(), x)
    assert (grad - w).abs().max() > 1e-2


def test_input_gradient_through_whole_unet_with_frozen_weights():
    net = perturbed(TINY, seed=2).requires_grad_(False)
    assert not any(p.requires_grad for p in net.parameters())
    t = torch.tensor([100, 700])
    w = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    _directional_check(lambda z: (net(z, t) * w).sum(), x)
    assert all(p.grad is None for p in net.parameters())


# -------------------------------------------------------------------------------- dtypes and learn_sigma
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_close_to_float32(dtype):
    net = perturbed(TINY, seed=4)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 600])
    with torch.no_grad():
        ref = net(x, t)
        low = net.to(dtype)(x.to(dtype), t)
    assert low.dtype == dtype
    assert (low.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_learn_sigma_eps_is_first_channels(tmp_path):
    from reddiff.priors.unet import UNetPrior

    cfg = UNetConfig(**{**TINY.__dict__, "out_channels": 6, "learn_sigma": True})
    net = perturbed(cfg, seed=7)
    path = tmp_path / "ls.safetensors"
    export(net, cfg, str(path), {})
    prior = UNetPrior(str(path), arch=None)
    assert prior.learn_sigma and prior.shape == (3, 16, 16)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([50, 400])
    with torch.no_grad():
        full = net(x, t)
        eps = prior.eps(x, t)
    assert full.shape[1] == 6 and eps.shape == (2, 3, 16, 16)
    assert torch.equal(eps, full[:, :3])
    assert not torch.allclose(eps, full[:, 3:])  # the variance channels are different numbers
