"""``deblur_nonlinear``: the bkse kernel-space blur network ("Explore Image Deblurring via Encoded Blur Kernel
Space", Tran et al. CVPR 2021) used as a nonlinear forward operator, as in DPS and RED-diff.

The network is re-implemented here (our code) from the published architecture, with module and parameter names
chosen so that the published ``GOPRO_wVAE.pth`` state dict loads with ``strict=True`` (registry name
``bkse_gopro``; the file is never bundled: a missing file raises :class:`reddiff.core.weights.MissingWeightsError`
naming its path and how to get it).  Only the path the blur generator uses (``adaptKernel``) is implemented:

* ``feature_extractor``: conv3x3(3->nf), LReLU(0.1), two stride-2 conv3x3 with LReLU, ``front_RBs`` residual
  blocks (conv-ReLU-conv + identity, no normalisation);
* ``adapter.model``: a 5-level U-Net (pix2pix ``UnetSkipConnectionBlock`` layout, no normalisation, 4x4 stride-2
  convs / transposed convs, bias only on the outermost transposed conv, Tanh output) whose innermost level
  concatenates the latent blur kernel (``8*nf`` channels at 1/128 of the image size) to its features.  (The
  reference runs its LeakyReLU(0.2) in place, so its skip connections carry ``leaky_relu(x)``; we do the same,
  though the parent's ReLU makes it immaterial.)  Verified: with the same weights, this module and the reference
  ``adaptKernel`` give identical outputs (golden values in tests/test_operators.py);
* ``recon_trunk``: ``back_RBs`` residual blocks, two (conv3x3, PixelShuffle(2), LReLU(0.1)) upsamplers (to ``nf``
  then ``tail_nf = 64`` channels), conv3x3 + LReLU, conv3x3 to 3 channels; the input image is added.

The ``kernel_extractor.*`` weights of the checkpoint (the encoder that infers a kernel from a sharp/blurry pair)
are not used by the blur generator and are skipped when loading.  Images must have a side divisible by 128.

Operator (official RED-diff ``NonlinearBlurOperator``): ``y = clamp(2 G((x+1)/2, k) - 1, -1, 1)`` with a latent
kernel ``k ~ N(0, kernel_std^2)``, ``kernel_std = 1.2``.  The official code redraws ``k`` on every call (a known
defect); here it is drawn **once per image**, seeded by ``(salt, seed, index)``.  ``pinv(y) = y`` (the blurry
image as initialisation; the official ``H_pinv`` re-blurs y with a fresh random kernel).

Note on the official code: it wraps the loaded state dict as ``{'state_dict': sd}`` before
``load_state_dict(..., strict=False)``, which matches no parameter name, so the official RED-diff runs used a
randomly initialised network.  Here loading is strict and a mismatch is an error.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reddiff.operators._common import ImageOpMixin, torch_rng
from reddiff.operators.base import Operator


class ResidualBlockNoBN(nn.Module):
    def __init__(self, nf: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(x)))


class UnetBlock(nn.Module):
    """One level of the kernel adapter U-Net (parameter names as the reference ``UnetSkipConnectionBlock``)."""

    def __init__(self, outer_nc: int, inner_nc: int, input_nc: int | None = None, submodule=None,
                 outermost: bool = False, innermost: bool = False):
        super().__init__()
        self.outermost, self.innermost = outermost, innermost
        input_nc = outer_nc if input_nc is None else input_nc
        downconv = nn.Conv2d(input_nc, inner_nc, kernel_size=4, stride=2, padding=1, bias=False)
        if outermost:
            self.down = nn.Sequential(downconv)
            self.submodule = submodule
            self.up = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, 2, 1), nn.Tanh())
        elif innermost:
            self.down = nn.Sequential(nn.LeakyReLU(0.2), downconv)
            self.up = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, 2, 1, bias=False),
                                    nn.Identity())
        else:
            self.down = nn.Sequential(nn.LeakyReLU(0.2), downconv, nn.Identity())
            self.submodule = submodule
            self.up = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, 2, 1, bias=False),
                                    nn.Identity())

    def forward(self, x, kernel):
        if self.outermost:
            return torch.tanh(self.up[1](F.relu(self.submodule(self.down[0](x), kernel))))
        h = F.leaky_relu(x, 0.2)
        d = self.down[1](h)
        inner = torch.cat((d, kernel), dim=1) if self.innermost else self.submodule(d, kernel)
        return torch.cat((self.up[1](F.relu(inner)), h), dim=1)


class KernelAdapter(nn.Module):
    def __init__(self, nf: int = 64):
        super().__init__()
        block = UnetBlock(nf * 8, nf * 8, innermost=True)
        block = UnetBlock(nf * 4, nf * 8, submodule=block)
        block = UnetBlock(nf * 2, nf * 4, submodule=block)
        block = UnetBlock(nf, nf * 2, submodule=block)
        self.model = UnetBlock(nf, nf, input_nc=nf, submodule=block, outermost=True)

    def forward(self, x, kernel):
        return self.model(x, kernel)


class KernelWizard(nn.Module):
    """The bkse blur generator G(x, k) (``adaptKernel`` path). Defaults: the GOPRO_wVAE configuration."""

    def __init__(self, nf: int = 64, front_RBs: int = 10, back_RBs: int = 20, input_nc: int = 3, tail_nf: int = 64):
        super().__init__()
        self.nf = nf
        lrelu = nn.LeakyReLU(negative_slope=0.1)
        fe = [nn.Conv2d(input_nc, nf, 3, 1, 1), lrelu, nn.Conv2d(nf, nf, 3, 2, 1), lrelu,
              nn.Conv2d(nf, nf, 3, 2, 1), lrelu]
        fe += [ResidualBlockNoBN(nf) for _ in range(front_RBs)]
        self.feature_extractor = nn.Sequential(*fe)
        self.adapter = KernelAdapter(nf)
        rt = [ResidualBlockNoBN(nf) for _ in range(back_RBs)]
        rt += [nn.Conv2d(nf, nf * 4, 3, 1, 1), nn.PixelShuffle(2), lrelu,
               nn.Conv2d(nf, tail_nf * 4, 3, 1, 1), nn.PixelShuffle(2), lrelu,
               nn.Conv2d(tail_nf, tail_nf, 3, 1, 1), lrelu, nn.Conv2d(tail_nf, input_nc, 3, 1, 1)]
        self.recon_trunk = nn.Sequential(*rt)

    @property
    def kernel_channels(self) -> int:
        return 8 * self.nf

    def kernel_shape(self, n: int) -> tuple:
        """Shape of one latent kernel for images of side n (n divisible by 128)."""
        return (self.kernel_channels, n // 128, n // 128)

    def adapt_kernel(self, x01: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """Blur ``x01`` (images in [0, 1]) with latent kernels ``kernel`` (B, 8 nf, n/128, n/128)."""
        return self.recon_trunk(self.adapter(self.feature_extractor(x01), kernel)) + x01


def load_bkse_state_dict(net: KernelWizard, state: dict, source: str = "state dict") -> None:
    """Load a bkse checkpoint into ``net`` strictly (``kernel_extractor.*`` skipped; ``module.`` prefixes and a
    ``{'state_dict': ...}`` wrapper accepted).  Raises ValueError naming the mismatching keys."""
    if isinstance(state, dict) and set(state) == {"state_dict"}:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{source}: expected a state dict, got {type(state).__name__}")
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("kernel_extractor.")}
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise ValueError(
            f"{source} does not match the bkse KernelWizard (GOPRO_wVAE layout): "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(bad)} with other shapes (e.g. {bad[:3]})"
        )
    net.load_state_dict(state, strict=True)


class NonlinearBlur(ImageOpMixin, Operator):
    """``deblur_nonlinear``: bkse blur with a per-image latent kernel (module docstring). y: image shape.

    ``weights`` is a registry name or a path, resolved with :func:`reddiff.core.weights.resolve` at construction;
    ``network`` (a :class:`KernelWizard`) may be passed instead, e.g. for tests with random weights.
    """

    name = "deblur_nonlinear"
    #: the reddiff.core.weights registry entry this operator cannot run without (the registry reports it)
    weights_name = "bkse_gopro"
    per_image = True

    def __init__(self, sigma_y: float = 0.0, weights: str = "bkse_gopro", kernel_std: float = 1.2, seed: int = 0,
                 verify: bool = True, network: KernelWizard | None = None):
        super().__init__(sigma_y=sigma_y)
        kernel_std = float(kernel_std)
        if not kernel_std >= 0:
            raise ValueError(f"deblur_nonlinear: kernel_std must be >= 0, got {kernel_std}")
        self.kernel_std, self.seed = kernel_std, int(seed)
        if network is None:
            from reddiff.core.weights import resolve  # raises MissingWeightsError with the path and how to get it

            path = resolve(weights, verify=verify)
            network = KernelWizard()
            load_bkse_state_dict(network, torch.load(path, map_location="cpu", weights_only=True), source=str(path))
        elif not isinstance(network, KernelWizard):
            raise TypeError(f"deblur_nonlinear: network must be a KernelWizard, got {type(network).__name__}")
        self.net = network.eval().requires_grad_(False)
        self._master = None

    def setup(self, indices, x_shape, device=None, dtype=None):
        B, C, n = self._bind(indices, x_shape, device, dtype, channels=3)
        if n % 128 or n == 0:
            raise ValueError(f"deblur_nonlinear: the bkse network needs an image side divisible by 128, got {n}")
        shape = self.net.kernel_shape(n)
        self._master["kernel"] = torch.stack([
            torch.randn(shape, generator=torch_rng(self.seed, i, "deblur_nonlinear"), dtype=torch.float64)
            * self.kernel_std for i in self.indices])
        return self

    def latent_kernels(self) -> torch.Tensor:
        """(B, 8 nf, n/128, n/128) float64 latent kernels of the bound images."""
        self._require_setup()
        return self._master["kernel"]

    @property
    def y_shape(self) -> tuple:
        self._require_setup()
        return self.x_shape

    def forward(self, x):
        self._check_x(x)
        p = next(self.net.parameters())
        if p.device != x.device or p.dtype != x.dtype:
            self.net.to(device=x.device, dtype=x.dtype)
        out = self.net.adapt_kernel((x + 1.0) / 2.0, self._t("kernel", x))
        return (out * 2.0 - 1.0).clamp(-1.0, 1.0)

    def pinv(self, y):
        self._check_y(y, self.y_shape)
        return y.clone()

    def visualize(self, y):
        self._check_y(y, self.y_shape)
        return y
