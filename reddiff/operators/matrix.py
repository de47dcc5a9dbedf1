"""A dense-matrix linear operator for vector signals ``(B, d)``, with its SVD.

Used by the tests and by the Gaussian-mixture benchmark, where the exact posterior is known.  The matrix is
small (``m x d`` with ``d`` up to a few thousand), so the SVD pieces are dense matrices here; the image
operators apply theirs implicitly.

``H = U diag(s) V^T`` with ``U`` (m x m) and ``V`` (d x d) orthogonal and ``s`` the ``k = min(m, d)``
singular values in descending order.  Singular values below ``rcond * s_max`` are set to exactly zero, so
the pseudo-inverse of a rank-deficient matrix is the true Moore-Penrose one (not 1/1e-8).

Vectors are rows: ``Vt(x) = x @ V``, ``V(z) = z @ V^T``, ``Ut(y) = y @ U``, ``U(z) = z @ U^T``.
``value_range = 1``: ``sigma_y`` is the noise std in model units (no factor 2 as for [-1, 1] images).
"""
from __future__ import annotations

import torch

from reddiff.operators.base import SVDOperator


class MatrixOperator(SVDOperator):
    """``y = A x`` for ``x`` of shape ``(B, d)`` and a dense ``A`` of shape ``(m, d)``.

    Args:
        A: the matrix, ``(m, d)`` (tensor, array or nested list). Kept in float64 (rebuilt from its SVD with
            the truncated singular values); cast to the input's dtype/device on use and cached.
        sigma_y: measurement-noise std (model units, since ``value_range = 1``).
        rcond: singular values ``<= rcond * max(s)`` are treated as exact zeros.
    """

    name = "matrix"

    def __init__(self, A, sigma_y: float = 0.0, rcond: float = 1e-6):
        super().__init__(sigma_y=sigma_y, value_range=1.0)
        A = torch.as_tensor(A, dtype=torch.float64).detach().cpu()
        if A.ndim != 2 or A.shape[0] == 0 or A.shape[1] == 0:
            raise ValueError(f"MatrixOperator needs a non-empty 2-D matrix (m, d), got shape {tuple(A.shape)}")
        if not torch.isfinite(A).all():
            raise ValueError("MatrixOperator: A has non-finite entries")
        U, s, Vh = torch.linalg.svd(A, full_matrices=True)
        self._set(A, U, s, Vh.T, rcond)

    @classmethod
    def from_svd(cls, U, s, V, sigma_y: float = 0.0, rcond: float = 1e-6) -> "MatrixOperator":
        """Build ``A = U[:, :k] diag(s) V[:, :k]^T`` from given factors without recomputing the SVD.

        ``U`` is ``(m, m)`` and ``V`` is ``(d, d)``, both orthogonal; ``s`` has ``k = min(m, d)`` entries,
        non-negative (any order; they are kept in the given order, paired with the columns of ``U``/``V``).
        """
        U = torch.as_tensor(U, dtype=torch.float64).detach().cpu()
        V = torch.as_tensor(V, dtype=torch.float64).detach().cpu()
        s = torch.as_tensor(s, dtype=torch.float64).detach().cpu().reshape(-1)
        m, d = U.shape[0], V.shape[0]
        if U.shape != (m, m) or V.shape != (d, d):
            raise ValueError(f"from_svd: U must be (m, m) and V (d, d), got {tuple(U.shape)} and {tuple(V.shape)}")
        k = min(m, d)
        if s.numel() != k or (s < 0).any():
            raise ValueError(f"from_svd: need {k} non-negative singular values, got {s.tolist()}")
        for name, Q in (("U", U), ("V", V)):
            err = (Q.T @ Q - torch.eye(Q.shape[0], dtype=torch.float64)).abs().max()
            if err > 1e-8:
                raise ValueError(f"from_svd: {name} is not orthogonal (max |Q^T Q - I| = {float(err):.2e})")
        A = (U[:, :k] * s) @ V[:, :k].T
        op = cls.__new__(cls)
        SVDOperator.__init__(op, sigma_y=sigma_y, value_range=1.0)
        op._set(A, U, s, V, rcond)
        return op

    def _set(self, A, U, s, V, rcond):
        self.m, self.d = A.shape
        self.x_shape = (self.d,)
        smax = float(s.max()) if s.numel() else 0.0
        s = torch.where(s > rcond * smax, s, torch.zeros_like(s))
        k = s.numel()
        # forward uses the truncated matrix, so forward == U diag(s) V^T holds exactly (up to rounding)
        A = (U[:, :k] * s) @ V[:, :k].T
        self._A64, self._U64, self._s64, self._V64 = A, U, s, V
        self._cache: dict = {}

    # ------------------------------------------------------------------ helpers
    def _get(self, like: torch.Tensor):
        key = (like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = tuple(t.to(dtype=like.dtype, device=like.device)
                                     for t in (self._A64, self._U64, self._s64, self._V64))
        return self._cache[key]

    def _check_x(self, x: torch.Tensor):
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"MatrixOperator expects x of shape (B, {self.d}), got {tuple(x.shape)}")

    def _check_y(self, y: torch.Tensor):
        if y.ndim != 2 or y.shape[1] != self.m:
            raise ValueError(f"MatrixOperator expects y of shape (B, {self.m}), got {tuple(y.shape)}")

    @property
    def matrix(self) -> torch.Tensor:
        """The dense ``A`` (float64, with the rcond-truncated singular values)."""
        return self._A64

    # ------------------------------------------------------------------ protocol
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        A = self._get(x)[0]
        return x @ A.T

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self._check_y(y)
        A = self._get(y)[0]
        return y @ A

    def Vt(self, x: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        return x @ self._get(x)[3]

    def V(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.d:
            raise ValueError(f"V expects (B, {self.d}), got {tuple(z.shape)}")
        return z @ self._get(z)[3].T

    def Ut(self, y: torch.Tensor) -> torch.Tensor:
        self._check_y(y)
        return y @ self._get(y)[1]

    def U(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.m:
            raise ValueError(f"U expects (B, {self.m}), got {tuple(z.shape)}")
        return z @ self._get(z)[1].T

    def singulars(self) -> torch.Tensor:
        """``(k,)`` singular values, float64 (callers cast with ``.to(x)``); zeros where truncated."""
        return self._s64

    def y_numel(self) -> int:
        return self.m
