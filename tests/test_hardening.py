"""Issue 28: each row of the hardening table replayed (rows 1-13), bounded in time and independent of the
machine's speed.  Process-level cases run ``run.py`` or a small driver in a subprocess."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from reddiff.core.errors import UserError
from reddiff.store.results import read_rows

ROOT = Path(__file__).resolve().parents[1]
FAST = ["logger=none", "progress=false", "metrics=fast", "sampler.steps=3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0",
       "PYTHONPATH": str(ROOT)}


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def job(out: Path, *overrides):
    from reddiff.run.experiment import run

    return run(compose_cfg(*FAST, *overrides), out)


def cli(*args, timeout=300, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith(("error:", "interrupted:")) or "Traceback" in ln]


def write_png(path: Path, seed: int, size: int = 64) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


# ------------------------------------------------------------------------------------------------ row 1
def test_row01_deleting_the_lock_file_lets_no_second_writer_in(tmp_path):
    from reddiff.store.jobdir import JobLock, probe_lock

    d = tmp_path / "D"
    holder = subprocess.Popen([sys.executable, "-c", "import time; from reddiff.store.jobdir import JobLock; "
                               f"JobLock({str(d)!r}).acquire(); print('held', flush=True); time.sleep(120)"],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (d / ".lock").unlink()                                   # the careless user's step
        with pytest.raises(UserError, match="in use by another run"):
            JobLock(d).acquire()
        with pytest.raises(UserError, match="in use by another run"):
            probe_lock(d)
        with pytest.raises(UserError, match="in use by another run"):
            job(d, "data.count=1")
        assert not (d / "metrics.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    JobLock(d).acquire().release()                               # the holder's death frees the folder


# ------------------------------------------------------------------------------------------------ row 2
def test_row02_changed_input_file_is_refused_not_mixed(tmp_path):
    data, d = tmp_path / "imgs", tmp_path / "D"
    for i in range(2):
        write_png(data / f"p{i}.png", i)
    args = ["data=folder", f"data.root={data}", "batch_size=1"]
    job(d, *args)
    assert set(json.loads((d / "inputs.json").read_text())["sha256"]) == {"p0", "p1"}
    before = (d / "metrics.csv").read_text()
    write_png(data / "p0.png", 7)                               # same name, other content
    with pytest.raises(UserError, match=r"input p0 .* now has sha256 .* the data changed"):
        job(d, *args)
    assert (d / "metrics.csv").read_text() == before
    (data / "p0.png").unlink()
    with pytest.raises(UserError, match=r"^input p0 is gone from the data \(1 image\(s\) with rows in "):
        job(d, *args)
    write_png(data / "p0.png", 0)                               # the original bytes again: the folder is usable
    s = job(d, *args)
    assert s["n_images"] == 2 and (d / "metrics.csv").read_text() == before


# ------------------------------------------------------------------------------------------------ row 3
@pytest.mark.parametrize("sampler", ["mcgdiff", "fps_smc"])
def test_row03_particle_memory_refused_before_any_work(tmp_path, sampler):
    d = tmp_path / "D"
    p = cli(f"sampler={sampler}", "sampler.particles=10000000", "logger=none", "data.count=1", f"hydra.run.dir={d}")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    (line,) = error_lines(p.stderr)
    assert "10000000 particles x 1 system(s) x 12288 values need about 2746.6 GiB" in line
    assert "lower sampler.particles" in line
    assert not (d / "metrics.csv").exists()


def test_row03_memory_check_counts_the_batch(monkeypatch):
    from reddiff.registry import sampler_class
    from reddiff.samplers import smc

    s = sampler_class("mcgdiff")(particles=16)
    monkeypatch.setattr(smc, "available_bytes", lambda device: 10 ** 6)
    s.check_memory(1, 100, "cpu")                                # 6 * 16 * 100 * 4 bytes fit
    with pytest.raises(UserError, match=r"16 particles x 100 system\(s\) x 100 values"):
        s.check_memory(100, 100, "cpu")


# ------------------------------------------------------------------------------------------------ row 4
def test_row04_zero_trials_is_one_line(tmp_path):
    p = cli("-m", "+tune=reddiff", "hydra.sweeper.n_trials=0", f"hydra.sweep.dir={tmp_path / 'S'}", timeout=120)
    assert p.returncode == 2
    assert error_lines(p.stderr) == ["error: hydra.sweeper.n_trials must be an integer >= 1 (a study needs a trial "
                                     "to report a best setting), got 0"]


# ------------------------------------------------------------------------------------------------ rows 5, 6
@pytest.mark.parametrize("seed", ["1e20", "-1", "4611686018427387905", "2.5"])
def test_row05_seed_range(tmp_path, seed):
    with pytest.raises(UserError, match=r"^seed must be an integer in \[0, 2\*\*62\], got "):
        job(tmp_path / "D", f"seed={seed}")
    assert not (tmp_path / "D" / "metrics.csv").exists()


def test_row05_cli_one_line(tmp_path):
    p = cli("seed=1e20", "logger=none", f"hydra.run.dir={tmp_path / 'D'}", timeout=120)
    assert p.returncode == 2 and error_lines(p.stderr) == ["error: seed must be an integer in [0, 2**62], got 1e+20"]


@pytest.mark.parametrize("sigma", ["inf", "nan", "2", "-0.1"])
def test_row06_sigma_y_outside_0_1_is_refused(tmp_path, sigma):
    with pytest.raises(UserError, match=r"^task\.sigma_y must be a finite number in \[0, 1\]"):
        job(tmp_path / "D", f"task.sigma_y={sigma}")


def test_row06_sigma_y_bounds_are_accepted():
    from reddiff.run.experiment import check_scalars

    for sigma in ("0", "1", "0.05"):
        check_scalars(compose_cfg(f"task.sigma_y={sigma}"))


# ------------------------------------------------------------------------------------------------ row 7
def test_row07_file_name_with_a_line_break(tmp_path):
    data, d = tmp_path / "imgs", tmp_path / "D"
    write_png(data / "a\nb.png", 1)
    write_png(data / "c.png", 2)
    args = ["data=folder", f"data.root={data}", "batch_size=2"]
    s = job(d, *args)
    assert s["n_images"] == 2
    ids = [r["image_id"] for r in read_rows(d / "metrics.csv")]
    assert ids == ["a%0Ab", "c"]
    before = (d / "metrics.csv").read_text()
    s = job(d, *args)                                            # a rerun: nothing dropped, nothing added
    assert s["n_images"] == 2 and (d / "metrics.csv").read_text() == before


def test_row07_store_refuses_a_line_break_in_an_id(tmp_path):
    from reddiff.store.results import ResultStore

    st = ResultStore(tmp_path, ["psnr"])
    with pytest.raises(ValueError, match="line break"):
        st.append({"image_id": "a\nb", "psnr": 1.0})


# ------------------------------------------------------------------------------------------------ rows 8, 9
def test_row08_read_only_sweep_folder_prints_the_table(tmp_path, monkeypatch, capsys):
    import reddiff.store.results as R
    from reddiff.tables import main

    d = tmp_path / "sweep"
    shutil.copytree(ROOT / "results" / "demo_sr4", d)
    stale = (d / "table.md").read_text().replace("| reddiff |", "| stale |")
    (d / "table.md").write_text(stale)                           # so that a rebuild has something to write

    def read_only(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(R, "atomic_write_bytes", read_only)
    main([str(d)])
    out, err = capsys.readouterr()
    assert err.strip() == f"note: {d} is not writable (Read-only file system); the table is printed, not written"
    assert "| job | task | sampler |" in out and "Δpsnr vs reddiff [95%]" in out and "| stale |" not in out
    assert (d / "table.md").read_text() == stale


def test_row09_rebuild_reproduces_a_committed_table_with_its_delta_column(tmp_path, capsys):
    from reddiff.tables import main

    d = tmp_path / "sweep"
    shutil.copytree(ROOT / "results" / "demo_sr4", d)
    main([str(d)])
    capsys.readouterr()
    for name in ("table.md", "table.csv"):
        assert (d / name).read_text() == (ROOT / "results" / "demo_sr4" / name).read_text()


def test_row09_new_reference_is_recorded_and_kept(tmp_path, capsys):
    from reddiff.report.tables import recorded_ref
    from reddiff.tables import main

    d = tmp_path / "sweep"
    shutil.copytree(ROOT / "results" / "demo_sr4", d)
    main([str(d), "--ref", "dps"])
    first = (d / "table.md").read_text().split("\n", 1)[0]
    assert first.endswith("; table: `python -m reddiff.tables sweep --ref dps`") and recorded_ref(d) == "dps"
    main([str(d)])                                               # no --ref: the recorded one is kept
    md = (d / "table.md").read_text()
    assert md.split("\n", 1)[0] == first and "Δpsnr vs dps [95%]" in md
    capsys.readouterr()


# ------------------------------------------------------------------------------------------------ row 10
def test_row10_every_image_skipped_is_an_error(tmp_path):
    data, d = tmp_path / "imgs", tmp_path / "D"
    data.mkdir()
    (data / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)  # not decodable
    with pytest.raises(UserError, match=r"every image of the selection was skipped \(1 unreadable; first: bomb"):
        job(d, "data=folder", f"data.root={data}")
    assert not (d / "summary.json").exists()


# ------------------------------------------------------------------------------------------------ row 11
def test_row11_unquoted_non_ascii_path_refused_before_anything_is_created(tmp_path):
    target = tmp_path / "é" / "D"
    p = cli("logger=none", f"hydra.run.dir={target}", timeout=120)
    assert p.returncode == 2 and len(error_lines(p.stderr)) == 1
    assert error_lines(p.stderr)[0].startswith(f"error: cannot parse the override 'hydra.run.dir={target}'")
    assert not (tmp_path / "é").exists()


def test_row11_quoted_path_is_created_unquoted(tmp_path, monkeypatch):
    from reddiff.run.entry import preflight

    monkeypatch.chdir(tmp_path)
    target = tmp_path / "é x" / "D"
    preflight([f"hydra.run.dir='{target}'"])
    assert target.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["é x"]  # no stray "'" tree


# ------------------------------------------------------------------------------------------------ row 12
def test_row12_tune_children_die_with_a_killed_driver(tmp_path):
    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    driver = subprocess.Popen([sys.executable, "-c", "import sys; from reddiff.tune.make import run_child; "
                               f"run_child([sys.executable, '-c', {child!r}])"], cwd=ROOT, env=ENV)
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = int(pid_file.read_text())
    finally:
        driver.kill()                                            # kill -9 of the driver
        driver.wait()

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state not in ("Z", "X")

    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the child outlived its killed driver")


# ------------------------------------------------------------------------------------------------ row 13
def test_row13_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path):
    d = tmp_path / "D"
    fast = [a for a in FAST if not a.startswith("sampler.steps=")]
    # 12 images, interrupted after the first row: the interrupt lands mid-run even on a busy machine (with 6, a
    # starved poller could see the first row only as the job was already exiting)
    args = [*fast, "sampler.steps=20", "batch_size=1", "data.count=12", f"hydra.run.dir={d}"]
    # a job started in the background by a non-interactive shell inherits SIGINT ignored, and Python then installs
    # no KeyboardInterrupt handler: give the job the default disposition, as a terminal would
    p = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None:
        if (d / "metrics.csv").exists() and len(read_rows(d / "metrics.csv")) >= 1:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the job ended before it could be interrupted"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    kept = len(read_rows(d / "metrics.csv"))
    assert p.returncode == 130 and "Traceback" not in err, (p.returncode, kept, err[-2000:])
    assert kept < 12
    (line,) = error_lines(err)
    assert line.startswith(f"interrupted: {kept} row(s) kept in {d / 'metrics.csv'}; resume with: python run.py ")
    resume = line.split("resume with: ", 1)[1]
    assert resume.endswith(f"hydra.run.dir={d}") and all(a in resume.split() for a in args[:-1])
    r = subprocess.run(resume.replace("python run.py", f"{sys.executable} {ROOT / 'run.py'}", 1), shell=True,
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ids = [row["image_id"] for row in read_rows(d / "metrics.csv")]
    assert len(ids) == 12 == len(set(ids))


# ------------------------------------------------------------------------------------------ newcomer items
def test_newcomer_one_line_summary_prints_the_tables_interval(tmp_path, capsys):
    from reddiff.report.stats import interval, read_metric

    d = tmp_path / "D"
    s = job(d)
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("[reddiff] ") and " on " in ln and "images |" in ln]
    iv = interval(read_metric(d, "psnr"))
    assert iv["n_clusters"] == 3 and iv["half"] > 2 * s["metrics"]["psnr"]["ci95"]  # 3 photos: wider than naive
    assert f"psnr {iv['mean']:.2f} ± {iv['half']:.2f}" in line
    assert line.endswith("(±: 95% t-interval over the 3 per-photo means (12 images = 3 photos x crops, 2 df))")


def test_newcomer_one_line_says_when_its_interval_is_naive():
    from reddiff.store.formatting import one_line

    s = {"sampler": "x", "task": "t", "n_images": 2, "metrics": {"psnr": {"mean": 20.0, "ci95": 1.0}}, "cost": {}}
    assert one_line(s) == "x on t: 2 images | psnr 20.00 ± 1.00 (±: naive 1.96 sd/sqrt(n))"


def test_newcomer_claims_rerun_leaves_the_file_when_only_the_date_differs(tmp_path):
    from reddiff.report.claims import main

    out = tmp_path / "claims.md"
    main(["--out", str(out)])
    text = out.read_text()
    import re

    dated = re.sub(r"\b\d{4}-\d{2}-\d{2}\b", "1999-01-01", text, count=1)
    assert dated != text
    out.write_text(dated)
    main(["--out", str(out)])
    assert out.read_text() == dated                              # nothing but the date would change: untouched
    out.write_text(dated.replace("holds", "HOLDS", 1))
    main(["--out", str(out)])
    assert out.read_text() == text                               # a real change is written


def test_newcomer_sweep_command_keeps_hydra_overrides(tmp_path):
    from omegaconf import OmegaConf

    from reddiff.run.sweep_callback import SweepTableCallback

    d = tmp_path / "sweep"
    shutil.copytree(ROOT / "results" / "demo_sr4", d)
    (d / "table.md").unlink()
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(d)}, "overrides": {
        "task": ["sampler=reddiff,dps", "data.count=2"],
        "hydra": ["hydra.sweeper.n_trials=3", "hydra.run.dir='/a b'", "hydra.mode=MULTIRUN"]}}, "logger": {}})
    SweepTableCallback().on_multirun_end(cfg)
    first = (d / "table.md").read_text().split("\n", 1)[0]
    assert first.startswith("Command: `python run.py -m sampler=reddiff,dps data.count=2 hydra.sweeper.n_trials=3 "
                            "'hydra.run.dir='\"'\"'/a b'\"'\"''` (")


def test_newcomer_sweep_key_a_sampler_lacks_makes_that_job_na(tmp_path):
    d = tmp_path / "S"
    p = cli("-m", "sampler=reddiff,pinv", "sampler.steps=2", "data.count=1", "logger=none", "metrics=fast",
            "progress=false", f"hydra.sweep.dir={d}", timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((d / "0_sr4_reddiff" / "summary.json").read_text())["status"] == "ok"
    na = json.loads((d / "1_sr4_pinv" / "summary.json").read_text())
    assert na["status"] == "n/a" and na["reason"] == ("sampler pinv has no setting steps (set on the command line "
                                                      "for the other samplers of the sweep)")
    table = (d / "table.md").read_text()
    assert "| sampler=pinv | sr4 | pinv | 0 | n/a |" in table


def test_newcomer_single_run_with_a_foreign_key_is_still_an_error(tmp_path):
    from reddiff.run.experiment import run

    with pytest.raises(UserError, match="unexpected keyword argument 'steps'"):
        run(compose_cfg("logger=none", "progress=false", "sampler=pinv", "++sampler.steps=2"), tmp_path / "D")
    assert not (tmp_path / "D" / "summary.json").exists()


def test_newcomer_packaging_declares_its_data_and_leaves_no_build_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "reddiff", "conf", "baselines", "benchmarks"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "whl")], cwd=src, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "would be ignored" not in p.stdout + p.stderr and "Warning" not in p.stdout + p.stderr, p.stderr[-2000:]
    assert not (src / "build").exists()
    import zipfile

    (whl,) = (tmp_path / "whl").glob("*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    yamls = {f"reddiff/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert yamls <= names and "reddiff/assets/demo/astronaut_full.png" in names
    solvers = {f"reddiff/baselines/{p.name}" for p in (ROOT / "baselines").glob("*.py")}
    assert solvers <= names, sorted(solvers - names)
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"reddiff"}, tops  # nothing named baselines or benchmarks in site-packages


def test_newcomer_fingerprint_keeps_the_old_sampler_module_names():
    """Folders made before ``baselines.*`` became ``reddiff.baselines.*`` resume: the committed fingerprint of a
    demo job names its sampler as the current config's fingerprint does."""
    from reddiff.store.jobdir import fingerprint

    committed = json.loads((ROOT / "results" / "demo_sr4" / "1_sr4_dps" / "fingerprint.json").read_text())
    now = fingerprint({"sampler": {"_target_": "reddiff.baselines.dps.DPS"}, "task": {"_target_": "x.Y"}})["values"]
    assert now["sampler._target_"] == committed["values"]["sampler._target_"] == '"baselines.dps.DPS"'
    assert now["task._target_"] == '"x.Y"'


def test_newcomer_installed_claims_without_results_is_one_line(tmp_path, monkeypatch, capsys):
    import reddiff.report.claims as C

    monkeypatch.setattr(C, "RES", tmp_path / "site-packages" / "results")
    assert C.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no committed results at {tmp_path / 'site-packages' / 'results'}: ")
    assert err.count("\n") == 1


def test_weights_matching_no_pin_are_named_in_the_one_line_summary():
    from reddiff.store.formatting import one_line

    s = {"sampler": "x", "task": "t", "n_images": 1, "metrics": {}, "cost": {},
         "weights": {"/w/renamed.pt": {"sha256": "ab", "verified_as": None, "state": "unregistered"},
                     "/w/adm.pt": {"sha256": "cd", "verified_as": "adm", "state": "verified"}}}
    assert one_line(s) == "x on t: 1 images | weights matching no pinned sha256: renamed.pt"


def test_row01_lock_falls_back_to_the_lock_file_where_folders_cannot_be_locked(tmp_path, monkeypatch):
    """NFS emulates flock with byte-range locks, which a folder's read-only descriptor cannot take: the lock then
    falls back to the .lock file, and a second writer is still refused."""
    import fcntl
    import stat

    import reddiff.store.jobdir as J

    real = fcntl.flock

    def nfs_like(fd, op):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real(fd, op)

    monkeypatch.setattr(J.fcntl, "flock", nfs_like)
    d = tmp_path / "D"
    lock = J.JobLock(d).acquire()
    try:
        assert (d / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(UserError, match=f"in use by another run \\(PID {os.getpid()}\\)"):
            J.JobLock(d).acquire()
        with pytest.raises(UserError, match="in use by another run"):
            J.probe_lock(d)
    finally:
        lock.release()
    J.probe_lock(d)
    J.JobLock(d).acquire().release()


def test_newcomer_sampler_keys_are_forced_only_where_a_swept_sampler_lacks_them():
    from reddiff.run.entry import sweep_safe_sampler_keys as f

    assert f(["sampler.steps=2"]) == ["sampler.steps=2"]                                  # a single run: Hydra's error
    assert f(["-m", "sampler=reddiff,dps", "sampler.steps=2"]) == ["-m", "sampler=reddiff,dps", "sampler.steps=2"]
    assert f(["-m", "sampler=reddiff,pinv", "sampler.steps=2"])[-1] == "++sampler.steps=2"
    assert f(["-m", "+experiment=demo_sr4", "sampler.steps=2"])[-1] == "++sampler.steps=2"  # the preset's sweep
