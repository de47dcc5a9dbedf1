"""Degradation operators.

Every task ``name`` is ``conf/task/<name>.yaml`` whose ``operator._target_`` is its class; the task list and each
task's capabilities (linear, SVD-decomposable, needs weights) come from :mod:`reddiff.registry`
(``python -m reddiff.registry``), never from a list kept here.

Conventions shared by all of them: ``op.setup(indices, x_shape, device, dtype)`` binds the batch (image side
from ``x_shape``; per-image masks/kernels from ``indices``); ``V``/``U`` return x-/y-shaped tensors, ``Vt``/``Ut``
return ``(B, n)``/``(B, m)``; singular values are not sorted and may be per image ``(B, k)``.
"""
from __future__ import annotations

from .base import LinearOperator, Operator, OperatorCapabilityError, SVDOperator


def task_names() -> list[str]:
    """Every task: the stems of ``conf/task/*.yaml`` (see :mod:`reddiff.registry`)."""
    from ..registry import task_names as names

    return names()


def operator_class(name: str) -> type:
    """The operator class of task ``name`` (its YAML's ``operator._target_``)."""
    from ..registry import operator_class as cls

    return cls(name)


def task_config(name: str, **task_overrides):
    """``conf/task/<name>.yaml`` as an OmegaConf node under ``task`` (so ``${task.sigma_y}`` resolves).

    ``task_overrides`` replace top-level task keys, e.g. ``sigma_y=0.05``.
    """
    from omegaconf import OmegaConf

    from ..registry import _load_yaml

    task = _load_yaml("task", name)
    for k, v in task_overrides.items():
        task[k] = v
    return OmegaConf.create({"task": task})


def build_operator(name: str, sigma_y: float | None = None, **operator_overrides) -> Operator:
    """Instantiate the operator of task ``name`` from its yaml (``sigma_y`` and operator keys overridable)."""
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


__all__ = ["Operator", "LinearOperator", "SVDOperator", "OperatorCapabilityError", "task_names", "operator_class",
           "task_config", "build_operator"]
