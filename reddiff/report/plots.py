"""Plots of a sweep: ``python -m reddiff.report.plots SWEEP_DIR [--kind auto|heatmap|steps|weighting|bars|grid]``.

PNG files are written next to ``table.md`` in the sweep dir (or any folder of job dirs, shards merged exactly as
:mod:`reddiff.report.tables` merges them):

* ``plot_heatmap.png``: a metric over the lambda x lr grid, one panel per metric (and per task/sampler);
* ``plot_steps.png``: metrics (and seconds per image) against NFE per image, one line per sampler;
* ``plot_weighting.png``: the RED-diff weighting curves ``w(t) / lambda`` against the timestep ``t`` for all
  weightings (the paper's Fig. 2; computed from :class:`reddiff.core.diffusion.Schedule` and
  :data:`reddiff.samplers.reddiff.WEIGHTINGS` through :meth:`REDDiff.weight_table`), plus the metric of each
  weighting when the sweep varies it;
* ``plot_bars.png``: metrics (mean and 95% CI as points with error bars) per job, for categorical sweeps
  (samplers, orderings);
* ``plot_grid.png``: sample grids: ground truth, measurement and every job's restoration for the first images,
  from each job's ``images/*.png``.

``--kind auto`` (the default) picks the plots that the sweep's varying settings call for; the experiment presets'
sweeps run it at the end (:class:`reddiff.run.sweep_callback.SweepTableCallback`).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional

import numpy as np

from reddiff.report.figures import _plt, _save
from reddiff.report.figures import plot_grid as _plot_grid
from reddiff.report.tables import METRIC_ORDER, collect

KINDS = ("heatmap", "steps", "weighting", "bars", "grid")
LOWER_IS_BETTER = {"lpips", "kid", "fid"}
#: sampler settings that identify a job in labels and drive the choice of plots
SAMPLER_KEYS = ("steps", "lr", "lam", "weighting", "ordering", "zeta", "eta", "eta_b", "guidance_weight",
                "start_step", "start_t", "sigma_x0", "obs_weight")


# ----------------------------------------------------------------------------------------- jobs
def job_params(s: dict) -> dict:
    """The settings of one job: task, sampler, prior, data and the scalar sampler options of its resolved config."""
    cfg = s.get("config") or {}
    smp = cfg.get("sampler") or {}
    out = {"task": s.get("task"), "sampler": s.get("sampler"), "prior": s.get("prior"), "data": s.get("data")}
    for k in SAMPLER_KEYS:
        v = smp.get(k)
        if isinstance(v, (int, float, str, bool)) or v is None:
            if k in smp:
                out[k] = v
    return out


def varying_keys(params: list[dict]) -> list[str]:
    """Settings that differ between jobs; a sampler option counts only if it differs between jobs of the same
    sampler (DDRM's eta is not DPS's eta)."""
    keys = [k for k in ("task", "sampler", "prior", "data") if len({repr(p.get(k)) for p in params}) > 1]
    for k in SAMPLER_KEYS:
        per_sampler: dict[str, set] = {}
        for p in params:
            if k in p:
                per_sampler.setdefault(str(p.get("sampler")), set()).add(repr(p[k]))
        if any(len(v) > 1 for v in per_sampler.values()):
            keys.append(k)
    return keys


def label(p: dict, varying: list[str]) -> str:
    """Short name of a job: the settings that vary across the sweep (task, sampler, then sampler options)."""
    parts = [str(p[k]) for k in ("task", "sampler", "prior", "data") if k in varying]
    parts += [f"{k}={_fmt(p[k])}" for k in varying if k not in ("task", "sampler", "prior", "data") and k in p]
    return " ".join(parts) or f"{p['task']} / {p['sampler']}"


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def metric_value(s: dict, name: str) -> tuple[Optional[float], Optional[float]]:
    m = (s.get("metrics") or {}).get(name) or {}
    mean = m.get("mean")
    if mean is None or not isinstance(mean, (int, float)) or not math.isfinite(mean):
        return None, None
    ci = m.get("ci95")
    return float(mean), (float(ci) if isinstance(ci, (int, float)) and math.isfinite(ci) else None)


def available_metrics(summaries: list[dict], wanted: Optional[list[str]] = None) -> list[str]:
    names = wanted or METRIC_ORDER
    return [m for m in names if any(metric_value(s, m)[0] is not None for s in summaries)]


def load_jobs(root: Path) -> list[dict]:
    """Finished jobs (status ok) under ``root``, shards merged, each with ``params``."""
    out = []
    for s in collect(Path(root)):
        if s.get("status") != "ok":
            continue
        s["params"] = job_params(s)
        s["dirs"] = [Path(d.strip()) for d in str(s.get("_dir", "")).split(",") if d.strip()]
        out.append(s)
    return out


def auto_kinds(jobs: list[dict]) -> list[str]:
    var = set(varying_keys([j["params"] for j in jobs]))
    kinds = []
    if {"lr", "lam"} <= var:
        kinds.append("heatmap")
    if "steps" in var or len({j.get("cost", {}).get("nfe_per_image") for j in jobs
                              if j["params"].get("sampler") == jobs[0]["params"].get("sampler")}) > 1:
        kinds.append("steps")
    if "weighting" in var:
        kinds.append("weighting")
    other = var - {"lr", "lam", "steps", "weighting"} - ({"sampler"} if "steps" in kinds else set())
    if other:  # categorical settings (samplers, orderings, tasks): one point per job
        kinds.append("bars")
    if jobs:
        kinds.append("grid")
    return kinds


# ---------------------------------------------------------------------------------------- plots
def heatmap_grid(jobs: list[dict], metric: str) -> tuple[list[float], list[float], np.ndarray]:
    """``(lams, lrs, grid)``: the mean of ``metric`` at ``grid[i, j]`` for ``lam = lams[i]``, ``lr = lrs[j]``
    (NaN where no job ran; jobs sharing a cell are averaged)."""
    lrs = sorted({float(j["params"]["lr"]) for j in jobs})
    lams = sorted({float(j["params"]["lam"]) for j in jobs})
    cells: dict[tuple[int, int], list[float]] = {}
    for j in jobs:
        v, _ = metric_value(j, metric)
        if v is not None:
            key = (lams.index(float(j["params"]["lam"])), lrs.index(float(j["params"]["lr"])))
            cells.setdefault(key, []).append(v)
    grid = np.full((len(lams), len(lrs)), np.nan)
    for (a, b), vs in cells.items():
        grid[a, b] = float(np.mean(vs))
    return lams, lrs, grid


def plot_heatmap(jobs: list[dict], out: Path, metrics: list[str]) -> Optional[Path]:
    """Metric over the (lam, lr) grid, one row per (task, sampler) and one column per metric."""
    groups: dict[tuple, list[dict]] = {}
    for j in jobs:
        p = j["params"]
        if "lr" in p and "lam" in p:
            groups.setdefault((p["task"], p["sampler"]), []).append(j)
    groups = {k: v for k, v in groups.items() if len({j["params"]["lr"] for j in v}) > 1 or
              len({j["params"]["lam"] for j in v}) > 1}
    if not groups or not metrics:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(groups), len(metrics), figsize=(3.6 * len(metrics), 3.2 * len(groups)),
                             squeeze=False)
    for r, ((task, sampler), members) in enumerate(groups.items()):
        for c, m in enumerate(metrics):
            lams, lrs, grid = heatmap_grid(members, m)
            ax = axes[r, c]
            cmap = "viridis_r" if m in LOWER_IS_BETTER else "viridis"
            im = ax.imshow(grid, origin="lower", cmap=cmap, aspect="auto")
            for a, b in zip(*np.nonzero(np.isfinite(grid))):
                ax.text(b, a, f"{grid[a, b]:.3g}", ha="center", va="center", fontsize=7, color="w")
            if np.isfinite(grid).any():
                best = np.nanargmin(grid) if m in LOWER_IS_BETTER else np.nanargmax(grid)
                ax.add_patch(plt.Rectangle((best % len(lrs) - 0.5, best // len(lrs) - 0.5), 1, 1, fill=False,
                                           edgecolor="red", lw=2))
            ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs], fontsize=8)
            ax.set_yticks(range(len(lams)), [f"{v:g}" for v in lams], fontsize=8)
            ax.set_xlabel("lr")
            ax.set_ylabel("λ")
            ax.set_title(f"{m} ({sampler} on {task})", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, out / "plot_heatmap.png")


def plot_steps(jobs: list[dict], out: Path, metrics: list[str]) -> Optional[Path]:
    """Metrics and seconds/image against NFE per image, one line per (task, sampler, other settings)."""
    var = [k for k in varying_keys([j["params"] for j in jobs]) if k != "steps"]
    lines: dict[str, list[tuple[float, dict]]] = {}
    for j in jobs:
        nfe = (j.get("cost") or {}).get("nfe_per_image")
        if nfe is None:
            continue
        lines.setdefault(label(j["params"], var), []).append((float(nfe), j))
    if not lines:
        return None
    panels = metrics + ["s/img"]
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.3), squeeze=False)
    for c, m in enumerate(panels):
        ax = axes[0, c]
        for name, pts in lines.items():
            pts = sorted(pts, key=lambda t: t[0])
            xs, ys, es = [], [], []
            for nfe, j in pts:
                if m == "s/img":
                    v, e = (j.get("cost") or {}).get("seconds_per_image"), None
                else:
                    v, e = metric_value(j, m)
                if v is not None:
                    xs.append(max(nfe, 1.0))
                    ys.append(v)
                    es.append(e or 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=2, label=name)
        ax.set_xscale("log")
        if m == "s/img":
            ax.set_yscale("log")
        ax.set_xlabel("NFE per image")
        ax.set_ylabel(m + (" (lower is better)" if m in LOWER_IS_BETTER else ""))
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    return _save(fig, out / "plot_steps.png")


def weighting_curves(T: int = 1000) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``t`` and ``w(t) / lambda`` for every RED-diff weighting, from the sampler's own weight table."""
    from reddiff.core.diffusion import Schedule
    from reddiff.samplers.reddiff import WEIGHTINGS, REDDiff

    sched = Schedule(T=T)
    ts = list(range(T))
    curves = {w: REDDiff(steps=T, weighting=w, lam=1.0).weight_table(ts, sched, 1)[:, 0].numpy() for w in WEIGHTINGS}
    return np.asarray(ts), curves


def plot_weighting(jobs: list[dict], out: Path, metrics: list[str]) -> Path:
    """The paper's Fig. 2 (weights vs timestep), plus the metric of each weighting if the sweep varies it."""
    ts, curves = weighting_curves()
    wjobs = [j for j in jobs if "weighting" in j["params"]]
    by_w: dict[str, dict] = {}
    if len({j["params"]["weighting"] for j in wjobs}) > 1:
        for j in wjobs:
            by_w.setdefault(j["params"]["weighting"], j)
    ms = metrics if by_w else []
    plt = _plt()
    fig, axes = plt.subplots(1, 1 + len(ms), figsize=(4.6 + 3.4 * len(ms), 3.4), squeeze=False)
    ax = axes[0, 0]
    for w, c in curves.items():
        ax.plot(ts, c, label=w, lw=1.5 if w == "linear" else 1.0)
    ax.set_yscale("log")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("w(t) / λ   (s = √(1-ᾱ_t)/√ᾱ_t)")
    ax.set_title("RED-diff denoiser weighting", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    names = [w for w in curves if w in by_w]
    for c, m in enumerate(ms, start=1):
        ax = axes[0, c]
        vals = [metric_value(by_w[w], m) for w in names]
        for i, (v, e) in enumerate(vals):
            if v is not None:
                ax.errorbar([i], [v], yerr=[e or 0.0], fmt="o", ms=6, capsize=3, color=f"C{list(curves).index(names[i])}")
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(m + (" (lower is better)" if m in LOWER_IS_BETTER else ""))
        _tight_ylim(ax, [v for v, _ in vals], [e for _, e in vals])
        ax.set_title(f"{m} per weighting", fontsize=9)
    return _save(fig, out / "plot_weighting.png")


def plot_bars(jobs: list[dict], out: Path, metrics: list[str]) -> Optional[Path]:
    """Mean and 95% CI of each metric per job."""
    if not jobs or not metrics:
        return None
    var = varying_keys([j["params"] for j in jobs])
    names = [label(j["params"], var) for j in jobs]
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(3.6, 0.5 * len(jobs) + 1.5) * len(metrics) ** 0.8 + 1,
                                                        3.6), squeeze=False)
    for c, m in enumerate(metrics):
        ax = axes[0, c]
        vals = [metric_value(j, m) for j in jobs]
        for i, (v, e) in enumerate(vals):
            if v is not None:
                ax.errorbar([i], [v], yerr=[e or 0.0], fmt="o", ms=6, capsize=3, color=f"C{i % 10}")
        ax.set_xlim(-0.6, len(jobs) - 0.4)
        ax.grid(axis="y", alpha=0.3)
        ax.set_xticks(range(len(jobs)), names, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(m + (" (lower is better)" if m in LOWER_IS_BETTER else ""))
        _tight_ylim(ax, [v for v, _ in vals], [e for _, e in vals])
    return _save(fig, out / "plot_bars.png")


def _tight_ylim(ax, vals, errs) -> None:
    v = [x for x in vals if x is not None]
    if not v:
        return
    e = [x or 0.0 for x, y in zip(errs, vals) if y is not None]
    lo, hi = min(a - b for a, b in zip(v, e)), max(a + b for a, b in zip(v, e))
    pad = 0.1 * (hi - lo) if hi > lo else 0.1 * abs(hi) + 1e-6
    ax.set_ylim(lo - pad, hi + pad)


def plot_grid(jobs: list[dict], out: Path, rows: int = 4, max_cols: int = 16) -> Optional[Path]:
    """Ground truth, measurement and every job's restoration for the first ``rows`` images."""
    def titles(js):
        var = varying_keys([j["params"] for j in js])
        return [label(j["params"], var) for j in js]

    return _plot_grid(jobs, out, rows, max_cols, label_of=titles)


# ------------------------------------------------------------------------------------------ api
def make_plots(root: Path, kinds=("auto",), metrics: Optional[list[str]] = None, rows: int = 4) -> list[Path]:
    """Write the requested plots into ``root``; returns the paths written."""
    root = Path(root)
    jobs = load_jobs(root)
    if "auto" in kinds:
        kinds = auto_kinds(jobs)
    ms = available_metrics(jobs, metrics)
    written = []
    for kind in kinds:
        if kind == "heatmap":
            p = plot_heatmap(jobs, root, ms)
        elif kind == "steps":
            p = plot_steps(jobs, root, ms)
        elif kind == "weighting":
            p = plot_weighting(jobs, root, ms)
        elif kind == "bars":
            p = plot_bars(jobs, root, ms)
        elif kind == "grid":
            p = plot_grid(jobs, root, rows=rows)
        else:
            raise ValueError(f"unknown plot kind {kind!r}; valid: auto, {', '.join(KINDS)}")
        if p is not None:
            written.append(p)
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="sweep dir (or any folder holding job dirs)")
    ap.add_argument("--kind", action="append", choices=["auto", *KINDS],
                    help="plot kind (repeatable); default auto: chosen from what the sweep varies")
    ap.add_argument("--metric", action="append", help=f"metric(s) to plot (repeatable; default: all of "
                                                      f"{', '.join(METRIC_ORDER)} that have values)")
    ap.add_argument("--rows", type=int, default=4, help="images (rows) in plot_grid.png")
    a = ap.parse_args(argv)
    root = Path(a.dir)
    if not root.is_dir():
        raise SystemExit(f"error: {root} is not a directory")
    kinds = a.kind or ["auto"]
    if not load_jobs(root) and kinds != ["weighting"]:
        raise SystemExit(f"error: no finished job dirs (summary.json with status ok) under {root}")
    paths = make_plots(root, kinds, a.metric, a.rows)
    if not paths:
        raise SystemExit(f"error: nothing to plot for --kind {' '.join(kinds)} under {root}")
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
