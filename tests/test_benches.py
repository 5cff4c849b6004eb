"""The benchmarks under bench/ still run (their quick modes): a bench that no longer starts would only be
found when someone needs its figures. Timings are not asserted here (bench/ prints measured ratios)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_dlrm_bench_quick_runs_and_bahe_matches_dlrm_numerically(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "bench.dlrm_bench", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    # exit code 1 means the two arms' logits or losses differed
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "same logits: True" in done.stdout
    assert out.is_file()
