"""``tune``: the tuning split, six 64x64 tiles of a photo that is neither an evaluation image nor a training image.

The evaluation set (``demo``) is three scikit-image photos (astronaut, chelsea, coffee) and the embedded prior
was trained on the others (:mod:`reddiff.data.photos`).  The one further colour photograph that scikit-image ships
offline is the left view of ``stereo_motorcycle`` (741x500, a motorcycle in a garage): it shares no pixel with
the demo images and the prior never saw it.  It is cut into a 3x2 grid of disjoint 247x247 tiles (top-left
corner at x in {0, 247, 494}, y in {0, 250}), each resized to the prior's resolution with the same rule as every
other data set (:func:`reddiff.data.base.center_crop_arr`).  The order puts the two most textured tiles first
(engine; headlight and shelves), so ``data.count=2`` (what ``make tune`` uses) tunes on them.

Being one photo, the split is a single cluster: it tells hyperparameters apart, not how well they generalise.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from reddiff.data.base import Entry, ImageDataset, center_crop_arr, to_model_tensor

PHOTO = "motorcycle"
TILE = 247
# (tile id, x0, y0): disjoint squares of the 741x500 left view, most textured first
TILES = (("engine", 247, 250), ("headlight", 494, 0), ("bench", 0, 0), ("shelves", 247, 0),
         ("wheel_rear", 0, 250), ("wheel_front", 494, 250))
TUNE_IDS = tuple(f"{PHOTO}_{name}" for name, _, _ in TILES)


def load_motorcycle() -> np.ndarray:
    import skimage.data

    left, _right, _disp = skimage.data.stereo_motorcycle()
    return np.asarray(left)[..., :3]


def tile(img: np.ndarray, x0: int, y0: int) -> np.ndarray:
    return img[y0:y0 + TILE, x0:x0 + TILE]


class TuneDataset(ImageDataset):
    name = "tune"

    def __init__(self, resolution: int = 64, start: int = 0, count: Optional[int] = None,
                 shard: int = 0, num_shards: int = 1):
        super().__init__(resolution, start, count, shard, num_shards)
        self._photo: Optional[np.ndarray] = None

    def _all(self):
        return [(Entry(image_id, i, None), spec) for i, (image_id, spec) in enumerate(zip(TUNE_IDS, TILES))]

    def load(self, entry: Entry):
        from PIL import Image

        if self._photo is None:
            self._photo = load_motorcycle()
        _, x0, y0 = self.source(entry)
        return to_model_tensor(center_crop_arr(Image.fromarray(tile(self._photo, x0, y0)), self.resolution))
