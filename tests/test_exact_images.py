"""benchmarks/exact_images: designed multimodality, budgets, a tiny end-to-end run, bad input, and the
exact-prior claim rows."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import exact_images as E
from reddiff.run.photo_priors import mixture_means
from reddiff import registry
from reddiff.report import claims_exact as CE

torch.set_num_threads(1)


def test_family_means_agree_on_what_the_operator_measures():
    """A lowpass family's means have one x4 block average, a centre family's agree outside the hole and a chroma
    family's share the channel mean: noiselessly the posterior cannot tell the variants apart."""
    means, types = mixture_means(16, families=2, variants=3, seed=0)
    for kind, task in (("lowpass", "sr4"), ("centre", "inpaint_box"), ("chroma", "colorization")):
        k = types.index(kind)
        op = registry.build_operator(task).setup([0] * 3, (3, 3, 16, 16), dtype=torch.float64)
        y = op.forward(means[k:k + 3])
        assert (y - y[:1]).abs().max() < 1e-12
        assert (means[k + 1] - means[k]).abs().max() > 0.05  # and differ where it does not measure
        prior = E.ImageMixturePrior(means, 0.05)
        bind = E.binder(task, 0, 16, 0.0)
        post = prior.spectral_posterior(y[:1], bind, 0.0)
        assert post.effective_modes() == pytest.approx(3.0, abs=0.05)


def test_budget_settings_stay_within_the_budget_for_every_sampler():
    prior, _ = E.make_prior(16, 1, 2, 0.1, 0)
    for name in E.supported("sr4"):
        for b in (20, 100):
            ov, nfe = E.budget_settings(name, "sr4", prior, b)
            assert nfe <= b or not ov, (name, b, ov, nfe)
            assert registry.build_sampler(name, "sr4", **ov).expected_nfe(prior) == nfe


def test_tiny_run_scores_the_exact_floor_and_counts_nfe(tmp_path):
    out = tmp_path / "r.json"
    rc = E.main(["--size", "16", "--families", "2", "--variants", "2", "--tasks", "sr4,inpaint_box",
                 "--samplers", "reddiff,pinv", "--problems", "2", "--samples", "4", "--budgets", "5",
                 "--workers", "1", "--json", str(out), "--md", str(tmp_path / "r.md")])
    assert rc == 0
    res = json.loads(out.read_text())
    for t in ("sr4", "inpaint_box"):
        cells = res["results"][t]
        assert set(cells) >= {"exact", "prior", "reddiff@5", "pinv@5"}
        assert cells["reddiff@5"]["nfe"] == 5 and cells["pinv@5"]["nfe"] == 0
        assert cells["exact"]["mmse_gap"] < cells["prior"]["mmse_gap"]
    assert "wall time" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize("argv", [["--tasks", "phase_retrieval"], ["--samplers", "nope"], ["--budgets", "x"],
                                  ["--size", "30"], ["--std", "0"]])
def test_bad_input_is_one_line_and_exit_code_2(argv, capsys):
    assert E.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_exact_claim_rows_apply_the_verdict_rule(tmp_path):
    better = {"psnr_per_problem": [30, 31, 32, 33, 30, 31], "mmse_gap_per_problem": [.1, .1, .2, .1, .1, .2]}
    worse = {"psnr_per_problem": [20, 21, 22, 20, 21, 22], "mmse_gap_per_problem": [1, 1, 2, 1, 1, 2]}
    cells = {"reddiff@100": better, "dps@100": worse, "pigdm@100": worse, "ddrm@100": worse}
    (tmp_path / "exact_images.json").write_text(json.dumps({"results": {"inpaint_freeform": cells,
                                                                        "sr4": cells}}))
    rows = CE.exact_claims(tmp_path)
    assert rows[0]["verdict"] == "holds" and rows[1]["verdict"] == "holds"  # PSNR higher, gap lower
    assert rows[2]["verdict"] == "does not hold"  # pigdm < reddiff on sr4 here
    assert rows[3]["verdict"] == "inconclusive" and "absent" in rows[3]["missing"]
