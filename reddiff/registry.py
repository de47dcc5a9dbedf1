"""The registry of samplers and tasks, derived from ``conf/``: a sampler is ``conf/sampler/<name>.yaml`` (its
``_target_`` class), a task is ``conf/task/<name>.yaml`` (its ``operator._target_`` class).  Capabilities come from
the classes (``Sampler.requires``/``needs_grad``, ``Operator.linear``, :class:`SVDOperator`, ``weights_name``), so
adding a sampler or a task is one Python file plus one YAML and nothing else lists it.

    python -m reddiff.registry [--json]

May import: reddiff.core, reddiff.data, reddiff.operators, reddiff.priors, reddiff.samplers, reddiff.metrics
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from functools import lru_cache
from pathlib import Path


def conf_dir() -> Path:
    """``conf/`` of a clone (next to the package), else the copy installed inside the package."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "conf", here / "conf"):
        if (cand / "config.yaml").is_file():
            return cand
    raise FileNotFoundError(f"no conf/ directory found next to or inside {here}")


def _names(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def sampler_names() -> list[str]:
    return _names("sampler")


def task_names() -> list[str]:
    return _names("task")


def _load_yaml(group: str, name: str):
    from omegaconf import OmegaConf

    path = conf_dir() / group / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(_names(group))
        raise KeyError(f"unknown {group} {name!r}; known: {known}")
    return OmegaConf.load(path)


def import_target(target: str) -> type:
    module, cls = target.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


@lru_cache(maxsize=None)
def sampler_class(name: str) -> type:
    return import_target(_load_yaml("sampler", name)["_target_"])


@lru_cache(maxsize=None)
def operator_class(task: str) -> type:
    return import_target(_load_yaml("task", task).operator["_target_"])


def sampler_info(name: str) -> dict:
    cls = sampler_class(name)
    needs_grad = bool(getattr(cls, "needs_grad", False))
    return {"name": name, "class": f"{cls.__module__}.{cls.__qualname__}", "requires": list(cls.requires),
            "needs_grad": needs_grad, "speed_limit": 1.10 if needs_grad else 1.05,
            "gmm": cls.gmm_hparams is not None, "per_item": list(cls.per_item),
            "needs_latent": bool(getattr(cls, "needs_latent", False))}


def task_info(name: str) -> dict:
    from reddiff.operators.base import LinearOperator, SVDOperator

    cls = operator_class(name)
    return {"name": name, "operator": f"{cls.__module__}.{cls.__qualname__}",
            "linear": issubclass(cls, LinearOperator), "svd": issubclass(cls, SVDOperator),
            "needs_weights": getattr(cls, "weights_name", None)}


def task_config(name: str, **task_overrides):
    """``conf/task/<name>.yaml`` as an OmegaConf node under ``task`` (so ``${task.sigma_y}`` resolves);
    ``task_overrides`` replace top-level task keys, e.g. ``sigma_y=0.05``."""
    from omegaconf import OmegaConf

    task = _load_yaml("task", name)
    for k, v in task_overrides.items():
        task[k] = v
    return OmegaConf.create({"task": task})


def build_operator(name: str, sigma_y: float | None = None, **operator_overrides):
    """Instantiate the operator of task ``name`` from its YAML (``sigma_y`` and operator keys overridable)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    cfg = task_config(name, **({} if sigma_y is None else {"sigma_y": sigma_y}))
    for k, v in operator_overrides.items():
        cfg.task.operator[k] = v
    try:
        return instantiate(cfg.task.operator)
    except InstantiationException as e:  # re-raise the operator's own error (ValueError, MissingWeightsError)
        if e.__cause__ is not None:
            raise e.__cause__ from None
        raise


def sampler_config(name: str, task: str | None = None, **overrides):
    """``conf/sampler/<name>.yaml`` resolved against the task's ``hparams`` (none: the YAML defaults)."""
    from omegaconf import OmegaConf

    raw = _load_yaml("sampler", name)
    root = task_config(task) if task else OmegaConf.create({"task": {"hparams": {}}})
    root["sampler"] = raw
    node = OmegaConf.to_container(root, resolve=True)["sampler"]
    node.update(overrides)
    return node


def build_sampler(name: str, task: str | None = None, **overrides):
    """Instantiate sampler ``name`` from its YAML (see :func:`sampler_config`); ``overrides`` replace keys."""
    from hydra.utils import instantiate

    try:
        return instantiate(sampler_config(name, task, **overrides))
    except Exception as e:  # noqa: BLE001 - surface the sampler's own ValueError/TypeError
        inner = e.__cause__ if e.__cause__ is not None else e
        raise inner from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reddiff.registry", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    a = ap.parse_args(argv)
    samplers = [sampler_info(n) for n in sampler_names()]
    tasks = [task_info(n) for n in task_names()]
    if a.json:
        print(json.dumps({"samplers": samplers, "tasks": tasks}, indent=1))
        return 0
    print("samplers:")
    for s in samplers:
        print(f"  {s['name']:<12} requires={','.join(s['requires']) or '-':<8} network_grad={str(s['needs_grad']):<5} "
              f"speed_limit={s['speed_limit']:.2f} gmm={s['gmm']}  ({s['class']})")
    print("tasks:")
    for t in tasks:
        kind = "svd" if t["svd"] else ("linear" if t["linear"] else "nonlinear")
        print(f"  {t['name']:<18} {kind:<9} needs_weights={t['needs_weights'] or '-':<12} ({t['operator']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
