"""Image-scale Gaussian mixture ``p(x) = sum_k w_k N(x; m_k, s^2 I)`` on ``(C, H, W)`` images, and its exact
posterior under any SVD operator.

The prior is :class:`reddiff.priors.gmm.GaussianMixturePrior` with isotropic covariances, seen with an image
shape, so its denoiser is the same closed form at every noise level (responsibility-weighted shrinkage towards
each mean, O(K d) per image through the basis of the means) and every dialect and sampler works unchanged,
with the NFE counted by the base class.  The means are given; :func:`build_means` makes designed-multimodal ones
from a pool of photos it is handed (``reddiff.run.photo_priors`` reads the training photos and builds the
``prior=image_gmm`` / ``prior=latent_gmm`` priors and the means of ``benchmarks/exact_images.py``: this layer may
not read data).

Designed means (:func:`build_means`): ``K = 3 * families * variants``; each family has a base crop ``c`` and
``variants`` other crops ``d_j`` (the first is ``c`` itself), and its means agree on one measured part and differ
elsewhere, so the posterior of that measurement keeps ``variants`` modes: ``lowpass``: ``L c + (d_j - L d_j)``
with ``L`` the x4 block average (what sr4 measures); ``centre``: ``c`` outside the centre square of half the side,
``d_j`` inside (what inpaint_box measures); ``chroma``: the channel mean of ``c`` plus the chroma
``d_j - mean_c d_j`` (what colorization measures).

Exact posterior of ``y = H x + sigma e`` for ``H = U diag(s) V^T`` (the :class:`SVDOperator` pieces, duck-typed:
``Vt``, ``V``, ``Ut``, ``singulars``).  With one shared covariance ``s^2 I`` every component's posterior has the
same covariance, diagonal in the V basis: on an observed spectral coordinate ``i`` (``s_i > 0``)

    v_i = s^2 sigma^2 / (sigma^2 + s^2 s_i^2),   z~_ki = mu_ki + s^2 s_i (y'_i - s_i mu_ki) / (sigma^2 + s^2 s_i^2),

and ``v_i = s^2``, ``z~_ki = mu_ki`` elsewhere (``mu_k = V^T m_k``, ``y' = U^T y``); the weights are
``w~_k ∝ w_k prod_i N(y'_i; s_i mu_ki, sigma^2 + s^2 s_i^2)``, which is ``N(y; H m_k, sigma^2 I + s^2 H H^T)``
up to factors common to all components (the unobserved coordinates of ``y'``).  ``sigma = 0`` is the noiseless
limit (``v_i = 0``, ``z~_ki = y'_i / s_i``).  Everything is float64; sampling is ``V(z~_k + sqrt(v) e)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from reddiff.core.diffusion import Schedule
from reddiff.priors.gmm import GaussianMixturePrior, _categorical, _randn

_LOG_2PI = math.log(2.0 * math.pi)


FAMILY_TYPES = ("lowpass", "centre", "chroma")


def _crop(pool, size: int, g: torch.Generator) -> torch.Tensor:
    im = pool[int(torch.randint(len(pool), (1,), generator=g))]
    i = int(torch.randint(im.shape[1] - size + 1, (1,), generator=g))
    j = int(torch.randint(im.shape[2] - size + 1, (1,), generator=g))
    return im[:, i:i + size, j:j + size]


def _lowpass(x):
    return torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x[None], 4), scale_factor=4,
                                           mode="nearest")[0]


def _centre_mask(size):
    m = torch.zeros(size, size, dtype=torch.float64)
    s = round(size / 2)
    a = (size - s) // 2
    m[a:a + s, a:a + s] = 1.0
    return m


FAMILY = {  # base crop c, variant crop d -> a mean that agrees with c on the measured part
    "lowpass": lambda c, d: _lowpass(c) + d - _lowpass(d),
    "centre": lambda c, d: c * (1 - _centre_mask(c.shape[-1])) + d * _centre_mask(c.shape[-1]),
    "chroma": lambda c, d: c.mean(0, keepdim=True) + d - d.mean(0, keepdim=True),
}


def build_means(pool, size: int, families: int, variants: int,
                g: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """``(K, 3, size, size)`` designed means from crops of ``pool`` (``(3, H, W)`` float64 photos, each at least
    ``size`` on a side) drawn with ``g``, and the family type of each (module docstring)."""
    if size % 4 or size <= 0:
        raise ValueError(f"the image size must be a positive multiple of 4 (the x4 lowpass family), got {size}")
    if families < 1 or variants < 1:
        raise ValueError(f"families and variants must be >= 1, got {families} and {variants}")
    small = min(min(im.shape[1:]) for im in pool)
    if small < size:
        raise ValueError(f"a {size}-px crop does not fit the smallest photo of the pool ({small} px)")
    means, types = [], []
    for kind in FAMILY_TYPES:
        for _ in range(families):
            c = _crop(pool, size, g)
            for j in range(variants):
                means.append(FAMILY[kind](c, c if j == 0 else _crop(pool, size, g)))
                types.append(kind)
    return torch.stack(means), types


class ImageMixturePrior(GaussianMixturePrior):
    """``sum_k w_k N(m_k, s^2 I)`` on images of shape ``image_shape`` (exact denoiser, every dialect).

    Args:
        means: ``(K, C, H, W)`` or ``(K, d)`` component means (model units, [-1, 1] for photos).
        std: the shared component standard deviation ``s`` (> 0).
        weights: ``(K,)`` non-negative weights; uniform when omitted.
        image_shape: ``(C, H, W)`` when ``means`` is flat.
    """

    name = "image_gmm"

    def __init__(self, means, std: float, weights=None, image_shape=None, schedule: Optional[Schedule] = None,
                 dialect: str = "vp_discrete"):
        means = torch.as_tensor(means, dtype=torch.float64)
        if image_shape is None:
            if means.ndim != 4:
                raise ValueError(f"means must be (K, C, H, W) or flat with image_shape; got {tuple(means.shape)}")
            image_shape = tuple(means.shape[1:])
        image_shape = tuple(int(v) for v in image_shape)
        std = float(std)
        if not std > 0:
            raise ValueError(f"the component std must be > 0, got {std}")
        K = means.shape[0]
        super().__init__(means.reshape(K, -1), weights, torch.full((K,), std * std, dtype=torch.float64),
                         schedule=schedule, dialect=dialect)
        if math.prod(image_shape) != self.d:
            raise ValueError(f"image_shape {image_shape} does not hold d={self.d} values")
        self.shape = image_shape
        self.std = std

    def sample(self, n: int, rng=None, dtype=torch.float64) -> torch.Tensor:
        """``n`` prior samples ``(n, C, H, W)``."""
        return super().sample(n, rng, dtype).reshape((n,) + self.shape)

    def component_log_lik(self, x: torch.Tensor) -> torch.Tensor:
        """``log w_k + log N(x; m_k, s^2 I)`` up to a constant in k, ``(B, K)`` float64."""
        X = x.reshape(x.shape[0], -1).to(torch.float64)
        xp = X @ self.mean_basis
        d2 = ((X * X).sum(-1, keepdim=True) - 2 * xp @ self.mean_coords.T
              + (self.mean_coords ** 2).sum(-1)[None]).clamp_min(0)
        return self.log_weights[None] - 0.5 * d2 / self.std ** 2

    def component_responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """``p(k | x0 = x)`` under the prior, ``(B, K)``.  Since ``y`` depends on ``x`` alone, ``p(k | x, y)`` is
        the same, so its mean over exact posterior samples is the exact posterior weight ``w~_k``."""
        return torch.softmax(self.component_log_lik(x), dim=-1)

    def spectral_posterior(self, y: torch.Tensor, bind, sigma: float) -> "SpectralMixturePosterior":
        """Exact posterior of one measurement ``y`` (``(1, *y_shape)``) with noise std ``sigma`` (model units).
        ``bind(B)`` returns the SVD operator set up for a batch of ``B`` images of this problem (per-image masks
        and kernels the same for every item: an operator with per-image state accepts only its own batch size)."""
        sigma = float(sigma)
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        f64 = torch.float64
        means = self.means.cpu().reshape((self.K,) + self.shape)
        Mz = _batched(bind, "Vt", means, f64)  # (K, n)
        yz = bind(1).Ut(y.to(f64)).reshape(-1).to(f64)
        sv = bind(1).singulars().to(f64)
        sv = sv[0] if sv.ndim == 2 else sv
        k = sv.shape[0]
        obs = torch.zeros(Mz.shape[1], dtype=torch.bool)
        obs[:k] = sv > 0
        idx = torch.nonzero(obs).reshape(-1)
        s_o = sv[idx]
        s2 = self.std ** 2
        denom = sigma ** 2 + s2 * s_o ** 2
        resid = yz[idx][None, :] - s_o[None, :] * Mz[:, idx]  # (K, n_obs)
        log_lik = (-0.5 * (resid ** 2 / denom).sum(-1) - 0.5 * torch.log(2 * math.pi * denom).sum())
        post_z = Mz.clone()
        post_z[:, idx] = Mz[:, idx] + (s2 * s_o / denom)[None, :] * resid
        var = torch.full((Mz.shape[1],), s2, dtype=f64)
        var[idx] = s2 * sigma ** 2 / denom
        log_w = self.log_weights.cpu() + log_lik
        log_w = log_w - torch.logsumexp(log_w, 0)
        return SpectralMixturePosterior(prior=self, bind=bind, sigma=sigma, log_weights=log_w,
                                        post_z=post_z, var=var, observed=idx, log_evidence_components=log_lik)


def _batched(bind, method: str, x: torch.Tensor, dtype, chunk: int = 256) -> torch.Tensor:
    """``bind(b).<method>`` over ``x`` in chunks of at most ``chunk`` items, flattened to ``(N, -1)``."""
    out = []
    for i in range(0, x.shape[0], chunk):
        part = x[i:i + chunk].to(dtype)
        out.append(getattr(bind(part.shape[0]), method)(part).reshape(part.shape[0], -1))
    return torch.cat(out).to(dtype)


@dataclass
class SpectralMixturePosterior:
    """``p(x | y) = sum_k w~_k N(V z~_k, V diag(v) V^T)``, float64 on the CPU (module docstring)."""

    prior: ImageMixturePrior
    bind: object  # B -> the operator set up for a batch of B images of this problem
    sigma: float
    log_weights: torch.Tensor  # (K,)
    post_z: torch.Tensor  # (K, n) component means in the V basis
    var: torch.Tensor  # (n,) the shared posterior covariance's diagonal in the V basis
    observed: torch.Tensor  # spectral indices with s_i > 0
    log_evidence_components: torch.Tensor  # (K,) log N(y'_obs; s mu_k, sigma^2 + s^2 s^2)

    @property
    def weights(self) -> torch.Tensor:
        return self.log_weights.exp()

    def effective_modes(self) -> float:
        """``exp(entropy of the posterior weights)``: 1 for one mode, K for uniform weights."""
        w = self.weights
        nz = w[w > 0]
        return float(torch.exp(-(nz * nz.log()).sum()))

    def component_means(self) -> torch.Tensor:
        """``(K, C, H, W)`` posterior component means."""
        return _batched(self.bind, "V", self.post_z, torch.float64).reshape((-1,) + self.prior.shape)

    def mean(self) -> torch.Tensor:
        """The posterior mean ``(C, H, W)`` (the MMSE estimate)."""
        z = self.weights @ self.post_z
        return self.bind(1).V(z[None]).reshape(self.prior.shape).to(torch.float64)

    def total_variance(self) -> float:
        """``tr Cov(x | y)``: the shared covariance's trace plus the spread of the component means."""
        w = self.weights
        zbar = w @ self.post_z
        spread = (w * ((self.post_z - zbar[None]) ** 2).sum(-1)).sum()
        return float(self.var.sum() + spread)

    def pixel_variance(self, chunk: int = 256) -> torch.Tensor:
        """Per-pixel posterior variance ``(C, H, W)``: ``diag(V diag(v) V^T)`` (through the observed columns of V,
        ``s^2 - sum_i (s^2 - v_i) V_pi^2``) plus the variance of the component means at each pixel."""
        s2 = self.prior.std ** 2
        n = self.post_z.shape[1]
        diag = torch.full((n,), s2, dtype=torch.float64)
        for i in range(0, len(self.observed), chunk):
            cols = self.observed[i:i + chunk]
            E = torch.zeros(len(cols), n, dtype=torch.float64)
            E[torch.arange(len(cols)), cols] = 1.0
            Vc = self.bind(len(cols)).V(E).reshape(len(cols), -1).to(torch.float64)  # rows: columns of V
            diag -= ((s2 - self.var[cols])[:, None] * Vc * Vc).sum(0)
        w = self.weights
        M = self.component_means().reshape(len(w), -1)
        mbar = w @ M
        spread = (w[:, None] * (M - mbar[None]) ** 2).sum(0)
        return (diag + spread).reshape(self.prior.shape)

    def sample(self, n: int, rng=None, dtype=torch.float64) -> torch.Tensor:
        """``n`` exact posterior samples ``(n, C, H, W)``: a component by its weight, then ``V(z~_k + sqrt(v) e)``."""
        idx = _categorical(self.weights, n, rng)
        z = self.post_z[idx] + self.var.sqrt()[None] * _randn(rng, (n, self.post_z.shape[1]))
        return _batched(self.bind, "V", z, torch.float64).reshape((n,) + self.prior.shape).to(dtype)
