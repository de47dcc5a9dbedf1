"""Equal-budget tuning with Hydra's Optuna sweeper, and the tuned presets that use its results.

``python run.py -m +tune=<sampler> task=<task> [sampler.steps=N] [hydra.sweeper.n_trials=K]`` searches the
space the sampler class declares (``Sampler.tune_space``, Optuna-sweeper expressions) on the tuning split
(``data=tune``, :mod:`reddiff.data.tune`: no pixel shared with the demo images), maximising the job's return
value (:func:`objective`: mean PSNR, or minus mean LPIPS with ``tune.objective=lpips``).  Hydra writes
``optimization_results.yaml`` into the sweep dir.

Why no ``conf/tune/*.yaml``: the ``tune/<sampler>`` configs are generated in memory, one per registry sampler that
declares a space, and stored in Hydra's ConfigStore before the config is composed (:func:`register`).  A new
sampler therefore gets ``+tune=<name>`` from its own class, with nothing to add elsewhere (docs/TUNING.md).

``+tuned=<prior>`` (``conf/tuned/<prior>.yaml``, written by ``make tune``) holds the best settings per
(task, step count, sampler); :func:`apply_tuned` sets them on the job's sampler config before it is built, unless
the command line sets that key explicitly.  A combination that was not tuned keeps its official settings, and
the job's config records what was applied (``tuned.applied``).
"""
from __future__ import annotations

import logging
import math

from omegaconf import DictConfig, OmegaConf, open_dict

from reddiff.core.errors import UserError

log = logging.getLogger("reddiff")

#: the equal trial budget of every sampler (``hydra.sweeper.n_trials`` overrides it for one run)
N_TRIALS = 10
#: random trials before TPE starts modelling (optuna's default is 10, the whole budget)
N_STARTUP = 5
#: tuning images per trial (the first tiles of data=tune)
N_IMAGES = 2


def tune_node(name: str, space: dict) -> dict:
    """The ``tune/<name>`` config: Optuna sweeper, tuning split, pixel metrics, the sampler's space."""
    return {
        "defaults": [{"override /hydra/sweeper": "optuna"}, {"override /sampler": name},
                     {"override /data": "tune"}, {"override /metrics": "fast"}, {"override /logger": "none"},
                     "_self_"],
        "tune": {"sampler": name, "objective": "psnr"},
        "experiment_name": f"tune_{name}",
        "data": {"count": N_IMAGES},
        "save_images": False, "progress": False, "grid_images": 2,
        "hydra": {
            "sweep": {"dir": "multirun/tune/" + name + "/${task.name}_s${sampler.steps}/${now:%Y-%m-%d_%H-%M-%S}",
                      "subdir": "${hydra.job.num}"},
            "sweeper": {"direction": "maximize", "study_name": f"{name}", "n_trials": N_TRIALS, "n_jobs": 1,
                        "max_failure_rate": 1.0,
                        "sampler": {"seed": 0, "n_startup_trials": N_STARTUP},
                        "params": {f"sampler.{k}": v for k, v in space.items()}},
        },
    }


def tunable() -> dict[str, dict]:
    """``{sampler: tune_space}`` for every registry sampler that declares a space (import errors are skipped)."""
    from reddiff.registry import sampler_class, sampler_names

    out = {}
    for name in sampler_names():
        try:
            space = dict(getattr(sampler_class(name), "tune_space", {}) or {})
        except Exception as e:  # noqa: BLE001 - one broken sampler must not stop run.py
            log.debug("tune: skipping sampler %s (%s)", name, e)
            continue
        if space:
            out[name] = space
    return out


def register() -> list[str]:
    """Store ``tune/<sampler>`` in Hydra's ConfigStore for every sampler with a declared space."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    names = []
    for name, space in tunable().items():
        cs.store(group="tune", name=name, package="_global_", node=tune_node(name, space))
        names.append(name)
    return names


#: the score of a trial that diverged, failed or is n/a: the worst value of each objective (0 dB PSNR; LPIPS 2,
#: above its range).  Finite on purpose: the Optuna sweeper cannot record NaN (optuna 2.10 raises on it).
WORST = {"psnr": 0.0, "lpips": -2.0}


def _metric(cfg: DictConfig) -> str:
    metric = str(OmegaConf.select(cfg, "tune.objective", default="psnr"))
    if metric not in WORST:
        raise UserError(f"tune.objective must be psnr or lpips, got {metric!r}")
    return metric


def worst(cfg: DictConfig) -> float:
    """The objective of a job that failed (see :data:`WORST`)."""
    try:
        return WORST[_metric(cfg)]
    except UserError:
        return WORST["psnr"]


def objective(cfg: DictConfig, summary: dict) -> float:
    """What ``run.py`` returns: mean PSNR (``tune.objective=psnr``, default) or minus mean LPIPS (``lpips``),
    higher is better.  The worst score (:data:`WORST`) when the job is n/a, the metric has no finite value, or an
    image diverged (a mean over the survivors would reward a setting that blows up)."""
    metric = _metric(cfg)
    if summary.get("status") != "ok" or summary.get("diverged"):
        return WORST[metric]
    m = summary.get("metrics", {}).get(metric, {})
    if "missing" in m and metric == "lpips" and OmegaConf.select(cfg, "tune") is not None:
        raise UserError(f"tune.objective=lpips but LPIPS is missing: {m['missing']}")
    v = m.get("mean")
    if v is None or not math.isfinite(v):
        return WORST[metric]
    return float(v) if metric == "psnr" else -float(v)


def _explicit_keys() -> set[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {o.lstrip("+~").split("=", 1)[0] for o in HydraConfig.get().overrides.task}


def apply_tuned(cfg: DictConfig) -> DictConfig:
    """Set the tuned values of ``cfg.tuned.table[task][s<steps>][sampler]`` on ``cfg.sampler`` (in place)."""
    tuned = cfg.get("tuned")
    if not tuned or "table" not in tuned:
        return cfg
    from reddiff.store.provenance import job_identity

    ident = job_identity(cfg)
    if tuned.get("prior") and ident["prior"] and str(tuned.prior) != str(ident["prior"]):
        raise UserError(f"+tuned={tuned.prior} holds settings tuned on prior={tuned.prior}, not "
                        f"prior={ident['prior']}: drop +tuned or tune this prior (make tune)")
    steps = OmegaConf.select(cfg, "sampler.steps", default=None)
    key = f"s{steps}" if steps is not None else "s0"
    entry = OmegaConf.select(tuned.table, f"{cfg.task.name}.{key}.{ident['sampler']}", default=None)
    explicit = _explicit_keys()
    applied = {}
    if entry is not None:
        for k, v in entry.items():
            if k not in cfg.sampler:
                raise UserError(f"+tuned={tuned.prior}: sampler {ident['sampler']} has no key {k!r}")
            if f"sampler.{k}" in explicit:
                continue
            with open_dict(cfg):
                cfg.sampler[k] = v
            applied[k] = v
    else:
        log.warning("tuned: no tuned settings for task=%s sampler=%s steps=%s; official settings kept",
                    cfg.task.name, ident["sampler"], steps)
    with open_dict(cfg):
        cfg.tuned.applied = {"task": cfg.task.name, "steps": steps, "sampler": ident["sampler"],
                             "settings": applied or None}
    if applied:
        print(f"[reddiff] tuned ({tuned.prior}, {cfg.task.name}, {steps} steps): "
              + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in applied.items()))
    return cfg
