"""Hydra callback of every multirun: at the end of the sweep, write ``table.md``/``table.csv`` in the sweep dir
(:mod:`reddiff.report.tables`), the experiment presets' plots (:mod:`reddiff.report.plots`) and the W&B table run.  Kept apart
from both so that tables and plots do not import each other."""
from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from reddiff.report.tables import build_rows, collect, recorded_ref, write_tables


class SweepTableCallback(Callback):
    """Hydra callback: at the end of a multirun, write table.md / table.csv in the sweep dir and print them."""

    def on_multirun_end(self, config, **kwargs) -> None:
        root = Path(config.hydra.sweep.dir)
        if not root.exists():
            return
        if not collect(root):
            print(f"[reddiff] no finished job under {root}: no table written", file=sys.stderr)
            return
        cmd = sweep_command(config)
        md = write_tables(root, cmd, ref=recorded_ref(root))  # a rerun into the folder keeps the table's Δ column
        print(f"\n[reddiff] sweep table ({root}/table.md):\n{md}")
        if config.get("experiment_name"):  # experiment presets: plots next to the tables (reddiff.report.plots)
            try:
                from reddiff.report.plots import make_plots

                for p in make_plots(root):
                    print(f"[reddiff] plot: {p}")
            except Exception as e:  # noqa: BLE001 - plotting never fails the sweep
                print(f"[reddiff] plots not written: {e}; run: python -m reddiff.report.plots {root}", file=sys.stderr)
        try:
            _log_wandb_table(root, config)
        except Exception as e:  # noqa: BLE001 - logging never fails the sweep
            print(f"[reddiff] W&B table not logged: {e}", file=sys.stderr)


def sweep_command(config) -> str:
    """The sweep's full command line: its overrides and its ``hydra.*`` ones (``hydra.sweeper.n_trials=3``), less
    the ``hydra.mode`` Hydra adds itself; values with spaces or quotes are shell-quoted."""
    import shlex

    ovs = list(config.hydra.overrides.task) + [o for o in config.hydra.overrides.hydra
                                               if not o.startswith("hydra.mode=")]
    return "python run.py -m " + " ".join(o if shlex.quote(o) == o or "," in o and " " not in o and "'" not in o
                                          else shlex.quote(o) for o in ovs)


def _log_wandb_table(root: Path, config) -> None:
    lg = config.get("logger", {})
    if not lg or "Wandb" not in str(lg.get("_target_", "")):
        return
    import wandb

    header, rows, _ = build_rows(collect(root))
    run = wandb.init(project=lg.get("project"), entity=lg.get("entity"), mode=lg.get("mode", "offline"),
                     group=config.get("experiment_name") or root.name, job_type="table", name=f"table {root.name}",
                     settings=wandb.Settings(console="off", silent=True), reinit="finish_previous", dir=str(root))
    run.log({"table": wandb.Table(columns=header, data=rows),
             **{f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted(root.glob("plot_*.png"))}})
    run.finish()
