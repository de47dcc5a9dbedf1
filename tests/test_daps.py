"""DAPS (baselines/daps.py) against the exact Gaussian posterior.

With Tweedie's x0_hat (``ode_steps=1, ode_sigma_min=0``) DAPS's low-noise levels are unadjusted Langevin on the
posterior with step sigma_k^2, so mean and covariance errors shrink as the annealing levels grow; the exact inner
draw (``mcmc="exact"``) is the limit of infinitely many Langevin steps.  With a many-step ODE x0_hat the chain
instead targets the posterior of a prior with twice the covariance (module docstring), which is checked too.
"""
from __future__ import annotations

import math

import pytest
import torch

from reddiff.baselines.daps import DAPS, gaussian_conditional, poly_grid, snap, ula_gaussian, ve_sigmas
from reddiff.operators.matrix import MatrixOperator
from reddiff.priors.gaussian import GaussianPrior
from reddiff.core.rng import BatchRNG

from gaussian_case import gaussian_draws  # noqa: E402 - tests/ helper

torch.set_num_threads(1)
N = 3000


def problem(scale: float = 1.0):
    cov, A, y = gaussian_draws()
    d = cov.shape[0]
    return GaussianPrior(dim=d, cov=cov), GaussianPrior(dim=d, cov=scale * cov), MatrixOperator(A, sigma_y=0.3), A, y


def errors(smp, prior, op, A, y, ref_prior=None):
    X = smp.sample(y[None].expand(N, -1).contiguous(), op, prior, BatchRNG(0, per_item=False)).double()
    mean, cov = (ref_prior or prior).posterior(A, y[None], 0.3)
    mean, cov = mean.reshape(-1), cov.reshape(X.shape[1], -1)
    return (float((X.mean(0) - mean).norm() / cov.diag().sum().sqrt()),
            float((torch.cov(X.T) - cov).norm() / cov.norm()))


TWEEDIE = dict(ode_steps=1, ode_sigma_min=0.0, sigma_max=20.0, sigma_min=0.05, tau=None)


def test_errors_shrink_with_annealing_levels_exact_inner():
    prior, _, op, A, y = problem()
    errs = [errors(DAPS(steps=s, mcmc="exact", **TWEEDIE), prior, op, A, y) for s in (20, 60, 200)]
    print("daps exact-inner (mean, cov) errors at 20/60/200 levels:", errs)
    for (m0, c0), (m1, c1) in zip(errs, errs[1:]):
        assert m1 < m0 and c1 < c0
    assert errs[-1][0] < 0.07 and errs[-1][1] < 0.09


@pytest.mark.parametrize("impl", ["loop", "closed_form"])
def test_errors_shrink_with_langevin_steps(impl):
    """The official inner Langevin chain (step by step, and as its closed-form law): more steps -> closer to the
    exact posterior."""
    prior, _, op, A, y = problem()
    kw = dict(steps=60, lr=0.005, lr_min_ratio=0.3, langevin_impl=impl, **TWEEDIE)
    errs = [errors(DAPS(langevin_steps=k, **kw), prior, op, A, y) for k in (2, 30)]
    print("daps Langevin (mean, cov) errors at 2/30 inner steps:", errs)
    assert errs[1][0] < errs[0][0] and errs[1][1] < errs[0][1]
    assert errs[1][0] < 0.16 and errs[1][1] < 0.12


def test_ode_x0hat_targets_a_tempered_prior():
    """The multi-step ODE endpoint shrinks x_sigma by ~1/sqrt(1 + sigma^2/lambda): half the prior's drift, so the
    output matches the posterior under prior covariance 2 Sigma far better than the true one."""
    prior, prior2, op, A, y = problem(scale=2.0)
    smp = DAPS(steps=120, ode_steps=8, sigma_max=20.0, sigma_min=0.05, mcmc="exact", tau=None)
    true_m, true_c = errors(smp, prior, op, A, y)
    temp_m, temp_c = errors(smp, prior, op, A, y, ref_prior=prior2)
    print("daps 8-step ODE: cov error vs true", true_c, "vs 2*Sigma", temp_c)
    assert true_c > 0.4 and temp_c < 0.2


def test_gaussian_conditional_is_exact():
    """The exact inner draw has the Kalman mean and covariance of N(m, r2 I) x exp(-prec/2 ||y - A x||^2)."""
    _, _, op, A, y = problem()
    d = A.shape[1]
    m = torch.linspace(-1, 1, d, dtype=torch.float64)
    r2, prec = 0.5, 4.0
    X = gaussian_conditional(m[None].expand(20000, d).contiguous(), r2, prec, y[None].expand(20000, -1).contiguous(),
                             op, BatchRNG(3, per_item=False))
    P = torch.eye(d, dtype=torch.float64) / r2 + prec * A.T @ A
    C = torch.linalg.inv(P)
    mu = C @ (m / r2 + prec * A.T @ y)
    assert float((X.mean(0) - mu).abs().max()) < 5 * math.sqrt(float(C.diag().max()) / 20000)
    assert float((torch.cov(X.T) - C).abs().max()) < 0.03 * float(C.diag().max())


def ula_case():
    """An inner-chain target with large steps (lr p up to 1.5) and few of them (5), so the law after the steps is
    far from both the start and the exact conditional: ``(op, A, y, m, r2, prec, lr, n)``."""
    _, _, op, A, y = problem()
    m = torch.linspace(-1, 1, A.shape[1], dtype=torch.float64)
    r2, prec = 0.5, 4.0
    lr = 1.5 / (1 / r2 + prec * float(torch.linalg.matrix_norm(A, 2)) ** 2)
    return op, A, y, m, r2, prec, lr, 5


def ula_moments(A, y, m, r2, prec, lr, n):
    """Mean and covariance after ``n`` steps of ``x <- x + lr grad log pi(x) + sqrt(2 lr) z`` from ``m``, by
    propagating the moments of the (linear) recursion in dense form."""
    d = A.shape[1]
    I = torch.eye(d, dtype=torch.float64)
    M = I - lr * (I / r2 + prec * A.T @ A)
    c = lr * (m / r2 + prec * A.T @ y)
    mean, cov = m.clone(), torch.zeros(d, d, dtype=torch.float64)
    for _ in range(n):
        mean, cov = M @ mean + c, M @ cov @ M.T + 2 * lr * I
    return mean, cov


def test_ula_closed_form_has_the_law_of_the_steps():
    """:func:`ula_gaussian` draws from the law of n Langevin steps (moments propagated exactly), which is neither
    the start nor the exact conditional (checked: the tolerance separates them)."""
    op, A, y, m, r2, prec, lr, n = ula_case()
    B, d = 40000, A.shape[1]
    X = ula_gaussian(m[None].expand(B, d).contiguous(), r2, prec, lr, n, y[None].expand(B, -1).contiguous(), op,
                     BatchRNG(5, per_item=False))
    mean, cov = ula_moments(A, y, m, r2, prec, lr, n)
    scale = float(cov.diag().max())
    tol_m, tol_c = 5 * math.sqrt(scale / B), 0.03 * scale
    assert float((X.mean(0) - mean).abs().max()) < tol_m
    assert float((torch.cov(X.T) - cov).abs().max()) < tol_c
    exact_cov = torch.linalg.inv(torch.eye(d, dtype=torch.float64) / r2 + prec * A.T @ A)
    m_inf, cov_inf = ula_moments(A, y, m, r2, prec, lr, 400)
    assert float((cov_inf - exact_cov).abs().max()) > 3 * tol_c      # the step-size bias is visible
    assert float((m_inf - mean).abs().max()) > 10 * tol_m             # and 5 steps are far from stationary


def test_daps_loop_and_closed_form_agree_in_law():
    """The sampler end to end (three annealing levels, 5 large Langevin steps each): the step-by-step chain and
    the closed form give the same mean and covariance within Monte Carlo error."""
    prior, _, op, A, y = problem()
    B = 20000
    kw = dict(steps=3, ode_steps=1, ode_sigma_min=0.0, sigma_max=2.0, sigma_min=0.5, langevin_steps=5, lr=0.005,
              lr_min_ratio=1.0, tau=None)
    yb = y[None].expand(B, -1).contiguous()
    X = {impl: DAPS(langevin_impl=impl, **kw).sample(yb, op, prior, BatchRNG(i, per_item=False)).double()
         for i, impl in enumerate(("loop", "closed_form"))}
    c_loop = torch.cov(X["loop"].T)
    scale = float(c_loop.diag().max())
    assert float((X["loop"].mean(0) - X["closed_form"].mean(0)).abs().max()) < 5 * math.sqrt(2 * scale / B)
    assert float((torch.cov(X["closed_form"].T) - c_loop).abs().max()) < 0.04 * scale


def test_langevin_impl_choice():
    _, _, op, _, _ = problem()
    assert DAPS().closed_form(op) and not DAPS(langevin_impl="loop").closed_form(op)
    assert not DAPS(mcmc="exact").closed_form(op)
    from reddiff import registry
    phase = registry.build_operator("phase_retrieval")
    assert not DAPS().closed_form(phase)
    with pytest.raises(Exception, match="svd"):
        DAPS(langevin_impl="closed_form").check(phase)
    with pytest.raises(ValueError, match="langevin_impl"):
        DAPS(langevin_impl="fast")


def test_schedule_snapping_and_nfe():
    prior, _, _, _, _ = problem()
    sig = ve_sigmas(prior.schedule)
    assert snap(float(sig[123]), sig) == 123
    g = poly_grid(100.0, 0.1, 201)
    assert g[0] == pytest.approx(100.0) and g[-1] == pytest.approx(0.1) and all(a > b for a, b in zip(g, g[1:]))
    smp = DAPS()
    plan = smp.plan(prior)
    assert len(plan) == 200 and plan[-1][3] == 0.0
    assert all(pts[0][0] == t for t, _, pts, _ in plan)
    assert smp.expected_nfe(prior) == sum(len(p) - 1 for *_, p, _ in plan) <= 1000


def test_bad_arguments_refused():
    for kw in (dict(steps=0), dict(sigma_min=200.0), dict(ode_sigma_min=0.5), dict(lr=-1.0), dict(mcmc="hmc"),
               dict(tau=0.0), dict(lr_min_ratio=0.0), dict(langevin_steps=-1)):
        with pytest.raises(ValueError, match="daps"):
            DAPS(**kw)
    prior, _, _, _, _ = problem()
    with pytest.raises(ValueError, match="sigma_max"):
        DAPS(sigma_max=1e4).plan(prior)
    noiseless = MatrixOperator(torch.eye(6, dtype=torch.float64)[:3], sigma_y=0.0)
    with pytest.raises(ValueError, match="noiseless|noisy"):
        DAPS(tau=None, steps=2).sample(torch.zeros(1, 3), noiseless, prior, BatchRNG([0]))


@pytest.mark.parametrize("mcmc,impl", [("exact", "auto"), ("langevin", "closed_form"), ("langevin", "loop")])
def test_per_item_tau_on_images_batch_equals_loop(mcmc, impl):
    """Per-item tau and lr on an image operator (sr4): a batch of two equals each image alone (the per-item
    coefficients reach the spectral draws with the right shape)."""
    from reddiff import registry

    prior = GaussianPrior(shape=(3, 16, 16))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def run(idx, tau, lr):
        op = registry.build_operator("sr4", sigma_y=0.05).setup(idx, (len(idx), 3, 16, 16), "cpu", torch.float32)
        smp = DAPS(steps=3, ode_steps=1, langevin_steps=4, mcmc=mcmc, langevin_impl=impl, tau=tau, lr=lr)
        return smp.sample(op.forward(x[idx]), op, prior, BatchRNG.for_images(3, idx))

    both = run([0, 1], [0.1, 0.3], [1e-4, 3e-4])
    alone = torch.cat([run([0], [0.1], [1e-4]), run([1], [0.3], [3e-4])])
    assert torch.allclose(both, alone, atol=1e-5) and not torch.allclose(both[0], both[1])


# ------------------------------------------------------------------------------------------ network time input
class _ToyEps(GaussianPrior):
    """An epsilon 'network' that depends on its time input, so the time-input convention is visible."""

    def _eps_time(self, x_t, tau):
        return 0.3 * x_t + 1e-3 * torch.as_tensor(tau, dtype=x_t.dtype).reshape(-1, 1)


def test_official_time_input_is_vpprecond_at_the_levels_as_they_are():
    """compat.daps_time_input=vp_continuous: the ODE points are DAPS's own sigma levels (no snapping) and the
    network sees EDM VPPrecond's c_noise = 999 sigma_inv(sigma), c_in = 1/sqrt(1 + sigma^2), D = x - sigma F
    (DAPS model/precond.py:48-51, 67-69); one Euler step x + (s' - s)(x - D)/s, computed here from that formula."""
    prior = _ToyEps(dim=3)
    d = DAPS(steps=4, ode_steps=2, sigma_max=20.0, sigma_min=0.5, ode_sigma_min=0.05, time_input="vp_continuous")
    plan = d.plan(prior)
    assert [s for _, s, _, _ in plan] == poly_grid(20.0, 0.5, 5, 7.0)[:-1]  # not snapped
    _, s0, pts, _ = plan[0]
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = x.clone()
    for (_, s), (_, s1) in zip(pts[:-1], pts[1:]):
        c_noise = 999 * (math.sqrt(0.1 ** 2 + 2 * 19.9 * math.log(1 + s * s)) - 0.1) / 19.9
        F = 0.3 * ref / math.sqrt(1 + s * s) + 1e-3 * c_noise
        D = ref - s * F
        ref = ref + (s1 - s) * (ref - D) / s
    prior.reset_nfe()
    got = d._ode(x, pts, prior)
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    assert prior.nfe == len(pts) - 1
    grid = DAPS(steps=4, ode_steps=2, sigma_max=20.0, sigma_min=0.5, ode_sigma_min=0.05)
    assert not torch.allclose(grid._ode(x, grid.plan(prior)[0][2], prior), ref, atol=1e-4)  # ours snaps


def test_time_input_is_validated_and_counted():
    with pytest.raises(ValueError, match="time_input must be one of grid, continuous, vp_continuous"):
        DAPS(time_input="edm")
    prior = _ToyEps(dim=3)
    op = MatrixOperator(torch.eye(2, 3, dtype=torch.float64), sigma_y=0.1)
    y = torch.zeros(2, 2, dtype=torch.float64)
    for ti in ("continuous", "vp_continuous"):
        d = DAPS(steps=5, ode_steps=3, langevin_steps=2, lr=1e-3, tau=None, time_input=ti)
        prior.reset_nfe()
        d.sample(y, op, prior, BatchRNG([0, 1]))
        assert prior.nfe == d.expected_nfe(prior) == 15


# ------------------------------------------------------------------------------------------ nonlinear operators
def _centred_dft(m: int):
    """The 1-D centred orthonormal DFT matrix ``fftshift(fft(ifftshift(.), norm='ortho'))`` (numpy): the 2-D one,
    fastMRI's ``fft2c_new`` (DAPS forward_operator/fastmri_utils.py:67-89), is ``F X F^T``."""
    import numpy as np

    eye = np.eye(m)
    return np.stack([np.fft.fftshift(np.fft.fft(np.fft.ifftshift(eye[k]), norm="ortho")) for k in range(m)], 1)


def _loss_grad(task: str, op, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``grad_z sum (A(z) - y)^2`` written out by hand (no autograd, no torch FFT), float64."""
    import numpy as np

    if task == "hdr":                                   # A(z) = clip(2 z, -1, 1)
        a = 2.0 * z
        return 2.0 * (a.clamp(-1, 1) - y) * 2.0 * (a.abs() < 1).double()
    p, n = op.pad, z.shape[-1]                          # A(z) = |F pad(z) F^T|
    F = _centred_dft(n + 2 * p)
    zp = np.pad(z.numpy(), ((0, 0), (0, 0), (p, p), (p, p)))
    U = F @ zp @ F.T
    G = 2.0 * (np.abs(U) - y.numpy()) * U / np.abs(U)   # d loss = Re <G, dU>
    g = np.real(F.conj().T @ G @ F.conj())              # adjoint of X -> F X F^T, then real part
    return torch.from_numpy(g[..., p:p + n, p:p + n].copy())


@pytest.mark.parametrize("task", ["hdr", "phase_retrieval"])
def test_langevin_loop_on_a_nonlinear_operator_is_the_official_step(task):
    """The ``langevin_impl=loop`` chain on a nonlinear operator, every state recomputed from the official step
    (zhangbingliang2019/DAPS @098df6b): the chain starts at x0hat (cores/mcmc.py:149); score = data + xt + prior
    terms (:46-50) = -grad loss / tau^2 + (xt - x) / sigma^2 + (x0hat - xt) / sigma^2 (prior_solver 'gaussian',
    :71-72, the official pixel configs), loss = sum (A(x) - y)^2 (forward_operator/__init__.py:88, its gradient
    :102-104); x <- x + lr score + sqrt(2 lr) eps (:88); lr = lr0 (1 + ratio (lr_min_ratio - 1)) (:174-180) with
    ratio = step / (N + 1) (sampler.py:73, cores/scheduler.py:39); then x_{k+1} = x0y + sigma_{k+1} n
    (sampler.py:76-79).  Float64, two levels, three Langevin steps each, two images."""
    from fidelity_case import RecordingPrior, RecordingRNG
    from reddiff import registry

    shape = (2, 3, 8, 8)
    g = torch.Generator().manual_seed(4)
    prior = RecordingPrior(shape=shape[1:])
    op = registry.build_operator(task).setup(None, shape, dtype=torch.float64)
    x_true = 1.6 * torch.rand(shape, generator=g, dtype=torch.float64) - 0.8
    y = op.forward(x_true)
    y = y + 0.05 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    lr0, ratio, tau, steps, n_lgv = 2e-3, 0.2, 0.3, 2, 3
    d = DAPS(steps=steps, ode_steps=1, ode_sigma_min=0.0, sigma_max=2.0, sigma_min=0.5, langevin_steps=n_lgv,
             lr=lr0, lr_min_ratio=ratio, tau=tau, langevin_impl="loop", log_every=1)
    rng, seen = RecordingRNG([0, 1]), []
    out = d.sample(y, op, prior, rng, callback=lambda k, info: seen.append(info["x0"].clone()))
    normals = iter(rng.normals())
    plan = d.plan(prior)
    xt = plan[0][1] * next(normals)
    no_data_gap = 0.0
    for k, (t, s, pts, s_next) in enumerate(plan):
        assert [p[0] for p in pts] == [t, -1]                       # one Euler step to sigma = 0: Tweedie
        x_in, t_in, eps = prior.calls[k]
        a = float(prior.schedule.alpha_bar_at(t))
        assert bool((torch.as_tensor(t_in) == t).all()) and torch.allclose(x_in, math.sqrt(a) * xt, rtol=0, atol=1e-12)
        x0hat = xt - s * eps
        lr = lr0 * (1.0 + (k / (steps + 1)) * (ratio - 1.0))
        x, x_nodata = x0hat.clone(), x0hat.clone()
        for _ in range(n_lgv):
            e = next(normals)
            score = -_loss_grad(task, op, x, y) / tau ** 2 + (xt - x) / s ** 2 + (x0hat - xt) / s ** 2
            x = x + lr * score + math.sqrt(2 * lr) * e
            x_nodata = x_nodata + lr * (x0hat - x_nodata) / s ** 2 + math.sqrt(2 * lr) * e
        assert torch.allclose(seen[k], x, rtol=0, atol=1e-12), float((seen[k] - x).abs().max())
        no_data_gap = max(no_data_gap, float((x - x_nodata).abs().max()))
        xt = x + s_next * next(normals) if s_next > 0 else x
    assert next(normals, None) is None and len(prior.calls) == steps
    assert torch.allclose(out, xt, rtol=0, atol=1e-12)
    assert no_data_gap > 1e-3                                       # the nonlinear data term moves the chain
