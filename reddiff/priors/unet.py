"""UNet priors: the published ADM checkpoints and the embedded prior, behind the :class:`Prior` protocol.

    prior = UNetPrior("embedded64")                          # trained by this project (64x64)
    prior = UNetPrior("adm_imagenet256_uncond")              # guided-diffusion ImageNet 256 (552.8M)
    prior = UNetPrior("dps_ffhq256")                         # DPS FFHQ 256 (93.6M)
    prior = UNetPrior("/some/file.pt", arch="adm_imagenet256", verify=False)

* ``weights``: a registry name (:mod:`reddiff.core.weights`) or a path.  Registered files are hash-checked when a
  sha256 is pinned; a mismatch raises :class:`~reddiff.core.weights.HashMismatchError` unless ``verify=False``,
  which loads it anyway and logs a warning.  A missing file raises
  :class:`~reddiff.core.weights.MissingWeightsError` naming the path and the ``reddiff weights fetch NAME`` command.
* ``arch``: a named configuration (:data:`ARCHS`), a :class:`UNetConfig` or a dict of its fields.  ``None``
  infers it from the registry name, or from the ``unet_config`` metadata of a safetensors file.
  ``embedded64`` is the configuration stored in the file's metadata (written from
  ``EMBEDDED_CONFIG`` below), falling back to ``EMBEDDED_CONFIG`` when a file has none.
* Loading is strict: the file's keys and shapes must be exactly those of the architecture; otherwise the
  error lists the missing, unexpected and mis-shaped keys.  Files are read with
  :func:`reddiff.core.checkpoint.load_state_dict` (safetensors, or ``torch.load(weights_only=True)``).
* With ``learn_sigma`` the network outputs ``2C`` channels; ``eps`` is the first ``C``.
* The weights are frozen (``requires_grad=False``) and the module is in eval mode: samplers that need
  gradients (DPS, Pi-GDM) differentiate with respect to ``x_t`` only.
* Class-conditional model (``adm_imagenet256_cond``): set ``class_labels`` (an int or a ``(B,)`` tensor)
  before calling ``eps``.  Classifier guidance (``256x256_classifier.pt``) is not implemented.
* ``device``: a torch device or ``"auto"`` (CUDA when available); ``dtype``: float32 (default), float16 or bfloat16.
* Opt-in performance switches, all off by default: ``channels_last``, ``autocast`` (``True`` picks fp16 on
  CUDA and bf16 on CPU, or name a dtype) and ``compile`` (``torch.compile`` of the network's forward).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional, Union

import torch

from reddiff.core import weights as W
from reddiff.core.checkpoint import load_state_dict, read_json_metadata
from reddiff.core.diffusion import Schedule
from reddiff.priors.adm import ADM_IMAGENET_256_COND, ADM_IMAGENET_256_UNCOND, DPS_FFHQ_256, UNet, UNetConfig
from reddiff.priors.base import Prior

log = logging.getLogger(__name__)

EMBEDDED = "embedded64"


#: the embedded 64x64 prior's architecture (3.7M parameters; trained by reddiff/priors/training/train.py)
EMBEDDED_CONFIG = UNetConfig(
    image_size=64, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
    attention_resolutions=(8,), channel_mult=(1, 2, 2, 4), num_heads=4, num_head_channels=32,
    use_scale_shift_norm=True, resblock_updown=True, learn_sigma=False,
)


def _embedded_config() -> UNetConfig:
    return EMBEDDED_CONFIG


#: named architectures; ``embedded64`` is resolved from the file's metadata (see module docstring)
ARCHS = {
    EMBEDDED: None,
    "adm_imagenet256": ADM_IMAGENET_256_UNCOND,
    "adm_imagenet256_cond": ADM_IMAGENET_256_COND,
    "dps_ffhq256": DPS_FFHQ_256,
}
#: the architecture of each registered prior file
ARCH_OF_WEIGHTS = {
    "embedded64": EMBEDDED,
    "adm_imagenet256_uncond": "adm_imagenet256",
    "adm_imagenet256_cond": "adm_imagenet256_cond",
    "dps_ffhq256": "dps_ffhq256",
}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


class StateDictMismatchError(RuntimeError):
    """A weight file whose keys or shapes are not exactly those of the requested architecture."""


def _dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    if str(d) in _DTYPES:
        return _DTYPES[str(d)]
    raise ValueError(f"unknown dtype {d!r}; use one of {', '.join(sorted(_DTYPES))}")


def config_from_dict(d: dict) -> UNetConfig:
    fields = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"unknown UNetConfig fields {unknown}; valid: {sorted(fields)}")
    d = dict(d)
    for k in ("attention_resolutions", "channel_mult"):
        if k in d and d[k] is not None:
            d[k] = tuple(d[k])
    return UNetConfig(**d)


def resolve_arch(arch, weights_name: Optional[str], path: Optional[Path]) -> tuple[str, UNetConfig]:
    """(arch label, config) from ``arch`` / the registry name / the file's metadata."""
    if isinstance(arch, UNetConfig):
        return "custom", arch
    if isinstance(arch, dict) or (arch is not None and hasattr(arch, "keys")):
        return "custom", config_from_dict(dict(arch))
    meta = read_json_metadata(path, "unet_config") if path is not None else None
    if arch is None:
        if weights_name in ARCH_OF_WEIGHTS:
            arch = ARCH_OF_WEIGHTS[weights_name]
        elif meta is not None:
            return "metadata", config_from_dict(meta)
        else:
            raise ValueError(f"cannot tell the architecture of {path}: pass arch= one of {', '.join(ARCHS)} "
                             "(or a UNetConfig / dict of its fields)")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)} (or pass a UNetConfig / dict)")
    if arch == EMBEDDED:
        return arch, config_from_dict(meta) if meta is not None else _embedded_config()
    return arch, ARCHS[arch]


def check_state_dict(model: torch.nn.Module, sd: dict, source) -> None:
    """Raise :class:`StateDictMismatchError` unless ``sd`` has exactly the model's keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if not (missing or unexpected or shapes):
        return

    def show(keys, fmt=str):
        head = ", ".join(fmt(k) for k in keys[:12])
        return head + (f", ... ({len(keys)} in all)" if len(keys) > 12 else f" ({len(keys)})")

    parts = [f"{source}: the weights do not match the architecture ({len(got)} entries in the file, "
             f"{len(expected)} expected)"]
    if missing:
        parts.append("missing keys: " + show(missing))
    if unexpected:
        parts.append("unexpected keys: " + show(unexpected))
    if shapes:
        parts.append("shape mismatches: " + show(shapes, lambda k: f"{k} file {list(got[k])} vs model {list(expected[k])}"))
    prefixes = {k.split(".", 1)[0] for k in got}
    wrapped = {k.split(".", 1)[0] for k in expected}
    if len(prefixes) == 1 and (p := prefixes.pop()) in ("module", "model", "net", "_orig_mod") and wrapped != {p}:
        parts.append(f"every key in the file starts with '{p}.': it was saved from a wrapper; strip that prefix")
    if len(wrapped) == 1 and (w := next(iter(wrapped))) not in {k.split(".", 1)[0] for k in got} and \
            any(f"{w}.{k}" in expected for k in got):
        parts.append(f"this format keeps the network under '{w}.' (the official wrapper's attribute); the file holds "
                     "the bare network's keys: it is another format")
    if "label_emb.weight" in unexpected:
        parts.append("the file is class-conditional: use arch='adm_imagenet256_cond'")
    if "label_emb.weight" in missing:
        parts.append("the file is unconditional: use an unconditional arch")
    raise StateDictMismatchError("\n  ".join(parts))


def load_strict(module: torch.nn.Module, path: Path, key=None) -> torch.nn.Module:
    """Read ``path`` safely (:func:`load_state_dict`) and load it into ``module`` (built on the meta device) after
    :func:`check_state_dict`: the file's keys and shapes must be exactly the module's."""
    sd = load_state_dict(path, key=key)
    check_state_dict(module, sd, path)
    module.load_state_dict(sd, strict=True, assign=True)
    return module


def frozen(net: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """``net`` on ``device`` ("auto": CUDA when available) in ``dtype``, eval mode, no parameter gradients."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return net.to(device=device, dtype=_dtype(dtype)).eval().requires_grad_(False)


class UNetPrior(Prior):
    """An ADM UNet epsilon-predictor loaded strictly from a published or embedded weight file."""

    def __init__(self, weights: Union[str, Path] = "embedded64", arch=None, verify: bool = True,
                 device: Union[str, torch.device] = "cpu", dtype="float32", channels_last: bool = False,
                 autocast: Union[bool, str] = False, compile: bool = False, class_labels=None,
                 key: Optional[str] = None, schedule: Optional[Schedule] = None, dialect: str = "vp_discrete"):
        super().__init__(schedule, dialect)
        weights = str(weights)
        self.weights_name = weights if weights in W.REGISTRY else None
        if not verify:
            log.warning("UNetPrior(%s): verify=false, a sha256 mismatch will be logged and the file loaded anyway", weights)
        path = W.resolve(weights, verify=verify)  # MissingWeightsError / HashMismatchError
        self.path = Path(path)
        self.arch, cfg = resolve_arch(arch, self.weights_name, self.path)
        self.cfg = cfg
        with torch.device("meta"):
            net = UNet(cfg)
        sd = load_state_dict(self.path, key=key)
        check_state_dict(net, sd, self.path)
        net.load_state_dict(sd, strict=True, assign=True)
        del sd
        self.dtype = _dtype(dtype)
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        net = net.to(device=device, dtype=self.dtype).eval().requires_grad_(False)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.autocast = autocast
        self._forward = torch.compile(net) if compile else net
        self.out_channels = cfg.in_channels
        self.learn_sigma = cfg.out_channels == 2 * cfg.in_channels
        if not self.learn_sigma and cfg.out_channels != cfg.in_channels:
            raise ValueError(f"out_channels={cfg.out_channels} is neither C={cfg.in_channels} nor 2C")
        self.resolution = int(cfg.image_size)
        self.shape = (int(cfg.in_channels), self.resolution, self.resolution)
        self.name = self.weights_name or self.path.stem
        self.class_labels = class_labels
        self.nparams = sum(p.numel() for p in net.parameters())
        self.eval()

    def train(self, mode: bool = True):
        """A prior is inference-only: it stays in eval mode (``prior.train()`` is a no-op)."""
        return super().train(False)

    # ------------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> Optional[int]:
        return self.cfg.num_classes

    def _labels(self, batch: int, device) -> Optional[torch.Tensor]:
        if self.cfg.num_classes is None:
            if self.class_labels is not None:
                raise ValueError(f"{self.name} is unconditional: class_labels must stay None")
            return None
        if self.class_labels is None:
            raise ValueError(f"{self.name} is class-conditional ({self.cfg.num_classes} classes): "
                             "set prior.class_labels to an int or a (B,) tensor of labels")
        y = torch.as_tensor(self.class_labels, dtype=torch.long, device=device)
        if y.ndim == 0:
            y = y.expand(batch)
        if y.shape != (batch,):
            raise ValueError(f"class_labels has shape {tuple(y.shape)}, expected ({batch},)")
        if int(y.min()) < 0 or int(y.max()) >= self.cfg.num_classes:
            raise ValueError(f"class_labels must lie in [0, {self.cfg.num_classes - 1}]")
        return y

    def _autocast_ctx(self, device: torch.device):
        if not self.autocast:
            return torch.autocast(device.type, enabled=False)
        if self.autocast is True:
            dt = torch.float16 if device.type == "cuda" else torch.bfloat16
        else:
            dt = _dtype(self.autocast)
        return torch.autocast(device.type, dtype=dt)

    def _eps_time(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network at time input ``t``: the integer steps it was trained on, or a real t between them (its
        sinusoidal time embedding is continuous) in the other dialects."""
        if tuple(x_t.shape[1:]) != self.shape:
            raise ValueError(f"{self.name} expects samples of shape (B, {', '.join(map(str, self.shape))}), "
                             f"got {tuple(x_t.shape)}")
        dev = self.net.time_embed[0].weight.device
        x = x_t.to(device=dev, dtype=self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = self._labels(x.shape[0], dev)
        with self._autocast_ctx(dev):
            out = self._forward(x, t.to(dev), y)
        if self.learn_sigma:
            out = out[:, : self.out_channels]
        return out.to(device=x_t.device, dtype=x_t.dtype).contiguous()

    def extra_repr(self) -> str:
        return (f"weights={self.name!r}, arch={self.arch!r}, resolution={self.resolution}, "
                f"learn_sigma={self.learn_sigma}, params={self.nparams}")
