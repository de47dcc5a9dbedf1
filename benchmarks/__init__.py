"""Benchmarks with their own CLIs: ``python -m benchmarks.gmm_posterior`` (exact-posterior Gaussian mixture)."""
from __future__ import annotations

import json
import re


def parse_set_overrides(items, names) -> dict:
    """``["dps.zeta=3", ...]`` -> ``{"dps": {"zeta": 3}}`` (values read as JSON, else kept as text); a malformed item
    or a sampler not in ``names`` raises ValueError with the line to show."""
    out: dict = {}
    for item in items:
        m = re.fullmatch(r"(\w+)\.(\w+)=(.+)", item)
        if not m or m.group(1) not in names:
            raise ValueError(f"--set needs SAMPLER.KEY=VALUE with SAMPLER in {list(names)}, got {item!r}")
        try:
            value = json.loads(m.group(3))
        except json.JSONDecodeError:
            value = m.group(3)
        out.setdefault(m.group(1), {})[m.group(2)] = value
    return out
