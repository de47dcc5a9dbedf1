"""FlowDPS: flow-driven posterior sampling (Kim, Kim, Chung, Ye, ICCV 2025).

The flow sampler's step decomposed into its clean estimate and its noise estimate; only the clean estimate is
guided by the data, and the step re-noises with a mix of the noise estimate and fresh noise.  On the flow time
``s`` (noise at ``s = 1``, the SD3 convention of the official code) over a decreasing grid ``s_0 = 1 > ... > 0``:

    D     = D(x / (1 - s_i), s_i / (1 - s_i))              clean estimate (x0_hat, one network call, no gradient)
    n_hat = (x - (1 - s_i) D) / s_i                          noise estimate
    x0_y  = K gradient steps  x0 <- x0 - step * grad ||R(y) - R(H x0)||  from x0 = D
    x0_m  = (1 - s_i) D + s_i x0_y                           guided clean estimate (more guidance at high noise)
    x    <- (1 - s_{i+1}) x0_m + s_{i+1} (sqrt(s_{i+1}) n_hat + sqrt(1 - s_{i+1}) z),   z ~ N(0, I)

with ``R = H^T`` (``consistency: adjoint``) or ``R = H^+`` (``pinv``: the official choice for super-resolution), the
norm unsquared and per image, ``K = 3``.  The gradient never goes through the network (the official code
differentiates through the VAE decoder only; in pixel space there is none), so ``needs_grad`` is False and the NFE
per image is ``steps``.  The grid is SD3's: ``u`` evenly spaced from 1 to ``u_min``, shifted
``s = shift u / (1 + (shift - 1) u)``, then 0.  ``s_0 = 1`` is pure noise: the denoiser is evaluated at
``min(s, s_cap)``, ``s_cap`` the prior schedule's largest noise level (0.9937 for the DDPM grid).
"""
from __future__ import annotations

import math

import torch

from reddiff.baselines.flow.common import max_time
from reddiff.samplers.base import Sampler, bcast, validate_steps

CONSISTENCY = ("adjoint", "pinv")
# SD3-medium's scheduler: timesteps 1..1000 shifted by its config shift 3.0, so the smallest u is
# 3 * 0.001 / (1 + 2 * 0.001) (diffusers 0.30.1 scheduling_flow_match_euler_discrete.py:75-90, sigma_min; the grid
# is set_timesteps :193-202, re-shifted by config.shift)
U_MIN = 3e-3 / (1 + 2e-3)


class FlowDPS(Sampler):
    """FlowDPS sampler (paper: arXiv 2503.08136, Alg. 1; code: FlowDPS-Inverse/FlowDPS ``sd3_sampler.py``
    ``SD3FlowDPS``).

    Args:
        steps: NFE, the grid size (official ``--NFE`` 28).
        step_size: gradient step on the data term (official ``--step_size`` 15.0, in SD3 latent units), float or
            one value per batch item.
        inner_steps: K gradient steps per time (official 3).
        shift: SD3 time shift of the grid (official 4.0).
        consistency: ``adjoint`` (``||H^T y - H^T H x||``) or ``pinv`` (``||H^+ y - H^+ H x||``, official for SR).
        log_every: callback every ``log_every`` steps and at the last one.
    """

    name = "flowdps"
    requires: tuple = ("adjoint",)
    needs_grad = False
    per_item = ("step_size",)
    # tuned on the GMM tuning seed (docs/SAMPLERS.md, flowdps), same command with --samplers flowdps: step 150,
    # shift 4, 100 steps: mean SW/SW(prior) 0.507 (official 15, 4, 28: 0.708); 100 NFE
    gmm_hparams = {"steps": 100, "step_size": 150.0, "shift": 4.0}
    gmm_tune_grid = {"step_size": [15.0, 50.0, 150.0, 500.0], "shift": [1.0, 4.0], "steps": [28, 100]}
    # tuning space (reddiff.tune.sweeper; unverified: our range, 50x below / 3x above the official 15 (latent units))
    tune_space = {"step_size": "tag(log, interval(0.3, 50.0))"}

    def __init__(self, steps: int = 28, step_size=15.0, inner_steps: int = 3, shift: float = 4.0,
                 consistency: str = "adjoint", log_every: int = 10):
        self.steps = validate_steps("flowdps", steps)
        vs = [step_size] if isinstance(step_size, (int, float)) else list(step_size)
        if any(not (math.isfinite(float(v)) and float(v) >= 0) for v in vs):
            raise ValueError(f"flowdps: step_size must be finite and >= 0, got {step_size}")
        self.step_size = float(step_size) if isinstance(step_size, (int, float)) else [float(v) for v in vs]
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"flowdps: inner_steps must be an integer >= 0, got {inner_steps!r}")
        if not (math.isfinite(float(shift)) and float(shift) > 0):
            raise ValueError(f"flowdps: shift must be finite and > 0, got {shift}")
        if consistency not in CONSISTENCY:
            raise ValueError(f"flowdps: consistency must be one of {', '.join(CONSISTENCY)}, got {consistency!r}")
        self.inner_steps, self.shift, self.consistency = inner_steps, float(shift), consistency
        self.log_every = max(1, int(log_every))

    def grid(self) -> list[float]:
        """``s_0 = 1 > ... > s_{N-1}``, then 0 (SD3's shifted grid)."""
        N = self.steps
        us = [1.0 - (1.0 - U_MIN) * i / (N - 1) for i in range(N)] if N > 1 else [1.0]
        return [self.shift * u / (1 + (self.shift - 1) * u) for u in us] + [0.0]

    def expected_nfe(self, prior) -> int:
        self.check_prior(prior)
        return self.steps

    def data_consistency(self, x0, y, operator, step):
        """K steps of gradient descent on the per-image norm ``||R(y) - R(H x0)||`` (no network)."""
        R = operator.adjoint if self.consistency == "adjoint" else operator.pinv
        ry = R(y)
        B = x0.shape[0]
        for _ in range(self.inner_steps):
            if self.consistency == "adjoint":   # r = H^T (y - H x): grad ||r|| = -H^T H r / ||r|| (no autograd)
                r = ry - R(operator.forward(x0))
                norm = r.reshape(B, -1).norm(dim=1).clamp_min(1e-30)
                grad = -R(operator.forward(r)) / bcast(norm, r)
            else:                               # through H^+ by autograd (any pseudo-inverse the operator defines)
                with torch.enable_grad():
                    xg = x0.detach().requires_grad_(True)
                    res = (ry - R(operator.forward(xg))).reshape(B, -1)
                    (grad,) = torch.autograd.grad(res.norm(dim=1).sum(), xg)
            x0 = x0 - step * grad
        return x0.detach()

    def sample(self, y, operator, prior, rng, callback=None):
        self.check(operator)
        self.check_prior(prior)
        s_cap = max_time(prior)
        shape = self.sample_shape(y, prior)
        with torch.no_grad():
            x = self.init_noise(rng, y, prior)
            if isinstance(self.step_size, list) and len(self.step_size) != shape[0]:
                raise ValueError(f"flowdps: per-item step_size has {len(self.step_size)} values for a batch of "
                                 f"{shape[0]}")
            step = bcast(torch.as_tensor(self.step_size, dtype=torch.float64), x)
            ss = self.grid()
            for i in range(self.steps):
                s, s_next = ss[i], ss[i + 1]
                sc = min(s, s_cap)
                D = prior.denoise(x / (1.0 - sc), sc / (1.0 - sc))
                n_hat = (x - (1.0 - sc) * D) / sc
                x0_m = (1.0 - s) * D + s * self.data_consistency(D, y, operator, step)
                noise = math.sqrt(s_next) * n_hat + math.sqrt(1.0 - s_next) * rng.randn(shape, dtype=x.dtype).to(x.device)
                x = (1.0 - s_next) * x0_m + s_next * noise
                if callback is not None and self.should_log(i, self.steps - 1):
                    callback(i, {"t": s, "x0": x0_m})
        return x.detach()
