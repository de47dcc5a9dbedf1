"""Gaussian-mixture prior: exact denoiser, exact posterior (Kalman form) and the MCGdiff problem generator."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from reddiff.core.diffusion import Schedule
from reddiff.priors.gmm import GaussianMixturePrior, mcgdiff_problem

torch.set_num_threads(1)
F64 = torch.float64


def _random_spd(K, d, g, lo=0.3, hi=2.0):
    Q, _ = torch.linalg.qr(torch.randn(K, d, d, generator=g, dtype=F64))
    lam = lo + (hi - lo) * torch.rand(K, d, generator=g, dtype=F64)
    return Q @ torch.diag_embed(lam) @ Q.transpose(-1, -2)


def _priors(d=3, K=4, seed=0):
    """One prior per covariance representation (identity / isotropic / full)."""
    g = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.randn(K, d, generator=g, dtype=F64)
    w = torch.rand(K, generator=g, dtype=F64) + 0.1
    return {
        "identity": GaussianMixturePrior(means, w),
        "isotropic": GaussianMixturePrior(means, w, 0.2 + torch.rand(K, generator=g, dtype=F64)),
        "full": GaussianMixturePrior(means, w, _random_spd(K, d, g)),
    }


def _naive_log_marginal(prior, x, t):
    """log p(x_t) from dense covariances with torch.distributions (independent of the prior's fast paths)."""
    a = float(prior.schedule.alpha_bar_at(t))
    covs = a * prior.cov_matrices() + (1 - a) * torch.eye(prior.d, dtype=F64)
    comp = torch.distributions.MultivariateNormal(math.sqrt(a) * prior.means, covariance_matrix=covs)
    lp = comp.log_prob(x[:, None, :]) + prior.log_weights[None]
    return torch.logsumexp(lp, -1)


# ------------------------------------------------------------------------------------------ denoiser
@pytest.mark.parametrize("kind", ["identity", "isotropic", "full"])
@pytest.mark.parametrize("t", [0, 50, 300, 700, 999])
def test_denoiser_is_tweedie_of_finite_difference_score(kind, t):
    prior = _priors()[kind]
    g = torch.Generator().manual_seed(1)
    a = float(prior.schedule.alpha_bar_at(t))
    x0 = prior.sample(6, g)
    x = math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(6, prior.d, generator=g, dtype=F64)
    # the marginal density itself, against torch.distributions on dense covariances
    assert torch.allclose(prior.log_marginal(x, t), _naive_log_marginal(prior, x, t), atol=1e-10, rtol=0)
    h = 1e-5
    score = torch.zeros_like(x)
    for j in range(prior.d):
        e = torch.zeros(prior.d, dtype=F64)
        e[j] = h
        score[:, j] = (prior.log_marginal(x + e, t) - prior.log_marginal(x - e, t)) / (2 * h)
    tweedie = (x + (1 - a) * score) / math.sqrt(a)
    assert (prior.x0(x, t) - tweedie).abs().max() < 1e-6
    assert (prior.eps(x, t) + math.sqrt(1 - a) * score).abs().max() < 1e-6


def test_identity_denoiser_matches_anchor_formula_mcgdiff_d800():
    """docs/ANCHORS.md: r = softmax(log w - ||x - sqrt(a) mu||^2 / 2), E[x0|x_t] = sqrt(a) x + (1-a) sum r mu."""
    g = torch.Generator().manual_seed(3)
    prior = GaussianMixturePrior.mcgdiff(800, g)
    assert prior.mean_basis.shape == (800, 2)  # the means span a plane
    for t in (0, 250, 600, 999):
        a = float(prior.schedule.alpha_bar_at(t))
        x = math.sqrt(a) * prior.sample(64, g) + math.sqrt(1 - a) * torch.randn(64, 800, generator=g, dtype=F64)
        d2 = ((x[:, None, :] - math.sqrt(a) * prior.means[None]) ** 2).sum(-1)
        r = torch.softmax(prior.log_weights[None] - d2 / 2, -1)
        ref = math.sqrt(a) * x + (1 - a) * r @ prior.means
        assert (prior.x0(x, t) - ref).abs().max() < 1e-9
        # float32 input: same answer to float32 accuracy, float32 output
        x32 = prior.x0(x.float(), t)
        assert x32.dtype == torch.float32
        assert (x32.double() - ref).abs().max() < 1e-3 * (1 + ref.abs().max())


def test_representations_agree():
    """Full covariances equal to s^2 I give the same eps as the isotropic and identity fast paths."""
    g = torch.Generator().manual_seed(4)
    K, d = 5, 4
    means = 4 * torch.randn(K, d, generator=g, dtype=F64)
    w = torch.rand(K, generator=g, dtype=F64)
    var = 0.5 + torch.rand(K, generator=g, dtype=F64)
    iso = GaussianMixturePrior(means, w, var)
    full = GaussianMixturePrior(means, w, var[:, None, None] * torch.eye(d, dtype=F64))
    ident = GaussianMixturePrior(means, w, None)
    full_ident = GaussianMixturePrior(means, w, torch.eye(d, dtype=F64).expand(K, d, d))
    x = 3 * torch.randn(20, d, generator=g, dtype=F64)
    t = torch.randint(0, 1000, (20,), generator=g)  # per-item timesteps
    assert iso.cov_kind == "isotropic" and full.cov_kind == "full" and ident.cov_kind == "identity"
    assert torch.allclose(iso.eps(x, t), full.eps(x, t), atol=1e-10)
    assert torch.allclose(ident.eps(x, t), full_ident.eps(x, t), atol=1e-10)
    assert not torch.allclose(iso.eps(x, t), ident.eps(x, t), atol=1e-3)


@pytest.mark.parametrize("kind", ["identity", "isotropic", "full"])
def test_eps_is_the_conditional_mean_of_the_noise(kind):
    """E[(eps - eps_hat(x_t)) f(x_t)] = 0 for test functions f, and eps_hat beats rescaled versions of itself.

    This is what makes eps_hat the MMSE noise prediction (x0 = (x_t - sqrt(1-a) eps_hat)/sqrt(a) is then
    E[x0 | x_t]); it is checked by Monte Carlo against the forward process, independently of the formula.
    """
    prior = _priors(d=2, K=3, seed=5)[kind]
    g = torch.Generator().manual_seed(6)
    n, t = 200_000, 400
    a = float(prior.schedule.alpha_bar_at(t))
    x0 = prior.sample(n, g)
    e = torch.randn(n, prior.d, generator=g, dtype=F64)
    xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * e
    eh = prior.eps(xt, t)
    resid = e - eh
    for f in (torch.ones(n, 1, dtype=F64), xt, torch.tanh(xt[:, :1] - xt[:, 1:]), eh):
        prod = resid * f
        se = prod.std(0) / math.sqrt(n)
        assert (prod.mean(0).abs() < 5 * se + 1e-12).all(), (prod.mean(0), se)
    mse = (resid**2).sum(-1).mean()
    for c in (0.9, 1.1):
        assert mse < ((e - c * eh) ** 2).sum(-1).mean()
    # x0 prediction: the MMSE denoiser is at least as good as the prior mean and as x_t/sqrt(a)
    xh = prior.x0(xt, t)
    assert ((x0 - xh) ** 2).sum(-1).mean() < ((x0 - xt / math.sqrt(a)) ** 2).sum(-1).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_dtype_and_differentiable(dtype):
    prior = _priors(d=3, K=4, seed=7)["full"]
    g = torch.Generator().manual_seed(8)
    x = (2 * torch.randn(5, 3, generator=g, dtype=F64)).to(dtype).requires_grad_(True)
    eps = prior.eps(x, 200)
    assert eps.dtype == dtype and eps.shape == (5, 3)
    # batched == one at a time
    one = torch.cat([prior.eps(x[i : i + 1], 200) for i in range(5)])
    assert torch.allclose(eps, one, atol=1e-6 if dtype == torch.float32 else 1e-12)
    (eps**2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    if dtype == torch.float64:
        for kind, p in _priors(d=3, K=4, seed=7).items():
            xx = x.detach().clone().requires_grad_(True)
            assert torch.autograd.gradcheck(lambda z: p.eps(z, 200), (xx,), atol=1e-7), kind


def test_nfe_counts_calls():
    prior = _priors()["identity"]
    prior.reset_nfe()
    x = torch.zeros(7, 3, dtype=F64)
    prior.eps(x, 10)
    prior.x0(x, 10)
    assert prior.nfe == 2


# ------------------------------------------------------------------------------------------ posterior
def _grid_posterior_1d(prior, A, y, sigma, grid):
    px = torch.zeros_like(grid)
    for i in range(prior.K):
        sd = math.sqrt(float(prior.cov_matrices()[i, 0, 0]))
        px += prior.weights[i] * torch.exp(-0.5 * ((grid - prior.means[i, 0]) / sd) ** 2) / sd
    lik = torch.exp(-0.5 * ((y - A * grid) / sigma) ** 2)
    p = px * lik
    return p / p.sum()


def test_posterior_1d_matches_numerical_integration():
    g = torch.Generator().manual_seed(10)
    means = torch.tensor([[-4.0], [0.5], [3.0]], dtype=F64)
    covs = torch.tensor([0.5, 1.5, 0.3], dtype=F64)[:, None, None]
    prior = GaussianMixturePrior(means, [0.2, 0.5, 0.3], covs)
    A, sigma, y = 0.7, 0.8, 0.9
    post = prior.posterior(torch.tensor([y]), torch.tensor([[A]]), sigma)
    grid = torch.linspace(-15, 15, 300_001, dtype=F64)
    p = _grid_posterior_1d(prior, A, y, sigma, grid)
    m_grid = (p * grid).sum()
    v_grid = (p * (grid - m_grid) ** 2).sum()
    C = post.covs()[:, 0, 0]
    m = (post.weights * post.means[:, 0]).sum()
    v = (post.weights * (C + post.means[:, 0] ** 2)).sum() - m**2
    assert abs(m - m_grid) < 1e-6 and abs(v - v_grid) < 1e-6
    # the CDF at a few points
    for q in (-3.0, 0.0, 1.0, 2.5):
        cdf_exact = sum(float(post.weights[i]) * stats.norm.cdf(q, float(post.means[i, 0]), math.sqrt(float(C[i])))
                        for i in range(3))
        assert abs(cdf_exact - float(p[grid <= q].sum())) < 1e-4
    # the evidence p(y), against the grid integral of p(x) N(y; Ax, sigma^2)
    dx = float(grid[1] - grid[0])
    dens = sum(float(prior.weights[i]) * stats.norm.pdf(grid.numpy(), float(means[i, 0]), math.sqrt(float(covs[i, 0, 0])))
               for i in range(3)) * stats.norm.pdf(y, A * grid.numpy(), sigma)
    assert abs(math.exp(float(post.log_evidence())) - dens.sum() * dx) < 1e-8
    # samples: a KS test against the exact mixture CDF
    s = post.sample(20_000, g)[:, 0].numpy()
    cdf = lambda q: sum(float(post.weights[i]) * stats.norm.cdf(q, float(post.means[i, 0]), math.sqrt(float(C[i])))
                        for i in range(3))
    assert stats.kstest(s, cdf).pvalue > 1e-3


def test_posterior_2d_matches_grid_and_importance_sampling():
    g = torch.Generator().manual_seed(11)
    K, d = 4, 2
    means = torch.tensor([[-3.0, 2.0], [2.0, 2.5], [0.0, -3.0], [4.0, -1.0]], dtype=F64)
    prior = GaussianMixturePrior(means, [0.1, 0.4, 0.3, 0.2], _random_spd(K, d, g, 0.3, 1.5))
    A = torch.tensor([[0.6, -0.8]], dtype=F64)
    sigma, y = 0.5, torch.tensor([0.4], dtype=F64)
    post = prior.posterior(y, A, sigma)
    # grid integration
    u = torch.linspace(-12, 12, 1201, dtype=F64)
    X = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
    logp = _naive_log_marginal(prior, X, -1) - 0.5 * ((y - X @ A.T)[:, 0] / sigma) ** 2
    p = torch.softmax(logp, 0)
    m_grid = p @ X
    C_grid = (X - m_grid).T @ ((X - m_grid) * p[:, None])
    m = post.mean()
    Cs = post.covs()
    second = (post.weights[:, None, None] * (Cs + post.means[:, :, None] * post.means[:, None, :])).sum(0)
    C = second - m[:, None] * m[None, :]
    assert (m - m_grid).abs().max() < 1e-6
    assert (C - C_grid).abs().max() < 1e-5
    # the posterior mass of one quadrant, from the mixture by Monte Carlo-free integration on the same grid
    dens = torch.zeros(X.shape[0], dtype=F64)
    for i in range(K):
        dens += post.weights[i] * torch.distributions.MultivariateNormal(post.means[i], Cs[i]).log_prob(X).exp()
    dens = dens / dens.sum()
    quad = (X[:, 0] > 0) & (X[:, 1] > 0)
    assert abs(float(dens[quad].sum() - p[quad].sum())) < 1e-6
    # importance sampling from the prior (independent of the Kalman algebra)
    n = 400_000
    xs = prior.sample(n, g)
    lw = -0.5 * ((y - xs @ A.T)[:, 0] / sigma) ** 2
    wn = torch.softmax(lw, 0)
    m_is = wn @ xs
    ess = 1 / (wn**2).sum()
    se = ((wn[:, None] * (xs - m_is) ** 2).sum(0) / ess).sqrt()
    assert ((m_is - m).abs() < 5 * se).all()
    # posterior samples: moments within Monte Carlo error
    s = post.sample(100_000, g)
    sd = C.diagonal().sqrt()
    assert ((s.mean(0) - m).abs() < 5 * sd / math.sqrt(1e5)).all()
    assert (torch.cov(s.T) - C).abs().max() < 0.05 * C.abs().max()


def _independent_log_evidence(prior, A, y, sigma):
    """log w_i + log N(y; A mu_i, A Sigma_i A^T + sigma^2 I) with scipy, one component at a time."""
    out = []
    for i in range(prior.K):
        S = (A @ prior.cov_matrices()[i] @ A.T).numpy() + sigma**2 * np.eye(A.shape[0])
        out.append(math.log(float(prior.weights[i])) + stats.multivariate_normal(
            (A @ prior.means[i]).numpy(), S).logpdf(y.numpy()))
    out = np.array(out)
    return out - np.logaddexp.reduce(out)


@pytest.mark.parametrize("d,dy", [(2, 1), (5, 2), (8, 4)])
def test_posterior_with_tiny_sigma(d, dy):
    """sigma_y = 1e-6: the weights equal the independently computed marginal likelihoods, and each component
    is the exact noiseless conditional N(mu + Sigma A^T (A Sigma A^T)^-1 (y - A mu), ...)."""
    g = torch.Generator().manual_seed(12 + d)
    K = 5
    prior = GaussianMixturePrior(2.0 * torch.randn(K, d, generator=g, dtype=F64), torch.rand(K, generator=g, dtype=F64) + 0.1,
                                 _random_spd(K, d, g, 0.5, 1.5))
    A = torch.randn(dy, d, generator=g, dtype=F64)
    x_star = prior.sample(1, g)[0]
    sigma = 1e-6
    y = A @ x_star + sigma * torch.randn(dy, generator=g, dtype=F64)
    post = prior.posterior(y, A, sigma)
    ref = _independent_log_evidence(prior, A, y, sigma)
    assert np.allclose(post.log_weights.numpy(), ref, atol=1e-6)
    assert abs(float(post.weights.sum()) - 1) < 1e-12
    Sig = prior.cov_matrices()
    for i in range(K):
        SAt = Sig[i] @ A.T
        lim = prior.means[i] + SAt @ torch.from_numpy(np.linalg.solve((A @ SAt).numpy(), (y - A @ prior.means[i]).numpy()))
        assert (post.means[i] - lim).abs().max() < 1e-4
        assert (A @ post.means[i] - y).abs().max() < 1e-9
        # the covariance is singular along the measured directions, PSD, and A Sigma~ A^T ~ sigma^2
        C = post.covs()[i]
        assert torch.linalg.eigvalsh(C).min() > -1e-9
        assert (A @ C @ A.T).abs().max() < 1e-10
    s = post.sample(5000, g)
    assert ((s @ A.T - y).abs().max()) < 1e-4
    assert torch.isfinite(s).all()


def test_tiny_sigma_mcgdiff_d800():
    g = torch.Generator().manual_seed(13)
    prior = GaussianMixturePrior.mcgdiff(800, g)
    pb = mcgdiff_problem(prior, 2, g)
    post = prior.posterior(pb.y, pb.A, 1e-6)
    ref = _independent_log_evidence(prior, pb.A, pb.y, 1e-6)
    assert torch.isfinite(post.log_weights).all()
    assert np.allclose(post.weights.numpy(), np.exp(ref), atol=1e-9)
    s = post.sample(500, g)
    assert (s @ pb.A.T - pb.y).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------ MCGdiff problem
def test_mcgdiff_prior_and_problem():
    g = torch.Generator().manual_seed(14)
    prior = GaussianMixturePrior.mcgdiff(8, g)
    assert prior.K == 25 and prior.shape == (8,) and prior.cov_kind == "identity"
    pts = {tuple(m[:2].tolist()) for m in prior.means}
    assert pts == {(8.0 * i, 8.0 * j) for i in range(-2, 3) for j in range(-2, 3)}
    assert torch.equal(prior.means[:, 2:4], prior.means[:, :2]) and torch.equal(prior.means[:, 6:8], prior.means[:, :2])
    assert abs(float(prior.weights.sum()) - 1) < 1e-12 and prior.weights.min() > 0
    for dy in (1, 2, 4):
        pb = mcgdiff_problem(prior, dy, g)
        assert pb.A.shape == (dy, 8) and pb.y.shape == (dy,)
        sv = torch.linalg.svdvals(pb.A)
        assert torch.allclose(sv, pb.s, atol=1e-12)
        assert (pb.s[:-1] >= pb.s[1:]).all() and (pb.s > 0).all() and (pb.s < 1).all()
        assert torch.allclose(pb.Vk.T @ pb.Vk, torch.eye(dy, dtype=F64), atol=1e-12)
        assert torch.allclose(pb.U @ torch.diag(pb.s) @ pb.Vk.T, pb.A, atol=1e-12)
        assert 0 <= pb.sigma_y <= float(pb.s.max())
    # the prior samples follow the weights (chi-square on the component frequencies)
    n = 50_000
    xs = prior.sample(n, g)
    comp = ((xs[:, None, :] - prior.means[None]) ** 2).sum(-1).argmin(-1)
    counts = torch.bincount(comp, minlength=25).numpy()
    assert stats.chisquare(counts, prior.weights.numpy() * n).pvalue > 1e-4
    with pytest.raises(ValueError):
        GaussianMixturePrior.mcgdiff(7)


def test_non_default_schedule_is_used():
    means = torch.tensor([[0.0], [5.0]], dtype=F64)
    p1 = GaussianMixturePrior(means)
    p2 = GaussianMixturePrior(means, schedule=Schedule(beta_start=1e-3, beta_end=0.05))
    x = torch.tensor([[1.0]], dtype=F64)
    assert not torch.allclose(p1.eps(x, 100), p2.eps(x, 100))


# ------------------------------------------------------------------------------------------ benchmark pieces
def test_sliced_wasserstein_is_exact_1d_transport():
    from benchmarks.gmm_posterior import random_directions, sliced_wasserstein

    g = torch.Generator().manual_seed(20)
    X = torch.randn(300, 1, generator=g, dtype=F64)
    Y = 2 + 0.5 * torch.randn(170, 1, generator=g, dtype=F64)  # unequal sizes
    theta = torch.ones(1, 1, dtype=F64)
    sw1, sw2 = sliced_wasserstein(X, Y, theta)
    assert abs(sw1 - stats.wasserstein_distance(X[:, 0].numpy(), Y[:, 0].numpy())) < 1e-5
    # W2 between empirical measures: integral of the squared difference of the quantile functions
    u = (np.arange(200_000) + 0.5) / 200_000
    qx = np.sort(X[:, 0].numpy())[np.minimum((u * 300).astype(int), 299)]
    qy = np.sort(Y[:, 0].numpy())[np.minimum((u * 170).astype(int), 169)]
    assert abs(sw2 - math.sqrt(np.mean((qx - qy) ** 2))) < 1e-3
    # identical sets: 0; a shift c: SW_1 = mean |theta . c| over the directions
    Z = torch.randn(500, 6, generator=g, dtype=F64)
    th = random_directions(1000, 6, g)
    assert sliced_wasserstein(Z, Z, th)[0] == 0
    c = torch.tensor([3.0, 0, 0, 0, 0, 0], dtype=F64)
    assert abs(sliced_wasserstein(Z, Z + c, th)[0] - float((th @ c).abs().mean())) < 1e-5
    assert abs(float(th.norm(dim=1).max()) - 1) < 1e-12
    assert sliced_wasserstein(Z, Z * float("nan"), th)[0] == math.inf


@pytest.mark.parametrize("d,dy", [(8, 1), (80, 4), (30, 3)])
def test_householder_operator_equals_dense_svd(d, dy):
    from benchmarks.gmm_posterior import problem_operator
    from reddiff.operators.matrix import MatrixOperator

    g = torch.Generator().manual_seed(21 + d)
    prior = GaussianMixturePrior.mcgdiff(d, g)
    pb = mcgdiff_problem(prior, dy, g)
    op = problem_operator(pb)
    dense = MatrixOperator(pb.A, sigma_y=pb.sigma_y)
    V = op.Vt(torch.eye(d, dtype=F64))  # x @ V with x = I
    x = torch.randn(7, d, generator=g, dtype=F64)
    yv = torch.randn(7, dy, generator=g, dtype=F64)
    assert torch.allclose(V.T @ V, torch.eye(d, dtype=F64), atol=1e-12)
    assert torch.allclose(op.Vt(x), x @ V, atol=1e-12) and torch.allclose(op.V(x), x @ V.T, atol=1e-12)
    assert torch.allclose(op.matrix, pb.A, atol=1e-12)
    assert torch.allclose(op.V(op.Vt(x)), x, atol=1e-12)
    assert torch.allclose(op.forward(x), x @ pb.A.T, atol=1e-12)
    assert torch.allclose(op.adjoint(yv), dense.adjoint(yv), atol=1e-12)
    assert torch.allclose(op.pinv(yv), dense.pinv(yv), atol=1e-10)
    # the SVD pieces reproduce A: U diag(s) (V^T x)[:k]
    z = op.Vt(x)[:, :dy] * op.singulars()
    assert torch.allclose(op.U(z), x @ pb.A.T, atol=1e-12)
    assert op.noise_std == pb.sigma_y
    assert op.Vt(x.float()).dtype == torch.float32


def test_benchmark_cli_smoke(tmp_path):
    """A tiny run writes the contract JSON: every (d, d_y) and name has sw_mean, sw_ci95, seconds."""
    import json

    from benchmarks.gmm_posterior import main

    out = tmp_path / "gmm.json"
    md = tmp_path / "gmm.md"
    md.write_text("intro\n<!-- table:start -->\nold\n<!-- table:end -->\noutro\n")
    main(["--dims", "4", "--dims-y", "1,2", "--problems", "2", "--samples", "64", "--steps", "5",
          "--samplers", "ddrm,dps", "--json", str(out), "--md", str(md)])
    res = json.loads(out.read_text())
    for dy in ("1", "2"):
        cell = res["results"]["4"][dy]
        assert set(cell) == {"ddrm", "dps", "exact", "prior"}
        for v in cell.values():
            assert {"sw_mean", "sw_ci95", "seconds"} <= set(v) and v["sw_mean"] >= 0 and v["seconds"] >= 0
        assert cell["exact"]["sw_mean"] < cell["prior"]["sw_mean"]
    text = md.read_text()
    assert text.startswith("intro\n") and text.rstrip().endswith("outro") and "old" not in text and "| 4 | 2 |" in text


def test_benchmark_sweep_columns_share_the_samplers_noise(tmp_path):
    """``--sweep dps.zeta=A,B``: one column per value after the sampler's own; the value the sampler already uses
    reproduces its column to the last digit (same noise stream), another value changes it."""
    import json

    from benchmarks.gmm_posterior import hparams, main

    zeta = hparams("dps")["zeta"]
    out = tmp_path / "gmm.json"
    main(["--dims", "4", "--dims-y", "1", "--problems", "2", "--samples", "64", "--steps", "5", "--samplers", "dps",
          "--sweep", f"dps.zeta={zeta},{10 * zeta}", "--json", str(out)])
    cell = json.loads(out.read_text())["results"]["4"]["1"]
    same, other = f"dps[zeta={zeta}]", f"dps[zeta={10 * zeta}]"
    assert list(cell) == ["exact", "prior", "dps", same, other]
    assert cell[same]["sw_per_problem"] == cell["dps"]["sw_per_problem"]
    assert cell[other]["sw_per_problem"] != cell["dps"]["sw_per_problem"]


@pytest.mark.slow
def test_benchmark_is_independent_of_workers_and_honours_overrides(tmp_path):
    """Problems are seeded by (seed, d, d_y, p): two worker processes give the same numbers as one; --set reaches
    the workers and changes the sampler."""
    import json

    from benchmarks.gmm_posterior import main

    common = ["--dims", "4", "--dims-y", "1", "--problems", "3", "--samples", "64", "--steps", "5", "--samplers", "dps"]
    runs = {}
    for tag, extra in {"w1": ["--workers", "1"], "w2": ["--workers", "2"],
                       "zeta": ["--workers", "2", "--set", "dps.zeta=5"]}.items():
        out = tmp_path / f"{tag}.json"
        main(common + extra + ["--json", str(out)])
        runs[tag] = json.loads(out.read_text())
    cell = lambda r: r["results"]["4"]["1"]
    for name in ("dps", "exact", "prior"):
        assert cell(runs["w1"])[name]["sw_per_problem"] == cell(runs["w2"])[name]["sw_per_problem"]
    assert runs["zeta"]["meta"]["hparams"]["dps"]["zeta"] == 5
    assert cell(runs["zeta"])["dps"]["sw_per_problem"] != cell(runs["w1"])["dps"]["sw_per_problem"]
    assert cell(runs["zeta"])["exact"]["sw_per_problem"] == cell(runs["w1"])["exact"]["sw_per_problem"]


def test_sorted_projections_equal_torch_sort():
    """The benchmark sorts projections with numpy (faster on CPU); the values must be torch.sort's exactly."""
    from benchmarks.gmm_posterior import _sorted_projections

    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 7, generator=g)
    X[5] = X[9]  # ties
    theta = torch.randn(11, 7, generator=g, dtype=torch.float64)
    ref = torch.sort(X @ theta.float().T, dim=0).values.double()
    assert torch.equal(_sorted_projections(X, theta), ref)

