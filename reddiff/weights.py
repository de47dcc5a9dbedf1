"""Registry of every weight / data file the harness knows: where it is looked for, how it is verified,
and how to get it.

* Files are looked for in the standard caches first (``$TORCH_HOME/hub/checkpoints`` for torchvision
  backbones, clean-fid's own location, ...), then in ``$REDDIFF_HOME`` (default ``~/.cache/reddiff``).
  A per-entry environment variable or an explicit path overrides both.
* A file is *verified* against its pinned sha256 when one is known; torchvision files pin the hash prefix
  that their file name carries.  A mismatch is refused unless the caller passes ``verify=False``,
  which is logged.
* Nothing here ever invents a file: a missing one raises :class:`MissingWeightsError` whose message names the
  path and the ``reddiff weights fetch NAME`` command.
"""
from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


class MissingWeightsError(FileNotFoundError):
    pass


class HashMismatchError(RuntimeError):
    pass


def torch_hub_dir() -> Path:
    th = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(th)) / "hub" / "checkpoints"


def reddiff_home() -> Path:
    return Path(os.path.expanduser(os.environ.get("REDDIFF_HOME", "~/.cache/reddiff")))


@dataclass
class WeightSpec:
    name: str
    filename: str
    description: str
    url: Optional[str] = None           # direct download URL, if one exists
    manual: Optional[str] = None        # instructions when no direct URL exists
    sha256: Optional[str] = None        # full pin when known
    sha256_prefix: Optional[str] = None  # torchvision-style prefix pin (from the file name)
    cache: str = "reddiff"              # "reddiff" | "torch_hub" | "package"
    env: Optional[str] = None           # env var that overrides the path
    package_path: Optional[str] = None  # for cache == "package": path relative to the reddiff package
    used_by: str = ""

    def candidates(self) -> list[Path]:
        out = []
        if self.env and os.environ.get(self.env):
            out.append(Path(os.path.expanduser(os.environ[self.env])))
        if self.cache == "package":
            out.append(Path(__file__).parent / (self.package_path or self.filename))
        if self.cache == "torch_hub":
            out.append(torch_hub_dir() / self.filename)
        out.append(reddiff_home() / self.filename)
        return out

    def default_path(self) -> Path:
        return self.candidates()[0]

    def find(self) -> Optional[Path]:
        for p in self.candidates():
            if p.is_file():
                return p
        return None

    def missing_message(self, path: Optional[Path] = None) -> str:
        where = path or self.default_path()
        how = f"run: reddiff weights fetch {self.name}" if self.url else (self.manual or f"place it at {where}")
        return f"{self.filename} not found at {where}; {how}"


REGISTRY: dict[str, WeightSpec] = {}


def register(spec: WeightSpec) -> WeightSpec:
    REGISTRY[spec.name] = spec
    return spec


def sha256sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_hash(spec: WeightSpec, path: Path, verify: bool = True) -> str:
    """Return 'verified', 'unpinned' or 'override'; raise HashMismatchError on a mismatch when verify."""
    if not (spec.sha256 or spec.sha256_prefix):
        return "unpinned"
    digest = sha256sum(path)
    ok = digest == spec.sha256 if spec.sha256 else digest.startswith(spec.sha256_prefix)
    if ok:
        return "verified"
    expected = spec.sha256 or (spec.sha256_prefix + "...")
    msg = f"sha256 mismatch for {path} ({spec.name}): expected {expected}, got {digest}"
    if verify:
        raise HashMismatchError(msg + "; set verify=false (prior.verify=false) to load it anyway")
    log.warning("%s; loading anyway because verify=false", msg)
    return "override"


def resolve(name_or_path: str, verify: bool = True) -> Path:
    """Path of a registered file (or an explicit existing path), hash-checked. Raises MissingWeightsError."""
    if name_or_path in REGISTRY:
        spec = REGISTRY[name_or_path]
        path = spec.find()
        if path is None:
            raise MissingWeightsError(spec.missing_message())
        check_hash(spec, path, verify)
        return path
    p = Path(os.path.expanduser(str(name_or_path)))
    if not p.is_file():
        raise MissingWeightsError(f"{p} not found (not a registered name either; known: {', '.join(sorted(REGISTRY))})")
    for spec in REGISTRY.values():  # an explicit path to a known file name is still checked
        if spec.filename == p.name:
            check_hash(spec, p, verify)
    return p


def status_rows() -> list[dict]:
    rows = []
    for spec in REGISTRY.values():
        path = spec.find()
        if path is None:
            rows.append({"name": spec.name, "state": "missing", "path": str(spec.default_path()), "used_by": spec.used_by})
            continue
        try:
            state = {"verified": "present, verified", "unpinned": "present (no pinned hash)"}[check_hash(spec, path)]
        except HashMismatchError:
            state = "present, HASH MISMATCH"
        rows.append({"name": spec.name, "state": state, "path": str(path), "used_by": spec.used_by})
    return rows


def fetch(name: str, dest: Optional[Path] = None) -> Path:
    """Download a registered file into its standard cache (needs internet)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown weights {name!r}; known: {', '.join(sorted(REGISTRY))}")
    spec = REGISTRY[name]
    if not spec.url:
        raise RuntimeError(f"{name} has no direct download: {spec.manual}")
    dest = Path(dest) if dest else (torch_hub_dir() if spec.cache == "torch_hub" else reddiff_home()) / spec.filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    print(f"downloading {spec.url} -> {dest}")
    urllib.request.urlretrieve(spec.url, tmp)  # noqa: S310 - fixed, registered URLs only
    check_hash(spec, tmp)
    os.replace(tmp, dest)
    return dest


# ---------------------------------------------------------------------------------------------- entries
_OPENAI = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
_TV = "https://download.pytorch.org/models/"

register(WeightSpec("embedded64", "embedded64.safetensors", "embedded 64x64 ADM-style prior (trained by this project)",
                    cache="package", package_path="assets/embedded64.safetensors", used_by="prior=embedded"))
register(WeightSpec("adm_imagenet256_uncond", "256x256_diffusion_uncond.pt", "ADM ImageNet-256 unconditional (552.8M)",
                    url=_OPENAI + "256x256_diffusion_uncond.pt", env="REDDIFF_ADM_IMAGENET", used_by="prior=adm_imagenet256"))
register(WeightSpec("adm_imagenet256_cond", "256x256_diffusion.pt", "ADM ImageNet-256 class-conditional",
                    url=_OPENAI + "256x256_diffusion.pt", used_by="prior=adm_imagenet256_cond"))
register(WeightSpec("adm_imagenet256_classifier", "256x256_classifier.pt", "ADM ImageNet-256 noisy classifier",
                    url=_OPENAI + "256x256_classifier.pt", used_by="prior=adm_imagenet256_cond (guidance)"))
register(WeightSpec("dps_ffhq256", "ffhq_10m.pt", "DPS FFHQ-256 unconditional (93.6M)", env="REDDIFF_DPS_FFHQ",
                    manual="download ffhq_10m.pt from the DPS repository's Google Drive link "
                           "(DPS2022/diffusion-posterior-sampling README) and place it at ~/.cache/reddiff/ffhq_10m.pt",
                    used_by="prior=dps_ffhq256"))
register(WeightSpec("alexnet", "alexnet-owt-7be5be79.pth", "torchvision AlexNet (LPIPS backbone)",
                    url=_TV + "alexnet-owt-7be5be79.pth", sha256_prefix="7be5be79", cache="torch_hub", used_by="metrics: lpips (alex)"))
register(WeightSpec("vgg16", "vgg16-397923af.pth", "torchvision VGG16 (LPIPS-VGG backbone)",
                    url=_TV + "vgg16-397923af.pth", sha256_prefix="397923af", cache="torch_hub", used_by="metrics: lpips (vgg)"))
register(WeightSpec("resnet50", "resnet50-0676ba61.pth", "torchvision ResNet-50 IMAGENET1K_V1 (top-1)",
                    url=_TV + "resnet50-0676ba61.pth", sha256_prefix="0676ba61", cache="torch_hub", used_by="metrics: top1"))
register(WeightSpec("inception_fid", "pt_inception-2015-12-05-6726825d.pth", "FID Inception (clean-fid legacy_pytorch mode)",
                    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
                    sha256_prefix="6726825d", cache="torch_hub", used_by="metrics: kid, fid"))
register(WeightSpec("bkse_gopro", "GOPRO_wVAE.pth", "bkse kernel-space blur network (nonlinear deblur operator)",
                    env="REDDIFF_BKSE",
                    manual="download GOPRO_wVAE.pth from the bkse project (VinAIResearch/blur-kernel-space-exploring, "
                           "experiments/pretrained) and place it at ~/.cache/reddiff/GOPRO_wVAE.pth",
                    used_by="task=deblur_nonlinear"))
register(WeightSpec("imagenet_val_1k", "imagenet_val_1k.txt", "DGP/DDRM list of 1k ImageNet validation images (one per class)",
                    url="https://raw.githubusercontent.com/bahjat-kawar/ddrm/master/exp/imagenet_val_1k.txt",
                    used_by="data=imagenet1k"))
