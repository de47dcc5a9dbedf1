"""Make the 12 demo images (``reddiff/assets/demo/*.png``) from the held-out scikit-image photos.

The photos are the held-out set of :mod:`reddiff.data.photos` (astronaut, chelsea, coffee), never used to train
the embedded prior.  For each photo, in this order:

* ``<photo>_full``: the full centre square, resized to 64x64;
* ``<photo>_crop1``: a square of 70% of the short side, centred at (x, y) = (35%, 35%) of the image;
* ``<photo>_crop2``: 50% of the short side, centred at (65%, 60%);
* ``<photo>_crop3``: 35% of the short side, centred at (50%, 45%).

Crops are clamped to the image; each square is resized to 64x64 with the guided-diffusion / RED-diff rule
(:func:`reddiff.data.base.center_crop_arr`: box-filter halving, then bicubic).  Everything is fixed, so the
output is deterministic; the PNGs are committed and ``python -m reddiff.data.make_demo --check`` verifies
that they are what this script makes.

    python -m reddiff.data.make_demo            # (re)write reddiff/assets/demo/
    python -m reddiff.data.make_demo --check    # compare, exit 1 on a difference
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from reddiff.data.photos import HELD_OUT, load_photo
from reddiff.data.base import center_crop_arr

SIZE = 64
DEMO_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo"
# (suffix, fraction of the short side, centre x, centre y); None = the full centre square
CROPS = (("full", None, 0.5, 0.5), ("crop1", 0.70, 0.35, 0.35), ("crop2", 0.50, 0.65, 0.60),
         ("crop3", 0.35, 0.50, 0.45))
DEMO_IDS = tuple(f"{photo}_{suffix}" for photo in HELD_OUT for suffix, *_ in CROPS)


def square(img: np.ndarray, frac, cx: float, cy: float) -> np.ndarray:
    h, w = img.shape[:2]
    side = min(h, w) if frac is None else int(round(frac * min(h, w)))
    x0 = int(round(cx * w - side / 2))
    y0 = int(round(cy * h - side / 2))
    x0 = min(max(x0, 0), w - side)
    y0 = min(max(y0, 0), h - side)
    return img[y0:y0 + side, x0:x0 + side]


def make_all() -> dict[str, np.ndarray]:
    from PIL import Image

    out = {}
    for photo in HELD_OUT:
        img = load_photo(photo)
        for suffix, frac, cx, cy in CROPS:
            sq = square(img, frac, cx, cy)
            out[f"{photo}_{suffix}"] = center_crop_arr(Image.fromarray(sq), SIZE)
    assert tuple(out) == DEMO_IDS
    return out


def main(argv=None) -> int:
    from PIL import Image

    p = argparse.ArgumentParser(prog="python -m reddiff.data.make_demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEMO_DIR)
    p.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    a = p.parse_args(argv)
    images = make_all()
    if a.check:
        bad = []
        for name, arr in images.items():
            f = a.out / f"{name}.png"
            if not f.is_file() or not np.array_equal(np.asarray(Image.open(f).convert("RGB")), arr):
                bad.append(name)
        print("demo images match" if not bad else f"differ or missing: {', '.join(bad)}")
        return 1 if bad else 0
    a.out.mkdir(parents=True, exist_ok=True)
    for name, arr in images.items():
        Image.fromarray(arr).save(a.out / f"{name}.png", optimize=True)
    print(f"wrote {len(images)} images to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
