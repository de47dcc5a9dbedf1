"""EnKG (baselines/pixel/enkg.py) and the black-box task: one ensemble-Kalman step equals its closed form for a
linear operator, the quantize operator and its capability, the refusal of every sampler that differentiates the
data term, and EnKG on a black-box operator.  The generic contract tests run from tests/test_sampler_contract.py."""
from __future__ import annotations

import pytest
import torch

from reddiff import registry
from reddiff.core.rng import BatchRNG
from reddiff.operators.base import Operator, OperatorCapabilityError

from gaussian_case import gmm_problem  # noqa: E402 - tests/ helper

torch.set_num_threads(1)
NAME = "enkg"


def test_kalman_step_is_the_covariance_preconditioned_step():
    """For linear ``H``: ``x_j - g / ||C||_F  Cov(x, x0) H^T (H x0_j - y)`` (empirical cross-covariance of the
    ensemble, 1/J), per item.  Broken on purpose (2026-12-06): the measurements not centred (``ys`` instead of
    ``ys - mean(ys)`` in ``C``: the same direction, another ``||C||_F``) gave a difference of 0.033 and this test
    failed.  Not caught, and
    not a bug: the particles not centred (``sum_k C_jk = 0`` once the measurements are)."""
    g = torch.Generator().manual_seed(3)
    J, B, n, m = 7, 2, 5, 3
    H = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(J, B, n, generator=g, dtype=torch.float64)
    x0 = x + 0.3 * torch.randn(J, B, n, generator=g, dtype=torch.float64)
    y = torch.randn(B, m, generator=g, dtype=torch.float64)
    smp = registry.build_sampler(NAME, guidance_scale=1.5)
    got = smp.kalman_step(x, x0 @ H.T, y, 1.5)
    for b in range(B):
        X, X0 = x[:, b], x0[:, b]
        cxx0 = (X - X.mean(0)).T @ (X0 - X0.mean(0)) / J              # (n, n)
        E = X0 @ H.T - y[b]                                             # (J, m)
        C = E @ ((X0 - X0.mean(0)) @ H.T).T / J                         # (J, J)
        ref = X - 1.5 / torch.linalg.matrix_norm(C) * (E @ H @ cxx0.T)
        assert (got[:, b] - ref).abs().max() < 1e-12


def test_quantize_operator():
    op = registry.build_operator("quantize").setup([0], (1, 3, 8, 8))
    x = torch.linspace(-1.3, 1.3, 192).reshape(1, 3, 8, 8)
    y = op.forward(x)
    levels = torch.linspace(-1, 1, 8)
    assert ((y[..., None] - levels).abs().min(-1).values < 1e-6).all()
    assert (y - x.clamp(-1, 1)).abs().max() <= 1 / 7 + 1e-6
    assert torch.equal(op.pinv(y), y) and not op.differentiable and not op.has("grad")


def test_samplers_that_differentiate_the_data_term_refuse_a_black_box_task():
    """Every registered sampler whose ``requires`` holds "grad" refuses ``quantize`` in one line before any work;
    EnKG requires nothing of it."""
    op = registry.build_operator("quantize")
    refused = []
    for name in registry.sampler_names():
        smp = registry.build_sampler(name)
        if "grad" in smp.requires:
            with pytest.raises(OperatorCapabilityError, match=f"{name} needs an operator with grad") as e:
                smp.check(op)
            assert "\n" not in str(e.value)
            refused.append(name)
    assert {"dps", "reddiff", "sitcom"} <= set(refused) and NAME not in refused


class VectorQuantize(Operator):
    """A vector black box: ``round(4 A x) / 4`` (no useful gradient)."""

    name = "vq"
    differentiable = False

    def __init__(self, A):
        super().__init__(sigma_y=0.0, value_range=1.0)
        self.A = A

    def forward(self, x):
        return torch.round(4 * x @ self.A.T.to(x)) / 4

    def pinv(self, y):
        return torch.linalg.pinv(self.A).to(y) @ y


def test_runs_on_a_black_box_operator_and_counts_nfe():
    prior, mop, _ = gmm_problem()
    op = VectorQuantize(torch.randn(2, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    x = prior.sample(2, torch.Generator().manual_seed(1))
    y = op.forward(x)
    smp = registry.build_sampler(NAME, steps=12, particles=6, guidance_scale=0.5)
    prior.reset_nfe()
    out = smp.sample(y, op, prior, BatchRNG([0, 1]))
    assert torch.isfinite(out).all() and out.shape == x.shape
    assert prior.nfe == smp.expected_nfe(prior) > 12 * 6


def test_bad_arguments():
    for kw in ({"particles": 1}, {"guidance_scale": 0.0}, {"threshold_start": 1.5}, {"factor": 0},
               {"sigma_min": 100.0}, {"draws_per_system": -1}):
        with pytest.raises(ValueError, match=NAME):
            registry.build_sampler(NAME, **kw)
