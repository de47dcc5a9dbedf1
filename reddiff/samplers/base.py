"""Sampler protocol: ``sample(y, operator, prior, rng) -> x0``.

Samplers are configured through Hydra (steps, ordering, weighting, lr, lambda, zeta, eta, ...), never assume
4-D images (the Gaussian-mixture prior is ``(B, d)``), and draw all randomness from ``rng``
(:class:`reddiff.rng.BatchRNG`), so a batch gives the same result as a loop over its items.

``callback(step, info)`` (optional) receives sparse progress (loss values as tensors; the caller decides
when to synchronise).  A sampler that needs an operator capability checks it up front with
``operator.require(...)`` so that an incompatible job fails before any work.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


class Sampler:
    name: str = "sampler"
    #: capabilities required from the operator ("adjoint", "svd", "linear")
    requires: tuple = ()

    def check(self, operator) -> None:
        for cap in self.requires:
            operator.require(cap, self.name)

    def check_prior(self, prior) -> None:
        """Refuse, before any sampling, a step count the prior's schedule cannot provide."""
        steps = getattr(self, "steps", None)
        T = prior.schedule.T
        if steps is not None and not 1 <= int(steps) <= T:
            raise ValueError(f"{self.name}: steps must be in [1, {T}] for this prior's schedule, got {steps}")

    def sample(self, y: torch.Tensor, operator, prior, rng, callback: Optional[Callable] = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-item ``(B,)`` (or scalar) tensor to broadcast against ``x`` of shape ``(B, *shape)``."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.ndim == 0:
        return v
    return v.reshape((-1,) + (1,) * (x.ndim - 1))
