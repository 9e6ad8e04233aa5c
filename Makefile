# The README's commands. Each target creates .venv from requirements.txt when missing.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
DEMO_DIR ?= demo_runs

.PHONY: demo test bench clean

$(VENV)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip -q
	$(VENV)/bin/pip install -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	PYTHON=$(PYTHON) DEMO_DIR=$(DEMO_DIR) bash scripts/demo.sh

# pytest exits 5 when it collects no test; that is not a failure of the suite itself
test: $(VENV)/.installed
	$(PYTHON) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

bench: $(VENV)/.installed
	$(PYTHON) benchmarks/bench_data.py
	$(PYTHON) benchmarks/bench_backbones.py
	$(PYTHON) benchmarks/bench_search.py

clean:
	rm -rf $(DEMO_DIR) bench_runs
