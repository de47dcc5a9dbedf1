"""The job runner behind ``run.py``: one job = one (task, sampler, prior, data) combination in one folder.

Outputs in the job dir (README, "What a job writes"): ``metrics.csv`` (one row per image), ``summary.json``,
``grid.png``, restored PNGs under ``images/``, per-image features under ``features/`` (for set-level metrics
merged across shards or resumed runs), ``fingerprint.json`` and ``inputs.json`` (:mod:`reddiff.store.jobdir`).

Order of work: lock the folder, build everything (bad input fails here, before any sampling), bind the folder
to the configuration's fingerprint, then run the fixed batches (:mod:`reddiff.run.batch_loop`).  Every user-facing
failure is a :class:`~reddiff.core.errors.UserError` (one line, exit code 2); rows already written are kept.
The pieces live in their own modules and are re-exported here for callers of the old single module.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from reddiff.store.aggregate import aggregate_rows, compute_metrics, mean_ci95, summarize  # noqa: F401 - re-exported
from reddiff.run.batch_loop import MEASUREMENT_SEED_OFFSET, DivergenceMonitor, Sink, run_batches  # noqa: F401
from reddiff.core.errors import ResolutionMismatchError, UserError
from reddiff.store.formatting import fmt_metric, one_line  # noqa: F401 - re-exported
from reddiff.store.images import save_png, to_uint8, write_grid, write_job_grid  # noqa: F401 - re-exported
from reddiff.store.jobdir import InputsLog, JobLock, bind, fingerprint
from reddiff.operators.base import OperatorCapabilityError, ThroughDecoder
from reddiff.store.provenance import git_commit, hydra_info, job_identity, peak_rss_mb, versions  # noqa: F401
from reddiff.store.results import ResultStore, atomic_write_text
from reddiff.core.rng import BatchRNG

log = logging.getLogger("reddiff")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def unwrap_instantiation_error(e: BaseException) -> BaseException:
    """Hydra wraps constructor errors; surface the user's error."""
    while getattr(e, "__cause__", None) is not None and type(e).__name__ == "InstantiationException":
        e = e.__cause__
    return e


def build(node, what: str, **kwargs):
    """``instantiate(node)``, with the user's own errors turned into one-line :class:`UserError`s."""
    try:
        return instantiate(node, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the user's message
        inner = unwrap_instantiation_error(e)
        if isinstance(inner, UserError):
            raise UserError(f"{what}: {inner}") from inner
        if isinstance(inner, (ValueError, FileNotFoundError, RuntimeError, KeyError, TypeError)):
            raise UserError(f"{what}: {inner}".splitlines()[0]) from inner
        raise


#: the largest ``seed``: per-image streams use ``seed + index (+ MEASUREMENT_SEED_OFFSET)``, which must stay
#: inside the 64-bit range torch's generators take
SEED_MAX = 2 ** 62


def check_scalars(cfg: DictConfig) -> None:
    """Refuse, before anything is built, scalars the run cannot use: batch size, seed range, noise level."""
    bs = cfg.get("batch_size")
    if not isinstance(bs, int) or isinstance(bs, bool) or bs <= 0:
        raise UserError(f"batch_size must be a positive integer, got {bs!r}")
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise UserError(f"seed must be an integer in [0, 2**62], got {seed!r}")
    task = cfg.get("task")
    sig = task.get("sigma_y") if isinstance(task, DictConfig) else None
    if sig is not None:
        ok = isinstance(sig, (int, float)) and not isinstance(sig, bool) and math.isfinite(sig) and 0 <= sig <= 1
        if not ok:
            raise UserError(f"task.sigma_y must be a finite number in [0, 1] (pixel units, README), got {sig!r}")


def wandb_group(cfg: DictConfig) -> str | None:
    """The W&B group: the experiment preset's name, else (an ad-hoc sweep) the sweep folder's name."""
    if cfg.get("experiment_name"):
        return str(cfg.experiment_name)
    sweep = hydra_info().get("sweep_dir")
    return Path(sweep).name if sweep else None


def prepare_data(cfg: DictConfig, prior, ident: dict, resolved: dict):
    """The data set, at the prior's resolution unless ``data.resolution`` is set; refuses an empty selection."""
    prior_res = int(tuple(getattr(prior, "pixel_shape", prior.shape))[-1])
    kw = {} if cfg.data.get("resolution") is not None else {"resolution": prior_res}
    dataset = build(cfg.data, f"data={ident['data']}", **kw)
    if int(dataset.resolution) != prior_res:
        raise ResolutionMismatchError(
            f"prior {ident['prior']} works at {prior_res}x{prior_res} but data {ident['data']} is "
            f"{dataset.resolution}x{dataset.resolution}; set data.resolution={prior_res} (or leave it unset) "
            "or pick a prior of that size")
    resolved["data"]["resolution"] = int(dataset.resolution)
    if not dataset.entries():
        n_all = len(dataset._full()) if hasattr(dataset, "_full") else "?"
        raise UserError(f"data={ident['data']}: the selection is empty (start={cfg.data.get('start')}, "
                        f"count={cfg.data.get('count')}, shard={cfg.data.get('shard')}/{cfg.data.get('num_shards')} "
                        f"of {n_all} images); choose data.start/data.count inside the set")
    return dataset


def weights_record(prior) -> tuple[dict, str | None]:
    from reddiff.core import weights as W

    path = getattr(prior, "path", None)
    files = dict(W.LOADED)
    if path is None:  # a model folder (latent priors) states one digest of its files
        return files, getattr(prior, "weights_sha256", None)
    return files, W.sha256sum(Path(path))


def run(cfg: DictConfig, job_dir: Path) -> dict:
    """Run one job; returns the summary dict (also written to ``job_dir/summary.json``)."""
    job_dir = Path(job_dir)
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        with JobLock(job_dir):
            return _run(cfg, job_dir)
    except UserError:
        raise
    except OSError as e:
        n = max(0, len((job_dir / "metrics.csv").read_text().splitlines()) - 1) \
            if (job_dir / "metrics.csv").is_file() else 0
        raise UserError(f"cannot write in {job_dir}: {e.strerror or e} ({e.filename or 'write'}); the {n} row(s) "
                        "already in metrics.csv are kept: fix it and rerun the same command to resume") from e


def foreign_keys(cfg: DictConfig) -> list[str]:
    """Keys of ``cfg.sampler`` its class does not take (``++sampler.K`` forced onto a sampler without K)."""
    import inspect

    from reddiff.registry import import_target

    target = cfg.sampler.get("_target_")
    try:
        params = inspect.signature(import_target(str(target)).__init__).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return sorted(str(k) for k in cfg.sampler if not str(k).startswith("_") and k not in params)


def not_applicable(job_dir: Path, base: dict, resolved: dict, cfg: DictConfig, reason: str) -> dict:
    """The job's ``summary.json`` with status n/a and one line saying why (a sweep goes on)."""
    bind(job_dir, fingerprint(resolved), cfg.get("resume", True), cfg.get("archive", False))
    summary = {**base, "status": "n/a", "reason": reason, "n_images": 0, "metrics": {}, "cost": {}}
    atomic_write_text(job_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    log.warning("n/a: %s", reason)
    print(f"[reddiff] n/a: {reason}\n[reddiff] results: {job_dir}")
    return summary


def _run(cfg: DictConfig, job_dir: Path) -> dict:
    check_scalars(cfg)
    ident = job_identity(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    group = wandb_group(cfg)
    if isinstance(resolved.get("logger"), dict) and "group" in resolved["logger"]:
        resolved["logger"]["group"] = group
    base: dict[str, Any] = {**{k: ident[k] for k in ("task", "sampler", "prior", "data")},
                            "experiment": ident["experiment"], "overrides": ident["overrides"],
                            "config": resolved, "versions": versions(), "git_commit": git_commit()}
    device = resolve_device(cfg.device)

    operator = build(cfg.task.operator, f"task={ident['task']}")
    extra = foreign_keys(cfg)
    if extra and hydra_info().get("multirun"):  # a key set for the other samplers of the sweep
        return not_applicable(job_dir, base, resolved, cfg, f"sampler {ident['sampler']} has no setting "
                              + ", ".join(extra) + " (set on the command line for the other samplers of the sweep)")
    sampler = build(cfg.sampler, f"sampler={ident['sampler']}")
    try:
        sampler.check(operator)
    except OperatorCapabilityError as e:
        return not_applicable(job_dir, base, resolved, cfg, str(e))
    prior = build(cfg.prior, f"prior={ident['prior']}").to(device).eval()
    try:
        sampler.check_prior(prior)
    except ValueError as e:
        raise UserError(f"sampler={ident['sampler']}: {e}") from e
    latent = hasattr(prior, "decode")  # a latent prior: the sampler sees A(D(z)); pixels D(z) are scored
    seen = ThroughDecoder(operator, prior.decode, prior.encode) if latent else operator
    try:
        sampler.check(seen)
    except OperatorCapabilityError as e:
        return not_applicable(job_dir, base, resolved, cfg, f"{e} (a latent prior: the sampler sees A(D(z)))")
    dataset = prepare_data(cfg, prior, ident, resolved)
    suite = build(cfg.metrics, "metrics")
    base["weights"], sha = weights_record(prior)
    fp = fingerprint(resolved, sha)
    base["fingerprint"] = {"merge_key": fp["merge_key"]}
    bind(job_dir, fp, cfg.get("resume", True), cfg.get("archive", False))
    logger = build(cfg.logger, "logger", **({"group": group} if "group" in cfg.logger else {}))
    logger.start(resolved, ident, job_dir)

    try:
        store = ResultStore(job_dir, list(suite.names))
    except ValueError as e:
        raise UserError(str(e)) from e
    if store.repaired:
        log.warning("dropped %d half-written row(s) from a killed run; their batch is redone", store.repaired)
    sink = Sink(job_dir, store, InputsLog(job_dir))

    def restore(y, indices, monitor, callback):
        monitor.begin(0, y.shape[0])
        x_hat = sampler.sample(y, seen, prior, BatchRNG.for_images(cfg.seed, indices, device), callback=callback)
        if latent:
            with torch.no_grad():
                x_hat = prior.decode(x_hat)
        return [x_hat], prior.nfe

    t_job = time.time()
    run_batches(dataset=dataset, operator=operator, prior=prior, suite=suite, sinks=[sink], restore=restore,
                seed=int(cfg.seed), batch_size=int(cfg.batch_size), device=device, logger=logger,
                save_images=bool(cfg.save_images), progress=bool(cfg.progress),
                desc=f"{ident['sampler']} on {ident['task']}")
    if not store.rows and sink.inputs.skipped:  # like an empty selection: no image could be scored
        first_id, why = next(iter(sink.inputs.skipped.items()))
        raise UserError(f"data={ident['data']}: every image of the selection was skipped "
                        f"({len(sink.inputs.skipped)} unreadable; first: {first_id}: {why!s:.300})".replace("\n", "\\n")
                        + "; nothing to score")
    summary = summarize(store, suite, base, sink.inputs.as_dict(), time.time() - t_job)
    write_job_grid(job_dir, store.rows, dataset, summary, int(cfg.grid_images))
    atomic_write_text(job_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    logger.finish(summary, job_dir)
    (job_dir / "error.txt").unlink(missing_ok=True)  # a refusal of an earlier attempt no longer applies
    from reddiff.report.stats import table_intervals  # the tables' photo-clustered intervals, not the naive ci95

    print("[reddiff] " + one_line(summary, table_intervals(str(job_dir), list(summary["metrics"]))))
    print(f"[reddiff] results: {job_dir}")
    return summary
