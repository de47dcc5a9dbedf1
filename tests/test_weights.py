"""Weights registry and the ``reddiff`` CLI: status runs offline and agrees with what the metric suite reports
missing; fetch fails cleanly without internet; metric backbones live where their libraries look for them."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

from reddiff import cli

from reddiff.core import weights
from reddiff.metrics import MetricSuite
from reddiff.core.weights import REGISTRY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("REDDIFF_HOME", str(tmp_path / "reddiff"))
    for spec in REGISTRY.values():
        if spec.env:
            monkeypatch.delenv(spec.env, raising=False)
    return tmp_path


def test_status_lists_every_entry_offline(offline_caches, capsys):
    assert cli.main(["weights", "status", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    from reddiff.core.folders import FOLDERS

    assert [r["name"] for r in rows] == list(REGISTRY) + list(FOLDERS)  # files, then model folders
    for r in rows:
        assert r["state"] == "missing" or r["state"].startswith("present"), r
        assert r["path"]
    by_name = {r["name"]: r for r in rows}
    hub = offline_caches / "torch" / "hub" / "checkpoints"
    for name in ("alexnet", "vgg16", "resnet50", "inception_fid"):
        assert by_name[name] == {**by_name[name], "state": "missing", "path": str(hub / REGISTRY[name].filename)}
    assert by_name["imagenet_val_1k"]["path"] == str(offline_caches / "reddiff" / "imagenet_val_1k.txt")


def test_status_and_metric_suite_agree_on_missing_files(offline_caches, capsys):
    suite = MetricSuite(device="cpu")
    assert cli.main(["weights", "status"]) == 0
    text = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.strip()}
    for metric, wname in (("lpips", "alexnet"), ("kid", "inception_fid"), ("top1", "resnet50")):
        path = offline_caches / "torch" / "hub" / "checkpoints" / REGISTRY[wname].filename
        assert " missing " in lines[wname] and str(path) in lines[wname]
        assert suite.missing[metric].startswith(f"{REGISTRY[wname].filename} not found at {path}; "
                                                f"run: reddiff weights fetch {wname}")


def test_console_script_runs(offline_caches):
    exe = Path(sys.executable).with_name("reddiff")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "reddiff.cli"]
    p = subprocess.run([*cmd, "weights", "status"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "inception_fid" in p.stdout and "missing" in p.stdout


def test_present_file_is_hash_checked(offline_caches, capsys):
    hub = offline_caches / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / REGISTRY["alexnet"].filename).write_bytes(b"something else")
    assert cli.main(["weights", "status", "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out) if r["name"] == "alexnet")
    assert row["state"] == "present, HASH MISMATCH" and row["path"] == str(hub / REGISTRY["alexnet"].filename)
    with pytest.raises(weights.HashMismatchError):
        weights.resolve("alexnet")


def test_fetch_without_internet_fails_cleanly(offline_caches, monkeypatch, capsys):
    def no_network(url, filename=None, *a, **k):
        raise urllib.error.URLError("no route to host (test)")

    monkeypatch.setattr(weights.urllib.request, "urlretrieve", no_network)
    assert cli.main(["data", "fetch", "imagenet_val_1k"]) == 1
    err = capsys.readouterr().err
    assert "imagenet_val_1k failed" in err and "needs internet" in err
    assert not (offline_caches / "reddiff" / "imagenet_val_1k.txt").exists()
    assert cli.main(["weights", "fetch", "resnet50"]) == 1
    assert cli.main(["data", "fetch", "resnet50"]) == 2  # not a data file
    assert cli.main(["weights", "fetch", "no_such_thing"]) == 2


def test_fetch_writes_into_the_cache_the_libraries_read(offline_caches, monkeypatch):
    """A fetched torchvision / clean-fid file lands in torch.hub's checkpoint dir, which is where
    torchvision's and clean-fid's own load_state_dict_from_url look; the data list lands in REDDIFF_HOME."""
    import torch.hub

    got = []

    def fake_download(url, filename, *a, **k):
        got.append(url)
        Path(filename).write_bytes(b"x")

    monkeypatch.setattr(weights.urllib.request, "urlretrieve", fake_download)
    monkeypatch.setattr(weights, "check_hash", lambda spec, path, verify=True: "verified")
    for name in ("resnet50", "inception_fid"):
        dest = weights.fetch(name)
        assert dest == Path(torch.hub.get_dir()) / "checkpoints" / REGISTRY[name].filename
    assert weights.fetch("imagenet_val_1k") == offline_caches / "reddiff" / "imagenet_val_1k.txt"
    import cleanfid.inception_pytorch as ip
    import torchvision

    assert REGISTRY["inception_fid"].url == ip.FID_WEIGHTS_URL
    assert REGISTRY["resnet50"].url == torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    assert REGISTRY["alexnet"].url == torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    assert REGISTRY["vgg16"].url == torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    assert got == [REGISTRY[n].url for n in ("resnet50", "inception_fid", "imagenet_val_1k")]
