"""Crash-safe per-image results of one job.

* ``metrics.csv`` rows are appended one whole line per ``write`` call, flushed and fsynced, so a
  ``kill -9`` can at worst leave one partial last line; it is detected (no trailing newline or a wrong
  field count) and dropped on the next open, and that image is redone.
* Per-image features (for set-level metrics) and PNGs are written to a temp file and renamed *before*
  the CSV row, so a row on disk implies its files are complete.
* Rerunning in the same job dir skips images whose row exists and never duplicates a row.
"""
from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

TRAILING = ("nfe", "seconds", "diverged", "diverged_step")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` (atomically) unless the file already says the same apart from its dates, so a
    rebuild that changes nothing leaves a tracked file (and ``git status``) untouched.  Returns whether it wrote."""
    path = Path(path)
    if path.is_file():
        try:
            old = path.read_text()
        except (OSError, UnicodeDecodeError):
            old = None
        if old is not None and _DATE.sub("<date>", old) == _DATE.sub("<date>", text):
            return False
    atomic_write_text(path, text)
    return True


class ResultStore:
    def __init__(self, job_dir: Path, metric_names: Iterable[str], resume: bool = True):
        self.dir = Path(job_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "features").mkdir(exist_ok=True)
        (self.dir / "images").mkdir(exist_ok=True)
        self.columns = ["image_id", *metric_names, *TRAILING]
        self.csv_path = self.dir / "metrics.csv"
        self.repaired = 0
        if self.csv_path.exists() and not resume:
            raise FileExistsError(f"{self.csv_path} exists and resume=false; choose a new hydra.run.dir")
        self.rows = self._load()
        if not self.csv_path.exists() or not self.rows and self.csv_path.stat().st_size == 0:
            self._rewrite([])

    # ------------------------------------------------------------------------------------------ io
    def _load(self) -> list[dict]:
        if not self.csv_path.exists():
            return []
        raw = self.csv_path.read_text()
        lines = raw.split("\n")
        if not lines or lines[0].split(",") != self.columns:
            if raw.strip():
                head = lines[0]
                raise ValueError(f"{self.csv_path} has columns {head!r}, expected {','.join(self.columns)}: "
                                 "the job config changed; use a new hydra.run.dir")
            return []
        good, seen = [], set()
        complete = lines[1:-1] if not raw.endswith("\n") else lines[1:]
        dropped = 0 if raw.endswith("\n") else 1
        for line in complete:
            if not line:
                continue
            fields = next(csv.reader([line]))
            if len(fields) != len(self.columns) or fields[0] in seen:
                dropped += 1
                continue
            seen.add(fields[0])
            good.append(dict(zip(self.columns, fields)))
        if dropped:
            self.repaired = dropped
            self._rewrite(good)
        return good

    def _rewrite(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(self.csv_path, buf.getvalue())

    def done_ids(self) -> set[str]:
        return {r["image_id"] for r in self.rows}

    def append(self, row: dict, features: dict[str, np.ndarray] | None = None) -> None:
        """Persist one image: features first (atomic), then the CSV line (single write, fsync)."""
        if row["image_id"] in self.done_ids():
            return
        if any(c in str(row["image_id"]) for c in "\r\n"):  # would split its row in two (data.base.safe_id)
            raise ValueError(f"image id {row['image_id']!r} holds a line break; it cannot be one row of metrics.csv")
        if features:
            buf = io.BytesIO()
            np.savez(buf, **features)
            atomic_write_bytes(self.features_path(row["image_id"]), buf.getvalue())
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n").writerow(
            {k: _fmt(row.get(k)) for k in self.columns})
        with open(self.csv_path, "a") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        self.rows.append({k: _fmt(row.get(k)) for k in self.columns})

    def features_path(self, image_id: str) -> Path:
        return self.dir / "features" / f"{safe_name(image_id)}.npz"

    def load_features(self, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
        return load_features([self.features_path(i) for i in image_ids])


def safe_name(image_id: str) -> str:
    """A file name for an image id (ids of nested folders may contain path separators)."""
    return str(image_id).replace("/", "__").replace("\\", "__")


def load_features(paths: Iterable[Path]) -> dict[str, np.ndarray]:
    """Stack per-image feature files (missing files are skipped) into arrays keyed by feature name."""
    acc: dict[str, list] = {}
    for p in paths:
        if not Path(p).exists():
            continue
        with np.load(p) as z:
            for k in z.files:
                acc.setdefault(k, []).append(z[k])
    return {k: np.stack(v) for k, v in acc.items()}


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "" if v != v else repr(round(v, 6))
    return str(v)


def read_rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        raw = f.read()
    if not raw.endswith("\n"):
        raw = raw[: raw.rfind("\n") + 1]
    return list(csv.DictReader(io.StringIO(raw)))
