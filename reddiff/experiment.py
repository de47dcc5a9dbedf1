"""The experiment runner behind ``run.py``: one job = one (task, sampler, prior, data) combination.

Outputs in the job dir (DESIGN.md contract 1): ``metrics.csv`` (one row per image), ``summary.json``,
``grid.png``, restored PNGs under ``images/``, per-image features under ``features/`` (for set-level
metrics that must be merged across shards or resumed runs).
"""
from __future__ import annotations

import json
import logging
import math
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .errors import ResolutionMismatchError, UserError
from .operators.base import OperatorCapabilityError
from .results import ResultStore, atomic_write_text, safe_name
from .rng import BatchRNG

log = logging.getLogger("reddiff")

#: measurement noise uses its own stream, so changing the sampler never changes y
MEASUREMENT_SEED_OFFSET = 1_000_003


# ------------------------------------------------------------------------------------------ helpers
def mean_ci95(values) -> dict:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    ci = float(1.96 * v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else None
    return {"mean": float(v.mean()), "ci95": ci, "n": int(v.size)}


def _float(s: str):
    try:
        return float(s) if s not in ("", None) else None
    except ValueError:
        return None


def aggregate_rows(rows: list[dict], per_image_names: list[str]) -> dict:
    ok = [r for r in rows if r.get("diverged") != "true"]
    return {name: mean_ci95(_float(r.get(name)) for r in ok) for name in per_image_names}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "numpy", "hydra-core", "torchmetrics", "lpips", "clean-fid", "wandb", "reddiff-harness"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                           text=True, timeout=10, check=False)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def unwrap_instantiation_error(e: BaseException) -> BaseException:
    """Hydra wraps constructor errors; surface the user's error."""
    while getattr(e, "__cause__", None) is not None and type(e).__name__ == "InstantiationException":
        e = e.__cause__
    return e


class DivergenceMonitor:
    """Wraps a prior's ``eps`` to record, without host synchronisation, the first network call at which
    each image's input became non-finite (the step of divergence)."""

    def __init__(self, prior, batch: int):
        self.prior = prior
        self.first_bad = None
        self.batch = batch
        self._orig = prior.eps
        self.calls = 0

        def eps(x_t, t):
            self.calls += 1
            if x_t.shape[0] == self.batch:
                bad = ~torch.isfinite(x_t.detach()).reshape(x_t.shape[0], -1).all(dim=1)
                step = torch.full_like(bad, self.calls, dtype=torch.long)
                if self.first_bad is None:
                    self.first_bad = torch.zeros(x_t.shape[0], dtype=torch.long, device=x_t.device)
                self.first_bad = torch.where(bad & (self.first_bad == 0), step, self.first_bad)
            return self._orig(x_t, t)

        prior.eps = eps

    def close(self):
        self.prior.__dict__.pop("eps", None)

    def steps(self, final_bad: torch.Tensor) -> list[int | None]:
        fb = self.first_bad.cpu().tolist() if self.first_bad is not None else [0] * len(final_bad)
        return [(s if s > 0 else self.calls) if b else None for s, b in zip(fb, final_bad.tolist())]


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(C,H,W) in [-1,1] -> HxWxC uint8."""
    x = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x.permute(1, 2, 0).numpy()


def save_png(path: Path, img: torch.Tensor) -> None:
    import io

    from PIL import Image

    from .results import atomic_write_bytes

    buf = io.BytesIO()
    Image.fromarray(to_uint8(img)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_grid(path: Path, triples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(triples)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n + 0.4), squeeze=False)
    for i, row in enumerate(triples):
        for j, (img, name) in enumerate(zip(row, ("ground truth", "measurement", "restoration"))):
            axes[i, j].imshow(img, interpolation="nearest")
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path.with_name(path.name + ".tmp.png"), dpi=100)
    plt.close(fig)
    Path(path.with_name(path.name + ".tmp.png")).replace(path)


# ---------------------------------------------------------------------------------------------- run
def job_identity(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    choices, overrides = {}, []
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        choices = dict(hc.runtime.choices)
        overrides = list(hc.overrides.task)
    return {
        "task": cfg.task.name,
        "sampler": choices.get("sampler", cfg.get("sampler_name")),
        "prior": choices.get("prior", cfg.get("prior_name")),
        "data": choices.get("data", cfg.get("data_name")),
        "experiment": cfg.get("experiment_name"),
        "overrides": overrides,
    }


def run(cfg: DictConfig, job_dir: Path) -> dict:
    """Run one job; returns the summary dict (also written to ``job_dir/summary.json``)."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    ident = job_identity(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    base_summary: dict[str, Any] = {**{k: ident[k] for k in ("task", "sampler", "prior", "data")},
                                    "experiment": ident["experiment"], "overrides": ident["overrides"],
                                    "config": resolved, "versions": versions(), "git_commit": git_commit()}
    device = resolve_device(cfg.device)
    dtype = torch.float32

    # --- build everything first: bad input fails here, before any sampling ----------------------
    def build(node, what):
        try:
            return instantiate(node)
        except Exception as e:  # noqa: BLE001 - re-raised with the user's message
            inner = unwrap_instantiation_error(e)
            if isinstance(inner, (UserError, ValueError, FileNotFoundError, RuntimeError, KeyError)):
                raise UserError(f"{what}: {inner}") from inner
            raise

    operator = build(cfg.task.operator, f"task={ident['task']}")
    sampler = build(cfg.sampler, f"sampler={ident['sampler']}")
    try:
        sampler.check(operator)
    except OperatorCapabilityError as e:
        summary = {**base_summary, "status": "n/a", "reason": str(e), "n_images": 0, "metrics": {},
                   "cost": {}}
        atomic_write_text(job_dir / "summary.json", json.dumps(summary, indent=2, default=str))
        log.warning("n/a: %s", e)
        print(f"[reddiff] n/a: {e}")
        return summary
    dataset = build(cfg.data, f"data={ident['data']}")
    prior = build(cfg.prior, f"prior={ident['prior']}").to(device).eval()
    try:
        sampler.check_prior(prior)
    except ValueError as e:
        raise UserError(f"sampler={ident['sampler']}: {e}") from e
    prior_res = tuple(prior.shape)[-1]
    if int(dataset.resolution) != int(prior_res):
        raise ResolutionMismatchError(
            f"prior {ident['prior']} works at {prior_res}x{prior_res} but data {ident['data']} is "
            f"{dataset.resolution}x{dataset.resolution}; set data.resolution={prior_res} or pick a prior of that size")
    suite = build(cfg.metrics, "metrics")
    logger = build(cfg.logger, "logger")
    logger.start(resolved, ident, job_dir)

    per_image_names = list(suite.names)  # one CSV column per metric; set-level ones stay empty
    store = ResultStore(job_dir, per_image_names, resume=cfg.resume)
    if store.repaired:
        log.warning("dropped %d half-written row(s) from a killed run; those images are redone", store.repaired)
    entries = dataset.entries()
    done = store.done_ids()
    todo = [e for e in entries if e.image_id not in done]
    if done:
        print(f"[reddiff] resuming: {len(done)} image(s) already done, {len(todo)} to go")
    skipped: list[dict] = []
    t_job = time.time()

    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc=f"{ident['sampler']} on {ident['task']}", unit="img", disable=not cfg.progress)
    bs = int(cfg.batch_size)
    i = 0
    while i < len(todo):
        batch_entries, imgs = [], []
        while i < len(todo) and len(batch_entries) < bs:
            e = todo[i]
            i += 1
            try:
                imgs.append(dataset.load(e))
                batch_entries.append(e)
            except Exception as err:  # noqa: BLE001 - corrupt image: skip, record, go on
                from .data import CorruptImageError

                if not isinstance(err, CorruptImageError):
                    raise
                skipped.append({"image_id": e.image_id, "reason": str(err)})
                log.warning("skipping %s: %s", e.image_id, err)
                bar.update(1)
        if not batch_entries:
            continue
        x = torch.stack(imgs).to(device=device, dtype=dtype)
        indices = [e.index for e in batch_entries]
        operator.setup(indices, tuple(x.shape), device, dtype)
        y = operator.measure(x, BatchRNG.for_images(cfg.seed + MEASUREMENT_SEED_OFFSET, indices, device))
        rng = BatchRNG.for_images(cfg.seed, indices, device)
        prior.reset_nfe()
        monitor = DivergenceMonitor(prior, x.shape[0])
        t0 = time.time()
        try:
            x_hat = sampler.sample(y, operator, prior, rng, callback=logger.step_callback(indices))
        finally:
            monitor.close()
        if device.type == "cuda":
            torch.cuda.synchronize()
        sec = (time.time() - t0) / x.shape[0]
        nfe = prior.nfe
        bad = ~torch.isfinite(x_hat).reshape(x_hat.shape[0], -1).all(dim=1)
        div_steps = monitor.steps(bad.cpu())
        x_eval = torch.where(bad.view(-1, *[1] * (x_hat.ndim - 1)), torch.zeros_like(x_hat), x_hat).clamp(-1, 1)
        with torch.no_grad():
            vals = {k: v.detach().cpu() for k, v in suite.per_image(x_eval, x).items()}
            feats = suite.features(x_eval, x)
        vis = operator.visualize(y)
        for j, e in enumerate(batch_entries):
            diverged = bool(bad[j])
            row = {"image_id": e.image_id, "nfe": nfe, "seconds": sec, "diverged": diverged,
                   "diverged_step": div_steps[j]}
            for name in per_image_names:
                row[name] = None if diverged or name not in vals else float(vals[name][j])
            if cfg.save_images:
                save_png(job_dir / "images" / f"{safe_name(e.image_id)}.png", x_eval[j])
                if vis is not None and tuple(vis.shape[1:]) == tuple(x.shape[1:]):
                    save_png(job_dir / "images" / f"{safe_name(e.image_id)}_y.png", vis[j])
            fj = {k: np.asarray(v[j]) for k, v in feats.items()}
            if e.label is not None:
                fj["label"] = np.asarray(e.label)
            store.append(row, fj)
            if diverged:
                log.warning("%s diverged at network call %s", e.image_id, div_steps[j])
        logger.log_batch(batch_entries, vals)
        bar.update(len(batch_entries))
    bar.close()

    summary = summarize(store, suite, per_image_names, dataset, base_summary, skipped, time.time() - t_job)
    write_job_grid(job_dir, store, dataset, summary, int(cfg.grid_images))
    atomic_write_text(job_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    logger.finish(summary, job_dir)
    print("[reddiff] " + one_line(summary))
    return summary


def summarize(store: ResultStore, suite, per_image_names, dataset, base_summary, skipped, wall) -> dict:
    rows = store.rows
    metrics = compute_metrics(rows, suite, store.load_features(
        [r["image_id"] for r in rows if r.get("diverged") != "true"]))
    nfe = [_float(r["nfe"]) for r in rows]
    sec = [_float(r["seconds"]) for r in rows]
    divs = [{"image_id": r["image_id"], "step": r.get("diverged_step")} for r in rows if r.get("diverged") == "true"]
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
        **{k: base_summary[k] for k in ("experiment", "overrides", "config", "versions", "git_commit")},
    }


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


def write_job_grid(job_dir: Path, store: ResultStore, dataset, summary: dict, n: int) -> None:
    from PIL import Image

    by_id = {e.image_id: e for e in dataset.entries()}
    triples = []
    for r in store.rows:
        if len(triples) >= n:
            break
        e = by_id.get(r["image_id"])
        p_hat = job_dir / "images" / f"{safe_name(r['image_id'])}.png"
        p_y = job_dir / "images" / f"{safe_name(r['image_id'])}_y.png"
        if e is None or not p_hat.exists():
            continue
        gt = to_uint8(dataset.load(e))
        y = np.asarray(Image.open(p_y).convert("RGB")) if p_y.exists() else np.zeros_like(gt)
        triples.append((gt, y, np.asarray(Image.open(p_hat).convert("RGB"))))
    if triples:
        write_grid(job_dir / "grid.png", triples, f"{summary['sampler']} on {summary['task']} ({summary['prior']})")


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
    return " | ".join(parts)
