"""Baseline samplers (Pi-GDM, DDRM, DPS, DDIM, pinv), the dense MatrixOperator and the Gaussian prior.

The reference problem: a standard-normal prior in d = 6 and a random 3 x 6 MatrixOperator.  With an isotropic prior
every spectral component ``V^T x`` evolves independently and linearly in Pi-GDM and DDRM, so the *law of the
discrete chain* (mean and covariance of the sampler's output for the given step count) can be computed by a scalar
recursion written here independently of the samplers' code (VE coordinates for DDRM).  Each test then checks

* samples against that law, with tolerances from the sample size (z-scores), which tests the implementation, and
* that law against the exact posterior (Kalman form), which measures the method's discretisation / approximation
  bias at that step count.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reddiff.baselines.ddim import DDIM
from reddiff.baselines.ddrm import DDRM
from reddiff.baselines.dps import DPS
from reddiff.baselines.pigdm import PiGDM
from reddiff.baselines.pinv import Pinv
from reddiff.core.diffusion import timesteps
from reddiff.operators.base import Operator, OperatorCapabilityError, SVDOperator
from reddiff.operators.matrix import MatrixOperator
from reddiff.priors.gaussian import GaussianPrior
from reddiff.core.rng import BatchRNG
from reddiff.samplers.reddiff import REDDiff

torch.set_num_threads(1)

Z_MAX = 5.0  # |z| bound for sample moments: P(|N(0,1)| > 5) = 6e-7 per entry, ~30 entries per check


# ---------------------------------------------------------------------------------------------------------- fixtures
def gauss_problem(sigma_y: float, d: int = 6, m: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, d, generator=g, dtype=torch.float64)
    op = MatrixOperator(A, sigma_y=sigma_y)
    prior = GaussianPrior(dim=d)
    x = torch.randn(1, d, generator=g, dtype=torch.float64)
    y1 = x @ A.T + sigma_y * torch.randn(1, m, generator=g, dtype=torch.float64)
    return op, prior, y1.float()


def moment_z(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor):
    """Largest |z| of the sample mean and sample covariance entries against a Gaussian law (mean, cov).

    SE(mean_i) = sqrt(C_ii / N);  SE(cov_ij) = sqrt((C_ii C_jj + C_ij^2) / N)  (Gaussian fourth moments).
    """
    x = x.double()
    N = x.shape[0]
    dm = x.mean(0) - mean
    dc = torch.cov(x.T) - cov
    v = cov.diag().clamp_min(1e-12)
    zm = (dm / (v / N).sqrt()).abs().max()
    zc = (dc / ((v[:, None] * v[None, :] + cov ** 2) / N).sqrt()).abs().max()
    return float(zm), float(zc)


def _spectral(op: MatrixOperator, y1):
    d, k = op.d, op.singulars().numel()
    s = torch.zeros(d, dtype=torch.float64)
    s[:k] = op.singulars()
    uy = torch.zeros(d, dtype=torch.float64)
    uy[:k] = (y1.double() @ op._U64)[0, :k]
    return s, uy


def pigdm_law(op, y1, sch, steps, eta=1.0, w=1.0):
    """Output law of PiGDM(form='score') for a standard-normal prior: per spectral component (VP coordinates),
    x0_hat = sqrt(a) x, J = sqrt(a), g = J s (U^T y - s x0_hat) / ((1-a) s^2 + sigma^2), so x_s = alpha x + beta + c1 z."""
    s, uy = _spectral(op, y1)
    sig2 = op.noise_std ** 2
    ts = timesteps(steps, "descending", T=sch.T)
    a0 = float(sch.alpha_bar_at(ts[0]))
    obs = s > 0
    one = torch.ones_like(s)
    mean = math.sqrt(a0) * torch.where(obs, uy / torch.where(obs, s, one), 0 * s)
    var = torch.full_like(s, 1 - a0)
    for i, t in enumerate(ts):
        a = float(sch.alpha_bar_at(t))
        a_s = float(sch.alpha_bar_at(ts[i + 1] if i + 1 < len(ts) else -1))
        c1 = eta * math.sqrt((1 - a / a_s) * (1 - a_s) / (1 - a))
        c2 = math.sqrt(max(1 - a_s - c1 ** 2, 0.0))
        D = torch.where(obs, (1 - a) * s ** 2 + sig2, one)
        g0 = torch.where(obs, math.sqrt(a) * s * uy / D, 0 * s)
        g1 = torch.where(obs, -a * s ** 2 / D, 0 * s)
        alpha = math.sqrt(a_s) * (math.sqrt(a) + w * (1 - a) * g1 / math.sqrt(a)) + c2 * math.sqrt(1 - a) * (1 - w * g1)
        beta = (math.sqrt(a_s) * w * (1 - a) / math.sqrt(a) - c2 * w * math.sqrt(1 - a)) * g0
        mean = alpha * mean + beta
        var = alpha ** 2 * var + c1 ** 2
    V = op._V64
    return V @ mean, (V * var) @ V.T


def ddrm_law(op, y1, sch, steps, eta=0.85, eta_b=1.0):
    """Output law of DDRM for a standard-normal prior, in VE coordinates u = V^T x / sqrt(a), where
    E[x0 | u] = u / (1 + sigma_t^2) per component (the DDRM paper's three cases, each affine in u)."""
    s, uy = _spectral(op, y1)
    sy = op.noise_std
    obs = s > 0
    one = torch.ones_like(s)
    yb = torch.where(obs, uy / torch.where(obs, s, one), 0 * s)
    ny = torch.where(obs, sy / torch.where(obs, s, one), 0 * s)
    ts = timesteps(steps, "descending", T=sch.T)

    def sig(t):
        a = float(sch.alpha_bar_at(t))
        return math.sqrt((1 - a) / a)

    sT = sig(ts[0])
    large = obs & (s * sT > sy)
    mean = torch.where(large, yb, 0 * s)
    var = torch.where(large, (sT ** 2 - ny ** 2).clamp_min(0), sT ** 2 * one)
    cm = math.sqrt(1 - eta ** 2)
    for i, t in enumerate(ts):
        st = sig(t)
        ss = sig(ts[i + 1]) if i + 1 < len(ts) else 0.0
        k0 = 1 / (1 + st ** 2)
        before = obs & (s * ss >= sy)
        after = obs & ~before
        nys = ny.clamp_min(1e-30)
        al = torch.where(before, (1 - eta_b) * k0 * one, torch.where(after, k0 * (1 - cm * ss / nys), (1 + cm * ss * st) * k0 * one))
        be = torch.where(before, eta_b * yb, torch.where(after, cm * ss * yb / nys, 0 * s))
        no = torch.where(before, (ss ** 2 - eta_b ** 2 * ny ** 2).clamp_min(0), (eta * ss) ** 2 * one)
        mean = al * mean + be
        var = al ** 2 * var + no
    V = op._V64
    return V @ mean, (V * var) @ V.T


class MaskOperator(SVDOperator):
    """Per-image random pixel masks on (B, C, H, W) images: V = U = identity, singulars (B, n) in {0, 1}."""

    name = "mask"

    def __init__(self, sigma_y=0.0, keep=0.5, seed=0):
        super().__init__(sigma_y=sigma_y)
        self.keep, self.seed = keep, seed

    def setup(self, indices, x_shape, device=None, dtype=None):
        self.x_shape = tuple(x_shape[1:])
        n = math.prod(self.x_shape)
        self.mask = torch.stack([(torch.rand(n, generator=torch.Generator().manual_seed(self.seed + int(i))) < self.keep).float()
                                 for i in indices])
        return self

    def Vt(self, x):
        return x.reshape(x.shape[0], -1)

    def V(self, z):
        return z.reshape((z.shape[0],) + self.x_shape)

    def Ut(self, y):
        return y

    def U(self, z):
        return z

    def singulars(self):
        return self.mask

    def y_numel(self):
        return math.prod(self.x_shape)


class ClipOperator(Operator):
    """A nonlinear operator (HDR-like): clip(2x, -1, 1); pinv(y) = y / 2."""

    name = "clip"

    def forward(self, x):
        return (2 * x).clamp(-1, 1)

    def pinv(self, y):
        return y / 2


class AvgPoolOperator(Operator):
    """Image average pooling with an integer ``factor`` (for the bicubic baseline)."""

    name = "avgpool"

    def __init__(self, factor=2):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return F.avg_pool2d(x, self.factor)

    def pinv(self, y):
        return F.interpolate(y, scale_factor=self.factor, mode="nearest")


# ---------------------------------------------------------------------------------------------------------- MatrixOperator
@pytest.mark.parametrize("m,d,rank", [(3, 6, 3), (6, 4, 4), (4, 7, 2)])
def test_matrix_operator_svd_identities(m, d, rank):
    """Float64 identities to 1e-10 (exact up to rounding): orthogonality, H = U S V^T, adjoint, Moore-Penrose pinv."""
    g = torch.Generator().manual_seed(m * 10 + d)
    A = torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, d, generator=g, dtype=torch.float64)
    op = MatrixOperator(A, sigma_y=0.1)
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    y = torch.randn(5, m, generator=g, dtype=torch.float64)
    U, V, s = op._U64, op._V64, op.singulars()
    assert torch.allclose(U.T @ U, torch.eye(m, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(V.T @ V, torch.eye(d, dtype=torch.float64), atol=1e-10)
    assert s.shape == (min(m, d),) and int((s > 0).sum()) == rank            # rank-deficient -> exact zeros
    assert torch.allclose(op.V(op.Vt(x)), x, atol=1e-10) and torch.allclose(op.U(op.Ut(y)), y, atol=1e-10)
    assert torch.allclose(op.forward(x), x @ A.T, atol=1e-10)
    spectral = op.U(op._spectral_mul(op.Vt(x), s, m))                         # U diag(s) V^T x
    assert torch.allclose(spectral, x @ A.T, atol=1e-10)
    assert torch.allclose(op.adjoint(y), y @ A, atol=1e-10)
    assert torch.allclose(op.pinv(y), y @ torch.linalg.pinv(A).T, atol=1e-9)
    assert op.noise_std == pytest.approx(0.1)                                   # value_range = 1
    op2 = MatrixOperator.from_svd(U, torch.linspace(1.0, 0.5, min(m, d)), V)
    assert torch.allclose(op2.forward(x), x @ op2.matrix.T) and torch.allclose(op2.singulars(), torch.linspace(1.0, 0.5, min(m, d), dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(B, %d\)" % d):
        op.forward(torch.zeros(2, d + 1))
    with pytest.raises(ValueError, match="orthogonal"):
        MatrixOperator.from_svd(2 * U, s, V)


# ---------------------------------------------------------------------------------------------------------- Gaussian prior
def test_gaussian_prior_exact_eps_and_posterior():
    """eps against an independent dense formula for E[x0 | x_t] (float64, 1e-10); the posterior's Kalman form
    against the precision form (well conditioned here, sigma_y = 0.5)."""
    g = torch.Generator().manual_seed(1)
    d = 5
    L = torch.randn(d, d, generator=g, dtype=torch.float64)
    Sig = L @ L.T / d + 0.2 * torch.eye(d, dtype=torch.float64)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    prior = GaussianPrior(dim=d, mean=mean, cov=Sig)
    for t in (0, 250, 999):
        a = float(prior.schedule.alpha_bar_at(t))
        xt = torch.randn(7, d, generator=g, dtype=torch.float64)
        C = a * Sig + (1 - a) * torch.eye(d, dtype=torch.float64)
        ex0 = mean + math.sqrt(a) * torch.linalg.solve(C, (xt - math.sqrt(a) * mean).T).T @ Sig   # E[x0|x_t]
        assert torch.allclose(prior.x0(xt, t), ex0, atol=1e-10)
    diag = GaussianPrior(shape=(1, 2, 2), mean=mean[:4], cov=Sig.diag()[:4])
    full = GaussianPrior(dim=4, mean=mean[:4], cov=torch.diag(Sig.diag()[:4]))
    xt = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64)
    assert torch.allclose(diag.eps(xt, 500).reshape(3, 4), full.eps(xt.reshape(3, 4), 500), atol=1e-12)
    A = torch.randn(2, d, generator=g, dtype=torch.float64)
    y = torch.randn(4, 2, generator=g, dtype=torch.float64)
    pm, pc = prior.posterior(A, y, 0.5)
    P = torch.linalg.inv(Sig) + A.T @ A / 0.25
    pc2 = torch.linalg.inv(P)
    pm2 = (pc2 @ (torch.linalg.solve(Sig, mean)[:, None] + A.T @ y.T / 0.25)).T
    assert torch.allclose(pc, pc2, atol=1e-10) and torch.allclose(pm, pm2, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------- Pi-GDM
@pytest.mark.parametrize("sigma_y", [0.3, 0.0])
def test_pigdm_matches_exact_gaussian_posterior(sigma_y):
    """Standard-normal prior, where Pi-GDM's Gaussian approximation (r_t^2 = 1 - a_t) is exact.

    1. The chain's law converges to the exact posterior: max |cov error| 0.068 at 100 steps -> 0.008 at 1000
       (O(1/steps), eta = 1).  Asserted: < 0.02 at 1000 steps and decreasing with steps.
    2. 4000 samples at 1000 steps match that law with |z| < 5 (sample-size tolerance); with sigma_y = 0 the
       posterior is degenerate in the observed directions, so there H x = y is asserted to 1e-3 (float32).
    3. Hence they match the exact posterior within 5 SE + the law's bias.
    """
    op, prior, y1 = gauss_problem(sigma_y)
    pm, pc = prior.posterior(op, y1, sigma_y)
    lm100, lc100 = pigdm_law(op, y1, prior.schedule, 100)
    lm, lc = pigdm_law(op, y1, prior.schedule, 1000)
    bias = float((lc - pc).abs().max())
    assert bias < 0.02 and bias < float((lc100 - pc).abs().max())
    assert float((lm - pm[0]).abs().max()) < 1e-3
    N = 4000
    x = PiGDM(steps=1000, eta=1.0).sample(y1.expand(N, -1).contiguous(), op, prior, BatchRNG(3))
    assert x.shape == (N, 6) and torch.isfinite(x).all()
    if sigma_y > 0:
        zm, zc = moment_z(x, lm, lc)
        assert zm < Z_MAX and zc < Z_MAX, (zm, zc)
        v = pc.diag()
        assert ((x.double().mean(0) - pm[0]).abs() <= Z_MAX * (v / N).sqrt() + 1e-3).all()
        assert ((torch.cov(x.double().T) - pc).abs() <= Z_MAX * ((v[:, None] * v[None] + pc ** 2) / N).sqrt() + bias).all()
    else:
        assert (op.forward(x.double()) - y1.double()).abs().max() < 1e-3
        assert (x.double().mean(0) - pm[0]).abs().max() < Z_MAX * math.sqrt(1 / N) + 1e-3
        assert (torch.cov(x.double().T) - pc).abs().max() < Z_MAX * math.sqrt(2 / N) + bias


def test_pigdm_pinv_form_equals_closed_form_when_noiseless():
    """(H^+ y - H^+ H x0) / r^2 equals the closed form at sigma_y = 0: same seeds give the same samples
    (float64, 1e-8); with sigma_y > 0 the two differ (the pinv form ignores the noise)."""
    op, prior, y1 = gauss_problem(0.0)
    y = y1.double().expand(8, -1).contiguous()
    a = PiGDM(steps=50, mode="svd").sample(y, op, prior, BatchRNG(list(range(8))))
    b = PiGDM(steps=50, mode="pinv").sample(y, op, prior, BatchRNG(list(range(8))))
    assert (a - b).abs().max() < 1e-8
    op_n, _, _ = gauss_problem(0.3)
    a = PiGDM(steps=50, mode="svd").sample(y, op_n, prior, BatchRNG(list(range(8))))
    b = PiGDM(steps=50, mode="pinv").sample(y, op_n, prior, BatchRNG(list(range(8))))
    assert (a - b).abs().max() > 1e-3


def test_pigdm_start_t_and_official_form():
    """start_t=500 visits `steps` timesteps below 500 (callback) and costs `steps` NFE.  The official form
    (RED-diff repository update) differs from the score form on a correlated prior (on an isotropic one, noiseless,
    both end in the same projection onto Hx = y, so they coincide there), and both are data-consistent when
    noiseless (|Hx - y| < 1e-3, float32; measured ~1e-5)."""
    op, prior, y1 = gauss_problem(0.0)
    y = y1.expand(16, -1).contiguous()
    seen = []
    prior.reset_nfe()
    PiGDM(steps=25, start_t=500, log_every=1).sample(y, op, prior, BatchRNG(0), callback=lambda i, info: seen.append(info["t"]))
    assert seen == timesteps(25, "descending", T=500) and max(seen) < 500 and prior.nfe == 25
    g = torch.Generator().manual_seed(0)
    L = torch.randn(6, 6, generator=g, dtype=torch.float64)
    corr = GaussianPrior(dim=6, cov=L @ L.T / 6 + 0.1 * torch.eye(6, dtype=torch.float64))
    xs = PiGDM(steps=50).sample(y, op, corr, BatchRNG(list(range(16))))
    xo = PiGDM(steps=50, form="official").sample(y, op, corr, BatchRNG(list(range(16))))
    assert (xs - xo).abs().max() > 1e-2
    for x in (xs, xo):
        assert (op.forward(x) - y).abs().max() < 1e-3
    with pytest.raises(ValueError, match="start_t"):
        PiGDM(steps=100, start_t=50)


# ---------------------------------------------------------------------------------------------------------- DDRM
@pytest.mark.parametrize("sigma_y", [0.3, 0.0])
def test_ddrm_matches_its_gaussian_law(sigma_y):
    """DDRM's chain is affine in each spectral component for a standard-normal prior; 4000 samples (20 steps,
    eta 0.85, eta_b 1) match its law with |z| < 5.  Against the exact posterior the law is biased -- DDRM is not an
    exact posterior sampler: its total variance is too small (trace ~0.64x the posterior's, max entry error ~0.31)
    while the posterior mean is met within 0.05.  With eta = 0, noiseless, 1000 steps it converges (law error < 0.01)."""
    op, prior, y1 = gauss_problem(sigma_y)
    pm, pc = prior.posterior(op, y1, sigma_y)
    lm, lc = ddrm_law(op, y1, prior.schedule, 20)
    N = 4000
    prior.reset_nfe()
    x = DDRM().sample(y1.expand(N, -1).contiguous(), op, prior, BatchRNG(5))
    assert prior.nfe == 20
    if sigma_y > 0:
        zm, zc = moment_z(x, lm, lc)
        assert zm < Z_MAX and zc < Z_MAX, (zm, zc)
    else:   # degenerate directions: compare with float32-level absolute tolerances
        assert (op.forward(x.double()) - y1.double()).abs().max() < 1e-4
        assert (x.double().mean(0) - lm).abs().max() < Z_MAX * math.sqrt(1 / N)
        assert (torch.cov(x.double().T) - lc).abs().max() < Z_MAX * math.sqrt(2 / N)
    assert float((lm - pm[0]).abs().max()) < 0.05
    assert float(lc.trace()) < 0.8 * float(pc.trace())                 # DDRM under-disperses (measured ~0.64x)
    if sigma_y == 0:
        lm0, lc0 = ddrm_law(op, y1, prior.schedule, 1000, eta=0.0)
        assert float((lc0 - pc).abs().max()) < 0.01 and float((lm0 - pm[0]).abs().max()) < 1e-3


def test_ddrm_per_image_singulars_with_zeros():
    """Per-image (B, n) 0/1 singulars on 4-D images: noiseless DDRM keeps every observed pixel exactly
    (1e-5, float32) and fills the others; a batch equals a loop over images bitwise."""
    prior = GaussianPrior(shape=(2, 4, 4), mean=torch.linspace(-0.5, 0.5, 32), cov=torch.linspace(0.2, 1.0, 32))
    op = MaskOperator(keep=0.4).setup([0, 1, 2], (3, 2, 4, 4))
    x_true = prior.sample(3, BatchRNG(9))
    y = op.forward(x_true)
    x = DDRM().sample(y, op, prior, BatchRNG([1, 2, 3]))
    assert x.shape == (3, 2, 4, 4)
    mask = op.mask.reshape(3, 2, 4, 4).bool()
    assert (x - x_true)[mask].abs().max() < 1e-5
    assert (x - x_true)[~mask].abs().max() > 0.05
    loop = []
    for i in range(3):
        op.setup([i], (1, 2, 4, 4))
        loop.append(DDRM().sample(y[i:i + 1], op, prior, BatchRNG([i + 1])))
    assert torch.equal(torch.cat(loop), x)


def test_ddrm_refuses_nonlinear_operator():
    op = ClipOperator()
    prior = GaussianPrior(dim=4)
    with pytest.raises(OperatorCapabilityError, match=r"ddrm needs an operator with svd.*ClipOperator"):
        DDRM().sample(torch.zeros(2, 4), op, prior, BatchRNG(0))
    with pytest.raises(OperatorCapabilityError, match="svd"):
        DDRM().check(op)
    with pytest.raises(OperatorCapabilityError, match="pigdm needs an operator with svd"):
        PiGDM(mode="svd").sample(torch.zeros(2, 4), op, prior, BatchRNG(0))


# ---------------------------------------------------------------------------------------------------------- DPS
def test_dps_mean_near_posterior_mean():
    """DPS is not an exact sampler; its sample mean (2000 samples, 100 steps, zeta 0.3) must land near the
    posterior mean: within 0.15 * ||posterior mean - prior mean|| (measured ~0.08 relative for zeta in [0.1, 1]);
    unconditional DDIM (ignore the data) is ~1.0 away in the same units and a too-small zeta (0.01) ~0.5."""
    op, prior, y1 = gauss_problem(0.3)
    pm, _ = prior.posterior(op, y1, 0.3)
    N = 2000
    y = y1.expand(N, -1).contiguous()
    prior.reset_nfe()
    x = DPS(steps=100, zeta=0.3).sample(y, op, prior, BatchRNG(2))
    assert prior.nfe == 100
    scale = float(pm[0].norm())
    err = float((x.double().mean(0) - pm[0]).norm())
    assert err < 0.15 * scale, (err, scale)
    x_small = DPS(steps=100, zeta=0.01).sample(y, op, prior, BatchRNG(2))
    assert float((x_small.double().mean(0) - pm[0]).norm()) > 2 * err


def test_dps_and_pigdm_on_nonlinear_operator():
    """Forward-only operators work: DPS and Pi-GDM (pinv form) reduce the measurement residual relative to the
    unconditional DDIM draw with the same seeds, by a factor 2 at least (measured: DPS zeta 0.1 ~5x, Pi-GDM ~300x;
    DPS's fixed step zeta / ||r|| overshoots on this prior of variance 0.1 for zeta >= 0.3)."""
    op = ClipOperator()
    prior = GaussianPrior(dim=8, cov=torch.full((8,), 0.1))
    x_true = prior.sample(6, BatchRNG(4))
    y = op.forward(x_true)
    rng = lambda: BatchRNG(list(range(6)))
    r_ddim = (op.forward(DDIM(steps=50).sample(y, op, prior, rng())) - y).norm()
    for smp in (DPS(steps=50, zeta=0.1), PiGDM(steps=50)):
        x = smp.sample(y, op, prior, rng())
        assert torch.isfinite(x).all()
        assert (op.forward(x) - y).norm() < 0.5 * r_ddim, type(smp).__name__


# ---------------------------------------------------------------------------------------------------------- DDIM / pinv
def test_ddim_samples_prior():
    """Unconditional DDIM (eta 1, 200 steps) on N(m, diag v): mean within 5 SE, variance within 5 SE + 3%
    (strided-schedule bias, measured ~1%)."""
    mean = torch.tensor([1.0, -0.5, 0.0, 2.0])
    var = torch.tensor([0.25, 1.0, 0.5, 0.1])
    prior = GaussianPrior(dim=4, mean=mean, cov=var)
    N = 4000
    x = DDIM(steps=200, eta=1.0).sample(torch.zeros(N, 1), None, prior, BatchRNG(8)).double()
    assert ((x.mean(0) - mean).abs() < Z_MAX * (var / N).sqrt()).all()
    assert ((x.var(0) - var).abs() < Z_MAX * var * math.sqrt(2 / N) + 0.03 * var).all()


def test_pinv_and_bicubic():
    op, prior, y1 = gauss_problem(0.0)
    prior.reset_nfe()
    assert torch.equal(Pinv().sample(y1, op, prior, BatchRNG(0)), op.pinv(y1)) and prior.nfe == 0
    with pytest.raises(OperatorCapabilityError, match="factor"):
        Pinv(bicubic=True).sample(y1, op, prior, BatchRNG(0))
    img_prior = GaussianPrior(shape=(3, 8, 8))
    sr = AvgPoolOperator(factor=2)
    y = sr.forward(torch.rand(2, 3, 8, 8) * 2 - 1)
    x = Pinv(bicubic=True).sample(y, sr, img_prior, BatchRNG([0, 1]))
    assert torch.equal(x, F.interpolate(y, scale_factor=2, mode="bicubic", align_corners=False).clamp(-1, 1))


# ---------------------------------------------------------------------------------------------------------- batch == loop
def _sampler(name):
    """Every registered sampler with a 30-step chain (and its own test settings); RED-diff with sigma_x0 > 0 so that
    both of its noise streams are exercised."""
    from reddiff import registry

    kw = {"steps": 30} if "steps" in registry.sampler_config(name) else {}
    kw.update(registry.sampler_class(name).test_overrides)
    kw.update({"reddiff": {"sigma_x0": 0.1}, "dps": {"zeta": 0.3}}.get(name, {}))
    return registry.build_sampler(name, **kw)


def _names():
    from reddiff import registry

    return registry.sampler_names()


def _seen(name, prior, op):
    """For a sampler that needs a latent prior (``needs_latent``): the same prior read as a latent one with the
    elementwise linear decoder ``D(z) = 1.5 z`` (``E = D^-1``), and the operator seen through it (as the runner's
    ``ThroughDecoder``); other samplers get the prior and operator unchanged."""
    from reddiff import registry
    from reddiff.operators.base import ThroughDecoder

    if not getattr(registry.sampler_class(name), "needs_latent", False):
        return prior, op
    prior.decode, prior.encode = (lambda z: 1.5 * z), (lambda x: x / 1.5)
    return prior, ThroughDecoder(op, prior.decode, prior.encode)


@pytest.mark.parametrize("name", _names())
def test_batch_equals_loop_elementwise_bitwise(name):
    """4-D images, per-image masks and a diagonal prior (all elementwise): a batch of 4 equals four batches of 1
    under the same per-item seeds, bitwise."""
    smp = _sampler(name)
    prior = GaussianPrior(shape=(1, 4, 4), mean=torch.linspace(-1, 1, 16), cov=torch.linspace(0.1, 1.0, 16))
    op = MaskOperator(sigma_y=0.05, keep=0.5).setup(range(4), (4, 1, 4, 4))
    y = op.measure(prior.sample(4, BatchRNG(7)), BatchRNG([20, 21, 22, 23]))
    seeds = [11, 12, 13, 14]
    prior, seen = _seen(name, prior, op)
    xb = smp.sample(y, seen, prior, BatchRNG(seeds))
    xl = []
    for i in range(4):
        op.setup([i], (1, 1, 4, 4))
        xl.append(smp.sample(y[i:i + 1], seen, prior, BatchRNG([seeds[i]])))
    assert torch.equal(xb, torch.cat(xl)), type(smp).__name__


@pytest.mark.parametrize("name", _names())
def test_batch_equals_loop_dense_float64(name):
    """Dense MatrixOperator and full-covariance prior: BLAS sums in a different order for a batch of 1 (gemv) and
    of 4 (gemm), so results agree to rounding, not bitwise: asserted 1e-9 in float64 (a wrong per-item random
    stream would differ by O(1))."""
    smp = _sampler(name)
    g = torch.Generator().manual_seed(3)
    d, m = 8, 3
    L = torch.randn(d, d, generator=g, dtype=torch.float64)
    prior = GaussianPrior(dim=d, mean=torch.randn(d, generator=g, dtype=torch.float64), cov=L @ L.T / d + 0.1 * torch.eye(d))
    op = MatrixOperator(torch.randn(m, d, generator=g, dtype=torch.float64), sigma_y=0.1)
    y = torch.randn(4, m, generator=g, dtype=torch.float64)
    seeds = [11, 12, 13, 14]
    prior, op = _seen(name, prior, op)
    xb = smp.sample(y, op, prior, BatchRNG(seeds))
    xl = torch.cat([smp.sample(y[i:i + 1], op, prior, BatchRNG([seeds[i]])) for i in range(4)])
    assert xb.dtype == torch.float64
    assert (xb - xl).abs().max() < 1e-9, type(smp).__name__


# ---------------------------------------------------------------------------------------------------------- configs
def test_sampler_configs_instantiate_with_task_overrides():
    """conf/sampler/*.yaml resolve against task.hparams (docs/ANCHORS.md defaults otherwise) and instantiate."""
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1] / "conf" / "sampler"
    expect = {"reddiff": (REDDiff, {"steps": 100, "lr": 0.5, "lam": 0.25, "weighting": "linear", "returns": "last_sample"}),
              "dps": (DPS, {"steps": 100, "zeta": 1.0, "eta": 1.0}),
              "pigdm": (PiGDM, {"steps": 100, "guidance_weight": 1.0, "start_t": None}),
              "ddrm": (DDRM, {"steps": 20, "eta": 0.85, "eta_b": 1.0}),
              "ddim": (DDIM, {"steps": 100}),
              "pinv": (Pinv, {"bicubic": False})}
    for name, (cls, attrs) in expect.items():
        cfg = OmegaConf.create({"task": {"name": "x"}, "sampler": OmegaConf.load(root / f"{name}.yaml")})
        smp = instantiate(cfg.sampler)
        assert isinstance(smp, cls)
        for k, v in attrs.items():
            assert getattr(smp, k) == v, (name, k)
    hp = {"reddiff": {"lr": 0.25, "lam": 1.0}, "dps": {"zeta": 0.1}, "pigdm": {"start_t": 500}}
    cfg = OmegaConf.create({"task": {"hparams": hp}})
    for name in ("reddiff", "dps", "pigdm"):
        cfg.sampler = OmegaConf.load(root / f"{name}.yaml")
        smp = instantiate(cfg.sampler)
        for k, v in hp[name].items():
            assert getattr(smp, k) == v, (name, k)


def test_sr4_task_hparams_reach_the_samplers():
    """Integration with conf/task/sr4.yaml (the task file's hparams block): Pi-GDM starts at t = 500, DPS zeta 1.0,
    and every sampler runs on the real sr4 operator (small 16 px images, few steps) with the right output shape."""
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1] / "conf"
    task_file = root / "task" / "sr4.yaml"
    if not task_file.is_file():
        pytest.skip("conf/task/sr4.yaml is not present")
    cfg = OmegaConf.create({"task": OmegaConf.load(task_file)})
    cfg.sampler = OmegaConf.load(root / "sampler" / "pigdm.yaml")
    assert instantiate(cfg.sampler).start_t == 500
    cfg.sampler = OmegaConf.load(root / "sampler" / "dps.yaml")
    assert instantiate(cfg.sampler).zeta == 1.0
    op = instantiate(cfg.task.operator).setup([0, 1], (2, 3, 16, 16), "cpu", torch.float32)
    prior = GaussianPrior(shape=(3, 16, 16), cov=torch.full((768,), 0.3))
    x = prior.sample(2, BatchRNG(0)).clamp(-1, 1)
    y = op.measure(x, BatchRNG([3, 4]))
    for smp in (REDDiff(steps=5), PiGDM(steps=5, start_t=500), DDRM(steps=5), DPS(steps=5), DDIM(steps=5),
                Pinv(), Pinv(bicubic=True)):
        out = smp.sample(y, op, prior, BatchRNG([1, 2]))
        assert out.shape == x.shape and torch.isfinite(out).all(), smp.name
