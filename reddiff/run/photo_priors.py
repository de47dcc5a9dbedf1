"""Exact priors built from the shipped training photos, for the job runner: ``prior=image_gmm`` and
``prior=latent_gmm`` (docs/EXACT_IMAGES.md, "Through run.py").

Both are the designed-multimodal image mixture of :func:`reddiff.priors.image_gmm.build_means` (``K = 3 *
families * variants`` isotropic components of std ``std`` around crops of the **training** photos, never the
demo or tuning ones), the same means ``benchmarks/exact_images.py`` scores samplers against.  ``image_gmm`` is
the mixture on pixels; ``latent_gmm`` the same mixture as a latent prior behind the 2x nearest-neighbour decoder
(:class:`reddiff.priors.latent.ImageMixtureLatent`).  They live in the runner's layer because they read data
(``reddiff/data``) and build priors (``reddiff/priors``), which neither of those layers may do alone.
"""
from __future__ import annotations

from typing import Optional

import torch

from reddiff.core.rng import stream_generator
from reddiff.data.demo import DemoDataset
from reddiff.data.photos import photo_pool
from reddiff.priors.image_gmm import ImageMixturePrior, build_means
from reddiff.priors.latent import ImageMixtureLatent

#: the random stream of the crops: ``stream_generator(seed, MEANS_STREAM)`` (benchmarks/exact_images.py's)
MEANS_STREAM = 7


def mixture_means(size: int, families: int = 24, variants: int = 8,
                  seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """``(K, 3, size, size)`` float64 means from the training photos (area-downsampled x4) and each one's family
    type; the same numbers for the same arguments on every machine."""
    return build_means(photo_pool(), int(size), int(families), int(variants), stream_generator(int(seed), MEANS_STREAM))


def _size(size: Optional[int]) -> int:
    """The image side: ``size`` when set, else the demo set's stored resolution (the runner's default data)."""
    return int(DemoDataset.default_resolution if size is None else size)


def image_gmm(size: Optional[int] = None, families: int = 24, variants: int = 8, std: float = 0.1, seed: int = 0,
              dialect: str = "vp_discrete") -> ImageMixturePrior:
    """The pixel mixture prior of ``prior=image_gmm``; ``family_types`` names each component's family."""
    means, types = mixture_means(_size(size), families, variants, seed)
    prior = ImageMixturePrior(means, std, dialect=dialect)
    prior.family_types = types
    return prior


def latent_gmm(size: Optional[int] = None, factor: int = 2, families: int = 24, variants: int = 8,
               std: float = 0.1, seed: int = 0, dialect: str = "vp_discrete") -> ImageMixtureLatent:
    """The same mixture as a latent prior behind the ``factor`` x nearest-neighbour decoder (``prior=latent_gmm``):
    latents ``(3, size/factor, size/factor)``, pixels ``(3, size, size)``."""
    means, types = mixture_means(_size(size), families, variants, seed)
    prior = ImageMixtureLatent(means, std, factor=factor, dialect=dialect)
    prior.family_types = types
    return prior
