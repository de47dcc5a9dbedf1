"""Equal-budget tuning (reddiff/tune/sweeper.py, reddiff/tune/make.py), the tuning split (data=tune), tuned presets."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from reddiff import registry
from reddiff.core.errors import UserError
from reddiff.tune.sweeper import N_TRIALS, apply_tuned, objective, register, tunable, tune_node

ROOT = Path(__file__).resolve().parents[1]


def test_the_four_paper_samplers_declare_a_space_that_optuna_parses():
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    spaces = tunable()
    assert {"reddiff", "dps", "pigdm", "ddrm"} <= set(spaces)
    for name, space in spaces.items():
        cfg = registry.sampler_config(name)
        for key in space:
            assert key in cfg, f"{name}: tune_space key {key!r} is not a constructor key of its YAML"
        dists, fixed = create_params_from_overrides([f"sampler.{k}={v}" for k, v in space.items()])
        assert set(dists) == {f"sampler.{k}" for k in space} and not fixed
    # the official settings lie inside the searched ranges
    z = create_params_from_overrides([f"sampler.zeta={spaces['dps']['zeta']}"])[0]["sampler.zeta"]
    assert z.low <= 0.1 and 1.0 <= z.high


@pytest.mark.parametrize("task", ["inpaint_freeform", "sr4"])
def test_every_space_contains_the_settings_of_each_tuned_task(task):
    """The official value of every tuned key, as the task sets it (sr4 maps PnP-Flow's lr, Flow-Priors' and D-Flow's
    lmbda for its block average: conf/task/sr4.yaml), lies inside the searched range, so tuning can only match or
    beat the official setting on the tuning split."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    for name, space in tunable().items():
        cfg = registry.sampler_config(name, task)
        dists = create_params_from_overrides([f"sampler.{k}={v}" for k, v in space.items()])[0]
        for key in space:
            dist, v = dists[f"sampler.{key}"], cfg[key]
            if hasattr(dist, "choices"):
                assert v in dist.choices or str(v) in map(str, dist.choices), (name, key, v, dist.choices)
            else:
                assert dist.low <= float(v) <= dist.high, (name, task, key, v, dist.low, dist.high)


def test_generated_tune_configs_use_the_optuna_sweeper_and_the_tuning_split():
    assert set(register()) == set(tunable())
    node = tune_node("dps", {"zeta": "tag(log, interval(0.01, 30.0))"})
    assert {"override /hydra/sweeper": "optuna"} in node["defaults"]
    assert {"override /data": "tune"} in node["defaults"]
    sw = node["hydra"]["sweeper"]
    assert sw["n_trials"] == N_TRIALS and sw["direction"] == "maximize"
    assert sw["params"] == {"sampler.zeta": "tag(log, interval(0.01, 30.0))"}


def test_tuning_split_shares_no_pixels_with_the_demo_set_or_the_training_photos():
    from reddiff.data.demo import DemoDataset
    from reddiff.data.tune import TILE, TILES, TuneDataset, load_motorcycle
    from reddiff.data.photos import HELD_OUT, TRAIN_SKIMAGE, TRAIN_SKLEARN, load_photo

    photo = load_motorcycle()
    for name in HELD_OUT + TRAIN_SKIMAGE + TRAIN_SKLEARN:
        assert load_photo(name).shape != photo.shape  # a different photograph from every demo / training one
    boxes = [(x, y, x + TILE, y + TILE) for _, x, y in TILES]
    for i, a in enumerate(boxes):
        assert a[2] <= photo.shape[1] and a[3] <= photo.shape[0]
        for b in boxes[i + 1:]:  # the tiles are disjoint
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    tune, demo = TuneDataset(64), DemoDataset(64)
    ids = [e.image_id for e in tune.entries()]
    assert len(ids) == 6 and not set(ids) & {e.image_id for e in demo.entries()}
    t = np.stack([tune.load(e).numpy() for e in tune.entries()])
    d = np.stack([demo.load(e).numpy() for e in demo.entries()])
    assert t.shape == (6, 3, 64, 64) and np.abs(t[:, None] - d[None]).mean(axis=(2, 3, 4)).min() > 0.05


def test_objective_is_mean_psnr_and_the_worst_score_for_diverged_or_na_jobs():
    cfg = OmegaConf.create({"tune": {"objective": "psnr"}})
    ok = {"status": "ok", "diverged": 0, "metrics": {"psnr": {"mean": 21.5}, "lpips": {"mean": 0.2}}}
    assert objective(cfg, ok) == 21.5
    assert objective(OmegaConf.create({}), ok) == 21.5  # plain run.py returns mean PSNR too
    assert objective(OmegaConf.create({"tune": {"objective": "lpips"}}), ok) == -0.2
    # finite on purpose: Optuna's sweeper crashes on NaN; worse than any real PSNR / LPIPS
    assert objective(cfg, {**ok, "diverged": 1}) == 0.0
    assert objective(cfg, {"status": "n/a", "metrics": {}}) == 0.0
    assert objective(cfg, {**ok, "metrics": {"psnr": {"mean": float("nan")}}}) == 0.0
    assert objective(OmegaConf.create({"tune": {"objective": "lpips"}}), {**ok, "diverged": 2}) == -2.0
    with pytest.raises(UserError):
        objective(OmegaConf.create({"tune": {"objective": "lpips"}}),
                  {**ok, "metrics": {"lpips": {"missing": "no weights"}}})


def _cfg(steps=100, zeta=0.1, prior="embedded"):
    return OmegaConf.create({
        "task": {"name": "inpaint_freeform"}, "sampler_name": "dps", "prior_name": prior,
        "sampler": {"_target_": "reddiff.baselines.dps.DPS", "steps": steps, "zeta": zeta},
        "tuned": {"prior": "embedded", "table": {"inpaint_freeform": {"s100": {"dps": {"zeta": 3.0}}}}}})


@pytest.fixture
def no_hydra_context():
    """No Hydra job context left over from an earlier test (its overrides would count as explicit keys)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.instance()
    saved, hc.cfg = hc.cfg, None
    yield
    hc.cfg = saved


def test_apply_tuned_sets_the_values_for_that_task_steps_and_sampler_only(no_hydra_context):
    cfg = apply_tuned(_cfg())
    assert cfg.sampler.zeta == 3.0 and cfg.tuned.applied.settings == {"zeta": 3.0}
    other = apply_tuned(_cfg(steps=50))  # not tuned at 50 steps: official value kept, and recorded
    assert other.sampler.zeta == 0.1 and other.tuned.applied.settings is None
    with pytest.raises(UserError, match="prior=embedded"):
        apply_tuned(_cfg(prior="adm_imagenet256"))
    bad = _cfg()
    bad.tuned.table.inpaint_freeform.s100.dps = {"nope": 1.0}
    with pytest.raises(UserError, match="no key 'nope'"):
        apply_tuned(bad)


def test_committed_tuned_preset_builds_every_sampler_it_names():
    preset = ROOT / "conf" / "tuned" / "embedded.yaml"
    if not preset.is_file():
        pytest.skip("conf/tuned/embedded.yaml not generated yet (make tune)")
    n = 0
    for f in sorted((ROOT / "conf" / "tuned" / "embedded").glob("*.yaml")):
        task, steps = f.stem.rsplit("_s", 1)
        assert f.read_text().startswith(f"# @package tuned.table.{task}.s{steps}")
        for sampler, params in (yaml.safe_load(f.read_text()) or {}).items():
            s = registry.build_sampler(sampler, task, steps=int(steps), **params)
            assert all(getattr(s, k) == pytest.approx(v) for k, v in params.items() if hasattr(s, k))
            assert (ROOT / "results" / "tune" / "embedded" / f.stem / sampler / "optimization_results.yaml").is_file()
            n += 1
    assert n >= 1


@pytest.mark.slow
def test_run_py_tune_writes_optimization_results_with_the_best_trial(tmp_path):
    """The acceptance command, smaller: Optuna proposes zeta, each trial returns its mean PSNR, and
    optimization_results.yaml holds the best trial's value and parameters."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", "+tune=dps", "task=inpaint_freeform",
                        "hydra.sweeper.n_trials=2", "data.count=1", "sampler.steps=3", f"hydra.sweep.dir={sweep}"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in range(2)]
    assert all(t["data"] == "tune" and t["n_images"] == 1 for t in trials)
    psnr = [t["metrics"]["psnr"]["mean"] for t in trials]
    i = int(np.argmax(psnr))
    assert best["best_value"] == pytest.approx(max(psnr), abs=1e-5)
    assert best["best_params"]["sampler.zeta"] == pytest.approx(trials[i]["config"]["sampler"]["zeta"])
    assert 0.01 <= best["best_params"]["sampler.zeta"] <= 30.0


def test_make_tune_steps_from_a_preset_match_the_committed_tuned_files():
    """``make tune`` tunes at the demo presets' step counts (``--steps-from demo_table1``; demo_sr4 gives every
    sampler the same counts), and every committed tuned file sits at exactly those counts, so the tuned values
    apply to the demo rows and ``make tune`` regenerates what is committed."""
    from reddiff.tune.make import can_run, preset_steps

    assert preset_steps("demo_table1", "mcgdiff", "inpaint_freeform") == 25
    assert preset_steps("demo_table1", "ddrm", "inpaint_freeform") == 20
    assert preset_steps("demo_table1", "diffpir", "inpaint_freeform") == 20   # not in the preset: the task's own
    assert preset_steps("demo_table1", "diffpir", "sr4") == 100
    for name in tunable():
        for task in ("inpaint_freeform", "sr4"):
            assert preset_steps("demo_table1", name, task) == preset_steps("demo_sr4", name, task)
    with pytest.raises(FileNotFoundError, match="no experiment preset"):
        preset_steps("no_such_preset", "ddnm", "sr4")
    for f in (ROOT / "conf" / "tuned" / "embedded").glob("*.yaml"):
        task, steps = f.stem.rsplit("_s", 1)
        for sampler in yaml.safe_load(f.read_text()) or {}:
            assert can_run(sampler, task) and preset_steps("demo_table1", sampler, task) == int(steps), (f.name, sampler)
    r = subprocess.run([sys.executable, "-m", "reddiff.tune.make", "--steps", "5", "--steps-from", "demo_table1"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "not both" in r.stderr


def test_make_tune_runs_each_sampler_with_the_preset_s_untuned_settings(monkeypatch):
    """With ``--steps-from``, the sweep of a sampler carries the preset's other settings of it (not the tuned keys),
    so the trials cost and mean what the demo row does: D-Flow's iterations, EnKG's ensemble, SITCOM's inner steps."""
    from reddiff.tune import make

    spaces = tunable()
    assert make.preset_fixed("demo_table1", "d_flow", spaces["d_flow"]) == {"max_iter": 1, "lbfgs_iter": 7}
    assert make.preset_fixed("demo_table1", "enkg", spaces["enkg"]) == {"particles": 8}
    assert make.preset_fixed("demo_table1", "reddiff", spaces["reddiff"]) == {"weighting": "linear"}  # lr, lam tuned
    for name in spaces:   # demo_sr4 runs each sampler with them too (Pi-GDM's start_t 500 comes from task sr4)
        sr4 = make.preset_fixed("demo_sr4", name, spaces[name])
        assert make.preset_fixed("demo_table1", name, spaces[name]).items() <= sr4.items(), name
    seen = {}

    def fake_child(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, "", "stopped by the test")

    monkeypatch.setattr(make, "run_child", fake_child)
    with pytest.raises(SystemExit, match="stopped by the test"):
        make.tune_one("embedded", "sr4", "d_flow", 5, 2, 1, lambda s: None, {"max_iter": 1, "lbfgs_iter": 7})
    assert "sampler.steps=5" in seen["cmd"] and "sampler.max_iter=1" in seen["cmd"]
    assert "sampler.lbfgs_iter=7" in seen["cmd"]
