"""``make tune``: tune every registry sampler that declares a space, with the same trial budget, and write the
tuned presets.

    python -m reddiff.tune.make [--prior embedded] [--tasks inpaint_freeform[,sr4]] [--trials 10] [--images 2]
                                [--steps N | --steps-from PRESET] [--samplers reddiff,dps,...]

For each task and each sampler able to run it, one ``python run.py -m +tune=<sampler> task=<task>
sampler.steps=<S>`` (Hydra's Optuna sweeper, :mod:`reddiff.tune.sweeper`) in ``multirun/tune/<prior>/<task>_s<S>/<sampler>``;
``S`` is the sampler's own step count for the task (its YAML: 100 for RED-diff, DPS, Pi-GDM; 20 for DDRM, the
counts of the demo tables) unless ``--steps`` sets one for all or ``--steps-from PRESET`` takes each sampler's
count from an experiment preset (``make tune``: ``demo_table1``, whose counts ``demo_sr4`` shares), with the
preset's other untuned settings of that sampler (D-Flow's iterations, EnKG's ensemble).  Then:

* ``results/tune/<prior>/<task>_s<S>/<sampler>/``: copies of Hydra's ``optimization_results.yaml`` and the
  sweep's ``table.md`` (every trial);
* ``conf/tuned/<prior>/<task>_s<S>.yaml``: the best settings of every sampler for that (prior, task, step count);
* ``conf/tuned/<prior>.yaml``: the ``+tuned=<prior>`` preset, which includes every file of ``conf/tuned/<prior>/``.
"""
from __future__ import annotations

import argparse
import datetime
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from reddiff.tune.sweeper import N_STARTUP

ROOT = Path(__file__).resolve().parents[2]


def latent_prior(prior: str) -> bool:
    """Whether ``conf/prior/<prior>.yaml`` builds a latent prior (a class with ``decode``)."""
    from hydra.utils import get_class

    from reddiff.registry import _load_yaml

    return callable(getattr(get_class(_load_yaml("prior", prior)["_target_"]), "decode", None))


def can_run(sampler: str, task: str, prior: str | None = None) -> bool:
    """Whether ``sampler`` can run ``task`` (operator capabilities) and, with ``prior`` given, on that prior (a
    sampler with ``needs_latent`` runs only on a latent prior)."""
    from reddiff.registry import sampler_info, task_info

    if prior is not None and sampler_info(sampler)["needs_latent"] and not latent_prior(prior):
        return False
    req, t = set(sampler_info(sampler)["requires"]), task_info(task)
    if "svd" in req and not t["svd"]:
        return False
    return not (req & {"adjoint", "linear"}) or t["linear"]


def default_steps(sampler: str, task: str) -> int:
    from reddiff.registry import sampler_config

    return int(sampler_config(sampler, task)["steps"])


def _preset_path(preset: str) -> Path:
    path = ROOT / "conf" / "experiment" / f"{preset}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no experiment preset {preset!r} (conf/experiment/{preset}.yaml)")
    return path


def _preset_hparams(preset: str, sampler: str) -> dict:
    raw = yaml.safe_load(_preset_path(preset).read_text()) or {}
    return dict(((raw.get("task") or {}).get("hparams") or {}).get(sampler) or {})


def preset_steps(preset: str, sampler: str, task: str) -> int:
    """The step count the experiment preset ``conf/experiment/<preset>.yaml`` runs ``sampler`` with: its
    ``task.hparams.<sampler>.steps`` where set, else the sampler's own count for ``task``.  Tuned settings are keyed
    by step count, so tuning at these counts is what makes them apply to that preset's rows."""
    hp = _preset_hparams(preset, sampler)
    return int(hp["steps"]) if "steps" in hp else default_steps(sampler, task)


def preset_fixed(preset: str, sampler: str, space: dict) -> dict:
    """The preset's other settings of ``sampler`` (not ``steps``, not a tuned key), e.g. D-Flow's ``max_iter`` and
    ``lbfgs_iter``, EnKG's ``particles``: the tuning sweep runs with them, so the trials cost what the preset's row
    costs and the tuned values are tuned for that row."""
    return {k: v for k, v in _preset_hparams(preset, sampler).items() if k != "steps" and k not in space}


def die_with_parent(parent: int) -> None:
    """``preexec_fn`` of every child: the kernel sends it SIGKILL when the driver ``parent`` dies (``kill -9``
    included), so no ``run.py`` goes on orphaned (Linux ``prctl(PR_SET_PDEATHSIG)``)."""
    import ctypes
    import os
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the driver died before prctl took effect
        os._exit(1)


def run_child(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """``subprocess.run`` of a child that dies with this driver (:func:`die_with_parent`; elsewhere than Linux a
    plain run)."""
    import functools
    import os

    pre = functools.partial(die_with_parent, os.getpid()) if sys.platform.startswith("linux") else None
    return subprocess.run(cmd, preexec_fn=pre, **kw)


def tune_one(prior: str, task: str, sampler: str, steps: int, trials: int, images: int, log,
             fixed: dict | None = None) -> dict:
    sweep = ROOT / "multirun" / "tune" / prior / f"{task}_s{steps}" / sampler
    shutil.rmtree(sweep, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", f"+tune={sampler}", f"task={task}", f"prior={prior}",
           f"sampler.steps={steps}", *(f"sampler.{k}={v}" for k, v in (fixed or {}).items()),
           f"hydra.sweeper.n_trials={trials}", f"data.count={images}", f"hydra.sweep.dir={sweep}"]
    t0 = time.time()
    log(f"[make_tune] {' '.join(cmd[1:])}")
    r = run_child(cmd, cwd=ROOT, capture_output=True, text=True)
    res = sweep / "optimization_results.yaml"
    if r.returncode != 0 or not res.is_file():
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
        raise SystemExit(f"error: tuning {sampler} on {task} failed (exit {r.returncode}):\n{tail}")
    out = ROOT / "results" / "tune" / prior / f"{task}_s{steps}" / sampler
    out.mkdir(parents=True, exist_ok=True)
    for name in ("optimization_results.yaml", "table.md"):
        if (sweep / name).is_file():
            shutil.copy2(sweep / name, out / name)
    best = yaml.safe_load(res.read_text())
    params = {k.split(".", 1)[1]: v for k, v in best["best_params"].items()}
    log(f"[make_tune]   best {best['best_value']:.3f} with {params} ({time.time() - t0:.0f} s)")
    return {"params": params, "best_value": float(best["best_value"]), "seconds": round(time.time() - t0, 1),
            "command": "python run.py -m " + " ".join(c for c in cmd[3:] if not c.startswith("hydra.sweep.dir"))}


def write_task_file(prior: str, task: str, steps: int, results: dict, meta: dict) -> Path:
    """Merge ``results`` ({sampler: {"params", ...}}) into ``conf/tuned/<prior>/<task>_s<steps>.yaml``; the
    comment of each sampler is read from its record under results/tune (so a sampler tuned earlier keeps its own)."""
    path = ROOT / "conf" / "tuned" / prior / f"{task}_s{steps}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    body.update({k: r["params"] for k, r in results.items()})
    records = ROOT / "results" / "tune" / prior / f"{task}_s{steps}"
    lines = [f"# @package tuned.table.{task}.s{steps}",
             f"# Tuned settings for prior={prior}, task={task}, {steps} steps (make tune; last written {meta['date']}).",
             f"# Each sampler: {meta['trials']} Optuna trials (TPE, seed 0, {N_STARTUP} random first) on data=tune "
             f"count={meta['images']},",
             "# objective = mean PSNR on the tuning split.  Hydra's optimization_results.yaml and every trial:",
             f"#   results/tune/{prior}/{task}_s{steps}/<sampler>/"]
    for sampler in sorted(body):
        rec = records / sampler / "optimization_results.yaml"
        best = yaml.safe_load(rec.read_text())["best_value"] if rec.is_file() else None
        cmd = (results.get(sampler) or {}).get("command") or f"python run.py -m +tune={sampler} task={task} ..."
        lines.append(f"# {sampler}: best {best:.3f} dB on the tuning split; {cmd}" if best is not None
                     else f"# {sampler}: (no record found)")
    path.write_text("\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=True, default_flow_style=False))
    return path


def write_preset(prior: str, meta: dict) -> Path:
    d = ROOT / "conf" / "tuned" / prior
    files = sorted(p.stem for p in d.glob("*.yaml"))
    lines = ["# @package _global_",
             f"# +tuned={prior}: the equal-budget tuned settings of every sampler on prior={prior}, per (task, step",
             "# count); reddiff.tune.sweeper.apply_tuned sets them on the job's sampler (keys given on the command line win)",
             "# and a (task, sampler, steps) that was not tuned keeps its official settings.",
             f"# Regenerate: make tune ({meta['date']}).  Per-(task, steps) files: conf/tuned/{prior}/.",
             "defaults:"] + [f"  - {prior}/{f}" for f in files] + ["  - _self_", "", "tuned:", f"  prior: {prior}"]
    path = ROOT / "conf" / "tuned" / f"{prior}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    from reddiff.tune.sweeper import N_IMAGES, N_TRIALS, tunable

    p = argparse.ArgumentParser(prog="python -m reddiff.tune.make", description=__doc__.split("\n\n")[0])
    p.add_argument("--prior", default="embedded")
    p.add_argument("--tasks", default="inpaint_freeform", help="comma list (sr4 too: about twice the time)")
    p.add_argument("--trials", type=int, default=N_TRIALS)
    p.add_argument("--images", type=int, default=N_IMAGES)
    p.add_argument("--steps", type=int, default=None, help="one step count for every sampler (default: its own)")
    p.add_argument("--steps-from", default=None, metavar="PRESET",
                   help="each sampler's step count in conf/experiment/PRESET.yaml (its own where the preset sets none)")
    p.add_argument("--samplers", default="all", help="comma list, or 'all' (every sampler with a tune_space)")
    a = p.parse_args(argv)
    if a.steps is not None and a.steps_from is not None:
        print("error: give --steps or --steps-from, not both", file=sys.stderr)
        return 2
    if a.steps_from is not None:
        try:
            _preset_path(a.steps_from)
        except FileNotFoundError as e:
            print(f"error: --steps-from: {e}", file=sys.stderr)
            return 2
    spaces = tunable()
    names = sorted(spaces) if a.samplers == "all" else a.samplers.split(",")
    unknown = [n for n in names if n not in spaces]
    if unknown:
        print(f"error: no tune_space declared by: {', '.join(unknown)}; tunable: {', '.join(sorted(spaces))}",
              file=sys.stderr)
        return 2
    meta = {"date": datetime.date.today().isoformat(), "trials": a.trials, "images": a.images,
            "command": "python -m reddiff.tune.make " + " ".join(argv if argv is not None else sys.argv[1:])}
    for task in a.tasks.split(","):
        for name in names:
            if not can_run(name, task, a.prior):
                print(f"[make_tune] {name} cannot run {task} on prior={a.prior}: skipped", flush=True)
                continue
            steps = a.steps or (preset_steps(a.steps_from, name, task) if a.steps_from else default_steps(name, task))
            fixed = preset_fixed(a.steps_from, name, spaces[name]) if a.steps_from else {}
            res = tune_one(a.prior, task, name, steps, a.trials, a.images, lambda s: print(s, flush=True), fixed)
            # written after every sampler, so an interrupted run keeps what it finished
            print(f"[make_tune] wrote {write_task_file(a.prior, task, steps, {name: res}, meta)}", flush=True)
            write_preset(a.prior, meta)
    print(f"[make_tune] wrote {write_preset(a.prior, meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
