"""Priors (epsilon-predictors on the VP schedule): see :mod:`reddiff.priors.base` for the protocol.

* :class:`reddiff.priors.unet.UNetPrior`: the ADM UNet, loading the published checkpoints
  (ImageNet-256 uncond/cond, DPS FFHQ-256) or the embedded 64x64 prior, strictly and safely;
* :mod:`reddiff.priors.adm`: the UNet itself and the published configurations;
* :class:`reddiff.priors.edm.EDMPrior`: EDM-format checkpoints (EDM / VP preconditioning around our ADM UNet, e.g.
  InverseBench's FFHQ-256); :class:`reddiff.priors.flow.FlowPrior`: PnP-Flow's OT flow-matching checkpoints on
  :mod:`reddiff.priors.ddpmnet` (their DDPM-style UNet); both native denoisers ``D(x_e, sigma)``.

``UNetPrior`` is imported lazily so that ``import reddiff.priors`` stays cheap.  Training and evaluation of the
embedded prior live in :mod:`reddiff.priors.training`; opt-in fast paths in :mod:`reddiff.priors.perf`.

May import: reddiff.core
"""
from reddiff.priors.base import Prior

__all__ = ["Prior", "UNetPrior"]


def __getattr__(name):
    if name == "UNetPrior":
        from reddiff.priors.unet import UNetPrior

        return UNetPrior
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
