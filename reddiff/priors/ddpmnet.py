"""The DDPM-style UNet of PnP-Flow's OT flow-matching checkpoints, re-implemented with the published key names.

PnP-Flow's ``pnpflow/models.py:19-21,302-495`` (``UNet``, "copied from ... CW-Huang/sdeflow-light ... modified from
DDPM, Ho et al.") is **not** the guided-diffusion ADM UNet (nor torchcfm's ``UNetModelWrapper``), so our
:class:`reddiff.priors.adm.UNet` cannot load it under any key map.  What differs from ADM, precisely:

* time embedding ``[sin, cos]`` (ADM: ``[cos, sin]``) with frequencies ``exp(-ln(10000) k / (half - 1))`` (ADM:
  ``/ half``), then ``Linear, Swish, Linear`` (``temb_net.main``), ``models.py:253-299``;
* residual block: ``h = conv1(act(norm1(x))) + temb_proj(act(temb))``, ``conv2(act(norm2(h)))``, shortcut a 1x1
  conv when the width changes; no scale-shift norm (ADM: ``use_scale_shift_norm``), ``models.py:58-113``;
* GroupNorm(32) with ``eps = 1e-6`` (ADM: 1e-5), ``models.py:33-38``;
* attention: one head with separate 1x1 ``attn_q``, ``attn_k``, ``attn_v`` convs (ADM: a fused ``qkv`` Conv1d,
  several heads), scale ``C^-1/2``, ``models.py:116-162``;
* down/up-sampling: a stride-2 3x3 conv / nearest x2 then a 3x3 conv (ADM: residual blocks with ``resblock_updown``);
  attention after each residual block whose feature map's side is in ``attn_resolutions`` (at 256 px with (16, 8),
  whose smallest side is 32, only the middle block attends), ``models.py:302-495``.

Module names are the reference's (``temb_net``, ``begin_conv``, ``down_modules.{i}.{i}a_{j}a_block``,
``{i}a_{j}b_attn``, ``{i}b_downsample``, ``mid_modules``, ``up_modules``, ``{i}b_upsample.up_conv``,
``end_conv``), so its ``state_dict`` loads strictly with no renaming.  Initialisation is PyTorch's default
(this module only loads trained weights).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DDPMUNetConfig:
    image_size: int = 128
    in_channels: int = 3
    ch: int = 32
    ch_mult: Sequence[int] = (1, 2, 4, 8)
    num_res_blocks: int = 6
    attn_resolutions: Sequence[int] = (16, 8)  # feature-map sides, in pixels
    resamp_with_conv: bool = True
    out_channels: int | None = None


#: PnP-Flow's OT models (``pnpflow/utils.py:171-179``): ch 32, ch_mult (1, 2, 4, 8), 6 blocks, attention at 16 and 8
PNPFLOW_CELEBA = DDPMUNetConfig(image_size=128)
PNPFLOW_AFHQ_CAT = DDPMUNetConfig(image_size=256)


class Swish(nn.Module):
    def forward(self, x):
        return torch.sigmoid(x) * x


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6)


def conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``[sin, cos]`` of ``t * exp(-ln(10000) k / (half - 1))`` in float32 (the reference's default dtype)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -(math.log(10000) / (half - 1)))
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimeEmbedding(nn.Module):
    def __init__(self, ch: int, temb_ch: int):
        super().__init__()
        self.ch = ch
        self.main = nn.Sequential(nn.Linear(ch, temb_ch), Swish(), nn.Linear(temb_ch, temb_ch))

    def forward(self, t):
        return self.main(sinusoidal(t, self.ch).to(self.main[0].weight.dtype))


class ResidualBlock(nn.Module):
    def __init__(self, in_ch: int, temb_ch: int, out_ch: int):
        super().__init__()
        self.act = Swish()
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm1, self.conv1 = norm(in_ch), conv(in_ch, out_ch)
        self.norm2, self.conv2 = norm(out_ch), conv(out_ch, out_ch)
        self.shortcut = conv(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.temb_proj(self.act(temb))[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return self.shortcut(x) + h


class SelfAttention(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.attn_q, self.attn_k, self.attn_v = conv(ch, ch, 1), conv(ch, ch, 1), conv(ch, ch, 1)
        self.proj_out = conv(ch, ch, 1)
        self.norm = norm(ch)

    def forward(self, x, temb=None):
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).view(b, c, hh * ww) for m in (self.attn_q, self.attn_k, self.attn_v))
        attn = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * (int(c) ** (-0.5)), dim=-1)
        h = torch.bmm(v, attn.permute(0, 2, 1)).view(b, c, hh, ww)
        return x + self.proj_out(h)


class Upsample(nn.Sequential):
    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        self.add_module("up_nn", nn.Upsample(scale_factor=2, mode="nearest"))
        if with_conv:
            self.add_module("up_conv", conv(ch, ch))


class DDPMUNet(nn.Module):
    """``forward(x, t)``: the network at time input ``t`` (a ``(B,)`` tensor of reals)."""

    def __init__(self, cfg: DDPMUNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, mult, nres, attn = cfg.ch, tuple(cfg.ch_mult), cfg.num_res_blocks, set(cfg.attn_resolutions)
        self.num_resolutions = L = len(mult)
        if cfg.image_size % 2 ** (L - 1):
            raise ValueError(f"image_size {cfg.image_size} is not divisible by 2^{L - 1}")
        temb_ch, res, in_ch = 4 * ch, cfg.image_size, ch
        self.temb_net = TimeEmbedding(ch, temb_ch)
        self.begin_conv = conv(cfg.in_channels, ch)
        skips, down = [ch], []
        for i in range(L):
            blocks, out_ch = {}, ch * mult[i]
            for j in range(nres):
                blocks[f"{i}a_{j}a_block"] = ResidualBlock(in_ch, temb_ch, out_ch)
                if res in attn:
                    blocks[f"{i}a_{j}b_attn"] = SelfAttention(out_ch)
                skips.append(out_ch)
                in_ch = out_ch
            if i != L - 1:
                blocks[f"{i}b_downsample"] = conv(out_ch, out_ch, 3, 2) if cfg.resamp_with_conv else nn.AvgPool2d(2, 2)
                res //= 2
                skips.append(out_ch)
            down.append(nn.ModuleDict(blocks))
        self.down_modules = nn.ModuleList(down)
        self.mid_modules = nn.ModuleList([ResidualBlock(in_ch, temb_ch, in_ch), SelfAttention(in_ch),
                                          ResidualBlock(in_ch, temb_ch, in_ch)])
        up = []
        for i in reversed(range(L)):
            blocks, out_ch = {}, ch * mult[i]
            for j in range(nres + 1):
                blocks[f"{i}a_{j}a_block"] = ResidualBlock(in_ch + skips.pop(), temb_ch, out_ch)
                if res in attn:
                    blocks[f"{i}a_{j}b_attn"] = SelfAttention(out_ch)
                in_ch = out_ch
            if i != 0:
                blocks[f"{i}b_upsample"] = Upsample(out_ch, cfg.resamp_with_conv)
                res *= 2
            up.append(nn.ModuleDict(blocks))
        self.up_modules = nn.ModuleList(up)
        self.end_conv = nn.Sequential(norm(in_ch), Swish(), conv(in_ch, cfg.out_channels or cfg.in_channels))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb_net(t)
        attn, nres = set(self.cfg.attn_resolutions), self.cfg.num_res_blocks
        hs = [self.begin_conv(x)]
        for i, blocks in enumerate(self.down_modules):
            for j in range(nres):
                h = blocks[f"{i}a_{j}a_block"](hs[-1], temb)
                if h.shape[2] in attn:
                    h = blocks[f"{i}a_{j}b_attn"](h)
                hs.append(h)
            if i != self.num_resolutions - 1:
                hs.append(blocks[f"{i}b_downsample"](hs[-1]))
        h = hs[-1]
        h = self.mid_modules[2](self.mid_modules[1](self.mid_modules[0](h, temb)), temb)
        for k, blocks in enumerate(self.up_modules):
            i = self.num_resolutions - 1 - k
            for j in range(nres + 1):
                h = blocks[f"{i}a_{j}a_block"](torch.cat([h, hs.pop()], dim=1), temb)
                if h.shape[2] in attn:
                    h = blocks[f"{i}a_{j}b_attn"](h)
            if i != 0:
                h = blocks[f"{i}b_upsample"](h)
        return self.end_conv(h)
