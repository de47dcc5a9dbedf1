"""Thin Hydra entry point: compose the config, run one job, write its outputs into the Hydra job dir.

    python run.py                                   # task=sr4 sampler=reddiff on the embedded prior + demo data
    python run.py -m task=sr4,inpaint_box sampler=reddiff,dps,pigdm,ddrm
    python run.py -m +experiment=demo_table1
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from reddiff.errors import UserError
from reddiff.experiment import run

log = logging.getLogger("reddiff")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run(cfg, job_dir)
    except UserError as e:
        # one clear line, no traceback; earlier results in the job dir are kept
        msg = f"error: {e}"
        print(msg, file=sys.stderr)
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "error.txt").write_text(msg + "\n")
        if HydraConfig.get().mode.name == "MULTIRUN":
            return  # the sweep goes on; its table shows this job as failed
        sys.exit(2)


if __name__ == "__main__":
    main()
