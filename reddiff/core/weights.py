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
            out.append(Path(__file__).parents[1] / (self.package_path or self.filename))  # reddiff/
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

    def instructions(self) -> Optional[str]:
        """The manual download instructions, with the cache folder as it is now ($REDDIFF_HOME honoured)."""
        return self.manual.replace("{home}", str(reddiff_home())) if self.manual else None

    def missing_message(self, path: Optional[Path] = None) -> str:
        where = path or self.default_path()
        if self.url:
            how = f"run: reddiff weights fetch {self.name}  (needs internet)"
        else:  # no direct download: `fetch` prints these instructions
            how = f"{self.instructions() or f'place it at {where}'} (`reddiff weights fetch {self.name}` prints these instructions)"
        return f"{self.filename} not found at {where}; {how}"


REGISTRY: dict[str, WeightSpec] = {}


def register(spec: WeightSpec) -> WeightSpec:
    REGISTRY[spec.name] = spec
    return spec


_DIGESTS: dict[tuple, str] = {}


def sha256sum(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file; remembered per (path, size, mtime) in this process (the ADM files are 2 GB)."""
    st = os.stat(path)
    memo = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if memo in _DIGESTS:
        return _DIGESTS[memo]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


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


#: every file resolved in this process: path -> {"sha256", "verified_as", "state"} (goes into summary.json)
LOADED: dict[str, dict] = {}


def identify(path: Path) -> Optional[WeightSpec]:
    """The registry entry whose pinned hash this file's content matches (whatever the file's name), or None."""
    digest = sha256sum(path)
    for spec in REGISTRY.values():
        if spec.sha256 == digest or (spec.sha256_prefix and not spec.sha256 and digest.startswith(spec.sha256_prefix)
                                     and spec.filename == Path(path).name):
            return spec
    return None


def _record(path: Path, state: str, spec: Optional[WeightSpec]) -> None:
    LOADED[str(Path(path).resolve())] = {"sha256": sha256sum(path), "verified_as": spec.name if spec else None,
                                         "state": state}


def resolve(name_or_path: str, verify: bool = True) -> Path:
    """Path of a registered file (or an explicit existing path), checked by content. Raises MissingWeightsError.

    An explicit path whose sha256 matches a registry entry is verified as that entry whatever its name; one
    named like an entry but with another hash is refused (HashMismatchError) unless ``verify=False``; any other
    file loads with its sha256 recorded in :data:`LOADED` and a one-line notice.
    """
    if name_or_path in REGISTRY:
        spec = REGISTRY[name_or_path]
        path = spec.find()
        if path is None:
            raise MissingWeightsError(spec.missing_message())
        _record(path, check_hash(spec, path, verify), spec)
        return path
    p = Path(os.path.expanduser(str(name_or_path)))
    if not p.is_file():
        raise MissingWeightsError(f"{p} not found (not a registered name either; known: {', '.join(sorted(REGISTRY))})")
    spec = identify(p)
    if spec is not None:
        _record(p, "verified", spec)
        return p
    for named in REGISTRY.values():  # an explicit path to a known file name must hold that file
        if named.filename == p.name:
            _record(p, check_hash(named, p, verify), None)
            return p
    key = str(p.resolve())
    if key not in LOADED:
        log.warning("%s is not a registered weights file; loading it with sha256 %s (recorded in summary.json)",
                    p, sha256sum(p))
    _record(p, "unregistered", None)
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
        raise RuntimeError(f"{name} has no direct download: {spec.instructions()}")
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

# Prior weights ---------------------------------------------------------------------------------------------
# sha256 pins are only those stated in public sources (cited); the others are left unpinned, and
# `reddiff weights status` says "no pinned hash" for them.  Never invent one.
#
# 256x256_diffusion_uncond.pt: a37c32ff...78b1, stated in alembics/disco-diffusion (disco.py, diff_model_map
# '256x256_diffusion_uncond' 'sha', commit e4be432 of 2022-07-11, and the Disco_Diffusion.ipynb commit a3f33ac
# "Fix mistaken sha256sum of '256x256_diffusion_uncond.pt'", 2022-06-22; the earlier notebooks' value
# 983e3de6... was the secondary model's hash, copied by mistake).
ADM_IMAGENET256_UNCOND_SHA256 = "a37c32fffd316cd494cf3f35b339936debdc1576dad13fe57c42399a5dbc78b1"
# 256x256_diffusion.pt, 256x256_classifier.pt, ffhq_10m.pt: no public sha256 found -> unpinned.
# embedded64: pinned by the lead once training has finished, with `python -m reddiff.core.weights pin embedded64`
# (rewrites the next line with the file's digest; see pin_embedded()).
EMBEDDED64_SHA256: Optional[str] = "fa4db465884908bd15a5a9b765eb496502048076cec0aba36857e7bc3be0dac4"

register(WeightSpec("embedded64", "embedded64.safetensors", "embedded 64x64 ADM-style prior (trained by this project)",
                    cache="package", package_path="assets/embedded64.safetensors", sha256=EMBEDDED64_SHA256,
                    env="REDDIFF_EMBEDDED",
                    manual="train it: python -m reddiff.priors.training.train --out runs/prior "
                           "--export reddiff/assets/embedded64.safetensors (see reddiff/priors/training/train.py)",
                    used_by="prior=embedded"))
register(WeightSpec("adm_imagenet256_uncond", "256x256_diffusion_uncond.pt", "ADM ImageNet-256 unconditional (552.8M)",
                    url=_OPENAI + "256x256_diffusion_uncond.pt", sha256=ADM_IMAGENET256_UNCOND_SHA256,
                    env="REDDIFF_ADM_IMAGENET", used_by="prior=adm_imagenet256"))
register(WeightSpec("adm_imagenet256_cond", "256x256_diffusion.pt", "ADM ImageNet-256 class-conditional (553.8M)",
                    url=_OPENAI + "256x256_diffusion.pt", env="REDDIFF_ADM_IMAGENET_COND", used_by="no shipped prior config: prior.weights=adm_imagenet256_cond prior.arch=adm_imagenet256_cond"))
register(WeightSpec("adm_imagenet256_classifier", "256x256_classifier.pt", "ADM ImageNet-256 noisy classifier",
                    url=_OPENAI + "256x256_classifier.pt",
                    used_by="classifier guidance (not implemented by UNetPrior; see docs/MODEL_CARD.md)"))
register(WeightSpec("dps_ffhq256", "ffhq_10m.pt", "DPS FFHQ-256 unconditional (93.6M)", env="REDDIFF_DPS_FFHQ",
                    manual="download ffhq_10m.pt from the DPS repository's Google Drive link "
                           "(DPS2022/diffusion-posterior-sampling README) and place it at {home}/ffhq_10m.pt",
                    used_by="prior=dps_ffhq256"))
# EDM-format and flow-matching priors (reddiff/priors/edm.py, flow.py; docs/MODEL_CARD.md "Checkpoint formats").
# No public source states a sha256 for any of them: unpinned.  InverseBench README "Pre-trained models": ffhq256.pt,
# "converted from the DPS repository", config configs/pretrain/ffhq256.yaml (VPPrecond around ADM).  PnP-Flow
# download.sh / README: both OT models are published as model_final.pt (Google Drive), so they are kept in their own
# folders here, as PnP-Flow keeps them (model/<dataset>/ot/model_final.pt, main.py:90-92).
register(WeightSpec("inversebench_ffhq256", "ffhq256.pt", "InverseBench FFHQ-256 (DPS network in EDM VPPrecond format, 93.6M)",
                    env="REDDIFF_INVERSEBENCH_FFHQ",
                    manual="download ffhq256.pt from the InverseBench GitHub release 'diffusion-prior' "
                           "(https://github.com/devzhk/InverseBench/releases/tag/diffusion-prior, linked from the "
                           "devzhk/InverseBench README, 'Pre-trained models') and place it at {home}/ffhq256.pt",
                    used_by="prior=inversebench_ffhq256"))
register(WeightSpec("pnpflow_celeba", "pnpflow/celeba/ot/model_final.pt", "PnP-Flow OT flow matching, CelebA 128 (34.5M)",
                    env="REDDIFF_PNPFLOW_CELEBA",
                    manual="download model_final.pt of the PnP-Flow CelebA model (Google Drive file "
                           "1ZZ6S-PGRx-tOPkr4Gt3A6RN-PChabnD6, linked from the annegnx/PnP-Flow README; "
                           "`bash download.sh pretrained-network-celeba` there) and place it at "
                           "{home}/pnpflow/celeba/ot/model_final.pt",
                    used_by="prior=pnpflow_celeba"))
register(WeightSpec("pnpflow_afhq_cat", "pnpflow/afhq_cat/ot/model_final.pt", "PnP-Flow OT flow matching, AFHQ-Cat 256 (31.0M)",
                    env="REDDIFF_PNPFLOW_AFHQ_CAT",
                    manual="download model_final.pt of the PnP-Flow AFHQ-Cat model (Google Drive file "
                           "1FpD3cYpgtM8-KJ3Qk48fcjtr1Ne_IMOF, linked from the annegnx/PnP-Flow README; "
                           "`bash download.sh pretrained-network-afhq-cat` there) and place it at "
                           "{home}/pnpflow/afhq_cat/ot/model_final.pt",
                    used_by="prior=pnpflow_afhq_cat"))
register(WeightSpec("alexnet", "alexnet-owt-7be5be79.pth", "torchvision AlexNet (LPIPS backbone)",
                    url=_TV + "alexnet-owt-7be5be79.pth", sha256_prefix="7be5be79", cache="torch_hub", used_by="metrics: lpips (alex)"))
register(WeightSpec("vgg16", "vgg16-397923af.pth", "torchvision VGG16 (LPIPS-VGG backbone)",
                    url=_TV + "vgg16-397923af.pth", sha256_prefix="397923af", cache="torch_hub", used_by="metrics: lpips (vgg)"))
register(WeightSpec("resnet50", "resnet50-0676ba61.pth", "torchvision ResNet-50 IMAGENET1K_V1 (top-1)",
                    url=_TV + "resnet50-0676ba61.pth", sha256_prefix="0676ba61", cache="torch_hub", used_by="metrics: top1"))
# clean-fid's legacy_pytorch mode (the official RED-diff KID) builds pytorch-fid's Inception and fetches this file with
# torch.hub's load_state_dict_from_url, i.e. from $TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints);
# reddiff.metrics hands clean-fid the registry's copy instead, so nothing is downloaded at run time.  (clean-fid's
# other modes use a TorchScript model at /tmp/inception-2015-12-05.pt; not used here.)  Full sha256 (95,628,359
# bytes) as stated independently by several public evaluation logs; its first 8 hex digits are the file-name tag.
register(WeightSpec("inception_fid", "pt_inception-2015-12-05-6726825d.pth", "FID Inception (clean-fid legacy_pytorch mode)",
                    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
                    sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
                    cache="torch_hub", used_by="metrics: kid, fid"))
register(WeightSpec("bkse_gopro", "GOPRO_wVAE.pth", "bkse kernel-space blur network (nonlinear deblur operator)",
                    env="REDDIFF_BKSE",
                    manual="download GOPRO_wVAE.pth from the bkse project (VinAIResearch/blur-kernel-space-exploring, "
                           "experiments/pretrained) and place it at {home}/GOPRO_wVAE.pth",
                    used_by="task=deblur_nonlinear"))
# The DGP list (DDRM's README: "taken from XingangPan/deep-generative-prior"; DDRM does not ship the file).  RED-diff's
# misc/dgp_top1k.txt is the same 1000 images, labels and order with the class folder prepended.  sha256 of the
# file at DGP master (commit c503a56); fetched with `reddiff data fetch imagenet_val_1k`.
register(WeightSpec("imagenet_val_1k", "imagenet_val_1k.txt", "DGP/DDRM list of 1k ImageNet validation images (one per class)",
                    url="https://raw.githubusercontent.com/XingangPan/deep-generative-prior/master/scripts/imagenet_val_1k.txt",
                    sha256="ea8bdfc30918c69a44a408918e739ab10d132a74054677b59096208baf4732cb",
                    used_by="data=imagenet1k"))


# ---------------------------------------------------------------------------------------------- pinning helper
def pin_embedded(path: Optional[Path] = None, source: Optional[Path] = None) -> str:
    """Pin the embedded prior: write the sha256 of its file into ``EMBEDDED64_SHA256`` in this module's source.

    Run it once training has finished and the final export is in place; review and commit the diff.
    Returns the digest.
    """
    import re

    path = Path(path) if path else REGISTRY["embedded64"].find()
    if path is None or not Path(path).is_file():
        raise MissingWeightsError(REGISTRY["embedded64"].missing_message())
    digest = sha256sum(Path(path))
    source = Path(source) if source else Path(__file__)
    text = source.read_text()
    new, n = re.subn(r"^EMBEDDED64_SHA256: Optional\[str\] = .*$",
                     f'EMBEDDED64_SHA256: Optional[str] = "{digest}"', text, count=1, flags=re.M)
    if n != 1:
        raise RuntimeError(f"could not find the EMBEDDED64_SHA256 line in {source}")
    source.write_text(new)
    return digest


def _main(argv=None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m reddiff.core.weights", description="weights registry helpers")
    sub = p.add_subparsers(dest="cmd", required=True)
    pin = sub.add_parser("pin", help="pin the sha256 of the embedded prior in reddiff/core/weights.py")
    pin.add_argument("name", choices=["embedded64"])
    pin.add_argument("--path", default=None, help="file to pin (default: the registry's location)")
    sub.add_parser("status", help="list every known file")
    a = p.parse_args(argv)
    if a.cmd == "pin":
        path = Path(a.path) if a.path else REGISTRY["embedded64"].find()
        from reddiff.core.checkpoint import read_json_metadata

        info = read_json_metadata(path, "train_info") if path else None
        digest = pin_embedded(path)
        print(f"pinned embedded64 = {digest}\n  file: {path}\n  train_info: {json.dumps(info)}\n"
              f"  review and commit reddiff/core/weights.py")
    else:
        for row in status_rows():
            print(f"{row['name']:28s} {row['state']:28s} {row['path']}")


if __name__ == "__main__":
    _main()
