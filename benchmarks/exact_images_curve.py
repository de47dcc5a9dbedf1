"""Error against budget on the exact image-scale posterior, and RED-diff's ordering and weighting ablations.

    python -m benchmarks.exact_images_curve [--tasks sr4] [--budgets 25,100,400]
        [--particles 1,4,16] [--ablation-tasks inpaint_freeform] [--problems 4] [--samples 16]
        [--workers 2] [--json FILE] [--md FILE] [--plot FILE]

Same prior, problems and scores as :mod:`benchmarks.exact_images` (its defaults).  **Curve**: every registry
sampler that declares an exact-Gaussian setting (``Sampler.exact_gaussian``: the methods that are exact in some
limit) at each budget (its NFE knobs scaled as in exact_images), and every sampler with a ``particles`` setting
at ``steps = 25`` and each particle count.  **Ablations**: RED-diff at ~100 NFE with each ordering of
:data:`reddiff.core.diffusion.ORDERINGS` and each weighting of :data:`reddiff.samplers.reddiff.WEIGHTINGS`.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from typing import Sequence

import numpy as np

from benchmarks import exact_images as E
from reddiff import registry
from reddiff.core.diffusion import ORDERINGS
from reddiff.core.errors import UserError
from reddiff.samplers.reddiff import WEIGHTINGS

ABLATED = "reddiff"  # the paper's own method: its ordering and weighting ablations


def curve_plan(task: str, prior, budgets: Sequence[int], particles: Sequence[int]) -> dict:
    plan = {}
    for name in E.supported(task):
        cls = registry.sampler_class(name)
        runs = []
        if getattr(cls, "exact_gaussian", None) is not None:
            for b in budgets:
                ov, nfe = E.budget_settings(name, task, prior, b)
                runs.append((b, ov, nfe, f"{name}@{b}"))
        if "particles" in registry.sampler_config(name, task):
            for n in particles:
                ov = {"particles": n, "steps": 25}
                try:
                    nfe = registry.build_sampler(name, task, **ov).expected_nfe(E.view_for(name, prior))
                except ValueError:  # a count the sampler refuses (EnKG needs an ensemble of 2 or more)
                    continue
                runs.append((nfe, ov, nfe, f"{name}[N={n}]@{nfe}"))
        if runs:
            plan[name] = runs
    return plan


def ablation_plan(task: str, prior, budget: int = 100) -> dict:
    ov, nfe = E.budget_settings(ABLATED, task, prior, budget)
    stream = f"{ABLATED}@{budget}"  # one noise stream for every setting: paired differences
    runs = [(budget, dict(ov, ordering=o), nfe, f"{ABLATED}[ordering={o}]@{budget}", stream) for o in ORDERINGS]
    runs += [(budget, dict(ov, weighting=w), nfe, f"{ABLATED}[weighting={w}]@{budget}", stream) for w in WEIGHTINGS]
    return {ABLATED: runs}


def run(cfg: dict, jobs_plans: dict, log=print) -> dict:
    """``jobs_plans[task] = plan``; every (task, problem) in ``cfg["workers"]`` processes."""
    jobs = [(t, p) for t in jobs_plans for p in range(cfg["problems"])]
    done: dict = {}
    t0 = time.perf_counter()
    if cfg["workers"] <= 1:
        for t, p in jobs:
            done[(t, p)] = E.run_problem(t, p, cfg, jobs_plans[t])
            log(f"  [{len(done)}/{len(jobs)} {time.perf_counter() - t0:.0f} s] {t} {p}")
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(cfg["workers"], mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(E.run_problem, t, p, cfg, jobs_plans[t]): (t, p) for t, p in jobs}
            for f in as_completed(futs):
                done[futs[f]] = f.result()
                log(f"  [{len(done)}/{len(jobs)} {time.perf_counter() - t0:.0f} s] {futs[f][0]} {futs[f][1]}")
    return {t: E.aggregate([done[(t, p)] for p in range(cfg["problems"])]) for t in jobs_plans}


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean and 95% t-interval of the per-problem difference ``a - b``."""
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    h = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "lo": float(d.mean() - h), "hi": float(d.mean() + h)}


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = ["# Error against budget on the exact image-scale posterior; RED-diff ablations", "",
             f"Command: `{m['command']}`  ", f"Date: {m['date']}; wall time {m['wall_seconds']:.0f} s.", "",
             "Prior, problems and scores as results/exact_images.md (benchmarks/exact_images.py defaults).  "
             "gap = MMSE gap (the `exact` row: the floor of the same number of exact samples); TV = mode-weight "
             "total variation.  Means over problems.", "", "## Curve", ""]
    for t, cells in res["curve"].items():
        lines += [f"### {t}", "", "| method | NFE | gap | TV | SW | cov90 |", "|---|---|---|---|---|---|"]
        for lab in ["exact", "prior"] + sorted((c for c in cells if "@" in c),
                                               key=lambda s: (s.split("@")[0].split("[")[0], "[" in s,
                                                              int(s.split("@")[1]))):
            c = cells[lab]
            if c["mmse_gap"] is None:
                lines.append(f"| {lab} | – | failed | | | |")
                continue
            lines.append(f"| {lab} | {c['nfe']:.0f} | {c['mmse_gap']:.3f} | {c['mode_tv']:.2f} | {c['sw']:.3f} | "
                         f"{c['cov90']:.2f} |")
        lines.append("")
    lines += ["## RED-diff ablations at ~100 NFE (paired differences over problems, 95% t-interval)", ""]
    for t, cells in res["ablation"].items():
        lines += [f"### {t}", "", "| setting | gap | Δgap vs default [95%] | PSNR | ΔPSNR vs default [95%] |",
                  "|---|---|---|---|---|"]
        for lab, c in cells.items():
            if "[" not in lab:
                continue
            a = res["ablation_pairs"][t].get(lab, {})
            dg, dp = a.get("mmse_gap"), a.get("psnr")
            lines.append(f"| {lab} | {c['mmse_gap']:.3f} | "
                         + (f"{dg['mean']:+.3f} [{dg['lo']:+.3f}, {dg['hi']:+.3f}]" if dg else "–")
                         + f" | {c['psnr']:.2f} | "
                         + (f"{dp['mean']:+.2f} [{dp['lo']:+.2f}, {dp['hi']:+.2f}]" if dp else "–") + " |")
        lines.append("")
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(res["curve"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        cells = res["curve"][t]
        series: dict = {}
        for lab, c in cells.items():
            if "@" in lab and c["mmse_gap"] is not None:
                series.setdefault(lab.split("@")[0].split("[")[0] + (" (particles)" if "[N=" in lab else ""),
                                  []).append((c["nfe"], c["mmse_gap"]))
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.axhline(cells["exact"]["mmse_gap"], color="k", ls="--", label="floor (exact samples)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE per sample")
        ax.set_ylabel("MMSE gap")
        ax.set_title(t)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.exact_images_curve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="sr4")
    ap.add_argument("--budgets", default="25,100,400")
    ap.add_argument("--particles", default="1,4,16")
    ap.add_argument("--ablation-tasks", default="inpaint_freeform")
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--plot", default=None)
    a = ap.parse_args(argv)
    try:
        known = E.svd_tasks()
        tasks = [t for t in a.tasks.split(",") if t]
        abl = [t for t in a.ablation_tasks.split(",") if t]
        bad = [t for t in tasks + abl if t not in known]
        if bad:
            raise UserError(f"unknown SVD task(s) {', '.join(bad)}; known: {', '.join(known)}")
        try:
            budgets = [int(b) for b in a.budgets.split(",")]
            parts = [int(b) for b in a.particles.split(",")]
        except ValueError:
            raise UserError("--budgets and --particles must be comma-separated integers") from None
        if a.problems < 2 or a.samples < 2 or min(budgets + parts) < 1:
            raise UserError("--problems and --samples must be >= 2, budgets and particles >= 1")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    d = E.parse_args([])
    cfg = dict(size=d.size, families=d.families, variants=d.variants, std=d.std, sigma_y=d.sigma_y,
               problems=a.problems, samples=a.samples, ref_samples=d.ref_samples, dirs=d.dirs, seed=d.seed,
               workers=a.workers)
    prior, _ = E.make_prior(cfg["size"], cfg["families"], cfg["variants"], cfg["std"], cfg["seed"])
    t0 = time.perf_counter()
    curve = run(cfg, {t: curve_plan(t, prior, budgets, parts) for t in tasks})
    ablation = run(cfg, {t: ablation_plan(t, prior) for t in abl})
    pairs = {}
    for t, cells in ablation.items():
        ref = cells[f"{ABLATED}[ordering=descending]@100"]
        pairs[t] = {lab: {m: paired(c[f"{m}_per_problem"], ref[f"{m}_per_problem"]) for m in ("mmse_gap", "psnr")}
                    for lab, c in cells.items() if "[" in lab and c["mmse_gap"] is not None}
    res = {"config": cfg, "curve": curve, "ablation": ablation, "ablation_pairs": pairs,
           "meta": {"command": "python -m benchmarks.exact_images_curve " + " ".join(argv),
                    "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "wall_seconds": time.perf_counter() - t0}}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write(markdown(res) + "\n")
    if a.plot:
        plot(res, a.plot)
    if not (a.json or a.md):
        print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
