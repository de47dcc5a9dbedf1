"""The flow solvers (baselines/flow: pnp_flow, ot_ode, flowdps) against what each method guarantees, with exact
Gaussian denoisers written out here (independent of the prior classes), and RED-diff on a flow prior.

* OT-ODE: exact posterior for a standard-normal prior (the generic ``exact_gaussian`` test of
  tests/test_sampler_contract.py); here its guidance vector against the dense formula.
* PnP-Flow, FlowDPS (neither is a posterior sampler): a whole short chain against a reference implementation of
  the paper's update on the same random draws.
* Every one: runs on a flow-format checkpoint (the flow dialect) with NFE counted; nonlinear tasks refused in one line.
"""
from __future__ import annotations

import pytest
import torch

from reddiff import registry
from reddiff.core.rng import BatchRNG
from reddiff.operators.base import OperatorCapabilityError
from reddiff.operators.matrix import MatrixOperator
from reddiff.priors.gaussian import GaussianPrior
from reddiff.priors.gmm import GaussianMixturePrior

torch.set_num_threads(1)
F64 = torch.float64
FLOW = ("pnp_flow", "ot_ode", "flowdps")


def gaussian_case(seed=3, d=5, m=3, sigma=0.2):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(d, d, generator=g, dtype=F64)
    cov = L @ L.T / d + 0.3 * torch.eye(d, dtype=F64)
    A = torch.randn(m, d, generator=g, dtype=F64) / d ** 0.5
    y = torch.randn(2, m, generator=g, dtype=F64)
    return GaussianPrior(dim=d, cov=cov), cov, MatrixOperator(A, sigma_y=sigma), A, y


def exact_denoiser(cov):
    """``D(x_e, sigma) = Sigma (Sigma + sigma^2 I)^{-1} x_e`` of N(0, Sigma)."""
    eye = torch.eye(cov.shape[0], dtype=F64)
    return lambda xe, s: xe @ torch.linalg.solve(cov + s * s * eye, cov)


def s_cap(prior):
    sm = float(prior.schedule.sigmas[-1])
    return sm / (1 + sm)


def test_pnp_flow_chain_equals_reference():
    """x <- mean_m D(z + sigma_k n_m, sigma_k), z = x - lr s_k^alpha A^T (A x - y), s_k = 1 - k / N (paper Alg. 1)."""
    prior, cov, op, A, y = gaussian_case()
    D = exact_denoiser(cov)
    N, M, lr, alpha = 4, 3, 0.7, 0.5
    smp = registry.build_sampler("pnp_flow", steps=N, num_samples=M, lr=lr, alpha=alpha)
    out = smp.sample(y, op, prior, BatchRNG(7, per_item=False))
    rng = BatchRNG(7, per_item=False)
    x = torch.ones_like(y) @ A
    for k in range(N):
        s = 1 - k / N
        z = x - lr * s ** alpha * (x @ A.T - y) @ A
        sc = min(s, s_cap(prior))
        sig = sc / (1 - sc)
        x = sum(D(z + sig * rng.randn(z.shape, dtype=F64), sig) for _ in range(M)) / M
    assert torch.allclose(out, x, rtol=0, atol=1e-10), (out - x).abs().max()


@pytest.mark.parametrize("form", ["adjoint", "pinv"])
def test_flowdps_chain_equals_reference(form):
    """FlowDPS (paper Alg. 1; sd3_sampler.py SD3FlowDPS) with the data gradient written in closed form:
    grad ||R y - R A x|| = -(R A)^T r / ||r||, R = A^T or A^+."""
    prior, cov, op, A, y = gaussian_case()
    D = exact_denoiser(cov)
    N, K, step = 5, 3, 0.2
    smp = registry.build_sampler("flowdps", steps=N, step_size=step, inner_steps=K, consistency=form)
    out = smp.sample(y, op, prior, BatchRNG(9, per_item=False))
    R = A.T if form == "adjoint" else torch.linalg.pinv(A)
    RA = R @ A
    u = torch.linspace(1, 3e-3 / 1.002, N, dtype=F64)
    grid = (4 * u / (1 + 3 * u)).tolist() + [0.0]
    assert torch.allclose(torch.tensor(smp.grid(), dtype=F64), torch.tensor(grid, dtype=F64), atol=1e-12)
    rng = BatchRNG(9, per_item=False)
    x = rng.randn(y.shape[:1] + (cov.shape[0],), dtype=F64)
    for i in range(N):
        s, sn = grid[i], grid[i + 1]
        sc = min(s, s_cap(prior))
        x0 = D(x / (1 - sc), sc / (1 - sc))
        n_hat = (x - (1 - sc) * x0) / sc
        xy = x0
        for _ in range(K):
            r = y @ R.T - xy @ RA.T
            xy = xy + step * (r @ RA) / r.norm(dim=1, keepdim=True)
        xm = (1 - s) * x0 + s * xy
        x = (1 - sn) * xm + sn * (sn ** 0.5 * n_hat + (1 - sn) ** 0.5 * rng.randn(x.shape, dtype=F64))
    assert torch.allclose(out, x, rtol=0, atol=1e-10), (out - x).abs().max()


def test_ot_ode_guidance_vector_is_the_dense_formula():
    """A^T (r^2 A A^T + sigma_y^2 I)^{-1} (y - A D) from the operator's SVD, rank-deficient A included."""
    _, _, _, A, y = gaussian_case()
    A = torch.cat([A, A[:1] + A[1:2]])                     # 4 x 5 of rank 3: a zero singular value
    op = MatrixOperator(A, sigma_y=0.2)
    D = torch.randn(2, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    y = torch.randn(2, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    r2, s2 = 0.37, float(op.noise_std) ** 2
    v = registry.build_sampler("ot_ode").guidance_vector(op, y, D, r2, s2, D.shape)
    ref = torch.linalg.solve(r2 * A @ A.T + s2 * torch.eye(4, dtype=F64), (y - D @ A.T).T).T @ A
    assert torch.allclose(v, ref, rtol=0, atol=1e-10)


def tiny_flow_prior(tmp_path, dialect="flow"):
    """A randomised PnP-Flow-format velocity UNet (16 px), loaded as a flow checkpoint."""
    from reddiff.priors.ddpmnet import DDPMUNet, DDPMUNetConfig
    from reddiff.priors.flow import FlowPrior

    cfg = DDPMUNetConfig(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
    torch.manual_seed(0)
    net = DDPMUNet(cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    torch.save(net.state_dict(), tmp_path / "model_final.pt")
    return FlowPrior(str(tmp_path / "model_final.pt"), arch=cfg, dialect=dialect)


@pytest.mark.parametrize("name", FLOW + ("reddiff",))
def test_runs_on_flow_checkpoint(name, tmp_path):
    """Each flow solver, and RED-diff unchanged, on a flow-format checkpoint in its flow dialect; NFE counted."""
    prior = tiny_flow_prior(tmp_path)
    assert prior.dialect == "flow"
    op = registry.build_operator("sr4", sigma_y=0.05).setup([0, 1], (2, 3, 16, 16), "cpu", torch.float32)
    x_true = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = op.measure(x_true, BatchRNG([5, 6]))
    over = {"steps": 5} if name != "pnp_flow" else {"steps": 5, "num_samples": 2}
    smp = registry.build_sampler(name, task="sr4", **over)
    prior.reset_nfe()
    x = smp.sample(y, op, prior, BatchRNG([0, 1]))
    assert x.shape == x_true.shape and torch.isfinite(x).all()
    assert prior.nfe == smp.expected_nfe(prior) > 0


def test_reddiff_flow_dialect_is_the_same_objective():
    """RED-diff calls eps on its VP grid: an exact prior in the flow dialect gives bit-identical output (its SNR
    weight sigma_t is the flow time's t / (1 - t) at t = sigma_t / (1 + sigma_t): docs/SAMPLERS.md)."""
    A = torch.randn(2, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    op = MatrixOperator(A, sigma_y=0.3)
    y = torch.randn(3, 2, generator=torch.Generator().manual_seed(4))
    smp = registry.build_sampler("reddiff", steps=20)
    outs = []
    for dialect in ("vp_discrete", "flow"):
        prior = GaussianMixturePrior.mcgdiff(4, torch.Generator().manual_seed(0), dialect=dialect)
        assert prior.dialect == dialect
        outs.append(smp.sample(y, op, prior, BatchRNG([1, 2, 3])))
    assert torch.equal(outs[0], outs[1]) and torch.isfinite(outs[0]).all()


@pytest.mark.parametrize("name", FLOW)
@pytest.mark.parametrize("task", ["phase_retrieval", "hdr"])
def test_nonlinear_task_refused_in_one_line(name, task):
    op = registry.build_operator(task)
    with pytest.raises(OperatorCapabilityError, match=rf"^{name} needs an operator with [a-z]+; [^\n]*$"):
        registry.build_sampler(name).check(op)


@pytest.mark.parametrize("start_time", [0.2, 0.4])
def test_ot_ode_transports_its_start_exactly(start_time):
    """With a standard-normal prior the guided ODE is the exact posterior probability-flow ODE, whose flow map
    between the Gaussian marginals C_s = (1 - s)^2 P + s^2 I (P the posterior covariance, mean (1 - s) mu) is
    x -> mu + P^{1/2} C_{s0}^{-1/2} (x - (1 - s0) mu).  So from the official start N((1 - s0) A^T y, s0^2 I), off
    p(x_{s0} | y), the output law is known exactly: mean and covariance of 20000 samples against it (a sharper
    check than the generic test, whose start bias is O(start_time))."""
    d, m = 4, 2
    g = torch.Generator().manual_seed(5)
    A = torch.randn(m, d, generator=g, dtype=F64)
    op = MatrixOperator(A, sigma_y=0.3)
    s2 = float(op.noise_std) ** 2
    y = A @ torch.randn(d, generator=g, dtype=F64) + s2 ** 0.5 * torch.randn(m, generator=g, dtype=F64)
    eye = torch.eye(d, dtype=F64)
    P = torch.linalg.inv(eye + A.T @ A / s2)
    mu = P @ A.T @ y / s2
    smp = registry.build_sampler("ot_ode", steps=500, start_time=start_time, gamma="constant")
    s0 = 1 - smp.first() / smp.steps
    lam, Q = torch.linalg.eigh(P)
    Ph = Q @ torch.diag(lam.sqrt()) @ Q.T
    Cm = Q @ torch.diag(((1 - s0) ** 2 * lam + s0 ** 2) ** -0.5) @ Q.T      # C_{s0}^{-1/2}
    M = Ph @ Cm
    mean = mu + M @ ((1 - s0) * (A.T @ y) - (1 - s0) * mu)
    cov = s0 ** 2 * M @ M.T
    n = 20000
    X = smp.sample(y[None].expand(n, m).contiguous(), op, GaussianPrior(dim=d), BatchRNG(0, per_item=False))
    err_m = float((X.mean(0) - mean).norm() / cov.diag().sum().sqrt())
    err_c = float((torch.cov(X.T) - cov).norm() / cov.norm())
    print("ot_ode transport errors", start_time, err_m, err_c)
    assert err_m < 0.015 and err_c < 0.025, (err_m, err_c)
