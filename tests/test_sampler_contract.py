"""Generic sampler tests, parametrised over the registry (every ``conf/sampler/*.yaml``): a new sampler joins them
by existing.  Each sampler runs on a vector prior (Gaussian mixture) and on an image prior (the embedded UNet), a
batch equals a loop over its items, the same seed gives the same output, an incompatible operator is refused before
any network call, the prior's NFE count equals ``expected_nfe``, and where the class declares ``exact_gaussian`` its
samples match the exact Gaussian posterior (mean and covariance) within the declared tolerances.

A sampler with ``needs_latent`` (defined only on a latent prior) runs the same tests on latent test priors: the
Gaussian mixture on latents with a linear decoder (``LinearDecoderGMM``) for the vector tests and the tiny random
diffusers model (``latent_tiny``) for the image test, seeing the data term through the decoder (``ThroughDecoder``)
as the runner gives it; and it must refuse a pixel prior in one line before any network call.
"""
from __future__ import annotations

import pytest
import torch

from reddiff import registry
from reddiff.operators.base import Operator, OperatorCapabilityError, ThroughDecoder
from reddiff.operators.matrix import MatrixOperator
from reddiff.priors.gaussian import GaussianPrior
from reddiff.priors.gmm import GaussianMixturePrior
from reddiff.core.rng import BatchRNG

torch.set_num_threads(1)
NAMES = registry.sampler_names()
STEPS = 12


def small(name: str, **kw):
    """The sampler from its YAML with a short chain and its own ``test_overrides``."""
    cfg = registry.sampler_config(name)
    over = {"steps": STEPS} if "steps" in cfg else {}
    over.update(registry.sampler_class(name).test_overrides)
    over.update(kw)
    return registry.build_sampler(name, **over)


class Clip(Operator):
    """A nonlinear vector operator, clip(2x), pinv(y) = y / 2: refused by samplers that need a linear one."""

    name = "clip"

    def __init__(self, sigma_y=0.05):
        super().__init__(sigma_y=sigma_y, value_range=1.0)

    def forward(self, x):
        return (2 * x).clamp(-1, 1)

    def pinv(self, y):
        return y / 2


def gmm_problem(dtype=torch.float32, B=3):
    g = torch.Generator().manual_seed(0)
    prior = GaussianMixturePrior.mcgdiff(4, g)
    A = torch.randn(2, 4, generator=g, dtype=torch.float64)
    op = MatrixOperator(A, sigma_y=0.5)
    x = prior.sample(B, g).to(torch.float64)
    y = (x @ A.T + 0.5 * torch.randn(B, 2, generator=g, dtype=torch.float64)).to(dtype)
    return prior, op, y


def latent(name: str) -> bool:
    return bool(getattr(registry.sampler_class(name), "needs_latent", False))


def latent_gmm_problem(dtype=torch.float32, B=3):
    """The vector problem on latents: the same mixture on ``z`` in R^4, decoded by a fixed ``W`` (6 x 4) to pixels,
    ``y = A W z + noise``; the sampler sees ``ThroughDecoder(A, D, E)`` (as the runner builds it)."""
    from reddiff.priors.latent import LinearDecoderGMM

    g = torch.Generator().manual_seed(0)
    base = GaussianMixturePrior.mcgdiff(4, g)
    W = torch.randn(6, 4, generator=g, dtype=torch.float64)
    prior = LinearDecoderGMM(base.means, W, base.weights)
    A = torch.randn(2, 6, generator=g, dtype=torch.float64) / 2
    op = MatrixOperator(A, sigma_y=0.5)
    z = prior.sample(B, g).to(torch.float64)
    y = (z @ W.T @ A.T + 0.5 * torch.randn(B, 2, generator=g, dtype=torch.float64)).to(dtype)
    return prior, ThroughDecoder(op, prior.decode, prior.encode), y


def problem_for(name: str, dtype=torch.float32, B=3):
    """:func:`gmm_problem`, or :func:`latent_gmm_problem` for a sampler that needs a latent prior."""
    return latent_gmm_problem(dtype, B) if latent(name) else gmm_problem(dtype, B)


@pytest.fixture(scope="module")
def latent_tiny():
    pytest.importorskip("diffusers")
    from reddiff.priors.latent import LatentPrior

    return LatentPrior("latent_tiny").eval()


@pytest.fixture(scope="module")
def embedded():
    from reddiff.priors.unet import UNetPrior

    return UNetPrior(weights="embedded64", arch="embedded64", device="cpu").eval()


def test_registry_lists_every_yaml():
    from reddiff.registry import conf_dir

    assert NAMES == sorted(p.stem for p in (conf_dir() / "sampler").glob("*.yaml"))
    for n in NAMES:
        info = registry.sampler_info(n)
        assert info["speed_limit"] == (1.10 if info["needs_grad"] else 1.05)


@pytest.mark.parametrize("name", NAMES)
def test_runs_on_vector_gmm_prior(name):
    prior, op, y = problem_for(name)
    x = small(name).sample(y, op, prior, BatchRNG([0, 1, 2]))
    assert x.shape == (3, 4) and torch.isfinite(x).all()


@pytest.mark.parametrize("name", NAMES)
def test_runs_on_image_prior(name, request):
    """The embedded UNet, or for a latent-only sampler the tiny latent model (pixels 64 x 64, latents 4 x 16 x 16)."""
    from reddiff.registry import build_operator

    prior = request.getfixturevalue("latent_tiny" if latent(name) else "embedded")
    op = build_operator("sr4", sigma_y=0.05).setup([0, 1], (2, 3, 64, 64), "cpu", torch.float32)
    x_true = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = op.measure(x_true, BatchRNG([5, 6]))
    smp = small(name, steps=4) if "steps" in registry.sampler_config(name) else small(name)
    if latent(name):
        op = ThroughDecoder(op, prior.decode, prior.encode)
    prior.reset_nfe()
    x = smp.sample(y, op, prior, BatchRNG([0, 1]))
    assert x.shape == (2, *prior.shape) and torch.isfinite(x).all()
    assert prior.nfe == smp.expected_nfe(prior)


@pytest.mark.parametrize("name", NAMES)
def test_batch_equals_loop(name):
    """Per-item seeds: a batch of 3 equals three batches of 1 (float64, dense operator: to rounding)."""
    prior, op, y = problem_for(name, torch.float64)
    smp = small(name)
    xb = smp.sample(y, op, prior, BatchRNG([11, 12, 13]))
    xl = torch.cat([smp.sample(y[i:i + 1], op, prior, BatchRNG([11 + i])) for i in range(3)])
    assert (xb - xl).abs().max() < 1e-8


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_output(name):
    prior, op, y = problem_for(name)
    smp = small(name)
    a = smp.sample(y, op, prior, BatchRNG([4, 5, 6]))
    b = smp.sample(y, op, prior, BatchRNG([4, 5, 6]))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_incompatible_operator_refused_up_front(name):
    """A sampler that requires a capability the nonlinear (differentiable) operator lacks refuses it before any
    network call; one that requires nothing it lacks runs on it."""
    prior, _, y = problem_for(name)
    smp = small(name)
    op = ThroughDecoder(Clip(), prior.decode, prior.encode) if latent(name) else Clip()
    prior.reset_nfe()
    if not all(op.has(c) for c in smp.requires):
        with pytest.raises(OperatorCapabilityError, match=smp.name):
            smp.check(op)
        with pytest.raises(OperatorCapabilityError):
            smp.sample(torch.zeros(3, 4), op, prior, BatchRNG([0, 1, 2]))
        assert prior.nfe == 0
    else:
        x = smp.sample(op.forward(y.new_zeros(3, 4) + 0.1), op, prior, BatchRNG([0, 1, 2]))
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", NAMES)
def test_nfe_counted(name):
    prior, op, y = problem_for(name)
    smp = small(name)
    prior.reset_nfe()
    smp.sample(y, op, prior, BatchRNG([0, 1, 2]))
    assert prior.nfe == smp.expected_nfe(prior)
    if "steps" in registry.sampler_config(name):
        assert prior.nfe > 0


@pytest.mark.parametrize("name", NAMES)
def test_latent_only_sampler_refuses_a_pixel_prior(name):
    """A sampler that needs a latent prior refuses a pixel prior in one line (ValueError from ``check_prior``,
    which the runner turns into exit 2) before any network call; the others do not declare it."""
    if not latent(name):
        assert not registry.sampler_info(name)["needs_latent"]
        return
    prior, op, y = gmm_problem()
    smp = small(name)
    prior.reset_nfe()
    with pytest.raises(ValueError, match=rf"^{name}: needs a latent prior .*; prior gmm is a pixel prior$"):
        smp.check_prior(prior)
    with pytest.raises(ValueError, match=rf"^{name}: needs a latent prior"):
        smp.sample(y, op, prior, BatchRNG([0, 1, 2]))
    assert prior.nfe == 0 and registry.sampler_info(name)["needs_latent"]


EXACT = [n for n in NAMES if registry.sampler_class(n).exact_gaussian is not None]


@pytest.mark.parametrize("name", EXACT)
def test_exact_gaussian_posterior(name):
    """Mean and covariance of 4000 samples against the exact posterior of N(0, Sigma) with y = A x + noise
    (``Sigma`` a random full covariance, or the identity where the spec says ``"prior": "standard"``: methods
    whose Gaussian approximation of p(x0 | x_t) is exact only there, such as Pi-GDM)."""
    spec = registry.sampler_class(name).exact_gaussian
    g = torch.Generator().manual_seed(2)
    d, m = 6, 3
    L = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = L @ L.T / d + 0.2 * torch.eye(d, dtype=torch.float64)
    if spec.get("prior") == "standard":
        cov = torch.eye(d, dtype=torch.float64)
    prior = GaussianPrior(dim=d, cov=cov)
    A = torch.randn(m, d, generator=g, dtype=torch.float64)
    op = MatrixOperator(A, sigma_y=0.3)
    x = torch.linalg.cholesky(cov) @ torch.randn(d, generator=g, dtype=torch.float64)
    y1 = A @ x + 0.3 * torch.randn(m, generator=g, dtype=torch.float64)
    mean, pcov = prior.posterior(A, y1[None], 0.3)
    n = 4000
    smp = registry.build_sampler(name, **spec["overrides"])
    X = smp.sample(y1[None].expand(n, m).contiguous(), op, prior, BatchRNG(0, per_item=False)).double()
    mean, pcov = mean.reshape(-1), pcov.reshape(d, d)
    err_m = float((X.mean(0) - mean).norm() / pcov.diag().sum().sqrt())
    err_c = float((torch.cov(X.T) - pcov).norm() / pcov.norm())
    print(name, "exact-gaussian errors", err_m, err_c)
    assert err_m < spec["mean_tol"] and err_c < spec["cov_tol"], (err_m, err_c)
