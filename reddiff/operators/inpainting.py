"""Pixel-wise linear operators: inpainting (box, random, free-form), colorization and denoising.

Inpainting.  ``H = diag(mask)`` with ``mask`` 1 on observed and 0 on missing pixels, shared by the channels.
``y`` has the image shape with 0 on missing pixels; measurement noise is added on observed pixels only
(``measure`` is overridden).  ``forward = adjoint = pinv = mask * .``.  SVD: ``V = U = identity`` on the
flattened (C, H, W) vector and ``singulars() = mask`` flattened, so singular values are 1 or 0 and **not sorted**;
they are ``(k,)`` for the box (same mask for every image) and ``(B, k)`` for the per-image masks.

Per-image masks are drawn from a generator seeded by ``(task salt, seed, image index)``
(:func:`reddiff.operators._common.image_seed`): bit-identical for an index whatever the batch, independent of
the measurement noise stream.  Masks are generated in numpy at the image size, so they are the same on
CPU and CUDA and in every dtype.

Free-form masks (``inpaint_freeform``).  The official RED-diff ``in2_20ff`` masks were never published; this
module draws its own Palette / DeepFill-v2-style brush strokes.  All lengths scale with the image side ``n``
(numbers in brackets are at 256 px):

1. a target hole coverage ``c*`` is drawn uniformly in [0.20, 0.28];
2. strokes are added until the fraction of missing pixels reaches ``c*``.  A stroke starts at a uniform random
   point with a uniform random heading, a brush width uniform in [0.03 n, 0.08 n] ([8, 20] px) and 4 to 12
   vertices; each segment turns the heading by up to +-72 degrees (uniform), has a length uniform in
   [0.04 n, 0.16 n] ([10, 40] px) and is clipped to the image;
3. each segment is painted as a capsule (all pixel centres within width/2 of the segment), i.e. a round brush;
4. a segment that would push the coverage above 0.30 is redrawn with half the width (down to one pixel), so
   the coverage always lies in [0.20, 0.30] (tested for 100 consecutive indices).

Colorization: ``y = mean over channels`` (B, 1, H, W); per pixel the row (1/3, 1/3, 1/3) has the single singular
value 1/sqrt(3); ``Vt`` applies the orthonormal Helmert basis per pixel (first the luminance direction
(1,1,1)/sqrt(3), then (1,-1,0)/sqrt(2) and (1,1,-2)/sqrt(6)); the first H*W entries pair with the singular values.
``weights`` (compat): another row w, e.g. the official DDRM/RED-diff ``[0.3333, 0.3334, 0.3333]``
(DDRM ``functions/svd_replacement.py:233``, RED-diff ``utils/degredations.py:390``, code): singular ``|w|``, first
basis row ``w/|w|`` completed by QR, pinv ``y w/|w|^2``.
Denoising: ``H = identity`` (default ``sigma_y = 0.1``, i.e. noise std 0.2 in model units).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from reddiff.operators._common import ImageOpMixin, numpy_rng
from reddiff.operators.base import SVDOperator


# ------------------------------------------------------------------------------------------- mask makers
def box_mask(n: int, frac: float = 0.5) -> np.ndarray:
    """Observed-pixel mask (n x n, 1 = observed) with a centred square hole of side ``round(frac * n)``."""
    s = int(round(frac * n))
    a = (n - s) // 2
    m = np.ones((n, n), dtype=np.float64)
    m[a:a + s, a:a + s] = 0.0
    return m


def random_mask(n: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Observed-pixel mask with exactly ``int(ratio * n * n)`` missing pixels at random positions."""
    m = np.ones(n * n, dtype=np.float64)
    m[rng.permutation(n * n)[: int(ratio * n * n)]] = 0.0
    return m.reshape(n, n)


def _paint_capsule(holes: np.ndarray, p0: np.ndarray, p1: np.ndarray, radius: float) -> np.ndarray:
    """Boolean image of the pixels (centres at i + 0.5) within ``radius`` of segment p0-p1 (not yet painted)."""
    n = holes.shape[0]
    lo = np.floor(np.minimum(p0, p1) - radius).astype(int).clip(0, n)
    hi = np.ceil(np.maximum(p0, p1) + radius).astype(int).clip(0, n)
    yy, xx = np.meshgrid(np.arange(lo[0], hi[0]) + 0.5, np.arange(lo[1], hi[1]) + 0.5, indexing="ij")
    d = p1 - p0
    L2 = float(d @ d)
    if L2 > 0:
        t = (((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / L2).clip(0.0, 1.0)
    else:
        t = np.zeros_like(yy)
    dist2 = (yy - p0[0] - t * d[0]) ** 2 + (xx - p0[1] - t * d[1]) ** 2
    new = np.zeros_like(holes)
    new[lo[0]:hi[0], lo[1]:hi[1]] = dist2 <= radius * radius
    return new & ~holes


def freeform_mask(n: int, rng: np.random.Generator, min_cov: float = 0.20, max_cov: float = 0.30,
                  target_hi: float = 0.28) -> np.ndarray:
    """Observed-pixel mask with brush-stroke holes covering a fraction in [min_cov, max_cov] (module docstring)."""
    holes = np.zeros((n, n), dtype=bool)
    total = n * n
    target = rng.uniform(min_cov, target_hi)
    limit = int(math.floor(max_cov * total))
    count = 0
    attempts = 0
    while count < target * total:
        start = rng.uniform(0, n, size=2)
        heading = rng.uniform(0, 2 * np.pi)
        width = rng.uniform(0.03 * n, 0.08 * n)
        for _ in range(int(rng.integers(4, 13))):
            heading += rng.uniform(-0.4 * np.pi, 0.4 * np.pi)
            length = rng.uniform(0.04 * n, 0.16 * n)
            end = (start + length * np.array([np.sin(heading), np.cos(heading)])).clip(0, n)
            w = max(width, 1.0)
            while True:
                attempts += 1
                if attempts > 100000:  # pragma: no cover - cannot happen for n >= 8
                    raise RuntimeError(f"free-form mask generation did not converge at n={n}")
                new = _paint_capsule(holes, start, end, w / 2)
                k = int(new.sum())
                if count + k <= limit:
                    break
                if w <= 1.0:
                    new, k = None, 0
                    break
                w = max(w / 2, 1.0)
            if new is not None:
                holes |= new
                count += k
            start = end
            if count >= target * total:
                break
    return (~holes).astype(np.float64)


# ------------------------------------------------------------------------------------------- operators
class _PixelSVD(ImageOpMixin, SVDOperator):
    """Operators whose SVD bases are the identity on the flattened (C, H, W) vector."""

    def __init__(self, sigma_y: float = 0.0):
        super().__init__(sigma_y=sigma_y)
        self._master = None

    def y_numel(self) -> int:
        return math.prod(self.y_shape)

    @property
    def y_shape(self) -> tuple:
        self._require_setup()
        return self.x_shape

    def V(self, z):
        self._require_setup()
        return z.reshape(z.shape[0], *self.x_shape)

    def Vt(self, x):
        self._require_setup()
        return x.reshape(x.shape[0], -1)

    def U(self, z):
        self._require_setup()
        return z.reshape(z.shape[0], *self.y_shape)

    def Ut(self, y):
        self._require_setup()
        return y.reshape(y.shape[0], -1)

    def visualize(self, y):
        self._check_y(y, self.y_shape)
        return y


class Denoising(_PixelSVD):
    """``denoise``: H = identity; y = x + 2*sigma_y*eps."""

    name = "denoise"

    def setup(self, indices, x_shape, device=None, dtype=None):
        self._bind(indices, x_shape, device, dtype)
        self._master["s"] = torch.ones(self._numel(), dtype=torch.float64)
        return self

    def singulars(self):
        self._require_setup()
        return self._t("s", torch.empty(0, dtype=self.dtype, device=self.device))

    def forward(self, x):
        self._check_x(x)
        return x.clone()

    def adjoint(self, y):
        self._check_y(y, self.y_shape)
        return y.clone()

    def pinv(self, y):
        self._check_y(y, self.y_shape)
        return y.clone()


class Inpainting(_PixelSVD):
    """Base of the inpainting operators: H = diag(mask), mask (B or 1, 1, H, W), 1 = observed."""

    name = "inpaint"

    def __init__(self, sigma_y: float = 0.0, seed: int = 0):
        super().__init__(sigma_y=sigma_y)
        self.seed = int(seed)

    def make_mask(self, n: int, index: int) -> np.ndarray:  # pragma: no cover - abstract
        """(n, n) float mask, 1 = observed, for image ``index``."""
        raise NotImplementedError

    def setup(self, indices, x_shape, device=None, dtype=None):
        B, C, n = self._bind(indices, x_shape, device, dtype)
        if self.per_image:
            masks = np.stack([self.make_mask(n, i) for i in self.indices])
        else:
            masks = self.make_mask(n, 0)[None]
        self._master["mask"] = torch.from_numpy(masks).unsqueeze(1)  # (B or 1, 1, n, n)
        return self

    def mask(self) -> torch.Tensor:
        """Observed-pixel mask, ``(B, 1, H, W)`` (``(1, 1, H, W)`` when shared), operator dtype/device."""
        self._require_setup()
        return self._t("mask", torch.empty(0, dtype=self.dtype, device=self.device))

    def singulars(self):
        m = self.mask().expand(-1, self.x_shape[0], -1, -1)
        return m.reshape(m.shape[0], -1) if self.per_image else m.reshape(-1)

    def _apply(self, t):
        return t * self._t("mask", t)

    def forward(self, x):
        self._check_x(x)
        return self._apply(x)

    def adjoint(self, y):
        self._check_y(y, self.y_shape)
        return self._apply(y)

    def pinv(self, y):
        self._check_y(y, self.y_shape)
        return self._apply(y)

    def degraded_image(self, y):
        """y with -1 in the holes: the official DiffPIR start, its masked [0, 1] image mapped by 2u - 1
        (main_ddpir.py:309-310)."""
        return y - (1 - self.mask().to(y))

    def measure(self, x, rng):
        """``mask * (x + noise_std * eps)``: noise on observed pixels only (y stays 0 where missing)."""
        self._check_x(x)
        if self.noise_std > 0:
            x = x + self.noise_std * rng.randn_like(x)
        return self._apply(x)


class BoxInpainting(Inpainting):
    """``inpaint_box``: centred square hole of side ``frac * n`` (128 x 128 at 256 px)."""

    name = "inpaint_box"
    per_image = False

    def __init__(self, sigma_y: float = 0.0, frac: float = 0.5, seed: int = 0):
        frac = float(frac)
        if not 0.0 < frac < 1.0:
            raise ValueError(f"inpaint_box: frac must be in (0, 1), got {frac}")
        self.frac = frac
        super().__init__(sigma_y=sigma_y, seed=seed)

    def make_mask(self, n, index):
        return box_mask(n, self.frac)


class RandomInpainting(Inpainting):
    """``inpaint_random``: ``int(ratio * n^2)`` missing pixels (all channels) at random positions per image.

    ``ratio`` is the missing fraction: a number, or ``[lo, hi]`` to draw it uniformly per image (the DPS code's
    ``mask_prob_range: (0.3, 0.7)``, our default).
    """

    name = "inpaint_random"
    per_image = True

    def __init__(self, sigma_y: float = 0.0, ratio=(0.3, 0.7), seed: int = 0):
        if isinstance(ratio, (int, float)):
            lo = hi = float(ratio)
        else:
            vals = [float(r) for r in ratio]
            if len(vals) != 2:
                raise ValueError(f"inpaint_random: ratio must be a number or [lo, hi], got {ratio!r}")
            lo, hi = vals
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"inpaint_random: ratio must lie in [0, 1] with lo <= hi, got {ratio!r}")
        self.ratio = (lo, hi)
        super().__init__(sigma_y=sigma_y, seed=seed)

    def make_mask(self, n, index):
        rng = numpy_rng(self.seed, index, "inpaint_random")
        lo, hi = self.ratio
        r = lo if lo == hi else rng.uniform(lo, hi)
        return random_mask(n, r, rng)


class FreeformInpainting(Inpainting):
    """``inpaint_freeform``: Palette-style brush-stroke holes covering 20-30% (see the module docstring)."""

    name = "inpaint_freeform"
    per_image = True
    min_size = 8

    def make_mask(self, n, index):
        return freeform_mask(n, numpy_rng(self.seed, index, "inpaint_freeform"))


class Colorization(ImageOpMixin, SVDOperator):
    """``colorization``: y = mean of the 3 channels, shape (B, 1, H, W) (see the module docstring)."""

    name = "colorization"

    def __init__(self, sigma_y: float = 0.0, weights=None):
        super().__init__(sigma_y=sigma_y)
        self._master = None
        self.weights = None
        if weights is not None:
            w = [float(v) for v in weights]
            if len(w) != 3 or not all(math.isfinite(v) for v in w) or not any(w):
                raise ValueError(f"{self.name}: weights must be 3 finite numbers, not all 0, got {list(weights)}")
            if w != [1.0 / 3.0] * 3:
                self.weights = w

    def setup(self, indices, x_shape, device=None, dtype=None):
        B, C, n = self._bind(indices, x_shape, device, dtype, channels=3)
        if self.weights is None:
            Q = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0], [1.0, 1.0, -2.0]], dtype=torch.float64)
            Q = Q / Q.norm(dim=1, keepdim=True)  # rows: orthonormal basis, first = luminance direction
            s = 1.0 / math.sqrt(3.0)
        else:
            w = torch.tensor(self.weights, dtype=torch.float64)
            s = float(w.norm())
            Q = torch.linalg.qr(torch.cat([(w / s).reshape(3, 1), torch.eye(3, dtype=torch.float64)[:, :2]], 1))[0].T
            Q = Q * torch.sign(Q[:1] @ w).reshape(1, 1)  # first row = +w/|w|
            self._master["w"] = w
        self._master["Qt"] = Q  # Vt per pixel
        self._master["s"] = torch.full((n * n,), s, dtype=torch.float64)
        return self

    @property
    def y_shape(self) -> tuple:
        self._require_setup()
        return (1,) + self.x_shape[1:]

    def y_numel(self) -> int:
        return math.prod(self.y_shape)

    def singulars(self):
        self._require_setup()
        return self._t("s", torch.empty(0, dtype=self.dtype, device=self.device))

    def forward(self, x):
        self._check_x(x)
        if self.weights is not None:
            return torch.einsum("c,bchw->bhw", self._t("w", x), x).unsqueeze(1)
        return x.mean(dim=1, keepdim=True)

    def adjoint(self, y):
        self._check_y(y, self.y_shape)
        if self.weights is not None:
            return y * self._t("w", y).reshape(1, 3, 1, 1)
        return y.expand(-1, 3, -1, -1) / 3.0

    def pinv(self, y):
        self._check_y(y, self.y_shape)
        if self.weights is not None:
            w = self._t("w", y)
            return y * (w / (w * w).sum()).reshape(1, 3, 1, 1)
        return y.expand(-1, 3, -1, -1).clone()

    def Vt(self, x):
        self._require_setup()
        X = x.reshape(x.shape[0], *self.x_shape)
        return torch.einsum("dc,bchw->bdhw", self._t("Qt", X), X).reshape(x.shape[0], -1)

    def V(self, z):
        self._require_setup()
        Z = z.reshape(z.shape[0], *self.x_shape)
        return torch.einsum("dc,bdhw->bchw", self._t("Qt", Z), Z)

    def Ut(self, y):
        self._require_setup()
        return y.reshape(y.shape[0], -1)

    def U(self, z):
        self._require_setup()
        return z.reshape(z.shape[0], *self.y_shape)

    def visualize(self, y):
        """The gray image repeated over 3 channels."""
        self._check_y(y, self.y_shape)
        return y.expand(-1, 3, -1, -1)
