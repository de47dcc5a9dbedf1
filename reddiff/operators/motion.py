"""``deblur_motion``: per-image random motion blur (61 x 61 kernels, intensity 0.5), applied as a circulant.

Kernel generator (our own code; the idea of a random camera-shake trajectory as in Boracchi & Foi 2012 and the
``motionblur`` package, not their algorithm).  For image ``index`` a numpy generator seeded by
``(salt, seed, index)`` draws:

1. a trajectory of 512 unit steps of a point with heading ``theta``: each step turns the heading by
   ``N(0, (intensity * 0.35)^2)`` radians, and with probability ``0.04 * intensity`` makes an extra sharp turn
   uniform in ``+-intensity * pi`` (camera jerks).  ``intensity = 0`` gives a straight line; larger values give
   curlier, more erratic paths;
2. the trajectory is centred on its bounding-box centre and scaled so that its longer bounding-box side is
   ``L = u * (size - 1) * (0.5 + 0.5 * intensity)`` pixels with ``u ~ U(0.35, 1)`` (at most ``size - 1``);
3. the 512 positions (constant speed: equal exposure per step) are splatted bilinearly onto a ``size x size``
   grid whose centre pixel is the trajectory centre; the kernel is normalised to sum 1.

Kernels are computed in float64 numpy, hence bit-identical across constructions, devices and batch layouts.

Boundary and SVD.  The blur is a *circular* convolution (the kernel, taken as a point-spread function centred on
its middle pixel, is wrapped onto the n x n torus, so it also works for images smaller than the kernel) and is
applied with FFTs: ``H = F^H diag(lam) F``.  A circulant is SVD-decomposable through the Fourier basis, and the
SVD is exposed with **real** orthonormal transforms:

* ``Vt(x)`` is the real orthonormal Fourier transform ``R``: with ``X = fft2(x, norm='ortho')``, the coefficient at
  frequency ``k`` is ``Re X_k`` if ``k == -k`` (mod n), ``sqrt(2) Re X_k`` if ``k`` precedes ``-k`` in row-major
  order, and ``-sqrt(2) Im X_k = sqrt(2) Im X_{-k}`` otherwise; the layout is the (C, n, n) frequency grid;
* ``singulars()`` = ``|lam_k|`` on the same grid, per image: ``(B, C*n*n)``, not sorted;
* ``U = Phi R^T`` with ``Phi`` the real all-pass circulant of phase ``lam / |lam|`` (1 where lam = 0), so
  ``H = U diag(|lam|) V^T`` exactly, with U and V real orthonormal.  ``y_numel = C*n*n``.

Truncation (regularisation).  Frequencies with ``|lam| < svd_cutoff`` (default 3e-2, DDRM's cutoff value; the
kernel sums to 1 so ``|lam| <= 1``) are removed from the operator, and always those below ``n * eps64``.  For
these kernels 3e-2 removes ~27% of the frequencies (DDRM's uniform 9-tap blur: 21%) and changes y of natural
64 px images by < 1% (bound: ``||H' x - H x|| <= svd_cutoff * ||x||``); with 1e-3 almost nothing is removed and
the noiseless task becomes an exactly invertible one (pinv PSNR 60-300 dB).  The operator
**is** this truncated circulant, so forward, adjoint, pinv and SVD agree exactly and ``pinv`` (``1/lam`` on the kept
frequencies) is both the Moore-Penrose pseudo-inverse of H and a truncated-SVD regularised inverse of the raw
blur.  ``svd_cutoff = 0`` gives the plain circular blur.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from reddiff.operators._common import _EPS64, ImageOpMixin, numpy_rng
from reddiff.operators.base import SVDOperator


def motion_kernel(size: int, intensity: float, rng: np.random.Generator, steps: int = 512) -> np.ndarray:
    """A ``size x size`` motion-blur kernel (float64, >= 0, sums to 1); see the module docstring."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"motion kernel size must be odd and positive, got {size}")
    if not 0.0 <= intensity <= 1.0:
        raise ValueError(f"motion blur intensity must be in [0, 1], got {intensity}")
    turns = rng.normal(0.0, intensity * 0.35, size=steps)
    jerks = (rng.uniform(size=steps) < 0.04 * intensity) * rng.uniform(-np.pi, np.pi, size=steps) * intensity
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(turns + jerks)
    pos = np.cumsum(np.stack([np.sin(heading), np.cos(heading)], axis=1), axis=0)
    lo, hi = pos.min(axis=0), pos.max(axis=0)
    pos = pos - (lo + hi) / 2
    extent = float((hi - lo).max())
    length = min(rng.uniform(0.35, 1.0) * (size - 1) * (0.5 + 0.5 * intensity), size - 1)
    if extent > 0:
        pos = pos * (length / extent)
    pos = pos + size // 2  # kernel centre pixel
    k = np.zeros((size, size), dtype=np.float64)
    i0 = np.floor(pos).astype(int)
    f = pos - i0
    for di in (0, 1):
        for dj in (0, 1):
            w = (f[:, 0] if di else 1 - f[:, 0]) * (f[:, 1] if dj else 1 - f[:, 1])
            ii, jj = (i0[:, 0] + di).clip(0, size - 1), (i0[:, 1] + dj).clip(0, size - 1)
            np.add.at(k, (ii, jj), w)
    return k / k.sum()


def _torus(kernel: np.ndarray, n: int) -> np.ndarray:
    """Wrap a centred (odd-size) kernel onto the n x n torus: tap (a, b) lands at ((a-r) mod n, (b-r) mod n)."""
    s = kernel.shape[0]
    r = s // 2
    idx = (np.arange(s) - r) % n
    out = np.zeros((n, n), dtype=np.float64)
    np.add.at(out, (idx[:, None], idx[None, :]), kernel)
    return out


def _pair_classes(n: int) -> torch.Tensor:
    """(n, n) long: 0 where k == -k (mod n), 1 where k precedes -k in row-major order, 2 otherwise."""
    k1, k2 = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    flat = k1 * n + k2
    partner = ((-k1) % n) * n + ((-k2) % n)
    cls = np.where(flat == partner, 0, np.where(flat < partner, 1, 2))
    return torch.from_numpy(cls)


def _partner(z: torch.Tensor) -> torch.Tensor:
    """z at the conjugate frequency -k (mod n), over the last two dims."""
    return torch.roll(torch.flip(z, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))


class MotionBlur(ImageOpMixin, SVDOperator):
    """``deblur_motion``: per-image circulant motion blur with a real SVD (module docstring). y: image shape."""

    name = "deblur_motion"
    per_image = True

    def __init__(self, sigma_y: float = 0.0, size: int = 61, intensity: float = 0.5, seed: int = 0,
                 svd_cutoff: float = 3e-2):
        super().__init__(sigma_y=sigma_y)
        size = int(size)
        if size < 1 or size % 2 == 0:
            raise ValueError(f"deblur_motion: kernel size must be odd and positive, got {size}")
        intensity = float(intensity)
        if not 0.0 <= intensity <= 1.0:
            raise ValueError(f"deblur_motion: intensity must be in [0, 1], got {intensity}")
        svd_cutoff = float(svd_cutoff)
        if not svd_cutoff >= 0:
            raise ValueError(f"deblur_motion: svd_cutoff must be >= 0, got {svd_cutoff}")
        self.size, self.intensity, self.seed, self.svd_cutoff = size, intensity, int(seed), svd_cutoff
        self._master = None

    def kernel(self, index: int) -> np.ndarray:
        """The ``size x size`` kernel of image ``index``."""
        return motion_kernel(self.size, self.intensity, numpy_rng(self.seed, index, "deblur_motion"))

    def setup(self, indices, x_shape, device=None, dtype=None):
        B, C, n = self._bind(indices, x_shape, device, dtype)
        kernels = np.stack([self.kernel(i) for i in self.indices])
        lam = torch.fft.fft2(torch.from_numpy(np.stack([_torus(k, n) for k in kernels])))  # (B, n, n) complex128
        mag = lam.abs()
        keep = mag >= max(self.svd_cutoff, n * _EPS64)
        lam = torch.where(keep, lam, torch.zeros_like(lam))
        mag = lam.abs()
        phase = torch.where(keep, lam / mag.clamp_min(1e-300), torch.ones_like(lam))
        inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
        self._master.update(kernels=torch.from_numpy(kernels), lam=lam[:, None], inv=inv[:, None],
                            phase=phase[:, None], s=mag[:, None], cls=_pair_classes(n))
        return self

    def kernels(self) -> torch.Tensor:
        """(B, size, size) float64 kernels of the bound images."""
        self._require_setup()
        return self._master["kernels"]

    @property
    def y_shape(self) -> tuple:
        self._require_setup()
        return self.x_shape

    def y_numel(self) -> int:
        return math.prod(self.y_shape)

    # direct ---------------------------------------------------------------------------------------------
    def _filter(self, t: torch.Tensor, key: str, conj: bool = False) -> torch.Tensor:
        resp = self._t(key, t)
        if conj:
            resp = resp.conj()
        return torch.fft.ifft2(torch.fft.fft2(t) * resp).real

    def forward(self, x):
        self._check_x(x)
        return self._filter(x, "lam")

    def adjoint(self, y):
        self._check_y(y, self.y_shape)
        return self._filter(y, "lam", conj=True)

    def pinv(self, y):
        self._check_y(y, self.y_shape)
        return self._filter(y, "inv")

    # SVD --------------------------------------------------------------------------------------------------
    def singulars(self):
        self._require_setup()
        s = self._t("s", torch.empty(0, dtype=self.dtype, device=self.device))
        return s.expand(-1, self.x_shape[0], -1, -1).reshape(self.batch, -1)

    def _realify(self, X: torch.Tensor) -> torch.Tensor:
        cls = self._t("cls", X.real)
        r2 = math.sqrt(2.0)
        return torch.where(cls == 0, X.real, torch.where(cls == 1, r2 * X.real, -r2 * X.imag))

    def _complexify(self, z: torch.Tensor) -> torch.Tensor:
        cls = self._t("cls", z)
        zp = _partner(z)
        r2 = math.sqrt(2.0)
        return torch.where(cls == 0, torch.complex(z, torch.zeros_like(z)),
                           torch.where(cls == 1, torch.complex(z, zp) / r2, torch.complex(zp, -z) / r2))

    def Vt(self, x):
        self._require_setup()
        X = x.reshape(x.shape[0], *self.x_shape)
        return self._realify(torch.fft.fft2(X, norm="ortho")).reshape(x.shape[0], -1)

    def V(self, z):
        self._require_setup()
        Z = z.reshape(z.shape[0], *self.x_shape)
        return torch.fft.ifft2(self._complexify(Z), norm="ortho").real

    def Ut(self, y):
        self._require_setup()
        Y = y.reshape(y.shape[0], *self.y_shape)
        self._check_batch(Y)
        return self._realify(torch.fft.fft2(Y, norm="ortho") * self._t("phase", Y).conj()).reshape(y.shape[0], -1)

    def U(self, z):
        self._require_setup()
        Z = z.reshape(z.shape[0], *self.y_shape)
        self._check_batch(Z)
        return torch.fft.ifft2(self._complexify(Z) * self._t("phase", Z), norm="ortho").real

    def visualize(self, y):
        """The blurred image itself."""
        self._check_y(y, self.y_shape)
        return y
