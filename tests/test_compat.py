"""The official-pipeline compatibility switches (``conf/compat``, docs/DIFFERENCES.md), each checked against the
mathematics it claims, not against the reference code: the tiled-spectrum blur, the RED-diff pseudo-inverse,
the official step lists, the DPS step-size conventions and clamp, the batch-mean RED-diff loss, DDRM's last step,
the colorization row and the PNG round trip of the evaluation."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from reddiff.baselines.ddrm import DDRM
from reddiff.baselines.dps import DPS
from reddiff.core.diffusion import timesteps
from reddiff.metrics.suite import MetricSuite, png_roundtrip, psnr
from reddiff.operators.inpainting import Colorization
from reddiff.operators.matrix import MatrixOperator
from reddiff.operators.separable import SeparableBlur, ddrm_rank
from reddiff.priors.gaussian import GaussianPrior
from reddiff.core.rng import BatchRNG
from reddiff.samplers.reddiff import WEIGHTINGS, REDDiff

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
BLUR = dict(kernel="uniform", size=9, boundary="zero", window="ddrm", svd_cutoff=0.03)


def dense(fn, shape):
    """Columns fn(e_k) of a linear map on flattened ``shape`` tensors (float64)."""
    N = math.prod(shape)
    E = torch.eye(N, dtype=torch.float64)
    return torch.stack([fn(E[k].reshape(1, *shape)).reshape(-1) for k in range(N)], 1)


def ddrm_window_matrix(n: int) -> np.ndarray:
    """The 1-D matrix of DDRM's deblur_uni, from its definition: y[i] = sum_{j in [i-4, i+4), 0<=j<n} x[j] / 9."""
    A = np.zeros((n, n))
    for i in range(n):
        for j in range(max(0, i - 4), min(n, i + 4)):
            A[i, j] = 1 / 9
    return A


# ------------------------------------------------------------------------------------------------ blur spectrum
@pytest.mark.parametrize("n", [8, 16])
def test_official_blur_is_U_diag_tiled_singulars_Vt_and_not_a_blur(n):
    """ddrm_tiled == (Ua (x) Ua) diag(t_c) (Va (x) Va)^T per channel c, with t_c(i, j) = sorted(s)[(3 r + c) mod n^2]
    (s = sa (x) sa, r = rank of (i, j) in a descending sort), built here from numpy's 1-D SVD; no cross-channel
    terms; and it differs from the blur kron(A', A') by more than the blur's largest entry."""
    A = ddrm_window_matrix(n)
    Ua, sa, Vat = np.linalg.svd(A)
    sa = np.where(sa < 0.03, 0.0, sa)
    Aeff = Ua @ np.diag(sa) @ Vat
    s = np.outer(sa, sa).reshape(-1)
    r = ddrm_rank(torch.from_numpy(s)).numpy()
    assert sorted(r.tolist()) == list(range(n * n))
    s_sorted = np.empty_like(s)
    s_sorted[r] = s
    assert (np.diff(s_sorted) <= 0).all()  # r is a descending order of s (ties in any order)
    U2, V2 = np.kron(Ua, Ua), np.kron(Vat.T, Vat.T)
    op = SeparableBlur(spectrum="ddrm_tiled", **BLUR).setup(None, (1, 3, n, n), dtype=torch.float64)
    H = dense(op.forward, (3, n, n)).numpy()
    K = np.kron(Aeff, Aeff)
    N = n * n
    for c in range(3):
        t = s_sorted[(3 * r + c) % N]
        Hc = U2 @ np.diag(t) @ V2.T
        blk = H[c * N:(c + 1) * N, c * N:(c + 1) * N]
        assert np.abs(blk - Hc).max() < 1e-12
        assert np.abs(blk - K).max() > np.abs(K).max()  # not the blur (0.029 / 0.042 / 0.059 vs 0.012 at n = 8)
        off = H[c * N:(c + 1) * N].copy()
        off[:, c * N:(c + 1) * N] = 0
        assert np.abs(off).max() == 0
    exact = SeparableBlur(**BLUR).setup(None, (1, 3, n, n), dtype=torch.float64)
    He = dense(exact.forward, (3, n, n)).numpy()
    assert np.abs(He - np.kron(np.eye(3), K)).max() < 1e-12
    # the SVD pieces of the compat operator reproduce its forward, adjoint = transpose
    Ht = dense(lambda y: op.adjoint(y), (3, n, n)).numpy()
    assert np.abs(Ht - H.T).max() < 1e-12


def test_reddiff_pinv_keeps_Uty_on_zero_singulars():
    """Moore-Penrose: numpy pinv of the dense blur.  RED-diff: H^+ y + sum over zero singular values of
    v_k u_k^T y.  Equal on noiseless y (in the range of H), different on noisy y."""
    n = 16
    A = ddrm_window_matrix(n)
    Ua, sa, Vat = np.linalg.svd(A)
    zero = sa < 0.03
    assert zero.any()
    sa = np.where(zero, 0.0, sa)
    K = np.kron(Ua @ np.diag(sa) @ Vat, Ua @ np.diag(sa) @ Vat)
    Kp = np.linalg.pinv(K, rcond=1e-10)
    z2 = (np.outer(sa, sa) == 0).reshape(-1)
    U2, V2 = np.kron(Ua, Ua), np.kron(Vat.T, Vat.T)
    P = V2[:, z2] @ U2[:, z2].T
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, n, n, generator=g, dtype=torch.float64) * 2 - 1
    mp = SeparableBlur(**BLUR).setup(None, x.shape, dtype=torch.float64)
    rd = SeparableBlur(pinv_mode="reddiff", **BLUR).setup(None, x.shape, dtype=torch.float64)
    y = mp.forward(x)
    assert (rd.pinv(y) - mp.pinv(y)).abs().max() < 1e-10
    yn = y + 0.1 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    Y = yn.reshape(2, -1).numpy()
    assert np.abs(mp.pinv(yn).reshape(2, -1).numpy() - Y @ Kp.T).max() < 1e-9
    assert np.abs(rd.pinv(yn).reshape(2, -1).numpy() - Y @ (Kp + P).T).max() < 1e-9
    assert (rd.pinv(yn) - mp.pinv(yn)).abs().max() > 1e-3


def test_compat_blur_options_are_refused_when_unknown():
    with pytest.raises(ValueError, match="spectrum"):
        SeparableBlur(spectrum="tiled", **BLUR)
    with pytest.raises(ValueError, match="pinv_mode"):
        SeparableBlur(pinv_mode="nan", **BLUR)


# ------------------------------------------------------------------------------------------------ timesteps
@pytest.mark.parametrize("n,length,first", [(300, 334, 999), (400, 500, 998), (600, 1000, 999)])
def test_official_step_lists(n, length, first):
    """Official: every (1000 // n)-th step from 0 (skip 3, 2, 1), visited T -> 0; default: exactly n distinct
    steps, evenly spread (gaps floor or ceil of T/n), starting within T/n of T."""
    off = timesteps(n, spacing="official")
    skip = 1000 // n
    assert off == list(range(first, -1, -skip)) and len(off) == length
    d = timesteps(n)
    gaps = set(np.diff(d[::-1]).tolist())
    assert len(d) == len(set(d)) == n and d[-1] == 0 and d[0] >= 1000 - 1000 / n - 1 and d[0] >= 990
    assert gaps <= {math.floor(1000 / n), math.ceil(1000 / n)}


def test_default_list_unchanged_for_divisors():
    for T in (1000, 500):
        for n in (k for k in range(1, T + 1) if T % k == 0):
            assert timesteps(n, T=T) == list(range(0, T, T // n))[::-1]


def test_official_spacing_runs_every_listed_step():
    """NFE is what ran: 334 network calls for steps=300 under the official spacing."""
    prior = GaussianPrior(dim=2, mean=torch.zeros(2, dtype=torch.float64), cov=torch.eye(2, dtype=torch.float64))
    op = MatrixOperator(torch.eye(2, dtype=torch.float64)[:1])
    y = torch.zeros(1, 1, dtype=torch.float64)
    for spacing, nfe in (("default", 300), ("official", 334)):
        prior.reset_nfe()
        smp = REDDiff(steps=300, spacing=spacing)
        smp.sample(y, op, prior, BatchRNG([0]))
        assert prior.nfe == nfe == smp.expected_nfe(prior)


# ------------------------------------------------------------------------------------------------ DPS
def _toy(seed=0, d=6, m=3):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(d, d, generator=g, dtype=torch.float64)
    prior = GaussianPrior(dim=d, mean=2 * torch.randn(d, generator=g, dtype=torch.float64),
                          cov=L @ L.T / d + 0.1 * torch.eye(d, dtype=torch.float64))
    op = MatrixOperator(torch.randn(m, d, generator=g, dtype=torch.float64))
    y = torch.randn(2, m, generator=g, dtype=torch.float64)
    return prior, op, y


@pytest.mark.parametrize("clamp", [False, True])
def test_dps_convention_dps_steps_zeta_prime_along_grad_of_the_norm(clamp):
    """One step from x_T: x(zeta') - x(0) = -zeta' grad_{x_T} ||y - H(c(x0_hat))|| per image under
    zeta_convention=dps (c = clamp to [-1, 1] with clamp_x0_norm), and the reddiff convention is twice that."""
    prior, op, y = _toy()
    sch = prior.schedule
    t = timesteps(1)[0]
    a = float(sch.alpha_bar_at(t))
    xT = BatchRNG([3, 4]).randn((2, 6), dtype=torch.float64)
    xg = xT.clone().requires_grad_(True)
    x0 = (xg - math.sqrt(1 - a) * prior.eps(xg, t)) / math.sqrt(a)
    x0 = x0.clamp(-1, 1) if clamp else x0
    norms = torch.linalg.norm(y - op.forward(x0), dim=1)
    (g,) = torch.autograd.grad(norms.sum(), xg)
    zp = 0.7
    run = lambda **kw: DPS(steps=1, clamp_x0_norm=clamp, **kw).sample(y, op, prior, BatchRNG([3, 4]))
    base = run(zeta=0.0)
    assert (run(zeta=zp, zeta_convention="dps") - base + zp * g).abs().max() < 1e-10
    assert (run(zeta=zp, zeta_convention="reddiff") - base + 2 * zp * g).abs().max() < 1e-10


def test_every_task_states_its_zeta_convention_and_dps_values_run_halved():
    for p in sorted((ROOT / "conf" / "task").glob("*.yaml")):
        dps = OmegaConf.load(p).get("hparams", {}).get("dps")
        if dps is not None:
            assert dps.get("zeta_convention") in ("dps", "reddiff"), p.name
    src = (ROOT / "conf" / "task" / "sr4_bicubic.yaml").read_text()
    assert re.search(r"dps: \{zeta: 1\.0, zeta_convention: dps\}", src)
    prior, op, y = _toy()
    a = DPS(steps=5, zeta=1.0, zeta_convention="dps").sample(y, op, prior, BatchRNG([1, 2]))
    b = DPS(steps=5, zeta=0.5).sample(y, op, prior, BatchRNG([1, 2]))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ RED-diff
def official_batch_mean_loop(y, op, prior, rng, steps, lr, lam):
    """The official loop: one mean over the whole batch for both terms, torch.optim.Adam (eps 1e-8)."""
    sch = prior.schedule
    mu = op.pinv(y).detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([mu], lr=lr, betas=(0.9, 0.99), eps=1e-8)
    x0 = None
    for t in timesteps(steps):
        a = sch.alpha_bar_at(t).to(y)
        e1, e2 = rng.randn_like(mu), rng.randn_like(mu)  # e1 unused (sigma_x0 = 0), drawn as the sampler does
        x0 = mu + 0.0 * e1
        xt = a.sqrt() * x0 + (1 - a).sqrt() * e2
        with torch.no_grad():
            eps = prior.eps(xt, t)
        w = lam * WEIGHTINGS["linear"](((1 - a) / a).sqrt())
        loss = w * ((eps - e2).detach() * x0).mean() + ((y - op.forward(x0)) ** 2).mean() / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x0.detach()


def test_reddiff_batch_mean_is_the_official_loss():
    """batch_loss=batch_mean == the official whole-batch mean with torch Adam (float64; measured 4e-15), and a
    real difference from the per-image loss at B = 4, d = 256 (measured 6e-3: Adam's eps is not negligible
    against per-entry gradients of order 1/d)."""
    d = 256
    g = torch.Generator().manual_seed(5)
    prior = GaussianPrior(dim=d, mean=torch.zeros(d, dtype=torch.float64), cov=torch.eye(d, dtype=torch.float64))
    op = MatrixOperator(torch.randn(d // 2, d, generator=g, dtype=torch.float64) / d ** 0.5)
    y = torch.randn(4, d // 2, generator=g, dtype=torch.float64)
    kw = dict(steps=40, lr=0.3, lam=0.25)
    ours = REDDiff(batch_loss="batch_mean", **kw).sample(y, op, prior, BatchRNG([1, 2, 3, 4]))
    ref = official_batch_mean_loop(y, op, prior, BatchRNG([1, 2, 3, 4]), **kw)
    assert (ours - ref).abs().max() < 1e-9
    per = REDDiff(**kw).sample(y, op, prior, BatchRNG([1, 2, 3, 4]))
    assert (per - ref).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ DDRM
def test_ddrm_last_step_x0_hat_returns_the_last_denoiser_estimate():
    """Noiseless: the default returns y on the observed components (H x = y); last_step=x0_hat returns the
    network's last x0_hat exactly, which does not fit y."""
    prior, op, y = _toy()
    seen = {}
    out = DDRM(steps=10, last_step="x0_hat", log_every=1).sample(
        y, op, prior, BatchRNG([1, 2]), callback=lambda i, info: seen.__setitem__(i, info["x0"].clone()))
    assert (out - seen[9]).abs().max() < 1e-12  # V(V^T x0_hat): x0_hat up to rounding
    assert (op.forward(out) - y).abs().max() > 1e-3
    default = DDRM(steps=10).sample(y, op, prior, BatchRNG([1, 2]))
    assert (op.forward(default) - y).abs().max() < 1e-9


# ------------------------------------------------------------------------------------------------ colorization
def test_official_colorization_row_and_its_svd():
    w = torch.tensor([0.3333, 0.3334, 0.3333], dtype=torch.float64)
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    op = Colorization(weights=w.tolist()).setup(None, x.shape, dtype=torch.float64)
    assert (op.forward(x) - torch.einsum("c,bchw->bhw", w, x).unsqueeze(1)).abs().max() < 1e-15
    assert (op.forward(x) - Colorization().setup(None, x.shape, dtype=torch.float64).forward(x)).abs().max() > 1e-5
    H = dense(op.forward, (3, 4, 4))
    Hp = dense(op.pinv, (1, 4, 4))
    assert (Hp - torch.linalg.pinv(H)).abs().max() < 1e-12
    k = op.singulars().numel()
    assert (op.U(op.singulars() * op.Vt(x)[:, :k]) - op.forward(x)).abs().max() < 1e-14
    assert (op.V(op.Vt(x)) - x).abs().max() < 1e-14


# ------------------------------------------------------------------------------------------------ evaluation
def test_png_roundtrip_equals_a_saved_and_reloaded_png(tmp_path):
    """Through a real PNG file (torchvision.utils.save_image, the official writer, then PIL): identical."""
    from PIL import Image
    from torchvision.utils import save_image

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g) * 2.4 - 1.2  # includes out-of-range values
    x[0, 0, 0, :4] = torch.tensor([-1 + 2 * 0.5 / 255, -1 + 2 * 1.5 / 255, 1.0, -1.0])  # rounding ties
    for b in range(3):
        save_image((x[b] + 1) / 2, tmp_path / f"{b}.png")
    codes = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / f"{b}.png"))).permute(2, 0, 1)
                         for b in range(3)])
    back = codes.double() / 255 * 2 - 1
    rt = png_roundtrip(x)  # float32 arithmetic, as save_image on a float32 image
    assert torch.equal(torch.round((rt.double() + 1) * 127.5).to(torch.uint8), codes)  # the same 8-bit codes
    assert (rt.double() - back).abs().max() < 1e-6 and torch.equal(png_roundtrip(back), back)
    ref = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    suite = MetricSuite(names=["psnr"], png_roundtrip=True)
    got = suite.per_image(x, ref)["psnr"]
    assert torch.allclose(got, psnr(back, png_roundtrip(ref.double())).float(), atol=1e-5)
    assert (got - MetricSuite(names=["psnr"]).per_image(x, ref)["psnr"]).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------ the profiles
def test_compat_profiles_switch_every_key_and_every_key_is_used():
    from hydra import compose, initialize_config_dir

    default = OmegaConf.load(ROOT / "conf" / "compat" / "default.yaml")
    keys = [k for k in default if k != "name"]
    texts = "\n".join(p.read_text() for p in (ROOT / "conf").rglob("*.yaml") if p.parent.name != "compat")
    for k in keys:
        assert f"compat.{k}," in texts, f"compat.{k} is not read by any config"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        d = compose("config", overrides=["task=deblur_uniform"])
        o = compose("config", overrides=["task=deblur_uniform", "compat=official"])
        p = compose("config", overrides=["+experiment=paper_deblur"])
    assert d.compat.name == "default" and o.compat.name == "official" and p.compat.name == "official"
    changed = {k for k in keys if d.compat[k] != o.compat[k]}
    assert changed == set(keys) - {"dps_clamp_x0"}  # RED-diff's DPS does not clamp: false in both
    assert o.task.operator.spectrum == "ddrm_tiled" and d.task.operator.spectrum == "exact"
    assert o.sampler.spacing == "official" and o.metrics.png_roundtrip is True
    import inspect

    from reddiff import registry

    for sp in (ROOT / "conf" / "sampler").glob("*.yaml"):
        cfg = OmegaConf.load(sp)
        # every sampler on the DDPM grid (its class takes a spacing) follows compat.timesteps; the flow solvers,
        # EnKG and ReSample walk grids of their own
        if "spacing" in inspect.signature(registry.sampler_class(sp.stem).__init__).parameters:
            assert "spacing: ${oc.select:compat.timesteps,default}" in sp.read_text(), sp.name
