"""Experiment presets (conf/experiment/*.yaml), their plots and docs/REPRODUCE.md.

* Every preset composes, names its W&B group and sweep dir, and sweeps the intended axes; every job of every sweep
  composes and builds its sampler with the paper's settings (docs/ANCHORS.md) -- no sampling.
* Dry runs (slow): for each GPU preset, representative jobs run end to end on one demo image with the embedded
  prior and 2 steps (in-process, exactly as run.py runs a job): paper presets run *every sampler* of their first
  task (paper_deblur also the second task with RED-diff, paper_nonlinear the tasks that need no extra weights),
  ablations their first and last sweep points (ablation_order all three orderings, ablation_steps every sampler).
  One demo preset (demo_table1, all five samplers) runs as a real `run.py -m` multirun, which checks the sweep
  table, the plots and the offline W&B table written at the end of the sweep.
* docs/REPRODUCE.md's cost tables agree with the presets (jobs, images, NFE) and with their own stated
  per-step costs.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from reddiff.core.diffusion import ORDERINGS, Schedule
from reddiff.store.results import read_rows
from reddiff.samplers.reddiff import WEIGHTINGS

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
#: presets owned elsewhere (tested by their owners)
OTHERS = {"demo_lambda_lr_batched", "demo_lambda_lr_small"}  # python -m reddiff.run.sweep presets
OURS = [p for p in PRESETS if p not in OTHERS]
GPU = [p for p in OURS if not p.startswith("demo_")]
DEMO = [p for p in OURS if p.startswith("demo_")]
TABLE1_SAMPLERS = ["reddiff", "dps", "pigdm", "ddrm", "pinv"]
#: the demo tables also run the round-2 solvers and the round-3 pixel and flow solvers
DEMO_SAMPLERS = TABLE1_SAMPLERS + ["ddnm", "diffpir", "daps", "pnpdm", "mcgdiff", "fps_smc", "pnp_flow", "ot_ode",
                                   "flowdps", "flowchef", "flow_priors", "d_flow", "lgd", "tmpd", "sitcom", "ddsmc",
                                   "enkg"]
#: the images of the full data sets (docs/ANCHORS.md: the 1k DGP ImageNet validation list; FFHQ 00000-00999)
FULL_SET = {"imagenet1k": 1000, "ffhq1k": 1000, "demo": 12}

EXPECTED_AXES = {
    "paper_table1": {"sampler": TABLE1_SAMPLERS},
    "paper_sr4": {"sampler": TABLE1_SAMPLERS},
    "paper_deblur": {"task": ["deblur_gauss", "deblur_uniform"], "sampler": TABLE1_SAMPLERS},
    "paper_nonlinear": {"task": ["phase_retrieval", "hdr", "deblur_nonlinear"], "sampler": ["reddiff", "dps"]},
    "ablation_weighting": {"sampler.weighting": list(WEIGHTINGS)},
    "ablation_order": {"sampler.ordering": list(ORDERINGS)},
    "ablation_lambda_lr": {"sampler.lam": ["0.0", "0.05", "0.25", "1.0", "4.0"],
                           "sampler.lr": ["0.025", "0.05", "0.1", "0.25", "0.5"]},
    "ablation_steps": {"sampler": ["reddiff", "dps", "pigdm", "ddrm"],
                       "sampler.steps": ["10", "20", "50", "100", "200", "500", "1000"]},
    "demo_table1": {"sampler": DEMO_SAMPLERS},
    "demo_sr4": {"sampler": DEMO_SAMPLERS},
    "demo_inpaint_box": {"sampler": TABLE1_SAMPLERS + ["ddnm", "mcgdiff", "fps_smc"]},
    "demo_nonlinear": {"task": ["phase_retrieval", "hdr"], "sampler": ["reddiff", "dps"]},
    "demo_weighting": {"sampler.weighting": list(WEIGHTINGS)},
    "demo_order": {"sampler.ordering": list(ORDERINGS)},
    "demo_lambda_lr": {"sampler.lam": ["0.0", "0.05", "0.25", "1.0", "4.0"],
                       "sampler.lr": ["0.05", "0.1", "0.25", "0.5", "1.0"]},
    "demo_steps": {"sampler": ["reddiff", "dps", "pigdm", "ddrm"], "sampler.steps": ["10", "20", "50", "100", "200"]},
    "demo_steps_parallel": {"sampler": ["reddiff"], "sampler.steps": ["100"], "sampler.parallel": ["1", "2", "5", "10"]},
}


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def hydra_ctx():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def preset_cfg(name: str, *overrides: str, hydra: bool = False):
    return compose("config", overrides=[f"+experiment={name}", *overrides], return_hydra_config=hydra)


def sweep_jobs(name: str) -> list[list[str]]:
    """The job overrides of a preset's sweep, expanded exactly as Hydra's basic sweeper expands them."""
    return [list(j) for j in _sweep_jobs(name)]


@functools.lru_cache(maxsize=None)
def _sweep_jobs(name: str) -> tuple:
    params = preset_cfg(name, hydra=True).hydra.sweeper.params
    ov = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return tuple(tuple(j) for j in BasicSweeper.split_arguments(ov, None)[0])


def job_settings(name: str, job: list[str]) -> dict:
    """Sampler object, choices and data size of one job of a preset (composed once per session)."""
    return _job_settings(name, tuple(job))


@functools.lru_cache(maxsize=None)
def _job_settings(name: str, job: tuple) -> dict:
    cfg = preset_cfg(name, *job, hydra=True)
    choices = dict(cfg.hydra.runtime.choices)
    sampler = instantiate(cfg.sampler)
    n = cfg.data.count if cfg.data.count is not None else FULL_SET[choices["data"]]
    return {"cfg": cfg, "choices": choices, "sampler": sampler, "task": cfg.task.name, "images": int(n)}


def nfe(sampler) -> int:
    """Network evaluations per image of a built sampler, as it declares them (inner ODE steps and particles count;
    pinv: none)."""
    from reddiff.core.diffusion import Schedule

    class _Sched:  # expected_nfe only needs the schedule
        schedule = Schedule()

    return int(sampler.expected_nfe(_Sched()))


# ------------------------------------------------------------------------------ composition (fast)
def test_all_presets_are_known():
    assert set(EXPECTED_AXES) == set(OURS), "a preset was added or removed: update EXPECTED_AXES and REPRODUCE.md"


@pytest.mark.parametrize("name", OURS)
def test_preset_composes_with_its_axes_group_and_sweep_dir(hydra_ctx, name):
    cfg = preset_cfg(name, hydra=True)
    assert cfg.experiment_name == name
    assert OmegaConf.select(cfg, "logger.group") == name or cfg.hydra.runtime.choices.logger == "none"
    assert name in cfg.hydra.sweep.dir
    assert "reddiff.run.sweep_callback.SweepTableCallback" in str(cfg.hydra.callbacks)
    axes = {k: [s.strip() for s in str(v).split(",")] for k, v in cfg.hydra.sweeper.params.items()}
    assert axes == EXPECTED_AXES[name]
    jobs = sweep_jobs(name)
    assert len(jobs) == math.prod(len(v) for v in axes.values())
    assert len({tuple(j) for j in jobs}) == len(jobs)
    choices = cfg.hydra.runtime.choices
    if name.startswith("demo_"):
        assert (choices.prior, choices.data) == ("embedded", "demo")
        assert cfg.batch_size >= 12, "a demo job should hold the whole demo set in one batch"
    else:
        assert (choices.prior, choices.data) == ("adm_imagenet256", "imagenet1k")
        assert cfg.prior.weights == "adm_imagenet256_uncond"


@pytest.mark.parametrize("name", OURS)
def test_every_job_builds_its_sampler_and_is_compatible(hydra_ctx, name):
    """Each job composes, its sampler builds with the swept value, and the task's operator supports it."""
    ops = {}
    for job in sweep_jobs(name):
        js = job_settings(name, job)
        s, choices = js["sampler"], js["choices"]
        for ov in job:
            key, _, val = ov.partition("=")
            if key == "sampler":
                assert choices["sampler"] == val
            elif key == "task":
                assert js["task"] == val
            elif key.startswith("sampler."):
                got = getattr(s, key.split(".", 1)[1])
                assert (float(got) == float(val)) if isinstance(got, (int, float)) else got == val, (job, got)
        if js["task"] == "deblur_nonlinear":
            continue  # its operator needs the user-supplied bkse weights
        if js["task"] not in ops:
            ops[js["task"]] = instantiate(js["cfg"].task.operator)
        s.check(ops[js["task"]])  # raises OperatorCapabilityError if the combination would be n/a


def _by_sampler(name):
    out = {}
    for job in sweep_jobs(name):
        js = job_settings(name, job)
        out.setdefault((js["task"], js["choices"]["sampler"]), js)
    return out


def test_paper_table1_settings(hydra_ctx):
    """docs/ANCHORS.md: RED-diff 1000 steps with the code defaults (lr 0.1, lam 0.25, linear), DPS 1000 steps zeta 0.1,
    Pi-GDM guidance weight 1 (100 steps), DDRM 20 steps eta 0.85 / eta_b 1; free-form inpainting, noiseless;
    all five metrics."""
    jobs = _by_sampler("paper_table1")
    r = jobs[("inpaint_freeform", "reddiff")]["sampler"]
    assert (r.steps, r.lr, r.lam, r.weighting, r.ordering, r.obs_weight, r.sigma_x0) == \
        (1000, 0.1, 0.25, "linear", "descending", 1.0, 0.0)
    d = jobs[("inpaint_freeform", "dps")]["sampler"]
    assert (d.steps, d.zeta) == (1000, 0.1)
    p = jobs[("inpaint_freeform", "pigdm")]["sampler"]
    assert (p.steps, p.guidance_weight, p.start_t) == (100, 1.0, None)
    dd = jobs[("inpaint_freeform", "ddrm")]["sampler"]
    assert (dd.steps, dd.eta, dd.eta_b) == (20, 0.85, 1.0)
    assert nfe(jobs[("inpaint_freeform", "pinv")]["sampler"]) == 0
    cfg = jobs[("inpaint_freeform", "reddiff")]["cfg"]
    assert sorted(cfg.metrics.names) == sorted(["psnr", "ssim", "kid", "lpips", "top1"])
    assert cfg.task.sigma_y == 0.0 and cfg.data.count is None


def test_paper_sr4_settings(hydra_ctx):
    jobs = _by_sampler("paper_sr4")
    assert jobs[("sr4", "reddiff")]["sampler"].steps == 1000
    assert (jobs[("sr4", "dps")]["sampler"].steps, jobs[("sr4", "dps")]["sampler"].zeta) == (1000, 1.0)
    assert jobs[("sr4", "pigdm")]["sampler"].start_t == 500  # SR runs start from y noised to t = 500
    assert jobs[("sr4", "ddrm")]["sampler"].steps == 20
    assert jobs[("sr4", "pinv")]["sampler"].bicubic is True


def test_paper_deblur_and_nonlinear_settings(hydra_ctx):
    """Official per-task values: RED-diff lam 0.25 / lr 0.5 for Gaussian deblur and the nonlinear tasks;
    DPS zeta 2.0 (Gaussian deblur), 0.4 (phase retrieval), 0.1 (HDR), 0.05 (nonlinear deblur)."""
    deb = _by_sampler("paper_deblur")
    r = deb[("deblur_gauss", "reddiff")]["sampler"]
    assert (r.steps, r.lr, r.lam) == (1000, 0.5, 0.25)
    assert deb[("deblur_gauss", "dps")]["sampler"].zeta == 2.0
    nl = _by_sampler("paper_nonlinear")
    assert {t: nl[(t, "dps")]["sampler"].zeta for t in ("phase_retrieval", "hdr", "deblur_nonlinear")} == \
        {"phase_retrieval": 0.4, "hdr": 0.1, "deblur_nonlinear": 0.05}
    for t in ("phase_retrieval", "hdr", "deblur_nonlinear"):
        r = nl[(t, "reddiff")]["sampler"]
        assert (r.steps, r.lr, r.lam) == (1000, 0.5, 0.25)
        assert nl[(t, "dps")]["sampler"].steps == 1000


def test_ablations_hold_everything_but_their_axis(hydra_ctx):
    """An ablation varies only its axis; the rest is the Table 1 RED-diff protocol."""
    for name, axis in (("ablation_weighting", "weighting"), ("ablation_order", "ordering"),
                       ("ablation_lambda_lr", None)):
        seen = set()
        for job in sweep_jobs(name):
            s = job_settings(name, job)["sampler"]
            fixed = {k: getattr(s, k) for k in ("steps", "lr", "lam", "weighting", "ordering") if k != axis}
            if axis is None:
                fixed.pop("lr"), fixed.pop("lam")
                seen.add((s.lam, s.lr))
            else:
                seen.add(getattr(s, axis))
            assert fixed == {k: v for k, v in {"steps": 1000, "lr": 0.1, "lam": 0.25, "weighting": "linear",
                                               "ordering": "descending"}.items() if k in fixed}, (name, job)
        assert len(seen) == len(sweep_jobs(name))
    # the lambda x lr grid contains the Table 1 setting
    assert (0.25, 0.1) in {(job_settings("ablation_lambda_lr", j)["sampler"].lam,
                            job_settings("ablation_lambda_lr", j)["sampler"].lr) for j in sweep_jobs("ablation_lambda_lr")}


def test_demo_table1_settings(hydra_ctx):
    jobs = _by_sampler("demo_table1")
    steps = {k[1]: nfe(v["sampler"]) for k, v in jobs.items()}
    assert steps == {"reddiff": 100, "dps": 100, "pigdm": 100, "ddrm": 20, "pinv": 0, "ddnm": 100,
                     "diffpir": 20, "daps": 100, "pnpdm": 91, "mcgdiff": 100, "fps_smc": 100,  # DiffPIR: official 20
                     "pnp_flow": 100, "ot_ode": 90, "flowdps": 100, "flowchef": 100, "flow_priors": 100, "d_flow": 100,
                     "lgd": 100, "tmpd": 100, "sitcom": 100, "ddsmc": 100, "enkg": 80}
    assert jobs[("inpaint_freeform", "dps")]["sampler"].zeta == 0.1
    assert _by_sampler("demo_sr4")[("sr4", "pinv")]["sampler"].bicubic is True


# ------------------------------------------------------------------------------------ plots (fast)
def test_weighting_curves_follow_the_schedule():
    """plot_weighting's curves are the sampler's weights of s_t = sqrt(1-a_t)/sqrt(a_t) (paper Fig. 2)."""
    from reddiff.report.plots import weighting_curves

    ts, c = weighting_curves()
    s = Schedule().sigma_over_alpha(torch.as_tensor(ts)).numpy()
    assert set(c) == set(WEIGHTINGS)
    assert abs(c["linear"] - s).max() < 1e-12
    assert abs(c["square"] - s ** 2).max() < 1e-9 * (s ** 2).max()
    assert abs(c["sqrt"] - s ** 0.5).max() < 1e-12
    assert abs(c["trunc_linear"] - s.clip(max=1.0)).max() < 1e-12
    assert (c["const"] == 1).all()
    for w in set(WEIGHTINGS) - {"const"}:
        assert (c[w][1:] >= c[w][:-1]).all(), w  # more weight on the denoisers of noisier steps
    cross = int(abs(s - 1).argmin())  # at s = 1 the power laws agree
    for w in ("linear", "sqrt", "square", "power2over3", "trunc_linear"):
        assert abs(c[w][cross] - 1) < 0.01, w


def _fake_sweep(tmp_path: Path, name: str, value) -> Path:
    """Job dirs with the real composed config of each job of ``name`` and a known metric ``value(sampler)``."""
    root = tmp_path / name
    for i, job in enumerate(sweep_jobs(name)):
        js = job_settings(name, job)
        d = root / f"{i}_job"
        d.mkdir(parents=True)
        cfg = js["cfg"].copy()
        with open_dict(cfg):
            del cfg["hydra"]
        summary = {"task": js["task"], "sampler": js["choices"]["sampler"], "prior": js["choices"]["prior"],
                   "data": js["choices"]["data"], "status": "ok", "n_images": 2, "overrides": job,
                   "metrics": {"psnr": {"mean": value(js["sampler"]), "ci95": 0.1}, "ssim": {"mean": 0.5, "ci95": None}},
                   "cost": {"nfe_per_image": nfe(js["sampler"]), "seconds_per_image": 1.0 + nfe(js["sampler"])},
                   "config": {**OmegaConf.to_container(cfg, resolve=False),
                              "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
                              "data": OmegaConf.to_container(cfg.data, resolve=True)}}
        (d / "summary.json").write_text(json.dumps(summary))
    return root


def test_auto_plots_match_the_sweep(hydra_ctx, tmp_path):
    from reddiff.report.plots import auto_kinds, load_jobs

    expect = {"demo_lambda_lr": "heatmap", "demo_steps": "steps", "demo_weighting": "weighting",
              "demo_order": "bars", "demo_table1": "bars"}
    for name, kind in expect.items():
        kinds = auto_kinds(load_jobs(_fake_sweep(tmp_path, name, lambda s: 20.0)))
        assert kind in kinds and "grid" in kinds, (name, kinds)
        assert ("heatmap" in kinds) == (name == "demo_lambda_lr")


def test_heatmap_puts_each_job_in_its_cell(hydra_ctx, tmp_path):
    from reddiff.report.plots import heatmap_grid, load_jobs, make_plots

    f = lambda s: 10 * s.lr - (s.lam - 1.0) ** 2  # noqa: E731 - a known surface with its max at lr 1, lam 1
    root = _fake_sweep(tmp_path, "demo_lambda_lr", f)
    lams, lrs, grid = heatmap_grid(load_jobs(root), "psnr")
    assert grid.shape == (len(lams), len(lrs)) == (5, 5)
    for a, lam in enumerate(lams):
        for b, lr in enumerate(lrs):
            assert grid[a, b] == pytest.approx(10 * lr - (lam - 1.0) ** 2)
    best = divmod(int(grid.argmax()), len(lrs))
    assert (lams[best[0]], lrs[best[1]]) == (1.0, 1.0)
    paths = make_plots(root, ["heatmap", "bars"])
    assert [p.name for p in paths] == ["plot_heatmap.png", "plot_bars.png"]
    assert all(p.stat().st_size > 5000 for p in paths)


def test_plots_cli_errors_clearly(tmp_path, capsys):
    from reddiff.report.plots import main

    with pytest.raises(SystemExit, match="no finished job dirs"):
        main([str(tmp_path)])
    main([str(tmp_path), "--kind", "weighting"])  # the weighting curves need no jobs
    assert capsys.readouterr().out.strip() == str(tmp_path / "plot_weighting.png")
    assert (tmp_path / "plot_weighting.png").stat().st_size > 5000


# ---------------------------------------------------------------------------------- REPRODUCE.md
def _doc_table(heading: str) -> list[dict]:
    text = (ROOT / "docs" / "REPRODUCE.md").read_text()
    block: list[str] = []
    for ln in text.split(heading, 1)[1].splitlines():  # the first table after the heading
        if ln.startswith("|"):
            block.append(ln)
        elif block:
            break
    header = [h.strip() for h in block[0].strip("|").split("|")]
    rows = []
    for ln in block[2:]:
        cells = [c.strip().strip("`") for c in ln.strip().strip("|").split("|")]
        if cells[0].lower().startswith("**total") or not cells[0]:
            continue
        rows.append(dict(zip(header, cells)))
    return rows


def _cost_model(names: list[str]) -> dict[tuple[str, str], dict]:
    """Per (preset, sampler): number of jobs, images per job and NFE summed over the jobs."""
    out: dict[tuple[str, str], dict] = {}
    for name in names:
        for job in sweep_jobs(name):
            js = job_settings(name, job)
            e = out.setdefault((name, js["choices"]["sampler"]), {"jobs": 0, "images": js["images"], "nfe": 0})
            e["jobs"] += 1
            e["nfe"] += nfe(js["sampler"])
            assert e["images"] == js["images"]
    return out


def test_reproduce_doc_gpu_costs_match_presets(hydra_ctx):
    model = _cost_model(GPU)
    rows = _doc_table("### GPU cost per preset")
    assert {(r["preset"], r["sampler"]) for r in rows} == set(model)
    for r in rows:
        m = model[(r["preset"], r["sampler"])]
        assert (int(r["jobs"]), int(r["images/job"]), int(r["NFE/img (all jobs)"])) == (m["jobs"], m["images"], m["nfe"]), r
        hours = m["images"] * m["nfe"] * float(r["s/step/img"]) / 3600
        assert float(r["GPU-hours"]) == pytest.approx(hours, abs=0.051), r


def test_reproduce_doc_cpu_costs_match_demo_presets(hydra_ctx):
    model = _cost_model(DEMO)
    rows = _doc_table("### CPU cost of the demo sweeps")
    assert {(r["preset"], r["sampler"]) for r in rows} == set(model)
    overhead = float(re.search(r"plus ([0-9.]+) s per job", (ROOT / "docs" / "REPRODUCE.md").read_text()).group(1))
    totals: dict[str, float] = {}
    for r in rows:
        m = model[(r["preset"], r["sampler"])]
        assert m["images"] <= 12  # one batch of 12: network calls per job = NFE per image
        assert (int(r["jobs"]), int(r["network calls (all jobs)"])) == (m["jobs"], m["nfe"]), r
        minutes = (m["nfe"] * float(r["s/call"]) + m["jobs"] * overhead) / 60
        assert float(r["minutes"]) == pytest.approx(minutes, abs=0.051), r
        totals[r["preset"]] = totals.get(r["preset"], 0.0) + minutes
    assert totals["demo_table1"] < 30, totals  # the lead's budget for the full demo Table 1 on a 2-core CPU


def test_reproduce_doc_names_every_preset_command():
    text = (ROOT / "docs" / "REPRODUCE.md").read_text()
    for name in OURS:
        assert f"python run.py -m +experiment={name}" in text, name


# --------------------------------------------------------------------------------- dry runs (slow)
DRY = ["prior=embedded", "data=demo", "data.count=1", "logger=none", "progress=false", "metrics.names=[psnr,ssim]",
       "device=cpu", "batch_size=1", *[f"++task.hparams.{s}.steps=2" for s in ("reddiff", "dps", "pigdm", "ddrm")]]


def _representative_jobs(name: str) -> list[list[str]]:
    jobs = sweep_jobs(name)
    if name.startswith("paper_"):
        first = next((o for o in jobs[0] if o.startswith("task=")), None)
        picked = [j for j in jobs if first is None or first in j]  # every sampler on the first task
        picked += [j for j in jobs if first is not None and first not in j and "sampler=reddiff" in j]
    elif name in ("ablation_order", "ablation_steps"):
        picked = jobs if name == "ablation_order" else [j for j in jobs if j[-1] == "sampler.steps=10"]
    else:
        picked = [jobs[0], jobs[-1]]
    picked = [j for j in picked if "task=deblur_nonlinear" not in j]  # needs the user-supplied bkse weights
    # 2 steps instead of the swept step count
    return [[o if not o.startswith("sampler.steps=") else "sampler.steps=2" for o in j] for j in picked]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny jobs: threads only contend on a shared CPU
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
@pytest.mark.parametrize("name", GPU)
def test_gpu_preset_dry_run(hydra_ctx, one_thread, tmp_path, name):
    """Representative jobs of a GPU preset, each on one demo image with the embedded prior and 2 steps, run through
    the same runner as run.py (reddiff.run.experiment.run) and write the contracted outputs."""
    from reddiff.run.experiment import run

    jobs = _representative_jobs(name)
    assert jobs
    for i, job in enumerate(jobs):
        cfg = preset_cfg(name, *job, *DRY, hydra=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        out = tmp_path / f"{i}"
        s = run(cfg, out)
        assert s["status"] == "ok", (job, s.get("reason"))
        assert s["experiment"] == name and s["n_images"] == 1 and s["prior"] == "embedded"
        assert s["cost"]["nfe_per_image"] == (0 if "sampler=pinv" in job else 2), job
        assert s["metrics"]["psnr"]["mean"] > 0, job
        rows = read_rows(out / "metrics.csv")
        assert len(rows) == 1 and rows[0]["diverged"] == "false"
        assert (out / "grid.png").exists() and (out / "summary.json").exists()
        for ov in job:
            key, _, val = ov.partition("=")
            if key.startswith("sampler.") and key != "sampler.steps":
                assert str(s["config"]["sampler"][key.split(".", 1)[1]]) == val


@pytest.mark.slow
def test_demo_table1_multirun_end_to_end(tmp_path):
    """`run.py -m +experiment=demo_table1` (the paper's five samplers, 1 image, 2 steps, W&B offline): one table row per
    sampler, plots and the W&B table (group = experiment name) written at the end of the sweep."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "HYDRA_FULL_ERROR": "1"}
    args = [sys.executable, "run.py", "-m", "+experiment=demo_table1", "hydra/launcher=basic", "data.count=1",
            "progress=false", "metrics.names=[psnr,ssim]", "batch_size=1",
            *[f"task.hparams.{s}.steps=2" for s in ("reddiff", "dps", "pigdm", "ddrm")], f"hydra.sweep.dir={sweep}",
            "sampler=" + ",".join(TABLE1_SAMPLERS)]  # the paper's five (command line wins over the preset's list)
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    md = (sweep / "table.md").read_text()
    body = [ln for ln in md.splitlines() if ln.startswith("| sampler=")]
    assert sorted(ln.split("|")[1].strip() for ln in body) == sorted(f"sampler={s}" for s in TABLE1_SAMPLERS), md
    nfe_col = md.splitlines()[2].split("|").index(" NFE/img ")
    assert {ln.split("|")[1].strip(): ln.split("|")[nfe_col].strip() for ln in body}["sampler=pinv"] == "0"
    assert "23.29 (paper*)" in md  # the published RED-diff PSNR sits beside the measured one
    for plot in ("plot_bars.png", "plot_grid.png"):
        assert (sweep / plot).stat().st_size > 5000, plot
    runs = list((sweep / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "the sweep table is logged as one W&B run in the sweep dir"
    tables = list(runs[0].glob("files/media/table/*.table.json"))
    assert tables and len(json.loads(tables[0].read_text())["data"]) == len(TABLE1_SAMPLERS)
    assert b"demo_table1" in next(runs[0].glob("*.wandb")).read_bytes()  # the W&B group
    for job in sweep.glob("*_inpaint_freeform_*"):
        s = json.loads((job / "summary.json").read_text())
        assert s["experiment"] == "demo_table1" and s["config"]["logger"]["group"] == "demo_table1"
