# The README's commands. Each target creates .venv from requirements.txt when missing.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
DEMO_DIR ?= demo_runs

.PHONY: demo demo-mri test test-floors bench bench-lth bench-method clean

# the requirements, then this project itself (common/, nnunet_iac/) in editable mode
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements.txt
	$(VENV)/bin/pip install --no-deps -e .
	touch $@

# the nnU-Net plugin's extra (nnunetv2), kept out of the core requirements
$(VENV)/.installed-nnunet: $(VENV)/.installed requirements-nnunet.txt
	$(VENV)/bin/pip install -r requirements-nnunet.txt
	touch $@

# test-only libraries (an independent HD95 / NSD implementation to check ours against)
$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(VENV)/bin/pip install -r requirements-test.txt
	touch $@

# grid.py's SLURM backend (submitit), kept out of the core requirements
$(VENV)/.installed-grid: $(VENV)/.installed requirements-grid.txt
	$(VENV)/bin/pip install -r requirements-grid.txt
	touch $@

demo: $(VENV)/.installed
	PYTHON=$(PYTHON) DEMO_DIR=$(DEMO_DIR) bash scripts/demo.sh

# the same chain on real MRI: warped MNI152 subjects (benchmarks/make_mni_dataset.py), an estimated 20-25 min on 2 cores
demo-mri: $(VENV)/.installed
	PYTHON=$(PYTHON) DEMO_DIR=$(DEMO_DIR) bash scripts/demo_mri.sh

# pytest exits 5 when it collects no test; that is not a failure of the suite itself. Two workers (pytest-xdist),
# each file's tests on one (xdist starts with the files that hold the most tests; the real-SLURM test, bound by
# SLURM's clock, ends the run: run first instead, beside the rest, it made the run no shorter on 2 cores, once
# measured); the ten slowest tests are listed at the end (the suite is meant to stay under 20 minutes)
test: $(VENV)/.installed $(VENV)/.installed-nnunet $(VENV)/.installed-test $(VENV)/.installed-grid
	$(PYTHON) -m pytest -q -n 2 --dist loadfile --durations=10 tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

# the lowest versions requirements.txt allows (every `>=` taken as `==`), in .venv-floors, then the tests
test-floors:
	$(PY) -m venv .venv-floors
	sed -E 's/>=([0-9.]+)(,<[0-9.]+)?/==\1/' requirements.txt > .venv-floors/requirements-floors.txt
	.venv-floors/bin/pip install -r .venv-floors/requirements-floors.txt
	.venv-floors/bin/pip install --no-deps -e .
	.venv-floors/bin/python -m pytest -q tests

# bench_gpu.py (precision, memory format, peak GPU memory at the paper's scale) only where a GPU is visible
bench: $(VENV)/.installed
	$(PYTHON) benchmarks/bench_data.py
	$(PYTHON) benchmarks/bench_backbones.py
	$(PYTHON) benchmarks/bench_search.py
	$(PYTHON) benchmarks/bench_3d.py
	$(PYTHON) benchmarks/bench_lean_step.py --record
	$(PYTHON) benchmarks/bench_step_memory.py --record
	$(PYTHON) benchmarks/bench_step_memory.py --calibrate --record
	$(PYTHON) benchmarks/bench_selective_checkpoint.py --record
	if $(PYTHON) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(PYTHON) benchmarks/bench_gpu.py && $(PYTHON) benchmarks/bench_epochs.py --record; \
	else echo "no CUDA GPU: bench_gpu.py and bench_epochs.py skipped"; fi

# the JS test's defaults: stop epoch across steps per epoch, and LTH vs full on three seeds (~1 h on 2 cores)
bench-lth: $(VENV)/.installed
	$(PYTHON) benchmarks/bench_lth_invariance.py
	$(PYTHON) benchmarks/bench_lth_quality.py

# do the cells help? ref / att / nested / IAC / IAC-LTH, the controls and the variants in RESULTS.md on real MRI over
# 3 seeds (about 3 hours on 2 cores; an interrupted study continues where it stopped)
bench-method: $(VENV)/.installed
	cd benchmarks && ../$(PYTHON) bench_method.py --jobs 3 --threads 1 --epochs_i 30 --epochs_iii 30 --cap 24 \
		--warmup 4 --residual --fast_gamma 1.5 --lth_batches 64 8 --search_residual --record

clean:
	rm -rf $(DEMO_DIR) bench_runs
