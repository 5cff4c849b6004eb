"""Property-based tests of the behaviour vocabulary builder (embeddings/vocabulary.py).

Whatever texts and whatever order of ``extend()`` calls: ids are stable and append-only, new texts
get consecutive ids in sorted order, normalisation is idempotent, every added text (in any
spelling that normalises to it) looks up to its id, unknown texts look up to UNKNOWN_ID and are
counted exactly, empty texts look up to PAD_ID, counts add up, and save / load round-trips
everything. A refused ``extend()`` changes nothing.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bahe.ctr_data.parquet_io import SampleWriter
from bahe.ctr_data.schema import SampleSchema
from bahe.embeddings.vocabulary import (
    PAD_ID,
    RESERVED,
    UNKNOWN_ID,
    BehaviourVocabulary,
    count_texts,
    normalize_text,
    normalize_texts,
)

# Texts: arbitrary Unicode (no lone surrogates: Arrow strings are UTF-8), plus a small alphabet of
# troublemakers so that collisions under normalisation are frequent: whitespace kinds, a combining
# accent and its precomposed form, case, the reserved rows' own names and NUL.
TRICKY = [" ", "\t", "\n", "\u00a0", "\u2003", "\u3000", "e", "E", "\u0301", "\u00e9", "<pad>", "<unknown>", "\x00",
          "pad", "a", "☕", "1"]
any_text = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.lists(st.sampled_from(TRICKY), max_size=6).map("".join),
)
FAST = settings(max_examples=100, deadline=None)


def normalised(texts: list[str]) -> list[str]:
    """The normalised, non-empty texts of ``texts`` (what extend() accepts)."""
    return [t for t in normalize_texts(pa.array(texts, pa.string())).to_pylist() if t]


counters = st.lists(
    st.lists(st.tuples(any_text, st.integers(0, 5)), max_size=8).map(
        lambda pairs: Counter({t: n for t, n in zip(normalised([p[0] for p in pairs]), [p[1] for p in pairs])})),
    min_size=1, max_size=5,
)


@FAST
@given(text=any_text)
def test_normalisation_is_idempotent_and_agrees_with_the_vectorised_form(text):
    once = normalize_text(text)
    assert normalize_text(once) == once
    assert normalize_texts(pa.array([text, once], pa.string())).to_pylist() == [once, once]
    assert once == once.strip(" ") and "  " not in once


@FAST
@given(calls=counters)
def test_ids_are_stable_append_only_and_sorted_per_call(calls):
    vocab = BehaviourVocabulary()
    for counts in calls:
        before = list(vocab.texts)
        new_ids = vocab.extend(counts)
        assert vocab.texts[: len(before)] == before  # nothing moved
        assert new_ids == list(range(len(before), len(vocab.texts)))
        added = vocab.texts[len(before):]
        assert added == sorted(set(counts) - set(before[len(RESERVED):]))
    assert vocab.texts[: len(RESERVED)] == list(RESERVED)
    real = vocab.texts[len(RESERVED):]
    assert len(set(real)) == len(real)


@FAST
@given(calls=counters, unknown=st.lists(any_text, max_size=6))
@example(calls=[Counter({"\x00pad": 1, "\x00unknown": 1, "<pad>": 1})], unknown=["<unknown>"])  # reserved look-alikes
def test_lookups_return_ids_pad_and_counted_unknowns(calls, unknown):
    vocab = BehaviourVocabulary()
    for counts in calls:
        vocab.extend(counts)
    real = vocab.texts[len(RESERVED):]
    assert vocab.lookup(real) == list(range(len(RESERVED), len(vocab)))
    # any spelling that normalises to a known text finds it
    assert vocab.lookup([f" \u00a0{t}\t" for t in real]) == list(range(len(RESERVED), len(vocab)))
    probes = list(unknown)
    expected = []
    for text in probes:
        norm = normalize_text(text)
        expected.append(PAD_ID if norm == "" else vocab._index.get(norm, UNKNOWN_ID))
    before = vocab.unknown_lookups
    assert vocab.lookup(probes) == expected
    assert vocab.unknown_lookups - before == sum(1 for e in expected if e == UNKNOWN_ID)
    assert vocab.lookup(["", " ", "\n\u3000"]) == [PAD_ID] * 3 and vocab.unknown_lookups - before == expected.count(
        UNKNOWN_ID)


@FAST
@given(calls=counters)
def test_counts_add_up(calls):
    vocab = BehaviourVocabulary()
    total: Counter = Counter()
    for counts in calls:
        vocab.extend(counts)
        total.update(counts)
    assert vocab.counts[: len(RESERVED)] == [0] * len(RESERVED)
    assert {t: vocab.counts[i] for i, t in enumerate(vocab.texts) if i >= len(RESERVED)} == \
        {t: total[t] for t in vocab.texts[len(RESERVED):]}
    assert sum(vocab.counts) == sum(total.values())


@FAST
@given(calls=counters)
def test_save_load_round_trip_preserves_everything(calls):
    vocab = BehaviourVocabulary()
    for counts in calls:
        vocab.extend(counts)
    with tempfile.TemporaryDirectory() as tmp:
        vocab.save(Path(tmp) / "v.parquet")
        loaded = BehaviourVocabulary.load(Path(tmp) / "v.parquet")
    assert loaded.texts == vocab.texts and loaded.counts == vocab.counts
    assert loaded.lookup(vocab.texts[len(RESERVED):]) == list(range(len(RESERVED), len(vocab)))
    # and a loaded vocabulary keeps extending append-only
    assert loaded.extend(Counter({"\u2603 new text \u2603": 1})) in ([len(vocab)], [])


@FAST
@given(calls=counters, bad=st.sampled_from([" lead", "trail ", "two  spaces", "", "e\u0301", "a\u00a0b"]))
def test_a_refused_extend_changes_nothing(calls, bad):
    vocab = BehaviourVocabulary()
    for counts in calls[:-1]:
        vocab.extend(counts)
    texts, counts_before = list(vocab.texts), list(vocab.counts)
    with pytest.raises(ValueError, match="normalised, non-empty"):
        vocab.extend(Counter({**calls[-1], bad: 1}))
    assert vocab.texts == texts and vocab.counts == counts_before
    with pytest.raises(ValueError, match="counts >= 0"):
        vocab.extend(Counter({**calls[-1], "fine": -1}))
    assert vocab.texts == texts and vocab.counts == counts_before


SCHEMA = SampleSchema(sequences=("liked",), dataset="prop")


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.tuples(any_text, st.lists(any_text, max_size=5)), min_size=1, max_size=12))
def test_counting_a_sample_file_equals_counting_its_normalised_texts(rows):
    """The builder's reader: count_texts over a file = a Counter of the normalised non-empty texts."""
    n = len(rows)
    columns = {"label": [0] * n, "timestamp": list(range(n)), "user_id": [0] * n, "item_id": [0] * n,
               "item_text": [r[0] for r in rows], "seq_liked": [r[1] for r in rows]}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.parquet"
        with SampleWriter(path, SCHEMA) as writer:
            writer.write(columns)
        counts = count_texts([path])
        without_items = count_texts([path], include_item_text=False)
    everything = [r[0] for r in rows] + [t for r in rows for t in r[1]]
    assert counts == Counter(normalised(everything))
    assert without_items == Counter(normalised([t for r in rows for t in r[1]]))
    vocab = BehaviourVocabulary()
    vocab.extend(counts)
    assert sum(vocab.counts) == len(normalised(everything))
