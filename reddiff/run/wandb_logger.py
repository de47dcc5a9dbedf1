"""Experiment loggers. ``WandbLogger`` logs the config, sparse per-step losses, the per-image metrics
table, the grid and the summary; it runs offline by default and never lets a logging failure (no
network, no wandb) fail or hang the job."""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("reddiff")


class NullLogger:
    def start(self, config: dict, ident: dict, job_dir: Path | None = None) -> None:
        pass

    def step_callback(self, indices):
        return None

    def log_batch(self, entries, values, job=None) -> None:
        pass

    def finish(self, summary: dict, job_dir: Path) -> None:
        pass


class WandbLogger(NullLogger):
    def __init__(self, mode: str = "offline", project: str = "reddiff-harness", entity: str | None = None,
                 group: str | None = None, job_type: str | None = None, log_every: int = 10):
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode must be offline, online or disabled, got {mode!r}")
        self.mode, self.project, self.entity = mode, project, entity
        self.group, self.job_type, self.log_every = group, job_type, int(log_every)
        self.run = None
        self._rows = []
        self._step = 0

    def start(self, config: dict, ident: dict, job_dir: Path | None = None) -> None:
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            name = " ".join(ident.get("overrides") or []) or f"{ident['sampler']}-{ident['task']}"
            self.run = wandb.init(project=self.project, entity=self.entity, mode=self.mode, group=self.group,
                                  job_type=self.job_type, name=name[:120], config=config, reinit="finish_previous", dir=str(job_dir) if job_dir else None,
                                  settings=wandb.Settings(init_timeout=60, console="off", silent=True))
        except Exception as e:  # noqa: BLE001 - logging must never break a run
            log.warning("W&B disabled for this run: %s", e)
            self.run = None

    def step_callback(self, indices):
        if self.run is None:
            return None

        def cb(step: int, info: dict):
            if step % self.log_every:
                return
            out = {}
            for k, v in info.items():
                try:
                    out[f"step/{k}"] = float(v.mean()) if hasattr(v, "mean") else float(v)
                except (TypeError, ValueError, RuntimeError):
                    continue
            self._step += 1
            self.run.log(out)

        return cb

    def log_batch(self, entries, values, job=None) -> None:
        """Per-image metric rows; ``job`` (the configuration index of a batched sweep) adds a column."""
        for j, e in enumerate(entries):
            self._rows.append(([] if job is None else [job]) + [e.image_id] + [float(values[k][j]) for k in sorted(values)])
        self._cols = ([] if job is None else ["job"]) + ["image_id"] + sorted(values)

    def finish(self, summary: dict, job_dir: Path) -> None:
        if self.run is None:
            return
        try:
            import wandb

            if self._rows:
                self.run.log({"per_image": wandb.Table(columns=self._cols, data=self._rows)})
            grid = Path(job_dir) / "grid.png"
            if grid.exists():
                self.run.log({"grid": wandb.Image(str(grid))})
            for name, m in summary.get("metrics", {}).items():
                if "mean" in m and m["mean"] is not None:
                    self.run.summary[f"{name}/mean"] = m["mean"]
                    self.run.summary[f"{name}/ci95"] = m.get("ci95")
                else:
                    self.run.summary[f"{name}/missing"] = m.get("missing")
            self.run.summary.update({f"cost/{k}": v for k, v in summary.get("cost", {}).items()})
            self.run.finish()
        except Exception as e:  # noqa: BLE001
            log.warning("W&B logging failed at finish: %s", e)
