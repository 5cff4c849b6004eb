"""docs/byo_data.md's walkthrough runs as written: the made-up shop log of examples/byo_data becomes sample
files, a store, a trained run and a bahe-predict score file. The lines are read from the page's code block
marked ``byo-walkthrough`` and run one by one in a scratch folder holding a copy of examples/byo_data/,
each through bash with the project's programs on PATH. Only flags that make them small are appended (the
last value of a flag wins): the tiny Llama of tests/llm_fixtures.py for SmolLM2 and a few steps."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bahe.ctr_data.parquet_io import SampleReader
from tests.llm_fixtures import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "byo_data.md"
MARKER = "<!-- byo-walkthrough"


def walkthrough() -> list[str]:
    """The command lines of the page's walkthrough block, as written."""
    text = PAGE.read_text()
    assert MARKER in text, f"{PAGE} lost its walkthrough marker"
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER):], flags=re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def small_flags(llm: Path) -> dict[str, list[str]]:
    return {
        "bahe-encode": ["--model", str(llm), "--k", "2", "--quiet"],
        "bahe-train": ["--llm", str(llm), "--steps", "4", "--eval-every", "2", "--batch-size", "16",
                       "--embedding-dim", "8", "--dense-arch", "16", "8", "--over-arch", "16", "1", "--table-rows", "64",
                       "--max-behaviours", "6", "--log-every", "2"],
        "bahe-predict": ["--quiet"],
    }


def test_the_walkthrough_names_the_steps_of_the_page():
    lines = walkthrough()
    assert [line.split()[0] for line in lines] == ["bahe-data", "bahe-encode", "bahe-train", "bahe-predict", "python"]
    assert "--mapping examples/byo_data/mapping.toml" in lines[0] and "--run-dir runs/byo" in lines[3]


@pytest.mark.integration
def test_the_walkthrough_turns_the_example_log_into_a_run_and_a_score_file(tmp_path):
    work = tmp_path / "work"
    shutil.copytree(ROOT / "examples" / "byo_data", work / "examples" / "byo_data")
    llm = make_tiny_llama(tmp_path / "tiny-llama", layers=4, hidden=32)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    extra = small_flags(llm)
    outputs = []
    for line in walkthrough():
        program = line.split()[0]
        command = f"{line} {' '.join(extra.get(program, []))}".strip()
        done = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)

    splits = {s: SampleReader(work / "data" / "byo" / f"{s}.parquet").read_all() for s in ("train", "valid", "test")}
    assert [t.num_rows for t in splits.values()] == [240, 30, 30]
    assert "dataset byo-shop: 300 rows, 30 users, 40 items, positive rate 0.393" in outputs[0]
    metrics = json.loads((work / "runs" / "byo" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["test"]["samples"] == 30
    scores = pq.read_table(work / "runs" / "byo" / "scores.parquet")
    assert scores.num_rows == 30 and scores.column_names[:5] == ["user_id", "item_id", "timestamp", "label", "score"]
    assert scores["item_id"].to_pylist() == splits["test"]["item_id"].to_pylist()  # one row per input row, in order
    assert all(0.0 < s < 1.0 for s in scores["score"].to_pylist())
    assert outputs[-1].startswith("[{'user_id': ") and "'score': " in outputs[-1]
