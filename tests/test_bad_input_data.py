"""Bad input in the data path: sample files (SampleWriter / SampleReader / validate_batch), Criteo
TSV files and the training batcher (SampleBatcher, dense features). Each gets a clear error naming
what to change, or a documented, counted fallback. Only what other test files do not already cover;
docs/faults.md lists every case with its test. The other entry points: tests/test_bad_input_setup.py.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bahe.ctr_data.criteo import iter_criteo_tsv
from bahe.ctr_data.parquet_io import SampleReader, SampleWriter, validate_batch
from bahe.ctr_data.schema import SCHEMA_METADATA_KEY, DataError, SampleSchema
from bahe.embeddings.vocabulary import UNKNOWN_ID, BehaviourVocabulary
from bahe.model.batch import SampleBatcher
from bahe.model.dense_features import DenseNormalizer, log1p_dense
from tests.conftest import tiny_rows

CRITEO_GOOD = "\t".join(["1"] + [str(i) for i in range(13)] + [f"{i:08x}" for i in range(26)])


def tiny_table(schema: SampleSchema, rows: dict) -> pa.Table:
    """An Arrow table of the schema WITHOUT validation (what code other than SampleReader may build)."""
    return pa.table(rows, schema=schema.arrow_schema())


# Sample files: SampleWriter / SampleReader / validate_batch -----------------------------------------------
@pytest.mark.parametrize("value", [-math.inf, math.inf, math.nan])
def test_sample_file_arrow_table_with_non_finite_dense_is_refused_by_row(tmp_path, tiny_schema, value):
    """validate_batch on an Arrow table (not Python lists): -inf / inf / NaN named by file, row, field."""
    rows = tiny_rows(6)
    rows["dense_age"][4] = value
    with pytest.raises(DataError, match=r"row 104, field 'dense_age': dense value must be finite") as info:
        validate_batch(tiny_table(tiny_schema, rows), tiny_schema, path=tmp_path / "f.parquet", row_offset=100)
    assert str(tmp_path / "f.parquet") in str(info.value) and "replace NaN / inf" in str(info.value)


def test_sample_file_float64_dense_beyond_float32_is_refused(tmp_path, tiny_schema):
    """1e39 is finite as float64 but inf as float32: refused, and the message says why."""
    rows = tiny_rows(3)
    table = tiny_table(tiny_schema, rows).set_column(5, "dense_age", pa.array([1.0, 1e39, 2.0], pa.float64()))
    with pytest.raises(DataError, match=r"row 1, field 'dense_age'.*1e\+39 \(beyond the float32 range\)"):
        validate_batch(table, tiny_schema, path="f", row_offset=0)


@pytest.mark.parametrize(("column", "value", "expect"), [
    ("label", 0.5, r"field 'label': value 0.5 is not int8"),
    ("label", -1, r"field 'label': label must be 0 or 1, got -1"),
    ("timestamp", 1.5, r"field 'timestamp': value 1.5 is not int64"),
    ("dense_age", "abc", r"field 'dense_age': value 'abc' is not float"),
    ("cat_genre", ["x"], r"field 'cat_genre': value \['x'\] is not list<item: int64>"),
    ("seq_liked", "Toy Story", r"field 'seq_liked': value 'Toy Story' is not a list"),
    ("cat_genre", 3, r"field 'cat_genre': value 3 is not a list"),
    ("cat_genre", [1.5], r"field 'cat_genre': value \[1.5\] is not list<item: int64>"),
    ("user_id", 1.5, r"field 'user_id': value 1.5 is not int64"),
    ("item_text", 7, r"field 'item_text': value 7 is not string"),
], ids=["label-fraction", "label-negative", "timestamp-fraction", "dense-text", "categorical-texts", "sequence-a-text",
        "categorical-a-number", "categorical-fraction", "id-fraction", "item-text-a-number"])
def test_sample_file_wrong_type_is_named(tmp_path, tiny_schema, column, value, expect):
    rows = tiny_rows(4)
    rows[column][2] = value
    with pytest.raises(DataError, match=r"row 2, " + expect), SampleWriter(tmp_path / "s.parquet", tiny_schema) as w:
        w.write(rows)
    assert list(tmp_path.iterdir()) == []


def test_sample_file_extra_column_is_refused_on_write(tmp_path, tiny_schema):
    """A column the schema lacks would be dropped silently: the writer refuses it by name."""
    rows = {**tiny_rows(2), "seq_clicked": [[], ["a"]]}
    with pytest.raises(DataError, match=r"field 'seq_clicked': column\(s\) \['seq_clicked'\] are not in the schema"), \
            SampleWriter(tmp_path / "s.parquet", tiny_schema) as writer:
        writer.write(rows)


def test_sample_file_misspelt_column_is_named_with_the_likely_typo(tmp_path, tiny_schema):
    rows = tiny_rows(2)
    rows["dense_agee"] = rows.pop("dense_age")
    with pytest.raises(DataError, match=r"missing column\(s\) \['dense_age'\].*a typo\? \['dense_agee'\]"):
        validate_batch(pa.table(rows), tiny_schema, path="f", row_offset=0)


def test_sample_file_with_corrupt_schema_metadata_is_refused(tmp_path, tiny_schema):
    table = tiny_table(tiny_schema, tiny_rows(2)).replace_schema_metadata({SCHEMA_METADATA_KEY: b"{not json"})
    pq.write_table(table, tmp_path / "s.parquet")
    with pytest.raises(DataError, match=r"s.parquet: corrupt 'bahe.schema' metadata"):
        SampleReader(tmp_path / "s.parquet")


def test_sample_file_missing_a_column_its_metadata_promises_is_refused(tmp_path, tiny_schema):
    table = tiny_table(tiny_schema, tiny_rows(2))
    table = table.drop_columns(["seq_disliked"]).replace_schema_metadata(table.schema.metadata)
    pq.write_table(table, tmp_path / "s.parquet")
    with pytest.raises(DataError, match=r"field 'seq_disliked': missing column\(s\) \['seq_disliked'\]"):
        SampleReader(tmp_path / "s.parquet")


def test_sample_file_truncated_is_refused(tmp_path, tiny_schema):
    with SampleWriter(tmp_path / "s.parquet", tiny_schema) as writer:
        writer.write(tiny_rows(50))
    data = (tmp_path / "s.parquet").read_bytes()
    (tmp_path / "s.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a readable Parquet file"):
        SampleReader(tmp_path / "s.parquet")


def test_sample_file_empty_gives_no_rows_and_no_dense_statistics(tmp_path, tiny_schema):
    """A file with zero rows reads as empty; fitting dense statistics on it says so."""
    with SampleWriter(tmp_path / "s.parquet", tiny_schema):
        pass
    reader = SampleReader(tmp_path / "s.parquet")
    assert reader.num_rows == 0 and reader.read_all().num_rows == 0
    with pytest.raises(ValueError, match="has no rows to fit the dense statistics on"):
        DenseNormalizer.fit(reader)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), data=st.data(), value=st.sampled_from([math.nan, math.inf, -math.inf]),
       group=st.integers(1, 16), batch=st.integers(1, 16))
def test_sample_file_property_any_non_finite_dense_is_found_at_its_row(n, data, value, group, batch):
    """Property (reader): whatever the row, row-group size and read batch size, a non-finite dense
    value in a file written by another tool is reported at its global row."""
    tiny_schema = SampleSchema(categorical=("genre",), dense=("age",), sequences=("liked", "disliked"))
    bad = data.draw(st.integers(0, n - 1))
    rows = tiny_rows(n)
    table = tiny_table(tiny_schema, rows).set_column(
        5, "dense_age", pa.array([value if i == bad else 1.0 for i in range(n)], pa.float32()))
    table = table.replace_schema_metadata(tiny_schema.arrow_schema().metadata)
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(table, Path(tmp) / "s.parquet", row_group_size=group)
        with pytest.raises(DataError) as info:
            list(SampleReader(Path(tmp) / "s.parquet").iter_batches(batch_size=batch))
    assert (info.value.row, info.value.field) == (bad, "dense_age")


# Criteo TSV -----------------------------------------------------------------------------------------------
def _tsv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "day.tsv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("field", "value"), [("I4", "nan"), ("I4", "inf"), ("I4", "-inf"), ("I4", "3e2"),
                                              ("I4", " 3"), ("C26", "-1f")])
def test_criteo_non_integer_or_negative_hex_is_named(tmp_path, field, value):
    fields = CRITEO_GOOD.split("\t")
    fields[4 if field == "I4" else 39] = value
    path = _tsv(tmp_path, CRITEO_GOOD + "\n" + "\t".join(fields) + "\n")
    with pytest.raises(DataError, match=rf"row 1, field '{field}': not a"):
        list(iter_criteo_tsv(path))


def test_criteo_header_line_is_refused_as_a_bad_label(tmp_path):
    header = "\t".join(["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)])
    with pytest.raises(DataError, match=r"row 0, field 'label': label must be 0 or 1, got 'label'"):
        list(iter_criteo_tsv(_tsv(tmp_path, header + "\n" + CRITEO_GOOD + "\n")))


def test_criteo_crlf_line_ends_are_read(tmp_path):
    tables = list(iter_criteo_tsv(_tsv(tmp_path, (CRITEO_GOOD + "\r\n") * 3)))
    assert sum(t.num_rows for t in tables) == 3 and tables[0].column("cat_c26")[0].as_py() == [25]


def test_criteo_single_line_without_final_newline_is_not_dropped(tmp_path):
    """pyarrow cannot infer columns from one line without a line end; it used to read as an empty file."""
    tables = list(iter_criteo_tsv(_tsv(tmp_path, CRITEO_GOOD)))
    assert sum(t.num_rows for t in tables) == 1


def test_criteo_first_line_longer_than_a_block_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"row 0: no line end in the first 64 bytes"):
        list(iter_criteo_tsv(_tsv(tmp_path, CRITEO_GOOD + "\n"), block_size=64))


def test_criteo_whitespace_only_file_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"row 0, field 'I1': expected 40 tab-separated fields"):
        list(iter_criteo_tsv(_tsv(tmp_path, "   ")))


@settings(max_examples=25, deadline=None)
@given(lines=st.integers(1, 6), final_newline=st.booleans(), block_size=st.sampled_from([512, 4096, 1 << 20]))
def test_criteo_property_final_newline_never_changes_the_rows(lines, final_newline, block_size):
    text = "\n".join([CRITEO_GOOD] * lines) + ("\n" if final_newline else "")
    with tempfile.TemporaryDirectory() as tmp:
        tables = list(iter_criteo_tsv(_tsv(Path(tmp), text), block_size=block_size))
    assert sum(t.num_rows for t in tables) == lines


# The training batcher (SampleBatcher) and dense features ---------------------------------------------------
def _vocab(*texts: str) -> BehaviourVocabulary:
    vocab = BehaviourVocabulary()
    vocab.extend(Counter(dict.fromkeys(texts, 1)))
    return vocab


def _seq(batch, key: str) -> list[list[int]]:
    kjt = batch.behaviour_features[key]
    return [v.tolist() for v in kjt.values().split(kjt.lengths().tolist())]


def test_batcher_negative_id_is_refused_naming_feature_and_row(tiny_schema):
    rows = tiny_rows(4)
    rows["user_id"][2] = -3
    batcher = SampleBatcher(tiny_schema, {"user_id": 10, "item_id": 10})
    with pytest.raises(DataError, match=r"field 'user_id': ids must be >= 0, found -3 in row 2 of the batch.*map "
                                        "negative ids to non-negative"):
        batcher(tiny_table(tiny_schema, rows))


def test_batcher_negative_id_inside_a_categorical_list_names_its_row(tiny_schema):
    rows = tiny_rows(4)
    rows["cat_genre"] = [[], [1, 2], [3, -7], []]
    with pytest.raises(DataError, match=r"field 'cat_genre': ids must be >= 0, found -7 in row 2 of the batch"):
        SampleBatcher(tiny_schema, {"cat_genre": 10})(tiny_table(tiny_schema, rows))


def test_batcher_ids_beyond_a_table_are_hashed_and_counted(tiny_schema):
    """The documented fallback: id % rows, counted per feature in batcher.counters."""
    rows = tiny_rows(4)  # user ids 10..13, item ids 100..103, genres [], [1, 2], [], [3, 4]
    batcher = SampleBatcher(tiny_schema, {"user_id": 4, "item_id": 1000, "cat_genre": 3})
    batch = batcher(tiny_table(tiny_schema, rows))
    assert batch.sparse_features["user_id"].values().tolist() == [2, 3, 0, 1]
    assert batch.sparse_features["item_id"].values().tolist() == [100, 101, 102, 103]
    assert batch.sparse_features["cat_genre"].values().tolist() == [1, 2, 0, 1]
    assert batcher.counters.ids_beyond_table == {"user_id": 4, "item_id": 0, "cat_genre": 2}
    assert batcher.counters.as_dict()["ids_beyond_table/user_id"] == 4 and batcher.counters.rows == 4


def test_batcher_unknown_behaviour_texts_map_to_the_unknown_row_and_are_counted(tiny_schema):
    rows = tiny_rows(2)
    rows["seq_liked"] = [["Seen", "never encoded"], ["Seen"]]
    rows["item_text"] = ["not encoded either", "Seen"]
    vocab = _vocab("Seen")
    batcher = SampleBatcher(tiny_schema, {"item_id": 10}, vocab)
    batch = batcher(tiny_table(tiny_schema, rows))
    assert _seq(batch, "seq_liked") == [[2, UNKNOWN_ID], [2]]
    assert _seq(batch, "item_text") == [[UNKNOWN_ID], [2]]
    assert (batcher.counters.unknown_behaviours, batcher.counters.unknown_item_texts) == (1, 1)
    assert vocab.unknown_lookups == 2  # the vocabulary's own running count agrees


def test_batcher_empty_sequence_stays_empty_and_is_counted(tiny_schema):
    rows = tiny_rows(3)
    rows["seq_liked"] = [[], ["a"], ["", "  "]]
    batcher = SampleBatcher(tiny_schema, {"item_id": 10}, _vocab("a"), sequence_names=("liked",))
    batch = batcher(tiny_table(tiny_schema, rows))
    assert _seq(batch, "seq_liked") == [[], [2], []]
    assert batcher.counters.empty_sequences == 2 and batcher.counters.empty_behaviour_texts == 2


def test_batcher_over_long_sequence_keeps_the_most_recent_and_counts_the_rest(tiny_schema):
    rows = tiny_rows(2)
    rows["seq_liked"] = [["a", "b", "c", "d", "e"], ["b", "c"]]  # oldest first
    batcher = SampleBatcher(tiny_schema, {"item_id": 10}, _vocab(*"abcde"), max_behaviours=3)
    batch = batcher(tiny_table(tiny_schema, rows))
    assert _seq(batch, "seq_liked") == [[4, 5, 6], [3, 4]]  # c, d, e (ids 4..6) in their order
    assert batcher.counters.dropped_behaviours == 2


def test_batcher_empty_texts_do_not_take_the_places_of_real_behaviours(tiny_schema):
    rows = tiny_rows(1)
    rows["seq_liked"] = [["a", "b", "", "c", " "]]
    batcher = SampleBatcher(tiny_schema, {"item_id": 10}, _vocab("a", "b", "c"), max_behaviours=3)
    assert _seq(batcher(tiny_table(tiny_schema, rows)), "seq_liked") == [[2, 3, 4]]
    assert (batcher.counters.empty_behaviour_texts, batcher.counters.dropped_behaviours) == (2, 0)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_batcher_non_finite_dense_in_an_unvalidated_table_is_refused(tiny_schema, value):
    rows = tiny_rows(3)
    rows["dense_age"][1] = value
    with pytest.raises(DataError, match=r"field 'dense_age': dense value must be finite.*row 1 of the table"):
        SampleBatcher(tiny_schema, {"item_id": 10})(tiny_table(tiny_schema, rows))
    with pytest.raises(DataError, match="row 1 of the table"):
        log1p_dense(tiny_table(tiny_schema, rows), ("dense_age",))


def test_batcher_table_missing_a_column_is_refused(tiny_schema):
    table = tiny_table(tiny_schema, tiny_rows(2)).drop_columns(["seq_disliked"])
    with pytest.raises(DataError, match=r"field 'seq_disliked': the table lacks column\(s\) \['seq_disliked'\]"):
        SampleBatcher(tiny_schema, {"item_id": 10}, _vocab("a"))(table)


@pytest.mark.parametrize(("kwargs", "expect"), [
    ({"table_sizes": {"item_id": 0}}, r"whole numbers of rows >= 1, got \{'item_id': 0\}"),
    ({"table_sizes": {"item_id": 2.5}}, r"whole numbers of rows >= 1"),
    ({"table_sizes": {"cat_colour": 10}}, r"unknown: \['cat_colour'\]"),
    ({"table_sizes": {}}, r"must name some of the data's ID features"),
    ({"sequence_names": ("clicked",)}, r"sequence type\(s\) \['clicked'\] are not in the data"),
    ({"max_behaviours": 0}, r"max_behaviours must be >= 1"),
], ids=["table-rows-0", "table-rows-fraction", "unknown-feature", "no-feature", "unknown-sequence", "max-behaviours-0"])
def test_batcher_construction_with_sizes_that_do_not_meet_the_data_is_refused(tiny_schema, kwargs, expect):
    kwargs = {"table_sizes": {"item_id": 10}, **kwargs}
    with pytest.raises(ValueError, match=expect):
        SampleBatcher(tiny_schema, **kwargs)
