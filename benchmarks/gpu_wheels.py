"""List and download the wheels that ``benchmarks/gpu_check.py`` needs on a GPU machine that lacks them.

    python -m benchmarks.gpu_wheels [--dest gpu_wheels] [--list] [--python-version 3.12]
                                    [--platform manylinux2014_x86_64]

The GPU machine (issue 18) has torch, torchvision, torchmetrics, safetensors, numpy, scipy, scikit-image, pandas,
matplotlib and tqdm, but no hydra-core, omegaconf or antlr4 (which ``reddiff.operators.build_operator`` and the
sampler registry use) and possibly no pytest (which runs the CUDA-only tests).  This script takes the dependency
closure of :data:`ROOTS` from the metadata of the packages installed in the running environment (``.venv``),
pinned to the versions installed there, drops what the GPU machine already has (:data:`ON_GPU_MACHINE`), and
downloads one wheel per package with ``pip download --only-binary=:all: --no-deps`` for the GPU machine's Python
and platform.  A package that publishes no wheel for its pinned version (antlr4-python3-runtime 4.9.3 is sdist
only) is built into a pure-Python wheel locally with ``pip wheel --no-deps`` instead, and reported as such.

The folder (default ``gpu_wheels/``, git-ignored) travels with the working tree to the GPU machine; there
``gpu_check.py`` unpacks only the wheels whose modules are not importable and puts them on ``sys.path``: nothing
is installed with pip and nothing already installed is shadowed.  Total size: well under 5 MiB.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEST = ROOT / "gpu_wheels"
#: what gpu_check needs beyond the GPU machine's packages: Hydra configs (operators, registry) and the test runner
ROOTS = ("hydra-core", "omegaconf", "pytest", "pytest-timeout")
#: installed on the GPU machine (issue 18), with what they pull in; never downloaded
ON_GPU_MACHINE = {"torch", "torchvision", "torchmetrics", "safetensors", "numpy", "scipy", "scikit-image", "pandas",
                  "matplotlib", "tqdm", "pillow", "typing-extensions", "setuptools", "pip"}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def closure(roots=ROOTS, python_version: str = "3.12", exclude=ON_GPU_MACHINE) -> dict[str, str]:
    """``{distribution: installed version}`` for ``roots`` and their requirements (markers evaluated for the target
    Python on Linux; extras ignored), minus ``exclude``."""
    from packaging.requirements import Requirement

    env = {"python_version": python_version, "python_full_version": python_version + ".0", "sys_platform": "linux",
           "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64", "extra": "",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    excl = {_norm(e) for e in exclude}
    out: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = _norm(todo.pop())
        if name in out or name in excl:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"gpu_wheels: {name} is not installed in {sys.prefix}; run `make setup` first") from None
        out[name] = dist.version
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return dict(sorted(out.items()))


def _pip(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def download(pins: dict[str, str], dest: Path, python_version: str, platform: str) -> list[dict]:
    dest.mkdir(parents=True, exist_ok=True)
    abi = "cp" + python_version.replace(".", "")
    report = []
    for name, version in pins.items():
        spec = f"{name}=={version}"
        r = _pip("download", "--only-binary=:all:", "--no-deps", "--python-version", python_version,
                 "--platform", platform, "--implementation", "cp", "--abi", abi, "-d", str(dest), spec)
        how = "downloaded"
        if r.returncode != 0 and "No matching distribution" in (r.stderr + r.stdout):
            r = _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), spec)  # sdist only: build it
            how = "built from sdist (pure Python)"
        if r.returncode != 0:
            raise SystemExit(f"gpu_wheels: could not get {spec}:\n{(r.stderr or r.stdout)[-2000:]}")
        report.append({"package": name, "version": version, "how": how})
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_wheels", description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", default=str(DEFAULT_DEST), help="folder for the wheels (default gpu_wheels/)")
    p.add_argument("--list", action="store_true", help="print the pinned list (JSON) and download nothing")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    p.add_argument("--platform", default="manylinux2014_x86_64", help="wheel platform tag for binary wheels")
    a = p.parse_args(argv)
    pins = closure(python_version=a.python_version)
    if a.list:
        print(json.dumps(pins, indent=2))
        return 0
    dest = Path(a.dest)
    report = download(pins, dest, a.python_version, a.platform)
    wheels = sorted(dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    for r in report:
        print(f"[gpu_wheels] {r['package']}=={r['version']}: {r['how']}", file=sys.stderr)
    print(f"[gpu_wheels] {len(wheels)} wheels, {size / 2 ** 20:.1f} MiB in {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
