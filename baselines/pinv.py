"""The pseudo-inverse baseline: ``H^+(y)`` (0 network evaluations).

For nonlinear operators ``pinv`` is their initialisation rule (e.g. ``y / 2`` for HDR).  With ``bicubic=True`` the
measurement is instead upsampled bicubically, the usual super-resolution reference; this needs an operator that
exposes its integer downsampling ``factor`` (attribute ``factor``) and image samples ``(B, C, H, W)``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from reddiff.operators.base import OperatorCapabilityError
from reddiff.samplers.base import Sampler


class Pinv(Sampler):
    """``H^+(y)``, or bicubic upsampling of ``y`` for super-resolution operators.

    Args:
        bicubic: upsample ``y`` bicubically by ``operator.factor`` instead of applying ``pinv``; the result is
            clamped to [-1, 1] (images).
    """

    name = "pinv"
    requires: tuple = ()

    def __init__(self, bicubic: bool = False):
        self.bicubic = bool(bicubic)

    def check(self, operator) -> None:
        if self.bicubic:
            f = getattr(operator, "factor", None)
            if not isinstance(f, int) or isinstance(f, bool) or f < 1:
                raise OperatorCapabilityError(
                    f"pinv(bicubic=True) needs a downsampling operator with an integer `factor`; task operator "
                    f"{type(operator).__name__} ({getattr(operator, 'name', '?')}) has none")

    @torch.no_grad()
    def sample(self, y: torch.Tensor, operator, prior, rng, callback: Optional[Callable] = None) -> torch.Tensor:
        self.check(operator)
        if not self.bicubic:
            return operator.pinv(y)
        f = operator.factor
        shape = tuple(prior.shape)
        if len(shape) != 3:
            raise OperatorCapabilityError(f"pinv(bicubic=True) needs image samples (C, H, W), prior has shape {shape}")
        C, H, W = shape
        if H % f or W % f:
            raise ValueError(f"pinv(bicubic=True): image size {H}x{W} is not divisible by factor {f}")
        y_img = y.reshape(y.shape[0], C, H // f, W // f)
        x = F.interpolate(y_img, scale_factor=f, mode="bicubic", align_corners=False)
        return x.clamp(-1.0, 1.0)
