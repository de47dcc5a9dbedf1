"""Metrics: PSNR/SSIM against scikit-image, KID against clean-fid, LPIPS against torchmetrics, the set-level
metrics end to end with small random backbones injected through the suite's own code path (test only),
missing weights reported with the fetch command, and real-weight checks when the files are in the cache."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torchvision

from reddiff.data import DemoDataset
from reddiff.metrics import MetricSuite
from reddiff.metrics import backbones, setlevel
from reddiff.core.weights import REGISTRY

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def demo() -> torch.Tensor:
    d = DemoDataset()
    return torch.stack([d.load(e) for e in d.entries()])  # (12,3,64,64) in [-1,1]


@pytest.fixture(scope="module")
def degraded(demo):
    """Real image pairs: demo images vs noisy (sigma 0.05 and 0.2 in [0,1] units) and Gaussian-blurred copies."""
    g = torch.Generator().manual_seed(0)
    noisy = (demo + 2 * 0.05 * torch.randn(demo.shape, generator=g)).clamp(-1, 1)
    very_noisy = (demo + 2 * 0.2 * torch.randn(demo.shape, generator=g)).clamp(-1, 1)
    blurred = torchvision.transforms.functional.gaussian_blur(demo, kernel_size=7, sigma=1.5)
    return {"noisy": noisy, "very_noisy": very_noisy, "blurred": blurred}


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    """Empty weight caches, so the result does not depend on what this machine has downloaded."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("REDDIFF_HOME", str(tmp_path / "reddiff"))
    for spec in REGISTRY.values():
        if spec.env:
            monkeypatch.delenv(spec.env, raising=False)
    return tmp_path


class SmallInception(torch.nn.Module):
    """TEST ONLY stand-in for the FID Inception: (B,3,299,299) in [0,255] -> (B,16) non-negative features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 16, 13, stride=13)
        self.calls = 0

    def forward(self, x):
        assert x.shape[1:] == (3, 299, 299) and x.min() >= 0 and x.max() <= 255
        self.calls += x.shape[0]
        return torch.relu(self.conv(x / 255.0)).mean(dim=(2, 3))


class SmallClassifier(torch.nn.Module):
    """TEST ONLY stand-in for ResNet-50: normalised (B,3,224,224) -> (B,1000) logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv = torch.nn.Conv2d(3, 8, 16, stride=16)
        self.fc = torch.nn.Linear(8, 1000)

    def forward(self, x):
        assert x.shape[1:] == (3, 224, 224)
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def small_suite(names, **kw):
    torch.manual_seed(0)
    tb = {"alexnet": torchvision.models.alexnet(weights=None), "inception_fid": SmallInception(),
          "resnet50": SmallClassifier()}
    return MetricSuite(names=names, device="cpu", _test_backbones=tb, **kw)


# ---------------------------------------------------------------------------------------------- PSNR / SSIM
def test_psnr_ssim_match_scikit_image(demo, degraded):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    suite = MetricSuite(names=["psnr", "ssim"], device="cpu")
    assert suite.missing == {}
    worst_psnr = worst_ssim = 0.0
    v = {}
    for name, x_hat in degraded.items():
        vals = v[name] = suite.per_image(x_hat, demo)
        assert set(vals) == {"psnr", "ssim"} and vals["psnr"].shape == (12,)
        for i in range(len(demo)):
            a = ((x_hat[i] + 1) / 2).permute(1, 2, 0).double().numpy()
            b = ((demo[i] + 1) / 2).permute(1, 2, 0).double().numpy()
            p_ref = peak_signal_noise_ratio(b, a, data_range=1.0)
            s_ref = structural_similarity(b, a, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, K1=0.01, K2=0.03)
            worst_psnr = max(worst_psnr, abs(float(vals["psnr"][i]) - p_ref))
            worst_ssim = max(worst_ssim, abs(float(vals["ssim"][i]) - s_ref))
    print(f"max |PSNR - skimage| = {worst_psnr:.2e} dB, max |SSIM - skimage| = {worst_ssim:.2e}")
    assert worst_psnr < 1e-4 and worst_ssim < 1e-4
    # the pairs are genuinely different images, in the expected order of quality
    assert v["noisy"]["psnr"].mean() > v["very_noisy"]["psnr"].mean() + 6
    assert v["noisy"]["ssim"].mean() > v["very_noisy"]["ssim"].mean()


def test_psnr_is_per_image_then_mean(demo, degraded):
    suite = MetricSuite(names=["psnr"], device="cpu")
    batch = suite.per_image(degraded["noisy"], demo)["psnr"]
    single = torch.cat([suite.per_image(degraded["noisy"][i:i + 1], demo[i:i + 1])["psnr"] for i in range(12)])
    assert torch.allclose(batch, single)
    mse = (((degraded["noisy"] + 1) / 2 - (demo + 1) / 2) ** 2).double().mean(dim=(1, 2, 3))
    assert torch.allclose(batch.double(), 10 * torch.log10(1 / mse), atol=1e-4)


# ---------------------------------------------------------------------------------------------- KID
def _feats(rng, n, d=64, shift=0.0):
    """Non-negative, correlated features (like pool3 activations)."""
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return np.maximum(rng.normal(size=(n, d)) @ a + 0.3 + shift, 0)


def test_kid_equals_clean_fid_kernel_distance():
    from cleanfid.fid import kernel_distance

    rng = np.random.default_rng(0)
    x, y = _feats(rng, 40), _feats(rng, 40, shift=0.2)
    # n <= subset size: every subset is the whole set; clean-fid's 100 draws give one value
    ours = setlevel.kid(x, y)
    ref = kernel_distance(x, y)  # clean-fid defaults: 100 subsets of <= 1000
    assert ours["mean"] == pytest.approx(1e3 * ref, rel=1e-10)
    # n > subset size: random subsets; same seed -> the very same draws
    x, y = _feats(rng, 60), _feats(rng, 60, shift=0.2)
    before = np.random.get_state()[1].copy()
    ours = setlevel.kid(x, y, num_subsets=10, max_subset_size=25, seed=3)
    assert np.array_equal(np.random.get_state()[1], before)  # global RNG left as it was
    np.random.seed(3)
    assert ours["mean"] == 1e3 * kernel_distance(x, y, num_subsets=10, max_subset_size=25)


def test_kid_jackknife_is_leave_one_pair_out_of_clean_fid():
    from cleanfid.fid import kernel_distance

    rng = np.random.default_rng(1)
    x, y = _feats(rng, 15), _feats(rng, 15, shift=0.1)
    jk = setlevel.kid_jackknife(x, y)
    assert jk["full"] == pytest.approx(kernel_distance(x, y), rel=1e-10)
    brute = [kernel_distance(np.delete(x, i, 0), np.delete(y, i, 0), num_subsets=1) for i in range(15)]
    assert np.allclose(jk["loo"], brute, rtol=1e-10)


def test_kid_of_a_set_against_itself():
    """The paired unbiased estimate of a set against itself is exactly 0 with a zero standard error; clean-fid's
    estimator (the reported number) is biased low on paired sets by exactly -(2/n)(mean k(x,x) - mean k(x,x'))."""
    rng = np.random.default_rng(2)
    x = _feats(rng, 50)
    r = setlevel.kid(x, x)
    assert r["paired_unbiased"] == pytest.approx(0.0, abs=1e-9) and abs(r["paired_unbiased"]) <= r["paired_unbiased_ci95"] + 1e-9
    k = (x @ x.T / x.shape[1] + 1) ** 3
    n = len(x)
    closed = -(2 / n) * (np.diag(k).mean() - (k.sum() - np.trace(k)) / (n * (n - 1)))
    assert r["mean"] == pytest.approx(1e3 * closed, rel=1e-9) and r["mean"] < 0
    print(f"self-KID x1e3: clean-fid {r['mean']:.3f} +- {r['ci95']:.3f}, paired unbiased {r['paired_unbiased']:.2e}")


def test_kid_interval_is_calibrated():
    """Independent draws of one distribution: 0 inside the 95% interval in most trials; a shifted distribution:
    KID above its interval every time."""
    rng = np.random.default_rng(3)
    covered, detected = 0, 0
    trials = 20
    for _ in range(trials):
        a = rng.normal(size=(32, 32)) / np.sqrt(32)
        draw = lambda s: np.maximum(rng.normal(size=(80, 32)) @ a + 0.3 + s, 0)  # noqa: E731
        same = setlevel.kid(draw(0.0), draw(0.0))
        covered += abs(same["mean"]) <= same["ci95"]
        shifted = setlevel.kid(draw(0.0), draw(0.3))
        detected += shifted["mean"] > shifted["ci95"]
    print(f"same distribution: 0 inside the 95% CI in {covered}/{trials}; shift detected in {detected}/{trials}")
    assert covered >= 16 and detected == trials


# ---------------------------------------------------------------------------------------------- LPIPS
def test_lpips_matches_torchmetrics_correct_and_official_compat(demo, degraded):
    """Correct mode = torchmetrics LPIPS with normalize=True on [0,1]; compat mode = the official script
    (torchmetrics LPIPS, normalize=False, fed [0,1]); same random trunk in all, calibrated linear layers."""
    from torchmetrics.functional.image.lpips import _LPIPS

    torch.manual_seed(0)
    alex = torchvision.models.alexnet(weights=None)
    correct = MetricSuite(names=["lpips"], device="cpu", _test_backbones={"alexnet": alex})
    compat = MetricSuite(names=["lpips"], device="cpu", lpips_compat=True, _test_backbones={"alexnet": alex})
    x_hat = degraded["noisy"]
    ours, ours_compat = correct.per_image(x_hat, demo)["lpips"], compat.per_image(x_hat, demo)["lpips"]

    tm = _LPIPS(pretrained=True, net="alex", pnet_rand=True).eval()
    net = correct._net("alexnet")
    tm.net.load_state_dict(net.net.state_dict())
    for k, v in tm.state_dict().items():  # the linear layers ship with both packages: identical
        assert torch.equal(v, net.state_dict()[k]), k
    a, b = (x_hat + 1) / 2, (demo + 1) / 2
    with torch.no_grad():
        ref = tm(a, b, normalize=True).reshape(-1)
        ref_official = tm(a, b, normalize=False).reshape(-1)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(ours_compat, ref_official, atol=1e-6)
    assert not torch.allclose(ours, ours_compat, atol=1e-3)
    print(f"LPIPS (random trunk) correct {ours.mean():.4f} vs official-compat {ours_compat.mean():.4f}")


def test_lpips_distance_properties(demo, degraded):
    suite = small_suite(["lpips"])
    same = suite.per_image(demo, demo)["lpips"]
    assert same.abs().max() < 1e-6
    mild, strong = (suite.per_image(degraded[k], demo)["lpips"] for k in ("noisy", "very_noisy"))
    assert (mild > 0).all() and strong.mean() > mild.mean()
    batched = suite.per_image(degraded["noisy"][:5], demo[:5])["lpips"]
    one = torch.cat([suite.per_image(degraded["noisy"][i:i + 1], demo[i:i + 1])["lpips"] for i in range(5)])
    assert torch.allclose(batched, one, atol=1e-6)


def test_lpips_vgg_trunk_loads_through_the_same_builder(demo, degraded):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}
    suite = MetricSuite(names=["lpips"], lpips_net="vgg", device="cpu", _test_backbones={"vgg16": state})
    net = suite._net("vgg16")
    assert torch.equal(getattr(net.net.slice5, "28").weight, state["features.28.weight"])
    v = suite.per_image(degraded["noisy"][:2], demo[:2])["lpips"]
    assert v.shape == (2,) and (v > 0).all()
    assert suite.per_image(demo[:2], demo[:2])["lpips"].abs().max() < 1e-6


def test_lpips_builder_rejects_a_non_torchvision_file():
    with pytest.raises(KeyError, match="features.0.weight"):
        backbones.build_lpips("alex", {"conv.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------- set level end to end
def test_kid_fid_top1_end_to_end_with_small_backbones(demo, degraded):
    suite = small_suite(["psnr", "ssim", "lpips", "kid", "fid", "top1", "top5"])
    assert suite.missing == {}
    # as the runner does: features per batch, stored per image, stacked at the end
    parts = [suite.features(degraded["very_noisy"][s], demo[s]) for s in (slice(0, 5), slice(5, 12))]
    feats = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert set(feats) == {"inception", "inception_ref", "logits"}
    assert feats["inception"].shape == (12, 16) and feats["logits"].shape == (12, 1000)
    assert feats["inception"].dtype == np.float32
    whole = suite.features(degraded["very_noisy"], demo)
    for k in feats:  # batching does not change the features
        assert np.allclose(feats[k], whole[k], atol=1e-5)

    labels = feats["logits"].argmax(1)
    res = suite.set_level(feats, labels)
    assert set(res) == {"kid", "fid", "top1", "top5"}
    assert res["top1"]["mean"] == 100.0 and res["top5"]["mean"] == 100.0 and res["top1"]["n"] == 12
    wrong = suite.set_level(feats, (labels + 1) % 1000)
    assert wrong["top1"]["mean"] < 100.0
    for k in ("kid", "fid"):
        assert np.isfinite(res[k]["mean"])
    # KID / FID of the references against themselves vs against the noisy restorations
    self_feats = suite.features(demo, demo)
    self_res = suite.set_level(self_feats, labels)
    assert self_res["kid"]["paired_unbiased"] == pytest.approx(0.0, abs=1e-9)
    assert self_res["fid"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert res["kid"]["paired_unbiased"] > self_res["kid"]["paired_unbiased"]
    assert res["fid"]["mean"] > 10 * abs(self_res["fid"]["mean"]) + 1e-6
    print(f"small backbones: KID x1e3 {res['kid']['mean']:.3f} +- {res['kid']['ci95']:.3f} "
          f"(paired {res['kid']['paired_unbiased']:.3f}), FID {res['fid']['mean']:.4f}")
    # no labels -> top-1 missing with a reason, not a number
    nolab = suite.set_level(feats, None)
    assert "missing" in nolab["top1"] and "labels" in nolab["top1"]["missing"]


def test_reference_features_cached_on_disk(tmp_path, demo, degraded):
    inc = SmallInception()
    suite = MetricSuite(names=["kid"], device="cpu", ref_cache_dir=str(tmp_path / "cache"),
                        _test_backbones={"inception_fid": inc})
    f1 = suite.features(degraded["noisy"][:4], demo[:4])
    assert inc.calls == 8
    f2 = suite.features(degraded["blurred"][:4], demo[:4])
    assert inc.calls == 12  # only the 4 restorations; the references came from the cache
    assert np.array_equal(f1["inception_ref"], f2["inception_ref"])
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 4
    # a fresh suite (another run) reuses them too
    inc2 = SmallInception()
    MetricSuite(names=["kid"], device="cpu", ref_cache_dir=str(tmp_path / "cache"),
                _test_backbones={"inception_fid": inc2}).features(demo[:4], demo[:4])
    assert inc2.calls == 4


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")
def test_real_architectures_load_state_dicts_through_the_builders(demo):
    """The clean-fid Inception and the torchvision ResNet-50 builders, fed state dicts of the real architectures
    (randomly initialised here, TEST ONLY): the path a downloaded file takes."""
    import cleanfid.inception_pytorch as ip

    with mock.patch.object(ip, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(torchvision.models.Inception3, "load_state_dict", lambda self, *a, **k: None):
        torch.manual_seed(0)
        inc_state = ip.fid_inception_v3().state_dict()  # architecture only; the weights stay random
    res_state = torchvision.models.resnet50(weights=None).state_dict()
    # make the loaded weights recognisable: the last Inception block outputs zeros, ResNet logits = fc bias
    for k in inc_state:
        if k.startswith("Mixed_7c.") and (k.endswith("conv.weight") or k.endswith("bn.bias")):
            inc_state[k] = torch.zeros_like(inc_state[k])
    res_state["fc.weight"] = torch.zeros_like(res_state["fc.weight"])
    res_state["fc.bias"] = torch.arange(1000, dtype=torch.float32) / 1000
    suite = MetricSuite(names=["kid", "top1"], device="cpu", ref_cache=False,
                        _test_backbones={"inception_fid": inc_state, "resnet50": res_state})
    f = suite.features(demo[:2], demo[2:4])
    assert f["inception"].shape == (2, 2048) and f["logits"].shape == (2, 1000)
    assert np.array_equal(f["inception"], np.zeros((2, 2048), np.float32))
    assert np.allclose(f["logits"], res_state["fc.bias"].numpy()[None].repeat(2, 0))


# ---------------------------------------------------------------------------------------------- missing weights
def test_missing_weights_are_reported_with_the_fetch_command(offline_caches, caplog):
    with caplog.at_level(logging.WARNING, logger="reddiff.metrics"):
        suite = MetricSuite(device="cpu")  # default names: psnr ssim lpips kid top1
    assert suite.names == ["psnr", "ssim", "lpips", "kid", "top1"]
    assert set(suite.missing) == {"lpips", "kid", "top1"}
    for metric, wname in (("lpips", "alexnet"), ("kid", "inception_fid"), ("top1", "resnet50")):
        spec = REGISTRY[wname]
        path = offline_caches / "torch" / "hub" / "checkpoints" / spec.filename
        assert suite.missing[metric].startswith(f"{spec.filename} not found at {path}; run: reddiff weights fetch {wname}")
        warnings = [r for r in caplog.records if f"metric {metric} is missing" in r.getMessage()]
        assert len(warnings) == 1
    demo = torch.zeros(2, 3, 64, 64)
    assert set(suite.per_image(demo, demo)) == {"psnr", "ssim"}
    assert suite.features(demo, demo) == {}
    res = suite.set_level({}, None)
    assert set(res) == {"kid", "top1"} and all(res[k] == {"missing": suite.missing[k]} for k in res)
    # no further warnings while computing
    assert len([r for r in caplog.records if "is missing" in r.getMessage()]) == 3


def test_corrupt_or_foreign_weight_file_is_refused(offline_caches):
    ckpt = offline_caches / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / REGISTRY["resnet50"].filename).write_bytes(b"not the torchvision file")
    suite = MetricSuite(names=["top1", "top5"], device="cpu")
    assert "sha256 mismatch" in suite.missing["top1"] and suite.missing["top5"] == suite.missing["top1"]


def test_fid_reference_file_missing_is_reported(tmp_path):
    suite = MetricSuite(names=["fid"], device="cpu", fid_reference=str(tmp_path / "stats.npz"),
                        _test_backbones={"inception_fid": SmallInception()})
    assert "stats.npz not found" in suite.missing["fid"]


def test_fid_against_reference_statistics_file(tmp_path, demo, degraded):
    suite = small_suite(["fid"])
    ref = suite.features(demo, demo)["inception_ref"].astype(np.float64)
    np.savez(tmp_path / "stats.npz", mu=ref.mean(0), sigma=np.cov(ref, rowvar=False))
    with_file = small_suite(["fid"], fid_reference=str(tmp_path / "stats.npz"))
    f = with_file.features(degraded["noisy"], demo)
    assert with_file.set_level(f)["fid"]["mean"] == pytest.approx(suite.set_level(f)["fid"]["mean"], rel=1e-6)


def test_metric_configs_instantiate(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    shutil.copytree(ROOT / "conf" / "metrics", tmp_path / "metrics")
    (tmp_path / "config.yaml").write_text("defaults:\n  - metrics: default\n  - _self_\ndevice: cpu\n")
    expect = {"default": (["psnr", "ssim", "lpips", "kid", "top1"], False), "official": (None, True),
              "full": (["psnr", "ssim", "lpips", "kid", "fid", "top1", "top5"], False), "fast": (["psnr", "ssim"], False)}
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        for name, (names, compat) in expect.items():
            cfg = compose(config_name="config", overrides=[f"metrics={name}"])
            suite = instantiate(cfg.metrics)
            assert isinstance(suite, MetricSuite) and suite.lpips_compat is compat
            assert suite.names == (names or ["psnr", "ssim", "lpips", "kid", "top1"])
            assert "_test_backbones" not in cfg.metrics


# ---------------------------------------------------------------------------------------------- real weights
def _need(*names):
    missing = [REGISTRY[n].missing_message() for n in names if REGISTRY[n].find() is None]
    if missing:
        pytest.skip("real weights absent: " + "; ".join(missing))


@pytest.mark.weights
def test_real_lpips_alexnet(demo, degraded):
    _need("alexnet")
    suite = MetricSuite(names=["lpips"], device="cpu")
    assert suite.missing == {}
    same = suite.per_image(demo, demo)["lpips"]
    mild, strong = (suite.per_image(degraded[k], demo)["lpips"] for k in ("noisy", "very_noisy"))
    assert same.abs().max() < 1e-6 and 0 < mild.mean() < strong.mean() < 1.5


@pytest.mark.weights
def test_real_inception_kid(demo, degraded):
    _need("inception_fid")
    suite = MetricSuite(names=["kid", "fid"], device="cpu", ref_cache=False)
    f_mild = suite.features(degraded["noisy"], demo)
    f_strong = suite.features(degraded["very_noisy"], demo)
    assert f_mild["inception"].shape == (12, 2048) and (f_mild["inception"] >= 0).all()
    assert suite.set_level(f_strong)["kid"]["mean"] > suite.set_level(f_mild)["kid"]["mean"]


@pytest.mark.weights
def test_real_resnet50_recognises_the_cat_and_the_coffee(demo):
    _need("resnet50")
    suite = MetricSuite(names=["top1"], device="cpu")
    ids = [e.image_id for e in DemoDataset().entries()]
    logits = suite.features(demo, demo)["logits"]
    top5 = {i: set(np.argsort(-logits[ids.index(i)])[:5]) for i in ("chelsea_full", "coffee_full")}
    assert top5["chelsea_full"] & {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top5["coffee_full"] & {967, 968, 504}  # espresso, cup, coffee mug
