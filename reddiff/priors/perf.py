"""Opt-in fast paths for a prior: ``channels_last``, ``torch.compile`` and autocast (bf16 / fp16).

All are **off by default**, and :func:`recommended_fast_paths` keeps them off on the CPU (on 2 CPU cores none of
them pays: ``torch.compile`` of the embedded UNet took about 6 minutes to compile on the development machine, and
bf16 matmuls have no fast path on most server CPUs).  They are meant for GPU users::

    from reddiff.priors.perf import apply_fast_paths, recommended_fast_paths
    prior = apply_fast_paths(prior, **recommended_fast_paths(prior.device))   # CUDA: all three on
    prior = apply_fast_paths(prior, channels_last=True, autocast="bf16")       # or pick them

:func:`apply_fast_paths` returns a prior with the same protocol (``eps``, ``x0``, ``alpha_bar``, ``shape``,
``nfe``) that samplers use unchanged:

* for a :class:`reddiff.priors.unet.UNetPrior` it switches that prior's own opt-in settings in place (the same as
  passing ``channels_last=``, ``autocast=``, ``compile=`` to its constructor) and returns it;
* for any other :class:`~reddiff.priors.base.Prior` it returns a :class:`FastPathPrior` wrapper, which converts the
  wrapped prior's 4-D parameters and the input to ``channels_last``, runs the wrapped ``_eps`` under autocast and/or
  ``torch.compile`` and returns ``eps`` in the caller's dtype and the standard (contiguous) memory format.

Gradients with respect to ``x_t`` (DPS, Pi-GDM) flow through every fast path.

Tolerances (:data:`TOLERANCES`): how far ``eps`` may move from the float32 eager result.  ``scale`` is
``max(1, max|eps_fp32|)``: float32 reduction-order differences grow with the magnitude of the activations, and the
embedded prior's ``eps`` reaches 4-5 on random inputs.

* ``channels_last`` (float32): ``max|d eps| <= 1e-5 * scale``.  Same arithmetic in another memory layout; only the
  order of the convolution sums changes (measured on the embedded prior: about ``3e-6 * scale``).
* ``compile`` (float32): ``max|d eps| <= 1e-4 * scale`` (fused kernels reorder sums; measured ``~1e-6 * scale``).
* ``bf16`` autocast: relative RMS error ``||d eps|| / ||eps|| <= 1e-2`` (bf16 keeps 8 mantissa bits; measured on the
  embedded prior on CPU: ``3.4e-3 .. 3.6e-3`` over t in 10..999).  GroupNorm runs in float32 in the ADM UNet.
* ``fp16`` autocast: relative RMS error ``<= 5e-3`` (10 mantissa bits).  Meant for CUDA; on CPU only some ops run
  in fp16.

:func:`deviation` measures these numbers for any pair of priors, so a GPU user can check them on their own card.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Union

import torch

from reddiff.priors.base import Prior

#: documented tolerances of each fast path against float32 eager (see the module docstring)
TOLERANCES = {
    "channels_last": {"max_abs_over_scale": 1e-5},
    "compile": {"max_abs_over_scale": 1e-4},
    "bf16": {"rel_rms": 1e-2},
    "fp16": {"rel_rms": 5e-3},
}

_AUTOCAST = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16}


def autocast_dtype(autocast, device: Union[str, torch.device] = "cpu") -> Optional[torch.dtype]:
    """``None``/``False``/``"fp32"`` -> None (off); ``True`` -> fp16 on CUDA, bf16 elsewhere; a name or dtype -> it."""
    if autocast is None or autocast is False or autocast in ("fp32", "float32", "none", "off", ""):
        return None
    if autocast is True:
        return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16
    if isinstance(autocast, torch.dtype):
        if autocast not in (torch.bfloat16, torch.float16):
            raise ValueError(f"autocast dtype must be bfloat16 or float16, got {autocast}")
        return autocast
    if str(autocast) in _AUTOCAST:
        return _AUTOCAST[str(autocast)]
    raise ValueError(f"unknown autocast {autocast!r}; use one of None, True, {', '.join(_AUTOCAST)}")


def recommended_fast_paths(device: Union[str, torch.device]) -> dict:
    """The switches worth turning on for ``device``: all three on CUDA (bf16 where the card supports it, else
    fp16), none on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"channels_last": False, "compile": False, "autocast": None}
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return {"channels_last": True, "compile": True, "autocast": "bf16" if bf16 else "fp16"}


def _is_unet_prior(prior) -> bool:
    try:
        from reddiff.priors.unet import UNetPrior
    except ImportError:  # pragma: no cover - the UNet prior is part of the package
        return False
    return isinstance(prior, UNetPrior)


class FastPathPrior(Prior):
    """A :class:`Prior` that evaluates another prior's network with fast paths on.

    The wrapped prior is modified in place for ``channels_last`` (its 4-D parameters and buffers are converted);
    it keeps working on its own, in either layout.  NFE are counted by this wrapper (one per ``eps`` call).
    """

    def __init__(self, prior: Prior, channels_last: bool = False, compile: bool = False, autocast=None,
                 compile_kwargs: Optional[dict] = None):
        super().__init__(prior.schedule)
        self.inner = prior
        self.shape = tuple(prior.shape)
        self.name = getattr(prior, "name", "prior")
        self.channels_last = bool(channels_last)
        self.autocast = autocast
        if self.channels_last:
            prior.to(memory_format=torch.channels_last)
        fn = prior._eps
        self._fn = torch.compile(fn, **(compile_kwargs or {})) if compile else fn
        self.compiled = bool(compile)

    def _autocast_ctx(self, device: torch.device):
        dt = autocast_dtype(self.autocast, device)
        if dt is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dt)

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x_t
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast_ctx(x.device):
            out = self._fn(x, t)
        return out.to(dtype=x_t.dtype).contiguous()

    def _eps_time(self, x_t: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """The wrapped epsilon network at a real time input (``denoise`` off the grid, other dialects), fast paths
        on (not compiled); a wrapped prior without this hook raises, as the wrapper did before."""
        x = x_t
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast_ctx(x.device):
            out = self.inner._eps_time(x, tau)
        return out.to(dtype=x_t.dtype).contiguous()

    def __getattr__(self, name):
        # attributes of the wrapped prior (resolution, cfg, class_labels, ...) stay reachable
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = super().__getattr__("inner")
            return getattr(inner, name)


def apply_fast_paths(prior: Prior, channels_last: bool = False, compile: bool = False, autocast=None,
                     compile_kwargs: Optional[dict] = None) -> Prior:
    """Turn on the requested fast paths for ``prior`` (see the module docstring); all off returns it unchanged.

    ``autocast``: None (off), True (fp16 on CUDA, bf16 otherwise), ``"bf16"`` or ``"fp16"`` (or a torch dtype).
    ``compile_kwargs`` go to ``torch.compile`` (e.g. ``{"mode": "max-autotune"}`` or ``{"backend": "aot_eager"}``).
    """
    autocast_dtype(autocast)  # validate early
    if not (channels_last or compile or autocast_dtype(autocast) is not None):
        return prior
    if _is_unet_prior(prior):
        # the UNet prior owns these switches (see reddiff/priors/unet.py); set them as its constructor would
        if channels_last and not prior.channels_last:
            prior.net.to(memory_format=torch.channels_last)
            prior.channels_last = True
        if autocast_dtype(autocast) is not None:
            prior.autocast = autocast
        if compile:
            prior._forward = torch.compile(prior.net, **(compile_kwargs or {}))
        return prior
    return FastPathPrior(prior, channels_last=channels_last, compile=compile, autocast=autocast,
                         compile_kwargs=compile_kwargs)


@torch.no_grad()
def deviation(reference: Prior, fast: Prior, batch: int = 4, timesteps: Sequence[int] = (10, 250, 500, 750, 999),
              seed: int = 0, x0: Optional[torch.Tensor] = None) -> dict:
    """How far ``fast.eps`` is from ``reference.eps`` on noised inputs ``x_t = sqrt(a) x0 + sqrt(1-a) e``.

    ``x0``: clean samples (default: uniform in [-1, 1], seeded).  Returns the worst case over ``timesteps`` of
    ``max_abs``, ``scale = max(1, max|eps_ref|)``, ``max_abs_over_scale`` and ``rel_rms = ||d|| / ||eps_ref||``,
    comparable with :data:`TOLERANCES`.
    """
    g = torch.Generator().manual_seed(int(seed))
    dev = reference.device
    if x0 is None:
        x0 = torch.rand((batch,) + tuple(reference.shape), generator=g) * 2 - 1
    x0 = x0.to(dev)
    worst = {"max_abs": 0.0, "scale": 1.0, "max_abs_over_scale": 0.0, "rel_rms": 0.0}
    for t in timesteps:
        a = reference.alpha_bar(int(t)).item()
        e = torch.randn(x0.shape, generator=g).to(dev)
        x_t = (a ** 0.5) * x0 + ((1 - a) ** 0.5) * e
        ref = reference.eps(x_t, int(t)).double()
        out = fast.eps(x_t, int(t)).double()
        d = out - ref
        scale = max(1.0, ref.abs().max().item())
        worst["max_abs"] = max(worst["max_abs"], d.abs().max().item())
        worst["scale"] = max(worst["scale"], scale)
        worst["max_abs_over_scale"] = max(worst["max_abs_over_scale"], d.abs().max().item() / scale)
        worst["rel_rms"] = max(worst["rel_rms"], (d.norm() / ref.norm().clamp_min(1e-30)).item())
    return worst


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_HEAP_KEPT = False


def keep_freed_heap(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Let glibc keep freed blocks of up to 32 MiB in the heap instead of returning each one to the OS.

    CPU loops over large batches (the GMM benchmark: ``(2000, 800)`` float32 tensors, 6.4 MB, a few per step)
    otherwise pay a fresh ``mmap`` and a page fault per 4 KiB page for every new tensor (system time measured in
    results/gmm_posterior.md).  Arithmetic is untouched.  Idempotent; returns False where the C library has no
    ``mallopt`` (not glibc)."""
    global _HEAP_KEPT
    if _HEAP_KEPT:
        return True
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = all(mallopt(p, int(v)) == 1 for p, v in ((_M_MMAP_THRESHOLD, mmap_threshold),
                                                  (_M_TRIM_THRESHOLD, trim_threshold), (_M_TOP_PAD, 64 << 20)))
    _HEAP_KEPT = ok
    return ok
