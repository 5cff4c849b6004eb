"""Per-rank batches from sample files: streaming, deterministic, resumable, equal-sized.

The file is read in global batches of ``batch_size * world`` rows (one row group in memory at a
time; the file is never loaded whole); rank r takes rows [r * batch_size, (r + 1) * batch_size) of
each. Training shuffles within the split, which stays entirely earlier than valid and test: each
epoch visits the row groups in a seeded random order and permutes the rows inside each one (a
time-ordered stream would feed whole sessions of one user per batch). Every rank
gets a batch of exactly ``batch_size`` rows at every step -- the sharded tables' collectives run in
lockstep, and gloo's all-to-all needs equal sizes -- so training drops a final partial global
batch, and evaluation pads it with repeated rows that are masked out of the metrics. The order of
rows does not depend on the world size, so a data position is a row count: a resumed run skips the
rows already trained on -- with the same number of ranks or another one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from bahe.ctr_data.parquet_io import SampleReader


def _training_stream(reader: SampleReader, seed: int, shuffle: bool, skip_rows: int = 0) -> Iterator[pa.Table]:
    """Row groups in a seeded random order per epoch, rows permuted inside each (or file order); forever.
    The first ``skip_rows`` rows of that stream are left out (whole row groups without reading them)."""
    epoch = 0
    while True:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(reader.num_row_groups) if shuffle else range(reader.num_row_groups)
        for index in order:
            rows = reader.row_group_rows(int(index))
            permutation = rng.permutation(rows) if shuffle else None  # drawn even when skipped: same stream
            if skip_rows >= rows:
                skip_rows -= rows
                continue
            group = reader.read_row_group(int(index))
            group = group.take(pa.array(permutation)) if shuffle else group
            yield group.slice(skip_rows)
            skip_rows = 0
        epoch += 1


def _global_batches(tables: Iterator[pa.Table], size: int) -> Iterator[pa.Table]:
    """Re-cut a stream of tables into tables of exactly ``size`` rows (a last shorter one at the end)."""
    pending: list[pa.Table] = []
    count = 0
    for table in tables:
        pending.append(table)
        count += table.num_rows
        while count >= size:
            joined = pa.concat_tables(pending)
            yield joined.slice(0, size)
            rest = joined.slice(size)
            pending, count = [rest], rest.num_rows
    if count:
        yield pa.concat_tables(pending)


def rank_tables(path: Path, batch_size: int, rank: int, world: int, *, train: bool, skip_rows: int = 0,
                seed: int = 0, shuffle: bool = True, id_columns: tuple[str, ...] = ()) -> Iterator[tuple[pa.Table, int]]:
    """Yield (table of exactly ``batch_size`` rows, number of real rows in it) for this rank.

    Args:
        train: endless, shuffled unless ``shuffle`` is False (see the module doc); otherwise one pass
            in file order, the last global batch padded with repeated rows (real rows first).
        skip_rows: training rows to skip first (resuming at a data position: steps x batch x ranks
            of the run that saved it, whatever the world size now).
        seed: the training order's seed (the same on every rank).
        id_columns: ID columns whose ids must be >= 0 (the batcher's): a negative one is refused naming
            the file and its row, before rows are shuffled into batches.
    """
    reader = SampleReader(path, nonnegative_ids=id_columns)
    size = batch_size * world
    if train and reader.num_rows < size:
        raise ValueError(f"{path} has {reader.num_rows} rows, fewer than one global batch ({batch_size} x {world} "
                         "ranks); lower --batch-size")
    source = _training_stream(reader, seed, shuffle, skip_rows) if train else reader.iter_batches(size)
    for table in _global_batches(source, size):
        real = table.num_rows
        if real < size:  # only the last batch of an evaluation pass
            table = table.take(pa.array(np.arange(size) % real))
        yield table.slice(rank * batch_size, batch_size), int(np.clip(real - rank * batch_size, 0, batch_size))


def batches(path: Path, batcher: Callable, batch_size: int, rank: int, world: int, **kw) -> Iterator:
    """Training batches (see :func:`rank_tables`)."""
    ids = tuple(getattr(batcher, "id_features", ()))
    return (batcher(table) for table, _ in rank_tables(path, batch_size, rank, world, train=True, id_columns=ids, **kw))


def eval_batches(path: Path, batcher: Callable, batch_size: int, rank: int, world: int) -> Iterator:
    """(batch, real rows) pairs covering the split once; rows past ``real`` are padding."""
    ids = tuple(getattr(batcher, "id_features", ()))
    return ((batcher(table), real) for table, real in rank_tables(path, batch_size, rank, world, train=False,
                                                                   id_columns=ids))
