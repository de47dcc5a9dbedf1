"""From per-image rows to a job's numbers: means with 95% CIs, set-level metrics over the stacked per-image
features (so resumed and sharded jobs are aggregated over all their images, never averaged), and the
``summary.json`` body."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from reddiff.store.provenance import peak_rss_mb


def mean_ci95(values) -> dict:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    ci = float(1.96 * v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else None
    return {"mean": float(v.mean()), "ci95": ci, "n": int(v.size)}


def to_float(s: str):
    try:
        return float(s) if s not in ("", None) else None
    except ValueError:
        return None


def aggregate_rows(rows: list[dict], per_image_names: list[str]) -> dict:
    ok = [r for r in rows if r.get("diverged") != "true"]
    return {name: mean_ci95(to_float(r.get(name)) for r in ok) for name in per_image_names}


def compute_metrics(rows: list[dict], suite, feats: dict) -> dict:
    """Per-image means with 95% CIs from the CSV rows, set-level metrics from the stacked features,
    and ``{"missing": reason}`` for metrics whose weights are absent."""
    agg = aggregate_rows(rows, list(suite.names))
    labels = feats.pop("label", None)
    set_level = suite.set_level(feats, labels) if feats or labels is not None else {}
    metrics: dict[str, Any] = {}
    for name in suite.names:
        if name in suite.missing:
            metrics[name] = {"missing": suite.missing[name]}
        elif name in set_level:
            metrics[name] = set_level[name]
        elif agg[name]["n"]:
            metrics[name] = {k: agg[name][k] for k in ("mean", "ci95")}
        else:
            n_div = sum(r.get("diverged") == "true" for r in rows)
            metrics[name] = {"missing": f"no finite value: {n_div} of {len(rows)} images diverged", "diverged": True}
    return metrics


def summarize(store, suite, base_summary: dict, inputs: dict, wall: float) -> dict:
    """The ``summary.json`` of one job dir from its store (every row so far, this run's and earlier runs')."""
    rows = store.rows
    metrics = compute_metrics(rows, suite, store.load_features(
        [r["image_id"] for r in rows if r.get("diverged") != "true"]))
    nfe = [to_float(r["nfe"]) for r in rows]
    sec = [to_float(r["seconds"]) for r in rows]
    divs = [{"image_id": r["image_id"], "step": r.get("diverged_step")} for r in rows if r.get("diverged") == "true"]
    skipped = inputs.get("skipped", [])
    return {
        **{k: base_summary[k] for k in ("task", "sampler", "prior", "data")},
        "n_images": len(rows),
        "status": "ok",
        "metrics": metrics,
        "cost": {"nfe_per_image": float(np.mean(nfe)) if nfe else None,
                 "seconds_per_image": float(np.mean(sec)) if sec else None,
                 "peak_rss_mb": round(peak_rss_mb(), 1), "wall_seconds_this_run": round(wall, 2)},
        "diverged": len(divs), "divergences": divs,
        "skipped": len(skipped), "skipped_images": skipped,
        "converted": inputs.get("converted_counts", {}), "converted_images": inputs.get("converted", {}),
        **{k: base_summary[k] for k in ("experiment", "overrides", "config", "versions", "git_commit")},
        **{k: base_summary[k] for k in ("weights", "fingerprint") if k in base_summary},
    }
