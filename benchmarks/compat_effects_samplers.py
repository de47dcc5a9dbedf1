"""Measured effect of the round-2 solvers' ``compat`` switches (docs/DIFFERENCES.md rows 9-21).

Run through ``python -m benchmarks.compat_effects`` (these rows follow the older ones in its table).  Every row runs
one sampler twice (or more), built by ``reddiff.registry.build_sampler`` from its YAML with the task's hparams: once
with our default and once with the official value of one compat key (the sampler key it reaches through
``conf/sampler/<name>.yaml``), everything else equal: the same measurement y (harness seeds: measurement stream
``MEASUREMENT_SEED_OFFSET + index``), the same sampler streams (seed 0 + index), the embedded prior, 64-px demo
images.  Δ is official − ours: max abs(Δx) over all pixels, the PSNR change as the mean over images (and its range
over the images in brackets).

Sizes (about 4 minutes of CPU on one core): DDNM+, DiffPIR, DAPS and PnP-DM on the first 4 demo images, MCG-diff and
FPS-SMC on the first 2 with 4 particles; 20 steps everywhere (DAPS: 20 levels x 2 ODE steps; PnP-DM: 20 iterations,
3 ODE prior levels, the demo table's ``mode: ode``).
"""
from __future__ import annotations

import math
import time

import torch

from reddiff.core.rng import BatchRNG
from reddiff.metrics.suite import psnr
from reddiff.registry import build_operator, build_sampler
from reddiff.run.batch_loop import MEASUREMENT_SEED_OFFSET

IMAGES = 4          # DDNM+, DiffPIR, DAPS, PnP-DM
SMC_IMAGES = 2      # MCG-diff, FPS-SMC (4 particles: 4 network calls per step and image)
STEPS = 20
PARTICLES = 4
SIGMA_Y = 0.05      # [0, 1] pixel units (model units 0.1)
SEED = 0

#: FPS-SMC: sampler key -> (compat key, official value), docs/DIFFERENCES.md rows 13-19
FPS_OFFICIAL = {"y_level": ("fps_smc_y_level", "t"), "proposal_var": ("fps_smc_proposal_var", "t"),
                "clip_x0": ("fps_smc_clip_x0", True), "var_jitter": ("fps_smc_var_jitter", 1.0e-6),
                "order": ("fps_smc_order", "draw_first"), "start": ("fps_smc_start", "official"),
                "last_step": ("fps_smc_last_step", "x0_hat")}


class Case:
    """One task on the first ``n`` demo images: x, the operator (float32) and the harness's measurement y."""

    def __init__(self, x_all: torch.Tensor, task: str, n: int, sigma_y: float):
        self.task, self.sigma_y = task, sigma_y
        self.idx = list(range(n))
        self.x = x_all[:n]
        self.op = build_operator(task, sigma_y=sigma_y).setup(self.idx, self.x.shape, dtype=torch.float32)
        self.y = self.op.measure(self.x, BatchRNG.for_images(MEASUREMENT_SEED_OFFSET, self.idx))

    def run(self, prior, name: str, **overrides) -> torch.Tensor:
        smp = build_sampler(name, self.task, **overrides)
        return smp.sample(self.y, self.op, prior, BatchRNG.for_images(SEED, self.idx))

    def psnr(self, out: torch.Tensor) -> torch.Tensor:
        return psnr(out.double(), self.x.double())

    def residual(self, out: torch.Tensor) -> float:
        return float((self.op.forward(out) - self.y).abs().max())

    def label(self) -> str:
        return f"{self.task} σ_y {self.sigma_y:g}" if self.sigma_y else f"{self.task} noiseless"


def delta(case: Case, ours: torch.Tensor, official: torch.Tensor) -> str:
    """``max abs(Δx)`` and the PSNR change official − ours (mean; per-image range when it changes sign)."""
    dp = case.psnr(official) - case.psnr(ours)
    text = f"max abs(Δx) {float((official - ours).abs().max()):.2g}, PSNR {float(dp.mean()):+.3f} dB"
    if len(dp) > 1:
        text += f" ({float(dp.min()):+.3f} … {float(dp.max()):+.3f})"
    return text


def ddnm_rows(prior, x) -> list[tuple[str, str]]:
    parts = []
    for task in ("sr4", "colorization", "deblur_gauss"):
        c = Case(x, task, IMAGES, SIGMA_Y)
        parts.append(f"{task}: " + delta(c, c.run(prior, "ddnm", steps=STEPS, eps_basis="spectral"),
                                        c.run(prior, "ddnm", steps=STEPS, eps_basis="pixel")))
    return [(f"9 DDNM+ noise term (`ddnm_eps_basis`: spectral → pixel), σ_y {SIGMA_Y:g}, {STEPS} steps, "
             f"{IMAGES} images", "; ".join(parts))]


def diffpir_rows(prior, x) -> list[tuple[str, str]]:
    parts = []
    for task, sy in (("inpaint_box", 0.0), ("sr4", SIGMA_Y), ("deblur_gauss", SIGMA_Y)):
        c = Case(x, task, IMAGES, sy)
        for zeta in (1.0, 0.25):
            kw = dict(steps=STEPS, zeta=zeta)
            parts.append(f"{c.label()}, ζ {zeta:g}: " + delta(c, c.run(prior, "diffpir", init="pinv", **kw),
                                                             c.run(prior, "diffpir", init="degraded", **kw)))
    return [(f"10 DiffPIR start (`diffpir_init`: pinv → degraded), {STEPS} steps, {IMAGES} images", "; ".join(parts))]


def mcgdiff_rows(prior, x) -> list[tuple[str, str]]:
    c = Case(x, "sr4", SMC_IMAGES, 0.0)
    kw = dict(steps=STEPS, particles=PARTICLES)
    ours = c.run(prior, "mcgdiff", **kw)
    init = c.run(prior, "mcgdiff", init="prior", **kw)
    t0 = c.run(prior, "mcgdiff", end="t0", **kw)
    small = c.run(prior, "mcgdiff", kappa=1e-8, **kw)
    dp = lambda o: float((c.psnr(o) - c.psnr(ours)).mean())  # noqa: E731
    where = f"noiseless sr4, {STEPS} steps, {PARTICLES} particles, {SMC_IMAGES} images"
    return [(f"11 MCG-diff level 0 (`mcgdiff_init`: potential → prior), {where}", delta(c, ours, init)),
            (f"12 MCG-diff last step (`mcgdiff_end`: clean → t0; and `sampler.kappa` 1e-4 → 1e-8), {where}: "
             "max abs(H x − y) ours / t0 / κ 1e-8, PSNR change",
             f"{c.residual(ours):.3g} / {c.residual(t0):.3g} / {c.residual(small):.2g}; "
             f"t0 {dp(t0):+.3f} dB (max abs(Δx) {float((t0 - ours).abs().max()):.2g}), κ 1e-8 {dp(small):+.3f} dB")]


def fps_rows(prior, x) -> list[tuple[str, str]]:
    c = Case(x, "sr4", SMC_IMAGES, SIGMA_Y)
    kw = dict(steps=STEPS, particles=PARTICLES)
    ours = c.run(prior, "fps_smc", **kw)
    where = f"sr4 σ_y {SIGMA_Y:g}, {STEPS} steps, {PARTICLES} particles, {SMC_IMAGES} images"
    rows = []
    for n, (key, (ckey, value)) in enumerate(FPS_OFFICIAL.items(), start=13):
        out = c.run(prior, "fps_smc", **{key: value}, **kw)
        extra = ""
        if key == "last_step":
            extra = f"; max abs(H x − y) {c.residual(ours):.3f} → {c.residual(out):.3f}"
        rows.append((f"{n} FPS-SMC `{ckey}` → {value} alone, {where}", delta(c, ours, out) + extra))
    both = c.run(prior, "fps_smc", **{k: v for k, (_, v) in FPS_OFFICIAL.items()}, **kw)
    rows.append((f"13-19 FPS-SMC all seven official forms together, {where}", delta(c, ours, both)))
    return rows


def time_input_rows(prior, x) -> list[tuple[str, str]]:
    from benchmarks.dialects import measure

    den = measure(prior, x[:IMAGES].float())
    den_text = ", ".join(f"t {r['t']}: {r['vpc_input'] - r['t']:+.2f} steps, {r['vpc_max']:.2g}" for r in den)
    c = Case(x, "sr4", IMAGES, SIGMA_Y)
    kw = dict(steps=STEPS, ode_steps=2)
    daps = delta(c, c.run(prior, "daps", time_input="grid", **kw), c.run(prior, "daps", time_input="vp_continuous", **kw))
    kw = dict(steps=STEPS, denoise_steps=3, mode="ode")
    grid = c.run(prior, "pnpdm", time_input="grid", **kw)
    vpc = c.run(prior, "pnpdm", time_input="vp_continuous", **kw)
    floor = c.run(prior, "pnpdm", time_input="vp_continuous", sigma_min=0.01049, **kw)
    where = f"sr4 σ_y {SIGMA_Y:g}, {IMAGES} images"
    return [("20-21 vp_continuous time input (EDM VPPrecond 999 σ_inv(σ)) at grid levels σ_t, first "
             f"{IMAGES} demo images + σ_t noise: offset from t, max abs change of prior.denoise", den_text),
            (f"20 DAPS `daps_time_input`: grid → vp_continuous, {where}, {STEPS} levels × 2 ODE steps", daps),
            (f"21 PnP-DM `pnpdm_time_input`: grid → vp_continuous, {where}, {STEPS} iterations, 3 ODE prior "
             "levels; and the official σ_min 0.01049 (vp_continuous, σ_min 0.002 → 0.01049)",
             f"{delta(c, grid, vpc)}; σ_min: {delta(c, vpc, floor)}")]


GROUPS = {"DDNM+": ddnm_rows, "DiffPIR": diffpir_rows, "MCG-diff": mcgdiff_rows, "FPS-SMC": fps_rows,
          "DAPS/PnP-DM": time_input_rows}


def sampler_rows_round2(prior, x) -> tuple[list[tuple[str, str]], str]:
    """Rows 9-21, and a line with the sizes and each group's wall / CPU time."""
    rows, times = [], []
    for name, fn in GROUPS.items():
        t0, c0 = time.perf_counter(), time.process_time()
        rows += fn(prior, x)
        times.append(f"{name} {math.ceil(time.perf_counter() - t0)} / {math.ceil(time.process_time() - c0)} s")
        print(f"  {times[-1]}", flush=True)
    return rows, (f"embedded prior, first {IMAGES} demo images ({SMC_IMAGES} for MCG-diff and FPS-SMC, {PARTICLES} "
                  f"particles), {STEPS} steps, the harness's seeds; wall / CPU time per group: " + ", ".join(times))
