"""``MetricSuite``: per-image PSNR/SSIM/LPIPS, per-image features for the set-level KID/FID/top-1/top-5.

Images arrive as ``(B, 3, H, W)`` in [-1, 1] (restoration ``x_hat``, ground truth ``x_true``).

* **PSNR** (torchmetrics ``peak_signal_noise_ratio``): on [0, 1] (clamped), ``data_range=1``, one value per
  image (``dim=(1,2,3)``); the run reports their mean, as the official script.
* **SSIM** (torchmetrics ``structural_similarity_index_measure``): on [0, 1], ``data_range=1``, Gaussian
  window sigma 1.5 / 11 taps, K1 0.01, K2 0.03.  The mean is taken over the *valid* part of the SSIM map
  (5 px from each border cropped), as in Wang et al., scikit-image and the torchmetrics of 2023 that the
  official script used; torchmetrics >= 1.5 (PR #2721) averages over its reflect-padded border instead,
  which changes 64-px values by ~1e-2.  We take torchmetrics' full map (``return_full_image=True``) and
  crop it.
* **LPIPS** (``lpips`` package, v0.1, AlexNet by default, ``lpips_net: vgg`` for VGG): fed [-1, 1] images,
  as lpips expects.  ``lpips_compat: true`` reproduces the official RED-diff script instead: torchmetrics'
  ``LearnedPerceptualImagePatchSimilarity()`` (AlexNet, ``normalize=False``) fed [0, 1] images, i.e. the
  same network on inputs it reads as [-1, 1]-scaled; the numbers are lower than correct LPIPS.
* **KID / FID** (clean-fid, ``legacy_pytorch`` mode, like the official evaluation): per-image Inception
  pool3 features of the restorations (``inception``) and of the references (``inception_ref``); see
  :mod:`reddiff.metrics.setlevel` for the estimator and its interval.  Set-level inputs are first quantised
  to uint8 (round((x+1)*127.5)), as the official pipeline reads saved PNGs, then resized to 299 exactly as
  clean-fid does (``cleanfid.resize.build_resizer("legacy_pytorch")``).  Reference features are cached on
  disk (``ref_cache_dir``, default ``$REDDIFF_HOME/ref_features``) keyed by the sha256 of the quantised
  reference image, which fixes data set, subset, crop and resolution; a data set is therefore computed once
  for every task and sampler.
* **top-1 / top-5** (torchvision ResNet-50 IMAGENET1K_V1 with its own preprocessing: resize 256, centre
  crop 224, ImageNet mean/std) on the quantised restorations; ``logits`` are stored per image and compared
  with the data set's labels in ``set_level``.

Official evaluation profile (``compat=official``).  ``png_roundtrip: true`` quantises restoration and reference
to 8 bits exactly as ``torchvision.utils.save_image`` does (``floor(255 u + 0.5)`` on ``u = (x+1)/2`` clamped;
RED-diff ``utils/save.py:24``, code) before every per-image metric, as the official scripts compute metrics on the
reloaded PNGs.  ``top1_preprocess: official`` feeds the 256x256 PNG to the ResNet-50 with only ImageNet
mean/std normalisation, no resize/crop (RED-diff ``run_eval.sh:84`` ``transform=ca_cropped``,
``datasets/imagenet.py:151-154``, code).  KID is reported raw (as written to the official results file,
``eval/fid.py:43``); the official log line shows it x10^3 (``eval/fid.py:41``).

Weights come only from the registry's files (:mod:`reddiff.core.weights`); a metric whose file is missing or
fails its hash is in ``suite.missing`` with the exact reason and the fetch command, and is warned about once
when the suite is built.  Nothing is downloaded, nothing is replaced by random weights.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch

from reddiff.metrics import backbones, setlevel

log = logging.getLogger(__name__)

PER_IMAGE = ("psnr", "ssim", "lpips")
SET_LEVEL = ("kid", "fid", "top1", "top5")
METRICS = PER_IMAGE + SET_LEVEL
DEFAULT_NAMES = ("psnr", "ssim", "lpips", "kid", "top1")
LPIPS_WEIGHTS = {"alex": "alexnet", "vgg": "vgg16"}
SSIM_SIGMA, SSIM_TAPS = 1.5, 11


def _weights_for(name: str, lpips_net: str) -> Optional[str]:
    if name == "lpips":
        return LPIPS_WEIGHTS[lpips_net]
    if name in ("kid", "fid"):
        return "inception_fid"
    if name in ("top1", "top5"):
        return "resnet50"
    return None


def _device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((x + 1) / 2).clamp(0, 1)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8, as a saved PNG (same rounding as the runner's images)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def png_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> 8-bit PNG -> [-1, 1] as the official pipeline: ``torchvision.utils.save_image`` rounding
    ``floor(255 u + 0.5)`` of ``u = clamp((x + 1) / 2, 0, 1)``, reloaded as ``k / 255``."""
    u = ((x.detach() + 1) / 2).clamp(0, 1)
    return torch.floor(u * 255 + 0.5).clamp(0, 255) / 255 * 2 - 1


def psnr(x_hat: torch.Tensor, x_true: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB on [0, 1] (torchmetrics), computed in float64."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = to_unit(x_hat.double()), to_unit(x_true.double())
    return peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(x_hat: torch.Tensor, x_true: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM on [0, 1] (torchmetrics map, mean over the valid interior), in float32 (float64
    convolutions are ~10x slower on CPU; float32 agrees with scikit-image's float64 to ~1e-6)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = to_unit(x_hat.float()), to_unit(x_true.float())
    _, full = structural_similarity_index_measure(a, b, gaussian_kernel=True, sigma=SSIM_SIGMA, kernel_size=SSIM_TAPS,
                                                  data_range=1.0, k1=0.01, k2=0.03, reduction="none",
                                                  return_full_image=True)
    pad = (int(3.5 * SSIM_SIGMA + 0.5) * 2 + 1 - 1) // 2  # torchmetrics' Gaussian window half-width (5)
    return full[..., pad:-pad, pad:-pad].double().reshape(full.shape[0], -1).mean(-1)


class MetricSuite:
    """Instantiated by Hydra from ``conf/metrics/*.yaml``.

    Args:
        names: subset of psnr, ssim, lpips, kid, fid, top1, top5.
        device: "auto" | "cpu" | "cuda[:N]" for the metric networks.
        lpips_net: "alex" (default, as the paper) or "vgg".
        lpips_compat: reproduce the official script's un-normalised LPIPS (see module doc).
        kid_subsets, kid_subset_size, kid_seed: clean-fid ``kernel_distance`` settings (defaults as clean-fid).
        fid_reference: "subset" (reference images of the same subset) or a path to an ``.npz`` with
            ``mu``/``sigma`` in the legacy_pytorch Inception space.
        ref_cache: cache reference Inception features on disk; ``ref_cache_dir`` overrides the location.
        batch_size: images per network call.
        verify: check the weight files' sha256 pins (a mismatch makes the metric missing).
        png_roundtrip: per-image metrics on 8-bit PNG-quantised images, as the official scripts (module doc).
        top1_preprocess: "torchvision" (resize 256, crop 224, normalise) or "official" (normalise only).
        _test_backbones: TEST ONLY.  ``{registry name: state dict | module}`` used instead of the registry's
            file for "alexnet"/"vgg16"/"inception_fid"/"resnet50".  A state dict goes through the same
            builder as the real file; a module replaces the network (for "inception_fid" a callable from
            (B,3,299,299) in [0,255] to (B,D); for "resnet50" from normalised (B,3,224,224) to (B,1000)
            logits; for "alexnet"/"vgg16" a torchvision module whose state dict fills the LPIPS trunk).
            Never set by the harness or any config.
    """

    def __init__(self, names: Iterable[str] = DEFAULT_NAMES, device: str = "auto", lpips_net: str = "alex",
                 lpips_compat: bool = False, kid_subsets: int = 100, kid_subset_size: int = 1000, kid_seed: int = 0,
                 fid_reference: str = "subset", ref_cache: bool = True, ref_cache_dir: Optional[str] = None,
                 batch_size: int = 32, verify: bool = True, png_roundtrip: bool = False,
                 top1_preprocess: str = "torchvision", _test_backbones: Optional[Mapping[str, Any]] = None):
        self.names = [str(n) for n in names]
        unknown = [n for n in self.names if n not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
        if lpips_net not in LPIPS_WEIGHTS:
            raise ValueError(f"metrics.lpips_net must be one of {sorted(LPIPS_WEIGHTS)}, got {lpips_net!r}")
        if top1_preprocess not in ("torchvision", "official"):
            raise ValueError(f"metrics.top1_preprocess must be 'torchvision' or 'official', got {top1_preprocess!r}")
        self.png_roundtrip, self.top1_preprocess = bool(png_roundtrip), top1_preprocess
        self.device = _device(device)
        self.lpips_net = lpips_net
        self.lpips_compat = bool(lpips_compat)
        self.kid_subsets, self.kid_subset_size, self.kid_seed = int(kid_subsets), int(kid_subset_size), int(kid_seed)
        self.batch_size = max(1, int(batch_size))
        self.verify = bool(verify)
        self._test = dict(_test_backbones or {})
        self.missing: dict[str, str] = {}
        self._paths: dict[str, Path] = {}
        self._nets: dict[str, Any] = {}

        from reddiff.core.weights import HashMismatchError, MissingWeightsError, REGISTRY, resolve

        for name in self.names:
            wname = _weights_for(name, lpips_net)
            if wname is None or wname in self._test or wname in self._paths:
                continue
            if any(_weights_for(n, lpips_net) == wname for n in self.missing):
                self.missing[name] = next(r for n, r in self.missing.items() if _weights_for(n, lpips_net) == wname)
                continue
            try:
                self._paths[wname] = resolve(wname, verify=self.verify)
            except (MissingWeightsError, HashMismatchError) as e:
                self.missing[name] = str(e)
        self.fid_stats: Optional[dict] = None
        self.fid_reference = str(fid_reference)
        if "fid" in self.names and "fid" not in self.missing and self.fid_reference != "subset":
            p = Path(os.path.expanduser(self.fid_reference))
            if not p.is_file():
                self.missing["fid"] = (f"FID reference statistics {p} not found; set metrics.fid_reference to an .npz "
                                       f"with mu/sigma in clean-fid legacy_pytorch space, or to 'subset'")
            else:
                with np.load(p) as z:
                    self.fid_stats = {"mu": z["mu"], "sigma": z["sigma"]}
        # reference-feature cache: on for real weights; with injected test backbones only when a dir is given
        self._ref_cache_dir: Optional[Path] = None
        if ref_cache and ("inception_fid" in self._paths or ("inception_fid" in self._test and ref_cache_dir)):
            from reddiff.core.weights import reddiff_home

            tag = (REGISTRY["inception_fid"].filename.rsplit(".", 1)[0] if "inception_fid" in self._paths
                   else "test-injected") + "_legacy_pytorch_u8"
            self._ref_cache_dir = Path(os.path.expanduser(ref_cache_dir or reddiff_home() / "ref_features")) / tag
        for name, reason in self.missing.items():
            log.warning("metric %s is missing: %s", name, reason)
        if self._test:
            log.warning("TEST ONLY: metric backbones injected for %s; these numbers mean nothing",
                        ", ".join(sorted(self._test)))

    # ------------------------------------------------------------------------------------------- networks
    def active(self, name: str) -> bool:
        return name in self.names and name not in self.missing

    def _state(self, wname: str):
        if wname in self._test:
            v = self._test[wname]
            return v if isinstance(v, Mapping) else None
        return backbones.load_state(self._paths[wname])

    def _net(self, wname: str):
        if wname in self._nets:
            return self._nets[wname]
        state = self._state(wname)
        injected = self._test.get(wname)
        if wname in ("alexnet", "vgg16"):
            if state is None:  # an injected torchvision module: its state dict fills the lpips trunk
                state = injected.state_dict()
            net = backbones.build_lpips(self.lpips_net, state).to(self.device)
        elif wname == "inception_fid":
            if state is None:
                mod = injected.to(self.device).eval() if isinstance(injected, torch.nn.Module) else injected
                net = mod
            else:
                net = backbones.build_fid_inception(state, self.device)
        elif wname == "resnet50":
            net = (injected if state is None else backbones.build_resnet50(state)).to(self.device).eval()
        else:
            raise KeyError(wname)
        self._nets[wname] = net
        return net

    # ------------------------------------------------------------------------------------------- per image
    def per_image(self, x_hat: torch.Tensor, x_true: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: Tensor(B,)}`` for the per-image metrics in ``names`` that are not missing (CPU, float)."""
        x_hat, x_true = x_hat.detach(), x_true.detach()
        if self.png_roundtrip:
            x_hat, x_true = png_roundtrip(x_hat), png_roundtrip(x_true)
        out: dict[str, torch.Tensor] = {}
        if self.active("psnr"):
            out["psnr"] = psnr(x_hat, x_true).float().cpu()
        if self.active("ssim"):
            out["ssim"] = ssim(x_hat, x_true).float().cpu()
        if self.active("lpips"):
            out["lpips"] = self.lpips(x_hat, x_true)
        return out

    @torch.no_grad()
    def lpips(self, x_hat: torch.Tensor, x_true: torch.Tensor) -> torch.Tensor:
        net = self._net(LPIPS_WEIGHTS[self.lpips_net])
        vals = []
        for i in range(0, x_hat.shape[0], self.batch_size):
            a = x_hat[i:i + self.batch_size].to(self.device, torch.float32).clamp(-1, 1)
            b = x_true[i:i + self.batch_size].to(self.device, torch.float32).clamp(-1, 1)
            if self.lpips_compat:  # the official script: [0, 1] images into a net that expects [-1, 1]
                a, b = (a + 1) / 2, (b + 1) / 2
            vals.append(net(a, b).reshape(-1).float().cpu())
        return torch.cat(vals)

    # ------------------------------------------------------------------------------------------- features
    @torch.no_grad()
    def features(self, x_hat: torch.Tensor, x_true: torch.Tensor) -> dict[str, np.ndarray]:
        """Per-image arrays the set-level metrics need (stored by the runner, stacked for ``set_level``):
        ``inception`` / ``inception_ref`` (B, 2048) float32 for kid/fid, ``logits`` (B, 1000) for top1/top5."""
        out: dict[str, np.ndarray] = {}
        if self.active("kid") or self.active("fid"):
            out["inception"] = self._inception(quantize(x_hat))
            out["inception_ref"] = self._inception(quantize(x_true), cache=self._ref_cache_dir)
        if self.active("top1") or self.active("top5"):
            out["logits"] = self._logits(quantize(x_hat))
        return out

    def _inception(self, u8: torch.Tensor, cache: Optional[Path] = None) -> np.ndarray:
        from cleanfid.resize import build_resizer

        u8 = u8.cpu().permute(0, 2, 3, 1).contiguous().numpy()  # B,H,W,3 as clean-fid reads PNGs
        result: list[Optional[np.ndarray]] = [None] * len(u8)
        keys = []
        for i, img in enumerate(u8):
            key = hashlib.sha256(repr(img.shape).encode() + img.tobytes()).hexdigest()
            keys.append(key)
            if cache is not None and (cache / key[:2] / f"{key}.npy").is_file():
                result[i] = np.load(cache / key[:2] / f"{key}.npy")
        todo = [i for i, r in enumerate(result) if r is None]
        if todo:
            net, resize = self._net("inception_fid"), build_resizer("legacy_pytorch")
            for s in range(0, len(todo), self.batch_size):
                idx = todo[s:s + self.batch_size]
                batch = torch.stack([torch.from_numpy(resize(u8[i]).transpose(2, 0, 1).copy()) for i in idx])
                feats = net(batch.to(self.device, torch.float32)).reshape(len(idx), -1).float().cpu().numpy()
                for j, i in enumerate(idx):
                    result[i] = feats[j]
                    if cache is not None:
                        d = cache / keys[i][:2]
                        d.mkdir(parents=True, exist_ok=True)
                        tmp = d / f"{keys[i]}.{os.getpid()}.tmp.npy"
                        np.save(tmp, feats[j])
                        os.replace(tmp, d / f"{keys[i]}.npy")
        return np.stack(result).astype(np.float32)

    def _logits(self, u8: torch.Tensor) -> np.ndarray:
        net = self._net("resnet50")
        prep = backbones.resnet50_preprocess(self.top1_preprocess == "official")
        outs = []
        for s in range(0, u8.shape[0], self.batch_size):
            x = prep(u8[s:s + self.batch_size].to(self.device).float() / 255.0)
            outs.append(net(x).float().cpu().numpy())
        return np.concatenate(outs).astype(np.float32)

    # ------------------------------------------------------------------------------------------- set level
    def set_level(self, features: Mapping[str, np.ndarray], labels: Optional[np.ndarray] = None) -> dict[str, dict]:
        """``{name: {"mean", "ci95", ...} | {"missing": reason}}`` for kid, fid, top1, top5 in ``names``,
        over all images whose features are given (merged across shards / resumed runs)."""
        out: dict[str, dict] = {}
        for name in (n for n in self.names if n in SET_LEVEL):
            if name in self.missing:
                out[name] = {"missing": self.missing[name]}
            elif name in ("kid", "fid"):
                if "inception" not in features or "inception_ref" not in features:
                    out[name] = {"missing": "no Inception features were stored for these images"}
                elif name == "kid":
                    out[name] = setlevel.kid(features["inception"], features["inception_ref"], self.kid_subsets,
                                             self.kid_subset_size, self.kid_seed)
                else:
                    out[name] = setlevel.fid(features["inception"], features["inception_ref"], self.fid_stats)
            else:
                k = 1 if name == "top1" else 5
                logits = features.get("logits")
                if logits is None:
                    out[name] = {"missing": "no classifier logits were stored for these images"}
                elif labels is None or len(np.asarray(labels).reshape(-1)) == 0:
                    out[name] = {"missing": "the data set has no class labels (top-1/top-5 need e.g. data=imagenet1k)"}
                elif len(np.asarray(labels).reshape(-1)) != len(logits):
                    out[name] = {"missing": f"labels for {len(np.asarray(labels).reshape(-1))} of {len(logits)} images"}
                else:
                    out[name] = setlevel.topk_accuracy(logits, labels, k)
        return out

    def __repr__(self) -> str:
        inj = f", TEST-ONLY backbones={sorted(self._test)}" if self._test else ""
        return f"MetricSuite(names={self.names}, missing={sorted(self.missing)}, device={self.device}{inj})"
