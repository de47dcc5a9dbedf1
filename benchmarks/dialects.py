"""What the prior dialects do to a network trained on the discrete grid (docs/ARCHITECTURE.md, "Prior dialects").

    python -m benchmarks.dialects [--md results/dialects.md] [--images 4] [--weights embedded64]
    python -m benchmarks.dialects --gmm [--dims 8,80 --dims-y 1,4 --problems 2] [--md ...]

For the embedded prior (an ADM epsilon network trained on integer t only), at grid levels sigma_t:

* vp_continuous feeds EDM ``VPPrecond``'s time input ``999 sigma_inv(sigma_t)`` instead of t: how far it is from t,
  and how much the denoiser moves (DAPS's and PnP-DM's official input, ``compat.*_time_input``);
* off the grid (every other dialect at a sigma between two levels): the network at the real time input t + 1/2
  (half-way in log sigma), against the mean of its two neighbours and the step between them.

Denoised inputs are the first demo images plus sigma_t noise (fixed seed); differences are max abs over pixels.

``--gmm`` reruns the first problems of some cells of the Gaussian-mixture benchmark with the prior in every dialect
and compares every per-problem score, value by value, with the committed ``results/gmm_posterior.json`` (each
problem is seeded by ``(seed, d, d_y, p)`` alone, so a subset is comparable).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time

import torch

from reddiff.data.demo import DemoDataset
from reddiff.priors.dialects import DIALECTS, make_dialect
from reddiff.priors.unet import UNetPrior

LEVELS = (100, 300, 500, 700, 900, 999)


def measure(prior, x0: torch.Tensor, levels=LEVELS) -> list[dict]:
    vpc = make_dialect("vp_continuous")
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for t in levels:
            s = float(prior.schedule.sigmas[t])
            xe = x0 + s * torch.randn(x0.shape, generator=g)
            d_grid = prior.denoise(xe, s, dialect="vp_discrete")
            d_vpc = prior.denoise(xe, s, dialect="vp_continuous")
            row = {"t": t, "sigma": s, "vpc_input": float(vpc.network_time(torch.tensor(s, dtype=torch.float64),
                                                                             prior.schedule)),
                   "vpc_max": float((d_vpc - d_grid).abs().max()),
                   "vpc_rel": float((d_vpc - d_grid).norm() / d_grid.norm())}
            if t + 1 < prior.schedule.T:
                s1 = float(prior.schedule.sigmas[t + 1])
                d1 = prior.denoise(xe, s1, dialect="vp_discrete")
                dm = prior.denoise(xe, math.sqrt(s * s1), dialect="vp_discrete")  # time input t + 1/2
                row["mid_max"] = float((dm - 0.5 * (d_grid + d1)).abs().max())
                row["step_max"] = float((d1 - d_grid).abs().max())
            rows.append(row)
    return rows


def render(rows, command: str, seconds: float, images: int) -> str:
    L = [f"Command: `{command}` ({datetime.date.today().isoformat()}, {seconds:.0f} s on the CPU)", "",
         "# Prior dialects on a network trained on the discrete grid (the embedded prior)", "",
         f"Inputs: the first {images} demo images plus sigma_t noise (seed 0); max abs over pixels.", "",
         "| t | sigma_t | vp_continuous time input (offset) | max abs D change | relative L2 | off grid: "
         "max abs D(t+1/2) - mean of neighbours | max abs D(t+1) - D(t) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mid = f"{r['mid_max']:.3g}" if "mid_max" in r else "–"
        step = f"{r['step_max']:.3g}" if "step_max" in r else "–"
        L.append(f"| {r['t']} | {r['sigma']:.4g} | {r['vpc_input']:.2f} ({r['vpc_input'] - r['t']:+.2f}) | "
                 f"{r['vpc_max']:.3g} | {r['vpc_rel']:.3g} | {mid} | {step} |")
    L += ["", "Reading: vp_continuous (EDM VPPrecond, the official DAPS / PnP-DM input) is half a step to three and a "
          "half steps off the integer t the network was trained on, and moves the denoiser by the amounts above; "
          "the other dialects evaluate it at t itself on the grid (bit-identical to vp_discrete) and at the "
          "interpolated real t between grid points, where it lies within a few per cent of a step of the mean of "
          "its two neighbours (smooth, not trained there).", ""]
    return "\n".join(L)


SCORES = ("sw", "sw2", "mode_tv", "mode_tv_to_prior", "spread", "data_w1", "data_w1_max")


def gmm_check(dims, dims_y, problems, committed="results/gmm_posterior.json") -> list[dict]:
    """Per dialect: how many per-problem scores were compared with the committed run, how many differ, the largest
    difference."""
    from benchmarks.gmm_posterior import gmm_samplers, run_all

    ref = json.load(open(committed))
    meta = ref["meta"]
    rows = []
    for name in DIALECTS:
        _, per, _ = run_all(dims, dims_y, problems=problems, samples=meta["samples"], steps=meta["steps"],
                            seed=meta["seed"], samplers=gmm_samplers(), log=lambda *_: None, dialect=name)
        n = bad = 0
        worst = 0.0
        for d, cells in per.items():
            for dy, recs in cells.items():
                for p, rec in enumerate(recs):
                    old = ref["problems"][d][dy][p]["methods"]
                    for m, v in rec["methods"].items():
                        for k in SCORES:
                            n += 1
                            if v[k] != old[m][k]:
                                bad += 1
                                if v[k] is not None and old[m][k] is not None:
                                    worst = max(worst, abs(v[k] - old[m][k]))
        rows.append({"dialect": name, "compared": n, "differ": bad, "max_diff": worst,
                     "methods": len(rec["methods"])})
    return rows


def render_gmm(rows, command: str, seconds: float, dims, dims_y, problems) -> str:
    L = [f"Command: `{command}` ({datetime.date.today().isoformat()}, {seconds:.0f} s on the CPU)", "",
         "# The Gaussian-mixture benchmark in every prior dialect", "",
         f"Cells d ∈ {list(dims)}, d_y ∈ {list(dims_y)}, problems 0..{problems - 1}, the committed run's samples, "
         "steps and seed; every per-problem score (" + ", ".join(SCORES) + ") of every method (the exact and prior "
         "references and each registry sampler with GMM settings) against `results/gmm_posterior.json`.", "",
         "| dialect | scores compared | differ | largest difference |", "|---|---|---|---|"]
    L += [f"| {r['dialect']} | {r['compared']} | {r['differ']} | {r['max_diff']:.3g} |" for r in rows]
    L += ["", "Reading: the mixture's denoiser is exact at every sigma and has no time input, so every sampler, "
          "on the grid or on sigma, gets the same numbers in every dialect: nothing moves.", ""]
    return "\n".join(L)


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--md", default=None)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--weights", default="embedded64")
    p.add_argument("--gmm", action="store_true", help="the GMM benchmark subset in every dialect (see above)")
    p.add_argument("--dims", type=_ints, default=[8, 80])
    p.add_argument("--dims-y", type=_ints, default=[1, 4])
    p.add_argument("--problems", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    cmd = ("python -m benchmarks.dialects " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if a.gmm:
        md = render_gmm(gmm_check(a.dims, a.dims_y, a.problems), cmd, time.time() - t0, a.dims, a.dims_y,
                        a.problems)
        if a.md:
            with open(a.md, "w") as f:
                f.write(md)
        print(md)
        return
    prior = UNetPrior(weights=a.weights, arch=a.weights if a.weights == "embedded64" else None)
    ds = DemoDataset(resolution=prior.resolution, count=a.images)
    x0 = torch.stack([ds.load(e) for e in ds.entries()])
    rows = measure(prior, x0)
    md = render(rows, cmd, time.time() - t0, a.images)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    print(md)


if __name__ == "__main__":
    main()
