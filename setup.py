"""Packaging beyond pyproject.toml: ``conf/`` ships as the package ``reddiff.conf`` (package data), so an
installed ``reddiff-run`` composes the same configs as ``python run.py`` in a clone (reddiff/run/entry.py).

Every folder of package data (``conf/<group>/``, ``reddiff/assets/...``) is declared as a package of its own, so
setuptools installs it without its "Package would be ignored" warnings; the build folder goes to a temporary
directory, not ``build/`` in the clone.  The distribution claims only the name ``reddiff``: the solvers of
``baselines/`` install as ``reddiff.baselines`` (the clone links them there too), and ``benchmarks/`` stays in the
clone (it writes ``results/`` of a clone and is run from one)."""
import os
import tempfile
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def data_packages(root: str, package: str) -> list[str]:
    """``package`` and one dotted name per sub-folder of ``root`` (relative to this file)."""
    base = HERE / root
    return [package] + sorted(package + "." + ".".join(p.relative_to(base).parts)
                              for p in base.rglob("*") if p.is_dir() and p.name != "__pycache__")


CONF = data_packages("conf", "reddiff.conf")
ASSETS = data_packages("reddiff/assets", "reddiff.assets")
os.environ.setdefault("REDDIFF_BUILD_BASE", tempfile.mkdtemp(prefix="reddiff-build-"))

setup(
    packages=sorted(set(find_packages(include=["reddiff*"]) + CONF + ASSETS)),
    package_dir={"reddiff.conf": "conf"},
    package_data={**{p: ["*.yaml"] for p in CONF}, **{p: ["*"] for p in ASSETS}},  # + conf/__init__.py
    options={"build": {"build_base": os.environ["REDDIFF_BUILD_BASE"]}},
)
