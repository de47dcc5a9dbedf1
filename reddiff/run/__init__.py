"""The job runner: ``run.py`` / ``reddiff-run`` (``entry``), one job (``experiment``), its batch loop
(``batch_loop``), batched RED-diff sweeps (``sweep``), the end-of-sweep callback (``sweep_callback``) and the
W&B logger (``wandb_logger``), and the exact mixture priors built from the training photos (``photo_priors``:
``prior=image_gmm``, ``prior=latent_gmm``).  The top layer: it composes every other part.

May import: reddiff.core, reddiff.data, reddiff.operators, reddiff.priors, reddiff.samplers, reddiff.metrics,
reddiff.registry, reddiff.store, reddiff.report, reddiff.tune
"""
