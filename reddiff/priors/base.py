"""Prior / denoiser protocol.

Every prior is a denoiser ``denoise(x_e, sigma) = E[x0 | x0 + sigma n = x_e]`` at any noise level (the protocol of
:mod:`reddiff.priors.dialects`), seen through a **dialect** (``prior.dialect``: vp_discrete, the default, vp_continuous,
edm or flow).  Whatever its dialect, it also speaks the discrete VP grid that most samplers are written on:

* ``shape``: the shape of one sample (``(C, H, W)`` for images, ``(d,)`` for the Gaussian mixture);
* ``eps(x_t, t)``: predicted noise; ``t`` is an int or a ``(B,)`` long tensor in ``{0..T-1}``;
* ``x0(x_t, t)``: Tweedie / x0-prediction ``(x_t - sqrt(1-a) eps) / sqrt(a)``;
* ``alpha_bar(t)``;
* ``nfe``: network evaluations since the last ``reset_nfe()``. One call on a batch counts once: it is the
  NFE *per image* when every call covers the whole batch.

Samplers decide whether gradients flow: RED-diff wraps calls in ``torch.no_grad()``; DPS and Pi-GDM
differentiate through ``eps`` with respect to ``x_t``.

A subclass says what its model outputs by the hook it implements: ``_eps_time(x_t, tau)`` (an epsilon network whose
time input ``tau`` may be real; ``_eps`` then feeds it the integer t), ``_eps_alpha(x_t, a)`` (an exact prior, exact
at any ``a = 1 / (1 + sigma^2)``) or ``_denoise(x_e, sigma)`` (a model whose denoiser is native: EDM, flow).
In the default dialect ``eps`` is the unchanged integer-t path, bit for bit; in the others ``eps(x_t, t)`` is the
model evaluated at the grid's ``sigma_t`` through the dialect's time input.
"""
from __future__ import annotations

import torch

from reddiff.core.diffusion import Schedule
from reddiff.priors.dialects import VPDiscrete, bcast, make_dialect


class Prior(torch.nn.Module):
    shape: tuple = ()
    name: str = "prior"

    def __init__(self, schedule: Schedule | None = None, dialect: str = VPDiscrete.name):
        super().__init__()
        self.schedule = schedule or Schedule()
        self.view = make_dialect(dialect, self.schedule)
        self.nfe = 0

    @property
    def dialect(self) -> str:
        return self.view.name

    # to implement (one of the hooks, see the module docstring) -----------------------
    def _eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noise prediction at integer ``t`` of the prior's own schedule (the default dialect's path)."""
        if self._has("_eps_time"):
            return self._eps_time(x_t, t)
        if self._has("_eps_alpha"):
            return self._eps_alpha(x_t, self.schedule.alpha_bar_at(t.cpu()).to(device=x_t.device))
        sigma = self.schedule.sigma_at(t.cpu()).to(x_t.device)
        return self._eps_at_sigma(x_t, sigma, self.view)

    def _has(self, hook: str) -> bool:
        return getattr(type(self), hook, None) is not getattr(Prior, hook, None)

    def _eps_time(self, x_t, tau):  # pragma: no cover - hook
        raise NotImplementedError

    def _eps_alpha(self, x_t, a):  # pragma: no cover - hook
        raise NotImplementedError

    def _denoise(self, x_e, sigma):  # pragma: no cover - hook
        raise NotImplementedError

    def _eps_at_sigma(self, x_t: torch.Tensor, sigma: torch.Tensor, view) -> torch.Tensor:
        """Epsilon on the VP state ``x_t = x_e / sqrt(1 + sigma^2)`` at ``(B,)`` float64 noise levels ``sigma``."""
        if self._has("_eps_time"):
            return self._eps_time(x_t, view.network_time(sigma.cpu(), self.schedule).to(x_t.device))
        if self._has("_eps_alpha"):
            return self._eps_alpha(x_t, 1.0 / (1.0 + sigma * sigma))
        x_e = x_t * bcast(torch.sqrt(1.0 + sigma * sigma), x_t)
        return (x_e - self._denoise(x_e, sigma)) / bcast(sigma, x_t)

    # protocol ----------------------------------------------------------------------
    def _t(self, t, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.long, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return t

    def eps(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """Noise prediction at integer ``t`` of the schedule: the default dialect's own path; in another dialect the
        model at the grid's ``sigma_t`` (exact priors at the grid's ``alpha_bar_t`` itself)."""
        self.nfe += 1
        t = self._t(t, x_t)
        if isinstance(self.view, VPDiscrete) or (self._has("_eps_alpha") and not self._has("_eps_time")):
            return self._eps(x_t, t)
        return self._eps_at_sigma(x_t, self.schedule.sigma_at(t.cpu()).to(x_t.device), self.view)

    def _sigma(self, sigma, x: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        if s.ndim == 0:
            s = s.expand(x.shape[0])
        if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
            raise ValueError(f"{self.name}: the noise level sigma must be finite and > 0")
        return s

    def denoise(self, x_e: torch.Tensor, sigma, dialect: str | None = None) -> torch.Tensor:
        """``D(x_e, sigma) = E[x0 | x0 + sigma n = x_e]`` at any ``sigma > 0`` (a float or ``(B,)``); one network
        evaluation.  ``dialect`` overrides the prior's own for the time input of an epsilon network (DAPS's
        official ``vp_continuous``)."""
        self.nfe += 1
        view = self.view if dialect is None else make_dialect(dialect, self.schedule)
        sigma = self._sigma(sigma, x_e)
        if self._has("_denoise"):
            return self._denoise(x_e, sigma)
        x_t = x_e / bcast(torch.sqrt(1.0 + sigma * sigma), x_e)
        return x_e - bcast(sigma, x_e) * self._eps_at_sigma(x_t, sigma, view)

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
