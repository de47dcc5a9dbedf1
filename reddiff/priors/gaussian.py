"""A Gaussian prior ``x0 ~ N(m, Sigma)`` with its exact epsilon-predictor.

On the VP schedule ``x_t = sqrt(a) x0 + sqrt(1 - a) e`` is Gaussian with covariance ``C_t = a Sigma + (1 - a) I``,
so the exact noise prediction is

    eps(x_t, t) = E[e | x_t] = sqrt(1 - a) C_t^{-1} (x_t - sqrt(a) m)

(diagonal ``Sigma``: elementwise; full ``Sigma = Q diag(lam) Q^T``: in its eigenbasis).  For the standard normal
(``m = 0``, ``Sigma = I``) this is ``eps = sqrt(1 - a) x_t``, ``E[x0 | x_t] = sqrt(a) x_t`` and
``Cov[x0 | x_t] = (1 - a) I``: the Gaussian approximation of ``p(x0 | x_t)`` that Pi-GDM makes (with
``r_t^2 = 1 - a``) is then exact, and so is its guidance for linear-Gaussian measurements.

:meth:`GaussianPrior.posterior` gives the exact posterior of a linear-Gaussian measurement (Kalman form, float64),
the reference the sampler tests compare against.
"""
from __future__ import annotations

from typing import Sequence

import torch

from reddiff.priors.base import Prior


class GaussianPrior(Prior):
    """``N(mean, cov)`` over samples of shape ``shape`` (flattened to ``n = prod(shape)`` internally).

    Args:
        dim: ``n`` for vector samples ``(B, n)``; or give ``shape`` (any sample shape, e.g. ``(1, 4, 4)``).
        shape: sample shape; overrides ``dim``.
        mean: ``(n,)`` (or ``shape``) mean; zeros if omitted.
        cov: ``None`` for the identity, ``(n,)`` for a diagonal covariance (variances >= 0), or ``(n, n)`` for a
            full symmetric positive-semidefinite covariance.
        schedule: the VP schedule (default: linear betas 1e-4..0.02, T = 1000).
    """

    name = "gaussian"

    def __init__(self, dim: int | None = None, shape: Sequence[int] | None = None, mean=None, cov=None,
                 schedule=None, dialect: str = "vp_discrete"):
        super().__init__(schedule, dialect)
        if shape is None:
            if dim is None:
                if mean is not None:
                    dim = torch.as_tensor(mean).numel()
                else:
                    raise ValueError("GaussianPrior needs dim, shape or mean")
            shape = (int(dim),)
        self.shape = tuple(int(s) for s in shape)
        n = 1
        for s in self.shape:
            n *= s
        if n <= 0:
            raise ValueError(f"GaussianPrior: empty shape {self.shape}")
        self.n = n
        m = torch.zeros(n, dtype=torch.float64) if mean is None else torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        if m.numel() != n:
            raise ValueError(f"GaussianPrior: mean has {m.numel()} entries, expected {n}")
        self.register_buffer("mean", m.clone())
        self.full = False
        if cov is None:
            self.register_buffer("var", torch.ones(n, dtype=torch.float64))
        else:
            c = torch.as_tensor(cov, dtype=torch.float64)
            if c.ndim == 1 or (c.ndim == 2 and c.shape == (n,) ):
                c = c.reshape(-1)
                if c.numel() != n or (c < 0).any():
                    raise ValueError(f"GaussianPrior: diagonal cov needs {n} non-negative variances")
                self.register_buffer("var", c.clone())
            elif c.ndim == 2 and c.shape == (n, n):
                if (c - c.T).abs().max() > 1e-10 * max(1.0, float(c.abs().max())):
                    raise ValueError("GaussianPrior: cov must be symmetric")
                lam, Q = torch.linalg.eigh(c)
                if lam.min() < -1e-10 * max(1.0, float(lam.abs().max())):
                    raise ValueError(f"GaussianPrior: cov is not positive semidefinite (min eigenvalue {float(lam.min()):.3g})")
                self.full = True
                self.register_buffer("lam", lam.clamp_min(0.0))
                self.register_buffer("Q", Q)
            else:
                raise ValueError(f"GaussianPrior: cov must be (n,) or (n, n) with n = {n}, got {tuple(c.shape)}")

    # ------------------------------------------------------------------ exact epsilon
    def _eps_alpha(self, x_t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Exact epsilon at ``alpha_bar = a`` (``(B,)``, any value in (0, 1]), in the dtype of ``x_t``."""
        B = x_t.shape[0]
        x = x_t.reshape(B, -1)
        if x.shape[1] != self.n:
            raise ValueError(f"GaussianPrior of shape {self.shape} got x_t of shape {tuple(x_t.shape)}")
        a = a.to(x).reshape(B, 1)
        mean = self.mean.to(x)
        r = x - a.sqrt() * mean
        if self.full:
            Q = self.Q.to(x)
            z = (r @ Q) / (a * self.lam.to(x) + (1 - a))
            e = (1 - a).sqrt() * (z @ Q.T)
        else:
            e = (1 - a).sqrt() * r / (a * self.var.to(x) + (1 - a))
        return e.reshape(x_t.shape)

    # ------------------------------------------------------------------ exact references
    @property
    def covariance(self) -> torch.Tensor:
        """The ``(n, n)`` covariance (float64)."""
        if self.full:
            return (self.Q * self.lam) @ self.Q.T
        return torch.diag(self.var)

    def sample(self, num: int, rng, dtype=torch.float32) -> torch.Tensor:
        """``num`` prior draws of shape ``(num, *shape)`` using ``rng`` (a :class:`reddiff.core.rng.BatchRNG`)."""
        z = rng.randn((num, self.n), dtype=torch.float64)
        if self.full:
            x = self.mean + (z * self.lam.sqrt()) @ self.Q.T
        else:
            x = self.mean + z * self.var.sqrt()
        return x.to(dtype).reshape((num,) + self.shape)

    def posterior(self, A, y: torch.Tensor, noise_std: float):
        """Exact posterior of ``y = A x0 + noise_std * e`` for each row of ``y`` (Kalman form, float64).

        Args:
            A: ``(m, n)`` matrix (tensor or anything with a ``matrix`` attribute such as
                :class:`reddiff.operators.matrix.MatrixOperator`).
            y: ``(B, m)`` measurements.
            noise_std: measurement-noise std (model units); 0 is allowed (a pseudo-inverse is then used for
                ``S = A Sigma A^T`` if it is singular).
        Returns:
            ``(mean (B, n), cov (n, n))`` in float64; the covariance does not depend on ``y``.
        """
        A = torch.as_tensor(getattr(A, "matrix", A), dtype=torch.float64).cpu()
        y = torch.as_tensor(y, dtype=torch.float64).cpu().reshape(y.shape[0], -1)
        Sig = self.covariance.cpu()
        S = float(noise_std) ** 2 * torch.eye(A.shape[0], dtype=torch.float64) + A @ Sig @ A.T
        S_inv = torch.linalg.pinv(S, hermitian=True)
        K = Sig @ A.T @ S_inv
        m = self.mean.cpu()
        mean = m + (y - m @ A.T) @ K.T
        cov = Sig - K @ A @ Sig
        return mean, 0.5 * (cov + cov.T)
