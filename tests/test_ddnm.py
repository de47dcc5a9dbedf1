"""DDNM / DDNM+ (baselines/ddnm.py): what the method guarantees.

* noiseless linear tasks: the result satisfies ``H x = y`` to float precision (SVD image operators, dense matrix);
* noiseless, standard-normal prior, ``eta = 0``: the range part is ``A^+ y`` and the null part follows the exact
  unconditional DDIM flow, so the samples converge to the exact posterior ``N(A^+ y, I - A^+ A)`` as steps grow;
* time travel with ``q(x_{t+l} | x_t)`` keeps that exactness, the official re-noising of the unprojected ``x0`` does not;
* DDNM+ (noisy y): on components where the diffusion noise dominates (``sig >= a sigma_y / s_i``) the state after
  one step is ``a yb_i + sqrt(sig^2 - a^2 c_i^2) z``: mean ``a yb_i`` and variance ``sig^2 - a^2 c_i^2``.
"""
from __future__ import annotations

import pytest
import torch

from reddiff.baselines.ddnm import DDNM, travel_schedule
from reddiff.registry import build_operator
from reddiff.operators.matrix import MatrixOperator
from reddiff.priors.gaussian import GaussianPrior
from reddiff.core.rng import BatchRNG

torch.set_num_threads(1)


def test_travel_schedule_counts_and_unit_steps():
    assert travel_schedule(5, 1, 1) == [4, 3, 2, 1, 0, -1]
    for n, l, r in [(10, 1, 2), (10, 2, 3), (12, 3, 2), (7, 2, 1)]:
        seq = travel_schedule(n, l, r)
        assert seq[0] == n - 1 and seq[-1] == -1
        assert all(abs(a - b) == 1 for a, b in zip(seq, seq[1:]))
        down = sum(1 for a, b in zip(seq, seq[1:]) if b < a)
        assert down == n + (r - 1) * l * len(range(0, n - l, l))


def test_nfe_counts_re_descents():
    prior = GaussianPrior(dim=3)
    smp = DDNM(steps=10, travel_length=2, travel_repeat=3)
    assert smp.expected_nfe(prior) == 10 + 2 * 2 * 4
    op = MatrixOperator(torch.randn(2, 3, dtype=torch.float64))
    prior.reset_nfe()
    smp.sample(torch.zeros(2, 2, dtype=torch.float64), op, prior, BatchRNG([0, 1]))
    assert prior.nfe == smp.expected_nfe(prior)


@pytest.mark.parametrize("task", ["sr4", "inpaint_box", "inpaint_random", "colorization", "deblur_gauss"])
def test_noiseless_image_tasks_satisfy_measurement(task):
    """Image SVD operators, float32: ``||H x - y||_inf`` at float precision, far below the prior sample's misfit."""
    shape = (3, 16, 16)
    op = build_operator(task, sigma_y=0.0).setup([0, 1], (2,) + shape, "cpu", torch.float32)
    x_true = torch.rand((2,) + shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
    y = op.forward(x_true)
    prior = GaussianPrior(shape=shape)
    x = DDNM(steps=8).sample(y, op, prior, BatchRNG([0, 1]))
    res = float((op.forward(x) - y).abs().max())
    free = float((op.forward(torch.randn_like(x)) - y).abs().max())
    assert res < 2e-5 * max(1.0, float(y.abs().max())), (task, res)
    assert free > 0.1


def test_noiseless_dense_matrix_to_rounding():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 6, generator=g, dtype=torch.float64)
    y = (A @ torch.randn(6, 4, generator=g, dtype=torch.float64)).T.contiguous()
    x = DDNM(steps=20, travel_length=2, travel_repeat=2).sample(y, MatrixOperator(A), GaussianPrior(dim=6),
                                                                BatchRNG([0, 1, 2, 3]))
    assert float((x @ A.T - y).abs().max()) < 1e-12


def _posterior_errors(smp, n=4000, seed=2):
    g = torch.Generator().manual_seed(seed)
    d, m = 6, 3
    A = torch.randn(m, d, generator=g, dtype=torch.float64)
    y1 = A @ torch.randn(d, generator=g, dtype=torch.float64)
    P = torch.linalg.pinv(A)
    mean, cov = P @ y1, torch.eye(d, dtype=torch.float64) - P @ A       # exact posterior, noiseless, N(0, I)
    X = smp.sample(y1[None].expand(n, m).contiguous(), MatrixOperator(A), GaussianPrior(dim=d),
                   BatchRNG(0, per_item=False))
    err_m = float((X.mean(0) - mean).norm() / cov.diag().sum().sqrt())
    err_c = float((torch.cov(X.T) - cov).norm() / cov.norm())
    return err_m, err_c


def test_noiseless_standard_gaussian_converges_with_steps():
    """eta = 0: covariance error 0.31 at 10 steps, 0.06 at 200 (Monte Carlo floor of 4000 samples ~0.05)."""
    m10, c10 = _posterior_errors(DDNM(steps=10, eta=0.0))
    m200, c200 = _posterior_errors(DDNM(steps=200, eta=0.0))
    print("ddnm noiseless N(0,I): steps 10", m10, c10, "steps 200", m200, c200)
    assert c200 < 0.1 and m200 < 0.05
    assert c10 > 2 * c200


def test_time_travel_forward_process_keeps_exactness_official_x0_does_not():
    mx, cx = _posterior_errors(DDNM(steps=100, eta=0.0, travel_length=2, travel_repeat=3, travel_from="xt"))
    mo, co = _posterior_errors(DDNM(steps=100, eta=0.0, travel_length=2, travel_repeat=3, travel_from="x0"))
    print("ddnm time travel: xt", mx, cx, "x0", mo, co)
    assert cx < 0.1 and mx < 0.05
    assert co > 0.3


class Recorder(GaussianPrior):
    """A Gaussian prior that records the states it is evaluated at."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen = []

    def _eps(self, x_t, t):
        self.seen.append(x_t.clone())
        return super()._eps(x_t, t)


def test_ddnm_plus_noise_dominated_components_follow_the_measurement():
    d, sig_y = 4, 0.3
    s = torch.tensor([0.1, 1.0, 0.01], dtype=torch.float64)   # c = sigma_y / s = 3, 0.3, 30
    U, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    op = MatrixOperator.from_svd(U, s, V, sigma_y=sig_y)
    y1 = torch.tensor([0.7, -1.2, 0.4], dtype=torch.float64)
    n = 20000
    prior = Recorder(dim=d)
    smp = DDNM(steps=4, eta=0.85)
    smp.sample(y1[None].expand(n, 3).contiguous(), op, prior, BatchRNG(0, per_item=False))
    t, s_next = smp.schedule(prior)[0]
    a_s = float(prior.schedule.alpha_bar_at(s_next))
    a, sig = a_s ** 0.5, (1 - a_s) ** 0.5
    c = sig_y / s
    yb = (U.T @ y1) / s
    xb = prior.seen[1] @ V                                             # V^T x_s after the first step
    for i in range(3):
        if sig >= a * c[i]:
            assert abs(float(xb[:, i].mean()) - a * float(yb[i])) < 4 * sig / n ** 0.5
            var = sig ** 2 - a ** 2 * float(c[i]) ** 2
            assert abs(float(xb[:, i].var()) / var - 1) < 0.05, (i, float(xb[:, i].var()), var)
    assert sig >= a * float(c[0]) > 0.7 * sig and sig < a * float(c[2])   # both regimes; c[0] near the boundary


def test_bad_arguments():
    with pytest.raises(ValueError, match="eta"):
        DDNM(eta=1.5)
    with pytest.raises(ValueError, match="travel_repeat"):
        DDNM(travel_repeat=0)
    with pytest.raises(ValueError, match="travel_from"):
        DDNM(travel_from="y")
    with pytest.raises(ValueError, match="travel_length"):
        DDNM(steps=4, travel_length=4, travel_repeat=2).schedule(GaussianPrior(dim=2))
