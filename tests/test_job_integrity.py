"""Issue 16, replayed row by row: a job folder belongs to one configuration, has one writer at a time, resumes
bit for bit, and every user-facing failure is one clear line (exit code 2) that loses nothing."""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from reddiff.core.errors import UserError
from reddiff.store.results import read_rows

ROOT = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "progress=false", "metrics=fast", "sampler.steps=3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def job(out: Path, *overrides, fast=True):
    from reddiff.run.experiment import run

    return run(compose_cfg(*(FAST if fast else []), *overrides), out)


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def rows_wo_seconds(d: Path) -> dict[str, dict]:
    """Rows by image id (a resumed job appends its redone rows at the end), without the wall-time column."""
    rows = read_rows(d / "metrics.csv")
    by_id = {r["image_id"]: {k: v for k, v in r.items() if k != "seconds"} for r in rows}
    assert len(by_id) == len(rows), "an image appears twice"
    return by_id


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:") or "Traceback" in ln]


# ------------------------------------------------------------------------------------------------ row 1
def test_row01_folder_bound_to_its_configuration(tmp_path):
    d = tmp_path / "D"
    job(d, "data.count=2")
    before = (d / "metrics.csv").read_text()
    with pytest.raises(UserError) as e:
        job(d, "sampler.steps=4", "data.count=3")
    msg = str(e.value)
    assert "\n" not in msg and "sampler.steps 3 -> 4" in msg and "data.count 2 -> 3" in msg
    assert "another folder" in msg and "archive=true" in msg
    with pytest.raises(UserError, match=r"task\.name"):
        job(d, "task=inpaint_box", "data.count=2")
    with pytest.raises(UserError, match=r"task\.sigma_y|operator\.sigma_y"):
        job(d, "data.count=2", "task.sigma_y=0.05")
    assert (d / "metrics.csv").read_text() == before          # nothing lost, nothing merged
    s = job(d, "data.count=3", "sampler.steps=4", "archive=true")  # the explicit way out
    assert s["n_images"] == 3 and s["config"]["sampler"]["steps"] == 4
    (arch,) = (d / "archived").iterdir()
    assert (arch / "metrics.csv").read_text() == before


def test_row01_tuned_settings_bind_by_what_was_applied_not_by_the_whole_tuned_table(tmp_path):
    """A ``+tuned`` job is bound to the settings applied to its sampler (``tuned.applied``), not to the tuned table of
    every sampler: tuning another sampler later must not lock its folder, but a changed value of its own must."""
    from reddiff.store.jobdir import bind, fingerprint

    cfg = {"sampler": {"name": "dps", "steps": 3}, "tuned": {"applied": {"sampler": "dps", "settings": {"zeta": 3.0}},
                                                             "table": {"sr4": {"s100": {"dps": {"zeta": 3.0}}}}}}
    d = tmp_path / "J"
    d.mkdir()
    bind(d, fingerprint(cfg))
    (d / "metrics.csv").write_text("image_id,psnr\na,1\n")
    more = {**cfg, "tuned": {**cfg["tuned"], "table": {"sr4": {"s100": {"dps": {"zeta": 3.0}, "tmpd": {"eta": 0.9}}}}}}
    bind(d, fingerprint(more))                                   # another sampler tuned since: resumes
    old = json.loads((d / "fingerprint.json").read_text())
    old["values"]["tuned.table.sr4.s100.dps.zeta"] = "3.0"         # a fingerprint written before the exclusion
    (d / "fingerprint.json").write_text(json.dumps(old))
    bind(d, fingerprint(more))
    changed = {**cfg, "tuned": {**cfg["tuned"], "applied": {"sampler": "dps", "settings": {"zeta": 2.0}}}}
    with pytest.raises(UserError, match=r"tuned\.applied\.settings\.zeta 3\.0 -> 2\.0"):
        bind(d, fingerprint(changed))


def test_row01_sharding_keys_may_differ_between_merged_shards(tmp_path):
    from reddiff.report.tables import collect

    for i in range(2):
        job(tmp_path / "sweep" / f"s{i}", "data.count=4", "data.num_shards=2", f"data.shard={i}", "batch_size=2")
    merged = collect(tmp_path / "sweep")
    assert len(merged) == 1 and merged[0]["merged_shards"] == 2 and merged[0]["n_images"] == 4
    with pytest.raises(UserError, match="data.shard 0 -> 1"):      # but one folder holds one shard
        job(tmp_path / "sweep" / "s0", "data.count=4", "data.num_shards=2", "data.shard=1", "batch_size=2")


# ------------------------------------------------------------------------------------------------ row 2
def test_row02_second_writer_refused_at_once_with_the_holder_pid(tmp_path):
    from reddiff.store.jobdir import JobLock

    d = tmp_path / "D"
    with JobLock(d):
        t0 = time.time()
        with pytest.raises(UserError) as e:
            job(d, "data.count=1")
        assert time.time() - t0 < 1.0
    assert f"PID {os.getpid()}" in str(e.value) and "in use" in str(e.value)
    assert not (d / "metrics.csv").exists()
    job(d, "data.count=1")  # released: the folder is usable again


def test_row02_stale_lock_after_kill_9_never_blocks(tmp_path):
    from reddiff.store.jobdir import JobLock

    d = tmp_path / "D"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from reddiff.store.jobdir import JobLock; "
                               f"JobLock({str(d)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"PID {holder.pid}"):
        JobLock(d).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (d / ".lock").read_text().strip() == str(holder.pid)  # the stale file is still there ...
    JobLock(d).acquire().release()                                # ... and does not block


@pytest.mark.slow
def test_row02_two_concurrent_writers(tmp_path):
    """Two `run.py` in one folder: the second is refused (exit 2, the first's PID) and the first finishes with
    the rows of an undisturbed run."""
    args = [*FAST, "sampler.steps=12", "data.count=4", "batch_size=2"]
    ref = tmp_path / "ref"
    assert cli(*args, f"hydra.run.dir={ref}").returncode == 0
    d = tmp_path / "D"
    first = subprocess.Popen([sys.executable, "run.py", *args, f"hydra.run.dir={d}"], cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((d / ".lock").exists() and (d / ".lock").read_text().strip()):
        time.sleep(0.05)
    second = cli(*args, f"hydra.run.dir={d}")
    assert first.poll() is None, "the first writer must still be running when the second one starts"
    assert second.returncode == 2 and error_lines(second.stderr) == [
        ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
    assert f"PID {first.pid}" in second.stderr and "Traceback" not in second.stderr
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert rows_wo_seconds(d) == rows_wo_seconds(ref)


# ------------------------------------------------------------------------------------------------ row 3
@pytest.mark.parametrize("bs", ["0", "-1", "2.5"])
def test_row03_non_positive_batch_size_is_refused_not_hung(tmp_path, bs):
    with pytest.raises(UserError, match="batch_size must be a positive integer"):
        job(tmp_path / "D", f"batch_size={bs}")


def test_row03_cli_one_line_exit_2(tmp_path):
    p = cli("batch_size=0", "logger=none", f"hydra.run.dir={tmp_path / 'D'}", timeout=120)
    assert p.returncode == 2 and error_lines(p.stderr) == ["error: batch_size must be a positive integer, got 0"]


# ------------------------------------------------------------------------------------------------ row 4
@pytest.mark.parametrize("sel", [["data.count=0"], ["data.start=100"], ["data.start=12"]])
def test_row04_empty_selection_is_an_error(tmp_path, sel):
    with pytest.raises(UserError, match="selection is empty"):
        job(tmp_path / "D", *sel)
    assert not (tmp_path / "D" / "summary.json").exists()


# ------------------------------------------------------------------------------------------------ row 5
def test_row05_changed_metrics_resume_false_and_write_errors(tmp_path, monkeypatch):
    d = tmp_path / "D"
    job(d, "data.count=2", "batch_size=1")
    before = (d / "metrics.csv").read_text()
    with pytest.raises(UserError, match=r"metrics\.names"):
        job(d, "data.count=2", "batch_size=1", "metrics.names=[psnr]")
    with pytest.raises(UserError, match="resume=false"):
        job(d, "data.count=2", "batch_size=1", "resume=false")
    assert (d / "metrics.csv").read_text() == before
    # disk full / read-only while writing: one line, earlier rows kept, a rerun completes
    from reddiff.store.results import ResultStore

    real = ResultStore.append
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES):
        e2 = tmp_path / f"E{code}"
        calls = {"n": 0}

        def failing(self, row, features=None):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(code, os.strerror(code), str(self.csv_path))
            return real(self, row, features)

        monkeypatch.setattr(ResultStore, "append", failing)
        with pytest.raises(UserError) as e:
            job(e2, "data.count=3", "batch_size=1")
        assert "\n" not in str(e.value) and os.strerror(code) in str(e.value) and "1 row(s)" in str(e.value)
        assert len(read_rows(e2 / "metrics.csv")) == 1
        monkeypatch.setattr(ResultStore, "append", real)
        assert job(e2, "data.count=3", "batch_size=1")["n_images"] == 3


def test_row05_run_dir_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    p = cli("logger=none", f"hydra.run.dir={blocker / 'sub'}", timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    (line,) = error_lines(p.stderr)
    assert "cannot be created" in line and "is a file" in line


# ------------------------------------------------------------------------------------------------ row 6
def test_row06_weights_integrity_by_content(tmp_path, caplog):
    from reddiff.core import weights as W

    src = W.REGISTRY["embedded64"].find()
    good = tmp_path / "my_prior.safetensors"
    shutil.copy(src, good)
    assert W.identify(good).name == "embedded64"
    s = job(tmp_path / "good", "data.count=1", f"prior.weights={good}", "prior.arch=embedded64")
    rec = s["weights"][str(good.resolve())]
    assert rec["verified_as"] == "embedded64" and rec["sha256"] == W.EMBEDDED64_SHA256
    flipped = tmp_path / "flipped.safetensors"
    raw = bytearray(good.read_bytes())
    raw[-10] ^= 0x01
    flipped.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        s = job(tmp_path / "flipped", "data.count=1", f"prior.weights={flipped}", "prior.arch=embedded64")
    rec = s["weights"][str(flipped.resolve())]
    assert rec["verified_as"] is None and rec["sha256"] == W.sha256sum(flipped) != W.EMBEDDED64_SHA256
    assert sum("not a registered weights file" in r.getMessage() for r in caplog.records) == 1
    named = tmp_path / "embedded64.safetensors"   # a registry file name with another content: refused
    named.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="sha256 mismatch"):
        job(tmp_path / "named", "data.count=1", f"prior.weights={named}", "prior.arch=embedded64")


# ------------------------------------------------------------------------------------------------ row 7
def test_row07_tables_keep_provenance_and_empty_folder_writes_nothing(tmp_path, capsys):
    from reddiff.report.tables import write_tables
    from reddiff.tables import main

    sweep = tmp_path / "sweep"
    job(sweep / "0_a", "data.count=1")
    job(sweep / "1_b", "data.count=1", "sampler.steps=2")
    write_tables(sweep, "python run.py -m sampler.steps=2,3")
    first = (sweep / "table.md").read_text().splitlines()[0]
    assert first.startswith("Command: `python run.py -m sampler.steps=2,3`")
    main([str(sweep)])
    assert (sweep / "table.md").read_text().splitlines()[0] == first
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as e:
        main([str(empty)])
    assert e.value.code == 2 and "nothing written" in capsys.readouterr().err
    assert list(empty.iterdir()) == []


# ------------------------------------------------------------------------------------------------ row 8
def test_row08_adhoc_sweep_wandb_group_is_the_sweep_folder(tmp_path, monkeypatch):
    import reddiff.run.experiment as ex

    monkeypatch.setattr(ex, "hydra_info", lambda: {"sweep_dir": str(tmp_path / "my_sweep"), "multirun": True})
    d = tmp_path / "my_sweep" / "0_job"
    s = ex.run(compose_cfg("progress=false", "metrics=fast", "sampler.steps=2", "data.count=1", "logger=wandb",
                           "logger.mode=offline", "logger.job_type=reddiff"), d)
    assert s["config"]["logger"]["group"] == "my_sweep"
    (runfile,) = (d / "wandb").glob("offline-run-*/*.wandb")
    assert b"my_sweep" in runfile.read_bytes()
    import inspect

    from reddiff.run import sweep_callback
    assert 'or root.name' in inspect.getsource(sweep_callback._log_wandb_table)  # the table run's group too


# ------------------------------------------------------------------------------------------------ row 9
def test_row09_weights_fetch_takes_several_names(monkeypatch, tmp_path, capsys):
    from reddiff import cli as rcli
    from reddiff.core import weights as W

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    got = []
    monkeypatch.setattr(W, "fetch", lambda name, dest=None: got.append(name) or Path(f"/fake/{name}"))
    assert rcli.main(["weights", "fetch", "alexnet", "inception_fid"]) == 0
    assert got == ["alexnet", "inception_fid"]
    assert rcli.main(["weights", "fetch", "alexnet", "inception_fid", "--dest", "x"]) == 2


# ------------------------------------------------------------------------------------------------ row 10
def test_row10_status_instructions_are_correct(monkeypatch, tmp_path, capsys):
    from reddiff import cli as rcli
    from reddiff.core.weights import REGISTRY

    monkeypatch.setenv("REDDIFF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("REDDIFF_DPS_FFHQ", raising=False)
    rcli.main(["weights", "status"])
    out = capsys.readouterr().out
    for spec in REGISTRY.values():
        for word in spec.used_by.replace(",", " ").split():
            if word.startswith("prior="):
                assert (ROOT / "conf" / "prior" / f"{word[6:]}.yaml").is_file(), (spec.name, word)
    assert "prior=adm_imagenet256_cond" not in out.replace("prior.weights=adm_imagenet256_cond", "")
    msg = REGISTRY["dps_ffhq256"].missing_message()
    assert str(tmp_path / "home" / "ffhq_10m.pt") in msg and "~/.cache/reddiff" not in msg


# ------------------------------------------------------------------------------------------------ row 11
def test_row11_job_prints_its_folder_and_counts_converted_inputs(tmp_path, capsys, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), "RGBA").save(folder / f"a{i}.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "b_small.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "c_plain.png")
    d = tmp_path / "D"
    with caplog.at_level("WARNING"):
        s = job(d, "data=folder", f"data.root={folder}", "batch_size=2")
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == f"[reddiff] results: {d}"
    assert s["converted"] == {"alpha_dropped": 2, "upscaled": 1}
    assert sorted(s["converted_images"]) == ["a0", "a1", "b_small"]
    warned = [r.getMessage() for r in caplog.records if "not warned again" in r.getMessage()]
    assert len(warned) == 2 and any("alpha dropped" in w for w in warned) and any("upscaled" in w for w in warned)
    assert json.loads((d / "summary.json").read_text())["converted"] == s["converted"]


# ------------------------------------------------------------------------------------------------ row 12
def test_row12_data_resolution_follows_the_prior(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((256, 256, 3), 120, np.uint8)).save(folder / "x.png")
    s = job(tmp_path / "D", "data=folder", f"data.root={folder}")
    assert s["n_images"] == 1 and s["config"]["data"]["resolution"] == 64
    with pytest.raises(UserError, match="data.resolution=64"):  # an explicit, wrong size is still refused
        job(tmp_path / "E", "data=folder", f"data.root={folder}", "data.resolution=128")


# ------------------------------------------------------------------------------------------------ row 13
class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_row13_unsafe_pickle_message_never_suggests_the_unsafe_load(tmp_path):
    from reddiff.core.checkpoint import UnsafeCheckpointError, load_state_dict

    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"w": _Evil()}, f, protocol=2)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_state_dict(p)
    msg = str(e.value)
    assert "weights_only" not in msg and "likely succeed" not in msg
    assert "nothing in it was executed" in msg and "safetensors.torch.save_file" in msg


# ------------------------------------------------------------------------------------------------ row 14
def test_row14_redone_batch_is_bit_identical(tmp_path):
    """Fixed batches: drop rows of a finished job (as a kill would leave it: a half-written last line and a
    missing row in another batch) and rerun: every row and PNG equals the uninterrupted run's, bit for bit."""
    from reddiff.run.batch_loop import fixed_batches

    assert [len(b) for b in fixed_batches(list(range(7)), 3)] == [3, 3, 1]
    args = ["data.count=6", "batch_size=3", "sampler.steps=4"]
    ref = tmp_path / "ref"
    job(ref, *args)
    d = tmp_path / "D"
    shutil.copytree(ref, d)
    lines = (d / "metrics.csv").read_text().splitlines(keepends=True)
    (d / "metrics.csv").write_text("".join(lines[:2] + lines[3:6]) + lines[6][: len(lines[6]) // 2])
    for png in (d / "images").glob("*.png"):
        png.unlink()
    job(d, *args)
    assert rows_wo_seconds(d) == rows_wo_seconds(ref)
    ref_png = {p.name: p.read_bytes() for p in (ref / "images").glob("*.png")}
    got_png = {p.name: p.read_bytes() for p in (d / "images").glob("*.png") if p.name in ref_png}
    redone = {n for n in ref_png if n.split(".")[0].removesuffix("_y") in {
        lines[2].split(",")[0], lines[6].split(",")[0]}}
    assert redone and all(got_png[n] == ref_png[n] for n in redone)


def test_busy_folder_refused_before_hydra_writes(tmp_path, capsys):
    """A second writer is refused by the pre-flight check, before Hydra would rewrite the holder's .hydra/."""
    from reddiff.run.entry import preflight
    from reddiff.store.jobdir import JobLock

    d = tmp_path / "job"
    with JobLock(d):
        with pytest.raises(SystemExit) as e:
            preflight([f"hydra.run.dir={d}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by another run" in err[0] and str(os.getpid()) in err[0]
    assert not (d / ".hydra").exists()
    preflight([f"hydra.run.dir={d}"])  # free again: accepted
