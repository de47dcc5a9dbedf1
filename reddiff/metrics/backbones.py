"""The metric networks, built by their own libraries and filled from a state dict (never downloaded here).

Each ``build_*`` takes the state dict of the registry file (``torch.load`` of the path that
:func:`reddiff.core.weights.resolve` returned and hash-checked):

* LPIPS (``lpips`` package): the package's own calibrated linear layers (``lpips/weights/v0.1/<net>.pth``,
  shipped inside the package) on a torchvision trunk.  ``lpips.LPIPS(pnet_rand=True)`` builds the trunk
  without downloading; the trunk is then filled from the torchvision file (``features.*`` keys of
  ``alexnet-owt-7be5be79.pth`` / ``vgg16-397923af.pth``), which is the file torchvision itself would load.
* FID Inception (``clean-fid``, ``legacy_pytorch`` mode): ``cleanfid.features.feature_extractor(
  "pytorch_inception")``, the extractor clean-fid's legacy_pytorch mode uses.  clean-fid would fetch
  ``pt_inception-2015-12-05-6726825d.pth`` with ``load_state_dict_from_url`` (cache
  ``$TORCH_HOME/hub/checkpoints``); we hand it the registry's state dict instead, so nothing is downloaded.
* ResNet-50 (torchvision, ``IMAGENET1K_V1``): ``torchvision.models.resnet50(weights=None)`` filled from
  ``resnet50-0676ba61.pth``.

Tests may hand these functions the state dict of a randomly initialised network of the same
architecture, which exercises exactly this code; the suite never does so by itself.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Mapping

import torch


@contextlib.contextmanager
def _quiet():
    """Silence torchvision's "'pretrained' is deprecated" warnings raised inside lpips and clean-fid."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        yield


def build_lpips(net: str, trunk_state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """``lpips.LPIPS`` (v0.1, calibrated linear layers) with its trunk loaded from a torchvision state dict."""
    import lpips

    with _quiet():
        model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    # lpips' slices hold torchvision's `features[i]` modules under the name str(i)
    mapped = {}
    for sname, sl in model.net.named_children():
        for idx, mod in sl.named_children():
            for pname in mod.state_dict():
                src = f"features.{idx}.{pname}"
                if src not in trunk_state:
                    raise KeyError(f"LPIPS-{net} trunk: {src} not in the state dict (not a torchvision {net} file?)")
                mapped[f"{sname}.{idx}.{pname}"] = trunk_state[src]
    model.net.load_state_dict(mapped, strict=True)
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def _clean_fid_weights(state: Mapping[str, torch.Tensor]):
    """Make clean-fid's FID-Inception constructor take ``state`` instead of downloading its weights."""
    import cleanfid.inception_pytorch as ip

    orig = ip.load_state_dict_from_url

    def from_registry(url, *args, **kwargs):
        if url != ip.FID_WEIGHTS_URL:
            raise RuntimeError(f"clean-fid asked for {url}; only {ip.FID_WEIGHTS_URL} is served from the registry")
        return dict(state)

    ip.load_state_dict_from_url = from_registry
    try:
        yield
    finally:
        ip.load_state_dict_from_url = orig


def build_fid_inception(state: Mapping[str, torch.Tensor], device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """clean-fid's legacy_pytorch feature extractor: (B,3,299,299) float in [0,255] -> (B,2048) pool3 features."""
    from cleanfid.features import feature_extractor

    with _clean_fid_weights(state), _quiet():
        return feature_extractor(name="pytorch_inception", device=device, use_dataparallel=False)


def build_resnet50(state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """torchvision ResNet-50 with the IMAGENET1K_V1 state dict: normalised (B,3,224,224) -> (B,1000) logits."""
    import torchvision

    model = torchvision.models.resnet50(weights=None)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def resnet50_preprocess(normalize_only: bool = False):
    """torchvision's own IMAGENET1K_V1 preprocessing: resize 256 (bilinear, antialias), centre-crop 224,
    ImageNet mean/std.  Applied to float tensors in [0, 1].  ``normalize_only``: only the mean/std step, as the
    official RED-diff top-1 evaluation (``transform=ca_cropped``: ToTensor + Normalize on the 256 px PNG)."""
    import torchvision

    if normalize_only:
        return torchvision.transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    return torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()


def load_state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
