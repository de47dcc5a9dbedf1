"""Equal-budget tuning: the Optuna sweeper configs, objective and tuned presets (``sweeper``, used by the job
runner) and ``python -m reddiff.tune.make`` (``make tune``), which drives ``run.py`` in child processes.

May import: reddiff.core, reddiff.registry, reddiff.store
"""
