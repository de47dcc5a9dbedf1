"""EDM-format checkpoints: a preconditioned denoiser ``D(x_e, sigma)`` around an ADM network, loaded strictly.

    prior = EDMPrior("inversebench_ffhq256")                   # InverseBench's ffhq256.pt (VPPrecond around ADM)
    prior = EDMPrior("dps_ffhq256")                            # DPS's ffhq_10m.pt as DAPS wraps it (VPPrecond)
    prior = EDMPrior("/some/file.pt", arch="dps_ffhq256", precond="edm", layout="wrapped")

The two preconditionings of NVlabs/edm ``training/networks.py`` that these checkpoints use, with ``s = sigma`` and
``F`` the network (the first C output channels when it has 2C, ``learn_sigma``):

=========  ===========================  ==============================  ===================  =================
precond    c_skip                       c_out                           c_in                 c_noise (time)
=========  ===========================  ==============================  ===================  =================
``edm``    ``sd^2 / (s^2 + sd^2)``      ``s sd / sqrt(s^2 + sd^2)``     ``1/sqrt(s^2+sd^2)``  ``ln(s) / 4``
``vp``     ``1``                        ``-s``                          ``1/sqrt(s^2 + 1)``   ``(M - 1) t(s)``
=========  ===========================  ==============================  ===================  =================

``D = c_skip x_e + c_out F(c_in x_e, c_noise)``; ``sd`` = sigma_data = 0.5; ``t(s)`` the VP-SDE time
``(sqrt(beta_min^2 + 2 beta_d ln(1 + s^2)) - beta_min) / beta_d`` (beta_min 0.1, beta_d 19.9, M = 1000).
Sources: NVlabs/edm ``training/networks.py:501-508`` (VPPrecond), ``:515-517`` (sigma_inv), ``:660-667``
(EDMPrecond); the same lines in DAPS ``model/precond.py:48-60, 67-69`` and InverseBench ``models/precond.py:50-57,
64-66`` (VPPrecond) and ``:206-213`` (EDMPrecond).  The ``vp`` network is an epsilon-predictor: ``F = eps``, so
this is the ``vp_continuous`` time input of an ADM network (:mod:`reddiff.priors.dialects`).

Layouts (the key map): ``wrapped`` is the preconditioner's own state dict, the network under ``model.``
(``self.model = ...`` in InverseBench ``models/precond.py:42``, saved as ``{'ema': ...}`` or ``{'net': ...}`` and
read with ``ckpt['ema']`` else ``ckpt['net']``, ``main.py:62-68``); ``adm`` is a bare guided-diffusion state dict
(DAPS builds the ADM from ``ffhq_10m.pt``, ``model/ddpm/unet.py:91-92``, and wraps it in VPPrecond at run time,
``model/__init__.py:116``).  Below ``model.`` the keys are guided-diffusion's, so the network is our
:class:`reddiff.priors.adm.UNet` with no renaming.  Coefficients are computed in float64 (the official code: float32).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from reddiff.core import weights as W
from reddiff.priors.adm import UNet, UNetConfig
from reddiff.priors.base import Prior
from reddiff.priors.dialects import VPContinuous, bcast
from reddiff.priors.unet import _dtype, frozen, load_strict, resolve_arch

PRECONDS = ("edm", "vp")
#: layout -> (nesting keys tried in order, attribute holding the network)
LAYOUTS = {"wrapped": (("ema", "net"), "model"), "adm": (None, None)}
#: the format of each registered EDM-format file: (arch, precond, layout)
FORMAT_OF_WEIGHTS = {
    "inversebench_ffhq256": ("dps_ffhq256", "vp", "wrapped"),  # converted from DPS (InverseBench README)
    "dps_ffhq256": ("dps_ffhq256", "vp", "adm"),               # DAPS's use of the same network
}


class Wrapped(torch.nn.Module):
    """The official preconditioner's parameter layout: the network is its only child, under ``attr``."""

    def __init__(self, net: torch.nn.Module, attr: str):
        super().__init__()
        self.attr = attr
        self.add_module(attr, net)

    @property
    def inner(self) -> torch.nn.Module:
        return getattr(self, self.attr)


class EDMPrior(Prior):
    """A native denoiser ``D(x_e, sigma)``: EDM / VP preconditioning around an ADM UNet (see the module docstring)."""

    def __init__(self, weights: Union[str, Path] = "inversebench_ffhq256", arch=None, precond: Optional[str] = None,
                 layout: Optional[str] = None, key=None, verify: bool = True, device: Union[str, torch.device] = "cpu",
                 dtype="float32", sigma_data: float = 0.5, beta_min: float = 0.1, beta_d: float = 19.9, M: int = 1000,
                 schedule=None, dialect: str = "edm"):
        super().__init__(schedule, dialect)
        weights = str(weights)
        self.weights_name = weights if weights in W.REGISTRY else None
        fmt = FORMAT_OF_WEIGHTS.get(self.weights_name or "", (None, None, None))
        self.precond = precond or fmt[1]
        self.layout = layout or fmt[2]
        if self.precond not in PRECONDS:
            raise ValueError(f"EDMPrior: precond must be one of {', '.join(PRECONDS)}, got {self.precond!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"EDMPrior: layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        self.path = Path(W.resolve(weights, verify=verify))  # MissingWeightsError / HashMismatchError
        self.arch, cfg = resolve_arch(arch if arch is not None else fmt[0], None, self.path)
        self.cfg: UNetConfig = cfg
        keys, attr = LAYOUTS[self.layout]
        with torch.device("meta"):
            net = UNet(cfg)
            holder = Wrapped(net, attr) if attr else net
        load_strict(holder, self.path, key=key if key is not None else keys)
        self.dtype = _dtype(dtype)
        self.net = frozen(holder.inner if attr else holder, device, self.dtype)
        self.channels = int(cfg.in_channels)
        if cfg.out_channels not in (self.channels, 2 * self.channels):
            raise ValueError(f"out_channels={cfg.out_channels} is neither C={self.channels} nor 2C")
        self.resolution = int(cfg.image_size)
        self.shape = (self.channels, self.resolution, self.resolution)
        self.name = self.weights_name or self.path.stem
        self.sigma_data = float(sigma_data)
        self.vp = VPContinuous(beta_min, beta_d, M)
        self.nparams = sum(p.numel() for p in self.net.parameters())
        self.eval()

    def train(self, mode: bool = True):
        """A prior is inference-only: it stays in eval mode."""
        return super().train(False)

    def coefficients(self, sigma: torch.Tensor) -> tuple:
        """``(c_skip, c_out, c_in, c_noise)`` at ``(B,)`` float64 ``sigma`` (float64)."""
        s = sigma.to(torch.float64)
        if self.precond == "edm":
            sd = self.sigma_data
            r = torch.sqrt(s * s + sd * sd)
            return sd * sd / (s * s + sd * sd), s * sd / r, 1.0 / r, torch.log(s) / 4
        return torch.ones_like(s), -s, 1.0 / torch.sqrt(s * s + 1), self.vp.network_time(s, None)

    def network(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        """The raw network ``F`` at input ``x`` and time ``c_noise`` (first C channels), in ``x``'s dtype."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{self.name} expects samples of shape (B, {', '.join(map(str, self.shape))}), "
                             f"got {tuple(x.shape)}")
        dev = self.net.time_embed[0].weight.device
        out = self.net(x.to(device=dev, dtype=self.dtype), c_noise.to(dev))
        return out[:, : self.channels].to(device=x.device, dtype=x.dtype)

    def _denoise(self, x_e: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        f = self.network(bcast(c_in, x_e) * x_e, c_noise)
        return bcast(c_skip, x_e) * x_e + bcast(c_out, x_e) * f

    def extra_repr(self) -> str:
        return (f"weights={self.name!r}, arch={self.arch!r}, precond={self.precond!r}, layout={self.layout!r}, "
                f"resolution={self.resolution}, params={self.nparams}")
