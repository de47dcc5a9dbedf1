"""Latent diffusion priors: an encoder ``E``, a decoder ``D`` and a latent denoiser, from a local diffusers folder.

    prior = LatentPrior("sd15")              # a registered folder ($REDDIFF_HOME/latent/sd15; reddiff weights status)
    prior = LatentPrior("latent_tiny")       # the tiny random model shipped with the package (CI, tests)
    prior = LatentPrior("/some/folder")      # any diffusers-format folder

The network speaks the prior protocol *in latent space* (``shape`` is the latent's ``(C, h, w)``; every dialect
of :mod:`reddiff.priors.dialects` works on it); ``encode`` / ``decode`` map pixels in ``[-1, 1]`` (``pixel_shape``)
to latents and back, with the autoencoder config's ``scaling_factor`` (``z = sf * E(x)``, ``x = D(z / sf)``:
diffusers ``pipeline_stable_diffusion.py`` ``latents / self.vae.config.scaling_factor`` before ``vae.decode``;
``pipeline_latent_diffusion.py`` the same for a ``VQModel``).  ``E`` returns the posterior mean of an
``AutoencoderKL`` (deterministic); a ``VQModel`` decodes through its quantiser, as its pipelines do.
``encoder_calls`` / ``decoder_calls`` count beside ``nfe``.

Loading is strict and safe: each component is built from its ``config.json`` (its ``_class_name`` must be one of
:data:`AUTOENCODERS` / :data:`NETWORKS`) and its ``diffusion_pytorch_model.safetensors`` loaded with
``strict=True``; the beta table and the prediction type (``epsilon``, ``v_prediction``, ``sample``) come from
``scheduler/scheduler_config.json``.  A text-conditional network (``UNet2DConditionModel``) is run with the empty
prompt's embedding, read from ``empty_prompt.safetensors`` (key ``embedding``) or computed once with the folder's
``text_encoder/`` + ``tokenizer/`` (the ``transformers`` package).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch

from reddiff.core.diffusion import Schedule
from reddiff.core.folders import FOLDERS, SAFE_WEIGHTS, FolderSpec, register_folder, resolve_folder
from reddiff.core.weights import MissingWeightsError, sha256sum
from reddiff.priors.base import Prior
from reddiff.priors.dialects import bcast
from reddiff.priors.gmm import GaussianMixturePrior
from reddiff.priors.image_gmm import ImageMixturePrior
from reddiff.priors.unet import frozen

AUTOENCODERS = ("AutoencoderKL", "VQModel")
NETWORKS = ("UNet2DModel", "UNet2DConditionModel")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
#: beta tables of diffusers' DDPM-family schedulers (``scheduling_ddpm.py``: ``linear``, ``scaled_linear``)
BETAS = {
    "linear": lambda b0, b1, T: torch.linspace(b0, b1, T, dtype=torch.float64),
    "scaled_linear": lambda b0, b1, T: torch.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=torch.float64) ** 2,
}
PROMPT_FILE = "empty_prompt.safetensors"
TINY = register_folder(FolderSpec(
    "latent_tiny", "latent_tiny", "tiny random latent model (AutoencoderKL f4 + UNet2DModel, untrained; CI only)",
    tuple(f"{s}/{f}" for s in ("vae", "unet") for f in ("config.json", SAFE_WEIGHTS))
    + ("scheduler/scheduler_config.json",), "the package's own copy (python -m reddiff.priors.latent --tiny DIR)",
    used_by="prior=latent_tiny", package_path="assets/latent_tiny"))


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def load_component(root: Path, sub: str, allowed: tuple) -> torch.nn.Module:
    """A diffusers model from ``root/sub``: built from its config, weights loaded strictly from safetensors."""
    import diffusers
    from safetensors.torch import load_file

    cfg = _read(root / sub / "config.json")
    name = cfg.get("_class_name")
    if name not in allowed:
        raise ValueError(f"{root / sub / 'config.json'}: _class_name {name!r} is not one of {', '.join(allowed)}")
    cls = getattr(diffusers, name)
    model = cls.from_config(cfg)
    missing, unexpected = model.load_state_dict(load_file(str(root / sub / SAFE_WEIGHTS)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{root / sub / SAFE_WEIGHTS} does not match {name} of its config.json: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]} (strict loading)")
    return model.eval().requires_grad_(False)


def schedule_of(cfg: dict) -> tuple[Schedule, str]:
    """The VP schedule and prediction type of a diffusers scheduler config."""
    T = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        betas = torch.as_tensor(cfg["trained_betas"], dtype=torch.float64)
    else:
        kind = cfg.get("beta_schedule", "linear")
        if kind not in BETAS:
            raise ValueError(f"beta_schedule {kind!r} is not supported (supported: {', '.join(BETAS)})")
        betas = BETAS[kind](float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02)), T)
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in PREDICTIONS:
        raise ValueError(f"prediction_type {pred!r} is not supported (supported: {', '.join(PREDICTIONS)})")
    return Schedule.from_betas(betas), pred


class LatentPrior(Prior):
    """A latent diffusion model (autoencoder + latent network + scheduler) behind the prior protocol."""

    name = "latent"

    def __init__(self, weights: str = "latent_tiny", dialect: str = "vp_discrete", device="cpu",
                 dtype: str = "float32", autoencoder: Optional[str] = None):
        root = self._root(weights)
        ae_sub = autoencoder or ("vae" if (root / "vae").is_dir() else "vqvae")
        ae, net = load_component(root, ae_sub, AUTOENCODERS), load_component(root, "unet", NETWORKS)
        raw = _read(root / ae_sub / "config.json")
        cond = self._empty_prompt(root) if type(net).__name__ == "UNet2DConditionModel" else None
        # the decoder's scaling factor as the folder's config states it (the class default when it says none)
        self._setup(ae, net, _read(root / "scheduler" / "scheduler_config.json"), cond,
                    float(raw.get("scaling_factor", ae.config.scaling_factor)), dialect, device, dtype)
        self.folder = root
        #: one digest of the folder's weights (the sha256s of its safetensors files, in order): the fingerprint's
        self.weights_sha256 = hashlib.sha256("".join(
            sha256sum(p) for p in sorted(root.rglob("*.safetensors"))).encode()).hexdigest()

    @classmethod
    def from_modules(cls, ae, net, scheduler_config: dict, cond=None, scaling_factor: Optional[float] = None,
                     dialect: str = "vp_discrete", device="cpu", dtype: str = "float32") -> "LatentPrior":
        """A latent prior from models in memory (random weights for timing: ``benchmarks/gpu_check.py``)."""
        self = cls.__new__(cls)
        sf = float(ae.config.scaling_factor if scaling_factor is None else scaling_factor)
        self._setup(ae.eval().requires_grad_(False), net.eval().requires_grad_(False), scheduler_config, cond, sf,
                    dialect, device, dtype)
        self.folder, self.weights_sha256 = None, None
        return self

    def _setup(self, ae, net, scheduler_config, cond, scaling_factor, dialect, device, dtype) -> None:
        schedule, prediction = schedule_of(scheduler_config)
        super().__init__(schedule, dialect)
        self.prediction, self.ae, self.net, self.cond, self.scaling_factor = prediction, ae, net, cond, scaling_factor
        f = 2 ** (len(ae.config.block_out_channels) - 1)
        h = int(net.config.sample_size)
        self.shape = (int(net.config.in_channels), h, h)
        self.pixel_shape = (int(ae.config.in_channels), h * f, h * f)
        self.encoder_calls = self.decoder_calls = 0
        frozen(self, device, dtype)

    @staticmethod
    def _root(weights: str) -> Path:
        spec = FOLDERS.get(weights)
        if spec is not None:
            return resolve_folder(weights)
        needed = ("unet/config.json", f"unet/{SAFE_WEIGHTS}", "scheduler/scheduler_config.json")
        return resolve_folder(weights, needed)

    @staticmethod
    def _empty_prompt(root: Path) -> torch.Tensor:
        if (root / PROMPT_FILE).is_file():
            from safetensors.torch import load_file

            return load_file(str(root / PROMPT_FILE))["embedding"]
        if not (root / "text_encoder").is_dir():
            raise MissingWeightsError(f"{root}: a text-conditional network needs {root / PROMPT_FILE} (key "
                                      f"'embedding') or text_encoder/ and tokenizer/ for the empty prompt")
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as e:
            raise MissingWeightsError(f"{root}: computing the empty prompt's embedding needs the transformers "
                                      f"package (pip install transformers), or place {root / PROMPT_FILE}") from e
        tok = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
        enc = CLIPTextModel.from_pretrained(str(root / "text_encoder"), local_files_only=True, use_safetensors=True)
        ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            return enc(ids)[0]

    # the prior protocol in latent space ---------------------------------------------------------------------
    def _eps_time(self, x_t: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        tau = tau.to(device=x_t.device, dtype=torch.float32 if x_t.dtype != torch.float64 else x_t.dtype)
        kw = {}
        if self.cond is not None:
            kw["encoder_hidden_states"] = self.cond.to(x_t).expand(x_t.shape[0], *self.cond.shape[1:])
        out = self.net(x_t, tau, **kw).sample
        if out.shape[1] == 2 * x_t.shape[1]:  # learned variance: the first half is the prediction
            out = out[:, : x_t.shape[1]]
        if self.prediction == "epsilon":
            return out
        a = 1.0 / (1.0 + self.schedule.sigma_at(tau.detach().cpu().double()) ** 2)
        sa, s1 = bcast(a.sqrt(), x_t), bcast((1 - a).sqrt(), x_t)
        if self.prediction == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x0  =>  eps = sqrt(a) v + sqrt(1 - a) x_t
            return sa * out + s1 * x_t
        return (x_t - sa * out) / s1  # sample (x0) prediction

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent of pixels ``x`` in ``[-1, 1]``: ``sf * E(x)`` (the posterior mean of an AutoencoderKL)."""
        self.encoder_calls += 1
        enc = self.ae.encode(x)
        z = enc.latent_dist.mean if hasattr(enc, "latent_dist") else enc.latents
        return z * self.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels in ``[-1, 1]`` (not clipped) of latents ``z``: ``D(z / sf)``."""
        self.decoder_calls += 1
        return self.ae.decode(z / self.scaling_factor).sample

    def reset_nfe(self) -> None:
        super().reset_nfe()
        self.encoder_calls = self.decoder_calls = 0


# ------------------------------------------------------------------------------------------ an exact test bed
class LinearDecoderGMM(GaussianMixturePrior):
    """A Gaussian mixture on latents ``z`` in ``R^k`` with the linear decoder ``D(z) = W z`` (``W``: ``(d, k)``, full
    column rank) and the encoder ``E = W^+``.  For a linear task ``y = A x + sigma e`` the posterior is exact: the
    latent posterior under the matrix ``A W`` (:meth:`GaussianMixturePrior.posterior`), pushed through ``W``
    (:meth:`pixel_posterior_samples`).  The test bed of the latent solvers (``k < d``)."""

    name = "latent_gmm"

    def __init__(self, means, W, weights=None, covs=None, schedule: Optional[Schedule] = None,
                 dialect: str = "vp_discrete"):
        super().__init__(means, weights, covs, schedule, dialect)
        W = torch.as_tensor(W, dtype=torch.float64)
        if W.ndim != 2 or W.shape[1] != self.d or int(torch.linalg.matrix_rank(W)) != self.d:
            raise ValueError(f"W must be (d, {self.d}) of full column rank, got shape {tuple(W.shape)}")
        self.register_buffer("W", W)
        self.register_buffer("W_pinv", torch.linalg.pinv(W))
        self.pixel_shape = (W.shape[0],)
        self.encoder_calls = self.decoder_calls = 0

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.decoder_calls += 1
        return (z.double() @ self.W.T).to(z.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.encoder_calls += 1
        return (x.double() @ self.W_pinv.T).to(x.dtype)

    def pixel_posterior(self, y, A, sigma: float):
        """The exact posterior of the latent ``z`` given ``y = A W z + sigma e``; pixels are ``W z``."""
        return self.posterior(y, torch.as_tensor(A, dtype=torch.float64) @ self.W, sigma)

    def pixel_posterior_samples(self, y, A, sigma: float, n: int, rng=None) -> torch.Tensor:
        return self.pixel_posterior(y, A, sigma).sample(n, rng) @ self.W.T

    def reset_nfe(self) -> None:
        super().reset_nfe()
        self.encoder_calls = self.decoder_calls = 0


class ImageMixtureLatent(ImageMixturePrior):
    """An image mixture seen as a latent prior behind a fixed linear decoder (``prior=latent_gmm``).

    Latents ``z`` of shape ``(C, H/f, W/f)``; the decoder ``D`` is ``f x f`` nearest-neighbour upsampling (a linear
    map with orthogonal columns of norm ``f``) and the encoder ``E = D^+`` is ``f x f`` average pooling, both torch
    ops on ``(B, C, h, w)`` batches (differentiable; calls counted as in :class:`LinearDecoderGMM`).  Given the pixel
    mixture ``sum_k w_k N(m_k, s^2 I)`` (``means``, ``std``), the latent prior is ``sum_k w_k N(E m_k, (s/f)^2 I)``:
    exactly the law of ``E(x)`` for ``x`` from the pixel mixture (an average of ``f^2`` independent pixels of
    variance ``s^2`` has variance ``s^2 / f^2``), so the decoded prior is that of ``D E x``, the pixel mixture
    projected onto the decoder's range.  The latent denoiser is the exact mixture one in every dialect."""

    name = "latent_image_gmm"

    def __init__(self, means, std: float, factor: int = 2, weights=None, schedule: Optional[Schedule] = None,
                 dialect: str = "vp_discrete"):
        means = torch.as_tensor(means, dtype=torch.float64)
        factor = int(factor)
        if means.ndim != 4 or factor < 1 or means.shape[-1] % factor or means.shape[-2] % factor:
            raise ValueError(f"means must be (K, C, H, W) with H and W multiples of factor={factor}; "
                             f"got {tuple(means.shape)}")
        super().__init__(torch.nn.functional.avg_pool2d(means, factor), float(std) / factor, weights,
                         schedule=schedule, dialect=dialect)
        self.factor, self.pixel_std = factor, float(std)
        self.pixel_shape = tuple(int(v) for v in means.shape[1:])
        self.encoder_calls = self.decoder_calls = 0

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, C, H, W)`` of latents ``z`` (``f x f`` nearest-neighbour upsampling)."""
        self.decoder_calls += 1
        return torch.nn.functional.interpolate(z, scale_factor=self.factor, mode="nearest")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents of pixels ``x``: ``f x f`` average pooling, the decoder's pseudo-inverse."""
        self.encoder_calls += 1
        return torch.nn.functional.avg_pool2d(x, self.factor)

    def reset_nfe(self) -> None:
        super().reset_nfe()
        self.encoder_calls = self.decoder_calls = 0


# ------------------------------------------------------------------------------------------ the tiny model
def make_tiny(folder: Path, seed: int = 0, conditional: bool = False, image_size: int = 64) -> Path:
    """Save a tiny random latent model (AutoencoderKL f4, 4 latent channels; a UNet of ~25k parameters) in the
    diffusers layout, with Stable Diffusion's scheduler config (scaled_linear 0.00085..0.012, epsilon)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel
    from safetensors.torch import save_file

    folder = Path(folder)
    torch.manual_seed(seed)
    ae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                       block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                       sample_size=image_size)
    common = dict(sample_size=image_size // 4, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                  layers_per_block=1, norm_num_groups=4, attention_head_dim=4)
    if conditional:
        net = UNet2DConditionModel(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8, **common)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"embedding": torch.randn(1, 3, 8)}, str(folder / PROMPT_FILE))  # a stand-in "empty prompt"
    else:
        net = UNet2DModel(down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                          up_block_types=("AttnUpBlock2D", "UpBlock2D"), **common)
    ae.save_pretrained(str(folder / "vae"), safe_serialization=True)
    net.save_pretrained(str(folder / "unet"), safe_serialization=True)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
         "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}, indent=2) + "\n")
    return folder


if __name__ == "__main__":  # python -m reddiff.priors.latent --tiny DIR
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", required=True, help="write the tiny random latent model into this folder")
    ap.add_argument("--seed", type=int, default=0)
    print(make_tiny(Path(ap.parse_args().tiny), seed=ap.parse_args().seed))
