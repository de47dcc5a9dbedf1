"""Human-readable forms of a job's metrics: ``mean ± ci`` cells (tables) and the one-line job summary."""
from __future__ import annotations

from pathlib import Path


def fmt_metric(m: dict, digits: int = 3) -> str:
    if m.get("diverged"):
        return "diverged"
    if "missing" in m:
        return "missing"
    if m.get("mean") is None:
        return "-"
    ci = m.get("ci95")
    return f"{m['mean']:.{digits}f}" + (f" ± {ci:.{digits}f}" if ci is not None else "")


def one_line(summary: dict, intervals: dict | None = None) -> str:
    """The job's one-line summary.  ``intervals`` ({metric: {"mean", "half", "method"}}, the tables' photo-clustered
    intervals, reddiff.report.stats) replaces a metric's naive ``ci95`` and the line names the rule; without it
    the line shows ``summary.json``'s naive interval and says so."""
    intervals = {m: iv for m, iv in (intervals or {}).items() if iv.get("half") is not None}
    parts = [f"{summary['sampler']} on {summary['task']}: {summary['n_images']} images"]
    naive = False
    for name, m in summary["metrics"].items():
        iv = intervals.get(name)
        if iv is not None and not m.get("diverged") and "missing" not in m:
            parts.append(f"{name} {iv['mean']:.2f} ± {iv['half']:.2f}")
        else:
            parts.append(f"{name} {fmt_metric(m, 2)}")
            naive = naive or m.get("ci95") is not None
    c = summary["cost"]
    if c.get("seconds_per_image") is not None:
        parts.append(f"{c['nfe_per_image']:.0f} NFE, {c['seconds_per_image']:.2f} s/img")
    if summary.get("diverged"):
        parts.append(f"{summary['diverged']} diverged")
    if summary.get("skipped"):
        parts.append(f"{summary['skipped']} skipped")
    if sum((summary.get("converted") or {}).values()):
        parts.append("converted inputs: " + ", ".join(f"{n} {k}" for k, n in summary["converted"].items() if n))
    odd = sorted(Path(f).name for f, w in (summary.get("weights") or {}).items() if w.get("state") == "unregistered")
    if odd:  # a file whose content matches no pinned sha256 (reddiff.core.weights.identify)
        parts.append("weights matching no pinned sha256: " + ", ".join(odd))
    methods = sorted({iv["method"] for iv in intervals.values()})
    notes = [f"±: {m}" for m in methods] + (["other ±: naive 1.96 sd/sqrt(n)"] if naive and methods else
                                             ["±: naive 1.96 sd/sqrt(n)"] if naive else [])
    return " | ".join(parts) + (f" ({'; '.join(notes)})" if notes else "")
