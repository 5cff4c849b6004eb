"""BAHE drops into an existing TorchRec DLRM pipeline (issue: swap-in replacement).

* A dlrm_main-style loop (tests/dist/dlrm_main_style_worker.py, 2 gloo ranks) trains torchrec's
  DLRM and then BAHE on the Criteo sample with nothing changed but the model class: the losses and
  AUROC are identical, because without text BAHE is a DLRM (same modules, same init order).
* Every sharded module is pipelined by TrainPipelineSparseDist, with and without text behaviours in
  the batch, and torchrec never logs "will NOT be pipelined".
* The trainer accepts Criteo TSV day files and torchrec's random dataset as they are.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bahe.ctr_data.criteo import write_criteo_splits
from bahe.ctr_data.parquet_io import SampleReader
from bahe.ctr_data.schema import DataError
from tests.conftest import CRITEO_SAMPLE
from tests.model_fixtures import make_tiny_pipeline
from tests.torchrun import torchrun

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def swap(tmp_path_factory):
    root = tmp_path_factory.mktemp("swap")
    pipeline = make_tiny_pipeline(root / "pipeline")
    out = root / "out"
    out.mkdir()
    torchrun(ROOT / "tests" / "dist" / "dlrm_main_style_worker.py", CRITEO_SAMPLE, pipeline.llm, pipeline.data,
             pipeline.store, out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.integration
def test_dlrm_main_loop_trains_bahe_exactly_like_dlrm(swap):
    for rank in swap:
        dlrm, bahe = rank["dlrm"], rank["bahe"]
        assert len(dlrm["losses"]) == 21 and all(math.isfinite(x) for x in dlrm["losses"])
        assert bahe["losses"] == dlrm["losses"]  # bit-identical: the model class is the only change
        assert bahe["auroc"] == dlrm["auroc"]
        assert dlrm["losses"][-1] < dlrm["losses"][0]


@pytest.mark.integration
def test_every_sharded_module_is_pipelined(swap):
    for rank in swap:
        for arm, expected in (("dlrm", 1), ("bahe", 1), ("bahe_text", 2)):
            result = rank[arm]
            assert result["pipelined_modules"] == expected, (arm, result["pipeline_log"])
            assert not [m for m in result["pipeline_log"] if "will NOT be pipelined" in m], result["pipeline_log"]
        assert any("text_arch.lookup.embedding_collection' will be pipelined" in m
                   for m in rank["bahe_text"]["pipeline_log"])


def test_criteo_days_split_like_dlrm_main(tmp_path):
    lines = CRITEO_SAMPLE.read_text().splitlines(keepends=True)
    days = []
    for i, chunk in enumerate((lines[:60], lines[60:90], lines[90:])):
        days.append(tmp_path / f"day_{i}")
        days[-1].write_text("".join(chunk))
    paths = write_criteo_splits(days, tmp_path / "out")
    rows = {name: SampleReader(p).read_all() for name, p in paths.items()}
    assert {k: v.num_rows for k, v in rows.items()} == {"train": 90, "valid": 12, "test": 13}
    assert rows["valid"].column("timestamp").to_pylist()[0] == 90  # time runs on across the days
    single = write_criteo_splits([CRITEO_SAMPLE], tmp_path / "one")
    assert [SampleReader(p).num_rows for p in single.values()] == [92, 11, 12]


def test_criteo_split_refuses_missing_and_tiny_inputs(tmp_path):
    with pytest.raises(DataError, match="no such Criteo TSV file"):
        write_criteo_splits([tmp_path / "day_0"], tmp_path / "out")
    tiny = tmp_path / "tiny.tsv"
    tiny.write_text("1" + "\t" * 39 + "\n")
    with pytest.raises(DataError, match="cannot fill train, valid and test"):
        write_criteo_splits([tiny], tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.parquet"))


def _train(args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "bahe.launchers.train", "--out", str(out), "--arm", "dlrm", "--steps", "12",
           "--embedding-dim", "8", "--dense-arch", "16", "8", "--over-arch", "16", "1", "--table-rows", "500",
           "--log-every", "6", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # a clean log: no library notice the user cannot act on (torchrec's topology and dense-estimate
    # warnings, torch's is_fx_tracing, torchmetrics' indexing notice); the trainer's own lines go to stdout
    assert not done.stderr.strip(), done.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.integration
def test_trainer_takes_criteo_tsv_days(tmp_path):
    metrics = _train(["--criteo-tsv", str(CRITEO_SAMPLE), "--batch-size", "8", "--drop-id-features", "user_id",
                      "item_id"], tmp_path / "run")
    assert metrics["test"]["samples"] == 12 and math.isfinite(metrics["test"]["logloss"])
    assert (tmp_path / "run" / "data" / "train.parquet").is_file()  # converted once, into OUT/data


def test_a_criteo_conversion_is_reused_only_for_the_same_files(tmp_path):
    from bahe.training.sources import criteo_data

    day = tmp_path / "day_0"
    day.write_bytes(CRITEO_SAMPLE.read_bytes())
    first = criteo_data((day,), tmp_path / "data", rank=0)
    assert SampleReader(first.paths["train"]).num_rows == 92
    stamp = first.paths["train"].stat().st_mtime_ns
    criteo_data((day,), tmp_path / "data", rank=0)
    assert first.paths["train"].stat().st_mtime_ns == stamp  # same files: not converted again
    day.write_bytes(b"".join(CRITEO_SAMPLE.read_bytes().splitlines(keepends=True)[:50]))
    again = criteo_data((day,), tmp_path / "data", rank=0)
    assert SampleReader(again.paths["train"]).num_rows == 40  # the file changed: converted anew


@pytest.mark.integration
def test_trainer_takes_torchrec_random_dataset(tmp_path):
    metrics = _train(["--random-data", "--batch-size", "16", "--eval-batches", "3"], tmp_path / "run")
    assert metrics["valid"]["samples"] == 48 and metrics["test"]["samples"] == 48


def test_text_arm_on_textless_data_is_refused(tmp_path):
    from bahe.launchers.train import build_parser, config_from_args

    args = build_parser().parse_args(["--random-data", "--out", str(tmp_path), "--arm", "bahe", "--store",
                                      str(tmp_path)])
    with pytest.raises(ValueError, match="has no behaviour texts"):
        config_from_args(args)
    with pytest.raises(ValueError, match="exactly one data input"):
        config_from_args(build_parser().parse_args(["--out", str(tmp_path), "--arm", "dlrm"]))
