"""Image outputs of a job: restored PNGs (written atomically, so a killed job never leaves a half PNG) and
``grid.png`` (ground truth | measurement | restoration)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from reddiff.store.results import atomic_write_bytes, safe_name


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(C,H,W) in [-1,1] -> HxWxC uint8."""
    x = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return x.permute(1, 2, 0).numpy()


def save_png(path: Path, img: torch.Tensor) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(img)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_grid(path: Path, triples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(triples)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n + 0.4), squeeze=False)
    for i, row in enumerate(triples):
        for j, (img, name) in enumerate(zip(row, ("ground truth", "measurement", "restoration"))):
            axes[i, j].imshow(img, interpolation="nearest")
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    Path(tmp).replace(path)


def write_job_grid(job_dir: Path, rows: list[dict], dataset, summary: dict, n: int) -> None:
    """``grid.png`` of the first ``n`` rows (in selection order, so a resumed job draws the same grid)."""
    from PIL import Image

    by_id = {e.image_id: e for e in dataset.entries()}
    order = {e.image_id: k for k, e in enumerate(dataset.entries())}
    triples = []
    for r in sorted(rows, key=lambda r: order.get(r["image_id"], len(order))):
        if len(triples) >= n:
            break
        e = by_id.get(r["image_id"])
        p_hat = job_dir / "images" / f"{safe_name(r['image_id'])}.png"
        p_y = job_dir / "images" / f"{safe_name(r['image_id'])}_y.png"
        if e is None or not p_hat.exists():
            continue
        gt = to_uint8(dataset.load(e))
        y = np.asarray(Image.open(p_y).convert("RGB")) if p_y.exists() else np.zeros_like(gt)
        triples.append((gt, y, np.asarray(Image.open(p_hat).convert("RGB"))))
    if triples:
        write_grid(job_dir / "grid.png", triples, f"{summary['sampler']} on {summary['task']} ({summary['prior']})")
