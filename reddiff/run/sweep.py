"""Batched hyperparameter sweeps for RED-diff: K configurations of the same image(s) in one batch.

RED-diff's network call does not depend on the hyperparameters that an ablation varies (``lam``, ``lr``,
``weighting``, ``obs_weight``, ``sigma_x0``), so K configurations of ``n`` images can share one network call per
step on a batch of ``n * K`` items.  Built on :func:`reddiff.samplers.reddiff.expand_configs` (per-item
hyperparameters, image-major layout: item ``b * K + k`` is image ``b`` under configuration ``k``), :func:`tile` and
:func:`untile`.

    from reddiff.run.sweep import batched_sweep, grid
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

Command line: ``python -m reddiff.run.sweep +experiment=demo_lambda_lr_batched`` runs the grid in
``sweep_grid`` of that experiment (conf/experiment/demo_lambda_lr_batched.yaml) batched, and writes one job dir per
configuration, as ``python run.py -m`` would (metrics.csv, summary.json, grid.png), plus table.md/table.csv.
"""
from __future__ import annotations

import itertools
from typing import Mapping, Optional, Sequence

import torch

from reddiff.core.rng import BatchRNG
from reddiff.samplers.reddiff import PER_ITEM, REDDiff, expand_configs, tile, untile

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
                  max_batch: Optional[int] = None, callback=None, chunk_hook=None) -> torch.Tensor:
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
        chunk_hook: called as ``chunk_hook(start, n)`` before each chunk of items ``start .. start+n-1``
            (the job runner's divergence monitor).

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
            if chunk_hook is not None:
                chunk_hook(s, e - s)
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


# ------------------------------------------------------------------------------------- job-level runner (Hydra)
def _job_name(k: int, config: Mapping) -> str:
    return f"{k}_" + "_".join(f"{key}={val}" for key, val in config.items())


def run_batched(cfg, root) -> list[dict]:
    """Run the grid ``cfg.sweep_grid`` (``{key: [values]}`` over per-item keys) of the RED-diff sampler ``cfg.sampler``
    on ``cfg.data`` with one batched sweep per fixed batch of ``cfg.batch_size`` images (at most
    ``cfg.sweep_max_batch`` items per network call), through the job runner's batch loop
    (:func:`reddiff.run.batch_loop.run_batches`), and write one job dir per configuration under ``root`` -- each
    locked, bound to its configuration's fingerprint and resumable, as ``python run.py -m`` would -- then
    ``table.md``/``table.csv`` (and the experiment's plots).  Costs per image: ``nfe`` = the sampler's steps (each
    restoration takes part in that many network calls, on the batch of all configurations), ``seconds`` = batch
    wall time / (images x K).  Returns the K summaries.
    """
    import contextlib
    import copy
    import json
    import math
    import time
    from pathlib import Path

    from omegaconf import OmegaConf

    from reddiff.run import experiment as ex
    from reddiff.store.aggregate import summarize
    from reddiff.run.batch_loop import Sink, run_batches
    from reddiff.core.errors import UserError
    from reddiff.store.formatting import one_line
    from reddiff.store.images import write_job_grid
    from reddiff.store.jobdir import InputsLog, JobLock, bind, fingerprint
    from reddiff.store.results import ResultStore, atomic_write_text

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if cfg.get("sweep_grid") is None:
        raise UserError("reddiff.run.sweep needs sweep_grid: {lam: [...], lr: [...]} (see conf/experiment/"
                        "demo_lambda_lr_batched.yaml)")
    ex.check_scalars(cfg)
    try:
        configs = grid(**OmegaConf.to_container(cfg.sweep_grid, resolve=True))
    except ValueError as e:
        raise UserError(str(e)) from e
    K = len(configs)
    ident = ex.job_identity(cfg)
    operator = ex.build(cfg.task.operator, f"task={ident['task']}")
    sampler = ex.build(cfg.sampler, f"sampler={ident['sampler']}")
    if not isinstance(sampler, REDDiff):
        raise UserError(f"reddiff.run.sweep batches RED-diff configurations; sampler={ident['sampler']} is "
                        f"{type(sampler).__name__}")
    device = ex.resolve_device(cfg.device)
    prior = ex.build(cfg.prior, f"prior={ident['prior']}").to(device).eval()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    dataset = ex.prepare_data(cfg, prior, ident, resolved)
    suite = ex.build(cfg.metrics, "metrics")
    names = list(suite.names)
    weights, sha = ex.weights_record(prior)
    common = {"task": ident["task"], "sampler": ident["sampler"] or "reddiff", "prior": ident["prior"],
              "data": ident["data"], "experiment": ident["experiment"], "versions": ex.versions(),
              "git_commit": ex.git_commit(), "weights": weights}
    logger = ex.build(cfg.logger, "logger")
    logger.start(resolved, ident, root)
    sinks, bases = [], []
    with contextlib.ExitStack() as locks:
        for k, c in enumerate(configs):
            job_cfg = copy.deepcopy(resolved)
            job_cfg["sampler"].update(c)
            job_dir = root / _job_name(k, c)
            job_dir.mkdir(parents=True, exist_ok=True)
            locks.enter_context(JobLock(job_dir))
            fp = fingerprint(job_cfg, sha)
            bind(job_dir, fp, cfg.get("resume", True), cfg.get("archive", False))
            sinks.append(Sink(job_dir, ResultStore(job_dir, names), InputsLog(job_dir)))
            bases.append({**common, "fingerprint": {"merge_key": fp["merge_key"]}, "config": job_cfg,
                          "overrides": list(ident["overrides"]) + [f"sampler.{a}={b}" for a, b in c.items()]})
        max_batch = cfg.get("sweep_max_batch")

        def restore(y, indices, monitor, callback):
            xs = batched_sweep(configs, y, operator, prior, [int(cfg.seed) + i for i in indices], indices=indices,
                               base=sampler, max_batch=max_batch, callback=callback, chunk_hook=monitor.begin)
            chunks = 1 if max_batch is None else math.ceil(y.shape[0] * K / max(1, int(max_batch)))
            nfe = prior.nfe // chunks if prior.nfe % chunks == 0 else prior.nfe / chunks
            return [xs[:, k] for k in range(K)], nfe

        t_job = time.time()
        run_batches(dataset=dataset, operator=operator, prior=prior, suite=suite, sinks=sinks, restore=restore,
                    seed=int(cfg.seed), batch_size=int(cfg.batch_size), device=device, logger=logger,
                    save_images=bool(cfg.get("save_images", True)), progress=bool(cfg.get("progress", False)),
                    desc=f"{K} RED-diff configurations on {ident['task']}", prefix="[reddiff.run.sweep]")
        wall = time.time() - t_job
        from reddiff.report.stats import table_intervals  # the tables' photo-clustered intervals

        summaries = []
        for c, sink, base in zip(configs, sinks, bases):
            s = summarize(sink.store, suite, base, sink.inputs.as_dict(), wall)
            s["batched_sweep"] = {"K": K, "configs": configs, "this": c, "max_batch": max_batch,
                                  "note": "peak_rss_mb and wall_seconds_this_run are those of the whole batched sweep"}
            write_job_grid(sink.dir, sink.store.rows, dataset, s, int(cfg.get("grid_images", 6)))
            atomic_write_text(sink.dir / "summary.json", json.dumps(s, indent=2, default=str))
            print("[reddiff.run.sweep] " + _job_name(0, c)[2:] + ": " + one_line(s, table_intervals(str(sink.dir), list(s["metrics"]))))
            summaries.append(s)
    logger.finish(summaries[0] if K == 1 else {}, root)
    from reddiff.report.tables import write_tables

    md = write_tables(root, "python -m reddiff.run.sweep " + " ".join(ident["overrides"]))
    print(f"\n[reddiff.run.sweep] table ({root}/table.md):\n{md}")
    if cfg.get("experiment_name"):
        try:
            from reddiff.report.plots import make_plots

            for p in make_plots(root):
                print(f"[reddiff.run.sweep] plot: {p}")
        except Exception as e:  # noqa: BLE001 - plotting never fails the sweep
            print(f"[reddiff.run.sweep] plots not written: {e}; run: python -m reddiff.report.plots {root}")
    print(f"[reddiff.run.sweep] results: {root}")
    return summaries


def main() -> None:
    import sys
    from pathlib import Path

    import hydra
    from hydra.core.hydra_config import HydraConfig

    from reddiff.core.errors import UserError

    from reddiff.run.entry import config_dir, preflight

    preflight(sys.argv[1:])

    @hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
    def _main(cfg) -> None:
        try:
            run_batched(cfg, Path(HydraConfig.get().runtime.output_dir))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except OSError as e:
            print(f"error: cannot write: {e}", file=sys.stderr)
            sys.exit(2)

    _main()


if __name__ == "__main__":
    main()
