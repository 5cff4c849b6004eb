"""Tests of bahe.ctr_data.criteo: Criteo DLRM-format TSV -> BAHE sample Parquet.

Protected behaviour:
* the real 115-row sample converts, and every field of every row equals an independent plain
  Python parse (int(x), int(h, 16), missing -> 0.0 / []);
* the values agree with torchrec's own Criteo parsing (raw row mapper and BinaryCriteoUtils.tsv_to_npys);
* conversion streams (several tables, continuous timestamps) and concatenates day files;
* every kind of bad input raises a DataError naming the file, the row and the field, and leaves
  no output file behind;
* random valid rows round-trip (hypothesis).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bahe.ctr_data.criteo import FIELD_NAMES, convert_criteo_tsv, criteo_schema, iter_criteo_tsv
from bahe.ctr_data.parquet_io import SampleReader
from bahe.ctr_data.schema import DataError, SampleSchema
from tests.conftest import CRITEO_SAMPLE as SAMPLE


# Independent reference: plain Python, one line at a time -------------------------------------------
def reference_rows(lines: list[str], first_timestamp: int = 0) -> list[dict]:
    rows = []
    for r, line in enumerate(lines):
        fields = line.split("\t")
        assert len(fields) == 40
        row = {"label": int(fields[0]), "timestamp": first_timestamp + r, "user_id": 0, "item_id": 0}
        for k in range(26):
            h = fields[14 + k]
            row[f"cat_c{k + 1}"] = [int(h, 16)] if h else []
        for k in range(13):
            x = fields[1 + k]
            row[f"dense_i{k + 1}"] = float(np.float32(int(x))) if x else 0.0
        row["item_text"] = ""
        rows.append(row)
    return rows


def sample_lines() -> list[str]:
    return SAMPLE.read_text().splitlines()


def write_tsv(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# The real sample ---------------------------------------------------------------------------------
def test_schema_has_criteo_features_and_no_sequences():
    schema = criteo_schema()
    assert schema == SampleSchema(
        categorical=tuple(f"c{i}" for i in range(1, 27)),
        dense=tuple(f"i{i}" for i in range(1, 14)),
        sequences=(),
        dataset="criteo",
    )
    assert schema.sequence_columns == []
    # error messages use Criteo's own field names, in file order
    assert len(FIELD_NAMES) == 40 and (FIELD_NAMES[0], FIELD_NAMES[5], FIELD_NAMES[25]) == ("label", "I5", "C12")


def test_real_sample_converts_and_matches_python_reference(tmp_path):
    out = tmp_path / "criteo.parquet"
    assert convert_criteo_tsv([SAMPLE], out) == 115
    reader = SampleReader(out)
    assert reader.schema == criteo_schema() and reader.num_rows == 115
    got = reader.read_all().to_pylist()
    lines = sample_lines()
    assert [row["label"] for row in got] == [int(line.split("\t")[0]) for line in lines]
    assert got == reference_rows(lines)
    # the sample exercises the edge cases: negative dense values kept raw, missing values of both kinds
    assert any(row["dense_i2"] < 0 for row in got)
    assert any(line.split("\t")[1 + 11] == "" for line in lines) and any(row["cat_c22"] == [] for row in got)


def test_agrees_with_torchrec_criteo_parsing(tmp_path):
    from torchrec.datasets import criteo
    table = pa.concat_tables(list(iter_criteo_tsv(SAMPLE)))
    dense = np.stack([table.column(f"dense_i{k}").to_numpy() for k in range(1, 14)], axis=1)
    sparse = np.stack([[v[0] if v else 0 for v in table.column(f"cat_c{k}").to_pylist()] for k in range(1, 27)], axis=1)
    labels = table.column("label").to_numpy()

    # 1. torchrec's streaming datapipe with its default row mapper: raw ints, missing -> 0, hex strings.
    rows = list(criteo.criteo_kaggle(str(SAMPLE)))
    assert len(rows) == 115
    assert labels.tolist() == [row["label"] for row in rows]
    assert dense.tolist() == [[float(row[f"int_{k}"]) for k in range(13)] for row in rows]
    assert sparse.tolist() == [[int(row[f"cat_{k}"] or "0", 16) for k in range(26)] for row in rows]

    # 2. BinaryCriteoUtils.tsv_to_npys (DLRM preprocessing): sparse int(h, 16) with missing -> 0;
    #    dense log(x - min + 2) with the minimum over the whole file, which we re-apply to our raw values.
    files = [tmp_path / f"{name}.npy" for name in ("dense", "sparse", "labels")]
    criteo.BinaryCriteoUtils.tsv_to_npys(str(SAMPLE), *map(str, files))
    t_dense, t_sparse, t_labels = (np.load(f) for f in files)
    assert np.array_equal(t_labels.ravel(), labels)
    assert np.array_equal(t_sparse, sparse)
    raw = dense.astype(np.int64)
    np.testing.assert_allclose(np.log(raw - raw.min() + 2, dtype=np.float32), t_dense, rtol=1e-6)


# Streaming and concatenation ---------------------------------------------------------------------
def test_small_blocks_stream_several_tables_with_continuous_timestamps():
    tables = list(iter_criteo_tsv(SAMPLE, block_size=2048))
    assert len(tables) > 3
    for table in tables:
        assert table.schema.equals(criteo_schema().arrow_schema(), check_metadata=True)
    timestamps = [ts for table in tables for ts in table.column("timestamp").to_pylist()]
    assert timestamps == list(range(115))
    assert pa.concat_tables(tables).equals(pa.concat_tables(list(iter_criteo_tsv(SAMPLE))))


def test_two_files_concatenate_and_timestamps_continue(tmp_path):
    lines = sample_lines()
    day0, day1 = write_tsv(tmp_path / "day_0", lines[:70]), write_tsv(tmp_path / "day_1", lines[70:])
    out = tmp_path / "days.parquet"
    assert convert_criteo_tsv([day0, day1], out, block_size=4096) == 115
    assert SampleReader(out).read_all().to_pylist() == reference_rows(lines)


def test_empty_file_gives_no_rows(tmp_path):
    empty = write_tsv(tmp_path / "empty.tsv", [])
    assert list(iter_criteo_tsv(empty)) == []
    out = tmp_path / "empty.parquet"
    assert convert_criteo_tsv([empty], out) == 0 and SampleReader(out).num_rows == 0


# Bad input ---------------------------------------------------------------------------------------
GOOD = "\t".join(["1"] + [str(i) for i in range(13)] + [f"{i:08x}" for i in range(26)])


def _with_field(index: int, value: str) -> str:
    fields = GOOD.split("\t")
    fields[index] = value
    return "\t".join(fields)


BAD_ROWS = {
    "too few columns": ("\t".join(GOOD.split("\t")[:39]), "C26"),
    "too many columns": (GOOD + "\t", "C26"),
    "non-integer dense": (_with_field(5, "1.5"), "I5"),
    "word in dense": (_with_field(13, "abc"), "I13"),
    "dense beyond int64": (_with_field(3, "99999999999999999999"), "I3"),
    "non-hex categorical": (_with_field(1 + 13 + 12 - 1, "zz12ab"), "C12"),
    "categorical over 32 bits": (_with_field(1 + 13, "123456789"), "C1"),
    "prefixed categorical": (_with_field(1 + 13 + 25, "0x1f"), "C26"),
    "bad label": (_with_field(0, "2"), "label"),
    "empty label": (_with_field(0, ""), "label"),
    "empty line": ("", "label"),
}


@pytest.mark.parametrize("bad_row", [0, 1, 57, 199])
@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_input_names_file_row_field_and_writes_nothing(tmp_path, case, bad_row):
    bad_line, field = BAD_ROWS[case]
    lines = [GOOD] * 200
    lines[bad_row] = bad_line
    tsv = write_tsv(tmp_path / "day_bad.tsv", lines)
    out = tmp_path / "out" / "criteo.parquet"
    with pytest.raises(DataError) as info:
        convert_criteo_tsv([tsv], out, block_size=1024)  # many blocks: the row count must span them
    err = info.value
    assert (err.path, err.row, err.field) == (tsv, bad_row, field)
    message = str(err)
    assert str(tsv) in message and f"row {bad_row}" in message and repr(field) in message
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_invalid_utf8_is_located(tmp_path):
    tsv = tmp_path / "day_bytes.tsv"
    tsv.write_bytes(b"".join([GOOD.encode() + b"\n"] * 5 + [b"\xff" + GOOD.encode()[1:] + b"\n"]))
    with pytest.raises(DataError, match=r"row 5.*UTF-8"):
        list(iter_criteo_tsv(tsv))


def test_error_in_second_file_names_that_file_and_its_own_row(tmp_path):
    good = write_tsv(tmp_path / "day_0.tsv", [GOOD] * 30)
    bad = write_tsv(tmp_path / "day_1.tsv", [GOOD] * 7 + [_with_field(9, "x")] + [GOOD] * 3)
    out = tmp_path / "both.parquet"
    with pytest.raises(DataError) as info:
        convert_criteo_tsv([good, bad], out)
    assert (info.value.path, info.value.row, info.value.field) == (bad, 7, "I9")
    assert not out.exists()


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such"):
        list(iter_criteo_tsv(tmp_path / "nope.tsv"))


# Property: random valid rows round-trip ----------------------------------------------------------
maybe_int = st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1))
maybe_hex = st.one_of(
    st.none(),
    st.tuples(st.integers(0, 2**32 - 1), st.sampled_from(["{:08x}", "{:08X}", "{:x}", "{:X}"])).map(
        lambda vf: vf[1].format(vf[0])
    ),
)
criteo_row = st.tuples(
    st.integers(0, 1), st.lists(maybe_int, min_size=13, max_size=13), st.lists(maybe_hex, min_size=26, max_size=26)
)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(criteo_row, min_size=1, max_size=60),
    block_size=st.integers(256, 8192),
    first_timestamp=st.integers(0, 10**9),
)
def test_random_valid_rows_round_trip(rows, block_size, first_timestamp):
    lines = [
        "\t".join([str(label)] + ["" if x is None else str(x) for x in dense] + [h or "" for h in cats])
        for label, dense, cats in rows
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tsv = write_tsv(Path(tmp) / "random.tsv", lines)
        tables = list(iter_criteo_tsv(tsv, block_size=block_size, first_timestamp=first_timestamp))
    got = pa.concat_tables(tables).to_pylist()
    assert got == reference_rows(lines, first_timestamp)
