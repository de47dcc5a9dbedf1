"""Official fidelity of FPS-SMC and MCG-diff (issue 30, items 4, 5, 7-13): every official form, alone and all
together, reproduces the official update recomputed here by hand in the official code's own (y-space) terms on
the recorded states and noise of a run (float64), and each differs from our default form.

FPS-SMC, official step t -> s (ZehaoDou-official/FPS-SMC-2023, guided_diffusion/gaussian_diffusion.py): the mean
``m = sqrt(a_s) x0 + sqrt((1 - c)(1 - a_s)) eps`` (posterior_mean_variance.py:130-136, x0 clamped, :43-44), the
proposal ``(I + A^T A / ex)^{-1} (m + A^T Y / ex)`` with ``ex = a_t sigma^2 / (c (1 - a_s) + 1e-6)`` and noise
``sqrt(c (1 - a_s)) (I + A^T A / ex)^{-1/2} e`` (:106, 122, 309-316, 473-477, 499-503), the weight
``-|Y - A x|^2 / (2 sigma^2 a_s) - |x - m|^2 / (2 c (1 - a_s)) + |x - mu|^2 / (2 c (1 - a_s)) + |A (x - mu)|^2 /
(2 a_t sigma^2)`` (:467, 474-475, 504-507) with ``Y`` the y-sequence at level t (:263, 283), then multinomial
copies (:508-511); the t = 0 step returns x0 (:309, 464); level 0 is ``get_mean(A^T y, vd) + get_noise(e, vd)`` with
one e (:273-277)."""
from __future__ import annotations

import math

import pytest
import torch

from reddiff.baselines.fps_smc import FPSSMC
from reddiff.baselines.mcgdiff import MCGDiff

from fidelity_case import RecordingPrior, RecordingRNG, svd_case  # noqa: E402 - tests/ helper

torch.set_num_threads(1)
OFFICIAL = {"y_level": "t", "proposal_var": "t", "clip_x0": True, "var_jitter": 1e-6, "order": "draw_first",
            "start": "official", "last_step": "x0_hat"}
OURS = {"y_level": "s", "proposal_var": "s", "clip_x0": False, "var_jitter": 0.0, "order": "adapted",
        "start": "product", "last_step": "condition"}
SIG, C, N, STEPS = 0.05, 0.95, 3, 3


class Spy(FPSSMC):
    """FPS-SMC that keeps its context (the y-sequence) for the hand computation."""

    def setup_potentials(self, ctx, rng):
        super().setup_potentials(ctx, rng)
        self.ctx = ctx


def _ancestors(logw, u):
    """Multinomial ancestors by the inverse CDF of the normalised weights at the uniforms u."""
    cdf = torch.cumsum(torch.softmax(logw, 0), 0)
    return torch.searchsorted(cdf / cdf[-1], u, right=True).clamp_max(logw.numel() - 1)


def _hand_run(f, smp, prior, rng, U, s, V, resample):
    """States (spectral, (N, d) per level) and the final log-weights of a B = 1 run, recomputed step by step."""
    ys, lv = smp.ctx["ys"], smp.ctx["lv"]
    d, k, sig2y = V.shape[0], s.numel(), SIG ** 2
    draws = list(rng.draws)[1:]                                    # [0]: the y-sequence noise
    e0 = draws.pop(0)[1][0]                                        # (N, d) level-0 normals
    c0, vd = ys[0][0], lv[0] * sig2y
    z = e0.clone()
    if f["start"] == "official":                                   # vd (I + A^T A / vd)^-1 ... one shared draw
        z = e0[:1].expand(N, d).clone()
        z[:, :k] = vd / (vd + s ** 2) * s ** 2 * c0 + (vd / (vd + s ** 2)).sqrt() * z[:, :k]
    else:                                                          # N(0, I) N(y_0; A x, vd)
        z[:, :k] = s ** 2 * c0 / (vd + s ** 2) + (vd / (vd + s ** 2)).sqrt() * z[:, :k]
    states, logw = [z], torch.zeros(N, dtype=torch.float64)
    for i in range(STEPS):
        a_t, a_s = lv[i], lv[i + 1]
        x, _, eps = prior.calls[i]
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x0 = x0.clamp(-1, 1) if f["clip_x0"] else x0
        sig2 = C * (1 - a_s) if a_s < 1 else 1 - a_t               # a deterministic last step: Tweedie's scale
        m = math.sqrt(a_s) * (x0 @ V) + math.sqrt(max((1 - C) * (1 - a_s), 0.0)) * (eps @ V)
        if i == STEPS - 1 and f["last_step"] == "x0_hat":
            states.append(m)
            break
        Y = ys[i if f["y_level"] == "t" else i + 1][0]
        vq, vw = (a_t if f["proposal_var"] == "t" else a_s) * sig2y, a_s * sig2y
        ex = vq / (sig2 + f["var_jitter"])
        mu = m.clone()
        mu[:, :k] = (ex * m[:, :k] + s ** 2 * Y) / (ex + s ** 2)
        sd = torch.full((d,), math.sqrt(C * (1 - a_s)), dtype=torch.float64)   # kernel noise (0 at the end)
        sd[:k] = (sig2 * ex / (ex + s ** 2)).sqrt()
        first, second = draws.pop(0)[1], draws.pop(0)[1]
        if f["order"] == "draw_first":
            noise, u = first[0], second[0]
            xs = mu + sd * noise
            r = xs[:, :k] - mu[:, :k]
            incr = (-(s ** 2 * (Y - xs[:, :k]) ** 2).sum(1) / (2 * vw) - ((xs - m) ** 2).sum(1) / (2 * sig2)
                    + ((xs - mu) ** 2).sum(1) / (2 * sig2) + (s ** 2 * r ** 2).sum(1) / (2 * vq))
            logw = logw + incr
            anc = _ancestors(logw, u) if resample else torch.arange(N)
            z = xs[anc]
        else:
            u, noise = first[0], second[0]
            logw = logw - ((m[:, :k] - Y) ** 2 / (2 * (sig2 + vw / s ** 2))).sum(1)
            anc = _ancestors(logw, u) if resample else torch.arange(N)
            z = mu[anc] + sd * noise
        if resample:
            logw = torch.zeros(N, dtype=torch.float64)
        states.append(z)
    return states, logw


CASES = [("ours", OURS), ("official", OFFICIAL)] + [(key, {**OURS, key: OFFICIAL[key]}) for key in OURS]


@pytest.mark.parametrize("resample", [True, False])
@pytest.mark.parametrize("label,form", CASES, ids=[c[0] for c in CASES])
def test_fps_smc_step_matches_the_hand_computed_official_step(label, form, resample):
    """Every level's particles (and, without resampling, the accumulated log-weights) equal the hand computation
    of the same form to 1e-10; each official form alone moves the run away from ours."""
    U, s, V, op = svd_case(sigma_y=SIG, s=(1.5, 0.4, 0.05))
    y = torch.tensor([[0.9, -1.4, 0.3]], dtype=torch.float64)
    runs = {}
    for name, f in (("form", form), ("ours", OURS)):
        prior, rng = RecordingPrior(dim=5), RecordingRNG([0])
        smp = Spy(steps=STEPS, particles=N, c_rate=C, ess_threshold=1.0 if resample else 1e-9, **f)
        X, logw = smp.run(y, op, prior, rng)
        runs[name] = (X[0], logw[0])
        if name == "form":
            states, hand_logw = _hand_run(f, smp, prior, rng, U, s, V, resample)
            got = [x @ V for x, _, _ in prior.calls] + [X[0] @ V]
            for L, (a, b) in enumerate(zip(got, states)):
                assert (a - b).abs().max() < 1e-10, (label, L)
            assert (logw[0] - hand_logw).abs().max() < 1e-8, (label, logw, hand_logw)
    if label != "ours":
        moved = max(float((runs["form"][0] - runs["ours"][0]).abs().max()),
                    float((runs["form"][1] - runs["ours"][1]).abs().max()))
        assert moved > 1e-5, (label, moved)                             # rounding is ~1e-15


def test_fps_smc_bad_forms():
    with pytest.raises(ValueError, match="fps_smc: order must be one of adapted, draw_first, got 'after'"):
        FPSSMC(order="after")
    with pytest.raises(ValueError, match="fps_smc: var_jitter must be >= 0, got -1"):
        FPSSMC(var_jitter=-1)


@pytest.mark.parametrize("init", ["potential", "prior"])
def test_mcgdiff_initial_particles(init):
    """Level 0: plain N(0, I) under init="prior" (mcg_diff particle_filter.py:67-69: the caller's initial
    particles), else N(0, I) times g_0(x) = N(sqrt(a_0) y_hat; x, 1 - (1 - kappa) a_0 / a_tau) (:102-107; sigma_y = 0:
    tau is the clean level, a_tau = 1): on the observed coordinates the variance is 1 against v / (1 + v) ~ 0.5."""
    U, s, V, op = svd_case(sigma_y=0.0)
    y = torch.tensor([[0.9, -1.4, 0.3]], dtype=torch.float64)
    prior, rng = RecordingPrior(dim=5), RecordingRNG([0])
    smp = MCGDiff(steps=4, particles=6, init=init)
    smp.run(y, op, prior, rng)
    e = rng.normals()[0][0]                                                # (N, d)
    a0 = float(prior.schedule.alpha_bar_at(smp.timesteps(prior)[0]))
    v = 1 - (1 - smp.kappa) * a0
    want = e.clone()
    if init == "potential":
        want[:, :3] = math.sqrt(a0) * (y @ U)[0] / s / (1 + v) + math.sqrt(v / (1 + v)) * e[:, :3]
    assert (prior.calls[0][0] @ V - want).abs().max() < 1e-12
    assert abs(v / (1 + v) - 0.5) < 1e-3                                    # the 0.5 against 1


@pytest.mark.parametrize("kappa,gain", [(1e-4, 0.5), (1e-8, 0.9999)])
def test_mcgdiff_noiseless_last_step_gain(kappa, gain):
    """sigma_y = 0: the last step (t_0 -> clean, deterministic) draws the observed coordinates from
    N(m + K (y_hat - m), K kappa) with K = (1 - a_0) / (1 - a_0 + kappa): 0.5 at the default kappa 1e-4 (= 1 - a_0),
    so H x = y is only half enforced; kappa 1e-8 pins it (K = 0.9999).  Checked on the recorded last state."""
    U, s, V, op = svd_case(sigma_y=0.0)
    y = torch.tensor([[0.9, -1.4, 0.3]], dtype=torch.float64)
    prior, rng = RecordingPrior(dim=5), RecordingRNG([0])
    smp = MCGDiff(steps=4, particles=2, kappa=kappa, ess_threshold=1e-9)   # no resampling: ancestors = identity
    X, _ = smp.run(y, op, prior, rng)
    x, t, eps = prior.calls[-1]
    a_t = float(prior.schedule.alpha_bar_at(int(t[0])))
    m = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)) @ V                 # a_s = 1: the mean is x0_hat
    K = (1 - a_t) / (1 - a_t + kappa)
    noise = rng.normals()[-1][0]
    want = m.clone()
    want[:, :3] = K * (y @ U)[0] / s + (1 - K) * m[:, :3] + math.sqrt(K * kappa) * noise[:, :3]
    assert (X[0] @ V - want).abs().max() < 1e-10
    assert abs(K - gain) < 2e-3, K


def test_mcgdiff_end_t0_is_the_official_noiseless_chain():
    """end="t0": a 2-step chain is one step t_1 -> t_0 = 0 (mcg_diff particle_filter.py:83-122) and the final
    weights divide out the potential at t_0 (:124-131, 150-151), recomputed in the official terms: potential
    N(sqrt(a_tau) y / s . sqrt(a_t / a_tau); x, 1 - (1 - kappa) a_t / a_tau) with tau = 0 (sigma_y = 0), DDIM eta = 1
    noise, gain Kprev = sigma^2 / (sigma^2 + 1 - (1 - kappa) a_0 / a_tau) (:115-120).  No resampling here
    (identity ancestors), so the final log-weights are the step's weight minus the final log-potential."""
    U, s, V, op = svd_case(sigma_y=0.0)
    y = torch.tensor([[0.9, -1.4, 0.3]], dtype=torch.float64)
    prior, rng = RecordingPrior(dim=5), RecordingRNG([0])
    smp = MCGDiff(steps=2, particles=3, end="t0", ess_threshold=1e-9)
    X, logw = smp.run(y, op, prior, rng)
    assert prior.nfe == smp.expected_nfe(prior) == 3                      # one step of 3 particles
    t1, t0 = smp.timesteps(prior)
    a1, a0 = (float(prior.schedule.alpha_bar_at(t)) for t in (t1, t0))
    kap, yh = smp.kappa, (y @ U)[0] / s
    var = lambda a: 1 - (1 - kap) * a / a0                                  # noqa: E731 - potential variance
    x, _, eps = prior.calls[0]
    zprev, eb = x @ V, eps @ V
    sig2 = (1 - a0) / (1 - a1) * (1 - a1 / a0)                              # DDIM eta = 1
    m = math.sqrt(a0) * (zprev - math.sqrt(1 - a1) * eb) / math.sqrt(a1) + math.sqrt(1 - a0 - sig2) * eb
    K = sig2 / (sig2 + var(a0))
    noise = rng.normals()[-1][0]
    want = m + math.sqrt(sig2) * noise
    want[:, :3] = K * math.sqrt(a0) * yh + (1 - K) * m[:, :3] + math.sqrt(var(a0) * K) * noise[:, :3]
    assert (X[0] @ V - want).abs().max() < 1e-10
    lw = (-0.5 * (m[:, :3] - math.sqrt(a0) * yh) ** 2 / (sig2 + var(a0))
          + 0.5 * (zprev[:, :3] - math.sqrt(a1) * yh) ** 2 / var(a1)).sum(1)
    lw = lw + (0.5 * (want[:, :3] - math.sqrt(a0) * yh) ** 2 / var(a0)).sum(1)
    assert (logw[0] - lw).abs().max() < 1e-10 * lw.abs().max()             # |log w| ~ 5e5 here
    assert abs(K - 0.5) < 0.01                                              # half pinned, as ours at the clean level


def test_mcgdiff_bad_forms():
    with pytest.raises(ValueError, match="mcgdiff: end must be one of clean, t0, got 'zero'"):
        MCGDiff(end="zero")
    with pytest.raises(ValueError, match="mcgdiff: end='t0' stops one step early and needs steps >= 2, got 1"):
        MCGDiff(steps=1, end="t0")
