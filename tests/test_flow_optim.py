"""The flow2 solvers (baselines/flow: FlowChef, Flow-Priors) against what each method guarantees on an exact
Gaussian prior: FlowChef's chain equals its update written out with the closed-form Gaussian denoiser; Flow-Priors
converges (enough Adam steps per time) to the MAP of the posterior with noise variance 1 / (2 lmbda), which for a
Gaussian is the exact posterior mean, from any initial noise.  Plus one-line refusals of bad settings."""
from __future__ import annotations

import pytest
import torch

from gaussian_case import gaussian_draws, gaussian_problem
from reddiff import registry
from reddiff.core.rng import BatchRNG

torch.set_num_threads(1)


def gauss_denoiser(prior_mean, cov):
    """``D(x_e, sigma) = mu + Sigma (Sigma + sigma^2 I)^-1 (x_e - mu)``, written independently of the prior class."""
    eye = torch.eye(cov.shape[0], dtype=torch.float64)

    def D(x_e, sigma):
        return prior_mean + (x_e - prior_mean) @ torch.linalg.solve(cov + sigma ** 2 * eye, cov)
    return D


def test_flowchef_chain_equals_its_formula():
    """N = 4 Euler steps from t0 = min(1 - 1e-5, grid end), a gradient step s * grad mean((A x0_hat - y)^2) at
    x0_hat = x - t v before every step but the last, then x + (t' - t) v with the velocity before the step."""
    prior, op, y, _, _ = gaussian_problem()
    cov, Amat, _ = gaussian_draws()                                           # the case's prior and A
    Y = y[None].expand(3, -1).contiguous()
    N, s = 4, 0.2
    smp = registry.build_sampler("flowchef", steps=N, gradient_scale=s)
    out = smp.sample(Y, op, prior, BatchRNG([0, 1, 2]))
    D = gauss_denoiser(torch.zeros(6, dtype=torch.float64), cov)
    sig_max = float(prior.schedule.sigmas[-1])
    ts = [min((N - i) / N, 1 - 1e-5, sig_max / (1 + sig_max)) for i in range(N + 1)]
    x = smp.init_noise(BatchRNG([0, 1, 2]), Y, prior) * ts[0]
    for i in range(N):
        t = ts[i]
        d = D(x / (1 - t), t / (1 - t))
        v = (x - (1 - t) * d) / t - d
        if i < N - 1:
            x0 = x - t * v
            x = x - s * 2.0 / Y.shape[1] * (x0 @ Amat.T - Y) @ Amat
        x = x + (ts[i + 1] - t) * v
    assert (out - x).abs().max() < 1e-9
    assert (out - smp.init_noise(BatchRNG([0, 1, 2]), Y, prior)).abs().max() > 0.1   # the chain moved


def test_flow_priors_reaches_the_gaussian_map():
    """lmbda = 1 / (2 sigma_y^2), 50 Adam steps per time: four different initial noises all end at the exact
    posterior mean (the MAP) within 1 %."""
    sig = 0.3
    prior, op, y, mean, _ = gaussian_problem(sigma=sig)
    smp = registry.build_sampler("flow_priors", steps=100, inner_steps=50, lmbda=1 / (2 * sig ** 2), eta=0.05)
    X = smp.sample(y[None].expand(4, -1).contiguous(), op, prior, BatchRNG([0, 1, 2, 3]))
    err = (X - mean).norm(dim=1) / mean.norm()
    assert float(err.max()) < 0.01, err


@pytest.mark.parametrize("name,kw,match", [
    ("flowchef", {"gradient_scale": -1.0}, "gradient_scale"),
    ("flowchef", {"t_start": 1.0}, "t_start"),
    ("flow_priors", {"lmbda": float("nan")}, "lmbda"),
    ("flow_priors", {"inner_steps": 0}, "inner_steps"),
    ("d_flow", {"alpha": 2.0}, "alpha"),
    ("d_flow", {"steps": 0}, "steps"),
])
def test_bad_settings_refused_in_one_line(name, kw, match):
    with pytest.raises(ValueError, match=match) as e:
        registry.build_sampler(name, **kw)
    assert "\n" not in str(e.value)


def test_d_flow_is_measurement_consistent():
    """D-Flow without the regulariser (lmbda = 0) minimises ||A F(z) - y||^2 through the differentiated solve: with
    3 measurements of a 6-D Gaussian the output meets them to rounding (float64), from any start."""
    prior, op, y, _, _ = gaussian_problem()
    Y = y[None].expand(3, -1).contiguous()
    smp = registry.build_sampler("d_flow", lmbda=0.0, max_iter=1, lbfgs_iter=20)
    prior.reset_nfe()
    X = smp.sample(Y, op, prior, BatchRNG([0, 1, 2]))
    assert prior.nfe == smp.expected_nfe(prior) == 10 * 23
    res = (op.forward(X) - Y).norm(dim=1) / Y.norm(dim=1)
    assert float(res.max()) < 1e-8, res
    assert float((X[0] - X[1]).norm()) > 1e-3          # different starts, different consistent points


def test_d_flow_reaches_a_stationary_point_of_its_objective():
    """For a Gaussian prior the midpoint flow map is affine, F(z) = M z + c (read off the solver on the basis);
    the output's z = M^-1 (x - c) makes the gradient of ||A F(z) - y||^2 + lmbda (||z||^2/2 - (d-1) log ||z||)
    vanish (lmbda = 1, 40 evaluations), from three different starts."""
    prior, op, y, _, _ = gaussian_problem()
    cov, A, _ = gaussian_draws()
    lam, d = 1.0, 6
    smp = registry.build_sampler("d_flow", lmbda=lam, max_iter=2, lbfgs_iter=20)
    X = smp.sample(y[None].expand(3, -1).contiguous(), op, prior, BatchRNG([0, 1, 2]))
    E = torch.cat([torch.zeros(1, d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)])
    FE = smp.flow(prior, E)
    c, M = FE[0], (FE[1:] - FE[0]).T
    for z in torch.linalg.solve(M, (X - c).T).T:
        zg = z.clone().requires_grad_(True)
        n = zg.norm()
        J = ((A @ (M @ zg + c) - y) ** 2).sum() + lam * (0.5 * n ** 2 - (d - 1) * torch.log(n + 1e-5))
        (g,) = torch.autograd.grad(J, zg)
        assert float(g.norm()) < 1e-6, float(g.norm())
