"""Segment metrics in every report (training/segments.py), on a real DLRM-arm run over MovieLens-100K's
item-cold split: the trainer records the train split's item counts beside run_config.json and reports AUC /
log loss per segment for valid and test (its last JSON line, metrics.json, TensorBoard); bahe-evaluate
reports them from the RECORDED counts (another data folder's train split changes nothing) with its own
thresholds; bahe-predict's summary gives the trainer's numbers for the same rows; make demo prints the
line."""

from __future__ import annotations

import collections
import contextlib
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from bahe.ctr_data.movielens import MovieLensConfig, write_movielens
from bahe.training.segments import ITEM_COUNTS, read_item_counts
from tests.test_predict import process_group

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("keep_signal_handlers")]
FLAGS = ["--arm", "dlrm", "--batch-size", "512", "--embedding-dim", "8", "--dense-arch", "16", "8", "--over-arch",
         "16", "1", "--table-rows", "2000", "--dense-lr", "3e-3", "--log-every", "5", "--steps", "12",
         "--eval-every", "6"]


def last_json(printed: str) -> dict:
    return json.loads([line for line in printed.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """MovieLens-100K, item_cold split (seed 0), and a 12-step DLRM run that validated at steps 6 and 12."""
    import io
    import sys

    from bahe.launchers.train import main

    root = tmp_path_factory.mktemp("segment-reports")
    data = root / "data"
    write_movielens(MovieLensConfig(max_history=3, protocol="item_cold", seed=0), data)
    out = root / "run"
    printed = io.StringIO()
    with process_group(), contextlib.redirect_stdout(printed):
        assert main(["--data-dir", str(data), "--out", str(out), *FLAGS]) == 0
    sys.stdout.write(printed.getvalue()[-2000:])
    return data, out, last_json(printed.getvalue())


def test_the_trainer_records_the_train_splits_item_counts_and_reports_every_segment(run):
    data, out, line = run
    train_items = pq.read_table(data / "train.parquet").column("item_id").to_pylist()
    counts = read_item_counts(out)
    assert dict(zip(counts.ids.tolist(), counts.counts.tolist())) == dict(collections.Counter(train_items))
    assert (out / ITEM_COUNTS).parent == (out / "run_config.json").parent
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("valid", "test"):
        segments = metrics[split]["segments"]
        assert line[split]["segments"] == segments  # the last JSON line and metrics.json agree
        rows = pq.read_table(data / f"{split}.parquet")
        unseen = int(np.sum(~np.isin(rows.column("item_id").to_numpy(), list(set(train_items)))))
        cold = segments["item_popularity"]["cold"]
        assert cold["rows"] == unseen > 1000  # item_cold: thousands of rows of items train never had
        assert cold["auc"] is not None and cold["auc_interval"][0] <= cold["auc"] <= cold["auc_interval"][1]
        assert sum(e["rows"] for e in segments["item_popularity"].values()) == rows.num_rows
        assert sum(e["rows"] for e in segments["history_length"].values()) == rows.num_rows
        assert segments["all"]["auc"] == pytest.approx(metrics[split]["auc"], abs=1e-6)
    assert [h["step"] for h in metrics["history"]] == [6, 12] and "segments" in metrics["history"][0]


def test_tensorboard_has_segment_curves(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _ = run
    tags = set(EventAccumulator(str(out / "tensorboard")).Reload().Tags()["scalars"])
    for tag in ("eval_segments/item_popularity/cold/auc", "eval_segments/item_popularity/tail/logloss",
                "test_segments/item_popularity/cold/auc", "test_segments/history_length/0/logloss"):
        assert tag in tags, tag


def test_evaluate_uses_the_recorded_counts_and_its_own_thresholds(run, tmp_path):
    """bahe-evaluate with another data folder whose train split is the test split (every test item "seen"):
    the item popularity is still the run's recorded one, so its cold rows are the trainer's."""
    from bahe.launchers.evaluate import main

    data, out, _ = run
    other = tmp_path / "data"
    other.mkdir()
    for split in ("valid", "test"):
        shutil.copy(data / f"{split}.parquet", other / f"{split}.parquet")
    shutil.copy(data / "test.parquet", other / "train.parquet")
    with process_group():
        assert main(["--checkpoint", str(out), "--data-dir", str(other), "--out", str(tmp_path / "eval"),
                     "--segment-thresholds", "0", "5", "--bootstrap", "20"]) == 0
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    trained = json.loads((out / "metrics.json").read_text())
    segments = result["test"]["segments"]
    assert list(segments["item_popularity"]) == ["cold", "1-5", "6+"]
    assert segments["spec"]["item_thresholds"] == [0, 5] and segments["spec"]["bootstrap"] == 20
    assert segments["item_counts"]["file"] == str(out / ITEM_COUNTS)
    cold, expected = segments["item_popularity"]["cold"], trained["test"]["segments"]["item_popularity"]["cold"]
    assert cold["rows"] == expected["rows"] and cold["auc"] == pytest.approx(expected["auc"], abs=1e-6)


def test_predict_summary_gives_the_trainers_segment_numbers(run, tmp_path):
    from bahe.serving.scoring import score_files

    data, out, _ = run
    with process_group():
        summary = score_files(out, [data / "test.parquet"], tmp_path / "scores.parquet", show_progress=False)
    trained = json.loads((out / "metrics.json").read_text())["test"]["segments"]
    for kind in ("item_popularity", "history_length"):
        for name, entry in summary["segments"][kind].items():
            assert entry["rows"] == trained[kind][name]["rows"], (kind, name)
            if entry["auc"] is not None:
                assert entry["auc"] == pytest.approx(trained[kind][name]["auc"], abs=1e-5), (kind, name)
    scores = pq.read_table(tmp_path / "scores.parquet")
    assert summary["segments"]["all"]["auc"] == pytest.approx(
        roc_auc_score(scores.column("label").to_numpy(), scores.column("score").to_numpy()), abs=1e-9)
    recorded = json.loads(pq.read_schema(tmp_path / "scores.parquet").metadata[b"bahe.predict"])
    assert recorded["segments"]["item_popularity"]["cold"]["rows"] == trained["item_popularity"]["cold"]["rows"]


def test_make_demo_prints_the_segment_line(run, tmp_path, monkeypatch, capsys):
    """demo.main to the end, its jobs replaced by the finished run (train) and nothing (encode): the report
    prints test rows and AUC for cold, tail and the rest of the items."""
    from bahe.embeddings import pretrained
    from bahe.launchers import demo

    _, out, _ = run
    target = tmp_path / "demo"

    def launch(component, args, profile_name):
        if component == "train":
            shutil.copytree(out, target / "bahe")

    monkeypatch.setattr(demo, "_launch", launch)
    monkeypatch.setattr(pretrained, "resolve_model_dir", lambda name: None)
    assert demo.main(["--out", str(target)]) == 0
    printed = capsys.readouterr().out
    segments = json.loads((out / "metrics.json").read_text())["test"]["segments"]
    line = next(line for line in printed.splitlines() if "by item popularity" in line)
    cold = segments["item_popularity"]["cold"]
    assert f"cold {cold['rows']:,} rows AUC {cold['auc']:.4f}" in line
    for name in ("tail", "torso", "head"):
        assert f"{name} {segments['item_popularity'][name]['rows']:,} rows" in line


def test_train_segment_flags_reach_its_reports(run, tmp_path):
    """bahe-train --segment-thresholds / --history-thresholds / --bootstrap: metrics.json, the last JSON line and
    TensorBoard hold the segments those flags name (launchers/segment_flags.py, shared with bahe-evaluate)."""
    import io

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bahe.launchers.train import main

    data, _, _ = run
    out, printed = tmp_path / "run", io.StringIO()
    with process_group(), contextlib.redirect_stdout(printed):
        assert main(["--data-dir", str(data), "--out", str(out), *FLAGS, "--steps", "2", "--eval-every", "0",
                     "--segment-thresholds", "0", "5", "--history-thresholds", "1", "10", "--bootstrap", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("valid", "test"):
        segments = metrics[split]["segments"]
        assert last_json(printed.getvalue())[split]["segments"] == segments
        assert list(segments["item_popularity"]) == ["cold", "1-5", "6+"]
        assert list(segments["history_length"]) == ["0-1", "2-10", "11+"]
        assert segments["spec"]["item_thresholds"] == [0, 5] and segments["spec"]["bootstrap"] == 0
        assert segments["item_popularity"]["cold"].get("auc_interval") is None  # --bootstrap 0: no intervals
    tags = set(EventAccumulator(str(out / "tensorboard")).Reload().Tags()["scalars"])
    assert "test_segments/item_popularity/1-5/logloss" in tags and "test_segments/history_length/2-10/logloss" in tags


def test_predict_segment_flags_reach_its_summary(run, tmp_path, capsys):
    from bahe.launchers.predict import main

    data, out, _ = run
    scores = tmp_path / "scores.parquet"
    with process_group():
        assert main(["--run-dir", str(out), "--data", str(data / "test.parquet"), "--out", str(scores), "--quiet",
                     "--segment-thresholds", "0", "5", "--history-thresholds", "3", "--bootstrap", "10",
                     "--confidence", "0.5", "--segment-seed", "7"]) == 0
    summary = last_json(capsys.readouterr().out)
    recorded = json.loads(pq.read_schema(scores).metadata[b"bahe.predict"])
    for segments in (summary["segments"], recorded["segments"]):
        assert list(segments["item_popularity"]) == ["cold", "1-5", "6+"]
        assert list(segments["history_length"]) == ["0-3", "4+"]
        assert segments["spec"] == {"item_thresholds": [0, 5], "history_thresholds": [3], "bootstrap": 10,
                                    "confidence": 0.5, "seed": 7}
    trained = json.loads((out / "metrics.json").read_text())["test"]["segments"]["item_popularity"]["cold"]
    assert summary["segments"]["item_popularity"]["cold"]["rows"] == trained["rows"]  # cold is cold either way
