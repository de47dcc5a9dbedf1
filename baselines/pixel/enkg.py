"""EnKG: ensemble Kalman diffusion guidance (Zheng, Dou, Berner, Azizzadenesheli, Anandkumar et al., "Ensemble
Kalman diffusion guidance: a derivative-free method for inverse problems"; official code devzhk/enkg-pytorch
``algo/enkg.py`` @2ee4a90, also InverseBench's default algorithm ``algo/enkg.py`` @b113d67).

Derivative-free: it evaluates the operator's ``forward`` only (no operator gradient, no network gradient), so it
runs on black-box measurements (``task=quantize``, ``Operator.differentiable = False``) and on phase retrieval.

An ensemble of ``J`` particles per item follows the probability-flow ODE in variance-exploding units
(``x = x0 + sigma n``, Euler ``x <- x + (sigma' - sigma) (x - D(x, sigma)) / sigma``) on EDM's poly-``rho`` grid
from ``sigma_max`` to ``sigma_min`` (then 0).  At the levels ``i`` of a window (``threshold_start n < i <
n - int(threshold_end n)``) the particles first take ``num_updates`` ensemble-Kalman steps: each particle is
mapped to a clean estimate ``x0_j`` by an Euler ODE of ``min(1 + (n - i) // factor, max_inner)`` steps from its
level, ``y_j = H(x0_j)``, and with ``e_j = y_j - y``, ``C_jk = <e_j, y_k - mean(y)> / J``,

    x_j <- x_j - lr sum_k C_jk (x_k - mean(x)),    lr = guidance_scale / ||C||_F

(enkg.py:94-130).  Its noise levels are snapped to the prior's discrete grid (as DAPS's ``time_input=grid``);
consecutive duplicates are one level.  A call returns one ensemble member per item (``draws_per_system``:
members of one pooled ensemble for items sharing ``y``).  NFE per image: ``J`` x (main steps + the inner ODE
steps of every update), counted through ``prior.nfe``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from reddiff.baselines.daps import poly_grid, snap, ve_sigmas
from reddiff.core.errors import SamplerInputError
from reddiff.samplers.base import Sampler, validate_steps


def _int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"enkg: {name} must be an integer >= {lo}, got {v!r}")
    return v


def _pos(name: str, v) -> float:
    v = float(v)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"enkg: {name} must be finite and > 0, got {v}")
    return v


class EnKG(Sampler):
    """Ensemble Kalman diffusion guidance (derivative-free; any operator with ``forward``).

    Args:
        steps: levels of the main ODE before snapping (official 80, configs/algorithm/enkg.yaml).
        particles: ensemble size ``J`` per item (official 2048 / 1024, enkg.yaml).
        num_updates: Kalman updates per level in the window (official 2, enkg.yaml).
        guidance_scale: step ``lr ||C||_F`` (official 2.0, enkg.yaml).
        lr_min_ratio: > 0 decays the scale linearly in i (official 0.0 for Navier-Stokes, enkg.py:87-91).
        threshold_start, threshold_end: fractions of levels without updates at each end (official 0.05, enkg.yaml).
        factor: inner ODE steps ``min(1 + (n - i) // factor, max_inner)`` (official 4, enkg.py:67; InverseBench 8).
        max_inner: most inner ODE steps (official 20, enkg.py:67).
        sigma_max, sigma_min, rho: the EDM grid (official 80, 0.002, 7, enkg.yaml).
        draws_per_system: 1 (one ensemble per item), k > 1 (k items sharing y pool one ensemble and get k members),
            0 (all ``particles`` members).
        chunk_elements: most particle entries per network call (0: all at once).
    """

    name = "enkg"
    requires: tuple = ()
    needs_grad = False
    per_item = ()
    test_overrides = {"particles": 4}
    # GMM (benchmarks.gmm_posterior --tune --samplers enkg, tuning seed; docs/SAMPLERS.md#enkg): pooled ensembles
    gmm_hparams = {"particles": 100, "draws_per_system": 0, "steps": 40, "guidance_scale": 2.0, "num_updates": 2,
                   "threshold_start": 0.05, "threshold_end": 0.05}
    gmm_tune_grid = {"particles": [100], "draws_per_system": [0], "steps": [40],
                     "guidance_scale": [0.5, 1.0, 2.0, 4.0], "num_updates": [1, 2]}
    # reddiff.tune.sweeper (unverified: around the official 2.0 and 2)
    tune_space = {"guidance_scale": "tag(log, interval(0.25, 8.0))", "num_updates": "choice(1, 2, 3)"}

    def __init__(self, steps: int = 30, particles: int = 16, num_updates: int = 2, guidance_scale: float = 2.0,
                 lr_min_ratio: float = 0.0, threshold_start: float = 0.05, threshold_end: float = 0.05,
                 factor: int = 4, max_inner: int = 20, sigma_max: float = 80.0, sigma_min: float = 0.002,
                 rho: float = 7.0, draws_per_system: int = 1, chunk_elements: int = 2 ** 17, log_every: int = 10):
        self.steps = validate_steps("enkg", steps)
        self.particles = _int("particles", particles, 2)
        self.num_updates = _int("num_updates", num_updates, 0)
        self.guidance_scale = _pos("guidance_scale", guidance_scale)
        if not 0.0 <= float(lr_min_ratio) <= 1.0:
            raise ValueError(f"enkg: lr_min_ratio must be in [0, 1], got {lr_min_ratio}")
        self.lr_min_ratio = float(lr_min_ratio)
        for key, v in (("threshold_start", threshold_start), ("threshold_end", threshold_end)):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"enkg: {key} must be in [0, 1], got {v}")
        self.threshold_start, self.threshold_end = float(threshold_start), float(threshold_end)
        self.factor, self.max_inner = _int("factor", factor, 1), _int("max_inner", max_inner, 1)
        self.sigma_max, self.sigma_min, self.rho = _pos("sigma_max", sigma_max), _pos("sigma_min", sigma_min), \
            _pos("rho", rho)
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"enkg: sigma_min must be below sigma_max, got {sigma_min} >= {sigma_max}")
        self.draws_per_system = _int("draws_per_system", draws_per_system, 0)
        self.chunk_elements = _int("chunk_elements", chunk_elements, 0)
        self.log_every = max(1, int(log_every))

    # ------------------------------------------------------------------ plan (levels snapped to the prior's grid)
    def _snapped(self, sig, s_hi: float, s_lo: float, n: int) -> list[int]:
        out: list[int] = []
        for s in poly_grid(s_hi, s_lo, n, self.rho):
            t = snap(s, sig)
            if not out or t != out[-1]:
                out.append(t)
        return out

    def plan(self, prior) -> list[tuple[int, list[int]]]:
        """Per main level ``(t, inner)``: ``inner`` the snapped levels of one update's clean-estimate ODE (empty
        outside the window); each level is one Euler step, one network call per particle."""
        self.check_prior(prior)
        sig = ve_sigmas(prior.schedule)
        if self.sigma_max > float(sig[-1]) * 1.01:
            raise ValueError(f"enkg: sigma_max={self.sigma_max:g} exceeds the prior's largest noise level "
                             f"{float(sig[-1]):.4g}")
        levels = self._snapped(sig, self.sigma_max, self.sigma_min, self.steps)
        n, out = len(levels), []
        for i, t in enumerate(levels):
            inner: list[int] = []
            if self.threshold_start * n < i < n - int(self.threshold_end * n) and self.num_updates > 0:
                m = min(1 + (n - i) // self.factor, self.max_inner)
                inner = [t] if m == 1 else self._snapped(sig, float(sig[t]), 0.002, m)
            out.append((t, inner))
        return out

    def expected_nfe(self, prior) -> int:
        per = sum(1 + self.num_updates * len(inner) for _, inner in self.plan(prior))
        return per * self.particles // (self.draws_per_system or self.particles)

    # ------------------------------------------------------------------ pieces
    def _eps(self, x: torch.Tensor, t: int, prior, a: float) -> torch.Tensor:
        """``eps(sqrt(a) x, t)`` for the VE particles ``(J, B, n)``, in chunks; ``J`` evaluations per image."""
        J, B, n = x.shape
        per = J if self.chunk_elements == 0 else max(1, self.chunk_elements // max(1, B * n))
        out, calls = torch.empty_like(x), 0
        for j0 in range(0, J, per):
            j1 = min(J, j0 + per)
            xc = (math.sqrt(a) * x[j0:j1]).reshape((-1,) + tuple(prior.shape))
            out[j0:j1] = prior.eps(xc, t).reshape(j1 - j0, B, n)
            calls += 1
        prior.nfe += J - calls
        return out

    def _ode(self, x, ts, sig, prior):
        """Euler steps of the PF-ODE through the levels ``ts`` and then sigma = 0."""
        for k, t in enumerate(ts):
            s, s_next = float(sig[t]), float(sig[ts[k + 1]]) if k + 1 < len(ts) else 0.0
            x = x + (s_next - s) * self._eps(x, t, prior, float(prior.schedule.alpha_bar_at(t)))
        return x

    @staticmethod
    def _forward(operator, x0: torch.Tensor, prior) -> torch.Tensor:
        """``H`` on every particle, one slab of B rows at a time (operators with per-image state)."""
        J, B, n = x0.shape
        return torch.stack([operator.forward(x0[j].reshape((B,) + tuple(prior.shape))).reshape(B, -1)
                            for j in range(J)])

    def kalman_step(self, x: torch.Tensor, ys: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        """One ensemble-Kalman update of ``x`` ``(J, B, n)`` from the particles' measurements ``ys`` ``(J, B, m)``."""
        J = x.shape[0]
        xd = (x - x.mean(0, keepdim=True)).transpose(0, 1)                 # (B, J, n)
        yd = (ys - ys.mean(0, keepdim=True)).transpose(0, 1)               # (B, J, m)
        err = (ys - y[None]).transpose(0, 1)                               # (B, J, m): 0.5 grad ||y_j - y||^2
        C = err @ yd.transpose(1, 2) / J                                   # (B, J, J)
        norm = torch.linalg.matrix_norm(C)                                 # Frobenius, per item
        lr = torch.where(norm > 0, scale / norm.clamp_min(1e-300), torch.zeros_like(norm))
        return x - (lr[:, None, None] * (C @ xd)).transpose(0, 1)

    def lr(self, i: int, n: int) -> float:
        if self.lr_min_ratio > 0.0:
            return self.guidance_scale * (1 - self.lr_min_ratio) * (n - i) / n + self.lr_min_ratio
        return self.guidance_scale

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def run(self, y: torch.Tensor, operator, prior, rng, callback: Optional[Callable] = None) -> torch.Tensor:
        """The ensembles at sigma = 0, ``(B, J, *shape)``."""
        self.check(operator)
        plan = self.plan(prior)
        sig = ve_sigmas(prior.schedule)
        B, J, n = y.shape[0], self.particles, math.prod(prior.shape)
        yf = y.reshape(B, -1).to(torch.float64)
        x = float(sig[plan[0][0]]) * rng.randn((B, J, n), dtype=y.dtype).to(y.device).transpose(0, 1).contiguous()
        last = len(plan) - 1
        for i, (t, inner) in enumerate(plan):
            for _ in range(self.num_updates if inner else 0):
                ys = self._forward(operator, self._ode(x, inner, sig, prior), prior).to(torch.float64)
                x = self.kalman_step(x.to(torch.float64), ys, yf, self.lr(i, len(plan))).to(y.dtype)
            s_next = float(sig[plan[i + 1][0]]) if i < last else 0.0        # one Euler step of the main ODE
            x = x + (s_next - float(sig[t])) * self._eps(x, t, prior, float(prior.schedule.alpha_bar_at(t)))
            if callback is not None and self.should_log(i, last):
                callback(i, {"t": t, "spread": x.std(0).mean().item()})
        return x.transpose(0, 1).reshape((B, J) + tuple(prior.shape))

    def sample(self, y: torch.Tensor, operator, prior, rng, callback: Optional[Callable] = None) -> torch.Tensor:
        """One ensemble member per item; with ``draws_per_system = k > 1`` (0: ``particles``) each run of ``k``
        consecutive items sharing ``y`` pools one ensemble and gets ``k`` of its members."""
        k, B = self.draws_per_system or self.particles, y.shape[0]
        if k > self.particles:
            raise SamplerInputError(f"enkg: draws_per_system={k} exceeds the ensemble size {self.particles}")
        if k > 1:
            if B % k:
                raise SamplerInputError(f"enkg: draws_per_system={k} must divide the batch size {B}")
            if getattr(operator, "per_image", False):
                raise SamplerInputError("enkg: draws_per_system > 1 needs an operator without per-image state")
            groups = y.reshape((B // k, k) + tuple(y.shape[1:]))
            if not torch.equal(groups, groups[:, :1].expand_as(groups)):
                raise SamplerInputError(f"enkg: the {k} items pooled into one ensemble (draws_per_system) must "
                                        f"share their measurement (1 keeps one ensemble per item)")
            y, rng = groups[:, 0].contiguous(), rng.select(range(0, B, k))
        x = self.run(y, operator, prior, rng, callback)
        return x[:, :k].reshape((B,) + tuple(x.shape[2:])).contiguous()
