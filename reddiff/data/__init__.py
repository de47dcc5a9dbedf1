"""Data sets (docs/API.md, "Data"): ``demo``, ``folder``, ``imagenet1k``, ``ffhq1k``.

Each has ``name``, ``resolution``, cheap ``entries()`` (sliced by start/count, then shard/num_shards; the
global ``index`` is kept for seeding) and ``load(entry) -> (3,R,R) float32 in [-1,1]``, which raises
:class:`CorruptImageError` for a file that cannot be decoded.  A missing root raises :class:`DataRootError`
naming the config key to set.  ``photos`` is the training / held-out split of the shipped photos.

May import: reddiff.core
"""
from reddiff.data.base import CorruptImageError, DataRootError, Entry, ImageDataset
from reddiff.data.demo import DemoDataset
from reddiff.data.ffhq import FFHQ1k
from reddiff.data.folder import FolderDataset
from reddiff.data.imagenet import ImageNet1k

__all__ = ["CorruptImageError", "DataRootError", "Entry", "ImageDataset", "DemoDataset", "FolderDataset",
           "ImageNet1k", "FFHQ1k"]
