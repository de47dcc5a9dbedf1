"""reddiff.report.stats: photo-clustered intervals, paired differences, verdicts."""
import math
from pathlib import Path

import numpy as np
import pytest

from reddiff.report import stats as S
from reddiff.data.make_demo import DEMO_IDS, HELD_OUT

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_of_maps_demo_and_tune_ids_to_their_photo():
    assert {S.cluster_of(i) for i in DEMO_IDS} == set(HELD_OUT)
    assert S.cluster_of("astronaut_crop2") == "astronaut"
    assert S.cluster_of("motorcycle_engine") == "motorcycle"
    # an id of another data set is its own cluster, even with a photo-like prefix
    assert S.cluster_of("astronaut_other") == "astronaut_other"
    assert S.cluster_of("n01440764_10026") == "n01440764_10026"


def test_cluster_t_interval_matches_the_hand_computation():
    # per-photo means 1, 2, 6 -> mean 3, sd sqrt(7); half = t_{2,0.975} sqrt(7) / sqrt(3) = 4.302653 * 1.527525
    vals = {"astronaut_full": 0.0, "astronaut_crop1": 2.0, "chelsea_full": 2.0, "chelsea_crop1": 2.0,
            "coffee_full": 5.0, "coffee_crop1": 7.0}
    iv = S.interval(vals)
    assert iv["n"] == 6 and iv["n_clusters"] == 3
    assert iv["mean"] == pytest.approx(3.0)
    assert iv["half"] == pytest.approx(4.302653 * math.sqrt(7) / math.sqrt(3), rel=1e-5)
    assert iv["lo"] == pytest.approx(3.0 - iv["half"]) and iv["hi"] == pytest.approx(3.0 + iv["half"])
    assert "3 per-photo means" in iv["method"] and "2 df" in iv["method"]


def test_independent_images_get_the_ordinary_t_interval():
    rng = np.random.default_rng(0)
    vals = {f"img{i}": float(v) for i, v in enumerate(rng.normal(size=20))}
    iv = S.interval(vals)
    v = np.array(list(vals.values()))
    assert iv["n_clusters"] == 20
    assert iv["half"] == pytest.approx(S.t_quantile(19) * v.std(ddof=1) / math.sqrt(20))


def _demo_jobs():
    jobs = sorted(p.parent for p in (ROOT / "results" / "demo_table1").glob("*/metrics.csv"))
    if not jobs:
        pytest.skip("results/demo_table1 not present")
    return jobs


def test_photo_clustered_interval_is_wider_than_the_naive_one_on_the_demo_set():
    """The committed demo Table 1: the photo-clustered PSNR interval is wider than the naive
    12-independent-images interval of summary.json (crops of one photo are correlated) by more than 1.5x for
    every sampler above the pseudo-inverse floor (measured 4.2-4.8x), and the median ratio over all samplers and
    both metrics is above 1.5.  Not universal: a failed run whose output ignores the photo (PnP-DM at its CPU budget)
    has little photo effect, and MCG-diff's SSIM per-photo means nearly coincide (ratio 0.21)."""
    ratios = {}
    jobs = _demo_jobs()
    for job in jobs:
        for metric in ("psnr", "ssim"):
            vals = S.read_metric(job, metric)
            assert len(vals) == 12 and {S.cluster_of(k) for k in vals} == set(HELD_OUT)
            clustered, naive = S.interval(vals), S.naive_interval(vals.values())
            assert clustered["mean"] == pytest.approx(naive["mean"])  # 4 crops per photo: same mean
            ratios[(job.name, metric)] = clustered["half"] / naive["half"]
    floor = S.interval(S.read_metric(next(j for j in jobs if j.name.endswith("_pinv")), "psnr"))["mean"]
    above = [j.name for j in jobs if S.interval(S.read_metric(j, "psnr"))["mean"] >= floor]
    assert len(above) >= 5 and all(ratios[(n, "psnr")] > 1.5 for n in above), ratios
    assert float(np.median(list(ratios.values()))) > 1.5, ratios


def test_paired_difference_is_narrower_than_the_unpaired_one_on_the_demo_set():
    jobs = {p.name.split("_")[-1]: p for p in _demo_jobs()}
    a, b = S.read_metric(jobs["reddiff"], "psnr"), S.read_metric(jobs["ddrm"], "psnr")
    d = S.paired(a, b)
    assert d["images"] == 12
    assert d["mean"] == pytest.approx(np.mean([a[k] - b[k] for k in a]))
    assert d["half"] < 0.5 * min(S.interval(a)["half"], S.interval(b)["half"])


def test_paired_uses_only_common_images_and_verdict_rule():
    a = {"astronaut_full": 3.0, "chelsea_full": 4.0, "coffee_full": 5.0, "extra": 100.0}
    b = {"astronaut_full": 1.0, "chelsea_full": 1.5, "coffee_full": 2.0}
    d = S.paired(a, b)
    assert d["images"] == 3 and d["mean"] == pytest.approx(2.5)
    assert S.verdict(d) == "holds"
    assert S.verdict(d, higher_is_better=False) == "does not hold"
    assert S.verdict({"lo": -0.1, "hi": 0.3}) == "inconclusive"
    assert S.verdict({"lo": None, "hi": None}) == "inconclusive"


def test_cluster_bootstrap_is_deterministic_and_brackets_the_mean():
    vals = {i: float(k) + 0.1 * j for k, p in enumerate(HELD_OUT) for j, i in enumerate(
        [x for x in DEMO_IDS if x.startswith(p)])}
    a = S.interval(vals, method="cluster_bootstrap", seed=1)
    b = S.interval(vals, method="cluster_bootstrap", seed=1)
    assert a == b and a["lo"] <= a["mean"] <= a["hi"]
    with pytest.raises(ValueError):
        S.interval(vals, method="nope")
