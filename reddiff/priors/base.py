"""Prior / denoiser protocol.

A prior is an epsilon-predictor on the VP schedule of :mod:`reddiff.core.diffusion`:

* ``shape``: the shape of one sample (``(C, H, W)`` for images, ``(d,)`` for the Gaussian mixture);
* ``eps(x_t, t)``: predicted noise; ``t`` is an int or a ``(B,)`` long tensor in ``{0..T-1}``;
* ``x0(x_t, t)``: Tweedie / x0-prediction ``(x_t - sqrt(1-a) eps) / sqrt(a)``;
* ``alpha_bar(t)``;
* ``nfe``: network evaluations since the last ``reset_nfe()``. One call on a batch counts once: it is the
  NFE *per image* when every call covers the whole batch.

Samplers decide whether gradients flow: RED-diff wraps calls in ``torch.no_grad()``; DPS and Pi-GDM
differentiate through ``eps`` with respect to ``x_t``.
"""
from __future__ import annotations

import torch

from reddiff.core.diffusion import Schedule


class Prior(torch.nn.Module):
    shape: tuple = ()
    name: str = "prior"

    def __init__(self, schedule: Schedule | None = None):
        super().__init__()
        self.schedule = schedule or Schedule()
        self.nfe = 0

    # to implement ------------------------------------------------------------------
    def _eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # protocol ----------------------------------------------------------------------
    def _t(self, t, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.long, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return t

    def eps(self, x_t: torch.Tensor, t) -> torch.Tensor:
        self.nfe += 1
        return self._eps(x_t, self._t(t, x_t))

    def alpha_bar(self, t, like: torch.Tensor | None = None) -> torch.Tensor:
        return self.schedule.alpha_bar_at(t, like)

    def x0(self, x_t: torch.Tensor, t) -> torch.Tensor:
        t = self._t(t, x_t)
        a = self.alpha_bar(t, x_t).reshape((-1,) + (1,) * (x_t.ndim - 1))
        return (x_t - (1 - a).sqrt() * self.eps(x_t, t)) / a.sqrt()

    def reset_nfe(self) -> None:
        self.nfe = 0

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")
