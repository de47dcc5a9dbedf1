"""Official fidelity of DDNM+ and DiffPIR (issue 30, items 1 and 2): each compat switch reproduces the official
update, recomputed here by hand from the paper's formulas and the official code's reading of them (file:line in
each test), on the recorded state and noise of a run (float64), and differs from our default form."""
from __future__ import annotations

import math

import pytest
import torch

from reddiff.baselines.ddnm import DDNM
from reddiff.baselines.diffpir import DiffPIR
from reddiff.registry import build_operator

from fidelity_case import RecordingPrior, RecordingRNG, svd_case  # noqa: E402 - tests/ helper

torch.set_num_threads(1)


def _ddnm_plus_step(x, eps, zb, t, s_next, prior, U, s, V, y, sig_y, eta, eps_basis):
    """One DDNM+ step by hand (paper Eqs. 17-19, DDNM functions/svd_ddnm.py:123-131).  The noise term is
    V diag(d2) V^T eps ("spectral", ours) or V diag(d2) eps with eps read as spectral coefficients ("pixel": the
    official Lambda_noise, functions/svd_operators.py:579-581 reads eps in the pixel layout, :617 applies V_small)."""
    a_t, a_s = float(prior.schedule.alpha_bar_at(t)), float(prior.schedule.alpha_bar_at(s_next))
    a, sig, ce = math.sqrt(a_s), math.sqrt(1 - a_s), math.sqrt(1 - eta ** 2)
    d, m = V.shape[0], s.numel()
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    xb = x0 @ V
    yb = torch.zeros(x.shape[0], d, dtype=torch.float64)
    yb[:, :m] = (y @ U) / s
    c = torch.zeros(d, dtype=torch.float64)
    c[:m] = sig_y / s
    f64 = torch.float64
    lam, d1, d2 = torch.ones(d, dtype=f64), torch.full((d,), eta * sig, dtype=f64), torch.zeros(d, dtype=f64)
    for i in range(d):
        if i >= m:                                   # missing direction: default noise, nothing to correct
            d2[i] = ce * sig
        elif sig >= a * c[i]:
            d1[i] = math.sqrt(sig ** 2 - a ** 2 * c[i] ** 2)
        else:
            lam[i] = ce * sig / (a * c[i])
    res = torch.where(torch.arange(d) < m, xb - yb, torch.zeros_like(xb))
    epsb = eps @ V if eps_basis == "spectral" else eps
    return (a * (xb - lam * res) + d1 * zb + d2 * epsb) @ V.T


@pytest.mark.parametrize("eps_basis", ["spectral", "pixel"])
def test_ddnm_plus_noise_term_matches_the_official_form(eps_basis):
    """Every step of a 4-step DDNM+ run equals the hand-computed step of its form to 1e-12; the two forms differ
    by d2 (V^T eps - eps) on the missing directions (here by more than 0.05 somewhere)."""
    U, s, V, op = svd_case(sigma_y=0.2)
    y = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    prior, rng = RecordingPrior(dim=5), RecordingRNG([0, 1])
    smp = DDNM(steps=4, eta=0.85, eps_basis=eps_basis)
    out = smp.sample(y, op, prior, rng)
    zs = rng.normals()[1:]                                            # [0] is x_T
    states = [x for x, _, _ in prior.calls] + [out]
    other = "pixel" if eps_basis == "spectral" else "spectral"
    gap = 0.0
    for k, (t, s_next) in enumerate(smp.schedule(prior)):
        x, _, eps = prior.calls[k]
        want = _ddnm_plus_step(x, eps, zs[k], t, s_next, prior, U, s, V, y, 0.2, 0.85, eps_basis)
        assert (states[k + 1] - want).abs().max() < 1e-12, (k, eps_basis)
        alt = _ddnm_plus_step(x, eps, zs[k], t, s_next, prior, U, s, V, y, 0.2, 0.85, other)
        gap = max(gap, float((alt - want).abs().max()))
    assert gap > 0.05, gap



def test_ddnm_plus_forms_agree_for_inpainting_only():
    """Inpainting's V is the identity on pixels, so the two noise terms coincide (the official Inpainting class is
    not affected, svd_operators.py:395-398); on sr4 they do not."""
    shape = (2, 3, 8, 8)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 - 1
    for task, same in (("inpaint_box", True), ("sr4", False)):
        op = build_operator(task, sigma_y=0.05).setup([0, 1], shape, "cpu", torch.float64)
        y = op.forward(x)
        out = [DDNM(steps=5, eps_basis=b).sample(y, op, RecordingPrior(shape=shape[1:]), RecordingRNG([0, 1]))
               for b in ("spectral", "pixel")]
        assert torch.equal(out[0], out[1]) == same, task

def test_ddnm_eps_basis_is_checked():
    with pytest.raises(ValueError, match="ddnm: eps_basis must be one of spectral, pixel, got 'raw'"):
        DDNM(eps_basis="raw")


def _official_start(task, y, op):
    """The image the official DiffPIR starts from, in model units (main_ddpir.py:295-310, then 2x - 1 at :312):
    inpainting: the masked [0, 1] image, so -1 in the holes; super-resolution: bicubic(y) (torch's bicubic, a
    kernel summing to 1, commutes with 2x - 1); deblurring: y itself."""
    if task.startswith("inpaint"):
        return torch.where(op.mask().expand_as(y) > 0, y, -torch.ones_like(y))
    if task.startswith("sr4"):
        return torch.nn.functional.interpolate(y, scale_factor=4, mode="bicubic", align_corners=False)
    return y


@pytest.mark.parametrize("task", ["inpaint_box", "sr4", "deblur_gauss"])
def test_diffpir_degraded_start_is_the_official_initial_state(task):
    """x_T = sqrt(a_T) x_init + sqrt(1 - a_T) z (main_ddpir.py:312) with the recorded z: x_init is the official
    degraded image under init="degraded" (to 1e-12) and A^+ y under "pinv"; the two starts differ."""
    shape = (2, 3, 16, 16)
    op = build_operator(task, sigma_y=0.05).setup([0, 1], shape, "cpu", torch.float64)
    g = torch.Generator().manual_seed(1)
    y = op.forward(torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1)
    starts = {}
    for init in ("pinv", "degraded"):
        prior, rng = RecordingPrior(shape=shape[1:]), RecordingRNG([0, 1])
        smp = DiffPIR(steps=3, clip_x0=False, init=init)
        smp.sample(y, op, prior, rng)
        a0 = float(prior.schedule.alpha_bar_at(smp.visited(prior)[0]))
        x_init = _official_start(task, y, op) if init == "degraded" else op.pinv(y).reshape(shape)
        want = math.sqrt(a0) * x_init + math.sqrt(1 - a0) * rng.normals()[0]
        assert (prior.calls[0][0] - want).abs().max() < 1e-12, (task, init)
        starts[init] = x_init
    assert (starts["pinv"] - starts["degraded"]).abs().max() > 0.1, task


def test_diffpir_init_is_checked():
    with pytest.raises(ValueError, match="diffpir: init must be one of pinv, degraded, got 'zero'"):
        DiffPIR(init="zero")
