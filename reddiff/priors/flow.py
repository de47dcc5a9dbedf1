"""Flow-matching checkpoints: a velocity network on the linear interpolant, as a native denoiser ``D(x_e, sigma)``.

    prior = FlowPrior("pnpflow_celeba")      # PnP-Flow's OT flow-matching UNet, CelebA 128 px
    prior = FlowPrior("pnpflow_afhq_cat")    # AFHQ-Cat 256 px

**Time convention, converted exactly.**  PnP-Flow trains OT-CFM as torchcfm does (torchcfm
``conditional_flow_matching.py:83`` ``mu_t = t x1 + (1 - t) x0``, ``:154`` ``u_t = x1 - x0``): noise ``x0``, data ``x1``,
``x_t = t x1 + (1 - t) x0``, target ``v = x1 - x0``, the network fed ``t`` itself in [0, 1]
(PnP-Flow ``pnpflow/train_flow_matching.py:82,104-106``); its denoiser is ``x + (1 - t) v``
(``pnpflow/methods/pnp_flow.py:50-52``).  So data is at ``t = 1`` there; our ``flow`` dialect has noise at
``t = 1`` (``x = (1 - t) x0 + t n``, :mod:`reddiff.priors.dialects`).  With ``s`` our time:

    t_theirs = 1 - s = 1 / (1 + sigma),   v_ours = dx/ds = -v_theirs,   x = x_e / (1 + sigma)
    D(x_e, sigma) = x - s v_ours = x + s v_theirs(x, 1 - s)

(the same state, ``x = (1 - s) x0 + s n``).  Data is in [-1, 1] (``pnpflow/dataloaders.py:26-31`` CelebA:
centre crop 178, resize 128, ``Normalize(0.5, 0.5)``; ``:79-84`` AFHQ-Cat: resize 256, the same normalisation),
as the harness's images.

**Architecture and layout.**  The network is PnP-Flow's DDPM-style UNet, not ADM: :mod:`reddiff.priors.ddpmnet` says
what differs.  The checkpoint ``model_final.pt`` is the bare ``state_dict()`` of that UNet
(``pnpflow/train_flow_matching.py:249``; read with ``model.load_state_dict(torch.load(path))``,
``pnpflow/utils.py:225``), so the key map is the identity.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from reddiff.core import weights as W
from reddiff.priors.base import Prior
from reddiff.priors.ddpmnet import PNPFLOW_AFHQ_CAT, PNPFLOW_CELEBA, DDPMUNet, DDPMUNetConfig
from reddiff.priors.dialects import bcast
from reddiff.priors.unet import _dtype, frozen, load_strict

#: named architectures
ARCHS = {"pnpflow_celeba": PNPFLOW_CELEBA, "pnpflow_afhq_cat": PNPFLOW_AFHQ_CAT}
#: the architecture of each registered flow checkpoint
ARCH_OF_WEIGHTS = {"pnpflow_celeba": "pnpflow_celeba", "pnpflow_afhq_cat": "pnpflow_afhq_cat"}


def flow_arch(arch, weights_name) -> tuple[str, DDPMUNetConfig]:
    if isinstance(arch, DDPMUNetConfig):
        return "custom", arch
    if arch is not None and hasattr(arch, "keys"):
        return "custom", DDPMUNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in dict(arch).items()})
    arch = arch if arch is not None else ARCH_OF_WEIGHTS.get(weights_name or "")
    if arch not in ARCHS:
        raise ValueError(f"FlowPrior: unknown arch {arch!r}; known: {', '.join(ARCHS)} (or a DDPMUNetConfig / dict)")
    return arch, ARCHS[arch]


class FlowPrior(Prior):
    """A velocity network (data at t = 1, torchcfm's convention) seen as the denoiser of the flow dialect."""

    def __init__(self, weights: Union[str, Path] = "pnpflow_celeba", arch=None, key=None, verify: bool = True,
                 device: Union[str, torch.device] = "cpu", dtype="float32", schedule=None, dialect: str = "flow"):
        super().__init__(schedule, dialect)
        weights = str(weights)
        self.weights_name = weights if weights in W.REGISTRY else None
        self.path = Path(W.resolve(weights, verify=verify))  # MissingWeightsError / HashMismatchError
        self.arch, self.cfg = flow_arch(arch, self.weights_name)
        with torch.device("meta"):
            net = DDPMUNet(self.cfg)
        self.dtype = _dtype(dtype)
        self.net = frozen(load_strict(net, self.path, key=key), device, self.dtype)
        self.channels = int(self.cfg.in_channels)
        if (self.cfg.out_channels or self.channels) != self.channels:
            raise ValueError(f"a velocity network outputs C={self.channels} channels, not {self.cfg.out_channels}")
        self.resolution = int(self.cfg.image_size)
        self.shape = (self.channels, self.resolution, self.resolution)
        self.name = self.weights_name or self.path.stem
        self.nparams = sum(p.numel() for p in self.net.parameters())
        self.eval()

    def train(self, mode: bool = True):
        """A prior is inference-only: it stays in eval mode."""
        return super().train(False)

    def velocity(self, x: torch.Tensor, t_theirs: torch.Tensor) -> torch.Tensor:
        """The raw network: ``v = E[x1 - x0 | x_t]`` at the checkpoint's own time ``t_theirs`` (data at 1)."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{self.name} expects samples of shape (B, {', '.join(map(str, self.shape))}), "
                             f"got {tuple(x.shape)}")
        dev = self.net.begin_conv.weight.device
        out = self.net(x.to(device=dev, dtype=self.dtype), t_theirs.to(dev))
        return out.to(device=x.device, dtype=x.dtype)

    def _denoise(self, x_e: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(torch.float64) / (1 + sigma.to(torch.float64))  # our flow time (noise at 1)
        x = bcast(1 - s, x_e) * x_e                  # the flow state (1 - s) x_e
        v_ours = -self.velocity(x, 1 - s)            # their time is 1 - s, their velocity points to the data
        return x - bcast(s, x_e) * v_ours

    def extra_repr(self) -> str:
        return f"weights={self.name!r}, arch={self.arch!r}, resolution={self.resolution}, params={self.nparams}"
