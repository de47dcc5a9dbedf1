"""A job folder belongs to one configuration and has one writer at a time.

* **Fingerprint.**  The first run writes ``fingerprint.json``: every resolved config value that changes results
  (task and operator, sampler and its hyperparameters, prior and its weights' sha256, data set and selection,
  seed, batch size, metric list), flattened to ``a.b.c`` keys.  A rerun with the same fingerprint resumes; a
  different one is refused with one line naming the differing keys and the two ways out (another folder, or
  ``archive=true``, which moves the old results into ``archived/<time>/``).  Keys in :data:`EXCLUDE` only change
  how a job runs or is logged, not its rows.  ``merge_key`` leaves out the sharding keys, the one difference
  allowed between shards that ``python -m reddiff.tables`` merges.
* **Lock.**  :class:`JobLock` holds ``fcntl.flock`` on the job folder itself for the job's lifetime (``.lock``
  only names the holder's PID, so deleting it lets no one in); a second process is refused at once
  (non-blocking) with the holder's PID.  The kernel drops the lock when its holder dies, so a
  lock left by ``kill -9`` never blocks a rerun.
* **Inputs log.**  ``inputs.json`` keeps the skipped (corrupt) images and the converted ones (alpha dropped,
  up/down-scaled) across resumed runs, so ``summary.json`` counts them all and a resume does not redo them,
  and the sha256 of every input file a row was computed from: a resume over changed files is refused.
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from reddiff.core.errors import UserError
from reddiff.store.results import atomic_write_text

#: top-level / dotted keys that do not change a job's rows (how it runs, logs, or draws)
EXCLUDE = ("resume", "progress", "device", "save_images", "grid_images", "logger", "experiment_name", "hydra",
           "archive", "sweep_grid", "task.hparams", "prior.device", "metrics.device", "metrics.ref_cache",
           "metrics.ref_cache_dir", "tuned.table")
# ``tuned.table`` is every tuned setting of the preset; what a job ran with is ``tuned.applied`` (fingerprinted), so a
# sweep with +tuned resumes after other samplers or tasks were tuned
SHARD_KEYS = ("data.shard", "data.num_shards")
#: keys added after results were made, at the value that reproduces those results: left out of the fingerprint at
#: that value, so folders made before the key existed still resume
DEFAULTS_BEFORE = {"prior.dialect": '"vp_discrete"', "sampler.parallel": "1"}
#: modules renamed after results were made: a ``_target_`` is fingerprinted by its name before the rename, so folders
#: made before still resume (``baselines.dps.DPS`` became ``reddiff.baselines.dps.DPS`` when the harness stopped
#: installing a top-level ``baselines`` package)
RENAMED = {'"reddiff.baselines.': '"baselines.'}
FINGERPRINT = "fingerprint.json"
RESULT_FILES = ("metrics.csv", "summary.json", "features", "images", "grid.png", "inputs.json", FINGERPRINT,
                "error.txt")


def _flatten(d: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(d, dict):
        out: dict[str, str] = {}
        for k in sorted(d, key=str):
            out.update(_flatten(d[k], f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(d, sort_keys=True, default=str)}


def _excluded(key: str) -> bool:
    return any(key == e or key.startswith(e + ".") for e in EXCLUDE)


def _renamed(key: str, value: str) -> str:
    if key.endswith("_target_"):
        for new, old in RENAMED.items():
            if value.startswith(new):
                return old + value[len(new):]
    return value


def fingerprint(resolved: dict, weights_sha256: Optional[str] = None) -> dict:
    """``{"values": {dotted key: json value}, "merge_key": sha256 without the sharding keys}``."""
    values = {k: _renamed(k, v) for k, v in _flatten(resolved).items()
              if not _excluded(k) and DEFAULTS_BEFORE.get(k) != v}
    if weights_sha256 is not None:
        values["prior.weights_sha256"] = json.dumps(weights_sha256)
    merge = {k: v for k, v in values.items() if k not in SHARD_KEYS}
    return {"values": values, "merge_key": hashlib.sha256(json.dumps(merge, sort_keys=True).encode()).hexdigest()}


def differing(old: dict, new: dict) -> list[str]:
    a, b = old.get("values", {}), new.get("values", {})
    keys = (k for k in set(a) | set(b) if not _excluded(k))   # an old fingerprint may hold keys excluded since
    return sorted((k for k in keys if a.get(k) != b.get(k)), key=lambda k: (k.count("."), k))


def _has_results(job_dir: Path) -> bool:
    csv = job_dir / "metrics.csv"
    rows = csv.exists() and len(csv.read_text().splitlines()) > 1
    return rows or (job_dir / "summary.json").exists()


def _show(v: Optional[str]) -> str:
    if v is None:
        return "(unset)"
    return v if len(v) <= 40 else v[:37] + "..."


def bind(job_dir: Path, fp: dict, resume: bool = True, archive: bool = False) -> Optional[Path]:
    """Bind ``job_dir`` to the fingerprint ``fp`` (see module doc); returns the archive folder when one was made."""
    job_dir = Path(job_dir)
    path = job_dir / FINGERPRINT
    ways = (f"use another folder (hydra.run.dir=...), or add archive=true to move the old results to "
            f"{job_dir}/archived/ and start afresh")
    archived = None
    if _has_results(job_dir) or path.exists():
        old = None
        if path.exists():
            old = json.loads(path.read_text())
        elif (job_dir / "summary.json").exists():  # made before fingerprints existed: compare its config
            cfg = json.loads((job_dir / "summary.json").read_text()).get("config")
            old = fingerprint(cfg) if cfg else None
        diff = differing(old, fp) if old is not None else ["(no fingerprint)"]
        if old is not None and "prior.weights_sha256" not in old.get("values", {}):  # a pre-fingerprint folder
            diff = [k for k in diff if k != "prior.weights_sha256"]
        if archive and _has_results(job_dir):
            archived = archive_results(job_dir)
        elif diff and _has_results(job_dir):
            if old is None:
                raise UserError(f"{job_dir} holds results without a fingerprint; {ways}")
            shown = ", ".join(f"{k} {_show(old['values'].get(k))} -> {_show(fp['values'].get(k))}" for k in diff[:6])
            more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
            raise UserError(f"{job_dir} holds results of a different configuration ({shown}{more}); {ways}")
        elif not resume and _has_results(job_dir):
            raise UserError(f"{job_dir} already holds results and resume=false; {ways}")
    atomic_write_text(path, json.dumps(fp, indent=1, sort_keys=True))
    return archived


def archive_results(job_dir: Path) -> Path:
    dest = job_dir / "archived" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    dest.mkdir(parents=True)
    for name in RESULT_FILES:
        if (job_dir / name).exists():
            shutil.move(str(job_dir / name), str(dest / name))
    print(f"[reddiff] earlier results of {job_dir} moved to {dest}")
    return dest


def _holder(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()[:64] or "?"
    except OSError:
        return "?"


def _busy(job_dir: Path) -> UserError:
    return UserError(f"{job_dir} is in use by another run (PID {_holder(Path(job_dir) / '.lock')}); wait for it "
                     "to finish or use another folder")


def _locks_folder(fd: int) -> bool:
    import stat

    return stat.S_ISDIR(os.fstat(fd).st_mode)


def _try_flock(fd: int) -> Optional[bool]:
    """Non-blocking exclusive ``flock``: True when taken, False when another process holds it, None when the file
    system cannot lock this descriptor."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return None


def _lock_fd(job_dir: Path, create: bool) -> Optional[int]:
    """A descriptor holding ``flock`` on ``job_dir``; None when another process holds it.  A file system that
    cannot lock a folder (NFS emulates flock with byte-range locks, which a read-only descriptor cannot take)
    falls back to locking the ``.lock`` file; -1 when that file does not exist and ``create`` is false."""
    fd = os.open(job_dir, os.O_RDONLY | os.O_DIRECTORY)
    got = _try_flock(fd)
    if got is None:
        os.close(fd)
        lock = Path(job_dir) / ".lock"
        if not create and not lock.exists():
            return -1
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        got = _try_flock(fd)
        if got is None:
            os.close(fd)
            raise OSError(f"cannot lock {job_dir} or {lock} (flock not supported)")
    if not got:
        os.close(fd)
        return None
    return fd


class JobLock:
    """``fcntl.flock`` on the job folder itself (non-blocking), so deleting ``.lock`` under a running holder
    cannot let a second writer in; ``.lock`` only holds the holder's PID for the refusal message."""

    def __init__(self, job_dir: Path):
        self.path = Path(job_dir) / ".lock"
        self.fd: Optional[int] = None

    def acquire(self) -> "JobLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock_fd(self.path.parent, create=True)
        if fd is None:
            raise _busy(self.path.parent)
        if _locks_folder(fd):
            atomic_write_text(self.path, f"{os.getpid()}\n")
        else:  # the fallback locks .lock itself: write in place, never replace the locked file
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "JobLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def probe_lock(job_dir: Path) -> None:
    """Raise the :class:`JobLock` refusal if another process holds ``job_dir``; never creates or writes anything
    (a probe must not look like a holder), and holds the lock only for the instant of the test."""
    if not Path(job_dir).is_dir():
        return
    fd = _lock_fd(Path(job_dir), create=False)
    if fd is None:
        raise _busy(Path(job_dir))
    if fd >= 0:
        os.close(fd)  # closing the descriptor releases a lock taken here


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class InputsLog:
    """Skipped and converted inputs of a job dir, kept across resumed runs (``inputs.json``)."""

    def __init__(self, job_dir: Path):
        self.path = Path(job_dir) / "inputs.json"
        d = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.skipped: dict[str, str] = {s["image_id"]: s["reason"] for s in d.get("skipped", [])}
        self.converted: dict[str, list[str]] = d.get("converted", {})
        #: image id -> sha256 of the file its row was computed from (ids of in-memory sources have none)
        self.sha256: dict[str, str] = d.get("sha256", {})

    def update(self, skipped: dict[str, str], converted: dict[str, list[str]],
               sha256: Optional[dict[str, str]] = None) -> None:
        sha256 = {k: v for k, v in (sha256 or {}).items() if self.sha256.get(k) != v}
        if not skipped and not converted and not sha256:
            return
        self.skipped.update(skipped)
        self.converted.update(converted)
        self.sha256.update(sha256)
        atomic_write_text(self.path, json.dumps({**self.as_dict(), "sha256": self.sha256}, indent=1))

    def check_sources(self, dataset, done: set[str]) -> None:
        """Refuse a resume whose input files changed since their rows were written (same ids, other content):
        the folder would mix results of two data sets.  Rows written before hashes were kept are not checked."""
        entries = dataset.entries()
        present = {e.image_id for e in entries}
        gone = sorted(i for i in done if i in self.sha256 and i not in present)
        if gone:
            raise UserError(f"input {gone[0]} is gone from the data ({len(gone)} image(s) with rows in "
                            f"{self.path.parent} are no longer in the selection); use another folder "
                            "(hydra.run.dir=...), or add archive=true to move the old results aside and start afresh")
        for e in entries:
            old = self.sha256.get(e.image_id)
            if old is None or e.image_id not in done:
                continue
            src = dataset.source(e)
            new = file_sha256(src) if isinstance(src, (str, Path)) and Path(src).is_file() else None
            if new != old:
                now = "is gone" if new is None else f"now has sha256 {new[:12]}..., not {old[:12]}..."
                raise UserError(f"input {e.image_id} ({src}) {now}: the data changed since its row was written in "
                                f"{self.path.parent}; use another folder (hydra.run.dir=...), or add archive=true to "
                                "move the old results aside and start afresh")

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for kinds in self.converted.values():
            for k in kinds:
                out[k] = out.get(k, 0) + 1
        return out

    def as_dict(self) -> dict:
        return {"skipped": [{"image_id": k, "reason": v} for k, v in self.skipped.items()],
                "converted": self.converted, "converted_counts": self.counts()}
