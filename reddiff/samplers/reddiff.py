"""RED-diff: regularisation by denoising diffusion (Mardani, Song, Kautz, Vahdat, ICLR 2024).

Variational posterior ``q(x0 | y) = N(mu, sigma_x0^2 I)``; ``mu`` is fitted with Adam, one diffusion timestep per
iteration, as in the official code (``algos/reddiff.py`` of NVlabs/RED-diff; docs/ANCHORS.md):

    mu <- H^+(y)
    for t in timesteps(steps, ordering):             # every (T/steps)-th step, descending by default
        x0  = mu + sigma_x0 * e1
        x_t = sqrt(a_t) x0 + sqrt(1 - a_t) e2
        eps = prior.eps(x_t, t)                     # under no_grad: no graph through the network
        loss = w_t * mean((eps - e2) * x0) + v * mean((y - H(x0))^2) / 2
        w_t = lam * weight(sqrt(1 - a_t) / sqrt(a_t))
        Adam step on mu (betas 0.9, 0.99, eps 1e-8)

Implementation notes
--------------------
* **Gradient.** The denoiser term is linear in ``x0`` with a detached coefficient, so its gradient is written down
  (``w_t (eps - e2) / n``); autograd runs only through the operator for the data term, which keeps nonlinear
  operators (phase retrieval, HDR, ...) working.  ``dx0/dmu = I``.
* **Per-image objective.** Means are taken per image and the per-image losses are summed over the batch, so
  every image's gradient is that of its own loss: a batch gives the same numbers as a loop over its images.  The
  official code takes one mean over the whole batch (``algos/reddiff.py:87-88``, code), which divides every
  gradient by B; Adam's step ``m/(sqrt(v) + eps)`` is then exactly ours with ``eps = B * 1e-8``, not the same
  (its eps is not negligible: the outputs move by ~6e-2 at B = 4).  ``batch_loss="batch_mean"`` reproduces it
  that way (``compat.reddiff_batch_loss``); the result then depends on the batch size, as the official code's.
* **Explicit Adam.** The update is written out (:func:`adam_step`), equal to ``torch.optim.Adam`` (no weight
  decay, no amsgrad), so that ``lr``, ``lam``, ``weighting``, ``obs_weight`` and ``sigma_x0`` may be per-item:
  a batch can hold K configurations of the same image that share one network call per step
  (:func:`expand_configs`, :func:`tile`, :func:`untile`).
* **sigma_aware.** With ``sigma_aware=True`` the loss is the paper's variational bound written with sums instead
  of means, ``v * ||y - H(x0)||^2 / (2 sigma_y^2) + w_t * sum((eps - e2) * x0)``, with ``sigma_y`` the operator's
  noise std in model units: the data term is then the proper Gaussian log-likelihood (this is what an
  exact-posterior benchmark should use).  It refuses a noiseless operator.  Since Adam is scale invariant, it is
  equivalent to the default form with ``lam * n`` and ``obs_weight * m / sigma_y^2`` (n, m: entries per image of
  x and y).
* **Returns.** ``returns="last_sample"`` (official) gives the last ``x0`` sample, drawn before the final Adam
  step; ``returns="mu"`` gives ``mu`` after it.
* **parallel = k** (official ``algos/reddiff_parallel.py``, ``num_dens``): the same objective, but each Adam step
  averages the denoiser terms of ``k`` consecutive timesteps of the visited list (one ``x0`` sample, ``k`` noise
  draws ``e2_j``), ``grad = (1/k) sum_j w_j (eps_j - e2_j) / n + grad(data term)``: ``steps / k`` Adam steps for the
  same ``steps`` network evaluations.  ``k = 1`` (default) is the sequential loop above, bit for bit.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

import torch

from reddiff.core.diffusion import ORDERINGS
from reddiff.samplers.base import Sampler, bcast, validate_spacing, validate_steps

#: denoiser weightings of the inverse SNR ``s = sqrt(1 - a_t) / sqrt(a_t)`` (official names)
WEIGHTINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": lambda s: s,
    "sqrt": lambda s: s.sqrt(),
    "square": lambda s: s.square(),
    "log": lambda s: torch.log1p(s),
    "trunc_linear": lambda s: s.clamp(max=1.0),
    "power2over3": lambda s: s.pow(2.0 / 3.0),
    "const": lambda s: torch.ones_like(s),
}

#: hyperparameters that may differ per batch item (a batched sweep); everything else is shared
PER_ITEM = ("lr", "lam", "weighting", "obs_weight", "sigma_x0")
RETURNS = ("last_sample", "mu")


def adam_step(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr,
              betas=(0.9, 0.99), eps: float = 1e-8) -> None:
    """One in-place Adam update of ``p`` (the ``torch.optim.Adam`` formula, no weight decay, no amsgrad).

    ``lr`` is a float or a tensor broadcastable to ``p`` (per-item learning rates); ``step`` counts from 1.
    :class:`REDDiff` always passes a ``(B, 1, ...)`` tensor, so a sweep and a separate run use the same arithmetic.
    """
    b1, b2 = betas
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    bc1 = 1 - b1 ** step
    bc2_sqrt = math.sqrt(1 - b2 ** step)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    p.sub_((lr / bc1) * (m / denom))


def _as_list(value):
    """Hydra ListConfig / tuple / list -> list; scalars unchanged."""
    if isinstance(value, (str, bytes, int, float)) or value is None or isinstance(value, torch.Tensor):
        return value
    try:
        return list(value)
    except TypeError:
        return value


class REDDiff(Sampler):
    """RED-diff sampler.

    Args:
        steps: number of Adam iterations = network evaluations (1..T).
        lr: Adam learning rate (official default 0.1; README example and this harness: 0.5). Per-item allowed.
        lam: ``lambda``, the denoiser weight (0.25). Per-item allowed.
        weighting: one of ``linear, sqrt, square, log, trunc_linear, power2over3, const`` applied to the inverse SNR
            ``sqrt(1-a_t)/sqrt(a_t)``. Per-item allowed.
        obs_weight: ``v``, the data-term weight (1.0). Per-item allowed.
        sigma_x0: std of the variational posterior (0.0 = point estimate, official default). Per-item allowed.
        ordering: ``descending`` (paper default, T -> 1), ``ascending`` or ``random``.
        order_seed: seed of the ``random`` ordering.
        returns: ``last_sample`` (official: last x0 sample, drawn before the final Adam step) or ``mu``.
        sigma_aware: use the likelihood weight ``1/(2 sigma_y^2)`` on summed residuals (see module doc).
        betas, adam_eps: Adam constants (0.9, 0.99) and 1e-8 as in the official code.
        batch_loss: "per_image" (a batch equals a loop) or "batch_mean" (the official one mean over the batch).
        spacing: timestep spacing, "default" or "official" (``compat.timesteps``).
        parallel: ``k`` timesteps (network evaluations) per Adam step (1 = sequential, the default); ``steps`` must
            be a multiple of ``k``.
        log_every: the callback is called every ``log_every`` steps and at the last step.

    Per-item values are lists (or tuples / 1-D tensors) with one entry per batch item; see :func:`expand_configs`.
    """

    name = "reddiff"
    requires: tuple = ("grad",)  # differentiates the data term through operator.forward (refuses a black-box task)
    per_item = PER_ITEM
    # GMM benchmark: tuned on the tuning seed (results/gmm_posterior.md)
    gmm_hparams = {"lr": 4.0, "lam": 0.25, "sigma_x0": 0.0, "weighting": "linear", "sigma_aware": True}
    gmm_tune_grid = {"lr": [1.0, 2.0, 4.0, 8.0], "lam": [0.25, 1.0, 4.0], "sigma_x0": [0.0, 1.0]}
    # tuning space (reddiff.tune.sweeper; unverified: our range around the README example lr 0.5, lam 0.25 and the
    # official config default lr 0.1; lam up to 4 as the lambda ablation grid)
    tune_space = {"lr": "tag(log, interval(0.02, 2.0))", "lam": "tag(log, interval(0.01, 4.0))"}

    def __init__(self, steps: int = 100, lr=0.5, lam=0.25, weighting="linear", obs_weight=1.0, sigma_x0=0.0,
                 ordering: str = "descending", order_seed: int = 0, returns: str = "last_sample",
                 sigma_aware: bool = False, betas: Sequence[float] = (0.9, 0.99), adam_eps: float = 1e-8,
                 log_every: int = 10, batch_loss: str = "per_image", spacing: str = "default", parallel: int = 1):
        if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1 or steps % parallel:
            raise ValueError(f"reddiff: parallel must be an integer >= 1 that divides steps ({steps}), got {parallel!r}")
        self.parallel = parallel
        if batch_loss not in ("per_image", "batch_mean"):
            raise ValueError(f"reddiff: batch_loss must be 'per_image' or 'batch_mean', got {batch_loss!r}")
        self.batch_loss = batch_loss
        self.spacing = validate_spacing("reddiff", spacing)
        if ordering not in ORDERINGS:
            raise ValueError(f"reddiff: unknown ordering {ordering!r}; valid: {', '.join(ORDERINGS)}")
        if returns not in RETURNS:
            raise ValueError(f"reddiff: returns must be one of {RETURNS}, got {returns!r}")
        self.steps = validate_steps("reddiff", steps)
        self.lr = _as_list(lr)
        self.lam = _as_list(lam)
        self.weighting = _as_list(weighting)
        self.obs_weight = _as_list(obs_weight)
        self.sigma_x0 = _as_list(sigma_x0)
        for w in (self.weighting if isinstance(self.weighting, list) else [self.weighting]):
            if w not in WEIGHTINGS:
                raise ValueError(f"reddiff: unknown weighting {w!r}; valid: {', '.join(WEIGHTINGS)}")
        for name in ("lr", "lam", "obs_weight", "sigma_x0"):
            vals = getattr(self, name)
            vals = vals.tolist() if isinstance(vals, torch.Tensor) else vals
            for x in (vals if isinstance(vals, list) else [vals]):
                x = float(x)
                if not math.isfinite(x) or x < 0 or (name == "lr" and x == 0):
                    raise ValueError(f"reddiff: {name} must be finite and {'> 0' if name == 'lr' else '>= 0'}, got {x}")
        self.ordering = ordering
        self.order_seed = int(order_seed)
        self.returns = returns
        self.sigma_aware = bool(sigma_aware)
        self.betas = (float(betas[0]), float(betas[1]))
        self.adam_eps = float(adam_eps)
        self.log_every = max(1, int(log_every))

    # ------------------------------------------------------------------ helpers
    def _per_item(self, name: str, B: int, like: torch.Tensor) -> torch.Tensor:
        """``(B,)`` float64 tensor of hyperparameter ``name`` (a scalar is broadcast)."""
        v = getattr(self, name)
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        if isinstance(v, list):
            if len(v) != B:
                raise ValueError(f"reddiff: per-item {name} has {len(v)} values for a batch of {B}")
            return torch.tensor([float(x) for x in v], dtype=torch.float64)
        return torch.full((B,), float(v), dtype=torch.float64)

    def weight_table(self, ts: Sequence[int], schedule, B: int) -> torch.Tensor:
        """``(len(ts), B)`` float64 table of ``w_t = lam * weight(sqrt(1-a_t)/sqrt(a_t))`` per step and item."""
        s = schedule.sigma_over_alpha(torch.as_tensor(list(ts), dtype=torch.long))  # (S,) float64
        ws = self.weighting if isinstance(self.weighting, list) else [self.weighting] * B
        if len(ws) != B:
            raise ValueError(f"reddiff: per-item weighting has {len(ws)} values for a batch of {B}")
        cols = {w: WEIGHTINGS[w](s) for w in set(ws)}
        table = torch.stack([cols[w] for w in ws], dim=1)  # (S, B)
        return table * self._per_item("lam", B, s)[None, :]

    # ------------------------------------------------------------------ sampling
    def sample(self, y: torch.Tensor, operator, prior, rng, callback: Optional[Callable] = None) -> torch.Tensor:
        self.check(operator)
        schedule = prior.schedule
        ts = self.timesteps(prior, self.ordering, seed=self.order_seed)
        B = y.shape[0]

        mu = operator.pinv(y).detach().clone()
        if mu.shape[0] != B:
            raise ValueError(f"reddiff: pinv(y) has batch {mu.shape[0]}, y has {B}")
        n = mu[0].numel()
        m_y = y[0].numel()
        if self.sigma_aware:
            sig = float(operator.noise_std)
            if not sig > 0:
                raise ValueError("reddiff: sigma_aware=True needs a noisy operator (noise_std > 0); "
                                 f"{type(operator).__name__} has noise_std={sig}")
            den_scale, data_scale = 1.0, 1.0 / sig ** 2
        else:
            den_scale, data_scale = 1.0 / n, 1.0 / m_y

        # per-step, per-item constants, computed once (no host sync in the loop)
        a = schedule.alpha_bar_at(torch.as_tensor(ts, dtype=torch.long))  # (S,) float64
        sqrt_a = a.sqrt().to(mu)
        sqrt_1ma = (1 - a).sqrt().to(mu)
        W = (self.weight_table(ts, schedule, B) * den_scale).to(mu)     # (S, B)
        lr = bcast(self._per_item("lr", B, mu), mu)
        v_obs = (self._per_item("obs_weight", B, mu) * (data_scale / 2)).to(mu)  # (B,)
        sx0 = bcast(self._per_item("sigma_x0", B, mu), mu)

        # one mean over the batch (official) scales every gradient by 1/B: the same Adam step with eps * B
        adam_eps = self.adam_eps * (B if self.batch_loss == "batch_mean" else 1)
        m_buf = torch.zeros_like(mu)
        v_buf = torch.zeros_like(mu)
        x0 = mu
        last = len(ts) - 1
        k = self.parallel
        if k > 1:
            return self._sample_parallel(y, operator, prior, rng, callback, ts, mu, sqrt_a, sqrt_1ma, W, lr, v_obs,
                                         sx0, adam_eps)
        for i, t in enumerate(ts):
            e1 = rng.randn_like(mu)
            e2 = rng.randn_like(mu)
            x0 = mu + sx0 * e1
            x_t = sqrt_a[i] * x0 + sqrt_1ma[i] * e2
            with torch.no_grad():
                eps = prior.eps(x_t, t)
            w = bcast(W[i], mu)
            grad = w * (eps - e2)                                # d/dx0 of the denoiser term
            with torch.enable_grad():
                x0r = x0.detach().requires_grad_(True)
                res = y - operator.forward(x0r)
                data = v_obs * res.reshape(B, -1).square().sum(1)  # (B,) per-image data losses
                (g_data,) = torch.autograd.grad(data.sum(), x0r)
            grad = grad + g_data
            if callback is not None and self.should_log(i, last):
                noise_term = (w * (eps - e2) * x0).reshape(B, -1).sum(1)
                callback(i, {"t": t, "loss": (noise_term + data).detach(), "loss_noise": noise_term.detach(),
                             "loss_obs": data.detach(), "mu": mu.detach().clone()})
            adam_step(mu, grad, m_buf, v_buf, i + 1, lr, self.betas, adam_eps)
        out = x0 if self.returns == "last_sample" else mu
        return out.detach()

    def _sample_parallel(self, y, operator, prior, rng, callback, ts, mu, sqrt_a, sqrt_1ma, W, lr, v_obs, sx0,
                         adam_eps) -> torch.Tensor:
        """``parallel = k > 1``: one Adam step per group of ``k`` consecutive timesteps, the denoiser gradients of
        the group averaged (official ``algos/reddiff_parallel.py:52-53, 70-76, 125``: one mean over the ``k``
        copies); the data term once, on the group's single ``x0`` sample."""
        k, B = self.parallel, y.shape[0]
        m_buf = torch.zeros_like(mu)
        v_buf = torch.zeros_like(mu)
        x0 = mu
        groups = [list(range(j, j + k)) for j in range(0, len(ts), k)]
        last = len(groups) - 1
        for g, idx in enumerate(groups):
            e1 = rng.randn_like(mu)
            x0 = mu + sx0 * e1
            grad = torch.zeros_like(mu)
            for i in idx:
                e2 = rng.randn_like(mu)
                x_t = sqrt_a[i] * x0 + sqrt_1ma[i] * e2
                with torch.no_grad():
                    eps = prior.eps(x_t, ts[i])
                grad = grad + bcast(W[i], mu) * (eps - e2)
            grad = grad / k
            with torch.enable_grad():
                x0r = x0.detach().requires_grad_(True)
                data = v_obs * (y - operator.forward(x0r)).reshape(B, -1).square().sum(1)
                (g_data,) = torch.autograd.grad(data.sum(), x0r)
            if callback is not None and self.should_log(g, last):
                noise_term = (grad * x0).reshape(B, -1).sum(1)
                callback(g, {"t": ts[idx[0]], "loss": (noise_term + data).detach(), "loss_noise": noise_term.detach(),
                             "loss_obs": data.detach(), "mu": mu.detach().clone()})
            adam_step(mu, grad + g_data, m_buf, v_buf, g + 1, lr, self.betas, adam_eps)
        out = x0 if self.returns == "last_sample" else mu
        return out.detach()


# ---------------------------------------------------------------------- batched sweeps
def expand_configs(configs: Sequence[Mapping], n_images: int, base: "REDDiff | Mapping | None" = None) -> dict:
    """Per-item keyword arguments for a batched sweep of ``K = len(configs)`` configurations.

    The batch is laid out image-major: item ``b * K + k`` is image ``b`` under configuration ``k``.  Each config
    may set any of :data:`PER_ITEM` (``lr, lam, weighting, obs_weight, sigma_x0``); keys it leaves out take the
    value from ``base`` (a :class:`REDDiff` or a dict; the class defaults otherwise).  Everything else (steps,
    ordering, returns, ...) must be shared and is rejected here.

    Usage::

        kw = expand_configs([{"lr": 0.25}, {"lr": 0.5, "lam": 1.0}], n_images=len(indices))
        sampler = REDDiff(steps=100, **kw)
        rng = BatchRNG(tile([seed + i for i in indices], K))
        op.setup(tile(indices, K), (B * K, *shape))
        x = untile(sampler.sample(tile(y, K), op, prior, rng), K)    # (n_images, K, ...)

    With per-item seeds, item ``b * K + k`` gives exactly what a separate run of configuration ``k`` on image ``b``
    gives (tested), while the network is called once per step for the whole sweep.
    """
    K = len(configs)
    if K == 0:
        raise ValueError("expand_configs: no configurations")
    if n_images < 1:
        raise ValueError(f"expand_configs: n_images must be >= 1, got {n_images}")
    defaults = {"lr": 0.5, "lam": 0.25, "weighting": "linear", "obs_weight": 1.0, "sigma_x0": 0.0}
    if isinstance(base, REDDiff):
        for k in PER_ITEM:
            v = getattr(base, k)
            if isinstance(v, (list, torch.Tensor)):
                raise ValueError(f"expand_configs: base sampler already has per-item {k}")
            defaults[k] = v
    elif base is not None:
        defaults.update({k: base[k] for k in PER_ITEM if k in base})
    for c in configs:
        bad = sorted(set(c) - set(PER_ITEM))
        if bad:
            raise ValueError(f"expand_configs: {bad} cannot vary within one batch (per-item keys: {PER_ITEM})")
    out = {}
    for k in PER_ITEM:
        per_cfg = [c.get(k, defaults[k]) for c in configs]
        out[k] = [per_cfg[j] for _ in range(n_images) for j in range(K)]
    return out


def tile(x, K: int):
    """Repeat each item ``K`` times, image-major (a tensor along dim 0, or a list)."""
    if isinstance(x, torch.Tensor):
        return x.repeat_interleave(K, dim=0)
    return [v for v in x for _ in range(K)]


def untile(x: torch.Tensor, K: int) -> torch.Tensor:
    """``(n_images * K, ...) -> (n_images, K, ...)``."""
    if x.shape[0] % K:
        raise ValueError(f"untile: batch {x.shape[0]} is not a multiple of K={K}")
    return x.reshape((x.shape[0] // K, K) + tuple(x.shape[1:]))
