"""reddiff.report.claims: the generated claims table and its verdict rule, on synthetic job dirs."""
import csv
import json

import numpy as np
import pytest

from reddiff.report import claims as C
from reddiff.data.make_demo import DEMO_IDS

VERDICTS = ("holds", "does not hold", "inconclusive")


def _job(root, name, task, sampler, psnr, extra_cfg=None, lpips_missing=True):
    d = root / name
    d.mkdir(parents=True)
    metrics = {"psnr": {"mean": float(np.mean(psnr))}}
    if lpips_missing:
        metrics["lpips"] = {"missing": "alexnet weights not found; run: reddiff weights fetch alexnet"}
    (d / "summary.json").write_text(json.dumps({
        "status": "ok", "task": task, "sampler": sampler, "metrics": metrics,
        "config": {"sampler": dict(extra_cfg or {})}}))
    with (d / "metrics.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "psnr", "lpips", "nfe", "seconds", "diverged"])
        for i, v in zip(DEMO_IDS, psnr):
            w.writerow([i, f"{v:.4f}", "", 100, 1.0, "false"])


def _table1(root, preset, gaps):
    rng = np.random.default_rng(0)
    base = 20 + rng.normal(0, 2, 12)
    _job(root / preset, "0_reddiff", "inpaint_freeform", "reddiff", base)
    for k, (s, gap) in enumerate(gaps.items(), 1):
        _job(root / preset, f"{k}_{s}", "inpaint_freeform", s, base - gap + rng.normal(0, 0.05, 12))


def test_verdicts_follow_the_paired_rule(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "RES", tmp_path)
    _table1(tmp_path, "demo_table1", {"dps": 3.0, "pigdm": -1.0, "ddrm": 0.5})  # Pi-GDM better: fails
    _table1(tmp_path, "demo_table1_tuned", {"dps": 3.0, "pigdm": 1.0, "ddrm": 0.5})  # RED-diff beats all
    row = C.claim_table1("psnr")
    assert row["v_off"] == "does not hold" and row["v_tun"] == "holds" and row["verdict"] == "holds"
    assert "vs pigdm -1.0" in row["official"] or "vs pigdm -0.9" in row["official"]
    lp = C.claim_table1("lpips", higher=False)
    assert lp["verdict"] == "inconclusive" and "lpips missing" in lp["missing"]


def test_a_tie_is_inconclusive_and_missing_runs_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "RES", tmp_path)
    _table1(tmp_path, "demo_table1", {"pigdm": 2.0, "ddrm": 2.0})
    base = np.array([float(r["psnr"]) for r in csv.DictReader((tmp_path / "demo_table1/0_reddiff/metrics.csv").open())])
    # per-photo mean differences +0.5, -0.5, +0.2: the paired interval straddles zero
    _job(tmp_path / "demo_table1", "9_dps", "inpaint_freeform", "dps", base - np.repeat([0.5, -0.5, 0.2], 4))
    row = C.claim_table1("psnr")
    assert row["verdict"] == "inconclusive" and "results/demo_table1_tuned" in row["missing"]
    nl = C.claim_nonlinear("hdr", "paper")
    assert nl["verdict"] == "inconclusive" and "demo_nonlinear" in nl["missing"]


def test_ablation_claim_reads_the_varied_key(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "RES", tmp_path)
    base = 20 + np.random.default_rng(1).normal(0, 2, 12)
    for k, (o, gap) in enumerate({"descending": 0.0, "ascending": 5.0, "random": 3.0}.items()):
        _job(tmp_path / "demo_order", f"{k}_reddiff", "inpaint_freeform", "reddiff", base - gap
             + np.random.default_rng(k).normal(0, 0.1, 12), {"ordering": o})
    row = C.claim_ablation("demo_order", "ordering", "descending", "c", "p")
    assert row["verdict"] == "holds" and "vs random +" in row["official"]
    gap = float(row["official"].split("vs ascending ")[1].split(" ")[0])
    assert gap == pytest.approx(5.0, abs=0.1)


def test_generated_file_has_one_row_per_claim_with_rule_verdict_and_command(tmp_path):
    out = tmp_path / "claims.md"
    assert C.main(["--out", str(out)]) == 0
    text = out.read_text()
    assert "**Verdict rule.**" in text and "paired 95% interval" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(C.all_claims()) >= 12
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert cells[5].strip("*").split(" (")[0] in VERDICTS, cells[5]
        assert cells[7].startswith("`") and cells[7].endswith("`")


@pytest.mark.parametrize("higher", [True, False])
def test_best_claim_direction_for_lower_is_better_metrics(tmp_path, monkeypatch, higher):
    monkeypatch.setattr(C, "RES", tmp_path)
    _table1(tmp_path, "demo_table1", {"dps": 3.0, "pigdm": 2.0, "ddrm": 1.0})
    found = C.jobs("demo_table1")
    _, v, _ = C.best_claim(found, "inpaint_freeform", "reddiff", ["dps", "pigdm", "ddrm"], "psnr", higher)
    assert v == ("holds" if higher else "does not hold")
