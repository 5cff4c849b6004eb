#!/usr/bin/env bash
# The efficiency sweep (bench/efficiency_bench.py) on one CUDA GPU, in about 8 minutes or less:
# gpu-0.5b (Qwen2-0.5B shapes, random weights), bf16 autocast, text lengths 256..2048 at K=16 and a
# K sweep at 2048; prints nvidia-smi first and the table last.
#
#   bash bench/gpu.sh                 # from anywhere; results in $OUT if set, else docs/bench/
#   BENCH_ARGS="--batch-size 32" bash bench/gpu.sh    # extra flags for the bench
#
# Python: the first of .venv/bin/python, python3, python whose torch sees a GPU (nothing is installed
# from a network). The project's own .venv is a CPU build (docs/install.md): on a GPU machine use a
# CUDA venv made from docs/install.md's GPU recipe, or the machine's own python3 with torch. Where
# torchrec + fbgemm-gpu are missing or cannot run (e.g. a stock CUDA image), the bench falls back to
# its torchrec-free "core" pipeline (same LLM modules and store; see bench/efficiency_arms.py) and
# says so in its log, its table and its JSON. Wheels carried in .whl/ (if any) are installed into
# /tmp/site first, without network and without dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-docs/bench}"
mkdir -p "$OUT_DIR"
RESULT="$OUT_DIR/efficiency_gpu.json"
LOG="$OUT_DIR/efficiency_gpu.log"
TOTAL_LIMIT="${TOTAL_LIMIT:-450}"     # seconds for the whole sweep; a killed run keeps the configurations done
CONFIG_LIMIT="${CONFIG_LIMIT:-90}"    # seconds per configuration (both arms)
export PYTHONUNBUFFERED=1

echo "== nvidia-smi"
nvidia-smi || echo "(nvidia-smi failed or is missing)"

if compgen -G ".whl/*.whl" > /dev/null; then
    echo "== installing carried wheels from .whl/ into /tmp/site (no network, no dependencies)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

PY=""
for candidate in .venv/bin/python python3 python; do
    if command -v "$candidate" > /dev/null 2>&1 &&
        "$candidate" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' > /dev/null 2>&1; then
        PY="$candidate"
        break
    fi
    echo "   $candidate: missing, no torch, or its torch sees no GPU; trying the next"
done
if [ -z "$PY" ]; then
    echo "ERROR: no Python here has a torch that sees a CUDA GPU (tried .venv/bin/python, python3, python)." >&2
    echo "This script measures only on a GPU; for the CPU sweep run: python -m bench.efficiency_bench" >&2
    exit 1
fi
echo "== python: $(command -v "$PY")"
"$PY" - << 'EOF'
import importlib.util, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
for name in ("transformers", "torchrec", "fbgemm_gpu", "pyarrow", "matplotlib"):
    print(f"  {name}: {'present' if importlib.util.find_spec(name) else 'ABSENT'}")
EOF

echo "== efficiency sweep (limit ${TOTAL_LIMIT} s, ${CONFIG_LIMIT} s per configuration); log: $LOG"
set +e
# shellcheck disable=SC2086 -- BENCH_ARGS is a list of flags
timeout --signal=TERM --kill-after=20 "$TOTAL_LIMIT" "$PY" -m bench.efficiency_bench --device cuda --dtype bf16 \
    --model-config gpu-0.5b --lengths 256 512 1024 2048 --k-sweep 8 16 32 64 --k-sweep-length 2048 \
    --config-timeout "$CONFIG_LIMIT" --out "$RESULT" ${BENCH_ARGS:-} 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "== the sweep ran past ${TOTAL_LIMIT} s and was stopped; the table below holds the configurations it finished"
elif [ "$status" -ne 0 ]; then
    echo "== the bench exited with status $status (a configuration failed or timed out: see its status column)"
fi

echo
echo "== table ($RESULT, ${RESULT%.json}.md)"
if [ -f "${RESULT%.json}.md" ]; then
    awk '/^```$/ {inside = !inside; next} inside' "${RESULT%.json}.md"
else
    echo "no result was written (see $LOG)"
fi
exit "$status"
