# The two commands of the quick start: `make demo` and `make test`. Each creates or refreshes the
# project environment (.venv) first, from nothing but the system Python.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

RANGE_VENV := .venv-range-max
RANGE_LOCK := requirements/range-max.lock
RANGE_STAMP := $(RANGE_VENV)/.installed

.PHONY: env demo daily-demo test lint clean cluster cluster-down test-range-max

env: $(STAMP)

# tools/install_env.sh is the one install step: the Dockerfile runs it too (its `gpu` kind). It installs the
# exact set of requirements/cpu.lock (pyproject.toml states ranges).
$(STAMP): pyproject.toml requirements/cpu.lock tools/fbgemm_gpu_cpu_shim/pyproject.toml tools/install_env.sh Makefile
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

# The high end of pyproject's ranges (torch 2.14 (a CUDA build, run on the CPU), torchrec 1.9, fbgemm-gpu-cpu 1.9
# through the shim, transformers 5.25, ...: requirements/range-max.lock) in its own environment, .venv-range-max
# (about 6.4 GB). It runs docs/install.md's "existing TorchRec environment" block in it (which must move nothing:
# the check against the lock after it), the fast tests, and one short end-to-end train (2 gloo ranks, 40 steps,
# evaluation, checkpoints). Not in CI: `make test` already takes most of CI's 20 minutes; docs/install.md has
# its measured time.
$(RANGE_STAMP): pyproject.toml $(RANGE_LOCK) tools/fbgemm_gpu_cpu_shim/pyproject.toml tools/install_env.sh Makefile
	LOCK=$(RANGE_LOCK) PYTHON=$(PYTHON) bash tools/install_env.sh cpu $(RANGE_VENV)
	touch $(RANGE_STAMP)

test-range-max: $(RANGE_STAMP)
	sed -n '/^<!-- existing-env/,/^```$$/{/^```/d;/^<!--/d;p;}' docs/install.md \
		| PATH="$(CURDIR)/$(RANGE_VENV)/bin:$$PATH" bash -euxo pipefail
	$(RANGE_VENV)/bin/python requirements/freeze.py --check $(RANGE_LOCK)
	$(RANGE_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not integration"
	$(RANGE_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_training.py::test_two_rank_run_completes_and_learns_the_text_signal \
		tests/test_training.py::test_tensorboard_has_the_promised_tags

clean:
	rm -rf $(VENV) $(RANGE_VENV) runs .pytest_cache
