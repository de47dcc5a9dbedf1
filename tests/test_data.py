"""Data sets: the demo images, folders (corrupt files, labels), the ImageNet-1k list and FFHQ-1k layouts,
slicing and sharding, and the errors that name the config key to set."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reddiff.data import CorruptImageError, DataRootError, DemoDataset, Entry, FFHQ1k, FolderDataset, ImageNet1k
from reddiff.data.base import center_crop_arr
from reddiff.data.make_demo import DEMO_DIR, DEMO_IDS, make_all
from reddiff.core.errors import UserError
from reddiff.core.weights import REGISTRY

ROOT = Path(__file__).resolve().parents[1]


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _img(seed: int, h: int = 40, w: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- demo
def test_demo_images_are_the_committed_deterministic_crops():
    d = DemoDataset()
    entries = d.entries()
    assert [e.image_id for e in entries] == list(DEMO_IDS) and len(entries) == 12
    assert [e.index for e in entries] == list(range(12)) and all(e.label is None for e in entries)
    assert DEMO_IDS[:4] == ("astronaut_full", "astronaut_crop1", "astronaut_crop2", "astronaut_crop3")
    fresh = make_all()  # regenerated from scikit-image now
    xs = []
    for e in entries:
        x = d.load(e)
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
        stored = np.array(Image.open(DEMO_DIR / f"{e.image_id}.png").convert("RGB"))
        assert np.array_equal(stored, fresh[e.image_id])
        assert torch.equal(x, torch.from_numpy(stored).permute(2, 0, 1).float() / 127.5 - 1)
        xs.append(x)
    xs = torch.stack(xs)
    dists = torch.cdist(xs.flatten(1), xs.flatten(1))
    assert (dists + torch.eye(12) * 1e9).min() > 1.0  # twelve different images
    assert xs.std() > 0.3  # real photos, not blank


def test_demo_other_resolution_resizes():
    x = DemoDataset(resolution=32).load(Entry("chelsea_full", 4))
    assert x.shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------- slicing / sharding
def test_start_count_and_shards_partition_the_selection():
    full = DemoDataset().entries()
    sel = DemoDataset(start=2, count=7).entries()
    assert sel == full[2:9]
    shards = [DemoDataset(start=2, count=7, shard=k, num_shards=3).entries() for k in range(3)]
    assert [len(s) for s in shards] == [2, 2, 3]
    assert [e for s in shards for e in s] == sel  # disjoint, complete, in order
    assert [e.index for e in shards[1]] == [4, 5]  # global indices kept for seeding
    assert DemoDataset(start=10, count=5).entries() == full[10:]
    assert DemoDataset(count=0).entries() == []
    with pytest.raises(ValueError, match="shard"):
        DemoDataset(shard=2, num_shards=2)


# ---------------------------------------------------------------------------------------------- folder
def test_folder_with_one_corrupt_file(tmp_path):
    for i in range(3):
        _png(tmp_path / "imgs" / f"img{i}.png", _img(i))
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    d = FolderDataset(root=str(tmp_path / "imgs"), resolution=32)
    entries = d.entries()
    assert [e.image_id for e in entries] == ["broken", "img0", "img1", "img2"]
    loaded, errors = [], []
    for e in entries:
        try:
            loaded.append(d.load(e))
        except CorruptImageError as err:
            errors.append((e.image_id, str(err)))
    assert len(loaded) == 3 and all(x.shape == (3, 32, 32) for x in loaded)
    assert len(errors) == 1 and errors[0][0] == "broken"
    assert "broken.png" in errors[0][1] and "cannot decode" in errors[0][1]
    print("corrupt file reason:", errors[0][1])


def test_folder_truncated_file_is_corrupt_too(tmp_path):
    p = tmp_path / "a.jpg"
    Image.fromarray(_img(0, 64, 64)).save(p, quality=90)
    p.write_bytes(p.read_bytes()[:200])
    d = FolderDataset(root=str(tmp_path), resolution=16)
    with pytest.raises(CorruptImageError, match="a.jpg"):
        d.load(d.entries()[0])


def test_folder_nested_ids_labels_and_crop(tmp_path):
    # a 48x96 image: left and right quarters red, centre green -> the centre crop is green only
    wide = np.zeros((48, 96, 3), np.uint8)
    wide[:, :24, 0] = wide[:, 72:, 0] = 255
    wide[:, 24:72, 1] = 255
    _png(tmp_path / "imgs" / "sub" / "wide.png", wide)
    _png(tmp_path / "imgs" / "b.png", _img(1))
    (tmp_path / "labels.txt").write_text("sub/wide.png 7\nb 3\n")
    d = FolderDataset(root=str(tmp_path / "imgs"), resolution=48, labels=str(tmp_path / "labels.txt"))
    e = d.entries()
    assert [(x.image_id, x.label) for x in e] == [("b", 3), ("sub__wide", 7)]
    x = d.load(e[1])
    assert torch.all(x[0] == -1) and torch.all(x[1] == 1)  # no red left, all green
    assert np.array_equal(center_crop_arr(Image.fromarray(wide), 48), wide[:, 24:72])


def test_missing_roots_name_the_config_key(tmp_path):
    for cls in (FolderDataset, ImageNet1k, FFHQ1k):
        for root in (None, str(tmp_path / "nowhere")):
            with pytest.raises(DataRootError, match=r"set data\.root=") as ei:
                cls(root=root)
            assert isinstance(ei.value, UserError) and isinstance(ei.value, FileNotFoundError)
    with pytest.raises(DataRootError, match="data.labels"):
        FolderDataset(root=str(tmp_path), labels=str(tmp_path / "no_labels.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataRootError, match="no images"):
        FolderDataset(root=str(tmp_path / "empty")).entries()


# ---------------------------------------------------------------------------------------------- imagenet1k
def _imagenet(tmp_path: Path, layout: str) -> Path:
    root = tmp_path / "imagenet"
    wnids = [f"n{1440764 + i:08d}" for i in range(1000)]
    files = {0: "ILSVRC2012_val_00000293.JPEG", 1: "ILSVRC2012_val_00000236.JPEG", 2: "ILSVRC2012_val_00002338.JPEG"}
    for label, name in files.items():
        arr = _img(label, 300, 400)
        if layout == "class":
            p = root / "val" / wnids[label] / name
        else:
            p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(p, format="JPEG", quality=95)
    if layout == "class":
        for w in wnids:
            (root / "val" / w).mkdir(parents=True, exist_ok=True)
    return root


@pytest.mark.parametrize("layout", ["class", "flat"])
@pytest.mark.parametrize("fmt", ["dgp", "reddiff"])
def test_imagenet1k_list_formats_and_layouts(tmp_path, layout, fmt):
    root = _imagenet(tmp_path, layout)
    wnids = [f"n{1440764 + i:08d}" for i in range(3)]
    names = ["ILSVRC2012_val_00000293.JPEG", "ILSVRC2012_val_00000236.JPEG", "ILSVRC2012_val_00002338.JPEG"]
    lines = [(f"{wnids[i]}/{n}" if fmt == "reddiff" else n) + f" {i}" for i, n in enumerate(names)]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    d = ImageNet1k(root=str(root), list_file=str(tmp_path / "list.txt"), resolution=64)
    e = d.entries()
    assert [(x.image_id, x.index, x.label) for x in e] == [
        ("ILSVRC2012_val_00000293", 0, 0), ("ILSVRC2012_val_00000236", 1, 1), ("ILSVRC2012_val_00002338", 2, 2)]
    x = d.load(e[2])
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    ref = center_crop_arr(Image.open(d.source(e[2])).convert("RGB"), 64)
    assert torch.equal(x, torch.from_numpy(ref).permute(2, 0, 1).float() / 127.5 - 1)
    assert ImageNet1k(root=str(root), list_file=str(tmp_path / "list.txt"), count=1, start=1).entries() == [e[1]]


def test_imagenet1k_without_list_or_images(tmp_path, monkeypatch):
    monkeypatch.setenv("REDDIFF_HOME", str(tmp_path / "home"))
    (tmp_path / "imagenet").mkdir()
    with pytest.raises(DataRootError, match="reddiff (weights|data) fetch imagenet_val_1k"):
        ImageNet1k(root=str(tmp_path / "imagenet"))
    (tmp_path / "list.txt").write_text("ILSVRC2012_val_00000293.JPEG 0\n")
    d = ImageNet1k(root=str(tmp_path / "imagenet"), list_file=str(tmp_path / "list.txt"))
    with pytest.raises(DataRootError, match=r"set data\.root="):
        d.entries()
    with pytest.raises(DataRootError, match="data.list_file"):
        ImageNet1k(root=str(tmp_path / "imagenet"), list_file=str(tmp_path / "nope.txt"))


# ---------------------------------------------------------------------------------------------- ffhq1k
@pytest.mark.parametrize("nested", [False, True])
def test_ffhq1k_layouts(tmp_path, nested):
    for i in range(3):
        sub = tmp_path / "ffhq" / "00000" if nested else tmp_path / "ffhq"
        _png(sub / f"{i:05d}.png", _img(i, 80, 80))
    d = FFHQ1k(root=str(tmp_path / "ffhq"), resolution=32, count=3)
    e = d.entries()
    assert [x.image_id for x in e] == ["00000", "00001", "00002"] and [x.index for x in e] == [0, 1, 2]
    assert d.load(e[1]).shape == (3, 32, 32)
    full = FFHQ1k(root=str(tmp_path / "ffhq"), resolution=32)
    assert len(full.entries()) == 1000 and full.entries()[-1].image_id == "00999"
    with pytest.raises(CorruptImageError, match="not found"):
        full.load(full.entries()[500])
    (tmp_path / "other").mkdir()
    with pytest.raises(DataRootError, match=r"set data\.root="):
        FFHQ1k(root=str(tmp_path / "other")).entries()


# ---------------------------------------------------------------------------------------------- configs
def test_data_configs_instantiate(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    _png(tmp_path / "f" / "a.png", _img(0))
    expect = {"demo": DemoDataset, "folder": FolderDataset, "imagenet1k": ImageNet1k, "ffhq1k": FFHQ1k}
    for name, cls in expect.items():
        cfg = OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml")
        for key in ("resolution", "start", "count", "shard", "num_shards"):
            assert key in cfg, (name, key)
        assert cfg._target_.rsplit(".", 1)[1] == cls.__name__
        if name == "demo":
            assert isinstance(instantiate(cfg), DemoDataset)
        elif name == "folder":
            cfg.root = str(tmp_path / "f")
            assert len(instantiate(cfg).entries()) == 1
        else:
            cfg.root = None
            with pytest.raises(Exception, match=r"data\.root"):
                instantiate(cfg)


def test_registry_list_entry_is_the_dgp_file():
    spec = REGISTRY["imagenet_val_1k"]
    assert spec.url.endswith("deep-generative-prior/master/scripts/imagenet_val_1k.txt")
    assert spec.sha256 and len(spec.sha256) == 64 and spec.used_by == "data=imagenet1k"
