"""Convert Criteo click logs in DLRM's TSV day format into BAHE sample files.

Input format (Criteo 1TB day files, the Kaggle challenge ``train.txt``): one impression per line,
no header, 40 tab-separated fields -- the click label, 13 integer features ``I1..I13`` and 26
categorical features ``C1..C26`` written as hexadecimal hashes (8 digits in practice). An empty
field is a missing value. A day file is ordered by time.

Mapping onto :mod:`bahe.ctr_data.schema` (``criteo_schema()``: categorical ``c1..c26``, dense
``i1..i13``, no sequences, dataset ``"criteo"``):

====================  =========================================================================
column                value
====================  =========================================================================
``label``             field 0 as int8; must be ``0`` or ``1`` (an empty label is an error)
``timestamp``         the 0-based row index; Criteo has no event times, but its files are in time
                      order. Over several files (:func:`convert_criteo_tsv`) the count continues,
                      so day 1 starts where day 0 ended
``user_id``           always 0: Criteo has no user id; the model relies on the 26 categoricals
``item_id``           always 0: Criteo has no item id either
``dense_i1..i13``     the raw integer as float32; missing -> 0 (the DLRM convention). Negative
                      values (``I2`` has some) are kept as they are: clamping and the
                      ``log(1 + x)`` transform belong to the model, not to the data file
``cat_c1..c26``       the hex string read as an unsigned 32-bit integer, as a one-element list;
                      missing -> the empty list (not 0, so "missing" stays distinguishable)
``item_text``         ``""``: Criteo has no text, and the schema has zero behaviour sequences
====================  =========================================================================

The reader streams: :func:`iter_criteo_tsv` parses ``block_size`` bytes at a time with
:func:`pyarrow.csv.open_csv` (every column read as a string) and converts each block with vectorised
:mod:`pyarrow.compute` kernels, so a 50M-row day file is never in memory at once and no Python loop
runs per row. Only when a block is bad does slower code run, to find and name the first bad row.

Bad input raises :class:`~bahe.ctr_data.schema.DataError` naming the TSV file, the 0-based data row in
that file and the field (``"label"``, ``"I5"``, ``"C12"``): a line without exactly 40 fields, a
non-integer in an integer column, a categorical that is not 1-8 hex digits, a label other than
0/1 or an empty label. :func:`convert_criteo_tsv` writes through
:class:`~bahe.ctr_data.parquet_io.SampleWriter`, so after an error no output file exists.

Example::

    from bahe.ctr_data.criteo import convert_criteo_tsv
    rows = convert_criteo_tsv(["day_0.tsv", "day_1.tsv"], "criteo_days_0_1.parquet")
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from bahe.ctr_data.parquet_io import SampleWriter, publish_together
from bahe.ctr_data.schema import DataError, SampleSchema

NUM_DENSE = 13
NUM_CATEGORICAL = 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_CATEGORICAL
DEFAULT_BLOCK_SIZE = 16 << 20  # bytes of TSV parsed per block (about 70k Criteo rows)

#: Criteo's own field names, in file order; used in error messages.
FIELD_NAMES: tuple[str, ...] = (
    ("label",) + tuple(f"I{i}" for i in range(1, NUM_DENSE + 1)) + tuple(f"C{i}" for i in range(1, NUM_CATEGORICAL + 1))
)

_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)
_INT_PATTERN = r"^-?[0-9]+$"  # what Arrow's string -> int64 cast accepts (plus the int64 range)
_HEX_PATTERN = r"^[0-9a-fA-F]{1,8}$"  # an unsigned 32-bit hex number, no prefix


def criteo_schema() -> SampleSchema:
    """The sample schema of converted Criteo data: ``cat_c1..cat_c26``, ``dense_i1..dense_i13``."""
    return SampleSchema(
        categorical=tuple(f"c{i}" for i in range(1, NUM_CATEGORICAL + 1)),
        dense=tuple(f"i{i}" for i in range(1, NUM_DENSE + 1)),
        sequences=(),
        dataset="criteo",
    )


# Error path helpers -------------------------------------------------------------------------------
def _first_true(mask: pa.Array) -> int | None:
    hits = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
    return int(hits[0]) if len(hits) else None


def _first_bad(values: pa.Array, pattern: str, target: pa.DataType, prefix: str = "") -> int:
    """Index of the first value in ``values`` that does not parse (only called once a cast failed)."""
    row = _first_true(pc.invert(pc.match_substring_regex(values, pattern)))
    if row is not None:
        return row
    for i in range(len(values)):  # matched the pattern but still failed, e.g. out of the int64 range
        try:
            pa.array([prefix + values[i].as_py()]).cast(target)
        except _ARROW_ERRORS:
            return i
    return 0


def _locate_parse_error(path: Path, rows_done: int, err: Exception) -> DataError:
    """Find the line pyarrow's CSV parser stumbled on (its message names no row) by scanning the file.

    Lines map 1:1 to rows (no quoting, no newlines inside fields). Only runs on the error path;
    lines before ``rows_done`` were parsed fine already and are only counted.
    """
    with open(path, "rb") as fh:
        for row, raw in enumerate(fh):
            if row < rows_done:
                continue
            line = raw.rstrip(b"\r\n")
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                return DataError(f"line is not valid UTF-8 ({bad})", path=path, row=row)
            if not line:
                return DataError("empty line", path=path, row=row, field=FIELD_NAMES[0])
            fields = line.count(b"\t") + 1
            if fields < NUM_FIELDS:
                return DataError(
                    f"expected {NUM_FIELDS} tab-separated fields (label, I1..I13, C1..C26), got {fields}: "
                    f"{FIELD_NAMES[fields]} and later fields are absent",
                    path=path,
                    row=row,
                    field=FIELD_NAMES[fields],
                )
            if fields > NUM_FIELDS:
                return DataError(
                    f"expected {NUM_FIELDS} tab-separated fields (label, I1..I13, C1..C26), got {fields}: "
                    f"extra field(s) after {FIELD_NAMES[-1]}",
                    path=path,
                    row=row,
                    field=FIELD_NAMES[-1],
                )
    return DataError(f"unreadable TSV ({err})", path=path)


# Per-block conversion ----------------------------------------------------------------------------
def _convert_label(col: pa.Array, path: Path, row0: int, batch: pa.RecordBatch) -> pa.Array:
    ok = pc.is_in(col, value_set=pa.array(["0", "1"]))
    if not pc.all(ok).as_py():
        i = _first_true(pc.invert(ok))
        value = col[i].as_py()
        if value == "":
            empty_line = all(batch.column(j)[i].as_py() == "" for j in range(batch.num_columns))
            what = "empty line" if empty_line else "empty label (every row needs a click label 0 or 1)"
            raise DataError(what, path=path, row=row0 + i, field="label")
        raise DataError(f"label must be 0 or 1, got {value!r}", path=path, row=row0 + i, field="label")
    return pc.cast(pc.equal(col, "1"), pa.int8())


def _convert_dense(col: pa.Array, name: str, path: Path, row0: int) -> pa.Array:
    filled = pc.if_else(pc.equal(col, ""), "0", col)
    try:
        ints = pc.cast(filled, pa.int64())
    except _ARROW_ERRORS:
        i = _first_bad(filled, _INT_PATTERN, pa.int64())
        raise DataError(f"not an integer (int64): {col[i].as_py()!r}", path=path, row=row0 + i, field=name) from None
    # float32 cannot hold every integer above 2**24 exactly; round like float(x) does (safe=False).
    return pc.cast(ints, pa.float32(), safe=False)


def _convert_categorical(col: pa.Array, name: str, path: Path, row0: int) -> pa.Array:
    present = pc.not_equal(col, "")
    mask = present.to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(col) + 1, dtype=np.int32)
    np.cumsum(mask, out=offsets[1:])
    hexes = pc.filter(col, present)
    try:
        # Arrow parses "0x"-prefixed hex; a value that already has a prefix ("0x0x1f") fails.
        values = pc.cast(pc.cast(pc.utf8_replace_slice(hexes, 0, 0, "0x"), pa.uint32()), pa.int64())
    except _ARROW_ERRORS:
        j = _first_bad(hexes, _HEX_PATTERN, pa.uint32(), prefix="0x")
        i = int(np.flatnonzero(mask)[j])
        raise DataError(
            f"not a hexadecimal id of 1-8 digits: {col[i].as_py()!r}", path=path, row=row0 + i, field=name
        ) from None
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _convert_block(batch: pa.RecordBatch, schema: SampleSchema, path: Path, row0: int, ts0: int) -> pa.Table:
    n = batch.num_rows
    label = _convert_label(batch.column(0), path, row0, batch)
    zeros = pa.array(np.zeros(n, dtype=np.int64))
    columns = [label, pa.array(np.arange(ts0, ts0 + n, dtype=np.int64)), zeros, zeros]
    columns += [
        _convert_categorical(batch.column(1 + NUM_DENSE + k), FIELD_NAMES[1 + NUM_DENSE + k], path, row0)
        for k in range(NUM_CATEGORICAL)
    ]
    columns += [_convert_dense(batch.column(1 + k), FIELD_NAMES[1 + k], path, row0) for k in range(NUM_DENSE)]
    columns.append(pa.repeat(pa.scalar("", pa.string()), n))
    return pa.Table.from_arrays(columns, schema=schema.arrow_schema())


# Public API --------------------------------------------------------------------------------------
def iter_criteo_tsv(
    path: str | os.PathLike, *, block_size: int = DEFAULT_BLOCK_SIZE, first_timestamp: int = 0
) -> Iterator[pa.Table]:
    """Stream one Criteo TSV file as tables in the :func:`criteo_schema` layout, in file order.

    Args:
        path: a Criteo TSV file (DLRM day format, see the module docstring).
        block_size: bytes of TSV parsed per table (pyarrow's block size); smaller means more,
            smaller tables. A table holds the whole lines that fit in one block.
        first_timestamp: the timestamp of the file's first row (row ``r`` gets
            ``first_timestamp + r``); :func:`convert_criteo_tsv` uses it to continue across files.

    Yields:
        :class:`pyarrow.Table` objects with exactly ``criteo_schema().arrow_schema()``.

    Raises:
        DataError: naming the file, the 0-based row in it and the field, for the first bad row.
            Tables before the bad block have already been yielded.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("no such Criteo TSV file", path=path)
    schema = criteo_schema()
    names = [f"f{i}" for i in range(NUM_FIELDS)]  # pyarrow's autogenerated column names
    read_options = pcsv.ReadOptions(autogenerate_column_names=True, block_size=block_size)
    parse_options = pcsv.ParseOptions(delimiter="\t", quote_char=False, ignore_empty_lines=False)
    convert_options = pcsv.ConvertOptions(
        column_types={name: pa.string() for name in names}, strings_can_be_null=False, quoted_strings_can_be_null=False
    )
    rows_done = 0
    try:
        reader = pcsv.open_csv(
            path, read_options=read_options, parse_options=parse_options, convert_options=convert_options
        )
    except pa.ArrowInvalid as err:
        size = path.stat().st_size
        if size == 0:
            return
        if "Empty CSV file" not in str(err):
            raise _locate_parse_error(path, 0, err) from None
        # pyarrow found no line end in the first block: one line without a final newline, or a first
        # line longer than the block. Neither may be dropped silently.
        if size > block_size:
            raise DataError(f"no line end in the first {block_size} bytes: not a Criteo TSV file, or raise "
                            "block_size", path=path, row=0) from None
        try:
            reader = pcsv.open_csv(pa.BufferReader(path.read_bytes() + b"\n"), read_options=read_options,
                                   parse_options=parse_options, convert_options=convert_options)
        except pa.ArrowInvalid as again:
            raise _locate_parse_error(path, 0, again) from None
    try:
        if reader.schema.names != names:
            raise _locate_parse_error(path, 0, ValueError(f"{len(reader.schema)} columns"))
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except pa.ArrowInvalid as err:
                raise _locate_parse_error(path, rows_done, err) from None
            if batch.num_rows:
                yield _convert_block(batch, schema, path, rows_done, first_timestamp + rows_done)
            rows_done += batch.num_rows
    finally:
        reader.close()


def convert_criteo_tsv(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    row_group_size: int = 65_536,
) -> int:
    """Convert one or more Criteo TSV files, in the given order, into one sample Parquet file.

    Timestamps run on across files (the second file's first row follows the first file's last).
    The output appears under ``out_path`` only once every row converted; on any error nothing is
    left there (see :class:`~bahe.ctr_data.parquet_io.SampleWriter`).

    Args:
        paths: the TSV files, oldest first (e.g. ``["day_0", "day_1"]``); a single path is allowed.
        out_path: the Parquet file to write.
        block_size: bytes of TSV parsed at a time (memory use is a small multiple of it).
        row_group_size: rows per Parquet row group.

    Returns:
        The number of rows written.

    Raises:
        DataError: for bad input, naming the TSV file, its 0-based row and the field.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("convert_criteo_tsv: no input files given")
    with SampleWriter(out_path, criteo_schema(), row_group_size=row_group_size) as writer:
        for path in paths:
            for table in iter_criteo_tsv(path, block_size=block_size, first_timestamp=writer.rows_written):
                writer.write(table)
        return writer.rows_written


def _count_lines(path: Path) -> int:
    count, last = 0, b"\n"
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def write_criteo_splits(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                        block_size: int = DEFAULT_BLOCK_SIZE) -> dict[str, Path]:
    """Criteo TSV day files -> ``train/valid/test.parquet`` in ``out_dir``, in time order.

    Several days follow dlrm_main: every day but the last trains, and the last day's first half
    validates and its second half tests. A single file splits its rows 80% / 10% / 10% in order.
    Each file appears only once complete (see :func:`convert_criteo_tsv`).
    """
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise ValueError("write_criteo_splits: no input files given")
    for path in paths:
        if not path.is_file():
            raise DataError("no such Criteo TSV file", path=path)
    sizes = [_count_lines(p) for p in paths]
    total = sum(sizes)
    if len(paths) > 1:
        train_end = total - sizes[-1]
        valid_end = train_end + sizes[-1] // 2
    else:
        train_end, valid_end = int(total * 0.8), int(total * 0.9)
    if not 0 < train_end < valid_end < total:
        raise DataError(f"{total} rows cannot fill train, valid and test (each needs rows)", path=paths[-1])
    out_dir = Path(out_dir)  # each SampleWriter makes it, or names what is in the way
    bounds = {"train": (0, train_end), "valid": (train_end, valid_end), "test": (valid_end, total)}
    writers: dict[str, SampleWriter] = {}
    try:
        for name in bounds:
            writers[name] = SampleWriter(out_dir / f"{name}.parquet", criteo_schema())
        row = 0
        for path in paths:
            for table in iter_criteo_tsv(path, block_size=block_size, first_timestamp=row):
                for name, (lo, hi) in bounds.items():
                    start, stop = max(lo - row, 0), min(hi - row, table.num_rows)
                    if start < stop:
                        writers[name].write(table.slice(start, stop - start))
                row += table.num_rows
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return publish_together(writers)  # all three or none replace older splits there
