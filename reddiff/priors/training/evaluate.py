"""Evaluate a UNet prior on the held-out demo images: as a denoiser, and by its unconditional samples.

    python -m reddiff.priors.training.evaluate                                   # the embedded prior, writes the card section
    python -m reddiff.priors.training.evaluate --weights embedded64 --out results/prior_samples.png --card docs/MODEL_CARD.md

(a) Denoising.  For each noise level sigma (in [0, 1] pixel units) the timestep t is the one whose x0-space
    noise std sqrt((1 - a_t) / a_t) is closest to 2 sigma (model units, [-1, 1]); the noise fed is exactly that
    timestep's level (so the effective sigma is reported too).  With x_t = sqrt(a_t) (x0 + sqrt((1-a_t)/a_t) e),
    the prior's one-step x0-prediction is compared with the best Gaussian-filter denoiser applied to
    y = x_t / sqrt(a_t): the filter width is chosen per level from a grid, on the same images (an oracle choice,
    which favours the baseline).  PSNR on [0, 1], per image, then averaged; outputs are clipped to [-1, 1].
(b) Samples.  An unconditional DDIM (eta = 0, x0 clipped to [-1, 1] at each step) sample grid.

Images: the 12 held-out demo images (``reddiff/assets/demo/*.png``, 64x64), or, when those are absent,
12 centre crops of the held-out photos of :mod:`reddiff.data.photos` (4 scales each).  Images are resized to the
prior's resolution when it is not 64.

The numbers and the training record (``train_info`` in the safetensors metadata, the last line of the training
log) are written between the ``eval_prior`` markers of ``docs/MODEL_CARD.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[3]
DEMO_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo"
BEGIN, END = "<!-- eval_prior:begin -->", "<!-- eval_prior:end -->"
FILTER_GRID = (0.0,) + tuple(round(0.25 * k, 2) for k in range(1, 17))  # 0 = no filtering; up to 4 px


# ---------------------------------------------------------------------------------------------- images
def load_images(resolution: int, demo_dir: Path = DEMO_DIR) -> tuple[torch.Tensor, list[str], str]:
    """(N, 3, R, R) in [-1, 1], their ids, and a description of the source."""
    from PIL import Image

    files = sorted(demo_dir.glob("*.png")) if demo_dir.is_dir() else []
    if files:
        arrs = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        ids = [f.stem for f in files]
        src = f"{len(files)} demo images {demo_dir.relative_to(ROOT) if demo_dir.is_relative_to(ROOT) else demo_dir}/*.png"
    else:
        from reddiff.data.photos import held_out_photos

        arrs, ids = [], []
        for name, img in held_out_photos().items():
            h, w = img.shape[:2]
            for frac in (1.0, 0.7, 0.5, 0.35):  # centre squares of these fractions of the short side
                side = int(round(frac * min(h, w)))
                y0, x0 = (h - side) // 2, (w - side) // 2
                sq = Image.fromarray(img[y0:y0 + side, x0:x0 + side]).resize((64, 64), Image.BICUBIC, reducing_gap=None)
                arrs.append(np.asarray(sq))
                ids.append(f"{name}_centre{int(frac * 100)}")
        src = "12 centre crops (100/70/50/35% of the short side) of the held-out photos (reddiff.data.photos.HELD_OUT)"
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", antialias=True, align_corners=False)
        src += f", resized to {resolution}x{resolution}"
    return x.clamp(-1, 1), ids, src


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR on [0, 1] of images given in [-1, 1]."""
    mse = (((x_hat.clamp(-1, 1) - x) / 2) ** 2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    r = max(1, min(int(math.ceil(4 * sigma)), x.shape[-1] - 1, x.shape[-2] - 1))  # reflect padding needs r < size
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


# ---------------------------------------------------------------------------------------------- evaluations
@torch.no_grad()
def denoise_eval(prior, x0: torch.Tensor, sigmas, seed: int = 0, batch: int = 12) -> list[dict]:
    sched = prior.schedule
    rows = []
    for i, sigma in enumerate(sigmas):
        t = sched.t_for_noise_std(2 * sigma)
        a = float(sched.alpha_bar_at(t))
        s_t = math.sqrt((1 - a) / a)  # x0-space noise std of timestep t, model units
        g = torch.Generator().manual_seed(seed + 1000 * i)
        e = torch.randn(x0.shape, generator=g)
        y = x0 + s_t * e
        x_t = math.sqrt(a) * y
        t0 = time.time()
        x0_hat = torch.cat([prior.x0(x_t[j:j + batch], t) for j in range(0, len(x0), batch)])
        sec = time.time() - t0
        p_prior = psnr(x0_hat, x0)
        filt = {s: psnr(gaussian_blur(y, s), x0).mean().item() for s in FILTER_GRID}
        best = max(filt, key=filt.get)
        rows.append({"sigma": sigma, "t": t, "sigma_eff": s_t / 2, "psnr_noisy": psnr(y, x0).mean().item(),
                     "psnr_prior": p_prior.mean().item(), "psnr_prior_min": p_prior.min().item(),
                     "psnr_gauss": filt[best], "gauss_sigma_px": best,
                     "prior_wins": int((p_prior > psnr(gaussian_blur(y, best), x0)).sum()), "n": len(x0),
                     "seconds": sec})
    return rows


@torch.no_grad()
def ddim_sample(prior, n: int, steps: int, seed: int = 0) -> torch.Tensor:
    """Unconditional DDIM, eta = 0, on every (T // steps)-th timestep, x0 clipped to [-1, 1] at each step."""
    from reddiff.core.diffusion import timesteps

    sched = prior.schedule
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *prior.shape), generator=g)
    ts = timesteps(steps, "descending", T=sched.T)
    x0 = x
    for k, t in enumerate(ts):
        a = float(sched.alpha_bar_at(t))
        a_prev = float(sched.alpha_bar_at(ts[k + 1] if k + 1 < len(ts) else -1))
        eps = prior.eps(x, t)
        x0 = ((x - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x0


def save_grid(x: torch.Tensor, path: Path, ncol: int, scale: int = 2, pad: int = 2) -> None:
    from PIL import Image

    n, c, h, w = x.shape
    nrow = int(math.ceil(n / ncol))
    img = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, q = divmod(i, ncol)
        img[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = arr[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST).save(path)


# ---------------------------------------------------------------------------------------------- reporting
def training_record(prior, log_path: Path) -> dict:
    from reddiff.core.checkpoint import read_json_metadata

    rec = {"train_info": None, "log_last": None, "log_first": None}
    if prior.path.suffix == ".safetensors":
        rec["train_info"] = read_json_metadata(prior.path, "train_info")
    if log_path.is_file():
        lines = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln.strip()]
        if lines:
            rec["log_first"], rec["log_last"] = lines[0], lines[-1]
    return rec


def card_section(r: dict) -> str:
    L = [BEGIN, "",
         f"_Generated by `{r['command']}` ({r['threads']} CPU thread(s); evaluation wall time {r['wall_s']:.0f} s)._", ""]
    ti, last = r["training"]["train_info"], r["training"]["log_last"]
    L += ["**Checkpoint evaluated**", "",
          f"- file: `{r['weights_file']}` (sha256 `{r['sha256']}`), {r['params']:,} parameters",
          f"- `train_info` metadata: {json.dumps(ti) if ti else 'none'}"]
    if last:
        L.append(f"- training log `{r['log']}`, last line: step {last.get('step')}, mean loss of the last 100 steps "
                 f"{last.get('loss100'):.4f}, training wall time {last.get('wall_s', 0) / 60:.1f} min, crop {last.get('crop')} px")
    else:
        L.append(f"- training log `{r['log']}`: not present on this machine")
    L += ["", f"**Denoising** ({r['images']}; one x0-prediction per image; noise seed {r['seed']}):", "",
          "| sigma (0-1 px) | t | effective sigma | noisy PSNR | prior x0 PSNR (min) | best Gaussian filter PSNR (width px) | images where prior wins |",
          "|---|---|---|---|---|---|---|"]
    for d in r["denoise"]:
        L.append(f"| {d['sigma']:.2f} | {d['t']} | {d['sigma_eff']:.4f} | {d['psnr_noisy']:.2f} | "
                 f"{d['psnr_prior']:.2f} ({d['psnr_prior_min']:.2f}) | {d['psnr_gauss']:.2f} ({d['gauss_sigma_px']}) | "
                 f"{d['prior_wins']}/{d['n']} |")
    s = r["samples"]
    L += ["", f"**Samples**: {s['n']} unconditional DDIM samples (eta 0, {s['steps']} steps, seed {r['seed']}, "
              f"{s['seconds']:.0f} s): `{s['path']}`", "", f"![prior samples]({s['rel_from_card']})", "", END]
    return "\n".join(L)


def write_card(card: Path, section: str) -> None:
    text = card.read_text() if card.is_file() else "# Model card\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n## Evaluation\n\n" + section + "\n"
    card.write_text(text)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="embedded64", help="registry name or path (default: embedded64)")
    p.add_argument("--arch", default=None, help="architecture name when it cannot be inferred")
    p.add_argument("--no-verify", action="store_true", help="load despite a sha256 mismatch (logged)")
    p.add_argument("--out", default="results/prior_samples.png", help="sample grid PNG")
    p.add_argument("--card", default="docs/MODEL_CARD.md", help="model card to update ('' to skip)")
    p.add_argument("--json", default=None, help="also write the numbers as JSON here")
    p.add_argument("--log", default="runs/prior/log.jsonl", help="training log for the card")
    p.add_argument("--sigmas", default="0.1,0.2,0.4", help="noise levels in [0,1] pixel units")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from reddiff.priors.unet import UNetPrior
    from reddiff.core.weights import sha256sum

    t_start = time.time()
    prior = UNetPrior(a.weights, arch=a.arch, verify=not a.no_verify, device="cpu")
    x, ids, src = load_images(prior.resolution)
    sigmas = [float(s) for s in a.sigmas.split(",")]
    den = denoise_eval(prior, x, sigmas, seed=a.seed)
    for d in den:
        print(f"sigma {d['sigma']:.2f} (t={d['t']}, eff {d['sigma_eff']:.4f}): noisy {d['psnr_noisy']:.2f} dB, "
              f"prior {d['psnr_prior']:.2f} dB, best Gaussian filter {d['psnr_gauss']:.2f} dB "
              f"(width {d['gauss_sigma_px']} px); prior better on {d['prior_wins']}/{d['n']}")
    t0 = time.time()
    samples = ddim_sample(prior, a.samples, a.ddim_steps, seed=a.seed)
    t_samp = time.time() - t0
    out = Path(a.out)
    save_grid(samples, out, ncol=int(math.ceil(math.sqrt(a.samples))))
    print(f"wrote {out} ({a.samples} DDIM samples, {a.ddim_steps} steps, {t_samp:.0f} s)")
    card = Path(a.card) if a.card else None
    rel = os.path.relpath(out.resolve(), card.resolve().parent) if card else str(out)
    cmd = "python -m reddiff.priors.training.evaluate" + ("" if a.weights == "embedded64" else f" --weights {a.weights}")
    res = {"command": cmd, "threads": a.threads, "weights_file": str(prior.path.relative_to(ROOT) if prior.path.is_relative_to(ROOT) else prior.path),
           "sha256": sha256sum(prior.path), "params": prior.nparams, "images": src, "image_ids": ids, "seed": a.seed,
           "denoise": den, "samples": {"n": a.samples, "steps": a.ddim_steps, "seconds": t_samp, "path": str(out),
                                       "rel_from_card": rel},
           "training": training_record(prior, Path(a.log)), "log": a.log}
    res["wall_s"] = time.time() - t_start
    if card:
        write_card(card, card_section(res))
        print(f"updated {card}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
