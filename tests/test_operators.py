"""Degradation operators: one parametrised file over every task name (float64, 32 and 64 px; bkse at 128 px
with a small randomly initialised network, since its real weights are user-supplied)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from reddiff import registry
from reddiff.operators import LinearOperator, SVDOperator
from reddiff.registry import build_operator, operator_class, task_names
from reddiff.operators.bkse import KernelWizard, NonlinearBlur, load_bkse_state_dict
from reddiff.operators.inpainting import FreeformInpainting, RandomInpainting
from reddiff.operators.motion import MotionBlur
from reddiff.operators.separable import SeparableBlur
from reddiff.core.rng import BatchRNG
from reddiff.core.weights import MissingWeightsError

torch.set_num_threads(1)
DT = torch.float64
RES = (32, 64)
TASK_DIR = registry.conf_dir() / "task"
NEEDS_WEIGHTS = {t: registry.task_info(t)["needs_weights"] for t in task_names() if registry.task_info(t)["needs_weights"]}
SVD_TASKS = [t for t in task_names() if registry.task_info(t)["svd"]]
NONLINEAR_TASKS = [t for t in task_names() if not registry.task_info(t)["linear"]]
IMAGE_TASKS = [t for t in task_names() if t not in NEEDS_WEIGHTS]  # buildable without user files
LINEAR = [t for t in IMAGE_TASKS if t in SVD_TASKS]


def sampler_params(name: str) -> set:
    """Constructor parameters of a registered sampler (what a task's ``hparams.<sampler>`` block may set)."""
    import inspect

    return set(inspect.signature(registry.sampler_class(name).__init__).parameters) - {"self"}


def _x(B, n, seed=0, C=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, n, n, generator=g, dtype=DT) * 2 - 1


def _like(t, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g, dtype=DT)


def make(name, n, indices=(3, 11), **overrides):
    op = build_operator(name, **overrides)
    return op.setup(list(indices), (len(indices), 3, n, n), "cpu", DT)


def small_bkse(seed=0) -> KernelWizard:
    torch.manual_seed(seed)
    net = KernelWizard(nf=4, front_RBs=1, back_RBs=1, tail_nf=4).to(DT)
    with torch.no_grad():  # non-zero biases so that every parameter matters
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    return net


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ------------------------------------------------------------------------------------------- registry
def test_registry_covers_every_yaml():
    assert sorted(p.stem for p in TASK_DIR.glob("*.yaml")) == task_names()
    assert set(SVD_TASKS) | set(NONLINEAR_TASKS) == set(task_names())


@pytest.mark.parametrize("name", task_names())
def test_task_yaml_contract(name):
    raw = OmegaConf.load(TASK_DIR / f"{name}.yaml")
    assert raw.name == name
    cls = operator_class(name)
    assert raw.operator._target_ == f"{cls.__module__}.{cls.__qualname__}"
    assert OmegaConf.to_container(raw.operator)["sigma_y"] == "${task.sigma_y}"
    assert raw.sigma_y == (0.1 if name == "denoise" else 0.0)
    for sampler, params in OmegaConf.to_container(raw.get("hparams") or OmegaConf.create({})).items():
        assert sampler in registry.sampler_names() and set(params) <= sampler_params(sampler), (sampler, params)
    assert issubclass(cls, SVDOperator) == (name in SVD_TASKS)
    assert issubclass(cls, LinearOperator) == (name in SVD_TASKS)
    if name not in NEEDS_WEIGHTS:
        op = build_operator(name, sigma_y=0.05)
        assert isinstance(op, cls) and op.sigma_y == 0.05 and op.noise_std == pytest.approx(0.1)


@pytest.mark.parametrize("name", task_names())
def test_negative_sigma_y_raises(name):
    with pytest.raises(Exception, match="sigma_y must be >= 0"):
        build_operator(name, sigma_y=-0.1)
    kwargs = {"network": small_bkse()} if name in NEEDS_WEIGHTS else {}
    with pytest.raises(ValueError, match="sigma_y must be >= 0"):
        operator_class(name)(sigma_y=float("nan"), **kwargs)


def test_hparams_follow_anchors():
    def hp(name):
        return OmegaConf.to_container(OmegaConf.load(TASK_DIR / f"{name}.yaml").get("hparams", {}))
    assert hp("deblur_gauss")["reddiff"] == {"lr": 0.5, "lam": 0.25} and hp("deblur_gauss")["dps"]["zeta"] == 2.0
    assert hp("sr4")["dps"]["zeta"] == 1.0 and hp("sr4")["pigdm"]["start_t"] == 500
    assert hp("hdr")["dps"]["zeta"] == 0.1 and hp("phase_retrieval")["dps"]["zeta"] == 0.4
    assert hp("deblur_nonlinear")["dps"]["zeta"] == 0.05
    for t in ("inpaint_box", "inpaint_random", "inpaint_freeform"):
        assert hp(t)["dps"]["zeta"] == 0.1
    for t in NONLINEAR_TASKS:
        if operator_class(t).differentiable:  # a black-box task (quantize) has no RED-diff anchor: refused there
            assert hp(t)["reddiff"] == {"lr": 0.5, "lam": 0.25}


@pytest.mark.parametrize("name", IMAGE_TASKS)
def test_visualize_is_image_shaped(name):
    op = make(name, 32)
    x = _x(2, 32)
    v = op.visualize(op.forward(x))
    assert v.shape == x.shape and bool(torch.isfinite(v).all())


def test_indices_optional_only_without_per_image_state():
    assert build_operator("sr4").setup(None, (2, 3, 32, 32)).forward(_x(2, 32)).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="drawn per image index"):
        build_operator("inpaint_freeform").setup(None, (2, 3, 32, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", IMAGE_TASKS)
def test_cuda_matches_cpu(name):
    x = _x(2, 64)
    cpu = make(name, 64)
    for dt, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        gpu = build_operator(name).setup([3, 11], x.shape, "cuda", dt)
        xg = x.to("cuda", dt)
        y = gpu.forward(xg)
        assert y.device.type == "cuda" and y.dtype == dt
        assert rel(y.double().cpu(), cpu.forward(x)) < tol
        assert rel(gpu.pinv(y).double().cpu(), cpu.pinv(cpu.forward(x))) < 100 * tol
        if name in SVD_TASKS:
            assert rel(gpu.V(gpu.Vt(xg)).double().cpu(), x) < tol
            assert rel(gpu.U(gpu.Ut(y)).double().cpu(), y.double().cpu()) < tol


# ------------------------------------------------------------------------------------------- linear algebra
@pytest.mark.parametrize("n", RES)
@pytest.mark.parametrize("name", LINEAR)
def test_adjoint(name, n):
    op = make(name, n)
    x = _x(2, n)
    y = op.forward(x)
    v = _like(y)
    err = abs(float((y * v).sum() - (x * op.adjoint(v)).sum())) / float(y.norm() * v.norm())
    assert err < 1e-10


@pytest.mark.parametrize("n", RES)
@pytest.mark.parametrize("name", LINEAR)
def test_pseudo_inverse(name, n):
    op = make(name, n)
    x = _x(2, n)
    y = op.forward(x)
    assert rel(op.forward(op.pinv(y)), y) < 1e-8  # H H+ H x = H x
    p = op.pinv(_like(y))
    assert rel(op.pinv(op.forward(p)), p) < 1e-8  # H+ H H+ = H+
    # the direct versions agree with the SVD ones of the base class
    assert rel(op.pinv(y), SVDOperator.pinv(op, y)) < 1e-10
    assert rel(op.adjoint(y), SVDOperator.adjoint(op, y)) < 1e-10


@pytest.mark.parametrize("n", RES)
@pytest.mark.parametrize("name", LINEAR)
def test_svd(name, n):
    op = make(name, n)
    B, N, M = 2, 3 * n * n, op.y_numel()
    x = _x(B, n)
    y = op.forward(x)
    assert y.shape[0] == B and y[0].numel() == M
    s = op.singulars()
    k = s.shape[-1]
    assert s.dim() in (1, 2) and (s.dim() == 1 or s.shape[0] == B) and k <= min(N, M)
    assert bool((s >= 0).all()) and bool((s > 0).any())
    assert rel(SVDOperator.forward(op, x), y) < 1e-12  # U diag(s) Vt x = H x
    z = op.Vt(x)
    assert z.shape == (B, N)
    assert rel(op.V(z), x) < 1e-12  # V Vt x = x
    w = _like(z)
    assert rel(op.Vt(op.V(w)), w) < 1e-12  # Vt V z = z
    assert op.Ut(y).shape == (B, M)
    assert rel(op.U(op.Ut(y)), y) < 1e-12
    u = torch.randn(B, M, dtype=DT)
    assert rel(op.Ut(op.U(u)), u) < 1e-12
    assert op.U(u).shape == y.shape and op.V(w).shape == x.shape


# ------------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("n", RES)
@pytest.mark.parametrize("name", IMAGE_TASKS)
def test_batch_equals_loop(name, n):
    idx = [5, 0, 9]
    x = _x(3, n, seed=2)
    op = make(name, n, idx, sigma_y=0.05)
    y = op.forward(x)
    ym = op.measure(x, BatchRNG.for_images(7, idx))
    outs = {"y": y, "ym": ym, "pinv": op.pinv(ym)}
    if name in SVD_TASKS:
        outs.update(adj=op.adjoint(ym), Vt=op.Vt(x), Ut=op.Ut(y))
        s = op.singulars()
        outs["s"] = s if s.dim() == 2 else s.expand(3, -1)
    for j, i in enumerate(idx):
        one = make(name, n, [i], sigma_y=0.05)
        xi = x[j:j + 1]
        yi = one.forward(xi)
        ymi = one.measure(xi, BatchRNG.for_images(7, [i]))
        ref = {"y": yi, "ym": ymi, "pinv": one.pinv(ymi)}
        if name in SVD_TASKS:
            ref.update(adj=one.adjoint(ymi), Vt=one.Vt(xi), Ut=one.Ut(yi))
            s1 = one.singulars()
            ref["s"] = s1 if s1.dim() == 2 else s1[None]
        for key, val in ref.items():
            assert torch.allclose(outs[key][j:j + 1], val, rtol=0, atol=1e-12), (key, i)


# ------------------------------------------------------------------------------------------- nonlinear
def _check_gradient(op, x):
    y = op.forward(_x(x.shape[0], x.shape[-1], seed=5)).detach()

    def loss(t):
        return ((y - op.forward(t)) ** 2).sum()

    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(xg), xg)
    assert float(grad.norm()) > 0
    h = 1e-6
    for seed in (11, 12):
        v = _like(x, seed)
        fd = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
        an = (grad * v).sum()
        assert abs(float(fd - an)) <= 1e-6 * max(1.0, abs(float(an))), (float(fd), float(an))


@pytest.mark.parametrize("n", RES)
@pytest.mark.parametrize("name", ["phase_retrieval", "hdr"])
def test_nonlinear_gradient(name, n):
    op = make(name, n)
    _check_gradient(op, _x(2, n, seed=3) * 0.9)


def test_bkse_gradient_and_batch():
    net = small_bkse()
    op = NonlinearBlur(network=net, seed=0).setup([4, 1], (2, 3, 128, 128), "cpu", DT)
    x = _x(2, 128, seed=3) * 0.5
    _check_gradient(op, x)
    y = op.forward(x)
    assert y.shape == x.shape and rel(y, x) > 1e-4  # it does blur
    assert torch.equal(op.pinv(y), y)
    for j, i in enumerate([4, 1]):
        one = NonlinearBlur(network=net, seed=0).setup([i], (1, 3, 128, 128), "cpu", DT)
        assert torch.equal(one.latent_kernels()[0], op.latent_kernels()[j])
        assert torch.allclose(one.forward(x[j:j + 1]), y[j:j + 1], rtol=0, atol=1e-12)
    k = op.latent_kernels()
    assert k.shape == (2, 32, 1, 1) and not torch.equal(k[0], k[1])
    assert 0.8 < float(k.std()) < 1.6  # N(0, 1.2^2)


# ------------------------------------------------------------------------------------------- per-image state
def test_masks_and_kernels_deterministic_per_index():
    n = 64
    shape = (1, 3, n, n)
    for cls, get in ((RandomInpainting, lambda o: o.mask()), (FreeformInpainting, lambda o: o.mask()),
                     (MotionBlur, lambda o: o.kernels())):
        a = get(cls().setup([17], shape, "cpu", DT))
        b = get(cls().setup([17], shape, "cpu", DT))
        c = get(cls().setup([18], shape, "cpu", DT))
        d = get(cls(seed=1).setup([17], shape, "cpu", DT))
        assert torch.equal(a, b), cls.__name__
        assert not torch.equal(a, c) and not torch.equal(a, d), cls.__name__
        # the same in float32 (masks/kernels are generated in float64 numpy)
        e = get(cls().setup([17], shape, "cpu", torch.float32))
        assert torch.equal(e.double(), a.double()), cls.__name__


@pytest.mark.parametrize("n", [64, 256])
def test_freeform_coverage(n):
    op = FreeformInpainting().setup(list(range(100)), (100, 3, n, n), "cpu", torch.float32)
    cov = 1.0 - op.mask().double().mean(dim=(1, 2, 3))
    assert float(cov.min()) >= 0.20 and float(cov.max()) <= 0.30
    assert float(cov.std()) > 0.01  # the coverage varies over the range


def test_random_and_box_masks():
    op = RandomInpainting(ratio=0.25).setup([0, 1], (2, 3, 64, 64), "cpu", DT)
    assert (op.mask() == 0).sum(dim=(1, 2, 3)).tolist() == [1024, 1024]
    op = RandomInpainting().setup(list(range(20)), (20, 3, 32, 32), "cpu", DT)
    miss = 1 - op.mask().mean(dim=(1, 2, 3))
    assert float(miss.min()) >= 0.3 - 1e-3 and float(miss.max()) <= 0.7 and float(miss.std()) > 0.02
    with pytest.raises(ValueError, match="ratio"):
        RandomInpainting(ratio=[0.7, 0.3])
    box = make("inpaint_box", 256, [0])
    m = box.mask()[0, 0]
    assert float((1 - m).sum()) == 128 * 128 and float(m[64:192, 64:192].sum()) == 0
    assert box.singulars().shape == (3 * 256 * 256,)  # shared mask: (k,)


def test_motion_kernels():
    op = MotionBlur().setup(list(range(8)), (8, 3, 32, 32), "cpu", DT)
    k = op.kernels()
    assert k.shape == (8, 61, 61) and bool((k >= 0).all())
    assert torch.allclose(k.sum(dim=(1, 2)), torch.ones(8, dtype=DT))
    ext = [(kk > 1e-3 * kk.max()).nonzero() for kk in k]
    span = torch.tensor([float((e.max(0).values - e.min(0).values).max()) for e in ext])
    assert float(span.min()) >= 10 and float(span.max()) <= 60  # real trajectories, inside the 61x61 support
    straight = MotionBlur(intensity=0.0).kernel(3)
    rows = (straight > 1e-3 * straight.max()).sum()
    assert rows < 0.2 * (straight > 0).size  # a straight line is thin


def test_inpainting_noise_only_on_observed():
    op = make("inpaint_freeform", 64, [2, 3], sigma_y=0.1)
    x = _x(2, 64)
    y = op.measure(x, BatchRNG.for_images(0, [2, 3]))
    m = op.mask().expand_as(x)
    assert bool((y[m == 0] == 0).all())
    noise = (y - x)[m == 1]
    assert abs(float(noise.std()) - 0.2) < 0.01


def test_denoise_noise_level():
    op = make("denoise", 64, [0, 1])
    x = _x(2, 64)
    e = op.measure(x, BatchRNG.for_images(0, [0, 1])) - op.forward(x)
    assert abs(float(e.std()) - 0.2) < 0.006 and abs(float(e.mean())) < 0.01


# ------------------------------------------------------------------------------------------- references
def test_sr4_is_block_average():
    op = make("sr4", 64)
    x = _x(2, 64)
    assert rel(op.forward(x), F.avg_pool2d(x, 4)) < 1e-13
    assert torch.allclose(op.singulars(), torch.full((3 * 16 * 16,), 0.25, dtype=DT))
    assert op.visualize(op.forward(x)).shape == x.shape


def test_sr4_bicubic_matches_antialiased_bicubic_inside():
    op = make("sr4_bicubic", 64, svd_cutoff=0.0)
    x = _x(2, 64)
    ref = F.interpolate(x, scale_factor=0.25, mode="bicubic", antialias=True, align_corners=False)
    assert rel(op.forward(x)[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2]) < 1e-6
    default = make("sr4_bicubic", 64)  # the official 3e-2 cutoff removes nothing here
    assert rel(default.forward(x), op.forward(x)) < 1e-12


def test_gauss_dps_matches_scipy():
    op = make("deblur_gauss_dps", 64, svd_cutoff=0.0)
    x = _x(1, 64)
    ref = torch.from_numpy(scipy.ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, 3.0, 3.0), mode="mirror", truncate=4.0))
    assert rel(op.forward(x), ref) < 1e-10
    cut = make("deblur_gauss_dps", 64)  # truncated: removed components have gain < 0.03
    assert 1e-8 * float(x.norm()) < float((cut.forward(x) - ref).norm()) <= 0.03 * float(x.norm())


@pytest.mark.parametrize("window", ["full", "ddrm"])
@pytest.mark.parametrize("name", ["deblur_gauss", "deblur_uniform"])
def test_official_blur_matrices(name, window):
    op = make(name, 32, window=window, svd_cutoff=0.0)
    k = torch.from_numpy(op.taps.copy())
    r = len(k) // 2
    if window == "ddrm":  # the official window [i - r, i + r) drops the last tap
        k[-1] = 0.0
    w = torch.outer(k, k)[None, None].expand(3, 1, -1, -1)
    x = _x(2, 32)
    ref = F.conv2d(x, w, padding=r, groups=3)
    assert rel(op.forward(x), ref) < 1e-12


def test_official_gauss_kernel():
    op = build_operator("deblur_gauss")
    pdf = np.exp(-0.5 * (np.arange(-2, 3) / 25.0) ** 2)
    assert np.allclose(op.taps, pdf / pdf.sum(), rtol=0, atol=1e-15)
    assert op.window == "ddrm" and op.boundary == "zero" and op.svd_cutoff == 0.03


def test_motion_blur_is_circular_convolution():
    op = make("deblur_motion", 64, [6], svd_cutoff=0.0)
    x = _x(1, 64)
    k = op.kernels()[0].flip(0, 1)[None, None].expand(3, 1, -1, -1)
    ref = F.conv2d(F.pad(x, (30, 30, 30, 30), mode="circular"), k, groups=3)
    assert rel(op.forward(x), ref) < 1e-12
    trunc = make("deblur_motion", 64, [6])
    err = float((trunc.forward(x) - ref).norm())
    assert 0 < err <= 0.03 * float(x.norm())  # only components with gain < svd_cutoff = 0.03 are removed
    s = trunc.singulars()
    assert 0.1 < float((s == 0).double().mean()) < 0.5 and float(s[s > 0].min()) >= 0.03


def test_colorization_and_hdr_and_phase():
    x = _x(2, 32)
    col = make("colorization", 32)
    assert rel(col.forward(x), x.mean(dim=1, keepdim=True)) < 1e-15
    assert torch.allclose(col.singulars(), torch.full((32 * 32,), 1 / math.sqrt(3), dtype=DT))
    hdr = make("hdr", 32)
    assert torch.equal(hdr.forward(x), (2 * x).clamp(-1, 1)) and torch.equal(hdr.pinv(x), x / 2)
    pr = make("phase_retrieval", 256, [0])
    assert pr.pad == 64 and pr.y_shape == (3, 384, 384)
    pr = make("phase_retrieval", 32)
    y = pr.forward(x)
    assert y.shape == (2, 3, 48, 48) and bool((y >= 0).all())
    assert rel(y.pow(2).sum(dim=(2, 3)), x.pow(2).sum(dim=(2, 3))) < 1e-12  # Parseval (ortho FFT)
    ref = np.fft.fftshift(np.abs(np.fft.fft2(np.pad(x.numpy(), ((0, 0), (0, 0), (8, 8), (8, 8))))), axes=(2, 3)) / 48
    assert rel(y, torch.from_numpy(ref)) < 1e-12  # centred spectrum magnitude
    p = pr.pinv(y)
    assert p.shape == x.shape and bool((p >= 0).all())


# ------------------------------------------------------------------------------------------- errors
def test_setup_and_shape_errors():
    with pytest.raises(ValueError, match="square"):
        build_operator("sr4").setup([0], (1, 3, 32, 16))
    with pytest.raises(ValueError, match="divisible by the factor 4"):
        build_operator("sr4").setup([0], (1, 3, 30, 30))
    with pytest.raises(ValueError, match="3 channels"):
        build_operator("colorization").setup([0], (1, 1, 32, 32))
    with pytest.raises(ValueError, match="2 indices for a batch of 1"):
        build_operator("hdr").setup([0, 1], (1, 3, 32, 32))
    with pytest.raises(RuntimeError, match="call setup"):
        build_operator("deblur_motion").forward(_x(1, 32))
    op = make("inpaint_random", 32, [0, 1])
    with pytest.raises(ValueError, match="batch of 2"):
        op.forward(_x(3, 32))
    with pytest.raises(ValueError, match="shape"):
        op.forward(_x(2, 64))
    with pytest.raises(ValueError, match="divisible by 128"):
        NonlinearBlur(network=small_bkse()).setup([0], (1, 3, 64, 64))
    with pytest.raises(ValueError, match="boundary"):
        SeparableBlur(boundary="mirror")


def test_bkse_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("REDDIFF_HOME", str(tmp_path))
    monkeypatch.delenv("REDDIFF_BKSE", raising=False)
    with pytest.raises(MissingWeightsError, match="GOPRO_wVAE.pth not found at .*blur-kernel-space-exploring"):
        build_operator("deblur_nonlinear")
    with pytest.raises(MissingWeightsError, match=str(tmp_path)):
        NonlinearBlur()


def test_bkse_checkpoint_layout(tmp_path, monkeypatch):
    net = KernelWizard()
    sd = net.state_dict()
    # layout read in the reference implementation (GOPRO_wVAE: nf 64, 10 front / 20 back residual blocks)
    expect = {
        "feature_extractor.0.weight": (64, 3, 3, 3), "feature_extractor.15.conv2.bias": (64,),
        "adapter.model.down.0.weight": (64, 64, 4, 4), "adapter.model.up.1.bias": (64,),
        "adapter.model.submodule.submodule.submodule.submodule.down.1.weight": (512, 512, 4, 4),
        "adapter.model.submodule.submodule.submodule.submodule.up.1.weight": (1024, 512, 4, 4),
        "recon_trunk.19.conv1.weight": (64, 64, 3, 3), "recon_trunk.20.weight": (256, 64, 3, 3),
        "recon_trunk.23.weight": (256, 64, 3, 3), "recon_trunk.26.weight": (64, 64, 3, 3),
        "recon_trunk.28.weight": (3, 64, 3, 3),
    }
    for key, shape in expect.items():
        assert tuple(sd[key].shape) == shape, key
    assert len(sd) == 145 and "adapter.model.submodule.submodule.submodule.submodule.up.1.bias" not in sd
    # a checkpoint with the extractor, a DataParallel prefix and a wrapper loads; a broken one is refused
    ckpt = {"module." + k: v.clone() + 0.01 for k, v in sd.items()}
    ckpt["module.kernel_extractor.model.1.weight"] = torch.zeros(64, 128, 7, 7)
    other = KernelWizard()
    load_bkse_state_dict(other, {"state_dict": ckpt})
    assert torch.equal(other.state_dict()["recon_trunk.28.weight"], sd["recon_trunk.28.weight"] + 0.01)
    bad = {k: v for k, v in sd.items() if not k.startswith("recon_trunk.28")}
    with pytest.raises(ValueError, match="2 missing"):
        load_bkse_state_dict(KernelWizard(), bad)
    # through the registry: a file at $REDDIFF_BKSE is found and loaded with weights_only=True
    path = tmp_path / "GOPRO_wVAE.pth"
    torch.save(sd, path)
    monkeypatch.setenv("REDDIFF_BKSE", str(path))
    op = build_operator("deblur_nonlinear")
    assert torch.equal(op.net.state_dict()["adapter.model.down.0.weight"], sd["adapter.model.down.0.weight"])


def test_bkse_matches_reference_values():
    """Golden values computed once with the reference bkse ``KernelWizard.adaptKernel`` (VinAIResearch
    blur-kernel-space-exploring, run read-only outside this repo) for deterministic weights, input and kernel."""
    net = KernelWizard(nf=4, front_RBs=1, back_RBs=1, tail_nf=64).to(DT)
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(net.named_parameters())):
            fan = p[0].numel() if p.dim() > 1 else 1
            vals = torch.sin(0.37 * torch.arange(p.numel(), dtype=DT) + i)
            p.copy_((vals / math.sqrt(fan)).reshape(p.shape) * (1.0 if p.dim() > 1 else 0.05))
    g = torch.linspace(0, 1, 128, dtype=DT)
    x = torch.stack([torch.outer(g, 1 - g), torch.outer(g.sin(), g), torch.outer(1 - g, g.cos())])[None]
    k = torch.cos(torch.arange(32, dtype=DT))[None, :, None, None] * 1.2
    with torch.no_grad():
        out = net.adapt_kernel(x, k)
    assert float(out.sum()) == pytest.approx(14197.213608610831, rel=1e-9)
    assert float((out - x).abs().sum()) == pytest.approx(893.5617070981666, rel=1e-9)
    ref_px = [0.21764301156247462, 0.23082306140798567, 0.4446002026847349]
    assert out[0, :, 64, 64].tolist() == pytest.approx(ref_px, rel=1e-9)
