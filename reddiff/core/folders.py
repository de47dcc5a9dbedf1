"""Registry of model *folders* (diffusers format: one sub-folder per component), beside the file registry of
:mod:`reddiff.core.weights`.

A latent diffusion model is a folder (``vae/`` or ``vqvae/``, ``unet/``, ``scheduler/`` ...), not one file, so an
entry names the files it must hold; ``reddiff weights status`` lists each entry with the files still missing, and a
run that needs one names the folder and those files.  Nothing is downloaded here (the models are large and gated
behind licences); no sha256 is pinned for them (none was measured), so a loaded folder records each file's sha256
in :data:`reddiff.core.weights.LOADED` as ``unpinned``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from reddiff.core.weights import LOADED, MissingWeightsError, reddiff_home, sha256sum

#: the weights of a diffusers component: safetensors only (never a pickle)
SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class FolderSpec:
    name: str
    folder: str                      # relative to $REDDIFF_HOME
    description: str
    files: tuple                     # relative paths the folder must hold
    source: str                      # where the model comes from (what to place there)
    env: Optional[str] = None        # env var that overrides the path
    used_by: str = ""
    package_path: Optional[str] = None  # shipped inside the package: the path relative to reddiff/

    def path(self) -> Path:
        if self.env and os.environ.get(self.env):
            return Path(os.path.expanduser(os.environ[self.env]))
        if self.package_path:
            return Path(__file__).parents[1] / self.package_path
        return reddiff_home() / self.folder

    def missing(self, path: Optional[Path] = None) -> list[str]:
        root = path or self.path()
        return [f for f in self.files if not (root / f).is_file()]

    def missing_message(self) -> str:
        lack = self.missing()
        what = "the folder is absent" if not self.path().is_dir() else "it lacks " + ", ".join(lack)
        return (f"{self.name}: expected a diffusers-format folder at {self.path()} with {', '.join(self.files)}; "
                f"{what}. Place there {self.source}" + (f" (or set {self.env})" if self.env else ""))


FOLDERS: dict[str, FolderSpec] = {}


def register_folder(spec: FolderSpec) -> FolderSpec:
    FOLDERS[spec.name] = spec
    return spec


def _record(root: Path, files) -> None:
    for f in files:
        p = root / f
        if p.suffix == ".safetensors":
            LOADED[str(p.resolve())] = {"sha256": sha256sum(p), "verified_as": None, "state": "unpinned"}


def resolve_folder(name_or_path: str, files: tuple = ()) -> Path:
    """The folder of a registered entry (complete) or an explicit folder holding ``files``; raises
    :class:`MissingWeightsError` naming the folder and what it lacks."""
    if name_or_path in FOLDERS:
        spec = FOLDERS[name_or_path]
        if spec.missing():
            raise MissingWeightsError(spec.missing_message())
        _record(spec.path(), spec.files)
        return spec.path()
    root = Path(os.path.expanduser(str(name_or_path)))
    if not root.is_dir():
        raise MissingWeightsError(f"{root} is not a folder (not a registered model folder either; known: "
                                  f"{', '.join(sorted(FOLDERS))})")
    lack = [f for f in files if not (root / f).is_file()]
    if lack:
        raise MissingWeightsError(f"{root} lacks {', '.join(lack)} (a diffusers-format folder is expected)")
    _record(root, files)
    return root


def status_rows() -> list[dict]:
    rows = []
    for spec in FOLDERS.values():
        lack = spec.missing()
        state = "present (no pinned hash)" if not lack else (
            "missing" if not spec.path().is_dir() else "incomplete: lacks " + ", ".join(lack))
        rows.append({"name": spec.name, "state": state, "path": str(spec.path()), "used_by": spec.used_by})
    return rows


# ---------------------------------------------------------------------------------------------- entries
def _kl(sub: str = "vae") -> tuple:
    return (f"{sub}/config.json", f"{sub}/{SAFE_WEIGHTS}", "unet/config.json", f"unet/{SAFE_WEIGHTS}",
            "scheduler/scheduler_config.json")


_SD_PROMPT = (" and, for the empty prompt's embedding, text_encoder/ and tokenizer/ (needs the transformers "
              "package) or empty_prompt.safetensors (key 'embedding', shape (1, 77, D))")
register_folder(FolderSpec(
    "sd15", "latent/sd15", "Stable Diffusion 1.5 (860M UNet, AutoencoderKL f8, text-conditional)", _kl(),
    "the diffusers folder of stable-diffusion-v1-5/stable-diffusion-v1-5 (safetensors)" + _SD_PROMPT,
    env="REDDIFF_SD15", used_by="prior=sd15"))
register_folder(FolderSpec(
    "sd21_base", "latent/sd21_base", "Stable Diffusion 2.1-base (865M UNet, 512px, epsilon prediction)", _kl(),
    "the diffusers folder of stabilityai/stable-diffusion-2-1-base (safetensors)" + _SD_PROMPT,
    env="REDDIFF_SD21_BASE", used_by="prior=sd21_base"))
register_folder(FolderSpec(
    "ldm_ffhq256", "latent/ldm_ffhq256", "LDM FFHQ-256 (CompVis latent-diffusion ffhq-ldm-vq-4: VQ f4, unconditional)",
    _kl("vqvae"), "a diffusers-format conversion of CompVis latent-diffusion's ffhq-ldm-vq-4 checkpoint (vqvae/, "
    "unet/, scheduler/; safetensors)", env="REDDIFF_LDM_FFHQ256", used_by="prior=ldm_ffhq256"))
register_folder(FolderSpec(
    "ldm_celebahq256", "latent/ldm_celebahq256", "LDM CelebA-HQ-256 (CompVis/ldm-celebahq-256: VQ f4, unconditional)",
    _kl("vqvae"), "the diffusers folder of CompVis/ldm-celebahq-256 (weights converted to safetensors)",
    env="REDDIFF_LDM_CELEBAHQ256", used_by="prior=ldm_celebahq256"))
