# Everything runs inside .venv; `make demo` and `make test` set it up first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench exact tables results tune claims clean-venv gpu-wheels gpu-check gpu-check-dry

DEMO_PRESETS := demo_table1 demo_sr4 demo_inpaint_box demo_weighting demo_order demo_steps
DEMO_REF_PRESETS := demo_table1 demo_sr4 demo_inpaint_box  # their tables carry the paired Δ against RED-diff

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup  ## the main job: RED-diff x4 super-resolution on the embedded prior and demo images
	WANDB_SILENT=true $(PY) run.py

test: setup  ## the full suite, slow tests included (what CI runs)
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup  ## regenerate results/speed.md and results/gmm_posterior.md
	$(PY) -m benchmarks.speed --json results/speed.json --threads 1 --steps 10 --no-sweep --set d_flow.max_iter=1 --set d_flow.lbfgs_iter=3
	$(PY) -m benchmarks.gmm_posterior --json results/gmm_posterior.json --md results/gmm_posterior.md --plot results/gmm_posterior_2d.png --workers 2

exact: setup  ## every sampler on every SVD task against the exact image-scale mixture posterior, then the budget curve and RED-diff ablations (docs/EXACT_IMAGES.md)
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.exact_images --json results/exact_images.json --md results/exact_images.md --figure results/exact_images.png
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.exact_images_curve --json results/exact_images_curve.json --md results/exact_images_curve.md --plot results/exact_images_curve.png

# GPU check (docs/GPU_CHECK.md). gpu-check runs on the GPU machine with its own python (no .venv there):
# make gpu-check GPU_PY=python3.  gpu-wheels (here, with internet) fills gpu_wheels/ for it to carry.
GPU_PY ?= python3

gpu-wheels: setup  ## download the pinned wheels the GPU machine lacks into gpu_wheels/
	$(PY) -m benchmarks.gpu_wheels

gpu-check:  ## on a CUDA machine: ADM-256 cost per step, max batch, memory, CUDA tests -> results/gpu.{json,md} (< 8 min)
	$(GPU_PY) -m benchmarks.gpu_check --json results/gpu.json --md results/gpu.md

gpu-check-dry: setup  ## the same code on the CPU with a tiny UNet (about a minute)
	$(PY) -m benchmarks.gpu_check --dry-run --json /tmp/gpu_check_dry.json --md /tmp/gpu_check_dry.md

tables: setup  ## rebuild table.md/table.csv of every committed sweep under results/
	for d in results/*/; do [ -n "$$(find $$d -name summary.json -print -quit)" ] && $(PY) -m reddiff.tables $$d > /dev/null; done; true

results: setup  ## rerun every committed demo sweep on the embedded prior into results/<preset>/ (CPU, ~30 min)
	for p in $(DEMO_PRESETS); do rm -rf results/$$p; WANDB_SILENT=true $(PY) run.py -m +experiment=$$p progress=false hydra.sweep.dir=results/$$p || exit 1; done
	for p in $(DEMO_REF_PRESETS); do $(PY) -m reddiff.tables results/$$p --ref reddiff > /dev/null || exit 1; done

tune: setup  ## equal-budget Optuna tuning of every sampler with a tune_space, at the demo tables' step counts -> conf/tuned/embedded*, results/tune/ (CPU, ~16 min)
	WANDB_SILENT=true $(PY) -m reddiff.tune.make --prior embedded --tasks inpaint_freeform,sr4 --steps-from demo_table1

claims: setup  ## results/claims.md from the committed results (runs nothing)
	$(PY) -m reddiff.report.claims

clean-venv:
	rm -rf $(VENV)
