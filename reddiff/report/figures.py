"""Figure helpers shared by the sweep plots (:mod:`reddiff.report.plots`): the Agg backend, atomic saving, and the sample
grid (ground truth | measurement | each job's restoration), read back from the job dirs' PNGs."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from reddiff.store.results import safe_name


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _plt()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _ground_truth(jobs: list[dict], ids: list[str]) -> dict[str, np.ndarray]:
    """Ground-truth images, re-loaded through the job's data config (skipped when the data is not here)."""
    from hydra.utils import instantiate

    from reddiff.store.images import to_uint8

    for j in jobs:
        data = (j.get("config") or {}).get("data")
        if not data:
            continue
        try:
            ds = instantiate(data)
            by_id = {e.image_id: e for e in ds.entries()}
            return {i: to_uint8(ds.load(by_id[i])) for i in ids if i in by_id}
        except Exception:  # noqa: BLE001 - the grid is still useful without ground truth
            continue
    return {}


def plot_grid(jobs: list[dict], out: Path, rows: int = 4, max_cols: int = 16,
              label_of=None) -> Optional[Path]:
    """Ground truth, measurement and every job's restoration for the first ``rows`` images; ``label_of(jobs)``
    gives the column titles."""
    from PIL import Image

    from reddiff.store.results import read_rows

    jobs = [j for j in jobs if j["dirs"]]
    if not jobs:
        return None
    jobs = jobs[:max_cols]
    ids: list[str] = []
    for d in jobs[0]["dirs"]:
        if (d / "metrics.csv").exists():
            ids += [r["image_id"] for r in read_rows(d / "metrics.csv")]
    ids = ids[:rows]

    def find(job, name):
        for d in job["dirs"]:
            p = d / "images" / name
            if p.exists():
                return np.asarray(Image.open(p).convert("RGB"))
        return None

    restorations = {(i, k): find(j, f"{safe_name(i)}.png") for i in ids for k, j in enumerate(jobs)}
    if not any(v is not None for v in restorations.values()):
        return None
    gt = _ground_truth(jobs, ids)
    titles = label_of(jobs) if label_of else [str(k) for k in range(len(jobs))]
    heads = (["ground truth"] if gt else []) + ["measurement"] + list(titles)
    plt = _plt()
    fig, axes = plt.subplots(len(ids), len(heads), figsize=(1.6 * len(heads), 1.6 * len(ids) + 0.6), squeeze=False)
    for r, i in enumerate(ids):
        meas = next((m for m in (find(j, f"{safe_name(i)}_y.png") for j in jobs) if m is not None), None)
        cells = ([gt.get(i)] if gt else []) + [meas] + [restorations[(i, k)] for k in range(len(jobs))]
        for c, img in enumerate(cells):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if img is not None:
                ax.imshow(img, interpolation="nearest")
            else:
                ax.text(0.5, 0.5, "-", ha="center", va="center", transform=ax.transAxes)
            if r == 0:
                ax.set_title(heads[c], fontsize=7)
        axes[r, 0].set_ylabel(i, fontsize=7)
    return _save(fig, out / "plot_grid.png")
