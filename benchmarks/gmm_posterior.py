"""Gaussian-mixture posterior benchmark with an exact posterior (the MCGdiff protocol; docs/ANCHORS.md).

    python -m benchmarks.gmm_posterior [--dims 8,80,800] [--dims-y 1,2,4] [--problems 20] [--samples 2000]
                                       [--steps 100] [--seed 0] [--json FILE] [--samplers reddiff,dps,pigdm,ddrm]
                                       [--md FILE] [--plot FILE] [--quick] [--tune]

For every ``(d, d_y)`` and problem ``p``: a 25-component MCGdiff prior on ``R^d`` (means ``(8i, 8j)`` repeated over
the coordinate pairs, weights ``randn(25)^2`` normalised, identity covariances), a measurement ``y = A x* + sigma_y e``
(``A`` from the SVD of a Gaussian ``d_y x d`` matrix with its singular values replaced by sorted ``U(0, 1)`` draws,
``sigma_y = U(0, 1) * s_max``) and its exact posterior (Kalman form, float64).  Every sampler draws ``samples``
samples (one batch, one generator: ``BatchRNG(seed, per_item=False)``) and is scored by the sliced Wasserstein
distance to ``samples`` exact-posterior samples, with 1000 random directions shared by all methods on the problem.
Two references run on the same problems: ``exact`` (an independent exact-posterior draw: the floor) and ``prior``
(prior samples: "ignore the data").

SW convention: ``SW_1 = mean over directions of W_1`` of the projected empirical measures (the docs/ANCHORS.md floor and
"ignore the data" ranges were measured with it); ``SW_2 = sqrt(mean W_2^2)`` (POT's default) is also stored as
``sw2_*``.  The JSON holds, under ``results[str(d)][str(d_y)][name]``, ``{"sw_mean", "sw_ci95", "seconds", ...}``
with ``sw_ci95 = 1.96 std / sqrt(problems)`` and ``seconds`` the mean wall time per problem (one batch of
``samples``).

Schedule: the DDPM linear schedule of the image priors (beta 1e-4 -> 0.02, T = 1000, :class:`reddiff.core.diffusion.Schedule`);
the MCGdiff script instead builds ``alphas_cumprod`` from a reversed, decreasing beta sequence
(``linspace(0.02, 1e-4, 999)`` preceded by 1).

Hyperparameters: each sampler class's ``gmm_hparams`` (its tuning grid: ``gmm_tune_grid``), chosen once per sampler by ``--tune`` on problems drawn from a separate seed
(:data:`TUNE_SEED`), never on the reported problems (results/gmm_posterior.md documents the procedure).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import sys
import time
import zlib
from typing import Callable, Sequence

import numpy as np
import torch

from benchmarks import parse_set_overrides
from reddiff import registry
from reddiff.core.diffusion import Schedule
from reddiff.operators.matrix import MatrixOperator
from reddiff.priors.perf import keep_freed_heap
from reddiff.priors.dialects import DIALECTS
from reddiff.priors.gmm import GaussianMixturePrior, GMMProblem, mcgdiff_problem
from reddiff.core.rng import BatchRNG, stream_generator, stream_seed

REFERENCES = ("exact", "prior")
TUNE_SEED = 1_000_003


def gmm_samplers(latent: bool = False) -> list[str]:
    """The samplers of the registry that declare GMM settings (``Sampler.gmm_hparams``); others run only by name.
    ``latent``: those defined on latent priors (``needs_latent``), for ``--latent``; otherwise the others."""
    return [n for n in registry.sampler_names() if registry.sampler_class(n).gmm_hparams is not None
            and bool(getattr(registry.sampler_class(n), "needs_latent", False)) == latent]


def hparams(name: str) -> dict:
    """The sampler's fixed GMM hyperparameters (its class's ``gmm_hparams``, chosen once with ``--tune``)."""
    return dict(registry.sampler_class(name).gmm_hparams or {})


def column_sampler(column: str) -> str:
    """The registry sampler of a table column: ``dps`` for ``dps`` and for a ``--sweep`` column ``dps[zeta=1]``."""
    return column.split("[", 1)[0]


def sampler_stream(name: str) -> int:
    """A per-sampler random stream id that depends on the name only (not on registry order)."""
    return 10 + zlib.crc32(name.encode())


# ------------------------------------------------------------------------------------------ sliced Wasserstein
def random_directions(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` directions uniform on the unit sphere of ``R^d``, ``(n, d)`` float64."""
    th = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return th / th.norm(dim=1, keepdim=True)


def _sorted_projections(X: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Sorted projections ``(n, n_dir)`` (float32 matmul, float64 result).  Sorted by numpy: the same values as
    ``torch.sort`` (a sort has one answer), several times faster on the CPU for this shape, and the 13 sorts per
    problem are a large part of the run at small d (results/gmm_posterior.md)."""
    P = (X.detach().to(torch.float32) @ theta.to(X.device, torch.float32).T).cpu()
    return torch.from_numpy(np.sort(P.numpy(), axis=0)).to(torch.float64)


def sliced_wasserstein_sorted(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``(SW_1, SW_2)`` from sorted projections ``a (n, L)`` and ``b (m, L)``: the exact 1-D optimal transport
    between the empirical measures on each direction (any n, m), averaged over the L directions
    (``SW_2 = sqrt(mean W_2^2)``)."""
    n, m = a.shape[0], b.shape[0]
    if n == m:
        diff = (a - b).abs()
        w1, w2sq = diff.mean(0), diff.square().mean(0)
    else:
        # quantile functions are piecewise constant between the breakpoints {i/n} U {j/m}
        u = torch.unique(torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                                    torch.arange(1, m + 1, dtype=torch.float64) / m]))
        du = torch.diff(torch.cat([torch.zeros(1, dtype=torch.float64), u]))
        mid = u - du / 2
        ia = (mid * n).floor().long().clamp_max(n - 1)
        ib = (mid * m).floor().long().clamp_max(m - 1)
        diff = (a[ia] - b[ib]).abs()
        w1, w2sq = (du[:, None] * diff).sum(0), (du[:, None] * diff.square()).sum(0)
    return float(w1.mean()), float(w2sq.mean().sqrt())


def sliced_wasserstein(X: torch.Tensor, Y: torch.Tensor, theta: torch.Tensor) -> tuple[float, float]:
    """``(SW_1, SW_2)`` between the samples ``X (n, d)`` and ``Y (m, d)`` along the unit directions ``theta``.
    Non-finite samples give ``inf``."""
    if not (torch.isfinite(X).all() and torch.isfinite(Y).all()):
        return math.inf, math.inf
    return sliced_wasserstein_sorted(_sorted_projections(X, theta), _sorted_projections(Y, theta))


# ------------------------------------------------------------------------------------------ operator
class HouseholderMatrixOperator(MatrixOperator):
    """:class:`MatrixOperator` whose ``d x d`` factor ``V`` is applied implicitly in ``O(B d k)``.

    ``V`` is the orthogonal completion of ``Vk`` (the right singular vectors, ``d x k``) built from the ``k``
    Householder reflectors of ``QR(Vk)``: ``V = H_1 ... H_k = I - Y T Y^T`` (compact WY form, ``Y`` the ``d x k``
    reflectors, ``T`` ``k x k``), whose first ``k`` columns are ``Vk`` up to signs (moved into ``U``, so
    ``A = U diag(s) V[:, :k]^T`` is unchanged).  The dense ``V`` is still formed once, for the base class's checks
    and its ``matrix``; ``Vt``/``V`` never multiply by it, so DDRM and Pi-GDM cost ``O(B d k)`` per step instead
    of ``O(B d^2)`` (at d = 800, B = 2000: 1.3 GFLOP per call saved).
    """

    name = "matrix_householder"

    @classmethod
    def from_factors(cls, U: torch.Tensor, s: torch.Tensor, Vk: torch.Tensor, sigma_y: float = 0.0,
                     rcond: float = 1e-6) -> "HouseholderMatrixOperator":
        U = torch.as_tensor(U, dtype=torch.float64)
        s = torch.as_tensor(s, dtype=torch.float64).reshape(-1)
        Vk = torch.as_tensor(Vk, dtype=torch.float64)
        d, k = Vk.shape
        if U.shape != (k, k) or s.numel() != k or k > d:
            raise ValueError(f"from_factors: need U (k, k), s (k,), Vk (d, k) with k <= d; got {tuple(U.shape)}, "
                             f"{tuple(s.shape)}, {tuple(Vk.shape)}")
        qr, tau = torch.geqrf(Vk)
        Y = torch.tril(qr, -1)
        Y[torch.arange(k), torch.arange(k)] = 1.0  # reflector j: e_j + qr[j+1:, j]
        sign = torch.sign(torch.diagonal(qr))  # Vk = V[:, :k] diag(sign)   (R = diag(+-1) for orthonormal Vk)
        sign[sign == 0] = 1.0
        pad = torch.zeros(d, d, dtype=torch.float64)
        pad[:, :k] = qr
        V = torch.linalg.householder_product(pad, torch.cat([tau, torch.zeros(d - k, dtype=torch.float64)]))
        op = super().from_svd(U * sign[None, :], s, V, sigma_y=sigma_y, rcond=rcond)
        # T from I - V = Y T Y^T (Y has full column rank)
        Yp = torch.linalg.pinv(Y)
        T = Yp @ (torch.eye(d, dtype=torch.float64) - V) @ Yp.T
        err = (torch.eye(d, dtype=torch.float64) - Y @ T @ Y.T - V).abs().max()
        if err > 1e-10:
            raise RuntimeError(f"HouseholderMatrixOperator: WY form mismatch {float(err):.2e}")
        op._wy64 = (Y, T)
        op._hcache = {}
        return op

    def _wy(self, like: torch.Tensor):
        key = (like.dtype, like.device)
        if key not in self._hcache:
            Y, T = self._wy64
            self._hcache[key] = (Y.to(like), T.to(like), T.T.contiguous().to(like), Y.T.contiguous().to(like))
        return self._hcache[key]

    def Vt(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ V = x - (x Y) T Y^T``."""
        self._check_x(x)
        Y, T, _, Yt = self._wy(x)
        return torch.addmm(x, (x @ Y) @ T, Yt, alpha=-1.0)

    def V(self, z: torch.Tensor) -> torch.Tensor:
        """``z @ V^T = z - (z Y) T^T Y^T``."""
        if z.ndim != 2 or z.shape[1] != self.d:
            raise ValueError(f"V expects (B, {self.d}), got {tuple(z.shape)}")
        Y, _, Tt, Yt = self._wy(z)
        return torch.addmm(z, (z @ Y) @ Tt, Yt, alpha=-1.0)


def problem_operator(pb: GMMProblem) -> HouseholderMatrixOperator:
    return HouseholderMatrixOperator.from_factors(pb.U, pb.s, pb.Vk, sigma_y=pb.sigma_y)


# ------------------------------------------------------------------------------------------ samplers
def build_sampler(name: str, default_steps: int, **overrides):
    """Sampler ``name`` of the registry with its GMM hyperparameters and overrides; ``default_steps`` (``--steps``)
    where neither sets ``steps`` and the class takes one (particle samplers fix their own step count)."""
    import inspect

    cls = registry.sampler_class(name)
    hp = {**hparams(name), **overrides}
    if "steps" in inspect.signature(cls.__init__).parameters:
        hp.setdefault("steps", default_steps)
    return cls(**hp)


# ------------------------------------------------------------------------------------------ problems
def make_problem(d: int, d_y: int, seed: int, index: int, schedule: Schedule, dialect: str = "vp_discrete"):
    """Prior, problem and exact posterior of problem ``index`` of cell ``(d, d_y)``; deterministic in the seed.
    ``dialect``: the prior's view (reddiff/priors/dialects.py); the problem and posterior do not depend on it."""
    g = stream_generator(seed, d, d_y, index, 0)
    prior = GaussianMixturePrior.mcgdiff(d, g, schedule=schedule, dialect=dialect)
    pb = mcgdiff_problem(prior, d_y, g)
    post = prior.posterior(pb.y, pb.A, pb.sigma_y)
    return prior, pb, post


def latent_view(prior: GaussianMixturePrior, pb: GMMProblem, g: torch.Generator):
    """``--latent``: the same problem behind a linear decoder.  The mixture becomes a latent prior with
    ``D(z) = W z`` (``W``: ``(2d, d)``, orthonormal columns from ``g``; ``E = W^T``) and the pixel operator is
    ``A W^T``, so ``A_pix D(z) = A z``: the measurement, the exact (latent) posterior, the floor and the prior
    reference are those of the pixel problem, and a latent sampler's ``z`` is scored like a pixel sampler's ``x``."""
    from reddiff.operators.base import ThroughDecoder
    from reddiff.operators.matrix import MatrixOperator
    from reddiff.priors.latent import LinearDecoderGMM

    d = prior.d
    W = torch.linalg.qr(torch.randn(2 * d, d, generator=g, dtype=torch.float64)).Q
    lat = LinearDecoderGMM(prior.means, W, prior.weights, schedule=prior.schedule, dialect=prior.dialect)
    return lat, ThroughDecoder(MatrixOperator(pb.A @ W.T, sigma_y=pb.sigma_y), lat.decode, lat.encode)


def _summary(values: Sequence[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if not np.isfinite(v).all():
        return {"mean": None, "ci95": None, "n_nonfinite": int((~np.isfinite(v)).sum())}
    ci = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "ci95": float(ci) if math.isfinite(ci) else None, "n_nonfinite": 0}


def nearest_mode(prior: GaussianMixturePrior, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest prior mean for each sample and the squared distance to it."""
    X = X.to(torch.float64)
    xp = X @ prior.mean_basis
    d2 = ((X * X).sum(-1, keepdim=True) - 2 * xp @ prior.mean_coords.T
          + (prior.mean_coords ** 2).sum(-1)[None]).clamp_min(0)
    dmin, idx = d2.min(-1)
    return idx, dmin


def run_problem(d: int, d_y: int, p: int, *, samples: int, steps: int, seed: int, samplers: Sequence[str],
                n_dirs: int = 1000, keep: bool = False, threads: int = 1, overrides: dict | None = None,
                dialect: str = "vp_discrete", latent: bool = False) -> dict:
    """Every method on problem ``p`` of cell ``(d, d_y)``; deterministic in ``(seed, d, d_y, p)`` alone.
    ``latent``: the samplers run on :func:`latent_view` of the problem (same scores' meaning).

    Per method: ``sw``/``sw2`` against ``samples`` exact-posterior samples (1000 directions shared by the methods),
    ``seconds`` (wall time of the sampler call), and two diagnostics on the nearest prior mode of each sample:
    ``mode_tv`` (total variation between the sampler's and the exact samples' mode histograms) and
    ``spread`` (mean squared distance to the nearest mode divided by the same for the exact samples);
    ``mode_tv_to_prior`` compares the mode histogram with the prior weights instead (small: the data were ignored
    when choosing modes).  ``data_w1`` is the data-space score: along each measured direction (the orthonormal
    right singular vectors of A, which span its rows), the 1-D W1 distance between the method's and the exact
    samples' projections in units of the exact posterior's standard deviation there, averaged over the ``d_y``
    directions (``data_w1_max``: the worst direction); SW over random directions barely sees these errors.  ``overrides[name]`` replaces some of the class's ``gmm_hparams`` for sampler ``name`` (ablations).
    """
    torch.set_num_threads(threads)
    keep_freed_heap()
    schedule = Schedule()
    prior, pb, post = make_problem(d, d_y, seed, p, schedule, dialect)
    op = problem_operator(pb)
    run_prior, run_op = latent_view(prior, pb, stream_generator(seed, d, d_y, p, 4)) if latent else (prior, op)
    g_ref = stream_generator(seed, d, d_y, p, 1)
    theta = random_directions(n_dirs, d, g_ref)
    ref = post.sample(samples, g_ref)
    ref_sorted = _sorted_projections(ref, theta)
    ref_mode, ref_d2 = nearest_mode(prior, ref)
    ref_hist = torch.bincount(ref_mode, minlength=prior.K).double() / samples
    Vk = pb.Vk.to(torch.float64)                      # (d, d_y) measured directions
    ref_meas = torch.sort(ref.to(torch.float64) @ Vk, dim=0).values
    ref_meas_sd = ref_meas.std(0).clamp_min(1e-12)
    out: dict = {"sigma_y": pb.sigma_y, "singulars": pb.s.tolist(), "post_max_weight": float(post.weights.max()),
                 "methods": {}}
    kept: dict = {}

    def score(name, X, seconds):
        r = {"seconds": seconds, "sw": math.inf, "sw2": math.inf, "mode_tv": None, "mode_tv_to_prior": None,
             "spread": None, "data_w1": None, "data_w1_max": None}
        if torch.isfinite(X).all():
            r["sw"], r["sw2"] = sliced_wasserstein_sorted(_sorted_projections(X, theta), ref_sorted)
            meas = torch.sort(X.to(torch.float64) @ Vk, dim=0).values
            if meas.shape == ref_meas.shape:
                w1 = (meas - ref_meas).abs().mean(0) / ref_meas_sd
                r["data_w1"], r["data_w1_max"] = float(w1.mean()), float(w1.max())
            mode, d2 = nearest_mode(prior, X)
            hist = torch.bincount(mode, minlength=prior.K).double() / X.shape[0]
            r["mode_tv"] = float(0.5 * (hist - ref_hist).abs().sum())
            r["mode_tv_to_prior"] = float(0.5 * (hist - prior.weights).abs().sum())
            r["spread"] = float(d2.mean() / ref_d2.mean())
        out["methods"][name] = r
        if keep:
            kept[name] = X.detach().to(torch.float64).cpu()

    t0 = time.perf_counter()
    X = post.sample(samples, stream_generator(seed, d, d_y, p, 2))
    score("exact", X, time.perf_counter() - t0)
    t0 = time.perf_counter()
    X = prior.sample(samples, stream_generator(seed, d, d_y, p, 3))
    score("prior", X, time.perf_counter() - t0)
    y = pb.y.to(torch.float32)[None, :].expand(samples, d_y).contiguous()
    for name in samplers:  # a --sweep column "name[key=value]" runs name with its overrides and name's noise
        base = column_sampler(name)
        sampler = build_sampler(base, steps, **(overrides or {}).get(name, {}))
        rng = BatchRNG(stream_seed(seed, d, d_y, p, sampler_stream(base)), per_item=False)
        t0 = time.perf_counter()
        X = sampler.sample(y, run_op, run_prior, rng)
        score(name, X, time.perf_counter() - t0)
    if keep:
        kept["reference"] = ref
        kept["x_star"] = pb.x_star
        out["kept"] = kept
    return out


def aggregate(per_problem: list[dict]) -> dict:
    """Cell summary from the per-problem results (in problem order)."""
    names = list(per_problem[0]["methods"])
    cell = {}
    for n in names:
        rs = [pp["methods"][n] for pp in per_problem]
        s1, s2 = _summary([r["sw"] for r in rs]), _summary([r["sw2"] for r in rs])
        tv = [r["mode_tv"] for r in rs if r["mode_tv"] is not None]
        tvp = [r["mode_tv_to_prior"] for r in rs if r["mode_tv_to_prior"] is not None]
        sp = [r["spread"] for r in rs if r["spread"] is not None]
        dw = [r.get("data_w1") for r in rs if r.get("data_w1") is not None]
        cell[n] = {"sw_mean": s1["mean"], "sw_ci95": s1["ci95"], "seconds": float(np.mean([r["seconds"] for r in rs])),
                   "sw2_mean": s2["mean"], "sw2_ci95": s2["ci95"], "n_nonfinite": s1["n_nonfinite"],
                   "mode_tv_mean": float(np.mean(tv)) if tv else None,
                   "mode_tv_to_prior_mean": float(np.mean(tvp)) if tvp else None,
                   "spread_median": float(np.median(sp)) if sp else None,
                   # data-space score (run_problem): W1 along the measured directions / posterior sd, and mode TV
                   "data_w1": float(np.mean(dw)) if dw else None,
                   "data_w1_max": float(np.max([r["data_w1_max"] for r in rs if r.get("data_w1_max") is not None]))
                   if dw else None,
                   "mode_tv": float(np.mean(tv)) if tv else None,
                   "sw_per_problem": [round(r["sw"], 6) if math.isfinite(r["sw"]) else None for r in rs]}
    return cell


def run_all(dims: Sequence[int], dims_y: Sequence[int], *, problems: int, samples: int, steps: int, seed: int,
            samplers: Sequence[str], workers: int = 1, plot_cell: Sequence[int] | None = None,
            overrides: dict | None = None, log: Callable = print, dialect: str = "vp_discrete",
            latent: bool = False) -> tuple[dict, dict, dict]:
    """All cells; returns (results[str(d)][str(d_y)], per-problem records, kept samples of the plotted problem).

    With ``workers > 1`` the problems run in separate processes (one torch thread each); every problem is seeded
    by ``(seed, d, d_y, p)``, so the numbers do not depend on ``workers``.
    """
    tasks = [(d, dy, p) for d in dims for dy in dims_y for p in range(problems)]
    kw = dict(samples=samples, steps=steps, seed=seed, samplers=list(samplers), overrides=overrides or {},
              dialect=dialect, latent=latent)
    keep_of = lambda d, dy, p: plot_cell is not None and [d, dy] == list(plot_cell) and p == 0
    done: dict = {}
    t_start = time.perf_counter()

    def record(task, r):
        done[task] = r
        d, dy, p = task
        log(f"  [{len(done)}/{len(tasks)} {time.perf_counter() - t_start:.0f} s] d={d} d_y={dy} problem {p}: "
            + " ".join(f"{n}={m['sw']:.3f}" for n, m in r["methods"].items()))

    if workers <= 1:
        for task in tasks:
            record(task, run_problem(*task, keep=keep_of(*task), **kw))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        order = sorted(tasks, key=lambda t: -t[0])  # the expensive d first, for load balance
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(run_problem, *t, keep=keep_of(*t), **kw): t for t in order}
            for f in as_completed(futs):
                record(futs[f], f.result())
    results: dict = {}
    per_problem: dict = {}
    kept: dict = {}
    for d in dims:
        results[str(d)] = {}
        per_problem[str(d)] = {}
        for dy in dims_y:
            recs = [done[(d, dy, p)] for p in range(problems)]
            for r in recs:
                kept.update(r.pop("kept", {}))
            results[str(d)][str(dy)] = aggregate(recs)
            per_problem[str(d)][str(dy)] = recs
    return results, per_problem, kept


# ------------------------------------------------------------------------------------------ reporting
def markdown_table(res: dict) -> str:
    """The results table (mean ± 95% CI of SW_1; mean seconds per problem) from the benchmark JSON."""
    present = list(dict.fromkeys(n for dd in res["results"].values() for c in dd.values() for n in c))
    known = registry.sampler_names()
    samplers = [n for n in known if n in present] + [n for n in present if n not in known and n not in REFERENCES]
    names = samplers + [n for n in REFERENCES if n in present]
    head = "| d | d_y | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names) + "\n"
    rows = []
    for d, by_dy in res["results"].items():
        for dy, cell in by_dy.items():
            vals = []
            for n in names:
                c = cell.get(n)
                if c is None:
                    vals.append("–")
                elif c["sw_mean"] is None:
                    vals.append(f"diverged ({c['n_nonfinite']} problems)")
                else:
                    flag = ""
                    if n in samplers and cell.get("prior", {}).get("sw_mean") is not None \
                            and c["sw_mean"] >= cell["prior"]["sw_mean"]:
                        flag = " **≥prior**"
                    vals.append(f"{c['sw_mean']:.3f} ± {c['sw_ci95']:.3f}{flag}")
            rows.append(f"| {d} | {dy} | " + " | ".join(vals) + " |")
    secs = ["", "Mean seconds per problem (one batch of samples; the references only draw samples):", "",
            "| d | d_y | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for d, by_dy in res["results"].items():
        for dy, cell in by_dy.items():
            secs.append(f"| {d} | {dy} | " + " | ".join(
                f"{cell[n]['seconds']:.2f}" if n in cell else "–" for n in names) + " |")
    diag = ["", "Diagnostics, from the nearest prior mode of each sample: **TV** = total variation between the mode "
            "histograms of the method and of the exact samples (mean over problems); **TVp** = the same against the "
            "prior weights (near 0: modes chosen as if there were no data); **spread** = mean squared distance to "
            "the nearest mode relative to the exact samples (median over problems; 1 = right width, < 1 collapsed). "
            "Cells read TV / TVp / spread.", "",
            "| d | d_y | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for d, by_dy in res["results"].items():
        for dy, cell in by_dy.items():
            diag.append(f"| {d} | {dy} | " + " | ".join(
                f"{cell[n]['mode_tv_mean']:.2f} / {cell[n]['mode_tv_to_prior_mean']:.2f} / {cell[n]['spread_median']:.2f}"
                if n in cell and cell[n].get("mode_tv_mean") is not None else "–" for n in names) + " |")
    data = ["", "Data-space score (the error where the measurement constrains the posterior): **W1** = 1-D Wasserstein "
            "distance between the method's and the exact samples' projections on the measured directions (the "
            "right singular vectors of A), in posterior standard deviations, mean over directions and problems "
            "(exact: the sampling floor; 1 = off by a whole posterior sd); **TV** = mode-weight total variation "
            "against the exact samples.  SW over random directions hardly sees the first (d_y of d directions "
            "are measured) and its ranking is dominated by the second.  Cells read W1 / TV.", "",
            "| d | d_y | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for d, by_dy in res["results"].items():
        for dy, cell in by_dy.items():
            data.append(f"| {d} | {dy} | " + " | ".join(
                f"{cell[n]['data_w1']:.2f} / {cell[n]['mode_tv']:.2f}"
                if n in cell and cell[n].get("data_w1") is not None and cell[n].get("mode_tv") is not None
                else "–" for n in names) + " |")
    paired = ["", "Paired comparison with the prior reference on the same problems: mean over problems of "
              "SW(prior) − SW(method) ± 1.96·std/√n, and the number of problems where the method is closer than "
              "the prior samples:", "",
              "| d | d_y | " + " | ".join(samplers) + " |",
              "|---|---|" + "---|" * len(samplers)]
    for d, by_dy in res["results"].items():
        for dy, cell in by_dy.items():
            vals = []
            for n in names:
                if n not in samplers:
                    continue
                a, b = cell.get("prior", {}).get("sw_per_problem"), cell.get(n, {}).get("sw_per_problem")
                if not a or not b or any(v is None for v in a + b):
                    vals.append("–")
                    continue
                x = np.asarray(a) - np.asarray(b)
                ci = 1.96 * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else float("nan")
                vals.append(f"{x.mean():.2f} ± {ci:.2f} ({int((x > 0).sum())}/{len(x)})")
            paired.append(f"| {d} | {dy} | " + " | ".join(vals) + " |")
    return (head + "\n".join(rows) + "\n" + "\n".join(data) + "\n" + "\n".join(paired) + "\n"
            + "\n".join(secs) + "\n" + "\n".join(diag) + "\n")


def table_block(res: dict) -> str:
    """The generated markdown block of a benchmark run (its command, date, wall time and tables)."""
    m = res["meta"]
    cpu = f", {m['cpu_seconds']:.0f} CPU-seconds" if m.get("cpu_seconds") is not None else ""
    return (f"Command: `{m['command']}`  \nDate: {m['date']}; wall time {m['wall_seconds']:.0f} s{cpu} "
            f"({m.get('workers', 1)} worker process(es), {m['threads']} torch thread(s) each).\n\n" + markdown_table(res))


def acceptance(res: dict) -> list[str]:
    """Cells where a data-using sampler's mean SW is not below the prior-vs-posterior reference."""
    bad = []
    for d, by_dy in res["results"].items():
        for dy, cell in by_dy.items():
            ref = cell.get("prior", {}).get("sw_mean")
            for n in cell:
                if n not in REFERENCES and (cell[n]["sw_mean"] is None or ref is None or cell[n]["sw_mean"] >= ref):
                    bad.append(f"{n} at d={d}, d_y={dy}: {cell[n]['sw_mean']} vs prior {ref}")
    return bad


def replace_block(path: str, tag: str, text: str) -> None:
    """Replace the text between ``<!-- tag:start -->`` and ``<!-- tag:end -->`` in ``path`` (appended if absent)."""
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    old = open(path).read() if os.path.exists(path) else ""
    if start in old and end in old:
        new = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, old, flags=re.S)
    else:
        new = old + ("\n" if old else "") + block + "\n"
    with open(path, "w") as f:
        f.write(new)


def plot_2d(kept: dict, path: str, title: str) -> None:
    """Samples of each method on one problem, projected on coordinates (x_1, x_2), over the exact posterior."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in (*registry.sampler_names(), "exact", "prior") if n in kept]
    ref = kept["reference"].numpy()
    ncol = min(3, len(names))
    nrow = -(-len(names) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.1 * ncol, 3.1 * nrow + 0.4), sharex=True, sharey=True,
                             squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    axes = list(axes.flat)
    lim = 26
    for ax, n in zip(axes, names):
        X = kept[n].numpy()
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.6", alpha=0.35, lw=0, label="exact posterior")
        ax.scatter(X[:, 0], X[:, 1], s=2, c="C3", alpha=0.35, lw=0, label=n)
        xs = kept["x_star"].numpy()
        ax.scatter([xs[0]], [xs[1]], marker="x", c="k", s=25)
        ax.set_title(n, fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    for ax in axes[: len(names)]:
        ax.set_xlabel("$x_1$", fontsize=8)
        ax.set_ylabel("$x_2$", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ Pi-GDM diagnostic
def pigdm_covariance_table(dims: Sequence[int], dims_y: Sequence[int], problems: int, seed: int,
                           ts: Sequence[int] = (900, 800, 700, 600, 500, 300, 100), n: int = 200) -> str:
    """How far Pi-GDM's ``r_t^2 = 1 - a_t`` is from the exact ``Cov[x0 | x_t]`` seen through A.

    For ``x_t`` from ``p(x_t | y)`` (the forward process applied to exact posterior samples), the exact covariance
    is Tweedie's ``Cov[x0 | x_t] = (1 - a)/sqrt(a) dE[x0|x_t]/dx_t`` (autograd through the exact denoiser).  The
    table gives the median over samples and problems of the largest eigenvalue of
    ``(A Cov A^T + s^2 I)`` divided by that of ``(r_t^2 A A^T + s^2 I)``: 1 where Pi-GDM's likelihood is exact,
    ``>> 1`` where its guidance (which divides by the latter) overshoots.
    """
    schedule = Schedule()
    lines = ["| d | d_y | " + " | ".join(f"t={t}" for t in ts) + " |", "|---|---|" + "---|" * len(ts)]
    for d in dims:
        for dy in dims_y:
            ratios = {t: [] for t in ts}
            for p in range(problems):
                prior, pb, post = make_problem(d, dy, seed, p, schedule)
                g = stream_generator(seed, d, dy, p, 4)
                x0 = post.sample(n, g)
                A, s2 = pb.A, pb.sigma_y ** 2
                base = torch.linalg.eigvalsh(A @ A.T)
                for t in ts:
                    a = float(schedule.alpha_bar_at(t))
                    xt = (math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(x0.shape, generator=g, dtype=torch.float64))
                    xt.requires_grad_(True)
                    x0h = prior.x0(xt, t)
                    AJAt = torch.zeros(n, dy, dy, dtype=torch.float64)
                    for j in range(dy):
                        (gj,) = torch.autograd.grad((x0h @ A[j]).sum(), xt, retain_graph=True)
                        AJAt[:, j, :] = gj @ A.T
                    ACA = (1 - a) / math.sqrt(a) * 0.5 * (AJAt + AJAt.transpose(1, 2))
                    true = torch.linalg.eigvalsh(ACA + s2 * torch.eye(dy, dtype=torch.float64))[:, -1]
                    ratios[t].append(true / float((1 - a) * base[-1] + s2))
            lines.append(f"| {d} | {dy} | " + " | ".join(f"{float(torch.cat(ratios[t]).median()):.3g}" for t in ts) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ tuning
def _run_configs(name: str, configs: list[dict], y: torch.Tensor, n: int, op, prior, steps: int, rng_seed: int):
    """Samples ``(n, len(configs), d)``: configurations that differ only in per-item hyperparameters share one
    batched call (item ``b * K + k`` is sample ``b`` of configuration ``k``); the others run one call each."""
    per = tuple(registry.sampler_class(name).per_item)
    groups: dict = {}
    for k, c in enumerate(configs):
        shared = tuple(sorted((key, v) for key, v in c.items() if key not in per))
        groups.setdefault(shared, []).append(k)
    out = torch.empty(n, len(configs), prior.d)
    for g_i, (shared, idx) in enumerate(groups.items()):
        K = len(idx)
        kw = dict(shared)
        for key in per:
            if any(key in configs[k] for k in idx):
                vals = [configs[k].get(key, hparams(name).get(key)) for k in idx]
                kw[key] = [vals[j] for _ in range(n) for j in range(K)]
        sampler = build_sampler(name, steps, **kw)
        rng = BatchRNG(stream_seed(rng_seed, g_i), per_item=False)
        X = sampler.sample(y.expand(n * K, y.shape[1]).contiguous(), op, prior, rng)
        out[:, idx] = X.reshape(n, K, -1).to(out)
    return out


def tune(names: Sequence[str], *, dims: Sequence[int], dims_y: Sequence[int], problems: int, samples: int,
         ref_samples: int, steps: int, seed: int = TUNE_SEED, log: Callable = print, latent: bool = False) -> dict:
    """Grid search per sampler on problems from ``seed`` (separate from the reported ones).

    Score of a configuration: the mean over cells of ``mean SW / mean SW(prior)``.  Every configuration of a
    sampler runs on the same problems; one configuration wins per sampler, for all cells.
    """
    import itertools

    schedule = Schedule()
    out: dict = {}
    for name in names:
        grid = dict(registry.sampler_class(name).gmm_tune_grid)
        if not grid:
            raise ValueError(f"{name}: its class declares no gmm_tune_grid")
        keys = list(grid)
        configs = [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]
        ratios = np.zeros((len(configs), len(dims) * len(dims_y)))
        t_start = time.perf_counter()
        for c_i, (d, dy) in enumerate(itertools.product(dims, dims_y)):
            sw = np.zeros((len(configs), problems))
            sw_prior = np.zeros(problems)
            for p in range(problems):
                prior, pb, post = make_problem(d, dy, seed, p, schedule)
                op = problem_operator(pb)
                run_prior, run_op = latent_view(prior, pb, stream_generator(seed, d, dy, p, 4)) if latent else (prior, op)
                g = stream_generator(seed, d, dy, p, 1)
                theta = random_directions(1000, d, g)
                ref_sorted = _sorted_projections(post.sample(ref_samples, g), theta)
                sw_prior[p] = sliced_wasserstein_sorted(
                    _sorted_projections(prior.sample(samples, stream_generator(seed, d, dy, p, 3)), theta), ref_sorted)[0]
                X = _run_configs(name, configs, pb.y.to(torch.float32)[None, :], samples, run_op, run_prior, steps,
                                 stream_seed(seed, d, dy, p, sampler_stream(name)))
                for k in range(len(configs)):
                    sw[k, p] = (sliced_wasserstein_sorted(_sorted_projections(X[:, k], theta), ref_sorted)[0]
                                if torch.isfinite(X[:, k]).all() else math.inf)
            ratios[:, c_i] = sw.mean(1) / sw_prior.mean()
            log(f"  tune {name} d={d} d_y={dy}: prior SW {sw_prior.mean():.3f}; best "
                f"{configs[int(np.argmin(sw.mean(1)))]} SW {sw.mean(1).min():.3f} ({time.perf_counter() - t_start:.0f} s)")
        score = ratios.mean(1)
        best = int(np.argmin(score))
        out[name] = {"configs": configs, "score": score.tolist(), "ratios": ratios.tolist(), "best": configs[best],
                     "seconds": time.perf_counter() - t_start}
        log(f"tune {name}: best {configs[best]} (mean SW/SW_prior {score[best]:.3f})")
    return out


def tuning_markdown(name: str, t: dict, meta: dict) -> str:
    """The tuning table of one sampler (every configuration, best first)."""
    keys = list(t["configs"][0])
    lines = [f"**{name}**: chosen {', '.join(f'{k}={v}' for k, v in t['best'].items())}. Tuning run: "
             f"`{meta['command']}` ({meta['date']}); cells d ∈ {meta['dims']}, d_y ∈ {meta['dims_y']}, "
             f"{meta['problems']} problems per cell, {meta['samples']} sampler samples against {meta['ref_samples']} "
             f"exact ones, tuning seed {meta['seed']}. Score = mean over cells of mean SW / mean SW(prior); "
             "worst cell = the largest of those ratios.", "",
             "| " + " | ".join(keys) + " | score | worst cell |", "|" + "---|" * (len(keys) + 2)]
    for i in np.argsort(t["score"]):
        c = t["configs"][i]
        lines.append("| " + " | ".join(str(c[k]) for k in keys) + f" | {t['score'][i]:.3f} | {max(t['ratios'][i]):.3f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ CLI
def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the worker processes)."""
    import resource

    return sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def _jsonable(obj):
    """Non-finite floats -> None (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gmm_posterior", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=_ints, default=[8, 80, 800])
    ap.add_argument("--dims-y", type=_ints, default=[1, 2, 4])
    ap.add_argument("--problems", type=int, default=20)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results JSON here")
    ap.add_argument("--samplers", default=None,
                    help="comma-separated registry names (default: every sampler that declares gmm_hparams)")
    ap.add_argument("--quick", action="store_true", help="smoke test: d 8,80; d_y 1,2; 3 problems; 500 samples; 50 steps")
    ap.add_argument("--md", default=None, help="update the generated table block of this markdown file")
    ap.add_argument("--md-tag", default="table", help="name of that block (<!-- TAG:start --> ... <!-- TAG:end -->)")
    ap.add_argument("--set", action="append", default=[], metavar="SAMPLER.KEY=VALUE",
                    help="override a GMM hyperparameter of a sampler (ablations; repeatable), e.g. --set dps.zeta=3")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="only rewrite the --md block (and print the tables) from an existing results JSON")
    ap.add_argument("--pigdm-cov", action="store_true",
                    help="print the Pi-GDM covariance diagnostic (exact A Cov[x0|x_t] A^T vs r_t^2 A A^T) instead")
    ap.add_argument("--plot", default=None, help="write a 2-D projection plot (problem 0 of --plot-cell)")
    ap.add_argument("--plot-cell", type=_ints, default=[80, 1], help="d,d_y of the plotted problem")
    ap.add_argument("--dialect", default="vp_discrete", choices=list(DIALECTS),
                    help="the prior's view (reddiff/priors/dialects.py); the exact GMM denoiser is the same in each")
    ap.add_argument("--latent", action="store_true",
                    help="the latent solvers (needs_latent) on the same problems behind a linear decoder D(z) = W z "
                         "(W: 2d x d); default dims 8,80 (at d = 800 the dense decoder dominates)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--workers", type=int, default=1, help="processes running problems in parallel (default 1)")
    ap.add_argument("--tune", action="store_true", help="grid-search the hyperparameters on the tuning seed instead")
    ap.add_argument("--sweep", action="append", default=[], metavar="SAMPLER.KEY=V1,V2,...",
                    help="a column SAMPLER[KEY=V] per value (the sampler's --set values, then KEY=V; the sampler's "
                         "noise stream: paired), after the --samplers columns; repeatable")
    args = ap.parse_args(argv)

    torch.set_num_threads(max(1, args.threads))
    keep_freed_heap()
    if args.latent and "--dims" not in " ".join(sys.argv[1:] if argv is None else argv):
        args.dims = [8, 80]
    samplers = gmm_samplers(args.latent) if args.samplers is None else [s for s in args.samplers.split(",") if s]
    for s in samplers:
        if s not in registry.sampler_names():
            ap.error(f"unknown sampler {s!r}; valid: {', '.join(registry.sampler_names())}")
    if args.quick:
        args.dims, args.dims_y, args.problems, args.samples, args.steps = [8, 80], [1, 2], 3, 500, 50
    for d in args.dims:
        if d <= 0 or d % 2:
            ap.error(f"dimensions must be even (coordinate pairs), got {d}")
    for dy in args.dims_y:
        if not 1 <= dy <= min(args.dims):
            ap.error(f"d_y must be in [1, min(dims)], got {dy}")
    if args.problems < 2 or args.samples < 2:
        ap.error("need at least 2 problems and 2 samples")
    try:
        overrides = parse_set_overrides(args.set, registry.sampler_names())
    except ValueError as e:
        ap.error(str(e))
    for item in args.sweep:
        name, _, values = item.partition("=")
        try:
            for v in values.split(","):
                one = parse_set_overrides([f"{name}={v}"], registry.sampler_names())
                (base, kw), = one.items()
                (key, val), = kw.items()
                label = f"{base}[{key}={v}]"
                samplers.append(label)
                overrides[label] = {**overrides.get(base, {}), key: val}
        except ValueError as e:
            ap.error(str(e).replace("--set", "--sweep"))
    for name, kw in overrides.items():  # fail early on a bad key or value
        name = column_sampler(name)
        try:
            build_sampler(name, args.steps, **kw)
        except (TypeError, ValueError) as e:
            ap.error(f"--set {name}: {e}")
    command = "python -m benchmarks.gmm_posterior " + " ".join(sys.argv[1:] if argv is None else argv)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t_all = time.perf_counter()

    if args.render:
        with open(args.render) as f:
            res = json.load(f)
        print(markdown_table(res))
        if args.md:
            replace_block(args.md, args.md_tag, table_block(res))
        return 0

    if args.pigdm_cov:
        text = pigdm_covariance_table(args.dims, args.dims_y, args.problems, args.seed)
        text = f"Command: `{command}` ({date})\n\n" + text
        print(text)
        if args.md:
            replace_block(args.md, args.md_tag, text)
        return 0

    if args.tune:
        tuned = tune(samplers, dims=args.dims, dims_y=args.dims_y, problems=args.problems, samples=args.samples,
                     ref_samples=2000, steps=args.steps, seed=TUNE_SEED + args.seed, latent=args.latent)
        meta = {"command": command, "date": date, "wall_seconds": time.perf_counter() - t_all, "dims": args.dims,
                "dims_y": args.dims_y, "problems": args.problems, "samples": args.samples, "ref_samples": 2000,
                "seed": TUNE_SEED + args.seed}
        for name, t in tuned.items():
            text = tuning_markdown(name, t, meta)
            print(text)
            if args.md:
                replace_block(args.md, f"tuning-{name}", text)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(_jsonable({"meta": meta, "tuning": tuned}), f, indent=1)
        return 0

    results, per_problem, kept = run_all(args.dims, args.dims_y, problems=args.problems, samples=args.samples,
                                         steps=args.steps, seed=args.seed, samplers=samplers, workers=args.workers,
                                         plot_cell=args.plot_cell if args.plot else None, overrides=overrides,
                                         dialect=args.dialect, latent=args.latent)
    wall = time.perf_counter() - t_all
    res = {
        "meta": {"command": command, "date": date, "wall_seconds": wall, "dims": args.dims, "dims_y": args.dims_y,
                 "problems": args.problems, "samples": args.samples, "steps": args.steps, "seed": args.seed,
                 "directions": 1000, "sw": "SW_1 = mean over directions of W_1 (sw2_*: sqrt(mean W_2^2))",
                 "schedule": "DDPM linear beta 1e-4..0.02, T=1000", "dtype": "float32 samplers, float64 exact",
                 "hparams": {s: {**hparams(column_sampler(s)), **overrides.get(s, {})} for s in samplers},
                 "threads": torch.get_num_threads(),
                 "workers": args.workers, "cpu_seconds": _cpu_seconds(),
                 "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()},
        "results": results,
        "problems": per_problem,
    }
    if args.dialect != "vp_discrete":  # absent for the default: the files made before dialects stay comparable
        res["meta"]["dialect"] = args.dialect
    if args.latent:
        res["meta"]["latent"] = "linear decoder W (2d x d, orthonormal columns), pixel operator A W^T"
    table = markdown_table(res)
    print(table)
    print(f"wall time {wall:.0f} s")
    bad = acceptance(res)
    print("acceptance (every sampler below the prior reference in every cell):", "OK" if not bad else bad)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_jsonable(res), f, indent=1)
    if args.md:
        replace_block(args.md, args.md_tag, table_block(res))
    if args.plot and kept:
        plot_2d(kept, args.plot, f"d={args.plot_cell[0]}, d_y={args.plot_cell[1]}, problem 0: samples (red) vs "
                f"exact posterior (grey), coordinates (x1, x2); x = x*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
