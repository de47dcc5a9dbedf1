"""Analytic Gaussian-mixture prior with an exact denoiser and an exact linear-Gaussian posterior.

Prior ``p(x0) = sum_i w_i N(x0; mu_i, Sigma_i)`` on ``R^d``.  Under the VP forward process
``x_t = sqrt(a) x0 + sqrt(1 - a) e`` (``a = alpha_bar(t)``) the marginal is again a mixture,

    p(x_t) = sum_i w_i N(x_t; sqrt(a) mu_i, C_i(t)),    C_i(t) = a Sigma_i + (1 - a) I,

so the score, the noise prediction and Tweedie's denoiser are available in closed form:

    eps(x_t, t) = -sqrt(1 - a) grad log p(x_t) = sqrt(1 - a) sum_i r_i(x_t) C_i^{-1} (x_t - sqrt(a) mu_i),
    E[x0 | x_t] = (x_t - sqrt(1 - a) eps) / sqrt(a)                         (the base-class ``x0``),

with responsibilities ``r_i = softmax_i(log w_i + log N(x_t; sqrt(a) mu_i, C_i))`` computed in log space.
Writing ``eps`` through ``C_i^{-1}(x_t - sqrt(a) mu_i)`` avoids the cancellation of
``x_t - sqrt(a) E[x0|x_t]`` at small t.  For identity covariances this is the docs/ANCHORS.md formula
``E[x0|x_t] = sqrt(a) x_t + (1 - a) sum_i r_i mu_i`` (``C_i = I``).

Covariances come in three representations, all exact:

* ``None``: identity (the MCGdiff benchmark; the fast path, O(B K d));
* a ``(K,)`` tensor of per-component variances ``s_i^2`` (``Sigma_i = s_i^2 I``), also O(B K d);
* a ``(K, d, d)`` tensor of full SPD covariances, diagonalised once (``Sigma_i = Q_i diag(lam_i) Q_i^T``)
  so that every ``C_i(t) = Q_i diag(a lam_i + 1 - a) Q_i^T`` is diagonal in the same basis (O(B K d^2)).

The denoiser computes in float64 internally and returns the dtype of ``x_t``; it is differentiable with
respect to ``x_t`` (DPS and Pi-GDM backpropagate through it).

The exact posterior under ``y = A x + sigma e`` uses the Kalman (covariance) form in float64, which stays
correct when ``sigma`` is tiny (the precision form ``(Sigma^-1 + A^T A / sigma^2)^-1`` does not):

    S_i = sigma^2 I + A Sigma_i A^T,   K_i = Sigma_i A^T S_i^{-1},
    mu~_i = mu_i + K_i (y - A mu_i),   Sigma~_i = Sigma_i - K_i A Sigma_i,
    w~_i  ∝ w_i N(y; A mu_i, S_i).

Posterior samples use Matheron's rule, ``x = x0 + K_i (y - A x0 - sigma e)`` with ``x0 ~ N(mu_i, Sigma_i)``,
which is exact and never factorises the (possibly near-singular) ``Sigma~_i``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from reddiff.core.diffusion import Schedule
from reddiff.priors.base import Prior

_LOG_2PI = math.log(2.0 * math.pi)


# ------------------------------------------------------------------------------------------ randomness
def _randn(rng, shape, dtype=torch.float64) -> torch.Tensor:
    """Standard normals from a :class:`reddiff.core.rng.BatchRNG`, a ``torch.Generator`` or ``None``."""
    if rng is None or isinstance(rng, torch.Generator):
        return torch.randn(tuple(shape), generator=rng, dtype=dtype)
    return rng.randn(tuple(shape), dtype=dtype).cpu()


def _rand(rng, shape, dtype=torch.float64) -> torch.Tensor:
    if rng is None or isinstance(rng, torch.Generator):
        return torch.rand(tuple(shape), generator=rng, dtype=dtype)
    return rng.rand(tuple(shape), dtype=dtype).cpu()


def _categorical(probs: torch.Tensor, n: int, rng) -> torch.Tensor:
    """``n`` draws of a component index with probabilities ``probs`` (inverse CDF of uniforms)."""
    cdf = torch.cumsum(probs.to(torch.float64), 0)
    cdf = cdf / cdf[-1]
    u = _rand(rng, (n,))
    return torch.searchsorted(cdf, u, right=True).clamp_max(len(probs) - 1)


# ------------------------------------------------------------------------------------------ the prior
class GaussianMixturePrior(Prior):
    """Exact epsilon-predictor for a Gaussian mixture in ``R^d`` (see the module docstring).

    Args:
        means: ``(K, d)`` component means.
        weights: ``(K,)`` non-negative weights (normalised here); uniform when omitted.
        covs: ``None`` (identity), ``(K,)`` variances of isotropic components, or ``(K, d, d)`` full SPD
            covariances.
        schedule: the VP schedule (the DDPM linear schedule by default).
    """

    name = "gmm"

    def __init__(self, means, weights=None, covs=None, schedule: Optional[Schedule] = None,
                 dialect: str = "vp_discrete"):
        super().__init__(schedule, dialect)
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must be (K, d), got shape {tuple(means.shape)}")
        K, d = means.shape
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,) or not bool((weights >= 0).all()) or not float(weights.sum()) > 0:
            raise ValueError("weights must be K non-negative numbers with a positive sum")
        weights = weights / weights.sum()
        self.shape = (d,)
        self.K, self.d = K, d
        self.register_buffer("means", means.clone())
        self.register_buffer("weights", weights)
        with torch.no_grad():
            self.register_buffer("log_weights", torch.log(weights))  # -inf for zero weights is fine
        if covs is None:
            self.cov_kind = "identity"
            self.register_buffer("variances", torch.ones(K, dtype=torch.float64))
        else:
            covs = torch.as_tensor(covs, dtype=torch.float64)
            if covs.shape == (K,):
                if not bool((covs > 0).all()):
                    raise ValueError("isotropic variances must be positive")
                self.cov_kind = "identity" if bool((covs == 1).all()) else "isotropic"
                self.register_buffer("variances", covs.clone())
            elif covs.shape == (K, d, d):
                covs = 0.5 * (covs + covs.transpose(-1, -2))
                lam, Q = torch.linalg.eigh(covs)
                if not bool((lam > 0).all()):
                    raise ValueError("full covariances must be symmetric positive definite")
                self.cov_kind = "full"
                self.register_buffer("covs", covs)
                self.register_buffer("cov_evals", lam)  # (K, d)
                self.register_buffer("cov_evecs", Q)  # (K, d, d), columns are eigenvectors
                self.register_buffer("cov_sqrt", Q * lam.sqrt().unsqueeze(-2))  # Sigma = L L^T
            else:
                raise ValueError(f"covs must be None, (K,)={K} or (K, d, d)=({K}, {d}, {d}); got {tuple(covs.shape)}")
        # Orthonormal basis P (d, r) of the span of the means: x . mu_i = (P^T x) . (P^T mu_i) exactly, so the
        # isotropic paths cost O(B d r) instead of O(B d K) (r = 2 for the MCGdiff prior).
        _, sv, Vh = torch.linalg.svd(means, full_matrices=False)
        r = int((sv > sv.max().clamp_min(1e-300) * 1e-12).sum()) if K else 0
        P = Vh[:r].T.contiguous()
        self.register_buffer("mean_basis", P)  # (d, r)
        self.register_buffer("mean_coords", means @ P)  # (K, r)

    # --------------------------------------------------------------------------------- constructors
    @classmethod
    def mcgdiff(cls, d: int, generator: Optional[torch.Generator] = None, spacing: float = 8.0,
                schedule: Optional[Schedule] = None, dialect: str = "vp_discrete") -> "GaussianMixturePrior":
        """The 25-component MCGdiff prior: means ``(8i, 8j)`` repeated over the ``d/2`` coordinate pairs,
        ``i, j in {-2..2}``; weights ``randn(25)^2`` normalised; identity covariances."""
        if d <= 0 or d % 2:
            raise ValueError(f"the MCGdiff prior needs an even dimension, got d={d}")
        grid = [(spacing * i, spacing * j) for i in range(-2, 3) for j in range(-2, 3)]
        means = torch.tensor([list(p) * (d // 2) for p in grid], dtype=torch.float64)
        w = torch.randn(len(grid), generator=generator, dtype=torch.float64) ** 2
        return cls(means, w / w.sum(), None, schedule=schedule, dialect=dialect)

    # --------------------------------------------------------------------------------- covariances
    def cov_matrices(self) -> torch.Tensor:
        """Dense ``(K, d, d)`` covariances (for tests and small d)."""
        if self.cov_kind == "full":
            return self.covs
        eye = torch.eye(self.d, dtype=torch.float64, device=self.means.device)
        return self.variances[:, None, None] * eye

    def _cov_times(self, M: torch.Tensor) -> torch.Tensor:
        """``Sigma_i @ M`` for a ``(d, m)`` matrix: ``(K, d, m)``."""
        if self.cov_kind == "full":
            return self.covs @ M
        return self.variances[:, None, None] * M

    # --------------------------------------------------------------------------------- diffusion marginal
    def _component_terms(self, x: torch.Tensor, a: torch.Tensor, exact_norm: bool = True):
        """Log-densities ``(B, K)`` of the components of p(x_t) (float64) and what the score needs.

        ``x`` is ``(B, d)`` in any float dtype, ``a`` is ``(B,)`` float64.  With identity covariances and
        ``exact_norm=False`` the terms that are equal for every component (``-||x||^2/2`` and the
        normaliser) are dropped: they cancel in the responsibilities, and skipping them saves a pass over x.
        """
        sa = a.sqrt()
        if self.cov_kind in ("identity", "isotropic"):
            c = a[:, None] * self.variances[None, :] + (1 - a)[:, None]  # (B, K)
            # ||x - sqrt(a) mu_i||^2 = ||x||^2 - 2 sqrt(a) x.mu_i + a ||mu_i||^2, with x.mu_i taken through the
            # basis of the means.  The projection runs in the dtype of x (float32: a relative error ~1e-7 on
            # P^T x, i.e. ~1e-4 on the logits of the d=800 MCGdiff prior, far below any effect on the
            # responsibilities); everything after it is float64, so the cancellation between terms is harmless.
            # (P^T x^T)^T: the same product as x @ P, several times faster for r << d with CPU BLAS
            xp = (self.mean_basis.T.to(x.dtype) @ x.T).T.to(torch.float64)  # (B, r)
            xm = xp @ self.mean_coords.T  # (B, K)
            m2 = (self.mean_coords * self.mean_coords).sum(-1)[None, :]
            cross = -2 * sa[:, None] * xm + a[:, None] * m2
            if self.cov_kind == "identity" and not exact_norm:
                return -0.5 * cross, c
            x64 = x.to(torch.float64)
            x2 = (x64 * x64).sum(-1, keepdim=True)
            dist2 = (x2 + cross).clamp_min(0)
            logp = -0.5 * dist2 / c - 0.5 * self.d * torch.log(c) - 0.5 * self.d * _LOG_2PI
            return logp, c
        lam, Q = self.cov_evals, self.cov_evecs
        c = a[:, None, None] * lam[None] + (1 - a)[:, None, None]  # (B, K, d)
        diff = x.to(torch.float64)[:, None, :] - sa[:, None, None] * self.means[None]  # (B, K, d)
        z = torch.einsum("bkd,kde->bke", diff, Q)  # coordinates in the eigenbasis
        logp = -0.5 * (z * z / c).sum(-1) - 0.5 * torch.log(c).sum(-1) - 0.5 * self.d * _LOG_2PI
        return logp, (z, c)

    def _flat(self, x_t: torch.Tensor) -> torch.Tensor:
        x = x_t.reshape(x_t.shape[0], -1)
        if x.shape[1] != self.d:
            raise ValueError(f"expected samples of dimension {self.d}, got shape {tuple(x_t.shape)}")
        return x

    def _prep(self, x_t: torch.Tensor, t):
        t = self._t(t, x_t)
        a = self.schedule.alpha_bar_at(t.cpu()).to(device=x_t.device, dtype=torch.float64)
        return self._flat(x_t), a

    def log_marginal(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """``log p(x_t)`` under the VP forward process, ``(B,)`` float64."""
        x, a = self._prep(x_t, t)
        logp, _ = self._component_terms(x, a)
        return torch.logsumexp(self.log_weights[None] + logp, dim=-1)

    def responsibilities(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """``p(component i | x_t)``, ``(B, K)`` float64."""
        x, a = self._prep(x_t, t)
        logp, _ = self._component_terms(x, a, exact_norm=False)
        return torch.softmax(self.log_weights[None] + logp, dim=-1)

    def _eps_alpha(self, x_t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Exact epsilon at ``alpha_bar = a`` (``(B,)`` float64), any value in (0, 1]: every dialect's noise level."""
        x = self._flat(x_t)
        a = a.to(device=x_t.device, dtype=torch.float64)
        logp, aux = self._component_terms(x, a, exact_norm=False)
        r = torch.softmax(self.log_weights[None] + logp, dim=-1)  # (B, K) float64
        sa, s1 = a.sqrt(), (1 - a).sqrt()
        if self.cov_kind in ("identity", "isotropic"):
            rc = r / aux  # r_i / c_i
            # eps = sqrt(1-a) sum_i r_i (x - sqrt(a) mu_i) / c_i, assembled in the dtype of x (two passes):
            # the low-rank mean term is formed in float64 in the r-dimensional basis of the means.
            coef_x = (s1 * rc.sum(-1)).to(x.dtype)
            coef_m = (-(s1 * sa)[:, None] * (rc @ self.mean_coords)).to(x.dtype)  # (B, r)
            eps = torch.addmm(x * coef_x[:, None], coef_m, self.mean_basis.T.to(x.dtype))
        else:
            z, c = aux
            g = torch.einsum("bk,bke,kde->bd", r, z / c, self.cov_evecs)
            eps = (s1[:, None] * g).to(x_t.dtype)
        return eps.reshape(x_t.shape)

    # --------------------------------------------------------------------------------- sampling
    def sample(self, n: int, rng=None, dtype=torch.float64) -> torch.Tensor:
        """``n`` prior samples ``(n, d)``; ``rng`` is a BatchRNG, a ``torch.Generator`` or None."""
        idx = _categorical(self.weights.cpu(), n, rng)
        z = _randn(rng, (n, self.d))
        return (self._component_noise(idx, z) + self.means.cpu()[idx]).to(dtype)

    def _component_noise(self, idx: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``L_idx z`` with ``Sigma_i = L_i L_i^T``, on the CPU in float64."""
        if self.cov_kind == "full":
            return torch.einsum("nde,ne->nd", self.cov_sqrt.cpu()[idx], z)
        return self.variances.cpu()[idx].sqrt()[:, None] * z

    # --------------------------------------------------------------------------------- exact posterior
    def posterior(self, y, A, sigma: float) -> "GaussianMixturePosterior":
        """Exact posterior of ``x`` given ``y = A x + sigma e`` (Kalman form, float64)."""
        A = torch.as_tensor(A, dtype=torch.float64).cpu()
        y = torch.as_tensor(y, dtype=torch.float64).cpu().reshape(-1)
        if A.ndim != 2 or A.shape[1] != self.d or A.shape[0] != y.shape[0]:
            raise ValueError(f"A must be (d_y, {self.d}) and y (d_y,), got {tuple(A.shape)} and {tuple(y.shape)}")
        sigma = float(sigma)
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        dy = A.shape[0]
        mu = self.means.cpu()
        SAt = self._cov_times(A.T.contiguous()).cpu()  # (K, d, dy) = Sigma_i A^T
        S = A @ SAt + sigma**2 * torch.eye(dy, dtype=torch.float64)  # (K, dy, dy)
        S = 0.5 * (S + S.transpose(-1, -2))
        L = torch.linalg.cholesky(S)
        resid = y[None, :] - mu @ A.T  # (K, dy)
        sol = torch.cholesky_solve(resid[..., None], L)[..., 0]  # S_i^{-1} (y - A mu_i)
        log_lik = (-0.5 * (resid * sol).sum(-1) - torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
                   - 0.5 * dy * _LOG_2PI)
        # K_i = Sigma_i A^T S_i^{-1}  (S symmetric): solve S_i X = A Sigma_i, K_i = X^T
        gain = torch.cholesky_solve(SAt.transpose(-1, -2), L).transpose(-1, -2)  # (K, d, dy)
        post_means = mu + torch.einsum("kde,ke->kd", gain, resid)
        log_w = self.log_weights.cpu() + log_lik
        log_w = log_w - torch.logsumexp(log_w, 0)
        return GaussianMixturePosterior(prior=self, A=A, y=y, sigma=sigma, log_weights=log_w, means=post_means,
                                        gain=gain, log_evidence_components=log_lik)


@dataclass
class GaussianMixturePosterior:
    """``p(x | y) = sum_i w~_i N(mu~_i, Sigma~_i)``; everything float64 on the CPU."""

    prior: GaussianMixturePrior
    A: torch.Tensor  # (dy, d)
    y: torch.Tensor  # (dy,)
    sigma: float
    log_weights: torch.Tensor  # (K,) normalised
    means: torch.Tensor  # (K, d)
    gain: torch.Tensor  # (K, d, dy)
    log_evidence_components: torch.Tensor  # (K,) log N(y; A mu_i, S_i)

    @property
    def weights(self) -> torch.Tensor:
        return self.log_weights.exp()

    def log_evidence(self) -> torch.Tensor:
        """``log p(y)``."""
        return torch.logsumexp(self.prior.log_weights.cpu() + self.log_evidence_components, 0)

    def covs(self) -> torch.Tensor:
        """Dense ``(K, d, d)`` posterior covariances ``Sigma_i - K_i A Sigma_i`` (small d only)."""
        Sig = self.prior.cov_matrices().cpu()
        C = Sig - self.gain @ (self.A @ Sig)
        return 0.5 * (C + C.transpose(-1, -2))

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def sample(self, n: int, rng=None, dtype=torch.float64) -> torch.Tensor:
        """``n`` exact posterior samples by Matheron's rule (exact for any sigma, including 0)."""
        idx = _categorical(self.weights, n, rng)
        x0 = self.prior.means.cpu()[idx] + self.prior._component_noise(idx, _randn(rng, (n, self.prior.d)))
        y_sim = x0 @ self.A.T + self.sigma * _randn(rng, (n, self.A.shape[0]))
        x = x0 + torch.einsum("nde,ne->nd", self.gain[idx], self.y[None, :] - y_sim)
        return x.to(dtype)


# ------------------------------------------------------------------------------------------ MCGdiff problems
@dataclass
class GMMProblem:
    """One MCGdiff linear inverse problem ``y = A x* + sigma_y e`` (float64).

    ``A = U diag(s) Vk^T`` with ``U`` (dy, dy) orthogonal, ``s`` sorted descending, ``Vk`` (d, dy) orthonormal.
    """

    A: torch.Tensor
    U: torch.Tensor
    s: torch.Tensor
    Vk: torch.Tensor
    sigma_y: float
    x_star: torch.Tensor
    y: torch.Tensor


def mcgdiff_problem(prior: GaussianMixturePrior, d_y: int, generator: Optional[torch.Generator] = None) -> GMMProblem:
    """The MCGdiff problem generator: the SVD of a Gaussian ``d_y x d`` matrix with its singular values
    replaced by sorted ``U(0, 1)`` draws; ``sigma_y = U(0, 1) * s_max``; ``x* ~ prior``; ``y = A x* + sigma_y e``."""
    d = prior.d
    if not 1 <= d_y <= d:
        raise ValueError(f"need 1 <= d_y <= d, got d_y={d_y}, d={d}")
    G = torch.randn(d_y, d, generator=generator, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)  # U (dy, dy), Vh (dy, d)
    s = torch.sort(torch.rand(d_y, generator=generator, dtype=torch.float64), descending=True).values
    A = U @ torch.diag(s) @ Vh
    sigma_y = float(torch.rand(1, generator=generator, dtype=torch.float64)[0] * s.max())
    x_star = prior.sample(1, generator)[0]
    y = A @ x_star + sigma_y * torch.randn(d_y, generator=generator, dtype=torch.float64)
    return GMMProblem(A=A, U=U, s=s, Vk=Vh.T.contiguous(), sigma_y=sigma_y, x_star=x_star, y=y)
