"""Image-restoration metrics (docs/API.md, "Metrics"); see :mod:`reddiff.metrics.suite`.

May import: reddiff.core
"""
from reddiff.metrics.suite import DEFAULT_NAMES, METRICS, PER_IMAGE, SET_LEVEL, MetricSuite

__all__ = ["MetricSuite", "METRICS", "PER_IMAGE", "SET_LEVEL", "DEFAULT_NAMES"]
