"""The sample files: what is written reads back unchanged, and bad rows are refused by name."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bahe.ctr_data.parquet_io import SampleReader, SampleWriter
from bahe.ctr_data.schema import DataError, SampleSchema
from tests.conftest import tiny_rows


def test_round_trip_streams_in_batches(tmp_path, tiny_schema):
    """Rows written in several batches read back identical, batch by batch, with the schema."""
    rows = tiny_rows(10)
    with SampleWriter(tmp_path / "s.parquet", tiny_schema, row_group_size=3) as writer:
        writer.write({k: v[:6] for k, v in rows.items()})
        writer.write({k: v[6:] for k, v in rows.items()})
    reader = SampleReader(tmp_path / "s.parquet")
    assert reader.schema == tiny_schema and reader.num_rows == 10
    batches = list(reader.iter_batches(batch_size=4))
    assert [b.num_rows for b in batches] == [4, 4, 2]
    assert pa.concat_tables(batches).to_pydict() == pa.table(rows, schema=tiny_schema.arrow_schema()).to_pydict()


def test_empty_sequences_and_texts_are_valid(tmp_path, tiny_schema):
    rows = tiny_rows(2)
    rows["item_text"] = ["", ""]
    rows["seq_liked"] = [[], []]
    with SampleWriter(tmp_path / "s.parquet", tiny_schema) as writer:
        writer.write(rows)
    assert SampleReader(tmp_path / "s.parquet").read_all().column("seq_liked").to_pylist() == [[], []]


@pytest.mark.parametrize(
    ("column", "value", "row", "expect"),
    [
        ("dense_age", float("nan"), 2, "finite"),
        ("dense_age", float("inf"), 1, "finite"),
        ("dense_age", None, 3, "null"),
        ("label", 2, 1, "0 or 1"),
        ("user_id", "abc", 2, "is not int64"),
        ("seq_liked", None, 0, "null"),
        ("item_text", None, 3, "null"),
    ],
)
def test_bad_value_names_file_row_and_field_and_leaves_nothing(tmp_path, tiny_schema, column, value, row, expect):
    """A bad value is refused with its file, global row and field; no file appears under the name."""
    rows = tiny_rows(4)
    rows[column] = list(rows[column])
    rows[column][row] = value
    target = tmp_path / "bad.parquet"
    with pytest.raises(DataError) as info, SampleWriter(target, tiny_schema) as writer:
        writer.write(tiny_rows(4))  # a good first batch: rows 0..3
        writer.write({k: pa.array(v, from_pandas=True) if k == column and value is None else v for k, v in rows.items()})
    message = str(info.value)
    assert str(target) in message and f"row {4 + row}" in message and repr(column) in message and expect in message
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_null_element_inside_a_sequence_is_refused(tmp_path, tiny_schema):
    rows = tiny_rows(3)
    rows["seq_liked"] = [["a"], ["b", None], []]
    with pytest.raises(DataError, match=r"row 1, field 'seq_liked': null element"), \
            SampleWriter(tmp_path / "s.parquet", tiny_schema) as writer:
        writer.write(rows)


def test_missing_column_is_named(tmp_path, tiny_schema):
    rows = tiny_rows(2)
    del rows["dense_age"]
    with pytest.raises(DataError, match="dense_age"), SampleWriter(tmp_path / "s.parquet", tiny_schema) as writer:
        writer.write(rows)


def test_existing_file_survives_a_failed_rewrite(tmp_path, tiny_schema):
    """Overwriting a good file with a bad batch keeps the good file intact."""
    target = tmp_path / "s.parquet"
    with SampleWriter(target, tiny_schema) as writer:
        writer.write(tiny_rows(3))
    before = target.read_bytes()
    bad = tiny_rows(3)
    bad["label"] = [0, 5, 1]
    with pytest.raises(DataError), SampleWriter(target, tiny_schema) as writer:
        writer.write(bad)
    assert target.read_bytes() == before


def test_reader_refuses_foreign_and_corrupt_files(tmp_path, tiny_schema):
    pq.write_table(pa.table({"a": [1]}), tmp_path / "foreign.parquet")
    with pytest.raises(DataError, match="not a BAHE sample file"):
        SampleReader(tmp_path / "foreign.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="junk.parquet.*not a readable Parquet file"):
        SampleReader(tmp_path / "junk.parquet")
    with pytest.raises(DataError, match="no such sample file"):
        SampleReader(tmp_path / "absent.parquet")


def test_reader_finds_a_bad_row_in_a_file_written_by_someone_else(tmp_path, tiny_schema):
    """A file with our metadata but a NaN written by another tool is caught on read, with its row."""
    rows = tiny_rows(5)
    rows["dense_age"][4] = math.nan
    pq.write_table(pa.table(rows, schema=tiny_schema.arrow_schema()), tmp_path / "s.parquet")
    with pytest.raises(DataError, match=r"row 4, field 'dense_age'"):
        SampleReader(tmp_path / "s.parquet").read_all()


def test_schema_names_are_checked():
    with pytest.raises(ValueError, match="lower-case"):
        SampleSchema(sequences=("Liked",))
    with pytest.raises(ValueError, match="duplicate"):
        SampleSchema(dense=("a", "a"))


texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.lists(
        st.tuples(st.integers(0, 1), st.integers(-(2**62), 2**62), st.lists(st.integers(0, 2**40), max_size=3),
                  st.floats(allow_nan=False, allow_infinity=False, width=32), texts, st.lists(texts, max_size=4)),
        min_size=1, max_size=20,
    )
)
def test_any_valid_rows_round_trip(tmp_path, tiny_schema, data):
    """Property: any valid rows (unicode text, empty lists, extreme ids) read back exactly."""
    rows = {
        "label": [d[0] for d in data], "timestamp": [d[1] for d in data], "user_id": [d[1] for d in data],
        "item_id": [0 for _ in data], "cat_genre": [d[2] for d in data], "dense_age": [d[3] for d in data],
        "item_text": [d[4] for d in data], "seq_liked": [d[5] for d in data], "seq_disliked": [d[5][::-1] for d in data],
    }
    target = tmp_path / "p.parquet"
    with SampleWriter(target, tiny_schema) as writer:
        writer.write(rows)
    assert SampleReader(target).read_all().to_pydict() == pa.table(rows, schema=tiny_schema.arrow_schema()).to_pydict()
