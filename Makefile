# The two commands of the quick start: `make demo` and `make test`. Each creates or refreshes the
# project environment (.venv) first, from nothing but the system Python.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: env demo daily-demo test lint clean cluster cluster-down

env: $(STAMP)

# tools/install_env.sh is the one install step: the Dockerfile runs it too (its `gpu` kind).
$(STAMP): pyproject.toml tools/fbgemm_gpu_cpu_shim/pyproject.toml tools/install_env.sh Makefile
	PYTHON=$(PYTHON) bash tools/install_env.sh cpu $(VENV)
	touch $(STAMP)

# A one-node Slurm cluster on this machine (root; installs slurm, munge and mariadb with apt the first
# time): tests/test_slurm.py submits to it. A no-op when it is up already.
cluster:
	bash tools/cluster/slurm_up.sh

cluster-down:
	bash tools/cluster/slurm_down.sh

# Two workers, one test file each at a time (module fixtures are built once): CI stays under 20 minutes.
test: $(STAMP) cluster
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(PY) -m bahe.launchers.demo --out $(DEMO_DIR)

# The daily loop on MovieLens-100K: a warm-up, then one 14-day period updated by `bahe-daily` (store refresh +
# warm start) beside a retrain from scratch, each tested on the next period (docs/daily.md); ~15 min on 2 CPU cores.
daily-demo: $(STAMP)
	$(PY) -m bench.daily_bench --seeds 0 --max-slices 1 --work runs/daily_demo --out runs/daily_demo/daily.json

clean:
	rm -rf $(VENV) runs .pytest_cache
