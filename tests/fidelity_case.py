"""Helpers of the official-fidelity tests (tests/test_fidelity_*.py): a random-number source and a prior that
record what a sampler drew and where it evaluated the network, so that one step can be recomputed by hand from
the recorded state and noise (float64) and compared with the sampler's next state."""
from __future__ import annotations

import torch

from reddiff.core.rng import BatchRNG
from reddiff.operators.matrix import MatrixOperator
from reddiff.priors.gaussian import GaussianPrior


class RecordingRNG(BatchRNG):
    """A :class:`BatchRNG` that keeps every ``randn`` / ``rand`` draw, in order, as ``(kind, tensor)``."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.draws = []

    def randn(self, shape, dtype=torch.float32):
        out = super().randn(shape, dtype)
        self.draws.append(("randn", out.clone()))
        return out

    def rand(self, shape, dtype=torch.float32):
        out = super().rand(shape, dtype)
        self.draws.append(("rand", out.clone()))
        return out

    def normals(self):
        return [t for kind, t in self.draws if kind == "randn"]


class RecordingPrior(GaussianPrior):
    """A Gaussian prior that records ``(x_t, t, eps)`` of every network evaluation."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = []

    def _eps(self, x_t, t):
        out = super()._eps(x_t, t)
        self.calls.append((x_t.clone(), t, out.clone()))
        return out


def svd_case(d=5, m=3, sigma_y=0.2, s=(1.5, 0.4, 0.05), seed=0):
    """``(U (m, m), s (m,), V (d, d), operator)``: a dense operator with known factors (d - m missing directions)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s = torch.tensor(s, dtype=torch.float64)
    return U, s, V, MatrixOperator.from_svd(U, s, V, sigma_y=sigma_y)
