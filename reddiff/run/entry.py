"""``reddiff-run`` / ``python run.py``: compose the Hydra config, run one job (or a sweep with ``-m``).

The config comes from the clone's ``conf/`` when this package runs from a clone, else from the copy installed
as package data (``reddiff.conf``), so ``pip install .`` works from any directory.  Before Hydra starts,
:func:`preflight` checks that an explicit ``hydra.run.dir``/``hydra.sweep.dir`` can be created and written
(Hydra itself would fail there with a traceback), and that an explicit job folder is not held by another run (so a
refused second writer never rewrites the first one's ``.hydra/`` files).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("reddiff")


def config_dir() -> str:
    clone = Path(__file__).resolve().parents[2] / "conf"
    return str(clone) if (clone / "config.yaml").is_file() else "pkg://reddiff.conf"


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_overrides(argv: list[str]) -> list:
    """Hydra's own parse of the ``key=value`` arguments, so a value Hydra would reject (an unquoted non-ASCII
    path, say) is refused in one line before anything is created, and a quoted value is used unquoted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    args = [a for a in argv if "=" in a and not a.startswith("-")]
    parser = OverridesParser.create()
    out = []
    for arg in args:
        try:
            out.extend(parser.parse_overrides([arg]))
        except OverrideParseException:
            _fail(f"cannot parse the override {arg!r}: quote a value holding spaces, non-ASCII or special "
                  "characters, e.g. 'hydra.run.dir=\"/path/with é\"'")
    return out


def preflight(argv: list[str]) -> None:
    """One clear line and exit 2, before Hydra starts, for an override Hydra cannot parse, a tuning budget of no
    trial, or an explicit output folder that cannot be created or written or is held by another run."""
    for ov in parse_overrides(argv):
        key = ov.key_or_group
        if ov.is_sweep_override() or ov.is_delete():
            continue
        val = ov.value()
        if key == "hydra.sweeper.n_trials":
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                _fail(f"hydra.sweeper.n_trials must be an integer >= 1 (a study needs a trial to report a best "
                      f"setting), got {ov.get_value_element_as_str()}")
            continue
        if key not in ("hydra.run.dir", "hydra.sweep.dir") or not isinstance(val, str) or "${" in val:
            continue
        p = Path(val).expanduser().absolute()
        probe = p
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if probe.exists() and not probe.is_dir():
            _fail(f"{key}={val} cannot be created: {probe} is a file, not a folder")
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _fail(f"{key}={val} cannot be created: {e.strerror or e}")
        if not os.access(p, os.W_OK):
            _fail(f"{key}={val} is not writable")
        if key == "hydra.run.dir":  # a busy job folder is refused before Hydra rewrites its .hydra/ files
            from reddiff.core.errors import UserError
            from reddiff.store.jobdir import probe_lock

            try:
                probe_lock(p)
            except UserError as e:
                _fail(str(e))


def kept_rows(job_dir: Path) -> int:
    """Complete rows of ``job_dir/metrics.csv`` (a half-written last line is not counted: it is redone)."""
    from reddiff.store.results import read_rows

    csv = Path(job_dir) / "metrics.csv"
    try:
        return len(read_rows(csv)) if csv.is_file() else 0
    except (OSError, ValueError):
        return 0


def resume_command(overrides, job_dir: Path) -> str:
    """The command that resumes this job: its own overrides with ``hydra.run.dir`` pinned to its folder (the
    default folder name holds the start time, so the bare command would start afresh elsewhere)."""
    import re
    import shlex

    keep = [o for o in overrides if o.lstrip("+").split("=", 1)[0] not in ("hydra.run.dir", "hydra.sweep.dir")]
    val = str(job_dir)
    if not re.fullmatch(r"[\w/.:+-]+", val, re.ASCII):  # Hydra's own quoting, then the shell's
        val = '"' + val.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return " ".join(["python run.py", *(shlex.quote(o) for o in keep), shlex.quote(f"hydra.run.dir={val}")])


def _job(cfg):
    """One job; returns the objective (mean PSNR, :func:`reddiff.tune.sweeper.objective`) for Hydra's sweepers."""
    from hydra.core.hydra_config import HydraConfig

    from reddiff.core.errors import UserError
    from reddiff.run.experiment import run
    from reddiff.tune.sweeper import apply_tuned, objective, worst

    job_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return objective(cfg, run(apply_tuned(cfg), job_dir))
    except KeyboardInterrupt:
        print(f"interrupted: {kept_rows(job_dir)} row(s) kept in {job_dir / 'metrics.csv'}; resume with: "
              f"{resume_command(HydraConfig.get().overrides.task, job_dir)}", file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        # one clear line, no traceback; earlier results in the job dir are kept
        msg = f"error: {e}"
        print(msg, file=sys.stderr)
        try:
            job_dir.mkdir(parents=True, exist_ok=True)
            (job_dir / "error.txt").write_text(msg + "\n")
        except OSError:
            pass
        if HydraConfig.get().mode.name == "MULTIRUN":
            return worst(cfg)  # the sweep goes on (a tuning study scores it worst); its table shows it as failed
        sys.exit(2)


def sweep_safe_sampler_keys(argv: list[str]) -> list[str]:
    """In a multirun, ``sampler.K=V`` that one of the swept samplers' configs lacks (any registry sampler when the
    sweep is an experiment preset's) would make Hydra abort the whole sweep; it becomes ``++sampler.K=V`` (set
    where absent), and that sampler's job is then n/a in one line (:func:`reddiff.run.experiment.foreign_keys`)
    while the others run."""
    if not {"-m", "--multirun"} & set(argv):
        return argv
    from reddiff.registry import _load_yaml, sampler_names

    swept = [ov for ov in parse_overrides(argv) if ov.key_or_group == "sampler" and ov.is_sweep_override()]
    # the samplers of a command-line sweep, else any (an experiment preset sweeps its own list)
    names = [str(v) for ov in swept for v in ov.sweep_string_iterator()] if swept else sampler_names()
    out = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        if key.startswith("sampler.") and "=" in arg and not arg.startswith("-"):
            top = key.split(".")[1]
            try:
                lacking = [n for n in names if top not in _load_yaml("sampler", n)]
            except KeyError:  # an unknown sampler name: Hydra says so itself
                lacking = []
            if lacking:
                arg = "++" + arg
        out.append(arg)
    return out


def main() -> None:
    import hydra

    from reddiff.tune.sweeper import register

    preflight(sys.argv[1:])
    sys.argv[1:] = sweep_safe_sampler_keys(sys.argv[1:])
    register()  # the generated tune/<sampler> configs (+tune=NAME), from each sampler's declared space
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")(_job)()


if __name__ == "__main__":
    main()
