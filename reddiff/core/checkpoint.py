"""Safe loading of weight files: tensors only, never code.

* ``.safetensors`` files are read with :mod:`safetensors` (no pickle involved at all);
* anything else (``.pt``, ``.pth``, ``.ckpt``, ``.bin``, ...) goes through
  ``torch.load(weights_only=True, map_location="cpu")``, whose restricted unpickler refuses every global
  that is not a tensor/storage/plain container.  A file that would need such a global (an object whose
  ``__reduce__`` calls ``os.system``, a pickled ``nn.Module``, a custom class) is refused with
  :class:`UnsafeCheckpointError`; nothing in it is executed.

The result is always a flat ``{name: Tensor}`` dict.  Checkpoints that nest the weights under a
``state_dict`` or ``model`` key (training scripts often do) are unwrapped only when that is
unambiguous; otherwise the error lists the candidates and the caller picks one with ``key=``.
"""
from __future__ import annotations

import json
import pickle
import pickletools
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch

SAFETENSORS_SUFFIXES = (".safetensors",)
NESTING_KEYS = ("state_dict", "model")


class CheckpointError(RuntimeError):
    """A weight file that cannot be used (unreadable, not a state dict, ambiguous nesting)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would execute code or build arbitrary objects. It was not executed."""


def _is_safetensors(path: Path) -> bool:
    if path.suffix in SAFETENSORS_SUFFIXES:
        return True
    # sniff: 8-byte little-endian header length, then a JSON object
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 32)


def read_metadata(path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file ({} for other formats or none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    if not _is_safetensors(path):
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return dict(f.metadata() or {})


def read_json_metadata(path, key: str) -> Optional[dict]:
    """``json.loads`` of one metadata entry of a safetensors file, or None when absent."""
    raw = read_metadata(path).get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON ({e})") from None


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj, path: Path, key) -> dict[str, torch.Tensor]:
    if isinstance(key, (tuple, list)):  # a flat state dict, or nested under the first present of the alternatives
        if _is_tensor_dict(obj):
            return dict(obj)
        present = [k for k in key if isinstance(obj, Mapping) and k in obj]
        if not present:
            have = sorted(map(str, obj.keys())) if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{path}: none of the entries {list(key)} in the checkpoint (top-level entries: {have})")
        key = present[0]
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            have = sorted(map(str, obj.keys())) if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{path}: no entry {key!r} in the checkpoint (top-level entries: {have})")
        obj = obj[key]
        if not _is_tensor_dict(obj):
            raise CheckpointError(f"{path}: entry {key!r} is not a mapping of names to tensors")
        return dict(obj)
    if _is_tensor_dict(obj):
        return dict(obj)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (name -> tensor) but a {type(obj).__name__}; "
                              "only plain tensors are accepted")
    nested = [k for k in NESTING_KEYS if k in obj and _is_tensor_dict(obj[k])]
    others = [str(k) for k, v in obj.items() if k not in nested and _is_tensor_dict(v)]
    if len(nested) == 1 and not others:
        return dict(obj[nested[0]])
    candidates = nested + others
    if candidates:
        raise CheckpointError(
            f"{path}: ambiguous checkpoint, several entries hold weights ({', '.join(candidates)}); "
            "choose one with key=... (e.g. key='ema' for EMA weights)")
    raise CheckpointError(f"{path} does not hold a state dict: its top-level entries are "
                          f"{sorted(map(str, obj.keys()))[:20]} and none maps names to tensors")


def _looks_like_torch_file(path: Path) -> bool:
    """A zip archive (torch >= 1.6), a protocol >= 2 pickle, or a stream that parses as pickle opcodes.

    Parsing with :func:`pickletools.genops` only reads opcodes; it never imports or calls anything.
    """
    with open(path, "rb") as f:
        head = f.read(4)
        if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
            return True
        f.seek(0)
        try:
            for _ in pickletools.genops(f):
                pass
        except Exception:
            return False
        return True


def _unpickler_reason(e: Exception) -> str:
    """The specific reason in torch's long weights_only message (e.g. 'Unsupported global: GLOBAL posix.system')."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
    unsafe = ("weights_only", "will likely succeed", "trust the source", "safe_globals", "add_safe_globals")
    useful = [ln.split("WeightsUnpickler error:", 1)[-1].strip() for ln in lines
              if not ln.startswith(skip) and not any(u in ln for u in unsafe)]
    useful = [ln for ln in useful if ln]
    return (useful[0] if useful else "a non-tensor object")[:300]


def load_state_dict(path, key=None) -> dict[str, torch.Tensor]:
    """Load a flat ``{name: Tensor}`` state dict from ``path`` on the CPU, without ever executing code.

    ``key`` selects a nested entry explicitly (``'ema'``, ``'model'``, ...), or is a tuple of alternatives: a flat
    state dict is taken as it is, else the first entry present (``('ema', 'net')``, as InverseBench's ``main.py``
    reads its checkpoints; a safetensors file is always flat).  Raises ``FileNotFoundError``,
    :class:`UnsafeCheckpointError` (a pickle carrying code or objects) or :class:`CheckpointError`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError for truncated/corrupt files
            raise CheckpointError(f"cannot read {path} as safetensors: {e}") from None
        return _unwrap(obj, path, key)
    if not _looks_like_torch_file(path):
        raise CheckpointError(f"cannot read {path} as a checkpoint: it is neither safetensors, a torch zip archive "
                              "nor a pickle")
    try:
        with warnings.catch_warnings():  # the restricted unpickler warns about pickle protocols; the error says enough
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to unpickle {path}: it contains code/objects; only plain tensors are accepted "
            f"(restricted unpickler: {_unpickler_reason(e)}) and nothing in it was executed. To use it, convert "
            "it once to safetensors where you "
            "trust the file: load it with the code that wrote it, then safetensors.torch.save_file(state_dict, "
            "'weights.safetensors'), and point the harness at that file") from None
    except Exception as e:  # truncated zip, random bytes, ...: unreadable, and nothing was executed
        raise CheckpointError(f"cannot read {path} as a checkpoint ({type(e).__name__}: {e})") from None
    return _unwrap(obj, path, key)
