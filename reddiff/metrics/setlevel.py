"""Set-level metrics from stored per-image features: KID, FID (clean-fid) and top-1/top-5 accuracy.

KID
---
The value is clean-fid's own ``kernel_distance(feats, feats_ref, num_subsets, max_subset_size)`` (the
official RED-diff evaluation: legacy_pytorch Inception features of the restorations against those of the
reference images of the same subset), reported x10^3.  clean-fid draws its subsets with the global NumPy
RNG; we seed it (``seed``) and restore its state afterwards.  When both sets have at most
``max_subset_size`` images every "subset" is a permutation of the whole set and the estimator is
permutation invariant, so one draw gives the same number as a hundred (to float rounding) and we call
``kernel_distance`` with ``num_subsets=1``.

The 95% interval is 1.96 x the delete-one-pair jackknife standard error of the same estimator (the
restoration and its reference are dropped together), computed from the polynomial-kernel matrices that
clean-fid uses, k(x, y) = (x.y/d + 1)^3.  Subset standard deviations are useless here: with 1k images and
subsets of 1k every subset gives the same value.

Bias of the official estimator on paired sets.  clean-fid's estimator is the unbiased MMD^2 for two
*independent* samples; it includes the i = j cross terms k(x_i, y_i).  For a set against itself it equals
-(2/n)(mean k(x_i, x_i) - mean_{i != j} k(x_i, x_j)) < 0, not 0, and restorations close to their references
are pulled down the same way.  We therefore also report ``paired_unbiased``: the U-statistic that leaves out
the i = j cross pairs, unbiased for MMD^2 when each restoration is paired with its own reference and exactly 0
for a set against itself, with its own jackknife interval.  Tables compare ``mean`` (the official number).

FID
---
``cleanfid.fid.frechet_distance`` of the restorations' Inception statistics against either the reference
features of the same subset (``reference="subset"``) or an ``.npz`` with ``mu``/``sigma`` computed in the
same legacy_pytorch feature space (e.g. ImageNet-train statistics).  No interval (``ci95`` is null).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

Z95 = 1.959963984540054
JACKKNIFE_MAX_N = 5000  # three n x n float64 kernel matrices; above this the interval is not computed


def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def kid_jackknife(feats: np.ndarray, feats_ref: np.ndarray) -> dict:
    """Full-set KID estimators and delete-one-pair jackknife standard errors (paired sets of equal size)."""
    x = np.asarray(feats, dtype=np.float64)
    y = np.asarray(feats_ref, dtype=np.float64)
    n = x.shape[0]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    dxx, dyy, dxy = np.diag(kxx), np.diag(kyy), np.diag(kxy)
    rxx, ryy = kxx.sum(1) - dxx, kyy.sum(1) - dyy  # off-diagonal row sums
    sxx, syy, sxy = rxx.sum(), ryy.sum(), kxy.sum()
    row_xy, col_xy = kxy.sum(1), kxy.sum(0)
    # clean-fid's estimator on the whole set, and with pair i left out
    full = (sxx + syy) / (n * (n - 1)) - 2.0 * sxy / n ** 2
    m = n - 1
    loo = ((sxx - 2 * rxx) + (syy - 2 * ryy)) / (m * (m - 1)) - 2.0 * (sxy - row_xy - col_xy + dxy) / m ** 2
    # paired U-statistic (no i = j cross terms)
    cross_off = sxy - dxy.sum()
    paired = (sxx + syy - 2.0 * cross_off) / (n * (n - 1))
    cross_off_loo = cross_off - (row_xy - dxy) - (col_xy - dxy)
    paired_loo = ((sxx - 2 * rxx) + (syy - 2 * ryy) - 2.0 * cross_off_loo) / (m * (m - 1))

    def se(v):
        return float(math.sqrt(max((n - 1) / n * np.sum((v - v.mean()) ** 2), 0.0)))

    return {"full": float(full), "se": se(loo), "paired": float(paired), "paired_se": se(paired_loo),
            "loo": loo, "paired_loo": paired_loo}


def clean_fid_kid(feats: np.ndarray, feats_ref: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
                  seed: int = 0) -> float:
    """clean-fid's ``kernel_distance`` with the global NumPy RNG seeded (and restored afterwards)."""
    from cleanfid.fid import kernel_distance

    f1 = np.asarray(feats, dtype=np.float64)
    f2 = np.asarray(feats_ref, dtype=np.float64)
    if max(f1.shape[0], f2.shape[0]) <= max_subset_size:
        num_subsets = 1  # every subset is the whole set: identical draws (see module doc)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return float(kernel_distance(f1, f2, num_subsets=num_subsets, max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)


def kid(feats: np.ndarray, feats_ref: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
        seed: int = 0) -> dict:
    """KID x10^3 as ``{"mean", "ci95", "n", "paired_unbiased", "paired_unbiased_ci95"}`` or ``{"missing"}``."""
    n, n_ref = len(feats), len(feats_ref)
    if min(n, n_ref) < 2:
        return {"missing": f"KID needs at least 2 images (got {n} restorations, {n_ref} references)"}
    value = clean_fid_kid(feats, feats_ref, num_subsets, max_subset_size, seed)
    out = {"mean": 1e3 * value, "ci95": None, "n": int(n)}
    if n == n_ref and 3 <= n <= JACKKNIFE_MAX_N:
        jk = kid_jackknife(feats, feats_ref)
        out["ci95"] = 1e3 * Z95 * jk["se"]
        out["paired_unbiased"] = 1e3 * jk["paired"]
        out["paired_unbiased_ci95"] = 1e3 * Z95 * jk["paired_se"]
    return out


def fid(feats: np.ndarray, feats_ref: Optional[np.ndarray] = None, ref_stats: Optional[dict] = None) -> dict:
    from cleanfid.fid import frechet_distance

    x = np.asarray(feats, dtype=np.float64)
    if len(x) < 2:
        return {"missing": f"FID needs at least 2 images (got {len(x)})"}
    mu, sigma = np.mean(x, axis=0), np.cov(x, rowvar=False)
    if ref_stats is not None:
        mu2, sigma2 = np.asarray(ref_stats["mu"], np.float64), np.asarray(ref_stats["sigma"], np.float64)
    else:
        y = np.asarray(feats_ref, dtype=np.float64)
        if len(y) < 2:
            return {"missing": f"FID needs at least 2 reference images (got {len(y)})"}
        mu2, sigma2 = np.mean(y, axis=0), np.cov(y, rowvar=False)
    if mu.shape != mu2.shape:
        return {"missing": f"FID reference has dimension {mu2.shape}, features have {mu.shape}"}
    return {"mean": float(frechet_distance(mu, sigma, mu2, sigma2)), "ci95": None, "n": int(len(x))}


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> dict:
    """Top-k accuracy in percent with a normal-approximation 95% interval (binomial)."""
    logits = np.asarray(logits)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    n = len(labels)
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    p = float(np.mean(np.any(top == labels[:, None], axis=1)))
    return {"mean": 100.0 * p, "ci95": 100.0 * Z95 * math.sqrt(p * (1 - p) / n), "n": int(n)}
