"""Separable linear operators: ``H x = A x A^T`` on every channel, for a per-axis matrix ``A`` (m x n).

Tasks: ``sr4`` (x4 block average), ``sr4_bicubic`` (bicubic antialiased x4 downsampling), ``deblur_gauss``,
``deblur_gauss_dps`` and ``deblur_uniform`` (separable blurs).

SVD.  With the per-axis SVD ``A = Ua diag(sa) Va^T`` (Ua m x m, Va n x n), ``H = A (x) A`` has the exact SVD
``(Ua (x) Ua) diag(sa (x) sa) (Va (x) Va)^T`` (Kronecker structure, as DDRM).  It is applied implicitly with
two small matrix products per side; no matrix of image size is ever formed.

Layout of the spectral vectors (per image, flattened, channels outermost):

* ``Vt(x)``: ``Z = Va^T X Va`` for each channel (n x n).  The first ``k = C*m*m`` entries are the top-left m x m
  blocks ``Z[c, :m, :m]`` in (c, i, j) order; they pair with ``singulars()[c*m*m + i*m + j] = sa[i] * sa[j]``.
  Then come the null-space coefficients ``Z[c, :m, m:]`` (all c, row-major), then ``Z[c, m:, :]``.
  For square A (blurs) this is just ``Z`` flattened in (c, i, j) order.
* ``Ut(y)``: ``Ua^T Y Ua`` flattened in (c, i, j) order (m x m per channel); ``U``, its inverse, returns images.
* singular values are **not sorted**; zeros may appear anywhere among the first k.

Truncation.  Per-axis singular values below ``svd_cutoff`` (absolute; the kernels sum to 1) are set to 0, as the
official DDRM/RED-diff ``Deblurring``/``SRConv`` classes do with ``ZERO = 3e-2``, and below the numerical rank
tolerance ``max(m, n) * eps64 * max(sa)`` in any case.  The operator **is** the truncated matrix
``A' = Ua diag(sa') Va[:, :m]^T``: ``forward``, ``adjoint`` and ``pinv`` (direct matrix products with ``A'`` and
``A'^+``) agree with the SVD exactly, and ``pinv`` is the Moore-Penrose pseudo-inverse of ``H``.  With
``svd_cutoff = 0`` the operator is the plain blur / downsampler (to ~1e-13).

Boundaries (per axis, so the 2-D operator stays exactly separable):
``zero`` (pixels outside are 0), ``reflect`` (mirror without repeating the edge, as ``torch.nn.ReflectionPad2d``),
``symmetric`` (mirror repeating the edge: index -1 -> 0, as the official ``SRConv``), ``circular``.

Official quirk (``window='ddrm'``).  The official DDRM/RED-diff ``Deblurring`` class fills row i of the 1-D matrix
for ``j in range(i - k//2, i + k//2)``, which for an odd kernel length k drops the **last** tap: the effective
1-D kernel has k-1 taps, sums to (k-1)/k of the nominal one and is shifted by half a pixel.  ``deblur_gauss``
(5 taps, sigma 25: nearly a 5-box) and ``deblur_uniform`` (9 taps of 1/9) reproduce that matrix by default so
numbers are comparable with the papers; ``window: full`` gives the centred kernel.

Official quirks as compat switches (``docs/DIFFERENCES.md``; ``compat=official`` turns them on):
``spectrum='ddrm_tiled'`` (blurs) is the operator the official ``Deblurring`` class computes for colour images
(DDRM ``functions/svd_replacement.py:460-461``, RED-diff ``utils/degredations.py:500-501``, code): it sorts the
n^2 products ``sa[i] sa[j]`` descending (rank r), lays Vt out as ``C r + c`` and tiles the sorted list
(``repeat(1, 3)``), so component (i, j) of channel c is scaled by ``s_sorted[(C r + c) mod n^2]`` instead of
``sa[i] sa[j]``: ``H = U diag(s tiled) V^T`` with the exact U, V, a different non-separable map per channel
(exact ties ordered as the official unstable sort).  ``pinv_mode='reddiff'``: the RED-diff ``H_pinv``
(``utils/degredations.py:69-80``) keeps ``U^T y`` on the zero-singular-value components instead of dropping them.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from reddiff.operators._common import _EPS64, ImageOpMixin
from reddiff.operators.base import SVDOperator

BOUNDARIES = ("zero", "reflect", "symmetric", "circular")
PINV_MODES = ("moore_penrose", "reddiff")
SPECTRA = ("exact", "ddrm_tiled")


def _map_index(j: int, n: int, boundary: str) -> int | None:
    """Index of the pixel that position ``j`` reads under ``boundary`` (None: outside, contributes 0)."""
    if 0 <= j < n:
        return j
    if boundary == "zero":
        return None
    if boundary == "circular":
        return j % n
    if boundary == "reflect":
        if n == 1:
            return 0
        p = 2 * (n - 1)
        j = j % p
        return j if j < n else p - j
    if boundary == "symmetric":
        p = 2 * n
        j = j % p
        return j if j < n else p - 1 - j
    raise ValueError(f"unknown boundary {boundary!r}; valid: {', '.join(BOUNDARIES)}")


def conv_matrix(kernel: np.ndarray, n: int, boundary: str = "zero", offsets: np.ndarray | None = None,
                stride: int = 1, first: int = 0) -> np.ndarray:
    """Per-axis matrix (m x n) of the correlation ``y[r] = sum_t kernel[t] * x[map(first + r*stride + offsets[t])]``.

    ``offsets`` default to the centred ``t - len(kernel)//2``.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    if offsets is None:
        offsets = np.arange(len(kernel)) - len(kernel) // 2
    m = len(range(first, n, stride))
    A = np.zeros((m, n), dtype=np.float64)
    for r in range(m):
        i = first + r * stride
        for w, o in zip(kernel, offsets):
            j = _map_index(int(i + o), n, boundary)
            if j is not None:
                A[r, j] += w
    return A


def gaussian_taps(size: int, sigma: float, truncate: float | None = None) -> np.ndarray:
    """Sampled, normalised Gaussian of ``size`` taps (odd), optionally zero beyond ``int(truncate*sigma+0.5)``
    (scipy.ndimage's radius rule, which the DPS kernels inherit)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"Gaussian kernel size must be odd and positive, got {size}")
    if not sigma > 0:
        raise ValueError(f"Gaussian sigma must be > 0, got {sigma}")
    t = np.arange(size, dtype=np.float64) - size // 2
    k = np.exp(-0.5 * (t / sigma) ** 2)
    if truncate is not None:
        k[np.abs(t) > int(truncate * sigma + 0.5)] = 0.0
    return k / k.sum()


def bicubic_taps(factor: int, a: float = -0.5) -> np.ndarray:
    """The 4*factor taps of the antialiased bicubic downsampling filter (Keys cubic with parameter ``a``),
    sampled at ``(t - 2*factor + 0.5) / factor`` and normalised, as the official SRConv builds it."""
    def cubic(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        if x < 2:
            return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
        return 0.0
    k = np.array([cubic((t - 2 * factor + 0.5) / factor) for t in range(4 * factor)], dtype=np.float64)
    return k / k.sum()


def ddrm_rank(s: torch.Tensor) -> torch.Tensor:
    """Rank of each entry of ``s`` in the official ``torch.sort(float32, descending=True)`` (DDRM
    ``svd_replacement.py:422``, not stable: exact ties, ``sa[i] sa[j] = sa[j] sa[i]`` and the zeros, as on CPU)."""
    rank = torch.empty(s.numel(), dtype=torch.long)
    rank[torch.sort(s.float(), descending=True)[1]] = torch.arange(s.numel())
    return rank


def ddrm_tiled_singulars(s: torch.Tensor, C: int) -> torch.Tensor:
    """Per-channel singulars ``(C * n^2,)`` in our (c, i, j) layout that the official ``Deblurring`` class pairs
    with the spectral components: rank r of ``s`` in channel c gets ``sorted(s)[(C r + c) mod n^2]``
    (the ``repeat(1, 3)``-tiled sorted list indexed in its pixel-major layout ``C r + c``)."""
    N, rank, s_sorted = s.numel(), ddrm_rank(s), torch.empty_like(s)
    s_sorted[rank] = s
    idx = (C * rank.reshape(1, -1) + torch.arange(C).reshape(-1, 1)) % N
    return s_sorted[idx].reshape(-1)


class SeparableOperator(ImageOpMixin, SVDOperator):
    """``H x = A x A^T`` per channel, with the exact Kronecker SVD (see the module docstring)."""

    name = "separable"

    def __init__(self, sigma_y: float = 0.0, svd_cutoff: float = 0.0, pinv_mode: str = "moore_penrose"):
        super().__init__(sigma_y=sigma_y)
        svd_cutoff = float(svd_cutoff)
        if not svd_cutoff >= 0:
            raise ValueError(f"{self.name}: svd_cutoff must be >= 0, got {svd_cutoff}")
        if pinv_mode not in PINV_MODES:
            raise ValueError(f"{self.name}: pinv_mode must be one of {', '.join(PINV_MODES)}, got {pinv_mode!r}")
        self.svd_cutoff = svd_cutoff
        self.pinv_mode = pinv_mode
        self.spectrum = "exact"
        self._master = None
        self._axis_cache: dict = {}

    # subclasses ---------------------------------------------------------------------------------------
    def axis_matrix(self, n: int) -> np.ndarray:  # pragma: no cover - abstract
        """The per-axis matrix A (m x n) for images of side n."""
        raise NotImplementedError

    def _check_size(self, n: int) -> None:
        """Raise for image sizes the operator cannot handle."""

    # setup ----------------------------------------------------------------------------------------------
    def _axis_svd(self, n: int):
        if n not in self._axis_cache:
            A = torch.from_numpy(self.axis_matrix(n))
            m = A.shape[0]
            Ua, sa, Vat = torch.linalg.svd(A, full_matrices=True)
            tol = max(m, n) * _EPS64 * float(sa.max())
            sa = torch.where(sa < max(tol, self.svd_cutoff), torch.zeros_like(sa), sa)
            Va = Vat.T.contiguous()
            A_eff = Ua @ torch.diag(sa) @ Va[:, :m].T
            sa_inv = torch.where(sa > 0, 1.0 / sa.clamp_min(1e-300), torch.zeros_like(sa))
            A_pinv = Va[:, :m] @ torch.diag(sa_inv) @ Ua.T
            self._axis_cache[n] = dict(A=A_eff, At=A_eff.T.contiguous(), Ap=A_pinv, ApT=A_pinv.T.contiguous(),
                                       Ua=Ua, Uat=Ua.T.contiguous(), Va=Va, Vat=Vat.contiguous(), sa=sa)
        return self._axis_cache[n]

    def setup(self, indices, x_shape, device=None, dtype=None):
        B, C, n = self._bind(indices, x_shape, device, dtype)
        self._check_size(n)
        ax = self._axis_svd(n)
        self._master = dict(ax)
        self.m = ax["A"].shape[0]
        sa = ax["sa"]
        s = torch.outer(sa, sa).reshape(-1)
        if self.spectrum == "ddrm_tiled":
            s = ddrm_tiled_singulars(s, C)
        else:
            s = s.reshape(1, -1).expand(C, -1).reshape(-1)
        self._master["s"] = s.contiguous()
        return self

    @property
    def y_shape(self) -> tuple:
        self._require_setup()
        return (self.x_shape[0], self.m, self.m)

    def y_numel(self) -> int:
        return math.prod(self.y_shape)

    # direct operators ----------------------------------------------------------------------------------
    @staticmethod
    def _sandwich(L: torch.Tensor, X: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(L, X), R)

    def forward(self, x):
        self._check_x(x)
        if self.spectrum != "exact":  # not separable: through the SVD
            k = self.y_numel()
            return self.U(self.singulars() * self.Vt(x)[:, :k])
        return self._sandwich(self._t("A", x), x, self._t("At", x))

    def adjoint(self, y):
        self._check_y(y, self.y_shape)
        if self.spectrum != "exact":
            return self.V(self._pad(self.singulars() * self.Ut(y)))
        return self._sandwich(self._t("At", y), y, self._t("A", y))

    def pinv(self, y):
        self._check_y(y, self.y_shape)
        if self.spectrum == "exact" and self.pinv_mode == "moore_penrose":
            return self._sandwich(self._t("Ap", y), y, self._t("ApT", y))
        s, z = self.singulars(), self.Ut(y)
        keep = z if self.pinv_mode == "reddiff" else torch.zeros_like(z)
        return self.V(self._pad(torch.where(s > 0, z / torch.where(s > 0, s, torch.ones_like(s)), keep)))

    def _pad(self, z):
        """Spectral y-coefficients -> x-coefficients (zeros on the null space), DDRM's ``add_zeros``."""
        n = self._numel()
        return z if z.shape[1] == n else torch.cat([z, z.new_zeros(z.shape[0], n - z.shape[1])], dim=1)

    # SVD pieces ----------------------------------------------------------------------------------------
    def singulars(self):
        self._require_setup()
        return self._t("s", torch.empty(0, dtype=self.dtype, device=self.device))

    def Vt(self, x):
        self._require_setup()
        B = x.shape[0]
        X = x.reshape(B, *self.x_shape)
        Z = self._sandwich(self._t("Vat", X), X, self._t("Va", X))
        m = self.m
        if m == self.x_shape[1]:
            return Z.reshape(B, -1)
        return torch.cat([Z[:, :, :m, :m].reshape(B, -1), Z[:, :, :m, m:].reshape(B, -1),
                          Z[:, :, m:, :].reshape(B, -1)], dim=1)

    def V(self, z):
        self._require_setup()
        B = z.shape[0]
        C, n, _ = self.x_shape
        m = self.m
        z = z.reshape(B, -1)
        if m == n:
            Z = z.reshape(B, C, n, n)
        else:
            a, b = C * m * m, C * m * (n - m)
            top = torch.cat([z[:, :a].reshape(B, C, m, m), z[:, a:a + b].reshape(B, C, m, n - m)], dim=3)
            Z = torch.cat([top, z[:, a + b:].reshape(B, C, n - m, n)], dim=2)
        return self._sandwich(self._t("Va", Z), Z, self._t("Vat", Z))

    def Ut(self, y):
        self._require_setup()
        B = y.shape[0]
        Y = y.reshape(B, *self.y_shape)
        return self._sandwich(self._t("Uat", Y), Y, self._t("Ua", Y)).reshape(B, -1)

    def U(self, z):
        self._require_setup()
        B = z.shape[0]
        W = z.reshape(B, *self.y_shape)
        return self._sandwich(self._t("Ua", W), W, self._t("Uat", W))


class _Downsampler(SeparableOperator):
    def __init__(self, sigma_y: float = 0.0, factor: int = 4, svd_cutoff: float = 0.0):
        if int(factor) != factor or factor < 1:
            raise ValueError(f"{self.name}: factor must be a positive integer, got {factor}")
        self.factor = int(factor)
        super().__init__(sigma_y=sigma_y, svd_cutoff=svd_cutoff)

    def _check_size(self, n):
        if n % self.factor:
            raise ValueError(f"{self.name}: image size {n} is not divisible by the factor {self.factor}")

    def visualize(self, y):
        """Nearest-neighbour upsampling of y to the image size."""
        self._check_y(y, self.y_shape)
        return y.repeat_interleave(self.factor, dim=-2).repeat_interleave(self.factor, dim=-1)

    def degraded_image(self, y):
        """Bicubic upsampling of y, the official DiffPIR start (``main_ddpir.py:295``)."""
        return torch.nn.functional.interpolate(y, scale_factor=self.factor, mode="bicubic", align_corners=False)


class BlockAverageSR(_Downsampler):
    """``sr4``: average over non-overlapping factor x factor blocks (the DDRM/RED-diff ``sr4``).

    y: ``(B, C, n/factor, n/factor)``.  Per axis A has orthogonal rows of ``factor`` entries ``1/factor``
    (norm ``1/sqrt(factor)``), so every singular value of H is ``1/factor`` (1/4 for x4), as in DDRM's
    ``SuperResolution``.
    """

    name = "sr4"

    def axis_matrix(self, n):
        f = self.factor
        A = np.zeros((n // f, n))
        for r in range(n // f):
            A[r, r * f:(r + 1) * f] = 1.0 / f
        return A


class BicubicSR(_Downsampler):
    """``sr4_bicubic``: antialiased bicubic downsampling (Keys a = -0.5, 4*factor taps), symmetric boundary,
    output sample r centred on input block r, as the official ``SRConv``.  y: ``(B, C, n/factor, n/factor)``.
    Default ``svd_cutoff = 3e-2`` as the official class (it removes nothing at 32-256 px; the smallest
    per-axis singular value is ~0.5)."""

    name = "sr4_bicubic"

    def __init__(self, sigma_y: float = 0.0, factor: int = 4, a: float = -0.5, svd_cutoff: float = 3e-2):
        self.a = float(a)
        super().__init__(sigma_y=sigma_y, factor=factor, svd_cutoff=svd_cutoff)

    def axis_matrix(self, n):
        f = self.factor
        k = bicubic_taps(f, self.a)
        offsets = np.arange(4 * f) - 2 * f
        return conv_matrix(k, n, "symmetric", offsets=offsets, stride=f, first=f // 2)


class SeparableBlur(SeparableOperator):
    """Separable blur ``y = k (x) k * x`` (correlation; the kernels here are symmetric) with a per-axis boundary.

    Tasks: ``deblur_gauss`` (official RED-diff: 5 taps, sigma 25, zero boundary, ``window: ddrm``, cutoff 3e-2),
    ``deblur_gauss_dps`` (61 taps, sigma 3, truncated at 4 sigma like scipy, reflect boundary as DPS),
    ``deblur_uniform`` (9 taps of 1/9, DDRM's ``deblur_uni``: zero boundary, ``window: ddrm``, cutoff 3e-2).
    y has the image shape.
    """

    name = "deblur"

    def __init__(self, sigma_y: float = 0.0, kernel: str = "gaussian", size: int = 5, sigma: float = 1.0,
                 truncate: float | None = None, boundary: str = "zero", window: str = "full",
                 svd_cutoff: float = 0.0, name: str | None = None, spectrum: str = "exact",
                 pinv_mode: str = "moore_penrose"):
        if name:
            self.name = str(name)
        if kernel not in ("gaussian", "uniform"):
            raise ValueError(f"{self.name}: kernel must be 'gaussian' or 'uniform', got {kernel!r}")
        if boundary not in BOUNDARIES:
            raise ValueError(f"{self.name}: boundary must be one of {', '.join(BOUNDARIES)}, got {boundary!r}")
        if window not in ("full", "ddrm"):
            raise ValueError(f"{self.name}: window must be 'full' or 'ddrm', got {window!r}")
        size = int(size)
        if size < 1 or size % 2 == 0:
            raise ValueError(f"{self.name}: kernel size must be odd and positive, got {size}")
        if spectrum not in SPECTRA:
            raise ValueError(f"{self.name}: spectrum must be one of {', '.join(SPECTRA)}, got {spectrum!r}")
        self.kernel_kind, self.size, self.sigma, self.truncate = kernel, size, float(sigma), truncate
        self.boundary, self.window = boundary, window
        super().__init__(sigma_y=sigma_y, svd_cutoff=svd_cutoff, pinv_mode=pinv_mode)
        self.spectrum = spectrum
        self.taps = self.kernel_taps()

    def kernel_taps(self) -> np.ndarray:
        """The nominal normalised 1-D kernel (before the ``ddrm`` window drops its last tap)."""
        if self.kernel_kind == "uniform":
            return np.full(self.size, 1.0 / self.size)
        return gaussian_taps(self.size, self.sigma, self.truncate)

    def effective_taps(self) -> tuple[np.ndarray, np.ndarray]:
        """(weights, offsets) that the per-axis matrix applies: ``y[i] = sum w[t] x[i + offsets[t]]``."""
        r = self.size // 2
        offsets = np.arange(self.size) - r
        if self.window == "ddrm":
            return self.taps[:-1], offsets[:-1]
        return self.taps, offsets

    def axis_matrix(self, n):
        w, o = self.effective_taps()
        return conv_matrix(w, n, self.boundary, offsets=o)

    def visualize(self, y):
        """The blurred image itself."""
        self._check_y(y, self.y_shape)
        return y
