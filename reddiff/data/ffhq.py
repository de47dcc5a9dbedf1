"""``ffhq1k``: FFHQ images 00000-00999 from a user folder (the images the DPS FFHQ model did not train on).

Layouts (detected from the first image): ``<root>/00000.png`` (flat, e.g. the 256x256 or 1024x1024
release unpacked in one folder) or ``<root>/00000/00000.png`` (the official thousand-image sub-folders);
``.png``, ``.jpg`` or ``.jpeg``.  Images are centre-cropped and resized to ``resolution`` (256) with the
guided-diffusion rule.  Image ids are ``00000`` ... ``00999``; no labels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from reddiff.data.base import DataRootError, Entry, ImageDataset, require_root

N_IMAGES = 1000
_EXTS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG")


class FFHQ1k(ImageDataset):
    name = "ffhq1k"

    def __init__(self, root: Optional[str] = None, resolution: int = 256, start: int = 0,
                 count: Optional[int] = None, shard: int = 0, num_shards: int = 1):
        super().__init__(resolution, start, count, shard, num_shards)
        self.root = require_root(root, "data.root", "FFHQ folder")
        self._layout: Optional[tuple[bool, str]] = None

    def _path(self, i: int, nested: bool, ext: str) -> Path:
        name = f"{i:05d}{ext}"
        return self.root / f"{(i // 1000) * 1000:05d}" / name if nested else self.root / name

    def _detect(self) -> tuple[bool, str]:
        if self._layout is None:
            for i in range(5):
                for nested in (False, True):
                    for ext in _EXTS:
                        if self._path(i, nested, ext).is_file():
                            self._layout = (nested, ext)
                            return self._layout
            raise DataRootError(f"FFHQ images 00000..00004 not found under {self.root} (looked for "
                                f"{self._path(0, False, '.png')} and {self._path(0, True, '.png')}): "
                                f"set data.root=/path/to/ffhq")
        return self._layout

    def _all(self):
        nested, ext = self._detect()
        return [(Entry(f"{i:05d}", i, None), self._path(i, nested, ext)) for i in range(N_IMAGES)]
