"""Sample files another tool wrote, and `bahe-data` outputs that cannot be written: a duplicated column,
invalid UTF-8, a column of another Arrow type than the schema's, a negative id in a training split, an
`--out` that names a folder or a file, a full disk. Each is refused in one line naming the file, row,
field or flag, and nothing is written, lost or left half-done. docs/faults.md lists each with its test.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bahe.ctr_data import cli as data_cli
from bahe.ctr_data.criteo import write_criteo_splits
from bahe.ctr_data.parquet_io import SampleReader, SampleWriteError, SampleWriter
from bahe.ctr_data.schema import DataError, SampleSchema
from bahe.embeddings.vocabulary import count_texts
from bahe.model.batch import SampleBatcher
from bahe.training.data import batches, eval_batches
from tests.conftest import CRITEO_SAMPLE, tiny_rows
from tests.test_write_failures import file_size_limit

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def foreign_file(path: Path, schema: SampleSchema, n: int = 6, *, replace: dict | None = None,
                 duplicate: str | None = None) -> Path:
    """A file with our metadata written by pyarrow directly (as another tool would): ``replace`` swaps
    columns for other Arrow arrays, ``duplicate`` appends a second copy of a column."""
    table = pa.table(tiny_rows(n), schema=schema.arrow_schema())
    for name, array in (replace or {}).items():
        table = table.set_column(table.schema.get_field_index(name), name, array)
    if duplicate is not None:
        table = table.append_column(duplicate, table.column(duplicate))
    pq.write_table(table.replace_schema_metadata(schema.arrow_schema().metadata), path)
    return path


def invalid_utf8(texts: list[bytes]) -> pa.Array:
    """Bytes declared as string without UTF-8 validation (what a careless writer produces)."""
    return pa.array(texts, pa.binary()).view(pa.string())


def one_error_line(err: str, prefix: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in err, err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".partial" in p.name)


# A duplicated column: every reader gets a DataError, not pyarrow's KeyError ---------------------------------
def test_duplicated_column_is_refused_by_the_reader_and_bahe_data_summary(tmp_path, tiny_schema, capsys):
    path = foreign_file(tmp_path / "dup.parquet", tiny_schema, duplicate="user_id")
    with pytest.raises(DataError, match=r"field 'user_id': column\(s\) \['user_id'\] appear more than once"):
        SampleReader(path)
    with pytest.raises(DataError, match="appear more than once"):
        count_texts([path])  # what bahe-encode build reads its --data with
    assert data_cli.main(["summary", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err, "bahe-data: error: ")
    assert f"file {path}, field 'user_id'" in line


def test_duplicated_column_stops_bahe_encode_build_in_one_line(tmp_path, tiny_schema, capsys):
    """bahe-encode build reads its --data with SampleReader (count_texts): exit 2, no store version."""
    from bahe.embeddings.cli import main
    from tests.llm_fixtures import make_tiny_llama

    path = foreign_file(tmp_path / "dup.parquet", tiny_schema, duplicate="item_text")
    store = tmp_path / "store"
    argv = ["build", "--store", str(store), "--data", str(path), "--model", str(make_tiny_llama(tmp_path / "llm")),
            "--k", "2", "--device", "cpu", "--batch-tokens", "64", "--quiet"]
    capsys.readouterr()  # the model's save progress
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err, "bahe-encode: error: ")
    assert f"file {path}, field 'item_text': column(s) ['item_text'] appear more than once" in line
    assert not store.exists() or not any(p.name.startswith("v") or p.name == "LATEST" for p in store.iterdir())


def test_duplicated_column_is_refused_on_write_and_nothing_appears(tmp_path, tiny_schema):
    table = pa.table(tiny_rows(3), schema=tiny_schema.arrow_schema())
    table = table.append_column("label", table.column("label"))
    with pytest.raises(DataError, match=r"field 'label': column\(s\) \['label'\] appear more than once"), \
            SampleWriter(tmp_path / "s.parquet", tiny_schema) as writer:
        writer.write(table)
    assert list(tmp_path.iterdir()) == []


def test_duplicated_column_in_a_split_stops_bahe_train_in_one_line(tmp_path, tiny_schema, capsys, one_rank):
    from bahe.launchers.train import main

    data = tmp_path / "data"
    data.mkdir()
    for split in ("valid", "test"):
        with SampleWriter(data / f"{split}.parquet", tiny_schema) as writer:
            writer.write(tiny_rows(8))
    foreign_file(data / "train.parquet", tiny_schema, 8, duplicate="seq_liked")
    assert main(["--out", str(tmp_path / "run"), "--data-dir", str(data), "--arm", "dlrm", "--steps", "1"]) == 2
    line = one_error_line(capsys.readouterr().err, "bahe-train: error: ")
    assert f"file {data / 'train.parquet'}, field 'seq_liked'" in line and "appear more than once" in line
    run = tmp_path / "run"  # no run state (a lock file may exist)
    assert not any((run / name).exists() for name in ("checkpoints", "tensorboard", "metrics.json"))


# Invalid UTF-8: named by file, row and field --------------------------------------------------------------
@pytest.mark.parametrize(("column", "array", "row", "where"), [
    ("item_text", invalid_utf8([b"a", b"b", b"c", b"d", b"bad \xff byte", b"f"]), 4, "text is not valid UTF-8"),
    ("seq_liked", pa.ListArray.from_arrays(pa.array([0, 0, 1, 3, 4, 4, 5]),
                                           invalid_utf8([b"x", b"y", b"\xc3(", b"z", b"w"])), 2,
     "text (element 1 of the list) is not valid UTF-8"),
], ids=["item-text", "inside-a-sequence"])
@pytest.mark.parametrize("batch_size", [1, 4, 65_536])
def test_invalid_utf8_is_named_by_file_row_and_field(tmp_path, tiny_schema, column, array, row, where, batch_size):
    """Before: pyarrow read such a file without a word, and the first .to_pylist() raised a bare
    UnicodeDecodeError naming no file, row or field."""
    path = foreign_file(tmp_path / "u.parquet", tiny_schema, replace={column: array})
    with pytest.raises(DataError) as info:
        list(SampleReader(path).iter_batches(batch_size=batch_size))
    assert (info.value.path, info.value.row, info.value.field) == (path, row, column)
    assert where in str(info.value) and "write texts as UTF-8" in str(info.value)


def test_invalid_utf8_through_bahe_data_summary_and_the_writer(tmp_path, tiny_schema, capsys):
    bad = invalid_utf8([b"a", b"b", b"\xff", b"d"])
    path = foreign_file(tmp_path / "u.parquet", tiny_schema, 4, replace={"item_text": bad})
    assert data_cli.main(["summary", str(path)]) == 2
    line = one_error_line(capsys.readouterr().err, "bahe-data: error: ")
    assert f"file {path}, row 2, field 'item_text': text is not valid UTF-8: b'\\xff'" in line
    table = pa.table(tiny_rows(4), schema=tiny_schema.arrow_schema()).set_column(6, "item_text", bad)
    with pytest.raises(DataError, match=r"row 2, field 'item_text': text is not valid UTF-8"), \
            SampleWriter(tmp_path / "out" / "w.parquet", tiny_schema) as writer:
        writer.write(table)
    assert list((tmp_path / "out").iterdir()) == []


# A column of another Arrow type: refused, not cast --------------------------------------------------------
@pytest.mark.parametrize(("column", "array", "found", "expected"), [
    ("item_text", pa.array([1, 2, 3, 4, 5, 6]), "int64", "string"),
    ("seq_liked", pa.array([[1], [], [2, 3], [], [4], []]), "list<element: int64>", "list<item: string>"),
    ("dense_age", pa.array([1.0] * 6, pa.float64()), "double", "float"),
    ("user_id", pa.array(range(6), pa.int32()), "int32", "int64"),
    ("cat_genre", pa.array([[1]] * 6, pa.list_(pa.int32())), "list<element: int32>", "list<item: int64>"),
    ("item_text", pa.array(["a"] * 6, pa.large_string()), "large_string", "string"),
], ids=["item-text-int", "sequence-of-ints", "dense-float64", "id-int32", "categorical-int32", "large-string"])
def test_column_of_another_type_than_the_schemas_is_refused(tmp_path, tiny_schema, column, array, found, expected):
    """Before: SampleReader cast them (an int item_text read as the text '1'), though SampleWriter
    refuses such values; now a file holds exactly the writer's types or is refused by name."""
    path = foreign_file(tmp_path / "t.parquet", tiny_schema, replace={column: array})
    with pytest.raises(DataError) as info:
        SampleReader(path)
    assert (info.value.path, info.value.row, info.value.field) == (path, None, column)
    assert f"found type {found}, expected {expected}" in str(info.value)


def test_files_the_writer_wrote_keep_reading(tmp_path, tiny_schema):
    """Parquet names list items 'element', Arrow 'item': the type check compares value types only."""
    with SampleWriter(tmp_path / "s.parquet", tiny_schema) as writer:
        writer.write(tiny_rows(5))
    assert pq.ParquetFile(tmp_path / "s.parquet").schema_arrow.field("seq_liked").type.value_field.name == "element"
    assert SampleReader(tmp_path / "s.parquet").read_all().num_rows == 5


# A negative id in a training split: named by the file and its row, before shuffling -----------------------
@pytest.mark.parametrize(("column", "value", "expect"), [
    ("user_id", -3, "found -3"),
    ("cat_genre", [4, -7], "found -7"),
], ids=["user-id", "inside-a-categorical-list"])
@pytest.mark.parametrize("split", ["train", "eval"])
def test_negative_id_in_a_split_names_the_file_and_its_row(tmp_path, tiny_schema, column, value, expect, split):
    """Before: the batcher named "row 2 of the batch" of a shuffled batch, not where it is in the file."""
    rows = tiny_rows(40)
    rows[column][29] = value
    path = tmp_path / "train.parquet"
    with SampleWriter(path, tiny_schema, row_group_size=8) as writer:  # valid in a file: raw int64 ids
        writer.write(rows)
    batcher = SampleBatcher(tiny_schema, {"user_id": 100, "item_id": 100, "cat_genre": 10})
    stream = batches(path, batcher, 4, 0, 2, seed=1) if split == "train" \
        else eval_batches(path, batcher, 4, 0, 2)
    with pytest.raises(DataError) as info:
        for _ in range(20):
            next(stream)
    assert (info.value.path, info.value.row, info.value.field) == (path, 29, column)
    assert expect in str(info.value) and "map negative ids to non-negative ones" in str(info.value)


def test_negative_id_in_a_feature_the_batcher_does_not_read_is_not_refused(tmp_path, tiny_schema):
    rows = tiny_rows(8)
    rows["cat_genre"][3] = [-1]
    with SampleWriter(tmp_path / "s.parquet", tiny_schema) as writer:
        writer.write(rows)
    batcher = SampleBatcher(tiny_schema, {"user_id": 100, "item_id": 100})  # cat_genre dropped
    assert next(batches(tmp_path / "s.parquet", batcher, 4, 0, 1)).labels.shape == (4,)
    with pytest.raises(ValueError, match=r"nonnegative_ids \['label'\] are not ID columns"):
        SampleReader(tmp_path / "s.parquet", nonnegative_ids=["label"])


# `bahe-data --out`: a folder where a file goes, a file where a folder goes ----------------------------------
@pytest.mark.parametrize("argv", [
    ["synthetic", "--samples", "50", "--users", "20", "--items", "20"],
    ["criteo", str(CRITEO_SAMPLE)],
], ids=["synthetic", "criteo"])
def test_bahe_data_out_naming_a_folder_is_refused_in_one_line(tmp_path, capsys, argv):
    """Before: a traceback (IsADirectoryError) and a `.NAME.partial-PID` left beside the folder each time."""
    out = tmp_path / "existing"
    (out / "keep").mkdir(parents=True)
    assert data_cli.main([*argv, "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "bahe-data: error: ")
    assert f"--out {out} is a folder; {argv[0]} writes one .parquet file" in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["existing", "keep"]


def test_bahe_data_movielens_out_naming_a_file_is_refused_and_the_file_kept(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    assert data_cli.main(["movielens", "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "bahe-data: error: ")
    assert f"--out {out} is a file; movielens writes train/valid/test.parquet into a folder" in line
    assert out.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_bahe_data_out_under_a_file_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "s.parquet"
    assert data_cli.main(["synthetic", "--samples", "50", "--users", "20", "--items", "20", "--out", str(target)]) == 2
    line = one_error_line(capsys.readouterr().err, "bahe-data: error: ")
    assert f"cannot write sample file {target}: {tmp_path / 'afile'} is a file, not a folder" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_bahe_data_out_naming_an_existing_file_replaces_it_whole(tmp_path, capsys):
    """Documented: an existing output file is replaced, once the new one is complete."""
    out = tmp_path / "s.parquet"
    flags = ["synthetic", "--users", "20", "--items", "20", "--out", str(out)]
    assert data_cli.main([*flags, "--samples", "50"]) == 0
    assert data_cli.main([*flags, "--samples", "70"]) == 0
    capsys.readouterr()
    assert SampleReader(out).num_rows == 70 and [p.name for p in tmp_path.iterdir()] == ["s.parquet"]


def test_sample_writer_to_a_folder_leaves_no_partial_file(tmp_path, tiny_schema):
    (tmp_path / "d").mkdir()
    with pytest.raises(SampleWriteError, match="it is a folder; name a .parquet file"):
        SampleWriter(tmp_path / "d", tiny_schema)
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


# A full disk while bahe-data writes -------------------------------------------------------------------------
@pytest.mark.parametrize("older", [True, False], ids=["older-file-kept", "no-file-before"])
def test_bahe_data_on_a_full_disk_fails_in_one_line_and_leaves_no_partial_file(tmp_path, older):
    """RLIMIT_FSIZE in a subprocess: writes past 20,000 bytes fail with EFBIG, as on a full disk (ENOSPC).
    Before: a traceback, and `.s.parquet.partial-PID` left behind."""
    out = tmp_path / "s.parquet"
    cmd = [sys.executable, "-m", "bahe.ctr_data.cli", "synthetic", "--users", "20", "--items", "20", "--out", str(out)]
    if older:
        subprocess.run([*cmd, "--samples", "100"], cwd=ROOT, env=ENV, check=True, capture_output=True)
        before = out.read_bytes()
    failed = subprocess.run([*cmd, "--samples", "3000"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=120, preexec_fn=file_size_limit(20_000))
    assert failed.returncode == 2, failed.stderr[-3000:]
    line = one_error_line(failed.stderr, "bahe-data: error: ")
    assert f"cannot write sample file {out}: File too large (EFBIG); no partial file is left" in line
    if older:
        assert "the older file there is intact" in line and out.read_bytes() == before
        assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]
    else:
        assert "nothing was written there" in line and list(tmp_path.iterdir()) == []


def test_splits_appear_together_or_not_at_all(tmp_path, monkeypatch):
    """A full disk while the last split is finished (ENOSPC on its footer): none of the older splits
    is replaced, and no partial file is left."""
    out = tmp_path / "out"
    older = {name: path.read_bytes() for name, path in write_criteo_splits([CRITEO_SAMPLE], out).items()}
    real_close = pq.ParquetWriter.close

    def close(self):
        if ".test.parquet.partial" in str(self.where):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_close(self)

    monkeypatch.setattr(pq.ParquetWriter, "close", close)
    with pytest.raises(SampleWriteError, match=r"test.parquet: No space left on device \(ENOSPC\)"):
        write_criteo_splits([CRITEO_SAMPLE, CRITEO_SAMPLE], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {f"{n}.parquet": b for n, b in older.items()}
