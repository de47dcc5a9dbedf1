"""Helpers shared by the image operators: setup validation, per-image seeding and dtype/device caches."""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import torch

_EPS64 = float(np.finfo(np.float64).eps)


def image_seed(seed: int, index: int, salt: str) -> int:
    """A 63-bit seed for the per-image state of image ``index``.

    Mixes ``(salt, seed, index)`` through numpy's SeedSequence, so masks/kernels of different tasks (salt) and
    the measurement noise (seeded ``seed + index`` by :class:`reddiff.core.rng.BatchRNG`) are independent streams.
    """
    seed, index = int(seed), int(index)
    if index < 0:
        raise ValueError(f"image indices must be >= 0, got {index}")
    ss = np.random.SeedSequence([zlib.crc32(salt.encode()), seed % (1 << 63), index])
    return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


def numpy_rng(seed: int, index: int, salt: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(image_seed(seed, index, salt)))


def torch_rng(seed: int, index: int, salt: str) -> torch.Generator:
    return torch.Generator().manual_seed(image_seed(seed, index, salt))


class ImageOpMixin:
    """Binds the batch geometry in ``setup`` and checks the tensors the operator is given.

    Subclasses set ``per_image = True`` when their state (mask, kernel) depends on the image index; such an
    operator only accepts batches of the size it was set up for.  Master copies of operator tensors are kept in
    float64 on the CPU (``self._master``) and converted on demand with :meth:`_t`.
    """

    per_image: bool = False
    name: str = "operator"
    min_size: int = 1

    def _bind(self, indices: Sequence[int], x_shape: Sequence[int], device, dtype, channels: int | None = None):
        x_shape = tuple(int(s) for s in x_shape)
        if len(x_shape) != 4:
            raise ValueError(f"{self.name}: expects image batches (B, C, H, W), got x_shape {x_shape}")
        B, C, H, W = x_shape
        if H != W:
            raise ValueError(f"{self.name}: expects square images, got {H}x{W}")
        if H < self.min_size:
            raise ValueError(f"{self.name}: image size {H} is below the minimum {self.min_size}")
        if channels is not None and C != channels:
            raise ValueError(f"{self.name}: expects {channels} channels, got {C}")
        if indices is None:
            if self.per_image:
                raise ValueError(f"{self.name}: setup needs the image indices (one per batch item): "
                                 "its masks/kernels are drawn per image index")
            indices = [0] * B
        indices = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
        if len(indices) != B:
            raise ValueError(f"{self.name}: {len(indices)} indices for a batch of {B}")
        if any(i < 0 for i in indices):
            raise ValueError(f"{self.name}: image indices must be >= 0, got {indices}")
        self.x_shape = (C, H, W)
        self.batch = B
        self.indices = indices
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()
        self._master: dict[str, torch.Tensor] = {}
        self._cache: dict = {}
        return B, C, H

    def _require_setup(self):
        if getattr(self, "_master", None) is None:
            raise RuntimeError(f"{self.name}: call setup(indices, x_shape, device, dtype) before using the operator")

    def _check_x(self, x: torch.Tensor) -> None:
        self._require_setup()
        if tuple(x.shape[1:]) != self.x_shape:
            raise ValueError(f"{self.name}: set up for images of shape {self.x_shape}, got {tuple(x.shape[1:])}")
        self._check_batch(x)

    def _check_y(self, y: torch.Tensor, y_shape: tuple) -> None:
        self._require_setup()
        if tuple(y.shape[1:]) != tuple(y_shape):
            raise ValueError(f"{self.name}: measurements have shape {tuple(y_shape)}, got {tuple(y.shape[1:])}")
        self._check_batch(y)

    def _check_batch(self, t: torch.Tensor) -> None:
        if self.per_image and t.shape[0] != self.batch:
            raise ValueError(
                f"{self.name}: per-image state was set up for a batch of {self.batch} (indices {self.indices}), "
                f"got a batch of {t.shape[0]}; call setup() for this batch"
            )

    def _t(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """Master tensor ``key`` on ``like``'s device, in ``like``'s dtype (complex masters keep complex)."""
        m = self._master[key]
        if m.is_complex():
            dt = torch.complex128 if like.dtype in (torch.float64, torch.complex128) else torch.complex64
        elif m.dtype in (torch.bool, torch.long):
            dt = m.dtype
        else:
            dt = like.dtype if like.is_floating_point() else self.dtype
        ck = (key, like.device, dt)
        t = self._cache.get(ck)
        if t is None:
            t = m.to(device=like.device, dtype=dt)
            self._cache[ck] = t
        return t

    def _numel(self) -> int:
        C, H, W = self.x_shape
        return C * H * W
