"""Degradation operators and the registry of task names.

Every task ``name`` has ``conf/task/<name>.yaml`` whose ``operator._target_`` is the class listed in
:data:`TASKS`.  Capabilities (see :data:`SVD_TASKS`, :data:`NONLINEAR_TASKS`):

* SVD-decomposable (``SVDOperator``: forward/adjoint/pinv + V, Vt, U, Ut, singulars, y_numel): sr4, sr4_bicubic,
  inpaint_box, inpaint_random, inpaint_freeform, deblur_gauss, deblur_gauss_dps, deblur_uniform, deblur_motion,
  colorization, denoise.
* nonlinear (forward + pinv only): phase_retrieval, hdr, deblur_nonlinear.

Conventions shared by all of them: ``op.setup(indices, x_shape, device, dtype)`` binds the batch (image side
from ``x_shape``; per-image masks/kernels from ``indices``); ``V``/``U`` return x-/y-shaped tensors, ``Vt``/``Ut``
return ``(B, n)``/``(B, m)``; singular values are not sorted and may be per image ``(B, k)``.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from .base import LinearOperator, Operator, OperatorCapabilityError, SVDOperator

TASK_DIR = Path(__file__).resolve().parents[2] / "conf" / "task"

#: task name -> operator class (dotted path, as the yaml's ``operator._target_``)
TASKS: dict[str, str] = {
    "sr4": "reddiff.operators.separable.BlockAverageSR",
    "sr4_bicubic": "reddiff.operators.separable.BicubicSR",
    "inpaint_box": "reddiff.operators.inpainting.BoxInpainting",
    "inpaint_random": "reddiff.operators.inpainting.RandomInpainting",
    "inpaint_freeform": "reddiff.operators.inpainting.FreeformInpainting",
    "deblur_gauss": "reddiff.operators.separable.SeparableBlur",
    "deblur_gauss_dps": "reddiff.operators.separable.SeparableBlur",
    "deblur_uniform": "reddiff.operators.separable.SeparableBlur",
    "deblur_motion": "reddiff.operators.motion.MotionBlur",
    "colorization": "reddiff.operators.inpainting.Colorization",
    "denoise": "reddiff.operators.inpainting.Denoising",
    "phase_retrieval": "reddiff.operators.nonlinear.PhaseRetrieval",
    "hdr": "reddiff.operators.nonlinear.HDR",
    "deblur_nonlinear": "reddiff.operators.bkse.NonlinearBlur",
}
NONLINEAR_TASKS = ("phase_retrieval", "hdr", "deblur_nonlinear")
SVD_TASKS = tuple(t for t in TASKS if t not in NONLINEAR_TASKS)
#: tasks whose operator needs user-supplied weights (reddiff.weights registry name)
NEEDS_WEIGHTS = {"deblur_nonlinear": "bkse_gopro"}


def task_names() -> list[str]:
    return list(TASKS)


def operator_class(name: str) -> type:
    """The operator class of task ``name``."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    module, cls = TASKS[name].rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


def task_config(name: str, **task_overrides):
    """``conf/task/<name>.yaml`` as an OmegaConf node under ``task`` (so ``${task.sigma_y}`` resolves).

    ``task_overrides`` replace top-level task keys, e.g. ``sigma_y=0.05``.
    """
    from omegaconf import OmegaConf

    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    path = TASK_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"task config {path} is missing")
    task = OmegaConf.load(path)
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


__all__ = ["Operator", "LinearOperator", "SVDOperator", "OperatorCapabilityError", "TASKS", "SVD_TASKS",
           "NONLINEAR_TASKS", "NEEDS_WEIGHTS", "task_names", "operator_class", "task_config", "build_operator"]
