"""Variance-preserving DDPM schedule and RED-diff timestep sequences.

Conventions (ADM / guided-diffusion): linear betas from 1e-4 to 0.02 over T = 1000 steps,
``alpha_bar[t] = prod_{s <= t} (1 - beta_s)`` for ``t`` in ``{0, ..., T-1}``.  ``alpha_bar_at(-1)`` is 1
(the clean image), which the DDIM-type samplers use for their last step.
"""
from __future__ import annotations

import math

import torch

ORDERINGS = ("descending", "ascending", "random")


class Schedule:
    """VP schedule: linear betas by default, any beta table through :meth:`from_betas`. ``alpha_bar`` is kept in
    float64 and cast on use."""

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        if T <= 0:
            raise ValueError(f"T must be positive, got {T}")
        self._set(torch.linspace(beta_start, beta_end, int(T), dtype=torch.float64))

    @classmethod
    def from_betas(cls, betas) -> "Schedule":
        """A schedule from any ``(T,)`` beta table (a latent model's scheduler config: ``scaled_linear`` ...)."""
        betas = torch.as_tensor(betas, dtype=torch.float64).reshape(-1)
        if betas.numel() == 0 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a non-empty table of values in (0, 1)")
        s = cls.__new__(cls)
        s._set(betas)
        return s

    def _set(self, betas: torch.Tensor) -> None:
        self.T = int(betas.numel())
        self.betas = betas
        self.alpha_bar = torch.cumprod(1.0 - self.betas, dim=0)
        # index 0 of the padded table is t = -1 (alpha_bar = 1)
        self._padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar])
        #: the VE noise level of each step, sqrt((1 - a_t) / a_t) (increasing)
        self.sigmas = ((1 - self.alpha_bar) / self.alpha_bar).sqrt()

    def alpha_bar_at(self, t, like: torch.Tensor | None = None) -> torch.Tensor:
        """alpha_bar for an int or an integer tensor ``t`` (``-1`` allowed); dtype/device of ``like``."""
        t = torch.as_tensor(t, dtype=torch.long)
        a = self._padded[t + 1]
        if like is not None:
            a = a.to(device=like.device, dtype=like.dtype)
        return a

    def sigma_at(self, t) -> torch.Tensor:
        """``sigma_t = sqrt((1 - a_t) / a_t)`` (float64) at integer or real ``t`` in ``[0, T-1]`` (the log-sigma
        interpolation of :meth:`t_of_sigma` between grid points; exact table values on the grid)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        k = t.floor().clamp(0, self.T - 2)
        frac = t - k
        logs = self.sigmas.log()
        k = k.long()
        mid = torch.exp(logs[k] + frac * (logs[k + 1] - logs[k]))
        return torch.where(frac == 0, self.sigmas[k], torch.where(frac == 1, self.sigmas[k + 1], mid))

    def t_of_sigma(self, sigma) -> torch.Tensor:
        """The continuous time input of a network trained on this grid at noise level ``sigma`` (float64): linear in
        ``log sigma`` between grid points, so exactly ``t`` at ``sigma_t``; clamped to ``[0, T-1]`` outside the grid
        (sigma below ``sigma_0`` or above ``sigma_{T-1}``)."""
        s = torch.as_tensor(sigma, dtype=torch.float64)
        logs = self.sigmas.log()
        ls = s.clamp(float(self.sigmas[0]), float(self.sigmas[-1])).log()
        k = (torch.searchsorted(logs, ls.reshape(-1), right=True) - 1).clamp(0, self.T - 2).reshape(ls.shape)
        return k.to(torch.float64) + (ls - logs[k]) / (logs[k + 1] - logs[k])

    def sigma_over_alpha(self, t) -> torch.Tensor:
        """sqrt(1 - alpha_bar) / sqrt(alpha_bar): the inverse SNR that RED-diff weights by."""
        a = self.alpha_bar_at(t)
        return ((1 - a) / a).sqrt()

    def t_for_noise_std(self, sigma: float) -> int:
        """Timestep whose x0-space noise std sqrt((1-a)/a) is closest to ``sigma`` (model units)."""
        s = ((1 - self.alpha_bar) / self.alpha_bar).sqrt()
        return int(torch.argmin((s - sigma).abs()))


SPACINGS = ("default", "official")


def timesteps(num_steps: int, ordering: str = "descending", T: int = 1000, seed: int = 0,
              spacing: str = "default") -> list[int]:
    """The timesteps visited for ``num_steps`` steps on a schedule of length ``T``.

    ``spacing="default"``: exactly ``num_steps`` distinct steps ``t_k = floor(k T / num_steps)``, k = 0..n-1, so
    the chain starts at ``floor((n-1) T / n) >= T - T/n - 1`` (996 for 300 steps, 990 for 100).  For a count
    that divides T this is ``range(0, T, T // n)`` bit for bit, the official list.
    ``spacing="official"``: the official list itself for every count, ``range(0, T, T // n)`` (RED-diff
    ``utils/functions.py:20-24`` get_timesteps, DDRM ``runners/diffusion.py:334-335``, code), which has
    ``ceil(T / (T // n))`` entries when n does not divide T (334 for 300, 500 for 400, 1000 for 600): NFE is
    then what ran, not n.

    ``descending`` visits T -> 0 (the paper default), ``ascending`` 0 -> T and ``random`` a seeded
    permutation that visits each chosen step exactly once.
    """
    if not isinstance(num_steps, int) or num_steps <= 0 or num_steps > T:
        raise ValueError(f"steps must be an integer in [1, {T}], got {num_steps!r}")
    if ordering not in ORDERINGS:
        raise ValueError(f"unknown ordering {ordering!r}; valid orderings: {', '.join(ORDERINGS)}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    if spacing == "official":
        ts = list(range(0, T, T // num_steps))
    else:
        ts = [k * T // num_steps for k in range(num_steps)]
    if ordering == "descending":
        return ts[::-1]
    if ordering == "ascending":
        return ts
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(ts), generator=g).tolist()
    return [ts[i] for i in perm]


def ddim_coefficients(schedule: "Schedule", ts: list[int], eta: float) -> list[tuple[float, float, float, float]]:
    """Per visited step ``(a_t, a_s, c1, c2)`` of the DDIM update ``x_s = sqrt(a_s) x0 + c1 z + c2 eps``, where
    ``s`` is the next visited timestep (``-1``, i.e. a_s = 1, after the last), ``c1 = eta sqrt((1 - a_t/a_s)
    (1 - a_s)/(1 - a_t))`` and ``c2 = sqrt(1 - a_s - c1^2)``.  Plain floats from the float64 schedule, computed
    once before the loop."""
    out = []
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1
        a_t, a_s = float(schedule.alpha_bar_at(t)), float(schedule.alpha_bar_at(s))
        c1 = eta * math.sqrt((1 - a_t / a_s) * (1 - a_s) / (1 - a_t))
        out.append((a_t, a_s, c1, math.sqrt(max(1 - a_s - c1 ** 2, 0.0))))
    return out
