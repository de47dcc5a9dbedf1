"""``folder``: every image under a folder (recursive, sorted by relative path), optional labels file.

Image ids are the relative paths without extension, with ``/`` replaced by ``__`` (so ``a/b.png`` is
``a__b``).  The optional ``labels`` file has one ``<name> <class index>`` line per image, where ``<name>``
is the relative path (with or without extension) or the bare file name, as in the DGP/DDRM lists; images
without a line get no label.  Every image is centre-cropped and resized to ``resolution`` with the
guided-diffusion rule (see base.center_crop_arr).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from reddiff.data.base import IMAGE_EXTENSIONS, DataRootError, Entry, ImageDataset, require_root, safe_id


def read_labels(path) -> dict[str, int]:
    """``name label`` lines -> {name: label}; also indexed by the name without extension and the bare name."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise DataRootError(f"labels file {p} not found: set data.labels=/path/to/labels.txt (or null)")
    out: dict[str, int] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) < 2:
            raise ValueError(f"{p}:{n}: expected '<name> <class index>', got {line!r}")
        name, label = parts[0].replace("\\", "/"), int(parts[1])
        for k in (name, os.path.splitext(name)[0], os.path.basename(name), os.path.splitext(os.path.basename(name))[0]):
            out.setdefault(k, label)
    return out


class FolderDataset(ImageDataset):
    name = "folder"

    def __init__(self, root: Optional[str] = None, resolution: int = 256, labels: Optional[str] = None,
                 start: int = 0, count: Optional[int] = None, shard: int = 0, num_shards: int = 1):
        super().__init__(resolution, start, count, shard, num_shards)
        self.root = require_root(root, "data.root", "image folder")
        self.labels = read_labels(labels) if labels else None

    def _all(self):
        files = sorted(
            (p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
            key=lambda p: p.relative_to(self.root).as_posix())
        if not files:
            raise DataRootError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}: set data.root")
        out, seen = [], {}
        for i, f in enumerate(files):
            rel = f.relative_to(self.root).as_posix()
            image_id = safe_id(os.path.splitext(rel)[0])
            if image_id in seen:  # a.png and a.jpg side by side
                image_id = safe_id(rel)
            seen[image_id] = f
            label = None
            if self.labels is not None:
                for k in (rel, os.path.splitext(rel)[0], f.name, f.stem):
                    if k in self.labels:
                        label = self.labels[k]
                        break
            out.append((Entry(image_id, i, label), f))
        return out

    @property
    def key(self) -> str:
        return f"folder:{self.root.resolve()}-{self.resolution}"
