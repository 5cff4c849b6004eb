"""Batch scoring's files: the input rows each rank scores, and the score file the ranks write together.

Inputs: sample Parquet files, checked up front on every rank (readable, a BAHE sample file, every column
the run's model reads present and of the schema's type), then read as one stream -- the files concatenated
in the order given. Rank r of W scores the contiguous rows ``[r * N // W, (r + 1) * N // W)`` of that
stream, read row group by row group (never a whole file) and validated on the way (a bad value names its
file, row and field). Every rank runs the same number of forward calls, as the sharded tables' collectives
need: a rank's last batch is padded with repeated rows, and a rank whose share has run out scores padding
batches; padding never reaches the output.

Output: each rank writes its share to a part file beside ``--out`` (``.NAME.TOKEN.part-00001``); rank 0
then copies the parts, in rank order and row group by row group, into ``.NAME.TOKEN.partial`` and renames it
to ``--out``. A failure removes the parts and the partial file: nothing is left under the real name (an
older file there is intact) and nothing beside it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bahe.ctr_data.parquet_io import SampleReader, validate_batch
from bahe.ctr_data.schema import ITEM_ID, LABEL, TIMESTAMP, USER_ID, DataError, SampleSchema
from bahe.ctr_data.validation import same_type
from bahe.training.data import recut

PREDICT_METADATA_KEY = b"bahe.predict"
# the input's id columns and label, then the model's outputs
OUTPUT_SCHEMA = pa.schema([pa.field(USER_ID, pa.int64(), nullable=False), pa.field(ITEM_ID, pa.int64(), nullable=False),
                           pa.field(TIMESTAMP, pa.int64(), nullable=False), pa.field(LABEL, pa.int8(), nullable=False),
                           pa.field("score", pa.float32(), nullable=False),
                           pa.field("logit", pa.float32(), nullable=False)])
ROW_GROUP_ROWS = 65_536  # rows per output row group (and the most a part writer holds before writing)


@dataclass(frozen=True)
class ScoreInput:
    """One input file: its path and its rows (from the Parquet footer)."""

    path: Path
    rows: int


def open_inputs(files: Sequence[Path], schema: SampleSchema) -> list[ScoreInput]:
    """Check every file against the run's ``schema`` (footers only; no rows read). Raises DataError
    naming the file (and the column) for a missing or unreadable file, a file that is not a sample file,
    or a column the model reads that the file lacks or holds with another type."""
    inputs = []
    expected = schema.arrow_schema()
    for path in map(Path, files):
        reader = SampleReader(path)  # exists, Parquet, a sample file; its own columns of their types
        found = pq.read_schema(path)
        for field in expected:
            if field.name not in found.names:
                raise DataError(f"missing column {field.name!r}, which the run's model reads (the run was trained on "
                                f"{_describe(schema)}); score files of the run's schema", path=path, field=field.name)
            if not same_type(found.field(field.name).type, field.type):
                raise DataError(f"found type {found.field(field.name).type}, expected {field.type} (the run's "
                                "schema); rewrite the file with bahe.ctr_data.parquet_io.SampleWriter", path=path,
                                field=field.name)
        inputs.append(ScoreInput(path, reader.num_rows))
    return inputs


def _describe(schema: SampleSchema) -> str:
    return f"categorical {list(schema.categorical)}, dense {list(schema.dense)}, sequences {list(schema.sequences)}"


def rank_share(total: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of the concatenated inputs that ``rank`` scores (contiguous, sizes differ by <= 1)."""
    return rank * total // world, (rank + 1) * total // world


def forward_calls(total: int, world: int, batch_size: int) -> int:
    """Forward calls every rank runs: enough for the largest share."""
    largest = math.ceil(total / world)
    return math.ceil(largest / batch_size)


def read_rows(inputs: Sequence[ScoreInput], start: int, stop: int, schema: SampleSchema, nonnegative: Sequence[str],
              chunk_rows: int) -> Iterator[pa.Table]:
    """Validated tables (the run's columns only) of rows [start, stop) of the concatenated inputs, in order;
    at most about ``chunk_rows`` rows read at a time. Rows are numbered over each file in errors."""
    columns = schema.arrow_schema().names
    first = 0
    for source in inputs:
        lo, hi = max(start - first, 0), min(stop - first, source.rows)
        first += source.rows
        if hi <= lo:
            continue
        parquet = pq.ParquetFile(source.path)
        sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        begin = int(np.searchsorted(offsets, lo, side="right")) - 1  # the row group holding row lo
        groups = [g for g in range(begin, len(sizes)) if offsets[g] < hi]
        position = int(offsets[begin])
        for batch in parquet.iter_batches(batch_size=chunk_rows, row_groups=groups, columns=columns):
            a, b = max(lo - position, 0), min(hi - position, batch.num_rows)
            if b > a:
                yield validate_batch(batch.slice(a, b - a), schema, path=source.path, row_offset=position + a,
                                     nonnegative=nonnegative)
            position += batch.num_rows
            if position >= hi:
                break


def padded_batches(tables: Iterator[pa.Table], batch_size: int, calls: int, filler: pa.Table | None
                   ) -> Iterator[tuple[pa.Table, int]]:
    """Exactly ``calls`` (table of ``batch_size`` rows, real rows in it) pairs: the stream re-cut, the last
    partial table padded with its own rows repeated, then all-padding tables of ``filler`` (one valid row)."""
    produced = 0
    for table in recut(tables, batch_size):
        real = table.num_rows
        if real < batch_size:
            table = table.take(pa.array(np.arange(batch_size) % real))
        yield table, real
        produced += 1
    if produced < calls and filler is None:
        raise ValueError("a rank with no rows to score needs a filler row for its padding batches")
    for _ in range(calls - produced):
        yield filler.take(pa.array(np.zeros(batch_size, dtype=np.int64))), 0


class ScoreFiles:
    """The part files of one scoring job and the final file (see the module doc).

    Args:
        out: the final score file.
        token: the job's name for its part files, the same on every rank.
        rank, world: this rank and the number of ranks.
    """

    def __init__(self, out: Path, token: str, rank: int, world: int):
        self.out, self.token, self.rank, self.world = Path(out), token, rank, world
        self.part = self.part_path(rank)
        self.partial = self.out.with_name(f".{self.out.name}.{token}.partial")
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.rows = 0

    def part_path(self, rank: int) -> Path:
        return self.out.with_name(f".{self.out.name}.{self.token}.part-{rank:05d}")

    def write(self, table: pa.Table, logits: np.ndarray) -> None:
        """Append real rows: ``table`` (the input rows) and their ``logits`` (float32, one per row)."""
        logits = np.asarray(logits, dtype=np.float32)
        self._pending.append(pa.table([table.column(USER_ID), table.column(ITEM_ID), table.column(TIMESTAMP),
                                       table.column(LABEL), pa.array(self._sigmoid(logits)), pa.array(logits)],
                                      schema=OUTPUT_SCHEMA))
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    @staticmethod
    def _sigmoid(logits: np.ndarray) -> np.ndarray:
        import torch

        return torch.sigmoid(torch.from_numpy(logits)).numpy()  # the float32 numbers evaluation's metrics see

    def _flush(self) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.part, OUTPUT_SCHEMA)
        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending), row_group_size=ROW_GROUP_ROWS)
        self._pending, self._pending_rows = [], 0

    def close_part(self) -> None:
        """Write what is pending and close this rank's part (an empty share writes an empty part)."""
        self._flush()
        writer, self._writer = self._writer, None
        writer.close()

    def assemble(self, metadata: dict) -> None:
        """Rank 0, after every rank closed its part: the parts in rank order -> the final file, atomically;
        ``metadata`` (JSON) goes under the key ``bahe.predict``. The parts are removed."""
        schema = OUTPUT_SCHEMA.with_metadata({PREDICT_METADATA_KEY: json.dumps(metadata).encode()})
        with pq.ParquetWriter(self.partial, schema) as writer:
            for rank in range(self.world):
                part = pq.ParquetFile(self.part_path(rank))
                for group in range(part.metadata.num_row_groups):
                    writer.write_table(part.read_row_group(group).replace_schema_metadata(schema.metadata))
        os.replace(self.partial, self.out)
        for rank in range(self.world):
            self.part_path(rank).unlink(missing_ok=True)

    def discard(self, everything: bool) -> None:
        """Remove this rank's part (``everything``: every rank's part and the partial file; rank 0)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        paths = [self.part_path(r) for r in range(self.world)] + [self.partial] if everything else [self.part]
        for path in paths:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def remove_stale_parts(out: Path) -> list[Path]:
    """Part and partial files an earlier job into ``out`` left behind when it was killed (rank 0, at start)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.[0-9a-f]+\.(partial|part-\d{{5}})")
    removed = []
    with contextlib.suppress(OSError):
        for path in out.parent.iterdir():
            if pattern.fullmatch(path.name):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
    return removed


def check_out(out: Path) -> None:
    """``--out`` names a file in an existing, writable folder (a real write is tried: root ignores mode bits
    only where it holds the capability to). Raises ValueError naming the path and what to change."""
    out = Path(out)
    folder = out.parent
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: name the score file, e.g. {out / 'scores.parquet'}")
    if not folder.exists():
        raise ValueError(f"--out {out}: its folder {folder} does not exist: create it, or write elsewhere")
    if not folder.is_dir():
        raise ValueError(f"--out {out}: {folder} is not a folder: write elsewhere")
    probe = folder / f".{out.name}.{os.getpid()}.probe"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--out {out}: cannot write into {folder} ({err.strerror}): choose a writable folder") from None
