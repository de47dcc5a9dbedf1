"""Measured effect of every official-code quirk that ``compat=official`` reproduces (docs/DIFFERENCES.md).

    python -m benchmarks.compat_effects [--md results/compat_effects.md] [--no-samplers]

Operator rows are exact linear algebra on the 12 demo images (64 px); the sampler rows (RED-diff batch-mean
loss, DDRM last step) run the embedded prior on the first 4 demo images (about a minute on one CPU core); rows 9-21
(DDNM+, DiffPIR, MCG-diff, FPS-SMC, DAPS, PnP-DM: ``benchmarks/compat_effects_samplers.py``, its docstring has the
sizes) run each sampler with our default and with the official value of one key (about 5 minutes more).
Nothing here needs the official code: each quirk is the switch of our own implementation.
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
import time

import torch

from reddiff.core.diffusion import Schedule, timesteps
from reddiff.metrics.suite import png_roundtrip, psnr
from reddiff.operators.inpainting import Colorization
from reddiff.operators.separable import SeparableBlur
from reddiff.registry import build_operator

BLUR = dict(kernel="uniform", size=9, boundary="zero", window="ddrm", svd_cutoff=0.03)


def demo_images(count=None) -> torch.Tensor:
    from reddiff.data.demo import DemoDataset

    ds = DemoDataset(resolution=64, count=count)
    return torch.stack([ds.load(e) for e in ds.entries()]).double()


def dense(fn, shape):
    E = torch.eye(math.prod(shape), dtype=torch.float64)
    return torch.stack([fn(E[k].reshape(1, *shape)).reshape(-1) for k in range(E.shape[0])], 1)


def rel(a, b):
    return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1))


def operator_rows(x: torch.Tensor) -> list[tuple[str, str]]:
    rows = []
    n = 8
    t = SeparableBlur(spectrum="ddrm_tiled", **BLUR).setup(None, (1, 3, n, n), dtype=torch.float64)
    e = SeparableBlur(**BLUR).setup(None, (1, 3, n, n), dtype=torch.float64)
    Ht, He = dense(t.forward, (3, n, n)), dense(e.forward, (3, n, n))
    N = n * n
    per = [float((Ht[c * N:(c + 1) * N, c * N:(c + 1) * N] - He[c * N:(c + 1) * N, c * N:(c + 1) * N]).abs().max())
           for c in range(3)]
    rows.append(("blur spectrum, n = 8: per-channel max ‖H_c − kron(A, A)‖_max (largest entry of kron(A, A))",
                 " / ".join(f"{v:.4f}" for v in per) + f" ({float(He.abs().max()):.4f})"))
    op_t = SeparableBlur(spectrum="ddrm_tiled", **BLUR).setup(None, x.shape, dtype=torch.float64)
    op_e = SeparableBlur(**BLUR).setup(None, x.shape, dtype=torch.float64)
    r = rel(op_t.forward(x), op_e.forward(x))
    rows.append(("blur spectrum, 64-px demo set: ‖H_official x − H x‖ / ‖H x‖",
                 f"mean {r.mean():.3f}, min {r.min():.3f}, max {r.max():.3f}"))
    y = op_e.forward(x)
    g = torch.Generator().manual_seed(0)
    yn = y + 2 * 0.05 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    op_r = SeparableBlur(pinv_mode="reddiff", **BLUR).setup(None, x.shape, dtype=torch.float64)
    rows.append(("blur pinv (true blur): ‖pinv_reddiff − pinv_MP‖ / ‖pinv_MP‖, noiseless / σ_y = 0.05",
                 f"{float(rel(op_r.pinv(y), op_e.pinv(y)).max()):.1e} / {float(rel(op_r.pinv(yn), op_e.pinv(yn)).mean()):.1e}"))
    c0 = Colorization().setup(None, x.shape, dtype=torch.float64)
    c1 = Colorization(weights=[0.3333, 0.3334, 0.3333]).setup(None, x.shape, dtype=torch.float64)
    rows.append(("colorization weights: max abs(H_official x − H x) on the demo set (bound 1.33e-4 on [−1, 1])",
                 f"{float((c1.forward(x) - c0.forward(x)).abs().max()):.2e}"))
    for s in (300, 400, 600):
        d, o = timesteps(s), timesteps(s, spacing="official")
        rows.append((f"timesteps({s}): entries, first t (default / official)", f"{len(d)}, {d[0]} / {len(o)}, {o[0]}"))
    sch = Schedule()
    a = float(sch.alpha_bar_at(timesteps(20)[0]))
    rows.append(("DDRM start (20 steps, t = 950): official x_T / ours = 1/sqrt(1 - a_T)", f"1 + {1 / math.sqrt(1 - a) - 1:.1e}"))
    op = build_operator("deblur_uniform").setup(None, x.shape, dtype=torch.float64)
    xb = op.pinv(op.forward(x)).clamp(-1, 1)
    dp = psnr(png_roundtrip(xb.float()).double(), x) - psnr(xb, x)
    rows.append(("PNG round trip before PSNR (H^+ y of deblur_uniform, demo set): PSNR change in dB",
                 f"mean {dp.mean():+.3f}, largest change {dp.abs().max():.3f}"))
    pr = build_operator("phase_retrieval").setup(None, x.shape, dtype=torch.float64)
    r = rel(pr.forward((x + 1) / 2), pr.forward(x) / 2)   # ours (DPS, RED-diff) | DAPS, PnP-DM: the [0, 1] image
    rows.append(("phase retrieval input (no switch, row 22): ‖A((x+1)/2) − A(x)/2‖ / ‖A(x)/2‖, demo set",
                 f"mean {r.mean():.2f}, min {r.min():.2f}, max {r.max():.2f}"))
    return rows


def load_prior():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    return instantiate(OmegaConf.load("conf/prior/embedded.yaml"), device="cpu")


def sampler_rows(prior) -> list[tuple[str, str]]:
    from reddiff.registry import build_sampler
    from reddiff.core.rng import BatchRNG

    x = demo_images(4).float()
    idx = list(range(4))
    rows = []
    op = build_operator("deblur_uniform").setup(idx, x.shape, dtype=torch.float32)
    y = op.forward(x)
    outs = {b: build_sampler("reddiff", "deblur_uniform", batch_loss=b).sample(y, op, prior, BatchRNG(idx))
            for b in ("per_image", "batch_mean")}
    d = (outs["batch_mean"] - outs["per_image"]).abs().max()
    p = psnr(outs["batch_mean"].double(), x.double()) - psnr(outs["per_image"].double(), x.double())
    rows.append(("RED-diff batch_mean vs per_image (deblur_uniform, B = 4, 100 steps): max abs(Δx), PSNR change",
                 f"{float(d):.1e}, {p.mean():+.3f} dB"))
    op = build_operator("sr4").setup(idx, x.shape, dtype=torch.float32)
    y = op.forward(x)
    res = {}
    for last in ("measurement", "x0_hat"):
        out = build_sampler("ddrm", "sr4", last_step=last).sample(y, op, prior, BatchRNG(idx))
        res[last] = float((op.forward(out) - y).abs().max())
    rows.append(("DDRM last step (noiseless sr4): max abs(H x − y), measurement / x0_hat",
                 f"{res['measurement']:.1e} / {res['x0_hat']:.1e}"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--md", default=None, help="write a Markdown table here")
    ap.add_argument("--no-samplers", action="store_true", help="operator rows only (seconds)")
    ap.add_argument("--no-round2", action="store_true", help="skip rows 9-21 (DDNM+ ... PnP-DM; minutes)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start, cpu = time.perf_counter(), time.process_time()
    rows, notes = operator_rows(demo_images()), []
    if not args.no_samplers:
        prior = load_prior()
        rows += sampler_rows(prior)
        if not args.no_round2:
            from benchmarks.compat_effects_samplers import sampler_rows_round2

            more, timing = sampler_rows_round2(prior, demo_images(4).float())
            rows += more
            notes.append(f"Rows 9-21: {timing}.")
    cmd = " ".join(["python -m benchmarks.compat_effects"] + (sys.argv[1:] if argv is None else list(argv)))
    lines = [f"Command: `{cmd}` ({datetime.date.today()}, "
             f"{time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU, one thread)", "",
             "| quirk (compat key) measurement | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if notes:
        lines += [""] + notes
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
