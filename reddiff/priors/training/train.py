"""Train the embedded prior: a small ADM UNet on multi-scale crops of the shipped photos.

    python -m reddiff.priors.training.train --out runs/prior --steps 6000          # resumable: rerun to continue
    python -m reddiff.priors.training.train --out runs/prior --export reddiff/assets/embedded64.safetensors

The held-out photos (:mod:`reddiff.data.photos`) are never seen.  Crops are drawn from an image pyramid
(several scales), with horizontal/vertical flips and 90-degree rotations.  The loss is the plain
epsilon-prediction MSE on the DDPM schedule of :mod:`reddiff.core.diffusion`, t uniform in {0..T-1}.
The exported weights are the EMA of the training weights, in safetensors with the UNet config in
the metadata.  Training state (model, EMA, optimiser, step) is saved with ``torch.save`` of plain
tensors and reloaded with ``weights_only=True``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from reddiff.core.diffusion import Schedule
from reddiff.data.photos import training_photos
from reddiff.priors.adm import UNet, UNetConfig  # noqa: F401
from reddiff.priors.unet import EMBEDDED_CONFIG  # noqa: F401 - the architecture lives with the prior



def build_pyramid(photos: dict, scales=(1.0, 0.7, 0.5, 0.35, 0.25, 0.18), min_side=64) -> list[torch.Tensor]:
    """Each photo at several scales, as float tensors in [-1, 1] of shape (3, H, W)."""
    out = []
    for img in photos.values():
        x = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 127.5 - 1
        for s in scales:
            h, w = int(x.shape[2] * s), int(x.shape[3] * s)
            if min(h, w) < min_side:
                continue
            out.append(F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0] if s != 1 else x[0])
    return out


def sample_crops(pyramid, n, size, g: torch.Generator) -> torch.Tensor:
    crops = []
    for _ in range(n):
        img = pyramid[int(torch.randint(len(pyramid), (1,), generator=g))]
        i = int(torch.randint(img.shape[1] - size + 1, (1,), generator=g))
        j = int(torch.randint(img.shape[2] - size + 1, (1,), generator=g))
        c = img[:, i:i + size, j:j + size]
        r = torch.randint(8, (1,), generator=g).item()
        if r & 1:
            c = c.flip(2)
        if r & 2:
            c = c.flip(1)
        if r & 4:
            c = c.transpose(1, 2)
        crops.append(c)
    return torch.stack(crops).contiguous()


def export(model: torch.nn.Module, cfg: UNetConfig, path: str, info: dict) -> None:
    from safetensors.torch import save_file

    meta = {"unet_config": json.dumps(asdict(cfg)), "train_info": json.dumps(info)}
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, path, metadata=meta)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/prior", help="training dir (state.pt, log.jsonl)")
    p.add_argument("--steps", type=int, default=6000, help="total optimisation steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--crop", type=int, default=32, help="crop size for the first phase")
    p.add_argument("--final-crop", type=int, default=64, help="crop size for the last --final-frac of the steps")
    p.add_argument("--final-frac", type=float, default=0.2)
    p.add_argument("--final-batch", type=int, default=12)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--export", default=None, help="write EMA weights to this .safetensors after training")
    p.add_argument("--time-limit", type=float, default=0, help="stop (and save) after this many minutes")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    cfg = EMBEDDED_CONFIG
    torch.manual_seed(a.seed)
    model = UNet(cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    step, wall, state_path = 0, 0.0, os.path.join(a.out, "state.pt")
    g = torch.Generator().manual_seed(a.seed)
    if os.path.exists(state_path):
        st = torch.load(state_path, weights_only=True)
        model.load_state_dict(st["model"]), ema.load_state_dict(st["ema"]), opt.load_state_dict(st["opt"])
        step, wall = int(st["step"]), float(st["wall"])
        g.set_state(st["rng"])
        print(f"resumed from {state_path} at step {step}")
    pyramid = build_pyramid(training_photos())
    sched = Schedule()
    abar = sched.alpha_bar.float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"embedded prior: {n_params/1e6:.2f}M params, {len(pyramid)} pyramid images")

    def save():
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "step": torch.tensor(step), "wall": torch.tensor(wall), "rng": g.get_state()}, state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)

    log = open(os.path.join(a.out, "log.jsonl"), "a")
    final_start = int(a.steps * (1 - a.final_frac))
    t_start, losses = time.time(), []
    bar = tqdm(total=a.steps, initial=step, desc="train prior")
    while step < a.steps:
        t0 = time.time()
        size, bs = (a.crop, a.batch) if step < final_start else (a.final_crop, a.final_batch)
        x0 = sample_crops(pyramid, bs, size, g)
        t = torch.randint(sched.T, (bs,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        ab = abar[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        lr = a.lr * min(1.0, (step + 1) / 200)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.mse_loss(model(xt, t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(a.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(d).add_(pm, alpha=1 - d)
        step += 1
        wall += time.time() - t0
        losses.append(loss.item())
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if step % a.save_every == 0 or step == a.steps:
            log.write(json.dumps({"step": step, "loss100": float(np.mean(losses[-100:])), "wall_s": wall, "crop": size}) + "\n")
            log.flush()
            save()
            if a.export:
                export(ema, cfg, a.export, {"steps": step, "wall_s": round(wall), "loss100": float(np.mean(losses[-100:]))})
        if a.time_limit and time.time() - t_start > a.time_limit * 60:
            print(f"time limit reached at step {step}")
            break
    save()
    if a.export:
        export(ema, cfg, a.export, {"steps": step, "wall_s": round(wall), "loss100": float(np.mean(losses[-100:])) if losses else None})
        print(f"exported EMA weights to {a.export}")


if __name__ == "__main__":
    main()
