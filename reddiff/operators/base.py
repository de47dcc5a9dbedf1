"""Operator protocol.

Every operator maps an image (or vector) batch ``x`` of shape ``(B, *shape)`` to a measurement batch ``y``.

* ``forward(x)``: the noiseless measurement H(x).
* ``pinv(y)``: the pseudo-inverse H^+(y) for linear operators, the initialisation rule for nonlinear ones.
* ``measure(x, rng)``: ``forward(x)`` plus noise of std ``noise_std`` (model units), per-image seeded.
* ``differentiable``: whether ``forward`` may be differentiated (default True; a black-box measurement sets False).
* ``setup(indices)``: binds per-image state (masks, kernels) to the images of the current batch; operators
  whose state does not depend on the image ignore it.

Linear operators add ``adjoint(y)``.  SVD-decomposable operators (:class:`SVDOperator`) expose the pieces
of ``H = U diag(s) V^T`` on *flattened* vectors, applied implicitly (never a dense matrix for an image):

* ``Vt(x) -> (B, n)`` spectral coefficients of ``x`` (``n`` = numel of one x); the first ``k = len(singulars)``
  entries pair with ``singulars``, the rest span the null space.
* ``V(z) -> x`` the inverse (V is orthonormal).
* ``Ut(y) -> (B, m)`` and ``U(z) -> y`` likewise in measurement space (``m`` = numel of one y).
* ``singulars() -> (k,)`` or ``(B, k)`` when they depend on the image (per-image masks); zeros are allowed.

So ``H x = U(pad_m(s * Vt(x)[:, :k]))``.

Noise convention (docs/DESIGN.md): ``sigma_y`` is in [0, 1] pixel units and images live in [-1, 1], so the noise
std in model space is ``value_range * sigma_y`` with ``value_range = 2`` for images and 1 for vectors.
"""
from __future__ import annotations

from typing import Sequence

import torch


class OperatorCapabilityError(RuntimeError):
    """A sampler needs something (adjoint, SVD) that this operator does not provide."""


class Operator:
    """Base class. Subclasses implement ``forward`` and ``pinv``."""

    linear: bool = False
    #: whether ``forward`` has a useful gradient (autograd through it); ``False`` for black-box measurements such as
    #: quantisation, which samplers that differentiate the data term (``requires`` "grad") refuse up front
    differentiable: bool = True
    name: str = "operator"

    def __init__(self, sigma_y: float = 0.0, value_range: float = 2.0):
        sigma_y = float(sigma_y)
        if not sigma_y >= 0.0:  # also catches NaN
            raise ValueError(f"sigma_y must be >= 0 (pixel units in [0, 1]), got {sigma_y}")
        self.sigma_y = sigma_y
        self.value_range = float(value_range)

    # ----------------------------------------------------------------- protocol
    @property
    def noise_std(self) -> float:
        """Std of the measurement noise in model units."""
        return self.value_range * self.sigma_y

    def setup(self, indices: Sequence[int], x_shape: Sequence[int], device=None, dtype=None) -> "Operator":
        """Bind per-image state for the images ``indices`` whose batch shape is ``x_shape``. Returns self."""
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def pinv(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def measure(self, x: torch.Tensor, rng) -> torch.Tensor:
        """Noisy measurement ``H(x) + noise_std * eps``, with ``eps`` from the per-image ``rng``."""
        y = self.forward(x)
        if self.noise_std > 0:
            y = y + self.noise_std * rng.randn_like(y)
        return y

    def visualize(self, y: torch.Tensor) -> torch.Tensor:
        """An image-shaped view of ``y`` for grids (the pseudo-inverse by default)."""
        return self.pinv(y)

    def degraded_image(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` as the image the official DiffPIR starts from (``main_ddpir.py:295-312``, model units):
        ``visualize(y)`` here (a blurred image is itself); inpainting and the downsamplers override it."""
        return self.visualize(y)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def has(self, capability: str) -> bool:
        """Whether this operator provides ``capability``: 'adjoint', 'svd', 'linear' or 'grad' (a differentiable
        ``forward``)."""
        return {"adjoint": self.linear, "svd": isinstance(self, SVDOperator), "linear": self.linear,
                "grad": bool(self.differentiable)}[capability]

    def require(self, capability: str, sampler: str) -> None:
        """Raise :class:`OperatorCapabilityError` unless this operator has ``capability`` (see :meth:`has`)."""
        if not self.has(capability):
            raise OperatorCapabilityError(
                f"{sampler} needs an operator with {capability}; task operator {type(self).__name__} "
                f"({self.name}) does not provide it"
            )


class LinearOperator(Operator):
    linear = True

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class SVDOperator(LinearOperator):
    """Linear operator with implicit SVD pieces. ``forward``/``adjoint``/``pinv`` default to the SVD."""

    x_shape: tuple  # shape of one x (without batch)

    def V(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def Vt(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def U(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def Ut(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def singulars(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def y_numel(self) -> int:  # pragma: no cover - abstract
        """Number of entries of one measurement (``m``)."""
        raise NotImplementedError

    # helpers shared by all SVD operators ------------------------------------------------
    def x_numel(self) -> int:
        """Number of entries of one x (``n``). Computed from ``x_shape`` so that operators with per-image
        state (whose ``Vt`` only accepts the batch they were set up for) work too."""
        n = 1
        for d in self.x_shape:
            n *= int(d)
        return n

    def _spectral_mul(self, z: torch.Tensor, s: torch.Tensor, out_dim: int) -> torch.Tensor:
        """(B, >=k) spectral vector -> (B, out_dim): multiply the first k entries by s, zero-pad/crop.

        ``s`` is ``(k,)`` or per image ``(B, k)``."""
        k = s.shape[-1]
        out = z.new_zeros(z.shape[0], out_dim)
        out[:, :k] = z[:, :k] * s
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.U(self._spectral_mul(self.Vt(x), self.singulars().to(x), self.y_numel()))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.V(self._spectral_mul(self.Ut(y), self.singulars().to(y), self.x_numel()))

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        s = self.singulars().to(y)
        s_inv = torch.where(s > 0, 1.0 / s.clamp_min(1e-30), torch.zeros_like(s))
        return self.V(self._spectral_mul(self.Ut(y), s_inv, self.x_numel()))


class ThroughDecoder(Operator):
    """The data term of a latent prior, ``z -> A(D(z))``: a sampler working on latents ``z`` sees this operator
    while the harness measures and scores the pixels ``D(z)`` with ``A`` itself.  ``pinv(y) = E(A^+ y)`` (the
    initialisation of the pixel operator, encoded).  Nonlinear (``D`` is): samplers that need an adjoint or an SVD
    are refused on it by :meth:`Operator.require`; its gradient is the decoder's chain rule."""

    def __init__(self, operator: Operator, decode, encode):
        super().__init__(operator.sigma_y, operator.value_range)
        self.pixel, self.decode, self.encode = operator, decode, encode
        self.name = f"{operator.name} through the decoder"
        self.differentiable = operator.differentiable      # a black-box pixel operator stays one through D

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.pixel.forward(self.decode(z))

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return self.encode(self.pixel.pinv(y))

    def visualize(self, y: torch.Tensor) -> torch.Tensor:
        return self.pixel.visualize(y)
