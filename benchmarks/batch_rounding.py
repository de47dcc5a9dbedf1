"""How far results move with the batch size (float32 rounding of batch-size-dependent convolution kernels).

    python -m benchmarks.batch_rounding [--steps 100] [--batches 1,6] [--md FILE]

Runs ``task=sr4 sampler=reddiff`` on the 12 demo images once per batch size (same seeds) and reports the largest
PSNR/SSIM difference against the first batch size and how many restored PNGs differ (and by how many 8-bit levels).
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from hydra import compose, initialize_config_dir
    from PIL import Image

    from reddiff.run.experiment import run
    from reddiff.store.results import read_rows

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batches", default="1,6")
    p.add_argument("--md", default=None)
    a = p.parse_args(argv)
    sizes = [int(b) for b in a.batches.split(",")]
    out = {}
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for b in sizes:
            cfg = compose("config", overrides=["logger=none", "progress=false", "metrics=fast", f"batch_size={b}",
                                               f"sampler.steps={a.steps}"])
            d = Path(tmp) / f"b{b}"
            run(cfg, d)
            rows = {r["image_id"]: r for r in read_rows(d / "metrics.csv")}
            pngs = {q.name: np.asarray(Image.open(q)).astype(int) for q in (d / "images").glob("*.png")}
            out[b] = (rows, pngs)
    ref_rows, ref_png = out[sizes[0]]
    lines = [f"Command: `python -m benchmarks.batch_rounding {shlex.join(argv or [])}` ({datetime.date.today()})", "",
             "| batch size | max abs ΔPSNR (dB) | max abs ΔSSIM | PNGs differing | max Δ (8-bit levels) |",
             "|---|---|---|---|---|"]
    for b in sizes[1:]:
        rows, png = out[b]
        dp = max(abs(float(rows[i]["psnr"]) - float(ref_rows[i]["psnr"])) for i in ref_rows)
        ds = max(abs(float(rows[i]["ssim"]) - float(ref_rows[i]["ssim"])) for i in ref_rows)
        diff = [int(np.abs(png[n] - ref_png[n]).max()) for n in ref_png]
        lines.append(f"| {b} vs {sizes[0]} | {dp:.2g} | {ds:.2g} | {sum(d > 0 for d in diff)} of {len(diff)} | "
                     f"{max(diff)} |")
    md = "\n".join(lines)
    print(md)
    if a.md:
        Path(a.md).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
