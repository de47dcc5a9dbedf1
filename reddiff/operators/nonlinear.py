"""Nonlinear operators with ``forward`` and an initialisation rule ``pinv``: phase retrieval and HDR.

``phase_retrieval`` (official RED-diff ``PhaseRetrievalOperator``):
``y = |fftshift(fft2(ifftshift(pad(x)), norm='ortho'))|`` per channel, with zero padding of
``int(oversample / 8 * n)`` pixels on each side (64 px at 256 px for ``oversample = 2``, as the official code,
which hard-codes 256).  y: ``(B, C, n + 2p, n + 2p)``.  ``pinv(y) = |ifftshift-centred ifft2(y)|`` cropped back to
n x n, as the official ``H_pinv``.  The FFTs run in complex128 for float64 inputs.

``hdr``: ``y = clip(2 x, -1, 1)``, ``pinv(y) = y / 2`` (official ``HDR``: ``clip(x / 0.5)``, ``x * 0.5``).

``quantize``: a black-box measurement, ``y`` = ``x`` clipped to [-1, 1] and rounded to ``levels`` equally spaced
values (``levels = 2^bits``); its gradient is zero almost everywhere, so it is marked ``differentiable = False``
and only derivative-free samplers (EnKG) run on it.  ``pinv(y) = y`` (the quantised image is the nearest
image-shaped estimate; our choice).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from reddiff.operators._common import ImageOpMixin
from reddiff.operators.base import Operator


def _centered_fft2(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


def _centered_ifft2(y: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(y, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))


class PhaseRetrieval(ImageOpMixin, Operator):
    """``phase_retrieval``: Fourier magnitude of the zero-padded image (module docstring)."""

    name = "phase_retrieval"
    min_size = 4

    def __init__(self, sigma_y: float = 0.0, oversample: float = 2.0):
        super().__init__(sigma_y=sigma_y)
        oversample = float(oversample)
        if not oversample >= 0:
            raise ValueError(f"phase_retrieval: oversample must be >= 0, got {oversample}")
        self.oversample = oversample
        self._master = None

    def setup(self, indices, x_shape, device=None, dtype=None):
        B, C, n = self._bind(indices, x_shape, device, dtype)
        self.pad = int(self.oversample / 8.0 * n)
        return self

    @property
    def y_shape(self) -> tuple:
        self._require_setup()
        C, n, _ = self.x_shape
        return (C, n + 2 * self.pad, n + 2 * self.pad)

    def forward(self, x):
        self._check_x(x)
        p = self.pad
        return _centered_fft2(F.pad(x, (p, p, p, p))).abs()

    def pinv(self, y):
        self._check_y(y, self.y_shape)
        p, n = self.pad, self.x_shape[1]
        z = _centered_ifft2(y.to(torch.complex128 if y.dtype == torch.float64 else torch.complex64)).abs()
        return z[..., p:p + n, p:p + n]


class _Pointwise(ImageOpMixin, Operator):
    """A pixelwise operator: ``y`` has the image's shape, nothing is bound per image but the batch shape."""

    def __init__(self, sigma_y: float = 0.0):
        super().__init__(sigma_y=sigma_y)
        self._master = None

    def setup(self, indices, x_shape, device=None, dtype=None):
        self._bind(indices, x_shape, device, dtype)
        return self

    @property
    def y_shape(self) -> tuple:
        self._require_setup()
        return self.x_shape


class HDR(_Pointwise):
    """``hdr``: ``clip(2x, -1, 1)``; pinv ``y / 2``. y: image shape."""

    name = "hdr"

    def __init__(self, sigma_y: float = 0.0, scale: float = 2.0):
        super().__init__(sigma_y=sigma_y)
        scale = float(scale)
        if not scale > 0:
            raise ValueError(f"hdr: scale must be > 0, got {scale}")
        self.scale = scale

    def forward(self, x):
        self._check_x(x)
        return torch.clamp(self.scale * x, -1.0, 1.0)

    def pinv(self, y):
        self._check_y(y, self.y_shape)
        return y / self.scale

    def visualize(self, y):
        """The clipped image itself."""
        self._check_y(y, self.y_shape)
        return y


class Quantize(_Pointwise):
    """``quantize``: ``round((clip(x) + 1) / 2 * (levels - 1)) / (levels - 1) * 2 - 1``; pinv the identity.
    Not differentiable (``differentiable = False``)."""

    name = "quantize"
    differentiable = False

    def __init__(self, sigma_y: float = 0.0, levels: int = 8):
        super().__init__(sigma_y=sigma_y)
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise ValueError(f"quantize: levels must be an integer >= 2, got {levels!r}")
        self.levels = levels

    def forward(self, x):
        self._check_x(x)
        q = self.levels - 1
        return torch.round((x.clamp(-1.0, 1.0) + 1.0) * (q / 2.0)) * (2.0 / q) - 1.0

    def pinv(self, y):
        self._check_y(y, self.y_shape)
        return y.clone()
