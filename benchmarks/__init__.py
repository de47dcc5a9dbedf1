"""Benchmarks with their own CLIs: ``python -m benchmarks.gmm_posterior`` (exact-posterior Gaussian mixture)."""
