"""Every registry sampler on every SVD task at image scale, scored against the exact posterior (issue #29).

    python -m benchmarks.exact_images [--size 32] [--families 24] [--variants 8] [--std 0.1] [--sigma-y 0.05]
        [--problems 6] [--samples 16] [--budgets 20,50,100] [--tasks all] [--samplers all] [--workers 2]
        [--seed 0] [--json FILE] [--md FILE] [--curve]

Prior (:class:`reddiff.priors.image_gmm.ImageMixturePrior`): ``sum_k w_k N(m_k, s^2 I)`` on 3 x size x size
images in model units, ``K = 3 * families * variants`` means built from crops of the **training** photos
(reddiff/data/photos.py, never the demo or tuning photos; each photo area-downsampled x4 first so a crop holds a
scene, not a texture) by :func:`reddiff.run.photo_priors.mixture_means` (the construction of
:func:`reddiff.priors.image_gmm.build_means`; also ``python run.py prior=image_gmm``).  Multimodality is designed in (a real image prior with K isotropic components is almost
always unimodal after the measurement, the issue's measurement): each family has a base crop ``c`` and
``variants`` other crops ``d_j`` (the first is ``c`` itself), and its means agree on one measured part and differ
elsewhere:

* ``lowpass``: ``L c + (d_j - L d_j)`` with ``L`` the x4 block average (what sr4 measures);
* ``centre``: ``c`` outside the centre square of half the side, ``d_j`` inside (what inpaint_box measures);
* ``chroma``: the channel mean of ``c`` plus the chroma ``d_j - mean_c d_j`` (what colorization measures).

Problems: problem ``p`` of a task draws ``x*`` from the prior's components of family type ``p mod 3`` (stratified:
with equal type weights the average over a multiple of 3 problems is an average over the prior) and measures
``y`` with the task's operator (``sigma_y`` in [0, 1] pixel units, model noise ``2 sigma_y``).

Scores per (task, sampler, budget), mean over problems, each beside ``exact`` (a second exact sample set of the
same size: the sampling floor) and ``prior`` (prior samples: ignore the data): ``mmse_gap`` = squared error of the
sample mean against the exact posterior mean over the posterior's total variance; ``cov50``/``cov90`` = fraction of
pixels whose true value lies in the central 50% / 90% interval of the samples at that pixel; ``mode_tv`` = total
variation between the mean component responsibilities of the samples and the exact posterior weights;
``sw`` = sliced W1 to a reference set of exact samples; ``psnr``/``ssim`` of each sample against ``x*``.
Budgets: each sampler's NFE knobs (the integer settings that change ``expected_nfe``, found by probing) are
scaled so that ``expected_nfe`` is the largest at or below the budget (``steps`` first); the measured NFE is stored.
Samplers are enumerated from the registry (:func:`supported`), so new ones join without edits.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import sys
import time
import zlib
from typing import Sequence

import numpy as np
import torch

from benchmarks.gmm_posterior import random_directions, sampler_stream, sliced_wasserstein
from reddiff import registry
from reddiff.core.errors import UserError
from reddiff.core.rng import BatchRNG, stream_generator, stream_seed
from reddiff.priors.image_gmm import FAMILY_TYPES, ImageMixturePrior
from reddiff.run.photo_priors import mixture_means

REFERENCES = ("exact", "prior")


# ------------------------------------------------------------------------------------------ the prior
_PRIOR_CACHE: dict = {}


def make_prior(size, families, variants, std, seed) -> tuple[ImageMixturePrior, list[str]]:
    """The benchmark's prior and the family type of each component, built once per setting
    (:func:`reddiff.run.photo_priors.mixture_means`)."""
    key = (size, families, variants, std, seed)
    if key not in _PRIOR_CACHE:
        means, types = mixture_means(size, families, variants, seed)
        _PRIOR_CACHE[key] = (ImageMixturePrior(means, std), types)
    return _PRIOR_CACHE[key]


# ------------------------------------------------------------------------------------------ tasks and samplers
def svd_tasks() -> list[str]:
    """Every task of the registry whose operator is an SVD operator and needs no user weights."""
    return [t for t in registry.task_names()
            if registry.task_info(t)["svd"] and not registry.task_info(t)["needs_weights"]]


def supported(task: str) -> list[str]:
    """Every registry sampler whose ``requires`` the task's operator provides (an SVD operator provides all) and
    that runs on a pixel prior (not ``needs_latent``)."""
    return [n for n in registry.sampler_names()
            if set(registry.sampler_class(n).requires) <= {"svd", "linear", "adjoint", "grad"}
            and not getattr(registry.sampler_class(n), "needs_latent", False)]


def view_for(name: str, prior):
    """The prior in a dialect the sampler is defined on (``Sampler.dialects``; the exact prior speaks every one):
    a shallow copy with another view, so the means and their basis are shared."""
    import copy

    from reddiff.priors.dialects import make_dialect

    dialects = getattr(registry.sampler_class(name), "dialects", None)
    if dialects is None or prior.dialect in dialects:
        return prior
    other = copy.copy(prior)
    other.view = make_dialect(dialects[0], prior.schedule)
    other.nfe = 0
    return other


def binder(task: str, index: int, size: int, sigma_y: float):
    """``bind(B)``: the task's operator set up for ``B`` copies of problem ``index`` (cached per B)."""
    cache: dict = {}

    def bind(B: int):
        if B not in cache:
            cache[B] = registry.build_operator(task, sigma_y=sigma_y).setup([index] * B, (B, 3, size, size))
        return cache[B]
    return bind


_CONFIGS: dict = {}


def build(name: str, task: str, **overrides):
    """``registry.build_sampler(name, task, **overrides)`` with the resolved YAML cached: the class called on
    its keyword arguments (the budget search builds thousands of samplers; Hydra's instantiate is the slow part)."""
    if (name, task) not in _CONFIGS:
        cfg = registry.sampler_config(name, task)
        simple = all(not isinstance(v, dict) or "_target_" not in v for v in cfg.values())
        _CONFIGS[(name, task)] = (cfg, simple)
    cfg, simple = _CONFIGS[(name, task)]
    if not simple:
        return registry.build_sampler(name, task, **overrides)
    kw = {k: v for k, v in cfg.items() if k != "_target_"}
    kw.update(overrides)
    return registry.import_target(cfg["_target_"])(**kw)


def _nfe_knobs(name: str, task: str, prior) -> dict:
    """The sampler's integer settings that change its ``expected_nfe`` (probed by halving each)."""
    base = registry.sampler_config(name, task)
    ref = build(name, task).expected_nfe(prior)
    knobs = {}
    for k, v in base.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 2 or k.startswith("_"):
            continue
        try:
            if build(name, task, **{k: v // 2}).expected_nfe(prior) != ref:
                knobs[k] = v
        except Exception:  # noqa: BLE001 - a setting that cannot be halved is not a knob
            continue
    return knobs


def budget_settings(name: str, task: str, prior, budget: int) -> tuple[dict, int]:
    """Overrides giving the largest ``expected_nfe <= budget`` (``steps`` first, then every knob scaled down
    together), and that NFE.  A sampler without knobs (pinv) runs as it is."""
    prior = view_for(name, prior)
    knobs = _nfe_knobs(name, task, prior)
    if not knobs:
        return {}, build(name, task).expected_nfe(prior)

    def nfe(ov):
        try:
            return build(name, task, **ov).expected_nfe(prior)
        except Exception:  # noqa: BLE001 - a setting the sampler refuses
            return math.inf

    best: tuple = ({k: 1 for k in knobs}, -1)
    for f in (1.0, 0.5, 0.25, 0.125, 1 / 16, 1 / 32):  # the most NFE within budget; ties: the larger f
        others = {k: max(1, round(v * f)) for k, v in knobs.items() if k != "steps"}
        if "steps" not in knobs:
            cand = (others, nfe(others))
        else:
            lo, hi = 0, 4 * budget  # largest steps with nfe <= budget (nfe grows with steps)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if nfe(dict(others, steps=mid)) <= budget:
                    lo = mid
                else:
                    hi = mid - 1
            cand = (dict(others, steps=max(lo, 1)), nfe(dict(others, steps=max(lo, 1))))
        if cand[1] <= budget and cand[1] > best[1]:
            best = cand
    if best[1] < 0:
        best = (best[0], nfe(best[0]))
    return best


def make_plan(task: str, samplers: Sequence[str], prior, budgets: Sequence[int]) -> dict:
    """``{sampler: [(budget, overrides, expected_nfe), ...]}``; a sampler whose settings do not change with the
    budget (pinv) runs once."""
    plan = {}
    for name in samplers:
        runs = []
        for b in budgets:
            ov, nfe = budget_settings(name, task, prior, b)
            if not any(r[1] == ov for r in runs):
                runs.append((b, ov, nfe))
        plan[name] = runs
    return plan


# ------------------------------------------------------------------------------------------ scores
def scores(X: torch.Tensor, post, prior, x_star, ref_sorted_fn, mean, total_var) -> dict:
    """Posterior-fidelity and ground-truth scores of samples ``X (n, C, H, W)`` (module docstring)."""
    from reddiff.metrics.suite import psnr, ssim

    X = X.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(X).all()):
        return {"finite": False}
    gap = float(((X.mean(0) - mean) ** 2).sum() / total_var)
    q = torch.quantile(X.reshape(X.shape[0], -1), torch.tensor([0.05, 0.25, 0.75, 0.95], dtype=torch.float64), dim=0)
    xs = x_star.reshape(-1)
    cov50 = float(((xs >= q[1]) & (xs <= q[2])).double().mean())
    cov90 = float(((xs >= q[0]) & (xs <= q[3])).double().mean())
    resp = prior.component_responsibilities(X).mean(0)
    tv = float(0.5 * (resp - post.weights).abs().sum())
    truth = x_star[None].expand_as(X)
    return {"finite": True, "mmse_gap": gap, "cov50": cov50, "cov90": cov90, "mode_tv": tv, "sw": ref_sorted_fn(X),
            "psnr": float(psnr(X.clamp(-1, 1), truth).mean()), "ssim": float(ssim(X.clamp(-1, 1), truth).mean()),
            "psnr_of_mean": float(psnr(X.mean(0, keepdim=True).clamp(-1, 1), x_star[None]).mean())}


def run_problem(task: str, p: int, cfg: dict, plan: dict) -> dict:
    """Problem ``p`` of ``task``: the exact posterior, the two references and every (sampler, budget) of
    ``plan[name] = [(budget, overrides, expected_nfe), ...]``; deterministic in ``(seed, task, p)``."""
    torch.set_num_threads(1)
    prior, types = make_prior(cfg["size"], cfg["families"], cfg["variants"], cfg["std"], cfg["seed"])
    tid = zlib.crc32(task.encode())  # the task's name, not its place in the registry: a new task moves no problem
    g = stream_generator(cfg["seed"], tid, p, 0)
    comps = [k for k, t in enumerate(types) if t == FAMILY_TYPES[p % len(FAMILY_TYPES)]]
    k = comps[int(torch.randint(len(comps), (1,), generator=g))]
    x_star = prior.means[k].reshape(prior.shape) + prior.std * torch.randn(prior.shape, generator=g,
                                                                           dtype=torch.float64)
    bind = binder(task, p, cfg["size"], cfg["sigma_y"])
    op1 = bind(1)
    sigma = op1.noise_std
    y = op1.measure(x_star[None], BatchRNG(stream_seed(cfg["seed"], tid, p, 1), per_item=False))
    t0 = time.perf_counter()
    post = prior.spectral_posterior(y, bind, sigma)
    mean, total_var = post.mean(), post.total_variance()
    n = cfg["samples"]
    ref = post.sample(cfg["ref_samples"], stream_generator(cfg["seed"], tid, p, 2))
    theta = random_directions(cfg["dirs"], prior.d, stream_generator(cfg["seed"], tid, p, 3))
    refflat = ref.reshape(ref.shape[0], -1)
    sw = lambda X: sliced_wasserstein(X.reshape(X.shape[0], -1), refflat, theta)[0]
    out = {"component": k, "family": types[k], "effective_modes": post.effective_modes(),
           "total_variance": total_var, "posterior_seconds": time.perf_counter() - t0, "cells": {}}
    keep = {"x_star": x_star, "y_vis": op1.visualize(y)[0].double(), "exact_mean": mean,
            "exact_std": post.pixel_variance().sqrt()} if cfg.get("keep") else None

    def record(label, X, seconds, nfe, budget=None):
        r = scores(X, post, prior, x_star, sw, mean, total_var)
        r.update(seconds=seconds, nfe=nfe, budget=budget)
        out["cells"][label] = r
        if keep is not None:
            keep[label] = X.detach().double()

    record("exact", post.sample(n, stream_generator(cfg["seed"], tid, p, 4)), 0.0, 0)
    record("prior", prior.sample(n, stream_generator(cfg["seed"], tid, p, 5)), 0.0, 0)
    yb = y.to(torch.float32).expand((n,) + tuple(y.shape[1:])).contiguous()
    opn = bind(n)
    for name, runs in plan.items():
        for entry in runs:
            budget, ov = entry[0], entry[1]
            label = entry[3] if len(entry) > 3 else f"{name}@{budget}"
            sampler = registry.build_sampler(name, task, **ov)
            pv = view_for(name, prior)
            stream = entry[4] if len(entry) > 4 else label  # runs that share a stream share their noise (paired)
            rng = BatchRNG(stream_seed(cfg["seed"], tid, p, sampler_stream(stream)), per_item=False)
            pv.reset_nfe()
            t0 = time.perf_counter()
            try:
                X = sampler.sample(yb, opn, pv, rng)
            except Exception as e:  # noqa: BLE001 - a sampler that fails is reported, not fatal to the run
                out["cells"][label] = {"finite": False, "error": f"{type(e).__name__}: {e}"[:200]}
                continue
            record(label, X, time.perf_counter() - t0, pv.nfe, budget)
    if keep is not None:
        out["kept"] = keep
    return out


# ------------------------------------------------------------------------------------------ the run
METRICS = ("mmse_gap", "cov50", "cov90", "mode_tv", "sw", "psnr", "ssim", "seconds", "nfe")


def aggregate(records: list[dict]) -> dict:
    """``{label: {metric: mean over problems, "n_failed": ...}}`` for one task."""
    out = {}
    for label in records[0]["cells"]:
        rs = [r["cells"][label] for r in records if label in r["cells"]]
        ok = [r for r in rs if r.get("finite")]
        cell = {m: (float(np.mean([r[m] for r in ok])) if ok else None) for m in METRICS}
        cell["budget"] = rs[0].get("budget")
        for m in ("mmse_gap", "psnr", "mode_tv"):  # per problem (problem order), for paired comparisons
            cell[f"{m}_per_problem"] = [r.get(m) for r in rs]
        cell["n_failed"] = len(rs) - len(ok)
        errs = sorted({r["error"] for r in rs if "error" in r})
        if errs:
            cell["error"] = errs[0]
        out[label] = cell
    return out


def run_all(cfg: dict, tasks: Sequence[str], samplers: Sequence[str] | None, log=print) -> dict:
    """Every (task, problem) job, in ``cfg["workers"]`` processes (one torch thread each); the numbers do not
    depend on the number of workers (every job is seeded by ``(seed, task, problem)``)."""
    prior, _ = make_prior(cfg["size"], cfg["families"], cfg["variants"], cfg["std"], cfg["seed"])
    plans = {t: make_plan(t, [n for n in (samplers or supported(t)) if n in supported(t)], prior, cfg["budgets"])
             for t in tasks}
    jobs = [(t, p) for t in tasks for p in range(cfg["problems"])]
    done: dict = {}
    t_start = time.perf_counter()

    def record(job, r):
        done[job] = r
        log(f"  [{len(done)}/{len(jobs)} {time.perf_counter() - t_start:.0f} s] {job[0]} problem {job[1]}: "
            f"modes {r['effective_modes']:.2f}")

    kw = lambda t, p: dict(cfg, keep=(p == 0 and cfg.get("figure") is not None))
    if cfg["workers"] <= 1:
        for t, p in jobs:
            record((t, p), run_problem(t, p, kw(t, p), plans[t]))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(cfg["workers"], mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(run_problem, t, p, kw(t, p), plans[t]): (t, p) for t, p in jobs}
            for f in as_completed(futs):
                record(futs[f], f.result())
    results, per_problem, kept = {}, {}, {}
    for t in tasks:
        recs = [done[(t, p)] for p in range(cfg["problems"])]
        for r in recs:
            if "kept" in r:
                kept[t] = r.pop("kept")
        results[t] = aggregate(recs)
        per_problem[t] = [{k: v for k, v in r.items() if k != "cells"} for r in recs]
    return {"results": results, "problems": per_problem,
            "plans": {t: {n: [list(r) for r in runs] for n, runs in pl.items()} for t, pl in plans.items()},
            "kept": kept}


# ------------------------------------------------------------------------------------------ reporting
def _order(cells: dict) -> list[str]:
    """References first, then samplers in registry order (unknown names after), budgets ascending."""
    names = registry.sampler_names()
    rank = lambda lab: (names.index(lab.split("@")[0]) if lab.split("@")[0] in names else len(names),
                        lab.split("@")[0], int(lab.split("@")[1]))
    return [r for r in REFERENCES if r in cells] + sorted((c for c in cells if "@" in c), key=rank)


def _f(v, fmt="{:.3f}"):
    return "–" if v is None else fmt.format(v)


def markdown(res: dict) -> str:
    cfg, meta = res["config"], res["meta"]
    lines = [f"# Every sampler against the exact posterior at image scale ({cfg['size']}x{cfg['size']} RGB)", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}; wall time {meta['wall_seconds']:.0f} s "
             f"({meta['workers']} worker processes, one torch thread each; {meta['machine']}).", "",
             f"Prior: K = {meta['K']} isotropic components (s = {cfg['std']}, uniform weights), means from "
             f"{cfg['size']}-px crops of the training photos in {len(FAMILY_TYPES)} family types "
             f"({', '.join(FAMILY_TYPES)}) of {cfg['families']} families x {cfg['variants']} variants "
             "(benchmarks/exact_images.py docstring); "
             f"sigma_y = {cfg['sigma_y']} (pixel units) on every task; {cfg['problems']} problems per task, "
             f"{cfg['samples']} samples per problem and cell, SW against {cfg['ref_samples']} exact samples along "
             f"{cfg['dirs']} directions.", "",
             "Columns: **gap** = ||sample mean - posterior mean||^2 / tr Cov(x|y) (the MMSE gap; the `exact` row is "
             f"the floor of {cfg['samples']} exact samples, about 1/{cfg['samples']}); **cov50/cov90** = coverage of "
             "the truth by per-pixel central 50%/90% sample intervals (the `exact` row is what a perfect sampler gets "
             "with this many samples); **TV** = total variation between the samples' mean component responsibilities "
             "and the exact posterior weights; **SW** = sliced W1 to exact samples; PSNR/SSIM of each sample against "
             "the truth.  Means over problems.", "",
             "## Effective number of posterior modes (exp entropy of the weights), per task", "",
             "| task | median | mean | fraction > 1.5 | per problem |", "|---|---|---|---|---|"]
    for t, probs in res["problems"].items():
        m = np.array([p["effective_modes"] for p in probs])
        lines.append(f"| {t} | {np.median(m):.2f} | {m.mean():.2f} | {(m > 1.5).mean():.2f} | "
                     + ", ".join(f"{v:.2f}" for v in m) + " |")
    lines += ["", "## Quality per network call: median over tasks of the MMSE gap (floor: `exact`)", ""]
    labels = sorted({lab for c in res["results"].values() for lab in c}, key=lambda s: s)
    samplers = sorted({lab.split("@")[0] for lab in labels if "@" in lab},
                      key=lambda n: registry.sampler_names().index(n) if n in registry.sampler_names() else 99)
    budgets = cfg["budgets"]
    lines += ["| sampler | " + " | ".join(f"~{b} NFE: gap / TV" for b in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    for ref in REFERENCES:
        g = [c[ref]["mmse_gap"] for c in res["results"].values()]
        tv = [c[ref]["mode_tv"] for c in res["results"].values()]
        lines.append(f"| {ref} | " + " | ".join(f"{np.median(g):.3f} / {np.median(tv):.2f}" for _ in budgets) + " |")
    for n in samplers:
        row = []
        for b in budgets:
            cs = [c[f"{n}@{b}"] for c in res["results"].values() if f"{n}@{b}" in c]
            g = [c["mmse_gap"] for c in cs if c["mmse_gap"] is not None]
            tv = [c["mode_tv"] for c in cs if c["mode_tv"] is not None]
            row.append(f"{np.median(g):.3f} / {np.median(tv):.2f}" if g else "–")
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    lines += ["", "## Per task", ""]
    for t, cells in res["results"].items():
        lines += [f"### {t}", "", "| method | NFE | gap | cov50 | cov90 | TV | SW | PSNR | SSIM | s/problem |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for lab in _order(cells):
            c = cells[lab]
            if c["mmse_gap"] is None:
                lines.append(f"| {lab} | – | failed: {c.get('error', 'non-finite')} |" + " |" * 7)
                continue
            lines.append(f"| {lab} | {c['nfe']:.0f} | {_f(c['mmse_gap'])} | {_f(c['cov50'], '{:.2f}')} | "
                         f"{_f(c['cov90'], '{:.2f}')} | {_f(c['mode_tv'], '{:.2f}')} | {_f(c['sw'])} | "
                         f"{_f(c['psnr'], '{:.2f}')} | {_f(c['ssim'], '{:.3f}')} | {_f(c['seconds'], '{:.2f}')} |")
        lines.append("")
    cost = meta["cell_seconds"]
    lines += ["## Cost", "", f"{len(cost)} (task, sampler, budget) cells; sampler time per cell (all problems): "
              f"mean {np.mean(list(cost.values())):.1f} s, max {max(cost.values()):.1f} s "
              f"({max(cost, key=cost.get)}); total sampler time {sum(cost.values()):.0f} s of "
              f"{meta['wall_seconds'] * meta['workers']:.0f} worker-seconds.", ""]
    return "\n".join(lines)


def figure(res: dict, kept: dict, path: str) -> None:
    """Per task (rows): truth, measurement, then for the exact samples and each sampler at its largest budget the
    sample mean, the per-pixel std and the map of pixels whose truth lies in the 90% sample interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(kept)
    top = max(res["config"]["budgets"])
    labels = ["exact"] + [lab for lab in _order(res["results"][tasks[0]]) if lab.endswith(f"@{top}")]
    cols = 3 + 3 * len(labels)
    fig, axes = plt.subplots(len(tasks), cols, figsize=(0.6 * cols, 0.7 * len(tasks) + 0.6), squeeze=False)
    img = lambda x: ((x.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    for i, t in enumerate(tasks):
        k = kept[t]
        smax = float(k["exact_std"].mean(0).max())
        panels = [("truth", img(k["x_star"]), None), ("y", img(k["y_vis"]), None),
                  ("post. std", k["exact_std"].mean(0).numpy(), smax)]
        for lab in labels:
            X = k.get(lab)
            if X is None:
                panels += [(lab, None, None)] * 3
                continue
            q = torch.quantile(X, torch.tensor([0.05, 0.95], dtype=torch.float64), dim=0)
            inside = ((k["x_star"] >= q[0]) & (k["x_star"] <= q[1])).double().mean(0).numpy()
            panels += [(lab.split("@")[0] + " mean", img(X.mean(0)), None),
                       ("std", X.std(0).mean(0).numpy(), smax), ("cov90", inside, 1.0)]
        for j, (title, im, vmax) in enumerate(panels):
            ax = axes[i, j]
            ax.axis("off")
            if im is not None:
                ax.imshow(im, cmap=None if im.ndim == 3 else "gray", vmin=0, vmax=vmax, interpolation="nearest")
            if i == 0:
                ax.set_title(title, fontsize=5, rotation=45)
        axes[i, 0].text(-4, 16, t, fontsize=5, ha="right", va="center")
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.exact_images", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--families", type=int, default=24)
    ap.add_argument("--variants", type=int, default=8)
    ap.add_argument("--std", type=float, default=0.1)
    ap.add_argument("--sigma-y", type=float, default=0.05)
    ap.add_argument("--problems", type=int, default=6)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--ref-samples", type=int, default=64)
    ap.add_argument("--dirs", type=int, default=200)
    ap.add_argument("--budgets", default="20,50,100")
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--samplers", default="all")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--figure", default=None)
    return ap.parse_args(argv)


def _check(a) -> tuple[list[str], list[str] | None, list[int]]:
    """Validated tasks, samplers and budgets; :class:`UserError` with one line otherwise."""
    known = svd_tasks()
    tasks = known if a.tasks == "all" else [t.strip() for t in a.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in known]
    if bad:
        raise UserError(f"--tasks: {', '.join(bad)} not an SVD task without weights; known: {', '.join(known)}")
    samplers = None
    if a.samplers != "all":
        samplers = [s.strip() for s in a.samplers.split(",") if s.strip()]
        bad = [s for s in samplers if s not in registry.sampler_names()]
        if bad:
            raise UserError(f"--samplers: unknown {', '.join(bad)}; known: {', '.join(registry.sampler_names())}")
    try:
        budgets = sorted({int(b) for b in a.budgets.split(",")})
    except ValueError:
        raise UserError(f"--budgets must be comma-separated integers, got {a.budgets!r}") from None
    for name, v, lo in (("--size", a.size, 8), ("--families", a.families, 1), ("--variants", a.variants, 1),
                        ("--problems", a.problems, 1), ("--samples", a.samples, 2), ("--workers", a.workers, 1),
                        ("--ref-samples", a.ref_samples, 2), ("--dirs", a.dirs, 1)):
        if v < lo:
            raise UserError(f"{name} must be >= {lo}, got {v}")
    if a.size % 4:
        raise UserError(f"--size must be a multiple of 4 (the x4 tasks), got {a.size}")
    if not (a.std > 0 and 0 <= a.sigma_y <= 1) or min(budgets) < 1:
        raise UserError("--std must be > 0, --sigma-y in [0, 1] and every budget >= 1")
    return tasks, samplers, budgets


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    try:
        tasks, samplers, budgets = _check(a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = dict(size=a.size, families=a.families, variants=a.variants, std=a.std, sigma_y=a.sigma_y,
               problems=a.problems, samples=a.samples, ref_samples=a.ref_samples, dirs=a.dirs, budgets=budgets,
               workers=a.workers, seed=a.seed, figure=a.figure)
    t0 = time.perf_counter()
    res = run_all(cfg, tasks, samplers)
    wall = time.perf_counter() - t0
    kept = res.pop("kept")
    cell_seconds = {}
    for t, cells in res["results"].items():
        for lab, c in cells.items():
            if "@" in lab and c["seconds"] is not None:
                cell_seconds[f"{t}/{lab}"] = c["seconds"] * a.problems
    prior, _ = make_prior(a.size, a.families, a.variants, a.std, a.seed)
    res["config"] = cfg
    res["meta"] = {"command": "python -m benchmarks.exact_images " + " ".join(argv),
                   "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   "wall_seconds": wall, "workers": a.workers, "K": prior.K, "d": prior.d,
                   "machine": f"{platform.machine()}, {platform.python_version()}, torch {torch.__version__}",
                   "cell_seconds": cell_seconds}
    text = markdown(res)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text + "\n")
    if a.figure and kept:
        figure(res, kept, a.figure)
    if not (a.json or a.md):
        print(text)
    print(f"done in {wall:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
