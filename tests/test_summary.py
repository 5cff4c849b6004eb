"""ctr_data/summary.py: the duplication summary of sample files (`bahe-data summary`, printed by `make demo`)
reports exactly what the files hold: occurrences, distinct texts and their ratio per sequence type and
over all, nearest-rank length percentiles, rows / users / items / positive rate, accumulated over
several files; ``format_summary`` prints those same numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bahe.ctr_data.parquet_io import SampleWriter
from bahe.ctr_data.summary import format_summary, summarize
from tests.conftest import tiny_rows


def _rows(n: int, seed: int, user_base: int, max_len: int, pool: list[str]) -> dict[str, list]:
    """tiny_rows(n) with a third positive, repeating users / items, and sequences drawn from a small pool
    (texts repeat within and across sequences)."""
    rng = np.random.default_rng(seed)
    rows = tiny_rows(n)
    rows["label"] = [int(i % 3 == 0) for i in range(n)]
    rows["user_id"] = [user_base + int(x) for x in rng.integers(0, 4, n)]
    rows["item_id"] = [int(x) for x in rng.integers(0, 5, n)]
    rows["item_text"] = ["" if i % 4 == 0 else f"Item {int(x)}" for i, x in enumerate(rng.integers(0, 3, n))]
    for name in ("seq_liked", "seq_disliked"):
        rows[name] = [[pool[int(j)] for j in rng.integers(0, len(pool), int(length))]
                      for length in rng.integers(0, max_len + 1, n)]
    return rows


@pytest.fixture
def files(tmp_path, tiny_schema):
    """Two files (train-like and test-like) whose longest sequences differ, so the length histogram
    must grow between them, and whose texts partly overlap, so distinct counts must be unions."""
    titles = [f"Title {i}" for i in range(12)]
    parts = [_rows(13, seed=0, user_base=10, max_len=3, pool=titles[:7]),
             _rows(21, seed=1, user_base=12, max_len=9, pool=titles[4:])]
    paths = []
    for i, rows in enumerate(parts):
        path = tmp_path / f"part{i}.parquet"
        with SampleWriter(path, tiny_schema, row_group_size=5) as writer:
            writer.write(rows)
        paths.append(path)
    merged = {key: parts[0][key] + parts[1][key] for key in parts[0]}
    return paths, merged


def nearest_rank(lengths: list[int], p: float) -> int:
    """The p-th percentile by the nearest-rank definition: the ceil(p/100 * n)-th smallest value."""
    ordered = sorted(lengths)
    return ordered[max(math.ceil(p / 100 * len(ordered)), 1) - 1]


def test_summary_numbers_equal_an_independent_count(files):
    paths, rows = files
    summary = summarize(paths)
    n = len(rows["label"])
    assert summary["dataset"] == "tiny"
    assert summary["files"] == [str(p) for p in paths]
    assert summary["rows"] == n == 34
    assert summary["positive_rate"] == round(sum(rows["label"]) / n, 4) == 0.3529
    assert summary["users"] == len(set(rows["user_id"]))
    assert summary["items"] == len(set(rows["item_id"]))
    assert summary["sequence_types"] == ["liked", "disliked"]

    all_texts: set[str] = set()
    occurrences = 0
    for name in ("liked", "disliked"):
        sequences = rows["seq_" + name]
        flat = [text for seq in sequences for text in seq]
        distinct = set(flat)
        all_texts |= distinct
        occurrences += len(flat)
        lengths = [len(seq) for seq in sequences]
        stats = summary["per_sequence"][name]
        assert stats["occurrences"] == len(flat)
        assert stats["distinct_texts"] == len(distinct)
        assert stats["duplication_ratio"] == round(len(flat) / len(distinct), 2)
        assert stats["length"] == {f"p{p}": nearest_rank(lengths, p) for p in (50, 90, 99, 100)}
        assert stats["length"]["p100"] == max(lengths) > 3  # the second file's longer sequences count
        # the same definition as numpy's inverted-CDF percentile
        assert [stats["length"][f"p{p}"] for p in (50, 90, 99)] == [
            int(np.percentile(lengths, p, method="inverted_cdf")) for p in (50, 90, 99)]

    item_texts = {t for t in rows["item_text"] if t}
    assert "" in rows["item_text"]  # the empty item texts are present and must not count
    assert summary["behaviour_occurrences"] == occurrences
    assert summary["distinct_behaviour_texts"] == len(all_texts) == 12  # the two files' union
    assert summary["duplication_ratio"] == round(occurrences / len(all_texts), 2)
    assert summary["distinct_item_texts"] == len(item_texts) == 3
    assert summary["distinct_texts_to_encode"] == len(all_texts | item_texts)


def test_a_file_summarised_alone_counts_only_itself(files):
    """Two summaries of different files do not share state (the sets and histograms are per call)."""
    paths, rows = files
    first = summarize(paths[:1])
    assert first["rows"] == 13
    assert first["per_sequence"]["liked"]["occurrences"] == sum(len(s) for s in rows["seq_liked"][:13])
    assert first["per_sequence"]["liked"]["length"]["p100"] == max(len(s) for s in rows["seq_liked"][:13])


def test_all_empty_sequences_give_zero_counts_and_percentiles(tmp_path, tiny_schema):
    rows = tiny_rows(3)
    rows["seq_liked"] = [[], [], []]
    with SampleWriter(tmp_path / "s.parquet", tiny_schema) as writer:
        writer.write(rows)
    summary = summarize([tmp_path / "s.parquet"])
    for name in ("liked", "disliked"):
        stats = summary["per_sequence"][name]
        assert stats == {"occurrences": 0, "distinct_texts": 0, "duplication_ratio": 0.0,
                         "length": {"p50": 0, "p90": 0, "p99": 0, "p100": 0}}
    assert summary["behaviour_occurrences"] == summary["distinct_behaviour_texts"] == 0
    assert summary["duplication_ratio"] == 0.0
    assert summary["distinct_texts_to_encode"] == summary["distinct_item_texts"] == 3


def test_format_summary_prints_the_summarys_own_numbers(files):
    paths, _ = files
    summary = summarize(paths)
    text = format_summary(summary)
    lines = text.splitlines()
    assert len(lines) == 2 + len(summary["sequence_types"])
    assert lines[0] == (f"dataset tiny: {summary['rows']} rows, {summary['users']} users, {summary['items']} items, "
                        f"positive rate {summary['positive_rate']:.3f}")
    assert lines[1] == (f"behaviours: {summary['behaviour_occurrences']} occurrences of "
                        f"{summary['distinct_behaviour_texts']} distinct texts (x{summary['duplication_ratio']} "
                        f"duplication); {summary['distinct_texts_to_encode']} distinct texts to encode incl. item texts")
    for line, name in zip(lines[2:], summary["sequence_types"]):
        s = summary["per_sequence"][name]
        length = s["length"]
        assert line == (f"  seq_{name}: {s['occurrences']} occurrences, {s['distinct_texts']} distinct "
                        f"(x{s['duplication_ratio']}), length p50 {length['p50']} p90 {length['p90']} "
                        f"p99 {length['p99']} max {length['p100']}")


def test_format_summary_groups_thousands_and_names_an_unknown_dataset():
    summary = {"dataset": "", "rows": 1234567, "users": 943, "items": 1682, "positive_rate": 0.55312,
               "behaviour_occurrences": 2500000, "distinct_behaviour_texts": 1664, "duplication_ratio": 1502.4,
               "distinct_texts_to_encode": 1700,
               "per_sequence": {"liked": {"occurrences": 12000, "distinct_texts": 1500, "duplication_ratio": 8.0,
                                          "length": {"p50": 5, "p90": 20, "p99": 48, "p100": 50}}}}
    assert format_summary(summary).splitlines() == [
        "dataset ?: 1,234,567 rows, 943 users, 1,682 items, positive rate 0.553",
        "behaviours: 2,500,000 occurrences of 1,664 distinct texts (x1502.4 duplication); "
        "1,700 distinct texts to encode incl. item texts",
        "  seq_liked: 12,000 occurrences, 1,500 distinct (x8.0), length p50 5 p90 20 p99 48 max 50",
    ]
