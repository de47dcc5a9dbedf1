"""Training and evaluation of the embedded prior (``python -m reddiff.priors.training.train`` and
``python -m reddiff.priors.training.evaluate``; docs/MODEL_CARD.md).  Not imported by the harness at run time.

May import: reddiff.core, reddiff.data, reddiff.priors
"""
