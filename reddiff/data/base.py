"""Data-set protocol shared by every data set (docs/API.md, "Data").

A data set has ``name``, ``resolution``, ``entries()`` and ``load(entry)``:

* ``entries()`` is cheap (no image is decoded) and already sliced: first ``start``/``count`` over the full,
  fixed order of the set, then ``shard``/``num_shards``, which splits the selected entries into
  ``num_shards`` contiguous, near-equal runs (shard ``k`` gets ``sel[k*n//S:(k+1)*n//S]``).  Every entry keeps
  its ``index`` in the *full* set, used for seeding (seed + index), so slicing, sharding and batch size
  never change an image's result.
* ``load(entry)`` returns a float32 tensor ``(3, R, R)`` in [-1, 1].  An unreadable or corrupt file raises
  :class:`CorruptImageError` with the reason; the runner skips and counts it.
* A missing root raises :class:`DataRootError`, whose message names the config key to set.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from reddiff.core.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class CorruptImageError(Exception):
    """An image file that cannot be read or decoded.  ``str(err)`` is the reason (file and decoder message)."""


class DataRootError(UserError, FileNotFoundError):
    """A data root (or list file) that is not set or does not exist; the message names the config key."""


@dataclass(frozen=True)
class Entry:
    image_id: str            # unique in the set, file-name safe (no '/')
    index: int               # position in the full set, used for seeding
    label: Optional[int] = None  # ImageNet class index when the set has labels


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """Centre square crop resized to ``image_size`` (guided-diffusion / RED-diff ``center_crop_arr``).

    Halve with a box filter while the short side is at least twice the target, resize the short side to
    the target with bicubic, then crop the centre.  This is the official RED-diff ImageNet transform
    ("diffusion"); the same rule is used for every data set here.
    """
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def read_rgb(path: Path, notes: Optional[list] = None):
    """Open and fully decode an image as RGB PIL image; CorruptImageError(reason) when that fails.

    ``notes`` (a list) receives what the conversion changed: ``alpha_dropped``, ``grayscale_to_rgb``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if notes is not None:
                if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
                    notes.append("alpha_dropped")
                if im.mode in ("L", "LA", "I", "I;16", "F", "1"):
                    notes.append("grayscale_to_rgb")
            return im.convert("RGB")
    except FileNotFoundError:
        raise CorruptImageError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def to_model_tensor(arr: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> (3,H,W) float32 in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).to(torch.float32)
    return t / 127.5 - 1.0


def load_image(path: Path, resolution: int, notes: Optional[list] = None) -> torch.Tensor:
    """``notes`` (a list) receives the conversions made: see :func:`read_rgb`, plus ``upscaled`` (the short
    side was below ``resolution``) and ``downscaled``."""
    im = read_rgb(path, notes)
    if notes is not None and min(im.size) != int(resolution):
        notes.append("upscaled" if min(im.size) < int(resolution) else "downscaled")
    return to_model_tensor(center_crop_arr(im, int(resolution)))


def safe_id(rel: str) -> str:
    """A file-name-safe image id from a relative path (the runner writes ``images/<id>.png``).  Control
    characters (a line break in a file name) are written ``%XX``, so an id is always one line of metrics.csv."""
    rel = "".join(f"%{ord(c):02X}" if ord(c) < 32 or ord(c) == 127 else c for c in rel)
    return rel.replace("\\", "/").replace("/", "__")


class ImageDataset:
    """Base class: slicing, sharding and loading; subclasses give ``_all()`` (entry, path) in fixed order."""

    name = "base"
    default_resolution = 256  # when built with resolution=None outside the runner (which uses the prior's)

    def __init__(self, resolution: Optional[int] = 256, start: int = 0, count: Optional[int] = None,
                 shard: int = 0, num_shards: int = 1):
        if resolution is None:  # the runner passes the prior's resolution instead; used directly: the set's own
            resolution = self.default_resolution
        self.resolution = int(resolution)
        self.start = int(start or 0)
        self.count = None if count is None else int(count)
        self.shard = int(shard or 0)
        self.num_shards = int(num_shards or 1)
        if self.resolution <= 0:
            raise ValueError(f"data.resolution must be positive, got {resolution}")
        if self.start < 0 or (self.count is not None and self.count < 0):
            raise ValueError(f"data.start and data.count must be >= 0 (got start={start}, count={count})")
        if self.num_shards < 1 or not 0 <= self.shard < self.num_shards:
            raise ValueError(f"need 0 <= data.shard < data.num_shards (got shard={shard}, num_shards={num_shards})")
        self._paths: Optional[dict[str, object]] = None
        #: image_id -> conversions its loading made (alpha dropped, up/down-scaled, ...); filled by load()
        self.conversions: dict[str, list[str]] = {}

    # subclasses -------------------------------------------------------------------------------------------
    def _all(self) -> list[tuple[Entry, object]]:
        raise NotImplementedError

    # protocol --------------------------------------------------------------------------------------------
    def _full(self) -> list[tuple[Entry, object]]:
        full = self._all()
        if self._paths is None:
            self._paths = {e.image_id: src for e, src in full}
        return full

    def entries(self) -> list[Entry]:
        sel = [e for e, _ in self._full()]
        sel = sel[self.start:] if self.count is None else sel[self.start:self.start + self.count]
        n, s, k = len(sel), self.num_shards, self.shard
        return sel[k * n // s:(k + 1) * n // s]

    def __len__(self) -> int:
        return len(self.entries())

    def source(self, entry: Entry):
        if self._paths is None:
            self._full()
        try:
            return self._paths[entry.image_id]
        except KeyError:
            raise KeyError(f"{entry.image_id!r} is not an image of data set {self.name}") from None

    def load(self, entry: Entry) -> torch.Tensor:
        notes: list[str] = []
        x = load_image(Path(self.source(entry)), self.resolution, notes)
        if notes:
            self.conversions[entry.image_id] = notes
        return x

    @property
    def key(self) -> str:
        """Identifies the images this object yields (name + resolution); used in cache keys and logs."""
        return f"{self.name}-{self.resolution}"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(resolution={self.resolution}, start={self.start}, count={self.count}, "
                f"shard={self.shard}/{self.num_shards})")


def require_root(root, key: str, what: str) -> Path:
    """The root folder as a Path, or DataRootError naming ``key`` (e.g. ``data.root``)."""
    if root is None or str(root).strip() in ("", "None", "null", "???"):
        raise DataRootError(f"no {what} given: set {key}=/path/to/{what.split()[0].lower()}")
    p = Path(str(root)).expanduser()
    if not p.is_dir():
        raise DataRootError(f"{what} {p} does not exist or is not a folder: set {key}=/path/to/"
                            f"{what.split()[0].lower()}")
    return p
