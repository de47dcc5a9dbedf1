"""The prepared GPU check (issue 18): the paper's cost columns measured on ADM ImageNet-256 in one short command.

    python3 -m benchmarks.gpu_check --json results/gpu.json --md results/gpu.md      # on a CUDA machine, < 8 min
    python -m benchmarks.gpu_check --dry-run --json /tmp/g.json --md /tmp/g.md        # same code, CPU, tiny UNet

Network: the repository's ADM UNet (:mod:`reddiff.priors.adm`) at the ImageNet-256 unconditional configuration
(``learn_sigma``: 6 output channels, the first 3 are eps) with **random weights** (timing and memory do not depend on
them; layers the reference initialises to zero get N(0, 1e-2) weights so eps is not identically zero).  Task:
``sr4`` (an SVD operator, so every sampler of the registry runs).  Phases, in order of priority; each one is skipped
with "not measured" once the global deadline (``--budget-s``, counted from process start) is reached, and every
network call checks the deadline, so the script stops itself within one call of it:

1. **time per step** for every sampler of the registry (:func:`reddiff.registry.sampler_names`) at each
   ``--batches`` (1 and 8) and each ``--dtypes`` (fp32; bf16 = autocast through :func:`reddiff.priors.perf.apply_fast_paths`,
   weights stay fp32): a warm-up run (2 steps), then the median of ``--repeats`` runs of ``--steps`` steps (fewer,
   ``capped`` in the JSON, when the warm-up says a run would take more than ``--measure-cap-s``).
   ``s_per_step_per_image`` = wall / (steps x batch) (the paper's s/step; RED-diff, DPS, Pi-GDM and DDRM make one
   network call per step), ``s_per_call_per_image`` = wall / (NFE x batch) (NFE as the prior counts calls).
   ``wall_over_forward`` = wall / (NFE x one bare network call at the same batch): no_grad forward, or forward +
   backward to the input for samplers with ``needs_grad``; its limit is the registry's ``speed_limit`` (1.05, or
   1.10 with ``needs_grad``).  A sampler that calls the network on more than the batch (particles) is still
   compared with a call at the batch, so its ratio includes that extra work.
2. **RED-diff peak memory** (``torch.cuda.max_memory_allocated``) at the largest batch against a bare no_grad loop
   of the same number of forward calls at that batch.
3. **max batch** of every sampler with a network within ``--memory-gib`` (40 GiB, enforced with
   ``torch.cuda.set_per_process_memory_fraction``): a batch fits when a ``--probe-steps`` run finishes without
   CUDA OOM; doubling from 1, then bisection between the last fit and the first OOM; each sampler is time-boxed
   (``--box-s``, while the samplers after it can still get 8 s each) and a box that expires reports the largest
   batch seen to fit as a lower bound.  The paper's
   "max batch" column.  Bare no_grad and forward+backward calls get the same search, as references.
4. **the CUDA-only tests** (test functions whose decorators mention CUDA: ``skipif(not torch.cuda.is_available())``
   or a ``cuda`` mark), run with pytest in a subprocess when pytest is importable, else "not run (no pytest)".

Max-batch order: the paper's samplers first, then the others, then the bare calls; the first dtype's searches come
before the CUDA tests, the other dtypes' after them.  Missing pure-Python packages (hydra-core, omegaconf, antlr4,
PyYAML, pytest) travel as wheels in ``--wheels`` (default ``gpu_wheels/``, made by ``python -m benchmarks.gpu_wheels``):
only those whose modules are not importable are unpacked into a temporary folder on ``sys.path``.  Without hydra the
operator and samplers are built from their classes (sr4 values, class defaults).

``--dry-run`` runs the same code on the CPU with a tiny UNet (and each sampler at its ``test_overrides``: fewer
particles and inner iterations); CUDA OOM cannot happen there, so the max-batch search
meets a *simulated* OOM (``torch.OutOfMemoryError`` raised by the network when the probed image batch exceeds
``--dry-oom-batch``; ``simulated_oom`` in the JSON); CUDA memory figures are "not measured".  The paper's numbers
(:data:`PAPER`) are printed beside ours with their provenance tags.
"""
from __future__ import annotations

import argparse
import ast
import gc
import inspect
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

T_START = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WHEELS = ROOT / "gpu_wheels"
GIB = 2 ** 30

#: RED-diff paper, Table 1 (ImageNet-256, in2_20ff); "paper*": a public transcription of the paper, not the PDF;
#: "unverified": use as approximate only.  For DPS, Pi-GDM and DDRM the transcription gives no per-sampler cell,
#: only the ranges 0.10-0.24 s/step and max batch 15-25 for the three of them.
PAPER = {
    "reddiff": {"s_per_step": "0.05", "max_batch": "30", "tag": "paper*"},
    "dps": {"s_per_step": "0.10-0.24", "max_batch": "15-25", "tag": "unverified (range for DPS, Pi-GDM, DDRM)"},
    "pigdm": {"s_per_step": "0.10-0.24", "max_batch": "15-25", "tag": "unverified (range for DPS, Pi-GDM, DDRM)"},
    "ddrm": {"s_per_step": "0.10-0.24", "max_batch": "15-25", "tag": "unverified (range for DPS, Pi-GDM, DDRM)"},
}
#: the dry run's network: the ADM architecture (attention, up/down residual blocks, learn_sigma) at toy size
DRY_RUN_UNET = dict(image_size=16, model_channels=32, out_channels=6, num_res_blocks=1, attention_resolutions=(8,),
                    channel_mult=(1, 2), num_head_channels=16, learn_sigma=True)
#: the latent model of the latent solvers (``needs_latent``), random weights: Stable Diffusion 1.5's UNet (diffusers'
#: ``UNet2DConditionModel`` defaults are SD 1.x's; cross-attention 768, 64x64x4 latents) and autoencoder (f8, 512 px);
#: the dry run's is :func:`reddiff.priors.latent.make_tiny`'s conditional configuration
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "beta_end": 0.012, "prediction_type": "epsilon"}
#: used only if the registry cannot be imported: samplers that backpropagate through the network (speed.py SAMPLERS)
FALLBACK_NEEDS_GRAD = {"dps", "pigdm"}


class DeadlineReached(Exception):
    pass


def oom_error_class():
    import torch

    return getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


# ============================================================================================ environment
def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked module counts as missing
        return False


def use_wheels(folder: Path) -> dict:
    """Unpack the wheels of ``folder`` that provide a missing top-level module into a temporary folder and append it
    to ``sys.path`` (the pytest subprocess appends it too): appended, it never shadows an installed package."""
    import importlib

    folder = Path(folder)
    info = {"folder": str(folder), "unpacked": [], "present": []}
    if not folder.is_dir():
        info["missing_folder"] = True
        return info
    target = Path(tempfile.mkdtemp(prefix="gpu_check_wheels_"))
    for whl in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            tops = {n.split("/")[0] for n in z.namelist()}
            mods = sorted({t[:-3] if t.endswith(".py") else t for t in tops
                           if not t.endswith((".dist-info", ".data")) and not t.endswith(".pth")})
            mods = [m for m in mods if m.isidentifier()]
            if mods and not all(_importable(m) for m in mods):
                z.extractall(target)
                info["unpacked"].append(whl.name)
            else:
                info["present"].append(whl.name)
    if info["unpacked"]:
        sys.path.append(str(target))
        importlib.invalidate_caches()
        info["path"] = str(target)
    return info


def machine(device) -> dict:
    import torch

    m = {"python": platform.python_version(), "torch": torch.__version__, "cpu_cores": os.cpu_count(),
         "platform": platform.platform(), "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        m.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / GIB, 1), capability=f"{p.major}.{p.minor}",
                 cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                 tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                 cudnn_benchmark=torch.backends.cudnn.benchmark)
    return m


# ============================================================================================ registry
def discover_samplers() -> tuple[list[str], str]:
    try:
        from reddiff import registry

        return list(registry.sampler_names()), "reddiff.registry"  # latent solvers: on the latent model
    except Exception as e:  # noqa: BLE001 - fall back to the YAML files
        return sorted(p.stem for p in (ROOT / "conf" / "sampler").glob("*.yaml")), f"conf/sampler glob ({e})"


def _yaml_target(name: str) -> str:
    for line in (ROOT / "conf" / "sampler" / f"{name}.yaml").read_text().splitlines():
        if line.startswith("_target_:"):
            return line.split(":", 1)[1].split("#")[0].strip()
    raise KeyError(f"no _target_ in conf/sampler/{name}.yaml")


def sampler_class(name: str) -> type:
    try:
        from reddiff import registry

        return registry.sampler_class(name)
    except ImportError:
        import importlib

        module, cls = _yaml_target(name).rsplit(".", 1)
        return getattr(importlib.import_module(module), cls)


def sampler_meta(name: str) -> dict:
    cls = sampler_class(name)
    try:
        from reddiff import registry

        info = registry.sampler_info(name)
        needs_grad, limit = bool(info["needs_grad"]), float(info["speed_limit"])
    except ImportError:
        needs_grad = bool(getattr(cls, "needs_grad", name in FALLBACK_NEEDS_GRAD))
        limit = 1.10 if needs_grad else 1.05
    has_steps = "steps" in inspect.signature(cls.__init__).parameters
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "needs_grad": needs_grad, "limit": limit,
            "kind": "fwd_bwd" if needs_grad else "no_grad", "has_steps": has_steps,
            "needs_latent": bool(getattr(cls, "needs_latent", False))}


def build_sampler(name: str, steps: int, meta: dict, dry: bool = False):
    """The sampler at ``steps``; in the dry run also at its ``test_overrides`` (the generic tests' small settings:
    fewer particles, inner iterations), so that toy-size runs stay short whatever the sampler's inner loops."""
    kw = {"steps": steps} if meta["has_steps"] else {}
    if dry:
        # (not steps, which the check sets; not a None, "the operator's own" setting that noiseless sr4 lacks)
        kw = {**{k: v for k, v in getattr(sampler_class(name), "test_overrides", {}).items()
                 if k != "steps" and v is not None}, **kw}
    try:
        from reddiff import registry

        return registry.build_sampler(name, task="sr4", **kw)
    except ImportError:  # no hydra/omegaconf: class defaults
        return sampler_class(name)(**kw)


def build_sr4():
    try:
        from reddiff.registry import build_operator

        return build_operator("sr4"), "conf/task/sr4.yaml"
    except ImportError:
        from reddiff.operators.separable import BlockAverageSR

        return BlockAverageSR(sigma_y=0.0, factor=4, svd_cutoff=0.0), "BlockAverageSR(factor=4) (no hydra)"


# ============================================================================================ network
def make_prior(cfg, device, dtype: str, deadline, seed: int = 0):
    """ADM UNet with random weights as a :class:`reddiff.priors.base.Prior`; every ``eps`` call checks the deadline
    and, when ``prior.oom_above`` is set (dry run), raises a simulated OOM for larger batches."""
    import torch

    from reddiff.priors.perf import apply_fast_paths
    from reddiff.priors.adm import UNet
    from reddiff.priors.base import Prior

    class RandomADM(Prior):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            with torch.device(device):
                net = UNet(cfg)
            with torch.no_grad():
                for p in net.parameters():
                    if p.ndim > 1 and not p.any():
                        p.normal_(0.0, 1e-2)
            self.net = net.eval().requires_grad_(False)
            self.shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
            self.C = cfg.in_channels

        def _eps_time(self, x_t, t):  # a real time input too: samplers written on sigma call prior.denoise
            return self.net(x_t, t.to(x_t.device))[:, : self.C]

    base = RandomADM()
    prior = apply_fast_paths(base, autocast=None if dtype == "fp32" else dtype).eval()
    prior.oom_above = prior.probe_batch = None

    def guarded(call):
        """A network entry point (``eps``, or ``denoise`` of the samplers written on sigma) that checks the deadline
        and, in the dry run, raises the simulated OOM."""
        def wrapped(x, *args, **kwargs):
            deadline.check()
            # the simulated OOM depends on the probed image batch (a particle sampler calls the network on more)
            if prior.oom_above is not None and prior.probe_batch > prior.oom_above:
                raise oom_error_class()(f"simulated OOM: batch {prior.probe_batch} > --dry-oom-batch {prior.oom_above}")
            return call(x, *args, **kwargs)
        return wrapped

    prior.eps, prior.denoise = guarded(prior.eps), guarded(prior.denoise)
    prior.n_params = sum(p.numel() for p in base.net.parameters())
    return prior


def make_latent_prior(dry: bool, device, deadline, seed: int = 0):
    """The latent solvers' prior: SD 1.5's UNet and autoencoder with random weights (the dry run: the tiny
    conditional model), the empty prompt a random embedding; every ``eps`` call checks the deadline."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from reddiff.priors.latent import LatentPrior, make_tiny

    torch.manual_seed(seed)
    if dry:
        root = make_tiny(Path(tempfile.mkdtemp(prefix="gpu_check_latent_")), seed=seed, conditional=True)
        prior = LatentPrior(str(root), device=device)
    else:
        with torch.device(device):
            ae, net = AutoencoderKL(**SD15_VAE), UNet2DConditionModel(**SD15_UNET)
        prior = LatentPrior.from_modules(ae, net, SD15_SCHEDULER, cond=torch.randn(1, 77, 768), device=device)
    inner_eps = prior.eps

    def eps(x_t, t):
        deadline.check()
        return inner_eps(x_t, t)

    prior.eps = eps
    prior.n_params = sum(p.numel() for p in prior.parameters())
    return prior


class Deadline:
    def __init__(self, budget_s: float):
        self.budget_s = float(budget_s)
        self.hit = False

    def elapsed(self) -> float:
        return time.monotonic() - T_START

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def check(self, margin: float = 0.0):
        if self.left() <= margin:
            self.hit = True
            raise DeadlineReached(f"global deadline of {self.budget_s:.0f} s reached")


# ============================================================================================ measurements
class Bench:
    def __init__(self, a, device, deadline):
        self.a, self.device, self.deadline = a, device, deadline
        self.cuda = device.type == "cuda"
        self.op, self.op_source = build_sr4()

    def sync(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def fresh_memory(self, collect: bool = False):
        """Release cached blocks and reset the peak counter; ``collect`` also runs the garbage collector (needed
        after an exception, whose traceback holds tensors in reference cycles; cheap after ``gc.freeze``)."""
        import torch

        if collect:
            gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_mb(self):
        import torch

        return torch.cuda.max_memory_allocated() / 2 ** 20 if self.cuda else None

    def problem(self, prior, batch: int):
        import torch

        from reddiff.core.rng import BatchRNG

        g = torch.Generator().manual_seed(batch)
        shape = tuple(getattr(prior, "pixel_shape", prior.shape))  # a latent prior's data are its pixels
        x = (torch.rand((batch,) + shape, generator=g) * 2 - 1).to(self.device)
        idx = list(range(batch))
        self.op.setup(idx, tuple(x.shape), self.device, x.dtype)
        return self.op.measure(x, BatchRNG.for_images(1_000_003, idx, self.device)), idx

    def run(self, name, meta, prior, y, idx, steps):
        import torch

        from reddiff.core.rng import BatchRNG

        from reddiff.operators.base import ThroughDecoder

        sampler = build_sampler(name, steps, meta, dry=self.a.dry_run)
        op = ThroughDecoder(self.op, prior.decode, prior.encode) if hasattr(prior, "decode") else self.op
        prior.reset_nfe()
        t0 = time.perf_counter()
        out = sampler.sample(y, op, prior, BatchRNG.for_images(0, idx, self.device))
        self.sync()
        #: a latent prior's decoder and encoder calls in that run
        self.coder_calls = (getattr(prior, "decoder_calls", 0), getattr(prior, "encoder_calls", 0))
        return time.perf_counter() - t0, prior.nfe, bool(torch.isfinite(out).all())

    def bare(self, prior, batch, kind, calls, warmup=2):
        import torch

        from benchmarks.speed import bare_call

        x = torch.randn((batch,) + tuple(prior.shape), device=self.device)
        v = torch.randn_like(x)
        for _ in range(warmup):
            bare_call(prior, x, 500, kind, v)
        self.sync()
        times = []
        for i in range(calls):
            t0 = time.perf_counter()
            bare_call(prior, x, 999 - 100 * i % 1000, kind, v)
            self.sync()
            times.append(time.perf_counter() - t0)
        prior.reset_nfe()
        return times

    def time_sampler(self, name, meta, prior, batch) -> dict:
        a = self.a
        y, idx = self.problem(prior, batch)
        w = min(2, a.steps)
        warm, _, _ = self.run(name, meta, prior, y, idx, w)  # warm-up
        # a sampler with many network calls per step (PnP-DM, DAPS) gets fewer steps / runs: each timed run
        # stays within --measure-cap-s (the warm-up's time per step, which includes one-time costs, is the estimate)
        steps = min(a.steps, max(1, int(a.measure_cap_s / max(warm / w, 1e-9))))
        repeats = min(a.repeats, max(1, int(a.measure_cap_s / max(warm / w * steps, 1e-9))))
        self.fresh_memory()
        walls = []
        for _ in range(repeats):
            wall, nfe, finite = self.run(name, meta, prior, y, idx, steps)
            walls.append(wall)
        peak = self.peak_mb()
        wall = statistics.median(walls)
        steps = steps if meta["has_steps"] else 0
        r = {"batch": batch, "steps": steps, "repeats": repeats, "capped": (steps, repeats) != (a.steps, a.repeats)
             and meta["has_steps"], "nfe": nfe, "wall_s": wall, "walls_s": walls, "finite_output": finite,
             "s_per_image": wall / batch, "s_per_step_per_image": wall / (steps * batch) if steps else None,
             "peak_gpu_mb": peak, "limit": meta["limit"], "forward_kind": meta["kind"]}
        if nfe == 0:
            return {**r, "s_per_call_per_image": None, "forward_ms": None, "wall_over_forward": None,
                    "pass": None, "note": "no network call (0 NFE)"}
        fwd = statistics.median(self.bare(prior, batch, meta["kind"], a.forward_repeats))
        bare = nfe * fwd
        if hasattr(prior, "decode"):  # a latent solver: its decoder and encoder calls count beside the network's
            dec, enc = self.coder_calls
            # with a vector-Jacobian product: every latent solver differentiates its data term through them
            t_dec, t_enc = (statistics.median(self.bare_coder(prior, batch, "fwd_bwd", which, a.forward_repeats))
                            for which in ("decode", "encode"))
            bare += dec * t_dec + enc * t_enc
            r.update({"decoder_calls": dec, "encoder_calls": enc, "decode_ms": t_dec * 1e3, "encode_ms": t_enc * 1e3})
        ratio = wall / bare
        return {**r, "s_per_call_per_image": wall / (nfe * batch), "forward_ms": fwd * 1e3,
                "wall_over_forward": ratio, "pass": ratio <= meta["limit"]}

    def bare_coder(self, prior, batch, kind, which, calls):
        """Wall times of ``calls`` bare decoder (``which="decode"``) or encoder calls, as a latent solver makes them:
        no_grad, or with a vector-Jacobian product to the input when the solver differentiates (``fwd_bwd``)."""
        import torch

        shape = tuple(prior.shape if which == "decode" else prior.pixel_shape)
        x = torch.randn((batch,) + shape, device=self.device)
        fn = getattr(prior, which)
        times = []
        for i in range(calls + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            if kind == "no_grad":
                with torch.no_grad():
                    fn(x)
            else:
                with torch.enable_grad():
                    xg = x.detach().requires_grad_(True)
                    out = fn(xg)
                    torch.autograd.grad(out, xg, grad_outputs=torch.ones_like(out))
            self.sync()
            if i:
                times.append(time.perf_counter() - t0)
        prior.reset_nfe()
        return times

    def memory(self, prior, batch) -> dict:
        """RED-diff's peak against a bare no_grad loop of as many forward calls at the same batch."""
        meta = sampler_meta("reddiff")
        y, idx = self.problem(prior, batch)
        self.run("reddiff", meta, prior, y, idx, 1)
        self.fresh_memory()
        _, nfe, _ = self.run("reddiff", meta, prior, y, idx, self.a.steps)
        red = self.peak_mb()
        self.fresh_memory()
        self.bare(prior, batch, "no_grad", max(nfe, 1), warmup=0)
        loop = self.peak_mb()
        weights = sum(p.numel() * p.element_size() for p in prior.parameters()) / 2 ** 20
        if red is None:
            return {"batch": batch, "calls": nfe, "not_measured": "no CUDA memory statistics on the CPU"}
        return {"batch": batch, "calls": nfe, "reddiff_peak_mb": red, "bare_loop_peak_mb": loop,
                "ratio": red / loop, "weights_mb": weights,
                "ratio_above_weights": (red - weights) / max(loop - weights, 1e-9)}

    def fits(self, prior, batch, name=None, meta=None) -> tuple:
        """Does one ``--probe-steps`` run (or one bare call of kind ``meta['kind']`` when ``name`` is None) at
        ``batch`` finish without OOM?  Memory is released either way (also when the deadline interrupts it)."""
        oom = oom_error_class()
        state = {"collect": True}
        error = None
        try:
            self.fresh_memory()
            prior.probe_batch = batch
            if name is None:
                self.bare(prior, batch, meta["kind"], 1, warmup=0)
            else:
                state["y"], idx = self.problem(prior, batch)
                self.run(name, meta, prior, state["y"], idx, self.a.probe_steps)
            state["collect"] = False  # a clean finish leaves no traceback cycles to collect
            ok = True
        except oom:
            ok = False
        except DeadlineReached:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. a kernel's 32-bit indexing limit: this batch does not run
            ok, error = False, f"{type(e).__name__}: {str(e)[:200]}"
        finally:
            prior.probe_batch = None
            peak = self.peak_mb()
            collect = state.pop("collect")
            state.clear()
            prior.reset_nfe()
            self.fresh_memory(collect)
        return (ok, peak) if error is None else (ok, peak, error)


def search_max_batch(fits, cap: int, box_s: float, clock=time.monotonic) -> dict:
    """Largest ``b <= cap`` with ``fits(b)`` (monotone): doubling from 1, then bisection between the last fit and the
    first failure.  ``fits(b) -> (ok, peak_mb)``, or ``(False, peak_mb, error)`` for a failure that is not an OOM
    (recorded in ``errors``; it bounds the batch all the same).  When ``box_s`` seconds have passed before a probe,
    stops and reports the largest fit seen as a lower bound (``status`` "time-boxed"; "deadline" when the global
    deadline interrupts a probe)."""
    end = clock() + box_s
    lo, hi, probes, b = 0, None, [], 1
    status = "exact"
    peaks, errors = {}, {}
    while True:
        if hi is None and lo >= cap:
            status = "cap"
            break
        if hi is not None and hi - lo <= 1:
            break
        if clock() > end:
            status = "time-boxed"
            break
        try:
            ok, peak, *err = fits(b)
        except DeadlineReached:
            status = "deadline"
            break
        probes.append([b, ok])
        peaks[b] = peak
        if err:
            errors[str(b)] = err[0]
        if ok:
            lo = b
        else:
            hi = b
        b = min(2 * lo, cap) if hi is None else (lo + hi) // 2
    return {"max_batch": lo, "first_oom": hi, "status": status, "probes": probes, "peak_mb_at_max": peaks.get(lo),
            "errors": errors}


# ============================================================================================ CUDA tests
def cuda_test_ids(tests_dir: Path) -> list[str]:
    """Node ids of the test functions whose decorators mention CUDA (skipif on availability, or a cuda mark)."""
    ids = []
    for f in sorted(tests_dir.glob("test_*.py")):
        tree = ast.parse(f.read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                if any("cuda" in ast.unparse(d).lower() for d in node.decorator_list):
                    ids.append(f"{f.relative_to(ROOT).as_posix()}::{node.name}")
    return ids


def run_cuda_tests(timeout_s: float, extra_path: str | None) -> dict:
    ids = cuda_test_ids(ROOT / "tests")
    if not _importable("pytest"):
        return {"status": "not run (no pytest)", "tests": ids}
    if timeout_s < 10:
        return {"status": "not measured (deadline)", "tests": ids}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # the unpacked wheels go at the end of sys.path, as in this process
    code = (f"import sys; sys.path.append({extra_path!r}); import pytest; "
            f"sys.exit(pytest.main({['-q', '-p', 'no:cacheprovider', '-rs', *ids]!r}))") if extra_path else None
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                      "-rs", *ids]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout_s:.0f} s", "tests": ids}
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1].strip("= ") if lines else ""
    status = "passed" if r.returncode == 0 else ("failed" if r.returncode == 1 else f"pytest exit {r.returncode}")
    if r.returncode == 0 and "skipped" in summary and "passed" not in summary:
        status = "skipped (no CUDA)"
    return {"status": status, "returncode": r.returncode, "summary": summary, "tests": ids,
            "seconds": round(time.monotonic() - t0, 1), "output_tail": (r.stdout + r.stderr)[-3000:]}


# ============================================================================================ driver
def _guard(fn, out: dict, key, deadline, label):
    """Run one measurement into ``out[key]``: "not measured" past the deadline, the error otherwise."""
    if deadline.hit or deadline.left() <= 0:
        deadline.hit = True
        out[key] = {"not_measured": "deadline"}
        return
    t0 = time.monotonic()
    try:
        out[key] = fn()
    except DeadlineReached:
        out[key] = {"not_measured": "deadline"}
    except Exception as e:  # noqa: BLE001 - one failing measurement must not lose the others
        out[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    if isinstance(out[key], dict):
        out[key].setdefault("seconds", round(time.monotonic() - t0, 2))
    print(f"[gpu_check] {label}: {time.monotonic() - t0:.1f} s"
          + "".join(f" ({k}: {out[key][k]})" for k in ("error", "not_measured") if k in out[key]),
          file=sys.stderr, flush=True)


def measure(a, command: str) -> dict:
    import torch

    from reddiff.priors.adm import ADM_IMAGENET_256_UNCOND, UNetConfig

    deadline = Deadline(a.budget_s)
    wheels = use_wheels(Path(a.wheels))
    device = torch.device("cpu" if a.dry_run else a.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            from reddiff.core.errors import UserError

            raise UserError("gpu_check: no CUDA device is available (use --dry-run on a CPU machine)")
        # an explicit index: set_per_process_memory_fraction refuses a bare "cuda"
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    cfg = UNetConfig(**DRY_RUN_UNET) if a.dry_run else ADM_IMAGENET_256_UNCOND
    names, source = discover_samplers()
    if a.samplers:
        names = [n for n in names if n in a.samplers.split(",")]
    metas = {}
    for n in names:
        try:
            metas[n] = sampler_meta(n)
        except Exception as e:  # noqa: BLE001 - reported per sampler
            metas[n] = {"error": f"{type(e).__name__}: {e}"}
    bench = Bench(a, device, deadline)
    res = {"timing": {}, "memory": {}, "max_batch": {}, "cuda_tests": {}}
    priors = {}

    def drop_priors():
        priors.clear()
        gc.unfreeze()  # the prior holds a reference cycle (its wrapped eps): let the collector free its memory
        bench.fresh_memory(collect=True)

    def prior_for(dt):
        if dt not in priors:
            drop_priors()
            priors[dt] = make_prior(cfg, device, dt, deadline)
            gc.freeze()  # later collections skip everything built so far (modules, weights): 0.3 s -> ms
        return priors[dt]

    def latent_prior():
        if "latent" not in priors:
            priors["latent"] = make_latent_prior(a.dry_run, device, deadline)
        return priors["latent"]

    budget_frac = None
    if bench.cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        budget_frac = min(1.0, a.memory_gib * GIB / total)

    def max_batch_phase(dt):
        per = res["max_batch"].setdefault(dt, {})
        if bench.cuda:
            torch.cuda.set_per_process_memory_fraction(budget_frac, device)
        # the paper's samplers first (its "max batch" column), then the others, then the bare-call references
        todo = [n for n in by_priority if "error" not in metas[n]] + ["bare no_grad", "bare fwd_bwd"]
        for i, n in enumerate(todo):
            if n.startswith("bare"):
                meta, sname = {"kind": n.split()[1]}, None
            else:
                meta, sname = metas[n], n
                if not meta["has_steps"]:
                    per[n] = {"n/a": "no network call (0 NFE)"}
                    continue
                if meta.get("needs_latent"):
                    per[n] = {"n/a": "a latent solver: timed on the latent model, no max-batch search"}
                    continue
            # a full box while the others can still get 8 s each, never less than a fair share of what is left
            spare = deadline.left() - a.reserve_s
            box = min(a.box_s, max(spare / (len(todo) - i), spare - 8.0 * (len(todo) - i - 1)))
            if box <= 0:
                per[n] = {"not_measured": "deadline"}
                continue
            _guard(lambda: max_batch_one(dt, sname, meta, box), per, n, deadline, f"max batch {dt} {n}")
        if bench.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, device)

    def max_batch_one(dt, sname, meta, box):
        prior = prior_for(dt)
        prior.oom_above = a.dry_oom_batch if a.dry_run else None  # the dry run's simulated OOM, this phase only
        try:
            r = search_max_batch(lambda b: bench.fits(prior, b, sname, meta), a.max_batch_cap, box)
        finally:
            prior.oom_above = prior.probe_batch = None
        if not r["probes"]:
            return {"not_measured": "deadline" if r["status"] == "deadline" else "time box"}
        return {**r, "simulated_oom": a.dry_run, "box_s": round(box, 1)}

    def cuda_tests():
        drop_priors()
        res["cuda_tests"] = run_cuda_tests(min(a.tests_timeout_s, deadline.left() - 5), wheels.get("path"))
        print(f"[gpu_check] CUDA tests: {res['cuda_tests']['status']}", file=sys.stderr, flush=True)

    # phases in order of priority: timings (+ RED-diff memory) per dtype, max batch of the first dtype, the CUDA
    # tests, max batch of the other dtypes
    # the paper's samplers first, the latent solvers last (on the latent model, fp32 only)
    by_priority = sorted(names, key=lambda n: (bool(metas[n].get("needs_latent")), n not in PAPER, names.index(n)))
    for dt in a.dtypes:
        per = res["timing"].setdefault(dt, {})
        for n in by_priority:
            per[n] = {}
            for b in a.batches:
                if "error" in metas[n]:
                    per[n][str(b)] = {"error": metas[n]["error"]}
                    continue
                if metas[n].get("needs_latent"):
                    if dt != a.dtypes[0]:
                        per[n][str(b)] = {"n/a": f"a latent solver: timed in {a.dtypes[0]} only"}
                        continue
                    _guard(lambda: bench.time_sampler(n, metas[n], latent_prior(), b), per[n], str(b), deadline,
                           f"time {dt} {n} batch {b} (latent model)")
                    continue
                _guard(lambda: bench.time_sampler(n, metas[n], prior_for(dt), b), per[n], str(b), deadline,
                       f"time {dt} {n} batch {b}")
        if "reddiff" in metas and "error" not in metas["reddiff"]:
            _guard(lambda: bench.memory(prior_for(dt), max(a.batches)), res["memory"], dt, deadline,
                   f"memory {dt} reddiff")
    if not a.no_max_batch:
        max_batch_phase(a.dtypes[0])
    cuda_tests()
    if not a.no_max_batch:
        for dt in a.dtypes[1:]:
            max_batch_phase(dt)
    elapsed = deadline.elapsed()
    res["paper"] = PAPER
    res["not_measured"] = not_measured(res)
    res["checks"] = checks(res)
    res["meta"] = {
        "command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "dry_run": a.dry_run, "machine": machine(device), "network": "tiny ADM UNet (dry run)" if a.dry_run
        else "ADM ImageNet-256 unconditional (learn_sigma), random weights",
        "latent_network": "tiny random latent model (dry run)" if a.dry_run
        else "Stable Diffusion 1.5 UNet + autoencoder sizes (diffusers configs), random weights",
        "unet_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "n_params": n_params(cfg), "task": "sr4", "operator": bench.op_source,
        "samplers": names, "sampler_source": source, "sampler_meta": metas, "batches": a.batches,
        "dtypes": a.dtypes, "steps": a.steps, "repeats": a.repeats, "forward_repeats": a.forward_repeats,
        "probe_steps": a.probe_steps, "memory_budget_gib": a.memory_gib, "memory_fraction": budget_frac,
        "max_batch_cap": a.max_batch_cap, "box_s": a.box_s, "budget_s": a.budget_s,
        "elapsed_s": round(elapsed, 1), "cpu_s": round(time.process_time(), 1), "deadline_hit": deadline.hit,
        "wheels": wheels,
    }
    return res


def n_params(cfg):
    """Parameter count of ``cfg``'s UNet, built on the meta device (nothing allocated); None if it cannot be built."""
    import torch

    from reddiff.priors.adm import UNet

    try:
        with torch.device("meta"):
            return sum(p.numel() for p in UNet(cfg).parameters())
    except Exception:  # noqa: BLE001 - the build error is already reported by every measurement
        return None


def not_measured(res) -> list[str]:
    out = []
    for dt, per in res["timing"].items():
        for n, byb in per.items():
            out += [f"time {dt} {n} batch {b}: {r['not_measured']}" for b, r in byb.items() if "not_measured" in r]
    out += [f"memory {dt}: {r['not_measured']}" for dt, r in res["memory"].items() if "not_measured" in r]
    for dt, per in res["max_batch"].items():
        out += [f"max batch {dt} {n}: {r['not_measured']}" for n, r in per.items() if "not_measured" in r]
    if "not_measured" in str(res["cuda_tests"].get("status", "")) or "deadline" in str(res["cuda_tests"].get("status")):
        out.append(f"CUDA tests: {res['cuda_tests']['status']}")
    return out


def checks(res) -> list[dict]:
    out = []
    for dt, per in res["timing"].items():
        for n, byb in per.items():
            for b, r in byb.items():
                if r.get("wall_over_forward") is not None:
                    out.append({"check": f"{n} wall/fwd ({dt}, batch {b})", "value": r["wall_over_forward"],
                                "target": r["limit"], "pass": r["pass"]})
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--md", default=None, help="write the Markdown report here (default: next to --json)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny UNet, simulated OOM: tests the code path")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget-s", type=float, default=450.0, help="global deadline from process start (default 450)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--samplers", default=None, help="comma-separated subset of the registry (default: all)")
    p.add_argument("--steps", type=int, default=None, help="steps of each timed run (default 5; dry run 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median; default 2, dry 1)")
    p.add_argument("--forward-repeats", type=int, default=None, help="timed bare calls (median; default 5, dry 3)")
    p.add_argument("--measure-cap-s", type=float, default=20.0,
                   help="seconds one timed run may take: fewer steps/runs for samplers with many calls per step")
    p.add_argument("--probe-steps", type=int, default=2, help="steps of a max-batch probe run")
    p.add_argument("--memory-gib", type=float, default=40.0, help="memory budget of the max-batch search")
    p.add_argument("--max-batch-cap", type=int, default=512)
    p.add_argument("--box-s", type=float, default=40.0, help="time box of one max-batch search")
    p.add_argument("--reserve-s", type=float, default=30.0,
                   help="seconds the max-batch phase leaves for the CUDA tests and the report")
    p.add_argument("--tests-timeout-s", type=float, default=90.0)
    p.add_argument("--no-max-batch", action="store_true", help="skip the max-batch search")
    p.add_argument("--dry-oom-batch", type=int, default=3, help="dry run: simulated OOM above this batch")
    p.add_argument("--wheels", default=str(DEFAULT_WHEELS), help="folder of carried wheels (benchmarks.gpu_wheels)")
    a = p.parse_args(argv)
    for k, gpu, dry in (("steps", 5, 3), ("repeats", 2, 1), ("forward_repeats", 5, 3)):
        if getattr(a, k) is None:
            setattr(a, k, dry if a.dry_run else gpu)
    try:
        a.batches = [int(b) for b in a.batches.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {a.batches!r}")
    a.dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    if not a.batches or min(a.batches) < 1 or min(a.steps, a.repeats, a.forward_repeats, a.probe_steps) < 1:
        p.error("batches, steps and repeats must be >= 1")
    bad = [d for d in a.dtypes if d not in ("fp32", "bf16", "fp16")]
    if bad or not a.dtypes:
        p.error(f"--dtypes: unknown {bad}; use fp32, bf16, fp16")
    return a


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    command = "python -m benchmarks.gpu_check" + ("" if not argv else " " + shlex.join(argv))
    from benchmarks.gpu_report import markdown

    try:
        res = measure(a, command)
    except Exception as e:  # noqa: BLE001 - UserError: one line, exit 2
        from reddiff.core.errors import UserError

        if isinstance(e, UserError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
    text = json.dumps(res, indent=2, default=str)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text + "\n")
    md = a.md or (str(Path(a.json).with_suffix(".md")) if a.json else None)
    if md:
        Path(md).parent.mkdir(parents=True, exist_ok=True)
        Path(md).write_text(markdown(res))
    if not a.json:
        print(text)
    print(f"[gpu_check] done in {res['meta']['elapsed_s']:.0f} s; not measured: {len(res['not_measured'])}",
          file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
