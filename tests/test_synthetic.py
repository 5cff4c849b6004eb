"""The synthetic generator: deterministic, valid, BAHE-like (repeated Zipf texts) and carrying a signal
that only a model reading the behaviour texts can find."""

from __future__ import annotations

import re
import types

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from bahe.ctr_data.parquet_io import SampleReader
from bahe.ctr_data.synthetic import (
    SyntheticConfig,
    behaviour_vocabulary,
    build_world,
    generate,
    synthetic_schema,
    write_synthetic,
)

SMALL = {"num_users": 5_000, "num_items": 1_000, "distinct_behaviours": 1_000, "behaviours_per_sequence": 10,
         "num_samples": 3_000, "chunk_rows": 1_000}


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula, ties sharing their average rank."""
    order = np.argsort(score, kind="stable")
    _, inverse, counts = np.unique(score[order], return_inverse=True, return_counts=True)
    ranks = np.empty(len(score))
    ranks[order] = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]
    pos = label == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def test_auc_helper_matches_definition():
    """The AUC used by the signal test is right on a hand-checked case (with a tie)."""
    score, label = np.array([0.1, 0.4, 0.35, 0.8, 0.4]), np.array([0, 0, 1, 1, 1])
    pairs = [(p, n) for p in score[label == 1] for n in score[label == 0]]
    expected = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert _auc(score, label) == pytest.approx(expected)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    """One config always gives the same file, byte for byte; another seed gives other data."""
    config = SyntheticConfig(**SMALL, seed=7)
    assert write_synthetic(config, tmp_path / "a.parquet") == SMALL["num_samples"]
    write_synthetic(config, tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    write_synthetic(SyntheticConfig(**SMALL, seed=8), tmp_path / "c.parquet")
    a, c = (SampleReader(tmp_path / name).read_all() for name in ("a.parquet", "c.parquet"))
    assert not a.equals(c)
    assert a.column("seq_bill").to_pylist() != c.column("seq_bill").to_pylist()


def test_file_reads_back_valid_with_expected_columns(tmp_path):
    """The written file passes SampleReader's checks, carries the schema and config, and has sane values:
    strictly increasing timestamps, one value per categorical, empty sequences now and then, lengths <= M."""
    config = SyntheticConfig(**SMALL, sequence_types=("bill", "search", "video_watch"), seed=3)
    write_synthetic(config, tmp_path / "s.parquet")
    reader = SampleReader(tmp_path / "s.parquet")
    assert reader.num_rows == config.num_samples
    assert reader.schema == synthetic_schema(config)
    assert reader.schema.dataset == "synthetic"
    assert reader.schema.extra["config"]["seed"] == 3
    table = reader.read_all()
    assert table.column_names == [
        "label", "timestamp", "user_id", "item_id", "cat_user_segment", "cat_item_category",
        "dense_user_activity", "dense_item_popularity", "item_text", "seq_bill", "seq_search", "seq_video_watch"]
    assert np.all(np.diff(table.column("timestamp").to_numpy()) > 0)
    for name in ("cat_user_segment", "cat_item_category"):
        assert pc.all(pc.equal(pc.list_value_length(table.column(name)), 1)).as_py()
    assert 0.05 < pc.mean(table.column("label")).as_py() < 0.6
    assert table.column("item_id").to_numpy().max() < config.num_items
    assert table.column("user_id").to_numpy().max() < config.num_users
    lengths = np.concatenate([pc.list_value_length(table.column(c)).to_numpy() for c in reader.schema.sequence_columns])
    assert lengths.max() <= config.behaviours_per_sequence and (lengths == 0).any()
    assert all(t.startswith("Video watch:") for t in pc.list_flatten(table.column("seq_video_watch")).to_pylist())


def test_generate_streams_chunks():
    """generate() is lazy and yields chunk_rows-sized tables with the exact Arrow schema."""
    config = SyntheticConfig(**{**SMALL, "num_samples": 2_500}, seed=1)
    stream = generate(config)
    assert isinstance(stream, types.GeneratorType)
    chunks = list(stream)
    assert [c.num_rows for c in chunks] == [1_000, 1_000, 500]
    target = synthetic_schema(config).arrow_schema()
    assert all(c.schema.equals(target, check_metadata=True) for c in chunks)
    assert next(generate(config)).equals(chunks[0])
    assert chunks[0].column("timestamp")[-1].as_py() < chunks[1].column("timestamp")[0].as_py()
    assert list(generate(SyntheticConfig(**{**SMALL, "num_samples": 0}))) == []


def test_behaviour_texts_repeat_with_zipf_skew():
    """What BAHE exploits: few distinct texts, many occurrences, a heavy head (top >> median)."""
    config = SyntheticConfig(**{**SMALL, "num_samples": 5_000}, seed=2)
    table = pa.concat_tables(generate(config))
    for column in synthetic_schema(config).sequence_columns:
        flat = pc.list_flatten(table.column(column))
        counts = np.sort(pc.value_counts(flat).field("counts").to_numpy())[::-1]
        assert len(counts) * 10 < len(flat), column
        assert len(counts) <= config.distinct_behaviours
        assert counts[0] >= 20 * np.median(counts), column


def test_vocabulary_is_unique_and_topic_readable():
    """Every distinct text is unique, ~K words long, and holds words of its hidden topic only; item titles
    too. Topic vocabularies are disjoint, also beyond the 20 hand-written themes."""
    config = SyntheticConfig(**SMALL, num_topics=24, tokens_per_behaviour=9, seed=4)
    world = build_world(config)
    vocab = behaviour_vocabulary(config)
    assert vocab == world.texts
    owner = {w: t for t, words in enumerate(world.topic_words) for w in words}
    assert len(owner) == 24 * 10
    for kind, texts in vocab.items():
        assert len(texts) == len(set(texts)) == config.distinct_behaviours
        for text, topic in zip(texts, world.text_topics[kind]):
            assert 6 <= len(text.split()) <= 11
            found = {owner[w] for w in re.findall(r"[a-z]+", text.lower()) if w in owner}
            assert found == {topic}, (kind, text)
    for title, topic in zip(world.item_titles, world.item_topics):
        assert {owner[w] for w in title.lower().split() if w in owner} == {topic}
    assert set(np.bincount(world.item_topics, minlength=24) > 0) == {True}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"behaviours_per_sequence": 0}, "behaviours_per_sequence"),
        ({"behaviours_per_sequence": 3, "min_behaviours_per_sequence": 5}, "min_behaviours_per_sequence"),
        ({"tokens_per_behaviour": 0}, "tokens_per_behaviour"),
        ({"distinct_behaviours": 0}, "distinct_behaviours"),
        ({"distinct_behaviours": 5, "num_topics": 20}, "distinct_behaviours"),
        ({"num_items": 3}, "num_items"),
        ({"sequence_types": ()}, "sequence_types"),
        ({"sequence_types": ("bill", "bill")}, "sequence_types"),
        ({"sequence_types": ("Bill",)}, "sequence_types"),
        ({"zipf_exponent": -1.0}, "zipf_exponent"),
        ({"topic_affinity": 1.5}, "topic_affinity"),
        ({"num_topics": True}, "num_topics"),
        ({"seed": -1}, "seed"),
        ({"behaviours_per_sequence": 5_000, "chunk_rows": 1_000_000}, "chunk_rows"),
    ],
)
def test_bad_config_is_refused_by_name(change, field):
    """A bad field raises ValueError naming that field and what to set it to."""
    with pytest.raises(ValueError, match=rf"SyntheticConfig\.{field}") as err:
        SyntheticConfig(**change)
    assert re.search(r"set it to|give|must", str(err.value))


def _text_overlap_score(table: pa.Table, sequence_columns: list[str]) -> np.ndarray:
    """Per row: the fraction of its behaviours sharing at least one word with the item title."""
    titles = [set(t.lower().split()) for t in table.column("item_text").to_pylist()]
    hits, totals = np.zeros(table.num_rows), np.zeros(table.num_rows)
    words: dict[str, set[str]] = {}
    for column in sequence_columns:
        for row, texts in enumerate(table.column(column).to_pylist()):
            for text in texts:
                if text not in words:
                    words[text] = set(text.lower().split())
                hits[row] += not titles[row].isdisjoint(words[text])
            totals[row] += len(texts)
    return hits / np.maximum(totals, 1)


def _id_only_scores(table: pa.Table, label: np.ndarray, cut: int) -> dict[str, np.ndarray]:
    """Smoothed positive rates of each item and each user on the train rows (target encoding)."""
    prior, scores = label[:cut].mean(), {}
    for column in ("item_id", "user_id"):
        uniques, inverse = np.unique(table.column(column).to_numpy(), return_inverse=True)
        pos = np.bincount(inverse[:cut], weights=label[:cut], minlength=len(uniques))
        seen = np.bincount(inverse[:cut], minlength=len(uniques))
        scores[column] = ((pos + 5 * prior) / (seen + 5))[inverse]
    logit = {k: np.log(v / (1 - v)) for k, v in scores.items()}
    scores["item_and_user"] = logit["item_id"] + logit["user_id"]
    return scores


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_signal_needs_the_behaviour_texts(seed):
    """THE SIGNAL: split by time, a word-overlap reader of item title vs behaviour texts beats the best
    id-only predictor (item / user / both target encodings fitted on train) by a clear AUC margin."""
    config = SyntheticConfig(num_users=20_000, num_items=2_000, distinct_behaviours=2_000, num_samples=30_000,
                             chunk_rows=10_000, seed=seed)
    table = pa.concat_tables(generate(config))
    assert np.all(np.diff(table.column("timestamp").to_numpy()) > 0)
    label = table.column("label").to_numpy().astype(np.int64)
    cut = int(0.75 * table.num_rows)
    text_auc = _auc(_text_overlap_score(table, synthetic_schema(config).sequence_columns)[cut:], label[cut:])
    id_auc = max(_auc(s[cut:], label[cut:]) for s in _id_only_scores(table, label, cut).values())
    assert text_auc >= 0.65, (text_auc, id_auc)
    assert text_auc - id_auc >= 0.1, (text_auc, id_auc)
    assert id_auc > 0.52  # ids are not worthless either: items carry a hidden bias
