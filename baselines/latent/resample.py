"""ReSample: hard data consistency in latent diffusion (Song, Kwon, Zhang, Hu, Qu, Shen, "Solving Inverse Problems
with Latent Diffusion Models via Hard Data Consistency", ICLR 2024, Algorithm 1, sections 3.1-3.2; code
soominkwon/resample @3e332b2: ``ldm/models/diffusion/ddim.py:189-441`` ``resample_sampling``,
``ldm_inverse/condition_methods.py:29-64``, ``sample_condition.py:33-76``).

On the LDM grid ``t_j = j c + 1`` (``c = T // steps``, ``ldm/modules/diffusionmodules/util.py:48-57``) with
``a_j = abar(t_j)`` and ``a'_j = abar(t_{j-1})`` (``abar(0)`` for ``j = 0``), for ``j = steps-1, ..., 0``:

1. DDIM step (``eta``; 0 = deterministic) from ``z`` at ``t_j``: ``eps = eps(z, t_j)``,
   ``x0 = (z - sqrt(1 - a_j) eps) / sqrt(a_j)``, ``z' = sqrt(a'_j) x0 + sqrt(1 - a'_j - s^2) eps + s n``;
2. a DPS step through the decoder: ``z' <- z' - (dps_scale a_j) grad_z ||y - A(D(x0_hat(z)))||`` (the norm, not
   its square; the network is differentiated: ``needs_grad``), ``x0_hat`` as below;
3. every ``travel_every``-th index ``j`` with ``0 < j <= steps - steps // splits``: ``inter_steps`` unconditional
   DDIM steps from ``z'`` give ``x0_hat`` at the level they reach ("time travel"), then hard data consistency

   * ``j >= steps // splits`` (the earlier part): pixel optimisation
     ``x* = argmin_x mean||y - A x||^2`` from ``D(x0_hat)`` (AdamW, ``pixel_lr``, at most ``pixel_iters``,
     stop at ``loss < eps^2``), ``z0* = E(x*)``;
   * ``j < steps // splits``: latent optimisation ``z0* = argmin_z mean||y - A(D(z))||^2`` from ``x0_hat`` (AdamW,
     ``latent_lr``, at most ``latent_iters``, stop at ``loss < eps^2`` or when the loss is above the one
     ``patience`` iterations earlier);

   and stochastic resampling with ``g = gamma (1 - a'_j) / (1 - a_j) (1 - a_j / a'_j)``:
   ``z' ~ N((g sqrt(a'_j) z0* + (1 - a'_j) z') / (g + 1 - a'_j), g (1 - a'_j) / (g + 1 - a'_j) I)`` (paper eq. 9:
   the prior ``N(sqrt(a') z0*, (1 - a') I)`` times the unconditional sample ``z'`` read as a noisy observation of
   variance ``g``);
4. after the loop, a last latent optimisation from ``z`` (``ddim.py:329-332``).

``x0_hat = (z - (1 - a_j) eps) / sqrt(a_j)`` in the official code (``ddim.py:541``, named Tweedie there;
``x0_estimate="official"``); ``x0_estimate="tweedie"`` uses ``x0`` (Tweedie's formula).  The optimisations are per
image (one AdamW over the batch is per element, an image that has stopped is frozen), so a batch equals a loop.
Network calls per image: ``steps`` plus ``min(inter_steps, j)`` per time travel (:meth:`expected_nfe`).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from reddiff.samplers.base import Sampler, validate_steps

X0_ESTIMATES = ("official", "tweedie")


def stochastic_resample(z0: torch.Tensor, z_t: torch.Tensor, a, gamma, noise: torch.Tensor) -> torch.Tensor:
    """ReSample's eq. 9 (``ddim.py:435-441``): a draw from ``N(sqrt(a) z0, (1 - a) I) * N(z_t, gamma I)`` (as a
    density in ``x``), i.e. mean ``(gamma sqrt(a) z0 + (1 - a) z_t) / (gamma + 1 - a)`` and variance
    ``gamma (1 - a) / (gamma + 1 - a)``; ``noise`` standard normal."""
    return (gamma * math.sqrt(a) * z0 + (1 - a) * z_t) / (gamma + 1 - a) + math.sqrt(
        gamma * (1 - a) / (gamma + 1 - a)) * noise


def _per_item_mse(r: torch.Tensor) -> torch.Tensor:
    return r.reshape(r.shape[0], -1).square().mean(1)


def hard_consistency(v0: torch.Tensor, fn, lr: float, iters: int, eps: float, patience: Optional[int]):
    """``argmin_v mean||fn(v)||^2`` per item by AdamW (torch defaults besides ``lr``, as ``ddim.py:353, 399``)
    from ``v0``; an item stops after the step on which its loss (before the step) is below ``eps^2``
    (``ddim.py:367, 428``) or, with ``patience``, is above its loss ``patience`` iterations earlier
    (``ddim.py:419-426``); a stopped item is frozen.  Returns the result and the number of iterations run."""
    v = v0.detach().clone().requires_grad_(True)
    opt = torch.optim.AdamW([v], lr=lr)
    B = v.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=v.device)
    frozen = v.detach().clone()
    history: list[torch.Tensor] = []
    n = 0
    for it in range(iters):
        opt.zero_grad()
        with torch.enable_grad():
            loss = _per_item_mse(fn(v))
            loss.sum().backward()
        opt.step()
        n += 1
        cur = loss.detach()
        with torch.no_grad():
            v[done] = frozen[done]
        stop = cur < eps ** 2
        if patience is not None:
            history.append(cur)
            if it >= patience:
                stop = stop | (history[0] < cur)
                history.pop(0)
        new = stop & ~done
        if new.any():
            with torch.no_grad():
                frozen[new] = v.detach()[new]
            done = done | new
        if bool(done.all()):
            break
    return v.detach(), n


class ReSample(Sampler):
    """ReSample (defaults: ``sample_condition.py`` and ``ldm/models/diffusion/ddim.py`` of the official code).

    Args:
        steps: DDIM steps (500; the official default, and ANCHORS: the code works only with 500, issue #5).
        eta: DDIM eta (0).
        dps_scale: the DPS step is ``dps_scale * a_t`` times the gradient of the residual norm (0.5).
        inter_steps: unconditional DDIM steps of a time travel (5).
        travel_every, splits: time travel at every ``travel_every``-th index in ``(0, steps - steps // splits]``,
            pixel optimisation above ``steps // splits``, latent below (10, 3).
        gamma: the resampling variance factor (40).
        pixel_lr, pixel_iters: pixel-space AdamW (1e-2, 2000); latent_lr, latent_iters, patience: latent-space
            AdamW (5e-3, 500, 200); eps: both stop at ``loss < eps^2`` (1e-3).
        final_opt: the last latent optimisation (True).
        x0_estimate: ``"official"`` or ``"tweedie"`` (see the module docstring).
    """

    name = "resample"
    needs_latent = True
    needs_grad = True
    requires: tuple = ("grad",)  # differentiates the data term through operator.forward (refuses a black-box task)
    # LinearDecoderGMM (benchmarks/gmm_posterior.py --latent): not asymptotically exact (hard consistency); settings
    # for short runs on the vector benchmark
    gmm_hparams = {"steps": 100, "travel_every": 5, "latent_iters": 200, "pixel_iters": 200}
    gmm_tune_grid = {"gamma": [10.0, 40.0, 160.0], "dps_scale": [0.1, 0.5]}
    tune_space = {"gamma": "tag(log, interval(1.0, 400.0))", "dps_scale": "tag(log, interval(0.01, 5.0))",
                  "latent_lr": "tag(log, interval(5e-4, 5e-2))"}
    test_overrides = {"travel_every": 2, "inter_steps": 2, "pixel_iters": 5, "latent_iters": 5, "patience": 2}

    def __init__(self, steps: int = 500, eta: float = 0.0, dps_scale: float = 0.5, inter_steps: int = 5,
                 travel_every: int = 10, splits: int = 3, gamma: float = 40.0, pixel_lr: float = 1e-2,
                 pixel_iters: int = 2000, latent_lr: float = 5e-3, latent_iters: int = 500,
                 patience: Optional[int] = 200, eps: float = 1e-3, final_opt: bool = True,
                 x0_estimate: str = "official", log_every: int = 10):
        self.steps = validate_steps("resample", steps)
        for k, v in (("inter_steps", inter_steps), ("travel_every", travel_every), ("splits", splits),
                     ("pixel_iters", pixel_iters), ("latent_iters", latent_iters)):
            validate_steps(f"resample ({k})", v)
        self.inter_steps, self.travel_every, self.splits = inter_steps, travel_every, splits
        self.pixel_iters, self.latent_iters = pixel_iters, latent_iters
        if patience is not None:
            validate_steps("resample (patience)", patience)
        self.patience = patience
        for k, v in (("dps_scale", dps_scale), ("pixel_lr", pixel_lr), ("latent_lr", latent_lr), ("eps", eps),
                     ("gamma", gamma)):
            if isinstance(v, bool) or not (math.isfinite(float(v)) and float(v) >= 0) or (k != "dps_scale" and not v):
                raise ValueError(f"resample: {k} must be a finite number > 0 (dps_scale >= 0), got {v!r}")
        self.dps_scale, self.gamma, self.eps = float(dps_scale), float(gamma), float(eps)
        self.pixel_lr, self.latent_lr = float(pixel_lr), float(latent_lr)
        if not 0 <= float(eta) <= 1:
            raise ValueError(f"resample: eta must be in [0, 1], got {eta!r}")
        self.eta = float(eta)
        self.final_opt = bool(final_opt)
        if x0_estimate not in X0_ESTIMATES:
            raise ValueError(f"resample: x0_estimate must be one of {', '.join(X0_ESTIMATES)}, got {x0_estimate!r}")
        self.x0_estimate = x0_estimate
        self.log_every = max(1, int(log_every))

    # ------------------------------------------------------------------ schedule
    def grid(self, prior) -> tuple[list[int], list[float], list[float]]:
        """The LDM timesteps ``t_j = j (T // steps) + 1`` (capped at ``T - 1``), ``a_j`` and ``a'_j``."""
        self.check_prior(prior)
        T = prior.schedule.T
        c = max(T // self.steps, 1)
        ts = [min(j * c + 1, T - 1) for j in range(self.steps)]
        ab = prior.schedule.alpha_bar
        a = [float(ab[t]) for t in ts]
        return ts, a, [float(ab[0])] + a[:-1]

    def travels(self) -> list[int]:
        """The indices ``j`` (descending) at which time travel and hard data consistency happen."""
        S = self.steps
        return [j for j in range(S - 1, 0, -1) if j <= S - S // self.splits and j % self.travel_every == 0]

    def expected_nfe(self, prior) -> int:
        self.check_prior(prior)
        return self.steps + sum(min(self.inter_steps, j) for j in self.travels())

    # ------------------------------------------------------------------ pieces
    def _x0(self, z, eps, a):
        x0 = (z - math.sqrt(1 - a) * eps) / math.sqrt(a)
        hat = x0 if self.x0_estimate == "tweedie" else (z - (1 - a) * eps) / math.sqrt(a)
        return x0, hat

    def _ddim(self, x0, eps, a, a_prev, rng, shape, like):
        s = self.eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        out = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - s * s, 0.0)) * eps
        return out + s * rng.randn(shape, dtype=like.dtype).to(like.device) if s > 0 else out

    def latent_opt(self, z0, y, operator):
        return hard_consistency(z0, lambda v: y - operator.forward(v), self.latent_lr, self.latent_iters, self.eps,
                                self.patience)[0]

    def pixel_opt(self, z0, y, operator, prior):
        A = operator.pixel
        x, _ = hard_consistency(prior.decode(z0), lambda v: y - A.forward(v), self.pixel_lr, self.pixel_iters,
                                self.eps, None)
        return prior.encode(x)

    # ------------------------------------------------------------------ sampling
    def sample(self, y: torch.Tensor, operator, prior, rng, callback: Optional[Callable] = None) -> torch.Tensor:
        self.check_prior(prior)  # a pixel prior is refused here, before any work
        self.check(operator)
        ts, a, a_prev = self.grid(prior)
        S = self.steps
        split = S // self.splits
        travel = set(self.travels())
        if any(j >= split for j in travel) and getattr(operator, "pixel", None) is None:
            raise ValueError("resample: the pixel-space stage needs the task's own operator: pass the runner's "
                             "ThroughDecoder(A, D, E) (its .pixel is A)")
        shape = self.sample_shape(y, prior)
        z = self.init_noise(rng, y, prior)
        for i in range(S):
            j = S - 1 - i
            with torch.enable_grad():
                zg = z.detach().requires_grad_(True)
                eps = prior.eps(zg, ts[j])
                x0, x0_hat = self._x0(zg, eps, a[j])
                nxt = self._ddim(x0, eps, a[j], a_prev[j], rng, shape, y)
                if self.dps_scale > 0:
                    res = (y - operator.forward(x0_hat)).reshape(y.shape[0], -1)
                    (g,) = torch.autograd.grad(res.norm(dim=1).sum(), zg)
                    nxt = nxt - self.dps_scale * a[j] * g
            z = nxt.detach()
            if j in travel:
                z_t = z
                with torch.no_grad():
                    w = z
                    for jj in range(j - 1, max(j - self.inter_steps, 0) - 1, -1):
                        e = prior.eps(w, ts[jj])
                        w0, hat = self._x0(w, e, a[jj])
                        w = self._ddim(w0, e, a[jj], a_prev[jj], rng, shape, y)
                    hat = hat.detach()
                g2 = self.gamma * (1 - a_prev[j]) / (1 - a[j]) * (1 - a[j] / a_prev[j])
                z0 = self.pixel_opt(hat, y, operator, prior) if j >= split else self.latent_opt(hat, y, operator)
                with torch.no_grad():
                    z = stochastic_resample(z0, z_t, a_prev[j], g2, rng.randn(shape, dtype=y.dtype).to(y.device))
            if callback is not None and self.should_log(i, S - 1):
                callback(i, {"t": ts[j], "x0": x0.detach()})
        if self.final_opt:
            z = self.latent_opt(z, y, operator)
        return z.detach()
