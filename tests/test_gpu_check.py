"""The prepared GPU check (benchmarks/gpu_check.py): max-batch search, wheel unpacking, CUDA-test discovery, and the
CPU dry run that CI runs (same code, tiny UNet, simulated OOM)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import zipfile

import pytest

from benchmarks.gpu_check import PAPER, cuda_test_ids, search_max_batch, use_wheels


def _fits_below(limit, calls=None):
    def fits(b):
        if calls is not None:
            calls.append(b)
        return (b <= limit, float(b))
    return fits


# --------------------------------------------------------------------------------------------- max-batch search
@pytest.mark.parametrize("cap", [1, 7, 64, 512])
def test_search_finds_the_largest_fitting_batch(cap):
    for limit in list(range(0, 70)) + [511, 512, 1000]:
        calls = []
        r = search_max_batch(_fits_below(limit, calls), cap=cap, box_s=1e9)
        assert r["max_batch"] == min(limit, cap), (limit, cap, r)
        assert r["status"] == ("cap" if limit >= cap else "exact")
        if r["status"] == "exact":
            assert r["first_oom"] == r["max_batch"] + 1     # the bracket is closed: b fits, b + 1 does not
        assert calls == [b for b, _ in r["probes"]] and len(set(calls)) == len(calls)  # never probes twice
        assert len(calls) <= 2 * math.ceil(math.log2(cap + 1)) + 1
        assert calls[0] == 1
        assert r["peak_mb_at_max"] == (float(r["max_batch"]) if r["max_batch"] else None)


def test_search_time_box_reports_a_lower_bound():
    t = [0.0]

    def clock():
        return t[0]

    def fits(b):
        t[0] += 10.0                       # every probe takes 10 s of a 25 s box: 3 probes, then stop
        return (b <= 100, None)

    r = search_max_batch(fits, cap=512, box_s=25.0, clock=clock)
    assert r["status"] == "time-boxed"
    assert [b for b, _ in r["probes"]] == [1, 2, 4] and r["max_batch"] == 4 and r["first_oom"] is None


def test_search_stops_at_the_deadline_with_a_lower_bound():
    from benchmarks.gpu_check import DeadlineReached

    def fits(b):
        if b == 8:
            raise DeadlineReached("deadline")
        return (True, None)

    r = search_max_batch(fits, cap=512, box_s=1e9)
    assert r["status"] == "deadline" and r["max_batch"] == 4 and [b for b, _ in r["probes"]] == [1, 2, 4]


def test_search_records_non_oom_failures():
    def fits(b):
        return (True, None) if b <= 12 else (False, None, f"RuntimeError at {b}")

    r = search_max_batch(fits, cap=512, box_s=1e9)
    assert r["max_batch"] == 12 and r["status"] == "exact"
    assert set(r["errors"]) == {"16", "14", "13"}


# --------------------------------------------------------------------------------------------- environment
def _wheel(path, top):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{top}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{top}-1.0.dist-info/METADATA", "Name: x\n")


def test_use_wheels_unpacks_only_missing_modules(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    _wheel(tmp_path / "gpu_check_fake_mod-1.0-py3-none-any.whl", "gpu_check_fake_mod")
    _wheel(tmp_path / "json-9.9-py3-none-any.whl", "json")           # installed: must not be shadowed
    info = use_wheels(tmp_path)
    assert info["unpacked"] == ["gpu_check_fake_mod-1.0-py3-none-any.whl"]
    assert info["present"] == ["json-9.9-py3-none-any.whl"]
    import gpu_check_fake_mod

    assert gpu_check_fake_mod.VALUE == 42
    import json as j

    assert hasattr(j, "dumps")
    sys.modules.pop("gpu_check_fake_mod", None)
    assert use_wheels(tmp_path / "nope")["missing_folder"]


def test_cuda_test_ids(tmp_path, monkeypatch):
    import benchmarks.gpu_check as g

    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text(
        "import pytest, torch\n"
        "@pytest.mark.skipif(not torch.cuda.is_available(), reason='x')\n@pytest.mark.parametrize('n', [1])\n"
        "def test_gpu(n): pass\n"
        "@pytest.mark.cuda\ndef test_marked(): pass\n"
        "@pytest.mark.slow\ndef test_cpu(): pass\n"
        "def test_plain(): torch.cuda.is_available()\n")
    monkeypatch.setattr(g, "ROOT", tmp_path)
    assert cuda_test_ids(tmp_path / "tests") == ["tests/test_a.py::test_gpu", "tests/test_a.py::test_marked"]


# --------------------------------------------------------------------------------------------- the dry run
def _dry(root, tmp_path, *extra, timeout=300):
    js, md = tmp_path / "g.json", tmp_path / "g.md"
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--json", str(js), "--md", str(md),
                        *extra], cwd=root, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(js.read_text()), md.read_text(), r


@pytest.mark.slow
def test_dry_run_produces_every_measurement(root, tmp_path):
    """The default dry run (what the GPU run does, on the CPU with a tiny UNet) measures every sampler of the
    registry at batch 1 and 8 in fp32 and bf16, finds the simulated max batch exactly, and writes both files."""
    from reddiff.registry import sampler_class, sampler_info, sampler_names

    # the global deadline and the max-batch time box are set out of reach, so what is measured does not depend on
    # the machine's speed or load (about 60 s on a quiet 2-core machine); what the deadline and the box do is
    # tested with a deadline that is always hit (test_deadline_stops_everything_and_still_writes) and an injected
    # clock (test_search_stops_at_the_deadline_with_a_lower_bound)
    res, md, _ = _dry(root, tmp_path, "--budget-s", "1e9", "--box-s", "1e9", timeout=1800)  # a hang guard only
    m = res["meta"]
    assert m["dry_run"] and not m["deadline_hit"], (m["elapsed_s"], m["cpu_s"])
    assert m["samplers"] == sampler_names() and m["sampler_source"] == "reddiff.registry"
    assert m["unet_config"]["learn_sigma"] and m["unet_config"]["out_channels"] == 6
    assert res["not_measured"] == [f"memory {dt}: no CUDA memory statistics on the CPU" for dt in ("fp32", "bf16")]
    for dt in ("fp32", "bf16"):
        for name in sampler_names():
            info = sampler_info(name)
            latent = bool(getattr(sampler_class(name), "needs_latent", False))
            for b in ("1", "8"):
                r = res["timing"][dt][name][b]
                if latent and dt == "bf16":                      # latent solvers: the latent model, fp32 only
                    assert r == {"n/a": "a latent solver: timed in fp32 only"}
                    continue
                assert "error" not in r and "not_measured" not in r, (dt, name, b, r)
                assert r["batch"] == int(b) and r["finite_output"] and r["limit"] == info["speed_limit"]
                if r["nfe"] == 0:                            # pinv: no network
                    assert r["wall_over_forward"] is None
                    continue
                if r["capped"]:                                  # a slow sampler: fewer steps or runs
                    assert 1 <= r["steps"] <= m["steps"] and 1 <= r["repeats"] <= m["repeats"]
                    assert (r["steps"], r["repeats"]) != (m["steps"], m["repeats"])
                else:
                    assert (r["steps"], r["repeats"]) == (m["steps"], m["repeats"])
                if name in PAPER or name == "ddim":             # one network call per step
                    assert r["nfe"] == r["steps"] == m["steps"], (name, r["nfe"])
                assert r["nfe"] >= 1
                assert r["forward_kind"] == ("fwd_bwd" if info["needs_grad"] else "no_grad")
                assert r["s_per_step_per_image"] == pytest.approx(r["wall_s"] / (r["steps"] * r["batch"]), rel=1e-12)
                assert r["s_per_call_per_image"] == pytest.approx(r["wall_s"] / (r["nfe"] * r["batch"]), rel=1e-12)
                coder = (r["decoder_calls"] * r["decode_ms"] + r["encoder_calls"] * r["encode_ms"]) if latent else 0.0
                assert latent == ("decoder_calls" in r) and (not latent or r["decoder_calls"] >= 1)
                assert r["wall_over_forward"] == pytest.approx(
                    r["wall_s"] / ((r["nfe"] * r["forward_ms"] + coder) / 1e3), rel=1e-12)
                assert r["pass"] == (r["wall_over_forward"] <= r["limit"])
            mb = res["max_batch"][dt][name]
            if "n/a" in mb:
                assert latent or res["timing"][dt][name]["1"]["nfe"] == 0
                continue
            assert mb["max_batch"] == 3 and mb["first_oom"] == 4 and mb["status"] == "exact" and mb["simulated_oom"]
        for bare in ("bare no_grad", "bare fwd_bwd"):
            assert res["max_batch"][dt][bare]["max_batch"] == 3
    assert res["cuda_tests"]["status"] in ("skipped (no CUDA)", "not run (no pytest)")
    assert "tests/test_operators.py::test_cuda_matches_cpu" in res["cuda_tests"]["tests"]
    assert len(res["checks"]) == sum(1 for dt in res["timing"].values() for n in dt.values() for r in n.values()
                                     if r.get("wall_over_forward") is not None)
    assert res["paper"] == PAPER and PAPER["reddiff"] == {"s_per_step": "0.05", "max_batch": "30", "tag": "paper*"}
    for head in ("## Time per step, fp32, batch 1", "## Time per step, bf16, batch 8", "## Max batch within 40 GiB",
                 "## RED-diff peak memory", "## CUDA-only tests", "## Not measured", "## Checks"):
        assert head in md
    assert "| 0.05 | paper* |" in md and "| 30 | paper* |" in md and "--dry-run" in md


def test_deadline_stops_everything_and_still_writes(root, tmp_path):
    res, md, r = _dry(root, tmp_path, "--budget-s", "0.5", "--samplers", "reddiff,dps", "--dtypes", "fp32")
    m = res["meta"]
    assert m["deadline_hit"]
    assert res["timing"]["fp32"]["reddiff"]["1"] == {"not_measured": "deadline"}
    assert all(e.get("not_measured") == "deadline" for e in res["max_batch"]["fp32"].values())
    # 2 samplers x 2 batches, RED-diff memory, 4 max-batch searches (2 samplers, 2 bare calls), the CUDA tests
    assert len(res["not_measured"]) == 4 + 1 + 4 + 1
    assert res["cuda_tests"]["status"] == "not measured (deadline)"
    assert "deadline reached" in md and "not measured (deadline)" in md


def test_runs_without_hydra(root, tmp_path):
    """On a machine without hydra/omegaconf (and no wheels), the operator and samplers come from their classes."""
    js, md = tmp_path / "g.json", tmp_path / "g.md"
    code = ("import sys; sys.modules['hydra'] = sys.modules['omegaconf'] = None; "
            "from benchmarks.gpu_check import main; "
            f"main(['--dry-run', '--json', {str(js)!r}, '--md', {str(md)!r}, '--wheels', '/nonexistent', "
            "'--samplers', 'reddiff,dps,ddrm', '--batches', '2', '--dtypes', 'fp32', '--steps', '2', "
            "'--no-max-batch'])")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(js.read_text())
    assert "no hydra" in res["meta"]["operator"]
    assert res["meta"]["sampler_meta"]["dps"]["needs_grad"] and not res["meta"]["sampler_meta"]["reddiff"]["needs_grad"]
    for name in ("reddiff", "dps", "ddrm"):
        e = res["timing"]["fp32"][name]["2"]
        assert e["nfe"] == 2 and e["finite_output"], (name, e)
    assert res["max_batch"] == {} and md.exists()


def test_bad_input_exits_2(root):
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--batches", "x"], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--batches" in r.stderr
    import torch

    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--budget-s", "5"], cwd=root,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            "error: gpu_check: no CUDA device is available (use --dry-run on a CPU machine)"]
