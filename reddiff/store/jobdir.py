"""A job folder belongs to one configuration and has one writer at a time.

* **Fingerprint.**  The first run writes ``fingerprint.json``: every resolved config value that changes results
  (task and operator, sampler and its hyperparameters, prior and its weights' sha256, data set and selection,
  seed, batch size, metric list), flattened to ``a.b.c`` keys.  A rerun with the same fingerprint resumes; a
  different one is refused with one line naming the differing keys and the two ways out (another folder, or
  ``archive=true``, which moves the old results into ``archived/<time>/``).  Keys in :data:`EXCLUDE` only change
  how a job runs or is logged, not its rows.  ``merge_key`` leaves out the sharding keys, the one difference
  allowed between shards that ``python -m reddiff.tables`` merges.
* **Lock.**  :class:`JobLock` holds ``fcntl.flock`` on ``.lock`` for the job's lifetime; a second process is
  refused at once (non-blocking) with the holder's PID.  The kernel drops the lock when its holder dies, so a
  lock left by ``kill -9`` never blocks a rerun.
* **Inputs log.**  ``inputs.json`` keeps the skipped (corrupt) images and the converted ones (alpha dropped,
  up/down-scaled) across resumed runs, so ``summary.json`` counts them all and a resume does not redo them.
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
           "metrics.ref_cache_dir")
SHARD_KEYS = ("data.shard", "data.num_shards")
#: keys added after results were made, at the value that reproduces those results: left out of the fingerprint at
#: that value, so folders made before the key existed still resume
DEFAULTS_BEFORE = {"prior.dialect": '"vp_discrete"'}
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


def fingerprint(resolved: dict, weights_sha256: Optional[str] = None) -> dict:
    """``{"values": {dotted key: json value}, "merge_key": sha256 without the sharding keys}``."""
    values = {k: v for k, v in _flatten(resolved).items() if not _excluded(k) and DEFAULTS_BEFORE.get(k) != v}
    if weights_sha256 is not None:
        values["prior.weights_sha256"] = json.dumps(weights_sha256)
    merge = {k: v for k, v in values.items() if k not in SHARD_KEYS}
    return {"values": values, "merge_key": hashlib.sha256(json.dumps(merge, sort_keys=True).encode()).hexdigest()}


def differing(old: dict, new: dict) -> list[str]:
    a, b = old.get("values", {}), new.get("values", {})
    return sorted((k for k in set(a) | set(b) if a.get(k) != b.get(k)), key=lambda k: (k.count("."), k))


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


class JobLock:
    """``fcntl.flock`` on ``<job_dir>/.lock`` (non-blocking); the file holds the holder's PID."""

    def __init__(self, job_dir: Path):
        self.path = Path(job_dir) / ".lock"
        self.fd: Optional[int] = None

    def acquire(self) -> "JobLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{self.path.parent} is in use by another run (PID {holder}); wait for it to finish "
                            "or use another folder") from None
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
    """Raise the :class:`JobLock` refusal if another process holds ``job_dir``'s lock; never creates or writes the
    lock file (a probe must not look like a holder), and holds the lock only for the instant of the test."""
    path = Path(job_dir) / ".lock"
    if not path.exists():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        raise UserError(f"{path.parent} is in use by another run (PID {holder}); wait for it to finish "
                        "or use another folder") from None
    finally:
        os.close(fd)  # closing the descriptor releases a lock taken here


class InputsLog:
    """Skipped and converted inputs of a job dir, kept across resumed runs (``inputs.json``)."""

    def __init__(self, job_dir: Path):
        self.path = Path(job_dir) / "inputs.json"
        d = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.skipped: dict[str, str] = {s["image_id"]: s["reason"] for s in d.get("skipped", [])}
        self.converted: dict[str, list[str]] = d.get("converted", {})

    def update(self, skipped: dict[str, str], converted: dict[str, list[str]]) -> None:
        if not skipped and not converted:
            return
        self.skipped.update(skipped)
        self.converted.update(converted)
        atomic_write_text(self.path, json.dumps(self.as_dict(), indent=1))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for kinds in self.converted.values():
            for k in kinds:
                out[k] = out.get(k, 0) + 1
        return out

    def as_dict(self) -> dict:
        return {"skipped": [{"image_id": k, "reason": v} for k, v in self.skipped.items()],
                "converted": self.converted, "converted_counts": self.counts()}
