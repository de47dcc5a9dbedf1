"""RED-diff sampler: the official update rule, the explicit Adam, batched sweeps, weightings, orderings, options."""
from __future__ import annotations

import math

import pytest
import torch

from reddiff.core.diffusion import timesteps
from reddiff.operators.base import LinearOperator
from reddiff.operators.matrix import MatrixOperator
from reddiff.priors.gaussian import GaussianPrior
from reddiff.core.rng import BatchRNG
from reddiff.samplers.reddiff import PER_ITEM, WEIGHTINGS, REDDiff, adam_step, expand_configs, tile, untile

torch.set_num_threads(1)


def dense_problem(sigma_y=0.1, d=8, m=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(d, d, generator=g, dtype=torch.float64)
    prior = GaussianPrior(dim=d, mean=torch.randn(d, generator=g, dtype=torch.float64),
                          cov=L @ L.T / d + 0.1 * torch.eye(d, dtype=torch.float64))
    A = torch.randn(m, d, generator=g, dtype=torch.float64)
    op = MatrixOperator(A, sigma_y=sigma_y)
    y = (prior.sample(4, BatchRNG(seed + 1), dtype=torch.float64) @ A.T + sigma_y * torch.randn(4, m, generator=g, dtype=torch.float64))
    return op, prior, y.to(dtype)


class ScaleOperator(LinearOperator):
    """Elementwise y = s * x (every op elementwise, so batch size cannot change rounding)."""

    name = "scale"

    def __init__(self, s, sigma_y=0.0):
        super().__init__(sigma_y=sigma_y, value_range=1.0)
        self.s = torch.as_tensor(s)

    def forward(self, x):
        return x * self.s.to(x)

    def adjoint(self, y):
        return y * self.s.to(y)

    def pinv(self, y):
        return y / self.s.to(y)


def reference_reddiff(y, op, prior, rng, steps, lr, lam, weighting="linear", v=1.0, sigma_x0=0.0,
                      ordering="descending", returns="last_sample"):
    """The official loop (algos/reddiff.py) written with torch.optim.Adam and autograd over the whole loss,
    with per-image means summed over the batch."""
    sch = prior.schedule
    mu = op.pinv(y).detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([mu], lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    B = y.shape[0]
    x0 = None
    for t in timesteps(steps, ordering, T=sch.T):
        a = sch.alpha_bar_at(t).to(y)
        e1, e2 = rng.randn_like(mu), rng.randn_like(mu)
        x0 = mu + sigma_x0 * e1
        xt = a.sqrt() * x0 + (1 - a).sqrt() * e2
        with torch.no_grad():
            eps = prior.eps(xt, t)
        loss_noise = ((eps - e2).detach() * x0).reshape(B, -1).mean(1)
        loss_obs = ((y - op.forward(x0)) ** 2).reshape(B, -1).mean(1) / 2
        w = lam * WEIGHTINGS[weighting](((1 - a) / a).sqrt())
        loss = (w * loss_noise + v * loss_obs).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (x0 if returns == "last_sample" else mu).detach()


# ---------------------------------------------------------------------------------------------------------- Adam
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_adam_step_matches_torch_optim_adam(dtype, tol):
    """200 steps on random gradients (scales 1e-3..1e3), per-item learning rates: |difference| below
    tol * max(1, |p|) (relative: the parameters grow to ~10; float32 measured 3e-7 relative, a few ulp from an
    equivalent but differently ordered evaluation; float64 1e-12)."""
    g = torch.Generator().manual_seed(0)
    B = 3
    lrs = torch.tensor([0.5, 0.1, 0.01], dtype=dtype)
    p0 = torch.randn(B, 5, generator=g, dtype=dtype)
    grads = [torch.randn(B, 5, generator=g, dtype=dtype) * 10 ** torch.randint(-3, 4, (B, 1), generator=g).to(dtype)
             for _ in range(200)]
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for k, gr in enumerate(grads, 1):
        adam_step(p, gr, m, v, k, lrs[:, None], (0.9, 0.99), 1e-8)
    for b in range(B):
        q = p0[b].clone().requires_grad_(True)
        opt = torch.optim.Adam([q], lr=float(lrs[b]), betas=(0.9, 0.99), eps=1e-8)
        for gr in grads:
            q.grad = gr[b].clone()
            opt.step()
        assert ((q.detach() - p[b]).abs() <= tol * p[b].abs().clamp_min(1.0)).all()


@pytest.mark.parametrize("kw", [dict(weighting="linear"),
                                dict(weighting="sqrt", sigma_x0=0.2, returns="mu"),
                                dict(weighting="trunc_linear", ordering="random", lam=1.0)])
def test_reddiff_equals_official_loop_with_torch_adam(kw):
    """Analytic denoiser gradient + explicit Adam == autograd over the whole loss + torch.optim.Adam, float64,
    max difference < 1e-9 (only rounding differs)."""
    op, prior, y = dense_problem()
    args = dict(steps=40, lr=0.3, lam=0.25)
    args.update(kw)
    x = REDDiff(**args).sample(y, op, prior, BatchRNG([1, 2, 3, 4]))
    ref = reference_reddiff(y, op, prior, BatchRNG([1, 2, 3, 4]), **args)
    assert (x - ref).abs().max() < 1e-9


# ---------------------------------------------------------------------------------------------------------- sweeps
def test_batched_sweep_equals_separate_runs():
    """K = 3 configurations x 2 images in one batch (one network call per step) equal 6 separate runs:
    bitwise with elementwise operator/prior; within 1e-9 in float64 with a dense operator (BLAS order)."""
    configs = [{"lr": 0.1}, {"lr": 0.5, "lam": 1.0, "weighting": "sqrt"},
               {"weighting": "const", "sigma_x0": 0.05, "obs_weight": 2.0}]
    K, seeds = len(configs), [5, 6]
    base = dict(steps=30)
    kw = expand_configs(configs, n_images=2)
    assert kw["lr"] == [0.1, 0.5, 0.5, 0.1, 0.5, 0.5] and kw["weighting"][2] == "const"

    prior = GaussianPrior(dim=6, mean=torch.linspace(-1, 1, 6), cov=torch.linspace(0.2, 1, 6))
    op = ScaleOperator(torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 0.3]).clamp_min(1e-3), sigma_y=0.05)
    y = op.measure(prior.sample(2, BatchRNG(0)), BatchRNG([8, 9]))
    prior.reset_nfe()
    xs = untile(REDDiff(**base, **kw).sample(tile(y, K), op, prior, BatchRNG(tile(seeds, K))), K)
    assert prior.nfe == 30 and xs.shape == (2, K, 6)
    for b in range(2):
        for k, c in enumerate(configs):
            xr = REDDiff(**base, **c).sample(y[b:b + 1], op, prior, BatchRNG([seeds[b]]))
            assert torch.equal(xr[0], xs[b, k]), (b, k)

    op, prior, y = dense_problem()
    y = y[:2]
    xs = untile(REDDiff(**base, **kw).sample(tile(y, K), op, prior, BatchRNG(tile(seeds, K))), K)
    for b in range(2):
        for k, c in enumerate(configs):
            xr = REDDiff(**base, **c).sample(y[b:b + 1], op, prior, BatchRNG([seeds[b]]))
            assert (xr[0] - xs[b, k]).abs().max() < 1e-9

    with pytest.raises(ValueError, match="cannot vary"):
        expand_configs([{"steps": 10}], 1)
    with pytest.raises(ValueError, match="per-item lr has 2 values for a batch of 4"):
        REDDiff(steps=5, lr=[0.1, 0.2]).sample(y.repeat(2, 1), op, prior, BatchRNG(0))
    assert set(PER_ITEM) == set(kw)


# ---------------------------------------------------------------------------------------------------------- objective
def test_stationary_point_matches_gaussian_fixed_point():
    """Standard-normal prior, sigma_x0 = 0: eps(x_t) = sqrt(1-a) x_t, so the expected step-t gradient is
    c_t mu + (v/m) H^T (H mu - y) with c_t = lam * weight(s_t) * sqrt(a_t (1 - a_t)) / n.  With the random ordering
    over all 1000 timesteps the objective averages over t, and its stationary point is
    mu* = (c I + (v/m) H^T H)^{-1} (v/m) H^T y, c = mean_t c_t.

    64 replicas (different seeds), lr 0.01: their mean lies within 5 SE + 0.01 of mu* (measured: 0.015 away, max
    |z| 2.2; |mu* - pinv(y)| = 0.27 and |mu*| = 0.39, so this discriminates), and the expected gradient there is
    < 10% of its value at the start pinv(y) (measured 3.7%).  The 0.01 allows for Adam's small stationary bias.
    """
    d, m, lam = 8, 3, 16.0
    g = torch.Generator().manual_seed(0)
    A = torch.randn(m, d, generator=g, dtype=torch.float64)
    op = MatrixOperator(A)
    prior = GaussianPrior(dim=d)
    y1 = torch.randn(1, d, generator=g, dtype=torch.float64) @ A.T
    sch = prior.schedule
    ts = torch.tensor(timesteps(1000, "random", seed=0))
    a = sch.alpha_bar_at(ts)
    c = float((lam * WEIGHTINGS["linear"](((1 - a) / a).sqrt()) * (a * (1 - a)).sqrt() / d).mean())
    H = A.T @ A / m
    b = (A.T @ y1[0]) / m
    mu_star = torch.linalg.solve(c * torch.eye(d, dtype=torch.float64) + H, b)
    grad = lambda mu: c * mu + H @ mu - b
    B = 64
    x = REDDiff(steps=1000, lr=0.01, lam=lam, ordering="random", returns="mu").sample(
        y1.float().expand(B, -1).contiguous(), op, prior, BatchRNG(list(range(B)))).double()
    mean, se = x.mean(0), x.std(0) / math.sqrt(B)
    pinv = op.pinv(y1)[0]
    assert (pinv - mu_star).norm() > 0.2                       # the prior term matters at this lam
    assert ((mean - mu_star).abs() < 5 * se + 0.01).all(), (mean - mu_star)
    assert grad(mean).norm() < 0.1 * grad(pinv).norm()


@pytest.mark.parametrize("sigma_x0", [0.0, 0.3])
def test_sigma_aware_is_the_rescaled_objective(sigma_x0):
    """sigma_aware (sums, data weight 1/(2 sigma_y^2)) has the same gradient as the default objective with
    lam * n and obs_weight * m / sigma_y^2, hence (Adam) the same iterates: float64, 1e-9.  Refuses sigma_y = 0."""
    op, prior, y = dense_problem(sigma_y=0.2)
    n, m = 8, 3
    a = REDDiff(steps=30, lam=0.25, obs_weight=1.5, sigma_x0=sigma_x0, sigma_aware=True).sample(y, op, prior, BatchRNG([1, 2, 3, 4]))
    b = REDDiff(steps=30, lam=0.25 * n, obs_weight=1.5 * m / 0.2 ** 2, sigma_x0=sigma_x0).sample(y, op, prior, BatchRNG([1, 2, 3, 4]))
    c = REDDiff(steps=30, lam=0.25, obs_weight=1.5, sigma_x0=sigma_x0).sample(y, op, prior, BatchRNG([1, 2, 3, 4]))
    assert (a - b).abs().max() < 1e-9 and (a - c).abs().max() > 1e-3
    with pytest.raises(ValueError, match="noise_std > 0"):
        REDDiff(steps=5, sigma_aware=True).sample(y, MatrixOperator(op.matrix), prior, BatchRNG(0))


# ---------------------------------------------------------------------------------------------------------- options
def test_every_weighting_formula_and_effect():
    """weight_table equals lam * f(s) for each weighting (float64, 1e-12); the seven weightings give seven
    different results (pairwise max difference > 1e-4) from the same seeds."""
    op, prior, y = dense_problem()
    ts = timesteps(20, "descending")
    s = prior.schedule.sigma_over_alpha(torch.tensor(ts))
    formulas = {"linear": s, "sqrt": s.sqrt(), "square": s ** 2, "log": torch.log(1 + s),
                "trunc_linear": torch.minimum(s, torch.ones_like(s)), "power2over3": s ** (2 / 3),
                "const": torch.ones_like(s)}
    assert set(formulas) == set(WEIGHTINGS)
    outs = {}
    for name, f in formulas.items():
        smp = REDDiff(steps=20, lam=0.7, weighting=name)
        assert torch.allclose(smp.weight_table(ts, prior.schedule, 2), 0.7 * f[:, None].expand(-1, 2), rtol=1e-12)
        outs[name] = smp.sample(y, op, prior, BatchRNG([1, 2, 3, 4]))
    names = list(outs)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert (outs[names[i]] - outs[names[j]]).abs().max() > 1e-4, (names[i], names[j])


def test_every_ordering_visits_its_timesteps_and_changes_the_result():
    op, prior, y = dense_problem()
    outs = {}
    for ordering, seed in [("descending", 0), ("ascending", 0), ("random", 0), ("random", 1)]:
        seen = []
        prior.reset_nfe()
        outs[(ordering, seed)] = REDDiff(steps=25, ordering=ordering, order_seed=seed, log_every=1).sample(
            y, op, prior, BatchRNG([1, 2, 3, 4]), callback=lambda i, info: seen.append(info["t"]))
        assert seen == timesteps(25, ordering, seed=seed) and prior.nfe == 25
    assert sorted(timesteps(25, "random", seed=1)) == sorted(timesteps(25, "descending"))
    keys = list(outs)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert (outs[keys[i]] - outs[keys[j]]).abs().max() > 1e-4, (keys[i], keys[j])


def test_returns_and_callback_and_no_graph_through_network():
    """returns=last_sample is the x0 drawn before the final Adam step (with sigma_x0 = 0 and one step: pinv(y));
    returns=mu is after it.  The callback is sparse (every log_every steps and the last) with (B,) loss tensors.
    The network is called under no_grad."""
    op, prior, y = dense_problem()
    last = REDDiff(steps=1, returns="last_sample").sample(y, op, prior, BatchRNG(0))
    mu = REDDiff(steps=1, returns="mu").sample(y, op, prior, BatchRNG(0))
    assert torch.equal(last, op.pinv(y)) and (mu - last).abs().max() > 1e-3

    grad_modes = []
    orig = prior._eps
    prior._eps = lambda x, t: (grad_modes.append(torch.is_grad_enabled()), orig(x, t))[1]
    calls = []
    REDDiff(steps=25, log_every=10).sample(y, op, prior, BatchRNG([1, 2, 3, 4]), callback=lambda i, info: calls.append((i, info)))
    prior._eps = orig
    assert grad_modes == [False] * 25
    assert [i for i, _ in calls] == [0, 10, 20, 24]
    info = calls[-1][1]
    for k in ("loss", "loss_noise", "loss_obs"):
        assert info[k].shape == (4,) and not info[k].requires_grad
    assert torch.allclose(info["loss"], info["loss_noise"] + info["loss_obs"])


def test_nonlinear_operator_and_validation():
    """A forward-only nonlinear operator works (autograd through the operator only).  Invalid settings fail
    with messages naming the setting."""
    class Tanh(LinearOperator):   # forward-only use; 'linear' is irrelevant to RED-diff
        linear = False

        def forward(self, x):
            return torch.tanh(2 * x)

        def pinv(self, y):          # a crude initialisation (the linearisation at 0), as for HDR
            return y / 2

    prior = GaussianPrior(dim=6, cov=torch.full((6,), 0.3))
    op = Tanh(value_range=1.0)
    x_true = prior.sample(4, BatchRNG(0))
    y = op.forward(x_true)
    r0 = (op.forward(op.pinv(y)) - y).norm()
    x = REDDiff(steps=100, lr=0.05).sample(y, op, prior, BatchRNG([1, 2, 3, 4]))
    assert torch.isfinite(x).all() and (op.forward(x) - y).norm() < 0.5 * r0

    for bad, match in [(dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(weighting="cubic"), "weighting"),
                       (dict(ordering="shuffled"), "ordering"), (dict(returns="x0"), "returns"),
                       (dict(lr=0.0), "lr"), (dict(lam=-1.0), "lam"), (dict(lr=[0.1, float("nan")]), "lr")]:
        with pytest.raises(ValueError, match=match):
            REDDiff(**bad)
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\]"):
        REDDiff(steps=1001).sample(y, op, prior, BatchRNG(0))
