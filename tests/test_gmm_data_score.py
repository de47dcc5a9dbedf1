"""GMM benchmark data-space score (benchmarks/gmm_posterior.py): W1 along the measured directions, mode TV."""
import json

import torch

from benchmarks import gmm_posterior as G


def test_data_w1_separates_the_exact_floor_from_ignoring_the_data():
    r = G.run_problem(8, 2, 0, samples=1000, steps=10, seed=3, samplers=[])
    ex, pr = r["methods"]["exact"], r["methods"]["prior"]
    # an independent exact draw is within a fraction of a posterior sd; prior samples are far off along A's rows
    assert 0 < ex["data_w1"] < 0.25 and ex["data_w1_max"] >= ex["data_w1"]
    assert pr["data_w1"] > 4 * ex["data_w1"] and pr["data_w1"] > 1.0
    assert ex["mode_tv"] is not None and 0 <= ex["mode_tv"] < 0.2


def test_data_w1_sees_a_shift_along_a_measured_direction_that_sw_barely_sees(monkeypatch):
    """Shift exact samples by one posterior sd along the first measured direction: data_w1 grows by about
    1/d_y sd, while sliced Wasserstein over random directions moves much less than the shift."""
    d, dy = 80, 2
    prior, pb, post = G.make_problem(d, dy, 5, 0, G.Schedule())
    g = torch.Generator().manual_seed(0)
    ref, X = post.sample(2000, g), post.sample(2000, g)
    v = pb.Vk[:, 0].to(torch.float64)
    sd = float((ref @ v).std())
    Xs = X + sd * v[None, :]
    Vk = pb.Vk.to(torch.float64)
    rs = torch.sort(ref @ Vk, 0).values

    def w1(Z):
        return float(((torch.sort(Z @ Vk, 0).values - rs).abs().mean(0) / rs.std(0)).mean())

    theta = G.random_directions(1000, d, torch.Generator().manual_seed(1))
    sw0, _ = G.sliced_wasserstein(X, ref, theta)
    sw1, _ = G.sliced_wasserstein(Xs, ref, theta)
    assert w1(Xs) - w1(X) > 0.4          # ~1/2 sd averaged over the 2 directions
    assert sw1 - sw0 < 0.2 * sd           # random directions see ~ sd/sqrt(d) of it


def test_cell_aggregate_and_json_carry_data_w1_and_mode_tv(tmp_path):
    out = tmp_path / "g.json"
    rc = G.main(["--dims", "8", "--dims-y", "1", "--problems", "2", "--samples", "200", "--steps", "5",
                 "--samplers", "ddrm", "--json", str(out), "--workers", "1"])
    assert rc in (0, 1, None)
    res = json.loads(out.read_text())["results"]["8"]["1"]
    for name in ("ddrm", "exact", "prior"):
        assert res[name]["data_w1"] is not None and res[name]["mode_tv"] is not None
    assert res["exact"]["data_w1"] < res["prior"]["data_w1"]
    md = G.markdown_table(json.loads(out.read_text()))
    assert "Data-space score" in md and "W1 / TV" in md
