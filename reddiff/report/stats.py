"""Intervals that respect how the images were drawn, and paired comparisons between samplers.

The 12 demo images are 3 photos x 4 crops: crops of one photo are not independent draws, so the naive interval
(``1.96 * sd / sqrt(12)``, :func:`reddiff.store.aggregate.mean_ci95`) overstates precision.  Here the unit of replication
is the source photo (:func:`cluster_of`): the default interval (``cluster_t``) is a Student-t interval over the
per-photo means, ``mean(m_g) +- t_{G-1, 0.975} * sd(m_g) / sqrt(G)`` with ``G`` photos.  With 3 photos that has
2 degrees of freedom (t = 4.30): wide, and honest about how little 3 photos say.  ``cluster_bootstrap``
(percentile bootstrap over photos) is offered for sets with many sources; with 3 photos it has only 10 distinct
resamples and under-covers, which is why it is not the default.  A data set whose images are independent draws
(each image its own cluster) gets the ordinary t-interval.

Comparisons are paired: :func:`paired` takes the per-image differences of two samplers on the same images
(same seeds, same masks) and gives the clustered interval of their mean.  :func:`verdict` reads an interval:
"holds" when it excludes zero in the claimed direction, "does not hold" when it excludes zero the other way,
"inconclusive" otherwise.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np

LEVEL = 0.95


def _photo_prefixes() -> tuple[tuple[str, ...], frozenset]:
    from reddiff.data.make_demo import DEMO_IDS, HELD_OUT
    from reddiff.data.tune import PHOTO, TUNE_IDS

    return tuple(HELD_OUT) + (PHOTO,), frozenset(DEMO_IDS) | frozenset(TUNE_IDS)


def cluster_of(image_id: str) -> str:
    """The source photo of a demo / tune image id (``astronaut_crop2`` -> ``astronaut``), else the id itself."""
    photos, known = _photo_prefixes()
    if image_id in known:
        for p in photos:
            if image_id.startswith(p + "_"):
                return p
    return image_id


def t_quantile(df: int, level: float = LEVEL) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def describe_method(n: int, n_clusters: int, method: str = "cluster_t") -> str:
    if n_clusters == n:
        return f"95% t-interval over {n} independent images ({n - 1} df)"
    if method == "cluster_bootstrap":
        return f"95% percentile bootstrap over {n_clusters} source photos ({n} images)"
    return (f"95% t-interval over the {n_clusters} per-photo means ({n} images = {n_clusters} photos x crops, "
            f"{n_clusters - 1} df)")


def interval(values: Mapping[str, float], method: str = "cluster_t", level: float = LEVEL,
             n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean and interval of per-image ``values`` ({image_id: value}; non-finite values are dropped).

    Returns ``{"mean", "lo", "hi", "half", "n", "n_clusters", "method"}`` (``lo``/``hi``/``half`` None when
    fewer than 2 clusters).  The mean is the mean of the per-photo means (equal to the image mean for the demo
    set, 4 crops per photo)."""
    vals = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
    groups: dict[str, list[float]] = {}
    for k, v in vals.items():
        groups.setdefault(cluster_of(k), []).append(v)
    n, G = len(vals), len(groups)
    out = {"mean": None, "lo": None, "hi": None, "half": None, "n": n, "n_clusters": G,
           "method": describe_method(n, G, method) if n else "no values"}
    if not n:
        return out
    m = np.array([np.mean(g) for g in groups.values()])
    out["mean"] = float(m.mean())
    if G < 2:
        return out
    if method == "cluster_t":
        half = t_quantile(G - 1, level) * float(m.std(ddof=1)) / math.sqrt(G)
        out.update(lo=out["mean"] - half, hi=out["mean"] + half, half=half)
    elif method == "cluster_bootstrap":
        rng = np.random.default_rng(seed)
        boots = m[rng.integers(0, G, size=(n_boot, G))].mean(axis=1)
        lo, hi = np.quantile(boots, [0.5 - level / 2, 0.5 + level / 2])
        out.update(lo=float(lo), hi=float(hi), half=float(hi - lo) / 2)
    else:
        raise ValueError(f"unknown interval method {method!r} (cluster_t | cluster_bootstrap)")
    return out


def naive_interval(values: Iterable[float]) -> dict:
    """The interval the job summaries report: ``mean +- 1.96 sd / sqrt(n)``, every image independent."""
    v = np.array([float(x) for x in values if x is not None and math.isfinite(float(x))])
    if v.size < 2:
        return {"mean": float(v.mean()) if v.size else None, "half": None}
    half = 1.96 * float(v.std(ddof=1)) / math.sqrt(v.size)
    return {"mean": float(v.mean()), "lo": float(v.mean()) - half, "hi": float(v.mean()) + half, "half": half}


def paired(a: Mapping[str, float], b: Mapping[str, float], method: str = "cluster_t") -> dict:
    """Interval of the mean per-image difference ``a - b`` over the images both have (same ids)."""
    common = sorted(set(a) & set(b))
    d = {k: float(a[k]) - float(b[k]) for k in common}
    out = interval(d, method)
    out["images"] = len(common)
    return out


def verdict(iv: dict, higher_is_better: bool = True) -> str:
    """``holds`` / ``does not hold`` / ``inconclusive`` for the claim "difference > 0" (or < 0 when lower is
    better), read from a paired interval."""
    lo, hi = iv.get("lo"), iv.get("hi")
    if lo is None or hi is None:
        return "inconclusive"
    if not higher_is_better:
        lo, hi = -hi, -lo
    if lo > 0:
        return "holds"
    if hi < 0:
        return "does not hold"
    return "inconclusive"


def read_metric(job_dir: Path, metric: str) -> dict[str, float]:
    """``{image_id: value}`` of one metric from a job's ``metrics.csv`` (diverged and empty cells left out)."""
    p = Path(job_dir) / "metrics.csv"
    out: dict[str, float] = {}
    if not p.is_file():
        return out
    with p.open(newline="") as f:
        for r in csv.DictReader(f):
            if r.get("diverged") == "true" or r.get(metric) in (None, ""):
                continue
            try:
                out[r["image_id"]] = float(r[metric])
            except ValueError:
                continue
    return out


def fmt_interval(iv: dict, digits: int = 2, signed: bool = False) -> str:
    if iv.get("mean") is None:
        return "-"
    sign = "+" if signed else ""
    s = f"{iv['mean']:{sign}.{digits}f}"
    if iv.get("lo") is not None:
        s += f" [{iv['lo']:{sign}.{digits}f}, {iv['hi']:{sign}.{digits}f}]"
    return s


def interval_cell(iv: dict, digits: int = 2) -> str:
    """``mean ± half`` as in the tables (symmetric intervals), else ``mean [lo, hi]``."""
    if iv.get("mean") is None:
        return "-"
    if iv.get("half") is None:
        return f"{iv['mean']:.{digits}f}"
    return f"{iv['mean']:.{digits}f} ± {iv['half']:.{digits}f}"


def table_intervals(job_dir: Optional[str], metrics: list[str]) -> dict[str, dict]:
    """Clustered intervals of a job's per-image metrics, recomputed from its metrics.csv ({} without one)."""
    if not job_dir or "," in str(job_dir):
        return {}
    out = {}
    for m in metrics:
        vals = read_metric(Path(job_dir), m)
        if vals:
            out[m] = interval(vals)
    return out
