"""``demo``: 12 small photos shipped with the package (reddiff/assets/demo, made by make_demo.py).

Three held-out scikit-image photos (astronaut, chelsea, coffee; never used to train the embedded prior),
each as its full centre square plus three fixed crops, stored as 64x64 PNGs.  At ``resolution`` 64 they
load as stored; another resolution resizes them with the same centre-crop rule as every other set.
No class labels (top-1 reports "missing").
"""
from __future__ import annotations

from typing import Optional

from reddiff.data.base import DataRootError, Entry, ImageDataset
from reddiff.data.make_demo import DEMO_DIR, DEMO_IDS


class DemoDataset(ImageDataset):
    name = "demo"
    default_resolution = 64

    def __init__(self, resolution: Optional[int] = 64, start: int = 0, count: Optional[int] = None,
                 shard: int = 0, num_shards: int = 1):
        super().__init__(resolution, start, count, shard, num_shards)
        missing = [i for i in DEMO_IDS if not (DEMO_DIR / f"{i}.png").is_file()]
        if missing:
            raise DataRootError(f"demo images missing from {DEMO_DIR}: {', '.join(missing)}; "
                                f"regenerate them with: python -m reddiff.data.make_demo")

    def _all(self):
        return [(Entry(image_id, i, None), DEMO_DIR / f"{image_id}.png") for i, image_id in enumerate(DEMO_IDS)]
