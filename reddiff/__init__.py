"""RED-diff benchmark harness: diffusion priors, degradation operators, samplers and metrics.

The layout, by layer (docs/ARCHITECTURE.md has the table; each sub-package's docstring says what it may import,
and tests/test_architecture.py holds every module to it): ``core`` -> ``data``, ``operators``, ``priors``,
``samplers``, ``metrics`` (and ``baselines``: the root folder ``baselines/``, linked here as ``reddiff/baselines``) -> ``registry`` -> ``store`` -> ``report``, ``tune`` -> ``run``;
``cli`` and ``tables`` are command lines.

May import: nothing (the package itself holds only its version).
"""

__version__ = "0.1.0"
