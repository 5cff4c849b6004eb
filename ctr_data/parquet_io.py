"""Streaming, validated Parquet I/O for sample files (see :mod:`bahe.ctr_data.schema`).

* :class:`SampleWriter` appends batches as row groups; it writes to a temporary name beside the
  target and renames it into place only when closed without error, so a crash or a bad row never
  leaves a half-written file under the real name.
* :class:`SampleReader` opens a file, checks its columns against the schema it carries (each once,
  each of exactly the type :class:`SampleWriter` writes) and yields validated record batches, so a
  50M-row file never has to fit in memory.

Every check raises :class:`~bahe.ctr_data.schema.DataError` naming the file, the row (0-based, counted
over the whole file) and the field. A write that fails (a full disk, an unwritable folder) raises
:class:`SampleWriteError` naming the file and the reason; nothing is left under the target name.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bahe.ctr_data.schema import DataError, SampleSchema
from bahe.ctr_data.validation import _check_nonnegative as check_nonnegative
from bahe.ctr_data.validation import duplicated_names, is_floating_type, is_integer_type, same_type, validate_batch

__all__ = ["SampleReader", "SampleWriteError", "SampleWriter", "publish_together", "validate_batch"]


class SampleWriteError(ValueError):
    """Writing a sample file failed (a full disk, an unwritable folder, a folder at the target): the
    message names the file and the reason; no partial file is left and an older file at the target is
    intact. The OSError is its ``__cause__``. A ValueError, like ``StoreWriteError``: every command
    reports it in one line."""


def _reason(err: OSError) -> str:
    if err.errno is None:
        return str(err)
    return f"{os.strerror(err.errno)} ({errno.errorcode.get(err.errno, err.errno)})"


class SampleWriter:
    """Write validated sample batches to ``path`` atomically.

    An existing file at ``path`` is replaced, and only once the new file is complete; a failed write
    (bad data, a full disk) leaves it as it was and no partial file behind.

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
        self._partial = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self._writer: pq.ParquetWriter | None = None
        self._finished = False
        if self.path.is_dir():
            raise SampleWriteError(f"cannot write sample file {self.path}: it is a folder; name a .parquet file "
                                   f"(e.g. {self.path / 'samples.parquet'})")
        blocking = next((p for p in self.path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise SampleWriteError(f"cannot write sample file {self.path}: {blocking} is a file, not a folder; "
                                   "write elsewhere, or move that file away")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self._partial, schema.arrow_schema(), compression=compression)
        except OSError as err:
            raise self._failed(err) from err

    def _discard(self) -> None:
        """Close the Parquet writer, whatever state it is in, and remove the partial file."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(OSError):  # closing after a failed write may fail again (the same full disk)
                writer.close()
        with contextlib.suppress(OSError):  # its folder is not a folder: there is no partial file
            self._partial.unlink(missing_ok=True)

    def _failed(self, err: OSError) -> SampleWriteError:
        """Drop the partial file; the error to raise, naming the file, the reason and what is left."""
        self._discard()
        kept = "the older file there is intact" if self.path.is_file() else "nothing was written there"
        return SampleWriteError(f"cannot write sample file {self.path}: {_reason(err)}; no partial file is left and "
                                f"{kept}. Free some space or write elsewhere, then run again")

    def write(self, batch: pa.Table | pa.RecordBatch | Mapping[str, Any]) -> None:
        """Validate and append a batch (an Arrow table / batch or a dict of columns)."""
        if self._writer is None or self._finished:
            raise ValueError(f"SampleWriter for {self.path} is closed")
        if isinstance(batch, Mapping):
            batch = self._table_from_columns(batch)
        target = self.schema.arrow_schema().names
        extra = [name for name in batch.schema.names if name not in target]
        if extra:  # it would be dropped silently: most likely a typo or a feature missing from the schema
            raise DataError(f"column(s) {extra} are not in the schema {target}; add them to the SampleSchema or "
                            "drop them before writing", path=self.path, field=extra[0])
        table = validate_batch(batch, self.schema, path=self.path, row_offset=self.rows_written)
        try:
            self._writer.write_table(table, row_group_size=self._row_group_size)
        except OSError as err:
            raise self._failed(err) from err
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
            if is_integer_type(dtype) or pa.types.is_list(dtype):
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
                if inferred is not None and is_floating_type(inferred.type):
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

    def finish(self) -> None:
        """Write the footer into the partial file, not yet under the real name (several files that must
        appear together finish all first, then :meth:`close` each)."""
        if self._finished:
            return
        if self._writer is None:
            raise ValueError(f"SampleWriter for {self.path} was aborted")
        try:
            self._writer.close()
        except OSError as err:
            raise self._failed(err) from err
        self._finished = True

    def close(self) -> Path:
        """Finish the file and move it to its real name (replacing an older file there)."""
        self.finish()
        try:
            os.replace(self._partial, self.path)
        except OSError as err:
            raise self._failed(err) from err
        self._writer = None
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; the real name is left untouched."""
        self._discard()

    def __enter__(self) -> SampleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def publish_together(writers: Mapping[str, SampleWriter]) -> dict[str, Path]:
    """Finish several files, then move each to its real name: a failure while any is written (a full
    disk) leaves none of them replaced. Every writer is aborted on an error."""
    try:
        for writer in writers.values():
            writer.finish()
        return {name: writer.close() for name, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise


class SampleReader:
    """Open a sample file and stream validated batches.

    A file must hold each of its schema's columns once and of exactly the type :class:`SampleWriter`
    writes (a file from another tool with an int ``item_text`` or ``list<int64>`` sequences is refused,
    not cast to text); columns the schema lacks are not read.

    Args:
        path: the sample file.
        nonnegative_ids: ID columns (``user_id``, ``item_id``, ``cat_<name>``) whose ids must be >= 0
            (what the trainer's batcher needs): a negative one is refused naming the file's row.

    Attributes:
        schema: the :class:`SampleSchema` stored in the file.
        num_rows: rows in the file (from the Parquet footer; nothing is read).
        row_group_offsets: int64 array of ``num_row_groups + 1``: row group i holds the file's rows
            ``[offsets[i], offsets[i + 1])`` (from the footer).

    Row groups are Parquet's unit of reading: :meth:`read_row_group` reads one (every column chunk of
    it), and :attr:`bytes_read` counts the bytes actually read from the file so far, footer included
    (``row_groups_read`` the groups).
    """

    def __init__(self, path: str | os.PathLike, *, nonnegative_ids: Collection[str] = ()):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError("no such sample file", path=self.path)
        try:
            self._source = _CountingFile(self.path)
            self._file = pq.ParquetFile(self._source)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"not a readable Parquet file ({err})", path=self.path) from None
        arrow_schema = self._file.schema_arrow
        self.schema = SampleSchema.from_arrow(arrow_schema, path=self.path)
        twice = duplicated_names(arrow_schema.names)
        if twice:
            raise DataError(f"column(s) {twice} appear more than once in the file; a sample file has each column "
                            "once: rewrite it without the copies", path=self.path, field=twice[0])
        missing = [n for n in self.schema.arrow_schema().names if n not in arrow_schema.names]
        if missing:
            raise DataError(f"missing column(s) {missing}", path=self.path, field=missing[0])
        for expected in self.schema.arrow_schema():
            found = arrow_schema.field(expected.name).type
            if not same_type(found, expected.type):
                raise DataError(f"found type {found}, expected {expected.type} (the schema's type): a sample "
                                "file holds exactly the types SampleWriter writes: rewrite the file with "
                                "bahe.ctr_data.parquet_io.SampleWriter (it converts and checks the values)",
                                path=self.path, field=expected.name)
        ids = ["user_id", "item_id", *self.schema.categorical_columns]
        unknown = [name for name in nonnegative_ids if name not in ids]
        if unknown:
            raise ValueError(f"nonnegative_ids {unknown} are not ID columns of {self.path}, which has {ids}")
        self.nonnegative_ids = tuple(nonnegative_ids)
        self.num_rows = self._file.metadata.num_rows
        sizes = [self._file.metadata.row_group(i).num_rows for i in range(self._file.metadata.num_row_groups)]
        self.row_group_offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self.row_groups_read = 0  # by read_row_group

    @property
    def bytes_read(self) -> int:
        """Bytes read from the file so far (footer, column chunks), as the operating system served them."""
        return self._source.bytes_read

    def iter_batches(self, batch_size: int = 65_536) -> Iterator[pa.Table]:
        """Yield validated tables of at most ``batch_size`` rows, in file order."""
        offset = 0
        for batch in self._file.iter_batches(batch_size=batch_size, columns=self.schema.arrow_schema().names):
            yield validate_batch(batch, self.schema, path=self.path, row_offset=offset,
                                 nonnegative=self.nonnegative_ids)
            offset += batch.num_rows

    @property
    def num_row_groups(self) -> int:
        return self._file.metadata.num_row_groups

    def row_group_rows(self, index: int) -> int:
        """Rows in one row group (from the footer; nothing is read)."""
        return self._file.metadata.row_group(index).num_rows

    def read_row_group(self, index: int, rows: np.ndarray | None = None) -> pa.Table:
        """One row group, validated (row numbers in errors count over the whole file); with ``rows``
        (indices into the group, any order, repeats allowed), only those rows, in that order. The whole
        group is read and checked either way: a row group is the smallest unit a Parquet file is read in."""
        offset = int(self.row_group_offsets[index])
        table = self._file.read_row_group(index, columns=self.schema.arrow_schema().names)
        self.row_groups_read += 1
        table = validate_batch(table, self.schema, path=self.path, row_offset=offset, nonnegative=self.nonnegative_ids)
        return table if rows is None else table.take(pa.array(rows, type=pa.int64()))

    def check_ids(self) -> None:
        """Refuse a negative id in any of ``nonnegative_ids`` anywhere in the file, naming its row, before
        any batch is read. The footer's statistics (each row group's minimum id) prove most groups clean
        without reading them; the ID columns of the others (a negative minimum, no statistics) are read."""
        if not self.nonnegative_ids:
            return
        metadata = self._file.metadata
        leaves = {}  # ID column -> index of its (leaf) column chunk in each row group
        for j in range(metadata.num_columns):
            name = metadata.schema.column(j).path.split(".")[0]
            if name in self.nonnegative_ids:
                leaves[name] = j
        for index in range(metadata.num_row_groups):
            doubtful = []
            for name, j in leaves.items():
                stats = metadata.row_group(index).column(j).statistics
                proven = stats is not None and stats.has_min_max and stats.min >= 0
                if not proven:
                    doubtful.append(name)
            if doubtful:
                table = self._file.read_row_group(index, columns=doubtful)
                for name in doubtful:
                    check_nonnegative(table.column(name).combine_chunks(), path=self.path,
                                       row_offset=int(self.row_group_offsets[index]), field=name)

    def read_all(self) -> pa.Table:
        """The whole file as one validated table (small files and tests only)."""
        tables = list(self.iter_batches())
        return pa.concat_tables(tables) if tables else self.schema.arrow_schema().empty_table()


class _CountingFile(io.RawIOBase):
    """A read-only file that counts the bytes read through it (what pyarrow asks of the disk)."""

    def __init__(self, path: Path):
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 -- closed with this object
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer) -> int:
        count = self._file.readinto(buffer)
        self.bytes_read += count or 0
        return count

    def close(self) -> None:
        self._file.close()
        super().close()
