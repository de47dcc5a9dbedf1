"""End-to-end tests of run.py: contracted outputs, sweeps and tables, resume, sharding, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from reddiff.store.results import read_rows

ROOT = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "progress=false", "sampler.steps=4"]


def run_py(args, cwd=ROOT, timeout=600, check=True):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    p = subprocess.run([sys.executable, "run.py", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"run.py {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def make_folder(path: Path, n: int, corrupt: int = 0, size: int = 64) -> Path:
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        base = np.linspace(0, 255, size)[None, :, None] * np.ones((size, 1, 3))
        img = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path / f"img{i:03d}.png")
    for i in range(corrupt):
        (path / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    return path


def test_single_job_outputs(tmp_path):
    out = tmp_path / "job"
    run_py([*FAST, "data.count=2", f"hydra.run.dir={out}"])
    rows = read_rows(out / "metrics.csv")
    assert len(rows) == 2
    cols = list(rows[0])
    assert cols[0] == "image_id" and cols[-4:-1] == ["nfe", "seconds", "diverged"]
    assert float(rows[0]["psnr"]) > 5
    s = json.loads((out / "summary.json").read_text())
    for k in ("task", "sampler", "prior", "data", "n_images", "metrics", "cost", "config", "versions", "git_commit"):
        assert k in s, k
    assert (s["task"], s["sampler"], s["prior"], s["data"], s["n_images"]) == ("sr4", "reddiff", "embedded", "demo", 2)
    assert set(s["metrics"]["psnr"]) == {"mean", "ci95"}
    for name, m in s["metrics"].items():
        assert ("mean" in m) != ("missing" in m), (name, m)
    assert s["cost"]["nfe_per_image"] == 4
    assert s["cost"]["seconds_per_image"] > 0 and s["cost"]["peak_rss_mb"] > 50
    assert (out / "grid.png").stat().st_size > 1000
    assert len(list((out / "images").glob("*.png"))) >= 2


def test_missing_weights_reported_not_invented(tmp_path):
    """On a machine without the LPIPS/Inception/ResNet weights those metrics are 'missing' with a fetch command."""
    from reddiff.core.weights import REGISTRY

    out = tmp_path / "job"
    run_py([*FAST, "data.count=1", f"hydra.run.dir={out}"])
    s = json.loads((out / "summary.json").read_text())
    for metric, weight in (("lpips", "alexnet"), ("kid", "inception_fid"), ("top1", "resnet50")):
        if metric in s["metrics"] and REGISTRY[weight].find() is None:
            assert "reddiff weights fetch" in s["metrics"][metric]["missing"]


@pytest.mark.slow
def test_sweep_writes_table(tmp_path):
    sweep = tmp_path / "sweep"
    p = run_py(["-m", *FAST, "data.count=2", "task=sr4,inpaint_box", "sampler=reddiff,ddrm", f"hydra.sweep.dir={sweep}"])
    md = (sweep / "table.md").read_text()
    assert "table.md" in p.stdout
    body = [line for line in md.splitlines() if line.startswith("| task=") or line.startswith("| sampler=")]
    assert len(body) == 4, md
    assert (sweep / "table.csv").exists()
    # the table can be rebuilt from the sweep dir alone
    q = subprocess.run([sys.executable, "-m", "reddiff.tables", str(sweep), "--format", "tex", "--no-write"],
                       cwd=ROOT, capture_output=True, text=True, check=True)
    assert r"\begin{tabular}" in q.stdout and q.stdout.count(r"\\") >= 5


def test_unknown_task_lists_valid_tasks():
    p = run_py(["task=nope"], check=False)
    assert p.returncode != 0
    err = p.stderr + p.stdout
    assert "task/nope" in err and "sr4" in err and "inpaint_box" in err


def test_unknown_sampler_lists_valid_samplers():
    p = run_py(["sampler=nope"], check=False)
    assert p.returncode != 0
    assert "reddiff" in p.stderr and "ddrm" in p.stderr


def test_resolution_mismatch_fails_before_sampling(tmp_path):
    out = tmp_path / "job"
    p = run_py([*FAST, "data.resolution=32", f"hydra.run.dir={out}"], check=False)
    assert p.returncode == 2
    assert "64x64" in p.stderr and "32x32" in p.stderr
    assert not (out / "metrics.csv").exists()


@pytest.mark.parametrize("override,needle", [
    ("task.sigma_y=-0.1", "sigma_y"),
    ("sampler.steps=0", "steps"),
    ("sampler.steps=2000", "steps"),
])
def test_bad_values_one_clear_error_and_nothing_lost(tmp_path, override, needle):
    out = tmp_path / "job"
    run_py([*FAST, "data.count=1", f"hydra.run.dir={out}"])
    before = (out / "metrics.csv").read_text()
    p = run_py([*FAST, "data.count=2", override, f"hydra.run.dir={out}"], check=False)
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert (out / "metrics.csv").read_text() == before


def test_missing_data_root_names_the_key(tmp_path):
    p = run_py([*FAST, "data=folder", f"data.root={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'j'}"], check=False)
    assert p.returncode == 2
    assert "data.root" in p.stderr


def test_corrupt_image_skipped_and_counted(tmp_path):
    folder = make_folder(tmp_path / "imgs", 3, corrupt=1)
    out = tmp_path / "job"
    run_py([*FAST, "data=folder", f"data.root={folder}", "data.resolution=64", f"hydra.run.dir={out}"])
    assert len(read_rows(out / "metrics.csv")) == 3
    s = json.loads((out / "summary.json").read_text())
    assert s["skipped"] == 1 and "broken0" in s["skipped_images"][0]["image_id"]
    assert s["skipped_images"][0]["reason"]


def test_incompatible_combination_is_na(tmp_path):
    out = tmp_path / "job"
    p = run_py([*FAST, "task=phase_retrieval", "sampler=ddrm", f"hydra.run.dir={out}"])
    assert p.returncode == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "n/a" and "svd" in s["reason"].lower()


@pytest.mark.slow
def test_kill_and_resume_gives_identical_rows(tmp_path):
    """kill -9 a 16-image run mid-way, rerun the same command: 16 rows, no duplicates, same values."""
    folder = make_folder(tmp_path / "imgs", 16)
    common = ["logger=none", "progress=false", "sampler.steps=8", "batch_size=1", "data=folder", f"data.root={folder}", "data.resolution=64"]
    ref = tmp_path / "ref"
    run_py([*common, f"hydra.run.dir={ref}"])
    out = tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "run.py", *common, f"hydra.run.dir={out}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (out / "metrics.csv").exists() and len((out / "metrics.csv").read_text().splitlines()) >= 6:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(read_rows(out / "metrics.csv"))
    assert 1 <= n_before < 16
    run_py([*common, f"hydra.run.dir={out}"])
    rows = read_rows(out / "metrics.csv")
    ids = [r["image_id"] for r in rows]
    assert len(rows) == 16 and len(set(ids)) == 16
    ref_rows = {r["image_id"]: r for r in read_rows(ref / "metrics.csv")}
    for r in rows:
        for k in ("psnr", "ssim", "nfe", "diverged"):
            assert r[k] == ref_rows[r["image_id"]][k], (r["image_id"], k)


@pytest.mark.slow
def test_two_shards_merge_to_unsharded(tmp_path):
    common = ["logger=none", "progress=false", "sampler.steps=4", "data.count=6", "batch_size=4"]
    run_py([*common, f"hydra.run.dir={tmp_path / 'full' / 'job'}"])
    for i in range(2):
        run_py([*common, "data.num_shards=2", f"data.shard={i}", f"hydra.run.dir={tmp_path / 'sharded' / f'shard{i}'}"])
    from reddiff.report.tables import collect

    merged = collect(tmp_path / "sharded")
    full = collect(tmp_path / "full")
    assert len(merged) == 1 and merged[0]["merged_shards"] == 2 and merged[0]["n_images"] == 6
    full_rows = {r["image_id"]: r for r in read_rows(tmp_path / "full" / "job" / "metrics.csv")}
    shard_rows = {}
    for i in range(2):
        for r in read_rows(tmp_path / "sharded" / f"shard{i}" / "metrics.csv"):
            shard_rows[r["image_id"]] = r
    assert set(shard_rows) == set(full_rows)
    # Per-image seeds make every image's noise identical; the batches differ (4+2 vs 3+3 images), and float32
    # convolutions may sum in a batch-size-dependent order, so values agree to ~1e-6, not bit for bit.
    for k, r in shard_rows.items():
        assert float(r["psnr"]) == pytest.approx(float(full_rows[k]["psnr"]), abs=1e-3)
        assert float(r["ssim"]) == pytest.approx(float(full_rows[k]["ssim"]), abs=1e-5)
    for m in ("psnr", "ssim"):
        assert merged[0]["metrics"][m]["mean"] == pytest.approx(full[0]["metrics"][m]["mean"], abs=1e-4)
