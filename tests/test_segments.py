"""Segment metrics (training/segments.py): AUC and log loss per item popularity and history length segment
against scikit-learn on hand-made rows (ties, a one-class segment, an empty one), the segment boundaries,
the bootstrap intervals against a resampling done with scikit-learn, seeding and row-order invariance, the
cost on 10k rows, the item counts of a training split (streamed, recorded, read back), and the tags of
sample tables."""

from __future__ import annotations

import collections
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from bahe.ctr_data.parquet_io import SampleWriter
from bahe.training.segments import (
    ITEM_COUNTS,
    SegmentSpec,
    SegmentTagger,
    binary_auc,
    count_items,
    format_line,
    history_lengths,
    read_item_counts,
    run_item_counts,
    segment_entry,
    segment_report,
    write_item_counts,
)
from tests.conftest import tiny_rows


def hand_made(n: int = 900, seed: int = 3):
    """Rows of 3 item segments (cold, tail, torso; head left empty) where cold holds positives only, and
    of 5 history segments; scores rounded to 0.05 (many ties), related to the labels."""
    rng = np.random.default_rng(seed)
    items = rng.choice([0, 1, 2], size=n, p=[0.1, 0.4, 0.5]).astype(np.int8)
    history = rng.integers(0, 5, n).astype(np.int8)
    labels = (rng.random(n) < 0.4).astype(np.float64)
    labels[items == 0] = 1.0  # a segment of one class
    scores = np.clip(np.round(0.4 + 0.2 * (labels - 0.4) + rng.normal(0, 0.2, n), 2) // 0.05 * 0.05, 0.05, 0.95)
    return scores, labels, items, history


def test_every_segment_equals_scikit_learn_and_undefined_or_empty_segments_say_why():
    scores, labels, items, history = hand_made()
    spec = SegmentSpec(bootstrap=50)
    report = segment_report(scores, labels, items, history, spec)
    assert list(report["item_popularity"]) == ["cold", "tail", "torso", "head"]
    assert list(report["history_length"]) == ["0", "1-5", "6-20", "21-100", "101+"]
    assert report["all"]["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert report["all"]["logloss"] == pytest.approx(log_loss(labels, scores), abs=1e-12)
    for kind, ids in (("item_popularity", items), ("history_length", history)):
        for index, (name, entry) in enumerate(report[kind].items()):
            mask = ids == index
            assert entry["rows"] == int(mask.sum()) and entry["positives"] == int(labels[mask].sum()), (kind, name)
            assert entry["range"] == spec.ranges(kind)[index]
            if not mask.any():  # head, and history 3+ (ids 3 and 4 are 21-100 and 101+)
                assert entry["auc"] is None and entry["logloss"] is None and entry["auc_interval"] is None
                assert "no rows" in entry["note"]
                continue
            assert entry["logloss"] == pytest.approx(log_loss(labels[mask], scores[mask], labels=[0, 1]), abs=1e-12)
            if len(set(labels[mask])) == 1:
                assert entry["auc"] is None and entry["auc_interval"] is None  # never 0, never a crash
                assert "AUC undefined" in entry["note"] and "positive" in entry["note"]
                assert entry["logloss_interval"] is not None  # the log loss is defined on one class
            else:
                assert entry["auc"] == pytest.approx(roc_auc_score(labels[mask], scores[mask]), abs=1e-12)
    assert report["item_popularity"]["cold"]["rows"] > 0 and report["item_popularity"]["head"]["rows"] == 0
    line = format_line(report)
    assert "cold" in line and "AUC n/a (one class)" in line and "head 0 rows AUC n/a (no rows)" in line


def test_no_rows_at_all_and_auc_on_two_rows():
    empty = segment_report(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), SegmentSpec())
    assert empty["all"]["rows"] == 0 and empty["all"]["auc"] is None
    assert all(e["rows"] == 0 for e in empty["item_popularity"].values())
    assert binary_auc(np.array([0.2, 0.8]), np.array([0, 1])) == 1.0
    assert binary_auc(np.array([0.8, 0.2]), np.array([0, 1])) == 0.0  # a real 0 is reported as 0
    assert binary_auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5  # a tie counts half
    assert binary_auc(np.array([0.5, 0.7]), np.array([1, 1])) is None


def test_segment_boundaries_names_and_bad_thresholds():
    spec = SegmentSpec()
    counts = np.array([0, 1, 20, 21, 200, 201, 10**9])
    assert spec.ids("item_popularity", counts).tolist() == [0, 1, 1, 2, 2, 3, 3]
    assert spec.ids("history_length", np.array([0, 1, 5, 6, 20, 21, 100, 101])).tolist() == [0, 1, 1, 2, 2, 3, 3, 4]
    assert spec.ranges("item_popularity") == [[0, 0], [1, 20], [21, 200], [201, None]]
    other = SegmentSpec(item_thresholds=(0, 5), history_thresholds=(2,))
    assert other.names("item_popularity") == ["cold", "1-5", "6+"]
    assert other.names("history_length") == ["0-2", "3+"]
    assert SegmentSpec(item_thresholds=(3, 9)).names("item_popularity") == ["0-3", "4-9", "10+"]
    for bad in ((), (20, 0), (0, 0), (-1, 5)):
        with pytest.raises(ValueError, match="--segment-thresholds"):
            SegmentSpec(item_thresholds=bad)
    with pytest.raises(ValueError, match="--bootstrap"):
        SegmentSpec(bootstrap=-1)
    with pytest.raises(ValueError, match="--confidence"):
        SegmentSpec(confidence=1.0)


def test_bootstrap_interval_equals_resampling_with_scikit_learn():
    """The interval is the percentile interval of AUC / log loss over resamples of the segment's rows with
    replacement: the same draws, fed to scikit-learn one resample at a time, give the same numbers. With 12
    rows of 3 positives some resamples draw one class: they are left out of the AUC interval and counted."""
    rng = np.random.default_rng(1)
    scores = np.round(0.1 + 0.8 * rng.random(12), 1)  # ties; away from 0 and 1, where clamps differ
    labels = np.array([1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0], dtype=np.float64)
    entry = segment_entry(scores, labels, bootstrap=300, confidence=0.9, rng=np.random.default_rng(42))
    draw, aucs, losses = np.random.default_rng(42), [], []
    for _ in range(300):
        at = draw.integers(0, 12, 12)
        losses.append(log_loss(labels[at], scores[at], labels=[0, 1]))
        if len(set(labels[at])) == 2:
            aucs.append(roc_auc_score(labels[at], scores[at]))
    assert 0 < 300 - len(aucs) < 150
    assert entry["auc_interval"] == pytest.approx(list(np.quantile(aucs, [0.05, 0.95])), abs=1e-12)
    assert entry["logloss_interval"] == pytest.approx(list(np.quantile(losses, [0.05, 0.95])), abs=1e-12)
    assert f"{300 - len(aucs)} of 300 resamples drew one class" in entry["note"]
    assert entry["auc_interval"][0] <= entry["auc"] <= entry["auc_interval"][1]


def test_intervals_are_seeded_and_do_not_depend_on_the_row_order():
    scores, labels, items, history = hand_made()
    spec = SegmentSpec(bootstrap=40, seed=7)
    first = segment_report(scores, labels, items, history, spec)
    order = np.random.default_rng(0).permutation(len(scores))  # e.g. the rows of 2 ranks instead of 1
    assert segment_report(scores[order], labels[order], items[order], history[order], spec) == first
    other = segment_report(scores, labels, items, history, SegmentSpec(bootstrap=40, seed=8))
    assert other["item_popularity"]["tail"]["auc"] == first["item_popularity"]["tail"]["auc"]
    assert other["item_popularity"]["tail"]["auc_interval"] != first["item_popularity"]["tail"]["auc_interval"]
    none = segment_report(scores, labels, items, history, SegmentSpec(bootstrap=0))
    assert none["all"]["auc_interval"] is None and none["all"]["auc"] == first["all"]["auc"]


def test_ten_thousand_rows_with_200_resamples_take_little_time():
    rng = np.random.default_rng(0)
    n = 10_000
    labels = (rng.random(n) < 0.55).astype(np.float64)
    scores = 1 / (1 + np.exp(-(labels - 0.5 + rng.normal(0, 1, n))))
    began = time.perf_counter()
    report = segment_report(scores.astype(np.float32), labels, rng.integers(0, 4, n), rng.integers(0, 5, n),
                            SegmentSpec(bootstrap=200))
    assert time.perf_counter() - began < 10.0  # 0.15 s on one shared core
    assert report["all"]["auc"] == pytest.approx(roc_auc_score(labels, scores.astype(np.float32)), abs=1e-12)
    low, high = report["all"]["auc_interval"]
    assert low < report["all"]["auc"] < high and high - low < 0.03


def test_item_counts_stream_the_train_split_and_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 50, 1000) * 1_000_003  # large, sparse ids
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"item_id": ids, "label": np.zeros(1000, dtype=np.int8)}), path, row_group_size=97)
    counts = count_items(path, chunk_rows=64)  # many chunks: the merge is exercised
    expected = collections.Counter(ids.tolist())
    assert dict(zip(counts.ids.tolist(), counts.counts.tolist())) == dict(expected)
    assert counts.lookup(np.array([ids[0], 7, -3])).tolist() == [expected[ids[0]], 0, 0]
    write_item_counts(tmp_path, counts)
    back = read_item_counts(tmp_path)
    assert back.ids.tolist() == counts.ids.tolist() and back.counts.tolist() == counts.counts.tolist()
    assert back.record()["train_rows"] == 1000 and back.source["train_split"] == str(path.resolve())
    assert run_item_counts(tmp_path, None).record()["train_rows"] == 1000  # the recorded counts win
    (tmp_path / ITEM_COUNTS).write_text("not parquet")
    with pytest.raises(ValueError, match=ITEM_COUNTS):
        read_item_counts(tmp_path)
    fresh = run_item_counts(tmp_path / "nothing-recorded", path)  # a run from before: counted now, and said so
    assert fresh.record()["train_rows"] == 1000 and "recorded no" in fresh.source["note"]


def test_tags_of_a_sample_table(tiny_schema, tmp_path):
    rows = tiny_rows(6)  # seq_liked holds i titles, seq_disliked none; items 100..105
    rows["seq_disliked"][5] = ["Movie 9", "Movie 8"]
    table = pa.Table.from_pydict(rows, schema=tiny_schema.arrow_schema())
    assert history_lengths(table).tolist() == [0, 1, 2, 3, 4, 7]
    with SampleWriter(tmp_path / "train.parquet", tiny_schema) as writer:
        writer.write(pa.Table.from_pydict({**tiny_rows(4), "item_id": [101, 102, 102, 102]},
                                          schema=tiny_schema.arrow_schema()))
    tagger = SegmentTagger(SegmentSpec(item_thresholds=(0, 1), history_thresholds=(0, 2)),
                           count_items(tmp_path / "train.parquet"))
    items, history = tagger(table)
    assert items.tolist() == [0, 1, 2, 0, 0, 0]  # 100: cold, 101: one train row, 102: three
    assert history.tolist() == [0, 1, 1, 2, 2, 2]


@pytest.fixture(scope="module")
def odd_sized_splits(tmp_path_factory):
    """train 90 rows, valid 203 rows (not a multiple of any global batch below), test 7 rows; 30 items, so
    valid has items of every popularity in train, cold ones included."""
    from bahe.ctr_data.parquet_io import SampleReader
    from bahe.ctr_data.synthetic import SyntheticConfig, write_synthetic

    root = tmp_path_factory.mktemp("segments-data")
    write_synthetic(SyntheticConfig(num_users=50, num_items=30, num_samples=300, distinct_behaviours=20,
                                    num_topics=4, behaviours_per_sequence=5, seed=3), root / "all.parquet")
    reader = SampleReader(root / "all.parquet")
    table = reader.read_all()
    for name, start, stop in (("train", 0, 90), ("valid", 90, 293), ("test", 293, 300)):
        with SampleWriter(root / f"{name}.parquet", reader.schema) as writer:
            writer.write(table.slice(start, stop - start))
    return root


@pytest.mark.integration
def test_evaluate_on_1_and_2_ranks_gives_scikit_learns_numbers_per_segment_over_all_rows(odd_sized_splits, tmp_path):
    """The trainer's evaluate with a segment tagger, on 1 and on 2 ranks with a padded last batch: every
    segment's rows, AUC and log loss are scikit-learn's on the whole split (rows gathered from every rank, no
    padding row, none lost), the item popularity is the train split's (recorded in the run folder), and the
    intervals are the same on 1 and 2 ranks."""
    from tests.torchrun import ROOT, torchrun

    results = {}
    for ranks in (1, 2):
        torchrun(ROOT / "tests" / "dist" / "segments_worker.py", odd_sized_splits, tmp_path, 16, ranks=ranks)
        results[ranks] = json.loads((tmp_path / f"segments-{ranks}.json").read_text())
        assert (tmp_path / f"run-{ranks}" / ITEM_COUNTS).is_file()
    reference = results[1]["reference"]
    probabilities, labels = np.array(reference["probabilities"]), np.array(reference["labels"])
    assert len(labels) == 203
    train = collections.Counter(pq.read_table(odd_sized_splits / "train.parquet").column("item_id").to_pylist())
    popularity = np.array([train[i] for i in reference["items"]])
    history = np.array(reference["history"])
    spec = SegmentSpec(item_thresholds=(0, 2, 4), history_thresholds=(0, 3))
    for ranks, result in results.items():
        segments = result["evaluate"]["segments"]
        assert segments["all"]["rows"] == 203 and segments["item_counts"]["train_rows"] == 90
        assert segments["all"]["auc"] == pytest.approx(result["evaluate"]["auc"], abs=1e-6)  # CtrMetrics' AUC
        for kind, counts in (("item_popularity", popularity), ("history_length", history)):
            ids = spec.ids(kind, counts)
            for index, (name, entry) in enumerate(segments[kind].items()):
                mask = ids == index
                assert entry["rows"] == int(mask.sum()), (ranks, kind, name)
                if len(set(labels[mask])) == 2:
                    assert entry["auc"] == pytest.approx(roc_auc_score(labels[mask], probabilities[mask]), abs=1e-6)
                    assert entry["logloss"] == pytest.approx(log_loss(labels[mask], probabilities[mask]), abs=1e-6)
    assert results[1]["evaluate"]["segments"]["item_popularity"]["cold"]["rows"] > 0
    one, two = ({k: v for k, v in results[r]["evaluate"]["segments"].items() if k != "item_counts"} for r in (1, 2))
    assert two == one  # intervals too


def test_bahe_evaluate_refuses_bad_segment_flags_in_one_line(tmp_path, capsys):
    from bahe.launchers.evaluate import main

    for flags, flag in ((["--segment-thresholds", "20", "0"], "--segment-thresholds"),
                        (["--history-thresholds", "-1"], "--history-thresholds"), (["--bootstrap", "-5"], "--bootstrap"),
                        (["--confidence", "1.5"], "--confidence")):
        assert main(["--checkpoint", str(tmp_path / "run"), "--data-dir", str(tmp_path), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("bahe-evaluate: error: SegmentSpec.") and flag in err[0], err
    assert not (tmp_path / "run").exists()
