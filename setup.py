"""Packaging beyond pyproject.toml: ``conf/`` ships as the package ``reddiff.conf`` (package data), so an
installed ``reddiff-run`` composes the same configs as ``python run.py`` in a clone (reddiff/run/entry.py)."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["reddiff*", "baselines*", "benchmarks*"]) + ["reddiff.conf"],
    package_dir={"reddiff.conf": "conf"},
    package_data={"reddiff": ["assets/**/*"], "reddiff.conf": ["*.yaml", "**/*.yaml"]},  # + conf/__init__.py
)
