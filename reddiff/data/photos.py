"""The colour photos that scikit-image and scikit-learn ship, split into training and held-out (demo) sets.

Held out (never trained on): astronaut, chelsea (``cat`` is the same photo) and coffee.  They form the
``demo`` data set.  Everything else that is a colour photograph is used to train the embedded prior.
Synthetic images (colorwheel, logo) are excluded.  :func:`photo_pool` is the training photos as tensors (the
crops of the image mixture prior, ``reddiff.run.photo_priors``).
"""
from __future__ import annotations

import numpy as np
import torch

HELD_OUT = ("astronaut", "chelsea", "coffee")
TRAIN_SKIMAGE = ("rocket", "hubble_deep_field", "immunohistochemistry", "retina")
TRAIN_SKLEARN = ("china.jpg", "flower.jpg")


def load_photo(name: str) -> np.ndarray:
    """uint8 HxWx3 photo by name (scikit-image name, or a scikit-learn sample image file name)."""
    if name.endswith(".jpg"):
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(name))
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    return img[..., :3]


def training_photos() -> dict[str, np.ndarray]:
    return {n: load_photo(n) for n in TRAIN_SKIMAGE + TRAIN_SKLEARN}


def held_out_photos() -> dict[str, np.ndarray]:
    return {n: load_photo(n) for n in HELD_OUT}


def photo_pool(downsample: int = 4) -> list[torch.Tensor]:
    """The training photos in model units ``(3, H, W)`` float64, area-downsampled by ``downsample`` (so that a
    small crop holds a scene, not a texture)."""
    out = []
    for img in training_photos().values():
        t = torch.from_numpy(np.array(img)).permute(2, 0, 1).to(torch.float64) / 127.5 - 1.0
        out.append(torch.nn.functional.avg_pool2d(t[None], downsample)[0])
    return out
