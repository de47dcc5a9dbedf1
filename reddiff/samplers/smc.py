"""Sequential Monte Carlo in the SVD basis of a linear operator: the loop shared by MCG-diff and FPS-SMC.

State: ``N`` particles per batch item in the spectral coordinates ``z = V^T x`` (shape ``(N, B, n)``,
particle-major, so rows ``[j*B:(j+1)*B]`` are particle ``j`` of every item and an operator with per-image state
always sees the batch it was set up for).  Each item is its own particle system; every random draw comes from the
harness :class:`~reddiff.core.rng.BatchRNG` with the item first, so a batch equals a loop over its items.

With ``H = U diag(s) V^T``, ``y_hat_i = (U^T y)_i / s_i`` on the ``s_i > 0`` coordinates is ``x0_i`` plus noise of
variance ``r_i = sigma_y^2 / s_i^2``.  A subclass defines, at every level ``L`` of the chain (level 0 = the first
visited timestep, level ``S`` = the clean signal, ``alpha_bar = 1``), a Gaussian potential on the observed
coordinates, ``g_L(z_i) = N(c_{L,i}; z_i, v_{L,i})`` on an active set, and the noise std of the backward kernel.
One step L-1 -> L (network at ``t = ts[L-1]``; ``m`` the DDIM mean, ``sig`` its noise std) is the fully adapted
auxiliary particle filter:

    log w += sum_{i active} log N(c_{L,i}; m_i, sig^2 + v_{L,i})  [ - log g_{L-1}(z_i)  if ``divide_previous`` ]
    resample ancestors by w (when ESS < ess_threshold N), then per coordinate
    z_i ~ N(m_i + K_i (c_{L,i} - m_i), K_i v_{L,i}),  K_i = sig^2 / (sig^2 + v_{L,i})    (active)
    z_i ~ N(m_i, sig^2)                                                             (others)

A deterministic last step (``sig = 0``, DDIM/DDPM into alpha_bar = 1) uses ``sig^2 = 1 - a_t`` on the active
coordinates only, so that a clean-level potential (noiseless data) acts on them instead of only reweighting: the
gain is ``(1 - a_t) / (1 - a_t + v)``, so a potential variance ``v`` far below ``1 - a_t`` pins them.
Level 0 draws ``z ~ N(0, I) g_0`` exactly (``p(x_T) ~ N(0, I)``), so the weights start uniform.

Official forms kept switchable (class attributes set by the subclasses from their ``compat`` keys; defaults ours):
``init_draw="prior"`` (plain ``N(0, I)`` at level 0, MCG-diff), ``order="draw_first"`` (draw every particle from
the proposal, weight the drawn state by ``g(z) p(z | x) / q(z)``, then copy the survivors, FPS-SMC),
``clip_x0`` (x0_hat clamped to [-1, 1] in pixel space), ``gain_jitter`` (a constant added to the kernel variance in
the gain), ``last_step="x0_hat"`` (the last step returns x0_hat unconditioned and unweighted), ``end="t0"``
(stop at the last visited timestep, one network call fewer, and divide its potential out of the final weights,
MCG-diff) and, through :meth:`step_potential`, a proposal variance other than the weight's.  Constants of the
Gaussian log-densities that are equal for all particles of an item are dropped (they cancel on normalising).
The network runs on chunks of at most ``chunk_elements`` particle entries (whole particle slabs of B rows; 0: all at
once), and ``prior.nfe`` is kept honest per image: ``N`` evaluations per step.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from reddiff.core.errors import SamplerInputError
from reddiff.samplers.base import Sampler, validate_spacing, validate_steps

RESAMPLING = ("multinomial", "systematic")


#: particle-state tensors of shape ``(N, B, n)`` alive at once in :meth:`SpectralSMC.run` (z, eps, x0, the kernel
#: mean, its resampled copy, the noise)
STATE_COPIES = 6


def available_bytes(device) -> Optional[int]:
    """Free memory for tensors on ``device``: the GPU's free memory, or the host's ``MemAvailable``; None when
    unknown (then nothing is refused)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class SpectralSMC(Sampler):
    """Base of the particle samplers (not registered itself). Subclasses implement :meth:`setup_potentials`,
    :meth:`potential` and :meth:`kernel_std`."""

    requires = ("svd",)
    divide_previous: bool = False
    init_draw: str = "product"          # product: N(0, I) g_0 | prior: N(0, I)
    order: str = "adapted"              # adapted: weight, resample, draw | draw_first: draw, weight, copy
    clip_x0: bool = False
    gain_jitter: float = 0.0
    last_step: str = "condition"        # condition | x0_hat
    end: str = "clean"                  # clean: run into alpha_bar = 1 | t0: stop at the last visited timestep

    def __init__(self, steps: int, particles: int, resampling: str = "multinomial", ess_threshold: float = 1.0,
                 chunk_elements: int = 2 ** 17, spacing: str = "default", log_every: int = 10,
                 draws_per_system: int = 1):
        self.steps = validate_steps(self.name, steps)
        if isinstance(particles, bool) or not isinstance(particles, int) or particles < 1:
            raise ValueError(f"{self.name}: particles must be an integer >= 1, got {particles!r}")
        if resampling not in RESAMPLING:
            raise ValueError(f"{self.name}: resampling must be one of {', '.join(RESAMPLING)}, got {resampling!r}")
        if not 0.0 < float(ess_threshold) <= 1.0:
            raise ValueError(f"{self.name}: ess_threshold must be in (0, 1], got {ess_threshold}")
        if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int) or chunk_elements < 0:
            raise ValueError(f"{self.name}: chunk_elements must be an integer >= 0 (0: no chunking), "
                             f"got {chunk_elements!r}")
        if isinstance(draws_per_system, bool) or not isinstance(draws_per_system, int) or draws_per_system < 0:
            raise ValueError(f"{self.name}: draws_per_system must be an integer >= 0 (0: all the particles), "
                             f"got {draws_per_system!r}")
        self.particles = particles
        self.draws_per_system = draws_per_system
        self.resampling = resampling
        self.ess_threshold = float(ess_threshold)
        self.chunk_elements = chunk_elements
        self.spacing = validate_spacing(self.name, spacing)
        self.log_every = max(1, int(log_every))

    # ------------------------------------------------------------------ subclass hooks
    def setup_potentials(self, ctx: dict, rng) -> None:  # pragma: no cover - abstract
        """Fill ``ctx`` with whatever :meth:`potential` needs (called once, after the spectral setup)."""
        raise NotImplementedError

    def potential(self, ctx: dict, L: int):  # pragma: no cover - abstract
        """``(c, v, active)`` at level ``L``: centres ``(B, k)``, variances and active mask ``(B or 1, k)``."""
        raise NotImplementedError

    def kernel_std(self, a_t: float, a_s: float) -> float:  # pragma: no cover - abstract
        """Noise std of the backward kernel from ``alpha_bar = a_t`` to ``a_s``."""
        raise NotImplementedError

    def step_potential(self, ctx: dict, i: int):
        """``(c, v_weight, v_proposal, active)`` of step ``i`` (level i -> i+1): the potential at level i+1."""
        c, v, act = self.potential(ctx, i + 1)
        return c, v, v, act

    def start(self, ctx: dict, z: torch.Tensor) -> torch.Tensor:
        """Level-0 particles from the standard normals ``z`` ``(N, B, n)``: ``N(0, I) g_0`` or ``N(0, I)``."""
        if self.init_draw == "prior":
            return z
        k = ctx["k"]
        c, v, act = self.potential(ctx, 0)
        z0 = z[:, :, :k].to(torch.float64)
        Kp = 1.0 / (1.0 + v)
        z[:, :, :k] = torch.where(act, Kp * c + (Kp * v).sqrt() * z0, z0).to(z.dtype)
        return z

    def state_bytes(self, systems: int, n: int, dtype=torch.float32) -> int:
        """Bytes of the particle state of ``systems`` particle systems on ``n`` values each (see STATE_COPIES)."""
        return STATE_COPIES * int(systems) * self.particles * int(n) * torch.empty((), dtype=dtype).element_size()

    def check_memory(self, systems: int, n: int, device, dtype=torch.float32) -> None:
        """Refuse, before any network evaluation, a particle state that does not fit in the free memory."""
        need, free = self.state_bytes(systems, n, dtype), available_bytes(device)
        if free is not None and need > free:
            raise SamplerInputError(
                f"{self.name}: {self.particles} particles x {systems} system(s) x {n} values need about "
                f"{need / 2 ** 30:.1f} GiB of {torch.device(device).type} memory, {free / 2 ** 30:.1f} GiB free; lower "
                f"sampler.particles (or batch_size)")

    def check_prior(self, prior) -> None:
        """The base checks, then the memory of one particle system on the prior's sample shape."""
        super().check_prior(prior)
        if getattr(prior, "shape", None):  # a prior without a sample shape (a bare schedule) has no state to size
            self.check_memory(1, math.prod(prior.shape), getattr(prior, "device", None) or "cpu")

    def expected_nfe(self, prior) -> int:
        return (len(self.timesteps(prior)) - (self.end == "t0")) * self.particles

    # ------------------------------------------------------------------ helpers
    def _spectral(self, y, operator, prior) -> dict:
        """Observed coordinates (the first k spectral entries with s > 0), ``y_hat`` and ``r = sigma_y^2/s^2``."""
        dtype, device = y.dtype, y.device
        s = operator.singulars().to(device=device, dtype=torch.float64)
        s = s.reshape(1, -1) if s.ndim == 1 else s
        obs = s > 0
        s_safe = torch.where(obs, s, torch.ones_like(s))
        k = s.shape[1]
        uty = operator.Ut(y).to(torch.float64)[:, :k]
        y_hat = torch.where(obs, uty / s_safe, torch.zeros_like(uty))
        sig2 = float(operator.noise_std) ** 2
        r = torch.where(obs, sig2 / s_safe ** 2, torch.zeros_like(s))
        return {"k": k, "obs": obs, "s": s, "y_hat": y_hat, "r": r, "sig2": sig2, "dtype": dtype, "device": device,
                "n": math.prod(prior.shape), "B": y.shape[0]}

    def _apply(self, fn, z: torch.Tensor, B: int, per_image: bool) -> torch.Tensor:
        """``fn`` on the rows of ``z`` (a multiple of B), slab by slab for operators with per-image state."""
        if not per_image or z.shape[0] == B:
            return fn(z)
        return torch.cat([fn(z[i:i + B]) for i in range(0, z.shape[0], B)])

    def _eps_spectral(self, z: torch.Tensor, t: int, operator, prior, ctx) -> torch.Tensor:
        """``V^T eps(V z, t)`` for all particles ``(N, B, n)``, in chunks; counts N evaluations per image."""
        N, B, n = z.shape
        per_image = bool(getattr(operator, "per_image", False))
        per = N if self.chunk_elements == 0 else max(1, self.chunk_elements // max(1, B * n))
        out = torch.empty_like(z)
        calls = 0
        for j0 in range(0, N, per):
            j1 = min(N, j0 + per)
            zc = z[j0:j1].reshape(-1, n)
            x = self._apply(operator.V, zc, B, per_image).reshape((-1,) + tuple(prior.shape))
            eps = prior.eps(x, t)
            calls += 1
            out[j0:j1] = self._apply(operator.Vt, eps, B, per_image).reshape(j1 - j0, B, n)
        prior.nfe += N - calls
        return out

    def _resample(self, logw: torch.Tensor, rng) -> tuple[torch.Tensor, torch.Tensor]:
        """Ancestors ``(B, N)`` (identity where the ESS is high enough) and the log-weights after resampling."""
        B, N = logw.shape
        w = torch.softmax(logw, dim=1)
        ess = 1.0 / (w * w).sum(1)
        do = ess < self.ess_threshold * N * (1 - 1e-9)
        cdf = torch.cumsum(w, 1)
        cdf = cdf / cdf[:, -1:]
        if self.resampling == "systematic":
            u = (rng.rand((B, 1), dtype=torch.float64).to(logw.device) + torch.arange(N, device=logw.device)) / N
        else:
            u = rng.rand((B, N), dtype=torch.float64).to(logw.device)
        anc = torch.searchsorted(cdf, u.contiguous(), right=True).clamp_max(N - 1)
        ident = torch.arange(N, device=logw.device).expand(B, N)
        anc = torch.where(do[:, None], anc, ident)
        return anc, torch.where(do[:, None], torch.zeros_like(logw), logw)

    def _clip(self, x0b: torch.Tensor, operator, prior) -> torch.Tensor:
        """``V^T clamp(V x0b, -1, 1)`` for all particles ``(N, B, n)``."""
        N, B, n = x0b.shape
        per_image = bool(getattr(operator, "per_image", False))
        x = self._apply(operator.V, x0b.reshape(N * B, n), B, per_image).reshape((N * B,) + tuple(prior.shape))
        return self._apply(operator.Vt, x.clamp(-1.0, 1.0), B, per_image).reshape(N, B, n)

    @staticmethod
    def _gather(m: torch.Tensor, anc: torch.Tensor) -> torch.Tensor:
        """``m[anc[b, j], b]`` for ``m`` of shape ``(N, B, n)`` and ``anc`` ``(B, N)``."""
        N, B, n = m.shape
        rows = (anc.T * B + torch.arange(B, device=m.device)[None, :]).reshape(-1)
        return m.reshape(N * B, n).index_select(0, rows).reshape(N, B, n)

    def _reweight(self, logw, incr, ctx, i, act, zprev, rng):
        """Add the step's log-weight ``incr`` ``(N, B, k)`` (over the potential of level i for MCG-diff's
        ``divide_previous``) and resample: ``(log-weights, ancestors)``."""
        incr = incr.sum(-1)
        if self.divide_previous:
            cp, vp, _ = self.potential(ctx, i)
            incr = incr - torch.where(act, -0.5 * (zprev - cp) ** 2 / vp, torch.zeros_like(zprev)).sum(-1)
        anc, logw = self._resample(logw + incr.T, rng)
        return logw, anc

    def _draw(self, m, sig, K, var, c, act, rng):
        """``N(m, sig^2)`` per coordinate, ``N(m + K (c - m), var)`` on the active observed ones."""
        N, B, n = m.shape
        k = c.shape[-1]
        noise = rng.randn((B, N, n), dtype=m.dtype).to(m.device).transpose(0, 1)
        z = m + sig * noise
        mo = m[:, :, :k].to(torch.float64)
        zo = K * c + (1 - K) * mo + var.sqrt() * noise[:, :, :k].to(torch.float64)
        z[:, :, :k] = torch.where(act, zo, z[:, :, :k].to(torch.float64)).to(m.dtype)
        return z

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def run(self, y: torch.Tensor, operator, prior, rng, callback: Optional[Callable] = None):
        """All particles ``(B, N, *shape)`` at the clean level and their log-weights ``(B, N)`` (float64)."""
        self.check(operator)
        ts = self.timesteps(prior)
        sch = prior.schedule
        lv = [float(sch.alpha_bar_at(t)) for t in ts] + ([1.0] if self.end == "clean" else [])
        self.check_memory(y.shape[0], math.prod(prior.shape), y.device, y.dtype)
        ctx = self._spectral(y, operator, prior)
        ctx["levels"] = torch.tensor(lv, dtype=torch.float64)
        self.setup_potentials(ctx, rng)
        B, n, k, N = ctx["B"], ctx["n"], ctx["k"], self.particles
        dtype, device = ctx["dtype"], ctx["device"]

        # level 0: z ~ N(0, I) g_0 by default (exact product of Gaussians, uniform weights)
        z = self.start(ctx, rng.randn((B, N, n), dtype=dtype).to(device).transpose(0, 1).contiguous())
        logw = torch.zeros(B, N, dtype=torch.float64, device=device)

        last = len(lv) - 2
        for i, t in enumerate(ts[:last + 1]):
            a_t, a_s = lv[i], lv[i + 1]
            sig = float(self.kernel_std(a_t, a_s))
            c2 = math.sqrt(max(1.0 - a_s - sig * sig, 0.0))
            eb = self._eps_spectral(z, t, operator, prior, ctx)
            x0b = (z - math.sqrt(1 - a_t) * eb) / math.sqrt(a_t)
            if self.clip_x0:
                x0b = self._clip(x0b, operator, prior)
            m = math.sqrt(a_s) * x0b + c2 * eb
            if i == last and self.last_step == "x0_hat":           # a_s = 1: m is x0_hat; no weight, no draw
                z = m
            else:
                c, v, vq, act = self.step_potential(ctx, i)
                # a deterministic last step (sig = 0) gives the observed coordinates the kernel variance 1 - a_t
                # (Tweedie's scale), so that a potential at the clean level can still pin them
                sig_o = sig if sig > 0 else math.sqrt(1 - a_t)
                P = sig_o * sig_o + self.gain_jitter
                K = P / (P + vq)                                       # gain; the draw's variance:
                var = K * vq * (sig_o * sig_o / P)                     # sig_o^2 vq / (P + vq)
                zprev = z[:, :, :k].to(torch.float64)
                if self.order == "adapted":
                    mo = m[:, :, :k].to(torch.float64)
                    incr = torch.where(act, -0.5 * (mo - c) ** 2 / (sig_o * sig_o + v), torch.zeros_like(mo))
                    logw, anc = self._reweight(logw, incr, ctx, i, act, zprev, rng)
                    z = self._draw(self._gather(m, anc), sig, K, var, c, act, rng)
                else:
                    z = self._draw(m, sig, K, var, c, act, rng)
                    mo, zo = m[:, :, :k].to(torch.float64), z[:, :, :k].to(torch.float64)
                    mu = K * c + (1 - K) * mo                          # log g(z) + log p(z | x) - log q(z)
                    lq = (zo - mu) ** 2 * (1.0 / (sig_o * sig_o) + 1.0 / vq)
                    incr = -0.5 * ((zo - c) ** 2 / v + (zo - mo) ** 2 / (sig_o * sig_o) - lq)
                    logw, anc = self._reweight(logw, torch.where(act, incr, torch.zeros_like(incr)), ctx, i, act,
                                               zprev, rng)
                    z = self._gather(z, anc)
            if callback is not None and self.should_log(i, last):
                w = torch.softmax(logw, 1)
                callback(i, {"t": t, "ess": (1.0 / (w * w).sum(1)).mean().item()})
        if self.end == "t0" and self.divide_previous:          # the chain stops at a level with a potential:
            cp, vp, act = self.potential(ctx, last + 1)        # divide it out of the final weights
            zo = z[:, :, :k].to(torch.float64)
            logw = logw + torch.where(act, 0.5 * (zo - cp) ** 2 / vp, torch.zeros_like(zo)).sum(-1).T
        per_image = bool(getattr(operator, "per_image", False))
        x = self._apply(operator.V, z.reshape(N * B, n), B, per_image).reshape((N, B) + tuple(prior.shape))
        return x.transpose(0, 1), logw

    def sample(self, y: torch.Tensor, operator, prior, rng, callback: Optional[Callable] = None) -> torch.Tensor:
        """Posterior draws, one per item.

        ``draws_per_system = 1`` (default, as the official scripts): every item runs its own system and returns one
        particle drawn by the final weights, so the items are independent draws.  ``draws_per_system = k > 1``:
        each run of ``k`` consecutive items with the same measurement shares one system of ``particles`` particles
        and gets ``k`` draws from its weighted particle cloud (systematic resampling; with ``k = particles``,
        ``draws_per_system = 0``, and uniform final weights, the particles themselves).  The draws are then the
        SMC estimate of the posterior, dependent through the resampling, at ``particles / k`` network evaluations
        per draw and step instead of ``particles``.  The systems draw from the generators of their first items.
        """
        k, B = self.draws_per_system or self.particles, y.shape[0]
        if k > 1:
            if B % k:
                raise SamplerInputError(f"{self.name}: draws_per_system={k} must divide the batch size {B}")
            if getattr(operator, "per_image", False):
                raise SamplerInputError(f"{self.name}: draws_per_system > 1 needs an operator without per-image "
                                        f"state")
            groups = y.reshape((B // k, k) + tuple(y.shape[1:]))
            if not torch.equal(groups, groups[:, :1].expand_as(groups)):
                raise SamplerInputError(f"{self.name}: the {k} items pooled into one particle system "
                                        f"(draws_per_system) must share their measurement (1 keeps one system "
                                        f"per item)")
            y, rng = groups[:, 0].contiguous(), rng.select(range(0, B, k))
        x, logw = self.run(y, operator, prior, rng, callback)
        S, N = logw.shape
        cdf = torch.cumsum(torch.softmax(logw, 1), 1)
        u = rng.rand((S, 1), dtype=torch.float64).to(logw.device)
        u = (u + torch.arange(k, device=logw.device, dtype=torch.float64)) / k * cdf[:, -1:]
        idx = torch.searchsorted(cdf, u.contiguous(), right=True).clamp_max(N - 1)
        out = x[torch.arange(S, device=x.device)[:, None], idx]          # (S, k, *shape)
        return out.reshape((B,) + tuple(x.shape[2:])).contiguous()
