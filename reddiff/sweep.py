"""Batched hyperparameter sweeps for RED-diff: K configurations of the same image(s) in one batch.

RED-diff's network call does not depend on the hyperparameters that an ablation varies (``lam``, ``lr``,
``weighting``, ``obs_weight``, ``sigma_x0``), so K configurations of ``n`` images can share one network call per
step on a batch of ``n * K`` items.  Built on :func:`reddiff.samplers.reddiff.expand_configs` (per-item
hyperparameters, image-major layout: item ``b * K + k`` is image ``b`` under configuration ``k``), :func:`tile` and
:func:`untile`.

    from reddiff.sweep import batched_sweep, grid
    configs = grid(lam=[0.05, 0.25, 1.0], lr=[0.25, 0.5])             # K = 6
    x = batched_sweep(configs, y, op, prior, seeds=[seed + i for i in idx], indices=idx, base=REDDiff(steps=100))
    x.shape  # (n_images, K, C, H, W)

**Equal to separate runs.**  Each item draws its noise from its own generator seeded with the image's seed (the
seed the job runner uses: ``seed + index``), so item ``(b, k)`` is the run of configuration ``k`` on image ``b``
alone (:func:`separate_runs`).  With a batch-invariant network this is exact; a convolution may round differently
at another batch size (oneDNN picks kernels per shape), which moves results by float32 rounding only.

**Cost.**  One network call per step for all K (``steps`` NFE instead of ``K * steps``).  The saving in wall time
is large where a batch of ``n * K`` costs little more than a batch of ``n`` (GPUs at small batch), small on a CPU,
where a convolution's cost grows about linearly with the batch (see ``python -m benchmarks.speed``, "sweep").
``max_batch`` splits very large grids into chunks (results unchanged).

Command line: ``python -m reddiff.sweep +experiment=demo_lambda_lr_batched`` runs the grid in
``sweep_grid`` of that experiment (conf/experiment/demo_lambda_lr_batched.yaml) batched, and writes one job dir per
configuration, as ``python run.py -m`` would (metrics.csv, summary.json, grid.png), plus table.md/table.csv.
"""
from __future__ import annotations

import itertools
from typing import Mapping, Optional, Sequence

import torch

from .rng import BatchRNG
from .samplers.reddiff import PER_ITEM, REDDiff, expand_configs, tile, untile

#: REDDiff settings that every item of one batch shares
SHARED = ("steps", "ordering", "order_seed", "returns", "sigma_aware", "betas", "adam_eps", "log_every")


def grid(**axes: Sequence) -> list[dict]:
    """Cartesian product of per-item hyperparameter values, e.g. ``grid(lam=[0.1, 1], lr=[0.25, 0.5])`` gives 4
    configurations, the last axis varying fastest."""
    bad = sorted(set(axes) - set(PER_ITEM))
    if bad:
        raise ValueError(f"grid: {bad} cannot vary within one batch (per-item keys: {PER_ITEM})")
    if not axes:
        raise ValueError("grid: no axes")
    names = list(axes)
    values = [list(axes[k]) if isinstance(axes[k], (list, tuple)) else [axes[k]] for k in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def shared_kwargs(base: "REDDiff | Mapping | None") -> dict:
    """The shared (non per-item) REDDiff settings of ``base`` (a sampler or a dict of constructor kwargs)."""
    if base is None:
        return {}
    if isinstance(base, REDDiff):
        return {k: getattr(base, k) for k in SHARED}
    bad = sorted(set(base) - set(SHARED) - set(PER_ITEM) - {"_target_"})
    if bad:
        raise ValueError(f"unknown REDDiff settings {bad}")
    return {k: base[k] for k in SHARED if k in base}


def _indices(indices, n: int) -> list[int]:
    idx = list(range(n)) if indices is None else [int(i) for i in indices]
    if len(idx) != n:
        raise ValueError(f"{len(idx)} indices for {n} measurements")
    return idx


def batched_sweep(configs: Sequence[Mapping], y: torch.Tensor, operator, prior, seeds: Sequence[int],
                  indices: Optional[Sequence[int]] = None, base: "REDDiff | Mapping | None" = None,
                  max_batch: Optional[int] = None, callback=None) -> torch.Tensor:
    """Run the K ``configs`` on the ``n`` measurements ``y`` with one network call per step per chunk.

    Args:
        configs: K dicts over :data:`~reddiff.samplers.reddiff.PER_ITEM` keys; missing keys come from ``base``.
        y: ``(n, *y_shape)`` measurements.
        operator: the task operator; it is set up here for the tiled batch (``indices`` repeated K times) and set
            back up for ``indices`` afterwards.
        prior: the prior (``prior.shape`` is the shape of one sample).
        seeds: one sampler seed per image (the job runner uses ``seed + index``).
        indices: the images' dataset indices (per-image operator state); default ``0..n-1``.
        base: a :class:`REDDiff` or dict giving the shared settings (steps, ordering, ...) and per-item defaults.
        max_batch: at most this many items per network call (default: all ``n * K`` at once).
        callback: passed to each chunk's ``sample`` (the batch it sees is the chunk).

    Returns ``(n, K, *prior.shape)``.
    """
    K = len(configs)
    n = y.shape[0]
    idx = _indices(indices, n)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} measurements")
    kw = expand_configs(configs, n, base)                  # per-item lists of length n * K, image-major
    shared = shared_kwargs(base)
    items = n * K
    chunk = items if max_batch is None else max(1, int(max_batch))
    y_all, idx_all, seeds_all = tile(y, K), tile(idx, K), tile([int(s) for s in seeds], K)
    outs = []
    try:
        for s in range(0, items, chunk):
            e = min(items, s + chunk)
            sampler = REDDiff(**shared, **{k: v[s:e] for k, v in kw.items()})
            yc = y_all[s:e]
            operator.setup(idx_all[s:e], (e - s,) + tuple(prior.shape), yc.device, yc.dtype)
            outs.append(sampler.sample(yc, operator, prior, BatchRNG(seeds_all[s:e], device=yc.device),
                                       callback=callback))
    finally:
        operator.setup(idx, (n,) + tuple(prior.shape), y.device, y.dtype)
    return untile(torch.cat(outs), K)


def separate_runs(configs: Sequence[Mapping], y: torch.Tensor, operator, prior, seeds: Sequence[int],
                  indices: Optional[Sequence[int]] = None, base: "REDDiff | Mapping | None" = None) -> torch.Tensor:
    """The reference for :func:`batched_sweep`: one ordinary RED-diff run per configuration (K network calls per
    step in all).  Returns ``(n, K, *prior.shape)``."""
    n = y.shape[0]
    idx = _indices(indices, n)
    shared = shared_kwargs(base)
    outs = []
    for c in configs:
        per = {k: v[0] for k, v in expand_configs([c], 1, base).items()}  # scalars: an ordinary sampler
        operator.setup(idx, (n,) + tuple(prior.shape), y.device, y.dtype)
        rng = BatchRNG([int(s) for s in seeds], device=y.device)
        outs.append(REDDiff(**shared, **per).sample(y, operator, prior, rng))
    return torch.stack(outs, dim=1)
