"""DDNM / DDNM+: denoising diffusion null-space model (Wang, Yu, Zhang, ICLR 2023, arXiv 2212.00490).

Each step denoises ``x_t`` to Tweedie's ``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``, replaces its range-space
part by the measurement's, and takes a simplified DDIM step to the next visited timestep ``s``:

    noiseless (DDNM):   x0c = x0 - A^+ (A x0 - y)              = A^+ y + (I - A^+ A) x0
                        x_s = sqrt(a_s) x0c + sqrt(1 - a_s) (eta z + sqrt(1 - eta^2) eps)

    noisy (DDNM+), in the SVD basis of ``A = U S V^T`` with ``c_i = sigma_y / s_i`` (the noise of ``yb = S^+ U^T y``)
    and ``a = sqrt(a_s)``, ``sig = sqrt(1 - a_s)``:
                        x0c = x0 - V Lambda V^T A^+ (A x0 - y),   Lambda_i = 1 if sig >= a c_i
                                                                  else sqrt(1 - eta^2) sig / (a c_i)
                        x_s = a x0c + V (d1 * zb + d2 * V^T eps)
        missing (s_i = 0):     d1 = eta sig,                   d2 = sqrt(1 - eta^2) sig
        sig <  a c_i:          d1 = eta sig,                   d2 = 0
        sig >= a c_i:          d1 = sqrt(sig^2 - a^2 c_i^2),   d2 = 0

(paper Eqs. 17-19; code ``functions/svd_ddnm.py:40-66`` (DDNM) and ``:123-131`` (DDNM+), the ``Lambda`` /
``Lambda_noise`` methods of each class in ``functions/svd_operators.py``, e.g. ``SuperResolution`` ``:535-623``,
``Inpainting`` ``:361-439``).
The chain starts from ``x_T ~ N(0, I)`` (``guided_diffusion/diffusion.py:578-584``) and ends with ``a_s = 1``
(``svd_ddnm.py:38``), so a noiseless result satisfies ``A x = y`` to float precision.

Time travel (paper Sec. 3.3; RePaint's jump schedule, ``svd_ddnm.py:167-190``): with ``travel_length`` l and
``travel_repeat`` r, at every l-th strided step the chain jumps back up l steps r - 1 times and re-descends.  The
official defaults ``l = 1, r = 1`` (``configs/imagenet_256.yml:44-47``) switch it off.  ``travel_from="xt"``
(default) jumps with the forward process ``q(x_{t+l} | x_t)``, which preserves the marginal of ``x_t``;
``travel_from="x0"`` re-noises the last *unprojected* ``x0`` to level ``t + l``, as the official code does
(``svd_ddnm.py:69-76``).

Differences from the official code: one class for both versions (the official DDNM+ path is taken exactly when
``operator.noise_std > 0``, as ``guided_diffusion/diffusion.py:587-590``), per-image singulars and RNG streams,
and a component with ``sig == a c_i`` counts as ">=" (the official code keeps the default noise there).  The
DDNM+ ``d2`` term: ours is ``V diag(d2) V^T eps`` (basis-independent); the official ``SuperResolution``,
``Colorization`` and ``Deblurring`` classes read ``eps`` in the pixel layout as if it were spectral and apply only
``V`` (``svd_operators.py:579-581, 617``; ``:699, 733``; ``:1048-1049, 1086-1088``; ``Inpainting``'s V is a
permutation, so it agrees there, ``:395-398``): ``eps_basis="pixel"`` (``compat.ddnm_eps_basis``) uses
``V diag(d2) eps`` with ``eps`` flattened in our operator's own layout.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from reddiff.samplers.base import Sampler, validate_spacing, validate_steps

TRAVEL_FROM = ("xt", "x0")
EPS_BASES = ("spectral", "pixel")


def travel_schedule(n: int, length: int, repeat: int) -> list[int]:
    """Strided indices ``n-1 -> -1`` with RePaint-style jumps: at each index ``j`` in ``range(0, n - length,
    length)`` the chain goes back up ``length`` indices, ``repeat - 1`` times.  Consecutive entries differ by 1."""
    left = {j: repeat - 1 for j in range(0, n - length, length)}
    seq, k = [n], n
    while k > 0:
        k -= 1
        seq.append(k)
        if left.get(k, 0) > 0:
            left[k] -= 1
            for _ in range(length):
                k += 1
                seq.append(k)
    return seq[1:] + [-1]


class DDNM(Sampler):
    """DDNM (noiseless y) / DDNM+ (noisy y); needs an SVD operator.

    Args:
        steps: strided timesteps (``T_sampling``, 100 in the official config); NFE = steps + the time-travel
            re-descents.
        eta: the fresh-noise fraction of the simplified DDIM step (0.85, official ``--eta``).
        travel_length: time-travel jump ``l`` (1: official default).
        travel_repeat: time-travel repeats ``r`` (1: off, official default).
        travel_from: "xt" (forward process from the current state) or "x0" (official code).
        eps_basis: DDNM+ noise term ``V diag(d2) V^T eps`` ("spectral") or ``V diag(d2) eps`` ("pixel", official).
        spacing: timestep spacing, "default" or "official" (``compat.timesteps``).
        log_every: callback every ``log_every`` network calls and at the last one.
    """

    name = "ddnm"
    requires = ("svd",)
    # tuned on the GMM tuning seed (2026-12-01): python -m benchmarks.gmm_posterior --tune --samplers ddnm
    #   --dims 8,80 --dims-y 1,4 --problems 3 --samples 500 -> eta 1.0 (score 0.516; 0.85: 0.579, 0: 0.745)
    gmm_hparams = {"eta": 1.0}
    gmm_tune_grid = {"eta": [0.0, 0.5, 0.85, 1.0]}
    tune_space = {"eta": "interval(0.0, 1.0)"}  # reddiff.tune.sweeper (unverified: the whole range, official 0.85 inside)
    # DDNM+ is not exact for a Gaussian prior with noisy y; the noiseless case is checked in tests/test_ddnm.py

    def __init__(self, steps: int = 100, eta: float = 0.85, travel_length: int = 1, travel_repeat: int = 1,
                 travel_from: str = "xt", eps_basis: str = "spectral", spacing: str = "default",
                 log_every: int = 10):
        self.steps = validate_steps("ddnm", steps)
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"ddnm: eta must be in [0, 1], got {eta}")
        for key, v in (("travel_length", travel_length), ("travel_repeat", travel_repeat)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ddnm: {key} must be an integer >= 1, got {v!r}")
        if travel_from not in TRAVEL_FROM:
            raise ValueError(f"ddnm: travel_from must be one of {', '.join(TRAVEL_FROM)}, got {travel_from!r}")
        if eps_basis not in EPS_BASES:
            raise ValueError(f"ddnm: eps_basis must be one of {', '.join(EPS_BASES)}, got {eps_basis!r}")
        self.eps_basis = eps_basis
        self.eta = float(eta)
        self.travel_length = int(travel_length)
        self.travel_repeat = int(travel_repeat)
        self.travel_from = travel_from
        self.spacing = validate_spacing("ddnm", spacing)
        self.log_every = max(1, int(log_every))

    # ------------------------------------------------------------------ schedule
    def schedule(self, prior) -> list[tuple[int, int]]:
        """``(t, s)`` pairs over the visited timesteps (``-1``: the clean end); ``s < t`` is a denoising step
        (one network call), ``s > t`` a time-travel jump (no network call)."""
        base = self.timesteps(prior, "ascending")                 # t of strided index k = base[k]
        if self.travel_length >= len(base) and self.travel_repeat > 1:
            raise ValueError(f"ddnm: travel_length ({self.travel_length}) must be smaller than the number of "
                             f"steps ({len(base)})")
        idx = travel_schedule(len(base), self.travel_length, self.travel_repeat)
        ts = [base[k] if k >= 0 else -1 for k in idx]
        return list(zip(ts[:-1], ts[1:]))

    def expected_nfe(self, prior) -> int:
        return sum(1 for t, s in self.schedule(prior) if s < t)

    # ------------------------------------------------------------------ sampling
    def _spectral(self, y, operator, n, dtype, device):
        """Singulars padded to ``n`` ((1 or B, n)), observed mask, and ``yb = S^+ U^T y`` ((B, n))."""
        s_k = operator.singulars().to(dtype=dtype, device=device)
        s_k = s_k.reshape(1, -1) if s_k.ndim == 1 else s_k
        k = s_k.shape[1]
        s = s_k.new_zeros(s_k.shape[0], n)
        s[:, :k] = s_k
        obs = s > 0
        s_safe = torch.where(obs, s, torch.ones_like(s))
        yb = torch.zeros(y.shape[0], n, dtype=dtype, device=device)
        yb[:, :k] = operator.Ut(y)[:, :k]
        return s, obs, torch.where(obs, yb / s_safe, torch.zeros_like(yb)), s_safe

    @torch.no_grad()
    def sample(self, y: torch.Tensor, operator, prior, rng, callback: Optional[Callable] = None) -> torch.Tensor:
        self.check(operator)
        pairs = self.schedule(prior)
        sch = prior.schedule
        B = y.shape[0]
        shape = (B,) + tuple(prior.shape)
        n = math.prod(prior.shape)
        dtype, device = y.dtype, y.device
        sig_y = float(operator.noise_std)
        eta, ceta = self.eta, math.sqrt(1.0 - self.eta ** 2)
        if sig_y > 0:
            s, obs, yb, s_safe = self._spectral(y, operator, n, dtype, device)
            c = torch.where(obs, sig_y / s_safe, torch.zeros_like(s))          # noise std of yb
        x = self.init_noise(rng, y, prior)
        x0_raw = None
        calls = sum(1 for t, s_ in pairs if s_ < t)
        done = 0
        for t, nxt in pairs:
            a_s = float(sch.alpha_bar_at(nxt))
            if nxt > t:                                                    # time travel back up
                z = rng.randn(shape, dtype=dtype).to(device)
                if self.travel_from == "x0":
                    x = math.sqrt(a_s) * x0_raw + math.sqrt(1 - a_s) * z
                else:
                    r = a_s / float(sch.alpha_bar_at(t))                   # q(x_s | x_t) = N(sqrt(r) x_t, 1 - r)
                    x = math.sqrt(r) * x + math.sqrt(max(1.0 - r, 0.0)) * z
                continue
            a_t = float(sch.alpha_bar_at(t))
            eps = prior.eps(x, t)
            x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            x0_raw = x0
            a, sig = math.sqrt(a_s), math.sqrt(1 - a_s)
            if sig_y == 0:                                                 # DDNM, Eq. 13
                x0c = x0 - operator.pinv(operator.forward(x0) - y).reshape(shape)
                z = rng.randn(shape, dtype=dtype).to(device)
                x = a * x0c + sig * (eta * z + ceta * eps)
            else:                                                          # DDNM+, Eqs. 17-19
                x0b = operator.Vt(x0)
                resb = torch.where(obs, x0b - yb, torch.zeros_like(x0b))  # V^T A^+ (A x0 - y)
                large = obs & (sig >= a * c)                               # diffusion noise dominates
                lam = torch.where(large | ~obs, torch.ones_like(c), ceta * sig / (a * c).clamp_min(1e-30))
                d1 = torch.where(obs & large, (sig ** 2 - (a * c) ** 2).clamp_min(0).sqrt(),
                                 torch.full_like(c, eta * sig))
                d2 = torch.where(obs, torch.zeros_like(c), torch.full_like(c, ceta * sig))
                zb = rng.randn((B, n), dtype=dtype).to(device)
                x0cb = x0b - lam * resb
                epsb = operator.Vt(eps) if self.eps_basis == "spectral" else eps.reshape(B, n)
                x = operator.V(a * x0cb + d1 * zb + d2 * epsb).reshape(shape)
            if callback is not None and self.should_log(done, calls - 1):
                callback(done, {"t": t, "x0": x0})
            done += 1
        return x
