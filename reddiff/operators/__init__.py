"""Degradation operators.

Every task ``name`` is ``conf/task/<name>.yaml`` whose ``operator._target_`` is its class; the task list and each
task's capabilities (linear, SVD-decomposable, needs weights) come from :mod:`reddiff.registry`
(``python -m reddiff.registry``, ``registry.build_operator(task)``), never from a list kept here.

Conventions shared by all of them: ``op.setup(indices, x_shape, device, dtype)`` binds the batch (image side
from ``x_shape``; per-image masks/kernels from ``indices``); ``V``/``U`` return x-/y-shaped tensors, ``Vt``/``Ut``
return ``(B, n)``/``(B, m)``; singular values are not sorted and may be per image ``(B, k)``.

May import: reddiff.core
"""
from __future__ import annotations

from reddiff.operators.base import LinearOperator, Operator, OperatorCapabilityError, SVDOperator


__all__ = ["Operator", "LinearOperator", "SVDOperator", "OperatorCapabilityError"]
