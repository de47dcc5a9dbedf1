"""Tables from a sweep (or any folder of job dirs); the command line is :mod:`reddiff.tables`.

Rows are jobs (one per sampler / setting), columns are metrics as mean ± 95% CI, then NFE and s/image, then
the published values ("paper" columns, with their provenance tag) where they exist.  Shards of the same job
(``data.shard=i``) are merged first: per-image rows are concatenated and set-level metrics (KID/FID/top-1)
are recomputed over the merged per-image features, never averaged across shards.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from reddiff.report.anchors import lookup
from reddiff.store.aggregate import compute_metrics
from reddiff.store.formatting import fmt_metric
from reddiff.store.results import load_features, read_rows, safe_name, write_if_changed

SHARD_RE = re.compile(r"^(\+*data\.shard|\+*data\.num_shards|hydra\..*|resume|progress|device)=")
METRIC_ORDER = ["psnr", "ssim", "lpips", "kid", "fid", "top1", "top5"]
#: header labels with units where a metric is scaled (KID is stored x10^3, the unit the official code logs)
UNITS = {"kid": "kid (×10³)", "psnr": "psnr (dB)", "top1": "top1 (%)", "top5": "top5 (%)"}


def unit_label(metric: str) -> str:
    return UNITS.get(metric, metric)


def find_jobs(root: Path) -> list[Path]:
    root = Path(root)
    return sorted({p.parent for name in ("summary.json", "metrics.csv", "error.txt") for p in root.rglob(name)},
                  key=lambda p: _num_key(p.relative_to(root).as_posix()))


def _num_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _load(job: Path) -> dict:
    s = job / "summary.json"
    if s.exists():
        return json.loads(s.read_text())
    err = job / "error.txt"
    if err.exists():
        return {"status": "error", "reason": err.read_text().strip(), "task": "?", "sampler": job.name,
                "metrics": {}, "cost": {}, "overrides": []}
    return {"status": "incomplete", "task": "?", "sampler": job.name, "metrics": {}, "cost": {}, "overrides": []}


def _group_key(summary: dict) -> tuple:
    """Jobs merged as shards: same identity and overrides but the sharding keys, and (when recorded) the same
    configuration fingerprint without the sharding keys (reddiff.store.jobdir)."""
    ov = [o for o in summary.get("overrides", []) if not SHARD_RE.match(o)]
    merge = (summary.get("fingerprint") or {}).get("merge_key")
    return (summary.get("task"), summary.get("sampler"), summary.get("prior"), summary.get("data"), tuple(sorted(ov)),
            merge)


def merge_shards(jobs: list[Path], summaries: list[dict]) -> dict:
    """Merge the per-image rows and features of shard jobs and recompute every metric."""
    from hydra.utils import instantiate

    rows, feat_paths = [], []
    seen = set()
    for job in jobs:
        if not (job / "metrics.csv").exists():
            continue
        for r in read_rows(job / "metrics.csv"):
            if r["image_id"] in seen:
                continue
            seen.add(r["image_id"])
            rows.append(r)
            if r.get("diverged") != "true":
                feat_paths.append(job / "features" / f"{safe_name(r['image_id'])}.npz")
    base = dict(summaries[0])
    suite = instantiate(base["config"]["metrics"])
    base["metrics"] = compute_metrics(rows, suite, load_features(feat_paths))
    import numpy as np

    base["n_images"] = len(rows)
    base["cost"] = dict(base.get("cost", {}))
    base["cost"]["nfe_per_image"] = float(np.mean([float(r["nfe"]) for r in rows])) if rows else None
    base["cost"]["seconds_per_image"] = float(np.mean([float(r["seconds"]) for r in rows])) if rows else None
    base["cost"]["peak_rss_mb"] = max((s.get("cost", {}).get("peak_rss_mb") or 0) for s in summaries)
    base["diverged"] = sum(r.get("diverged") == "true" for r in rows)
    base["merged_shards"] = len(jobs)
    base["overrides"] = [o for o in base.get("overrides", []) if not SHARD_RE.match(o)]
    return base


def collect(root: Path) -> list[dict]:
    jobs = find_jobs(root)
    groups: dict[tuple, list] = {}
    for job in jobs:
        s = _load(job)
        s["_dir"] = str(job)
        groups.setdefault(_group_key(s), []).append((job, s))
    out = []
    for members in groups.values():
        if len(members) > 1 and all(s.get("status") == "ok" for _, s in members):
            merged = merge_shards([j for j, _ in members], [s for _, s in members])
            merged["_dir"] = ", ".join(str(j) for j, _ in members)
            out.append(merged)
        else:
            out.extend(s for _, s in members)
    return out


def _label(summary: dict, varying: set) -> str:
    ov = [o for o in summary.get("overrides", []) if o.split("=")[0] in varying and not SHARD_RE.match(o)]
    return " ".join(ov) if ov else f"{summary.get('task')} / {summary.get('sampler')}"


def build_rows(summaries: list[dict], ref: str | None = None) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and footnotes of the table.  Per-image metrics show ``mean ± half-width`` of the interval of
    :mod:`reddiff.report.stats` (clustered by source photo, recomputed from each job's metrics.csv); ``ref`` (a sampler
    name) adds the paired difference of each job's first metric to that sampler's job on the same task."""
    from reddiff.report import stats
    metrics = [m for m in METRIC_ORDER if any(m in s.get("metrics", {}) for s in summaries)]
    keys = {}
    for s in summaries:
        for o in s.get("overrides", []):
            k, _, v = o.partition("=")
            keys.setdefault(k, set()).add(v)
    varying = {k for k, vs in keys.items() if len(vs) > 1 or len(summaries) == 1}
    paper_metrics = [m for m in METRIC_ORDER if any(m in lookup(s.get("task"), s.get("sampler")) for s in summaries)]
    header = (["job", "task", "sampler", "n"] + [unit_label(m) for m in metrics] + ["NFE/img", "s/img"]
              + [f"paper {unit_label(m)}" for m in paper_metrics])
    refs = {s.get("task"): s for s in summaries if ref and s.get("sampler") == ref and s.get("status") == "ok"}
    if ref:
        header.append(f"Δ{metrics[0]} vs {ref} [95%]" if metrics else f"Δ vs {ref}")
    rows, sources, methods = [], {}, set()
    for s in summaries:
        if s.get("status") == "n/a":
            cells = ["n/a"] * len(metrics) + ["-", "-"]
        elif s.get("status") != "ok":
            cells = [s.get("status", "?")] * len(metrics) + ["-", "-"]
        else:
            ivs = stats.table_intervals(s.get("_dir"), [m for m in metrics if m not in ("kid", "fid", "top1", "top5")])
            methods.update(iv["method"] for iv in ivs.values() if iv.get("half") is not None)
            cells = [stats.interval_cell(ivs[m], 3 if m in ("ssim", "lpips") else 2)
                     if m in ivs and not s["metrics"].get(m, {}).get("diverged")
                     else fmt_metric(s["metrics"].get(m, {"missing": "not requested"}), 3 if m in ("ssim", "lpips") else 2)
                     for m in metrics]
            c = s.get("cost", {})
            cells += [f"{c['nfe_per_image']:.0f}" if c.get("nfe_per_image") is not None else "-",
                      f"{c['seconds_per_image']:.2f}" if c.get("seconds_per_image") is not None else "-"]
        paper = lookup(s.get("task"), s.get("sampler"))
        pcells = []
        for m in paper_metrics:
            if m in paper:
                v, tag, src = paper[m]
                sources[src] = True
                pcells.append(f"{v:g} ({tag})")
            else:
                pcells.append("")
        if ref:
            r = refs.get(s.get("task"))
            pcells.append("" if r is None or r is s or not metrics or s.get("status") != "ok" else stats.fmt_interval(
                stats.paired(stats.read_metric(Path(s["_dir"]), metrics[0]),
                             stats.read_metric(Path(r["_dir"]), metrics[0])), signed=True))
        rows.append([_label(s, varying), str(s.get("task")), str(s.get("sampler")), str(s.get("n_images", 0))] + cells + pcells)
    notes = [f"±: {m}" for m in sorted(methods)]
    if ref:
        notes.append(f"Δ vs {ref}: paired per-image difference on the same images, same interval rule")
    missing = {}
    for s in summaries:
        for m, v in s.get("metrics", {}).items():
            if "missing" in v and not v.get("diverged"):
                missing[m] = v["missing"]
    for m, reason in missing.items():
        notes.append(f"{m}: missing — {reason}")
    for s in summaries:
        if s.get("diverged"):
            notes.append(f"{s.get('sampler')} on {s.get('task')}: {s['diverged']} of {s.get('n_images')} images diverged "
                         "(non-finite iterate; step in summary.json)")
        if s.get("status") in ("n/a", "error"):
            notes.append(f"{s['status']} ({s.get('sampler')} on {s.get('task')}): {s.get('reason')}")
    if sources:
        notes.append("paper columns: " + "; ".join(sources) + " (tags: paper* = public transcription of the paper, "
                     "unverified = approximate; ImageNet-256/ADM numbers, not comparable in absolute value to the embedded prior)")
    return header, rows, notes


def render(header, rows, notes, fmt: str = "md") -> str:
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        return buf.getvalue()
    if fmt == "tex":
        esc = lambda t: t.replace("±", r"$\pm$").replace("_", r"\_").replace("%", r"\%")  # noqa: E731
        lines = [r"\begin{tabular}{" + "l" * 3 + "r" * (len(header) - 3) + "}", r"\toprule",
                 " & ".join(esc(h) for h in header) + r" \\", r"\midrule"]
        lines += [" & ".join(esc(c) for c in r) + r" \\" for r in rows]
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    if notes:
        out.append("")
        out += [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def provenance_line(root: Path) -> str | None:
    """The ``Command: ...`` first line of an existing table.md (kept when the table is rebuilt)."""
    p = Path(root) / "table.md"
    if not p.is_file():
        return None
    first = p.read_text().split("\n", 1)[0]
    return first if first.startswith("Command:") else None


#: how a table records its paired-difference reference: ``--ref NAME`` on the provenance line, or (tables written
#: before that) the ``Δ<metric> vs NAME`` header cell
REF_ON_LINE = re.compile(r"--ref (\S+?)`?(?:\)|\s|$)")
REF_IN_HEADER = re.compile(r"\| Δ\S* vs (\S+)(?: \[95%\])? \|")


def recorded_ref(root: Path) -> str | None:
    """The reference sampler of an existing table.md (its provenance), so a rebuild keeps the ``Δ vs`` column."""
    line = provenance_line(root)
    refs = REF_ON_LINE.findall(line or "")
    if refs:
        return refs[-1]
    p = Path(root) / "table.md"
    if not p.is_file():
        return None
    head = next((ln for ln in p.read_text().splitlines() if ln.startswith("| job |")), "")
    m = REF_IN_HEADER.search(head)
    return m.group(1) if m else None


def write_tables(root: Path, command: str | None = None, ref: str | None = None) -> str:
    """Write table.md/table.csv of ``root``; ``command`` starts a new provenance line, else the old one is kept.
    ``ref`` None keeps the reference the table already records (:func:`recorded_ref`); a new one is added to the
    provenance line.  Raises :class:`~reddiff.core.errors.UserError` (and writes nothing) when ``root`` holds
    no job."""
    from reddiff.core.errors import UserError

    root = Path(root)
    summaries = collect(root)
    if not summaries:
        raise UserError(f"no job dirs (summary.json / metrics.csv) under {root}; nothing written")
    old_ref = None if command else recorded_ref(root)
    ref = ref or old_ref
    header, rows, notes = build_rows(summaries, ref=ref)
    md = render(header, rows, notes, "md")
    line = provenance_line(root) if not command else None
    if command:
        import datetime

        line = f"Command: `{command}` ({datetime.date.today().isoformat()})"
    if line and ref and ref != old_ref:  # the newest reference replaces an older one on the line
        line = re.sub(r"; table: `[^`]*`$", "", line) + f"; table: `python -m reddiff.tables {root.name} --ref {ref}`"
    if line:
        md = line + "\n\n" + md
    write_if_changed(root / "table.md", md)  # a rebuild that changes nothing but the date leaves the file as it is
    write_if_changed(root / "table.csv", render(header, rows, notes, "csv"))
    return md
