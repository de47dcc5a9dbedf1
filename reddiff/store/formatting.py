"""Human-readable forms of a job's metrics: ``mean ± ci`` cells (tables) and the one-line job summary."""
from __future__ import annotations


def fmt_metric(m: dict, digits: int = 3) -> str:
    if m.get("diverged"):
        return "diverged"
    if "missing" in m:
        return "missing"
    if m.get("mean") is None:
        return "-"
    ci = m.get("ci95")
    return f"{m['mean']:.{digits}f}" + (f" ± {ci:.{digits}f}" if ci is not None else "")


def one_line(summary: dict) -> str:
    parts = [f"{summary['sampler']} on {summary['task']}: {summary['n_images']} images"]
    for name, m in summary["metrics"].items():
        parts.append(f"{name} {fmt_metric(m, 2)}")
    c = summary["cost"]
    if c.get("seconds_per_image") is not None:
        parts.append(f"{c['nfe_per_image']:.0f} NFE, {c['seconds_per_image']:.2f} s/img")
    if summary.get("diverged"):
        parts.append(f"{summary['diverged']} diverged")
    if summary.get("skipped"):
        parts.append(f"{summary['skipped']} skipped")
    if sum((summary.get("converted") or {}).values()):
        parts.append("converted inputs: " + ", ".join(f"{n} {k}" for k, n in summary["converted"].items() if n))
    return " | ".join(parts)
