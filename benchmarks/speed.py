"""Speed benchmark (docs/DESIGN.md contract 4): each sampler's wall time against the cost of its network calls.

    python -m benchmarks.speed [--quick] [--json FILE] [--md FILE] [--prior embedded|adm256-random|ffhq256-random]
                               [--batch 1,8] [--steps N] [--samplers reddiff,dps,...]
                               [--dtype fp32|bf16|fp16] [--channels-last] [--compile] [--device cpu|cuda|auto]
                               [--threads N] [--repeats 1] [--forward-repeats 7] [--sweep-steps 10] [--jobs 1]

Task: ``sr4`` (x4 block average, conf/task/sr4.yaml) on the demo images (reddiff/assets/demo, 64x64; random images
if they are missing or the prior is not 64x64), each sampler's default step count from its
``conf/sampler`` YAML (``--steps`` sets one for all).  The samplers and their limits come from ``reddiff.registry``.

**Every measurement runs in its own subprocess** (so peak RSS values do not mix), one at a time (``--jobs 1``):

* one per (sampler, batch): load the prior, build the problem, one short warm-up run of the sampler (2 steps),
  ``--repeats`` timed runs (median wall), then read the process's peak RSS, then time one bare network call at the
  same batch (2 warm-up calls, median of ``--forward-repeats``): ``torch.no_grad`` forward for RED-diff, DDRM and
  DDIM; forward + backward to the input (a vector-Jacobian product) for DPS and Pi-GDM.  The bare call is timed
  after the peak RSS is read, so it cannot raise the sampler's peak.
* one per batch for a bare ``no_grad`` forward loop and one for a bare forward+backward loop (``--loop-calls``
  calls on the same inputs, same imports): the peak-RSS references.
* one for the batched sweep: K = 4 RED-diff configurations (lambda x lr) of one image as one batch of 4
  (:func:`reddiff.run.sweep.batched_sweep`) against 4 separate runs (:func:`reddiff.run.sweep.separate_runs`),
  ``--sweep-steps`` steps, median of ``--sweep-repeats`` alternating runs.

Reported per sampler (JSON, one entry per sampler name; the contracted keys first):

* ``wall_over_forward`` = wall / (NFE x one bare call at the same batch);
* ``peak_rss_mb`` (the sampler process's peak resident set, MiB);
* ``images_per_second`` = batch / wall;
* ``batch``, ``nfe``, ``forward_ms``, ``forward_kind``, ``wall_s``, ``device``, ``overhead_ms_per_step`` (wall / NFE
  minus the bare call), ``step_median_over_forward`` (median interval between consecutive network calls over the bare
  call: a noise-robust version of the ratio on a busy machine; CPU only), ``cpu_over_forward`` (the same ratio in
  process CPU time, which time spent descheduled by other processes does not inflate; CPU only; with one thread it
  isolates the sampler's own work best), ``wall_over_network_time`` (wall over the time spent inside the network --
  forward, and backward for DPS / Pi-GDM -- measured during the same run: the least noisy measure of the sampler's
  own overhead on a shared machine; CPU only; for latent solvers the decoder's and encoder's time counts with the
  network's), ``rss_over_bare_loop`` (peak RSS over the
  bare loop of the same kind at the same batch), ``peak_gpu_mb`` on CUDA, and ``by_batch`` with all of this for
  every batch.  The top-level values are those of the largest batch.  A sampler that cannot be imported gets
  ``{"missing": reason}``; one that fails gets ``{"error": ...}``.

Plus ``bare_forward`` (the reference loops), ``sweep`` (the batched-sweep ratio) and ``meta`` (command, date, machine,
targets and pass/fail ``checks``).  Targets (on the 2-core CPU, embedded prior, batch 8, 100 steps):
``wall_over_forward`` <= 1.05 for RED-diff, DDRM and DDIM, <= 1.10 for DPS and Pi-GDM; RED-diff peak RSS <= 1.15 x
the bare no_grad loop's; batched sweep <= 0.4 x separate runs.

``--md FILE`` writes a Markdown report (command, date, machine, tables); with ``--json FILE`` and no ``--md`` it is
written next to the JSON (``FILE`` with suffix ``.md``), so ``make bench`` regenerates results/speed.md.
Run time: the committed command of results/speed.md (every sampler, 10 steps, ``--no-sweep``, ``--threads 1``) took
1665-1860 s on the quiet 2-core machine (2026-12-07); the defaults (each sampler's own step count, mostly 100) cost
more in proportion and were not timed in full.  On a
machine shared with other jobs use ``--threads 1``: two OpenMP threads competing with another busy process can slow
every call down by an order of magnitude.  Timings taken under load are noisy (+-10% between processes); the
in-run ratio ``wall_over_network_time`` and ``step_median_over_forward`` tell sampler overhead from load.

``--quick`` is a smoke test (batch 1, 2 steps, each sampler at its ``test_overrides``, one thread per worker, two
workers at a time): its numbers are not for reporting.  ``--set SAMPLER.KEY=VALUE`` changes one constructor setting
of one sampler; ``make bench`` runs D-Flow with one outer iteration of 3 L-BFGS evaluations instead of 20 x 20
(8060 network calls with a backward each at 10 steps: over an hour at batch 8 here); the ratios are per call.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from benchmarks import parse_set_overrides

ROOT = Path(__file__).resolve().parents[1]

def speed_samplers() -> list[str]:
    """Every registry sampler that calls the network (its YAML has ``steps``); ``pinv`` and the like are free.  A
    latent solver (``needs_latent``) is timed on the tiny latent model (:func:`needs_latent`)."""
    from reddiff import registry

    return [n for n in registry.sampler_names() if "steps" in registry.sampler_config(n)]


def forward_kind(name: str) -> str:
    """The bare call a sampler is compared with: ``fwd_bwd`` when it differentiates through the network."""
    from reddiff import registry

    return "fwd_bwd" if registry.sampler_info(name)["needs_grad"] else "no_grad"


def target(name: str) -> float:
    """The sampler's wall/forward limit (1.05, or 1.10 with a network gradient; ``reddiff.registry``)."""
    from reddiff import registry

    return registry.sampler_info(name)["speed_limit"]


def needs_latent(name: str) -> bool:
    """A latent solver: timed on the tiny latent model (``prior=latent_tiny``) with the data term through its
    decoder, whatever ``--prior`` says."""
    from reddiff import registry

    return bool(getattr(registry.sampler_class(name), "needs_latent", False))


def default_steps(name: str) -> int:
    from reddiff import registry

    return int(registry.sampler_config(name)["steps"])


RSS_TARGET = 1.15
SWEEP_TARGET = 0.4
SWEEP_CONFIGS = [{"lam": 0.25, "lr": 0.25}, {"lam": 0.25, "lr": 0.5}, {"lam": 1.0, "lr": 0.25}, {"lam": 1.0, "lr": 0.5}]
PRIORS = ("embedded", "adm256-random", "ffhq256-random")
RESULT_TAG = "SPEED-RESULT "


# =============================================================================================== worker side
def _sync(device):
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def load_prior(spec: dict):
    """The prior of ``spec['prior']`` on ``spec['device']`` with the requested fast paths."""
    from reddiff.priors.perf import apply_fast_paths

    device = spec["device"]
    name = spec["prior"]
    if name == "embedded":
        from reddiff.priors.unet import UNetPrior

        # the embedded prior may be re-exported by a training run while we read it: retry a few times
        for attempt in range(5):
            try:
                prior = UNetPrior("embedded64", device=device)
                break
            except Exception:  # noqa: BLE001 - a half-written file; anything else fails on the last try
                if attempt == 4:
                    raise
                time.sleep(2.0)
    elif name in ("adm256-random", "ffhq256-random"):
        prior = RandomUNetPrior(name, device=device)
    else:
        raise ValueError(f"unknown prior {name!r}; known: {', '.join(PRIORS)}")
    autocast = None if spec.get("dtype", "fp32") == "fp32" else spec["dtype"]
    prior = apply_fast_paths(prior, channels_last=spec.get("channels_last", False), compile=spec.get("compile", False),
                             autocast=autocast)
    return prior.eval()


def _random_unet_prior_class():
    import torch

    from reddiff.priors.adm import ADM_IMAGENET_256_UNCOND, DPS_FFHQ_256, UNet
    from reddiff.priors.base import Prior

    class _RandomUNetPrior(Prior):
        """A published ADM architecture with random weights (timing only): layers that the reference initialises to
        zero get small random weights, so that eps is not identically zero."""

        def __init__(self, which: str, device="cpu", seed: int = 0):
            super().__init__()
            cfg = {"adm256-random": ADM_IMAGENET_256_UNCOND, "ffhq256-random": DPS_FFHQ_256}[which]
            torch.manual_seed(seed)
            net = UNet(cfg)
            with torch.no_grad():
                for p in net.parameters():
                    if p.ndim > 1 and not p.any():
                        p.normal_(0.0, 1e-2)
            self.net = net.to(device).eval().requires_grad_(False)
            self.shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
            self.name = which
            self.C = cfg.in_channels

        def _eps(self, x_t, t):
            return self.net(x_t, t.to(x_t.device))[:, : self.C]

    return _RandomUNetPrior


def RandomUNetPrior(which: str, device="cpu"):
    return _random_unet_prior_class()(which, device=device)


def load_images(batch: int, resolution: int, device, seed: int = 0):
    """``batch`` demo images at ``resolution`` (cycled), or uniform random images when they are unavailable."""
    import torch

    try:
        from reddiff.data.demo import DemoDataset

        ds = DemoDataset(resolution=resolution)
        entries = ds.entries()
        if resolution != 64 or not entries:
            raise RuntimeError("no demo images at this resolution")
        imgs = [ds.load(entries[i % len(entries)]) for i in range(batch)]
        return torch.stack(imgs).to(device), "demo"
    except Exception:  # noqa: BLE001 - timing does not depend on the content
        g = torch.Generator().manual_seed(seed)
        return (torch.rand((batch, 3, resolution, resolution), generator=g) * 2 - 1).to(device), "random"


def make_sampler(name: str, steps: int, small: bool = False, sets: Optional[dict] = None):
    """The sampler's class with its constructor defaults and ``steps``; ``small`` (``--quick``) also applies its
    ``test_overrides`` (the generic tests' small settings: fewer particles and inner iterations; not ``steps``, not
    a None "the operator's own" setting); ``sets`` (``--set``) last."""
    from reddiff import registry

    cls = registry.sampler_class(name)
    kw = {k: v for k, v in cls.test_overrides.items() if k != "steps" and v is not None} if small else {}
    kw.update(sets or {})
    return cls(**{"steps": steps, **kw})


def import_all_samplers() -> dict:
    """Import every sampler module (the same imports in every worker, so baseline memory is comparable)."""
    from reddiff import registry

    missing = {}
    for name in speed_samplers():
        try:
            registry.sampler_class(name)
        except Exception as e:  # noqa: BLE001 - reported as missing
            missing[name] = f"sampler {name} not importable: {type(e).__name__}: {e}"
    return missing


def bare_call(prior, x, t: int, kind: str, v=None):
    """One network call as the samplers make it: no_grad forward, or forward + vector-Jacobian product to the input."""
    import torch

    if kind == "no_grad":
        with torch.no_grad():
            return prior.eps(x, t)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        e = prior.eps(xg, t)
        (g,) = torch.autograd.grad(e, xg, grad_outputs=v if v is not None else torch.ones_like(e))
    return g


def time_bare(prior, x, kind: str, repeats: int, warmup: int = 2, t: int = 500, cpu: Optional[list] = None) -> list[float]:
    """Wall times of ``repeats`` bare calls after ``warmup`` untimed ones; process CPU times appended to ``cpu``."""
    import torch

    v = torch.randn_like(x)
    for _ in range(warmup):
        bare_call(prior, x, t, kind, v)
    _sync(x.device)
    times = []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        bare_call(prior, x, t, kind, v)
        _sync(x.device)
        times.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - c0)
    prior.reset_nfe()
    return times


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _problem(spec: dict, batch: int, latent: bool = False):
    import torch

    from reddiff.operators.base import ThroughDecoder
    from reddiff.registry import build_operator
    from reddiff.core.rng import BatchRNG

    if latent:
        from reddiff.priors.latent import LatentPrior

        prior = LatentPrior("latent_tiny", device=spec["device"])
    else:
        prior = load_prior(spec)
    device = torch.device(spec["device"])
    x, source = load_images(batch, tuple(getattr(prior, "pixel_shape", prior.shape))[-1], device)
    op = build_operator("sr4")
    indices = list(range(batch))
    op.setup(indices, tuple(x.shape), device, x.dtype)
    y = op.measure(x, BatchRNG.for_images(1_000_003, indices, device))
    if latent:  # the sampler sees A(D(.)), as the runner gives it
        op = ThroughDecoder(op, prior.decode, prior.encode)
    return prior, op, x, y, indices, source


def time_coder(prior, batch: int, which: str, repeats: int, warmup: int) -> float:
    """Median wall time of a latent prior's ``decode`` or ``encode`` with a vector-Jacobian product to its input
    (the latent solvers differentiate their data term through both)."""
    import torch

    shape = tuple(prior.shape if which == "decode" else prior.pixel_shape)
    x = torch.randn((batch,) + shape, device=prior.device)
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            out = getattr(prior, which)(xg)
            torch.autograd.grad(out, xg, grad_outputs=torch.ones_like(out))
        _sync(x.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class StepClock:
    """Wraps ``prior.eps`` and ``prior.denoise`` (the samplers written on sigma or on the flow view call the latter)
    to record, inside a sampler run, when each network call starts and how long the network itself takes: the
    forward, and for calls whose input requires grad the backward through the network (from the moment the gradient
    reaches the output to the moment it reaches the input, via tensor hooks).  CPU only (no synchronisation).
    Network and sampler time are measured in the same run, so background load inflates both alike:
    ``wall / network_s`` isolates the sampler's own cost on a busy machine.  ``coders``: the objects whose
    ``decode`` / ``encode`` a latent solver calls (the latent prior, and the operator that holds them bound); their
    time, forward and backward, counts in ``network_s`` too, as their calls count in the bare cost."""

    def __init__(self, prior, coders=()):
        self.stamps = []
        self._orig = [(prior, name, getattr(prior, name), True) for name in ("eps", "denoise")]
        self._orig += [(obj, name, getattr(obj, name), False) for obj in coders for name in ("decode", "encode")]
        self.forward_s = 0.0
        self.backward_s = 0.0
        for obj, name, fn, stamp in self._orig:
            setattr(obj, name, self._timed(fn, stamp))

    def _timed(self, fn, stamp: bool):
        def call(x, *args, **kwargs):
            t0 = time.perf_counter()
            if stamp:   # the step intervals are those between network calls
                self.stamps.append(t0)
            out = fn(x, *args, **kwargs)
            self.forward_s += time.perf_counter() - t0
            if out.requires_grad and x.requires_grad:
                mark = {}

                def start(g):
                    mark["t"] = time.perf_counter()

                def end(g):
                    if "t" in mark:
                        self.backward_s += time.perf_counter() - mark.pop("t")

                out.register_hook(start)
                x.register_hook(end)
            return out

        return call

    def close(self):
        for obj, name, fn, _ in self._orig:
            setattr(obj, name, fn)

    @property
    def network_s(self) -> float:
        return self.forward_s + self.backward_s

    def median_interval(self) -> Optional[float]:
        d = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return statistics.median(d) if d else None


def worker_sampler(spec: dict) -> dict:
    import torch

    from reddiff.core.rng import BatchRNG

    name, batch = spec["sampler"], spec["batch"]
    steps = spec["steps"][name]
    kind = forward_kind(name)
    latent = needs_latent(name)
    prior, op, x, y, indices, source = _problem(spec, batch, latent)
    dev = x.device
    # warm-up: a short run of the same sampler on the same batch (lazy initialisations, allocator, caches)
    small, sets = spec.get("quick", False), spec.get("set", {}).get(name)
    make_sampler(name, min(spec["warmup"], steps), small, sets).sample(y, op, prior, BatchRNG.for_images(0, indices, dev))
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    walls, cpus, nfes, intervals, net = [], [], [], [], []
    sampler = make_sampler(name, steps, small, sets)
    for _ in range(spec["repeats"]):
        prior.reset_nfe()
        clock = StepClock(prior, (prior, op) if latent else ()) if dev.type == "cpu" else None
        c0, t0 = time.process_time(), time.perf_counter()
        out = sampler.sample(y, op, prior, BatchRNG.for_images(0, indices, dev))
        _sync(dev)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        if clock is not None:
            clock.close()
            intervals.append(clock.median_interval())
            net.append(walls[-1] / clock.network_s)
        nfes.append(prior.nfe)
        coder = (getattr(prior, "decoder_calls", 0), getattr(prior, "encoder_calls", 0))
        finite = bool(torch.isfinite(out).all())
    peak = peak_rss_mb()
    peak_gpu = torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda" else None
    fwd_cpu: list = []
    z = torch.randn((batch,) + tuple(prior.shape), device=dev)
    fwd_times = time_bare(prior, z, kind, spec["forward_repeats"], spec["warmup"], cpu=fwd_cpu)
    fwd = statistics.median(fwd_times)
    wall = statistics.median(walls)
    nfe = nfes[0]
    extra: dict = {}
    bare = nfe * fwd
    if latent:  # the decoder and encoder calls count beside the network's (timed with a vector-Jacobian product)
        t_dec, t_enc = (time_coder(prior, batch, w, spec["forward_repeats"], spec["warmup"]) for w in ("decode", "encode"))
        bare += coder[0] * t_dec + coder[1] * t_enc
        extra = {"prior": "latent_tiny", "decoder_calls": coder[0], "encoder_calls": coder[1],
                 "decode_ms": t_dec * 1e3, "encode_ms": t_enc * 1e3}
    iv = [i for i in intervals if i is not None]
    return {
        "sampler": name, "batch": batch, "steps": steps, "nfe": nfe, "wall_s": wall, "walls_s": walls,
        "forward_ms": fwd * 1e3, "forward_ms_all": [t * 1e3 for t in fwd_times], "forward_kind": kind,
        "wall_over_forward": wall / bare if nfe else None,
        "step_median_over_forward": statistics.median(iv) / fwd if iv and not latent else None,
        "wall_over_network_time": statistics.median(net) if net else None,
        "cpu_over_forward": (statistics.median(cpus) / (nfe * statistics.median(fwd_cpu))
                             if nfe and dev.type == "cpu" and not latent else None),
        "overhead_ms_per_step": ((wall - bare) / nfe * 1e3 if latent else (wall / nfe - fwd) * 1e3) if nfe else None,
        "images_per_second": batch / wall, "peak_rss_mb": round(peak, 1), "peak_gpu_mb": peak_gpu,
        "finite_output": finite, "images": source, **extra,
    }


def worker_loop(spec: dict) -> dict:
    import torch

    kind, batch = spec["kind"], spec["batch"]
    prior, op, x, y, indices, source = _problem(spec, batch)
    if x.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    xt = torch.randn_like(x)
    v = torch.randn_like(x)
    times = []
    for i in range(spec["loop_calls"]):
        t0 = time.perf_counter()
        bare_call(prior, xt, 999 - (i * 10) % 1000, kind, v)
        _sync(x.device)
        times.append(time.perf_counter() - t0)
    peak = peak_rss_mb()
    return {"kind": kind, "batch": batch, "calls": len(times), "forward_ms": statistics.median(times) * 1e3,
            "forward_ms_all": [t * 1e3 for t in times], "peak_rss_mb": round(peak, 1),
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if x.device.type == "cuda" else None}


def worker_sweep(spec: dict) -> dict:
    import torch

    from reddiff.samplers.reddiff import REDDiff
    from reddiff.run.sweep import batched_sweep, separate_runs

    K = len(SWEEP_CONFIGS)
    prior, op, x, y, indices, source = _problem(spec, 1)
    seeds = [0]
    steps = spec["sweep_steps"]

    def run(fn, n_steps):
        t0 = time.perf_counter()
        out = fn(SWEEP_CONFIGS, y, op, prior, seeds, indices=indices, base=REDDiff(steps=n_steps))
        _sync(x.device)
        return time.perf_counter() - t0, out

    run(batched_sweep, min(spec["warmup"], steps))  # warm-up both batch shapes
    run(separate_runs, min(spec["warmup"], steps))
    t_bat, t_sep = [], []
    for r in range(spec["sweep_repeats"]):
        order = [(batched_sweep, t_bat), (separate_runs, t_sep)]
        for fn, acc in (order if r % 2 == 0 else order[::-1]):
            t, out = run(fn, steps)
            acc.append(t)
            if fn is batched_sweep:
                xb = out
            else:
                xs = out
    d = (xb - xs).double()
    f1 = statistics.median(time_bare(prior, torch.randn_like(x), "no_grad", spec["forward_repeats"], spec["warmup"]))
    fK = statistics.median(time_bare(prior, torch.randn(K, *x.shape[1:], device=x.device), "no_grad",
                                     spec["forward_repeats"], spec["warmup"]))
    bat, sep = statistics.median(t_bat), statistics.median(t_sep)
    return {"K": K, "configs": SWEEP_CONFIGS, "images": 1, "steps": steps, "batched_s": bat, "separate_s": sep,
            "batched_all_s": t_bat, "separate_all_s": t_sep, "ratio": bat / sep,
            "nfe_batched": steps, "nfe_separate": K * steps,
            "forward_ms_batch1": f1 * 1e3, f"forward_ms_batch{K}": fK * 1e3,
            "forward_cost_ratio": fK / (K * f1),
            "max_abs_diff": float(d.abs().max()), "rms_diff": float(d.square().mean().sqrt()),
            "rms_between_configs": float((xs[:, 0] - xs[:, -1]).double().square().mean().sqrt())}


def run_worker(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec["device"] == "auto":
        spec["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    missing = import_all_samplers()
    mode = spec["mode"]
    if mode == "sampler" and spec["sampler"] in missing:
        return {"missing": missing[spec["sampler"]]}
    out = {"sampler": worker_sampler, "loop": worker_loop, "sweep": worker_sweep}[mode](spec)
    out["device"] = device_description(spec["device"])
    out["threads"] = torch.get_num_threads()
    return out


# =============================================================================================== parent side
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: str) -> str:
    import torch

    if torch.device(device).type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    return f"cpu: {cpu_model()}"


def machine() -> dict:
    import torch

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "cores_available": affinity,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "default_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def launch(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.speed", "--worker", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(r.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["process_s"] = round(time.time() - t0, 2)
            return res
    tail = (r.stderr or r.stdout).strip().splitlines()[-8:]
    return {"error": f"worker exited with {r.returncode}: " + " | ".join(tail)}


def build_specs(a) -> list[dict]:
    common = {"prior": a.prior, "device": a.device, "dtype": a.dtype, "channels_last": a.channels_last,
              "compile": a.compile, "threads": a.threads, "steps": a.steps,
              "repeats": a.repeats, "forward_repeats": a.forward_repeats, "warmup": a.warmup, "loop_calls": a.loop_calls,
              "sweep_steps": a.sweep_steps, "sweep_repeats": a.sweep_repeats, "quick": a.quick, "set": a.set}
    specs = []
    for b in (a.batch if a.samplers else []):
        for s in a.samplers:
            specs.append({**common, "mode": "sampler", "sampler": s, "batch": b})
        kinds = sorted({forward_kind(s) for s in a.samplers} | {"no_grad"})
        for k in kinds:
            specs.append({**common, "mode": "loop", "kind": k, "batch": b})
    if not a.no_sweep:
        specs.append({**common, "mode": "sweep"})
    return specs


def assemble(a, specs: list[dict], results: list[dict], wall: float, command: str) -> dict:
    out: dict = {}
    loops: dict = {}
    for spec, res in zip(specs, results):
        if spec["mode"] == "loop":
            loops.setdefault(spec["kind"], {})[str(spec["batch"])] = res
    for s in a.samplers:
        by_batch = {}
        for spec, res in zip(specs, results):
            if spec["mode"] == "sampler" and spec["sampler"] == s:
                res = dict(res)
                ref = loops.get(forward_kind(s), {}).get(str(spec["batch"]), {})
                if "peak_rss_mb" in res and ref.get("peak_rss_mb"):
                    res["rss_over_bare_loop"] = res["peak_rss_mb"] / ref["peak_rss_mb"]
                by_batch[str(spec["batch"])] = res
        head = by_batch[str(max(a.batch))]
        if "missing" in head or "error" in head:
            out[s] = {**head, "by_batch": by_batch}
            continue
        keys = ("wall_over_forward", "peak_rss_mb", "images_per_second", "batch", "nfe", "forward_ms", "device",
                "forward_kind", "wall_s", "overhead_ms_per_step", "step_median_over_forward", "cpu_over_forward",
                "wall_over_network_time",
                "rss_over_bare_loop",
                "peak_gpu_mb", "threads")
        coder = {k: head[k] for k in ("prior", "decoder_calls", "encoder_calls", "decode_ms", "encode_ms") if k in head}
        out[s] = {**{k: head.get(k) for k in keys}, **coder, "by_batch": by_batch}
    out["bare_forward"] = loops
    sweep = next((r for sp, r in zip(specs, results) if sp["mode"] == "sweep"), None)
    if sweep is not None:
        out["sweep"] = {**sweep, "target": SWEEP_TARGET}
    checks = []
    for s in a.samplers:
        e = out[s]
        for b, r in e["by_batch"].items():
            if r.get("wall_over_forward") is not None:
                checks.append({"check": f"{s} wall_over_forward (batch {b})", "value": r["wall_over_forward"],
                               "target": target(s), "pass": r["wall_over_forward"] <= target(s)})
    if "reddiff" in a.samplers and "by_batch" in out["reddiff"]:
        for b, r in out["reddiff"]["by_batch"].items():
            if r.get("rss_over_bare_loop") is not None:
                checks.append({"check": f"reddiff peak RSS / bare no_grad loop (batch {b})",
                               "value": r["rss_over_bare_loop"], "target": RSS_TARGET,
                               "pass": r["rss_over_bare_loop"] <= RSS_TARGET})
    if sweep is not None and "ratio" in sweep:
        checks.append({"check": f"batched sweep K={sweep['K']} / separate runs", "value": sweep["ratio"],
                       "target": SWEEP_TARGET, "pass": sweep["ratio"] <= SWEEP_TARGET})
    out["meta"] = {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                   "machine": machine(), "quick": a.quick, "prior": a.prior, "dtype": a.dtype,
                   "channels_last": a.channels_last, "compile": a.compile, "task": "sr4",
                   "batches": a.batch, "steps": a.steps, "set": a.set, "repeats": a.repeats,
                   "forward_repeats": a.forward_repeats, "warmup": a.warmup, "threads": a.threads, "jobs": a.jobs,
                   "samplers": list(a.samplers), "targets": {"wall_over_forward": {n: target(n) for n in a.samplers}, "rss": RSS_TARGET,
                                                             "sweep": SWEEP_TARGET},
                   "checks": checks, "total_wall_s": round(wall, 1)}
    return out


def _f(v, fmt="{:.3f}"):
    return "-" if v is None else fmt.format(v)


def markdown(res: dict) -> str:
    m = res["meta"]
    mach = m["machine"]
    L = ["# Speed benchmark (docs/DESIGN.md contract 4)", "",
         f"Command: `{m['command']}`  ", f"Date: {m['date']}, total {m['total_wall_s']:.0f} s  ",
         f"Machine: {mach['cpu']}, {mach['cores']} cores ({mach['cores_available']} available), "
         f"{mach['platform']}, Python {mach['python']}, torch {mach['torch']}, "
         f"threads {m['threads'] or mach['default_threads']}" + (f", GPU {mach['cuda']}" if mach["cuda"] else "")
         + (f"; load average at the end {', '.join(f'{x:.1f}' for x in mach['load_average'])}"
            if mach.get("load_average") else "") + "  ",
         f"Task: sr4 (x4 block average) on the {m['prior']} prior, steps {', '.join(f'{k} {v}' for k, v in m['steps'].items())}"
         + "".join(f"; --set {n}: " + ", ".join(f"{k} {v}" for k, v in kw.items()) for n, kw in m.get("set", {}).items())
         + f", dtype {m['dtype']}{', channels_last' if m['channels_last'] else ''}{', torch.compile' if m['compile'] else ''}; "
         f"median of {m['repeats']} timed run(s) after a {m['warmup']}-step warm-up, bare call median of "
         f"{m['forward_repeats']} after {m['warmup']} warm-up call(s)."
         + (" **--quick: smoke-test settings, not for reporting.**" if m["quick"] else ""), "",
         "`wall/fwd` = sampler wall time / (NFE x one bare network call at the same batch: no_grad forward for "
         "RED-diff, DDRM, DDIM; forward + backward to the input for DPS, Pi-GDM).  `step/fwd`: median interval "
         "between network calls / bare call (robust to background load); `cpu/fwd`: the ratio in process CPU "
         "time (not inflated by time spent descheduled); `wall/net`: wall time over the time spent inside the network "
         "(forward, and backward for DPS / Pi-GDM) during the same run, the least noisy measure of the sampler's "
         "own overhead.  Peak RSS is per process; `RSS/loop` "
         "divides it by the peak of a bare loop of the same kind of call at the same batch.  Latent solvers "
         "(`+ dec, enc`) run on the tiny latent model (`prior=latent_tiny`, 64 px, 16x16x4 latents) whatever the "
         "prior above; their bare cost adds each decoder and encoder call (timed with a vector-Jacobian product, as "
         "their data term differentiates through them) to the network's, and their `wall/net` counts the time inside "
         "the decoder and encoder (forward and backward) with the network's.", ""]
    for b in m["batches"]:
        L += [f"## Batch {b}", "",
              "| sampler | NFE | bare call (ms) | wall (s) | wall/fwd | step/fwd | cpu/fwd | wall/net | overhead/step (ms) | "
              "images/s | peak RSS (MB) | RSS/loop | target wall/fwd |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in m["samplers"]:
            r = res[s]["by_batch"].get(str(b), {})
            if "missing" in r or "error" in r:
                L.append(f"| {s} | {'missing: ' + r['missing'] if 'missing' in r else 'error: ' + r['error']} |"
                         + " |" * 11)
                continue
            coder = (f" (+{r['decoder_calls']} dec, {r['encoder_calls']} enc; latent_tiny)"
                     if "decoder_calls" in r else "")
            L.append(f"| {s} | {r['nfe']}{coder} | {_f(r['forward_ms'], '{:.1f}')} ({r['forward_kind']}) | "
                     f"{_f(r['wall_s'], '{:.2f}')} | {_f(r['wall_over_forward'])} | "
                     f"{_f(r.get('step_median_over_forward'))} | {_f(r.get('cpu_over_forward'))} | "
                     f"{_f(r.get('wall_over_network_time'))} | "
                     f"{_f(r['overhead_ms_per_step'], '{:.1f}')} | "
                     f"{_f(r['images_per_second'], '{:.3f}')} | {_f(r['peak_rss_mb'], '{:.0f}')} | "
                     f"{_f(r.get('rss_over_bare_loop'))} | {target(s)} |")
        L.append("")
        for kind, byb in res["bare_forward"].items():
            r = byb.get(str(b))
            if r and "peak_rss_mb" in r:
                L.append(f"Bare {kind} loop, batch {b}: {r['calls']} calls, median {r['forward_ms']:.1f} ms, "
                         f"peak RSS {r['peak_rss_mb']:.0f} MB.  ")
            elif r:
                L.append(f"Bare {kind} loop, batch {b}: {r.get('error') or r.get('missing')}  ")
        L.append("")
    sw = res.get("sweep")
    if sw:
        L += ["## Batched hyperparameter sweep (reddiff.run.sweep)", ""]
        if "ratio" in sw:
            K = sw["K"]
            L += [f"K = {K} RED-diff configurations (lambda x lr: "
                  + ", ".join(f"({c['lam']}, {c['lr']})" for c in sw["configs"])
                  + f") of one image, {sw['steps']} steps: batched (one batch of {K}, {sw['nfe_batched']} network "
                  f"calls) {sw['batched_s']:.2f} s vs {K} separate runs ({sw['nfe_separate']} calls) "
                  f"{sw['separate_s']:.2f} s: **ratio {sw['ratio']:.3f}** (target <= {sw['target']}).  ",
                  f"One forward at batch {K} costs {sw['forward_cost_ratio']:.3f} x {K} forwards at batch 1 "
                  f"({sw[f'forward_ms_batch{K}']:.1f} ms vs {sw['forward_ms_batch1']:.1f} ms).  The sweep saves network "
                  "calls, not arithmetic: the ratio is close to this network cost ratio (a little below it, as the "
                  "separate runs also pay the per-step sampler work K times).  Where a batch of K costs about as "
                  "much as a batch of 1 (a GPU at small batch) it approaches 1/K.  ",
                  f"Batched vs separate results: max |diff| {sw['max_abs_diff']:.2e}, RMS {sw['rms_diff']:.2e} "
                  f"(RMS between two configurations: {sw['rms_between_configs']:.3f}); exact with a batch-invariant "
                  "network (tests/test_speed.py), float32 rounding of batch-size-dependent convolution kernels "
                  "otherwise.", ""]
        else:
            L += [f"error: {sw.get('error')}", ""]
    L += ["## Checks", "", "| check | value | target | pass |", "|---|---|---|---|"]
    for c in m["checks"]:
        L.append(f"| {c['check']} | {c['value']:.3f} | {c['target']} | {'yes' if c['pass'] else '**no**'} |")
    return "\n".join(L) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: batch 1, 2 steps, 1 thread per worker, 2 workers at a time")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--md", default=None, help="write a Markdown report here (default: next to --json)")
    p.add_argument("--no-md", action="store_true", help="no Markdown report")
    p.add_argument("--prior", default="embedded", choices=PRIORS)
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps of every sampler (default: each sampler's conf/sampler default, e.g. 100, DDRM 20)")
    p.add_argument("--samplers", default=None,
                   help="comma-separated subset (default: every registry sampler that calls the network), or none")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast dtype (fp32: off)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (slow to compile on CPU)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    p.add_argument("--repeats", type=int, default=None, help="timed sampler runs per measurement (median; default 1)")
    p.add_argument("--forward-repeats", type=int, default=None, help="timed bare calls (median; default 7)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up: sampler steps before the timed runs, and untimed bare calls (default 2)")
    p.add_argument("--loop-calls", type=int, default=None, help="calls in the bare reference loops (default 5)")
    p.add_argument("--sweep-steps", type=int, default=None, help="RED-diff steps in the sweep timing (default 10)")
    p.add_argument("--sweep-repeats", type=int, default=None, help="alternating sweep timings (median; default 3)")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--jobs", type=int, default=None, help="workers at a time (default 1; >1 spoils timings)")
    p.add_argument("--set", action="append", default=[], metavar="SAMPLER.KEY=VALUE",
                   help="a constructor setting of one sampler (repeatable), e.g. --set d_flow.max_iter=1: for "
                        "samplers whose default cost is hours here; the ratios are per network call")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    defaults = {"batch": "1" if q else "1,8", "steps": 2 if q else None,
                "repeats": 1, "forward_repeats": 2 if q else 7, "warmup": 1 if q else 2, "loop_calls": 2 if q else 5,
                "sweep_steps": 2 if q else 10, "sweep_repeats": 1 if q else 3, "jobs": 2 if q else 1,
                "threads": 1 if q else None}
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.batch = [int(b) for b in str(a.batch).split(",") if b.strip()]
    known = speed_samplers()
    a.samplers = (known if a.samplers is None else
                  [s.strip() for s in a.samplers.split(",") if s.strip() and s.strip() != "none"])
    unknown = [s for s in a.samplers if s not in known]
    if unknown:
        p.error(f"unknown samplers {unknown}; known: {', '.join(known)}")
    try:
        a.set = parse_set_overrides(a.set, known)
    except ValueError as e:
        p.error(str(e))
    a.steps = {s: (a.steps if a.steps is not None else default_steps(s)) for s in a.samplers}
    if (any(b < 1 for b in a.batch) or min([*a.steps.values(), 1]) < 1 or min(a.repeats, a.forward_repeats, a.warmup,
                                              a.loop_calls, a.sweep_steps, a.sweep_repeats) < 1):
        p.error("batch sizes, steps and repeats must be >= 1")
    return a


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    if a.worker is not None:
        res = run_worker(json.loads(a.worker))
        print(RESULT_TAG + json.dumps(res), flush=True)
        return res
    command = "python -m benchmarks.speed" + ("" if not argv else " " + shlex.join(argv))
    specs = build_specs(a)
    t0 = time.time()
    results: list = [None] * len(specs)

    def go(i):
        s = specs[i]
        label = s["mode"] + ":" + (s.get("sampler") or s.get("kind") or "sweep") + (f"@{s['batch']}" if "batch" in s else "")
        t = time.time()
        results[i] = launch(s, a.timeout)
        print(f"[speed] {label}: {time.time() - t:.1f} s"
              + (f" ({results[i].get('error') or results[i].get('missing')})"
                 if ("error" in results[i] or "missing" in results[i]) else ""), file=sys.stderr, flush=True)

    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        list(pool.map(go, range(len(specs))))
    res = assemble(a, specs, results, time.time() - t0, command)
    text = json.dumps(res, indent=2)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text + "\n")
    md = a.md or (str(Path(a.json).with_suffix(".md")) if a.json else None)
    if md and not a.no_md:
        Path(md).parent.mkdir(parents=True, exist_ok=True)
        Path(md).write_text(markdown(res))
    if not a.json:
        print(text)
    for c in res["meta"]["checks"]:
        print(f"[speed] {c['check']}: {c['value']:.3f} (target {c['target']}) {'ok' if c['pass'] else 'MISSED'}",
              file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
