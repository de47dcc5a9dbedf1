"""Safe loading: hash pins, pickles that carry code, missing files, nested checkpoints."""
from __future__ import annotations

import logging
import os
import pickle
import sys

import pytest
import torch

from reddiff.core import weights as W
from reddiff.core.checkpoint import CheckpointError, UnsafeCheckpointError, load_state_dict
from reddiff.priors.adm import UNet, UNetConfig
from reddiff.priors.unet import UNetPrior

TINY = UNetConfig(image_size=16, model_channels=32, out_channels=3, num_res_blocks=1, attention_resolutions=(8,),
                  channel_mult=(1, 2), num_head_channels=16)


class _RunsCode:
    """Unpickling this calls os.system: a stand-in for a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty REDDIFF_HOME, and no per-entry overrides from the environment."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("REDDIFF_HOME", str(h))
    for spec in W.REGISTRY.values():
        if spec.env:
            monkeypatch.delenv(spec.env, raising=False)
    return h


@pytest.fixture
def registered(home, monkeypatch):
    """A temporary registry entry 'test_tiny' whose file is a real tiny UNet checkpoint in REDDIFF_HOME."""
    torch.manual_seed(0)
    torch.save(UNet(TINY).state_dict(), home / "tiny_test.pt")

    def make(sha256):
        spec = W.WeightSpec("test_tiny", "tiny_test.pt", "tiny test UNet", url="https://example.invalid/tiny_test.pt",
                            sha256=sha256)
        monkeypatch.setitem(W.REGISTRY, "test_tiny", spec)
        return home / "tiny_test.pt"
    return make


# ---------------------------------------------------------------------------------------- hash pins
def test_wrong_hash_is_refused(registered):
    path = registered("0" * 64)
    with pytest.raises(W.HashMismatchError) as e:
        UNetPrior("test_tiny", arch=TINY)
    msg = str(e.value)
    assert "sha256 mismatch" in msg and str(path) in msg and "expected " + "0" * 64 in msg
    assert "verify=false" in msg


def test_verify_false_loads_with_logged_warning(registered, caplog):
    registered("0" * 64)
    with caplog.at_level(logging.WARNING):
        prior = UNetPrior("test_tiny", arch=TINY, verify=False)
    assert prior.shape == (3, 16, 16)
    text = caplog.text
    assert "sha256 mismatch" in text and "loading anyway because verify=false" in text


def test_correct_hash_verifies(registered):
    path = registered(None)
    digest = W.sha256sum(path)
    registered(digest)
    assert W.check_hash(W.REGISTRY["test_tiny"], path) == "verified"
    assert UNetPrior("test_tiny", arch=TINY).shape == (3, 16, 16)
    registered(None)
    assert W.check_hash(W.REGISTRY["test_tiny"], path) == "unpinned"


def test_status_reports_unpinned_and_mismatch(registered):
    registered(None)
    row = next(r for r in W.status_rows() if r["name"] == "test_tiny")
    assert row["state"] == "present (no pinned hash)"
    registered("f" * 64)
    row = next(r for r in W.status_rows() if r["name"] == "test_tiny")
    assert row["state"] == "present, HASH MISMATCH"


def test_adm_uncond_pin_is_the_published_one():
    spec = W.REGISTRY["adm_imagenet256_uncond"]
    assert spec.sha256 == "a37c32fffd316cd494cf3f35b339936debdc1576dad13fe57c42399a5dbc78b1"
    # no invented pins: the files without a public hash stay unpinned
    for name in ("adm_imagenet256_cond", "adm_imagenet256_classifier", "dps_ffhq256"):
        assert W.REGISTRY[name].sha256 is None and W.REGISTRY[name].sha256_prefix is None


def test_pin_embedded_helper_rewrites_the_constant(tmp_path):
    src = tmp_path / "weights_copy.py"
    src.write_text(open(W.__file__).read())
    f = tmp_path / "e.safetensors"
    f.write_bytes(b"some bytes")
    digest = W.pin_embedded(f, source=src)
    assert digest == W.sha256sum(f)
    assert f'EMBEDDED64_SHA256: Optional[str] = "{digest}"' in src.read_text()


# ---------------------------------------------------------------------------------------- code in pickles
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_carrying_code_is_refused_and_not_executed(tmp_path, writer):
    marker = tmp_path / "EXECUTED"
    path = tmp_path / "evil.pt"
    payload = {"time_embed.0.weight": torch.zeros(2), "x": _RunsCode(marker)}
    if writer == "pickle":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError) as e:
        load_state_dict(path)
    msg = str(e.value)
    assert msg.startswith(f"refusing to unpickle {path}: it contains code/objects; only plain tensors are accepted")
    with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle"):
        UNetPrior(str(path), arch=TINY)
    assert not marker.exists(), "the pickle's code ran"


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole object, not a state dict
    with pytest.raises(UnsafeCheckpointError, match="only plain tensors are accepted"):
        load_state_dict(path)


def test_non_weights_objects_are_refused(tmp_path):
    torch.save({"lr": 0.1, "name": "x"}, tmp_path / "cfg.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_state_dict(tmp_path / "cfg.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="only plain tensors"):
        load_state_dict(tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_state_dict(tmp_path / "junk.pt")
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_state_dict(tmp_path / "trunc.safetensors")


def test_nested_checkpoints(tmp_path):
    w = {"a.weight": torch.ones(2), "b.bias": torch.zeros(3)}
    torch.save({"state_dict": w, "epoch": 3}, tmp_path / "nested.pt")
    assert set(load_state_dict(tmp_path / "nested.pt")) == set(w)
    torch.save({"model": w, "ema": w, "step": torch.tensor(5)}, tmp_path / "train.pt")  # like train_prior's state.pt
    with pytest.raises(CheckpointError, match=r"ambiguous.*model, ema.*key="):
        load_state_dict(tmp_path / "train.pt")
    assert set(load_state_dict(tmp_path / "train.pt", key="ema")) == set(w)
    with pytest.raises(CheckpointError, match="no entry 'opt'"):
        load_state_dict(tmp_path / "train.pt", key="opt")


# ---------------------------------------------------------------------------------------- missing files
def test_missing_registered_file_names_path_and_fetch_command(home):
    with pytest.raises(W.MissingWeightsError) as e:
        UNetPrior("adm_imagenet256_uncond")
    msg = str(e.value)
    assert str(home / "256x256_diffusion_uncond.pt") in msg
    assert "reddiff weights fetch adm_imagenet256_uncond" in msg


def test_missing_manual_file_names_path_fetch_and_instructions(home):
    with pytest.raises(W.MissingWeightsError) as e:
        UNetPrior("dps_ffhq256")
    msg = str(e.value)
    assert str(home / "ffhq_10m.pt") in msg and "reddiff weights fetch dps_ffhq256" in msg and "Google Drive" in msg


def test_missing_explicit_path(tmp_path):
    p = tmp_path / "nowhere" / "w.pt"
    with pytest.raises(W.MissingWeightsError, match=str(p)):
        UNetPrior(str(p), arch=TINY)
