"""Hydra configs; installed as the package data ``reddiff.conf`` (setup.py) so Hydra can find them by module."""
