"""Per-image random streams, so a batch gives the same numbers as a loop over its images; and named streams
(:func:`stream_seed`, :func:`stream_generator`) for benchmarks and priors built from random draws."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def stream_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints (numpy SeedSequence: independent streams)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & ((1 << 63) - 1)


def stream_generator(*parts: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`stream_seed` of ``parts``."""
    return torch.Generator().manual_seed(stream_seed(*parts))


class BatchRNG:
    """Random numbers for a batch.

    With ``seeds`` (one per item), item ``i`` draws from its own generator, so its noise does not depend on
    which other items share the batch: results are identical for one batch of 4 and four batches of 1.
    With a single ``seed`` and ``per_item=False`` the batch shares one generator (fast path for
    large synthetic batches such as the Gaussian-mixture benchmark).
    """

    def __init__(self, seeds: Sequence[int] | int, device: str | torch.device = "cpu", per_item: bool = True):
        self.device = torch.device(device)
        gen_device = self.device if self.device.type == "cuda" else "cpu"
        if isinstance(seeds, int):
            seeds = [seeds]
            per_item = False
        self.per_item = per_item
        self.gens = [torch.Generator(device=gen_device).manual_seed(int(s)) for s in seeds]

    @classmethod
    def for_images(cls, seed: int, indices: Sequence[int], device="cpu") -> "BatchRNG":
        return cls([int(seed) + int(i) for i in indices], device=device)

    def select(self, indices: Sequence[int]) -> "BatchRNG":
        """The streams of the items ``indices`` (shared generator objects: drawing from one advances both)."""
        sub = BatchRNG.__new__(BatchRNG)
        sub.device, sub.per_item = self.device, self.per_item
        sub.gens = [self.gens[int(i)] for i in indices] if self.per_item else self.gens
        return sub

    def randn(self, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        """Standard normal of ``shape`` (batch first)."""
        shape = tuple(shape)
        if not self.per_item:
            return torch.randn(shape, generator=self.gens[0], dtype=dtype, device=self.gens[0].device).to(self.device)
        if shape[0] != len(self.gens):
            raise ValueError(f"batch of {shape[0]} but {len(self.gens)} per-item generators")
        out = torch.empty(shape, dtype=dtype, device=self.gens[0].device)
        for i, g in enumerate(self.gens):
            torch.randn(shape[1:], generator=g, dtype=dtype, device=g.device, out=out[i])
        return out.to(self.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype)

    def rand(self, shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
        shape = tuple(shape)
        if not self.per_item:
            return torch.rand(shape, generator=self.gens[0], dtype=dtype, device=self.gens[0].device).to(self.device)
        return torch.stack([torch.rand(shape[1:], generator=g, dtype=dtype, device=g.device) for g in self.gens]).to(self.device)
