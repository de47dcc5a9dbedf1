"""Provenance of a job: who ran what -- the job's identity (task, sampler, prior, data, overrides), package
versions, the git commit and the process's peak memory.  Written into every ``summary.json``."""
from __future__ import annotations

import platform
import resource
import subprocess
from pathlib import Path

from omegaconf import DictConfig

#: the packages whose versions can change results
PACKAGES = ("torch", "torchvision", "numpy", "hydra-core", "torchmetrics", "lpips", "clean-fid", "wandb",
            "reddiff-harness")


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """HEAD of the clone this package runs from (None for an installed package outside a clone)."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                           text=True, timeout=10, check=False)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def hydra_info() -> dict:
    """Hydra's view of this job: config-group choices, command-line overrides, mode and sweep dir ({} outside)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    multirun = getattr(hc.get("mode"), "name", None) == "MULTIRUN"  # None when a config was composed by hand
    return {"choices": dict(hc.runtime.choices), "overrides": list(hc.overrides.task), "multirun": multirun,
            "sweep_dir": str(hc.sweep.dir) if multirun else None}


def job_identity(cfg: DictConfig) -> dict:
    info = hydra_info()
    choices = info.get("choices", {})
    return {
        "task": cfg.task.name,
        "sampler": choices.get("sampler", cfg.get("sampler_name")),
        "prior": choices.get("prior", cfg.get("prior_name")),
        "data": choices.get("data", cfg.get("data_name")),
        "experiment": cfg.get("experiment_name"),
        "overrides": info.get("overrides", []),
    }
