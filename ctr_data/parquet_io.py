"""Streaming, validated Parquet I/O for sample files (see :mod:`bahe.ctr_data.schema`).

* :class:`SampleWriter` appends batches as row groups; it writes to a temporary name beside the
  target and renames it into place only when closed without error, so a crash or a bad row never
  leaves a half-written file under the real name.
* :class:`SampleReader` opens a file, checks its columns against the schema it carries and yields
  validated record batches, so a 50M-row file never has to fit in memory.

Every check raises :class:`~bahe.ctr_data.schema.DataError` naming the file, the row (0-based, counted
over the whole file) and the field.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from bahe.ctr_data.schema import DENSE_PREFIX, LABEL, DataError, SampleSchema


def _is_integer(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or (pa.types.is_list(dtype) and pa.types.is_integer(dtype.value_type))


def _is_floating(dtype: pa.DataType) -> bool:
    return pa.types.is_floating(dtype) or (pa.types.is_list(dtype) and pa.types.is_floating(dtype.value_type))


def _first_true(mask: pa.Array | pa.ChunkedArray) -> int:
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))[0])


def _first_uncastable(values: pa.Array, target: pa.DataType) -> int:
    for i in range(len(values)):
        try:
            values.take([i]).cast(target)  # take, not slice: a sliced list still casts all its values
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return i
    return 0


def validate_batch(batch: pa.RecordBatch | pa.Table, schema: SampleSchema, *, path: object, row_offset: int) -> pa.Table:
    """Check and cast one batch to ``schema``; returns it as a Table with the exact Arrow schema.

    Raises DataError for a missing column, a value of the wrong type, a null, a label outside
    {0, 1} or a non-finite dense value (NaN, +-inf, or a float64 beyond the float32 range), naming
    the row (``row_offset`` + index) and the field. Every check is one vectorised kernel over the
    column; only a batch already known to be bad is searched for its first bad row. Columns the
    schema lacks are ignored here (a reader selects its columns); :class:`SampleWriter` refuses them.
    """
    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    target = schema.arrow_schema()
    missing = [name for name in target.names if name not in table.column_names]
    if missing:
        extra = [name for name in table.column_names if name not in target.names]
        hint = f"; the data has column(s) the schema lacks, a typo? {extra}" if extra else ""
        raise DataError(f"missing column(s) {missing}; the schema needs {target.names}{hint}", path=path,
                        field=missing[0])
    columns = []
    for fld in target:
        col = given = table.column(fld.name).combine_chunks()
        if not col.type.equals(fld.type):
            try:
                col = col.cast(fld.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
                row = _first_uncastable(col, fld.type)
                raise DataError(
                    f"value {col[row].as_py()!r} is not {fld.type} ({err})",
                    path=path, row=row_offset + row, field=fld.name,
                ) from None
        if col.null_count:
            raise DataError("missing value (null); use an empty list / empty text / 0 instead",
                            path=path, row=row_offset + _first_true(col.is_null()), field=fld.name)
        if pa.types.is_list(fld.type):
            flat = col.flatten()
            if flat.null_count:
                owners = pc.list_parent_indices(col)
                bad = owners[_first_true(flat.is_null())].as_py()
                raise DataError("null element inside a list", path=path, row=row_offset + bad, field=fld.name)
        if fld.name == LABEL:
            bad_label = pc.invert(pc.is_in(col, pa.array([0, 1], pa.int8())))
            if pc.any(bad_label).as_py():
                row = _first_true(bad_label)
                raise DataError(f"label must be 0 or 1, got {col[row].as_py()}", path=path,
                                row=row_offset + row, field=fld.name)
        if fld.name.startswith(DENSE_PREFIX):
            not_finite = pc.invert(pc.is_finite(col))
            if pc.any(not_finite).as_py():
                row = _first_true(not_finite)
                value = given[row].as_py()
                why = " (beyond the float32 range)" if isinstance(value, (int, float)) and np.isfinite(value) else ""
                raise DataError(f"dense value must be finite, got {value!r}{why}; replace NaN / inf (e.g. by 0, "
                                "the missing-value convention) before writing", path=path, row=row_offset + row,
                                field=fld.name)
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=target)


class SampleWriter:
    """Write validated sample batches to ``path`` atomically.

    Example::

        with SampleWriter("train.parquet", schema) as writer:
            writer.write({"label": [1], "timestamp": [0], ...})
        # train.parquet exists only now; after an exception it does not exist at all.
    """

    def __init__(self, path: str | os.PathLike, schema: SampleSchema, *, row_group_size: int = 65_536,
                 compression: str = "zstd"):
        self.path = Path(path)
        self.schema = schema
        self.rows_written = 0
        self._row_group_size = row_group_size
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self._writer = pq.ParquetWriter(self._partial, schema.arrow_schema(), compression=compression)

    def write(self, batch: pa.Table | pa.RecordBatch | Mapping[str, Any]) -> None:
        """Validate and append a batch (an Arrow table / batch or a dict of columns)."""
        if isinstance(batch, Mapping):
            batch = self._table_from_columns(batch)
        target = self.schema.arrow_schema().names
        extra = [name for name in batch.schema.names if name not in target]
        if extra:  # it would be dropped silently: most likely a typo or a feature missing from the schema
            raise DataError(f"column(s) {extra} are not in the schema {target}; add them to the SampleSchema or "
                            "drop them before writing", path=self.path, field=extra[0])
        table = validate_batch(batch, self.schema, path=self.path, row_offset=self.rows_written)
        self._writer.write_table(table, row_group_size=self._row_group_size)
        self.rows_written += table.num_rows

    def _table_from_columns(self, columns: Mapping[str, Any]) -> pa.Table:
        """Python / numpy columns -> Arrow, converting each to its schema type; a value that does
        not convert is reported with its row and field. A fractional number in an integer column
        (label 0.5, id 1.5) is refused, not truncated; so is a text where a list belongs."""
        target = self.schema.arrow_schema()
        arrays = {}
        for name, values in columns.items():
            if isinstance(values, (pa.Array, pa.ChunkedArray)) or name not in target.names:
                arrays[name] = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
                continue
            dtype = target.field(name).type
            if _is_integer(dtype) or pa.types.is_list(dtype):
                # pa.array(values, type=...) would truncate 0.5 to 0 in an integer column and turn the
                # text "abc" into the list ["a", "b", "c"] in a list column, without a word
                try:
                    inferred = pa.array(values)
                except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
                    inferred = None
                if pa.types.is_list(dtype) and not (inferred is not None and (
                        pa.types.is_list(inferred.type) or pa.types.is_null(inferred.type))):
                    row = next((i for i, v in enumerate(values)
                                if v is not None and not isinstance(v, (list, tuple, np.ndarray))), None)
                    if row is not None:
                        raise DataError(f"value {values[row]!r} is not a list ({dtype}); put a single value in a "
                                        "list, and a missing one as []", path=self.path,
                                        row=self.rows_written + row, field=name)
                if inferred is not None and _is_floating(inferred.type):
                    arrays[name] = inferred  # validate_batch casts it safely: 1.0 -> 1, but 1.5 is refused
                    continue
            try:
                arrays[name] = pa.array(values, type=dtype)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as err:
                for row, value in enumerate(values):
                    try:
                        pa.array([value], type=dtype)
                    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
                        raise DataError(f"value {value!r} is not {dtype} ({err})", path=self.path,
                                        row=self.rows_written + row, field=name) from None
                raise
        return pa.table(arrays)

    def close(self) -> Path:
        """Finish the file and move it to its real name."""
        self._writer.close()
        os.replace(self._partial, self.path)
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; the real name is left untouched."""
        self._writer.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> SampleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SampleReader:
    """Open a sample file and stream validated batches.

    Attributes:
        schema: the :class:`SampleSchema` stored in the file.
        num_rows: rows in the file (from the Parquet footer; nothing is read).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError("no such sample file", path=self.path)
        try:
            self._file = pq.ParquetFile(self.path)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"not a readable Parquet file ({err})", path=self.path) from None
        arrow_schema = self._file.schema_arrow
        self.schema = SampleSchema.from_arrow(arrow_schema, path=self.path)
        missing = [n for n in self.schema.arrow_schema().names if n not in arrow_schema.names]
        if missing:
            raise DataError(f"missing column(s) {missing}", path=self.path, field=missing[0])
        self.num_rows = self._file.metadata.num_rows

    def iter_batches(self, batch_size: int = 65_536) -> Iterator[pa.Table]:
        """Yield validated tables of at most ``batch_size`` rows, in file order."""
        offset = 0
        for batch in self._file.iter_batches(batch_size=batch_size, columns=self.schema.arrow_schema().names):
            yield validate_batch(batch, self.schema, path=self.path, row_offset=offset)
            offset += batch.num_rows

    @property
    def num_row_groups(self) -> int:
        return self._file.metadata.num_row_groups

    def row_group_rows(self, index: int) -> int:
        """Rows in one row group (from the footer; nothing is read)."""
        return self._file.metadata.row_group(index).num_rows

    def read_row_group(self, index: int) -> pa.Table:
        """One row group, validated (row numbers in errors count over the whole file)."""
        offset = sum(self._file.metadata.row_group(i).num_rows for i in range(index))
        table = self._file.read_row_group(index, columns=self.schema.arrow_schema().names)
        return validate_batch(table, self.schema, path=self.path, row_offset=offset)

    def read_all(self) -> pa.Table:
        """The whole file as one validated table (small files and tests only)."""
        tables = list(self.iter_batches())
        return pa.concat_tables(tables) if tables else self.schema.arrow_schema().empty_table()
