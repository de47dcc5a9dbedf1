"""Flow-Priors: MAP estimation with a flow prior by a sequence of time-dependent objectives (Zhang et al.,
NeurIPS 2024, arXiv 2405.18816).

Written here in the official code's time ``s = 1 - t`` (noise at ``s = 0``, data at ``s = 1``; velocity
``u = -v`` of :mod:`reddiff.baselines.flow.common`).  From ``x = x_init ~ N(0, I)``, for ``s_i = i/N (1 - e)
+ e`` (``e = 1e-3``, ``ds = 1/N``), a fresh Adam (learning rate ``eta``) takes ``K`` steps on

    L_i(x) = lmbda ||H(x + ds u(x, s_i)) - y_i||^2 + ds u_probe^T (du/dx) u_probe  [+ ||x||^2 / 2 at i = 0]
    y_i    = (s_i + ds) y + (1 - s_i - ds) H(x_init)

(the trace of du/dx, the flow's log-likelihood change, by one Rademacher Hutchinson probe, differentiated through
the network), plus for ``i > 0`` the detached ``-grad log p_s(x) = (x - s u) / (1 - s)``; then ``x <- x + ds u``.
Official code: annegnx/PnP-Flow ``pnpflow/methods/flow_priors.py``, ``pnpflow/utils.py:243-270`` @ee5b159.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from reddiff.samplers.base import Sampler, validate_steps
from reddiff.baselines.flow.common import check_value, data_loss, max_time, per_item, velocity


class FlowPriors(Sampler):
    """Flow-Priors on the flow view of any prior (backpropagates through the network, twice for the trace term).

    Args:
        steps: outer iterations N (time steps).
        inner_steps: Adam steps K per time step.
        lmbda: data weight (float or one per batch item); per-task values in ``conf/task/*.yaml``.
        eta: Adam learning rate (float or one per batch item).
        start_time: first ``s`` (0: the official uniform grid from ``e = 1e-3`` with ``ds = 1/N``).
        log_every: callback cadence.
    """

    name = "flow_priors"
    requires: tuple = ()
    needs_grad = True
    per_item = ("lmbda", "eta")
    # tuned on the GMM tuning seed (docs/SAMPLERS.md "Flow-Priors": grid and scores)
    gmm_hparams = {"lmbda": 1000.0, "eta": 1.0}
    gmm_tune_grid = {"lmbda": [10.0, 100.0, 1000.0], "eta": [0.1, 0.3, 1.0]}
    # unverified: our ranges around the official per-task values (lmbda 100..1e4, eta 0.01..0.1) and sr4's lmbda
    # 1.6e5 (the decimation mapping of conf/task/sr4.yaml)
    tune_space = {"lmbda": "tag(log, interval(10.0, 1000000.0))", "eta": "tag(log, interval(0.001, 0.3))"}
    test_overrides = {"inner_steps": 1}
    adam_betas = (0.9, 0.999)  # torch.optim.Adam's defaults, as the official code (flow_priors.py:89)
    adam_eps = 1e-8

    def __init__(self, steps: int = 100, inner_steps: int = 1, lmbda=1000.0, eta=0.01, start_time: float = 0.0,
                 log_every: int = 10):
        self.steps = validate_steps("flow_priors", steps)
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"flow_priors: inner_steps must be an integer >= 1, got {inner_steps!r}")
        self.inner_steps = inner_steps
        self.lmbda = check_value("flow_priors", "lmbda", lmbda)
        self.eta = check_value("flow_priors", "eta", eta)
        if not 0.0 <= float(start_time) < 1.0:
            raise ValueError(f"flow_priors: start_time must be in [0, 1), got {start_time!r}")
        self.start_time = float(start_time)
        self.log_every = max(1, int(log_every))

    def check_prior(self, prior) -> None:
        pass  # any prior, any dialect: the flow view is prior.denoise at sigma = t / (1 - t)

    def grid(self) -> tuple[list[float], float]:
        """The times ``s_i`` and the step ``ds`` (flow_priors.py:63-69, 83)."""
        N = self.steps
        e, ds = (self.start_time, (1 - self.start_time) / N) if self.start_time > 0 else (1e-3, 1.0 / N)
        return [i / N * (1 - e) + e for i in range(N)], ds

    def expected_nfe(self, prior) -> int:
        return self.steps * (self.inner_steps + 1)

    def _u(self, prior, x, s):
        """The official-time velocity ``u = -v`` at ``s`` (queried at ``t = min(1 - s, max_time)``)."""
        v, _ = velocity(prior, x, min(1.0 - s, max_time(prior)))
        return -v

    def sample(self, y: torch.Tensor, operator, prior, rng, callback: Optional[Callable] = None) -> torch.Tensor:
        self.check(operator)
        B = y.shape[0]
        x_init = self.init_noise(rng, y, prior)
        lam = per_item("flow_priors: lmbda", self.lmbda, B, y.new_zeros(B))
        lr = per_item("flow_priors: eta", self.eta, B, x_init)
        Hx_init = operator.forward(x_init)
        b1, b2 = self.adam_betas
        ss, ds = self.grid()
        x = x_init.clone()
        for i, s in enumerate(ss):
            y_i = (s + ds) * y + (1 - (s + ds)) * Hx_init
            m, v2 = torch.zeros_like(x), torch.zeros_like(x)       # a fresh Adam per time step (flow_priors.py:89)
            for k in range(1, self.inner_steps + 1):
                probe = (rng.rand(x.shape, dtype=x.dtype).to(x.device) < 0.5).to(x.dtype) * 2 - 1
                with torch.enable_grad():
                    xg = x.detach().requires_grad_(True)
                    u = self._u(prior, xg, s)
                    fit = lam * data_loss(xg + ds * u, y_i, operator)
                    (jtp,) = torch.autograd.grad(u, xg, probe, create_graph=True)   # probe^T du/dx
                    trace = (jtp * probe).reshape(B, -1).sum(1)
                    loss = fit + ds * trace
                    if i == 0:
                        loss = loss + 0.5 * xg.reshape(B, -1).square().sum(1)
                    (g,) = torch.autograd.grad(loss.sum(), xg)
                if i > 0:
                    g = g + (xg.detach() - s * u.detach()) / (1 - s)
                m = b1 * m + (1 - b1) * g
                v2 = b2 * v2 + (1 - b2) * g * g
                denom = (v2 / (1 - b2 ** k)).sqrt() + self.adam_eps
                x = (x - lr * (m / (1 - b1 ** k)) / denom).detach()
            with torch.no_grad():
                x = x + ds * self._u(prior, x, s)
            if callback is not None and self.should_log(i, len(ss) - 1):
                callback(i, {"s": s, "x": x})
        return x.detach()
