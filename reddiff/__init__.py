"""RED-diff benchmark harness: diffusion priors, degradation operators, samplers and metrics."""

__version__ = "0.1.0"
