"""Published numbers for the "paper" columns of generated tables, read from ``conf/anchors.yaml`` (data, keyed by
task and sampler name; a sampler without published numbers needs no entry).

``lookup(task, sampler) -> {metric: (value, tag, source)}``.  Tags: ``paper*`` (read from a public transcription of
the paper), ``unverified`` (approximate only), ``code``.  Units follow the paper: KID x10^3, top-1 in percent, PSNR
in dB.
"""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _table() -> dict:
    from omegaconf import OmegaConf

    from reddiff.registry import conf_dir

    raw = OmegaConf.to_container(OmegaConf.load(conf_dir() / "anchors.yaml"))
    src = raw["sources"]
    return {(task, sampler): {m: (float(v[0]), str(v[1]), src[v[2]]) for m, v in metrics.items()}
            for task, by_sampler in raw["numbers"].items() for sampler, metrics in by_sampler.items()}


def lookup(task: str, sampler: str) -> dict[str, tuple[float, str, str]]:
    return _table().get((task, sampler), {})
