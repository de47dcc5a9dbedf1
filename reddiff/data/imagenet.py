"""``imagenet1k``: the 1k ImageNet validation images of DGP / DDRM / RED-diff (one per class, with labels).

The list (registry entry ``imagenet_val_1k``; ``reddiff data fetch imagenet_val_1k``) is the DGP file
``scripts/imagenet_val_1k.txt``, lines ``ILSVRC2012_val_00000293.JPEG 0``.  RED-diff ships the same 1000
images in the same order with the class folder prepended (``misc/dgp_top1k.txt``,
``n01440764/ILSVRC2012_val_00000293.JPEG 0``); DDRM-style lines without an extension are accepted too.
Any of these can be given as ``data.list_file``.

The images come from a user-given ImageNet root (``data.root``); the layout is detected from the first
entries: ``<root>[/val]/<wnid>/<file>`` (torchvision / class folders; the wnid is taken from the list, or as
the label-th sorted class folder) or ``<root>[/val]/<file>`` (flat validation folder).  Each image is
centre-cropped and resized to ``resolution`` (256 in the paper) with the official RED-diff
``center_crop_arr``.  Image ids are the file stems (``ILSVRC2012_val_00000293``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from reddiff.data.base import DataRootError, Entry, ImageDataset, require_root

_SUBDIRS = ("", "val", "ILSVRC2012_img_val", os.path.join("imagenet", "val"))
_EXTS = (".JPEG", ".jpeg", ".jpg", ".png")


def read_list(path: Path) -> list[tuple[str, int]]:
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise ValueError(f"{path}:{n}: expected '<file> <class index>', got {line!r}")
        out.append((parts[0].replace("\\", "/"), int(parts[1])))
    return out


class ImageNet1k(ImageDataset):
    name = "imagenet1k"

    def __init__(self, root: Optional[str] = None, resolution: int = 256, list_file: Optional[str] = None,
                 start: int = 0, count: Optional[int] = None, shard: int = 0, num_shards: int = 1):
        super().__init__(resolution, start, count, shard, num_shards)
        self.root = require_root(root, "data.root", "ImageNet root (the folder holding val/)")
        if list_file:
            self.list_file = Path(str(list_file)).expanduser()
            if not self.list_file.is_file():
                raise DataRootError(f"list file {self.list_file} not found: set data.list_file=/path/to/list.txt "
                                    f"(or null for the registry's imagenet_val_1k)")
        else:
            from reddiff.core.weights import MissingWeightsError, resolve

            try:
                self.list_file = resolve("imagenet_val_1k")
            except MissingWeightsError as e:
                raise DataRootError(f"{e} (or set data.list_file=/path/to/imagenet_val_1k.txt)") from None
        self.items = read_list(self.list_file)
        self._layout: Optional[tuple[Path, str]] = None
        self._class_dirs: dict[Path, list[str]] = {}

    # layout ------------------------------------------------------------------------------------------------
    def _classes(self, base: Path) -> list[str]:
        if base not in self._class_dirs:
            try:
                self._class_dirs[base] = sorted(d.name for d in os.scandir(base) if d.is_dir())
            except OSError:
                self._class_dirs[base] = []
        return self._class_dirs[base]

    def _names(self, rel: str) -> list[str]:
        return [rel] if os.path.splitext(rel)[1] else [rel + e for e in _EXTS]

    def _path(self, base: Path, mode: str, rel: str, label: int) -> list[Path]:
        out = []
        for name in self._names(rel):
            fname = os.path.basename(name)
            wnid = os.path.dirname(name)
            if mode == "class":
                if not wnid:
                    classes = self._classes(base)
                    if len(classes) != 1000 or not 0 <= label < 1000:
                        continue
                    wnid = classes[label]
                out.append(base / wnid / fname)
            else:
                out.append(base / fname)
        return out

    def _detect(self) -> tuple[Path, str]:
        if self._layout is not None:
            return self._layout
        tried: list[Path] = []
        for rel, label in self.items[:5]:
            for sub in _SUBDIRS:
                base = self.root / sub if sub else self.root
                if not base.is_dir():
                    continue
                for mode in ("class", "flat"):
                    for p in self._path(base, mode, rel, label):
                        tried.append(p)
                        if p.is_file():
                            self._layout = (base, mode)
                            return self._layout
        shown = ", ".join(str(p) for p in tried[:6])
        raise DataRootError(f"ImageNet validation images of {self.list_file.name} not found under {self.root} "
                            f"(tried {shown}, ...): set data.root=/path/to/imagenet (holding val/<wnid>/*.JPEG "
                            f"or val/*.JPEG)")

    def _all(self):
        base, mode = self._detect()
        out = []
        for i, (rel, label) in enumerate(self.items):
            cands = self._path(base, mode, rel, label)
            path = next((p for p in cands if p.is_file()), cands[0]) if len(cands) > 1 else cands[0]
            stem = os.path.splitext(os.path.basename(rel))[0] if os.path.splitext(rel)[1] else os.path.basename(rel)
            out.append((Entry(stem, i, label), path))
        return out
