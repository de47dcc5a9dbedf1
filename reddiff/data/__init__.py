"""Data sets (docs/API.md, "Data"): ``demo``, ``folder``, ``imagenet1k``, ``ffhq1k``.

Each has ``name``, ``resolution``, cheap ``entries()`` (sliced by start/count, then shard/num_shards; the
global ``index`` is kept for seeding) and ``load(entry) -> (3,R,R) float32 in [-1,1]``, which raises
:class:`CorruptImageError` for a file that cannot be decoded.  A missing root raises :class:`DataRootError`
naming the config key to set.
"""
from .base import CorruptImageError, DataRootError, Entry, ImageDataset
from .demo import DemoDataset
from .ffhq import FFHQ1k
from .folder import FolderDataset
from .imagenet import ImageNet1k

__all__ = ["CorruptImageError", "DataRootError", "Entry", "ImageDataset", "DemoDataset", "FolderDataset",
           "ImageNet1k", "FFHQ1k"]
