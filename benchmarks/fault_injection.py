"""Fault injection: ``kill -9`` jobs at random moments, rerun the same command, and check that the end result is
bit-identical to an uninterrupted run (every image exactly once, every row but its ``seconds`` column, every PNG).

    python -m benchmarks.fault_injection [--kills 5] [--seed 0] [--md results/fault_injection.md]

Two scenarios, each first run once uninterrupted (the reference):
* a 2x2 sweep (``task=sr4,inpaint_box`` x ``sampler=reddiff,dps``) on 6 demo images in batches of 2;
* a single RED-diff job on 6 demo images in batches of 2.
Then the same command is started ``--kills`` times and killed (SIGKILL to its process group) at a moment drawn
uniformly in (0, W) seconds after it took its first job lock, W the reference's wall time after start-up, and
finally run to completion.
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["data.count=6", "batch_size=2", "metrics=fast", "logger=none", "progress=false"]
SCENARIOS = {
    "sweep 2x2": (["-m", "task=sr4,inpaint_box", "sampler=reddiff,dps", "sampler.steps=3", *COMMON],
                  "hydra.sweep.dir"),
    "single job": (["task=sr4", "sampler=reddiff", "sampler.steps=20", *COMMON], "hydra.run.dir"),
}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_for_work(proc: subprocess.Popen, root: Path, timeout: float = 300) -> float:
    """Seconds until ``proc`` holds a job lock under ``root`` (start-up done, work begins)."""
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        for lock in root.rglob(".lock") if root.exists() else []:
            try:
                if lock.read_text().strip() == str(proc.pid):
                    return time.time() - t0
            except OSError:
                pass
        time.sleep(0.02)
    return time.time() - t0


def _rows(d: Path) -> int:
    return sum(max(0, len(p.read_text().splitlines()) - 1) for p in d.rglob("metrics.csv"))


def snapshot(root: Path) -> dict[str, object]:
    """Every result file under ``root``: rows (by job and image id, without seconds) and PNG bytes."""
    from reddiff.store.results import read_rows

    out: dict[str, object] = {}
    for csv in sorted(root.rglob("metrics.csv")):
        job = csv.parent.relative_to(root).as_posix()
        rows = read_rows(csv)
        ids = [r["image_id"] for r in rows]
        out[f"{job}/ids"] = sorted(ids)
        out[f"{job}/duplicates"] = len(ids) - len(set(ids))
        for r in rows:
            out[f"{job}/row/{r['image_id']}"] = {k: v for k, v in r.items() if k != "seconds"}
    for png in sorted(root.rglob("*.png")):
        if "archived" not in png.parts:
            out[png.relative_to(root).as_posix()] = png.read_bytes()
    return out


def scenario(name: str, work: Path, kills: int, rng: random.Random) -> dict:
    args, dir_key = SCENARIOS[name]
    ref, test = work / f"{name.replace(' ', '_')}_ref", work / f"{name.replace(' ', '_')}_killed"
    t0 = time.time()
    p = _start([*args, f"{dir_key}={ref}"])
    startup = _wait_for_work(p, ref)
    if p.wait() != 0:
        raise SystemExit(f"reference run failed: {shlex.join(args)}")
    wall = time.time() - t0
    work = max(0.5, wall - startup)
    events = []
    total = _rows(ref)
    for _ in range(kills):
        left = 1.0 - (_rows(test) if test.exists() else 0) / total  # what a resumed run still has to do
        at = rng.uniform(0, work * max(left, 0.1))
        proc = _start([*args, f"{dir_key}={test}"])
        began = _wait_for_work(proc, test)
        time.sleep(at)
        finished = proc.poll() is not None
        if not finished:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        events.append({"at_s": round(at, 2), "startup_s": round(began, 2),
                       "rows_on_disk": _rows(test) if test.exists() else 0, "finished_before_kill": finished})
    t1 = time.time()
    last = _start([*args, f"{dir_key}={test}"])
    rc = last.wait()
    a, b = snapshot(ref), snapshot(test)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    jobs = [k[:-4] for k in a if k.endswith("/ids")]
    once = all(b.get(f"{j}/ids") == a[f"{j}/ids"] and b.get(f"{j}/duplicates") == 0 and len(a[f"{j}/ids"]) == 6
               for j in jobs)
    return {"name": name, "command": "python run.py " + shlex.join(args), "reference_wall_s": round(wall, 1),
            "reference_work_s": round(work, 1),
            "final_rc": rc, "final_wall_s": round(time.time() - t1, 1), "events": events, "jobs": len(jobs),
            "compared": len(a), "pngs": sum(k.endswith(".png") for k in a), "differences": diff,
            "every_image_once": once}


def report(results: list[dict], seed: int, cmd: str) -> str:
    out = [f"Command: `{cmd}` ({datetime.date.today().isoformat()})", "", "# Fault injection: kill -9 and resume", "",
           "Each scenario runs once uninterrupted (reference), then the same command is started and killed with "
           "SIGKILL (whole process group) at a moment drawn uniformly in (0, W·f) after the process took its first job "
           "lock (start-up done), W the reference's wall time after its own start-up and f the fraction of rows "
           "still missing (at least 0.1), rerun after each kill, and "
           "finally run to completion. "
           f"Kill moments from `random.Random({seed})`.", ""]
    for r in results:
        ok = not r["differences"] and r["every_image_once"] and r["final_rc"] == 0
        out += [f"## {r['name']}", "", f"`{r['command']}`; reference wall {r['reference_wall_s']} s, of which "
                f"W = {r['reference_work_s']} s after start-up; {r['jobs']} job dir(s).", "",
                "| kill | start-up (s) | killed at (s after start-up) | rows on disk after the kill |", "|---|---|---|---|"]
        for i, e in enumerate(r["events"], 1):
            note = " (had already finished)" if e["finished_before_kill"] else ""
            out.append(f"| {i} | {e['startup_s']} | {e['at_s']} | {e['rows_on_disk']}{note} |")
        out += ["", f"Final rerun: exit {r['final_rc']}, {r['final_wall_s']} s.  Compared {r['compared']} items "
                f"({r['pngs']} PNGs, every row without `seconds`, image-id lists): "
                + ("**all bit-identical**, every image exactly once." if ok else
                   f"**{len(r['differences'])} differ**: {', '.join(r['differences'][:10])}"), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--md", default=None, help="write the report here (e.g. results/fault_injection.md)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory(prefix="reddiff_faults_") as tmp:
        results = [scenario(n.strip(), Path(tmp), a.kills, rng) for n in a.scenarios.split(",")]
    md = report(results, a.seed, "python -m benchmarks.fault_injection" + ("" if not argv else " " + shlex.join(argv)))
    print(md)
    if a.md:
        Path(a.md).write_text(md + "\n")
    return 0 if all(not r["differences"] and r["every_image_once"] and r["final_rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
