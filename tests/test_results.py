"""Crash-safety of the per-image result store."""
import os

import numpy as np
import pytest

from reddiff.store.results import ResultStore, read_rows


def test_append_resume_no_duplicates(tmp_path):
    s = ResultStore(tmp_path, ["psnr", "ssim"])
    s.append({"image_id": "a", "psnr": 20.5, "ssim": 0.5, "nfe": 10, "seconds": 0.1, "diverged": False}, {"f": np.ones(3)})
    s.append({"image_id": "b", "psnr": 21.5, "ssim": 0.6, "nfe": 10, "seconds": 0.1, "diverged": False})
    s.append({"image_id": "a", "psnr": 99.0, "ssim": 0.9, "nfe": 10, "seconds": 0.1, "diverged": False})
    s2 = ResultStore(tmp_path, ["psnr", "ssim"])
    assert s2.done_ids() == {"a", "b"}
    rows = read_rows(tmp_path / "metrics.csv")
    assert [r["image_id"] for r in rows] == ["a", "b"]
    assert float(rows[0]["psnr"]) == 20.5
    assert list(rows[0])[:3] == ["image_id", "psnr", "ssim"] and list(rows[0])[3:6] == ["nfe", "seconds", "diverged"]
    feats = s2.load_features(["a", "b"])
    assert feats["f"].shape == (1, 3)


def test_half_written_row_is_dropped_and_redone(tmp_path):
    s = ResultStore(tmp_path, ["psnr"])
    s.append({"image_id": "a", "psnr": 20.0, "nfe": 1, "seconds": 0.1, "diverged": False})
    with open(tmp_path / "metrics.csv", "a") as f:  # what a kill -9 mid-write can leave behind
        f.write("b,21.3")
    s2 = ResultStore(tmp_path, ["psnr"])
    assert s2.repaired == 1
    assert s2.done_ids() == {"a"}
    s2.append({"image_id": "b", "psnr": 21.0, "nfe": 1, "seconds": 0.1, "diverged": False})
    assert [r["image_id"] for r in read_rows(tmp_path / "metrics.csv")] == ["a", "b"]


def test_changed_columns_refused(tmp_path):
    ResultStore(tmp_path, ["psnr"]).append({"image_id": "a", "psnr": 1.0, "nfe": 1, "seconds": 0.1, "diverged": False})
    with pytest.raises(ValueError, match="columns"):
        ResultStore(tmp_path, ["psnr", "ssim"])


def test_resume_false_refuses_existing(tmp_path):
    ResultStore(tmp_path, ["psnr"])
    with pytest.raises(FileExistsError, match="resume=false"):
        ResultStore(tmp_path, ["psnr"], resume=False)
