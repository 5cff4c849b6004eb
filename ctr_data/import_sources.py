"""Reading a team's own log files for ``bahe-data import`` (see :mod:`bahe.ctr_data.importer`): Parquet,
CSV and JSON lines, streamed in batches of rows, and the cell converters that turn their values into
sample values. A value that does not convert is refused with :class:`DataError` naming the file, the row
and the column.

Rows are counted from 0 in each file: Parquet rows; CSV records after the header (line R + 2 when no
line is empty); JSON lines: the line's index (line R + 1; empty lines are skipped but counted). A CSV
line with the wrong number of fields is named by its line number.

Values, by what they become (CSV cells are texts; an empty cell is a missing value, as is a JSON null or
absent key and a Parquet null):

* integer (ids, timestamps): an integer, an integral float (``3.0``) or its text (``"3"``); ids >= 0.
  A hashed id (``hash_ids``): any text or integer, hashed by its text (``7`` and ``"7"`` alike) with
  BLAKE2b into [0, 2**63): the same on every machine and run.
* label: 0 / 1, true / false (or their texts).
* dense: a finite number (or its text) within float32's range; missing -> the mapping's ``fill``, if any.
* categorical: a value or a list of values (a text split at ``sep``); an integer (or its text) >= 0 is kept,
  any other text hashed like an id; missing -> [] (the schema's "missing").
* texts (title, behaviour texts): texts; a list column is a list of texts or a text split at ``sep``;
  empty behaviour texts are dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from bahe.ctr_data.import_mapping import SPLITS, Source
from bahe.ctr_data.schema import DataError
from bahe.ctr_data.validation import _first_invalid_utf8

_INT64 = (-(2 ** 63), 2 ** 63 - 1)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_CSV_BLOCK = 1 << 20  # bytes of CSV parsed at a time


@dataclass
class RawBatch:
    """Rows of one file: each needed column's Python values, and each row's number in the file."""

    path: Path
    rows: Sequence[int]
    columns: dict[str, list]

    def __len__(self) -> int:
        return len(self.rows)

    def fail(self, index: int, column: str, message: str) -> DataError:
        return DataError(message, path=self.path, row=self.rows[index], field=column)


def hash_text(text: str) -> int:
    """A stable id in [0, 2**63) for a text: BLAKE2b, not Python's salted hash()."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") & _INT64[1]


# Readers --------------------------------------------------------------------------------------------------

def read_batches(source: Source, columns: Sequence[str], batch_rows: int, required: Sequence[str] = ()
                 ) -> Iterator[RawBatch]:
    """The rows of ``source``'s files, in order, ``batch_rows`` at a time, with only ``columns``."""
    columns = list(dict.fromkeys(columns))
    reader = {"csv": _csv_batches, "jsonl": _jsonl_batches, "parquet": _parquet_batches}[source.format]
    for path in source.paths:
        if not path.is_file():
            raise DataError("no such file", path=path)
        yield from reader(path, columns, batch_rows, source, set(required))


def count_rows(source: Source, column: str) -> int:
    """Rows of ``source``'s files (Parquet: from the footers; CSV, JSON lines: read, keeping nothing)."""
    if source.format == "parquet":
        return sum(_parquet_file(p).metadata.num_rows for p in source.paths)
    return sum(len(b) for b in read_batches(source, [column], 1 << 16))


def _missing_columns(path: Path, wanted: Sequence[str], have: Sequence[str]) -> DataError:
    missing = [c for c in wanted if c not in have]
    return DataError(f"no column(s) {missing}; the file has {list(have)}: fix the mapping's column names",
                     path=path, field=missing[0])


def _csv_batches(path: Path, columns: list[str], batch_rows: int, source: Source, required: set[str]
                 ) -> Iterator[RawBatch]:
    import csv

    with open(path, "rb") as handle:
        first = handle.readline()
    try:
        header = next(csv.reader([first.decode("utf-8-sig")], delimiter=source.delimiter), [])
    except UnicodeDecodeError:
        raise DataError("the header line is not valid UTF-8", path=path) from None
    header = [h.strip() for h in header]
    if not header:
        raise DataError("empty CSV file: the first line must name the columns", path=path)
    if any(c not in header for c in columns):
        raise _missing_columns(path, columns, header)
    twice = sorted({c for c in columns if header.count(c) > 1})
    if twice:
        raise DataError(f"column(s) {twice} appear more than once in the header: rename the copies", path=path,
                        field=twice[0])
    bad: list = []

    def on_bad_row(row) -> str:
        bad.append(row)
        return "error"

    try:
        reader = pacsv.open_csv(
            path, read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK, use_threads=False, column_names=header,
                                                 skip_rows=1),
            parse_options=pacsv.ParseOptions(delimiter=source.delimiter, invalid_row_handler=on_bad_row),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.binary() for c in columns}, include_columns=columns))
        offset = 0
        for record_batch in reader:
            for start in range(0, record_batch.num_rows, batch_rows):
                part = record_batch.slice(start, batch_rows)
                rows = range(offset, offset + part.num_rows)
                yield RawBatch(path, rows, {c: _decode_cells(part.column(c).to_pylist(), path, rows, c) for c in columns})
                offset += part.num_rows
    except pa.ArrowInvalid as err:
        if bad:
            row = bad[0]
            line = f"line {row.number}: " if row.number is not None else ""
            hint = ("a quote opened there is never closed" if "\n" in row.text.rstrip("\r\n") else
                    "quote fields that hold the delimiter")
            raise DataError(f"{line}expected {row.expected_columns} fields (as the header has), got "
                            f"{row.actual_columns}: {row.text[:80]!r}; {hint}", path=path) from None
        raise DataError(f"not a readable CSV file ({err})", path=path) from None


def _decode_cells(values: list, path: Path, rows: Sequence[int], column: str) -> list:
    out = []
    for i, raw in enumerate(values):
        if raw is None:
            out.append(None)
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"field is not valid UTF-8: {raw[:60]!r}; save the file as UTF-8", path=path,
                            row=rows[i], field=column) from None
        if "\n" in text or "\r" in text:
            raise DataError(f"field runs over a line end ({text[:60]!r}): an unterminated quote? A field may not "
                            "span lines", path=path, row=rows[i], field=column)
        out.append(text if text.strip() else "")
    return out


def _jsonl_batches(path: Path, columns: list[str], batch_rows: int, source: Source, required: set[str]
                   ) -> Iterator[RawBatch]:
    rows: list[int] = []
    objects: list[dict] = []
    first = True

    def flush() -> RawBatch:
        nonlocal first
        if first:  # a required key in none of the first rows: a misspelt column, not missing values
            absent = [c for c in columns if c in required and not any(c in o for o in objects)]
            if absent:
                keys = sorted({k for o in objects for k in o})
                raise DataError(f"no key(s) {absent} in the first {len(objects)} lines; they have {keys}: fix the "
                                "mapping's column names", path=path, row=rows[0], field=absent[0])
            first = False
        return RawBatch(path, list(rows), {c: [o.get(c) for o in objects] for c in columns})

    with open(path, "rb") as handle:
        for number, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise DataError("line is not valid UTF-8; save the file as UTF-8", path=path, row=number) from None
            except json.JSONDecodeError as err:
                raise DataError(f"not valid JSON ({err.msg} at character {err.colno}): {line[:80]!r}", path=path,
                                row=number) from None
            if not isinstance(obj, dict):
                raise DataError(f"a JSON lines row must be an object {{\"column\": value, ...}}, got "
                                f"{type(obj).__name__}", path=path, row=number)
            rows.append(number)
            objects.append(obj)
            if len(objects) == batch_rows:
                yield flush()
                rows.clear()
                objects.clear()
    if objects:
        yield flush()


def _parquet_file(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"not a readable Parquet file ({err})", path=path) from None


def _parquet_batches(path: Path, columns: list[str], batch_rows: int, source: Source, required: set[str]
                     ) -> Iterator[RawBatch]:
    file = _parquet_file(path)
    names = file.schema_arrow.names
    if any(c not in names for c in columns):
        raise _missing_columns(path, columns, names)
    offset = 0
    for batch in file.iter_batches(batch_size=batch_rows, columns=columns, use_threads=False):
        rows = range(offset, offset + batch.num_rows)
        yield RawBatch(path, rows, {c: _python_values(batch.column(c), path, offset, c) for c in columns})
        offset += batch.num_rows


def _python_values(col: pa.Array, path: Path, offset: int, column: str) -> list:
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_timestamp(col.type) or pa.types.is_date64(col.type):
        col = col.cast(pa.int64())  # the count in the column's own unit
    try:
        return col.to_pylist()
    except UnicodeDecodeError:
        texts = col.flatten() if pa.types.is_list(col.type) else col
        bad = _first_invalid_utf8(texts) or 0
        row = pc.list_parent_indices(col)[bad].as_py() if texts is not col else bad
        raise DataError("text is not valid UTF-8; write texts as UTF-8", path=path, row=offset + row,
                        field=column) from None


# Cell converters ------------------------------------------------------------------------------------------

def _missing(value) -> bool:
    return value is None or value == ""


def _integer(value) -> int | None:
    """The integer a value stands for, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            return None
        return int(number) if math.isfinite(number) and number.is_integer() else None
    return None


def integers(batch: RawBatch, column: str, *, nonnegative: bool, hashed: bool = False) -> list[int]:
    """Ids (``nonnegative``) or timestamps; with ``hashed``, ids of any text, hashed."""
    out = []
    for i, value in enumerate(batch.columns[column]):
        if _missing(value):
            raise batch.fail(i, column, "missing value: every row needs one")
        if hashed:
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise batch.fail(i, column, f"a hashed id must be a text or an integer, got {value!r}")
            out.append(hash_text(value.strip() if isinstance(value, str) else str(value)))
            continue
        number = _integer(value)
        if number is None:
            hint = "; list the column in hash_ids to hash text ids" if nonnegative and isinstance(value, str) else ""
            raise batch.fail(i, column, f"expected an integer, got {value!r}{hint}")
        if not _INT64[0] <= number <= _INT64[1]:
            raise batch.fail(i, column, f"{number} is beyond the int64 range{'; hash it (hash_ids)' if nonnegative else ''}")
        if nonnegative and number < 0:
            raise batch.fail(i, column, f"ids must be >= 0, got {number}; map them to non-negative ids, or list the "
                             "column in hash_ids to hash them")
        out.append(number)
    return out


_LABELS = {"0": 0, "1": 1, "true": 1, "false": 0}


def labels(batch: RawBatch, column: str) -> list[int]:
    out = []
    for i, value in enumerate(batch.columns[column]):
        if _missing(value):
            raise batch.fail(i, column, "missing label: every row needs 0 or 1")
        if isinstance(value, bool):
            label = int(value)
        elif isinstance(value, str):
            label = _LABELS.get(value.strip().lower())
        else:
            label = _integer(value)
        if label not in (0, 1):
            raise batch.fail(i, column, f"label must be 0 or 1 (or true / false), got {value!r}")
        out.append(label)
    return out


def floats(batch: RawBatch, column: str, fill: float | None) -> list[float]:
    out = []
    for i, value in enumerate(batch.columns[column]):
        if _missing(value):
            if fill is None:
                raise batch.fail(i, column, "missing value: give the column a fill (e.g. { column = ..., fill = 0.0 } "
                                 "in [dense]) or fill it in the data")
            out.append(fill)
            continue
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value.strip())
        if number is None:
            raise batch.fail(i, column, f"expected a number, got {value!r}")
        if not math.isfinite(number) or abs(number) > _FLOAT32_MAX:
            raise batch.fail(i, column, f"dense value must be finite and within float32's range, got {value!r}; "
                             "replace NaN / inf before importing (or leave the cell empty and give a fill)")
        out.append(number)
    return out


def categories(batch: RawBatch, column: str, sep: str | None) -> list[list[int]]:
    out = []
    for i, value in enumerate(batch.columns[column]):
        if _missing(value):
            out.append([])
            continue
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(sep)] if sep else [value.strip()]
            parts = [p for p in parts if p]
        elif isinstance(value, list):
            parts = [p.strip() if isinstance(p, str) else p for p in value if p is not None and p != ""]
        else:
            parts = [value]
        codes = []
        for part in parts:
            number = _integer(part)
            if number is None and isinstance(part, str):
                codes.append(hash_text(part))
            elif number is None:
                raise batch.fail(i, column, f"a category must be an integer or a text, got {part!r}")
            elif not 0 <= number <= _INT64[1]:
                raise batch.fail(i, column, f"an integer category must be in [0, 2**63), got {number}; give it as a "
                                 "text to hash it")
            else:
                codes.append(number)
        out.append(codes)
    return out


def text_lists(batch: RawBatch, column: str, sep: str | None, newest_first: bool, max_length: int) -> list[list[str]]:
    out = []
    for i, value in enumerate(batch.columns[column]):
        if _missing(value):
            texts = []
        elif isinstance(value, str):
            if sep is None:
                raise batch.fail(i, column, f"a text {value[:40]!r} where a list of texts belongs: give the sequence "
                                 "a sep (e.g. sep = \"|\") to split it")
            texts = [t.strip() for t in value.split(sep)]
        elif isinstance(value, list):
            texts = value
            for j, text in enumerate(texts):
                if not isinstance(text, str) and text is not None:
                    raise batch.fail(i, column, f"element {j} of the list is {text!r}, not a text")
            texts = [t.strip() for t in texts if t is not None]
        else:
            raise batch.fail(i, column, f"expected a list of texts, got {value!r}")
        texts = [t for t in texts if t]
        if newest_first:
            texts.reverse()
        out.append(texts[-max_length:])
    return out


def texts(batch: RawBatch, column: str) -> list[str]:
    out = []
    for i, value in enumerate(batch.columns[column]):
        if value is None:
            raise batch.fail(i, column, "missing text (null); write an empty text \"\" for an item without one")
        if not isinstance(value, str):
            raise batch.fail(i, column, f"expected a text, got {value!r}; quote it")
        out.append(value.strip())
    return out


def split_names(batch: RawBatch, column: str) -> list[int]:
    out = []
    for i, value in enumerate(batch.columns[column]):
        name = value.strip().lower() if isinstance(value, str) else value
        if name not in SPLITS:
            raise batch.fail(i, column, f"the split must be one of {list(SPLITS)}, got {value!r}")
        out.append(SPLITS.index(name))
    return out


def text_form(value) -> str | None:
    """A value as the text an event filter compares (``where``): 7 and "7" alike."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value.strip() if isinstance(value, str) else str(value)
