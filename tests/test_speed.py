"""Speed benchmark (contract 4), batched RED-diff sweeps (reddiff.run.sweep) and the opt-in fast paths (reddiff.priors.perf)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import torch

from benchmarks.speed import RSS_TARGET, forward_kind, load_prior, make_sampler, speed_samplers
from reddiff.registry import build_operator
from reddiff.priors.perf import TOLERANCES, FastPathPrior, apply_fast_paths, deviation, recommended_fast_paths
from reddiff.priors.base import Prior
from reddiff.priors.gaussian import GaussianPrior
from reddiff.core.rng import BatchRNG
from reddiff.samplers.reddiff import REDDiff
from reddiff.priors.latent import LinearDecoderGMM
from reddiff import registry
from reddiff.run.sweep import batched_sweep, grid, separate_runs

CONTRACT_KEYS = ("wall_over_forward", "peak_rss_mb", "images_per_second")

torch.set_num_threads(1)  # small tensors: one thread is fastest, and two stall badly on a busy 2-core machine


@pytest.fixture(scope="module")
def embedded():
    return load_prior({"prior": "embedded", "device": "cpu"})


class PerItemPrior(Prior):
    """Evaluates another prior one item at a time: batch-invariant by construction (a batch of N gives bit for bit
    what N batches of 1 give), so a batched sweep can be compared exactly with separate runs."""

    def __init__(self, inner: Prior):
        super().__init__(inner.schedule)
        self.inner = inner
        self.shape = inner.shape
        self.calls = 0

    def _eps(self, x_t, t):
        self.calls += 1
        return torch.cat([self.inner._eps(x_t[i:i + 1], t[i:i + 1]) for i in range(x_t.shape[0])])


def sr4_problem(indices, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((len(indices), 3, 64, 64), generator=g) * 2 - 1
    op = build_operator("sr4", sigma_y=0.05)
    op.setup(indices, tuple(x.shape))
    y = op.measure(x, BatchRNG([seed + 100 + i for i in indices]))
    return x, y, op


# -------------------------------------------------------------------------------------------------- benchmark
def test_quick_benchmark_emits_contract(tmp_path, root):
    """`python -m benchmarks.speed --quick --json F` runs every sampler in its own process and writes the
    contracted keys, consistent with the raw timings, plus the Markdown report."""
    out = tmp_path / "speed.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--quick", "--json", str(out)], cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    meta = res["meta"]
    for name in speed_samplers():
        e = res[name]
        assert "missing" not in e and "error" not in e, e
        for k in CONTRACT_KEYS + ("batch", "nfe", "forward_ms", "device"):
            assert k in e, (name, k)
        for k in CONTRACT_KEYS + ("forward_ms",):
            assert math.isfinite(e[k]) and e[k] > 0, (name, k, e[k])
        steps = meta["steps"][name]
        latent = "decoder_calls" in e                                  # a latent solver, on latent_tiny
        assert latent == bool(getattr(registry.sampler_class(name), "needs_latent", False))
        small = LinearDecoderGMM(torch.eye(4, dtype=torch.float64), torch.eye(4)) if latent else GaussianPrior(dim=4)
        expect = make_sampler(name, steps, small=True).expected_nfe(small)  # NFE per image the class declares
        # counted by the prior (not always >= steps: OT-ODE runs the last N - int(N start_time) steps of its grid)
        assert e["nfe"] == expect > 0, (name, e["nfe"], expect)
        assert e["batch"] == max(meta["batches"])
        coder = (e["decoder_calls"] * e["decode_ms"] + e["encoder_calls"] * e["encode_ms"]) if latent else 0.0
        assert e["wall_over_forward"] == pytest.approx(e["wall_s"] / ((e["nfe"] * e["forward_ms"] + coder) / 1e3),
                                                       rel=1e-9)
        assert e["images_per_second"] == pytest.approx(e["batch"] / e["wall_s"], rel=1e-9)
        # the time inside the network (and, for a latent solver, the decoder and encoder) is part of the wall time
        assert 1.0 <= e["wall_over_network_time"] < 50, (name, e["wall_over_network_time"])
        assert e["forward_kind"] == forward_kind(name)
        assert e["device"].startswith("cpu")
    # DPS and Pi-GDM are compared with forward+backward, which costs more than a forward
    loops = res["bare_forward"]
    b = str(max(meta["batches"]))
    assert set(loops) == {"no_grad", "fwd_bwd"}
    # RED-diff never builds a graph through the network: its peak memory is that of a bare no_grad forward loop
    assert res["reddiff"]["rss_over_bare_loop"] == pytest.approx(
        res["reddiff"]["peak_rss_mb"] / loops["no_grad"][b]["peak_rss_mb"])
    assert res["reddiff"]["rss_over_bare_loop"] <= RSS_TARGET
    sw = res["sweep"]
    assert sw["nfe_batched"] * sw["K"] == sw["nfe_separate"]
    assert sw["ratio"] == pytest.approx(sw["batched_s"] / sw["separate_s"])
    assert {c["check"].split()[0] for c in meta["checks"]} >= set(speed_samplers())
    md = out.with_suffix(".md").read_text()
    assert "python -m benchmarks.speed --quick" in md and torch.__version__ in md and "## Checks" in md


# ------------------------------------------------------------------------------------------------------ sweeps
def test_grid_and_validation():
    g = grid(lam=[0.1, 1.0], lr=[0.25, 0.5, 1.0])
    assert len(g) == 6 and g[0] == {"lam": 0.1, "lr": 0.25} and g[1] == {"lam": 0.1, "lr": 0.5}
    with pytest.raises(ValueError, match="cannot vary"):
        grid(steps=[10, 20])
    prior = GaussianPrior(shape=(3, 64, 64))
    x, y, op = sr4_problem([0, 1])
    with pytest.raises(ValueError, match="seeds"):
        batched_sweep(g, y, op, prior, seeds=[0])


@pytest.mark.parametrize("which", ["gaussian", "embedded_per_item"])
def test_batched_sweep_equals_separate_runs(which, request):
    """K = 4 configurations (lam, lr, weighting, sigma_x0) of 2 images in one batch give bit for bit the separate
    runs with the same per-image seeds, also when split into chunks; the batched sweep makes `steps` network
    calls, the separate runs K * steps.  The network is made batch-invariant (the Gaussian prior is; the embedded
    UNet is evaluated item by item), so any difference would be a bug in the sweep's bookkeeping."""
    if which == "gaussian":
        prior, steps = GaussianPrior(shape=(3, 64, 64), mean=torch.full((3 * 64 * 64,), 0.1)), 12
    else:
        prior, steps = PerItemPrior(request.getfixturevalue("embedded")), 3
    configs = [{"lam": 0.25, "lr": 0.5}, {"lam": 1.0, "lr": 0.25}, {"weighting": "sqrt", "lr": 0.1},
               {"sigma_x0": 0.05, "lam": 0.5}]
    indices, seeds = [3, 7], [11, 12]
    x, y, op = sr4_problem(indices)
    base = REDDiff(steps=steps)
    prior.reset_nfe()
    xb = batched_sweep(configs, y, op, prior, seeds, indices=indices, base=base)
    assert prior.nfe == steps
    prior.reset_nfe()
    xs = separate_runs(configs, y, op, prior, seeds, indices=indices, base=base)
    assert prior.nfe == len(configs) * steps
    assert xb.shape == (2, len(configs), 3, 64, 64)
    assert torch.equal(xb, xs)
    xc = batched_sweep(configs, y, op, prior, seeds, indices=indices, base=base, max_batch=3)
    assert torch.equal(xb, xc)
    # not vacuous: every configuration gives a different result, and so does every image
    for k in range(1, len(configs)):
        assert (xb[:, k] - xb[:, 0]).abs().max() > 1e-3
    assert (xb[0] - xb[1]).abs().max() > 1e-3
    # the separate run of configuration 1 is an ordinary RED-diff run with the job runner's seeding
    op.setup(indices, tuple(x.shape))
    ref = REDDiff(steps=steps, lam=1.0, lr=0.25).sample(y, op, prior, BatchRNG(seeds))
    assert torch.equal(xs[:, 1], ref)


@pytest.mark.slow
def test_batched_sweep_with_batched_network_matches_to_rounding(embedded):
    """With the real (batched) network, convolutions round differently at batch 4 and batch 1 (~1e-6); Adam's
    normalised first steps amplify that on a few pixels, but the restorations agree: RMS difference below 1e-3 of
    the RMS difference between two configurations, and the same PSNR to 0.01 dB."""
    configs = grid(lam=[0.25, 1.0], lr=[0.25, 0.5])
    x, y, op = sr4_problem([0])
    base = REDDiff(steps=20)
    xb = batched_sweep(configs, y, op, embedded, [5], indices=[0], base=base)
    xs = separate_runs(configs, y, op, embedded, [5], indices=[0], base=base)
    rms = (xb - xs).square().mean().sqrt()
    between = (xs[:, 0] - xs[:, -1]).square().mean().sqrt()
    assert rms <= 1e-3 * between, (float(rms), float(between))

    def psnr(a):
        return 10 * torch.log10(4 / (a.clamp(-1, 1) - x[:, None]).square().flatten(2).mean(-1))

    assert (psnr(xb) - psnr(xs)).abs().max() < 0.01


# --------------------------------------------------------------------------------------------------- fast paths
def test_fast_paths_off_by_default():
    prior = GaussianPrior(dim=4)
    assert apply_fast_paths(prior) is prior
    assert recommended_fast_paths("cpu") == {"channels_last": False, "compile": False, "autocast": None}
    with pytest.raises(ValueError, match="autocast"):
        apply_fast_paths(prior, autocast="int8")


def test_channels_last_same_result(embedded):
    """channels_last on the embedded prior: max |d eps| <= 1e-5 * max(1, max|eps|) over t in 10..999, and the
    layout really changed."""
    ref = load_prior({"prior": "embedded", "device": "cpu"})
    fast = apply_fast_paths(load_prior({"prior": "embedded", "device": "cpu"}), channels_last=True)
    conv = fast.net.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    dev = deviation(ref, fast, batch=2)
    assert dev["max_abs_over_scale"] <= TOLERANCES["channels_last"]["max_abs_over_scale"], dev


def test_bf16_autocast_within_tolerance(embedded):
    """bf16 autocast on the embedded prior: relative RMS error of eps <= 1e-2 at every t tested, and the
    computation really ran in reduced precision (the error is not zero)."""
    fast = apply_fast_paths(load_prior({"prior": "embedded", "device": "cpu"}), autocast="bf16")
    dev = deviation(embedded, fast, batch=2)
    assert 0 < dev["rel_rms"] <= TOLERANCES["bf16"]["rel_rms"], dev
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert fast.eps(x, 500).dtype == torch.float32       # callers get their own dtype back


class ConvPrior(Prior):
    """A small convolutional eps-predictor (not a UNetPrior): exercises the generic FastPathPrior wrapper."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shape = (3, 16, 16)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.SiLU(),
                                       torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.SiLU(),
                                       torch.nn.Conv2d(32, 3, 3, padding=1))

    def _eps(self, x_t, t):
        return self.net(x_t) * (1 + t.to(x_t.dtype)[:, None, None, None] / 1000)


def test_generic_wrapper_channels_last_bf16_and_gradients():
    ref = ConvPrior()
    cl = apply_fast_paths(ConvPrior(), channels_last=True)
    assert isinstance(cl, FastPathPrior) and cl.shape == ref.shape
    assert deviation(ref, cl, batch=3)["max_abs_over_scale"] <= TOLERANCES["channels_last"]["max_abs_over_scale"]
    bf = apply_fast_paths(ConvPrior(), autocast="bf16")
    d = deviation(ref, bf, batch=3)
    assert 0 < d["rel_rms"] <= TOLERANCES["bf16"]["rel_rms"], d
    # DPS / Pi-GDM differentiate eps with respect to x_t: the gradient flows through the fast path
    x = torch.randn(2, 3, 16, 16)
    grads = []
    for p in (ref, cl):
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(p.eps(xg, 300).square().sum(), xg)
        grads.append(g)
    assert (grads[0] - grads[1]).abs().max() <= 1e-4 * max(1.0, grads[0].abs().max().item())
    cl.reset_nfe()
    cl.eps(x, 10)
    assert cl.nfe == 1


@pytest.mark.slow
def test_compile_graph_capture_matches_eager(embedded):
    """torch.compile through apply_fast_paths (backend aot_eager: the graph capture and autograd of compile without
    the C++ code generation, which takes minutes on 2 cores): same eps and input gradient as eager."""
    fast = apply_fast_paths(load_prior({"prior": "embedded", "device": "cpu"}), compile=True,
                            compile_kwargs={"backend": "aot_eager"})
    dev = deviation(embedded, fast, batch=1, timesteps=(100, 900))
    assert dev["max_abs_over_scale"] <= TOLERANCES["compile"]["max_abs_over_scale"], dev
    x = torch.randn(1, 3, 64, 64)
    grads = []
    for p in (embedded, fast):
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(p.eps(xg, 500).sum(), xg)
        grads.append(g)
    assert (grads[0] - grads[1]).abs().max() <= 1e-4 * max(1.0, grads[0].abs().max().item())


@pytest.mark.slow
def test_sweep_cli_equals_run_py_jobs(tmp_path, root):
    """`python -m reddiff.run.sweep +experiment=demo_lambda_lr_batched` writes one job dir per configuration whose
    metrics.csv equals, value for value, that of `python run.py` with the same configuration.  Network calls are
    made at batch 1 on both sides (sweep_max_batch=1, batch_size=1) and the weights are copied first (a training run
    may re-export the embedded prior meanwhile), so the two are bit-identical computations."""
    import os
    import shutil

    from reddiff.store.results import read_rows
    from reddiff.core.weights import REGISTRY

    from safetensors.torch import load_file

    w = tmp_path / "prior.safetensors"
    for attempt in range(5):  # the training run may be re-exporting the file right now: copy a readable version
        shutil.copy(REGISTRY["embedded64"].find(), w)
        try:
            load_file(w)
            break
        except Exception:  # noqa: BLE001
            if attempt == 4:
                raise
            time.sleep(2.0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    common = ["data.count=2", "sampler.steps=3", "metrics.names=[psnr]", "progress=false", f"prior.weights={w}",
              "prior.arch=embedded64", "batch_size=1"]
    sweep_dir = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "reddiff.run.sweep", "+experiment=demo_lambda_lr_batched", *common,
                        "sweep_grid.lam=[0.25,1.0]", "sweep_grid.lr=[0.5]", "sweep_max_batch=1",
                        f"hydra.run.dir={sweep_dir}"], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / "summary.json").exists())
    assert [p.name for p in jobs] == ["0_lam=0.25_lr=0.5", "1_lam=1.0_lr=0.5"]
    s1 = json.loads((jobs[1] / "summary.json").read_text())
    assert s1["config"]["sampler"]["lam"] == 1.0 and "sampler.lam=1.0" in s1["overrides"]
    assert s1["cost"]["nfe_per_image"] == 3 and s1["n_images"] == 2
    assert (sweep_dir / "table.md").exists() and "sampler.lam=1.0" in (sweep_dir / "table.md").read_text()
    single = tmp_path / "single"
    r = subprocess.run([sys.executable, "run.py", "+experiment=demo_lambda_lr", *common, "sampler.lam=1.0",
                        "sampler.lr=0.5", "logger=none", f"hydra.run.dir={single}"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    batched = {row["image_id"]: row["psnr"] for row in read_rows(jobs[1] / "metrics.csv")}
    alone = {row["image_id"]: row["psnr"] for row in read_rows(single / "metrics.csv")}
    assert batched == alone and len(alone) == 2
    other = {row["image_id"]: row["psnr"] for row in read_rows(jobs[0] / "metrics.csv")}
    assert other != alone                                    # the two configurations differ


def test_batched_preset_is_the_demo_lambda_lr_grid(root):
    """conf/experiment/demo_lambda_lr_batched.yaml runs the grid of demo_lambda_lr (same lam x lr values, task, prior,
    data, sampler settings), so its tables are comparable with the unbatched multirun's."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        batched = compose("config", overrides=["+experiment=demo_lambda_lr_batched"])
        plain = compose("config", overrides=["+experiment=demo_lambda_lr"], return_hydra_config=True)
    params = plain.hydra.sweeper.params
    for key in ("lam", "lr"):
        assert [float(v) for v in params[f"sampler.{key}"].split(",")] == list(batched.sweep_grid[key])
    for key in ("task", "prior", "data", "sampler", "metrics", "seed"):
        assert batched[key] == plain[key], key
    assert batched.sweep_max_batch >= 1


def test_set_reaches_the_sampler_and_a_bad_one_is_one_line():
    """``--set d_flow.max_iter=1`` builds D-Flow with it (its NFE follows); an unknown sampler is refused in one
    line with exit code 2."""
    from benchmarks.speed import parse_args

    a = parse_args(["--samplers", "d_flow", "--set", "d_flow.max_iter=1", "--set", "d_flow.lbfgs_iter=3"])
    assert a.set == {"d_flow": {"max_iter": 1, "lbfgs_iter": 3}}
    s = make_sampler("d_flow", 10, sets=a.set["d_flow"])
    assert (s.max_iter, s.lbfgs_iter) == (1, 3) and s.expected_nfe(None) == 2 * 10 * (3 + 1 * 3)
    from pathlib import Path

    p = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--set", "nosuch.x=1"], capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 2 and "--set needs SAMPLER.KEY=VALUE" in p.stderr.strip().splitlines()[-1]
